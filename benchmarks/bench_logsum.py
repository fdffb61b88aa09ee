"""Projector-recipe LogSum benchmark: kdops logsum_loss((z_s, z_t)) vs the eager reference
log(sum |z_s - z_t|^4), forward and forward+backward (gradient to z_s), fp32 and bf16.
See bench_kd.py for how to run and report."""

import pytest
import torch

import kdops  # noqa: F401
from benchmarks.common import DEVICES, QUICK, compiled, forward_backward, run, shape_id
from kdops import functional as F
from kdops import reference as R

SHAPES = [(8, 64)] if QUICK else [(256, 512), (256, 2048), (1024, 2048)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def kdops_logsum(a, b):
    return F.logsum_loss((a, b), alpha=4.0)


def reference_logsum(a, b):
    return R.logsum_loss((a.float(), b.float()), alpha=4.0)  # in fp32: in bf16 the eager sum would overflow


PROVIDERS = {"kdops": lambda: kdops_logsum, "eager": lambda: reference_logsum,
             "compiled": lambda: compiled(reference_logsum)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_logsum(benchmark, provider, shape, dtype, mode, device):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(shape, generator=g).to(device=device, dtype=DTYPES[dtype])
    b = torch.randn(shape, generator=g).to(device=device, dtype=DTYPES[dtype])
    if provider == "kdops":
        torch.testing.assert_close(kdops_logsum(a, b).double(), R.logsum_loss((a.double(), b.double())),
                                   rtol=1e-5, atol=1e-5)
    loss_fn = PROVIDERS[provider]()
    if mode == "fwd":
        fn = lambda: loss_fn(a, b)  # noqa: E731
    else:
        a.requires_grad_()
        fn = forward_backward(loss_fn, (a, b), wrt=[0])
    run(benchmark, "logsum", fn, device, shape=shape_id(shape), dtype=dtype, mode=mode)
