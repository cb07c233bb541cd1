"""Training-step time of a fastres model in each memory mode beside the same network in eager PyTorch.

    python benchmarks/train_modes.py                       # ResNet-50, CPU fp32 batch 8 (GPU: bf16, batch 256)
    python benchmarks/train_modes.py --arch resnet152 --rounds 12 --json benchmarks/results/train_modes.jsonl

The memory modes (fastres.nn.set_memory_mode) trade activation memory for compute: "recompute" (the default) reruns
a Bottleneck's last 1x1 conv and its projection in backward, "lean" keeps their outputs. Every provider is a copy of
the same weights in the same dtype; a step is throughput.py's training step (forward, cross-entropy, backward, SGD
with momentum 0.9 and weight decay 1e-4), channels_last, on the same batch. The providers run in rotating order in each of --rounds rounds (so that load changes on a shared machine
hit them alike), after two untimed steps each; the table gives each provider's median step (p20-p80) and eager's
median over it. Memory per mode: benchmarks/memory.py. SIGTERM ends the run early: the steps timed so far are
reported and written, with "stopped_early": true, and the command exits 0.
"""
import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import fastres.nn as fnn  # noqa: E402
from throughput import DTYPES, make_step  # noqa: E402

DEFAULTS = {"cpu": {"batch_size": 8, "dtype": "fp32"}, "cuda": {"batch_size": 256, "dtype": "bf16"}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50", help=f"one of {', '.join(C.arch_names())} (default resnet50)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--batch-size", type=int, help="default: 8 on CPU, 256 on CUDA")
    p.add_argument("--input-size", type=int, help="default: the arch's (224; CIFAR nets 32)")
    p.add_argument("--rounds", type=int, default=8, help="timed steps per provider (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="append the run as one JSON line (nothing is written without it)")
    args = p.parse_args(argv)
    args.arch_spec = C.parse_arch_arg(p, args.arch)
    args.device = C.parse_device(p, args.device, tuple(DEFAULTS))
    d = DEFAULTS[args.device.type]
    args.dtype = args.dtype or d["dtype"]
    args.batch_size = args.batch_size or d["batch_size"]
    args.input_size = args.input_size or args.arch_spec.input_size
    if args.batch_size < 2:
        p.error(f"--batch-size must be >= 2 (BatchNorm trains on 2 values per channel), got {args.batch_size}")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def main(argv=None):
    args = parse_args(argv)
    interrupts = C.Interrupts().install()
    device = args.device
    fast, ref = C.build_pair(args.arch_spec, seed=args.seed)
    models = {f"fastres {mode}": fnn.set_memory_mode(copy.deepcopy(fast), mode) for mode in fnn.MEMORY_MODES}
    models["eager"] = ref
    gen = torch.Generator().manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=gen).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, args.arch_spec.num_classes, (args.batch_size,), generator=gen).to(device)
    steps = {}
    for name, model in models.items():
        train_step = make_step(model.to(device, dtype, memory_format=torch.channels_last), "train")[0]
        steps[name] = lambda train_step=train_step: train_step(x, target)
    names = list(steps)
    samples = {n: [] for n in names}

    def measure_all():
        for step in steps.values():  # first steps: allocations, lazy initialization, autotuning
            step()
            step()
        C.synchronize(device)
        for rnd in range(args.rounds):
            for i in range(len(names)):
                name = names[(rnd + i) % len(names)]
                samples[name] += C.time_calls(steps[name], device, 1, warmup=0)
            print(f"round {rnd + 1} of {args.rounds} timed", file=sys.stderr, flush=True)

    stopped = interrupts.run(measure_all)
    env = C.environment(device)
    # after SIGTERM: the providers with at least one timed step, each over the steps it has
    q = {n: C.quantiles(s) for n, s in samples.items() if s}
    eager = q["eager"][1] if "eager" in q else None
    ratio = {n: None if eager is None else eager / v[1] for n, v in q.items()}
    rows = [[n, f"{1e3 * v[1]:.1f}", f"{1e3 * v[0]:.1f}-{1e3 * v[2]:.1f}",
             "-" if ratio[n] is None else f"{ratio[n]:.3f}x"] for n, v in q.items()]
    print(f"{args.arch} training step | {args.dtype} | batch {args.batch_size} | {args.input_size}x{args.input_size} | "
          f"channels_last | {env['device']} | torch {env['versions']['torch']} | commit {env['commit'][:12]} | "
          f"{env['date']}")
    print(C.format_table(["provider", "median ms", "p20-p80 ms", "eager / this"], rows, align="lrrr"))
    if stopped:
        print("SIGTERM: stopped early; timed steps per provider: "
              + ", ".join(f"{n} {len(s)}" for n, s in samples.items()))
    if args.json:
        settings = {"arch": args.arch, "dtype": args.dtype, "batch_size": args.batch_size,
                    "input_size": args.input_size, "rounds": args.rounds, "seed": args.seed,
                    "threads": torch.get_num_threads()}
        C.append_json(args.json, {"benchmark": "train_modes", **env, "settings": settings,
                                  "results": {n: {"ms": 1e3 * v[1], "ms_p20": 1e3 * v[0], "ms_p80": 1e3 * v[2],
                                                  "eager_over_this": ratio[n], "timed_steps": len(samples[n])}
                                              for n, v in q.items()},
                                  "stopped_early": stopped})
        print(f"appended to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
