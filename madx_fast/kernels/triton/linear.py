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

``A_ACT`` applies the activation to A on load (the up projection reads z and never stores act(z)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import NUM_STAGES, dot_precision, interpreting
from .activations import activation_backward, apply_activation
from .tiles import load_bias

EPI_BIAS, EPI_RESIDUAL, EPI_DACT, EPI_ADD = 0, 1, 2, 3


@triton.jit
def linear_tile(
    A, W, BIAS, OUT, Z, R, rows, rmask, cols, cmask, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on, stride_zm, stride_zn, stride_rm, stride_rn,
    scaling,
    EPI: tl.constexpr, A_ACT: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` output tile ``epilogue(act?(A[rows]) @ W[cols]^T)``: ``rows`` (int64) and
    ``cols`` are the tile's token and output-column indices. Shared by ``_linear_kernel`` and the grouped
    (per-row weights) kernel in ``grouped.py``, which differ only in how a program finds its tile."""
    dt = OUT.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        kmask = kc < K
        a_mask = rmask[:, None] & kmask[None, :]
        a = tl.load(A + rows[:, None] * stride_am + kc[None, :] * stride_ak, mask=a_mask, other=0.0)
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
    else:
        out = acc
        if HAS_R:
            out += tl.load(R + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=m2, other=0.0).to(
                tl.float32)
    tl.store(OUT + rows[:, None] * stride_om + cols[None, :] * stride_on, out.to(dt), mask=m2)


@triton.jit
def _linear_kernel(
    A, W, BIAS, OUT, Z, R,
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on, stride_zm, stride_zn, stride_rm, stride_rn,
    scaling,
    EPI: tl.constexpr, A_ACT: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
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
    linear_tile(A, W, BIAS, OUT, Z, R, rows, rows < M, cols, cols < N, K,
                stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on, stride_zm, stride_zn,
                stride_rm, stride_rn, scaling,
                EPI, A_ACT, HAS_R, ACT, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)


def fused_linear(a, w, w_strides, n, epilogue, *, bias=None, residual=None, z=None, scaling=1.0, activation=0,
                 a_activation=False, out_dtype=None):
    """``epilogue(act?(a) @ W^T)`` as ``[M, n]`` in ``out_dtype`` (default a's dtype); see the module doc."""
    m, k = a.shape
    out = torch.empty((m, n), dtype=out_dtype or a.dtype, device=a.device)
    if m == 0:
        return out
    if interpreting():
        bm, bn, bk, warps = 128, 128, 128, 4
    elif a.dtype == torch.float32:
        bm, bn, bk, warps = 64, 64, 32, 4
    else:
        bm, bn, bk, warps = 128, 128, 64, 8
    dummy = out
    r = residual if residual is not None else dummy
    zz = z if z is not None else dummy
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _linear_kernel[grid](
        a, w, bias if bias is not None else dummy, out, zz, r,
        m, n, k,
        a.stride(0), a.stride(1), w_strides[0], w_strides[1], out.stride(0), out.stride(1),
        zz.stride(0), zz.stride(1), r.stride(0), r.stride(1),
        float(scaling),
        EPI=epilogue, A_ACT=bool(a_activation), HAS_R=residual is not None, ACT=activation,
        DOT_PREC=dot_precision(a.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
        num_warps=warps, num_stages=NUM_STAGES if a.dtype == torch.float32 else 3,
    )
    return out
