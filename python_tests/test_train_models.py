"""Model outputs: logits, penultimate features, stage outputs and pre-ReLU stage outputs, with their shapes."""

import pytest
import torch

from kdops.train import models

CIFAR = ["resnet8x4", "resnet32x4", "resnet20", "resnet56", "resnet110", "wrn-40-2", "wrn-16-2", "vgg8", "vgg13",
         "mobilenetv2"]
# (pooled width, stage channels, spatial size of the last stage) on 32x32 inputs
EXPECTED = {
    "resnet8x4": (256, [64, 128, 256], 8), "resnet32x4": (256, [64, 128, 256], 8),
    "resnet20": (64, [16, 32, 64], 8), "resnet56": (64, [16, 32, 64], 8), "resnet110": (64, [16, 32, 64], 8),
    "wrn-40-2": (128, [32, 64, 128], 8), "wrn-16-2": (128, [32, 64, 128], 8),
    "vgg8": (512, [64, 128, 256, 512, 512], 2), "vgg13": (512, [64, 128, 256, 512, 512], 2),
    "mobilenetv2": (1280, [16, 16, 48, 160], 4),
}


def check_outputs(model, x, num_classes):
    model.eval()
    out = model(x, features=True)
    b = x.shape[0]
    assert out.logits.shape == (b, num_classes)
    assert torch.equal(model(x), out.logits)
    assert out.pooled.shape == (b, model.feat_dim)
    assert [s.shape[1] for s in out.stages] == model.stage_channels
    assert len(out.preact) == len(out.stages)
    for s, p in zip(out.stages, out.preact):
        assert s.shape == p.shape and s.shape[0] == b
    return out


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_model_features(name):
    torch.manual_seed(0)
    model = models.build(name, 10, (3, 32, 32))
    out = check_outputs(model, torch.randn(2, 3, 32, 32), 10)
    width, channels, last = EXPECTED[name]
    assert model.feat_dim == width and model.stage_channels == channels
    assert out.stages[-1].shape[2:] == (last, last)
    sizes = [s.shape[-1] for s in out.stages]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 32
    if name == "mobilenetv2":  # linear bottlenecks: no ReLU at the end of a stage
        assert all(s is p for s, p in zip(out.stages, out.preact))
    else:
        for s, p in zip(out.stages, out.preact):
            assert torch.equal(s, torch.relu(p))
            assert (p < 0).any()  # really before the ReLU
    bns = model.bn_before_relu()
    assert [bn.num_features for bn in bns] == channels


def test_pooled_features_feed_the_classifier():
    model = models.build("resnet8x4", 100, (3, 32, 32)).eval()
    out = model(torch.randn(2, 3, 32, 32), features=True)
    torch.testing.assert_close(out.logits, model.fc(out.pooled))
    torch.testing.assert_close(out.pooled, out.stages[-1].mean((2, 3)))


@pytest.mark.parametrize("name, shape", [("mlp-s", (64,)), ("mlp-l", (1, 8, 8)), ("cnn-s", (1, 8, 8)),
                                         ("cnn-l", (3, 16, 16)), ("cnn1d-s", (1, 40)), ("cnn1d-m", (1, 40)),
                                         ("cnn1d-w", (1, 40)), ("mlp-w", (64,))])
def test_small_model_features(name, shape):
    model = models.build(name, 7, shape)
    out = check_outputs(model, torch.randn(3, *shape), 7)
    for s, p in zip(out.stages, out.preact):
        assert torch.equal(s, torch.relu(p))
    if name.startswith("mlp"):
        with pytest.raises(ValueError, match="BatchNorm"):
            model.bn_before_relu()
    else:
        assert [bn.num_features for bn in model.bn_before_relu()] == model.stage_channels


def test_sizes_share_stages_and_differ_in_width():
    s, l = models.build("cnn-s", 10, (1, 8, 8)), models.build("cnn-l", 10, (1, 8, 8))
    x = torch.randn(2, 1, 8, 8)
    so, lo = s.eval()(x, features=True), l.eval()(x, features=True)
    assert [t.shape[2:] for t in so.stages] == [t.shape[2:] for t in lo.stages]
    assert sum(p.numel() for p in l.parameters()) > 20 * sum(p.numel() for p in s.parameters())


def test_size_w_is_s_with_the_last_width_of_l():
    for family, shape in (("cnn1d", (1, 40)), ("cnn", (1, 8, 8)), ("mlp", (64,))):
        s, w, l = (models.build("%s-%s" % (family, k), 10, shape).eval() for k in "swl")
        x = torch.randn(2, *shape)
        so, wo, lo = (m(x, features=True) for m in (s, w, l))
        assert [a.shape[1] for a in wo.stages] == [a.shape[1] for a in so.stages[:-1]] + [lo.stages[-1].shape[1]]
        assert wo.pooled.shape == lo.pooled.shape


def test_bad_model_requests():
    with pytest.raises(ValueError, match="unknown model 'resnet9'"):
        models.build("resnet9", 10, (3, 32, 32))
    with pytest.raises(ValueError, match=r"image inputs \(C, H, W\)"):
        models.build("resnet20", 10, (64,))
    with pytest.raises(ValueError, match="cnn1d-s needs inputs"):
        models.build("cnn1d-s", 10, (1, 8, 8))
