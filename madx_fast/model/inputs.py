"""Batch inputs prepared on the host so that a training or inference step never waits for the GPU.

A host-device synchronisation stalls the CPU until every queued kernel has run, so the GPU then idles while
the CPU queues the next ones. Two come with a plain HF masked-LM / token-classification step:

1. Selecting the masked rows with a boolean index (``hidden[labels != -100]``): the number of rows is data
   on the device, so PyTorch must read it back before the head and decoder can be queued.
   ``mlm_positions`` computes the flat positions and targets on the CPU, where the labels are made (padded
   to a multiple of ``multiple`` rows with target -100, so shapes repeat and compile / CUDA graphs reuse).
2. HF's SDPA mask preparation checks whether a 2D padding mask is all ones (``torch.all(mask == 1)`` in
   transformers 4.x, ``padding_mask.all()`` in 5.x) to drop it and let SDPA use flash attention.
   ``encoder_attention_mask`` answers that question from the CPU copy of the mask instead: a batch without
   padding passes no mask at all, a padded one passes the mask in a form HF takes as already prepared.

On transformers 4.x a batch without padding still goes through HF's check (the model builds a ones mask
and tests it); a prepared mask instead would keep SDPA off its flash kernel, which costs more than the
sync. For the BERT family under SDPA (``_HOST_CHECKED_MASK``) the check is the only use of a 2D mask, so
it is handed the host copy: HF's test then reads host memory and drops the mask, and the step is free of
syncs on both transformers lines. Elsewhere on 4.x an unpadded batch keeps its one sync.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# The label of a position that has no target (padding, special tokens, unmasked or non-first sub-tokens):
# torch's cross-entropy default, used by HF and AdapterHub alike.
IGNORE_INDEX = -100


def lm_targets(labels: torch.Tensor, shift: bool, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The label each position is scored against: ``labels`` itself (masked LM, seq2seq decoder), or with
    ``shift`` (causal LM) the next position's label, ``ignore_index`` at the last position (as HF's causal loss
    pads and shifts). Same shape as ``labels [..., L]``."""
    if not shift:
        return labels
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def mlm_positions(labels: torch.Tensor, *, multiple: int = 64, ignore_index: int = IGNORE_INDEX,
                  shift: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions, targets)`` of the labelled tokens of ``labels [B, L]``: flat indices into ``B * L`` and
    their labels, padded with position 0 / target ``ignore_index`` up to a multiple of ``multiple``. With
    ``shift`` (causal LM) position t carries the label of t + 1 (``lm_targets``).
    Call it where the labels are made (on the CPU) and move both to the device with the batch."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, length], got shape {tuple(labels.shape)}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    flat = lm_targets(labels, shift, ignore_index).reshape(-1)
    positions = (flat != ignore_index).nonzero().squeeze(1)
    n = positions.numel()
    size = max(multiple, -(-n // multiple) * multiple)
    out_pos = torch.zeros(size, dtype=torch.long, device=labels.device)
    out_tgt = torch.full((size,), ignore_index, dtype=torch.long, device=labels.device)
    out_pos[:n] = positions
    out_tgt[:n] = flat[positions]
    return out_pos, out_tgt


# model types whose transformers 4.x forward hands a 2D mask under SDPA (absolute positions, not a decoder)
# to nothing but ``_prepare_4d_attention_mask_for_sdpa``, which tests it and returns None when all ones
_HOST_CHECKED_MASK = frozenset({"bert", "roberta", "camembert", "xlm-roberta", "xlm-roberta-xl"})


def _host_checked(model) -> bool:
    """Whether ``model`` (transformers 4.x) may be given the host copy of an all-ones 2D mask."""
    config = getattr(model, "config", None)
    return (getattr(config, "model_type", None) in _HOST_CHECKED_MASK and _attention_implementation(model) == "sdpa"
            and getattr(config, "position_embedding_type", "absolute") == "absolute"
            and not getattr(config, "is_decoder", False))


def _attention_implementation(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def encoder_attention_mask(model, attention_mask: torch.Tensor | None, *, padded: bool,
                           host_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """The ``attention_mask`` to hand the HF ``model`` for a 2D padding mask ``[B, L]`` (already on the
    model's device), given ``padded`` = whether any entry is 0, known on the host, and optionally
    ``host_mask``, the same mask on the host.

    - no padding, transformers >= 5: ``None`` (SDPA goes straight to flash attention, nothing is checked);
    - no padding, transformers 4.x, a BERT-family model under SDPA: ``host_mask`` (HF tests it on the host);
    - padding, transformers >= 5 with SDPA: a boolean ``[B, 1, L, L]`` view (HF returns a 4D mask as is);
    - padding, transformers 4.x: a ``[B, L, L]`` view, which HF expands itself without testing it;
    - otherwise the mask unchanged (other attention kernels, masks that are not 2D).
    The model computes the same function with either form."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    b, length = attention_mask.shape
    if TRANSFORMERS_MAJOR >= 5:
        if not padded:
            return None
        if _attention_implementation(model) == "sdpa":
            return attention_mask.bool()[:, None, None, :].expand(b, 1, length, length)
        return attention_mask
    if padded:
        return attention_mask[:, None, :].expand(b, length, length)
    if host_mask is not None and host_mask.device.type == "cpu" and _host_checked(model):
        return host_mask
    return attention_mask
