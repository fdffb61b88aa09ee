from typing import List, NamedTuple

import torch
from torch import nn


class Outputs(NamedTuple):
    logits: torch.Tensor
    pooled: torch.Tensor
    stages: List[torch.Tensor]
    preact: List[torch.Tensor]


class KDModel(nn.Module):
    """Base of the trainer's models: subclasses implement ``run(x) -> Outputs``."""

    feat_dim: int
    stage_channels: List[int]

    def run(self, x):
        raise NotImplementedError

    def forward(self, x, features=False):
        out = self.run(x)
        return out if features else out.logits

    def bn_before_relu(self):
        """One BatchNorm per stage, the one whose output (plus any shortcut) feeds that stage's last ReLU."""
        return list(self._bns)
