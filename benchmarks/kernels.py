"""Each fused fastres op on ResNet-50's shapes beside what plain PyTorch runs for the same work (ATen: cuDNN and
cuBLAS on GPUs, oneDNN on CPUs), with the FLOPs and bytes each must do and the share of the roofline it reaches.

    python benchmarks/kernels.py                          # CUDA: bf16, batch 256, every layer; CPU: a small set
    python benchmarks/kernels.py --ops conv_bias_act --layers l1.conv2,l3.conv3 --save

Ops (--ops, comma-separated; rows per ResNet-50 layer or activation shape):
  conv_bias_act  inference conv with the folded BN's bias [+ residual] [+ ReLU] (1x1, 3x3 and the 7x7 stem);
                 against F.conv2d(x, w, b) [.add_(residual)] [.relu_()]; the bare conv (conv only) and, for 1x1
                 stride-1 layers in channels_last, the same GEMM through torch.mm (gemm) are timed beside them
  conv_bn_act    training forward + backward of conv + batch-statistics BN [+ residual] + ReLU; against
                 F.conv2d, F.batch_norm(training=True), add, relu and autograd's backward
  bn_relu_conv   training forward + backward of conv(relu(x * scale[c] + shift[c])) (the previous BN applied in the
                 conv's prologue); against the elementwise ops then F.conv2d, and autograd's backward
  add_relu       relu(x + residual) at the four stage outputs; against torch.add(x, r).relu_()
  bn_act         the BN apply relu(y * scale[c] + shift[c] [+ residual]) of the backend's conv_bn_act (the inner
                 activations without, the stage outputs with residual); against F.batch_norm in eval mode
                 [.add_(residual)] .relu_()
FLOPs: 2 x the convolution's multiply-adds (x 3 for forward + backward: the forward, the input and the weight
gradients); elementwise arithmetic is not counted. Bytes: the fewest any implementation must move through memory,
each input read once and each output written once (training: the forward's inputs and the output gradient read,
the output and every gradient written; intermediates not counted). Ceilings, measured in the same run: a large
matrix product in the run's dtype (TFLOP/s) and a device-to-device copy (GB/s, bytes read + written). A row's floor
is the larger of FLOPs / matrix ceiling and bytes / copy bandwidth, which names it compute- or memory-bound; each
provider's share of the roofline is floor / its median time. Timing: each provider's first call untimed (fastres's
autotuning happens there), then --rounds rounds over the providers in rotating order, each --reps / --rounds timed
calls; CUDA events on GPUs, the wall clock on CPUs; a buffer larger than the last-level cache is overwritten before
every call (--no-flush: not), so no call reads what the previous one left in cache. "agree" is the relative max
difference between the fastres and ATen outputs (and input gradients) of the row.
Each row's CSV lines are appended as soon as it is measured; SIGTERM ends the run early, and the rows measured so
far are reported and written (the run's JSON line with "stopped_early": true), exit 0.
"""
import argparse
import dataclasses
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from triton_layers import RESNET50_LAYERS  # noqa: E402  (name: (Cin, input size, Cout, kernel, stride, residual, relu))

OPS = ("conv_bias_act", "conv_bn_act", "bn_relu_conv", "add_relu", "bn_act")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# ResNet-50's activations around the residual adds: (channels, side) of each stage's block output, and of the
# bottleneck's inner width
STAGE_OUTPUTS = {"stage1": (256, 56), "stage2": (512, 28), "stage3": (1024, 14), "stage4": (2048, 7)}
STAGE_INNER = {"stage1": (64, 56), "stage2": (128, 28), "stage3": (256, 14), "stage4": (512, 7)}
# Layers whose input is the previous conv's BN + ReLU output (where bn_relu_conv applies)
PROLOGUE_LAYERS = tuple(n for n in RESNET50_LAYERS if ".conv2" in n or ".conv3" in n)
# The CPU default: one layer of each kind (the 7x7 stem, 1x1, 1x1 + residual, 3x3, strided 3x3), two activations
CPU_LAYERS = ("stem", "l1.conv1", "l1.conv3", "l2.conv2", "l3.conv2s2")
CPU_STAGES = ("stage1", "stage3")
DEFAULTS = {"cpu": {"batch_size": 1, "dtype": "fp32", "reps": 6, "rounds": 2, "time_budget": 150.0},
            "cuda": {"batch_size": 256, "dtype": "bf16", "reps": 30, "rounds": 3, "time_budget": 0.0}}
CSV_FIELDS = C.ENV_CSV_FIELDS + [
    "op", "item", "shape", "dtype", "batch_size", "channels_last", "backend", "flops", "bytes", "bound", "floor_ms",
    "provider", "ms", "ms_p20", "ms_p80", "tflops", "gbps", "roofline_share", "speedup_vs_aten", "agree",
    "matmul_tflops", "copy_gbps"]


@dataclasses.dataclass
class Row:
    op: str
    item: str                 # layer or activation name
    shape: dict
    flops: int
    bytes: int
    providers: dict           # name -> callable; "fastres" and "aten" first
    check: object = None      # () -> relative max difference fastres vs aten


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def rel_diff(a, b):
    a, b = a.float(), b.float()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale or 1.0)


class Maker:
    """Builds the rows: random inputs on the device, in the dtype and memory format of the run."""

    def __init__(self, args):
        self.device, self.dtype, self.n = args.device, DTYPES[args.dtype], args.batch_size
        self.fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        self.tiny = args.tiny
        self.gen = torch.Generator().manual_seed(args.seed)

    def randn(self, *shape, scale=1.0, fmt=None, dtype=None):
        t = torch.randn(shape, generator=self.gen) * scale
        t = t.to(self.device, dtype or self.dtype)
        return t.contiguous(memory_format=fmt or self.fmt) if t.dim() == 4 else t

    def layer(self, name):
        cin, size, cout, k, s, residual, relu = RESNET50_LAYERS[name]
        if self.tiny:  # shapes that only exercise the code
            cin, size, cout = (3 if name == "stem" else max(4, cin // 16)), max(7, size // 16), max(8, cout // 16)
        p = k // 2
        out = (size + 2 * p - k) // s + 1
        return cin, size, cout, k, s, p, out, residual, relu

    def activation(self, channels, side):
        return (max(4, channels // 16), max(4, side // 8)) if self.tiny else (channels, side)

    # ------------------------------------------------------------------------------------------------ rows
    def conv_bias_act(self, name):
        import fastres.ops as ops
        cin, size, cout, k, s, p, out, residual, relu = self.layer(name)
        x = self.randn(self.n, cin, size, size)
        w = self.randn(cout, cin, k, k, scale=(cin * k * k) ** -0.5)
        b = self.randn(cout)
        r = self.randn(self.n, cout, out, out) if residual else None
        out_bytes = self.n * cout * out * out * x.element_size()

        def fastres():
            return ops.conv_bias_act(x, w, b, s, p, r, relu)

        def aten():
            z = F.conv2d(x, w, b, s, p)
            if r is not None:
                z.add_(r)
            return z.relu_() if relu else z

        providers = {"fastres": fastres, "aten": aten, "conv only": lambda: F.conv2d(x, w, None, s, p)}
        if k == 1 and s == 1 and self.fmt == torch.channels_last:
            a2d = x.permute(0, 2, 3, 1).reshape(-1, cin)  # NHWC memory viewed as [N*H*W, Cin]: no copy
            b2d = w.reshape(cout, cin).t()
            providers["gemm"] = lambda: torch.mm(a2d, b2d)
        macs = self.n * out * out * cout * cin * k * k
        return Row("conv_bias_act", name, self._conv_shape(cin, size, cout, k, s, residual, relu), 2 * macs,
                   nbytes(x, w, b, r) + out_bytes, providers, lambda: rel_diff(fastres(), aten()))

    def conv_bn_act(self, name):
        import fastres.ops as ops
        cin, size, cout, k, s, p, out, residual, relu = self.layer(name)
        x = self.randn(self.n, cin, size, size).requires_grad_()
        w = self.randn(cout, cin, k, k, scale=(cin * k * k) ** -0.5).requires_grad_()
        # BN parameters and running statistics in the activations' dtype, as in a model moved to that dtype
        gamma = torch.rand(cout, generator=self.gen).add_(0.5).to(self.device, self.dtype).requires_grad_()
        beta = self.randn(cout).requires_grad_()
        r = self.randn(self.n, cout, out, out).requires_grad_() if residual else None
        grad = self.randn(self.n, cout, out, out)
        stats = {provider: (torch.zeros(cout, device=self.device, dtype=self.dtype),
                            torch.ones(cout, device=self.device, dtype=self.dtype)) for provider in ("fastres", "aten")}
        leaves = [t for t in (x, w, gamma, beta, r) if t is not None]

        def fastres():
            y = ops.conv_bn_act(x, w, gamma, beta, *stats["fastres"], True, 0.1, 1e-5, s, p, r, relu)
            y.backward(grad)
            return _take_grads(y, leaves)

        def aten():
            z = F.batch_norm(F.conv2d(x, w, None, s, p), *stats["aten"], gamma, beta, True, 0.1, 1e-5)
            if r is not None:
                z = z + r
            y = torch.relu(z) if relu else z
            y.backward(grad)
            return _take_grads(y, leaves)

        def check():
            (yf, gxf), (ya, gxa) = fastres()[:2], aten()[:2]
            return max(rel_diff(yf, ya), rel_diff(gxf, gxa))

        macs = self.n * out * out * cout * cin * k * k
        # read: x, w, gamma, beta, residual, grad_out; written: out, grad_x, grad_w, grad_gamma, grad_beta, grad_r
        moved = 2 * nbytes(x, w, gamma, beta, r) + 2 * nbytes(grad)
        return Row("conv_bn_act", name, self._conv_shape(cin, size, cout, k, s, residual, relu), 6 * macs, moved,
                   {"fastres": fastres, "aten": aten}, check)

    def bn_relu_conv(self, name):
        import fastres.ops as ops
        _, size, cout, k, s, p, out, _, _ = self.layer(name)
        cin = self.layer(name)[0]
        x = self.randn(self.n, cin, size, size).requires_grad_()
        scale = torch.rand(cin, generator=self.gen).add_(0.5).to(self.device, torch.float32).requires_grad_()
        shift = self.randn(cin, dtype=torch.float32).requires_grad_()
        w = self.randn(cout, cin, k, k, scale=(cin * k * k) ** -0.5).requires_grad_()
        grad = self.randn(self.n, cout, out, out)
        leaves = [x, scale, shift, w]
        view = (1, -1, 1, 1)

        def fastres():
            y = ops.bn_relu_conv(x, scale, shift, w, s, p, True)
            y.backward(grad)
            return _take_grads(y, leaves)

        def aten():
            a = torch.relu(torch.addcmul(shift.to(self.dtype).view(view), x, scale.to(self.dtype).view(view)))
            y = F.conv2d(a, w, None, s, p)
            y.backward(grad)
            return _take_grads(y, leaves)

        def check():
            (yf, gxf), (ya, gxa) = fastres()[:2], aten()[:2]
            return max(rel_diff(yf, ya), rel_diff(gxf, gxa))

        macs = self.n * out * out * cout * cin * k * k
        moved = 2 * nbytes(x, scale, shift, w) + 2 * nbytes(grad)
        return Row("bn_relu_conv", name, self._conv_shape(cin, size, cout, k, s, False, True), 6 * macs, moved,
                   {"fastres": fastres, "aten": aten}, check)

    def add_relu(self, stage):
        import fastres.ops as ops
        c, side = self.activation(*STAGE_OUTPUTS[stage])
        x, r = self.randn(self.n, c, side, side), self.randn(self.n, c, side, side)

        def fastres():
            return ops.add_relu(x, r)

        def aten():
            return torch.add(x, r).relu_()

        return Row("add_relu", stage, {"n": self.n, "c": c, "side": side}, 0, 3 * nbytes(x),
                   {"fastres": fastres, "aten": aten}, lambda: rel_diff(fastres(), aten()))

    def bn_act(self, stage, residual):
        c, side = self.activation(*(STAGE_OUTPUTS if residual else STAGE_INNER)[stage])
        y = self.randn(self.n, c, side, side)
        r = self.randn(self.n, c, side, side) if residual else None
        gamma = torch.rand(c, generator=self.gen).add_(0.5).to(self.device)
        beta = self.randn(c, dtype=torch.float32)
        mean = self.randn(c, dtype=torch.float32)
        var = torch.rand(c, generator=self.gen).add_(0.5).to(self.device)
        scale = gamma * torch.rsqrt(var + 1e-5)
        shift = beta - mean * scale
        kernel, backend = bn_apply_kernel(self.device)
        if kernel is None:
            return None

        def fastres():
            return kernel(y, scale, shift, r, True)

        def aten():
            z = F.batch_norm(y, mean.to(self.dtype), var.to(self.dtype), gamma.to(self.dtype), beta.to(self.dtype),
                             False, 0.0, 1e-5)
            if r is not None:
                z.add_(r)
            return z.relu_()

        item = f"{stage}{'+res' if residual else ''}"
        return Row("bn_act", item, {"n": self.n, "c": c, "side": side, "residual": residual}, 0,
                   nbytes(y, r, y) + nbytes(scale, shift), {"fastres": fastres, "aten": aten},
                   lambda: rel_diff(fastres(), aten()))

    def _conv_shape(self, cin, size, cout, k, s, residual, relu):
        return {"n": self.n, "cin": cin, "size": size, "cout": cout, "k": k, "stride": s, "residual": residual,
                "relu": relu}


def _take_grads(y, leaves):
    """(output, grad of the first leaf, ...) with the leaves' .grad reset, so that calls do not accumulate."""
    grads = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    return (y.detach(), *grads)


def bn_apply_kernel(device):
    """The BN-apply kernel conv_bn_act's backend runs on `device`, as (fn(y, scale, shift, residual, relu), backend
    name), or (None, name) when the backend has no fused kernel (the torch reference)."""
    from fastres.ops import select
    backend = select("conv_bn_act_forward", device).__name__.rsplit("_", 1)[-1]
    if backend == "triton":
        from fastres.kernels import bn
        return (lambda y, scale, shift, r, relu: bn.bn_act(y, scale, shift, r, relu)), backend
    if backend == "cuda":
        return torch.ops.fastres._bn_act_forward, backend
    return None, backend


def backend_of(op, device):
    from fastres.ops import select
    name = {"conv_bn_act": "conv_bn_act_forward", "bn_act": "conv_bn_act_forward"}.get(op, op)
    return select(name, device).__name__.rsplit("_", 1)[-1]


def row_items(args):
    """[(op, item)] in table order. measure_order() says in which order they are measured."""
    items = []
    for op in args.ops:
        if op in ("conv_bias_act", "conv_bn_act"):
            items += [(op, n) for n in args.layers]
        elif op == "bn_relu_conv":
            items += [(op, n) for n in args.layers if n in PROLOGUE_LAYERS]
        elif op == "add_relu":
            items += [(op, st) for st in args.stages]
        else:
            items += [(op, st) for st in args.stages] + [(op, st + "+res") for st in args.stages]
    return items


def measure_order(items):
    """Indices into `items`: first one representative row of each kind for every op (the CPU defaults' layers and
    stages), then the rest, so that a time budget spent early still leaves every op in the table."""
    representative = set(CPU_LAYERS) | set(CPU_STAGES) | {st + "+res" for st in CPU_STAGES}
    first = [i for i, (_, item) in enumerate(items) if item in representative]
    return first + [i for i in range(len(items)) if i not in first]


def build_row(maker, op, item):
    if op == "bn_act":
        return maker.bn_act(item.replace("+res", ""), item.endswith("+res"))
    return getattr(maker, op)(item)


# ------------------------------------------------------------------------------------------------ measuring
def measure_row(row, args, flush, ceilings):
    grad_mode = torch.enable_grad() if row.op in ("conv_bn_act", "bn_relu_conv") else torch.inference_mode()
    with grad_mode:
        for fn in row.providers.values():  # first calls: autotuning, cuDNN's algorithm search, allocations
            fn()
        agree = row.check() if row.check is not None else None
        names = list(row.providers)
        samples = {n: [] for n in names}
        per_round = max(1, args.reps // args.rounds)
        for rnd in range(args.rounds):
            for i in range(len(names)):
                name = names[(rnd + i) % len(names)]
                samples[name] += C.time_calls(row.providers[name], args.device, per_round, warmup=0, flush=flush)
    floor_compute = row.flops / (ceilings["matmul"]["tflops"] * 1e12)
    floor_memory = row.bytes / (ceilings["copy"]["gbps"] * 1e9)
    floor = max(floor_compute, floor_memory)
    result = {"op": row.op, "item": row.item, "shape": row.shape, "flops": row.flops, "bytes": row.bytes,
              "bound": "compute" if floor_compute >= floor_memory else "memory", "floor_ms": 1e3 * floor,
              "backend": backend_of(row.op, args.device), "agree": agree, "providers": {}}
    for name, times in samples.items():
        q = C.quantiles(times)
        result["providers"][name] = {
            "ms": 1e3 * q[1], "ms_p20": 1e3 * q[0], "ms_p80": 1e3 * q[2],
            "tflops": row.flops / q[1] / 1e12 if row.flops else None, "gbps": row.bytes / q[1] / 1e9,
            "roofline_share": floor / q[1]}
    fast, aten = result["providers"]["fastres"], result["providers"]["aten"]
    result["speedup_vs_aten"] = aten["ms"] / fast["ms"]
    return result


def print_table(results, ceilings, args, env):
    m, c = ceilings["matmul"], ceilings["copy"]
    print(f"fused ops on ResNet-50 shapes | {args.dtype} | batch {args.batch_size} | "
          f"{'channels_last' if args.channels_last else 'NCHW'}{' | tiny shapes' if args.tiny else ''} | "
          f"{env['device']}")
    print(f"ceilings measured in this run (best of {m['reps']}): matrix product {m['tflops']:.3g} TFLOP/s "
          f"({m['size']}^3 {m['precision']}, {m['method']}), copy {c['gbps']:.4g} GB/s (bytes read + written); "
          f"torch {env['versions']['torch']}, "
          f"triton {env['versions'].get('triton')}, commit {env['commit'][:12]}")
    header = ["op", "item", "backend", "GFLOP", "MB", "bound", "floor ms", "fastres ms", "aten ms", "aten/fastres",
              "fastres roofline", "aten roofline", "others (ms)", "agree"]
    table = []
    for r in results:
        f, a = r["providers"]["fastres"], r["providers"]["aten"]
        others = ", ".join(f"{n} {v['ms']:.3g}" for n, v in r["providers"].items() if n not in ("fastres", "aten"))
        table.append([r["op"], r["item"], r["backend"], f"{r['flops'] / 1e9:.3g}", f"{r['bytes'] / 1e6:.3g}",
                      r["bound"], f"{r['floor_ms']:.3g}", f"{f['ms']:.3g}", f"{a['ms']:.3g}",
                      f"{r['speedup_vs_aten']:.2f}x", f"{100 * f['roofline_share']:.0f}%",
                      f"{100 * a['roofline_share']:.0f}%", others or "-",
                      "-" if r["agree"] is None else f"{r['agree']:.1g}"])
    print(C.format_table(header, table, align="lllrrlrrrrrrlr"))
    print("aten/fastres: ATen's median time over fastres's (above 1: fastres is faster); roofline: the row's floor "
          "over the median time")


def csv_rows(env, args, results, ceilings):
    rows = []
    for r in results:
        for name, p in r["providers"].items():
            rows.append({**C.env_csv_columns(env), "op": r["op"], "item": r["item"],
                         "shape": " ".join(f"{k}={v}" for k, v in r["shape"].items()), "dtype": args.dtype,
                         "batch_size": args.batch_size, "channels_last": args.channels_last, "backend": r["backend"],
                         "flops": r["flops"], "bytes": r["bytes"], "bound": r["bound"], "floor_ms": r["floor_ms"],
                         "provider": name, "ms": p["ms"], "ms_p20": p["ms_p20"], "ms_p80": p["ms_p80"],
                         "tflops": p["tflops"], "gbps": p["gbps"], "roofline_share": p["roofline_share"],
                         "speedup_vs_aten": r["speedup_vs_aten"] if name == "fastres" else None,
                         "agree": r["agree"], "matmul_tflops": ceilings["matmul"]["tflops"],
                         "copy_gbps": ceilings["copy"]["gbps"]})
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {','.join(OPS)} (default: all)")
    p.add_argument("--layers", help="comma-separated ResNet-50 layers for the conv ops (default: all on CUDA, "
                                    f"{','.join(CPU_LAYERS)} on CPU); known: {','.join(RESNET50_LAYERS)}")
    p.add_argument("--stages", help=f"comma-separated, from {','.join(STAGE_OUTPUTS)}, for add_relu and bn_act "
                                    f"(default: all on CUDA, {','.join(CPU_STAGES)} on CPU)")
    p.add_argument("--batch-size", type=int, help="default: 256 on CUDA, 1 on CPU")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=True, help="default: on")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--reps", type=int, help="timed calls per provider and row (default: 30 CUDA, 6 CPU)")
    p.add_argument("--rounds", type=int, help="rounds the timed calls are split into (default: 3 CUDA, 2 CPU)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="start no new row once this long has passed (default: 150 CPU, 0 = none on CUDA)")
    p.add_argument("--no-flush", dest="flush", action="store_false", help="do not flush the cache between calls")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (channels / 16, sides / 16 or / 8): only "
                                                      "exercises the code, the figures mean nothing")
    p.add_argument("--seed", type=int, default=0)
    C.add_output_args(p)
    args = p.parse_args(argv)
    args.device = C.parse_device(p, args.device, tuple(DEFAULTS))
    d = DEFAULTS[args.device.type]
    args.ops = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    if not args.ops or any(o not in OPS for o in args.ops):
        p.error(f"--ops must be names from {','.join(OPS)}, got {args.ops!r}")
    cuda = args.device.type == "cuda"
    args.layers = (tuple(n.strip() for n in args.layers.split(",") if n.strip()) if args.layers
                   else tuple(RESNET50_LAYERS) if cuda else CPU_LAYERS)
    if any(n not in RESNET50_LAYERS for n in args.layers):
        p.error(f"--layers must be names from {','.join(RESNET50_LAYERS)}, got {args.layers!r}")
    args.stages = (tuple(n.strip() for n in args.stages.split(",") if n.strip()) if args.stages
                   else tuple(STAGE_OUTPUTS) if cuda else CPU_STAGES)
    if any(n not in STAGE_OUTPUTS for n in args.stages):
        p.error(f"--stages must be names from {','.join(STAGE_OUTPUTS)}, got {args.stages!r}")
    args.batch_size = args.batch_size or d["batch_size"]
    args.dtype = args.dtype or d["dtype"]
    args.reps = args.reps or d["reps"]
    args.rounds = args.rounds or d["rounds"]
    args.time_budget = d["time_budget"] if args.time_budget is None else args.time_budget
    if args.batch_size < 1 or args.reps < 1 or args.rounds < 1 or args.time_budget < 0:
        p.error("--batch-size, --reps and --rounds must be >= 1, --time-budget >= 0")
    return args


def main(argv=None):
    start = time.perf_counter()
    args = parse_args(argv)
    interrupts = C.Interrupts().install()
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # ATen's convs get their fastest cuDNN algorithm
    env = C.environment(args.device)
    maker = Maker(args)
    flush = C.CacheFlusher(args.device) if args.flush else None
    ceilings = {"matmul": C.measure_matmul_ceiling(args.device, DTYPES[args.dtype]),
                "copy": C.measure_copy_bandwidth(args.device)}
    items = row_items(args)
    measured, over_budget, no_kernel = {}, [], []

    def measure_all():
        for i in measure_order(items):
            op, item = items[i]
            if args.time_budget and time.perf_counter() - start > args.time_budget:
                over_budget.append(f"{op}:{item}")
                continue
            row = build_row(maker, op, item)
            if row is None:
                no_kernel.append(f"{op}:{item}")
                continue
            r = measure_row(row, args, flush, ceilings)
            measured[i] = r
            # each row's CSV lines as soon as it is measured: a run killed later keeps them
            C.append_csv_rows(args, "kernels", csv_rows(env, args, [r], ceilings), CSV_FIELDS)
            print(f"{op:>13} {item:<12} fastres {r['providers']['fastres']['ms']:.4g} ms, "
                  f"aten {r['providers']['aten']['ms']:.4g} ms", file=sys.stderr, flush=True)
            del row

    stopped = interrupts.run(measure_all)
    results = [measured[i] for i in sorted(measured)]
    print_table(results, ceilings, args, env)
    if over_budget:
        print(f"not measured (the {args.time_budget:g} s time budget was spent): {', '.join(over_budget)}")
    # rows SIGTERM left unmeasured (those beyond the time budget or without a kernel are listed above and below)
    cut = [f"{op}:{item}" for i, (op, item) in enumerate(items)
           if stopped and i not in measured and f"{op}:{item}" not in over_budget + no_kernel]
    if cut:
        print(f"not measured (SIGTERM: stopped early): {', '.join(cut)}")
    if no_kernel:
        print(f"no fused kernel on this backend: {', '.join(no_kernel)}")
    wall_s = time.perf_counter() - start
    print(f"wall time {wall_s:.1f} s")
    settings = {"ops": list(args.ops), "layers": list(args.layers), "stages": list(args.stages),
                "batch_size": args.batch_size, "dtype": args.dtype, "device": str(args.device),
                "channels_last": args.channels_last, "reps": args.reps, "rounds": args.rounds,
                "flush": args.flush, "tiny": args.tiny, "time_budget_s": args.time_budget, "seed": args.seed,
                "num_threads": torch.get_num_threads()}
    run = {"benchmark": "kernels", **env, "settings": settings, "ceilings": ceilings, "rows": results,
           "not_measured": over_budget + cut, "no_kernel": no_kernel, "stopped_early": stopped, "wall_s": wall_s}
    for path in C.write_results(args, "kernels", run, None, CSV_FIELDS):
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
