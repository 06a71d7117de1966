"""COPA / XCOPA: two choices per example; the head scores each (premise + question, choice) pair; accuracy.

Sources: records ``premise, choice1, choice2, question ("cause"|"effect"), label`` from an HF dataset or
JSON(-lines) files. Each choice is the pair ``(premise + "What was the cause?" / "What happened as a
result?", choice)``. ``madx predict`` lines (``CopaLines``): the record without ``label`` in, the chosen
choice and both scores out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from ..batches import forward_batches, pad_rows
from ..data import DataError, load_hf_dataset, read_json_records, resolve_spec, task_file
from ..models import check_tokenizer
from .base import LineError, TaskData, string_field


@dataclass
class CopaExample:
    premise: str
    choices: list[str]
    question: str   # "cause" or "effect"
    label: int


COPA_QUESTIONS = {"cause": "What was the cause?", "effect": "What happened as a result?"}


def read_copa(spec: str, split: str, *, lang: str | None = None, max_examples: int | None = None) -> list[CopaExample]:
    """COPA / XCOPA records ``premise, choice1, choice2, question ("cause"|"effect"), label`` from an HF
    dataset or JSON(-lines) files."""
    source = resolve_spec(spec, lang)
    if source.kind == "hf":
        records, path = list(load_hf_dataset(source, split)), str(source)
    else:
        path = task_file(source, split)
        records = read_json_records(path)
    examples = []
    for i, rec in enumerate(records):
        missing = [k for k in ("premise", "choice1", "choice2", "question", "label") if k not in rec]
        if missing:
            raise DataError(f"{path}: record {i} has no {missing} (COPA format: premise, choice1, choice2, "
                            "question, label)")
        if rec["question"] not in COPA_QUESTIONS:
            raise DataError(f"{path}: record {i}: question {rec['question']!r} is not 'cause' or 'effect'")
        label = int(rec["label"])
        if label == -1:
            raise DataError(f"{path}: record {i} has no label (-1: an unlabeled split, such as the test split of "
                            "SuperGLUE's COPA); use a labelled split, e.g. validation")
        if label not in (0, 1):
            raise DataError(f"{path}: record {i}: label {rec['label']!r} does not fit a 2-choice head (0 or 1)")
        examples.append(CopaExample(rec["premise"], [rec["choice1"], rec["choice2"]], rec["question"], label))
    if max_examples:
        examples = examples[:max_examples]
    if not examples:
        raise DataError(f"{source} ({split}): no COPA examples")
    return examples


def encode_copa(examples: Sequence[CopaExample], tokenizer, max_length: int = 128) -> list[dict]:
    """Each choice is the pair ``(premise + question, choice)``; a feature holds both choices' ids."""
    check_tokenizer(tokenizer)
    features = []
    for ex in examples:
        first = f"{ex.premise} {COPA_QUESTIONS[ex.question]}"
        enc = tokenizer([first] * len(ex.choices), ex.choices, truncation=True, max_length=max_length)
        features.append({"choice_ids": enc["input_ids"], "label": ex.label})
    return features


class CopaLines:
    """COPA: ``premise``, ``choice1``, ``choice2``, ``question`` ("cause" / "effect") -> ``choice`` (0: choice1,
    1: choice2) and both ``scores``. A pair longer than a row is cut (longer part first), and its record says
    ``"truncated": true``."""

    output_keys = ("logits",)

    def __init__(self, task, tokenizer, max_length: int):
        self.task, self.tok, self.max_length = task, tokenizer, max_length

    @staticmethod
    def parse(rec: dict) -> CopaExample:
        premise, one, two = (string_field(rec, k) for k in ("premise", "choice1", "choice2"))
        question = string_field(rec, "question")
        if question not in COPA_QUESTIONS:
            raise LineError(f"'question' must be {' or '.join(map(repr, COPA_QUESTIONS))}, got {question!r}")
        return CopaExample(premise, [one, two], question, label=-1)

    def encode(self, examples: list[CopaExample]) -> list[list[dict]]:
        whole = encode_copa(examples, self.tok, 1 << 30)
        cut = encode_copa(examples, self.tok, self.max_length)
        return [[dict(f, truncated=any(len(ids) > self.max_length for ids in w["choice_ids"]))]
                for f, w in zip(cut, whole)]

    @staticmethod
    def rows(feature: dict) -> list[list[int]]:
        return feature["choice_ids"]

    @staticmethod
    def read(outputs, features) -> list[tuple]:
        scores = outputs[0].float().cpu()
        return [(scores[r].tolist(), f["truncated"]) for r, f in enumerate(features)]

    @staticmethod
    def result(example: CopaExample, windows: list[tuple]) -> dict:
        scores, truncated = windows[0]
        out = {"choice": max(range(len(scores)), key=scores.__getitem__), "scores": scores}
        if truncated:
            out["truncated"] = True
        return out


@dataclass(frozen=True)
class CopaTask:
    """The head scores each choice at token 0. The pooler (dense + tanh, part of HF's base model) is trained
    and saved with the head, which gives AdapterHub's multiple-choice head: Dropout, Linear(H, H), tanh,
    Dropout, Linear(H, 1)."""

    pad_id: int = 1
    labels: ClassVar[None] = None
    name: ClassVar[str] = "copa"
    auto_class: ClassVar[str] = "AutoModelForMultipleChoice"
    main_metric: ClassVar[str] = "accuracy"
    default_max_length: ClassVar[int] = 128
    default_epochs: ClassVar[float | None] = None  # TrainConfig's steps
    graph_outputs: ClassVar[None] = None
    aliases: ClassVar[tuple[str, ...]] = ("xcopa", "mc", "multiple-choice")
    line_format: ClassVar[type] = CopaLines

    @classmethod
    def read(cls, spec, split, *, lang=None, max_examples=None, labels=None) -> TaskData:
        return TaskData(read_copa(spec, split, lang=lang, max_examples=max_examples))

    def check_fits(self, examples, where):
        pass  # labels were checked to be 0 or 1 when read

    def encode(self, examples, tokenizer, max_length, *, train=True):
        return encode_copa(examples, tokenizer, max_length)

    def head_kwargs(self):
        return {}

    def extra_trainable(self, model):
        return [n for n, _ in model.named_parameters() if ".pooler." in n or n.startswith("pooler.")]

    def make_batch(self, items, generator=None):
        rows = [ids for f in items for ids in f["choice_ids"]]
        ids = pad_rows(rows, self.pad_id)
        mask = pad_rows([[1] * len(r) for r in rows], 0, ids.shape[1])
        c = len(items[0]["choice_ids"])
        return {"input_ids": ids.view(len(items), c, -1), "attention_mask": mask.view(len(items), c, -1),
                "labels": torch.tensor([f["label"] for f in items], dtype=torch.long)}

    def prepare(self, batch):
        return batch

    def count(self, batch):
        return int(batch["labels"].shape[0])

    def num_tokens(self, batch):
        return int(batch["attention_mask"].sum())

    def loss_sum(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")

    def evaluate(self, model, examples, features, *, batch_size, device, bf16=False, graphs=False):
        correct = 0
        for chunk, out in forward_batches(self, model, features, batch_size, device, bf16):
            pred = out.logits.argmax(-1).cpu()
            correct += sum(int(p) == f["label"] for p, f in zip(pred, chunk))
        return {"accuracy": correct / max(len(features), 1), "examples": len(features)}


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    return sum(int(p == t) for p, t in zip(predictions, labels)) / max(len(labels), 1)
