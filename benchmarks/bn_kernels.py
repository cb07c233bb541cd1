"""BatchNorm training kernels of fastres._C (csrc/) beside ATen, on ResNet-50's activation shapes, on CPU or GPU.

    python benchmarks/bn_kernels.py                        # CPU: fp32, batch 8, channels_last, stage 2
    python benchmarks/bn_kernels.py --shapes 128x28,512x28 --json benchmarks/results/bn_kernels.jsonl
    python benchmarks/bn_kernels.py --device cuda          # GPU: bf16, batch 256, every ResNet-50 shape

Rows per activation shape [N, C, H, W] (y: a conv's raw output, r: a residual, g: the output gradient):
  train_fwd   BN training forward + residual + ReLU: statistics, finalize and apply (_bn_stats + _bn_act_forward),
              against F.batch_norm(training=True) + r, then relu (out of place, as autograd runs it)
  train_bwd   its backward from g: _bn_act_backward (dz from the output), and with the 1-bit ReLU mask instead
              (_bn_apply_backward); against autograd's backward of batch_norm + add + relu (threshold_backward,
              native_batch_norm_backward)
  dual_fwd    relu(bn(y) + bn_r(r)), both BNs in training (the bottleneck's last BN + downsample BN): 2 x _bn_stats
              + the dual apply; against 2 x F.batch_norm + add + relu
  dual_bwd    its backward: _bn_apply_backward in the dual form from the ReLU's 1-bit mask (what dual_bn_act and
              the blocks keep), and from the output; against autograd's
  stats       _bn_stats alone (statistics + finalize); against torch.var_mean (ATen's own BN statistics are not a
              public op on CPU)
  apply       _bn_act_forward with residual and ReLU; with the mask; the dual apply; against the same elementwise
              math in ATen ops
bytes: the fewest a kernel must move, each input read once and each output written once (stats: y; apply: y, r,
out; train_fwd: y, r, out; train_bwd: g, out, y, grad_y, grad_r; dual_bwd: g, mask, y, r, grad_y, grad_r).
GB/s = bytes / median time; "share" = GB/s over a device-to-device copy's GB/s measured in the same run (bytes
read + written). A two-pass design (statistics, then apply; reductions, then the elementwise gradients)
reads its inputs twice, so its share of that minimum is below 100% by construction.
SIGTERM ends the run early: the rows measured so far are reported and written, with "stopped_early": true, exit 0.
Timing: the providers of a row in rotating order over --rounds rounds (interleaved, so load changes on a shared
machine hit them alike), medians of the calls; CUDA events on GPUs, the wall clock on CPUs; a buffer larger than
the last-level cache is overwritten before every call unless --no-flush. The whole conv + BN + ReLU layer (the
issue's 1.3x target) is measured by `FASTRES_BACKEND=cuda python benchmarks/kernels.py --ops conv_bn_act`.
Results are printed; --json PATH appends the run (device, torch version, commit, date, settings, rows) as one JSON
line, and nothing is written without it.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# ResNet-50's BN'd activations, "channels x side": each stage's bottleneck width and block output.
RESNET50_SHAPES = ("64x56", "256x56", "128x28", "512x28", "256x14", "1024x14", "512x7", "2048x7")
ROWS = ("train_fwd", "train_bwd", "dual_fwd", "dual_bwd", "stats", "apply")
DEFAULTS = {"cpu": {"batch_size": 8, "dtype": "fp32", "shapes": "128x28,512x28", "reps": 30, "rounds": 5},
            "cuda": {"batch_size": 256, "dtype": "bf16", "shapes": ",".join(RESNET50_SHAPES), "reps": 30,
                     "rounds": 3}}
EPS = 1e-5


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


class Inputs:
    """Random activations and BN parameters for one shape, on the device, in the run's dtype and layout."""

    def __init__(self, shape, args):
        gen = torch.Generator().manual_seed(args.seed)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        dtype, dev = DTYPES[args.dtype], args.device

        def act(scale=1.0, offset=0.0):
            t = torch.randn(shape, generator=gen) * scale + offset
            return t.to(dev, dtype).contiguous(memory_format=fmt)

        c = shape[1]
        self.y, self.r, self.g = act(2.0, 1.0), act(), act()
        self.weight, self.bias = (torch.rand(c, generator=gen) + 0.5).to(dev), torch.randn(c, generator=gen).to(dev)
        self.r_weight, self.r_bias = (torch.rand(c, generator=gen) + 0.5).to(dev), torch.randn(c, generator=gen).to(dev)
        self.running = [torch.zeros(c, device=dev), torch.ones(c, device=dev)]
        self.r_running = [torch.zeros(c, device=dev), torch.ones(c, device=dev)]
        ops = torch.ops.fastres
        # What the backward rows start from: the forward's saved statistics, output and mask.
        self.mean, self.invstd, self.scale, self.shift, _, _ = ops._bn_stats(
            self.y, self.weight, self.bias, *self.running, 0.1, EPS)
        self.out, self.mask = ops._bn_apply(self.y, self.scale, self.shift, self.r, None, None, True, True)
        self.r_mean, self.r_invstd, self.r_scale, self.r_shift, _, _ = ops._bn_stats(
            self.r, self.r_weight, self.r_bias, *self.r_running, 0.1, EPS)
        self.dual_out, self.dual_mask = ops._bn_apply(self.y, self.scale, self.shift, self.r, self.r_scale,
                                                      self.r_shift, True, True)


def aten_graph(x, dual):
    """Leaves and output of ATen's forward (batch_norm [x 2] + add + relu) with a graph, for the backward rows."""
    leaves = [t.detach().clone().requires_grad_() for t in (x.y, x.r, x.weight, x.bias, x.r_weight, x.r_bias)]
    y, r, w, b, rw, rb = leaves
    z = F.batch_norm(y, x.running[0].clone(), x.running[1].clone(), w, b, True, 0.1, EPS)
    if dual:
        z = z + F.batch_norm(r, x.r_running[0].clone(), x.r_running[1].clone(), rw, rb, True, 0.1, EPS)
        used = leaves
    else:
        z = z + r
        used = leaves[:4]
    return used, torch.relu(z)


def build_rows(x, names):
    """{row: (bytes, {provider: fn})}; "fastres" first, then ATen's."""
    ops = torch.ops.fastres
    rows = {}
    if "train_fwd" in names:
        def fused():
            mean, invstd, scale, shift, rm, rv = ops._bn_stats(x.y, x.weight, x.bias, *x.running, 0.1, EPS)
            return ops._bn_act_forward(x.y, scale, shift, x.r, True)

        def fused_mask():
            mean, invstd, scale, shift, rm, rv = ops._bn_stats(x.y, x.weight, x.bias, *x.running, 0.1, EPS)
            return ops._bn_apply(x.y, scale, shift, x.r, None, None, True, True)

        def aten():
            return torch.relu(F.batch_norm(x.y, x.running[0], x.running[1], x.weight, x.bias, True, 0.1, EPS) + x.r)

        rows["train_fwd"] = (nbytes(x.y, x.r, x.out), {"fastres": fused, "aten": aten, "fastres+mask": fused_mask})
    if "train_bwd" in names:
        leaves, out = aten_graph(x, dual=False)
        rows["train_bwd"] = (nbytes(x.g, x.out, x.y, x.y, x.r), {
            "fastres": lambda: ops._bn_act_backward(x.g, x.out, x.y, x.mean, x.invstd, x.weight, True, True, True),
            "aten": lambda: torch.autograd.grad(out, leaves, x.g, retain_graph=True),
            "fastres+mask": lambda: ops._bn_apply_backward(x.g, None, x.mask, x.y, x.mean, x.invstd, x.weight, None,
                                                           None, None, None, True, True, True)})
    if "dual_fwd" in names:
        def dual():
            mean, invstd, scale, shift, _, _ = ops._bn_stats(x.y, x.weight, x.bias, *x.running, 0.1, EPS)
            r_mean, r_invstd, r_scale, r_shift, _, _ = ops._bn_stats(x.r, x.r_weight, x.r_bias, *x.r_running, 0.1,
                                                                     EPS)
            return ops._bn_apply(x.y, scale, shift, x.r, r_scale, r_shift, True, False)

        def aten_dual():
            return torch.relu(F.batch_norm(x.y, x.running[0], x.running[1], x.weight, x.bias, True, 0.1, EPS)
                              + F.batch_norm(x.r, x.r_running[0], x.r_running[1], x.r_weight, x.r_bias, True, 0.1,
                                             EPS))

        rows["dual_fwd"] = (nbytes(x.y, x.r, x.out), {"fastres": dual, "aten": aten_dual})
    if "dual_bwd" in names:
        leaves, out = aten_graph(x, dual=True)
        # "fastres" is what dual_bn_act and the blocks run: the backward from the 1-bit mask the forward kept.
        rows["dual_bwd"] = (nbytes(x.g, x.mask, x.y, x.r, x.y, x.r), {
            "fastres": lambda: ops._bn_apply_backward(x.g, None, x.dual_mask, x.y, x.mean, x.invstd, x.weight, x.r,
                                                      x.r_mean, x.r_invstd, x.r_weight, True, True, True),
            "aten": lambda: torch.autograd.grad(out, leaves, x.g, retain_graph=True),
            "fastres from out": lambda: ops._bn_apply_backward(x.g, x.dual_out, None, x.y, x.mean, x.invstd,
                                                               x.weight, x.r, x.r_mean, x.r_invstd, x.r_weight, True,
                                                               True, True)})
    if "stats" in names:
        rows["stats"] = (nbytes(x.y), {
            "fastres": lambda: ops._bn_stats(x.y, x.weight, x.bias, *x.running, 0.1, EPS),
            "aten": lambda: torch.var_mean(x.y, dim=(0, 2, 3), correction=0)})
    if "apply" in names:
        view = (1, -1, 1, 1)
        scale, shift = x.scale.view(view), x.shift.view(view)
        r_scale, r_shift = x.r_scale.view(view), x.r_shift.view(view)
        rows["apply"] = (nbytes(x.y, x.r, x.out), {
            "fastres": lambda: ops._bn_act_forward(x.y, x.scale, x.shift, x.r, True),
            "aten": lambda: torch.relu(torch.addcmul(shift, x.y, scale) + x.r),
            "fastres+mask": lambda: ops._bn_apply(x.y, x.scale, x.shift, x.r, None, None, True, True),
            "fastres dual": lambda: ops._bn_apply(x.y, x.scale, x.shift, x.r, x.r_scale, x.r_shift, True, False),
            "aten dual": lambda: torch.relu(torch.addcmul(shift, x.y, scale) + torch.addcmul(r_shift, x.r, r_scale))})
    return rows


def measure(providers, args, flush):
    names = list(providers)
    for fn in providers.values():  # first calls: allocations, lazy initialization
        fn()
    samples = {n: [] for n in names}
    per_round = max(1, args.reps // args.rounds)
    for rnd in range(args.rounds):
        for i in range(len(names)):
            name = names[(rnd + i) % len(names)]
            samples[name] += C.time_calls(providers[name], args.device, per_round, warmup=0, flush=flush)
    return {n: {"ms": 1e3 * q[1], "ms_p20": 1e3 * q[0], "ms_p80": 1e3 * q[2]}
            for n, q in ((n, C.quantiles(s)) for n, s in samples.items())}


def parse_shape(text, batch_size):
    try:
        c, side = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is CHANNELSxSIDE (e.g. 512x28), got {text!r}") from None
    return (batch_size, c, side, side)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--batch-size", type=int, help="default: 8 on CPU, 256 on CUDA")
    p.add_argument("--shapes", help=f"CxSIDE,... (default: CPU {DEFAULTS['cpu']['shapes']}; CUDA every ResNet-50 "
                                     f"shape: {','.join(RESNET50_SHAPES)})")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {','.join(ROWS)}")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="NCHW instead of NHWC")
    p.add_argument("--reps", type=int, help="timed calls per provider and row (default 30)")
    p.add_argument("--rounds", type=int, help="interleaved rounds the calls are split into (default: 5 CPU, 3 CUDA)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--no-flush", dest="flush", action="store_false", help="do not flush the cache between calls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="append the run as one JSON line (nothing is written without it)")
    args = p.parse_args(argv)
    args.device = C.parse_device(p, args.device, tuple(DEFAULTS))
    d = DEFAULTS[args.device.type]
    args.dtype = args.dtype or d["dtype"]
    args.batch_size = args.batch_size or d["batch_size"]
    args.reps, args.rounds = args.reps or d["reps"], args.rounds or d["rounds"]
    args.shapes = [parse_shape(s, args.batch_size) for s in (args.shapes or d["shapes"]).split(",") if s.strip()]
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if not args.rows or any(r not in ROWS for r in args.rows):
        p.error(f"--rows must be names from {','.join(ROWS)}, got {args.rows}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main(argv=None):
    args = parse_args(argv)
    from fastres.ops import _compiled
    if not _compiled.has_kernel("_bn_stats", args.device.type):
        print(f"fastres._C has no {args.device.type} kernels for _bn_stats ({_compiled.load_error() or 'not built'})")
        return 1
    interrupts = C.Interrupts().install()
    env = C.environment(args.device)
    copy = C.measure_copy_bandwidth(args.device)
    flush = C.CacheFlusher(args.device) if args.flush else None
    results = []

    def measure_all():
        for shape in args.shapes:
            x = Inputs(shape, args)
            for row, (row_bytes, providers) in build_rows(x, args.rows).items():
                timed = measure(providers, args, flush)
                for provider, t in timed.items():
                    t["gbps"] = row_bytes / (t["ms"] * 1e-3) / 1e9
                    t["share_of_copy"] = t["gbps"] / copy["gbps"]
                fast, aten = timed["fastres"]["ms"], timed["aten"]["ms"]
                results.append({"row": row, "shape": list(shape), "bytes": row_bytes, "providers": timed,
                                "aten_over_fastres": aten / fast})
                print(f"{row:>9} {'x'.join(map(str, shape)):<16} fastres {fast:.4g} ms, aten {aten:.4g} ms",
                      file=sys.stderr, flush=True)
            del x

    stopped = interrupts.run(measure_all)
    print(f"BN training kernels | {args.dtype} | {'channels_last' if args.channels_last else 'NCHW'} | "
          f"{env['device']} | torch {env['versions']['torch']} | commit {env['commit'][:12]} | {env['date']}")
    print(f"device-to-device copy: {copy['gbps']:.4g} GB/s (bytes read + written, best of {copy['reps']})")
    header = ["row", "shape", "MB", "fastres ms", "aten ms", "aten/fastres", "fastres GB/s", "share of copy", "others"]
    table = []
    for r in results:
        f, a = r["providers"]["fastres"], r["providers"]["aten"]
        others = ", ".join(f"{n} {v['ms']:.3g} ms ({100 * v['share_of_copy']:.0f}%)"
                           for n, v in r["providers"].items() if n not in ("fastres", "aten"))
        table.append([r["row"], "x".join(map(str, r["shape"])), f"{r['bytes'] / 1e6:.3g}", f"{f['ms']:.4g}",
                      f"{a['ms']:.4g}", f"{r['aten_over_fastres']:.2f}x", f"{f['gbps']:.4g}",
                      f"{100 * f['share_of_copy']:.0f}%", others or "-"])
    print(C.format_table(header, table, align="llrrrrrrl"))
    if stopped:
        print(f"SIGTERM: stopped early after {len(results)} rows")
    if args.json:
        settings = {"dtype": args.dtype, "batch_size": args.batch_size, "channels_last": args.channels_last,
                    "rows": args.rows, "reps": args.reps, "rounds": args.rounds, "flush": args.flush,
                    "threads": torch.get_num_threads(), "seed": args.seed}
        C.append_json(args.json, {"benchmark": "bn_kernels", **env, "settings": settings, "copy": copy,
                                  "results": results, "stopped_early": stopped})
        print(f"appended to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
