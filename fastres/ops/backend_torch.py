"""The reference backend: every fused op written with plain ATen ops.

The tests hold every other backend to these functions; they are also the fallback that runs anywhere.
Each returns its output in the memory format of its main input (see _checks.memory_format).
"""
import torch
import torch.nn.functional as F

from ._checks import memory_format


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


def conv_bias_act(x, weight, bias, stride, padding, residual, relu):
    y = F.conv2d(x, weight, bias, stride, padding)
    if residual is not None:
        y = y + residual
    if relu:
        y = torch.relu(y)
    return y.contiguous(memory_format=memory_format(x))


def conv_bn_act_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride,
                        padding, residual, relu):
    """-> (out, conv_out, save_mean, save_invstd, new_running_mean, new_running_var): the output, the raw conv
    output, the per-channel statistics that normalized it (the batch's in training, the running ones in eval), and
    in training the updated running statistics (empty tensors in eval). Nothing is mutated."""
    fmt = memory_format(x)
    y = F.conv2d(x, weight, None, stride, padding).contiguous(memory_format=fmt)
    acc = stat_dtype(y)
    if training:
        # aten's own batch norm on copies: the running statistics come out exactly as nn.BatchNorm2d's.
        new_running_mean, new_running_var = running_mean.clone(), running_var.clone()
        z, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            y, bn_weight, bn_bias, new_running_mean, new_running_var, True, momentum, eps)
    else:
        z, _, _ = torch.ops.aten.native_batch_norm(y, bn_weight, bn_bias, running_mean, running_var, False,
                                                   momentum, eps)
        save_mean = running_mean.to(acc, copy=True)
        save_invstd = torch.rsqrt(running_var.to(acc) + eps)
        new_running_mean, new_running_var = running_mean.new_empty(0), running_var.new_empty(0)
    if residual is not None:
        z = z + residual
    if relu:
        z = torch.relu(z)
    return (z.contiguous(memory_format=fmt), y, save_mean.to(acc), save_invstd.to(acc), new_running_mean,
            new_running_var)


def conv_backward(grad, x, weight, stride, padding, output_mask):
    """(grad_x, grad_weight, grad_bias) of conv2d(x, weight, bias, stride, padding), None where not asked for."""
    grads = torch.ops.aten.convolution_backward(grad, x, weight, [weight.shape[0]] if output_mask[2] else None,
                                                list(stride), list(padding), [1, 1], False, [0, 0], 1,
                                                list(output_mask))
    return tuple(g if m else None for g, m in zip(grads, output_mask))


def bn_act_backward(grad_out, out, conv_out, save_mean, save_invstd, bn_weight, relu, training, residual_grad):
    """Backward of out = act(bn(conv_out) + residual) -> (grad_conv_out, grad_residual or None, grad_bn_weight,
    grad_bn_bias), the last two in the statistics dtype."""
    fmt = memory_format(conv_out)
    acc = save_mean.dtype
    dz = torch.where(out > 0, grad_out, torch.zeros_like(grad_out)) if relu else grad_out
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


def _bn_relu(x, scale, shift, relu):
    acc = stat_dtype(x)
    view = (1, -1, 1, 1)
    z = x.to(acc) * scale.to(acc).view(view) + shift.to(acc).view(view)
    return torch.relu(z) if relu else z


def bn_relu_conv(x, scale, shift, weight, stride, padding, relu):
    a = _bn_relu(x, scale, shift, relu).to(x.dtype)
    return F.conv2d(a, weight, None, stride, padding).contiguous(memory_format=memory_format(x))


def bn_relu_conv_backward(grad, x, scale, shift, weight, stride, padding, relu, output_mask):
    """(grad_x, grad_scale, grad_shift, grad_weight) of bn_relu_conv, each None where output_mask (4 bools) does not
    ask for it; the normalized input is recomputed, never saved."""
    need_x, need_scale, need_shift, need_w = output_mask
    z = _bn_relu(x, scale, shift, False)
    a = (torch.relu(z) if relu else z).to(x.dtype)
    need_a = need_x or need_scale or need_shift
    grad_a, grad_w, _ = torch.ops.aten.convolution_backward(grad, a, weight, None, list(stride), list(padding),
                                                           [1, 1], False, [0, 0], 1, [need_a, need_w, False])
    grad_x = grad_scale = grad_shift = None
    if need_a:
        acc = z.dtype
        grad_z = grad_a.to(acc)
        if relu:
            grad_z = torch.where(z > 0, grad_z, torch.zeros_like(grad_z))
        if need_x:
            grad_x = (grad_z * scale.to(acc).view(1, -1, 1, 1)).to(x.dtype).contiguous(
                memory_format=memory_format(x))
        if need_scale:
            grad_scale = (grad_z * x.to(acc)).sum((0, 2, 3)).to(scale.dtype)
        if need_shift:
            grad_shift = grad_z.sum((0, 2, 3)).to(shift.dtype)
    return grad_x, grad_scale, grad_shift, (grad_w if need_w else None)
