"""The triton backend: fastres.kernels' Triton kernels, on GPU tensors (and on CPU tensors under the Triton
interpreter, TRITON_INTERPRET=1, which is how CI tests them).

What runs how:
  conv_bias_act        the implicit-GEMM conv with bias, residual and ReLU in its epilogue; or, where measured
                       faster for that layer, ATen's conv (cuDNN) + the Triton epilogue kernel (fastres.kernels.
                       autotune decides per layer and caches the decision on disk).
  conv_bn_act_forward  training: the conv writes its raw output and per-tile BN statistics in its epilogue, one
                       small kernel turns them into mean / invstd / apply coefficients / new running statistics,
                       one elementwise kernel applies BN + residual + ReLU. Eval: a single conv whose epilogue
                       applies the running-statistics BN + residual + ReLU and also stores the raw conv output
                       (what backward needs). The same per-layer choice as above.
  bn_act_backward      two Triton kernels: per-tile reductions of dz and dz * xhat, then the elementwise grads.
  conv_backward        input and weight gradients as Triton implicit GEMMs or ATen's convolution_backward,
                       chosen per shape by measurement (used where fastres.ops routes the conv backward through
                       the backend).
  bn_relu_conv         conv2d(relu?(x * scale[c] + shift[c]), weight): the previous layer's BN apply + ReLU as the
                       conv's prologue, so in training the normalized activation is never written; its backward
                       recomputes it inside the weight-gradient kernel. The same per-layer choice as above (ATen:
                       the BN apply + ReLU kernel, then cuDNN), for the forward and each gradient.
  add_relu             the Triton elementwise kernel.
  fold_bn              the reference: parameter-sized work, once per model.
float64 tensors run the reference backend: nothing in the ResNet path needs an fp64 tensor-core kernel.
"""
import torch
import torch.nn.functional as F

from fastres.kernels import autotune, bn, conv
from fastres.kernels.autotune import Choice

from . import backend_torch
from ._checks import memory_format

_OPS = ("fold_bn", "add_relu", "conv_bias_act", "conv_bn_act_forward", "bn_act_backward", "conv_backward",
        "bn_relu_conv", "bn_relu_conv_backward")


def unsupported(op, device_type):
    if op not in _OPS:
        return "no kernel for this op"
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if conv.interpreting():
            return None
        return ("CPU tensors run the Triton kernels only under the Triton interpreter (set TRITON_INTERPRET=1 "
                "before triton is imported)")
    return f"no Triton kernels for {device_type} tensors"


# ---------------------------------------------------------------------------------------------- per-layer choice

def _problem_key(kind, x, weight, stride, padding, flags, dilation=(1, 1), groups=1):
    n, c, h, w = x.shape
    co, _, kh, kw = weight.shape
    layout = "nhwc" if memory_format(x) == torch.channels_last else "nchw"
    precision = "tf32" if x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else ""
    # Plain convs keep the keys they always had (caches stay valid); grouped / dilated ones add theirs.
    geometry = "" if tuple(dilation) == (1, 1) else f"d{dilation[0]}x{dilation[1]}|"
    geometry += "" if groups == 1 else f"g{groups}|"
    return (f"{kind}|x{n}x{c}x{h}x{w}|w{co}x{kh}x{kw}|s{stride[0]}x{stride[1]}|p{padding[0]}x{padding[1]}|"
            f"{geometry}{str(x.dtype).replace('torch.', '')}{precision}|{layout}|{flags}")


def _narrow_groups(weight, groups):
    """Groups too narrow for the MMA tiles (fewer than 16 channels a side, e.g. ResNeXt-50's first 3x3 with 4, or a
    depthwise conv): most of every tile would be masked off."""
    return groups > 1 and min(weight.shape[0] // groups, weight.shape[1]) < 16


def _default_provider(x, masked_tiles=False):
    """Without a measurement: the Triton kernel on NHWC (its fast layout), and always in the interpreter (so CI
    tests it); ATen on a GPU for NCHW, for fp32 without TF32, and where most of the Triton kernel's MMA tiles would
    be masked off (masked_tiles: the input gradient of a strided conv, whose transposed gather skips most rows;
    narrow conv groups, see _narrow_groups)."""
    if conv.interpreting() or x.device.type != "cuda":
        return "triton"
    if memory_format(x) != torch.channels_last or masked_tiles:
        return "aten"
    if x.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "aten"  # full-fp32 FMA loops: cuDNN's fp32 kernels are the better unmeasured guess
    return "triton"


def _run_chosen(key, x, triton_fn, aten_fn, default_config, configs, reference, comparable=autotune.result_tensors,
                masked_tiles=False):
    """Runs the problem the way the autotuner chose for `key`: triton_fn(config) or aten_fn(). default_config: the
    Triton kernel's config when nothing is measured (None: its launcher's default); configs(): the ones to
    measure; reference(): the problem's outputs in float64 (comparable(result) of each candidate is checked
    against them before it is timed)."""
    provider = _default_provider(x, masked_tiles)
    default = Choice(provider, default_config if provider == "triton" else None)

    def candidates():
        return [Choice("triton", cfg) for cfg in configs()] + [Choice("aten")]

    def run(choice):
        return (lambda: triton_fn(choice.config)) if choice.provider == "triton" else aten_fn

    choice = autotune.choose(key, x.device, default, candidates, run, reference, comparable)
    return triton_fn(choice.config) if choice.provider == "triton" else aten_fn()


def _run_forward(kind, flags, x, weight, stride, padding, dilation, groups, triton_fn, aten_fn, reference,
                 comparable=autotune.result_tensors):
    m_rows = _out_rows(x, weight, stride, padding, dilation)
    c_out, c_in, kh, kw = weight.shape  # c_in: one group's
    c_out //= groups

    def configs():
        return autotune.forward_configs(x.dtype, m_rows, c_out, c_in, kh * kw)

    return _run_chosen(_problem_key(kind, x, weight, stride, padding, flags, dilation, groups), x, triton_fn,
                       aten_fn, conv.default_config(m_rows, c_out, c_in, x.dtype, kh * kw), configs, reference,
                       comparable, masked_tiles=_narrow_groups(weight, groups))


def _f64(*tensors):
    return [None if t is None else t.detach().double() for t in tensors]


def _moments(stats):
    """(mean, biased variance) per channel from a ConvStats' tile partials: comparable whatever the tiling."""
    rows = (stats.count - torch.arange(stats.tile_mean.shape[0], device=stats.tile_mean.device) * stats.tile_rows)
    rows = rows.clamp(max=stats.tile_rows).to(torch.float64)[:, None]
    tile_mean, tile_m2 = stats.tile_mean.double(), stats.tile_m2.double()
    mean = (tile_mean * rows).sum(0) / stats.count
    return mean, (tile_m2 + rows * (tile_mean - mean) ** 2).sum(0) / stats.count


def _conv_with_stats(result):
    y, stats = result
    return [y, *_moments(stats)]


def _out_rows(x, weight, stride, padding, dilation=(1, 1)):
    h_o = (x.shape[2] + 2 * padding[0] - dilation[0] * (weight.shape[2] - 1) - 1) // stride[0] + 1
    w_o = (x.shape[3] + 2 * padding[1] - dilation[1] * (weight.shape[3] - 1) - 1) // stride[1] + 1
    return x.shape[0] * h_o * w_o


# ---------------------------------------------------------------------------------------------- ops

def fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps):
    return backend_torch.fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps)


def add_relu(x, residual):
    if x.dtype == torch.float64:
        return backend_torch.add_relu(x, residual)
    return bn.bn_act(x, residual=residual, relu=True)


def conv_bias_act(x, weight, bias, stride, padding, residual, relu, dilation=(1, 1), groups=1):
    if x.dtype == torch.float64:
        return backend_torch.conv_bias_act(x, weight, bias, stride, padding, residual, relu, dilation, groups)
    fmt = memory_format(x)

    def triton_fn(config):
        return conv.conv2d(x, weight, stride, padding, dilation=dilation, groups=groups, bias=bias,
                           residual=residual, relu=relu, config=config)[0]

    def aten_fn():
        # The bias inside the conv, on its fp32 accumulator (see backend_cuda.conv_bias_act).
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups).contiguous(memory_format=fmt)
        return bn.bn_act(y, residual=residual, relu=relu)

    def reference():
        return backend_torch.conv_bias_act(*_f64(x, weight, bias), stride, padding, *_f64(residual), relu, dilation,
                                           groups)

    flags = f"bias{int(bias is not None)}res{int(residual is not None)}relu{int(relu)}"
    return _run_forward("conv_bias_act", flags, x, weight, stride, padding, dilation, groups, triton_fn, aten_fn,
                        reference)


def conv_bn_act_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride,
                        padding, residual, relu, dilation=(1, 1), groups=1):
    if x.dtype == torch.float64:
        return backend_torch.conv_bn_act_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, training,
                                                 momentum, eps, stride, padding, residual, relu, dilation, groups)
    fmt = memory_format(x)
    geometry = (stride, padding, dilation, groups)  # F.conv2d's trailing arguments
    if training:
        def triton_fn(config):
            y, _, stats = conv.conv2d(x, weight, stride, padding, dilation=dilation, groups=groups, stats=True,
                                      config=config)
            return y, stats

        def aten_fn():
            y = F.conv2d(x, weight, None, *geometry).contiguous(memory_format=fmt)
            return y, bn.channel_stats(y)

        def reference():
            y = F.conv2d(*_f64(x, weight), None, *geometry)
            var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
            return y, mean, var

        y, stats = _run_forward("conv_stats", "", x, weight, *geometry, triton_fn, aten_fn, reference,
                                _conv_with_stats)
        mean, invstd, scale, _, new_running_mean, new_running_var = bn.bn_finalize(
            stats, bn_weight, bn_bias, running_mean, running_var, momentum, eps)
        out = bn.bn_act(y, scale, bn_bias, residual, relu, center=mean)
        return out, y, mean, invstd, new_running_mean, new_running_var

    mean = running_mean.to(torch.float32, copy=True)
    invstd = torch.rsqrt(running_var.to(torch.float32) + eps)
    scale = bn_weight.to(torch.float32) * invstd
    shift = bn_bias.to(torch.float32) - mean * scale

    def triton_fn(config):
        out, y, _ = conv.conv2d(x, weight, stride, padding, dilation=dilation, groups=groups, scale=scale, bias=shift,
                                residual=residual, relu=relu, store_raw=True, config=config)
        return out, y

    def aten_fn():
        y = F.conv2d(x, weight, None, *geometry).contiguous(memory_format=fmt)
        return bn.bn_act(y, scale, shift, residual, relu), y

    def reference():
        y = F.conv2d(*_f64(x, weight), None, *geometry)
        z = y * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
        z = z if residual is None else z + residual.double()
        return (torch.relu(z) if relu else z), y

    flags = f"res{int(residual is not None)}relu{int(relu)}"
    out, y = _run_forward("conv_bn_eval", flags, x, weight, *geometry, triton_fn, aten_fn, reference)
    return out, y, mean, invstd, running_mean.new_empty(0), running_var.new_empty(0)


def bn_act_backward(grad_out, out, conv_out, save_mean, save_invstd, bn_weight, relu, training, residual_grad):
    if conv_out.dtype == torch.float64:
        return backend_torch.bn_act_backward(grad_out, out, conv_out, save_mean, save_invstd, bn_weight, relu,
                                             training, residual_grad)
    return bn.bn_act_backward(grad_out, out, conv_out, save_mean, save_invstd, bn_weight, relu, training,
                              residual_grad)


def conv_backward(grad, x, weight, stride, padding, output_mask, dilation=(1, 1), groups=1):
    """(grad_x, grad_weight, grad_bias) of conv2d(x, weight, bias, stride, padding, dilation, groups), each None
    where output_mask (3 bools) does not ask for it; grad in x's memory format."""
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    geometry = (stride, padding, dilation, groups)
    need_x, need_w, need_b = output_mask
    if x.dtype == torch.float64:
        return backend_torch.aten_conv_backward(grad, x, weight, *geometry, output_mask)
    c_out, c_in, kh, kw = weight.shape  # c_in: one group's
    c_out_g = c_out // groups
    grad_x = grad_w = grad_b = None
    if need_x:
        def dgrad_triton(config):
            return conv.conv2d_input_grad(grad, weight, x.shape, stride, padding, dilation=dilation, groups=groups,
                                          config=config)

        def dgrad_aten():
            return backend_torch.aten_conv_backward(grad, x, weight, *geometry, (True, False, False))[0]

        rows = x.numel() // x.shape[1]

        def dgrad_configs():
            return autotune.forward_configs(grad.dtype, rows, c_in, c_out_g, kh * kw)

        def dgrad_reference():
            return backend_torch.aten_conv_backward(*_f64(grad, x, weight), *geometry, (True, False, False))[0]

        grad_x = _run_chosen(_problem_key("dgrad", x, weight, stride, padding, "", dilation, groups), x,
                             dgrad_triton, dgrad_aten, conv.default_config(rows, c_in, c_out_g, grad.dtype, kh * kw),
                             dgrad_configs, dgrad_reference,
                             masked_tiles=max(stride) > 1 or _narrow_groups(weight, groups))
    if need_w or need_b:
        def wgrad_triton(config):
            return conv.conv2d_weight_grad(grad, x, weight.shape, stride, padding, dilation=dilation, groups=groups,
                                           bias_grad=need_b, config=config)

        def wgrad_aten():
            return backend_torch.aten_conv_backward(grad, x, weight, *geometry, (False, True, need_b))[1:]

        def wgrad_configs():
            return autotune.wgrad_configs(x.dtype, c_out_g, c_in)

        def wgrad_reference():
            return backend_torch.aten_conv_backward(*_f64(grad, x, weight), *geometry, (False, True, need_b))[1:]

        gw, gb = _run_chosen(_problem_key("wgrad", x, weight, stride, padding, f"bias{int(need_b)}", dilation, groups),
                             x, wgrad_triton, wgrad_aten, None, wgrad_configs, wgrad_reference,
                             masked_tiles=_narrow_groups(weight, groups))
        grad_w = gw if need_w else None
        grad_b = gb if need_b else None
    return grad_x, grad_w, grad_b


# ---------------------------------------------------------------------------------------------- BN-apply prologue

def bn_relu_conv(x, scale, shift, weight, stride, padding, relu, dilation=(1, 1), groups=1):
    """conv2d(relu?(x * scale[c] + shift[c]), weight, None, stride, padding); scale and shift per input channel
    (fp32). In a training step x is the previous conv's raw output and (scale, shift) its BN's batch
    coefficients (fastres.kernels.bn.bn_finalize), so the normalized activation never goes through memory.
    Chosen per layer like every conv: the Triton kernel with the prologue, or the BN apply + ReLU kernel and then
    ATen's conv (cuDNN), which is what NCHW and fp32 without TF32 get without a measurement."""
    geometry = (stride, padding, dilation, groups)  # F.conv2d's trailing arguments
    if x.dtype == torch.float64:
        return F.conv2d(_bn_relu_reference(x, scale, shift, relu), weight, None, *geometry)

    def triton_fn(config):
        return conv.conv2d(x, weight, stride, padding, dilation=dilation, groups=groups, in_scale=scale,
                           in_shift=shift, in_relu=relu, config=config)[0]

    def aten_fn():
        a = bn.bn_act(x, scale, shift, None, relu)
        return F.conv2d(a, weight, None, *geometry).contiguous(memory_format=memory_format(x))

    def reference():
        return backend_torch.bn_relu_conv(*_f64(x, scale, shift, weight), stride, padding, relu, dilation, groups)

    return _run_forward("bn_relu_conv", f"relu{int(relu)}", x, weight, *geometry, triton_fn, aten_fn, reference)


def bn_relu_conv_backward(grad, x, scale, shift, weight, stride, padding, relu, output_mask, dilation=(1, 1),
                          groups=1):
    """(grad_x, grad_scale, grad_shift, grad_weight) of bn_relu_conv, each None where output_mask (4 bools) does
    not ask for it. The input gradient of the conv (w.r.t. the normalized input) is conv_backward's, chosen per
    layer; the weight gradient recomputes the normalized input inside the Triton kernel (prologue) or, where
    ATen is chosen, materializes it for cuDNN; then the ReLU and the per-channel affine map."""
    need_x, need_scale, need_shift, need_w = output_mask
    geometry = (stride, padding, dilation, groups)
    if x.dtype == torch.float64:
        z = _bn_relu_reference(x, scale, shift, relu)
        grad_z, grad_w, _ = backend_torch.aten_conv_backward(grad, z, weight, *geometry, (True, need_w, False))
    else:
        need_z = need_x or need_scale or need_shift
        grad_z = conv_backward(grad, x, weight, stride, padding, (True, False, False), dilation, groups)[0] \
            if need_z else None
        grad_w = _prologue_weight_grad(grad, x, scale, shift, weight, relu, *geometry) if need_w else None
    grad_x = grad_scale = grad_shift = None
    if grad_z is not None:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        view = (1, -1, 1, 1)
        x_acc = x.to(acc)
        grad_u = grad_z.to(acc)
        if relu:
            z = x_acc * scale.to(acc).view(view) + shift.to(acc).view(view)
            grad_u = torch.ops.aten.threshold_backward(grad_u, z, 0)  # relu's own backward: NaN z passes
        if need_x:
            grad_x = (grad_u * scale.to(acc).view(view)).to(x.dtype).contiguous(memory_format=memory_format(x))
        if need_scale:
            grad_scale = (grad_u * x_acc).sum((0, 2, 3)).to(scale.dtype)
        if need_shift:
            grad_shift = grad_u.sum((0, 2, 3)).to(shift.dtype)
    return grad_x, grad_scale, grad_shift, (grad_w if need_w else None)


def _prologue_weight_grad(grad, x, scale, shift, weight, relu, stride, padding, dilation, groups):
    c_out, c_in = weight.shape[:2]
    geometry = (stride, padding, dilation, groups)

    def triton_fn(config):
        return conv.conv2d_weight_grad(grad, x, weight.shape, stride, padding, dilation=dilation, groups=groups,
                                       in_scale=scale, in_shift=shift, in_relu=relu, config=config)[0]

    def aten_fn():
        a = bn.bn_act(x, scale, shift, None, relu)
        return backend_torch.aten_conv_backward(grad, a, weight, *geometry, (False, True, False))[1]

    def reference():
        grad64, x64, scale64, shift64, weight64 = _f64(grad, x, scale, shift, weight)
        a = _bn_relu_reference(x64, scale64, shift64, relu)
        return backend_torch.aten_conv_backward(grad64, a, weight64, *geometry, (False, True, False))[1]

    key = _problem_key("wgrad_prologue", x, weight, stride, padding, f"relu{int(relu)}", dilation, groups)
    return _run_chosen(key, x, triton_fn, aten_fn, None, lambda: autotune.wgrad_configs(x.dtype, c_out // groups, c_in),
                       reference, masked_tiles=_narrow_groups(weight, groups))


def _bn_relu_reference(x, scale, shift, relu):
    z = x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)
    return torch.relu(z) if relu else z
