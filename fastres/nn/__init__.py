"""fastres.nn: drop-in ResNet blocks and BN utilities that run through fastres.ops."""
from fastres.nn._fused import refresh
from fastres.nn._lean import DEFAULT_MEMORY_MODE, MEMORY_MODES
from fastres.nn.blocks import BasicBlock, Bottleneck, conv1x1, conv3x3, set_memory_mode
from fastres.nn.fold import fold_bn
from fastres.nn.frozen_bn import FrozenBatchNorm2d, freeze_bn
from fastres.nn.sync_bn import SyncBatchNorm, convert_sync_batchnorm

__all__ = ["BasicBlock", "Bottleneck", "FrozenBatchNorm2d", "SyncBatchNorm", "conv1x1", "conv3x3",
           "convert_sync_batchnorm", "fold_bn", "freeze_bn", "refresh",
           "set_memory_mode", "MEMORY_MODES", "DEFAULT_MEMORY_MODE"]
