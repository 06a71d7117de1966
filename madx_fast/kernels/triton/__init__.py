"""Triton backend: fused kernels for the bottleneck adapter and NICE coupling, single-adapter and grouped
(per-row), and averaged adapters (launcher contract in ``madx_fast/kernels/__init__.py``)."""
from .adapter import adapter_backward, adapter_forward
from .average import average_adapter_backward, average_adapter_forward
from .grouped import (
                      grouped_adapter_backward,
                      grouped_adapter_forward,
                      grouped_nice_coupling,
                      grouped_nice_coupling_backward,
)
from .nice import nice_coupling, nice_coupling_backward

__all__ = ["adapter_forward", "adapter_backward", "nice_coupling", "nice_coupling_backward",
           "grouped_adapter_forward", "grouped_adapter_backward", "grouped_nice_coupling",
           "grouped_nice_coupling_backward", "average_adapter_forward", "average_adapter_backward"]
