"""fastres.flops.count: exact counts (against torchvision's published figures and an independent count by forward
hooks), fastres models against torchvision, the paper's v1 figures, fastres's fused ops, backward, and that the
model is left untouched and nothing real is allocated."""
import pytest
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

import fastres.models
from fastres import flops, ops

PAPER_GMACS = {"resnet50": 3.8, "resnet101": 7.6, "resnet152": 11.3}


def hook_macs(model, x):
    """Multiply-adds of the Conv2d and Linear modules of one real forward, counted from their outputs' shapes:
    an oracle written independently of FlopCounterMode's formulas."""
    total = 0

    def conv_hook(m, inputs, out):
        nonlocal total
        total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, inputs, out):
        nonlocal total
        total += out.numel() * m.in_features

    handles = [m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def meta_model(fn, **kwargs):
    with torch.device("meta"):  # count() needs shapes only: skip allocating and initializing the weights
        return fn(**kwargs)


# ------------------------------------------------------------------------------------------------ exact counts
@pytest.mark.parametrize("name,published", [("resnet18", 1.814), ("resnet50", 4.089)])
def test_torchvision_counts_equal_published(name, published):
    model = meta_model(getattr(torchvision.models, name))
    c = flops.count(model, (1, 3, 224, 224))
    assert round(c.macs / 1e9, 3) == published  # torchvision's "GFLOPS" are multiply-adds
    assert c.flops == 2 * c.macs
    assert c.params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_count_equals_hook_oracle(name):
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(2, 3, 64, 48)
    assert flops.count(model, tuple(x.shape)).macs == hook_macs(model, x)


def test_macs_scale_with_batch():
    model = meta_model(torchvision.models.resnet18)
    assert flops.count(model, (3, 3, 64, 64)).macs == 3 * flops.count(model, (1, 3, 64, 64)).macs


# ------------------------------------------------------------------------------------------------ fastres models
# Two here; benchmarks/flops.py checks every net of the paper's table the same way, and test_benchmarks runs it.
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_fastres_model_counts_equal_torchvision(name):
    fast = meta_model(getattr(fastres.models, name))
    ref = meta_model(getattr(torchvision.models, name))
    shape = (1, 3, 224, 224)
    assert flops.count(fast, shape).macs == flops.count(ref, shape).macs
    assert flops.count(fast, shape).params == flops.count(ref, shape).params


@pytest.mark.parametrize("name", sorted(PAPER_GMACS))
def test_v1_within_two_percent_of_paper(name):
    v1 = flops.count(meta_model(getattr(fastres.models, name), variant="v1"), (1, 3, 224, 224)).macs
    v15 = flops.count(meta_model(getattr(fastres.models, name), variant="v1.5"), (1, 3, 224, 224)).macs
    assert abs(v1 / (PAPER_GMACS[name] * 1e9) - 1) <= 0.02
    assert v1 < v15  # the 3x3 does the striding in v1.5: it runs at the higher resolution


def test_cifar_resnet_counts_equal_hook_oracle():
    model = fastres.models.cifar_resnet(20).eval()
    x = torch.randn(2, 3, 32, 32)
    assert flops.count(model, (2, 3, 32, 32)).macs == hook_macs(model, x)


# ------------------------------------------------------------------------------------------------ fastres ops
class ConvBN(nn.Module):
    """One conv + BN + ReLU, run through a chosen fastres op (or plain modules)."""

    def __init__(self, path):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.path = path

    def forward(self, x):
        conv, bn = self.conv, self.bn
        if self.path == "conv_bn_act":
            return ops.conv_bn_act(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                   self.training, stride=2, padding=1, residual=None, relu=True)
        if self.path == "conv_bias_act":
            weight, bias = ops.fold_bn(conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var)
            return ops.conv_bias_act(x, weight, bias, stride=2, padding=1, relu=True)
        if self.path == "bn_relu_conv":  # an input-side affine + ReLU, then the conv (BN unused)
            scale, shift = x.new_ones(x.shape[1]), x.new_zeros(x.shape[1])
            return ops.bn_relu_conv(x, scale, shift, conv.weight, stride=2, padding=1, relu=True)
        return torch.relu(bn(conv(x)))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("path,op", [("conv_bn_act", "fastres.conv_bn_act_forward"),
                                     ("conv_bias_act", "fastres.conv_bias_act"),
                                     ("bn_relu_conv", "fastres.bn_relu_conv")])
def test_fastres_ops_count_as_the_conv(path, op, training):
    shape = (2, 3, 17, 15)
    fused = flops.count(ConvBN(path).train(training), shape)
    plain = flops.count(ConvBN("modules").train(training), shape)
    assert plain.macs > 0 and fused.macs == plain.macs
    assert [(layer.path, layer.op) for layer in fused.layers] == [("", op)]


def test_plain_flop_counter_mode_counts_fastres_ops():
    assert {"conv_bias_act", "conv_bn_act_forward", "bn_relu_conv"} <= set(flops.register_flop_formulas())
    assert flops.register_flop_formulas() == flops.register_flop_formulas()  # idempotent
    model, x = ConvBN("conv_bias_act").eval(), torch.randn(2, 3, 8, 8)
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert counter.get_total_flops() == 2 * hook_macs(ConvBN("modules").eval(), x)


# ------------------------------------------------------------------------------------------------ model untouched
def snapshot(model):
    return {name: (t.device, t.data_ptr(), t._version, t.clone())
            for name, t in list(model.named_parameters()) + list(model.named_buffers())}


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("build", [torchvision.models.resnet18, fastres.models.resnet18])
def test_model_not_mutated(build, training):
    model = build().train(training)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        before_out = model(x)
    model.train(training)
    before = snapshot(model)
    c = flops.count(model, (4, 3, 64, 64))
    assert c.training is training and model.training is training
    assert all(m.training is training for m in model.modules())
    after = snapshot(model)
    assert before.keys() == after.keys()
    for name, (device, ptr, version, value) in before.items():
        assert after[name][:3] == (device, ptr, version), name
        assert torch.equal(after[name][3], value), name  # running stats, num_batches_tracked included
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), before_out)


class NonMetaAllocation(TorchDispatchMode):
    """Records every op that produces a tensor on a device other than meta."""

    def __init__(self):
        super().__init__()
        self.real = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type != "meta" for t in tree_leaves(out)):
            self.real.append(str(func))
        return out


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("backward", [False, True])
def test_no_real_tensor_is_computed(training, backward):
    model = fastres.models.resnet18().train(training)
    watcher = NonMetaAllocation()
    with watcher:
        c = flops.count(model, (8, 3, 224, 224), backward=backward)
    assert c.macs > 0
    assert watcher.real == []


# ------------------------------------------------------------------------------------------------ table, params
def test_layers_table():
    model = meta_model(torchvision.models.resnet18)
    c = flops.count(model, (1, 3, 224, 224))
    assert sum(layer.macs for layer in c.layers) == c.macs
    assert sum(layer.share for layer in c.layers) == pytest.approx(1.0)
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert {layer.path for layer in c.layers} == convs | {"fc"}
    by_path = {layer.path: layer for layer in c.layers}
    assert by_path["fc"].op == "aten.addmm" and by_path["fc"].macs == 512 * 1000
    text = c.table()
    assert "layer4.1.conv2" in text and f"{c.macs:,}" in text and str(c) == text
    top = c.table(top=3)
    assert "smaller layers not shown" in top and "layer4.1.conv2" not in top
    assert c.to_dict()["macs"] == c.macs and len(c.to_dict()["layers"]) == len(c.layers)


def test_shared_parameters_counted_once():
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    c = flops.count(model, (5, 6))
    assert c.params == 6 * 6 + 6
    assert c.macs == 2 * 5 * 6 * 6  # ... but its work twice


def test_backward_counts_weight_and_input_grads():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2), nn.Flatten(),
                          nn.Linear(4 * 7 * 7, 10))
    x = torch.randn(2, 3, 16, 16)
    forward = flops.count(model, tuple(x.shape))
    both = flops.count(model, tuple(x.shape), backward=True)
    assert forward.macs == hook_macs(model, x)
    first_conv = 2 * 8 * 16 * 16 * 3 * 9
    # Every layer: weight grad + input grad, each as costly as its forward; no input grad for the input itself.
    assert both.macs == 3 * forward.macs - first_conv
    assert both.backward and sum(layer.macs for layer in both.layers) == both.macs
    assert all(p.grad is None for p in model.parameters())


def test_backward_needs_trainable_parameters():
    model = nn.Conv2d(3, 4, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="backward"):
        flops.count(model, (1, 3, 8, 8), backward=True)


def test_dtype_follows_the_model():
    model = nn.Conv2d(3, 4, 3).to(torch.bfloat16)
    assert flops.count(model, (1, 3, 8, 8)).macs == 4 * 36 * 27
    with pytest.raises(TypeError, match="dtype"):
        flops.count(model, (1, 3, 8, 8), dtype="bf16")


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("shape", [(), (1, 3, 0, 8), (1, 3.0, 8, 8), "1,3,8,8", None, (1, True, 8, 8)])
def test_bad_input_shape(shape):
    with pytest.raises(ValueError, match="input_shape"):
        flops.count(nn.Conv2d(3, 4, 3), shape)


def test_bad_model():
    with pytest.raises(TypeError, match="model"):
        flops.count(lambda x: x, (1, 3, 8, 8))
