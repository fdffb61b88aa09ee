"""Knowledge-distillation losses, functional form. Student first, teacher second, everywhere.

Logits are (..., C): every leading index is a row (a sample, or a token of a sequence model), C classes.
Any float dtype (fp32, fp64, fp16, bf16) is accepted; the kernels accumulate in fp32 (fp64 for fp64).
Gradients flow to the student and, when it requires grad, to the teacher (mutual / online distillation).

Reductions over rows: ``batchmean`` (sum / rows, the default), ``sum``, ``mean`` (sum / (rows * C)),
``none`` (one value per row, shape ``logits.shape[:-1]``). For inputs with more than two dims ``batchmean``
divides by all rows (e.g. batch * sequence length), not by ``size(0)`` as ``F.kl_div`` does.

Row masking for sequence models: pass ``target`` (int64, shape ``logits.shape[:-1]``); rows whose target
equals ``ignore_index`` contribute nothing, and ``batchmean`` / ``mean`` divide by the kept rows only (a
batch whose rows are all ignored gives 0).
"""

import math
import numbers

import torch

from kdops import _ops  # noqa: F401  (autograd / fake registrations)

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _check_same(name, a_name, a, b_name, b, layout):
    """a and b must agree in shape, dtype and device; `layout` describes the expected shape."""
    if a.shape != b.shape:
        raise ValueError("%s: %s and %s must have the same shape %s, got %s and %s"
                         % (name, a_name, b_name, layout, tuple(a.shape), tuple(b.shape)))
    if a.dtype != b.dtype:
        raise ValueError("%s: %s and %s must have the same dtype, got %s and %s" % (name, a_name, b_name, a.dtype, b.dtype))
    if a.device != b.device:
        raise ValueError("%s: %s and %s must be on the same device, got %s and %s"
                         % (name, a_name, b_name, a.device, b.device))


def _check_logits(name, student_logits, teacher_logits):
    for arg, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise ValueError("%s: %s must be a torch.Tensor, got %s" % (name, arg, type(x).__name__))
        if not x.is_floating_point():
            raise ValueError("%s: %s must be a floating-point tensor (float32/float64/float16/bfloat16), got %s"
                             % (name, arg, x.dtype))
        if x.dim() < 1:
            raise ValueError("%s: %s must have shape (..., C), got a 0-dim tensor" % (name, arg))
    _check_same(name, "student_logits", student_logits, "teacher_logits", teacher_logits, "(..., C)")
    if student_logits.shape[-1] == 0:
        raise ValueError("%s: student_logits must have at least one class (C >= 1), got shape %s"
                         % (name, tuple(student_logits.shape)))
    if student_logits.numel() == 0:
        raise ValueError("%s: student_logits is an empty batch (shape %s); at least one row is needed"
                         % (name, tuple(student_logits.shape)))


def _check_positive(name, arg, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0) or math.isinf(value):
        raise ValueError("%s: %s must be a finite number > 0, got %r" % (name, arg, value))


def _check_target(name, target, logits, required):
    if target is None:
        if required:
            raise ValueError("%s: target is required: int64 class indices of shape %s"
                             % (name, tuple(logits.shape[:-1])))
        return None
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.is_complex() \
            or target.dtype == torch.bool:
        raise ValueError("%s: target must be an integer tensor of class indices, got %s"
                         % (name, getattr(target, "dtype", type(target).__name__)))
    if target.shape != logits.shape[:-1]:
        raise ValueError("%s: target must have shape %s (the logits without their last dim), got %s"
                         % (name, tuple(logits.shape[:-1]), tuple(target.shape)))
    if target.device != logits.device:
        raise ValueError("%s: target must be on the device of the logits (%s), got %s"
                         % (name, logits.device, target.device))
    return target.long()


def _kd_div(name, student_logits, teacher_logits, divergence, temperature, reduction, scale, target,
            ignore_index, alpha=0.0, beta=0.0, target_required=False):
    _check_logits(name, student_logits, teacher_logits)
    _check_positive(name, "temperature", temperature)
    if reduction not in REDUCTIONS:
        raise ValueError("%s: reduction must be one of %s, got %r" % (name, REDUCTIONS, reduction))
    target = _check_target(name, target, student_logits, target_required)
    num_classes = student_logits.shape[-1]
    rows = student_logits.numel() // num_classes
    # Constant factors go into the kernel, which saves autograd nodes (a quarter of the fixed cost at small
    # sizes). A 1/rows factor is left out for fp16, whose scaled per-row values could leave its normal range.
    op_scale = float(scale)
    folded = target is None and reduction in ("batchmean", "mean") and student_logits.dtype != torch.float16
    if folded:
        op_scale /= rows if reduction == "batchmean" else rows * num_classes
    per_row, _ = torch.ops.kdops.kd_div(student_logits, teacher_logits, target, float(temperature), divergence,
                                        float(alpha), float(beta), int(ignore_index), op_scale)
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum" or folded:
        return total
    if target is None:
        count = rows
    else:
        count = (target != ignore_index).sum().clamp_min(1).to(total.dtype)
    return total / count if reduction == "batchmean" else total / (count * num_classes)


def kd_loss(student_logits, teacher_logits, temperature=4.0, reduction="batchmean", scale_t2=True, target=None,
            ignore_index=-100):
    """Hinton KD: T^2 * KL(p_t || p_s) with p = softmax(logits / T), per row, then reduced.

    ``scale_t2=False`` drops the T^2 factor. See the module docstring for rows, reductions and masking.
    """
    scale = float(temperature) ** 2 if scale_t2 and isinstance(temperature, numbers.Real) else 1.0
    return _kd_div("kd_loss", student_logits, teacher_logits, "kl", temperature, reduction, scale, target,
                   ignore_index)


def reverse_kd_loss(student_logits, teacher_logits, temperature=4.0, reduction="batchmean", scale_t2=True,
                    target=None, ignore_index=-100):
    """Reverse KL: T^2 * KL(p_s || p_t) (mode-seeking), same arguments as :func:`kd_loss`."""
    scale = float(temperature) ** 2 if scale_t2 and isinstance(temperature, numbers.Real) else 1.0
    return _kd_div("reverse_kd_loss", student_logits, teacher_logits, "reverse_kl", temperature, reduction, scale,
                   target, ignore_index)


def jsd_loss(student_logits, teacher_logits, temperature=4.0, beta=0.5, reduction="batchmean", scale_t2=True,
             target=None, ignore_index=-100):
    """Generalised Jensen-Shannon divergence: beta * KL(p_t || m) + (1 - beta) * KL(p_s || m),
    m = beta * p_t + (1 - beta) * p_s, beta in [0, 1] (times T^2 unless ``scale_t2=False``)."""
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not (0.0 <= beta <= 1.0):
        raise ValueError("jsd_loss: beta must be a number in [0, 1], got %r" % (beta,))
    scale = float(temperature) ** 2 if scale_t2 and isinstance(temperature, numbers.Real) else 1.0
    return _kd_div("jsd_loss", student_logits, teacher_logits, "jsd", temperature, reduction, scale, target,
                   ignore_index, beta=beta)


def dkd_loss(student_logits, teacher_logits, target, alpha=1.0, beta=8.0, temperature=4.0, reduction="batchmean",
             ignore_index=-100):
    """Decoupled KD (Zhao et al., mdistiller): alpha * TCKD + beta * NCKD, each scaled by T^2.

    TCKD is the KL between the binary distributions [p_y, 1 - p_y] of teacher and student; NCKD the KL
    between the distributions over the non-target classes. The target class is left out of NCKD exactly,
    which equals mdistiller's ``softmax(z / T - 1000 * onehot(y))`` wherever that mask is effective, and
    stays right for logits large enough to defeat it. With C <= 2, NCKD is 0. ``target`` values must lie
    in [0, C) or equal ``ignore_index`` (a RuntimeError otherwise).
    """
    for arg, v in (("alpha", alpha), ("beta", beta)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError("dkd_loss: %s must be a finite number, got %r" % (arg, v))
    scale = float(temperature) ** 2 if isinstance(temperature, numbers.Real) else 1.0
    return _kd_div("dkd_loss", student_logits, teacher_logits, "dkd", temperature, reduction, scale, target,
                   ignore_index, alpha=alpha, beta=beta, target_required=True)


# ---- feature-map losses (Overhaul of feature distillation, FitNet, projector + LogSum) ----

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
    _check_same(name, "student", student, "teacher", teacher, "(b, C, *spatial)")


def _check_margin(name, margin, x):
    if not isinstance(margin, torch.Tensor) or not margin.is_floating_point():
        raise ValueError("%s: margin must be a floating-point tensor of shape (C,), got %s"
                         % (name, getattr(margin, "dtype", type(margin).__name__)))
    if margin.shape != (x.shape[1],):
        raise ValueError("%s: margin must have shape (C,) = (%d,), got %s" % (name, x.shape[1], tuple(margin.shape)))
    if margin.device != x.device:
        raise ValueError("%s: margin must be on %s, got %s" % (name, x.device, margin.device))


def margin_relu(teacher, margin):
    """The Overhaul's teacher transform max(t, m_c), with per-channel margins m (C,) on (b, C, *spatial)."""
    if not isinstance(teacher, torch.Tensor) or not teacher.is_floating_point() or teacher.dim() < 2:
        raise ValueError("margin_relu: teacher must be a floating-point tensor (b, C, *spatial), got %s"
                         % (getattr(teacher, "shape", type(teacher).__name__),))
    _check_margin("margin_relu", margin, teacher)
    return torch.ops.kdops.margin_relu(teacher, margin)


def partial_l2_loss(student, teacher, margin, reduction="sum"):
    """Overhaul partial L2 (Heo et al.): sum of (s - t^)^2 over positions where s > t^ or t^ > 0, with
    t^ = max(t, m_c) the margin ReLU of the teacher. Fused: neither t^ nor the mask is materialised.

    student, teacher: pre-ReLU maps (b, C, *spatial) of equal shape (map the student with a connector first);
    margin: (C,), see :func:`kdops.overhaul.margins_from_batchnorm`. reduction: ``sum`` (the paper's; the
    training loop divides by b and 1000), ``batchmean`` (sum / b) or ``mean`` (sum / numel). The result is in
    fp32 for fp16 / bf16 maps (sums of squares overflow fp16), fp64 for fp64.

    On CPU in eager mode, when a gradient is wanted, the gradients are computed in the forward's pass and held
    until the backward (one map-sized buffer per input that requires grad); a loss backpropagated with
    gradient 1 then costs one pass over the maps in all.
    """
    _check_feature_pair("partial_l2_loss", student, teacher)
    _check_margin("partial_l2_loss", margin, student)
    if reduction not in FEATURE_REDUCTIONS:
        raise ValueError("partial_l2_loss: reduction must be one of %s, got %r" % (FEATURE_REDUCTIONS, reduction))
    divisor = {"sum": 1, "batchmean": student.shape[0], "mean": student.numel()}[reduction]
    if _ops.use_fused_gradient(student, teacher):
        return _ops.PartialL2WithGrad.apply(student, teacher, margin, divisor)
    total = torch.ops.kdops.partial_l2(student, teacher, margin).sum()
    return total if reduction == "sum" else total / divisor


def hint_loss(student_regressed, teacher):
    """FitNet hint: mean squared error between the regressed student feature and the teacher feature."""
    _check_feature_pair("hint_loss", student_regressed, teacher)
    return torch.nn.functional.mse_loss(student_regressed, teacher)


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
        _check_same("logsum_loss", "a", a, "b", b, "(any, matching)")
    else:
        a, b = delta_or_pair, None
        if not isinstance(a, torch.Tensor) or not a.is_floating_point():
            raise ValueError("logsum_loss: delta must be a floating-point tensor")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (alpha > 0) or math.isinf(alpha):
        raise ValueError("logsum_loss: alpha must be a finite number > 0, got %r" % (alpha,))
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (eps >= 0) or math.isinf(eps):
        raise ValueError("logsum_loss: eps must be a finite number >= 0, got %r" % (eps,))
    if a.numel() == 0:
        raise ValueError("logsum_loss: the input is empty")
    loss, _ = torch.ops.kdops.logsum(a, b, float(alpha), float(eps))
    return loss
from kdops.distribution import (  # noqa: E402,F401  (distribution matching)
    class_conditional_wasserstein, gaussian_kl, gaussian_wasserstein, joint_wasserstein, mmd, wasserstein_exact)
from kdops.ot import sinkhorn  # noqa: E402,F401  (entropic optimal transport)
from kdops.relational import (  # noqa: E402,F401  (relational losses)
    angle_tensor, at_loss, cc_loss, fkd_loss, fsp_loss, fsp_matrix, gram, nst_loss, pairwise_distance, pkt_loss,
    rkd_angle_loss, rkd_distance_loss, rkd_loss, sp_loss)
