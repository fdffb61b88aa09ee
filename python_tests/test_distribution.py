"""Distribution-matching losses (KD2M's metric family): MMD (fused op) and the exact / Gaussian / class-
conditional / joint Wasserstein losses: parity with references and POT, gradients, opcheck, compile, bad inputs."""

import numpy as np
import ot
import pytest
import scipy.spatial.distance
import torch

from conftest import DEVICES
from kdops import functional as F
from kdops import nn as knn
from kdops import reference as R


def cloud(n, d, device="cpu", dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(n, d, dtype=torch.float64) * scale + shift).to(device, dtype)


def value_and_grads(fn, x, y, **kw):
    x = x.detach().requires_grad_()
    y = y.detach().requires_grad_()
    out = fn(x, y, **kw)
    gx, gy = torch.autograd.grad(out * 0.6, (x, y))
    return out.detach(), gx, gy


def assert_all_close(ours, ref, rtol, atol, names=("loss", "grad x", "grad y")):
    for what, a, b in zip(names, ours, ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=lambda m: "%s: %s" % (what, m))


# ---- MMD ----

MMD_CASES = [
    dict(kernel="linear"),
    dict(kernel="rbf"),
    dict(kernel="rbf", bandwidth=3.0),
    dict(kernel="poly"),
    dict(kernel="poly", degree=2, gamma=0.3, coef0=0.5),
    # degrees 1-4 are compiled as constants, 5-7 and 8+ read at run time (kdops::distribution::dispatch_kernel)
    dict(kernel="poly", degree=1),
    dict(kernel="poly", degree=4),
    dict(kernel="poly", degree=6),
    dict(kernel="poly", degree=9),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(MMD_CASES)))
@pytest.mark.parametrize("shape", [(37, 53, 129), (64, 64, 16), (1, 5, 7)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("save_blocks", [False, True], ids=["recompute", "saved"])
def test_mmd_parity_with_float64_reference(device, case, shape, save_blocks):
    n, m, d = shape
    kw = MMD_CASES[case]
    x, y = cloud(n, d, device), cloud(m, d, device, scale=1.3, shift=0.2)
    ours = value_and_grads(F.mmd, x, y, save_blocks=save_blocks, **kw)
    ref = value_and_grads(R.mmd, x.double(), y.double(), **kw)
    assert ours[0].dtype == torch.float32
    assert_all_close(ours, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_mmd_rbf_bandwidth_is_the_mean_pairwise_distance(device):
    x, y = cloud(20, 9, device, torch.float64), cloud(31, 9, device, torch.float64, shift=1.0)
    z = torch.cat([x, y]).cpu().numpy()
    for save in (0, 1, 2, 3):
        _, sigma, _ = torch.ops.kdops.mmd(x, y, "rbf", 0.0, 1.0, 3, 0.0, save)
        assert sigma.item() == pytest.approx(scipy.spatial.distance.pdist(z).mean(), rel=1e-12)
        _, fixed, _ = torch.ops.kdops.mmd(x, y, "rbf", 0.0, 1.0, 3, 2.5, save)
        assert fixed.item() == 2.5


def test_mmd_kernels_match_scikit_learn():
    from sklearn.metrics.pairwise import polynomial_kernel, rbf_kernel
    x, y = cloud(12, 5, dtype=torch.float64), cloud(17, 5, dtype=torch.float64, shift=0.5)
    xn, yn = x.numpy(), y.numpy()

    def biased(k):
        return k(xn, xn).mean() + k(yn, yn).mean() - 2 * k(xn, yn).mean()

    poly = biased(lambda a, b: polynomial_kernel(a, b, degree=3, gamma=1 / 5, coef0=1.0))
    assert F.mmd(x, y, kernel="poly").item() == pytest.approx(poly, rel=1e-10)
    rbf = biased(lambda a, b: rbf_kernel(a, b, gamma=1 / (2 * 1.7 ** 2)))
    assert F.mmd(x, y, kernel="rbf", bandwidth=1.7).item() == pytest.approx(rbf, rel=1e-10)
    lin = np.square(xn.mean(0) - yn.mean(0)).sum()
    assert F.mmd(x, y, kernel="linear").item() == pytest.approx(lin, rel=1e-12)


@pytest.mark.parametrize("kernel", ["linear", "rbf", "poly"])
@pytest.mark.parametrize("save_blocks", [False, True], ids=["recompute", "saved"])
def test_mmd_gradcheck_float64(kernel, save_blocks):
    x, y = cloud(6, 4, dtype=torch.float64), cloud(5, 4, dtype=torch.float64, shift=0.3)
    x.requires_grad_()
    y.requires_grad_()
    # rbf: a fixed bandwidth, since the automatic one is held constant (no gradient) by definition
    kw = dict(bandwidth=1.3) if kernel == "rbf" else {}
    assert torch.autograd.gradcheck(lambda a, b: F.mmd(a, b, kernel=kernel, save_blocks=save_blocks, **kw), (x, y))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", ["linear", "rbf", "poly"])
def test_mmd_opcheck(device, kernel):
    x, y = cloud(7, 5, device), cloud(9, 5, device)
    x.requires_grad_()
    y.requires_grad_()
    for bw in (0.0, 1.5):
        for save in (0, 1, 2, 3):
            torch.library.opcheck(torch.ops.kdops.mmd.default, (x, y, kernel, 0.2, 1.0, 3, bw, save))
    # every save mode with every gradient: a block the forward did not keep is recomputed
    for save in (0, 1, 2, 3):
        _, sigma, weights = torch.ops.kdops.mmd(x, y, kernel, 0.2, 1.0, 3, 0.0, save)
        for wx, wy in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(torch.ops.kdops.mmd_backward.default,
                                  (torch.tensor(0.7, device=device), x.detach(), y.detach(), sigma, weights, save,
                                   kernel, 0.2, 1.0, 3, wx, wy))


def _rbf_poly_beta(p, q, kernel, sigma, gamma=0.2, coef0=1.0, degree=3):
    """d k(p_i, q_j) / d p_i = alpha p_i + beta q_j: beta in float64, from the kernel's definition."""
    p, q = p.double(), q.double()
    if kernel == "rbf":
        d2 = torch.cdist(p, q).pow(2)
        return torch.exp(-d2 / (2 * sigma ** 2)) / sigma ** 2
    return degree * gamma * (gamma * p @ q.T + coef0).pow(degree - 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", ["rbf", "poly"])
def test_mmd_saved_weights_are_the_kernel_derivatives(device, kernel):
    # The saved buffer is [W_xy | W_xx (save bit 1) | W_yy (save bit 2)] with W = (loss weight of the block) *
    # beta, W_xx and W_yy counting each point's row and column: the backward reads it as such, so check the
    # layout itself.
    n, m, d = 9, 13, 6
    x, y = cloud(n, d, device, torch.float64), cloud(m, d, device, torch.float64, shift=0.4)
    loss0, sigma0, w0 = torch.ops.kdops.mmd(x, y, kernel, 0.2, 1.0, 3, 0.0, 0)
    assert w0.numel() == 0
    s = sigma0.item()
    want_xx = 2 / n ** 2 * _rbf_poly_beta(x, x, kernel, s).cpu()
    want_yy = 2 / m ** 2 * _rbf_poly_beta(y, y, kernel, s).cpu()
    if kernel == "rbf":  # a self pair's weight meets x_i - x_i: kept as exactly 0 (see drop_self_pairs)
        want_xx.diagonal().zero_()
        want_yy.diagonal().zero_()
    want_xy = -2 / (n * m) * _rbf_poly_beta(x, y, kernel, s).cpu()
    for save, blocks in ((1, [want_xy, want_xx]), (2, [want_xy, want_yy]), (3, [want_xy, want_xx, want_yy])):
        loss, sigma, w = torch.ops.kdops.mmd(x, y, kernel, 0.2, 1.0, 3, 0.0, save)
        assert w.dtype == torch.float64 and w.shape == (sum(b.numel() for b in blocks),)
        torch.testing.assert_close(w.cpu(), torch.cat([b.flatten() for b in blocks]))
        # the same loss and sigma as the forward that keeps nothing
        assert sigma.item() == s
        torch.testing.assert_close(loss, loss0, rtol=1e-13, atol=1e-15)
    # linear keeps nothing: its gradient is closed-form
    assert torch.ops.kdops.mmd(x, y, "linear", 0.2, 1.0, 3, 0.0, 3)[2].numel() == 0
    # the backward from any saved set, blocks not kept recomputed, equals the one that recomputes everything
    g = torch.tensor(0.7, dtype=torch.float64, device=device)
    for save in (1, 2, 3):
        _, _, w = torch.ops.kdops.mmd(x, y, kernel, 0.2, 1.0, 3, 0.0, save)
        for wx, wy in ((True, True), (True, False), (False, True)):
            want = torch.ops.kdops.mmd_backward(g, x, y, sigma0, w0, 0, kernel, 0.2, 1.0, 3, wx, wy)
            got = torch.ops.kdops.mmd_backward(g, x, y, sigma0, w, save, kernel, 0.2, 1.0, 3, wx, wy)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def _saved_numels(fn):
    numels = []

    def pack(t):
        numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return numels


def test_mmd_save_blocks_default_follows_the_size_limit(monkeypatch):
    from kdops.functional import distribution as D
    x, y = cloud(30, 8).requires_grad_(), cloud(20, 8)
    blocks = 30 * 20 + 30 * 30  # W_xy and W_xx: y (a frozen teacher) needs no W_yy
    assert blocks in _saved_numels(lambda: F.mmd(x, y, kernel="poly"))
    assert blocks + 20 * 20 in _saved_numels(lambda: F.mmd(x, y.requires_grad_(), kernel="poly"))
    y.requires_grad_(False)
    assert blocks not in _saved_numels(lambda: F.mmd(x, y, kernel="poly", save_blocks=False))
    assert blocks not in _saved_numels(lambda: F.mmd(x, y, kernel="poly", save_blocks=0))
    monkeypatch.setattr(D, "MMD_SAVE_LIMIT_BYTES", blocks * 4 - 1)
    assert blocks not in _saved_numels(lambda: F.mmd(x, y, kernel="rbf"))
    assert blocks in _saved_numels(lambda: F.mmd(x, y, kernel="rbf", save_blocks=True))
    # nothing to differentiate: save_blocks changes nothing observable, the loss included
    with torch.no_grad():
        assert F.mmd(x, y, kernel="rbf", save_blocks=True).item() == pytest.approx(
            F.mmd(x, y, kernel="rbf", save_blocks=False).item(), rel=1e-6)
    _, _, w = torch.ops.kdops.mmd(x.detach(), y, "rbf", 0.2, 1.0, 3, 0.0, 0)
    assert w.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["linear", "rbf", "poly"])
def test_mmd_low_precision(device, dtype, kernel):
    x, y = cloud(40, 24, device, dtype), cloud(33, 24, device, dtype, shift=0.3)
    ours = value_and_grads(F.mmd, x, y, kernel=kernel)
    # the op upcasts once, so the exact answer for the rounded inputs is the target
    ref = value_and_grads(R.mmd, x.double(), y.double(), kernel=kernel)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=1e-4, atol=1e-6)
    for g, r in zip(ours[1:], ref[1:]):
        # one rounding of each gradient to the dtype
        torch.testing.assert_close(g.double(), r, rtol=2 * torch.finfo(dtype).eps, atol=1e-3 * r.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_mmd_non_contiguous_and_identical(device):
    xt, yt = cloud(16, 30, device), cloud(16, 41, device)
    x, y = xt.t(), yt.t()[::2]  # (30, 16) and (21, 16), both strided
    assert not x.is_contiguous() and not y.is_contiguous()
    for kernel in ("linear", "rbf", "poly"):
        assert_all_close(value_and_grads(F.mmd, x, y, kernel=kernel),
                         value_and_grads(R.mmd, x.double(), y.double(), kernel=kernel), rtol=1e-4, atol=1e-6)
        same = F.mmd(x.contiguous(), x.contiguous(), kernel=kernel)
        assert abs(same.item()) < 1e-5
    # every point equal: sigma = 0 gives kernel 1 everywhere, a zero loss and zero gradients, not NaN
    z = torch.ones(5, 3, device=device, requires_grad=True)
    loss = F.mmd(z, torch.ones(4, 3, device=device), kernel="rbf")
    (g,) = torch.autograd.grad(loss, z)
    assert loss.item() == 0.0 and torch.equal(g, torch.zeros_like(g))


def test_mmd_torch_compile_fullgraph():
    x, y = cloud(12, 8), cloud(10, 8)
    for kernel in ("linear", "rbf", "poly"):
        for save in (None, False):
            fn = lambda a, b: F.mmd(a, b, kernel=kernel, save_blocks=save)  # noqa: E731
            eager, comp = value_and_grads(fn, x, y), value_and_grads(torch.compile(fn, fullgraph=True), x, y)
            assert_all_close(comp, eager, rtol=1e-6, atol=1e-7)


# ---- exact W2 ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,m", [(32, 32), (25, 40), (1, 7), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wasserstein_exact_matches_ot_emd2(device, n, m, dtype):
    x, y = cloud(n, 11, device, dtype), cloud(m, 11, device, dtype, shift=0.4)
    xd, yd = x.double().cpu().numpy(), y.double().cpu().numpy()
    expected = ot.emd2(np.full(n, 1 / n), np.full(m, 1 / m), ot.dist(xd, yd))
    ours = value_and_grads(F.wasserstein_exact, x, y)
    ref = value_and_grads(R.wasserstein_exact, x.double(), y.double())
    assert ours[0].item() == pytest.approx(expected, rel=1e-5 if dtype == torch.float32 else 1e-12)
    assert_all_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_wasserstein_exact_gradcheck_float64():
    for n, m in ((6, 6), (5, 8)):
        x = cloud(n, 3, dtype=torch.float64).requires_grad_()
        y = cloud(m, 3, dtype=torch.float64, shift=0.5).requires_grad_()
        assert torch.autograd.gradcheck(F.wasserstein_exact, (x, y))


def test_wasserstein_exact_ops_opcheck_and_compile():
    x, y = cloud(9, 4), cloud(9, 4)
    cost = torch.cdist(x.double(), y.double()) ** 2
    torch.library.opcheck(torch.ops.kdops.emd_plan.default, (cost,))
    torch.library.opcheck(torch.ops.kdops.emd_permutation.default, (cost,))
    perm = torch.ops.kdops.emd_permutation(cost)
    assert sorted(perm.tolist()) == list(range(9))
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    torch.library.opcheck(torch.ops.kdops.permuted_sq_dist.default, (xr, yr, perm))
    for wx, wy in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.kdops.permuted_sq_dist_backward.default,
                              (torch.tensor(0.3), x, y, perm, wx, wy))
    comp = torch.compile(F.wasserstein_exact, fullgraph=True)
    assert_all_close(value_and_grads(comp, x, y), value_and_grads(F.wasserstein_exact, x, y), rtol=1e-6, atol=1e-7)


# ---- Gaussian W2 and KL ----

@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_wasserstein_matches_pot_bures(device):
    # POT returns the distance (not squared) and regularises the covariances with reg; reg=0 here.
    x, y = cloud(80, 6, device, torch.float64), cloud(70, 6, device, torch.float64, scale=2.0, shift=0.5)
    expected = ot.gaussian.empirical_bures_wasserstein_distance(x.cpu().numpy(), y.cpu().numpy(), reg=0.0) ** 2
    assert F.gaussian_wasserstein(x, y).item() == pytest.approx(float(expected), rel=1e-10)
    ours = value_and_grads(F.gaussian_wasserstein, x.float(), y.float())
    ref = value_and_grads(R.gaussian_wasserstein, x, y)
    assert_all_close(ours, ref, rtol=2e-4, atol=1e-5)


def test_gaussian_wasserstein_diagonal():
    x, y = cloud(30, 9, dtype=torch.float64), cloud(20, 9, dtype=torch.float64, scale=0.5)
    expected = (x.mean(0) - y.mean(0)).square().sum() + (x.std(0, correction=0) - y.std(0, correction=0)).square().sum()
    assert_all_close(value_and_grads(F.gaussian_wasserstein, x, y, diagonal=True),
                     value_and_grads(R.gaussian_wasserstein, x, y, diagonal=True), rtol=1e-12, atol=1e-12)
    assert F.gaussian_wasserstein(x, y, diagonal=True).item() == pytest.approx(expected.item(), rel=1e-12)


def test_gaussian_wasserstein_singular_matches_nuclear_norm():
    # n < d: both covariances are singular. tr((S_x^1/2 S_y S_x^1/2)^1/2) is then the nuclear norm of
    # Xc Yc^T / sqrt(n m), an independent formula whose gradient (through an SVD of distinct singular values)
    # is the reference for ours.
    def nuclear(x, y):
        xc, yc = x - x.mean(0), y - y.mean(0)
        cross = torch.linalg.matrix_norm(xc @ yc.T, ord="nuc") / (x.shape[0] * y.shape[0]) ** 0.5
        return ((x.mean(0) - y.mean(0)).square().sum() + xc.square().sum() / x.shape[0]
                + yc.square().sum() / y.shape[0] - 2 * cross)

    x, y = cloud(7, 20, dtype=torch.float64), cloud(9, 20, dtype=torch.float64, shift=0.3)
    ours, ref = value_and_grads(F.gaussian_wasserstein, x, y), value_and_grads(nuclear, x, y)
    assert_all_close(ours, ref, rtol=1e-6, atol=1e-8)
    ours32 = value_and_grads(F.gaussian_wasserstein, x.float(), y.float())
    assert all(torch.isfinite(t).all() for t in ours32)
    assert_all_close(ours32, ref, rtol=1e-3, atol=1e-4)


def test_gaussian_gradcheck_float64():
    x = cloud(12, 4, dtype=torch.float64).requires_grad_()
    y = cloud(10, 4, dtype=torch.float64, scale=1.5).requires_grad_()
    for diagonal in (False, True):
        assert torch.autograd.gradcheck(lambda a, b: F.gaussian_wasserstein(a, b, diagonal=diagonal), (x, y))
        assert torch.autograd.gradcheck(lambda a, b: F.gaussian_kl(a, b, diagonal=diagonal), (x, y))


@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_kl_matches_closed_form(device):
    dist = torch.distributions
    x, y = cloud(60, 5, device, torch.float64), cloud(50, 5, device, torch.float64, scale=1.7, shift=0.2)
    mx, my = x.mean(0), y.mean(0)
    cx, cy = torch.cov(x.T, correction=0), torch.cov(y.T, correction=0)
    full = dist.kl_divergence(dist.MultivariateNormal(mx, cx), dist.MultivariateNormal(my, cy))
    assert F.gaussian_kl(x, y, diagonal=False).item() == pytest.approx(full.item(), rel=1e-10)
    diag = dist.kl_divergence(dist.Normal(mx, x.std(0, correction=0)), dist.Normal(my, y.std(0, correction=0))).sum()
    assert F.gaussian_kl(x, y).item() == pytest.approx(diag.item(), rel=1e-10)
    for diagonal in (False, True):
        assert_all_close(value_and_grads(F.gaussian_kl, x.float(), y.float(), diagonal=diagonal),
                         value_and_grads(R.gaussian_kl, x, y, diagonal=diagonal), rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_losses_are_finite_on_dead_dimensions(device):
    x, y = cloud(6, 10, device), cloud(6, 10, device)
    y[:, 3:] = 0.0  # dead teacher dimensions (and n < d: singular covariances)
    x[:, 7] = 1.0
    for fn in (lambda a, b: F.gaussian_kl(a, b), lambda a, b: F.gaussian_kl(a, b, diagonal=False),
               F.gaussian_wasserstein, lambda a, b: F.gaussian_wasserstein(a, b, diagonal=True)):
        out = value_and_grads(fn, x, y)
        assert all(torch.isfinite(t).all() for t in out)


def test_gaussian_compile_fullgraph():
    x, y = cloud(30, 6), cloud(25, 6)
    for fn in (F.gaussian_wasserstein, F.gaussian_kl):
        comp = torch.compile(fn, fullgraph=True)
        assert_all_close(value_and_grads(comp, x, y), value_and_grads(fn, x, y), rtol=1e-5, atol=1e-6)


LOSSES = {
    "wasserstein_exact": F.wasserstein_exact,
    "wasserstein_exact_n_ne_m": F.wasserstein_exact,
    "gaussian_wasserstein": F.gaussian_wasserstein,
    "gaussian_wasserstein_diag": lambda a, b: F.gaussian_wasserstein(a, b, diagonal=True),
    "gaussian_kl": F.gaussian_kl,
    "gaussian_kl_full": lambda a, b: F.gaussian_kl(a, b, diagonal=False),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(LOSSES))
def test_composite_losses_low_precision_and_strides(device, dtype, name):
    # the composites upcast once: the value is the fp32 one of the rounded inputs, the gradients that one
    # rounded to the input dtype; strided inputs give the same as contiguous ones
    fn = LOSSES[name]
    x = cloud(21, 40, device, dtype).t()[:, ::2]  # (40, 11), strided
    y = cloud(21 if name.endswith("n_ne_m") else 40, 11, device, dtype, scale=1.5, shift=0.2)
    if name.endswith("n_ne_m"):
        y = y[:17]
    ours = value_and_grads(fn, x, y)
    ref = value_and_grads(fn, x.float().contiguous(), y.float())
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype and ours[2].dtype == dtype
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-6)
    for g, r in zip(ours[1:], ref[1:]):
        torch.testing.assert_close(g.float(), r, rtol=2 * torch.finfo(dtype).eps, atol=1e-3 * r.abs().max().item())


def test_identical_clouds_give_zero():
    x = cloud(12, 5)
    assert F.wasserstein_exact(x, x).item() == 0.0
    assert abs(F.gaussian_wasserstein(x, x).item()) < 1e-5
    assert abs(F.gaussian_kl(x, x, diagonal=False).item()) < 1e-4 and abs(F.gaussian_kl(x, x).item()) < 1e-5
    assert abs(F.mmd(x, x).item()) < 1e-6


# ---- class-conditional and joint ----

@pytest.mark.parametrize("metric", ["exact", "gaussian"])
def test_class_conditional_matches_manual_per_class_sum(metric):
    x, y = cloud(40, 6), cloud(40, 6, shift=0.2)
    labels = torch.randint(0, 5, (40,))
    labels[0] = 7  # a class with one sample
    labels[labels == 3] = 2  # a class absent from the batch
    manual = sum(R.class_conditional_wasserstein(x[labels == c].double(), y[labels == c].double(),
                                                 torch.zeros(int((labels == c).sum()), dtype=torch.long), metric)
                 for c in labels.unique())
    ours = value_and_grads(lambda a, b: F.class_conditional_wasserstein(a, b, labels, metric), x, y)
    assert ours[0].item() == pytest.approx(manual.item(), rel=1e-4)
    if metric == "gaussian":
        # the reference differentiates through eigh, which is NaN for singular covariances: give it classes
        # with more samples than dimensions (the singular case is tested against the nuclear-norm formula)
        labels = torch.arange(40) % 3
        x, y = x[:, :3], y[:, :3]
        ours = value_and_grads(lambda a, b: F.class_conditional_wasserstein(a, b, labels, metric), x, y)
    ref = value_and_grads(lambda a, b: R.class_conditional_wasserstein(a, b, labels, metric), x.double(), y.double())
    assert_all_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("metric", ["exact", "gaussian"])
def test_class_with_one_sample_gives_its_squared_distance(metric):
    x, y = cloud(1, 5), cloud(1, 5)
    out = value_and_grads(lambda a, b: F.class_conditional_wasserstein(a, b, torch.tensor([2]), metric), x, y)
    assert out[0].item() == pytest.approx((x - y).square().sum().item(), rel=1e-5)
    torch.testing.assert_close(out[1], 0.6 * 2 * (x - y))
    torch.testing.assert_close(out[2], -0.6 * 2 * (x - y))


def test_class_conditional_gradcheck_float64():
    x = cloud(9, 3, dtype=torch.float64).requires_grad_()
    y = cloud(9, 3, dtype=torch.float64).requires_grad_()
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 1, 2, 3])
    for metric in ("exact", "gaussian"):
        assert torch.autograd.gradcheck(lambda a, b: F.class_conditional_wasserstein(a, b, labels, metric), (x, y))


def test_joint_wasserstein_matches_reference():
    x, y = cloud(20, 6), cloud(24, 6, shift=0.3)
    lx, ly = cloud(20, 4, scale=2.0), cloud(24, 4, scale=2.0)
    tensors = [t.clone().requires_grad_() for t in (x, y, lx, ly)]
    out = F.joint_wasserstein(*tensors, beta=0.7)
    grads = torch.autograd.grad(out, tensors)
    ref_tensors = [t.double().requires_grad_() for t in (x, y, lx, ly)]
    ref = R.joint_wasserstein(*ref_tensors, beta=0.7)
    ref_grads = torch.autograd.grad(ref, ref_tensors)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6)
        assert g.abs().sum() > 0  # the feature and the label terms both train, student and teacher
    # beta = 0: the feature-only exact OT with its cost scaled by 1 / max C
    scale = torch.cdist(x.double(), y.double()).square().max()
    assert F.joint_wasserstein(x, y, lx, ly, beta=0.0).item() == pytest.approx(
        R.wasserstein_exact(x.double(), y.double()).item() / scale.item(), rel=1e-5)


def test_joint_wasserstein_gradcheck_logits():
    # the max-normaliser is a constant of the step, so gradcheck the logits (it does not depend on them)
    x, y = cloud(6, 3, dtype=torch.float64), cloud(6, 3, dtype=torch.float64)
    lx = cloud(6, 4, dtype=torch.float64).requires_grad_()
    ly = cloud(6, 4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: F.joint_wasserstein(x, y, a, b, beta=2.0), (lx, ly))


# ---- modules ----

def test_modules_match_functional():
    x, y = cloud(16, 5), cloud(16, 5, shift=0.1)
    labels = torch.randint(0, 3, (16,))
    lx, ly = cloud(16, 3), cloud(16, 3)
    pairs = [
        (knn.WassersteinLoss()(x, y), F.wasserstein_exact(x, y)),
        (knn.ClassConditionalWassersteinLoss("gaussian", diagonal=True)(x, y, labels),
         F.class_conditional_wasserstein(x, y, labels, "gaussian", diagonal=True)),
        (knn.JointWassersteinLoss(beta=2.0)(x, y, lx, ly), F.joint_wasserstein(x, y, lx, ly, 2.0)),
        (knn.GaussianWassersteinLoss()(x, y), F.gaussian_wasserstein(x, y)),
        (knn.GaussianKLLoss(diagonal=False, eps=1e-4)(x, y), F.gaussian_kl(x, y, False, 1e-4)),
        (knn.MMDLoss("poly", degree=2)(x, y), F.mmd(x, y, "poly", degree=2)),
    ]
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- bad inputs ----

X, Y = cloud(8, 4), cloud(6, 4)
BAD = [
    (lambda: F.mmd(X, Y[:, :3]), ValueError, "same feature dim"),
    (lambda: F.wasserstein_exact(X, Y[:, :3]), ValueError, "same feature dim"),
    (lambda: F.gaussian_wasserstein(X[:0], Y), ValueError, "empty cloud"),
    (lambda: F.mmd(X, Y[:0]), ValueError, "empty cloud"),
    (lambda: F.wasserstein_exact(X[0], Y), ValueError, r"shape \(n, d\)"),
    (lambda: F.gaussian_kl(X, Y.long()), ValueError, "y must be a floating-point"),
    (lambda: F.gaussian_kl(X, Y, eps=0.0), ValueError, "eps"),
    (lambda: F.mmd(X, Y, kernel="laplace"), ValueError, "kernel must be one of"),
    (lambda: F.mmd(X, Y, kernel="poly", degree=0), ValueError, "degree"),
    (lambda: F.mmd(X, Y, bandwidth=-1.0), ValueError, "bandwidth"),
    (lambda: F.mmd(X.long(), Y), ValueError, "floating-point"),
    (lambda: F.mmd(X, Y, save_blocks="yes"), ValueError, "save_blocks must be None, True or False"),
    (lambda: torch.ops.kdops.mmd(X, Y[:, :2], "rbf", 1.0, 1.0, 3, 0.0, 0), RuntimeError, "same feature dim"),
    (lambda: torch.ops.kdops.mmd(X, Y, "cosine", 1.0, 1.0, 3, 0.0, 0), RuntimeError, "kernel must be"),
    (lambda: torch.ops.kdops.mmd(X, Y, "rbf", 1.0, 1.0, 3, 0.0, 4), RuntimeError, "save_weights must be 0"),
    (lambda: torch.ops.kdops.mmd_backward(torch.tensor(1.0), X, Y, torch.tensor(1.0), torch.zeros(5), 3, "rbf", 1.0,
                                          1.0, 3, True, True), RuntimeError, "buffer of 148 elements"),
    (lambda: F.class_conditional_wasserstein(X, X, torch.zeros(7, dtype=torch.long)), ValueError,
     r"labels must have shape \(n,\) = \(8,\)"),
    (lambda: F.class_conditional_wasserstein(X, X, torch.zeros(8)), ValueError, "integer tensor"),
    (lambda: F.class_conditional_wasserstein(X, Y, torch.zeros(8, dtype=torch.long)), ValueError, "same number"),
    (lambda: F.class_conditional_wasserstein(X, X, torch.zeros(8, dtype=torch.long), "energy"), ValueError,
     "metric must be one of"),
    (lambda: F.joint_wasserstein(X, Y, X[:, :3], Y[:5, :3]), ValueError, "one row per point"),
    (lambda: F.joint_wasserstein(X, Y, X[:, :3], Y[:, :3], beta=-1.0), ValueError, "beta"),
    (lambda: knn.MMDLoss("cosine"), ValueError, "kernel must be one of"),
    # non-finite features: a clear refusal, not the solver's unrelated message
    (lambda: F.wasserstein_exact(X.index_fill(0, torch.tensor([2]), float("nan")), X), ValueError,
     "emd_permutation: the cost matrix has NaN or inf entries"),
    (lambda: F.wasserstein_exact(X.index_fill(0, torch.tensor([2]), float("inf")), Y), ValueError,
     "emd_plan: the cost matrix has NaN or inf entries"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_inputs(case):
    fn, error, message = BAD[case]
    with pytest.raises(error, match=message):
        fn()
