"""Where data comes from: spec resolution and the generic readers (text, JSON records, HF datasets, split
files). What a task makes of the records is in its own module (``tasks/ner.py``, ``qa.py``, ``copa.py``,
``mlm.py``).

A data *spec* is a string naming where examples come from:

* a local path: a file, or a directory (text: every text file under it; tasks: the file of the split, e.g.
  ``train.jsonl``, ``validation.jsonl`` / ``dev.conll``, ``test.json``);
* a Hugging Face dataset: ``namespace/name`` or ``namespace/name:config`` (``"unimelb-nlp/wikiann:sw"``,
  ``"google/xquad:xquad.de"``); the prefix ``hf:`` forces this reading (also for a local dataset directory);
* a short name of one of the paper's datasets (``HUB_DATASETS``): ``wikiann:sw``, ``xquad:de``, ``xcopa:sw``,
  ``squad``, ``copa``, ``wikipedia:sw``, resolved to the dataset's current Hub repository and config name.

``{lang}`` in a spec is replaced by the language code (``"wikiann:{lang}"``, ``"data/{lang}/test.jsonl"``). A
spec that exists on disk, looks like a path (``madx_fast.paths``: it starts with ``./``, ``../``, ``/`` or
``~``, or its first component is a directory here) or ends in a data-file suffix is a path, and a missing one
is an error naming the nearest existing names (never a silent hub lookup). The splits of the paper's datasets are known: asking for
one they do not have (XQuAD has only ``validation``, XCOPA no ``train``) is an error naming the splits that
exist, before anything is downloaded. Everything is read and checked before training starts.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass

from ..paths import LocalPathError, explicit_path, looks_local, missing_message
from .. import files

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
class HubDataset:
    """One of the paper's datasets on the Hugging Face Hub: its current repository, the short names users know
    it by, how its configs are named (``"{}"``: the part after ``:`` as it is; ``"xquad.{}"``: with that
    prefix, unless given in full; no ``{}``: that one config), the splits it has, the split a zero-shot
    evaluation reads, and what to know when a split is missing."""

    repo: str
    aliases: tuple[str, ...]
    config: str
    splits: tuple[str, ...]
    eval_split: str
    configs: tuple[str, ...] = ()   # the configs there are, where the list is short (else not checked)
    note: str = ""

    def config_name(self, given: str | None, spec: str) -> str:
        if "{}" not in self.config:
            return self.config
        if not given:
            raise DataError(f"{spec!r}: {self.repo} has one config per language: write {self.aliases[0]}:{{lang}} "
                            f"or {self.aliases[0]}:{self.configs[0] if self.configs else 'sw'}")
        # a language code is completed ("de" -> "xquad.de"); a config written in full ("xquad.de", another
        # Wikipedia dump "20220301.en") is kept
        name = given if "." in given else self.config.format(given)
        known = [self.config.format(c) for c in self.configs]
        if known and name not in known and not name.startswith("translation-"):
            raise DataError(f"{spec!r}: {self.repo} has no config {name!r} (languages: {', '.join(self.configs)})")
        return name


# The datasets of the MAD-X paper (and the text of stage 1), by their current Hub repositories. Checked against
# the Hub's listings (parquet data, no loading script): configs and splits as published there.
HUB_DATASETS = (
    HubDataset("unimelb-nlp/wikiann", ("wikiann", "wiki_ann"), "{}", ("train", "validation", "test"), "test",
               note="WikiANN: one config per language code, e.g. wikiann:sw"),
    HubDataset("google/xquad", ("xquad",), "xquad.{}", ("validation",), "validation",
               configs=("ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh"),
               note="XQuAD is one evaluation set, published as its 'validation' split (there is no 'test'); "
                    "train QA on squad"),
    HubDataset("cambridgeltl/xcopa", ("xcopa",), "{}", ("validation", "test"), "test",
               configs=("et", "ht", "id", "it", "qu", "sw", "ta", "th", "tr", "vi", "zh"),
               note="XCOPA is for evaluation only (validation, test): train the COPA task adapter on English COPA "
                    "(copa, i.e. aps/super_glue:copa)"),
    HubDataset("rajpurkar/squad", ("squad",), "plain_text", ("train", "validation"), "validation",
               note="SQuAD v1.1 has train and validation (its test set is not public)"),
    HubDataset("aps/super_glue", ("copa", "super_glue"), "copa", ("train", "validation", "test"), "validation",
               note="English COPA from SuperGLUE: its 'test' split has no labels; validate on 'validation'"),
    HubDataset("wikimedia/wikipedia", ("wikipedia",), "20231101.{}", ("train",), "train",
               note="Wikipedia dumps: one config per language ('20231101.sw'), a 'train' split only; hold out "
                    "text with --eval-fraction"),
)
SPLIT_NAMES = {"dev": "validation", "valid": "validation", "val": "validation"}


def hub_dataset(name: str, config: str | None = None) -> HubDataset | None:
    """The table entry a dataset name (a short name or a repository id) and config refer to, or None."""
    key = name.lower()
    for entry in HUB_DATASETS:
        if (key in entry.aliases or key == entry.repo.lower()) and ("{}" in entry.config or
                                                                    config in (None, entry.config)):
            return entry
    return None


@dataclass(frozen=True)
class Source:
    """A resolved spec: ``kind`` "local" (``path``) or "hf" (``name``, ``config``; ``known``: the table entry
    of one of the paper's datasets)."""

    kind: str
    path: str = ""
    name: str = ""
    config: str | None = None
    known: HubDataset | None = None

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
    if looks_local(spec) or spec.lower().endswith(DATA_SUFFIXES):
        raise LocalPathError(missing_message(spec, "data file or directory",
                                             hub_hint=looks_local(spec) and not explicit_path(spec)))
    return _hf_source(spec)


def _hf_source(text: str) -> Source:
    name, _, config = text.partition(":")
    if not name:
        raise DataError(f"no dataset name in {text!r}")
    config = config or None
    known = hub_dataset(name, config)
    if known is not None:
        return Source("hf", name=known.repo, config=known.config_name(config, text), known=known)
    if "/" not in name and not os.path.exists(os.path.expanduser(name)):
        short = ", ".join(a for entry in HUB_DATASETS for a in entry.aliases[:1])
        raise DataError(f"{text!r} is not a local path, and {name!r} is not a Hub dataset id ('namespace/name', e.g. "
                        f"unimelb-nlp/wikiann:sw) nor a short name madx_fast knows ({short})")
    return Source("hf", name=name, config=config)


def hf_split(source: Source, split: str) -> str:
    """The split name to ask ``datasets`` for; for the paper's datasets a split they do not have is refused
    here, with the splits that exist (and what to use instead)."""
    split = SPLIT_NAMES.get(split, split)
    known = source.known
    if known is not None and split not in known.splits:
        raise DataError(f"{source} has no {split!r} split (splits: {', '.join(known.splits)}). {known.note}")
    return split


def default_eval_split(spec: str, lang: str | None = None) -> str:
    """The split a zero-shot evaluation of ``spec`` reads when none is named: ``test``, or the dataset's
    evaluation split where it has none (XQuAD: ``validation``)."""
    try:
        source = resolve_spec(spec, lang)
    except (FileNotFoundError, DataError):
        return "test"  # the reader gives the error
    return source.known.eval_split if source.known is not None else "test"


def load_hf_dataset(source: Source, split: str, streaming: bool = False):
    """``datasets.load_dataset(name, config, split=split)`` with errors that say which dataset failed (and, for
    a split that is not there, which splits are)."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DataError(f"loading the dataset {source} needs the 'datasets' package ({exc})") from None
    split = hf_split(source, split)
    from ..model import hub
    unreachable = None if datasets.config.HF_HUB_OFFLINE else hub.unreachable_reason()
    try:
        with hub.cache_only() if unreachable else contextlib.nullcontext():  # no minute of retries
            return datasets.load_dataset(source.name, source.config, split=split, streaming=streaming)
    except Exception as exc:  # noqa: BLE001 - hub, network and config errors all mean: cannot use this spec
        if unreachable or hub.connection_problem(exc):
            raise DataError(f"cannot load dataset {source} (split {split!r}): "
                            f"{hub.hub_failure(exc, source.name, cache=datasets.config.HF_DATASETS_CACHE)}") from None
        hint = " (HF_DATASETS_OFFLINE=1 is set: only the datasets cache was read)" if datasets.config.HF_HUB_OFFLINE \
            else ""
        if "split" in str(exc).lower():
            try:
                names = datasets.get_dataset_split_names(source.name, source.config)
            except Exception:  # noqa: BLE001
                names = None
            if names and split not in names:
                raise DataError(f"dataset {source} has no {split!r} split (splits: {', '.join(names)})") from None
        raise DataError(f"cannot load dataset {source.name!r} (config {source.config!r}, split {split!r}): "
                        f"{type(exc).__name__}: {' '.join(str(exc).split())}{hint}") from None


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


def has_split(spec: str, lang: str | None, split: str) -> bool:
    """Whether a data spec has ``split`` to find: a dataset name that declares it (or whose splits are not
    known before loading), or a directory with a file of it; a single file has none."""
    try:
        source = resolve_spec(spec, lang)
    except (FileNotFoundError, DataError):
        return False
    if source.kind == "hf":
        return source.known is None or split in source.known.splits
    if not os.path.isdir(source.path):
        return False
    try:
        split_file(source.path, split)
    except (FileNotFoundError, DataError):
        return False
    return True


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
            data = None  # JSON lines, then
        except (RecursionError, MemoryError) as exc:
            raise DataError(f"{path}: {files.unreadable_json(exc)}") from None
        if isinstance(data, list):
            return data
        if isinstance(data, dict):
            if isinstance(data.get("data"), list):
                return data["data"]
            return [data]
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            records.append(files.parse_json(line, DataError, f"{path}:{i}"))
    return records


# --------------------------------------------------------------------------------------------------------
# unlabeled text (MLM)
# --------------------------------------------------------------------------------------------------------
def text_files(path: str) -> list[str]:
    """A file, or every text/JSON file under a directory (sorted, hidden files skipped)."""
    if os.path.isfile(path):
        return [path]
    found = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            if not n.startswith(".") and n.lower().endswith(TEXT_SUFFIXES + JSON_SUFFIXES):
                found.append(os.path.join(root, n))
    if not found:
        raise DataError(f"{path}: no text files ({', '.join(TEXT_SUFFIXES + JSON_SUFFIXES)}) found")
    return found


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
