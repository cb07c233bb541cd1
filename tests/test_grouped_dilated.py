"""Grouped and dilated convolutions (ResNeXt's grouped 3x3s, DeepLab's dilated layer3/4): the conv-carrying ops on
every backend that runs here (torch, the compiled C++ CPU path, Triton in the interpreter) against float64
references under the tolerance rule; bad groups / dilation named; and torchvision's grouped and dilated
Bottlenecks converted by fastres.convert, in eval and in a training step through the memory-lean chain.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.library import opcheck
from torchvision.models import resnet as tvr

import fastres
import fastres.nn as fnn
from fastres import ops
from fastres.ops import _backend
from model_helpers import count_lean_blocks, randomize_
from test_nn import OpLog, assert_no_grad_match, assert_runs_match, set_mode
from tolerance import assert_within

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
BACKENDS = [b for b in ("torch", "cuda") if _backend._why_not(b, "conv_bn_act_forward", "cpu") is None]
if _backend._why_not("triton", "conv_bn_act_forward", "cpu") is None:
    BACKENDS.append("triton")  # the Triton kernels in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1)

# (N, Cin, H, W, Cout, k, stride, padding, dilation, groups)
CASES = {
    "g2": (2, 8, 7, 7, 12, 3, 1, 1, 1, 2),
    "g4_d2_s2": (2, 16, 9, 9, 8, 3, 2, 2, 2, 4),    # a strided dilated grouped conv (the transposed gather)
    "d2": (2, 6, 8, 8, 5, 3, 1, 2, 2, 1),           # DeepLab's dilated 3x3, odd channel counts
    "depthwise_d3x2": (2, 4, 7, 7, 4, 3, 1, (3, 2), (3, 2), 4),  # one channel per group, unequal dilation
}


# The interpreter is slow: Triton runs a subset that still covers groups with stride and dilation (the transposed
# gather), one channel per group (the k-flat gather), and both layouts.
TRITON_SUBSET = {("g2", "nhwc"), ("g4_d2_s2", "nchw"), ("depthwise_d3x2", "nhwc")}


@pytest.fixture(params=BACKENDS)
def backend(request):
    with fastres.backend(request.param):
        yield request.param


def _skip_slow(backend, case, fmt, subset=TRITON_SUBSET):
    if backend == "triton" and (case, fmt) not in subset:
        pytest.skip("the Triton interpreter runs a subset")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path / "cache"))  # the autotuner's, never the user's


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _inputs(case, fmt):
    n, cin, h, w, cout, k, s, p, d, g = CASES[case]
    p, d = _pair(p), _pair(d)
    x = torch.randn(n, cin, h, w, dtype=torch.float64).contiguous(memory_format=FORMATS[fmt])
    weight = torch.randn(cout, cin // g, k, k, dtype=torch.float64) / (cin // g * k * k) ** 0.5
    ho = (h + 2 * p[0] - d[0] * (k - 1) - 1) // s + 1
    wo = (w + 2 * p[1] - d[1] * (k - 1) - 1) // s + 1
    out = (n, cout, ho, wo)
    return x, weight, out, dict(stride=s, padding=p, dilation=d, groups=g)


def _check_all(backend, names, fused, aten, ref):
    for name, got, a, r in zip(names, fused, aten, ref):
        assert_within(f"{backend}/{name}", got, r, a)


def _run(fn, tensors, fmt, dtype, grad):
    leaves = [t.detach().to(dtype) for t in tensors]
    leaves[0] = leaves[0].contiguous(memory_format=FORMATS[fmt])
    leaves = [t.requires_grad_() for t in leaves]
    out = fn(*leaves)
    return (out,) + torch.autograd.grad(out, leaves, grad.to(dtype))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_conv_bias_act(backend, case, fmt):
    _skip_slow(backend, case, fmt)
    x, weight, out_shape, geo = _inputs(case, fmt)
    bias = torch.randn(out_shape[1], dtype=torch.float64)
    residual = torch.randn(out_shape, dtype=torch.float64).contiguous(memory_format=FORMATS[fmt])
    grad = torch.randn(out_shape, dtype=torch.float64)

    def reference(x, w, b, r):
        return torch.relu(F.conv2d(x, w, b, geo["stride"], geo["padding"], geo["dilation"], geo["groups"]) + r)

    def fused(x, w, b, r):
        return ops.conv_bias_act(x, w, b, geo["stride"], geo["padding"], r, True, geo["dilation"], geo["groups"])

    tensors = (x, weight, bias, residual)
    got = _run(fused, tensors, fmt, torch.float32, grad)
    assert got[0].is_contiguous(memory_format=FORMATS[fmt])
    _check_all(backend, ["out", "grad_x", "grad_weight", "grad_bias", "grad_residual"], got,
               _run(reference, tensors, fmt, torch.float32, grad), _run(reference, tensors, fmt, torch.float64, grad))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False])
def test_conv_bn_act(backend, case, fmt, training):
    _skip_slow(backend, case, fmt, TRITON_SUBSET if training else {("g4_d2_s2", "nhwc")})
    x, weight, out_shape, geo = _inputs(case, fmt)
    cout = out_shape[1]
    gamma = torch.rand(cout, dtype=torch.float64) + 0.5
    beta = torch.randn(cout, dtype=torch.float64) * 0.3
    mean0, var0 = torch.randn(cout, dtype=torch.float64) * 0.2, torch.rand(cout, dtype=torch.float64) + 0.5
    grad = torch.randn(out_shape, dtype=torch.float64)
    stats = {}

    def make(fused_op):
        def fn(x, w, g, b):
            dt = torch.float64 if x.dtype == torch.float64 else torch.float32
            rm, rv = mean0.to(dt), var0.to(dt)
            if fused_op:
                out = ops.conv_bn_act(x, w, g, b, rm, rv, training, 0.2, 1e-3, geo["stride"], geo["padding"], None,
                                      True, geo["dilation"], geo["groups"])
            else:
                y = F.conv2d(x, w, None, geo["stride"], geo["padding"], geo["dilation"], geo["groups"])
                out = torch.relu(F.batch_norm(y, rm, rv, g, b, training, 0.2, 1e-3))
            stats[(fused_op, x.dtype)] = (rm, rv)
            return out
        return fn

    tensors = (x, weight, gamma, beta)
    got = _run(make(True), tensors, fmt, torch.float32, grad)
    aten = _run(make(False), tensors, fmt, torch.float32, grad)
    ref = _run(make(False), tensors, fmt, torch.float64, grad)
    assert got[0].is_contiguous(memory_format=FORMATS[fmt])
    _check_all(backend, ["out", "grad_x", "grad_weight", "grad_gamma", "grad_beta"], got, aten, ref)
    for i, name in enumerate(["running_mean", "running_var"]):
        assert_within(f"{backend}/{name}", stats[(True, torch.float32)][i], stats[(False, torch.float64)][i],
                      stats[(False, torch.float32)][i])
    if not training:
        assert torch.equal(stats[(True, torch.float32)][0], mean0.float())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_bn_relu_conv(backend, case, fmt):
    _skip_slow(backend, case, fmt)
    x, weight, out_shape, geo = _inputs(case, fmt)
    cin = x.shape[1]
    scale = torch.rand(cin, dtype=torch.float64) + 0.5
    shift = torch.randn(cin, dtype=torch.float64) * 0.5
    grad = torch.randn(out_shape, dtype=torch.float64)
    conv_args = (geo["stride"], geo["padding"], geo["dilation"], geo["groups"])

    def reference(x, sc, sh, w):
        a = torch.relu(x * sc.view(1, -1, 1, 1) + sh.view(1, -1, 1, 1))
        return F.conv2d(a, w, None, *conv_args)

    def fused(x, sc, sh, w):
        return ops.bn_relu_conv(x, sc, sh, w, geo["stride"], geo["padding"], True, geo["dilation"], geo["groups"])

    tensors = (x, scale, shift, weight)
    got = _run(fused, tensors, fmt, torch.float32, grad)
    assert got[0].is_contiguous(memory_format=FORMATS[fmt])
    _check_all(backend, ["out", "grad_x", "grad_scale", "grad_shift", "grad_weight"], got,
               _run(reference, tensors, fmt, torch.float32, grad), _run(reference, tensors, fmt, torch.float64, grad))


def test_triton_weight_grad_split_and_bias_per_group():
    """The weight-gradient kernel's group axis with the pixel axis split and the bias gradient (the op tests run
    one split and no bias): every group's rows of the partial sums land in their own place."""
    if "triton" not in BACKENDS:
        pytest.skip("Triton kernels need a GPU or the interpreter")
    from fastres.kernels import conv
    x64, w64, out_shape, geo = _inputs("g4_d2_s2", "nhwc")
    g64 = torch.randn(out_shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    args = ([geo["stride"]] * 2, list(geo["padding"]), list(geo["dilation"]), False, [0, 0], geo["groups"],
            [False, True, True])
    gw, gb = conv.conv2d_weight_grad(g64.float(), x64.float(), w64.shape, geo["stride"], geo["padding"],
                                     dilation=geo["dilation"], groups=geo["groups"], bias_grad=True, split=2)
    _, gw_ref, gb_ref = torch.ops.aten.convolution_backward(g64, x64, w64, [w64.shape[0]], *args)
    _, gw_aten, gb_aten = torch.ops.aten.convolution_backward(g64.float(), x64.float(), w64.float(), [w64.shape[0]],
                                                              *args)
    assert_within("grad_weight", gw, gw_ref, gw_aten)
    assert_within("grad_bias", gb, gb_ref, gb_aten)


# ------------------------------------------------------------------------------------------- opcheck, gradgrad
def _op_args(training=True, fmt="nchw", dtype=torch.float32):
    x = torch.randn(2, 4, 5, 5, dtype=dtype).contiguous(memory_format=FORMATS[fmt])
    w = torch.randn(6, 2, 3, 3, dtype=dtype)
    gamma, beta = torch.rand(6, dtype=dtype) + 0.5, torch.randn(6, dtype=dtype)
    mean, var = torch.randn(6, dtype=dtype) * 0.2, torch.rand(6, dtype=dtype) + 0.5
    r = torch.randn(2, 6, 3, 3, dtype=dtype).contiguous(memory_format=FORMATS[fmt])
    g = torch.randn(2, 6, 3, 3, dtype=dtype).contiguous(memory_format=FORMATS[fmt])
    sc, sh = torch.rand(4, dtype=dtype) + 0.5, torch.randn(4, dtype=dtype)
    geo = ([2, 2], [2, 2], True)  # stride, padding, relu; then dilation [2, 2] and groups 2 end every schema
    return {
        "conv_bias_act": (x, w, torch.randn(6, dtype=dtype), [2, 2], [2, 2], r, True, [2, 2], 2),
        "conv_bn_act_forward": (x, w, gamma, beta, mean, var, training, 0.1, 1e-5, [2, 2], [2, 2], r, True, [2, 2],
                                2),
        "conv_bn_act": (x, w, gamma, beta, mean.clone(), var.clone(), training, 0.1, 1e-5, [2, 2], [2, 2], r, True,
                        [2, 2], 2),
        "bn_relu_conv": (x, sc, sh, w, *geo, [2, 2], 2),
        "conv_backward": (g, x, w, [2, 2], [2, 2], [True, True, True], [2, 2], 2),
        "bn_relu_conv_backward": (g, x, sc, sh, w, [2, 2], [2, 2], True, [True, True, True, True], [2, 2], 2),
    }


@pytest.mark.parametrize("name,training,fmt", [
    ("conv_bias_act", False, "nchw"), ("conv_bias_act", False, "nhwc"), ("conv_bn_act_forward", True, "nhwc"),
    ("conv_bn_act_forward", False, "nchw"), ("conv_bn_act", True, "nchw"), ("bn_relu_conv", False, "nhwc"),
    ("conv_backward", False, "nhwc"), ("bn_relu_conv_backward", False, "nchw")])
def test_opcheck(name, training, fmt):
    # The automatic backend (the compiled one where built): opcheck checks the registration (schema with the new
    # arguments, fake implementation, autograd), and each of its runs is slow.
    opcheck(getattr(torch.ops.fastres, name).default, _op_args(training, fmt)[name])


def test_gradgradcheck_float64():
    """Double backward re-derives the conv from ctx's geometry: dilation and groups must reach it."""
    a = _op_args(dtype=torch.float64)
    x, w, b, s, p, r, _, d, g = a["conv_bias_act"]
    gamma, beta, mean, var = a["conv_bn_act_forward"][2:6]
    sc, sh = a["bn_relu_conv"][1:3]
    req = lambda *ts: [t.clone().requires_grad_() for t in ts]  # noqa: E731
    check = lambda f, inputs: torch.autograd.gradgradcheck(f, inputs, fast_mode=True)  # noqa: E731
    assert check(lambda x, w, b, r: ops.conv_bias_act(x, w, b, s, p, r, True, d, g), req(x, w, b, r))
    assert check(lambda x, w, ga, be: ops.conv_bn_act(x, w, ga, be, mean.clone(), var.clone(), True, 0.1, 1e-5, s, p,
                                                      None, True, d, g), req(x, w, gamma, beta))
    assert check(lambda x, sc, sh, w: ops.bn_relu_conv(x, sc, sh, w, s, p, True, d, g), req(x, sc, sh, w))


# ------------------------------------------------------------------------------------------- bad input
def _bad_cases():
    x, w = torch.randn(2, 8, 9, 9), torch.randn(6, 4, 3, 3)
    g, b, m, v = torch.ones(6), torch.zeros(6), torch.zeros(6), torch.ones(6)
    return [
        ("groups not dividing Cout", lambda: ops.conv_bias_act(x, torch.randn(6, 2, 3, 3), groups=4), ValueError,
         r"conv_bias_act: groups=4 does not divide the weight's 6 output channels"),
        ("groups channel mismatch", lambda: ops.conv_bias_act(x, w, groups=3), ValueError,
         r"channel mismatch: x has 8 channels.*4 input channels per group.*groups=3 = 12"),
        ("groups zero", lambda: ops.conv_bias_act(x, w, groups=0), ValueError, r"groups must be >= 1, got 0"),
        ("dilation zero", lambda: ops.conv_bias_act(x, w, groups=2, dilation=0), ValueError,
         r"conv_bias_act: dilation must be >= 1"),
        ("dilated kernel too large", lambda: ops.conv_bias_act(x, w, groups=2, dilation=5), ValueError,
         r"kernel 3x3 \(dilation=\[5, 5\]: it spans 11x11\) is larger than the padded input 9x9"),
        ("conv_bn_act groups", lambda: ops.conv_bn_act(x, w, g, b, m, v, True, groups=4), ValueError,
         r"conv_bn_act: groups=4 does not divide"),
        ("bn_relu_conv dilation", lambda: ops.bn_relu_conv(x, torch.ones(8), torch.zeros(8), w, groups=2,
                                                           dilation=(1, -1)), ValueError,
         r"bn_relu_conv: dilation must be >= 1"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_groups_and_dilation_are_named(backend, case):
    _, fn, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        fn()


def test_bad_groups_named_by_the_fake_implementation():
    x, w = torch.randn(2, 8, 9, 9, device="meta"), torch.randn(6, 4, 3, 3, device="meta")
    with pytest.raises(ValueError, match=r"channel mismatch.*groups=3"):
        torch.ops.fastres.conv_bias_act(x, w, None, [1, 1], [0, 0], None, True, [1, 1], 3)
    assert torch.ops.fastres.conv_bias_act(x, w, None, [1, 1], [2, 2], None, True, [2, 2], 2).shape == (2, 6, 9, 9)


# ------------------------------------------------------------------------------------------- converted blocks
def _downsample(inplanes, out, stride):
    return nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))


BLOCKS = {  # torchvision Bottleneck(inplanes, planes, stride, downsample?, groups, base_width, dilation)
    "resnext": (16, 4, 1, False, 4, 32, 1),            # width 8 in 4 groups: ResNeXt's grouped 3x3
    "resnext-stride2": (8, 4, 2, True, 4, 32, 1),      # and its projection
    "dilated": (16, 4, 1, False, 1, 64, 2),            # DeepLab's replace_stride_with_dilation block
    "dilated-projection": (8, 4, 1, True, 2, 64, 4),   # grouped and dilated, with a projection
}


def _converted(case):
    inplanes, planes, stride, ds, groups, base_width, dilation = BLOCKS[case]
    tv = tvr.Bottleneck(inplanes, planes, stride, _downsample(inplanes, planes * 4, stride) if ds else None,
                        groups=groups, base_width=base_width, dilation=dilation)
    randomize_(tv)
    ref = copy.deepcopy(tv).double()
    fr = fastres.convert(copy.deepcopy(tv))
    assert type(fr) is fnn.Bottleneck and fr.conv2.groups == groups and tuple(fr.conv2.dilation) == (dilation,) * 2
    return fr, tv, ref


@pytest.mark.parametrize("case", list(BLOCKS))
def test_converted_block_eval_runs_the_fused_grouped_conv(case):
    fr, tv, ref = _converted(case)
    set_mode(False, fr, tv, ref)
    x = torch.randn(2, fr.conv1.in_channels, 9, 9)
    groups, dilation = fr.conv2.groups, list(fr.conv2.dilation)
    with OpLog() as log:
        assert_no_grad_match(fr, tv, ref, x, f"{case} eval")
    # conv_bias_act(x, weight, bias, stride, padding, residual, relu, dilation, groups): the 3x3 ran fused with its
    # geometry (the dispatcher drops trailing defaults, so a plain conv's call is shorter).
    grouped = log.count("conv_bias_act", lambda a: len(a) >= 8 and list(a[7]) == dilation
                        and (a[8] if len(a) > 8 else 1) == groups)
    assert grouped == 1
    assert log.count("conv_bias_act") == 3 + (fr.downsample is not None)


@pytest.mark.parametrize("mode", ["lean", "recompute"])
@pytest.mark.parametrize("case", list(BLOCKS))
def test_converted_block_trains_through_the_lean_chain(case, mode, monkeypatch):
    fr, tv, ref = _converted(case)
    fnn.set_memory_mode(fr, mode)
    ran = count_lean_blocks(monkeypatch)
    set_mode(True, fr, tv, ref)
    x = torch.randn(2, fr.conv1.in_channels, 9, 9)
    assert_runs_match(fr, tv, ref, x, f"{case} {mode} train")
    assert ran and all(ran), "the lean chain did not run"


@pytest.mark.parametrize("mode", ["lean", "recompute"])
def test_converted_block_double_backward(mode):
    """A gradient penalty through the lean chain (create_graph=True re-derives each conv from its saved geometry)
    equals torchvision's, in float64."""
    _, _, tv = _converted("dilated-projection")
    fr = fastres.convert(copy.deepcopy(tv))
    fnn.set_memory_mode(fr, mode)
    set_mode(True, fr, tv)
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)

    def penalty_grads(model):
        xi = x.clone().requires_grad_()
        gx, = torch.autograd.grad(model(xi).square().sum(), xi, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), [p for p in model.parameters()])

    for got, want in zip(penalty_grads(fr), penalty_grads(tv)):
        torch.testing.assert_close(got, want)
