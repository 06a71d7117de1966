"""Where data comes from: spec resolution and the generic readers (text, JSON records, HF datasets, split
files). What a task makes of the records is in its own module (``tasks/ner.py``, ``qa.py``, ``copa.py``,
``mlm.py``).

A data *spec* is a string naming where examples come from:

* a local path: a file, or a directory (text: every text file under it; tasks: the file of the split, e.g.
  ``train.jsonl``, ``validation.jsonl`` / ``dev.conll``, ``test.json``);
* a Hugging Face dataset: ``name`` or ``name:config`` (``"wikiann:sw"``, ``"google/xquad:xquad.de"``); the
  prefix ``hf:`` forces this reading.

``{lang}`` in a spec is replaced by the language code (``"wikiann:{lang}"``, ``"data/{lang}/test.jsonl"``). A
spec that exists on disk, starts with ``.``, ``/`` or ``~``, or ends in a data-file suffix is a path, and a
missing one is an error (never a silent hub lookup). Everything is read and checked before training starts.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

log = logging.getLogger("madx_fast.training")

TEXT_SUFFIXES = (".txt", ".text", ".raw")
JSON_SUFFIXES = (".json", ".jsonl")
CONLL_SUFFIXES = (".conll", ".conllu", ".iob", ".iob2", ".bio", ".tsv")
DATA_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + CONLL_SUFFIXES
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "dev", "valid", "val"), "test": ("test",)}


class DataError(ValueError):
    """Data that cannot be used: the message names the file or dataset and what is wrong."""


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


def task_file(source: Source, split: str) -> str:
    return split_file(source.path, split) if os.path.isdir(source.path) else source.path


def text_lines(path: str):
    """The lines of a UTF-8 text file (without their newline), read lazily; a line that is not UTF-8 is a
    DataError naming the file and the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start} of the line: {exc.reason}); "
                                "convert the file to UTF-8") from None
            yield line.rstrip("\r\n")


def read_text_file(path: str) -> str:
    return "\n".join(text_lines(path))


def read_json_records(path: str) -> list[dict]:
    """A JSON list, a JSON-lines file, or ``{"data": [...]}``."""
    text = read_text_file(path)
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
                for rec in read_json_records(path):
                    if text_column not in rec:
                        raise DataError(f"{path}: a record has no {text_column!r} field (fields: {sorted(rec)})")
                    texts.append(str(rec[text_column]))
            else:
                texts.extend(text_lines(path))
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
