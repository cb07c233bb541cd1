"""fastres.convert on torchvision's ResNet family: ResNeXt, Wide ResNet, dilated backbones (segmentation), the
detection body with FrozenBatchNorm2d; the report, strict mode, channels_last between blocks."""
import copy
import logging

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tvr
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozenBN

import fastres
from model_helpers import count_lean_blocks, randomize_
from test_nn import assert_runs_match, set_mode
from tolerance import assert_within

FAMILIES = {
    "resnext": dict(block=tvr.Bottleneck, layers=[1, 1, 1, 1], groups=4, width_per_group=8),
    "wide": dict(block=tvr.Bottleneck, layers=[1, 1, 1, 1], width_per_group=128),
    "dilated": dict(block=tvr.Bottleneck, layers=[1, 2, 1, 1], replace_stride_with_dilation=[False, True, True]),
    "basic": dict(block=tvr.BasicBlock, layers=[1, 1, 1, 1]),
}


def _family(name):
    model = randomize_(tvr.ResNet(num_classes=10, **FAMILIES[name]))
    return model, copy.deepcopy(model), copy.deepcopy(model).double()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_convert_family_eval_and_training_step(family):
    model, baseline, ref = _family(family)
    params = list(model.parameters())
    keys = model.state_dict().keys()
    assert fastres.convert(model) is model
    assert all(a is b for a, b in zip(model.parameters(), params)) and model.state_dict().keys() == keys
    report = fastres.convert_report(model)
    assert report.convs_fused == report.convs_total, str(report)
    # ATen in the layout fastres runs (channels_last): the layouts' errors differ on these ill-conditioned nets
    # (a ReLU input near zero flips differently), and the rule compares with ATen's in the same layout.
    # A fixed input: in a whole network's training step a ReLU input near zero flips between any two computations
    # at random, ATen's own layouts included (with other draws ATen channels_last's input grad is off by 1.5e-4 as
    # often as fastres's), so a random draw would test luck, not the kernels (machines.md).
    baseline = baseline.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)).contiguous(
        memory_format=torch.channels_last)
    for training in (False, True):
        set_mode(training, model, baseline, ref)
        assert_runs_match(model, baseline, ref, x, f"{family} training={training}", per_tensor=False)


@pytest.mark.parametrize("family", ["resnext", "dilated"])
def test_grouped_and_dilated_blocks_train_through_the_lean_chain(family, monkeypatch):
    model, _, _ = _family(family)
    fastres.convert(model).train()
    ran = count_lean_blocks(monkeypatch)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert ran and all(ran), f"{ran.count(False)} of {len(ran)} blocks left the lean chain"


def test_blocks_hand_channels_last_to_each_other():
    model = fastres.convert(randomize_(tvr.resnet18(num_classes=10)).eval())
    seen = []
    for block in model.modules():
        if isinstance(block, fastres.nn.BasicBlock):
            block.register_forward_pre_hook(
                lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))  # an NCHW input
    assert len(seen) == 8 and all(seen)


def _detection_body():
    backbone = randomize_(tvr.resnet18(norm_layer=TorchvisionFrozenBN))
    return IntermediateLayerGetter(backbone, return_layers={"layer2": "0", "layer4": "1"}).eval()


def test_detection_body_with_frozen_bn_fuses_the_stem():
    body = _detection_body()
    ref, aten = copy.deepcopy(body).double(), copy.deepcopy(body)
    fastres.convert(body)
    assert isinstance(body, IntermediateLayerGetter) is False and list(body.return_layers) == ["layer2", "layer4"]
    report = fastres.convert_report(body)
    assert report.convs_fused == report.convs_total == 20, str(report)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, want, tv = body(x), ref(x.double()), aten(x)
    assert list(got) == ["0", "1"]
    for k in got:
        assert_within(f"feature {k}", got[k], want[k], tv[k])


def test_report_lists_what_it_leaves_alone_and_strict_raises(caplog):
    model = randomize_(tvr.ResNet(tvr.BasicBlock, [1, 1, 1, 1], num_classes=10))
    model.layer1[0].bn1 = nn.GroupNorm(2, 64)  # no kernel runs a GroupNorm
    model.head = nn.Sequential(nn.Conv2d(512, 8, 1), nn.BatchNorm2d(8))  # a pair outside any known module
    with caplog.at_level(logging.INFO, logger="fastres.convert"):
        fastres.convert(copy.deepcopy(model))
    assert "converted 4 blocks and 1 other module, 11/13 convs" in caplog.text and "layer1.0.conv1 (GroupNorm" in caplog.text
    with pytest.raises(ValueError, match=r"2 conv \+ norm pairs stay unfused: layer1.0.conv1.*head.0"):
        fastres.convert(model, strict=True)


def test_convert_of_nothing_known_warns(caplog):
    with caplog.at_level(logging.INFO, logger="fastres.convert"):
        fastres.convert(nn.Sequential(nn.Conv2d(3, 3, 1)))
    assert any(r.levelno == logging.WARNING and "converted 0 blocks" in r.message for r in caplog.records)


def test_convert_rejects_a_non_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fastres.convert("resnet50")
