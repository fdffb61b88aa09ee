"""Pure-PyTorch reference of the contrastive family: CRD's NCE loss written as the published code computes it
(RepDistiller's ``ContrastMemory`` scores and ``ContrastLoss``): the bank rows gathered into a (b, k + 1, d)
copy, a batched GEMM, exp / T, the normaliser from the batch's mean, then the NCE terms."""

import torch


def crd_nce_loss(anchor, memory, index, temperature=0.07, normalizer=None, n_data=None, eps=1e-7,
                 reduction="mean"):
    b, k1 = index.shape
    d = anchor.size(1)
    n_data = memory.size(0) if n_data is None else n_data
    weight = torch.index_select(memory, 0, index.reshape(-1)).detach().view(b, k1, d)
    out = torch.exp(torch.div(torch.bmm(weight, anchor.view(b, d, 1)), temperature)).squeeze(-1)
    if normalizer is None or (isinstance(normalizer, torch.Tensor) and normalizer.item() <= 0):
        z = (out.mean() * n_data).detach()
    else:
        z = normalizer.detach() if isinstance(normalizer, torch.Tensor) else normalizer
    p = out / z
    k = k1 - 1
    c = float(k) / n_data
    p_pos = p[:, 0]
    log_d1 = torch.log(p_pos / (p_pos + c + eps))
    p_neg = p[:, 1:]
    log_d0 = torch.log(torch.full_like(p_neg, c) / (p_neg + c + eps))
    rows = -(log_d1 + log_d0.sum(1))
    if reduction == "mean":
        return rows.sum() / b
    return rows.sum() if reduction == "sum" else rows


def _crd_memory_update(memory, index, v, momentum=0.5):
    """The published bank update after scoring: memory[index] <- normalise(m * memory[index] + (1 - m) * v)."""
    with torch.no_grad():
        pos = torch.index_select(memory, 0, index.view(-1))
        pos.mul_(momentum)
        pos.add_(torch.mul(v.detach(), 1 - momentum))
        memory.index_copy_(0, index, pos.div(pos.pow(2).sum(1, keepdim=True).pow(0.5)))
    return memory
