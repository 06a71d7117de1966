"""End to end on a tiny model: language adapters (MLM), a NER task adapter on a frozen language adapter, the
zero-shot transfer report; QA (SQuAD format) and COPA task adapters; ``madx params``; the demo's plumbing."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re

import pytest
import torch

from madx_fast.training import evaluate_transfer, train_language_adapter, train_task_adapter
from tests.helpers.runs import adapter_tensors, quiet_config, step_losses


@pytest.fixture(scope="module")
def lang_runs(tmp_path_factory, tiny_base, corpus):
    out = tmp_path_factory.mktemp("lang")
    runs = {}
    for lang in ("alpha", "beta"):
        runs[lang] = str(out / lang)
        train_language_adapter(model=tiny_base, lang=lang, train_data=os.path.join(corpus, lang, "text", "train.txt"),
                               eval_data=os.path.join(corpus, lang, "text", "validation.txt"), output_dir=runs[lang],
                               config=quiet_config(steps=6, eval_every=3), max_length=32, backend="eager")
    return runs


def test_language_adapter_run(lang_runs, tiny_base):
    run = lang_runs["alpha"]
    summary = json.load(open(os.path.join(run, "run.json")))
    # only the adapter trained: the bundle holds bottlenecks in both layers and the NICE adapter
    weights = adapter_tensors(os.path.join(run, "adapter"))
    assert {k.split(".")[0] for k in weights} == {"layers", "invertible"}
    assert summary["adapter_parameters[alpha]"] == sum(v.numel() for v in weights.values())
    assert summary["adapter_config"]["reduction_factor"] == 2
    assert summary["adapter_config"]["inv_adapter"] == "nice"
    for key in ("train_time_s", "wall_time_s", "peak_memory_mb", "tokens_per_s", "base_parameters"):
        assert summary[key] > 0
    assert "perplexity" in summary["final_eval"] and summary["final_eval"]["masked_tokens"] > 0
    entries = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    assert [e["step"] for e in entries if "eval" in e] == [3, 6]
    assert len(step_losses(run)) == 6
    meta = json.load(open(os.path.join(run, "adapter", "madx_run.json")))
    assert meta["stage"] == "language" and meta["language"] == "alpha" and meta["base_model"] == tiny_base
    # the backbone did not move: a fresh model + the adapter reproduce the held-out loss
    from transformers import AutoModelForMaskedLM

    from madx_fast.model import add_madx
    m = AutoModelForMaskedLM.from_pretrained(tiny_base)
    madx = add_madx(m, backend="eager")
    madx.load_adapter(os.path.join(run, "adapter"), set_active=True)
    assert madx.active == "alpha"


def test_ner_task_and_transfer(tmp_path, lang_runs, corpus):
    ner = str(tmp_path / "ner")
    summary = train_task_adapter(task="ner", lang_adapter=lang_runs["alpha"],
                                 train_data=os.path.join(corpus, "alpha", "ner"),
                                 output_dir=ner, config=quiet_config(steps=8, eval_every=4), max_length=32,
                                 backend="eager")
    assert summary["language"] == "alpha" and summary["best"]["metric"] == "f1"
    assert summary["labels"][0] == "O" and len(summary["labels"]) == 7
    _check_run_json(summary, json.load(open(os.path.join(lang_runs["alpha"], "run.json"))))
    for sub in ("best", "last"):
        meta = json.load(open(os.path.join(ner, sub, "madx_run.json")))
        assert meta["stage"] == "task" and os.path.isfile(os.path.join(ner, sub, "madx_head.safetensors")) and meta["language"] == "alpha"
    # the language adapter stayed frozen: task training never rewrote it
    assert "madx_adapter.safetensors" in os.listdir(os.path.join(ner, "best"))

    report = str(tmp_path / "report")
    result = evaluate_transfer(task_adapters=[ner],
                               lang_adapters={"alpha": lang_runs["alpha"], "beta": lang_runs["beta"]},
                               targets=["alpha", "beta"], eval_data=os.path.join(corpus, "{lang}", "ner"),
                               settings=["target", "source", "none"], output_dir=report, backend="eager")
    records = result["records"]
    assert {(r["target"], r["setting"]) for r in records} == {
        (t, s) for t in ("alpha", "beta") for s in ("target", "source", "none")}
    by = {(r["target"], r["setting"]): r for r in records}
    assert by[("beta", "target")]["language_adapter"] == "beta"
    assert by[("beta", "source")]["language_adapter"] == "alpha"
    assert by[("beta", "none")]["language_adapter"] is None
    # on the source language, "target" and "source" are the same setup
    assert by[("alpha", "target")]["value"] == pytest.approx(by[("alpha", "source")]["value"])
    for r in records:
        assert 0 <= r["value"] <= 100 and {"f1", "precision", "recall"} <= set(r["metrics"])
    for name in ("transfer_results.json", "transfer_results.csv", "transfer_matrix.csv", "transfer_heatmap.png"):
        assert os.path.getsize(os.path.join(report, name)) > 0
    with open(os.path.join(report, "transfer_heatmap.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.reader(open(os.path.join(report, "transfer_matrix.csv"))))
    assert rows[0] == ["source", "system", "alpha", "beta", "mean"] and len(rows) == 4
    assert [r[1] for r in rows[1:]] == ["MAD-X", "MAD-X, source adapter", "MAD-X, no language adapter"]

    # replayed from graphs (on the CPU: the same static-buffer bookkeeping, a plain call for the replay),
    # every batch padded to one length: the same scores
    graphed = evaluate_transfer(task_adapters=[ner],
                                lang_adapters={"alpha": lang_runs["alpha"], "beta": lang_runs["beta"]},
                                targets=["alpha", "beta"], eval_data=os.path.join(corpus, "{lang}", "ner"),
                                settings=["target", "source", "none"], backend="eager", cuda_graphs=True,
                                batch_size=5)
    for r in graphed["records"]:
        assert r["value"] == pytest.approx(by[(r["target"], r["setting"])]["value"], abs=1e-9)

    # the report directory is not overwritten silently
    with pytest.raises(FileExistsError, match="already holds a transfer report"):
        evaluate_transfer(task_adapters=[ner], lang_adapters={"beta": lang_runs["beta"]}, targets=["beta"],
                          eval_data=os.path.join(corpus, "{lang}", "ner"), output_dir=report, backend="eager")


def test_task_adapter_without_language_adapter(tmp_path, tiny_base, corpus):
    """MAD-X -LAD -INV: the task adapter alone; transfer evaluates it alone on every target."""
    run = str(tmp_path / "nolang")
    train_task_adapter(task="ner", model=tiny_base, lang="alpha", train_data=os.path.join(corpus, "alpha", "ner"),
                       output_dir=run, config=quiet_config(steps=3), max_length=32, backend="eager")
    res = evaluate_transfer(task_adapters=[run], lang_adapters={}, targets=["alpha", "beta"],
                            eval_data=os.path.join(corpus, "{lang}", "ner"), settings=["target"], backend="eager")
    assert [(r["target"], r["setting"], r["source"]) for r in res["records"]] == [
        ("alpha", "none", "alpha"), ("beta", "none", "alpha")]


def _squad(path, n=12):
    data = []
    for i in range(n):
        ctx = f"Ana Kovac travelled to Marlow in {1900 + i} . The river is quiet ."
        data.append({"title": "t", "paragraphs": [{"context": ctx, "qas": [
            {"id": f"q{i}", "question": "Where did Ana Kovac travel ?",
             "answers": [{"text": "Marlow", "answer_start": ctx.index("Marlow")}]}]}]})
    with open(path, "w") as f:
        json.dump({"version": "1.1", "data": data}, f)


def test_qa_task(tmp_path, lang_runs):
    train = str(tmp_path / "train.json")
    _squad(train)
    run = str(tmp_path / "qa")
    summary = train_task_adapter(task="qa", lang_adapter=lang_runs["alpha"], train_data=train, validation_data=train,
                                 output_dir=run, config=quiet_config(steps=4, batch_size=4), max_length=64,
                                 backend="eager")
    assert {"f1", "exact_match"} <= set(summary["final_eval"])
    res = evaluate_transfer(task_adapters=[run], lang_adapters={"beta": lang_runs["beta"]}, targets=["beta"],
                            eval_data=train, backend="eager")
    assert res["records"][0]["metric"] == "f1" and 0 <= res["records"][0]["value"] <= 100
    graphed = evaluate_transfer(task_adapters=[run], lang_adapters={"beta": lang_runs["beta"]}, targets=["beta"],
                                eval_data=train, backend="eager", cuda_graphs=True, batch_size=3)
    assert graphed["records"][0]["metrics"] == pytest.approx(res["records"][0]["metrics"])


def test_copa_task(tmp_path, lang_runs):
    path = str(tmp_path / "copa.jsonl")
    with open(path, "w") as f:
        for i in range(8):
            f.write(json.dumps({"premise": "Ana Kovac travelled to Marlow .", "choice1": "The river is quiet .",
                                "choice2": "Ana met Boris .", "question": ["cause", "effect"][i % 2],
                                "label": i % 2}) + "\n")
    run = str(tmp_path / "copa")
    summary = train_task_adapter(task="copa", lang_adapter=lang_runs["alpha"], train_data=path, validation_data=path,
                                 output_dir=run, config=quiet_config(steps=3, batch_size=4), max_length=32,
                                 backend="eager")
    assert 0 <= summary["final_eval"]["accuracy"] <= 1
    # the pooler (Linear(H, H) + tanh of the multiple-choice head) is trained and saved with the head
    from safetensors.torch import load_file
    head = load_file(os.path.join(run, "best", "madx_head.safetensors"))
    assert any("pooler" in k for k in head) and "classifier.weight" in head


def test_grad_accumulation_gives_the_same_adapter(tmp_path, tiny_base, corpus):
    """One global batch of 8 in one piece or as 4 accumulation steps of 2: the same gradients."""
    data = os.path.join(corpus, "alpha", "text", "train.txt")
    out = {}
    for accum in (1, 4):
        run = str(tmp_path / f"acc{accum}")
        train_language_adapter(model=tiny_base, lang="alpha", train_data=data, output_dir=run, eval_fraction=0,
                               config=quiet_config(steps=4, grad_accum=accum), max_length=32, backend="eager")
        out[accum] = (adapter_tensors(os.path.join(run, "adapter")), step_losses(run))
    for k, v in out[1][0].items():
        torch.testing.assert_close(out[4][0][k], v, rtol=1e-5, atol=1e-5)  # Adam amplifies rounding
    assert out[1][1] == pytest.approx(out[4][1], rel=1e-5)


def test_bf16_autocast_runs(tmp_path, tiny_base, corpus):
    run = str(tmp_path / "bf16")
    summary = train_language_adapter(model=tiny_base, lang="alpha", output_dir=run, eval_fraction=0.1,
                                     train_data=os.path.join(corpus, "alpha", "text", "train.txt"),
                                     config=quiet_config(steps=2, bf16=True), max_length=32, backend="eager")
    assert summary["config"]["bf16"] and all(torch.isfinite(torch.tensor(step_losses(run))))
    # master weights stay float32
    assert all(v.dtype == torch.float32 for v in adapter_tensors(os.path.join(run, "adapter")).values())


def test_backbone_dtype_defaults_to_the_fast_path(monkeypatch, tmp_path, tiny_base, corpus):
    """The command line and the stage functions default to "auto": bfloat16 backbone on a GPU with bf16,
    float32 on the CPU; an explicit bfloat16 backbone trains on the CPU too, adapters staying float32."""
    from madx_fast.cli import build_parser
    from madx_fast.training.models import backbone_dtype_for
    args = build_parser().parse_args(["train-lang", "--model", "m", "--lang", "x", "--train-data", "t",
                                      "--output", "o"])
    assert args.backbone_dtype == "auto"
    assert backbone_dtype_for("auto", "cpu") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert backbone_dtype_for("auto", "cuda") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert backbone_dtype_for("auto", "cuda") is None
    with pytest.raises(ValueError, match="choose auto"):
        backbone_dtype_for("int8")
    run = str(tmp_path / "bf16-backbone")
    summary = train_language_adapter(model=tiny_base, lang="alpha", output_dir=run, eval_fraction=0.1,
                                     train_data=os.path.join(corpus, "alpha", "text", "train.txt"),
                                     config=quiet_config(steps=2), max_length=32, backend="eager",
                                     backbone_dtype="bfloat16")
    assert summary["backbone_dtype"] == "torch.bfloat16" and all(torch.isfinite(torch.tensor(step_losses(run))))
    assert all(v.dtype == torch.float32 for v in adapter_tensors(os.path.join(run, "adapter")).values())


def _check_run_json(task: dict, language: dict) -> None:
    """run.json has the same keys for every stage, each listed in docs/file_formats.md; the parameter counts
    add up."""
    from madx_fast.training.stages import RUN_FACTS
    per_adapter = re.compile(r"\[[^]]+\]$")
    keys = {per_adapter.sub("[NAME]", k) for k in task}
    assert keys == {per_adapter.sub("[NAME]", k) for k in language} and set(RUN_FACTS) <= keys
    doc = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "file_formats.md"), encoding="utf-8").read()
    table = doc[doc.index("| key | language run"):]
    table = table[:table.index("\n\n")]
    documented = {k for row in table.splitlines()[2:] for k in re.findall(r"`([^`]+)`", row.split("|")[1])}
    assert documented == keys, (keys - documented, documented - keys)
    assert task["stage"] == "task" and language["stage"] == "language" and language["task"] is None
    assert language["trainable_parameters"] == language["adapter_parameters[alpha]"]
    assert task["trainable_parameters"] == task["adapter_parameters[ner]"] + task["head_parameters"]
    assert task["config"]["steps"] == task["steps"] and language["config"]["steps"] == language["steps"]


def test_params_command(capsys, tiny_base):
    from madx_fast.cli import main
    assert main(["params", "--langs", "en,sw"]) == 0
    out = capsys.readouterr().out
    # XLM-R base: 7.39M per language (rf 2 + NICE), 0.89M per task adapter (paper Tab. 5: 8.25M together)
    assert "7,387,776" in out and "894,528" in out and "8,282,304" in out
    assert main(["params", "--model", tiny_base, "--langs", "alpha"]) == 0
    assert "alpha" in capsys.readouterr().out


def test_demo_plumbing(tmp_path):
    """The demo's pipeline with every stage cut to a few steps (the full demo is timed by scripts/time_demo.sh)."""
    from madx_fast.demo import DemoConfig, run_demo
    out = tmp_path / "demo"
    cfg = DemoConfig(output_dir=str(out), sources=["alpha"], targets=["alpha", "beta"], hidden_size=32, num_layers=1,
                     vocab_size=200, max_length=32, pretrain_steps=2, lang_steps=2, mlm_steps=2, task_epochs=0.05,
                     batch_size=8,
                     text_sentences=200, ner_train=40, ner_validation=10, ner_test=10, progress=False,
                     cache_dir=str(tmp_path / "cache"), backend="eager")
    threads = torch.get_num_threads()
    summary = run_demo(dataclasses.replace(cfg, threads=1))
    assert summary["torch_threads"] == 1 and torch.get_num_threads() == threads  # the caller's count is back
    systems = {r["system"] for r in summary["transfer"]}
    assert systems == {"MAD-X", "MAD-X -INV", "MAD-X -LAD -INV", "XLM-R", "XLM-R MLM-TRG"}
    for name in ("transfer/transfer_heatmap.png", "transfer/transfer_difference.png", "transfer/transfer_matrix.md",
                 "lang-alpha/adapter", "lang-beta/adapter", "ner-alpha/best", "ft-alpha/best", "mlm-beta/model",
                 "ft-alpha-mlm-beta/best", "base/config.json", "demo_summary.json"):
        assert os.path.exists(out / name), name
    assert summary["table"]["baseline"] == "XLM-R"
    assert [r["name"] for r in summary["table"]["rows"]] == [
        "XLM-R", "XLM-R MLM-TRG", "MAD-X -LAD -INV", "MAD-X -INV", "MAD-X", "MAD-X, source adapter",
        "MAD-X, no language adapter"]
    assert summary["timings_s"]["total"] > 0
    # the last step (7): delta (no text of its own) served by alpha's and beta's adapters in six ways
    related = summary["related_language"]
    assert related["related"] == ["alpha", "beta"] and not (out / "data" / "delta" / "text").exists()
    assert [r["method"] for r in related["rows"]] == ["no language adapter", "alpha's adapter", "beta's adapter",
                                                     "Average(alpha, beta)", "merged alpha+beta", "EMEA(alpha, beta)"]
    assert [r["language_adapter"] for r in related["rows"]][3:] == ["avg:alpha,beta", "delta", "emea:alpha,beta"]
    assert all(0 <= r["f1"] <= 100 for r in related["rows"]) and "the best combination" in related["finding"]
    assert os.path.exists(out / "related" / "transfer_matrix.csv") and os.path.exists(out / "lang-delta-merged")
    # a second run refuses the non-empty directory; a user's file there survives --overwrite
    with pytest.raises(FileExistsError, match="not empty"):
        run_demo(cfg)
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        run_demo(dataclasses.replace(cfg, threads=0, output_dir=str(tmp_path / "no-threads")))
    assert not (tmp_path / "no-threads").exists()
    (out / "my_notes.txt").write_text("keep me")
    cfg.overwrite = True
    cfg.ablations = cfg.baselines = False
    summary = run_demo(cfg)  # and the base model now comes from the cache
    assert (out / "my_notes.txt").read_text() == "keep me"
    assert not any(r["stage"] == "pretrain" for r in summary["runs"])
    assert {r["system"] for r in summary["transfer"]} == {"MAD-X"}
    assert not (out / "ft-alpha").exists() and not (out / "transfer" / "transfer_difference.png").exists()


def test_demo_banners_number_the_steps_that_run():
    """1-4, the baselines, the transfer, delta: numbered among the steps that run, out of their count."""
    from madx_fast.demo import DemoConfig
    from madx_fast.demo.pipeline import _Demo
    full = _Demo(DemoConfig())
    assert [full._step(s) for s in ("data", "baselines", "transfer", "related")] == ["1/7", "5/7", "6/7", "7/7"]
    lean = _Demo(DemoConfig(baselines=False))
    assert [lean._step(s) for s in ("task adapters", "transfer", "related")] == ["4/6", "5/6", "6/6"]
    assert _Demo(DemoConfig(baselines=False, related=False))._step("transfer") == "5/5"
    assert _Demo(DemoConfig(sources=["alpha"], targets=["alpha", "gamma"]))._step("transfer") == "6/6"  # no beta


def test_demo_with_a_given_model_and_data_specs(tmp_path, tiny_base, corpus):
    """``madx demo --model M --text-data ... --ner-data ...``: the real-setting path, on local stand-ins."""
    from madx_fast.cli import main
    out = tmp_path / "demo"
    args = ["demo", "--model", tiny_base, "--sources", "alpha", "--targets", "alpha,beta", "--output-dir", out,
            "--text-data", os.path.join(corpus, "{lang}", "text", "train.txt"), "--ner-data",
            os.path.join(corpus, "{lang}", "ner"), "--max-length", 32, "--lang-steps", 2, "--mlm-steps", 2, "--task-epochs", 0.2,
            "--batch-size", 8, "--task-batch-size", 8, "--no-ablations", "--backend", "eager", "--no-progress"]
    assert main([*map(str, args)]) == 0
    summary = json.load(open(out / "demo_summary.json"))
    assert summary["base_model"] == tiny_base and summary["config"]["lang_lr"] == 1e-4
    assert not (out / "data").exists() and not (out / "base").exists()  # nothing generated, nothing pretrained
    assert {(r["source"], r["target"]) for r in summary["transfer"]} == {("alpha", "alpha"), ("alpha", "beta")}
    assert summary["config"]["finetune_lr"] == 2e-5 and (out / "ft-alpha-mlm-beta" / "best").is_dir()
    assert main(["demo", "--text-data", "x", "--output-dir", str(tmp_path / "o2")]) == 2  # languages required


def test_demo_threads_default_to_the_idle_cores(monkeypatch):
    """The synthetic model's default thread count: every core on an idle machine, the ones left on a busy one,
    never fewer than one."""
    from madx_fast.demo.pipeline import idle_cores
    for load, cores, expected in ((0.1, 4, 4), (1.2, 4, 3), (2.6, 4, 1), (15.0, 2, 1), (0.0, 1, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert idle_cores(cores) == expected, (load, cores)
