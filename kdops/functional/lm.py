"""Language-model distillation: the output projection (lm_head) fused with the divergence, over token chunks.

Conventions follow ``METHODS.md`` ("Language-model distillation"). Tokens are rows: the hidden states
(..., H) are flattened to (tokens, H). Per token, the logits are z = h @ W^T (+ b) over the first ``vocab_size``
columns (padded vocabularies: the columns past it do not exist for either model, and get no gradient), then
f = softcap(scale * z) (f = c tanh(scale z / c) with a softcap c, else scale z), and P = softmax(f_t / T) (teacher),
Q = softmax(f_s / T) (student). The soft term is one of

- ``"kl"``: KL(P || Q) (forward KL, Hinton's KD); ``"reverse_kl"``: KL(Q || P);
- ``"jsd"``: beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q (TRL / Liger convention; beta = 0
  is forward KL and beta = 1 reverse KL, as in TRL);
- ``"skew_kl"``: KL(P || skew P + (1 - skew) Q), ``"skew_reverse_kl"``: KL(Q || skew Q + (1 - skew) P) (DistiLLM;
  skew = 0 is forward / reverse KL);
- ``"tvd"``: 1/2 sum |P - Q|;

times T^2 when ``scale_t2``. The hard term is the cross-entropy of the untempered f_s against ``target``. A
token's loss is soft_weight * soft + hard_weight * hard; tokens whose target is ``ignore_index`` count nowhere.
``reduction``: ``"mean"`` over the kept tokens (all-ignored gives 0), ``"sum"``, ``"none"`` (per token, 0 at
ignored ones), or with ``num_items_in_batch`` the sum divided by that count (gradient accumulation).

What is fused: the ops never hold the (tokens, V) logits. Per chunk of ``chunk_size`` tokens the logits come
from a GEMM whose output (fp32, or fp64 for fp64 inputs) is used as it is, the row kernel forms the row losses
and overwrites the logits with their gradient in a few passes that stay in cache, and two more GEMMs give that
chunk's hidden-state gradients and add its weight gradients (kept in fp32). The gradients are formed during the
forward, so the backward only scales them. The teacher's gradients are formed too when its tensors require grad.

Dtypes: any float dtypes; no logit is rounded to 16 bits before the softmax. On a CPU with AVX512-BF16, bf16
hidden states and weights go to kdops' bf16 GEMMs, which read them as they are and return the fp32 accumulator
(the logits' gradients enter the gradient GEMMs as two bf16 terms, hi + lo, so those gradients are as accurate
as with fp32 GEMMs); ``KDOPS_CPU_BF16_GEMM=0`` turns them off. Other 16-bit inputs (fp16, bf16 elsewhere) are
read through fp32 copies (the weight once per call, the hidden states per chunk). The result is fp32 for
16-bit or fp32 inputs, fp64 when an input is fp64; each gradient comes back in its input's dtype. Under
autocast the loss is computed as outside it.

Sharded weights (FSDP2, tensor parallel lm_head): pass the full weight. Under FSDP2 the module that owns the
lm_head all-gathers it once when its forward reads the parameter; call the loss from that forward (or gather
once yourself with ``weight.full_tensor()``), not per chunk: the chunk loop runs inside the op on the gathered
weight, and its gradient is reduce-scattered once by FSDP's backward hook. DDP needs nothing special.
"""

import math
import numbers

import torch

from kdops import _ops  # noqa: F401  (autograd / fake registrations)
from kdops._ops.lm import GRAD_SB, GRAD_SH, GRAD_SW, GRAD_TB, GRAD_TH, GRAD_TL, GRAD_TW
from kdops.functional import _dtypes
from kdops.functional._checks import finite

LM_DIVERGENCES = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
LM_REDUCTIONS = ("mean", "sum", "none")
TOPK_TAILS = ("renormalize", "zero", "bucket")

_CPU_CHUNK_BYTES = 64 << 20   # per-chunk logits buffers on the CPU (they stay a small multiple of the L2 size)
_CUDA_CHUNK_BYTES = 1 << 30   # at most, on CUDA (and at most 1/8 of the free memory)


def _real(name, arg, value, low=None, high=None, low_open=False, high_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not finite(value):
        raise ValueError("%s: %s must be a finite number, got %r" % (name, arg, value))
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError("%s: %s must be %s %g, got %r" % (name, arg, ">" if low_open else ">=", low, value))
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError("%s: %s must be %s %g, got %r" % (name, arg, "<" if high_open else "<=", high, value))
    return float(value)


def _cap(name, arg, value):
    if value is None:
        return 0.0
    return _real(name, arg, value, low=0.0, low_open=True)


def _float_tensor(name, arg, t, dim=None):
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError("%s: %s must be a floating-point tensor, got %s"
                         % (name, arg, getattr(t, "dtype", type(t).__name__)))
    if dim is not None and t.dim() != dim:
        raise ValueError("%s: %s must be %d-d, got shape %s" % (name, arg, dim, tuple(t.shape)))
    return t


def _device(name, arg, t, ref):
    if t is not None and t.device != ref.device:
        raise ValueError("%s: %s must be on %s like student_hidden, got %s" % (name, arg, ref.device, t.device))


def _needs(t):
    return t is not None and torch.is_grad_enabled() and t.requires_grad


def _chunk(name, chunk_size, n, row_bytes, device):
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
            raise ValueError("%s: chunk_size must be an int >= 1 (tokens per chunk) or None, got %r"
                             % (name, chunk_size))
        return int(chunk_size)
    budget = _CPU_CHUNK_BYTES
    if device.type == "cuda":
        budget = _CUDA_CHUNK_BYTES
        if not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing():
            free, _ = torch.cuda.mem_get_info(device)
            budget = min(budget, free // 8)
    c = max(1, budget // max(row_bytes, 1))
    c = 1 << (c.bit_length() - 1)  # a power of two: stable across calls while memory stays about the same
    return max(1, min(c, max(n, 1)))


def _check_student(name, student_hidden, student_weight, student_bias):
    """The student side's checks, shared by both losses; returns (Hs, V)."""
    _float_tensor(name, "student_hidden", student_hidden)
    if student_hidden.dim() < 1:
        raise ValueError("%s: student_hidden must be (..., Hs), got a scalar" % name)
    _float_tensor(name, "student_weight", student_weight, 2)
    hs = student_hidden.shape[-1]
    if student_weight.shape[1] != hs:
        raise ValueError("%s: student_weight must be (V, %d) to match student_hidden's width, got %s"
                         % (name, hs, tuple(student_weight.shape)))
    V = student_weight.shape[0]
    if V == 0:
        raise ValueError("%s: student_weight has no rows (V = 0); the vocabulary needs at least one token" % name)
    if student_bias is not None:
        _float_tensor(name, "student_bias", student_bias, 1)
        if student_bias.shape[0] != V:
            raise ValueError("%s: student_bias must be (%d,), got %s" % (name, V, tuple(student_bias.shape)))
    return hs, V


def _rows_and_target(name, student_hidden, target, ignore_index, hard_weight):
    lead = student_hidden.shape[:-1]
    n = int(math.prod(lead))
    if target is not None:
        if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.is_complex() \
                or target.dtype == torch.bool:
            raise ValueError("%s: target must be an integer tensor of token ids %s, got %s"
                             % (name, tuple(lead), getattr(target, "dtype", type(target).__name__)))
        if tuple(target.shape) != tuple(lead):
            raise ValueError("%s: target must have the hidden states' leading shape %s, got %s"
                             % (name, tuple(lead), tuple(target.shape)))
        _device(name, "target", target, student_hidden)
        target = target.reshape(n).long()
    elif hard_weight != 0:
        raise ValueError("%s: hard_weight = %g needs a target" % (name, hard_weight))
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError("%s: ignore_index must be an int, got %r" % (name, ignore_index))
    return lead, n, target


def _reduction_weight(name, reduction, num_items_in_batch, target, ignore_index, n, ref, acc):
    """The row weights of the reduced total (None: all 1)."""
    if reduction not in LM_REDUCTIONS:
        raise ValueError("%s: reduction must be one of %s, got %r" % (name, LM_REDUCTIONS, reduction))
    if num_items_in_batch is not None:
        if reduction != "mean":
            raise ValueError("%s: num_items_in_batch replaces the mean's count; it needs reduction='mean', got %r"
                             % (name, reduction))
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError("%s: num_items_in_batch must be a number or a one-element tensor, got shape %s"
                                 % (name, tuple(num_items_in_batch.shape)))
            inv = 1.0 / num_items_in_batch.detach().reshape(()).to(device=ref.device, dtype=acc)
        else:
            count = _real(name, "num_items_in_batch", num_items_in_batch, low=0.0, low_open=True)
            inv = ref.new_full((), 1.0 / count, dtype=acc)
        return inv.expand(n)
    if reduction == "mean":
        if target is None:
            return ref.new_full((), 1.0 / max(n, 1), dtype=acc).expand(n)
        count = (target != ignore_index).sum().to(acc)
        return (1.0 / count.clamp(min=1)).expand(n)
    return None


def _soft_coef(name, soft_weight, temperature, scale_t2):
    soft_weight = _real(name, "soft_weight", soft_weight)
    return soft_weight * (temperature * temperature if scale_t2 else 1.0)


@_dtypes.loss
def fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                         teacher_logits=None, target=None, student_bias=None, teacher_bias=None, divergence="kl",
                         beta=0.5, skew=0.1, temperature=1.0, scale_t2=False, soft_weight=1.0, hard_weight=0.0,
                         ignore_index=-100, reduction="mean", num_items_in_batch=None, vocab_size=None,
                         student_softcap=None, teacher_softcap=None, student_logit_scale=1.0,
                         teacher_logit_scale=1.0, chunk_size=None):
    """Distillation loss of a student's lm_head against a teacher's, never forming the (tokens, V) logits.

    ``student_hidden`` (..., Hs) and ``student_weight`` (V, Hs) (``student_bias`` (V,)) give the student's logits;
    the teacher's come from ``teacher_hidden`` (..., Ht) and ``teacher_weight`` (Vt, Ht) (``teacher_bias``), Ht may
    differ from Hs, or from precomputed ``teacher_logits`` (..., Vt). ``target`` (...) int64: token ids for the
    hard CE and the ``ignore_index`` mask. ``vocab_size``: only the first ``vocab_size`` columns of both models
    count (required when V != Vt). The module docstring gives the divergences and reductions. Gradients reach
    ``student_hidden``, ``student_weight``, ``student_bias`` and, when they require grad, the teacher's tensors.

    ``chunk_size``: tokens per chunk; None picks a power of two from the vocabulary size (64 MiB of logits on the
    CPU; on CUDA 1 GiB, at most 1/8 of the free memory).
    """
    name = "fused_linear_kd_loss"
    hs, V = _check_student(name, student_hidden, student_weight, student_bias)
    lead = student_hidden.shape[:-1]
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise ValueError("%s: give either teacher_hidden and teacher_weight (and teacher_bias) or teacher_logits,"
                             " not both" % name)
        _float_tensor(name, "teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape[:-1]) != tuple(lead) or teacher_logits.dim() != student_hidden.dim():
            raise ValueError("%s: teacher_logits must be %s + (Vt,) (one row per token), got %s"
                             % (name, tuple(lead), tuple(teacher_logits.shape)))
        Vt = teacher_logits.shape[-1]
        if Vt == 0:
            raise ValueError("%s: teacher_logits has no columns (Vt = 0)" % name)
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("%s: the teacher is needed: teacher_hidden and teacher_weight, or teacher_logits" % name)
        _float_tensor(name, "teacher_hidden", teacher_hidden)
        if tuple(teacher_hidden.shape[:-1]) != tuple(lead) or teacher_hidden.dim() != student_hidden.dim():
            raise ValueError("%s: teacher_hidden must be %s + (Ht,) (the student's tokens), got %s"
                             % (name, tuple(lead), tuple(teacher_hidden.shape)))
        _float_tensor(name, "teacher_weight", teacher_weight, 2)
        if teacher_weight.shape[1] != teacher_hidden.shape[-1]:
            raise ValueError("%s: teacher_weight must be (Vt, %d) to match teacher_hidden's width, got %s"
                             % (name, teacher_hidden.shape[-1], tuple(teacher_weight.shape)))
        Vt = teacher_weight.shape[0]
        if Vt == 0:
            raise ValueError("%s: teacher_weight has no rows (Vt = 0)" % name)
        if teacher_bias is not None:
            _float_tensor(name, "teacher_bias", teacher_bias, 1)
            if teacher_bias.shape[0] != Vt:
                raise ValueError("%s: teacher_bias must be (%d,), got %s" % (name, Vt, tuple(teacher_bias.shape)))
    for arg, t in (("student_weight", student_weight), ("student_bias", student_bias),
                   ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                   ("teacher_bias", teacher_bias), ("teacher_logits", teacher_logits)):
        _device(name, arg, t, student_hidden)
    if vocab_size is None:
        if V != Vt:
            raise ValueError("%s: the student's vocabulary (%d) and the teacher's (%d) differ: pass vocab_size, the "
                             "number of leading columns both share" % (name, V, Vt))
        vs = V
    else:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) \
                or not 1 <= vocab_size <= min(V, Vt):
            raise ValueError("%s: vocab_size must be an int in [1, min(V, Vt)] = [1, %d], got %r"
                             % (name, min(V, Vt), vocab_size))
        vs = int(vocab_size)
    if divergence not in LM_DIVERGENCES:
        raise ValueError("%s: divergence must be one of %s, got %r" % (name, LM_DIVERGENCES, divergence))
    temperature = _real(name, "temperature", temperature, low=0.0, low_open=True)
    hard_weight = _real(name, "hard_weight", hard_weight)
    soft = _soft_coef(name, soft_weight, temperature, scale_t2)
    code, mix = LM_DIVERGENCES.index(divergence), 0.0
    if divergence == "jsd":
        mix = _real(name, "beta", beta, low=0.0, high=1.0)
        if mix == 0.0:
            code = 0
        elif mix == 1.0:
            code = 1
    elif divergence in ("skew_kl", "skew_reverse_kl"):
        mix = _real(name, "skew", skew, low=0.0, high=1.0, high_open=True)
        if mix == 0.0:
            code = 0 if divergence == "skew_kl" else 1
    s_cap = _cap(name, "student_softcap", student_softcap)
    t_cap = _cap(name, "teacher_softcap", teacher_softcap)
    s_scale = _real(name, "student_logit_scale", student_logit_scale)
    t_scale = _real(name, "teacher_logit_scale", teacher_logit_scale)
    lead, n, target = _rows_and_target(name, student_hidden, target, ignore_index, hard_weight)

    tensors = [student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
               teacher_logits]
    acc = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    sh = student_hidden.reshape(n, hs)
    if acc == torch.float64 and sh.dtype != acc:
        sh = sh.to(acc)
    th = teacher_hidden.reshape(n, teacher_hidden.shape[-1]) if teacher_hidden is not None else None
    tl = teacher_logits.reshape(n, Vt) if teacher_logits is not None else None
    w = _reduction_weight(name, reduction, num_items_in_batch, target, ignore_index, n, student_hidden, acc)
    chunk = _chunk(name, chunk_size, n, 4 * vs * (2 if acc == torch.float32 else 4), student_hidden.device)
    grad_mask = 0
    if reduction != "none":
        for t, bit in ((student_hidden, GRAD_SH), (student_weight, GRAD_SW), (student_bias, GRAD_SB),
                       (teacher_hidden, GRAD_TH), (teacher_weight, GRAD_TW), (teacher_bias, GRAD_TB),
                       (teacher_logits, GRAD_TL)):
            if _needs(t):
                grad_mask |= bit
    out = torch.ops.kdops.fused_linear_kd(
        sh, student_weight, student_bias, th, teacher_weight, teacher_bias, tl, target, w, code, mix, temperature,
        soft, hard_weight, int(ignore_index), vs, s_cap, t_cap, s_scale, t_scale, chunk, grad_mask)
    if reduction == "none":
        return out[1].reshape(lead)
    return out[0]


@_dtypes.loss
def topk_kd_loss(student_hidden, student_weight, teacher_ids, teacher_logprobs, target=None, student_bias=None,
                 tail="renormalize", teacher_temperature=1.0, temperature=1.0, scale_t2=False, soft_weight=1.0,
                 hard_weight=0.0, ignore_index=-100, reduction="mean", num_items_in_batch=None, vocab_size=None,
                 student_softcap=None, student_logit_scale=1.0, chunk_size=None):
    """Distillation against a top-k teacher (stored offline or served): K token ids and their log-probabilities.

    ``teacher_ids`` (..., K) int64, distinct per token, in [0, vocab_size); ``teacher_logprobs`` (..., K) their
    log-probabilities at generation temperature ``teacher_temperature`` (-inf for padding). When it differs from
    ``temperature`` they are re-tempered, p^(teacher_temperature / temperature) / Z with Z over the K ids (the tail
    mass is then 0). The student's log q_i = f_i / T - logsumexp over the whole kept vocabulary. ``tail``:

    - ``"renormalize"``: KL between both distributions restricted to the K ids and renormalised;
    - ``"zero"``: sum_K p_i (log p_i - log q_i), the teacher's missing mass ignored (not a divergence: it can be
      negative);
    - ``"bucket"``: ``"zero"`` plus (1 - P) log((1 - P) / (1 - Q)), the rest of both distributions as one bucket.

    A token whose K log-probs are all -inf has no teacher: its soft term is 0. The other arguments are those of
    :func:`fused_linear_kd_loss`.
    """
    name = "topk_kd_loss"
    hs, V = _check_student(name, student_hidden, student_weight, student_bias)
    lead = student_hidden.shape[:-1]
    if not isinstance(teacher_ids, torch.Tensor) or teacher_ids.is_floating_point() or teacher_ids.is_complex() \
            or teacher_ids.dtype == torch.bool:
        raise ValueError("%s: teacher_ids must be an integer tensor %s + (K,), got %s"
                         % (name, tuple(lead), getattr(teacher_ids, "dtype", type(teacher_ids).__name__)))
    if teacher_ids.dim() != student_hidden.dim() or tuple(teacher_ids.shape[:-1]) != tuple(lead) \
            or teacher_ids.shape[-1] < 1:
        raise ValueError("%s: teacher_ids must be %s + (K,) with K >= 1, got %s"
                         % (name, tuple(lead), tuple(teacher_ids.shape)))
    _float_tensor(name, "teacher_logprobs", teacher_logprobs)
    if teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError("%s: teacher_logprobs must have teacher_ids' shape %s, got %s"
                         % (name, tuple(teacher_ids.shape), tuple(teacher_logprobs.shape)))
    for arg, t in (("student_weight", student_weight), ("student_bias", student_bias),
                   ("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs)):
        _device(name, arg, t, student_hidden)
    if vocab_size is None:
        vs = V
    else:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or not 1 <= vocab_size <= V:
            raise ValueError("%s: vocab_size must be an int in [1, V] = [1, %d], got %r" % (name, V, vocab_size))
        vs = int(vocab_size)
    K = teacher_ids.shape[-1]
    if K > vs:
        raise ValueError("%s: teacher_ids has K = %d ids per token, more than the vocabulary (%d)" % (name, K, vs))
    if tail not in TOPK_TAILS:
        raise ValueError("%s: tail must be one of %s, got %r" % (name, TOPK_TAILS, tail))
    temperature = _real(name, "temperature", temperature, low=0.0, low_open=True)
    teacher_temperature = _real(name, "teacher_temperature", teacher_temperature, low=0.0, low_open=True)
    hard_weight = _real(name, "hard_weight", hard_weight)
    soft = _soft_coef(name, soft_weight, temperature, scale_t2)
    s_cap = _cap(name, "student_softcap", student_softcap)
    s_scale = _real(name, "student_logit_scale", student_logit_scale)
    lead, n, target = _rows_and_target(name, student_hidden, target, ignore_index, hard_weight)

    acc = torch.float64 if any(t is not None and t.dtype == torch.float64
                               for t in (student_hidden, student_weight, student_bias, teacher_logprobs)) \
        else torch.float32
    sh = student_hidden.reshape(n, hs)
    if acc == torch.float64 and sh.dtype != acc:
        sh = sh.to(acc)
    w = _reduction_weight(name, reduction, num_items_in_batch, target, ignore_index, n, student_hidden, acc)
    chunk = _chunk(name, chunk_size, n, vs * (4 if acc == torch.float32 else 8), student_hidden.device)
    grad_mask = 0
    if reduction != "none":
        for t, bit in ((student_hidden, GRAD_SH), (student_weight, GRAD_SW), (student_bias, GRAD_SB)):
            if _needs(t):
                grad_mask |= bit
    out = torch.ops.kdops.topk_kd(
        sh, student_weight, student_bias, teacher_ids.reshape(n, K).long(), teacher_logprobs.reshape(n, K).detach(),
        target, w, TOPK_TAILS.index(tail), teacher_temperature / temperature, temperature, soft, hard_weight,
        int(ignore_index), vs, s_cap, s_scale, chunk, grad_mask)
    if reduction == "none":
        return out[1].reshape(lead)
    return out[0]
