"""Mixed-language inference on a stream of JSON lines: ``madx predict``, ``predict`` and ``predict_stream``.

    from madx_fast.training.predict import predict, predict_stream

    lines = [{"lang": "sw", "text": "Rais Samia alizuru Nairobi"}, {"lang": "qu", "tokens": ["Lima", "llaqtapi"]}]
    for out in predict_stream(lines, task_adapter="runs/ner-en",
                              lang_adapters={"sw": "runs/lang-sw", "qu": "runs/lang-qu"}):
        print(out)     # {"line": 1, "lang": "sw", "words": [...], "tags": [...]}
    summary = predict(task_adapter=..., lang_adapters=..., input="in.jsonl", output="out.jsonl")

Each line is a JSON object with its language (``lang``) and the task's fields: NER ``text`` (split at
whitespace) or ``tokens`` (the words); QA ``question`` and ``context``; COPA ``premise``, ``choice1``,
``choice2``, ``question`` ("cause" or "effect"). An ``id`` is copied to the output. The model runs
``Stack(PerRow(<every given language>), task)``: the lines of all languages share each batch, every row
through its own language adapter (``madx.row_languages``), which computes what the line alone computes with
``Stack(its language, task)``. A language given as an ensemble of others (``qu=avg:es,pt``, ``qu=emea:es,pt``:
``ensemble.py``) is a PerRow member ``Average(es, pt)``; an EMEA ensemble tunes its weights on the rows of
its language in each batch before the batch is predicted.

Streaming: ``chunk_lines`` lines are read, parsed, tokenised, sorted by length, batched, predicted and handed
out in input order before the next chunk is read, so memory holds one chunk whatever the size of the input.

A malformed line (not JSON, not an object, a field missing or of the wrong type) or one in a language without
an adapter is reported with its line number (a warning on stderr; counted in ``Predictions``) and, by
``on_error``: skipped (no output record), replaced by ``{"line": n, "error": "..."}`` (with the line's ``id``
and ``lang`` when it parsed), or fatal (a ``DataError``). Blank lines are ignored; a line longer than
``max_line_bytes`` is an error of its own, skipped unread (``bounded_lines``). Long inputs: NER texts are
cut into windows of whole words, QA contexts into overlapping windows (the best span of all wins), COPA pairs
are truncated (marked in the output). docs/training.md ("Predict") has the formats.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
from typing import Iterable

import torch

from .. import files
from ..graphs import graph_lengths
from ..model import PerRow, Stack
from . import models
from .batches import autocast, model_batch, pad_rows
from .data import DataError
from .devices import pick_device
from .ensemble import EntropyMinimisation, ensemble_block
from .loading import check_same_base, ensembles_for, load_task_model, resolve_language_adapter, resolve_task_adapter
from .progress import LineProgress, is_terminal
from .settings import PredictSettings
from .tasks import make_task
from .tasks.base import LineError, string_field

log = logging.getLogger("madx_fast.training")

KEPT_ERRORS = 100  # errors listed in a summary (every one is counted and reported on stderr)


# --------------------------------------------------------------------------------------------------------
# the predictor
# --------------------------------------------------------------------------------------------------------
class Predictor:
    """The base model with the task adapter (and head) and every language adapter loaded, active as
    ``Stack(PerRow(*languages), task)``; ``stream(records)`` predicts. Takes a ``PredictSettings`` or its
    fields as keywords (``input`` / ``output`` are for ``predict``)."""

    def __init__(self, settings: PredictSettings | None = None, /, **kwargs):
        s = self.settings = PredictSettings.build(settings, **kwargs)
        plan = resolve_task_adapter(s.task_adapter, s.model)
        ensembles = ensembles_for(s.lang_adapters, s.lang_adapters)  # languages served by others' adapters
        lang_paths = {lang: resolve_language_adapter(lang, where, plan["base_model"])
                      for lang, where in s.lang_adapters.items() if lang not in ensembles}
        check_same_base([plan["path"], *lang_paths.values()])
        if plan["meta"] and not plan["meta"].get("language"):
            log.warning("%s was trained without a language adapter (MAD-X -LAD -INV); here it runs stacked on the "
                        "lines' language adapters", plan["path"])
        self.device = pick_device(s.device)
        tokenizer = models.load_tokenizer(plan["base_model"], model=plan["base_model"])
        self.task = make_task(plan["task"], pad_id=tokenizer.pad_token_id, labels=plan["labels"])
        self.max_length = models.max_length_for(plan["base_model"], s.max_length,
                                               plan["meta"].get("max_length") or self.task.default_max_length)
        self.format = self.task.line_format(self.task, tokenizer, self.max_length)
        self.model, self.madx, self.task_name = load_task_model(plan, self.task, lang_paths, s.backend,
                                                                s.backbone_dtype, self.device)
        self.languages = PerRow(*(ensemble_block(lang, ensembles[lang], self.device) if lang in ensembles else lang
                                  for lang in s.lang_adapters))
        self.madx.set_active(Stack(self.languages, self.task_name))  # checks the languages fit one grouped op
        self.model.eval()
        self.emea = EntropyMinimisation(self.model, self.madx, s.emea_steps, s.emea_lr)  # acts on emea: members
        self.model.register_forward_pre_hook(self.emea, with_kwargs=True)
        self.runner, self.lengths = None, None
        if s.cuda_graphs and self.task.graph_outputs:
            from ..graphs import GraphedInference
            self.lengths = graph_lengths(self.max_length)
            self.runner = GraphedInference(self.model, output_key=self.task.graph_outputs,
                                           max_graphs=len(self.lengths))

    def stream(self, records: Iterable, *, source: str = "input", total: int | None = None) -> "Predictions":
        """The output records of ``records`` (dicts, or JSON lines as str / bytes), in input order, computed a
        chunk at a time as they are read. ``source`` names the input in messages; ``total`` (lines, when
        known) sizes the progress bar."""
        return Predictions(self, records, source, total)

    # ---------------------------------------------------------------------------------------------------
    def _run(self, records, report: "Predictions", source: str, total: int | None):
        """Chunks of output records (lists) in input order; reads a chunk of lines only when asked for it."""
        s = self.settings
        bar = LineProgress(total, enabled=s.progress, errors="not predicted")
        try:
            chunk = []
            for number, item in enumerate(records, 1):
                chunk.append((number, item))
                if len(chunk) == s.chunk_lines:
                    yield self._chunk(chunk, report, source, bar)
                    chunk = []
            if chunk:
                yield self._chunk(chunk, report, source, bar)
        finally:
            bar.close()

    def _chunk(self, chunk, report: "Predictions", source: str, bar: LineProgress) -> list[dict]:
        heads: list[dict | None] = [None] * len(chunk)  # {"line", "id", "lang"} of every non-blank line
        errors: dict[int, str] = {}
        todo, examples, groups = [], [], []
        for pos, (number, item) in enumerate(chunk):
            try:
                rec = _record(item, self.settings.max_line_bytes)
                if rec is None:
                    continue
                heads[pos] = {"line": number, **({"id": rec["id"]} if "id" in rec else {}),
                              **({"lang": rec["lang"]} if isinstance(rec.get("lang"), str) else {})}
                lang = self._language(rec)
                examples.append(self.format.parse(rec))
                todo.append(pos)
                groups.append(self.languages.index(lang))
            except LineError as exc:
                heads[pos] = heads[pos] or {"line": number}
                errors[pos] = self._failed(number, str(exc), source)
        fields = self._predict(examples, groups)
        results: dict[int, dict] = {}
        for pos, got in zip(todo, fields):
            if isinstance(got, LineError):
                errors[pos] = self._failed(chunk[pos][0], str(got), source)
            else:
                results[pos] = {**heads[pos], **got}
        out = []
        for pos, (number, _) in enumerate(chunk):
            if pos in results:
                out.append(results[pos])
            elif pos in errors:
                log.warning("%s line %d: %s", source, number, errors[pos])
                if len(report.first_errors) < KEPT_ERRORS:
                    report.first_errors.append((number, errors[pos]))
                if self.settings.on_error == "record":
                    out.append({**heads[pos], "error": errors[pos]})
        report.lines += len(chunk)
        report.predicted += len(results)
        report.errors += len(errors)
        report.blank += sum(h is None for h in heads)
        bar.update(len(chunk), len(errors))
        return out

    def _language(self, rec: dict) -> str:
        lang = string_field(rec, "lang")
        if lang not in self.languages.labels:
            raise LineError(f"no language adapter for {lang!r} (given: {', '.join(self.languages.labels)})")
        return lang

    def _failed(self, number: int, message: str, source: str) -> str:
        if self.settings.on_error == "fail":
            raise DataError(f"{source} line {number}: {message}")
        return message

    def _encode(self, examples: list) -> list:
        """Features per example; when the chunk cannot be encoded as a whole (e.g. a QA question too long for
        a window), each example alone, so that only the bad ones fail (as LineErrors)."""
        try:
            return self.format.encode(examples)
        except ValueError as exc:  # DataError is one
            if len(examples) == 1:
                return [LineError(str(exc))]
        return [self._encode([ex])[0] for ex in examples]

    def _predict(self, examples: list, groups: list[int]) -> list:
        """The output fields of every example (or a LineError): windows of all examples and languages in
        batches sorted by length, put back in order."""
        if not examples:
            return []
        features = self._encode(examples)
        units = [(i, k, f) for i, fs in enumerate(features) if not isinstance(fs, LineError)
                 for k, f in enumerate(fs)]
        units.sort(key=lambda u: -max(len(r) for r in self.format.rows(u[2])))
        read: list = [None if isinstance(fs, LineError) else [None] * len(fs) for fs in features]
        size = self.settings.batch_size
        for start in range(0, len(units), size):
            batch = units[start:start + size]
            feats = [f for _, _, f in batch]
            outputs = self._forward(feats, [groups[i] for i, _, _ in batch])
            for (i, k, _), value in zip(batch, self.format.read(outputs, feats)):
                read[i][k] = value
        return [fs if isinstance(fs, LineError) else self.format.result(ex, r)
                for ex, fs, r in zip(examples, features, read)]

    @torch.no_grad()
    def _forward(self, features: list[dict], groups: list[int]) -> list[torch.Tensor]:
        """The model's ``output_keys`` for one batch: each feature's rows in its language (group id)."""
        rows = [r for f in features for r in self.format.rows(f)]
        per = len(rows) // len(features)  # COPA: a row per choice
        languages = torch.tensor([g for g in groups for _ in range(per)], dtype=torch.long)
        ids = pad_rows(rows, self.task.pad_id)
        mask = pad_rows([[1] * len(r) for r in rows], 0, ids.shape[1])
        with autocast(self.device, self.settings.bf16):
            if self.runner is not None:
                return list(self._replay(ids, mask, languages))
            if per > 1:
                ids, mask = ids.view(len(features), per, -1), mask.view(len(features), per, -1)
            inputs = model_batch(self.model, {"input_ids": ids, "attention_mask": mask}, self.device)
            with self.madx.row_languages(languages):  # (emea: ensembles tune their weights first: self.emea)
                out = self.model(**inputs)
        return [out[k] for k in self.format.output_keys]

    def _replay(self, ids, mask, languages):
        """CUDA-graph replay: the batch padded to ``batch_size`` rows and the next of a few lengths, so that a
        handful of graphs serve the whole stream (padding rows are cut by ``read``)."""
        rows, length = ids.shape
        target = next(n for n in self.lengths if n >= length)
        full_ids = torch.full((self.settings.batch_size, target), self.task.pad_id, dtype=torch.long)
        full_mask = torch.zeros_like(full_ids)
        full_ids[:rows, :length], full_mask[:rows, :length] = ids, mask
        full_mask[rows:, 0] = 1
        full_languages = torch.zeros(self.settings.batch_size, dtype=torch.long)
        full_languages[:rows] = languages
        return self.runner(full_ids, full_mask, languages=full_languages)


class _LongLine:
    """An input line longer than ``max_line_bytes``, skipped unread (``bounded_lines``)."""

    def __init__(self, size: int):
        self.size = size


def _record(item, max_bytes: int) -> dict | None:
    """A line as a dict (None for a blank line), or a LineError saying why not."""
    if isinstance(item, dict):
        return item
    size = item.size if isinstance(item, _LongLine) else len(item) if isinstance(item, (bytes, bytearray)) else \
        len(item.encode("utf-8", "surrogatepass")) if isinstance(item, str) and len(item) * 4 > max_bytes else 0
    if size > max_bytes:
        raise LineError(f"{size} bytes, longer than the limit of {max_bytes} (--max-line-bytes); not read")
    if isinstance(item, (bytes, bytearray)):
        try:
            item = item.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LineError(f"not UTF-8 ({exc})") from None
    if not isinstance(item, str):
        raise LineError(f"expected a JSON object (or a line of JSON text), got {type(item).__name__}")
    if not item.strip():
        return None
    rec = files.parse_json(item, LineError)
    if not isinstance(rec, dict):
        raise LineError(f"expected a JSON object, got {type(rec).__name__}")
    return rec


class Predictions:
    """The output records of a stream, in input order: iterate over it, or over ``chunks()`` (lists, one per
    chunk of input lines; use one or the other). Counts, while and after iterating: ``lines`` read (blank
    ones too), ``predicted``, ``errors`` (lines reported and not predicted), ``blank``; ``first_errors``: the
    first 100 errors as ``(line, message)``."""

    def __init__(self, predictor: Predictor, records: Iterable, source: str, total: int | None):
        if isinstance(records, (str, bytes, dict)) or not hasattr(records, "__iter__"):
            raise TypeError(f"records must be an iterable of dicts or JSON lines, got {type(records).__name__} "
                            "(for a file, use predict(input=...))")
        self.lines = self.predicted = self.errors = self.blank = 0
        self.first_errors: list[tuple[int, str]] = []
        self._chunks = predictor._run(records, self, source, total)
        self._current = iter(())

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            try:
                return next(self._current)
            except StopIteration:
                self._current = iter(next(self._chunks))  # StopIteration here ends the stream

    def chunks(self):
        """The output records a chunk at a time (lists; a list may be empty)."""
        return self._chunks

    def summary(self) -> dict:
        return {"lines": self.lines, "predicted": self.predicted, "errors": self.errors, "blank": self.blank,
                "first_errors": [{"line": n, "error": m} for n, m in self.first_errors]}


def predict_stream(records: Iterable, settings: PredictSettings | None = None, /, **kwargs) -> Predictions:
    """Predict ``records`` (dicts, or JSON lines as str / bytes; line numbers count from 1) with the adapters
    of ``settings`` (a ``PredictSettings``, or its fields as keywords): loads the model, then returns the
    output records as an iterator (``Predictions``), in input order, computed a chunk at a time."""
    return Predictor(settings, **kwargs).stream(records)


def predict(settings: PredictSettings | None = None, /, **kwargs) -> dict:
    """``madx predict``: JSON lines from ``input`` (a file, or ``-`` for stdin) to ``output`` (a file, written
    atomically: whole or not at all; None or ``-`` for stdout, a chunk at a time). Returns the summary:
    ``lines``, ``predicted``, ``errors``, ``blank``, ``first_errors``, ``wall_time_s``, ``lines_per_s``."""
    s = PredictSettings.build(settings, **kwargs)
    to_file = s.output not in (None, "-")
    _check_paths(s, to_file)
    predictor = Predictor(s)
    t0 = time.perf_counter()
    source = "stdin" if s.input == "-" else s.input
    total = None
    if s.input != "-" and s.progress and is_terminal(sys.stderr):
        total = _count_lines(s.input)
    with (open(s.input, "rb") if s.input != "-" else _Stdin()) as f:
        stream = predictor.stream(bounded_lines(f, s.max_line_bytes), source=source, total=total)
        if to_file:
            def write(tmp):
                with open(tmp, "wb") as out:
                    _write(stream, out)
            files.write_file(s.output, write)
        else:
            _write(stream, _stdout())
    wall = time.perf_counter() - t0
    return {**stream.summary(), "wall_time_s": wall, "lines_per_s": stream.lines / max(wall, 1e-9)}


def _check_paths(s: PredictSettings, to_file: bool) -> None:
    """The input and output, before any model is loaded: an input file that exists (or a standard input that
    is open), an output that may be written (``files.output_target``: a regular file, replaced whole; a
    device or FIFO, written through) and is not the input, or a standard output that is open."""
    if s.input == "-":
        if _closed(sys.stdin):
            raise DataError("standard input is closed: there are no lines to read; give --input FILE")
    elif not os.path.exists(s.input):
        raise FileNotFoundError(f"input {s.input!r} does not exist")
    elif not os.path.isfile(s.input):
        raise DataError(f"input {s.input!r} is not a file")
    if not to_file:
        if _closed(sys.stdout):
            raise files.WriteError("standard output", "it is closed; give --output FILE", errno.EBADF)
        return
    kind, target = files.output_target(s.output)
    if s.input != "-" and kind != "stream" and target == os.path.realpath(s.input):
        raise ValueError(f"output {s.output!r} is the input file; choose another --output")


def _closed(stream) -> bool:
    """A standard stream the process started without (``<&-``: Python sets it to None) or that was closed."""
    return stream is None or getattr(stream, "closed", False)


def bounded_lines(f, max_bytes: int):
    """The lines of the binary file ``f``, each read whole only when at most ``max_bytes`` long (newline not
    counted); a longer one is skipped without being held in memory and given as a ``_LongLine`` (reported as
    that line's error)."""
    while True:
        line = f.readline(max_bytes + 1)
        if not line:
            return
        if len(line) <= max_bytes or line.endswith(b"\n"):
            yield line
            continue
        size = len(line)
        while not line.endswith(b"\n"):
            line = f.readline(1 << 20)
            if not line:
                break
            size += len(line) - line.endswith(b"\n")
        yield _LongLine(size)


def _write(stream: Predictions, f) -> None:
    for chunk in stream.chunks():
        f.write(b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in chunk))
        f.flush()


class _Stdin:
    """Standard input as binary lines (decoded per line, so a bad byte fails its line only)."""

    def __enter__(self):
        return getattr(sys.stdin, "buffer", sys.stdin)

    def __exit__(self, *exc):
        return False


def _stdout():
    """Standard output as a binary stream (UTF-8 whatever the locale)."""
    out = getattr(sys.stdout, "buffer", None)
    if out is not None:
        sys.stdout.flush()
        return out

    class _Text:
        def write(self, data: bytes):
            sys.stdout.write(data.decode("utf-8"))

        def flush(self):
            sys.stdout.flush()
    return _Text()


def _count_lines(path: str) -> int:
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


__all__ = ["LineError", "Predictions", "Predictor", "predict", "predict_stream"]
