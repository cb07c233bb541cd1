"""Memory a CPU eval model holds beyond its weights while it serves forwards of several input shapes, fastres beside
the same network in eager PyTorch (torchvision's).

    python benchmarks/eval_memory.py                  # ResNet-50, 224x224, batches 1,2,3,4, served twice over
    python benchmarks/eval_memory.py --arch resnet18 --batch-sizes 1,2,4,8,16,32 --cycles 3 --save

Each provider runs in a Python process of its own (nothing another provider allocated or freed is counted): it
builds its model (fastres.models.<arch>, or torchvision's loaded with the same weights), eval, channels_last,
under torch.inference_mode; then serves --calls forwards of each batch size in turn (--calls at least 4: fastres
builds a shape's oneDNN Graph on its third call), the whole sequence --cycles times. After each batch size it
reads glibc's bytes in use (mallinfo2: heap and mmapped chunks, after a garbage collection) and reports them over
the count right after the model was built: what the provider keeps between calls (fold caches, packed weights,
graphs, transformed weights; and for every provider the heap's retained activations, glibc's malloc thresholds
being raised by fastres's first eval forward: fastres.models._malloc). A figure that grows from cycle to cycle at
the same shapes is memory the provider never gives back. Linux with glibc only.
"""
import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

PROVIDERS = ("fastres", "eager")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def bytes_in_use():
    """glibc's bytes in use (allocated heap chunks and mmapped chunks), after a garbage collection; None where the
    C library has no mallinfo2."""
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on (as fastres.models._malloc finds mallopt)
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    gc.collect()
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def serve(args):
    """The worker: one provider's model, its forwards, a JSON line per batch size served ({"cycle", "batch_size",
    "held_bytes"}), the first line {"built_bytes", "weight_bytes"}."""
    fast, ref = C.build_pair(args.arch_spec, seed=args.seed)
    model = (fast if args.worker == "fastres" else ref).eval().to(memory_format=torch.channels_last)
    del fast, ref
    built = bytes_in_use()
    if built is None:
        print(json.dumps({"error": "this C library has no mallinfo2 (glibc 2.33 or later)"}), flush=True)
        return 1
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    print(json.dumps({"built_bytes": built, "weight_bytes": weights}), flush=True)
    gen = torch.Generator().manual_seed(args.seed + 1)
    with torch.inference_mode():
        for cycle in range(args.cycles):
            for batch in args.batch_sizes:
                x = torch.randn(batch, 3, args.input_size, args.input_size, generator=gen)
                for _ in range(args.calls):
                    model(x.contiguous(memory_format=torch.channels_last))
                print(json.dumps({"cycle": cycle, "batch_size": batch, "held_bytes": bytes_in_use() - built}),
                      flush=True)
    return 0


def run_provider(name, args):
    """(the worker's first line, its per-batch lines) for provider `name`, run in a fresh process."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--arch", args.arch,
           "--batch-sizes", ",".join(map(str, args.batch_sizes)), "--cycles", str(args.cycles),
           "--calls", str(args.calls), "--input-size", str(args.input_size), "--seed", str(args.seed)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines or "error" in lines[0]:
        why = lines[0]["error"] if lines and "error" in lines[0] else done.stderr.strip()[-2000:]
        raise RuntimeError(f"{name}: {why}")
    return lines[0], lines[1:]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50", help=f"one of {', '.join(C.arch_names())} (default resnet50)")
    p.add_argument("--batch-sizes", default="1,2,3,4", help="comma-separated, served in this order (default 1,2,3,4)")
    p.add_argument("--cycles", type=int, default=2, help="times the batch sizes are served in turn (default 2)")
    p.add_argument("--calls", type=int, default=5, help="forwards per batch size and cycle (default 5, at least 4)")
    p.add_argument("--input-size", type=int, help="default: the arch's (224; CIFAR nets 32)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated, from {','.join(PROVIDERS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    C.add_output_args(p)
    args = p.parse_args(argv)
    args.arch_spec = C.parse_arch_arg(p, args.arch)
    args.input_size = args.input_size or args.arch_spec.input_size
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error(f"--batch-sizes must be positive, got {args.batch_sizes}")
    if args.cycles < 1:
        p.error(f"--cycles must be >= 1, got {args.cycles}")
    if args.calls < 4:
        p.error(f"--calls must be >= 4 (a shape's graph is built on its third call), got {args.calls}")
    args.providers = args.providers.split(",")
    unknown = [n for n in args.providers if n not in PROVIDERS]
    if unknown or len(set(args.providers)) != len(args.providers):
        p.error(f"--providers must be distinct names from {','.join(PROVIDERS)}, got {','.join(args.providers)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return serve(args)
    results = {}
    for name in args.providers:
        first, steps = run_provider(name, args)
        results[name] = {"weight_bytes": first["weight_bytes"], "steps": steps}
    env = C.environment(torch.device("cpu"))
    shapes = [(s["cycle"], s["batch_size"]) for s in results[args.providers[0]]["steps"]]
    header = ["cycle", "batch"] + [f"{n} MiB held" for n in args.providers]
    rows = [[str(cycle + 1), str(batch)] + [f"{results[n]['steps'][i]['held_bytes'] / 2**20:.0f}"
                                            for n in args.providers]
            for i, (cycle, batch) in enumerate(shapes)]
    print(f"{args.arch} eval | fp32 | {args.input_size}x{args.input_size} | channels_last | inference_mode | "
          f"{args.calls} calls a shape | {env['device']} | torch {env['versions']['torch']} | "
          f"commit {env['commit'][:12]} | {env['date']}")
    print("weights: " + ", ".join(f"{n} {results[n]['weight_bytes'] / 2**20:.0f} MiB" for n in args.providers))
    print(C.format_table(header, rows, align="rr" + "r" * len(args.providers)))
    print("held: glibc's bytes in use over those right after the model was built, a fresh process per provider")
    settings = {"arch": args.arch, "input_size": args.input_size, "batch_sizes": args.batch_sizes,
                "cycles": args.cycles, "calls": args.calls, "seed": args.seed, "threads": torch.get_num_threads()}
    run = {"benchmark": "eval_memory", **env, "settings": settings, "results": results}
    csv_rows = [{**C.env_csv_columns(env), "arch": args.arch, "input_size": args.input_size, "provider": n,
                 "cycle": s["cycle"] + 1, "batch_size": s["batch_size"], "held_mib": round(s["held_bytes"] / 2**20, 1)}
                for n in args.providers for s in results[n]["steps"]]
    for path in C.write_results(args, "eval_memory", run, csv_rows, C.ENV_CSV_FIELDS + [
            "arch", "input_size", "provider", "cycle", "batch_size", "held_mib"]):
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
