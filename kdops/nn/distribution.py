"""``nn.Module`` forms of the distribution-matching losses: ``loss(student_features, teacher_features, ...)``
with features (n, d) and (m, d). See :mod:`kdops.functional.distribution` for the definitions."""

from torch import nn

from kdops.functional import distribution as D


class WassersteinLoss(nn.Module):
    """Exact W2^2 with the plan from ot.emd held fixed. See :func:`kdops.functional.wasserstein_exact`."""

    def forward(self, student, teacher):
        return D.wasserstein_exact(student, teacher)


class ClassConditionalWassersteinLoss(nn.Module):
    """Sum over the classes present of the per-class distance. See
    :func:`kdops.functional.class_conditional_wasserstein`; ``metric_kwargs`` go to the metric."""

    def __init__(self, metric="exact", **metric_kwargs):
        super().__init__()
        if metric not in D.CLASS_METRICS:
            raise ValueError("ClassConditionalWassersteinLoss: metric must be one of %s, got %r"
                             % (tuple(D.CLASS_METRICS), metric))
        self.metric, self.metric_kwargs = metric, metric_kwargs

    def forward(self, student, teacher, labels):
        return D.class_conditional_wasserstein(student, teacher, labels, self.metric, **self.metric_kwargs)

    def extra_repr(self):
        return "metric=%r" % (self.metric,)


class JointWassersteinLoss(nn.Module):
    """Exact OT on features and predictions jointly. See :func:`kdops.functional.joint_wasserstein`."""

    def __init__(self, beta=1.0):
        super().__init__()
        self.beta = beta

    def forward(self, student, teacher, student_logits, teacher_logits):
        return D.joint_wasserstein(student, teacher, student_logits, teacher_logits, self.beta)

    def extra_repr(self):
        return "beta=%s" % (self.beta,)


class GaussianWassersteinLoss(nn.Module):
    """W2^2 between fitted Gaussians (Bures). See :func:`kdops.functional.gaussian_wasserstein`."""

    def __init__(self, diagonal=False):
        super().__init__()
        self.diagonal = diagonal

    def forward(self, student, teacher):
        return D.gaussian_wasserstein(student, teacher, self.diagonal)

    def extra_repr(self):
        return "diagonal=%s" % (self.diagonal,)


class GaussianKLLoss(nn.Module):
    """KL(N_student || N_teacher). See :func:`kdops.functional.gaussian_kl`."""

    def __init__(self, diagonal=True, eps=1e-6):
        super().__init__()
        self.diagonal, self.eps = diagonal, eps

    def forward(self, student, teacher):
        return D.gaussian_kl(student, teacher, self.diagonal, self.eps)

    def extra_repr(self):
        return "diagonal=%s, eps=%s" % (self.diagonal, self.eps)


class MMDLoss(nn.Module):
    """Biased MMD^2 (fused). See :func:`kdops.functional.mmd`."""

    def __init__(self, kernel="rbf", bandwidth=None, gamma=None, coef0=1.0, degree=3, save_blocks=None):
        super().__init__()
        if kernel not in D.MMD_KERNELS:
            raise ValueError("MMDLoss: kernel must be one of %s, got %r" % (D.MMD_KERNELS, kernel))
        self.kernel, self.bandwidth, self.gamma, self.coef0, self.degree = kernel, bandwidth, gamma, coef0, degree
        self.save_blocks = save_blocks

    def forward(self, student, teacher):
        return D.mmd(student, teacher, self.kernel, self.bandwidth, self.gamma, self.coef0, self.degree,
                     self.save_blocks)

    def extra_repr(self):
        return "kernel=%r, bandwidth=%s" % (self.kernel, self.bandwidth)
