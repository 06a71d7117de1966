"""Every ``madx`` option that takes an adapter takes a Hugging Face Hub name too (``--lang-adapter`` of
train-task, ``--task-adapter`` and ``--lang-adapter LANG=...`` of transfer), offline, from a Hub cache built
in huggingface_hub's layout: run directories pushed to a repository (whole, or in a folder), and an AdapterHub
export at a tag. The numbers equal those of the same adapters read from local directories."""
from __future__ import annotations

import json
import os
import shutil

import huggingface_hub
import pytest

from madx_fast.cli import main
from madx_fast.model import add_madx
from madx_fast.training import evaluate_transfer, train_language_adapter, train_task_adapter
from madx_fast.training.models import load_model
from tests.helpers.hub_cache import add_snapshot
from tests.helpers.runs import quiet_config


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory, tiny_base, corpus):
    out = tmp_path_factory.mktemp("hub_runs")
    langs = {}
    for lang in ("alpha", "beta"):
        langs[lang] = str(out / f"lang-{lang}")
        train_language_adapter(model=tiny_base, lang=lang, train_data=os.path.join(corpus, lang, "text", "train.txt"),
                               output_dir=langs[lang], config=quiet_config(steps=2), max_length=32, backend="eager")
    ner = str(out / "ner-alpha")
    train_task_adapter(task="ner", lang_adapter=langs["alpha"], train_data=os.path.join(corpus, "alpha", "ner"),
                       output_dir=ner, config=quiet_config(steps=4), max_length=32, backend="eager")
    # beta's language adapter as an AdapterHub export (no run record), as published adapters are
    model = load_model("AutoModelForMaskedLM", tiny_base)
    madx = add_madx(model, backend="eager")
    madx.load_adapter(os.path.join(langs["beta"], "adapter"))
    madx.export_adapterhub(out / "beta-hub", "beta")
    return {"langs": langs, "ner": ner, "beta_hub": str(out / "beta-hub")}


@pytest.fixture
def hub(tmp_path, monkeypatch, local_runs):
    cache = str(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    add_snapshot(cache, "me/lang-alpha", local_runs["langs"]["alpha"])                  # a whole run directory
    add_snapshot(cache, "me/beta", local_runs["beta_hub"], refs=("main", "v1"))          # AdapterHub layout, tagged
    add_snapshot(cache, "me/runs", local_runs["ner"], subfolder="ner-alpha")            # a run in a folder
    return cache


def _run(capsys, *args):
    code = main([*map(str, args)])
    captured = capsys.readouterr()
    return code, captured.err


def test_train_task_on_a_language_adapter_from_the_hub(hub, capsys, tmp_path, corpus, local_runs):
    out = tmp_path / "ner"
    code, err = _run(capsys, "train-task", "--task", "ner", "--lang-adapter", "me/lang-alpha", "--train-data",
                     os.path.join(corpus, "alpha", "ner"), "--output", out, "--steps", "2", "--batch-size", "8",
                     "--backend", "eager", "--device", "cpu", "--max-length", "32", "--no-progress")
    assert code == 0, err
    record = json.loads((out / "run.json").read_text())["language_adapter"]
    assert record["spec"] == "me/lang-alpha" and os.path.realpath(record["path"]).startswith(os.path.realpath(hub))
    local = json.loads(open(os.path.join(local_runs["langs"]["alpha"], "adapter", "madx_run.json")).read())
    assert record["weights_sha256"] == local["weights_sha256"]  # the same files as the local run


def test_transfer_with_task_and_language_adapters_from_the_hub(hub, capsys, tmp_path, corpus, local_runs):
    eval_data = os.path.join(corpus, "{lang}", "ner")
    want = evaluate_transfer(task_adapters=[local_runs["ner"]], lang_adapters=local_runs["langs"],
                             targets=["alpha", "beta"], eval_data=eval_data, settings=["target", "source"],
                             backend="eager", device="cpu")
    code, err = _run(capsys, "transfer", "--task-adapter", "hf:me/runs/ner-alpha", "--lang-adapter",
                     "alpha=me/lang-alpha", "beta=me/beta@v1", "--targets", "alpha,beta", "--eval-data", eval_data,
                     "--settings", "target,source", "--output", tmp_path / "report", "--backend", "eager",
                     "--device", "cpu")
    assert code == 0, err
    got = json.loads((tmp_path / "report" / "transfer_results.json").read_text())["records"]
    assert [(r["target"], r["setting"], r["metrics"]["f1"]) for r in got] == \
        [(r["target"], r["setting"], r["metrics"]["f1"]) for r in want["records"]]


def test_a_task_run_from_the_hub_finds_its_source_adapter_by_the_name_it_was_given(hub, capsys, tmp_path, corpus):
    """A task run trained on a Hub language adapter records the name; its 'source' setting finds the adapter
    again by that name when the recorded path is gone."""
    out = tmp_path / "ner"
    assert _run(capsys, "train-task", "--task", "ner", "--lang-adapter", "me/lang-alpha", "--train-data",
                os.path.join(corpus, "alpha", "ner"), "--output", out, "--steps", "2", "--batch-size", "8",
                "--backend", "eager", "--device", "cpu", "--max-length", "32", "--no-progress")[0] == 0
    moved = tmp_path / "moved-cache"
    shutil.copytree(hub, moved, symlinks=True)
    huggingface_hub.constants.HF_HUB_CACHE = str(moved)  # (restored by monkeypatch)
    shutil.rmtree(hub)
    code, err = _run(capsys, "transfer", "--task-adapter", out, "--targets", "alpha", "--settings", "source",
                     "--eval-data", os.path.join(corpus, "{lang}", "ner"), "--backend", "eager", "--device", "cpu")
    assert code == 0, err


def test_hub_names_that_do_not_resolve_fail_before_work(hub, capsys, tmp_path, corpus):
    out = tmp_path / "out"
    code, err = _run(capsys, "train-task", "--task", "ner", "--lang-adapter", "me/missing", "--train-data",
                     os.path.join(corpus, "alpha", "ner"), "--output", out)
    assert code == 2 and "HF_HUB_OFFLINE=1" in err and "the Hub repository me/missing" in err, err
    code, err = _run(capsys, "train-task", "--task", "ner", "--lang-adapter", "en/wiki@ukp", "--train-data",
                     os.path.join(corpus, "alpha", "ner"), "--output", out)
    assert code == 2 and "pass the base model (--model)" in err, err
    code, err = _run(capsys, "transfer", "--task-adapter", "me/runs/ner-beta", "--targets", "alpha",
                     "--eval-data", os.path.join(corpus, "{lang}", "ner"), "--output", tmp_path / "r")
    assert code == 2 and "holds no adapter files" in err and "ner-beta" in err, err
    assert not out.exists() and not (tmp_path / "r").exists()
