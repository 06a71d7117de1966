"""Averaged adapters in Triton (AdapterHub's ``Average``): every token through K adapters whose outputs are
combined with coefficients ``mix``, the K adapters in ONE launch per product, forward and backward.

The grouped kernels of ``grouped.py`` send each row through one of G adapters; here it is the other way round:
every row goes through all K adapters of its ensemble and their outputs are summed with weights. The K
adapters side by side are one adapter of bottleneck ``K*d`` whose hidden activations are scaled per adapter:

    z   = x [W_down[0]; ...; W_down[K-1]]^T + b_down          [N, K*d]   one GEMM (``fused_linear`` /
                                                                          ``grouped_linear``: K*d columns)
    y   = c r + sum_k m_k s (act(z_k) W_up[k]^T + b_up[k])    [N, H]     ``_average_up_kernel``: loops over the K adapters'
                                                                          slices of z, m_k s applied to each
                                                                          activation tile as it loads; the
                                                                          bias sum and c r in the epilogue
    dz_k = m_k s (dy W_up[k]) * act'(z_k)                     [N, K*d]   ``_average_dz_kernel``: programs over
                                                                          (token block, adapter, column block),
                                                                          m_k s in the epilogue
    dx  = dz [W_down[0]; ...]  (+ c dy when r is x)           [N, H]     ``_average_dx_kernel``: one GEMM over K*d;
    dr  = c dy                                                            c dy in the epilogue, dr beside it

with ``c = sum_k m_k`` (``ops/average.py`` derives these). Weight gradients are token reductions over all K
adapters at once (``weight_grad.tokens_reduce`` on the ``[N, K*d]`` tensors, or per group
``grouped.grouped_tokens_reduce``), scaled per adapter afterwards (``[K, d, H]``-sized work). The gradient of
the coefficients needs ``<dy W_up[k], act(z_k)>`` per adapter: ``_average_dz_kernel`` has ``dy W_up[k]`` in its
accumulator and writes one partial sum per program (``MIX_GRAD``); ``<dy, r>`` and the bias term are one pass
over dy outside the kernels, only when the coefficients need a gradient (test-time ensembling).

Per-row ensembles (``groups``): as in ``grouped.py``, programs never cross a sequence row (token blocks are
indexed per row of ``L`` tokens) and read their row's group once: weights ``[G, K, ...]`` and ``mix [G, K]``
are offset by ``group``. Without groups the batch is one "row" of ``N`` tokens and group 0. Grid sizes depend
on shapes only: nothing reads the group ids on the host.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._launch import NUM_STAGES, dot_precision, interpreting, pow2_at_least
from .activations import activation_backward, apply_activation
from .grouped import grouped_linear, grouped_tokens_reduce, row_length, row_segments
from .linear import EPI_BIAS, fused_linear
from .tiles import load_bias
from .weight_grad import tokens_reduce


# --------------------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _tile(pid, ROWS, L, N_COLS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of a program in the grouped launch order (GROUP_M token blocks share a column block
    while it is in L2); token blocks never cross a sequence row: ``ROWS * cdiv(L, BLOCK_M)`` of them."""
    grid_m = ROWS * tl.cdiv(L, BLOCK_M)
    grid_n = tl.cdiv(N_COLS, BLOCK_N)
    band = pid // (GROUP_M * grid_n)
    first_m = band * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m
    return pid_m, pid_n


@triton.jit
def _tokens(pid_m, L, GROUPS, NUM_GROUPS, HAS_GROUPS: tl.constexpr, BLOCK_M: tl.constexpr):
    """``(tokens int64, valid, group int64)`` of token block ``pid_m`` (within one sequence row of L tokens);
    the group id is clamped into [0, G) so that a bad id can never address memory outside the weights."""
    blocks_per_row = tl.cdiv(L, BLOCK_M)
    row = pid_m // blocks_per_row
    pos = (pid_m - row * blocks_per_row) * BLOCK_M + tl.arange(0, BLOCK_M)
    tokens = row.to(tl.int64) * L + pos
    if HAS_GROUPS:
        g = tl.load(GROUPS + row).to(tl.int64)
        g = tl.minimum(tl.maximum(g, 0), NUM_GROUPS - 1)
    else:
        g = row.to(tl.int64) * 0
    return tokens, pos < L, g


# --------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _average_up_kernel(
    Z, WU, BU, MIX, R, OUT, GROUPS,
    ROWS, L, H, D, K, NUM_GROUPS,
    stride_zm, stride_rm, stride_rh, stride_om, stride_oh,
    scaling,
    ACT: tl.constexpr, HAS_GROUPS: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``y = c r + sum_k m_k s (act(z_k) W_up[k]^T + b_up[k])`` for one [BLOCK_M, BLOCK_N] tile."""
    pid_m, pid_n = _tile(tl.program_id(0), ROWS, L, H, BLOCK_M, BLOCK_N, GROUP_M)
    tokens, tmask, g = _tokens(pid_m, L, GROUPS, NUM_GROUPS, HAS_GROUPS, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < H
    dt = OUT.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(0, K):
        coef = tl.load(MIX + g * K + k) * scaling
        w_base = WU + (g * K + k) * H * D
        for j0 in range(0, D, BLOCK_K):
            jc = j0 + tl.arange(0, BLOCK_K)
            jmask = jc < D
            a_mask = tmask[:, None] & jmask[None, :]
            z = tl.load(Z + tokens[:, None] * stride_zm + (k * D + jc)[None, :], mask=a_mask, other=0.0)
            a = tl.where(a_mask, apply_activation(z.to(tl.float32), ACT) * coef, 0.0)
            w = tl.load(w_base + cols[None, :] * D + jc[:, None], mask=cmask[None, :] & jmask[:, None], other=0.0)
            acc = tl.dot(a.to(dt), w.to(dt), acc, input_precision=DOT_PREC)
        bias += coef * load_bias(BU + (g * K + k) * H, cols, cmask, dt)
    m2 = tmask[:, None] & cmask[None, :]
    kk = tl.arange(0, BLOCK_KK)
    total = tl.sum(tl.load(MIX + g * K + kk, mask=kk < K, other=0.0), axis=0)
    r = tl.load(R + tokens[:, None] * stride_rm + cols[None, :] * stride_rh, mask=m2, other=0.0)
    out = total * r.to(tl.float32) + acc + bias[None, :]
    tl.store(OUT + tokens[:, None] * stride_om + cols[None, :] * stride_oh, out.to(dt), mask=m2)


@triton.jit
def _average_dz_kernel(
    DY, WU, Z, MIX, DZ, PART, GROUPS,
    ROWS, L, H, D, K, NUM_GROUPS, N_JB,
    stride_dym, stride_dyh, stride_zm,
    scaling,
    ACT: tl.constexpr, HAS_GROUPS: tl.constexpr, MIX_GRAD: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``dz_k = m_k s (dy W_up[k]) * act'(z_k)`` for the column block ``jb`` of adapter ``k``; with MIX_GRAD
    also the program's partial ``sum (dy W_up[k]) * act(z_k)`` (masked lanes excluded)."""
    pid_m, pid_n = _tile(tl.program_id(0), ROWS, L, K * N_JB * BLOCK_N, BLOCK_M, BLOCK_N, GROUP_M)
    k = pid_n // N_JB
    jb = pid_n - k * N_JB
    tokens, tmask, g = _tokens(pid_m, L, GROUPS, NUM_GROUPS, HAS_GROUPS, BLOCK_M)
    jc = jb * BLOCK_N + tl.arange(0, BLOCK_N)
    jmask = jc < D
    dt = DY.dtype.element_ty
    w_base = WU + (g * K + k) * H * D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_K):
        hc = h0 + tl.arange(0, BLOCK_K)
        hmask = hc < H
        a = tl.load(DY + tokens[:, None] * stride_dym + hc[None, :] * stride_dyh,
                    mask=tmask[:, None] & hmask[None, :], other=0.0)
        w = tl.load(w_base + hc[:, None] * D + jc[None, :], mask=hmask[:, None] & jmask[None, :], other=0.0)
        acc = tl.dot(a, w.to(dt), acc, input_precision=DOT_PREC)
    m2 = tmask[:, None] & jmask[None, :]
    z = tl.load(Z + tokens[:, None] * stride_zm + (k * D + jc)[None, :], mask=m2, other=0.0).to(tl.float32)
    coef = tl.load(MIX + g * K + k) * scaling
    dz = tl.where(m2, activation_backward(coef * acc, z, ACT), 0.0)
    tl.store(DZ + tokens[:, None] * stride_zm + (k * D + jc)[None, :], dz.to(dt), mask=m2)
    if MIX_GRAD:
        part = tl.sum(tl.sum(tl.where(m2, acc * apply_activation(z, ACT), 0.0), axis=1), axis=0)
        tl.store(PART + pid_m.to(tl.int64) * K * N_JB + pid_n, part)


@triton.jit
def _average_dx_kernel(
    DZ, WD, DY, MIX, DX, DR, GROUPS,
    ROWS, L, H, KD, K, NUM_GROUPS,
    stride_zm, stride_dym, stride_dyh, stride_dxm, stride_dxh, stride_drm, stride_drh,
    HAS_GROUPS: tl.constexpr, RESIDUAL_IS_INPUT: tl.constexpr, WRITE_DR: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_KK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``dx = dz W_down`` over all K adapters' ``K*d`` columns, ``+ c dy`` when the residual is x; with WRITE_DR
    also ``dr = c dy`` (c: the sum of the row's coefficients)."""
    pid_m, pid_n = _tile(tl.program_id(0), ROWS, L, H, BLOCK_M, BLOCK_N, GROUP_M)
    tokens, tmask, g = _tokens(pid_m, L, GROUPS, NUM_GROUPS, HAS_GROUPS, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < H
    dt = DX.dtype.element_ty
    w_base = WD + g * KD * H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, KD, BLOCK_K):
        cc = c0 + tl.arange(0, BLOCK_K)
        ccmask = cc < KD
        a = tl.load(DZ + tokens[:, None] * stride_zm + cc[None, :], mask=tmask[:, None] & ccmask[None, :], other=0.0)
        w = tl.load(w_base + cc[:, None] * H + cols[None, :], mask=ccmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, w.to(dt), acc, input_precision=DOT_PREC)
    m2 = tmask[:, None] & cmask[None, :]
    if RESIDUAL_IS_INPUT or WRITE_DR:
        kk = tl.arange(0, BLOCK_KK)
        total = tl.sum(tl.load(MIX + g * K + kk, mask=kk < K, other=0.0), axis=0)
        dy = tl.load(DY + tokens[:, None] * stride_dym + cols[None, :] * stride_dyh, mask=m2, other=0.0)
        dr = total * dy.to(tl.float32)
        if RESIDUAL_IS_INPUT:
            acc += dr
        else:
            tl.store(DR + tokens[:, None] * stride_drm + cols[None, :] * stride_drh, dr.to(dt), mask=m2)
    tl.store(DX + tokens[:, None] * stride_dxm + cols[None, :] * stride_dxh, acc.to(dt), mask=m2)


# --------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------
def _layout(n: int, groups):
    """``(rows, tokens per row, has_groups)``: B sequence rows with groups, else the batch as one row."""
    if groups is None:
        return 1, n, False
    return groups.shape[0], row_length(n, groups), True


def _config(length: int, dtype: torch.dtype, n_cols: int, k_dim: int):
    """``(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)`` of the three kernels: ``grouped.grouped_linear``'s tiles,
    the token block no longer than a row, at most 64 output columns at 16-bit (the up kernel keeps a bias
    vector and the coefficients live beside its accumulator)."""
    if interpreting():
        bm, bn, bk, warps, stages = 128, 128, 128, 4, NUM_STAGES
    elif dtype == torch.float32:
        bm, bn, bk, warps, stages = 64, 64, 32, 4, NUM_STAGES
    else:
        bm, bn, bk, warps, stages = 128, 64, 64, 8, 3
    bm, bn = min(bm, pow2_at_least(length)), min(bn, pow2_at_least(n_cols))
    if bm * bn <= 64 * 64:  # small tiles (short rows, narrow outputs)
        warps = 4
    return bm, bn, min(bk, pow2_at_least(k_dim)), warps, stages


def _flat(groups, mix, *weights):
    """Weights, biases and coefficients as ``[G, K, ...]`` (G = 1 without groups), contiguous."""
    lead = 0 if groups is not None else 1
    return [(t.unsqueeze(0) if lead else t).contiguous() for t in (mix.float(), *weights)]


def average_adapter_forward(x, residual, groups, mix, w_down, b_down, w_up, b_up, scaling, activation):
    """``(y [N, H], z [N, K*d])`` for ``x [N, H]``; weights ``[K, ...]`` (``[G, K, ...]`` with ``groups [B]``)."""
    n, h = x.shape
    k, d = w_down.shape[-3], w_down.shape[-2]
    if n == 0:
        return x.new_empty((0, h)), x.new_empty((0, k * d))
    mix, wd, bd, wu, bu = _flat(groups, mix, w_down, b_down, w_up, b_up)
    num_groups = wd.shape[0]
    if groups is None:
        z = fused_linear(x, wd.view(k * d, h), (h, 1), k * d, EPI_BIAS, bias=bd.view(k * d))
    else:
        z = grouped_linear(x, wd.view(num_groups, k * d, h), (h, 1), k * d, EPI_BIAS, groups,
                           bias=bd.view(num_groups, k * d))
    r = x if residual is None else residual
    y = torch.empty_like(x)
    rows, length, has_groups = _layout(n, groups)
    bm, bn, bk, warps, stages = _config(length, x.dtype, h, d)
    grid = (rows * triton.cdiv(length, bm) * triton.cdiv(h, bn),)
    _average_up_kernel[grid](
        z, wu, bu, mix, r, y, groups if has_groups else mix,
        rows, length, h, d, k, num_groups,
        z.stride(0), r.stride(0), r.stride(1), y.stride(0), y.stride(1), float(scaling),
        ACT=activation, HAS_GROUPS=has_groups, DOT_PREC=dot_precision(x.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_KK=pow2_at_least(k, 1), GROUP_M=8, num_warps=warps,
        num_stages=stages,
    )
    return y, z


def _input_grads(dy, z, groups, mix, wd, wu, scaling, activation, residual_is_input, mix_grad):
    """``(dz [N, K*d], dx, dr or empty, partials [token blocks, K, column blocks] or None)``."""
    n, h = dy.shape
    num_groups, k, d = wd.shape[0], wd.shape[1], wd.shape[2]
    rows, length, has_groups = _layout(n, groups)
    ids = groups if has_groups else mix
    bm, bn, bk, warps, stages = _config(length, dy.dtype, d, h)
    blocks, n_jb = rows * triton.cdiv(length, bm), triton.cdiv(d, bn)
    dz = torch.empty_like(z)
    part = torch.empty((blocks, k, n_jb), dtype=torch.float32, device=dy.device) if mix_grad else dz
    _average_dz_kernel[(blocks * k * n_jb,)](
        dy, wu, z, mix, dz, part, ids, rows, length, h, d, k, num_groups, n_jb,
        dy.stride(0), dy.stride(1), z.stride(0), float(scaling),
        ACT=activation, HAS_GROUPS=has_groups, MIX_GRAD=bool(mix_grad), DOT_PREC=dot_precision(dy.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
    )
    dx = torch.empty_like(dy)
    dr = dx.new_empty((0,)) if residual_is_input else torch.empty_like(dy)
    bm, bn, bk, warps, stages = _config(length, dy.dtype, h, k * d)
    drs = (dr.stride(0), dr.stride(1)) if dr.dim() == 2 else (0, 0)
    _average_dx_kernel[(rows * triton.cdiv(length, bm) * triton.cdiv(h, bn),)](
        dz, wd, dy, mix, dx, dr, ids, rows, length, h, k * d, k, num_groups,
        dz.stride(0), dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1), *drs,
        HAS_GROUPS=has_groups, RESIDUAL_IS_INPUT=bool(residual_is_input), WRITE_DR=not residual_is_input,
        DOT_PREC=dot_precision(dy.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_KK=pow2_at_least(k, 1),
        GROUP_M=8, num_warps=warps, num_stages=stages,
    )
    return dz, dx, dr, (part.view(rows, -1, k, n_jb) if mix_grad else None)


def _per_group(values: torch.Tensor, groups, num_groups: int) -> torch.Tensor:
    """Per-row ``values [B, K]`` summed over the rows of each group: ``[G, K]``, selected (not multiplied: a NaN
    of one group's rows stays in its group) and summed without atomics; without groups the one row is group 0."""
    if groups is None:
        return values
    mine = F.one_hot(groups.long().clamp(0, num_groups - 1), num_groups).bool()  # [B, G]
    return torch.where(mine[:, :, None], values[:, None, :], 0.0).sum(0)


def average_adapter_backward(dy, x, z, residual, groups, mix, w_down, w_up, b_up, scaling, activation,
                             residual_is_input, weight_grads, mix_grad, *, splits=None):
    """``(dx, dr, dw_down, db_down, dw_up, db_up, dmix)`` (module docstring); weight and mix grads in fp32
    shaped as the inputs, empty tensors when not asked for; ``dr`` empty when the residual is x."""
    n, h = x.shape
    out_shapes = (w_down.shape, w_down.shape[:-1], w_up.shape, w_up.shape[:-1], mix.shape)
    f32 = dict(dtype=torch.float32, device=x.device)
    wanted = (weight_grads,) * 4 + (mix_grad,)
    if n == 0:
        grads = [torch.zeros(s, **f32) if w else torch.empty((0,), **f32) for s, w in zip(out_shapes, wanted)]
        return (x.new_empty((0, h)), x.new_empty((0,) if residual_is_input else (0, h)), *grads)
    mix32, wd, wu, bu = _flat(groups, mix, w_down, w_up, b_up)
    num_groups, k, d = wd.shape[0], wd.shape[1], wd.shape[2]
    dz, dx, dr, part = _input_grads(dy, z, groups, mix32, wd, wu, scaling, activation, residual_is_input, mix_grad)
    grads = [torch.empty((0,), **f32) for _ in range(5)]
    rows, length, _ = _layout(n, groups)
    if weight_grads:
        if groups is None:
            c_up, s_up = (t[None] for t in tokens_reduce(dy, z, activation, splits=splits))
            c_down, s_down = (t[None] for t in tokens_reduce(dz, x, splits=splits))
        else:
            segments = row_segments(groups, num_groups)
            c_up, s_up = grouped_tokens_reduce(dy, z, segments, num_groups, length, activation, splits=splits)
            c_down, s_down = grouped_tokens_reduce(dz, x, segments, num_groups, length, splits=splits)
        coef = mix32 * scaling  # [G, K]
        grads[0] = c_down.view(num_groups, k, d, h)
        grads[1] = s_down.view(num_groups, k, d)
        grads[2] = (c_up.view(num_groups, h, k, d).permute(0, 2, 1, 3) * coef[:, :, None, None]).contiguous()
        grads[3] = s_up[:, None, :] * coef[:, :, None]
    if mix_grad:
        grads[4] = _mix_grad(dy, x if residual is None else residual, groups, bu, part, scaling, rows, num_groups)
    if groups is None:
        grads = [g[0] if g.numel() else g for g in grads]
    return (dx, dr, *[g.reshape(s) if g.numel() else g for g, s in zip(grads, out_shapes)])


def _mix_grad(dy, r, groups, bu, part, scaling, rows: int, num_groups: int) -> torch.Tensor:
    """``dmix [G, K] = sum over a group's rows of <dy, r> + s (<dy W_up[k], act(z_k)> + <sum dy, b_up[k]>)``:
    the kernel partials reduced per row, the two dy terms as one pass over dy (and r) per row."""
    dy_rows = dy.reshape(rows, -1, dy.shape[1]).float()
    dot_r = (dy_rows * r.reshape(rows, -1, r.shape[1]).float()).sum((1, 2))  # [B]
    hidden = part.sum((1, 3))  # [B, K]
    g_ids = groups.long().clamp(0, num_groups - 1) if groups is not None else torch.zeros(
        1, dtype=torch.long, device=dy.device)
    bias = (dy_rows.sum(1)[:, None, :] * bu.float()[g_ids]).sum(-1)  # [B, K]
    per_row = dot_r[:, None] + scaling * (hidden + bias)
    return _per_group(per_row, groups, num_groups)
