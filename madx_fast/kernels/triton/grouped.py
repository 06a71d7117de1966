"""Grouped (per-row) adapters in Triton: every sequence row of a batch runs the adapter of its own group (its
language), all groups in one launch per product.

Layout. ``x: [B*L, H]`` holds ``B`` sequence rows of ``L`` tokens each, a row's tokens contiguous; ``groups:
[B]`` (int32/int64, on the device) gives each row's group in ``[0, G)``; weights are stacked over groups:
``w_down [G, d, H]``, ``b_down [G, d]``, ``w_up [G, H, d]``, ``b_up [G, H]``, NICE ``f_w1 [G, hf, H - H//2]``...

Forward and input gradients: a program never crosses a sequence row. Programs are indexed by (row, token
block of the row[, output-column block]); each reads its row's group id once and offsets its weight pointers
by ``group * stride``, then runs the same tile code as the single-adapter kernels (``linear.linear_tile``,
``nice.nice_fwd_block``, ``nice.nice_bwd_b_block``, ``nice.nice_bwd_a_block``; NICE with stages wider than
``nice.WIDE_HIDDEN`` runs ``nice.py``'s GEMM route on ``grouped_linear``). Grid sizes depend on shapes only
(B, L, H, d, G), never on the group ids, and nothing reads the ids on the host: the launches are CUDA-graph
capturable, and a graph captured once serves every mix of languages. Token blocks are sized to the row length (``BLOCK_M <=
next_pow2(L)``), so padding lanes cost little when L is not a multiple of the block.

Bottleneck adapter, any bottleneck width: the GEMM route of ``adapter.py`` (two tiled GEMMs with the
adapter's work fused into prologue and epilogues), grouped:

    z  = x W_down[g]^T + b_down[g]                 (EPI_BIAS)
    y  = r + s (act(z) W_up[g]^T + b_up[g])        (A_ACT on load, EPI_RESIDUAL)
    da = s (dy W_up[g]) act'(z)                    (EPI_DACT)
    dx = da W_down[g] (+ dy when r is x)           (EPI_ADD)

Three passes over N x H data in forward, as the single-adapter kernels. (The single-kernel fused forward of
narrow adapters, d <= 128, is not replicated per row: MAD-X language adapters are d = 384 at H = 768, the GEMM
route's regime, and the task adapter stacked above them is shared and runs on the single-adapter kernels.)

Weight gradients are per-group token reductions ``C[g] = A_g^T act(B_g)``, ``colsum(A_g)`` over the tokens
of the rows of group g (``grouped_tokens_reduce``). The rows are sorted by group on the device (a stable
argsort; segment starts by counting ids below each group, no host read). Program (M tile, K tile, g * S + s)
reduces split s of group g's sorted rows (S splits per group, chosen from shapes so about two waves of
programs run) into an fp32 partial ``[G, S, M, K]``; the partials are summed over S afterwards. Deterministic
(no atomics), an empty group gives zeros, and a group never reads another group's rows: a NaN or Inf in one
group's rows or weights stays in that group's outputs and gradients.

Derivations: per row, these are the single-adapter formulas of ``adapter.py`` and ``nice.py`` with that row's
group's weights; a weight's gradient is the sum of its rows' contributions, i.e. the reduction over exactly
the tokens of the rows of its group.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import dot_precision, pow2_at_least, sm_count
from .linear import EPI_ADD, EPI_BIAS, EPI_DACT, EPI_RESIDUAL, LOST_NONE, linear_tile, tile_config
from .nice import (block_config, nice_bwd_a_block, nice_bwd_b_block, nice_fwd_block, routed_coupling,
                   routed_coupling_backward, stage_dims)
from .weight_grad import reduction_config, tn_accumulate, tn_store

# Upper bound on the fp32 partials of one grouped reduction (G * S * M * K elements): 128 MiB.
PARTIAL_BUDGET = 1 << 25


@triton.jit
def _row_group(GROUPS, row, NUM_GROUPS):
    """The group of a sequence row, clamped into [0, G) so that a bad id can never address memory outside
    the stacked weights (ids are checked on the host where they are host data)."""
    g = tl.load(GROUPS + row).to(tl.int64)
    return tl.minimum(tl.maximum(g, 0), NUM_GROUPS - 1)


@triton.jit
def _grouped_linear_kernel(
    A, W, BIAS, OUT, Z, R, LOST, GROUPS,
    ROWS, L, N, K, NUM_GROUPS, stride_wg, stride_bg,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on, stride_zm, stride_zn, stride_rm, stride_rn,
    scaling,
    EPI: tl.constexpr, A_ACT: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr, LOST_ROWS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ROW_MULTIPLE: tl.constexpr,
):
    # Token blocks never cross a sequence row: ROWS * cdiv(L, BLOCK_M) of them, in the grouped launch order
    # of _linear_kernel (GROUP_M token blocks share each column block while it is in L2).
    pid = tl.program_id(0)
    blocks_per_row = tl.cdiv(L, BLOCK_M)
    grid_m = ROWS * blocks_per_row
    grid_n = tl.cdiv(N, BLOCK_N)
    band = pid // (GROUP_M * grid_n)
    first_m = band * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m

    if ROW_MULTIPLE:
        # L is a multiple of BLOCK_M: the flat block index gives the tokens (and the compiler their alignment).
        tokens = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row = (pid_m * BLOCK_M) // L
        tmask = tokens < ROWS * L
    else:
        row = pid_m // blocks_per_row
        pos = (pid_m - row * blocks_per_row) * BLOCK_M + tl.arange(0, BLOCK_M)
        tokens = row.to(tl.int64) * L + pos
        tmask = pos < L
    g = _row_group(GROUPS, row, NUM_GROUPS)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    linear_tile(A, W + g * stride_wg, BIAS + g * stride_bg, OUT, Z, R, LOST, tokens, tmask, cols, cols < N, K,
                stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on, stride_zm, stride_zn,
                stride_rm, stride_rn, scaling,
                EPI, A_ACT, HAS_R, ACT, LOST_ROWS, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _grouped_tn_kernel(
    A, B, ORDER, SEG, C_PART, S_PART,
    L, M, K, SPLITS,
    stride_an, stride_am, stride_bn, stride_bk,
    ACT: tl.constexpr, WITH_SUM: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (pid_m, pid_k, g * SPLITS + s): split s of the rows of group g, which are the sorted rows
    # ORDER[SEG[g]:SEG[g+1]]; its tokens are gathered through ORDER (t-th token of the split: sorted row
    # r0 + t // L, position t % L).
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_gs = tl.program_id(2)
    g = pid_gs // SPLITS
    s = pid_gs - g * SPLITS
    lo = tl.load(SEG + g)
    hi = tl.load(SEG + g + 1)
    per = tl.cdiv(hi - lo, SPLITS)
    r0 = lo + s * per
    r1 = tl.minimum(r0 + per, hi)
    n_tok = tl.maximum(r1 - r0, 0) * L

    mc = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    kc = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mmask = mc < M
    kmask = kc < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t0 in range(0, n_tok, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tmask = t < n_tok
        row = tl.load(ORDER + r0 + t // L, mask=tmask, other=0).to(tl.int64)
        acc, colsum = tn_accumulate(A, B, row * L + t % L, tmask, mc, mmask, kc, kmask, acc, colsum,
                                    stride_an, stride_am, stride_bn, stride_bk, ACT, WITH_SUM, DOT_PREC)
    tn_store(C_PART, S_PART, pid_gs.to(tl.int64), acc, colsum, mc, mmask, kc, kmask, M, K, pid_k, WITH_SUM)


@triton.jit
def _grouped_nice_fwd_kernel(
    X, OUT, WA1, BA1, WA2, BA2, WB1, BB1, WB2, BB2, GROUPS,
    L, NUM_GROUPS, IN_A, OUT_A, HA, HB, OFF_SRC, OFF_TGT,
    stride_xm, stride_xh, stride_om, stride_oh,
    ACT: tl.constexpr, INVERSE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HA0: tl.constexpr, HA1: tl.constexpr, HB0: tl.constexpr,
    HB1: tl.constexpr,
):
    # Grid (row, token block of the row). The stacked weights are contiguous: a group's slice is one matrix.
    row = tl.program_id(0)
    pos = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = _row_group(GROUPS, row, NUM_GROUPS)
    nice_fwd_block(X, OUT, WA1 + g * HA * IN_A, BA1 + g * HA, WA2 + g * OUT_A * HA, BA2 + g * OUT_A,
                   WB1 + g * HB * OUT_A, BB1 + g * HB, WB2 + g * IN_A * HB, BB2 + g * IN_A,
                   row.to(tl.int64) * L + pos, pos < L,
                   IN_A, OUT_A, HA, HB, OFF_SRC, OFF_TGT, stride_xm, stride_xh, stride_om, stride_oh,
                   ACT, INVERSE, DOT_PREC, BLOCK_M, BLOCK_K, HA0, HA1, HB0, HB1)


@triton.jit
def _grouped_nice_bwd_b_kernel(
    DOUT, OUT, SRC, ZB, DZB, WB1, BB1, WB2, BB2, GROUPS,
    L, NUM_GROUPS, IN_A, OUT_A, HB, OFF_SRC, OFF_TGT,
    ACT: tl.constexpr, INVERSE: tl.constexpr, REBUILD: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HB0: tl.constexpr, HB1: tl.constexpr,
):
    row = tl.program_id(0)
    pos = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = _row_group(GROUPS, row, NUM_GROUPS)
    nice_bwd_b_block(DOUT, OUT, SRC, ZB, DZB, WB1 + g * HB * OUT_A, BB1 + g * HB, WB2 + g * IN_A * HB,
                     BB2 + g * IN_A, row.to(tl.int64) * L + pos, pos < L, IN_A, OUT_A, HB, OFF_SRC, OFF_TGT,
                     ACT, INVERSE, REBUILD, DOT_PREC, BLOCK_M, BLOCK_K, HB0, HB1)


@triton.jit
def _grouped_nice_bwd_a_kernel(
    DOUT, SRC, DINP, ZA, DZA, DZB, WA1, BA1, WA2, WB1, GROUPS,
    L, NUM_GROUPS, IN_A, OUT_A, HA, HB, OFF_SRC, OFF_TGT, stride_sm, stride_sk,
    ACT: tl.constexpr, INVERSE: tl.constexpr, REBUILT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HA0: tl.constexpr, HA1: tl.constexpr, HB0: tl.constexpr,
    HB1: tl.constexpr,
):
    row = tl.program_id(0)
    pos = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = _row_group(GROUPS, row, NUM_GROUPS)
    nice_bwd_a_block(DOUT, SRC, DINP, ZA, DZA, DZB, WA1 + g * HA * IN_A, BA1 + g * HA, WA2 + g * OUT_A * HA,
                     WB1 + g * HB * OUT_A, row.to(tl.int64) * L + pos, pos < L, IN_A, OUT_A, HA, HB,
                     OFF_SRC, OFF_TGT, stride_sm, stride_sk,
                     ACT, INVERSE, REBUILT, DOT_PREC, BLOCK_M, BLOCK_K, HA0, HA1, HB0, HB1)


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------
def row_length(n_tokens: int, groups: torch.Tensor) -> int:
    """Tokens per sequence row: ``N = B * L`` (the op layer checks that B divides N)."""
    rows = groups.shape[0]
    return n_tokens // rows if rows else 0


def _row_block(length: int, cap: int) -> int:
    """Token block of a row-aligned program: at most the padded row length, so short rows waste little."""
    return min(cap, pow2_at_least(length))


def grouped_linear(a, w, w_strides, n, epilogue, groups, *, bias=None, residual=None, z=None, scaling=1.0,
                   activation=0, a_activation=False, out=None, lost=None, lost_rows=LOST_NONE):
    """``epilogue(act?(a) @ W[g]^T)`` per sequence row as ``[M, n]`` in a's dtype (into ``out`` when given):
    ``a: [M, K]`` with ``M = B * L``, ``w: [G, ...]`` contiguous (``W[g][n, k]`` at ``w[g] + n * w_strides[0] +
    k * w_strides[1]``), ``bias: [G, n]``; the epilogues and ``lost`` are ``linear.py``'s."""
    m, k = a.shape
    if out is None:
        out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if m == 0:
        return out
    rows = groups.shape[0]
    length = row_length(m, groups)
    bm, bn, bk, warps, stages = tile_config(lambda bm: rows * triton.cdiv(length, bm), n, k, a.dtype, a.device,
                                            row_cap=pow2_at_least(length))
    dummy = out
    r = residual if residual is not None else dummy
    zz = z if z is not None else dummy
    grid = (rows * triton.cdiv(length, bm) * triton.cdiv(n, bn),)
    _grouped_linear_kernel[grid](
        a, w, bias if bias is not None else dummy, out, zz, r, lost if lost is not None else dummy, groups,
        rows, length, n, k, w.shape[0], w.stride(0), bias.stride(0) if bias is not None else 0,
        a.stride(0), a.stride(1), w_strides[0], w_strides[1], out.stride(0), out.stride(1),
        zz.stride(0), zz.stride(1), r.stride(0), r.stride(1),
        float(scaling),
        EPI=epilogue, A_ACT=bool(a_activation), HAS_R=residual is not None, ACT=activation, LOST_ROWS=lost_rows,
        DOT_PREC=dot_precision(a.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
        ROW_MULTIPLE=length % bm == 0, num_warps=warps, num_stages=stages,
    )
    return out


def row_segments(groups: torch.Tensor, num_groups: int):
    """Rows sorted by group, on the device: ``(order [B], seg [G + 1])`` with the rows of group g at
    ``order[seg[g]:seg[g + 1]]``. ``seg[g]`` counts the ids below g: no host read, no atomics."""
    order = torch.argsort(groups, stable=True)
    bounds = torch.arange(num_groups + 1, device=groups.device, dtype=groups.dtype)
    seg = (groups[None, :] < bounds[:, None]).sum(1)
    return order, seg


def grouped_tokens_reduce(a, b, segments, num_groups, length, activation=0, with_sum=True, *, splits=None):
    """Per group ``g``: ``(A_g^T act(B_g), A_g.sum(0))`` in fp32 over the tokens of the rows of group g, as
    ``[G, M, K]`` and ``[G, M]``. ``a: [B*L, M]``, ``b: [B*L, K]`` (any strides), ``segments`` from
    ``row_segments``."""
    n, m = a.shape
    k = b.shape[1]
    f32 = dict(dtype=torch.float32, device=a.device)
    if n == 0:
        return torch.zeros((num_groups, m, k), **f32), torch.zeros((num_groups, m), **f32)
    order, seg = segments
    bn, bm, bk, warps, stages = reduction_config(m, k, a.dtype)
    tiles = triton.cdiv(m, bm) * triton.cdiv(k, bk)
    if splits is None:
        splits = triton.cdiv(2 * sm_count(a.device), tiles)  # ~2 waves even when one group has every row
        splits = min(splits, order.shape[0], max(1, PARTIAL_BUDGET // (num_groups * m * k)))
    splits = max(1, int(splits))
    c_part = torch.empty((num_groups * splits, m, k), **f32)
    s_part = torch.empty((num_groups * splits, m), **f32)
    _grouped_tn_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bk), num_groups * splits)](
        a, b, order, seg, c_part, s_part, length, m, k, splits,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        ACT=activation, WITH_SUM=with_sum, DOT_PREC=dot_precision(a.dtype),
        BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )
    return c_part.view(num_groups, splits, m, k).sum(1), s_part.view(num_groups, splits, m).sum(1)


def _no_weight_grads(device, count):
    """Placeholders for skipped weight gradients (distinct tensors: a custom op's outputs may not alias)."""
    return tuple(torch.empty((0,), dtype=torch.float32, device=device) for _ in range(count))


def grouped_adapter_forward(x, residual, groups, w_down, b_down, w_up, b_up, scaling, activation):
    """``(y [N, H], z [N, d])``: row ``b`` of ``x: [B*L, H]`` through the adapter of group ``groups[b]``."""
    n, h = x.shape
    d = w_down.shape[1]
    if n == 0:
        return torch.empty((0, h), dtype=x.dtype, device=x.device), torch.empty((0, d), dtype=x.dtype,
                                                                                device=x.device)
    r = x if residual is None else residual
    # Weights in any float dtype: the kernels round them to x.dtype on load (no cast per call).
    wd, bd, wu, bu = (t.contiguous() for t in (w_down, b_down, w_up, b_up))
    z = grouped_linear(x, wd, (h, 1), d, EPI_BIAS, groups, bias=bd)
    y = grouped_linear(z, wu, (d, 1), h, EPI_RESIDUAL, groups, bias=bu, residual=r, scaling=scaling,
                       activation=activation, a_activation=True)
    return y, z


def grouped_adapter_backward(dy, x, z, groups, w_down, w_up, scaling, activation, residual_is_input,
                             weight_grads, *, splits=None):
    """``(dx, dw_down [G, d, H], db_down [G, d], dw_up [G, H, d], db_up [G, H])``, weight grads fp32; with
    ``weight_grads=False`` only dx (the weight grads come back as empty tensors)."""
    n, h = x.shape
    num_groups, d = w_down.shape[0], w_down.shape[1]
    if n == 0:
        f32 = dict(dtype=torch.float32, device=x.device)
        dx = torch.empty((0, h), dtype=x.dtype, device=x.device)
        if not weight_grads:
            return (dx,) + _no_weight_grads(x.device, 4)
        return (dx, torch.zeros((num_groups, d, h), **f32), torch.zeros((num_groups, d), **f32),
                torch.zeros((num_groups, h, d), **f32), torch.zeros((num_groups, h), **f32))
    wd, wu = w_down.contiguous(), w_up.contiguous()
    da = grouped_linear(dy, wu, (1, d), d, EPI_DACT, groups, z=z, scaling=scaling, activation=activation)
    dx = grouped_linear(da, wd, (1, h), h, EPI_ADD, groups, residual=dy if residual_is_input else None)
    if not weight_grads:
        return (dx,) + _no_weight_grads(x.device, 4)
    segments = row_segments(groups, num_groups)
    length = row_length(n, groups)
    dwu, dbu = grouped_tokens_reduce(dy, z, segments, num_groups, length, activation, splits=splits)
    dwd, dbd = grouped_tokens_reduce(da, x, segments, num_groups, length, splits=splits)
    return dx, dwd, dbd, scaling * dwu, scaling * dbu


def grouped_nice_coupling(x, groups, weights, activation, inverse, *, block_m=None, block_k=None):
    """NICE forward (``inverse=False``) or inverse, row ``b`` of ``x: [B*L, H]`` with group ``groups[b]``'s
    weights (each stacked ``[G, ...]``), on the route ``nice.route`` picks for the hidden widths."""
    def fused(out, stages):
        (wa1, ba1, wa2, ba2), (wb1, bb1, wb2, bb2), off_src, off_tgt = stages
        in_a, out_a, ha, hb = stage_dims(stages)
        length = row_length(x.shape[0], groups)
        bm, bk, (ha0, ha1), (hb0, hb1), launch = block_config(ha, hb, x.dtype, block_m, block_k)
        bm = _row_block(length, bm)
        _grouped_nice_fwd_kernel[(groups.shape[0], triton.cdiv(length, bm))](
            x, out, wa1, ba1, wa2, ba2, wb1, bb1, wb2, bb2, groups,
            length, wa1.shape[0], in_a, out_a, ha, hb, off_src, off_tgt,
            x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            ACT=activation, INVERSE=bool(inverse), DOT_PREC=dot_precision(x.dtype),
            BLOCK_M=bm, BLOCK_K=bk, HA0=ha0, HA1=ha1, HB0=hb0, HB1=hb1, **launch,
        )
    return routed_coupling(x, weights, activation, inverse, _per_row_linear(groups), fused)


def _per_row_linear(groups):
    """``grouped_linear`` bound to the groups, with ``linear.fused_linear``'s signature (the NICE GEMM route)."""
    def linear(a, w, w_strides, n, epilogue, **kwargs):
        return grouped_linear(a, w, w_strides, n, epilogue, groups, **kwargs)
    return linear


def grouped_nice_coupling_backward(dout, out, inp, groups, weights, activation, inverse, weight_grads, *,
                                   block_m=None, block_k=None, splits=None):
    """``(d_inp, df_w1, df_b1, df_w2, df_b2, dg_w1, dg_b1, dg_w2, dg_b2)``, weight grads fp32 ``[G, ...]`` (empty
    tensors with ``weight_grads=False``). ``inp=None`` rebuilds the input from ``out``. The kernels of
    ``nice.nice_coupling_backward`` per sequence row, on the same route."""
    num_groups = weights[0].shape[0]
    length = row_length(out.shape[0], groups)

    def fused(dout, out, dinp, stages, buffers):
        _fused_nice_backward(dout, out, inp is None, dinp, groups, length, stages, buffers, activation, inverse,
                             block_m, block_k)

    def reduce(a, b, act):
        return grouped_tokens_reduce(a, b, segments, num_groups, length, act, splits=splits)
    segments = row_segments(groups, num_groups) if weight_grads else None
    grads = routed_coupling_backward(dout, out, inp, weights, activation, inverse, _per_row_linear(groups), fused,
                                     reduce if weight_grads else None)
    return grads if weight_grads else grads + _no_weight_grads(out.device, 8)


def _fused_nice_backward(dout, out, rebuild, dinp, groups, length, stages, buffers, activation, inverse, block_m,
                         block_k):
    (wa1, ba1, wa2, _), (wb1, bb1, wb2, bb2), off_src, off_tgt = stages
    in_a, out_a, ha, hb = stage_dims(stages)
    src_a, za, zb, dza, dzb = buffers
    num_groups, dt = wa1.shape[0], out.dtype
    bm, bk, (ha0, ha1), (hb0, hb1), launch = block_config(ha, hb, dt, block_m, block_k)
    bm = _row_block(length, bm)
    grid = (groups.shape[0], triton.cdiv(length, bm))
    common = dict(ACT=activation, INVERSE=bool(inverse), DOT_PREC=dot_precision(dt), BLOCK_M=bm, BLOCK_K=bk, **launch)
    _grouped_nice_bwd_b_kernel[grid](
        dout, out, src_a, zb, dzb, wb1, bb1, wb2, bb2, groups, length, num_groups, in_a, out_a, hb,
        off_src, off_tgt, REBUILD=rebuild, HB0=hb0, HB1=hb1, **common)
    _grouped_nice_bwd_a_kernel[grid](
        dout, src_a, dinp, za, dza, dzb, wa1, ba1, wa2, wb1, groups, length, num_groups, in_a, out_a, ha, hb,
        off_src, off_tgt, src_a.stride(0), src_a.stride(1),
        REBUILT=rebuild, HA0=ha0, HA1=ha1, HB0=hb0, HB1=hb1, **common)
