"""Masked-LM loss that runs the decoder only at masked positions and never builds the B x L x V logits.

Why: on XLM-R (V = 250002) the decoder over all B*L tokens is ~6 TFLOP per step at B=64, L=256 and its
float32 logits are ~16 GB, yet only the ~15% masked tokens have a label. Here the head runs on the labelled
rows only (``N = #(labels != -100)``), and the decoder + cross-entropy runs over those rows in chunks of
``chunk_size`` rows: each chunk's ``chunk x V`` logits live just long enough to give its loss and its
gradients. Peak extra memory: one chunk of logits in the activation dtype plus the ``N x H`` input gradient
(and a float32 ``V x H`` weight gradient only if the decoder weight is trained, which MAD-X never does).

``madx_mlm_loss(model, input_ids, attention_mask, labels)`` is the training path of an HF
``XLMRobertaForMaskedLM`` / ``BertForMaskedLM`` (with or without MAD-X): encoder -> select labelled rows ->
dense -> GELU -> LayerNorm -> NICE^-1 of the active language adapter -> fused decoder + cross-entropy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.lm_loss import softmax_cross_entropy
from .inputs import IGNORE_INDEX, lm_targets
from .per_row import select_rows
from .wiring import find_parts, first_invertible

# Logits per chunk, in bytes of the compute dtype: on a GPU large chunks keep the decoder's two GEMMs wide
# (g @ W reduces over the vocabulary into a rows x H output: few output tiles unless there are many rows),
# 1 GiB of bf16 logits is ~2100 rows at V = 250002, the whole masked batch of a B=64, L=256 step in 2 chunks.
CHUNK_BYTES_GPU = 1 << 30
CHUNK_BYTES_CPU = 1 << 28
CHUNK_ROWS_MULTIPLE = 64  # GEMM-tile friendly, and the row count madx_fast.model.inputs pads positions to


def default_chunk_size(num_rows: int, vocab_size: int, element_size: int = 4, budget_bytes: int = CHUNK_BYTES_CPU
                       ) -> int:
    """Rows per chunk: the fewest chunks whose logits fit ``budget_bytes``, of equal size (a multiple of
    ``CHUNK_ROWS_MULTIPLE`` where that fits the budget)."""
    limit = max(1, budget_bytes // max(vocab_size * element_size, 1))
    chunks = -(-max(num_rows, 1) // limit)
    rows = -(-max(num_rows, 1) // chunks)
    rounded = -(-rows // CHUNK_ROWS_MULTIPLE) * CHUNK_ROWS_MULTIPLE
    return max(1, min(num_rows, rounded if rounded <= limit else rows))


class FusedLinearCrossEntropy(torch.autograd.Function):
    """``loss = mean_i CE(W h_i + b, t_i)`` over rows with ``t_i != ignore_index``, chunked over rows.

    Backward, derived. With ``z_i = W h_i + b`` and ``loss = (1/n) sum_i (logsumexp(z_i) - z_i[t_i])``
    (``n`` = number of labelled rows):

        dloss/dz_i = (softmax(z_i) - onehot(t_i)) / n  =: g_i     (0 for ignored rows)
        dloss/dh_i = W^T g_i        -> for a chunk:  dH_c = G_c W          [rows, H]
        dloss/dW   = sum_i g_i h_i^T -> summed over chunks: dW += G_c^T H_c [V, H]
        dloss/db   = sum_i g_i       -> db += G_c.sum(0)                   [V]

    ``g`` is known as soon as a chunk's logits are, so the forward computes the gradients chunk by chunk
    (only those whose inputs require grad) and keeps them instead of the logits; backward only scales them
    by the incoming scalar gradient. A chunk's logits are one GEMM in the activation dtype with float32
    accumulation (as ``nn.Linear``); ``madx_fast.ops.lm_loss.softmax_cross_entropy`` then gives the rows'
    losses (float32 arithmetic) and writes ``g`` over the logits in their dtype, in one kernel on the fused
    path: the logits are never held in float32, and ``g @ W`` reads them where they were.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, ignore_index, mean=True):
        n_rows = hidden.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], (
            bias is not None and ctx.needs_input_grad[2])
        grad = need_h or need_w or need_b
        # mean over labelled rows, counted on the device (no host sync); 1 for a sum
        count = ((targets != ignore_index).sum().clamp(min=1).to(torch.float32) if mean
                 else hidden.new_ones((), dtype=torch.float32))
        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        loss_sum = hidden.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for start in range(0, n_rows, chunk_size):
            end = min(start + chunk_size, n_rows)
            h_c = hidden[start:end]
            logits = F.linear(h_c, w, b)  # [rows, V] in the activation dtype
            loss_sum = loss_sum + softmax_cross_entropy(logits, targets[start:end], count,
                                                        ignore_index=ignore_index, grad=grad).sum()
            g = logits  # now dloss/dz of the chunk's rows (when grad)
            if need_h:
                torch.mm(g, w, out=grad_h[start:end])
            if need_w:
                grad_w += (g.t() @ h_c).float()
            if need_b:
                grad_b += g.sum(0, dtype=torch.float32)
            del logits, g
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        t_h, t_w, t_b = ctx.dtypes
        dh = None if grad_h is None else (grad_h * grad_loss.to(grad_h.dtype)).to(t_h)
        dw = None if grad_w is None else (grad_w * grad_loss).to(t_w)
        db = None if grad_b is None else (grad_b * grad_loss).to(t_b)
        return dh, dw, db, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               targets: torch.Tensor, *, chunk_size: int | None = None,
                               ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=..., reduction=...)`` (mean
    over labelled rows, or their sum) without materialising the ``N x V`` logits. ``hidden: [N, H]``,
    ``weight: [V, H]``, ``bias: [V]``, ``targets: [N]``. With no labelled row the loss is 0 (not NaN)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected [V, {hidden.shape[1]}]")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected [{weight.shape[0]}]")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected [{hidden.shape[0]}]")
    if chunk_size is None:
        budget = CHUNK_BYTES_GPU if hidden.is_cuda else CHUNK_BYTES_CPU
        chunk_size = default_chunk_size(hidden.shape[0], weight.shape[0], hidden.element_size(), budget)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, int(chunk_size), ignore_index,
                                         reduction == "mean")


def lm_loss_at_labels(hidden: torch.Tensor, labels: torch.Tensor, head_rows, weight: torch.Tensor,
                      bias: torch.Tensor | None, *, shift: bool = False, reduction: str = "mean",
                      chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of an LM head over the positions of ``hidden [B, L, H]`` that have a target in ``labels
    [B, L]`` (with ``shift``, the causal LM's: position t scored against label t + 1). ``head_rows`` maps rows
    ``[N, H]`` to the projection's inputs (the head's transform: it acts on each row alone, so it runs on the
    labelled rows only); the projection ``weight`` / ``bias`` is fused with the loss. A boolean selection: the
    row count is read back from the device (see ``madx_lm_loss`` for the sync-free ``positions`` form)."""
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but the model output has {tuple(hidden.shape[:-1])}"
                         " positions")
    targets = lm_targets(labels.to(hidden.device), shift)
    selected = targets != IGNORE_INDEX
    return fused_linear_cross_entropy(head_rows(hidden[selected]), weight, bias, targets[selected],
                                      chunk_size=chunk_size, reduction=reduction)


def madx_lm_loss(model, input_ids=None, attention_mask=None, labels=None, *, positions: torch.Tensor | None = None,
                 targets: torch.Tensor | None = None, objective: str | None = None, chunk_size: int | None = None,
                 reduction: str = "mean", **base_kwargs) -> torch.Tensor:
    """The language-modelling loss of an HF masked-LM or causal-LM model (with or without MAD-X), equal to
    ``model(..., labels=labels).loss``, computing the head and the vocabulary projection only at the positions
    that have a target.

    ``objective``: ``"masked"`` (position t predicts ``labels[t]``) or ``"causal"`` (position t predicts
    ``labels[t + 1]``); None takes the model's own (``madx_fast.model.lm_heads``). The head is the model's
    own (BERT-style: dense -> GELU -> LayerNorm; GPT/Llama: none) followed by the NICE inverse of the active
    language adapter when MAD-X is wired in, and the (tied or untied) projection; ``base_kwargs``
    (``token_type_ids``, ``position_ids``, ``inputs_embeds``, ...) go to the base model. ``reduction="sum"``
    gives the sum over the labelled tokens instead of their mean.

    The labelled rows come either from ``labels [B, L]`` (a boolean selection: its row count is read back
    from the device, a host sync, and a data-dependent shape that breaks a torch.compile graph) or, for a
    step without syncs, from ``positions`` and ``targets`` made on the host by
    ``madx_fast.model.inputs.mlm_positions(labels, shift=objective == "causal")`` (flat indices into
    ``B * L``; target -100 rows are padding and count for nothing)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if (positions is None) != (targets is None):
        raise ValueError("give positions and targets together (see madx_fast.model.inputs.mlm_positions)")
    if labels is None and positions is None:
        raise ValueError("the LM loss needs labels (-100 at positions without a target), or positions and targets")
    if positions is not None and (positions.dim() != 1 or targets.shape != positions.shape):
        raise ValueError(f"positions and targets must be 1-D of one length, got shapes {tuple(positions.shape)} "
                         f"and {tuple(targets.shape)}")
    madx = getattr(model, "madx", None)
    parts = madx.parts if madx is not None else find_parts(model)
    head = parts.lm_head
    if head is None or head.objective == "seq2seq":
        raise TypeError(f"{type(model).__name__} has no masked-LM or causal-LM head")
    objective = objective or head.objective
    if objective not in ("masked", "causal"):
        raise ValueError(f"objective must be 'masked' or 'causal', got {objective!r}")
    out = parts.base(input_ids=input_ids, attention_mask=attention_mask, **base_kwargs)
    hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state

    def head_rows(rows, batch_row):
        if madx is None:
            return head.decoder_input(rows)
        with select_rows(madx.state, batch_row):  # per-row languages: each row's own NICE inverse
            return first_invertible(madx.state, head.decoder_input(rows), inverse=True)

    if positions is None:
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {tuple(hidden.shape[:-1])}")
        targets = lm_targets(labels, objective == "causal")
        selected = targets != IGNORE_INDEX
        rows, targets = hidden[selected], targets[selected]  # [N, H]: the only rows the head sees
        batch_row = selected.nonzero()[:, 0] if madx is not None and madx.state.row_groups is not None else None
    else:
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        batch_row = positions // hidden.shape[1]
    return fused_linear_cross_entropy(head_rows(rows, batch_row), head.weight, head.bias, targets,
                                      chunk_size=chunk_size, reduction=reduction)


def madx_mlm_loss(model, input_ids=None, attention_mask=None, labels=None, **kwargs) -> torch.Tensor:
    """``madx_lm_loss`` with the masked-LM objective (an HF ``...ForMaskedLM`` model)."""
    return madx_lm_loss(model, input_ids, attention_mask, labels, objective="masked", **kwargs)
