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
import time

from .. import files
from ..model import MadxConfig, Stack, check_adapter_name
from ..model.adapter_files import read_adapter_info
from . import data, models, runs
from .devices import pick_device
from .distributed import init_distributed
from .settings import TaskAdapterSettings, TrainConfig
from .tasks import make_task, task_class
from .trainer import Trainer, seed_everything

log = logging.getLogger("madx_fast.training")


def train_task_adapter(settings: TaskAdapterSettings | None = None, /, **kwargs) -> dict:
    """Train the task adapter of ``settings`` (a ``TaskAdapterSettings``, or its fields as keywords)."""
    s = TaskAdapterSettings.build(settings, **kwargs)
    t_start = time.perf_counter()
    name = s.name or task_class(s.task).name
    lang_path, lang, base_model = _language_adapter(s, name)
    runs.check_output_dir(s.output_dir, resume=s.resume, overwrite=s.overwrite, inputs=[lang_path])
    procs = init_distributed(s.config.device)
    s.config.check_split(procs.world)
    device = pick_device(s.config.device, procs.local_rank)

    tok = models.load_tokenizer(s.tokenizer or base_model, model=base_model)
    train, labels = _read(s, lang)
    task = make_task(s.task, pad_id=tok.pad_token_id, labels=labels)
    max_length = models.max_length_for(base_model, s.max_length, default=task.default_max_length)
    task.check_fits(train.examples, f"{s.train_data} ({s.train_split})")
    validation = _validation(s, task, lang, labels)
    val_features = task.encode(validation, tok, max_length, train=False) if validation else None
    features = task.encode(train.examples, tok, max_length, train=True)
    loop, epochs = _loop(s, type(task), len(features))
    log.info("%s: %d training features, %s validation examples", name, len(features),
             len(validation) if validation else "no")

    seed_everything(loop.seed)
    model, madx, fingerprint = models.wired_model(task.auto_class, base_model, s.backend, **task.head_kwargs())
    if lang_path:
        runs.load_bundle(madx, lang_path, load_as=lang, fingerprint=fingerprint, model_name=base_model)
    madx.add_adapter(name, MadxConfig.task(reduction_factor=s.reduction_factor))
    madx.set_active(Stack(lang, name) if lang_path else name)
    madx.train_adapters(name)
    for n, p in model.named_parameters():
        if n in set(task.extra_trainable(model)):
            p.requires_grad_(True)
    dtype = models.place(model, madx, s.backbone_dtype, device)
    models.compile_encoder(model, s.config.compile)
    runs.prepare_output(s.output_dir, resume=s.resume, overwrite=s.overwrite, main=procs.main)

    record = _record(s, task, name, lang, lang_path, base_model, fingerprint, madx, max_length, len(features), dtype)
    save = lambda sub, step, metrics: runs.write_bundle(  # noqa: E731
        madx, os.path.join(s.output_dir, sub), name, dict(record, step=step, metrics=metrics), with_head=True)
    evaluate = (lambda: task.evaluate(model, validation, val_features, batch_size=loop.eval_batch_size,  # noqa: E731
                                      device=device, bf16=loop.bf16)) if val_features else None
    counts = models.param_counts(madx, [name] + ([lang] if lang_path else []))
    counts["head_parameters"] = sum(v.numel() for v in madx.head_state_dict().values())
    log.info("training task adapter %r (%s) on %s: %s parameters + head %s, %d steps of %d", name, task.name,
             f"Stack({lang!r}, {name!r})" if lang_path else f"{name!r} alone",
             f"{counts[f'adapter_parameters[{name}]']:,}", f"{counts['head_parameters']:,}", loop.steps,
             loop.batch_size)
    trainer = Trainer(model, task, features, loop, s.output_dir, evaluate=evaluate, main_metric=task.main_metric,
                      on_best=lambda step, metrics: save("best", step, metrics), identity=_identity(record), procs=procs,
                      device=device)
    result = trainer.run(resume=s.resume)

    summary = {**record, "settings": s.to_dict(), "config": dataclasses.asdict(loop), "epochs": epochs,
               **counts, **result}
    if procs.main:
        save("last", loop.steps, result["final_eval"])
        if not val_features:
            save("best", loop.steps, None)
        summary["wall_time_s"] = time.perf_counter() - t_start
        files.write_json(os.path.join(s.output_dir, runs.RUN_SUMMARY), summary)
        best = result["best"]
        log.info("task adapter %r written to %s%s (train %.1fs, peak memory %.0f MB)", name, s.output_dir,
                 f"; best {best['metric']} {best['value']:.4g} at step {best['step']}" if best else "",
                 result["train_time_s"], result["peak_memory_mb"])
    procs.barrier()
    return summary


def _language_adapter(s: TaskAdapterSettings, name: str) -> tuple[str | None, str | None, str]:
    """``(bundle path, source language, base model)``: the language adapter the task adapter stacks on (None
    for MAD-X -LAD -INV), and the base model (given, or the one the language adapter was trained on)."""
    lang_path, lang, base_model = None, s.lang, s.model
    if s.lang_adapter:
        lang_path = runs.find_bundle(s.lang_adapter, prefer=("adapter",), model_name=s.model)
        meta = runs.read_bundle_meta(lang_path)
        if meta.get("stage") not in (None, "language"):
            raise runs.BundleError(f"{lang_path} holds a {meta.get('stage')} adapter, not a language adapter")
        info = read_adapter_info(lang_path)
        lang = lang or meta.get("language") or info.name
        check_adapter_name(lang, "language")
        if lang == name:
            raise ValueError(f"the task adapter and the language adapter are both named {name!r}; pass name=...")
        base_model = base_model or meta.get("base_model") or info.base_model
    if not base_model:
        raise ValueError("no base model: pass model=... (or a language adapter that records its base model)")
    return lang_path, lang, base_model


def _read(s: TaskAdapterSettings, lang: str | None):
    """The training data, and the head's label names (given, or declared by the data)."""
    cls = task_class(s.task)
    train = cls.read(s.train_data, s.train_split, lang=lang, max_examples=s.max_train_examples, labels=s.labels)
    return train, (list(s.labels) if s.labels else train.labels)


def _validation(s: TaskAdapterSettings, task, lang: str | None, labels) -> list | None:
    """Validation examples: ``validation_data``, else the validation split of ``train_data`` when it has one."""
    spec = s.validation_data if s.validation_data is not None else (s.train_data if _has_splits(s.train_data, lang)
                                                                    else None)
    if not spec:
        return None
    examples = type(task).read(spec, s.validation_split, lang=lang, max_examples=s.max_eval_examples,
                               labels=labels).examples
    task.check_fits(examples, f"{spec} ({s.validation_split})")
    return examples


def _has_splits(spec: str, lang: str | None) -> bool:
    """A dataset name or a directory has a validation split to find; a single file does not."""
    try:
        source = data.resolve_spec(spec, lang)
    except (FileNotFoundError, data.DataError):
        return False
    if source.kind == "hf":
        return source.known is None or "validation" in source.known.splits
    if not os.path.isdir(source.path):
        return False
    try:
        data.split_file(source.path, "validation")
    except (FileNotFoundError, data.DataError):
        return False
    return True


def _loop(s: TaskAdapterSettings, task_cls, n_features: int):
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


def _record(s, task, name, lang, lang_path, base_model, fingerprint, madx, max_length, n_features, dtype) -> dict:
    """The run's facts, under the names run.json, the bundles and the checkpoint share."""
    lang_meta = runs.read_bundle_meta(lang_path) if lang_path else {}
    return {"stage": "task", "task": task.name, "adapter": name, "language": lang if lang_path else None,
            "source_language": lang, "base_model": base_model, "base_fingerprint": fingerprint,
            "adapter_config": madx.configs[name].to_dict(), "labels": list(task.labels) if task.labels else None,
            "language_adapter": ({"path": lang_path, "spec": s.lang_adapter,
                                  "weights_sha256": lang_meta.get("weights_sha256"),
                                  "invertible": madx.invertible_adapter(lang) is not None} if lang_path else None),
            "train_data": s.train_data, "train_features": n_features, "max_length": max_length,
            "auto_class": task.auto_class, "backbone_dtype": str(dtype or "float32"), "backend": s.backend}


def _identity(record: dict) -> dict:
    keys = ("stage", "task", "base_model", "base_fingerprint", "language", "labels", "train_features", "max_length",
            "adapter_config", "backbone_dtype", "backend")
    out = {k: record[k] for k in keys}
    out["language_weights_sha256"] = (record["language_adapter"] or {}).get("weights_sha256")
    return out
