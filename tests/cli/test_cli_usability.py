"""The ``madx`` command forgives typos and explains itself: a mistyped command or flag gets that command's
usage and the nearest name, every option has help with readable defaults, ``--output`` everywhere (old
spellings kept), ``--version``; and what it prints is one line per event, its own and the libraries', time
stamped in a log file, at the level ``-q`` / ``-v`` ask for."""
from __future__ import annotations

import argparse
import logging
import re
import warnings

import pytest

from madx_fast import logs
from madx_fast._version import __version__
from madx_fast.cli import build_parser, main
from madx_fast.training.settings import args_values

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def _usage_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_a_mistyped_flag_gets_the_command_usage_and_a_suggestion(capsys):
    err = _usage_error(capsys, "train-lang", "--modle", "xlm-roberta-base")
    assert err.startswith("usage: madx train-lang") and "did you mean --model?" in err, err
    assert "required" not in err  # not "the following arguments are required: --model"
    err = _usage_error(capsys, "train-task", "--task", "ner", "--train-data", "d", "--output", "o", "--stpes", "10")
    assert err.startswith("usage: madx train-task") and "unrecognized argument --stpes; did you mean --steps?" in err
    err = _usage_error(capsys, "transfer", "--task-adapter", "t", "--targets", "sw", "--eval-data", "e",
                       "--settings=target", "--outptu=r")
    assert err.startswith("usage: madx transfer") and "did you mean --output?" in err, err
    err = _usage_error(capsys, "trian-lang", "--model", "m")
    assert "unknown command 'trian-lang'; did you mean 'train-lang'?" in err and err.startswith("usage: madx ")


def test_what_argparse_accepts_is_not_taken_for_a_typo(capsys):
    parser = build_parser()
    args = parser.parse_args(["train-task", "--task", "ner", "--train-data", "d", "--output", "o", "--overwr",
                              "--lr", "-0.5", "-v"])  # a unique abbreviation, a negative value, -v after
    assert args.overwrite and args.learning_rate == -0.5 and args.verbose == 1
    from madx_fast.cli import check_names
    check_names(parser, ["-q", "train-task", "--overwr", "--lr", "-0.5", "--", "--not-a-flag"])  # no exit
    check_names(parser, ["predict", "--input", "-", "--output", "-"])  # "-": stdin / stdout
    assert main(["-q", "train-task", "--task", "ner", "--train-data", "d", "--output", "o", "--lr", "-1"]) == 2
    assert "learning_rate must be" in capsys.readouterr().err  # the value's own check, not a usage error


def _subcommands(parser):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_option_has_help_with_a_readable_default():
    for name, command in _subcommands(build_parser()).items():
        for action in command._actions:
            text = action.help or ""
            assert text.strip(), (name, action.option_strings)
            assert not re.search(r"default \[|default \{|default None|\(default '", text), (name, text)
            if action.option_strings and action.nargs != 0 and action.choices is None:
                assert action.metavar and action.metavar == action.metavar.upper(), (name, action.option_strings)
    help_text = _subcommands(build_parser())["transfer"].format_help()
    assert "(default target)" in help_text and "['target']" not in help_text


def test_output_everywhere_and_the_old_spelling_kept():
    commands = _subcommands(build_parser())
    for name in ("train-lang", "train-task", "transfer", "predict", "demo"):
        assert "--output" in {o for a in commands[name]._actions for o in a.option_strings}, name
    from madx_fast.demo import DemoConfig
    parser = build_parser()
    assert args_values(DemoConfig, parser.parse_args(["demo", "--output", "d1"])) == {"output_dir": "d1"}
    assert args_values(DemoConfig, parser.parse_args(["demo", "--output-dir", "d2"])) == {"output_dir": "d2"}


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"madx_fast {__version__} (torch ") and "transformers" in out and out.count("\n") == 1


# --------------------------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------------------------
@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    names = ("madx_fast", *logs.LIBRARIES)
    levels = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers), logging.getLogger(n).propagate)
              for n in names}
    yield
    root.handlers, root.level = saved
    for n, (level, handlers, propagate) in levels.items():
        logger = logging.getLogger(n)
        logger.setLevel(level), setattr(logger, "handlers", handlers), setattr(logger, "propagate", propagate)
    logging.captureWarnings(False)


def _emit_one_of_each():
    import transformers.utils.logging as hf_logging
    logging.getLogger("madx_fast.training").info("an event of madx")
    logging.getLogger("madx_fast.training").debug("a detail of madx")
    logging.getLogger("huggingface_hub.file_download").warning("a warning of huggingface_hub\nover two lines")
    hf_logging.get_logger("transformers.modeling_utils").warning("a warning of transformers")
    logging.getLogger("datasets.load").warning("a warning of datasets")
    logging.getLogger("huggingface_hub.file_download").info("an info of huggingface_hub")
    # what ``warnings.warn`` calls to print (pytest records warnings itself, so warn() would not get there)
    warnings.showwarning("a Python warning", FutureWarning, __file__, 7)


def _lines(capsys, verbosity: int, stamped: bool = False) -> list[str]:
    logs.setup(verbosity, stamped=stamped)
    _emit_one_of_each()
    return capsys.readouterr().err.splitlines()


def test_every_event_is_one_line_through_one_handler(capsys, restore_logging):
    lines = _lines(capsys, 0)
    assert lines == ["[madx] an event of madx",
                     "[huggingface_hub] warning: a warning of huggingface_hub over two lines",
                     "[transformers] warning: a warning of transformers",
                     "[datasets] warning: a warning of datasets",
                     lines[-1]], lines
    assert re.match(r"\[python\] warning: FutureWarning: a Python warning \(.*test_cli_usability.py:7\)$", lines[-1])
    logs.setup(0, stamped=False)  # set up twice (main() called again): still one line per event
    logging.getLogger("datasets.load").warning("again")
    assert capsys.readouterr().err.splitlines() == ["[datasets] warning: again"]


def test_quiet_and_verbose_levels_and_time_stamps(capsys, restore_logging):
    quiet = _lines(capsys, -1)
    assert not any("madx" in line or "warning of" in line for line in quiet), quiet
    verbose = _lines(capsys, 1)
    assert "[madx] a detail of madx" in verbose and "[huggingface_hub] info: an info of huggingface_hub" in verbose
    stamped = _lines(capsys, 0, stamped=True)
    assert stamped and all(STAMP.match(line) for line in stamped), stamped


class _Writes:
    """A stand-in stderr that keeps each ``write`` call apart (a process's writes to a shared pipe)."""

    def __init__(self):
        self.calls = []

    def write(self, text):
        self.calls.append(text)
        return len(text)

    def flush(self):
        pass

    def isatty(self):
        return False


def test_an_error_or_log_line_goes_out_in_one_write(monkeypatch, tmp_path, restore_logging):
    """Data-parallel processes share stderr: a line whose text and newline are two writes (``print`` on a
    write-through stderr) can run into another process's line, as seen in CI under torchrun."""
    writes = _Writes()
    monkeypatch.setattr("sys.stderr", writes)
    assert main(["predict", "--task-adapter", str(tmp_path / "missing"), "--lang-adapter", f"en={tmp_path / 'en'}",
                 "--input", str(tmp_path / "none.jsonl")]) == 2
    errors = [c for c in writes.calls if "madx predict: error: " in c]
    assert len(errors) == 1 and errors[0].startswith("madx predict: error: ") and errors[0].endswith("\n"), writes.calls
    writes.calls.clear()
    logs.setup(0, stamped=False)
    logging.getLogger("madx_fast.training").info("an event of madx")
    assert [c for c in writes.calls if c] == ["[madx] an event of madx\n"], writes.calls


def test_a_data_parallel_process_leaves_with_its_status_once_its_streams_are_flushed(monkeypatch):
    """``madx`` under torchrun (WORLD_SIZE > 1) skips the interpreter's shutdown, where destroying gloo's
    threads aborted a process after a successful run; alone, it exits normally. Either way with main's status."""
    import madx_fast.cli as cli

    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    order = []
    writes = _Writes()
    writes.flush = lambda: order.append("flush")
    monkeypatch.setattr("sys.stderr", writes)
    monkeypatch.setattr(cli, "main", lambda: order.append("main") or 3)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exited) as leave:
        cli.run()
    assert leave.value.args == (3,) and order[0] == "main" and "flush" in order[1:], order
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit) as leave:
        cli.run()
    assert leave.value.code == 3
