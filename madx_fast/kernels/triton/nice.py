"""NICE coupling (MAD-X's invertible adapter) in Triton: forward and inverse in one dataflow, on two routes.

Which route runs depends only on the hidden widths of the two stages' MLPs (``route(ha, hb)``, dispatched by
the launchers right below the imports; the grouped launchers in ``grouped.py`` take the same routes):

* ``"fused"`` (hidden widths <= ``WIDE_HIDDEN`` = 256: H <= 1024 at reduction factor 2, MAD-X's H = 768):
  one forward kernel and two backward kernels per 64-token block that keep the block's hidden activations on
  chip (below). The N x H data is read and written the fewest times.
* ``"gemm"`` (wider: H = 1536 to 4096, DeBERTa-v2 xlarge, XLM-R XL/XXL, Llama-class models): a 64-token
  block's hidden activations (384 to 1024 wide) no longer fit in registers (the fused kernels spill, and at
  H = 4096 need more shared memory than an H100 has), while each product is large enough to be
  compute-bound. The coupling runs as tiled GEMMs (``linear.fused_linear``, ``linear.tile_config``) with the
  coupling's work fused into their prologues and epilogues: bias into z; the activation on load, the bias,
  the sign and the residual half into each half of the output. Backward: seven GEMMs with fused epilogues
  (the activation derivative, the residual gradient, the rebuilt input) and the same weight-gradient token
  reductions as the fused route. Each stage's pre-activation (N x H/4 at rf 2) goes through memory: about
  4 passes over N x H in forward instead of 2, against products of ~0.25 TFLOP each at H = 4096 and 65536
  tokens, so the route stays bound by the tensor cores. ``gemm_coupling`` / ``gemm_coupling_backward``
  below; the derivation is the one below, product by product.

Both directions are two additive coupling stages, A then B, with the MLPs and signs swapped:

    dst_A = tgt_A + sign * MLP_A(src_A)          forward: A=F, src=x2, tgt=x1, dst=y1, sign=+1
    dst_B = src_A + sign * MLP_B(dst_A)          inverse: A=G, src=y1, tgt=y2, dst=x2, sign=-1

(``MLP(z) = W2 act(W1 z + b1) + b2``). The forward kernel keeps each token block's hidden activations on
chip: it streams ``dst_A`` out chunk by chunk and feeds every chunk straight into stage B's first product,
so ``dst_A`` is never read back. The direction is the compile-time flag ``INVERSE``; the launcher maps
(F, G) to (A, B) and picks the column offsets of the halves.

Shapes for Hopper: a program owns 64 tokens (bf16/fp16), so every product is a warpgroup MMA (wgmma, 64-row
blocks) and the four weight matrices are read from L2 once per 64 tokens (590 KB at H=768: ~0.6 GB of L2
reads per 65536 tokens, against ~2.4 GB with 16-token blocks). A hidden width is held as two power-of-two
chunks (``hidden_chunks``: 192 = 128 + 64) instead of one tile padded to the next power of two (256).

Backward (two kernels per token block: stage B's, then stage A's with the input gradient, so that only one
stage's hidden tiles are live at a time), with ``sign`` the direction's sign:

    dzB = sign * (d_dstB W_B2) * act'(zB)         zB = W_B1 dst_A + b_B1
    gA  = d_dstA + dzB W_B1                       total gradient of dst_A  -> d_tgtA
    dzA = sign * (gA W_A2) * act'(zA)             zA = W_A1 src_A + b_A1
    d_srcA = d_dstB + dzA W_A1
    dW_B2 = sign d_dstB^T act(zB), dW_B1 = dzB^T dst_A, dW_A2 = sign gA^T act(zA), dW_A1 = dzA^T src_A

(dst_B = src_A + sign MLP_B(dst_A) gives d_srcA its direct term d_dstB and dst_A the term sign (d_dstB W_B2
act'(zB)) W_B1 = dzB W_B1; dst_A = tgt_A + sign MLP_A(src_A) passes gA to tgt_A and gives src_A the term
dzA W_A1.) ``src_A`` is read from the saved input, or (recompute mode, the default) rebuilt from the output by
inverting stage B in the stage-B kernel: ``src_A = dst_B - sign * MLP_B(dst_A)``, which needs zB anyway.
Where a token's output holds Inf or NaN that inversion is lost (``x + Inf - Inf``): the rebuilt row is not
finite, and the stage-A kernel sets that token's zA and dzA to NaN, so d_src_A and the gradients of W_A1,
b_A1, W_A2 are NaN rather than a wrong finite number (with the input saved, NaN/Inf follow the reference
exactly). The kernels write the small per-token tensors zA, zB, dzA, dzB (H/4 wide each at rf=2); the
weight gradients are token reductions in ``weight_grad.tokens_reduce`` (fp32 partials, deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import NUM_STAGES, dot_precision, interpreting, pow2_at_least
from .activations import activation_backward, apply_activation
from .linear import EPI_ADD, EPI_BIAS, EPI_DACT, EPI_RESIDUAL, LOST_MARK, LOST_NONE, LOST_POISON, fused_linear
from .tiles import load_bias
from .weight_grad import tokens_reduce

WIDE_HIDDEN = 256  # above this hidden width (of either stage's MLP) the "gemm" route runs (module docstring)


def route(ha: int, hb: int) -> str:
    """``"fused"`` (one forward kernel, two backward kernels) or ``"gemm"`` (tiled GEMMs with fused epilogues)
    for stage MLPs of hidden widths ``ha`` and ``hb``."""
    return "gemm" if max(ha, hb) > WIDE_HIDDEN else "fused"


def nice_coupling(x, weights, activation, inverse, *, block_m=None, block_k=None):
    """Launcher: NICE forward (``inverse=False``) or inverse on ``x: [N, H]`` (any strides). ``block_m`` and
    ``block_k`` set the fused route's blocks (tests)."""
    def fused(out, stages):
        _fused_coupling(x, out, stages, activation, inverse, block_m, block_k)
    return routed_coupling(x, weights, activation, inverse, fused_linear, fused)


def nice_coupling_backward(dout, out, inp, weights, activation, inverse, *, block_m=None, block_k=None,
                           splits=None):
    """Launcher: ``(d_inp, df_w1, df_b1, df_w2, df_b2, dg_w1, dg_b1, dg_w2, dg_b2)``, weight grads fp32.
    ``inp=None`` rebuilds the input from ``out``. The input gradient and the per-token tensors by the route's
    kernels, then the weight-gradient reductions."""
    def fused(dout, out, dinp, stages, buffers):
        _fused_coupling_backward(dout, out, inp is None, dinp, stages, buffers, activation, inverse, block_m,
                                 block_k)

    def reduce(a, b, act):
        return tokens_reduce(a, b, act, splits=splits)
    return routed_coupling_backward(dout, out, inp, weights, activation, inverse, fused_linear, fused, reduce)


def routed_coupling(x, weights, activation, inverse, linear, fused):
    """The coupling of ``x`` on the route ``route`` picks: ``gemm_coupling`` with the GEMM ``linear`` (the
    single or the per-row one), or ``fused(out, stages)``, the route's kernel launch. Shared with the grouped
    launcher."""
    n, h = x.shape
    out = torch.empty((n, h), dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    stages = stage_layout(h, weights, inverse)
    if route(*stage_dims(stages)[2:]) == "gemm":
        gemm_coupling(linear, x, out, stages, activation, inverse)
    else:
        fused(out, stages)
    return out


def routed_coupling_backward(dout, out, inp, weights, activation, inverse, linear, fused, reduce):
    """The backward on the route ``route`` picks (``gemm_coupling_backward`` with ``linear``, or
    ``fused(dout, out, dinp, stages, buffers)``), then the weight gradients by ``reduce`` (single or per group;
    ``reduce=None``: none, the input gradient alone). Shared with the grouped launcher."""
    n, h = out.shape
    dout, out = dout.contiguous(), out.contiguous()
    stages = stage_layout(h, weights, inverse)
    in_a, _, ha, hb = stage_dims(stages)
    buffers = backward_buffers(n, in_a, ha, hb, inp, stages[2], out.dtype, out.device)
    dinp = torch.empty((n, h), dtype=out.dtype, device=out.device)
    if n > 0 and route(ha, hb) == "gemm":
        gemm_coupling_backward(linear, dout, out, inp is None, dinp, stages, buffers, activation, inverse)
    elif n > 0:
        fused(dout, out, dinp, stages, buffers)
    if reduce is None:
        return (dinp,)
    return (dinp, *coupling_weight_grads(reduce, dout, out, dinp, *buffers, activation, inverse, *stages[2:]))


def stage_layout(h, weights, inverse):
    """Map (F, G) to stages (A, B) and the column offsets of src_A / tgt_A for a direction: ``((wa1, ba1, wa2,
    ba2), (wb1, bb1, wb2, bb2), off_src, off_tgt)``. Weights stay in their dtype (the kernels round them on
    load); single or stacked over groups (``[G, ...]``: the grouped launchers)."""
    f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2 = [w.contiguous() for w in weights]
    len1 = h // 2
    if inverse:  # A = G on y1 (cols [0, len1)), writes x2 (cols [len1, h)); B = F
        return (g_w1, g_b1, g_w2, g_b2), (f_w1, f_b1, f_w2, f_b2), 0, len1
    return (f_w1, f_b1, f_w2, f_b2), (g_w1, g_b1, g_w2, g_b2), len1, 0


def stage_dims(stages):
    """``(in_a, out_a, ha, hb)`` of a ``stage_layout``: stage A maps ``in_a`` columns (src_A) through ``ha``
    hidden units onto ``out_a`` columns (tgt_A); stage B's MLP has ``hb`` hidden units."""
    (wa1, _, wa2, _), (wb1, _, _, _), _, _ = stages
    return wa1.shape[-1], wa2.shape[-2], wa1.shape[-2], wb1.shape[-2]


def backward_buffers(n, in_a, ha, hb, inp, off_src, dt, dev):
    """``(src_a, za, zb, dza, dzb)`` of a backward: src_a is the saved input's src_A columns, or a new
    ``[N, IN_A]`` buffer the backward rebuilds it into (shared with the grouped launcher)."""
    za, zb = torch.empty((n, ha), dtype=dt, device=dev), torch.empty((n, hb), dtype=dt, device=dev)
    src_a = inp[:, off_src:off_src + in_a] if inp is not None else torch.empty((n, in_a), dtype=dt, device=dev)
    return src_a, za, zb, torch.empty_like(za), torch.empty_like(zb)


def coupling_weight_grads(reduce, dout, out, dinp, src_a, za, zb, dza, dzb, activation, inverse, off_src, off_tgt):
    """The eight weight and bias gradients as token reductions ``reduce(A, B, act) = (A^T act(B), A.sum(0))``
    (single or per group), in the order (F: w1, b1, w2, b2, G: w1, b1, w2, b2)."""
    in_a = src_a.shape[1]
    out_a = dinp.shape[1] - in_a
    sign = -1.0 if inverse else 1.0
    d_wb2, d_bb2 = reduce(dout[:, off_src:off_src + in_a], zb, activation)
    d_wb1, d_bb1 = reduce(dzb, out[:, off_tgt:off_tgt + out_a], 0)
    d_wa2, d_ba2 = reduce(dinp[:, off_tgt:off_tgt + out_a], za, activation)
    d_wa1, d_ba1 = reduce(dza, src_a, 0)
    grads_a = (d_wa1, d_ba1, sign * d_wa2, sign * d_ba2)
    grads_b = (d_wb1, d_bb1, sign * d_wb2, sign * d_bb2)
    return (*grads_b, *grads_a) if inverse else (*grads_a, *grads_b)


# ----------------------------------------------------------------------------------------------------------
# the "gemm" route (shared with the grouped launchers: ``linear`` is ``fused_linear`` or the per-row GEMM)
# ----------------------------------------------------------------------------------------------------------
def gemm_coupling(linear, x, out, stages, activation, inverse):
    """The coupling as four GEMMs into ``out``: ``zA = src_A W_A1^T + b_A1``; ``dst_A = tgt_A + sign (act(zA)
    W_A2^T + b_A2)``; ``zB = dst_A W_B1^T + b_B1``; ``dst_B = src_A + sign (act(zB) W_B2^T + b_B2)``. The
    halves are column views of x and out (no copies); act(z) is applied on load, never stored."""
    (wa1, ba1, wa2, ba2), (wb1, bb1, wb2, bb2), off_src, off_tgt = stages
    in_a, out_a, ha, hb = stage_dims(stages)
    sign = -1.0 if inverse else 1.0
    src, tgt = x[:, off_src:off_src + in_a], x[:, off_tgt:off_tgt + out_a]
    dst_a, dst_b = out[:, off_tgt:off_tgt + out_a], out[:, off_src:off_src + in_a]
    za = linear(src, wa1, (in_a, 1), ha, EPI_BIAS, bias=ba1)
    linear(za, wa2, (ha, 1), out_a, EPI_RESIDUAL, bias=ba2, residual=tgt, scaling=sign, activation=activation,
           a_activation=True, out=dst_a)
    zb = linear(dst_a, wb1, (out_a, 1), hb, EPI_BIAS, bias=bb1)
    linear(zb, wb2, (hb, 1), in_a, EPI_RESIDUAL, bias=bb2, residual=src, scaling=sign, activation=activation,
           a_activation=True, out=dst_b)


def gemm_coupling_backward(linear, dout, out, rebuild, dinp, stages, buffers, activation, inverse):
    """The backward's GEMMs (``dout``, ``out`` contiguous): the per-token tensors ``buffers`` = (src_a, za, zb,
    dza, dzb) and the input gradient ``dinp``, for the weight-gradient reductions:

        zB = dst_A W_B1^T + b_B1;  dzB = sign (d_dstB W_B2) act'(zB)
        src_A = dst_B - sign (act(zB) W_B2^T + b_B2)      (``rebuild``; else the saved input's columns)
        zA = src_A W_A1^T + b_A1;  gA = d_dstA + dzB W_B1  (into dinp's tgt_A columns)
        dzA = sign (gA W_A2) act'(zA);  d_srcA = d_dstB + dzA W_A1  (into dinp's src_A columns)

    Rebuilding, a token whose rebuilt src_A holds Inf or NaN (its output did) is lost: the zA GEMM marks it
    and gives it NaN pre-activations, the dzA GEMM NaN gradients (``linear.LOST_MARK`` / ``LOST_POISON``),
    as the fused route's kernels do."""
    (wa1, ba1, wa2, _), (wb1, bb1, wb2, bb2), off_src, off_tgt = stages
    in_a, out_a, ha, hb = stage_dims(stages)
    src_a, za, zb, dza, dzb = buffers
    sign = -1.0 if inverse else 1.0
    cols_src, cols_tgt = slice(off_src, off_src + in_a), slice(off_tgt, off_tgt + out_a)
    linear(out[:, cols_tgt], wb1, (out_a, 1), hb, EPI_BIAS, bias=bb1, out=zb)
    linear(dout[:, cols_src], wb2, (1, hb), hb, EPI_DACT, z=zb, scaling=sign, activation=activation, out=dzb)
    lost = torch.empty((out.shape[0],), dtype=torch.int8, device=out.device) if rebuild else None
    if rebuild:
        linear(zb, wb2, (hb, 1), in_a, EPI_RESIDUAL, bias=bb2, residual=out[:, cols_src], scaling=-sign,
               activation=activation, a_activation=True, out=src_a)
    linear(src_a, wa1, (in_a, 1), ha, EPI_BIAS, bias=ba1, out=za, lost=lost,
           lost_rows=LOST_MARK if rebuild else LOST_NONE)
    linear(dzb, wb1, (1, out_a), out_a, EPI_ADD, residual=dout[:, cols_tgt], out=dinp[:, cols_tgt])
    linear(dinp[:, cols_tgt], wa2, (1, ha), ha, EPI_DACT, z=za, scaling=sign, activation=activation, out=dza,
           lost=lost, lost_rows=LOST_POISON if rebuild else LOST_NONE)
    linear(dza, wa1, (1, in_a), in_a, EPI_ADD, residual=dout[:, cols_src], out=dinp[:, cols_src])


# ----------------------------------------------------------------------------------------------------------
# the "fused" route
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _hidden(SRC, stride_sm, stride_sk, rows, rmask, W1, B1, IN, HID,
            CHECK_FINITE: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
            H0: tl.constexpr, H1: tl.constexpr):
    """``z = src W1^T + b1`` for a token block as two column chunks ``[BLOCK_M, H0]``, ``[BLOCK_M, H1]``
    (hidden units ``[0, H0)`` and ``[H0, H0 + H1)``), fp32 after rounding to the activation dtype; padding
    columns are exactly 0. Each src chunk is loaded once for both. Also returns which rows of src hold a
    non-finite value (``CHECK_FINITE``; else all False)."""
    dt = SRC.dtype.element_ty
    c0 = tl.arange(0, H0)
    c1 = H0 + tl.arange(0, H1)
    acc0 = tl.zeros((BLOCK_M, H0), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, H1), dtype=tl.float32)
    bad = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, IN, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        kmask = kc < IN
        s = tl.load(SRC + rows[:, None] * stride_sm + kc[None, :] * stride_sk,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc0, acc1 = _accumulate_wt(acc0, acc1, s, W1, kc, kmask, HID, 1, IN, dt, DOT_PREC, H0, H1)
        if CHECK_FINITE:
            bad = tl.maximum(bad, tl.max(tl.where(tl.abs(s.to(tl.float32)) < float("inf"), 0, 1), axis=1))
    # (padding columns exactly 0 even when src holds Inf: a masked-out weight is 0 and Inf * 0 is NaN)
    z0 = tl.where((c0 < HID)[None, :], acc0 + load_bias(B1, c0, c0 < HID, dt)[None, :], 0.0)
    z1 = tl.where((c1 < HID)[None, :], acc1 + load_bias(B1, c1, c1 < HID, dt)[None, :], 0.0)
    return z0.to(dt).to(tl.float32), z1.to(dt).to(tl.float32), bad != 0


@triton.jit
def _times_wt(a0, a1, W, nc, nmask, HID, stride_n, stride_h, dt,
              DOT_PREC: tl.constexpr, H0: tl.constexpr, H1: tl.constexpr):
    """``a @ M`` for rows held as two hidden chunks ``a0 [rows, H0]``, ``a1 [rows, H1]`` and the weight
    ``M[h, n] = W[n * stride_n + h * stride_h]`` for the columns ``nc``: [rows, len(nc)] fp32. (``W2: [OUT,
    HID]`` gives ``a W2^T`` with strides (HID, 1); ``W1: [HID, IN]`` gives ``a W1`` with strides (1, IN).)"""
    c0 = tl.arange(0, H0)
    c1 = H0 + tl.arange(0, H1)
    w0 = tl.load(W + nc[None, :] * stride_n + c0[:, None] * stride_h, mask=nmask[None, :] & (c0 < HID)[:, None],
                 other=0.0)
    w1 = tl.load(W + nc[None, :] * stride_n + c1[:, None] * stride_h, mask=nmask[None, :] & (c1 < HID)[:, None],
                 other=0.0)
    p = tl.dot(a0, w0.to(dt), input_precision=DOT_PREC)
    return tl.dot(a1, w1.to(dt), p, input_precision=DOT_PREC)


@triton.jit
def _accumulate_wt(acc0, acc1, v, W, nc, nmask, HID, stride_n, stride_h, dt,
                   DOT_PREC: tl.constexpr, H0: tl.constexpr, H1: tl.constexpr):
    """``acc += v @ M^T`` into the two hidden chunks, ``v: [rows, len(nc)]``, ``M[h, n]`` as in ``_times_wt``
    (``W1: [HID, IN]`` gives ``v W1^T`` with strides (1, IN); ``W2: [OUT, HID]`` gives ``v W2`` with (HID, 1))."""
    c0 = tl.arange(0, H0)
    c1 = H0 + tl.arange(0, H1)
    w0 = tl.load(W + c0[None, :] * stride_h + nc[:, None] * stride_n, mask=(c0 < HID)[None, :] & nmask[:, None],
                 other=0.0)
    w1 = tl.load(W + c1[None, :] * stride_h + nc[:, None] * stride_n, mask=(c1 < HID)[None, :] & nmask[:, None],
                 other=0.0)
    acc0 = tl.dot(v, w0.to(dt), acc0, input_precision=DOT_PREC)
    return acc0, tl.dot(v, w1.to(dt), acc1, input_precision=DOT_PREC)


@triton.jit
def _nice_fwd_kernel(
    X, OUT, WA1, BA1, WA2, BA2, WB1, BB1, WB2, BB2,
    N, IN_A, OUT_A, HA, HB, OFF_SRC, OFF_TGT,
    stride_xm, stride_xh, stride_om, stride_oh,
    ACT: tl.constexpr, INVERSE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HA0: tl.constexpr, HA1: tl.constexpr, HB0: tl.constexpr,
    HB1: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    nice_fwd_block(X, OUT, WA1, BA1, WA2, BA2, WB1, BB1, WB2, BB2, rows, rows < N,
                   IN_A, OUT_A, HA, HB, OFF_SRC, OFF_TGT, stride_xm, stride_xh, stride_om, stride_oh,
                   ACT, INVERSE, DOT_PREC, BLOCK_M, BLOCK_K, HA0, HA1, HB0, HB1)


@triton.jit
def nice_fwd_block(
    X, OUT, WA1, BA1, WA2, BA2, WB1, BB1, WB2, BB2, rows, rmask,
    IN_A, OUT_A, HA, HB, OFF_SRC, OFF_TGT,
    stride_xm, stride_xh, stride_om, stride_oh,
    ACT: tl.constexpr, INVERSE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HA0: tl.constexpr, HA1: tl.constexpr, HB0: tl.constexpr,
    HB1: tl.constexpr,
):
    """The coupling of one token block (``rows`` int64, ``rmask``); shared with the grouped kernel. Hidden
    activations stay on chip as two chunks (HA0 + HA1 >= HA: 192 = 128 + 64, no padding to 256)."""
    dt = X.dtype.element_ty
    sign = -1.0 if INVERSE else 1.0
    za0, za1, _ = _hidden(X + OFF_SRC * stride_xh, stride_xm, stride_xh, rows, rmask, WA1, BA1, IN_A, HA,
                          False, DOT_PREC, BLOCK_M, BLOCK_K, HA0, HA1)
    aa0 = apply_activation(za0, ACT).to(dt)
    aa1 = apply_activation(za1, ACT).to(dt)

    # dst_A = tgt_A + sign * (aA W_A2^T + b_A2), chunk by chunk; each chunk also feeds zB = dst_A W_B1^T.
    accb0 = tl.zeros((BLOCK_M, HB0), dtype=tl.float32)
    accb1 = tl.zeros((BLOCK_M, HB1), dtype=tl.float32)
    for n0 in range(0, OUT_A, BLOCK_K):
        nc = n0 + tl.arange(0, BLOCK_K)
        nmask = nc < OUT_A
        m2 = rmask[:, None] & nmask[None, :]
        p = _times_wt(aa0, aa1, WA2, nc, nmask, HA, HA, 1, dt, DOT_PREC, HA0, HA1)
        p += load_bias(BA2, nc, nmask, dt)[None, :]
        tgt = tl.load(X + rows[:, None] * stride_xm + (OFF_TGT + nc)[None, :] * stride_xh, mask=m2, other=0.0)
        dst = (tgt.to(tl.float32) + sign * p).to(dt)
        tl.store(OUT + rows[:, None] * stride_om + (OFF_TGT + nc)[None, :] * stride_oh, dst, mask=m2)
        accb0, accb1 = _accumulate_wt(accb0, accb1, tl.where(m2, dst, 0.0).to(dt), WB1, nc, nmask, HB, 1, OUT_A,
                                      dt, DOT_PREC, HB0, HB1)
    hb0 = tl.arange(0, HB0)
    hb1 = HB0 + tl.arange(0, HB1)
    # (padding columns exactly 0 even when dst_A holds Inf)
    zb0 = tl.where((hb0 < HB)[None, :], accb0 + load_bias(BB1, hb0, hb0 < HB, dt)[None, :], 0.0).to(dt)
    zb1 = tl.where((hb1 < HB)[None, :], accb1 + load_bias(BB1, hb1, hb1 < HB, dt)[None, :], 0.0).to(dt)
    ab0 = apply_activation(zb0.to(tl.float32), ACT).to(dt)
    ab1 = apply_activation(zb1.to(tl.float32), ACT).to(dt)

    # dst_B = src_A + sign * (aB W_B2^T + b_B2).
    for n0 in range(0, IN_A, BLOCK_K):
        nc = n0 + tl.arange(0, BLOCK_K)
        nmask = nc < IN_A
        m2 = rmask[:, None] & nmask[None, :]
        q = _times_wt(ab0, ab1, WB2, nc, nmask, HB, HB, 1, dt, DOT_PREC, HB0, HB1)
        q += load_bias(BB2, nc, nmask, dt)[None, :]
        src = tl.load(X + rows[:, None] * stride_xm + (OFF_SRC + nc)[None, :] * stride_xh, mask=m2, other=0.0)
        tl.store(OUT + rows[:, None] * stride_om + (OFF_SRC + nc)[None, :] * stride_oh,
                 (src.to(tl.float32) + sign * q).to(dt), mask=m2)


@triton.jit
def _store_chunks(PTR, rows, rmask, WIDTH, v0, v1, H0: tl.constexpr, H1: tl.constexpr):
    """Store a [rows, WIDTH] per-token tensor held as two column chunks (row stride WIDTH)."""
    c0 = tl.arange(0, H0)
    c1 = H0 + tl.arange(0, H1)
    tl.store(PTR + rows[:, None] * WIDTH + c0[None, :], v0, mask=rmask[:, None] & (c0 < WIDTH)[None, :])
    tl.store(PTR + rows[:, None] * WIDTH + c1[None, :], v1, mask=rmask[:, None] & (c1 < WIDTH)[None, :])


@triton.jit
def _load_chunks(PTR, rows, rmask, WIDTH, H0: tl.constexpr, H1: tl.constexpr):
    c0 = tl.arange(0, H0)
    c1 = H0 + tl.arange(0, H1)
    v0 = tl.load(PTR + rows[:, None] * WIDTH + c0[None, :], mask=rmask[:, None] & (c0 < WIDTH)[None, :], other=0.0)
    v1 = tl.load(PTR + rows[:, None] * WIDTH + c1[None, :], mask=rmask[:, None] & (c1 < WIDTH)[None, :], other=0.0)
    return v0, v1


@triton.jit
def _nice_bwd_b_kernel(
    DOUT, OUT, SRC, ZB, DZB, WB1, BB1, WB2, BB2,
    N, IN_A, OUT_A, HB, OFF_SRC, OFF_TGT,
    ACT: tl.constexpr, INVERSE: tl.constexpr, REBUILD: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HB0: tl.constexpr, HB1: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    nice_bwd_b_block(DOUT, OUT, SRC, ZB, DZB, WB1, BB1, WB2, BB2, rows, rows < N, IN_A, OUT_A, HB,
                     OFF_SRC, OFF_TGT, ACT, INVERSE, REBUILD, DOT_PREC, BLOCK_M, BLOCK_K, HB0, HB1)


@triton.jit
def nice_bwd_b_block(
    DOUT, OUT, SRC, ZB, DZB, WB1, BB1, WB2, BB2, rows, rmask,
    IN_A, OUT_A, HB, OFF_SRC, OFF_TGT,
    ACT: tl.constexpr, INVERSE: tl.constexpr, REBUILD: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HB0: tl.constexpr, HB1: tl.constexpr,
):
    """Stage B's backward for one token block (shared with the grouped kernel): zB from dst_A, then one pass
    over the src_A columns for ``dzB = sign (d_dstB W_B2) act'(zB)`` and, with ``REBUILD``, the input
    ``src_A = dst_B - sign MLP_B(dst_A)`` into SRC ``[N, IN_A]``. DOUT and OUT are contiguous
    ``[N, IN_A + OUT_A]``; writes ZB and DZB ``[N, HB]``."""
    H = IN_A + OUT_A
    dt = DOUT.dtype.element_ty
    sign = -1.0 if INVERSE else 1.0
    zb0, zb1, _ = _hidden(OUT + OFF_TGT, H, 1, rows, rmask, WB1, BB1, OUT_A, HB, False, DOT_PREC, BLOCK_M, BLOCK_K,
                          HB0, HB1)
    ab0 = apply_activation(zb0, ACT).to(dt)
    ab1 = apply_activation(zb1, ACT).to(dt)
    hb0 = tl.arange(0, HB0)
    hb1 = HB0 + tl.arange(0, HB1)
    dhb0 = tl.zeros((BLOCK_M, HB0), dtype=tl.float32)
    dhb1 = tl.zeros((BLOCK_M, HB1), dtype=tl.float32)
    for n0 in range(0, IN_A, BLOCK_K):
        nc = n0 + tl.arange(0, BLOCK_K)
        nmask = nc < IN_A
        m2 = rmask[:, None] & nmask[None, :]
        ddst = tl.load(DOUT + rows[:, None] * H + (OFF_SRC + nc)[None, :], mask=m2, other=0.0)
        dhb0, dhb1 = _accumulate_wt(dhb0, dhb1, ddst, WB2, nc, nmask, HB, HB, 1, dt, DOT_PREC, HB0, HB1)
        if REBUILD:  # src_A = dst_B - sign * MLP_B(dst_A): invert stage B instead of having saved the input
            q = _times_wt(ab0, ab1, WB2, nc, nmask, HB, HB, 1, dt, DOT_PREC, HB0, HB1)
            q += load_bias(BB2, nc, nmask, dt)[None, :]
            dst = tl.load(OUT + rows[:, None] * H + (OFF_SRC + nc)[None, :], mask=m2, other=0.0)
            tl.store(SRC + rows[:, None] * IN_A + nc[None, :], (dst.to(tl.float32) - sign * q).to(dt), mask=m2)
    # (padding columns exactly 0: an Inf in a real column times a masked 0 is NaN)
    dzb0 = activation_backward(sign * tl.where((hb0 < HB)[None, :], dhb0, 0.0), zb0, ACT).to(dt)
    dzb1 = activation_backward(sign * tl.where((hb1 < HB)[None, :], dhb1, 0.0), zb1, ACT).to(dt)
    _store_chunks(ZB, rows, rmask, HB, zb0.to(dt), zb1.to(dt), HB0, HB1)
    _store_chunks(DZB, rows, rmask, HB, dzb0, dzb1, HB0, HB1)


@triton.jit
def _nice_bwd_a_kernel(
    DOUT, SRC, DINP, ZA, DZA, DZB, WA1, BA1, WA2, WB1,
    N, IN_A, OUT_A, HA, HB, OFF_SRC, OFF_TGT, stride_sm, stride_sk,
    ACT: tl.constexpr, INVERSE: tl.constexpr, REBUILT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HA0: tl.constexpr, HA1: tl.constexpr, HB0: tl.constexpr,
    HB1: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    nice_bwd_a_block(DOUT, SRC, DINP, ZA, DZA, DZB, WA1, BA1, WA2, WB1, rows, rows < N, IN_A, OUT_A, HA, HB,
                     OFF_SRC, OFF_TGT, stride_sm, stride_sk,
                     ACT, INVERSE, REBUILT, DOT_PREC, BLOCK_M, BLOCK_K, HA0, HA1, HB0, HB1)


@triton.jit
def nice_bwd_a_block(
    DOUT, SRC, DINP, ZA, DZA, DZB, WA1, BA1, WA2, WB1, rows, rmask,
    IN_A, OUT_A, HA, HB, OFF_SRC, OFF_TGT, stride_sm, stride_sk,
    ACT: tl.constexpr, INVERSE: tl.constexpr, REBUILT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HA0: tl.constexpr, HA1: tl.constexpr, HB0: tl.constexpr,
    HB1: tl.constexpr,
):
    """Stage A's backward and the input gradient for one token block (shared with the grouped kernel):
    zA from src_A (``SRC`` with its strides: the saved input's columns, or the rebuilt ``[N, IN_A]``), then
    ``gA = d_dstA + dzB W_B1`` into DINP's tgt_A columns, ``dzA = sign (gA W_A2) act'(zA)`` and
    ``d_srcA = d_dstB + dzA W_A1`` into its src_A columns. Writes ZA and DZA ``[N, HA]``."""
    H = IN_A + OUT_A
    dt = DOUT.dtype.element_ty
    sign = -1.0 if INVERSE else 1.0
    za0, za1, lost = _hidden(SRC, stride_sm, stride_sk, rows, rmask, WA1, BA1, IN_A, HA, REBUILT, DOT_PREC,
                             BLOCK_M, BLOCK_K, HA0, HA1)
    # Where the output held Inf/NaN, the rebuilt src_A is lost (x + Inf - Inf): that row's zA and dzA become
    # NaN, so every gradient that depends on src_A is NaN rather than a wrong finite number.
    _store_chunks(ZA, rows, rmask, HA, tl.where(lost[:, None], float("nan"), za0).to(dt),
                  tl.where(lost[:, None], float("nan"), za1).to(dt), HA0, HA1)
    dzb0, dzb1 = _load_chunks(DZB, rows, rmask, HB, HB0, HB1)
    ha0 = tl.arange(0, HA0)
    ha1 = HA0 + tl.arange(0, HA1)
    dha0 = tl.zeros((BLOCK_M, HA0), dtype=tl.float32)
    dha1 = tl.zeros((BLOCK_M, HA1), dtype=tl.float32)
    for n0 in range(0, OUT_A, BLOCK_K):  # gA = d_dstA + dzB W_B1 (the gradient of tgt_A), and gA W_A2
        nc = n0 + tl.arange(0, BLOCK_K)
        nmask = nc < OUT_A
        m2 = rmask[:, None] & nmask[None, :]
        ddst = tl.load(DOUT + rows[:, None] * H + (OFF_TGT + nc)[None, :], mask=m2, other=0.0)
        ga = ddst.to(tl.float32) + _times_wt(dzb0, dzb1, WB1, nc, nmask, HB, 1, OUT_A, dt, DOT_PREC, HB0, HB1)
        tl.store(DINP + rows[:, None] * H + (OFF_TGT + nc)[None, :], ga.to(dt), mask=m2)
        dha0, dha1 = _accumulate_wt(dha0, dha1, tl.where(m2, ga, 0.0).to(dt), WA2, nc, nmask, HA, HA, 1, dt,
                                    DOT_PREC, HA0, HA1)
    tl.debug_barrier()  # (ZA was written by other threads of this program) read it back: fewer live registers
    za0, za1 = _load_chunks(ZA, rows, rmask, HA, HA0, HA1)
    dza0 = activation_backward(sign * tl.where((ha0 < HA)[None, :], dha0, 0.0), za0.to(tl.float32), ACT)
    dza1 = activation_backward(sign * tl.where((ha1 < HA)[None, :], dha1, 0.0), za1.to(tl.float32), ACT)
    dza0 = tl.where(lost[:, None], float("nan"), dza0).to(dt)
    dza1 = tl.where(lost[:, None], float("nan"), dza1).to(dt)
    _store_chunks(DZA, rows, rmask, HA, dza0, dza1, HA0, HA1)
    for n0 in range(0, IN_A, BLOCK_K):  # d_srcA = d_dstB + dzA W_A1
        nc = n0 + tl.arange(0, BLOCK_K)
        nmask = nc < IN_A
        m2 = rmask[:, None] & nmask[None, :]
        ddst = tl.load(DOUT + rows[:, None] * H + (OFF_SRC + nc)[None, :], mask=m2, other=0.0)
        dsrc = ddst.to(tl.float32) + _times_wt(dza0, dza1, WA1, nc, nmask, HA, 1, IN_A, dt, DOT_PREC, HA0, HA1)
        tl.store(DINP + rows[:, None] * H + (OFF_SRC + nc)[None, :], dsrc.to(dt), mask=m2)


def hidden_chunks(hidden: int) -> tuple[int, int]:
    """Two power-of-two chunks covering a hidden width with little padding: 192 -> (128, 64), 256 -> (128, 128),
    96 -> (64, 32); at least 16 each (tl.dot's smallest operand)."""
    first = max(16, triton.next_power_of_2(max(hidden, 2)) // 2)
    return first, pow2_at_least(hidden - first)


def block_config(ha, hb, dtype, block_m=None, block_k=None):
    """``(BLOCK_M, BLOCK_K, (HA0, HA1), (HB0, HB1), launch options)`` of the fused route's kernels (shared with
    the grouped launchers). On a GPU in bf16/fp16: 64-token blocks, so every product is a warpgroup MMA
    (Hopper's wgmma works on 64-row blocks) and a program reads the four weights once per 64 tokens; 32-wide
    chunks of the halves, 16 wide for hidden widths over 192 (fp32 master weights are converted in registers
    on their way to shared memory: wider chunks spill in the backward), 8 warps. fp32 (IEEE products on FMA
    units): 32-token blocks."""
    chunks_a, chunks_b = hidden_chunks(ha), hidden_chunks(hb)
    if interpreting():
        bm, bk = 128, 128
    else:
        width = max(sum(chunks_a), sum(chunks_b))
        bm, bk = (32, 32) if dtype == torch.float32 else (64, 32 if width <= 192 else 16)
    return block_m or bm, block_k or bk, chunks_a, chunks_b, dict(num_warps=8, num_stages=NUM_STAGES)


def _fused_coupling(x, out, stages, activation, inverse, block_m, block_k):
    (wa1, ba1, wa2, ba2), (wb1, bb1, wb2, bb2), off_src, off_tgt = stages
    n = x.shape[0]
    in_a, out_a, ha, hb = stage_dims(stages)
    bm, bk, (ha0, ha1), (hb0, hb1), launch = block_config(ha, hb, x.dtype, block_m, block_k)
    _nice_fwd_kernel[(triton.cdiv(n, bm),)](
        x, out, wa1, ba1, wa2, ba2, wb1, bb1, wb2, bb2,
        n, in_a, out_a, ha, hb, off_src, off_tgt,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        ACT=activation, INVERSE=bool(inverse), DOT_PREC=dot_precision(x.dtype),
        BLOCK_M=bm, BLOCK_K=bk, HA0=ha0, HA1=ha1, HB0=hb0, HB1=hb1, **launch,
    )


def _fused_coupling_backward(dout, out, rebuild, dinp, stages, buffers, activation, inverse, block_m, block_k):
    """Two kernels per token block: stage B (and the rebuilt input), then stage A and the input gradient;
    each holds one stage's hidden tiles on chip."""
    (wa1, ba1, wa2, _), (wb1, bb1, wb2, bb2), off_src, off_tgt = stages
    n, dt = out.shape[0], out.dtype
    in_a, out_a, ha, hb = stage_dims(stages)
    src_a, za, zb, dza, dzb = buffers
    bm, bk, (ha0, ha1), (hb0, hb1), launch = block_config(ha, hb, dt, block_m, block_k)
    common = dict(ACT=activation, INVERSE=bool(inverse), DOT_PREC=dot_precision(dt), BLOCK_M=bm, BLOCK_K=bk,
                  **launch)
    _nice_bwd_b_kernel[(triton.cdiv(n, bm),)](
        dout, out, src_a, zb, dzb, wb1, bb1, wb2, bb2, n, in_a, out_a, hb, off_src, off_tgt,
        REBUILD=rebuild, HB0=hb0, HB1=hb1, **common)
    _nice_bwd_a_kernel[(triton.cdiv(n, bm),)](
        dout, src_a, dinp, za, dza, dzb, wa1, ba1, wa2, wb1, n, in_a, out_a, ha, hb, off_src, off_tgt,
        src_a.stride(0), src_a.stride(1),
        REBUILT=rebuild, HA0=ha0, HA1=ha1, HB0=hb0, HB1=hb1, **common)
