"""Shared helpers for the benchmark scripts: which models, built how, their published costs, the machine and
version a result came from, timing and memory measurement, and how results are appended to files.

Result files: --json appends one JSON object per run (JSON Lines); --csv appends rows (header when new).
Stopped by SIGTERM (the GPU suite runs each benchmark under `timeout -s TERM`, SIGKILL 10 s later), a benchmark
writes what it measured, with "stopped_early": true, and exits 0 (see Interrupts).
"""
import contextlib
import csv
import dataclasses
import datetime
import glob
import json
import math
import os
import platform
import re
import signal
import subprocess
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------- published figures
# The paper's Table 1 / Figure 3 complexity, in multiply-adds (the paper calls them FLOPs), at 224x224.
PAPER_MACS = {"resnet18": 1.8e9, "resnet34": 3.6e9, "resnet50": 3.8e9, "resnet101": 7.6e9, "resnet152": 11.3e9,
              "vgg19": 19.6e9, "plain34": 3.6e9}
# torchvision's published "GFLOPS" of its IMAGENET1K_V1 weights (v1.5 models), which are multiply-adds, at 224x224.
TORCHVISION_PUBLISHED_GMACS = {"resnet18": 1.814, "resnet34": 3.664, "resnet50": 4.089, "resnet101": 7.801,
                               "resnet152": 11.514, "vgg19": 19.632}

IMAGENET_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
VARIANTS = ("v1.5", "v1")


@dataclasses.dataclass(frozen=True)
class Arch:
    """One benchmarked network: `name` as on the command line, plus how to build it."""
    name: str            # resnet50, plain34, vgg19, cifar_resnet56
    family: str          # "resnet", "plain", "vgg", "cifar_resnet"
    depth: int
    variant: str         # "v1.5" or "v1" (only bottleneck ResNets differ); "" where it does not apply
    input_size: int      # the side of the square images the network is meant for
    num_classes: int

    @property
    def label(self):
        return f"{self.name} ({self.variant})" if self.variant else self.name

    @property
    def paper_macs(self):
        """Multiply-adds per 224x224 image according to the paper, or None where the paper gives none."""
        return PAPER_MACS.get(self.name.split("_")[0] if self.family == "resnet" else self.name)


def arch_names():
    return list(IMAGENET_RESNETS) + ["plain34", "vgg19"] + [f"cifar_resnet{d}" for d in CIFAR_DEPTHS]


def parse_arch(name, variant="v1.5"):
    """An Arch from a command-line name (see arch_names()); variant applies to the ImageNet ResNets."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    m = re.fullmatch(r"(resnet|plain|cifar_resnet)(\d+)|vgg19", name)
    if m is None:
        raise ValueError(f"unknown arch {name!r}; known: {', '.join(arch_names())} (cifar_resnet: depth 6n+2)")
    if name == "vgg19":
        return Arch(name, "vgg", 19, "", 224, 1000)
    family, depth = m.group(1), int(m.group(2))
    if family == "resnet" and name in IMAGENET_RESNETS:
        return Arch(name, "resnet", depth, variant, 224, 1000)
    if family == "plain" and depth == 34:
        return Arch(name, "plain", depth, "", 224, 1000)
    if family == "cifar_resnet" and depth >= 8 and (depth - 2) % 6 == 0:
        return Arch(name, "cifar_resnet", depth, "", 32, 10)
    raise ValueError(f"unknown arch {name!r}; known: {', '.join(arch_names())} (cifar_resnet: depth 6n+2)")


# ---------------------------------------------------------------- models
def build_fastres(arch):
    """The fastres model for `arch` (fastres.models), freshly initialized."""
    import fastres.models as models
    if arch.family == "resnet":
        return getattr(models, arch.name)(variant=arch.variant)
    if arch.family == "plain":
        return models.resnet34(plain=True)
    if arch.family == "vgg":
        return models.vgg19()
    return models.cifar_resnet(arch.depth)


def _move_stride_to_first_1x1(model):
    """torchvision's v1.5 bottleneck ResNet -> the paper's v1: the stride-2 of each downsampling block moves from
    the 3x3 conv to the first 1x1 (the weights, hence the state_dict, are the same)."""
    from torchvision.models.resnet import Bottleneck
    for block in model.modules():
        if isinstance(block, Bottleneck) and block.conv2.stride != (1, 1):
            block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
    return model


class _PlainBasicBlock(torch.nn.Module):
    """torchvision's BasicBlock without the shortcut: the paper's plain-net building block."""

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        from torchvision.models.resnet import conv3x3
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = torch.nn.BatchNorm2d(planes)
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = torch.nn.BatchNorm2d(planes)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


def _plain34():
    """torchvision's ResNet-34 with every block's shortcut (and projection) removed: the paper's plain-34."""
    import torchvision.models as tvm
    model = tvm.resnet34(weights=None)
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for i, block in enumerate(stage):
            stage[i] = _PlainBasicBlock(block.conv1.in_channels, block.conv1.out_channels, block.conv1.stride)
    return model


class _ZeroPadShortcut(torch.nn.Module):
    """The paper's option A shortcut: the input subsampled by the stride, zero channels appended."""

    def __init__(self, extra_channels, stride):
        super().__init__()
        self.extra_channels, self.stride = extra_channels, stride

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        zeros = x.new_zeros((x.shape[0], self.extra_channels) + tuple(x.shape[2:]))
        return torch.cat([x, zeros], 1)


class _CifarResNet(torch.nn.Module):
    """The paper's CIFAR-10 ResNet (option A shortcuts) from torchvision's BasicBlock, plain PyTorch."""

    def __init__(self, depth, num_classes=10):
        super().__init__()
        from torchvision.models.resnet import BasicBlock, conv3x3
        n = (depth - 2) // 6
        self.conv1 = conv3x3(3, 16)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.relu = torch.nn.ReLU(inplace=True)
        stages, inplanes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                s = stride if i == 0 else 1
                shortcut = _ZeroPadShortcut(planes - inplanes, s) if (s != 1 or inplanes != planes) else None
                blocks.append(BasicBlock(inplanes, planes, s, shortcut))
                inplanes = planes
            stages.append(torch.nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = torch.nn.AdaptiveAvgPool2d((1, 1))
        self.fc = torch.nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_reference(arch):
    """The plain-PyTorch model fastres's `arch` is held to: torchvision's where it has one, adapted for the paper's
    v1, plain-34 and CIFAR nets. Its state_dict keys are fastres's, so load_state_dict(strict=True) works both ways.
    (Its initialization does not matter: build_pair loads fastres's weights into it.)"""
    import torchvision.models as tvm
    if arch.family == "resnet":
        model = getattr(tvm, arch.name)(weights=None)
        return _move_stride_to_first_1x1(model) if arch.variant == "v1" else model
    if arch.family == "plain":
        return _plain34()
    if arch.family == "vgg":
        return tvm.vgg19(weights=None)
    return _CifarResNet(arch.depth, arch.num_classes)


def calibrate_bn_(model, input_shape, seed=0):
    """Set every BatchNorm's running statistics to those of one random batch (train-mode forward, cumulative
    average), leaving the model in eval mode. Freshly initialized statistics (mean 0, var 1) let a deep residual
    net's eval activations grow without bound (about 1e8 at the end of ResNet-152, past fp16's range); calibrated
    ones keep every layer's output normalized as in a trained net."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.train()(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()


def build_pair(arch, seed=0, calibrate_shape=None):
    """(fastres model, reference model) holding the same weights: the reference loads fastres's state_dict.
    calibrate_shape: an input shape to calibrate the BN statistics with (calibrate_bn_, on the reference); both
    models are then in eval mode (else in train mode, as built)."""
    torch.manual_seed(seed)
    fast = build_fastres(arch)
    ref = build_reference(arch)
    ref.load_state_dict(fast.state_dict(), strict=True)
    if calibrate_shape is not None:
        calibrate_bn_(ref, calibrate_shape, seed)
        fast.load_state_dict(ref.state_dict(), strict=True)
        fast.eval()
    return fast, ref


# ---------------------------------------------------------------- the machine, the code, the date
def _run(cmd):
    try:
        out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit():
    """The checkout's commit, with "+dirty" when tracked files differ from it; "unknown" outside a repository."""
    commit = _run(["git", "rev-parse", "HEAD"])
    if commit is None:
        return "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return commit + ("+dirty" if dirty else "")


def cpu_name(cpuinfo="/proc/cpuinfo"):
    """cpu0's model name with its family and model numbers: a VM may name its CPU only "AMD EPYC", which covers
    generations with and without AVX-512 (family 25: model 1 Zen 3, model 17 Zen 4)."""
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip():
                    break  # cpu0's block ends
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        return f"{fields['model name']} (family {fields['cpu family']}, model {fields['model']})"
    return fields["model name"]


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def cpu_flags():
    """Which of CPU_FLAGS (the vector and matrix units CPU inference engines pick kernels by) cpu0 has, per
    /proc/cpuinfo; None where it does not say."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in CPU_FLAGS if flag in present]
    except OSError:
        pass
    return None


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cpus, {torch.get_num_threads()} torch threads)"


def versions():
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "triton", "fastres"):
        try:
            v[name] = getattr(__import__(name), "__version__", "?")
        except Exception:  # a broken optional import must not stop a benchmark from reporting
            v[name] = None
    if torch.version.cuda:
        v["cuda"] = torch.version.cuda
    return v


def environment(device):
    """Where and when a result was measured: for every result row."""
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": git_commit(), "device": device_name(device), "device_type": torch.device(device).type,
            "host": platform.node(), "load_average": _load_average(), "versions": versions(),
            "cpu": cpu_name(), "cpu_flags": cpu_flags()}


def fastres_malloc_state():
    """What fastres's CPU eval plan did to glibc's malloc in this process (fastres.models._malloc: at the plan's first
    forward, so before any timed batch of a run that has fastres), or None where no plan ran: for every CPU run."""
    from fastres.models import _malloc
    return _malloc.state()


def fastres_threads_state():
    """What fastres's CPU eval plan did to ATen's intra-op threads in this process (fastres.models._threads: pinned
    each worker to a CPU of its own, or why not; at the plan's first forward), or None where no plan ran."""
    from fastres.models import _threads
    return _threads.state()


def _load_average():
    """The host's 1, 5 and 15 minute load averages when the run started: CPU timings on a shared machine need it."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------- stopping early
class TimeLimit(Exception):
    """Raised into a step run under Interrupts.abandonable() by SIGTERM or by the alarm of its time limit."""


class Stopped(BaseException):
    """Raised by SIGTERM into a measuring function run by Interrupts.run(). A BaseException, as KeyboardInterrupt
    is, so that a measuring step's own `except Exception` (e.g. around a compilation) does not swallow it."""


class Interrupts:
    """How a benchmark keeps what it measured when the caller's time limit ends it with SIGTERM.

    After install(), SIGTERM sets `stop`. Inside run(fn) it also raises Stopped into fn (between two Python
    bytecodes: a long C++ or CUDA call finishes first), ending fn where it is: fn keeps its results in the
    caller's lists and dicts as it measures them, so the caller then has every completed row. Inside
    abandonable() SIGTERM, or the alarm of its time limit, raises TimeLimit instead. The benchmark then writes the
    run as usual with "stopped_early": true and exits 0: the caller (`timeout`) reports the time limit itself
    (exit 124). Only the first SIGTERM raises; later ones only set `stop`, so that writing is not interrupted."""

    def __init__(self):
        self.stop = False
        self._raise = None  # the exception class SIGTERM raises now; None: SIGTERM only sets `stop`

    def install(self):
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGALRM, self._on_alarm)
        return self

    def _on_term(self, signum, frame):
        self.stop = True
        exc, self._raise = self._raise, None
        if exc is TimeLimit:
            raise TimeLimit("interrupted by SIGTERM (the caller's time limit)")
        if exc is not None:
            raise Stopped("SIGTERM (the caller's time limit)")

    def _on_alarm(self, signum, frame):
        if self._raise is TimeLimit:
            self._raise = None
            raise TimeLimit("compile timeout")

    def run(self, fn, *args):
        """fn(*args), ended early by SIGTERM; returns `stop`: True when SIGTERM came (before or during fn)."""
        if self.stop:
            return True
        try:
            self._raise = Stopped
            fn(*args)
        except Stopped:
            pass
        finally:
            self._raise = None
        return self.stop

    @contextlib.contextmanager
    def abandonable(self, seconds=0.0):
        """A step given up (TimeLimit) at SIGTERM or after `seconds` (0: no limit), e.g. a compilation that would
        eat the rest of the time; TimeLimit at once when SIGTERM came before."""
        if self.stop:
            raise TimeLimit("not started: SIGTERM received")
        outer, self._raise = self._raise, TimeLimit
        if seconds:
            signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            if seconds:
                signal.setitimer(signal.ITIMER_REAL, 0)
            self._raise = outer if not self.stop else None


# ---------------------------------------------------------------- result files
def append_json(path, row):
    """Append one JSON object as one line (JSON Lines)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=False, default=str) + "\n")


def append_csv(path, rows, fieldnames):
    """Append dict rows; the header is written when the file is new or empty."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="raise")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def results_dir(path=None):
    """Where --save appends: `path`, else benchmarks/results/ of this checkout."""
    return os.path.abspath(path or os.path.join(REPO_ROOT, "benchmarks", "results"))


def parse_arch_arg(parser, name, variant="v1.5"):
    """--arch's value as an Arch, or a parser error naming it."""
    try:
        return parse_arch(name, variant)
    except ValueError as e:
        parser.error(f"--arch: {e}")


def add_model_args(parser, default_arch):
    """--arch, --variant, --batch-size (default 1) and --input-size, as one-model commands take them; check_model_args
    validates them after parsing."""
    parser.add_argument("--arch", default=default_arch, help=f"one of {', '.join(arch_names())}")
    parser.add_argument("--variant", choices=VARIANTS, default="v1.5")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-size", type=int, help="default: the arch's (224 ImageNet, 32 CIFAR)")


def check_model_args(parser, args):
    """add_model_args's values checked (a parser error naming the flag); sets args.arch_spec."""
    args.arch_spec = parse_arch_arg(parser, args.arch, args.variant)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.input_size is not None and args.input_size < 1:
        parser.error(f"--input-size must be at least 1, got {args.input_size}")


def parse_device(parser, name, supported=("cpu", "cuda")):
    """--device's value (default: cuda if available, else cpu) as a torch.device, or a parser error naming it."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in supported:
        parser.error(f"--device must be {' or '.join(supported)}, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return device


def add_output_args(parser):
    """The result-file flags every benchmark command shares."""
    g = parser.add_argument_group("results (appended, never overwritten)")
    g.add_argument("--json", metavar="PATH", help="append the run as one JSON line (JSON Lines)")
    g.add_argument("--csv", metavar="PATH", help="append one CSV row per measured item (header when new)")
    g.add_argument("--save", action="store_true",
                   help="append to <results-dir>/<benchmark>.jsonl and <benchmark>.csv")
    g.add_argument("--results-dir", metavar="DIR", help="for --save (default: benchmarks/results/)")


def result_paths(args, benchmark):
    """(JSON Lines paths, CSV paths) the flags of add_output_args ask for."""
    json_paths, csv_paths = [], []
    if args.json:
        json_paths.append(args.json)
    if args.csv:
        csv_paths.append(args.csv)
    if args.save:
        d = results_dir(args.results_dir)
        json_paths.append(os.path.join(d, f"{benchmark}.jsonl"))
        csv_paths.append(os.path.join(d, f"{benchmark}.csv"))
    return json_paths, csv_paths


def write_results(args, benchmark, run, csv_rows, csv_fields):
    """Append the run (one JSON line) and its CSV rows where the flags of add_output_args ask; returns the paths.
    csv_rows None: the CSV rows were appended as they were measured (append_csv_rows)."""
    json_paths, csv_paths = result_paths(args, benchmark)
    for path in json_paths:
        append_json(path, run)
    if csv_rows is not None:
        for path in csv_paths:
            append_csv(path, csv_rows, csv_fields)
    return json_paths + csv_paths


def append_csv_rows(args, benchmark, csv_rows, csv_fields):
    """Append CSV rows where the flags of add_output_args ask, as soon as they are measured."""
    for path in result_paths(args, benchmark)[1]:
        append_csv(path, csv_rows, csv_fields)


ENV_CSV_FIELDS = ["date", "commit", "device", "torch", "triton"]


def env_csv_columns(env):
    """The columns that key every CSV row: when, which code, where, on which torch and triton."""
    return {"date": env["date"], "commit": env["commit"], "device": env["device"],
            "torch": env["versions"].get("torch"), "triton": env["versions"].get("triton")}


# ---------------------------------------------------------------- timing
def quantiles(samples, qs=(0.2, 0.5, 0.8)):
    """Linear-interpolated quantiles of a non-empty list."""
    s = sorted(samples)
    out = []
    for q in qs:
        pos = q * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        out.append(s[lo] + (s[hi] - s[lo]) * (pos - lo))
    return out


def median_ci(samples, confidence=0.95):
    """A distribution-free confidence interval of the median: the order statistics (k-th smallest, k-th largest)
    with the largest k whose coverage, P(X_(k) < median < X_(n+1-k)) = P(k <= Binomial(n, 1/2) <= n - k), is at
    least `confidence`; None where even (min, max) covers less (fewer than 6 samples at 95%)."""
    s = sorted(samples)
    n = len(s)
    best = None
    for k in range(1, n // 2 + 1):
        coverage = sum(math.comb(n, j) for j in range(k, n - k + 1)) / 2 ** n
        if coverage < confidence:
            break
        best = (s[k - 1], s[n - k])
    return best


class Timer:
    """Seconds taken by a callable on a device: CUDA events around it and a synchronize on CUDA (work is
    asynchronous there), wall clock on CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn, *args):
        if self.cuda:
            self.start.record()
            fn(*args)
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        t0 = time.perf_counter()
        fn(*args)
        return time.perf_counter() - t0


def last_level_cache_bytes():
    """The largest CPU cache of cpu0 as Linux reports it (e.g. 300 MiB of L3 on one development machine, 32 MiB on
    another), or None where /sys does not say."""
    sizes = []
    for entry in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(entry).read().strip().upper()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes) if sizes else None


class CacheFlusher:
    """Overwrites a buffer larger than the last-level cache, so that the next timed call reads its inputs from
    memory rather than from a cache the previous call warmed: 256 MiB on GPUs (an H200's L2 is at most 60 MB);
    on CPUs twice the last-level cache Linux reports, at least 64 MiB and at most 1 GiB."""

    def __init__(self, device):
        device = torch.device(device)
        if device.type == "cuda":
            nbytes = 256 << 20
        else:
            nbytes = min(max(2 * (last_level_cache_bytes() or 0), 64 << 20), 1 << 30)
        self.buffer = torch.empty(nbytes // 4, dtype=torch.int32, device=device)

    def __call__(self):
        self.buffer.fill_(0x5A5A5A5A)


def time_calls(fn, device, reps, warmup=1, flush=None):
    """Seconds per call of fn() over `reps` timed calls after `warmup` untimed ones: CUDA events around each call
    (a synchronize after each) on GPUs, the wall clock on CPUs. flush: a callable run before every call, outside
    the timed region (e.g. a CacheFlusher)."""
    timer = Timer(device)
    for _ in range(warmup):
        if flush is not None:
            flush()
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if flush is not None:
            flush()
        times.append(timer(fn))
    return times


# ---------------------------------------------------------------- ceilings, measured in the run that uses them
MATMUL_SIZES = {"cuda": 8192, "cpu": 2048}
COPY_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}  # several times the last-level cache


def matrix_product_as_conv(a, b):
    """(x, w) with F.conv2d(x, w) computing a @ b for square a, b: a's rows laid out as the pixels of a
    channels_last image (a's memory, no copy), b as a 1x1 convolution's weight."""
    size = a.shape[0]
    side = 2 ** (size.bit_length() // 2) if size & (size - 1) == 0 else size  # rows as a near-square map
    x = a.reshape(1, side, size // side, size).permute(0, 3, 1, 2)  # NHWC memory viewed as NCHW
    return x, b.t().reshape(size, size, 1, 1)


def measure_matmul_ceiling(device, dtype, size=None, reps=None):
    """The rate of a large square matrix product in `dtype`, the compute ceiling a run's TFLOP/s are compared
    with: the faster of torch.mm (cuBLAS on GPUs, MKL on CPUs) and the same product as a 1x1 channels_last
    convolution (cuDNN, oneDNN: the engine the networks' convolutions run on, faster than torch.mm on some CPUs).
    Random inputs (zeros run faster on some GPUs), three input sets rotated; the rate of the fastest of `reps`
    timed products after warm-up (a ceiling is the best the machine does; on a shared CPU the median would
    understate it). On CUDA, float32 products use TF32 exactly when cuDNN convolutions do
    (torch.backends.cudnn.allow_tf32), so the ceiling matches the convolutions' precision.
    Returns {tflops, size, dtype, precision, reps, by_method: {mm, conv1x1: {tflops, best_s, median_s}}}."""
    import torch.nn.functional as F
    device = torch.device(device)
    # FASTRES_BENCH_CEILING_SIZE: a smaller product for quick test runs, whose figures mean nothing anyway
    size = size or int(os.environ.get("FASTRES_BENCH_CEILING_SIZE", 0)) or (
        MATMUL_SIZES.get(device.type, 1024) if device.type == "cuda" or dtype == torch.float32 else 1024)
    reps = reps or (20 if device.type == "cuda" else 5)
    gen = torch.Generator().manual_seed(1234)
    sets = [(torch.randn(size, size, generator=gen).to(device, dtype),
             torch.randn(size, size, generator=gen).to(device, dtype)) for _ in range(3)]
    conv_sets = [matrix_product_as_conv(a, b) for a, b in sets]
    precision = str(dtype).replace("torch.", "")
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    if device.type == "cuda" and dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
        precision = "tf32" if torch.backends.cudnn.allow_tf32 else "float32"
    by_method = {}
    try:
        for method, inputs, op in (("mm", sets, torch.mm), ("conv1x1", conv_sets, F.conv2d)):
            state = {"i": 0}

            def product():
                a, b = inputs[state["i"] % len(inputs)]
                state["i"] += 1
                return op(a, b)
            times = time_calls(product, device, reps, warmup=2)
            by_method[method] = {"tflops": 2 * size ** 3 / min(times) / 1e12, "best_s": min(times),
                                 "median_s": quantiles(times)[1]}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before
    best = max(by_method, key=lambda m: by_method[m]["tflops"])
    return {"tflops": by_method[best]["tflops"], "method": best, "size": size,
            "dtype": str(dtype).replace("torch.", ""), "precision": precision, "reps": reps,
            "by_method": by_method}


def measure_copy_bandwidth(device, nbytes=None, reps=None):
    """Device-to-device copy bandwidth, counting bytes read plus bytes written (the memory ceiling of
    memory-bound kernels): the fastest of `reps` copies of an `nbytes` buffer (a ceiling, as above). Returns
    {gbps, nbytes, reps, best_s, median_s}."""
    device = torch.device(device)
    nbytes = nbytes or (int(os.environ.get("FASTRES_BENCH_CEILING_SIZE", 0)) ** 2 * 4
                        or COPY_BYTES.get(device.type, 256 << 20))
    reps = reps or (20 if device.type == "cuda" else 5)
    src = torch.randint(0, 1 << 30, (nbytes // 4,), dtype=torch.int32, device=device)
    dst = torch.empty_like(src)
    times = time_calls(lambda: dst.copy_(src), device, reps, warmup=2)
    return {"gbps": 2 * nbytes / min(times) / 1e9, "nbytes": nbytes, "reps": reps, "best_s": min(times),
            "median_s": quantiles(times)[1]}


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- memory
CUDA_MEMORY_LABEL = ("peak CUDA memory allocated during one batch above what was allocated before it "
                     "(torch.cuda.max_memory_allocated after reset_peak_memory_stats)")
CPU_MEMORY_LABEL = ("peak bytes held by torch's CPU allocator during one batch above what it held before "
                    "(torch.profiler memory records of the calling thread)")


def peak_memory(fn, device, *args):
    """Peak extra bytes allocated while fn(*args) runs once (see CUDA_MEMORY_LABEL / CPU_MEMORY_LABEL)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn(*args)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile
    # The profiler's kineto logs every start and stop (and, without a GPU, a device-count error) to stderr
    # unless its level is above all of them; it reads the level when first used.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    events = prof.profiler.kineto_results.events()
    records = sorted((e.start_ns(), e.nbytes()) for e in events
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


def memory_label(device):
    return CUDA_MEMORY_LABEL if torch.device(device).type == "cuda" else CPU_MEMORY_LABEL


def fmt_bytes(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def format_table(header, rows, align=None):
    """A plain text table; align: a string of 'l'/'r' per column (default: first left, others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip()

    return "\n".join([line(cells[0]), "-" * len(line(cells[0]))] + [line(r) for r in cells[1:]])
