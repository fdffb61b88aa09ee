"""Pure-PyTorch references of the KD family, written the way the published code computes them (``F.kl_div``
over ``log_softmax``), in the input dtype, with the same arguments and reductions as :mod:`kdops.functional.kd`."""

import math

import torch
import torch.nn.functional as F


def _reduce(rows, reduction, target, ignore_index, num_classes):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    kept = rows.numel() if target is None else max(int((target != ignore_index).sum()), 1)
    if reduction == "batchmean":
        return rows.sum() / kept
    if reduction == "mean":
        return rows.sum() / (kept * num_classes)
    raise ValueError("unknown reduction %r" % (reduction,))


def _mask_rows(rows, target, ignore_index):
    return rows if target is None else rows.masked_fill(target == ignore_index, 0.0)


def _kl_rows(log_p, log_q):
    """KL(p || q) per row from log-probabilities."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def kd_loss(student_logits, teacher_logits, temperature=4.0, reduction="batchmean", scale_t2=True, target=None,
            ignore_index=-100):
    T = temperature
    ls = F.log_softmax(student_logits / T, dim=-1)
    lt = F.log_softmax(teacher_logits / T, dim=-1)
    rows = _mask_rows(_kl_rows(lt, ls), target, ignore_index)
    return _reduce(rows, reduction, target, ignore_index, student_logits.shape[-1]) * (T * T if scale_t2 else 1.0)


def reverse_kd_loss(student_logits, teacher_logits, temperature=4.0, reduction="batchmean", scale_t2=True,
                    target=None, ignore_index=-100):
    T = temperature
    ls = F.log_softmax(student_logits / T, dim=-1)
    lt = F.log_softmax(teacher_logits / T, dim=-1)
    rows = _mask_rows(_kl_rows(ls, lt), target, ignore_index)
    return _reduce(rows, reduction, target, ignore_index, student_logits.shape[-1]) * (T * T if scale_t2 else 1.0)


def jsd_loss(student_logits, teacher_logits, temperature=4.0, beta=0.5, reduction="batchmean", scale_t2=True,
             target=None, ignore_index=-100):
    T = temperature
    ls = F.log_softmax(student_logits / T, dim=-1)
    lt = F.log_softmax(teacher_logits / T, dim=-1)
    # log m = log(beta * p_t + (1 - beta) * p_s), formed from log-probabilities so tails do not underflow
    log_w = [math.log(w) if w > 0 else float("-inf") for w in (beta, 1.0 - beta)]
    log_m = torch.logaddexp(lt + log_w[0], ls + log_w[1])
    kl_tm = _kl_rows(lt, log_m)
    kl_sm = _kl_rows(ls, log_m)
    rows = _mask_rows(beta * kl_tm + (1.0 - beta) * kl_sm, target, ignore_index)
    return _reduce(rows, reduction, target, ignore_index, student_logits.shape[-1]) * (T * T if scale_t2 else 1.0)


def dkd_loss(student_logits, teacher_logits, target, alpha=1.0, beta=8.0, temperature=4.0, reduction="batchmean",
             ignore_index=-100):
    """DKD as in mdistiller, with the target class left out of NCKD exactly (see kdops.functional.dkd_loss)."""
    T = temperature
    y = target.clamp_min(0).unsqueeze(-1)  # ignored rows are masked at the end
    cols = torch.arange(student_logits.shape[-1] - 1, device=student_logits.device)
    non_target = cols + (cols >= y).long()  # indices of the C - 1 other classes, per row

    def binary_log_probs(z):
        lse = torch.logsumexp(z / T, dim=-1)
        log_y = (z / T).gather(-1, y).squeeze(-1) - lse
        log_rest = torch.logsumexp((z / T).gather(-1, non_target), dim=-1) - lse
        return torch.stack([log_y, log_rest], dim=-1)

    lbs, lbt = binary_log_probs(student_logits), binary_log_probs(teacher_logits)
    tckd = (lbt.exp() * torch.where(lbt > float("-inf"), lbt - lbs, torch.zeros_like(lbt))).sum(-1)

    lqs = F.log_softmax((student_logits / T).gather(-1, non_target), dim=-1)
    lqt = F.log_softmax((teacher_logits / T).gather(-1, non_target), dim=-1)
    nckd = _kl_rows(lqt, lqs)

    rows = _mask_rows(alpha * tckd + beta * nckd, target, ignore_index)
    return _reduce(rows, reduction, target, ignore_index, student_logits.shape[-1]) * (T * T)


def mutual_kd_loss(logits, temperature=1.0, reduction="batchmean", scale_t2=True, average_peers=False):
    """DML's pairwise loop: peer i's term T^2 * sum_{j != i} KL(p_j || p_i) with the other peers detached,
    one F.kl_div per ordered pair (O(N^2 b C)). Returns the N terms stacked."""
    peers = list(logits) if isinstance(logits, (list, tuple)) else list(logits.unbind(0))
    T, n = temperature, len(peers)
    out = []
    for i, zi in enumerate(peers):
        log_pi = F.log_softmax(zi / T, dim=-1)
        rows = sum(_kl_rows(F.log_softmax(zj.detach() / T, dim=-1), log_pi) for j, zj in enumerate(peers) if j != i)
        term = _reduce(rows, reduction, None, None, zi.shape[-1]) * (T * T if scale_t2 else 1.0)
        out.append(term / (n - 1) if average_peers else term)
    return torch.stack(out)
