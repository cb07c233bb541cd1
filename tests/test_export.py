"""The ways out of PyTorch: ONNX (the dynamo exporter, through the ops' registered decompositions), TorchScript
(trace: weights stay parameters; script: a clear error, or fastres.fold_bn(..., plain=True)), torch.export."""
import copy
import io
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

import fastres
from model_helpers import randomize_
from tolerance import assert_within


def _eval_resnet(arch, seed=1):
    model = getattr(fastres.models, arch)(num_classes=10)
    return randomize_(model, seed).eval()


def _three_way(model, x):
    """(fastres output, float64 reference, ATen fp32 in channels_last: the layout fastres runs)."""
    reference = copy.deepcopy(model)
    reference.__class__ = torchvision.models.resnet.ResNet
    for block in reference.modules():
        if isinstance(block, fastres.nn.Bottleneck):
            block.__class__ = torchvision.models.resnet.Bottleneck
        elif isinstance(block, fastres.nn.BasicBlock):
            block.__class__ = torchvision.models.resnet.BasicBlock
    with torch.no_grad():
        aten = reference.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        ref64 = copy.deepcopy(reference).double()(x.double())
        return model(x), ref64, aten


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_onnx_dynamo_export_runs_in_onnxruntime(arch, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = _eval_resnet(arch)
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / f"{arch}.onnx"
    torch.onnx.export(model, (x,), dynamo=True).save(str(path))
    op_types = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"Conv", "Relu", "Add"} <= op_types and not any("fastres" in t for t in op_types)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    _, ref64, aten = _three_way(model, x)
    assert_within(f"{arch} in onnxruntime", got, ref64, aten)


def _saved_bytes(traced):
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return buffer.tell()


def test_jit_trace_of_a_fresh_model_keeps_parameters_and_follows_load_state_dict():
    model = _eval_resnet("resnet50")
    x = torch.randn(2, 3, 32, 32)
    traced = torch.jit.trace(model, x)  # fresh: no forward has run (nor filled a fold cache) before
    graph = str(traced.inlined_graph)
    assert "fastres::conv_bias_act" in graph and "fastres::fold_bn" in graph  # the fused ops, folded at run time
    tv_traced = torch.jit.trace(torchvision.models.resnet50(num_classes=10).eval(), x)
    assert abs(_saved_bytes(traced) / _saved_bytes(tv_traced) - 1) < 0.05
    new = randomize_(fastres.models.resnet50(num_classes=10), seed=7).eval()
    traced.load_state_dict(new.state_dict())
    got, ref64, aten = _three_way(new, x)
    with torch.no_grad():
        assert_within("traced after load_state_dict", traced(x), ref64, aten)


def test_jit_script_names_the_supported_paths():
    model = fastres.convert(torchvision.models.resnet18(num_classes=10))
    with pytest.raises(TypeError, match=r"torch\.jit\.trace.*torch\.export"):
        torch.jit.script(nn.Sequential(model))


@pytest.mark.parametrize("source", ["fastres", "converted"])
def test_fold_bn_plain_is_plain_torch_that_scripts_and_exports(source, tmp_path):
    if source == "fastres":
        model = _eval_resnet("resnet18")
    else:
        model = randomize_(fastres.convert(torchvision.models.resnet18(num_classes=10))).eval()
    before = copy.deepcopy(model.state_dict())
    plain = fastres.fold_bn(model, plain=True)
    assert all(a.equal(b) for a, b in zip(model.state_dict().values(), before.values()))  # the model is untouched
    assert type(plain) is torchvision.models.resnet.ResNet
    assert not any(type(m).__module__.startswith("fastres") for m in plain.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    x = torch.randn(2, 3, 32, 32)
    scripted = torch.jit.script(plain)
    _, ref64, aten = _three_way(model, x)
    with torch.no_grad():
        assert_within(f"fold_bn(plain=True) of a {source} model, scripted", scripted(x), ref64, aten)
    try:
        import onnx  # noqa: F401  (the legacy exporter needs it)
    except ImportError:
        return
    torch.onnx.export(plain, (x,), str(tmp_path / "plain.onnx"), dynamo=False)


def test_fold_bn_plain_refuses_fastres_only_classes():
    with pytest.raises(ValueError, match="plain-torch twin"):
        fastres.fold_bn(fastres.models.cifar_resnet(20).eval(), plain=True)


def test_torch_export_keeps_the_fused_ops():
    model = _eval_resnet("resnet18")
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(model, (x,))
    assert "torch.ops.fastres." in str(exported.graph)
    got, ref64, aten = _three_way(model, x)
    with torch.no_grad():
        assert_within("torch.export", exported.module()(x), ref64, aten)


COMPILE_UNDER_CI = """
import torch, fastres.models as fm, fastres.nn as fnn
x = torch.randn(2, 3, 64, 64)
model = fm.ResNet(fnn.BasicBlock, [1, 1, 1, 1], num_classes=10).eval()
assert (torch.compile(model, fullgraph=True)(x) - model(x)).abs().max() < 1e-4
model.train()
torch.compile(model, fullgraph=True)(x).sum().backward()
print("ok")
"""


@pytest.mark.slow
def test_torch_compile_works_where_the_environment_says_ci():
    """The decompositions registered for the ONNX exporter must not break torch.compile where CI is set (GitHub
    Actions sets it): Inductor refuses an implicit fallback for an op that has one. A fresh process, so that no
    earlier compile has registered anything."""
    env = dict(os.environ, CI="true")
    r = subprocess.run([sys.executable, "-c", COMPILE_UNDER_CI], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
