"""The ``madx`` command's flags are generated from the stage settings: every setting has its flag, the
defaults are the settings' defaults, and parsed flags give the same settings object a Python caller builds."""
from __future__ import annotations

import dataclasses

import pytest

from madx_fast.cli import COMMANDS, build_parser, main
from madx_fast.demo import DemoConfig, real_model_config
from madx_fast.training import (LanguageAdapterSettings, PredictSettings, TaskAdapterSettings, TrainConfig,
                                TransferSettings)
from madx_fast.training.settings import (MergeSettings, ParameterBudgetSettings, PushSettings, ReportSettings,
                                        args_values, from_args)

REQUIRED = {
    "train-lang": ["--model", "m", "--lang", "sw", "--train-data", "d.txt", "--output", "o"],
    "train-task": ["--task", "ner", "--train-data", "d", "--output", "o"],
    "transfer": ["--task-adapter", "t", "--targets", "sw,qu", "--eval-data", "e"],
}
SETTINGS = {"train-lang": LanguageAdapterSettings, "train-task": TaskAdapterSettings, "transfer": TransferSettings}


def _flags(parser, command):
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {opt: action for action in sub._actions for opt in (action.option_strings or [action.dest])}


@pytest.mark.parametrize("command", sorted(SETTINGS))
def test_every_setting_has_a_flag_and_defaults_match(command):
    parser = build_parser()
    flags = _flags(parser, command)
    cls = SETTINGS[command]
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]
    if any(f.name == "config" for f in dataclasses.fields(cls)):
        fields += list(dataclasses.fields(TrainConfig))
    dests = {a.dest for a in flags.values()}
    assert {f.name for f in fields} <= dests, {f.name for f in fields} - dests
    parsed = from_args(cls, parser.parse_args([command, *REQUIRED[command]]))
    # what a Python caller gets with the same required values
    values = {"train-lang": dict(model="m", lang="sw", train_data="d.txt", output_dir="o"),
              "train-task": dict(task="ner", train_data="d", output_dir="o"),
              "transfer": dict(task_adapters=["t"], targets=["sw", "qu"], eval_data="e")}[command]
    assert parsed == cls(**values)


def test_flags_map_to_settings_names_and_types():
    parser = build_parser()
    args = parser.parse_args(["train-task", *REQUIRED["train-task"], "--labels", "O,B-PER,I-PER", "--lr", "3e-4",
                              "--max-grad-norm", "0", "--no-progress", "--epochs", "2.5", "--steps", "7"])
    s = from_args(TaskAdapterSettings, args)
    assert s.labels == ["O", "B-PER", "I-PER"] and s.config.learning_rate == 3e-4 and s.config.steps == 7
    assert s.config.max_grad_norm is None and s.config.progress is False and s.epochs == 2.5
    args = parser.parse_args(["train-lang", *REQUIRED["train-lang"], "--no-invertible", "--leave-out", "11", "10"])
    s = from_args(LanguageAdapterSettings, args)
    assert s.invertible is False and s.leave_out == [11, 10]
    assert s.config.steps == 250_000 and s.config.batch_size == 64  # the paper's stage-1 defaults
    args = parser.parse_args(["transfer", *REQUIRED["transfer"], "--lang-adapter", "sw=a", "qu=b"])
    assert from_args(TransferSettings, args).lang_adapters == {"sw": "a", "qu": "b"}


def test_baseline_systems_seeds_and_report_flags():
    parser = build_parser()
    s = from_args(TaskAdapterSettings, parser.parse_args(["train-task", *REQUIRED["train-task"], "--full-finetune",
                                                          "--model", "m", "--lang", "en", "--seeds", "1,2,3"]))
    assert s.full_finetune and s.seeds == [1, 2, 3]
    s.check()
    s = from_args(LanguageAdapterSettings, parser.parse_args(["train-lang", *REQUIRED["train-lang"], "--full-model"]))
    assert s.full_model
    s.check()
    args = parser.parse_args(["transfer", "--targets", "sw", "--eval-data", "e", "--task-adapter", "MAD-X=a",
                              "mad-x-inv=b", "--full-model", "f", "XLM-R=g", "--lang-adapter", "sw=l",
                              "mad-x-inv:sw=m"])
    s = from_args(TransferSettings, args)
    assert s.task_adapters == ["MAD-X=a", "mad-x-inv=b"] and s.full_models == ["f", "XLM-R=g"]
    assert s.lang_adapters == {"sw": "l", "mad-x-inv:sw": "m"}
    s.check()
    for bad, message in ((dict(task_adapters=[], full_models=[]), "nothing to evaluate"),
                         (dict(task_adapters=["a:b=c"]), "system name 'a:b'"),
                         (dict(lang_adapters={"s:x.y": "d"}), "language 'x.y'")):
        with pytest.raises(ValueError, match=message):
            TransferSettings(**{**dict(task_adapters=["t"], targets=["sw"], eval_data="e"), **bad}).check()
    s = from_args(ReportSettings, parser.parse_args(["report", "runs/a", "runs/b", "--output", "o", "--overwrite"]))
    assert s == ReportSettings(runs=["runs/a", "runs/b"], output_dir="o", overwrite=True)
    with pytest.raises(SystemExit):
        parser.parse_args(["report"])  # at least one run directory


def test_no_hand_written_flag():
    """Every flag of every command is a field of that command's settings class (and its loop's), and the other
    way round: the parser is generated, nothing is added beside it."""
    classes = {**SETTINGS, "predict": PredictSettings, "params": ParameterBudgetSettings, "demo": DemoConfig,
               "merge": MergeSettings, "report": ReportSettings, "push": PushSettings}
    assert set(classes) == set(COMMANDS)
    parser = build_parser()
    for command, cls in classes.items():
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        dests = {a.dest for a in sub._actions} - {"help", "quiet", "verbose"}  # flags and positional arguments
        fields = {f.name for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
        if any(f.name == "config" for f in dataclasses.fields(cls)):
            fields = fields - {"config"} | {f.name for f in dataclasses.fields(TrainConfig)}
        assert dests == fields, (command, dests ^ fields)


def test_params_and_demo_flags():
    parser = build_parser()
    s = from_args(ParameterBudgetSettings, parser.parse_args(["params"]))
    assert s == ParameterBudgetSettings() and s.langs == ["en"] and s.invertible
    s = from_args(ParameterBudgetSettings, parser.parse_args(["params", "--langs", "en,sw", "--no-invertible",
                                                             "--task-reduction-factor", "8"]))
    assert s.langs == ["en", "sw"] and not s.invertible and s.task_reduction_factor == 8.0
    # demo: only the flags given are values (--model changes the defaults of the others)
    assert args_values(DemoConfig, parser.parse_args(["demo"])) == {}
    given = args_values(DemoConfig, parser.parse_args(["demo", "--model", "m", "--targets", "en,sw", "--no-cache",
                                                       "--lang-steps", "5", "--threads", "2"]))
    assert given == {"model": "m", "targets": ["en", "sw"], "use_cache": False, "lang_steps": 5, "threads": 2}
    cfg = real_model_config(**given)
    assert cfg.lang_steps == 5 and cfg.task_epochs == 10 and cfg.max_length == 128 and not cfg.use_cache


def test_bad_values_are_refused_before_work(capsys, tmp_path):
    for extra, match in ((["--lang-adapter", "sw"], "LANG=DIR"), (["--settings", "target,sideways"], "sideways"),
                         (["--batch-size", "0"], "batch_size must be")):
        assert main(["transfer", *REQUIRED["transfer"], "--output", str(tmp_path / "r"), *extra]) == 2
        assert match in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit):
        main(["train-lang", *REQUIRED["train-lang"], "--no-such-flag"])
