"""Convolution as implicit GEMM in Triton, with the work around a conv fused in.

Reads top-down: the two kernels (forward / input gradient, and weight gradient), the small @triton.jit helpers
they share, then the launchers that allocate, pick strides and grids.

The GEMM view of a conv with an NHWC input x[N, H, W, Cin] and weight w[Cout, Cin, KH, KW]:
    out[m, co] = sum_k A[m, k] * B[k, co],   m = (n, oh, ow),   k = (kh, kw, ci)
A is gathered from x on the fly (the "implicit" im2col: nothing is materialized), B is the weight. Every
tensor is addressed through its own four strides, so any layout runs; channels_last (NHWC) is the fast one,
since then the K axis of A and the channel axis of the output are contiguous in memory.

The same kernel computes the input gradient (TRANSPOSED=True): grad_x = conv_transpose(grad_out, w), i.e.
A gathered from grad_out with the transposed index rule and B = w with the roles of Cin and Cout swapped.
The weight gradient is its own kernel: a GEMM over all output pixels, split along that long axis.

Grouped convs: each group is an independent GEMM over its C_in / groups input and C_out / groups output
channels, one program axis per group (the kernels see one group's channel counts, and offset their pointers
to the group's channels). Dilated convs: the tap (kh, kw) reads the input at (kh * dil_h, kw * dil_w).
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import ConvStats, device_of, interpreting, memory_format, tile_moments

# ================================================================================================ kernels


@triton.jit
def _conv_kernel(
        a_ptr, w_ptr, out_ptr,
        bias_ptr, scale_ptr, res_ptr, raw_ptr, in_scale_ptr, in_shift_ptr, mean_ptr, m2_ptr,
        M, C_a, H_a, W_a, C_out, H_o, W_o,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        s_an, s_ac, s_ah, s_aw,
        s_wn, s_wc, s_wh, s_ww, s_wg,
        s_on, s_oc, s_oh, s_ow,
        s_rn, s_rc, s_rh, s_rw,
        KH: tl.constexpr, KW: tl.constexpr,
        TRANSPOSED: tl.constexpr, K_FLAT: tl.constexpr,
        PROLOGUE: tl.constexpr, PROLOGUE_RELU: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
        STORE_RAW: tl.constexpr, STATS: tl.constexpr,
        DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out[m, n] = epilogue(sum_k prologue(A[m, k]) * B[k, n]) for one BLOCK_M x BLOCK_N tile of the output.

    A: the gathered input a[N, C_a, H_a, W_a] (x forward, grad_out when TRANSPOSED); B[(kh, kw, c), n] at
    w_ptr + n * s_wn + c * s_wc + kh * s_wh + kw * s_ww; out[N, C_out, H_o, W_o].
    Prologue (PROLOGUE): A's values become relu?(a * in_scale[c] + in_shift[c]) as they are loaded: the previous
    layer's BN apply + ReLU, so the normalized activation never goes through memory.
    Epilogue, in this order: STORE_RAW writes the bare conv result to raw_ptr; HAS_SCALE / HAS_BIAS apply
    v = acc * scale[n] + bias[n]; STATS writes this tile's per-channel mean and sum of squared deviations from
    it, of v (BN statistics, combined later in a fixed order: deterministic, and free of the cancellation of a
    plain sum of squares); HAS_RESIDUAL adds res; RELU; the cast to out's dtype.
    Groups: program axis 1 is the conv group; C_a and C_out are one group's channel counts, and every pointer is
    moved to the group's channels (the weight's by s_wg per group) before the GEMM.
    """
    grp = tl.program_id(1).to(tl.int64)
    a_ptr += grp * C_a * s_ac
    w_ptr += grp * s_wg
    if PROLOGUE:
        in_scale_ptr += grp * C_a
        in_shift_ptr += grp * C_a
    out_ptr += grp * C_out * s_oc
    raw_ptr += grp * C_out * s_oc
    res_ptr += grp * C_out * s_rc
    bias_ptr += grp * C_out
    scale_ptr += grp * C_out
    # Grouped tile order: GROUP_M row tiles share their B (weight) tiles while they are in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(C_out, BLOCK_N)
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_size
    pid_n = (pid % tiles_per_group) // group_size

    # Pixel indices stay int32 (the launcher checks M < 2**31); memory offsets are int64.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < C_out
    img = offs_m // (H_o * W_o)
    pix = offs_m % (H_o * W_o)
    oh = pix // W_o
    ow = pix % W_o
    a_img = img.to(tl.int64) * s_an
    w_col = offs_n.to(tl.int64) * s_wn
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if K_FLAT:
        # k = (kh, kw, c) decomposed per element: no padding of each tap's channels up to BLOCK_K, which is
        # what a small C_a needs (the stem's 3 channels would otherwise fill 3/16 of every MMA).
        K_total = KH * KW * C_a
        for k0 in range(0, K_total, BLOCK_K):
            k = k0 + offs_k
            mask_k = k < K_total
            c = k % C_a
            tap = k // C_a
            kh = tap // KW
            kw = tap % KW
            ih, iw, inside = _tap_index(oh[:, None], ow[:, None], kh[None, :], kw[None, :], H_a, W_a,
                                        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, TRANSPOSED)
            a_mask = mask_m[:, None] & mask_k[None, :] & inside
            a_off = a_img[:, None] + ih.to(tl.int64) * s_ah + iw.to(tl.int64) * s_aw + c[None, :].to(tl.int64) * s_ac
            a = tl.load(a_ptr + a_off, mask=a_mask, other=0.0)
            if PROLOGUE:
                a = _bn_act_prologue(a, a_mask, c, mask_k, in_scale_ptr, in_shift_ptr, PROLOGUE_RELU)
            b_off = w_col[None, :] + (c * s_wc + kh * s_wh + kw * s_ww).to(tl.int64)[:, None]
            b = tl.load(w_ptr + b_off, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = _mma(a, b, acc, DOT_FP32, INPUT_PRECISION, ROUND_TF32)
    else:
        # One tap at a time, its channels in BLOCK_K slices: the per-pixel index math runs once per slice.
        c_tiles = tl.cdiv(C_a, BLOCK_K)
        for kt in range(0, KH * KW * c_tiles):
            tap = kt // c_tiles
            c = (kt - tap * c_tiles) * BLOCK_K + offs_k
            mask_k = c < C_a
            kh = tap // KW
            kw = tap % KW
            ih, iw, inside = _tap_index(oh, ow, kh, kw, H_a, W_a, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                        TRANSPOSED)
            row_ok = mask_m & inside
            a_mask = row_ok[:, None] & mask_k[None, :]
            a_row = a_img + ih.to(tl.int64) * s_ah + iw.to(tl.int64) * s_aw
            a = tl.load(a_ptr + a_row[:, None] + c[None, :].to(tl.int64) * s_ac, mask=a_mask, other=0.0)
            if PROLOGUE:
                a = _bn_act_prologue(a, a_mask, c, mask_k, in_scale_ptr, in_shift_ptr, PROLOGUE_RELU)
            b_off = w_col[None, :] + (c.to(tl.int64) * s_wc)[:, None] + (kh * s_wh + kw * s_ww)
            b = tl.load(w_ptr + b_off, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = _mma(a, b, acc, DOT_FP32, INPUT_PRECISION, ROUND_TF32)

    # ------------------------------------------------------------------ epilogue, on the fp32 accumulator
    mask = mask_m[:, None] & mask_n[None, :]
    out_row = img.to(tl.int64) * s_on + oh.to(tl.int64) * s_oh + ow.to(tl.int64) * s_ow
    out_off = out_row[:, None] + offs_n.to(tl.int64)[None, :] * s_oc
    if STORE_RAW:
        tl.store(raw_ptr + out_off, acc.to(raw_ptr.dtype.element_ty), mask=mask)
    v = acc
    if HAS_SCALE:
        v = v * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        v = v + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if STATS:
        rows = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        tile_mean, tile_m2 = tile_moments(v, mask, rows)
        # Statistics rows span every group's channels: [tile, C_out * groups].
        stat_off = pid_m.to(tl.int64) * C_out * tl.num_programs(1) + grp * C_out + offs_n
        tl.store(mean_ptr + stat_off, tile_mean, mask=mask_n)
        tl.store(m2_ptr + stat_off, tile_m2, mask=mask_n)
    if HAS_RESIDUAL:
        res_row = img.to(tl.int64) * s_rn + oh.to(tl.int64) * s_rh + ow.to(tl.int64) * s_rw
        res = tl.load(res_ptr + res_row[:, None] + offs_n.to(tl.int64)[None, :] * s_rc, mask=mask, other=0.0)
        v = v + res.to(tl.float32)
    if RELU:
        v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in torch.relu
    tl.store(out_ptr + out_off, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_wgrad_kernel(
        g_ptr, x_ptr, gw_ptr, gb_ptr, in_scale_ptr, in_shift_ptr,
        P, C_in, H, W, C_out, H_o, W_o,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        s_gn, s_gc, s_gh, s_gw,
        s_xn, s_xc, s_xh, s_xw,
        P_PER_SPLIT,
        KH: tl.constexpr, KW: tl.constexpr,
        PROLOGUE: tl.constexpr, PROLOGUE_RELU: tl.constexpr, BIAS_GRAD: tl.constexpr,
        DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_w[co, kh, kw, ci] partial sums over one split of the P = N * H_o * W_o output pixels:
        sum_p grad_out[p, co] * prologue(x)[p shifted by the tap (kh, kw), ci]
    One program per (co tile, ci tile, tap) and split; partials go to gw_ptr[split, co, kh, kw, ci] (fp32) and
    are summed in a fixed order by the launcher. BIAS_GRAD: the programs of tap 0 and the first ci tile also sum
    grad_out over their pixels (the conv bias's gradient) into gb_ptr[split, co].
    PROLOGUE recomputes the BN-apply(+ReLU) input the forward saw, from the raw x.
    Groups: program axis 2 is the conv group; C_in and C_out are one group's channel counts (gw_ptr's rows span
    all groups' output channels)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    grp = tl.program_id(2)
    g_ptr += grp.to(tl.int64) * C_out * s_gc
    x_ptr += grp.to(tl.int64) * C_in * s_xc
    if PROLOGUE:
        in_scale_ptr += grp * C_in
        in_shift_ptr += grp * C_in
    C_out_all = C_out * tl.num_programs(2)
    num_m = tl.cdiv(C_out, BLOCK_M)
    num_n = tl.cdiv(C_in, BLOCK_N)
    tap = pid // (num_m * num_n)
    pid_m = (pid % (num_m * num_n)) // num_n
    pid_n = pid % num_n
    kh = tap // KW
    kw = tap % KW

    offs_co = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_co = offs_co < C_out
    mask_ci = offs_ci < C_in
    g_col = offs_co.to(tl.int64) * s_gc
    x_col = offs_ci.to(tl.int64) * s_xc
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    p_start = split * P_PER_SPLIT
    p_end = tl.minimum(P, p_start + P_PER_SPLIT)
    for p0 in range(p_start, p_end, BLOCK_K):
        p = p0 + offs_k
        mask_p = p < p_end
        img = p // (H_o * W_o)
        pix = p % (H_o * W_o)
        oh = pix // W_o
        ow = pix % W_o
        g_row = img.to(tl.int64) * s_gn + oh.to(tl.int64) * s_gh + ow.to(tl.int64) * s_gw
        g = tl.load(g_ptr + g_col[:, None] + g_row[None, :], mask=mask_co[:, None] & mask_p[None, :], other=0.0)
        ih, iw, inside = _tap_index(oh, ow, kh, kw, H, W, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, False)
        x_mask = (mask_p & inside)[:, None] & mask_ci[None, :]
        x_row = img.to(tl.int64) * s_xn + ih.to(tl.int64) * s_xh + iw.to(tl.int64) * s_xw
        xv = tl.load(x_ptr + x_row[:, None] + x_col[None, :], mask=x_mask, other=0.0)
        if PROLOGUE:
            xv = _bn_act_prologue(xv, x_mask, offs_ci, mask_ci, in_scale_ptr, in_shift_ptr, PROLOGUE_RELU)
        acc = _mma(g, xv, acc, DOT_FP32, INPUT_PRECISION, ROUND_TF32)
        if BIAS_GRAD:
            if (tap == 0) & (pid_n == 0):
                bias_acc += tl.sum(g.to(tl.float32), axis=1)

    taps = KH * KW
    co_all = grp * C_out + offs_co
    gw_row = ((split * C_out_all + co_all).to(tl.int64) * taps + tap) * C_in
    tl.store(gw_ptr + gw_row[:, None] + offs_ci[None, :], acc, mask=mask_co[:, None] & mask_ci[None, :])
    if BIAS_GRAD:
        if (tap == 0) & (pid_n == 0):
            tl.store(gb_ptr + split * C_out_all + co_all, bias_acc, mask=mask_co)


@triton.jit
def _tap_index(o_h, o_w, kh, kw, H_a, W_a, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
               TRANSPOSED: tl.constexpr):
    """Which input pixel (ih, iw) the tap (kh, kw) of output pixel (o_h, o_w) reads, and whether it exists
    (False in the zero padding, and, TRANSPOSED, where the stride skips it). The tap sits at (kh * dil_h,
    kw * dil_w) of the dilated kernel."""
    if TRANSPOSED:
        # grad_x[i] = sum over taps of grad_out[o] w[tap] with o * stride - pad + tap * dil = i.
        t_h = o_h + pad_h - kh * dil_h
        t_w = o_w + pad_w - kw * dil_w
        ih = t_h // stride_h
        iw = t_w // stride_w
        inside = (t_h >= 0) & (t_w >= 0) & (t_h - ih * stride_h == 0) & (t_w - iw * stride_w == 0) \
            & (ih < H_a) & (iw < W_a)
    else:
        ih = o_h * stride_h - pad_h + kh * dil_h
        iw = o_w * stride_w - pad_w + kw * dil_w
        inside = (ih >= 0) & (ih < H_a) & (iw >= 0) & (iw < W_a)
    return ih, iw, inside


@triton.jit
def _bn_act_prologue(a, a_mask, c, mask_c, in_scale_ptr, in_shift_ptr, RELU: tl.constexpr):
    """relu?(a * in_scale[c] + in_shift[c]) for a tile whose channel index c runs along axis 1."""
    scale = tl.load(in_scale_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    shift = tl.load(in_shift_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    v = a.to(tl.float32) * scale[None, :] + shift[None, :]
    if RELU:
        v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in torch.relu
    # The conv zero-pads the normalized activation, so padding (and masked-off) positions must stay 0, not
    # become relu(shift).
    v = tl.where(a_mask, v, 0.0)
    return v.to(a.dtype)


@triton.jit
def _mma(a, b, acc, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr):
    if DOT_FP32:
        # Only for the interpreter, whose bf16 tl.dot is wrong (triton 3.8/3.9): fp32 operands hold bf16/fp16
        # values exactly, and the fp32 accumulation is what the GPU's MMA does too.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if ROUND_TF32:
        a = _round_to_tf32(a)
        b = _round_to_tf32(b)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _round_to_tf32(v):
    """fp32 -> the nearest TF32 value (10 mantissa bits, ties away from zero: what cvt.rna.tf32.f32 and cuDNN do).
    The tensor cores' TF32 mode drops the low 13 mantissa bits, a truncation toward zero that would double the
    operands' rounding error against cuDNN's; rounded first, they pass through the MMA exactly. Integer math on the
    bits, so the interpreter runs the same code: adding half a TF32 ulp to the magnitude carries into the kept
    bits (and the exponent) exactly when the value rounds up. NaN stays NaN, Inf stays Inf."""
    bits = v.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, rounded)


# ================================================================================================ launchers

class TileConfig(NamedTuple):
    """Tile shape and launch parameters of one kernel launch (fastres.kernels.autotune chooses them per shape).
    k_flat only matters for the forward kernel (see _conv_kernel's K_FLAT)."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    k_flat: bool = False


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _dot_options(dtype):
    """(DOT_FP32, INPUT_PRECISION, ROUND_TF32) for operands of `dtype`.

    fp32 operands use TF32 tensor cores exactly when ATen's cuDNN convolutions do (torch.backends.cudnn.allow_tf32,
    True by default), rounded to nearest first as cuDNN rounds them (see _round_to_tf32), so an fp32 conv here is
    as precise as torch's own; otherwise full fp32 ("ieee")."""
    if interpreting():
        return dtype != torch.float32, "ieee", False
    if dtype == torch.float32:
        tf32 = torch.backends.cudnn.allow_tf32
        return False, "tf32" if tf32 else "ieee", tf32
    return False, "ieee", False  # ignored for 16-bit operands


def _weight_operand(weight):
    """The weight with its input channels contiguous (channels_last), so B tiles are coalesced loads; a no-op
    for a weight already in that layout (a channels_last model) and for 1x1 weights."""
    if weight.is_contiguous(memory_format=torch.channels_last):
        return weight
    return weight.contiguous(memory_format=torch.channels_last)


def _check_pixels(count):
    if count >= 2 ** 31:
        raise ValueError(f"fastres.kernels.conv: {count} output pixels (N * H_out * W_out) exceed 2**31 - 1; "
                         "split the batch")


def default_config(M, C_out, C_a, dtype, taps=9):
    """A tile config that is reasonable without measuring (the autotuner refines it per shape on a GPU)."""
    if interpreting():
        # Small tiles: the interpreter's cost grows with the tile area far more than with the program count.
        return TileConfig(32, 16 if C_out <= 16 else 32, 16, k_flat=C_a < 16)
    block_k = 32 if dtype == torch.float32 else 64
    block_n = 128 if C_out > 64 else 64
    return TileConfig(128, block_n, block_k, num_warps=8 if block_n == 128 else 4, num_stages=3,
                      k_flat=C_a < 32 and taps > 1)


def _out_extent(size, k, stride, padding, dilation):
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def conv2d(x, weight, stride=1, padding=0, *, dilation=1, groups=1, bias=None, scale=None, residual=None,
           relu=False, in_scale=None, in_shift=None, in_relu=True, store_raw=False, stats=False, config=None):
    """out = relu?((conv2d(prologue(x), weight, dilation, groups) * scale + bias) + residual), in x's dtype and
    memory format.

    prologue(x) = relu?(x * in_scale[c] + in_shift[c]) when in_scale/in_shift are given (in_relu picks the ReLU).
    Returns (out, raw, stats): raw is the bare conv result (store_raw) or None; stats a ConvStats of
    conv * scale + bias (stats) or None.
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_o = _out_extent(h, kh, stride[0], padding[0], dilation[0])
    w_o = _out_extent(w, kw, stride[1], padding[1], dilation[1])
    fmt = memory_format(x)
    out = torch.empty((n, c_out, h_o, w_o), dtype=x.dtype, device=x.device, memory_format=fmt)
    raw = torch.empty_like(out) if store_raw else None
    weight = _weight_operand(weight)
    # B[(kh, kw, ci), co] = weight[co, ci, kh, kw]
    w_strides = (weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3))
    result_stats = _launch_conv(x, weight, w_strides, out, (kh, kw), stride, padding, dilation, groups, False,
                                config, bias=bias, scale=scale, residual=residual, relu=relu, raw=raw,
                                in_scale=in_scale, in_shift=in_shift, in_relu=in_relu, stats=stats)
    return out, raw, result_stats


def conv2d_input_grad(grad_out, weight, input_shape, stride=1, padding=0, *, dilation=1, groups=1, config=None):
    """grad_x of out = conv2d(x, weight, stride, padding, dilation, groups): a transposed conv of grad_out, as
    implicit GEMM."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    n, c_in, h, w = input_shape
    _, _, kh, kw = weight.shape
    grad_x = torch.empty((n, c_in, h, w), dtype=grad_out.dtype, device=grad_out.device,
                         memory_format=memory_format(grad_out))
    weight = _weight_operand(weight)
    # B[(kh, kw, co), ci] = weight[co, ci, kh, kw]: the roles of the two channel strides swap.
    w_strides = (weight.stride(1), weight.stride(0), weight.stride(2), weight.stride(3))
    _launch_conv(grad_out, weight, w_strides, grad_x, (kh, kw), stride, padding, dilation, groups, True, config)
    return grad_x


def _launch_conv(a, weight, w_strides, out, taps, stride, padding, dilation, groups, transposed, config, *,
                 bias=None, scale=None, residual=None, relu=False, raw=None, in_scale=None, in_shift=None, in_relu=True,
                 stats=False):
    n, c_a, h_a, w_a = a.shape
    _, c_out, h_o, w_o = out.shape
    c_a, c_out = c_a // groups, c_out // groups  # one group's GEMM
    # Group g's weight rows: output channels [g, g + 1) * C_out / groups, forward and transposed alike.
    w_group_stride = (weight.shape[0] // groups) * weight.stride(0)
    M = n * h_o * w_o
    _check_pixels(M)
    if config is None:
        config = default_config(M, c_out, c_a, a.dtype, taps[0] * taps[1])
    grid_m = triton.cdiv(M, config.block_m)
    tile_mean = tile_m2 = None
    if stats:
        tile_mean = torch.empty((grid_m, c_out * groups), dtype=torch.float32, device=a.device)
        tile_m2 = torch.empty_like(tile_mean)
    prologue = in_scale is not None
    if prologue and transposed:
        raise ValueError("the BN-apply prologue applies to the forward conv only")
    dot_fp32, precision, round_tf32 = _dot_options(a.dtype)
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    dummy = out  # stands in for absent optional pointers; the constexpr flags keep them unread
    grid = (grid_m * triton.cdiv(c_out, config.block_n), groups)
    with device_of(a):
        _conv_kernel[grid](
            a, weight, out,
            _or(bias, dummy), _or(scale, dummy), _or(residual, dummy), _or(raw, dummy),
            _or(in_scale, dummy), _or(in_shift, dummy), _or(tile_mean, dummy), _or(tile_m2, dummy),
            M, c_a, h_a, w_a, c_out, h_o, w_o,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            *a.stride(), *w_strides, w_group_stride, *out.stride(), *res_strides,
            KH=taps[0], KW=taps[1], TRANSPOSED=transposed, K_FLAT=config.k_flat,
            PROLOGUE=prologue, PROLOGUE_RELU=prologue and in_relu,
            HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, RELU=relu,
            STORE_RAW=raw is not None, STATS=stats,
            DOT_FP32=dot_fp32, INPUT_PRECISION=precision, ROUND_TF32=round_tf32,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
            num_warps=config.num_warps, num_stages=config.num_stages)
    return ConvStats(tile_mean, tile_m2, config.block_m, M) if stats else None


def default_wgrad_split(P, tiles, config, device):
    """How many slices the pixel axis is split into: enough programs to fill the GPU (its long K axis would
    otherwise leave most SMs idle for the small Cout x Cin x taps output of a ResNet layer)."""
    if interpreting() or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, (2 * sms) // max(tiles, 1))
    return max(1, min(want, triton.cdiv(P, 8 * config.block_k)))


def conv2d_weight_grad(grad_out, x, weight_shape, stride=1, padding=0, *, dilation=1, groups=1, bias_grad=False,
                       in_scale=None, in_shift=None, in_relu=True, config=None, split=None):
    """(grad_weight, grad_bias or None) of out = conv2d(prologue(x), weight, bias, stride, padding, dilation, groups),
    from grad_out.

    grad_weight comes out in x's dtype, laid out channels_last when x is (else contiguous); grad_bias in fp32 ->
    x's dtype. `split` slices the pixel axis (default: by occupancy), each slice's fp32 partial being summed in
    a fixed order afterwards."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    c_out, c_in, kh, kw = weight_shape  # c_in: one group's input channels
    c_out_g = c_out // groups
    n, _, h, w = x.shape
    _, _, h_o, w_o = grad_out.shape
    P = n * h_o * w_o
    _check_pixels(P)
    if config is None:
        config = (TileConfig(16 if c_out_g <= 16 else 32, 16 if c_in <= 16 else 32, 16) if interpreting()
                  else TileConfig(64, 64, 64 if x.dtype != torch.float32 else 32, num_warps=4, num_stages=3))
    tiles = triton.cdiv(c_out_g, config.block_m) * triton.cdiv(c_in, config.block_n) * kh * kw
    if split is None:
        split = default_wgrad_split(P, tiles * groups, config, x.device)
    p_per_split = triton.cdiv(triton.cdiv(P, split), config.block_k) * config.block_k
    split = triton.cdiv(P, p_per_split)
    partial = torch.empty((split, c_out, kh, kw, c_in), dtype=torch.float32, device=x.device)
    bias_partial = torch.zeros((split, c_out), dtype=torch.float32, device=x.device) if bias_grad else None
    prologue = in_scale is not None
    dot_fp32, precision, round_tf32 = _dot_options(x.dtype)
    dummy = partial
    with device_of(x):
        _conv_wgrad_kernel[(tiles, split, groups)](
            grad_out, x, partial, _or(bias_partial, dummy), _or(in_scale, dummy), _or(in_shift, dummy),
            P, c_in, h, w, c_out_g, h_o, w_o, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            *grad_out.stride(), *x.stride(), p_per_split,
            KH=kh, KW=kw, PROLOGUE=prologue, PROLOGUE_RELU=prologue and in_relu, BIAS_GRAD=bias_grad,
            DOT_FP32=dot_fp32, INPUT_PRECISION=precision, ROUND_TF32=round_tf32,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            num_warps=config.num_warps, num_stages=config.num_stages)
    grad_w = partial[0] if split == 1 else partial.sum(0)
    # [co, kh, kw, ci] is the channels_last layout of [co, ci, kh, kw]
    grad_w = grad_w.permute(0, 3, 1, 2).to(x.dtype)
    grad_w = grad_w.contiguous(memory_format=memory_format(x))
    grad_b = None
    if bias_grad:
        grad_b = (bias_partial[0] if split == 1 else bias_partial.sum(0)).to(x.dtype)
    return grad_w, grad_b


def _or(t, fallback):
    return fallback if t is None else t
