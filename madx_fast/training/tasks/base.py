"""What the trainer, the stages, ``transfer`` and ``predict`` call on an objective or a task, and the data a task
reads; every task module (``ner.py``, ``qa.py``, ``copa.py``) implements ``Task`` and its ``LineFormat``.

An *objective* turns a list of examples (the global batch) into tensors, says how many loss terms the batch
holds, and computes the SUM of the loss terms of a slice of it. The trainer divides by the global count, so
a loss is the same whether the batch runs in one piece, in accumulation micro-batches, or spread over
data-parallel processes (whose micro-batches hold different numbers of masked tokens).

A *task* is an objective with data and a head: it reads its data (``read``: no change to the task), encodes
it, batches it, computes the loss, scores predictions, and reads and writes ``madx predict``'s JSON lines
(its ``line_format``). Tasks are frozen dataclasses made with everything they need (label names, the
tokenizer's pad id): nothing is set on them afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class Objective(Protocol):
    """What the trainer calls, in this order, for every step."""

    def make_batch(self, items: Sequence, generator: torch.Generator | None = None) -> dict:
        """The global batch as host tensors (for MLM: masked with ``generator``)."""

    def count(self, batch: dict) -> int:
        """The number of loss terms in ``batch`` (the trainer divides the summed loss by it)."""

    def num_tokens(self, batch: dict) -> int:
        """The non-padding tokens in ``batch`` (for tokens/s)."""

    def prepare(self, batch: dict) -> dict:
        """Host-side work on a micro-batch before it goes to the device."""

    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        """The SUM of the loss terms of a prepared micro-batch on the device."""

    # An objective whose ``prepare`` makes a varying number of decoder rows (LM objectives: flat positions and
    # their targets) names those two keys in a class attribute ``row_keys``, so that a CUDA-graph step can pad
    # them to a fixed count (madx_fast.training.graphed_step); other objectives have no such attribute.


@dataclass(frozen=True)
class TaskData:
    """Examples read from a data spec, and the label names the data declares (NER; None for fixed heads)."""

    examples: list
    labels: list[str] | None = None


@runtime_checkable
class Task(Objective, Protocol):
    """A MAD-X stage-2 task: read -> encode -> collate -> loss -> metrics, and its ``madx predict`` lines."""

    name: ClassVar[str]
    auto_class: ClassVar[str]          # the HF class of the model with this head
    main_metric: ClassVar[str]         # the metric the best checkpoint is chosen by
    default_max_length: ClassVar[int]
    default_epochs: ClassVar[float | None]  # training length when neither steps nor epochs are given (None: steps)
    graph_outputs: ClassVar[tuple[str, ...] | None]  # outputs an evaluation reads (None: no CUDA-graph replay)
    aliases: ClassVar[tuple[str, ...]]  # other names of the task (datasets in its format: wikiann, squad, ...)
    line_format: ClassVar[type[LineFormat]]  # madx predict's input and output lines of this task

    @classmethod
    def read(cls, spec: str, split: str, *, lang: str | None = None, max_examples: int | None = None,
             labels: Sequence[str] | None = None) -> TaskData:
        """Read and check examples of ``split`` from a data spec (``{lang}`` expands)."""

    def check_fits(self, examples, where: str) -> None:
        """Raise DataError when the examples' labels do not fit this task's head."""

    def encode(self, examples, tokenizer, max_length: int, *, train: bool) -> list[dict]:
        """Token ids (and targets when ``train``; what evaluation needs otherwise) per feature."""

    def head_kwargs(self) -> dict:
        """Keyword arguments of ``from_pretrained`` that size the head (e.g. ``num_labels``)."""

    def extra_trainable(self, model) -> list[str]:
        """Parameters of the base model that belong to the head (trained and saved with it)."""

    def evaluate(self, model, examples, features, *, batch_size: int, device, bf16: bool = False,
                 graphs: bool = False) -> dict:
        """Metrics of ``model`` on ``examples``; ``graphs=True`` replays the forward from CUDA graphs."""


class LineError(ValueError):
    """What is wrong with one input line of ``madx predict`` (its number is added where it is reported)."""


class LineFormat(Protocol):
    """A task's ``madx predict`` lines: parse a record -> encode rows -> read the model's outputs -> the output
    fields. Made per run as ``task.line_format(task, tokenizer, max_length)``."""

    output_keys: tuple[str, ...]  # the model outputs ``read`` takes, in order

    def parse(self, rec: dict) -> Any:
        """The example of an input record; a ``LineError`` says what is wrong with it."""

    def encode(self, examples: list) -> list[list[dict]]:
        """The features (windows) of every example; several when a long input is windowed."""

    def rows(self, feature: dict) -> list[list[int]]:
        """The token-id rows of a feature (one, or one per choice)."""

    def read(self, outputs: list[torch.Tensor], features: list[dict]) -> list:
        """What each feature's rows of the outputs say (e.g. a tag per word, a scored span)."""

    def result(self, example, windows: list) -> dict:
        """The output fields of an example from what its features said."""


def string_field(rec: dict, name: str) -> str:
    """The string field ``name`` of an input line, or a ``LineError`` saying why not."""
    if name not in rec:
        raise LineError(f"no {name!r} field (fields: {', '.join(sorted(rec)) or 'none'})")
    if not isinstance(rec[name], str):
        raise LineError(f"{name!r} must be a string, got {type(rec[name]).__name__}")
    return rec[name]


__all__ = ["LineError", "LineFormat", "Objective", "Task", "TaskData", "string_field"]
