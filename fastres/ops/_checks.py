"""Argument checks shared by every backend and by the fake (meta) implementations.

They run before any kernel, so bad input fails with a message that names the argument.
"""
import torch


def memory_format(t):
    """channels_last if `t` is laid out NHWC (and not also plainly contiguous), else contiguous_format."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def like_param(grad, param):
    """grad with exactly param's strides (a copy only where they differ), or in param's memory format where param
    is not dense. DistributedDataParallel compares a gradient's strides with its bucket's exactly, and size-1 dims
    make .contiguous(memory_format=...) accept either layout of a 1x1 conv's weight ([512, 256, 1, 1] with strides
    [256, 1, 256, 256] counts as contiguous), so the memory format alone is not enough."""
    if grad.stride() == param.stride():
        return grad
    # empty_like keeps a dense tensor's exact strides (preserve_format), and suggests a format otherwise.
    return torch.empty_like(param, dtype=grad.dtype, device=grad.device).copy_(grad)


def _tensor(op, name, t, ndim=None, floating=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastres.{op}: {name} must be a Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"fastres.{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"fastres.{op}: {name} must be {ndim}-D, got a {t.dim()}-D tensor of shape {tuple(t.shape)}")


def _same_device(op, ref_name, ref, name, t):
    if t.device != ref.device:
        raise ValueError(f"fastres.{op}: {name} is on {t.device} but {ref_name} is on {ref.device}: "
                         "all tensors must be on the same device")


def _same_dtype(op, ref_name, ref, name, t):
    if t.dtype != ref.dtype:
        raise TypeError(f"fastres.{op}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}: "
                        "they must match")


def pair(op, name, v, minimum):
    """An int or a pair of ints -> [a, b], each >= minimum."""
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v, v]
    v = list(v)
    if len(v) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise ValueError(f"fastres.{op}: {name} must be an int or a pair of ints, got {v!r}")
    if any(i < minimum for i in v):
        raise ValueError(f"fastres.{op}: {name} must be >= {minimum}, got {v!r}")
    return v


def conv_output_shape(op, x, weight, stride, padding, dilation=(1, 1)):
    n, _, h, w = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    # The extent a dilated kernel spans: dilation * (k - 1) + 1.
    span_h, span_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    ho = (h + 2 * padding[0] - span_h) // stride[0] + 1
    wo = (w + 2 * padding[1] - span_w) // stride[1] + 1
    if ho <= 0 or wo <= 0:
        dilated = f" (dilation={dilation}: it spans {span_h}x{span_w})" if tuple(dilation) != (1, 1) else ""
        raise ValueError(f"fastres.{op}: the kernel {kh}x{kw}{dilated} is larger than the padded input "
                         f"{h + 2 * padding[0]}x{w + 2 * padding[1]} (x.shape={tuple(x.shape)}, padding={padding})")
    return (n, weight.shape[0], ho, wo)


def check_groups(op, groups, in_channels, weight):
    """groups: an int >= 1 dividing the output channels, with weight.shape[1] * groups input channels."""
    if not isinstance(groups, int) or isinstance(groups, bool):
        raise TypeError(f"fastres.{op}: groups must be an int, got {type(groups).__name__}")
    if groups < 1:
        raise ValueError(f"fastres.{op}: groups must be >= 1, got {groups}")
    if weight.shape[0] % groups:
        raise ValueError(f"fastres.{op}: groups={groups} does not divide the weight's {weight.shape[0]} output "
                         f"channels (weight.shape[0])")
    if weight.shape[1] * groups != in_channels:
        raise ValueError(f"fastres.{op}: channel mismatch: x has {in_channels} channels (x.shape[1]) but weight "
                         f"expects {weight.shape[1]} input channels per group (weight.shape[1]) x groups={groups} "
                         f"= {weight.shape[1] * groups}")


def check_conv(op, x, weight, bias, stride, padding, residual, dilation=(1, 1), groups=1):
    """Checks the conv arguments; returns (stride, padding, dilation, output shape)."""
    _tensor(op, "x", x, ndim=4)
    _tensor(op, "weight", weight, ndim=4)
    _same_device(op, "x", x, "weight", weight)
    _same_dtype(op, "x", x, "weight", weight)
    check_groups(op, groups, x.shape[1], weight)
    stride = pair(op, "stride", stride, 1)
    padding = pair(op, "padding", padding, 0)
    dilation = pair(op, "dilation", dilation, 1)
    out_shape = conv_output_shape(op, x, weight, stride, padding, dilation)
    if bias is not None:
        _tensor(op, "bias", bias, ndim=1)
        _same_device(op, "x", x, "bias", bias)
        _same_dtype(op, "x", x, "bias", bias)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"fastres.{op}: bias has {bias.shape[0]} elements but weight has "
                             f"{weight.shape[0]} output channels")
    if residual is not None:
        check_residual(op, x, residual, out_shape)
    return stride, padding, dilation, out_shape


def check_residual(op, x, residual, out_shape, x_name="x"):
    _tensor(op, "residual", residual)
    _same_device(op, x_name, x, "residual", residual)
    _same_dtype(op, x_name, x, "residual", residual)
    if tuple(residual.shape) != tuple(out_shape):
        raise ValueError(f"fastres.{op}: residual has shape {tuple(residual.shape)} but the output has shape "
                         f"{tuple(out_shape)}")


def check_channel_params(op, channels, device, **params):
    """Per-channel 1-D parameters (BN weight, bias, running stats): floating, [channels], on `device`."""
    for name, t in params.items():
        if t is None:
            continue
        _tensor(op, name, t, ndim=1)
        if t.device != device:
            raise ValueError(f"fastres.{op}: {name} is on {t.device} but the activations are on {device}: "
                             "all tensors must be on the same device")
        if t.shape[0] != channels:
            raise ValueError(f"fastres.{op}: {name} has {t.shape[0]} elements but there are {channels} channels")


def check_batch_for_training(out_shape):
    """BatchNorm2d's own check: statistics over a single value per channel are meaningless."""
    size = out_shape[0] * out_shape[2] * out_shape[3]
    if size == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size(out_shape)}")


def check_add_relu(x, residual):
    _tensor("add_relu", "x", x)
    _tensor("add_relu", "residual", residual)
    _same_device("add_relu", "x", x, "residual", residual)
    _same_dtype("add_relu", "x", x, "residual", residual)
    if x.shape != residual.shape:
        raise ValueError(f"fastres.add_relu: residual has shape {tuple(residual.shape)} but x has shape "
                         f"{tuple(x.shape)}")


def pooled_size(size, kernel, stride, padding, dilation, ceil_mode):
    """The output size of a max pool along one dimension, as ATen computes it (pooling_output_shape)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:  # the last window must start inside the input
        out -= 1
    return out


def check_max_pool_relu(x, kernel_size, stride, padding, dilation, ceil_mode, relu):
    """Checks max_pool_relu's arguments as F.max_pool2d does; returns (kernel_size, stride, padding, dilation,
    output shape)."""
    op = "max_pool_relu"
    _tensor(op, "x", x, ndim=4)
    kernel_size = pair(op, "kernel_size", kernel_size, 1)
    stride = pair(op, "stride", stride, 1)
    padding = pair(op, "padding", padding, 0)
    dilation = pair(op, "dilation", dilation, 1)
    if any(p > k // 2 for p, k in zip(padding, kernel_size)):
        raise ValueError(f"fastres.{op}: padding must be at most half of kernel_size, got padding={padding} for "
                         f"kernel_size={kernel_size}")
    for name, flag in (("ceil_mode", ceil_mode), ("relu", relu)):
        if not isinstance(flag, bool):
            raise TypeError(f"fastres.{op}: {name} must be a bool, got {type(flag).__name__}")
    n, c, h, w = x.shape
    out_hw = [pooled_size(size, *geometry, ceil_mode)
              for size, *geometry in zip((h, w), kernel_size, stride, padding, dilation)]
    if min(out_hw) < 1:
        raise ValueError(f"fastres.{op}: the output would be empty ({out_hw[0]}x{out_hw[1]}) for x.shape="
                         f"{tuple(x.shape)}, kernel_size={kernel_size}, padding={padding}, dilation={dilation}")
    return kernel_size, stride, padding, dilation, (n, c, *out_hw)


def check_fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps):
    op = "fold_bn"
    _tensor(op, "conv_weight", conv_weight)
    if conv_weight.dim() < 2:
        raise ValueError(f"fastres.fold_bn: conv_weight must have at least 2 dims [out_channels, in_channels, ...], "
                         f"got shape {tuple(conv_weight.shape)}")
    cout = conv_weight.shape[0]
    if conv_bias is not None:
        _tensor(op, "conv_bias", conv_bias, ndim=1)
        _same_dtype(op, "conv_weight", conv_weight, "conv_bias", conv_bias)
    check_channel_params(op, cout, conv_weight.device, conv_bias=conv_bias, bn_weight=bn_weight, bn_bias=bn_bias,
                         running_mean=running_mean, running_var=running_var)
    if not eps > 0:
        raise ValueError(f"fastres.fold_bn: eps must be > 0, got {eps}")
