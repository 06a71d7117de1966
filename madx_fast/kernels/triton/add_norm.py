"""Residual add + LayerNorm in one kernel, forward and backward: MAD-X's ``LN(y + a)`` at every adapter.

Forward, per row (``x, r: [N, H]`` in the activation dtype, ``w, b: [H]`` any float dtype, read as float32):

    s    = round(x + r)                       (rounded to the activation dtype, as the eager add stores it)
    mu   = mean(s),   var = mean((s - mu)^2),   rstd = 1 / sqrt(var + eps)         (float32, two passes over
    xhat = (s - mu) * rstd                                                          the row held on chip)
    out  = xhat * w + b                       (written in the activation dtype)

``mu`` and ``rstd`` (float32, ``[2, N]`` in one tensor) are returned for the backward, which recomputes ``xhat``
from x and r instead of storing s (two reads of the inputs where storing s would cost a write and a read).

Backward, with ``dy = dL/dout`` and ``g = dy * w``: ``out_j = xhat_j w_j + b_j`` gives ``dw = sum_rows dy *
xhat`` and ``db = sum_rows dy``. Per row, ``xhat_j = (s_j - mu) rstd`` with ``d mu / d s_i = 1/H`` and
``d rstd / d s_i = -rstd^3 (s_i - mu) / H = -rstd^2 xhat_i / H``, so

    d xhat_j / d s_i = rstd (delta_ij - 1/H) - xhat_j rstd xhat_i / H
    ds_i = sum_j g_j d xhat_j / d s_i = rstd * (g_i - mean(g) - xhat_i * mean(g * xhat))

and ``dx = dr = ds`` (``s = x + r``), written once in the activation dtype. The weight-gradient sums are
deterministic: each program of the backward takes a fixed set of row blocks and writes its float32 partial
sums of ``dy * xhat`` and ``dy`` to its own row of ``[programs, H]``; the launcher adds the partials (no
atomics). With ``weight_grads=False`` (a frozen LayerNorm, MAD-X's backbone) no partials are kept or written.

A row is held whole on chip: ``H <= MAX_HIDDEN``. Padding lanes (``H`` to the next power of two) and rows past
``N`` are masked out of every sum, so a NaN or Inf in a row spreads over that row exactly as in
``torch.nn.functional.layer_norm`` and nowhere else.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import interpreting, sm_count

MAX_HIDDEN = 16384  # widest row held whole on chip (16 warps: 32 fp32 values a thread per live row tile)


@triton.jit
def _load_sum(X, R, rows, cols, mask, stride_xm, stride_rm):
    """``s = x + r`` of a [BLOCK_R, BLOCK_H] block as float32, rounded to the activation dtype (0 where masked)."""
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    r = tl.load(R + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
    return (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty).to(tl.float32)


@triton.jit
def _add_layer_norm_fwd_kernel(
    X, R, W, B, OUT, STATS,
    N, H, eps, stride_xm, stride_rm, stride_om,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    mask = rmask[:, None] & cmask[None, :]
    s = _load_sum(X, R, rows, cols, mask, stride_xm, stride_rm)
    mu = tl.sum(s, axis=1) / H
    centered = tl.where(mask, s - mu[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / H + eps)
    xhat = centered * rstd[:, None]
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    out = xhat * w[None, :] + b[None, :]
    tl.store(OUT + rows[:, None] * stride_om + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(STATS + rows, mu, mask=rmask)  # STATS: [2, N], the means then the 1/stds
    tl.store(STATS + N + rows, rstd, mask=rmask)


@triton.jit
def _add_layer_norm_bwd_kernel(
    DY, X, R, W, STATS, DS, PART,
    N, H, stride_dym, stride_xm, stride_rm, stride_dsm,
    WEIGHT_GRADS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_H,), dtype=tl.float32)
    db = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for block in range(pid, tl.cdiv(N, BLOCK_R), programs):
        rows = (block * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        rmask = rows < N
        mask = rmask[:, None] & cmask[None, :]
        s = _load_sum(X, R, rows, cols, mask, stride_xm, stride_rm)
        mu = tl.load(STATS + rows, mask=rmask, other=0.0)
        rstd = tl.load(STATS + N + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (s - mu[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = dy * w[None, :]
        mean_g = tl.sum(g, axis=1) / H
        mean_gx = tl.sum(g * xhat, axis=1) / H
        ds = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
        tl.store(DS + rows[:, None] * stride_dsm + cols[None, :], ds.to(DS.dtype.element_ty), mask=mask)
        if WEIGHT_GRADS:
            dw += tl.sum(dy * xhat, axis=0)
            db += tl.sum(dy, axis=0)
    if WEIGHT_GRADS:
        part = PART + pid.to(tl.int64) * H + cols  # PART: [2, programs, H], dw's partials then db's
        tl.store(part, dw, mask=cmask)
        tl.store(part + programs * H, db, mask=cmask)


def _plan(h: int) -> tuple[int, int, int]:
    return _plan_for(h, interpreting())


@functools.lru_cache(maxsize=None)
def _plan_for(h: int, interpreter: bool) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_H, num_warps)``: whole rows on chip, ~2048 elements a program on a GPU (two rows of
    XLM-R base's 768), many rows a program in the interpreter (whose cost is per program)."""
    if h > MAX_HIDDEN:
        raise ValueError(f"the fused add + LayerNorm holds a row on chip: hidden size {h} is over {MAX_HIDDEN}")
    block_h = triton.next_power_of_2(max(h, 1))
    if interpreter:
        return max(1, min(64, 8192 // block_h)), block_h, 4
    block_r = max(1, 2048 // block_h)
    return block_r, block_h, max(4, min(16, block_r * block_h // 256))


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def add_layer_norm_forward(x, r, weight, bias, eps: float):
    """``(out [N, H] in x.dtype, stats [2, N] float32)`` of ``LN(x + r) * weight + bias``: ``stats`` holds each
    row's mean, then its 1/std (one tensor: one allocation, host time per call)."""
    x, r = _unit_columns(x), _unit_columns(r)
    n, h = x.shape
    out = torch.empty((n, h), dtype=x.dtype, device=x.device)
    stats = torch.empty((2, n), dtype=torch.float32, device=x.device)
    if n == 0:
        return out, stats
    block_r, block_h, warps = _plan(h)
    _add_layer_norm_fwd_kernel[(triton.cdiv(n, block_r),)](
        x, r, weight.contiguous(), bias.contiguous(), out, stats, n, h, float(eps),
        x.stride(0), r.stride(0), out.stride(0), BLOCK_R=block_r, BLOCK_H=block_h, num_warps=warps,
    )
    return out, stats


def add_layer_norm_backward(dy, x, r, weight, stats, weight_grads: bool):
    """``(ds [N, H] in x.dtype, dwb [2, H] float32)``: ``ds`` is the gradient of both x and r, ``dwb`` holds
    ``dw`` then ``db`` (one tensor: one reduction of the partials; empty unless ``weight_grads``)."""
    dy, x, r = _unit_columns(dy), _unit_columns(x), _unit_columns(r)
    n, h = x.shape
    ds = torch.empty((n, h), dtype=x.dtype, device=x.device)
    block_r, block_h, warps = _plan(h)
    blocks = triton.cdiv(n, block_r)
    # with weight gradients: as many programs as stay resident together (about 3 a streaming multiprocessor at
    # the kernel's 64-80 registers and 8-16 warps), each looping over its row blocks into one partial row
    programs = max(1, min(blocks, 3 * sm_count(x.device))) if weight_grads else max(blocks, 1)
    part = torch.empty((2, programs, h) if weight_grads else (0,), dtype=torch.float32, device=x.device)
    if n > 0:
        _add_layer_norm_bwd_kernel[(programs,)](
            dy, x, r, weight.contiguous(), stats, ds, part, n, h,
            dy.stride(0), x.stride(0), r.stride(0), ds.stride(0),
            WEIGHT_GRADS=weight_grads, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=warps,
        )
    if not weight_grads:
        return ds, part
    return ds, part.sum(1) if n > 0 else part.new_zeros(2, h)
