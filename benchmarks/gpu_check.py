"""Is every fastres kernel right on this GPU? One pass over ResNet-50's real problem sizes, before anything is timed.

    python benchmarks/gpu_check.py --json OUT/gpu_check.jsonl          # on a GPU: batch 256, 224x224
    python benchmarks/gpu_check.py --device cpu                        # the same code at tiny sizes (CI)

Every conv of ResNet-50 v1.5 (the stem, each stage's 1x1 / 3x3 / strided convs and projections; distinct shapes
once) and every BatchNorm shape, in each dtype (bf16, fp16, fp32 in full precision, and fp32 with TF32 as torch
runs it by default) and layout (NHWC, NCHW), through the public ops with a forced backend:
  triton  conv_bias_act (bias + residual + ReLU epilogue), conv_bn_act in eval (BN scale/shift + raw store) and in
          training (BN statistics epilogue, finalize, apply), bn_relu_conv (the BN-apply + ReLU prologue): each
          forward and every gradient, so the input-gradient (dgrad) and weight-gradient (wgrad, with and without the
          prologue) kernels run too. The Triton kernels are forced for every layout (no per-layer choice, no
          autotuning: FASTRES_AUTOTUNE=0): this checks the kernels, not the choice.
  cuda    fastres._C's BN kernels: statistics + apply (conv_bn_act in training and eval) and their backward, and the
          dual apply of a projection block (dual_bn_act) and its backward, at every BN shape.
Then one ResNet-50 training step and one inference batch, fastres against torchvision with the same weights, with
automatic backend selection (what users run).

Each result is held to the project's tolerance rule (fastres.testing): error against a float64 reference at most
twice ATen's error in the same dtype and layout (ATen: the "torch" reference backend, plain ATen ops, in that
dtype); NaN fails. Inputs are drawn exactly representable in bf16, fp16 and fp32, so one float64 reference serves
every dtype. For TF32 the baseline is ATen on operands rounded to TF32 (what cuDNN's TF32 convs compute), since
which algorithm cuDNN picks for a shape is not known. Whole-model gradients: the whole gradient vector within
twice the worse of ATen's two layouts, each parameter within a gross bound (fastres.testing explains why).

Every check writes one JSON line as soon as it is done (--json), with the backend and the kernel (Triton or ATen)
that each op actually ran, forward and backward. A time budget stops the sweep cleanly (the most used
configurations come first: bf16 NHWC). Exit code 1 if any check failed.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time

os.environ.setdefault("FASTRES_AUTOTUNE", "0")  # check the kernels, do not tune them (set before fastres loads)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors run the Triton kernels in the interpreter

import fastres  # noqa: E402
from fastres import ops, testing  # noqa: E402
from fastres.ops import _backend  # noqa: E402

import _common  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
LAYOUTS = {"nhwc": torch.channels_last, "nchw": torch.contiguous_format}
TRITON_OPS = ("conv_bias_act", "conv_bn_eval", "conv_bn_train", "bn_relu_conv")
CUDA_OPS = ("conv_bn_train", "conv_bn_eval", "dual_bn_act")


# ---------------------------------------------------------------------------------------------- the problems
def resnet50_problems(image_size, width_divisor=1):
    """(convs, bn_shapes): the distinct conv problems of torchvision's ResNet-50 at this input size, as
    (name, c_in, c_out, kernel, stride, padding, h_in), and the distinct BatchNorm shapes (c, h) of its training
    step, every channel count divided by width_divisor (the stem keeps its 3 input channels)."""
    import torchvision
    model = torchvision.models.resnet50().to("meta").eval()
    convs, bn_shapes, seen = [], [], set()

    def scaled(c):
        return c if c == 3 else max(1, c // width_divisor)

    def on_conv(name):
        def hook(module, inputs, output):
            key = (scaled(module.in_channels), scaled(module.out_channels), module.kernel_size[0], module.stride[0],
                   module.padding[0], inputs[0].shape[-1])
            if key not in seen:
                seen.add(key)
                convs.append((name,) + key)
            shape = (scaled(module.out_channels), output.shape[-1])
            if shape not in bn_shapes:
                bn_shapes.append(shape)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(on_conv(name))
    with torch.no_grad():
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
    return convs, bn_shapes


def representable(shape, scale=1.0, device="cpu", generator=None, positive=False):
    """Random float64 values that bf16, fp16 and fp32 all hold exactly (bf16's 8 significant bits, nothing below
    fp16's normal range): one float64 reference then serves every dtype."""
    t = torch.randn(shape, generator=generator, dtype=torch.float64).mul_(scale)
    if positive:
        t = t.abs_().add_(0.5 * scale)
    t = t.to(torch.bfloat16).double()
    t = torch.where(t.abs() < 2.0 ** -14, torch.zeros_like(t), t).clamp_(-60000, 60000)
    return t.to(device)


def round_to_tf32(t):
    """fp32 operands rounded to TF32 (nearest, ties away), as cuDNN's TF32 convolutions take them."""
    bits = t.float().contiguous().view(torch.int32)
    rounded = ((bits + 0x1000) & -0x2000).view(torch.float32)
    return torch.where(t.isnan(), t.float(), rounded).reshape(t.shape)


# ---------------------------------------------------------------------------------------------- which kernel ran
class Recorder:
    """Records the backend every op selects and the kernel (Triton config or ATen) every conv problem runs."""

    def __init__(self):
        self.backends, self.kernels = {}, {}
        self._select = _backend.select

    def __enter__(self):
        def select(op, device):
            module = self._select(op, device)
            self.backends.setdefault(op, set()).add(module.__name__.rpartition(".")[2].replace("backend_", ""))
            return module
        _backend.select = select
        self._restore = []
        try:
            from fastres.kernels import autotune
            choose = autotune.choose

            def recording_choose(key, *args, **kwargs):
                choice = choose(key, *args, **kwargs)
                self.kernels.setdefault(key.partition("|")[0], set()).add(choice.label())
                return choice
            autotune.choose = recording_choose
            self._restore.append((autotune, "choose", choose))
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        _backend.select = self._select
        for module, name, value in self._restore:
            setattr(module, name, value)
        return False

    def summary(self):
        return ({op: sorted(v) for op, v in sorted(self.backends.items())},
                {kind: sorted(v) for kind, v in sorted(self.kernels.items())})

    def clear(self):
        self.backends, self.kernels = {}, {}


@contextlib.contextmanager
def triton_kernels_everywhere():
    """The triton backend with its own kernels for every problem, at their default configs: neither the per-layer
    default (NCHW and full fp32 go to ATen on a GPU) nor a cached or measured choice decides."""
    from fastres.kernels import autotune
    from fastres.ops import backend_triton
    default_provider, choose = backend_triton._default_provider, autotune.choose
    backend_triton._default_provider = lambda x, masked_tiles=False: "triton"
    autotune.choose = lambda key, device, default, *args, **kwargs: default
    try:
        yield
    finally:
        backend_triton._default_provider, autotune.choose = default_provider, choose


@contextlib.contextmanager
def tf32(enabled):
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


# ---------------------------------------------------------------------------------------------- one op, three ways
def _leaves(values, dtype, fmt, device):
    """The op's inputs in `dtype` (activations in layout `fmt`, BN state in fp32 as modules keep it)."""
    out = {}
    for name, (t, kind) in values.items():
        if t is None:
            out[name] = None
            continue
        if kind == "act":
            v = t.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
        elif kind == "weight":
            v = t.to(device=device, dtype=dtype)
        else:  # BN parameters and statistics
            v = t.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        if kind in ("act", "weight", "param"):
            v = v.detach().requires_grad_()
        out[name] = v
    return out


def run_op(op, values, grad_out, dtype, fmt, device, stride, padding, relu):
    """(forward outputs, gradients of every differentiable input) of `op` on inputs `values`, under the active
    backend, in `dtype` and layout `fmt`."""
    t = _leaves(values, dtype, fmt, device)
    if op == "conv_bias_act":
        out = ops.conv_bias_act(t["x"], t["w"], t["b"], stride, padding, t["r"], relu=relu)
        outputs = [out]
    elif op in ("conv_bn_eval", "conv_bn_train"):
        training = op == "conv_bn_train"
        out = ops.conv_bn_act(t["x"], t["w"], t["g"], t["beta"], t["rm"], t["rv"], training, 0.1, 1e-5, stride,
                              padding, t["r"], relu=relu)
        outputs = [out] + ([t["rm"], t["rv"]] if training else [])
    elif op == "bn_relu_conv":
        out = ops.bn_relu_conv(t["x"], t["s"], t["t"], t["w"], stride, padding, relu=relu)
        outputs = [out]
    elif op == "dual_bn_act":
        out = ops.dual_bn_act(t["y"], t["g"], t["beta"], t["rm"], t["rv"], t["r"], t["rg"], t["rbeta"], t["rrm"],
                              t["rrv"], True, relu=relu)
        outputs = [out, t["rm"], t["rv"], t["rrm"], t["rrv"]]
    else:
        raise ValueError(op)
    leaves = [v for v in t.values() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(out, leaves, grad_out.to(device=device, dtype=out.dtype), allow_unused=True)
    names = [k for k, v in t.items() if v is not None and v.requires_grad]
    return outputs, dict(zip(names, grads))


def conv_values(c_in, c_out, k, h, stride, padding, batch, gen, op):
    """Inputs of one conv problem for `op` (float64, representable), and the output's shape."""
    h_out = (h + 2 * padding - k) // stride + 1
    x = representable((batch, c_in, h, h), generator=gen)
    w = representable((c_out, c_in, k, k), scale=1 / math.sqrt(c_in * k * k), generator=gen)
    values = {"x": (x, "act"), "w": (w, "weight")}
    out_shape = (batch, c_out, h_out, h_out)
    if op == "conv_bias_act":
        values.update(b=(representable((c_out,), generator=gen), "weight"), r=(representable(out_shape, generator=gen),
                                                                                "act"))
    elif op.startswith("conv_bn"):
        values.update(g=(representable((c_out,), generator=gen, positive=True), "param"),
                      beta=(representable((c_out,), generator=gen), "param"),
                      rm=(representable((c_out,), scale=0.1, generator=gen), "state"),
                      rv=(representable((c_out,), generator=gen, positive=True), "state"),
                      r=(representable(out_shape, generator=gen), "act"))
    elif op == "bn_relu_conv":
        values.update(s=(representable((c_in,), generator=gen, positive=True), "param"),
                      t=(representable((c_in,), generator=gen), "param"))
    return values, out_shape


def dual_values(c, h, batch, gen):
    shape = (batch, c, h, h)
    values = {"y": (representable(shape, generator=gen), "act"), "r": (representable(shape, generator=gen), "act")}
    for prefix in ("", "r"):
        values.update({prefix + "g": (representable((c,), generator=gen, positive=True), "param"),
                       prefix + "beta": (representable((c,), generator=gen), "param"),
                       prefix + "rm": (representable((c,), scale=0.1, generator=gen), "state"),
                       prefix + "rv": (representable((c,), generator=gen, positive=True), "state")})
    return values, shape


def compare(outputs, grads, ref, aten, dtype):
    """Every output and gradient against the float64 reference under the tolerance rule -> (failures, errors)."""
    failures, errors = [], {}
    pairs = [(f"out{i}", o, r, a) for i, (o, r, a) in enumerate(zip(outputs, ref[0], aten[0]))]
    pairs += [(f"grad_{k}", g, ref[1][k], aten[1][k]) for k, g in grads.items() if g is not None]
    for name, got, r, a in pairs:
        aten_error, err = testing.max_error(a, r), testing.max_error(got, r)
        errors[name] = [err, aten_error]
        if not math.isfinite(err):
            failures.append(f"{name}: NaN or Inf where the reference is finite")
        elif not err <= testing.bound(aten_error, got.dtype, r):
            failures.append(f"{name}: max error {err:.3e} > 2 x ATen's {aten_error:.3e} + floor")
    return failures, errors


# ---------------------------------------------------------------------------------------------- the sweep
class Sweep:
    def __init__(self, args, device):
        self.args, self.device = args, device
        self.failed = self.done = 0
        self.deadline = time.monotonic() + args.time_budget
        self.out_of_time = False
        self.references = {}

    def emit(self, row):
        row.update(device=_common.device_name(self.device), commit=_common.git_commit())
        if self.args.json:
            _common.append_json(self.args.json, row)
        status = "ok" if row["ok"] else "FAIL"
        print(f"{status:4} {row['check']:<60} {'; '.join(row.get('failures', []))[:160]}", flush=True)
        self.done += 1
        self.failed += not row["ok"]

    def time_left(self):
        if time.monotonic() > self.deadline:
            self.out_of_time = True
        return not self.out_of_time

    def reference(self, key, op, values, grad_out, stride, padding, relu):
        """The float64 reference (the torch backend), computed once per problem and reused across dtypes and
        layouts (the inputs are exactly representable in each)."""
        key = (key, relu)
        if key not in self.references:
            with fastres.backend("torch"):
                self.references = {key: run_op(op, values, grad_out, torch.float64, torch.contiguous_format,
                                               self.device, stride, padding, relu)}
        return self.references[key]

    def check(self, label, backend, op, values, grad_out, dtype_name, layout, stride=1, padding=0, key=None):
        dtype, fmt = DTYPES[dtype_name], LAYOUTS[layout]
        # In bf16/fp16 a ReLU's gradient is ill-posed against float64 (a pre-activation within rounding of zero
        # flips the mask, moving a gradient by a whole upstream value, in any implementation): the 16-bit checks
        # run without the ReLU, so every output and gradient is held to the rule; fp32 runs with it.
        relu = dtype_name in ("fp32", "tf32")
        label = f"{label}{'' if relu else ' (no relu)'}"
        ref = self.reference(key or label, op, values, grad_out, stride, padding, relu)
        with tf32(dtype_name == "tf32"):
            recorder = Recorder()
            try:
                with recorder, fastres.backend(backend):
                    outputs, grads = run_op(op, values, grad_out, dtype, fmt, self.device, stride, padding, relu)
            except Exception as e:  # noqa: BLE001  (reported as a failed check; the sweep goes on)
                self.emit({"check": f"{label} {dtype_name} {layout}", "ok": False, "backend": backend,
                           "failures": [f"raised {type(e).__name__}: {str(e)[:300]}"]})
                if _is_cuda_fault(e):
                    raise  # the CUDA context is unusable: nothing after this would mean anything
                return
        baseline_values = values
        if dtype_name == "tf32":  # ATen on TF32-rounded operands: what an exact-rounding TF32 conv computes
            baseline_values = {k: ((round_to_tf32(t).double(), kind) if t is not None and kind in ("act", "weight")
                                   else (t, kind)) for k, (t, kind) in values.items()}
        with tf32(False), fastres.backend("torch"):
            aten = run_op(op, baseline_values, grad_out, dtype, fmt, self.device, stride, padding, relu)
        failures, errors = compare(outputs, grads, ref, aten, dtype)
        layout_ok = all(o.is_contiguous(memory_format=fmt) for o in outputs[:1])
        if not layout_ok:
            failures.append(f"output not in the input's layout ({layout})")
        backends, kernels = recorder.summary()
        self.emit({"check": f"{label} {dtype_name} {layout}", "ok": not failures, "backend": backend, "op": op,
                   "dtype": dtype_name, "layout": layout, "failures": failures, "errors": errors,
                   "backends_run": backends, "kernels_run": kernels})


def _is_cuda_fault(error):
    from fastres.kernels import autotune
    return autotune.is_cuda_fault(error)


def check_kernels(sweep, convs, bn_shapes, args, gen):
    """First every problem in the first dtype and layout (bf16 NHWC by default: what users run), then the rest of
    the matrix problem by problem (each problem's float64 reference computed once for all of them)."""
    combos = [(d, layout) for d in args.dtypes for layout in args.layouts]
    for combos_now in (combos[:1], combos[1:]):
        for name, c_in, c_out, k, stride, padding, h in convs:
            for op in TRITON_OPS:
                values, out_shape = conv_values(c_in, c_out, k, h, stride, padding, args.batch_size, gen, op)
                grad_out = representable(out_shape, generator=gen)
                label = f"{op} {name} {c_in}->{c_out} k{k}s{stride} @{h}"
                for dtype_name, layout in combos_now:
                    if not sweep.time_left():
                        return
                    with triton_kernels_everywhere():
                        sweep.check(f"triton {label}", "triton", op, values, grad_out, dtype_name, layout, stride,
                                    padding, key=label)
                    if op in CUDA_OPS and _backend._why_not("cuda", "conv_bn_act_forward",
                                                            sweep.device.type) is None:
                        sweep.check(f"cuda {label}", "cuda", op, values, grad_out, dtype_name, layout, stride,
                                    padding, key=label)
        if _backend._why_not("cuda", "dual_bn_act_forward", sweep.device.type) is not None:
            continue
        for c, h in bn_shapes:
            values, shape = dual_values(c, h, args.batch_size, gen)
            grad_out = representable(shape, generator=gen)
            for dtype_name, layout in combos_now:
                if not sweep.time_left():
                    return
                sweep.check(f"cuda dual_bn_act {c}x{h}x{h}", "cuda", "dual_bn_act", values, grad_out, dtype_name,
                            layout)


def check_models(sweep, args, gen):
    """One ResNet-50 training step and one inference batch, fastres (automatic backends) against torchvision with
    the same weights and inputs, in each requested dtype, channels_last."""
    import torchvision
    tv = torchvision.models.resnet50(num_classes=args.num_classes)
    size = args.model_image_size
    _common.calibrate_bn_(tv, (2, 3, size, size))
    state = tv.state_dict()
    x64 = representable((args.model_batch_size, 3, size, size), generator=gen)
    labels = torch.randint(0, args.num_classes, (args.model_batch_size,), generator=gen)

    def run(model, dtype, fmt, training):
        model = model.to(device=sweep.device, dtype=dtype).train(training)
        model = model.to(memory_format=fmt)
        x = x64.to(sweep.device, dtype).contiguous(memory_format=fmt)
        if not training:
            with torch.no_grad():
                return [model(x)], {}
        loss = F.cross_entropy(model(x).double(), labels.to(sweep.device))
        names = [n for n, p in model.named_parameters()]
        grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()])
        return [loss], dict(zip(names, grads))

    def fresh(kind):
        model = (fastres.models.resnet50(num_classes=args.num_classes) if kind == "fastres"
                 else torchvision.models.resnet50(num_classes=args.num_classes))
        model.load_state_dict(state)
        return model

    for training in (False, True):
        mode = "train step" if training else "inference"
        ref = run(fresh("torchvision"), torch.float64, torch.contiguous_format, training)
        for dtype_name in args.model_dtypes:
            if not sweep.time_left():
                return
            dtype = DTYPES[dtype_name]
            with tf32(dtype_name == "tf32"):
                recorder = Recorder()
                with recorder:
                    got = run(fresh("fastres"), dtype, torch.channels_last, training)
                atens = [run(fresh("torchvision"), dtype, fmt, training) for fmt in LAYOUTS.values()]
            failures, errors = [], {}
            for i, out in enumerate(got[0]):
                aten_error = max(testing.max_error(a[0][i], ref[0][i]) for a in atens)
                err = testing.max_error(out, ref[0][i])
                errors[f"out{i}"] = [err, aten_error]
                if not err <= testing.bound(aten_error, out.dtype, ref[0][i]):
                    failures.append(f"output {i}: max error {err:.3e} > 2 x ATen's worse layout {aten_error:.3e}")
            if training:  # the whole-model form of the rule (fastres.testing.model_grads_violations)
                failures += testing.model_grads_violations(got[1], ref[1], [a[1] for a in atens])
            backends, kernels = recorder.summary()
            sweep.emit({"check": f"model resnet50 {mode} {dtype_name} nhwc", "ok": not failures, "op": mode,
                        "dtype": dtype_name, "layout": "nhwc", "failures": failures, "errors": errors,
                        "backends_run": backends, "kernels_run": kernels})


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="cuda (default when available) or cpu (the Triton interpreter)")
    parser.add_argument("--batch-size", type=int, help="kernel checks' batch (default: 256 on a GPU, 2 on CPU)")
    parser.add_argument("--image-size", type=int, help="default: 224 on a GPU, 32 on CPU")
    parser.add_argument("--width-divisor", type=int, help="divide every channel count (default: 1 on a GPU, 16 on CPU)")
    parser.add_argument("--model-batch-size", type=int, help="the model checks' batch (default: 32 on a GPU, 4 on CPU)")
    parser.add_argument("--model-image-size", type=int,
                        help="the model checks' input size (default: --image-size on a GPU, 64 on CPU: at 32x32 and "
                             "batch 2 layer4's BNs see 2 values per channel, too ill-conditioned to compare)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--dtypes", help="comma-separated, of bf16,fp16,fp32,tf32 (default: all four on a GPU; fp32,fp16 "
                        "on CPU, where the Triton interpreter truncates fp32 -> bf16 instead of rounding)")
    parser.add_argument("--model-dtypes", help="the model checks' dtypes (default: --dtypes)")
    parser.add_argument("--layouts", default="nhwc,nchw", help="comma-separated, of nhwc,nchw")
    parser.add_argument("--layers", help="comma-separated layer names to check (default: every distinct conv)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: kernels, models")
    parser.add_argument("--time-budget", type=float, default=170.0, help="seconds; the sweep stops cleanly after it")
    parser.add_argument("--json", metavar="PATH", help="append one JSON line per check")
    args = parser.parse_args(argv)
    device = _common.parse_device(parser, args.device)
    gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (256 if gpu else 2)
    args.image_size = args.image_size or (224 if gpu else 32)
    args.width_divisor = args.width_divisor or (1 if gpu else 16)
    args.model_batch_size = args.model_batch_size or (32 if gpu else 4)
    args.model_image_size = args.model_image_size or (args.image_size if gpu else 64)
    if args.dtypes is None:
        args.dtypes = "bf16,fp16,fp32,tf32" if gpu else "fp32,fp16"
    if args.model_dtypes is None:
        args.model_dtypes = args.dtypes
    for name, value, allowed in (("--dtypes", args.dtypes, DTYPES), ("--model-dtypes", args.model_dtypes, DTYPES),
                                 ("--layouts", args.layouts, LAYOUTS), ("--skip", args.skip, ("kernels", "models"))):
        items = [v for v in value.split(",") if v]
        bad = [v for v in items if v not in allowed]
        if bad:
            parser.error(f"{name}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
        setattr(args, name[2:].replace("-", "_"), items)
    if device.type == "cpu":  # TF32 needs a GPU's tensor cores
        args.dtypes = [d for d in args.dtypes if d != "tf32"]
        args.model_dtypes = [d for d in args.model_dtypes if d != "tf32"]
    for name in ("batch_size", "image_size", "width_divisor", "model_batch_size", "model_image_size", "num_classes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args, device


def main(argv=None):
    args, device = parse_args(argv)
    start = time.monotonic()
    torch.manual_seed(0)  # the models' initial weights: the same run every time
    gen = torch.Generator().manual_seed(0)
    convs, bn_shapes = resnet50_problems(args.image_size, args.width_divisor)
    if args.layers:
        wanted = args.layers.split(",")
        unknown = [w for w in wanted if w not in {c[0] for c in convs}]
        if unknown:
            raise SystemExit(f"--layers: unknown {', '.join(unknown)} (distinct convs: "
                             f"{', '.join(c[0] for c in convs)})")
        convs = [c for c in convs if c[0] in wanted]
        bn_shapes = sorted({(c[2], (c[6] + 2 * c[5] - c[3]) // c[4] + 1) for c in convs})
    print(f"gpu_check on {_common.device_name(device)}: {len(convs)} convs, {len(bn_shapes)} BN shapes, batch "
          f"{args.batch_size}, {args.image_size}x{args.image_size}, dtypes {','.join(args.dtypes)}, layouts "
          f"{','.join(args.layouts)}, FASTRES_AUTOTUNE={os.environ.get('FASTRES_AUTOTUNE')}", flush=True)
    sweep = Sweep(args, device)
    # the configuration users run first: every part in bf16 NHWC, then the rest of the matrix
    if "models" not in args.skip:
        check_models(sweep, args, gen)
    if "kernels" not in args.skip:
        check_kernels(sweep, convs, bn_shapes, args, gen)
    note = " (time budget reached: the rest was not checked)" if sweep.out_of_time else ""
    print(f"gpu_check: {sweep.done - sweep.failed} passed, {sweep.failed} failed in "
          f"{time.monotonic() - start:.0f} s{note}", flush=True)
    return 1 if sweep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
