"""fastres.nn.convert_sync_batchnorm / SyncBatchNorm: k processes with batch B each train like one process with the
k*B batch (outputs, input and weight grads, running statistics), inside DistributedDataParallel on gloo with CPU
tensors; one collective per BN layer in forward and one in backward; conversion keeps the fused ReLU and residual.

The two-process run uses torch.multiprocessing (spawn) and a free port on 127.0.0.1; its results are held to
tests/tolerance.py's rule against the same network run on the whole batch by plain torch modules in fp32 (ATen)
and in float64.
"""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastres.models as fm
import fastres.nn as fnn
from fastres.nn import _collectives, _lean
from tolerance import assert_within

WORLD = 2
BATCH = 2  # per process
STEPS = 2


# ------------------------------------------------------------------------------------------------ models
def make_models():
    """Small networks covering every BN placement: the fused stem (CifarResNet), BasicBlocks with identity and
    projection shortcuts, Bottlenecks (stride 2 with projection, identity; in both memory modes), and a
    BatchNorm2d outside any block."""
    torch.manual_seed(0)
    cifar = fm.cifar_resnet(8, shortcut="B", num_classes=5)
    ds = nn.Sequential(fnn.conv1x1(8, 16, 2), nn.BatchNorm2d(16))
    bottlenecks = nn.Sequential(fnn.Bottleneck(8, 4, 2, ds), fnn.Bottleneck(16, 4), nn.BatchNorm2d(16),
                                nn.Conv2d(16, 4, 1))
    g = torch.Generator().manual_seed(1)
    for model in (cifar, bottlenecks):
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                    m.momentum = None if m.num_features == 4 else 0.1  # both running-average modes
    recompute = fnn.set_memory_mode(copy.deepcopy(bottlenecks), "recompute")
    return {"cifar": (cifar, (3, 8, 8)), "bottleneck": (bottlenecks, (8, 7, 7)),
            "bottleneck-recompute": (recompute, (8, 7, 7))}


def make_data(model, shape):
    """STEPS whole batches and upstream grads, the same in every process."""
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn((WORLD * BATCH,) + shape, generator=g) for _ in range(STEPS)]
    with torch.no_grad():
        out_shape = copy.deepcopy(model).eval()(xs[0]).shape
    return xs, [torch.randn(out_shape, generator=g) for _ in range(STEPS)]


def plain_torch(model):
    """The same network running only torch modules (a hook on each ReLU makes fastres blocks call their modules
    as torchvision does)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.register_forward_hook(lambda *args: None)
    return model


def run_steps(model, xs, grad_outs, rows=slice(None), grad_scale=1.0):
    """STEPS training forwards/backwards on xs[i][rows]: [(output, input grad, {param: grad})] per step."""
    results = []
    for x, g in zip(xs, grad_outs):
        model.zero_grad(set_to_none=True)
        dtype = next(model.parameters()).dtype
        xi = x[rows].to(dtype).requires_grad_()
        out = model(xi)
        out.backward(g[rows].to(dtype))
        grads = {n.removeprefix("module."): p.grad.detach() * grad_scale for n, p in model.named_parameters()}
        results.append((out.detach(), xi.grad.detach(), grads))
    return results


def buffers(model):
    return {n.removeprefix("module."): b.detach().clone() for n, b in model.named_buffers()}


# ------------------------------------------------------------------------------------------------ the workers
def _worker(rank, port, out_dir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        calls = {"gather": 0, "reduce": 0}
        real_gather, real_reduce = _collectives.gather_stats, _collectives.all_reduce_sums

        def gather(*args):
            calls["gather"] += 1
            return real_gather(*args)

        def reduce(*args):
            calls["reduce"] += 1
            return real_reduce(*args)

        _collectives.gather_stats, _collectives.all_reduce_sums = gather, reduce
        results = {}
        for name, (model, shape) in make_models().items():
            n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
            xs, grad_outs = make_data(model, shape)
            model = nn.parallel.DistributedDataParallel(fnn.convert_sync_batchnorm(model))
            calls.update(gather=0, reduce=0)
            rows = slice(rank * BATCH, (rank + 1) * BATCH)
            # DDP averages the parameter grads over the processes: times WORLD, they are the whole batch's sums.
            steps = run_steps(model, xs, grad_outs, rows, grad_scale=WORLD)
            results[name] = {"steps": steps, "buffers": buffers(model), "calls": dict(calls), "n_bn": n_bn}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


# ------------------------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("name", ["cifar", "bottleneck", "bottleneck-recompute"])
def test_two_gloo_processes_train_like_one_process_on_the_whole_batch(two_process_results, name):
    model, shape = make_models()[name]
    xs, grad_outs = make_data(model, shape)
    aten = plain_torch(model)
    ref = plain_torch(model).double()
    aten_steps, ref_steps = run_steps(aten, xs, grad_outs), run_steps(ref, xs, grad_outs)
    for step in range(STEPS):
        o_ref, gx_ref, gw_ref = ref_steps[step]
        o_tv, gx_tv, gw_tv = aten_steps[step]
        outs = [r[name]["steps"][step] for r in two_process_results]
        what = f"{name} step {step}"
        assert_within(f"{what} output", torch.cat([o for o, _, _ in outs]), o_ref, o_tv)
        assert_within(f"{what} input grad", torch.cat([gx for _, gx, _ in outs]), gx_ref, gx_tv)
        for rank_grads in (outs[0][2], outs[1][2]):
            assert set(rank_grads) == set(gw_ref)
            for p in gw_ref:
                assert_within(f"{what} grad of {p}", rank_grads[p], gw_ref[p], gw_tv[p])
    b_ref, b_tv = buffers(ref), buffers(aten)
    for rank in range(WORLD):
        b = two_process_results[rank][name]["buffers"]
        assert set(b) == set(b_ref)
        for n in b_ref:
            if n.endswith("num_batches_tracked"):
                assert torch.equal(b[n], b_tv[n]), n
            else:
                assert_within(f"{name} rank {rank} {n}", b[n], b_ref[n], b_tv[n])


@pytest.mark.parametrize("name", ["cifar", "bottleneck", "bottleneck-recompute"])
def test_one_collective_per_bn_layer_in_forward_and_in_backward(two_process_results, name):
    for r in two_process_results:
        res = r[name]
        assert res["calls"] == {"gather": STEPS * res["n_bn"], "reduce": STEPS * res["n_bn"]}


# ------------------------------------------------------------------------------------------------ one process
def test_converted_model_keeps_fused_blocks_params_and_state_dict():
    model, _ = make_models()["bottleneck"]
    params = {n: p for n, p in model.named_parameters()}
    keys = set(model.state_dict())
    bn = model[0].bn1
    hook = bn.register_forward_hook(lambda *a: None)
    converted = fnn.convert_sync_batchnorm(model)
    assert converted is model
    assert type(model[0]) is fnn.Bottleneck and type(model[0].relu) is nn.ReLU  # block, fused ReLU kept
    assert type(model[0].bn1) is fnn.SyncBatchNorm and type(model[0].downsample[1]) is fnn.SyncBatchNorm
    assert type(model[2]) is fnn.SyncBatchNorm
    assert all(p is params[n] for n, p in model.named_parameters())  # optimizer state stays valid
    assert set(model.state_dict()) == keys
    assert model[0].bn1._forward_hooks and hook.id in model[0].bn1._forward_hooks
    root = fnn.convert_sync_batchnorm(nn.BatchNorm2d(3))
    assert type(root) is fnn.SyncBatchNorm and root.num_features == 3


def test_converted_model_without_a_process_group_is_the_unconverted_one():
    model, shape = make_models()["bottleneck"]
    converted = fnn.convert_sync_batchnorm(copy.deepcopy(model))
    x = torch.randn((4,) + shape)
    for training in (True, False):
        model.train(training)
        converted.train(training)
        torch.testing.assert_close(converted(x), model(x), rtol=0, atol=0)
    for a, b in zip(model.buffers(), converted.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sync_batchnorm_keeps_fused_relu_and_residual_in_training():
    """The trap of PyTorch's and timm's converters: a block's fused activation and shortcut must survive."""
    model, shape = make_models()["bottleneck"]
    converted = fnn.convert_sync_batchnorm(copy.deepcopy(model)).train()
    reference = plain_torch(model).train()
    x = torch.randn((4,) + shape)
    torch.testing.assert_close(converted(x), reference(x), rtol=1e-5, atol=1e-5)
    out = converted[:2](x)
    assert (out >= 0).all()  # the blocks' ReLU ran


def test_convert_refuses_batchnorm_subclasses_naming_them():
    class BatchNormAct2d(nn.BatchNorm2d):  # timm-style: BN with a fused activation in forward
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4))
    with pytest.raises(TypeError, match=r"1 .*BatchNormAct2d.*activation"):
        fnn.convert_sync_batchnorm(model)
    with pytest.raises(TypeError, match="must be an nn.Module"):
        fnn.convert_sync_batchnorm("model")
    with pytest.raises(TypeError, match="process_group"):
        fnn.convert_sync_batchnorm(nn.BatchNorm2d(3), process_group="world")
    frozen = nn.Sequential(fnn.FrozenBatchNorm2d(3))
    assert type(fnn.convert_sync_batchnorm(frozen)[0]) is fnn.FrozenBatchNorm2d


def test_sync_batchnorm_bad_input():
    bn = fnn.SyncBatchNorm(4)
    with pytest.raises(ValueError, match="channels"):
        bn(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="2-D to 5-D"):
        bn(torch.randn(4))


def test_lean_stats_match_batchnorm_on_1d_and_3d_inputs():
    """The standalone math (used for synchronized non-4-D inputs) against nn.BatchNorm, in one process."""
    for shape in ((6, 4), (3, 4, 2, 3, 2)):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        gamma = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
        beta = torch.randn(4, dtype=torch.float64, requires_grad=True)
        mean, invstd, count = _lean.batch_stats(x, nn.BatchNorm1d(4, track_running_stats=False), None)
        y = _lean._BnAddRelu.apply(x, gamma, beta, mean, invstd, count, None, None, None, None, None, None, None,
                                   True, None, None, 1e-5, None)
        expected = torch.relu(torch.nn.functional.batch_norm(x, None, None, gamma, beta, True))
        torch.testing.assert_close(y, expected)
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, gamma, beta), g)
        want = torch.autograd.grad(expected, (x, gamma, beta), g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        # Twice differentiable (the batch statistics recomputed from x under create_graph=True).
        assert torch.autograd.gradgradcheck(
            lambda x, gamma, beta: _lean._BnAddRelu.apply(x, gamma, beta, mean, invstd, count, None, None, None, None,
                                                          None, None, None, True, None, None, 1e-5, None),
            (x, gamma, beta), fast_mode=True)


# ------------------------------------------------------------------------------------------------ gradient layout
# (model memory format, input memory format): a contiguous model fed NHWC input is where ATen's convolution backward
# returns a 1x1 weight's gradient with NHWC strides, which still counts as "contiguous".
LAYOUTS = {"contiguous": (torch.contiguous_format, torch.contiguous_format),
           "contiguous-model-nhwc-input": (torch.contiguous_format, torch.channels_last),
           "channels_last": (torch.channels_last, torch.channels_last)}


def _layout_models():
    torch.manual_seed(0)
    ds = nn.Sequential(fnn.conv1x1(16, 32, 2), nn.BatchNorm2d(32))
    default = nn.Sequential(fnn.Bottleneck(16, 8, 2, ds), fnn.Bottleneck(32, 8), nn.Conv2d(32, 4, 1))
    return {"default": default, "recompute": fnn.set_memory_mode(copy.deepcopy(default), "recompute")}


def _layout_worker(rank, port, out_dir):
    import warnings
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        mismatches = {}
        # DDP warns ("Grad strides do not match bucket view strides") and copies when a gradient's strides differ
        # from its parameter's: as an error here.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for layout, (model_fmt, input_fmt) in LAYOUTS.items():
                for mode, model in _layout_models().items():
                    ddp = nn.parallel.DistributedDataParallel(model.to(memory_format=model_fmt))
                    g = torch.Generator().manual_seed(rank)
                    x = torch.randn(BATCH, 16, 6, 6, generator=g).contiguous(memory_format=input_fmt)
                    ddp(x).square().mean().backward()
                    mismatches[f"{layout}/{mode}"] = [
                        (n, tuple(p.stride()), tuple(p.grad.stride())) for n, p in ddp.module.named_parameters()
                        if p.grad is None or p.grad.stride() != p.stride()]
        torch.save(mismatches, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_gets_weight_gradients_in_their_parameters_strides_without_warnings(tmp_path):
    mp.spawn(_layout_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        mismatches = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(mismatches) == {f"{l}/{m}" for l in LAYOUTS for m in ("default", "recompute")}
        for case, bad in mismatches.items():
            assert not bad, f"rank {rank}, {case}: (param, its strides, its grad's strides): {bad}"
