"""A tiled GEMM with the adapter's prologue and epilogues fused: ``out = epilogue(act?(A) @ W^T)``.

Used by the bottleneck adapter when the bottleneck is wide (d > 128, e.g. MAD-X language adapters at
d=384): there the single-kernel path would have to re-read both weight matrices for every small token
block, while output tiles of a GEMM reuse each loaded tile BLOCK_M or BLOCK_N times. Near d=384 the adapter
is compute-bound (~77 GFLOP forward at 65536 tokens), so GEMM efficiency is what matters.

``A: [M, K]`` (any strides), ``W[n, k]`` at ``W + n * stride_wn + k * stride_wk`` (an nn.Linear weight
[N, K] has strides (K, 1); strides (1, N) multiply by the weight itself). Epilogues:

* ``EPI_BIAS``:     ``out = acc + bias``                         (pre-activation z = x W_down^T + b_down)
* ``EPI_RESIDUAL``: ``out = R + s * (acc + bias)``               (y = r + s (act(z) W_up^T + b_up))
* ``EPI_DACT``:     ``out = (s * acc) * act'(Z)``                (dz = s (dy W_up) act'(z), torch's NaN rules)
* ``EPI_ADD``:      ``out = acc (+ R if HAS_R)``                 (dx = dz W_down (+ dy when r is x))
* ``EPI_BIAS_ACT``: ``out = act(round(acc + bias))``             (a backbone FFN's ``act(dense(x))``, inference;
  ``round`` is the cast to the output dtype, so the activation sees the value HF's Linear stores)

``A_ACT`` applies the activation to A on load (the up projection reads z and never stores act(z)).

``LOST`` (the NICE backward with its input rebuilt, nice.py): ``LOST_MARK`` gives NaN outputs in the rows
whose A row holds Inf or NaN (a rebuilt input that could not be recovered) and marks them in an int8 ``[M]``
tensor; ``LOST_POISON`` gives NaN outputs in the rows marked there. So every gradient that depends on a lost
input is NaN rather than a wrong finite number, as in the fused NICE kernels.

Tiles (``tile_config``): 128 x 128 outputs, 8 warps, 3 stages in bf16/fp16; when a problem is too small
to fill the GPU with those (the 4096-token batch: a 4096 x 384 product is 96 tiles on 132 SMs), the tile
among 128 x 128, 64 x 128 and 64 x 64 (64 rows keep Hopper's warpgroup MMA) with the fewest waves times
tile area, i.e. the shortest predicted time when every wave costs one tile's time.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import NUM_STAGES, dot_precision, interpreting, pow2_at_least, sm_count
from .activations import activation_backward, apply_activation
from .tiles import load_bias

EPI_BIAS, EPI_RESIDUAL, EPI_DACT, EPI_ADD, EPI_BIAS_ACT = 0, 1, 2, 3, 4
LOST_NONE, LOST_MARK, LOST_POISON = 0, 1, 2
# Above this many waves of 128 x 128 tiles a problem keeps them (large problems: the wave quantization is
# small against the bigger tiles' reuse of every loaded block).
SMALL_PROBLEM_WAVES = 4


@triton.jit
def linear_tile(
    A, W, BIAS, OUT, Z, R, LOST, rows, rmask, cols, cmask, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on, stride_zm, stride_zn, stride_rm, stride_rn,
    scaling,
    EPI: tl.constexpr, A_ACT: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr, LOST_ROWS: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` output tile ``epilogue(act?(A[rows]) @ W[cols]^T)``: ``rows`` (int64) and
    ``cols`` are the tile's token and output-column indices. Shared by ``_linear_kernel`` and the grouped
    (per-row weights) kernel in ``grouped.py``, which differ only in how a program finds its tile."""
    dt = OUT.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bad = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        kmask = kc < K
        a_mask = rmask[:, None] & kmask[None, :]
        a = tl.load(A + rows[:, None] * stride_am + kc[None, :] * stride_ak, mask=a_mask, other=0.0)
        if LOST_ROWS == 1:  # every tile of a row sees the whole A row: each marks the same rows
            bad = tl.maximum(bad, tl.max(tl.where(tl.abs(a.to(tl.float32)) < float("inf"), 0, 1), axis=1))
        if A_ACT:
            a = tl.where(a_mask, apply_activation(a.to(tl.float32), ACT), 0.0)
        w = tl.load(W + cols[None, :] * stride_wn + kc[:, None] * stride_wk,
                    mask=cmask[None, :] & kmask[:, None], other=0.0)
        acc = tl.dot(a.to(dt), w.to(dt), acc, input_precision=DOT_PREC)

    m2 = rmask[:, None] & cmask[None, :]
    if EPI == 0:
        out = acc + load_bias(BIAS, cols, cmask, dt)[None, :]
    elif EPI == 1:
        r = tl.load(R + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=m2, other=0.0)
        out = r.to(tl.float32) + scaling * (acc + load_bias(BIAS, cols, cmask, dt)[None, :])
    elif EPI == 2:
        z = tl.load(Z + rows[:, None] * stride_zm + cols[None, :] * stride_zn, mask=m2, other=0.0)
        out = activation_backward(scaling * acc, z.to(tl.float32), ACT)
    elif EPI == 4:
        z = (acc + load_bias(BIAS, cols, cmask, dt)[None, :]).to(dt)
        out = apply_activation(z.to(tl.float32), ACT)
    else:
        out = acc
        if HAS_R:
            out += tl.load(R + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=m2, other=0.0).to(
                tl.float32)
    if LOST_ROWS == 1:
        tl.store(LOST + rows, bad.to(tl.int8), mask=rmask)
        out = tl.where(bad[:, None] != 0, float("nan"), out)
    elif LOST_ROWS == 2:
        lost = tl.load(LOST + rows, mask=rmask, other=0)
        out = tl.where(lost[:, None] != 0, float("nan"), out)
    tl.store(OUT + rows[:, None] * stride_om + cols[None, :] * stride_on, out.to(dt), mask=m2)


@triton.jit
def _linear_kernel(
    A, W, BIAS, OUT, Z, R, LOST,
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on, stride_zm, stride_zn, stride_rm, stride_rn,
    scaling,
    EPI: tl.constexpr, A_ACT: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr, LOST_ROWS: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row blocks share each column block while it is in L2.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    linear_tile(A, W, BIAS, OUT, Z, R, LOST, rows, rows < M, cols, cols < N, K,
                stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on, stride_zm, stride_zn,
                stride_rm, stride_rn, scaling,
                EPI, A_ACT, HAS_R, ACT, LOST_ROWS, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)


def tile_config(m_blocks, n, k, dtype, device, row_cap=128):
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` of a GEMM ``[M, k] x [k, n]`` whose token blocks
    number ``m_blocks(BLOCK_M)``; ``row_cap`` bounds BLOCK_M (the grouped GEMM: the padded row length). Tiles
    are no wider than the padded n and k. Shared by the single and grouped GEMMs (see the module doc)."""
    n_cap, k_cap = pow2_at_least(n), pow2_at_least(k)
    if interpreting():
        return min(128, row_cap), min(128, n_cap), min(128, k_cap), 4, NUM_STAGES
    if dtype == torch.float32:
        return min(64, row_cap), min(64, n_cap), min(32, k_cap), 4, NUM_STAGES
    shapes = [(min(bm, row_cap), min(bn, n_cap)) for bm, bn in ((128, 128), (64, 128), (64, 64))]
    sms = sm_count(device)

    def tiles(shape):
        return m_blocks(shape[0]) * triton.cdiv(n, shape[1])
    bm, bn = shapes[0]
    if tiles(shapes[0]) < SMALL_PROBLEM_WAVES * sms:  # fewest waves x tile area; ties keep the larger tile
        bm, bn = min(shapes, key=lambda s: triton.cdiv(tiles(s), sms) * s[0] * s[1])
    # (64 x 64 tiles: one warpgroup; 128 x 64 keeps 8 warps, 4 spill)
    return bm, bn, min(64, k_cap), 4 if bm * bn <= 64 * 64 else 8, 3


def fused_linear(a, w, w_strides, n, epilogue, *, bias=None, residual=None, z=None, scaling=1.0, activation=0,
                 a_activation=False, out=None, lost=None, lost_rows=LOST_NONE):
    """``epilogue(act?(a) @ W^T)`` as ``[M, n]`` in a's dtype, into ``out`` when given (a view, e.g. the
    columns of a half); ``lost`` (int8 ``[M]``) with ``lost_rows`` as in the module doc."""
    m, k = a.shape
    if out is None:
        out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if m == 0:
        return out
    bm, bn, bk, warps, stages = tile_config(lambda bm: triton.cdiv(m, bm), n, k, a.dtype, a.device)
    dummy = out
    r = residual if residual is not None else dummy
    zz = z if z is not None else dummy
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _linear_kernel[grid](
        a, w, bias if bias is not None else dummy, out, zz, r, lost if lost is not None else dummy,
        m, n, k,
        a.stride(0), a.stride(1), w_strides[0], w_strides[1], out.stride(0), out.stride(1),
        zz.stride(0), zz.stride(1), r.stride(0), r.stride(1),
        float(scaling),
        EPI=epilogue, A_ACT=bool(a_activation), HAS_R=residual is not None, ACT=activation, LOST_ROWS=lost_rows,
        DOT_PREC=dot_precision(a.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
        num_warps=warps, num_stages=stages,
    )
    return out
