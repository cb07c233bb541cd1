"""Loader for fastres._C, the compiled kernels (csrc/), and the fake implementations of its ops.

fastres._C registers these low-level ops in the ``fastres`` namespace, with CPU kernels and, when built
with CUDA, CUDA kernels:

  _fold_bn(conv_weight, conv_bias?, bn_weight, bn_bias, running_mean, running_var, eps) -> (weight, bias)
  _add_relu(x, residual) -> relu(x + residual)
  _bn_stats(y, weight?, bias?, running_mean?, running_var?, momentum, eps)
      -> (mean, invstd, scale, shift, new_running_mean, new_running_var)
      batch statistics per channel (biased variance; Chan's merge of partial results), the coefficients of the
      centered apply (y - mean) * scale + shift: scale = weight * invstd, shift = bias - (what the mean lost in
      its rounding to the math dtype) * scale (the CPU kernel merges in fp64 and knows it; the CUDA kernel merges
      in the math dtype and gives the bias), and BatchNorm2d's running-statistics update as new tensors (empty
      without running statistics), all computed on the device
  _bn_act_forward(y, scale?, shift?, residual?, relu, center?) -> act((y - center[c]) * scale[c] + shift[c] + residual)
      (a missing center, shift or residual is 0, a missing scale 1; a BN centers on its mean, shift its bias: see
      bn_act_value in csrc/include/fastres/math.h)
  _bn_apply(y, scale?, shift?, residual?, residual_scale?, residual_shift?, relu, mask, center?, residual_center?)
      -> (out, mask)
      act((y - center[c]) * scale[c] + shift[c] + residual [- residual_center[c], * residual_scale[c]
      + residual_shift[c]]) and, with mask=True,
      the ReLU mask: uint8 [rows, ceil(cols / 8)] of y's [rows, cols] matrix in memory order (NHWC: rows = N*H*W,
      cols = C, and any 1x1 map; NCHW: rows = N*C, cols = H*W), bit j of byte b of a row for the element at column 8b + j
  _bn_act_backward(grad_out, out, y, mean, invstd, weight?, relu, training, residual_grad)
      -> (grad_y, grad_residual, grad_weight, grad_bias)
  _bn_apply_backward(grad_out, out?, mask?, y, mean, invstd, weight?, residual?, residual_mean?, residual_invstd?,
                     residual_weight?, relu, training, residual_grad)
      -> (grad_y, grad_residual, grad_weight, grad_bias, grad_residual_weight, grad_residual_bias)
      the backward of _bn_apply with the ReLU's gradient mask taken from `mask` (or else from `out`); with a
      residual, the residual went through its own BN (the dual form) and grad_residual is that BN's input gradient

This module imports nothing else from fastres: it only loads the extension and describes its outputs to
FakeTensor / torch.compile. A missing extension is not an error here; ``available()`` says whether it loaded.
"""
import functools

import torch
# The Python twin of Tensor.suggest_memory_format(), which the kernels use to pick their output layout.
from torch._prims_common import suggest_memory_format

try:
    from fastres import _C  # noqa: F401  (loading it registers the ops)
except ImportError as e:  # not built, or built against another torch
    _C = None
    _LOAD_ERROR = f"{type(e).__name__}: {e}"
else:
    _LOAD_ERROR = None

KERNEL_OPS = ("_fold_bn", "_add_relu", "_bn_stats", "_bn_act_forward", "_bn_apply", "_bn_act_backward",
              "_bn_apply_backward")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def available() -> bool:
    """Whether fastres._C loaded."""
    return _C is not None


def load_error():
    """Why fastres._C did not load (the ImportError's text), or None when it did."""
    return _LOAD_ERROR


def with_cuda() -> bool:
    """Whether fastres._C was built with its CUDA kernels."""
    return _C is not None and bool(_C.with_cuda())


@functools.lru_cache(maxsize=None)  # fastres._C registers its kernels once, at import; asked on every op call
def has_kernel(op_name: str, device_type: str) -> bool:
    """Whether ``torch.ops.fastres.<op_name>`` has a compiled kernel for ``device_type`` ("cpu" or "cuda")."""
    if _C is None:
        return False
    key = _DISPATCH_KEYS.get(device_type.lower())
    if key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastres::{op_name}", key)
    except RuntimeError:  # no such operator
        return False


def _math_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _like_in_format(t):
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=suggest_memory_format(t))


def relu_mask_shape(y):
    """Shape of the ReLU mask _bn_apply writes for y (see the module docstring): a 1x1 map, stored [n][c] whatever
    the strides of its size-1 dims, always takes the NHWC form."""
    n, c, h, w = y.shape
    if h * w == 1 or suggest_memory_format(y) == torch.channels_last:
        return (n * h * w, (c + 7) // 8)
    return (n * c, (h * w + 7) // 8)


def has_op(op_name: str) -> bool:
    """Whether fastres._C defines ``torch.ops.fastres.<op_name>`` (an extension built before the op lacks it)."""
    return _C is not None and _exists(op_name)


def _exists(op_name):
    try:
        getattr(torch.ops.fastres, op_name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _fake(op_name):
    """register_fake for an op of fastres._C; an extension built before the op existed simply lacks it (the
    backends then fall back, see has_kernel)."""
    if _exists(op_name):
        return torch.library.register_fake(f"fastres::{op_name}")
    return lambda fn: fn


def _register_fakes():
    @_fake("_fold_bn")
    def _fold_bn_fake(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps):
        torch._check(conv_weight.dim() == 4, lambda: "fastres::_fold_bn: conv_weight must be 4-D")
        # The kernel keeps a dense weight's strides, exactly as empty_like does.
        return torch.empty_like(conv_weight), conv_weight.new_empty(conv_weight.shape[0])

    @_fake("_add_relu")
    def _add_relu_fake(x, residual):
        torch._check(x.shape == residual.shape, lambda: "fastres::_add_relu: residual must have x's shape")
        return _like_in_format(x)

    @_fake("_bn_act_forward")
    def _bn_act_forward_fake(y, scale, shift, residual, relu, center=None):
        torch._check(y.dim() == 4, lambda: "fastres::_bn_act_forward: y must be 4-D (N, C, H, W)")
        return _like_in_format(y)

    @_fake("_bn_stats")
    def _bn_stats_fake(y, weight, bias, running_mean, running_var, momentum, eps):
        torch._check(y.dim() == 4, lambda: "fastres::_bn_stats: y must be 4-D (N, C, H, W)")
        acc = _math_dtype(y.dtype)
        stats = [y.new_empty(y.shape[1], dtype=acc) for _ in range(4)]
        if running_mean is None:
            return (*stats, y.new_empty(0, dtype=acc), y.new_empty(0, dtype=acc))
        return (*stats, running_mean.new_empty(y.shape[1]), running_var.new_empty(y.shape[1]))

    @_fake("_bn_apply")
    def _bn_apply_fake(y, scale, shift, residual, residual_scale, residual_shift, relu, mask, center=None,
                       residual_center=None):
        torch._check(y.dim() == 4, lambda: "fastres::_bn_apply: y must be 4-D (N, C, H, W)")
        bits = y.new_empty(relu_mask_shape(y) if mask else (0,), dtype=torch.uint8)
        return _like_in_format(y), bits

    @_fake("_bn_apply_backward")
    def _bn_apply_backward_fake(grad_out, out, mask, y, mean, invstd, weight, residual, residual_mean,
                                residual_invstd, residual_weight, relu, training, residual_grad):
        torch._check(y.dim() == 4, lambda: "fastres::_bn_apply_backward: y must be 4-D (N, C, H, W)")
        acc = _math_dtype(y.dtype)
        channels = y.shape[1]
        dual = channels if residual is not None else 0
        return (_like_in_format(y), _like_in_format(y) if residual_grad else y.new_empty(0),
                y.new_empty(channels, dtype=acc), y.new_empty(channels, dtype=acc), y.new_empty(dual, dtype=acc),
                y.new_empty(dual, dtype=acc))

    @_fake("_bn_act_backward")
    def _bn_act_backward_fake(grad_out, out, y, mean, invstd, weight, relu, training, residual_grad):
        torch._check(y.dim() == 4, lambda: "fastres::_bn_act_backward: y must be 4-D (N, C, H, W)")
        grad_y = _like_in_format(y)
        grad_residual = _like_in_format(y) if residual_grad else y.new_empty(0)
        acc = _math_dtype(y.dtype)
        grad_weight = y.new_empty(y.shape[1], dtype=acc)
        grad_bias = y.new_empty(y.shape[1], dtype=acc)
        return grad_y, grad_residual, grad_weight, grad_bias

    @_fake("_max_pool_relu")
    def _max_pool_relu_fake(x, kernel_size, stride, padding, dilation, ceil_mode, relu):
        from fastres.ops import _checks
        *_, out_shape = _checks.check_max_pool_relu(x, kernel_size, stride, padding, dilation, ceil_mode, relu)
        return torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))

    @_fake("_relu_")
    def _relu_fake(x):
        return None


if _C is not None:
    _register_fakes()
