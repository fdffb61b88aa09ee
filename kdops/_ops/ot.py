"""The Sinkhorn ops: the fake kernel of the C++ solver kdops::sinkhorn_solve (it has no autograd), the plan pass
kdops::sinkhorn_plan_pass (a Python op: ATen GEMMs tile by tile) and the autograd function that differentiates the
OT value through the converged potentials (see kdops.functional.ot)."""

import torch

ONLINE_TILE = 256  # rows per tile of the online backend and of the plan pass
CHECK_EVERY = 10  # iterations between convergence checks (one host sync each)


@torch.library.register_fake("kdops::sinkhorn_solve")
def _sinkhorn_solve_fake(x, y, loga, logb, eps, p, max_iter, tol, scaling, check_every, online, tile):
    B, n, m = x.shape[0], x.shape[1], y.shape[1]
    return x.new_empty((B, n)), x.new_empty((B, m)), torch.empty((B,), dtype=torch.long, device="cpu")


def _plan_pass(x, y, loga, logb, f, g, eps, p, tile):
    """One pass over the plan P_ij = a_i b_j exp((f_i + g_j - c_ij) / eps), tile by tile (rows): returns
    <P, C> (B,), and sum_j P_ij grad_x c(x_i, y_j) (B, n, d), sum_i P_ij grad_y c(x_i, y_j) (B, m, d)."""
    B, n, _ = x.shape
    cost_total = x.new_zeros(B)
    gx, gy = torch.empty_like(x), torch.zeros_like(y)
    yh = 0.5 * (y * y).sum(-1)
    for r0 in range(0, n, tile):
        xt = x[:, r0:r0 + tile]
        half_sq = (0.5 * (xt * xt).sum(-1).unsqueeze(-1) + yh.unsqueeze(-2) - xt @ y.transpose(1, 2)).clamp_min(0)
        dist = None if p == 2 else (2 * half_sq).sqrt()
        c = half_sq if p == 2 else dist.pow(p) / p
        logp = (loga[:, r0:r0 + tile].unsqueeze(-1) + logb.unsqueeze(-2)
                + (f[:, r0:r0 + tile].unsqueeze(-1) + g.unsqueeze(-2) - c) / eps)
        plan = logp.exp()
        cost_total += (plan * c).sum((-1, -2))
        # grad_x c = |x - y|^(p-2) (x - y); 0 where x = y (a subgradient for p < 2)
        w = plan if p == 2 else torch.where(dist > 0, plan * dist.pow(p - 2), torch.zeros_like(plan))
        gx[:, r0:r0 + tile] = w.sum(-1, keepdim=True) * xt - w @ y
        gy += w.sum(-2).unsqueeze(-1) * y - w.transpose(1, 2) @ xt
    return cost_total, gx, gy


@torch.library.custom_op("kdops::sinkhorn_plan_pass", mutates_args=())
def sinkhorn_plan_pass(x: torch.Tensor, y: torch.Tensor, loga: torch.Tensor, logb: torch.Tensor, f: torch.Tensor,
                       g: torch.Tensor, eps: float, p: float, tile: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """<P, C> and the P-weighted cost gradients of the plan given by the potentials (see _plan_pass)."""
    return _plan_pass(x, y, loga, logb, f, g, eps, p, tile)


@sinkhorn_plan_pass.register_fake
def _(x, y, loga, logb, f, g, eps, p, tile):
    return x.new_empty(x.shape[0]), torch.empty_like(x), torch.empty_like(y)


class Sinkhorn(torch.autograd.Function):
    """value(x, y, a, b) from the converged potentials; the backward holds them (and so the plan) fixed."""

    @staticmethod
    def forward(ctx, x, y, a, b, opts):
        eps, p, max_iter, tol, scaling, online, transport = opts
        loga, logb = a.log(), b.log()
        f, g, iters = torch.ops.kdops.sinkhorn_solve(x, y, loga, logb, eps, p, max_iter, tol, scaling,
                                                     CHECK_EVERY, online, ONLINE_TILE)
        if transport:
            value, gx, gy = torch.ops.kdops.sinkhorn_plan_pass(x, y, loga, logb, f, g, eps, p, ONLINE_TILE)
            ctx.save_for_backward(gx, gy)
        else:
            # the dual value <a, f> + <b, g>: after the last g update the plan's mass is exactly 1, so the
            # entropic term of the dual vanishes
            value = (a * f).sum(-1) + (b * g).sum(-1)
            ctx.save_for_backward(x, y, loga, logb, f, g)
        ctx.opts, ctx.transport = opts, transport
        ctx.mark_non_differentiable(f, g, iters)
        return value, f, g, iters

    @staticmethod
    def backward(ctx, grad, _gf, _gg, _gi):
        eps, p = ctx.opts[0], ctx.opts[1]
        if ctx.transport:
            gx, gy = ctx.saved_tensors
            ga = gb = None  # the plan is held fixed: no gradient to the weights
        else:
            x, y, loga, logb, f, g = ctx.saved_tensors
            gx = gy = None
            if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                _, gx, gy = torch.ops.kdops.sinkhorn_plan_pass(x, y, loga, logb, f, g, eps, p, ONLINE_TILE)
            ga, gb = f, g
        g3 = grad.view(-1, 1, 1)
        return (gx * g3 if gx is not None else None, gy * g3 if gy is not None else None,
                ga * grad.view(-1, 1) if ga is not None and ctx.needs_input_grad[2] else None,
                gb * grad.view(-1, 1) if gb is not None and ctx.needs_input_grad[3] else None, None)
