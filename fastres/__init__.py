"""fastres: fused Triton and CUDA/C++ kernels for the ResNet family in PyTorch."""
from . import ops
from .ops import backend, BackendUnavailableError

__version__ = "0.1.0"
__all__ = ["ops", "backend", "BackendUnavailableError"]
