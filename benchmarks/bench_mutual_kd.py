"""Mutual-learning benchmark (DML's term for N peers): kdops' fused op (one pass, O(N b C)) vs the eager
pairwise reference (N (N - 1) F.kl_div calls) vs torch.compile of it, forward and forward + backward (every
peer's gradient), fp32 and bf16, with one torch.exp pass over the N peers' logits as the floor.

    pytest benchmarks/bench_mutual_kd.py --benchmark-only --benchmark-json=run.json
    python -m benchmarks.report run.json

Each kdops benchmark first checks kdops against the reference (the N values and every peer's gradient).
"""

import pytest
import torch

import kdops  # noqa: F401
from benchmarks.common import DEVICES, compiled, dtypes, modes, run, sizes
from kdops import functional as F
from kdops import reference as R

# (peers, rows, classes): two and four CIFAR-100 peers, four ImageNet-sized ones
SHAPES = sizes([(2, 256, 100), (4, 256, 100), (4, 1024, 1000)], quick=[(2, 16, 10), (3, 8, 100)],
               headline=[(4, 1024, 1000)])
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = {"kdops": lambda: F.mutual_kd_loss, "eager": lambda: R.mutual_kd_loss,
             "compiled": lambda: compiled(R.mutual_kd_loss)}


def shape_name(shape):
    return "%dx%dx%d" % shape


def make_peers(shape, dtype, device):
    g = torch.Generator().manual_seed(0)
    n, b, c = shape
    return [(torch.randn(b, c, generator=g) * 3).to(device=device, dtype=dtype) for _ in range(n)]


def check_against_reference(zs, dtype):
    leaves = [z.detach().clone().requires_grad_() for z in zs]
    ours = F.mutual_kd_loss(leaves)
    ours_g = torch.autograd.grad(ours.sum(), leaves)
    ref_leaves = [z.detach().double().requires_grad_() for z in zs]
    ref = R.mutual_kd_loss(ref_leaves)
    ref_g = torch.autograd.grad(ref.sum(), ref_leaves)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(ours.double(), ref.detach(), **tol)
    for a, b in zip(ours_g, ref_g):
        torch.testing.assert_close(a.double(), b, rtol=tol["rtol"], atol=tol["atol"] / zs[0].shape[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", modes(["fwd", "fwd+bwd"]))
@pytest.mark.parametrize("dtype", dtypes(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_name)
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_mutual_kd_loss(benchmark, provider, shape, dtype, mode, device):
    zs = make_peers(shape, DTYPES[dtype], device)
    loss_fn = PROVIDERS[provider]()
    if provider == "kdops":
        check_against_reference(zs, DTYPES[dtype])
    if mode == "fwd":
        fn = lambda: loss_fn(zs)  # noqa: E731
    else:
        for z in zs:
            z.requires_grad_()

        def fn():
            return torch.autograd.grad(loss_fn(zs).sum(), zs)
    run(benchmark, "mutual_kd", fn, device, shape=shape_name(shape), dtype=dtype, mode=mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtypes(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_name)
def test_floor_exp_all_peers(benchmark, shape, dtype, device):
    """The floor: one torch.exp pass over the N peers' logits."""
    zs = make_peers(shape, DTYPES[dtype], device)
    run(benchmark, "mutual_kd", lambda: [torch.exp(z) for z in zs], device, shape=shape_name(shape), dtype=dtype,
        mode="floor")
