"""The reference backend: every fused op written with plain ATen ops.

The tests hold every other backend to these functions; they are also the fallback that runs anywhere.
Each returns its output in the memory format of its main input (see _checks.memory_format).
"""
import torch
import torch.nn.functional as F
# The Python twin of Tensor.suggest_memory_format(), which fastres._C's kernels lay their outputs out by.
from torch._prims_common import suggest_memory_format

from ._checks import conv_output_shape, memory_format


def unsupported(op, device_type):
    return None


def stat_dtype(t):
    """Statistics and folded parameters are computed in fp32 (fp64 for fp64 tensors)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps):
    acc = stat_dtype(conv_weight)
    scale = bn_weight.to(acc) * torch.rsqrt(running_var.to(acc) + eps)
    shape = (-1,) + (1,) * (conv_weight.dim() - 1)
    weight = (conv_weight.to(acc) * scale.view(shape)).to(conv_weight.dtype)
    bias = -running_mean.to(acc) if conv_bias is None else conv_bias.to(acc) - running_mean.to(acc)
    bias = (bias * scale + bn_bias.to(acc)).to(conv_weight.dtype)
    return weight.contiguous(memory_format=memory_format(conv_weight)), bias


def add_relu(x, residual):
    return torch.relu(x + residual).contiguous(memory_format=memory_format(x))


def max_pool_relu(x, kernel_size, stride, padding, dilation, ceil_mode, relu):
    y = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    if relu:
        y = torch.relu(y)
    return y.contiguous(memory_format=suggest_memory_format(x))


def conv_bias_act(x, weight, bias, stride, padding, residual, relu, dilation=(1, 1), groups=1):
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        y = y + residual
    if relu:
        y = torch.relu(y)
    return y.contiguous(memory_format=memory_format(x))


def _batch_norm(y, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps):
    """-> (normalized y, save_mean, save_invstd, new_running_mean, new_running_var) with aten's own batch norm: in
    training the batch statistics and the updated running statistics (computed on copies, so they come out exactly
    as nn.BatchNorm2d's), in eval the running statistics and empty tensors. Nothing is mutated."""
    acc = stat_dtype(y)
    if training and y.numel() == 0:
        # F.batch_norm's empty batch (native_batch_norm itself refuses one): nothing to normalize, running
        # statistics unchanged; the statistics are an empty channel's (mean 0, variance 0), as the kernels have them.
        save_mean = torch.zeros(y.shape[1], dtype=acc, device=y.device)
        return (F.batch_norm(y, None, None, bn_weight, bn_bias, True, momentum, eps), save_mean,
                torch.full_like(save_mean, eps).rsqrt(), running_mean.clone(), running_var.clone())
    if training:
        new_running_mean, new_running_var = running_mean.clone(), running_var.clone()
        z, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            y, bn_weight, bn_bias, new_running_mean, new_running_var, True, momentum, eps)
    else:
        z, _, _ = torch.ops.aten.native_batch_norm(y, bn_weight, bn_bias, running_mean, running_var, False,
                                                   momentum, eps)
        save_mean = running_mean.to(acc, copy=True)
        save_invstd = torch.rsqrt(running_var.to(acc) + eps)
        new_running_mean, new_running_var = running_mean.new_empty(0), running_var.new_empty(0)
    return z, save_mean.to(acc), save_invstd.to(acc), new_running_mean, new_running_var


def conv_bn_act_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride,
                        padding, residual, relu, dilation=(1, 1), groups=1):
    """-> (out, conv_out, save_mean, save_invstd, new_running_mean, new_running_var): the output, the raw conv
    output, the per-channel statistics that normalized it (the batch's in training, the running ones in eval), and
    in training the updated running statistics (empty tensors in eval). Nothing is mutated."""
    fmt = memory_format(x)
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups).contiguous(memory_format=fmt)
    z, save_mean, save_invstd, new_running_mean, new_running_var = _batch_norm(
        y, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps)
    if residual is not None:
        z = z + residual
    if relu:
        z = torch.relu(z)
    return z.contiguous(memory_format=fmt), y, save_mean, save_invstd, new_running_mean, new_running_var


def relu_mask_shape(y):
    """Shape of the ReLU mask of an activation like y: uint8 [rows, ceil(cols / 8)] of y's [rows, cols] matrix in
    memory order (NHWC: rows = N*H*W, cols = C; NCHW: rows = N*C, cols = H*W); bit j of byte b of a row is the
    element at column 8b + j, set where the gradient passes the ReLU (not out <= 0, as threshold_backward has it).
    The layout follows torch's suggest_memory_format, as fastres._C's kernels do, except that a 1x1 map (stored
    [n][c] either way, whatever the strides of its size-1 dims say) always takes the NHWC form."""
    n, c, h, w = y.shape
    if _rows_are_pixels(y):
        return (n * h * w, (c + 7) // 8)
    return (n * c, (h * w + 7) // 8)


def _rows_are_pixels(t):
    return t.shape[2] * t.shape[3] == 1 or suggest_memory_format(t) == torch.channels_last


def _memory_order_matrix(t):
    n, c, h, w = t.shape
    if _rows_are_pixels(t):
        return t.permute(0, 2, 3, 1).reshape(n * h * w, c)
    return t.reshape(n * c, h * w)


def pack_relu_mask(out):
    """The ReLU mask of a stored output (see relu_mask_shape)."""
    passes = _memory_order_matrix(~(out <= 0))
    rows, cols = passes.shape
    padded = torch.zeros(rows, relu_mask_shape(out)[1] * 8, dtype=torch.uint8, device=out.device)
    padded[:, :cols] = passes
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=out.device)
    return (padded.view(rows, relu_mask_shape(out)[1], 8) * weights).sum(-1, dtype=torch.uint8)  # rows may be 0


def apply_relu_mask(grad, relu_mask):
    """grad where the mask's bit is set, else 0: threshold_backward(grad, out, 0) from the mask of out."""
    shifts = torch.arange(8, dtype=torch.uint8, device=grad.device)
    bits = ((relu_mask.unsqueeze(-1) >> shifts) & 1).reshape(relu_mask.shape[0], relu_mask.shape[1] * 8)
    passes = torch.empty(grad.shape, dtype=torch.bool, device=grad.device,
                         memory_format=suggest_memory_format(grad))
    matrix = _memory_order_matrix(passes)  # a view of passes
    matrix.copy_(bits[:, :matrix.shape[1]].bool())
    return torch.where(passes, grad, torch.zeros_like(grad))


def dual_bn_act_forward(y, bn_weight, bn_bias, running_mean, running_var, r, r_bn_weight, r_bn_bias, r_running_mean,
                        r_running_var, training, momentum, eps, r_momentum, r_eps, relu):
    """act(bn(y) + bn_r(r)) -> (out, save_mean, save_invstd, r_save_mean, r_save_invstd, new_running_mean,
    new_running_var, r_new_running_mean, r_new_running_var), each BN as in conv_bn_act_forward. Nothing is
    mutated."""
    fmt = memory_format(y)
    z, mean, invstd, new_rm, new_rv = _batch_norm(y, bn_weight, bn_bias, running_mean, running_var, training,
                                                  momentum, eps)
    zr, r_mean, r_invstd, r_new_rm, r_new_rv = _batch_norm(r, r_bn_weight, r_bn_bias, r_running_mean,
                                                           r_running_var, training, r_momentum, r_eps)
    out = (z + zr).contiguous(memory_format=fmt)
    if relu:
        out = torch.relu(out)
        relu_mask = pack_relu_mask(out)
    else:
        relu_mask = out.new_empty(0, dtype=torch.uint8)
    return out, relu_mask, mean, invstd, r_mean, r_invstd, new_rm, new_rv, r_new_rm, r_new_rv


def _padding_only_taps(x, weight, stride, padding, dilation):
    """Whether some kernel tap reads only zero padding, at every output position."""
    out_hw = conv_output_shape("conv_backward", x, weight, stride, padding, dilation)[2:]
    for size, k, s, p, d, out in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation, out_hw):
        for t in range(k):
            first = max(0, -((t * d - p) // s))  # the first output position whose tap t is at index >= 0
            if first >= out or first * s + t * d - p >= size:
                return True
    return False


def aten_conv_backward(grad, x, weight, stride, padding, dilation, groups, output_mask):
    """ATen's convolution_backward: (grad_x, grad_weight, grad_bias), None where output_mask (3 bools) does not
    ask. Every fastres backend's convolution gradients that ATen computes come through here.
    ATen's 16-bit CPU weight gradient (oneDNN, AVX512-BF16 CPUs, torch 2.14) leaves the gradient of taps that read
    only padding uninitialized when the input is one pixel wide and the stride 2 (found by tests/test_properties.py:
    NaN or 1e22 where 0 is right): there, where the maps are tiny anyway, the call runs in fp32."""
    bias_sizes = [weight.shape[0]] if output_mask[2] else None
    args = (list(stride), list(padding), list(dilation), False, [0, 0], groups, list(output_mask))
    if output_mask[1] and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) \
            and _padding_only_taps(x, weight, stride, padding, dilation):
        grads = torch.ops.aten.convolution_backward(grad.float(), x.float(), weight.float(), bias_sizes, *args)
        return tuple(None if g is None else g.to(x.dtype) for g in grads)
    return torch.ops.aten.convolution_backward(grad, x, weight, bias_sizes, *args)


def conv_backward(grad, x, weight, stride, padding, output_mask, dilation=(1, 1), groups=1):
    """(grad_x, grad_weight, grad_bias) of conv2d(x, weight, bias, stride, padding, dilation, groups), None where
    not asked for."""
    grads = aten_conv_backward(grad, x, weight, stride, padding, dilation, groups, output_mask)
    return tuple(g if m else None for g, m in zip(grads, output_mask))


def bn_act_backward(grad_out, out, conv_out, save_mean, save_invstd, bn_weight, relu, training, residual_grad):
    """Backward of out = act(bn(conv_out) + residual) -> (grad_conv_out, grad_residual or None, grad_bn_weight,
    grad_bn_bias), the last two in the statistics dtype."""
    fmt = memory_format(conv_out)
    acc = save_mean.dtype
    dz = torch.ops.aten.threshold_backward(grad_out, out, 0) if relu else grad_out
    shape = (1, -1, 1, 1)
    dz_acc = dz.to(acc)
    xhat = (conv_out.to(acc) - save_mean.view(shape)) * save_invstd.view(shape)
    grad_bias = dz_acc.sum((0, 2, 3))
    grad_weight = (dz_acc * xhat).sum((0, 2, 3))
    gamma = torch.ones_like(save_mean) if bn_weight is None else bn_weight.to(acc)
    k = (gamma * save_invstd).view(shape)
    if training:
        m = conv_out.numel() // conv_out.shape[1]
        grad_y = k * (dz_acc - (grad_bias / m).view(shape) - xhat * (grad_weight / m).view(shape))
    else:
        grad_y = k * dz_acc
    grad_y = grad_y.to(conv_out.dtype).contiguous(memory_format=fmt)
    # Without the ReLU dz is grad_out itself: an op's output must not alias its input.
    grad_residual = (dz.clone(memory_format=fmt) if dz is grad_out else dz.contiguous(memory_format=fmt)) \
        if residual_grad else None
    return grad_y, grad_residual, grad_weight, grad_bias


def dual_bn_act_backward(grad_out, relu_mask, y, save_mean, save_invstd, bn_weight, r, r_save_mean, r_save_invstd,
                         r_bn_weight, relu, training, need_r):
    """Backward of out = act(bn(y) + bn_r(r)) -> (grad_y, grad_r or None, grad_bn_weight, grad_bn_bias,
    grad_r_bn_weight, grad_r_bn_bias), the BN gradients in the statistics dtype; the ReLU's gradient from its
    mask (see relu_mask_shape)."""
    dz = apply_relu_mask(grad_out, relu_mask) if relu else grad_out
    grad_y, dz, grad_weight, grad_bias = bn_act_backward(dz, None, y, save_mean, save_invstd, bn_weight, False,
                                                         training, True)
    grad_r, _, grad_r_weight, grad_r_bias = bn_act_backward(dz, None, r, r_save_mean, r_save_invstd, r_bn_weight,
                                                            False, training, False)
    return grad_y, (grad_r if need_r else None), grad_weight, grad_bias, grad_r_weight, grad_r_bias


def _bn_relu(x, scale, shift, relu):
    acc = stat_dtype(x)
    view = (1, -1, 1, 1)
    z = x.to(acc) * scale.to(acc).view(view) + shift.to(acc).view(view)
    return torch.relu(z) if relu else z


def bn_relu_conv(x, scale, shift, weight, stride, padding, relu, dilation=(1, 1), groups=1):
    a = _bn_relu(x, scale, shift, relu).to(x.dtype)
    return F.conv2d(a, weight, None, stride, padding, dilation, groups).contiguous(memory_format=memory_format(x))


def bn_relu_conv_backward(grad, x, scale, shift, weight, stride, padding, relu, output_mask, dilation=(1, 1),
                          groups=1):
    """(grad_x, grad_scale, grad_shift, grad_weight) of bn_relu_conv, each None where output_mask (4 bools) does not
    ask for it; the normalized input is recomputed, never saved."""
    need_x, need_scale, need_shift, need_w = output_mask
    z = _bn_relu(x, scale, shift, False)
    a = (torch.relu(z) if relu else z).to(x.dtype)
    need_a = need_x or need_scale or need_shift
    grad_a, grad_w, _ = aten_conv_backward(grad, a, weight, stride, padding, dilation, groups,
                                           [need_a, need_w, False])
    grad_x = grad_scale = grad_shift = None
    if need_a:
        acc = z.dtype
        grad_z = grad_a.to(acc)
        if relu:
            grad_z = torch.ops.aten.threshold_backward(grad_z, z, 0)  # relu's own backward: NaN z passes
        if need_x:
            grad_x = (grad_z * scale.to(acc).view(1, -1, 1, 1)).to(x.dtype).contiguous(
                memory_format=memory_format(x))
        if need_scale:
            grad_scale = (grad_z * x.to(acc)).sum((0, 2, 3)).to(scale.dtype)
        if need_shift:
            grad_shift = grad_z.sum((0, 2, 3)).to(shift.dtype)
    return grad_x, grad_scale, grad_shift, (grad_w if need_w else None)
