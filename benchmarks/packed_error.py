"""The error of fastres's prepacked CPU convolutions against float64, conv by conv and for the whole model, beside
ATen's in channels_last (the layout fastres runs) and in NCHW.

    python benchmarks/packed_error.py --arch vgg19
    python benchmarks/packed_error.py --arch resnet50 --dtype bf16 --save

fastres's CPU eval runs each conv from a weight packed once in oneDNN's blocked layout. An early version dropped
packing because it "doubled VGG-19's error past the tolerance rule"; this measures that claim as the rule states it:
the error against a float64 reference at most twice ATen's in the same dtype (plus a floor of 4 ulps at the
reference's magnitude), ATen in the layout fastres runs.

Per conv, in forward order, fed the float64 reference model's own input to that conv (rounded to --dtype):
  packed     fastres's CPU eval call: the weight packed by pack_conv_weight for this input shape (oneDNN's blocked
             layout, or Winograd's transform where its rule picks it), the conv and its bias by
             prepacked_conv_bias_act, channels_last input
  aten-cl    torch.nn.functional.conv2d with channels_last input and weight
  aten-nchw  the same, contiguous
  winograd   (fp32, 3x3 convs of stride 1, padding 1, one group) fastres._C's _winograd_conv3x3 on the weight
             _winograd_weight transformed, as fastres runs the larger of them, whatever this one's size
each against conv2d in float64 (the conv's own weight: no norm folded, no ReLU). Then the whole model: fastres.models
in eval (its CPU eval plan, second forward) against the float64 reference model (torchvision's, same weights, BN
statistics calibrated on one batch), beside the reference model run by ATen in each layout. --dtype bf16 casts each
conv's input and weight to bf16 (the model rows run under torch.autocast("cpu", torch.bfloat16)). In fp32 the
whole model also runs as its oneDNN Graph body (the forward after GRAPH_AFTER more, with its Winograd convolutions
where they apply at this input size), against the same reference ("graph").
Verdict per row: within the rule against aten-cl, or by how much it exceeds it (packed, winograd and graph each).
Exits 1 if any exceeds it.
"""
import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from fastres.testing import bound, max_error  # noqa: E402

CL = torch.channels_last
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_model_args(p, "vgg19")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--seed", type=int, default=0)
    C.add_output_args(p)
    args = p.parse_args(argv)
    C.check_model_args(p, args)
    return args


def why_not_packed(dtype):
    """Why fastres cannot run a conv in dtype from a packed weight on this machine, or None."""
    from fastres.ops import backend_cuda
    probe = torch.empty(1, 1, 1, 1).contiguous(memory_format=CL)
    if not backend_cuda.packable(probe, dtype):
        return (f"this torch build or CPU has no oneDNN {dtype} convolution from a packed weight "
                f"(oneDNN available: {torch.backends.mkldnn.is_available()})")
    return None


def verdict(error, aten_cl_error, dtype, ref64):
    """{limit, ok, over}: the rule's bound from ATen channels_last's error, and how far past it the error is."""
    limit = bound(aten_cl_error, dtype, ref64)
    return {"limit": limit, "ok": error <= limit, "over": error / limit if limit else float("inf")}


def conv_inputs(ref64, x64):
    """[(name, conv module, its float64 input)] in the order the float64 model calls its convs on x64."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, m, args[0].detach())))
             for name, m in ref64.named_modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            out = ref64(x64)
    finally:
        for h in hooks:
            h.remove()
    return seen, out


def conv_row(name, conv, x64, dtype):
    """One conv's errors: packed, aten-cl, aten-nchw against float64."""
    from fastres.ops import backend_cuda
    geometry = (tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)
    stride, padding, dilation, groups = geometry
    w64 = conv.weight.detach()
    b64 = None if conv.bias is None else conv.bias.detach()
    with torch.no_grad():
        ref = F.conv2d(x64, w64, b64, stride, padding, dilation, groups)
        x, w = x64.to(dtype), w64.to(dtype)
        b = None if b64 is None else b64.to(dtype)
        xcl = x.contiguous(memory_format=CL)
        packed_weight = backend_cuda.pack_conv_weight(w, stride, padding, dilation, groups, xcl.shape)
        packed = None if packed_weight is None else backend_cuda.prepacked_conv_bias_act(
            xcl, packed_weight, b, stride, padding, dilation, groups, None, False)
        aten_cl = F.conv2d(xcl, w.contiguous(memory_format=CL), b, stride, padding, dilation, groups)
        aten_nchw = F.conv2d(x.contiguous(), w.contiguous(), b, stride, padding, dilation, groups)
    errors = {"aten_cl": max_error(aten_cl, ref), "aten_nchw": max_error(aten_nchw, ref)}
    row = {"layer": name, "weight": list(w64.shape), "input": list(x64.shape), **errors,
           "reference_max_abs": ref.abs().max().item()}
    row.update(winograd_error(xcl, w, b, geometry, ref, errors["aten_cl"]))
    if packed is None:
        return {**row, "packed": None, "refused": "oneDNN refused to pack or run it"}
    row["packed"] = max_error(packed, ref)
    return {**row, **verdict(row["packed"], errors["aten_cl"], dtype, ref)}


def winograd_error(xcl, w, b, geometry, ref, aten_cl_error):
    """{winograd, winograd_ok}: _winograd_conv3x3's error against float64 and its verdict, both None where the
    conv is not one it computes (backend_cuda.winograd_applies)."""
    from fastres.ops import backend_cuda
    if not backend_cuda.WINOGRAD or not backend_cuda.winograd_applies(w, geometry):
        return {"winograd": None, "winograd_ok": None}
    with torch.no_grad():
        out = torch.ops.fastres._winograd_conv3x3(xcl, torch.ops.fastres._winograd_weight(w), b, None, False)
    error = max_error(out, ref)
    return {"winograd": error, "winograd_ok": verdict(error, aten_cl_error, w.dtype, ref)["ok"]}


def model_row(fast, ref, x64, dtype):
    """The whole model's errors: fastres (its second eval forward, channels_last input) and the reference model
    under ATen in each layout, against the reference in float64; and how many conv weights fastres packed."""
    from fastres.ops import backend_cuda
    ref64 = copy.deepcopy(ref).double()
    packed = [0]
    pack = backend_cuda.pack_conv_weight

    def counting_pack(*args):
        packed[0] += 1
        return pack(*args)

    autocast = torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16)
    x = x64.float()
    with torch.no_grad():
        out64 = ref64(x64)
        backend_cuda.pack_conv_weight = counting_pack
        try:
            with autocast:
                fast(x.contiguous(memory_format=CL))
        finally:
            backend_cuda.pack_conv_weight = pack
        with autocast:
            got = fast(x.contiguous(memory_format=CL))  # the steady state: the plan's one-call body where it has one
            aten_cl = copy.deepcopy(ref).to(memory_format=CL)(x.contiguous(memory_format=CL))
            aten_nchw = ref(x)
        graph, winograd_convs = graph_forward(fast, x) if dtype == torch.float32 else (None, None)
    errors = {"packed": max_error(got, out64), "aten_cl": max_error(aten_cl, out64),
              "aten_nchw": max_error(aten_nchw, out64)}
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in ref.modules())
    row = {"layer": "whole model", "weight": None, "input": list(x64.shape), **errors,
           "reference_max_abs": out64.abs().max().item(), "packed_weights": packed[0], "convs": convs,
           **verdict(errors["packed"], errors["aten_cl"], got.dtype, out64), "graph": None, "graph_ok": None,
           "winograd_convs": winograd_convs}
    if graph is not None:
        row["graph"] = max_error(graph, out64)
        row["graph_ok"] = verdict(row["graph"], errors["aten_cl"], graph.dtype, out64)["ok"]
    return row


def graph_forward(fast, x):
    """fast(x) as its plan's oneDNN Graph body (the plan's forward after the one that builds it: GRAPH_AFTER one-call
    bodies of this input after the two forwards model_row made, then the build), and how many _winograd_conv3x3 calls that forward made; (None,
    None) where it ran no graph (off, not applicable, or a NaN met a ReLU): then its convolutions are ATen's or
    _run_plan's, which the profile shows."""
    from torch.profiler import profile
    from fastres.models import _eval_plan
    if not _eval_plan.GRAPH_BODY:
        return None, None
    xcl = x.contiguous(memory_format=CL)
    for _ in range(_eval_plan.GRAPH_AFTER):
        fast(xcl)
    with profile() as prof:
        out = fast(xcl)
    names = [e.name for e in prof.events()]
    if {"fastres::_run_plan", "mkldnn::_convolution_pointwise", "aten::convolution"} & set(names):
        return None, None
    return out, names.count("fastres::_winograd_conv3x3")


def measure(args):
    arch = args.arch_spec
    size = args.input_size or arch.input_size
    dtype = DTYPES[args.dtype]
    shape = (args.batch_size, 3, size, size)
    fast, ref = C.build_pair(arch, seed=args.seed, calibrate_shape=shape)
    x64 = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed + 1), dtype=torch.float64)
    convs, _ = conv_inputs(copy.deepcopy(ref).double(), x64)
    rows = [conv_row(name, conv, x, dtype) for name, conv, x in convs]
    rows.append(model_row(fast, ref, x64, dtype))
    return rows, size


def report(args, rows, size, env):
    print(f"{args.arch_spec.label}, batch {args.batch_size}, {size}x{size}, {args.dtype}, eval; {env['device']}; "
          f"flags {', '.join(env['cpu_flags'] or [])}; torch {env['versions']['torch']}")
    print("max |error| against float64; rule: packed <= 2 x aten-cl + 4 ulps of the reference's magnitude")
    header = ["layer", "weight", "packed", "aten-cl", "aten-nchw", "packed / aten-cl", "packed / aten-nchw",
              "rule (vs aten-cl)", "winograd / graph", "its / aten-cl"]
    table = []
    for r in rows:
        shape = "x".join(map(str, r["weight"])) if r["weight"] else f"{r['packed_weights']} of {r['convs']} packed"
        # the conv's Winograd form, or the whole model's graph body (its Winograd convs counted)
        other, other_ok = (r["winograd"], r["winograd_ok"]) if r["weight"] else (r["graph"], r["graph_ok"])
        extra = ["", ""] if other is None else [
            f"{other:.2e}" + ("" if r["weight"] else f" ({r['winograd_convs']} winograd)") +
            ("" if other_ok else " EXCEEDS"), f"{other / r['aten_cl']:.2f}" if r["aten_cl"] else "inf"]
        if r["packed"] is None:
            table.append([r["layer"], shape, "refused", f"{r['aten_cl']:.2e}", f"{r['aten_nchw']:.2e}", "", "", "",
                          *extra])
            continue
        ratio = [f"{r['packed'] / a:.2f}" if a else ("1.00" if r["packed"] == 0 else "inf")
                 for a in (r["aten_cl"], r["aten_nchw"])]
        table.append([r["layer"], shape, f"{r['packed']:.2e}", f"{r['aten_cl']:.2e}", f"{r['aten_nchw']:.2e}",
                      *ratio, "within" if r["ok"] else f"EXCEEDS ({r['over']:.2f}x the bound)", *extra])
    print(C.format_table(header, table))


CSV_FIELDS = C.ENV_CSV_FIELDS + ["arch", "batch_size", "input_size", "dtype", "layer", "weight", "packed", "aten_cl",
                                 "aten_nchw", "limit", "ok", "winograd", "winograd_ok", "graph", "graph_ok"]


def main(argv=None):
    args = parse_args(argv)
    why = why_not_packed(DTYPES[args.dtype])
    if why is not None:
        print(f"packed_error: nothing to measure: {why}", file=sys.stderr)
        sys.exit(2)
    env = C.environment("cpu")
    rows, size = measure(args)
    report(args, rows, size, env)
    run = {"benchmark": "packed_error", **env, "arch": args.arch_spec.label, "batch_size": args.batch_size,
           "input_size": size, "dtype": args.dtype, "seed": args.seed, "rows": rows}
    csv_rows = [{**C.env_csv_columns(env), "arch": args.arch_spec.label, "batch_size": args.batch_size,
                 "input_size": size, "dtype": args.dtype,
                 **{k: ("x".join(map(str, r[k])) if k == "weight" and r[k] else r.get(k))
                    for k in CSV_FIELDS if k in r}} for r in rows]
    for path in C.write_results(args, "packed_error", run, csv_rows, CSV_FIELDS):
        print(f"appended to {path}")
    exceeded = [r["layer"] for r in rows if r["packed"] is not None and not r["ok"]]
    exceeded += [f"{r['layer']} (winograd)" for r in rows if r.get("winograd_ok") is False]
    exceeded += [f"{r['layer']} (graph)" for r in rows if r.get("graph_ok") is False]
    if exceeded:
        print(f"packed_error: past the tolerance rule: {', '.join(exceeded)}", file=sys.stderr)
        sys.exit(1)
    return run


if __name__ == "__main__":
    main()
