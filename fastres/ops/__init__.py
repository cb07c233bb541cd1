"""fastres.ops: the fused ops, registered as torch.ops.fastres.* with fake implementations and autograd.

    fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps=1e-5) -> (weight, bias)
    conv_bias_act(x, weight, bias=None, stride=1, padding=0, residual=None, relu=True, dilation=1, groups=1)
    add_relu(x, residual)
    max_pool_relu(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, relu=True)
    conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum=0.1, eps=1e-5,
                stride=1, padding=0, residual=None, relu=True, dilation=1, groups=1)
    bn_relu_conv(x, scale, shift, weight, stride=1, padding=0, relu=True, dilation=1, groups=1)
    dual_bn_act(y, bn_weight, bn_bias, running_mean, running_var, r, r_bn_weight, r_bn_bias, r_running_mean,
                r_running_var, training, momentum=0.1, eps=1e-5, r_momentum=0.1, r_eps=1e-5, relu=True)

The backend is chosen by device (see fastres.ops._backend); `fastres.backend(name)` or FASTRES_BACKEND force one.
"""
import torch

from . import _checks, _library  # noqa: F401  (_library registers the ops)
from . import _decompositions  # noqa: F401  (registers their decompositions, for the ONNX exporter)
from ._backend import BACKENDS, BackendUnavailableError, backend, forced_backend, select


def fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps=1e-5):
    """The conv's (weight, bias) with an eval-mode BatchNorm folded in, computed in fp32 and cast back to the
    weight's dtype. conv_bias may be None. Differentiable w.r.t. conv_weight, conv_bias, bn_weight and bn_bias."""
    return torch.ops.fastres.fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps)


def add_relu(x, residual):
    """relu(x + residual)."""
    return torch.ops.fastres.add_relu(x, residual)


def max_pool_relu(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, relu=True):
    """relu(F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)), relu optional, in one pass that
    keeps no argmax indices (backward recomputes them). As F.max_pool2d: stride defaults to kernel_size, padding
    is never the maximum, a NaN in a window gives NaN. The output is laid out like x (channels_last in,
    channels_last out)."""
    kernel_size, stride, padding, dilation, _ = _checks.check_max_pool_relu(
        x, kernel_size, kernel_size if stride is None else stride, padding, dilation, ceil_mode, relu)
    return torch.ops.fastres.max_pool_relu(x, kernel_size, stride, padding, dilation, ceil_mode, relu)


def conv_bias_act(x, weight, bias=None, stride=1, padding=0, residual=None, relu=True, dilation=1, groups=1):
    """relu(conv2d(x, weight, bias, stride, padding, dilation, groups) + residual); residual and relu optional."""
    return torch.ops.fastres.conv_bias_act(x, weight, bias, _pair(stride), _pair(padding), residual, relu,
                                           _pair(dilation), groups)


def conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum=0.1, eps=1e-5,
                stride=1, padding=0, residual=None, relu=True, dilation=1, groups=1):
    """relu(batch_norm(conv2d(x, weight, None, stride, padding, dilation, groups), running_mean, running_var,
    bn_weight, bn_bias, training, momentum, eps) + residual), with F.batch_norm's semantics: in training the batch
    statistics normalize (biased variance) and running_mean/running_var are updated in place (unbiased variance)."""
    return torch.ops.fastres.conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, training,
                                         momentum, eps, _pair(stride), _pair(padding), residual, relu,
                                         _pair(dilation), groups)


def bn_relu_conv(x, scale, shift, weight, stride=1, padding=0, relu=True, dilation=1, groups=1):
    """conv2d(relu(x * scale[c] + shift[c]), weight, None, stride, padding, dilation, groups): the previous layer's
    BN apply (+ ReLU) as this conv's prologue. scale and shift are per input channel; relu optional. The apply is
    computed in scale's dtype (fp32 for a 16-bit x, as ATen's batch_norm does) and rounded once to x's dtype.
    Backward recomputes the normalized input instead of keeping it."""
    return torch.ops.fastres.bn_relu_conv(x, scale, shift, weight, _pair(stride), _pair(padding), relu,
                                          _pair(dilation), groups)


def dual_bn_act(y, bn_weight, bn_bias, running_mean, running_var, r, r_bn_weight, r_bn_bias, r_running_mean,
                r_running_var, training, momentum=0.1, eps=1e-5, r_momentum=0.1, r_eps=1e-5, relu=True):
    """relu(batch_norm(y, ...) + batch_norm(r, r_...)): a bottleneck's last BN and its projection shortcut's BN, the
    add and the ReLU in one pass. F.batch_norm's semantics for each BN; in training both BNs' running statistics are
    updated in place. The ReLU's 1-bit mask, not its output, is kept for backward."""
    return torch.ops.fastres.dual_bn_act(y, bn_weight, bn_bias, running_mean, running_var, r, r_bn_weight,
                                         r_bn_bias, r_running_mean, r_running_var, training, momentum, eps,
                                         r_momentum, r_eps, relu)


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


__all__ = ["fold_bn", "add_relu", "max_pool_relu", "conv_bias_act", "conv_bn_act", "bn_relu_conv", "dual_bn_act",
           "backend", "forced_backend", "select", "BACKENDS", "BackendUnavailableError"]
