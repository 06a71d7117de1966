"""Trained adapters for evaluation and inference (``transfer``, ``predict``): a task adapter and language
adapters resolved from what the user names (run directories, bundles, adapter directories, Hub names) to
bundles, checked to share one base model, and the task model built from them.

    plan = resolve_task_adapter("runs/ner-en")              # {"path", "meta", "task", "labels", "base_model", ...}
    langs = {"sw": resolve_language_adapter("sw", "runs/lang-sw", plan["base_model"])}
    check_same_base([plan["path"], *langs.values()])
    model, madx, task_name = load_task_model(plan, task, langs, backend, "auto", device)

A language may be served by an ensemble of others' adapters (``qu=avg:es,pt``, ``qu=emea:es,pt``;
``SYSTEM:qu=...`` for one system's task adapters: ``ensembles_for``; ``ensemble.py`` runs them): its members
are resolved and loaded instead.

Everything here reads metadata first and refuses what does not fit before a model is loaded.
"""
from __future__ import annotations

from ..model.adapter_files import read_adapter_info
from . import models, runs
from .ensemble import check_ensembles, lang_adapter_key
from .tasks import task_class, task_for_head


def resolve_task_adapter(path: str, model: str | None = None) -> dict:
    """A task adapter (run directory, bundle, ``save_adapter(with_head=True)`` directory or AdapterHub directory
    with its head) resolved to ``{"path": bundle, "meta": run record or {}, "task", "labels", "base_model",
    "auto_class": the head's HF class}``; ``model`` overrides the recorded base model. Metadata checks only."""
    bundle = runs.find_bundle(path, prefer=("best", "last"), model_name=model)
    meta = runs.read_bundle_meta(bundle)
    info = read_adapter_info(bundle)
    if meta.get("stage") not in (None, "task"):
        raise runs.BundleError(f"{bundle} holds a {meta['stage']} adapter, not a task adapter")
    if info.head is None:
        raise runs.BundleError(f"{bundle} has no task head (save it with save_adapter(..., with_head=True))")
    task = meta.get("task") or task_for_head(info.head.model_class)
    if task is None:
        raise runs.BundleError(f"{bundle}: a head of {info.head.model_class} is not one of the tasks "
                               "madx_fast evaluates (token classification, question answering, multiple choice)")
    labels = info.head.labels or meta.get("labels")
    if task_class(task).name == "ner" and not labels:
        raise runs.BundleError(f"{bundle}: the head records no label names, which NER evaluation needs")
    base_model = model or meta.get("base_model") or info.base_model
    if not base_model:
        raise ValueError(f"{bundle} does not record its base model: pass model=... (--model)")
    return {"path": bundle, "meta": meta, "task": task_class(task).name, "labels": labels, "base_model": base_model,
            "auto_class": info.head.model_class}


def resolve_language_adapter(lang: str | None, where: str, base_model: str | None = None) -> str:
    """The bundle of language ``lang``'s adapter (None: a language still to be read from it) from a run
    directory, bundle, adapter directory or Hub name ``where`` (AdapterHub's short names depend on
    ``base_model``); a bundle of another stage is refused."""
    found = runs.find_bundle(where, prefer=("adapter",), model_name=base_model)
    stage = runs.read_bundle_meta(found).get("stage")
    if stage not in (None, "language"):
        raise runs.BundleError(f"{found}{f' (for {lang!r})' if lang else ''} holds a {stage} adapter, not a "
                               "language adapter")
    return found


def ensembles_for(langs, lang_adapters: dict[str, str], system: str | None = None) -> dict:
    """The ensembles (``ensemble.EnsembleSpec``) serving languages among ``langs`` for the task adapters of
    ``system``, from the ``--lang-adapter`` entries (``qu=avg:es,pt``, ``SYSTEM:qu=avg:es,pt``: the entry
    ``lang_adapter_key`` picks); their members are to be resolved like any language adapter of ``system``."""
    ensembles = check_ensembles(lang_adapters)
    keys = {lang: lang_adapter_key(lang, system, lang_adapters) for lang in langs}
    return {lang: ensembles[key] for lang, key in keys.items() if key in ensembles}


def check_same_base(paths) -> None:
    """Refuse adapter bundles whose run records name different base models (by weights fingerprint)."""
    prints = {path: runs.read_bundle_meta(path).get("base_fingerprint") for path in paths}
    distinct = {v for v in prints.values() if v}
    if len(distinct) > 1:
        listing = "; ".join(f"{p}: {v}" for p, v in prints.items() if v)
        raise runs.BundleError(f"these adapters were trained on different base models ({listing})")


def load_task_model(plan: dict, task, lang_paths: dict[str, str], backend, backbone_dtype, device, compile=None):
    """``(model, madx, task adapter name)``: the base model of a ``resolve_task_adapter`` plan with the task
    adapter and its head, and every language adapter of ``lang_paths`` (loaded as its language), checked
    against the base model's fingerprint, cast, placed on ``device`` and, with ``compile``, its encoder
    compiled (``models.compile_encoder``)."""
    model, madx, fingerprint = models.wired_model(_auto_class(plan, task), plan["base_model"], backend,
                                                 **task.head_kwargs())
    task_name, _ = runs.load_bundle(madx, plan["path"], fingerprint=fingerprint, model_name=plan["base_model"],
                                    with_head=True)
    for lang, path in lang_paths.items():
        if lang == task_name:
            raise ValueError(f"language {lang!r} has the task adapter's name")
        runs.load_bundle(madx, path, load_as=lang, fingerprint=fingerprint, model_name=plan["base_model"])
    models.place(model, madx, backbone_dtype, device)
    models.compile_encoder(model, compile)
    return model, madx, task_name


def _auto_class(plan: dict, task) -> str:
    """The HF class to build: the head's own class when the adapter records one (so that its parameter
    names match), else the task's Auto class."""
    cls = plan.get("auto_class")
    return cls if cls and cls.startswith(("XLMRoberta", "Roberta", "Bert")) else task.auto_class


__all__ = ["check_same_base", "ensembles_for", "load_task_model", "resolve_language_adapter", "resolve_task_adapter"]
