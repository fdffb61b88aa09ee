"""nn.Module forms of the relational losses (see kdops.functional.relational for the formulas and conventions)."""

from torch import nn

from kdops.functional import relational as R


class FKDLoss(nn.Module):
    """Feature Kernel Distillation; forward(student_feats, teacher_feats or a list of them)."""

    def __init__(self, kernel="correlation", fr_weight=0.0, fr_power=2, gather_distributed=False):
        super().__init__()
        self.kw = dict(kernel=kernel, fr_weight=fr_weight, fr_power=fr_power, gather_distributed=gather_distributed)

    def forward(self, student_feats, teacher_feats):
        return R.fkd_loss(student_feats, teacher_feats, **self.kw)


class _Pair(nn.Module):
    fn = None

    def __init__(self, gather_distributed=False, **kw):
        super().__init__()
        self.kw = dict(kw, gather_distributed=gather_distributed)

    def forward(self, student, teacher):
        return type(self).fn(student, teacher, **self.kw)


class SPLoss(_Pair):
    """Similarity-preserving KD."""
    fn = staticmethod(R.sp_loss)


class PKTLoss(_Pair):
    """Probabilistic knowledge transfer."""
    fn = staticmethod(R.pkt_loss)

    def __init__(self, eps=1e-7, gather_distributed=False):
        super().__init__(gather_distributed, eps=eps)


class CCLoss(_Pair):
    """Correlation congruence."""
    fn = staticmethod(R.cc_loss)

    def __init__(self, gamma=0.4, order=2, gather_distributed=False):
        super().__init__(gather_distributed, gamma=gamma, order=order)


class RKDLoss(nn.Module):
    """distance_weight * RKD distance + angle_weight * RKD angle (the CRD benchmark's 25 and 50)."""

    def __init__(self, distance_weight=25.0, angle_weight=50.0, gather_distributed=False):
        super().__init__()
        self.distance_weight, self.angle_weight = distance_weight, angle_weight
        self.gather_distributed = gather_distributed

    def forward(self, student, teacher):
        return R.rkd_loss(student, teacher, self.distance_weight, self.angle_weight, self.gather_distributed)


class ATLoss(nn.Module):
    """Attention transfer on one pair of maps (spatial sizes must match)."""

    def __init__(self, p=2, mode="code"):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, student, teacher):
        return R.at_loss(student, teacher, p=self.p, mode=self.mode)


class NSTLoss(nn.Module):
    """Neural selectivity transfer (polynomial-kernel MMD over channels)."""

    def forward(self, student, teacher):
        return R.nst_loss(student, teacher)


class FSPLoss(nn.Module):
    """FSP; forward(student_pairs, teacher_pairs), lists of (first, second) maps."""

    def forward(self, student_pairs, teacher_pairs):
        return R.fsp_loss(student_pairs, teacher_pairs)
