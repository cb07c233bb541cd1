"""The project's tolerance rule, for code that checks results at run time (the autotuner, benchmarks/gpu_check.py).

A result's error against a float64 reference may be at most twice the error of ATen computing the same thing in the
same dtype, plus a floor of a few ulps of the reference's magnitude (ATen's error can be zero by luck). NaN where
the reference is finite is an infinite error. tests/tolerance.py states the same rule for the test suite.
"""
import math

import torch


def max_error(t, ref64):
    """Largest |t - ref64| (float64), inf where t is NaN and ref64 is not, 0.0 for empty tensors."""
    if t.shape != ref64.shape:
        return math.inf
    if t.numel() == 0:
        return 0.0
    diff = (t.detach().double() - ref64.detach().double()).abs()
    if (diff.isnan() & ~ref64.isnan()).any().item():
        return math.inf
    return diff.nan_to_num(nan=0.0).max().item()


def floor(dtype, ref64, ulps=4):
    """A few ulps of `dtype` at the reference's magnitude (at least 1)."""
    magnitude = ref64.detach().abs().max().item() if ref64.numel() else 0.0
    return ulps * torch.finfo(dtype).eps * max(magnitude, 1.0)


def bound(aten_error, dtype, ref64, ulps=4):
    return 2 * aten_error + floor(dtype, ref64, ulps)


def violation(name, got, ref64, aten_error, ulps=4):
    """Why `got` breaks the rule (its error above twice `aten_error` plus the floor), or None."""
    err = max_error(got, ref64)
    limit = bound(aten_error, got.dtype, ref64, ulps)
    if err <= limit:
        return None
    return f"{name}: max error {err:.3e} > 2 x ATen's {aten_error:.3e} + floor ({limit:.3e})"
