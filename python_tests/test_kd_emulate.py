"""The CUDA forward algorithm of kd_div, emulated on the host (kdops::_kd_div_emulate_device), against the
CPU kernel: the device-only math (kd::push, merges in a reduction tree) runs in every CPU test run."""

import pytest
import torch

import kdops  # noqa: F401
from test_kd import DIVERGENCE_OF, LOSSES, logits


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("threads", [1, 7, 32, 256])
@pytest.mark.parametrize("C", [1, 2, 5, 1000])
def test_device_algorithm_emulated_on_the_host(name, threads, C):
    # The CUDA forward folds each thread's strided share of a row with kd::push (one exp per element) and
    # merges the states in a block-reduction tree; this math runs nowhere else on a machine without a GPU.
    # The host emulation must agree with the CPU kernel, and its stats must drive the same backward.
    div = DIVERGENCE_OF[name]
    s, t = logits((6, C), "cpu"), logits((6, C), "cpu")
    y = torch.randint(0, C, (6,))
    y[3] = -100
    if C >= 5:
        s[1], t[1] = s[1] * 3000, t[1] * 3000          # logits of order 1e4
        s[2, 1:3] = t[2, 1:3] = float("-inf")           # masked classes
        y[2] = 0
        t[4, C // 2] = float("nan")
    target = y if name == "dkd" else y.clone()
    args = (2.0, div, 1.0, 0.3, -100)
    loss_dev, stats_dev = torch.ops.kdops._kd_div_emulate_device(s, t, target, *args, threads)
    loss_cpu, stats_cpu = torch.ops.kdops.kd_div(s, t, target, *args)
    torch.testing.assert_close(loss_dev, loss_cpu, rtol=2e-5, atol=1e-5, equal_nan=True)
    grad = torch.rand(6) + 0.5
    g_dev = torch.ops.kdops.kd_div_backward(grad, s, t, target, stats_dev, *args, True, True)
    g_cpu = torch.ops.kdops.kd_div_backward(grad, s, t, target, stats_cpu, *args, True, True)
    for a, b in zip(g_dev, g_cpu):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6, equal_nan=True)
