"""The Hugging Face route: ``transformers.Trainer`` trains a model wired with ``add_madx`` (only the adapter and
the head change; its checkpoints carry the adapters, load with ``from_pretrained`` and resume exactly), and
AdapterHub's ``AdapterTrainer`` trains an AdapterHub model patched with ``madx_fast.patch_adapterhub`` to what
it trains unpatched."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import Trainer, TrainingArguments, XLMRobertaForTokenClassification

import madx_fast
from madx_fast.model import MadxConfig, Stack, add_madx, from_pretrained
from tests.helpers.models import import_adapterhub, randomize, tiny_config

LABELS = 5


def _examples(n=16, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, 100, (length,), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long),
                    "labels": ids % LABELS})  # a tag per token id: learnable
    return out


def _args(out, **overrides):
    kwargs = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                  report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                  dataloader_num_workers=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _wired(adapter_seed=0):
    torch.manual_seed(0)
    model = XLMRobertaForTokenClassification(tiny_config(num_labels=LABELS))
    madx = add_madx(model, backend="eager")
    madx.add_adapter("en", MadxConfig.language())
    madx.add_adapter("ner", MadxConfig.task())
    randomize(model, seed=adapter_seed)
    madx.set_active(Stack("en", "ner"))
    madx.train_adapters("ner")  # the task adapter and the head; the language adapter and the backbone frozen
    return model


def _changed(before: dict, model) -> set[str]:
    return {n for n, p in model.state_dict().items() if not torch.equal(before[n], p)}


def test_the_hf_trainer_trains_only_the_adapter_and_the_head(tmp_path):
    model = _wired()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.ner." in n or n.startswith("classifier.") for n in trainable)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_examples())
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    assert _changed(before, model) == trainable  # every trainable parameter moved, nothing else did
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_hf_trainer_checkpoints_carry_the_adapters_and_resume_exactly(tmp_path):
    whole = _wired()
    Trainer(model=whole, args=_args(tmp_path / "whole"), train_dataset=_examples()).train()
    cut = _wired()
    Trainer(model=cut, args=_args(tmp_path / "cut", max_steps=4, save_strategy="steps", save_steps=2),
            train_dataset=_examples()).train()
    checkpoint = tmp_path / "cut" / "checkpoint-2"
    # a checkpoint is a whole model: from_pretrained gives it back with its adapters and setup
    loaded = from_pretrained(checkpoint, backend="eager", attn_implementation="eager")
    assert loaded.madx.active == Stack("en", "ner") and set(loaded.madx.adapters) == {"en", "ner"}
    # resuming from it in a model whose adapters start elsewhere ends where the uninterrupted run ended
    resumed = _wired(adapter_seed=9)
    Trainer(model=resumed, args=_args(tmp_path / "cut"), train_dataset=_examples()).train(
        resume_from_checkpoint=str(checkpoint))
    want, got = whole.state_dict(), resumed.state_dict()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name
    assert os.path.isfile(checkpoint / "model.safetensors")


def test_adapterhubs_trainer_trains_a_patched_model_as_it_trains_the_unpatched_one(tmp_path, monkeypatch):
    adapters = import_adapterhub()
    from adapters import AdapterTrainer
    from adapters.composition import Stack as HubStack

    torch.manual_seed(0)
    model = adapters.XLMRobertaAdapterModel(tiny_config())
    model.add_tagging_head("ner", num_labels=LABELS)
    model.add_adapter("en", config=adapters.SeqBnInvConfig(reduction_factor=2))
    model.add_adapter("ner", config=adapters.SeqBnConfig())
    randomize(model)
    model.train_adapter("ner")
    model.set_active_adapters(HubStack("en", "ner"))
    patched = copy.deepcopy(model)
    report = madx_fast.patch_adapterhub(patched, backend="eager")
    assert not report.not_patched, report
    before = {n: p.clone() for n, p in model.state_dict().items()}
    AdapterTrainer(model=model, args=_args(tmp_path / "adapterhub", max_steps=3), train_dataset=_examples()).train()
    calls = []
    bottleneck = madx_fast.ops.bottleneck_adapter

    def counted(*args, **kwargs):
        calls.append(1)
        return bottleneck(*args, **kwargs)

    monkeypatch.setattr(madx_fast.ops, "bottleneck_adapter", counted)  # the patch calls madx_fast's fused op
    AdapterTrainer(model=patched, args=_args(tmp_path / "patched", max_steps=3), train_dataset=_examples()).train()
    trained = {"adapterhub": model.state_dict(), "patched": patched.state_dict()}
    assert calls  # the fused ops really ran in the patched model's training
    moved = _changed(before, patched)
    assert moved and all(".ner." in n for n in moved), sorted(moved)  # the task adapter and its head only
    for n, want in trained["adapterhub"].items():
        assert torch.allclose(trained["patched"][n], want, atol=1e-5), n
