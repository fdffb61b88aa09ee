"""The CUDA row kernel of the Sinkhorn solver, emulated on the host (kdops::_sinkhorn_solve_emulate_device),
against the CPU kernel: the kernel's block algorithm (each thread's strided max and shifted sum of
exponentials, CUB-order block reductions, the finish) runs in every CPU test run, from the same functions of
kdops/ot_math.h that csrc/cuda/sinkhorn.cu compiles. The CPU kernel computes the same update differently (one
pass shifted by the previous potential), so agreement to rounding checks the device algorithm's result."""

import math

import pytest
import torch

import kdops  # noqa: F401


def problem(b, n, m, d, dtype, seed=0, zero_weights=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64).to(dtype)
    y = (torch.randn(b, m, d, generator=g, dtype=torch.float64) * 1.5 + 0.3).to(dtype)
    loga = torch.full((b, n), -math.log(n), dtype=dtype)
    logb = torch.log_softmax(torch.randn(b, m, generator=g, dtype=torch.float64), -1).to(dtype)
    if zero_weights and m > 2:  # points of weight 0: their LSE arguments are -inf
        logb[:, 1] = float("-inf")
        logb = logb - torch.logsumexp(logb, -1, keepdim=True)
    return x, y, loga, logb


@pytest.mark.parametrize("threads", [1, 7, 32, 33, 256])
@pytest.mark.parametrize("n,m", [(1, 1), (5, 3), (40, 300), (300, 41)])
@pytest.mark.parametrize("p", [2.0, 1.0, 1.5])
@pytest.mark.parametrize("online", [False, True])
def test_device_row_algorithm_emulated_on_the_host(threads, n, m, p, online):
    dtype = torch.float64
    x, y, loga, logb = problem(2, n, m, 3, dtype, zero_weights=True)
    # no early stop: both run exactly max_iter iterations, so the potentials compare update for update
    args = (x, y, loga, logb, 0.1, p, 25, 0.0, 0.0, 5, online, 17)
    f_dev, g_dev, it_dev = torch.ops.kdops._sinkhorn_solve_emulate_device(*args, threads)
    f_cpu, g_cpu, it_cpu = torch.ops.kdops.sinkhorn_solve(*args)
    assert torch.equal(it_dev, it_cpu)
    torch.testing.assert_close(f_dev, f_cpu, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g_dev, g_cpu, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("threads", [7, 256])
def test_emulated_device_algorithm_float32_scaling_and_tolerance(threads):
    # eps-scaling (the first steps at a large eps) and the convergence check, in float32, where the shifts
    # of the two algorithms differ most; the emulation's potentials stay within float32 rounding
    x, y, loga, logb = problem(3, 64, 50, 4, torch.float32, seed=1)
    args = (x, y, loga, logb, 0.05, 2.0, 200, 1e-5, 0.7, 4, False, 32)
    f_dev, g_dev, it_dev = torch.ops.kdops._sinkhorn_solve_emulate_device(*args, threads)
    f_cpu, g_cpu, it_cpu = torch.ops.kdops.sinkhorn_solve(*args)
    assert (it_dev - it_cpu).abs().max().item() <= 4  # one check interval either way at the tolerance
    torch.testing.assert_close(f_dev, f_cpu, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(g_dev, g_cpu, rtol=1e-4, atol=2e-4)


def test_emulated_rows_of_zero_weight_pass_the_maximum_on():
    # every column of weight 0: the block maximum is -inf, the sum pass is skipped, the potential is +inf,
    # as on the CPU kernel
    x, y, loga, logb = problem(1, 4, 3, 2, torch.float64)
    logb = torch.full_like(logb, float("-inf"))
    args = (x, y, loga, logb, 0.5, 2.0, 1, 0.0, 0.0, 1, False, 8)
    f_dev, _, _ = torch.ops.kdops._sinkhorn_solve_emulate_device(*args, 32)
    f_cpu, _, _ = torch.ops.kdops.sinkhorn_solve(*args)
    assert torch.equal(torch.isposinf(f_dev), torch.isposinf(f_cpu)) and bool(torch.isposinf(f_cpu).all())
