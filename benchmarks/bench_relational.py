"""Relational losses, forward+backward (gradient to the student), fp32: kdops vs the published-style eager
reference vs torch.compile(reference), with peak memory.

- batch relations (features (b, d)): rkd_angle, rkd_distance, sp, fkd, pkt, cc; floor: the GEMM x @ x.T.
  RKD angle's eager reference forms (b, b, d) differences and the b^3 angle tensor, so its eager and compiled
  runs stop at b = 256; kdops runs b = 512 too.
- feature-map relations: nst and fsp at b=64, C=256, 8x8 (and a 16x16 map), at on two map sizes; floor: one
  clone() of the student map.

    pytest benchmarks/bench_relational.py --benchmark-only --benchmark-json=run.json
    python -m benchmarks.report run.json
"""

import pytest
import torch

import kdops  # noqa: F401
from benchmarks.common import DEVICES, QUICK, compiled, forward_backward, run, sizes
from kdops import functional as F
from kdops import reference as R

BATCH = ["rkd_angle", "rkd_distance", "sp", "fkd", "pkt", "cc"]
# (b, d): b = 64, 128, 256, 512 at d = 512, and d = 128, 2048 at b = 256
SIZES = sizes([(64, 512), (128, 512), (256, 128), (256, 512), (256, 2048), (512, 512)], quick=[(16, 8)],
              headline=[(256, 512), (512, 512)])
EAGER_MAX_B = {"rkd_angle": 16 if QUICK else 256}
MAPS = {"nst": sizes([(64, 256, 8, 8), (32, 128, 16, 16)], quick=[(4, 8, 2, 2)], headline=[(64, 256, 8, 8)]),
        "fsp": sizes([(64, 256, 8, 8), (32, 128, 16, 16)], quick=[(4, 8, 2, 2)], headline=[(64, 256, 8, 8)]),
        "at": sizes([(128, 256, 8, 8), (64, 128, 32, 32)], quick=[(4, 8, 2, 2)], headline=[(64, 128, 32, 32)])}
PROVIDERS = ["kdops", "eager", "compiled", "floor"]


def shape_id(shape):
    return "x".join(map(str, shape))


def _fsp(fn):
    # one pair of layers per network: (map, map squared) as the two layers (equal HW)
    def loss(s, t):
        return fn([(s, s * s)], [(t, t * t)])
    loss.__name__ = "fsp_" + fn.__module__.rsplit(".", 1)[-1]
    return loss


def loss_fn(family, provider):
    if family == "fsp":
        return _fsp(F.fsp_loss if provider == "kdops" else R.fsp_loss)
    ref = getattr(R, family + "_loss")
    return {"kdops": getattr(F, family + "_loss"), "eager": ref, "compiled": compiled(ref)}[provider]


def check(family, s, t):
    ours = loss_fn(family, "kdops")
    ref = loss_fn(family, "eager")
    a = s.detach().requires_grad_()
    b = s.detach().double().requires_grad_()
    x, y = ours(a, t), ref(b, t.double())
    torch.testing.assert_close(x.double(), y.detach(), rtol=1e-4, atol=1e-7)
    gx, gy = torch.autograd.grad(x, a)[0], torch.autograd.grad(y, b)[0]
    torch.testing.assert_close(gx.double(), gy, rtol=1e-3, atol=1e-4 * gy.abs().max().item())


def bench(benchmark, family, provider, s, t, device, shape):
    if provider == "kdops":
        check(family, s, t)
    if provider == "floor":
        fn = (lambda: s @ s.T) if s.dim() == 2 else (lambda: s.clone())  # noqa: E731
    else:
        s.requires_grad_()
        fn = forward_backward(loss_fn(family, provider), (s, t), wrt=[0])
    run(benchmark, family, fn, device, shape=shape_id(shape), dtype="fp32", mode="fwd+bwd")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SIZES, ids=shape_id)
@pytest.mark.parametrize("family", BATCH)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_batch_relation(benchmark, provider, family, size, device):
    if provider in ("eager", "compiled") and size[0] > EAGER_MAX_B.get(family, size[0]):
        pytest.skip("the reference forms b^3 tensors: not run at this b")
    g = torch.Generator().manual_seed(0)
    b, d = size
    s = torch.randn(b, d, generator=g).to(device)
    t = torch.randn(b, d + d // 2, generator=g).to(device)  # the teacher is wider
    bench(benchmark, family, provider, s, t, device, size)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family, shape", [(f, s) for f, shapes in MAPS.items() for s in shapes],
                         ids=lambda v: v if isinstance(v, str) else shape_id(v))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_map_relation(benchmark, provider, family, shape, device):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(shape, generator=g).to(device)
    t = torch.randn(shape, generator=g).to(device)
    bench(benchmark, family, provider, s, t, device, shape)
