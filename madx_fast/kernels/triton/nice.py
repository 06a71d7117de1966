"""NICE coupling (MAD-X's invertible adapter) in Triton: forward and inverse in one dataflow.

Both directions are two additive coupling stages, A then B, with the MLPs and signs swapped:

    dst_A = tgt_A + sign * MLP_A(src_A)          forward: A=F, src=x2, tgt=x1, dst=y1, sign=+1
    dst_B = src_A + sign * MLP_B(dst_A)          inverse: A=G, src=y1, tgt=y2, dst=x2, sign=-1

(``MLP(z) = W2 act(W1 z + b1) + b2``). The forward kernel keeps each token block's hidden activations on
chip: it streams ``dst_A`` out chunk by chunk and feeds every chunk straight into stage B's first product,
so ``dst_A`` is never read back. The direction is the compile-time flag ``INVERSE``; the launcher maps
(F, G) to (A, B) and picks the column offsets of the halves.

Backward (per token block, one kernel), with ``u = sign * upstream`` of each MLP's output:

    dzB = sign * (d_dstB W_B2) * act'(zB)         zB = W_B1 dst_A + b_B1
    gA  = d_dstA + dzB W_B1                       total gradient of dst_A  -> d_tgtA
    dzA = sign * (gA W_A2) * act'(zA)             zA = W_A1 src_A + b_A1
    d_srcA = d_dstB + dzA W_A1
    dW_B2 = sign d_dstB^T act(zB), dW_B1 = dzB^T dst_A, dW_A2 = sign gA^T act(zA), dW_A1 = dzA^T src_A

``src_A`` is read from the saved input, or (recompute mode, the default) rebuilt from the output by
inverting stage B: ``src_A = dst_B - sign * MLP_B(dst_A)``, which needs zB anyway. Where a token's output
holds Inf or NaN that inversion is lost (``x + Inf - Inf``): the rebuilt row is not finite, and the kernel
sets that token's zA and dzA to NaN, so d_src_A and the gradients of W_A1, b_A1, W_A2 are NaN rather than
a wrong finite number (with the input saved, NaN/Inf follow the reference exactly). The kernel writes the
small per-token tensors zA, zB, dzA, dzB (H/4 wide each at rf=2); the weight gradients are token
reductions in ``weight_grad.tokens_reduce`` (fp32 partials, deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import NUM_STAGES, chunk_width, dot_precision, num_warps_for, pow2_at_least, rows_per_program
from .activations import activation_backward, apply_activation
from .tiles import rows_times_weight_t
from .weight_grad import tokens_reduce


@triton.jit
def _hidden(SRC, stride_sm, stride_sk, rows, rmask, W1, B1, IN, HID,
            DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HID: tl.constexpr):
    """``z = src W1^T + b1`` for a token block: [BLOCK_M, BLOCK_HID] fp32 (padding columns are 0)."""
    hcol = tl.arange(0, BLOCK_HID)
    hmask = hcol < HID
    acc = rows_times_weight_t(SRC, stride_sm, stride_sk, rows, rmask, W1, IN, 1, IN, HID,
                              DOT_PREC, BLOCK_M, BLOCK_K, BLOCK_HID)
    b = tl.load(B1 + hcol, mask=hmask, other=0.0).to(tl.float32)
    return acc + b[None, :]


@triton.jit
def _nice_fwd_kernel(
    X, OUT, WA1, BA1, WA2, BA2, WB1, BB1, WB2, BB2,
    N, IN_A, OUT_A, HA, HB, OFF_SRC, OFF_TGT,
    stride_xm, stride_xh, stride_om, stride_oh,
    ACT: tl.constexpr, INVERSE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HA: tl.constexpr, BLOCK_HB: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    nice_fwd_block(X, OUT, WA1, BA1, WA2, BA2, WB1, BB1, WB2, BB2, rows, rows < N,
                   IN_A, OUT_A, HA, HB, OFF_SRC, OFF_TGT, stride_xm, stride_xh, stride_om, stride_oh,
                   ACT, INVERSE, DOT_PREC, BLOCK_M, BLOCK_K, BLOCK_HA, BLOCK_HB)


@triton.jit
def nice_fwd_block(
    X, OUT, WA1, BA1, WA2, BA2, WB1, BB1, WB2, BB2, rows, rmask,
    IN_A, OUT_A, HA, HB, OFF_SRC, OFF_TGT,
    stride_xm, stride_xh, stride_om, stride_oh,
    ACT: tl.constexpr, INVERSE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HA: tl.constexpr, BLOCK_HB: tl.constexpr,
):
    """The coupling of one token block (``rows`` int64, ``rmask``); shared with the grouped kernel."""
    dt = X.dtype.element_ty
    sign = -1.0 if INVERSE else 1.0
    ha = tl.arange(0, BLOCK_HA)
    hb = tl.arange(0, BLOCK_HB)
    ha_mask = ha < HA
    hb_mask = hb < HB

    # Stage A hidden activations from src_A.
    za = _hidden(X + OFF_SRC * stride_xh, stride_xm, stride_xh, rows, rmask, WA1, BA1, IN_A, HA,
                 DOT_PREC, BLOCK_M, BLOCK_K, BLOCK_HA).to(dt)
    aa = apply_activation(za.to(tl.float32), ACT).to(dt)

    # dst_A = tgt_A + sign * (aA W_A2^T + b_A2), chunk by chunk; each chunk also feeds zB = dst_A W_B1^T.
    accb = tl.zeros((BLOCK_M, BLOCK_HB), dtype=tl.float32)
    for n0 in range(0, OUT_A, BLOCK_K):
        nc = n0 + tl.arange(0, BLOCK_K)
        nmask = nc < OUT_A
        m2 = rmask[:, None] & nmask[None, :]
        w2 = tl.load(WA2 + nc[None, :] * HA + ha[:, None], mask=nmask[None, :] & ha_mask[:, None], other=0.0)
        p = tl.dot(aa, w2.to(dt), input_precision=DOT_PREC)
        p += tl.load(BA2 + nc, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tgt = tl.load(X + rows[:, None] * stride_xm + (OFF_TGT + nc)[None, :] * stride_xh, mask=m2, other=0.0)
        dst = (tgt.to(tl.float32) + sign * p).to(dt)
        tl.store(OUT + rows[:, None] * stride_om + (OFF_TGT + nc)[None, :] * stride_oh, dst, mask=m2)
        wb1 = tl.load(WB1 + hb[None, :] * OUT_A + nc[:, None], mask=hb_mask[None, :] & nmask[:, None], other=0.0)
        accb = tl.dot(tl.where(m2, dst, 0.0).to(dt), wb1.to(dt), accb, input_precision=DOT_PREC)
    accb = tl.where(hb_mask[None, :], accb, 0.0)  # padding columns exactly 0 even when dst_A holds Inf
    zb = (accb + tl.load(BB1 + hb, mask=hb_mask, other=0.0).to(tl.float32)[None, :]).to(dt)
    ab = apply_activation(zb.to(tl.float32), ACT).to(dt)

    # dst_B = src_A + sign * (aB W_B2^T + b_B2).
    for n0 in range(0, IN_A, BLOCK_K):
        nc = n0 + tl.arange(0, BLOCK_K)
        nmask = nc < IN_A
        m2 = rmask[:, None] & nmask[None, :]
        w2 = tl.load(WB2 + nc[None, :] * HB + hb[:, None], mask=nmask[None, :] & hb_mask[:, None], other=0.0)
        q = tl.dot(ab, w2.to(dt), input_precision=DOT_PREC)
        q += tl.load(BB2 + nc, mask=nmask, other=0.0).to(tl.float32)[None, :]
        src = tl.load(X + rows[:, None] * stride_xm + (OFF_SRC + nc)[None, :] * stride_xh, mask=m2, other=0.0)
        tl.store(OUT + rows[:, None] * stride_om + (OFF_SRC + nc)[None, :] * stride_oh,
                 (src.to(tl.float32) + sign * q).to(dt), mask=m2)


@triton.jit
def _nice_bwd_kernel(
    DOUT, OUT, INP, DINP, SRC, ZA, ZB, DZA, DZB,
    WA1, BA1, WA2, WB1, BB1, WB2, BB2,
    N, IN_A, OUT_A, HA, HB, OFF_SRC, OFF_TGT,
    stride_inm, stride_inh,
    ACT: tl.constexpr, INVERSE: tl.constexpr, HAS_INP: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HA: tl.constexpr, BLOCK_HB: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    nice_bwd_block(DOUT, OUT, INP, DINP, SRC, ZA, ZB, DZA, DZB, WA1, BA1, WA2, WB1, BB1, WB2, BB2,
                   rows, rows < N, IN_A, OUT_A, HA, HB, OFF_SRC, OFF_TGT, stride_inm, stride_inh,
                   ACT, INVERSE, HAS_INP, DOT_PREC, BLOCK_M, BLOCK_K, BLOCK_HA, BLOCK_HB)


@triton.jit
def nice_bwd_block(
    DOUT, OUT, INP, DINP, SRC, ZA, ZB, DZA, DZB,
    WA1, BA1, WA2, WB1, BB1, WB2, BB2, rows, rmask,
    IN_A, OUT_A, HA, HB, OFF_SRC, OFF_TGT,
    stride_inm, stride_inh,
    ACT: tl.constexpr, INVERSE: tl.constexpr, HAS_INP: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HA: tl.constexpr, BLOCK_HB: tl.constexpr,
):
    """The backward of one token block; shared with the grouped kernel. DOUT, OUT, DINP are contiguous
    [N, IN_A + OUT_A]; SRC is [N, IN_A] (written only when not HAS_INP)."""
    H = IN_A + OUT_A
    dt = DOUT.dtype.element_ty
    sign = -1.0 if INVERSE else 1.0
    ha = tl.arange(0, BLOCK_HA)
    hb = tl.arange(0, BLOCK_HB)
    ha_mask = ha < HA
    hb_mask = hb < HB
    mha = rmask[:, None] & ha_mask[None, :]
    mhb = rmask[:, None] & hb_mask[None, :]

    # zB from dst_A (in the output).
    zb = _hidden(OUT + OFF_TGT, H, 1, rows, rmask, WB1, BB1, OUT_A, HB,
                 DOT_PREC, BLOCK_M, BLOCK_K, BLOCK_HB).to(dt)
    ab = apply_activation(zb.to(tl.float32), ACT).to(dt)

    # One pass over the src_A columns: d_dstB W_B2 for stage B's backward, and src_A -> zA.
    dhb = tl.zeros((BLOCK_M, BLOCK_HB), dtype=tl.float32)
    acca = tl.zeros((BLOCK_M, BLOCK_HA), dtype=tl.float32)
    lost = tl.zeros((BLOCK_M,), dtype=tl.int32)  # rows whose rebuilt src_A is not finite (recompute mode)
    for n0 in range(0, IN_A, BLOCK_K):
        nc = n0 + tl.arange(0, BLOCK_K)
        nmask = nc < IN_A
        m2 = rmask[:, None] & nmask[None, :]
        ddst = tl.load(DOUT + rows[:, None] * H + (OFF_SRC + nc)[None, :], mask=m2, other=0.0)
        wb2 = tl.load(WB2 + nc[:, None] * HB + hb[None, :], mask=nmask[:, None] & hb_mask[None, :], other=0.0)
        dhb = tl.dot(ddst, wb2.to(dt), dhb, input_precision=DOT_PREC)
        if HAS_INP:
            src = tl.load(INP + rows[:, None] * stride_inm + (OFF_SRC + nc)[None, :] * stride_inh,
                          mask=m2, other=0.0)
        else:
            # src_A = dst_B - sign * MLP_B(dst_A): invert stage B instead of having saved the input.
            q = tl.dot(ab, tl.trans(wb2.to(dt)), input_precision=DOT_PREC)
            q += tl.load(BB2 + nc, mask=nmask, other=0.0).to(tl.float32)[None, :]
            dst = tl.load(OUT + rows[:, None] * H + (OFF_SRC + nc)[None, :], mask=m2, other=0.0)
            src = tl.where(m2, dst.to(tl.float32) - sign * q, 0.0).to(dt)
            tl.store(SRC + rows[:, None] * IN_A + nc[None, :], src, mask=m2)
            finite = tl.abs(src.to(tl.float32)) < float("inf")
            lost = tl.maximum(lost, tl.max(tl.where(finite, 0, 1), axis=1))
        wa1 = tl.load(WA1 + ha[None, :] * IN_A + nc[:, None], mask=ha_mask[None, :] & nmask[:, None], other=0.0)
        acca = tl.dot(src, wa1.to(dt), acca, input_precision=DOT_PREC)
    # (padding columns of the accumulators exactly 0: an Inf in a real column times a masked 0 is NaN)
    dhb = tl.where(hb_mask[None, :], dhb, 0.0)
    acca = tl.where(ha_mask[None, :], acca, 0.0)
    dzb = activation_backward(sign * dhb, zb.to(tl.float32), ACT).to(dt)
    za = (acca + tl.load(BA1 + ha, mask=ha_mask, other=0.0).to(tl.float32)[None, :]).to(dt)
    # Where the output held Inf/NaN, src_A cannot be rebuilt (x + Inf - Inf): that row's zA and dzA become
    # NaN, so every gradient that depends on src_A is NaN rather than a wrong finite number.
    za = tl.where(lost[:, None] != 0, float("nan"), za.to(tl.float32)).to(dt)
    tl.store(ZB + rows[:, None] * HB + hb[None, :], zb, mask=mhb)
    tl.store(DZB + rows[:, None] * HB + hb[None, :], dzb, mask=mhb)
    tl.store(ZA + rows[:, None] * HA + ha[None, :], za, mask=mha)

    dha = _tgt_grad(DOUT, DINP, WB1, WA2, dzb, rows, rmask, H, OUT_A, HA, HB, OFF_TGT,
                    DOT_PREC, BLOCK_M, BLOCK_K, BLOCK_HA, BLOCK_HB)
    dza = activation_backward(sign * dha, za.to(tl.float32), ACT)
    dza = tl.where(lost[:, None] != 0, float("nan"), dza).to(dt)
    tl.store(DZA + rows[:, None] * HA + ha[None, :], dza, mask=mha)

    _src_grad(DOUT, DINP, WA1, dza, rows, rmask, H, IN_A, HA, OFF_SRC, DOT_PREC, BLOCK_K, BLOCK_HA)


@triton.jit
def _tgt_grad(DOUT, DINP, WB1, WA2, dzb, rows, rmask, H, OUT_A, HA, HB, OFF_TGT,
              DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HA: tl.constexpr,
              BLOCK_HB: tl.constexpr):
    """``gA = d_dstA + dzB W_B1`` (the gradient of tgt_A, stored into DINP) chunk by chunk, and stage A's
    upstream ``gA W_A2``: [BLOCK_M, BLOCK_HA] fp32, padding columns exactly 0."""
    dt = DOUT.dtype.element_ty
    ha = tl.arange(0, BLOCK_HA)
    hb = tl.arange(0, BLOCK_HB)
    ha_mask = ha < HA
    hb_mask = hb < HB
    dha = tl.zeros((BLOCK_M, BLOCK_HA), dtype=tl.float32)
    for n0 in range(0, OUT_A, BLOCK_K):
        nc = n0 + tl.arange(0, BLOCK_K)
        nmask = nc < OUT_A
        m2 = rmask[:, None] & nmask[None, :]
        ddst = tl.load(DOUT + rows[:, None] * H + (OFF_TGT + nc)[None, :], mask=m2, other=0.0)
        wb1 = tl.load(WB1 + hb[:, None] * OUT_A + nc[None, :], mask=hb_mask[:, None] & nmask[None, :], other=0.0)
        ga = (ddst.to(tl.float32) + tl.dot(dzb, wb1.to(dt), input_precision=DOT_PREC)).to(dt)
        tl.store(DINP + rows[:, None] * H + (OFF_TGT + nc)[None, :], ga, mask=m2)
        wa2 = tl.load(WA2 + nc[:, None] * HA + ha[None, :], mask=nmask[:, None] & ha_mask[None, :], other=0.0)
        dha = tl.dot(tl.where(m2, ga, 0.0).to(dt), wa2.to(dt), dha, input_precision=DOT_PREC)
    return tl.where(ha_mask[None, :], dha, 0.0)


@triton.jit
def _src_grad(DOUT, DINP, WA1, dza, rows, rmask, H, IN_A, HA, OFF_SRC,
              DOT_PREC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HA: tl.constexpr):
    """``d_srcA = d_dstB + dzA W_A1``, stored into DINP chunk by chunk."""
    dt = DOUT.dtype.element_ty
    ha = tl.arange(0, BLOCK_HA)
    ha_mask = ha < HA
    for n0 in range(0, IN_A, BLOCK_K):
        nc = n0 + tl.arange(0, BLOCK_K)
        nmask = nc < IN_A
        m2 = rmask[:, None] & nmask[None, :]
        ddst = tl.load(DOUT + rows[:, None] * H + (OFF_SRC + nc)[None, :], mask=m2, other=0.0)
        wa1 = tl.load(WA1 + ha[:, None] * IN_A + nc[None, :], mask=ha_mask[:, None] & nmask[None, :], other=0.0)
        dsrc = ddst.to(tl.float32) + tl.dot(dza, wa1.to(dt), input_precision=DOT_PREC)
        tl.store(DINP + rows[:, None] * H + (OFF_SRC + nc)[None, :], dsrc.to(dt), mask=m2)


def _layout(h, weights, inverse, dtype):
    """Map (F, G) to stages (A, B) and the column offsets of src_A / tgt_A for a direction; weights are cast
    to the activation dtype once per call (they are small)."""
    f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2 = [w.to(dtype).contiguous() for w in weights]
    len1 = h // 2
    if inverse:  # A = G on y1 (cols [0, len1)), writes x2 (cols [len1, h)); B = F
        return (g_w1, g_b1, g_w2, g_b2), (f_w1, f_b1, f_w2, f_b2), 0, len1
    return (f_w1, f_b1, f_w2, f_b2), (g_w1, g_b1, g_w2, g_b2), len1, 0


def _config(ha, hb, dtype, block_m=None, block_k=None):
    """Both stages' hidden activations and their gradients live on chip (about four tiles at once)."""
    bha, bhb = pow2_at_least(ha), pow2_at_least(hb)
    width = max(bha, bhb)
    bm = block_m or rows_per_program(width, dtype, live_tiles=4)
    bk = block_k or chunk_width(width, dtype)
    return bm, bk, bha, bhb, dict(num_warps=num_warps_for(bm * width * 2), num_stages=NUM_STAGES)


def nice_coupling(x, weights, activation, inverse, *, block_m=None, block_k=None):
    """Launcher: NICE forward (``inverse=False``) or inverse on ``x: [N, H]`` (any strides)."""
    n, h = x.shape
    out = torch.empty((n, h), dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    (wa1, ba1, wa2, ba2), (wb1, bb1, wb2, bb2), off_src, off_tgt = _layout(h, weights, inverse, x.dtype)
    in_a, out_a, ha, hb = wa1.shape[1], wa2.shape[0], wa1.shape[0], wb1.shape[0]
    bm, bk, bha, bhb, launch = _config(ha, hb, x.dtype, block_m, block_k)
    _nice_fwd_kernel[(triton.cdiv(n, bm),)](
        x, out, wa1, ba1, wa2, ba2, wb1, bb1, wb2, bb2,
        n, in_a, out_a, ha, hb, off_src, off_tgt,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        ACT=activation, INVERSE=bool(inverse), DOT_PREC=dot_precision(x.dtype),
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_HA=bha, BLOCK_HB=bhb, **launch,
    )
    return out


def nice_coupling_backward(dout, out, inp, weights, activation, inverse, *, block_m=None, block_k=None,
                           splits=None):
    """Launcher: ``(d_inp, df_w1, df_b1, df_w2, df_b2, dg_w1, dg_b1, dg_w2, dg_b2)``, weight grads fp32.
    ``inp=None`` rebuilds the input from ``out``."""
    n, h = out.shape
    dev, dt = out.device, out.dtype
    dout, out = dout.contiguous(), out.contiguous()
    (wa1, ba1, wa2, ba2), (wb1, bb1, wb2, bb2), off_src, off_tgt = _layout(h, weights, inverse, dt)
    in_a, out_a, ha, hb = wa1.shape[1], wa2.shape[0], wa1.shape[0], wb1.shape[0]
    bm, bk, bha, bhb, launch = _config(ha, hb, dt, block_m, block_k)
    dinp = torch.empty((n, h), dtype=dt, device=dev)
    za = torch.empty((n, ha), dtype=dt, device=dev)
    zb = torch.empty((n, hb), dtype=dt, device=dev)
    dza = torch.empty_like(za)
    dzb = torch.empty_like(zb)
    src = torch.empty((n, in_a), dtype=dt, device=dev) if inp is None else None
    if n > 0:
        src_arg = inp if inp is not None else dinp  # a placeholder pointer when unused
        _nice_bwd_kernel[(triton.cdiv(n, bm),)](
            dout, out, src_arg, dinp, src if src is not None else dinp, za, zb, dza, dzb,
            wa1, ba1, wa2, wb1, bb1, wb2, bb2,
            n, in_a, out_a, ha, hb, off_src, off_tgt,
            src_arg.stride(0), src_arg.stride(1),
            ACT=activation, INVERSE=bool(inverse), HAS_INP=inp is not None, DOT_PREC=dot_precision(dt),
            BLOCK_M=bm, BLOCK_K=bk, BLOCK_HA=bha, BLOCK_HB=bhb, **launch,
        )
    sign = -1.0 if inverse else 1.0
    src_a = inp[:, off_src:off_src + in_a] if inp is not None else src
    d_wb2, d_bb2 = tokens_reduce(dout[:, off_src:off_src + in_a], zb, activation, splits=splits)
    d_wb1, d_bb1 = tokens_reduce(dzb, out[:, off_tgt:off_tgt + out_a], splits=splits)
    d_wa2, d_ba2 = tokens_reduce(dinp[:, off_tgt:off_tgt + out_a], za, activation, splits=splits)
    d_wa1, d_ba1 = tokens_reduce(dza, src_a, splits=splits)
    grads_a = (d_wa1, d_ba1, sign * d_wa2, sign * d_ba2)
    grads_b = (d_wb1, d_bb1, sign * d_wb2, sign * d_bb2)
    f_grads, g_grads = (grads_b, grads_a) if inverse else (grads_a, grads_b)
    return (dinp, *f_grads, *g_grads)
