"""Pure-PyTorch references of the lm family: the whole (tokens, V) logits formed, then the formulas of
``METHODS.md`` ("Language-model distillation") written term by term. Conventions as in :mod:`kdops.functional.lm`.
Call them with float64 inputs for a ground truth; in other dtypes they compute as written (logits in the inputs'
dtype), which is what eager PyTorch code does."""

import math

import torch
import torch.nn.functional as F


def _transform(z, scale, cap):
    z = z * scale
    return cap * torch.tanh(z / cap) if cap else z


def _xlogy_diff(p, lp, lq):
    """p * (lp - lq) with 0 where p = 0."""
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))


def _divergence(ls, lt, divergence, beta, skew):
    """Per-row divergence from the student's and teacher's log-probabilities (rows, V)."""
    q, p = ls.exp(), lt.exp()
    if divergence == "jsd" and beta == 0.0 or divergence == "skew_kl" and skew == 0.0:
        divergence = "kl"
    if divergence == "jsd" and beta == 1.0 or divergence == "skew_reverse_kl" and skew == 0.0:
        divergence = "reverse_kl"
    if divergence == "kl":
        return _xlogy_diff(p, lt, ls).sum(-1)
    if divergence == "reverse_kl":
        return _xlogy_diff(q, ls, lt).sum(-1)
    if divergence == "jsd":
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        return beta * _xlogy_diff(p, lt, lm).sum(-1) + (1 - beta) * _xlogy_diff(q, ls, lm).sum(-1)
    if divergence == "skew_kl":
        lm = torch.logaddexp(lt + math.log(skew), ls + math.log1p(-skew))
        return _xlogy_diff(p, lt, lm).sum(-1)
    if divergence == "skew_reverse_kl":
        lm = torch.logaddexp(ls + math.log(skew), lt + math.log1p(-skew))
        return _xlogy_diff(q, ls, lm).sum(-1)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError("unknown divergence %r" % (divergence,))


def _reduce(rows, keep, reduction, num_items_in_batch):
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if num_items_in_batch is not None:
        return rows.sum() / num_items_in_batch
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / keep.sum().clamp(min=1)


def _with_hard(rows, fs, lead, target, hard_weight, ignore_index, reduction, num_items_in_batch):
    """rows plus hard_weight times the CE of the untempered student logits fs, masked and reduced."""
    keep = torch.ones(lead, dtype=torch.bool, device=fs.device)
    if target is not None:
        keep = target != ignore_index
        if hard_weight != 0:
            safe = torch.where(keep, target, torch.zeros_like(target))
            ce = torch.logsumexp(fs, -1) - fs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
            rows = rows + hard_weight * ce
    return _reduce(rows, keep, reduction, num_items_in_batch)


def _student_logits(student_hidden, student_weight, student_bias, vs, scale, cap):
    z = student_hidden @ student_weight[:vs].T
    if student_bias is not None:
        z = z + student_bias[:vs]
    return _transform(z, scale, cap)


def fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                         teacher_logits=None, target=None, student_bias=None, teacher_bias=None, divergence="kl",
                         beta=0.5, skew=0.1, temperature=1.0, scale_t2=False, soft_weight=1.0, hard_weight=0.0,
                         ignore_index=-100, reduction="mean", num_items_in_batch=None, vocab_size=None,
                         student_softcap=None, teacher_softcap=None, student_logit_scale=1.0,
                         teacher_logit_scale=1.0, chunk_size=None):
    """Reference of :func:`kdops.functional.fused_linear_kd_loss` (``chunk_size`` is accepted and ignored)."""
    vs = vocab_size or student_weight.shape[0]
    lead = student_hidden.shape[:-1]
    fs = _student_logits(student_hidden, student_weight, student_bias, vs, student_logit_scale, student_softcap)
    if teacher_logits is not None:
        zt = teacher_logits[..., :vs]
    else:
        zt = teacher_hidden @ teacher_weight[:vs].T
        if teacher_bias is not None:
            zt = zt + teacher_bias[:vs]
    ft = _transform(zt, teacher_logit_scale, teacher_softcap)
    ls = F.log_softmax(fs / temperature, dim=-1)
    lt = F.log_softmax(ft / temperature, dim=-1)
    soft = _divergence(ls, lt, divergence, beta, skew).clamp(min=0)
    if scale_t2:
        soft = soft * temperature ** 2
    return _with_hard(soft_weight * soft, fs, lead, target, hard_weight, ignore_index, reduction, num_items_in_batch)


def topk_kd_loss(student_hidden, student_weight, teacher_ids, teacher_logprobs, target=None, student_bias=None,
                 tail="renormalize", teacher_temperature=1.0, temperature=1.0, scale_t2=False, soft_weight=1.0,
                 hard_weight=0.0, ignore_index=-100, reduction="mean", num_items_in_batch=None, vocab_size=None,
                 student_softcap=None, student_logit_scale=1.0, chunk_size=None):
    """Reference of :func:`kdops.functional.topk_kd_loss` (``chunk_size`` is accepted and ignored)."""
    vs = vocab_size or student_weight.shape[0]
    lead = student_hidden.shape[:-1]
    fs = _student_logits(student_hidden, student_weight, student_bias, vs, student_logit_scale, student_softcap)
    ls = F.log_softmax(fs / temperature, dim=-1)
    lq = ls.gather(-1, teacher_ids)
    lp = teacher_logprobs.to(ls.dtype)
    if teacher_temperature != temperature:
        lp = torch.log_softmax(lp * (teacher_temperature / temperature), dim=-1)
    p = lp.exp()
    P = p.sum(-1).clamp(max=1)
    has_teacher = P > 0
    if tail == "renormalize":
        lpn = lp - torch.where(has_teacher, P, torch.ones_like(P)).log().unsqueeze(-1)
        lqn = lq - torch.logsumexp(lq, -1, keepdim=True)
        soft = _xlogy_diff(lpn.exp(), lpn, lqn).sum(-1).clamp(min=0)
    else:
        soft = _xlogy_diff(p, lp, lq).sum(-1)
        if tail == "bucket":
            mask = torch.zeros_like(ls, dtype=torch.bool).scatter(-1, teacher_ids, True)
            R = torch.where(mask, torch.zeros_like(ls), ls.exp()).sum(-1)
            rest = 1 - P
            soft = soft + torch.where(rest > 0, rest * (rest.clamp(min=1e-300).log() - R.log()),
                                      torch.zeros_like(rest))
            soft = soft.clamp(min=0)
    soft = torch.where(has_teacher, soft, torch.zeros_like(soft))
    if scale_t2:
        soft = soft * temperature ** 2
    return _with_hard(soft_weight * soft, fs, lead, target, hard_weight, ignore_index, reduction, num_items_in_batch)
