"""Feature-map losses: the Overhaul's partial L2 and the projector recipe's LogSum, kdops vs the eager
reference vs torch.compile(reference), forward and forward+backward (student gradient), fp32 and bf16.
Floors: one clone() of the student map (partial L2), one clone() of both inputs (LogSum). Partial L2's
fwd+bwd rows also time one torch.add(student, teacher), the least traffic any forward + backward has.
See bench_kd.py for how to run and report."""

import pytest
import torch

import kdops  # noqa: F401
from benchmarks.common import DEVICES, compiled, dtypes, forward_backward, modes, run, shape_id, sizes
from kdops import functional as F
from kdops import reference as R

PL2_SHAPES = sizes([(128, 256, 8, 8), (64, 512, 16, 16), (256, 64, 32, 32)], quick=[(4, 16, 4, 4)],
                   headline=[(64, 512, 16, 16), (128, 256, 8, 8)])
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PL2_PROVIDERS = {"kdops": lambda: F.partial_l2_loss, "eager": lambda: R.partial_l2_loss,
             "compiled": lambda: compiled(R.partial_l2_loss)}


def make_inputs(shape, dtype, device):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    t = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    m = (-torch.rand(shape[1], generator=g)).to(device)
    return s, t, m


def check_against_reference(s, t, m):
    a = s.detach().double().requires_grad_()
    ref = R.partial_l2_loss(a, t.double(), m.double())
    ours_s = s.detach().requires_grad_()
    ours = F.partial_l2_loss(ours_s, t, m)
    rtol = 1e-5 if s.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=rtol, atol=0)
    torch.testing.assert_close(torch.autograd.grad(ours, ours_s)[0].double(), torch.autograd.grad(ref, a)[0],
                               rtol=rtol, atol=1e-6 if s.dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", modes(["fwd", "fwd+bwd"]))
@pytest.mark.parametrize("dtype", dtypes(DTYPES, headline=("fp32", "bf16")))
@pytest.mark.parametrize("shape", PL2_SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", list(PL2_PROVIDERS))
def test_partial_l2(benchmark, provider, shape, dtype, mode, device):
    s, t, m = make_inputs(shape, DTYPES[dtype], device)
    if provider == "kdops":
        check_against_reference(s, t, m)
    loss_fn = PL2_PROVIDERS[provider]()
    if mode == "fwd":
        fn = lambda: loss_fn(s, t, m)  # noqa: E731
    else:
        s.requires_grad_()
        fn = forward_backward(loss_fn, (s, t, m), wrt=[0])
    run(benchmark, "partial_l2", fn, device, shape=shape_id(shape), dtype=dtype, mode=mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtypes(DTYPES, headline=("fp32", "bf16")))
@pytest.mark.parametrize("shape", PL2_SHAPES, ids=shape_id)
def test_floor_clone(benchmark, shape, dtype, device):
    """The bandwidth floor: one clone() of the student map."""
    s, _, _ = make_inputs(shape, DTYPES[dtype], device)
    run(benchmark, "partial_l2", lambda: s.clone(), device, shape=shape_id(shape), dtype=dtype, mode="floor")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtypes(DTYPES, headline=("fp32", "bf16")))
@pytest.mark.parametrize("shape", PL2_SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", ["add"])
def test_three_stream_pass(benchmark, provider, shape, dtype, device):
    """What any partial L2 forward + backward must at least move: both maps read and one map-sized gradient
    written, here as one torch.add(student, teacher) with no autograd. Its column in the fwd+bwd rows shows how
    far kdops is from that bound; the clone floor reads one map and writes one, so 1.5x the floor is this pass."""
    s, t, _ = make_inputs(shape, DTYPES[dtype], device)
    run(benchmark, "partial_l2", lambda: torch.add(s, t), device, shape=shape_id(shape), dtype=dtype, mode="fwd+bwd")


LOGSUM_SHAPES = sizes([(256, 512), (256, 2048), (1024, 2048)], quick=[(8, 64)], headline=[(1024, 2048)])


def kdops_logsum(a, b):
    return F.logsum_loss((a, b), alpha=4.0)


def reference_logsum(a, b):
    return R.logsum_loss((a.float(), b.float()), alpha=4.0)  # in fp32: in bf16 the eager sum would overflow


LOGSUM_PROVIDERS = {"kdops": lambda: kdops_logsum, "eager": lambda: reference_logsum,
             "compiled": lambda: compiled(reference_logsum)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", modes(["fwd", "fwd+bwd"]))
@pytest.mark.parametrize("dtype", dtypes(DTYPES, headline=("fp32", "bf16")))
@pytest.mark.parametrize("shape", LOGSUM_SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", list(LOGSUM_PROVIDERS))
def test_logsum(benchmark, provider, shape, dtype, mode, device):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(shape, generator=g).to(device=device, dtype=DTYPES[dtype])
    b = torch.randn(shape, generator=g).to(device=device, dtype=DTYPES[dtype])
    if provider == "kdops":
        torch.testing.assert_close(kdops_logsum(a, b).double(), R.logsum_loss((a.double(), b.double())),
                                   rtol=1e-5, atol=1e-5)
    loss_fn = LOGSUM_PROVIDERS[provider]()
    if mode == "fwd":
        fn = lambda: loss_fn(a, b)  # noqa: E731
    else:
        a.requires_grad_()
        fn = forward_backward(loss_fn, (a, b), wrt=[0])
    run(benchmark, "logsum", fn, device, shape=shape_id(shape), dtype=dtype, mode=mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtypes(DTYPES, headline=("fp32", "bf16")))
@pytest.mark.parametrize("shape", LOGSUM_SHAPES, ids=shape_id)
def test_logsum_floor_clone(benchmark, shape, dtype, device):
    """The bandwidth floor: one clone() of each input."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(shape, generator=g).to(device=device, dtype=DTYPES[dtype])
    b = torch.randn(shape, generator=g).to(device=device, dtype=DTYPES[dtype])
    run(benchmark, "logsum", lambda: (a.clone(), b.clone()), device, shape=shape_id(shape), dtype=dtype, mode="floor")
