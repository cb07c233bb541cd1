"""The project's tolerance rule, for code that checks results at run time (the autotuner, benchmarks/gpu_check.py).

A result's error against a float64 reference may be at most twice the error of ATen computing the same thing in the
same dtype, plus a floor of a few ulps of the reference's magnitude (ATen's error can be zero by luck). NaN where
the reference is finite is an infinite error. tests/tolerance.py asserts it in the test suite.
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


# Whole-model training gradients: in a randomly initialised ResNet with few values per BN channel (e.g. ResNet-50,
# batch 4 at 64x64: 2x2 maps in layer4), a ReLU input near zero flips differently in any two valid fp32
# implementations, and one flip moves a single parameter's gradient far more than rounding does: ATen's own NCHW and
# channels_last runs differ by up to 6x in one parameter's error. So the whole gradient vector (each parameter
# scaled by its reference's magnitude) is held to the rule against the WORSE of ATen's two layouts, which is not
# flaky and still catches a bug that moves the vector; each parameter alone is held to GROSS_FACTOR x the worse
# layout's error of that parameter (plus the floor), which a wrong formula (an O(1) relative error) cannot pass.
GROSS_FACTOR = 16


def model_grads_violations(got, ref64, aten_layouts, ulps=4):
    """Why whole-model parameter gradients ({name: grad}) break the rule above, as a list (empty: they pass).
    got: fastres's; ref64: float64; aten_layouts: ATen's in the same dtype, one dict per memory format."""
    names = sorted(ref64)
    for grads in (got, *aten_layouts):
        if set(grads) != set(names):
            return [f"parameters with gradients differ: {sorted(set(grads) ^ set(names))}"]
    scale = {n: max(ref64[n].abs().max().item(), 1e-12) for n in names}

    def flat(grads):  # in the grads' own dtype, so that the rule's floor is that dtype's
        return torch.cat([(grads[n] / scale[n]).flatten() for n in names])

    flat_ref = flat(ref64)
    worse = max(max_error(flat(aten), flat_ref) for aten in aten_layouts)
    worst = max(names, key=lambda n: max_error(got[n], ref64[n]) / scale[n])
    problems = []
    why = violation(f"weight grads (scaled, against ATen's worse layout; worst parameter: {worst})", flat(got),
                    flat_ref, worse, ulps)
    if why is not None:
        problems.append(why)
    for n in names:
        err = max_error(got[n], ref64[n])
        limit = GROSS_FACTOR * max(max_error(aten[n], ref64[n]) for aten in aten_layouts) + floor(
            got[n].dtype, ref64[n], ulps)
        if not err <= limit:
            problems.append(f"grad of {n}: max error {err:.3e} exceeds the gross bound {limit:.3e} "
                            f"({GROSS_FACTOR}x the worse ATen layout's error + floor)")
    return problems
