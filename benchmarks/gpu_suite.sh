#!/usr/bin/env bash
# The GPU run, in one command, for a bare GPU machine without network (an H200 or H100: all of it within 8 minutes):
#
#   benchmarks/gpu_suite.sh OUTDIR
#
# Correctness first, then the headline figure, then tuning, then the rest. Steps, in this order, each under its own
# time limit and all under one deadline (a step that would start with too little time left is skipped and says so):
#   env          OUTDIR/env.txt: date, commit, nvidia-smi, versions of python, torch, triton, CUDA, cuDNN, nvcc
#   build        pip install --no-build-isolation --no-deps --no-index -e .  (MAX_JOBS=16, this GPU's arch only);
#                if the CUDA extension fails to build (e.g. nvcc's major version against torch.version.cuda), it
#                rebuilds with FASTRES_SKIP_CUDA_BUILD=1 so the Triton and torch backends still run, and says why
#                (status "fallback" in steps.tsv, the reason in logs/build.log and summary.md)
#   gpu_check    every kernel at ResNet-50's sizes in bf16/fp16/fp32/TF32, NHWC and NCHW, and a ResNet-50 training
#                step and inference batch, against float64 under the tolerance rule, logging which backend and kernel
#                each op ran (benchmarks/gpu_check.py; FASTRES_AUTOTUNE=0)
#   pytest       pytest -m cuda, plus the unmarked Triton tests (tests/test_triton_kernels.py) on CUDA, autotuning
#                off (pytest-xdist with 8 workers where installed)
#   throughput_resnet50_infer   the headline: ResNet-50 bf16 batch-256 inference (channels_last, CUDA graphs) of
#                fastres against eager, compile and compile-max-autotune, with fastres's default per-layer choices
#                (FASTRES_AUTOTUNE=0: nothing tuned yet)
#   tune         a time-capped tuning pass over ResNet-50's problems (inference, then training), sized from the
#                measured cost of one problem (benchmarks/tune_models.py --time-budget); the choices land in
#                OUTDIR/autotune/autotune.json, which benchmarks/results/autotune.json seeds on the next run
#   throughput_resnet50_infer_tuned, throughput_resnet50_train   the same rows with the tuned choices
#   kernels, bn_kernels, throughput_resnet152_*, memory, largest_batch, train_modes, flops   the rest
#   plot, bundle PNG charts and summary.md; everything packed into OUTDIR/bundle.tar.gz
# Every benchmark appends its results as it measures them (gpu_check a line per check; throughput reports what it
# has on SIGTERM, which a step's time limit sends first), so a step cut short keeps what it measured.
# Everything lands under OUTDIR: logs/<step>.log, results/*.jsonl and *.csv, plots/*.png and summary.md,
# autotune/autotune.json, steps.tsv (each step's status, exit code and seconds), and all of it in bundle.tar.gz.
# The exit code is 0 when every step that ran succeeded.
#
# Environment:
#   FASTRES_SUITE_RETURN=DIR      also copy what a device run brings back (at most 8 files) into DIR:
#                                 bundle.tar.gz, summary.md, steps.tsv and the results' gpu_check, throughput, tune,
#                                 kernels and train_modes .jsonl (the rest is in the bundle)
#   FASTRES_SUITE_SMOKE=1         CPU-sized run of the same steps (no build unless FASTRES_SUITE_BUILD=1, a tiny
#                                 CIFAR net, tiny kernel shapes): checks the script's logic on any machine
#   FASTRES_SUITE_BUDGET_S        the deadline in seconds from the start (default 480, smoke 900)
#   FASTRES_SUITE_SKIP            space-separated steps to skip (e.g. "build pytest")
#   FASTRES_SUITE_ONLY            space-separated steps to run (every other step is skipped)
#   FASTRES_SUITE_AUTOTUNE_SEED   an autotune.json from an earlier run (same GPU and software; default
#                                 benchmarks/results/autotune.json when present): copied into the autotune cache
#                                 first, so the per-layer choices already measured are not measured again
#   PYTHON                        the interpreter (default python3)
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)  # resolved before the cd below: a relative OUTDIR is the caller's
cd "$(dirname "$0")/.."
REPO=$(pwd)
mkdir -p "$OUT/logs" "$OUT/results" "$OUT/plots" "$OUT/autotune"
PY=${PYTHON:-python3}
SMOKE=${FASTRES_SUITE_SMOKE:-0}
SKIP=" ${FASTRES_SUITE_SKIP:-} "
START=$(date +%s)
ONLY=" ${FASTRES_SUITE_ONLY:-} "
if [ "$SMOKE" = 1 ]; then BUDGET=${FASTRES_SUITE_BUDGET_S:-900}; else BUDGET=${FASTRES_SUITE_BUDGET_S:-480}; fi
DEADLINE=$((START + BUDGET))
RESERVE=25        # seconds kept for the plot and bundle steps at the end
FALLBACK_RC=3     # the build step's exit code when only the fallback (no CUDA kernels) built
KILL_GRACE=10     # after SIGTERM, a step has this long to write what it measured before SIGKILL
MIN_STEP=15       # a step is not started with less time than this
FAILED=0

export PYTHONUNBUFFERED=1
export FASTRES_CACHE_DIR="$OUT/autotune"
SEED=${FASTRES_SUITE_AUTOTUNE_SEED:-}
if [ -z "$SEED" ] && [ "$SMOKE" != 1 ] && [ -f "$REPO/benchmarks/results/autotune.json" ]; then
    SEED="$REPO/benchmarks/results/autotune.json"
fi
if [ -n "$SEED" ] && [ -f "$SEED" ]; then
    cp "$SEED" "$FASTRES_CACHE_DIR/autotune.json"
fi
printf "step\tstatus\texit\tseconds\tlimit_s\n" > "$OUT/steps.tsv"

log() { echo "[suite +$(( $(date +%s) - START ))s] $*"; }

# run_step NAME BUDGET_S [final] -- COMMAND...: run COMMAND with its output in logs/NAME.log, under
# min(BUDGET_S, time left before the deadline, less the reserve unless "final").
run_step() {
    local name=$1 budget=$2 reserve=$RESERVE
    shift 2
    if [ "$1" = final ]; then reserve=0; shift; fi
    [ "$1" = -- ] && shift
    if [[ "$SKIP" == *" $name "* ]] || { [ -n "${FASTRES_SUITE_ONLY:-}" ] && [[ "$ONLY" != *" $name "* ]]; }; then
        printf "%s\tskipped (FASTRES_SUITE_SKIP/ONLY)\t-\t0\t0\n" "$name" >> "$OUT/steps.tsv"
        log "$name: skipped (FASTRES_SUITE_SKIP/ONLY)"
        return 0
    fi
    local left=$((DEADLINE - $(date +%s) - reserve - KILL_GRACE))
    local limit=$(( budget < left ? budget : left ))
    if [ "$limit" -lt "$MIN_STEP" ]; then
        printf "%s\tskipped (out of time)\t-\t0\t%s\n" "$name" "$limit" >> "$OUT/steps.tsv"
        log "$name: skipped, ${left}s left before the deadline"
        return 0
    fi
    log "$name: start (limit ${limit}s)"
    local t0 rc status
    t0=$(date +%s)
    if declare -F "$1" > /dev/null; then  # a function of this script: timeout runs it in a child bash
        set -- bash -c "$(printf '%q ' "$@")"
    fi
    timeout -k "$KILL_GRACE" -s TERM "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
    rc=$?
    status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="time limit"; FAILED=1
    elif [ "$rc" -eq "$FALLBACK_RC" ] && [ "$name" = build ]; then status="fallback: built without CUDA kernels"
    elif [ "$rc" -ne 0 ]; then status=failed; FAILED=1; fi
    printf "%s\t%s\t%s\t%s\t%s\n" "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "$limit" >> "$OUT/steps.tsv"
    log "$name: $status (exit $rc, $(( $(date +%s) - t0 ))s)"
    tail -n 25 "$OUT/logs/$name.log" | sed "s/^/    /"
    return 0
}

write_env() {
    {
        echo "date: $(date -Iseconds)"
        echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
        echo "git status (tracked files changed):"
        git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null | sed "s/^/  /"
        echo "host: $(hostname)  cpus: $(nproc)  smoke: $SMOKE"
        echo "--- nvidia-smi"
        timeout 20 nvidia-smi 2>&1 || echo "(no nvidia-smi)"
        timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu --format=csv 2>&1 || true
        echo "--- nvcc"
        timeout 20 nvcc --version 2>&1 | tail -n 2 || echo "(no nvcc)"
        echo "--- python"
        timeout 60 "$PY" - <<'EOF' 2>&1
import platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "capability", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1))
for name in ("triton", "torchvision", "numpy", "matplotlib", "tqdm", "pytest", "pytest_benchmark"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:
        print(name, "not importable:", type(e).__name__)
EOF
    } > "$OUT/env.txt"
    cat "$OUT/env.txt"
}

build() {
    local arch=${TORCH_CUDA_ARCH_LIST:-}
    if [ -z "$arch" ]; then
        arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || true)
    fi
    echo "TORCH_CUDA_ARCH_LIST=${arch:-(setup.py default)} MAX_JOBS=${MAX_JOBS:-16}"
    local rc=0
    # FASTRES_FORCE_CUDA: a CUDA build that cannot happen fails here (and falls back below) instead of warning
    env ${arch:+TORCH_CUDA_ARCH_LIST=$arch} MAX_JOBS="${MAX_JOBS:-16}" NVCC_THREADS="${NVCC_THREADS:-4}" \
        FASTRES_FORCE_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/logs/build_cuda.log" 2>&1 \
        || rc=$?
    cat "$OUT/logs/build_cuda.log"
    if [ "$rc" -ne 0 ]; then
        {
            echo "FALLBACK: the CUDA extension did not build (exit $rc); rebuilding with FASTRES_SKIP_CUDA_BUILD=1 so the"
            echo "Triton and torch backends still install and run. Why (the build's last error lines):"
            grep -E -i "error|fatal|mismatch|unsupported" "$OUT/logs/build_cuda.log" | tail -n 8 | sed "s/^/    /"
        } | tee "$OUT/build_fallback.txt"
        env MAX_JOBS="${MAX_JOBS:-16}" FASTRES_SKIP_CUDA_BUILD=1 \
            "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . || return 1
    fi
    "$PY" -c "import fastres, fastres._C; from fastres.ops import _compiled; print('fastres', fastres.__version__, \
'from', fastres.__file__); print('compiled kernels:', _compiled.available(), 'with CUDA:', _compiled.with_cuda(), \
_compiled.load_error() or '')" || return 1
    [ "$rc" -eq 0 ] || return "$FALLBACK_RC"
}

pytest_cuda() {
    # -v: a run cut short by its time limit still shows each finished test in the log
    local args=(-v --tb=short -p no:cacheprovider -rfE --junitxml "$OUT/logs/pytest_cuda.xml")
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then args+=(--timeout 120); fi
    if [ "$SMOKE" != 1 ] && "$PY" -c "import xdist" 2>/dev/null; then args+=(-n 8); fi
    local rc=0
    if [ "$SMOKE" = 1 ]; then
        FASTRES_AUTOTUNE=0 "$PY" -m pytest "${args[@]}" -m cuda tests/test_benchmarks.py || rc=$?
    else
        # the cuda-marked tests everywhere, and every test of the Triton kernels (unmarked ones run on CUDA
        # tensors when a GPU is present), autotuning off: the kernels themselves, at their default configs
        FASTRES_AUTOTUNE=0 "$PY" -m pytest "${args[@]}" tests/test_triton_kernels.py || rc=$?
        local rc2=0
        FASTRES_AUTOTUNE=0 "$PY" -m pytest "${args[@]}" -m cuda tests --ignore tests/test_triton_kernels.py || rc2=$?
        if [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ]; then rc=$rc2; fi
    fi
    if [ "$rc" -eq 5 ]; then echo "(no test selected: exit 5 counted as success)"; return 0; fi
    return "$rc"
}

bundle() {
    local tmp
    tmp=$(mktemp /tmp/fastres-suite-XXXXXX.tar.gz)
    tar czf "$tmp" -C "$OUT" --exclude=bundle.tar.gz . && mv "$tmp" "$OUT/bundle.tar.gz"
    ls -la "$OUT/bundle.tar.gz"
}

# What a device run brings back: at most 8 files (the rest is in the bundle).
return_files() {
    local dest=$1 f
    mkdir -p "$dest"
    for f in "$OUT/bundle.tar.gz" "$OUT/plots/summary.md" "$OUT/steps.tsv" "$OUT/results/gpu_check.jsonl" \
             "$OUT/results/throughput.jsonl" "$OUT/results/tune.jsonl" "$OUT/results/kernels.jsonl" \
             "$OUT/results/train_modes.jsonl"; do
        [ -f "$f" ] && cp "$f" "$dest/"
    done
    ls -la "$dest"
}

export -f write_env build pytest_cuda bundle
export OUT PY REPO SMOKE FALLBACK_RC

# ------------------------------------------------------------------------------------------------ the matrix
RESULTS=(--save --results-dir "$OUT/results")
if [ "$SMOKE" = 1 ]; then
    ARCH=cifar_resnet20
    GPU_CHECK=(240 --device cpu --layers layer1.0.conv2,layer2.0.downsample.0 --dtypes fp32,fp16 --model-dtypes fp32)
    TUNE=(60 --arch cifar_resnet20 --batch-size 2 --dtype fp32 --device cpu --time-budget 30)   # limit, arguments
    THROUGHPUT=(--device cpu --dtype fp32 --batch-size 2 --iters 2 --warmup 0 --providers fastres,eager --no-progress)
    KERNELS=(--device cpu --tiny --reps 2 --rounds 1 --layers l1.conv1,l2.conv2 --stages stage1)
    MEMORY=(--device cpu --arch cifar_resnet20 --batch-sizes 2,4)
    BN_KERNELS=(--device cpu --batch-size 2 --shapes 16x8 --reps 2 --rounds 1)
    TRAIN_MODES=(--device cpu --arch cifar_resnet20 --batch-size 2 --rounds 1)
    declare -A TP_BUDGET=([cifar_resnet20:infer]=120 [cifar_resnet20:train]=120)
    declare -A COMPILE_TIMEOUT=([cifar_resnet20:infer]=0 [cifar_resnet20:train]=0)
    KERNELS_BUDGET=(120 100)   # step limit, kernels.py --time-budget
    LATER=()
    export FASTRES_BENCH_CEILING_SIZE=${FASTRES_BENCH_CEILING_SIZE:-256}
else
    ARCH=resnet50
    # all of ResNet-50's problems at batch 256 must fit in 3 minutes; the sweep stops itself at its budget
    GPU_CHECK=(180 --time-budget 160)
    # the tuning pass's size comes from the measured cost of one problem (tune_models.py prints it)
    TUNE=(75 --arch resnet50 --batch-size 256 --dtype bf16 --modes infer,train --time-budget 60)
    # 20 timed batches per provider after 3 warm-up rounds (at most 25 s of them); CUDA graphs for inference
    # only: training at batch 256 launches large kernels, and four graph-held training steps of ResNet-152 (one
    # per provider, each keeping its step's peak memory) would not fit in one GPU's memory
    THROUGHPUT=(--dtype bf16 --batch-size 256 --channels-last --iters 20 --warmup 3 --time-budget 25
                --providers fastres,eager,compile,compile-max-autotune --no-progress)
    KERNELS=(--dtype bf16 --batch-size 256)
    MEMORY=(--arch resnet50 --dtype bf16 --batch-sizes 32,64,128,256)
    BN_KERNELS=(--device cuda --dtype bf16 --batch-size 256)
    TRAIN_MODES=(--device cuda --dtype bf16 --batch-size 256 --rounds 6)
    # seconds: the step's limit, and how long each compile provider's first batch (compilation) may take
    declare -A TP_BUDGET=([resnet50:infer]=110 [resnet50:train]=100 [resnet152:infer]=70 [resnet152:train]=80)
    declare -A COMPILE_TIMEOUT=([resnet50:infer]=45 [resnet50:train]=40 [resnet152:infer]=30 [resnet152:train]=35)
    KERNELS_BUDGET=(45 30)
    LATER=(resnet152:infer resnet152:train)
fi

log "fastres GPU suite into $OUT (deadline ${BUDGET}s, smoke=$SMOKE)"
# 1. environment and build
run_step env 30 -- write_env
if [ "$SMOKE" = 1 ] && [ "${FASTRES_SUITE_BUILD:-0}" != 1 ]; then
    printf "build\tskipped (smoke)\t-\t0\t0\n" >> "$OUT/steps.tsv"
    log "build: skipped (smoke; FASTRES_SUITE_BUILD=1 builds)"
else
    run_step build 170 -- build
fi
# 2-3. correctness: every kernel at real sizes, then the test suite's GPU tests
run_step gpu_check "${GPU_CHECK[0]}" -- "$PY" benchmarks/gpu_check.py "${GPU_CHECK[@]:1}" \
    --json "$OUT/results/gpu_check.jsonl"
run_step pytest 75 -- pytest_cuda
throughput_step() {  # throughput_step ARCH:MODE [STEP_NAME_SUFFIX [ENV...]]
    local arch=${1%%:*} mode=${1##*:} suffix=${2:-}
    shift 2 2>/dev/null || shift
    local graphs=()
    if [ "$SMOKE" != 1 ] && [ "$mode" = infer ]; then graphs=(--cuda-graphs); fi
    run_step "throughput_${arch}_${mode}${suffix}" "${TP_BUDGET[$arch:$mode]}" -- env "$@" "$PY" benchmarks/throughput.py \
        --arch "$arch" --mode "$mode" "${THROUGHPUT[@]}" "${graphs[@]}" \
        --compile-timeout "${COMPILE_TIMEOUT[$arch:$mode]}" "${RESULTS[@]}"
}
# 4. the headline with fastres's default per-layer choices (nothing measured yet)
throughput_step "$ARCH:infer" "" FASTRES_AUTOTUNE=0
# 5. a time-capped tuning pass, 6. the tuned rows
run_step tune "${TUNE[0]}" -- "$PY" benchmarks/tune_models.py "${TUNE[@]:1}" --json "$OUT/results/tune.jsonl"
if [ "$SMOKE" != 1 ]; then throughput_step "$ARCH:infer" _tuned FASTRES_AUTOTUNE=0; fi
throughput_step "$ARCH:train" "" FASTRES_AUTOTUNE=0
# 7. the rest
run_step kernels "${KERNELS_BUDGET[0]}" -- "$PY" benchmarks/kernels.py "${KERNELS[@]}" \
    --time-budget "${KERNELS_BUDGET[1]}" "${RESULTS[@]}"
run_step bn_kernels 40 -- "$PY" benchmarks/bn_kernels.py "${BN_KERNELS[@]}" --json "$OUT/results/bn_kernels.jsonl"
for run in "${LATER[@]}"; do throughput_step "$run" "" FASTRES_AUTOTUNE=0; done
run_step memory 45 -- env FASTRES_AUTOTUNE=0 "$PY" benchmarks/memory.py "${MEMORY[@]}" "${RESULTS[@]}"
if [ "$SMOKE" != 1 ]; then
    run_step largest_batch 60 -- env FASTRES_AUTOTUNE=0 "$PY" benchmarks/memory.py --arch resnet50 --dtype bf16 \
        --largest-batch 16 "${RESULTS[@]}"
fi
run_step train_modes 40 -- env FASTRES_AUTOTUNE=0 "$PY" benchmarks/train_modes.py "${TRAIN_MODES[@]}" \
    --json "$OUT/results/train_modes.jsonl"
run_step flops 30 -- "$PY" benchmarks/flops.py "${RESULTS[@]}"
run_step plot 20 final -- "$PY" benchmarks/plot.py --results-dir "$OUT/results" --out-dir "$OUT/plots"
if [ -f "$OUT/build_fallback.txt" ] && [ -f "$OUT/plots/summary.md" ]; then
    { echo; echo "## Build fallback"; echo; sed "s/^/    /" "$OUT/build_fallback.txt"; } >> "$OUT/plots/summary.md"
fi
timeout 20 nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv \
    > "$OUT/gpu_state_end.txt" 2>&1 || true
log "steps:"
column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
if [ -f "$OUT/plots/summary.md" ]; then
    log "summary:"
    cat "$OUT/plots/summary.md"
fi
run_step bundle 20 final -- bundle
if [ -n "${FASTRES_SUITE_RETURN:-}" ]; then return_files "$FASTRES_SUITE_RETURN"; fi
log "done in $(( $(date +%s) - START ))s; everything is under $OUT (packed: $OUT/bundle.tar.gz)"
exit "$FAILED"
