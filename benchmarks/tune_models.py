"""Measure, ahead of the benchmarks, how each convolution of a network runs fastest (fastres.tune), so that the
one-time autotuning cost is a step of its own rather than hidden in the first batch of a throughput run.

    python benchmarks/tune_models.py --arch resnet50 --batch-size 256 --dtype bf16 --modes infer,train

The choices go to fastres's on-disk autotune cache ($FASTRES_CACHE_DIR/autotune.json, default
~/.cache/fastres/), where later runs on the same GPU and software versions find them: ResNet-101 and -152 pose the
same convolution problems as ResNet-50 at the same batch size, and benchmarks/kernels.py's rows are ResNet-50's
layers. Each new choice is written as soon as it is measured, so a run cut short keeps what it measured; after
SIGTERM the command also reports and appends (--json) the counts so far, with "stopped_early": true, and exits 0.

--time-budget S sizes the pass from what one problem costs here (compiling, checking and timing each candidate):
the first problem's cost is measured, the problems are counted, and measuring stops once S seconds are spent (the
rest keep their default choice). The per-problem cost and the counts are printed and, with --json, appended.
On CPU tensors nothing is measured (fastres's CPU path has no tile configs to choose); the command then only lists
the problems it met.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--variant", choices=C.VARIANTS, default="v1.5")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--input-size", type=int)
    p.add_argument("--modes", default="infer,train", help="comma-separated: infer (eval, BN folded), train")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--time-budget", type=float, help="seconds for all modes together (default: no limit)")
    p.add_argument("--json", metavar="PATH", help="append the per-problem cost and counts as one JSON line")
    args = p.parse_args(argv)
    if args.time_budget is not None and args.time_budget <= 0:
        p.error(f"--time-budget must be positive, got {args.time_budget}")
    arch = C.parse_arch_arg(p, args.arch, args.variant)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("infer", "train") for m in modes):
        p.error(f"--modes must be infer and/or train, got {args.modes!r}")
    if args.batch_size < 2:
        p.error("--batch-size must be >= 2")
    interrupts = C.Interrupts().install()
    import fastres
    from fastres.kernels import autotune

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    size = args.input_size or arch.input_size
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model, _ = C.build_pair(arch, calibrate_shape=(4, 3, size, size))
    model = model.to(device=device, dtype=dtype, memory_format=fmt)
    x = torch.randn(args.batch_size, 3, size, size).to(device, dtype).contiguous(memory_format=fmt)
    print(f"{arch.label}, batch {args.batch_size}, {args.dtype}, {size}x{size}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, {C.device_name(device)}; "
          f"cache {autotune.cache_path()}")
    deadline = None if args.time_budget is None else time.monotonic() + args.time_budget
    summary, current = {}, {}

    def tune_all():
        for mode in modes:
            model.train(mode == "train")
            current.update(mode=mode, known=set(autotune.cache().entries()), start=time.perf_counter())
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            choices = fastres.tune(model, x, backward=mode == "train", time_budget=left)
            C.synchronize(device)
            summary[mode] = summarize(mode, choices, current["known"], current["start"], autotune)

    stopped = interrupts.run(tune_all)
    if stopped and current and current["mode"] not in summary:
        # fastres.tune cut short: what it measured is in the cache already (each choice is written when measured)
        new = set(autotune.cache().entries()) - current["known"]
        summary[current["mode"]] = {"stopped_early": True, "measured_now": len(new),
                                    "wall_s": round(time.perf_counter() - current["start"], 2)}
        print(f"{current['mode']}: SIGTERM: stopped early, {len(new)} conv problems measured and cached")
    if stopped:
        print(f"SIGTERM: stopped early; not started: {', '.join(m for m in modes if m not in summary) or '-'}")
    if args.json:
        C.append_json(args.json, {"benchmark": "tune", **C.environment(device),
                                  "settings": {"arch": arch.name, "batch_size": args.batch_size, "dtype": args.dtype,
                                               "input_size": size, "channels_last": args.channels_last,
                                               "time_budget": args.time_budget},
                                  "modes": summary, "stopped_early": stopped})
    return 0


def summarize(mode, choices, known, start, autotune):
    """The counts of one finished mode (printed, and returned for --json)."""
    entries = autotune.cache().entries()
    new = [k for k in choices if k not in known and k in entries]
    costs = sorted(entries[k]["tune_s"] for k in new if "tune_s" in entries[k])
    untuned = [k for k in choices if k not in entries]
    per_problem = costs[len(costs) // 2] if costs else None
    row = {"problems": len(choices), "measured_now": len(new), "cached_before": len(choices) - len(new)
           - len(untuned), "left_default": len(untuned), "median_problem_s": per_problem,
           "wall_s": round(time.perf_counter() - start, 2)}
    cost = "" if per_problem is None else f", one problem {per_problem:.2f} s (median of {len(costs)})"
    print(f"{mode}: {len(choices)} conv problems, {len(new)} measured now{cost}, {len(untuned)} left at their "
          f"default (budget), {time.perf_counter() - start:.1f} s")
    if untuned and per_problem:
        print(f"  tuning all {len(untuned)} left would take about {len(untuned) * per_problem:.0f} s more")
    for key, choice in sorted(choices.items()):
        problem = "|".join(key.split("|")[:-4])  # the key less its device signature (4 fields)
        state = "new   " if key in new else ("default" if key in untuned else "cached")
        print(f"  {state} {choice.label():<28} {problem}")
    return row


if __name__ == "__main__":
    sys.exit(main())
