"""torchvision: the ResNet family's blocks (ResNet, ResNeXt, Wide ResNet; FrozenBatchNorm2d and dilation included),
the classification root (stem fused, channels_last inside), and the detection / segmentation backbones'
IntermediateLayerGetter (stem fused; in eval on CPU its stem and layers run as one plan, as fastres.models.ResNet's
do: fastres._convert._stages)."""
from collections import OrderedDict

import torch

from fastres._convert._stages import StagesMixin, _to_channels_last
from fastres._convert._swap import swap_class
from fastres.nn._fused import FusedModuleMixin
from fastres.nn._lean import run_sequence, sequence_units
from fastres.nn.blocks import BasicBlock, Bottleneck

LIBRARY = "torchvision"


class IntermediateLayerGetter(StagesMixin, torch.nn.ModuleDict):
    """torchvision's detection / segmentation backbone body (its IntermediateLayerGetter): the same modules and
    return_layers, run channels_last with the stem's conv + norm + ReLU fused; in eval on CPU from the plan where it
    applies (fastres._convert._stages)."""

    def forward(self, x):
        out = self._planned_outputs(x)
        if out is not None:
            return out
        out = OrderedDict()

        def keep(name, value):
            out[self.return_layers[name]] = value

        run_sequence(self._stage_items(), _to_channels_last(x), self.fold_cache, observed=self.return_layers,
                     on_output=keep)
        return out


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
