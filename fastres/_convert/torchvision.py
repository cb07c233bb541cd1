"""torchvision: the ResNet family's blocks (ResNet, ResNeXt, Wide ResNet; FrozenBatchNorm2d and dilation included),
the classification root (stem fused, channels_last inside), and the detection / segmentation backbones'
IntermediateLayerGetter (stem fused; in eval on CPU its stem and layers run as one plan, fastres.models._eval_plan,
as fastres.models.ResNet's do)."""
from collections import OrderedDict

import torch

from fastres._convert._swap import swap_class
from fastres.nn._fused import FusedModuleMixin, _traced, functorch_active
from fastres.nn._lean import run_sequence, sequence_units
from fastres.nn.blocks import BasicBlock, Bottleneck

LIBRARY = "torchvision"


def _to_channels_last(x):
    if x.dim() == 4 and not functorch_active():
        return x.contiguous(memory_format=torch.channels_last)
    return x


class IntermediateLayerGetter(FusedModuleMixin, torch.nn.ModuleDict):
    """torchvision's detection / segmentation backbone body (its IntermediateLayerGetter): the same modules and
    return_layers, run channels_last with the stem's conv + norm + ReLU fused. In eval on CPU, where its modules
    are a ResNet's stem (conv, norm, ReLU: one unit), an optional pool and layers of fused blocks, and every return
    layer is the pool (or stem) or a layer, they run as one plan that returns every stage's output (_plan_stages)."""

    def _fused_units(self):
        return [(conv, norm) for _, _, conv, norm, _ in sequence_units(list(self.items()), self.return_layers)]

    def _plan_spec(self):
        """What the eval plan runs (fastres.models._eval_plan): the stem's unit, the module after it unless it is a
        layer (the pool), the layers (nn.Sequential); None where the modules are not so, or a return layer is
        another module. Keeps the names whose outputs the plan's stages are (_fastres_stage_names)."""
        items = list(self.items())
        units = sequence_units(items, self.return_layers)
        if not units or units[0][0] != 0:
            return None
        _, end, conv, norm, relu = units[0]
        stage_names, pool = [items[end - 1][0]], None
        if end < len(items) and type(items[end][1]) is not torch.nn.Sequential:
            (stage_names[0], pool), end = items[end], end + 1
        layers = items[end:]
        if not all(type(layer) is torch.nn.Sequential for _, layer in layers):
            return None
        stage_names += [name for name, _ in layers]
        if not set(self.return_layers) <= set(stage_names):
            return None
        self.__dict__["_fastres_stage_names"] = tuple(stage_names)
        return [(conv, norm, relu, items[0][0])], pool, [layer for _, layer in layers]

    def _plan_stages(self, x):
        """The output of the stem (after its pool) and of every layer: the plan's, or the fused modules'."""
        out = _eval_plan().run(self, x, head=False, stages=True)
        if out is not None:
            return out
        names, got = self._fastres_stage_names, {}
        run_sequence(list(self.items()), _to_channels_last(x), self.fold_cache, observed=names,
                     on_output=got.__setitem__)
        return tuple(got[name] for name in names)

    def forward(self, x):
        if not (self.training or functorch_active() or _traced()) and isinstance(x, torch.Tensor):
            stages = _eval_plan().run(self, x, head=False, stages=True)
            if stages is not None:
                return OrderedDict((self.return_layers[name], stage)
                                   for name, stage in zip(self._fastres_stage_names, stages)
                                   if name in self.return_layers)
        out = OrderedDict()

        def keep(name, value):
            out[self.return_layers[name]] = value

        run_sequence(list(self.items()), _to_channels_last(x), self.fold_cache, observed=self.return_layers,
                     on_output=keep)
        return out


def _eval_plan():
    from fastres.models import _eval_plan  # (it imports this module)
    return _eval_plan


class Sequential(FusedModuleMixin, torch.nn.Sequential):
    """A torchvision nn.Sequential subclass that keeps Sequential's forward (Conv2dNormActivation, DeepLabHead,
    ASPPConv, ...): the same modules in order, each conv + norm + ReLU run fused."""

    def _fused_units(self):
        return [(conv, norm) for _, _, conv, norm, _ in sequence_units(list(self._modules.items()))]

    def forward(self, x):
        return run_sequence(list(self._modules.items()), x, self.fold_cache)


# torchvision's nn.Sequential subclasses that do not override forward, by module and class name.
_SEQUENTIALS = {"torchvision.ops.misc": ("Conv2dNormActivation",),
                "torchvision.models.segmentation.deeplabv3": ("ASPPConv", "DeepLabHead"),
                "torchvision.models.segmentation.fcn": ("FCNHead",)}


def converters():
    import sys

    from fastres.models.resnet import ResNet

    found = {}
    resnet = sys.modules.get("torchvision.models.resnet")
    if resnet is not None:
        found[resnet.BasicBlock] = lambda m: swap_class(m, BasicBlock, residual=True)
        # torchvision strides the 3x3: its conv1 has stride 1
        found[resnet.Bottleneck] = lambda m: swap_class(m, Bottleneck, residual=True, stride_in_1x1=False)
        # fastres.models.ResNet has torchvision's attributes and forward, with the stem fused and channels_last inside
        found[resnet.ResNet] = lambda m: swap_class(m, ResNet)
    utils = sys.modules.get("torchvision.models._utils")
    if utils is not None:
        found[utils.IntermediateLayerGetter] = lambda m: swap_class(m, IntermediateLayerGetter)
    for module_name, names in _SEQUENTIALS.items():
        owner = sys.modules.get(module_name)
        for cls in (getattr(owner, n, None) for n in names):
            if cls is not None and cls.forward is torch.nn.Sequential.forward:
                found[cls] = lambda m: swap_class(m, Sequential)
    return found
