"""Feature-map losses: the Overhaul of feature distillation (margin ReLU + partial L2), FitNet hints and the
projector recipe's LogSum. Student first, teacher second. Student and teacher maps of different float dtypes are
promoted, and every loss gives the same value inside and outside autocast (:mod:`kdops.functional._dtypes`)."""

import numbers

import torch

from kdops import _ops
from kdops.functional import _dtypes
from kdops.functional._checks import check_same, finite

FEATURE_REDUCTIONS = ("sum", "mean", "batchmean")


def _check_feature_pair(name, student, teacher):
    for arg, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError("%s: %s must be a floating-point tensor, got %s"
                             % (name, arg, getattr(x, "dtype", type(x).__name__)))
    if student.dim() < 2:
        raise ValueError("%s: feature maps must have shape (b, C, *spatial), got %s" % (name, tuple(student.shape)))
    if student.shape[1] != teacher.shape[1] and student.dim() == teacher.dim():
        raise ValueError("%s: student has %d channels but teacher has %d; map the student to the teacher's channels "
                         "first (a connector, e.g. kdops.nn.OFDLoss)" % (name, student.shape[1], teacher.shape[1]))
    check_same(name, "student", student, "teacher", teacher, "(b, C, *spatial)")


def _check_margin(name, margin, x):
    """The per-channel margin as (C,): given as (C,), or in any shape that broadcasts against the map as one value
    per channel, such as the released Overhaul code's (1, C, 1, 1) buffer."""
    if not isinstance(margin, torch.Tensor) or not margin.is_floating_point():
        raise ValueError("%s: margin must be a floating-point tensor of shape (C,), got %s"
                         % (name, getattr(margin, "dtype", type(margin).__name__)))
    c = x.shape[1]
    padded = (1,) * (x.dim() - margin.dim()) + tuple(margin.shape)
    per_channel = margin.dim() <= x.dim() and padded[1] == c and all(n == 1 for i, n in enumerate(padded) if i != 1)
    if margin.shape != (c,) and not (margin.dim() > 1 and per_channel):
        raise ValueError("%s: margin must have shape (C,) = (%d,) or broadcast per channel, e.g. (1, %d, 1, 1); "
                         "got %s" % (name, c, c, tuple(margin.shape)))
    if margin.device != x.device:
        raise ValueError("%s: margin must be on %s, got %s" % (name, x.device, margin.device))
    return margin.reshape(c)


@_dtypes.loss
def margin_relu(teacher, margin):
    """The Overhaul's teacher transform max(t, m_c), with per-channel margins m (C,) on (b, C, *spatial)."""
    if not isinstance(teacher, torch.Tensor) or not teacher.is_floating_point() or teacher.dim() < 2:
        raise ValueError("margin_relu: teacher must be a floating-point tensor (b, C, *spatial), got %s"
                         % (getattr(teacher, "shape", type(teacher).__name__),))
    margin = _check_margin("margin_relu", margin, teacher)
    return torch.ops.kdops.margin_relu(teacher, margin)


@_dtypes.loss
def partial_l2_loss(student, teacher, margin, reduction="sum"):
    """Overhaul partial L2 (Heo et al.): sum of (s - t^)^2 over positions where s > t^ or t^ > 0, with
    t^ = max(t, m_c) the margin ReLU of the teacher. Fused: neither t^ nor the mask is materialised.

    student, teacher: pre-ReLU maps (b, C, *spatial) of equal shape (map the student with a connector first);
    margin: (C,) or (1, C, 1, 1), see :func:`kdops.nn.margins_from_batchnorm`. reduction: ``sum`` (the paper's; the
    training loop divides by b and 1000), ``batchmean`` (sum / b) or ``mean`` (sum / numel). The result is in
    fp32 for fp16 / bf16 maps (sums of squares overflow fp16), fp64 for fp64.

    On CPU in eager mode, when a gradient is wanted, the gradients are computed in the forward's pass and held
    until the backward (one map-sized buffer per input that requires grad); a loss backpropagated with
    gradient 1 then costs one pass over the maps in all.
    """
    _check_feature_pair("partial_l2_loss", student, teacher)
    margin = _check_margin("partial_l2_loss", margin, student)
    student, teacher = _dtypes.promote(student, teacher)
    if reduction not in FEATURE_REDUCTIONS:
        raise ValueError("partial_l2_loss: reduction must be one of %s, got %r" % (FEATURE_REDUCTIONS, reduction))
    divisor = {"sum": 1, "batchmean": student.shape[0], "mean": student.numel()}[reduction]
    if _ops.feature.use_fused_gradient(student, teacher):
        return _ops.feature.PartialL2WithGrad.apply(student, teacher, margin, divisor)
    total = torch.ops.kdops.partial_l2(student, teacher, margin).sum()
    return total if reduction == "sum" else total / divisor


@_dtypes.loss
def hint_loss(student_regressed, teacher):
    """FitNet hint: mean squared error between the regressed student feature and the teacher feature."""
    _check_feature_pair("hint_loss", student_regressed, teacher)
    return torch.nn.functional.mse_loss(*_dtypes.promote(student_regressed, teacher))


@_dtypes.loss
def logsum_loss(delta_or_pair, alpha=4.0, eps=0.0):
    """LogSum (Miles & Mikolajczyk): log(sum |delta|^alpha + eps) over all elements, the power and the sum in
    fp32 (fp64 for fp64) so fp16 / bf16 inputs cannot overflow. Pass delta, or a pair (a, b) for delta = a - b
    (fused: the difference is never stored). Returns a 0-dim fp32 tensor (fp64 for fp64)."""
    if isinstance(delta_or_pair, (tuple, list)):
        if len(delta_or_pair) != 2:
            raise ValueError("logsum_loss: a pair must have two tensors, got %d" % len(delta_or_pair))
        a, b = delta_or_pair
        for arg, x in (("a", a), ("b", b)):
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise ValueError("logsum_loss: %s must be a floating-point tensor" % arg)
        check_same("logsum_loss", "a", a, "b", b, "(any, matching)")
        a, b = _dtypes.promote(a, b)
    else:
        a, b = delta_or_pair, None
        if not isinstance(a, torch.Tensor) or not a.is_floating_point():
            raise ValueError("logsum_loss: delta must be a floating-point tensor")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (alpha > 0) or not finite(alpha):
        raise ValueError("logsum_loss: alpha must be a finite number > 0, got %r" % (alpha,))
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (eps >= 0) or not finite(eps):
        raise ValueError("logsum_loss: eps must be a finite number >= 0, got %r" % (eps,))
    if a.numel() == 0:
        raise ValueError("logsum_loss: the input is empty")
    loss, _ = torch.ops.kdops.logsum(a, b, float(alpha), float(eps))
    return loss
