"""Weight gradients as a reduction over tokens: ``C = A^T act(B)`` and ``colsum(A)``, deterministic.

``A: [N, M]``, ``B: [N, K]`` (any strides), ``C: [M, K]`` fp32. Programs tile (M, K) and split the tokens
into ranges; each writes an fp32 partial that the launcher sums (no atomics: the same inputs give the same
bits). ``ACT`` applies an activation to B on load, so callers pass pre-activations instead of storing
activations. Used by the NICE backward (its four weight matrices and biases) and by the wide-bottleneck
adapter backward (``dW_up = s dy^T act(z)``, ``dW_down = dz^T x`` and the bias sums; adapter.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import NUM_STAGES, dot_precision, interpreting, pow2_at_least, splits_for
from .activations import apply_activation


@triton.jit
def _tn_kernel(
    A, B, C_PART, S_PART,
    N, M, K, rows_per_split,
    stride_an, stride_am, stride_bn, stride_bk,
    ACT: tl.constexpr, WITH_SUM: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    mc = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    kc = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mmask = mc < M
    kmask = kc < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    start = pid_s * rows_per_split
    stop = tl.minimum(start + rows_per_split, N)
    for n0 in range(start, stop, BLOCK_N):
        rows = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        acc, colsum = tn_accumulate(A, B, rows, rows < stop, mc, mmask, kc, kmask, acc, colsum,
                                    stride_an, stride_am, stride_bn, stride_bk, ACT, WITH_SUM, DOT_PREC)
    tn_store(C_PART, S_PART, pid_s.to(tl.int64), acc, colsum, mc, mmask, kc, kmask, M, K, pid_k, WITH_SUM)


@triton.jit
def tn_accumulate(A, B, tok, tmask, mc, mmask, kc, kmask, acc, colsum, stride_an, stride_am, stride_bn, stride_bk,
                  ACT: tl.constexpr, WITH_SUM: tl.constexpr, DOT_PREC: tl.constexpr):
    """One block of tokens ``tok`` (rows of A and B; ``tmask`` the valid ones) into ``acc += A^T act(B)`` and
    ``colsum += A.sum(0)``, for the M tile ``mc`` and the K tile ``kc``. Shared with the grouped reduction,
    which gathers its tokens by group."""
    dt = A.dtype.element_ty
    a = tl.load(A + tok[:, None] * stride_an + mc[None, :] * stride_am, mask=tmask[:, None] & mmask[None, :],
                other=0.0)
    bmask = tmask[:, None] & kmask[None, :]
    b = tl.load(B + tok[:, None] * stride_bn + kc[None, :] * stride_bk, mask=bmask, other=0.0)
    if ACT != 0:
        b = tl.where(bmask, apply_activation(b.to(tl.float32), ACT), 0.0).to(dt)
    acc = tl.dot(tl.trans(a), b.to(dt), acc, input_precision=DOT_PREC)
    if WITH_SUM:
        colsum += tl.sum(a.to(tl.float32), axis=0)
    return acc, colsum


@triton.jit
def tn_store(C_PART, S_PART, part, acc, colsum, mc, mmask, kc, kmask, M, K, pid_k, WITH_SUM: tl.constexpr):
    """A program's fp32 partial of ``C`` (and, from the first K tile, of the column sums) at slot ``part``."""
    tl.store(C_PART + part * M * K + mc[:, None] * K + kc[None, :], acc, mask=mmask[:, None] & kmask[None, :])
    if WITH_SUM:
        if pid_k == 0:
            tl.store(S_PART + part * M + mc, colsum, mask=mmask)


def _gemm_tile(size: int) -> int:
    """A tensor-core tile edge for a dimension: 128 or 64, whichever pads less (128 on a tie), at least 64
    (Hopper's warpgroup MMA works on 64-row blocks; a narrower tile falls back to mma.sync)."""
    pad128, pad64 = triton.cdiv(size, 128) * 128, triton.cdiv(size, 64) * 64
    return 128 if pad128 <= pad64 else 64


def reduction_config(m: int, k: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """``(BLOCK_N tokens per step, BLOCK_M, BLOCK_K, num_warps, num_stages)`` of a token reduction
    ``A^T B`` with ``A: [N, m]``, ``B: [N, k]``; shared by the single and grouped reductions.

    bf16/fp16 on a GPU: output tiles up to 128 x 128 (8 warps, 3 stages: 96 KB of shared memory for the
    staged A and B blocks), so each loaded block feeds up to 128 output rows and columns; 64-token steps.
    fp32: 32 x 32 tiles, 4 warps (IEEE products run on FMA units; wider tiles spill the gathered blocks).
    The interpreter: a few large programs (its cost is per program)."""
    if interpreting():
        return 128, min(pow2_at_least(m), 128), min(pow2_at_least(k), 256), 4, NUM_STAGES
    if dtype == torch.float32:
        return 32, min(pow2_at_least(m), 32), min(pow2_at_least(k), 32), 4, NUM_STAGES
    bm, bk = _gemm_tile(m), min(_gemm_tile(k), pow2_at_least(k))
    return 64, bm, bk, 8 if bm * bk >= 128 * 128 else 4, 3


def tokens_reduce(a: torch.Tensor, b: torch.Tensor, activation: int = 0, with_sum: bool = True, *,
                  splits: int | None = None):
    """``(A^T act(B), A.sum(0))`` in fp32 for ``A: [N, M]``, ``B: [N, K]`` of one dtype."""
    n, m = a.shape
    k = b.shape[1]
    dev = a.device
    f32 = dict(dtype=torch.float32, device=dev)
    if n == 0:
        return torch.zeros((m, k), **f32), torch.zeros((m,), **f32)
    bn, bm, bk, warps, stages = reduction_config(m, k, a.dtype)
    grid_mk = triton.cdiv(m, bm) * triton.cdiv(k, bk)
    blocks = triton.cdiv(n, bn)
    n_split = splits or splits_for(n, bn, grid_mk, dev)
    rows_per_split = triton.cdiv(blocks, n_split) * bn
    n_split = triton.cdiv(n, rows_per_split)
    c_part = torch.empty((n_split, m, k), **f32)
    s_part = torch.empty((n_split, m), **f32)
    _tn_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bk), n_split)](
        a, b, c_part, s_part, n, m, k, rows_per_split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        ACT=activation, WITH_SUM=with_sum, DOT_PREC=dot_precision(a.dtype),
        BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )
    return c_part.sum(0), s_part.sum(0)
