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


# A pair counts as near when |x - y| < NEAR * (|x| + |y|): there the Gram form of its gradient term,
# w_ij x_i - w_ij y_j, would lose more than 1 / NEAR of its digits to cancellation, so it is summed from the
# difference x_i - y_j instead (p != 2, where w_ij = P_ij |x_i - y_j|^(p - 2) grows as the pair closes in).
NEAR = 1.0 / 16
NEAR_CHUNK = 1 << 20  # elements of the (pairs, d) differences formed at once


def _plan_pass(x, y, loga, logb, f, eps, p, tile):
    """One pass over the plan P_ij = b_j softmax_i(log a_i + (f_i - c_ij) / eps), tile by tile (columns): the
    last update of the solver set g_j = -eps LSE_i(log a_i + (f_i - c_ij) / eps), so this is a_i b_j
    exp((f_i + g_j - c_ij) / eps) with the column's shift taken out before the exponential (nothing overflows
    where c / eps dwarfs the digits of f + g - c, and every column holds exactly its mass b_j). Returns <P, C>
    (B,), and sum_j P_ij grad_x c(x_i, y_j) (B, n, d), sum_i P_ij grad_y c(x_i, y_j) (B, m, d).

    Costs: the Gram identity for p = 2 (|x - y|^2 / 2 and its gradient x - y are both accurate to the
    rounding of the terms); the direct distance otherwise (|x - y|^p / p from the Gram identity loses half the
    digits at nearly coincident points, and grad c = |x - y|^(p - 2) (x - y) all of them)."""
    B, n, d = x.shape
    cost_total = x.new_zeros(B)
    gx, gy = torch.zeros_like(x), torch.empty_like(y)
    rows = (loga + f / eps).unsqueeze(-1)
    xh = 0.5 * (x * x).sum(-1).unsqueeze(-1) if p == 2 else None
    xn = None if p == 2 else x.norm(dim=-1).unsqueeze(-1)
    for c0 in range(0, y.shape[1], tile):
        yt = y[:, c0:c0 + tile]
        if p == 2:
            c = (xh + 0.5 * (yt * yt).sum(-1).unsqueeze(-2) - x @ yt.transpose(1, 2)).clamp_min(0)
        else:
            dist = torch.cdist(x, yt, compute_mode="donot_use_mm_for_euclid_dist")
            c = dist if p == 1 else dist.pow(p) / p
        plan = torch.softmax(rows - c / eps, dim=-2) * logb[:, c0:c0 + tile].exp().unsqueeze(-2)
        cost_total += (plan * c).sum((-1, -2))
        if p == 2:
            w = w_far = plan
        else:
            # grad_x c = |x - y|^(p-2) (x - y); 0 where x = y (a subgradient for p < 2)
            w = torch.where(dist > 0, plan * dist.pow(p - 2), torch.zeros_like(plan))
            near = (dist < NEAR * (xn + yt.norm(dim=-1).unsqueeze(-2))) & (w != 0)
            w_far = w.masked_fill(near, 0)
        gx += w_far.sum(-1, keepdim=True) * x - w_far @ yt
        gy[:, c0:c0 + tile] = w_far.sum(-2).unsqueeze(-1) * yt - w_far.transpose(1, 2) @ x
        if p != 2:
            for pairs in near.nonzero().split(max(1, NEAR_CHUNK // max(d, 1))):
                bi, i, j = pairs.unbind(1)
                term = w[bi, i, j].unsqueeze(-1) * (x[bi, i] - yt[bi, j])
                gx.index_put_((bi, i), term, accumulate=True)
                gy.index_put_((bi, j + c0), -term, accumulate=True)
    return cost_total, gx, gy


@torch.library.custom_op("kdops::sinkhorn_plan_pass", mutates_args=())
def sinkhorn_plan_pass(x: torch.Tensor, y: torch.Tensor, loga: torch.Tensor, logb: torch.Tensor, f: torch.Tensor,
                       eps: float, p: float, tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """<P, C> and the P-weighted cost gradients of the plan given by the potentials (see _plan_pass)."""
    return _plan_pass(x, y, loga, logb, f, eps, p, tile)


@sinkhorn_plan_pass.register_fake
def _(x, y, loga, logb, f, eps, p, tile):
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
            value, gx, gy = torch.ops.kdops.sinkhorn_plan_pass(x, y, loga, logb, f, eps, p, ONLINE_TILE)
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
                _, gx, gy = torch.ops.kdops.sinkhorn_plan_pass(x, y, loga, logb, f, eps, p, ONLINE_TILE)
            ga, gb = f, g
        g3 = grad.view(-1, 1, 1)
        return (gx * g3 if gx is not None else None, gy * g3 if gy is not None else None,
                ga * grad.view(-1, 1) if ga is not None and ctx.needs_input_grad[2] else None,
                gb * grad.view(-1, 1) if gb is not None and ctx.needs_input_grad[3] else None, None)
