"""Distribution-matching benchmark, forward+backward (gradient to the student cloud x), fp32, n = m:

- ``mmd-<kernel>`` (linear / rbf / poly): kdops.functional.mmd (fused op) vs the eager reference (three kernel
  matrices) vs torch.compile(reference); the floor is the single GEMM x @ y.T that any Gram-based MMD computes.
- ``gaussian-w2``: kdops.functional.gaussian_wasserstein (full covariances) vs reference vs compiled(reference).
- ``w2-exact``: kdops.functional.wasserstein_exact vs POT, ``ot.emd2(a, b, ot.dist(x, y))`` on torch tensors
  (its gradient is POT's, through the plan), eager and under torch.compile (which breaks the graph at the
  solver). Sizes stop at n = 1024: the network simplex is the cost there and is the same code in both.

    pytest benchmarks/bench_distribution.py --benchmark-only --benchmark-json=run.json
    python -m benchmarks.report run.json

Each kdops benchmark first checks kdops against the float64 reference (loss and gradient).
"""

import ot
import pytest
import torch

import kdops  # noqa: F401
from benchmarks.common import DEVICES, compiled, forward_backward, run, sizes
from kdops import functional as F
from kdops import reference as R

# (n, d), n = m
MMD_SHAPES = sizes([(256, 128), (256, 512), (1024, 128), (1024, 512), (4096, 128)], quick=[(16, 8)],
                   headline=[(1024, 128), (1024, 512)])
GAUSS_SHAPES = sizes([(256, 128), (1024, 128), (1024, 512), (4096, 512)], quick=[(16, 8)], headline=[(1024, 512)])
EXACT_SHAPES = sizes([(256, 128), (1024, 128), (1024, 512)], quick=[(16, 8)], headline=[(1024, 128)])
KERNELS = ["linear", "rbf", "poly"]


def shape_id(shape):
    return "%dx%d" % shape


def make_inputs(shape, device):
    g = torch.Generator().manual_seed(0)
    n, d = shape
    x = torch.randn(n, d, generator=g).to(device)
    y = (torch.randn(n, d, generator=g) * 1.2 + 0.1).to(device)
    return x, y


def check(ours_fn, ref_fn, x, y, rtol=1e-4, atol=1e-6):
    a = x.detach().requires_grad_()
    ours = ours_fn(a, y)
    b = x.detach().double().requires_grad_()
    ref = ref_fn(b, y.double())
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=rtol, atol=atol)
    g_ours, g_ref = torch.autograd.grad(ours, a)[0], torch.autograd.grad(ref, b)[0]
    torch.testing.assert_close(g_ours.double(), g_ref, rtol=rtol, atol=atol * g_ref.abs().max().item())


# One function (one code object) per kernel and provider: torch.compile caches compiled graphs per code
# object, and one shared body would run into its recompile limit across kernels x shapes.
def mmd_linear(x, y):
    return F.mmd(x, y, kernel="linear")


def mmd_rbf(x, y):
    return F.mmd(x, y, kernel="rbf")


def mmd_poly(x, y):
    return F.mmd(x, y, kernel="poly")


def mmd_linear_ref(x, y):
    return R.mmd(x, y, kernel="linear")


def mmd_rbf_ref(x, y):
    return R.mmd(x, y, kernel="rbf")


def mmd_poly_ref(x, y):
    return R.mmd(x, y, kernel="poly")


_MMD = {"linear": (mmd_linear, mmd_linear_ref), "rbf": (mmd_rbf, mmd_rbf_ref), "poly": (mmd_poly, mmd_poly_ref)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["fp32"])
@pytest.mark.parametrize("shape", MMD_SHAPES, ids=shape_id)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("provider", ["kdops", "eager", "compiled"])
@pytest.mark.parametrize("mode", ["fwd+bwd"])
def test_mmd(benchmark, provider, mode, dtype, kernel, shape, device):
    x, y = make_inputs(shape, device)
    ours, ref = _MMD[kernel]
    if provider == "kdops":
        check(ours, ref, x, y)
    loss_fn = {"kdops": ours, "eager": ref, "compiled": compiled(ref) if provider == "compiled" else None}[provider]
    x.requires_grad_()
    run(benchmark, "mmd-" + kernel, forward_backward(loss_fn, (x, y), wrt=[0]), device, shape=shape_id(shape),
        dtype=dtype, mode=mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["fp32"])
@pytest.mark.parametrize("shape", MMD_SHAPES, ids=shape_id)
@pytest.mark.parametrize("kernel", KERNELS)
def test_mmd_floor(benchmark, dtype, kernel, shape, device):
    """The floor: the one GEMM x @ y.T (forward) that every Gram-based MMD computes."""
    x, y = make_inputs(shape, device)
    run(benchmark, "mmd-" + kernel, lambda: x @ y.T, device, shape=shape_id(shape), dtype=dtype, mode="floor")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["fp32"])
@pytest.mark.parametrize("shape", GAUSS_SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", ["kdops", "eager", "compiled"])
@pytest.mark.parametrize("mode", ["fwd+bwd"])
def test_gaussian_wasserstein(benchmark, provider, mode, dtype, shape, device):
    x, y = make_inputs(shape, device)
    if provider == "kdops":
        if shape[0] > shape[1]:
            check(F.gaussian_wasserstein, R.gaussian_wasserstein, x, y, rtol=1e-3, atol=1e-4)
        else:  # singular covariances: the reference's eigh gradient is NaN there, so compare values only
            torch.testing.assert_close(F.gaussian_wasserstein(x, y).double(),
                                       R.gaussian_wasserstein(x.double(), y.double()), rtol=1e-3, atol=1e-3)
    loss_fn = {"kdops": F.gaussian_wasserstein, "eager": R.gaussian_wasserstein,
               "compiled": compiled(R.gaussian_wasserstein) if provider == "compiled" else None}[provider]
    x.requires_grad_()
    run(benchmark, "gaussian-w2", forward_backward(loss_fn, (x, y), wrt=[0]), device, shape=shape_id(shape),
        dtype=dtype, mode=mode)


def pot_w2(x, y):
    """W2^2 the POT way, differentiable through POT's torch backend."""
    a = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=x.dtype, device=x.device)
    b = torch.full((y.shape[0],), 1.0 / y.shape[0], dtype=y.dtype, device=y.device)
    return ot.emd2(a, b, ot.dist(x, y))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["fp32"])
@pytest.mark.parametrize("shape", EXACT_SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", ["kdops", "eager", "compiled"])
@pytest.mark.parametrize("mode", ["fwd+bwd"])
def test_wasserstein_exact(benchmark, provider, mode, dtype, shape, device):
    x, y = make_inputs(shape, device)
    if provider == "kdops":
        check(F.wasserstein_exact, pot_w2, x, y, rtol=1e-5)
    loss_fn = {"kdops": F.wasserstein_exact, "eager": pot_w2,
               "compiled": compiled(pot_w2) if provider == "compiled" else None}[provider]
    x.requires_grad_()
    run(benchmark, "w2-exact", forward_backward(loss_fn, (x, y), wrt=[0]), device, shape=shape_id(shape),
        dtype=dtype, mode=mode)
