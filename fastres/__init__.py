"""fastres: fused Triton and CUDA/C++ kernels for the ResNet family in PyTorch.

    import fastres
    model = fastres.models.resnet50()            # torchvision's structure and state_dict keys, fused ops inside
    fastres.convert(torchvision_model)           # or swap a torchvision model's blocks in place
"""
from . import ops
from .ops import BackendUnavailableError, backend
from . import nn, models, flops  # noqa: E402  (nn and models build on ops)
from ._convert import convert, report as convert_report
from .nn import fold_bn, freeze_bn, refresh
from .tune import tune

__version__ = "0.1.0"
__all__ = ["ops", "nn", "models", "flops", "backend", "BackendUnavailableError", "convert", "convert_report", "fold_bn", "freeze_bn",
           "refresh", "tune"]
