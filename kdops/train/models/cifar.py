"""The CIFAR model family of the distillation papers (the RepDistiller / CRD set): ResNet (resnet8x4,
resnet32x4, resnet20/56/110), WideResNet (wrn-40-2, wrn-16-2), VGG (vgg8, vgg13) and MobileNetV2 (width 0.5,
RepDistiller's ``mobile_half``). Global average pooling is adaptive, so other input sizes work too."""

import torch
from torch import nn

from kdops.train.models.base import KDModel, Outputs


def _conv3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _pool(x):
    return torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)


class BasicBlock(nn.Module):
    """Post-activation residual block; returns (relu(out), out) so the pre-ReLU map is available."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = _conv3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        pre = self.bn2(self.conv2(out)) + self.shortcut(x)
        return torch.relu(pre), pre


class ResNetCifar(KDModel):
    def __init__(self, depth, filters, num_classes, in_channels=3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("ResNet depth must be 6n + 2, got %d" % depth)
        n = (depth - 2) // 6
        self.conv1, self.bn1 = _conv3(in_channels, filters[0]), nn.BatchNorm2d(filters[0])
        self.layers = nn.ModuleList()
        cin = filters[0]
        for i, cout in enumerate(filters[1:]):
            stride = 1 if i == 0 else 2
            self.layers.append(nn.ModuleList(BasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1)
                                             for j in range(n)))
            cin = cout
        self.fc = nn.Linear(cin, num_classes)
        self.feat_dim, self.stage_channels = cin, list(filters[1:])

    def bn_before_relu(self):
        return [layer[-1].bn2 for layer in self.layers]

    def run(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        stages, preact = [], []
        for layer in self.layers:
            for block in layer:
                x, pre = block(x)
            stages.append(x)
            preact.append(pre)
        pooled = _pool(x)
        return Outputs(self.fc(pooled), pooled, stages, preact)


def resnet_cifar(depth, filters, num_classes, in_channels=3):
    return ResNetCifar(depth, filters, num_classes, in_channels)


class WideBlock(nn.Module):
    """Pre-activation block; returns (out, bn1(x)): bn1(x) is the pre-ReLU form of the block's input."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3(cout, cout)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x):
        pre = self.bn1(x)
        o = torch.relu(pre)
        out = self.conv2(torch.relu(self.bn2(self.conv1(o))))
        return out + (x if self.shortcut is None else self.shortcut(o)), pre


class WideResNet(KDModel):
    """WRN-depth-k. A stage's pre-ReLU output is the next BN applied to it (the next stage's first bn1, or the
    final BN), as in the Overhaul's code; its stage output is the ReLU of that."""

    def __init__(self, depth, k, num_classes, in_channels=3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WideResNet depth must be 6n + 4, got %d" % depth)
        n = (depth - 4) // 6
        widths = (16, 16 * k, 32 * k, 64 * k)
        self.conv1 = _conv3(in_channels, widths[0])
        self.layers = nn.ModuleList()
        for i in range(3):
            cin, cout, stride = widths[i], widths[i + 1], 1 if i == 0 else 2
            self.layers.append(nn.ModuleList(WideBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1)
                                             for j in range(n)))
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.feat_dim, self.stage_channels = widths[3], list(widths[1:])

    def bn_before_relu(self):
        return [self.layers[1][0].bn1, self.layers[2][0].bn1, self.bn]

    def run(self, x):
        x = self.conv1(x)
        preact = []
        for i, layer in enumerate(self.layers):
            for j, block in enumerate(layer):
                x, pre = block(x)
                if i > 0 and j == 0:
                    preact.append(pre)
        preact.append(self.bn(x))
        stages = [torch.relu(p) for p in preact]
        pooled = _pool(stages[-1])
        return Outputs(self.fc(pooled), pooled, stages, preact)


_VGG = {"vgg8": [[64], [128], [256], [512], [512]],
        "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]}


class VGG(KDModel):
    """VGG with BatchNorm, five stages of conv3x3-BN-ReLU with a 2x2 max-pool after each of the first four."""

    def __init__(self, cfg, num_classes, in_channels=3):
        super().__init__()
        self.stages_ = nn.ModuleList()
        cin = in_channels
        for widths in _VGG[cfg]:
            layers = []
            for w in widths:
                layers.append(nn.ModuleList([_conv3(cin, w), nn.BatchNorm2d(w)]))
                cin = w
            self.stages_.append(nn.ModuleList(layers))
        self.fc = nn.Linear(cin, num_classes)
        self.feat_dim, self.stage_channels = cin, [s[-1] for s in _VGG[cfg]]

    def bn_before_relu(self):
        return [stage[-1][1] for stage in self.stages_]

    def run(self, x):
        stages, preact = [], []
        for i, stage in enumerate(self.stages_):
            if i > 0 and min(x.shape[2:]) >= 2:
                x = torch.nn.functional.max_pool2d(x, 2)
            for conv, bn in stage:
                pre = bn(conv(x))
                x = torch.relu(pre)
            stages.append(x)
            preact.append(pre)
        pooled = _pool(x)
        return Outputs(self.fc(pooled), pooled, stages, preact)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.body(x)
        return x + out if self.residual else out


class MobileNetV2(KDModel):
    """MobileNetV2 for 32x32 inputs (stride-1 stem, as RepDistiller's). Four stages, one per resolution
    (32, 16, 8, 4 for CIFAR); their outputs are linear bottlenecks, so ``stages`` and ``preact`` coincide."""

    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]
    STAGE_OF = [0, 0, 1, 2, 2, 3, 3]

    def __init__(self, num_classes, in_channels=3, width=0.5):
        super().__init__()
        c = lambda v: max(8, int(v * width + 4) // 8 * 8)  # noqa: E731  (channels rounded to multiples of 8)
        self.stem = nn.Sequential(_conv3(in_channels, c(32)), nn.BatchNorm2d(c(32)), nn.ReLU(inplace=True))
        self.stages_ = nn.ModuleList(nn.Sequential() for _ in range(4))
        cin = c(32)
        for (t, ch, n, s), stage in zip(self.SETTINGS, self.STAGE_OF):
            for j in range(n):
                self.stages_[stage].append(InvertedResidual(cin, c(ch), s if j == 0 else 1, t))
                cin = c(ch)
        self.stage_channels = [stage[-1].body[-1].num_features for stage in self.stages_]
        last = 1280
        self.head = nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU(inplace=True))
        self.fc = nn.Linear(last, num_classes)
        self.feat_dim = last

    def bn_before_relu(self):
        return [stage[-1].body[-1] for stage in self.stages_]

    def run(self, x):
        x = self.stem(x)
        stages = []
        for stage in self.stages_:
            x = stage(x)
            stages.append(x)
        pooled = _pool(self.head(x))
        return Outputs(self.fc(pooled), pooled, stages, list(stages))
