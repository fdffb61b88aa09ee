"""Models for the trainer. Every model maps inputs to logits and, with ``model(x, features=True)``, returns
:class:`Outputs` with the features the distillation losses need:

- ``pooled``: the penultimate features (b, d), the input of the classifier;
- ``stages``: one output per stage (the activations the next stage consumes), e.g. (b, C_i, H_i, W_i);
- ``preact``: the same stages before their final ReLU (for OFD), with ``stages[i] == relu(preact[i])``
  except for MobileNetV2, whose linear bottlenecks end without a ReLU (there the two are the same tensor).

``model.bn_before_relu()`` lists the BatchNorm whose affine parameters describe each ``preact`` (the
margins of :func:`kdops.nn.margins_from_batchnorm`); ``model.feat_dim`` and ``model.stage_channels``
give the widths. Build by name with :func:`build`.
"""

from kdops.train.models.base import KDModel, Outputs
from kdops.train.models import cifar, small

_CIFAR = {
    "resnet8x4": lambda k, c: cifar.resnet_cifar(8, (32, 64, 128, 256), k, c),
    "resnet32x4": lambda k, c: cifar.resnet_cifar(32, (32, 64, 128, 256), k, c),
    "resnet20": lambda k, c: cifar.resnet_cifar(20, (16, 16, 32, 64), k, c),
    "resnet56": lambda k, c: cifar.resnet_cifar(56, (16, 16, 32, 64), k, c),
    "resnet110": lambda k, c: cifar.resnet_cifar(110, (16, 16, 32, 64), k, c),
    "wrn_40_2": lambda k, c: cifar.WideResNet(40, 2, k, c),
    "wrn_16_2": lambda k, c: cifar.WideResNet(16, 2, k, c),
    "vgg8": lambda k, c: cifar.VGG("vgg8", k, c),
    "vgg13": lambda k, c: cifar.VGG("vgg13", k, c),
    "mobilenetv2": lambda k, c: cifar.MobileNetV2(k, c, width=0.5),
}

SMALL = tuple("%s-%s" % (f, s) for f in ("mlp", "cnn", "cnn1d") for s in ("s", "m", "l", "w"))
MODELS = SMALL + tuple(_CIFAR)


def _canonical(name):
    key = name.lower().replace("-", "_")
    return key if key in _CIFAR else name.lower().replace("_", "-")


def build(name, num_classes, input_shape):
    """Model `name` (see :data:`MODELS`; ``wrn-40-2`` and ``wrn_40_2`` alike) for inputs of shape `input_shape`
    (without the batch dim) and `num_classes` outputs."""
    key = _canonical(name)
    input_shape = tuple(input_shape)
    if key in _CIFAR:
        if len(input_shape) != 3:
            raise ValueError("model %s needs image inputs (C, H, W), the data has shape %s" % (name, input_shape))
        return _CIFAR[key](num_classes, input_shape[0])
    if key in SMALL:
        family, size = key.rsplit("-", 1)
        return small.build(family, size, num_classes, input_shape)
    raise ValueError("unknown model %r; choose one of %s" % (name, ", ".join(MODELS)))


def default_family(input_shape):
    """The small-model family that fits inputs of this shape: cnn for images, cnn1d for signals, mlp otherwise."""
    return {3: "cnn", 2: "cnn1d"}.get(len(tuple(input_shape)), "mlp")


__all__ = ["KDModel", "Outputs", "MODELS", "build", "default_family"]
