"""ResNet blocks that are drop-in replacements for torchvision's, running through fastres.ops.

Same constructor arguments, `expansion`, submodule names and state_dict keys as torchvision.models.resnet, so
`torchvision.models.resnet.ResNet(fastres.nn.Bottleneck, [3, 4, 6, 3])` builds and loads torchvision checkpoints.
"""
import torch
from torch import nn

from fastres import ops
from fastres.nn import _lean
from fastres.nn._collectives import group_of
from fastres.nn._fused import FusedModuleMixin, _affine, _bn_momentum, functorch_active, has_hooks, is_plain_relu, \
    keep_memory_format, norm_kind, unit_fusable
from fastres.nn._lean import MEMORY_MODES, conv_norm_act


def conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class _FusedBlock(FusedModuleMixin, nn.Module):
    """What BasicBlock and Bottleneck share: the shortcut and the choice between fused and plain forward."""

    # How training trades memory for compute: see fastres.nn.set_memory_mode.
    memory_mode = _lean.DEFAULT_MEMORY_MODE

    def _units(self):
        """[(conv, norm)] of the residual branch, in order."""
        raise NotImplementedError

    def _fused_units(self):
        ds = self.downsample
        shortcut = [(ds[0], ds[1])] if type(ds) is nn.Sequential and len(ds) == 2 else []
        return self._units() + shortcut

    def _check_downsample(self, downsample):
        if downsample is not None and not self.residual:
            raise ValueError(f"{type(self).__name__}: downsample is given but residual=False: a block without a "
                             "shortcut has no use for it")

    def _shortcut(self, x, input_owned=False):
        """(the shortcut's output, whether nothing but this block holds it: a fused downsample's fresh tensor, or
        the input itself where the caller says it owns it)."""
        ds = self.downsample
        if ds is None:
            return x, input_owned
        if type(ds) is nn.Sequential and len(ds) == 2 and not has_hooks(ds) and unit_fusable(ds[0], ds[1]):
            return conv_norm_act(x, ds[0], ds[1], relu=False, cache=self.fold_cache, name="downsample"), True
        return ds(x), False

    def forward(self, x):
        return self._forward(x)

    def _forward(self, x, input_owned=False):
        """forward(x); input_owned: nothing but the caller holds x (fastres.models.ResNet passes one block's fresh
        output to the next), so the last conv of an eval forward may write its result over it, as the residual."""
        if not is_plain_relu(self.relu) or functorch_active():
            # A replaced activation must be honoured, and torch.func transforms need plain ops: run the modules
            # exactly as torchvision does.
            return self._forward_modules(x)
        if self.training:
            # Training: the memory-lean chain (see fastres.nn._lean), where every unit is a conv + training BN.
            out = _lean.block_forward(self, x)
            if out is not None:
                return keep_memory_format(out, x)
        units = self._units()
        out = x
        for i, (conv, norm) in enumerate(units[:-1]):
            out = conv_norm_act(out, conv, norm, relu=True, cache=self.fold_cache, name=str(i))
        conv, norm = units[-1]
        if self.residual:
            tail = _dual_tail(out, x, conv, norm, self.downsample)
            if tail is not None:
                return keep_memory_format(tail, x)
        identity, owned = self._shortcut(x, input_owned) if self.residual else (None, False)
        out = conv_norm_act(out, conv, norm, relu=True, residual=identity, cache=self.fold_cache,
                            name=str(len(units) - 1), residual_owned=owned)
        return keep_memory_format(out, x)

    def _forward_modules(self, x):
        units = self._units()
        out = x
        for conv, norm in units[:-1]:
            out = self.relu(norm(conv(out)))
        conv, norm = units[-1]
        out = norm(conv(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


@torch.compiler.assume_constant_result  # decided when torch.compile traces (backend selection is not traceable)
def _has_dual_kernel(device_type):
    try:
        ops.select("dual_bn_act_forward", device_type)
    except ops.BackendUnavailableError:
        return False
    return True


def _dual_tail(out, x, conv, norm, downsample):
    """relu(norm(conv(out)) + ds_norm(ds_conv(x))) as one fastres.ops.dual_bn_act when both BatchNorms train
    locally (the projection's BN, the residual add and the ReLU in one pass), else None. The per-unit path's form
    of what the lean chain does (torch.compile runs this one)."""
    if not (type(downsample) is nn.Sequential and len(downsample) == 2 and not has_hooks(downsample)):
        return None
    ds_conv, ds_norm = downsample
    if not (unit_fusable(conv, norm) and unit_fusable(ds_conv, ds_norm)
            and norm_kind(norm) == "bn_train" and norm_kind(ds_norm) == "bn_train"
            and group_of(norm) is None and group_of(ds_norm) is None):
        return None
    if out.dtype != x.dtype or conv.weight.dtype != ds_conv.weight.dtype:
        return None  # the two conv outputs would differ in dtype: the per-unit ops handle mixed dtypes
    if not _has_dual_kernel(x.device.type):
        return None  # a forced backend without a dual kernel (Triton): its conv_bn_act runs each unit instead
    y = ops.conv_bias_act(out, conv.weight, None, conv.stride, conv.padding, None, relu=False,
                          dilation=conv.dilation, groups=conv.groups)
    r = ops.conv_bias_act(x, ds_conv.weight, None, ds_conv.stride, ds_conv.padding, None, relu=False,
                          dilation=ds_conv.dilation, groups=ds_conv.groups)
    w, b = _affine(norm, norm.running_var)
    wd, bd = _affine(ds_norm, ds_norm.running_var)
    return ops.dual_bn_act(y, w, b, norm.running_mean, norm.running_var, r, wd, bd, ds_norm.running_mean,
                           ds_norm.running_var, True, _bn_momentum(norm), norm.eps, _bn_momentum(ds_norm),
                           ds_norm.eps, True)


class BasicBlock(_FusedBlock):
    """Two 3x3 convs (torchvision's BasicBlock). `residual=False` drops the shortcut (the paper's plain nets)."""

    expansion: int = 1
    _conv_norm_pairs = (("conv1", "bn1"), ("conv2", "bn2"))  # for fastres.fold_bn

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None, *, residual=True):
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.residual = bool(residual)
        self._check_downsample(downsample)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self._init_fold_cache()

    def _units(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2)]


class Bottleneck(_FusedBlock):
    """1x1 -> 3x3 -> 1x1 (torchvision's Bottleneck, "v1.5": stride on the 3x3).

    `stride_in_1x1=True` puts the stride on the first 1x1 instead (the paper's "v1"); `residual=False` drops the
    shortcut (the paper's plain nets).
    """

    expansion: int = 4
    _conv_norm_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))  # for fastres.fold_bn

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None, *, stride_in_1x1=False, residual=True):
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self.residual = bool(residual)
        self.stride_in_1x1 = bool(stride_in_1x1)
        self._check_downsample(downsample)
        width = int(planes * (base_width / 64.0)) * groups
        stride_1x1, stride_3x3 = (stride, 1) if self.stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(inplanes, width, stride_1x1)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride_3x3, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self._init_fold_cache()

    def _units(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]


def set_memory_mode(model, mode):
    """Sets how every fastres block in `model` (the root included) trains: "recompute" (the default: each conv's
    raw output is kept, BN + ReLU recomputed in backward, and a Bottleneck's last 1x1 conv and its projection run
    again in backward: the least memory, for about 1/4 more forward conv work) or "lean" (every conv's raw output
    kept: 1-8% faster steps on CPU, 0.85x instead of 0.52x of torchvision's activation memory for ResNet-50).
    Returns the model."""
    if mode not in MEMORY_MODES:
        raise ValueError(f"set_memory_mode: mode must be one of {', '.join(map(repr, MEMORY_MODES))}, got {mode!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"set_memory_mode: model must be an nn.Module, got {type(model).__name__}")
    for m in model.modules():
        if isinstance(m, _FusedBlock):
            m.memory_mode = mode
    return model
