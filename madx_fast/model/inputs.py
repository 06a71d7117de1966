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

On transformers 4.x an encoder's batch without padding still goes through HF's check (the model builds a
ones mask and tests it); a prepared mask instead would keep SDPA off its flash kernel, which costs more than
the sync. For the BERT family under SDPA (``_HOST_CHECKED_MASK``) the check is the only use of a 2D mask, so
it is handed the host copy: HF's test then reads host memory and drops the mask. A causal model's unpadded
batch passes no mask (its causal kernel). Elsewhere on 4.x (DistilBERT tests every mask) an unpadded batch
keeps its one sync. With transformers >= 5 the step is free of syncs (with SDPA attention).
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


# Model types whose forward, on transformers 4.x, expands a 3D ``[B, L, L]`` mask itself without testing it.
_EXPANDS_3D_MASK = ("xlm-roberta", "roberta", "bert", "xlm-roberta-xl")
# Model types that multiply the 2D mask into their embeddings and test nothing: they keep it as it is.
_OWN_MASK = ("deberta-v2",)


def _model_type(model) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _causal(model) -> bool:
    from .lm_heads import pretraining_objective
    return pretraining_objective(getattr(model, "config", None)) == "causal"


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The boolean ``[B, 1, L, L]`` mask of a causal model for a 2D padding mask: query t attends to the
    non-padding keys up to t (and, so that no row is empty, a padding query to itself)."""
    length = attention_mask.shape[1]
    ones = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device)
    return (ones.tril() & attention_mask.bool()[:, None, None, :]) | torch.eye(length, dtype=torch.bool,
                                                                               device=attention_mask.device)


def encoder_attention_mask(model, attention_mask: torch.Tensor | None, *, padded: bool,
                           host_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """The ``attention_mask`` to hand the HF ``model`` for a 2D padding mask ``[B, L]`` (already on the
    model's device), given ``padded`` = whether any entry is 0, known on the host, and optionally
    ``host_mask``, the same mask on the host.

    - no padding, transformers >= 5 or a causal model: ``None`` (SDPA goes straight to its flash or causal
      kernel, nothing is checked; a config that declares a pad token has HF look for it in the first and last
      input ids, a host read, where the model calls ``warn_if_padding_and_no_attention_mask``: GPT-2, DeBERTa);
    - no padding, transformers 4.x, a BERT-family encoder under SDPA: ``host_mask`` (HF tests it on the host);
    - padding, a causal model (GPT-2, Llama, Mistral, an encoder loaded as a decoder) with SDPA: its full
      boolean ``[B, 1, L, L]`` mask (``causal_padding_mask``; HF takes a 4D mask as prepared), or for BERT /
      RoBERTa / XLM-R as decoders on transformers 4.x (any attention) that mask as ``[B, L, L]``;
    - padding, an encoder on transformers >= 5 with SDPA: a boolean ``[B, 1, L, L]`` view of the padding;
    - padding, BERT / RoBERTa / XLM-R (XL) on transformers 4.x: a ``[B, L, L]`` view, which they expand
      themselves without testing it;
    - otherwise the mask unchanged (DeBERTa, which multiplies it into its embeddings and tests nothing; eager
      attention; DistilBERT on 4.x; masks that are not 2D), and HF may test it (a host read).
    The model computes the same function with either form (at the non-padding positions)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    if _model_type(model) in _OWN_MASK:
        return attention_mask
    causal = _causal(model)
    if not padded:
        if causal or TRANSFORMERS_MAJOR >= 5:
            return None
        if host_mask is not None and host_mask.device.type == "cpu" and _host_checked(model):
            return host_mask
        return attention_mask
    sdpa = _attention_implementation(model) == "sdpa"
    expands_3d = TRANSFORMERS_MAJOR < 5 and _model_type(model) in _EXPANDS_3D_MASK
    if causal:
        if expands_3d:  # an encoder loaded as a decoder takes a 3D mask as given, the causal part included
            return causal_padding_mask(attention_mask)[:, 0].to(attention_mask.dtype)
        return causal_padding_mask(attention_mask) if sdpa else attention_mask
    b, length = attention_mask.shape
    if TRANSFORMERS_MAJOR >= 5:
        return attention_mask.bool()[:, None, None, :].expand(b, 1, length, length) if sdpa else attention_mask
    return attention_mask[:, None, :].expand(b, length, length) if expands_3d else attention_mask
