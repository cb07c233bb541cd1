"""Each fastres op's decomposition into ATen ops: its plain-torch reference (backend_torch), registered in
torch._decomp's global table, which torch.onnx.export(..., dynamo=True) applies to every op it has no ONNX function
for. So an exported fastres model becomes Conv / Add / Relu (and the fold's arithmetic on the weights), with no
flag for the user to know. Eager runs, torch.compile (Inductor picks its own table) and torch.export keep the
fastres ops."""
import sys

import torch
from torch._decomp import register_decomposition

from . import backend_torch


def _reference_of(op_name):
    """backend_torch's function for `op_name`, taking the op's arguments by its schema (defaults filled in)."""
    op = getattr(torch.ops.fastres, op_name).default
    reference = getattr(backend_torch, op_name)
    arguments = op._schema.arguments

    def decomposed(*args, **kwargs):
        values = list(args) + [kwargs[a.name] if a.name in kwargs else a.default_value
                               for a in arguments[len(args):]]
        out = reference(*values)
        return tuple(out) if isinstance(out, list) else out

    decomposed.__name__ = f"fastres_{op_name}_decomposition"
    return op, decomposed


# The forward ops an eval model (or an inference export) calls, whose reference returns exactly what the op returns.
# Not the backward ops (they return empty tensors where the references return None) nor dual_bn_act_forward
# (training only): a decomposition in the global table must match its op, which opcheck's AOT test holds.
DECOMPOSED = ("fold_bn", "add_relu", "max_pool_relu", "conv_bias_act", "conv_bn_act_forward", "bn_relu_conv")


def register():
    for op_name in DECOMPOSED:
        op, decomposed = _reference_of(op_name)
        register_decomposition(op)(decomposed)


_inductor_fallbacks_registered = False


def register_inductor_fallbacks():
    """Tell Inductor that it runs these ops as they are (its fallback: the fastres kernels), as it would by itself.
    Its implicit fallback refuses, when the environment has CI set (GitHub Actions and most CI services do), an op
    that has a decomposition in torch._decomp's global table ("a decomposition exists, we should switch to it"),
    which is where the ONNX exporter finds ours: torch.compile of a fastres model would fail in users' CI. The same
    fallback with the same layout constraint, registered explicitly, once Inductor is loaded (importing it here
    would cost a second on every `import fastres`)."""
    global _inductor_fallbacks_registered
    if _inductor_fallbacks_registered:
        return
    lowering = sys.modules.get("torch._inductor.lowering")
    if lowering is None:
        return
    from torch._library.utils import get_layout_constraint_tag
    for op_name in DECOMPOSED:
        op = getattr(torch.ops.fastres, op_name).default
        if op not in lowering.lowerings:
            constraint = lowering.tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
            lowering.make_fallback(op, layout_constraint=constraint, warn=False)
    _inductor_fallbacks_registered = True


register()
