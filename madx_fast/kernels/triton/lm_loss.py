"""Cross-entropy over a chunk of LM logits and its softmax gradient in one kernel, written over the logits.

For each row ``i`` of ``logits [R, V]`` (any float dtype; fp32 arithmetic) with target ``t_i``:

    lse_i  = log sum_v exp(z_iv)                                   (one streaming pass, online max / sum)
    loss_i = lse_i - z_i,t_i                   (0 where t_i == ignore_index)
    g_iv   = (exp(z_iv - lse_i) - [v == t_i]) * w_i,   w_i = [t_i != ignore_index] / count

``g = dloss/dz`` of ``loss = sum_i loss_i / count`` (softmax minus one-hot, scaled); it is written over the
logits in their own dtype (a second pass), so the caller's next GEMM (``g @ W`` for the hidden states) reads it
where the logits were. Traffic per logit: read twice, written once, in the logits' dtype (bf16: 6 bytes), where
casting to float32 and applying logsumexp, exp, subtract and scale as separate passes moves about 40.

Each program takes ``BLOCK_R`` rows (one on a GPU), streamed in ``BLOCK_V`` columns; each lane keeps its own
running max and sum (rescaled when the max grows), combined once at the end. NaN logits give a NaN loss and gradient as torch's
cross-entropy does; a row of -inf gives lse = -inf. ``count`` is a one-element device tensor (the number of
labelled rows of the whole batch): read on the device, never on the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import interpreting

_LOWEST = tl.constexpr(-3.4028234663852886e38)  # float32's lowest finite: a start for the running max that
# keeps -inf - -inf (NaN) out of the arithmetic


@triton.jit
def _softmax_xent_kernel(
    LOGITS, TARGETS, COUNT, LOSS,
    R, V, stride_row, ignore_index,
    GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    base = LOGITS + rows[:, None] * stride_row  # [BLOCK_R, 1] row pointers
    t = tl.load(TARGETS + rows, mask=rmask, other=ignore_index)
    valid = (t != ignore_index) & rmask
    cols = tl.arange(0, BLOCK_V)[None, :]

    # pass 1: per-lane running max m and sum s of exp(z - m); a NaN is kept in m (z != z)
    m = tl.full([BLOCK_R, BLOCK_V], _LOWEST, tl.float32)
    s = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        mask = rmask[:, None] & (start + cols < V)
        z = tl.load(base + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.where((z > m) | (z != z), z, m)
        s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
        m = m_new
    big = tl.max(m, axis=1)
    total = tl.where(rmask, tl.sum(s * tl.exp(m - big[:, None]), axis=1), 1.0)  # rows past the end: lse 0
    lse = tl.where(rmask, big, 0.0) + tl.log(total)  # a row of -inf: log(0) = -inf

    in_range = valid & (t >= 0) & (t < V)
    z_t = tl.load(LOGITS + rows * stride_row + tl.where(in_range, t, 0), mask=rmask, other=0.0).to(tl.float32)
    z_t = tl.where(in_range | ~valid, z_t, float("nan"))  # an out-of-range target: NaN loss
    tl.store(LOSS + rows, tl.where(valid, lse - z_t, 0.0), mask=rmask)

    if GRAD:  # pass 2: g = (softmax - onehot) * valid / count, over the logits
        scale = tl.where(valid, 1.0 / tl.load(COUNT).to(tl.float32), 0.0)[:, None]
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            mask = rmask[:, None] & (idx < V)
            z = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse[:, None]) * scale
            g = tl.where(idx == t[:, None], g - scale, g)
            tl.store(base + idx, g.to(LOGITS.dtype.element_ty), mask=mask)


def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, count: torch.Tensor, ignore_index: int,
                          grad: bool) -> torch.Tensor:
    """Per-row losses ``[R]`` (float32) of ``logits [R, V]`` (unit column stride) against ``targets [R]``;
    with ``grad``, the logits are overwritten by the loss's gradient (module docstring)."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    if interpreting():  # the interpreter's cost is per program: many rows each, the whole row per step
        block_r, block_v = min(triton.next_power_of_2(rows), 64), triton.next_power_of_2(min(vocab, 4096))
    else:  # a row per program (a vocabulary row is thousands of columns), streamed 2048 at a time
        block_r, block_v = 1, triton.next_power_of_2(min(vocab, 2048))
    _softmax_xent_kernel[(triton.cdiv(rows, block_r),)](
        logits, targets, count, loss, rows, vocab, logits.stride(0), ignore_index,
        GRAD=grad, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
    )
    return loss
