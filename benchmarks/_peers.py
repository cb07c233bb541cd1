"""The CPU inference engines a user would run instead of PyTorch, for benchmarks/throughput.py: onnxruntime and
OpenVINO, each built from the reference (torchvision) model with the run's weights, never from fastres's (its ops
do not export). Optional: `pip install -e ".[peers]"`; a provider whose package is missing is skipped with a note.

Each engine takes the batch as a numpy array: Tensor.numpy() of the contiguous NCHW batch, which shares the tensor's
memory (no copy), inside the timed call; its output comes back as a torch tensor (torch.from_numpy, no copy; OpenVINO
copies its 8x1000 logits out of the request first)."""
import copy
import importlib
import os
import sys
import tempfile
import warnings

import torch

INSTALL_HINT = 'pip install -e ".[peers]"'
# provider -> the package it needs
ENGINE_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "openvino-bf16": "openvino"}
ENGINES = tuple(ENGINE_PACKAGES)
# the model zoos (not engines: PyTorch models the run times like eager)
MODEL_PACKAGES = {"timm": "timm", "fastres-timm": "timm", "timm-features": "timm", "fastres-timm-features": "timm",
                  "transformers": "transformers",
                  "fastres-transformers": "transformers", "transformers-hidden": "transformers",
                  "fastres-transformers-hidden": "transformers"}
PACKAGES = {**ENGINE_PACKAGES, **MODEL_PACKAGES}
# where a version is reported from, for each package a run used
VERSION_PACKAGES = {"onnxruntime": ("onnxruntime", "onnx", "onnxscript"), "openvino": ("openvino",), "timm": ("timm",),
                    "transformers": ("transformers",)}


def _import(package):
    """The module, or None when it is not installed (or its import fails: that is not installed either)."""
    try:
        return importlib.import_module(package)
    except ImportError:
        return None


def unavailable(provider):
    """Why `provider` cannot run on this machine (its package is not installed; OpenVINO bf16 on a CPU without
    bf16 support; a torch without oneDNN Graph fusion for torchscript-onednn), or None."""
    if provider == "torchscript-onednn" and not (hasattr(torch.jit, "enable_onednn_fusion")
                                                and torch.backends.mkldnn.is_available()):
        return "this torch build has no oneDNN Graph fusion for TorchScript (torch.jit.enable_onednn_fusion)"
    package = PACKAGES.get(provider)
    if package is None:
        return None
    if _import(package) is None:
        return f"{package} is not installed ({INSTALL_HINT})"
    if provider == "openvino-bf16":
        import openvino
        capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if "BF16" not in capabilities:
            return f"this CPU has no bf16 support (OpenVINO's CPU capabilities: {', '.join(capabilities)})"
    return None


def versions(providers):
    """{package: version} of the engines' packages that `providers` use (None: not importable)."""
    out = {}
    for provider in providers:
        for package in VERSION_PACKAGES.get(PACKAGES.get(provider), ()):
            module = _import(package)
            out[package] = None if module is None else getattr(module, "__version__", "?")
    return out


def _short(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def _is_time_limit(e):
    """A benchmark's time limit (its TimeLimit, maybe wrapped in an exporter's error): never to be retried."""
    return type(e).__name__ == "TimeLimit" or "TimeLimit" in str(e)


def export_onnx(model, x, path):
    """model (fp32, eval) to ONNX at `path`: torch.onnx.export(dynamo=True), else dynamo=False with a printed note.
    Returns how it was exported."""
    kwargs = {"input_names": ["input"], "output_names": ["logits"]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), path, dynamo=True, verbose=False, **kwargs)
        return "torch.onnx.export(dynamo=True)"
    except Exception as e:
        if _is_time_limit(e):
            raise
        why = _short(e)
    print(f"onnxruntime: the dynamo exporter failed ({why}); exporting with dynamo=False", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, **kwargs)
    return f"torch.onnx.export(dynamo=False) (dynamo=True failed: {why})"


def onnxruntime_engine(model, x, threads):
    """(run, notes): run(x) -> logits, an onnxruntime CPU session of `model` exported for x's shape, with every
    graph optimization (BN folded into the convolutions) and `threads` intra-op threads."""
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        how = export_onnx(model, x, path)
        session = _onnxruntime_session(path, threads)
    name = session.get_inputs()[0].name

    def run(x):
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    return run, [f"{how}; onnxruntime {ort.__version__} CPUExecutionProvider, graph optimizations ALL, "
                 f"{threads} intra-op threads; input Tensor.numpy() (no copy) inside the timed call"]


def _onnxruntime_session(path, threads, quiet=False):
    """An onnxruntime CPU session of the ONNX file at `path` (its weights loaded now): every graph optimization (BN
    folded into the convolutions), `threads` intra-op threads; `quiet`: errors only in its log."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if quiet:
        options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _openvino_config(precision, threads):
    """OpenVINO's CPU compile settings for one request that uses every thread, and their text for a run's notes."""
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    return config, ", ".join(f"{k} {v}" for k, v in config.items())


def openvino_engine(model, x, threads, precision, converted):
    """(run, notes): run(x) -> logits, `model` converted by openvino.convert_model (once per run: `converted`
    caches it) and compiled for "CPU" with INFERENCE_PRECISION_HINT `precision` ("f32", "bf16"),
    INFERENCE_NUM_THREADS `threads`, PERFORMANCE_HINT LATENCY (one request uses every thread)."""
    import openvino as ov
    if "model" not in converted:
        with warnings.catch_warnings():  # convert_model traces with torch.jit, which warns it is deprecated
            warnings.simplefilter("ignore")
            converted["model"] = ov.convert_model(model, example_input=x)
    config, config_text = _openvino_config(precision, threads)
    compiled = ov.Core().compile_model(converted["model"], "CPU", config)
    request = compiled.create_infer_request()

    def run(x):
        return torch.from_numpy(request.infer({0: x.numpy()}, share_inputs=True)[0])
    return run, [f"openvino.convert_model(torchvision model); OpenVINO {ov.__version__} CPU, {config_text}; input "
                 f"Tensor.numpy() shared with the request (no copy) inside the timed call"]


def detector_engines(model, images, threads, names):
    """For benchmarks/detection.py: {name: (run, notes) or the exception building it raised} for each of `names`
    ("onnxruntime", "openvino"), run(images) -> [{key: tensor} per image] as the detector returns them, from one ONNX
    export of `model` (a torchvision detector, eval) for exactly these images' sizes.

    torch.onnx.export(dynamo=False): the dynamo exporter cannot follow a detector's data-dependent shapes (its
    proposals, NMS); torchvision's detectors are written for the TorchScript exporter (opset 17 here). Each image is
    an input of its own (the detector's list), each output named key{image}. OpenVINO reads the ONNX file (its own
    convert_model cannot trace a model that returns dicts)."""
    with torch.no_grad():
        reference = model(images)
    inputs = [f"image{i}" for i in range(len(images))]
    outputs = [(i, key) for i, detections in enumerate(reference) for key in detections]
    built = {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "detector.onnx")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (images,), path, dynamo=False, opset_version=17, input_names=inputs,
                                  output_names=[f"{key}{i}" for i, key in outputs])
        except Exception as e:  # noqa: BLE001 - no engine then, each says why
            if _is_time_limit(e):
                raise
            return {name: e for name in names}
        for name in names:
            try:
                build = _onnxruntime_detector if name == "onnxruntime" else _openvino_detector
                built[name] = build(path, inputs, outputs, threads)
            except Exception as e:  # noqa: BLE001 - this engine is dropped, the others run
                if _is_time_limit(e):
                    raise
                built[name] = e
    return built


def _detections(outputs, arrays, copy_out):
    """[{key: tensor} per image] from the engine's output arrays, in `outputs` order ((image, key) pairs)."""
    per_image = {}
    for (i, key), array in zip(outputs, arrays):
        per_image.setdefault(i, {})[key] = torch.from_numpy(array.copy() if copy_out else array)
    return [per_image[i] for i in sorted(per_image)]


def _onnxruntime_detector(path, inputs, outputs, threads):
    import onnxruntime as ort
    session = _onnxruntime_session(path, threads, quiet=True)  # (Mask R-CNN's masks: a shape warning per call)

    def run(images):
        return _detections(outputs, session.run(None, {n: x.numpy() for n, x in zip(inputs, images)}), False)
    return run, [f"torch.onnx.export(dynamo=False, opset 17) of the detector for these image sizes; onnxruntime "
                 f"{ort.__version__} CPUExecutionProvider, graph optimizations ALL, {threads} intra-op threads"]


def _openvino_detector(path, inputs, outputs, threads):
    import openvino as ov
    config, config_text = _openvino_config("f32", threads)
    try:
        converted = ov.convert_model(path)
    except Exception as e:  # its first line only says where in OpenVINO it failed: name the operations instead
        failed = [line.strip(" -") for line in str(e).splitlines() if "Conversion is failed for" in line]
        if not failed:
            raise
        raise RuntimeError(f"openvino.convert_model: {failed[-1]}") from e
    compiled = ov.Core().compile_model(converted, "CPU", config)
    request = compiled.create_infer_request()

    def run(images):  # (the compiled model's outputs in the ONNX file's order; the request reuses their memory)
        result = request.infer([x.numpy() for x in images], share_inputs=True)
        return _detections(outputs, [result[o] for o in compiled.outputs], True)
    return run, [f"openvino.convert_model of the same ONNX file; OpenVINO {ov.__version__} CPU, {config_text}"]


def timm_resnet(reference, arch, convert):
    """timm's ResNet of `arch` (resnet18 ... resnet152, v1.5: the same network as torchvision's, with the same
    state_dict keys) holding `reference`'s weights, in its mode; with `convert`, after fastres.convert. None where timm
    has no such model (the paper's v1, plain, VGG and CIFAR nets)."""
    import timm
    if arch.family != "resnet" or arch.variant != "v1.5":
        return None
    model = timm.create_model(arch.name, pretrained=False, num_classes=arch.num_classes)
    model.load_state_dict(reference.state_dict(), strict=True)
    model.train(reference.training)
    if convert:
        import fastres
        model = fastres.convert(model)
    return model


class FeaturesHead(torch.nn.Module):
    """A feature extractor (every tap computed and kept, as a detection or segmentation model's backbone runs) with
    the reference's classifier on its last feature map: the reference's logits, so that the run holds it to the
    tolerance rule like any provider. The extractor returns a dict or a list."""

    def __init__(self, features, avgpool, fc):
        super().__init__()
        self.features, self.avgpool, self.fc = features, avgpool, fc

    def forward(self, x):
        out = self.features(x)
        last = list(out.values())[-1] if isinstance(out, dict) else out[-1]
        return self.fc(torch.flatten(self.avgpool(last), 1))


def torchvision_body(reference, arch, convert):
    """torchvision's detection / segmentation backbone body (IntermediateLayerGetter, layer1 to layer4 returned, as
    Faster R-CNN's FPN takes them) over a copy of `reference`, then its classifier (FeaturesHead); with `convert`,
    after fastres.convert. None for an arch that is not a torchvision-style ResNet."""
    from torchvision.models._utils import IntermediateLayerGetter
    if arch.family != "resnet":
        return None
    model = copy.deepcopy(reference)
    body = IntermediateLayerGetter(model, return_layers={f"layer{k}": str(k - 1) for k in range(1, 5)})
    return _with_classifier(body, model, reference, convert)


def timm_features(reference, arch, convert):
    """timm's features_only model of `arch` (FeatureListNet, timm's default taps: the stem's ReLU and the four
    layers) holding `reference`'s weights, then the reference's classifier (FeaturesHead); with `convert`, after
    fastres.convert. None where timm has no such model."""
    import timm
    if arch.family != "resnet" or arch.variant != "v1.5":
        return None
    features = timm.create_model(arch.name, pretrained=False, features_only=True)
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    features.load_state_dict(state, strict=True)
    return _with_classifier(features, copy.deepcopy(reference), reference, convert)


def _with_classifier(features, model, reference, convert):
    """FeaturesHead(features, model's avgpool and fc) in reference's mode; with `convert`, after fastres.convert."""
    head = FeaturesHead(features, model.avgpool, model.fc).train(reference.training)
    if convert:
        import fastres
        head = fastres.convert(head)
    return head


def _import_off_this_folder(package, *modules):
    """`package`, its `modules` imported with this folder and the repository's root off sys.path: the scripts put
    this folder first (and a PYTHONPATH may hold the root), and kernels.py here or the root's kernels/ (fastres.kernels'
    source) would shadow Hugging Face's `kernels` package, which transformers imports with its models."""
    here = os.path.dirname(os.path.abspath(__file__))
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) not in (here, os.path.dirname(here))]
    try:
        for module in modules:
            importlib.import_module(module)
        return importlib.import_module(package)
    finally:
        sys.path[:] = saved


class Logits(torch.nn.Module):
    """A transformers image classifier's logits as the module's output (what the benchmark's step takes); with
    `hidden_states`, the classifier called with output_hidden_states=True (every stage's output computed and kept)."""

    def __init__(self, model, hidden_states=False):
        super().__init__()
        self.model = model
        self.hidden_states = hidden_states

    def forward(self, x):
        if self.hidden_states:
            return self.model(pixel_values=x, output_hidden_states=True).logits
        return self.model(pixel_values=x).logits


def _transformers_key(key):
    """transformers' ResNetForImageClassification state_dict key of a torchvision ResNet's `key`."""
    parts = key.split(".")
    if parts[0] in ("conv1", "bn1"):
        return f"resnet.embedder.embedder.{'convolution' if parts[0] == 'conv1' else 'normalization'}." + parts[1]
    if parts[0] == "fc":
        return "classifier.1." + parts[1]
    stage, block, module, rest = int(parts[0][len("layer"):]) - 1, parts[1], parts[2], parts[3:]
    prefix = f"resnet.encoder.stages.{stage}.layers.{block}"
    if module == "downsample":
        return f"{prefix}.shortcut.{'convolution' if rest[0] == '0' else 'normalization'}." + ".".join(rest[1:])
    index = int(module[len("conv"):] if module.startswith("conv") else module[len("bn"):]) - 1
    return f"{prefix}.layer.{index}.{'convolution' if module.startswith('conv') else 'normalization'}." + \
        ".".join(rest)


def transformers_resnet(reference, arch, convert, hidden_states=False):
    """transformers' ResNetForImageClassification of `arch` (resnet18 ... resnet152, v1.5: microsoft/resnet-*'s
    configuration, the same network as torchvision's) holding `reference`'s weights, in its mode, its logits the
    output (Logits, called with output_hidden_states=`hidden_states`); with `convert`, after fastres.convert. None
    where transformers has no such model (the paper's v1, plain, VGG and CIFAR nets)."""
    if arch.family != "resnet" or arch.variant != "v1.5":
        return None
    transformers = _import_off_this_folder("transformers", "transformers.models.resnet.modeling_resnet")
    depths = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}[arch.depth]
    basic = arch.depth < 50
    config = transformers.ResNetConfig(
        embedding_size=64, depths=depths, layer_type="basic" if basic else "bottleneck", hidden_act="relu",
        hidden_sizes=[64, 128, 256, 512] if basic else [256, 512, 1024, 2048], num_labels=arch.num_classes,
        downsample_in_first_stage=False, downsample_in_bottleneck=False)
    model = transformers.ResNetForImageClassification(config)
    state = {_transformers_key(k): v for k, v in reference.state_dict().items()}
    model.load_state_dict(state, strict=True)
    model.train(reference.training)
    if convert:
        import fastres
        model = fastres.convert(model)
    return Logits(model, hidden_states)
