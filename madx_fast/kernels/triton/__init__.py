"""Triton backend: fused kernels for the bottleneck adapter and NICE coupling (launcher contract in
``madx_fast/kernels/__init__.py``)."""
from .adapter import adapter_backward, adapter_forward
from .nice import nice_coupling, nice_coupling_backward

__all__ = ["adapter_forward", "adapter_backward", "nice_coupling", "nice_coupling_backward"]
