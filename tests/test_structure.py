"""fastres.nn's modules form a chain, not a circle: each imports only modules before it (at the top or inside a
function), so that each can be read, tested and changed from the bottom up."""
import ast
import pathlib

import fastres

# Bottom to top: the collectives and frozen BN, the per-unit math, the lean chain (and SyncBN's math), the
# SyncBatchNorm module, the blocks, folding.
NN_CHAIN = ["frozen_bn", "_collectives", "_fused", "_lean", "sync_bn", "blocks", "fold"]


def _fastres_nn_imports(path):
    """Names of the fastres.nn modules that `path` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("fastres.nn."):
                found.add(node.module.split(".")[2])
            elif node.module == "fastres.nn":
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names if a.name.startswith("fastres.nn."))
    return found


def test_fastres_nn_modules_form_a_chain():
    nn_dir = pathlib.Path(fastres.__file__).parent / "nn"
    modules = sorted(p.stem for p in nn_dir.glob("*.py") if p.stem != "__init__")
    assert sorted(NN_CHAIN) == modules, "a new fastres.nn module must take its place in NN_CHAIN"
    for i, name in enumerate(NN_CHAIN):
        later = _fastres_nn_imports(nn_dir / f"{name}.py") & set(NN_CHAIN[i:])
        assert not later, f"fastres/nn/{name}.py imports {sorted(later)}, which come after it in the chain"
