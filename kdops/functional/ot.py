"""Entropic optimal transport between point clouds: log-domain Sinkhorn as one fused op (``kdops::sinkhorn_solve``
runs every iteration in one call), with gradients from the final dual potentials (envelope theorem), never by
backpropagating through the iterations.
"""

import numbers

import torch

from kdops._ops.ot import Sinkhorn
from kdops.functional import _dtypes
from kdops.functional._checks import check_number

VALUES = ("entropic", "transport")
BACKENDS = ("auto", "tensorized", "online")
# auto: tensorized while the two n x m Gram copies stay under this many elements per problem (64 MiB in fp32
# each), online above.
AUTO_ONLINE_ABOVE = 1 << 24


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


def _ot(x, y, a, b, opts):
    value, f, g, _ = Sinkhorn.apply(x, y, a, b, opts)
    return value, f, g


@_dtypes.loss
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
    changes by less than tol over one iteration, checked every 10 iterations (one host sync per check); the
    eps-scaling bound is read on the host too (two syncs per problem). With ``tol=0`` and no ``scaling`` the op
    never syncs (it runs ``max_iter`` iterations), which CUDA graph capture needs.

    backend: "tensorized" forms the cost matrix (and its transpose) once; "online" recomputes it in tiles of
    256 rows each iteration and never stores an n x m matrix (memory O(256 (n + m) + (n + m) d)); "auto" picks
    tensorized while n * m <= 2^24, online above. For p = 2 the cost comes from the Gram matrix x y^T (one GEMM;
    |x - y|^2 / 2 is then accurate to the rounding of |x|^2 / 2 and |y|^2 / 2); for any other p from the direct
    distances, since the Gram identity leaves no digit of |x - y| where points nearly coincide (and p < 2 makes
    the gradient |x - y|^(p - 2) (x - y) depend on them): slower per iteration, and for p != 2 the backward
    sums the gradient terms of such nearly coincident pairs from their differences, which reads their count on
    the host (one sync per tile of 256 columns).

    The plan is formed column by column as P_ij = b_j softmax_i(log a_i + (f_i - c_ij) / eps) (equal to
    a_i b_j exp((f_i + g_j - c_ij) / eps) for the g of the last update), so that it stays finite where c / eps
    dwarfs the digits of the potentials (far-apart clouds in fp32). Inputs are computed in fp32 (fp64 when x or y is
fp64; dtypes may differ, and autocast does not change the result: :mod:`kdops.functional._dtypes`);
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
    check_number("sinkhorn", "eps", eps, positive=True)
    check_number("sinkhorn", "p", p, low=1)
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError("sinkhorn: max_iter must be an int >= 1, got %r" % (max_iter,))
    check_number("sinkhorn", "tol", tol, low=0)
    if scaling is not None and (isinstance(scaling, bool) or not isinstance(scaling, numbers.Real)
                                or not 0 < scaling < 1):
        raise ValueError("sinkhorn: scaling must be None or in (0, 1), got %r" % (scaling,))
    if value not in VALUES:
        raise ValueError("sinkhorn: value must be one of %s, got %r" % (VALUES, value))
    if backend not in BACKENDS:
        raise ValueError("sinkhorn: backend must be one of %s, got %r" % (BACKENDS, backend))
    batched = x.dim() == 3
    acc = _dtypes.acc_of(x, y)
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
