"""fastres._C's Winograd F(2x2, 3x3) convolution (csrc/cpu_winograd.cpp), the CPU eval plan's 3x3 convolutions in
its oneDNN Graph body: held to its plain-torch reference, relu(conv2d(x, w, b, padding=1) + residual), under the
tolerance rule against ATen's convolution in the layout it runs (channels_last)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastres.ops import _compiled
from tolerance import assert_within

pytestmark = pytest.mark.skipif(not _compiled.has_op("_winograd_conv3x3"), reason="fastres._C without the op")
CL = torch.channels_last


def _ops():
    return torch.ops.fastres._winograd_conv3x3, torch.ops.fastres._winograd_weight


def _case(n, c, k, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(n, c, h, w, generator=g)).contiguous(memory_format=CL)
    weight = torch.randn(k, c, 3, 3, generator=g) * math.sqrt(2 / (9 * max(c, 1)))
    bias = torch.randn(k, generator=g)
    residual = torch.randn(n, k, h, w, generator=g).contiguous(memory_format=CL)
    return x, weight, bias, residual


def _reference(x, weight, bias, residual, relu):
    y = F.conv2d(x, weight, bias, 1, 1)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


# The last three have at least 8 tiles per output channel: the blocked form (blocks of at most 32 tiles).
@pytest.mark.parametrize("shape", [(2, 5, 7, 9, 6), (1, 64, 64, 14, 14), (3, 17, 33, 8, 11), (1, 16, 32, 1, 1),
                                   (2, 48, 20, 7, 7), (1, 32, 16, 2, 3), (2, 5, 7, 33, 21), (1, 24, 16, 30, 29),
                                   (4, 3, 6, 16, 16)])
@pytest.mark.parametrize("epilogue", ["bias-relu", "none", "residual-relu", "residual"])
def test_winograd_conv3x3_is_within_the_tolerance_rule(shape, epilogue):
    """Odd sizes (a last tile that is partial), channel counts off the 16-lane width, a batch, a 1x1 map; with and
    without bias, residual and ReLU: within the rule of ATen's channels_last fp32 convolution, channels_last out."""
    conv, transform = _ops()
    x, weight, bias, residual = _case(*shape)
    bias = None if epilogue == "none" else bias
    residual = residual if epilogue.startswith("residual") else None
    relu = epilogue.endswith("relu")
    got = conv(x, transform(weight), bias, residual, relu)
    ref64 = _reference(x.double(), weight.double(), None if bias is None else bias.double(),
                       None if residual is None else residual.double(), relu)
    aten = _reference(x, weight.contiguous(memory_format=CL), bias, residual, relu)
    assert got.is_contiguous(memory_format=CL) and got.dtype == torch.float32
    assert_within(f"winograd {shape} {epilogue}", got, ref64, aten)


# (n, c, k, h, w): tiles = n * ceil(h / 2) * ceil(w / 2); the transformed weight 16 * c * k floats.
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape, blocked", [
    ((1, 24, 16, 30, 29), True),  # 225 tiles, 16 output channels: 14 to 1
    ((8, 16, 64, 16, 16), True),  # 512 tiles, 64 channels: exactly 8 to 1
    ((3, 17, 33, 8, 11), False),  # 72 tiles, 33 channels: 2.2 to 1
    ((8, 16, 64, 14, 14), True),  # 392 tiles, 64 channels: 6.1 to 1, a 64 KiB weight
    ((8, 16, 64, 6, 6), False),  # 72 tiles: 1.1 to 1
    ((1, 128, 128, 40, 40), True),  # 400 tiles, 128 channels: 3.1 to 1, a weight of exactly 1 MiB
    ((1, 129, 129, 40, 40), False),  # 3.1 to 1, a weight over 1 MiB
    ((1, 1025, 16, 16, 16), False),  # 64 tiles, 16 channels: 4 to 1, a weight over 1 MiB
    ((1, 1025, 16, 32, 32), True),  # 256 tiles: 16 to 1, the same weight
])
def test_winograd_conv3x3_runs_blocked_where_tiles_outnumber_output_channels(shape, blocked, threads):
    """With at least 8 tiles per output channel, or 3 where the transformed weight is at most 1 MiB, the products
    run on blocks of tiles, each thread an even share (no ATen bmm), elsewhere as one bmm; either way within the
    rule, under any thread count (3 threads: shares that are not whole blocks)."""
    conv, transform = _ops()
    x, weight, bias, residual = _case(*shape, seed=5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.profiler.profile() as prof:
            got = conv(x, transform(weight), bias, residual, True)
    finally:
        torch.set_num_threads(before)
    bmm_ran = "aten::bmm" in [e.name for e in prof.events()]
    if blocked and bmm_ran and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("oneDNN's brgemm needs AVX2: the three-pass form ran")
    assert bmm_ran != blocked
    ref64 = _reference(x.double(), weight.double(), bias.double(), residual.double(), True)
    aten = _reference(x, weight.contiguous(memory_format=CL), bias, residual, True)
    assert_within(f"winograd {shape} {threads} threads", got, ref64, aten)


def test_winograd_conv3x3_takes_any_input_layout_and_leaves_its_inputs_alone():
    conv, transform = _ops()
    x, weight, bias, residual = _case(2, 24, 40, 10, 9, seed=3)
    u = transform(weight)
    before = [t.clone() for t in (x, u, bias, residual)]
    cl = conv(x, u, bias, residual, True)
    nchw = conv(x.contiguous(), u, bias, residual.contiguous(), True)
    assert torch.equal(cl, nchw) and nchw.is_contiguous(memory_format=CL)
    assert all(torch.equal(a, b) for a, b in zip((x, u, bias, residual), before))


def test_winograd_weight_is_g_w_g_transposed():
    """The transformed weight, [16, Cin, Cout]: element 4i + l of G w G^T (G of F(2x2, 3x3)), computed in fp64 and
    rounded once."""
    _, transform = _ops()
    weight = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(1))
    G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
    ref = torch.einsum("ij,ocjk,lk->ilco", G, weight.double(), G).reshape(16, 5, 6)
    got = transform(weight)
    assert got.shape == (16, 5, 6) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref.float(), rtol=0, atol=0)


@pytest.mark.parametrize("size", [8, 33])  # the three-pass form (16 tiles, 8 output channels), the blocked one (289)
def test_winograd_conv3x3_keeps_nan_where_the_direct_form_does(size):
    """A NaN in the input reaches exactly the outputs whose 3x3 window holds it (the transforms mix a tile's rows
    and columns only as the windows do)."""
    conv, transform = _ops()
    x, weight, bias, _ = _case(1, 8, 8, size, size, seed=5)
    x[0, 3, 4, 6] = float("nan")
    got = conv(x, transform(weight), bias, None, True)
    ref = _reference(x, weight, bias, None, True)
    assert torch.equal(got.isnan(), ref.isnan()) and ref.isnan().sum() == 8 * 9


@pytest.mark.parametrize("case, match", [
    ("x 3-D", "x must be 4-D"),
    ("x float64", "x must be float32"),
    ("weight direct", "weight must be _winograd_weight's"),
    ("weight channels", "weight must be _winograd_weight's"),
    ("bias size", "bias must be float32"),
    ("residual shape", "residual must be float32"),
])
def test_winograd_conv3x3_names_the_bad_argument(case, match):
    conv, transform = _ops()
    x, weight, bias, residual = _case(1, 8, 4, 5, 5)
    u = transform(weight)
    args = {"x": x, "weight": u, "bias": bias, "residual": residual}
    if case == "x 3-D":
        args["x"] = x[0]
    elif case == "x float64":
        args["x"] = x.double()
    elif case == "weight direct":
        args["weight"] = weight
    elif case == "weight channels":
        args["weight"] = transform(torch.randn(4, 7, 3, 3))
    elif case == "bias size":
        args["bias"] = bias[:3]
    else:
        args["residual"] = residual[:, :, :4]
    with pytest.raises(RuntimeError, match=match):
        conv(args["x"], args["weight"], args["bias"], args["residual"], True)


@pytest.mark.parametrize("weight, match", [(torch.randn(4, 3, 5, 5), r"\[Cout, Cin, 3, 3\]"),
                                           (torch.randn(4, 3, 3, 3, dtype=torch.float64), "float32")])
def test_winograd_weight_names_the_bad_argument(weight, match):
    _, transform = _ops()
    with pytest.raises(RuntimeError, match="weight must be"):
        transform(weight)
    with pytest.raises(RuntimeError, match=match):
        transform(weight)
