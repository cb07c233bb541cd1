"""fastres.convert: swap torchvision's ResNet blocks for fastres's, in place, keeping weights and outputs."""
import sys

from torch import nn

from fastres.nn._fused import FoldCache
from fastres.nn.blocks import BasicBlock, Bottleneck


def _swap_map():
    """{torchvision block class: fastres block class}; empty if torchvision was never imported (then no model can
    hold its blocks, and there is no reason to import it)."""
    tv = sys.modules.get("torchvision.models.resnet")
    if tv is None:
        return {}
    return {tv.BasicBlock: BasicBlock, tv.Bottleneck: Bottleneck}


def _fastres_block(old, cls):
    """A `cls` that is `old` in every respect (the same submodule objects, buffers, hooks, training flag)."""
    new = cls.__new__(cls)
    new.__dict__.update(old.__dict__)
    # Own copies of the containers, so later changes to one block do not show up in the other; the hook dicts stay
    # shared so that handles registered on the old block still remove their hooks.
    new._modules = old._modules.copy()
    new._parameters = old._parameters.copy()
    new._buffers = old._buffers.copy()
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    new.residual = True
    if cls is Bottleneck:
        new.stride_in_1x1 = False  # torchvision strides the 3x3: its conv1 has stride 1
    new._fastres_fold_cache = FoldCache()
    return new


def convert(model):
    """Replace every torchvision.models.resnet BasicBlock / Bottleneck in `model` (recursively, the root included)
    by fastres.nn's, in place. The new blocks hold the very same submodules, so weights, optimizer state and outputs
    are kept. Returns the model (the new block when `model` itself is a torchvision block).

    Only exact torchvision block classes are swapped: a subclass may have changed forward.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    swap = _swap_map()
    if not swap:
        return model
    memo = {}

    def converted(m):
        cls = swap.get(type(m))
        if cls is None:
            return None
        if id(m) not in memo:
            memo[id(m)] = _fastres_block(m, cls)
        return memo[id(m)]

    def walk(module):
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            new = converted(child)
            if new is not None:
                module._modules[name] = new
                child = new
            walk(child)

    root = converted(model)
    if root is not None:
        model = root
    walk(model)
    return model
