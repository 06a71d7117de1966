"""Training objectives and tasks, one module each: ``mlm`` (stage 1), ``ner``, ``qa``, ``copa`` (stage 2).

An *objective* turns a list of examples (the global batch) into tensors, says how many loss terms the batch
holds, and computes the SUM of the loss terms of a slice of it. The trainer divides by the global count, so
a loss is the same whether the batch runs in one piece, in accumulation micro-batches, or spread over
data-parallel processes (whose micro-batches hold different numbers of masked tokens).

    objective        loss term                        count                 head (HF class)
    MlmObjective     CE of each masked token          masked tokens         ...ForMaskedLM (tied decoder)
    NerTask          CE of each word's 1st sub-token  labelled sub-tokens   ...ForTokenClassification
    QaTask           (CE(start) + CE(end)) / 2        windows               ...ForQuestionAnswering
    CopaTask         CE over the choices              examples              ...ForMultipleChoice

A *task* is an objective with data and a head: it reads its data (``read``: no change to the task), encodes
it, batches it, computes the loss and scores predictions. Tasks are frozen dataclasses made with everything
they need (label names, the tokenizer's pad id): nothing is set on them afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, Sequence, runtime_checkable

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


@dataclass(frozen=True)
class TaskData:
    """Examples read from a data spec, and the label names the data declares (NER; None for fixed heads)."""

    examples: list
    labels: list[str] | None = None


@runtime_checkable
class Task(Objective, Protocol):
    """A MAD-X stage-2 task: read -> encode -> collate -> loss -> metrics."""

    name: ClassVar[str]
    auto_class: ClassVar[str]          # the HF class of the model with this head
    main_metric: ClassVar[str]         # the metric the best checkpoint is chosen by
    default_max_length: ClassVar[int]
    default_epochs: ClassVar[float | None]  # training length when neither steps nor epochs are given (None: steps)
    graph_outputs: ClassVar[tuple[str, ...] | None]  # outputs an evaluation reads (None: no CUDA-graph replay)

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


def _registry():
    from .copa import CopaTask
    from .ner import NerTask
    from .qa import QaTask
    return {"ner": NerTask, "qa": QaTask, "copa": CopaTask}


TASK_ALIASES = {"ner": "ner", "wikiann": "ner", "qa": "qa", "squad": "qa", "xquad": "qa", "copa": "copa",
                "xcopa": "copa", "mc": "copa", "multiple-choice": "copa"}


def task_class(name: str) -> type:
    """The task class of ``name`` (a task or one of its aliases: wikiann, squad, xquad, xcopa, ...)."""
    key = TASK_ALIASES.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(_registry())} (aliases: "
                         f"{sorted(TASK_ALIASES)})")
    return _registry()[key]


def task_for_head(model_class: str | None) -> str | None:
    """The task whose head an HF class has (``XLMRobertaForTokenClassification`` -> ``"ner"``), or None."""
    for name, cls in _registry().items():
        if model_class and model_class.endswith(cls.auto_class.replace("AutoModel", "")):
            return name
    return None


def make_task(name: str, *, pad_id: int, labels=None):
    """The task ``name`` for a tokenizer with ``pad_id`` (and, for NER, the head's label names)."""
    import dataclasses
    cls = task_class(name)
    if "labels" in {f.name for f in dataclasses.fields(cls)}:
        return cls(labels=tuple(labels or ()), pad_id=pad_id)
    return cls(pad_id=pad_id)


__all__ = ["Objective", "TASK_ALIASES", "Task", "TaskData", "make_task", "task_class", "task_for_head"]
