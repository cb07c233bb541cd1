"""CPU inference of torchvision's ResNet-50 detectors, whole (transform, backbone with FPN, heads, post-processing):
fastres.convert(model) beside the same model in eager PyTorch, in NCHW and in channels_last, and with --providers
peers beside what a user would run instead: torch.compile, onnxruntime and OpenVINO.

    OMP_NUM_THREADS=2 python benchmarks/detection.py                      # Faster R-CNN, one 800x1216 image
    OMP_NUM_THREADS=2 python benchmarks/detection.py --models fasterrcnn,retinanet,maskrcnn --rounds 8 --save
    OMP_NUM_THREADS=2 python benchmarks/detection.py --models fasterrcnn,retinanet,maskrcnn --providers peers --save

Models (--models, comma-separated): fasterrcnn (fasterrcnn_resnet50_fpn), fasterrcnn_v2 (fasterrcnn_resnet50_fpn_v2:
its heads' convolutions have BatchNorm), retinanet (retinanet_resnet50_fpn), maskrcnn (maskrcnn_resnet50_fpn),
keypointrcnn (keypointrcnn_resnet50_fpn). Each is built without pretrained weights (nothing is downloaded), its
BatchNorm statistics randomized (seeded), in eval. Providers, all copies of the same weights in fp32:
  eager      torchvision's model as built (NCHW)
  eager-cl   the same in channels_last (model.to(memory_format=torch.channels_last): its convolutions then run
             channels_last, ATen following the weights' layout)
  fastres    fastres.convert of the model, eval
Peers (--providers, comma-separated, added to the three above; `peers`: all of them):
  compile      torch.compile of eager-cl's model (mode "default"), with torch._inductor.config.freezing = True
               around its first call (the compilation: weights become constants, BN folded); where Inductor fails
               to freeze the model (torch 2.14.1 on these detectors: an InductorError in its reinplacing pass) it is
               compiled again without freezing, and the run says so
  onnxruntime  the model exported with torch.onnx.export(dynamo=False, opset 17; the dynamo exporter cannot follow
               the data-dependent shapes) for exactly these images, an InferenceSession on CPUExecutionProvider,
               graph optimizations ALL (folds BN), intra-op threads = torch's (`pip install -e ".[peers]"`)
  openvino     the same ONNX file through openvino.convert_model, compiled for "CPU" with INFERENCE_PRECISION_HINT
               f32, INFERENCE_NUM_THREADS = torch's threads, PERFORMANCE_HINT LATENCY
A peer whose package is not installed, or that fails to build or to run, is skipped with a note, not an error.
Each provider runs --warmup untimed forwards (fastres builds its plan, packed weights and the body's oneDNN Graph in
its first four), then --rounds timed rounds, each round every provider once in rotating order after --settle seconds
of idle, on the same --batch-size images of --input-size (H,W), which the model's transform resizes as it would any
(--min-size, --max-size: its min_size and max_size, torchvision's defaults 800 and 1333).
Reported: each provider's median (p20-p80) and fastres over each other provider, the median of the rounds' ratios
with its distribution-free 95% confidence interval (from 6 rounds).

Agreement: the backbone with its FPN (model.backbone) on the transformed batch, fastres's against float64, beside
eager's in each layout, held to the tolerance rule (fastres.testing.bound: twice the worse ATen layout's error plus a
floor), level by level. The detections themselves are reported, not held: a box near a score threshold or an NMS tie
may go either way under any rounding (the box counts, and where they match, the largest box-coordinate difference).
The peers are reported the same way (their backbones are not PyTorch modules).
"""
import argparse
import collections
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import _peers  # noqa: E402
import fastres  # noqa: E402
from fastres.testing import bound, max_error  # noqa: E402

MODELS = {"fasterrcnn": "fasterrcnn_resnet50_fpn", "fasterrcnn_v2": "fasterrcnn_resnet50_fpn_v2",
          "retinanet": "retinanet_resnet50_fpn", "maskrcnn": "maskrcnn_resnet50_fpn",
          "keypointrcnn": "keypointrcnn_resnet50_fpn"}
PROVIDERS = ("eager", "eager-cl", "fastres")  # always run: fastres's ratios, and the agreement's references
PEERS = ("compile", "onnxruntime", "openvino")
PEERS_KEYWORD = "peers"  # --providers peers: every peer
CSV_FIELDS = C.ENV_CSV_FIELDS + ["model", "provider", "batch_size", "height", "width", "ms", "ms_p20", "ms_p80",
                                 "fastres_over_this", "ci95_low", "ci95_high", "rounds"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="fasterrcnn", help=f"comma-separated, from {','.join(MODELS)}")
    p.add_argument("--providers", default=",".join(PROVIDERS),
                   help=f"comma-separated, from {','.join(PROVIDERS + PEERS)} ({','.join(PROVIDERS)} always run); "
                        f"{PEERS_KEYWORD}: all of them")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward (default 1)")
    p.add_argument("--input-size", default="800,1216", metavar="H,W",
                   help="the images' height and width (default 800,1216; the model's transform resizes them)")
    p.add_argument("--min-size", type=int, default=800,
                   help="the model transform's min_size, what it resizes an image's shorter side to (default 800)")
    p.add_argument("--max-size", type=int, default=1333,
                   help="the model transform's max_size, the longest side it allows (default 1333)")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (default 6)")
    p.add_argument("--warmup", type=int, default=4,
                   help="untimed forwards per provider first (default 4: fastres builds its graph in the fourth)")
    p.add_argument("--settle", type=float, default=0.1, metavar="SECONDS", help="idle before each timed forward")
    p.add_argument("--seed", type=int, default=0)
    C.add_output_args(p)
    args = p.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        p.error(f"--models: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(MODELS)}")
    args.model_names = list(dict.fromkeys(names))
    asked = [n.strip() for n in args.providers.split(",") if n.strip()]
    unknown = [n for n in asked if n not in PROVIDERS + PEERS + (PEERS_KEYWORD,)]
    if unknown:
        p.error(f"--providers: unknown {', '.join(unknown)}; choose from {', '.join(PROVIDERS + PEERS)} "
                f"(or {PEERS_KEYWORD})")
    args.peers = [n for n in PEERS if n in asked or PEERS_KEYWORD in asked]
    try:
        size = tuple(int(v) for v in args.input_size.split(","))
    except ValueError:
        size = ()
    if len(size) != 2 or min(size) < 32:
        p.error(f"--input-size must be H,W with both at least 32, got {args.input_size!r}")
    args.size = size
    for name, least in (("batch_size", 1), ("rounds", 1), ("warmup", 0), ("min_size", 32), ("max_size", 32)):
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    if args.settle < 0:
        p.error(f"--settle must be at least 0, got {args.settle}")
    return args


def build_model(name, seed, min_size=800, max_size=1333):
    """torchvision's detector, no pretrained weights, its BatchNorm statistics randomized, eval."""
    import torchvision
    torch.manual_seed(seed)
    builder = getattr(torchvision.models.detection, MODELS[name])
    model = builder(weights=None, weights_backbone=None, min_size=min_size, max_size=max_size)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torchvision.ops.FrozenBatchNorm2d)):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
    return model.eval()


def providers(model):
    """{provider: model}: copies of the same weights."""
    return {"eager": model,
            "eager-cl": copy.deepcopy(model).to(memory_format=torch.channels_last),
            "fastres": fastres.convert(copy.deepcopy(model)).eval()}


def backbone_agreement(models, images):
    """Per FPN level: fastres's backbone error against float64, the worse eager layout's, the rule's bound, ok."""
    reference = models["eager"]
    with torch.no_grad():
        batch = reference.transform(images)[0].tensors
        ref64 = copy.deepcopy(reference.backbone).double()(batch.double())
        eager = [models[n].backbone(batch.contiguous(memory_format=fmt))
                 for n, fmt in (("eager", torch.contiguous_format), ("eager-cl", torch.channels_last))]
        got = models["fastres"].backbone(batch.contiguous(memory_format=torch.channels_last))
    levels = {}
    for level, r in ref64.items():
        aten = max(max_error(e[level], r) for e in eager)
        error = max_error(got[level], r)
        limit = bound(aten, torch.float32, r)
        levels[level] = {"error": error, "aten_error": aten, "limit": limit, "ok": error <= limit}
    return levels


def detections_summary(outputs):
    """{provider: [boxes per image]}, and the largest box-coordinate difference from eager's where the counts match."""
    counts = {n: [len(o["boxes"]) for o in out] for n, out in outputs.items()}
    diffs = {}
    for n, out in outputs.items():
        if n != "eager" and counts[n] == counts["eager"]:
            diffs[n] = max((float((a["boxes"] - b["boxes"]).abs().max()) for a, b in zip(outputs["eager"], out)
                            if len(a["boxes"])), default=0.0)
    return counts, diffs


def compiled_detector(model, notes):
    """call(images): torch.compile(model), frozen where Inductor can freeze it (see the module's docstring); what
    was done goes to `notes` on the first call."""
    compiled = torch.compile(model)
    first = [True]

    def call(images):
        if not first[0]:
            return compiled(images)
        first[0] = False
        try:
            with torch._inductor.config.patch(freezing=True):
                out = compiled(images)
        except Exception as e:  # noqa: BLE001 - Inductor's failure to freeze: compiled without freezing instead
            if _peers._is_time_limit(e):
                raise
            torch._dynamo.reset()  # (the failed compilation's state)
            notes.append(f"torch.compile(mode default) of eager-cl's model, without freezing: with "
                         f"torch._inductor.config.freezing = True it failed ({_peers._short(e)})")
            return compiled(images)
        notes.append("torch.compile(mode default) of eager-cl's model, torch._inductor.config.freezing = True "
                     "around its first call")
        return out
    return call


def peer_calls(args, model, models, images):
    """({peer: call()}, {peer: notes}, {peer: why skipped}) for args.peers: the engines built from `model` (the
    eager reference), compile from eager-cl's model."""
    calls, notes, skipped = {}, {}, {}
    engines = []
    for name in args.peers:
        why = _peers.unavailable(name)
        if why is not None:
            skipped[name] = why
        elif name in _peers.ENGINES:
            engines.append(name)
    built = _peers.detector_engines(model, images, torch.get_num_threads(), engines) if engines else {}
    for name in args.peers:
        if name == "compile":
            notes[name] = []
            calls[name] = (lambda c=compiled_detector(models["eager-cl"], notes[name]): c(images))
        elif isinstance(built.get(name), Exception):
            skipped[name] = f"failed to build: {_peers._short(built[name])}"
        elif name in built:
            run, notes[name] = built[name]
            calls[name] = (lambda r=run: r(images))
    return calls, notes, skipped


def measure(args, name, interrupts):
    model = build_model(name, args.seed, args.min_size, args.max_size)
    models = providers(model)
    gen = torch.Generator().manual_seed(args.seed)
    images = [torch.rand(3, *args.size, generator=gen) for _ in range(args.batch_size)]
    calls = {n: (lambda m=m: m(images)) for n, m in models.items()}
    peers, notes, skipped = peer_calls(args, model, models, images)
    calls.update(peers)
    for n, why in skipped.items():
        print(f"{name}: {n} skipped: {why}", file=sys.stderr, flush=True)
    samples = {}
    outputs = {}

    def run():
        with torch.inference_mode():
            for n in list(calls):
                try:
                    for _ in range(args.warmup):
                        calls[n]()
                    outputs[n] = calls[n]()
                except Exception as e:  # noqa: BLE001 - a peer that fails to run is skipped; ours must not fail
                    if n not in peers or _peers._is_time_limit(e):
                        raise
                    skipped[n] = f"failed: {_peers._short(e)}"
                    print(f"{name}: {n} skipped: {skipped[n]}", file=sys.stderr, flush=True)
                    del calls[n]
            samples.update({n: [] for n in calls})
            names = list(calls)
            for rnd in range(args.rounds):
                for i in range(len(names)):
                    n = names[(rnd + i) % len(names)]
                    time.sleep(args.settle)
                    start = time.perf_counter()
                    calls[n]()
                    samples[n].append(time.perf_counter() - start)
                print(f"{name}: round {rnd + 1} of {args.rounds} timed", file=sys.stderr, flush=True)

    stopped = interrupts.run(run)
    agreement = backbone_agreement(models, images)
    counts, diffs = detections_summary(outputs) if set(outputs) == set(calls) else ({}, {})
    rounds = min((len(s) for s in samples.values()), default=0)
    results = {}
    for n, s in samples.items():
        if not s:
            continue
        q = C.quantiles(s)
        entry = {"ms": 1e3 * q[1], "ms_p20": 1e3 * q[0], "ms_p80": 1e3 * q[2], "timed": len(s)}
        if n in notes:
            entry["notes"] = notes[n]
        if n != "fastres" and rounds:
            per_round = [theirs / ours for theirs, ours in zip(s[:rounds], samples["fastres"][:rounds])]
            ci = C.median_ci(per_round)
            entry["fastres_over_this"] = {"median": statistics.median(per_round), "ci95": ci and list(ci),
                                          "rounds": rounds}
        results[n] = entry
    return {"model": name, "results": results, "skipped": skipped, "backbone_agreement": agreement,
            "boxes": counts, "max_box_difference": diffs, "stopped_early": stopped}


def report(args, env, run):
    h, w = args.size
    print(f"{run['model']} ({MODELS[run['model']]}) | fp32 | {args.batch_size} image(s) of {h}x{w} | "
          f"{env['device']} | {torch.get_num_threads()} threads | torch {env['versions']['torch']} | "
          f"commit {env['commit'][:12]} | {env['date']}")
    rows = []
    for n, r in run["results"].items():
        ratio = r.get("fastres_over_this")
        if ratio is None:
            cell = "-"
        else:
            ci = ratio["ci95"]
            cell = f"{ratio['median']:.3f}x" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else " [under 6 rounds]")
        rows.append([n, f"{r['ms']:.0f}", f"{r['ms_p20']:.0f}-{r['ms_p80']:.0f}", cell])
    print(C.format_table(["provider", "median ms", "p20-p80 ms", "fastres over this (per-round median [95% CI])"],
                         rows, align="lrrl"))
    for level, a in run["backbone_agreement"].items():
        verdict = "ok" if a["ok"] else "EXCEEDS the rule"
        print(f"backbone level {level}: fastres error {a['error']:.2e}, eager's worse layout {a['aten_error']:.2e}, "
              f"bound {a['limit']:.2e}: {verdict}")
    for n, r in run["results"].items():
        for note in r.get("notes", ()):
            print(f"{n}: {note}")
    for n, why in run["skipped"].items():
        print(f"{n}: skipped: {why}")
    if run["boxes"]:
        print("boxes per image: " + ", ".join(f"{n} {c}" for n, c in run["boxes"].items())
              + "".join(f"; {n}'s largest box difference from eager's {d:.2e}"
                        for n, d in run["max_box_difference"].items()))
    if run["stopped_early"]:
        print("SIGTERM: stopped early")


def main(argv=None):
    args = parse_args(argv)
    interrupts = C.Interrupts().install()
    env = C.environment(torch.device("cpu"))
    env["versions"].update(_peers.versions(args.peers))
    runs, csv_rows, ok = [], [], True
    for name in args.model_names:
        run = measure(args, name, interrupts)
        report(args, env, run)
        runs.append(run)
        ok = ok and all(a["ok"] for a in run["backbone_agreement"].values())
        for n, r in run["results"].items():
            ratio = r.get("fastres_over_this") or {}
            ci = ratio.get("ci95") or [None, None]
            csv_rows.append({**C.env_csv_columns(env), "model": name, "provider": n, "batch_size": args.batch_size,
                             "height": args.size[0], "width": args.size[1], "ms": round(r["ms"], 2),
                             "ms_p20": round(r["ms_p20"], 2), "ms_p80": round(r["ms_p80"], 2),
                             "fastres_over_this": ratio.get("median"), "ci95_low": ci[0], "ci95_high": ci[1],
                             "rounds": r["timed"]})
        if run["stopped_early"]:
            break
    settings = {"providers": list(PROVIDERS) + args.peers, "batch_size": args.batch_size,
                "input_size": list(args.size), "min_size": args.min_size, "max_size": args.max_size,
                "rounds": args.rounds,
                "warmup": args.warmup, "settle_s": args.settle, "seed": args.seed, "threads": torch.get_num_threads()}
    written = C.write_results(args, "detection", {"benchmark": "detection", **env, "settings": settings,
                                                  "runs": runs, "malloc": C.fastres_malloc_state(),
                                                  "pinned_threads": C.fastres_threads_state()},
                              csv_rows, CSV_FIELDS)
    for path in written:
        print(f"appended to {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
