"""Fake kernel and autograd of the fused RKD angle op."""

import torch


@torch.library.register_fake("kdops::rkd_angle")
def _rkd_angle_fake(gram_s, gram_t):
    return gram_s.new_empty(())


@torch.library.register_fake("kdops::rkd_angle_backward")
def _rkd_angle_backward_fake(grad, gram_s, gram_t, student_grad, teacher_grad):
    return torch.empty_like(gram_s), torch.empty_like(gram_t)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    gs, gt = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad
    if not (need_s or need_t):
        return None, None
    dgs, dgt = torch.ops.kdops.rkd_angle_backward(grad, gs, gt, need_s, need_t)
    return (dgs if need_s else None), (dgt if need_t else None)


torch.library.register_autograd("kdops::rkd_angle", _backward, setup_context=_setup)


@torch.library.register_fake("kdops::sp_gram")
def _sp_gram_fake(gram_s, gram_t):
    return gram_s.new_empty(())


@torch.library.register_fake("kdops::sp_gram_backward")
def _sp_gram_backward_fake(grad, gram_s, gram_t, student_grad, teacher_grad):
    return torch.empty_like(gram_s), torch.empty_like(gram_t)


def _sp_backward(ctx, grad):
    gs, gt = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad
    if not (need_s or need_t):
        return None, None
    dgs, dgt = torch.ops.kdops.sp_gram_backward(grad, gs, gt, need_s, need_t)
    return (dgs if need_s else None), (dgt if need_t else None)


torch.library.register_autograd("kdops::sp_gram", _sp_backward, setup_context=_setup)
