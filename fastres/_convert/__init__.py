"""fastres.convert: swap the ResNet modules of torchvision, timm and Hugging Face transformers for fastres's, in
place, keeping the same parameter objects, state_dict keys and outputs.

One file per ecosystem (torchvision.py, timm.py, transformers.py), each with LIBRARY (its top-level package: it is
consulted only when that package is already imported, since a model cannot hold its classes otherwise) and
converters() -> {exact class: function(module) -> fastres module}. Adding an ecosystem touches only its own file
and _ECOSYSTEMS below.
"""
import dataclasses
import importlib
import logging
import sys

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastres.nn._fused import FusedModuleMixin, conv_fusable, norm_kind, unit_fusable

_ECOSYSTEMS = ("torchvision", "timm", "transformers")
log = logging.getLogger("fastres.convert")


def _swap_map():
    """{class: converter} of every ecosystem whose library is imported."""
    found = {}
    for name in _ECOSYSTEMS:
        module = importlib.import_module(f"fastres._convert.{name}")
        if module.LIBRARY in sys.modules:
            found.update(module.converters())
    return found


@dataclasses.dataclass
class ConversionReport:
    """What fastres.convert did to a model: the modules it swapped, and which convolutions run through fastres's
    kernels (in the model's current train/eval mode) and which it left alone, with why."""

    swapped: dict          # {"layer1.0": "torchvision.models.resnet.Bottleneck -> fastres.nn.blocks.Bottleneck"}
    convs_fused: int
    convs_total: int
    left_alone: dict       # {"layer1.0.conv2": "groups=32"}
    unfused_pairs: list    # names of convs directly followed by a norm that no fastres kernel runs

    blocks: int            # how many of the swapped modules are residual blocks

    def __str__(self):
        others = len(self.swapped) - self.blocks
        text = f"converted {self.blocks} blocks" + (f" and {others} other module{'s' * (others > 1)}" if others else "")
        text += f", {self.convs_fused}/{self.convs_total} convs through fastres"
        if self.left_alone:
            shown = [f"{name} ({why})" for name, why in list(self.left_alone.items())[:8]]
            more = len(self.left_alone) - len(shown)
            text += "; left alone: " + ", ".join(shown) + (f", and {more} more" if more > 0 else "")
        return text


def _why_not(conv, norm):
    """Why fastres does not run conv (+ norm), in a few words."""
    if not conv_fusable(conv):
        reasons = [f"groups={conv.groups}" if conv.groups != 1 else "",
                   f"dilation={tuple(conv.dilation)}" if tuple(conv.dilation) != (1, 1) else "",
                   f"padding_mode={conv.padding_mode!r}" if conv.padding_mode != "zeros" else "",
                   f"padding={conv.padding!r}" if isinstance(conv.padding, str) else ""]
        return ", ".join(r for r in reasons if r) or f"{type(conv).__name__} with its own forward or hooks"
    if norm_kind(norm) is None:
        return f"{type(norm).__name__} is not a norm the kernels run"
    return "a conv bias with a trained BatchNorm"


def _is_norm(m):
    return isinstance(m, (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)) or "Norm" in type(m).__name__


def report(model):
    """The ConversionReport of `model` as it is now (see fastres.convert)."""
    from fastres.nn.blocks import _FusedBlock

    swapped = getattr(model, "_fastres_swapped", {})
    blocks = sum(isinstance(m, _FusedBlock) for m in model.modules())
    units = {}
    for m in model.modules():
        if isinstance(m, FusedModuleMixin):
            for conv, norm in m._fused_units():
                units[id(conv)] = norm
    fused, total, left, pairs = 0, 0, {}, []
    for parent_name, parent in model.named_modules():
        children = list(parent._modules.items())
        for k, (name, conv) in enumerate(children):
            if not isinstance(conv, nn.Conv2d):
                continue
            full = f"{parent_name}.{name}" if parent_name else name
            total += 1
            if id(conv) in units and unit_fusable(conv, units[id(conv)]):
                fused += 1
                continue
            if id(conv) in units:
                left[full] = _why_not(conv, units[id(conv)])
                if units[id(conv)] is not None and norm_kind(units[id(conv)]) not in ("none", "identity"):
                    pairs.append(full)
            else:
                left[full] = f"not in a module fastres runs ({type(parent).__name__})"
                following = children[k + 1][1] if k + 1 < len(children) else None
                if following is not None and _is_norm(following):
                    pairs.append(full)
    return ConversionReport(dict(swapped), fused, total, left, pairs, blocks)


def convert(model, *, strict=False):
    """Replace the ResNet modules of torchvision, timm and Hugging Face transformers in `model` (recursively, the
    root included) by fastres's, in place. The new modules hold the very same submodules and parameters, so
    weights, state_dict keys, optimizer state and outputs are kept. Returns the model (the new module when `model`
    itself is converted); fastres.convert_report(model) tells what runs through fastres, and the summary is logged
    (logger "fastres.convert": INFO, WARNING when nothing was converted).

    Only exact library classes are swapped (a subclass may have changed forward); what is not understood is left
    untouched and listed in the report. strict=True raises ValueError when a conv directly followed by a norm layer
    is left unfused (in the model's current train/eval mode).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    swap = _swap_map()
    memo, swapped = {}, dict(getattr(model, "_fastres_swapped", {}))

    def converted(m, name):
        fn = swap.get(type(m))
        if fn is None:
            return None
        if id(m) not in memo:
            before = f"{type(m).__module__}.{type(m).__qualname__}"  # fn swaps m's class in place
            memo[id(m)] = new = fn(m)
            if new is not None:
                swapped[name or "(root)"] = f"{before} -> {type(new).__module__}.{type(new).__qualname__}"
        return memo[id(m)]

    def walk(module, prefix):
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            full = f"{prefix}.{name}" if prefix else name
            new = converted(child, full)
            if new is not None:
                module._modules[name] = child = new
            walk(child, full)

    root = converted(model, "")
    if root is not None:
        model = root
    walk(model, "")
    # The swap record travels with the root (not a module attribute: nothing in the state_dict or repr changes).
    model.__dict__["_fastres_swapped"] = swapped
    result = report(model)
    log.log(logging.INFO if result.swapped else logging.WARNING, "fastres.convert(%s): %s", type(model).__name__,
            result)
    if strict and result.unfused_pairs:
        raise ValueError(f"convert(strict=True): {len(result.unfused_pairs)} conv + norm pairs stay unfused: "
                         + ", ".join(f"{n} ({result.left_alone[n]})" for n in result.unfused_pairs))
    return model
