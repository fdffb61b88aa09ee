"""Helpers shared by the families' fake kernels and autograd registrations."""

import torch


def acc_dtype(dtype):
    """The dtype kdops kernels accumulate (and return reductions) in: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
