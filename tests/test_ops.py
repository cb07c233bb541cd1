"""fastres.ops against plain-torch references, on every backend that can run on CPU here."""
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import fastres
from fastres import ops
from fastres.ops import _backend
from tolerance import assert_within

CPU_BACKENDS = [b for b in ("torch", "cuda") if _backend._why_not(b, "conv_bn_act_forward", "cpu") is None]
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _outputs_to_compare(dtype, relu, n_forward):
    """How many of the leading results (forward outputs, then gradients) a test compares.

    A ReLU's gradient in bf16/fp16 is ill-posed against a float64 reference: wherever the pre-activation is within
    bf16 rounding of zero, the two disagree on the mask, and each such element moves a gradient by a whole
    upstream value; which implementation flips more elements is chance. So low-precision gradients are compared
    without the ReLU (the ReLU's backward is checked in fp32 and fp64), and with it only the forward."""
    return n_forward if (relu and dtype in LOW_PRECISION) else None


def _fmt(t, fmt):
    return t.contiguous(memory_format=FORMATS[fmt])


def _leaf(t, dtype):
    return t.detach().to(dtype).requires_grad_()


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad, allow_unused=True)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    with fastres.backend(request.param):
        yield request.param


# ------------------------------------------------------------------------------------------- conv_bias_act
CONV_CASES = [  # (N, Cin, H, W, Cout, k, stride, padding)
    (2, 5, 9, 9, 7, 3, 1, 1),
    (1, 3, 13, 13, 8, 7, 2, 3),   # the stem shape, N = 1
    (3, 16, 7, 7, 13, 1, 1, 0),   # a bottleneck 1x1, odd Cout
    (2, 12, 8, 8, 6, 1, 2, 0),    # a strided 1x1 (downsample)
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (True, False)])
def test_conv_bias_act_matches_reference(backend, case, dtype, fmt, residual, relu):
    n, cin, h, w, cout, k, s, p = case
    x64 = _fmt(torch.randn(n, cin, h, w, dtype=torch.float64), fmt)
    w64 = torch.randn(cout, cin, k, k, dtype=torch.float64) / (cin * k * k) ** 0.5
    b64 = torch.randn(cout, dtype=torch.float64)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    r64 = _fmt(torch.randn(n, cout, ho, wo, dtype=torch.float64), fmt) if residual else None
    g64 = _fmt(torch.randn(n, cout, ho, wo, dtype=torch.float64), fmt)

    def run(fn, dt):
        xs = [_leaf(t, dt) for t in (x64, w64, b64)] + ([_leaf(r64, dt)] if residual else [])
        xs[0] = _fmt(xs[0].detach(), fmt).requires_grad_()
        out = fn(*xs)
        return (out,) + _grads(out, xs, g64.to(dt))

    def reference(x, w_, b, r=None):
        y = F.conv2d(x, w_, b, s, p)
        y = y + r if r is not None else y
        return torch.relu(y) if relu else y

    fused = run(lambda x, w_, b, r=None: ops.conv_bias_act(x, w_, b, s, p, r, relu), dtype)
    aten = run(reference, dtype)
    ref = run(reference, torch.float64)
    assert fused[0].dtype == dtype
    assert fused[0].is_contiguous(memory_format=FORMATS[fmt])
    names = ["out", "grad_x", "grad_weight", "grad_bias", "grad_residual"][:_outputs_to_compare(dtype, relu, 1)]
    for name, got, a, r in zip(names, fused, aten, ref):
        assert_within(f"{backend}/{name}", got, r, a)


# ------------------------------------------------------------------------------------------- conv_bn_act
def _bn_params(cout, dtype=torch.float64):
    gamma = torch.rand(cout, dtype=dtype) + 0.5
    beta = torch.randn(cout, dtype=dtype) * 0.3
    mean = torch.randn(cout, dtype=dtype) * 0.2
    var = torch.rand(cout, dtype=dtype) + 0.5
    return gamma, beta, mean, var


@pytest.mark.parametrize("case", CONV_CASES[:3])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (False, False), (True, False)])
def test_conv_bn_act_matches_batch_norm(backend, case, training, dtype, fmt, residual, relu):
    n, cin, h, w, cout, k, s, p = case
    if training and n * ((h + 2 * p - k) // s + 1) * ((w + 2 * p - k) // s + 1) == 1:
        pytest.skip("a single value per channel cannot train")
    x64 = _fmt(torch.randn(n, cin, h, w, dtype=torch.float64), fmt)
    w64 = torch.randn(cout, cin, k, k, dtype=torch.float64) / (cin * k * k) ** 0.5
    gamma64, beta64, mean64, var64 = _bn_params(cout)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    r64 = _fmt(torch.randn(n, cout, ho, wo, dtype=torch.float64), fmt) if residual else None
    g64 = _fmt(torch.randn(n, cout, ho, wo, dtype=torch.float64), fmt)
    momentum, eps = 0.2, 1e-3

    def run(fn, dt):
        # BN parameters and running statistics stay fp32 under low-precision activations, as in nn.BatchNorm2d.
        pdt = torch.float64 if dt == torch.float64 else torch.float32
        x = _fmt(x64.to(dt), fmt).requires_grad_()
        w_, gamma, beta = _leaf(w64, dt), _leaf(gamma64, pdt), _leaf(beta64, pdt)
        rm, rv = mean64.to(pdt), var64.to(pdt)
        xs = [x, w_, gamma, beta] + ([_leaf(r64, dt)] if residual else [])
        out = fn(x, w_, gamma, beta, rm, rv, *xs[4:])
        return (out, rm, rv) + _grads(out, xs, g64.to(dt))

    def reference(x, w_, gamma, beta, rm, rv, r=None):
        y = F.batch_norm(F.conv2d(x, w_, None, s, p), rm, rv, gamma, beta, training, momentum, eps)
        y = y + r if r is not None else y
        return torch.relu(y) if relu else y

    def fused_fn(x, w_, gamma, beta, rm, rv, r=None):
        return ops.conv_bn_act(x, w_, gamma, beta, rm, rv, training, momentum, eps, s, p, r, relu)

    fused, aten, ref = run(fused_fn, dtype), run(reference, dtype), run(reference, torch.float64)
    assert fused[0].dtype == dtype and fused[0].is_contiguous(memory_format=FORMATS[fmt])
    names = ["out", "running_mean", "running_var", "grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias",
             "grad_residual"][:_outputs_to_compare(dtype, relu, 3)]
    for name, got, a, r in zip(names, fused, aten, ref):
        assert_within(f"{backend}/{name}", got, r, a)
    if not training:  # eval leaves the running statistics alone
        assert torch.equal(fused[1], mean64.to(fused[1].dtype)) and torch.equal(fused[2], var64.to(fused[2].dtype))


def test_conv_bn_act_running_stats_bitwise_with_reference_backend():
    """The reference backend updates running statistics with aten's own batch norm: bit for bit BatchNorm2d."""
    x = torch.randn(4, 3, 6, 6)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(5, momentum=0.3)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    with fastres.backend("torch"):
        for _ in range(3):
            ops.conv_bn_act(x, conv.weight, bn.weight, bn.bias, rm, rv, True, 0.3, bn.eps, 1, 1)
            bn(conv(x))
    assert torch.equal(rm, bn.running_mean) and torch.equal(rv, bn.running_var)


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("relu", [True, False])
def test_bn_relu_conv_matches_reference(backend, case, fmt, relu):
    n, cin, h, w, cout, k, s, p = case
    dtype = torch.float32
    x64 = _fmt(torch.randn(n, cin, h, w, dtype=torch.float64), fmt)
    w64 = torch.randn(cout, cin, k, k, dtype=torch.float64) / (cin * k * k) ** 0.5
    sc64, sh64 = torch.rand(cin, dtype=torch.float64) + 0.5, torch.randn(cin, dtype=torch.float64) * 0.3
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    g64 = _fmt(torch.randn(n, cout, ho, wo, dtype=torch.float64), fmt)

    def run(fn, dt):
        x = _fmt(x64.to(dt), fmt).requires_grad_()
        xs = [x, _leaf(sc64, dt), _leaf(sh64, dt), _leaf(w64, dt)]
        out = fn(*xs)
        return (out,) + _grads(out, xs, g64.to(dt))

    def reference(x, sc, sh, w_):
        z = x * sc.view(1, -1, 1, 1) + sh.view(1, -1, 1, 1)
        return F.conv2d(torch.relu(z) if relu else z, w_, None, s, p)

    fused = run(lambda *a: ops.bn_relu_conv(*a, s, p, relu), dtype)
    aten, ref = run(reference, dtype), run(reference, torch.float64)
    assert fused[0].is_contiguous(memory_format=FORMATS[fmt])
    for name, got, a, r in zip(["out", "grad_x", "grad_scale", "grad_shift", "grad_weight"], fused, aten, ref):
        assert_within(f"{backend}/{name}", got, r, a)


# ------------------------------------------------------------------------------------------- fold_bn, add_relu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_fold_bn_matches_formula(backend, dtype, with_bias, fmt):
    cout = 11
    w64 = _fmt(torch.randn(cout, 6, 3, 3, dtype=torch.float64), fmt)
    cb64 = torch.randn(cout, dtype=torch.float64) if with_bias else None
    gamma64, beta64, mean64, var64 = _bn_params(cout)
    eps = 1e-5
    gw64, gb64 = torch.randn_like(w64), torch.randn(cout, dtype=torch.float64)

    def reference(w_, cb, gamma, beta, mean, var):
        scale = gamma * torch.rsqrt(var + eps)
        b = (cb if cb is not None else torch.zeros_like(mean)) - mean
        return w_ * scale.view(-1, 1, 1, 1), b * scale + beta

    def run(fn, dt, acc):
        w_ = _fmt(w64.to(dt), fmt).requires_grad_()
        cb = _leaf(cb64, dt) if with_bias else None
        gamma, beta = _leaf(gamma64, acc), _leaf(beta64, acc)
        wf, bf = fn(w_, cb, gamma, beta, mean64.to(acc), var64.to(acc))
        leaves = [t for t in (w_, cb, gamma, beta) if t is not None]
        grads = torch.autograd.grad((wf, bf), leaves, (gw64.to(wf.dtype), gb64.to(bf.dtype)))
        return (wf, bf) + grads

    fused = run(lambda *a: ops.fold_bn(*a, eps), dtype, torch.float32)
    # ATen "in the same dtype": the same formula with the weight-dtype tensors, BN parameters in fp32.
    aten = run(lambda w_, cb, g, b, m, v: tuple(t.to(dtype) for t in reference(w_.float(), None if cb is None
               else cb.float(), g, b, m, v)), dtype, torch.float32)
    ref = run(reference, torch.float64, torch.float64)
    assert fused[0].dtype == dtype and fused[1].dtype == dtype
    assert fused[0].is_contiguous(memory_format=FORMATS[fmt])
    names = ["weight", "bias", "grad_conv_weight"] + (["grad_conv_bias"] if with_bias else []) + \
        ["grad_bn_weight", "grad_bn_bias"]
    for name, got, a, r in zip(names, fused, aten, ref):
        assert_within(f"{backend}/{name}", got, r, a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_add_relu(backend, dtype, fmt):
    x = _fmt(torch.randn(3, 13, 7, 5, dtype=dtype), fmt).requires_grad_()
    r = torch.randn(3, 13, 7, 5, dtype=dtype).requires_grad_()  # a different layout than x on purpose
    out = ops.add_relu(x, r)
    assert torch.equal(out, torch.relu(x + r))
    assert out.is_contiguous(memory_format=FORMATS[fmt])
    g = torch.randn_like(out)
    gx, gr = torch.autograd.grad(out, (x, r), g)
    expected = g * (x + r > 0)
    assert torch.equal(gx, expected) and torch.equal(gr, expected)


# ------------------------------------------------------------------------------------------- max_pool_relu
POOL_CASES = [  # (N, C, H, W, kernel_size, stride, padding, dilation, ceil_mode)
    (2, 64, 12, 12, 3, 2, 1, 1, False),        # a ResNet stem's pool: 32-channel register blocks
    (1, 70, 9, 11, 3, 2, 1, 1, True),          # channels past the blocks, odd sizes, ceil_mode
    (2, 5, 8, 7, (3, 2), (1, 2), (1, 0), (2, 1), True),  # a non-square window, dilated, fewer than 8 channels
    (3, 13, 6, 6, 2, 2, 0, 1, False),
]


def _pool_reference(x, kernel_size, stride, padding, dilation, ceil_mode, relu):
    y = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("relu", [True, False])
def test_max_pool_relu(backend, case, dtype, fmt, relu):
    n, c, h, w, *geometry = case
    x = _fmt(torch.randn(n, c, h, w, dtype=dtype), fmt)
    with torch.no_grad():  # values a max must pass through untouched: NaN wins its windows, the infinities too
        x[0, 0, 1, 1], x[-1, -1, 2, 3], x[0, -1, 0, 0], x[-1, 0, -1, -1] = float("nan"), float("inf"), \
            -float("inf"), -float("nan")
    x.requires_grad_()
    out = ops.max_pool_relu(x, *geometry, relu=relu)
    expected = _pool_reference(x, *geometry, relu)
    # A max is exact in any dtype: bitwise equal to ATen's pool (then ReLU), NaN where ATen has NaN.
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(out).any() and torch.isinf(out).any()
    assert out.is_contiguous(memory_format=FORMATS[fmt])
    g = torch.randn_like(out)
    (gx,), (ge,) = _grads(out, [x], g), _grads(expected, [x], g)
    torch.testing.assert_close(gx, ge, rtol=0, atol=0, equal_nan=True)


def test_max_pool_relu_stride_defaults_to_kernel_and_input_is_not_written(backend):
    x = torch.randn(2, 6, 10, 9)[:, ::2]  # not dense: the kernel reads a dense copy
    before = x.clone()
    assert torch.equal(ops.max_pool_relu(x, 3), torch.relu(F.max_pool2d(x, 3)))
    assert torch.equal(x, before)


def test_max_pool_relu_matches_the_stem_order():
    """relu then pool (the stem as ResNet writes it) = pool then relu (as the op computes it), NaN included."""
    x = torch.randn(2, 64, 15, 15).contiguous(memory_format=torch.channels_last)
    x[0, 3, 4, 4] = float("nan")
    x[1, 5] = -1.0  # a whole channel negative: its ReLU'd maxima are 0
    torch.testing.assert_close(ops.max_pool_relu(x, 3, 2, 1), F.max_pool2d(torch.relu(x), 3, 2, 1), rtol=0, atol=0,
                               equal_nan=True)


@pytest.mark.parametrize("call, error, message", [
    (lambda x: ops.max_pool_relu(x, 0), ValueError, r"kernel_size must be >= 1"),
    (lambda x: ops.max_pool_relu(x, 3, 0), ValueError, r"stride must be >= 1"),
    (lambda x: ops.max_pool_relu(x, 3, 2, 2), ValueError, r"padding must be at most half of kernel_size"),
    (lambda x: ops.max_pool_relu(x, 3, 1, 1, 0), ValueError, r"dilation must be >= 1"),
    (lambda x: ops.max_pool_relu(x, 20), ValueError, r"output would be empty"),
    (lambda x: ops.max_pool_relu(x, (3, 3, 3)), ValueError, r"kernel_size must be an int or a pair"),
    (lambda x: ops.max_pool_relu(x, 3, ceil_mode=1), TypeError, r"ceil_mode must be a bool"),
    (lambda x: ops.max_pool_relu(x[0], 3), ValueError, r"x must be 4-D"),
    (lambda x: ops.max_pool_relu(x.int(), 3), TypeError, r"x must be a floating-point"),
])
def test_max_pool_relu_bad_input(backend, call, error, message):
    with pytest.raises(error, match=message):
        call(torch.randn(2, 3, 9, 8))


@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_max_pool_relu_gradcheck_and_opcheck(backend, fmt):
    # Distinct values: a tie inside a window makes the max's gradient a choice, which finite differences cannot see.
    x = _fmt(torch.randperm(2 * 3 * 7 * 6, dtype=torch.float64).view(2, 3, 7, 6) - 40, fmt).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.max_pool_relu(t, (3, 2), (2, 1), (1, 0), 1, True), (x,))
    assert torch.autograd.gradgradcheck(lambda t: ops.max_pool_relu(t, 2, 1, 0, 1, False, False), (x,))
    for args in (([3, 3], [2, 2], [1, 1], [1, 1], False, True), ([2, 3], [1, 2], [0, 1], [2, 1], True, False)):
        opcheck(torch.ops.fastres.max_pool_relu.default, (x.detach().float(), *args))


@pytest.mark.cuda
def test_max_pool_relu_cuda():
    x = torch.randn(2, 64, 15, 15, device="cuda").contiguous(memory_format=torch.channels_last)
    assert torch.equal(ops.max_pool_relu(x, 3, 2, 1), torch.relu(F.max_pool2d(x, 3, 2, 1)))


# ------------------------------------------------------------------------------------------- gradcheck, opcheck
def _op_args(dtype=torch.float64, training=True, fmt="nchw"):
    x = _fmt(torch.randn(2, 3, 5, 5, dtype=dtype), fmt)
    w = torch.randn(4, 3, 3, 3, dtype=dtype)
    gamma, beta, mean, var = _bn_params(4, dtype)
    r = _fmt(torch.randn(2, 4, 3, 3, dtype=dtype), fmt)
    return {
        "conv_bias_act": (x, w, torch.randn(4, dtype=dtype), [2, 2], [1, 1], r, True),
        "conv_bn_act_forward": (x, w, gamma, beta, mean, var, training, 0.1, 1e-5, [2, 2], [1, 1], r, True),
        "conv_bn_act": (x, w, gamma, beta, mean.clone(), var.clone(), training, 0.1, 1e-5, [2, 2], [1, 1], r, True),
        "fold_bn": (w, torch.randn(4, dtype=dtype), gamma, beta, mean, var, 1e-5),
        "add_relu": (torch.randn(2, 4, 3, 3, dtype=dtype), r),
        "bn_relu_conv": (x, torch.rand(3, dtype=dtype) + 0.5, torch.randn(3, dtype=dtype), w, [2, 2], [1, 1], True),
        "conv_backward": (_fmt(torch.randn(2, 4, 3, 3, dtype=dtype), fmt), x, w, [2, 2], [1, 1], [True, True, True]),
        "bn_act_backward": (r, torch.relu(r), r * 2, mean, torch.rsqrt(var), gamma, True, training, True),
        "bn_relu_conv_backward": (_fmt(torch.randn(2, 4, 3, 3, dtype=dtype), fmt), x, torch.rand(3, dtype=dtype),
                                  torch.randn(3, dtype=dtype), w, [2, 2], [1, 1], True, [True, False, True, True]),
    }


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(backend, training):
    args = _op_args(training=training)
    x, w, b, s, p, r, _ = args["conv_bias_act"]
    req = lambda *ts: [t.clone().requires_grad_() for t in ts]  # noqa: E731
    for relu in (True, False):
        assert torch.autograd.gradcheck(lambda x, w, b, r: ops.conv_bias_act(x, w, b, s, p, r, relu), req(x, w, b, r))
    _, _, gamma, beta, mean, var = args["conv_bn_act_forward"][:6]
    assert torch.autograd.gradcheck(
        lambda x, w, g, be, r: ops.conv_bn_act(x, w, g, be, mean.clone(), var.clone(), training, 0.1, 1e-5, s, p, r),
        req(x, w, gamma, beta, r))
    assert torch.autograd.gradcheck(
        lambda x, w, g, be: ops.conv_bn_act(x, w, g, be, mean.clone(), var.clone(), training, 0.1, 1e-5, 1, 0,
                                            relu=False), req(x, w, gamma, beta))
    w_, cb = args["fold_bn"][:2]
    assert torch.autograd.gradcheck(lambda w_, cb, g, be: ops.fold_bn(w_, cb, g, be, mean, var, 1e-5),
                                    req(w_, cb, gamma, beta))
    assert torch.autograd.gradcheck(lambda w_, g, be: ops.fold_bn(w_, None, g, be, mean, var, 1e-5),
                                    req(w_, gamma, beta))
    a, r2 = args["add_relu"]
    assert torch.autograd.gradcheck(ops.add_relu, req(a, r2))
    x, scale, shift, w_ = args["bn_relu_conv"][:4]
    for relu in (True, False):
        assert torch.autograd.gradcheck(lambda x, sc, sh, w_: ops.bn_relu_conv(x, sc, sh, w_, 2, 1, relu),
                                        req(x, scale, shift, w_))


@pytest.mark.parametrize("training", [True, False])
def test_gradgradcheck_float64(backend, training):
    # Twice differentiable (gradient penalties): with create_graph=True the formulas run the reference math.
    args = _op_args(training=training)
    x, w, b, s, p, r, _ = args["conv_bias_act"]
    req = lambda *ts: [t.clone().requires_grad_() for t in ts]  # noqa: E731
    check = lambda f, inputs: torch.autograd.gradgradcheck(f, inputs, fast_mode=True)  # noqa: E731
    for relu in (True, False):
        assert check(lambda x, w, b, r: ops.conv_bias_act(x, w, b, s, p, r, relu), req(x, w, b, r))
    _, _, gamma, beta, mean, var = args["conv_bn_act_forward"][:6]
    for relu in (True, False):
        assert check(lambda x, w, g, be, r: ops.conv_bn_act(x, w, g, be, mean.clone(), var.clone(), training, 0.1,
                                                           1e-5, s, p, r, relu), req(x, w, gamma, beta, r))
    # The functional op too, and a strict subset of inputs needing gradients.
    assert check(lambda x, g: torch.ops.fastres.conv_bn_act_forward(x, w, g, beta, mean, var, training, 0.1, 1e-5,
                                                                     [1, 1], [0, 0], None, True)[0],
                 req(_fmt(x, "nhwc"), gamma))
    w_, cb = args["fold_bn"][:2]
    assert check(lambda w_, cb, g, be: ops.fold_bn(w_, cb, g, be, mean, var, 1e-5), req(w_, cb, gamma, beta))
    assert check(lambda w_, g, be: ops.fold_bn(w_, None, g, be, mean, var, 1e-5), req(w_, gamma, beta))
    a, r2 = args["add_relu"]
    assert check(ops.add_relu, req(a, r2))
    x, scale, shift, w_ = args["bn_relu_conv"][:4]
    for relu in (True, False):
        assert check(lambda x, sc, sh, w_: ops.bn_relu_conv(x, sc, sh, w_, 2, 1, relu), req(x, scale, shift, w_))


def test_double_backward_matches_aten(backend):
    # A gradient penalty through conv_bn_act (training) against the same through F.conv2d + F.batch_norm.
    x, w, _, s, p, r, _ = _op_args(torch.float64)["conv_bias_act"]
    _, _, gamma, beta, mean, var = _op_args(torch.float64)["conv_bn_act_forward"][:6]

    def penalty_grads(f):
        leaves = [t.clone().requires_grad_() for t in (x, w, gamma, beta, r)]
        gx, = torch.autograd.grad(f(*leaves).square().sum(), leaves[0], create_graph=True)
        return torch.autograd.grad(gx.square().sum(), leaves[1:])

    fused = penalty_grads(lambda x, w, g, b, r: ops.conv_bn_act(x, w, g, b, mean.clone(), var.clone(), True, 0.1,
                                                                1e-5, s, p, r))
    aten = penalty_grads(lambda x, w, g, b, r: torch.relu(F.batch_norm(F.conv2d(x, w, None, s, p), mean.clone(),
                                                                       var.clone(), g, b, True, 0.1, 1e-5) + r))
    for got, want in zip(fused, aten):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name,training", [("conv_bias_act", False), ("conv_bn_act_forward", True),
                                           ("conv_bn_act_forward", False), ("conv_bn_act", True),
                                           ("conv_bn_act", False), ("fold_bn", False), ("add_relu", False),
                                           ("bn_relu_conv", False), ("conv_backward", False),
                                           ("bn_act_backward", True), ("bn_act_backward", False),
                                           ("bn_relu_conv_backward", False)])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_opcheck(backend, name, training, fmt):
    args = _op_args(torch.float32, training, fmt)[name]
    opcheck(getattr(torch.ops.fastres, name).default, args)


# ------------------------------------------------------------------------------------------- layouts, mutation
def test_non_contiguous_inputs_and_no_mutation(backend):
    base = torch.randn(2, 6, 12, 10)
    x = base[:, ::2, 1:10, ::2]  # strided view: neither NCHW- nor NHWC-contiguous
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 3, 3, 3).transpose(2, 3)  # non-contiguous weight
    r = torch.randn(2, 4, 18, 5)[:, :, ::2]
    gamma, beta, mean, var = (t.float() for t in _bn_params(4))
    inputs = [base, w, r, gamma, beta, mean, var]
    before = [t.clone() for t in inputs]
    out = ops.conv_bias_act(x, w, beta, 1, 1, r, True)
    assert torch.allclose(out, torch.relu(F.conv2d(x, w, beta, 1, 1) + r), atol=1e-5)
    out = ops.conv_bn_act(x, w, gamma, beta, mean, var, False, 0.1, 1e-5, 1, 1, r, True)
    ref = torch.relu(F.batch_norm(F.conv2d(x, w, None, 1, 1), mean, var, gamma, beta, False, 0.1, 1e-5) + r)
    assert torch.allclose(out, ref, atol=1e-5)
    out = ops.add_relu(x, x.flip(0))
    assert torch.equal(out, torch.relu(x + x.flip(0)))
    ops.fold_bn(w, beta, gamma, beta, mean, var, 1e-5)
    for t, t0 in zip(inputs, before):
        assert torch.equal(t, t0), "an input was mutated"


def test_training_mutates_only_running_stats(backend):
    x, w, gamma, beta, mean, var = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), *_bn_params(4, torch.float32)
    inputs = [x, w, gamma, beta]
    before = [t.clone() for t in inputs]
    mean0, var0 = mean.clone(), var.clone()
    v_mean = mean._version
    ops.conv_bn_act(x, w, gamma, beta, mean, var, True, 0.1, 1e-5, 1, 1)
    assert all(torch.equal(t, t0) for t, t0 in zip(inputs, before))
    assert not torch.equal(mean, mean0) and not torch.equal(var, var0)
    assert mean._version > v_mean, "the in-place update must bump the version counter"


# ------------------------------------------------------------------------------------------- bad input
def _bad_cases():
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    g, b, m, v = (t.float() for t in _bn_params(4))
    return [
        ("ndim", lambda: ops.conv_bias_act(x[0], w), ValueError, r"x must be 4-D"),
        ("weight ndim", lambda: ops.conv_bias_act(x, w[0]), ValueError, r"weight must be 4-D"),
        ("channels", lambda: ops.conv_bias_act(x, torch.randn(4, 5, 3, 3)), ValueError, r"channel mismatch.*x has 3"),
        ("dtype", lambda: ops.conv_bias_act(x, w.double()), TypeError, r"weight has dtype torch.float64"),
        ("integer", lambda: ops.conv_bias_act(x.long(), w.long()), TypeError, r"x must be a floating-point"),
        ("bias size", lambda: ops.conv_bias_act(x, w, torch.randn(5)), ValueError, r"bias has 5 elements"),
        ("residual shape", lambda: ops.conv_bias_act(x, w, None, 1, 1, torch.randn(2, 4, 7, 7)), ValueError,
         r"residual has shape"),
        ("residual dtype", lambda: ops.conv_bias_act(x, w, None, 1, 1, torch.randn(2, 4, 8, 8).double()), TypeError,
         r"residual has dtype"),
        ("stride", lambda: ops.conv_bias_act(x, w, None, 0), ValueError, r"stride must be >= 1"),
        ("too small", lambda: ops.conv_bias_act(torch.randn(2, 3, 2, 2), w), ValueError, r"kernel 3x3 is larger"),
        ("bn size", lambda: ops.conv_bn_act(x, w, g[:3], b, m, v, True), ValueError, r"bn_weight has 3 elements"),
        ("running dtype", lambda: ops.conv_bn_act(x, w, g, b, m.long(), v, True), TypeError,
         r"running_mean must be a floating-point"),
        ("batch of one", lambda: ops.conv_bn_act(torch.randn(1, 3, 3, 3), w, g, b, m, v, True), ValueError,
         r"Expected more than 1 value per channel when training"),
        ("fold eps", lambda: ops.fold_bn(w, None, g, b, m, v, 0.0), ValueError, r"eps must be > 0"),
        ("fold size", lambda: ops.fold_bn(w, None, g, b, m[:2], v), ValueError, r"running_mean has 2 elements"),
        ("add_relu shape", lambda: ops.add_relu(x, x[:1]), ValueError, r"residual has shape"),
        ("add_relu dtype", lambda: ops.add_relu(x, x.half()), TypeError, r"residual has dtype"),
        ("add_relu int", lambda: ops.add_relu(x.int(), x.int()), TypeError, r"x must be a floating-point"),
        ("mixed devices", lambda: ops.conv_bias_act(x, w.to("meta")), ValueError, r"weight is on meta"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_is_named(backend, case):
    _, fn, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        fn()


def test_batch_of_one_same_error_as_batchnorm():
    bn = torch.nn.BatchNorm2d(4)
    with pytest.raises(ValueError) as theirs:
        bn(torch.randn(1, 4, 1, 1))
    g, b, m, v = (t.float() for t in _bn_params(4))
    with pytest.raises(ValueError) as ours:
        ops.conv_bn_act(torch.randn(1, 3, 3, 3), torch.randn(4, 3, 3, 3), g, b, m, v, True)
    assert str(ours.value) == str(theirs.value)


# ------------------------------------------------------------------------------------------- backend selection
def test_forced_backend_that_cannot_run_raises(monkeypatch):
    x, w = torch.randn(1, 3, 4, 4), torch.randn(2, 3, 1, 1)
    with fastres.backend("triton"):
        if _backend._why_not("triton", "conv_bias_act", "cpu") is not None:
            with pytest.raises(fastres.BackendUnavailableError, match="triton"):
                ops.conv_bias_act(x, w)
    monkeypatch.setenv("FASTRES_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTRES_BACKEND must be one of"):
        ops.conv_bias_act(x, w)
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastres.backend("cudnn"):
            pass


def test_env_var_and_context_select_backend(monkeypatch):
    monkeypatch.setenv("FASTRES_BACKEND", "torch")
    assert _backend.select("add_relu", torch.device("cpu")).__name__.endswith("backend_torch")
    with fastres.backend("auto"):  # the context manager wins over the environment
        expected = "backend_cuda" if "cuda" in CPU_BACKENDS else "backend_torch"
        assert _backend.select("add_relu", torch.device("cpu")).__name__.endswith(expected)
    monkeypatch.delenv("FASTRES_BACKEND")
    with fastres.backend("torch"):
        assert fastres.ops.forced_backend() == "torch"
    assert fastres.ops.forced_backend() is None


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(_backend, "_loaded", {"cuda": "ImportError: pretend fastres._C is missing"})
    monkeypatch.setattr(_backend, "_warned", set())
    x = torch.randn(2, 3, 4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert torch.equal(ops.add_relu(x, x), torch.relu(2 * x))
    ours = [w for w in caught if "fastres" in str(w.message)]
    assert len(ours) == 1 and "falling back" in str(ours[0].message)



def _in_new_thread(fn):
    """fn() on a fresh thread (as autograd's device threads run CUDA backward passes): no ContextVar of the caller
    is set there."""
    errors = []

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller)
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


@pytest.fixture
def recorded_selections(monkeypatch):
    """[(op, backend module name)] of every backend selection made while the test runs."""
    chosen = []
    select = _backend.select

    def recording(op, device):
        module = select(op, device)
        chosen.append((op, module.__name__.rpartition(".")[2]))
        return module

    monkeypatch.setattr(_backend, "select", recording)
    return chosen


@pytest.mark.skipif("cuda" not in CPU_BACKENDS, reason="automatic selection would pick the reference anyway")
@pytest.mark.parametrize("memory_mode", ["lean", "recompute"])
def test_backward_on_another_thread_keeps_the_forced_backend(recorded_selections, memory_mode):
    model = fastres.nn.set_memory_mode(fastres.models.resnet18(num_classes=4), memory_mode).train()
    x = torch.randn(2, 3, 16, 16)
    w, g, b = torch.randn(4, 3, 3, 3, requires_grad=True), torch.ones(4), torch.zeros(4)
    with fastres.backend("torch"):
        loss = model(x).sum() + ops.conv_bn_act(x, w, g, b, torch.zeros(4), torch.ones(4), True, padding=1).sum()
        loss = loss + ops.conv_bias_act(x, w, None, 1, 1).sum() + ops.add_relu(x, x).sum()
    assert {name for _, name in recorded_selections} == {"backend_torch"}
    recorded_selections.clear()
    _in_new_thread(loss.backward)  # outside the block, on another thread: automatic selection would pick "cuda"
    backward_ops = {op for op, _ in recorded_selections}
    assert {"conv_backward", "bn_act_backward", "bn_relu_conv"} <= backward_ops  # lean chain's recompute too
    assert {name for _, name in recorded_selections} == {"backend_torch"}
    assert w.grad is not None and all(p.grad is not None for p in model.parameters())


@pytest.mark.skipif(_backend._why_not("triton", "conv_backward", "cpu") is not None, reason="needs Triton")
def test_backward_on_another_thread_records_into_the_tuning_session():
    from fastres.kernels import autotune
    x, w = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3, requires_grad=True)
    with fastres.backend("triton"), autotune.tuning() as record:
        loss = ops.conv_bias_act(x.requires_grad_(), w, None, 1, 1).sum()
    _in_new_thread(loss.backward)
    kinds = {key.partition("|")[0] for key in record}
    assert kinds == {"conv_bias_act", "dgrad", "wgrad"}


# ------------------------------------------------------------------------------------------- autocast, compile, export
def test_autocast_casts_conv_operands_not_bn_state(backend):
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    g, b, m, v = (t.float() for t in _bn_params(4))
    m0 = m.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.conv_bn_act(x, w, g, b, m, v, True, 0.1, 1e-5, 1, 1)
        out2 = ops.conv_bias_act(x, w, b, 1, 1)
    assert out.dtype == torch.bfloat16 and out2.dtype == torch.bfloat16
    assert m.dtype == torch.float32 and not torch.equal(m, m0), "running stats must be updated in place, in fp32"
    ref = torch.relu(F.batch_norm(F.conv2d(x.bfloat16(), w.bfloat16(), None, 1, 1).float(), m0.clone(), v.clone(),
                                  g, b, True, 0.1, 1e-5))
    assert (out.float() - ref).abs().max() < 0.1


def test_torch_compile_fullgraph_matches_eager(backend):
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3, requires_grad=True)
    g, b, m, v = (t.float() for t in _bn_params(4))
    g.requires_grad_()
    r = torch.randn(2, 4, 6, 6)

    w2 = torch.randn(4, 4, 3, 3)

    def f(x, w, g, b, m, v, r):
        y = ops.conv_bn_act(x, w, g, b, m, v, True, 0.1, 1e-5, 1, 1, r)
        wf, bf = ops.fold_bn(w2, None, g, b, m, v, 1e-5)
        return ops.add_relu(ops.conv_bias_act(y, wf, bf, 1, 1), y)

    m_e, v_e, m_c, v_c = m.clone(), v.clone(), m.clone(), v.clone()
    eager = f(x, w, g, b, m_e, v_e, r)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, g, b, m_c, v_c, r)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(m_c, m_e)
    torch.testing.assert_close(v_c, v_e)
    ge = torch.autograd.grad(eager.sum(), (w, g))
    gc = torch.autograd.grad(compiled.sum(), (w, g))
    for a, b_ in zip(gc, ge):
        torch.testing.assert_close(a, b_)


def test_torch_export():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return ops.conv_bias_act(x, self.conv.weight, self.conv.bias, 1, 1)

    m = Block().eval()
    x = torch.randn(2, 3, 6, 6)
    ep = torch.export.export(m, (x,))
    assert any("fastres.conv_bias_act" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), m(x))


def test_compiled_backward_follows_the_backend_at_run_time():
    """The traced backward holds fastres's backward ops, which choose the backend when they run: a graph compiled
    under one backend runs the other when that one is forced (and never holds a backend's private kernels)."""
    x, w = torch.randn(2, 3, 6, 6, requires_grad=True), torch.randn(4, 3, 3, 3, requires_grad=True)
    g, b, m, v = (t.float() for t in _bn_params(4))

    def f(x, w):
        return ops.conv_bn_act(x, w, g, b, m.clone(), v.clone(), True, 0.1, 1e-5, 1, 1).sum()

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    compiled = torch.compile(f, fullgraph=True,
                             backend=lambda gm, ex: aot_module_simplified(gm, ex, fw_compiler=capture,
                                                                          bw_compiler=capture))
    with fastres.backend(CPU_BACKENDS[-1]):
        compiled(x, w).backward()
    code = "\n".join(gm.code for gm in graphs)
    assert "fastres.bn_act_backward" in code and "fastres.conv_backward" in code
    assert "_bn_act_backward" not in code, "a backend's private kernel was baked into the graph"
    grad_auto = x.grad.clone()
    x.grad = None
    with fastres.backend("torch"):
        f(x, w).backward()
    torch.testing.assert_close(x.grad, grad_auto, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif("cuda" not in CPU_BACKENDS, reason="needs fastres._C's CPU kernels")
@pytest.mark.parametrize("residual", [False, True])
def test_conv_on_a_1x1_map_with_channels_last_strides(residual):
    # torch 2.11's oneDNN binary post-op refused this layout ("could not create a memory"): the answer must not
    # depend on whether the fused call is accepted.
    x = torch.randn(2, 16, 1, 1).as_strided((2, 16, 1, 1), (16, 1, 16, 16))
    w, b = torch.randn(16, 16, 3, 3), torch.randn(16)
    r = torch.randn(2, 16, 1, 1).as_strided((2, 16, 1, 1), (16, 1, 16, 16)) if residual else None
    with fastres.backend("cuda"):
        out = ops.conv_bias_act(x, w, b, 1, 1, r, relu=True)
    ref = F.conv2d(x.double(), w.double(), b.double(), 1, 1) + (r.double() if residual else 0)
    assert_within("out", out, ref.relu(), F.conv2d(x, w, b, 1, 1).add(r if residual else 0).relu())


@pytest.mark.skipif("cuda" not in CPU_BACKENDS, reason="needs fastres._C's CPU kernels")
def test_refused_onednn_call_falls_back_and_is_not_retried(monkeypatch):
    from fastres.ops import backend_cuda
    calls = []

    class Refusing:
        def __call__(self, *args):
            calls.append("unary")
            raise RuntimeError("could not create a memory")

        def binary(self, *args):
            calls.append("binary")
            raise RuntimeError("could not create a memory")

    class FakeMkldnn:
        _convolution_pointwise = Refusing()

    monkeypatch.setattr(torch.ops, "mkldnn", FakeMkldnn())
    monkeypatch.setattr(backend_cuda, "_onednn_refused", set())
    x, w, b, r = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3), torch.randn(6), torch.randn(2, 6, 5, 5)
    y = F.conv2d(x, w, b, 1, 1)
    with fastres.backend("cuda"):
        for _ in range(2):
            torch.testing.assert_close(ops.conv_bias_act(x, w, b, 1, 1, r, relu=True), torch.relu(y + r))
            torch.testing.assert_close(ops.conv_bias_act(x, w, b, 1, 1, None, relu=True), torch.relu(y))
    assert calls == ["binary", "unary"]  # each signature tried once, then the unfused path
