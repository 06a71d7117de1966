"""Launch-time helpers shared by the Triton launchers: block sizes, SM count, dot precision."""
from __future__ import annotations

import functools

import torch
import triton

from .. import triton_interpreter_enabled as interpreting  # noqa: F401 (re-exported for the launchers)


def pow2_at_least(n: int, floor: int = 16) -> int:
    """Padded tile width for a dimension held whole on chip (tl.dot needs >= 16 on GPUs)."""
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Streaming multiprocessors of the GPU the launch settings are planned for when no GPU is there to ask:
# launches recorded on meta tensors (the kernel report, aot.py) are sized for an H100 SXM.
PLANNED_SMS = 132


def sm_count(device: torch.device) -> int:
    if device.type == "meta":
        return PLANNED_SMS
    if device.type != "cuda":
        return 4  # the interpreter: a few programs are enough to exercise the split reductions
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 products are exact ("ieee") unless the user allowed TF32 for matmuls, as torch does."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# Register budget: a [rows, padded_width] fp32 tile kept on chip across a loop, and a [chunk, padded_width]
# weight tile loaded per iteration, each at most TILE_BUDGET elements. Checked for spills and shared memory
# on sm_90 by scripts/triton_compile_check.py (no GPU needed).
TILE_BUDGET = 8192
NUM_STAGES = 2  # software pipelining depth: 3 (Triton's default) overflows shared memory with wide tiles


def tile_budget(dtype: torch.dtype) -> int:
    """fp32 operands double the operand registers and IEEE fp32 products run on FMA units: halve the tiles."""
    return TILE_BUDGET // 2 if dtype == torch.float32 else TILE_BUDGET


def rows_per_program(padded_width: int, dtype: torch.dtype, live_tiles: int = 1) -> int:
    """Tokens per program for a kernel that keeps ``live_tiles`` [rows, padded_width] fp32 tiles on chip."""
    if interpreting():
        return 128  # the interpreter's cost is per program: few, large programs
    return max(16, min(64, tile_budget(dtype) // (padded_width * live_tiles)))


def chunk_width(padded_width: int, dtype: torch.dtype) -> int:
    """Width of the streamed H (or feature) chunk: a [chunk, padded_width] weight tile within the budget."""
    if interpreting():
        return 128
    return max(16, min(64, tile_budget(dtype) // padded_width))


def num_warps_for(tile_elems: int) -> int:
    return 8 if tile_elems >= 4096 else 4


def splits_for(n_rows: int, block_m: int, tiles: int, device: torch.device) -> int:
    """How many token ranges a weight-gradient reduction is split into: enough programs for ~2 waves."""
    blocks = triton.cdiv(max(n_rows, 1), block_m)
    return max(1, min(blocks, triton.cdiv(2 * sm_count(device), max(tiles, 1))))
