"""The CUDA backward of kdops::gram_transform (the cosine kernel and the distances of the relational losses),
emulated on the host (kdops::_gram_transform_backward_emulate_device), against the CPU kernel: the device's
decomposition (one block per row for the direct gradients and the row sums, CUB-order reductions, then one
thread per column for the column sums and the diagonal's term) runs in every CPU test run, from the same
functions of kdops/gram_math.h that csrc/cuda/gram.cu compiles. The CPU kernel gathers the row and column sums
in a single pass instead."""

import pytest
import torch

import kdops  # noqa: F401

KINDS = {"cosine": 0, "distance": 1, "squared_distance": 2}


def gram_of(shape, dtype, seed=0, zero_row=False, duplicate=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, 5, generator=g, dtype=torch.float64)
    if zero_row:
        x[..., 0, :] = 0  # a clamped norm: the cosine kernel's diagonal factor is 0 there
    if duplicate and shape[-1] > 2:
        x[..., 2, :] = x[..., 1, :]  # a clamped distance: its gradient is cut
    x = x.to(dtype)
    return x @ x.transpose(-1, -2)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("threads", [1, 7, 32, 33, 256])
@pytest.mark.parametrize("shape", [(1,), (3,), (40,), (3, 9), (300,)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_device_backward_emulated_on_the_host(kind, threads, shape, dtype):
    g = gram_of(shape, dtype, zero_row=True, duplicate=True)
    out = torch.ops.kdops.gram_transform(g, KINDS[kind])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    dev = torch.ops.kdops._gram_transform_backward_emulate_device(grad, g, out, KINDS[kind], threads)
    cpu = torch.ops.kdops.gram_transform_backward(grad, g, out, KINDS[kind])
    cpu64 = torch.ops.kdops.gram_transform_backward(grad.double(), g.double(), out.double(), KINDS[kind])
    assert_matches_cpu(dev, cpu, cpu64, dtype)


def test_emulation_rejects_bad_threads():
    g = gram_of((4, 4), torch.float64)
    out = torch.ops.kdops.gram_transform(g, 0)
    with pytest.raises(RuntimeError, match="threads must be >= 1"):
        torch.ops.kdops._gram_transform_backward_emulate_device(torch.ones_like(g), g, out, 0, 0)


def feature_grams(b, dtype, seed=0, zero_row=False, duplicate=False, d=6):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(b, d, generator=g, dtype=torch.float64)
    ht = torch.randn(b, d + 2, generator=g, dtype=torch.float64) * 2
    if zero_row:
        hs[0] = 0
    if duplicate and b > 2:
        hs[2] = hs[1]
        ht[2] = ht[1]
    return (hs @ hs.t()).to(dtype), (ht @ ht.t()).to(dtype)


TOL = {torch.float64: 1e-11, torch.float32: 3e-5}


def assert_matches_cpu(dev, cpu, cpu64, dtype):
    """float64: the emulation equals the CPU kernel to rounding. float32: the two differ in summation order only,
    which matters where the loss is ill-conditioned (the zero row, the duplicate pair); there the emulation must
    be as close to the CPU kernel's float64 result as the CPU kernel's own float32 result is (twice that, plus
    a few ulps of the entry)."""
    if dtype == torch.float64:
        torch.testing.assert_close(dev, cpu, rtol=TOL[dtype], atol=TOL[dtype])
        return
    dev, cpu, cpu64 = dev.double(), cpu.double(), cpu64.double()
    budget = 2 * (cpu - cpu64).abs() + 8 * torch.finfo(torch.float32).eps * (cpu64.abs() + cpu64.abs().max())
    bad = (dev - cpu64).abs() > budget
    assert not bad.any(), ((dev - cpu64).abs()[bad], budget[bad])
THREADS = [1, 7, 32, 33, 256]
BATCHES = [2, 3, 40, 97]


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("cosine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fkd_device_algorithm_emulated_on_the_host(threads, b, cosine, dtype):
    # one block per row with a CUB row sum, then the diagonal's terms in a second kernel (the CPU kernel
    # folds them into its row pass)
    gs, gt = feature_grams(b, dtype, zero_row=True, duplicate=True)
    kt = torch.ops.kdops.gram_transform(gt, 0) if cosine else gt
    args = (cosine, 0.1, 2)
    ops = torch.ops.kdops
    assert_matches_cpu(ops._fkd_gram_emulate_device(gs, kt, *args, threads), ops.fkd_gram(gs, kt, *args),
                       ops.fkd_gram(gs.double(), kt.double(), *args), dtype)
    grad = torch.tensor(1.7, dtype=dtype)
    dev = ops._fkd_gram_backward_emulate_device(grad, gs, kt, *args, True, True, threads)
    cpu = ops.fkd_gram_backward(grad, gs, kt, *args, True, True)
    cpu64 = ops.fkd_gram_backward(grad.double(), gs.double(), kt.double(), *args, True, True)
    for a, c, c64 in zip(dev, cpu, cpu64):
        assert_matches_cpu(a, c, c64, dtype)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("wants", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pkt_device_algorithm_emulated_on_the_host(threads, b, wants, dtype):
    # three strided passes per row, each reduced and shared with the whole block, then the column sums in a
    # second kernel per side
    gs, gt = feature_grams(b, dtype, zero_row=True, duplicate=True)
    ops = torch.ops.kdops
    assert_matches_cpu(ops._pkt_gram_emulate_device(gs, gt, 1e-7, threads), ops.pkt_gram(gs, gt, 1e-7),
                       ops.pkt_gram(gs.double(), gt.double(), 1e-7), dtype)
    grad = torch.tensor(-0.6, dtype=dtype)
    dev = ops._pkt_gram_backward_emulate_device(grad, gs, gt, 1e-7, *wants, threads)
    cpu = ops.pkt_gram_backward(grad, gs, gt, 1e-7, *wants)
    cpu64 = ops.pkt_gram_backward(grad.double(), gs.double(), gt.double(), 1e-7, *wants)
    for a, c, c64 in zip(dev, cpu, cpu64):
        assert_matches_cpu(a, c, c64, dtype)


@pytest.mark.parametrize("threads", [1, 7, 32, 33, 128])
@pytest.mark.parametrize("b", [2, 3, 17, 40])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rkd_angle_device_algorithm_emulated_on_the_host(threads, b, dtype):
    # one block per pair (a, j) with CUB sums over k (four in the backward), the G_jk part one thread per
    # entry (the CPU kernel runs one task per vertex a)
    gs, gt = feature_grams(b, dtype, duplicate=True)
    ops = torch.ops.kdops
    assert_matches_cpu(ops._rkd_angle_emulate_device(gs, gt, threads), ops.rkd_angle(gs, gt),
                       ops.rkd_angle(gs.double(), gt.double()), dtype)
    grad = torch.tensor(2.5, dtype=dtype)
    dev = ops._rkd_angle_backward_emulate_device(grad, gs, gt, True, True, threads)
    cpu = ops.rkd_angle_backward(grad, gs, gt, True, True)
    cpu64 = ops.rkd_angle_backward(grad.double(), gs.double(), gt.double(), True, True)
    for a, c, c64 in zip(dev, cpu, cpu64):
        assert_matches_cpu(a, c, c64, dtype)


@pytest.mark.parametrize("op,args", [
    ("_fkd_gram_emulate_device", (True, 0.0, 2)),
    ("_pkt_gram_emulate_device", (1e-7,)),
    ("_rkd_angle_emulate_device", ()),
])
def test_emulations_reject_bad_threads(op, args):
    gs, gt = feature_grams(4, torch.float64)
    with pytest.raises(RuntimeError, match="threads must be >= 1"):
        getattr(torch.ops.kdops, op)(gs, gt, *args, 0)
