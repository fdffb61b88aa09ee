"""Fake kernels and autograd of the lm family's ops: kdops::fused_linear_kd and kdops::topk_kd.

Both ops form the gradients of their weighted total in the forward, chunk by chunk, while each chunk's logits
are at hand (forming them again in the backward would cost the GEMMs a second time); the backward scales them
by the incoming gradient of the total. When the per-token rows are what is differentiated (``reduction="none"``)
the forward forms nothing and the backward runs the op again with the incoming row gradients as row weights.
"""

import torch

from kdops._ops._common import acc_dtype

# grad_mask bits, as in csrc/kdops/lm_host.h
GRAD_SH, GRAD_SW, GRAD_SB, GRAD_TH, GRAD_TW, GRAD_TB, GRAD_TL = 1, 2, 4, 8, 16, 32, 64
_FLK_BITS = (GRAD_SH, GRAD_SW, GRAD_SB, GRAD_TH, GRAD_TW, GRAD_TB, GRAD_TL)  # inputs 0..6
_FLK_INPUTS = 9  # tensor inputs: sh, sw, sb, th, tw, tb, tl, target, row_weight
_TOPK_BITS = (GRAD_SH, GRAD_SW, GRAD_SB)  # inputs 0..2
_TOPK_INPUTS = 7  # sh, sw, sb, ids, lps, target, row_weight


def _grad_shapes(tensors, bits, grad_mask, acc):
    out = []
    for t, bit in zip(tensors, bits):
        if t is not None and grad_mask & bit:
            out.append(t.new_empty(t.shape, dtype=acc))
        else:
            out.append(tensors[0].new_empty((0,), dtype=acc))
    return out


@torch.library.register_fake("kdops::fused_linear_kd")
def _fused_linear_kd_fake(sh, sw, sb, th, tw, tb, tl, target, row_weight, divergence, mix, temperature, soft_coef,
                          hard_weight, ignore_index, vocab_size, s_cap, t_cap, s_scale, t_scale, chunk_size,
                          grad_mask):
    acc = acc_dtype(sh.dtype)
    grads = _grad_shapes((sh, sw, sb, th, tw, tb, tl), _FLK_BITS, grad_mask, acc)
    # th present means the teacher GEMM path: tl's slot holds nothing, and the reverse.
    if th is None:
        # (three distinct tensors: the real kernel's outputs never alias each other)
        grads[3], grads[4], grads[5] = (sh.new_empty((0,), dtype=acc) for _ in range(3))
    return (sh.new_empty((), dtype=acc), sh.new_empty((sh.shape[0],), dtype=acc), *grads)


@torch.library.register_fake("kdops::topk_kd")
def _topk_kd_fake(sh, sw, sb, ids, lps, target, row_weight, tail, retemper, temperature, soft_coef, hard_weight,
                  ignore_index, vocab_size, s_cap, s_scale, chunk_size, grad_mask):
    acc = acc_dtype(sh.dtype)
    grads = _grad_shapes((sh, sw, sb), _TOPK_BITS, grad_mask, acc)
    return (sh.new_empty((), dtype=acc), sh.new_empty((sh.shape[0],), dtype=acc), *grads)


def _make_autograd(op, n_inputs, bits, weight_slot, mask_slot):
    """setup_context / backward for an op whose outputs are (total, rows, *formed gradients of total)."""

    def setup_context(ctx, inputs, output):
        ctx.inputs = inputs
        ctx.dtypes = [t.dtype if isinstance(t, torch.Tensor) else None for t in inputs[:len(bits)]]
        formed = output[2:]
        ctx.save_for_backward(*[t for t in inputs[:n_inputs]], *formed)
        ctx.grad_mask = inputs[mask_slot]
        ctx.mark_non_differentiable(*formed)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_total, grad_rows, *_):
        saved = ctx.saved_tensors
        tensors, formed = list(saved[:n_inputs]), saved[n_inputs:]
        want = 0
        for i, bit in enumerate(bits):
            if ctx.needs_input_grad[i] and tensors[i] is not None:
                want |= bit
        nones = [None] * len(ctx.needs_input_grad)
        if want == 0 or (grad_total is None and grad_rows is None):
            return tuple(nones)
        if grad_rows is None and (want & ~ctx.grad_mask) == 0:
            grads = [g * grad_total.to(g.dtype) if bit & want else None for g, bit in zip(formed, bits)]
        else:
            # The rows are differentiated (or a gradient was not formed): run the op again, the incoming
            # gradients as the row weights: d(sum_r u_r row_r) for u = grad_total * w + grad_rows.
            w = tensors[weight_slot]
            n = tensors[0].shape[0]
            u = None
            if grad_total is not None:
                u = grad_total.expand(n) if w is None else grad_total * w
            if grad_rows is not None:
                u = grad_rows if u is None else u + grad_rows
            args = list(ctx.inputs)
            for i in range(n_inputs):
                args[i] = tensors[i]
            args[weight_slot] = u.detach()
            args[mask_slot] = want
            grads = list(op(*args)[2:])
        out = nones
        for i, (g, bit) in enumerate(zip(grads, bits)):
            if g is not None and want & bit:
                out[i] = g.to(ctx.dtypes[i])
        return tuple(out)

    return setup_context, backward


_flk_setup, _flk_backward = _make_autograd(torch.ops.kdops.fused_linear_kd, _FLK_INPUTS, _FLK_BITS, 8, 21)
torch.library.register_autograd("kdops::fused_linear_kd", _flk_backward, setup_context=_flk_setup)
_topk_setup, _topk_backward = _make_autograd(torch.ops.kdops.topk_kd, _TOPK_INPUTS, _TOPK_BITS, 6, 17)
torch.library.register_autograd("kdops::topk_kd", _topk_backward, setup_context=_topk_setup)
