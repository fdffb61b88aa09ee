"""Entropic optimal transport between point clouds: log-domain Sinkhorn as one fused op (``kdops::sinkhorn_solve``
runs every iteration in one call), with gradients from the final dual potentials (envelope theorem), never by
backpropagating through the iterations.
"""

import math
import numbers

import torch

VALUES = ("entropic", "transport")
BACKENDS = ("auto", "tensorized", "online")
# auto: tensorized while the two n x m Gram copies stay under this many elements per problem (64 MiB in fp32
# each), online above.
AUTO_ONLINE_ABOVE = 1 << 24
ONLINE_TILE = 256
CHECK_EVERY = 10


def _check_number(arg, value, positive=False, low=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or (positive and not value > 0) or (low is not None and value < low):
        what = "> 0" if positive else (">= %s" % low if low is not None else "finite")
        raise ValueError("sinkhorn: %s must be a finite number %s, got %r" % (arg, what, value))


def _check_cloud(arg, t):
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError("sinkhorn: %s must be a floating-point tensor, got %s" % (arg, getattr(t, "dtype", type(t))))
    if t.dim() not in (2, 3):
        raise ValueError("sinkhorn: %s must be (n, d) or batched (B, n, d), got shape %s" % (arg, tuple(t.shape)))
    if t.shape[-2] == 0:
        raise ValueError("sinkhorn: %s is an empty cloud (shape %s); at least one point is needed"
                         % (arg, tuple(t.shape)))


def _weights(arg, w, like, npts):
    """Validated weights (B, npts) in like's dtype; uniform when w is None."""
    B = like.shape[0]
    if w is None:
        return torch.full((B, npts), 1.0 / npts, dtype=like.dtype, device=like.device), False
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ValueError("sinkhorn: %s must be a floating-point tensor of weights" % arg)
    w2 = w if w.dim() == 2 else w.unsqueeze(0)
    if w2.shape != (B, npts) and w2.shape != (1, npts):
        raise ValueError("sinkhorn: %s must have shape (%d,)%s to match its cloud, got %s"
                         % (arg, npts, " or (%d, %d)" % (B, npts) if B > 1 else "", tuple(w.shape)))
    if w.device != like.device:
        raise ValueError("sinkhorn: %s must be on %s, got %s" % (arg, like.device, w.device))
    wd = w2.detach()
    if bool((wd < 0).any()):
        raise ValueError("sinkhorn: %s has negative weights; weights must be >= 0 and sum to 1" % arg)
    sums = wd.double().sum(-1)
    if not bool(torch.allclose(sums, torch.ones_like(sums), rtol=0, atol=1e-5)):
        raise ValueError("sinkhorn: the weights %s must sum to 1 (per problem), got sums %s"
                         % (arg, [round(v, 6) for v in sums.tolist()]))
    return w2.to(like.dtype).expand(B, npts), True


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


class _Sinkhorn(torch.autograd.Function):
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


def _ot(x, y, a, b, opts):
    value, f, g, _ = _Sinkhorn.apply(x, y, a, b, opts)
    return value, f, g


def sinkhorn(x, y, a=None, b=None, eps=0.05, p=2, max_iter=100, tol=1e-6, scaling=None, debias=False,
             value="entropic", backend="auto", return_potentials=False):
    """Entropic optimal transport between clouds x (n, d) and y (m, d), or batched (B, n, d), (B, m, d).

    Cost c(x, y) = |x - y|^p / p; ``eps`` is absolute, in the cost's units. Weights ``a`` (n,) / ``b`` (m,)
    (or (B, n) / (B, m)) must be >= 0 and sum to 1; uniform when omitted.

    value="entropic" (default) returns OT_eps = min_P <P, C> + eps KL(P || a x b) through its dual value
    <a, f> + <b, g> (GeomLoss' convention); its gradient is the envelope theorem's: sum_j P_ij grad_x c for x,
    f for a, g for b (the potentials are defined up to a constant shift, the gradient for weights summing to 1
    is meaningful up to that constant). value="transport" returns <P_eps, C>, the transport cost of the entropic
    plan (POT's ``sinkhorn2``); its gradient holds the plan fixed (as KD2M does with its exact plan) and gives no
    gradient to the weights. ``debias=True`` returns S_eps = OT(x, y) - OT(x, x)/2 - OT(y, y)/2 (>= 0, 0 for
    identical clouds), with the same ``value`` in each term.

    Iterations: log-domain alternating updates f <- -eps LSE_j(log b_j + (g_j - c_ij)/eps), then g likewise,
    all in one op call. ``scaling`` in (0, 1) anneals eps geometrically from the cost's upper bound
    (max|x| + max|y|)^p / p down to ``eps``; those iterations count towards ``max_iter``. ``tol`` stops when f
    changes by less than tol over one iteration, checked every 10 iterations (one host sync per check).

    backend: "tensorized" forms the Gram matrix x y^T (and its transpose) once; "online" recomputes it in
    tiles of 256 rows each iteration and never stores an n x m matrix (memory O(256 (n + m) + (n + m) d));
    "auto" picks tensorized while n * m <= 2^24, online above. Inputs are computed in fp32 (fp64 for fp64);
    the result has the batch shape: 0-dim for unbatched clouds, (B,) for batched ones. With
    ``return_potentials`` it returns (value, f, g) (potentials of the x-y problem).
    """
    _check_cloud("x", x)
    _check_cloud("y", y)
    if x.dim() != y.dim():
        raise ValueError("sinkhorn: x and y must both be (n, d) or both batched (B, n, d), got %s and %s"
                         % (tuple(x.shape), tuple(y.shape)))
    if x.shape[-1] != y.shape[-1]:
        raise ValueError("sinkhorn: x and y must have the same feature dim d, got %s and %s"
                         % (tuple(x.shape), tuple(y.shape)))
    if x.dim() == 3 and x.shape[0] != y.shape[0]:
        raise ValueError("sinkhorn: batched x and y must have the same batch size, got %d and %d"
                         % (x.shape[0], y.shape[0]))
    if x.device != y.device:
        raise ValueError("sinkhorn: x and y must be on the same device, got %s and %s" % (x.device, y.device))
    _check_number("eps", eps, positive=True)
    _check_number("p", p, low=1)
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError("sinkhorn: max_iter must be an int >= 1, got %r" % (max_iter,))
    _check_number("tol", tol, low=0)
    if scaling is not None and (isinstance(scaling, bool) or not isinstance(scaling, numbers.Real)
                                or not 0 < scaling < 1):
        raise ValueError("sinkhorn: scaling must be None or in (0, 1), got %r" % (scaling,))
    if value not in VALUES:
        raise ValueError("sinkhorn: value must be one of %s, got %r" % (VALUES, value))
    if backend not in BACKENDS:
        raise ValueError("sinkhorn: backend must be one of %s, got %r" % (BACKENDS, backend))
    batched = x.dim() == 3
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xb = (x if batched else x.unsqueeze(0)).to(acc)
    yb = (y if batched else y.unsqueeze(0)).to(acc)
    n, m = xb.shape[1], yb.shape[1]
    online = backend == "online" or (backend == "auto" and n * m > AUTO_ONLINE_ABOVE)
    a3, _ = _weights("a", a, xb, n)
    b3, _ = _weights("b", b, yb, m)
    opts = (float(eps), float(p), int(max_iter), float(tol), float(scaling or 0.0), online, value == "transport")
    out, f, g = _ot(xb, yb, a3, b3, opts)
    if debias:
        out = out - 0.5 * _ot(xb, xb, a3, a3, opts)[0] - 0.5 * _ot(yb, yb, b3, b3, opts)[0]
    if not batched:
        out, f, g = out[0], f[0], g[0]
    return (out, f, g) if return_potentials else out
