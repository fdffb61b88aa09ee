"""Fuzzed parity of kdops.functional.sinkhorn with kdops.reference.sinkhorn (the textbook log-domain loop,
differentiated by autograd): random cloud sizes (one or two points, d = 1, odd sizes), batched clouds, every
dtype and mixed dtypes, non-contiguous and expanded inputs, duplicate points, zero-variance columns and points
shared by the two clouds, scales 1e-3 and 1e3, uniform, random and skewed weights, eps from 1e-6 to 1e3 times
the largest cost, p = 1, 1.5, 2, 3, both values, debiasing, eps-scaling, every backend, and a non-uniform
grad_output. See fuzz_support.py.

Where the reference's fixed 50 iterations converge (eps >= 0.1 max C and the measured rate says so, see
convergence_rate) kdops runs to its tol (and with eps-scaling, if drawn), and the entropic value's gradient is
the reference's autograd through its loop (at convergence the envelope gradient kdops computes). Elsewhere both
run the same iterations from the same start (tol = 0, no eps-scaling, which changes the iterates): the values are
the same function of the inputs, and the gradients kdops defines (the last iterate's plan, or for the entropic
value its potentials, held fixed) are compared with those of the reference's own last iterate. The transport
value's gradient holds the plan fixed by definition: it is always compared that way. Where eps is so small next
to the costs that no digit of the plan survives in the compute dtype, only the entropic value is compared."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzz_support import F32, F64, FUZZ, Call, check, compute_dtype, dtype_pair, tensor
from kdops import functional as F
from kdops import reference as R
from test_fuzz_distribution import SCALES, assert_finite_grads, cloud_values, fit_grad_scale, mass, share_points

# eps as a multiple of the largest cost (or the default absolute 0.05, whatever the clouds' scale)
EPS = {"moderate": ["0.1", "0.5", "3"], "huge": ["1e3"], "tiny": ["1e-3", "1e-6", "abs 0.05"]}
CONVERGED_ITERS = 50  # the reference's iterations where both converge (see convergence_rate)


def costs(x, y, p):
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").pow(p) / p


def reference_loop(x, y, a, b, eps, p, max_iter):
    """The reference's loop (R.sinkhorn's, line for line) without gradient: yields (f, g, log a, log b, C)
    after each iteration."""
    with torch.no_grad():
        n, m = x.shape[0], y.shape[0]
        a = torch.full((n,), 1.0 / n, dtype=x.dtype) if a is None else a
        b = torch.full((m,), 1.0 / m, dtype=x.dtype) if b is None else b
        c = costs(x, y, p)
        loga, logb = a.log(), b.log()
        f, g = torch.zeros_like(a), torch.zeros_like(b)
        for _ in range(max_iter):
            f = -eps * torch.logsumexp(logb[None, :] + (g[None, :] - c) / eps, dim=1)
            g = -eps * torch.logsumexp(loga[:, None] + (f[:, None] - c) / eps, dim=0)
            yield f, g, loga, logb, c


def reference_iterate(x, y, a, b, eps, p, max_iter):
    """The potentials and the plan of the reference's loop after max_iter iterations: what kdops' backward
    holds fixed."""
    for f, g, loga, logb, c in reference_loop(x, y, a, b, eps, p, max_iter):
        pass
    with torch.no_grad():
        plan = torch.exp(loga[:, None] + logb[None, :] + (f[:, None] + g[None, :] - c) / eps)
    return f, g, plan


def convergence_rate(problems, eps, p, bound):
    """Whether the reference's loop converges within CONVERGED_ITERS iterations on every problem (float64
    clouds and weights, None: uniform): its last change of f, times rate / (1 - rate) with the rate measured
    over the last iterations, below 1e-13 of the cost bound. Returns the worst rate (None if not)."""
    worst = 0.0
    for x, y, a, b in problems:
        if x.dim() == 3:
            rates = [convergence_rate([(xi, yi, a, b)], eps, p, bound) for xi, yi in zip(x, y)]
            if None in rates:
                return None
            worst = max([worst] + rates)
            continue
        a = None if a is None else a / a.sum()
        b = None if b is None else b / b.sum()
        fs = [f for f, *_ in reference_loop(x, y, a, b, eps, p, CONVERGED_ITERS)][-3:]
        if len(fs) < 3:
            return None
        f1, f2, f3 = fs
        last, before = (f3 - f2).abs().max().item(), (f2 - f1).abs().max().item()
        rate = min(last / before, 0.999) if before > 0 else 0.0
        if last * rate / (1 - rate) + last > 1e-13 * bound:
            return None
        worst = max(worst, rate)
    return worst


def cost_bound(x, y, p):
    """(max|x| + max|y|)^p / p, an upper bound of every cost of the problems (x-y, x-x, y-y)."""
    r = x.norm(dim=-1).max().item() + y.norm(dim=-1).max().item()
    return max(r, 2 * x.norm(dim=-1).max().item(), 2 * y.norm(dim=-1).max().item()) ** p / p


def reference_ot(x, y, a, b, eps, p, max_iter, value, through_loop):
    """R.sinkhorn's value. Its gradient: autograd through the loop (`through_loop`), or kdops' definition at the
    reference's last iterate: sum_j P_ij grad c for the clouds, and for the entropic value f and g for the
    weights; the transport value gives the weights none (its plan is held fixed)."""
    out = R.sinkhorn(x, y, a, b, eps=eps, p=p, max_iter=max_iter, value=value)
    if through_loop:
        return out
    f, g, plan = reference_iterate(x, y, a, b, eps, p, max_iter)
    surrogate = (plan * costs(x, y, p)).sum()
    if value == "entropic":
        surrogate = surrogate + sum((w * pot).sum() for w, pot in ((a, f), (b, g)) if w is not None)
    return out.detach() + (surrogate - surrogate.detach())


def reference_sinkhorn(x, y, a=None, b=None, eps=0.05, p=2, max_iter=100, value="entropic", debias=False,
                       through_loop=True):
    """The reference on (n, d) or batched (B, n, d) clouds (a loop over the batch), debiased as kdops defines
    it: OT(x, y) - OT(x, x) / 2 - OT(y, y) / 2."""
    if x.dim() == 3:
        return torch.stack([reference_sinkhorn(xi, yi, a, b, eps, p, max_iter, value, debias, through_loop)
                            for xi, yi in zip(x, y)])
    ot = lambda u, v, wu, wv: reference_ot(u, v, wu, wv, eps, p, max_iter, value, through_loop)  # noqa: E731
    out = ot(x, y, a, b)
    if debias:
        out = out - 0.5 * ot(x, x, a, a) - 0.5 * ot(y, y, b, b)
    return out


def draw_weights(data, npts, label):
    """None (uniform) or positive float64 values (random or skewed over orders of magnitude), normalised by the
    caller."""
    kind = data.draw(st.sampled_from(["uniform", "uniform", "random", "skewed"]), label="%s weights" % label)
    if kind == "uniform":
        return None
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000), label="%s weights seed" % label))
    return torch.rand(npts, generator=g, dtype=F64) + 0.1 if kind == "random" else \
        torch.exp(3 * torch.randn(npts, generator=g, dtype=F64))


@pytest.mark.parametrize("eps_range", list(EPS))
@pytest.mark.parametrize("value", ["entropic", "transport"])
@FUZZ
@given(data=st.data())
def test_sinkhorn_matches_reference(value, eps_range, data):
    debias = data.draw(st.sampled_from([False, False, True]), label="debias")
    batch = data.draw(st.sampled_from([None, None, None, 2]), label="batch")
    n = data.draw(st.sampled_from([1, 2, 3, 7, 33, 100]), label="n")
    m = data.draw(st.sampled_from([1, 2, 5, 31, 64]), label="m")
    d = data.draw(st.sampled_from([1, 2, 5, 16]), label="d")
    p = data.draw(st.sampled_from([2, 2, 1, 1.5, 3]), label="p")
    scale = data.draw(st.sampled_from(SCALES), label="scale")
    ratio = data.draw(st.sampled_from([1.0, 0.5, 3.0]), label="teacher scale ratio")
    dx, dy = dtype_pair(data)
    lead = () if batch is None else (batch,)
    xvals = cloud_values(data, (*lead, n, d), scale, "x")
    yvals = share_points(data, xvals, cloud_values(data, (*lead, m, d), scale * ratio, "y"))
    x, xv = tensor(data, (*lead, n, d), dx, label="x", values=xvals)
    y, yv = tensor(data, (*lead, m, d), dy, label="y", values=yvals)
    x64, y64 = xv(x.detach()).double(), yv(y.detach()).double()

    wa, wb = draw_weights(data, n, "a"), draw_weights(data, m, "b")
    # eps relative to the largest cost of the problems solved (with debiasing, x-x and y-y too)
    problems = [(x64, y64, wa, wb)] + ([(x64, x64, wa, wa), (y64, y64, wb, wb)] if debias else [])
    cmax = max(costs(u, v, p).max().item() for u, v, _, _ in problems) or 1.0
    mode = data.draw(st.sampled_from(EPS[eps_range]), label="eps / max cost")
    eps = 0.05 if mode == "abs 0.05" else float(mode) * cmax
    rate = None
    if eps >= 0.1 * cmax:
        rate = convergence_rate(problems, eps, p, cost_bound(x64, y64, p))
    converged = rate is not None
    kwargs = {"eps": eps, "p": p, "value": value, "debias": debias}
    ours_kwargs = {"backend": data.draw(st.sampled_from(["auto", "tensorized", "online"]), label="backend")}
    if converged:
        kwargs["max_iter"] = CONVERGED_ITERS
        # kdops: enough iterations for eps-scaling's annealing steps too, stopping once f moves by less than
        # tol over one iteration: it is then within tol * rate / (1 - rate) of its limit, so tol is scaled by
        # (1 - rate) to stay within tol / eps of it in the plan exp((f + g - C) / eps)
        ours_kwargs["max_iter"] = 1000
        ours_kwargs["tol"] = data.draw(st.sampled_from([0.0, 1e-9, 1e-6]), label="tol") * min(eps, cmax) * (1 - rate)
        ours_kwargs["scaling"] = data.draw(st.sampled_from([None, 0.5, 0.9]), label="scaling")
    else:
        kwargs["max_iter"] = data.draw(st.sampled_from([1, 3, 20, CONVERGED_ITERS]), label="max_iter")
        ours_kwargs["tol"] = 0.0  # the same iterations as the reference

    # For p = 2 kdops computes the costs from the Gram identity |x - y|^2 / 2 = |x|^2 / 2 + |y|^2 / 2 - <x, y>,
    # terms of size Z^2 = max(|x|^2, |y|^2): their rounding is eps_c Z^2 (the reference and kdops for other p
    # take the distances from the differences). The dual value sums a_i f_i + b_j g_j, f_i = -eps
    # LSE_j(log b_j + (g_j - C_ij) / eps): terms of the size of the costs and of eps log(n m), whose rounding
    # bounds the error where the value cancels (debiasing, nearly coincident clouds).
    dmax = (p * cmax) ** (1.0 / p)
    z2 = max(x64.square().sum(-1).max().item(), y64.square().sum(-1).max().item())
    cost_scale = max(cmax, z2) if p == 2 else cmax
    floor = cost_scale + eps * math.log(n * m + 1)
    # a cloud's gradient entry is sum_j P_ij |x_i - y_j|^(p - 2) (x_i - y_j), P's rows summing to a_i (its
    # columns to b_j): terms of size max(a, b) D^(p - 1), which cancel where a point sits at its image's
    # barycentre
    gs = data.draw(st.sampled_from([1.0, -3.7, 1e-3]), label="grad scale")
    amax = 1.0 / n if wa is None else (wa / wa.sum()).max().item()
    bmax = 1.0 / m if wb is None else (wb / wb.sum()).max().item()
    # (an expanded leaf's entry sums the rows, or batch problems, it stands for: mass())
    unit = max(mass(xv, x, 1) * amax, mass(yv, y, 1) * bmax) * dmax ** (p - 1)

    # Weights: leaves for the entropic value, normalised in make (a = w / sum w), so that their gradient,
    # (f - <a, f>) / sum w, is the one tangent to the simplex, free of the constant by which the potentials (and
    # so the two definitions' gradients) may differ. That gradient cancels the potentials' common part, terms
    # of the value floor's size (f's rounding is eps_c times it), and the leaves' masses sum w = floor / unit
    # make those terms `unit`-sized, the clouds' gradient terms: one grad_floor serves all leaves. Constants
    # for the transport value, which gives the weights no gradient, and for a single point, whose weight is 1
    # with no tangent direction (its gradient would be f_1 (1 - 1) / w: only rounding).
    acc = F64 if F64 in (dx, dy) else F32
    leaves, views = [x, y], [xv, yv]
    consts = {}
    for name, w in (("a", wa), ("b", wb)):
        if w is None:
            continue
        if value == "entropic" and w.numel() > 1:
            leaves.append((w / w.sum() * (floor / unit)).to(acc).requires_grad_())
            views.append(lambda t: t / t.sum())
        else:
            consts[name] = w / w.sum()

    def make(ls, views=views, consts=consts, names=[k for k, w in (("a", wa), ("b", wb)) if w is not None]):
        args = [v(t) for v, t in zip(views, ls)]
        out = {"x": args[0], "y": args[1]}
        wdtype = F64 if any(t.dtype == F64 for t in ls) else F32
        rest = iter(args[2:])
        for k in names:
            out[k] = next(rest) if k not in consts else consts[k].to(wdtype)
        return [out["x"], out["y"], out.get("a"), out.get("b")]

    call = Call(leaves, make, kwargs, ours_kwargs, grad_scale=gs, value_floor=floor, grad_floor=abs(gs) * unit)
    c = compute_dtype(call)
    # kdops stops at tol where the reference runs its fixed iterations (test_dtypes.ILL_CONDITIONED)
    floor_eps = max(torch.finfo(c).eps, 1e-6)
    through_loop = converged and value == "entropic"
    ref = lambda *a, **k: reference_sinkhorn(*a, through_loop=through_loop, **k)  # noqa: E731
    fit_grad_scale(call, ref)
    # the plan exp((f + g - C) / eps) carries the cost's rounding (eps_acc cost_scale, in the fp32 / fp64 the
    # costs are computed in) divided by eps: that is its relative error, and so that of the transport value
    # and of every gradient. The entropic value (first order in C) is checked on its own with the plain floor
    # first.
    kappa_u = torch.finfo(acc).eps * cost_scale / eps
    if value == "entropic" and kappa_u > floor_eps:
        check("sinkhorn", F.sinkhorn, ref, call, floor_eps=floor_eps, compare_grads=False)
    if kappa_u >= 0.1:
        # past that no digit of the plan survives in the compute dtype (its entries are off by factors
        # exp(+-kappa_u), the reference's as much as kdops'): nothing plan-based is comparable, and kdops'
        # transport value and gradients are only required to be finite
        assert_finite_grads("sinkhorn", F.sinkhorn, call)
        return
    check("sinkhorn", F.sinkhorn, ref, call, floor_eps=max(floor_eps, kappa_u))
