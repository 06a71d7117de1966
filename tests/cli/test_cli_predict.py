"""``madx predict``'s flags come from ``PredictSettings`` (every field, its default, LANG=DIR pairs), and bad
values or inputs are refused with status 2 before any model is loaded."""
from __future__ import annotations

import dataclasses

import pytest

from madx_fast.cli import build_parser, main
from madx_fast.training import PredictSettings
from madx_fast.graphs import graph_lengths
from madx_fast.training.settings import from_args

REQUIRED = ["--task-adapter", "runs/ner", "--lang-adapter", "sw=runs/lang-sw", "qu=runs/lang-qu"]


def test_every_setting_has_a_flag_and_defaults_match():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["predict"]
    dests = {a.dest for a in sub._actions}
    assert {f.name for f in dataclasses.fields(PredictSettings)} <= dests
    parsed = from_args(PredictSettings, parser.parse_args(["predict", *REQUIRED]))
    langs = {"sw": "runs/lang-sw", "qu": "runs/lang-qu"}
    assert parsed == PredictSettings(task_adapter="runs/ner", lang_adapters=langs)
    assert parsed.input == "-" and parsed.output is None and parsed.on_error == "skip"
    args = parser.parse_args(["predict", *REQUIRED, "--input", "in.jsonl", "--output", "out.jsonl", "--on-error",
                              "record", "--batch-size", "8", "--chunk-lines", "100", "--cuda-graphs", "--no-progress"])
    s = from_args(PredictSettings, args)
    assert (s.input, s.output, s.on_error, s.batch_size, s.chunk_lines, s.cuda_graphs, s.progress) == \
        ("in.jsonl", "out.jsonl", "record", 8, 100, True, False)


@pytest.mark.parametrize("extra,match", [(["--lang-adapter", "sw"], "LANG=DIR"),
                                         (["--lang-adapter", "sw=a", "sw=b"], "names 'sw' twice"),
                                         (["--lang-adapter", "s.w=a"], "without dots"),
                                         (["--chunk-lines", "0"], "chunk_lines must be"),
                                         (["--input", "/no/such/file.jsonl"], "does not exist")])
def test_bad_values_are_refused_before_work(extra, match, capsys, tmp_path):
    out = tmp_path / "out.jsonl"
    assert main(["predict", *REQUIRED, "--output", str(out), *extra]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["predict", *REQUIRED, "--on-error", "ignore"])


def test_no_language_adapter_is_refused():
    with pytest.raises(ValueError, match="no language adapters"):
        PredictSettings(task_adapter="t", lang_adapters={}).check()


def test_graph_lengths_cover_every_length_with_few_shapes():
    assert graph_lengths(384) == [16, 32, 64, 128, 256, 384]
    assert graph_lengths(16) == [16] and graph_lengths(10) == [10]
