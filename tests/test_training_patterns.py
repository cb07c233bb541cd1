"""Patterns of real training code on fastres models: weights changed through any API are seen by the eval fold,
double backward (gradient penalties), and torch.func (vmap, per-sample gradients).

Each fold pattern is checked against a freshly built model loaded with the same weights (which folds from
scratch); double backward and torch.func against torchvision's modules with the same weights.
"""
import copy

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tvr

import fastres
from fastres import ops

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _model(seed=0, make=fastres.models.resnet18):
    torch.manual_seed(seed)
    return make(num_classes=10)


def _cifar(seed=0):
    """A small model for the many patterns: 3 stages, projections (shortcut B), conv weights up to 36864 elements
    (sampled by the cache's check) and BN tensors (compared whole)."""
    return _model(seed, lambda num_classes: fastres.models.cifar_resnet(8, shortcut="B", num_classes=num_classes))


def _assert_matches_fresh(model, make=None, x=X):
    """model's eval output equals that of a newly built model (`make`, default _cifar) loaded with model's state,
    which folds from scratch."""
    fresh = (make or _cifar)(seed=123)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        got, want = model(x), fresh(x)
    assert torch.isfinite(want).all(), "the weights diverged: the comparison would say nothing"
    assert torch.equal(got, want), f"stale fold: max |diff| {(got - want).abs().max().item()}"


def _warm(model):
    """An eval forward that fills the fold cache."""
    model.eval()
    with torch.no_grad():
        model(X)
    assert any(len(m.fold_cache) for m in model.modules() if hasattr(m, "_fastres_fold_cache"))
    return model


def _convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _bns(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


# ------------------------------------------------------------------------------------------------ 1. fold cache
def test_ema_through_data_is_seen_by_the_fold():
    # The EMA loop: one SGD step on the model, `.data` updates of the EMA copy, then its eval forward.
    model = _model()
    ema = copy.deepcopy(model).eval()
    # A small step: at 16x16 and batch 2 layer4's BNs see 2 values per channel, and lr 0.1 diverges to NaN.
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    target = torch.randint(0, 10, (2,), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        model.train()
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), target).backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.data.mul_(0.5).add_(p.data, alpha=0.5)
            for e, b in zip(ema.buffers(), model.buffers()):
                e.data.copy_(b.data)
        _assert_matches_fresh(ema, _model)


def _prune(model):
    g = torch.Generator().manual_seed(2)
    for conv in _convs(model):
        conv.weight.data.mul_((torch.rand(conv.weight.shape, generator=g) > 0.5).float())


def _prune_output_channels(model):
    # Structured pruning: whole output channels zeroed, the rest untouched.
    for conv in _convs(model):
        conv.weight.data[1::2] = 0


def _prune_one_input_channel(model):
    for conv in _convs(model):
        conv.weight.data[:, -1] = 0


def _init_through_data(model):
    for conv in _convs(model):
        nn.init.kaiming_normal_(conv.weight.data)


def _init(model):
    for conv in _convs(model):
        nn.init.kaiming_normal_(conv.weight)
    for bn in _bns(model):
        nn.init.uniform_(bn.weight, 0.5, 1.5)


def _running_var_data(model):
    for bn in _bns(model):
        bn.running_var.data.mul_(3)


def _one_running_stat_element(model):
    for bn in _bns(model):
        bn.running_mean.data[-1] += 1.0


def _bn_affine_data(model):
    for bn in _bns(model):
        bn.weight.data.fill_(0.7)
        bn.bias.data.add_(0.1)


def _detach(model):
    for conv in _convs(model):
        conv.weight.detach().mul_(0.5)


def _copy_under_no_grad(model):
    with torch.no_grad():
        for conv in _convs(model):
            conv.weight.copy_(torch.randn_like(conv.weight) * 0.05)


def _load_state_dict(model):
    model.load_state_dict(_cifar(seed=7).eval().state_dict())


def _optimizer_step(model):
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(X).square().mean().backward()  # eval mode: BN normalizes with the running statistics
    opt.step()


def _set_(model):
    with torch.no_grad():
        for conv in _convs(model):
            conv.weight.set_(torch.randn_like(conv.weight) * 0.05)


def _set_through_data(model):
    for conv in _convs(model):
        conv.weight.data.set_(torch.randn_like(conv.weight) * 0.05)


def _assign_data(model):
    for conv in _convs(model):
        conv.weight.data = conv.weight.data * 0.5


def _replace_parameters(model):
    for conv in _convs(model):
        conv.weight = nn.Parameter(conv.weight.detach() * 0.5)
    for bn in _bns(model):
        bn.running_var = bn.running_var * 2


PATTERNS = {f.__name__.lstrip("_"): f for f in (
    _prune, _prune_output_channels, _prune_one_input_channel, _init_through_data, _init, _running_var_data,
    _one_running_stat_element, _bn_affine_data, _detach, _copy_under_no_grad, _load_state_dict, _optimizer_step,
    _set_, _set_through_data, _assign_data, _replace_parameters)}


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_weight_changes_are_seen_by_the_next_eval_forward(pattern):
    model = _warm(_cifar())
    PATTERNS[pattern](model)
    _assert_matches_fresh(model)


def test_refresh_forces_a_refold():
    model = _warm(_cifar())
    # One element of a large conv weight through `.data`: no version bump, and the cheap check samples 256 of its
    # 36864 elements, so it is documented as unseen; refresh() is the remedy.
    model.layer3[0].conv2.weight.data[3, 7, 1, 1] += 1.0
    assert fastres.refresh(model) is model
    assert all(len(m.fold_cache) == 0 for m in model.modules() if hasattr(m, "_fastres_fold_cache"))
    _assert_matches_fresh(model)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fastres.refresh("model")


def test_unchanged_weights_are_not_refolded(monkeypatch):
    # The check must not degrade into refolding every call (the CPU latency goal rests on the cache).
    model = _warm(_cifar())
    calls = []
    real = ops.fold_bn
    monkeypatch.setattr(ops, "fold_bn", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        model(X)
        with torch.inference_mode():
            model(X)
            model(X)
    assert len(calls) == 9  # inference mode is its own key: the 9 conv + BN pairs folded once there, never again


# ------------------------------------------------------------------------------------------------ 2. double backward
def _random_running_stats_(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for bn in _bns(model):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.3)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.3)
    return model


def _pair(kind):
    """(fastres model, the same network of torchvision's modules with the same weights), float64, random running
    statistics and BN affine."""
    torch.manual_seed(0)
    if kind == "resnet18":  # fastres's stem and BasicBlocks (the lean chain, projections through the dual apply)
        fr, tv = fastres.models.resnet18(num_classes=10), tvr.resnet18(num_classes=10)
    else:  # Bottlenecks in each memory mode: the recomputed tail ("recompute"), the dual apply ("lean")
        fr = tvr.ResNet(fastres.nn.Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=16)
        fastres.nn.set_memory_mode(fr, kind)
        tv = tvr.ResNet(tvr.Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=16)
    _random_running_stats_(fr)
    tv.load_state_dict(fr.state_dict())
    return fr.double(), tv.double()


def _gradient_penalty(model, x, wrt_params=True):
    """R1 / WGAN-GP style: the input gradient's squared norm, differentiated again -> (input gradient, gradients of
    the penalty w.r.t. the parameters, or w.r.t. the input when the parameters are frozen)."""
    xi = x.clone().requires_grad_()
    g, = torch.autograd.grad(model(xi).square().sum(), xi, create_graph=True)
    penalty = (g.flatten(1).norm(dim=1) - 1).square().mean()
    if wrt_params:
        params = [p for p in model.parameters()]
        return g.detach(), torch.autograd.grad(penalty, params)
    return g.detach(), torch.autograd.grad(penalty, xi)


def _assert_close_scaled(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7 * b.abs().max().item(), msg=f"{what}[{i}]")


@pytest.mark.parametrize("kind,mode", [("resnet18", "train"), ("resnet18", "eval"), ("resnet18", "eval-frozen"),
                                       ("recompute", "train"), ("recompute", "eval"), ("lean", "train")])
def test_gradient_penalty_matches_torchvision(kind, mode):
    fr, tv = _pair(kind)
    for m in (fr, tv):
        m.train(mode == "train")
        m.requires_grad_(mode != "eval-frozen")  # frozen: the eval forward runs the cached folds
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got, want = (_gradient_penalty(m, x, wrt_params=mode != "eval-frozen") for m in (fr, tv))
    _assert_close_scaled([got[0]], [want[0]], "input gradient")
    _assert_close_scaled(got[1], want[1], "penalty gradients")


# ------------------------------------------------------------------------------------------------ 3. torch.func
def _eval_pair():
    torch.manual_seed(0)
    fr, tv = fastres.models.resnet18(num_classes=10), tvr.resnet18(num_classes=10)
    _random_running_stats_(fr)
    tv.load_state_dict(fr.state_dict())
    return fr.eval(), tv.eval()


def test_vmap_in_eval_matches_torchvision():
    fr, tv = _eval_pair()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = torch.func.vmap(fr)(x.unsqueeze(1)).squeeze(1)
        want = tv(x)
        assert torch.equal(fr(x), fr(x))  # and the fused path still runs outside vmap
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_per_sample_gradients_match_torchvision():
    # The functorch recipe behind DP-SGD: vmap(grad(loss)) over the batch, parameters passed functionally.
    fr, tv = _eval_pair()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    y = torch.tensor([1, 4, 9])

    def per_sample_grads(model):
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}

        def loss(params, xi, yi):
            out = torch.func.functional_call(model, (params, buffers), (xi.unsqueeze(0),))
            return nn.functional.cross_entropy(out, yi.unsqueeze(0))

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)

    got, want = per_sample_grads(fr), per_sample_grads(tv)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape[0] == 3
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5 * want[k].abs().max().item(), msg=k)
    # Each sample's gradient is that sample's ordinary gradient.
    fr.zero_grad()
    nn.functional.cross_entropy(fr(x[1:2]), y[1:2]).backward()
    torch.testing.assert_close(got["layer2.0.conv1.weight"][1], fr.layer2[0].conv1.weight.grad, rtol=1e-4,
                               atol=1e-6)
