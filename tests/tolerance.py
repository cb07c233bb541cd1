"""The project's one tolerance rule: a result's error against a float64 reference may be at most twice the error
of ATen computing the same thing in the same dtype (plus a floor of a few ulps of the result's magnitude, since
ATen's error can be zero by luck, e.g. for a plain relu).

Whole-model training gradients (assert_model_grads_within): in a randomly initialised ResNet with few values per BN
channel (e.g. ResNet-50, batch 4 at 64x64: 2x2 maps in layer4), a ReLU input near zero flips differently in any
two valid fp32 implementations, and one flip moves a single parameter's gradient far more than rounding does:
ATen's own NCHW and channels_last runs differ by up to 6x in one parameter's error. So, there:
  - the whole gradient vector (each parameter scaled by its reference's magnitude) is held to the rule against the
    WORSE of ATen's two layouts (NCHW and channels_last), which is not flaky and still catches a bug that moves the
    vector;
  - each parameter alone is held to a gross bound, GROSS_FACTOR x the worse layout's error of that parameter (plus
    the floor), which a wrong formula (an O(1) relative error) cannot pass.
"""
import torch

GROSS_FACTOR = 16


def max_error(t, ref64):
    return (t.detach().double() - ref64.detach().double()).abs().max().item() if t.numel() else 0.0


def _floor(got, ref64, ulps):
    return ulps * torch.finfo(got.dtype).eps * max(ref64.abs().max().item() if ref64.numel() else 0.0, 1.0)


def assert_within(name, got, ref64, aten, ulps=4):
    """got, aten: the same quantity computed by fastres and by ATen in the test dtype; ref64: in float64."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err, aten_err = max_error(got, ref64), max_error(aten, ref64)
    floor = _floor(got, ref64, ulps)
    assert err <= 2 * aten_err + floor, (
        f"{name}: max error {err:.3e} against the float64 reference exceeds twice ATen's {aten_err:.3e} "
        f"(+ floor {floor:.1e})")


def assert_model_grads_within(what, got, ref64, aten_layouts, ulps=4):
    """Whole-model parameter gradients ({name: grad}): fastres's `got`, float64 `ref64`, and ATen's in the test dtype
    run once per memory format (`aten_layouts`: a list of such dicts, NCHW and channels_last). The rule above for
    the whole vector against the worse ATen layout, and GROSS_FACTOR for each parameter (see the module's doc)."""
    names = sorted(ref64)
    assert set(got) == set(names), f"{what}: parameters with gradients differ: {sorted(set(got) ^ set(names))}"
    for aten in aten_layouts:
        assert set(aten) == set(names)
    scale = {n: max(ref64[n].abs().max().item(), 1e-12) for n in names}

    def flat(grads):  # in the grads' own dtype, so that the rule's floor is that dtype's
        return torch.cat([(grads[n] / scale[n]).flatten() for n in names])

    flat_ref = flat(ref64)
    worse = max(aten_layouts, key=lambda aten: max_error(flat(aten), flat_ref))
    worst = max(names, key=lambda n: max_error(got[n], ref64[n]) / scale[n])
    assert_within(f"{what} weight grads (scaled, against ATen's worse layout; worst parameter: {worst})", flat(got),
                  flat_ref, flat(worse), ulps)
    for n in names:
        err = max_error(got[n], ref64[n])
        bound = GROSS_FACTOR * max(max_error(aten[n], ref64[n]) for aten in aten_layouts) + _floor(got[n],
                                                                                                 ref64[n], ulps)
        assert torch.isfinite(got[n]).all(), f"{what} grad of {n}: non-finite values"
        assert err <= bound, (f"{what} grad of {n}: max error {err:.3e} exceeds the gross bound {bound:.3e} "
                              f"({GROSS_FACTOR}x the worse ATen layout's error + floor)")
