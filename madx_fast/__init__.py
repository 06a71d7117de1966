"""madx_fast: MAD-X adapters (language, task, invertible) on fused Triton and CUDA kernels."""
from . import ops, reference
from .backends import BackendUnavailableError, resolve_backend
from .modules import BottleneckAdapter, InvertibleAdapter
from .ops import bottleneck_adapter, nice_forward, nice_inverse

__version__ = "0.1.0"
__all__ = [
    "BackendUnavailableError", "BottleneckAdapter", "InvertibleAdapter", "bottleneck_adapter", "nice_forward",
    "nice_inverse", "ops", "reference", "resolve_backend",
]
