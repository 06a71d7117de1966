"""NER on WikiANN-format data (tokens + tags per sentence): read -> encode -> collate -> loss -> seqeval F1.

Sources: HF datasets with ``tokens`` + ``ner_tags`` (a ClassLabel sequence, as WikiANN); JSON/JSON-lines
records ``{"tokens": [...], "ner_tags": [...]}`` with string tags, or integer tags read with given label names
(WikiANN's by default); CoNLL files (token first, tag last, blank line between sentences, ``-DOCSTART-``
skipped, WikiANN's ``sw:`` token prefixes stripped). Each word's label goes to its FIRST sub-token; the other
sub-tokens and the special tokens get -100. Metric: seqeval's entity-level F1 (CoNLL-style chunks, as
XTREME and the MAD-X paper). ``madx predict`` lines (``NerLines``): ``text`` or ``tokens`` in, a tag per word out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable, Sequence

import torch
import torch.nn.functional as F

from ...model.inputs import IGNORE_INDEX
from ..batches import forward_batches, pad_rows
from ..data import JSON_SUFFIXES, DataError, load_hf_dataset, read_json_records, resolve_spec, task_file, text_lines
from ..models import check_tokenizer
from .base import LineError, TaskData, string_field

# WikiANN's label inventory (the order of its ``ner_tags`` ClassLabel).
WIKIANN_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")


@dataclass
class NerExample:
    tokens: list[str]
    tags: list[str]


def read_ner(spec: str, split: str, *, lang: str | None = None, label_names: Sequence[str] | None = None,
             max_examples: int | None = None) -> tuple[list[NerExample], list[str]]:
    """NER examples with string tags, and the label names the data declares.

    Sources: HF datasets with ``tokens`` + ``ner_tags`` (a ClassLabel sequence, as WikiANN); JSON/JSON-lines
    records ``{"tokens": [...], "ner_tags": [...]}`` with string tags, or integer tags read with
    ``label_names`` (WikiANN's names by default); CoNLL files (token first, tag last, blank line between
    sentences, ``-DOCSTART-`` skipped)."""
    source = resolve_spec(spec, lang)
    names = list(label_names) if label_names else None
    examples: list[NerExample] = []
    if source.kind == "hf":
        ds = load_hf_dataset(source, split)
        for col in ("tokens", "ner_tags"):
            if col not in ds.column_names:
                raise DataError(f"dataset {source} ({split}) has no {col!r} column (columns: {ds.column_names}); "
                                "NER data needs 'tokens' and 'ner_tags' (WikiANN format)")
        feature = ds.features["ner_tags"]
        inner = getattr(feature, "feature", None)
        declared = list(getattr(inner, "names", []) or [])
        if declared:
            names = declared
        names = names or list(WIKIANN_LABELS)
        for rec in ds:
            examples.append(NerExample(list(rec["tokens"]), _tag_names(rec["ner_tags"], names, f"{source}")))
    else:
        path = task_file(source, split)
        if path.lower().endswith(JSON_SUFFIXES):
            for i, rec in enumerate(read_json_records(path)):
                if "tokens" not in rec or ("ner_tags" not in rec and "tags" not in rec):
                    raise DataError(f"{path}: record {i} has no 'tokens' and 'ner_tags' (fields: {sorted(rec)})")
                tags = rec.get("ner_tags", rec.get("tags"))
                if any(isinstance(t, int) for t in tags) and names is None:
                    names = list(WIKIANN_LABELS)
                examples.append(NerExample([str(t) for t in rec["tokens"]],
                                           _tag_names(tags, names, f"{path} record {i}")))
        else:
            examples = _read_conll(path)
    for i, ex in enumerate(examples):
        if len(ex.tokens) != len(ex.tags):
            raise DataError(f"{source}: example {i} has {len(ex.tokens)} tokens but {len(ex.tags)} tags")
    examples = [ex for ex in examples if ex.tokens]
    if max_examples:
        examples = examples[:max_examples]
    if not examples:
        raise DataError(f"{source} ({split}): no NER examples")
    found = {t for ex in examples for t in ex.tags}
    return examples, (names if names else complete_bio(found))


def _tag_names(tags, names, where) -> list[str]:
    out = []
    for t in tags:
        if isinstance(t, str):
            out.append(t)
        else:
            if names is None or not 0 <= int(t) < len(names):
                raise DataError(f"{where}: tag id {t} has no name (label names: {names})")
            out.append(names[int(t)])
    return out


def _read_conll(path: str) -> list[NerExample]:
    examples, tokens, tags = [], [], []
    prefix = None
    for lineno, line in enumerate(text_lines(path), 1):
        line = line.strip()
        if not line or line.startswith("-DOCSTART-"):
            if tokens:
                examples.append(NerExample(tokens, tags))
                tokens, tags = [], []
            continue
        cols = line.split()
        if len(cols) < 2:
            raise DataError(f"{path}:{lineno}: expected 'token ... tag', got {line!r}")
        tok = cols[0]
        # WikiANN's original files prefix every token with its language ("sw:Nairobi").
        if prefix is None:
            head, sep, _ = tok.partition(":")
            prefix = head + ":" if sep and head.isalpha() and head.islower() and len(head) <= 3 else ""
        if prefix and tok.startswith(prefix) and len(tok) > len(prefix):
            tok = tok[len(prefix):]
        tokens.append(tok)
        tags.append(cols[-1])
    if tokens:
        examples.append(NerExample(tokens, tags))
    return examples


def sort_labels(labels: Iterable[str]) -> list[str]:
    """``O`` first, then by entity type, ``B-`` before ``I-``."""
    def key(label):
        if label == "O":
            return (0, "", "")
        prefix, _, kind = label.partition("-")
        return (1, kind, prefix)
    return sorted(set(labels), key=key)


def complete_bio(labels: Iterable[str]) -> list[str]:
    """The label set a head needs for string tags seen in data: ``O`` and, for every entity type, both its
    ``B-`` and ``I-`` tags (a type whose entities were all one word still gets ``I-``); sorted."""
    out = {"O"}
    for label in labels:
        prefix, sep, kind = label.partition("-")
        if sep and prefix in ("B", "I") and kind:
            out |= {f"B-{kind}", f"I-{kind}"}
        else:
            out.add(label)
    return sort_labels(out)


def check_labels(examples: Sequence[NerExample], label_names: Sequence[str], where: str) -> None:
    known = set(label_names)
    unknown = sorted({t for ex in examples for t in ex.tags if t not in known})
    if unknown:
        raise DataError(f"{where}: tags {unknown} are not among the head's labels {list(label_names)}")


def encode_ner(examples: Sequence[NerExample], tokenizer, label_names: Sequence[str], max_length: int) -> list[dict]:
    """Sub-tokenise pre-split words; each word's label goes to its FIRST sub-token, the other sub-tokens and
    the special tokens get -100. ``word_ids`` keeps the alignment for evaluation (words cut by truncation
    have no prediction and count as ``O``)."""
    check_tokenizer(tokenizer)
    label_id = {name: i for i, name in enumerate(label_names)}
    check_labels(examples, label_names, "NER data")
    features = []
    for ex in examples:
        enc = tokenizer(ex.tokens, is_split_into_words=True, truncation=True, max_length=max_length)
        word_ids = enc.word_ids()
        labels, seen = [], set()
        for w in word_ids:
            if w is None or w in seen:
                labels.append(IGNORE_INDEX)
            else:
                seen.add(w)
                labels.append(label_id[ex.tags[w]])
        features.append({"input_ids": enc["input_ids"], "labels": labels, "word_ids": word_ids})
    return features


class NerLines:
    """NER: ``text`` (split at whitespace) or ``tokens`` (the words) -> ``words`` and ``tags``, one per word
    (each word's first sub-token decides; a word without sub-tokens gets ``O``). Words that do not fit one row
    go on in the next window (cut between words; each window is predicted on its own)."""

    output_keys = ("logits",)

    def __init__(self, task, tokenizer, max_length: int):
        self.task, self.tok, self.max_length = task, tokenizer, max_length
        self.budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)

    def parse(self, rec: dict) -> list[str]:
        if "text" in rec and "tokens" in rec:
            raise LineError("has both 'text' and 'tokens'; give one")
        if "text" in rec:
            return string_field(rec, "text").split()
        if "tokens" not in rec:
            raise LineError(f"no 'text' or 'tokens' field (fields: {', '.join(sorted(rec)) or 'none'})")
        tokens = rec["tokens"]
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise LineError("'tokens' must be a list of strings")
        return list(tokens)

    def encode(self, examples: list[list[str]]) -> list[list[dict]]:
        features: list[list[dict]] = [[] for _ in examples]
        present = [i for i, words in enumerate(examples) if words]
        if not present:
            return features
        enc = self.tok([examples[i] for i in present], is_split_into_words=True, add_special_tokens=False)
        windows = []  # (example, first word, end word)
        for k, i in enumerate(present):
            counts = [0] * len(examples[i])
            for w in enc.word_ids(k):
                if w is not None:
                    counts[w] += 1
            start = used = 0
            for w, count in enumerate(counts):
                if w > start and used + count > self.budget:
                    windows.append((i, start, w))
                    start, used = w, 0
                used += count
            windows.append((i, start, len(counts)))
        enc = self.tok([examples[i][a:b] for i, a, b in windows], is_split_into_words=True, truncation=True,
                       max_length=self.max_length)
        for k, (i, a, _) in enumerate(windows):
            word_ids = [None if w is None else w + a for w in enc.word_ids(k)]
            features[i].append({"input_ids": enc["input_ids"][k], "word_ids": word_ids})
        return features

    @staticmethod
    def rows(feature: dict) -> list[list[int]]:
        return [feature["input_ids"]]

    def read(self, outputs, features) -> list[dict[int, str]]:
        return self.task.predict(outputs[0], features)

    @staticmethod
    def result(words: list[str], windows: list[dict[int, str]]) -> dict:
        tags = ["O"] * len(words)
        for window in windows:
            for w, tag in window.items():
                tags[w] = tag
        return {"words": words, "tags": tags}


@dataclass(frozen=True)
class NerTask:
    """Token classification with the label names ``labels`` (in head id order)."""

    labels: tuple[str, ...]
    pad_id: int = 1
    name: ClassVar[str] = "ner"
    auto_class: ClassVar[str] = "AutoModelForTokenClassification"
    main_metric: ClassVar[str] = "f1"
    default_max_length: ClassVar[int] = 128
    default_epochs: ClassVar[float | None] = 100.0  # the paper's WikiANN setting
    graph_outputs: ClassVar[tuple[str, ...]] = ("logits",)
    aliases: ClassVar[tuple[str, ...]] = ("wikiann",)
    line_format: ClassVar[type] = NerLines

    def __post_init__(self):
        if not self.labels:
            raise DataError("NER needs label names")
        object.__setattr__(self, "labels", tuple(self.labels))

    @classmethod
    def read(cls, spec, split, *, lang=None, max_examples=None, labels=None) -> TaskData:
        examples, names = read_ner(spec, split, lang=lang, label_names=labels, max_examples=max_examples)
        return TaskData(examples, names)

    def check_fits(self, examples, where):
        check_labels(examples, self.labels, where)

    def encode(self, examples, tokenizer, max_length, *, train=True):
        return encode_ner(examples, tokenizer, self.labels, max_length)

    def head_kwargs(self):
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {n: i for i, n in enumerate(self.labels)}}

    def extra_trainable(self, model):
        return []

    def make_batch(self, items, generator=None):
        ids = pad_rows([f["input_ids"] for f in items], self.pad_id)
        return {"input_ids": ids,
                "attention_mask": pad_rows([[1] * len(f["input_ids"]) for f in items], 0, ids.shape[1]),
                "labels": pad_rows([f["labels"] for f in items], IGNORE_INDEX, ids.shape[1])}

    def prepare(self, batch):
        return batch

    def count(self, batch):
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def num_tokens(self, batch):
        return int(batch["attention_mask"].sum())

    def loss_sum(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")

    def predict(self, logits: torch.Tensor, features) -> list[dict[int, str]]:
        """Word index -> predicted tag, per feature (each word takes its first sub-token's prediction)."""
        best = logits.argmax(-1).cpu()
        preds = []
        for row, f in enumerate(features):
            words = {}
            for pos, w in enumerate(f["word_ids"]):
                if w is not None and w not in words:
                    words[w] = self.labels[int(best[row, pos])]
            preds.append(words)
        return preds

    def evaluate(self, model, examples, features, *, batch_size, device, bf16=False, graphs=False):
        preds = []
        for chunk, out in forward_batches(self, model, features, batch_size, device, bf16, graphs):
            preds.extend(self.predict(out.logits, chunk))
        true_seqs = [ex.tags for ex in examples]
        pred_seqs = [[p.get(w, "O") for w in range(len(ex.tokens))] for ex, p in zip(examples, preds)]
        return ner_scores(true_seqs, pred_seqs)


def ner_scores(true_seqs: list[list[str]], pred_seqs: list[list[str]]) -> dict:
    """seqeval's entity-level scores (its default, CoNLL-style chunking, as XTREME and the MAD-X paper)."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {"f1": float(f1_score(true_seqs, pred_seqs, zero_division=0)),
            "precision": float(precision_score(true_seqs, pred_seqs, zero_division=0)),
            "recall": float(recall_score(true_seqs, pred_seqs, zero_division=0)),
            "token_accuracy": float(accuracy_score(true_seqs, pred_seqs)),
            "examples": len(true_seqs)}
