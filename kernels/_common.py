"""What the kernel modules share: the interpreter check, layouts, the launch device, and BN statistics partials."""
from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def tile_moments(v, mask, rows):
    """(mean, sum of squared deviations from the mean) over axis 0 of the fp32 tile v, counting only `mask`
    (rows: how many rows of the tile are real, as fp32).

    Two-pass with a correction (Chan, Golub & LeVeque): the rough mean of a first sum is off by the rounding of a
    sum of large values (a channel whose mean is 1e3 times its spread); the deviations from it are small, so their
    sum corrects the mean and their squares give the spread, both accurate."""
    rough = tl.sum(tl.where(mask, v, 0.0), axis=0) / rows
    centered = tl.where(mask, v - rough[None, :], 0.0)
    correction = tl.sum(centered, axis=0)
    m2 = tl.sum(centered * centered, axis=0) - correction * correction / rows
    return rough + correction / rows, tl.maximum(m2, 0.0, propagate_nan=tl.PropagateNan.ALL)  # a NaN stays NaN


def interpreting():
    """True when the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 before triton was
    imported): they then run on CPU tensors, slowly, and are the kernels the CI tests."""
    return not isinstance(tile_moments, triton.runtime.JITFunction)


class ConvStats(NamedTuple):
    """Per-tile BN statistics partials of an activation: tile_mean and tile_m2 (sum of squared deviations from the
    tile mean) are [tiles, C] fp32, tile t covering rows (pixels) [t * tile_rows, min((t + 1) * tile_rows, count))."""
    tile_mean: torch.Tensor
    tile_m2: torch.Tensor
    tile_rows: int
    count: int


def memory_format(t):
    """channels_last if t is laid out NHWC (and not also plainly contiguous), else contiguous_format."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class _NoDevice:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def device_of(t):
    """Launch on t's GPU: Triton launches on torch's current device."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else _NoDevice()
