"""A training step queues its device work without waiting for it: no op in a micro-step's forward and
backward reads device data back to the host (madx_fast.testing.sync_check.HostReads, on any device), and on a GPU
the whole optimizer step runs under torch.cuda.set_sync_debug_mode("error")."""
from __future__ import annotations

import os

import pytest
import torch
import transformers

from madx_fast.testing.sync_check import HostReads
from madx_fast.training import train_language_adapter, train_task_adapter
from madx_fast.training.trainer import Trainer
from tests.helpers.runs import quiet_config

HF5 = int(transformers.__version__.split(".")[0]) >= 5


@pytest.fixture
def micro_step_reads(monkeypatch):
    """The host reads of every micro-step, and of every optimizer step (clipping, the non-finite check, the
    update), of the runs the test starts: a list per call."""
    seen = []

    def spy(name):
        inner = getattr(Trainer, name)

        def spied(self, *args):
            with HostReads() as reads:
                out = inner(self, *args)
            seen.append(reads.reads)
            return out
        monkeypatch.setattr(Trainer, name, spied)

    spy("_micro_step")
    spy("_optimizer_step")
    return seen


def _check(seen):
    assert seen, "no micro-step ran"
    for reads in seen:
        # transformers 4.x keeps its own all-ones test of an unpadded mask, of the host copy for this XLM-R
        # (madx_fast/model/inputs.py; on the CPU a host read cannot be told from a device read: the meta test)
        allowed = [] if HF5 else [r for r in reads if "transformers" in r.where]
        assert reads == allowed, "\n".join(map(str, reads))


def test_language_adapter_steps_read_nothing_back(tmp_path, tiny_base, corpus, micro_step_reads):
    train_language_adapter(model=tiny_base, lang="alpha", train_data=os.path.join(corpus, "alpha", "text", "train.txt"),
                           output_dir=str(tmp_path / "lang"), eval_fraction=0, max_length=32, backend="eager",
                           config=quiet_config(steps=3, grad_accum=2))
    _check(micro_step_reads)


def test_ner_steps_read_nothing_back(tmp_path, tiny_base, corpus, micro_step_reads):
    train_task_adapter(task="ner", model=tiny_base, train_data=os.path.join(corpus, "alpha", "ner"),
                       output_dir=str(tmp_path / "ner"), max_length=32, backend="eager",
                       config=quiet_config(steps=3))
    _check(micro_step_reads)
    if not HF5:
        # NER batches are padded: no read at all, not even HF's
        assert any(not reads for reads in micro_step_reads)


@pytest.mark.parametrize("padded", [False, True])
def test_a_step_reads_no_device_data_on_either_transformers_line(tiny_base, padded):
    """The model on the meta device, where any read of device data fails: ``model_batch`` leaves HF's test
    of an unpadded mask (transformers 4.x) nothing on the device to read, and the forward runs through."""
    from transformers import AutoModelForMaskedLM

    from madx_fast.training.batches import model_batch
    model = AutoModelForMaskedLM.from_pretrained(tiny_base, attn_implementation="sdpa").to("meta")
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0 if padded else 1
    batch = {"input_ids": torch.randint(5, 50, (2, 8)), "attention_mask": mask}
    inputs = model_batch(model, batch, "meta")
    assert inputs["input_ids"].device.type == "meta"
    assert model(**inputs).logits.shape == (2, 8, model.config.vocab_size)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stage", ["lang", "ner"])
def test_whole_gpu_step_never_syncs(tmp_path, tiny_base, corpus, monkeypatch, stage):
    steps = []
    inner = Trainer._step

    def strict(self, *args):
        if len(steps) >= 1:  # the first step warms up (lazy CUDA / kernel compilation may sync)
            torch.cuda.set_sync_debug_mode("error")
        try:
            return inner(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            steps.append(1)

    monkeypatch.setattr(Trainer, "_step", strict)
    cfg = quiet_config(steps=3, device="cuda")
    if stage == "lang":
        train_language_adapter(model=tiny_base, lang="alpha", output_dir=str(tmp_path / "r"), eval_fraction=0,
                               train_data=os.path.join(corpus, "alpha", "text", "train.txt"), max_length=32,
                               config=cfg)  # backbone dtype "auto": bfloat16 on the GPU
    else:
        train_task_adapter(task="ner", model=tiny_base, train_data=os.path.join(corpus, "alpha", "ner"),
                           output_dir=str(tmp_path / "r"), max_length=32, config=cfg)
    assert len(steps) == 3
