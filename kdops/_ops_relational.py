"""Fake kernels and autograd of the relational ops over Gram matrices (rkd_angle, sp_gram, pkt_gram, fkd_gram): each
takes the student's and the teacher's (b, b) Gram matrix (plus, for some, scalar arguments), returns a 0-dim
loss, and has a backward op returning dL/dG for both sides."""

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


for _name in ("rkd_angle", "sp_gram", "pkt_gram", "fkd_gram"):
    _register(_name)
