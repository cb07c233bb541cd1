import os
import sys

import pytest
import torch

# `python -m pytest` (and python run from the repository root) puts the root first on sys.path, where the Triton
# kernels' folder, kernels/ (installed as fastres.kernels), shadows Hugging Face's `kernels` package, which
# transformers imports. The root goes behind the installed packages instead: fastres itself resolves the same way
# from either (its editable install points here), and a root that is not installed stays importable last.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_root_entries = [p for p in sys.path if os.path.abspath(p or os.curdir) == _ROOT]
sys.path[:] = [p for p in sys.path if p not in _root_entries] + _root_entries

# Without a GPU the Triton kernels run on CPU tensors under the interpreter; set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The CPU eval plan computes under bf16/fp16 autocast in fp32 where this CPU's convolutions in that dtype are slower
# (fastres.models._eval_plan.autocast_computes_in_fp32): the suite holds the reduced-dtype kernels to the tolerance
# rule on every machine, and the tests of that choice set it themselves.
os.environ.setdefault("FASTRES_CPU_AUTOCAST", "autocast")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m cuda` on a GPU machine)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
