"""Extractive QA on SQuAD-format data: read -> windows -> collate -> span loss -> SQuAD v1.1 F1 / exact match.

Sources: HF datasets with ``id, question, context, answers{text, answer_start}`` (SQuAD, XQuAD), the official
nested JSON (``data/paragraphs/qas``), or flat JSON-lines records of the HF form. Long contexts become
several windows (HF ``run_qa``'s scheme, stride 128 or a quarter of the length); answers are decoded from
the n-best start / end logits. ``madx predict`` lines (``QaLines``): ``question`` and ``context`` in, the
answer span out.
"""
from __future__ import annotations

import collections
import re
import string
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..batches import forward_batches, pad_rows
from ..data import DataError, load_hf_dataset, read_json_records, resolve_spec, task_file
from ..models import check_tokenizer
from .base import TaskData, string_field


@dataclass
class QaExample:
    id: str
    question: str
    context: str
    answers: list[dict] = field(default_factory=list)  # [{"text": str, "answer_start": int}]


def read_squad(spec: str, split: str, *, lang: str | None = None, max_examples: int | None = None) -> list[QaExample]:
    """SQuAD v1-format QA: an HF dataset with ``id, question, context, answers{text, answer_start}`` (squad,
    xquad), the official nested JSON (``data/paragraphs/qas``), or flat JSON-lines records of the HF form."""
    source = resolve_spec(spec, lang)
    if source.kind == "hf":
        ds = load_hf_dataset(source, split)
        missing = [c for c in ("question", "context", "answers") if c not in ds.column_names]
        if missing:
            raise DataError(f"dataset {source} ({split}) has no {missing} column(s) (columns: {ds.column_names}); "
                            "QA data needs SQuAD's question, context and answers")
        records = list(ds)
        path = str(source)
    else:
        path = task_file(source, split)
        records = []
        for rec in read_json_records(path):
            if "paragraphs" in rec:  # official SQuAD layout
                for para in rec["paragraphs"]:
                    for qa in para.get("qas", []):
                        answers = qa.get("answers", [])
                        records.append({"id": qa.get("id"), "question": qa.get("question"),
                                        "context": para.get("context"),
                                        "answers": {"text": [a["text"] for a in answers],
                                                    "answer_start": [a["answer_start"] for a in answers]}})
            else:
                records.append(rec)
    examples = []
    for i, rec in enumerate(records):
        if not isinstance(rec.get("question"), str) or not isinstance(rec.get("context"), str):
            raise DataError(f"{path}: QA record {i} needs string 'question' and 'context' (fields: {sorted(rec)})")
        answers = rec.get("answers") or {"text": [], "answer_start": []}
        if isinstance(answers, dict):
            answers = [{"text": t, "answer_start": int(s)} for t, s in zip(answers.get("text", []),
                                                                             answers.get("answer_start", []))]
        for a in answers:
            start = a["answer_start"]
            if not 0 <= start <= len(rec["context"]) - len(a["text"]):
                raise DataError(f"{path}: QA record {i}: answer {a['text']!r} starts at {start}, outside its "
                                f"context of {len(rec['context'])} characters")
        examples.append(QaExample(str(rec.get("id", i)), rec["question"], rec["context"], answers))
    if max_examples:
        examples = examples[:max_examples]
    if not examples:
        raise DataError(f"{source} ({split}): no QA examples")
    return examples


def _qa_encode(tokenizer, examples, max_length, doc_stride):
    check_tokenizer(tokenizer)
    questions = [ex.question.lstrip() for ex in examples]
    longest = max(len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"])
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    if max_length - longest - specials <= doc_stride:
        # the tokenizer would panic: each window must hold more context tokens than the overlap
        raise DataError(f"max_length {max_length} leaves {max_length - longest - specials} context tokens next to "
                        f"the longest question ({longest} tokens), not more than the window overlap "
                        f"(doc_stride {doc_stride}); raise --max-length")
    enc = tokenizer([ex.question.lstrip() for ex in examples], [ex.context for ex in examples],
                    truncation="only_second", max_length=max_length, stride=doc_stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True, padding=False)
    _check_windows_reach_the_end(tokenizer, examples, enc)
    return enc


def _check_windows_reach_the_end(tokenizer, examples, enc):
    """The windows of each example must reach its context's last token. tokenizers 0.23.1 and 0.23.2 return
    too few overflow windows (huggingface/tokenizers#2091, fixed in 0.23.3): the end of every long context,
    and the answers there, would silently never be seen."""
    reached = {}
    for i, offsets in enumerate(enc["offset_mapping"]):
        ends = [o[1] for o, s in zip(offsets, enc.sequence_ids(i)) if s == 1]
        k = enc["overflow_to_sample_mapping"][i]
        reached[k] = max([reached.get(k, 0), *ends])
    alone = tokenizer([ex.context for ex in examples], add_special_tokens=False, return_offsets_mapping=True)
    for k, offsets in enumerate(alone["offset_mapping"]):
        if offsets and reached.get(k, 0) < max(o[1] for o in offsets):
            import tokenizers
            raise DataError(f"the tokenizer's overflow windows stop at character {reached.get(k, 0)} of a "
                            f"{len(examples[k].context)}-character context (example {examples[k].id!r}): tokenizers "
                            f"{tokenizers.__version__} drops windows (0.23.1 and 0.23.2 do, huggingface/tokenizers"
                            "#2091); install tokenizers 0.22.x or >= 0.23.3")


def encode_qa_train(examples: Sequence[QaExample], tokenizer, max_length: int = 384,
                    doc_stride: int = 128) -> list[dict]:
    """Training features (HF ``run_qa``'s scheme): long contexts become several windows; a window holding
    the (first) answer gets its start/end token positions, others point at ``<s>`` (position 0)."""
    enc = _qa_encode(tokenizer, examples, max_length, doc_stride)
    features = []
    for i, ids in enumerate(enc["input_ids"]):
        ex = examples[enc["overflow_to_sample_mapping"][i]]
        offsets, seq = enc["offset_mapping"][i], enc.sequence_ids(i)
        start_pos = end_pos = 0
        if ex.answers:
            a0 = ex.answers[0]
            s_char, e_char = a0["answer_start"], a0["answer_start"] + len(a0["text"])
            ctx = [k for k, s in enumerate(seq) if s == 1]
            if ctx and offsets[ctx[0]][0] <= s_char and offsets[ctx[-1]][1] >= e_char:
                start_pos = next(k for k in ctx if offsets[k][1] > s_char)
                end_pos = next(k for k in reversed(ctx) if offsets[k][0] < e_char)
        features.append({"input_ids": ids, "start_positions": start_pos, "end_positions": end_pos})
    return features


def encode_qa_eval(examples: Sequence[QaExample], tokenizer, max_length: int = 384,
                   doc_stride: int = 128) -> list[dict]:
    """Evaluation features: windows with the example index and context offsets (None outside the context)."""
    enc = _qa_encode(tokenizer, examples, max_length, doc_stride)
    features = []
    for i, ids in enumerate(enc["input_ids"]):
        seq = enc.sequence_ids(i)
        offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][i], seq)]
        features.append({"input_ids": ids, "example": enc["overflow_to_sample_mapping"][i], "offsets": offsets})
    return features


class QaLines:
    """QA: ``question`` and ``context`` -> ``answer`` (text), ``start`` / ``end`` (its character offsets in the
    context) and ``score`` (start + end logit); no span found: ``""`` and nulls. A long context is read in
    overlapping windows, as in evaluation; the best span of all windows wins."""

    output_keys = ("start_logits", "end_logits")

    def __init__(self, task, tokenizer, max_length: int):
        self.task, self.tok, self.max_length = task, tokenizer, max_length

    @staticmethod
    def parse(rec: dict) -> QaExample:
        return QaExample("", string_field(rec, "question"), string_field(rec, "context"))

    def encode(self, examples: list[QaExample]) -> list[list[dict]]:
        features: list[list[dict]] = [[] for _ in examples]
        for f in self.task.encode(examples, self.tok, self.max_length, train=False):
            features[f["example"]].append(f)
        return features

    @staticmethod
    def rows(feature: dict) -> list[list[int]]:
        return [feature["input_ids"]]

    def read(self, outputs, features) -> list[tuple]:
        starts, ends = outputs[0].float().cpu().numpy(), outputs[1].float().cpu().numpy()
        return [best_span_chars(starts[r], ends[r], f["offsets"], self.task.n_best, self.task.max_answer_length)
                for r, f in enumerate(features)]

    @staticmethod
    def result(example: QaExample, windows: list[tuple]) -> dict:
        score, start, end = max(windows, key=lambda w: w[0], default=(None, None, None))
        if start is None:
            return {"answer": "", "start": None, "end": None, "score": None}
        return {"answer": example.context[start:end], "start": start, "end": end, "score": score}


@dataclass(frozen=True)
class QaTask:
    pad_id: int = 1
    labels: ClassVar[None] = None
    name: ClassVar[str] = "qa"
    auto_class: ClassVar[str] = "AutoModelForQuestionAnswering"
    main_metric: ClassVar[str] = "f1"
    default_max_length: ClassVar[int] = 384
    default_epochs: ClassVar[float | None] = None  # TrainConfig's steps
    graph_outputs: ClassVar[tuple[str, ...]] = ("start_logits", "end_logits")
    aliases: ClassVar[tuple[str, ...]] = ("squad", "xquad")
    line_format: ClassVar[type] = QaLines
    doc_stride: ClassVar[int] = 128
    n_best: ClassVar[int] = 20
    max_answer_length: ClassVar[int] = 30

    @classmethod
    def read(cls, spec, split, *, lang=None, max_examples=None, labels=None) -> TaskData:
        return TaskData(read_squad(spec, split, lang=lang, max_examples=max_examples))

    def check_fits(self, examples, where):
        pass  # answers were checked against their contexts when read

    def _stride(self, max_length):
        return min(self.doc_stride, max_length // 4)

    def encode(self, examples, tokenizer, max_length, *, train=True):
        encode = encode_qa_train if train else encode_qa_eval
        return encode(examples, tokenizer, max_length, self._stride(max_length))

    def head_kwargs(self):
        return {}

    def extra_trainable(self, model):
        return []

    def make_batch(self, items, generator=None):
        ids = pad_rows([f["input_ids"] for f in items], self.pad_id)
        batch = {"input_ids": ids,
                 "attention_mask": pad_rows([[1] * len(f["input_ids"]) for f in items], 0, ids.shape[1])}
        if "start_positions" in items[0]:
            batch["start_positions"] = torch.tensor([f["start_positions"] for f in items], dtype=torch.long)
            batch["end_positions"] = torch.tensor([f["end_positions"] for f in items], dtype=torch.long)
        return batch

    def prepare(self, batch):
        return batch

    def count(self, batch):
        return int(batch["input_ids"].shape[0])

    def num_tokens(self, batch):
        return int(batch["attention_mask"].sum())

    def loss_sum(self, model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        start = F.cross_entropy(out.start_logits.float(), batch["start_positions"], reduction="sum")
        end = F.cross_entropy(out.end_logits.float(), batch["end_positions"], reduction="sum")
        return (start + end) / 2

    def evaluate(self, model, examples, features, *, batch_size, device, bf16=False, graphs=False):
        best: dict[int, tuple[float, str]] = {}
        for chunk, out in forward_batches(self, model, features, batch_size, device, bf16, graphs):
            starts, ends = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
            for row, f in enumerate(chunk):
                ex = examples[f["example"]]
                score, text = best_span(starts[row], ends[row], f["offsets"], ex.context, self.n_best,
                                        self.max_answer_length)
                if f["example"] not in best or score > best[f["example"]][0]:
                    best[f["example"]] = (score, text)
        predictions = [best.get(i, (0.0, ""))[1] for i in range(len(examples))]
        return squad_scores(predictions, [[a["text"] for a in ex.answers] for ex in examples])


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no English articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1(prediction: str, truth: str) -> float:
    p, t = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(p) & collections.Counter(t)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict:
    """SQuAD v1.1 ``f1`` and ``exact_match`` in percent: per question the best over its gold answers."""
    f1 = em = 0.0
    scored = 0
    for pred, golds in zip(predictions, answers):
        if not golds:
            continue
        scored += 1
        f1 += max(squad_f1(pred, g) for g in golds)
        em += max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)
    n = max(scored, 1)
    return {"f1": 100.0 * f1 / n, "exact_match": 100.0 * em / n, "examples": scored}


def best_span(start_logits, end_logits, offsets, context: str, n_best: int = 20, max_answer_length: int = 30):
    """The highest ``start + end`` score over spans inside the context with ``start <= end`` and at most
    ``max_answer_length`` tokens (HF ``run_qa``'s post-processing); ``(score, answer text)``."""
    score, start, end = best_span_chars(start_logits, end_logits, offsets, n_best, max_answer_length)
    return score, ("" if start is None else context[start:end])


def best_span_chars(start_logits, end_logits, offsets, n_best: int = 20, max_answer_length: int = 30):
    """``best_span``'s answer as ``(score, start, end)`` character offsets into the context;
    ``(-inf, None, None)`` when the window holds no valid span."""
    starts = np.argsort(start_logits)[::-1][:n_best]
    ends = np.argsort(end_logits)[::-1][:n_best]
    best = (-np.inf, None, None)
    for s in starts:
        if s >= len(offsets) or offsets[s] is None:
            continue
        for e in ends:
            if e >= len(offsets) or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                continue
            score = float(start_logits[s] + end_logits[e])
            if score > best[0]:
                best = (score, offsets[s][0], offsets[e][1])
    return best
