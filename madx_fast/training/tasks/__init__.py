"""Training objectives and tasks, one module each: ``mlm`` and ``causal_lm`` (stage 1), ``ner``, ``qa``, ``copa``
(stage 2); what they all provide is in ``base.py``.

    objective          loss term                        count                 head (HF class)
    MlmObjective       CE of each masked token          masked tokens         ...ForMaskedLM (tied decoder)
    CausalLmObjective  CE of each token given the past  predicted tokens      ...ForCausalLM / ...LMHeadModel
    NerTask            CE of each word's 1st sub-token  labelled sub-tokens   ...ForTokenClassification
    QaTask             (CE(start) + CE(end)) / 2        windows               ...ForQuestionAnswering
    CopaTask           CE over the choices              examples              ...ForMultipleChoice

A task runs on every family transformers has its head class for: all of them for NER and QA; COPA not on the
decoders (GPT-2, Llama, Mistral have no ...ForMultipleChoice), which ``models.check_model_class`` refuses
before anything is loaded.

A task module holds everything of its task: reading its data, encoding, batching, the loss, the metrics, the
head (``auto_class``, ``head_kwargs``, ``extra_trainable``) and ``madx predict``'s line format. Adding a task
is a module beside these and its line in ``TASKS``.
"""
from __future__ import annotations

import dataclasses

from .base import LineError, Objective, Task, TaskData
from .copa import CopaTask
from .ner import NerTask
from .qa import QaTask

TASKS: dict[str, type[Task]] = {"ner": NerTask, "qa": QaTask, "copa": CopaTask}

# every name a task answers to: its own and its aliases (wikiann, squad, xquad, xcopa, ...)
TASK_ALIASES = {alias: name for name, cls in TASKS.items() for alias in (name, *cls.aliases)}


def task_class(name: str) -> type:
    """The task class of ``name`` (a task or one of its aliases: wikiann, squad, xquad, xcopa, ...)."""
    key = TASK_ALIASES.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)} (aliases: "
                         f"{sorted(TASK_ALIASES)})")
    return TASKS[key]


def task_for_head(model_class: str | None) -> str | None:
    """The task whose head an HF class has (``XLMRobertaForTokenClassification`` -> ``"ner"``), or None."""
    for name, cls in TASKS.items():
        if model_class and model_class.endswith(cls.auto_class.replace("AutoModel", "")):
            return name
    return None


def make_task(name: str, *, pad_id: int, labels=None):
    """The task ``name`` for a tokenizer with ``pad_id`` (and, for NER, the head's label names)."""
    cls = task_class(name)
    if "labels" in {f.name for f in dataclasses.fields(cls)}:
        return cls(labels=tuple(labels or ()), pad_id=pad_id)
    return cls(pad_id=pad_id)


__all__ = ["LineError", "Objective", "TASKS", "TASK_ALIASES", "Task", "TaskData", "make_task", "task_class",
           "task_for_head"]
