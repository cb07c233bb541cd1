"""The benchmark commands run end to end on tiny configurations and write the documented fields.

The throughput, kernels, memory and plot commands are run the way the GPU machine runs them: through
benchmarks/gpu_suite.sh, in its CPU smoke mode, once for this module (each command a subprocess of the script).
No timing is asserted (performance is what the scripts report, not what tests check)."""
import copy
import csv
import importlib.util
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tarfile

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)
import _common as C  # noqa: E402
import _peers  # noqa: E402
import cpu_breakdown  # noqa: E402
import detection  # noqa: E402
import eval_memory  # noqa: E402
import memory  # noqa: E402
import packed_error  # noqa: E402
import throughput  # noqa: E402
import train_modes  # noqa: E402
import tune_models  # noqa: E402
from tolerance import assert_within  # noqa: E402

# The scripts are imported (they put their folder first on sys.path, for _common): take it off again, or its file
# names would shadow installed packages for the rest of the session. benchmarks/kernels.py shadowed Hugging Face's
# `kernels`, which transformers (5.25) imports.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != BENCHMARKS]

# Small ceiling measurements: the smoke runs' figures mean nothing anyway.
QUICK_ENV = {"FASTRES_BENCH_CEILING_SIZE": "256"}


def script_env(**extra):
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **QUICK_ENV, **extra)


def read_json_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


ENV_FIELDS = {"date", "commit", "device", "device_type", "versions"}
CSV_KEY_FIELDS = {"date", "commit", "device", "torch", "triton"}


# ------------------------------------------------------------------------------------------------ gpu_suite.sh
@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """benchmarks/gpu_suite.sh OUTDIR in smoke mode (less the tune step, which measures nothing on CPU: see
    test_tune_models)."""
    out = tmp_path_factory.mktemp("suite")
    r = subprocess.run(["bash", os.path.join(BENCHMARKS, "gpu_suite.sh"), str(out)], capture_output=True, text=True,
                       timeout=600, cwd=ROOT,
                       env=script_env(FASTRES_SUITE_SMOKE="1", FASTRES_SUITE_SKIP="tune", PYTHON=sys.executable,
                                      FASTRES_SUITE_RETURN=str(out / "returned")))
    return out, r


def test_suite_runs_every_step(suite):
    out, r = suite
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    steps = {row["step"]: row for row in csv.DictReader(open(out / "steps.tsv"), delimiter="\t")}
    # correctness first (gpu_check, pytest), then the headline, the tuning pass, and the rest
    assert list(steps) == ["env", "build", "gpu_check", "pytest", "throughput_cifar_resnet20_infer", "tune",
                           "throughput_cifar_resnet20_train", "kernels", "bn_kernels", "memory", "train_modes",
                           "flops", "plot", "bundle"]
    assert steps["build"]["status"] == "skipped (smoke)" and steps["tune"]["status"].startswith("skipped")
    for name, row in steps.items():
        if name not in ("build", "tune"):
            assert row["status"] == "ok" and row["exit"] == "0", (name, row)
            assert (out / "logs" / f"{name}.log").exists() or name == "bundle"
    env = (out / "env.txt").read_text()
    assert "commit:" in env and "torch" in env and "triton" in env
    with tarfile.open(out / "bundle.tar.gz") as bundle:
        names = bundle.getnames()
    for path in ("./env.txt", "./steps.tsv", "./results/throughput.jsonl", "./results/kernels.csv",
                 "./results/bn_kernels.jsonl", "./results/train_modes.jsonl", "./plots/summary.md",
                 "./results/gpu_check.jsonl"):
        assert path in names
    # what a device run brings back: at most 8 files
    returned = sorted(os.listdir(out / "returned"))
    assert returned == ["bundle.tar.gz", "gpu_check.jsonl", "kernels.jsonl", "steps.tsv", "summary.md",
                        "throughput.jsonl", "train_modes.jsonl"]


def test_suite_gpu_check_results(suite):
    """The correctness sweep ran every op kind on both layouts and both dtypes it was given, held each result to
    the rule, and logged the backend and kernel each op ran."""
    out, _ = suite
    rows = read_json_lines(out / "results" / "gpu_check.jsonl")
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    checks = {r["check"] for r in rows}
    assert {"model resnet50 inference fp32 nhwc", "model resnet50 train step fp32 nhwc"} <= checks
    kernel_rows = [r for r in rows if not r["check"].startswith("model")]
    assert {(r["backend"], r["op"]) for r in kernel_rows} == {
        ("triton", op) for op in ("conv_bias_act", "conv_bn_eval", "conv_bn_train", "bn_relu_conv")} | {
        ("cuda", op) for op in ("conv_bn_eval", "conv_bn_train", "dual_bn_act")}
    assert {(r["dtype"], r["layout"]) for r in kernel_rows} == {(d, l) for d in ("fp32", "fp16")
                                                               for l in ("nhwc", "nchw")}
    for r in kernel_rows:
        assert all(names == [r["backend"]] for names in r["backends_run"].values()), r
        assert r["errors"] and all(len(e) == 2 for e in r["errors"].values())
    triton_train = next(r for r in kernel_rows if r["backend"] == "triton" and r["op"] == "conv_bn_train")
    assert {"conv_bn_act_forward", "bn_act_backward", "conv_backward"} <= set(triton_train["backends_run"])
    assert set(triton_train["kernels_run"]) == {"conv_stats", "dgrad", "wgrad"}


def test_suite_build_falls_back_without_cuda(tmp_path):
    """A CUDA build that fails (here: a pip that refuses unless FASTRES_SKIP_CUDA_BUILD=1) is rebuilt without CUDA
    kernels, the step says so, and the reason lands in the log and the summary."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
if [ "$1 $2" = "-m pip" ]; then
    if [ "${{FASTRES_SKIP_CUDA_BUILD:-0}}" = 1 ]; then echo "built without CUDA"; exit 0; fi
    echo "nvcc fatal   : Unsupported gpu architecture 'compute_100'" >&2; exit 1
fi
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    out = tmp_path / "suite"
    r = subprocess.run(["bash", os.path.join(BENCHMARKS, "gpu_suite.sh"), str(out)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT,
                       env=script_env(FASTRES_SUITE_SMOKE="1", FASTRES_SUITE_BUILD="1", FASTRES_SUITE_ONLY="env build",
                                      PYTHON=str(fake)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = {row["step"]: row for row in csv.DictReader(open(out / "steps.tsv"), delimiter="\t")}
    assert steps["build"]["status"] == "fallback: built without CUDA kernels" and steps["build"]["exit"] == "3"
    assert steps["gpu_check"]["status"].startswith("skipped")
    log = (out / "logs" / "build.log").read_text()
    assert "FALLBACK" in log and "Unsupported gpu architecture" in log and "built without CUDA" in log
    assert "Unsupported gpu architecture" in (out / "build_fallback.txt").read_text()


def test_suite_throughput_results(suite):
    out, _ = suite
    runs = read_json_lines(out / "results" / "throughput.jsonl")
    assert [run["settings"]["mode"] for run in runs] == ["infer", "train"]
    for run in runs:
        assert ENV_FIELDS <= set(run) and run["benchmark"] == "throughput"
        assert {"torch", "triton"} <= set(run["versions"])
        s = run["settings"]
        assert (s["arch"], s["batch_size"], s["iters"], s["warmup"], s["input_size"], s["dtype"]) == \
            ("cifar_resnet20", 2, 2, 0, 32, "fp32")
        assert s["cuda_graphs"] is False and s["providers"] == ["fastres", "eager"]
        assert set(run["results"]) == {"fastres", "eager"} and run["skipped"] == {}
        assert run["ceiling"]["tflops"] > 0 and set(run["ceiling"]["by_method"]) == {"mm", "conv1x1"}
        for name, result in run["results"].items():
            assert len(result["times_s"]) == 2 and all(t > 0 for t in result["times_s"])
            ips = result["images_per_s"]
            assert ips["p20"] <= ips["median"] <= ips["p80"]
            for q, inverse in (("median", "median"), ("p20", "p80"), ("p80", "p20")):
                assert result["latency_ms"][q] == pytest.approx(1e3 * 2 / ips[inverse])
            assert result["peak_memory_bytes"] > 0 and result["first_call_s"] > 0
            assert result["tflops"] == pytest.approx(
                2 * run["macs_per_image"]["counted"]["fastres"] * ips["median"] / 1e12)
            assert result["ceiling_share"] == pytest.approx(result["tflops"] / run["ceiling"]["tflops"])
            other = "eager" if name == "fastres" else "fastres"
            assert result["ratios"][other] == pytest.approx(
                ips["median"] / run["results"][other]["images_per_s"]["median"])
            per_round = [b / a for a, b in zip(result["times_s"], run["results"][other]["times_s"])]
            assert result["paired_ratios"][other] == {"median": pytest.approx(sum(per_round) / 2), "ci95": None,
                                                      "rounds": 2}  # 2 rounds: too few for an interval
        assert run["results"]["eager"]["ratio_vs_eager"] == 1.0
        counted = run["macs_per_image"]["counted"]
        assert counted["fastres"] == counted["eager"] > 0
        assert run["agreement"]["relative"] < 1e-4  # fp32, same weights
        assert run["stopped_early"] is False and run["wall_s"] > 0
    rows = read_csv(out / "results" / "throughput.csv")
    assert [(r["mode"], r["provider"]) for r in rows] == [("infer", "fastres"), ("infer", "eager"),
                                                          ("train", "fastres"), ("train", "eager")]
    assert CSV_KEY_FIELDS <= set(rows[0]) and json.loads(rows[0]["settings"])["arch"] == "cifar_resnet20"


def test_suite_kernels_results(suite):
    out, _ = suite
    (run,) = read_json_lines(out / "results" / "kernels.jsonl")
    assert ENV_FIELDS <= set(run) and run["benchmark"] == "kernels" and run["settings"]["tiny"] is True
    assert run["ceilings"]["matmul"]["tflops"] > 0 and run["ceilings"]["copy"]["gbps"] > 0
    rows = {(r["op"], r["item"]): r for r in run["rows"]}
    # bn_act needs a backend with a fused kernel (fastres._C built, or triton): else it is listed, not measured
    no_kernel = {tuple(item.split(":")) for item in run["no_kernel"]}
    assert no_kernel <= {("bn_act", "stage1"), ("bn_act", "stage1+res")}
    assert set(rows) | no_kernel == {("conv_bias_act", "l1.conv1"), ("conv_bias_act", "l2.conv2"),
                                     ("conv_bn_act", "l1.conv1"), ("conv_bn_act", "l2.conv2"),
                                     ("bn_relu_conv", "l2.conv2"), ("add_relu", "stage1"), ("bn_act", "stage1"),
                                     ("bn_act", "stage1+res")}
    for (op, item), r in rows.items():
        assert r["agree"] < 1e-5, (op, item, r["agree"])  # fp32: fastres computes what ATen computes
        assert r["bound"] in ("compute", "memory") and r["floor_ms"] > 0
        for p in r["providers"].values():
            assert p["ms_p20"] <= p["ms"] <= p["ms_p80"]
            assert p["roofline_share"] == pytest.approx(r["floor_ms"] / p["ms"])
        if op in ("conv_bias_act", "conv_bn_act"):
            sh = r["shape"]
            out_side = (sh["size"] + 2 * (sh["k"] // 2) - sh["k"]) // sh["stride"] + 1
            macs = sh["n"] * out_side ** 2 * sh["cout"] * sh["cin"] * sh["k"] ** 2
            assert r["flops"] == (2 if op == "conv_bias_act" else 6) * macs
        else:
            assert op != "add_relu" or r["bytes"] == 3 * 4 * r["shape"]["n"] * r["shape"]["c"] * r["shape"]["side"] ** 2
    assert {"conv only", "gemm"} <= set(rows[("conv_bias_act", "l1.conv1")]["providers"])
    table = read_csv(out / "results" / "kernels.csv")
    assert len(table) == sum(len(r["providers"]) for r in run["rows"]) and CSV_KEY_FIELDS <= set(table[0])


def test_suite_memory_results(suite):
    out, _ = suite
    (run,) = read_json_lines(out / "results" / "memory.jsonl")
    assert ENV_FIELDS <= set(run) and run["benchmark"] == "memory"
    assert run["settings"]["batch_sizes"] == [2, 4]
    rows = {(r["provider"], r["batch_size"]): r for r in run["rows"]}
    assert set(rows) == {("fastres", 2), ("fastres", 4), ("eager", 2), ("eager", 4)}
    for provider in ("fastres", "eager"):
        small, large = rows[(provider, 2)], rows[(provider, 4)]
        for r in (small, large):
            assert r["saved_bytes"] > r["saved_activation_bytes"] > 0  # the weights are saved too, not counted
            assert r["peak_memory_bytes"] > 0 and r["saved_tensors"] >= r["saved_storages"] > 0
        # activations scale with the batch; the saved weights do not
        assert large["saved_activation_bytes"] > 1.5 * small["saved_activation_bytes"]
        assert large["saved_bytes"] - large["saved_activation_bytes"] == \
            small["saved_bytes"] - small["saved_activation_bytes"]
    assert rows[("eager", 2)]["peak_vs_eager"] == 1.0
    assert len(read_csv(out / "results" / "memory.csv")) == 4


def test_suite_plots(suite):
    out, _ = suite
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    patterns = [r"kernels_[a-z0-9-]+_fp32_b1_tiny\.png", r"memory_[a-z0-9-]+_cifar_resnet20_fp32\.png",
                r"throughput_[a-z0-9-]+_infer_fp32_b2\.png", r"throughput_[a-z0-9-]+_train_fp32_b2\.png"]
    assert len(pngs) == len(patterns) and all(re.fullmatch(p, n) for p, n in zip(patterns, pngs)), pngs
    import matplotlib.image
    for name in pngs:
        image = matplotlib.image.imread(out / "plots" / name)
        assert image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 0  # not blank
    summary = (out / "plots" / "summary.md").read_text()
    assert "### Throughput" in summary and "### Memory" in summary and "### Fused ops" in summary


def test_suite_flops_results(suite):
    out, _ = suite
    (run,) = read_json_lines(out / "results" / "flops.jsonl")
    assert ENV_FIELDS <= set(run) and run["benchmark"] == "flops" and run["ok"] is True
    assert run["settings"]["input_size"] == 224
    rows = {(row["model"], row["variant"]): row for row in run["rows"]}
    assert len(rows) == 12 and ("plain34", "") in rows and ("resnet50", "v1") in rows
    for row in rows.values():
        assert row["counted_macs"] == row["reference_macs"] and row["ok"] is True
    assert round(rows[("resnet152", "v1.5")]["counted_macs"] / 1e9, 3) == 11.514
    assert abs(rows[("resnet50", "v1")]["rel_diff_vs_paper"]) <= 0.02
    table = read_csv(out / "results" / "flops.csv")
    assert len(table) == 12 and set(table[0]) >= CSV_KEY_FIELDS | {"settings", "counted_macs"}
    assert "all checks passed" in (out / "logs" / "flops.log").read_text()


def test_tune_models(capsys):
    assert tune_models.main(["--arch", "cifar_resnet20", "--batch-size", "2", "--dtype", "fp32", "--device",
                             "cpu"]) == 0
    out = capsys.readouterr().out
    assert "infer:" in out and "train:" in out  # CPU: the problems met, nothing measured


# ------------------------------------------------------------------------------------------------ throughput.py
def test_throughput_compile_timeout_and_sigterm(tmp_path):
    """A compile provider that outlasts --compile-timeout is dropped; SIGTERM during the timed batches ends the run
    early, and what was measured is still reported and written."""
    json_path = tmp_path / "t.jsonl"
    proc = subprocess.Popen([sys.executable, os.path.join(BENCHMARKS, "throughput.py"), "--arch", "cifar_resnet20",
                             "--batch-size", "2", "--iters", "100000", "--warmup", "0", "--time-budget", "0",
                             "--providers", "fastres,eager,compile", "--compile-timeout", "0.5",
                             "--json", str(json_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=script_env())
    try:
        for line in proc.stderr:
            if line.startswith("timed batches: start"):
                break
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout + stderr
    assert "SIGTERM: stopped early" in stdout
    (run,) = read_json_lines(json_path)
    assert run["stopped_early"] is True and "compile timeout" in run["skipped"]["compile"]
    assert set(run["results"]) == {"fastres", "eager"}
    assert 1 <= run["timed_batches"] < 100000
    assert all(len(r["times_s"]) == run["timed_batches"] for r in run["results"].values())


# ------------------------------------------------------------------------------------------------ SIGTERM
def run_until_first_row(script, args, row_marker):
    """Start benchmarks/SCRIPT with ARGS, send SIGTERM once its stderr shows a measured row (a line containing
    row_marker), and return (exit code, stdout, stderr after the signal)."""
    proc = subprocess.Popen([sys.executable, os.path.join(BENCHMARKS, script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=script_env())
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if row_marker in line:
                break
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert any(row_marker in line for line in seen), "".join(seen)[-3000:]
    return proc.returncode, stdout, "".join(seen) + stderr


def test_kernels_sigterm_keeps_the_measured_rows(tmp_path):
    """SIGTERM after the first row: the rows measured so far are written (CSV rows as each is measured, the run's
    JSON line at the end, with stopped_early and the rows not reached)."""
    json_path, csv_path = tmp_path / "k.jsonl", tmp_path / "k.csv"
    layers = ["l1.conv1", "l1.conv3", "l2.conv2", "l3.conv2s2", "l3.conv2", "l4.conv2"]
    rc, stdout, stderr = run_until_first_row("kernels.py", [
        "--device", "cpu", "--tiny", "--ops", "conv_bias_act", "--layers", ",".join(layers), "--reps", "40",
        "--rounds", "1", "--json", str(json_path), "--csv", str(csv_path)], "fastres")
    assert rc == 0, stdout + stderr
    assert "SIGTERM: stopped early" in stdout
    (run,) = read_json_lines(json_path)
    assert run["stopped_early"] is True
    measured = [r["item"] for r in run["rows"]]
    assert 1 <= len(measured) < len(layers)
    assert sorted(measured + [k.split(":")[1] for k in run["not_measured"]]) == sorted(layers)
    table = read_csv(csv_path)
    assert [(r["item"], r["provider"]) for r in table] == [
        (r["item"], p) for r in run["rows"] for p in r["providers"]]


def test_memory_sigterm_keeps_the_measured_rows(tmp_path):
    json_path, csv_path = tmp_path / "m.jsonl", tmp_path / "m.csv"
    batches = [2, 4, 6, 8, 10, 12, 14, 16]
    rc, stdout, stderr = run_until_first_row("memory.py", [
        "--device", "cpu", "--arch", "cifar_resnet20", "--batch-sizes", ",".join(map(str, batches)),
        "--json", str(json_path), "--csv", str(csv_path)], "batch    2: peak")
    assert rc == 0, stdout + stderr
    assert "SIGTERM: stopped early" in stdout
    (run,) = read_json_lines(json_path)
    assert run["stopped_early"] is True
    assert 1 <= len(run["rows"]) < 2 * len(batches)
    assert run["rows"][0]["provider"] == "fastres" and run["rows"][0]["batch_size"] == 2
    assert all(r["peak_memory_bytes"] > 0 and r["saved_activation_bytes"] > 0 for r in run["rows"])
    assert len(read_csv(csv_path)) == len(run["rows"])


def test_bn_kernels_sigterm_keeps_the_measured_rows(tmp_path):
    json_path = tmp_path / "b.jsonl"
    shapes = ["16x8", "32x8", "48x8", "64x8", "80x8", "96x8"]
    rc, stdout, stderr = run_until_first_row("bn_kernels.py", [
        "--device", "cpu", "--batch-size", "2", "--shapes", ",".join(shapes), "--reps", "200", "--rounds", "1",
        "--json", str(json_path)], "fastres")
    assert rc == 0, stdout + stderr
    (run,) = read_json_lines(json_path)
    assert run["stopped_early"] is True and 1 <= len(run["results"]) < len(shapes) * 6
    assert run["results"][0]["shape"] == [2, 16, 8, 8]


def test_train_modes_sigterm_keeps_the_timed_steps(tmp_path):
    json_path = tmp_path / "t.jsonl"
    rc, stdout, stderr = run_until_first_row("train_modes.py", [
        "--device", "cpu", "--arch", "cifar_resnet20", "--batch-size", "2", "--rounds", "10000",
        "--json", str(json_path)], "round 1 of 10000 timed")
    assert rc == 0, stdout + stderr
    (run,) = read_json_lines(json_path)
    assert run["stopped_early"] is True and "eager" in run["results"]
    for r in run["results"].values():
        assert 1 <= r["timed_steps"] < 10000 and r["ms_p20"] <= r["ms"] <= r["ms_p80"]


@pytest.mark.peers
@pytest.mark.skipif(eval_memory.bytes_in_use() is None, reason="needs glibc's mallinfo2")
def test_eval_memory_reports_what_each_provider_holds(tmp_path):
    """eval_memory.py: each provider in a process of its own, a row per (cycle, batch size) of the bytes it holds
    over those after building, in the JSON line and the CSV; fastres holds its folds and graphs (more than eager's
    few retained activations), and nothing more in a second cycle over the same shapes than in a third."""
    json_path, csv_path = tmp_path / "m.jsonl", tmp_path / "m.csv"
    r = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "eval_memory.py"), "--arch", "resnet18",
                        "--input-size", "32", "--batch-sizes", "1,2", "--cycles", "3", "--calls", "4",
                        "--json", str(json_path), "--csv", str(csv_path)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=script_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (run,) = read_json_lines(json_path)
    assert run["benchmark"] == "eval_memory" and list(run["results"]) == ["fastres", "eager"]
    for result in run["results"].values():
        assert [(s["cycle"], s["batch_size"]) for s in result["steps"]] == [(c, b) for c in range(3) for b in (1, 2)]
        assert result["weight_bytes"] > 40e6  # ResNet-18's 11.7 M parameters in fp32
    fastres_held = [s["held_bytes"] for s in run["results"]["fastres"]["steps"]]
    eager_held = [s["held_bytes"] for s in run["results"]["eager"]["steps"]]
    assert min(fastres_held) > max(eager_held)
    assert max(fastres_held[4:]) <= max(fastres_held[2:4]) + 2**20  # (1 MiB: the allocator's own bookkeeping)
    rows = read_csv(csv_path)
    assert len(rows) == 12 and {row["provider"] for row in rows} == {"fastres", "eager"}


def test_interrupts_run_ends_the_function_at_sigterm():
    """Interrupts.run: SIGTERM raises into the function (past its own `except Exception`), later ones do not."""
    interrupts = C.Interrupts()
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM)
    interrupts.install()
    done = []

    def work():
        for i in range(5):
            try:
                if i == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
            except Exception:  # a measuring step's own error handling must not swallow the stop
                pass
            done.append(i)
    try:
        assert interrupts.run(work) is True and done == [0, 1]
        os.kill(os.getpid(), signal.SIGTERM)  # outside run(): only sets `stop`
        assert interrupts.run(done.append, 9) is True and done == [0, 1]
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGALRM, before[1])


@pytest.mark.parametrize("script, args, message", [
    ("throughput", ["--arch", "resnet19"], "--arch"),
    ("throughput", ["--arch", "resnet18", "--providers", "fastres,bogus"], "--providers"),
    ("throughput", ["--arch", "resnet18", "--providers", "eager,eager"], "--providers"),
    ("throughput", ["--arch", "resnet18", "--mode", "train", "--batch-size", "1"], "--batch-size"),
    ("throughput", ["--arch", "resnet18", "--compile-timeout", "-1"], "--compile-timeout"),
    ("throughput", ["--arch", "resnet18", "--settle", "-0.1"], "--settle"),
    ("throughput", ["--arch", "resnet18", "--memory-mode", "lean"], "--memory-mode applies to --mode train"),
    ("throughput", ["--arch", "resnet18", "--mode", "train", "--memory-mode", "checkpoint"], "--memory-mode"),
    ("throughput", ["--arch", "resnet18", "--device", "cpu", "--mode", "train", "--providers", "fastres,onnxruntime"],
     "CPU inference peers"),
    ("throughput", ["--arch", "resnet18", "--device", "cpu", "--providers", "eager,openvino", "--dtype", "bf16"],
     "need --dtype fp32"),
    ("throughput", ["--arch", "resnet18", "--device", "cpu", "--no-channels-last", "--providers", "eager,eager-nchw"],
     "eager already runs NCHW"),
    ("throughput", ["--arch", "resnet18", "--device", "cpu", "--providers", "peers,eager"], "--providers"),
    ("train_modes", ["--batch-size", "1"], "--batch-size"),
    ("train_modes", ["--rounds", "0"], "--rounds"),
    ("train_modes", ["--arch", "resnet9000"], "--arch"),
    ("train_modes", ["--dtype", "int8"], "--dtype"),
    ("memory", ["--device", "cpu", "--largest-batch", "16"], "--largest-batch needs a CUDA device"),
    ("memory", ["--batch-sizes", "1"], "--batch-sizes"),
    ("memory", ["--providers", "fastres,bogus"], "--providers"),
    ("cpu_breakdown", ["--arch", "resnet19"], "--arch"),
    ("cpu_breakdown", ["--providers", "fastres,bogus"], "--providers"),
    ("cpu_breakdown", ["--providers", "eager,eager"], "--providers"),
    ("cpu_breakdown", ["--batch-size", "0"], "--batch-size"),
    ("cpu_breakdown", ["--input-size", "0"], "--input-size"),
    ("cpu_breakdown", ["--iters", "0"], "--iters"),
    ("cpu_breakdown", ["--settle", "-1"], "--settle"),
    ("packed_error", ["--arch", "resnet19"], "--arch"),
    ("packed_error", ["--batch-size", "0"], "--batch-size"),
    ("packed_error", ["--input-size", "0"], "--input-size"),
    ("packed_error", ["--dtype", "fp16"], "--dtype"),
    ("eval_memory", ["--arch", "resnet19"], "--arch"),
    ("eval_memory", ["--batch-sizes", "1,x"], "--batch-sizes"),
    ("eval_memory", ["--batch-sizes", "0"], "--batch-sizes"),
    ("eval_memory", ["--cycles", "0"], "--cycles"),
    ("eval_memory", ["--calls", "3"], "--calls"),
    ("eval_memory", ["--providers", "fastres,bogus"], "--providers"),
    ("detection", ["--models", "fasterrcnn,yolo"], "--models"),
    ("detection", ["--models", ","], "--models"),
    ("detection", ["--input-size", "800"], "--input-size"),
    ("detection", ["--input-size", "16,16"], "--input-size"),
    ("detection", ["--rounds", "0"], "--rounds"),
    ("detection", ["--min-size", "0"], "--min-size"),
    ("detection", ["--settle", "-1"], "--settle"),
    ("detection", ["--providers", "fastres,tensorrt"], "--providers"),
])
def test_bad_arguments(script, args, message, capsys):
    with pytest.raises(SystemExit) as e:
        {"throughput": throughput, "train_modes": train_modes, "memory": memory, "cpu_breakdown": cpu_breakdown,
         "packed_error": packed_error, "eval_memory": eval_memory, "detection": detection}[script].parse_args(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_throughput_cuda_graphs_need_cuda(capsys):
    with pytest.raises(SystemExit):
        throughput.parse_args(["--arch", "resnet18", "--cuda-graphs"])
    assert "--cuda-graphs needs a CUDA device" in capsys.readouterr().err


def test_throughput_defaults():
    _, s = throughput.parse_args(["--arch", "resnet50", "--device", "cpu"])
    assert (s.batch_size, s.dtype, s.providers, s.cuda_graphs) == (8, torch.float32, ("fastres", "eager"), False)
    modes = throughput.COMPILE_MODES
    assert modes[("compile-max-autotune", True)] == "max-autotune"  # exactly torch.compile(mode="max-autotune")
    assert modes[("compile", False)] == "default"
    assert s.settle == 0.1 and s.to_dict()["settle_s"] == 0.1
    _, s = throughput.parse_args(["--arch", "resnet50", "--device", "cpu", "--settle", "0"])
    assert s.settle == 0


def test_throughput_settles_before_every_batch(monkeypatch):
    """Each batch of the interleaved rounds (warm-up included) follows s.settle seconds of idle, which no timed
    batch includes: another engine's spinning threads must not slow the provider timed next."""
    _, s = throughput.parse_args(["--arch", "resnet18", "--device", "cpu", "--iters", "3", "--warmup", "1",
                                  "--settle", "0.25", "--no-progress"])
    events = []
    monkeypatch.setattr(throughput.time, "sleep", lambda t: events.append(("sleep", t)))

    class Provider:
        def __init__(self, name):
            self.name, self.times = name, []

        def batch(self, inputs, i):
            return (i,)

        def step(self, i):
            events.append(("step", self.name))

    providers = [Provider("a"), Provider("b")]
    assert throughput.run_interleaved(providers, None, s, throughput.C.Interrupts()) == 3
    assert events == [("sleep", 0.25), ("step", "a"), ("sleep", 0.25), ("step", "b"),  # warm-up
                      ("sleep", 0.25), ("step", "b"), ("sleep", 0.25), ("step", "a"),
                      ("sleep", 0.25), ("step", "a"), ("sleep", 0.25), ("step", "b"),
                      ("sleep", 0.25), ("step", "b"), ("sleep", 0.25), ("step", "a")]
    assert all(len(p.times) == 3 for p in providers)


# ------------------------------------------------------------------------------------------------ CPU peers
def test_throughput_peers_keyword():
    """--providers peers: fastres, eager and every CPU peer; eager-nchw only where eager is channels_last."""
    _, s = throughput.parse_args(["--arch", "resnet50", "--device", "cpu", "--providers", "peers"])
    assert s.providers == ("fastres", "eager", "eager-nchw", "compile-freezing", "torchscript-onednn", "onnxruntime",
                           "openvino", "openvino-bf16", "eager-autocast", "fastres-autocast") and s.channels_last
    _, s = throughput.parse_args(["--arch", "resnet50", "--device", "cpu", "--providers", "onnxruntime,peers",
                                  "--no-channels-last"])
    assert s.providers[0] == "onnxruntime" and "eager-nchw" not in s.providers and len(s.providers) == 9


def test_freezing_only_around_the_first_call():
    """compile-freezing sets inductor's freezing for the first call (where torch.compile compiles), and restores it."""
    import torch._inductor.config as inductor_config
    seen = []
    forward = throughput.freezing_on_first_call(lambda x: seen.append(inductor_config.freezing) or x)
    before = inductor_config.freezing
    forward(1), forward(2)
    assert seen == [True, before] and inductor_config.freezing == before


def run_throughput(tmp_path, providers, *extra, env=None):
    """throughput.py on cifar_resnet20, batch 2, two timed batches; returns (the process, its run)."""
    json_path = tmp_path / "t.jsonl"
    r = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "throughput.py"), "--arch", "cifar_resnet20",
                        "--batch-size", "2", "--iters", "2", "--warmup", "0", "--providers", providers,
                        "--json", str(json_path), *extra], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=env or script_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (run,) = read_json_lines(json_path)
    return r, run


def assert_peers_agree(run):
    checks = run["agreement_float64"]
    assert set(checks) == set(run["results"]) - {"eager"}
    for name, c in checks.items():
        assert c["ok"] and 0 <= c["max_error"] <= c["bound"], (name, c)
        assert c["eager_error"] > 0  # eager's own error in that precision sets the bound
        assert c["precision"].startswith("bf16" if name in throughput.BF16_PEERS else "fp32")


@pytest.mark.peers
def test_throughput_cpu_peers(tmp_path):
    """onnxruntime, OpenVINO (bf16 where the CPU has it), eager NCHW and the autocast providers run beside fastres and
    eager on the same weights and inputs, agree with a float64 forward under the tolerance rule, and their rows
    record the engines' versions and the CPU."""
    pytest.importorskip("onnxruntime")
    openvino = pytest.importorskip("openvino")
    has_bf16 = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    providers = ["fastres", "eager", "eager-nchw", "onnxruntime", "openvino", "openvino-bf16", "eager-autocast",
                 "fastres-autocast"]
    r, run = run_throughput(tmp_path, ",".join(providers), "--csv", str(tmp_path / "t.csv"))
    ran = [p for p in providers if has_bf16 or p != "openvino-bf16"]
    assert list(run["results"]) == ran
    if not has_bf16:
        assert "no bf16 support" in run["skipped"]["openvino-bf16"]
        assert "openvino-bf16 provider skipped: this CPU has no bf16 support" in r.stderr
    assert_peers_agree(run)
    for name, result in run["results"].items():
        assert len(result["times_s"]) == 2 and all(t > 0 for t in result["times_s"])
        assert result["first_call_s"] > 0
        assert (result["peak_memory_bytes"] is None) == (name in ("onnxruntime", "openvino", "openvino-bf16"))
    assert run["results"]["onnxruntime"]["notes"][0].startswith("torch.onnx.export(")
    assert "INFERENCE_PRECISION_HINT f32" in run["results"]["openvino"]["notes"][0]
    # fastres's first forward tuned glibc's malloc for the whole process, before any timed batch
    if platform.libc_ver()[0] == "glibc" and "glibc.malloc." not in os.environ.get("GLIBC_TUNABLES", ""):
        assert run["malloc"] == "glibc malloc tuned by fastres: mmap_threshold 32 MiB, trim_threshold 256 MiB"
        assert f"malloc: {run['malloc']} (process-wide: every torch provider here ran with it)" in r.stdout
    # and decided on its intra-op threads (what it did: test_plan_pins_each_intra_op_worker_to_a_cpu_of_its_own)
    assert run["threads"].startswith(("intra-op worker threads pinned by fastres", "intra-op threads as they were"))
    assert f"threads: {run['threads']} (process-wide: every torch provider here ran with it)" in r.stdout
    # (the suite pins the plan's autocast compute: tests/conftest.py)
    assert run["results"]["fastres-autocast"]["notes"] == [
        "fastres's eval plan computes in bf16: FASTRES_CPU_AUTOCAST=autocast"]
    assert run["versions"]["onnxruntime"] and run["versions"]["openvino"] and run["versions"]["onnx"]
    assert run["cpu"] and isinstance(run["cpu_flags"], list) and set(run["cpu_flags"]) <= set(C.CPU_FLAGS)
    assert [row["provider"] for row in read_csv(tmp_path / "t.csv")] == ran


def test_cpu_name_gives_the_family_and_model(tmp_path):
    """A generic model name ("AMD EPYC" covers CPUs with and without AVX-512) comes with cpu0's family and model."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\nflags\t: fpu\n\n"
                    "processor\t: 1\ncpu family\t: 6\nmodel\t\t: 207\nmodel name\t: Other\n")
    assert C.cpu_name(str(info)) == "AMD EPYC (family 25, model 17)"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\n")
    assert C.cpu_name(str(info)) == "Some CPU"


def test_throughput_notes_what_fastres_computes_in_under_autocast(monkeypatch):
    from fastres.models import _eval_plan
    _, s = throughput.parse_args(["--arch", "resnet50", "--device", "cpu"])
    monkeypatch.setattr(_eval_plan, "_AUTOCAST_PROBED", {})
    monkeypatch.setattr(_eval_plan, "reduced_conv_time_ratio", lambda dtype: 1.7)
    monkeypatch.setenv("FASTRES_CPU_AUTOCAST", "auto")
    assert throughput.autocast_compute_notes(s) == [
        "fastres's eval plan computes in fp32, output cast to bf16: this CPU's bf16 3x3 convolution took 1.70x its "
        "fp32 time (fp32 above 1.25x)"]
    monkeypatch.setattr(_eval_plan, "_AUTOCAST_PROBED", {})
    monkeypatch.setattr(_eval_plan, "reduced_conv_time_ratio", lambda dtype: 0.55)
    assert throughput.autocast_compute_notes(s) == [
        "fastres's eval plan computes in bf16: this CPU's bf16 3x3 convolution took 0.55x its fp32 time "
        "(fp32 above 1.25x)"]
    monkeypatch.setenv("FASTRES_CPU_AUTOCAST", "fp32")
    assert throughput.autocast_compute_notes(s) == [
        "fastres's eval plan computes in fp32, output cast to bf16: FASTRES_CPU_AUTOCAST=fp32"]
    _, s = throughput.parse_args(["--arch", "resnet50", "--device", "cpu", "--mode", "train"])
    assert throughput.autocast_compute_notes(s) == []  # no eval plan in training


needs_onednn_fusion = pytest.mark.skipif(_peers.unavailable("torchscript-onednn") is not None,
                                         reason="needs TorchScript's oneDNN Graph fusion")


@needs_onednn_fusion
def test_torchscript_onednn_fuses_and_leaves_the_flag_off():
    """The torchscript-onednn provider's forward: the traced, frozen reference, whose optimized graph runs oneDNN
    Graph partitions, with eager's result; the global fusion flag is on only inside its calls."""
    import torchvision
    model = torchvision.models.resnet18(num_classes=10).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    forward = throughput.torchscript_onednn(model)
    assert not torch.jit.onednn_fusion_enabled()
    with torch.inference_mode():
        for _ in range(3):  # the graph executor profiles the first calls, then fuses
            out = forward(x)
            assert not torch.jit.onednn_fusion_enabled()
        graph = torch.jit.last_executed_optimized_graph().str()
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    assert "oneDNNFusionGroup" in graph


@needs_onednn_fusion
def test_throughput_torchscript_onednn(tmp_path):
    """The provider runs beside fastres and eager on the same weights and agrees with a float64 forward."""
    r, run = run_throughput(tmp_path, "fastres,eager,torchscript-onednn")
    assert list(run["results"]) == ["fastres", "eager", "torchscript-onednn"]
    assert_peers_agree(run)
    result = run["results"]["torchscript-onednn"]
    assert len(result["times_s"]) == 2 and result["first_call_s"] > 0
    assert "enable_onednn_fusion(True)" in result["notes"][0]


def test_throughput_missing_peer_package_is_skipped(tmp_path, monkeypatch, capsys):
    """A peer whose package is not installed (here: made unimportable, as a missing one is) is skipped with a note
    naming the install command; the others are measured and the run exits 0. In-process: no interpreter start."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.setenv("FASTRES_BENCH_CEILING_SIZE", "256")
    json_path = tmp_path / "t.jsonl"
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM)  # main installs its own
    try:
        assert throughput.main(["--arch", "cifar_resnet20", "--batch-size", "2", "--iters", "2", "--warmup", "0",
                                "--providers", "fastres,eager,onnxruntime,openvino", "--no-progress",
                                "--json", str(json_path)]) == 0
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGALRM, handlers[1])
    err = capsys.readouterr().err
    assert 'onnxruntime provider skipped: onnxruntime is not installed (pip install -e ".[peers]")' in err
    assert 'openvino provider skipped: openvino is not installed (pip install -e ".[peers]")' in err
    (run,) = read_json_lines(json_path)
    assert set(run["results"]) == {"fastres", "eager"} and set(run["skipped"]) == {"onnxruntime", "openvino"}
    assert run["agreement_float64"] is None and run["versions"]["onnxruntime"] is None


@pytest.mark.slow
def test_throughput_compile_freezing(tmp_path):
    """torch.compile with inductor's freezing compiles (C++ on CPU: about 10 s here), agrees with float64 and leaves
    inductor's configuration as it was."""
    _, run = run_throughput(tmp_path, "eager,compile-freezing")
    assert list(run["results"]) == ["eager", "compile-freezing"] and run["skipped"] == {}
    assert run["results"]["compile-freezing"]["compile_mode"] == "default"
    assert run["settings"]["compile_modes"] == {"compile-freezing": "default"}
    assert_peers_agree(run)


def test_suite_train_modes_results(suite):
    out, _ = suite
    runs = read_json_lines(out / "results" / "train_modes.jsonl")
    assert len(runs) == 1 and ENV_FIELDS <= set(runs[0]) and runs[0]["benchmark"] == "train_modes"
    results = runs[0]["results"]
    assert set(results) == {"fastres lean", "fastres recompute", "eager"}
    assert results["eager"]["eager_over_this"] == 1.0
    assert all(r["ms"] > 0 and r["ms_p20"] <= r["ms"] <= r["ms_p80"] for r in results.values())


# ------------------------------------------------------------------------------------------------ memory.py
def test_saved_tensor_counter_counts_storages_once():
    w = torch.randn(8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    counter = memory.SavedTensorCounter(exclude=[w])
    with counter.hooks():
        y = (x * w).sum() + (x[1:] * x[1:]).sum()  # x saved by the first product; two views of x by the second
    y.backward()
    s = counter.summary()
    assert s["saved_tensors"] == 4  # x and w, then x[1:] twice
    assert s["saved_storages"] == 2  # x's storage (three times), w's
    assert s["saved_bytes"] == (32 + 8) * 4 and s["saved_activation_bytes"] == 32 * 4
    torch.testing.assert_close(x.grad, w.detach().expand(4, 8) + torch.cat([torch.zeros(1, 8), 2 * x[1:].detach()]))


@pytest.mark.parametrize("largest", [0, 1, 2, 3, 31, 32, 33, 100, 1000, 4095, 1 << 16, 1 << 20])
def test_largest_fitting_finds_the_largest_batch_that_fits(largest):
    tried = []

    def fits(b):
        tried.append(b)
        return b <= largest

    got = memory.largest_fitting(fits, limit=1 << 16)
    want = min(largest, 1 << 16) if largest >= 2 else 0
    assert want - max(1, want // 64) <= got <= want  # within the resolution, never above what fits
    assert len(tried) <= 30 and all(b >= 2 for b in tried)


def test_step_fits_reports_out_of_memory(monkeypatch):
    args = memory.parse_args(["--device", "cpu", "--arch", "cifar_resnet20"])
    model = C.build_fastres(args.arch_spec).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert memory.step_fits(model, optimizer, 2, args, torch.device("cpu"), torch.float32, torch.channels_last)
    assert all(p.grad is None for p in model.parameters())

    def out_of_memory(model, optimizer):
        def step(x, target):
            raise torch.OutOfMemoryError("simulated")
        return step

    monkeypatch.setattr(memory, "make_step", out_of_memory)
    assert not memory.step_fits(model, optimizer, 2, args, torch.device("cpu"), torch.float32, torch.channels_last)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_memory_largest_batch_on_cuda(tmp_path, capsys):
    path = tmp_path / "largest.jsonl"
    assert memory.main(["--arch", "cifar_resnet20", "--largest-batch", "1", "--json", str(path)]) == 0
    (run,) = read_json_lines(path)
    rows = {r["provider"]: r for r in run["rows"]}
    assert set(rows) == {"fastres", "eager"} and all(r["largest_batch"] >= 2 for r in rows.values())


# ------------------------------------------------------------------------------------------------ _common
def test_matrix_product_as_conv():
    for size in (64, 48):  # a power of two (rows as a square map) and not
        a, b = torch.randn(size, size, dtype=torch.float64), torch.randn(size, size, dtype=torch.float64)
        x, w = C.matrix_product_as_conv(a, b)
        assert x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() == a.data_ptr()
        out = F.conv2d(x, w)  # [1, size, H, W]: pixel (h, w) is row h * W + w
        torch.testing.assert_close(out.permute(0, 2, 3, 1).reshape(size, size), a @ b)


def test_ceilings_measured(monkeypatch):
    m = C.measure_matmul_ceiling("cpu", torch.float32, size=64, reps=2)
    assert m["tflops"] == max(v["tflops"] for v in m["by_method"].values()) > 0
    assert m["method"] in ("mm", "conv1x1") and m["precision"] == "float32"
    c = C.measure_copy_bandwidth("cpu", nbytes=1 << 20, reps=2)
    assert c["gbps"] == pytest.approx(2 * (1 << 20) / c["best_s"] / 1e9)
    monkeypatch.delenv("FASTRES_BENCH_CEILING_SIZE", raising=False)
    assert C.measure_copy_bandwidth("cpu", reps=1)["nbytes"] == C.COPY_BYTES["cpu"]  # the default size


def test_result_files_append(tmp_path):
    csv_path, json_path = tmp_path / "sub" / "r.csv", tmp_path / "r.jsonl"
    for i in range(2):
        C.append_csv(csv_path, [{"a": i, "b": "x,y"}], ["a", "b"])
        C.append_json(json_path, {"run": i})
    assert read_csv(csv_path) == [{"a": "0", "b": "x,y"}, {"a": "1", "b": "x,y"}]
    assert read_json_lines(json_path) == [{"run": 0}, {"run": 1}]


def test_write_results_save(tmp_path):
    args = throughput.parse_args(["--arch", "resnet18", "--device", "cpu", "--save", "--results-dir",
                                  str(tmp_path), "--json", str(tmp_path / "extra.jsonl"),
                                  "--csv", str(tmp_path / "extra.csv")])[0]
    for i in range(2):
        paths = C.write_results(args, "demo", {"run": i}, [{"x": i}], ["x"])
    assert sorted(os.path.basename(p) for p in paths) == ["demo.csv", "demo.jsonl", "extra.csv", "extra.jsonl"]
    assert read_csv(tmp_path / "extra.csv") == [{"x": "0"}, {"x": "1"}]
    assert read_json_lines(tmp_path / "demo.jsonl") == [{"run": 0}, {"run": 1}]
    assert read_json_lines(tmp_path / "extra.jsonl") == [{"run": 0}, {"run": 1}]
    assert read_csv(tmp_path / "demo.csv") == [{"x": "0"}, {"x": "1"}]


def test_quantiles():
    assert C.quantiles([3.0, 1.0, 2.0, 4.0, 5.0]) == [1.8, 3.0, 4.2]
    assert C.quantiles([7.0]) == [7.0, 7.0, 7.0]


def test_median_ci():
    # n = 10: (2nd, 9th) covers P(2 <= B(10, 1/2) <= 8) = 1002/1024 = 97.9%; (3rd, 8th) only 912/1024 = 89.1%
    assert C.median_ci([10.0, 3.0, 7.0, 1.0, 9.0, 5.0, 2.0, 8.0, 4.0, 6.0]) == (2.0, 9.0)
    assert C.median_ci(range(6)) == (0, 5)  # (min, max): 62/64 = 96.9%
    assert C.median_ci(range(5)) is None  # (min, max) covers 30/32 = 93.8% < 95%
    assert C.median_ci(range(10), confidence=0.85) == (2, 7)
    # its coverage, over draws from a skewed distribution of known median (exponential: ln 2)
    generator = torch.Generator().manual_seed(0)
    draws = torch.empty(4000, 20).exponential_(generator=generator).tolist()
    covered = sum(lo < math.log(2) < hi for lo, hi in map(C.median_ci, draws)) / len(draws)
    assert 0.94 < covered < 0.98  # exactly P(6 <= B(20, 1/2) <= 14) = 95.9%


@pytest.mark.parametrize("name,variant", [("resnet50", "v1"), ("plain34", "v1.5"), ("cifar_resnet32", "v1.5")])
def test_reference_models_match_fastres(name, variant):
    """The eager provider's model is the fastres network in plain PyTorch: same keys, same outputs."""
    arch = C.parse_arch(name, variant)
    size = 32 if arch.family == "cifar_resnet" else 64
    fast, ref = C.build_pair(arch)
    fast.eval(), ref.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out_fast, out_ref = fast(x), ref(x)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-4, atol=1e-4 * out_ref.abs().max().item())


def test_parse_arch_rejects_unknown():
    for bad in ("resnet19", "cifar_resnet21", "plain18", "vgg16"):
        with pytest.raises(ValueError, match="unknown arch"):
            C.parse_arch(bad)
    with pytest.raises(ValueError, match="variant"):
        C.parse_arch("resnet50", "v2")


@pytest.mark.peers
def test_throughput_model_zoo_providers(tmp_path):
    """timm's and transformers' ResNets and fastres.convert of each run beside fastres on the same weights (timm's
    state_dict keys are torchvision's, transformers' mapped from them, strict), transformers' also with hidden states,
    and the backbones (torchvision's detection body, timm's features_only model) with the reference's classifier,
    each within the tolerance rule against float64; the run records the zoos' versions; an arch a zoo does not have is skipped with a note."""
    zoos = [zoo for zoo in ("timm", "transformers") if importlib.util.find_spec(zoo) is not None]
    if not zoos:
        pytest.skip("neither timm nor transformers is installed")
    names = ["fastres", "eager"] + [name for zoo in zoos for name in (zoo, f"fastres-{zoo}")]
    if "transformers" in zoos:  # (its model called with output_hidden_states=True: the logits all the same)
        names += ["transformers-hidden", "fastres-transformers-hidden"]
    # the backbones (every tap kept, then the reference's classifier on the last)
    names += ["torchvision-body", "fastres-torchvision-body"]
    if "timm" in zoos:
        names += ["timm-features", "fastres-timm-features"]
    r, run = run_throughput(tmp_path, ",".join(names), "--arch", "resnet18", "--input-size", "32")
    assert list(run["results"]) == names
    for result in run["results"].values():
        assert len(result["times_s"]) == 2 and all(t > 0 for t in result["times_s"])
    assert all(run["versions"][zoo] for zoo in zoos)
    assert_peers_agree(run)
    (tmp_path / "cifar").mkdir()
    r, run = run_throughput(tmp_path / "cifar", ",".join(["fastres"] + zoos), "--arch", "cifar_resnet20")
    assert list(run["results"]) == ["fastres"]
    for zoo in zoos:
        assert f"{zoo} has no cifar_resnet20" in run["skipped"][zoo]
        assert f"{zoo} provider skipped: {zoo} has no cifar_resnet20" in r.stderr


@pytest.mark.peers
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_transformers_provider_holds_the_reference_network(arch):
    """The transformers provider's model is the reference's network with its weights: every torchvision key maps to
    one of ResNetForImageClassification's (loaded strictly), and the logits equal the reference's within the
    tolerance rule against float64."""
    pytest.importorskip("transformers")
    ref = C.build_reference(C.parse_arch(arch)).eval()
    torch.manual_seed(0)
    for m in ref.modules():  # non-trivial statistics, so that a norm loaded into the wrong place shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model = _peers.transformers_resnet(ref, C.parse_arch(arch), convert=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_within(arch, model(x), copy.deepcopy(ref).double()(x.double()), ref(x))


def test_detection_runs_every_provider_and_holds_the_backbone_to_the_rule(tmp_path, capsys, monkeypatch):
    """benchmarks/detection.py on a small Faster R-CNN input: every provider timed, fastres's ratio over each other
    one, the backbone's FPN levels within the tolerance rule against float64, the run and its CSV rows written. Asked
    for two peers, one whose package is missing and one that fails in its first call, it skips both with a note."""
    monkeypatch.setattr(_peers, "unavailable", lambda name: "openvino is not installed" if name == "openvino" else None)

    def failing_engines(model, images, threads, names):
        def run(images):
            raise RuntimeError("engine down")
        return {name: (run, ["a failing engine"]) for name in names}
    monkeypatch.setattr(_peers, "detector_engines", failing_engines)
    json_path, csv_path = tmp_path / "det.jsonl", tmp_path / "det.csv"
    rc = detection.main(["--models", "fasterrcnn", "--input-size", "96,128", "--min-size", "96", "--max-size", "128",
                         "--rounds", "2", "--warmup", "1", "--settle", "0", "--providers", "onnxruntime,openvino",
                         "--json", str(json_path), "--csv", str(csv_path)])
    assert rc == 0
    (written,) = read_json_lines(json_path)
    assert ENV_FIELDS <= set(written) and written["benchmark"] == "detection"
    (run,) = written["runs"]
    assert set(run["results"]) == set(detection.PROVIDERS) and not run["stopped_early"]
    assert run["skipped"] == {"openvino": "openvino is not installed",
                              "onnxruntime": "failed: RuntimeError: engine down"}
    for name, r in run["results"].items():
        assert r["timed"] == 2 and 0 < r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        assert ("fastres_over_this" in r) == (name != "fastres")
    levels = run["backbone_agreement"]
    assert set(levels) == {"0", "1", "2", "3", "pool"} and all(a["ok"] and a["error"] > 0 for a in levels.values())
    assert set(run["boxes"]) == set(detection.PROVIDERS)
    rows = read_csv(csv_path)
    assert [r["provider"] for r in rows] == list(detection.PROVIDERS) and rows[0]["model"] == "fasterrcnn"
    out = capsys.readouterr().out
    assert "fastres over this" in out and "EXCEEDS" not in out
    assert "onnxruntime: skipped: failed: RuntimeError: engine down" in out


def test_detection_providers_argument():
    """--providers: the three PyTorch providers always run; peers are added by name or all by `peers`."""
    assert detection.parse_args([]).peers == []
    assert detection.parse_args(["--providers", "openvino,eager"]).peers == ["openvino"]
    assert detection.parse_args(["--providers", "peers"]).peers == list(detection.PEERS)


@pytest.mark.parametrize("freezes", [True, False])
def test_detection_compile_falls_back_to_no_freezing(monkeypatch, freezes):
    """The compile peer compiles with Inductor's freezing on around its first call; where that compilation fails
    (as torch 2.14.1's does on torchvision's detectors), it resets dynamo and compiles without, and says so."""
    seen, resets = [], []

    def fake_compile(model):
        def compiled(images):
            freezing = torch._inductor.config.freezing
            seen.append(freezing)
            if freezing and not freezes:
                raise RuntimeError("cannot freeze")
            return model(images)
        return compiled
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(True))
    notes = []
    call = detection.compiled_detector(lambda images: [x.sum() for x in images], notes)
    images = [torch.ones(2, 2)]
    assert call(images) == [4.0] and call(images) == [4.0]
    assert not torch._inductor.config.freezing  # (restored)
    if freezes:
        assert seen == [True, False] and not resets and "freezing = True around its first call" in notes[0]
    else:
        assert seen == [True, False, False] and resets == [True] and len(notes) == 1
        assert "without freezing" in notes[0] and "RuntimeError: cannot freeze" in notes[0]


@pytest.mark.peers
def test_detection_engines():
    """onnxruntime and OpenVINO from one ONNX export of a small Faster R-CNN, two images of different sizes: each
    returns per image the detections eager returns, under the same keys (their scores as eager's, within fp32
    rounding: the boxes of near-tied scores may come in another order)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    model = detection.build_model("fasterrcnn", 0, 96, 128)
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 128, generator=gen), torch.rand(3, 112, 96, generator=gen)]
    with torch.no_grad():
        reference = model(images)
    built = _peers.detector_engines(model, images, torch.get_num_threads(), ["onnxruntime", "openvino"])
    assert set(built) == {"onnxruntime", "openvino"}
    for name, (run, notes) in built.items():
        assert notes and ("onnxruntime" if name == "onnxruntime" else "the same ONNX file") in notes[0]
        out = run(images)
        assert len(out) == 2
        for got, want in zip(out, reference):
            assert list(got) == list(want)
            for key in want:
                assert got[key].shape == want[key].shape and got[key].dtype == want[key].dtype, (name, key)
            torch.testing.assert_close(got["scores"].sort().values, want["scores"].sort().values,
                                       rtol=1e-4, atol=1e-5)


def test_benchmark_scripts_shadow_no_installed_package():
    """Importing the scripts above leaves their folder off sys.path: `import kernels` (or memory, plot, ...) later
    in the session finds an installed package, never benchmarks/kernels.py."""
    assert all(os.path.abspath(p or os.curdir) != BENCHMARKS for p in sys.path)


# ------------------------------------------------------------------------------------------------ cpu_breakdown.py
def _has_cpu_plan():
    from fastres.ops import _backend, _compiled
    return _backend._why_not("cuda", "conv_bias_act", "cpu") is None and _compiled.has_op("_run_plan")


def test_cpu_breakdown_parses_onednn_verbose():
    text = "\n".join([
        "onednn_verbose,v1,info,oneDNN v3.9.0",
        "onednn_verbose,v1,primitive,info,template:operation,engine,primitive,implementation,exec_time",
        "onednn_verbose,v1,primitive,create:cache_miss,cpu,convolution,brg_conv_fwd:avx512_core,forward_inference,"
        "src:f32::blocked:acdb::f0,,alg:convolution_direct,mb1_ic3oc64,0.5",
        "onednn_verbose,v1,primitive,exec,cpu,convolution,brg_conv_fwd:avx512_core,forward_inference,"
        "src:f32::blocked:acdb::f0,attr-scratchpad:user,alg:convolution_direct,mb1_ic3oc64,1.25",
        "onednn_verbose,v1,1796337407228.02,primitive,exec,cpu,convolution,brgconv_1x1:avx512_core,"
        "forward_inference,src:f32,attr-post-ops:sum,alg:convolution_direct,mb1_ic64oc256,0.5",
        "dnnl_verbose,exec,cpu,reorder,jit:uni,undef,src_f32::blocked:abcd:f0 dst_f32::blocked:Acdb64a:f0,,,"
        "64x3x7x7,0.125",
        "onednn_verbose,v1,graph,exec,cpu,100074,convolution_post_ops,aten::_convolution,data:NCX filter:OIX ,"
        "in0_f32:0:strided:variable:1x3x64x64:12288s1s192s3,fpm:strict,convolution_fwd_t,dnnl_backend,2.5",
        "some other output,exec,not a verbose line,9",
        "onednn_verbose,v1,primitive,exec,cpu,convolution,cut short",
    ])
    assert cpu_breakdown.parse_onednn_exec(text) == {"convolution": [2, 1.75], "reorder": [1, 0.125]}


def test_cpu_breakdown_summarizes_per_forward():
    """Medians over forwards; outside is the plain forward's median less the kernels' medians (the instrumented
    forwards' wall times carry the instrumentation's cost)."""
    conv = {"convolution": [2, 3.0]}
    instrumented = [(10.0, {**conv, "reorder": [1, 1.0]}), (20.0, {"convolution": [2, 4.0], "reorder": [1, 1.0]}),
                    (12.0, {"convolution": [2, 9.0], "reorder": [1, 0.5]})]
    row = cpu_breakdown.summarize([8.0, 9.0, 30.0], instrumented)
    assert row == {"forward_ms": 9.0, "instrumented_ms": 12.0, "conv_kernels_ms": 4.0, "conv_kernels": 2,
                   "other_kernels_ms": 1.0, "other_kernels": {"reorder": 1}, "outside_ms": 4.0}


def test_cpu_breakdown_groups_onnxruntime_nodes_by_run():
    def node(ts, dur, op):
        return {"cat": "Node", "name": f"n{ts}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}
    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 100}, node(10, 40, "Conv"),
              {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100}, node(210, 30, "Conv"),
              node(240, 20, "FusedConv"), node(260, 5, "MaxPool"),
              {"cat": "Node", "name": "n270_fence_before", "ts": 270, "dur": 1, "args": {"op_name": "Gemm"}},
              {"cat": "Session", "name": "model_run", "ts": 400, "dur": 100}, node(410, 1000, "Gemm")]
    runs = cpu_breakdown.onnxruntime_kernels(events, 2)
    assert runs == [{"conv": [2, 0.05], "other": [1, 0.005]}, {"other": [1, 1.0]}]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available() or not _has_cpu_plan(),
                    reason="needs oneDNN and fastres._C's CPU eval plan")
def test_cpu_breakdown_runs(tmp_path):
    """A tiny run: fastres's forward executes each of ResNet-18's 20 convolutions as one oneDNN primitive (its
    plan; after two forwards a oneDNN Graph, whose partitions' own lines are not counted), never a weight reorder,
    and the run is written with the documented fields."""
    path = tmp_path / "breakdown.jsonl"
    run = cpu_breakdown.main(["--arch", "resnet18", "--input-size", "64", "--iters", "2", "--settle", "0",
                              "--providers", "fastres,eager", "--json", str(path)])
    rows = {r["provider"]: r for r in run["rows"]}
    assert list(rows) == ["fastres", "eager"]
    assert rows["fastres"]["conv_kernels"] == 20 and "reorder" not in rows["fastres"]["other_kernels"]
    # (the graph body's stem pool is a oneDNN pooling primitive, with the ReLU after it; its classifier's linear a
    # matmul)
    assert set(rows["fastres"]["other_kernels"]) <= {"pooling", "eltwise", "matmul"}
    for r in rows.values():
        assert r["forward_ms"] > 0 and r["instrumented_ms"] > 0 and r["conv_kernels_ms"] >= 0
        assert r["page_faults"] >= 0
    assert 0 < rows["fastres"]["conv_kernels_ms"]
    assert run["malloc"] is not None  # fastres's plan decided it (what it did: test_plan_keeps_activations_...)
    assert run["pinned_threads"] is not None  # (what it did: test_plan_pins_each_intra_op_worker_to_a_cpu_of_its_own)
    written = read_json_lines(path)
    assert len(written) == 1 and ENV_FIELDS <= set(written[0]) and written[0]["benchmark"] == "cpu_breakdown"
    assert written[0]["rows"][0]["conv_kernels"] == 20


# ------------------------------------------------------------------------------------------------ packed_error.py
needs_packing = pytest.mark.skipif(packed_error.why_not_packed(torch.float32) is not None,
                                   reason="needs oneDNN convolutions from a packed weight")


@needs_packing
def test_packed_error_runs(tmp_path):
    """At batch 2 ATen runs its channels_last convs on oneDNN too: each packed conv's error is within the rule (in
    fact ATen's own), every conv of the model is packed, and the run is written with the documented fields."""
    path = tmp_path / "packed.jsonl"
    run = packed_error.main(["--arch", "cifar_resnet20", "--batch-size", "2", "--json", str(path)])
    rows = run["rows"]
    assert [r["layer"] for r in rows[:2]] == ["conv1", "layer1.0.conv1"] and rows[-1]["layer"] == "whole model"
    assert len(rows) == 19 + 1 and all(r["ok"] for r in rows)
    assert rows[-1]["packed_weights"] == rows[-1]["convs"] == 19
    for r in rows:
        assert 0 < r["packed"] <= r["limit"] and r["aten_cl"] > 0 and r["aten_nchw"] > 0
    # the Winograd form of every 3x3 conv of stride 1 (17 of the 19: all but the two strided), within the rule too
    from fastres.models import _eval_plan
    if _eval_plan._WINOGRAD_CONV is not None:
        assert sum(r["winograd"] is not None for r in rows[:-1]) == 17
        assert all(r["winograd_ok"] for r in rows[:-1] if r["winograd"] is not None)
    # the whole model as its oneDNN Graph body (too small here for Winograd's thresholds), within the rule
    if _eval_plan.GRAPH_BODY:
        assert rows[-1]["graph"] > 0 and rows[-1]["graph_ok"] and rows[-1]["winograd_convs"] == 0
    written = read_json_lines(path)
    assert len(written) == 1 and ENV_FIELDS <= set(written[0]) and written[0]["benchmark"] == "packed_error"


@needs_packing
def test_packed_error_names_a_layer_past_the_rule(monkeypatch, capsys):
    """A packed conv made less accurate than the rule allows (its output rounded to bf16's precision) is named, and
    the command exits 1."""
    from fastres.ops import backend_cuda
    run = backend_cuda.prepacked_conv_bias_act

    def rounded(*args, **kwargs):
        return run(*args, **kwargs).bfloat16().float()

    monkeypatch.setattr(backend_cuda, "prepacked_conv_bias_act", rounded)
    with pytest.raises(SystemExit) as e:
        packed_error.main(["--arch", "cifar_resnet20", "--batch-size", "2"])
    out = capsys.readouterr()
    assert e.value.code == 1 and "past the tolerance rule: conv1, layer1.0.conv1" in out.err
    assert "EXCEEDS" in out.out
