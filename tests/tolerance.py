"""The project's one tolerance rule, as test assertions: a result's error against a float64 reference may be at most
twice the error of ATen computing the same thing in the same dtype (plus a floor of a few ulps of the result's
magnitude, since ATen's error can be zero by luck, e.g. for a plain relu).

Whole-model training gradients (assert_model_grads_within) are held to the whole-vector form of the rule against
the worse of ATen's two layouts, and each parameter to a gross bound: fastres.testing explains why. The rule itself
lives in fastres.testing, which run-time checks (the autotuner, benchmarks/gpu_check.py) use too.
"""
import torch

from fastres.testing import floor, max_error, model_grads_violations


def assert_within(name, got, ref64, aten, ulps=4):
    """got, aten: the same quantity computed by fastres and by ATen in the test dtype; ref64: in float64."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err, aten_err = max_error(got, ref64), max_error(aten, ref64)
    margin = floor(got.dtype, ref64, ulps)
    assert err <= 2 * aten_err + margin, (
        f"{name}: max error {err:.3e} against the float64 reference exceeds twice ATen's {aten_err:.3e} "
        f"(+ floor {margin:.1e})")


def assert_model_grads_within(what, got, ref64, aten_layouts, ulps=4):
    """Whole-model parameter gradients ({name: grad}): fastres's `got`, float64 `ref64`, and ATen's in the test dtype
    run once per memory format (`aten_layouts`: a list of such dicts, NCHW and channels_last)."""
    problems = model_grads_violations(got, ref64, aten_layouts, ulps)
    assert not problems, f"{what}: " + "; ".join(problems)
