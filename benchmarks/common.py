"""Shared pieces of the kdops benchmarks: devices, synchronised calls, peak memory, quick mode."""

import ctypes
import os
import re

import pytest
import torch

# KDOPS_BENCH_QUICK=1 (CI) runs every benchmark once on tiny sizes so the files cannot rot.
QUICK = os.environ.get("KDOPS_BENCH_QUICK", "") == "1"
# KDOPS_BENCH_HEADLINE=1 (the GPU check, tools/gpu_check.py) runs the README's headline rows only: their
# shapes, forward + backward, fp32 (and the dtypes a headline row names), so that a short lease covers them.
HEADLINE = os.environ.get("KDOPS_BENCH_HEADLINE", "") == "1"


def sizes(full, quick, headline=None):
    """The shapes a benchmark runs: `quick` in quick mode, `headline` (default: all of `full`) in headline
    mode, `full` otherwise."""
    if QUICK:
        return quick
    if HEADLINE and headline is not None:
        return headline
    return full


def modes(full, headline=("fwd+bwd",)):
    """The modes (fwd, fwd+bwd) a benchmark runs; headline mode keeps forward + backward."""
    return [m for m in full if m in headline] if HEADLINE else list(full)


def dtypes(full, headline=("fp32",)):
    """The dtype names a benchmark runs; headline mode keeps fp32 unless a headline row names another."""
    return [d for d in full if d in headline] if HEADLINE else list(full)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def synchronized(fn, device):
    """fn followed by a device sync, so a timing covers the work and not just its launch."""
    if device == "cuda":
        def run():
            out = fn()
            torch.cuda.synchronize()
            return out
        return run
    return fn


def _status_kib(field):
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1))


def peak_memory_mib(fn, device):
    """Peak memory that one call of fn adds on top of what is live before it.

    CUDA: torch.cuda.max_memory_allocated (the caching allocator's peak). CPU: the process' peak resident
    set (VmHWM, reset through /proc/self/clear_refs) minus its resident set before the call, after
    malloc_trim has handed every free heap page back, so each page the call allocates counts when touched.
    fn is run once beforehand so one-time costs (compilation, lazy init) are not counted.
    """
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) / 1024.0


def shape_id(shape):
    return "x".join(map(str, shape))


_compiled = {}


def compiled(fn):
    """torch.compile(fn) (static shapes), one compiled object per reference function. Every shape / dtype / mode
    of a benchmark file is a recompile; past dynamo's default limit (8) the rest would silently run eager while
    reported as compiled, so the limit is raised."""
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 256)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


def cuda_event_median_ms(fn, rounds=20):
    """Median time of fn on the GPU between CUDA events (launch overhead on the host not included)."""
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def run(benchmark, family, fn, device, **params):
    """Times fn (synchronised on CUDA) after recording its peak memory; `family` and `params` name the
    benchmark group and are what benchmarks/report.py tabulates (with the test's `provider` parameter;
    ``mode="floor"`` or provider ``floor`` marks the family's floor). On CUDA the median between CUDA events
    is recorded too (extra_info["cuda_event_ms"]) and the report prefers it."""
    timed = synchronized(fn, device)
    benchmark.group = " ".join([family] + [str(v) for v in params.values()] + [device])
    benchmark.extra_info["family"] = family
    benchmark.extra_info["params"] = {k: str(v) for k, v in params.items()}
    benchmark.extra_info["device"] = device
    benchmark.extra_info["peak_mib"] = round(peak_memory_mib(timed, device), 1)
    benchmark.extra_info["memory_measure"] = "cuda_max_allocated" if device == "cuda" else "cpu_vmhwm_delta"
    if device == "cuda":
        benchmark.extra_info["cuda_event_ms"] = cuda_event_median_ms(fn)
    benchmark(timed)


def forward_backward(loss_fn, inputs, wrt):
    """A callable running loss_fn(*inputs) and its gradient w.r.t. inputs[i] for i in wrt."""
    def call():
        loss = loss_fn(*inputs)
        return torch.autograd.grad(loss, [inputs[i] for i in wrt])
    return call
