"""Drop-in ``nn.Module`` losses of the feature-map family (OFD, FitNet hints, projector + LogSum), which hold
their connectors / regressors / projectors, and the Overhaul's helpers: the margins from a teacher's BatchNorm
and the capture of pre-ReLU features with forward hooks."""

import math

import torch
from torch import nn

from kdops.functional import feature as F

_PHI_CUTOFF = 1e-3


def _normal_cdf(x):
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def margins_from_batchnorm(bn):
    """Per-channel margins from the BatchNorm that precedes a teacher ReLU.

    With sigma = |gamma_c| and mu = beta_c (the BN's affine parameters), the margin is the mean of the
    negative part of N(mu, sigma^2): m_c = mu - sigma * phi(mu / sigma) / Phi(-mu / sigma); where
    Phi(-mu / sigma) <= 1e-3 it is -3 sigma, as in the released code. For gamma = 0 (a point mass at mu) it is
    the limit of that formula: min(mu, 0). Returns a float32 tensor (C,) on the BN's device.
    """
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.weight is None or bn.bias is None:
        raise ValueError("margins_from_batchnorm: bn must be a BatchNorm layer with affine parameters, got %r" % (bn,))
    margins = []
    for gamma, beta in zip(bn.weight.detach().double().cpu().tolist(), bn.bias.detach().double().cpu().tolist()):
        sigma, mu = abs(gamma), beta
        if sigma == 0.0:
            margins.append(min(mu, 0.0))
            continue
        tail = _normal_cdf(-mu / sigma)
        if tail > _PHI_CUTOFF:
            pdf = math.exp(-0.5 * (mu / sigma) ** 2) / math.sqrt(2.0 * math.pi)
            margins.append(mu - sigma * pdf / tail)
        else:
            margins.append(-3.0 * sigma)
    return torch.tensor(margins, dtype=torch.float32, device=bn.weight.device)


class FeatureHooks:
    """Captures, on every forward of a model, one tensor per named submodule: its input (``"input"``) or
    output (``"output"``) at its last call in that forward.

    Pre-ReLU stage outputs of torchvision-style residual blocks (BasicBlock / Bottleneck, whose ``relu``
    runs last on ``out + identity``) are the inputs of the block's ``relu``::

        hooks = FeatureHooks({"s1": model.layer1[-1].relu, "s2": model.layer2[-1].relu}, capture="input")
        logits = model(x)
        feats = hooks.features()          # [pre-ReLU output of layer1, of layer2], in the order given

    For pre-activation networks (e.g. WRN), where each block starts with BN + ReLU, capture the ``"output"``
    of each stage's last block (or the input of the next stage's first ReLU). Call ``remove()`` when done.
    """

    def __init__(self, modules, capture="input"):
        if capture not in ("input", "output"):
            raise ValueError("FeatureHooks: capture must be 'input' or 'output', got %r" % (capture,))
        if not modules:
            raise ValueError("FeatureHooks: modules is empty")
        self._names = list(modules)
        self._store = {}
        self._handles = []
        for name, module in modules.items():
            if capture == "input":
                self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))
            else:
                self._handles.append(module.register_forward_hook(self._output_hook(name)))

    def _input_hook(self, name):
        def hook(module, args):
            self._store[name] = args[0]
        return hook

    def _output_hook(self, name):
        def hook(module, args, output):
            self._store[name] = output
        return hook

    def features(self):
        missing = [n for n in self._names if n not in self._store]
        if missing:
            raise RuntimeError("FeatureHooks: no forward has reached %s yet" % missing)
        return [self._store[n] for n in self._names]

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._store.clear()


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


class OFDLoss(nn.Module):
    """Overhaul of feature distillation over one or several stages.

    Each stage has a connector (1x1 conv student -> teacher channels, no bias, N(0, sqrt(2 / C_t)) init,
    then BatchNorm2d) applied to the student's pre-ReLU map, and the partial L2 against the teacher's pre-ReLU
    map under that stage's margins. Stages are weighted 2^-(n - i - 1) (the last stage 1) unless
    ``stage_weights`` is given, and the total is divided by the batch size and multiplied by ``scale``
    (1/1000 for CIFAR in the paper, 1/10000 for ImageNet).

    Args: student_channels, teacher_channels: int or one per stage; margins: (C_t,) tensor or one per stage
    (see :func:`margins_from_batchnorm`); they are kept as buffers.
    Call: ``loss(student_feats, teacher_feats)`` with a tensor or a list of tensors, one per stage.
    """

    def __init__(self, student_channels, teacher_channels, margins, stage_weights=None, scale=1.0 / 1000):
        super().__init__()
        s_ch, t_ch, margins = _as_list(student_channels), _as_list(teacher_channels), _as_list(margins)
        n = len(t_ch)
        if not (len(s_ch) == n == len(margins)):
            raise ValueError("OFDLoss: student_channels, teacher_channels and margins need one entry per stage, "
                             "got %d, %d and %d" % (len(s_ch), n, len(margins)))
        for i, (c, m) in enumerate(zip(t_ch, margins)):
            if not isinstance(m, torch.Tensor) or m.shape != (c,):
                raise ValueError("OFDLoss: margins[%d] must be a tensor of shape (%d,), got %s"
                                 % (i, c, getattr(m, "shape", type(m).__name__)))
        weights = [2.0 ** -(n - i - 1) for i in range(n)] if stage_weights is None else list(stage_weights)
        if len(weights) != n:
            raise ValueError("OFDLoss: stage_weights needs %d entries, got %d" % (n, len(weights)))
        self.stage_weights, self.scale = weights, float(scale)
        self.connectors = nn.ModuleList(self._connector(cs, ct) for cs, ct in zip(s_ch, t_ch))
        for i, m in enumerate(margins):
            self.register_buffer("margin_%d" % i, m.detach().float().clone())

    @staticmethod
    def _connector(c_in, c_out):
        conv = nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / c_out))
        bn = nn.BatchNorm2d(c_out)
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)
        return nn.Sequential(conv, bn)

    def forward(self, student_feats, teacher_feats):
        s_list, t_list = _as_list(student_feats), _as_list(teacher_feats)
        if len(s_list) != len(self.connectors) or len(t_list) != len(self.connectors):
            raise ValueError("OFDLoss: expected %d stage(s) of features, got %d student and %d teacher"
                             % (len(self.connectors), len(s_list), len(t_list)))
        total = 0.0
        for i, (s, t, connector, w) in enumerate(zip(s_list, t_list, self.connectors, self.stage_weights)):
            margin = getattr(self, "margin_%d" % i)
            mapped = connector(s)
            if mapped.shape != t.shape:
                raise ValueError("OFDLoss: stage %d: connected student map %s does not match the teacher map %s"
                                 % (i, tuple(mapped.shape), tuple(t.shape)))
            total = total + w * F.partial_l2_loss(mapped, t, margin.to(mapped.device))
        return total / s_list[0].shape[0] * self.scale


class HintLoss(nn.Module):
    """FitNet hint loss: MSE between a regressor of the student feature and the teacher feature.

    regressor: ``"auto"`` picks by spatial sizes (as RepDistiller's ConvReg): equal -> 1x1 conv (``"conv3x3"``
    for a 3x3 one), student twice the teacher -> 3x3 conv with stride 2, student half the teacher ->
    4x4 transposed conv with stride 2, student larger otherwise -> a valid conv of the size difference;
    each followed by BatchNorm2d and ReLU. ``None`` (or ``"identity"``) when the shapes already match.
    """

    def __init__(self, student_channels, teacher_channels, student_size=None, teacher_size=None, regressor="auto"):
        super().__init__()
        s_size = _pair(student_size) if student_size is not None else None
        t_size = _pair(teacher_size) if teacher_size is not None else None
        self.regressor = self._build(student_channels, teacher_channels, s_size, t_size, regressor)

    @staticmethod
    def _build(cs, ct, s_size, t_size, kind):
        if kind in (None, "identity"):
            if cs != ct:
                raise ValueError("HintLoss: channels differ (%d vs %d): a regressor is needed" % (cs, ct))
            return nn.Identity()
        if kind == "conv1x1" or (kind == "auto" and (s_size is None or s_size == t_size)):
            conv = nn.Conv2d(cs, ct, kernel_size=1)
        elif kind == "conv3x3":
            conv = nn.Conv2d(cs, ct, kernel_size=3, padding=1)
        elif kind == "auto":
            (sh, sw), (th, tw) = s_size, t_size
            if (sh, sw) == (2 * th, 2 * tw):
                conv = nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
            elif (2 * sh, 2 * sw) == (th, tw):
                conv = nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
            elif sh >= th and sw >= tw:
                conv = nn.Conv2d(cs, ct, kernel_size=(1 + sh - th, 1 + sw - tw))
            else:
                raise ValueError("HintLoss: no regressor maps a %s student map onto a %s teacher map"
                                 % ((sh, sw), (th, tw)))
        else:
            raise ValueError("HintLoss: regressor must be 'auto', 'conv1x1', 'conv3x3' or None, got %r" % (kind,))
        return nn.Sequential(conv, nn.BatchNorm2d(ct), nn.ReLU(inplace=True))

    def forward(self, student_feat, teacher_feat):
        return F.hint_loss(self.regressor(student_feat), teacher_feat)


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


class ProjectorLogSumLoss(nn.Module):
    """Projector + normalisation + LogSum (Miles & Mikolajczyk): weight * log sum |norm(P z_s) - norm(z_t)|^alpha.

    projector: ``"linear"`` (d_s -> d_t with bias), ``"mlp"`` (Linear-BN-ReLU-Linear through ``hidden``) or
    ``"identity"`` (no projector: the paper's "no projector" ablation; needs d_s == d_t).
    norm: ``"bn"`` (BatchNorm1d without affine, eps 1e-4, batch statistics in train and eval alike, as the
    recipe; needs b >= 2), ``"l2"`` (unit rows), ``"group"`` (group norm without affine, ``groups`` groups),
    ``"none"``. The paper's ablation compares these and alpha in {1, 1.5, ..., 5}.
    Call: ``loss(student_features, teacher_features)`` with pooled features (b, d_s) and (b, d_t).
    """

    NORMS = ("bn", "l2", "group", "none")

    def __init__(self, student_dim, teacher_dim, alpha=4.0, weight=2.0, norm="bn", projector="linear", hidden=1024,
                 eps=0.0, groups=32):
        super().__init__()
        if norm not in self.NORMS:
            raise ValueError("ProjectorLogSumLoss: norm must be one of %s, got %r" % (self.NORMS, norm))
        if not (alpha > 0):
            raise ValueError("ProjectorLogSumLoss: alpha must be > 0, got %r" % (alpha,))
        if norm == "group" and teacher_dim % groups:
            raise ValueError("ProjectorLogSumLoss: groups=%d must divide teacher_dim=%d" % (groups, teacher_dim))
        if projector == "linear":
            self.projector = nn.Linear(student_dim, teacher_dim)
        elif projector == "mlp":
            self.projector = nn.Sequential(nn.Linear(student_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                           nn.Linear(hidden, teacher_dim))
        elif projector == "identity":
            if student_dim != teacher_dim:
                raise ValueError("ProjectorLogSumLoss: projector='identity' needs student_dim == teacher_dim, got %d "
                                 "and %d" % (student_dim, teacher_dim))
            self.projector = nn.Identity()
        else:
            raise ValueError("ProjectorLogSumLoss: projector must be 'linear', 'mlp' or 'identity', got %r"
                             % (projector,))
        self.alpha, self.weight, self.norm, self.eps, self.groups = alpha, weight, norm, eps, groups
        self.teacher_dim = teacher_dim

    def _normalise(self, x):
        if self.norm == "bn":
            return torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-4)
        if self.norm == "l2":
            return torch.nn.functional.normalize(x, dim=1)
        if self.norm == "group":
            return torch.nn.functional.group_norm(x, self.groups)
        return x

    def forward(self, student_features, teacher_features):
        if student_features.dim() != 2 or teacher_features.dim() != 2:
            raise ValueError("ProjectorLogSumLoss: features must be (b, d), got %s and %s"
                             % (tuple(student_features.shape), tuple(teacher_features.shape)))
        if student_features.shape[0] != teacher_features.shape[0]:
            raise ValueError("ProjectorLogSumLoss: batch sizes differ: %d and %d"
                             % (student_features.shape[0], teacher_features.shape[0]))
        if teacher_features.shape[1] != self.teacher_dim:
            raise ValueError("ProjectorLogSumLoss: teacher features have %d dims, expected teacher_dim=%d"
                             % (teacher_features.shape[1], self.teacher_dim))
        if self.norm == "bn" and student_features.shape[0] < 2:
            raise ValueError("ProjectorLogSumLoss: norm='bn' uses batch statistics and needs a batch of at least 2, "
                             "got %d" % student_features.shape[0])
        z_s = self._normalise(self.projector(student_features))
        z_t = self._normalise(teacher_features)
        return self.weight * F.logsum_loss((z_s, z_t), alpha=self.alpha, eps=self.eps)
