"""KD-family benchmark: kdops vs the eager reference vs torch.compile(reference), forward and
forward+backward, fp32 and bf16, with one torch.exp pass over both inputs as the floor.

    make bench                                   # all benchmarks
    pytest benchmarks/bench_kd.py --benchmark-only --benchmark-group-by=param:shape,param:dtype,param:mode

Each benchmark first checks kdops against the reference (loss and student gradient) and records the peak
memory of one call in extra_info["peak_mib"] (see benchmarks/common.py for how it is measured).
"""

import pytest
import torch

import kdops  # noqa: F401
from benchmarks.common import DEVICES, QUICK, peak_memory_mib, synchronized
from kdops import functional as F
from kdops import reference as R

SHAPES = [(64, 100), (16, 3000)] if QUICK else [(4096, 1000), (1024, 32000), (256, 100)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_compiled = {}


def compiled_reference(*args):
    if "kd" not in _compiled:
        _compiled["kd"] = torch.compile(R.kd_loss, dynamic=False)
    return _compiled["kd"](*args)


PROVIDERS = {
    "kdops": F.kd_loss,
    "eager": R.kd_loss,
    "compiled": compiled_reference,
}


def make_inputs(shape, dtype, device):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype)
    t = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype)
    return s, t


def step(fn, s, t, mode):
    if mode == "fwd":
        return lambda: fn(s, t)

    def fwd_bwd():
        loss = fn(s, t)
        return torch.autograd.grad(loss, s)

    return fwd_bwd


def check_against_reference(s, t, dtype):
    a = s.detach().float().requires_grad_()
    loss = F.kd_loss(s.detach().requires_grad_(), t)
    ref = R.kd_loss(a.double(), t.double())
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(loss.double(), ref, **tol)
    ours = step(F.kd_loss, s.detach().requires_grad_(), t, "fwd+bwd")()[0]
    theirs = torch.autograd.grad(ref, a)[0]
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=tol["rtol"], atol=tol["atol"] / s.shape[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_kd_loss(benchmark, provider, shape, dtype, mode, device):
    s, t = make_inputs(shape, DTYPES[dtype], device)
    if provider == "kdops":
        check_against_reference(s, t, DTYPES[dtype])
    s.requires_grad_(mode == "fwd+bwd")
    fn = synchronized(step(PROVIDERS[provider], s, t, mode), device)
    benchmark.group = "kd %s %s %s %s" % ("x".join(map(str, shape)), dtype, mode, device)
    benchmark.extra_info["peak_mib"] = round(peak_memory_mib(fn, device), 1)
    benchmark(fn)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_floor_exp_both_inputs(benchmark, shape, dtype, device):
    """The floor: one torch.exp pass over student and teacher logits."""
    s, t = make_inputs(shape, DTYPES[dtype], device)
    fn = synchronized(lambda: (torch.exp(s), torch.exp(t)), device)
    benchmark.group = "kd %s %s floor %s" % ("x".join(map(str, shape)), dtype, device)
    benchmark.extra_info["peak_mib"] = round(peak_memory_mib(fn, device), 1)
    benchmark(fn)
