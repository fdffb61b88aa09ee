"""kdops: knowledge-distillation losses as fused C++/CUDA PyTorch ops.

Layers: ``torch.ops.kdops.*`` (the ops) -> ``kdops.functional`` (checked, typed losses) -> ``kdops.nn``
(drop-in modules). ``kdops.reference`` holds the pure-PyTorch definitions the ops are tested against.
"""

from kdops import _extension
from kdops.version import __version__

_C = _extension.load()

from kdops import _ops  # noqa: E402  (registers autograd and fake kernels)
from kdops import functional, nn, reference  # noqa: E402


def cuda_built() -> bool:
    """True when the CUDA kernels were compiled into this build (a GPU is not needed for that)."""
    return bool(_C.with_cuda)


def build_info() -> dict:
    """How the loaded extension was built."""
    return {
        "version": __version__,
        "torch": _C.torch_version,
        "cuda_built": cuda_built(),
        "cuda_version": _C.cuda_version or None,
    }


__all__ = ["__version__", "cuda_built", "build_info", "functional", "nn", "reference"]
