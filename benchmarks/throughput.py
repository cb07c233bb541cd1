"""Images per second of a fastres model beside the same network in plain PyTorch and under torch.compile, same
weights, measured side by side in one process.

    python benchmarks/throughput.py --arch resnet152
    python benchmarks/throughput.py --arch resnet50 --mode train --dtype bf16 --batch-size 256 --cuda-graphs \\
        --providers fastres,eager,compile,compile-max-autotune --save

Providers (--providers, comma-separated; default: all four on CUDA, fastres,eager on CPU, where compiling a
large net takes minutes):
  fastres               fastres.models.<arch>
  eager                 the plain-PyTorch reference: torchvision's model (adapted for the paper's v1, plain-34 and
                        the CIFAR nets), loaded with fastres's state_dict (strict)
  compile               torch.compile of another copy of the reference, mode "default"
                        ("reduce-overhead" with --cuda-graphs)
  compile-max-autotune  the same with mode "max-autotune-no-cudagraphs" ("max-autotune" with --cuda-graphs, i.e.
                        exactly torch.compile(mode="max-autotune"))
CPU inference peers (--device cpu --mode infer; what a user would run instead, same weights and inputs):
  eager-nchw            the reference in NCHW, with NCHW batches (eager itself runs in the run's layout,
                        channels_last by default on CPU)
  compile-freezing      torch.compile of a copy of the reference, mode "default", with
                        torch._inductor.config.freezing = True only around its first call (the compilation):
                        weights become constants, BN folded into the convolutions
  torchscript-onednn    the reference traced on the first batch (torch.jit.trace) and frozen (torch.jit.freeze), run
                        with oneDNN Graph fusion (torch.jit.enable_onednn_fusion) on around each of its calls only:
                        its graph executor fuses conv, bias, add and ReLU into cached oneDNN Graph partitions
  onnxruntime           the reference exported with torch.onnx.export(dynamo=True) (dynamo=False, with a note, if
                        that fails), an InferenceSession on CPUExecutionProvider, graph optimizations ALL (folds BN),
                        intra-op threads = torch.get_num_threads()
  openvino              the reference converted by openvino.convert_model, compiled for "CPU" with
                        INFERENCE_PRECISION_HINT f32, INFERENCE_NUM_THREADS = torch's threads, PERFORMANCE_HINT LATENCY
  openvino-bf16         the same with INFERENCE_PRECISION_HINT bf16 (skipped on a CPU OpenVINO lists without BF16)
  eager-autocast        the reference (fp32 weights, the run's layout) under torch.autocast("cpu", torch.bfloat16)
  fastres-autocast      fastres under the same autocast
  --providers peers     fastres, eager and all of the above (eager-nchw only where eager is channels_last)
Ecosystem providers (any device and mode; ResNet-18 to 152 v1.5, whose timm and transformers models are
torchvision's network):
  timm                  timm.create_model(<arch>) with the reference's weights (timm's state_dict keys are
                        torchvision's), in the run's layout
  fastres-timm          the same timm model after fastres.convert: what a timm user of fastres runs
  transformers          Hugging Face transformers' ResNetForImageClassification in microsoft/resnet-*'s
                        configuration, with the reference's weights (keys mapped), its logits as the output
  fastres-transformers  the same model after fastres.convert
  transformers-hidden   transformers' model called with output_hidden_states=True (every stage's output kept and
                        returned, as a ResNetBackbone's feature maps are), its logits the output
  fastres-transformers-hidden  the same after fastres.convert
Backbone providers (the features a detection or segmentation model takes, every tap kept, then the reference's
average pool and fc on the last one, so that the output is held to the tolerance rule like the logits):
  torchvision-body      torchvision's IntermediateLayerGetter over the reference (layer1 to layer4 returned, as
                        Faster R-CNN's FPN takes them)
  fastres-torchvision-body  the same after fastres.convert
  timm-features         timm.create_model(<arch>, features_only=True) with the reference's weights (timm's default
                        taps: the stem's ReLU and the four layers)
  fastres-timm-features the same after fastres.convert
The onnxruntime and OpenVINO engines take NCHW batches (what their users hold; the conversion from the run's layout
is untimed, as for eager-nchw) and get them as numpy arrays: Tensor.numpy() shares the tensor's memory, inside the
timed call. Their peak memory is not measured (they allocate outside torch's allocator). Packages:
`pip install -e ".[peers]"`; a peer whose package is missing is skipped with a note, as is one whose export,
conversion or compilation fails. --dtype bf16 is not autocast: it converts weights and inputs to bf16 (no fp32
anywhere); the autocast providers keep fp32 weights and inputs, as a user of autocast does.
When peers (or, in CPU inference, the ecosystem providers) run, every provider but eager is held to fastres's tolerance
rule (fastres.testing) on the first images of a batch against a float64 forward: its error at most twice eager's in
the same precision (the worse of NCHW and channels_last; the bf16 peers against eager under autocast) plus a few ulps
("agreement_float64"; a provider outside the bound is measured and marked DISAGREES). Each run records the CPU,
its flags (avx2, avx512f, avx512_vnni, avx512_bf16, amx_bf16) and the engines' versions.
The CPU peer table (ResNet-50 v1.5, 224x224, 2 threads, batch 1 and 8):
    for b in 1 8; do OMP_NUM_THREADS=2 python benchmarks/throughput.py --arch resnet50 --providers peers \
        --batch-size $b --save; done
Its two autocast rows alone: --providers eager,eager-autocast,fastres,fastres-autocast (channels_last, the default).
fastres's first CPU eval forward raises glibc's malloc thresholds for the whole process
(fastres.models._malloc; FASTRES_CPU_MALLOC=0 leaves them) and pins ATen's intra-op worker threads each to a CPU
of its own (fastres.models._threads; FASTRES_CPU_PIN=0 leaves them), before any timed batch, so every torch
provider of the run has both: the run prints and records ("malloc", "threads") what was done.
A compile provider (or an engine) whose compilation fails or outlasts --compile-timeout is dropped, and the reason
printed.
--cuda-graphs (CUDA only): fastres and eager are captured whole into a CUDA graph (the training step with its
optimizer step; a provider whose capture fails is timed without one, and says so), the compile providers use
their CUDA-graph modes. Each replay first copies the batch into the graph's static input, as the compile modes do.

Every provider gets the same weights, dtype, memory format and inputs. Per provider: a first batch (compilation,
autotuning: reported apart), a second that measures peak memory (with --cuda-graphs, the capture), then
--warmup untimed rounds and the timed rounds, interleaved (each round runs every provider once, from a rotating
start) over a few random batches, so that no provider times a cached input. On CPUs each batch follows a pause
(--settle), so that none is timed while another engine's threads still spin. Timing: CUDA events and a synchronize
per batch on GPUs, the wall clock on CPUs. --mode infer: eval mode under torch.inference_mode(); --mode train:
forward, cross-entropy, backward and an SGD step (momentum 0.9, weight decay 1e-4, the paper's) in train mode.
TFLOP/s = 2 x the multiply-adds counted by fastres.flops (forward, or forward + backward in train mode) x images/s;
its share is against a large matrix product in the run's dtype, measured in the same run.
SIGTERM (e.g. from `timeout`) ends the run early but still reports and writes what was measured (exit 0,
"stopped_early": true; benchmarks/_common.py's Interrupts).
"""
import time

_PROCESS_START = time.perf_counter()  # the reported wall time includes imports and model building

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import _peers  # noqa: E402
import fastres.nn as fnn  # noqa: E402
from fastres import testing  # noqa: E402

# What a CPU user would run instead of fastres (--mode infer, --device cpu): see the module docstring.
CPU_PEERS = ("eager-nchw", "compile-freezing", "torchscript-onednn", "onnxruntime", "openvino", "openvino-bf16",
             "eager-autocast", "fastres-autocast")
TIMM = ("timm", "fastres-timm", "timm-features", "fastres-timm-features")
TRANSFORMERS = ("transformers", "fastres-transformers", "transformers-hidden", "fastres-transformers-hidden")
TORCHVISION = ("torchvision-body", "fastres-torchvision-body")
ZOOS = TIMM + TRANSFORMERS + TORCHVISION  # the model zoos' own models, and fastres.convert of them
PROVIDERS = ("fastres", "eager", "compile", "compile-max-autotune") + CPU_PEERS + ZOOS
DEFAULT_PROVIDERS = {"cuda": PROVIDERS[:4], "cpu": ("fastres", "eager")}
PEERS_KEYWORD = "peers"  # --providers peers: fastres, eager and every CPU peer
FP32_ONLY = ("torchscript-onednn", "onnxruntime", "openvino", "openvino-bf16", "eager-autocast", "fastres-autocast")
AUTOCAST = ("eager-autocast", "fastres-autocast")  # fp32 weights and inputs, forward under autocast to bf16
BF16_PEERS = ("openvino-bf16",) + AUTOCAST  # held to eager under autocast to bf16 in the agreement check
OPENVINO_PRECISION = {"openvino": "f32", "openvino-bf16": "bf16"}
# torch.compile mode per (provider, --cuda-graphs)
COMPILE_MODES = {("compile", False): "default", ("compile", True): "reduce-overhead",
                 ("compile-max-autotune", False): "max-autotune-no-cudagraphs",
                 ("compile-max-autotune", True): "max-autotune",
                 ("compile-freezing", False): "default"}
AGREEMENT_IMAGES = 2  # images of the first batch held to a float64 forward when CPU peers run
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Per device type: batch size, timed batches, warm-up rounds, time budget of the timed batches (seconds; 0: none).
# The CPU budget keeps a default run of the largest nets within about three minutes on a small, shared machine.
# Settle: seconds of idle before each batch of the interleaved rounds (see run_interleaved).
DEFAULTS = {"cpu": {"batch_size": 8, "iters": 10, "warmup": 1, "time_budget": 60.0, "settle": 0.1},
            "cuda": {"batch_size": 256, "iters": 50, "warmup": 5, "time_budget": 0.0, "settle": 0.0}}
MIN_TIMED_ROUNDS = 3  # a time budget never cuts the timed batches below this
# channels_last by default on GPUs (tensor cores want NHWC) and on CPUs too, as measured on the 2-core AMD EPYC
# development machine (torch 2.14, fp32, batch 8, eval, the two formats alternated, process CPU time as the machine
# was shared): NHWC/NCHW time 0.81 fastres and 0.91 eager for ResNet-50, 0.91 and 0.90 for ResNet-152.
CPU_CHANNELS_LAST = True
CPU_CHANNELS_LAST_NOTE = "cpu default: measured faster than NCHW on CPU"
NUM_INPUTS = 4  # distinct random batches, rotated so that no provider times a single cached input
CSV_FIELDS = C.ENV_CSV_FIELDS + [
    "arch", "variant", "mode", "dtype", "batch_size", "input_size", "channels_last", "cuda_graphs", "provider",
    "compile_mode", "images_per_s", "images_per_s_p20", "images_per_s_p80", "latency_ms", "tflops",
    "ceiling_tflops", "ceiling_share", "peak_memory_bytes", "first_call_s", "ratio_vs_eager", "ratios",
    "timed_batches", "notes", "settings"]


@dataclasses.dataclass
class Settings:
    arch: C.Arch
    mode: str
    dtype: torch.dtype
    device: torch.device
    batch_size: int
    input_size: int
    channels_last: bool
    channels_last_why: str
    iters: int
    warmup: int
    time_budget: float
    providers: tuple
    cuda_graphs: bool
    compile_timeout: float
    seed: int
    progress: bool
    memory_mode: str = None  # fastres.nn.set_memory_mode for the fastres model in train mode; None: the default
    settle: float = 0.0  # seconds of idle before each batch of the interleaved rounds

    @property
    def dtype_name(self):
        return next(name for name, dtype in DTYPES.items() if dtype == self.dtype)

    def to_dict(self):
        return {"arch": self.arch.name, "variant": self.arch.variant, "mode": self.mode,
                "dtype": self.dtype_name, "device": str(self.device),
                "batch_size": self.batch_size, "input_size": self.input_size, "channels_last": self.channels_last,
                "channels_last_why": self.channels_last_why, "iters": self.iters, "warmup": self.warmup,
                "time_budget_s": self.time_budget, "settle_s": self.settle, "providers": list(self.providers),
                "cuda_graphs": self.cuda_graphs, "compile_timeout_s": self.compile_timeout,
                "compile_modes": {p: COMPILE_MODES[(p, self.cuda_graphs)] for p in self.providers
                                  if p.startswith("compile")},
                "seed": self.seed, "num_threads": torch.get_num_threads(), "num_inputs": NUM_INPUTS,
                "memory_mode": self.memory_mode or fnn.DEFAULT_MEMORY_MODE,
                **_backend_flags(self.device)}


def _backend_flags(device):
    if device.type != "cuda":
        return {}
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}


@dataclasses.dataclass
class Provider:
    name: str
    model: torch.nn.Module  # owns the parameters and the train/eval flag
    step: object            # step(x, target): one timed unit of work on one batch
    body: object = None     # what a CUDA graph captures (fastres, eager), see make_step
    zero_grad: object = None
    compile_mode: str = None
    fallible: bool = False  # compilers and engines: a first batch that fails or times out drops the provider
    inputs: list = None     # the batches in this provider's own layout (same values); None: the run's
    measure_memory: bool = True  # False: the engine allocates outside torch's allocator
    times: list = dataclasses.field(default_factory=list)
    first_call_s: float = None
    peak_memory: int = None
    graphed: bool = False
    notes: list = dataclasses.field(default_factory=list)

    def batch(self, inputs, i):
        """The i-th (x, target) of the run's batches, in this provider's layout."""
        own = self.inputs or inputs
        return own[i % len(own)]


class LazyEngine:
    """A step that builds its engine (export or conversion, then compilation) from the first batch it is given, so
    that the first batch's time includes it and a failure or timeout drops the provider as for torch.compile."""

    def __init__(self, provider_notes, build):
        self.notes, self.build, self.run = provider_notes, build, None

    def __call__(self, x, target):
        if self.run is None:
            self.run, notes = self.build(x)
            self.notes.extend(notes)
        return self.run(x)


# ---------------------------------------------------------------- setup
def make_step(model, mode, forward=None, mark_cudagraph_step=False):
    """(step, body, zero_grad): `step` is the unit of work timed per batch; `body` is the same without the
    trailing zero_grad (what a CUDA graph captures: a captured backward writes its gradients into the same
    memory on every replay). forward: what computes the output (default: the model itself; for the compile
    providers, the compiled module), while `model` owns the parameters and the train/eval flag."""
    forward = model if forward is None else forward

    def call(x):
        if mark_cudagraph_step:  # torch.compile's CUDA graphs: each call is a new step
            torch.compiler.cudagraph_mark_step_begin()
        return forward(x)

    if mode == "infer":
        model.eval()

        def infer(x, target):
            with torch.inference_mode():
                return call(x)
        return infer, infer, None

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def body(x, target):
        out = call(x)
        F.cross_entropy(out.float(), target).backward()
        optimizer.step()
        return out

    def zero_grad():
        optimizer.zero_grad(set_to_none=True)

    def train(x, target):
        out = body(x, target)
        # Gradients are dropped at the end of the step, so that between steps only weights and optimizer state are
        # held, as the peak-memory measurement assumes.
        zero_grad()
        return out
    return train, body, zero_grad


def prepare(model, s, channels_last=None):
    channels_last = s.channels_last if channels_last is None else channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(device=s.device, dtype=s.dtype, memory_format=fmt)


def twin(model, build):
    """A fresh model from build() holding `model`'s weights and buffers (strict)."""
    copy_ = build()
    copy_.load_state_dict(model.state_dict(), strict=True)
    return copy_.train(model.training)


def freezing_on_first_call(compiled):
    """compiled(x), with torch._inductor.config.freezing set only around its first call (where torch.compile
    compiles): the weights become constants of the graph (BN folded into the convolutions, weights prepacked)."""
    state = {"compiled": False}

    def forward(x):
        if state["compiled"]:
            return compiled(x)
        with torch._inductor.config.patch(freezing=True):
            out = compiled(x)
        state["compiled"] = True
        return out
    return forward


def torchscript_onednn(model):
    """forward(x): `model` traced on its first batch and frozen, each call run with oneDNN Graph fusion on (the
    graph executor fuses on the calls it profiles first) and the flag restored after, so that it reaches no other
    provider."""
    state = {}

    def forward(x):
        before = torch.jit.onednn_fusion_enabled()
        torch.jit.enable_onednn_fusion(True)
        try:
            if "module" not in state:
                # traced outside inference mode (x is an inference tensor there): TorchScript's deprecation warnings off
                with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    state["module"] = torch.jit.freeze(torch.jit.trace(model, x.clone()))
            return state["module"](x)
        finally:
            torch.jit.enable_onednn_fusion(before)
    return forward


def autocast_bf16(model, device):
    def forward(x):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(x)
    return forward


def build_engine(name, reference, s):
    """The build function of an onnxruntime or OpenVINO provider's LazyEngine: from the reference model's weights,
    an fp32, eval, NCHW copy is exported or converted for the first batch's shape."""
    converted = {}  # the OpenVINO conversion, shared by that provider's first (and only) build

    def build(x):
        model = twin(reference, lambda: C.build_reference(s.arch)).float().eval()
        if name == "onnxruntime":
            return _peers.onnxruntime_engine(model, x, torch.get_num_threads())
        return _peers.openvino_engine(model, x, torch.get_num_threads(), OPENVINO_PRECISION[name], converted)
    return build


def build_providers(s, inputs, skipped):
    """The providers of --providers that can run here; those that cannot (a package not installed, no bf16 on this
    CPU) go into `skipped`, with a note on stderr."""
    # BN statistics calibrated on a small random batch: keeps activations in range (fp16) like a trained net's.
    fast, ref = C.build_pair(s.arch, seed=s.seed, calibrate_shape=(4, 3, s.input_size, s.input_size))
    if s.memory_mode is not None:
        fnn.set_memory_mode(fast, s.memory_mode)
    models = {"fastres": fast, "eager": ref}
    for name in s.providers:
        why = _peers.unavailable(name)
        if why is not None:
            skipped[name] = why
            print(f"{name} provider skipped: {why}", file=sys.stderr)
        elif name.startswith("compile") or name in ("eager-nchw", "eager-autocast", "torchscript-onednn"):
            models[name] = twin(ref, lambda: C.build_reference(s.arch))
        elif name == "fastres-autocast":
            models[name] = twin(fast, lambda: C.build_fastres(s.arch))
        elif name in ZOOS:
            zoo = "timm" if name in TIMM else "transformers" if name in TRANSFORMERS else "torchvision"
            convert = name.startswith("fastres-")
            if name.endswith("timm-features"):
                models[name] = _peers.timm_features(ref, s.arch, convert=convert)
            elif name in TORCHVISION:
                models[name] = _peers.torchvision_body(ref, s.arch, convert=convert)
            elif zoo == "timm":
                models[name] = _peers.timm_resnet(ref, s.arch, convert=convert)
            else:
                models[name] = _peers.transformers_resnet(ref, s.arch, convert=name.startswith("fastres-"),
                                                          hidden_states=name.endswith("-hidden"))
            if models[name] is None:
                skipped[name] = f"{zoo} has no {s.arch.label}"
                print(f"{name} provider skipped: {skipped[name]}", file=sys.stderr)
    # eager-nchw and the engines take NCHW batches (the same values): what their users hold, converted untimed
    nchw_inputs = [(x.contiguous(), target) for x, target in inputs] if s.channels_last else None
    providers = []
    for name in s.providers:
        if name in skipped:
            continue
        if name in _peers.ENGINES:
            p = Provider(name, prepare(ref, s), None, fallible=True, inputs=nchw_inputs, measure_memory=False)
            p.step = LazyEngine(p.notes, build_engine(name, ref, s))
            providers.append(p)
            continue
        model = prepare(models[name], s, channels_last=False if name == "eager-nchw" else None)
        if name.startswith("compile"):
            compile_mode = COMPILE_MODES[(name, s.cuda_graphs)]
            forward = torch.compile(model, mode=compile_mode)
            if name == "compile-freezing":
                forward = freezing_on_first_call(forward)
            step, body, zero_grad = make_step(model, s.mode, forward, mark_cudagraph_step=s.cuda_graphs)
            providers.append(Provider(name, model, step, None, zero_grad, compile_mode, fallible=True))
        elif name == "torchscript-onednn":
            step, body, zero_grad = make_step(model, s.mode, torchscript_onednn(model))
            providers.append(Provider(name, model, step, None, zero_grad, fallible=True, notes=[
                "torch.jit.freeze(torch.jit.trace(reference)) on the first batch, torch.jit.enable_onednn_fusion(True) "
                "around each call"]))
        else:
            forward = autocast_bf16(model, s.device) if name in AUTOCAST else None
            step, body, zero_grad = make_step(model, s.mode, forward)
            providers.append(Provider(name, model, step, body, zero_grad,
                                      inputs=nchw_inputs if name == "eager-nchw" else None,
                                      notes=autocast_compute_notes(s) if name == "fastres-autocast" else []))
    return providers, ref


def autocast_compute_notes(s):
    """What fastres's CPU eval plan computes in under bf16 autocast on this machine (fastres.models._eval_plan:
    fp32 where this CPU's bf16 convolutions are measurably slower), as a note; none where the plan does not run."""
    if s.device.type != "cpu" or s.mode != "infer":
        return []
    from fastres.models import _eval_plan
    return [f"fastres's eval plan {_eval_plan.autocast_compute_reason(torch.bfloat16)}"]


def make_inputs(s):
    """NUM_INPUTS random batches (standard normal images, uniform labels) on the device, in the dtype/format."""
    gen = torch.Generator().manual_seed(s.seed + 1)
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    shape = (s.batch_size, 3, s.input_size, s.input_size)
    return [(torch.randn(shape, generator=gen).to(s.device, s.dtype).contiguous(memory_format=fmt),
             torch.randint(0, s.arch.num_classes, (s.batch_size,), generator=gen).to(s.device))
            for _ in range(NUM_INPUTS)]


# ---------------------------------------------------------------- measurement
def check_agreement(providers, x, device):
    """Largest difference between the fastres and eager outputs on one batch (before any timed step, in the
    benchmark's mode; a train-mode forward updates both models' BN running stats alike). This is each model's
    first forward (autotuning happens here on GPUs): its seconds are added to the provider's first batch."""
    by_name = {p.name: p for p in providers}
    if "fastres" not in by_name or "eager" not in by_name:
        return None
    timer = C.Timer(device)
    outputs = {}

    def forward(name):
        outputs[name] = by_name[name].model(x).float()
    with torch.no_grad():
        for name in ("fastres", "eager"):
            by_name[name].first_call_s = timer(forward, name)
    out_fast, out_ref = outputs["fastres"], outputs["eager"]
    diff = (out_fast - out_ref).abs().max().item()
    scale = out_ref.abs().max().item()
    return {"max_abs_diff": diff, "max_abs_eager": scale, "relative": diff / scale if scale else diff}


def check_against_float64(providers, inputs, s, reference):
    """When CPU peers run (--mode infer): every provider but eager on the first batch (its first AGREEMENT_IMAGES
    images), held to fastres's tolerance rule (fastres.testing) against a float64 forward of the reference: error
    at most twice eager's in the same precision (the worse of its NCHW and channels_last runs) plus a few ulps.
    The bf16 peers (OpenVINO bf16, the autocast providers) are held to eager under autocast to bf16. Run after the
    first batches (engines and compilations exist then), untimed. A provider outside the bound is not dropped: its
    row says so. Returns {provider: {precision, max_error, eager_error, bound, ok}}."""
    k = min(s.batch_size, AGREEMENT_IMAGES)
    x = inputs[0][0][:k]
    reference = copy.deepcopy(reference).eval()
    with torch.inference_mode():
        ref64 = copy.deepcopy(reference).to(torch.float64, memory_format=torch.contiguous_format)(x.double())
    eager_errors = {}

    def eager_error(autocast):
        if autocast not in eager_errors:
            errors = []
            for fmt in (torch.contiguous_format, torch.channels_last):
                model = reference.to(memory_format=fmt)
                with torch.inference_mode(), torch.autocast(s.device.type, torch.bfloat16, enabled=autocast):
                    errors.append(testing.max_error(model(x.contiguous(memory_format=fmt)), ref64))
            eager_errors[autocast] = max(errors)
        return eager_errors[autocast]

    checks = {}
    for p in providers:
        if p.name == "eager":
            continue
        autocast = p.name in BF16_PEERS
        with torch.inference_mode():
            out = p.step(*p.batch(inputs, 0))[:k]
        aten = eager_error(autocast)
        dtype = torch.bfloat16 if autocast else s.dtype
        err = testing.max_error(out, ref64)
        limit = testing.bound(aten, dtype, ref64)
        checks[p.name] = {"precision": "bf16 (vs eager under autocast)" if autocast else s.dtype_name,
                          "max_error": err, "eager_error": aten, "bound": limit, "ok": err <= limit}
        if err > limit:
            p.notes.append(f"DISAGREES with the float64 reference: max error {err:.3g} > 2 x eager's {aten:.3g} "
                           f"+ floor ({limit:.3g})")
            print(f"{p.name}: {p.notes[-1]}", file=sys.stderr)
    return checks


def _short(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def first_calls(providers, inputs, s, interrupts, skipped):
    """Each provider's first batch, one provider after another (compilation and autotuning happen here; a
    compile provider that fails or runs out of time is dropped into `skipped`)."""
    timer = C.Timer(s.device)
    for p in providers:
        x, target = p.batch(inputs, 0)
        timeout = s.compile_timeout if p.fallible else 0.0
        try:
            with interrupts.abandonable(timeout):
                p.first_call_s = (p.first_call_s or 0.0) + timer(p.step, x, target)
        except C.TimeLimit as e:
            skipped[p.name] = f"first batch not finished: {e}" + (f" ({timeout:g} s)" if "timeout" in str(e) else "")
        except torch.cuda.OutOfMemoryError as e:  # the others may still fit: measure them
            skipped[p.name] = f"out of memory in the first batch: {_short(e)}"
            p.model, p.step, p.body = None, None, None
            torch.cuda.empty_cache()
        except Exception as e:  # torch.compile, exporters, engines can fail for reasons outside fastres
            if not p.fallible:
                raise
            # torch.compile re-raises a TimeLimit raised inside it wrapped in its own error
            skipped[p.name] = (f"first batch not finished: compile timeout ({timeout:g} s)"
                               if "TimeLimit" in str(e) else _short(e))
        if p.name in skipped:
            print(f"{p.name} provider skipped: {skipped[p.name]}", file=sys.stderr)
            C.synchronize(s.device)
    return [p for p in providers if p.name not in skipped]


def capture_graph(p, x, target, s, pool):
    """Capture p.body into a CUDA graph (after warm-up batches on a side stream, as torch.cuda.graph requires);
    returns the new step: copy the batch into the static input, replay. The graphs of one run share one memory
    pool: they replay one after another on one stream, and what one keeps between replays (static input and
    output, gradients) stays allocated, so another graph's scratch memory never overlaps it."""
    static_x, static_target = x.clone(), target.clone()
    side = torch.cuda.Stream(s.device)
    side.wait_stream(torch.cuda.current_stream(s.device))
    with torch.cuda.stream(side):
        for _ in range(3):
            p.body(static_x, static_target)
            if p.zero_grad:
                p.zero_grad()
    torch.cuda.current_stream(s.device).wait_stream(side)
    if p.zero_grad:
        p.zero_grad()  # the captured backward then allocates the gradients in the graph's pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        static_out = p.body(static_x, static_target)

    def replay(x, target):
        static_x.copy_(x)
        static_target.copy_(target)
        graph.replay()
        return static_out
    return replay


def graph_agreement(plain_step, graphed_step, x, target):
    """Relative max difference between a replay and the plain step on the same batch (inference only: a
    training step changes the weights)."""
    with torch.inference_mode():
        a = plain_step(x, target).float().clone()
        b = graphed_step(x, target).float().clone()
    scale = a.abs().max().item()
    return (a - b).abs().max().item() / (scale or 1.0)


def memory_and_graphs(providers, inputs, s):
    """Each provider's second batch: its peak memory (C.peak_memory); with --cuda-graphs, fastres and eager are
    captured here instead, and the peak of the capture is theirs (it runs the step on a side stream and records
    it; the graph's memory is the step's)."""
    pool = None
    if s.cuda_graphs:
        torch.cuda.empty_cache()  # memory cached by the first batches cannot serve the graphs' private pool
        pool = torch.cuda.graph_pool_handle()
    for p in providers:
        x, target = p.batch(inputs, 0)
        if not p.measure_memory:
            p.notes.append("peak memory not measured: the engine allocates outside torch's allocator")
            continue
        if s.cuda_graphs and p.body is not None:
            plain_step = p.step
            torch.cuda.synchronize(s.device)
            torch.cuda.reset_peak_memory_stats(s.device)
            before = torch.cuda.memory_allocated(s.device)
            try:
                replay = capture_graph(p, x, target, s, pool)
            except Exception as e:  # a capture can fail on any op that syncs with the host
                torch.cuda.synchronize(s.device)
                p.notes.append(f"CUDA graph capture failed ({_short(e)}): timed without a graph")
                print(f"{p.name}: {p.notes[-1]}", file=sys.stderr)
            else:
                torch.cuda.synchronize(s.device)
                p.peak_memory = torch.cuda.max_memory_allocated(s.device) - before
                p.step, p.graphed = replay, True
                if s.mode == "infer":
                    rel = graph_agreement(plain_step, replay, inputs[1][0], inputs[1][1])
                    p.notes.append(f"graph replay vs plain step: relative max difference {rel:.2g}")
                continue
        p.peak_memory = C.peak_memory(p.step, s.device, x, target)


def run_interleaved(providers, inputs, s, interrupts):
    """Warm-up then timed rounds; each round runs every provider once, starting with a different one each round.
    With a time budget, the timed rounds stop once it is spent (after at least MIN_TIMED_ROUNDS; the settle pauses
    count); after SIGTERM, after at least one. Returns the number of timed rounds.

    s.settle seconds of idle come before each batch, so that no provider is timed while another's threads still
    spin: onnxruntime's intra-op workers burn both cores for about 40 ms after a run, and the provider timed next
    ran 8-13% slower for it (ResNet-50, batch 8, 2 threads; with a 0.1 s pause the effect was gone)."""
    timer = C.Timer(s.device)
    rounds = s.warmup + s.iters
    bar = _progress(rounds * len(providers), s)
    timed_rounds, timed_start = 0, None
    for i in range(rounds):
        if i == s.warmup:
            timed_start = time.perf_counter()
            print("timed batches: start", file=sys.stderr, flush=True)
        if i > s.warmup and interrupts.stop and timed_rounds >= 1:
            break
        if (i > s.warmup and s.time_budget and timed_rounds >= MIN_TIMED_ROUNDS
                and time.perf_counter() - timed_start > s.time_budget):
            break
        if interrupts.stop and i < s.warmup:
            continue  # skip the rest of the warm-up
        k = i % len(providers)
        for p in providers[k:] + providers[:k]:
            if s.settle:
                time.sleep(s.settle)
            dt = timer(p.step, *p.batch(inputs, i))
            if i >= s.warmup:
                p.times.append(dt)
            bar.update(1)
            bar.set_postfix_str(f"{'warm-up' if i < s.warmup else 'timed'} {p.name}")
        if i >= s.warmup:
            timed_rounds += 1
    bar.close()
    return timed_rounds


def _progress(total, s):
    from tqdm import tqdm
    # disable=None: shown on a terminal only (not in logs or when a test runs the script)
    return tqdm(total=total, desc=f"{s.arch.name} {s.mode}", unit="batch", leave=False, file=sys.stderr,
                disable=None if s.progress else True)


def summarize(p, s, macs_per_image, ceiling):
    q = C.quantiles(p.times)
    # images/s from the latency quantiles (its 20th percentile is the batch over the latency's 80th), so that the
    # two always agree, also when an even number of samples makes the median an interpolation
    iq = [s.batch_size / t for t in reversed(q)]
    tflops = None if macs_per_image is None else 2 * macs_per_image * iq[1] / 1e12
    return {"images_per_s": {"median": iq[1], "p20": iq[0], "p80": iq[2]},
            "latency_ms": {"median": 1e3 * q[1], "p20": 1e3 * q[0], "p80": 1e3 * q[2]},
            "tflops": tflops, "ceiling_share": None if tflops is None else tflops / ceiling["tflops"],
            "first_call_s": p.first_call_s, "peak_memory_bytes": p.peak_memory, "compile_mode": p.compile_mode,
            "cuda_graph": p.graphed or (s.cuda_graphs and p.compile_mode is not None), "notes": p.notes,
            "times_s": p.times}


def add_ratios(results):
    """Each provider's median images/s over every other provider's (and over eager's, kept as its own field), and
    the same per round ("paired_ratios"): in each timed round every provider ran one batch, so the ratio of two
    providers' times in one round is free of the drift between rounds (a noisy neighbour, frequency), and the
    median of those ratios comes with a distribution-free 95% confidence interval (None under 6 rounds): where it
    excludes 1.0, the difference is more than this run's noise."""
    for name, r in results.items():
        mine = r["images_per_s"]["median"]
        r["ratios"] = {other: mine / o["images_per_s"]["median"] for other, o in results.items() if other != name}
        r["ratio_vs_eager"] = 1.0 if name == "eager" else r["ratios"].get("eager")
        r["paired_ratios"] = {}
        for other, o in results.items():
            if other != name:
                per_round = [theirs / t for t, theirs in zip(r["times_s"], o["times_s"])]
                ci = C.median_ci(per_round)
                r["paired_ratios"][other] = {"median": C.quantiles(per_round)[1], "ci95": ci and list(ci),
                                             "rounds": len(per_round)}


def count_macs(providers, s):
    """Multiply-adds per image counted by fastres.flops (forward; forward + backward in train mode)."""
    from fastres import flops
    shape = (1, 3, s.input_size, s.input_size)
    counts = {}
    for p in providers:
        if p.name in ("fastres", "eager"):
            counts[p.name] = flops.count(p.model, shape, backward=s.mode == "train").macs
    return counts


# ---------------------------------------------------------------- report
def report(s, env, results, counted, ceiling, agreement, float64_checks, skipped, timed_rounds, wall_s, stopped):
    arch = s.arch
    fmt = "channels_last" if s.channels_last else "NCHW"
    print(f"{arch.label} | {s.mode} | {s.dtype_name} | batch {s.batch_size} | "
          f"{s.input_size}x{s.input_size} | {fmt} ({s.channels_last_why}) | "
          f"{'CUDA graphs' if s.cuda_graphs else 'no CUDA graphs'} | {env['device']}")
    work = "forward + backward" if s.mode == "train" else "forward"
    paper = arch.paper_macs
    forward_note = (" (the paper's figure: a forward at 224x224)"
                    if paper is not None and (s.mode == "train" or s.input_size != 224) else "")
    counts = ", ".join(f"{v / 1e9:.3f}e9 ({k})" for k, v in counted.items())
    print(f"multiply-adds per image, {work}: counted {counts or '-'}; paper "
          f"{'-' if paper is None else f'{paper / 1e9:.1f}e9'}{forward_note}")
    print(f"matrix-product ceiling measured in this run: {ceiling['tflops']:.3g} TFLOP/s "
          f"({ceiling['size']}^3 {ceiling['precision']}, {ceiling['method']}, best of {ceiling['reps']})")
    cut = ""
    if timed_rounds < s.iters:
        cut = (" (SIGTERM: stopped early)" if stopped else
               f" (of {s.iters}: the {s.time_budget:g} s time budget was spent)")
    settle = f", {s.settle:g} s idle before each" if s.settle else ""
    print(f"first batch + memory batch + {s.warmup} warm-up + {timed_rounds} timed batches{cut} per provider, "
          f"interleaved over {NUM_INPUTS} random inputs{settle}; torch {env['versions']['torch']}, "
          f"triton {env['versions'].get('triton')}, {torch.get_num_threads()} threads, commit {env['commit'][:12]}")
    names = list(results)
    header = (["provider", "img/s median", "p20", "p80", "ms/batch", "TFLOP/s", "% of mm", "peak memory*",
               "first batch s**"] + [f"vs {n}" for n in names])
    rows = []
    for name, r in results.items():
        ips = r["images_per_s"]
        label = name + (f" [{r['compile_mode']}]" if r["compile_mode"] else "") + (" [graph]" if r["cuda_graph"]
                                                                                   and not r["compile_mode"] else "")
        rows.append([label, f"{ips['median']:.1f}", f"{ips['p20']:.1f}", f"{ips['p80']:.1f}",
                     f"{r['latency_ms']['median']:.1f}",
                     "-" if r["tflops"] is None else f"{r['tflops']:.3g}",
                     "-" if r["ceiling_share"] is None else f"{100 * r['ceiling_share']:.1f}%",
                     C.fmt_bytes(r["peak_memory_bytes"]), f"{r['first_call_s']:.2f}"]
                    + ["-" if n == name else f"{r['ratios'][n]:.2f}x" for n in names])
    print(C.format_table(header, rows))
    print(f"* {C.memory_label(s.device)}" + ("; for graph-captured providers, during the capture"
                                             if s.cuda_graphs else ""))
    print("** the first batch: compilation and autotuning (fastres, eager: with the agreement check's forward; "
          "onnxruntime, openvino: with the export or conversion)")
    print("% of mm: TFLOP/s from the counted multiply-adds over the matrix-product ceiling; above 100% where a "
          "provider computes fewer (fastres's Winograd 3x3 convolutions on CPU)")
    print("vs X: this provider's median images/s over X's")
    for name, r in results.items():
        if name.startswith("fastres"):
            print(f"{name} over each, per round (median of the rounds' ratios [its 95% confidence interval]): "
                  + ", ".join(f"{other} {p['median']:.3f}x" + (f" [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}]"
                                                                if p["ci95"] else " [under 6 rounds: none]")
                              for other, p in r["paired_ratios"].items()))
    if agreement is not None:
        print(f"outputs agree? max |fastres - eager| = {agreement['max_abs_diff']:.3g} "
              f"(max |eager| = {agreement['max_abs_eager']:.3g}, relative {agreement['relative']:.2g})")
    if float64_checks:
        print(f"against a float64 forward ({AGREEMENT_IMAGES} images; bound: 2 x eager's error in that precision + "
              "floor, fastres.testing): " + "; ".join(
                  f"{name} {c['max_error']:.2g} <= {c['bound']:.2g}" if c["ok"]
                  else f"{name} {c['max_error']:.2g} > {c['bound']:.2g} DISAGREES"
                  for name, c in float64_checks.items()))
    for name, r in results.items():
        for note in r["notes"]:
            print(f"note {name}: {note}")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print(f"wall time {wall_s:.1f} s")


def csv_rows(env, s, results, ceiling, timed_rounds):
    settings = json.dumps(s.to_dict(), sort_keys=True)
    rows = []
    for name, r in results.items():
        ips = r["images_per_s"]
        rows.append({**C.env_csv_columns(env), "arch": s.arch.name, "variant": s.arch.variant, "mode": s.mode,
                     "dtype": s.dtype_name, "batch_size": s.batch_size, "input_size": s.input_size,
                     "channels_last": s.channels_last, "cuda_graphs": s.cuda_graphs, "provider": name,
                     "compile_mode": r["compile_mode"] or "", "images_per_s": ips["median"],
                     "images_per_s_p20": ips["p20"], "images_per_s_p80": ips["p80"],
                     "latency_ms": r["latency_ms"]["median"], "tflops": r["tflops"],
                     "ceiling_tflops": ceiling["tflops"], "ceiling_share": r["ceiling_share"],
                     "peak_memory_bytes": r["peak_memory_bytes"], "first_call_s": r["first_call_s"],
                     "ratio_vs_eager": r["ratio_vs_eager"],
                     "ratios": ";".join(f"{k}={v:.4f}" for k, v in r["ratios"].items()),
                     "timed_batches": timed_rounds, "notes": " | ".join(r["notes"]), "settings": settings})
    return rows


# ---------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True, help=f"one of {', '.join(C.arch_names())} (cifar_resnet: any 6n+2)")
    p.add_argument("--variant", choices=C.VARIANTS, default="v1.5",
                   help="bottleneck ResNets: v1.5 (torchvision, default) or v1 (the paper)")
    p.add_argument("--mode", choices=("infer", "train"), default="infer")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--batch-size", type=int, help="default: 8 on CPU, 256 on CUDA")
    p.add_argument("--input-size", type=int, help="default: 224 (ImageNet nets), 32 (CIFAR nets)")
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                   help="default: on (CUDA; CPU too: measured faster there)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--providers", help=f"comma-separated, from {','.join(PROVIDERS)}; {PEERS_KEYWORD}: fastres, "
                                       "eager and every CPU peer (default: fastres,eager,compile,compile-max-autotune "
                                       "on CUDA, fastres,eager on CPU)")
    p.add_argument("--cuda-graphs", action="store_true", help="capture each provider into CUDA graphs (CUDA only)")
    p.add_argument("--compile-timeout", type=float, default=0.0, metavar="SECONDS",
                   help="drop a compile provider whose first batch (compilation) takes longer (default 0: no limit)")
    p.add_argument("--iters", type=int, help="timed batches per provider (default: 10 CPU, 50 CUDA); the paired "
                   "ratios' 95%% confidence interval narrows with them: about +-1.5%% with 60 on a 2-core CPU VM, "
                   "too wide to tell 0.96x from 1.0x with 10 (raise --time-budget with them)")
    p.add_argument("--warmup", type=int, help="untimed rounds after the first and memory batches "
                                              "(default: 1 CPU, 5 CUDA)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help=f"stop the timed batches once they took this long (after at least {MIN_TIMED_ROUNDS}); "
                        "0: no limit (default: 60 CPU, 0 CUDA)")
    p.add_argument("--settle", type=float, metavar="SECONDS",
                   help="idle before each batch of the interleaved rounds, so that no provider is timed while "
                        "another's threads still spin (default: 0.1 CPU, 0 CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--memory-mode", choices=fnn.MEMORY_MODES,
                   help="how fastres's blocks train (fastres.nn.set_memory_mode; default: the library's)")
    C.add_output_args(p)
    args = p.parse_args(argv)
    arch = C.parse_arch_arg(p, args.arch, args.variant)
    device = C.parse_device(p, args.device, tuple(DEFAULTS))
    if args.channels_last is not None:
        channels_last, why = args.channels_last, "flag"
    elif device.type == "cuda":
        channels_last, why = True, "cuda default"
    else:
        channels_last, why = CPU_CHANNELS_LAST, CPU_CHANNELS_LAST_NOTE
    if args.providers is None:
        providers = DEFAULT_PROVIDERS[device.type]
    else:
        providers = ()
        for n in (n.strip() for n in args.providers.split(",") if n.strip()):
            if n == PEERS_KEYWORD:  # eager-nchw only where eager is not NCHW already
                providers += tuple(q for q in ("fastres", "eager") + CPU_PEERS
                                   if q not in providers and (q != "eager-nchw" or channels_last))
            else:
                providers += (n,)
    unknown = [n for n in providers if n not in PROVIDERS]
    if unknown or not providers or len(set(providers)) != len(providers):
        p.error(f"--providers must be distinct names from {','.join(PROVIDERS)} (or {PEERS_KEYWORD}: fastres, "
                f"eager and every CPU peer), got {args.providers!r}")
    peers = [n for n in providers if n in CPU_PEERS]
    if peers and (device.type != "cpu" or args.mode != "infer"):
        p.error(f"--providers {','.join(peers)}: CPU inference peers, for --device cpu --mode infer")
    if [n for n in providers if n in FP32_ONLY] and args.dtype not in (None, "fp32"):
        p.error(f"--providers {','.join(n for n in providers if n in FP32_ONLY)} need --dtype fp32 "
                "(their bf16 is a precision hint or autocast over fp32 weights)")
    if "eager-nchw" in providers and not channels_last:
        p.error("--providers eager-nchw: eager already runs NCHW with --no-channels-last")
    if args.memory_mode is not None and args.mode != "train":
        p.error("--memory-mode applies to --mode train")
    if args.cuda_graphs and device.type != "cuda":
        p.error("--cuda-graphs needs a CUDA device")
    d = DEFAULTS[device.type]
    batch_size = args.batch_size or d["batch_size"]
    iters = d["iters"] if args.iters is None else args.iters
    warmup = d["warmup"] if args.warmup is None else args.warmup
    input_size = args.input_size or arch.input_size
    if batch_size < 1 or (args.mode == "train" and batch_size < 2):
        p.error(f"--batch-size must be >= 1 (>= 2 in train mode: BatchNorm needs 2 values per channel), "
                f"got {batch_size}")
    time_budget = d["time_budget"] if args.time_budget is None else args.time_budget
    if iters < 1 or warmup < 0:
        p.error(f"--iters must be >= 1 and --warmup >= 0, got {iters} and {warmup}")
    if time_budget < 0 or args.compile_timeout < 0:
        p.error(f"--time-budget and --compile-timeout must be >= 0, got {time_budget} and {args.compile_timeout}")
    settle = d["settle"] if args.settle is None else args.settle
    if not 0 <= settle <= 10:
        p.error(f"--settle must be between 0 and 10 seconds, got {settle}")
    if input_size < 8:
        p.error(f"--input-size must be >= 8, got {input_size}")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    return args, Settings(arch, args.mode, dtype, device, batch_size, input_size, channels_last, why,
                          iters, warmup, time_budget, providers, args.cuda_graphs, args.compile_timeout, args.seed,
                          args.progress, args.memory_mode, settle)


def main(argv=None):
    args, s = parse_args(argv)
    interrupts = C.Interrupts().install()
    if s.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every provider's convs pick their fastest cuDNN algorithm
    env = C.environment(s.device)
    env["versions"].update(_peers.versions(s.providers))
    inputs = make_inputs(s)
    skipped = {}
    providers, reference = build_providers(s, inputs, skipped)
    counted = count_macs(providers, s)
    agreement = check_agreement(providers, inputs[0][0], s.device)
    providers = first_calls(providers, inputs, s, interrupts, skipped)
    if not providers:
        print("no provider finished its first batch: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()),
              file=sys.stderr)
        return 1
    float64_checks = None
    if any(p.name in CPU_PEERS or (p.name in ZOOS and s.mode == "infer" and s.device.type == "cpu")
           for p in providers):
        float64_checks = check_against_float64(providers, inputs, s, reference)
    memory_and_graphs(providers, inputs, s)
    timed_rounds = run_interleaved(providers, inputs, s, interrupts)
    for p in providers:  # timings of overflowed arithmetic would be fiction: say so if it happened
        if not all(bool(torch.isfinite(t).all()) for t in p.model.parameters()):
            p.notes.append("non-finite weights after the timed steps")
    ceiling = C.measure_matmul_ceiling(s.device, s.dtype)
    macs = counted.get("fastres", counted.get("eager"))
    results = {p.name: summarize(p, s, macs, ceiling) for p in providers}
    add_ratios(results)
    wall_s = time.perf_counter() - _PROCESS_START
    report(s, env, results, counted, ceiling, agreement, float64_checks, skipped, timed_rounds, wall_s,
           interrupts.stop)
    malloc, threads = C.fastres_malloc_state(), C.fastres_threads_state()
    for what, state in (("malloc", malloc), ("threads", threads)):
        if state is not None:
            print(f"{what}: {state} (process-wide: every torch provider here ran with it)")
    run = {"benchmark": "throughput", **env, "settings": s.to_dict(), "malloc": malloc, "threads": threads,
           "macs_per_image": {"paper": s.arch.paper_macs, "counted": counted,
                              "counted_work": "forward + backward" if s.mode == "train" else "forward"},
           "ceiling": ceiling, "memory_measure": C.memory_label(s.device), "agreement": agreement,
           "agreement_float64": float64_checks,
           "results": results, "timed_batches": timed_rounds, "skipped": skipped,
           "stopped_early": interrupts.stop, "wall_s": wall_s}
    for path in C.write_results(args, "throughput", run, csv_rows(env, s, results, ceiling, timed_rounds),
                                CSV_FIELDS):
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
