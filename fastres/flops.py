"""Count a model's multiply-adds and parameters without running it.

    >>> import fastres.flops, torchvision
    >>> c = fastres.flops.count(torchvision.models.resnet50(), (1, 3, 224, 224))
    >>> c.macs, c.params
    (4089184256, 25557032)
    >>> print(c.table(top=5))

The model runs once on the meta device (shapes only: no arithmetic, no memory for activations) under
torch.utils.flop_counter.FlopCounterMode. Its parameters and buffers are replaced for that one call by meta
tensors of the same shapes (torch.func.functional_call), so the model itself is left as it was: its tensors are
not copied, moved or written, and its train/eval flag is not touched. The count is of the mode the model is in.

What is counted is what FlopCounterMode counts: convolutions and matrix products (2 flops per multiply-add);
batch norm, activations, additions and pooling count zero. fastres's fused ops are taught to it here
(register_flop_formulas) with the convolution formula FlopCounterMode uses for aten's convolutions, so a fastres
model and the torchvision model it mirrors count the same.
"""
from dataclasses import dataclass, field
import importlib
import numbers

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

__all__ = ["FlopCount", "LayerCount", "count", "register_flop_formulas"]

BACKWARD_PATH = "(backward)"  # LayerCount.path of the backward pass's work, which is not split by layer


@dataclass(frozen=True)
class LayerCount:
    """The multiply-adds one op performed directly in one module (not in its submodules)."""
    path: str      # module path as in the model's state_dict keys; "" for the model's own forward;
                   # BACKWARD_PATH for the whole backward pass
    op: str        # the counted operator, e.g. "aten.convolution" or "fastres.conv_bn_act_forward"
    macs: int
    share: float   # fraction of the model's multiply-adds


@dataclass(frozen=True)
class FlopCount:
    """The result of count(): totals and a per-layer breakdown, layers in the order they first ran."""
    macs: int                    # multiply-adds of one forward pass over the whole input batch
    params: int                  # parameters, each shared parameter once
    input_shape: tuple
    training: bool               # the mode the model was counted in
    backward: bool = False       # whether macs include the backward pass
    layers: tuple = field(default=(), repr=False)

    @property
    def flops(self):
        """Floating-point operations counting a multiply-add as two, as FlopCounterMode does."""
        return 2 * self.macs

    def table(self, top=None):
        """A text table of the layers (module path, op, MACs, share of the total), largest `top` only if given."""
        layers = list(self.layers)
        if top is not None:
            layers = sorted(layers, key=lambda layer: -layer.macs)[:top]
        rows = [(layer.path or "(model)", layer.op, f"{layer.macs:,}", f"{100 * layer.share:.2f}%")
                for layer in layers]
        header = ("module", "op", "MACs", "share")
        footer = ("total", f"{len(self.layers)} layers", f"{self.macs:,}", "100.00%" if self.macs else "0.00%")
        widths = [max(len(r[i]) for r in [header, footer] + rows) for i in range(4)]

        def line(r):
            return f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}"

        rule = "-" * len(line(header))
        title = (f"input {tuple(self.input_shape)}, {'train' if self.training else 'eval'} mode"
                 f"{', forward + backward' if self.backward else ''}: "
                 f"{self.macs / 1e9:.3f} GMACs ({self.flops / 1e9:.3f} GFLOPs), {self.params / 1e6:.3f} M params")
        body = [line(r) for r in rows]
        if top is not None and len(self.layers) > len(layers):
            body.append(f"... {len(self.layers) - len(layers)} smaller layers not shown")
        return "\n".join([title, line(header), rule] + body + [rule, line(footer)])

    def __str__(self):
        return self.table()

    def to_dict(self):
        """Plain data (for JSON)."""
        return {"macs": self.macs, "flops": self.flops, "params": self.params,
                "input_shape": list(self.input_shape), "training": self.training, "backward": self.backward,
                "layers": [{"path": l.path, "op": l.op, "macs": l.macs, "share": l.share} for l in self.layers]}


def _conv_macs_formula(weight_index, output_index):
    """A FlopCounterMode formula for a fastres op whose first argument is a conv's input and argument
    `weight_index` its weight; output_index picks the conv-shaped output when the op returns several tensors.
    Flops are counted by torch's own conv_flop_count (2 x multiply-adds), exactly as aten.convolution is counted.
    """
    def formula(*arg_shapes, out_shape=None, **kwargs):
        conv_out_shape = out_shape if output_index is None else out_shape[output_index]
        return flop_counter.conv_flop_count(arg_shapes[0], arg_shapes[weight_index], conv_out_shape,
                                            transposed=False)
    return formula


# fastres op name -> (position of the conv weight argument, position of the conv-shaped output or None for an op
# returning a single tensor). The input is always argument 0.
# conv_bn_act itself is CompositeImplicitAutograd: it decomposes into conv_bn_act_forward before any
# dispatch mode sees it, so it needs no formula of its own (and must not get one: it would count twice).
_FASTRES_CONV_OPS = {
    "conv_bias_act": (1, None),        # (x, weight, bias, stride, padding, residual, relu) -> out
    "conv_bn_act_forward": (1, 0),     # (x, weight, bn_weight, ..., residual, relu) -> (out, conv_out, ...)
    "bn_relu_conv": (3, None),         # (x, scale, shift, weight, stride, padding, relu) -> out
}
_registered = set()


def register_flop_formulas():
    """Teach torch.utils.flop_counter.FlopCounterMode the multiply-adds of fastres's fused conv ops.

    Safe to call any number of times, and before the ops exist (those missing are skipped and registered on a
    later call). Returns the names of the fastres ops that have a formula. count() calls it; call it yourself to
    count fastres models with a FlopCounterMode of your own.
    """
    try:
        importlib.import_module("fastres.ops")  # defines torch.ops.fastres.*; absent in a partial checkout
    except ImportError:
        pass
    for name, (weight_index, output_index) in _FASTRES_CONV_OPS.items():
        if name in _registered:
            continue
        try:
            packet = getattr(torch.ops.fastres, name)
        except (AttributeError, RuntimeError):
            continue  # not defined (yet)
        if packet not in flop_counter.flop_registry:
            register_flop_formula(packet)(_conv_macs_formula(weight_index, output_index))
        _registered.add(name)
    return sorted(_registered)


def _check_input_shape(input_shape):
    if isinstance(input_shape, torch.Size):
        input_shape = tuple(input_shape)
    if (not isinstance(input_shape, (tuple, list)) or not input_shape
            or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in input_shape)):
        raise ValueError("input_shape must be a non-empty sequence of positive ints including the batch, e.g. "
                         f"(1, 3, 224, 224); got {input_shape!r}")
    return tuple(int(d) for d in input_shape)


def _input_dtype(model, dtype):
    if dtype is not None:
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
        return dtype
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _meta_like(t):
    return torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)


def _self_counts(counts, root):
    """Per-module counts of ops done by the module itself: its total minus its direct children's totals.

    counts: FlopCounterMode.get_flop_counts(), keyed by "Root.child.grandchild" (and "Global").
    Returns {(path, op): flops} with paths relative to the model ("" for the model itself).
    """
    children = {}
    for name in counts:
        if name != "Global" and "." in name:
            children.setdefault(name.rsplit(".", 1)[0], []).append(name)
    own = {}
    for name, ops in counts.items():
        if name == "Global":
            continue
        for op, flops in ops.items():
            rest = flops - sum(counts[c].get(op, 0) for c in children.get(name, ()))
            if rest > 0:
                path = "" if name == root else name[len(root) + 1:] if name.startswith(root + ".") else name
                own[(path, op)] = rest
    # Ops run outside the model's forward (none for a plain nn.Module, but hooks could) are the model's own.
    outside = {op: flops - counts.get(root, {}).get(op, 0) for op, flops in counts.get("Global", {}).items()}
    for op, flops in outside.items():
        if flops > 0:
            own[("", op)] = own.get(("", op), 0) + flops
    return own


def _op_name(op):
    # OpOverloadPacket "aten.convolution" / "fastres.conv_bias_act"; anything else by its str.
    name = getattr(op, "_qualified_op_name", None)
    return name.replace("::", ".") if name else str(op)


def count(model, input_shape, *, dtype=None, backward=False):
    """Multiply-adds and parameters of one forward pass of `model` on an input of shape `input_shape`.

    model: a torch.nn.Module, on any device, in train or eval mode (it is counted in the mode it is in and is
        not modified: its tensors stay where they are, untouched, and its mode is not changed).
    input_shape: the full input shape including the batch, e.g. (1, 3, 224, 224); MACs scale with the batch.
    dtype: the input's dtype; default: that of the model's first floating-point parameter (float32 if none).
    backward: also count the backward pass (gradients of the parameters that require grad, not of the input),
        as one training step does; FlopCount.macs is then forward + backward.
    Returns a FlopCount (macs, flops = 2 x macs, params, per-layer table()).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    input_shape = _check_input_shape(input_shape)
    dtype = _input_dtype(model, dtype)
    register_flop_formulas()

    # One meta copy per tensor: functional_call gives it to every name a shared (tied) tensor has.
    meta_state = {name: _meta_like(t) for name, t in model.named_parameters()}
    meta_state.update({name: _meta_like(t) for name, t in model.named_buffers()})
    x = torch.empty(input_shape, dtype=dtype, device="meta")
    training = model.training

    if backward and not any(t.requires_grad for t in meta_state.values()):
        raise ValueError("backward=True needs a model with parameters that require grad")

    forward_counter = FlopCounterMode(display=False)
    with forward_counter:
        out = torch.func.functional_call(model, meta_state, (x,))
    if model.training != training:  # a model whose forward flips its own mode: say so rather than hide it
        raise RuntimeError("the model changed its own training flag during forward")
    counts = forward_counter.get_flop_counts()
    total = forward_counter.get_total_flops()
    own = _self_counts(counts, type(model).__name__)
    if backward:
        # Counted apart and not split by layer: FlopCounterMode's module tracking in backward leaves a module
        # "entered" until the gradient of all its inputs is done, so sibling branches get each other's work.
        backward_counter = FlopCounterMode(display=False)
        with backward_counter:
            # Any scalar of the outputs will do: the backward's shapes, hence its cost, do not depend on it.
            outputs = [t for t in torch.utils._pytree.tree_leaves(out)
                       if isinstance(t, torch.Tensor) and t.requires_grad]
            if not outputs:
                raise ValueError("backward=True: no output of the model requires grad")
            sum(t.sum() for t in outputs).backward()
        for op, flops in backward_counter.get_flop_counts().get("Global", {}).items():
            own[(BACKWARD_PATH, op)] = flops
        total += backward_counter.get_total_flops()

    layers = tuple(LayerCount(path, _op_name(op), flops // 2, flops / total if total else 0.0)
                   for (path, op), flops in own.items())
    params = sum(p.numel() for p in model.parameters())
    return FlopCount(macs=total // 2, params=params, input_shape=input_shape, training=training, backward=backward,
                     layers=layers)
