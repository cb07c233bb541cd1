"""CPU eval: conv weights prepacked once per fold in oneDNN's blocked layout (fastres.nn._fused.prepacked_conv_norm_act,
fastres.ops.backend_cuda), autocast's casts of the fold made once; no weight copy, reorder or activation cast in a
steady-state forward, never a stale weight, results within the tolerance rule."""
import contextlib
import copy
import ctypes
import ctypes.util
import gc
import platform
import sys
import types
import weakref

import pytest
import torch
import torchvision
from torch import nn
from torch.profiler import profile

import fastres
import fastres.models as fm
import fastres.nn as fnn
from fastres.models import _threads
from fastres.models.vgg import VGG, make_layers
from fastres.ops import _backend
from model_helpers import randomize_, torchvision_style_cifar_forward
from tolerance import assert_within

pytestmark = pytest.mark.skipif(
    _backend._why_not("cuda", "conv_bias_act", "cpu") is not None or not torch.backends.mkldnn.is_available(),
    reason="needs fastres._C's CPU kernels and oneDNN")

CL = torch.channels_last
# oneDNN's bf16 convolutions need AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; elsewhere bf16 runs ATen's convolution.
BF16_PACKED = torch.ops.mkldnn._is_mkldnn_bf16_supported()


def packed(precision):
    """Whether the plan runs this precision from packed oneDNN weights (and so through _run_plan): fp32 always, bf16
    only where oneDNN has bf16 kernels; elsewhere its Python loop runs ATen's bf16 convolutions."""
    return precision == "fp32" or BF16_PACKED
COPIES = ("aten::copy_", "aten::clone", "aten::_to_copy")
# Ops of the classifier head (ATen's own copies: mean's accumulation dtype, addmm's bias), the same as eager's.
HEAD = ("aten::adaptive_avg_pool2d", "aten::linear")


def pair(make_fr=fm.resnet18, make_tv=torchvision.models.resnet18, **kwargs):
    """(fastres model, torchvision model sharing its tensors), both eval."""
    fr = randomize_(make_fr(num_classes=10, **kwargs)).eval()
    with torch.device("meta"):
        tv = make_tv(num_classes=10, **kwargs)
    tv.load_state_dict(fr.state_dict(), assign=True)
    return fr, tv.eval()


@pytest.fixture
def packing(monkeypatch):
    """Counts the weights packed and the convs run from a packed weight."""
    from fastres.ops import backend_cuda
    counts = {"packed": 0, "ran": 0}
    pack, run = backend_cuda.pack_conv_weight, backend_cuda.prepacked_conv_bias_act

    def counting_pack(*args):
        counts["packed"] += 1
        return pack(*args)

    def counting_run(*args):
        counts["ran"] += 1
        return run(*args)

    monkeypatch.setattr(backend_cuda, "pack_conv_weight", counting_pack)
    monkeypatch.setattr(backend_cuda, "prepacked_conv_bias_act", counting_run)
    return counts


# ATen's convolutions themselves: copies inside them are the op's own, whoever calls it. torch 2.11's oneDNN op with
# a residual post-op clones the residual (a contiguous() inside it), and its refused 1x1-map case falls back to
# _slow_conv2d_forward, which fills its output with the bias; torch 2.14 does neither.
CONVOLUTIONS = ("mkldnn::_convolution_pointwise", "aten::_convolution", "aten::convolution")


def _under(event, names):
    e = event.cpu_parent
    while e is not None:
        if e.name in names:
            return True
        e = e.cpu_parent
    return False


def _in_head(event):
    return _under(event, HEAD)


def steady_state_copies(model, x):
    """(name, input shapes, inside a convolution) of every copy, cast or weight reorder in the second forward of model
    on x, outside the classifier head; a copy inside another (a cast's copy_) is counted as that one."""
    model(x)
    with profile(record_shapes=True) as prof:
        model(x)
    return [(e.name, [tuple(s) for s in e.input_shapes if s], _under(e, CONVOLUTIONS)) for e in prof.events()
            if (e.name in COPIES or "reorder" in e.name) and not _in_head(e) and not _under(e, COPIES)]


@pytest.mark.parametrize("grad_mode", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16-weights"])
def test_steady_state_eval_forward_copies_no_weight(precision, grad_mode, packing):
    model = fm.resnet50(num_classes=10, width_per_group=16).eval()
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=CL)
    if precision == "bf16-weights":
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    weight_shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Conv2d)}
    mode = torch.inference_mode() if grad_mode == "inference_mode" else torch.no_grad()
    with mode, torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-autocast"):
        copies = steady_state_copies(model, x)
    packed_path = packed(precision)
    assert packing["packed"] == (53 if packed_path else 0)  # once per conv, in the first forward
    # The first forward runs the plan's Python loop; from the second on, its body is one fastres::_run_plan call
    # making the same 53 oneDNN calls on the packed weights.
    assert packing["ran"] == (53 if packed_path else 0)
    with mode, torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-autocast"), profile() as prof:
        model(x)
    body = [e for e in prof.events() if e.name == "fastres::_run_plan"]
    convs = [e for e in prof.events()
             if e.name.startswith("mkldnn::_convolution_pointwise") and _under(e, "fastres::_run_plan")]
    assert (len(body), len(convs)) == ((1, 53) if packed_path else (0, 0))
    assert not [c for c in copies if "reorder" in c[0] or any(s in weight_shapes for s in c[1])], copies
    casts = [c[:2] for c in copies if c[0] == "aten::_to_copy"]
    # Autocast casts the fp32 input once, for the stem; nothing else is cast: the activations stay bf16.
    assert casts == ([("aten::_to_copy", [(1, 3, 32, 32)])] if precision == "bf16-autocast" else []), casts
    if packed_path:
        # Nothing else is copied either. (ATen's bf16 convolution without oneDNN fills its output with the bias
        # by a copy_, which the packed path does not run.)
        assert [c for c in copies if c[0] != "aten::_to_copy" and not c[2]] == [], copies


def _max_abs(t):
    return t.detach().abs().max().item()


def test_packed_weights_are_never_stale(packing):
    fr, tv = pair()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)

    def check(what, inp=x):
        with torch.no_grad():
            torch.testing.assert_close(fr(inp), tv(inp), rtol=1e-4, atol=1e-4 * _max_abs(tv(inp)), msg=what)

    check("first forward")
    assert packing["packed"] == 20  # every conv of ResNet-18
    check("second forward")
    assert packing["packed"] == 20
    # An optimizer step (train, then eval again).
    opt = torch.optim.SGD(fr.parameters(), lr=0.1)
    fr.train()
    fr(x).square().mean().backward()
    opt.step()
    fr.eval()
    check("after an optimizer step")
    assert packing["packed"] == 40
    # load_state_dict in eval mode.
    fr.load_state_dict(randomize_(copy.deepcopy(fr), seed=7).state_dict())
    check("after load_state_dict")
    # An in-place edit of one conv weight: only that unit repacks.
    before = packing["packed"]
    with torch.no_grad():
        fr.layer2[0].conv2.weight.mul_(1.5)
    check("after an in-place weight edit")
    assert packing["packed"] == before + 1
    # A running statistic.
    with torch.no_grad():
        fr.layer3[1].bn1.running_var.mul_(3)
    check("after a running-statistic change")
    assert packing["packed"] == before + 2
    # A new batch size packs once more for that shape, and the first shape stays packed.
    before = packing["packed"]
    x3 = torch.randn(3, 3, 32, 32).contiguous(memory_format=CL)
    check("batch 3", x3)
    check("batch 3 again", x3)
    check("batch 2 again")
    assert packing["packed"] == before + 20


def test_units_without_a_norm_are_packed_and_never_stale(packing):
    """fastres.fold_bn's output (Identity norms, conv biases) and VGG without BN: the conv's own weight and bias."""
    fr, tv = pair()
    folded = fastres.fold_bn(fr)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), tv(x), rtol=1e-4, atol=1e-4 * _max_abs(tv(x)))
        assert packing["packed"] == 20
        folded(x)
        assert packing["packed"] == 20
        folded.layer1[0].conv1.bias.add_(0.25)
        folded.layer1[0].conv1.weight.mul_(0.5)
        fr.layer1[0].bn1.bias.add_(0.25)
        fr.layer1[0].conv1.weight.mul_(0.5)
        torch.testing.assert_close(folded(x), tv(x), rtol=1e-4, atol=1e-4 * _max_abs(tv(x)))
    assert packing["packed"] == 21
    # VGG without BN (its features, small).
    with torch.device("meta"):
        vgg = VGG(nn.Sequential(), num_classes=10, init_weights=False)
    vgg.features = make_layers((16, "M", 32, 32))
    vgg.eval()
    xv = torch.randn(1, 3, 16, 16).contiguous(memory_format=CL)
    with torch.no_grad():
        before = packing["packed"]
        out = vgg._features(xv)
        assert packing["packed"] == before + 3
        torch.testing.assert_close(out, vgg.features(xv), rtol=1e-4, atol=1e-4 * _max_abs(out))
        vgg.features[3].weight.mul_(-1)
        ref = vgg.features(xv)  # the plain modules
        torch.testing.assert_close(vgg._features(xv), ref, rtol=1e-4, atol=1e-4 * _max_abs(ref))
        assert not torch.equal(out, ref)
    assert packing["packed"] == before + 4


def _aten_worse(tv, x, ref64, dtype=None, autocast=False):
    """tv's output in NCHW and in channels_last, whichever is further from ref64."""
    from fastres.testing import max_error
    outs = []
    for fmt in (torch.contiguous_format, CL):
        m = copy.deepcopy(tv).to(memory_format=fmt)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            outs.append(m(x.contiguous(memory_format=fmt)))
    return max(outs, key=lambda o: max_error(o, ref64))


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16-weights"])
def test_packed_eval_is_within_the_tolerance_rule(precision, packing):
    # Bottlenecks (1x1 convs with the residual as a post-op, a projection), narrow to stay fast.
    fr, tv = pair(fm.resnet50, torchvision.models.resnet50, width_per_group=16)
    ref = copy.deepcopy(tv).double()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref64 = ref(x.double())
        if precision == "bf16-weights":
            fr, tv, x = fr.to(torch.bfloat16), copy.deepcopy(tv).to(torch.bfloat16), x.to(torch.bfloat16)
        autocast = precision == "bf16-autocast"
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = fr(x.contiguous(memory_format=CL))
        aten = _aten_worse(tv, x, ref64, autocast=autocast)
    assert out.dtype == aten.dtype
    assert packing["ran"] == (53 if packed(precision) else 0)
    assert_within(f"resnet50 eval {precision}", out, ref64, aten)


def test_nan_propagates_through_the_packed_relu(packing):
    """oneDNN's relu post-op would map NaN to 0; the packed path keeps torch.relu's NaN."""
    model = fm.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    x[0, :, 5, 5] = float("nan")
    with torch.no_grad():
        out = model(x.contiguous(memory_format=CL))
    assert packing["ran"] > 0
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()


def test_packing_only_where_nothing_can_change_the_weights(packing):
    fr, tv = pair()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)
    fr(x).sum().backward()  # autograd on: the plan's forward, a backward through the differentiable ops,
    packing.update(packed=0, ran=0)
    fr(x)  # and from then on the differentiable ops
    fr.train()
    with torch.no_grad():
        fr(x)  # training: batch statistics
    fr.eval()
    with torch.no_grad(), fastres.backend("torch"):
        fr(x)  # a forced backend runs its own kernels
    fr.channels_last = False
    # NCHW throughout (at 64x64 no map is 1x1, which is also channels_last): a packed weight's output would be
    # channels_last.
    x64 = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fr(x64)
        with fastres.backend("cuda"):
            fr(x64)
    assert packing == {"packed": 0, "ran": 0}
    fr.channels_last = True
    with torch.no_grad(), fastres.backend("cuda"):
        torch.testing.assert_close(fr(x), tv(x), rtol=1e-4, atol=1e-4 * _max_abs(tv(x)))
    assert packing["ran"] == 20


def test_traces_record_the_fastres_ops_not_packed_weights(packing):
    """torch.jit.trace and torch.export record fastres's ops from the parameters: a packed weight baked into a
    graph would be a constant that ignores later weight changes."""
    ds = nn.Sequential(fnn.conv1x1(8, 32, 2), nn.BatchNorm2d(32))
    net = randomize_(nn.Sequential(fnn.Bottleneck(8, 8, 2, ds), fnn.Bottleneck(32, 8))).eval()
    x = torch.randn(1, 8, 9, 9).contiguous(memory_format=CL)
    with torch.no_grad():
        net(x)
        assert packing["packed"] == 7
        graphs = [str(torch.jit.trace(net, x, check_trace=False).inlined_graph),
                  str(torch.export.export(net, (x,)).graph)]
    for g in graphs:
        assert "conv_bias_act" in g and "mkldnn" not in g
    assert packing["packed"] == 7


def test_input_gradient_through_a_frozen_model(packing):
    """Frozen parameters but an input that wants a gradient (saliency, adversarial inputs): the differentiable ops."""
    fr, tv = pair()
    fr.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)
    grads = []
    for m in (fr, tv):
        xi = x.clone().requires_grad_()
        m(xi).square().sum().backward()
        grads.append(xi.grad)
    # The forward ran from the packed weights (the plan); the backward recomputed it through the differentiable ops.
    assert packing["ran"] == 20
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4 * _max_abs(grads[1]))


@pytest.fixture
def residual_writes(monkeypatch):
    """Counts the packed convs with a residual, by whether they wrote their result over it."""
    from fastres.ops import backend_cuda
    counts = {"over_residual": 0, "new_buffer": 0}
    run = backend_cuda._onednn_conv

    def counting(*args, **kwargs):
        if args[7] is not None:
            into = args[9] if len(args) > 9 else kwargs.get("into_residual", False)
            counts["over_residual" if into else "new_buffer"] += 1
        return run(*args, **kwargs)

    monkeypatch.setattr(backend_cuda, "_onednn_conv", counting)
    return counts


@pytest.mark.parametrize("make_fr,make_tv", [(fm.resnet18, torchvision.models.resnet18),
                                             (fm.resnet50, torchvision.models.resnet50)])
def test_residual_convs_write_over_tensors_nothing_else_holds(make_fr, make_tv, residual_writes):
    """In an eval forward, a block's last conv writes its result over the residual (a projection's fresh output, or
    an identity block's input that the previous block made and handed on), as Inductor's freezing does, and never
    over a tensor the caller or a hook can still see."""
    fr, tv = pair(make_fr, make_tv)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)
    x_before = x.clone()
    blocks = sum(len(layer) for layer in (fr.layer1, fr.layer2, fr.layer3, fr.layer4))
    with torch.no_grad():
        got, ref = fr(x), tv(x)
    assert residual_writes == {"over_residual": blocks, "new_buffer": 0}
    assert torch.equal(x, x_before)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * _max_abs(ref))

    # A hook that keeps a block's output: the next block must leave it as it was.
    kept = []
    handle = fr.layer1[0].register_forward_hook(lambda m, i, out: kept.append((out, out.clone())))
    residual_writes.update(over_residual=0, new_buffer=0)
    with torch.no_grad():
        torch.testing.assert_close(fr(x), ref, rtol=1e-4, atol=1e-4 * _max_abs(ref))
    handle.remove()
    assert torch.equal(kept[0][0], kept[0][1])
    # layer1[1]: its input is held by the hook; layer1[0] itself, called through its hooks, does not own its input
    # either (where it is an identity block).
    assert residual_writes["new_buffer"] == 1 + (fr.layer1[0].downsample is None)

    # Blocks and layers called on their own keep their input.
    for module in (fr.layer1, fr.layer1[1]):
        h = torch.randn(2, module.conv1.in_channels if module is fr.layer1[1] else fr.layer1[0].conv1.in_channels,
                        8, 8).contiguous(memory_format=CL)
        h_before = h.clone()
        with torch.no_grad():
            module(h)
        assert torch.equal(h, h_before)


def test_inference_tensors_are_written_over_only_in_inference_mode(residual_writes):
    """A block's input made under inference mode cannot be changed in place outside it: that conv writes a new
    buffer (and the next forward in inference mode writes over its residuals again)."""
    fr, tv = pair()
    block = fr.layer1[1]
    with torch.inference_mode():
        h = torch.randn(2, 64, 8, 8).contiguous(memory_format=CL)
        ref = tv.layer1[1](h)
    with torch.no_grad():
        got = block._forward(h, input_owned=True)
    assert residual_writes == {"over_residual": 0, "new_buffer": 1}
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * _max_abs(ref))
    with torch.inference_mode():
        x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)
        ref = tv(x)
        torch.testing.assert_close(fr(x), ref, rtol=1e-4, atol=1e-4 * _max_abs(ref))
    assert residual_writes == {"over_residual": 8, "new_buffer": 1}


# ---------------------------------------------------------------- the eval plan (fastres.models._eval_plan)
# Whether this machine can run the plan's body as a oneDNN Graph (before the fixture below turns it off).
GRAPH_CAPABLE = __import__("fastres.models._eval_plan", fromlist=["GRAPH_BODY"]).GRAPH_BODY


@pytest.fixture(autouse=True)
def one_call_body(monkeypatch):
    """The tests here hold the plan's Python loop and its one-call body to the per-unit path bit for bit, over as many
    forwards as they need: the oneDNN Graph body (other kernels, its own rounding) stays off unless a test turns it
    on (test_eval_plan_body_becomes_a_onednn_graph and those after it)."""
    from fastres.models import _eval_plan
    monkeypatch.setattr(_eval_plan, "GRAPH_BODY", False)


@pytest.fixture
def graph_body(monkeypatch):
    """The oneDNN Graph body on; counts the graphs built and the forwards that ran one."""
    from fastres.models import _eval_plan
    if not GRAPH_CAPABLE:
        pytest.skip("needs TorchScript's oneDNN Graph fusion and fastres._C's invalid-flag ops")
    monkeypatch.setattr(_eval_plan, "GRAPH_BODY", True)
    counts = {"built": 0, "ran": 0}
    run = _eval_plan._Plan._run_graph

    def counting_run(self, x, packs, *args):
        out = run(self, x, packs, *args)
        counts["ran"] += out is not None
        return out

    def counting(build):
        def counting_build(self, x, *args):
            graph = build(self, x, *args)
            counts["built"] += graph is not None
            return graph
        return counting_build

    # (_SequentialPlan, VGG's, builds its own graph and runs it as _Plan does)
    for plan in (_eval_plan._Plan, _eval_plan._SequentialPlan):
        monkeypatch.setattr(plan, "_graph", counting(plan._graph))
    monkeypatch.setattr(_eval_plan._Plan, "_run_graph", counting_run)
    return counts
@pytest.fixture
def per_unit_path(monkeypatch):
    """A context manager under which fastres.models.ResNet runs its per-unit path, not its plan."""
    from fastres.models import _eval_plan
    real = _eval_plan.run

    @contextlib.contextmanager
    def per_unit():
        monkeypatch.setattr(_eval_plan, "run", lambda model, x, head=True, stages=False: None)
        try:
            yield
        finally:
            monkeypatch.setattr(_eval_plan, "run", real)
    return per_unit


@pytest.fixture
def plan_runs(monkeypatch):
    """Counts the forwards that ran through a plan, and the fold-cache lookups (the per-unit decisions) made."""
    from fastres.models import _eval_plan
    from fastres.nn._fused import FoldCache
    counts = {"plan": 0, "lookups": 0}
    run, lookup = _eval_plan._Plan.run, FoldCache.get_or_fold

    def counting_run(self, *args):
        counts["plan"] += 1
        return run(self, *args)

    def counting_lookup(self, *args, **kwargs):
        counts["lookups"] += 1
        return lookup(self, *args, **kwargs)

    monkeypatch.setattr(_eval_plan._Plan, "run", counting_run)
    monkeypatch.setattr(FoldCache, "get_or_fold", counting_lookup)
    return counts


def _per_unit_then_planned(model, x, per_unit_path):
    """(the per-unit path's output, the first planned forward's, which builds the plan and packs the weights, the
    second's, whose body runs as one _run_plan call where it can, and the second's profile)."""
    with per_unit_path():
        ref = model(x)
    first = model(x)
    with profile() as prof:
        second = model(x)
    return ref, first, second, prof


def _planned_twice_as_per_unit(model, x, per_unit_path, plan_runs):
    """_per_unit_then_planned under inference_mode: both planned forwards ran through the plan, each exactly the
    per-unit path's result, the input not written over. Returns the second forward's output and profile."""
    x_before = x.clone()
    with torch.inference_mode():
        ref, first, second, prof = _per_unit_then_planned(model, x, per_unit_path)
    assert plan_runs["plan"] == 2
    assert torch.equal(first, ref) and torch.equal(second, ref) and torch.equal(x, x_before)
    return second, prof


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16-weights"])
def test_eval_plan_replays_the_per_unit_path(precision, per_unit_path, plan_runs):
    """The plan decides each unit once: a steady-state forward makes no per-unit decision (no fold-cache lookup) and
    gives exactly the per-unit path's result."""
    model = randomize_(fm.resnet50(num_classes=10, width_per_group=16)).eval()
    x = torch.randn(2, 3, 32, 32)
    if precision == "bf16-weights":
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    # inference_mode: there autocast casts the parameters on every call (under no_grad it caches the casts of
    # leaves that require grad for as long as the autocast block lasts).
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-autocast"):
        with per_unit_path():
            ref = model(x)
        first = model(x)
        plan_runs["lookups"] = 0
        with profile(record_shapes=True) as prof:
            second = model(x)
    assert plan_runs["plan"] == 2
    assert torch.equal(first, ref) and torch.equal(second, ref)
    if packed(precision):
        assert plan_runs["lookups"] == 0
    # The stem's ReLU and max pool ran as one pass (fastres::_max_pool_relu, no argmax indices); the blocks' 48
    # ReLUs ran as oneDNN's post-op inside _run_plan, no pass of their own (the NaN check behind it:
    # test_eval_plan_body_reruns_with_relu_passes_where_a_nan_met_a_relu).
    names = [e.name for e in prof.events()]
    assert names.count("fastres::_max_pool_relu") == 1 and "aten::max_pool2d_with_indices" not in names
    assert names.count("fastres::_run_plan") == (1 if packed(precision) else 0)
    assert names.count("fastres::_relu_") == 0
    # Not even the classifier's weight is cast again (autocast's linear would cast it on every call).
    fc_casts = [e for e in prof.events() if e.name == "aten::_to_copy" and tuple(model.fc.weight.shape) in
                [tuple(s) for s in e.input_shapes]]
    assert fc_casts == []
    from fastres.models import _eval_plan
    if precision == "bf16-autocast" and BF16_PACKED and _eval_plan._LINEAR_PACKED:
        # In bf16 it runs as oneDNN's linear on the weight packed by the first forward (ATen's bf16 linear reorders
        # the plain weight on every call), bit for bit ATen's result (asserted above).
        assert names.count("mkldnn::_linear_pointwise") == 1 and "aten::linear" not in names
        assert not [n for n in names if "reorder" in n], names


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
@pytest.mark.parametrize("where", ["input", "weight", "overflow"])
def test_eval_plan_body_reruns_with_relu_passes_where_a_nan_met_a_relu(precision, where, per_unit_path, plan_runs):
    """_run_plan runs its ReLUs as oneDNN's post-op, which maps NaN to 0, and reruns the body with the NaN-keeping
    passes where any thread raised the invalid flag: a NaN or Inf in the input (in one sample) or in a weight, or an
    Inf - Inf inside a convolution. The result is the per-unit path's, NaN and Inf where it has them, bit for bit; a
    clean input after that runs without the passes again."""
    model = randomize_(fm.resnet50(num_classes=10, width_per_group=16)).eval()
    x = torch.randn(2, 3, 32, 32)
    bad = x.clone()
    if where == "input":
        bad[1, 2, 31, 0] = float("nan")
        bad[1, 0, 3, 4] = float("inf")
    elif where == "overflow":
        bad[0] *= 3e38  # finite, but the first convolution's sums overflow to +-Inf, and meet each other
    weight = model.layer3[2].conv2.weight

    def set_weight(value):
        with torch.no_grad():
            weight[5, 7, 1, 1] = value
    kept = weight[5, 7, 1, 1].item()
    outs, counts = [], []
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-autocast"):
        for i, inp in enumerate([x, bad, x]):
            if where == "weight" and i > 0:
                set_weight(float("nan") if i == 1 else kept)
            model(inp), model(inp)  # (after a weight change, the plan's guard made it pack again)
            with profile() as prof:
                outs.append(model(inp))
            names = [e.name for e in prof.events()]
            assert names.count("fastres::_run_plan") == (1 if packed(precision) else 0)
            counts.append((names.count("fastres::_relu_"), names.count("mkldnn::_convolution_pointwise") +
                           names.count("mkldnn::_convolution_pointwise_")))
            if i == 1:
                with per_unit_path():
                    ref_bad = model(inp)
        with per_unit_path():
            ref_clean = model(x)
    if packed(precision):
        assert counts[0] == (0, 53) and counts[2] == (0, 53)
        assert counts[1] == (48, 2 * 53)  # the body twice: with the post-op, then with the 48 passes
    assert torch.equal(outs[0], ref_clean) and torch.equal(outs[2], ref_clean)
    assert torch.isnan(ref_bad).any() or torch.isinf(ref_bad).any()  # (else the case tests nothing)
    torch.testing.assert_close(outs[1], ref_bad, rtol=0, atol=0, equal_nan=True)
    if where == "input":  # a NaN stays in its own sample
        assert torch.isfinite(outs[1][0]).all() and torch.isnan(outs[1][1]).all()


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                    reason="reads the thread's floating-point flags through glibc")
def test_eval_plan_leaves_the_invalid_flag_as_it_was_or_as_raised(per_unit_path):
    """The body clears FE_INVALID on each thread to watch for NaN; a caller's flag survives it, and a forward that
    meets a NaN leaves it raised, as torch's own ops do."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    fe_invalid = 0x01  # <fenv.h> on x86-64
    model = randomize_(fm.resnet18(num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        model(x), model(x)
        libm.feclearexcept(fe_invalid)
        model(x)
        assert libm.fetestexcept(fe_invalid) == 0
        libm.feraiseexcept(fe_invalid)  # the caller's own flag
        out = model(x)
        assert libm.fetestexcept(fe_invalid) == fe_invalid and torch.isfinite(out).all()
        libm.feclearexcept(fe_invalid)
        bad = x.clone()
        bad[0, 0, 0, 0] = float("nan")
        assert torch.isnan(model(bad)).all()
        assert libm.fetestexcept(fe_invalid) == fe_invalid
        libm.feclearexcept(fe_invalid)


@pytest.mark.parametrize("pool", ["ceil", "dilated", "identity", "avg"])
def test_eval_plan_fuses_only_a_max_pool_into_the_stem_relu(pool, per_unit_path, plan_runs):
    """A stem max pool of any geometry runs as _max_pool_relu; any other module after the stem runs as it is, after
    the stem's own ReLU; either way the result is the per-unit path's."""
    model = randomize_(fm.resnet18(num_classes=10)).eval()
    model.maxpool = {"ceil": nn.MaxPool2d(2, 2, ceil_mode=True), "dilated": nn.MaxPool2d(3, 1, 1, dilation=2),
                     "identity": nn.Identity(), "avg": nn.AvgPool2d(3, 2, 1)}[pool].eval()
    x = torch.randn(2, 3, 29, 29)
    with torch.inference_mode():
        ref, _, out, prof = _per_unit_then_planned(model, x, per_unit_path)
    assert plan_runs["plan"] == 2 and torch.equal(out, ref)
    names = [e.name for e in prof.events()]
    fused = pool in ("ceil", "dilated")
    assert names.count("fastres::_max_pool_relu") == (1 if fused else 0)
    # _run_plan runs no module: a pool other than a max pool leaves the body to the Python loop
    assert names.count("fastres::_run_plan") == (0 if pool == "avg" else 1)
    # (in _run_plan every ReLU is oneDNN's post-op; the Python loop runs the 16 blocks' and the stem's as passes)
    assert names.count("fastres::_relu_") == (2 * 8 + 1 if pool == "avg" else 0)
    if fused:  # the pool's geometry is part of what the plan checks
        model.maxpool.stride = 1
        with torch.inference_mode():
            with per_unit_path():
                ref = model(x)
            assert torch.equal(model(x), ref) and plan_runs["plan"] == 3


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_eval_plan_body_runs_as_one_call(precision, per_unit_path, plan_runs, monkeypatch):
    """From the second forward on, the plan's body is one fastres::_run_plan call (csrc/cpu_plan.cpp): the same
    oneDNN calls, each block's last conv written over its residual, never over the model's input, with exactly the
    Python loop's result; where that call fails, the Python loop runs from then on."""
    from fastres.models import _eval_plan
    model = randomize_(fm.resnet50(num_classes=10, width_per_group=16)).eval()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)
    x_before = x.clone()
    planned_in_one_call = packed(precision)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-autocast"):
        ref, first, second, prof = _per_unit_then_planned(model, x, per_unit_path)
        assert torch.equal(first, ref) and torch.equal(second, ref) and torch.equal(x, x_before)
        events = [e for e in prof.events() if _under(e, "fastres::_run_plan")]
        names = [e.name for e in events]
        assert [e.name for e in prof.events()].count("fastres::_run_plan") == (1 if planned_in_one_call else 0)
        if planned_in_one_call:
            assert names.count("mkldnn::_convolution_pointwise_") == 16  # every block's last conv, in place
            assert names.count("mkldnn::_convolution_pointwise") == 53 - 16
            assert names.count("fastres::_max_pool_relu") == 1 and names.count("fastres::_relu_") == 0

        def refused(*args):
            raise RuntimeError("could not create a primitive")

        real = _eval_plan._RUN_PLAN
        monkeypatch.setattr(_eval_plan, "_RUN_PLAN", refused)
        assert torch.equal(model(x), ref) and torch.equal(x, x_before)
        monkeypatch.setattr(_eval_plan, "_RUN_PLAN", real)
        with profile() as prof:
            assert torch.equal(model(x), ref)
    assert "fastres::_run_plan" not in [e.name for e in prof.events()]  # not tried again for this input
    assert plan_runs["plan"] == 4


def test_eval_plan_body_stays_in_python_where_a_unit_was_refused(per_unit_path, monkeypatch):
    """A key in which some unit did not run from its packed weight (here oneDNN refuses every residual conv) keeps
    the Python loop, which runs that unit another way; _run_plan is not even tried."""
    from fastres.ops import backend_cuda
    run = backend_cuda._onednn_conv

    def refusing_residuals(*args, **kwargs):
        return None if args[7] is not None else run(*args, **kwargs)

    monkeypatch.setattr(backend_cuda, "_onednn_conv", refusing_residuals)
    model = randomize_(fm.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)
    with torch.inference_mode():
        ref, _, out, prof = _per_unit_then_planned(model, x, per_unit_path)
    assert torch.equal(out, ref)
    assert "fastres::_run_plan" not in [e.name for e in prof.events()]


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_eval_forward_under_autograd_runs_the_plan_and_recomputes_for_backward(precision, per_unit_path, plan_runs):
    """An eval model called without no_grad, its parameters wanting gradients: the forward is the plan's (no
    per-unit op, nothing kept but the input and the parameters); a backward recomputes the forward through the
    differentiable per-unit ops and gives exactly their gradients, double backward included; from then on the
    model runs those ops directly."""
    model = randomize_(fm.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)
    params = list(model.parameters())
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-autocast")
    with torch.no_grad(), autocast:
        planned = model(x)
    with autocast:
        with per_unit_path():
            xr = x.clone().requires_grad_()
            ref = model(xr)
        g = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, [xr] + params, g, create_graph=True)
        xp = x.clone().requires_grad_()
        runs = plan_runs["plan"]
        out = model(xp)
        assert plan_runs["plan"] > runs and torch.equal(out, planned)
        grads = torch.autograd.grad(out, [xp] + params, g, create_graph=True)
    for got, expected in zip(grads, ref_grads):
        assert torch.equal(got, expected)
    # double backward: through the recomputed graph, as through the per-unit one
    ggx, = torch.autograd.grad(grads[0].square().sum(), xp)
    ggx_ref, = torch.autograd.grad(ref_grads[0].square().sum(), xr)
    assert torch.equal(ggx, ggx_ref)
    runs = plan_runs["plan"]
    with autocast:
        model(x)
    assert plan_runs["plan"] == runs  # differentiated once: the per-unit ops from now on


def test_eval_forward_under_autograd_refuses_a_backward_after_changes():
    """Between the forward and its backward: a parameter changed in place raises (autograd's version check on the
    saved parameters), as do a buffer changed in place and a switch to training mode (fastres's own check)."""
    model = randomize_(fm.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    with torch.no_grad():
        model.layer1[0].conv1.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    out = model(x)
    model.layer2[0].bn1.running_mean.add_(1)
    with pytest.raises(RuntimeError, match="buffer of the model"):
        out.sum().backward()
    out = model(x)
    model.train()
    with pytest.raises(RuntimeError, match="training mode"):
        out.sum().backward()


def test_eval_plan_never_replays_a_stale_decision(per_unit_path, plan_runs):
    """Every change the per-unit path would see (weights, statistics, modules, their attributes, modes, hooks) makes
    the plan decide again, or stand aside where it does not apply; it never replays a stale weight or unit."""
    fr, _ = pair()
    x = torch.randn(2, 3, 32, 32)
    grad = torch.enable_grad

    def check(what, planned=True, mode=torch.no_grad, inp=x, against_no_grad=False):
        with mode():
            before = plan_runs["plan"]
            out = fr(inp)
            assert (plan_runs["plan"] >= before + 1) == planned, what
            with per_unit_path():
                ref = fr(inp)
        if against_no_grad:
            # Under autograd the per-unit path runs the differentiable ops, not the packed convolutions: the plan's
            # output there is the plan's without autograd (held to the per-unit path by the next check).
            with torch.no_grad():
                ref = fr(inp)
        assert torch.equal(out, ref), what

    check("first forward")
    check("second forward")
    with torch.no_grad():
        fr.layer2[0].conv2.weight.mul_(1.5)
    check("an in-place weight edit")
    fr.layer3[1].bn1.running_var.data.mul_(3)  # through .data: no version bump
    check("a running statistic edited through .data")
    fr.layer1[0].conv1.weight = nn.Parameter(fr.layer1[0].conv1.weight.detach() * -1)
    check("a parameter replaced")
    fr.layer4[1].bn2.eps = 0.5
    check("a norm's eps")
    fr.layer3[1].conv2.padding, fr.layer3[1].conv2.dilation = (2, 2), (2, 2)
    check("a conv's padding and dilation")
    fr.layer1[1].residual = False
    check("a block's residual flag")
    fr.layer1[1].residual = True
    check("the residual back")
    conv = copy.deepcopy(fr.layer2[1].conv1)
    with torch.no_grad():
        conv.weight.mul_(-2)
    fr.layer2[1].conv1 = conv
    check("a conv module replaced")
    fr.layer3[0].bn2.train()
    check("one norm in training mode", planned=False)
    fr.layer3[0].bn2.eval()
    check("eval again")
    handle = fr.layer1[1].register_forward_hook(lambda m, i, out: None)
    check("a hook", planned=False)
    handle.remove()
    check("the hook removed")
    relu = fr.relu
    fr.relu = nn.SiLU()
    check("the stem's activation replaced", planned=False)
    fr.relu = relu
    check("the ReLU back")
    fr.requires_grad_(True)
    check("parameters that want a gradient, under autograd", mode=grad, against_no_grad=True)
    check("the same under no_grad")
    fr.requires_grad_(False)
    check("frozen parameters under autograd", mode=grad)
    check("an input that wants a gradient", mode=grad, inp=x.clone().requires_grad_(), against_no_grad=True)
    fastres.refresh(fr)
    assert fr.fold_cache.plan is None
    check("after fastres.refresh")
    check("another batch size", inp=torch.randn(3, 3, 32, 32))
    bf16 = lambda: torch.autocast("cpu", torch.bfloat16)  # noqa: E731
    check("bf16 autocast", mode=bf16)
    with torch.no_grad():
        fr.fc.weight.mul_(-1)
    check("the classifier's weight (cast once under autocast)", mode=bf16)
    check("the first input again")


def test_converted_torchvision_resnet_runs_the_plan(plan_runs):
    """fastres.convert turns torchvision's ResNet root into fastres.models.ResNet: its eval forward is planned too."""
    tv = randomize_(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = tv(x)
        converted = fastres.convert(copy.deepcopy(tv))
        outs = [converted(x) for _ in range(2)]
    assert plan_runs["plan"] == 2
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * _max_abs(ref))


def _attributes_changed(entries):
    """The attribute part of fastres._C._plan_changed alone (no module, no tensor)."""
    from fastres.models import _eval_plan
    root = nn.Module()
    return _eval_plan._PLAN_CHANGED(root, (), _eval_plan._MODULE_SIGNATURE(root, ()), entries,
                                    _eval_plan._TENSOR_STATE([]), False)


def _tensor_state_changed(state, grad_enabled):
    """The tensor part of fastres._C._plan_changed alone (no module, no attribute)."""
    from fastres.models import _eval_plan
    root = nn.Module()
    return _eval_plan._PLAN_CHANGED(root, (), _eval_plan._MODULE_SIGNATURE(root, ()), (), state, grad_enabled)


def test_plan_guard_tensor_state_sees_every_change():
    """fastres._C's _tensor_state_guard and the tensor part of _plan_changed (the plan's guard over the tensors its
    folds read): any change FoldCache would see is seen, including edits through .data (no version bump) of any
    element of a small tensor and of each sampled element of a large one, in each element size; unchanged tensors
    are unchanged."""
    from fastres.models import _eval_plan
    if _eval_plan._TENSOR_STATE is None:
        pytest.skip("fastres._C without the plan guard")
    small, large = torch.randn(64), torch.randn(256, 64, 3, 3).contiguous(memory_format=CL)
    tensors = [small, large, torch.randn(3, 5).t()]  # a non-contiguous one: compared whole

    def changed(grad_enabled=False):
        return _tensor_state_changed(state, grad_enabled)

    state = _eval_plan._TENSOR_STATE(tensors)
    assert not changed() and not changed(grad_enabled=True)
    edits = [
        ("one element of a small tensor, through .data", lambda: small.data.__setitem__(63, 7.0)),
        ("in place (version)", lambda: small.add_(0)),
        ("a sampled element of a large tensor, through .data",  # its first element in memory is sampled
         lambda: large.data.__setitem__((0, 0, 0, 0), 3.0)),
        ("an element of the non-contiguous one", lambda: tensors[2].data.__setitem__((4, 2), 1.0)),
        ("new memory of the same shape", lambda: setattr(large, "data", torch.randn(256, 64, 3, 3)
                                                         .contiguous(memory_format=CL))),
        ("other strides", lambda: setattr(large, "data", large.data.contiguous())),
        ("another dtype", lambda: setattr(small, "data", small.data.double())),
        ("another shape", lambda: setattr(small, "data", small.data[:32])),
    ]
    for what, edit in edits:
        with torch.no_grad():
            edit()
        assert changed(), what
        state = _eval_plan._TENSOR_STATE(tensors)
        assert not changed(), what
    small.requires_grad_(True)
    assert changed()  # a recorded flag
    state = _eval_plan._TENSOR_STATE(tensors)
    assert changed(grad_enabled=True) and not changed(grad_enabled=False)  # wanting a gradient, where one may flow
    # The guard holds the tensors: a list changed after recording changes nothing it compares.
    tensors.append(torch.randn(4))
    assert not changed()
    with torch.inference_mode():
        made_in_inference_mode = torch.randn(8)
    state = _eval_plan._TENSOR_STATE([made_in_inference_mode])  # no version counter: its bytes show an edit
    assert not changed()
    with torch.inference_mode():
        made_in_inference_mode[3] = 100.0
    assert changed()
    # Each sampled element of a large tensor is compared, for every element size (the sampled loop is typed; 16
    # bytes take the generic one).
    for dtype in (torch.uint8, torch.bfloat16, torch.float32, torch.float64, torch.complex128):
        big = torch.zeros(100_003, dtype=dtype)  # prime: step n // 256 is coprime as it is
        state = _eval_plan._TENSOR_STATE([big])
        step = big.numel() // _eval_plan._SAMPLED_ELEMENTS
        for k in range(_eval_plan._SAMPLED_ELEMENTS):
            big.data[k * step] = 1
            assert changed(), (dtype, k)
            big.data[k * step] = 0
            assert not changed(), (dtype, k)
        big.data[1] = 1  # not sampled
        assert not changed(), dtype
    # The tensors are split over the intra-op threads: an edit is seen in whichever thread's share it falls.
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 3):
            torch.set_num_threads(n_threads)
            many = [torch.randn(5000 if i % 3 else 40) for i in range(31)]
            state = _eval_plan._TENSOR_STATE(many)
            assert not changed(), n_threads
            for i, t in enumerate(many):
                value = t[0].item()
                t.data[0] = value + 1
                assert changed(), (n_threads, i)
                t.data[0] = value
                assert not changed(), (n_threads, i)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(TypeError, match=r"tensors\[1\] must be a strided CPU tensor"):
        _eval_plan._TENSOR_STATE([small, torch.ones(2, device="meta")])
    with pytest.raises(TypeError, match=r"tensors\[0\] must be a strided CPU tensor"):
        _eval_plan._TENSOR_STATE([3.0])
    with pytest.raises(TypeError, match="tensors must be a list or tuple"):
        _eval_plan._TENSOR_STATE(None)
    with pytest.raises(ValueError, match="sampled_elements > 0"):
        fastres._C._tensor_state_guard([small], 16, 0)
    with pytest.raises(TypeError, match="guard must be what _tensor_state_guard returned"):
        _tensor_state_changed(object(), False)


def test_plan_guard_module_signature_sees_every_change():
    """fastres._C._module_signature (the plan's guard over modules): a module's class, training flag, hooks, and the
    identity of its children, parameters and buffers."""
    from fastres.models import _eval_plan
    if _eval_plan._MODULE_SIGNATURE is None:
        pytest.skip("fastres._C without the plan guard")
    root = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    mods = tuple(root)
    sign = lambda: _eval_plan._MODULE_SIGNATURE(root, mods)  # noqa: E731
    before = sign()
    assert sign() == before and isinstance(before, bytes)
    edits = [
        ("training", lambda: root[1].train(), lambda: root[1].eval()),
        ("root training", lambda: setattr(root, "training", True), lambda: setattr(root, "training", False)),
        ("a forward hook", lambda: hooks.append(root[2].register_forward_hook(lambda *a: None)),
         lambda: hooks.pop().remove()),
        ("a forward pre-hook on the root", lambda: hooks.append(root.register_forward_pre_hook(lambda *a: None)),
         lambda: hooks.pop().remove()),
        ("a parameter replaced", lambda: setattr(root[0], "weight", nn.Parameter(root[0].weight.detach())), None),
        ("a buffer added", lambda: root[1].register_buffer("extra", torch.zeros(1)), None),
        ("a class changed", lambda: setattr(mods[2], "__class__", nn.ReLU6), None),
        ("a child replaced", lambda: root.__setitem__(2, nn.ReLU()), None),
    ]
    hooks = []
    root.eval()
    for what, edit, undo in edits:
        before = sign()
        edit()
        assert sign() != before, what
        if undo is not None:
            undo()
            assert sign() == before, what
    with pytest.raises(TypeError):
        _eval_plan._MODULE_SIGNATURE(root, [root[0]])  # a tuple, not a list


def test_plan_changed_is_the_three_checks():
    """fastres._C._plan_changed, the plan's guard before every forward: a change to the modules' signature, to an
    attribute or to a tensor's state is seen, under one thread or several (the modules on the caller's thread, the
    tensors on the others), and a Python error in the module checks propagates."""
    from fastres.models import _eval_plan
    if _eval_plan._PLAN_CHANGED is None:
        pytest.skip("fastres._C without the plan guard")
    root = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    mods = tuple(root)
    tensors = [torch.randn(5000) for _ in range(20)] + [root[1].running_mean]

    def changed(n_threads):
        torch.set_num_threads(n_threads)
        return _eval_plan._PLAN_CHANGED(root, mods, signature, attributes, state, False)

    edits = [
        ("the signature: a child replaced", lambda: root.__setitem__(2, nn.ReLU())),
        ("an attribute: padding", lambda: setattr(root[0], "padding", (1, 1))),
        ("a tensor's bytes through .data", lambda: root[1].running_mean.data.__setitem__(0, 5.0)),
        ("a tensor's version", lambda: tensors[7].add_(1)),
    ]
    threads = torch.get_num_threads()
    try:
        for what, edit in edits:
            signature = _eval_plan._MODULE_SIGNATURE(root, mods)
            attributes = ((root[0], "padding", root[0].padding),)
            state = _eval_plan._TENSOR_STATE(tensors)
            assert not changed(1) and not changed(2) and not changed(3), what
            with torch.no_grad():
                edit()
            assert changed(1) and changed(2) and changed(3), what
        mods[2]._modules = None  # (not a dict): the signature's TypeError
        for n_threads in (1, 2):
            with pytest.raises(TypeError, match="not a dict"):
                changed(n_threads)
        with pytest.raises(TypeError, match="guard must be what _tensor_state_guard returned"):
            _eval_plan._PLAN_CHANGED(root, mods, signature, attributes, object(), False)
        with pytest.raises(TypeError):
            _eval_plan._PLAN_CHANGED(root, mods, "not bytes", attributes, state, False)
    finally:
        torch.set_num_threads(threads)


def test_plan_guard_reads_attributes_as_getattr_does():
    """The signature and the attribute checks read a module's attributes from its __dict__ only where getattr would: a
    module class with its own __getattribute__, or with a property shadowing an entry of the instance's __dict__, is
    read through getattr."""
    from fastres.models import _eval_plan
    if _eval_plan._MODULE_SIGNATURE is None:
        pytest.skip("fastres._C without the plan guard")

    class OwnGetattribute(nn.ReLU):
        def __getattribute__(self, name):
            if name == "training":
                return object.__getattribute__(self, "reported")
            return super().__getattribute__(name)

    class TrainingProperty(nn.ReLU):
        training = property(lambda self: self.__dict__["reported"], lambda self, value: None)

    for cls in (OwnGetattribute, TrainingProperty):
        module = cls()
        module.__dict__.update(reported=False, training=False)
        sign = lambda: _eval_plan._MODULE_SIGNATURE(module, ())  # noqa: E731
        before = sign()
        entries = ((module, "training", False),)
        assert _attributes_changed(entries) is False
        module.__dict__["reported"] = True  # what getattr reads; the __dict__ entry "training" unchanged
        assert sign() != before, cls.__name__
        assert _attributes_changed(entries) is True, cls.__name__


def test_plan_guard_attributes_see_every_change():
    """The attribute part of fastres._C._plan_changed (the plan's guard over the attributes its units were built
    from): another
    value, an equal value of another type, a list edited in place, a deleted attribute; an equal value in a new
    object is no change."""
    from fastres.models import _eval_plan
    if _eval_plan._PLAN_CHANGED is None:
        pytest.skip("fastres._C without the plan guard")
    conv = nn.Conv2d(3, 4, 3)
    conv.extra = [1, 2]
    names = _eval_plan._CONV_ATTRIBUTES + ("extra",)
    entries = tuple((conv, name, _eval_plan._recorded(getattr(conv, name))) for name in names)
    changed = lambda: _attributes_changed(entries)  # noqa: E731
    assert changed() is False
    conv.stride = (1, 1)  # equal, another object
    assert changed() is False
    edits = [
        ("another value", lambda: setattr(conv, "stride", (2, 1)), lambda: setattr(conv, "stride", (1, 1))),
        ("an equal value of another type", lambda: setattr(conv, "groups", 1.0), lambda: setattr(conv, "groups", 1)),
        ("a list edited in place", lambda: conv.extra.__setitem__(0, 5), lambda: conv.extra.__setitem__(0, 1)),
        ("a string", lambda: setattr(conv, "padding_mode", "reflect"), lambda: setattr(conv, "padding_mode", "zeros")),
        ("deleted", lambda: delattr(conv, "extra"), lambda: setattr(conv, "extra", [1, 2])),
    ]
    for what, edit, undo in edits:
        edit()
        assert changed() is True, what
        undo()
        assert changed() is False, what
    with pytest.raises(TypeError, match="entries"):
        _attributes_changed(((conv, "stride"),))


def test_a_model_built_in_inference_mode_is_planned_and_never_stale(per_unit_path, plan_runs):
    """Parameters made under torch.inference_mode are inference tensors, which keep no version counter: their folds
    are cached and guarded by their bytes (the per-unit path refolded every weight on every call: 0.69x eager at
    batch 1). An in-place edit, which only inference mode allows, is seen."""
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        tv = randomize_(torchvision.models.resnet18(num_classes=10)).eval()
        fr = fm.resnet18(num_classes=10).eval()
        fr.load_state_dict(tv.state_dict())
        assert fr.conv1.weight.is_inference()

        def check(what):
            out = fr(x)
            with per_unit_path():
                ref = fr(x)
            assert torch.equal(out, ref), what
            assert_within(what, out, copy.deepcopy(tv).double()(x.double()), tv(x))

        check("first forward")
        check("second forward")
        assert plan_runs["plan"] == 2
        for model in (fr, tv):
            model.layer2[0].bn1.running_var.mul_(4)  # whole BN tensors are compared
            model.layer3[1].conv2.weight.mul_(-1)  # every sampled element of a large weight changes
        check("in-place edits of inference tensors")
        assert plan_runs["plan"] == 3
    with torch.no_grad():  # outside inference mode too (its own fold cache key)
        assert_within("under no_grad", fr(x), copy.deepcopy(tv).double()(x.double()), tv(x))


def _timm_resnet(**kwargs):
    from timm.models import resnet
    kwargs.setdefault("block", resnet.Bottleneck)
    torch.manual_seed(0)
    return randomize_(resnet.ResNet(layers=[1, 1, 1, 1], channels=(8, 8, 16, 16), num_classes=10, **kwargs)).eval()


@pytest.mark.parametrize("family", ["bottleneck", "basic", "deep-stem-avg-down", "se", "silu"])
def test_converted_timm_resnet_plans_its_features(family, per_unit_path, plan_runs):
    """fastres.convert's timm ResNet plans forward_features (the stem's units, the blocks, average-pool shortcuts
    included) where every block is plain; with SE or another activation it runs per unit. Either way the result is
    exactly the per-unit path's, within the tolerance rule of timm's own, and channels_last."""
    timm = pytest.importorskip("timm")
    kwargs = {"bottleneck": {}, "basic": dict(block=timm.models.resnet.BasicBlock),
              "deep-stem-avg-down": dict(stem_type="deep", stem_width=16, avg_down=True),
              "se": dict(block_args=dict(attn_layer="se")), "silu": dict(act_layer=nn.SiLU)}[family]
    baseline = _timm_resnet(**kwargs)
    model = fastres.convert(copy.deepcopy(baseline))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with per_unit_path():
            ref = model(x)
        model(x)
        with profile() as prof:
            outs = [model(x), model(x)]
        features = model.forward_features(x)
        assert_within(family, outs[0], copy.deepcopy(baseline).double()(x.double()), baseline(x))
    planned = family not in ("se", "silu")
    assert plan_runs["plan"] == (4 if planned else 0)
    # Planned, the features' body is one _run_plan call (average-pool shortcuts included).
    assert [e.name for e in prof.events()].count("fastres::_run_plan") == (2 if planned else 0)
    assert all(torch.equal(out, ref) for out in outs)
    assert features.is_contiguous(memory_format=torch.channels_last)
    if planned:
        # A block made non-plain after planning: the plan stands aside, the block runs as timm says.
        model.layer2[0].act2 = nn.SiLU()
        baseline.layer2[0].act2 = nn.SiLU()
        with torch.no_grad():
            out = model(x)
            assert_within("act2 replaced", out, copy.deepcopy(baseline).double()(x.double()), baseline(x))
        assert plan_runs["plan"] == 4


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_converted_timm_resnet_plans_its_head(precision, per_unit_path, plan_runs, graph_body):
    """fastres.convert's timm ResNet in eval: forward runs the features and the head (the global average pool and fc)
    from one plan, as fastres.models.ResNet does: exactly the per-unit path's result until the graph is built, then
    the head inside the graph (no linear of ATen's), within the tolerance rule of timm's own. forward_features keeps a
    plan of its own beside it: calls that alternate build each plan and each graph once. A global pool that is not
    an average pool (max) leaves timm's forward_head to run after the planned features."""
    from fastres.models import _eval_plan
    timm = pytest.importorskip("timm")
    baseline = _timm_resnet()
    model = fastres.convert(copy.deepcopy(baseline))
    x = torch.randn(2, 3, 32, 32)
    autocast = lambda: torch.autocast("cpu", torch.bfloat16, enabled=precision != "fp32")  # noqa: E731
    with torch.inference_mode(), autocast():
        with per_unit_path():
            ref = model(x)
        first = [model(x) for _ in range(2)]  # planned, before the graph
        head_plan = model.fold_cache.plan
        outs, features = [], []
        for _ in range(4):  # alternating: each plan builds its graph in its fourth call
            outs.append(model(x))
            features.append(model.forward_features(x))
        with profile() as prof:
            again = model(x)
        ref_features = baseline.forward_features(x)
        aten = baseline(x)
    assert all(torch.equal(out, ref) for out in first)
    assert head_plan.has_head and head_plan.classifier is model.fc and head_plan.head_pool is model.global_pool.pool
    cache = model.fold_cache
    assert cache.plan is head_plan and not cache.other_plan.has_head  # both kept
    assert plan_runs["plan"] == 2 + 8 + 1 and head_plan.head_in_graph
    # (no graph for bf16 autocast computed in bf16 where oneDNN has no bf16 kernels: the units run ATen's)
    graphs = precision == "fp32" or BF16_PACKED or _eval_plan.autocast_computes_in_fp32(torch.bfloat16)
    assert (graph_body["built"], graph_body["ran"]) == ((2, 4 + 1) if graphs else (0, 0))
    names = [e.name for e in prof.events()]
    if graphs:
        assert "aten::linear" not in names and "aten::addmm" not in names and "aten::adaptive_avg_pool2d" not in names
    reference = copy.deepcopy(baseline).double()
    with torch.no_grad():
        ref64, features64 = reference(x.double()), reference.forward_features(x.double())
    for out in outs + [again]:
        assert out.dtype == aten.dtype
        assert_within(f"timm forward, {precision}, head in the graph", out, ref64, aten)
    for f in features:
        assert_within(f"timm forward_features, {precision}", f, features64, ref_features)
    # A max pool head: timm's forward_head after the planned features, its result.
    model.reset_classifier(10, global_pool="max")
    baseline.reset_classifier(10, global_pool="max")
    model.fc.load_state_dict(baseline.fc.state_dict())
    model.eval()
    with torch.inference_mode(), autocast():
        assert model._plan_head() is None
        outs = [model(x) for _ in range(3)]
        aten = baseline(x)
    assert not model.fold_cache.plan.has_head
    reference = copy.deepcopy(baseline).double()
    with torch.no_grad():
        ref64 = reference(x.double())
    for out in outs:
        assert_within(f"timm forward, {precision}, max pool head", out, ref64, aten)


def _hf_resnet(cls_name="ResNetForImageClassification", **kwargs):
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 32, 64], depths=[1, 2, 1, 1],
                                       num_labels=10, **kwargs)
    torch.manual_seed(0)
    return randomize_(getattr(transformers, cls_name)(config)).eval()


class _LastHiddenState(nn.Module):
    """A transformers ResNetModel's last hidden state, as a module's output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).last_hidden_state


HF_PLAN_FAMILIES = {"bottleneck": dict(layer_type="bottleneck"), "basic": dict(layer_type="basic"),
                    "downsample-in-bottleneck-and-first-stage": dict(layer_type="bottleneck",
                                                                     downsample_in_bottleneck=True,
                                                                     downsample_in_first_stage=True),
                    "gelu": dict(layer_type="bottleneck", hidden_act="gelu")}


@pytest.mark.parametrize("family", list(HF_PLAN_FAMILIES))
def test_converted_transformers_resnet_plans_its_body(family, per_unit_path, plan_runs):
    """fastres.convert's transformers ResNetModel (inside ResNetForImageClassification) plans its embeddings and
    stages where every activation is a plain ReLU, the body one _run_plan call from the second forward on; with
    another activation it runs the library's forward on the fused modules. Either way the logits are exactly the
    per-unit path's, within the tolerance rule of the library's own model, and the last hidden state channels_last."""
    baseline = _hf_resnet(**HF_PLAN_FAMILIES[family])
    model = fastres.convert(copy.deepcopy(baseline))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with per_unit_path():
            ref = model(x).logits
        model(x)
        with profile() as prof:
            outs = [model(x).logits, model(x).logits]
        last = model.resnet(x).last_hidden_state
        assert_within(family, outs[0], copy.deepcopy(baseline).double()(x.double()).logits, baseline(x).logits)
    planned = family != "gelu"
    assert plan_runs["plan"] == (4 if planned else 0)
    assert [e.name for e in prof.events()].count("fastres::_run_plan") == (2 if planned else 0)
    assert all(torch.equal(out, ref) for out in outs)
    assert last.is_contiguous(memory_format=CL)
    if planned:
        # A layer's activation replaced after planning: the plan stands aside, the layer runs as the library says.
        for m in (model, baseline):
            m.resnet.encoder.stages[1].layers[1].activation = nn.SiLU()
        with torch.no_grad():
            out = model(x).logits
            assert_within("activation replaced", out, copy.deepcopy(baseline).double()(x.double()).logits,
                          baseline(x).logits)
        assert plan_runs["plan"] == 4


def test_converted_transformers_resnet_model_planned_returns_what_the_library_returns(per_unit_path, plan_runs):
    """ResNetModel's planned forward gives the library's outputs: the output class with the last hidden state and
    the pooled output (hidden_states None), or their tuple with return_dict=False, each exactly what the fused
    modules compute. Hidden states, extra arguments and an input of another channel count take the library's
    forward (its error included)."""
    transformers = pytest.importorskip("transformers")
    model = fastres.convert(_hf_resnet("ResNetModel"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with per_unit_path():
            ref = model(x)
            ref_tuple = model(x, return_dict=False)
        got = [model(x) for _ in range(3)]
        got_tuple = model(x, return_dict=False)
        assert plan_runs["plan"] == 4
        assert all(type(g) is type(ref) is transformers.modeling_outputs.BaseModelOutputWithPoolingAndNoAttention
                   for g in got)
        for g in got:
            assert g.keys() == ref.keys() and g.hidden_states is None
            assert torch.equal(g.last_hidden_state, ref.last_hidden_state)
            assert torch.equal(g.pooler_output, ref.pooler_output)
        assert type(got_tuple) is tuple and len(got_tuple) == len(ref_tuple) == 2
        assert all(torch.equal(a, b) for a, b in zip(got_tuple, ref_tuple))
        with pytest.raises(ValueError, match="channel dimension"):
            model(torch.randn(2, 4, 32, 32))
        model(x, output_attentions=False)  # an argument the plan does not know: the library's forward
    assert plan_runs["plan"] == 4


def _hf_outputs_equal(got, ref):
    """Whether two outputs of a transformers model are the same: class, keys (or tuple length), and each tensor (or
    tuple of tensors, such as hidden states) exactly equal."""
    if type(got) is not type(ref) or (isinstance(ref, dict) and got.keys() != ref.keys()) or len(got) != len(ref):
        return False
    for a, b in zip(got.values() if isinstance(ref, dict) else got, ref.values() if isinstance(ref, dict) else ref):
        if isinstance(b, (tuple, list)):
            if not (type(a) is type(b) and len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))):
                return False
        elif not torch.equal(a, b):
            return False
    return True


@pytest.mark.parametrize("cls_name", ["ResNetModel", "ResNetBackbone"])
def test_converted_transformers_resnet_hidden_states_planned(cls_name, per_unit_path, plan_runs):
    """With hidden states (ResNetModel's output_hidden_states, or a ResNetBackbone, whose feature maps are hidden
    states), the converted model's eval forward runs its stages from the plan and the library's forward builds its
    output from them: for every combination of output_hidden_states and return_dict, exactly what the fused modules
    compute, of the library's output class, every hidden state channels_last; none of them written over by a later
    block. Other arguments take the library's forward."""
    from fastres.models import _eval_plan
    kwargs = dict(out_features=["stage1", "stage3", "stage4"]) if cls_name == "ResNetBackbone" else {}
    model = fastres.convert(_hf_resnet(cls_name, **kwargs))
    assert type(model.encoder).__module__ == "fastres._convert.transformers"
    x = torch.randn(2, 3, 32, 32)
    calls = [dict(output_hidden_states=True), dict(output_hidden_states=True, return_dict=False)]
    if cls_name == "ResNetBackbone":
        calls += [{}, dict(return_dict=False)]
    with torch.no_grad():
        with per_unit_path():
            refs = [model(x, **call) for call in calls]
        for _ in range(2):  # the first call packs the weights, the second runs from them
            for call, ref in zip(calls, refs):
                got = model(x, **call)
                assert _hf_outputs_equal(got, ref), call
        assert plan_runs["plan"] == 2 * len(calls)
        hidden = model(x, output_hidden_states=True).hidden_states
        assert len(hidden) == 5 and all(h.is_contiguous(memory_format=CL) for h in hidden)
        if cls_name == "ResNetBackbone":
            out = model(x, output_hidden_states=True)  # the feature maps: stage1, stage3 and stage4's hidden states
            assert [tuple(m.shape[1:]) for m in out.feature_maps] == [(16, 8, 8), (32, 2, 2), (64, 1, 1)]
            assert all(m is out.hidden_states[i] for m, i in zip(out.feature_maps, (1, 3, 4)))
        else:
            model(x, output_hidden_states=True, output_attentions=False)  # the library's forward
        with torch.autocast("cpu", torch.bfloat16):  # (the plan's Python loop, in bf16: FASTRES_CPU_AUTOCAST)
            with per_unit_path():
                ref = model(x, output_hidden_states=True)
            got = [model(x, output_hidden_states=True) for _ in range(2)]
        assert ref.hidden_states[0].dtype == torch.bfloat16 and all(_hf_outputs_equal(g, ref) for g in got)
        runs = plan_runs["plan"]
        with pytest.raises(ValueError, match="channel dimension"):
            model(torch.randn(2, 4, 32, 32), output_hidden_states=True)
        with pytest.raises(ValueError, match="head=False"):
            _eval_plan.run(model, x, head=True, stages=True)
    assert plan_runs["plan"] == runs


@pytest.mark.parametrize("hidden_states", [False, True])
def test_converted_transformers_resnet_eval_forward_under_autograd_recomputes_for_backward(hidden_states,
                                                                                           per_unit_path, plan_runs):
    """The converted ResNetModel called in eval without no_grad: the forward is the plan's, and a backward recomputes
    it through the fused per-unit ops (the last hidden state, as _plan_features computes it, or with hidden states
    every stage's, as _plan_stages does): exactly their gradients for the input and every parameter, through the
    pooled output and every hidden state too."""
    model = fastres.convert(_hf_resnet("ResNetModel"))
    x = torch.randn(2, 3, 32, 32)
    params = list(model.parameters())

    def outputs(out):
        return [out.last_hidden_state, out.pooler_output, *(out.hidden_states[:-1] if hidden_states else ())]

    with torch.no_grad():
        planned = model(x, output_hidden_states=hidden_states)
    with per_unit_path():
        xr = x.clone().requires_grad_()
        ref = outputs(model(xr, output_hidden_states=hidden_states))
        g = [torch.randn_like(t) for t in ref]
        ref_grads = torch.autograd.grad(ref, [xr] + params, g)
    xp = x.clone().requires_grad_()
    out = model(xp, output_hidden_states=hidden_states)
    assert plan_runs["plan"] == 2
    assert all(torch.equal(a, b) for a, b in zip(outputs(out), outputs(planned)))
    grads = torch.autograd.grad(outputs(out), [xp] + params, g)
    for got, expected in zip(grads, ref_grads):
        assert torch.equal(got, expected)


def _per_unit_and_planned_features(plain, model, per_unit_path):
    """A feature extractor's outputs on one input: (the converted `model`'s per-unit path's, [its first two forwards'
    (the first packs the weights, the second runs from them)], the `plain` model's in float64, ATen's)."""
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with per_unit_path():
            ref = model(x)
        got = [model(x) for _ in range(2)]
        return ref, got, copy.deepcopy(plain).double()(x.double()), plain(x)


def _detection_body(return_layers, **kwargs):
    """torchvision's detection / segmentation backbone body (IntermediateLayerGetter) of a small ResNet (FrozenBatchNorm2d,
    as detection models build it; basic blocks, or bottlenecks where kwargs dilate), its statistics random."""
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.models import resnet
    torch.manual_seed(0)
    block = resnet.Bottleneck if kwargs.get("replace_stride_with_dilation") else resnet.BasicBlock
    backbone = randomize_(resnet.ResNet(block, [1, 2, 1, 1], norm_layer=FrozenBatchNorm2d, **kwargs))
    return IntermediateLayerGetter(backbone, return_layers=return_layers).eval()


DETECTION_BODIES = {"detection": ({"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, {}),
                    "pool-and-layer3": ({"maxpool": "pool", "layer3": "x"}, {}),
                    "dilated-segmentation": ({"layer4": "out", "layer3": "aux"},
                                             dict(replace_stride_with_dilation=[False, True, True])),
                    "stem-relu": ({"relu": "stem", "layer2": "0"}, {}),
                    "stem-norm": ({"bn1": "stem", "layer2": "0"}, {})}


@pytest.mark.parametrize("case", list(DETECTION_BODIES))
def test_converted_detection_body_plans_its_stages(case, per_unit_path, plan_runs):
    """fastres.convert's torchvision IntermediateLayerGetter (a detection or segmentation model's backbone body) runs
    its stem, pool and layers from the plan where every return layer is the stem's ReLU, the pool or a layer: the
    same dict, in module order, exactly what the fused per-unit path computes, within the tolerance rule,
    channels_last. A return layer inside the stem's unit (its norm's output) takes the per-unit path."""
    return_layers, kwargs = DETECTION_BODIES[case]
    plain = _detection_body(return_layers, **kwargs)
    ref, got, ref64, aten = _per_unit_and_planned_features(plain, fastres.convert(copy.deepcopy(plain)),
                                                           per_unit_path)
    planned = case != "stem-norm"
    assert plan_runs["plan"] == (2 if planned else 0)
    for out in got:
        assert list(out) == list(ref) == list(aten)
        assert all(torch.equal(out[k], ref[k]) and out[k].is_contiguous(memory_format=CL) for k in ref)
    for k in ref:
        assert_within(f"{case} {k}", got[1][k], ref64[k], aten[k])


def test_converted_detection_body_under_autograd_recomputes_for_backward(per_unit_path, plan_runs):
    """The converted detection body called in eval without no_grad: the forward is the plan's, and a backward
    recomputes every stage through the fused per-unit ops (_plan_stages): exactly their gradients for the input and
    every parameter."""
    body = fastres.convert(_detection_body({"layer2": "0", "layer4": "1"}))
    x = torch.randn(2, 3, 64, 64)
    params = [p for p in body.parameters() if p.requires_grad]
    with per_unit_path():
        xr = x.clone().requires_grad_()
        ref = list(body(xr).values())
        g = [torch.randn_like(t) for t in ref]
        ref_grads = torch.autograd.grad(ref, [xr] + params, g)
    xp = x.clone().requires_grad_()
    out = list(body(xp).values())
    assert plan_runs["plan"] == 1
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    grads = torch.autograd.grad(out, [xp] + params, g)
    for got, expected in zip(grads, ref_grads):
        assert torch.equal(got, expected)


def _timm_features(feature_cls="list", deep_stem=False, **kwargs):
    """timm's features_only model (FeatureListNet or FeatureDictNet) of a small timm ResNet (a ResNet-D's deep stem
    and average-pool shortcuts with deep_stem; kwargs: its out_indices and the like), its statistics random."""
    pytest.importorskip("timm")
    from timm.models import _features
    cls = {"list": _features.FeatureListNet, "dict": _features.FeatureDictNet}[feature_cls]
    resnet = _timm_resnet(**(dict(stem_type="deep", stem_width=16, avg_down=True) if deep_stem else {}))
    return cls(resnet, **kwargs).eval()


TIMM_FEATURES = {"default-taps-with-the-stem": ("list", {}), "layers": ("list", dict(out_indices=(1, 2, 3, 4))),
                 "dict": ("dict", dict(out_indices=(0, 2, 4))), "deep-stem": ("list", dict(deep_stem=True)),
                 "grad-checkpointing": ("list", {})}


@pytest.mark.parametrize("case", list(TIMM_FEATURES))
def test_converted_timm_features_only_plans_its_stages(case, per_unit_path, plan_runs):
    """fastres.convert's timm features_only model (FeatureListNet, FeatureDictNet) runs its stem, pool and layers
    from the plan, the stem's ReLU output among the stages where it is a tap (timm's default out_indices), a deep
    stem's Sequential opened into units: the same list or dict as timm's, exactly what the fused per-unit path computes, within the tolerance rule, channels_last.
    With gradient checkpointing on, timm's own _collect runs."""
    feature_cls, kwargs = TIMM_FEATURES[case]
    plain = _timm_features(feature_cls, **kwargs)
    model = fastres.convert(copy.deepcopy(plain))
    assert type(model).__module__ == "fastres._convert.timm"
    if case == "grad-checkpointing":
        model.set_grad_checkpointing(True)
    report = fastres.convert_report(model)
    assert report.convs_fused == report.convs_total, str(report)

    def values(out):
        return list(out.values()) if isinstance(out, dict) else out

    ref, got, ref64, aten = _per_unit_and_planned_features(plain, model, per_unit_path)
    planned = case != "grad-checkpointing"
    assert plan_runs["plan"] == (2 if planned else 0)
    for out in got:
        assert type(out) is type(aten) and (list(out) == list(aten) if isinstance(aten, dict) else len(out) == len(aten))
        assert all(torch.equal(a, b) for a, b in zip(values(out), values(ref)))
        assert all(a.is_contiguous(memory_format=CL) for a in values(out)) == planned
    for k, (a, e, t) in enumerate(zip(values(got[1]), values(ref64), values(aten))):
        assert_within(f"{case} {k}", a, e, t)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_resnets_run_their_plan_body_as_one_call(shortcut, per_unit_path, plan_runs):
    """The paper's CIFAR nets: planned (no pool; option-A shortcuts, parameter-free, or B's projections), the body
    one _run_plan call from the second forward on, exactly the per-unit path's result, the input never written."""
    model = randomize_(fm.cifar_resnet(20, shortcut=shortcut)).eval()
    # channels_last: the plan runs every model channels_last, CifarResNet's per-unit forward in the input's layout
    # (an NCHW input takes other oneDNN algorithms there, equal only to rounding)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)
    _, prof = _planned_twice_as_per_unit(model, x, per_unit_path, plan_runs)
    names = [e.name for e in prof.events()]
    assert names.count("fastres::_run_plan") == 1
    # option A's shortcut: the subsampled, zero-padded identity, made inside the call
    assert names.count("aten::constant_pad_nd") == (2 if shortcut == "A" else 0)


def test_a_planned_model_is_freed_by_reference_counting():
    """The plan lives in the model's fold cache and holds no reference back to the model: `del model` frees it (and
    its weights) at once, not at the garbage collector's next run."""
    model = fm.resnet18(num_classes=10).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert model.fold_cache.plan is not None
    freed = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert freed() is None
    finally:
        gc.enable()


# ---------------------------------------------------------------- the plan's body as a oneDNN Graph
def test_eval_plan_body_becomes_a_onednn_graph(graph_body, per_unit_path):
    """After GRAPH_AFTER one-call bodies of an input key, the body runs as a frozen TorchScript graph fused into
    oneDNN Graph partitions: no oneDNN op call of its own, within the tolerance rule against float64 (its kernels
    round as they do, not bit for bit as _run_plan), the same result on every call; the global fusion flag stays
    off outside it."""
    from fastres.models import _eval_plan
    fr, tv = pair(fm.resnet50, torchvision.models.resnet50, width_per_group=16)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref64 = copy.deepcopy(tv).double()(x.double())
        aten = _aten_worse(tv, x, ref64)
    with torch.inference_mode():
        with per_unit_path():
            ref = fr(x)
        outs = [fr(x) for _ in range(1 + _eval_plan.GRAPH_AFTER)]  # the Python loop, then the one-call bodies
        assert graph_body == {"built": 0, "ran": 0} and all(torch.equal(o, ref) for o in outs)
        graphed = fr(x)
        with profile() as prof:
            again = fr(x)
        fused = torch.jit.last_executed_optimized_graph().str()
    assert graph_body == {"built": 1, "ran": 2}
    names = [e.name for e in prof.events()]
    assert "fastres::_run_plan" not in names and "mkldnn::_convolution_pointwise" not in names
    # the classifier inside the graph: its linear one of the graph's partitions, not ATen's
    assert fr.fold_cache.plan.head_in_graph and not {"aten::linear", "aten::addmm"} & set(names)
    assert "oneDNNFusionGroup" in fused and not torch.jit.onednn_fusion_enabled()
    assert_within("resnet50 eval, oneDNN Graph body", graphed, ref64, aten)
    assert torch.equal(again, graphed)


@pytest.mark.parametrize("precision", ["bf16-autocast", "bf16-weights"])
def test_eval_plan_body_becomes_a_bf16_onednn_graph(precision, graph_body, per_unit_path):
    """Under autocast to bf16 computed in bf16 (FASTRES_CPU_AUTOCAST=autocast, the suite's setting; on a CPU with
    fast bf16 convolutions, the default), and for a bf16 model, the body becomes a bf16 oneDNN Graph as the fp32 body
    does: its folds cast to bf16 once, traced and run with autocast off; no oneDNN op call of its own, the output in
    bf16, within the tolerance rule against float64 (ATen under the same autocast, or in bf16), the same on every
    call and over a clean input after its packed weights were dropped."""
    from fastres.models import _eval_plan
    fr, tv = pair(fm.resnet50, torchvision.models.resnet50, width_per_group=16)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref64 = copy.deepcopy(tv).double()(x.double())
        autocast = precision == "bf16-autocast"
        if not autocast:
            fr, tv, x = fr.to(torch.bfloat16), copy.deepcopy(tv).to(torch.bfloat16), x.to(torch.bfloat16)
        aten = _aten_worse(tv, x, ref64, autocast=autocast)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        with per_unit_path():
            ref = fr(x)
        outs = [fr(x) for _ in range(1 + _eval_plan.GRAPH_AFTER)]  # the Python loop, then the one-call bodies
        assert graph_body == {"built": 0, "ran": 0} and all(torch.equal(o, ref) for o in outs)
        if not BF16_PACKED:
            # No oneDNN bf16 kernels for this CPU: the Python loop runs ATen's bf16 convolutions, no body, no graph.
            assert torch.equal(fr(x), ref) and graph_body == {"built": 0, "ran": 0}
            return
        graphed = fr(x)
        with profile() as prof:
            again = fr(x)
        fused = torch.jit.last_executed_optimized_graph().str()
        assert torch.is_autocast_enabled("cpu") == autocast  # (the graph's calls turned it off inside only)
    assert graph_body == {"built": 1, "ran": 2}
    names = [e.name for e in prof.events()]
    assert "fastres::_run_plan" not in names and "mkldnn::_convolution_pointwise" not in names
    # the classifier inside the graph where its weights are fp32 (cast with the folds); a bf16 one runs as fr.fc
    assert fr.fold_cache.plan.head_in_graph == autocast
    if autocast:
        assert not {"aten::linear", "aten::addmm"} & set(names)
    assert "oneDNNFusionGroup" in fused and not torch.jit.onednn_fusion_enabled()
    assert graphed.dtype == aten.dtype == torch.bfloat16
    assert_within(f"resnet50 eval, {precision} oneDNN Graph body", graphed, ref64, aten)
    assert torch.equal(again, graphed)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("where", ["input", "weight", "overflow"])
def test_onednn_graph_body_keeps_nan(where, autocast, graph_body, per_unit_path):
    """The graph fuses its ReLUs as oneDNN's post-op, which maps NaN to 0: where the invalid flag says a NaN met one,
    the forward is _run_plan's (which reruns with the NaN-keeping passes), so NaN and Inf come out exactly as the
    per-unit path's; a clean input after that runs the graph again. In bf16 too (under autocast): the post-ops
    apply to the fp32 accumulators, before the conversion to bf16."""
    if autocast and not BF16_PACKED:
        pytest.skip("no oneDNN bf16 kernels for this CPU: no bf16 body, so no bf16 graph")
    model = randomize_(fm.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    bad = x.clone()
    if where == "input":
        bad[1, 2, 31, 0] = float("nan")
    elif where == "overflow":
        bad[0] *= 3e38
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        for _ in range(4):
            model(x)  # (the graph is built on the fourth)
        ran = graph_body["ran"]
        if where == "weight":
            with torch.no_grad():
                model.layer3[1].conv2.weight[5, 7, 1, 1] = float("nan")
            for _ in range(4):
                model(x)  # (the changed weight rebuilt the plan: the graph again on the fourth forward)
        got = model(bad)
        with per_unit_path():
            ref = model(bad)
        clean = model(x)
    assert graph_body["built"] == (2 if where == "weight" else 1)
    assert torch.isnan(ref).any() or torch.isinf(ref).any()  # (else the case tests nothing)
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
    # the bad forward fell back to _run_plan; the clean one ran the graph (with a NaN weight every forward meets it)
    assert graph_body["ran"] == ran + (0 if where == "weight" else 1)


def test_onednn_graph_body_is_never_stale(graph_body, per_unit_path):
    """A weight changed in place after the graph was built: the next forward is the new weights' (the plan's guard
    rebuilds the plan, whose keys start over), and the graph built again later holds the new weights."""
    fr, tv = pair(fm.resnet18, torchvision.models.resnet18)
    _check_graph_rebuilt_after(lambda: fr.layer2[0].conv1.weight.mul_(-1), fr, tv, torch.randn(2, 3, 32, 32),
                               graph_body, per_unit_path, "resnet18 eval, rebuilt oneDNN Graph body")


def _check_graph_rebuilt_after(edit, model, plain, x, graph_body, per_unit_path, name):
    """After edit() (under no_grad, once model's graph was built): the next forward is the per-unit path's, bit for
    bit (the plan's guard rebuilds the plan, whose keys start over), and the graph built again computes the model as
    it is now (plain: its plain modules), within the tolerance rule."""
    with torch.inference_mode():
        for _ in range(5):
            model(x)
    assert graph_body["built"] == 1
    with torch.no_grad():
        edit()
    with torch.inference_mode():
        with per_unit_path():
            ref = model(x)
        assert torch.equal(model(x), ref)
        for _ in range(3):
            out = model(x)
    assert graph_body["built"] == 2
    with torch.no_grad():
        ref64 = copy.deepcopy(plain).double()(x.double())
        aten = _aten_worse(plain, x, ref64)
    assert_within(name, out, ref64, aten)


@pytest.mark.parametrize("case", ["fp16-autocast", "average-pool-after-the-stem"])
def test_onednn_graph_body_only_for_what_it_covers(case, graph_body, per_unit_path):
    """No graph under autocast to fp16 (fp32 and bf16 only), and none for a body with a module the graph does not
    cover (a pool after the stem other than a max pool): the one-call body or the Python loop stays, bit for bit the
    per-unit path's."""
    model = randomize_(fm.resnet18(num_classes=10)).eval()
    if case == "average-pool-after-the-stem":
        model.maxpool = nn.AvgPool2d(3, 2, 1)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)
    with torch.inference_mode(), torch.autocast("cpu", torch.float16, enabled=case == "fp16-autocast"):
        with per_unit_path():
            ref = model(x)
        outs = [model(x) for _ in range(5)]
    assert graph_body == {"built": 0, "ran": 0}
    assert all(torch.equal(o, ref) for o in outs)


class _Flattened(nn.Module):
    """A backbone's feature maps (its output's `attribute`, or its dict's values), flattened into one tensor (for the
    tolerance rule)."""

    def __init__(self, model, attribute=None):
        super().__init__()
        self.model, self.attribute = model, attribute

    def forward(self, x):
        out = self.model(x)
        maps = getattr(out, self.attribute) if self.attribute else out.values()
        return torch.cat([m.flatten(1) for m in maps], 1)


@pytest.mark.parametrize("case", ["cifar-option-A", "timm-average-pool-shortcut", "transformers-resnet",
                                  "transformers-backbone", "torchvision-detection-body", "timm-features-only"])
def test_onednn_graph_body_covers_option_a_and_average_pool_shortcuts(case, graph_body, per_unit_path):
    """The paper's CIFAR nets with option-A shortcuts (the subsampled identity with zero channels appended),
    timm's ResNet-D after fastres.convert (average-pool shortcuts, deep stem) and transformers' ResNetModel after
    fastres.convert (its last hidden state), or its ResNetBackbone, torchvision's detection backbone body or timm's
    features_only model (every stage's output, the stem's before its max pool too, returned from inside the graph)
    run their body as a oneDNN Graph too: within the tolerance rule against float64, the same on every
    call, and NaN kept as the per-unit path keeps it."""
    from fastres.models import _eval_plan
    if case == "cifar-option-A":
        model = randomize_(fm.cifar_resnet(20, shortcut="A")).eval()
        plain = copy.deepcopy(model)
        plain.forward = types.MethodType(torchvision_style_cifar_forward, plain)
    elif case == "timm-average-pool-shortcut":
        pytest.importorskip("timm")
        plain = _timm_resnet(stem_type="deep", stem_width=16, avg_down=True)
        model = fastres.convert(copy.deepcopy(plain))
    elif case == "transformers-resnet":
        plain = _LastHiddenState(_hf_resnet("ResNetModel"))
        model = _LastHiddenState(fastres.convert(copy.deepcopy(plain.model)))
    elif case == "transformers-backbone":
        plain = _Flattened(_hf_resnet("ResNetBackbone", out_features=["stem", "stage1", "stage2", "stage3",
                                                                     "stage4"]), "feature_maps")
        model = _Flattened(fastres.convert(copy.deepcopy(plain.model)), "feature_maps")
    elif case == "torchvision-detection-body":
        plain = _Flattened(_detection_body({"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}))
        model = _Flattened(fastres.convert(copy.deepcopy(plain.model)))
    else:  # timm's default taps: the stem's ReLU output before the max pool among them
        plain = _Flattened(_timm_features("dict"))
        model = _Flattened(fastres.convert(copy.deepcopy(plain.model)))
    # channels_last, the layout the plan runs in: CifarResNet's per-unit forward runs in the input's
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)
    bad = x.clone()
    bad[1, 2, 31, 0] = float("nan")
    with torch.no_grad():
        ref64 = copy.deepcopy(plain).double()(x.double())
        aten = _aten_worse(plain, x, ref64)
    with torch.inference_mode():
        for _ in range(1 + _eval_plan.GRAPH_AFTER):
            model(x)  # the Python loop, then the one-call bodies
        graphed = [model(x), model(x)]
        got = model(bad)  # a NaN meets a ReLU: this forward is _run_plan's
        with per_unit_path():
            ref_bad = model(bad)
    assert graph_body == {"built": 1, "ran": 2}
    assert_within(case, graphed[0], ref64, aten)
    assert torch.equal(graphed[0], graphed[1])
    assert torch.isnan(ref_bad).any()
    torch.testing.assert_close(got, ref_bad, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("case", ["adaptive-max-pool", "output-size-edited"])
def test_onednn_graph_body_ends_with_the_classifier_only_where_it_is_one(case, graph_body, per_unit_path):
    """The graph computes the logits (the mean over the last feature map, then the linear) only where the model's
    avgpool is a global average pool and its fc an fp32 Linear. Otherwise (another pool, or the pool's output size
    edited after the graph was built, which the guard sees) the graph ends with the features and the model's own
    modules compute the head from them: within the tolerance rule, as the same model's plain modules compute it."""
    fr, tv = pair()
    x = torch.randn(2, 3, 32, 32)
    if case == "adaptive-max-pool":
        fr.avgpool, tv.avgpool = nn.AdaptiveMaxPool2d(1).eval(), nn.AdaptiveMaxPool2d(1).eval()
    with torch.inference_mode():
        for _ in range(5):
            fr(x)
        if case == "output-size-edited":
            assert fr.fold_cache.plan.head_in_graph
            fr.avgpool.output_size = tv.avgpool.output_size = (1, None)  # (the same pooling on a 1x1 map)
            for _ in range(5):
                fr(x)
        out = fr(x)
    assert not fr.fold_cache.plan.head_in_graph
    assert graph_body["built"] == (2 if case == "output-size-edited" else 1) and graph_body["ran"] >= 2
    with torch.no_grad():
        ref64 = copy.deepcopy(tv).double()(x.double())
        aten = _aten_worse(tv, x, ref64)
    assert_within(case, out, ref64, aten)


def test_onednn_graph_body_turned_off_by_the_environment():
    import subprocess
    code = "import fastres.models._eval_plan as p; print(p.GRAPH_BODY)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "FASTRES_CPU_GRAPH": "0"})
    assert out.stdout.strip() == "False"


@pytest.fixture
def winograd_everywhere(monkeypatch):
    """Winograd convolutions on for every 3x3 unit of stride 1, however small (the tests' inputs are below the size
    thresholds), in the graph body and on the packed path alike."""
    from fastres.models import _eval_plan
    if _eval_plan._WINOGRAD_CONV is None:
        pytest.skip("fastres._C without _winograd_conv3x3")
    from fastres.ops import backend_cuda
    monkeypatch.setattr(backend_cuda, "WINOGRAD", True)
    monkeypatch.setattr(backend_cuda, "WINOGRAD_MIN_CHANNELS", 0)
    monkeypatch.setattr(backend_cuda, "WINOGRAD_MIN_MACS", 0)
    monkeypatch.setattr(backend_cuda, "WINOGRAD_MIN_TILES", 0)


def _graph_run(model, x):
    """model(x) once its graph body is built, and that forward's profiled op names."""
    with torch.inference_mode():
        for _ in range(4):
            model(x)
        with profile() as prof:
            out = model(x)
    return out, [e.name for e in prof.events()]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_onednn_graph_body_runs_3x3_convolutions_as_winograd(arch, graph_body, winograd_everywhere):
    """Every 3x3 convolution of stride 1 (ResNet-18's with its residual and ReLU, ResNet-50's middle ones; not the
    strided ones) runs as _winograd_conv3x3 inside the graph body, within the tolerance rule against float64."""
    make = {"resnet18": (fm.resnet18, torchvision.models.resnet18, {}),
            "resnet50": (fm.resnet50, torchvision.models.resnet50, {"width_per_group": 16})}[arch]
    fr, tv = pair(make[0], make[1], **make[2])
    x = torch.randn(2, 3, 32, 32)
    out, names = _graph_run(fr, x)
    assert graph_body["ran"] >= 1
    unstrided = [m for m in fr.modules()
                 if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1)]
    assert names.count("fastres::_winograd_conv3x3") == len(unstrided) == 13
    with torch.no_grad():
        ref64 = copy.deepcopy(tv).double()(x.double())
        aten = _aten_worse(tv, x, ref64)
    assert_within(f"{arch} eval, oneDNN Graph body with Winograd", out, ref64, aten)


@pytest.mark.parametrize("where", ["input", "overflow"])
def test_winograd_graph_body_keeps_nan(where, graph_body, per_unit_path, winograd_everywhere):
    """A NaN or an overflow in the input (Inf - Inf in Winograd's transforms raises the invalid flag too): the
    forward is _run_plan's, exactly the per-unit path's."""
    model = randomize_(fm.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    bad = x.clone()
    if where == "input":
        bad[1, 2, 31, 0] = float("nan")
    else:
        bad[0] *= 3e38
    _graph_run(model, x)
    with torch.inference_mode():
        got = model(bad)
        with per_unit_path():
            ref = model(bad)
    assert torch.isnan(ref).any() or torch.isinf(ref).any()
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)


def test_winograd_graph_body_is_never_stale(graph_body, per_unit_path, winograd_everywhere):
    """A Winograd unit's weight changed in place: the graph built again transforms the new weight."""
    fr, tv = pair(fm.resnet18, torchvision.models.resnet18)
    _check_graph_rebuilt_after(lambda: fr.layer3[1].conv1.weight.mul_(-1), fr, tv, torch.randn(2, 3, 32, 32),
                               graph_body, per_unit_path, "resnet18 eval, rebuilt Winograd graph body")


def test_winograd_only_where_the_convolution_is_large_enough(graph_body):
    """At the default thresholds a CIFAR ResNet's 16- to 64-channel convolutions stay oneDNN's (the partitions a
    Winograd convolution splits would cost more than it saves), and so does a convolution of few output tiles;
    ResNet-50's at 224x224 do not."""
    from fastres.ops import backend_cuda
    if not backend_cuda.WINOGRAD:
        pytest.skip("Winograd off (FASTRES_CPU_WINOGRAD=0 or fastres._C without it)")
    _, names = _graph_run(randomize_(fm.cifar_resnet(20)).eval(), torch.randn(2, 3, 32, 32))
    assert "fastres::_winograd_conv3x3" not in names
    pays = backend_cuda.winograd_pays
    conv = nn.Conv2d(64, 64, 3, padding=1)
    assert pays(conv.weight, (1, 64, 56, 56))
    assert not pays(conv.weight, (1, 64, 8, 8))
    assert not pays(nn.Conv2d(32, 32, 3).weight, (64, 32, 56, 56))
    # ResNet-50's last stage: at batch 1 too few tiles (16) to reuse its transformed weights, at batch 8 enough
    last = nn.Conv2d(512, 512, 3, padding=1).weight
    assert not pays(last, (1, 512, 7, 7))
    assert pays(last, (8, 512, 7, 7))


def test_winograd_turned_off_by_the_environment():
    import subprocess
    code = "import fastres.ops.backend_cuda as b; print(b.WINOGRAD)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "FASTRES_CPU_WINOGRAD": "0"})
    assert out.stdout.strip() == "False"


def _fpn_pair():
    """torchvision's FeaturePyramidNetwork over 64- and 128-channel maps (randomized, eval) and fastres.convert's, and
    its input: the 56x56 level's 3x3 convolution (64 channels, 116M multiply-adds) is large enough for Winograd's
    rule, the 28x28 level's (29M) is not."""
    import collections
    fpn = randomize_(torchvision.ops.FeaturePyramidNetwork([64, 128], 64)).eval()
    feats = collections.OrderedDict(p2=torch.randn(1, 64, 56, 56), p3=torch.randn(1, 128, 28, 28))
    return fpn, fastres.convert(copy.deepcopy(fpn)).eval(), feats


def _fpn_check(what, fr, fpn, feats):
    """fr(feats) (channels_last) within the tolerance rule against float64, level by level; its profiled op names."""
    import collections
    cl = collections.OrderedDict((k, v.contiguous(memory_format=CL)) for k, v in feats.items())
    with torch.no_grad():
        with profile() as prof:
            out = fr(cl)
        ref64 = copy.deepcopy(fpn).double()(collections.OrderedDict((k, v.double()) for k, v in feats.items()))
        atens = [copy.deepcopy(fpn).to(memory_format=fmt)(
            collections.OrderedDict((k, v.contiguous(memory_format=fmt)) for k, v in feats.items()))
            for fmt in (torch.contiguous_format, CL)]
    from fastres.testing import max_error
    for level in ref64:
        aten = max((a[level] for a in atens), key=lambda a: max_error(a, ref64[level]))
        assert_within(f"{what}, {level}", out[level], ref64[level], aten)
        assert out[level].is_contiguous(memory_format=CL)
    return [e.name for e in prof.events()]


def test_packed_path_runs_large_3x3_convolutions_as_winograd(packing):
    """Outside any plan (a detector's FPN, converted), a 3x3 convolution of stride 1 that Winograd's rule picks runs
    as _winograd_conv3x3 from its transformed weight, made once per input shape and never stale; the others run
    oneDNN's from their packed weights. Within the tolerance rule against float64."""
    from fastres.ops import backend_cuda
    if not backend_cuda.WINOGRAD:
        pytest.skip("Winograd off (FASTRES_CPU_WINOGRAD=0 or fastres._C without it)")
    fpn, fr, feats = _fpn_pair()
    names = _fpn_check("FPN, first forward", fr, fpn, feats)
    assert names.count("fastres::_winograd_conv3x3") == 1 and names.count("fastres::_winograd_weight") == 1
    assert names.count("mkldnn::_convolution_pointwise") == 3  # the two 1x1 lateral convs, the 28x28 level's 3x3
    assert packing == {"packed": 4, "ran": 4}
    names = _fpn_check("FPN, second forward", fr, fpn, feats)
    assert names.count("fastres::_winograd_conv3x3") == 1 and "fastres::_winograd_weight" not in names
    assert packing == {"packed": 4, "ran": 8}
    # An in-place edit of the Winograd unit's weight: that unit alone is transformed again.
    with torch.no_grad():
        for m in (fpn, fr):
            m.layer_blocks[0][0].weight.mul_(-0.5)
    names = _fpn_check("FPN after an in-place weight edit", fr, fpn, feats)
    assert names.count("fastres::_winograd_weight") == 1 and packing["packed"] == 5
    # Under a gradient the packed path steps aside (oneDNN's and Winograd's ops have no autograd formula).
    out = fr(feats)
    assert out["p2"].requires_grad and packing["packed"] == 5


def test_a_convolution_run_at_many_shapes_transforms_its_weight_once(packing, winograd_everywhere):
    """A detector's RPN head runs its one 3x3 convolution on every FPN level: five input shapes a forward, more than
    the packed weights a unit keeps per shape. Its Winograd transform serves every shape: made in the first forward
    only, never again; the outputs within the tolerance rule against float64."""
    from torchvision.models.detection.rpn import RPNHead
    head = randomize_(RPNHead(64, 3)).eval()
    fr = fastres.convert(copy.deepcopy(head)).eval()
    levels = [torch.randn(1, 64, s, s) for s in (32, 16, 8, 4, 2)]
    with torch.no_grad():
        ref64 = copy.deepcopy(head).double()([t.double() for t in levels])
        atens = [copy.deepcopy(head).to(memory_format=fmt)([t.contiguous(memory_format=fmt) for t in levels])
                 for fmt in (torch.contiguous_format, CL)]
        for forward in range(2):
            with profile() as prof:
                out = fr([t.contiguous(memory_format=CL) for t in levels])
            names = [e.name for e in prof.events()]
            assert names.count("fastres::_winograd_conv3x3") == 5
            assert names.count("fastres::_winograd_weight") == (1 if forward == 0 else 0), forward
    from fastres.testing import max_error
    for part in range(2):  # the objectness logits and the box deltas, level by level
        for level in range(5):
            aten = max((a[part][level] for a in atens), key=lambda a: max_error(a, ref64[part][level]))
            assert_within(f"RPN head, output {part}, level {level}", out[part][level], ref64[part][level], aten)


def test_winograd_turned_off_leaves_the_packed_path_to_onednn(packing, monkeypatch):
    """FASTRES_CPU_WINOGRAD=0 (backend_cuda.WINOGRAD false): every convolution runs oneDNN's from its packed weight."""
    from fastres.ops import backend_cuda
    monkeypatch.setattr(backend_cuda, "WINOGRAD", False)
    fpn, fr, feats = _fpn_pair()
    names = _fpn_check("FPN, Winograd off", fr, fpn, feats)
    assert "fastres::_winograd_conv3x3" not in names and names.count("mkldnn::_convolution_pointwise") == 4
    assert packing == {"packed": 4, "ran": 4}


def test_eval_plan_runs_winograd_units_exactly_as_the_per_unit_path(per_unit_path, plan_runs, winograd_everywhere):
    """Where Winograd's rule picks a unit, the plan's Python loop (first forward) and its one-call body, _run_plan
    (second), run it as _winograd_conv3x3 as the per-unit path does: the same result bit for bit, within the
    tolerance rule against float64, the model's input not written over."""
    fr, tv = pair(fm.resnet18, torchvision.models.resnet18)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)
    second, prof = _planned_twice_as_per_unit(fr, x, per_unit_path, plan_runs)
    inside = [e.name for e in prof.events() if _under(e, "fastres::_run_plan")]
    # ResNet-18's 13 3x3 convolutions of stride 1 as Winograd, its 3 strided ones, 3 projections and stem oneDNN's
    assert inside.count("fastres::_winograd_conv3x3") == 13
    assert inside.count("mkldnn::_convolution_pointwise") + inside.count("mkldnn::_convolution_pointwise_") == 7
    with torch.no_grad():
        ref64 = copy.deepcopy(tv).double()(x.double())
        aten = _aten_worse(tv, x, ref64)
    assert_within("resnet18 eval, Winograd units in _run_plan", second, ref64, aten)


def test_onednn_graph_body_dropped_where_inputs_keep_meeting_nan(graph_body, per_unit_path):
    """Each forward that meets a NaN runs the graph, then _run_plan: after a few in a row the key keeps _run_plan
    alone, which gives the per-unit path's result bit for bit, NaN or not."""
    from fastres.models import _eval_plan
    model = randomize_(fm.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    bad = x.clone()
    bad[0, 1, 2, 3] = float("nan")
    with torch.inference_mode():
        for _ in range(4):
            model(x)
        assert graph_body == {"built": 1, "ran": 1}
        outs = [model(bad) for _ in range(_eval_plan._GRAPH_MISSES)]
        clean = model(x)
        with per_unit_path():
            ref_bad, ref = model(bad), model(x)
    assert graph_body == {"built": 1, "ran": 1}
    for out in outs:
        torch.testing.assert_close(out, ref_bad, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(clean, ref)


def _small_vgg(cfg=(16, "M", 32, 32, "M"), batch_norm=False):
    """fastres.models.VGG with small features (BN where asked) and a small classifier, random weights and BN
    statistics, in eval; and its plain modules (features, avgpool, flatten, classifier) as one Sequential."""
    torch.manual_seed(0)
    with torch.device("meta"):
        vgg = VGG(nn.Sequential(), num_classes=10, init_weights=False)
    vgg.features = make_layers(cfg, batch_norm=batch_norm)
    width = [v for v in cfg if v != "M"][-1]
    vgg.classifier = nn.Sequential(nn.Linear(width * 49, 24), nn.ReLU(True), nn.Dropout(), nn.Linear(24, 10))
    vgg = randomize_(vgg).eval()
    return vgg, nn.Sequential(vgg.features, vgg.avgpool, nn.Flatten(), vgg.classifier)


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16-weights"])
@pytest.mark.parametrize("batch_norm", [False, True], ids=["vgg", "vgg-bn"])
def test_vgg_eval_runs_its_features_as_a_onednn_graph(batch_norm, precision, graph_body, per_unit_path):
    """fastres.models.VGG in eval: the per-unit path's output for the first GRAPH_AFTER forwards of an input shape,
    then its features as one oneDNN Graph (built once), its classifier the model's own: within the tolerance rule.
    In bf16 too (under bf16 autocast, or a bf16 model) where oneDNN has bf16 kernels: the graph's output in bf16;
    elsewhere the per-unit path throughout."""
    vgg, plain = _small_vgg(batch_norm=batch_norm)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref64 = copy.deepcopy(plain).double()(x.double())
    autocast = precision == "bf16-autocast"
    if precision == "bf16-weights":
        vgg, plain, x = vgg.to(torch.bfloat16), copy.deepcopy(plain).to(torch.bfloat16), x.to(torch.bfloat16)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        with per_unit_path():
            ref = vgg(x)
        outs = [vgg(x) for _ in range(5)]
    assert torch.equal(outs[0], ref) and torch.equal(outs[1], ref)
    if precision != "fp32" and not BF16_PACKED:
        assert graph_body == {"built": 0, "ran": 0} and all(torch.equal(o, ref) for o in outs)
        return
    assert graph_body == {"built": 1, "ran": 3}
    with torch.no_grad():
        aten = _aten_worse(plain, x, ref64, autocast=autocast)
    for out in outs[2:]:
        assert out.dtype == aten.dtype
        assert_within(f"{'vgg-bn' if batch_norm else 'vgg'} eval {precision}, oneDNN Graph features", out, ref64, aten)


def test_vgg_under_autocast_casts_its_classifier_once(graph_body, per_unit_path):
    """Under bf16 autocast, once the features run as a graph, the classifier's linears run on weights cast once
    (autocast would cast them on every call), computing what the modules compute under autocast, bit for bit; a
    classifier weight changed in place is seen (the guard watches it: the next forward is the per-unit path's)."""
    from fastres.models import _eval_plan
    if not BF16_PACKED:
        pytest.skip("no oneDNN bf16 kernels for this CPU: no bf16 graph, the per-unit path throughout")
    vgg, _ = _small_vgg()
    x = torch.randn(2, 3, 16, 16)
    linears = [m for m in vgg.classifier if isinstance(m, nn.Linear)]
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        outs = [vgg(x) for _ in range(5)]
        with profile(record_shapes=True) as prof:
            again = vgg(x)
        plan = vgg.fold_cache.plan
        graph = plan.packs[next(iter(plan.packs))][len(plan.units)]
        with torch.autocast("cpu", enabled=False), _eval_plan._onednn_fusion():
            features = graph.module(x.to(torch.bfloat16, memory_format=CL))
        expected = vgg.classifier(torch.flatten(vgg.avgpool(features), 1))  # the modules, under autocast
    assert graph_body == {"built": 1, "ran": 4}
    weight_shapes = {tuple(m.weight.shape) for m in linears}
    casts = [e for e in prof.events() if e.name in COPIES and e.input_shapes and
             tuple(e.input_shapes[0]) in weight_shapes]
    assert not casts, [(e.name, e.input_shapes) for e in casts]
    assert again.dtype == torch.bfloat16 and torch.equal(again, outs[-1]) and torch.equal(again, expected)
    names = [e.name for e in prof.events()]
    if _eval_plan._LINEAR_PACKED:
        # oneDNN's linear on weights packed once (for this batch size): no reorder in a steady-state forward
        assert names.count("mkldnn::_linear_pointwise") == len(linears) and "aten::linear" not in names
        assert not [n for n in names if "reorder" in n], names
    # Another batch size: a key of its own, its weights packed for it, again the modules' result bit for bit.
    x3 = torch.randn(3, 3, 16, 16)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        outs3 = [vgg(x3) for _ in range(4)]
        graph3 = plan.packs[next(k for k in plan.packs if k[0] == x3.shape)][len(plan.units)]
        with torch.autocast("cpu", enabled=False), _eval_plan._onednn_fusion():
            features3 = graph3.module(x3.to(torch.bfloat16, memory_format=CL))
        expected3 = vgg.classifier(torch.flatten(vgg.avgpool(features3), 1))
        assert torch.equal(vgg(x), again)  # (the first key's packs kept)
    assert graph_body["built"] == 2 and torch.equal(outs3[-1], expected3)
    with torch.no_grad():
        linears[-1].weight.mul_(-1)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        changed = vgg(x)
        with per_unit_path():
            ref = vgg(x)
    assert torch.equal(changed, ref) and not torch.equal(changed, again)


@pytest.mark.parametrize("edit", ["in-place", "through-data", "pool-stride"])
def test_vgg_onednn_graph_is_never_stale(edit, graph_body, per_unit_path):
    """A feature weight changed after the graph was built, in place or through .data (which bypasses the version
    counter), or a max pool's stride: the next forward is the per-unit path's, and the graph built again computes
    the model as it is now."""
    vgg, plain = _small_vgg()

    def change():
        if edit == "pool-stride":
            vgg.features[2].stride = 1
        else:
            (vgg.features[3].weight.data if edit == "through-data" else vgg.features[3].weight).mul_(-1)
    _check_graph_rebuilt_after(change, vgg, plain, torch.randn(2, 3, 16, 16), graph_body, per_unit_path,
                               f"vgg eval, rebuilt oneDNN Graph ({edit})")


def test_vgg_onednn_graph_keeps_nan(graph_body, per_unit_path):
    """A NaN that meets a ReLU (the graph's post-op maps it to 0): that forward is the per-unit path's, NaN kept."""
    vgg, _ = _small_vgg()
    x = torch.randn(2, 3, 16, 16)
    bad = x.index_put((torch.tensor([1]), torch.tensor([2]), torch.tensor([7]), torch.tensor([0])),
                      torch.tensor(float("nan")))
    with torch.inference_mode():
        for _ in range(4):
            vgg(x)  # (the graph is built on the third)
        ran = graph_body["ran"]
        got = vgg(bad)
        with per_unit_path():
            ref = vgg(bad)
        clean = vgg(x)
    assert torch.isnan(ref).any()  # (else the case tests nothing)
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
    assert graph_body["ran"] == ran + 1  # the clean forward only
    assert torch.isfinite(clean).all()


@pytest.mark.parametrize("case", ["fp16-autocast", "pool-before-relu", "hook", "training"])
def test_vgg_onednn_graph_only_for_what_it_covers(case, graph_body, per_unit_path):
    """No graph under autocast to fp16, for a max pool whose input is not a ReLU's (oneDNN's pooling need not keep a
    NaN there), for a model with a hook, or in training: the per-unit path's output, bit for bit."""
    vgg, _ = _small_vgg()
    if case == "pool-before-relu":
        vgg.features = nn.Sequential(nn.MaxPool2d(2), *vgg.features[:2], *vgg.features[3:])
    elif case == "hook":
        vgg.features[1].register_forward_hook(lambda *args: None)
    vgg.train(case == "training")
    x = torch.randn(2, 3, 32 if case == "pool-before-relu" else 16, 16)
    with torch.no_grad(), torch.autocast("cpu", torch.float16, enabled=case == "fp16-autocast"):
        with per_unit_path():
            ref = vgg(x)
        outs = [vgg(x) for _ in range(4)]
    assert graph_body == {"built": 0, "ran": 0}
    if case != "training":  # (training batches move BN statistics: none here, but dropout draws)
        assert all(torch.equal(o, ref) for o in outs)


@pytest.mark.skipif(not hasattr(torch.ops.fastres, "_fe_invalid_clear"), reason="needs fastres._C's flag ops")
def test_invalid_flag_ops_refuse_a_foreign_state():
    """_fe_invalid_raised reads only a state from _fe_invalid_clear, of the current thread count (another answers
    true: the caller takes its NaN-keeping path)."""
    state = torch.ops.fastres._fe_invalid_clear()
    assert state.dtype == torch.uint8 and not torch.ops.fastres._fe_invalid_raised(state)
    with pytest.raises(RuntimeError, match="state must come from fastres::_fe_invalid_clear"):
        torch.ops.fastres._fe_invalid_raised(torch.zeros(3))
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert torch.ops.fastres._fe_invalid_raised(state)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- autocast on a CPU whose reduced dtype is slower
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head", ["resnet", "timm-features"])
def test_autocast_in_fp32_runs_the_fp32_body_and_casts_its_output(dtype, head, monkeypatch, per_unit_path,
                                                                  plan_runs):
    """FASTRES_CPU_AUTOCAST=fp32: under autocast the plan runs the fp32 forward (its key's packed weights, no
    weight in autocast's dtype) and hands back its output in autocast's dtype: exactly the fp32 output cast, so
    within the tolerance rule against float64 by far; the caller's autocast stays on."""
    from fastres.models import _eval_plan
    monkeypatch.setenv("FASTRES_CPU_AUTOCAST", "fp32")
    if head == "timm-features":
        pytest.importorskip("timm")
        model = fastres.convert(_timm_resnet()).eval()
        run = model.forward_features
    else:
        model = randomize_(fm.resnet50(num_classes=10, width_per_group=16)).eval()
        run = model
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        fp32 = run(x)
        with torch.autocast("cpu", dtype):
            with per_unit_path():
                per_unit = run(x)  # autocast's dtype throughout
            outs = [run(x) for _ in range(3)]
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
    assert plan_runs["plan"] == 4
    assert per_unit.dtype == dtype
    for out in outs:
        assert out.dtype == dtype and torch.equal(out, fp32.to(dtype))
    keys = model.fold_cache.plan.packs.keys()
    assert [key[2] for key in keys] == [None]  # one key, fp32: nothing packed in autocast's dtype


def test_autocast_keeps_its_dtype_where_it_is_not_slower(monkeypatch, per_unit_path):
    """FASTRES_CPU_AUTOCAST=auto (the default): the plan measures once per dtype and thread count how much slower
    this CPU's convolution is in autocast's dtype, and runs fp32 only above AUTOCAST_FP32_ABOVE; =autocast never."""
    from fastres.models import _eval_plan
    probes = []
    ratio = {"value": 1.0}

    def probe(dtype):
        probes.append(dtype)
        return ratio["value"]
    monkeypatch.setattr(_eval_plan, "reduced_conv_time_ratio", probe)
    monkeypatch.setattr(_eval_plan, "_AUTOCAST_PROBED", {})
    monkeypatch.setenv("FASTRES_CPU_AUTOCAST", "auto")
    model = randomize_(fm.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        fp32 = model(x)
        with torch.autocast("cpu", torch.bfloat16):
            with per_unit_path():
                reduced = model(x)
            same = [model(x) for _ in range(2)]  # ratio 1.0: autocast's dtype
            assert probes == [torch.bfloat16]
            ratio["value"] = 2.0  # measured once: still autocast's dtype
            assert torch.equal(model(x), reduced)
            monkeypatch.setattr(_eval_plan, "_AUTOCAST_PROBED", {})
            assert torch.equal(model(x), fp32.to(torch.bfloat16))  # measured again: 2.0, fp32
            assert probes == [torch.bfloat16] * 2
            monkeypatch.setenv("FASTRES_CPU_AUTOCAST", "autocast")
            assert torch.equal(model(x), reduced)
            assert probes == [torch.bfloat16] * 2  # no measurement where the environment decides
    assert all(torch.equal(o, reduced) for o in same)
    assert not torch.equal(reduced.float(), fp32)  # (the two paths do differ here)
    monkeypatch.setattr(_eval_plan, "_AUTOCAST_PROBED", {})
    ratio["value"] = _eval_plan.AUTOCAST_FP32_ABOVE  # not above: autocast's dtype
    monkeypatch.setenv("FASTRES_CPU_AUTOCAST", "auto")
    assert not _eval_plan.autocast_computes_in_fp32(torch.bfloat16)


def test_autocast_mode_from_the_environment_is_checked(monkeypatch):
    from fastres.models import _eval_plan
    monkeypatch.setenv("FASTRES_CPU_AUTOCAST", "bf16")
    model = randomize_(fm.resnet18(num_classes=10)).eval()
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16), \
            pytest.raises(ValueError, match="FASTRES_CPU_AUTOCAST must be one of auto, fp32, autocast, got 'bf16'"):
        model(torch.randn(1, 3, 32, 32))
    monkeypatch.setenv("FASTRES_CPU_AUTOCAST", " FP32 ")
    assert _eval_plan.autocast_computes_in_fp32(torch.bfloat16)
    assert _eval_plan.autocast_compute_reason(torch.float16) == \
        "computes in fp32, output cast to fp16: FASTRES_CPU_AUTOCAST=fp32"
    monkeypatch.setenv("FASTRES_CPU_AUTOCAST", "autocast")
    assert _eval_plan.autocast_compute_reason(torch.float16) == "computes in fp16: FASTRES_CPU_AUTOCAST=autocast"


def test_reduced_conv_time_ratio_measures_this_cpu():
    from fastres.models import _eval_plan
    with torch.autocast("cpu", torch.bfloat16):
        ratio = _eval_plan.reduced_conv_time_ratio(torch.bfloat16, channels=16, size=8, rounds=3)
    assert 0 < ratio < float("inf")  # (inf only where this torch has no bf16 CPU convolution, which it has)
    real_conv2d = torch.nn.functional.conv2d

    def no_fp16_conv(x, *args):
        if x.dtype == torch.float16:
            raise RuntimeError('"slow_conv2d_cpu" not implemented for \'Half\'')
        return real_conv2d(x, *args)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_eval_plan.F, "conv2d", no_fp16_conv)
        assert _eval_plan.reduced_conv_time_ratio(torch.float16, channels=16, size=8) == float("inf")
    with pytest.raises(ValueError, match="rounds must be at least 1, got 0"):
        _eval_plan.reduced_conv_time_ratio(torch.bfloat16, rounds=0)


def test_autocast_in_fp32_runs_the_onednn_graph_body(graph_body, monkeypatch):
    """Under autocast computed in fp32 the key is the fp32 one, whose body becomes the oneDNN Graph (traced and run
    with autocast off, so that TorchScript inserts no cast of its own)."""
    monkeypatch.setenv("FASTRES_CPU_AUTOCAST", "fp32")
    model = randomize_(fm.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        with torch.autocast("cpu", torch.bfloat16):
            outs = [model(x) for _ in range(5)]
        fp32 = model(x)
    assert graph_body == {"built": 1, "ran": 3}
    assert all(o.dtype == torch.bfloat16 for o in outs) and torch.equal(outs[-1], fp32.to(torch.bfloat16))


# ---------------------------------------------------------------- glibc's malloc (fastres.models._malloc)
# A process's first CPU eval plan, then what the once-per-process module of fastres.models did (its state, printed
# twice: the second call decides nothing again); the thread count from the command line, if given.
_FIRST_PLAN_PROBE = r"""
import os, resource, sys, torch, fastres, fastres.models as fm
from fastres.models import {module}
assert {module}.state() is None  # importing fastres changes nothing
if len(sys.argv) > 1:
    torch.set_num_threads(int(sys.argv[1]))
model = fm.resnet18(num_classes=10).eval()
try:
    with torch.inference_mode():
        model(torch.randn(1, 3, 32, 32))
except ValueError as e:
    print("error:", e)
    sys.exit(0)
print({module}.state())
print({module}.{decide}() == {module}.state())  # once per process
"""
_MALLOC_PROBE = _FIRST_PLAN_PROBE.format(module="_malloc", decide="tune") + r"""
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.empty(6 << 20).fill_(1)  # 24 MiB each: under the mmap threshold once tuned
    b = torch.empty(6 << 20).fill_(1)
    del a, b
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
# Until the heap holds the working set: the tensors' small allocations can land between the blocks, and one round
# in ~6 processes then put a block in fresh memory once (at its second round, ad hoc); never after three.
for _ in range(3):
    faults()
print(max(faults() for _ in range(4)))
"""


def _run_probes(script, unset, runs):
    """script's printed lines for each run (args, env), each in a fresh process without the variables in `unset`,
    with its `env` and `args`: all started at once, since each spends seconds importing torch."""
    import os
    import subprocess
    environ = {k: v for k, v in os.environ.items() if k not in unset}
    procs = [subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**environ, **env}) for args, env in runs]
    results = [proc.communicate() for proc in procs]  # (every process waited for before any assertion)
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 0, err
    return [out.split("\n") for out, _ in results]


def _malloc_probes(*envs):
    return _run_probes(_MALLOC_PROBE, ("FASTRES_CPU_MALLOC", "GLIBC_TUNABLES"), [((), env) for env in envs])


@pytest.mark.skipif(not sys.platform.startswith("linux") or "glibc" not in (platform.libc_ver()[0] or ""),
                    reason="glibc's malloc")
def test_plan_keeps_activations_in_glibcs_heap():
    """The first CPU eval plan of a process raises glibc's mmap and trim thresholds once: repeated 24 MiB
    activations then come from the heap without a page fault, once it holds them (untuned: 12k faults every round).
    FASTRES_CPU_MALLOC=0, or a GLIBC_TUNABLES that sets glibc's malloc, leaves it as it was; another value is refused
    by name."""
    tuned, off, user_tunables, refused = _malloc_probes({}, dict(FASTRES_CPU_MALLOC="0"),
                                                        dict(GLIBC_TUNABLES="glibc.malloc.arena_max=2"),
                                                        dict(FASTRES_CPU_MALLOC="yes"))
    state, once, steady, _ = tuned
    assert state == "glibc malloc tuned by fastres: mmap_threshold 32 MiB, trim_threshold 256 MiB"
    assert once == "True" and int(steady) < 64  # (a few pages of other allocations at most)
    assert off[0] == "glibc malloc as it was (FASTRES_CPU_MALLOC=0)"
    assert user_tunables[0] == "glibc malloc as it was (GLIBC_TUNABLES sets glibc's malloc)"
    assert refused[0] == "error: FASTRES_CPU_MALLOC must be 0 or 1, got 'yes'"


def test_concurrent_callers_get_what_one_caller_gets(graph_body):
    """A model served from several Python threads at once (a thread-pooled server): the calls race through the
    plan's stages (the packed Python loop, the one-call body, the graph build and its Winograd convolutions, blocked
    and three-pass), and every output is bit for bit one that a single caller gets from the same stage, or, where a
    concurrent call ran another split of the work (torch 2.11's oneDNN Graph: ~3e-6 off, ad hoc), within the
    tolerance rule against float64: no state shared between calls, no intermediate written over by another call;
    TorchScript's global oneDNN fusion flag is as it was once they are done."""
    import threading
    fusion_before = torch.jit.onednn_fusion_enabled()
    torch.manual_seed(0)
    model = randomize_(fm.resnet18(num_classes=10)).eval()
    served = copy.deepcopy(model)
    reference = torchvision.models.resnet18(num_classes=10).eval()
    reference.load_state_dict(model.state_dict())
    # batch 4 at 112x112: stage 1 (784 tiles, 64 channels) takes the blocked Winograd form, stage 2 (196 tiles) the
    # three-pass one; batch 1 at 64x64 has no convolution large enough for Winograd
    inputs = [torch.randn(4, 3, 112, 112), torch.randn(1, 3, 64, 64)]
    rounds = 6  # past the graph's build (GRAPH_AFTER forwards, then its warm calls)
    from fastres.testing import max_error
    with torch.inference_mode():
        alone = [{out.numpy().tobytes(): out for out in [model(x) for _ in range(rounds)]} for x in inputs]
        exact = [copy.deepcopy(reference).double()(x.double()) for x in inputs]
        bounds = [2 * max_error(_aten_worse(reference, x, e), e) for x, e in zip(inputs, exact)]
    assert graph_body["built"] == len(inputs) and all(len(outs) == 2 for outs in alone)  # the loop's, the graph's
    for outs, e, bound in zip(alone, exact, bounds):
        assert all(max_error(o, e) <= bound for o in outs.values())
    outputs, errors = [], []

    def serve(k):
        try:
            with torch.inference_mode():
                for i in range(rounds):
                    j = (k + i) % len(inputs)
                    outputs.append((j, served(inputs[j])))
        except BaseException as e:  # noqa: BLE001  (reported by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=serve, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert torch.jit.onednn_fusion_enabled() == fusion_before
    assert len(outputs) == 4 * rounds and graph_body["built"] >= 2 * len(inputs) and graph_body["ran"] > 0
    for j, out in outputs:
        assert out.numpy().tobytes() in alone[j] or max_error(out, exact[j]) <= bounds[j]


@pytest.mark.skipif(not hasattr(torch.jit, "enable_onednn_fusion"), reason="needs TorchScript's oneDNN fusion")
def test_onednn_fusion_flag_restored_after_overlapping_blocks():
    """Two graph calls that overlap (two threads of a server: one enters, the other enters, the first leaves, then
    the second): the flag stays on while either runs, and is as it was before them once both have left."""
    from fastres.models._eval_plan import _onednn_fusion
    before = torch.jit.onednn_fusion_enabled()
    first, second = _onednn_fusion(), _onednn_fusion()
    first.__enter__()
    second.__enter__()
    assert torch.jit.onednn_fusion_enabled()
    first.__exit__(None, None, None)
    assert torch.jit.onednn_fusion_enabled()  # the second is still inside
    second.__exit__(None, None, None)
    assert torch.jit.onednn_fusion_enabled() == before


def test_a_shape_served_often_keeps_its_graph_beside_a_stream_of_others(graph_body):
    """A plan keeps at most _MAX_DERIVED input shapes, the least recently used dropped first: a shape called between
    every other keeps its packs and graph (dropping the oldest rebuilt it every fourth new shape), while the others
    come and go."""
    from fastres.models import _eval_plan
    model = randomize_(fm.resnet18(num_classes=10)).eval()
    hot = torch.randn(1, 3, 64, 64)
    others = [torch.randn(b, 3, 32, 32) for b in range(1, 7)]
    with torch.inference_mode():
        for _ in range(_eval_plan.GRAPH_AFTER + 2):  # the loop's forward, the one-call bodies, the graph's build
            model(hot)
        plan = model.fold_cache.plan
        (hot_key, hot_packs), = plan.packs.items()
        graph = hot_packs[len(plan.units)]
        assert isinstance(graph, _eval_plan._Graph)
        recent = []
        for x in others:
            model(x)
            recent = (recent + [x.shape])[-(_eval_plan._MAX_DERIVED - 1):]
            model(hot)
            assert len(plan.packs) <= _eval_plan._MAX_DERIVED
            assert plan.packs.get(hot_key) is hot_packs and hot_packs[len(plan.units)] is graph
        assert sorted(key[0] for key in plan.packs if key != hot_key) == sorted(recent)
    assert graph_body["built"] == 1


def test_a_graph_runs_without_its_keys_packed_weights(graph_body, per_unit_path):
    """Once a key's graph has run, the key's packed weights (a copy of every conv weight, which only the one-call
    body and the Python loop read) are freed, the fold caches' references included. A call the graph hands back
    (a NaN met a ReLU) packs them again through the Python loop, exactly the per-unit path's result, and they are kept
    from then on; the graph keeps running the other calls, with the same result as before."""
    from fastres.models import _eval_plan
    model = randomize_(fm.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    bad = x.clone()
    bad[0, 1, 5, 7] = float("nan")
    with torch.inference_mode():
        for _ in range(_eval_plan.GRAPH_AFTER + 1):  # the loop's forward, then the one-call bodies
            model(x)
        plan = model.fold_cache.plan
        (packs,) = plan.packs.values()
        units = len(plan.units)
        packed = [weakref.ref(p[1]) for p in packs[:units]]
        graphed = model(x)  # builds and runs the graph
        assert graph_body == {"built": 1, "ran": 1}
        gc.collect()
        assert all(ref() is None for ref in packed)
        assert packs[:units] == [_eval_plan._UNRESOLVED] * units and packs[-2] is _eval_plan._DROPPED
        for unit in plan.units:
            assert not any(key[0] == "packed" for key in unit.cache._entries[unit.name][4])
        got = model(bad)
        with per_unit_path():
            ref_bad = model(bad)
        assert torch.isnan(ref_bad).any()
        torch.testing.assert_close(got, ref_bad, rtol=0, atol=0, equal_nan=True)
        repacked = packs[-2]
        assert type(repacked) is tuple and all(type(p) is tuple for p in packs[:units])
        assert torch.equal(model(x), graphed) and graph_body["ran"] == 2
        assert packs[-2] is repacked  # kept from then on


def test_a_graph_torchscript_cannot_save_is_built_all_the_same(graph_body, per_unit_path, monkeypatch):
    """Where TorchScript cannot save the traced body (the step that gives a graph a compilation unit of its own),
    the graph is frozen from the trace itself: built, run, and within the tolerance rule against float64."""
    from fastres.models import _eval_plan

    def refuse(*args, **kwargs):
        raise RuntimeError("cannot save")

    monkeypatch.setattr(torch.jit, "save", refuse)
    model = randomize_(fm.resnet18(num_classes=10)).eval()
    plain = randomize_(torchvision.models.resnet18(num_classes=10)).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        for _ in range(_eval_plan.GRAPH_AFTER + 2):
            out = model(x)
    assert graph_body == {"built": 1, "ran": 1}  # (built and run by the last call)
    with torch.no_grad():
        ref64 = copy.deepcopy(plain).double()(x.double())
        assert_within("saved nowhere", out, ref64, _aten_worse(plain, x, ref64))


def test_the_graphs_of_a_plan_share_their_winograd_weights(graph_body, monkeypatch):
    """The weights transformed for the Winograd convolutions are made once per plan and shared by the graphs of its
    input shapes, and held by those graphs only: a transform that no graph uses (a convolution below the thresholds
    at every shape built so far) is freed. ResNet-18 at 64x64: batch 6 runs layer1 and layer2 (64 and 128
    channels) as Winograd, batch 8 layer3 (256) too; layer4 (512, 2x2 maps) is too small at both."""
    from fastres.models import _eval_plan
    from fastres.ops import backend_cuda
    if not backend_cuda.WINOGRAD:
        pytest.skip("needs fastres._C's _winograd_conv3x3")
    builds = []  # per graph built: [(output channels, id, weak reference) of each transform its body was given]
    winograd_weight, graph = _eval_plan._Plan.winograd_weight, _eval_plan._Plan._graph

    def recording(self, i, weight):
        transformed = winograd_weight(self, i, weight)
        builds[-1].append((weight.shape[0], id(transformed), weakref.ref(transformed)))
        return transformed

    def building(self, x, *args):
        builds.append([])
        return graph(self, x, *args)

    monkeypatch.setattr(_eval_plan._Plan, "winograd_weight", recording)
    monkeypatch.setattr(_eval_plan._Plan, "_graph", building)
    model = randomize_(fm.resnet18(num_classes=10)).eval()

    def alive(build):
        gc.collect()
        return {(channels, ident) for channels, ident, ref in build if ref() is not None}

    with torch.inference_mode():
        for batch in (6, 8):
            x = torch.randn(batch, 3, 64, 64)
            for _ in range(_eval_plan.GRAPH_AFTER + 2):  # the loop's forward, the one-call bodies, the graph's build
                model(x)
            if batch == 6:
                assert {c for c, _ in alive(builds[0])} == {64, 128}
    assert graph_body["built"] == 2 and [len(b) for b in builds] == [13, 13]
    first, second = alive(builds[0]), alive(builds[1])
    assert {c for c, _ in second} == {64, 128, 256}
    assert first == {(c, i) for c, i in second if c in (64, 128)}  # the same tensors


def test_a_graph_the_plan_drops_frees_its_tensors(graph_body, monkeypatch):
    """A shape's graph, once the plan drops the shape (the least recently used beyond _MAX_DERIVED), leaves nothing
    in memory: TorchScript's global compilation unit kept every traced and frozen graph with its constants for the
    life of the process (~34 MB a graph for ResNet-50 at 112x112). Each graph here is built on tensors of its own
    (copies of the folds, watched by weak references): the dropped shapes' die, the kept shapes' live, and the
    graphs still compute what they did."""
    from fastres.models import _eval_plan
    watched = {}  # batch size -> weak references to the tensors its graph was built on
    plan_folds = _eval_plan._Plan._folds

    def own_copies(self, dtype):
        folds = [(w.clone(), None if b is None else b.clone()) for w, b in plan_folds(self, dtype)]
        watched[self.building] = [weakref.ref(t) for fold in folds for t in fold if t is not None]
        return folds

    graph = _eval_plan._Plan._graph

    def building(self, x, *args):
        self.building = x.shape[0]
        return graph(self, x, *args)

    monkeypatch.setattr(_eval_plan._Plan, "_folds", own_copies)
    monkeypatch.setattr(_eval_plan._Plan, "_graph", building)
    model = randomize_(fm.resnet18(num_classes=10)).eval()
    batches = range(1, _eval_plan._MAX_DERIVED + 3)
    inputs = {b: torch.randn(b, 3, 32, 32) for b in batches}
    with torch.inference_mode():
        for b in batches:
            for _ in range(_eval_plan.GRAPH_AFTER + 2):  # the loop's forward, the one-call bodies, the graph's build
                first = model(inputs[b])
            assert torch.equal(model(inputs[b]), first)
    gc.collect()
    assert graph_body["built"] == len(batches) and sorted(watched) == list(batches)
    kept = {key[0][0] for key in model.fold_cache.plan.packs}
    assert kept == set(batches[-_eval_plan._MAX_DERIVED:])
    for b in batches:
        alive = [ref() is not None for ref in watched[b]]
        assert alive == [b in kept] * len(alive), f"batch {b}: {sum(alive)} of {len(alive)} tensors alive"


# ---------------------------------------------------------------- intra-op threads (fastres.models._threads)
_THREADS_PROBE = _FIRST_PLAN_PROBE.format(module="_threads", decide="pin") + r"""
print(sorted(os.sched_getaffinity(0)))  # the caller's thread (the main thread)
print(sorted(sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task") if int(t) != os.getpid()))
"""


def _threads_probes(*runs):
    """For each (threads, env), the probe's lines: the state, whether pin() decided nothing again, the caller's CPUs,
    the other threads'."""
    return _run_probes(_THREADS_PROBE, ("FASTRES_CPU_PIN",) + _threads.AFFINITY_VARIABLES,
                       [((str(threads),), env) for threads, env in runs])


@pytest.mark.skipif(not sys.platform.startswith("linux") or len(__import__("os").sched_getaffinity(0)) < 2,
                    reason="thread affinity on Linux, with 2 CPUs or more")
def test_plan_pins_each_intra_op_worker_to_a_cpu_of_its_own():
    """The first CPU eval plan of a process, with as many intra-op threads as CPUs, pins each worker thread to a CPU
    of its own, once, never the caller's thread; it leaves them as they were with FASTRES_CPU_PIN=0, with an OpenMP
    affinity setting of the user's, with one thread, or with another thread count than CPUs; another value of
    FASTRES_CPU_PIN is refused by name."""
    import ast
    import os
    cpus = sorted(os.sched_getaffinity(0))
    untouched = ((dict(FASTRES_CPU_PIN="0"), "FASTRES_CPU_PIN=0"),
                 (dict(OMP_PROC_BIND="false"), "OMP_PROC_BIND is set"))
    pinned_run, *untouched_runs, one_thread, more_threads, refused = _threads_probes(
        (len(cpus), {}), *((len(cpus), env) for env, _ in untouched), (1, {}), (len(cpus) + 1, {}),
        (len(cpus), dict(FASTRES_CPU_PIN="yes")))
    state, once, caller, others, _ = pinned_run
    assert state == f"intra-op worker threads pinned by fastres, one to each of CPUs {','.join(map(str, cpus[1:]))}"
    assert once == "True" and ast.literal_eval(caller) == cpus
    pinned = [a for a in ast.literal_eval(others) if a != cpus]
    assert sorted(pinned) == [[c] for c in cpus[1:]]  # each worker on its own CPU, none on the first
    for (state, _, caller, others, _), (_, why) in zip(untouched_runs, untouched):
        assert state == f"intra-op threads as they were ({why})"
        assert ast.literal_eval(caller) == cpus and all(a == cpus for a in ast.literal_eval(others))
    assert one_thread[0] == "intra-op threads as they were (one intra-op thread)"
    assert more_threads[0] == f"intra-op threads as they were ({len(cpus) + 1} intra-op threads on {len(cpus)} CPUs)"
    assert refused[0] == "error: FASTRES_CPU_PIN must be 0 or 1, got 'yes'"


def test_autocast_in_fp32_only_for_an_fp32_model(monkeypatch, per_unit_path):
    """A model with bf16 weights (an fp32 input, which autocast casts) keeps autocast's computation under
    FASTRES_CPU_AUTOCAST=fp32: the per-unit path's result, not a dtype error."""
    monkeypatch.setenv("FASTRES_CPU_AUTOCAST", "fp32")
    model = randomize_(fm.resnet18(num_classes=10)).eval().to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        with per_unit_path():
            ref = model(x)
        outs = [model(x) for _ in range(3)]
    assert model.fold_cache.plan is not None and not model.fold_cache.plan.fp32
    assert all(o.dtype == torch.bfloat16 and torch.equal(o, ref) for o in outs)
