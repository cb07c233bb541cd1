"""Micro-benchmarks of the fused ops beside their ATen counterparts, and of whole blocks and of fastres.flops.

    pytest tests/bench --benchmark-only                       # CPU: fp32, batch 1 (CUDA: bf16, batch 32)
    pytest tests/bench --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Each op is benchmarked on one ResNet-50 shape with the same inputs as benchmarks/kernels.py builds (its rows are
reused here), as a pair: "fastres" and "aten" in one group, so pytest-benchmark's table shows them side by side.
GPU timings synchronize inside the timed call. Whole-model figures come from benchmarks/throughput.py.
"""
import importlib.util
import os
import sys
import types

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
sys.path.insert(0, BENCHMARKS)
# benchmarks/kernels.py, loaded by path: the name `kernels` is also the repository's Triton package folder
_spec = importlib.util.spec_from_file_location("fastres_benchmarks_kernels", os.path.join(BENCHMARKS, "kernels.py"))
kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernels)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
# (op, item): one row each; the CPU shapes keep one call in the milliseconds
ROWS = [("conv_bias_act", "l3.conv2"), ("conv_bias_act", "l3.conv3"), ("conv_bias_act", "stem"),
        ("conv_bn_act", "l3.conv2"), ("bn_relu_conv", "l3.conv2"), ("add_relu", "stage3"), ("bn_act", "stage3+res")]


def maker():
    args = types.SimpleNamespace(device=DEVICE, dtype="bf16" if CUDA else "fp32", batch_size=32 if CUDA else 1,
                                 channels_last=True, tiny=False, seed=0)
    return kernels.Maker(args)


def synchronized(fn):
    if not CUDA:
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out
    return call


@pytest.mark.parametrize("provider", ["fastres", "aten"])
@pytest.mark.parametrize("op,item", ROWS, ids=[f"{op}-{item}" for op, item in ROWS])
def test_fused_op(benchmark, op, item, provider):
    row = kernels.build_row(maker(), op, item)
    if row is None:
        pytest.skip(f"no fused {op} kernel on this backend")
    benchmark.group = f"{op} {item}"
    benchmark.extra_info.update({"flops": row.flops, "bytes": row.bytes, "shape": row.shape,
                                 "backend": kernels.backend_of(op, DEVICE)})
    training = op in ("conv_bn_act", "bn_relu_conv")
    with torch.enable_grad() if training else torch.inference_mode():
        benchmark(synchronized(row.providers[provider]))


@pytest.mark.parametrize("provider", ["fastres", "torchvision"])
def test_bottleneck_block_eval(benchmark, provider):
    """One ResNet-50 stage-3 bottleneck (1024 -> 256 -> 1024 channels, 14x14), eval mode, BN folded by fastres."""
    import torchvision
    import fastres.nn

    torch.manual_seed(0)
    block = (fastres.nn.Bottleneck if provider == "fastres" else torchvision.models.resnet.Bottleneck)(1024, 256)
    dtype = torch.bfloat16 if CUDA else torch.float32
    block = block.to(DEVICE, dtype, memory_format=torch.channels_last).eval()
    x = torch.randn(32 if CUDA else 1, 1024, 14, 14, device=DEVICE, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    benchmark.group = "bottleneck block (eval)"
    with torch.inference_mode():
        benchmark(synchronized(lambda: block(x)))


def test_flops_count_resnet50(benchmark):
    """fastres.flops.count of a meta-device ResNet-50 (what every benchmark run does once per model)."""
    import fastres.flops
    import fastres.models

    with torch.device("meta"):
        model = fastres.models.resnet50()
    benchmark.group = "fastres.flops"
    count = benchmark(fastres.flops.count, model, (1, 3, 224, 224))
    assert count.macs > 0
