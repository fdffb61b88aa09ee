"""Overhaul margins against scipy, the multi-stage OFDLoss, pre-ReLU feature capture, and FitNet hints."""

import math

import pytest
import torch
from scipy.stats import norm
from torch import nn

from kdops import functional as F
from kdops import nn as knn
from kdops.nn import feature as overhaul
from kdops import reference as R


def scipy_margin(gamma, beta):
    """The released code's formula, evaluated with scipy.stats.norm."""
    s, m = abs(gamma), beta
    if norm.cdf(-m / s) > 0.001:
        return -s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / norm.cdf(-m / s) + m
    return -3 * s


def test_margins_match_scipy():
    bn = nn.BatchNorm2d(64)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(64) * 2)
        bn.bias.copy_(torch.randn(64) * 3)
        bn.weight[0], bn.bias[0] = 0.5, 3.0   # Phi(-6) < 1e-3: the -3 sigma branch
        bn.weight[1], bn.bias[1] = -0.5, -1.0  # negative gamma: sigma = |gamma|
    got = overhaul.margins_from_batchnorm(bn)
    expected = torch.tensor([scipy_margin(g, b) for g, b in zip(bn.weight.tolist(), bn.bias.tolist())],
                            dtype=torch.float32)
    assert got.dtype == torch.float32 and got.shape == (64,)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert got[0].item() == pytest.approx(-1.5)
    assert (got <= 0).all()  # the mean of a negative part is negative


def test_margin_of_zero_gamma_is_the_limit():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.copy_(torch.tensor([-2.0, 0.0, 1.5]))
    torch.testing.assert_close(overhaul.margins_from_batchnorm(bn), torch.tensor([-2.0, 0.0, 0.0]))
    # and the formula approaches it as gamma -> 0
    assert scipy_margin(1e-4, -2.0) == pytest.approx(-2.0, abs=1e-3)
    assert scipy_margin(1e-4, 1.5) == pytest.approx(0.0, abs=1e-3)


def test_margins_need_an_affine_batchnorm():
    with pytest.raises(ValueError, match="affine"):
        overhaul.margins_from_batchnorm(nn.BatchNorm2d(4, affine=False))
    with pytest.raises(ValueError, match="BatchNorm"):
        overhaul.margins_from_batchnorm(nn.Linear(2, 2))


def test_ofd_loss_three_stages_matches_a_hand_composition():
    s_ch, t_ch, sizes = [8, 16, 32], [16, 32, 64], [8, 4, 2]
    margins = [-torch.rand(c) for c in t_ch]
    loss_fn = knn.OFDLoss(s_ch, t_ch, margins)
    assert loss_fn.stage_weights == [0.25, 0.5, 1.0]
    s = [torch.randn(5, c, h, h) for c, h in zip(s_ch, sizes)]
    t = [torch.randn(5, c, h, h) for c, h in zip(t_ch, sizes)]
    loss = loss_fn(s, t)
    expected = sum(w * R.partial_l2_loss(conn(x), y, m)
                   for w, conn, x, y, m in zip([0.25, 0.5, 1.0], loss_fn.connectors, s, t, margins)) / 5 / 1000
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    grads = torch.autograd.grad(loss, list(loss_fn.parameters()))
    ref_grads = torch.autograd.grad(expected, list(loss_fn.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-8)


def test_ofd_connector_init_and_errors():
    loss_fn = knn.OFDLoss(8, 256, torch.zeros(256))
    conv, bn = loss_fn.connectors[0]
    assert conv.bias is None and isinstance(bn, nn.BatchNorm2d)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / 256), rel=0.1)
    with pytest.raises(ValueError, match="one entry per stage"):
        knn.OFDLoss([8, 8], [16], [torch.zeros(16)])
    with pytest.raises(ValueError, match=r"margins\[0\]"):
        knn.OFDLoss(8, 16, torch.zeros(15))
    with pytest.raises(ValueError, match="does not match the teacher map"):
        loss_fn(torch.randn(2, 8, 4, 4), torch.randn(2, 256, 2, 2))


class BasicBlock(nn.Module):
    """A torchvision-style residual block: relu(bn2(conv2(relu(bn1(conv1(x))))) + x)."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + x
        return self.relu(out)


def test_feature_hooks_capture_pre_relu_block_outputs():
    model = nn.Sequential(BasicBlock(4), BasicBlock(4)).eval()
    hooks = overhaul.FeatureHooks({"b0": model[0].relu, "b1": model[1].relu}, capture="input")
    x = torch.randn(2, 4, 6, 6)
    y = model(x)
    pre0, pre1 = hooks.features()
    b0 = model[0]
    expected0 = b0.bn2(b0.conv2(b0.relu(b0.bn1(b0.conv1(x))))) + x
    torch.testing.assert_close(pre0, expected0)
    torch.testing.assert_close(torch.relu(pre1), y)
    assert (pre1 < 0).any()  # really before the ReLU
    out_hooks = overhaul.FeatureHooks({"b0": model[0]}, capture="output")
    model(x)
    torch.testing.assert_close(out_hooks.features()[0], torch.relu(expected0))
    hooks.remove()
    out_hooks.remove()
    with pytest.raises(ValueError, match="capture"):
        overhaul.FeatureHooks({"b0": model[0]}, capture="grad")


@pytest.mark.parametrize("s_size,t_size,layer", [
    (8, 8, nn.Conv2d), (16, 8, nn.Conv2d), (4, 8, nn.ConvTranspose2d), (10, 8, nn.Conv2d)])
def test_hint_loss_regressors(s_size, t_size, layer):
    module = knn.HintLoss(6, 12, student_size=s_size, teacher_size=t_size)
    assert isinstance(module.regressor[0], layer)
    s, t = torch.randn(3, 6, s_size, s_size), torch.randn(3, 12, t_size, t_size)
    loss = module(s, t)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(module.regressor(s), t))
    loss.backward()
    assert module.regressor[0].weight.grad is not None


def test_hint_loss_errors():
    with pytest.raises(ValueError, match="no regressor"):
        knn.HintLoss(6, 12, student_size=3, teacher_size=8)
    with pytest.raises(ValueError, match="channels differ"):
        knn.HintLoss(6, 12, regressor=None)
    with pytest.raises(ValueError, match="same shape"):
        F.hint_loss(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 4, 4))
