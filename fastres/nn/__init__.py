"""fastres.nn: drop-in ResNet blocks and BN utilities that run through fastres.ops."""
from fastres.nn.blocks import BasicBlock, Bottleneck, conv1x1, conv3x3
from fastres.nn.fold import fold_bn
from fastres.nn.frozen_bn import FrozenBatchNorm2d, freeze_bn

__all__ = ["BasicBlock", "Bottleneck", "FrozenBatchNorm2d", "conv1x1", "conv3x3", "fold_bn", "freeze_bn"]
