"""Sinkhorn benchmark, forward+backward (gradient to the student cloud x), fp32, n = m, eps = 0.05 on
unit-norm features (cost |x - y|^2 / 2), 100 iterations for every provider:

- ``kdops`` / ``kdops-online``: kdops.functional.sinkhorn, tensorized and online backends, tol=0 (all 100
  iterations run), value="transport" so that it computes what POT returns;
- ``pot``: POT's ``ot.sinkhorn2(a, b, C, eps, method="sinkhorn_log", numItermax=100, stopThr=0)`` on torch
  tensors, C built from x by torch (POT's gradient is autograd through its iterations);
- ``geomloss``: ``SamplesLoss("sinkhorn", p=2, blur=eps**0.5, debias=False, backend="tensorized")`` with
  `scaling` chosen so that its eps-annealing schedule (from the clouds' diameter down to eps) is 100 steps long;
  it returns the entropic (dual) value, so its row reports the difference to kdops' entropic value;
- ``floor``: the GEMM x @ y.T alone.

extra_info["value_diff"] is |kdops - provider| on the value each provider computes (transport for POT,
entropic for GeomLoss), measured once before timing. The ``online-memory`` family runs the online backend
once at n = m = 16384 (3 iterations: memory does not depend on their number) to show its O(n + m) memory.

    pytest benchmarks/bench_ot.py --benchmark-only --benchmark-json=run.json
    python -m benchmarks.report run.json
"""

import math

import ot
import pytest
import torch
from geomloss import SamplesLoss

import kdops  # noqa: F401
from benchmarks.common import DEVICES, QUICK, peak_memory_mib, run, sizes
from kdops import functional as F

EPS, ITERS = 0.05, 100
# (n, d), n = m
SHAPES = sizes([(256, 128), (512, 256), (1024, 256), (1024, 2048), (4096, 256)], quick=[(32, 8)],
               headline=[(1024, 256)])
FWD_SHAPES = SHAPES[:1] if QUICK else [(1024, 256)]
PROVIDERS = ["kdops", "kdops-online", "pot", "geomloss", "floor"]


def shape_id(shape):
    return "%dx%d" % shape


def make_inputs(shape, device):
    g = torch.Generator().manual_seed(0)
    n, d = shape
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(device)
    y = torch.nn.functional.normalize(torch.randn(n, d, generator=g) + 0.2, dim=1).to(device)
    return x, y


def geomloss_scaling(x, y, steps=ITERS - 2):
    """The scaling that makes GeomLoss' schedule (diameter -> blur, one step per factor) `steps` long."""
    pts = torch.cat([x, y])
    diameter = (pts.max(0).values - pts.min(0).values).norm().item()
    return math.exp(-math.log(diameter / EPS ** 0.5) / steps)


def providers(x, y):
    n, m = x.shape[0], y.shape[0]
    a, b = torch.full((n,), 1.0 / n, device=x.device), torch.full((m,), 1.0 / m, device=x.device)
    geo = SamplesLoss("sinkhorn", p=2, blur=EPS ** 0.5, scaling=geomloss_scaling(x, y), debias=False,
                      backend="tensorized")

    def pot(xs, ys):
        cost = 0.5 * torch.cdist(xs, ys).pow(2)
        return ot.sinkhorn2(a, b, cost, EPS, method="sinkhorn_log", numItermax=ITERS, stopThr=0.0)

    return {
        "kdops": lambda xs, ys: F.sinkhorn(xs, ys, eps=EPS, max_iter=ITERS, tol=0, value="transport",
                                           backend="tensorized"),
        "kdops-online": lambda xs, ys: F.sinkhorn(xs, ys, eps=EPS, max_iter=ITERS, tol=0, value="transport",
                                                  backend="online"),
        "pot": pot,
        "geomloss": geo,
        "floor": lambda xs, ys: xs @ ys.T,
    }


def value_diff(provider, fns, x, y):
    with torch.no_grad():
        if provider == "geomloss":
            ours = F.sinkhorn(x, y, eps=EPS, max_iter=ITERS, tol=0)
        elif provider in ("pot", "kdops-online"):
            ours = fns["kdops"](x, y)
        else:
            return 0.0
        return abs(ours.item() - fns[provider](x, y).item())


def cases():
    for shape in SHAPES:
        yield pytest.param(shape, "fwd+bwd", id=shape_id(shape) + "-fwd+bwd")
    for shape in FWD_SHAPES:
        yield pytest.param(shape, "fwd", id=shape_id(shape) + "-fwd")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, mode", list(cases()))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_sinkhorn(benchmark, provider, shape, mode, device):
    x, y = make_inputs(shape, device)
    fns = providers(x, y)
    if provider == "kdops":
        # correctness first: the transport value against POT run to convergence in float64
        xd, yd = x.double(), y.double()
        n = x.shape[0]
        w = torch.full((n,), 1.0 / n, dtype=torch.float64, device=device)
        ref = ot.sinkhorn2(w, w, 0.5 * torch.cdist(xd, yd).pow(2), EPS, method="sinkhorn_log", numItermax=2000,
                           stopThr=1e-10)
        ours = F.sinkhorn(x, y, eps=EPS, max_iter=2000, tol=1e-7, value="transport")
        torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-6)
    benchmark.extra_info["value_diff"] = value_diff(provider, fns, x, y)
    fn = fns[provider]
    xs = x.clone().requires_grad_(provider != "floor" and mode == "fwd+bwd")
    if provider == "floor" or mode == "fwd":
        call = lambda: fn(xs, y)  # noqa: E731
    else:
        def call():
            return torch.autograd.grad(fn(xs, y), xs)
    run(benchmark, "sinkhorn", call, device, shape=shape_id(shape), dtype="fp32", mode=mode)


@pytest.mark.parametrize("device", DEVICES)
def test_online_memory_large(benchmark, device):
    """One fwd+bwd of the online backend at n = m = 16384, d = 128: peak memory stays O(n + m)."""
    n = 512 if QUICK else 16384
    x, y = make_inputs((n, 128), device)
    xs = x.clone().requires_grad_()

    def call():
        v = F.sinkhorn(xs, y, eps=EPS, max_iter=3, tol=0, backend="online")
        return torch.autograd.grad(v, xs)

    benchmark.extra_info["family"] = "sinkhorn-online-memory"
    benchmark.extra_info["provider"] = "kdops-online"
    benchmark.extra_info["params"] = {"shape": "%dx128" % n, "dtype": "fp32", "mode": "fwd+bwd, 3 iterations"}
    benchmark.extra_info["device"] = device
    benchmark.extra_info["peak_mib"] = round(peak_memory_mib(call, device), 1)
    benchmark.extra_info["n_by_m_fp32_mib"] = n * n * 4 / 2**20
    benchmark.pedantic(call, rounds=1, iterations=1)
