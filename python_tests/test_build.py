"""The package surface of the build: version, CUDA flag, and the error for a build of another torch."""

import re
from pathlib import Path

import pytest
import torch

import kdops
from kdops import _extension


def test_version_comes_from_one_place():
    text = (Path(kdops.__file__).parent / "version.py").read_text()
    assert kdops.__version__ == re.search(r'__version__ = "([^"]+)"', text).group(1)


def test_cuda_built_reports_the_compiled_kernels():
    assert kdops.cuda_built() is bool(kdops._C.with_cuda)
    info = kdops.build_info()
    assert info["torch"] == torch.__version__
    # CUDA kernels register a CUDA implementation with the dispatcher exactly when they were built.
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("kdops::kd_div", "CUDA")
    assert has_cuda_kernel == kdops.cuda_built()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("kdops::kd_div", "CPU")


def test_mismatched_torch_gives_one_readable_error(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    with pytest.raises(ImportError, match=r"built against torch .* but torch 0\.0\.0-other is running.*Rebuild"):
        _extension.load()


def test_import_needs_no_pot_and_exact_w2_names_it():
    # POT is only needed by the exact Wasserstein losses: kdops imports without it, and those losses say what to
    # install instead of failing at import.
    code = """
import sys
sys.modules["ot"] = None  # an `import ot` now raises ImportError
import torch, kdops
x = torch.randn(8, 3)
print(float(kdops.functional.mmd(x, x + 1, kernel="linear")))
try:
    kdops.functional.wasserstein_exact(x, x + 1)
except ImportError as e:
    print("ImportError:", e)
"""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert abs(float(out[0]) - 3.0) < 1e-5
    assert out[1].startswith("ImportError: kdops: the exact Wasserstein losses") and "pip install pot" in out[1]
