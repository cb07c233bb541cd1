"""The project's one tolerance rule: a result's error against a float64 reference may be at most twice the error
of ATen computing the same thing in the same dtype (plus a floor of a few ulps of the result's magnitude, since
ATen's error can be zero by luck, e.g. for a plain relu)."""
import torch


def max_error(t, ref64):
    return (t.detach().double() - ref64.detach().double()).abs().max().item() if t.numel() else 0.0


def assert_within(name, got, ref64, aten, ulps=4):
    """got, aten: the same quantity computed by fastres and by ATen in the test dtype; ref64: in float64."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err, aten_err = max_error(got, ref64), max_error(aten, ref64)
    floor = ulps * torch.finfo(got.dtype).eps * max(ref64.abs().max().item() if ref64.numel() else 0.0, 1.0)
    assert err <= 2 * aten_err + floor, (
        f"{name}: max error {err:.3e} against the float64 reference exceeds twice ATen's {aten_err:.3e} "
        f"(+ floor {floor:.1e})")
