"""The fastres ops as torch.library custom ops: schema, dispatch to a backend, fake (meta) implementation,
autograd and autocast. Each op's math lives in the backends (backend_torch is the reference)."""
import torch
import torch.nn.functional as F

from . import _backend, _checks, _create_graph, backend_torch
from ._checks import like_param, memory_format

_SCHEMAS = {
    "fold_bn": "(Tensor conv_weight, Tensor? conv_bias, Tensor bn_weight, Tensor bn_bias, Tensor running_mean, "
               "Tensor running_var, float eps=1e-05) -> (Tensor, Tensor)",
    "add_relu": "(Tensor x, Tensor residual) -> Tensor",
    # relu(max_pool2d(x)) (relu optional), F.max_pool2d's semantics; one pass without argmax indices (a ResNet
    # stem's ReLU and max pool: ReLU commutes with max, so the stem's conv ends without it).
    "max_pool_relu": "(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding=0, int[2] dilation=1, "
                     "bool ceil_mode=False, bool relu=True) -> Tensor",
    "conv_bias_act": "(Tensor x, Tensor weight, Tensor? bias=None, int[2] stride=1, int[2] padding=0, "
                     "Tensor? residual=None, bool relu=True, int[2] dilation=[1, 1], int groups=1) -> Tensor",
    # The functional forward of conv_bn_act (autograd needs a functional op): besides the output it returns what
    # backward needs (the raw conv output, the per-channel mean and inverse std that normalized it) and, in
    # training, the updated running statistics (empty in eval), which conv_bn_act writes back in place.
    "conv_bn_act_forward": "(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, Tensor running_mean, "
                           "Tensor running_var, bool training, float momentum=0.1, float eps=1e-05, "
                           "int[2] stride=1, int[2] padding=0, Tensor? residual=None, bool relu=True, "
                           "int[2] dilation=[1, 1], int groups=1) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    # act(bn(y) + bn_r(r)): a bottleneck's last BN and its downsample branch's BN, added and activated in one pass
    # (y and r are the two convs' raw outputs). Functional like conv_bn_act_forward: it returns what backward needs
    # (the ReLU's 1-bit mask, empty without relu, instead of the output; both BNs' mean and inverse std) and, in
    # training, both BNs' updated running statistics (empty in eval):
    # -> (out, relu_mask, save_mean, save_invstd, r_save_mean, r_save_invstd, new_running_mean, new_running_var,
    #     r_new_running_mean, r_new_running_var)
    "dual_bn_act_forward": "(Tensor y, Tensor bn_weight, Tensor bn_bias, Tensor running_mean, Tensor running_var, "
                           "Tensor r, Tensor r_bn_weight, Tensor r_bn_bias, Tensor r_running_mean, "
                           "Tensor r_running_var, bool training, float momentum=0.1, float eps=1e-05, "
                           "float r_momentum=0.1, float r_eps=1e-05, bool relu=True) "
                           "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    # The previous layer's BN apply (+ ReLU) as this conv's prologue: in training the normalized activation is
    # recomputed from the previous conv's raw output instead of being kept.
    "bn_relu_conv": "(Tensor x, Tensor scale, Tensor shift, Tensor weight, int[2] stride=1, int[2] padding=0, "
                    "bool relu=True, int[2] dilation=[1, 1], int groups=1) -> Tensor",
    # Backward ops. They are ops (not Python inside the autograd formulas) so that the backend is chosen when the
    # backward runs: a compiled graph then holds torch.ops.fastres.*_backward, never one backend's private kernels,
    # and follows fastres.backend() / FASTRES_BACKEND like every forward. Gradients not asked for come back empty.
    "conv_backward": "(Tensor grad, Tensor x, Tensor weight, int[2] stride, int[2] padding, bool[3] output_mask, "
                     "int[2] dilation=[1, 1], int groups=1) -> (Tensor, Tensor, Tensor)",
    "bn_act_backward": "(Tensor grad_out, Tensor out, Tensor conv_out, Tensor save_mean, Tensor save_invstd, "
                       "Tensor? bn_weight, bool relu, bool training, bool residual_grad) "
                       "-> (Tensor, Tensor, Tensor, Tensor)",
    "bn_relu_conv_backward": "(Tensor grad, Tensor x, Tensor scale, Tensor shift, Tensor weight, int[2] stride, "
                             "int[2] padding, bool relu, bool[4] output_mask, int[2] dilation=[1, 1], int groups=1) "
                             "-> (Tensor, Tensor, Tensor, Tensor)",
    # -> (grad_y, grad_r (empty unless r_grad), grad_bn_weight, grad_bn_bias, grad_r_bn_weight, grad_r_bn_bias)
    "dual_bn_act_backward": "(Tensor grad_out, Tensor relu_mask, Tensor y, Tensor save_mean, Tensor save_invstd, "
                            "Tensor? bn_weight, Tensor r, Tensor r_save_mean, Tensor r_save_invstd, "
                            "Tensor? r_bn_weight, bool relu, bool training, bool r_grad) "
                            "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
}


def _stat_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _record_forward(ctx, inputs):
    """What every backward needs from its forward: which arguments want gradients, and the backend selection
    (forced backend, tuning session) the forward ran under, which backward re-enters (_register_autograd)."""
    # ctx.needs_input_grad of a custom op counts only the tensors actually passed (None arguments drop out), so
    # positions shift; record per argument instead.
    ctx.req = tuple(isinstance(a, torch.Tensor) and a.requires_grad for a in inputs)
    ctx.selection = _backend.capture()


def _register_autograd(op, backward, setup_context):
    """op's autograd formula, its backward run under the forward's backend selection: autograd may run it on
    another thread, where the caller's fastres.backend() block is not visible."""
    op.register_autograd(_backend.keeps_forward_selection(backward), setup_context=setup_context)


def _empty(shape, like, fmt, dtype=None):
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


def _inductor_fallbacks():
    """See _decompositions.register_inductor_fallbacks: called from the fakes of the decomposed ops, which
    torch.compile runs (under AOTAutograd, inside Inductor) before Inductor lowers them."""
    from . import _decompositions  # here, not at import: it reads the ops this module registers
    _decompositions.register_inductor_fallbacks()


# ---------------------------------------------------------------- fold_bn
@torch.library.custom_op("fastres::fold_bn", mutates_args=(), schema=_SCHEMAS["fold_bn"])
def fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps=1e-5):
    _checks.check_fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps)
    return _backend.select("fold_bn", conv_weight.device).fold_bn(
        conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps)


@fold_bn.register_fake
def _(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps=1e-5):
    _inductor_fallbacks()
    _checks.check_fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps)
    weight = torch.empty_like(conv_weight, memory_format=memory_format(conv_weight))
    return weight, conv_weight.new_empty((conv_weight.shape[0],))


def _fold_bn_setup(ctx, inputs, output):
    _record_forward(ctx, inputs)
    conv_weight, conv_bias, bn_weight, _, running_mean, running_var, eps = inputs
    ctx.has_conv_bias = conv_bias is not None
    ctx.eps = eps
    ctx.save_for_backward(conv_weight, conv_bias, bn_weight, running_mean, running_var)


def _fold_bn_backward(ctx, grad_weight, grad_bias):
    conv_weight, conv_bias, bn_weight, running_mean, running_var = ctx.saved_tensors
    acc = _stat_dtype(conv_weight)
    invstd = torch.rsqrt(running_var.to(acc) + ctx.eps)
    scale = bn_weight.to(acc) * invstd
    cout = conv_weight.shape[0]
    bshape = (-1,) + (1,) * (conv_weight.dim() - 1)
    gw = torch.zeros_like(conv_weight, dtype=acc) if grad_weight is None else grad_weight.to(acc)
    gb = torch.zeros(cout, dtype=acc, device=conv_weight.device) if grad_bias is None else grad_bias.to(acc)
    centered = -running_mean.to(acc) if conv_bias is None else conv_bias.to(acc) - running_mean.to(acc)
    # d(out)/d(scale) per channel: from the weight (w) and from the bias (b - mean).
    grad_scale = (gw * conv_weight.to(acc)).reshape(cout, -1).sum(1) + gb * centered
    g_conv_w = g_conv_b = g_bn_w = g_bn_b = None
    if ctx.req[0]:
        g_conv_w = like_param((gw * scale.view(bshape)).to(conv_weight.dtype), conv_weight)
    if ctx.has_conv_bias and ctx.req[1]:
        g_conv_b = (gb * scale).to(conv_bias.dtype)
    if ctx.req[2]:
        g_bn_w = (grad_scale * invstd).to(bn_weight.dtype)
    if ctx.req[3]:
        g_bn_b = gb.to(bn_weight.dtype)
    return g_conv_w, g_conv_b, g_bn_w, g_bn_b, None, None, None


_register_autograd(fold_bn, _fold_bn_backward, _fold_bn_setup)


# ---------------------------------------------------------------- add_relu
@torch.library.custom_op("fastres::add_relu", mutates_args=(), schema=_SCHEMAS["add_relu"])
def add_relu(x, residual):
    _checks.check_add_relu(x, residual)
    return _backend.select("add_relu", x.device).add_relu(x, residual)


@add_relu.register_fake
def _(x, residual):
    _inductor_fallbacks()
    _checks.check_add_relu(x, residual)
    return torch.empty_like(x, memory_format=memory_format(x))


def _add_relu_setup(ctx, inputs, output):
    _record_forward(ctx, inputs)
    ctx.save_for_backward(output)


def _add_relu_backward(ctx, grad):
    (out,) = ctx.saved_tensors
    dz = torch.ops.aten.threshold_backward(grad, out, 0)
    return (dz if ctx.req[0] else None), (dz if ctx.req[1] else None)


_register_autograd(add_relu, _add_relu_backward, _add_relu_setup)


# ---------------------------------------------------------------- max_pool_relu
@torch.library.custom_op("fastres::max_pool_relu", mutates_args=(), schema=_SCHEMAS["max_pool_relu"])
def max_pool_relu(x, kernel_size, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False, relu=True):
    kernel_size, stride, padding, dilation, _ = _checks.check_max_pool_relu(x, kernel_size, stride, padding,
                                                                            dilation, ceil_mode, relu)
    return _backend.select("max_pool_relu", x.device).max_pool_relu(x, kernel_size, stride, padding, dilation,
                                                                    ceil_mode, relu)


@max_pool_relu.register_fake
def _(x, kernel_size, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False, relu=True):
    _inductor_fallbacks()
    *_, out_shape = _checks.check_max_pool_relu(x, kernel_size, stride, padding, dilation, ceil_mode, relu)
    return _empty(out_shape, x, backend_torch.suggest_memory_format(x))


def _max_pool_relu_setup(ctx, inputs, output):
    _record_forward(ctx, inputs)
    x, *geometry = inputs
    ctx.geometry = geometry
    ctx.save_for_backward(x, output)


def _max_pool_relu_backward(ctx, grad):
    x, out = ctx.saved_tensors
    kernel_size, stride, padding, dilation, ceil_mode, relu = ctx.geometry
    if relu:
        grad = torch.ops.aten.threshold_backward(grad, out, 0)
    # The argmax the forward did not keep: ATen's, whose ties and NaN rules the forward's maximum follows.
    _, indices = torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)
    grad_x = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, kernel_size, stride, padding, dilation,
                                                             ceil_mode, indices)
    return grad_x, None, None, None, None, None, None


_register_autograd(max_pool_relu, _max_pool_relu_backward, _max_pool_relu_setup)


# ---------------------------------------------------------------- conv_bias_act
@torch.library.custom_op("fastres::conv_bias_act", mutates_args=(), schema=_SCHEMAS["conv_bias_act"])
def conv_bias_act(x, weight, bias=None, stride=(1, 1), padding=(0, 0), residual=None, relu=True, dilation=(1, 1),
                  groups=1):
    stride, padding, dilation, _ = _checks.check_conv("conv_bias_act", x, weight, bias, stride, padding, residual,
                                                      dilation, groups)
    return _backend.select("conv_bias_act", x.device).conv_bias_act(x, weight, bias, stride, padding, residual, relu,
                                                                    dilation, groups)


@conv_bias_act.register_fake
def _(x, weight, bias=None, stride=(1, 1), padding=(0, 0), residual=None, relu=True, dilation=(1, 1), groups=1):
    _inductor_fallbacks()
    *_, out_shape = _checks.check_conv("conv_bias_act", x, weight, bias, stride, padding, residual, dilation,
                                       groups)
    return _empty(out_shape, x, memory_format(x))


def _conv_bias_act_setup(ctx, inputs, output):
    _record_forward(ctx, inputs)
    x, weight, bias, stride, padding, residual, relu, dilation, groups = inputs
    ctx.conv = _conv_geometry(stride, padding, dilation, groups)
    ctx.has_bias = bias is not None
    ctx.relu = relu
    ctx.save_for_backward(x, weight, output if relu else None)


def _conv_geometry(stride, padding, dilation, groups):
    """(stride, padding, dilation, groups) as lists and an int: F.conv2d's trailing arguments, in its order."""
    return list(stride), list(padding), list(dilation), int(groups)


def _conv_backward(ctx, dz, x, weight, bias_grad):
    """Input, weight (and bias) gradients of the conv, from the gradient of its output (None where not needed)."""
    stride, padding, dilation, groups = ctx.conv
    mask = [ctx.req[0], ctx.req[1], bias_grad]
    if not any(mask):
        return None, None, None
    if _create_graph.recording():  # double backward: aten's convolution_backward has derivatives, the kernels not
        return backend_torch.conv_backward(dz, x, weight, stride, padding, mask, dilation, groups)
    grads = torch.ops.fastres.conv_backward(dz, x, weight, stride, padding, mask, dilation, groups)
    return tuple(g if m else None for g, m in zip(grads, mask))


def _conv_bias_act_backward(ctx, grad):
    x, weight, out = ctx.saved_tensors
    dz = torch.ops.aten.threshold_backward(grad, out, 0) if ctx.relu else grad
    dz = dz.contiguous(memory_format=memory_format(x))
    gx, gw, gb = _conv_backward(ctx, dz, x, weight, ctx.has_bias and ctx.req[2])
    return gx, gw, gb, None, None, (dz if ctx.req[5] else None), None, None, None


_register_autograd(conv_bias_act, _conv_bias_act_backward, _conv_bias_act_setup)


# ---------------------------------------------------------------- conv_bn_act
def _check_conv_bn(x, weight, bn_weight, bn_bias, running_mean, running_var, training, stride, padding, residual,
                   dilation, groups):
    stride, padding, dilation, out_shape = _checks.check_conv("conv_bn_act", x, weight, None, stride, padding,
                                                              residual, dilation, groups)
    _checks.check_channel_params("conv_bn_act", weight.shape[0], x.device, bn_weight=bn_weight, bn_bias=bn_bias,
                                 running_mean=running_mean, running_var=running_var)
    if training:
        _checks.check_batch_for_training(out_shape)
    return stride, padding, dilation, out_shape


@torch.library.custom_op("fastres::conv_bn_act_forward", mutates_args=(),
                         schema=_SCHEMAS["conv_bn_act_forward"])
def conv_bn_act_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum=0.1, eps=1e-5,
                        stride=(1, 1), padding=(0, 0), residual=None, relu=True, dilation=(1, 1), groups=1):
    stride, padding, dilation, _ = _check_conv_bn(x, weight, bn_weight, bn_bias, running_mean, running_var, training,
                                                  stride, padding, residual, dilation, groups)
    return _backend.select("conv_bn_act_forward", x.device).conv_bn_act_forward(
        x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride, padding, residual,
        relu, dilation, groups)


@conv_bn_act_forward.register_fake
def _(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum=0.1, eps=1e-5, stride=(1, 1),
      padding=(0, 0), residual=None, relu=True, dilation=(1, 1), groups=1):
    _inductor_fallbacks()
    *_, out_shape = _check_conv_bn(x, weight, bn_weight, bn_bias, running_mean, running_var, training, stride,
                                   padding, residual, dilation, groups)
    fmt = memory_format(x)
    acc = _stat_dtype(x)
    stats = (weight.shape[0],)
    running = (weight.shape[0] if training else 0,)
    return (_empty(out_shape, x, fmt), _empty(out_shape, x, fmt), x.new_empty(stats, dtype=acc),
            x.new_empty(stats, dtype=acc), running_mean.new_empty(running), running_var.new_empty(running))


def _conv_bn_act_setup(ctx, inputs, output):
    _record_forward(ctx, inputs)
    x, weight, bn_weight, _, _, _, training, _, _, stride, padding, residual, relu, dilation, groups = inputs
    out, conv_out, save_mean, save_invstd, new_running_mean, new_running_var = output
    ctx.mark_non_differentiable(conv_out, save_mean, save_invstd, new_running_mean, new_running_var)
    ctx.conv = _conv_geometry(stride, padding, dilation, groups)
    ctx.training, ctx.relu, ctx.has_residual = training, relu, residual is not None
    ctx.eps = inputs[8]
    ctx.save_for_backward(x, weight, bn_weight, out, conv_out, save_mean, save_invstd)


def _conv_bn_act_backward_create_graph(ctx, grad_out):
    """_conv_bn_act_backward as a differentiable graph (create_graph=True): conv_out and the batch statistics are
    saved without one, so bn(conv(x)) is recomputed from x, weight and bn_weight."""
    x, weight, bn_weight, out, _, save_mean, save_invstd = ctx.saved_tensors
    dz = torch.ops.aten.threshold_backward(grad_out, out, 0) if ctx.relu else grad_out

    def normalized(x, weight, bn_weight):  # without the shift, whose gradient is dz's sum
        y = F.conv2d(x, weight, None, *ctx.conv)
        return _create_graph.batch_norm(y, bn_weight, None, ctx.training, ctx.eps, save_mean, save_invstd)

    gx, gw, g_gamma = _create_graph.vjp(normalized, (x, weight, bn_weight), ctx.req[:3], dz)
    g_beta = dz.sum((0, 2, 3)).to(bn_weight.dtype) if ctx.req[3] else None
    return (gx, gw, None if g_gamma is None else g_gamma.to(bn_weight.dtype), g_beta,
            None, None, None, None, None, None, None, dz if ctx.has_residual and ctx.req[11] else None, None, None,
            None)


def _conv_bn_act_backward(ctx, grad_out, *_grads_of_saved_outputs):
    if _create_graph.recording():
        return _conv_bn_act_backward_create_graph(ctx, grad_out)
    x, weight, bn_weight, out, conv_out, save_mean, save_invstd = ctx.saved_tensors
    need_residual = ctx.has_residual and ctx.req[11]
    grad_conv_out, grad_residual, grad_bn_weight, grad_bn_bias = torch.ops.fastres.bn_act_backward(
        grad_out, out, conv_out, save_mean, save_invstd, bn_weight, ctx.relu, ctx.training, need_residual)
    grad_residual = grad_residual if need_residual else None
    gx, gw, _ = _conv_backward(ctx, grad_conv_out, x, weight, False)
    return (gx, gw,
            grad_bn_weight.to(bn_weight.dtype) if ctx.req[2] else None,
            grad_bn_bias.to(bn_weight.dtype) if ctx.req[3] else None,
            None, None, None, None, None, None, None, grad_residual, None, None, None)


_register_autograd(conv_bn_act_forward, _conv_bn_act_backward, _conv_bn_act_setup)

# The public conv_bn_act returns only the activation and updates the running statistics in place; it decomposes
# into the functional conv_bn_act_forward, which carries the autograd formula, and a copy_ of the new statistics
# (as aten's batch_norm decomposes into _native_batch_norm_legit_functional and copies).
_lib = torch.library.Library("fastres", "FRAGMENT")
_lib.define("conv_bn_act(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, Tensor(a!) running_mean, "
            "Tensor(b!) running_var, bool training, float momentum=0.1, float eps=1e-05, int[2] stride=1, "
            "int[2] padding=0, Tensor? residual=None, bool relu=True, int[2] dilation=[1, 1], int groups=1) "
            "-> Tensor")


def _conv_bn_act_composite(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum=0.1,
                           eps=1e-5, stride=(1, 1), padding=(0, 0), residual=None, relu=True, dilation=(1, 1),
                           groups=1):
    out, _, _, _, new_running_mean, new_running_var = torch.ops.fastres.conv_bn_act_forward(
        x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, stride, padding, residual,
        relu, dilation, groups)
    if training:
        with torch.no_grad():
            running_mean.copy_(new_running_mean)
            running_var.copy_(new_running_var)
    return out


_lib.impl("conv_bn_act", _conv_bn_act_composite, "CompositeImplicitAutograd")


# ---------------------------------------------------------------- dual_bn_act
def _check_dual_bn(y, bn_weight, bn_bias, running_mean, running_var, r, r_bn_weight, r_bn_bias, r_running_mean,
                   r_running_var, training):
    op = "dual_bn_act"
    _checks._tensor(op, "y", y, ndim=4)
    _checks._tensor(op, "r", r, ndim=4)
    _checks._same_device(op, "y", y, "r", r)
    _checks._same_dtype(op, "y", y, "r", r)
    if r.shape != y.shape:
        raise ValueError(f"fastres.{op}: r has shape {tuple(r.shape)} but y has shape {tuple(y.shape)}")
    _checks.check_channel_params(op, y.shape[1], y.device, bn_weight=bn_weight, bn_bias=bn_bias,
                                 running_mean=running_mean, running_var=running_var, r_bn_weight=r_bn_weight,
                                 r_bn_bias=r_bn_bias, r_running_mean=r_running_mean, r_running_var=r_running_var)
    if training:
        _checks.check_batch_for_training(tuple(y.shape))


@torch.library.custom_op("fastres::dual_bn_act_forward", mutates_args=(), schema=_SCHEMAS["dual_bn_act_forward"])
def dual_bn_act_forward(y, bn_weight, bn_bias, running_mean, running_var, r, r_bn_weight, r_bn_bias, r_running_mean,
                        r_running_var, training, momentum=0.1, eps=1e-5, r_momentum=0.1, r_eps=1e-5, relu=True):
    _check_dual_bn(y, bn_weight, bn_bias, running_mean, running_var, r, r_bn_weight, r_bn_bias, r_running_mean,
                   r_running_var, training)
    return _backend.select("dual_bn_act_forward", y.device).dual_bn_act_forward(
        y, bn_weight, bn_bias, running_mean, running_var, r, r_bn_weight, r_bn_bias, r_running_mean, r_running_var,
        training, momentum, eps, r_momentum, r_eps, relu)


@dual_bn_act_forward.register_fake
def _(y, bn_weight, bn_bias, running_mean, running_var, r, r_bn_weight, r_bn_bias, r_running_mean, r_running_var,
      training, momentum=0.1, eps=1e-5, r_momentum=0.1, r_eps=1e-5, relu=True):
    _check_dual_bn(y, bn_weight, bn_bias, running_mean, running_var, r, r_bn_weight, r_bn_bias, r_running_mean,
                   r_running_var, training)
    acc = _stat_dtype(y)
    stats = [y.new_empty((y.shape[1],), dtype=acc) for _ in range(4)]
    running = (y.shape[1] if training else 0,)
    relu_mask = y.new_empty(backend_torch.relu_mask_shape(y) if relu else (0,), dtype=torch.uint8)
    return (_empty(y.shape, y, memory_format(y)), relu_mask, *stats, running_mean.new_empty(running),
            running_var.new_empty(running), r_running_mean.new_empty(running), r_running_var.new_empty(running))


def _dual_bn_act_setup(ctx, inputs, output):
    _record_forward(ctx, inputs)
    y, bn_weight, _, _, _, r, r_bn_weight = inputs[:7]
    training, relu = inputs[10], inputs[15]
    relu_mask, mean, invstd, r_mean, r_invstd = output[1:6]
    ctx.mark_non_differentiable(*output[1:])
    ctx.training, ctx.relu = training, relu
    ctx.eps, ctx.r_eps = inputs[12], inputs[14]
    # The ReLU's mask (1 bit per element), not its output: backward reads 1/16 to 1/32 of the bytes.
    ctx.save_for_backward(y, r, bn_weight, r_bn_weight, relu_mask, mean, invstd, r_mean, r_invstd,
                          inputs[2], inputs[7])  # (the BN shifts, for double backward only)


def _dual_bn_act_backward_create_graph(ctx, grad_out):
    """_dual_bn_act_backward as a differentiable graph (create_graph=True): the output recomputed from y and r,
    the batch statistics and the ReLU with it."""
    y, r, bn_weight, r_bn_weight, _, mean, invstd, r_mean, r_invstd, bn_bias, r_bn_bias = ctx.saved_tensors
    grads = _create_graph.vjp(
        lambda *a: _create_graph.bn_add_relu(*a[:3], *a[3:], eps=ctx.eps, eps_d=ctx.r_eps, relu=ctx.relu,
                                             training=ctx.training, stats=(mean, invstd), stats_d=(r_mean, r_invstd)),
        (y, bn_weight, bn_bias, r, r_bn_weight, r_bn_bias), [ctx.req[i] for i in (0, 1, 2, 5, 6, 7)], grad_out)
    return (*grads[:3], None, None, *grads[3:], None, None, None, None, None, None, None, None)


def _dual_bn_act_backward(ctx, grad_out, *_grads_of_saved_outputs):
    if _create_graph.recording():
        return _dual_bn_act_backward_create_graph(ctx, grad_out)
    y, r, bn_weight, r_bn_weight, relu_mask, mean, invstd, r_mean, r_invstd = ctx.saved_tensors[:9]
    grad_y, grad_r, gw, gb, grw, grb = torch.ops.fastres.dual_bn_act_backward(
        grad_out, relu_mask, y, mean, invstd, bn_weight, r, r_mean, r_invstd, r_bn_weight, ctx.relu, ctx.training,
        ctx.req[5])
    req = ctx.req
    return (grad_y if req[0] else None, gw.to(bn_weight.dtype) if req[1] else None,
            gb.to(bn_weight.dtype) if req[2] else None, None, None, grad_r if req[5] else None,
            grw.to(r_bn_weight.dtype) if req[6] else None, grb.to(r_bn_weight.dtype) if req[7] else None,
            None, None, None, None, None, None, None, None)


_register_autograd(dual_bn_act_forward, _dual_bn_act_backward, _dual_bn_act_setup)

# The public dual_bn_act: the same decomposition as conv_bn_act's,, updating both BNs' running statistics in place.
_lib.define("dual_bn_act(Tensor y, Tensor bn_weight, Tensor bn_bias, Tensor(a!) running_mean, "
            "Tensor(b!) running_var, Tensor r, Tensor r_bn_weight, Tensor r_bn_bias, Tensor(c!) r_running_mean, "
            "Tensor(d!) r_running_var, bool training, float momentum=0.1, float eps=1e-05, float r_momentum=0.1, "
            "float r_eps=1e-05, bool relu=True) -> Tensor")


def _dual_bn_act_composite(y, bn_weight, bn_bias, running_mean, running_var, r, r_bn_weight, r_bn_bias,
                           r_running_mean, r_running_var, training, momentum=0.1, eps=1e-5, r_momentum=0.1,
                           r_eps=1e-5, relu=True):
    out, _, _, _, _, _, new_rm, new_rv, r_new_rm, r_new_rv = torch.ops.fastres.dual_bn_act_forward(
        y, bn_weight, bn_bias, running_mean, running_var, r, r_bn_weight, r_bn_bias, r_running_mean, r_running_var,
        training, momentum, eps, r_momentum, r_eps, relu)
    if training:
        with torch.no_grad():
            running_mean.copy_(new_rm)
            running_var.copy_(new_rv)
            r_running_mean.copy_(r_new_rm)
            r_running_var.copy_(r_new_rv)
    return out


_lib.impl("dual_bn_act", _dual_bn_act_composite, "CompositeImplicitAutograd")


# ---------------------------------------------------------------- bn_relu_conv
def _check_bn_relu_conv(x, scale, shift, weight, stride, padding, dilation, groups):
    stride, padding, dilation, out_shape = _checks.check_conv("bn_relu_conv", x, weight, None, stride, padding, None,
                                                              dilation, groups)
    _checks.check_channel_params("bn_relu_conv", x.shape[1], x.device, scale=scale, shift=shift)
    return stride, padding, dilation, out_shape


@torch.library.custom_op("fastres::bn_relu_conv", mutates_args=(), schema=_SCHEMAS["bn_relu_conv"])
def bn_relu_conv(x, scale, shift, weight, stride=(1, 1), padding=(0, 0), relu=True, dilation=(1, 1), groups=1):
    stride, padding, dilation, _ = _check_bn_relu_conv(x, scale, shift, weight, stride, padding, dilation, groups)
    return _backend.select("bn_relu_conv", x.device).bn_relu_conv(x, scale, shift, weight, stride, padding, relu,
                                                                  dilation, groups)


@bn_relu_conv.register_fake
def _(x, scale, shift, weight, stride=(1, 1), padding=(0, 0), relu=True, dilation=(1, 1), groups=1):
    _inductor_fallbacks()
    *_, out_shape = _check_bn_relu_conv(x, scale, shift, weight, stride, padding, dilation, groups)
    return _empty(out_shape, x, memory_format(x))


def _bn_relu_conv_setup(ctx, inputs, output):
    _record_forward(ctx, inputs)
    x, scale, shift, weight, stride, padding, relu, dilation, groups = inputs
    ctx.conv = _conv_geometry(stride, padding, dilation, groups)
    ctx.relu = relu
    ctx.save_for_backward(x, scale, shift, weight)


def _bn_relu_conv_backward(ctx, grad):
    x, scale, shift, weight = ctx.saved_tensors
    grad = grad.contiguous(memory_format=memory_format(x))
    mask = list(ctx.req[:4])
    stride, padding, dilation, groups = ctx.conv
    args = (grad, x, scale, shift, weight, stride, padding, ctx.relu, mask, dilation, groups)
    if _create_graph.recording():  # double backward: the reference recomputes relu(x * scale + shift) from x
        grads = backend_torch.bn_relu_conv_backward(*args)
    else:
        grads = torch.ops.fastres.bn_relu_conv_backward(*args)
    return (*(g if m else None for g, m in zip(grads, mask)), None, None, None, None, None)


_register_autograd(bn_relu_conv, _bn_relu_conv_backward, _bn_relu_conv_setup)


# ---------------------------------------------------------------- backward ops
def _or_empty(t, like):
    return like.new_empty(0) if t is None else t


@torch.library.custom_op("fastres::conv_backward", mutates_args=(), schema=_SCHEMAS["conv_backward"])
def conv_backward(grad, x, weight, stride, padding, output_mask, dilation=(1, 1), groups=1):
    gx, gw, gb = _backend.select("conv_backward", x.device).conv_backward(
        grad, x, weight, list(stride), list(padding), list(output_mask), list(dilation), groups)
    # Gradients are laid out like what they are gradients of (backends' convolutions may pick otherwise); the
    # weight's with its exact strides (see like_param).
    gx = None if gx is None else gx.contiguous(memory_format=memory_format(x))
    gw = None if gw is None else like_param(gw, weight)
    return _or_empty(gx, x), _or_empty(gw, x), _or_empty(gb, x)


@conv_backward.register_fake
def _(grad, x, weight, stride, padding, output_mask, dilation=(1, 1), groups=1):
    return (torch.empty_like(x, memory_format=memory_format(x)) if output_mask[0] else x.new_empty(0),
            torch.empty_like(weight) if output_mask[1] else x.new_empty(0),
            weight.new_empty((weight.shape[0],)) if output_mask[2] else x.new_empty(0))


@torch.library.custom_op("fastres::bn_act_backward", mutates_args=(), schema=_SCHEMAS["bn_act_backward"])
def bn_act_backward(grad_out, out, conv_out, save_mean, save_invstd, bn_weight, relu, training, residual_grad):
    grads = _backend.select("bn_act_backward", conv_out.device).bn_act_backward(
        grad_out, out, conv_out, save_mean, save_invstd, bn_weight, relu, training, residual_grad)
    return tuple(_or_empty(g, conv_out) for g in grads)


@bn_act_backward.register_fake
def _(grad_out, out, conv_out, save_mean, save_invstd, bn_weight, relu, training, residual_grad):
    fmt = memory_format(conv_out)
    return (torch.empty_like(conv_out, memory_format=fmt),
            torch.empty_like(conv_out, memory_format=fmt) if residual_grad else conv_out.new_empty(0),
            torch.empty_like(save_mean), torch.empty_like(save_mean))


@torch.library.custom_op("fastres::bn_relu_conv_backward", mutates_args=(),
                         schema=_SCHEMAS["bn_relu_conv_backward"])
def bn_relu_conv_backward(grad, x, scale, shift, weight, stride, padding, relu, output_mask, dilation=(1, 1),
                          groups=1):
    gx, gscale, gshift, gw = _backend.select("bn_relu_conv_backward", x.device).bn_relu_conv_backward(
        grad, x, scale, shift, weight, list(stride), list(padding), relu, list(output_mask), list(dilation), groups)
    gx = None if gx is None else gx.contiguous(memory_format=memory_format(x))
    gw = None if gw is None else like_param(gw, weight)
    return tuple(_or_empty(g, x) for g in (gx, gscale, gshift, gw))


@bn_relu_conv_backward.register_fake
def _(grad, x, scale, shift, weight, stride, padding, relu, output_mask, dilation=(1, 1), groups=1):
    likes = (torch.empty_like(x, memory_format=memory_format(x)), torch.empty_like(scale), torch.empty_like(shift),
             torch.empty_like(weight))
    return tuple(t if m else x.new_empty(0) for t, m in zip(likes, output_mask))


@torch.library.custom_op("fastres::dual_bn_act_backward", mutates_args=(), schema=_SCHEMAS["dual_bn_act_backward"])
def dual_bn_act_backward(grad_out, relu_mask, y, save_mean, save_invstd, bn_weight, r, r_save_mean, r_save_invstd,
                         r_bn_weight, relu, training, r_grad):
    fmt = memory_format(y)
    grad_y, grad_r, *rest = _backend.select("dual_bn_act_backward", y.device).dual_bn_act_backward(
        grad_out.contiguous(memory_format=fmt), relu_mask, y, save_mean, save_invstd, bn_weight, r, r_save_mean,
        r_save_invstd, r_bn_weight, relu, training, r_grad)
    # Gradients are laid out like what they are gradients of.
    grad_y = grad_y.contiguous(memory_format=fmt)
    grad_r = None if grad_r is None else grad_r.contiguous(memory_format=memory_format(r))
    return tuple(_or_empty(g, y) for g in (grad_y, grad_r, *rest))


@dual_bn_act_backward.register_fake
def _(grad_out, relu_mask, y, save_mean, save_invstd, bn_weight, r, r_save_mean, r_save_invstd, r_bn_weight, relu,
      training, r_grad):
    return (torch.empty_like(y, memory_format=memory_format(y)),
            torch.empty_like(r, memory_format=memory_format(r)) if r_grad else y.new_empty(0),
            torch.empty_like(save_mean), torch.empty_like(save_mean), torch.empty_like(r_save_mean),
            torch.empty_like(r_save_mean))


# ---------------------------------------------------------------- autocast
# Under autocast the conv operands run in the autocast dtype, like aten's conv; BN parameters and running
# statistics stay as they are (casting running_mean would make the in-place update land on a copy).
_AUTOCAST_ARGS = {"conv_bias_act": (0, 1, 2, 5), "conv_bn_act_forward": (0, 1, 11), "bn_relu_conv": (0, 3)}


def _register_autocast(name, cast_positions, device_type):
    op = getattr(torch.ops.fastres, name).default
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)

    def autocast_impl(*args):
        dtype = torch.get_autocast_dtype(device_type)
        args = list(args)
        for i in cast_positions:
            if i >= len(args):  # the dispatcher drops trailing arguments left at their defaults
                break
            a = args[i]
            if isinstance(a, torch.Tensor) and a.dtype == torch.float32 and a.device.type == device_type:
                args[i] = a.to(dtype)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*args)

    if op.has_kernel_for_dispatch_key(key):
        op.py_kernels.pop(key, None)
    op.py_impl(key)(autocast_impl)
    _lib.impl(name, lambda _keyset, *args: autocast_impl(*args), key_name, with_keyset=True)


for _name, _positions in _AUTOCAST_ARGS.items():
    for _device_type in ("cpu", "cuda"):
        _register_autocast(_name, _positions, _device_type)
