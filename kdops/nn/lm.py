"""Language-model distillation modules: the fused lm_head + divergence losses of :mod:`kdops.functional.lm` as
``nn.Module`` drop-ins. They hold no parameters: the lm_head weights are passed in, so that the model keeps owning
(and sharding, under FSDP) them."""

from torch import nn

from kdops.functional import lm as F


class FusedLinearKDLoss(nn.Module):
    """:func:`kdops.functional.fused_linear_kd_loss` with its options fixed at construction.

    ``forward(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, teacher_logits=None,
    target=None, student_bias=None, teacher_bias=None, num_items_in_batch=None)``. Typical use, with HF-style
    models: ``loss_fn(student.model(ids).last_hidden_state, student.lm_head.weight,
    teacher.model(ids).last_hidden_state, teacher.lm_head.weight, target=labels)``.
    """

    def __init__(self, divergence="kl", beta=0.5, skew=0.1, temperature=1.0, scale_t2=False, soft_weight=1.0,
                 hard_weight=0.0, ignore_index=-100, reduction="mean", vocab_size=None, student_softcap=None,
                 teacher_softcap=None, student_logit_scale=1.0, teacher_logit_scale=1.0, chunk_size=None):
        super().__init__()
        self.options = dict(divergence=divergence, beta=beta, skew=skew, temperature=temperature, scale_t2=scale_t2,
                            soft_weight=soft_weight, hard_weight=hard_weight, ignore_index=ignore_index,
                            reduction=reduction, vocab_size=vocab_size, student_softcap=student_softcap,
                            teacher_softcap=teacher_softcap, student_logit_scale=student_logit_scale,
                            teacher_logit_scale=teacher_logit_scale, chunk_size=chunk_size)
        if divergence not in F.LM_DIVERGENCES:
            raise ValueError("FusedLinearKDLoss: divergence must be one of %s, got %r" % (F.LM_DIVERGENCES, divergence))
        if reduction not in F.LM_REDUCTIONS:
            raise ValueError("FusedLinearKDLoss: reduction must be one of %s, got %r" % (F.LM_REDUCTIONS, reduction))

    def forward(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, teacher_logits=None,
                target=None, student_bias=None, teacher_bias=None, num_items_in_batch=None):
        return F.fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits,
                                      target, student_bias, teacher_bias, num_items_in_batch=num_items_in_batch,
                                      **self.options)

    def extra_repr(self):
        return ", ".join("%s=%r" % kv for kv in self.options.items())


class TopKKDLoss(nn.Module):
    """:func:`kdops.functional.topk_kd_loss` with its options fixed at construction: distillation from stored or
    served top-k teacher log-probabilities.

    ``forward(student_hidden, student_weight, teacher_ids, teacher_logprobs, target=None, student_bias=None,
    num_items_in_batch=None)``.
    """

    def __init__(self, tail="renormalize", teacher_temperature=1.0, temperature=1.0, scale_t2=False,
                 soft_weight=1.0, hard_weight=0.0, ignore_index=-100, reduction="mean", vocab_size=None,
                 student_softcap=None, student_logit_scale=1.0, chunk_size=None):
        super().__init__()
        if tail not in F.TOPK_TAILS:
            raise ValueError("TopKKDLoss: tail must be one of %s, got %r" % (F.TOPK_TAILS, tail))
        if reduction not in F.LM_REDUCTIONS:
            raise ValueError("TopKKDLoss: reduction must be one of %s, got %r" % (F.LM_REDUCTIONS, reduction))
        self.options = dict(tail=tail, teacher_temperature=teacher_temperature, temperature=temperature,
                            scale_t2=scale_t2, soft_weight=soft_weight, hard_weight=hard_weight,
                            ignore_index=ignore_index, reduction=reduction, vocab_size=vocab_size,
                            student_softcap=student_softcap, student_logit_scale=student_logit_scale,
                            chunk_size=chunk_size)

    def forward(self, student_hidden, student_weight, teacher_ids, teacher_logprobs, target=None, student_bias=None,
                num_items_in_batch=None):
        return F.topk_kd_loss(student_hidden, student_weight, teacher_ids, teacher_logprobs, target, student_bias,
                              num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self):
        return ", ".join("%s=%r" % kv for kv in self.options.items())
