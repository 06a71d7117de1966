"""MAD-X stage 3: zero-shot cross-lingual transfer of task adapters and of fully fine-tuned models, and its
report (``report.py``: CSV, JSON, Markdown, heatmaps).

For a task adapter trained in ``Stack(source, task)`` and each target language, the source language adapter
(with its invertible adapter) is replaced by the target's and the task adapter and head are kept:
``Stack(target, task)``. Settings (``settings=``) evaluate other configurations on the same data:

    "target"   Stack(target, task)   MAD-X zero-shot transfer (the default)
    "source"   Stack(source, task)   the source language adapter left in place
    "none"     task adapter alone    no language adapter at evaluation time

A task adapter is a run directory or bundle of ``madx train-task``, or any adapter directory saved with its
head: ``madx.save_adapter(dir, name, with_head=True)``, or an AdapterHub directory (``save_adapter`` there,
static or flex head). Its task, label names and base model come from the bundle's run record or, for a plain
adapter directory, from its files (head class, label names, base model name). A task adapter trained without
a language adapter (MAD-X -LAD -INV) is evaluated alone ("none") on every target; a plain adapter directory
does not record its source language, so its "source" setting needs the run record.

Systems. Every task adapter belongs to a system, a row of the report: ``SYSTEM=DIR`` (``--task-adapter
mad-x-inv=runs/ner-en-noinv``), else ``--system``. Language adapters are given per language, ``LANG=DIR``, and
per system and language, ``SYSTEM:LANG=DIR``, which the task adapters of that system use first: several
language adapters for one language (with and without invertible adapters, say) in one call. ``{lang}`` in
place of the language (``{lang}=runs/lang-{lang}``) stands for every language.

Full models (``--full-model [SYSTEM=]DIR``): a model of ``madx train-task --full-finetune`` is evaluated as it
is on every target, as the system XLM-R (the base model's family), XLM-R MLM-SRC when it started from a model
trained by masked LM on its source language, or XLM-R MLM-TRG when on another language, which is then its
only target. A directory of ``seed-N`` runs (``--seeds``) stands for each of them, for adapters and models
alike: the report averages them.

A target language without an adapter of its own is served by an ensemble of other languages' adapters
(``--lang-adapter qu=avg:es,pt`` or ``qu=emea:es,pt``; ``madx_fast.training.ensemble``): its "target" setting
then runs ``Stack(Average(es, pt), task)``, with EMEA's weights tuned on every evaluation batch. The members
are found as any language adapter of the system is; ``mad-x:qu=avg:es,pt`` serves the system mad-x only.

Metrics: seqeval F1 (NER), SQuAD F1 / EM (QA), accuracy (COPA); the report's cells are the main metric in
percent. Every record carries the base model's weights fingerprint and a fingerprint of the examples
evaluated, which ``madx report`` compares before it merges runs. Everything (adapters, models, metadata,
labels, data of every target) is checked before evaluating.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Sequence

from .. import files
from ..model import Stack
from . import model_dirs, models, runs
from .data import default_eval_split
from .devices import PeakMemory, pick_device
from .ensemble import ensemble_block, entropy_minimisation, lang_adapter_key
from .loading import check_same_base, ensembles_for, load_task_model, resolve_language_adapter, resolve_task_adapter
from .report import build_report, check_report_dir, write_report
from .seeds import seed_runs
from .settings import TRANSFER_SETTINGS, TransferSettings, split_system
from .tasks import make_task

log = logging.getLogger("madx_fast.training")

# the name of a full model's system: its model family, as the paper names its baseline (XLM-R)
MODEL_FAMILIES = {"xlm-roberta": "XLM-R", "bert": "mBERT", "roberta": "RoBERTa"}


def evaluate_transfer(settings: TransferSettings | None = None, /, **kwargs) -> dict:
    """Evaluate every task adapter and full model on every target language's ``eval_data`` (``{lang}``
    expands; e.g. ``"wikiann:{lang}"`` or ``"data/{lang}/ner"``) in every setting (a ``TransferSettings``, or
    its fields as keywords). Returns ``{"records": [...]}`` (one per system x task adapter or model x target x
    setting) and, with ``output_dir``, writes the report there."""
    s = TransferSettings.build(settings, **kwargs)
    t_start = time.perf_counter()
    if s.output_dir:
        check_report_dir(s.output_dir)
    plans = _plans(s)
    tasks = {p["task"] for p in plans}
    if len(tasks) > 1:
        raise ValueError(f"task adapters / models of different tasks {sorted(tasks)} cannot share one transfer "
                         "matrix")
    check_same_base([path for p in plans if p["kind"] == "adapters"
                     for path in [p["path"], *p["lang_paths"].values()]])
    _check_one_root(plans)
    device = pick_device(s.device)
    records = []
    for plan in plans:
        records.extend(_evaluate_plan(plan, s, device) if plan["kind"] == "adapters" else
                       _evaluate_full_model(plan, s, device))
    result = {"records": records, "systems": list(dict.fromkeys(p["system"] for p in plans)), "task": tasks.pop(),
              "targets": list(s.targets), "settings": list(s.settings), "eval_data": s.eval_data,
              "split": s.split or ",".join(sorted({r["split"] for r in records})),
              "wall_time_s": time.perf_counter() - t_start}
    if s.output_dir:
        write_transfer_report(records, s.output_dir)
    return result


def write_transfer_report(records: Sequence[dict], output_dir: str, title: str | None = None,
                          baseline: str | None = None) -> dict[str, str]:
    """The report of ``records`` (``report.build_report``) written to ``output_dir`` (``report.REPORT_FILES``)."""
    return write_report(records, build_report(records, baseline), output_dir, title)


# --------------------------------------------------------------------------------------------------------
# plans: what each system evaluates, resolved and checked from metadata before any model is loaded
# --------------------------------------------------------------------------------------------------------
def _plans(s: TransferSettings) -> list[dict]:
    plans = []
    for item in s.task_adapters:
        system, spec = split_system(item)
        for path in seed_runs(spec):
            if model_dirs.is_full_model_run(path):
                raise ValueError(f"{path} is a fully fine-tuned model, not a task adapter: pass it with --full-model")
            plans.append(_plan(path, system or s.system, s))
    for item in s.full_models:
        system, spec = split_system(item)
        plans.extend(_full_plan(path, system, s) for path in seed_runs(spec))
    return plans


def _plan(path: str, system: str, s: TransferSettings) -> dict:
    """Resolve one task adapter and the language adapters its evaluation needs; metadata checks only."""
    plan = resolve_task_adapter(path, s.model)
    bundle, meta = plan["path"], plan["meta"]
    source = meta.get("language") if meta else None
    runs_, needed = [], {}
    for target in s.targets:
        for setting in s.settings:
            if meta and not source:  # trained without a language adapter: evaluated alone
                setting = "none"
            if setting == "source" and not meta:
                raise ValueError(f"{bundle} does not record the source language it was trained on (no "
                                 f"{runs.RUN_META}): the 'source' setting needs a run bundle of madx train-task")
            lang = {"target": target, "source": source, "none": None}[setting]
            if (target, setting, lang) not in runs_:
                runs_.append((target, setting, lang))
                if lang:
                    needed[lang] = ""
    ensembles = ensembles_for(needed, s.lang_adapters, system)  # a language served by others: load those instead
    for lang in list(needed):
        if lang in ensembles:
            del needed[lang]
            needed.update({m: "" for m in ensembles[lang].members if m not in needed})
    for lang in needed:
        needed[lang] = _language_adapter(lang, system, source, meta, plan["base_model"], s)
    if source and "source" in s.settings and meta.get("language_adapter"):
        want = meta["language_adapter"].get("weights_sha256")
        have = runs.read_bundle_meta(needed[source]).get("weights_sha256") if source in needed else None
        if want and have and want != have:
            log.warning("the %r language adapter in %s is not the one %s was trained with (weights differ)",
                        source, needed[source], bundle)
    return dict(plan, kind="adapters", system=system, source=source or meta.get("source_language") or "-",
                trained_with_language_adapter=bool(source) or not meta, runs=runs_, lang_paths=needed,
                seed=_seed(bundle, meta), run_id=meta.get("weights_sha256") or bundle,
                base_fingerprint=meta.get("base_fingerprint"), ensembles=ensembles)


def _language_adapter(lang: str, system: str, source, meta: dict, base_model: str, s: TransferSettings) -> str:
    """The bundle of ``lang``'s adapter for ``system``: ``SYSTEM:LANG=``, else ``LANG=``, else a pattern for
    every language (``SYSTEM:{lang}=``, ``{lang}=``, its ``{lang}`` expanded), else (the source) the one the
    task adapter was trained on."""
    key = lang_adapter_key(lang, system, s.lang_adapters)
    where = s.lang_adapters[key].replace("{lang}", lang) if key else None
    if where is None and lang == source and meta.get("language_adapter"):
        recorded = meta["language_adapter"]  # where the run found it; else what it was given (a Hub name)
        gone = not os.path.isdir(recorded["path"]) and recorded.get("spec")
        where = recorded["spec"] if gone else recorded["path"]
    if where is None:
        given = ", ".join(sorted(s.lang_adapters)) or "none"
        raise ValueError(f"no language adapter for {lang!r} (system {system!r}; given: {given}); pass one for every "
                         "target language, e.g. --lang-adapter sw=runs/lang-sw")
    return resolve_language_adapter(lang, where, base_model)


def _full_plan(path: str, system: str | None, s: TransferSettings) -> dict:
    """A fully fine-tuned model: its task, labels, source, system and targets, from its run record."""
    found, meta = model_dirs.find_model_dir(path, prefer=("best", "last"))
    if meta.get("stage") != "full-task":
        raise runs.BundleError(f"{found} is not a model of madx train-task --full-finetune (its run record says "
                               f"stage {meta.get('stage')!r})")
    source, init = meta.get("source_language") or "-", (meta.get("init_model") or {}).get("language")
    model_type = models.load_config(found).model_type
    family = MODEL_FAMILIES.get(model_type, model_type)
    role = None if not init else "MLM-SRC" if init == source else "MLM-TRG"
    targets = list(s.targets)
    if role == "MLM-TRG":
        if init not in s.targets:
            raise ValueError(f"{found} was adapted to {init!r} by masked LM (MLM-TRG), which is not among the targets "
                             f"{', '.join(s.targets)}")
        targets = [init]
    return {"kind": "full", "path": found, "meta": meta, "task": meta["task"], "labels": meta.get("labels"),
            "base_model": meta.get("base_model"), "base_fingerprint": meta.get("base_fingerprint"),
            "auto_class": meta.get("auto_class"), "source": source, "init_language": init,
            "system": system or (family if role is None else f"{family} {role}"), "targets": targets,
            "seed": _seed(found, meta), "run_id": meta.get("weights_sha256") or found}


def _seed(path: str, meta: dict) -> int | None:
    """The seed a run trained with: its record's, else its run directory's ``run.json`` (older bundles)."""
    if meta.get("seed") is not None:
        return meta["seed"]
    summary = os.path.join(os.path.dirname(path), runs.RUN_SUMMARY)
    if meta and os.path.isfile(summary):
        return (files.read_json(summary).get("config") or {}).get("seed")
    return None


def _check_one_root(plans: list[dict]) -> None:
    """Adapters and full models of one call descend from one pretrained model (their base fingerprints)."""
    prints = {p["base_fingerprint"]: p["path"] for p in plans if p.get("base_fingerprint")}
    if len(prints) > 1:
        listing = "; ".join(f"{path}: {fp}" for fp, path in prints.items())
        raise runs.BundleError(f"these adapters and models descend from different base models ({listing})")


# --------------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------------
def examples_fingerprint(examples) -> str:
    """16 hex digits of a sha256 over the examples evaluated (their words, labels, contexts, answers...):
    two runs scored the same data exactly when their fingerprints agree."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(repr(ex).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def _target_data(plan: dict, task, tok, targets, s: TransferSettings, max_length: int) -> dict:
    """Every target's examples, features, split and data fingerprint, checked against the head before any
    evaluation."""
    data = {}
    for target in targets:
        split = s.split or default_eval_split(s.eval_data, target)
        examples = type(task).read(s.eval_data, split, lang=target, max_examples=s.max_examples,
                                   labels=plan["labels"]).examples
        task.check_fits(examples, f"{s.eval_data} ({target}, {split})")
        data[target] = (examples, task.encode(examples, tok, max_length, train=False), split,
                        examples_fingerprint(examples))
    return data


def _record(plan: dict, task, target: str, setting, lang, data: tuple, metrics: dict, seconds: float,
            memory: PeakMemory, **extra) -> dict:
    value = metrics[task.main_metric]
    percent = value if task.name == "qa" else 100.0 * value
    rec = {"system": plan["system"], "task": task.name, "model_kind": plan["kind"], "source": plan["source"],
           "target": target, "setting": setting, "language_adapter": lang, "split": data[2],
           "metric": task.main_metric, "value": percent, "metrics": metrics, "eval_time_s": seconds,
           "base_model": plan["base_model"], "base_fingerprint": plan["base_fingerprint"],
           "eval_fingerprint": data[3], "seed": plan["seed"], "run_id": plan["run_id"], **extra, **memory.read()}
    log.info("%s | %s | source %s -> target %s: %s %.2f", plan["system"],
             TRANSFER_SETTINGS.get(setting, "full model"), rec["source"], target, task.main_metric, percent)
    return rec


def _evaluate_plan(plan: dict, s: TransferSettings, device) -> list[dict]:
    tok = models.load_tokenizer(plan["base_model"], model=plan["base_model"])
    task = make_task(plan["task"], pad_id=tok.pad_token_id, labels=plan["labels"])
    max_length = plan["meta"].get("max_length") or task.default_max_length
    data = _target_data(plan, task, tok, s.targets, s, max_length)
    model, madx, task_name = load_task_model(plan, task, plan["lang_paths"], s.backend, s.backbone_dtype, device,
                                             s.compile)
    memory = PeakMemory(device)
    records = []
    for target, setting, lang in plan["runs"]:
        examples, features = data[target][:2]
        spec = plan["ensembles"].get(lang)
        madx.set_active(Stack(ensemble_block(lang, spec, device) if spec else lang, task_name) if lang else task_name)
        t0 = time.perf_counter()
        with entropy_minimisation(model, madx, s.emea_steps, s.emea_lr):  # acts on emea: ensembles only
            metrics = task.evaluate(model, examples, features, batch_size=s.batch_size, device=device, bf16=s.bf16,
                                    graphs=s.cuda_graphs)
        inv_of = spec.members[0] if spec else lang  # an Average runs its first member's invertible adapter
        records.append(_record(plan, task, target, setting, str(spec) if spec else lang, data[target], metrics,
                               time.perf_counter() - t0, memory, task_adapter=plan["path"], model=None,
                               trained_with_language_adapter=plan["trained_with_language_adapter"],
                               invertible=madx.invertible_adapter(inv_of) is not None if lang else None,
                               init_language=None))
    del model
    return records


def _evaluate_full_model(plan: dict, s: TransferSettings, device) -> list[dict]:
    """A fully fine-tuned model on its targets, in float32 (``--bf16``: autocast)."""
    tok = models.load_tokenizer(plan["path"], model=plan["path"])
    task = make_task(plan["task"], pad_id=tok.pad_token_id, labels=plan["labels"])
    data = _target_data(plan, task, tok, plan["targets"], s, plan["meta"].get("max_length") or task.default_max_length)
    model = models.load_model(plan["auto_class"] or task.auto_class, plan["path"])
    model.to(device)
    models.compile_encoder(model, s.compile)
    memory = PeakMemory(device)
    records = []
    for target in plan["targets"]:
        examples, features = data[target][:2]
        t0 = time.perf_counter()
        metrics = task.evaluate(model, examples, features, batch_size=s.batch_size, device=device, bf16=s.bf16,
                                graphs=s.cuda_graphs)
        records.append(_record(plan, task, target, None, None, data[target], metrics, time.perf_counter() - t0,
                               memory, task_adapter=None, model=plan["path"], trained_with_language_adapter=False,
                               invertible=None, init_language=plan["init_language"]))
    del model
    return records


__all__ = ["MODEL_FAMILIES", "TRANSFER_SETTINGS", "evaluate_transfer", "examples_fingerprint",
           "write_transfer_report"]
