"""The paper's Table 1 complexity beside what fastres.flops counts for fastres.models.

    python benchmarks/flops.py [--input-size 224] [--json PATH] [--csv PATH] [--save [--results-dir DIR]]

For ResNet-18/34/50/101/152 in both variants (v1: the paper's, stride on the bottleneck's first 1x1; v1.5:
torchvision's, stride on the 3x3), VGG-19 and plain-34, at batch 1: the paper's multiply-adds, the counted ones,
their relative difference, and the parameters. Checks (at 224x224 only, where the published figures apply):
  * the paper's nets (v1, VGG-19, plain-34) are within 2% of the paper's figure;
  * torchvision's nets (v1.5, VGG-19) equal torchvision's published "GFLOPS" (multiply-adds, 3 decimals);
  * at any size, the fastres model counts exactly what its plain-PyTorch reference (torchvision's) counts.
Exits 1 if a check fails. Models are built on the meta device: no weights are allocated, nothing runs.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from fastres import flops  # noqa: E402

PAPER_TOLERANCE = 0.02
CSV_FIELDS = C.ENV_CSV_FIELDS + ["settings", "model", "variant", "paper_macs", "counted_macs", "reference_macs",
                                 "rel_diff_vs_paper", "torchvision_published_gmacs", "params", "checks", "ok"]


def table_rows():
    """(arch name, variant) in the order of the printed table."""
    rows = [(name, variant) for name in C.IMAGENET_RESNETS for variant in ("v1", "v1.5")]
    return rows + [("vgg19", ""), ("plain34", "")]


def measure_row(name, variant, input_size):
    arch = C.parse_arch(name, variant or "v1.5")
    if not variant:
        arch = C.Arch(arch.name, arch.family, arch.depth, "", arch.input_size, arch.num_classes)
    shape = (1, 3, input_size, input_size)
    with torch.device("meta"):  # shapes are all a count needs
        fast, ref = C.build_fastres(arch), C.build_reference(arch)
    fast_count, ref_count = flops.count(fast, shape), flops.count(ref, shape)
    paper = arch.paper_macs
    published = C.TORCHVISION_PUBLISHED_GMACS.get(name) if variant in ("v1.5", "") else None
    row = {"model": name, "variant": variant, "paper_macs": paper, "counted_macs": fast_count.macs,
           "reference_macs": ref_count.macs, "params": fast_count.params,
           "rel_diff_vs_paper": None if paper is None else fast_count.macs / paper - 1,
           "torchvision_published_gmacs": published}

    checks, failed = [], []
    if fast_count.macs != ref_count.macs or fast_count.params != ref_count.params:
        failed.append(f"fastres {fast_count.macs} MACs/{fast_count.params} params != reference "
                      f"{ref_count.macs}/{ref_count.params}")
    else:
        checks.append("= reference")
    if input_size == 224:
        if variant in ("v1", "") and paper is not None:
            ok = abs(row["rel_diff_vs_paper"]) <= PAPER_TOLERANCE
            (checks if ok else failed).append(f"{'within' if ok else 'NOT within'} 2% of paper")
        if published is not None:
            ok = round(fast_count.macs / 1e9, 3) == published
            (checks if ok else failed).append(f"{'=' if ok else '!='} torchvision {published}")
    row["checks"] = "; ".join(["FAIL: " + f for f in failed] + checks)
    row["ok"] = not failed
    return row


def print_table(rows, input_size):
    header = ["model", "variant", "paper GMACs", "counted GMACs", "vs paper", "torchvision", "params (M)", "check"]
    lines = []
    for r in rows:
        lines.append([r["model"], r["variant"] or "-",
                      "-" if r["paper_macs"] is None else f"{r['paper_macs'] / 1e9:.1f}",
                      f"{r['counted_macs'] / 1e9:.3f}",
                      "-" if r["rel_diff_vs_paper"] is None else f"{100 * r['rel_diff_vs_paper']:+.1f}%",
                      "-" if r["torchvision_published_gmacs"] is None else f"{r['torchvision_published_gmacs']:.3f}",
                      f"{r['params'] / 1e6:.2f}", r["checks"]])
    print(f"Multiply-adds per {input_size}x{input_size} image (batch 1), fastres.models counted by fastres.flops "
          f"(convolutions and fc; BN, ReLU, additions and pooling are not counted)")
    print(C.format_table(header, lines, align="llrrrrrl"))
    if input_size != 224:
        print(f"(the paper's and torchvision's figures are for 224x224: not checked at {input_size}x{input_size})")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input-size", type=int, default=224, help="square input side (default 224)")
    C.add_output_args(p)
    args = p.parse_args(argv)
    if args.input_size < 32:
        p.error(f"--input-size must be >= 32 (five stride-2 stages), got {args.input_size}")
    return args


def main(argv=None):
    args = parse_args(argv)
    rows = [measure_row(name, variant, args.input_size) for name, variant in table_rows()]
    print_table(rows, args.input_size)
    ok = all(r["ok"] for r in rows)
    env = C.environment("cpu")
    settings = {"input_size": args.input_size, "batch_size": 1}
    csv_rows = [{**C.env_csv_columns(env), "settings": f"input_size={args.input_size}",
                 **{k: r[k] for k in CSV_FIELDS[len(C.ENV_CSV_FIELDS) + 1:]}} for r in rows]
    for path in C.write_results(args, "flops", {"benchmark": "flops", **env, "settings": settings, "ok": ok,
                                                "rows": rows}, csv_rows, CSV_FIELDS):
        print(f"appended to {path}")
    if not ok:
        print("FAILED: " + ", ".join(f"{r['model']} {r['variant']}".strip() for r in rows if not r["ok"]))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
