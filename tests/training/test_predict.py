"""``madx predict`` / ``predict_stream``: JSON lines of many languages predicted in mixed batches
(``Stack(PerRow(...), task)``) equal each line predicted alone with ``Stack(its language, task)`` (NER, QA,
COPA), in input order, with padding, windows of long inputs, chunk and batch boundaries; malformed lines and
unknown languages are reported with their line numbers and skipped (or recorded, or fatal); a stream is read
a bounded window ahead of what was written; the command reads files and stdin, writes files atomically and
says in its exit status whether lines were skipped.

Adapters are built here with add_madx and random weights (no training): the language adapters differ enough
that a line run in the wrong language gets other predictions, which the NER test checks."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os

import pytest
import torch
from transformers import (
    AutoTokenizer,
    XLMRobertaForMultipleChoice,
    XLMRobertaForQuestionAnswering,
    XLMRobertaForTokenClassification,
)

from madx_fast.cli import main
from madx_fast.demo.synthetic import NER_LABELS
from madx_fast.model import MadxConfig, Stack, add_madx
from madx_fast.training import DataError
from madx_fast.training.predict import Predictor, predict, predict_stream
from madx_fast.training.runs import write_bundle
from madx_fast.training.models import base_fingerprint
from madx_fast.training.tasks.copa import COPA_QUESTIONS, CopaExample, encode_copa
from madx_fast.training.tasks.qa import QaExample, best_span_chars, encode_qa_eval
from tests.helpers.models import randomize

LANGS = ("alpha", "beta", "gamma")
NER_HEAD = dict(num_labels=len(NER_LABELS), id2label=dict(enumerate(NER_LABELS)),
                label2id={n: i for i, n in enumerate(NER_LABELS)})
COMMON = dict(device="cpu", backend="eager", progress=False)


@contextlib.contextmanager
def logged_warnings():
    """Warnings of madx_fast's training logger, whatever handlers an earlier ``main()`` left on it."""
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("madx_fast.training")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def _model(cls, base, **head):
    return cls.from_pretrained(base, **head).eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_base):
    """Language adapters (rf 2 + NICE) for three languages and a NER, a QA and a COPA task adapter with their
    heads, all with random weights, saved as plain adapter directories."""
    out = tmp_path_factory.mktemp("predict_adapters")
    dirs = {}
    model = _model(XLMRobertaForTokenClassification, tiny_base, **NER_HEAD)
    madx = add_madx(model, backend="eager")
    for lang in LANGS:
        madx.add_adapter(lang, MadxConfig.language())
    madx.add_adapter("ner", MadxConfig.task())
    randomize(model, "adapters.", std=0.3, seed=1)
    randomize(model, "classifier", std=1.0, seed=2)
    for lang in LANGS:
        dirs[lang] = str(out / f"lang-{lang}")
        madx.save_adapter(dirs[lang], lang)
    dirs["ner"] = str(out / "ner")
    madx.save_adapter(dirs["ner"], "ner", with_head=True)
    for task, cls, head in (("qa", XLMRobertaForQuestionAnswering, "qa_outputs"),
                            ("copa", XLMRobertaForMultipleChoice, "classifier")):
        model = _model(cls, tiny_base)
        madx = add_madx(model, backend="eager")
        madx.add_adapter(task, MadxConfig.task())
        randomize(model, "adapters.", std=0.3, seed=3)
        randomize(model, head, std=1.0, seed=4)
        dirs[task] = str(out / task)
        madx.save_adapter(dirs[task], task, with_head=True)
    return dirs


def _langs(adapters, langs=LANGS):
    return {lang: adapters[lang] for lang in langs}


class Alone:
    """The reference: one line at a time, batch of one, with Stack(its language, task) on a model loaded
    separately from the same files."""

    def __init__(self, cls, base, adapters, task, **head):
        self.model = _model(cls, base, **head)
        self.madx = add_madx(self.model, backend="eager")
        for lang in LANGS:
            self.madx.load_adapter(adapters[lang], load_as=lang)
        self.task = self.madx.load_adapter(adapters[task], with_head=True)
        self.tok = AutoTokenizer.from_pretrained(base)

    @torch.no_grad()
    def run(self, lang, **inputs):
        self.madx.set_active(Stack(lang, self.task))
        return self.model(**inputs)

    def ner(self, lang, words, max_length=64):
        enc = self.tok(words, is_split_into_words=True, truncation=True, max_length=max_length, return_tensors="pt")
        best = self.run(lang, input_ids=enc["input_ids"]).logits[0].argmax(-1)
        tags = ["O"] * len(words)
        seen = set()
        for pos, w in enumerate(enc.word_ids()):
            if w is not None and w not in seen:
                seen.add(w)
                tags[w] = NER_LABELS[int(best[pos])]
        return tags


def _ner_sentences(corpus, n):
    out = []
    for lang in ("alpha", "beta"):
        with open(os.path.join(corpus, lang, "ner", "test.jsonl"), encoding="utf-8") as f:
            out += [json.loads(line)["tokens"] for line in f][:n]
    return out


# --------------------------------------------------------------------------------------------------------
# NER
# --------------------------------------------------------------------------------------------------------
def _ner_lines(corpus):
    """(input lines, {line number: (lang, words)} of the good ones, {line number: expected message part}),
    languages interleaved, sentences of different lengths, text and tokens, and every kind of bad line."""
    sentences = _ner_sentences(corpus, 8)
    order = ["beta", "alpha", "alpha", "gamma", "beta", "gamma", "alpha", "beta"]
    bad = {3: ("not valid JSON", "{not json"), 6: ("no language adapter for 'delta'", {"lang": "delta", "text": "a b"}),
           8: ("expected a JSON object", "[1, 2]"), 10: ("no 'lang' field", {"text": "a b"}),
           12: ("'text' must be a string", {"lang": "alpha", "text": 7}),
           14: ("'tokens' must be a list of strings", {"lang": "beta", "tokens": ["a", 3]}),
           15: ("both 'text' and 'tokens'", {"lang": "beta", "text": "a", "tokens": ["a"]}),
           17: ("'lang' must be a string", {"lang": 1, "text": "a"}), 19: ("not UTF-8", b"\xff\xfe{")}
    lines, good, number, k = [], {}, 0, 0
    while k < len(sentences) or number + 1 in bad:
        number += 1
        if number in bad:
            item = bad[number][1]
            lines.append(json.dumps(item) if isinstance(item, dict) else item)
        elif number == 21:
            lines.append("   ")  # blank: ignored
        else:
            words, lang = sentences[k], order[k % len(order)]
            rec = {"lang": lang, **({"text": " ".join(words)} if k % 2 else {"tokens": words}), "id": f"s{k}"}
            lines.append(json.dumps(rec) if k % 3 else rec)  # JSON text and dicts
            good[number] = (lang, words, f"s{k}")
            k += 1
    return lines, good, {n: m for n, (m, _) in bad.items()}


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_mixed_ner_stream_equals_each_line_alone(adapters, tiny_base, corpus, cuda_graphs):
    """Chunks of 5 lines and batches of 3 rows, sorted by length: every line gets what it gets alone with
    Stack(its language, ner), in input order; bad lines are reported with their numbers and skipped. With
    cuda_graphs (a plain call on the CPU) the rows are padded to fixed shapes as for the graphs."""
    lines, good, bad = _ner_lines(corpus)
    alone = Alone(XLMRobertaForTokenClassification, tiny_base, adapters, "ner", **NER_HEAD)
    stream = predict_stream(lines, task_adapter=adapters["ner"], lang_adapters=_langs(adapters), chunk_lines=5,
                            batch_size=3, cuda_graphs=cuda_graphs, **COMMON)
    with logged_warnings() as messages:
        out = list(stream)
    assert [r["line"] for r in out] == sorted(good)
    for r in out:
        lang, words, ident = good[r["line"]]
        assert (r["lang"], r["words"], r["id"]) == (lang, words, ident)
        assert r["tags"] == alone.ner(lang, words), r["line"]
    assert (stream.lines, stream.predicted, stream.errors, stream.blank) == (len(lines), len(good), len(bad), 1)
    assert [n for n, _ in stream.first_errors] == sorted(bad)
    for number, message in bad.items():
        assert any(f"input line {number}: " in m and message in m for m in messages), (number, messages)
    # the test can fail: some line's tags depend on its language
    assert any(alone.ner(other, words) != alone.ner(lang, words) for lang, words, _ in good.values()
               for other in LANGS if other != lang)


def test_bad_lines_recorded_in_place_or_fatal(adapters, corpus):
    lines, good, bad = _ner_lines(corpus)
    common = dict(task_adapter=adapters["ner"], lang_adapters=_langs(adapters), chunk_lines=4, **COMMON)
    out = list(predict_stream(lines, on_error="record", **common))
    assert [r["line"] for r in out] == sorted(set(good) | set(bad))  # every non-blank line, in order
    assert all(("error" in r) == (r["line"] in bad) for r in out)
    assert all(bad[r["line"]] in r["error"] for r in out if "error" in r)
    assert [r["tags"] for r in out if "tags" in r] == [r["tags"] for r in predict_stream(lines, **common)]
    with pytest.raises(DataError, match="input line 3: not valid JSON"):
        list(predict_stream(lines, on_error="fail", **common))


def test_long_ner_text_is_windowed_at_word_boundaries(adapters, tiny_base, corpus):
    """A text longer than a row (max_length 12: 10 sub-tokens besides <s> </s>) becomes consecutive windows of
    whole words, each predicted on its own; every word gets its tag."""
    alone = Alone(XLMRobertaForTokenClassification, tiny_base, adapters, "ner", **NER_HEAD)
    words = [w for s in _ner_sentences(corpus, 4) for w in s]
    lines = [{"lang": "beta", "tokens": words[:5]}, {"lang": "alpha", "tokens": words}, {"lang": "gamma", "text": ""}]
    out = list(predict_stream(lines, task_adapter=adapters["ner"], lang_adapters=_langs(adapters), max_length=12,
                              batch_size=4, **COMMON))
    def windows(words):
        counts = [len(alone.tok(w, add_special_tokens=False)["input_ids"]) for w in words]
        out, start, used = [], 0, 0
        for i, c in enumerate(counts):
            if i > start and used + c > 10:
                out.append((start, i))
                start, used = i, 0
            used += c
        return out + [(start, len(words))]

    def alone_windows(lang, words):
        return [t for a, b in windows(words) for t in alone.ner(lang, words[a:b], max_length=12)]

    assert len(windows(words)) > 3 and len(windows(words[:5])) == 2
    assert out[1]["words"] == words and out[1]["tags"] == alone_windows("alpha", words)
    assert out[0]["tags"] == alone_windows("beta", words[:5])
    assert out[2] == {"line": 3, "lang": "gamma", "words": [], "tags": []}


def test_stream_reads_a_bounded_window_ahead(adapters, corpus):
    """A generator input that fails when read more than chunk_lines ahead of the records handed out: the
    stream never holds more than a chunk."""
    sentences = _ner_sentences(corpus, 12)
    predictor = Predictor(task_adapter=adapters["ner"], lang_adapters=_langs(adapters), chunk_lines=4, batch_size=2,
                          **COMMON)
    written = []

    def lines():
        for k, words in enumerate(sentences):
            if k - len(written) > 4:
                raise AssertionError(f"line {k + 1} read while only {len(written)} were written")
            yield {"lang": LANGS[k % 3], "tokens": words}

    for rec in predictor.stream(lines()):
        written.append(rec)
    assert [r["line"] for r in written] == list(range(1, len(sentences) + 1))


def test_one_language_runs_the_single_adapter_path(adapters, tiny_base, corpus):
    alone = Alone(XLMRobertaForTokenClassification, tiny_base, adapters, "ner", **NER_HEAD)
    sentences = _ner_sentences(corpus, 3)
    out = list(predict_stream([{"lang": "beta", "tokens": w} for w in sentences] + [{"lang": "alpha", "text": "a"}],
                              task_adapter=adapters["ner"], lang_adapters=_langs(adapters, ["beta"]), **COMMON))
    assert [r["tags"] for r in out] == [alone.ner("beta", w) for w in sentences]


# --------------------------------------------------------------------------------------------------------
# QA and COPA
# --------------------------------------------------------------------------------------------------------
def test_mixed_qa_stream_equals_each_line_alone(adapters, tiny_base, corpus):
    """Spans (text, character offsets, score) as each line alone; a context longer than a row is read in
    overlapping windows (max_length 32), windows of different lines share batches, the best span wins."""
    alone = Alone(XLMRobertaForQuestionAnswering, tiny_base, adapters, "qa")
    sentences = [" ".join(s) for s in _ner_sentences(corpus, 6)]
    records = [{"lang": LANGS[k % 3], "question": sentences[k].split()[0] + " ?",
                "context": " ".join(sentences[k:k + (4 if k == 2 else 1)])} for k in range(len(sentences) - 3)]
    too_long = {"lang": "beta", "question": " ".join(sentences[:3]), "context": sentences[0]}  # no room for context
    lines = records[:2] + [{"lang": "alpha", "question": "x"}] + records[2:] + [too_long]
    predictions = predict_stream(lines, task_adapter=adapters["qa"], lang_adapters=_langs(adapters), max_length=32,
                                 batch_size=3, **COMMON)
    out = list(predictions)
    assert [r["line"] for r in out] == [1, 2] + list(range(4, len(lines)))
    assert [(n, m.split(" leaves")[0]) for n, m in predictions.first_errors] == \
        [(3, "no 'context' field (fields: lang, question)"), (len(lines), "max_length 32")]
    windows_seen = 0
    for r, rec in zip(out, records):
        windows = encode_qa_eval([QaExample("", rec["question"], rec["context"])], alone.tok, 32, 8)
        windows_seen = max(windows_seen, len(windows))
        spans = []
        for f in windows:
            o = alone.run(rec["lang"], input_ids=torch.tensor([f["input_ids"]]))
            spans.append(best_span_chars(o.start_logits[0].numpy(), o.end_logits[0].numpy(), f["offsets"]))
        score, start, end = max(spans, key=lambda s: s[0])
        assert (r["start"], r["end"], r["answer"]) == (start, end, rec["context"][start:end])
        assert r["score"] == pytest.approx(score, abs=1e-4)
    assert windows_seen > 1


def test_mixed_copa_stream_equals_each_line_alone(adapters, tiny_base, corpus):
    alone = Alone(XLMRobertaForMultipleChoice, tiny_base, adapters, "copa")
    s = [" ".join(x) for x in _ner_sentences(corpus, 5)]
    records = [{"lang": LANGS[(k + 1) % 3], "premise": s[k], "choice1": s[k + 1], "choice2": s[k + 2],
                "question": ("cause", "effect")[k % 2]} for k in range(len(s) - 2)]
    records[3]["premise"] = " ".join(s * 3)  # longer than a row: cut
    lines = [*records[:2], {**records[0], "question": "reason"}, *records[2:]]
    out = list(predict_stream(lines, task_adapter=adapters["copa"], lang_adapters=_langs(adapters), max_length=64,
                              batch_size=2, **COMMON))
    assert [r["line"] for r in out] == [1, 2] + list(range(4, len(lines) + 1))
    truncated = []
    for r, rec in zip(out, records):
        f = encode_copa([CopaExample(rec["premise"], [rec["choice1"], rec["choice2"]], rec["question"], 0)],
                        alone.tok, 64)[0]
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(c) for c in f["choice_ids"]], batch_first=True,
                                              padding_value=1)
        scores = alone.run(rec["lang"], input_ids=ids[None], attention_mask=(ids != 1).long()[None]).logits[0]
        assert r["scores"] == pytest.approx(scores.tolist(), abs=1e-5)
        assert r["choice"] == int(scores.argmax())
        first = f"{rec['premise']} {COPA_QUESTIONS[rec['question']]}"
        truncated.append(max(len(alone.tok(first, rec[c])["input_ids"]) for c in ("choice1", "choice2")) > 64)
        assert r.get("truncated", False) == truncated[-1]
    assert truncated[3] and not all(truncated)


# --------------------------------------------------------------------------------------------------------
# the command: run directories, files, stdin, exit status
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dirs(adapters, tiny_base, tmp_path_factory):
    """The same adapters as run directories of madx train-lang / train-task (bundles with run records)."""
    out = tmp_path_factory.mktemp("predict_runs")
    model = _model(XLMRobertaForTokenClassification, tiny_base, **NER_HEAD)
    fingerprint = base_fingerprint(model)
    madx = add_madx(model, backend="eager")
    dirs = {}
    for lang in LANGS:
        madx.load_adapter(adapters[lang], load_as=lang)
        dirs[lang] = str(out / f"lang-{lang}")
        write_bundle(madx, os.path.join(dirs[lang], "adapter"), lang,
                     {"stage": "language", "language": lang, "base_model": tiny_base, "base_fingerprint": fingerprint})
    madx.load_adapter(adapters["ner"], with_head=True)
    dirs["ner"] = str(out / "ner-alpha")
    write_bundle(madx, os.path.join(dirs["ner"], "best"), "ner",
                 {"stage": "task", "task": "ner", "language": "alpha", "labels": NER_LABELS, "base_model": tiny_base,
                  "base_fingerprint": fingerprint, "max_length": 64}, with_head=True)
    return dirs


def _flags(dirs):
    return ["--task-adapter", dirs["ner"], "--lang-adapter", *[f"{lang}={dirs[lang]}" for lang in LANGS],
            "--device", "cpu", "--backend", "eager", "--no-progress"]


def test_command_file_to_file(run_dirs, adapters, corpus, tmp_path, capsys):
    lines, good, bad = _ner_lines(corpus)
    source = tmp_path / "in.jsonl"
    with open(source, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else (json.dumps(line) if isinstance(line, dict) else line)
                     .encode()) + b"\n")
    want = list(predict_stream(lines, task_adapter=adapters["ner"], lang_adapters=_langs(adapters), **COMMON))
    target = tmp_path / "out" / "predictions.jsonl"
    assert main(["predict", *_flags(run_dirs), "--input", str(source), "--output", str(target),
                 "--chunk-lines", "6"]) == 3  # finished, lines skipped
    err = capsys.readouterr().err
    assert all(f"{source} line {n}: " in err for n in bad)
    with open(target, encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == want
    assert os.listdir(tmp_path / "out") == ["predictions.jsonl"]  # no temporary left
    # --on-error fail: status 2, and the earlier output stays as it was
    before = target.read_bytes()
    assert main(["predict", *_flags(run_dirs), "--input", str(source), "--output", str(target),
                 "--on-error", "fail"]) == 2
    assert "line 3: not valid JSON" in capsys.readouterr().err
    assert target.read_bytes() == before and os.listdir(tmp_path / "out") == ["predictions.jsonl"]
    # the output may not be the input
    assert main(["predict", *_flags(run_dirs), "--input", str(source), "--output", str(source)]) == 2
    assert "is the input file" in capsys.readouterr().err
    # a summary dict from Python
    summary = predict(task_adapter=run_dirs["ner"], lang_adapters=_langs(run_dirs), input=str(source),
                      output=str(target), **COMMON)
    assert (summary["lines"], summary["predicted"], summary["errors"]) == (len(lines), len(good), len(bad))


def test_command_stdin_to_stdout(run_dirs, corpus, monkeypatch, capsys):
    """JSON lines on stdin (bytes, decoded per line), predictions on stdout, status 0 when every line was
    predicted."""
    sentences = _ner_sentences(corpus, 3)
    text = "".join(json.dumps({"lang": LANGS[k % 3], "tokens": w}) + "\n" for k, w in enumerate(sentences))
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    assert main(["predict", *_flags(run_dirs), "--input", "-"]) == 0
    captured = capsys.readouterr()
    out = [json.loads(line) for line in captured.out.splitlines()]
    assert [(r["line"], r["words"]) for r in out] == list(enumerate(sentences, 1))
    want = list(predict_stream([json.loads(line) for line in text.splitlines()], task_adapter=run_dirs["ner"],
                               lang_adapters=_langs(run_dirs), **COMMON))
    assert out == want
    assert f"{len(sentences)} lines, {len(sentences)} predicted" in captured.err


def test_progress_lines_off_a_terminal():
    """Off a terminal: a plain line per interval (lines, total, errors, rate, ETA), never a redrawn bar."""
    from madx_fast.training.progress import LineProgress
    stream = io.StringIO()
    bar = LineProgress(10, stream=stream, interval=0.0, errors="not predicted")
    bar.update(4, 1)
    bar.update(6)
    bar.close()
    first, last = stream.getvalue().splitlines()
    assert first.startswith("[madx] predict: 4/10 lines  1 not predicted  ") and "ETA" in first
    assert last.startswith("[madx] predict: 10/10 lines  1 not predicted  ") and "ETA" not in last
    quiet = io.StringIO()
    LineProgress(10, stream=quiet, interval=0.0, enabled=False).update(3)
    assert quiet.getvalue() == ""
