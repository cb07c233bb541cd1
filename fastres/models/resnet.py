"""ResNet-18/34/50/101/152 (He et al. 2015) with torchvision's structure and state_dict keys, through fastres.ops.

variant="v1.5" (torchvision's default) strides the 3x3 of a Bottleneck; "v1" (the paper) strides its first 1x1.
plain=True builds the paper's plain nets: the same layers without shortcuts.
"""
import sys

import torch
from torch import nn

from fastres.models import _eval_plan

from fastres.nn._fused import FusedModuleMixin, _traced, functorch_active, has_hooks, is_plain_relu, \
    keep_memory_format
from fastres.nn._lean import conv_norm_act
from fastres.nn.blocks import BasicBlock, Bottleneck, _FusedBlock, conv1x1

VARIANTS = ("v1", "v1.5")


def _residual_last_norms(model):
    """The last norm of each residual branch: zero_init_residual's targets (fastres's and torchvision's blocks)."""
    tv = sys.modules.get("torchvision.models.resnet")
    tv_bottleneck = getattr(tv, "Bottleneck", None)
    tv_basic = getattr(tv, "BasicBlock", None)
    for m in model.modules():
        if isinstance(m, Bottleneck) or (tv_bottleneck is not None and isinstance(m, tv_bottleneck)):
            yield m.bn3
        elif isinstance(m, BasicBlock) or (tv_basic is not None and isinstance(m, tv_basic)):
            yield m.bn2


def init_resnet_(model, zero_init_residual=False):
    """He initialization as in the paper and torchvision: kaiming_normal_(fan_out, relu) for convs, norm weight 1 and
    bias 0; with zero_init_residual, the last norm of each residual branch starts at 0 (each block an identity)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for bn in _residual_last_norms(model):
            if getattr(bn, "weight", None) is not None:
                nn.init.constant_(bn.weight, 0)


class ResNet(FusedModuleMixin, nn.Module):
    """torchvision.models.ResNet with the stem conv1 + bn1 + relu fused through fastres.ops.

    Same constructor and submodules (conv1 bn1 relu maxpool layer1..layer4 avgpool fc), so torchvision checkpoints
    load unchanged. Keyword-only extras: `stride_in_1x1` (Bottleneck only: the paper's v1) and `residual=False`
    (no shortcuts: the paper's plain nets).
    """

    _conv_norm_pairs = (("conv1", "bn1"),)

    def __init__(self, block, layers, num_classes=1000, zero_init_residual=False, groups=1, width_per_group=64,
                 replace_stride_with_dilation=None, norm_layer=None, *, stride_in_1x1=False, residual=True):
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        if len(layers) != 4:
            raise ValueError(f"layers must give the number of blocks of each of the 4 stages, got {layers!r}")
        if stride_in_1x1 and not issubclass(block, Bottleneck):
            raise ValueError(f"stride_in_1x1 only applies to fastres.nn.Bottleneck blocks, got block={block.__name__}")
        if zero_init_residual and not residual:
            raise ValueError("zero_init_residual=True needs residual=True: zeroing the last BN of a block without a "
                             "shortcut cuts the network")
        self._block_kwargs = {}
        if stride_in_1x1:
            self._block_kwargs["stride_in_1x1"] = True
        if not residual:
            self._block_kwargs["residual"] = False
        self.residual = bool(residual)

        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            # each element tells whether to replace the stage's 2x2 stride by a dilated convolution
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None "
                             f"or a 3-element tuple, got {replace_stride_with_dilation}")
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_resnet_(self, zero_init_residual)
        self._init_fold_cache()

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if self.residual and (stride != 1 or self.inplanes != planes * block.expansion):
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation,
                        norm_layer, **self._block_kwargs)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation, norm_layer=norm_layer, **self._block_kwargs))
        return nn.Sequential(*layers)

    def _plan_spec(self):
        """What the eval plan runs (fastres.models._eval_plan): the stem's conv1 + bn1 + a plain ReLU as one unit,
        the max pool, the four layers."""
        if not is_plain_relu(self.relu):
            return None
        return [(self.conv1, self.bn1, True, "stem")], self.maxpool, [self.layer1, self.layer2, self.layer3,
                                                                      self.layer4]

    def _stem(self, x):
        if is_plain_relu(self.relu):
            return conv_norm_act(x, self.conv1, self.bn1, relu=True, cache=self.fold_cache, name="stem")
        return self.relu(self.bn1(self.conv1(x)))

    # The kernels are NHWC-first (oneDNN and cuDNN run their fused convolutions fastest on channels_last, and the
    # Triton kernels are written for it), so the network runs channels_last inside whatever layout the input has;
    # the output (logits) has no spatial layout. Set to False to keep the input's layout throughout.
    channels_last = True

    def _forward_impl(self, x):
        if not self.training and type(self)._stem is ResNet._stem:
            out = _eval_plan.run(self, x)  # CPU eval: the units decided once, not on every call
            if out is not None:
                return out
        if self.channels_last and x.dim() == 4 and not functorch_active():  # vmap cannot query memory formats
            x = x.contiguous(memory_format=torch.channels_last)
        x = keep_memory_format(self._stem(x), x)
        x = self.maxpool(x)
        owned = type(self.maxpool) is nn.MaxPool2d and not has_hooks(self.maxpool)  # its output is fresh
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x, owned = _run_layer(layer, x, owned)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    def forward(self, x):
        return self._forward_impl(x)


def _run_layer(layer, x, owned):
    """(layer(x), whether nothing else holds the result). In eval, a Sequential of fastres blocks without hooks
    hands each block's fresh output to the next as owned, so that an identity block's last conv writes its result
    over its input (the residual) instead of a new buffer, as Inductor's freezing does: one pass less per block."""
    if layer.training or type(layer) is not nn.Sequential or has_hooks(layer) or _traced() or functorch_active():
        return layer(x), False
    for block in layer:
        if isinstance(block, _FusedBlock) and type(block).forward is _FusedBlock.forward and not block.training \
                and not has_hooks(block):
            x, owned = block._forward(x, owned), True
        else:
            x, owned = block(x), False
    return x, owned


# The torchvision weights enums, by model name (resolved lazily: torchvision is only needed to load weights).
_TORCHVISION_WEIGHTS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights",
                        "resnet50": "ResNet50_Weights", "resnet101": "ResNet101_Weights",
                        "resnet152": "ResNet152_Weights"}


def _resnet(name, block, layers, variant, plain, weights, progress, kwargs):
    if variant not in VARIANTS:
        raise ValueError(f"{name}: variant must be one of {', '.join(map(repr, VARIANTS))}, got variant={variant!r}")
    if not isinstance(plain, bool):
        raise TypeError(f"{name}: plain must be a bool, got {plain!r}")
    if weights is not None:
        if plain or variant != "v1.5":
            raise ValueError(f"{name}: torchvision weights are for the v1.5 residual net; they do not fit "
                             f"variant={variant!r}, plain={plain}")
        import torchvision.models as tvm  # only needed to fetch weights

        weights = getattr(tvm, _TORCHVISION_WEIGHTS[name]).verify(weights)
        kwargs["num_classes"] = len(weights.meta["categories"])
    # BasicBlock nets are the same in both variants: the stride is on the first 3x3 either way.
    stride_in_1x1 = variant == "v1" and block is Bottleneck
    model = ResNet(block, layers, stride_in_1x1=stride_in_1x1, residual=not plain, **kwargs)
    if weights is not None:
        model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
    return model


def resnet18(*, variant="v1.5", plain=False, weights=None, progress=True, **kwargs):
    """ResNet-18 (or plain-18); kwargs as torchvision's resnet18 (num_classes, norm_layer, ...)."""
    return _resnet("resnet18", BasicBlock, [2, 2, 2, 2], variant, plain, weights, progress, kwargs)


def resnet34(*, variant="v1.5", plain=False, weights=None, progress=True, **kwargs):
    """ResNet-34 (or plain-34); kwargs as torchvision's resnet34."""
    return _resnet("resnet34", BasicBlock, [3, 4, 6, 3], variant, plain, weights, progress, kwargs)


def resnet50(*, variant="v1.5", plain=False, weights=None, progress=True, **kwargs):
    """ResNet-50: variant "v1.5" (torchvision) or "v1" (the paper); kwargs as torchvision's resnet50."""
    return _resnet("resnet50", Bottleneck, [3, 4, 6, 3], variant, plain, weights, progress, kwargs)


def resnet101(*, variant="v1.5", plain=False, weights=None, progress=True, **kwargs):
    """ResNet-101: variant "v1.5" (torchvision) or "v1" (the paper); kwargs as torchvision's resnet101."""
    return _resnet("resnet101", Bottleneck, [3, 4, 23, 3], variant, plain, weights, progress, kwargs)


def resnet152(*, variant="v1.5", plain=False, weights=None, progress=True, **kwargs):
    """ResNet-152: variant "v1.5" (torchvision) or "v1" (the paper); kwargs as torchvision's resnet152."""
    return _resnet("resnet152", Bottleneck, [3, 8, 36, 3], variant, plain, weights, progress, kwargs)
