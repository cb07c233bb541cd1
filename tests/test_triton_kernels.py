"""The Triton kernels (fastres.kernels) and the triton backend, against float64 references.

Without a GPU they run on CPU tensors under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), in
fp32: the interpreter's bf16 tl.dot is wrong in triton 3.8/3.9, so low-precision MMA is tested on a GPU
(`pytest -m cuda`). The interpreter is slow: shapes are tiny and chosen to hit the awkward cases (H = W = 7 and
13, channel counts that are not multiples of 16, N = 1, stride 2, the 7x7 stem).

On a GPU the fp32 tests pin full fp32 on both sides (no TF32): cuDNN may or may not pick a TF32 algorithm for a
tiny shape, so ATen's own error would be a moving target.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastres
from fastres import ops
from tolerance import assert_within

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from fastres.kernels import autotune, bn, conv  # noqa: E402
from fastres.ops import backend_torch, backend_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not conv.interpreting():
    pytest.skip("no GPU and the Triton kernels were not built for the interpreter (TRITON_INTERPRET=1)",
                allow_module_level=True)

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
LOW_PRECISION = (torch.bfloat16, torch.float16)

# (N, Cin, H, W, Cout, k, stride, padding)
CASES = {
    "3x3_c5": (2, 5, 9, 9, 7, 3, 1, 1),        # C not a multiple of 16 (k-flat gather)
    "stem": (1, 3, 13, 13, 8, 7, 2, 3),        # the 7x7 stride-2 stem, N = 1
    "1x1_h7": (2, 20, 7, 7, 13, 1, 1, 0),      # a bottleneck 1x1 (a plain GEMM), odd Cout
    "1x1_s2": (2, 18, 8, 8, 6, 1, 2, 0),       # a strided 1x1 (downsample)
    "3x3_s2_h13": (1, 24, 13, 13, 10, 3, 2, 1),  # per-tap gather, C = 24 spans two K slices
}


@pytest.fixture(autouse=True)
def _full_fp32():
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets its own autotune cache: nothing is read from or written to the user's."""
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path / "cache"))


def _fmt(t, fmt):
    return t.contiguous(memory_format=FORMATS[fmt])


def _out_size(case):
    n, cin, h, w, cout, k, s, p = case
    return n, cout, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1


def _inputs(case, fmt):
    """float64 tensors of one conv problem: x, weight, a per-channel (bias, scale, in_scale, in_shift), residual."""
    n, cin, h, w, cout, k, s, p = case
    x = _fmt(torch.randn(n, cin, h, w, dtype=torch.float64), fmt)
    weight = torch.randn(cout, cin, k, k, dtype=torch.float64) / (cin * k * k) ** 0.5
    return {
        "x": x, "weight": weight,
        "bias": torch.randn(cout, dtype=torch.float64),
        "scale": torch.rand(cout, dtype=torch.float64) + 0.5,
        "in_scale": torch.rand(cin, dtype=torch.float64) + 0.5,
        "in_shift": torch.randn(cin, dtype=torch.float64) * 0.5,
        "residual": _fmt(torch.randn(*_out_size(case), dtype=torch.float64), fmt),
    }


def _to(t, dtype):
    return None if t is None else t.to(device=DEVICE, dtype=dtype)


# ------------------------------------------------------------------------------------------------ forward kernel
EPILOGUES = {  # name: which of bias / scale / residual / relu / raw / stats / prologue / prologue relu are on
    "bare": dict(),
    "bias_res_relu": dict(bias=True, residual=True, relu=True),
    "bn_eval_raw_stats": dict(bias=True, scale=True, raw=True, stats=True, relu=True),
    "prologue_relu": dict(prologue=True, in_relu=True, bias=True),
    "prologue_stats": dict(prologue=True, in_relu=False, stats=True),
}


def _conv_reference(t, dtype, case, flags):
    """(out, raw, pre) with plain torch ops in `dtype`: pre = conv * scale + bias, what the statistics describe."""
    n, cin, h, w, cout, k, s, p = case
    x = _to(t["x"], dtype)
    if flags.get("prologue"):
        x = x * _to(t["in_scale"], dtype).view(1, -1, 1, 1) + _to(t["in_shift"], dtype).view(1, -1, 1, 1)
        x = torch.relu(x) if flags.get("in_relu") else x
    raw = F.conv2d(x, _to(t["weight"], dtype), None, s, p)
    pre = raw
    if flags.get("scale"):
        pre = pre * _to(t["scale"], dtype).view(1, -1, 1, 1)
    if flags.get("bias"):
        pre = pre + _to(t["bias"], dtype).view(1, -1, 1, 1)
    out = pre + _to(t["residual"], dtype) if flags.get("residual") else pre
    out = torch.relu(out) if flags.get("relu") else out
    return out, raw, pre


def _run_conv_kernel(t, dtype, case, flags, config=None):
    n, cin, h, w, cout, k, s, p = case
    opt = lambda name: _to(t[name], dtype) if flags.get(name) else None  # noqa: E731
    return conv.conv2d(
        _to(t["x"], dtype), _to(t["weight"], dtype), s, p, bias=opt("bias"),
        scale=_to(t["scale"], torch.float32) if flags.get("scale") else None, residual=opt("residual"),
        relu=bool(flags.get("relu")),
        in_scale=_to(t["in_scale"], torch.float32) if flags.get("prologue") else None,
        in_shift=_to(t["in_shift"], torch.float32) if flags.get("prologue") else None,
        in_relu=bool(flags.get("in_relu")), store_raw=bool(flags.get("raw")), stats=bool(flags.get("stats")),
        config=config)


def _check_conv_forward(case, epilogue, fmt, dtype, config=None):
    flags = EPILOGUES[epilogue]
    t = _inputs(CASES[case], fmt)
    out, raw, stats = _run_conv_kernel(t, dtype, CASES[case], flags, config)
    ref_out, ref_raw, ref_pre = _conv_reference(t, torch.float64, CASES[case], flags)
    aten_out, aten_raw, aten_pre = _conv_reference(t, dtype, CASES[case], flags)
    assert out.dtype == dtype and out.is_contiguous(memory_format=FORMATS[fmt])
    assert_within("out", out, ref_out, aten_out)
    if flags.get("raw"):
        assert_within("raw", raw, ref_raw, aten_raw)
    else:
        assert raw is None
    if flags.get("stats"):
        # Combined through the training finalize with momentum 1: the new running statistics are then the batch
        # mean and unbiased variance of conv * scale + bias.
        c = ref_pre.shape[1]
        ones, zeros = torch.ones(c, device=DEVICE), torch.zeros(c, device=DEVICE)
        mean, _, _, _, running_mean, running_var = bn.bn_finalize(stats, ones, zeros, zeros, ones, 1.0, 1e-5)
        ref_var, ref_mean = torch.var_mean(ref_pre, dim=(0, 2, 3), correction=1)
        aten_var, aten_mean = torch.var_mean(aten_pre.float(), dim=(0, 2, 3), correction=1)
        assert_within("batch mean", mean, ref_mean, aten_mean)
        assert_within("running mean", running_mean, ref_mean, aten_mean)
        assert_within("batch var", running_var, ref_var, aten_var)
    else:
        assert stats is None


@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("case", list(CASES))
def test_conv_forward(case, epilogue):
    fmt = "nchw" if case == "1x1_s2" else "nhwc"  # NCHW works through strides; one case keeps it honest
    _check_conv_forward(case, epilogue, fmt, torch.float32)


def test_conv_forward_per_tap_gather_with_partial_k_slice():
    """The per-tap gather (the default for C >= 16 on a GPU) with a channel count that leaves the last K slice
    partly masked, and with the prologue, whose masked lanes must stay zero."""
    config = conv.TileConfig(32, 16, 16, k_flat=False)
    _check_conv_forward("3x3_c5", "prologue_relu", "nhwc", torch.float32, config)
    _check_conv_forward("3x3_s2_h13", "bn_eval_raw_stats", "nchw", torch.float32, config)


def test_conv_forward_k_flat_gather_with_many_channels():
    _check_conv_forward("3x3_s2_h13", "bias_res_relu", "nhwc", torch.float32,
                        conv.TileConfig(16, 16, 32, k_flat=True))


def test_prologue_keeps_padding_zero():
    """Zero padding applies to the normalized activation: with a shift that makes relu(shift) > 0 everywhere, a
    prologue that normalized the padding too would change every border output."""
    x = torch.zeros(1, 16, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w = torch.ones(4, 16, 3, 3, device=DEVICE)
    out, _, _ = conv.conv2d(x, w, 1, 1, in_scale=torch.ones(16, device=DEVICE),
                            in_shift=torch.ones(16, device=DEVICE), in_relu=True)
    expected = F.conv2d(torch.ones(1, 16, 5, 5, device=DEVICE), w, None, 1, 1)
    torch.testing.assert_close(out, expected)


def test_conv_forward_bf16_epilogue_in_interpreter():
    """bf16 loads, epilogue math and stores (the MMA runs on fp32 copies of the bf16 tiles under the interpreter;
    on a GPU the bf16 MMA itself is tested by the cuda tests)."""
    _check_conv_forward("1x1_h7", "bias_res_relu", "nhwc", torch.bfloat16)


# ------------------------------------------------------------------------------------------------ backward kernels
def _aten_conv_grads(t, dtype, case, grad, bias, prologue=False):
    n, cin, h, w, cout, k, s, p = case
    x = _to(t["x"], dtype).requires_grad_()
    weight = _to(t["weight"], dtype).requires_grad_()
    b = _to(t["bias"], dtype).requires_grad_() if bias else None
    xin = x
    if prologue:
        xin = torch.relu(x * _to(t["in_scale"], dtype).view(1, -1, 1, 1) + _to(t["in_shift"], dtype).view(1, -1, 1, 1))
    out = F.conv2d(xin, weight, b, s, p)
    leaves = [x, weight] + ([b] if bias else [])
    return torch.autograd.grad(out, leaves, _to(grad, dtype))


@pytest.mark.parametrize("case", list(CASES))
def test_conv_input_grad(case):
    n, cin, h, w, cout, k, s, p = CASES[case]
    t = _inputs(CASES[case], "nhwc")
    grad = _fmt(torch.randn(*_out_size(CASES[case]), dtype=torch.float64), "nhwc")
    got = conv.conv2d_input_grad(_to(grad, torch.float32), _to(t["weight"], torch.float32), (n, cin, h, w), s, p)
    ref = _aten_conv_grads(t, torch.float64, CASES[case], grad, False)[0]
    aten = _aten_conv_grads(t, torch.float32, CASES[case], grad, False)[0]
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_within("grad_x", got, ref, aten)


@pytest.mark.parametrize("case,split,prologue", [("3x3_c5", 1, False), ("stem", 2, False), ("1x1_h7", 3, True),
                                                  ("1x1_s2", 1, False), ("3x3_s2_h13", 2, True)])
def test_conv_weight_grad(case, split, prologue):
    """Split along the pixel axis (fp32 partials summed in order), the bias gradient from the same pass, and the
    prologue recomputing the normalized input the forward saw."""
    n, cin, h, w, cout, k, s, p = CASES[case]
    t = _inputs(CASES[case], "nhwc")
    grad = _fmt(torch.randn(*_out_size(CASES[case]), dtype=torch.float64), "nhwc")
    kwargs = {}
    if prologue:
        kwargs = dict(in_scale=_to(t["in_scale"], torch.float32), in_shift=_to(t["in_shift"], torch.float32))
    got_w, got_b = conv.conv2d_weight_grad(_to(grad, torch.float32), _to(t["x"], torch.float32), (cout, cin, k, k),
                                           s, p, bias_grad=True, split=split, **kwargs)
    ref = _aten_conv_grads(t, torch.float64, CASES[case], grad, True, prologue)
    aten = _aten_conv_grads(t, torch.float32, CASES[case], grad, True, prologue)
    assert_within("grad_weight", got_w, ref[1], aten[1])
    assert_within("grad_bias", got_b, ref[2], aten[2])


def test_bn_finalize_of_an_empty_batch():
    """N = 0: no tile to read and a count of 0. Mean 0 and variance 0 (as fastres._C's finalize and ATen give
    it), the running statistics unchanged and not aliased, nothing NaN."""
    y = torch.empty(0, 6, 4, 4, device=DEVICE).contiguous(memory_format=torch.channels_last)
    stats = bn.channel_stats(y)
    assert stats.count == 0 and stats.tile_mean.shape == (0, 6)
    gamma, beta = torch.rand(6, device=DEVICE) + 0.5, torch.randn(6, device=DEVICE)
    running_mean, running_var = torch.randn(6, device=DEVICE), torch.rand(6, device=DEVICE) + 0.5
    mean, invstd, scale, shift, new_mean, new_var = bn.bn_finalize(stats, gamma, beta, running_mean, running_var,
                                                                  0.1, 1e-5)
    expected_invstd = torch.full((6,), 1e-5, dtype=torch.float64).rsqrt().float()
    torch.testing.assert_close(mean, torch.zeros(6, device=DEVICE))
    torch.testing.assert_close(invstd, expected_invstd.to(DEVICE))
    torch.testing.assert_close(scale, gamma * expected_invstd.to(DEVICE))
    torch.testing.assert_close(shift, beta)
    assert torch.equal(new_mean, running_mean) and torch.equal(new_var, running_var)
    assert new_mean.data_ptr() != running_mean.data_ptr() and new_var.data_ptr() != running_var.data_ptr()


# ------------------------------------------------------------------------------------------------ BN kernels
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_bn_statistics_no_cancellation(fmt):
    """Channels whose mean is 1e3 times their spread: a plain sum of squares in fp32 loses the variance to
    cancellation; per-tile centered partials combined with Chan's update keep it."""
    y64 = torch.randn(3, 6, 11, 7, dtype=torch.float64) + torch.tensor([1e3, -1e3, 0, 5, 1e2, -3],
                                                                     dtype=torch.float64).view(1, -1, 1, 1)
    y64 = _fmt(y64, fmt)
    y = _to(y64, torch.float32)
    gamma, beta = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    rm, rv = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.5
    mean, invstd, scale, shift, new_rm, new_rv = bn.bn_finalize(
        bn.channel_stats(y), _to(gamma, torch.float32), _to(beta, torch.float32), _to(rm, torch.float32),
        _to(rv, torch.float32), 0.3, 1e-5)

    def reference(t, dtype):
        r_mean, r_var = _to(rm, dtype), _to(rv, dtype)
        z = F.batch_norm(_to(t, dtype), r_mean, r_var, _to(gamma, dtype), _to(beta, dtype), True, 0.3, 1e-5)
        return z, r_mean, r_var

    ref, aten = reference(y64, torch.float64), reference(y, torch.float32)
    assert_within("running_mean", new_rm, ref[1], aten[1])
    assert_within("running_var", new_rv, ref[2], aten[2])
    out = bn.bn_act(y, scale, _to(beta, torch.float32), None, relu=False, center=mean)
    assert out.is_contiguous(memory_format=FORMATS[fmt])
    assert_within("normalized", out, ref[0], aten[0])


@pytest.mark.parametrize("training,relu,residual_grad", [(True, True, True), (True, False, False),
                                                          (False, True, False)])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_bn_act_backward(training, relu, residual_grad, fmt):
    shape = (2, 13, 7, 5)
    conv_out64 = _fmt(torch.randn(*shape, dtype=torch.float64) * 2 + 1, fmt)
    grad64 = _fmt(torch.randn(*shape, dtype=torch.float64), fmt)
    gamma = torch.rand(13, dtype=torch.float64) + 0.5
    beta = torch.randn(13, dtype=torch.float64)
    if training:
        var, mean = torch.var_mean(conv_out64, dim=(0, 2, 3), correction=0)
    else:
        mean, var = torch.randn(13, dtype=torch.float64), torch.rand(13, dtype=torch.float64) + 0.5
    invstd = torch.rsqrt(var + 1e-5)
    out64 = conv_out64 - mean.view(1, -1, 1, 1)
    out64 = out64 * (gamma * invstd).view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
    out64 = torch.relu(out64) if relu else out64

    def run(fn, dtype):
        stat = torch.float64 if dtype == torch.float64 else torch.float32
        return fn(_to(grad64, dtype), _to(out64, dtype), _to(conv_out64, dtype), _to(mean, stat),
                  _to(invstd, stat), _to(gamma, stat), relu, training, residual_grad)

    got = run(bn.bn_act_backward, torch.float32)
    ref = run(backend_torch.bn_act_backward, torch.float64)
    aten = run(backend_torch.bn_act_backward, torch.float32)
    assert got[0].is_contiguous(memory_format=FORMATS[fmt])
    assert (got[1] is not None) == residual_grad
    for name, g, r, a in zip(["grad_conv_out", "grad_residual", "grad_bn_weight", "grad_bn_bias"], got, ref, aten):
        if r is not None:
            assert_within(name, g, r, a)


# ------------------------------------------------------------------------------------------------ the backend
def _op_case(case, fmt, residual, dtype=torch.float32):
    t = _inputs(CASES[case], fmt)
    cout = t["weight"].shape[0]
    t["gamma"], t["beta"] = torch.rand(cout, dtype=torch.float64) + 0.5, torch.randn(cout, dtype=torch.float64)
    t["rm"], t["rv"] = torch.randn(cout, dtype=torch.float64) * 0.2, torch.rand(cout, dtype=torch.float64) + 0.5
    t["grad"] = _fmt(torch.randn(*_out_size(CASES[case]), dtype=torch.float64), fmt)
    if not residual:
        t["residual"] = None
    return t


def _run_conv_bn_act(t, case, dtype, training, relu, backend):
    """(out, running_mean, running_var, grad_x, grad_weight, grad_bn_weight, grad_bn_bias[, grad_residual])."""
    n, cin, h, w, cout, k, s, p = CASES[case]
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    leaf = lambda v, dt: _to(v, dt).requires_grad_()  # noqa: E731
    x = _to(t["x"], dtype).requires_grad_()
    weight, gamma, beta = leaf(t["weight"], dtype), leaf(t["gamma"], pdt), leaf(t["beta"], pdt)
    rm, rv = _to(t["rm"], pdt), _to(t["rv"], pdt)
    res = leaf(t["residual"], dtype) if t["residual"] is not None else None
    leaves = [x, weight, gamma, beta] + ([res] if res is not None else [])
    if backend is None:
        y = F.batch_norm(F.conv2d(x, weight, None, s, p), rm, rv, gamma, beta, training, 0.2, 1e-3)
        y = y + res if res is not None else y
        out = torch.relu(y) if relu else y
    else:
        with fastres.backend(backend):
            out = ops.conv_bn_act(x, weight, gamma, beta, rm, rv, training, 0.2, 1e-3, s, p, res, relu)
    return (out, rm, rv) + torch.autograd.grad(out, leaves, _to(t["grad"], dtype))


@pytest.mark.parametrize("case,fmt,training,residual,relu", [
    ("3x3_c5", "nhwc", True, True, True), ("stem", "nhwc", True, False, True), ("1x1_h7", "nchw", True, True, False),
    ("3x3_s2_h13", "nhwc", False, True, True), ("1x1_s2", "nhwc", False, False, False)])
def test_conv_bn_act_triton_backend(case, fmt, training, residual, relu):
    t = _op_case(case, fmt, residual)
    got = _run_conv_bn_act(t, case, torch.float32, training, relu, "triton")
    ref = _run_conv_bn_act(t, case, torch.float64, training, relu, None)
    aten = _run_conv_bn_act(t, case, torch.float32, training, relu, None)
    assert got[0].is_contiguous(memory_format=FORMATS[fmt])
    names = ["out", "running_mean", "running_var", "grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias",
             "grad_residual"]
    for name, g, r, a in zip(names, got, ref, aten):
        assert_within(name, g, r, a)
    if not training:
        assert torch.equal(got[1], _to(t["rm"], torch.float32)) and torch.equal(got[2], _to(t["rv"], torch.float32))


@pytest.mark.parametrize("case,fmt,bias,residual,relu", [
    ("3x3_c5", "nhwc", True, True, True), ("1x1_s2", "nchw", False, True, False), ("stem", "nhwc", True, False, True)])
def test_conv_bias_act_triton_backend(case, fmt, bias, residual, relu):
    n, cin, h, w, cout, k, s, p = CASES[case]
    t = _op_case(case, fmt, residual)

    def run(dtype, backend):
        x = _to(t["x"], dtype).requires_grad_()
        weight = _to(t["weight"], dtype).requires_grad_()
        b = _to(t["bias"], dtype).requires_grad_() if bias else None
        res = _to(t["residual"], dtype).requires_grad_() if residual else None
        if backend is None:
            y = F.conv2d(x, weight, b, s, p)
            y = y + res if residual else y
            out = torch.relu(y) if relu else y
        else:
            with fastres.backend(backend):
                out = ops.conv_bias_act(x, weight, b, s, p, res, relu)
        leaves = [v for v in (x, weight, b, res) if v is not None]
        return (out,) + torch.autograd.grad(out, leaves, _to(t["grad"], dtype))

    got, ref, aten = run(torch.float32, "triton"), run(torch.float64, None), run(torch.float32, None)
    assert got[0].is_contiguous(memory_format=FORMATS[fmt])
    for i, (g, r, a) in enumerate(zip(got, ref, aten)):
        assert_within(f"result {i}", g, r, a)


@pytest.mark.parametrize("case", ["1x1_s2", "3x3_s2_h13"])
def test_backend_conv_backward(case):
    """The backend's conv_backward (the Triton input and weight gradient kernels), for fastres.ops to call."""
    t = _inputs(CASES[case], "nhwc")
    n, cin, h, w, cout, k, s, p = CASES[case]
    grad = _fmt(torch.randn(*_out_size(CASES[case]), dtype=torch.float64), "nhwc")
    got = backend_triton.conv_backward(_to(grad, torch.float32), _to(t["x"], torch.float32),
                                       _to(t["weight"], torch.float32), [s, s], [p, p], (True, True, True))
    ref = _aten_conv_grads(t, torch.float64, CASES[case], grad, True)
    aten = _aten_conv_grads(t, torch.float32, CASES[case], grad, True)
    for name, g, r, a in zip(["grad_x", "grad_weight", "grad_bias"], got, ref, aten):
        assert_within(name, g, r, a)
    only_w = backend_triton.conv_backward(_to(grad, torch.float32), _to(t["x"], torch.float32),
                                          _to(t["weight"], torch.float32), [s, s], [p, p], (False, True, False))
    assert only_w[0] is None and only_w[2] is None
    torch.testing.assert_close(only_w[1], got[1])


@pytest.mark.parametrize("provider", ["triton", "aten"])
@pytest.mark.parametrize("case,relu", [("3x3_c5", True), ("1x1_s2", False), ("3x3_s2_h13", True)])
def test_bn_relu_conv_prologue_op(case, relu, provider, monkeypatch):
    """The backend functions behind fastres::bn_relu_conv: forward with the BN-apply prologue, and every gradient,
    against autograd through the plain formula; on the Triton kernels and on the ATen path the per-layer choice
    can pick (BN apply + ReLU kernel, then ATen's conv)."""
    monkeypatch.setattr(backend_triton, "_default_provider", lambda x, masked_tiles=False: provider)
    n, cin, h, w, cout, k, s, p = CASES[case]
    t = _inputs(CASES[case], "nhwc")
    grad = _fmt(torch.randn(*_out_size(CASES[case]), dtype=torch.float64), "nhwc")

    def reference(dtype):
        x = _to(t["x"], dtype).requires_grad_()
        scale, shift = _to(t["in_scale"], dtype).requires_grad_(), _to(t["in_shift"], dtype).requires_grad_()
        weight = _to(t["weight"], dtype).requires_grad_()
        z = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        out = F.conv2d(torch.relu(z) if relu else z, weight, None, s, p)
        return (out,) + torch.autograd.grad(out, (x, scale, shift, weight), _to(grad, dtype))

    x, weight = _to(t["x"], torch.float32), _to(t["weight"], torch.float32)
    scale, shift = _to(t["in_scale"], torch.float32), _to(t["in_shift"], torch.float32)
    out = backend_triton.bn_relu_conv(x, scale, shift, weight, [s, s], [p, p], relu)
    grads = backend_triton.bn_relu_conv_backward(_to(grad, torch.float32), x, scale, shift, weight, [s, s], [p, p],
                                                 relu, (True, True, True, True))
    ref, aten = reference(torch.float64), reference(torch.float32)
    for name, g, r, a in zip(["out", "grad_x", "grad_scale", "grad_shift", "grad_weight"], (out,) + grads, ref, aten):
        assert_within(name, g, r, a)


def test_add_relu_and_no_mutation():
    x = torch.randn(2, 13, 5, 3, device=DEVICE).contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 13, 5, 3, device=DEVICE)  # another layout on purpose
    x0, r0 = x.clone(), r.clone()
    with fastres.backend("triton"):
        out = ops.add_relu(x, r)
        t = _op_case("3x3_c5", "nhwc", True)
        inputs = [_to(t[k], torch.float32) for k in ("x", "weight", "gamma", "beta", "residual")]
        before = [v.clone() for v in inputs]
        rm, rv = _to(t["rm"], torch.float32), _to(t["rv"], torch.float32)
        ops.conv_bn_act(inputs[0], inputs[1], inputs[2], inputs[3], rm, rv, False, 0.1, 1e-5, 1, 1, inputs[4])
        assert torch.equal(rm, _to(t["rm"], torch.float32)), "eval must not touch the running statistics"
    assert torch.equal(out, torch.relu(x + r)) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, x0) and torch.equal(r, r0)
    assert all(torch.equal(a, b) for a, b in zip(inputs, before)), "an input was mutated"


@pytest.mark.parametrize("name,training", [("conv_bias_act", False), ("conv_bn_act_forward", True),
                                           ("conv_bn_act_forward", False), ("add_relu", False)])
def test_opcheck_triton_backend(name, training):
    """The triton backend's outputs agree with the ops' fake implementations (shapes, dtypes, strides)."""
    from torch.library import opcheck
    cl = torch.channels_last
    x = torch.randn(2, 3, 5, 5, device=DEVICE).contiguous(memory_format=cl)
    w = torch.randn(4, 3, 3, 3, device=DEVICE)
    g, b, m, v = (torch.rand(4, device=DEVICE) + 0.5, torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE),
                  torch.rand(4, device=DEVICE) + 0.5)
    r = torch.randn(2, 4, 3, 3, device=DEVICE).contiguous(memory_format=cl)
    args = {"conv_bias_act": (x, w, torch.randn(4, device=DEVICE), [2, 2], [1, 1], r, True),
            "conv_bn_act_forward": (x, w, g, b, m, v, training, 0.1, 1e-5, [2, 2], [1, 1], r, True),
            "add_relu": (torch.randn(2, 4, 3, 3, device=DEVICE), r)}[name]
    with fastres.backend("triton"):
        opcheck(getattr(torch.ops.fastres, name).default, args)


def test_unsupported_reasons():
    assert backend_triton.unsupported("conv_bias_act", DEVICE) is None
    assert "no kernel" in backend_triton.unsupported("no_such_op", DEVICE)
    assert "mps" in backend_triton.unsupported("conv_bias_act", "mps")


def test_float64_runs_the_reference():
    x, w = torch.randn(1, 3, 5, 5, dtype=torch.float64, device=DEVICE), torch.randn(4, 3, 3, 3, dtype=torch.float64,
                                                                                   device=DEVICE)
    with fastres.backend("triton"):
        out = ops.conv_bias_act(x, w, None, 1, 1)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.relu(F.conv2d(x, w, None, 1, 1)))


# ------------------------------------------------------------------------------------------------ autotune
def test_autotune_chooses_fastest_and_persists(monkeypatch):
    """With measurements (faked here: no GPU to time), the fastest candidate wins, a failing one is skipped, the
    choice and its timings land in the JSON cache, and a fresh process-level cache reads them back."""
    timings = {"triton 64x64x64 w4 s4": 2.0, "triton 128x128x64 w8 s3": 1.0, "aten": 1.5}
    measured = []

    def fake_run(choice):
        label = choice.label()

        def go():
            if label not in timings:
                raise RuntimeError("out of shared memory")
            return label
        return go

    def fake_bench(fn):
        label = fn()
        measured.append(label)
        return timings[label]

    monkeypatch.setattr(autotune, "can_measure", lambda device: True)
    monkeypatch.setattr(autotune, "bench", fake_bench)
    candidates = [autotune.Choice("triton", conv.TileConfig(64, 64, 64, 4, 4)),
                  autotune.Choice("triton", conv.TileConfig(128, 128, 64, 8, 3)),
                  autotune.Choice("triton", conv.TileConfig(256, 128, 64, 8, 3)),  # "fails to compile"
                  autotune.Choice("aten")]
    default = autotune.Choice("aten")
    device = torch.device("cpu")
    choice = autotune.choose("problem-a", device, default, lambda: candidates, fake_run)
    assert choice == candidates[1]
    assert sorted(measured) == sorted(timings)
    with open(autotune.cache_path()) as f:
        entries = json.load(f)
    (key, entry), = entries.items()
    assert key.startswith("problem-a|") and entry["provider"] == "triton"
    assert entry["ms"]["aten"] == 1.5 and entry["ms"]["triton 256x128x64 w8 s3"].startswith("failed")
    # cached: no new measurement, even from a freshly loaded cache file
    measured.clear()
    autotune._cache = None
    assert autotune.choose("problem-a", device, default, lambda: candidates, fake_run) == candidates[1]
    assert measured == []
    # the per-layer choice can land on ATen
    timings["aten"] = 0.5
    assert autotune.choose("problem-b", device, default, lambda: candidates, fake_run).provider == "aten"


def _fake_candidates(behaviour):
    """Choices whose run() returns, raises or computes as `behaviour[label]` says: ("ok", ms), ("wrong", ms) or
    ("raise", error)."""
    x = torch.randn(32, dtype=torch.float64)
    timings = {}

    def run(choice):
        kind, value = behaviour[choice.label()]

        def go():
            if kind == "raise":
                raise value
            out = x.float().exp()
            return out * 1.001 if kind == "wrong" else out
        timings[go] = value
        return go

    return run, timings, (lambda: [x.exp()])


def test_autotune_checks_each_candidate_before_timing_it(monkeypatch):
    """A fast but wrong candidate (a config the GPU's Triton miscompiles) is never timed, chosen or cached; one that
    fails to compile is skipped; among the correct ones the fastest wins."""
    fast_wrong, failing, slow = (autotune.Choice("triton", conv.TileConfig(*t)) for t in
                                 [(16, 16, 16), (32, 16, 16), (64, 16, 16)])
    aten = autotune.Choice("aten")
    behaviour = {fast_wrong.label(): ("wrong", 0.1), failing.label(): ("raise", ValueError("out of resources")),
                 slow.label(): ("ok", 3.0), aten.label(): ("ok", 2.0)}
    run, timings, reference = _fake_candidates(behaviour)
    timed = []
    monkeypatch.setattr(autotune, "can_measure", lambda device: True)
    monkeypatch.setattr(autotune, "bench", lambda fn: timed.append(fn) or timings[fn])
    candidates = [fast_wrong, failing, slow, aten]
    assert autotune.choose("p", torch.device("cpu"), fast_wrong, lambda: candidates, run, reference) == aten
    assert len(timed) == 2  # only the two correct candidates were timed
    (entry,) = json.load(open(autotune.cache_path())).values()
    assert entry["provider"] == "aten" and entry["checked"] and entry["best_triton"] == list(slow.config)
    assert entry["ms"][fast_wrong.label()].startswith("wrong: output 0: max error")
    assert entry["ms"][failing.label()].startswith("failed: ValueError")
    behaviour[slow.label()] = ("ok", 1.0)
    assert autotune.choose("q", torch.device("cpu"), aten, lambda: candidates, run, reference) == slow


def test_autotune_stops_at_a_cuda_fault_naming_the_config(monkeypatch):
    crashing = autotune.Choice("triton", conv.TileConfig(128, 64, 32, 4, 4))
    aten = autotune.Choice("aten")
    fault = RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")
    run, timings, reference = _fake_candidates({crashing.label(): ("raise", fault), aten.label(): ("ok", 1.0)})
    monkeypatch.setattr(autotune, "can_measure", lambda device: True)
    monkeypatch.setattr(autotune, "bench", lambda fn: timings[fn])
    with pytest.raises(autotune.CandidateCrashedError, match="triton 128x64x32 w4 s4"):
        autotune.choose("p", torch.device("cpu"), aten, lambda: [aten, crashing], run, reference)
    assert not os.path.exists(autotune.cache_path())


def test_tolerance_check_of_candidates():
    ref = [torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)]
    aten_errors = [1e-7]
    assert autotune.violation([ref[0].float()], ref, aten_errors) is None
    assert "max error inf" in autotune.violation([torch.tensor([1.0, float("nan"), 3.0])], ref, aten_errors)
    assert autotune.violation([ref[0].float() + 1e-3], ref, aten_errors) is not None
    assert autotune.violation([torch.zeros(2)], ref, aten_errors) is not None  # wrong shape


def test_every_tuned_problem_checks_its_candidates(monkeypatch):
    """The measuring path of every op the triton backend tunes, in the interpreter (with small tile configs and a
    fake timer): each candidate, Triton and ATen, passes the tolerance check against the problem's float64
    reference, so the references and the compared outputs line up."""
    small = [conv.TileConfig(16, 16, 16), conv.TileConfig(32, 16, 16, k_flat=True)]
    monkeypatch.setattr(autotune, "can_measure", lambda device: True)
    monkeypatch.setattr(autotune, "bench", lambda fn: 1.0)
    monkeypatch.setattr(autotune, "forward_configs", lambda *args: small)
    monkeypatch.setattr(autotune, "wgrad_configs", lambda *args: small[:1])
    x = torch.randn(2, 5, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = torch.randn(7, 5, 3, 3, requires_grad=True), torch.randn(7, requires_grad=True)
    r = torch.randn(2, 7, 6, 6).contiguous(memory_format=torch.channels_last)
    g, beta, scale, shift = torch.rand(7) + 0.5, torch.randn(7), torch.rand(5) + 0.5, torch.randn(5)
    with fastres.backend("triton"):
        out = ops.conv_bias_act(x, w, b, 1, 1, r, True)
        for training in (True, False):
            out = out + ops.conv_bn_act(x, w, g, beta, torch.zeros(7), torch.ones(7), training, padding=1)
        out = out + ops.bn_relu_conv(x, scale.requires_grad_(), shift, w, 1, 1)
        out.sum().backward()
    entries = autotune.cache().entries()
    kinds = {key.partition("|")[0] for key in entries}
    assert kinds == {"conv_bias_act", "conv_stats", "conv_bn_eval", "bn_relu_conv", "dgrad", "wgrad",
                     "wgrad_prologue"}, kinds
    for key, entry in entries.items():
        assert entry["checked"], key
        assert all(isinstance(ms, float) for ms in entry["ms"].values()), (key, entry["ms"])
        assert "aten" in entry["ms"] and len(entry["ms"]) > 1, key


def test_autotune_does_not_measure_in_interpreter_or_when_disabled(monkeypatch):
    calls = []
    monkeypatch.setattr(autotune, "bench", lambda fn: calls.append(fn) or 1.0)
    default = autotune.Choice("triton", conv.TileConfig(32, 16, 16))
    run = lambda choice: (lambda: None)  # noqa: E731
    if DEVICE == "cpu":
        assert autotune.choose("p", torch.device("cpu"), default, lambda: [autotune.Choice("aten")], run) == default
    monkeypatch.setenv("FASTRES_AUTOTUNE", "0")
    dev = torch.device(DEVICE)
    assert autotune.choose("q", dev, default, lambda: [autotune.Choice("aten")], run) == default
    assert calls == [] and not os.path.exists(autotune.cache_path())


def test_fastres_tune_records_layers_and_leaves_model_untouched():
    from fastres.tune import tune
    from fastres.nn import BasicBlock
    block = BasicBlock(16, 16).to(DEVICE).train()
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
    params = {k: v.detach().clone() for k, v in block.state_dict().items()}
    x = torch.randn(2, 16, 5, 5, device=DEVICE)
    with fastres.backend("triton"):
        choices = tune(block, x)
    kinds = {key.split("|")[0] for key in choices}
    # In training the block runs memory-lean (fastres.nn._lean): its first conv runs raw (conv_bias_act without
    # bias or ReLU), the second consumes that through the BN prologue (bn_relu_conv, chosen per layer like every
    # conv); the conv backward (dgrad / wgrad) is tuned too.
    assert {"conv_bias_act", "bn_relu_conv", "dgrad", "wgrad"} <= kinds <= {
        "conv_bias_act", "bn_relu_conv", "conv_stats", "dgrad", "wgrad", "wgrad_prologue"}, kinds
    assert all(c.provider in ("triton", "aten") for c in choices.values())
    for k, v in block.state_dict().items():
        assert torch.equal(v, params[k]), f"tune changed {k}"
    assert all(p.grad is None for p in block.parameters())


# ------------------------------------------------------------------------------------------------ Hopper code
def test_gemm_loops_compile_to_wgmma_on_sm90():
    """The forward (with epilogue, prologue and statistics), fp32/TF32, and weight-gradient kernels compiled for
    sm_90 without a GPU: the MMA must be wgmma in the PTX and HGMMA in the SASS. Runs in a fresh process,
    since this one's kernels may be the interpreter's."""
    variants = ["forward 3x3 bf16 prologue+stats", "forward 1x1 fp32 (tf32)", "weight grad 3x3 bf16"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastres.kernels.asm", *variants], capture_output=True, text=True,
                          env=env, timeout=600)
    if proc.returncode != 0:
        if "ptxas" in proc.stderr or "GPUTarget" in proc.stderr:
            pytest.skip(f"this triton cannot compile for sm_90 here: {proc.stderr.strip().splitlines()[-1]}")
        raise AssertionError(proc.stderr)
    report = json.loads(proc.stdout)
    for name in variants:
        assert report[name]["wgmma"] > 0 and report[name]["mma_sync"] == 0, (name, report[name])
        if report[name]["hgmma"] is not None:
            assert report[name]["hgmma"] > 0, (name, report[name])


# ------------------------------------------------------------------------------------------------ GPU, low precision
def _compare_count(dtype, relu):
    """Leading results compared: in bf16/fp16 a ReLU's mask flips by rounding near zero, so with a ReLU only the
    forward results are held to the rule (as in test_ops.py)."""
    return 3 if (relu and dtype in LOW_PRECISION) else None


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case,training,residual,relu", [
    ("3x3_c5", True, True, False), ("stem", True, False, True), ("1x1_h7", False, True, True),
    ("3x3_s2_h13", True, True, False)])
def test_gpu_conv_bn_act(dtype, case, training, residual, relu):
    t = _op_case(case, "nhwc", residual)
    got = _run_conv_bn_act(t, case, dtype, training, relu, "triton")
    ref = _run_conv_bn_act(t, case, torch.float64, training, relu, None)
    aten = _run_conv_bn_act(t, case, dtype, training, relu, None)
    names = ["out", "running_mean", "running_var", "grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias",
             "grad_residual"][:_compare_count(dtype, relu)]
    for name, g, r, a in zip(names, got, ref, aten):
        assert_within(name, g, r, a)
    if training:  # BN statistics within 1e-3 relative of eager
        for g, a in zip(got[1:3], aten[1:3]):
            assert ((g - a).abs() / a.abs().clamp_min(1e-3)).max() <= 1e-3


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_conv_kernels_low_precision(dtype, case):
    for epilogue in ("bias_res_relu", "prologue_stats"):
        _check_conv_forward(case, epilogue, "nhwc", dtype)
    n, cin, h, w, cout, k, s, p = CASES[case]
    t = _inputs(CASES[case], "nhwc")
    grad = _fmt(torch.randn(*_out_size(CASES[case]), dtype=torch.float64), "nhwc")
    gx = conv.conv2d_input_grad(_to(grad, dtype), _to(t["weight"], dtype), (n, cin, h, w), s, p)
    gw, gb = conv.conv2d_weight_grad(_to(grad, dtype), _to(t["x"], dtype), (cout, cin, k, k), s, p, bias_grad=True)
    ref = _aten_conv_grads(t, torch.float64, CASES[case], grad, True)
    aten = _aten_conv_grads(t, dtype, CASES[case], grad, True)
    for name, g, r, a in zip(["grad_x", "grad_weight", "grad_bias"], (gx, gw, gb), ref, aten):
        assert_within(name, g, r, a)


@triton.jit
def _round_to_tf32_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, conv._round_to_tf32(v), mask=mask)


def _tf32_reference(x):
    """Round to nearest with 10 mantissa bits, ties away from zero, in float64 (subnormals keep fp32's fixed
    exponent); overflow past fp32's range becomes Inf when cast back."""
    x64 = x.double()
    exponent = torch.floor(torch.log2(x64.abs())).clamp(min=-126)
    ulp = torch.exp2(exponent - 10)
    rounded = torch.sign(x64) * torch.floor(x64.abs() / ulp + 0.5) * ulp
    rounded = torch.where((x64 == 0) | ~torch.isfinite(x64), x64, rounded)
    return rounded.float()


def test_operands_round_to_nearest_tf32():
    ulp_one = 2.0 ** -10
    values = [1.0, 1 + ulp_one / 2, 1 + ulp_one / 2 - 2 ** -23, 1 + 1.5 * ulp_one, -(1 + ulp_one / 2), 0.0, -0.0,
              3.4028235e38, -3.4028235e38, 1e-40, -3e-39, 1.17549435e-38, float("inf"), float("-inf"), float("nan")]
    x = torch.cat([torch.tensor(values), torch.randn(1000) * 10.0 ** torch.randint(-30, 30, (1000,))])
    out = torch.empty_like(x, device=DEVICE)
    _round_to_tf32_kernel[(1,)](x.to(DEVICE), out, x.numel(), BLOCK=1024)
    expected = _tf32_reference(x)
    assert torch.equal(out.cpu().isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(out.cpu()[finite], expected[finite]), (out.cpu()[:15], expected[:15])


def test_tf32_conv_rounds_its_operands(monkeypatch):
    """With TF32 on, the kernel's operands are rounded to nearest TF32 before the MMA (as cuDNN's are): its
    result is the exact conv of the rounded operands up to fp32 accumulation, which truncation would miss by far
    more. The interpreter runs the rounding with full-fp32 MMA."""
    monkeypatch.setattr(conv, "_dot_options", lambda dtype: (False, "ieee", dtype == torch.float32))
    x = torch.randn(2, 40, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w = torch.randn(24, 40, 3, 3, device=DEVICE)
    out = conv.conv2d(x, w, 1, 1)[0].double()
    rounded = F.conv2d(_tf32_reference(x.cpu()).double(), _tf32_reference(w.cpu()).double(), None, 1, 1)
    unrounded = F.conv2d(x.cpu().double(), w.cpu().double(), None, 1, 1)
    fp32_conv_error = (F.conv2d(x, w, None, 1, 1).cpu().double() - unrounded).abs().max().item()
    assert (out.cpu() - rounded).abs().max().item() <= 4 * fp32_conv_error
    assert (out.cpu() - unrounded).abs().max().item() > 20 * fp32_conv_error  # TF32's own error is far larger


@pytest.mark.cuda
def test_gpu_tf32_matches_aten_tf32():
    """fp32 with TF32 allowed (torch's default for cuDNN convs): the kernel uses TF32 too, and its error stays
    within twice that of a TF32 cuDNN conv (forced onto a TF32 algorithm by a GEMM-friendly shape)."""
    torch.backends.cudnn.allow_tf32 = True
    x64 = torch.randn(8, 64, 14, 14, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w64 = torch.randn(128, 64, 3, 3, dtype=torch.float64) / 24
    out, _, _ = conv.conv2d(_to(x64, torch.float32), _to(w64, torch.float32), 1, 1)
    ref = F.conv2d(_to(x64, torch.float64), _to(w64, torch.float64), None, 1, 1)
    aten = F.conv2d(_to(x64, torch.float32), _to(w64, torch.float32), None, 1, 1)
    assert_within("out", out, ref, aten)


def test_tuning_session_time_budget(monkeypatch):
    """A tuning session measures new problems until its time budget is spent, then leaves them at their default."""
    monkeypatch.setattr(autotune, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # no GPU needed to ask
    cuda = torch.device("cuda")
    with autotune.tuning():
        assert autotune.can_measure(cuda)
    with autotune.tuning(time_budget=60):
        assert autotune.can_measure(cuda)
    with autotune.tuning(time_budget=0):
        assert not autotune.can_measure(cuda)
    monkeypatch.setenv("FASTRES_AUTOTUNE", "0")
    assert not autotune.can_measure(cuda)
