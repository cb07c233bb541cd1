"""The BatchNorm work around a conv, as Triton kernels over [N, C, H, W] activations in either memory format.

Reads top-down: the kernels (statistics finalize, per-tile statistics of a tensor, BN apply + residual + ReLU,
BN + ReLU backward), then their launchers.

An activation is addressed as rows (n, p = h * W + w) by channels c with three strides, which covers NCHW- and
NHWC-contiguous tensors alike; the launchers make every tensor of one call dense in the main tensor's memory
format, so they share those strides.

Statistics are reduced in two steps that never depend on thread timing: each tile writes its per-channel partials
(sum, and sum of squared deviations from the tile's own mean), then one pass combines the tiles in index order
(Chan et al.'s pairwise update). The centered partials avoid the cancellation of E[x^2] - E[x]^2 when a channel's
mean is large against its spread.
"""
import torch
import triton
import triton.language as tl

from ._common import ConvStats, device_of, interpreting, memory_format, tile_moments

# ================================================================================================ kernels


@triton.jit
def _bn_finalize_kernel(
        tile_mean_ptr, tile_m2_ptr, gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr,
        mean_ptr, invstd_ptr, scale_ptr, shift_ptr, new_rmean_ptr, new_rvar_ptr,
        T, C, count, tile_rows, momentum, eps,
        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per channel: the batch mean and inverse std from T tiles' partials, the apply coefficients
    scale = gamma * invstd and shift = beta - mean * scale, and the running statistics updated as
    nn.BatchNorm2d does (the unbiased variance goes into running_var)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    # The mean as tile 0's mean plus the weighted deviations of the others from it: small numbers, summed
    # accurately even where the mean itself is large.
    first = tl.load(tile_mean_ptr + c, mask=mask_c, other=0.0)
    deviation = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask_t = t < T
        mask = mask_t[:, None] & mask_c[None, :]
        tile_mean = tl.load(tile_mean_ptr + t.to(tl.int64)[:, None] * C + c[None, :], mask=mask, other=0.0)
        rows = tl.where(mask_t, tl.minimum(count - t * tile_rows, tile_rows), 0).to(tl.float32)
        deviation += tl.sum(tl.where(mask, rows[:, None] * (tile_mean - first[None, :]), 0.0), axis=0)
    mean = first + deviation / count
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask_t = t < T
        mask = mask_t[:, None] & mask_c[None, :]
        off = t.to(tl.int64)[:, None] * C + c[None, :]
        d = tl.load(tile_mean_ptr + off, mask=mask, other=0.0) - mean[None, :]
        rows = tl.where(mask_t, tl.minimum(count - t * tile_rows, tile_rows), 0).to(tl.float32)
        m2 += tl.sum(tl.where(mask, tl.load(tile_m2_ptr + off, mask=mask, other=0.0) + rows[:, None] * d * d, 0.0),
                     axis=0)
    var = tl.where(mask_c, m2 / count, 1.0)  # keeps the masked-off lanes finite
    invstd = tl.rsqrt(var + eps)
    scale = tl.load(gamma_ptr + c, mask=mask_c, other=1.0).to(tl.float32) * invstd
    shift = tl.load(beta_ptr + c, mask=mask_c, other=0.0).to(tl.float32) - mean * scale
    tl.store(mean_ptr + c, mean, mask=mask_c)
    tl.store(invstd_ptr + c, invstd, mask=mask_c)
    tl.store(scale_ptr + c, scale, mask=mask_c)
    tl.store(shift_ptr + c, shift, mask=mask_c)
    rmean = tl.load(rmean_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    rvar = tl.load(rvar_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    unbiased = m2 / (count - 1)
    tl.store(new_rmean_ptr + c, (rmean * (1 - momentum) + mean * momentum).to(new_rmean_ptr.dtype.element_ty),
             mask=mask_c)
    tl.store(new_rvar_ptr + c, (rvar * (1 - momentum) + unbiased * momentum).to(new_rvar_ptr.dtype.element_ty),
             mask=mask_c)


@triton.jit
def _channel_stats_kernel(y_ptr, tile_mean_ptr, tile_m2_ptr, R, P, C, s_n, s_p, s_c,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-tile moments of y (the statistics epilogue of the conv kernel, for a conv that ATen ran)."""
    pid_r = tl.program_id(0)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    mask = (r < R)[:, None] & mask_c[None, :]
    off = _offsets(r, c, P, s_n, s_p, s_c)
    v = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32)
    rows = tl.minimum(R - pid_r * BLOCK_R, BLOCK_R).to(tl.float32)
    tile_mean, tile_m2 = tile_moments(v, mask, rows)
    stat_off = pid_r.to(tl.int64) * C + c
    tl.store(tile_mean_ptr + stat_off, tile_mean, mask=mask_c)
    tl.store(tile_m2_ptr + stat_off, tile_m2, mask=mask_c)


@triton.jit
def _bn_act_kernel(y_ptr, center_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, R, P, C, s_n, s_p, s_c,
                   HAS_CENTER: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                   HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = relu?((y - center[c]) * scale[c] + shift[c] + residual), computed in fp32. Training BN passes the
    batch mean as center and beta as shift: subtracting the mean first keeps a channel whose mean is large
    against its spread exact, where y * scale + (beta - mean * scale) would round both terms at the mean's
    magnitude."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    mask = (r < R)[:, None] & mask_c[None, :]
    off = _offsets(r, c, P, s_n, s_p, s_c)
    v = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_CENTER:
        v = v - tl.load(center_ptr + c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        v = v * tl.load(scale_ptr + c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        v = v + tl.load(shift_ptr + c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        v = v + tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in torch.relu
    tl.store(out_ptr + off, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_act_backward_reduce_kernel(g_ptr, out_ptr, y_ptr, mean_ptr, invstd_ptr, sum_dz_ptr, sum_dzx_ptr,
                                   R, P, C, s_n, s_p, s_c,
                                   RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-tile sums of dz and dz * xhat, with dz = grad_out masked by the ReLU (0 where out <= 0) and
    xhat = (y - mean) * invstd: the BN weight and bias gradients, and what the input gradient subtracts."""
    pid_r = tl.program_id(0)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    mask = (r < R)[:, None] & mask_c[None, :]
    off = _offsets(r, c, P, s_n, s_p, s_c)
    dz = _relu_grad(g_ptr, out_ptr, off, mask, RELU)
    mean = tl.load(mean_ptr + c, mask=mask_c, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=mask_c, other=0.0)
    xhat = (tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32) - mean[None, :]) * invstd[None, :]
    stat_off = pid_r.to(tl.int64) * C + c
    tl.store(sum_dz_ptr + stat_off, tl.sum(dz, axis=0), mask=mask_c)
    tl.store(sum_dzx_ptr + stat_off, tl.sum(dz * xhat, axis=0), mask=mask_c)


@triton.jit
def _bn_act_backward_kernel(g_ptr, out_ptr, y_ptr, mean_ptr, invstd_ptr, gamma_ptr, sum_dz_ptr, sum_dzx_ptr,
                            grad_y_ptr, grad_res_ptr, R, P, C, s_n, s_p, s_c, inv_count,
                            RELU: tl.constexpr, TRAINING: tl.constexpr, WRITE_DZ: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad_y = gamma * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)) in training (batch statistics depend
    on y), gamma * invstd * dz in eval; WRITE_DZ also stores dz, the residual's gradient."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    mask = (r < R)[:, None] & mask_c[None, :]
    off = _offsets(r, c, P, s_n, s_p, s_c)
    dz = _relu_grad(g_ptr, out_ptr, off, mask, RELU)
    invstd = tl.load(invstd_ptr + c, mask=mask_c, other=0.0)
    k = tl.load(gamma_ptr + c, mask=mask_c, other=0.0).to(tl.float32) * invstd
    if TRAINING:
        mean = tl.load(mean_ptr + c, mask=mask_c, other=0.0)
        xhat = (tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32) - mean[None, :]) * invstd[None, :]
        mean_dz = tl.load(sum_dz_ptr + c, mask=mask_c, other=0.0) * inv_count
        mean_dzx = tl.load(sum_dzx_ptr + c, mask=mask_c, other=0.0) * inv_count
        grad_y = k[None, :] * (dz - mean_dz[None, :] - xhat * mean_dzx[None, :])
    else:
        grad_y = k[None, :] * dz
    tl.store(grad_y_ptr + off, grad_y.to(grad_y_ptr.dtype.element_ty), mask=mask)
    if WRITE_DZ:
        tl.store(grad_res_ptr + off, dz.to(grad_res_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _offsets(r, c, P, s_n, s_p, s_c):
    """int64 offsets of rows r = (n, p) by channels c."""
    row = (r // P).to(tl.int64) * s_n + (r % P).to(tl.int64) * s_p
    return row[:, None] + c.to(tl.int64)[None, :] * s_c


@triton.jit
def _relu_grad(g_ptr, out_ptr, off, mask, RELU: tl.constexpr):
    dz = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        # threshold_backward's test (out <= 0 -> 0): a NaN output passes its gradient, as in ATen.
        dz = tl.where(tl.load(out_ptr + off, mask=mask, other=0.0) <= 0, 0.0, dz)
    return dz


# ================================================================================================ launchers

def _dense(t, fmt):
    return None if t is None else t.contiguous(memory_format=fmt)


def _layout(t):
    """(rows R = N * H * W, P = H * W, C, s_n, s_p, s_c) of a 4-D tensor dense in either memory format."""
    n, c, h, w = t.shape
    s_p = t.stride(3) if w > 1 else t.stride(2)
    assert h == 1 or w == 1 or t.stride(2) == w * t.stride(3), "H and W must collapse into one axis"
    return n * h * w, h * w, c, t.stride(0), s_p, t.stride(1)


def _blocks(C):
    """(BLOCK_R, BLOCK_C) of the elementwise kernels: 64 channels x 64 rows keeps NHWC loads 128-byte wide."""
    return 64, min(triton.next_power_of_2(C), 64)


def _grid(R, C, block_r, block_c):
    return (triton.cdiv(R, block_r), triton.cdiv(C, block_c))


def bn_act(y, scale=None, shift=None, residual=None, relu=True, center=None):
    """relu?((y - center[c]) * scale[c] + shift[c] + residual) in y's dtype and memory format (each optional)."""
    fmt = memory_format(y)
    y = _dense(y, fmt)
    residual = _dense(residual, fmt)
    out = torch.empty_like(y, memory_format=fmt)
    R, P, C, s_n, s_p, s_c = _layout(y)
    block_r, block_c = _blocks(C)
    with device_of(y):
        _bn_act_kernel[_grid(R, C, block_r, block_c)](
            y, _or(center, y), _or(scale, y), _or(shift, y), _or(residual, y), out, R, P, C, s_n, s_p, s_c,
            HAS_CENTER=center is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
            HAS_RESIDUAL=residual is not None, RELU=relu, BLOCK_R=block_r, BLOCK_C=block_c)
    return out


def _or(t, fallback):
    return fallback if t is None else t


def channel_stats(y):
    """ConvStats of y (per-tile partials), as the conv kernel's statistics epilogue writes them."""
    y = _dense(y, memory_format(y))
    R, P, C, s_n, s_p, s_c = _layout(y)
    block_r, block_c = _blocks(C)
    grid = _grid(R, C, block_r, block_c)
    tile_mean = torch.empty((grid[0], C), dtype=torch.float32, device=y.device)
    tile_m2 = torch.empty_like(tile_mean)
    with device_of(y):
        _channel_stats_kernel[grid](y, tile_mean, tile_m2, R, P, C, s_n, s_p, s_c, BLOCK_R=block_r, BLOCK_C=block_c)
    return ConvStats(tile_mean, tile_m2, block_r, R)


def bn_finalize(stats, bn_weight, bn_bias, running_mean, running_var, momentum, eps):
    """From training-mode statistics partials: (mean, invstd, scale, shift, new_running_mean, new_running_var),
    the first four fp32, the running statistics in their own dtype. Nothing is mutated."""
    T, C = stats.tile_mean.shape
    device = stats.tile_mean.device
    if stats.count == 0 or T == 0:
        # An empty batch (no tile to read, a count of 0): what fastres._C's finalize gives it, as ATen does:
        # mean 0, variance 0, and the running statistics left as they are.
        mean = torch.zeros(C, dtype=torch.float32, device=device)
        invstd = torch.full_like(mean, float(eps)).rsqrt_()
        scale = bn_weight.to(torch.float32) * invstd
        return mean, invstd, scale, bn_bias.to(torch.float32, copy=True), running_mean.clone(), running_var.clone()
    mean, invstd, scale, shift = (torch.empty(C, dtype=torch.float32, device=device) for _ in range(4))
    new_rmean, new_rvar = torch.empty_like(running_mean), torch.empty_like(running_var)
    block_c = min(triton.next_power_of_2(C), 64)
    block_t = 64 if interpreting() else 32
    with device_of(stats.tile_mean):
        _bn_finalize_kernel[(triton.cdiv(C, block_c),)](
            stats.tile_mean, stats.tile_m2, bn_weight, bn_bias, running_mean, running_var,
            mean, invstd, scale, shift, new_rmean, new_rvar,
            T, C, stats.count, stats.tile_rows, float(momentum), float(eps), BLOCK_T=block_t, BLOCK_C=block_c)
    return mean, invstd, scale, shift, new_rmean, new_rvar


def bn_act_backward(grad_out, out, conv_out, save_mean, save_invstd, bn_weight, relu, training, residual_grad):
    """Backward of out = relu?(bn(conv_out) + residual): (grad_conv_out, grad_residual or None, grad_bn_weight,
    grad_bn_bias), the last two fp32 (the statistics dtype). Same contract as backend_torch.bn_act_backward."""
    fmt = memory_format(conv_out)
    conv_out = _dense(conv_out, fmt)
    grad_out = _dense(grad_out, fmt)
    out = _dense(out, fmt) if relu else grad_out
    save_mean = save_mean.float().contiguous()
    save_invstd = save_invstd.float().contiguous()
    gamma = torch.ones_like(save_mean) if bn_weight is None else bn_weight.contiguous()
    R, P, C, s_n, s_p, s_c = _layout(conv_out)
    block_r, block_c = _blocks(C)
    grid = _grid(R, C, block_r, block_c)
    tile_dz = torch.empty((grid[0], C), dtype=torch.float32, device=conv_out.device)
    tile_dzx = torch.empty_like(tile_dz)
    grad_y = torch.empty_like(conv_out, memory_format=fmt)
    grad_res = torch.empty_like(grad_out, memory_format=fmt) if residual_grad else None
    with device_of(conv_out):
        _bn_act_backward_reduce_kernel[grid](grad_out, out, conv_out, save_mean, save_invstd, tile_dz, tile_dzx,
                                             R, P, C, s_n, s_p, s_c, RELU=relu, BLOCK_R=block_r, BLOCK_C=block_c)
        # Tile partials summed by a fixed-order reduction: the same gradients on every run.
        sum_dz, sum_dzx = tile_dz.sum(0), tile_dzx.sum(0)
        _bn_act_backward_kernel[grid](grad_out, out, conv_out, save_mean, save_invstd, gamma, sum_dz, sum_dzx,
                                      grad_y, grad_y if grad_res is None else grad_res,
                                      R, P, C, s_n, s_p, s_c, 1.0 / R,
                                      RELU=relu, TRAINING=training, WRITE_DZ=residual_grad,
                                      BLOCK_R=block_r, BLOCK_C=block_c)
    return grad_y, grad_res, sum_dzx, sum_dz
