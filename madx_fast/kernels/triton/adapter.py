"""Bottleneck adapter in Triton: ``y = r + s * (W_up act(W_down x + b_down) + b_up)``, on two routes.

Which route runs depends only on the bottleneck width ``d`` (``route(d)``, dispatched by the two launchers
right below the imports):

* ``"fused"`` (``d <= WIDE_BOTTLENECK`` = 128: MAD-X task adapters, d = 48 at H = 768): the whole adapter in
  ONE forward kernel and a TWO-kernel backward, below. The bottleneck is narrow enough to keep a token
  block's hidden activations in registers, so the N x H data is read and written the fewest times:
  forward 3 passes (read x, read r, write y; when r is x the second read of x mostly hits L2), backward 4.
* ``"gemm"`` (``d > 128``: MAD-X language adapters, d = 384): the one-kernel forward would re-read both weight
  matrices for every small token block, so the op runs as two tiled GEMMs with fused prologue / epilogue
  (``linear.fused_linear``: bias into z; activation on load, bias, scaling and residual into y), backward as
  two such GEMMs (da with the activation derivative; dx with the residual gradient) plus two token
  reductions for the weight and bias gradients (``weight_grad.tokens_reduce``).

The fused route's kernels. Forward: each program owns BLOCK_M tokens: it accumulates ``z = x W_down^T`` over
H chunks (the whole bottleneck, padded to a power of two, stays in registers), adds the bias, stores z (N x d,
small: the only tensor backward needs besides x and the weights), applies the activation and streams the up
projection, bias, scaling and residual out chunk by chunk. Backward:

1. ``_adapter_bwd_da_kernel`` (per token block, and bottleneck column chunk when a batch has too few blocks to
   fill the GPU): ``da = s * (dy W_up) * act'(z)``  [N, d]; partial db_down.
2. ``_adapter_bwd_dx_dw_kernel`` (per H tile x token range): for each token block of its range it loads
   dy, x, z, da once and produces ``dx = da W_down (+ dy when r is x)`` for its H tile, and accumulates
   ``dW_up[h] += s dy^T act(z)``, ``dW_down[:, h] += da^T x``, ``db_up[h] += s sum(dy)``.
   Weight gradients are fp32 per-range partials summed afterwards: deterministic, no atomics (both routes).

Derivation (per token row, a = act(z), dy upstream): y = r + s (a W_up^T + b_up), so
dr = dy; d(a) = s dy W_up; dz = d(a) * act'(z); dx = dz W_down; dW_up = s dy^T a; db_up = s sum dy;
dW_down = dz^T x; db_down = sum dz.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import (NUM_STAGES, chunk_width, dot_precision, interpreting, num_warps_for,
                      pow2_at_least, rows_per_program, sm_count, splits_for, tile_budget)
from .activations import activation_backward, apply_activation
from .linear import EPI_ADD, EPI_BIAS, EPI_DACT, EPI_RESIDUAL, fused_linear
from .tiles import load_bias, rows_times_weight_t
from .weight_grad import tokens_reduce

WIDE_BOTTLENECK = 128  # above this bottleneck width the "gemm" route runs (module docstring)


def route(d: int) -> str:
    """``"fused"`` (one forward kernel, two backward kernels) or ``"gemm"`` (tiled GEMMs with fused epilogues)."""
    return "gemm" if d > WIDE_BOTTLENECK else "fused"


def adapter_forward(x, residual, w_down, b_down, w_up, b_up, scaling, activation, *, block_m=None, block_h=None):
    """Launcher of the forward. ``x, residual: [N, H]`` (any strides); returns ``(y, z)``, z the pre-activation."""
    n, h = x.shape
    d = w_down.shape[0]
    if n == 0:
        return torch.empty((n, h), dtype=x.dtype, device=x.device), torch.empty((n, d), dtype=x.dtype, device=x.device)
    r = x if residual is None else residual
    # Weights in any float dtype: the kernels round them to x.dtype on load (no cast per call).
    wd, bd, wu, bu = (t.contiguous() for t in (w_down, b_down, w_up, b_up))
    if route(d) == "gemm":
        return _gemm_forward(x, r, wd, bd, wu, bu, scaling, activation)
    return _fused_forward(x, r, residual is not None, wd, bd, wu, bu, scaling, activation, block_m, block_h)


def adapter_backward(dy, x, z, w_down, w_up, scaling, activation, residual_is_input,
                     *, block_m=None, block_h=None, splits=None):
    """Launcher of the backward: ``(dx, dw_down, db_down, dw_up, db_up)``, weight grads in fp32."""
    n, h = x.shape
    d = w_down.shape[0]
    if n == 0:
        f32 = dict(dtype=torch.float32, device=x.device)
        return (torch.empty((n, h), dtype=x.dtype, device=x.device), torch.zeros((d, h), **f32),
                torch.zeros((d,), **f32), torch.zeros((h, d), **f32), torch.zeros((h,), **f32))
    w_down, w_up = w_down.contiguous(), w_up.contiguous()
    if route(d) == "gemm":
        return _gemm_backward(dy, x, z, w_down, w_up, scaling, activation, residual_is_input, splits)
    return _fused_backward(dy, x, z, w_down, w_up, scaling, activation, residual_is_input, block_m, block_h, splits)


# ----------------------------------------------------------------------------------------------------------
# the "gemm" route
# ----------------------------------------------------------------------------------------------------------
def _gemm_forward(x, r, wd, bd, wu, bu, scaling, activation):
    h, d = x.shape[1], wd.shape[0]
    z = fused_linear(x, wd, (h, 1), d, EPI_BIAS, bias=bd)
    y = fused_linear(z, wu, (d, 1), h, EPI_RESIDUAL, bias=bu, residual=r, scaling=scaling, activation=activation,
                     a_activation=True)
    return y, z


def _gemm_backward(dy, x, z, w_down, w_up, scaling, activation, residual_is_input, splits):
    h, d = x.shape[1], w_down.shape[0]
    da = fused_linear(dy, w_up, (1, d), d, EPI_DACT, z=z, scaling=scaling, activation=activation)
    dx = fused_linear(da, w_down, (1, h), h, EPI_ADD, residual=dy if residual_is_input else None)
    dwu, dbu = tokens_reduce(dy, z, activation, splits=splits)
    dwd, dbd = tokens_reduce(da, x, splits=splits)
    return dx, dwd, dbd, scaling * dwu, scaling * dbu


# ----------------------------------------------------------------------------------------------------------
# the "fused" route
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _adapter_fwd_kernel(
    X, R, WD, BD, WU, BU, Y, Z,
    N, H, D, cols_per_program,
    stride_xm, stride_xh, stride_rm, stride_rh, stride_ym, stride_yh,
    scaling,
    ACT: tl.constexpr, HAS_R: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program (token block, column range): every column range of a block computes z (x is read again from
    # L2); the first stores it. More than one range only when a batch has too few blocks to fill the GPU.
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < N
    dcol = tl.arange(0, BLOCK_D)
    dmask = dcol < D
    dt = X.dtype.element_ty

    # z = x W_down^T + b_down, accumulated over H in fp32.
    acc = rows_times_weight_t(X, stride_xm, stride_xh, rows, rmask, WD, H, 1, H, D,
                              DOT_PREC, BLOCK_M, BLOCK_H, BLOCK_D)
    bd = load_bias(BD, dcol, dmask, dt)
    z = (acc + bd[None, :]).to(dt)
    if pid_c == 0:
        tl.store(Z + rows[:, None] * D + dcol[None, :], z, mask=rmask[:, None] & dmask[None, :])
    a = apply_activation(z.to(tl.float32), ACT).to(dt)

    # y = r + s * (a W_up^T + b_up), one H chunk of the program's column range at a time.
    c0 = pid_c * cols_per_program
    c1 = tl.minimum(c0 + cols_per_program, H)
    for h0 in range(c0, c1, BLOCK_H):
        hc = h0 + tl.arange(0, BLOCK_H)
        hmask = hc < c1
        m2 = rmask[:, None] & hmask[None, :]
        wu_t = tl.load(WU + hc[None, :] * D + dcol[:, None], mask=hmask[None, :] & dmask[:, None], other=0.0)
        up = tl.dot(a, wu_t.to(dt), input_precision=DOT_PREC)
        bu = load_bias(BU, hc, hmask, dt)
        if HAS_R:
            r = tl.load(R + rows[:, None] * stride_rm + hc[None, :] * stride_rh, mask=m2, other=0.0)
        else:
            r = tl.load(X + rows[:, None] * stride_xm + hc[None, :] * stride_xh, mask=m2, other=0.0)
        y = r.to(tl.float32) + scaling * (up + bu[None, :])
        tl.store(Y + rows[:, None] * stride_ym + hc[None, :] * stride_yh, y.to(dt), mask=m2)


@triton.jit
def _adapter_bwd_da_kernel(
    DY, Z, WU, DA, DBD_PART,
    N, H, D,
    stride_dym, stride_dyh,
    scaling,
    ACT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program (token block, bottleneck column chunk of BLOCK_D): more than one chunk only when a batch has too
    # few token blocks to fill the GPU (each chunk's program reads the block's dy again, from L2).
    pid = tl.program_id(0)
    d0 = tl.program_id(1) * BLOCK_D
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < N
    dcol = d0 + tl.arange(0, BLOCK_D)
    dmask = dcol < D
    dt = DY.dtype.element_ty

    # g = dy W_up[:, chunk]: W_up [H, D] read as the transpose of a [D, H] weight, from the chunk's column.
    g = rows_times_weight_t(DY, stride_dym, stride_dyh, rows, rmask, WU + d0, 1, D, H, D - d0,
                            DOT_PREC, BLOCK_M, BLOCK_H, BLOCK_D)
    m2 = rmask[:, None] & dmask[None, :]
    z = tl.load(Z + rows[:, None] * D + dcol[None, :], mask=m2, other=0.0).to(tl.float32)
    # (padding rows masked: a NaN/Inf weight would give them NaN, which the column sum below would pick up)
    da = tl.where(m2, activation_backward(scaling * g, z, ACT), 0.0).to(dt)
    tl.store(DA + rows[:, None] * D + dcol[None, :], da, mask=m2)
    tl.store(DBD_PART + pid * D + dcol, tl.sum(da.to(tl.float32), axis=0), mask=dmask)


@triton.jit
def _adapter_bwd_dx_dw_kernel(
    DY, X, Z, DA, WD, DX, DWU_PART, DWD_PART, DBU_PART,
    N, H, D, rows_per_split,
    stride_dym, stride_dyh, stride_xm, stride_xh, stride_dxm, stride_dxh,
    scaling,
    ACT: tl.constexpr, RESIDUAL_IS_INPUT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    hc = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = hc < H
    dcol = tl.arange(0, BLOCK_D)
    dmask = dcol < D
    dt = DY.dtype.element_ty

    wd = tl.load(WD + dcol[:, None] * H + hc[None, :], mask=dmask[:, None] & hmask[None, :], other=0.0).to(dt)
    dwu = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    dwd = tl.zeros((BLOCK_D, BLOCK_H), dtype=tl.float32)
    dbu = tl.zeros((BLOCK_H,), dtype=tl.float32)
    start = pid_s * rows_per_split
    stop = tl.minimum(start + rows_per_split, N)
    for m0 in range(start, stop, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows < stop
        mh = rmask[:, None] & hmask[None, :]
        md = rmask[:, None] & dmask[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dym + hc[None, :] * stride_dyh, mask=mh, other=0.0)
        x = tl.load(X + rows[:, None] * stride_xm + hc[None, :] * stride_xh, mask=mh, other=0.0)
        z = tl.load(Z + rows[:, None] * D + dcol[None, :], mask=md, other=0.0).to(tl.float32)
        a = tl.where(md, apply_activation(z, ACT), 0.0).to(dt)
        da = tl.load(DA + rows[:, None] * D + dcol[None, :], mask=md, other=0.0)
        dx = tl.dot(da, wd, input_precision=DOT_PREC)
        if RESIDUAL_IS_INPUT:
            dx += dy.to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dxm + hc[None, :] * stride_dxh, dx.to(dt), mask=mh)
        dwu = tl.dot(tl.trans(dy), a, dwu, input_precision=DOT_PREC)
        dwd = tl.dot(tl.trans(da), x, dwd, input_precision=DOT_PREC)
        dbu += tl.sum(dy.to(tl.float32), axis=0)
    base = pid_s.to(tl.int64) * H * D
    tl.store(DWU_PART + base + hc[:, None] * D + dcol[None, :], scaling * dwu,
             mask=hmask[:, None] & dmask[None, :])
    tl.store(DWD_PART + base + dcol[:, None] * H + hc[None, :], dwd, mask=dmask[:, None] & hmask[None, :])
    tl.store(DBU_PART + pid_s.to(tl.int64) * H + hc, scaling * dbu, mask=hmask)


def _forward_config(d, dtype):
    bd = pow2_at_least(d)
    return rows_per_program(bd, dtype), chunk_width(bd, dtype), bd


def _fused_forward(x, r, has_r, wd, bd_, wu, bu, scaling, activation, block_m, block_h):
    n, h = x.shape
    d = wd.shape[0]
    y = torch.empty((n, h), dtype=x.dtype, device=x.device)
    z = torch.empty((n, d), dtype=x.dtype, device=x.device)
    bm, bh, bd = _forward_config(d, x.dtype)
    bm, bh = block_m or bm, block_h or bh
    blocks = triton.cdiv(n, bm)
    # Small batches: split the output columns so that about one wave of programs covers the SMs.
    col_split = max(1, min(4, sm_count(x.device) // blocks, triton.cdiv(h, 4 * bh)))
    cols = triton.cdiv(triton.cdiv(h, col_split), bh) * bh
    _adapter_fwd_kernel[(blocks, triton.cdiv(h, cols))](
        x, r, wd, bd_, wu, bu, y, z,
        n, h, d, cols,
        x.stride(0), x.stride(1), r.stride(0), r.stride(1), y.stride(0), y.stride(1),
        float(scaling),
        ACT=activation, HAS_R=has_r, DOT_PREC=dot_precision(x.dtype),
        BLOCK_M=bm, BLOCK_H=bh, BLOCK_D=bd, num_warps=num_warps_for(bm * bd), num_stages=NUM_STAGES,
    )
    return y, z


def _da_chunk(blocks, d, padded_d, device):
    """Bottleneck columns per program of ``_adapter_bwd_da_kernel``: the whole padded bottleneck, halved (down
    to 16, tl.dot's smallest operand) while the programs still fit in one wave on the GPU's SMs (d=48 at 4096
    tokens: 64 token blocks x 2 chunks of 32 = 128 programs on 132 SMs, instead of 64)."""
    chunk = padded_d
    while chunk > 16 and blocks * triton.cdiv(d, chunk // 2) <= sm_count(device):
        chunk //= 2
    return chunk


def _fused_backward(dy, x, z, w_down, w_up, scaling, activation, residual_is_input, block_m, block_h, splits):
    n, h = x.shape
    d = w_down.shape[0]
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    dx = torch.empty((n, h), dtype=x.dtype, device=dev)
    bm, bh, bd = _forward_config(d, x.dtype)
    bm, bh = block_m or bm, block_h or bh
    prec = dot_precision(x.dtype)

    blocks = triton.cdiv(n, bm)
    da = torch.empty((n, d), dtype=x.dtype, device=dev)
    dbd_part = torch.empty((blocks, d), **f32)
    chunk = _da_chunk(blocks, d, bd, dev)
    _adapter_bwd_da_kernel[(blocks, triton.cdiv(d, chunk))](
        dy, z, w_up, da, dbd_part, n, h, d, dy.stride(0), dy.stride(1), float(scaling),
        ACT=activation, DOT_PREC=prec, BLOCK_M=bm, BLOCK_H=bh, BLOCK_D=chunk,
        num_warps=num_warps_for(bm * chunk), num_stages=NUM_STAGES,
    )

    # Second kernel: H tiles narrow enough that the two [BLOCK_H, BLOCK_D] fp32 accumulators fit on chip.
    bh2 = block_h or (128 if interpreting() else max(16, min(64, tile_budget(x.dtype) // (2 * bd))))
    h_tiles = triton.cdiv(h, bh2)
    n_split = splits or splits_for(n, bm, h_tiles, dev)
    rows_per_split = triton.cdiv(blocks, n_split) * bm
    n_split = triton.cdiv(n, rows_per_split)
    dwu_part = torch.empty((n_split, h, d), **f32)
    dwd_part = torch.empty((n_split, d, h), **f32)
    dbu_part = torch.empty((n_split, h), **f32)
    _adapter_bwd_dx_dw_kernel[(h_tiles, n_split)](
        dy, x, z, da, w_down, dx, dwu_part, dwd_part, dbu_part,
        n, h, d, rows_per_split,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), dx.stride(0), dx.stride(1),
        float(scaling),
        ACT=activation, RESIDUAL_IS_INPUT=bool(residual_is_input), DOT_PREC=prec,
        BLOCK_M=bm, BLOCK_H=bh2, BLOCK_D=bd, num_warps=num_warps_for(bh2 * bd * 2), num_stages=NUM_STAGES,
    )
    return dx, dwd_part.sum(0), dbd_part.sum(0), dwu_part.sum(0), dbu_part.sum(0)
