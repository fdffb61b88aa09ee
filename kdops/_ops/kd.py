"""Fake kernels and autograd of the KD family's ops: kdops::kd_div (KD, reverse KL, JSD, DKD) and kdops::mutual_kd
(mutual learning over N peers)."""

import torch

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
