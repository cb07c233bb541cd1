"""Per-layer speed of the Triton conv kernels beside cuDNN and cuBLAS on ResNet-50's convolutions, measured side by
side in one run, with the autotuner's per-layer choices and the timings they rest on.

    python benchmarks/triton_layers.py --json benchmarks/results/triton_layers.jsonl      # bf16, NHWC, batch 256
    python benchmarks/triton_layers.py --dtype fp16 --batch 128 --layers l1.conv2,l4.conv3
    TRITON_INTERPRET=1 python benchmarks/triton_layers.py --smoke   # CPU: runs every code path, times mean nothing

Per layer (channels_last, the layer's inference epilogue: bias [+ residual] [+ ReLU]):
  fused      the Triton conv with the epilogue fused, under the tile config the autotuner measured best
  cudnn      F.conv2d alone (cuDNN), no epilogue
  cudnn+epi  F.conv2d + the fastres epilogue kernel: the autotuner's "aten" candidate
  gemm       (1x1 stride-1 layers) torch.mm of the same GEMM, [N*H*W, Cin] x [Cin, Cout]: cuBLAS's bare GEMM
  chosen     what the autotuner picked for the fused op (never slower than the better of the two, by construction)
  train      Triton conv + BN-statistics epilogue vs cuDNN conv + the statistics kernel (training forward)
  dgrad      Triton input gradient vs ATen's convolution_backward; wgrad the same for the weight gradient
Issue 4's targets: fused 1x1 + residual <= 1.05x gemm; fused 3x3 at >= 0.9x cudnn's speed (cudnn / fused >= 0.9).

Timing: triton.testing.do_bench (median of ~100 ms of repetitions, L2 flushed between runs), the providers of a
layer in rotating order over --rounds rounds, the median kept. The autotuner measures in a private cache directory
unless --reuse-cache. Whole-model figures come from benchmarks/throughput.py, whose fastres provider runs the triton
backend on GPUs, e.g.
    python benchmarks/throughput.py --arch resnet50 --dtype bf16 --mode infer --providers fastres,eager,compile
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# ResNet-50 (v1.5: the stride on the 3x3) at 224x224: every distinct conv once.
# name: (Cin, input size, Cout, kernel, stride, residual, relu)
RESNET50_LAYERS = {
    "stem": (3, 224, 64, 7, 2, False, True),
    "l1.conv1": (64, 56, 64, 1, 1, False, True),
    "l1.conv2": (64, 56, 64, 3, 1, False, True),
    "l1.conv3": (64, 56, 256, 1, 1, True, True),
    "l1.down": (64, 56, 256, 1, 1, False, False),
    "l1.conv1b": (256, 56, 64, 1, 1, False, True),
    "l2.conv1": (256, 56, 128, 1, 1, False, True),
    "l2.conv2s2": (128, 56, 128, 3, 2, False, True),
    "l2.conv2": (128, 28, 128, 3, 1, False, True),
    "l2.conv3": (128, 28, 512, 1, 1, True, True),
    "l2.down": (256, 56, 512, 1, 2, False, False),
    "l2.conv1b": (512, 28, 128, 1, 1, False, True),
    "l3.conv1": (512, 28, 256, 1, 1, False, True),
    "l3.conv2s2": (256, 28, 256, 3, 2, False, True),
    "l3.conv2": (256, 14, 256, 3, 1, False, True),
    "l3.conv3": (256, 14, 1024, 1, 1, True, True),
    "l3.down": (512, 28, 1024, 1, 2, False, False),
    "l3.conv1b": (1024, 14, 256, 1, 1, False, True),
    "l4.conv1": (1024, 14, 512, 1, 1, False, True),
    "l4.conv2s2": (512, 14, 512, 3, 2, False, True),
    "l4.conv2": (512, 7, 512, 3, 1, False, True),
    "l4.conv3": (512, 7, 2048, 1, 1, True, True),
    "l4.down": (1024, 14, 2048, 1, 2, False, False),
    "l4.conv1b": (2048, 7, 512, 1, 1, False, True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--layers", default="", help="comma-separated subset of " + ",".join(RESNET50_LAYERS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-backward", action="store_true", help="skip the training forward, dgrad and wgrad")
    p.add_argument("--reuse-cache", action="store_true", help="use the user's autotune cache instead of a fresh one")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (batch 1, sizes / 16, channels / 8), for a "
                   "CPU run under TRITON_INTERPRET=1 that only exercises the code")
    p.add_argument("--json", default=None, help="append the run as one JSON line to this file")
    return p.parse_args(argv)


def layer_shapes(args):
    names = [n for n in args.layers.split(",") if n] or list(RESNET50_LAYERS)
    unknown = [n for n in names if n not in RESNET50_LAYERS]
    if unknown:
        raise SystemExit(f"unknown layers: {', '.join(unknown)}")
    shapes = {}
    for name in names:
        cin, size, cout, k, s, residual, relu = RESNET50_LAYERS[name]
        if args.smoke:
            cin, size, cout = max(3, cin // 8) if name != "stem" else 3, max(7, size // 16), max(8, cout // 8)
        shapes[name] = (cin, size, cout, k, s, residual, relu)
    return shapes


def make_timer(device):
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def wall(fn):
        samples = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return min(samples)
    return wall


def side_by_side(providers, timer, rounds):
    """{name: median ms}; each round times every provider once, starting at a rotating position."""
    names = list(providers)
    samples = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            samples[name].append(timer(providers[name]))
    return {n: statistics.median(v) for n, v in samples.items()}


def measure_layer(name, shape, args, device, dtype, timer):
    from fastres.kernels import autotune, bn, conv
    from fastres.ops import backend_triton

    cin, size, cout, k, s, residual, relu = shape
    n = 1 if args.smoke else args.batch
    p = k // 2
    x = torch.randn(n, cin, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, k, k, device=device, dtype=dtype) / (cin * k * k) ** 0.5).contiguous(
        memory_format=torch.channels_last)
    b = torch.randn(cout, device=device, dtype=dtype)
    out_size = (size + 2 * p - k) // s + 1
    r = torch.randn(n, cout, out_size, out_size, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last) if residual else None
    gamma, beta = torch.ones(cout, device=device), torch.zeros(cout, device=device)
    rm, rv = torch.zeros(cout, device=device), torch.ones(cout, device=device)
    grad = torch.randn(n, cout, out_size, out_size, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)

    # 1. the autotuner measures every candidate of each problem this layer poses, as the model would
    with autotune.tuning() as record:
        backend_triton.conv_bias_act(x, w, b, [s, s], [p, p], r, relu)
        if not args.no_backward:
            backend_triton.conv_bn_act_forward(x, w, gamma, beta, rm, rv, True, 0.1, 1e-5, [s, s], [p, p], None,
                                               True)
            backend_triton.conv_backward(grad, x, w, [s, s], [p, p], (True, True, False))
    entries = {key.split("|")[0]: (key, choice) for key, choice in record.items()}
    cached = autotune.cache().entries()

    def best_config(kind):
        key, choice = entries[kind]
        entry = cached.get(key)
        if entry is not None and entry.get("best_triton"):
            return conv.TileConfig(*entry["best_triton"])
        return choice.config  # nothing measured (CPU): the default

    # 2. the figures, side by side
    fwd_cfg = best_config("conv_bias_act")
    providers = {
        "fused": lambda: conv.conv2d(x, w, s, p, bias=b, residual=r, relu=relu, config=fwd_cfg),
        "cudnn": lambda: F.conv2d(x, w, None, s, p),
        "cudnn+epi": lambda: bn.bn_act(F.conv2d(x, w, None, s, p), shift=b, residual=r, relu=relu),
    }
    if k == 1 and s == 1:
        a2d = x.permute(0, 2, 3, 1).reshape(-1, cin)  # NHWC memory viewed as [N*H*W, Cin]: no copy
        b2d = w.reshape(cout, cin).t()
        providers["gemm"] = lambda: torch.mm(a2d, b2d)
    ms = side_by_side(providers, timer, args.rounds)
    row = {"layer": name, "shape": {"n": n, "cin": cin, "size": size, "cout": cout, "k": k, "stride": s,
                                    "residual": residual, "relu": relu},
           "fused_config": list(fwd_cfg) if fwd_cfg is not None else None,
           "chosen": entries["conv_bias_act"][1].label(), **{f"{k_}_ms": v for k_, v in ms.items()}}
    if "gemm" in ms:
        row["fused_over_gemm"] = ms["fused"] / ms["gemm"]
    row["cudnn_speed_over_fused"] = ms["cudnn"] / ms["fused"]
    flops = 2 * n * out_size * out_size * cout * cin * k * k
    row["fused_tflops"] = flops / ms["fused"] / 1e9

    if not args.no_backward:
        stats_cfg = best_config("conv_stats")
        dgrad_cfg = best_config("dgrad")
        wgrad_cfg = best_config("wgrad")
        train = side_by_side({
            "train_triton": lambda: conv.conv2d(x, w, s, p, stats=True, config=stats_cfg),
            "train_aten": lambda: bn.channel_stats(F.conv2d(x, w, None, s, p)),
            "dgrad_triton": lambda: conv.conv2d_input_grad(grad, w, x.shape, s, p, config=dgrad_cfg),
            "dgrad_aten": lambda: torch.ops.aten.convolution_backward(grad, x, w, None, [s, s], [p, p], [1, 1], False,
                                                                      [0, 0], 1, [True, False, False]),
            "wgrad_triton": lambda: conv.conv2d_weight_grad(grad, x, w.shape, s, p, config=wgrad_cfg),
            "wgrad_aten": lambda: torch.ops.aten.convolution_backward(grad, x, w, None, [s, s], [p, p], [1, 1], False,
                                                                      [0, 0], 1, [False, True, False]),
        }, timer, args.rounds)
        row.update({f"{k_}_ms": v for k_, v in train.items()})
        row.update({f"{kind}_chosen": entries[kind][1].label() for kind in ("conv_stats", "dgrad", "wgrad")})
    row["autotune"] = {kind: cached.get(key) for kind, (key, _) in entries.items()}
    return row


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("no GPU: only --smoke runs here (under TRITON_INTERPRET=1)")
    if not args.reuse_cache:
        os.environ["FASTRES_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastres-autotune-")
    dtype = DTYPES[args.dtype]
    timer = make_timer(device)
    rows = []
    for name, shape in layer_shapes(args).items():
        rows.append(measure_layer(name, shape, args, device, dtype, timer))
        row = rows[-1]
        print(f"{name:>11}: fused {row['fused_ms']:.4f} ms ({row['chosen']}), cudnn {row['cudnn_ms']:.4f} ms"
              + (f", gemm {row['gemm_ms']:.4f} ms" if "gemm_ms" in row else ""), flush=True)

    header = ["layer", "fused ms", "cudnn ms", "cudnn+epi ms", "gemm ms", "fused/gemm", "cudnn/fused", "chosen"]
    table = [[r["layer"], f"{r['fused_ms']:.4f}", f"{r['cudnn_ms']:.4f}", f"{r['cudnn+epi_ms']:.4f}",
              f"{r['gemm_ms']:.4f}" if "gemm_ms" in r else "", f"{r['fused_over_gemm']:.3f}" if "gemm_ms" in r else "",
              f"{r['cudnn_speed_over_fused']:.3f}", r["chosen"]] for r in rows]
    print(C.format_table(header, table))
    if not args.no_backward:
        header = ["layer", "train triton", "train aten", "dgrad triton", "dgrad aten", "wgrad triton", "wgrad aten"]
        print(C.format_table(header, [[r["layer"]] + [f"{r[k]:.4f}" for k in (
            "train_triton_ms", "train_aten_ms", "dgrad_triton_ms", "dgrad_aten_ms", "wgrad_triton_ms",
            "wgrad_aten_ms")] for r in rows]))
    if args.json:
        settings = {"dtype": args.dtype, "batch": 1 if args.smoke else args.batch, "channels_last": True,
                    "rounds": args.rounds, "smoke": args.smoke,
                    "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if device.type == "cuda" else None}
        C.append_json(args.json, {**C.environment(device), "benchmark": "triton_layers", "settings": settings,
                                  "layers": rows})


if __name__ == "__main__":
    main()
