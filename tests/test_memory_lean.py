"""Memory-lean training (fastres.nn._lean): what a training step saves for backward, counted with
torch.autograd.graph.saved_tensors_hooks over distinct storages, against torchvision; and that the lean chain's
gradients and running statistics are still torchvision's (tests/test_nn.py holds every block configuration of the
default "lean" mode to the tolerance rule; here: the "recompute" mode likewise, gradcheck in float64, bf16
autocast, where the lean path runs).
"""
import copy
from functools import partial

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tvr

import fastres.models as fm
import fastres.nn as fnn
from fastres.ops import _compiled
from model_helpers import count_lean_blocks
from test_nn import BLOCK_CASES, assert_runs_match, make_blocks, set_mode
from tolerance import assert_within

MODES = ["lean", "recompute"]


class SavedStorages:
    """Distinct storages autograd saves while active (parameters and buffers of `exclude` left out)."""

    def __init__(self, exclude=()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.nbytes = {}

    def _pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.exclude:
            self.nbytes.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def total(self, at_least=0):
        return sum(n for n in self.nbytes.values() if n >= at_least)

    def sizes(self, at_least=0):
        return sorted(n for n in self.nbytes.values() if n >= at_least)


def saved_by(model, x):
    """(SavedStorages of one training forward, output), the input itself left out, then backward run."""
    model.train()
    with SavedStorages(list(model.parameters()) + list(model.buffers()) + [x]) as saved:
        out = model(x)
    out.float().sum().backward()
    return saved, out


def nbytes(*shapes, dtype=torch.float32):
    item = torch.empty((), dtype=dtype).element_size()
    return sorted(torch.Size(s).numel() * item for s in shapes)


# ------------------------------------------------------------------------------------------------ per block
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["bottleneck", "bottleneck-projection", "basic", "basic-projection"])
def test_block_saves_only_raw_conv_outputs_and_its_output(case, mode):
    """Activation-sized storages a training block saves: each conv's raw output and the block output (the ReLU
    mask, and the next block's input anyway); torchvision also keeps every normalized activation. In "recompute"
    mode a Bottleneck's last 1x1 conv and its projection are run again in backward: their raw outputs go too."""
    n, c, h = 2, 16, 8
    if case.startswith("bottleneck"):
        planes, width = (4, 4) if case == "bottleneck" else (8, 8)
        out_c, stride = planes * 4, 1 if case == "bottleneck" else 2
        ds = None if case == "bottleneck" else nn.Sequential(fnn.conv1x1(c, out_c, stride), nn.BatchNorm2d(out_c))
        block = fnn.Bottleneck(c, planes, stride, ds)
        ref = tvr.Bottleneck(c, planes, stride, copy.deepcopy(ds))
        ho = h // stride
        raw = [(n, width, h, h), (n, width, ho, ho), (n, out_c, ho, ho)]
        normalized = [(n, width, h, h), (n, width, ho, ho)]
    else:
        planes = 16 if case == "basic" else 32
        stride = 1 if case == "basic" else 2
        ds = None if case == "basic" else nn.Sequential(fnn.conv1x1(c, planes, stride), nn.BatchNorm2d(planes))
        block = fnn.BasicBlock(c, planes, stride, ds)
        ref = tvr.BasicBlock(c, planes, stride, copy.deepcopy(ds))
        ho = h // stride
        raw = [(n, planes, ho, ho), (n, planes, ho, ho)]
        normalized = [(n, planes, ho, ho)]
    ref.load_state_dict(block.state_dict())
    fnn.set_memory_mode(block, mode)
    out_shape = (n, raw[-1][1], ho, ho)
    shortcut = [] if ds is None else [out_shape]
    kept_raw, kept_shortcut, kept_out = raw, shortcut, [out_shape]
    recomputed_tail = mode == "recompute" and case.startswith("bottleneck")
    if recomputed_tail:
        kept_raw, kept_shortcut = raw[:-1], []
    # A projection's BN, the add and the ReLU as fastres._C's dual apply keep the ReLU's 1-bit mask (per NCHW plane:
    # ceil(H*W / 8) bytes) instead of the output.
    dual = ds is not None and _compiled.has_kernel("_bn_apply", "cpu")
    mask_bytes = n * out_shape[1] * ((ho * ho + 7) // 8) if dual else 0
    if dual:
        kept_out = []
    x = torch.randn(n, c, h, h)
    threshold = min(nbytes(*raw))  # per-channel statistics are far smaller
    lean, out = saved_by(block, x)
    tv, tv_out = saved_by(ref, x)
    torch.testing.assert_close(out, tv_out, rtol=1e-4, atol=1e-4)
    assert lean.sizes(threshold) == nbytes(*kept_raw, *kept_shortcut, *kept_out)
    assert tv.sizes(threshold) == nbytes(*raw, *normalized, *shortcut, out_shape)
    if case == "bottleneck":  # W + W + 4W + 4W (recompute: W + W + 4W) against W + W + W + W + 4W + 4W
        assert lean.total(threshold) / tv.total(threshold) == pytest.approx(10 / 12 if mode == "lean" else 6 / 12)
    # Besides: each BN's batch mean and inverse std (fp32 per channel), and the mask, nothing else.
    stats = 2 * 4 * sum(m.num_features for m in block.modules() if isinstance(m, nn.BatchNorm2d))
    assert max(stats + mask_bytes, 1) < threshold
    assert lean.total() - lean.total(threshold) == stats + mask_bytes


def test_resnet50_saves_less_than_torchvision():
    """The whole network, small input: the ratios the two modes reach (0.85 and 0.52 at 224x224 too). Blocks:
    10/12 (lean) or 6/12 (recompute) of torchvision's; the stem, max-pool indices and classifier keep what
    torchvision keeps."""
    torch.manual_seed(0)
    model = fm.resnet50(num_classes=10)
    ref = torchvision.models.resnet50(num_classes=10)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    tv, _ = saved_by(ref, x)
    default, _ = saved_by(model, x)
    lean, _ = saved_by(fnn.set_memory_mode(model, "lean"), x)
    ratio = lean.total() / tv.total()
    assert 0.80 < ratio < 0.87, f"lean saved-for-backward ratio {ratio:.3f}"
    recompute, _ = saved_by(fnn.set_memory_mode(model, "recompute"), x)
    ratio = recompute.total() / tv.total()
    assert 0.45 < ratio < 0.6, f"recompute saved-for-backward ratio {ratio:.3f}"
    assert default.total() == recompute.total()  # the default mode meets the 0.6x budget


# ------------------------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["bottleneck-projection", "bottleneck", "basic"])
def test_lean_block_gradcheck_float64(kind, mode):
    torch.manual_seed(0)
    if kind == "basic":
        block = fnn.BasicBlock(3, 3).double()
    elif kind == "bottleneck":
        block = fnn.Bottleneck(4, 1).double()
    else:
        block = fnn.Bottleneck(3, 1, 2, nn.Sequential(fnn.conv1x1(3, 4, 2), nn.BatchNorm2d(4))).double()
    fnn.set_memory_mode(block, mode).train()
    x = torch.randn(2, block.conv1.in_channels, 4, 4, dtype=torch.float64, requires_grad=True)
    names, params = zip(*block.named_parameters())

    def f(x, *ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
@pytest.mark.parametrize("case", [c for c in BLOCK_CASES if c.startswith("bottleneck")])
def test_lean_mode_trains_like_torchvision(case, momentum):
    """The default mode ("recompute") is held to torchvision by test_nn's block parity tests; "lean" here."""
    fr, tv, ref = make_blocks(**BLOCK_CASES[case], norm_layer=partial(nn.BatchNorm2d, momentum=momentum))
    fnn.set_memory_mode(fr, "lean")
    set_mode(True, fr, tv, ref)
    for step in range(2):
        assert_runs_match(fr, tv, ref, torch.randn(2, fr.conv1.in_channels, 9, 9), f"{case} step {step}")


def test_set_memory_mode():
    model = fm.resnet50(num_classes=10)
    blocks = [m for m in model.modules() if isinstance(m, fnn.Bottleneck)]
    assert len(blocks) == 16 and all(b.memory_mode == "recompute" == fnn.DEFAULT_MEMORY_MODE for b in blocks)
    assert fnn.set_memory_mode(model, "lean") is model
    assert all(b.memory_mode == "lean" for b in blocks)
    assert fnn.BasicBlock(8, 8).memory_mode == "recompute"  # (a BasicBlock's 3x3 tail is never rerun)
    with pytest.raises(ValueError, match="mode must be one of 'lean', 'recompute', got 'checkpoint'"):
        fnn.set_memory_mode(model, "checkpoint")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fnn.set_memory_mode([model], "lean")


def test_lean_path_runs_in_training_and_not_in_eval(monkeypatch):
    calls = count_lean_blocks(monkeypatch)
    model = fm.cifar_resnet(8, shortcut="B")
    x = torch.randn(2, 3, 16, 16)
    model.train()(x)
    assert calls == [True, True, True]
    calls.clear()
    model.eval()(x)
    assert calls == []
    frozen = fnn.freeze_bn(copy.deepcopy(model)).train()  # nothing to normalize with batch statistics
    frozen(x)
    assert calls == [False, False, False]


@pytest.mark.parametrize("mode", MODES)
def test_lean_block_bf16_autocast_matches_torchvision_autocast(mode):
    """bf16 autocast: output, input and weight grads and running statistics held to the tolerance rule against
    torchvision under the same autocast (float64 reference); weight grads as one quantity, each scaled by its
    reference's magnitude (one small grad's error ratio alone is too noisy in bf16)."""
    torch.manual_seed(0)
    block = fnn.Bottleneck(16, 4, 2, nn.Sequential(fnn.conv1x1(16, 16, 2), nn.BatchNorm2d(16))).train()
    ref = tvr.Bottleneck(16, 4, 2, nn.Sequential(fnn.conv1x1(16, 16, 2), nn.BatchNorm2d(16))).train()
    ref.load_state_dict(block.state_dict())
    fnn.set_memory_mode(block, mode)
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(4, 16, 8, 8)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_tv = block(xs[0]), ref(xs[1])
    assert out.dtype == out_tv.dtype == torch.bfloat16
    x64 = x.double().requires_grad_()
    out64 = ref64(x64)
    g = torch.randn_like(out64)
    out.backward(g.bfloat16())
    out_tv.backward(g.bfloat16())
    out64.backward(g)
    assert_within("bf16 output", out, out64, out_tv)
    assert_within("bf16 input grad", xs[0].grad, x64.grad, xs[1].grad)
    names = [n for n, _ in ref64.named_parameters()]
    grads = [dict((n, p.grad) for n, p in m.named_parameters()) for m in (block, ref, ref64)]
    scale = {n: grads[2][n].abs().max().item() for n in names}
    flat = [torch.cat([(gr[n] / scale[n]).flatten() for n in names]) for gr in grads]
    assert flat[0].dtype == torch.float32
    assert_within("bf16 weight grads (scaled)", flat[0], flat[2], flat[1])
    b_fr, b_tv, b_64 = (dict(m.named_buffers()) for m in (block, ref, ref64))
    for n in b_64:
        if n.endswith("num_batches_tracked"):
            assert torch.equal(b_fr[n], b_tv[n])
        else:
            assert_within(f"bf16 {n}", b_fr[n], b_64[n], b_tv[n])


@pytest.mark.parametrize("mode", MODES)
def test_lean_path_never_writes_into_saved_tensors(mode):
    """Backward recomputes relu(bn(y)) into new memory: the saved raw outputs keep their version counters."""
    block = fnn.set_memory_mode(fnn.Bottleneck(8, 2), mode).train()
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    versions = {}

    def pack(t):
        versions[id(t)] = (t, t._version)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x)
    out.sum().backward()  # a version bump of a saved tensor would raise here
    assert all(t._version == v for t, v in versions.values())
