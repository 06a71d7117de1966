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


def tokens_reduce(a: torch.Tensor, b: torch.Tensor, activation: int = 0, with_sum: bool = True, *,
                  splits: int | None = None):
    """``(A^T act(B), A.sum(0))`` in fp32 for ``A: [N, M]``, ``B: [N, K]`` of one dtype."""
    n, m = a.shape
    k = b.shape[1]
    dev = a.device
    f32 = dict(dtype=torch.float32, device=dev)
    if n == 0:
        return torch.zeros((m, k), **f32), torch.zeros((m,), **f32)
    big = interpreting()
    bn = 128 if big else 64
    tile = 128 if big else (32 if a.dtype == torch.float32 else 64)
    bm = min(pow2_at_least(m), tile)
    bk = min(pow2_at_least(k), 256 if big else tile)
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
        BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, num_warps=4, num_stages=NUM_STAGES,
    )
    return c_part.sum(0), s_part.sum(0)
