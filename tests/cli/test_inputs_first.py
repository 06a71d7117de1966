"""Every local input is checked before the network is touched, a mistyped path is answered with the nearest
existing names (never looked up on the Hub), and a Hub that cannot be used is one line saying what was tried
and what to do, at once: a Hub on loopback records every request, and a closed loopback port refuses them."""
from __future__ import annotations

import os
import time

import huggingface_hub
import huggingface_hub.constants
import pytest

from madx_fast.cli import main
from tests.helpers.hub_server import HubServer, closed_port, use_endpoint
from tests.helpers.processes import run_bounded
from tests.helpers.runs import env_for_subprocess, madx_command


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The Hub on loopback (every request recorded), an empty Hub cache, online."""
    with HubServer() as server:
        use_endpoint(monkeypatch, server.endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield server


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory with a few runs and data, as a user has them."""
    work = tmp_path / "work"
    for d in ("runs/lang-alpha/adapter", "runs/ner-alpha/best", "runs/base", "data/ner", "data/alpha/ner"):
        os.makedirs(work / d)
    (work / "lines.jsonl").write_text('{"lang": "alpha", "tokens": ["a"]}\n')
    (work / "text.txt").write_text("some text\n")
    (work / "a-file").write_text("")
    monkeypatch.chdir(work)
    return work


def _error(capsys, *args) -> str:
    code = main(list(args))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no library output, no traceback
    return lines[0]


def test_mistyped_local_paths_are_answered_before_any_network_access(hub, workdir, capsys):
    train_lang = ["train-lang", "--lang", "sw", "--output", "out"]
    err = _error(capsys, *train_lang, "--model", "xlm-roberta-base", "--train-data", "nope.txt")
    assert "data file or directory 'nope.txt' does not exist" in err
    err = _error(capsys, *train_lang, "--model", "runs/bse", "--train-data", "text.txt")
    assert "model directory 'runs/bse' does not exist (did you mean 'runs/base'?)" in err
    assert "write hf:runs/bse" in err  # the way to mean the Hub repository of that name
    err = _error(capsys, *train_lang, "--model", "xlm-roberta-base", "--train-data", "data/txt/sw.txt")
    assert "'data/txt/sw.txt' does not exist" in err
    train_task = ["train-task", "--task", "ner", "--train-data", "data/ner", "--output", "out"]
    err = _error(capsys, *train_task, "--lang-adapter", "runs/lang-alph")
    assert "adapter directory 'runs/lang-alph' does not exist (did you mean 'runs/lang-alpha'" in err
    err = _error(capsys, *train_task, "--lang-adapter", "./runs/lang-alpha/adaptr")
    assert "did you mean './runs/lang-alpha/adapter'?" in err and "hf:" not in err
    err = _error(capsys, "transfer", "--task-adapter", "runs/ner-alph", "--targets", "alpha", "--eval-data",
                 "data/{lang}/ner", "--lang-adapter", "alpha=runs/lang-alpha")
    assert "did you mean 'runs/ner-alpha'" in err
    err = _error(capsys, "predict", "--task-adapter", "runs/ner-alpha", "--lang-adapter", "alpha=runs/lang-alpha",
                 "--input", "lines.jsonk")
    assert "input file 'lines.jsonk' does not exist (did you mean 'lines.jsonl'?)" in err
    err = _error(capsys, *train_task[:-1], "a-file/run", "--model", "xlm-roberta-base")
    assert "'a-file/run'" in err and "is a file, not a directory" in err
    assert hub.requests == []  # nothing above reached the network


def test_an_unreachable_hub_is_one_line_at_once(workdir, capsys, monkeypatch, tmp_path):
    use_endpoint(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for args in (["train-lang", "--model", "someone/tiny-model", "--lang", "sw", "--train-data", "text.txt"],
                 ["train-task", "--task", "ner", "--lang-adapter", "someone/lang-sw", "--train-data", "data/ner"]):
        _error(capsys, *args, "--output", "out")  # once untimed: the libraries import what they need
        t0 = time.perf_counter()
        err = _error(capsys, *args, "--output", "out")
        assert time.perf_counter() - t0 < 10, err  # huggingface_hub's own retries take ~40 s here
        assert "cannot be reached (connection refused)" in err and "HF_HUB_OFFLINE=1" in err, err
        assert "someone/" in err and "local directory" in err
        for library_text in ("MaxRetryError", "urllib3", "httpx", "ConnectError", "Traceback"):
            assert library_text not in err


def test_a_dataset_with_an_unreachable_hub_is_one_line_at_once(monkeypatch, tmp_path):
    import datasets

    from madx_fast.training import data
    use_endpoint(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    t0 = time.perf_counter()
    with pytest.raises(data.DataError) as error:
        data.read_texts("wikiann:sw")
    assert time.perf_counter() - t0 < 10  # datasets' own retries take ~25 s here
    message = str(error.value)
    assert "unimelb-nlp/wikiann" in message and "cannot be reached (connection refused)" in message
    assert "\n" not in message and str(tmp_path / "datasets-cache") in message
    assert datasets.config.HF_HUB_OFFLINE is False and huggingface_hub.constants.HF_HUB_OFFLINE is False  # restored


def test_a_missing_hub_repository_is_named(hub, workdir, capsys):
    err = _error(capsys, "train-lang", "--model", "someone/no-such-model", "--lang", "sw", "--train-data",
                 "text.txt", "--output", "out")
    assert "the Hub has no repository someone/no-such-model" in err and "HF_TOKEN" in err, err
    assert hub.requests and all(r.path == "/" or "no-such-model" in r.path for r in hub.requests)


def test_offline_without_a_cached_copy_is_one_line(workdir, tmp_path):
    """The ``madx`` command as run from a shell with HF_HUB_OFFLINE=1 and an empty cache."""
    env = env_for_subprocess(HF_HUB_CACHE=str(tmp_path / "empty-cache"), HF_HUB_OFFLINE="1")
    proc = run_bounded(madx_command("train-lang", "--model", "someone/tiny-model", "--lang", "sw", "--train-data",
                                    "text.txt", "--output", "out"), cwd=workdir, env=env,
                       capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "'someone/tiny-model'" in lines[0] and "HF_HUB_OFFLINE=1 is set" in lines[0], lines[0]
    assert str(tmp_path / "empty-cache") in lines[0]  # where it looked
