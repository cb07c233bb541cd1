"""PNG charts and a Markdown summary from the results files the benchmark commands append to.

    python benchmarks/plot.py                                  # benchmarks/results/*.jsonl -> benchmarks/results/plots/
    python benchmarks/plot.py --results-dir OUT/results --out-dir OUT/plots

Reads throughput.jsonl, memory.jsonl and kernels.jsonl (whichever exist) and, for each group of comparable runs,
draws the latest run of each item:
  throughput_<device>_<mode>_<dtype>_b<batch>[_graphs].png   images/s by arch, one bar per provider (median, with
                                                             the 20th-80th percentile range as the error bar)
  memory_<device>_<arch>_<dtype>.png                         peak memory and activations saved for backward
                                                             against batch size, one line per provider
  kernels_<device>_<dtype>_b<batch>.png                      share of the roofline per op and shape, fastres
                                                             beside ATen
  summary.md                                                 the same latest results as Markdown tables
Runs are grouped by device name and settings; within a group a later line of a file replaces an earlier one for the
same item. Drawn with matplotlib's Agg backend (no display needed).
"""
import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

PROVIDER_COLORS = {"fastres": "#d62728", "eager": "#1f77b4", "compile": "#2ca02c",
                   "compile-max-autotune": "#9467bd", "aten": "#1f77b4"}


def read_runs(path):
    """The JSON objects of a JSON Lines file, in file order; [] if it does not exist. Unparsable lines are
    reported and skipped (a run killed while writing leaves a partial line)."""
    if not os.path.exists(path):
        return []
    runs = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                runs.append(json.loads(line))
            except ValueError:
                print(f"{path}:{number}: skipped an unparsable line", file=sys.stderr)
    return runs


def slug(text, limit=40):
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:limit].strip("-") or "x"


def short_device(device):
    """'NVIDIA H200' stays; a CPU's long description loses its thread counts."""
    return device.split(" (")[0]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _provider_color(name, i):
    return PROVIDER_COLORS.get(name, f"C{i % 10}")


# ---------------------------------------------------------------- throughput
def latest_throughput(runs):
    """{group: {arch label: run}}, group = (device, mode, dtype, batch, cuda_graphs, input_size)."""
    groups = {}
    for run in runs:
        s = run["settings"]
        key = (run["device"], s["mode"], s["dtype"], s["batch_size"], bool(s.get("cuda_graphs")), s["input_size"])
        label = s["arch"] + (f" {s['variant']}" if s.get("variant") and s["variant"] != "v1.5" else "")
        groups.setdefault(key, {})[label] = run
    return groups


def plot_throughput(groups, out_dir):
    plt = _pyplot()
    written = []
    for (device, mode, dtype, batch, graphs, size), by_arch in sorted(groups.items()):
        archs = list(by_arch)
        providers = []
        for run in by_arch.values():
            providers += [p for p in run["results"] if p not in providers]
        fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(archs) * max(1, len(providers)) / 2 + 2), 4.2))
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            xs, heights, lo, hi = [], [], [], []
            for j, arch in enumerate(archs):
                r = by_arch[arch]["results"].get(provider)
                if r is None:
                    continue
                ips = r["images_per_s"]
                xs.append(j + (i - (len(providers) - 1) / 2) * width)
                heights.append(ips["median"])
                lo.append(ips["median"] - ips["p20"])
                hi.append(ips["p80"] - ips["median"])
            bars = ax.bar(xs, heights, width, yerr=[lo, hi], capsize=3, label=provider,
                          color=_provider_color(provider, i))
            for bar, h in zip(bars, heights):
                ax.annotate(f"{h:.3g}", (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(archs)))
        ax.set_xticklabels(archs)
        ax.set_ylabel("images/s (median; bars: 20th-80th percentile)")
        ax.set_title(f"{short_device(device)}: {mode}, {dtype}, batch {batch}, {size}x{size}"
                     f"{', CUDA graphs' if graphs else ''}", fontsize=10)
        ax.legend(fontsize=8)
        ax.margins(y=0.12)
        fig.tight_layout()
        name = (f"throughput_{slug(short_device(device))}_{mode}_{dtype}_b{batch}"
                f"{'_s' + str(size) if size not in (224, 32) else ''}{'_graphs' if graphs else ''}.png")
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def throughput_markdown(groups):
    lines = []
    for (device, mode, dtype, batch, graphs, size), by_arch in sorted(groups.items()):
        lines += [f"### Throughput: {short_device(device)}, {mode}, {dtype}, batch {batch}, {size}x{size}"
                  f"{', CUDA graphs' if graphs else ''}", "",
                  "| arch | provider | images/s (p20-p80) | vs eager | vs compile-max-autotune | TFLOP/s | "
                  "% of matmul | peak memory | commit | date |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for arch, run in by_arch.items():
            for provider, r in run["results"].items():
                ips = r["images_per_s"]
                vs_max = r.get("ratios", {}).get("compile-max-autotune")
                lines.append(
                    f"| {arch} | {provider}{' [' + r['compile_mode'] + ']' if r.get('compile_mode') else ''} | "
                    f"{ips['median']:.1f} ({ips['p20']:.1f}-{ips['p80']:.1f}) | "
                    f"{_ratio(r.get('ratio_vs_eager'))} | {_ratio(vs_max)} | "
                    f"{'-' if r.get('tflops') is None else format(r['tflops'], '.3g')} | "
                    f"{'-' if r.get('ceiling_share') is None else format(100 * r['ceiling_share'], '.1f') + '%'} | "
                    f"{C.fmt_bytes(r.get('peak_memory_bytes'))} | {run['commit'][:10]} | {run['date'][:10]} |")
            for provider, why in run.get("skipped", {}).items():
                lines.append(f"| {arch} | {provider} | skipped: {why} | | | | | | | |")
        lines.append("")
    return lines


def _ratio(v):
    return "-" if v is None else f"{v:.2f}x"


# ---------------------------------------------------------------- memory
def latest_memory(runs):
    """{(device, arch, dtype, input_size, channels_last): run} (the latest run of each group)."""
    groups = {}
    for run in runs:
        s = run["settings"]
        groups[(run["device"], s["arch"], s["dtype"], s["input_size"], bool(s["channels_last"]))] = run
    return groups


def plot_memory(groups, out_dir):
    plt = _pyplot()
    written = []
    for (device, arch, dtype, size, _), run in sorted(groups.items()):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        providers = list(dict.fromkeys(r["provider"] for r in run["rows"]))
        for i, provider in enumerate(providers):
            rows = sorted((r for r in run["rows"] if r["provider"] == provider), key=lambda r: r["batch_size"])
            batches = [r["batch_size"] for r in rows]
            for ax, key in zip(axes, ("peak_memory_bytes", "saved_activation_bytes")):
                ax.plot(batches, [r[key] / 2 ** 20 for r in rows], marker="o", label=provider,
                        color=_provider_color(provider, i))
        for ax, title in zip(axes, ("peak memory of a training step", "activations saved for backward")):
            ax.set_xlabel("batch size")
            ax.set_ylabel("MiB")
            ax.set_title(title, fontsize=10)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["batch_size"] for r in run["rows"]}))
            ax.get_xaxis().set_major_formatter(_plain_formatter())
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{short_device(device)}: {arch}, {dtype}, {size}x{size} (above the weights and optimizer "
                     f"state)", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"memory_{slug(short_device(device))}_{arch}_{dtype}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _plain_formatter():
    from matplotlib.ticker import ScalarFormatter
    f = ScalarFormatter()
    f.set_scientific(False)
    return f


def memory_markdown(groups):
    lines = []
    for (device, arch, dtype, size, _), run in sorted(groups.items()):
        lines += [f"### Memory of a training step: {short_device(device)}, {arch}, {dtype}, {size}x{size}", "",
                  "| batch | provider | peak memory | vs eager | activations saved | vs eager |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(run["rows"], key=lambda r: (r["batch_size"], r["provider"])):
            lines.append(f"| {r['batch_size']} | {r['provider']} | {C.fmt_bytes(r['peak_memory_bytes'])} | "
                         f"{_ratio(r.get('peak_vs_eager'))} | {C.fmt_bytes(r['saved_activation_bytes'])} | "
                         f"{_ratio(r.get('saved_activations_vs_eager'))} |")
        lines += ["", f"({run['memory_measure']}; commit {run['commit'][:10]}, {run['date'][:10]})", ""]
    return lines


# ---------------------------------------------------------------- kernels
def latest_kernels(runs):
    """{(device, dtype, batch, tiny): {(op, item): row}} with the run's ceilings under the key None."""
    groups = {}
    for run in runs:
        s = run["settings"]
        g = groups.setdefault((run["device"], s["dtype"], s["batch_size"], bool(s.get("tiny"))), {})
        for row in run["rows"]:
            g[(row["op"], row["item"])] = row
        g[None] = run["ceilings"]
    return groups


def plot_kernels(groups, out_dir):
    plt = _pyplot()
    written = []
    for (device, dtype, batch, tiny), rows in sorted(groups.items()):
        items = [k for k in rows if k is not None]
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.28 * len(items)))
        ys = range(len(items))
        for i, (provider, offset) in enumerate((("fastres", -0.2), ("aten", 0.2))):
            shares = [100 * rows[k]["providers"][provider]["roofline_share"] for k in items]
            ax.barh([y + offset for y in ys], shares, 0.4, label=provider, color=_provider_color(provider, i))
        ax.axvline(100, color="black", linewidth=0.8, linestyle="--")  # the roofline itself
        ax.set_yticks(list(ys))
        ax.set_yticklabels([f"{op} {item} ({rows[(op, item)]['bound'][0]})" for op, item in items], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("% of the roofline (floor time / median time; c: compute-, m: memory-bound)")
        m, c = rows[None]["matmul"], rows[None]["copy"]
        ax.set_title(f"{short_device(device)}: {dtype}, batch {batch}{', tiny shapes' if tiny else ''}; ceilings "
                     f"{m['tflops']:.3g} TFLOP/s, {c['gbps']:.4g} GB/s", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, f"kernels_{slug(short_device(device))}_{dtype}_b{batch}"
                                     f"{'_tiny' if tiny else ''}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def kernels_markdown(groups):
    lines = []
    for (device, dtype, batch, tiny), rows in sorted(groups.items()):
        m, c = rows[None]["matmul"], rows[None]["copy"]
        lines += [f"### Fused ops: {short_device(device)}, {dtype}, batch {batch}{', tiny shapes' if tiny else ''} "
                  f"(ceilings {m['tflops']:.3g} TFLOP/s, {c['gbps']:.4g} GB/s)", "",
                  "| op | shape | backend | bound | fastres ms | ATen ms | ATen/fastres | fastres roofline | "
                  "ATen roofline |", "|---|---|---|---|---|---|---|---|---|"]
        for key, r in rows.items():
            if key is None:
                continue
            f, a = r["providers"]["fastres"], r["providers"]["aten"]
            lines.append(f"| {r['op']} | {r['item']} | {r['backend']} | {r['bound']} | {f['ms']:.3g} | "
                         f"{a['ms']:.3g} | {r['speedup_vs_aten']:.2f}x | {100 * f['roofline_share']:.0f}% | "
                         f"{100 * a['roofline_share']:.0f}% |")
        lines.append("")
    return lines


# ---------------------------------------------------------------- command line
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", help="where the .jsonl files are (default: benchmarks/results/)")
    p.add_argument("--out-dir", help="where the PNGs and summary.md go (default: <results-dir>/plots)")
    args = p.parse_args(argv)
    results = C.results_dir(args.results_dir)
    out_dir = os.path.abspath(args.out_dir or os.path.join(results, "plots"))
    throughput = latest_throughput(read_runs(os.path.join(results, "throughput.jsonl")))
    memory = latest_memory(read_runs(os.path.join(results, "memory.jsonl")))
    kernels = latest_kernels(read_runs(os.path.join(results, "kernels.jsonl")))
    if not (throughput or memory or kernels):
        print(f"no results in {results} (throughput.jsonl, memory.jsonl, kernels.jsonl): nothing to draw",
              file=sys.stderr)
        return 1
    os.makedirs(out_dir, exist_ok=True)
    written = plot_throughput(throughput, out_dir) + plot_memory(memory, out_dir) + plot_kernels(kernels, out_dir)
    summary = (["# Benchmark results (latest run of each item)", "",
                f"Generated by benchmarks/plot.py from {results}.", ""]
               + throughput_markdown(throughput) + memory_markdown(memory) + kernels_markdown(kernels))
    path = os.path.join(out_dir, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(summary) + "\n")
    written.append(path)
    for w in written:
        print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
