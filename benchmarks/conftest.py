import datetime
import os
import platform
import sys
from pathlib import Path

# `pytest benchmarks` from the repo root: make `import benchmarks.common` and `import kdops` resolve there.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pytest_benchmark_update_machine_info(config, machine_info):
    """What ran the benchmarks, stored in the JSON so a report made later describes this machine."""
    import torch

    import kdops

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine_info["kdops"] = {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": gpu,
        "build": kdops.build_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["pytest"] + sys.argv[1:]),
    }


def pytest_collection_modifyitems(items):
    """Marks the benchmarks that run on a CUDA device `cuda`, so that `pytest benchmarks -m cuda` selects them."""
    import pytest

    for item in items:
        spec = getattr(item, "callspec", None)
        if spec is not None and spec.params.get("device") == "cuda":
            item.add_marker(pytest.mark.cuda)
