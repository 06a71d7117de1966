"""``madx predict`` at the edges of its input and output: an output that is a FIFO, a device or a socket
(written through, or refused, never replaced), a standard input or output the process was started without, a
reader that goes away, lines too long to read, lines too deeply nested to parse, and error records that keep
the ``id`` and ``lang`` they could read."""
from __future__ import annotations

import json
import os
import shlex
import socket
import stat
import subprocess
import time

from madx_fast.cli import main
from madx_fast.training.predict import predict_stream
from tests.helpers.processes import Bounded, FifoReader, run_bounded
from tests.helpers.runs import ROOT, env_for_subprocess, madx_command
from tests.training.test_predict import COMMON, _flags, _langs, _ner_sentences, adapters, run_dirs  # noqa: F401


def _lines(corpus, n=4):
    return [json.dumps({"lang": ("alpha", "beta")[k % 2], "tokens": words, "id": f"s{k}"})
            for k, words in enumerate(_ner_sentences(corpus, n)[:n])]


def test_output_to_a_fifo_is_written_through_and_a_socket_refused(run_dirs, corpus, tmp_path, capsys):  # noqa: F811
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(_lines(corpus)) + "\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    os.symlink("fifo", tmp_path / "to-fifo")  # through a link, as /dev/stdout would be
    with FifoReader(fifo) as reader:
        code = main(["predict", *_flags(run_dirs), "--input", str(source), "--output", str(tmp_path / "to-fifo")])
        got = reader.close()
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in got.decode().splitlines()]
    assert [r["id"] for r in records] == ["s0", "s1", "s2", "s3"] and all("tags" in r for r in records)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.path.islink(tmp_path / "to-fifo")
    sock_path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        t0 = time.perf_counter()
        code = main(["predict", *_flags(run_dirs), "--input", str(source), "--output", str(sock_path)])
        err = capsys.readouterr().err
        assert code == 2 and f"cannot write {sock_path}: it is a socket" in err, err
        assert time.perf_counter() - t0 < 5  # refused before any model is loaded
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)


def _shell(command: str, **kwargs) -> subprocess.CompletedProcess:
    return run_bounded(["bash", "-c", command], env=env_for_subprocess(), cwd=ROOT, capture_output=True,
                       timeout=300, **kwargs)


def test_closed_standard_input_or_output_is_a_one_line_refusal(run_dirs, tmp_path):  # noqa: F811
    madx = " ".join(shlex.quote(str(a)) for a in madx_command("predict", *_flags(run_dirs)))
    for redirect, message in (("<&-", "standard input is closed"),
                              (">&-", "cannot write standard output: it is closed")):
        proc = _shell(f"{madx} {redirect}", text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines() == [f"madx predict: error: {message}" + (
            "; give --output FILE" if ">" in redirect else ": there are no lines to read; give --input FILE")]


def test_a_reader_that_goes_away_ends_predict_silently(run_dirs, corpus, tmp_path):  # noqa: F811
    """``madx predict ... | head``: the reader closes the pipe; predict stops without a traceback or an error
    line, with status 141 (what a shell shows for a program stopped by SIGPIPE)."""
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(_lines(corpus, 8) * 50) + "\n")
    with Bounded(madx_command("predict", *_flags(run_dirs), "--input", source), env=env_for_subprocess(), cwd=ROOT,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        proc.stdout.close()  # the reader is gone before the first line is written
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141, err.decode()[-3000:]
    assert b"Traceback" not in err and b"Broken pipe" not in err and b"error" not in err, err.decode()[-3000:]


def test_error_records_keep_id_and_lang_and_deep_lines_are_line_errors(run_dirs, corpus, tmp_path,  # noqa: F811
                                                                     capsys):
    good = _lines(corpus, 2)
    lines = [good[0],
             json.dumps({"id": "x9", "lang": "yo", "text": "a b"}),      # no adapter for its language
             json.dumps({"id": "x10", "lang": "alpha", "text": 7}),      # its language, a bad field
             "[" * 100_000,                                                # nested too deeply to parse
             good[1]]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    code = main(["predict", *_flags(run_dirs), "--input", str(source), "--output", str(out), "--on-error", "record"])
    err = capsys.readouterr().err
    assert code == 3, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5] and "tags" in records[0] and "tags" in records[4]
    assert {k: records[1][k] for k in ("id", "lang")} == {"id": "x9", "lang": "yo"}
    assert "no language adapter for 'yo'" in records[1]["error"]
    assert {k: records[2][k] for k in ("id", "lang")} == {"id": "x10", "lang": "alpha"}
    assert records[3] == {"line": 4, "error": "not readable JSON (nested too deeply)"}


def test_lines_longer_than_the_limit_are_line_errors_read_no_further(run_dirs, adapters, corpus, tmp_path,  # noqa: F811
                                                                    capsys):
    good = _lines(corpus, 2)
    long_line = json.dumps({"lang": "beta", "text": "word " * 80_000})
    lines = [good[0], long_line, good[1]]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines))  # the last line without a newline
    out = tmp_path / "out.jsonl"
    code = main(["predict", *_flags(run_dirs), "--input", str(source), "--output", str(out), "--on-error", "record",
                 "--max-line-bytes", "300000"])
    err = capsys.readouterr().err
    assert code == 3, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    message = f"{len(long_line)} bytes, longer than the limit of 300000 (--max-line-bytes); not read"
    assert records[1] == {"line": 2, "error": message} and "tags" in records[0] and "tags" in records[2]
    assert f"{source} line 2: {message}" in err
    # a last line without a newline: read when it is exactly the limit, refused one byte over it
    source.write_text(good[1])
    for limit, fits in ((len(good[1]), True), (len(good[1]) - 1, False)):
        main(["predict", *_flags(run_dirs), "--input", str(source), "--output", str(out), "--on-error", "record",
              "--max-line-bytes", str(limit)])
        assert ("tags" in json.loads(out.read_text())) == fits
    # the same limit for lines given from Python
    recs = list(predict_stream(lines, task_adapter=adapters["ner"], lang_adapters=_langs(adapters), on_error="record",
                               max_line_bytes=300_000, **COMMON))
    assert recs[1] == {"line": 2, "error": message}
