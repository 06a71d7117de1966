"""Cross-entropy over a chunk of LM logits and its softmax gradient in one kernel, written over the logits.

For each row ``i`` of ``logits [R, V]`` (any float dtype; fp32 arithmetic) with target ``t_i``:

    lse_i  = log sum_v exp(z_iv)                                   (one streaming pass, online max / sum)
    loss_i = lse_i - z_i,t_i                   (0 where t_i == ignore_index)
    g_iv   = (exp(z_iv - lse_i) - [v == t_i]) * w_i,   w_i = [t_i != ignore_index] / count

``g = dloss/dz`` of ``loss = sum_i loss_i / count`` (softmax minus one-hot, scaled); it is written over the
logits in their own dtype (a second pass), so the caller's next GEMM (``g @ W`` for the hidden states) reads it
where the logits were. Traffic per logit: read twice, written once, in the logits' dtype (bf16: 6 bytes), where
casting to float32 and applying logsumexp, exp, subtract and scale as separate passes moves about 40.

One program per row: the row is streamed in ``BLOCK_V`` columns; each lane keeps its own running max and sum
(rescaled when the max grows), combined once at the end. NaN logits give a NaN loss and gradient as torch's
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
    V, stride_row, ignore_index,
    GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    t = tl.load(TARGETS + row)
    valid = t != ignore_index
    cols = tl.arange(0, BLOCK_V)

    # pass 1: per-lane running max m and sum s of exp(z - m); a NaN is kept in m (z != z)
    m = tl.full([BLOCK_V], _LOWEST, tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        z = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.where((z > m) | (z != z), z, m)
        s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
        m = m_new
    big = tl.max(m, axis=0)
    lse = big + tl.log(tl.sum(s * tl.exp(m - big), axis=0))  # a row of -inf: log(0) = -inf

    in_range = valid & (t >= 0) & (t < V)
    z_t = tl.load(base + tl.where(in_range, t, 0)).to(tl.float32)
    z_t = tl.where(in_range | (t == ignore_index), z_t, float("nan"))  # an out-of-range target: NaN loss
    tl.store(LOSS + row, tl.where(valid, lse - z_t, 0.0))

    if GRAD:  # pass 2: g = (softmax - onehot) * valid / count, over the logits
        scale = tl.where(valid, 1.0 / tl.load(COUNT).to(tl.float32), 0.0)
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            z = tl.load(base + idx, mask=idx < V, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) * scale
            g = tl.where(idx == t, g - scale, g)
            tl.store(base + idx, g.to(LOGITS.dtype.element_ty), mask=idx < V)


def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, count: torch.Tensor, ignore_index: int,
                          grad: bool) -> torch.Tensor:
    """Per-row losses ``[R]`` (float32) of ``logits [R, V]`` (unit column stride) against ``targets [R]``;
    with ``grad``, the logits are overwritten by the loss's gradient (module docstring)."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    block = triton.next_power_of_2(min(vocab, 8192 if interpreting() else 2048))
    _softmax_xent_kernel[(rows,)](
        logits, targets, count, loss, vocab, logits.stride(0), ignore_index,
        GRAD=grad, BLOCK_V=block, num_warps=8 if block >= 2048 else 4,
    )
    return loss
