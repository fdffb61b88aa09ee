"""Overhaul of feature distillation (Heo et al., ICCV 2019): margins and pre-ReLU feature capture.

The loss itself is :func:`kdops.functional.partial_l2_loss` and the multi-stage module
:class:`kdops.nn.OFDLoss`.
"""

import math

import torch
from torch import nn

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
