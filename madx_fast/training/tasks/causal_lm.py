"""Causal LM, stage 1's objective for decoders (GPT-2, Llama, Mistral): unlabeled text -> a token stream cut
into blocks -> every token predicted from the ones before it (``madx_fast.model.madx_lm_loss`` with
``objective="causal"``) -> held-out loss and perplexity.

Each text is tokenized with the tokenizer's own special tokens (Llama's ``<s>`` in front, none for GPT-2) and
closed with the end-of-text token, the texts are joined into one stream (GPT-2's and HF ``run_clm``'s scheme),
and the stream is cut into consecutive blocks of ``max_length`` tokens; the last, shorter block is padded.
Nothing is masked or drawn at random: the labels are the input ids, -100 at padding, and position t is
scored against token t + 1 (the positions and targets are made on the host, ``mlm_positions(shift=True)``,
so that the step selects the head's rows with no host sync).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable, Sequence

import torch

from ...model import madx_lm_loss
from ...model.inputs import IGNORE_INDEX, lm_targets, mlm_positions
from ..data import DataError
from ..models import check_tokenizer
from .mlm import TextBlocks, heldout_loss, tokenize_texts


def pack_stream(token_lists: Iterable[list[int]], max_length: int, eos_id: int, pad_id: int) -> TextBlocks:
    """The texts' ids, each closed with ``eos_id`` (unless the tokenizer closed it already), as one stream cut
    into ``[N, max_length]`` int32 blocks; the last block is padded with ``pad_id`` (attention mask 0)."""
    if max_length < 2:
        raise DataError(f"max_length must be at least 2 for the causal objective, got {max_length}")
    stream: list[int] = []
    for ids in token_lists:
        if ids:
            stream.extend(ids)
            if ids[-1] != eos_id:
                stream.append(eos_id)
    if len(stream) < 2:
        raise DataError(f"the text holds {len(stream)} token(s): the causal objective needs at least 2")
    n = -(-len(stream) // max_length)
    ids = torch.full((n, max_length), pad_id, dtype=torch.int32)
    mask = torch.zeros((n, max_length), dtype=torch.int32)
    ids.view(-1)[:len(stream)] = torch.tensor(stream, dtype=torch.int32)
    mask.view(-1)[:len(stream)] = 1
    return TextBlocks(ids, mask)


def causal_data_from_texts(tokenizer, texts: Sequence[str], max_length: int) -> TextBlocks:
    check_tokenizer(tokenizer)
    return pack_stream(tokenize_texts(tokenizer, texts, special_tokens=True), max_length, tokenizer.eos_token_id,
                       tokenizer.pad_token_id)


@dataclass(frozen=True)
class CausalLmObjective:
    """Items are block indices into a ``TextBlocks``; a batch is the blocks themselves (no randomness)."""

    # the decoder rows ``prepare`` makes (flat positions, targets): padded rows are position 0, target ignored
    row_keys: ClassVar[tuple[str, str]] = ("lm_positions", "lm_targets")

    blocks: TextBlocks

    def make_batch(self, items: Sequence[int], generator: torch.Generator | None = None) -> dict:
        idx = torch.as_tensor(list(items), dtype=torch.long)
        ids, mask = self.blocks.input_ids[idx].long(), self.blocks.attention_mask[idx].long()
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}

    @staticmethod
    def prepare(batch: dict) -> dict:
        """The positions that predict a token and their targets (the next tokens), made on the host."""
        positions, targets = mlm_positions(batch["labels"], shift=True)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "lm_positions": positions, "lm_targets": targets}

    @staticmethod
    def count(batch: dict) -> int:
        """Positions with a next token to predict (every non-padding token but each block's last)."""
        return int((lm_targets(batch["labels"], shift=True) != IGNORE_INDEX).sum())

    @staticmethod
    def num_tokens(batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    @staticmethod
    def loss_sum(model, batch: dict) -> torch.Tensor:
        """Sum of the predicted tokens' losses of a prepared batch on the device."""
        return madx_lm_loss(model, batch["input_ids"], batch["attention_mask"], positions=batch["lm_positions"],
                            targets=batch["lm_targets"], objective="causal", reduction="sum")


def fixed_batches(blocks: TextBlocks, batch_size: int, max_blocks: int) -> list[dict]:
    """Held-out batches of the first ``max_blocks`` blocks."""
    objective = CausalLmObjective(blocks)
    n = min(len(blocks), max_blocks)
    return [objective.make_batch(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def evaluate_causal(model, batches: Sequence[dict], device, bf16: bool = False) -> dict:
    """Held-out causal-LM loss (mean over every predicted token) and perplexity ``exp(loss)``."""
    loss, perplexity, count = heldout_loss(model, CausalLmObjective, batches, device, bf16)
    return {"lm_loss": loss, "perplexity": perplexity, "predicted_tokens": count}
