"""Input checks shared by the op families: every problem is named before any kernel runs.

A single op is its grouped version without groups: ``groups=None`` (``stacked=False``) expects weights
``[out, in]``, a ``groups`` tensor expects them stacked over groups ``[G, out, in]`` and one id per row of x.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GROUP_ID_DTYPES = (torch.int32, torch.int64)


def check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; madx_fast supports float32, float16 and bfloat16")


def check_matrix(name: str, t, stacked: bool) -> None:
    """A float weight matrix ``[out, in]``, or ``[groups, out, in]`` when ``stacked``."""
    check_float(name, t)
    if stacked and t.dim() != 3:
        raise ValueError(f"{name} must be 3-D [groups, out, in] (weights stacked over groups), got shape "
                         f"{tuple(t.shape)}")
    if not stacked and t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out, in], got shape {tuple(t.shape)}")


def check_shape(name: str, t, shape) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def check_same_device(named) -> None:
    """``named``: ``(name, tensor or None)`` pairs; the tensors must share one device."""
    devices = {name: t.device for name, t in named if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_residual(residual, x) -> None:
    """A residual other than x itself has x's shape and dtype."""
    if residual is None or residual is x:
        return
    check_float("residual", residual)
    if residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual has dtype {residual.dtype} but x has {x.dtype}")


def check_groups(groups, x: torch.Tensor, num_groups: int) -> None:
    """``groups``: one int32/int64 id in ``[0, num_groups)`` per row of ``x [rows, ..., H]``. Ids on the host
    are range-checked; ids on a device are not (reading them would sync)."""
    if not isinstance(groups, torch.Tensor):
        raise TypeError(f"groups must be a torch.Tensor of row group ids, got {type(groups).__name__}")
    if groups.dtype not in GROUP_ID_DTYPES:
        raise TypeError(f"groups has dtype {groups.dtype}; it must be int32 or int64 (one group id per row)")
    if x.dim() < 2:
        raise ValueError(f"x must be [rows, ..., H] (at least 2-D) for per-row groups, got shape {tuple(x.shape)}")
    if groups.dim() != 1 or groups.shape[0] != x.shape[0]:
        raise ValueError(f"groups has shape {tuple(groups.shape)}, expected ({x.shape[0]},): one id per row of x "
                         f"(x has shape {tuple(x.shape)})")
    if num_groups < 1:
        raise ValueError("the stacked weights hold no group (their first dimension is 0)")
    if groups.device.type == "cpu" and groups.numel() and not torch.compiler.is_compiling():
        # host data: checked without a device sync (a compiled graph has no values to look at)
        lo, hi = int(groups.min()), int(groups.max())
        if lo < 0 or hi >= num_groups:
            raise ValueError(f"groups holds ids in [{lo}, {hi}], outside [0, {num_groups}) (the weights stack "
                             f"{num_groups} groups)")
