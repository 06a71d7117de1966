"""What a training run reports at each logging step: the loss averaged over the steps since the previous
logging step (log line and trackers), and, with ``--report-to tensorboard`` (``wandb`` where installed),
TensorBoard scalars for the loss, learning rate, throughput and evaluation metrics, continued by a resumed
run."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re

import pytest

from madx_fast.cli import main
from madx_fast.training import train_language_adapter, train_task_adapter
from madx_fast.training.reporting import check_report_to
from madx_fast.training.trainer import Trainer
from tests.helpers.runs import quiet_config


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the TensorBoard event files of a run, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _log(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def lang_run(tmp_path_factory, tiny_base, corpus):
    out = str(tmp_path_factory.mktemp("report") / "lang")
    code = main(["train-lang", "--model", tiny_base, "--lang", "alpha", "--train-data",
                 os.path.join(corpus, "alpha", "text", "train.txt"), "--output", out, "--steps", "9",
                 "--batch-size", "8", "--max-length", "32", "--backend", "eager", "--device", "cpu", "--log-every",
                 "3", "--eval-every", "6", "--save-every", "0", "--no-progress", "--report-to", "tensorboard"])
    assert code == 0
    return out


def test_the_logged_loss_is_the_mean_over_the_interval(tmp_path, tiny_base, corpus, caplog):
    caplog.set_level(logging.INFO, logger="madx_fast")
    out = str(tmp_path / "lang")
    train_language_adapter(model=tiny_base, lang="alpha", output_dir=out, max_length=32, backend="eager",
                           train_data=os.path.join(corpus, "alpha", "text", "train.txt"),
                           config=quiet_config(steps=6, log_every=3, learning_rate=5e-3))
    losses = [e["loss"] for e in _log(out) if "loss" in e]
    lines = [r.getMessage() for r in caplog.records if re.match(r"step \d+/\d+  loss", r.getMessage())]
    shown = [float(line.split("loss ")[1].split()[0]) for line in lines]
    assert [line.split()[1] for line in lines] == ["3/6", "6/6"]
    assert shown == pytest.approx([sum(losses[:3]) / 3, sum(losses[3:]) / 3], abs=1e-4)
    assert shown[1] != pytest.approx(losses[5], abs=1e-4)  # not the last step's loss


def test_tensorboard_gets_every_logging_step(lang_run):
    scalars = _scalars(lang_run)
    losses = [e["loss"] for e in _log(lang_run) if "loss" in e]
    assert [s for s, _ in scalars["train/loss"]] == [3, 6, 9]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(
        [sum(losses[i:i + 3]) / 3 for i in (0, 3, 6)], rel=1e-5)
    lrs = {e["step"]: e["lr"] for e in _log(lang_run) if "lr" in e}
    assert [v for _, v in scalars["train/learning_rate"]] == pytest.approx([lrs[3], lrs[6], lrs[9]], rel=1e-5)
    assert all(v > 0 for _, v in scalars["train/tokens_per_s"] + scalars["train/steps_per_s"])
    evals = [e for e in _log(lang_run) if "eval" in e]
    assert [s for s, _ in scalars["eval/mlm_loss"]] == [e["step"] for e in evals] == [6, 9]
    assert [v for _, v in scalars["eval/mlm_loss"]] == pytest.approx([e["eval"]["mlm_loss"] for e in evals])


def test_a_task_run_reports_its_metrics_and_a_resumed_run_continues_the_curves(tmp_path, tiny_base, corpus,
                                                                            monkeypatch):
    lang = str(tmp_path / "lang")
    train_language_adapter(model=tiny_base, lang="alpha", train_data=os.path.join(corpus, "alpha", "text",
                                                                                  "train.txt"),
                           output_dir=lang, config=quiet_config(steps=2), max_length=32, backend="eager")
    out = str(tmp_path / "ner")
    kwargs = dict(task="ner", lang_adapter=lang, train_data=os.path.join(corpus, "alpha", "ner"), output_dir=out,
                  max_length=32, backend="eager",
                  config=quiet_config(steps=5, log_every=1, eval_every=2, save_every=2, report_to=["tensorboard"]))
    # interrupted in step 4: steps 1-3 reported, the checkpoint is from step 2
    step = Trainer._step
    calls = []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return step(self, *args)

    monkeypatch.setattr(Trainer, "_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_task_adapter(**kwargs)
    assert [s for s, _ in _scalars(out)["train/loss"]] == [1, 2, 3]
    monkeypatch.setattr(Trainer, "_step", step)
    train_task_adapter(**kwargs, resume=True)
    scalars = _scalars(out)
    losses = {e["step"]: e["loss"] for e in _log(out) if "loss" in e}  # the resumed run's log (from step 2 on)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5]  # step 3 of the interrupted run replaced
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([losses[i] for i in range(1, 6)], rel=1e-5)
    assert [s for s, _ in scalars["eval/f1"]] == [2, 4, 5]


def test_unknown_or_missing_trackers_are_refused_before_work(monkeypatch, capsys, tmp_path):
    with pytest.raises(ValueError, match="report_to 'tensorbored': choose from tensorboard, wandb"):
        check_report_to(["tensorbored"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code = main(["train-task", "--task", "ner", "--train-data", str(tmp_path), "--output", str(tmp_path / "o"),
                 "--report-to", "tensorboard,wandb"])
    assert code == 2 and "needs the wandb package, which is not installed: pip install wandb" in \
        capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (optional: "
                    "pip install wandb)")
def test_wandb_offline(tmp_path, tiny_base, corpus, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = str(tmp_path / "lang")
    train_language_adapter(model=tiny_base, lang="alpha", train_data=os.path.join(corpus, "alpha", "text",
                                                                                  "train.txt"),
                           output_dir=out, config=quiet_config(steps=4, log_every=2, report_to=["wandb"]),
                           max_length=32, backend="eager")
    runs = [os.path.join(out, "wandb", d) for d in os.listdir(os.path.join(out, "wandb"))
            if d.startswith("offline-run-")]
    assert len(runs) == 1
    records = b"".join(open(os.path.join(runs[0], f), "rb").read() for f in os.listdir(runs[0]) if f.endswith(".wandb"))
    for key in (b"train/loss", b"train/learning_rate", b"train/tokens_per_s"):
        assert key in records  # the run's history, as wandb's own log file holds it
