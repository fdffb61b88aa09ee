"""Fake (meta) kernels and autograd for the kdops ops. The kernels themselves live in csrc/."""

import torch

NUM_KD_STATS = 6  # per-row stats kd_div saves for its backward (csrc/kdops/kd_math.h)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("kdops::kd_div")
def _kd_div_fake(student, teacher, target, temperature, divergence, alpha, beta, ignore_index):
    rows = student.shape[:-1]
    return student.new_empty(rows), student.new_empty((*rows, NUM_KD_STATS), dtype=_acc_dtype(student.dtype))


@torch.library.register_fake("kdops::kd_div_backward")
def _kd_div_backward_fake(grad, student, teacher, target, stats, temperature, divergence, alpha, beta,
                          ignore_index, student_grad, teacher_grad):
    gs = student.new_empty(student.shape) if student_grad else student.new_empty((0,))
    gt = teacher.new_empty(teacher.shape) if teacher_grad else teacher.new_empty((0,))
    return gs, gt


def _kd_div_setup_context(ctx, inputs, output):
    student, teacher, target, temperature, divergence, alpha, beta, ignore_index = inputs
    _, stats = output
    ctx.save_for_backward(student, teacher, target, stats)
    ctx.args = (temperature, divergence, alpha, beta, ignore_index)
    ctx.mark_non_differentiable(stats)


def _kd_div_backward(ctx, grad_loss, _grad_stats):
    student, teacher, target, stats = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_s or need_t):
        return (None,) * 8
    gs, gt = torch.ops.kdops.kd_div_backward(grad_loss, student, teacher, target, stats, *ctx.args, need_s, need_t)
    return (gs if need_s else None, gt if need_t else None) + (None,) * 6


torch.library.register_autograd("kdops::kd_div", _kd_div_backward, setup_context=_kd_div_setup_context)
