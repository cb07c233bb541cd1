#!/usr/bin/env bash
# The GPU benchmark run, in one command, for a bare GPU machine without network (an H200: all of it within
# 8 minutes):
#
#   benchmarks/gpu_suite.sh OUTDIR
#
# Steps, in order of value, each under its own time limit and all under one deadline (a slow step cannot eat the
# rest: a step that would start with too little time left is skipped and says so):
#   env         OUTDIR/env.txt: date, commit, nvidia-smi, versions of python, torch, triton, CUDA, cuDNN, nvcc
#   build       pip install --no-build-isolation --no-deps --no-index -e .  (MAX_JOBS=16, this GPU's arch only)
#   tune        fastres's one-time per-layer autotuning for ResNet-50's convolutions at batch 256, inference and
#               training (benchmarks/tune_models.py; ResNet-152 and the kernel table pose the same problems)
#   throughput  bf16, batch 256, channels_last, providers fastres, eager, compile, compile-max-autotune
#               (inference with CUDA graphs: compile-max-autotune is then torch.compile(mode="max-autotune")
#               exactly), in this order: ResNet-50 inference, [pytest], ResNet-50 training,
#               ResNet-152 inference, [kernels], ResNet-152 training (compile providers that outlast their compile
#               timeout are dropped and say so; the others are still measured)
#   pytest      pytest -m cuda (with pytest-xdist, 8 workers, where installed)
#   kernels     the per-kernel table (benchmarks/kernels.py, until its time budget is spent)
#   bn_kernels  the BN training kernels (statistics, apply, dual apply, backward) beside ATen on ResNet-50's
#               activation shapes, with the copy bandwidth they are held to (benchmarks/bn_kernels.py)
#   memory      training-step memory of ResNet-50 against batch size (benchmarks/memory.py)
#   largest_batch  ResNet-50's largest bf16 training batch within 16 GiB, fastres and eager (memory.py)
#   train_modes ResNet-50 training-step time in each memory mode beside eager (benchmarks/train_modes.py)
#   flops       the paper's Table 1 beside the counts (benchmarks/flops.py)
#   plot        PNG charts and summary.md (benchmarks/plot.py)
# The ResNet-50 inference figures (the headline) come first; the correctness tests right after them (each
# throughput and kernels run also checks fastres's outputs against ATen's on its own data).
# Everything lands under OUTDIR: logs/<step>.log, results/*.jsonl and *.csv, plots/*.png and summary.md,
# autotune/autotune.json (fastres's per-layer choices), steps.tsv (each step's exit code and seconds), and all of it
# packed into OUTDIR/bundle.tar.gz. The exit code is 0 when every step that ran succeeded.
#
# Environment:
#   FASTRES_SUITE_SMOKE=1         CPU-sized run of the same steps (no build unless FASTRES_SUITE_BUILD=1, a tiny
#                                 CIFAR net, tiny kernel shapes): checks the script's logic on any machine
#   FASTRES_SUITE_BUDGET_S        the deadline in seconds from the start (default 470, smoke 900)
#   FASTRES_SUITE_SKIP            space-separated steps to skip (e.g. "build pytest")
#   FASTRES_SUITE_AUTOTUNE_SEED   an autotune.json from an earlier run (same GPU and software): copied into the
#                                 autotune cache first, so the per-layer choices are not measured again
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
if [ "$SMOKE" = 1 ]; then BUDGET=${FASTRES_SUITE_BUDGET_S:-900}; else BUDGET=${FASTRES_SUITE_BUDGET_S:-470}; fi
DEADLINE=$((START + BUDGET))
RESERVE=25        # seconds kept for the plot and bundle steps at the end
KILL_GRACE=10     # after SIGTERM, a step has this long to write what it measured before SIGKILL
MIN_STEP=15       # a step is not started with less time than this
FAILED=0

export PYTHONUNBUFFERED=1
export FASTRES_CACHE_DIR="$OUT/autotune"
if [ -n "${FASTRES_SUITE_AUTOTUNE_SEED:-}" ] && [ -f "$FASTRES_SUITE_AUTOTUNE_SEED" ]; then
    cp "$FASTRES_SUITE_AUTOTUNE_SEED" "$FASTRES_CACHE_DIR/autotune.json"
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
    if [[ "$SKIP" == *" $name "* ]]; then
        printf "%s\tskipped (FASTRES_SUITE_SKIP)\t-\t0\t0\n" "$name" >> "$OUT/steps.tsv"
        log "$name: skipped (FASTRES_SUITE_SKIP)"
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
    env ${arch:+TORCH_CUDA_ARCH_LIST=$arch} MAX_JOBS="${MAX_JOBS:-16}" NVCC_THREADS="${NVCC_THREADS:-4}" \
        "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . || return 1
    "$PY" -c "import fastres, fastres._C; from fastres.ops import _compiled; print('fastres', fastres.__version__, \
'from', fastres.__file__); print('compiled kernels:', _compiled.available(), _compiled.load_error())"
}

pytest_cuda() {
    # -v: a run cut short by its time limit still shows each finished test in the log
    local args=(-m cuda -v --tb=short -p no:cacheprovider -rfE --junitxml "$OUT/logs/pytest_cuda.xml")
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then args+=(--timeout 120); fi
    if [ "$SMOKE" != 1 ] && "$PY" -c "import xdist" 2>/dev/null; then args+=(-n 8); fi
    if [ "$SMOKE" = 1 ]; then args+=(tests/test_benchmarks.py); else args+=(tests); fi
    "$PY" -m pytest "${args[@]}"
    local rc=$?
    if [ "$rc" -eq 5 ]; then echo "(no test selected: exit 5 counted as success)"; return 0; fi
    return "$rc"
}

bundle() {
    local tmp
    tmp=$(mktemp /tmp/fastres-suite-XXXXXX.tar.gz)
    tar czf "$tmp" -C "$OUT" --exclude=bundle.tar.gz . && mv "$tmp" "$OUT/bundle.tar.gz"
    ls -la "$OUT/bundle.tar.gz"
}

export -f write_env build pytest_cuda bundle
export OUT PY REPO SMOKE

# ------------------------------------------------------------------------------------------------ the matrix
RESULTS=(--save --results-dir "$OUT/results")
if [ "$SMOKE" = 1 ]; then
    ORDER=(cifar_resnet20:infer cifar_resnet20:train)
    TUNE=(60 --arch cifar_resnet20 --batch-size 2 --dtype fp32 --device cpu)   # step limit, then the arguments
    THROUGHPUT=(--device cpu --dtype fp32 --batch-size 2 --iters 2 --warmup 0 --providers fastres,eager --no-progress)
    KERNELS=(--device cpu --tiny --reps 2 --rounds 1 --layers l1.conv1,l2.conv2 --stages stage1)
    MEMORY=(--device cpu --arch cifar_resnet20 --batch-sizes 2,4)
    BN_KERNELS=(--device cpu --batch-size 2 --shapes 16x8 --reps 2 --rounds 1)
    TRAIN_MODES=(--device cpu --arch cifar_resnet20 --batch-size 2 --rounds 1)
    declare -A TP_BUDGET=([cifar_resnet20:infer]=120 [cifar_resnet20:train]=120)
    declare -A COMPILE_TIMEOUT=([cifar_resnet20:infer]=0 [cifar_resnet20:train]=0)
    KERNELS_BUDGET=(120 100)   # step limit, kernels.py --time-budget
    export FASTRES_BENCH_CEILING_SIZE=${FASTRES_BENCH_CEILING_SIZE:-256}
else
    ORDER=(resnet50:infer resnet50:train resnet152:infer resnet152:train)
    TUNE=(120 --arch resnet50 --batch-size 256 --dtype bf16 --modes infer,train)
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
    declare -A TP_BUDGET=([resnet50:infer]=130 [resnet50:train]=120 [resnet152:infer]=80 [resnet152:train]=90)
    declare -A COMPILE_TIMEOUT=([resnet50:infer]=45 [resnet50:train]=40 [resnet152:infer]=30 [resnet152:train]=35)
    KERNELS_BUDGET=(50 35)
fi

log "fastres GPU suite into $OUT (deadline ${BUDGET}s, smoke=$SMOKE)"
run_step env 30 -- write_env
if [ "$SMOKE" = 1 ] && [ "${FASTRES_SUITE_BUILD:-0}" != 1 ]; then
    printf "build\tskipped (smoke)\t-\t0\t0\n" >> "$OUT/steps.tsv"
    log "build: skipped (smoke; FASTRES_SUITE_BUILD=1 builds)"
else
    run_step build 170 -- build
fi
run_step tune "${TUNE[0]}" -- "$PY" benchmarks/tune_models.py "${TUNE[@]:1}"
throughput_step() {  # throughput_step ARCH:MODE
    local arch=${1%%:*} mode=${1##*:}
    local graphs=()
    if [ "$SMOKE" != 1 ] && [ "$mode" = infer ]; then graphs=(--cuda-graphs); fi
    run_step "throughput_${arch}_${mode}" "${TP_BUDGET[$1]}" -- "$PY" benchmarks/throughput.py --arch "$arch" \
        --mode "$mode" "${THROUGHPUT[@]}" "${graphs[@]}" --compile-timeout "${COMPILE_TIMEOUT[$1]}" "${RESULTS[@]}"
}
throughput_step "${ORDER[0]}"
run_step pytest 75 -- pytest_cuda
for run in "${ORDER[@]:1:2}"; do throughput_step "$run"; done
run_step kernels "${KERNELS_BUDGET[0]}" -- "$PY" benchmarks/kernels.py "${KERNELS[@]}" \
    --time-budget "${KERNELS_BUDGET[1]}" "${RESULTS[@]}"
run_step bn_kernels 40 -- "$PY" benchmarks/bn_kernels.py "${BN_KERNELS[@]}" --json "$OUT/results/bn_kernels.jsonl"
for run in "${ORDER[@]:3}"; do throughput_step "$run"; done
run_step memory 45 -- "$PY" benchmarks/memory.py "${MEMORY[@]}" "${RESULTS[@]}"
if [ "$SMOKE" != 1 ]; then
    run_step largest_batch 60 -- env FASTRES_AUTOTUNE=0 "$PY" benchmarks/memory.py --arch resnet50 --dtype bf16 \
        --largest-batch 16 "${RESULTS[@]}"
fi
run_step train_modes 40 -- "$PY" benchmarks/train_modes.py "${TRAIN_MODES[@]}" --json "$OUT/results/train_modes.jsonl"
run_step flops 30 -- "$PY" benchmarks/flops.py "${RESULTS[@]}"
run_step plot 20 final -- "$PY" benchmarks/plot.py --results-dir "$OUT/results" --out-dir "$OUT/plots"
timeout 20 nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv \
    > "$OUT/gpu_state_end.txt" 2>&1 || true
log "steps:"
column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
if [ -f "$OUT/plots/summary.md" ]; then
    log "summary:"
    cat "$OUT/plots/summary.md"
fi
run_step bundle 20 final -- bundle
log "done in $(( $(date +%s) - START ))s; everything is under $OUT (packed: $OUT/bundle.tar.gz)"
exit "$FAILED"
