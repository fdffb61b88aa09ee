"""Fake kernels and autograd of the feature-map ops: margin_relu, partial_l2 (the Overhaul's), logsum."""

import torch

from kdops._ops._common import acc_dtype


@torch.library.register_fake("kdops::margin_relu")
def _margin_relu_fake(x, margin):
    return x.new_empty(x.shape)


@torch.library.register_fake("kdops::margin_relu_backward")
def _margin_relu_backward_fake(grad, x, margin):
    return x.new_empty(x.shape)


def _margin_relu_setup_context(ctx, inputs, output):
    x, margin = inputs
    ctx.save_for_backward(x, margin)


def _margin_relu_backward(ctx, grad):
    x, margin = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    return torch.ops.kdops.margin_relu_backward(grad, x, margin), None


torch.library.register_autograd("kdops::margin_relu", _margin_relu_backward, setup_context=_margin_relu_setup_context)


@torch.library.register_fake("kdops::partial_l2")
def _partial_l2_fake(student, teacher, margin):
    return student.new_empty((student.shape[0],), dtype=acc_dtype(student.dtype))


@torch.library.register_fake("kdops::partial_l2_backward")
def _partial_l2_backward_fake(grad, student, teacher, margin, student_grad, teacher_grad):
    gs = student.new_empty(student.shape) if student_grad else student.new_empty((0,))
    gt = teacher.new_empty(teacher.shape) if teacher_grad else teacher.new_empty((0,))
    return gs, gt


def _partial_l2_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _partial_l2_backward(ctx, grad):
    student, teacher, margin = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_s or need_t):
        return None, None, None
    gs, gt = torch.ops.kdops.partial_l2_backward(grad, student, teacher, margin, need_s, need_t)
    return (gs if need_s else None), (gt if need_t else None), None


torch.library.register_autograd("kdops::partial_l2", _partial_l2_backward, setup_context=_partial_l2_setup_context)


@torch.library.register_fake("kdops::partial_l2_with_grad")
def _partial_l2_with_grad_fake(student, teacher, margin, scale, student_grad, teacher_grad):
    gs, gt = _partial_l2_backward_fake(None, student, teacher, margin, student_grad, teacher_grad)
    return _partial_l2_fake(student, teacher, margin), gs, gt


class PartialL2WithGrad(torch.autograd.Function):
    """partial_l2 summed and divided by `divisor`, with the gradients computed in the same pass as the loss.

    The eager CPU path of :func:`kdops.functional.partial_l2_loss` when a gradient is wanted: forward and
    backward then read the maps once instead of twice. The gradients (for an incoming gradient of 1) are held
    from the forward to the backward, which returns them as they are when the incoming gradient is 1 (the loss
    backpropagated directly) and scales them in place otherwise. A second backward through a retained graph
    recomputes them from the saved maps. torch.compile and functorch transforms use the op pair instead.
    """

    @staticmethod
    def forward(ctx, student, teacher, margin, divisor):
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = 1.0 / divisor if divisor else 1.0  # an empty map: no gradient to scale
        per_sample, gs, gt = torch.ops.kdops.partial_l2_with_grad(student, teacher, margin, scale, need_s, need_t)
        ctx.save_for_backward(student, teacher, margin)
        ctx.divisor = divisor
        ctx.pending = (gs, gt)
        return per_sample.sum() / divisor

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        pending, ctx.pending = ctx.pending, None
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if pending is None:
            student, teacher, margin = ctx.saved_tensors
            g = (grad / ctx.divisor).expand(student.shape[0])
            gs, gt = torch.ops.kdops.partial_l2_backward(g, student, teacher, margin, need_s, need_t)
        else:
            gs, gt = pending
            scale = grad.item()
            if scale != 1.0:
                for x, need in ((gs, need_s), (gt, need_t)):
                    if need:
                        x.mul_(scale)
        return (gs if need_s else None), (gt if need_t else None), None, None


def use_fused_gradient(x, *others):
    """Whether an eager call may compute its gradients in the forward (see PartialL2WithGrad): CPU tensors,
    grad mode on and some input requiring grad, and neither torch.compile nor a functorch transform tracing."""
    return (x.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (x, *others))
            and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active())


@torch.library.register_fake("kdops::logsum")
def _logsum_fake(a, b, alpha, eps):
    acc = acc_dtype(a.dtype)
    return a.new_empty((), dtype=acc), a.new_empty((), dtype=acc)


@torch.library.register_fake("kdops::logsum_backward")
def _logsum_backward_fake(grad, a, b, total, alpha, eps, a_grad, b_grad):
    ga = a.new_empty(a.shape) if a_grad else a.new_empty((0,))
    gb = a.new_empty(a.shape) if b_grad else a.new_empty((0,))
    return ga, gb


def _logsum_setup_context(ctx, inputs, output):
    a, b, alpha, eps = inputs
    _, total = output
    ctx.save_for_backward(a, b, total)
    ctx.args = (alpha, eps)
    ctx.mark_non_differentiable(total)
    ctx.set_materialize_grads(False)


def _logsum_backward(ctx, grad, _grad_total):
    a, b, total = ctx.saved_tensors
    need_a = ctx.needs_input_grad[0]
    need_b = b is not None and ctx.needs_input_grad[1]
    if grad is None or not (need_a or need_b):
        return None, None, None, None
    ga, gb = torch.ops.kdops.logsum_backward(grad, a, b, total, *ctx.args, need_a, need_b)
    return (ga if need_a else None), (gb if need_b else None), None, None


torch.library.register_autograd("kdops::logsum", _logsum_backward, setup_context=_logsum_setup_context)
