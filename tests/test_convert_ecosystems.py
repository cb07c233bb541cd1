"""fastres.convert on timm's and Hugging Face transformers' ResNets: the same modules, parameters and state_dict keys,
the same outputs and training step (tests/tolerance.py's rule against the unconverted model in fp32 and float64),
and the convs running through fastres (fastres.convert_report)."""
import copy
import importlib.util
import io
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastres
from model_helpers import count_lean_blocks, randomize_
from tolerance import assert_model_grads_within, assert_within, max_error


# ------------------------------------------------------------------------------------------------ helpers


def converted_pair(model):
    """(model converted in place, an unconverted copy), after checking that conversion kept every parameter object,
    state_dict key and module name."""
    baseline = copy.deepcopy(model)
    params = list(model.parameters())
    names = [n for n, _ in model.named_modules()]
    assert fastres.convert(model) is model
    assert all(a is b for a, b in zip(model.parameters(), params)) and len(list(model.parameters())) == len(params)
    assert model.state_dict().keys() == baseline.state_dict().keys()
    assert [n for n, _ in model.named_modules()] == names
    return model, baseline


def _worse(runs, ref):
    return max(runs, key=lambda t: max_error(t, ref))


def check_step(model, baseline, x, what, output=lambda out: out):
    """One forward (+ backward in training) of the converted `model`, its unconverted `baseline` in fp32 (NCHW and
    channels_last: the converted model runs channels_last inside, and the rule's bar is ATen's worse layout) and in
    float64. Outputs, input grads, all weight grads (the whole-model rule) and buffers are held to the rule. Every run
    starts from the same seed (stochastic depth draws the same)."""
    training = model.training
    ref = copy.deepcopy(baseline).double()
    other = copy.deepcopy(baseline).to(memory_format=torch.channels_last)
    runs, grad_out = [], None
    for m, layout in ((ref, torch.contiguous_format), (baseline, torch.contiguous_format),
                      (other, torch.channels_last), (model, torch.contiguous_format)):
        dtype = next(m.parameters()).dtype
        m.zero_grad(set_to_none=True)
        xi = x.detach().clone().to(dtype).contiguous(memory_format=layout).requires_grad_(training)
        torch.manual_seed(7)
        with torch.set_grad_enabled(training):
            out = output(m(xi))
        if training:
            if grad_out is None:
                grad_out = torch.randn(out.shape, dtype=torch.float64)
            out.backward(grad_out.to(dtype))
        runs.append((out.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (o_ref, gx_ref, gw_ref), (o_tv, gx_tv, gw_tv), (o_cl, gx_cl, gw_cl), (o_fr, gx_fr, gw_fr) = runs
    assert_within(f"{what} output", o_fr, o_ref, _worse([o_tv, o_cl], o_ref))
    if training:
        assert_within(f"{what} input grad", gx_fr, gx_ref, _worse([gx_tv, gx_cl], gx_ref))
        assert_model_grads_within(what, gw_fr, gw_ref, [gw_tv, gw_cl])
    b_ref, b_tv = dict(ref.named_buffers()), dict(baseline.named_buffers())
    for name, b in model.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b, b_tv[name]), f"{what} {name}: {b} != {b_tv[name]}"
        else:
            assert_within(f"{what} {name}", b, b_ref[name], b_tv[name])
    return o_fr


def check_eval_and_training(model, baseline, x, what, output=lambda out: out):
    for training in (False, True):
        model.train(training)
        baseline.train(training)
        check_step(model, baseline, x, f"{what} training={training}", output)


def left_alone_only(report, allowed):
    """Every conv fastres does not run is one of `allowed` (a predicate on (name, why))."""
    others = {n: why for n, why in report.left_alone.items() if not allowed(n, why)}
    assert not others, f"left alone: {others}"


# ------------------------------------------------------------------------------------------------ timm
def timm_resnet(**kwargs):
    from timm.models import resnet

    kwargs.setdefault("block", resnet.Bottleneck)
    kwargs.setdefault("channels", (8, 8, 16, 16))  # small and fast; the stem keeps timm's 64 channels
    torch.manual_seed(0)
    return randomize_(resnet.ResNet(layers=[1, 1, 1, 1], num_classes=10, **kwargs))


def _grouped(name, why):
    return why.startswith("groups=")


def _se(name, why):
    return ".se." in name


TIMM_FAMILY = {
    "resnet50": (dict(), None),
    "resnet18": (dict(block="BasicBlock"), None),
    "resnet50d": (dict(stem_type="deep", stem_width=16, avg_down=True), None),
    "resnext50_32x4d": (dict(cardinality=4, base_width=8), _grouped),
    "seresnet50": (dict(block_args=dict(attn_layer="se")), _se),
    "wide_resnet50_2": (dict(base_width=128), None),
    "drop_path": (dict(drop_path_rate=0.3), None),
    "silu": (dict(act_layer=nn.SiLU), None),
}


@pytest.mark.parametrize("family", list(TIMM_FAMILY))
def test_convert_timm_resnet_family_keeps_weights_outputs_and_training_step(family):
    timm = pytest.importorskip("timm")
    kwargs, allowed = TIMM_FAMILY[family]
    if kwargs.get("block") == "BasicBlock":
        kwargs = dict(kwargs, block=timm.models.resnet.BasicBlock)
    model, baseline = converted_pair(timm_resnet(**kwargs))
    swapped = [m for m in model.modules() if type(m).__module__ == "fastres._convert.timm"]
    assert len(swapped) == 5 and all(isinstance(m, fastres.nn.blocks._FusedBlock) for m in swapped[1:])
    assert isinstance(model, timm.models.resnet.ResNet) and type(model).__name__ == "ResNet"
    report = fastres.convert_report(model)
    assert report.blocks == 4 and len(report.swapped) == 5 and report.convs_fused > 0
    left_alone_only(report, allowed or (lambda n, why: False))
    # 64x64, batch 4: the last stage's training BNs see 16 values per channel. A BN over few values amplifies its
    # input's rounding up to 1/sqrt(eps) times, so that any two fp32 implementations differ by luck: at 32x32 (4
    # values) fastres's resnet50d gradients ranged 0.6-2.4x ATen's worse layout's error over 8 seeds on an AVX2 AMD
    # EPYC (2.4x on one, while each block alone, fed float64's inputs, stays within ATen's), at 64x64 0.5-1.25x.
    check_eval_and_training(model, baseline, torch.randn(4, 3, 64, 64), family)


def test_convert_timm_resnet50_reports_every_conv_and_trains_through_the_lean_chain(monkeypatch):
    timm = pytest.importorskip("timm")
    model = fastres.convert(timm.create_model("resnet50", pretrained=False, num_classes=10))
    report = fastres.convert_report(model)
    assert (report.blocks, report.convs_fused, report.convs_total, report.left_alone) == (16, 53, 53, {})
    assert str(report) == "converted 16 blocks and 1 other module, 53/53 convs through fastres"
    block = randomize_(model.layer2[0]).train()  # the stride-2 block with its projection
    baseline = copy.deepcopy(block)
    baseline.__class__ = timm.models.resnet.Bottleneck
    calls = count_lean_blocks(monkeypatch)
    check_step(block, baseline, torch.randn(2, 256, 8, 8), "resnet50 layer2.0")
    assert calls == [True]
    calls.clear()
    block.eval()(torch.randn(2, 256, 8, 8))  # eval runs the folded units, never the lean chain
    assert calls == []


def test_convert_timm_lean_chain_only_where_the_block_is_plain(monkeypatch):
    pytest.importorskip("timm")
    calls = count_lean_blocks(monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    fastres.convert(timm_resnet(stem_type="deep", avg_down=True)).train()(x)
    assert calls == [True] * 4  # the average-pool shortcut is called as a (fused) module by the chain
    calls.clear()
    fastres.convert(timm_resnet(block_args=dict(attn_layer="se"))).train()(x)
    assert calls == []  # SE sits before the add: each unit runs fused on its own


def test_convert_timm_root_methods_features_and_head():
    pytest.importorskip("timm")
    model, baseline = converted_pair(timm_resnet(stem_type="deep", stem_width=16))
    model.eval()
    baseline.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.is_contiguous(memory_format=torch.channels_last)
        ref = copy.deepcopy(baseline).double()
        assert_within("forward_features", features, ref.forward_features(x.double()), baseline.forward_features(x))
        assert_within("forward_head", model.forward_head(features, pre_logits=True),
                      ref.forward_head(ref.forward_features(x.double()), pre_logits=True),
                      baseline.forward_head(baseline.forward_features(x), pre_logits=True))
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    model.set_grad_checkpointing(True)
    model.train()
    model(x).sum().backward()
    assert model.conv1[0].weight.grad is not None


def test_convert_timm_hooks_fire_and_modules_pickle():
    pytest.importorskip("timm")
    model, baseline = converted_pair(timm_resnet(block_args=dict(attn_layer="se")))
    model.eval()
    seen = []
    handles = [m.register_forward_hook(lambda m, i, o: seen.append(o.shape))
               for m in (model.layer1[0].act2, model.layer1[0].se, model.bn1)]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_within("hooked", model(x), copy.deepcopy(baseline).double().eval()(x.double()), baseline.eval()(x))
    assert len(seen) == 3
    for handle in handles:
        handle.remove()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.layer1[0]) is type(model.layer1[0])
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_convert_timm_strict_raises_on_an_unfused_norm():
    pytest.importorskip("timm")
    model = timm_resnet(norm_layer=lambda channels, **kw: nn.GroupNorm(4, channels, **kw))
    with pytest.raises(ValueError, match=r"strict=True.*conv \+ norm pairs stay unfused: conv1 \(GroupNorm"):
        fastres.convert(model, strict=True)
    assert fastres.convert(timm_resnet(), strict=True).layer1[0].conv1.weight is not None


# ------------------------------------------------------------------------------------------------ transformers
def hf_config(**kwargs):
    transformers = pytest.importorskip("transformers")
    return transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1],
                                     num_labels=10, **kwargs)


def hf_model(cls_name="ResNetForImageClassification", **kwargs):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return randomize_(getattr(transformers, cls_name)(hf_config(**kwargs)))


HF_FAMILY = {
    "bottleneck": dict(layer_type="bottleneck"),
    "basic": dict(layer_type="basic"),
    "downsample-in-bottleneck-and-first-stage": dict(layer_type="bottleneck", downsample_in_bottleneck=True,
                                                     downsample_in_first_stage=True),
    "gelu": dict(layer_type="bottleneck", hidden_act="gelu"),
}


@pytest.mark.parametrize("family", list(HF_FAMILY))
def test_convert_transformers_resnet_keeps_weights_outputs_and_training_step(family):
    model, baseline = converted_pair(hf_model(**HF_FAMILY[family]))
    report = fastres.convert_report(model)
    assert report.convs_fused == report.convs_total and report.left_alone == {}
    check_eval_and_training(model, baseline, torch.randn(2, 3, 32, 32), family, output=lambda out: out.logits)


def test_convert_transformers_outputs_hidden_states_and_tuples():
    model, baseline = converted_pair(hf_model("ResNetModel"))
    model.eval()
    baseline.eval()
    x = torch.randn(2, 3, 32, 32)
    ref = copy.deepcopy(baseline).double()
    with torch.no_grad():
        got, want, aten = (m(x.to(dtype), output_hidden_states=True)
                           for m, dtype in ((model, torch.float32), (ref, torch.float64), (baseline, torch.float32)))
        assert len(got.hidden_states) == len(want.hidden_states) == 5
        for i, (g, r, a) in enumerate(zip(got.hidden_states, want.hidden_states, aten.hidden_states)):
            assert_within(f"hidden state {i}", g, r, a)
        assert_within("pooler_output", got.pooler_output, want.pooler_output, aten.pooler_output)
        as_tuple = model(x, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], got.last_hidden_state)
    with pytest.raises(ValueError, match="channel dimension"):
        model(torch.randn(2, 4, 32, 32))


def test_convert_transformers_resnet50_reports_every_conv_and_trains_through_the_lean_chain(monkeypatch):
    transformers = pytest.importorskip("transformers")
    model = fastres.convert(transformers.ResNetModel(transformers.ResNetConfig()))  # microsoft/resnet-50's shape
    report = fastres.convert_report(model)
    assert (report.convs_fused, report.convs_total, report.left_alone) == (53, 53, {})
    layers = [m for m in model.modules() if type(m).__name__ == "ResNetBottleNeckLayer"]
    assert len(layers) == 16 and all(isinstance(m, fastres.nn.blocks._FusedBlock) for m in layers)
    calls = count_lean_blocks(monkeypatch)
    small = fastres.convert(hf_model("ResNetModel")).train()
    small(torch.randn(2, 3, 32, 32))
    assert calls == [True] * 4


def test_convert_transformers_hooks_fire():
    model, baseline = converted_pair(hf_model())
    model.eval()
    seen = []
    layer = model.resnet.encoder.stages[1].layers[0]
    layer.layer[1].register_forward_hook(lambda m, i, o: seen.append("conv layer"))
    layer.shortcut.register_forward_hook(lambda m, i, o: seen.append("shortcut"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_within("hooked", model(x).logits, copy.deepcopy(baseline).double().eval()(x.double()).logits,
                      baseline.eval()(x).logits)
    assert seen == ["conv layer", "shortcut"]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kernels_package_folder(cwd):
    """The folder `import kernels` would load in a Python started in cwd (whose sys.path begins with cwd)."""
    code = "import importlib.util, os; s = importlib.util.find_spec('kernels'); " \
           "print(os.path.dirname(os.path.realpath(s.origin)) if s and s.origin else '')"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip()


def test_python_m_pytest_from_the_root_imports_hugging_faces_kernels():
    """`python -m pytest` from the repository root: its kernels/ folder (fastres.kernels) would shadow the `kernels`
    package transformers imports; tests/conftest.py puts the root behind the installed packages."""
    if os.environ.get("FASTRES_SHADOW_PROBE") == "1":  # the run below, started as `python -m pytest` in the root
        spec = importlib.util.find_spec("kernels")
        assert spec is not None and os.path.dirname(os.path.realpath(spec.origin)) != os.path.join(ROOT, "kernels")
        return
    installed = _kernels_package_folder(os.sep)
    if not installed:
        pytest.skip("Hugging Face's kernels package is not installed: nothing to shadow")
    assert _kernels_package_folder(ROOT) == os.path.join(ROOT, "kernels")  # the trap, without conftest.py
    node = "tests/test_convert_ecosystems.py::test_python_m_pytest_from_the_root_imports_hugging_faces_kernels"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", node],
                         cwd=ROOT, env={**os.environ, "FASTRES_SHADOW_PROBE": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
