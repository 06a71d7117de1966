"""Masked-LM, the objective of stage 1: unlabeled text -> packed blocks -> BERT masking -> loss at the masked
positions only (``madx_fast.model.madx_mlm_loss``) -> held-out loss and perplexity.

Blocks are packed RoBERTa-style (texts joined with ``</s>``, cut into ``max_length - 2`` pieces, each wrapped
as ``<s> piece </s>``) and held in memory as int32. ``mask_tokens`` does BERT's 15% masking, 80% ``<mask>``
/ 10% random token / 10% unchanged, with an explicit ``torch.Generator`` so that the masks are part of the
checkpointed RNG state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable, Sequence

import numpy as np
import torch

from ...model import madx_mlm_loss
from ...model.inputs import IGNORE_INDEX, mlm_positions
from ..batches import autocast, model_batch
from ..data import DataError
from ..models import bos_id, check_tokenizer, eos_id
from ..progress import progress


@dataclass
class TextBlocks:
    """Packed blocks of text (stage 1's data, for either objective), held as int32."""

    input_ids: torch.Tensor          # [N, L] int32
    attention_mask: torch.Tensor     # [N, L] int32

    def __len__(self):
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class MlmData(TextBlocks):
    """Packed MLM blocks and the ids the masking needs."""

    special_ids: tuple[int, ...]     # never masked (besides padding)
    mask_id: int
    vocab_size: int


def tokenize_texts(tokenizer, texts: Sequence[str], batch: int = 1000, *,
                   special_tokens: bool = False) -> list[list[int]]:
    """Token ids of each text, without special tokens (or with the tokenizer's own: ``special_tokens``)."""
    out: list[list[int]] = []
    for i in progress(range(0, len(texts), batch), desc="tokenize"):
        enc = tokenizer(list(texts[i:i + batch]), add_special_tokens=special_tokens, truncation=False,
                        return_attention_mask=False, verbose=False)
        out.extend(enc["input_ids"])
    return out


def pack_blocks(token_lists: Iterable[list[int]], max_length: int, bos_id: int, eos_id: int,
                pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoBERTa-style packing (see the module docstring); the last, shorter block is padded. Returns
    ``(input_ids, attention_mask)`` [N, L], int32 (half the memory of int64; batches are widened when made)."""
    if max_length < 3:
        raise DataError(f"max_length must be at least 3, got {max_length}")
    stream: list[int] = []
    for ids in token_lists:
        if ids:
            stream.extend(ids)
            stream.append(eos_id)
    if stream:
        stream.pop()  # the block's own </s> closes the last text
    body = max_length - 2
    flat = torch.tensor(stream, dtype=torch.int32)
    n_full, rest = divmod(flat.numel(), body)
    n = n_full + (1 if rest or n_full == 0 else 0)
    ids = torch.full((n, max_length), pad_id, dtype=torch.int32)
    mask = torch.zeros((n, max_length), dtype=torch.int32)
    ids[:n_full, 1:-1] = flat[:n_full * body].view(n_full, body)
    ids[:n_full, 0], ids[:n_full, -1] = bos_id, eos_id
    mask[:n_full] = 1
    if n > n_full:
        ids[n_full, 0], ids[n_full, 1:rest + 1], ids[n_full, rest + 1] = bos_id, flat[n_full * body:], eos_id
        mask[n_full, :rest + 2] = 1
    return ids, mask


def mlm_data_from_texts(tokenizer, texts: Sequence[str], max_length: int) -> MlmData:
    check_tokenizer(tokenizer, need_mask=True)
    ids, mask = pack_blocks(tokenize_texts(tokenizer, texts), max_length, bos_id(tokenizer), eos_id(tokenizer),
                            tokenizer.pad_token_id)
    return MlmData(ids, mask, tuple(sorted(set(tokenizer.all_special_ids))), tokenizer.mask_token_id,
                   len(tokenizer))


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: Sequence[int], mask_id: int,
                vocab_size: int, generator: torch.Generator, mlm_probability: float = 0.15,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: each maskable position is selected with ``mlm_probability``; a selected position becomes
    ``<mask>`` (80%), a uniformly random token (10%) or stays (10%); ``labels`` holds the original id at
    selected positions and -100 elsewhere. Padding and special tokens are never selected.

    All randomness comes from ``generator`` (on the CPU, drawn in a fixed order: selection, split, random
    ids), so the masks of a batch are a function of the generator's state alone."""
    shape = input_ids.shape
    maskable = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(list(special_ids), dtype=torch.long))
    selected = (torch.rand(shape, generator=generator) < mlm_probability) & maskable
    split = torch.rand(shape, generator=generator)
    random_ids = torch.randint(vocab_size, shape, generator=generator, dtype=torch.long)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    inputs = torch.where(selected & (split < 0.8), torch.full_like(input_ids, mask_id), input_ids)
    inputs = torch.where(selected & (split >= 0.8) & (split < 0.9), random_ids, inputs)
    return inputs, labels


@dataclass(frozen=True)
class MlmObjective:
    """Items are block indices into an ``MlmData``; masks come from the trainer's masking generator, drawn
    for the whole global batch (so every process masks identically and takes its own rows)."""

    # the decoder rows ``prepare`` makes (flat positions, targets): padded rows are position 0, target ignored
    row_keys: ClassVar[tuple[str, str]] = ("mlm_positions", "mlm_targets")

    mlm: MlmData
    mlm_probability: float = 0.15

    def __post_init__(self):
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")

    def make_batch(self, items: Sequence[int], generator: torch.Generator | None = None) -> dict:
        idx = torch.as_tensor(list(items), dtype=torch.long)
        ids, mask = self.mlm.input_ids[idx].long(), self.mlm.attention_mask[idx].long()
        inputs, labels = mask_tokens(ids, mask, self.mlm.special_ids, self.mlm.mask_id, self.mlm.vocab_size,
                                     generator, self.mlm_probability)
        return {"input_ids": inputs, "attention_mask": mask, "labels": labels}

    @staticmethod
    def prepare(batch: dict) -> dict:
        """The masked positions and their targets, made on the host, so that the step selects the decoder's
        rows with no host sync (``madx_fast.model.inputs.mlm_positions``)."""
        positions, targets = mlm_positions(batch["labels"])
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "mlm_positions": positions, "mlm_targets": targets}

    @staticmethod
    def count(batch: dict) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    @staticmethod
    def num_tokens(batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    @staticmethod
    def loss_sum(model, batch: dict) -> torch.Tensor:
        """Sum of the masked tokens' losses of a prepared batch on the device."""
        return madx_mlm_loss(model, batch["input_ids"], batch["attention_mask"], positions=batch["mlm_positions"],
                             targets=batch["mlm_targets"], reduction="sum")


def fixed_batches(mlm: MlmData, mlm_probability: float, batch_size: int, seed: int, max_blocks: int) -> list[dict]:
    """Held-out batches masked once with a fixed generator: every evaluation of a run scores the same masks."""
    g = torch.Generator().manual_seed(seed + 104729)
    objective = MlmObjective(mlm, mlm_probability)
    n = min(len(mlm), max_blocks)
    return [objective.make_batch(range(i, min(i + batch_size, n)), g) for i in range(0, n, batch_size)]


@torch.no_grad()
def heldout_loss(model, objective, batches: Sequence[dict], device, bf16: bool = False) -> tuple[float, float, int]:
    """``(loss, perplexity, count)``: the mean of the loss terms of ``objective`` over held-out host ``batches``,
    ``exp(loss)``, and how many terms there were."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in batches:
        count += objective.count(batch)
        batch = model_batch(model, objective.prepare(batch), device)
        with autocast(torch.device(device), bf16):
            total += objective.loss_sum(model, batch).double()
    model.train(was_training)
    loss = float(total) / max(count, 1)
    return loss, float(np.exp(min(loss, 50.0))), count


def evaluate_mlm(model, batches: Sequence[dict], device, bf16: bool = False) -> dict:
    """Held-out masked-LM loss (mean over all masked tokens) and perplexity ``exp(loss)``."""
    loss, perplexity, count = heldout_loss(model, MlmObjective, batches, device, bf16)
    return {"mlm_loss": loss, "perplexity": perplexity, "masked_tokens": count}
