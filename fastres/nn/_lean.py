"""Memory-lean training of a chain of conv + BatchNorm (+ residual) + ReLU units, and the SyncBatchNorm math.

What autograd keeps for backward in a training step decides how large a batch fits. For a Bottleneck, torchvision
(and a chain of per-unit conv_bn_act ops) keeps every conv's raw output y_i and every normalized activation a_i:

    x, y1, a1 = relu(bn1(y1)), y2, a2, y3, out             (+ yd, the projection shortcut's raw conv output)

The lean chain keeps only the raw conv outputs (in the activation dtype) and per-channel statistics:

    x, y1, y2, y3, out                                      (+ yd)

Each conv after the first consumes the previous raw output through fastres.ops.bn_relu_conv (the previous BN's
apply + ReLU as the conv's prologue) wrapped in _BnReluConv, whose backward recomputes relu(bn(y)) from y and the
saved statistics instead of keeping it; the last unit's BN + residual (+ the projection shortcut's BN) + ReLU is
_BnAddRelu, which keeps y, yd and its output (the ReLU mask, and the next block's input, which that block's first
conv keeps anyway). x is the previous block's output. Per block that is 10 of torchvision's 12 activation-sized
units for a Bottleneck (y1 + y2 + y3 + out = W + W + 4W + 4W against W + W + W + W + 4W + 4W) and 3 of 4 for a
BasicBlock; over ResNet-50 (whose stem and classifier keep what torchvision keeps) 0.85x torchvision's bytes.

Below that a conv has to run twice. The default memory mode, "recompute", makes a Bottleneck's last 1x1 conv
(and its projection) _RecomputedTail: y3 and yd are recomputed in backward from y2 (and x), so a block keeps

    x, y1, y2, out                                          (6 of 12 units; ResNet-50: 0.52x)

for conv3 and the projection (about a quarter of a Bottleneck's multiply-adds) running once more in backward:
some 8% more conv work per training step (forward + backward is about three forwards); measured on CPU (ResNet-50,
fp32, batch 8) a step takes 1-8% longer than in "lean" mode, which set_memory_mode(model, "lean") selects.
BasicBlocks (3x3 last conv: rerunning it would cost half the block) always train "lean".

The batch statistics are computed once in forward (fastres._C's statistics kernel, torch.var_mean in fp32 where a
forced backend or a missing kernel rules it out, or merged over a process group by fastres.nn.sync_bn in one
collective). A projection shortcut's BN, the residual add and the ReLU are one pass of fastres._C's dual apply,
which keeps the ReLU's 1-bit mask instead of the output for its one backward kernel. Backward uses the
training-mode BatchNorm formula (through the mean and the variance), in one collective per BN layer when
synchronized. Nothing here writes into an input or a saved tensor.
"""
import torch
import torch.nn.functional as F
from torch import nn

from fastres import ops
from fastres.ops import _backend, _compiled, _create_graph, backend_torch
from fastres.ops._checks import like_param, memory_format
from fastres.nn import _collectives
from fastres.nn._fused import _affine, _bn_momentum, folded_conv_params, functorch_active, has_hooks, \
    is_plain_relu, norm_after_conv, norm_kind, prepacked_conv_norm_act, unit_fusable


def _acc(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _channel_view(t, like):
    return t.view((1, -1) + (1,) * (like.dim() - 2))


def _reduce_dims(t):
    return [0] + list(range(2, t.dim()))


def _backend_name(op, device):
    return _backend.select(op, device).__name__.rpartition(".")[2]


def _autocast_dtype(device_type):
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _autocast(t, device_type):
    """t in the autocast dtype when autocast is on and t is fp32 (what autocast does to a conv's operands)."""
    dtype = _autocast_dtype(device_type)
    if dtype is not None and t.dtype == torch.float32:
        return t.to(dtype)
    return t


def _no_autocast(device_type):
    """Backward math runs in the dtypes it is given, whatever autocast state the caller of .backward() has."""
    return torch.autocast(device_type, enabled=False)


# ---------------------------------------------------------------------------------------------- statistics
def batch_stats(y, norm, group=None):
    """(mean, invstd, count) per channel of y over all dims but 1 (across `group` when given), in fp32 (fp64 for
    fp64); count is None locally, else the group's total as a tensor. Updates norm's running statistics and
    num_batches_tracked exactly where _BatchNorm.forward would (biased variance normalizes, unbiased goes into
    running_var)."""
    acc = _acc(y)
    n = y.numel() // y.shape[1]
    if group is None and n <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {y.shape}")
    if group is None and y.dim() == 4 and _compiled_bn(y.device):
        # fastres._C's statistics kernel: one read of y (Chan merge, fp32 accumulation, no fp32 copy of a bf16
        # y), the running statistics finalized on the device without a host synchronization.
        with torch.no_grad():
            if _tracks_running_stats(norm):
                rm, rv = norm.running_mean, norm.running_var
                mean, invstd, _, _, new_rm, new_rv = torch.ops.fastres._bn_stats(
                    y, None, None, rm, rv, _bn_momentum(norm), norm.eps)
                rm.copy_(new_rm)
                rv.copy_(new_rv)
            else:
                mean, invstd = torch.ops.fastres._bn_stats(y, None, None, None, None, 0.0, norm.eps)[:2]
        return mean, invstd, None
    with torch.no_grad():
        if n > 0:
            var, mean = torch.var_mean(y.to(acc), dim=_reduce_dims(y), correction=0)
        else:
            mean = var = torch.zeros(y.shape[1], dtype=acc, device=y.device)
        count = None
        if group is not None:
            mean, var, count = _collectives.gather_stats(mean, var, n, group)
        invstd = torch.rsqrt(var + norm.eps)
        if _tracks_running_stats(norm):
            momentum = _bn_momentum(norm)
            if count is None:
                unbiased = var * (n / (n - 1))
            else:
                unbiased = var * (count / (count - 1).clamp_min(1))
            rm, rv = norm.running_mean, norm.running_var
            rm.copy_(mean.to(rm.dtype) * momentum + rm * (1 - momentum))
            rv.copy_(unbiased.to(rv.dtype) * momentum + rv * (1 - momentum))
    return mean, invstd, count


def _tracks_running_stats(norm):
    return (norm.training and norm.track_running_stats and norm.running_mean is not None
            and norm.running_var is not None)


def _compiled_bn(device):
    """Whether the BN statistics and apply run on fastres._C's kernels: the auto or the "cuda" backend, with the
    kernels built for this device (a forced "torch" or "triton" backend keeps its own math)."""
    return _backend.forced_backend() in (None, "cuda") and _compiled.has_kernel("_bn_stats", device.type)


def _coefficients(gamma, beta, mean, invstd):
    scale = gamma.to(mean.dtype) * invstd
    return scale, beta.to(mean.dtype) - mean * scale


# ---------------------------------------------------------------------------------------------- elementwise passes
def _prologue(y, scale, shift):
    """relu(y * scale + shift) in y's dtype, computed exactly as the backend running ops.bn_relu_conv computes its
    prologue (so that backward's recomputation is the forward's activation)."""
    name = _backend_name("bn_relu_conv", y.device)
    if name == "backend_cuda":
        return torch.ops.fastres._bn_act_forward(y, scale, shift, None, True)
    if name == "backend_triton" and y.dtype != torch.float64:
        from fastres.kernels import bn
        return bn.bn_act(y, scale, shift, None, True)
    z = y.to(scale.dtype) * _channel_view(scale, y) + _channel_view(shift, y)
    return torch.relu(z).to(y.dtype).contiguous(memory_format=memory_format(y))


def _bn_apply(y, mean, invstd, gamma, beta, residual, relu):
    """relu?(bn(y) + residual) with the given statistics, in y's dtype and memory format."""
    fmt = memory_format(y)
    if residual is not None:
        residual = residual.contiguous(memory_format=fmt)
    scale, shift = _coefficients(gamma, beta, mean, invstd)
    if y.dim() == 4:
        name = _backend_name("conv_bn_act_forward", y.device)
        if name == "backend_cuda":
            return torch.ops.fastres._bn_act_forward(y, scale, shift, residual, relu)
        if name == "backend_triton" and y.dtype != torch.float64:
            from fastres.kernels import bn
            return bn.bn_act(y, scale, beta.to(scale.dtype), residual, relu, center=mean)
    acc = scale.dtype
    z = (y.to(acc) - _channel_view(mean, y)) * _channel_view(scale, y) + _channel_view(beta.to(acc), y)
    if residual is not None:
        z = z + residual.to(acc)
    if relu:
        z = torch.relu(z)
    return z.to(y.dtype).contiguous(memory_format=fmt)


def _dual_applies(y, group, group_d):
    """Whether relu?(bn(y) + bn_d(yd)) runs as fastres._C's dual apply: both BNs local, a 4-D y, the kernels
    selected and built for y's device."""
    return group is None and group_d is None and y.dim() == 4 and _compiled_bn(y.device)


def _dual_apply(y, gamma, beta, mean, invstd, yd, gamma_d, beta_d, mean_d, invstd_d, relu):
    """(out, y, yd, mask): both BNs, the add and the ReLU in one pass of the dual apply, which also writes the
    ReLU's 1-bit mask (empty without relu); y and yd as the kernel read them (in y's memory format), for backward."""
    fmt = memory_format(y)
    y, yd = y.contiguous(memory_format=fmt), yd.contiguous(memory_format=fmt)
    scale, shift = _coefficients(gamma, beta, mean, invstd)
    scale_d, shift_d = _coefficients(gamma_d, beta_d, mean_d, invstd_d)
    out, mask = torch.ops.fastres._bn_apply(y, scale, shift, yd, scale_d, shift_d, relu, relu)
    return out, y, yd, mask


def _dual_backward(grad, mask, relu, y, mean, invstd, gamma, yd, mean_d, invstd_d, gamma_d, need_yd):
    """Backward of _dual_apply in one kernel -> (grad_y, grad_yd, grad_gamma, grad_beta, grad_gamma_d,
    grad_beta_d)."""
    grad = grad.contiguous(memory_format=memory_format(y))
    return torch.ops.fastres._bn_apply_backward(grad, None, mask if relu else None, y, mean, invstd,
                                                gamma.to(mean.dtype), yd, mean_d, invstd_d, gamma_d.to(mean.dtype),
                                                relu, True, need_yd)


def _bn_backward(grad_out, out, y, mean, invstd, gamma, relu, count, group, residual_grad):
    """Backward of out = relu?(bn(y) + residual) with batch statistics -> (grad_y, grad_residual or None,
    grad_gamma, grad_beta); the last two are this process's sums (DistributedDataParallel averages them like
    every other parameter gradient). Over a group, sum(dz) and sum(dz * xhat) are all-reduced in one collective."""
    if group is None and y.dim() == 4:
        backend = _backend.select("bn_act_backward", y.device)
        return backend.bn_act_backward(grad_out, out if relu else grad_out, y, mean, invstd, gamma, relu, True,
                                       residual_grad)
    acc = mean.dtype
    dims = _reduce_dims(y)
    dz = grad_out.to(acc)
    if relu:
        dz = torch.ops.aten.threshold_backward(dz, out, 0)  # relu's own backward: a NaN output passes
    xhat = (y.to(acc) - _channel_view(mean, y)) * _channel_view(invstd, y)
    sums = torch.stack([dz.sum(dims), (dz * xhat).sum(dims)])
    grad_beta, grad_gamma = sums[0].clone(), sums[1].clone()
    if group is not None:
        _collectives.all_reduce_sums(sums, group)
        total = count[0]
    else:
        total = y.numel() // y.shape[1]
    mean_dz, mean_dz_xhat = (sums / total).unbind(0)
    k = gamma.to(acc) * invstd
    grad_y = _channel_view(k, y) * (dz - _channel_view(mean_dz, y) - xhat * _channel_view(mean_dz_xhat, y))
    fmt = memory_format(y)
    grad_y = grad_y.to(y.dtype).contiguous(memory_format=fmt)
    grad_residual = dz.to(grad_out.dtype).contiguous(memory_format=fmt) if residual_grad else None
    return grad_y, grad_residual, grad_gamma, grad_beta


def _geometry(conv):
    """A Conv2d's (stride, padding, dilation, groups): F.conv2d's trailing arguments, in its order."""
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups


def _conv_op(x, weight, geometry):
    """The bare conv (no bias, no ReLU) of the given geometry, through fastres.ops."""
    stride, padding, dilation, groups = geometry
    return ops.conv_bias_act(x, weight, None, stride, padding, None, False, dilation, groups)


def _bn_relu_conv_op(y, scale, shift, weight, geometry):
    stride, padding, dilation, groups = geometry
    return ops.bn_relu_conv(y, scale, shift, weight, stride, padding, True, dilation, groups)


def _conv_grads(grad, x, weight, stride, padding, dilation, groups, need_x, need_w):
    grad = grad.contiguous(memory_format=memory_format(x))
    backend = _backend.select("conv_bias_act", x.device)
    conv_backward = getattr(backend, "conv_backward", None)
    if conv_backward is not None:
        gx, gw, _ = conv_backward(grad, x, weight, stride, padding, [need_x, need_w, False], dilation, groups)
    else:
        gx, gw, _ = backend_torch.aten_conv_backward(grad, x, weight, stride, padding, dilation, groups,
                                                     [need_x, need_w, False])
    return gx, (None if gw is None else like_param(gw, weight))  # DDP needs the parameter's exact strides


def _param_grad(g, like, needed):
    return g.to(like.dtype) if needed and g is not None else None


# ---------------------------------------------------------------------------------------------- double backward
# With create_graph=True (grad mode on in backward) each function below takes its gradients from its reference
# forward, recomputed from the saved tensors with the batch statistics recomputed from their input (see
# fastres.ops._create_graph). Where a residual tensor was added (not kept), the ReLU's gradient comes from the saved
# output and the residual's gradient is the gradient after it.
def _require_local(*groups):
    if any(g is not None for g in groups):
        raise NotImplementedError("fastres: double backward (create_graph=True) through a SyncBatchNorm that "
                                  "synchronizes over a process group is not supported")


def _grad_after_relu(grad, out, relu):
    """The gradient past the ReLU from its saved output, differentiable in grad."""
    return torch.ops.aten.threshold_backward(grad, out, 0) if relu else grad


# ---------------------------------------------------------------------------------------------- autograd functions
class _BnReluConv(torch.autograd.Function):
    """conv2d(relu(bn(y)), weight) with bn's batch statistics given: keeps y, not relu(bn(y))."""

    @staticmethod
    def forward(ctx, y, gamma, beta, weight, mean, invstd, count, conv, group, eps):
        scale, shift = _coefficients(gamma, beta, mean, invstd)
        out = _bn_relu_conv_op(y, scale, shift, weight, conv)
        ctx.selection = _backend.capture()
        ctx.conv = conv
        ctx.group, ctx.eps = group, eps
        ctx.save_for_backward(y, gamma, beta, weight, mean, invstd, count)
        return out

    @staticmethod
    @_backend.keeps_forward_selection
    def backward(ctx, grad):
        if _create_graph.recording():
            return _BnReluConv._backward_create_graph(ctx, grad)
        y, gamma, beta, weight, mean, invstd, count = ctx.saved_tensors
        need_y = any(ctx.needs_input_grad[:3])
        need_w = ctx.needs_input_grad[3]
        grad_y = grad_gamma = grad_beta = grad_w = None
        with _no_autocast(y.device.type):
            scale, shift = _coefficients(gamma, beta, mean, invstd)
            a = _prologue(y, scale, shift)
            grad_a, grad_w = _conv_grads(grad, a, weight, *ctx.conv, need_y, need_w)
            if need_y:
                grad_y, _, grad_gamma, grad_beta = _bn_backward(grad_a, a, y, mean, invstd, gamma, True, count,
                                                                ctx.group, False)
        return (grad_y, _param_grad(grad_gamma, gamma, ctx.needs_input_grad[1]),
                _param_grad(grad_beta, beta, ctx.needs_input_grad[2]), grad_w, None, None, None, None, None, None)

    @staticmethod
    def _backward_create_graph(ctx, grad):
        _require_local(ctx.group)
        y, gamma, beta, weight = ctx.saved_tensors[:4]
        grads = _create_graph.vjp(lambda *a: _create_graph.bn_relu_conv(*a[:3], ctx.eps, a[3], *ctx.conv),
                                  (y, gamma, beta, weight), ctx.needs_input_grad[:4], grad)
        return (*grads, None, None, None, None, None, None)


class _BnAddRelu(torch.autograd.Function):
    """relu?(bn(y) + shortcut) where the shortcut is a tensor (`residual`) or bn_d(yd), a projection's BN applied
    here; keeps y, yd and (for the ReLU mask) the output."""

    @staticmethod
    def forward(ctx, y, gamma, beta, mean, invstd, count, residual, yd, gamma_d, beta_d, mean_d, invstd_d, count_d,
                relu, group, group_d, eps, eps_d):
        ctx.relu, ctx.group, ctx.group_d, ctx.eps, ctx.eps_d = relu, group, group_d, eps, eps_d
        ctx.selection = _backend.capture()
        ctx.dual = yd is not None and _dual_applies(y, group, group_d)
        if ctx.dual:  # the 1-bit mask is kept instead of the output; one backward kernel serves both BNs
            out, y, yd, mask = _dual_apply(y, gamma, beta, mean, invstd, yd, gamma_d, beta_d, mean_d, invstd_d, relu)
            ctx.save_for_backward(y, gamma, mean, invstd, mask, yd, gamma_d, mean_d, invstd_d, beta, beta_d)
            return out
        shortcut = residual
        if yd is not None:
            shortcut = _bn_apply(yd, mean_d, invstd_d, gamma_d, beta_d, None, False)
        out = _bn_apply(y, mean, invstd, gamma, beta, shortcut, relu)
        ctx.save_for_backward(y, gamma, mean, invstd, count, out if relu else None, yd, gamma_d, mean_d, invstd_d,
                              count_d, beta, beta_d)  # (the shifts for double backward only: parameters, no memory)
        return out

    @staticmethod
    @_backend.keeps_forward_selection
    def backward(ctx, grad):
        if _create_graph.recording():
            return _BnAddRelu._backward_create_graph(ctx, grad)
        if ctx.dual:
            return _BnAddRelu._backward_dual(ctx, grad)
        y, gamma, mean, invstd, count, out, yd, gamma_d, mean_d, invstd_d, count_d = ctx.saved_tensors[:11]
        need = ctx.needs_input_grad
        need_shortcut = need[6] or any(need[7:10])
        grad_yd = grad_gamma_d = grad_beta_d = None
        with _no_autocast(y.device.type):
            grad_y, dz, grad_gamma, grad_beta = _bn_backward(grad, out, y, mean, invstd, gamma, ctx.relu, count,
                                                             ctx.group, need_shortcut)
            if yd is not None and need_shortcut:
                grad_yd, _, grad_gamma_d, grad_beta_d = _bn_backward(dz, None, yd, mean_d, invstd_d, gamma_d, False,
                                                                     count_d, ctx.group_d, False)
        return (grad_y if need[0] else None, _param_grad(grad_gamma, gamma, need[1]),
                _param_grad(grad_beta, gamma, need[2]), None, None, None,
                dz if need[6] else None, grad_yd if need[7] else None, _param_grad(grad_gamma_d, gamma_d, need[8]),
                _param_grad(grad_beta_d, gamma_d, need[9]), None, None, None, None, None, None, None, None)

    @staticmethod
    def _backward_create_graph(ctx, grad):
        _require_local(ctx.group, ctx.group_d)
        need = ctx.needs_input_grad
        saved = ctx.saved_tensors
        relu = ctx.relu
        if ctx.dual:  # the ReLU recomputed (its 1-bit mask is laid out for the kernels)
            y, gamma, yd, gamma_d, beta, beta_d = (saved[i] for i in (0, 1, 5, 6, 9, 10))
        else:  # the ReLU from the saved output (a residual tensor is not kept to recompute it)
            y, gamma, yd, gamma_d, beta, beta_d = (saved[i] for i in (0, 1, 6, 7, 11, 12))
            grad, relu = _grad_after_relu(grad, saved[5], relu), False
        grads = _create_graph.vjp(
            lambda *a: _create_graph.bn_add_relu(*a, eps=ctx.eps, eps_d=ctx.eps_d, relu=relu),
            (y, gamma, beta, yd, gamma_d, beta_d), [need[i] for i in (0, 1, 2, 7, 8, 9)], grad)
        return (*grads[:3], None, None, None, grad if need[6] else None, *grads[3:], None, None, None, None, None,
                None, None, None)

    @staticmethod
    def _backward_dual(ctx, grad):
        y, gamma, mean, invstd, mask, yd, gamma_d, mean_d, invstd_d = ctx.saved_tensors[:9]
        need = ctx.needs_input_grad
        with _no_autocast(y.device.type):
            grad_y, grad_yd, g_gamma, g_beta, g_gamma_d, g_beta_d = _dual_backward(
                grad, mask, ctx.relu, y, mean, invstd, gamma, yd, mean_d, invstd_d, gamma_d, need[7])
        return (grad_y if need[0] else None, _param_grad(g_gamma, gamma, need[1]), _param_grad(g_beta, gamma, need[2]),
                None, None, None, None, grad_yd if need[7] else None, _param_grad(g_gamma_d, gamma_d, need[8]),
                _param_grad(g_beta_d, gamma_d, need[9]), None, None, None, None, None, None, None, None)


class _TailSpec:
    """The non-tensor half of a recomputed block tail: conv geometry, the BN modules (for their running
    statistics), process groups."""

    def __init__(self, conv, norm, group_prev, eps_prev, ds_conv=None, ds_norm=None):
        self.conv = _geometry(conv)
        self.norm, self.group_prev, self.eps_prev = norm, group_prev, eps_prev
        self.group = _collectives.group_of(norm)
        self.ds_conv = None if ds_conv is None else _geometry(ds_conv)
        self.ds_norm = ds_norm
        self.group_d = None if ds_norm is None else _collectives.group_of(ds_norm)


def _recompute_conv(y_prev, scale_p, shift_p, weight, conv):
    """(y, a): bn_relu_conv(y_prev)'s output again, bit for bit, and its input a = relu(bn_prev(y_prev)) where
    the backend materializes it anyway (then one prologue pass serves both the conv and its weight gradient), else
    None (the Triton backend applies the prologue inside the conv)."""
    if _backend_name("bn_relu_conv", y_prev.device) == "backend_triton":
        return _bn_relu_conv_op(y_prev, scale_p, shift_p, weight, conv), None
    a = _prologue(y_prev, scale_p, shift_p)  # what the compiled and torch backends' bn_relu_conv convolve
    return F.conv2d(a, weight, None, *conv).contiguous(memory_format=memory_format(y_prev)), a


class _RecomputedTail(torch.autograd.Function):
    """relu(bn(conv(relu(bn_prev(y_prev)))) + shortcut), the shortcut a tensor or bn_d(conv_d(x)): the block's last
    conv (and its projection) is run again in backward instead of keeping its raw output. Keeps y_prev, the output
    (or, for a projection through the dual apply, the ReLU's 1-bit mask) and per-channel statistics (x is the block
    input, kept by its first conv anyway)."""

    @staticmethod
    def forward(ctx, y_prev, gamma_p, beta_p, mean_p, invstd_p, count_p, weight, gamma, beta, residual, x, weight_d,
                gamma_d, beta_d, spec):
        ctx.selection = _backend.capture()
        scale_p, shift_p = _coefficients(gamma_p, beta_p, mean_p, invstd_p)
        y = _bn_relu_conv_op(y_prev, scale_p, shift_p, weight, spec.conv)
        mean, invstd, count = batch_stats(y, spec.norm, spec.group)
        shortcut = residual
        mean_d = invstd_d = count_d = None
        ctx.dual = False
        if weight_d is not None:
            yd = _conv_op(x, weight_d, spec.ds_conv)
            mean_d, invstd_d, count_d = batch_stats(yd, spec.ds_norm, spec.group_d)
            ctx.dual = _dual_applies(y, spec.group, spec.group_d)
            if ctx.dual:  # the 1-bit mask kept instead of the output
                out, _, _, kept = _dual_apply(y, gamma, beta, mean, invstd, yd, gamma_d, beta_d, mean_d, invstd_d,
                                              True)
            else:
                shortcut = _bn_apply(yd, mean_d, invstd_d, gamma_d, beta_d, None, False)
            del yd
        if not ctx.dual:
            out = kept = _bn_apply(y, mean, invstd, gamma, beta, shortcut, True)
        ctx.spec = spec
        ctx.save_for_backward(y_prev, gamma_p, beta_p, mean_p, invstd_p, count_p, weight, gamma, beta, mean, invstd,
                              count, kept, x if weight_d is not None else None, weight_d, gamma_d, mean_d, invstd_d,
                              count_d, beta_d)
        return out

    @staticmethod
    @_backend.keeps_forward_selection
    def backward(ctx, grad):
        if _create_graph.recording():
            return _RecomputedTail._backward_create_graph(ctx, grad)
        (y_prev, gamma_p, beta_p, mean_p, invstd_p, count_p, weight, gamma, beta, mean, invstd, count, kept, x,
         weight_d, gamma_d, mean_d, invstd_d, count_d, _) = ctx.saved_tensors
        spec, need = ctx.spec, ctx.needs_input_grad
        grads = [None] * 15
        with _no_autocast(y_prev.device.type):
            scale_p, shift_p = _coefficients(gamma_p, beta_p, mean_p, invstd_p)
            y, a = _recompute_conv(y_prev, scale_p, shift_p, weight, spec.conv)  # the forward's y, again
            need_d = weight_d is not None and any(need[10:14])
            if ctx.dual:
                yd = _conv_op(x, weight_d, spec.ds_conv)
                grad_y, grad_yd, g_gamma, g_beta, g_gamma_d, g_beta_d = _dual_backward(
                    grad, kept, True, y, mean, invstd, gamma, yd, mean_d, invstd_d, gamma_d, need_d)
                del y, yd
            else:
                need_shortcut = need[9] or need_d
                grad_y, dz, g_gamma, g_beta = _bn_backward(grad, kept, y, mean, invstd, gamma, True, count,
                                                           spec.group, need_shortcut)
                del y
                if need[9]:
                    grads[9] = dz
                if need_d:
                    yd = _conv_op(x, weight_d, spec.ds_conv)
                    grad_yd, _, g_gamma_d, g_beta_d = _bn_backward(dz, None, yd, mean_d, invstd_d, gamma_d, False,
                                                                   count_d, spec.group_d, False)
                    del yd
            grads[7], grads[8] = _param_grad(g_gamma, gamma, need[7]), _param_grad(g_beta, beta, need[8])
            if need_d:
                grads[10], grads[11] = _conv_grads(grad_yd, x, weight_d, *spec.ds_conv, need[10], need[11])
                grads[12] = _param_grad(g_gamma_d, gamma_d, need[12])
                grads[13] = _param_grad(g_beta_d, gamma_d, need[13])
            if a is None:
                a = _prologue(y_prev, scale_p, shift_p)
            need_prev = any(need[:3])
            grad_a, grads[6] = _conv_grads(grad_y, a, weight, *spec.conv, need_prev, need[6])
            if need_prev:
                grads[0], _, g_gamma_p, g_beta_p = _bn_backward(grad_a, a, y_prev, mean_p, invstd_p, gamma_p, True,
                                                                count_p, spec.group_prev, False)
                grads[1], grads[2] = _param_grad(g_gamma_p, gamma_p, need[1]), _param_grad(g_beta_p, beta_p, need[2])
        return tuple(grads)

    @staticmethod
    def _backward_create_graph(ctx, grad):
        saved = ctx.saved_tensors
        y_prev, gamma_p, beta_p, weight, gamma, beta, kept, x, weight_d, gamma_d, beta_d = (
            saved[i] for i in (0, 1, 2, 6, 7, 8, 12, 13, 14, 15, 19))
        spec, need = ctx.spec, ctx.needs_input_grad
        _require_local(spec.group_prev, spec.group, spec.group_d)
        # Through the dual apply the ReLU is recomputed (its 1-bit mask is laid out for the kernels); otherwise it
        # comes from the saved output (a residual tensor is not kept to recompute it).
        relu = ctx.dual
        if not relu:
            grad = _grad_after_relu(grad, kept, True)

        def output(y_prev, gamma_p, beta_p, weight, gamma, beta, x, weight_d, gamma_d, beta_d):
            y = _create_graph.bn_relu_conv(y_prev, gamma_p, beta_p, spec.eps_prev, weight, *spec.conv)
            yd = None if weight_d is None else F.conv2d(x, weight_d, None, *spec.ds_conv)
            return _create_graph.bn_add_relu(y, gamma, beta, yd, gamma_d, beta_d, eps=spec.norm.eps,
                                             eps_d=None if yd is None else spec.ds_norm.eps, relu=relu)

        g = _create_graph.vjp(output, (y_prev, gamma_p, beta_p, weight, gamma, beta, x, weight_d, gamma_d, beta_d),
                              [need[i] for i in (0, 1, 2, 6, 7, 8, 10, 11, 12, 13)], grad)
        return (*g[:3], None, None, None, *g[3:6], grad if need[9] else None, *g[6:], None)


# ---------------------------------------------------------------------------------------------- units and blocks
class _Unit:
    """A conv's raw output with its BN's parameters and batch statistics."""

    def __init__(self, y, norm):
        self.y = y
        self.group = _collectives.group_of(norm)
        self.mean, self.invstd, self.count = batch_stats(y, norm, self.group)
        self.gamma, self.beta = _affine(norm, self.mean)
        self.eps = float(norm.eps)


def _raw_conv(x, conv):
    return _conv_op(x, conv.weight, _geometry(conv))


def _bn_relu_conv(unit, conv):
    weight = _autocast(conv.weight, unit.y.device.type)
    return _BnReluConv.apply(unit.y, unit.gamma, unit.beta, weight, unit.mean, unit.invstd, unit.count,
                             _geometry(conv), unit.group, unit.eps)


def _finish(unit, relu, residual=None, shortcut=None):
    """relu?(bn(unit) + residual or bn_d(shortcut))."""
    if residual is not None and residual.dtype != unit.y.dtype:
        residual = residual.to(unit.y.dtype)  # as `out += identity` would under autocast
    d = (shortcut.y, shortcut.gamma, shortcut.beta, shortcut.mean, shortcut.invstd, shortcut.count,
         shortcut.group, shortcut.eps) if shortcut is not None else (None,) * 8
    return _BnAddRelu.apply(unit.y, unit.gamma, unit.beta, unit.mean, unit.invstd, unit.count, residual, *d[:6],
                            relu, unit.group, d[6], unit.eps, d[7])


def conv_bn_relu(x, conv, norm, relu, residual=None):
    """relu?(norm(conv(x)) + residual) for a training-mode (Sync)BatchNorm: the unit on its own (a stem)."""
    unit = _Unit(_raw_conv(x, conv), norm)
    return _finish(unit, relu, residual=residual)


def sync_batch_norm(x, norm, group):
    """A SyncBatchNorm layer on its own, with batch statistics over `group`."""
    mean, invstd, count = batch_stats(x, norm, group)
    gamma, beta = _affine(norm, mean)
    return _BnAddRelu.apply(x, gamma, beta, mean, invstd, count, None, None, None, None, None, None, None, False,
                            group, None, float(norm.eps), None)


def conv_norm_act(x, conv, norm, *, relu, residual=None, cache=None, name=None, residual_owned=False):
    """relu?(norm(conv(x)) + residual?), through fastres.ops when a kernel covers the unit (and no torch.func
    transform runs: see functorch_active). residual_owned: nothing but the caller holds `residual`, so an eval
    kernel may write the result over it."""
    plain = functorch_active()
    if plain or not unit_fusable(conv, norm):
        out = conv(x)
        if norm is not None:
            out = norm(out)
        if residual is not None:
            if not relu:
                return out + residual
            return torch.relu(out + residual) if plain else ops.add_relu(out, residual)
        return torch.relu(out) if relu else out
    kind = norm_kind(norm)
    if norm_after_conv(norm, kind):
        training = kind == "bn_train"
        if training and _collectives.group_of(norm) is not None:
            return conv_bn_relu(x, conv, norm, relu, residual)
        weight_bn, bias_bn = _affine(norm, norm.running_var)
        momentum = _bn_momentum(norm) if training else 0.0
        return ops.conv_bn_act(x, conv.weight, weight_bn, bias_bn, norm.running_mean, norm.running_var,
                               training=training, momentum=momentum, eps=norm.eps, stride=conv.stride,
                               padding=conv.padding, residual=residual, relu=relu, dilation=conv.dilation,
                               groups=conv.groups)
    out = prepacked_conv_norm_act(x, conv, norm, kind, residual, relu, cache, name, residual_owned)
    if out is not None:
        return out
    weight, bias = folded_conv_params(conv, norm, kind, cache, name, like=x)
    return ops.conv_bias_act(x, weight, bias, stride=conv.stride, padding=conv.padding, residual=residual,
                             relu=relu, dilation=conv.dilation, groups=conv.groups)


def _lean_unit(conv, norm):
    return unit_fusable(conv, norm) and norm_kind(norm) == "bn_train"


MEMORY_MODES = ("lean", "recompute")
# The issue-6 budget (saved activations at most 0.6x torchvision's) holds by default; "lean" trades it for 1-8%
# shorter steps (measured on CPU).
DEFAULT_MEMORY_MODE = "recompute"


def _is_1x1(conv):
    return tuple(conv.kernel_size) == (1, 1) and tuple(conv.padding) == (0, 0)


def block_forward(block, x):
    """The lean training forward of a fastres BasicBlock / Bottleneck, or None where it does not apply (a unit is
    not a plain conv + training BatchNorm, or under torch.compile, whose own partitioner decides what to keep and
    which runs the per-unit custom ops instead).

    block.memory_mode "lean" keeps every conv's raw output; "recompute" also runs the block's last conv and its
    projection again in backward when they are 1x1 convs (a Bottleneck's expanding conv3: its raw output is the
    block's largest), about 1/4 more forward conv work for the smallest saved set."""
    units = block._units()
    if not all(_lean_unit(conv, norm) for conv, norm in units):
        return None
    synced = any(_collectives.group_of(norm) is not None for _, norm in units)
    if torch.compiler.is_compiling() and not synced:
        return None
    ds = block.downsample if block.residual else None
    fused_ds = (ds is not None and type(ds) is nn.Sequential and len(ds) == 2 and not has_hooks(ds)
                and _lean_unit(ds[0], ds[1]))
    recompute = (getattr(block, "memory_mode", DEFAULT_MEMORY_MODE) == "recompute" and len(units) > 1
                 and _is_1x1(units[-1][0]) and (not fused_ds or _is_1x1(ds[0])))
    conv, norm = units[0]
    unit = _Unit(_raw_conv(x, conv), norm)
    for conv, norm in units[1:-1] if recompute else units[1:]:
        unit = _Unit(_bn_relu_conv(unit, conv), norm)
    if recompute:
        return _recomputed_tail(unit, *units[-1], x, ds if block.residual else None, fused_ds, block.residual)
    if not block.residual:
        return _finish(unit, True)
    if fused_ds:
        return _finish(unit, True, shortcut=_Unit(_raw_conv(x, ds[0]), ds[1]))
    return _finish(unit, True, residual=x if ds is None else ds(x))


def _recomputed_tail(unit, conv, norm, x, ds, fused_ds, residual):
    device_type = unit.y.device.type
    weight = _autocast(conv.weight, device_type)
    gamma, beta = _affine(norm, unit.mean)
    shortcut = x_d = weight_d = gamma_d = beta_d = None
    spec = _TailSpec(conv, norm, unit.group, unit.eps)
    if fused_ds:
        spec = _TailSpec(conv, norm, unit.group, unit.eps, ds[0], ds[1])
        x_d, weight_d = _autocast(x, device_type), _autocast(ds[0].weight, device_type)
        gamma_d, beta_d = _affine(ds[1], unit.mean)
    elif residual:
        shortcut = x if ds is None else ds(x)
        if shortcut.dtype != unit.y.dtype:
            shortcut = shortcut.to(unit.y.dtype)
    return _RecomputedTail.apply(unit.y, unit.gamma, unit.beta, unit.mean, unit.invstd, unit.count, weight, gamma,
                                 beta, shortcut, x_d, weight_d, gamma_d, beta_d, spec)


def sequence_units(mods, observed=()):
    """Where a list of (name, module) pairs, called one after another, holds fusable units: [(i, j, conv, norm, relu)]
    for mods[i:j] = a Conv2d, an optional norm that a kernel runs, an optional plain ReLU. A unit does not swallow a
    module whose output is `observed` (returned by the caller) unless that module ends the unit."""
    units, i = [], 0
    while i < len(mods):
        conv = mods[i][1]
        if not isinstance(conv, nn.Conv2d):
            i += 1
            continue
        j, norm = i + 1, None
        if mods[i][0] not in observed and j < len(mods) and not isinstance(mods[j][1], nn.ReLU) \
                and norm_kind(mods[j][1]) not in (None, "none"):
            norm, j = mods[j][1], j + 1
        relu = mods[j - 1][0] not in observed and j < len(mods) and is_plain_relu(mods[j][1])
        units.append((i, j + 1 if relu else j, conv, norm, relu))
        i = units[-1][1]
    return units


def unshared(x, module):
    """`x`, or a copy of it when `module` (called next on it) works in place (inplace=True, e.g. a SiLU after a fused
    unit) and autograd may hold `x` for a backward: the fused ops save their outputs, which an in-place activation
    would overwrite."""
    if getattr(module, "inplace", False) is True and torch.is_grad_enabled() and x.requires_grad:
        return x.clone()
    return x


def run_sequence(mods, x, cache, observed=(), on_output=None):
    """Calls a list of (name, module) pairs in order, each fusable unit (see sequence_units) as one conv_norm_act;
    on_output(name, x) is called after every `observed` name."""
    units = {i: (j, conv, norm, relu) for i, j, conv, norm, relu in sequence_units(mods, observed)}
    i, fused = 0, False
    while i < len(mods):
        if i in units:
            j, conv, norm, relu = units[i]
            x = conv_norm_act(x, conv, norm, relu=relu, cache=cache, name=mods[i][0])
        else:
            j = i + 1
            x = mods[i][1](unshared(x, mods[i][1]) if fused else x)
        fused = i in units
        if on_output is not None and mods[j - 1][0] in observed:
            on_output(mods[j - 1][0], x)
        i = j
    return x
