"""Helpers shared by the families' fake kernels and autograd registrations."""

import torch


def acc_dtype(dtype):
    """The dtype kdops kernels accumulate (and return reductions) in: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def import_pot():
    """POT (the ``ot`` package), imported when an exact-OT loss first runs, so that ``import kdops`` does not
    need it: only the exact Wasserstein losses use its network simplex."""
    try:
        import ot
    except ImportError as e:
        raise ImportError("kdops: the exact Wasserstein losses (wasserstein_exact, class_conditional_wasserstein "
                          "with metric='exact', joint_wasserstein) need POT: pip install pot") from e
    return ot
