"""Sinkhorn (kdops.functional.sinkhorn): values and gradients against POT in float64, the envelope gradient
against autograd through the reference iterations, debiasing, the eps -> 0 limit, backends, batching,
extremes, opcheck, compile and bad inputs.

Tolerances: float64 runs to convergence (tol 1e-12) and matches POT to 1e-9 relative. fp32 runs match the
float64 result to 1e-4 relative on clouds of unit scale: the Gram identity |x-y|^2 = |x|^2 + |y|^2 - 2<x,y>
loses about log10(|x|^2 / |x-y|^2) digits of fp32's 7, and the log-sum-exp another one.
"""

import math

import ot
import pytest
import torch

from conftest import DEVICES
from kdops import functional as F
from kdops import reference as R

BACKENDS = ["tensorized", "online"]
TIGHT = dict(max_iter=5000, tol=1e-12)


def clouds(n, m, d, device, dtype=torch.float64, shift=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64) * 1.3 + shift
    return x.to(device, dtype), y.to(device, dtype)


def weights(n, device, seed):
    w = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1
    return (w / w.sum()).to(device)


def pot_transport(x, y, a, b, eps, p=2):
    """POT's sinkhorn2 (log domain) on cost |x - y|^p / p, and the gradients of <P, C> with POT's plan P held
    fixed (POT's own torch gradient differentiates through its iterations, i.e. also through P)."""
    x, y, a, b = (t.detach().cpu() for t in (x, y, a, b))
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    cost = torch.cdist(xs, ys).pow(p) / p if p != 2 else 0.5 * ((xs[:, None] - ys[None]) ** 2).sum(-1)
    kw = dict(method="sinkhorn_log", numItermax=20000, stopThr=1e-13)
    v = ot.sinkhorn2(a, b, cost.detach(), eps, **kw)
    plan = ot.sinkhorn(a, b, cost.detach(), eps, **kw)
    gx, gy = torch.autograd.grad((plan * cost).sum(), (xs, ys))
    return v, gx, gy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, m, uniform", [(37, 29, True), (20, 45, False), (1, 6, True)])
def test_transport_value_and_gradients_match_pot(device, backend, n, m, uniform):
    x, y = clouds(n, m, 5, device)
    a = torch.full((n,), 1.0 / n, dtype=torch.float64, device=device) if uniform else weights(n, device, 1)
    b = torch.full((m,), 1.0 / m, dtype=torch.float64, device=device) if uniform else weights(m, device, 2)
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    ours = F.sinkhorn(xs, ys, None if uniform else a, None if uniform else b, eps=0.2, value="transport",
                      backend=backend, **TIGHT)
    gx, gy = torch.autograd.grad(ours, (xs, ys))
    ref, rgx, rgy = pot_transport(x, y, a, b, 0.2)
    torch.testing.assert_close(ours.cpu(), ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gx.cpu(), rgx, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(gy.cpu(), rgy, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [1, 1.5])
def test_other_powers_match_pot(device, p):
    x, y = clouds(15, 11, 3, device)
    a, b = torch.full((15,), 1 / 15, dtype=torch.float64), torch.full((11,), 1 / 11, dtype=torch.float64)
    xs = x.clone().requires_grad_()
    ours = F.sinkhorn(xs, y, eps=0.3, p=p, value="transport", **TIGHT)
    ref, rgx, _ = pot_transport(x, y, a, b, 0.3, p=p)
    torch.testing.assert_close(ours.cpu(), ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, xs)[0].cpu(), rgx, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_entropic_value_and_envelope_gradients_match_unrolled_reference(device):
    # At convergence the envelope gradient (f for a, sum_j P_ij grad c for x) equals autograd through the
    # iterations of the reference.
    x, y = clouds(12, 9, 4, device)
    a, b = weights(12, device, 3), weights(9, device, 4)
    args = [t.clone().requires_grad_() for t in (x, y, a, b)]
    ours = F.sinkhorn(*args, eps=0.5, **TIGHT)
    ref_args = [t.clone().requires_grad_() for t in (x, y, a, b)]
    ref = R.sinkhorn(*ref_args, eps=0.5, max_iter=400)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    for what, g1, g2 in zip("xyab", torch.autograd.grad(ours, args), torch.autograd.grad(ref, ref_args)):
        if what in "ab":
            # weights live on the simplex: gradients are equal up to a constant (here the reference's
            # <a, f> + <b, g> drops the dual's mass term, which shifts them by eps)
            g1, g2 = g1 - g1.mean(), g2 - g2.mean()
        torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-9, msg=lambda m: "grad %s: %s" % (what, m))


def test_gradcheck_float64():
    x, y = clouds(5, 4, 2, "cpu")
    a, b = weights(5, "cpu", 5), weights(4, "cpu", 6)
    # the entropic value's envelope gradient is its true derivative (the transport value's gradient holds the
    # plan fixed by design, so it is checked against POT's plan above instead)
    fn = lambda x_, y_: F.sinkhorn(x_, y_, a, b, eps=0.7, **TIGHT)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), y.requires_grad_()), eps=1e-6, atol=1e-6)
    fn = lambda a_, b_: F.sinkhorn(x.detach(), y.detach(), a_ / a_.sum(), b_ / b_.sum(), eps=0.7, **TIGHT)  # noqa
    assert torch.autograd.gradcheck(fn, (a.clone().requires_grad_(), b.clone().requires_grad_()), eps=1e-6,
                                    atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_debiased_divergence(device):
    x, y = clouds(30, 25, 6, device)
    assert F.sinkhorn(x, x.clone(), eps=0.1, debias=True, **TIGHT).item() == pytest.approx(0.0, abs=1e-12)
    for shift in (0.0, 0.3, 2.0):
        x2, y2 = clouds(30, 25, 6, device, shift=shift, seed=7)
        assert F.sinkhorn(x2, y2, eps=0.1, debias=True, **TIGHT).item() > 0
    # the divergence grows with the shift between the clouds
    vals = [F.sinkhorn(*clouds(30, 25, 6, device, shift=s, seed=7), eps=0.1, debias=True, **TIGHT).item()
            for s in (0.0, 1.0, 3.0)]
    assert vals[0] < vals[1] < vals[2]


@pytest.mark.parametrize("device", DEVICES)
def test_small_eps_approaches_exact_ot(device):
    x, y = clouds(20, 20, 3, device)
    cost = 0.5 * torch.cdist(x, y).pow(2)
    exact = ot.emd2(torch.full((20,), 0.05, dtype=torch.float64), torch.full((20,), 0.05, dtype=torch.float64),
                    cost.cpu())
    gaps = [abs(F.sinkhorn(x, y, eps=e, value="transport", scaling=0.7, max_iter=20000, tol=1e-12).item()
                - exact.item()) for e in (0.3, 0.03, 0.003)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3 * exact.item()


@pytest.mark.parametrize("device", DEVICES)
def test_backends_agree_fp32_and_scaling(device):
    x, y = clouds(300, 270, 16, device, dtype=torch.float32)
    vals = {}
    for backend in BACKENDS:
        xs = x.clone().requires_grad_()
        v = F.sinkhorn(xs, y, eps=0.05, backend=backend, max_iter=300)
        vals[backend] = (v, torch.autograd.grad(v, xs)[0])
    torch.testing.assert_close(*vals.values(), rtol=1e-5, atol=1e-7)
    ref = F.sinkhorn(x.double(), y.double(), eps=0.05, max_iter=300)
    torch.testing.assert_close(vals["online"][0].double(), ref, rtol=1e-4, atol=0)
    # eps-scaling converges to the same optimum
    torch.testing.assert_close(F.sinkhorn(x.double(), y.double(), eps=0.05, scaling=0.8, **TIGHT),
                               F.sinkhorn(x.double(), y.double(), eps=0.05, **TIGHT), rtol=1e-9, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_equals_loop(device):
    xs = torch.stack([clouds(17, 13, 4, device, seed=s)[0] for s in range(3)])
    ys = torch.stack([clouds(17, 13, 4, device, seed=s)[1] for s in range(3)])
    xs.requires_grad_()
    out = F.sinkhorn(xs, ys, eps=0.2, **TIGHT)
    assert out.shape == (3,)
    g = torch.autograd.grad(out.sum(), xs)[0]
    for i in range(3):
        xi = xs[i].detach().clone().requires_grad_()
        vi = F.sinkhorn(xi, ys[i], eps=0.2, **TIGHT)
        torch.testing.assert_close(out[i], vi, rtol=1e-12, atol=0)
        torch.testing.assert_close(g[i], torch.autograd.grad(vi, xi)[0], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_eps_large_features_stay_finite(device):
    x, y = clouds(64, 48, 8, device, dtype=torch.float32)
    x = (x / x.norm(dim=1, keepdim=True) * 100).requires_grad_()
    for backend in BACKENDS:
        v = F.sinkhorn(x, y * 100, eps=1e-3, backend=backend, value="transport")
        g = torch.autograd.grad(v, x)[0]
        assert torch.isfinite(v) and torch.isfinite(g).all() and v.item() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_far_apart_single_points_give_their_cost(device, backend):
    # one point each: the plan is 1 and the transport value is the cost |x - y|^2 / 2 (about 6e7 here, so
    # c / eps ~ 1e9 and the rounding of f + g - c, divided by eps, once overflowed the plan's exponential)
    x = (torch.randn(1, 16, generator=torch.Generator().manual_seed(261)) * 1e3).to(device).requires_grad_()
    y = (torch.randn(1, 16, generator=torch.Generator().manual_seed(163)) * 3e3).to(device)
    v = F.sinkhorn(x, y, value="transport", backend=backend)
    gx = torch.autograd.grad(v, x)[0]
    exact = 0.5 * (x.detach().double() - y.double()).square().sum()
    torch.testing.assert_close(v.double(), exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(gx, (x - y).detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [1, 1.5])
def test_p_below_2_at_nearly_coincident_points(device, backend, p):
    # |x - y| = 1e-4 next to |x| = 1: the Gram identity leaves no digit of that distance in fp32 (it gave the
    # pair a distance 0 and no gradient); the direct distance keeps it, and its gradient terms are summed
    # from the differences
    x = torch.tensor([[1.0001, 0.5], [0.3, -2.0]], device=device, requires_grad=True)
    y = torch.tensor([[1.0, 0.5], [0.0, 0.0], [0.3, -2.0]], device=device)
    x64, y64 = x.detach().double().cpu(), y.double().cpu()
    # both values' gradient for x holds the last iterate's plan fixed: sum_j P_ij grad c, here from the fp64
    # plan of the reference's loop (3 iterations, eps = 1, uniform weights)
    c = torch.cdist(x64, y64).pow(p) / p
    f, g = torch.zeros(2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for _ in range(3):
        f = -torch.logsumexp(math.log(1 / 3) + g[None] - c, dim=1)
        g = -torch.logsumexp(math.log(1 / 2) + f[:, None] - c, dim=0)
    plan = torch.exp(f[:, None] + g[None] - c) / 6
    diff = x64[:, None] - y64[None]
    dist = diff.norm(dim=-1, keepdim=True)
    expect = (plan[..., None] * torch.where(dist > 0, diff * dist.pow(p - 2), torch.zeros_like(diff))).sum(1)
    for value in ("entropic", "transport"):
        v = F.sinkhorn(x, y, eps=1.0, p=p, max_iter=3, tol=0, value=value, backend=backend)
        gx = torch.autograd.grad(v, x)[0]
        ref = R.sinkhorn(x64, y64, eps=1.0, p=p, max_iter=3, value=value)
        torch.testing.assert_close(v.double().cpu(), ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(gx.double().cpu(), expect, rtol=1e-5, atol=1e-7)


def test_potentials_and_module_and_class_conditional():
    x, y = clouds(10, 8, 3, "cpu")
    v, f, g = F.sinkhorn(x, y, eps=0.4, return_potentials=True, **TIGHT)
    assert f.shape == (10,) and g.shape == (8,)
    torch.testing.assert_close(v, f.mean() + g.mean(), rtol=1e-12, atol=0)
    import kdops.nn as knn
    torch.testing.assert_close(knn.SinkhornLoss(eps=0.4, **TIGHT)(x, y), v, rtol=0, atol=0)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    xx, yy = clouds(8, 8, 3, "cpu", seed=3)
    total = F.class_conditional_wasserstein(xx, yy, labels, metric="sinkhorn", eps=0.3, **TIGHT)
    manual = sum(F.sinkhorn(xx[labels == c], yy[labels == c], eps=0.3, **TIGHT) for c in range(3))
    torch.testing.assert_close(total, manual, rtol=1e-12, atol=0)


def test_opcheck_and_compile():
    x, y = clouds(9, 7, 3, "cpu", dtype=torch.float32)
    loga = torch.full((1, 9), 1 / 9).log()
    logb = torch.full((1, 7), 1 / 7).log()
    for online in (False, True):
        torch.library.opcheck(torch.ops.kdops.sinkhorn_solve,
                              (x[None], y[None], loga, logb, 0.1, 2.0, 50, 1e-6, 0.0, 10, online, 4))
    f = torch.zeros(1, 9)
    y[:2] = x[:2]  # coincident pairs: the p != 2 pass sums their gradient terms from the differences
    for p in (2.0, 1.0, 1.5):
        torch.library.opcheck(torch.ops.kdops.sinkhorn_plan_pass, (x[None], y[None], loga, logb, f, 0.1, p, 4))
    for p in (2, 1):
        fn = lambda a, b: F.sinkhorn(a, b, eps=0.1, p=p, value="transport")  # noqa: E731
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x, y), fn(x, y), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(y=torch.randn(5, 4)), "same feature dim"),
    (dict(a=torch.tensor([0.5, 0.7, -0.2])), "negative"),
    (dict(a=torch.tensor([0.5, 0.2, 0.2])), "sum to 1"),
    (dict(a=torch.tensor([0.5, 0.5])), "shape"),
    (dict(eps=0.0), "eps"),
    (dict(eps=-1.0), "eps"),
    (dict(x=torch.randn(0, 3)), "empty"),
    (dict(p=0.5), "p must"),
    (dict(max_iter=0), "max_iter"),
    (dict(scaling=1.5), "scaling"),
    (dict(value="dual"), "value"),
    (dict(backend="keops"), "backend"),
    (dict(x=torch.randn(2, 3, 3)), "both batched"),
])
def test_bad_inputs(kwargs, message):
    args = dict(x=torch.randn(3, 3), y=torch.randn(4, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        F.sinkhorn(**args)
