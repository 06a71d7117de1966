"""Bad input gets a clear error before any work starts, and nothing saved is lost: missing files, unknown
languages / adapters / tasks, labels that do not fit the head, adapters trained for another model, output
directories holding an earlier run."""
from __future__ import annotations

import json
import os

import pytest

from madx_fast.cli import main
from madx_fast.training import train_language_adapter, train_task_adapter
from tests.helpers.runs import build_tiny_base, quiet_config, snapshot


def _fails(capsys, *args, match):
    code = main([*map(str, args)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert match in err, err
    return err


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_base, corpus):
    out = tmp_path_factory.mktemp("runs")
    lang = str(out / "lang-alpha")
    train_language_adapter(model=tiny_base, lang="alpha", train_data=os.path.join(corpus, "alpha", "text", "train.txt"),
                           output_dir=lang, config=quiet_config(steps=2), max_length=32, backend="eager")
    ner = str(out / "ner-alpha")
    train_task_adapter(task="ner", lang_adapter=lang, train_data=os.path.join(corpus, "alpha", "ner"), output_dir=ner,
                       config=quiet_config(steps=2), max_length=32, backend="eager")
    return {"lang": lang, "ner": ner}


def test_missing_files(capsys, tmp_path, tiny_base, corpus):
    out = tmp_path / "out"
    _fails(capsys, "train-lang", "--model", tiny_base, "--lang", "sw", "--train-data", tmp_path / "missing.txt",
           "--output", out, "--backend", "eager", match="does not exist")
    _fails(capsys, "train-lang", "--model", tmp_path / "no-model", "--lang", "sw", "--train-data",
           os.path.join(corpus, "alpha", "text", "train.txt"), "--output", out, match="model directory")
    _fails(capsys, "train-task", "--task", "ner", "--lang-adapter", tmp_path / "no-adapter", "--train-data",
           os.path.join(corpus, "alpha", "ner"), "--output", out, match="does not exist")
    _fails(capsys, "train-task", "--task", "ner", "--model", tiny_base, "--train-data", tmp_path / "x.jsonl",
           "--output", out, match="does not exist")
    assert not out.exists()  # nothing was started


def test_unknown_task_language_setting_and_adapter(capsys, tmp_path, runs, corpus):
    _fails(capsys, "train-task", "--task", "pos", "--lang-adapter", runs["lang"], "--train-data",
           os.path.join(corpus, "alpha", "ner"), "--output", tmp_path / "o", match="unknown task 'pos'")
    common = ["transfer", "--task-adapter", runs["ner"], "--eval-data", os.path.join(corpus, "{lang}", "ner"),
              "--output", tmp_path / "report"]
    _fails(capsys, *common, "--targets", "beta", "--lang-adapter", f"alpha={runs['lang']}",
           match="no language adapter for 'beta'")
    _fails(capsys, *common, "--targets", "alpha", "--settings", "target,swapped", match="unknown transfer setting")
    _fails(capsys, *common, "--targets", "alpha", "--lang-adapter", "alpha", match="LANG=DIR")
    # a language adapter where a task adapter belongs, and the other way round
    _fails(capsys, "transfer", "--task-adapter", runs["lang"], "--targets", "alpha", "--eval-data",
           os.path.join(corpus, "{lang}", "ner"), "--output", tmp_path / "r2", match="not a task adapter")
    _fails(capsys, "train-task", "--task", "ner", "--lang-adapter", runs["ner"], "--train-data",
           os.path.join(corpus, "alpha", "ner"), "--output", tmp_path / "o", match="not a language adapter")
    # data of a language that does not exist
    _fails(capsys, *common, "--targets", "zulu", "--lang-adapter", f"zulu={runs['lang']}", match="does not exist")
    assert not (tmp_path / "report").exists() and not (tmp_path / "o").exists()


def test_labels_that_do_not_fit_the_head(capsys, tmp_path, runs, tiny_base):
    data = tmp_path / "ner"
    data.mkdir()
    row = {"tokens": ["Ana", "Kovac", "at", "ACME"], "ner_tags": ["B-PER", "I-PER", "O", "B-MISC"]}
    (data / "test.jsonl").write_text(json.dumps(row) + "\n")
    # the head was trained for PER / ORG / LOC: a MISC tag in the evaluation data is refused
    _fails(capsys, "transfer", "--task-adapter", runs["ner"], "--targets", "alpha", "--lang-adapter",
           f"alpha={runs['lang']}", "--eval-data", data, "--output", tmp_path / "report",
           match="['B-MISC'] are not among the head's labels")
    # explicit --labels that miss a tag of the training data
    (data / "train.jsonl").write_text(json.dumps(row) + "\n")
    _fails(capsys, "train-task", "--task", "ner", "--lang-adapter", runs["lang"], "--train-data", data / "train.jsonl",
           "--labels", "O,B-PER,I-PER", "--output", tmp_path / "o", match="not among the head's labels")
    # integer tags beyond the label list
    (data / "ints.jsonl").write_text(json.dumps({"tokens": ["a"], "ner_tags": [9]}) + "\n")
    _fails(capsys, "train-task", "--task", "ner", "--model", tiny_base, "--train-data", data / "ints.jsonl",
           "--output", tmp_path / "o", match="tag id 9 has no name")
    assert not (tmp_path / "report").exists() and not (tmp_path / "o").exists()


def test_adapter_trained_for_another_model(capsys, tmp_path, runs, tiny_base_other, corpus):
    # same architecture, other weights: refused by the base-model fingerprint
    err = _fails(capsys, "train-task", "--task", "ner", "--model", tiny_base_other, "--lang-adapter", runs["lang"],
                 "--train-data", os.path.join(corpus, "alpha", "ner"), "--output", tmp_path / "o",
                 "--backend", "eager", "--steps", 1, match="was trained on base model")
    assert "fingerprint" in err
    _fails(capsys, "transfer", "--task-adapter", runs["ner"], "--model", tiny_base_other, "--targets", "alpha",
           "--lang-adapter", f"alpha={runs['lang']}", "--eval-data", os.path.join(corpus, "{lang}", "ner"),
           "--output", tmp_path / "r", match="was trained on base model")
    # another architecture (hidden size 16): refused by the adapter file checks
    small = build_tiny_base(str(tmp_path / "small"), corpus, hidden=16)
    _fails(capsys, "train-task", "--task", "ner", "--model", small, "--lang-adapter", runs["lang"],
           "--train-data", os.path.join(corpus, "alpha", "ner"), "--output", tmp_path / "o2", "--steps", 1,
           match="hidden_size")
    assert not (tmp_path / "o" / "checkpoint.pt").exists() and not (tmp_path / "o2" / "checkpoint.pt").exists()


def test_existing_run_is_never_replaced_by_accident(capsys, tmp_path, runs, corpus, tiny_base):
    before = snapshot(runs["lang"])
    args = ["train-lang", "--model", tiny_base, "--lang", "alpha", "--output", runs["lang"], "--steps", 2,
            "--batch-size", 8, "--max-length", 32, "--backend", "eager", "--no-progress"]
    _fails(capsys, *args, "--train-data", os.path.join(corpus, "alpha", "text", "train.txt"),
           match="already holds a run")
    # --overwrite with a bad input: the error comes first, the old run is untouched
    _fails(capsys, *args, "--overwrite", "--train-data", tmp_path / "missing.txt", match="does not exist")
    _fails(capsys, *args, "--overwrite", "--train-data", os.path.join(corpus, "alpha", "text", "train.txt"),
           "--max-length", 500, match="longer than the model's")
    assert snapshot(runs["lang"]) == before
    # a user's file in the output directory of a new run is left alone
    mine = tmp_path / "fresh"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main([*map(str, args[:6]), str(mine), *map(str, args[7:]), "--train-data",
                 os.path.join(corpus, "alpha", "text", "train.txt")]) == 0
    assert (mine / "notes.txt").read_text() == "mine" and (mine / "adapter").is_dir()


def test_bad_loop_settings(capsys, tmp_path, tiny_base, corpus):
    common = ["train-lang", "--model", tiny_base, "--lang", "alpha", "--output", tmp_path / "o", "--train-data",
              os.path.join(corpus, "alpha", "text", "train.txt"), "--backend", "eager"]
    _fails(capsys, *common, "--batch-size", 6, "--grad-accum", 4, match="must split evenly")
    _fails(capsys, *common, "--steps", 0, match="steps must be an integer >= 1")
    _fails(capsys, *common.__getitem__(slice(0, 4)), "bad name!", *common[5:], match="without dots or blanks")
    assert not (tmp_path / "o").exists()
