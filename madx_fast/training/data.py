"""Data for the three MAD-X stages: unlabeled text for MLM, and WikiANN / SQuAD / COPA-format task data.

A data *spec* is a string naming where examples come from:

* a local path: a file, or a directory (text: every text file under it; tasks: the file of the split, e.g.
  ``train.jsonl``, ``validation.jsonl`` / ``dev.conll``, ``test.json``);
* a Hugging Face dataset: ``name`` or ``name:config`` (``"wikiann:sw"``, ``"google/xquad:xquad.de"``); the
  prefix ``hf:`` forces this reading.

``{lang}`` in a spec is replaced by the language code (``"wikiann:{lang}"``, ``"data/{lang}/test.jsonl"``). A
spec that exists on disk, starts with ``.``, ``/`` or ``~``, or ends in a data-file suffix is a path, and a
missing one is an error (never a silent hub lookup). Everything is read and checked before training starts.

MLM batches: ``mask_tokens`` does BERT's 15% masking, 80% ``<mask>`` / 10% random token / 10% unchanged,
with an explicit ``torch.Generator`` so that the masks are part of the checkpointed RNG state.
"""
from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

log = logging.getLogger("madx_fast.training")

IGNORE_INDEX = -100
TEXT_SUFFIXES = (".txt", ".text", ".raw")
JSON_SUFFIXES = (".json", ".jsonl")
CONLL_SUFFIXES = (".conll", ".conllu", ".iob", ".iob2", ".bio", ".tsv")
DATA_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + CONLL_SUFFIXES
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "dev", "valid", "val"), "test": ("test",)}

# WikiANN's label inventory (the order of its ``ner_tags`` ClassLabel).
WIKIANN_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")


class DataError(ValueError):
    """Data that cannot be used: the message names the file or dataset and what is wrong."""


def progress(iterable, desc: str, min_items: int = 20):
    """A tqdm bar for long loops on a terminal (off when stderr is not a TTY, or for short loops)."""
    try:
        n = len(iterable)
    except TypeError:
        n = None
    if n is not None and n < min_items:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    return tqdm(iterable, desc=desc, leave=False, disable=None, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """A resolved spec: ``kind`` "local" (``path``) or "hf" (``name``, ``config``)."""

    kind: str
    path: str = ""
    name: str = ""
    config: str | None = None

    def __str__(self):
        if self.kind == "local":
            return self.path
        return f"{self.name}:{self.config}" if self.config else self.name


def resolve_spec(spec: str, lang: str | None = None) -> Source:
    """Turn a spec string into a Source (see the module docstring); raises FileNotFoundError for a missing
    path."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data spec {spec!r}")
    spec = spec.strip()
    if "{lang}" in spec:
        if not lang:
            raise DataError(f"data spec {spec!r} contains {{lang}} but no language was given")
        spec = spec.replace("{lang}", lang)
    if spec.startswith("hf:"):
        return _hf_source(spec[3:])
    expanded = os.path.expanduser(spec)
    if os.path.exists(expanded):
        return Source("local", path=expanded)
    if spec.startswith((".", "/", "~")) or spec.lower().endswith(DATA_SUFFIXES):
        raise FileNotFoundError(f"data file or directory {expanded!r} does not exist")
    return _hf_source(spec)


def _hf_source(text: str) -> Source:
    name, _, config = text.partition(":")
    if not name:
        raise DataError(f"no dataset name in {text!r}")
    return Source("hf", name=name, config=config or None)


def load_hf_dataset(source: Source, split: str, streaming: bool = False):
    """``datasets.load_dataset(name, config, split=split)`` with errors that say which dataset failed."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DataError(f"loading the dataset {source} needs the 'datasets' package ({exc})") from None
    try:
        return datasets.load_dataset(source.name, source.config, split=split, streaming=streaming)
    except Exception as exc:  # noqa: BLE001 - hub, network and config errors all mean: cannot use this spec
        hint = "" if os.environ.get("HF_DATASETS_OFFLINE") != "1" else " (HF_DATASETS_OFFLINE=1 is set)"
        raise DataError(f"cannot load dataset {source.name!r} (config {source.config!r}, split {split!r}): "
                        f"{type(exc).__name__}: {exc}{hint}") from None


def split_file(directory: str, split: str) -> str:
    """The file of ``split`` in a task-data directory: ``{split}.{jsonl,json,conll,...}`` (with aliases)."""
    names = SPLIT_ALIASES.get(split, (split,))
    found = []
    for entry in sorted(os.listdir(directory)):
        stem, ext = os.path.splitext(entry)
        if ext.lower() in DATA_SUFFIXES and (stem in names or any(stem.endswith(f"_{n}") or stem.endswith(f"-{n}")
                                                                   for n in names)):
            found.append(os.path.join(directory, entry))
    if not found:
        raise FileNotFoundError(f"no {split} file in {directory} (looked for {'/'.join(names)} with a suffix "
                                f"{', '.join(DATA_SUFFIXES)})")
    if len(found) > 1:
        raise DataError(f"several {split} files in {directory}: {[os.path.basename(f) for f in found]}")
    return found[0]


def _task_file(source: Source, split: str) -> str:
    return split_file(source.path, split) if os.path.isdir(source.path) else source.path


def _read_json_records(path: str) -> list[dict]:
    """A JSON list, a JSON-lines file, or ``{"data": [...]}``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: the file is empty")
    if stripped[0] == "[" or (stripped[0] == "{" and path.endswith(".json")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, list):
            return data
        if isinstance(data, dict):
            if isinstance(data.get("data"), list):
                return data["data"]
            return [data]
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{i}: not valid JSON ({exc})") from None
    return records


# --------------------------------------------------------------------------------------------------------
# unlabeled text (MLM)
# --------------------------------------------------------------------------------------------------------
def text_files(path: str) -> list[str]:
    """A file, or every text/JSON file under a directory (sorted, hidden files skipped)."""
    if os.path.isfile(path):
        return [path]
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            if not n.startswith(".") and n.lower().endswith(TEXT_SUFFIXES + JSON_SUFFIXES):
                files.append(os.path.join(root, n))
    if not files:
        raise DataError(f"{path}: no text files ({', '.join(TEXT_SUFFIXES + JSON_SUFFIXES)}) found")
    return files


def read_texts(spec: str, *, lang: str | None = None, split: str = "train", text_column: str = "text",
               max_texts: int | None = None) -> list[str]:
    """Non-empty lines (text files) or ``text_column`` values (JSON files, HF datasets), in order."""
    source = resolve_spec(spec, lang)
    texts: list[str] = []
    if source.kind == "local":
        for path in text_files(source.path):
            if path.lower().endswith(JSON_SUFFIXES):
                for rec in _read_json_records(path):
                    if text_column not in rec:
                        raise DataError(f"{path}: a record has no {text_column!r} field (fields: {sorted(rec)})")
                    texts.append(str(rec[text_column]))
            else:
                with open(path, encoding="utf-8") as f:
                    texts.extend(line.rstrip("\n") for line in f)
            if max_texts and len([t for t in texts if t.strip()]) >= max_texts:
                break
    else:
        ds = load_hf_dataset(source, split, streaming=bool(max_texts))
        columns = getattr(ds, "column_names", None) or []
        if columns and text_column not in columns:
            raise DataError(f"dataset {source} has no column {text_column!r} (columns: {columns}); "
                            "pass --text-column")
        for i, rec in enumerate(ds):
            if max_texts and i >= max_texts:
                break
            texts.append(str(rec[text_column]))
    texts = [t.strip() for t in texts if t.strip()]
    if max_texts:
        texts = texts[:max_texts]
    if not texts:
        raise DataError(f"{source}: no text found")
    return texts


def tokenize_texts(tokenizer, texts: Sequence[str], batch: int = 1000) -> list[list[int]]:
    """Token ids of each text without special tokens."""
    out: list[list[int]] = []
    for i in progress(range(0, len(texts), batch), desc="tokenize"):
        enc = tokenizer(list(texts[i:i + batch]), add_special_tokens=False, truncation=False,
                        return_attention_mask=False, verbose=False)
        out.extend(enc["input_ids"])
    return out


def pack_blocks(token_lists: Iterable[list[int]], max_length: int, bos_id: int, eos_id: int,
                pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoBERTa-style packing: texts joined with ``</s>``, cut into ``max_length - 2`` pieces, each wrapped as
    ``<s> piece </s>``. The last, shorter block is padded. Returns ``(input_ids, attention_mask)`` [N, L],
    int32 (half the memory of int64 for large corpora; batches are widened when they are made)."""
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


@dataclass
class MlmData:
    """Packed MLM blocks and the ids the masking needs."""

    input_ids: torch.Tensor          # [N, L]
    attention_mask: torch.Tensor     # [N, L]
    special_ids: tuple[int, ...]     # never masked (besides padding)
    mask_id: int
    vocab_size: int

    def __len__(self):
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def mlm_data_from_texts(tokenizer, texts: Sequence[str], max_length: int) -> MlmData:
    check_tokenizer(tokenizer, need_mask=True)
    ids, mask = pack_blocks(tokenize_texts(tokenizer, texts), max_length, _bos(tokenizer), _eos(tokenizer),
                            tokenizer.pad_token_id)
    return MlmData(ids, mask, tuple(sorted(set(tokenizer.all_special_ids))), tokenizer.mask_token_id,
                   len(tokenizer))


def _bos(tok) -> int:
    return tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id


def _eos(tok) -> int:
    return tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id


def check_tokenizer(tokenizer, need_mask: bool = False) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer; madx_fast needs one for "
                        "word alignment and answer offsets")
    if tokenizer.pad_token_id is None:
        raise DataError("the tokenizer has no pad token")
    if need_mask and tokenizer.mask_token_id is None:
        raise DataError("the tokenizer has no mask token, so it cannot be used for masked-LM training")
    if _bos(tokenizer) is None or _eos(tokenizer) is None:
        raise DataError("the tokenizer has no <s>/</s> (or [CLS]/[SEP]) tokens")


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


# --------------------------------------------------------------------------------------------------------
# the order in which training examples are drawn
# --------------------------------------------------------------------------------------------------------
class ShuffledStream:
    """An endless stream of example indices: epoch ``e`` is ``randperm(n)`` seeded by ``(seed, e)``.

    ``state_dict()`` is the position ``(epoch, offset)``; a stream restored from it continues with exactly the
    indices the original would have produced. Every process of a data-parallel run holds the same stream and
    draws the same global batch; each takes its own slice."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size < 1:
            raise DataError("no training examples")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g)

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.offset == self.size:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            n = min(k - len(out), self.size - self.offset)
            out.extend(self._perm[self.offset:self.offset + n].tolist())
            self.offset += n
        return out

    def state_dict(self) -> dict:
        return {"size": self.size, "seed": self.seed, "shuffle": self.shuffle, "epoch": self.epoch,
                "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        for key in ("size", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise DataError(f"the checkpoint's data stream has {key}={state[key]!r} but this run has "
                                f"{getattr(self, key)!r}: the training data or seed changed")
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._perm = self._permutation(self.epoch)


# --------------------------------------------------------------------------------------------------------
# NER (WikiANN format: tokens + ner_tags)
# --------------------------------------------------------------------------------------------------------
@dataclass
class NerExample:
    tokens: list[str]
    tags: list[str]


def load_ner(spec: str, split: str, *, lang: str | None = None, label_names: Sequence[str] | None = None,
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
        path = _task_file(source, split)
        if path.lower().endswith(JSON_SUFFIXES):
            for i, rec in enumerate(_read_json_records(path)):
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
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
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


# --------------------------------------------------------------------------------------------------------
# extractive QA (SQuAD format)
# --------------------------------------------------------------------------------------------------------
@dataclass
class QaExample:
    id: str
    question: str
    context: str
    answers: list[dict] = field(default_factory=list)  # [{"text": str, "answer_start": int}]


def load_squad(spec: str, split: str, *, lang: str | None = None, max_examples: int | None = None) -> list[QaExample]:
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
        path = _task_file(source, split)
        records = []
        for rec in _read_json_records(path):
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


# --------------------------------------------------------------------------------------------------------
# multiple choice (COPA / XCOPA format)
# --------------------------------------------------------------------------------------------------------
@dataclass
class CopaExample:
    premise: str
    choices: list[str]
    question: str   # "cause" or "effect"
    label: int


COPA_QUESTIONS = {"cause": "What was the cause?", "effect": "What happened as a result?"}


def load_copa(spec: str, split: str, *, lang: str | None = None, max_examples: int | None = None) -> list[CopaExample]:
    """COPA / XCOPA records ``premise, choice1, choice2, question ("cause"|"effect"), label`` from an HF
    dataset or JSON(-lines) files."""
    source = resolve_spec(spec, lang)
    if source.kind == "hf":
        records, path = list(load_hf_dataset(source, split)), str(source)
    else:
        path = _task_file(source, split)
        records = _read_json_records(path)
    examples = []
    for i, rec in enumerate(records):
        missing = [k for k in ("premise", "choice1", "choice2", "question", "label") if k not in rec]
        if missing:
            raise DataError(f"{path}: record {i} has no {missing} (COPA format: premise, choice1, choice2, "
                            "question, label)")
        if rec["question"] not in COPA_QUESTIONS:
            raise DataError(f"{path}: record {i}: question {rec['question']!r} is not 'cause' or 'effect'")
        label = int(rec["label"])
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


# --------------------------------------------------------------------------------------------------------
# padding
# --------------------------------------------------------------------------------------------------------
def pad_rows(rows: Sequence[Sequence[int]], pad_value: int, length: int | None = None) -> torch.Tensor:
    length = length or max(len(r) for r in rows)
    out = torch.full((len(rows), length), pad_value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def seeded_shuffle(items: list, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items
