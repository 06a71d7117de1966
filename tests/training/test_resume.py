"""A run killed with SIGKILL after a checkpoint exists continues, with --resume, as the SAME run: the same
data order, masks and dropout, so per-step losses, evaluations and final adapters equal an uninterrupted
run's exactly. Also checked in-process for a task adapter (its best-on-validation bookkeeping)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from madx_fast.training import train_task_adapter
from tests.helpers.runs import (
    ROOT,
    StoppedAfterCheckpoint,
    adapter_tensors,
    env_for_subprocess,
    madx_command,
    quiet_config,
    run_madx,
    step_losses,
    stop_after_checkpoint,
)


def _lang_args(base, corpus, out, steps):
    return ["train-lang", "--model", base, "--lang", "alpha", "--output", out,
            "--train-data", os.path.join(corpus, "alpha", "text", "train.txt"), "--eval-fraction", "0.1",
            "--steps", steps, "--batch-size", 8, "--lr", "1e-3", "--warmup-steps", 5, "--max-length", 32,
            "--save-every", 5, "--eval-every", 10, "--log-every", 5, "--seed", 3, "--backend", "eager",
            "--device", "cpu", "--no-progress"]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_base_dropout, corpus):
    steps = 80
    straight = str(tmp_path / "straight")
    run_madx(*_lang_args(tiny_base_dropout, corpus, straight, steps))

    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(madx_command(*_lang_args(tiny_base_dropout, corpus, killed, steps)),
                            env=env_for_subprocess(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = os.path.join(killed, "checkpoint.pt")
    deadline = time.time() + 240
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    stderr = proc.stderr.read().decode()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{stderr[-2000:]}"
    assert not os.path.exists(os.path.join(killed, "run.json")), "killed too late: the run had finished"
    killed_at = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < killed_at < steps

    # without --resume the half-finished run is not overwritten
    refused = run_madx(*_lang_args(tiny_base_dropout, corpus, killed, steps), check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    # what a kill in the middle of a write leaves: a temporary file (the real checkpoint is only ever replaced
    # whole, by os.replace); resuming clears it
    stale = os.path.join(killed, ".checkpoint.pt.x1y2.tmp")
    open(stale, "wb").write(b"half a checkpoint")
    run_madx(*_lang_args(tiny_base_dropout, corpus, killed, steps), "--resume")
    assert not os.path.exists(stale)

    assert step_losses(killed) == step_losses(straight)  # bit for bit, every step
    assert len(step_losses(killed)) == steps
    evals = [[e for e in map(json.loads, open(os.path.join(d, "log.jsonl"))) if "eval" in e]
             for d in (killed, straight)]
    assert [e["eval"]["mlm_loss"] for e in evals[0]] == [e["eval"]["mlm_loss"] for e in evals[1]]
    a, b = adapter_tensors(os.path.join(killed, "adapter")), adapter_tensors(os.path.join(straight, "adapter"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.load(open(os.path.join(killed, "run.json")))
    assert summary["train_time_s"] > 0 and summary["steps"] == steps


def test_resume_of_a_task_run_in_process(tmp_path, tiny_base_dropout, corpus):
    """Stop after 6 of 12 steps (a run with steps=6 would have another schedule, so the checkpoint is cut
    by hand), then resume: same losses, same best checkpoint as straight through."""
    data = os.path.join(corpus, "alpha", "ner")
    kwargs = dict(task="ner", model=tiny_base_dropout, lang="alpha", train_data=data, max_length=32, backend="eager")
    straight = str(tmp_path / "straight")
    train_task_adapter(output_dir=straight, config=quiet_config(steps=12, eval_every=3, save_every=6), **kwargs)
    # replay the interrupted run: a copy of the straight run's step-6 state is what a kill after step 6 leaves
    part = str(tmp_path / "part")

    with stop_after_checkpoint(6), pytest.raises(StoppedAfterCheckpoint):
        train_task_adapter(output_dir=part, config=quiet_config(steps=12, eval_every=3, save_every=6), **kwargs)
    assert not os.path.exists(os.path.join(part, "last"))
    summary = train_task_adapter(output_dir=part, config=quiet_config(steps=12, eval_every=3, save_every=6),
                                 resume=True, **kwargs)
    assert step_losses(part) == step_losses(straight)
    best_a = json.load(open(os.path.join(part, "best", "madx_run.json")))
    best_b = json.load(open(os.path.join(straight, "best", "madx_run.json")))
    assert best_a["step"] == best_b["step"] == summary["best"]["step"]
    assert best_a["weights_sha256"] == best_b["weights_sha256"]

    # resuming with other settings is refused before any work
    with pytest.raises(ValueError, match="other settings.*learning_rate"):
        train_task_adapter(output_dir=part, config=quiet_config(steps=12, learning_rate=5e-4), resume=True, **kwargs)
