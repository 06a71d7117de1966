"""The paper's baselines on the same trainer and data path as the adapter stages: ``madx train-lang --full-model``
(MLM-SRC / MLM-TRG: masked LM of every weight) and ``madx train-task --full-finetune`` (the XLM-R baseline, and
from an MLM model directory the MLM-SRC / MLM-TRG ones), ``--seeds``; tiny models, a few steps each."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM

from madx_fast.cli import main
from madx_fast.training import train_language, train_language_adapter, train_task, train_task_adapter
from madx_fast.training.stages import RUN_FACTS
from tests.helpers.runs import quiet_config, run_madx, snapshot, step_losses, torchrun_madx


def _weights(model_dir: str) -> dict:
    return load_file(os.path.join(model_dir, "model.safetensors"))


def _assert_every_weight_moved(before: dict, after: dict, *, prefix: str = "roberta.") -> None:
    """Every backbone tensor changed: AdamW (no weight decay) moves a parameter only when its gradient is
    non-zero, so each backbone weight got a gradient (the padding row of the embeddings aside, its tensor moved)."""
    backbone = [k for k in before if k.startswith(prefix)]
    assert len(backbone) > 20
    unchanged = [k for k in backbone if torch.equal(before[k], after[k])]
    assert not unchanged, f"no gradient reached {unchanged}"


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory, tiny_base, corpus):
    out = str(tmp_path_factory.mktemp("baselines") / "mlm-beta")
    summary = train_language(model=tiny_base, lang="beta", full_model=True, eval_fraction=0.1,
                             train_data=os.path.join(corpus, "beta", "text", "train.txt"), output_dir=out,
                             config=quiet_config(steps=12, learning_rate=2e-3, log_every=1, eval_every=12),
                             max_length=32)
    return out, summary


def _ner(corpus, lang="alpha"):
    return os.path.join(corpus, lang, "ner")


def test_full_model_mlm_trains_every_weight(mlm_run, tiny_base):
    out, summary = mlm_run
    losses = step_losses(out)
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])  # the loss goes down
    model_dir = os.path.join(out, "model")
    before = AutoModelForMaskedLM.from_pretrained(tiny_base).state_dict()
    after = _weights(model_dir)
    _assert_every_weight_moved({k: v for k, v in before.items() if k in after}, after)
    assert summary["stage"] == "full-mlm" and summary["language"] == "beta" and summary["adapter"] is None
    assert summary["trainable_parameters"] == sum(v.numel() for k, v in after.items() if "decoder" not in k)
    assert summary["final_eval"]["mlm_loss"] > 0 and summary["peak_memory_mb"] > 0 and summary["tokens_per_s"] > 0
    meta = json.load(open(os.path.join(model_dir, "madx_run.json")))
    assert meta["stage"] == "full-mlm" and meta["base_model"] == tiny_base and meta["weights_sha256"]
    assert os.path.isfile(os.path.join(model_dir, "tokenizer.json"))  # train-task --model DIR loads it as is


def test_full_finetune_from_the_base_and_from_an_mlm_model(tmp_path, mlm_run, tiny_base, corpus):
    xlmr = str(tmp_path / "xlmr")
    summary = train_task(task="ner", model=tiny_base, lang="alpha", full_finetune=True, train_data=_ner(corpus),
                         output_dir=xlmr, config=quiet_config(steps=14, learning_rate=2e-3, eval_every=7,
                                                              log_every=1), max_length=32)
    losses = step_losses(xlmr)
    assert sum(losses[-3:]) < sum(losses[:3])
    start = AutoModelForMaskedLM.from_pretrained(tiny_base).state_dict()
    last = _weights(os.path.join(xlmr, "last"))
    _assert_every_weight_moved({k: v for k, v in start.items() if k in last}, last)
    assert "classifier.weight" in last and summary["head_parameters"] == last["classifier.weight"].numel() + \
        last["classifier.bias"].numel()
    assert summary["stage"] == "full-task" and summary["source_language"] == "alpha" and summary["init_model"] is None
    assert summary["best"]["metric"] == "f1" and summary["seed"] == 0

    # run.json has the same keys for every stage
    adapter = train_task_adapter(task="ner", model=tiny_base, lang="alpha", train_data=_ner(corpus),
                                 output_dir=str(tmp_path / "nolang"), config=quiet_config(steps=2), max_length=32,
                                 backend="eager")
    per_adapter = ("adapter_parameters[", "adapter_percent_of_base[")  # one pair per adapter trained
    assert set(summary) == {k for k in adapter if not k.startswith(per_adapter)} and set(RUN_FACTS) <= set(summary)

    # MLM-TRG: fine-tuned from the beta MLM run's model directory (the run directory names it); bf16 autocast
    trg = train_task(task="ner", model=mlm_run[0], lang="alpha", full_finetune=True, train_data=_ner(corpus),
                     output_dir=str(tmp_path / "mlm-trg"), config=quiet_config(steps=2, bf16=True), max_length=32)
    assert all(math.isfinite(loss) for loss in step_losses(str(tmp_path / "mlm-trg")))
    assert _weights(os.path.join(str(tmp_path / "mlm-trg"), "last"))["classifier.weight"].dtype == torch.float32
    assert trg["init_model"]["language"] == "beta" and trg["init_model"]["path"].endswith("model")
    assert trg["base_fingerprint"] == summary["base_fingerprint"] == adapter["base_fingerprint"]  # the root
    assert trg["init_model"]["fingerprint"] != summary["base_fingerprint"]
    assert trg["base_model"] == tiny_base


def test_full_finetune_resumes_exactly(tmp_path, tiny_base_dropout, tiny_base_other, corpus):
    """Stopped after the checkpoint at step 4 of 8, then --resume: the same losses and weights, bit for bit."""
    kwargs = dict(task="ner", model=tiny_base_dropout, lang="alpha", full_finetune=True, train_data=_ner(corpus),
                  max_length=32)
    loop = dict(steps=8, eval_every=4, save_every=4, learning_rate=2e-3, log_every=1)
    straight = str(tmp_path / "straight")
    train_task(output_dir=straight, config=quiet_config(**loop), **kwargs)

    class Stop(Exception):
        pass

    import madx_fast.training.trainer as trainer_mod
    original = trainer_mod.Trainer._save_checkpoint

    def save_then_stop(self, state, *args):
        original(self, state, *args)
        if state.step == 4:
            raise Stop

    part = str(tmp_path / "part")
    trainer_mod.Trainer._save_checkpoint = save_then_stop
    try:
        with pytest.raises(Stop):
            train_task(output_dir=part, config=quiet_config(**loop), **kwargs)
    finally:
        trainer_mod.Trainer._save_checkpoint = original
    assert not os.path.exists(os.path.join(part, "last"))
    train_task(output_dir=part, config=quiet_config(**loop), resume=True, **kwargs)
    assert step_losses(part) == step_losses(straight) and len(step_losses(part)) == 8
    a, b = _weights(os.path.join(part, "last")), _weights(os.path.join(straight, "last"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # resuming from other starting weights is refused before any work
    with pytest.raises(ValueError, match="other settings.*base_fingerprint"):
        train_task(output_dir=part, config=quiet_config(**loop), resume=True, **dict(kwargs, model=tiny_base_other))


def test_seeds_train_one_run_each(tmp_path, tiny_base, corpus):
    out = str(tmp_path / "seeds")
    result = train_task(task="ner", model=tiny_base, lang="alpha", train_data=_ner(corpus), output_dir=out,
                        config=quiet_config(steps=2), max_length=32, backend="eager", seeds=[3, 5])
    assert result["seeds"] == [3, 5] and [r["seed"] for r in result["runs"]] == [3, 5]
    for seed in (3, 5):
        summary = json.load(open(os.path.join(out, f"seed-{seed}", "run.json")))
        assert summary["config"]["seed"] == seed and summary["settings"]["seeds"] is None
        assert json.load(open(os.path.join(out, f"seed-{seed}", "best", "madx_run.json")))["seed"] == seed
    losses = [step_losses(os.path.join(out, f"seed-{s}")) for s in (3, 5)]
    assert losses[0] != losses[1]
    # every seed's directory is checked before the first trains: an earlier run in seed-5 refuses them all
    before = snapshot(out)
    with pytest.raises(FileExistsError, match="seed-3"):
        train_task(task="ner", model=tiny_base, lang="alpha", train_data=_ner(corpus), output_dir=out,
                   config=quiet_config(steps=2), max_length=32, backend="eager", seeds=[3, 7])
    assert snapshot(out) == before and not os.path.exists(os.path.join(out, "seed-7"))


def _madx(capsys, *args) -> tuple[int, str]:
    """``madx ARGS`` in this process: (exit status, stderr)."""
    status = main([str(a) for a in args])
    return status, capsys.readouterr().err


def test_full_model_settings_are_refused_before_work(tmp_path, capsys, tiny_base, corpus, mlm_run):
    out = str(tmp_path / "out")
    common = ["train-task", "--task", "ner", "--train-data", _ner(corpus), "--output", out, "--full-finetune",
              "--device", "cpu", "--no-progress"]
    for extra, message in (([], "needs --model"),
                           (["--model", tiny_base, "--lang", "alpha", "--lang-adapter", mlm_run[0]],
                            "--lang-adapter does not apply"),
                           (["--model", tiny_base, "--lang", "alpha", "--backbone-dtype", "bfloat16"], "float32"),
                           (["--model", str(tmp_path / "missing"), "--lang", "alpha"], "does not exist"),
                           (["--model", tiny_base, "--lang", "alpha", "--seeds", "1,1"], "distinct")):
        status, err = _madx(capsys, *common, *extra)
        assert status == 2 and message in err, err
    assert not os.path.exists(out)
    text = os.path.join(corpus, "beta", "text", "train.txt")
    status, err = _madx(capsys, "train-lang", "--model", tiny_base, "--lang", "beta", "--full-model",
                        "--export-adapterhub", "--train-data", text, "--output", out)
    assert status == 2 and "--export-adapterhub does not apply" in err
    with pytest.raises(ValueError, match="call madx_fast.training.train_task"):
        train_task_adapter(task="ner", model=tiny_base, lang="alpha", full_finetune=True, train_data=_ner(corpus),
                           output_dir=out)
    with pytest.raises(ValueError, match="call madx_fast.training.train_language"):
        train_language_adapter(model=tiny_base, lang="beta", full_model=True, output_dir=out,
                               train_data=os.path.join(corpus, "beta", "text", "train.txt"))
    # an earlier run is never replaced without --resume / --overwrite, and --overwrite never removes an input
    before = snapshot(mlm_run[0])
    status, err = _madx(capsys, "train-lang", "--model", tiny_base, "--lang", "beta", "--full-model",
                        "--train-data", text, "--output", mlm_run[0])
    assert status == 2 and "--resume" in err
    status, err = _madx(capsys, "train-lang", "--model", mlm_run[0], "--lang", "beta", "--full-model", "--overwrite",
                        "--train-data", text, "--output", mlm_run[0])
    assert status == 2 and "is an input of this run" in err
    assert snapshot(mlm_run[0]) == before


def test_full_model_mlm_with_two_processes_equals_one(tmp_path, tiny_base, corpus):
    """``torchrun --nproc_per_node 2`` (gloo) trains the same whole model as one process on the same global
    batch: every weight, the decoder tied to the embeddings included, gets the same all-reduced gradient."""
    common = ["train-lang", "--full-model", "--model", tiny_base, "--lang", "alpha", "--max-length", 32,
              "--batch-size", 8, "--steps", 4, "--lr", "1e-3", "--save-every", 2, "--eval-fraction", "0.1",
              "--train-data", os.path.join(corpus, "alpha", "text", "train.txt"), "--device", "cpu", "--no-progress",
              "--seed", 1]
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    run_madx(*common, "--output", single)
    torchrun_madx(*common, "--output", ddp)
    a, b = _weights(os.path.join(single, "model")), _weights(os.path.join(ddp, "model"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)
    la, lb = step_losses(single), step_losses(ddp)
    assert len(la) == len(lb) == 4 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-5
    assert json.load(open(os.path.join(ddp, "run.json")))["world_size"] == 2


def test_transfer_of_full_models_with_seeds_beside_named_adapter_systems(tmp_path, capsys, mlm_run, tiny_base,
                                                                          corpus):
    """``madx transfer --full-model``: a ``--seeds`` directory stands for each seed's best model (XLM-R), an
    MLM-TRG model is scored on its own target only, adapter systems share the call; each full model's score is
    what its ``best/`` directory, loaded by transformers as it is, scores on that data."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from madx_fast.training.tasks import make_task, task_class

    xlmr, trg, nolang = (str(tmp_path / n) for n in ("xlmr", "trg", "nolang"))
    loop = quiet_config(steps=4, learning_rate=2e-3, eval_every=2)
    train_task(task="ner", model=tiny_base, lang="alpha", full_finetune=True, train_data=_ner(corpus), output_dir=xlmr,
               config=loop, max_length=32, seeds=[1, 2])
    train_task(task="ner", model=mlm_run[0], lang="alpha", full_finetune=True, train_data=_ner(corpus),
               output_dir=trg, config=loop, max_length=32)
    train_task_adapter(task="ner", model=tiny_base, lang="alpha", train_data=_ner(corpus), output_dir=nolang,
                       config=quiet_config(steps=2), max_length=32, backend="eager")
    out = tmp_path / "transfer"
    status, err = _madx(capsys, "transfer", "--targets", "alpha,beta", "--eval-data", os.path.join(corpus, "{lang}", "ner"),
                        "--full-model", xlmr, trg, "--task-adapter", f"MAD-X -LAD -INV={nolang}", "--device", "cpu",
                        "--backend", "eager", "--output", out)
    assert status == 0, err
    records = json.load(open(out / "transfer_results.json"))["records"]
    cells = {(r["system"], r["target"], r["seed"]) for r in records}
    assert cells == {("XLM-R", t, s) for t in ("alpha", "beta") for s in (1, 2)} | {
        ("XLM-R MLM-TRG", "beta", 0)} | {("MAD-X -LAD -INV", t, 0) for t in ("alpha", "beta")}
    report = json.load(open(out / "transfer_results.json"))["report"]
    assert report["baseline"] == "XLM-R" and "±" in open(out / "transfer_matrix.md").read()

    labels = json.load(open(os.path.join(xlmr, "seed-2", "best", "madx_run.json")))["labels"]
    tok = AutoTokenizer.from_pretrained(os.path.join(xlmr, "seed-2", "best"))
    task = make_task("ner", pad_id=tok.pad_token_id, labels=labels)
    examples = task_class("ner").read(_ner(corpus, "beta"), "test", lang="beta", labels=labels).examples
    model = AutoModelForTokenClassification.from_pretrained(os.path.join(xlmr, "seed-2", "best"))
    f1 = task.evaluate(model, examples, task.encode(examples, tok, 32, train=False), batch_size=7, device="cpu")["f1"]
    [rec] = [r for r in records if r["system"] == "XLM-R" and r["target"] == "beta" and r["seed"] == 2]
    assert rec["value"] == pytest.approx(100 * f1, abs=1e-9) and rec["model"].endswith(os.path.join("seed-2", "best"))
