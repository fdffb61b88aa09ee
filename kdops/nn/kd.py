"""Drop-in ``nn.Module`` losses of the KD family: ``loss(student_logits, teacher_logits[, target])``."""

from torch import nn

from kdops.functional import kd as F


class KDLoss(nn.Module):
    """Hinton KD, T^2 * KL(p_t || p_s). See :func:`kdops.functional.kd_loss`."""

    def __init__(self, temperature=4.0, reduction="batchmean", scale_t2=True, ignore_index=-100):
        super().__init__()
        self.temperature, self.reduction, self.scale_t2, self.ignore_index = temperature, reduction, scale_t2, ignore_index

    def forward(self, student_logits, teacher_logits, target=None):
        return F.kd_loss(student_logits, teacher_logits, self.temperature, self.reduction, self.scale_t2, target,
                         self.ignore_index)

    def extra_repr(self):
        return "temperature=%s, reduction=%r, scale_t2=%s" % (self.temperature, self.reduction, self.scale_t2)


class ReverseKDLoss(KDLoss):
    """T^2 * KL(p_s || p_t). See :func:`kdops.functional.reverse_kd_loss`."""

    def forward(self, student_logits, teacher_logits, target=None):
        return F.reverse_kd_loss(student_logits, teacher_logits, self.temperature, self.reduction, self.scale_t2,
                                 target, self.ignore_index)


class JSDLoss(nn.Module):
    """Generalised JSD. See :func:`kdops.functional.jsd_loss`."""

    def __init__(self, temperature=4.0, beta=0.5, reduction="batchmean", scale_t2=True, ignore_index=-100):
        super().__init__()
        self.temperature, self.beta, self.reduction = temperature, beta, reduction
        self.scale_t2, self.ignore_index = scale_t2, ignore_index

    def forward(self, student_logits, teacher_logits, target=None):
        return F.jsd_loss(student_logits, teacher_logits, self.temperature, self.beta, self.reduction, self.scale_t2,
                          target, self.ignore_index)

    def extra_repr(self):
        return "temperature=%s, beta=%s, reduction=%r" % (self.temperature, self.beta, self.reduction)


class DKDLoss(nn.Module):
    """Decoupled KD, alpha * TCKD + beta * NCKD. See :func:`kdops.functional.dkd_loss`.

    mdistiller ramps the loss weight up over the first 20 epochs; that schedule belongs to the training loop.
    """

    def __init__(self, alpha=1.0, beta=8.0, temperature=4.0, reduction="batchmean", ignore_index=-100):
        super().__init__()
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.reduction, self.ignore_index = reduction, ignore_index

    def forward(self, student_logits, teacher_logits, target):
        return F.dkd_loss(student_logits, teacher_logits, target, self.alpha, self.beta, self.temperature,
                          self.reduction, self.ignore_index)

    def extra_repr(self):
        return "alpha=%s, beta=%s, temperature=%s" % (self.alpha, self.beta, self.temperature)


class MutualKDLoss(nn.Module):
    """Deep Mutual Learning's term for N peers, T^2 * sum_{j != i} KL(p_j || p_i) per peer i, the other peers held
    fixed; forward(logits) takes a list of N peers' logits (or one (N, ..., C) tensor) and returns the N terms.
    See :func:`kdops.functional.mutual_kd_loss`."""

    def __init__(self, temperature=1.0, reduction="batchmean", scale_t2=True, average_peers=False):
        super().__init__()
        self.temperature, self.reduction, self.scale_t2 = temperature, reduction, scale_t2
        self.average_peers = average_peers

    def forward(self, logits):
        return F.mutual_kd_loss(logits, self.temperature, self.reduction, self.scale_t2, self.average_peers)

    def extra_repr(self):
        return "temperature=%s, reduction=%r, scale_t2=%s, average_peers=%s" % (
            self.temperature, self.reduction, self.scale_t2, self.average_peers)
