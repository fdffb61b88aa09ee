"""Shared pieces of the kdops benchmarks: devices, synchronised calls, peak memory, quick mode."""

import ctypes
import os
import re

import pytest
import torch

# KDOPS_BENCH_QUICK=1 (CI) runs every benchmark once on tiny sizes so the files cannot rot.
QUICK = os.environ.get("KDOPS_BENCH_QUICK", "") == "1"

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
