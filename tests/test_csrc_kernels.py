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
SHAPES = [(2, 3, 7, 7), (1, 13, 5, 3), (3, 16, 4, 4)]
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


def reference_bn_act_forward(y, scale, shift, residual, relu, dtype):
    z = y.to(dtype)
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
    for use_scale, use_shift, use_residual, relu in itertools.product([True, False], repeat=4):
        args = (y, scale if use_scale else None, shift if use_shift else None, residual if use_residual else None)
        snap = snapshot(*args)
        out = ops._bn_act_forward(*args, relu)
        assert_unchanged(snap)
        name = f"out(scale={use_scale}, shift={use_shift}, residual={use_residual}, relu={relu})"
        assert out.dtype == dtype and out.shape == y.shape
        assert_format(name, out, expected_format(layout))
        check_close(name, out, reference_bn_act_forward(*args, relu, torch.float64),
                    reference_bn_act_forward(*args, relu, dtype))


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
