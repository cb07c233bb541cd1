"""The paper's CIFAR-10 ResNets (section 4.2): depth 6n+2, 16/32/64 filters on 32x32/16x16/8x8 maps."""
import torch
from torch import nn
from torch.nn import functional as F

from fastres.nn._fused import FusedModuleMixin, is_plain_relu, keep_memory_format
from fastres.nn._lean import conv_norm_act
from fastres.nn.blocks import BasicBlock, conv1x1, conv3x3
from fastres.models import _eval_plan
from fastres.models.resnet import init_resnet_

SHORTCUTS = ("A", "B", "C")


class PadShortcut(nn.Module):
    """Option A: the identity, subsampled by `stride`, with zero channels appended up to `out_channels`.

    Parameter-free, so it adds nothing to the model.
    """

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"PadShortcut: out_channels ({out_channels}) must be >= in_channels ({in_channels})")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x):
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class CifarResNet(FusedModuleMixin, nn.Module):
    """3x3 conv 16 + BN + ReLU, three stages of n BasicBlocks (16, 32, 64 filters; the 2nd and 3rd start with
    stride 2), global average pooling and a `num_classes`-way fc: 6n+2 weighted layers.

    shortcut: "A" zero-padding for increasing dimensions (identity otherwise), "B" 1x1 projections for increasing
    dimensions only, "C" projections everywhere (the paper's table 3 options). plain=True: no shortcuts at all.
    """

    _conv_norm_pairs = (("conv1", "bn1"),)  # for fastres.fold_bn

    def __init__(self, depth, shortcut="A", plain=False, num_classes=10):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"cifar_resnet: depth must be 6n+2 for an integer n >= 1 (20, 32, 44, 56, 110, 1202, "
                             f"...), got depth={depth!r}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"cifar_resnet: shortcut must be one of {', '.join(map(repr, SHORTCUTS))}, "
                             f"got shortcut={shortcut!r}")
        if not isinstance(plain, bool):
            raise TypeError(f"cifar_resnet: plain must be a bool, got {plain!r}")
        n = (depth - 2) // 6
        self.depth, self.shortcut, self.plain = depth, shortcut, plain
        self.inplanes = 16
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n, stride=1)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        init_resnet_(self)
        self._init_fold_cache()

    def _shortcut(self, planes, stride):
        if self.plain:
            return None
        increasing = stride != 1 or self.inplanes != planes
        if self.shortcut == "C" or (self.shortcut == "B" and increasing):
            return nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))
        if increasing:  # option A
            return PadShortcut(self.inplanes, planes, stride)
        return None

    def _make_layer(self, planes, blocks, stride):
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            layers.append(BasicBlock(self.inplanes, planes, s, self._shortcut(planes, s), residual=not self.plain))
            self.inplanes = planes
        return nn.Sequential(*layers)

    def _plan_spec(self):
        """What the eval plan runs (fastres.models._eval_plan): conv1 + bn1 + a plain ReLU as one unit, no pool, the
        three layers."""
        if not is_plain_relu(self.relu):
            return None
        return [(self.conv1, self.bn1, True, "stem")], None, [self.layer1, self.layer2, self.layer3]

    def forward(self, x):
        if not self.training:
            out = _eval_plan.run(self, x)  # CPU eval: the units decided once (at batch 1, per-unit Python dominates)
            if out is not None:
                return out
        if is_plain_relu(self.relu):
            out = conv_norm_act(x, self.conv1, self.bn1, relu=True, cache=self.fold_cache, name="stem")
        else:
            out = self.relu(self.bn1(self.conv1(x)))
        out = keep_memory_format(out, x)
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(self.avgpool(out), 1)
        return self.fc(out)


def cifar_resnet(depth, shortcut="A", plain=False, num_classes=10):
    """The paper's CIFAR-10 ResNet (or plain net) of `depth` = 6n+2 layers; see CifarResNet."""
    return CifarResNet(depth, shortcut=shortcut, plain=plain, num_classes=num_classes)
