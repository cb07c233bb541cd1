"""Where a CPU inference forward's time goes: inside the convolution kernels, or around them. Per provider, the
forward's median wall time beside the median time its convolution kernels take in a forward, as the kernels
themselves report it: oneDNN's own execution times (its verbose mode, profile_exec) for fastres, eager and
torch.compile, onnxruntime's node profiler for onnxruntime. Same weights and inputs for every provider.

    OMP_NUM_THREADS=2 python benchmarks/cpu_breakdown.py --arch resnet50 --batch-size 1
    OMP_NUM_THREADS=2 python benchmarks/cpu_breakdown.py --arch resnet50 --batch-size 1 \\
        --providers fastres,eager,compile-freezing,onnxruntime --save

Providers (--providers, comma-separated; default fastres,eager, plus onnxruntime where it is installed):
  fastres           fastres.models.<arch>, eval, channels_last inside (its CPU eval plan)
  eager             the plain-PyTorch reference (torchvision's model), eval, channels_last
  compile-freezing  torch.compile of the reference with torch._inductor.config.freezing = True around its first call
  onnxruntime       the reference exported to ONNX, CPUExecutionProvider, graph optimizations ALL, intra-op threads =
                    torch's threads (`pip install -e ".[peers]"`; skipped with a note where it is not installed)

One provider at a time (after its warm-up), each forward after --settle seconds of idle. Columns: forward (ms,
median of --iters forwards without instrumentation); then --iters instrumented forwards, whose wall time is
`instrumented` (oneDNN prints a line per primitive it executes; onnxruntime profiles its nodes) and which give, per
forward: conv kernels (the convolution primitives' execution times, or the Conv nodes' kernel times) and other
kernels (the other oneDNN primitives, e.g. eager's weight reorders, or onnxruntime's other nodes). Medians over
forwards. outside = forward - conv kernels - other kernels: what the provider spends around its kernels (argument
handling, primitive descriptors, allocation, passes that are neither oneDNN's nor a node, Python). oneDNN times
each execution alone, so its printing (instrumented - forward) is not in the kernels; onnxruntime's profiler
lengthens the node times themselves (its instrumented forward is slower by about as much), so its outside comes out
too small, even negative: read it as "about zero".
Per provider it also counts the convolution primitives (nodes) a forward executes, which tells which layers ran as
convolutions (a fused stem, for instance, runs as one), and the minor page faults of a plain forward (median): fresh
pages its allocations take from the system, which the kernel zeroes (their time is in `outside` and in the kernels
that first touch them). fastres's first forward raises glibc's malloc thresholds for the whole process
(fastres.models._malloc) and pins ATen's intra-op workers (fastres.models._threads), so providers measured after it
have them too; the run says what was done ("malloc", "pinned_threads").
"""
import argparse
import contextlib
import ctypes
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import _peers  # noqa: E402

PROVIDERS = ("fastres", "eager", "compile-freezing", "onnxruntime")


# ---------------------------------------------------------------- oneDNN's verbose lines
def parse_onednn_exec(text):
    """{primitive kind: [count, total ms]} of the primitive executions in oneDNN verbose output: lines such as
    `onednn_verbose,v1,primitive,exec,cpu,convolution,brg_conv_fwd:avx512_core,...,1.2832` (with or without the
    timestamp field, or the older `dnnl_verbose,exec,cpu,...`), whose last field is the time in ms. oneDNN Graph's
    `graph,exec` lines are left out: each partition's primitives print their own lines."""
    kinds = {}
    for line in text.splitlines():
        if not line.startswith(("onednn_verbose,", "dnnl_verbose,")):
            continue
        fields = line.strip().split(",")
        if "exec" not in fields:
            continue
        i = fields.index("exec")
        if i + 2 >= len(fields) or fields[i - 1] == "graph":
            continue  # (a oneDNN Graph partition's line: its time is that of the primitives it ran, printed too)
        try:
            ms = float(fields[-1])
        except ValueError:
            continue
        entry = kinds.setdefault(fields[i + 2], [0, 0.0])
        entry[0] += 1
        entry[1] += ms
    return kinds


@contextlib.contextmanager
def _stdout_to(path):
    """File descriptor 1 (where oneDNN's printf writes) into `path` for the block."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 1)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def onednn_kernels(forward, x, iters, settle):
    """Per forward of `forward(x)`, `iters` of them, each after `settle` seconds of idle: (its wall time in ms,
    {primitive kind: [count, ms]} as oneDNN reports its executions)."""
    out = []
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "verbose.txt")
        for _ in range(iters):
            time.sleep(settle)
            with _stdout_to(path), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                start = time.perf_counter()
                forward(x)
                wall = time.perf_counter() - start
            with open(path, errors="replace") as f:
                out.append((1e3 * wall, parse_onednn_exec(f.read())))
    return out


# ---------------------------------------------------------------- onnxruntime's profiler
def onnxruntime_kernels(profile_events, runs):
    """Per model run of an onnxruntime profile (the JSON list of events), the last `runs` runs:
    {"conv" or "other": [count, ms]} of its nodes' kernel times (a node is "conv" where its op is a convolution)."""
    model_runs = [e for e in profile_events if e.get("name") == "model_run"][-runs:]
    nodes = [e for e in profile_events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    out = []
    for run in model_runs:
        begin, end = run["ts"], run["ts"] + run["dur"]
        kinds = {}
        for e in nodes:
            if begin <= e["ts"] <= end:
                kind = "conv" if "Conv" in e.get("args", {}).get("op_name", "") else "other"
                entry = kinds.setdefault(kind, [0, 0.0])
                entry[0] += 1
                entry[1] += e["dur"] / 1e3
        out.append(kinds)
    return out


def _onnxruntime_sessions(reference, x, threads):
    """(plain session run, profiled session run, end_profiling): two sessions of the same exported model."""
    import onnxruntime as ort
    sessions = []
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        _peers.export_onnx(reference, x, path)
        for profiled in (False, True):
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if profiled:
                options.enable_profiling = True
                options.profile_file_prefix = os.path.join(tempfile.gettempdir(), f"fastres_breakdown_{os.getpid()}")
            sessions.append(ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]))
    name = sessions[0].get_inputs()[0].name

    def runner(session):
        return lambda x: session.run(None, {name: x.numpy()})
    return runner(sessions[0]), runner(sessions[1]), sessions[1].end_profiling


# ---------------------------------------------------------------- the run
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_model_args(p, "resnet50")
    p.add_argument("--providers", help=f"comma-separated, from {','.join(PROVIDERS)}")
    p.add_argument("--iters", type=int, default=15, help="timed forwards per provider, and instrumented ones")
    p.add_argument("--settle", type=float, default=0.1, metavar="SECONDS",
                   help="idle before each timed forward, so that no engine's threads still spin (default 0.1)")
    C.add_output_args(p)
    args = p.parse_args(argv)
    C.check_model_args(p, args)
    if args.iters < 1:
        p.error(f"--iters must be at least 1, got {args.iters}")
    if args.settle < 0:
        p.error(f"--settle must be at least 0, got {args.settle}")
    if args.providers is None:
        names = ["fastres", "eager"] + ([] if _peers.unavailable("onnxruntime") else ["onnxruntime"])
    else:
        names = [n.strip() for n in args.providers.split(",") if n.strip()]
        unknown = [n for n in names if n not in PROVIDERS]
        if unknown or not names:
            p.error(f"--providers: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(PROVIDERS)}")
        if len(set(names)) != len(names):
            p.error(f"--providers: {args.providers!r} names a provider twice")
    args.provider_names = names
    return args


CONV_KINDS = ("convolution", "conv")  # oneDNN's primitive kind; onnxruntime_kernels's


def summarize(forward_ms, instrumented):
    """A provider's row from its plain forwards' times (ms) and its instrumented forwards [(wall ms, kinds)]: medians
    over forwards; outside = the plain forward's median less the kernels' medians (the instrumented forwards' wall
    time includes the instrumentation's cost)."""
    kinds = sorted({k for _, f in instrumented for k in f})
    count = {k: instrumented[0][1].get(k, [0, 0.0])[0] for k in kinds}  # (every forward runs the same layers)

    def ms(forward, wanted):
        return sum(v[1] for k, v in forward.items() if wanted(k))
    conv = [ms(f, lambda k: k in CONV_KINDS) for _, f in instrumented]
    other = [ms(f, lambda k: k not in CONV_KINDS) for _, f in instrumented]
    row = {"forward_ms": statistics.median(forward_ms),
           "instrumented_ms": statistics.median(w for w, _ in instrumented),
           "conv_kernels_ms": statistics.median(conv),
           "conv_kernels": sum(count[k] for k in kinds if k in CONV_KINDS),
           "other_kernels_ms": statistics.median(other),
           "other_kernels": {k: count[k] for k in kinds if k not in CONV_KINDS}}
    row["outside_ms"] = row["forward_ms"] - row["conv_kernels_ms"] - row["other_kernels_ms"]
    return row


def build(args, x):
    """{provider: (forward, kernels(forward, iters) -> per-forward kinds)}, and {provider: why skipped}; x is the
    channels_last batch."""
    arch = args.arch_spec
    # BN statistics from one random batch (of at least 2: a train-mode BN needs more than one value per channel)
    fast, reference = C.build_pair(arch, calibrate_shape=(max(2, x.shape[0]), *x.shape[1:]))
    fast.eval()
    reference = reference.eval().to(memory_format=torch.channels_last)
    providers, skipped = {}, {}
    for name in args.provider_names:
        if name == "fastres":
            providers[name] = (fast, lambda f, n: onednn_kernels(f, x, n, args.settle))
        elif name == "eager":
            providers[name] = (reference, lambda f, n: onednn_kernels(f, x, n, args.settle))
        elif name == "compile-freezing":
            import copy
            import torch._inductor.config as inductor_config
            compiled = torch.compile(copy.deepcopy(reference))
            # compile_threads=1: no pool of compile workers warming up (importing torch) while the others are timed
            with inductor_config.patch(freezing=True, compile_threads=1):
                compiled(x)
            providers[name] = (compiled, lambda f, n: onednn_kernels(f, x, n, args.settle))
        else:
            why = _peers.unavailable(name)
            if why is not None:
                skipped[name] = why
                continue
            x_nchw = x.contiguous()
            plain, profiled, end_profiling = _onnxruntime_sessions(reference, x_nchw, torch.get_num_threads())

            def kernels(_, n, profiled=profiled, end_profiling=end_profiling):
                for _ in range(3):  # (its first runs, like the others' warm-up, are left out)
                    profiled(x_nchw)
                walls = []
                for _ in range(n):
                    time.sleep(args.settle)
                    start = time.perf_counter()
                    profiled(x_nchw)
                    walls.append(1e3 * (time.perf_counter() - start))
                with open(end_profiling()) as f:
                    events = json.load(f)
                return list(zip(walls, onnxruntime_kernels(events, n)))
            providers[name] = (plain, kernels)
    return providers, skipped


def measure(args):
    arch = args.arch_spec
    size = args.input_size or arch.input_size
    # channels_last for the PyTorch providers (eager's best layout), NCHW for onnxruntime (what its users hold)
    x = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(1))
    x_nchw, x = x, x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        providers, skipped = build(args, x)
        forward_x = {n: (x_nchw if n == "onnxruntime" else x) for n in providers}
        rows = []
        for name, (forward, kernels) in providers.items():
            # One provider at a time, plain then instrumented forwards: both in the same regime (run between
            # other providers' forwards, each is slower, at batch 8 by ~10%: compare with throughput.py's ratios).
            for _ in range(3):  # first calls and warm-up
                forward(forward_x[name])
            times, faults = [], []
            for _ in range(args.iters):
                time.sleep(args.settle)
                before = _minor_faults()
                start = time.perf_counter()
                forward(forward_x[name])
                times.append(1e3 * (time.perf_counter() - start))
                faults.append(_minor_faults() - before)
            rows.append({"provider": name, **summarize(times, kernels(forward, args.iters)),
                         "page_faults": statistics.median(faults)})
    return rows, skipped, size


def _minor_faults():
    """The process's minor page faults so far (fresh pages the kernel maps in and zeroes: memory an allocator handed
    back to the system and takes again)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def report(args, rows, skipped, size, env, malloc, threads):
    print(f"{args.arch_spec.label}, batch {args.batch_size}, {size}x{size}, fp32, eval; {env['device']}; "
          f"flags {', '.join(env['cpu_flags'] or [])}; torch {env['versions']['torch']}; settle {args.settle} s; "
          f"medians of {args.iters} forwards")
    print(f"{'provider':<18}{'forward ms':>11}{'instrumented ms':>17}{'conv kernels ms':>17}{'(count)':>8}"
          f"{'other kernels ms':>18}{'outside ms':>12}{'outside %':>11}{'page faults':>13}")
    for r in rows:
        print(f"{r['provider']:<18}{r['forward_ms']:>11.2f}{r['instrumented_ms']:>17.2f}{r['conv_kernels_ms']:>17.2f}"
              f"{r['conv_kernels']:>8}{r['other_kernels_ms']:>18.2f}{r['outside_ms']:>12.2f}"
              f"{100 * r['outside_ms'] / r['forward_ms']:>10.1f}%{r['page_faults']:>13.0f}")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    if malloc is not None:
        print(f"malloc: {malloc} (process-wide: the providers after fastres ran with it)")
    if threads is not None:
        print(f"threads: {threads} (process-wide: the providers after fastres ran with it)")


CSV_FIELDS = C.ENV_CSV_FIELDS + ["arch", "batch_size", "input_size", "provider", "forward_ms", "instrumented_ms",
                                 "conv_kernels_ms", "conv_kernels", "other_kernels_ms", "outside_ms", "page_faults"]


def main(argv=None):
    args = parse_args(argv)
    env = C.environment("cpu")
    rows, skipped, size = measure(args)
    malloc, pinned_threads = C.fastres_malloc_state(), C.fastres_threads_state()
    report(args, rows, skipped, size, env, malloc, pinned_threads)
    run = {"benchmark": "cpu_breakdown", **env, "malloc": malloc, "pinned_threads": pinned_threads,
           "arch": args.arch_spec.label,
           "batch_size": args.batch_size, "input_size": size, "iters": args.iters, "settle_s": args.settle,
           "threads": torch.get_num_threads(),
           "engines": _peers.versions([r["provider"] for r in rows]), "rows": rows, "skipped": skipped}
    csv_rows = [{**C.env_csv_columns(env), "arch": args.arch_spec.label, "batch_size": args.batch_size,
                 "input_size": size, **{k: r[k] for k in CSV_FIELDS if k in r}} for r in rows]
    for path in C.write_results(args, "cpu_breakdown", run, csv_rows, CSV_FIELDS):
        print(f"appended to {path}")
    return run


if __name__ == "__main__":
    main()
