"""MAD-X stage 2: a task adapter (reduction factor 16) trained in ``Stack(source_language, task)`` with the
language adapter frozen, plus the task head; the checkpoint with the best validation score is kept.

    train_task_adapter(task="ner", lang_adapter="runs/en", train_data="wikiann:en", output_dir="runs/ner-en")
    train_task_adapter(TaskAdapterSettings(...))                  # the same, from a settings object

Every input (output directory, data, labels, adapters, base model) is checked before training starts.
Writes ``best/`` (best validation score), ``last/`` (bundles with the head) and ``run.json`` (returned).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os

from ...model import MadxConfig, Stack, check_adapter_name
from ...model.adapter_files import read_adapter_info
from .. import data, models, runs
from ..loading import resolve_language_adapter
from ..settings import TaskAdapterSettings, TrainConfig
from ..tasks import make_task, task_class
from .base import TrainingStage

log = logging.getLogger("madx_fast.training")


class TaskAdapterStage(TrainingStage):
    kind = "task"
    full_model = False  # True: every weight trains (FullFinetuneStage)
    settings_class = TaskAdapterSettings
    identity_keys = ("stage", "task", "base_model", "base_fingerprint", "language", "labels", "train_features",
                     "max_length", "adapter_config", "backbone_dtype", "backend")

    def resolve_inputs(self) -> list[str]:
        check_stage_settings(self.s, self.full_model)
        self.name = self.s.name or task_class(self.s.task).name
        self.lang_path, self.lang, self.base_model = _language_adapter(self.s, self.name)
        task = task_class(self.s.task)
        models.check_model_class(task.auto_class, self.base_model, f"the {task.name} task")
        return [self.lang_path]

    def read_data(self) -> None:
        s, tok, cls = self.s, self.tokenizer, task_class(self.s.task)
        train = cls.read(s.train_data, s.train_split, lang=self.lang, max_examples=s.max_train_examples,
                         labels=s.labels)
        labels = list(s.labels) if s.labels else train.labels
        self.task = self.objective = make_task(s.task, pad_id=tok.pad_token_id, labels=labels)
        self.main_metric = self.task.main_metric
        self.max_length = models.max_length_for(self.base_model, s.max_length, default=self.task.default_max_length)
        self.task.check_fits(train.examples, f"{s.train_data} ({s.train_split})")
        self.validation = _validation(s, self.task, self.lang, labels)
        self.val_features = self.task.encode(self.validation, tok, self.max_length, train=False) \
            if self.validation else None
        self.items = self.task.encode(train.examples, tok, self.max_length, train=True)
        log.info("%s: %d training features, %s validation examples", self.name, len(self.items),
                 len(self.validation) if self.validation else "no")

    def digested_data(self):
        return self.items, (None if not self.validation else (self.validation, self.val_features))

    def make_loop(self) -> TrainConfig:
        loop, self.epochs = task_loop(self.s, type(self.task), len(self.items))
        return loop

    def load_model(self):
        return models.wired_model(self.task.auto_class, self.base_model, self.s.backend, **self.task.head_kwargs())

    def wire(self) -> None:
        madx, name = self.madx, self.name
        if self.lang_path:
            runs.load_bundle(madx, self.lang_path, load_as=self.lang, fingerprint=self.fingerprint,
                             model_name=self.base_model)
        madx.add_adapter(name, MadxConfig.task(reduction_factor=self.s.reduction_factor))
        madx.set_active(Stack(self.lang, name) if self.lang_path else name)
        madx.train_adapters(name)
        head = set(self.task.extra_trainable(self.model))
        for n, p in self.model.named_parameters():
            if n in head:
                p.requires_grad_(True)

    def trained_adapters(self) -> list[str]:
        return [self.name] + ([self.lang] if self.lang_path else [])

    def counts(self) -> dict:
        return dict(super().counts(), head_parameters=sum(v.numel() for v in self.madx.head_state_dict().values()))

    def record(self) -> dict:
        s, lang_path, task = self.s, self.lang_path, self.task
        lang_meta = runs.read_bundle_meta(lang_path) if lang_path else {}
        return {"stage": self.kind, "task": task.name, "adapter": self.name,
                "language": self.lang if lang_path else None, "source_language": self.lang,
                "base_model": self.base_model, "base_fingerprint": self.fingerprint,
                "adapter_config": self.madx.configs[self.name].to_dict(),
                "labels": list(task.labels) if task.labels else None,
                "language_adapter": ({"path": lang_path, "spec": s.lang_adapter,
                                      "weights_sha256": lang_meta.get("weights_sha256"),
                                      "invertible": self.madx.invertible_adapter(self.lang) is not None}
                                     if lang_path else None),
                "train_data": s.train_data, "train_features": len(self.items), "max_length": self.max_length,
                "auto_class": task.auto_class, "backbone_dtype": str(self.backbone_dtype or "float32"),
                "backend": s.backend}

    def identity(self, facts: dict) -> dict:
        return dict(super().identity(facts),
                    language_weights_sha256=(facts["language_adapter"] or {}).get("weights_sha256"))

    def evaluation(self):
        if not self.val_features:
            return None
        loop = self.loop
        return lambda: self.task.evaluate(self.model, self.validation, self.val_features,
                                          batch_size=loop.eval_batch_size, device=self.device, bf16=loop.bf16)

    def on_best(self, step: int, metrics: dict) -> None:
        self._save("best", step, metrics)

    def describe(self, counts: dict) -> str:
        name, lang, loop = self.name, self.lang, self.loop
        stack = f"Stack({lang!r}, {name!r})" if self.lang_path else f"{name!r} alone"
        return (f"training task adapter {name!r} ({self.task.name}) on {stack}: "
                f"{counts[f'adapter_parameters[{name}]']:,} parameters + head {counts['head_parameters']:,}, "
                f"{loop.steps} steps of {loop.batch_size}")

    def save(self, result: dict) -> str:
        self._save("last", self.loop.steps, result["final_eval"])
        if not self.val_features:
            self._save("best", self.loop.steps, None)
        best = result["best"]
        return (f"{self.written()} written to {self.s.output_dir}"
                + (f"; best {best['metric']} {best['value']:.4g} at step {best['step']}" if best else ""))

    def written(self) -> str:
        """What ``save`` writes, for its log line."""
        return f"task adapter {self.name!r}"

    def _save(self, sub: str, step: int, metrics: dict | None) -> None:
        runs.write_bundle(self.madx, os.path.join(self.s.output_dir, sub), self.name,
                          dict(self.run_record, step=step, metrics=metrics), with_head=True)


def check_stage_settings(s: TaskAdapterSettings, full_model: bool) -> None:
    """One run of the stage the settings ask for: ``full_finetune`` and ``seeds`` are ``train_task``'s to
    dispatch (``madx train-task``)."""
    if s.full_finetune != full_model:
        wanted = "full-model" if s.full_finetune else "task adapter"
        raise ValueError(f"full_finetune={s.full_finetune} asks for the {wanted} stage: call "
                         "madx_fast.training.train_task (madx train-task)")
    if s.seeds:
        raise ValueError("seeds ask for one run per seed: call madx_fast.training.train_task (madx train-task)")


def train_task_adapter(settings: TaskAdapterSettings | None = None, /, **kwargs) -> dict:
    """Train the task adapter of ``settings`` (a ``TaskAdapterSettings``, or its fields as keywords)."""
    return TaskAdapterStage.train(settings, **kwargs)


def _language_adapter(s: TaskAdapterSettings, name: str) -> tuple[str | None, str | None, str]:
    """``(bundle path, source language, base model)``: the language adapter the task adapter stacks on (None
    for MAD-X -LAD -INV), and the base model (given, or the one the language adapter was trained on)."""
    lang_path, lang, base_model = None, s.lang, s.model
    if s.lang_adapter:
        lang_path = resolve_language_adapter(s.lang, s.lang_adapter, s.model)
        meta, info = runs.read_bundle_meta(lang_path), read_adapter_info(lang_path)
        lang = lang or meta.get("language") or info.name
        check_adapter_name(lang, "language")
        if lang == name:
            raise ValueError(f"the task adapter and the language adapter are both named {name!r}; pass name=...")
        base_model = base_model or meta.get("base_model") or info.base_model
    if not base_model:
        raise ValueError("no base model: pass model=... (or a language adapter that records its base model)")
    return lang_path, lang, base_model


def _validation(s: TaskAdapterSettings, task, lang: str | None, labels) -> list | None:
    """Validation examples: ``validation_data``, else the validation split of ``train_data`` when it has one."""
    spec = s.validation_data
    if spec is None and data.has_split(s.train_data, lang, "validation"):
        spec = s.train_data
    if not spec:
        return None
    examples = type(task).read(spec, s.validation_split, lang=lang, max_examples=s.max_eval_examples,
                               labels=labels).examples
    task.check_fits(examples, f"{spec} ({s.validation_split})")
    return examples


def task_loop(s: TaskAdapterSettings, task_cls, n_features: int) -> tuple[TrainConfig, float | None]:
    """``(loop settings, epochs or None)``. With ``epochs`` (given, or the task's default when neither steps nor
    epochs are: NER 100): ``epochs x batches per epoch`` steps, validated once per epoch; else the steps given
    (TrainConfig's 1000 when none)."""
    epochs = s.epochs or (task_cls.default_epochs if s.config.steps is None else None)
    if not epochs:
        loop = dataclasses.replace(s.config, steps=s.config.steps or TrainConfig().steps)
        loop.check()
        return loop, None
    per_epoch = math.ceil(n_features / s.config.batch_size)
    loop = dataclasses.replace(s.config, steps=max(1, math.ceil(epochs * per_epoch)),
                               eval_every=s.config.eval_every or per_epoch)
    loop.check()
    return loop, epochs
