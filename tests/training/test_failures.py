"""Trust nothing read, save nothing wrong (the training side): hostile and damaged checkpoints, impossible
settings, divergence, inputs that are also outputs, heads and bundles that do not fit, and data that cannot
be read. Every case: a clear error before anything changes, and whatever the user had is still there."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from madx_fast.cli import main
from madx_fast.model import AdapterFileError, add_madx
from madx_fast.training import (
    BundleError,
    DataError,
    TrainConfig,
    Trainer,
    runs,
    train_language_adapter,
    train_task_adapter,
)
from madx_fast.training.trainer import TrainingDiverged
from tests.helpers.runs import (
    StoppedAfterCheckpoint,
    build_tiny_base,
    quiet_config,
    snapshot,
    step_losses,
    stop_after_checkpoint,
)


def _cli(capsys, *args):
    code = main([*map(str, args)])
    return code, capsys.readouterr().err


def _lang_args(tiny_base, corpus, out, *extra, backend="eager"):
    return ["train-lang", "--model", tiny_base, "--lang", "alpha", "--output", out, "--train-data",
            os.path.join(corpus, "alpha", "text", "train.txt"), "--backend", backend, "--no-progress", "--steps", 4,
            "--batch-size", 8, "--max-length", 32, "--save-every", 2, "--log-every", 1, *extra]


@pytest.fixture(scope="module")
def lang_run(tmp_path_factory, tiny_base, corpus):
    out = str(tmp_path_factory.mktemp("lang") / "alpha")
    assert main([*map(str, _lang_args(tiny_base, corpus, out))]) == 0
    return out


class _Exploit:
    """Unpickling this runs a command: what a checkpoint from an untrusted disk could hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------------------
def test_resume_never_runs_code_from_a_checkpoint(capsys, tmp_path, lang_run, tiny_base, corpus):
    run = tmp_path / "run"
    shutil.copytree(lang_run, run)
    marker = tmp_path / "pwned"
    with open(run / "checkpoint.pt", "wb") as f:
        pickle.dump({"format": "madx_fast.checkpoint", "payload": _Exploit(marker)}, f)
    before = snapshot(run)
    code, err = _cli(capsys, *_lang_args(tiny_base, corpus, run, "--resume"))
    assert code == 2 and "cannot read the checkpoint" in err, err
    assert not marker.exists()
    assert snapshot(run) == before


def test_damaged_or_mismatched_checkpoints_are_refused_whole(capsys, tmp_path, lang_run, tiny_base, corpus):
    ckpt = torch.load(os.path.join(lang_run, "checkpoint.pt"), weights_only=True)
    name = next(iter(ckpt["trainable"]))
    cases = {
        "bit flip": lambda c: c["trainable"][name].view(-1)[0].add_(1e-3),         # digest catches it
        "wrong shape": lambda c: c["trainable"].__setitem__(name, c["trainable"][name][:1]),
        "nan": lambda c: c["trainable"][name].view(-1).__setitem__(0, float("nan")),
    }
    for label, edit in cases.items():
        run = tmp_path / label.replace(" ", "_")
        shutil.copytree(lang_run, run)
        c = torch.load(run / "checkpoint.pt", weights_only=True)
        edit(c)
        if label != "bit flip":
            c.pop("digest")  # as if written without one: the content checks must catch it
        torch.save(c, run / "checkpoint.pt")
        before = snapshot(run)
        code, err = _cli(capsys, *_lang_args(tiny_base, corpus, run, "--resume"))
        want = {"bit flip": "changed or damaged", "wrong shape": "this run's parameter is", "nan": "NaN"}[label]
        assert code == 2 and want in err, (label, err)
        assert snapshot(run) == before
    # a truncated file
    run = tmp_path / "truncated"
    shutil.copytree(lang_run, run)
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    code, err = _cli(capsys, *_lang_args(tiny_base, corpus, run, "--resume"))
    assert code == 2 and "cannot read the checkpoint" in err


def test_changed_backbone_dtype_or_backend_on_resume_is_refused(capsys, tmp_path, lang_run, tiny_base, corpus):
    for extra, backend, key in ((["--backbone-dtype", "bfloat16"], "eager", "backbone_dtype"), ([], "triton", "backend")):
        run = tmp_path / key
        shutil.copytree(lang_run, run)
        before = snapshot(run)
        code, err = _cli(capsys, *_lang_args(tiny_base, corpus, run, "--resume", *extra, backend=backend))
        assert code == 2 and "other settings" in err and key in err, err
        assert snapshot(run) == before


def test_a_checkpoint_of_madx_fast_0_1_resumes(tmp_path, tiny_base, corpus):
    """Version 1: NumPy arrays and a Python tuple in the RNG state, the old identity names, no digest."""
    import numpy as np
    run = str(tmp_path / "run")
    cfg = quiet_config(steps=4, save_every=2)
    train_language_adapter(model=tiny_base, lang="alpha", train_data=os.path.join(corpus, "alpha", "text", "train.txt"),
                           output_dir=run, config=cfg, max_length=32, backend="eager", eval_fraction=0)
    want = step_losses(run)
    c = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)
    old = {"lang": "language", "model": "base_model", "adapter": "adapter_config", "blocks": "train_blocks"}
    c["identity"] = {k_old: c["identity"][k_new] for k_old, k_new in old.items()} | {
        k: v for k, v in c["identity"].items() if k not in old.values() and k not in ("backbone_dtype", "backend")}
    for rng in c["rng"]:
        py, npy = rng["python"], rng["numpy"]
        rng["python"] = (py["version"], tuple(py["state"].tolist()), py["gauss"])
        rng["numpy"] = (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                        npy["cached_gaussian"])
    for key in ("digest", "nonfinite", "scaler"):
        c.pop(key)
    c["version"], c["step"] = 1, 2
    c["history"] = [h for h in c["history"] if h.get("step", 0) <= 2]
    torch.save(c, os.path.join(run, "checkpoint.pt"))
    # (the saved weights and optimizer state are those of step 4; resuming "from step 2" with them checks the
    # format is read, not the numbers: the loss of steps 3-4 differ from the first run's)
    train_language_adapter(model=tiny_base, lang="alpha", train_data=os.path.join(corpus, "alpha", "text", "train.txt"),
                           output_dir=run, config=cfg, max_length=32, backend="eager", eval_fraction=0, resume=True)
    assert len(step_losses(run)) == len(want) and step_losses(run)[:2] == want[:2]


# ------------------------------------------------------------------------------------------------------------
# settings and divergence
# ------------------------------------------------------------------------------------------------------------
def test_impossible_settings_are_refused_up_front(capsys, tmp_path, tiny_base, corpus):
    out = tmp_path / "o"
    for extra, match in ((["--lr", "inf"], "learning_rate must be a finite number"),
                         (["--lr", "nan"], "learning_rate must be a finite number"),
                         (["--lr", "0"], "learning_rate must be a finite number > 0"),
                         (["--max-grad-norm", "-1"], "max_grad_norm must be"),
                         (["--eval-fraction", "1.0"], "eval_fraction must be"),
                         (["--weight-decay", "-0.1"], "weight_decay must be"),
                         (["--skip-nonfinite", "-1"], "skip_nonfinite must be"),
                         (["--mlm-probability", "1"], "mlm_probability must be")):
        code, err = _cli(capsys, *_lang_args(tiny_base, corpus, out, *extra))
        assert code == 2 and match in err, (extra, err)
    assert not out.exists()


def test_divergence_stops_the_run_without_writing_garbage(capsys, tmp_path, tiny_base, corpus):
    out = tmp_path / "o"
    code, err = _cli(capsys, *_lang_args(tiny_base, corpus, out, "--lr", "1e30"))
    assert code == 1 and "training diverged" in err and "Lower the learning rate" in err, err
    assert not (out / "run.json").exists() and not (out / "adapter").exists()
    if (out / "checkpoint.pt").exists():  # written before the divergence: finite weights only
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in ckpt["trainable"].values())


class _PoisonedObjective:
    """A least-squares objective whose items >= 1000 have a NaN target: the steps that draw one diverge."""

    def make_batch(self, items, generator=None):
        x = torch.tensor([[float(i % 7), 1.0] for i in items])
        y = torch.tensor([float("nan") if i >= 1000 else float(i % 5) for i in items])
        return {"x": x, "y": y}

    def count(self, batch):
        return len(batch["y"])

    def num_tokens(self, batch):
        return len(batch["y"])

    def prepare(self, batch):
        return batch

    def loss_sum(self, model, batch):
        return ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).sum()


def test_nonfinite_steps_are_skipped_up_to_the_limit(tmp_path):
    items = [1, 2, 3, 4, 1000, 5, 6, 7]
    cfg = TrainConfig(steps=8, batch_size=1, learning_rate=1e-2, seed=0, log_every=1, save_every=0, progress=False,
                      device="cpu", skip_nonfinite=3, max_grad_norm=None)
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    result = Trainer(model, _PoisonedObjective(), items, cfg, str(tmp_path / "a")).run()
    log = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    skipped = [e for e in log if e.get("skipped")]
    assert len(skipped) == 1 == result["nonfinite_steps"] and all(torch.isfinite(p).all() for p in model.parameters())
    # with no tolerance the run stops at the first flush after the bad step, and writes no checkpoint from it
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    with pytest.raises(TrainingDiverged, match="step [0-9]+ had a non-finite loss"):
        Trainer(model, _PoisonedObjective(), items, TrainConfig(**{**cfg.__dict__, "skip_nonfinite": 0}),
                str(tmp_path / "b")).run()
    assert not (tmp_path / "b" / "checkpoint.pt").exists()


def test_float16_backbone_trains_with_dynamic_loss_scaling(tmp_path, tiny_base, corpus, monkeypatch):
    kw = dict(model=tiny_base, lang="alpha", train_data=os.path.join(corpus, "alpha", "text", "train.txt"),
              max_length=32, backend="eager", eval_fraction=0)
    train_language_adapter(output_dir=str(tmp_path / "fp32"), config=quiet_config(steps=8, log_every=1), **kw)
    fp16 = train_language_adapter(output_dir=str(tmp_path / "fp16"), config=quiet_config(steps=8, log_every=1),
                                  backbone_dtype="float16", **kw)
    a, b = step_losses(str(tmp_path / "fp32")), step_losses(str(tmp_path / "fp16"))
    assert fp16["backbone_dtype"] == "torch.float16" and fp16["loss_scale"] is not None
    assert all(abs(x - y) < 0.05 * abs(x) for x, y in zip(a, b)), (a, b)
    # a scale far too high: the first steps overflow and are skipped, the scale comes down, training goes on
    real = torch.amp.GradScaler.__init__
    monkeypatch.setattr(torch.amp.GradScaler, "__init__",
                        lambda self, *args, **kwargs: real(self, *args, **{**kwargs, "init_scale": 2.0 ** 120}))
    high = train_language_adapter(output_dir=str(tmp_path / "high"), config=quiet_config(steps=8), backbone_dtype="float16",
                                  **kw)
    assert high["loss_scale"] < 2.0 ** 120 and high["nonfinite_steps"] == 0
    weights = load_file(os.path.join(tmp_path, "high", "adapter", "madx_adapter.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


# ------------------------------------------------------------------------------------------------------------
# inputs that are outputs, bundles and heads
# ------------------------------------------------------------------------------------------------------------
def test_a_command_never_overwrites_its_own_input(capsys, tmp_path, lang_run, corpus):
    run = tmp_path / "L"
    shutil.copytree(lang_run, run)
    before = snapshot(run)
    code, err = _cli(capsys, "train-task", "--task", "ner", "--lang-adapter", run, "--train-data",
                     os.path.join(corpus, "alpha", "ner"), "--output", run, "--overwrite", "--backend", "eager")
    assert code == 2 and "is an input of this run" in err, err
    assert snapshot(run) == before


def test_a_refused_bundle_changes_nothing_in_the_model(tmp_path, lang_run, tiny_base, tiny_base_other, corpus):
    from transformers import XLMRobertaForMaskedLM

    from madx_fast.training.models import base_fingerprint
    model = XLMRobertaForMaskedLM.from_pretrained(tiny_base_other)
    madx = add_madx(model, backend="eager")
    madx.add_adapter("alpha", "seq_bn_inv")
    before = {k: v.clone() for k, v in madx.adapter_state_dict("alpha").items()}
    with pytest.raises(BundleError, match="was trained on base model"):
        runs.load_bundle(madx, os.path.join(lang_run, "adapter"), fingerprint=base_fingerprint(model),
                         model_name=tiny_base_other, overwrite=True)
    after = madx.adapter_state_dict("alpha")
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_a_bundle_with_other_weights_than_recorded_is_refused(tmp_path, lang_run, corpus):
    bundle = tmp_path / "adapter"
    shutil.copytree(os.path.join(lang_run, "adapter"), bundle)
    meta = json.load(open(bundle / "madx_adapter.json"))
    w = load_file(bundle / "madx_adapter.safetensors")
    next(iter(w.values())).view(-1)[0] += 1
    save_file(w, bundle / "madx_adapter.safetensors")
    for key in ("checksum", "weights_sha256"):  # even without the adapter file's own checksums
        meta.pop(key)
    json.dump(meta, open(bundle / "madx_adapter.json", "w"))
    with pytest.raises(BundleError, match="differ from the ones this bundle's run recorded"):
        runs.load_bundle(add_madx(_mlm(lang_run)), str(bundle))


def _mlm(lang_run):
    from transformers import XLMRobertaForMaskedLM
    return XLMRobertaForMaskedLM.from_pretrained(json.load(open(os.path.join(lang_run, "run.json")))["base_model"])


def test_task_heads_that_do_not_fit_are_refused(tmp_path, tiny_base, corpus):
    ner = str(tmp_path / "ner")
    train_task_adapter(task="ner", model=tiny_base, train_data=os.path.join(corpus, "alpha", "ner"), output_dir=ner,
                       config=quiet_config(steps=2), max_length=32, backend="eager")
    best = os.path.join(ner, "best")
    from transformers import XLMRobertaForTokenClassification
    model = XLMRobertaForTokenClassification.from_pretrained(tiny_base, num_labels=7)
    madx = add_madx(model, backend="eager")
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    variants = {}
    head = load_file(os.path.join(best, "madx_head.safetensors"))
    for label, edit in (("missing", lambda h: h.pop("classifier.bias")),
                        ("nan", lambda h: h["classifier.weight"].view(-1).__setitem__(0, float("nan")))):
        d = tmp_path / label
        shutil.copytree(best, d)
        h = {k: v.clone() for k, v in head.items()}
        edit(h)
        save_file(h, d / "madx_head.safetensors")
        meta = json.load(open(d / "madx_adapter.json"))
        meta["head"].pop("sha256"), meta.pop("checksum")  # as if edited by hand: the content checks decide
        json.dump(meta, open(d / "madx_adapter.json", "w"))
        variants[label] = d
    truncated = tmp_path / "truncated"
    shutil.copytree(best, truncated)
    data = (truncated / "madx_head.safetensors").read_bytes()
    (truncated / "madx_head.safetensors").write_bytes(data[:40])
    cases = [(variants["missing"], r"missing keys \['classifier.bias'\]"), (variants["nan"], "NaN or Inf"),
             (truncated, "madx_head.safetensors: the file was changed or damaged")]
    for directory, match in cases:
        with pytest.raises(AdapterFileError, match=match):
            madx.load_adapter(directory, with_head=True)
        assert "ner" not in madx
        now = model.state_dict()
        assert all(torch.equal(now[k], snap[k]) for k in snap)


# ------------------------------------------------------------------------------------------------------------
# data and tokenizers
# ------------------------------------------------------------------------------------------------------------
def test_a_tokenizer_larger_than_the_embeddings_is_refused_before_work(capsys, tmp_path, tiny_base, corpus):
    small = build_tiny_base(str(tmp_path / "small-vocab"), corpus)
    config = json.load(open(os.path.join(small, "config.json")))
    config["vocab_size"] = 50
    json.dump(config, open(os.path.join(small, "config.json"), "w"))
    out = tmp_path / "o"
    code, err = _cli(capsys, *_lang_args(small, corpus, out))
    assert code == 2 and "embeds only 50" in err, err
    assert not out.exists()


def test_unreadable_text_names_the_file(capsys, tmp_path, tiny_base):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt:1: not UTF-8"):
        from madx_fast.training.data import read_texts
        read_texts(str(bad))


def test_a_failed_start_does_not_block_the_retry(capsys, tmp_path, tiny_base, corpus):
    out = tmp_path / "o"
    out.mkdir()
    (out / "log.jsonl").write_text("")  # what a run that died before its first checkpoint leaves
    code, err = _cli(capsys, *_lang_args(tiny_base, corpus, out, "--steps", 2))
    assert code == 0, err
    assert (out / "run.json").exists()


# ------------------------------------------------------------------------------------------------------------
# the data of a resumed run, one writer per output directory, a disk that fills up
# ------------------------------------------------------------------------------------------------------------
def _swapped_copy(corpus, tmp_path) -> str:
    """The training text with its first two lines swapped: the same tokens and blocks, in another order."""
    lines = open(os.path.join(corpus, "alpha", "text", "train.txt"), encoding="utf-8").read().splitlines()
    assert lines[0] != lines[1]
    lines[0], lines[1] = lines[1], lines[0]
    path = tmp_path / "swapped.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_resume_on_other_data_is_refused_unless_allowed(capsys, tmp_path, lang_run, tiny_base, corpus):
    run = tmp_path / "run"
    shutil.copytree(lang_run, run)
    args = _lang_args(tiny_base, corpus, run, "--resume", "--train-data", _swapped_copy(corpus, tmp_path))
    before = snapshot(run)
    code, err = _cli(capsys, *args)
    error = err.strip().splitlines()[-1]
    assert code == 2 and "was written for other data" in error and "training data (train_data_sha256)" in error, err
    assert "--allow-data-change" in error and "train_blocks" not in error  # same size: only the content differs
    assert snapshot(run) == before
    code, err = _cli(capsys, *args, "--allow-data-change")
    assert code == 0, err
    summary = json.load(open(run / "run.json"))
    old = json.load(open(os.path.join(lang_run, "run.json")))["train_data_sha256"]
    assert summary["settings"]["allow_data_change"] is True
    new = summary["train_data_sha256"]
    assert summary["data_changes"] == [{"step": 4, "changed": {"train_data_sha256": [old, new]}}]


def test_allowed_data_change_of_another_size_continues_the_run(tmp_path, tiny_base, corpus):
    """Stopped after its step-2 checkpoint, resumed on more text (other block count): the data order goes on
    with a new epoch of the new size, and the change is recorded."""
    text = os.path.join(corpus, "alpha", "text", "train.txt")
    more = tmp_path / "more.txt"
    more.write_text(open(text, encoding="utf-8").read() * 2, encoding="utf-8")
    kw = dict(model=tiny_base, lang="alpha", output_dir=str(tmp_path / "run"),
              config=quiet_config(steps=4, save_every=2),
              max_length=32, backend="eager", eval_fraction=0)
    with stop_after_checkpoint(2), pytest.raises(StoppedAfterCheckpoint):
        train_language_adapter(train_data=text, **kw)
    with pytest.raises(ValueError, match="training blocks \\(train_blocks\\): checkpoint [0-9]+, now [0-9]+"):
        train_language_adapter(train_data=str(more), resume=True, **kw)
    summary = train_language_adapter(train_data=str(more), resume=True, allow_data_change=True, **kw)
    changed = summary["data_changes"][0]["changed"]
    assert summary["data_changes"][0]["step"] == 2
    assert {"train_blocks", "data_tokens", "train_data_sha256"} <= set(changed)
    assert changed["train_blocks"][1] == summary["train_blocks"] > changed["train_blocks"][0]
    assert len(step_losses(str(tmp_path / "run"))) == 4


def test_a_second_run_on_the_same_output_is_refused_and_a_dead_ones_lock_never_blocks(capsys, tmp_path, tiny_base,
                                                                                     corpus):
    import subprocess
    import time

    from tests.helpers.processes import Bounded
    from tests.helpers.runs import ROOT, env_for_subprocess, madx_command
    out = tmp_path / "o"
    first_err = tmp_path / "first.err"  # a file, not a pipe: the first run never waits for the test to read it
    with open(first_err, "wb") as err_file, Bounded(
            madx_command(*_lang_args(tiny_base, corpus, out, "--steps", 1_000_000, "--save-every", 0)),
            env=env_for_subprocess(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err_file) as first:
        deadline = time.time() + 240
        while not (out / "log.jsonl").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (out / "log.jsonl").exists() and first.poll() is None, first_err.read_text()[-3000:]
        code, err = _cli(capsys, *_lang_args(tiny_base, corpus, out, "--steps", 2))
        assert code == 2 and f"{out} is in use by another madx run (process {first.pid})" in err, err
        assert first.poll() is None and not (out / "run.json").exists()
    # leaving the block killed the first run (SIGKILL)
    # the killed run's lock went with it: the next run (here, resuming: no checkpoint yet, so from step 0) goes
    code, err = _cli(capsys, *_lang_args(tiny_base, corpus, out, "--steps", 2, "--resume"))
    assert code == 0, err
    assert (out / "run.json").exists() and not (out / ".madx.lock").exists()


def test_a_refusal_or_failed_write_of_process_0_stops_every_data_parallel_process(tmp_path, tiny_base, corpus):
    """torchrun with 2 processes on a directory another run holds, then with a checkpoint process 0 cannot
    write (a file size limit): both processes stop with the reason, one line each (none is left waiting for
    the other in a collective, which would end in a timeout or a connection error)."""
    import resource
    import signal
    import sys

    from madx_fast.files import DirectoryLock
    from tests.helpers.processes import run_bounded
    from tests.helpers.runs import ROOT, env_for_subprocess

    def torchrun(out, **kwargs):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "madx_fast.cli", *map(str, _lang_args(tiny_base, corpus, out, "--device", "cpu"))]
        return run_bounded(cmd, env=env_for_subprocess(), cwd=ROOT, capture_output=True, text=True, timeout=240,
                           **kwargs)

    out = tmp_path / "o"
    with DirectoryLock(out):
        proc = torchrun(out)
    assert proc.returncode != 0
    refusals = [line for line in proc.stderr.splitlines() if line.startswith("madx train-lang: error: ")
                and f"in use by another madx run (process {os.getpid()})" in line]
    assert len(refusals) == 2, proc.stderr[-3000:]
    assert not out.exists()

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))

    proc = torchrun(tmp_path / "limited", preexec_fn=limit)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("madx train-lang: error: ")]
    assert proc.returncode != 0 and "[rank" not in proc.stderr, proc.stderr[-3000:]
    assert sorted(errors) == [f"madx train-lang: error: {p}cannot write {tmp_path / 'limited' / 'checkpoint.pt'}: "
                              "File too large (EFBIG); nothing was written there" for p in ("", "process 0 stopped: ")]


def test_a_full_disk_while_checkpointing_is_one_line(tmp_path, tiny_base, corpus):
    """The first checkpoint (74 KB here) cannot be written: a file size limit (EFBIG from the kernel) and,
    where this system lets a test mount one, a full 48 KiB tmpfs (ENOSPC): status 2, one line naming
    checkpoint.pt and the cause, no traceback, no temporary left."""
    import resource
    import signal

    from tests.helpers.processes import run_bounded, unshare_available
    from tests.helpers.runs import ROOT, env_for_subprocess, madx_command

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))

    out = tmp_path / "limited"
    proc = run_bounded(madx_command(*_lang_args(tiny_base, corpus, out)), env=env_for_subprocess(), cwd=ROOT,
                       capture_output=True, text=True, timeout=300, preexec_fn=limit)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors == [f"madx train-lang: error: cannot write {out / 'checkpoint.pt'}: File too large (EFBIG); "
                      "nothing was written there"], proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["log.jsonl"]
    if not unshare_available():
        return
    disk = tmp_path / "disk"
    disk.mkdir()
    script = f'mount -t tmpfs -o size=48k none {disk} && exec "$@"'
    proc = run_bounded(["unshare", "-rm", "sh", "-c", script, "sh", *madx_command(*_lang_args(tiny_base, corpus,
                                                                                           disk / "run"))],
                       env=env_for_subprocess(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"madx train-lang: error: cannot write {disk / 'run' / 'checkpoint.pt'}: " \
           "No space left on device (ENOSPC); " \
           "nothing was written there" in proc.stderr.splitlines(), proc.stderr[-3000:]


def test_a_deeply_nested_adapter_config_is_a_one_line_refusal(capsys, tmp_path, lang_run, corpus):
    adapter = tmp_path / "deep"
    shutil.copytree(os.path.join(lang_run, "adapter"), adapter)
    os.remove(adapter / "madx_adapter.json")
    (adapter / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    code, err = _cli(capsys, "train-task", "--task", "ner", "--lang-adapter", adapter, "--train-data",
                     os.path.join(corpus, "alpha", "ner"), "--output", tmp_path / "out", "--backend", "eager")
    assert code == 2 and err.strip().splitlines()[-1] == \
        f"madx train-task: error: {adapter / 'adapter_config.json'}: not readable JSON (nested too deeply)", err
    assert not (tmp_path / "out").exists()
