"""fastres.nn against torchvision: blocks (train / eval, fused / fallback), FrozenBatchNorm2d, freeze_bn, fold_bn,
convert.

Every parity check runs the same weights three times: fastres in fp32, torchvision in fp32 and torchvision in
float64, and holds fastres to tests/tolerance.py's rule (at most twice torchvision's fp32 error).
"""
import copy
from functools import partial

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tvr
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozenBN

import fastres.nn as fnn
from fastres import ops
from fastres._convert import convert
from fastres.ops import _compiled
from fastres.nn import BasicBlock, Bottleneck, FrozenBatchNorm2d, fold_bn, freeze_bn
from model_helpers import randomize_
from tolerance import assert_within

BLOCKS = {"bottleneck": (Bottleneck, tvr.Bottleneck), "basic": (BasicBlock, tvr.BasicBlock)}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


# ------------------------------------------------------------------------------------------------ helpers


def make_blocks(kind, inplanes, planes, stride=1, downsample=False, norm_layer=None, device="cpu", **fastres_kwargs):
    """(fastres block, torchvision block, torchvision block in float64), all with the same randomized state."""
    fcls, tcls = BLOCKS[kind]
    norm_layer = norm_layer or nn.BatchNorm2d
    out = planes * fcls.expansion

    def shortcut():
        return nn.Sequential(fnn.conv1x1(inplanes, out, stride), norm_layer(out)) if downsample else None

    fr = randomize_(fcls(inplanes, planes, stride, shortcut(), norm_layer=norm_layer, **fastres_kwargs))
    tv = tcls(inplanes, planes, stride, shortcut(), norm_layer=norm_layer)
    tv.load_state_dict(fr.state_dict())
    return fr.to(device), tv.to(device), copy.deepcopy(tv).double().to(device)


def run(model, x, grad_out=None):
    """Forward + backward in the model's dtype: (output, input grad, {param: grad}, upstream grad used).
    Without grad_out, a random one is drawn (in float64, so the three runs can share it)."""
    dtype = next(model.parameters()).dtype
    model.zero_grad(set_to_none=True)
    xi = x.detach().clone().to(dtype).requires_grad_()
    out = model(xi)
    if grad_out is None:
        grad_out = torch.randn(out.shape, dtype=torch.float64, device=out.device)
    out.backward(grad_out.to(dtype))
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), xi.grad, grads, grad_out


def assert_runs_match(fr, tv, ref, x, what="", per_tensor=True):
    """One forward/backward of the three models; outputs, input grads, weight grads and buffers checked.

    per_tensor=False holds all weight grads to the rule as one quantity, each scaled by its reference's magnitude:
    for whole networks, where the error ratio of one small grad among dozens is too noisy to judge alone."""
    o_ref, gx_ref, gw_ref, grad_out = run(ref, x)
    o_tv, gx_tv, gw_tv, _ = run(tv, x, grad_out)
    o_fr, gx_fr, gw_fr, _ = run(fr, x, grad_out)
    assert_within(f"{what} output", o_fr, o_ref, o_tv)
    assert_within(f"{what} input grad", gx_fr, gx_ref, gx_tv)
    assert set(gw_fr) == set(gw_ref), f"{what}: weights with grads differ: {set(gw_fr) ^ set(gw_ref)}"
    if per_tensor:
        for name in gw_ref:
            assert_within(f"{what} grad of {name}", gw_fr[name], gw_ref[name], gw_tv[name])
    else:
        assert_weight_grads_within(what, gw_fr, gw_ref, gw_tv)
    assert_buffers_match(fr, tv, ref, what)
    return o_fr


def assert_weight_grads_within(what, got, ref, aten):
    names = sorted(ref)
    scale = {n: max(ref[n].abs().max().item(), 1e-12) for n in names}

    def flat(grads):  # in the grads' own dtype, so that the rule's floor is that dtype's
        return torch.cat([(grads[n] / scale[n]).flatten() for n in names])

    worst = max(names, key=lambda n: (got[n].double() - ref[n]).abs().max().item() / scale[n])
    assert_within(f"{what} weight grads (scaled; worst: {worst})", flat(got), flat(ref), flat(aten))


def assert_buffers_match(fr, tv, ref, what=""):
    b_fr, b_tv, b_ref = (dict(m.named_buffers()) for m in (fr, tv, ref))
    assert set(b_fr) == set(b_ref)
    for name in b_ref:
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b_fr[name], b_tv[name]), f"{what} {name}: {b_fr[name]} != {b_tv[name]}"
        else:
            assert_within(f"{what} {name}", b_fr[name], b_ref[name], b_tv[name])


def assert_no_grad_match(fr, tv, ref, x, what=""):
    with torch.no_grad():
        assert_within(f"{what} no-grad output", fr(x), ref(x.double()), tv(x))


def set_mode(training, *models):
    for m in models:
        m.train(training)


# ------------------------------------------------------------------------------------------------ block parity
BLOCK_CASES = {
    "bottleneck": dict(kind="bottleneck", inplanes=16, planes=4),
    "bottleneck-projection": dict(kind="bottleneck", inplanes=8, planes=4, downsample=True),
    "bottleneck-stride2": dict(kind="bottleneck", inplanes=8, planes=4, stride=2, downsample=True),
    "basic": dict(kind="basic", inplanes=8, planes=8),
    "basic-stride2": dict(kind="basic", inplanes=8, planes=16, stride=2, downsample=True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_block_train_matches_torchvision(case, momentum, device):
    fr, tv, ref = make_blocks(**BLOCK_CASES[case], norm_layer=partial(nn.BatchNorm2d, momentum=momentum),
                              device=device)
    set_mode(True, fr, tv, ref)
    for step in range(3):  # running stats accumulate over steps; num_batches_tracked drives momentum=None
        x = torch.randn(2, fr.conv1.in_channels, 9, 9, device=device)
        assert_runs_match(fr, tv, ref, x, f"{case} step {step}")
    assert fr.bn1.num_batches_tracked.item() == 3 + 3


class OpLog(TorchDispatchMode):
    """The fastres ops a region calls (outermost only: a mode does not see the ops inside a custom op's kernel)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastres":
            self.calls.append((func.__name__.split(".")[0], args))
        return func(*args, **(kwargs or {}))

    def count(self, name, test=lambda args: True):
        return sum(1 for n, args in self.calls if n == name and test(args))


@pytest.mark.skipif(not _compiled.has_kernel("_bn_apply", "cpu"), reason="fastres._C not built")
@pytest.mark.parametrize("path", ["recompute", "lean", "per-unit"])
@pytest.mark.parametrize("case", ["bottleneck-stride2", "basic-stride2"])
def test_projection_block_trains_through_one_dual_apply(case, path, monkeypatch):
    """In training, a block with a projection shortcut runs its last BN, the shortcut's BN, the add and the ReLU as
    one dual apply forward and one kernel backward: in both memory modes of the chained path and on the per-unit
    path that torch.compile takes; every BN's statistics come from the statistics kernel; and the results stay
    torchvision's."""
    if path == "per-unit":
        monkeypatch.setattr(fnn.blocks._lean, "block_forward", lambda block, x: None)
    fr, tv, ref = make_blocks(**BLOCK_CASES[case])
    if path != "per-unit":
        fnn.set_memory_mode(fr, path)
    set_mode(True, fr, tv, ref)
    x = torch.randn(2, fr.conv1.in_channels, 9, 9, requires_grad=True)
    forward, backward = OpLog(), OpLog()
    with forward:
        out = copy.deepcopy(fr)(x)  # a copy: the parity steps below start from the same running statistics
    with backward:
        out.sum().backward()
    n_bn = len(fr._units()) + 1
    if path != "per-unit":
        assert forward.count("_bn_apply", lambda a: a[4] is not None) == 1, forward.calls
        assert forward.count("_bn_stats") == n_bn
        assert backward.count("_bn_apply_backward", lambda a: a[7] is not None) == 1, backward.calls
    else:
        assert forward.count("dual_bn_act_forward") == 1 and forward.count("conv_bn_act_forward") == n_bn - 2
        assert backward.count("dual_bn_act_backward") == 1
    for step in range(2):
        assert_runs_match(fr, tv, ref, torch.randn(2, fr.conv1.in_channels, 9, 9), f"{case} {path} step {step}")


@pytest.mark.skipif(ops._backend._why_not("triton", "conv_bn_act_forward", "cpu") is not None,
                    reason="the Triton backend cannot run here")
def test_projection_block_per_unit_path_under_a_backend_without_dual_kernel(monkeypatch):
    """A forced Triton backend has no dual kernel: the per-unit path then runs each unit's conv_bn_act."""
    monkeypatch.setattr(fnn.blocks._lean, "block_forward", lambda block, x: None)
    fr, tv, ref = make_blocks(**BLOCK_CASES["bottleneck-stride2"])
    set_mode(True, fr, tv, ref)
    with ops.backend("triton"):
        assert_runs_match(fr, tv, ref, torch.randn(2, fr.conv1.in_channels, 9, 9), "triton per-unit")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_block_eval_matches_torchvision(case, device):
    fr, tv, ref = make_blocks(**BLOCK_CASES[case], device=device)
    set_mode(False, fr, tv, ref)
    x = torch.randn(2, fr.conv1.in_channels, 9, 9, device=device)
    assert_runs_match(fr, tv, ref, x, case)  # differentiable fold: grads reach conv and BN weights
    assert_no_grad_match(fr, tv, ref, x, case)  # cached fold
    assert_no_grad_match(fr, tv, ref, x, case + " (cache hit)")


def test_stride_in_1x1_moves_the_stride_to_the_first_conv():
    fr, tv, ref = make_blocks("bottleneck", 8, 4, stride=2, downsample=True, stride_in_1x1=True)
    assert fr.conv1.stride == (2, 2) and fr.conv2.stride == (1, 1)
    for m in (tv, ref):  # the paper's v1, built by hand from torchvision's block
        m.conv1.stride, m.conv2.stride = (2, 2), (1, 1)
    for training in (True, False):
        set_mode(training, fr, tv, ref)
        assert_runs_match(fr, tv, ref, torch.randn(2, 8, 9, 9), f"v1 training={training}")


@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
def test_block_without_residual_is_the_plain_stack(kind):
    fcls, _ = BLOCKS[kind]
    block = randomize_(fcls(8, 8, 2, residual=False))
    ref = copy.deepcopy(block).double()
    units = [(ref.conv1, ref.bn1), (ref.conv2, ref.bn2)] + ([(ref.conv3, ref.bn3)] if kind == "bottleneck" else [])

    def plain(x):
        for conv, bn in units:
            x = torch.relu(bn(conv(x)))
        return x

    for training in (True, False):
        set_mode(training, block, ref)
        x = torch.randn(2, 8, 9, 9)
        out = block(x)
        assert out.shape == (2, 8 * fcls.expansion, 5, 5)
        torch.testing.assert_close(out, plain(x.double()).float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(block.bn1.running_mean, ref.bn1.running_mean.float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="residual=False"):
        fcls(8, 8, 2, nn.Sequential(fnn.conv1x1(8, 8 * fcls.expansion, 2), nn.BatchNorm2d(8 * fcls.expansion)),
             residual=False)


def test_training_batch_of_one_value_per_channel_raises_like_batchnorm():
    fr, tv, _ = make_blocks("bottleneck", 16, 4)
    x = torch.randn(1, 16, 1, 1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        tv(x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fr(x)


def test_basic_block_rejects_what_torchvision_rejects():
    with pytest.raises(ValueError, match="groups=1"):
        BasicBlock(8, 8, groups=2)
    with pytest.raises(NotImplementedError, match="Dilation"):
        BasicBlock(8, 8, dilation=2)


# ------------------------------------------------------------------------------------------------ the fold cache
def test_fold_is_not_stale_after_an_sgd_step():
    fr, tv, ref = make_blocks("bottleneck", 8, 4, stride=2, downsample=True)
    models = (fr, tv, ref)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    x = torch.randn(2, 8, 9, 9)
    set_mode(False, *models)
    assert_no_grad_match(fr, tv, ref, x, "before the step")
    set_mode(True, *models)
    grad_out = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    for m, opt in zip(models, opts):
        run(m, torch.randn(2, 8, 9, 9, generator=torch.Generator().manual_seed(5)), grad_out)
        opt.step()
    set_mode(False, *models)
    assert_no_grad_match(fr, tv, ref, x, "after the step")
    # An in-place change in eval mode (no train() in between) is seen too.
    new_state = randomize_(copy.deepcopy(fr), seed=7).state_dict()
    for m in models:
        m.load_state_dict(new_state)
    assert_no_grad_match(fr, tv, ref, x, "after load_state_dict")


def test_fold_is_not_stale_after_running_stats_update():
    fr, tv, ref = make_blocks("basic", 8, 16, stride=2, downsample=True)
    models = (fr, tv, ref)
    x = torch.randn(2, 8, 9, 9)
    set_mode(False, *models)
    assert_no_grad_match(fr, tv, ref, x, "before")
    set_mode(True, *models)
    with torch.no_grad():
        for m in models:
            m(x.to(next(m.parameters()).dtype))
    set_mode(False, *models)
    assert_no_grad_match(fr, tv, ref, x, "after a training forward")


@pytest.fixture
def fold_calls(monkeypatch):
    calls = []
    real = ops.fold_bn

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "fold_bn", counting)
    return calls


def test_fold_cache_reuses_only_unchanged_folds(fold_calls):
    fr, tv, _ = make_blocks("bottleneck", 8, 4, stride=2, downsample=True)
    set_mode(False, fr, tv)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        fr(x)
        assert len(fold_calls) == 4  # conv1..conv3 and the downsample projection
        fr(x)
        assert len(fold_calls) == 4  # nothing changed: all four reused
        for m in (fr, tv):
            m.bn2.running_var.mul_(3)
        torch.testing.assert_close(fr(x), tv(x), rtol=1e-5, atol=1e-5)
        assert len(fold_calls) == 5  # only bn2's unit refolded
    # Autograd on, trainable BN affine: BN normalizes after the conv (conv_bn_act eval), nothing is folded.
    fr(x)
    assert len(fold_calls) == 5
    # Trainable convs under frozen BN affine: every call folds (differentiably).
    for m in fr.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(False)
    fr(x)
    fr(x)
    assert len(fold_calls) == 13
    # Everything frozen under autograd (e.g. a frozen backbone): cached again; the no-grad folds are still valid.
    fr.requires_grad_(False)
    tv.requires_grad_(False)
    xg = x.clone().requires_grad_()
    fr(xg)
    assert len(fold_calls) == 13
    with torch.no_grad():
        for m in (fr, tv):
            m.bn1.running_mean.add_(0.5)
    torch.testing.assert_close(fr(xg), tv(xg), rtol=1e-5, atol=1e-5)
    fr(xg).sum().backward()
    assert len(fold_calls) == 14
    assert xg.grad is not None


def test_fold_cache_does_not_travel_with_copies_or_pickles(tmp_path):
    fr, _, _ = make_blocks("basic", 8, 8)
    fr.eval()
    with torch.no_grad():
        fr(torch.randn(2, 8, 6, 6))
    assert len(fr.fold_cache) == 2
    assert len(copy.deepcopy(fr).fold_cache) == 0
    torch.save(fr, tmp_path / "block.pt")
    loaded = torch.load(tmp_path / "block.pt", weights_only=False)
    assert len(loaded.fold_cache) == 0
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fr(x))
    fr.train()
    assert len(fr.fold_cache) == 0  # nothing is folded in training: memory given back


def test_fold_cache_sees_dtype_round_trips():
    fr, tv, _ = make_blocks("basic", 8, 8)
    set_mode(False, fr, tv)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        fr(x)
        fr.double()
        tv.double()
        torch.testing.assert_close(fr(x.double()), tv(x.double()))
        fr.float()
        tv.float()
        torch.testing.assert_close(fr(x), tv(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ fallbacks
def _resnets(block_kind, layers=(1, 1, 1, 1), **kwargs):
    fcls, tcls = BLOCKS[block_kind]
    fr = randomize_(tvr.ResNet(fcls, list(layers), num_classes=10, **kwargs))
    tv = tvr.ResNet(tcls, list(layers), num_classes=10, **kwargs)
    tv.load_state_dict(fr.state_dict())
    return fr, tv, copy.deepcopy(tv).double()


# (ResNet kwargs, input size): 64x64 wherever BN normalizes with batch statistics, since at 32x32 the last stage
# would do so over one value per sample, where everyone's grads are noise.
FALLBACK_CASES = {
    "groups": (dict(groups=4, width_per_group=4), 64),
    "dilation": (dict(replace_stride_with_dilation=[False, True, True], width_per_group=16), 32),
    "groupnorm": (dict(norm_layer=lambda c: nn.GroupNorm(2, c), width_per_group=16), 32),
    "bn-without-running-stats": (dict(norm_layer=partial(nn.BatchNorm2d, track_running_stats=False),
                                      width_per_group=16), 64),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(FALLBACK_CASES))
def test_configurations_without_a_kernel_fall_back_correctly(case, training):
    kwargs, size = FALLBACK_CASES[case]
    fr, tv, ref = _resnets("bottleneck", **kwargs)
    set_mode(training, fr, tv, ref)
    assert_runs_match(fr, tv, ref, torch.randn(2, 3, size, size), case, per_tensor=False)


@pytest.mark.parametrize("change", ["reflect-padding", "gelu", "hooked-conv", "bn-subclass"])
def test_changed_submodules_are_honoured(change):
    fr, tv, ref = make_blocks("bottleneck", 8, 4, stride=2, downsample=True)
    seen = []
    for m in (fr, tv, ref):
        if change == "reflect-padding":
            m.conv2.padding_mode = "reflect"
        elif change == "gelu":
            m.relu = nn.GELU()
        elif change == "hooked-conv":
            m.conv1.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
        else:  # a BN subclass with its own forward must run that forward
            class ScaledBN(nn.BatchNorm2d):
                def forward(self, x):
                    return super().forward(x) * 2

            scaled = ScaledBN(m.bn3.num_features).to(m.bn3.weight.dtype)
            scaled.load_state_dict(m.bn3.state_dict())
            m.bn3 = scaled
    for training in (True, False):
        set_mode(training, fr, tv, ref)
        assert_runs_match(fr, tv, ref, torch.randn(2, 8, 9, 9), f"{change} training={training}")
    if change == "hooked-conv":
        assert len(seen) == 6


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_other_downsample_modules_are_called(training):
    """A shortcut module other than Sequential(conv, BN) (e.g. the CIFAR option-A padding) is simply called."""
    class Pad(nn.Module):
        def forward(self, x):
            return nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, 8))

    fr = randomize_(BasicBlock(8, 16, 2, Pad()))
    tv = tvr.BasicBlock(8, 16, 2, Pad())
    tv.load_state_dict(fr.state_dict())
    ref = copy.deepcopy(tv).double()
    set_mode(training, fr, tv, ref)
    assert_runs_match(fr, tv, ref, torch.randn(2, 8, 9, 9), "pad shortcut")


# ------------------------------------------------------------------------------------------------ layout, inputs
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
def test_channels_last_in_channels_last_out(kind, training, device):
    case = BLOCK_CASES["bottleneck-stride2" if kind == "bottleneck" else "basic-stride2"]
    fr, tv, ref = make_blocks(**case, device=device)
    set_mode(training, fr, tv, ref)
    x = torch.randn(2, 8, 9, 9, device=device).to(memory_format=torch.channels_last)
    out = fr(x)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert_within("channels_last output", out, ref(x.double()), tv(x))
    out = fr(torch.randn(2, 8, 9, 9, device=device))
    assert out.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_autocast(training, device):
    fr, tv, ref = make_blocks("bottleneck", 8, 4, stride=2, downsample=True, device=device)
    set_mode(training, fr, tv, ref)
    x = torch.randn(2, 8, 9, 9, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out, baseline = fr(x), tv(x)
    assert out.dtype == baseline.dtype == torch.bfloat16
    assert_within("autocast output", out, ref(x.double()), baseline)
    assert_buffers_match(fr, tv, ref, "autocast")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_inputs_are_never_mutated(training):
    fr, _, _ = make_blocks("bottleneck", 16, 4)  # identity shortcut: the input itself is the residual
    fr.train(training)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 16, 6, 6).to(memory_format=fmt)
        before, version = x.clone(), x._version
        fr(x).sum().backward() if training else fr(x)
        with torch.no_grad():
            fr(x)
        assert torch.equal(x, before) and x._version == version


# ------------------------------------------------------------------------------------------------ FrozenBatchNorm2d
def test_frozen_bn_loads_a_batchnorm_state_dict_and_matches_it():
    bn = randomize_(nn.BatchNorm2d(6)).eval()
    assert "num_batches_tracked" in bn.state_dict()
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(bn.state_dict(), strict=True)
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    assert not list(frozen.parameters())
    x = torch.randn(2, 6, 5, 5)
    assert_within("FrozenBatchNorm2d", frozen(x), copy.deepcopy(bn).double()(x.double()), bn(x))
    # ... and a FrozenBatchNorm2d state_dict loads back into a BatchNorm2d.
    back = nn.BatchNorm2d(6)
    back.load_state_dict(frozen.state_dict(), strict=True)
    torch.testing.assert_close(back.running_var, bn.running_var)


def test_frozen_bn_honours_eps():
    bn = nn.BatchNorm2d(4, eps=0.1).eval()
    with torch.no_grad():
        bn.running_var.zero_()  # a dead channel: only eps keeps 1/sqrt(var + eps) finite
    frozen = FrozenBatchNorm2d(4, eps=0.1)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(frozen(x), bn(x))
    torch.testing.assert_close(freeze_bn(copy.deepcopy(bn))(x), bn(x))
    other_eps = FrozenBatchNorm2d(4, eps=1e-3)
    other_eps.load_state_dict(bn.state_dict())
    assert not torch.allclose(other_eps(x), bn(x))


def test_fresh_frozen_bn_equals_fresh_batchnorm_in_eval():
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(FrozenBatchNorm2d(3)(x), nn.BatchNorm2d(3).eval()(x))


def test_frozen_bn_bad_arguments():
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="num_features"):
            FrozenBatchNorm2d(bad)
    with pytest.raises(ValueError, match="eps"):
        FrozenBatchNorm2d(3, eps=0)
    with pytest.raises(ValueError, match="channels"):
        FrozenBatchNorm2d(3)(torch.randn(1, 4, 2, 2))


@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
def test_frozen_bn_block_trains_like_torchvision_frozen_bn(kind):
    """Detection fine-tuning: BN frozen (folded into the convs), convs still trained."""
    fcls, tcls = BLOCKS[kind]
    inplanes, planes = (16, 4) if kind == "bottleneck" else (8, 8)
    fr = freeze_bn(randomize_(fcls(inplanes, planes)))
    tv = tcls(inplanes, planes, norm_layer=TorchvisionFrozenBN)
    tv.load_state_dict(fr.state_dict())
    ref = copy.deepcopy(tv).double()
    set_mode(True, fr, tv, ref)
    assert_runs_match(fr, tv, ref, torch.randn(2, inplanes, 6, 6), "frozen BN")


def test_freeze_bn_replaces_every_batchnorm_in_place():
    model = randomize_(tvr.ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10)).eval()
    ref = copy.deepcopy(model).double()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert freeze_bn(model) is model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == n_bn
    x = torch.randn(2, 3, 32, 32)
    baseline = copy.deepcopy(ref).float()
    with torch.no_grad():
        assert_within("frozen model", model(x), ref(x.double()), baseline(x))
    model.train()  # frozen: training mode changes nothing
    with torch.no_grad():
        assert_within("frozen model in train()", model(x), ref(x.double()), baseline(x))


def test_freeze_bn_root_shared_and_refused_modules():
    bn = randomize_(nn.BatchNorm2d(5))
    frozen = freeze_bn(bn)
    assert isinstance(frozen, FrozenBatchNorm2d) and frozen.eps == bn.eps
    torch.testing.assert_close(frozen.running_mean, bn.running_mean)
    shared = nn.BatchNorm2d(3)
    model = nn.Sequential(shared, nn.Sequential(shared))
    freeze_bn(model)
    assert model[0] is model[1][0] and isinstance(model[0], FrozenBatchNorm2d)
    no_stats = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="0.*running statistics"):
        freeze_bn(no_stats)

    class BNAct(nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    with pytest.raises(TypeError, match="own forward"):
        freeze_bn(nn.Sequential(BNAct(3)))


# ------------------------------------------------------------------------------------------------ fold_bn
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_fold_bn_folds_a_fastres_resnet():
    fr, tv, ref = _resnets("bottleneck")
    set_mode(False, fr, tv, ref)
    before = _state(fr)
    folded = fold_bn(fr)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None for c in convs)
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.layer1[0].downsample[1], nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_within("folded fastres resnet", folded(x), ref(x.double()), tv(x))
    # The original is untouched.
    assert all(torch.equal(v, before[k]) for k, v in fr.state_dict().items())
    assert isinstance(fr.bn1, nn.BatchNorm2d) and fr.layer1[0].conv1.bias is None


def test_fold_bn_folds_torchvision_models_and_sequentials():
    _, tv, ref = _resnets("basic")
    set_mode(False, tv, ref)
    folded = fold_bn(tv)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_within("folded torchvision resnet", folded(x), ref(x.double()), tv(x))
    # VGG-BN style: conv (with bias) -> BN -> ReLU, and conv -> BN at the end.
    seq = randomize_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 6, 3, bias=False), nn.BatchNorm2d(6))).eval()
    folded = fold_bn(seq)
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[4], nn.Identity)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_within("folded sequential", folded(x), copy.deepcopy(seq).double()(x.double()), seq(x))


def test_fold_bn_handles_convs_no_kernel_covers():
    fr, tv, ref = _resnets("bottleneck", groups=4, width_per_group=4)
    set_mode(False, fr, tv, ref)
    folded = fold_bn(fr)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_within("folded resnext", folded(x), ref(x.double()), tv(x))


def test_fold_bn_refuses_training_mode():
    fr, _, _ = _resnets("basic")
    with pytest.raises(RuntimeError, match=r"eval\(\)"):
        fold_bn(fr)
    fr.eval()
    fr.layer2[0].bn1.train()
    with pytest.raises(RuntimeError, match="layer2.0.bn1"):
        fold_bn(fr)


# ------------------------------------------------------------------------------------------------ convert
@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
def test_convert_swaps_torchvision_blocks_keeping_weights_and_outputs(kind):
    _, tcls = BLOCKS[kind]
    model = randomize_(tvr.ResNet(tcls, [1, 1, 1, 1], num_classes=10))
    ref = copy.deepcopy(model).double()
    baseline = copy.deepcopy(model)
    params = list(model.parameters())
    assert convert(model) is model
    assert not any(type(m) in (tvr.Bottleneck, tvr.BasicBlock) for m in model.modules())
    assert isinstance(model.layer1[0], BLOCKS[kind][0])
    assert all(a is b for a, b in zip(model.parameters(), params)) and len(list(model.parameters())) == len(params)
    assert model.state_dict().keys() == baseline.state_dict().keys()
    for training in (True, False):
        set_mode(training, model, baseline, ref)
        assert_runs_match(model, baseline, ref, torch.randn(2, 3, 64, 64), f"converted training={training}",
                          per_tensor=False)


def test_convert_root_block_and_hooks():
    tv_block = randomize_(tvr.Bottleneck(16, 4))
    calls = []
    handle = tv_block.register_forward_hook(lambda *a: calls.append(1))
    block = convert(tv_block)
    assert type(block) is Bottleneck and block.conv1 is tv_block.conv1
    block(torch.randn(2, 16, 4, 4))
    assert calls == [1]
    handle.remove()
    block(torch.randn(2, 16, 4, 4))
    assert calls == [1]
    plain = nn.Sequential(nn.Conv2d(3, 3, 1))
    assert convert(plain) is plain and type(plain[0]) is nn.Conv2d
