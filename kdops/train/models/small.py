"""Small models for the bundled data: MLP (any input, flattened), 2-D CNN (images), 1-D CNN (signals).

Sizes ``s`` / ``m`` / ``l`` differ in width only (8x between ``s`` and ``l``), so a student and a teacher
of one family have the same stages and spatial sizes. Size ``w`` is ``s`` with the last stage as wide as
``l``'s: a small student whose penultimate features have the ``l`` teacher's width, for comparisons that need
equal widths (a loss without a projector).
"""

import math

import torch
from torch import nn

from kdops.train.models.base import KDModel, Outputs

WIDTHS = {
    "mlp": {"s": (32, 32), "m": (128, 128), "l": (512, 512), "w": (32, 512)},
    "cnn": {"s": (8, 16, 32), "m": (16, 32, 64), "l": (64, 128, 256), "w": (8, 16, 256)},
    "cnn1d": {"s": (8, 16, 32), "m": (16, 32, 64), "l": (64, 128, 256), "w": (8, 16, 256)},
}


class MLP(KDModel):
    """Linear - ReLU per hidden layer (a stage each), then a linear classifier. No BatchNorm: its outputs do
    not depend on how a batch is split, so data-parallel and single-process training agree exactly."""

    def __init__(self, in_features, widths, num_classes):
        super().__init__()
        dims = (in_features,) + tuple(widths)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.fc = nn.Linear(widths[-1], num_classes)
        self.feat_dim, self.stage_channels = widths[-1], list(widths)

    def bn_before_relu(self):
        raise ValueError("the MLP has no BatchNorm before its ReLUs, which OFD's margins need; use a cnn model")

    def run(self, x):
        x = x.flatten(1)
        stages, preact = [], []
        for lin in self.linears:
            pre = lin(x)
            x = torch.relu(pre)
            preact.append(pre)
            stages.append(x)
        return Outputs(self.fc(x), x, stages, preact)


class ConvNet(KDModel):
    """conv3x3 - BN - ReLU stages (Conv1d or Conv2d), max-pool 2 between stages, global average pool, linear."""

    def __init__(self, dims, in_channels, widths, num_classes):
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        chans = (in_channels,) + tuple(widths)
        self.convs = nn.ModuleList(conv(a, b, 3, padding=1, bias=False) for a, b in zip(chans[:-1], chans[1:]))
        self._bns = nn.ModuleList(bn(w) for w in widths)
        self.pool = nn.MaxPool2d(2) if dims == 2 else nn.MaxPool1d(2)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.feat_dim, self.stage_channels = widths[-1], list(widths)

    def run(self, x):
        stages, preact = [], []
        for i, (c, bn) in enumerate(zip(self.convs, self._bns)):
            if i > 0 and min(x.shape[2:]) >= 2:
                x = self.pool(x)
            pre = bn(c(x))
            x = torch.relu(pre)
            preact.append(pre)
            stages.append(x)
        pooled = x.flatten(2).mean(-1)
        return Outputs(self.fc(pooled), pooled, stages, preact)


def build(family, size, num_classes, input_shape):
    widths = WIDTHS[family][size]
    if family == "mlp":
        return MLP(math.prod(input_shape), widths, num_classes)
    need = 3 if family == "cnn" else 2
    if len(input_shape) != need:
        raise ValueError("model %s-%s needs inputs of shape %s, the data has shape %s"
                         % (family, size, "(C, H, W)" if need == 3 else "(C, L)", tuple(input_shape)))
    return ConvNet(need - 1, input_shape[0], widths, num_classes)
