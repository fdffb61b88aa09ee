"""KD-family benchmark: kdops vs the eager reference vs torch.compile(reference), forward and
forward+backward (student gradient), fp32 and bf16, with one torch.exp pass over both inputs as the floor. On
CUDA, where the liger-kernel package is installed, also Liger-Kernel's Triton KL divergence (`liger`: its
LigerKLDIVLoss on the tempered log-softmaxes, the way its users compute Hinton KD); it has no CPU kernels.

    make bench                                   # all benchmarks
    pytest benchmarks/bench_kd.py --benchmark-only --benchmark-json=run.json && python -m benchmarks.report run.json

Each kdops benchmark first checks kdops against the reference (loss and student gradient) and records the
peak memory of one call in extra_info["peak_mib"] (see benchmarks/common.py for how it is measured).
"""

import pytest
import torch

import kdops  # noqa: F401
from benchmarks.common import DEVICES, compiled, dtypes, forward_backward, modes, run, shape_id, sizes
from kdops import functional as F
from kdops import reference as R

SHAPES = sizes([(4096, 1000), (1024, 32000), (256, 100)], quick=[(64, 100), (16, 3000)])
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEMPERATURE = 4.0  # kd_loss's default, with the T^2 scale


def liger_kd_loss():
    from liger_kernel.transformers import LigerKLDIVLoss

    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def loss(s, t):  # T^2 * KL(p_t || p_s) over the batch, as kd_loss
        return kl(torch.log_softmax(s / TEMPERATURE, -1), torch.log_softmax(t / TEMPERATURE, -1)) * TEMPERATURE ** 2

    return loss


def liger_missing(device):
    """Why the Liger provider cannot run here, or None."""
    if device != "cuda":
        return "Liger-Kernel has Triton kernels for CUDA only"
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return "liger-kernel is not installed"
    return None


PROVIDERS = {"kdops": lambda: F.kd_loss, "eager": lambda: R.kd_loss, "compiled": lambda: compiled(R.kd_loss),
             "liger": liger_kd_loss}


def make_inputs(shape, dtype, device):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype)
    t = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype)
    return s, t


def check_against_reference(s, t, dtype, loss_fn=F.kd_loss):
    a = s.detach().double().requires_grad_()
    ref = R.kd_loss(a, t.double())
    ours_s = s.detach().requires_grad_()
    ours = loss_fn(ours_s, t)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(ours.double(), ref.detach(), **tol)
    torch.testing.assert_close(torch.autograd.grad(ours, ours_s)[0].double(), torch.autograd.grad(ref, a)[0],
                               rtol=tol["rtol"], atol=tol["atol"] / s.shape[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", modes(["fwd", "fwd+bwd"]))
@pytest.mark.parametrize("dtype", dtypes(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_kd_loss(benchmark, provider, shape, dtype, mode, device):
    if provider == "liger" and liger_missing(device):
        pytest.skip(liger_missing(device))
    s, t = make_inputs(shape, DTYPES[dtype], device)
    loss_fn = PROVIDERS[provider]()
    if provider in ("kdops", "liger"):
        check_against_reference(s, t, DTYPES[dtype], loss_fn)
    if mode == "fwd":
        fn = lambda: loss_fn(s, t)  # noqa: E731
    else:
        s.requires_grad_()
        fn = forward_backward(loss_fn, (s, t), wrt=[0])
    run(benchmark, "kd", fn, device, shape=shape_id(shape), dtype=dtype, mode=mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtypes(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_floor_exp_both_inputs(benchmark, shape, dtype, device):
    """The floor: one torch.exp pass over student and teacher logits."""
    s, t = make_inputs(shape, DTYPES[dtype], device)
    run(benchmark, "kd", lambda: (torch.exp(s), torch.exp(t)), device, shape=shape_id(shape), dtype=dtype,
        mode="floor")
