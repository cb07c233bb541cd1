"""fold_bn(model): an eval-only copy of a model with every conv + BN pair folded into the conv."""
import copy
import sys

import torch
from torch import nn

from fastres import ops
from fastres.nn._fused import has_hooks, norm_kind

# torchvision classes whose forward applies bnN right after convN (looked up only if torchvision is imported:
# a model cannot hold its modules otherwise).
_TORCHVISION_PAIRS = {
    ("torchvision.models.resnet", "ResNet"): (("conv1", "bn1"),),
    ("torchvision.models.resnet", "BasicBlock"): (("conv1", "bn1"), ("conv2", "bn2")),
    ("torchvision.models.resnet", "Bottleneck"): (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
}


def _conv_norm_pairs(module):
    """[(conv attribute, norm attribute)] such that module's forward applies norm directly to conv's output."""
    pairs = getattr(type(module), "_conv_norm_pairs", None)
    if pairs is not None:
        return list(pairs)
    mod = sys.modules.get(type(module).__module__)
    if mod is not None and type(module).__module__.startswith("torchvision."):
        pairs = _TORCHVISION_PAIRS.get((type(module).__module__, type(module).__name__))
        if pairs is not None and getattr(mod, type(module).__name__, None) is type(module):
            return list(pairs)
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        names = list(module._modules)
        return [(a, b) for a, b in zip(names, names[1:])]
    return []


def _foldable(conv, norm):
    return (isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward
            and type(conv)._conv_forward is nn.Conv2d._conv_forward
            and not has_hooks(conv)
            and norm_kind(norm) in ("frozen", "bn_eval"))


def _fold_pair(conv, norm):
    with torch.no_grad():
        bn_weight = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
        bn_bias = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_var)
        weight, bias = ops.fold_bn(conv.weight, conv.bias, bn_weight, bn_bias, norm.running_mean,
                                   norm.running_var, float(norm.eps))
    requires_grad = conv.weight.requires_grad
    conv.weight = nn.Parameter(weight.detach(), requires_grad=requires_grad)
    conv.bias = nn.Parameter(bias.detach(), requires_grad=requires_grad)


def _plain_twin(module):
    """The plain-torch class that runs `module`'s submodules as its fastres class does, or None: the class
    fastres.convert swapped it from, else torchvision's class of the same structure."""
    original = module.__dict__.get("_fastres_original_class")
    if original is not None:
        return original
    from fastres.nn.blocks import BasicBlock, Bottleneck  # fold comes last in fastres.nn's chain
    if isinstance(module, (BasicBlock, Bottleneck)) and not module.residual:
        return None  # a plain net's block: torchvision's blocks always add a shortcut
    twins = {"BasicBlock": ("torchvision.models.resnet", "BasicBlock"),
             "Bottleneck": ("torchvision.models.resnet", "Bottleneck"),
             "ResNet": ("torchvision.models.resnet", "ResNet"),
             "VGG": ("torchvision.models.vgg", "VGG")}
    where = twins.get(type(module).__name__) if type(module).__module__.startswith("fastres.") else None
    if where is None:
        return None
    import importlib
    return getattr(importlib.import_module(where[0]), where[1])


def _to_plain(model):
    """Every fastres module of `model` swapped, in place, to its plain-torch twin (see _plain_twin)."""
    from fastres.nn._fused import FusedModuleMixin
    for name, module in model.named_modules():
        if not isinstance(module, FusedModuleMixin):
            continue
        twin = _plain_twin(module)
        if twin is None:
            raise ValueError(f"fold_bn(plain=True): {name or 'model'} ({type(module).__name__}) has no plain-torch "
                             "twin (a fastres class of its own: plain nets, CIFAR ResNets)")
        for attribute in ("_fastres_fold_cache", "_fastres_original_class", "_fastres_swapped"):
            module.__dict__.pop(attribute, None)
        module.__class__ = twin
    return model


def fold_bn(model, *, plain=False):
    """An eval-mode deep copy of `model` with each BatchNorm2d / FrozenBatchNorm2d that directly follows a Conv2d
    folded into the conv (which gains a bias) and replaced by nn.Identity. `model` itself is not touched.

    Pairs found: fastres blocks and models (conv1/bn1 ...), torchvision's ResNet stem and blocks, and consecutive
    Conv2d -> BatchNorm2d in an nn.Sequential (downsample shortcuts, VGG-BN features). The copy is for inference
    only: training it would train a network without its normalization. `model` must be in eval mode, since folding
    uses the running statistics.

    plain=True also turns every fastres module of the copy into plain torch (the class fastres.convert swapped it
    from, else torchvision's BasicBlock / Bottleneck / ResNet / VGG): Conv2d with bias, ReLU and add, which any tool
    exports or scripts (legacy ONNX export, torch.jit.script, ...). Raises ValueError for fastres classes without a
    plain twin (plain nets, CIFAR ResNets).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_bn: model must be an nn.Module, got {type(model).__name__}")
    training = [name or "model" for name, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(f"fold_bn: model is in training mode ({training[0]} has training=True); folding uses "
                           "the running statistics, which only eval mode normalizes with: call model.eval() first")
    folded = copy.deepcopy(model)
    for module in folded.modules():
        for conv_name, norm_name in _conv_norm_pairs(module):
            conv, norm = getattr(module, conv_name, None), getattr(module, norm_name, None)
            if _foldable(conv, norm):
                _fold_pair(conv, norm)
                setattr(module, norm_name, nn.Identity())
    if plain:
        _to_plain(folded)
    return folded.eval()
