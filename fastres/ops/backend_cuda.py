"""The compiled backend: fastres._C's kernels (csrc/), CUDA on GPU tensors and their C++ twins on CPU tensors.

The convolution itself stays with ATen (cuDNN on GPU, oneDNN on CPU); the passes around it are fastres kernels.
Importing this module raises ImportError when fastres._C is not built, which the backend selector reports once.

BatchNorm in training: _bn_stats (statistics, then a finalize step that also produces the apply coefficients and
the new running statistics on the device, with no host synchronization), then one apply pass; backward is
_bn_act_backward / _bn_apply_backward (the per-channel reductions, then the input gradients).
The ReLU's 1-bit mask: dual_bn_act saves it instead of its output, and its backward reads it instead of the output.
Measured on CPU (2 cores, fp32, channels_last, [8, C, 28, 28], C = 128 and 512) the backward with the mask ran
1.0x-1.4x as fast as with the output (never slower; benchmarks/bn_kernels.py, "fastres+mask"); on a GPU it removes
about a third of the bytes the backward reads. conv_bn_act still saves its output: the mask there needs a seventh
output of its functional forward op and a mask input of the bn_act_backward op, in every backend.
"""
import os

import torch
import torch.nn.functional as F

from . import _compiled
from ._checks import conv_output_shape, memory_format
# conv_backward: ATen's, re-exported
from .backend_torch import aten_conv_backward, conv_backward, stat_dtype  # noqa: F401

if not _compiled.available():
    raise ImportError(f"fastres._C is not available: {_compiled.load_error()}")

# The kernel each op needs; an op runs here only where that kernel is registered for the device.
_KERNELS = {
    "fold_bn": ("_fold_bn",),
    "add_relu": ("_add_relu",),
    "max_pool_relu": ("_max_pool_relu",),  # CPU only (csrc/cpu_pool.cpp): on GPU the reference runs
    "conv_bias_act": ("_bn_act_forward",),
    "conv_bn_act_forward": ("_bn_stats", "_bn_act_forward"),
    "bn_act_backward": ("_bn_act_backward",),
    "dual_bn_act_forward": ("_bn_stats", "_bn_apply"),
    "dual_bn_act_backward": ("_bn_apply_backward",),
    "conv_backward": (),  # the convolution's own backward stays with ATen (cuDNN / oneDNN)
    "bn_relu_conv": ("_bn_act_forward",),
    "bn_relu_conv_backward": ("_bn_act_forward", "_bn_act_backward"),
}
_DEVICE_KEYS = {"cpu": "cpu", "cuda": "cuda"}


def unsupported(op, device_type):
    if op not in _KERNELS:
        return "no kernel for this op"
    if device_type not in _DEVICE_KEYS:
        return f"no kernels for {device_type} tensors"
    missing = [k for k in _KERNELS[op] if not _compiled.has_kernel(k, device_type)]
    if missing:
        return f"fastres._C was built without {device_type} kernels ({', '.join(missing)})"
    return None


def fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps):
    return torch.ops.fastres._fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps)


def add_relu(x, residual):
    return torch.ops.fastres._add_relu(x, residual)


def max_pool_relu(x, kernel_size, stride, padding, dilation, ceil_mode, relu):
    return torch.ops.fastres._max_pool_relu(x, kernel_size, stride, padding, dilation, ceil_mode, relu)


# Calls that oneDNN's fused conv refused, by signature: the op is private to torch and its versions differ (torch
# 2.11's binary post-op raises "could not create a memory" for a 1x1 map whose strides are channels_last's, where
# torch 2.14's runs). A refused call takes the unfused path from then on instead of raising again.
_onednn_refused = set()
_relu_ = torch.ops.fastres._relu_.default if _compiled.has_op("_relu_") else torch.relu_


def _call_signature(x, weight, bias, stride, padding, residual, dilation=(1, 1), groups=1, into_residual=False):
    # A prepacked weight is an opaque oneDNN tensor without strides: its shape (and that it is packed) identify it.
    weight_layout = "packed" if weight.is_mkldnn else weight.stride()
    return (x.dtype, tuple(x.shape), x.stride(), tuple(weight.shape), weight_layout, bias is not None,
            None if residual is None else residual.stride(), tuple(stride), tuple(padding), tuple(dilation), groups,
            into_residual)


def _onednn_usable():
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


def _onednn_conv(x, weight, bias, stride, padding, dilation, groups, residual, relu, into_residual=False):
    """relu?(conv(x, weight) + bias + residual?) on oneDNN, bias and residual as post-ops of the conv; weight plain
    or prepacked (pack_conv_weight); residual in x's memory format. into_residual: the result is written over
    `residual` (the caller owns it), which saves a pass: oneDNN's out-of-place form first copies the residual into a
    new output. None when oneDNN refuses the call."""
    # The signature is built only once some call was refused: the steady-state eval path pays nothing for it.
    if _onednn_refused and _call_signature(x, weight, bias, stride, padding, residual, dilation, groups,
                                           into_residual) in _onednn_refused:
        return None
    args = (weight, bias, list(padding), list(stride), list(dilation), groups)
    try:
        if residual is None:
            out = torch.ops.mkldnn._convolution_pointwise(x, *args, "none", [], "")
        elif into_residual:
            out = torch.ops.mkldnn._convolution_pointwise_.binary(residual, x, *args, "add", None, None, [], "")
        else:
            out = torch.ops.mkldnn._convolution_pointwise.binary(x, residual, *args, "add", None, None, [], "")
    except RuntimeError:
        _onednn_refused.add(_call_signature(x, weight, bias, stride, padding, residual, dilation, groups,
                                            into_residual))
        return None
    # Not oneDNN's relu post-op: it is max(v, 0), which maps NaN to 0 where torch.relu keeps it (a corrupt input
    # would give a confident answer). An in-place relu is one more pass over the output: fastres._C's _relu_, on the
    # values' bits (csrc/cpu_relu.cpp; ATen's bf16 relu_ converts to fp32 and back), where this build has it. (The
    # eval plan's one-call body does use the post-op, and runs again with these passes where the floating-point
    # invalid flag says a NaN met a ReLU: csrc/cpu_plan.cpp.)
    if relu:
        _relu_(out)
    return out


def _onednn_fused_conv(x, weight, bias, stride, padding, residual, relu, dilation=(1, 1), groups=1):
    """oneDNN convolution with the bias and residual add as post-ops of the conv itself (then the ReLU), or None
    when this build of torch or this dtype cannot do it. This is what makes the CPU eval path fast: the bias and
    residual cost nothing extra because they run while the output tile is still in cache."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and _onednn_usable()):
        return None
    if residual is not None:
        residual = residual.contiguous(memory_format=memory_format(x))
    return _onednn_conv(x, weight, bias, stride, padding, dilation, groups, residual, relu)


# ---------------------------------------------------------------- prepacked weights (CPU eval)
# oneDNN runs a convolution from a blocked weight layout of its own choosing. Given a plain weight, every call
# reorders it into that layout (and, for a channels_last input, ATen first copies a 3x3 weight to channels_last):
# at batch 1 that costs about as much as the convolution. An eval forward that cannot change the weights packs
# each one once (fastres.nn._fused.prepacked_conv_norm_act caches it with the fold, keyed on what the layout depends
# on) and runs the conv from the packed weight, as Inductor's freezing pass does.
def packable(x, dtype):
    """Whether pack_conv_weight / prepacked_conv_bias_act can run a conv of input x computed in dtype (x's, or
    autocast's): x on CPU and laid out channels_last (oneDNN's output from a packed weight is channels_last: a
    contiguous input would be copied in and out), dtype fp32, or bf16 where oneDNN has bf16 kernels for this CPU."""
    if x.device.type != "cpu" or not _onednn_usable() or not hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"):
        return False
    if dtype == torch.bfloat16:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    elif dtype != torch.float32:
        return False
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- Winograd 3x3 convolutions (CPU eval)
# A 3x3 convolution of stride 1, padding 1, dilation 1 and one group, in fp32, as Winograd's F(2x2, 3x3) (fastres._C's
# _winograd_conv3x3, csrc/cpu_winograd.cpp): 16 matrix products per 2x2 output tile where oneDNN's direct kernels
# take 36 multiply-adds per channel pair, within the tolerance rule. pack_conv_weight chooses it for a unit and input
# size (its "packed" weight is then _winograd_weight's [16, Cin, Cout] transform, which prepacked_conv_bias_act and
# the eval plan's one-call body, csrc/cpu_plan.cpp, recognize), and the eval plan's oneDNN Graph body decides by the
# same rule (fastres.models._eval_plan). FASTRES_CPU_WINOGRAD=0 turns it off. It applies where the convolution is
# large enough: at least WINOGRAD_MIN_CHANNELS in and out and WINOGRAD_MIN_MACS multiply-adds a call, so that in the
# graph body it pays for the oneDNN Graph partitions it splits (each _winograd_conv3x3 ends one and starts another,
# ~50 us each at batch 1 on an Intel Xeon). Ad hoc, graph bodies A/B in one process, Intel Xeon, 2 threads:
# ResNet-50 1.05-1.08x faster at batch 1 (1.06-1.07x after 0.1 s of idle), 1.09-1.12x at batch 8, ResNet-18
# 1.22-1.25x at batch 1; CIFAR ResNet-56 (16 to 64 channels) 0.89x at batch 1 and 0.78x at batch 8 with every 3x3
# convolution so, hence the thresholds. Per unit (outside a graph: a detector's FPN and RPN head, 256 channels at up
# to a quarter of an 800x1216 image), the whole Faster R-CNN ResNet-50 FPN ran 1.21x faster with it (ad hoc, AMD
# EPYC, benchmarks/results/cpu_inference.md).
WINOGRAD = os.environ.get("FASTRES_CPU_WINOGRAD", "1") != "0" and _compiled.has_op("_winograd_conv3x3")
WINOGRAD_MIN_CHANNELS = 64
WINOGRAD_MIN_MACS = 50_000_000
# ... and at least WINOGRAD_MIN_TILES output tiles, the times each transformed weight (16/9 the direct one's bytes) is
# used in a call: ResNet-50's last stage at batch 1 (16 tiles of 7x7, 17 MB of transformed weight a convolution) was
# 1.7x faster in a tight loop but is bound by reading its weights where other work has left the caches cold.
WINOGRAD_MIN_TILES = 32


def winograd_applies(weight, geometry):
    """Whether _winograd_conv3x3 computes a convolution of `weight` with geometry (stride, padding, dilation,
    groups): fp32, 3x3, stride 1, padding 1, dilation 1, one group."""
    stride, padding, dilation, groups = geometry
    return weight.dtype == torch.float32 and weight.dim() == 4 and tuple(weight.shape[2:]) == (3, 3) and \
        (tuple(stride), tuple(padding), tuple(dilation), groups) == ((1, 1), (1, 1), (1, 1), 1)


def winograd_pays(weight, input_shape):
    """Whether a 3x3 convolution of `weight` on an input of input_shape (N, C, H, W) is large enough for
    _winograd_conv3x3 (see WINOGRAD_MIN_MACS and WINOGRAD_MIN_TILES)."""
    out_channels, in_channels = weight.shape[:2]
    n, _, h, w = input_shape
    macs = n * h * w * in_channels * out_channels * 9
    tiles = n * ((h + 1) // 2) * ((w + 1) // 2)
    return min(in_channels, out_channels) >= WINOGRAD_MIN_CHANNELS and macs >= WINOGRAD_MIN_MACS and \
        tiles >= WINOGRAD_MIN_TILES


def winograd_chosen(weight, geometry, input_shape):
    """Whether pack_conv_weight transforms `weight` for _winograd_conv3x3 (rather than packing it for oneDNN) for an
    input of input_shape: Winograd on, and it applies and pays. The transform itself does not depend on the input's
    shape (fastres.nn._fused.packed_unit keeps one for every shape that takes it)."""
    return WINOGRAD and winograd_applies(weight, geometry) and winograd_pays(weight, input_shape)


def is_winograd_weight(packed_weight):
    """Whether a weight from pack_conv_weight is _winograd_weight's transform (a dense [16, Cin, Cout] tensor; oneDNN's
    packed weights are 4-D, or oneDNN's own tensors)."""
    return packed_weight.layout == torch.strided and packed_weight.dim() == 3


def pack_conv_weight(weight, stride, padding, dilation, groups, input_shape):
    """weight prepared once for a conv of an input of input_shape (and weight's dtype): transformed for
    _winograd_conv3x3 where Winograd applies and pays (above), else in oneDNN's blocked layout; None when oneDNN cannot
    pack it."""
    if winograd_chosen(weight, (stride, padding, dilation, groups), input_shape):
        return torch.ops.fastres._winograd_weight(weight.detach())
    try:
        return torch.ops.mkldnn._reorder_convolution_weight(weight.contiguous(), list(padding), list(stride),
                                                            list(dilation), groups, list(input_shape))
    except RuntimeError:
        return None


def prepacked_conv_bias_act(x, packed_weight, bias, stride, padding, dilation, groups, residual, relu,
                            residual_owned=False):
    """conv_bias_act with a weight from pack_conv_weight (for x's shape and dtype), for x that is packable(); the
    output channels_last. residual_owned: nothing else holds `residual` (a tensor the caller just made), so the
    result may be written over it. None when oneDNN refuses the call (the caller then runs conv_bias_act)."""
    if is_winograd_weight(packed_weight):  # (its ReLU keeps NaN, as torch.relu does; out of place)
        return torch.ops.fastres._winograd_conv3x3(x, packed_weight, bias, residual, relu)
    into_residual = False
    if residual is not None:
        laid_out = residual.contiguous(memory_format=torch.channels_last)
        # Over the residual only where it is the output's exact buffer: same dtype and shape, dense channels_last.
        into_residual = (residual_owned or laid_out is not residual) and laid_out.dtype == x.dtype \
            and not laid_out.requires_grad and (torch.is_inference_mode_enabled() or not laid_out.is_inference()) \
            and laid_out.shape == conv_output_shape("conv_bias_act", x, packed_weight, stride, padding, dilation)
        residual = laid_out
    out = _onednn_conv(x, packed_weight, bias, stride, padding, dilation, groups, residual, relu, into_residual)
    if out is None and into_residual:  # refused in place (another torch version): out of place
        out = _onednn_conv(x, packed_weight, bias, stride, padding, dilation, groups, residual, relu)
    return out


def conv_bias_act(x, weight, bias, stride, padding, residual, relu, dilation=(1, 1), groups=1):
    fmt = memory_format(x)
    out = _onednn_fused_conv(x, weight, bias, stride, padding, residual, relu, dilation, groups)
    if out is None:
        # The bias inside the conv, added to its fp32 accumulator as ATen does: added after the conv output's
        # rounding to bf16, it would flip the ReLU of outputs near 0 (found by tests/test_properties.py).
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups).contiguous(memory_format=fmt)
        if residual is not None or relu:
            out = torch.ops.fastres._bn_act_forward(out, None, None, residual, relu)
    return out.contiguous(memory_format=fmt)


def _stats_and_coefficients(y, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps):
    """-> (save_mean, save_invstd, scale, shift, new_running_mean, new_running_var), the shift that of the apply
    centered on the mean, (y - mean) * scale + shift (see _bn_stats). Training: the statistics kernel and its
    finalize step, all on the device (no host synchronization); eval: the running statistics."""
    if training:
        return torch.ops.fastres._bn_stats(y, bn_weight, bn_bias, running_mean, running_var, momentum, eps)
    acc = stat_dtype(y)
    mean, invstd = running_mean.to(acc, copy=True), torch.rsqrt(running_var.to(acc) + eps)
    # the centered apply's: (y - mean) * scale + bias
    return mean, invstd, bn_weight.to(acc) * invstd, bn_bias.to(acc), running_mean.new_empty(0), \
        running_var.new_empty(0)


def _centered(mean, invstd, scale, shift, bias):
    """(center, shift) of the apply (y - center) * scale + shift, channel by channel, from _stats_and_coefficients:
    centered on the mean where it lies more than one standard deviation from 0 (|mean| * invstd > 1), where
    y * scale + (bias - mean * scale) would round both terms at the mean's magnitude (10x ATen's error at a mean 1e3
    times the spread); uncentered elsewhere, where y - mean would add a rounding of its own (with every channel
    centered, a transformers ResNet's training step had 3.5x ATen's error in its input gradient)."""
    far = (mean * invstd).abs() > 1
    return mean * far, torch.where(far, shift, bias.to(scale.dtype) - mean * scale)


def conv_bn_act_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride,
                        padding, residual, relu, dilation=(1, 1), groups=1):
    fmt = memory_format(x)
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups).contiguous(memory_format=fmt)
    mean, invstd, scale, shift, new_running_mean, new_running_var = _stats_and_coefficients(
        y, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps)
    center, shift = _centered(mean, invstd, scale, shift, bn_bias)
    out = torch.ops.fastres._bn_act_forward(y, scale, shift, residual, relu, center)
    return out, y, mean, invstd, new_running_mean, new_running_var


def bn_act_backward(grad_out, out, conv_out, save_mean, save_invstd, bn_weight, relu, training, residual_grad):
    gy, gr, gw, gb = torch.ops.fastres._bn_act_backward(grad_out, out, conv_out, save_mean, save_invstd, bn_weight,
                                                        relu, training, residual_grad)
    return gy, (gr if residual_grad else None), gw, gb


def dual_bn_act_forward(y, bn_weight, bn_bias, running_mean, running_var, r, r_bn_weight, r_bn_bias, r_running_mean,
                        r_running_var, training, momentum, eps, r_momentum, r_eps, relu):
    fmt = memory_format(y)
    y = y.contiguous(memory_format=fmt)
    r = r.contiguous(memory_format=fmt)
    mean, invstd, scale, shift, new_rm, new_rv = _stats_and_coefficients(
        y, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps)
    r_mean, r_invstd, r_scale, r_shift, r_new_rm, r_new_rv = _stats_and_coefficients(
        r, r_bn_weight, r_bn_bias, r_running_mean, r_running_var, training, r_momentum, r_eps)
    center, shift = _centered(mean, invstd, scale, shift, bn_bias)
    r_center, r_shift = _centered(r_mean, r_invstd, r_scale, r_shift, r_bn_bias)
    out, relu_mask = torch.ops.fastres._bn_apply(y, scale, shift, r, r_scale, r_shift, relu, relu, center, r_center)
    return out, relu_mask, mean, invstd, r_mean, r_invstd, new_rm, new_rv, r_new_rm, r_new_rv


def dual_bn_act_backward(grad_out, relu_mask, y, save_mean, save_invstd, bn_weight, r, r_save_mean, r_save_invstd,
                         r_bn_weight, relu, training, need_r):
    # Laid out as in the forward, which the mask's layout follows (see _compiled.relu_mask_shape).
    fmt = memory_format(y)
    y, r, grad_out = y.contiguous(memory_format=fmt), r.contiguous(memory_format=fmt), grad_out.contiguous(
        memory_format=fmt)
    gy, gr, gw, gb, grw, grb = torch.ops.fastres._bn_apply_backward(
        grad_out, None, relu_mask if relu else None, y, save_mean, save_invstd, bn_weight, r, r_save_mean,
        r_save_invstd, r_bn_weight, relu, training, need_r)
    return gy, (gr if need_r else None), gw, gb, grw, grb


def bn_relu_conv(x, scale, shift, weight, stride, padding, relu, dilation=(1, 1), groups=1):
    acc = stat_dtype(x)
    a = torch.ops.fastres._bn_act_forward(x, scale.to(acc), shift.to(acc), None, relu)
    return F.conv2d(a, weight, None, stride, padding, dilation, groups).contiguous(memory_format=memory_format(x))


def bn_relu_conv_backward(grad, x, scale, shift, weight, stride, padding, relu, output_mask, dilation=(1, 1),
                          groups=1):
    """The prologue's input is recomputed by the forward kernel; its backward is the eval-mode BN backward kernel
    with mean 0, invstd 1 and weight = scale, which yields grad_x = dz * scale, grad_scale = sum(dz * x) and
    grad_shift = sum(dz)."""
    need_x, need_scale, need_shift, need_w = output_mask
    acc = stat_dtype(x)
    scale_acc, shift_acc = scale.to(acc), shift.to(acc)
    a = torch.ops.fastres._bn_act_forward(x, scale_acc, shift_acc, None, relu)
    need_a = need_x or need_scale or need_shift
    grad_a, grad_w, _ = aten_conv_backward(grad, a, weight, stride, padding, dilation, groups,
                                           [need_a, need_w, False])
    grad_x = grad_scale = grad_shift = None
    if need_a:
        zeros, ones = torch.zeros_like(scale_acc), torch.ones_like(scale_acc)
        gx, _, gscale, gshift = torch.ops.fastres._bn_act_backward(grad_a, a, x, zeros, ones, scale_acc, relu, False,
                                                                   False)
        grad_x = gx if need_x else None
        grad_scale = gscale.to(scale.dtype) if need_scale else None
        grad_shift = gshift.to(shift.dtype) if need_shift else None
    return grad_x, grad_scale, grad_shift, (grad_w if need_w else None)
