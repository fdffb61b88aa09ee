"""Fake kernels and autograd of the relational ops over Gram matrices. The losses (rkd_angle, sp_gram,
pkt_gram, fkd_gram, cc_gram) each take the student's and the teacher's (b, b) matrix (plus, for some, scalar
arguments), return a 0-dim loss, and have a backward op returning dL/dG for both sides; the primitives
(gram_transform, angle_tensor_gram) map one (batched) Gram matrix to a kernel, distances or angles; at_map is
attention transfer's channel reduction of a feature map."""

import torch


def _register(name):
    backward_op = getattr(torch.ops.kdops, name + "_backward")

    @torch.library.register_fake("kdops::" + name)
    def _fake(gram_s, gram_t, *args):
        return gram_s.new_empty(())

    @torch.library.register_fake("kdops::%s_backward" % name)
    def _backward_fake(grad, gram_s, gram_t, *args_and_flags):
        return torch.empty_like(gram_s), torch.empty_like(gram_t)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:2])
        ctx.args = tuple(inputs[2:])

    def backward(ctx, grad):
        gs, gt = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[:2]
        none = (None,) * len(ctx.args)
        if not (need_s or need_t):
            return (None, None) + none
        dgs, dgt = backward_op(grad, gs, gt, *ctx.args, need_s, need_t)
        return ((dgs if need_s else None), (dgt if need_t else None)) + none

    torch.library.register_autograd("kdops::" + name, backward, setup_context=setup)


for _name in ("rkd_angle", "sp_gram", "pkt_gram", "fkd_gram", "cc_gram"):
    _register(_name)


@torch.library.register_fake("kdops::gram_transform")
def _gram_transform_fake(gram, kind):
    return torch.empty_like(gram)


@torch.library.register_fake("kdops::gram_transform_backward")
def _gram_transform_backward_fake(grad, gram, out, kind):
    return torch.empty_like(gram)


def _gram_transform_setup(ctx, inputs, output):
    gram, kind = inputs
    ctx.save_for_backward(gram, output)
    ctx.kind = kind


def _gram_transform_backward(ctx, grad):
    gram, out = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    return torch.ops.kdops.gram_transform_backward(grad, gram, out, ctx.kind), None


torch.library.register_autograd("kdops::gram_transform", _gram_transform_backward,
                                setup_context=_gram_transform_setup)


@torch.library.register_fake("kdops::angle_tensor_gram")
def _angle_tensor_gram_fake(gram):
    return gram.new_empty((*gram.shape, gram.shape[-1]))


@torch.library.register_fake("kdops::angle_tensor_gram_backward")
def _angle_tensor_gram_backward_fake(grad, gram):
    return torch.empty_like(gram)


def _angle_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _angle_backward(ctx, grad):
    (gram,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None
    return torch.ops.kdops.angle_tensor_gram_backward(grad, gram)


torch.library.register_autograd("kdops::angle_tensor_gram", _angle_backward, setup_context=_angle_setup)


@torch.library.register_fake("kdops::at_map")
def _at_map_fake(f, p, mean):
    return f.new_empty((f.shape[0], f.shape[2]))


@torch.library.register_fake("kdops::at_map_backward")
def _at_map_backward_fake(grad, f, p, mean):
    return torch.empty_like(f)


def _at_map_setup(ctx, inputs, output):
    f, p, mean = inputs
    ctx.save_for_backward(f)
    ctx.args = (p, mean)


def _at_map_backward(ctx, grad):
    (f,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None
    return torch.ops.kdops.at_map_backward(grad, f, *ctx.args), None, None


torch.library.register_autograd("kdops::at_map", _at_map_backward, setup_context=_at_map_setup)
