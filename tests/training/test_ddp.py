"""Data-parallel training: ``torchrun --nproc_per_node 2`` (gloo, CPU) trains the same adapters as one process
on the same global batch (fp32, dropout off), for a language adapter (MLM + NICE) and for a NER task adapter
with gradient accumulation inside each process."""
from __future__ import annotations

import json
import os

import torch

from tests.helpers.runs import adapter_tensors, run_madx, step_losses, torchrun_madx


def _assert_same(dir_a, dir_b, bundle):
    a, b = adapter_tensors(os.path.join(dir_a, bundle)), adapter_tensors(os.path.join(dir_b, bundle))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)
    head = os.path.join(dir_a, bundle, "madx_head.safetensors")
    if os.path.exists(head):
        from safetensors.torch import load_file
        ha, hb = load_file(head), load_file(os.path.join(dir_b, bundle, "madx_head.safetensors"))
        for k in ha:
            torch.testing.assert_close(ha[k], hb[k], rtol=1e-5, atol=1e-5, msg=k)
    la, lb = step_losses(dir_a), step_losses(dir_b)
    assert len(la) == len(lb) and max(abs(x - y) for x, y in zip(la, lb)) < 1e-5


def test_ddp_language_adapter_equals_single_process(tmp_path, tiny_base, corpus):
    common = ["train-lang", "--model", tiny_base, "--lang", "alpha", "--max-length", 32, "--batch-size", 8,
              "--steps", 6, "--lr", "1e-3", "--eval-fraction", "0.1", "--eval-every", 3, "--save-every", 3,
              "--train-data", os.path.join(corpus, "alpha", "text", "train.txt"), "--backend", "eager",
              "--device", "cpu", "--no-progress", "--seed", 1]
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    run_madx(*common, "--output", single)
    torchrun_madx(*common, "--output", ddp)
    _assert_same(single, ddp, "adapter")
    summary = json.load(open(os.path.join(ddp, "run.json")))
    assert summary["world_size"] == 2
    # the adapter actually moved from its initialisation
    assert json.load(open(os.path.join(single, "run.json")))["final_loss"] != step_losses(single)[0]


def test_ddp_task_adapter_with_accumulation_equals_single_process(tmp_path, tiny_base, corpus):
    lang = str(tmp_path / "lang")
    run_madx("train-lang", "--model", tiny_base, "--lang", "alpha", "--max-length", 32, "--batch-size", 8,
             "--steps", 2, "--train-data", os.path.join(corpus, "alpha", "text", "train.txt"), "--backend", "eager",
             "--device", "cpu", "--no-progress", "--output", lang)
    common = ["train-task", "--task", "ner", "--lang-adapter", lang,
              "--train-data", os.path.join(corpus, "alpha", "ner"),
              "--max-length", 32, "--batch-size", 8, "--steps", 5, "--lr", "1e-3", "--eval-every", 5, "--backend",
              "eager", "--device", "cpu", "--no-progress", "--seed", 2]
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    run_madx(*common, "--output", single)
    torchrun_madx(*common, "--grad-accum", 2, "--output", ddp)  # 2 processes x 2 micro-batches x 2 examples
    _assert_same(single, ddp, "last")
