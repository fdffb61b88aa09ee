"""Contrastive distillation: CRD's NCE loss (Tian et al. 2020, "Contrastive Representation Distillation").

Conventions follow ``METHODS.md`` ("CRD"). An anchor row (an embedding of one side, student or teacher) is scored
against rows of the other side's memory bank: ``index`` (b, k + 1) names, per anchor, its positive (column 0, the
sample's own bank row) and k negatives. The loss is the NCE loss of the published ``ContrastLoss`` on
``P = exp(<memory[index], anchor> / T) / normalizer``; its gradient reaches the anchor only (the bank rows are a
fixed target, detached as published).

What is fused: the op ``kdops::crd_nce`` reads the b * (k + 1) bank rows in place, scores them and folds the
loss and the anchor's gradient in one pass. The published code gathers them into a (b, k + 1, d) copy (0.54 GB per
side at b = 64, k = 16384, d = 128, kept alive for the backward) and forms the (b, k + 1) score matrices twice
more; here the extra memory is the (b, d) gradient. The terms are computed in the log domain, so that an
exponent beyond float range (exp(1 / 0.07) = 1.6e6 is fine, an un-normalised anchor is not) stays finite.

Dtypes (:mod:`kdops.functional._dtypes`): anchor and memory of any float dtypes (promoted); 16-bit inputs are
read as they are and computed in fp32 (exp(s / 0.07) exceeds the fp16 range); the result is fp32 for 16-bit or
fp32 inputs, fp64 with fp64. Under autocast the loss is computed as outside it.
"""

import numbers

import torch

from kdops import _ops  # noqa: F401  (autograd / fake registrations)
from kdops.functional import _dtypes
from kdops.functional._checks import check_positive, finite

CRD_REDUCTIONS = ("mean", "sum", "none")


def _crd_nce(name, anchor, memory, index, temperature, normalizer, n_data, eps, reduction):
    """(loss, the normaliser Z used as a 0-dim tensor): the checks and the op call shared by
    :func:`crd_nce_loss` and :class:`kdops.nn.CRDLoss` (which keeps Z)."""
    for arg, t in (("anchor", anchor), ("memory", memory)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError("%s: %s must be a floating-point tensor, got %s"
                             % (name, arg, getattr(t, "dtype", type(t).__name__)))
    if anchor.dim() != 2:
        raise ValueError("%s: anchor must be (b, d), got shape %s" % (name, tuple(anchor.shape)))
    if memory.dim() != 2 or memory.size(1) != anchor.size(1):
        raise ValueError("%s: memory must be (N, %d) (a bank row per training sample, the anchor's width), got "
                         "shape %s" % (name, anchor.size(1), tuple(memory.shape)))
    if memory.device != anchor.device:
        raise ValueError("%s: memory must be on the anchor's device %s, got %s" % (name, anchor.device, memory.device))
    if anchor.size(0) == 0:
        raise ValueError("%s: anchor is an empty batch (b = 0); at least one row is needed" % name)
    if memory.size(0) == 0:
        raise ValueError("%s: memory has no rows (N = 0); at least one bank row is needed" % name)
    if not isinstance(index, torch.Tensor) or index.is_floating_point() or index.is_complex() \
            or index.dtype == torch.bool:
        raise ValueError("%s: index must be an integer tensor (b, k + 1) of memory rows, got %s"
                         % (name, getattr(index, "dtype", type(index).__name__)))
    if index.dim() != 2 or index.size(0) != anchor.size(0) or index.size(1) < 1:
        raise ValueError("%s: index must be (%d, k + 1) (column 0 the positive, then k negatives), got shape %s"
                         % (name, anchor.size(0), tuple(index.shape)))
    if index.device != anchor.device:
        raise ValueError("%s: index must be on the anchor's device %s, got %s" % (name, anchor.device, index.device))
    check_positive(name, "temperature", temperature)
    if n_data is None:
        n_data = memory.size(0)
    if isinstance(n_data, bool) or not isinstance(n_data, numbers.Integral) or n_data < 1:
        raise ValueError("%s: n_data must be an int >= 1 (the training-set size), got %r" % (name, n_data))
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not finite(eps) or eps < 0:
        raise ValueError("%s: eps must be a finite number >= 0, got %r" % (name, eps))
    if index.size(1) == 1 and not eps > 0:
        raise ValueError("%s: index has no negatives (k = 0), which needs eps > 0" % name)
    if reduction not in CRD_REDUCTIONS:
        raise ValueError("%s: reduction must be one of %s, got %r" % (name, CRD_REDUCTIONS, reduction))
    anchor, memory = _dtypes.promote(anchor, memory)
    acc = _dtypes.acc_of(anchor)
    if normalizer is None:
        z = anchor.new_zeros((), dtype=acc)
    elif isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1 or not normalizer.is_floating_point():
            raise ValueError("%s: normalizer must be a number > 0 or a one-element floating tensor (<= 0: not set "
                             "yet), got %s %s" % (name, tuple(normalizer.shape), normalizer.dtype))
        if normalizer.device != anchor.device:
            raise ValueError("%s: normalizer must be on the anchor's device %s, got %s"
                             % (name, anchor.device, normalizer.device))
        z = normalizer.detach()
    else:
        check_positive(name, "normalizer", normalizer)
        if not torch.finfo(acc).tiny <= normalizer <= torch.finfo(acc).max:
            raise ValueError("%s: normalizer must be in [%g, %g] (the normal range of the %s it is computed in), "
                             "got %r" % (name, torch.finfo(acc).tiny, torch.finfo(acc).max, acc, normalizer))
        z = anchor.new_full((), float(normalizer), dtype=acc)
    anchor_grad = torch.is_grad_enabled() and anchor.requires_grad
    loss, z_used, _ = torch.ops.kdops.crd_nce(anchor, memory, index.long(), z, float(temperature), int(n_data),
                                              float(eps), anchor_grad)
    if reduction == "mean":
        loss = loss.sum() / anchor.size(0)
    elif reduction == "sum":
        loss = loss.sum()
    return loss, z_used


@_dtypes.loss
def crd_nce_loss(anchor, memory, index, temperature=0.07, normalizer=None, n_data=None, eps=1e-7,
                 reduction="mean"):
    """CRD's NCE loss of anchors against memory-bank rows (the published ``ContrastLoss`` on its memory's scores).

    ``anchor``: (b, d) embeddings of one side (L2-normalised in CRD). ``memory``: (N, d) the other side's bank.
    ``index``: (b, k + 1) integer rows of ``memory``, column 0 each anchor's positive, columns 1..k its negatives.
    With x_ij = <memory[index_ij], anchor_i> / T, P_ij = exp(x_ij) / Z and c = k / n_data, row i's loss is

        -log(P_i0 / (P_i0 + c + eps)) - sum_{j >= 1} log(c / (P_ij + c + eps)),

    reduced by ``reduction``: ``"mean"`` over the b rows (the published loss), ``"sum"``, or ``"none"`` (b,).

    ``normalizer``: Z, a number > 0 or a one-element tensor; ``None`` or a tensor <= 0 forms it from this batch as
    published, Z = mean(exp(x)) * n_data (CRD fixes it on the first batch: :class:`kdops.nn.CRDLoss` keeps it).
    Z is a constant for the gradient, as in the published code. ``n_data``: the training-set size N (default
    ``memory.size(0)``). The gradient reaches ``anchor`` only; ``memory`` gets none.
    """
    return _crd_nce("crd_nce_loss", anchor, memory, index, temperature, normalizer, n_data, eps, reduction)[0]
