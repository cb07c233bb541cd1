"""Memory of a training step against batch size, fastres beside the same network in plain PyTorch (torchvision's).

    python benchmarks/memory.py                                   # CPU: resnet50, fp32, batch 2,4,8
    python benchmarks/memory.py --arch resnet152 --dtype bf16 --batch-sizes 32,64,128,256 --save   # CUDA
    python benchmarks/memory.py --largest-batch 16 --save         # CUDA: the largest batch under a 16 GiB cap

Per batch size and provider, one training step (forward, cross-entropy, backward, SGD step with momentum) after
one warm-up step at that batch size (which also creates the optimizer state), measuring:
  peak memory   the peak bytes allocated during the step above what was allocated before it (weights and
                optimizer state are held before and are not counted): torch.cuda.max_memory_allocated on GPUs,
                the CPU allocator's records (torch.profiler) on CPUs
  saved         bytes saved for backward: every tensor autograd saves passes torch.autograd.graph's
                saved_tensors_hooks, and each distinct storage is counted once (views and tensors saved by two
                ops share a storage); "activations" leaves out the model's own parameters and buffers, which
                are held anyway
Both providers hold the same weights (fastres's state_dict loaded into the reference) and see the same batch.

--largest-batch GIB (CUDA only) instead finds, per provider, the largest batch whose training step runs within GIB
GiB of device memory (torch.cuda.set_per_process_memory_fraction; weights and optimizer state included, as in
training): batch sizes doubled from 32 until a step runs out of memory, then bisected to within 1/64. cuDNN's
benchmark mode is off for the search; FASTRES_AUTOTUNE=0 keeps fastres from autotuning every new batch size.

SIGTERM ends either early: what was measured is reported and written, with "stopped_early": true (and, for
--largest-batch, the bounds found so far of a search cut short), and the command exits 0.
"""
import argparse
import gc
import os
import sys

import torch
import torch.nn.functional as F

import fastres

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

PROVIDERS = ("fastres", "eager")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULTS = {"cpu": {"batch_sizes": (2, 4, 8), "dtype": "fp32"},
            "cuda": {"batch_sizes": (32, 64, 128, 256), "dtype": "bf16"}}
CSV_FIELDS = C.ENV_CSV_FIELDS + ["arch", "variant", "dtype", "input_size", "channels_last", "batch_size",
                                 "provider", "peak_memory_bytes", "saved_bytes", "saved_activation_bytes",
                                 "saved_storages", "saved_tensors", "param_bytes", "peak_vs_eager",
                                 "saved_activations_vs_eager"]

LARGEST_CSV_FIELDS = C.ENV_CSV_FIELDS + ["arch", "dtype", "input_size", "cap_gib", "provider", "largest_batch",
                                         "vs_eager"]


class SavedTensorCounter:
    """Counts what autograd saves for backward while it is active: distinct storages (by device and address),
    their bytes, and how many of them belong to `exclude` (the model's parameters and buffers)."""

    def __init__(self, exclude=()):
        self.exclude = {self._key(t) for t in exclude}
        self.storages = {}
        self.tensors = 0

    @staticmethod
    def _key(t):
        storage = t.untyped_storage()
        return (str(t.device), storage.data_ptr())

    def _pack(self, t):
        self.tensors += 1
        if t.device.type != "meta":
            self.storages.setdefault(self._key(t), t.untyped_storage().nbytes())
        return t  # the tensor itself: counting changes nothing about what is kept

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def summary(self):
        total = sum(self.storages.values())
        own = sum(n for k, n in self.storages.items() if k in self.exclude)
        return {"saved_bytes": total, "saved_activation_bytes": total - own, "saved_storages": len(self.storages),
                "saved_tensors": self.tensors}


def make_step(model, optimizer, counter=None):
    def step(x, target):
        if counter is None:
            out = model(x)
        else:
            with counter.hooks():
                out = model(x)
        F.cross_entropy(out.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure(model, optimizer, x, target, device):
    """(peak bytes, saved-tensor summary) of one training step."""
    make_step(model, optimizer)(x, target)  # warm-up at this batch size
    counter = SavedTensorCounter(list(model.parameters()) + list(model.buffers()))
    peak = C.peak_memory(make_step(model, optimizer, counter), device, x, target)
    return peak, counter.summary()


def largest_fitting(fits, start=32, limit=1 << 16, resolution=64):
    """The largest batch b in [2, limit] with fits(b) True, fits being monotonic (True up to some size, False
    beyond): b doubled from `start` (halved first while it does not fit) until fits(b) fails, then bisected until
    the gap is at most b / resolution. 0 when not even a batch of 2 fits; `limit` when it fits."""
    b = max(2, min(start, limit))
    while not fits(b):
        if b == 2:
            return 0
        b = max(2, b // 2)
    lo = b
    while True:
        if lo == limit:
            return lo
        nxt = min(2 * lo, limit)
        if not fits(nxt):
            hi = nxt
            break
        lo = nxt
    while hi - lo > max(1, lo // resolution):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def step_fits(model, optimizer, batch, args, device, dtype, fmt):
    """Whether one training step at `batch` runs without running out of device memory."""
    gen = torch.Generator().manual_seed(args.seed + batch)
    try:
        x = torch.randn(batch, 3, args.input_size, args.input_size, generator=gen).to(
            device, dtype).contiguous(memory_format=fmt)
        target = torch.randint(0, args.arch_spec.num_classes, (batch,), generator=gen).to(device)
        make_step(model, optimizer)(x, target)
        C.synchronize(device)
        ok = True
    except torch.OutOfMemoryError:
        ok = False
    optimizer.zero_grad(set_to_none=True)
    x = target = None
    gc.collect()  # the failed step's frames held tensors
    torch.cuda.empty_cache()
    return ok


def largest_batches(args, models, device, dtype, fmt, interrupts):
    """({provider: largest batch}, {provider: {"fits": b, "fails": b}}) under the --largest-batch cap, one
    provider's model on the device at a time. The second: the bounds known so far for a provider whose search
    SIGTERM cut short (the largest batch seen to fit, the smallest seen to fail; None where none did)."""
    total = torch.cuda.get_device_properties(device).total_memory
    cap = args.largest_batch * (1 << 30)
    if cap > total:
        raise SystemExit(f"memory.py: --largest-batch {args.largest_batch} GiB is more than the device's "
                         f"{total / (1 << 30):.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    found, searching = {}, {}

    def search():
        for name in args.providers:
            model = models[name].to(device=device, dtype=dtype, memory_format=fmt).train()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
            bounds = searching[name] = {"fits": None, "fails": None}

            def fits(b):
                ok = step_fits(model, optimizer, b, args, device, dtype, fmt)
                key, better = ("fits", max) if ok else ("fails", min)
                bounds[key] = b if bounds[key] is None else better(bounds[key], b)
                return ok
            found[name] = largest_fitting(fits)
            del searching[name]
            print(f"{name:>8}: largest batch {found[name]} within {args.largest_batch:g} GiB", file=sys.stderr,
                  flush=True)
            models[name] = model.to("cpu")
            del optimizer
            gc.collect()
            torch.cuda.empty_cache()

    interrupts.run(search)
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    return found, searching


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50", help=f"one of {', '.join(C.arch_names())} (default resnet50)")
    p.add_argument("--variant", choices=C.VARIANTS, default="v1.5")
    p.add_argument("--batch-sizes", help="comma-separated (default: 2,4,8 on CPU, 32,64,128,256 on CUDA)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--input-size", type=int, help="default: 224 (ImageNet nets), 32 (CIFAR nets)")
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=True,
                   help="default: on")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated, from fastres,eager")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--largest-batch", type=float, metavar="GIB",
                   help="CUDA: find each provider's largest batch within GIB GiB of device memory instead")
    p.add_argument("--memory-mode", choices=fastres.nn.MEMORY_MODES, default=fastres.nn.DEFAULT_MEMORY_MODE,
                   help=f"fastres.nn.set_memory_mode for the fastres model (default {fastres.nn.DEFAULT_MEMORY_MODE})")
    C.add_output_args(p)
    args = p.parse_args(argv)
    args.arch_spec = C.parse_arch_arg(p, args.arch, args.variant)
    args.device = C.parse_device(p, args.device, tuple(DEFAULTS))
    d = DEFAULTS[args.device.type]
    try:
        args.batch_sizes = (tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
                            if args.batch_sizes else d["batch_sizes"])
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 2:
        p.error(f"--batch-sizes must be >= 2 (BatchNorm in training needs 2 values per channel), "
                f"got {args.batch_sizes}")
    args.providers = tuple(n.strip() for n in args.providers.split(",") if n.strip())
    if not args.providers or any(n not in PROVIDERS for n in args.providers) \
            or len(set(args.providers)) != len(args.providers):
        p.error(f"--providers must be distinct names from {','.join(PROVIDERS)}, got {args.providers!r}")
    args.dtype = args.dtype or d["dtype"]
    args.input_size = args.input_size or args.arch_spec.input_size
    if args.largest_batch is not None:
        if args.device.type != "cuda":
            p.error("--largest-batch needs a CUDA device (on a CPU nothing runs out of memory in time)")
        if not args.largest_batch > 0:
            p.error(f"--largest-batch must be > 0 GiB, got {args.largest_batch}")
    if args.input_size < 8:
        p.error(f"--input-size must be >= 8, got {args.input_size}")
    return args


def main(argv=None):
    args = parse_args(argv)
    device, dtype, arch = args.device, DTYPES[args.dtype], args.arch_spec
    if device.type == "cuda":
        # The largest-batch search steps through many batch sizes: no per-shape cuDNN autotuning (its workspace
        # trials would also blur the memory bound); run it with FASTRES_AUTOTUNE=0 for fastres's default choices.
        torch.backends.cudnn.benchmark = args.largest_batch is None
    interrupts = C.Interrupts().install()
    env = C.environment(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    fast, ref = C.build_pair(arch, seed=args.seed)
    fastres.nn.set_memory_mode(fast, args.memory_mode)
    models = {"fastres": fast, "eager": ref}
    settings = {"arch": arch.name, "variant": arch.variant, "dtype": args.dtype, "device": str(device),
                "input_size": args.input_size, "channels_last": args.channels_last,
                "batch_sizes": list(args.batch_sizes), "providers": list(args.providers), "seed": args.seed,
                "num_threads": torch.get_num_threads(), "optimizer": "SGD(momentum=0.9, weight_decay=1e-4)",
                "memory_mode": args.memory_mode}
    if args.largest_batch is not None:
        found, searching = largest_batches(args, models, device, dtype, fmt, interrupts)
        return report_largest(args, env, settings, found, searching, interrupts.stop)
    gen = torch.Generator().manual_seed(args.seed + 1)
    rows = []

    def sweep():
        for name in args.providers:
            # One provider's model on the device at a time: the other's weights and state stay out of its peak.
            model = models[name].to(device=device, dtype=dtype, memory_format=fmt).train()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
            param_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
            for batch in args.batch_sizes:
                gen.manual_seed(args.seed + batch)
                x = torch.randn(batch, 3, args.input_size, args.input_size, generator=gen).to(
                    device, dtype).contiguous(memory_format=fmt)
                target = torch.randint(0, arch.num_classes, (batch,), generator=gen).to(device)
                peak, saved = measure(model, optimizer, x, target, device)
                rows.append({"provider": name, "batch_size": batch, "peak_memory_bytes": peak, **saved,
                             "param_bytes": param_bytes})
                print(f"{name:>8} batch {batch:>4}: peak {C.fmt_bytes(peak)}, saved for backward "
                      f"{C.fmt_bytes(saved['saved_bytes'])} ({C.fmt_bytes(saved['saved_activation_bytes'])} "
                      f"activations)", file=sys.stderr, flush=True)
            models[name] = model.to("cpu")
            del optimizer
            if device.type == "cuda":
                torch.cuda.empty_cache()

    stopped = interrupts.run(sweep)
    eager = {r["batch_size"]: r for r in rows if r["provider"] == "eager"}
    for r in rows:
        e = eager.get(r["batch_size"])
        r["peak_vs_eager"] = r["peak_memory_bytes"] / e["peak_memory_bytes"] if e and e["peak_memory_bytes"] else None
        r["saved_activations_vs_eager"] = (r["saved_activation_bytes"] / e["saved_activation_bytes"]
                                           if e and e["saved_activation_bytes"] else None)

    print(f"{arch.label} | train step | {args.dtype} | {args.input_size}x{args.input_size} | "
          f"{'channels_last' if args.channels_last else 'NCHW'} | {env['device']}")
    header = ["batch", "provider", "peak memory*", "vs eager", "saved for backward", "activations saved",
              "vs eager", "storages"]
    table = [[r["batch_size"], r["provider"], C.fmt_bytes(r["peak_memory_bytes"]),
              "-" if r["peak_vs_eager"] is None else f"{r['peak_vs_eager']:.2f}x", C.fmt_bytes(r["saved_bytes"]),
              C.fmt_bytes(r["saved_activation_bytes"]),
              "-" if r["saved_activations_vs_eager"] is None else f"{r['saved_activations_vs_eager']:.2f}x",
              r["saved_storages"]] for r in sorted(rows, key=lambda r: (r["batch_size"], r["provider"]))]
    print(C.format_table(header, table, align="rlrrrrrr"))
    print(f"* {C.memory_label(device)}; weights: "
          + ", ".join(f"{C.fmt_bytes(r['param_bytes'])} ({r['provider']})"
                      for r in rows if r["batch_size"] == args.batch_sizes[0]))
    if stopped:
        print(f"SIGTERM: stopped early, {len(rows)} of {len(args.providers) * len(args.batch_sizes)} rows measured")
    run = {"benchmark": "memory", **env, "settings": settings, "memory_measure": C.memory_label(device),
           "rows": rows, "stopped_early": stopped}
    csv_rows = [{**C.env_csv_columns(env), "arch": arch.name, "variant": arch.variant, "dtype": args.dtype,
                 "input_size": args.input_size, "channels_last": args.channels_last,
                 **{k: r[k] for k in CSV_FIELDS[len(C.ENV_CSV_FIELDS) + 5:]}} for r in rows]
    for path in C.write_results(args, "memory", run, csv_rows, CSV_FIELDS):
        print(f"appended to {path}")
    return 0


def report_largest(args, env, settings, found, searching, stopped):
    eager = found.get("eager")
    print(f"{args.arch_spec.label} | largest training batch within {args.largest_batch:g} GiB | {args.dtype} | "
          f"{args.input_size}x{args.input_size} | {'channels_last' if args.channels_last else 'NCHW'} | "
          f"{env['device']}")
    rows = [{"provider": n, "largest_batch": b, "vs_eager": b / eager if eager else None} for n, b in found.items()]
    print(C.format_table(["provider", "largest batch", "vs eager"],
                         [[r["provider"], r["largest_batch"], "-" if r["vs_eager"] is None else f"{r['vs_eager']:.2f}x"]
                          for r in rows], align="lrr"))
    if stopped:
        print("SIGTERM: stopped early; searches cut short (largest batch seen to fit, smallest seen to fail): "
              + (", ".join(f"{n} {b['fits']}, {b['fails']}" for n, b in searching.items()) or "none"))
    run = {"benchmark": "memory_largest_batch", **env, "settings": {**settings, "cap_gib": args.largest_batch},
           "rows": rows, "stopped_early": stopped, "search_cut_short": searching}
    csv_rows = [{**C.env_csv_columns(env), "arch": args.arch_spec.name, "dtype": args.dtype,
                 "input_size": args.input_size, "cap_gib": args.largest_batch, **r} for r in rows]
    for path in C.write_results(args, "memory_largest_batch", run, csv_rows, LARGEST_CSV_FIELDS):
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
