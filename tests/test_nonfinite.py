"""NaN and +-Inf propagate through every fastres op, on every backend and path, exactly as through the plain-torch
composition the op fuses: same isnan / isposinf / isneginf masks in the forward output and in every gradient.

The non-finite values sit where kernels split their work: a tensor's first and last element, the first and last
lane of the C++ kernels' 8-lane vectors (NHWC: channels 0 and 7 of a row; NCHW: plane offsets 0 and 7), the channel
tail after them (11 channels = 8 + 3), and the boundary between the Triton elementwise kernels' 64-row tiles
(72 rows). A NaN, a +Inf and a -Inf at different places of the same tensor also check that -Inf becomes 0 at a
ReLU and +Inf stays.

A non-finite conv weight sits at a centre tap, which no output reads through the zero padding: a NaN weight at a
tap that meets the padding gives NaN there in one ATen algorithm (im2col: NaN * 0) and not in another (oneDNN's
direct conv skips padded taps; for fp32 which one runs depends on the shape), so no single answer exists; fastres's
implicit GEMM (Triton) multiplies, like im2col.

A BN's weight gets NaN only: +-Inf there gives Inf or NaN by which of two algebraically equal forms applies the BN
(ATen's CPU kernels x * (w * invstd) + (b - mean * w * invstd), its CUDA ones w * (x - mean) * invstd + b).

One exception, documented: the running statistics after a training step over a +-Inf are compared by finiteness
only. ATen's CPU batch norm sums then divides (mean +Inf), its CUDA one and fastres's kernels use Welford/Chan
updates (mean NaN); the normalized output is NaN over the whole channel either way.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastres
import fastres.models as fm
import fastres.nn as fnn
from fastres import ops
from fastres.ops import _backend

NAN, INF = float("nan"), float("inf")
N, C, H, W = 2, 11, 6, 6
# (n, c, h, w): first element; NHWC vector lanes 0 / 7 and the tail; NCHW plane offset 7; last element; Triton tile
# rows 63 / 64 (row = n * H * W + h * W + w).
POSITIONS = [(0, 0, 0, 0), (0, 7, 0, 0), (0, 10, 0, 1), (0, 3, 1, 1), (1, 10, 5, 5), (1, 5, 4, 3), (1, 6, 4, 4)]
VALUES = [NAN, INF, -INF]
DTYPES = [torch.float32, torch.bfloat16]
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def assert_same_nonfinite(name, got, ref, finiteness_only=False):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    checks = [("non-finite", lambda t: ~torch.isfinite(t))] if finiteness_only else [
        ("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)]
    for what, f in checks:
        differ = f(got) != f(ref)
        assert not differ.any(), (f"{name}: {what} differs from the reference at {differ.sum().item()} places, "
                                  f"e.g. {differ.nonzero()[:4].tolist()}")


def poison(t, positions=POSITIONS, values=VALUES):
    """t with NaN, +Inf, -Inf (cycling) at the given (n, c, h, w) positions (or (c,) for 1-D tensors)."""
    t = t.clone()
    with torch.no_grad():
        for i, p in enumerate(positions):
            t[p] = values[i % len(values)]
    return t


def _rand(*shape, dtype, fmt=None, scale=1.0, shift=0.0, g):
    t = torch.randn(shape, generator=g) * scale + shift
    t = t.to(dtype)
    return t.contiguous(memory_format=fmt) if fmt is not None and t.dim() == 4 else t


# ------------------------------------------------------------------------------------------------ the op cases
# Each case: make(dtype, fmt, where, g) -> (tensors, fused, reference); fused(**tensors) runs the fastres op,
# reference(**tensors) the plain-torch composition; both return (output, [running statistics]). Gradients are taken
# w.r.t. every floating tensor whose name is not a running statistic.
def _conv_bias_act(relu, residual):
    def make(dtype, fmt, where, g):
        t = {"x": _rand(N, C, H, W, dtype=dtype, fmt=fmt, g=g), "weight": _rand(C, C, 3, 3, dtype=dtype, scale=0.2, g=g),
             "bias": _rand(C, dtype=dtype, g=g)}
        if residual:
            t["residual"] = _rand(N, C, H, W, dtype=dtype, fmt=fmt, g=g)
        _poison_in(t, where)

        def fused(x, weight, bias, residual=None):
            return ops.conv_bias_act(x, weight, bias, 1, 1, residual, relu), []

        def reference(x, weight, bias, residual=None):
            y = F.conv2d(x, weight, bias, 1, 1)
            y = y if residual is None else y + residual
            return (torch.relu(y) if relu else y), []
        return t, fused, reference
    return make


def _bn_tensors(dtype, fmt, g, prefix=""):
    return {prefix + "bn_weight": _rand(C, dtype=torch.float32, scale=0.3, shift=1.0, g=g),
            prefix + "bn_bias": _rand(C, dtype=torch.float32, g=g),
            prefix + "running_mean": _rand(C, dtype=torch.float32, scale=0.2, g=g),
            prefix + "running_var": torch.rand(C, generator=g) + 0.5}


def _conv_bn_act(training, residual):
    def make(dtype, fmt, where, g):
        t = {"x": _rand(N, C, H, W, dtype=dtype, fmt=fmt, g=g), "weight": _rand(C, C, 1, 1, dtype=dtype, scale=0.3, g=g),
             **_bn_tensors(dtype, fmt, g)}
        if residual:
            t["residual"] = _rand(N, C, H, W, dtype=dtype, fmt=fmt, g=g)
        _poison_in(t, where)

        def fused(x, weight, bn_weight, bn_bias, running_mean, running_var, residual=None):
            out = ops.conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, training,
                                  residual=residual)
            return out, [running_mean, running_var]

        def reference(x, weight, bn_weight, bn_bias, running_mean, running_var, residual=None):
            y = F.batch_norm(F.conv2d(x, weight), running_mean, running_var, bn_weight, bn_bias, training)
            y = y if residual is None else y + residual
            return torch.relu(y), [running_mean, running_var]
        return t, fused, reference
    return make


def _bn_relu_conv(relu):
    def make(dtype, fmt, where, g):
        t = {"x": _rand(N, C, H, W, dtype=dtype, fmt=fmt, g=g), "scale": _rand(C, dtype=torch.float32, g=g),
             "shift": _rand(C, dtype=torch.float32, g=g), "weight": _rand(C, C, 3, 3, dtype=dtype, scale=0.2, g=g)}
        _poison_in(t, where)

        def fused(x, scale, shift, weight):
            return ops.bn_relu_conv(x, scale, shift, weight, 1, 1, relu), []

        def reference(x, scale, shift, weight):
            z = x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
            return F.conv2d((torch.relu(z) if relu else z).to(dtype), weight, None, 1, 1), []
        return t, fused, reference
    return make


def _dual_bn_act(training):
    def make(dtype, fmt, where, g):
        t = {"y": _rand(N, C, H, W, dtype=dtype, fmt=fmt, g=g), **_bn_tensors(dtype, fmt, g),
             "r": _rand(N, C, H, W, dtype=dtype, fmt=fmt, g=g), **_bn_tensors(dtype, fmt, g, "r_")}
        _poison_in(t, where)

        def fused(y, bn_weight, bn_bias, running_mean, running_var, r, r_bn_weight, r_bn_bias, r_running_mean,
                  r_running_var):
            out = ops.dual_bn_act(y, bn_weight, bn_bias, running_mean, running_var, r, r_bn_weight, r_bn_bias,
                                  r_running_mean, r_running_var, training)
            return out, [running_mean, running_var, r_running_mean, r_running_var]

        def reference(y, bn_weight, bn_bias, running_mean, running_var, r, r_bn_weight, r_bn_bias, r_running_mean,
                      r_running_var):
            z = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training)
            zr = F.batch_norm(r, r_running_mean, r_running_var, r_bn_weight, r_bn_bias, training)
            return torch.relu(z + zr), [running_mean, running_var, r_running_mean, r_running_var]
        return t, fused, reference
    return make


def _add_relu(dtype, fmt, where, g):
    t = {"x": _rand(N, C, H, W, dtype=dtype, fmt=fmt, g=g), "residual": _rand(N, C, H, W, dtype=dtype, fmt=fmt, g=g)}
    _poison_in(t, where)
    return t, (lambda x, residual: (ops.add_relu(x, residual), [])), \
        (lambda x, residual: (torch.relu(x + residual), []))


def _fold_bn(dtype, fmt, where, g):
    t = {"conv_weight": _rand(C, C, 3, 3, dtype=dtype, g=g), "conv_bias": _rand(C, dtype=dtype, g=g),
         **_bn_tensors(dtype, fmt, g)}
    _poison_in(t, where)

    # Both outputs as one, as a model uses them.
    def reference(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var):
        scale = bn_weight * torch.rsqrt(running_var + 1e-5)
        weight = (conv_weight.float() * scale.view(-1, 1, 1, 1)).to(dtype)
        return torch.cat([weight.flatten(), ((conv_bias.float() - running_mean) * scale + bn_bias).to(dtype)]), []

    def fused(**kw):
        weight, bias = ops.fold_bn(**kw)
        return torch.cat([weight.flatten(), bias]), []
    return t, fused, reference


def _poison_in(tensors, where):
    """Non-finite values into the named tensor: an activation at POSITIONS, a per-channel vector at its first,
    eighth and last channel, a weight at its first and last output channel."""
    t = tensors[where]
    if where.endswith("bn_weight"):  # NaN only (see the module's docstring)
        tensors[where] = poison(t, [(0,), (7,), (C - 1,)], [NAN])
    elif t.dim() == 1:
        tensors[where] = poison(t, [(0,), (7,), (C - 1,)])
    elif where == "weight":  # centre taps (see the module's docstring)
        tensors[where] = poison(t, [(0, 0, 1, 1), (C - 1, 3, 1, 1)])
    elif where == "conv_weight":
        tensors[where] = poison(t, [(0, 0, 0, 0), (C - 1, 3, 0, 0)])
    else:
        tensors[where] = poison(t)


# op name (as the backend selector knows it) -> {case: (make, [where])}
CASES = {
    "add_relu": {"add_relu": (_add_relu, ["x", "residual"])},
    "conv_bias_act": {
        "conv_bias_act-relu": (_conv_bias_act(True, False), ["x", "weight", "bias"]),
        "conv_bias_act-linear": (_conv_bias_act(False, False), ["x"]),
        "conv_bias_act-residual-relu": (_conv_bias_act(True, True), ["residual", "x"]),
    },
    "conv_bn_act_forward": {
        "conv_bn_act-eval": (_conv_bn_act(False, False), ["x", "running_var", "bn_bias"]),
        "conv_bn_act-eval-residual": (_conv_bn_act(False, True), ["residual"]),
        "conv_bn_act-train": (_conv_bn_act(True, False), ["x", "bn_weight"]),
        "conv_bn_act-train-residual": (_conv_bn_act(True, True), ["residual"]),
    },
    "bn_relu_conv": {
        "bn_relu_conv-relu": (_bn_relu_conv(True), ["x", "shift"]),
        "bn_relu_conv-linear": (_bn_relu_conv(False), ["x"]),
    },
    "dual_bn_act_forward": {
        "dual_bn_act-eval": (_dual_bn_act(False), ["y", "r", "r_running_mean"]),
        "dual_bn_act-train": (_dual_bn_act(True), ["y", "r_bn_bias"]),
    },
    "fold_bn": {"fold_bn": (_fold_bn, ["conv_weight", "running_var"])},
}
_STATS = ("running_mean", "running_var")


def _params():
    for op, cases in CASES.items():
        for be in fastres.ops.BACKENDS:
            if _backend._why_not(be, op, "cpu") is not None:
                continue  # e.g. no dual kernel in the Triton backend: the model-level tests cover its fallback
            for name, (make, wheres) in cases.items():
                for i, where in enumerate(wheres):
                    for dtype, dtype_id in zip(DTYPES, ("fp32", "bf16")):
                        for fmt in FORMATS:
                            # The Triton interpreter is slow: bf16 (the same kernels, other casts) on NHWC and the
                            # first placement only.
                            if be == "triton" and dtype != torch.float32 and (fmt != "nhwc" or i > 0):
                                continue
                            yield pytest.param(be, name, make, where, dtype, fmt,
                                               id=f"{name}-{be}-{where}-{dtype_id}-{fmt}")


def _run(fn, tensors, grad_seed):
    """fn's output, running statistics and gradients w.r.t. every non-statistics floating tensor."""
    ts = {k: v.detach().clone().requires_grad_(not k.endswith(_STATS)) for k, v in tensors.items()}
    out, stats = fn(**ts)
    g = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(out.shape, generator=g).to(out.dtype)
    wrt = [k for k, v in ts.items() if v.requires_grad]
    grads = torch.autograd.grad(out, [ts[k] for k in wrt], grad_out, allow_unused=True)
    return out.detach(), [s.detach() for s in stats], dict(zip(wrt, grads))


@pytest.mark.parametrize("be,name,make,where,dtype,fmt", list(_params()))
def test_nan_and_inf_propagate_like_the_reference(be, name, make, where, dtype, fmt):
    tensors, fused, reference = make(dtype, FORMATS[fmt], where, torch.Generator().manual_seed(0))
    with fastres.backend(be):
        out, stats, grads = _run(fused, tensors, 1)
    ref_out, ref_stats, ref_grads = _run(reference, tensors, 1)
    assert (~torch.isfinite(ref_out)).any(), "the case must put non-finite values into the output"
    assert_same_nonfinite(f"{name} output", out, ref_out)
    for i, (s, s_ref) in enumerate(zip(stats, ref_stats)):
        assert_same_nonfinite(f"{name} statistics {i}", s, s_ref, finiteness_only=True)
    assert set(grads) == set(ref_grads)
    for k in grads:
        if ref_grads[k] is None:
            assert grads[k] is None or torch.count_nonzero(grads[k]) == 0, f"{name}: unexpected grad of {k}"
            continue
        assert_same_nonfinite(f"{name} grad of {k}", grads[k], ref_grads[k])


def test_relu_mask_passes_the_gradient_of_a_nan_output_like_threshold_backward():
    """dual_bn_act keeps a 1-bit mask instead of its output: its bit must be set where the output is NaN (ATen's
    threshold_backward passes the gradient there: NaN <= 0 is false), on every backend that has the op."""
    y = poison(torch.randn(N, C, H, W))
    ones, zeros = torch.ones(C), torch.zeros(C)
    for be in fastres.ops.BACKENDS:
        if _backend._why_not(be, "dual_bn_act_forward", "cpu") is not None:
            continue
        with fastres.backend(be):
            out, mask = torch.ops.fastres.dual_bn_act_forward(y, ones, zeros, zeros, ones, torch.zeros_like(y), ones,
                                                              zeros, zeros, ones, False, 0.1, 0.0, 0.1, 0.0,
                                                              True)[:2]
            grad = torch.ones_like(y)
            dz = torch.ops.fastres.dual_bn_act_backward(grad, mask, y, zeros, ones, ones, torch.zeros_like(y), zeros,
                                                        ones, ones, True, False, False)[0]
        expected = torch.ops.aten.threshold_backward(grad, torch.relu(y), 0)
        assert torch.equal(dz, expected), be
        assert torch.isnan(out).sum() == torch.isnan(y).sum()


# ------------------------------------------------------------------------------------------------ whole models
def _randomized(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    return model


def _plain(model):
    """The same network through torch modules only (a hook on each ReLU makes fastres blocks call them)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.register_forward_hook(lambda *args: None)
    return model


def _poisoned_input(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    x[0, 0, 5, 5] = NAN
    x[0, 1, 2, 7] = INF
    return x


def _bottleneck_net():
    """Bottlenecks with a projection and an identity shortcut (every fused path of a ResNet-50), small."""
    torch.manual_seed(0)
    ds = nn.Sequential(fnn.conv1x1(8, 32, 2), nn.BatchNorm2d(32))
    return _randomized(nn.Sequential(fnn.Bottleneck(8, 8, 2, ds), fnn.Bottleneck(32, 8)))


@pytest.mark.parametrize("backend", [None, "triton"], ids=["auto", "triton"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_model_eval_keeps_a_nan_in_its_own_sample(fmt, backend):
    """The issue's case: a NaN pixel makes its sample's logits NaN (not a confident class), and only its sample's;
    the eval fold (conv_bias_act with the BN folded in) on the default CPU backend, ResNet-18; the Triton
    kernels on a small Bottleneck net."""
    if backend is not None and _backend._why_not(backend, "conv_bias_act", "cpu") is not None:
        pytest.skip(f"backend {backend} cannot run here")
    if backend is None:
        model, x = _randomized(fm.resnet18(num_classes=10)), _poisoned_input((2, 3, 32, 32))
    else:
        model, x = _bottleneck_net(), _poisoned_input((2, 8, 9, 9))
    model = model.eval().to(memory_format=FORMATS[fmt])
    x = x.contiguous(memory_format=FORMATS[fmt])
    with torch.no_grad(), fastres.backend(backend):
        out = model(x)
    ref = _plain(model)(x)
    assert_same_nonfinite("eval output", out, ref)
    assert torch.isnan(out[0]).any() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("path", ["recompute", "lean", "per-unit", "sync-bn", "autocast"])
def test_model_training_step_propagates_nan_like_torch(path, monkeypatch):
    """A training step over an input with a NaN and an Inf: same non-finite masks as plain torch in the output, the
    input gradient, every parameter gradient, and (by finiteness) the running statistics."""
    model = _bottleneck_net().train()
    if path in ("recompute", "lean"):
        fnn.set_memory_mode(model, path)
    if path == "per-unit":
        monkeypatch.setattr(fnn.blocks._lean, "block_forward", lambda block, x: None)
    if path == "sync-bn":  # without a process group SyncBatchNorm runs its local math
        model = fnn.convert_sync_batchnorm(model)
    ref_model = _plain(model)
    x = _poisoned_input((4, 8, 9, 9))
    results = []
    for m in (model, ref_model):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=path == "autocast"):
            out = m(xi)
        out.float().sum().backward()
        results.append((out.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()},
                        dict(m.named_buffers())))
    (out, gx, grads, bufs), (ref_out, ref_gx, ref_grads, ref_bufs) = results
    assert torch.isnan(ref_out).all()  # training BN spreads the NaN over the batch
    assert_same_nonfinite("output", out, ref_out)
    assert_same_nonfinite("input grad", gx, ref_gx)
    for n in ref_grads:
        assert_same_nonfinite(f"grad of {n}", grads[n], ref_grads[n])
    for n in ref_bufs:
        if ref_bufs[n].is_floating_point():
            assert_same_nonfinite(n, bufs[n], ref_bufs[n], finiteness_only=True)
