"""Fake kernels and autograd of the KD family's ops: kdops::kd_div (KD, reverse KL, JSD, DKD) and kdops::mutual_kd
(mutual learning over N peers)."""

import math

import torch
from torch.autograd.function import once_differentiable

from kdops._ops._common import acc_dtype

NUM_KD_STATS = 6  # per-row stats kd_div saves for its backward (csrc/kdops/kd_math.h)


@torch.library.register_fake("kdops::kd_div")
def _kd_div_fake(student, teacher, target, temperature, divergence, alpha, beta, ignore_index, scale=1.0):
    rows = student.shape[:-1]
    return student.new_empty(rows), student.new_empty((*rows, NUM_KD_STATS), dtype=acc_dtype(student.dtype))


@torch.library.register_fake("kdops::kd_div_backward")
def _kd_div_backward_fake(grad, student, teacher, target, stats, temperature, divergence, alpha, beta,
                          ignore_index, student_grad, teacher_grad, scale=1.0):
    gs = student.new_empty(student.shape) if student_grad else student.new_empty((0,))
    gt = teacher.new_empty(teacher.shape) if teacher_grad else teacher.new_empty((0,))
    return gs, gt


def _kd_div_setup_context(ctx, inputs, output):
    student, teacher, target, temperature, divergence, alpha, beta, ignore_index = inputs[:8]
    _, stats = output
    ctx.save_for_backward(student, teacher, target, stats)
    ctx.args = (temperature, divergence, alpha, beta, ignore_index)
    ctx.scale = inputs[8] if len(inputs) > 8 else 1.0
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)  # stats get no gradient: no zero tensor for them on every backward


def _kd_div_backward(ctx, grad_loss, _grad_stats):
    student, teacher, target, stats = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_loss is None or not (need_s or need_t):
        return (None,) * 9
    gs, gt = torch.ops.kdops.kd_div_backward(grad_loss, student, teacher, target, stats, *ctx.args, need_s, need_t,
                                             ctx.scale)
    return (gs if need_s else None, gt if need_t else None) + (None,) * 7


torch.library.register_autograd("kdops::kd_div", _kd_div_backward, setup_context=_kd_div_setup_context)


@torch.library.register_fake("kdops::kd_div_with_grad")
def _kd_div_with_grad_fake(student, teacher, target, temperature, ignore_index, scale=1.0):
    rows = student.shape[:-1]
    return (student.new_empty(rows), student.new_empty((*rows, NUM_KD_STATS), dtype=acc_dtype(student.dtype)),
            student.new_empty(student.shape))


def _kd_div_with_grad_setup_context(ctx, inputs, output):
    student, teacher, target, temperature, ignore_index = inputs[:5]
    _, stats, grad = output
    ctx.save_for_backward(student, teacher, target, stats, grad)
    ctx.args = (temperature, "kl", 0.0, 0.0, ignore_index)
    ctx.scale = inputs[5] if len(inputs) > 5 else 1.0
    ctx.mark_non_differentiable(stats, grad)
    ctx.set_materialize_grads(False)


def _uniform_value(grad):
    """The value of grad as a Python float when all its elements are one broadcast value (the gradient of a sum),
    else None."""
    if grad.numel() == 1:
        return grad.item()
    if not any(grad.stride()):
        return grad.as_strided((), ()).item()
    return None


def _exact_scale(v):
    """Whether multiplying by v rounds nothing: 1 and the other powers of two."""
    return v != 0.0 and math.isfinite(v) and abs(math.frexp(v)[0]) == 0.5


def _student_grad(ctx, grad_loss, student, teacher, target, stats, grad, need_s, need_t):
    """The student and teacher gradients of kd_div_with_grad from the forward's gradient `grad` (that of
    grad_loss = 1) where scaling it is enough, else from the backward kernel."""
    wide = grad.dtype in (torch.float32, torch.float64)
    if need_s and not need_t:
        v = _uniform_value(grad_loss)
        if v == 1.0:
            return grad, None  # loss.backward() on the sum: the forward's gradient as it is
        if v is not None and (wide or _exact_scale(v)):
            return grad * v, None
        if wide:
            return grad * grad_loss.unsqueeze(-1).to(grad.dtype), None
    # A teacher gradient, or a 16-bit gradient that scaling would round a second time: the backward kernel.
    gs, gt = torch.ops.kdops.kd_div_backward(grad_loss, student, teacher, target, stats, *ctx.args, need_s, need_t,
                                             ctx.scale)
    return (gs if need_s else None), (gt if need_t else None)


def _kd_div_with_grad_backward(ctx, grad_loss, _grad_stats, _grad_grad):
    student, teacher, target, stats, grad = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    rest = (None,) * (len(ctx.needs_input_grad) - 2)
    if grad_loss is None or not (need_s or need_t):
        return (None, None) + rest
    return _student_grad(ctx, grad_loss, student, teacher, target, stats, grad, need_s, need_t) + rest


torch.library.register_autograd("kdops::kd_div_with_grad", _kd_div_with_grad_backward,
                                setup_context=_kd_div_with_grad_setup_context)


class KlWithGrad(torch.autograd.Function):
    """kd_div_with_grad's per-row values (or their sum, with total=True) with the same backward as its registered
    autograd, for eager calls: a plain autograd.Function, which also sums the rows itself, has less fixed cost per
    call than the dispatcher's autograd kernel and a separate sum node (130 -> 105 us of a 256 x 100 forward +
    backward here). torch.compile traces the registered op instead."""

    @staticmethod
    def forward(ctx, student, teacher, target, temperature, ignore_index, scale, total):
        per_row, stats, grad = torch.ops.kdops.kd_div_with_grad(student, teacher, target, temperature, ignore_index,
                                                                scale)
        ctx.save_for_backward(student, teacher, target, stats, grad)
        ctx.args = (temperature, "kl", 0.0, 0.0, ignore_index)
        ctx.scale, ctx.total = scale, total
        ctx.set_materialize_grads(False)
        return per_row.sum() if total else per_row

    @staticmethod
    @once_differentiable  # a second derivative raises instead of silently being 0
    def backward(ctx, grad_loss):
        student, teacher, target, stats, grad = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_loss is None or not (need_s or need_t):
            return (None,) * 7
        if ctx.total:
            grad_loss = grad_loss.expand(stats.shape[:-1])
        return _student_grad(ctx, grad_loss, student, teacher, target, stats, grad, need_s, need_t) + (None,) * 5


@torch.library.register_fake("kdops::mutual_kd")
def _mutual_kd_fake(logits, temperature, scale=1.0):
    peers_rows = (len(logits), logits[0].shape[0])
    first = logits[0]
    return first.new_empty(peers_rows), first.new_empty((*peers_rows, 2), dtype=acc_dtype(first.dtype))


@torch.library.register_fake("kdops::mutual_kd_backward")
def _mutual_kd_backward_fake(grad, logits, stats, temperature, scale=1.0):
    return [z.new_empty(z.shape) for z in logits]


def _mutual_kd_setup_context(ctx, inputs, output):
    logits, temperature = inputs[:2]
    ctx.save_for_backward(output[1], *logits)
    ctx.temperature, ctx.scale = temperature, inputs[2] if len(inputs) > 2 else 1.0
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _mutual_kd_backward(ctx, grad_values, _grad_stats):
    """Each peer's value differentiated for its own logits only (the other peers held fixed)."""
    stats, *logits = ctx.saved_tensors
    # one entry per input of the call as the dispatcher passed it: it drops trailing arguments equal to their
    # defaults (scale=1.0), which setup_context sees filled in again
    rest = (None,) * (len(ctx.needs_input_grad) - 1)
    if grad_values is None:
        return ([None] * len(logits),) + rest
    grads = torch.ops.kdops.mutual_kd_backward(grad_values, logits, stats, ctx.temperature, ctx.scale)
    return (list(grads),) + rest


torch.library.register_autograd("kdops::mutual_kd", _mutual_kd_backward, setup_context=_mutual_kd_setup_context)
