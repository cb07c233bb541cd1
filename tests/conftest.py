import os

import pytest
import torch

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
