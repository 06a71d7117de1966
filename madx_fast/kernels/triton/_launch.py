"""Launch-time helpers shared by the Triton launchers: block sizes, SM count, dot precision."""
from __future__ import annotations

import functools
import os

import torch
import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def pow2_at_least(n: int, floor: int = 16) -> int:
    """Padded tile width for a dimension held whole on chip (tl.dot needs >= 16 on GPUs)."""
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs are enough to exercise the split reductions
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 products are exact ("ieee") unless the user allowed TF32 for matmuls, as torch does."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def row_block(n_rows: int, padded_width: int) -> int:
    """Rows per program for kernels that keep a [rows, padded_width] fp32 tile in registers."""
    if interpreting():
        return 128  # the interpreter's cost is per program: few, large programs
    if padded_width <= 64:
        return 64
    if padded_width <= 256:
        return 32
    return 16


def num_warps_for(tile_elems: int) -> int:
    return 8 if tile_elems >= 64 * 256 else 4


def splits_for(n_rows: int, block_m: int, tiles: int, device: torch.device) -> int:
    """How many token ranges a weight-gradient reduction is split into: enough programs for ~2 waves."""
    blocks = triton.cdiv(max(n_rows, 1), block_m)
    return max(1, min(blocks, triton.cdiv(2 * sm_count(device), max(tiles, 1))))
