"""What every op family does between its input checks and the kernels: choose the backend, find its
launchers, flatten the rows, and bring the kernels' float32 weight gradients back to the weights' dtype.

The custom ops live in the ``madx_fast`` namespace (``LIB``); their names (``madx_fast::adapter_forward`` ...)
are what compiled graphs and traces record, so they never change. Tests that run the CUDA sources on their CPU
emulator replace ``resolve_backend`` and ``kernel_module`` here: every op looks both up through this module.
"""
from __future__ import annotations

import torch

from ..backends import BackendUnavailableError, check_backend_dtype, kernel_module, resolve_backend

LIB = "madx_fast"


def choose_backend(backend: str | None, x: torch.Tensor, grouped: bool) -> str:
    """The resolved backend ("eager", "triton" or "cuda") for ``x``, refusing what it cannot compute: bfloat16
    on Triton's CPU interpreter, and grouped ops on "cuda" (which has no grouped kernels)."""
    name = resolve_backend(backend, x.device)
    if grouped and name == "cuda":
        raise BackendUnavailableError(
            "backend 'cuda' has no grouped (per-row) kernels; use backend='triton' (or 'eager'). A model on "
            "backend 'cuda' runs its per-row adapters on the Triton kernels by itself")
    check_backend_dtype(name, x.device, x.dtype)
    return name


def triton_kernel_runs(backend: str | None, t: torch.Tensor) -> bool:
    """Whether an op with a Triton kernel and no CUDA C++ one (used for backend "cuda" too) takes its fused path
    for ``t`` instead of the eager one, without raising: ``backend`` resolves to a fused backend here, and
    Triton computes ``t.dtype`` on ``t``'s device."""
    try:
        if resolve_backend(backend, t.device) == "eager":
            return False
        check_backend_dtype("triton", t.device, t.dtype)
    except BackendUnavailableError:
        return False
    return True


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (False without CUDA). One place to ask,
    so that ``madx_fast.testing.gpu_plan.graph_capture`` can plan a captured forward on meta tensors."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def launchers(backend: str):
    """The launcher module of a fused backend (contract in ``madx_fast/kernels/__init__.py``)."""
    return kernel_module(backend)


def rows(t: torch.Tensor, h: int) -> torch.Tensor:
    """[..., H] -> [N, H] without a copy where strides allow (the kernels take a row and a column stride)."""
    return t.reshape(-1, h)


def in_weight_dtypes(grads, dtypes) -> list[torch.Tensor]:
    """The kernels' float32 weight gradients cast to the dtypes of the weights they belong to (fp32 master
    weights with bf16 activations get fp32 gradients): the one place the ops cast a weight-sized tensor."""
    return [g.to(dtype) for g, dtype in zip(grads, dtypes)]
