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
