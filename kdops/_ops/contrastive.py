"""Fake kernel and autograd of the contrastive family's op: kdops::crd_nce (CRD's NCE loss)."""

import torch

from kdops._ops._common import acc_dtype


@torch.library.register_fake("kdops::crd_nce")
def _crd_nce_fake(anchor, memory, index, normalizer, temperature, n_data, eps, anchor_grad):
    acc = acc_dtype(anchor.dtype)
    grad = anchor.new_empty(anchor.shape, dtype=acc) if anchor_grad else anchor.new_empty((0,), dtype=acc)
    return anchor.new_empty((anchor.shape[0],), dtype=acc), anchor.new_empty((), dtype=acc), grad


def _crd_nce_setup_context(ctx, inputs, output):
    anchor = inputs[0]
    _, z, grad = output
    ctx.anchor_dtype, ctx.anchor_shape = anchor.dtype, anchor.shape
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(z, grad)
    ctx.set_materialize_grads(False)


def _crd_nce_backward(ctx, grad_loss, _grad_z, _grad_g):
    """d(row loss)/d(anchor) was formed by the forward, in its one pass over the memory rows (re-reading the
    b * (k + 1) scattered rows here would double the op's memory traffic); the backward only scales it by the
    incoming per-row gradient, which is a (b, d) broadcast, not worth a kernel."""
    (grad,) = ctx.saved_tensors
    rest = (None,) * (len(ctx.needs_input_grad) - 1)
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return (None,) + rest
    if grad.dim() == 1:  # not formed (anchor_grad=False): only an empty batch has nothing to miss
        if grad_loss.numel() > 0:
            raise RuntimeError("kdops.crd_nce: the anchor's gradient was not formed (anchor_grad=False in the call)")
        return (grad.new_zeros(ctx.anchor_shape, dtype=ctx.anchor_dtype),) + rest
    return ((grad_loss.to(grad.dtype).unsqueeze(-1) * grad).to(ctx.anchor_dtype),) + rest


torch.library.register_autograd("kdops::crd_nce", _crd_nce_backward, setup_context=_crd_nce_setup_context)
