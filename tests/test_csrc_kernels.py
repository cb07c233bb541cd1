"""The compiled kernels of fastres._C (csrc/), called directly as torch.ops.fastres._<name>.

Each kernel is held to a plain-torch float64 reference computed from the same (dtype-rounded) inputs:
float64 results to a few ulps, float32/float16/bfloat16 by the project's rule (tests/tolerance.py: error at most
twice ATen's error computing the same thing in that dtype). Also: output memory formats, odd shapes,
non-contiguous and misaligned inputs, inputs left unmodified, bit-for-bit determinism (across runs and thread
counts), argument errors, and torch.library.opcheck (schemas and fake kernels).
The same checks run on CUDA in TestCUDA (`pytest -m cuda` on a GPU machine).
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fastres._C", reason="fastres._C (the compiled kernels) is not built")

from fastres.ops import _compiled  # noqa: E402  (registers the fake kernels)
from tolerance import assert_within  # noqa: E402

ops = torch.ops.fastres
EPS = 1e-5
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "sliced", "sliced_channels_last", "offset"]
# Odd sizes: C=3 and 13 leave SIMD tails, 7x7 and 5x3 planes, a batch of one.
# (3, 11, 1, 1): a 1x1 map, whose layout torch reads from the strides of its size-1 dims.
SHAPES = [(2, 3, 7, 7), (1, 13, 5, 3), (3, 16, 4, 4), (3, 11, 1, 1)]
# Several units of work per plane / per row block (csrc/cpu_common.h) and several CUDA splits.
LARGE_SHAPES = [(2, 13, 40, 40), (1, 3, 131, 127)]
# Every shape in the dense layouts; the strided and misaligned layouts (which the kernels first make dense, or
# which take the CUDA kernels' unaligned path) with one odd shape.
LAYOUT_SHAPES = ([(layout, shape) for layout in ("contiguous", "channels_last") for shape in SHAPES]
                 + [(layout, (1, 13, 5, 3)) for layout in ("sliced", "sliced_channels_last", "offset")])


# ---- helpers ------------------------------------------------------------------------------------------------

def stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_channel(v):
    return v.view(1, -1, 1, 1)


def to_layout(t, layout):
    """The values of `t` in the named layout (the sliced views are neither NCHW- nor NHWC-contiguous)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "offset":  # contiguous, but one element into its storage: not 16-byte aligned
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = flat[1:].view(t.shape)
        view.copy_(t)
        return view
    fmt = torch.channels_last if layout == "sliced_channels_last" else torch.contiguous_format
    n, c, h, w = t.shape
    wide = torch.zeros(n, c, h, 2 * w, dtype=t.dtype, device=t.device).contiguous(memory_format=fmt)
    wide[..., ::2] = t
    return wide[..., ::2]


def expected_format(layout):
    return torch.channels_last if layout in ("channels_last", "sliced_channels_last") else torch.contiguous_format


def assert_format(name, t, fmt):
    assert t.is_contiguous(memory_format=fmt), f"{name}: strides {t.stride()} are not {fmt}"


def randn(shape, dtype, device, layout="contiguous"):
    return to_layout(torch.randn(shape, dtype=torch.float64, device=device).to(dtype), layout)


def check_close(name, got, ref64, aten):
    """fp64: a few ulps of the reference's magnitude; other dtypes: the project's rule against ATen."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    if got.dtype == torch.float64:
        scale = max(ref64.abs().max().item() if ref64.numel() else 0.0, 1.0)
        torch.testing.assert_close(got, ref64, rtol=0, atol=1e-12 * scale, msg=lambda m: f"{name}: {m}")
    else:
        assert_within(name, got, ref64, aten)


def snapshot(*tensors):
    return [None if t is None else (t, t.clone()) for t in tensors]


def assert_unchanged(snap):
    for item in snap:
        if item is not None:
            assert torch.equal(item[0], item[1]), "an input tensor was modified"


# ---- references ---------------------------------------------------------------------------------------------

def reference_fold_bn(w, b, gamma, beta, mean, var, eps, dtype):
    """In float64 when dtype is float64, else ATen's computation in `dtype`."""
    scale = (gamma.to(dtype) / torch.sqrt(var.to(dtype) + eps))
    bias = (b.to(dtype) if b is not None else torch.zeros_like(mean, dtype=dtype)) - mean.to(dtype)
    return w.to(dtype) * scale.view(-1, 1, 1, 1), bias * scale + beta.to(dtype)


def reference_bn_act_forward(y, scale, shift, residual, relu, dtype, center=None):
    z = y.to(dtype)
    if center is not None:
        z = z - per_channel(center.to(dtype))
    if scale is not None:
        z = z * per_channel(scale.to(dtype))
    if shift is not None:
        z = z + per_channel(shift.to(dtype))
    if residual is not None:
        z = z + residual.to(dtype)
    return torch.relu(z) if relu else z


def bn_act_graph(y, weight, bias, residual, relu, training, mean, invstd):
    """out = act(xhat * weight + bias + residual); in training xhat uses y's own batch statistics."""
    if training:
        var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
        invstd = torch.rsqrt(var + EPS)
    z = (y - per_channel(mean)) * per_channel(invstd) * per_channel(weight) + per_channel(bias)
    if residual is not None:
        z = z + residual
    return torch.relu(z) if relu else z


def reference_bn_act_backward(grad_out, y, weight, bias, residual, relu, training, mean, invstd):
    """float64 autograd through bn_act_graph: (out, grad_y, grad_residual, grad_weight, grad_bias)."""
    y64 = y.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    b64 = bias.double().requires_grad_()
    r64 = residual.double().requires_grad_()
    out = bn_act_graph(y64, w64, b64, r64, relu, training, mean.double(), invstd.double())
    grads = torch.autograd.grad(out, (y64, r64, w64, b64), grad_out.double())
    return (out.detach(),) + tuple(g.detach() for g in grads)


def aten_bn_act_backward(grad_out, y, weight, bias, residual, relu, training, mean, invstd):
    """The same backward computed by ATen in y's dtype: F.batch_norm's own kernels in training, the
    elementwise eval formula in that dtype otherwise."""
    dtype = y.dtype
    yd = y.detach().clone().requires_grad_()
    rd = residual.detach().clone().requires_grad_()
    if training:
        wd = weight.detach().clone().requires_grad_()  # fp32 affine params: ATen's mixed-dtype batch norm
        bd = bias.detach().clone().requires_grad_()
        z = F.batch_norm(yd, None, None, wd, bd, True, 0.0, EPS)
    else:
        wd = weight.to(dtype).requires_grad_()
        bd = bias.to(dtype).requires_grad_()
        z = (yd - per_channel(mean.to(dtype))) * per_channel(invstd.to(dtype)) * per_channel(wd) + per_channel(bd)
    z = z + rd
    out = torch.relu(z) if relu else z
    return torch.autograd.grad(out, (yd, rd, wd, bd), grad_out)


# ---- the checks, shared by the CPU tests and TestCUDA --------------------------------------------------------

def check_fold_bn(device, dtype, layout, with_bias):
    stat = stat_dtype(dtype)
    w = torch.randn(13, 3, 3, 3, dtype=torch.float64, device=device).to(dtype)
    if layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # every other input channel of a wider weight: not dense
        wide = torch.zeros(13, 6, 3, 3, dtype=dtype, device=device)
        wide[:, ::2] = w
        w = wide[:, ::2]
    elif layout == "transposed":  # dense, but dim 0 is not outermost
        w = w.transpose(0, 1).contiguous().transpose(0, 1)
    b = torch.randn(13, dtype=stat, device=device) if with_bias else None
    gamma = torch.rand(13, dtype=stat, device=device) + 0.5
    beta = torch.randn(13, dtype=stat, device=device)
    mean = torch.randn(13, dtype=stat, device=device)
    var = torch.rand(13, dtype=stat, device=device) + 0.1
    snap = snapshot(w, b, gamma, beta, mean, var)
    w_out, b_out = ops._fold_bn(w, b, gamma, beta, mean, var, EPS)
    assert_unchanged(snap)
    assert w_out.dtype == dtype and b_out.dtype == dtype and b_out.shape == (13,)
    assert w_out.stride() == torch.empty_like(w).stride(), "the folded weight must keep conv_weight's layout"
    ref_w, ref_b = reference_fold_bn(w, b, gamma, beta, mean, var, EPS, torch.float64)
    aten_w, aten_b = reference_fold_bn(w, b, gamma, beta, mean, var, EPS, dtype)
    check_close("weight", w_out, ref_w, aten_w)
    check_close("bias", b_out, ref_b, aten_b)


def check_add_relu(device, dtype, layout, shape, residual_layout=None):
    x = randn(shape, dtype, device, layout)
    r = randn(shape, dtype, device, residual_layout or layout)
    snap = snapshot(x, r)
    out = ops._add_relu(x, r)
    assert_unchanged(snap)
    assert out.dtype == dtype
    assert_format("out", out, expected_format(layout))
    ref = torch.relu(x.double() + r.double())
    check_close("out", out, ref, torch.relu(x + r))


def check_bn_act_forward(device, dtype, layout, shape):
    c = shape[1]
    stat = stat_dtype(dtype)
    y = randn(shape, dtype, device, layout)
    residual = randn(shape, dtype, device, layout)
    scale = torch.randn(c, dtype=stat, device=device)
    shift = torch.randn(c, dtype=stat, device=device)
    center = torch.randn(c, dtype=stat, device=device)
    for use_scale, use_shift, use_residual, relu, use_center in itertools.product([True, False], repeat=5):
        args = (y, scale if use_scale else None, shift if use_shift else None, residual if use_residual else None)
        snap = snapshot(*args, center)
        out = ops._bn_act_forward(*args, relu, center if use_center else None)
        assert_unchanged(snap)
        name = f"out(scale={use_scale}, shift={use_shift}, residual={use_residual}, relu={relu}, center={use_center})"
        assert out.dtype == dtype and out.shape == y.shape
        assert_format(name, out, expected_format(layout))
        check_close(name, out, reference_bn_act_forward(*args, relu, torch.float64, center if use_center else None),
                    reference_bn_act_forward(*args, relu, dtype, center if use_center else None))


def bn_backward_inputs(device, dtype, layout, shape, training):
    c = shape[1]
    stat = stat_dtype(dtype)
    y = randn(shape, dtype, device, layout)
    grad_out = randn(shape, dtype, device, layout)
    residual = randn(shape, dtype, device, layout)
    weight = torch.rand(c, dtype=stat, device=device) + 0.5
    bias = torch.randn(c, dtype=stat, device=device)
    if training:  # the batch statistics, as the forward saved them
        var, mean = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
        mean, invstd = mean.to(stat), torch.rsqrt(var + EPS).to(stat)
    else:  # running statistics
        mean = torch.randn(c, dtype=stat, device=device)
        invstd = torch.rsqrt(torch.rand(c, dtype=stat, device=device) + 0.25)
    return grad_out, y, weight, bias, residual, mean, invstd


def check_bn_act_backward(device, dtype, layout, shape):
    fmt = expected_format(layout)
    for training, relu, residual_grad, no_weight in itertools.product([True, False], repeat=4):
        grad_out, y, weight, bias, residual, mean, invstd = bn_backward_inputs(device, dtype, layout, shape, training)
        if no_weight:
            weight = torch.ones_like(weight)
        ref_out, ref_gy, ref_gr, ref_gw, ref_gb = reference_bn_act_backward(
            grad_out, y, weight, bias, residual, relu, training, mean, invstd)
        out = to_layout(ref_out.to(dtype), layout)
        args = (grad_out, out, y, mean, invstd, None if no_weight else weight)
        snap = snapshot(*args)
        gy, gr, gw, gb = ops._bn_act_backward(*args, relu, training, residual_grad)
        assert_unchanged(snap)
        tag = f"(training={training}, relu={relu}, residual_grad={residual_grad}, weight={not no_weight})"
        assert gy.dtype == dtype and gw.dtype == stat_dtype(dtype) and gb.dtype == stat_dtype(dtype)
        assert gw.shape == gb.shape == (shape[1],)
        assert_format("grad_y" + tag, gy, fmt)
        aten_gy, aten_gr, aten_gw, aten_gb = aten_bn_act_backward(
            grad_out, y, weight, bias, residual, relu, training, mean, invstd)
        check_close("grad_y" + tag, gy, ref_gy, aten_gy)
        check_close("grad_weight" + tag, gw, ref_gw, aten_gw)
        check_close("grad_bias" + tag, gb, ref_gb, aten_gb)
        if residual_grad:
            assert gr.dtype == dtype
            assert_format("grad_residual" + tag, gr, fmt)
            check_close("grad_residual" + tag, gr, ref_gr, aten_gr)
        else:
            assert gr.numel() == 0 and gr.dtype == dtype and gr.device == y.device


def backward_outputs(device, layout, shape, dtype=torch.float32):
    grad_out, y, weight, bias, residual, mean, invstd = bn_backward_inputs(device, dtype, layout, shape, True)
    out = torch.relu(y)
    return lambda training: ops._bn_act_backward(grad_out, out, y, mean, invstd, weight, True, training, True)


def check_deterministic(device, layout, shape):
    run = backward_outputs(device, layout, shape)
    for training in (True, False):
        first, second = run(training), run(training)
        for a, b in zip(first, second):
            assert torch.equal(a, b), "two runs of _bn_act_backward differ"


def opcheck_samples(device):
    shape = (2, 5, 3, 3)
    for layout in ("contiguous", "channels_last"):
        y = randn(shape, torch.float32, device, layout)
        r = randn(shape, torch.float32, device, "contiguous")
        s = torch.rand(5, device=device)
        b = torch.randn(5, device=device)
        yield ops._add_relu.default, (y, r)
        yield ops._bn_act_forward.default, (y, s, b, r, True)
        yield ops._bn_act_forward.default, (y, None, None, None, False)
        for residual_grad in (True, False):
            yield ops._bn_act_backward.default, (r, torch.relu(y), y, b, s + 0.5, s, True, True, residual_grad)
        yield ops._bn_act_backward.default, (r, y, y, b, s + 0.5, None, False, False, False)
    w = randn((4, 3, 3, 3), torch.float32, device, "channels_last")
    p = torch.rand(4, device=device) + 0.5
    yield ops._fold_bn.default, (w, None, p, p, p, p, EPS)
    yield ops._fold_bn.default, (w.contiguous(), p, p, p, p, p, EPS)


# ---- statistics, dual apply, mask ---------------------------------------------------------------------------

def bn_stats_reference(y, weight, bias, running_mean, running_var, momentum, dtype):
    """(mean, invstd, scale, shift, new_running_mean, new_running_var) of y's values, computed in `dtype`."""
    var, mean = torch.var_mean(y.to(dtype), dim=(0, 2, 3), correction=0)
    n = y.numel() // y.shape[1]
    invstd = torch.rsqrt(var + EPS)
    scale = weight.to(dtype) * invstd
    shift = bias.to(dtype)  # the centered apply's, on the exact mean (see _bn_stats)
    new_rm = momentum * mean + (1 - momentum) * running_mean.to(dtype)
    new_rv = momentum * var * (n / (n - 1)) + (1 - momentum) * running_var.to(dtype)
    return mean, invstd, scale, shift, new_rm, new_rv


def bn_stats_aten(y, weight, bias, running_mean, running_var, momentum):
    """The same quantities from ATen's own training batch norm in y's dtype (statistics in fp32 or fp64)."""
    rm, rv = running_mean.clone(), running_var.clone()
    _, mean, invstd = torch.ops.aten.native_batch_norm(y, weight, bias, rm, rv, True, momentum, EPS)
    scale = weight.to(mean.dtype) * invstd
    return mean, invstd, scale, bias.to(mean.dtype), rm, rv  # centered on ATen's mean as it is


def value_at_mean(mean64, mean, scale, shift):
    """The centered apply (y - mean) * scale + shift of _bn_stats's coefficients at y = the exact mean, in float64:
    the bias, less what the mean lost in its rounding times scale where shift does not make up for it."""
    return (mean64 - mean.double()) * scale.double() + shift.double()


def check_bn_stats(device, dtype, layout, shape, momentum=0.1, running_dtype=None):
    c = shape[1]
    stat = stat_dtype(dtype)
    running_dtype = running_dtype or stat
    # An offset mean: a one-pass sum of squares would lose digits here, Welford and Chan's merge do not.
    y = to_layout((torch.randn(shape, dtype=torch.float64, device=device) * 2 + 3).to(dtype), layout)
    weight = torch.rand(c, dtype=stat, device=device) + 0.5
    bias = torch.randn(c, dtype=stat, device=device)
    running_mean = torch.randn(c, device=device).to(running_dtype)
    running_var = (torch.rand(c, device=device) + 0.5).to(running_dtype)
    snap = snapshot(y, weight, bias, running_mean, running_var)
    got = ops._bn_stats(y, weight, bias, running_mean, running_var, momentum, EPS)
    assert_unchanged(snap)
    names = ("mean", "invstd", "scale", "shift", "running_mean", "running_var")
    for name, t in zip(names, got):
        want = running_dtype if name.startswith("running") else stat
        assert t.dtype == want and t.shape == (c,) and t.device == y.device, name
    ref = bn_stats_reference(y, weight, bias, running_mean, running_var, momentum, torch.float64)
    aten = bn_stats_aten(y, weight.to(running_dtype), bias.to(running_dtype), running_mean, running_var, momentum)
    for name, g, r, a in zip(names, got, ref, aten):
        if name == "shift":  # held as the apply's value at the exact mean (ATen's: centered on its own mean)
            g = value_at_mean(ref[0], got[0], got[2], g).to(g.dtype)
            a = value_at_mean(ref[0], aten[0].to(g.dtype), aten[2].to(g.dtype), a.to(g.dtype)).to(g.dtype)
            check_close(f"apply value at the mean(momentum={momentum})", g, r, a)
            continue
        check_close(f"{name}(momentum={momentum})", g, r, a.to(g.dtype))
    # Without affine parameters and running statistics: the same statistics, the apply's value at the mean 0.
    mean, invstd, scale, shift, rm, rv = ops._bn_stats(y, None, None, None, None, momentum, EPS)
    torch.testing.assert_close(mean, got[0], rtol=0, atol=0)
    torch.testing.assert_close(scale, invstd, rtol=0, atol=0)
    check_close("apply value at the mean (no affine)", value_at_mean(ref[0], mean, scale, shift).to(shift.dtype),
                torch.zeros_like(ref[0]), value_at_mean(ref[0], aten[0], aten[1], torch.zeros_like(shift)).to(
                    shift.dtype))
    assert rm.numel() == 0 and rv.numel() == 0


def reference_dual_apply(y, scale, shift, r, r_scale, r_shift, relu, dtype, center=None, r_center=None):
    y, r = y.to(dtype), r.to(dtype)
    if center is not None:
        y = y - per_channel(center.to(dtype))
    if r_center is not None:
        r = r - per_channel(r_center.to(dtype))
    z = y * per_channel(scale.to(dtype)) + per_channel(shift.to(dtype)) + (
        r * per_channel(r_scale.to(dtype)) + per_channel(r_shift.to(dtype)))
    return torch.relu(z) if relu else z


def memory_order_matrix(t):
    """t's values as the [rows, cols] matrix of its memory layout (see _compiled.relu_mask_shape): a 1x1 map's rows
    are its pixels whatever the strides of its size-1 dims."""
    n, c, h, w = t.shape
    if h * w == 1 or _compiled.suggest_memory_format(t) == torch.channels_last:
        return t.permute(0, 2, 3, 1).reshape(n * h * w, c)
    return t.reshape(n * c, h * w)


def unpack_mask(mask, cols):
    bits = (mask.long().unsqueeze(-1) >> torch.arange(8, device=mask.device)) & 1
    bits = bits.reshape(mask.shape[0], -1)
    return bits[:, :cols].bool(), bits[:, cols:]


def check_relu_mask(out, mask):
    """The mask holds exactly threshold_backward's pass-through set of the stored output: !(out <= 0)."""
    matrix = memory_order_matrix(out)
    assert mask.dtype == torch.uint8 and tuple(mask.shape) == _compiled.relu_mask_shape(out)
    bits, padding = unpack_mask(mask, matrix.shape[1])
    assert torch.equal(bits, ~(matrix <= 0)), "mask bits differ from the output's sign"
    assert not padding.any(), "bits past a row's end must be 0"


def check_bn_apply(device, dtype, layout, shape):
    c = shape[1]
    stat = stat_dtype(dtype)
    y = randn(shape, dtype, device, layout)
    r = randn(shape, dtype, device, layout)
    scale, shift, r_scale, r_shift = (torch.randn(c, dtype=stat, device=device) for _ in range(4))
    for relu, mask in ((True, True), (True, False), (False, False)):
        snap = snapshot(y, r, scale, shift, r_scale, r_shift)
        out, bits = ops._bn_apply(y, scale, shift, r, r_scale, r_shift, relu, mask)
        assert_unchanged(snap)
        name = f"dual out(relu={relu}, mask={mask})"
        assert out.dtype == dtype and out.shape == y.shape
        assert_format(name, out, expected_format(layout))
        check_close(name, out, reference_dual_apply(y, scale, shift, r, r_scale, r_shift, relu, torch.float64),
                    reference_dual_apply(y, scale, shift, r, r_scale, r_shift, relu, dtype))
        if mask:
            check_relu_mask(out, bits)
        else:
            assert bits.numel() == 0 and bits.dtype == torch.uint8
        # The plain form through _bn_apply is _bn_act_forward, bit for bit, and writes the same mask.
        plain, plain_bits = ops._bn_apply(y, scale, shift, r, None, None, relu, mask)
        assert torch.equal(plain, ops._bn_act_forward(y, scale, shift, r, relu))
        if mask:
            check_relu_mask(plain, plain_bits)
        # Centered (a BN's apply: y less its mean, r less its own), and with one center only.
        for center, r_center in ((shift, r_shift), (shift, None), (None, r_shift)):
            name = f"centered dual out(relu={relu}, mask={mask}, center={center is not None}, " \
                   f"r_center={r_center is not None})"
            out, bits = ops._bn_apply(y, scale, shift, r, r_scale, r_shift, relu, mask, center, r_center)
            check_close(name, out, reference_dual_apply(y, scale, shift, r, r_scale, r_shift, relu, torch.float64,
                                                        center, r_center),
                        reference_dual_apply(y, scale, shift, r, r_scale, r_shift, relu, dtype, center, r_center))
            if mask:
                check_relu_mask(out, bits)


def dual_graph(y, weight, bias, r, r_weight, r_bias, relu, training, stats):
    """act(bn(y) + bn_r(r)); in training each BN uses its input's batch statistics, else `stats`."""
    def bn(v, w, b, mean, invstd):
        if training:
            var, mean = torch.var_mean(v, dim=(0, 2, 3), correction=0)
            invstd = torch.rsqrt(var + EPS)
        return (v - per_channel(mean)) * per_channel(invstd) * per_channel(w) + per_channel(b)
    z = bn(y, weight, bias, stats[0], stats[1]) + bn(r, r_weight, r_bias, stats[2], stats[3])
    return torch.relu(z) if relu else z


def check_bn_apply_backward_dual(device, dtype, layout, shape):
    c = shape[1]
    stat = stat_dtype(dtype)
    for training, relu, residual_grad in itertools.product([True, False], repeat=3):
        y, r, g = (randn(shape, dtype, device, layout) for _ in range(3))
        weight, r_weight = (torch.rand(c, dtype=stat, device=device) + 0.5 for _ in range(2))
        bias, r_bias = (torch.randn(c, dtype=stat, device=device) for _ in range(2))
        if training:
            var, mean = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
            r_var, r_mean = torch.var_mean(r.double(), dim=(0, 2, 3), correction=0)
            stats = [mean, torch.rsqrt(var + EPS), r_mean, torch.rsqrt(r_var + EPS)]
        else:
            stats = [torch.randn(c, dtype=torch.float64, device=device),
                     torch.rsqrt(torch.rand(c, dtype=torch.float64, device=device) + 0.25)] * 2
        stats = [s.to(stat) for s in stats]
        leaves64 = [t.double().requires_grad_() for t in (y, r, weight, bias, r_weight, r_bias)]
        y64, r64, w64, b64, rw64, rb64 = leaves64
        out64 = dual_graph(y64, w64, b64, r64, rw64, rb64, relu, training, [s.double() for s in stats])
        ref = torch.autograd.grad(out64, leaves64, g.double())
        # ATen in the test dtype: F.batch_norm's own training kernels (fp32 affine), eval formula in the dtype.
        leaves = [t.detach().clone().requires_grad_() for t in (y, r, weight, bias, r_weight, r_bias)]
        if training:
            z = (F.batch_norm(leaves[0], None, None, leaves[2], leaves[3], True, 0.0, EPS)
                 + F.batch_norm(leaves[1], None, None, leaves[4], leaves[5], True, 0.0, EPS))
            aten_out = torch.relu(z) if relu else z
        else:
            aten_out = dual_graph(leaves[0], leaves[2].to(dtype), leaves[3].to(dtype), leaves[1], leaves[4].to(dtype),
                                  leaves[5].to(dtype), relu, False, [s.to(dtype) for s in stats])
        aten = torch.autograd.grad(aten_out, leaves, g)
        out = to_layout(out64.detach().to(dtype), layout)
        args = (g, out, None, y, stats[0], stats[1], weight, r, stats[2], stats[3], r_weight)
        snap = snapshot(g, out, y, r, *stats, weight, r_weight)
        gy, gr, gw, gb, grw, grb = ops._bn_apply_backward(*args, relu, training, residual_grad)
        assert_unchanged(snap)
        tag = f"(training={training}, relu={relu}, residual_grad={residual_grad})"
        assert_format("grad_y" + tag, gy, expected_format(layout))
        low = dtype in (torch.float16, torch.bfloat16) and relu  # see test_ops._outputs_to_compare
        named = [("grad_y", gy, ref[0], aten[0]), ("grad_weight", gw, ref[2], aten[2]),
                 ("grad_bias", gb, ref[3], aten[3]), ("grad_r_weight", grw, ref[4], aten[4]),
                 ("grad_r_bias", grb, ref[5], aten[5])]
        if residual_grad:
            assert_format("grad_r" + tag, gr, expected_format(layout))
            named.append(("grad_r", gr, ref[1], aten[1]))
        else:
            assert gr.numel() == 0
        if not low:
            for name, got, r64, a in named:
                check_close(name + tag, got, r64, a.to(got.dtype))
        # The mask gives the same gradients as the output, bit for bit.
        if relu:
            _, bits = ops._bn_apply(out, None, None, None, None, None, True, True)  # relu(out) == out
            masked = ops._bn_apply_backward(g, None, bits, *args[3:], relu, training, residual_grad)
            for a, b in zip(masked, (gy, gr, gw, gb, grw, grb)):
                assert torch.equal(a, b), "the mask and the output give different gradients"


def check_mask_backward_plain(device, dtype, layout, shape):
    """Non-dual _bn_apply_backward with a mask == _bn_act_backward with the output, bit for bit."""
    for training, residual_grad in itertools.product([True, False], repeat=2):
        grad_out, y, weight, bias, residual, mean, invstd = bn_backward_inputs(device, dtype, layout, shape, training)
        scale = weight * invstd
        out, bits = ops._bn_apply(y, scale, bias - mean * scale, residual, None, None, True, True)
        want = ops._bn_act_backward(grad_out, out, y, mean, invstd, weight, True, training, residual_grad)
        got = ops._bn_apply_backward(grad_out, None, bits, y, mean, invstd, weight, None, None, None, None, True,
                                     training, residual_grad)
        for a, b in zip(got[:4], want):
            assert torch.equal(a, b)
        assert got[4].numel() == 0 and got[5].numel() == 0


def new_kernel_outputs(device, layout, shape, dtype=torch.float32):
    """Every new kernel once on fixed inputs (drawn on the CPU, so every device gets the same): for the determinism
    and CPU/GPU agreement checks."""
    c = shape[1]
    y, r, g = (randn(shape, dtype, "cpu", layout).to(device) for _ in range(3))
    w, b = (torch.rand(c) + 0.5).to(device, stat_dtype(dtype)), torch.randn(c).to(device, stat_dtype(dtype))
    rm, rv = torch.zeros_like(w), torch.ones_like(w)

    def run():
        mean, invstd, scale, shift, nrm, nrv = ops._bn_stats(y, w, b, rm, rv, 0.1, EPS)
        out, bits = ops._bn_apply(y, scale, shift, r, scale, shift, True, True, mean, mean)
        grads = ops._bn_apply_backward(g, None, bits, y, mean, invstd, w, r, mean, invstd, w, True, True, True)
        return (mean, invstd, scale, shift, nrm, nrv, out, bits) + tuple(grads)
    return run


def opcheck_new_samples(device):
    shape = (2, 5, 3, 3)
    for layout in ("contiguous", "channels_last"):
        y = randn(shape, torch.float32, device, layout)
        r = randn(shape, torch.float32, device, "contiguous")
        s, b = torch.rand(5, device=device) + 0.5, torch.randn(5, device=device)
        yield ops._bn_stats.default, (y, s, b, b.clone(), s.clone(), 0.1, EPS)
        yield ops._bn_stats.default, (y, None, None, None, None, 0.1, EPS)
        yield ops._bn_stats.default, (y.bfloat16(), s, b, b.clone(), s.clone(), 0.5, EPS)
        yield ops._bn_apply.default, (y, s, b, r, s, b, True, True)
        yield ops._bn_apply.default, (y, s, b, None, None, None, False, False)
        _, bits = ops._bn_apply(y, s, b, r, s, b, True, True)
        yield ops._bn_apply_backward.default, (r, None, bits, y, b, s, s, r, b, s, s, True, True, True)
        yield ops._bn_apply_backward.default, (r, y, None, y, b, s, None, None, None, None, None, True, False, True)
        yield ops._bn_apply_backward.default, (r, None, None, y, b, s, s, y, b, s, None, False, True, False)


# ---- CPU tests ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fold_bn(dtype, layout, with_bias):
    check_fold_bn("cpu", dtype, layout, with_bias)


@pytest.mark.parametrize("layout, shape", LAYOUT_SHAPES + [(layout, shape) for layout in ("contiguous", "channels_last")
                                                              for shape in LARGE_SHAPES], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_relu(dtype, layout, shape):
    check_add_relu("cpu", dtype, layout, shape)


# Every class of value a ReLU must treat as torch.relu does: signed zeros, NaN of either sign (payloads kept),
# infinities, subnormals.
SPECIAL_VALUES = [1.0, -1.0, 0.0, -0.0, float("nan"), -float("nan"), float("inf"), -float("inf"), 1e-40, -1e-40,
                  3e38, -3e38]


@pytest.mark.parametrize("layout, shape", LAYOUT_SHAPES + [(layout, shape) for layout in ("contiguous", "channels_last")
                                                              for shape in LARGE_SHAPES], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_relu_in_place(dtype, layout, shape):
    """_relu_ (the CPU eval path's ReLU after each oneDNN conv): torch.relu's values bit for bit (NaN payloads
    included), written over x itself, its version bumped, the rest of a strided view's storage untouched."""
    x = randn(shape, dtype, "cpu", layout)
    flat = x.view(-1) if x.is_contiguous() else None
    if flat is not None:  # the special values, where the layout lets them be placed by flat index
        specials = torch.tensor(SPECIAL_VALUES).to(dtype)
        flat[:specials.numel()] = specials[:flat.numel()]
    storage_before = x.untyped_storage().clone() if layout.startswith("sliced") or layout == "offset" else None
    expected = torch.relu(x)
    version = x._version
    assert ops._relu_(x) is None and x._version > version
    torch.testing.assert_close(x, expected, rtol=0, atol=0, equal_nan=True)
    # NaN keeps its bits (the sign and payload of the input's NaN)
    nan = torch.isnan(expected)
    bits = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}[dtype]
    assert torch.equal(x[nan].view(bits), expected[nan].view(bits))
    if storage_before is not None:  # the storage outside the view: untouched
        base = torch.empty(0, dtype=dtype).set_(x.untyped_storage())
        outside = torch.ones(base.numel(), dtype=torch.bool)
        outside[torch.arange(base.numel()).as_strided(x.shape, x.stride(), x.storage_offset()).reshape(-1)] = False
        old = torch.empty(0, dtype=dtype).set_(storage_before)
        assert torch.equal(base[outside].view(bits), old[outside].view(bits))


def test_relu_in_place_refuses_what_autograd_or_inference_mode_forbid():
    leaf = torch.randn(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="requires grad"):
        ops._relu_(leaf)
    with torch.no_grad():
        ops._relu_(leaf.bfloat16().requires_grad_())  # under no_grad, as the eval paths run
    with torch.inference_mode():
        frozen = torch.randn(4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        ops._relu_(frozen)  # an inference tensor outside inference mode, as ATen's relu_ refuses it
    with pytest.raises(RuntimeError, match="floating point"):
        ops._relu_(torch.ones(4, dtype=torch.int32))


@pytest.mark.parametrize("x_layout, r_layout", [("channels_last", "contiguous"), ("contiguous", "channels_last"),
                                                ("sliced", "channels_last")])
def test_add_relu_mixed_layouts(x_layout, r_layout):
    check_add_relu("cpu", torch.float32, x_layout, (2, 13, 5, 7), residual_layout=r_layout)


@pytest.mark.parametrize("layout, shape", LAYOUT_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_act_forward(dtype, layout, shape):
    check_bn_act_forward("cpu", dtype, layout, shape)


@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_bn_act_forward_large(dtype, layout, shape):
    check_bn_act_forward("cpu", dtype, layout, shape)


@pytest.mark.parametrize("layout, shape", LAYOUT_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_act_backward(dtype, layout, shape):
    check_bn_act_backward("cpu", dtype, layout, shape)


@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_bn_act_backward_large(dtype, layout, shape):
    check_bn_act_backward("cpu", dtype, layout, shape)


def test_bn_act_forward_mixed_layouts():
    """A residual in another layout than y is read correctly; the output follows y."""
    y = randn((2, 13, 5, 7), torch.float32, "cpu", "channels_last")
    r = randn((2, 13, 5, 7), torch.float32, "cpu", "contiguous")
    s, b = torch.randn(13), torch.randn(13)
    out = ops._bn_act_forward(y, s, b, r, True)
    assert_format("out", out, torch.channels_last)
    torch.testing.assert_close(out, torch.relu(y * per_channel(s) + per_channel(b) + r))


def test_bn_act_backward_mixed_layouts():
    """grad_out and out in another layout than y: outputs follow y, values match the all-NCHW call."""
    grad_out, y, weight, _, _, mean, invstd = bn_backward_inputs("cpu", torch.float32, "channels_last", (2, 13, 5, 7),
                                                                 True)
    out = torch.relu(y)
    got = ops._bn_act_backward(grad_out.contiguous(), out.contiguous(), y, mean, invstd, weight, True, True, True)
    want = ops._bn_act_backward(grad_out, out, y, mean, invstd, weight, True, True, True)
    assert_format("grad_y", got[0], torch.channels_last)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bn_act_per_channel_params_in_other_dtypes():
    """scale/shift/mean/invstd/weight in another floating dtype are converted to the math dtype."""
    y = randn((2, 5, 3, 3), torch.float32, "cpu")
    s, b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.bfloat16)
    torch.testing.assert_close(ops._bn_act_forward(y, s, b, None, False),
                               ops._bn_act_forward(y, s.float(), b.float(), None, False), rtol=0, atol=0)


def test_empty_batch():
    y = torch.empty(0, 4, 3, 3)
    s = torch.ones(4)
    assert ops._bn_act_forward(y, s, s, None, True).shape == y.shape
    assert ops._add_relu(y, y).shape == y.shape
    gy, gr, gw, gb = ops._bn_act_backward(y, y, y, s, s, s, True, True, True)
    assert gy.shape == y.shape and gr.shape == y.shape
    assert torch.equal(gw, torch.zeros(4)) and torch.equal(gb, torch.zeros(4))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_deterministic(layout):
    check_deterministic("cpu", layout, (4, 13, 45, 47))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_independent_of_thread_count(layout):
    run = backward_outputs("cpu", layout, (4, 13, 45, 47))
    y = randn((4, 13, 45, 47), torch.float32, "cpu", layout)
    s, b = torch.randn(13), torch.randn(13)
    threads = torch.get_num_threads()
    results = {}
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results[n] = run(True) + run(False) + (ops._bn_act_forward(y, s, b, y, True), ops._add_relu(y, y))
    finally:
        torch.set_num_threads(threads)
    for n in (2, 3):
        for a, b in zip(results[1], results[n]):
            assert torch.equal(a, b), f"results with {n} threads differ from 1 thread"


def test_bad_arguments():
    y = torch.randn(2, 4, 3, 3)
    c4 = torch.ones(4)
    with pytest.raises(RuntimeError, match="y must be 4-D"):
        ops._bn_act_forward(y[0], c4, c4, None, True)
    with pytest.raises(RuntimeError, match=r"scale must have shape \[4\]"):
        ops._bn_act_forward(y, torch.ones(3), c4, None, True)
    with pytest.raises(RuntimeError, match=r"shift must have shape \[4\]"):
        ops._bn_act_forward(y, c4, torch.ones(4, 1), None, True)
    with pytest.raises(RuntimeError, match="residual must have y's shape"):
        ops._bn_act_forward(y, c4, c4, torch.randn(2, 4, 3, 4), True)
    with pytest.raises(RuntimeError, match="residual must have y's dtype"):
        ops._bn_act_forward(y, c4, c4, y.double(), True)
    with pytest.raises(RuntimeError, match="y must be float32, float64, float16 or bfloat16"):
        ops._bn_act_forward(y.int(), c4, c4, None, True)
    with pytest.raises(RuntimeError, match="scale must be a floating-point tensor"):
        ops._bn_act_forward(y, c4.long(), c4, None, True)
    with pytest.raises(RuntimeError, match="residual must have x's shape"):
        ops._add_relu(y, y[:1])
    with pytest.raises(RuntimeError, match="residual must have x's dtype"):
        ops._add_relu(y, y.half())
    with pytest.raises(RuntimeError, match="grad_out must have y's shape"):
        ops._bn_act_backward(y[:1], y, y, c4, c4, c4, True, True, True)
    with pytest.raises(RuntimeError, match="out must have y's shape"):
        ops._bn_act_backward(y, y[:1], y, c4, c4, c4, True, True, True)
    with pytest.raises(RuntimeError, match=r"invstd must have shape \[4\]"):
        ops._bn_act_backward(y, y, y, c4, torch.ones(5), c4, True, True, True)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[4\]"):
        ops._bn_act_backward(y, y, y, c4, c4, torch.ones(2), True, True, True)
    with pytest.raises(RuntimeError, match="conv_weight must be 4-D"):
        ops._fold_bn(torch.randn(4, 3), None, c4, c4, c4, c4, EPS)
    with pytest.raises(RuntimeError, match=r"running_var must have shape \[4\]"):
        ops._fold_bn(torch.randn(4, 3, 1, 1), None, c4, c4, c4, torch.ones(3), EPS)
    with pytest.raises(RuntimeError, match=r"conv_bias must have shape \[4\]"):
        ops._fold_bn(torch.randn(4, 3, 1, 1), torch.ones(5), c4, c4, c4, c4, EPS)


def test_without_relu_out_is_not_read():
    """With relu=False the forward output is not needed: an empty placeholder is accepted."""
    _, y, weight, _, _, mean, invstd = bn_backward_inputs("cpu", torch.float32, "contiguous", (2, 4, 3, 3), False)
    g = torch.randn_like(y)
    got = ops._bn_act_backward(g, torch.empty(0), y, mean, invstd, weight, False, False, True)
    want = ops._bn_act_backward(g, y, y, mean, invstd, weight, False, False, True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


STAT_SHAPES = SHAPES + LARGE_SHAPES + [(1, 8, 1, 2)]  # the last: two values per channel, the fewest training allows


@pytest.mark.parametrize("layout, shape", LAYOUT_SHAPES + [(layout, shape) for layout in ("contiguous", "channels_last")
                                                              for shape in LARGE_SHAPES + [(1, 8, 1, 2)]], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_stats(dtype, layout, shape):
    check_bn_stats("cpu", dtype, layout, shape)


@pytest.mark.parametrize("momentum", [0.0, 1 / 3, 1.0])  # 1/3: momentum=None's cumulative average at the third batch
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bn_stats_momentum(layout, momentum):
    check_bn_stats("cpu", torch.float32, layout, (2, 13, 5, 7), momentum)


@pytest.mark.parametrize("dtype, running_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                  (torch.float16, torch.float32)], ids=str)
def test_bn_stats_running_stats_dtype(dtype, running_dtype):
    """The running statistics come back in the dtype they are kept in (a .half() model keeps them in fp16)."""
    check_bn_stats("cpu", dtype, "channels_last", (2, 13, 5, 7), running_dtype=running_dtype)


def test_bn_stats_matches_batch_norm_over_steps():
    """Three training steps of running statistics: as nn.BatchNorm2d's, with momentum and with momentum=None
    (the caller passes 1 / num_batches_tracked)."""
    for momentum in (0.1, None):
        bn = torch.nn.BatchNorm2d(13, momentum=momentum)
        rm, rv = bn.running_mean.clone(), bn.running_var.clone()
        for step in range(1, 4):
            y = torch.randn(3, 13, 6, 5).contiguous(memory_format=torch.channels_last) * step + step
            bn(y)
            factor = 1.0 / step if momentum is None else momentum
            ref = bn_stats_reference(y, bn.weight, bn.bias, rm, rv, factor, torch.float64)
            _, _, _, _, rm, rv = ops._bn_stats(y, bn.weight.detach(), bn.bias.detach(), rm, rv, factor, bn.eps)
            assert_within(f"running_mean(step {step}, momentum={momentum})", rm, ref[4], bn.running_mean)
            assert_within(f"running_var(step {step}, momentum={momentum})", rv, ref[5], bn.running_var)


def test_bn_stats_empty_batch():
    """No values: the running statistics are left as they are (as BatchNorm2d does on an empty batch)."""
    y = torch.empty(0, 4, 3, 3)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    mean, invstd, scale, shift, nrm, nrv = ops._bn_stats(y, None, None, rm, rv, 0.1, EPS)
    assert torch.equal(nrm, rm) and torch.equal(nrv, rv) and torch.equal(mean, torch.zeros(4))


@pytest.mark.parametrize("layout, shape", LAYOUT_SHAPES + [("channels_last", LARGE_SHAPES[0]),
                                                           ("contiguous", LARGE_SHAPES[1])], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_apply(dtype, layout, shape):
    check_bn_apply("cpu", dtype, layout, shape)


def test_relu_mask_of_special_values():
    """NaN passes the gradient (threshold_backward does), zero and negative values do not; tails of rows whose
    length is not a multiple of 8."""
    y = torch.tensor([0.0, -0.0, 1e-30, -1e-30, float("nan"), float("inf"), -float("inf"), 2.0, -3.0, 5.0, 0.0])
    for dtype in DTYPES:
        for layout in ("contiguous", "channels_last"):
            t = to_layout(y.to(dtype).repeat(2, 3, 1).view(2, 3, 1, 11), layout)
            out, bits = ops._bn_apply(t, None, None, None, None, None, True, True)
            check_relu_mask(out, bits)


@pytest.mark.parametrize("layout, shape", LAYOUT_SHAPES + [("channels_last", LARGE_SHAPES[0]),
                                                           ("contiguous", LARGE_SHAPES[1])], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_apply_backward_dual(dtype, layout, shape):
    check_bn_apply_backward_dual("cpu", dtype, layout, shape)


@pytest.mark.parametrize("layout, shape", [("contiguous", SHAPES[0]), ("channels_last", SHAPES[1]),
                                           ("channels_last", LARGE_SHAPES[0]), ("contiguous", LARGE_SHAPES[1])],
                         ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_backward_equals_output_backward(dtype, layout, shape):
    check_mask_backward_plain("cpu", dtype, layout, shape)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_new_kernels_deterministic_and_thread_independent(layout):
    run = new_kernel_outputs("cpu", layout, (4, 13, 45, 47))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 2, 3):
            torch.set_num_threads(n)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b), "results differ between runs or thread counts"


def test_new_kernels_bad_arguments():
    y = torch.randn(2, 4, 3, 3)
    c4 = torch.ones(4)
    with pytest.raises(RuntimeError, match="y must be 4-D"):
        ops._bn_stats(y[0], None, None, None, None, 0.1, EPS)
    with pytest.raises(RuntimeError, match=r"running_var must have shape \[4\]"):
        ops._bn_stats(y, None, None, c4, torch.ones(3), 0.1, EPS)
    with pytest.raises(RuntimeError, match="running_mean and running_var must be given together"):
        ops._bn_stats(y, None, None, c4, None, 0.1, EPS)
    with pytest.raises(RuntimeError, match="expected more than 1 value per channel"):
        ops._bn_stats(torch.randn(1, 4, 1, 1), None, None, c4, c4, 0.1, EPS)
    with pytest.raises(RuntimeError, match="eps must be > 0"):
        ops._bn_stats(y, None, None, None, None, 0.1, 0.0)
    with pytest.raises(RuntimeError, match="a ReLU mask needs relu=True"):
        ops._bn_apply(y, c4, c4, None, None, None, False, True)
    with pytest.raises(RuntimeError, match="residual_scale, residual_shift and residual_center need a residual"):
        ops._bn_apply(y, c4, c4, None, c4, None, True, False)
    with pytest.raises(RuntimeError, match="residual_scale, residual_shift and residual_center need a residual"):
        ops._bn_apply(y, c4, c4, None, None, None, True, False, None, c4)
    with pytest.raises(RuntimeError, match=r"center must have shape \[4\]"):
        ops._bn_apply(y, c4, c4, None, None, None, True, False, torch.ones(5))
    with pytest.raises(RuntimeError, match=r"center must have shape \[4\]"):
        ops._bn_act_forward(y, c4, c4, None, True, torch.ones(3))
    with pytest.raises(RuntimeError, match=r"residual_shift must have shape \[4\]"):
        ops._bn_apply(y, c4, c4, y, c4, torch.ones(5), True, False)
    _, bits = ops._bn_apply(y, c4, c4, None, None, None, True, True)
    with pytest.raises(RuntimeError, match="mask must have shape"):
        ops._bn_apply_backward(y, None, bits[:1], y, c4, c4, None, None, None, None, None, True, True, False)
    with pytest.raises(RuntimeError, match="mask must be uint8"):
        ops._bn_apply_backward(y, None, bits.int(), y, c4, c4, None, None, None, None, None, True, True, False)
    with pytest.raises(RuntimeError, match="relu=True needs out or mask"):
        ops._bn_apply_backward(y, None, None, y, c4, c4, None, None, None, None, None, True, True, False)
    with pytest.raises(RuntimeError, match="a residual needs residual_mean and residual_invstd"):
        ops._bn_apply_backward(y, y, None, y, c4, c4, None, y, c4, None, None, True, True, False)
    with pytest.raises(RuntimeError, match="residual must have y's shape"):
        ops._bn_apply_backward(y, y, None, y, c4, c4, None, y[:1], c4, c4, None, True, True, False)


def test_compiled_module():
    assert _compiled.available() and _compiled.load_error() is None
    for name in _compiled.KERNEL_OPS:
        assert _compiled.has_kernel(name, "cpu")
        assert _compiled.has_kernel(name, "cuda") == _compiled.with_cuda()
    assert not _compiled.has_kernel("no_such_op", "cpu")
    assert not _compiled.has_kernel("_add_relu", "mps")


def test_opcheck():
    for op, args in opcheck_samples("cpu"):
        torch.library.opcheck(op, args)


def test_opcheck_new_kernels():
    for op, args in opcheck_new_samples("cpu"):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_cpu_eval_kernels(layout):
    """The CPU-only kernels of the eval path: the max pool + ReLU and the in-place ReLU."""
    x = randn((2, 5, 9, 8), torch.float32, "cpu", layout)
    torch.library.opcheck(ops._max_pool_relu.default, (x, [3, 3], [2, 2], [1, 1], [1, 1], False, True))
    torch.library.opcheck(ops._max_pool_relu.default, (x.bfloat16(), [2, 3], [1, 2], [0, 1], [2, 1], True, False))
    for dtype in (torch.bfloat16, torch.float32):
        torch.library.opcheck(ops._relu_.default, (x.to(dtype),))


def test_fakes_under_torch_compile():
    def f(y, s, b, r):
        out = ops._bn_act_forward(y, s, b, r, True)
        return ops._bn_act_backward(out, out, y, s, s, None, True, True, True)[0]

    y = randn((2, 5, 3, 3), torch.float32, "cpu", "channels_last")
    s, b = torch.rand(5) + 0.5, torch.randn(5)
    r = torch.randn_like(y)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(y, s, b, r)
    assert_format("compiled", got, torch.channels_last)
    torch.testing.assert_close(got, f(y, s, b, r), rtol=0, atol=0)


# ---- CUDA ---------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestCUDA:
    @pytest.fixture(autouse=True)
    def _needs_cuda_kernels(self):
        if not _compiled.with_cuda():
            pytest.skip("fastres._C was built without its CUDA kernels")

    @pytest.mark.parametrize("with_bias", [True, False])
    @pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "transposed"])
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_fold_bn(self, dtype, layout, with_bias):
        check_fold_bn("cuda", dtype, layout, with_bias)

    @pytest.mark.parametrize("shape", SHAPES + LARGE_SHAPES, ids=str)
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_add_relu(self, dtype, layout, shape):
        check_add_relu("cuda", dtype, layout, shape)

    @pytest.mark.parametrize("shape", SHAPES + LARGE_SHAPES, ids=str)
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_bn_act_forward(self, dtype, layout, shape):
        check_bn_act_forward("cuda", dtype, layout, shape)

    @pytest.mark.parametrize("shape", SHAPES + LARGE_SHAPES + [(8, 64, 56, 56)], ids=str)
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_bn_act_backward(self, dtype, layout, shape):
        check_bn_act_backward("cuda", dtype, layout, shape)

    @pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
    def test_deterministic(self, layout):
        check_deterministic("cuda", layout, (8, 64, 28, 28))

    def test_matches_cpu_kernels(self):
        """Same float64 inputs on both devices: the two kernels agree to rounding."""
        for layout in ("contiguous", "channels_last"):
            grad_out, y, weight, _, _, mean, invstd = bn_backward_inputs("cpu", torch.float64, layout,
                                                                         (4, 13, 9, 11), True)
            args = (grad_out, torch.relu(y), y, mean, invstd, weight)
            cpu = ops._bn_act_backward(*args, True, True, True)
            gpu = ops._bn_act_backward(*(t.cuda() for t in args), True, True, True)
            for a, b in zip(cpu, gpu):
                torch.testing.assert_close(b.cpu(), a, rtol=1e-12, atol=1e-12)

    def test_current_stream(self):
        y = randn((4, 16, 8, 8), torch.float32, "cuda", "channels_last")
        s, b = torch.randn(16, device="cuda"), torch.randn(16, device="cuda")
        want = ops._bn_act_forward(y, s, b, y, True)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            got = ops._bn_act_forward(y, s, b, y, True)
        stream.synchronize()
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    def test_device_mismatch(self):
        y = torch.randn(2, 4, 3, 3, device="cuda")
        with pytest.raises(RuntimeError, match="scale must be on y's device"):
            ops._bn_act_forward(y, torch.ones(4), None, None, True)
        with pytest.raises(RuntimeError, match="residual must be on x's device"):
            ops._add_relu(y, y.cpu())

    def test_opcheck(self):
        for op, args in opcheck_samples("cuda"):
            torch.library.opcheck(op, args)
        for op, args in opcheck_new_samples("cuda"):
            torch.library.opcheck(op, args)

    @pytest.mark.parametrize("shape", STAT_SHAPES + [(8, 64, 56, 56)], ids=str)
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_bn_stats(self, dtype, layout, shape):
        check_bn_stats("cuda", dtype, layout, shape)

    @pytest.mark.parametrize("momentum", [0.0, 1 / 3, 1.0])
    def test_bn_stats_momentum(self, momentum):
        check_bn_stats("cuda", torch.float32, "channels_last", (2, 13, 5, 7), momentum)

    def test_bn_stats_empty_batch(self):
        rm, rv = torch.randn(4, device="cuda"), torch.rand(4, device="cuda") + 0.5
        out = ops._bn_stats(torch.empty(0, 4, 3, 3, device="cuda"), None, None, rm, rv, 0.1, EPS)
        assert torch.equal(out[4], rm) and torch.equal(out[5], rv)

    @pytest.mark.parametrize("shape", SHAPES + LARGE_SHAPES, ids=str)
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_bn_apply(self, dtype, layout, shape):
        check_bn_apply("cuda", dtype, layout, shape)

    @pytest.mark.parametrize("shape", SHAPES + LARGE_SHAPES + [(8, 64, 28, 28)], ids=str)
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_bn_apply_backward_dual(self, dtype, layout, shape):
        check_bn_apply_backward_dual("cuda", dtype, layout, shape)

    @pytest.mark.parametrize("shape", SHAPES + LARGE_SHAPES, ids=str)
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_mask_backward_equals_output_backward(self, dtype, layout, shape):
        check_mask_backward_plain("cuda", dtype, layout, shape)

    @pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
    def test_new_kernels_deterministic(self, layout):
        run = new_kernel_outputs("cuda", layout, (8, 64, 28, 28))
        first, second = run(), run()
        for a, b in zip(first, second):
            assert torch.equal(a, b), "two runs differ"

    def test_new_kernels_match_cpu(self):
        """Same float64 inputs on both devices: statistics, dual apply and its backward agree to rounding, and the
        masks are identical."""
        for layout in ("contiguous", "channels_last"):
            torch.manual_seed(0)
            want = new_kernel_outputs("cpu", layout, (4, 13, 9, 11), torch.float64)()
            torch.manual_seed(0)
            got = new_kernel_outputs("cuda", layout, (4, 13, 9, 11), torch.float64)()
            for a, b in zip(want, got):
                if a.dtype == torch.uint8:
                    assert torch.equal(b.cpu(), a)
                else:
                    torch.testing.assert_close(b.cpu(), a, rtol=1e-12, atol=1e-12)
