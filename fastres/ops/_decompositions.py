"""Each fastres op's decomposition into ATen ops: its plain-torch reference (backend_torch), registered in
torch._decomp's global table, which torch.onnx.export(..., dynamo=True) applies to every op it has no ONNX function
for. So an exported fastres model becomes Conv / Add / Relu (and the fold's arithmetic on the weights), with no
flag for the user to know. Eager runs, torch.compile (Inductor picks its own table) and torch.export keep the
fastres ops."""
import torch
from torch._decomp import register_decomposition

from . import backend_torch
from ._library import _SCHEMAS


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


def register():
    for op_name in _SCHEMAS:
        if hasattr(backend_torch, op_name):
            op, decomposed = _reference_of(op_name)
            register_decomposition(op)(decomposed)


register()
