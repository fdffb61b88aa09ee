"""Knowledge-distillation losses, functional form. Student first, teacher second, everywhere.

Logits are (..., C): every leading index is a row (a sample, or a token of a sequence model), C classes.
Any float dtype (fp32, fp64, fp16, bf16) is accepted; the kernels accumulate in fp32 (fp64 for fp64). Student and
teacher of different dtypes are promoted, and the result is in the promoted dtype; under autocast the loss is
computed as outside it (the rules: :mod:`kdops.functional._dtypes`).
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
from kdops._ops.kd import KlWithGrad
from kdops.functional import _dtypes
from kdops.functional._checks import check_positive, check_same, finite

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _check_logits(name, student_logits, teacher_logits):
    for arg, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise ValueError("%s: %s must be a torch.Tensor, got %s" % (name, arg, type(x).__name__))
        if not x.is_floating_point():
            raise ValueError("%s: %s must be a floating-point tensor (float32/float64/float16/bfloat16), got %s"
                             % (name, arg, x.dtype))
        if x.dim() < 1:
            raise ValueError("%s: %s must have shape (..., C), got a 0-dim tensor" % (name, arg))
    check_same(name, "student_logits", student_logits, "teacher_logits", teacher_logits, "(..., C)")
    if student_logits.shape[-1] == 0:
        raise ValueError("%s: student_logits must have at least one class (C >= 1), got shape %s"
                         % (name, tuple(student_logits.shape)))
    if student_logits.numel() == 0:
        raise ValueError("%s: student_logits is an empty batch (shape %s); at least one row is needed"
                         % (name, tuple(student_logits.shape)))



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


def _forward_with_grad(divergence, student_logits, teacher_logits, plain_sum):
    """Whether the KL forward should also form the student gradient (kdops::kd_div_with_grad): on the CPU, in
    eager mode, for a student that will be differentiated and a teacher that will not. The backward then has no
    kernel to run when it only scales that gradient: always in fp32 / fp64, and in 16-bit dtypes where the loss is
    a plain sum of the rows' values (sum, or batchmean / mean without a target), whose gradient is the upstream
    one. Other 16-bit cases keep the separate backward kernel, which rounds once."""
    if divergence != "kl" or student_logits.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    if not student_logits.requires_grad or teacher_logits.requires_grad or torch.compiler.is_compiling():
        return False
    return student_logits.dtype in (torch.float32, torch.float64) or plain_sum


def _kd_div(name, student_logits, teacher_logits, divergence, temperature, reduction, scale, target,
            ignore_index, alpha=0.0, beta=0.0, target_required=False):
    _check_logits(name, student_logits, teacher_logits)
    check_positive(name, "temperature", temperature)
    if reduction not in REDUCTIONS:
        raise ValueError("%s: reduction must be one of %s, got %r" % (name, REDUCTIONS, reduction))
    target = _check_target(name, target, student_logits, target_required)
    student_logits, teacher_logits = _dtypes.promote(student_logits, teacher_logits)
    num_classes = student_logits.shape[-1]
    rows = student_logits.numel() // num_classes
    # Constant factors go into the kernel, which saves autograd nodes (a quarter of the fixed cost at small
    # sizes). A 1/rows factor is left out for fp16, whose scaled per-row values could leave its normal range.
    op_scale = float(scale)
    folded = target is None and reduction in ("batchmean", "mean") and student_logits.dtype != torch.float16
    if folded:
        op_scale /= rows if reduction == "batchmean" else rows * num_classes
    plain_sum = folded or reduction == "sum"
    if _forward_with_grad(divergence, student_logits, teacher_logits, plain_sum):
        out = KlWithGrad.apply(student_logits, teacher_logits, target, float(temperature), int(ignore_index),
                               op_scale, reduction != "none")
        if reduction == "none" or plain_sum:
            return out
        total = out
    else:
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


@_dtypes.loss
def kd_loss(student_logits, teacher_logits, temperature=4.0, reduction="batchmean", scale_t2=True, target=None,
            ignore_index=-100):
    """Hinton KD: T^2 * KL(p_t || p_s) with p = softmax(logits / T), per row, then reduced.

    ``scale_t2=False`` drops the T^2 factor. See the module docstring for rows, reductions and masking.
    """
    scale = float(temperature) ** 2 if scale_t2 and isinstance(temperature, numbers.Real) else 1.0
    return _kd_div("kd_loss", student_logits, teacher_logits, "kl", temperature, reduction, scale, target,
                   ignore_index)


@_dtypes.loss
def reverse_kd_loss(student_logits, teacher_logits, temperature=4.0, reduction="batchmean", scale_t2=True,
                    target=None, ignore_index=-100):
    """Reverse KL: T^2 * KL(p_s || p_t) (mode-seeking), same arguments as :func:`kd_loss`."""
    scale = float(temperature) ** 2 if scale_t2 and isinstance(temperature, numbers.Real) else 1.0
    return _kd_div("reverse_kd_loss", student_logits, teacher_logits, "reverse_kl", temperature, reduction, scale,
                   target, ignore_index)


@_dtypes.loss
def jsd_loss(student_logits, teacher_logits, temperature=4.0, beta=0.5, reduction="batchmean", scale_t2=True,
             target=None, ignore_index=-100):
    """Generalised Jensen-Shannon divergence: beta * KL(p_t || m) + (1 - beta) * KL(p_s || m),
    m = beta * p_t + (1 - beta) * p_s, beta in [0, 1] (times T^2 unless ``scale_t2=False``)."""
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not (0.0 <= beta <= 1.0):
        raise ValueError("jsd_loss: beta must be a number in [0, 1], got %r" % (beta,))
    scale = float(temperature) ** 2 if scale_t2 and isinstance(temperature, numbers.Real) else 1.0
    return _kd_div("jsd_loss", student_logits, teacher_logits, "jsd", temperature, reduction, scale, target,
                   ignore_index, beta=beta)


@_dtypes.loss
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
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not finite(v):
            raise ValueError("dkd_loss: %s must be a finite number, got %r" % (arg, v))
    scale = float(temperature) ** 2 if isinstance(temperature, numbers.Real) else 1.0
    return _kd_div("dkd_loss", student_logits, teacher_logits, "dkd", temperature, reduction, scale, target,
                   ignore_index, alpha=alpha, beta=beta, target_required=True)


def _peers(name, logits):
    """The peers' logits as N tensors (rows, C) in their promoted dtype (views where they can be), and the shape
    of one peer."""
    if isinstance(logits, torch.Tensor):
        if not logits.is_floating_point():
            raise ValueError("%s: logits must be a floating-point tensor (N, ..., C), got %s" % (name, logits.dtype))
        if logits.dim() < 2:
            raise ValueError("%s: logits must be (N, ..., C) (N peers stacked) or a list of N tensors (..., C), "
                             "got shape %s" % (name, tuple(logits.shape)))
        peers = list(logits.unbind(0))
    elif isinstance(logits, (list, tuple)):
        peers = list(logits)
        for i, z in enumerate(peers):
            if not isinstance(z, torch.Tensor) or not z.is_floating_point():
                raise ValueError("%s: logits[%d] must be a floating-point tensor (..., C), got %s"
                                 % (name, i, getattr(z, "dtype", type(z).__name__)))
            if z.dim() < 1:
                raise ValueError("%s: logits[%d] must have shape (..., C), got a 0-dim tensor" % (name, i))
            if z.shape != peers[0].shape:
                raise ValueError("%s: every peer's logits must have the shape of logits[0] %s, got %s at logits[%d]"
                                 % (name, tuple(peers[0].shape), tuple(z.shape), i))
            if z.device != peers[0].device:
                raise ValueError("%s: every peer's logits must be on the device of logits[0] (%s), got %s at "
                                 "logits[%d]" % (name, peers[0].device, z.device, i))
    else:
        raise ValueError("%s: logits must be a tensor (N, ..., C) or a list of N tensors (..., C), got %s"
                         % (name, type(logits).__name__))
    if len(peers) < 2:
        raise ValueError("%s: mutual learning needs at least 2 peers, got %d" % (name, len(peers)))
    shape = tuple(peers[0].shape)
    if shape[-1] == 0:
        raise ValueError("%s: logits must have at least one class (C >= 1), got peers of shape %s" % (name, shape))
    if math.prod(shape) == 0:
        raise ValueError("%s: logits is an empty batch (peers of shape %s); at least one row is needed"
                         % (name, shape))
    peers = _dtypes.promote(*peers)
    return (list(peers) if len(shape) == 2 else [z.reshape(-1, shape[-1]) for z in peers]), shape


@_dtypes.loss
def mutual_kd_loss(logits, temperature=1.0, reduction="batchmean", scale_t2=True, average_peers=False):
    """Deep Mutual Learning (Zhang et al. 2018): for N peers trained together, peer i's term
    T^2 * sum_{j != i} KL(p_j || p_i), p = softmax(logits / T), with every other peer held fixed.

    ``logits``: the peers' outputs on one batch, a list of N >= 2 tensors (..., C) of one shape (their dtypes
    are promoted) or one stacked tensor (N, ..., C). Returns the N peers' terms, shape (N,) (``reduction``
    over each peer's rows as in :func:`kd_loss`; ``none``: (N, ...)), in the promoted dtype.

    The gradient of entry i reaches peer i's logits only (the peers' targets are detached, as DML prescribes),
    so ``(ce_1 + ... + ce_N + lam * mutual_kd_loss(logits).sum()).backward()`` trains every peer on its own
    loss in one backward. ``average_peers=True`` divides by N - 1 (the paper's average over the other peers;
    the official code sums). ``scale_t2=False`` drops the T^2 factor (DML uses T = 1, where it is 1).

    All N terms come from one fused pass over the N rows of each sample (the peers are read where they are,
    never stacked into one copy): with S = sum_j p_j and
    E = sum_j p_j log p_j (per class), sum_{j != i} KL(p_j || p_i) = sum_c (E_c - S_c log p_ic) and its
    gradient for peer i is (N p_i - S) / T, so the cost is O(N b C), not the O(N^2 b C) of the pairwise loop.
    """
    name = "mutual_kd_loss"
    check_positive(name, "temperature", temperature)
    if reduction not in REDUCTIONS:
        raise ValueError("%s: reduction must be one of %s, got %r" % (name, REDUCTIONS, reduction))
    z, shape = _peers(name, logits)
    n, (rows, num_classes) = len(z), z[0].shape
    scale = float(temperature) ** 2 if scale_t2 else 1.0
    if average_peers:
        scale /= n - 1
    folded = reduction in ("batchmean", "mean") and z[0].dtype != torch.float16  # (see _kd_div)
    if folded:
        scale /= rows if reduction == "batchmean" else rows * num_classes
    values, _ = torch.ops.kdops.mutual_kd(z, float(temperature), scale)
    if reduction == "none":
        return values.reshape(n, *shape[:-1])
    # (keepdim, then squeeze: torch.compile of a graph whose output is values.sum(1) itself failed to compile its
    # backward on torch 2.14, "mismatch in length of strides and shape")
    total = values.sum(1, keepdim=True).squeeze(1)
    if reduction == "sum" or folded:
        return total
    return total / rows if reduction == "batchmean" else total / (rows * num_classes)
