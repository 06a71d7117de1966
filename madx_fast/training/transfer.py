"""MAD-X stage 3: zero-shot cross-lingual transfer, and its report (CSV, JSON, heatmap PNG).

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

Metrics: seqeval F1 (NER), SQuAD F1 / EM (QA), accuracy (COPA); the report's cells are the main metric in
percent. Everything (adapters, metadata, labels, data of every target) is checked before evaluating.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import time
from typing import Sequence

from .. import files
from ..model import Stack
from . import models, runs
from .data import default_eval_split
from .devices import PeakMemory, pick_device
from .loading import check_same_base, load_task_model, resolve_language_adapter, resolve_task_adapter
from .settings import TRANSFER_SETTINGS, TransferSettings
from .tasks import make_task

log = logging.getLogger("madx_fast.training")


def evaluate_transfer(settings: TransferSettings | None = None, /, **kwargs) -> dict:
    """Evaluate every task adapter on every target language's ``eval_data`` (``{lang}`` expands; e.g.
    ``"wikiann:{lang}"`` or ``"data/{lang}/ner"``) in every setting (a ``TransferSettings``, or its fields as
    keywords). Returns ``{"records": [...]}`` (one per task adapter x target x setting) and, with
    ``output_dir``, writes the report there."""
    s = TransferSettings.build(settings, **kwargs)
    t_start = time.perf_counter()
    if s.output_dir:
        _check_report_dir(s.output_dir)
    plans = [_plan(path, s) for path in s.task_adapters]
    tasks = {p["task"] for p in plans}
    if len(tasks) > 1:
        raise ValueError(f"task adapters of different tasks {sorted(tasks)} cannot share one transfer matrix")
    check_same_base([path for p in plans for path in [p["path"], *p["lang_paths"].values()]])
    device = pick_device(s.device)
    records = []
    for plan in plans:
        records.extend(_evaluate_plan(plan, s, device))
    result = {"records": records, "system": s.system, "task": tasks.pop(), "targets": list(s.targets),
              "settings": list(s.settings), "eval_data": s.eval_data,
              "split": s.split or ",".join(sorted({r["split"] for r in records})),
              "wall_time_s": time.perf_counter() - t_start}
    if s.output_dir:
        write_transfer_report(records, s.output_dir)
    return result


def _plan(path: str, s: TransferSettings) -> dict:
    """Resolve one task adapter and the language adapters its evaluation needs; metadata checks only."""
    plan = resolve_task_adapter(path, s.model)
    bundle, meta = plan["path"], plan["meta"]
    source = meta.get("language") if meta else None
    runs_, needed, seen = [], {}, set()
    for target in s.targets:
        for setting in s.settings:
            if meta and not source:  # trained without a language adapter: evaluated alone
                setting = "none"
            if setting == "source" and not meta:
                raise ValueError(f"{bundle} does not record the source language it was trained on (no "
                                 f"{runs.RUN_META}): the 'source' setting needs a run bundle of madx train-task")
            lang = {"target": target, "source": source, "none": None}[setting]
            if (target, setting) not in seen:
                seen.add((target, setting))
                runs_.append((target, setting, lang))
                if lang:
                    needed[lang] = ""
    for lang in needed:
        where = s.lang_adapters.get(lang)
        if where is None and lang == source and meta.get("language_adapter"):
            recorded = meta["language_adapter"]  # where the run found it; else what it was given (a Hub name)
            gone = not os.path.isdir(recorded["path"]) and recorded.get("spec")
            where = recorded["spec"] if gone else recorded["path"]
        if where is None:
            given = ", ".join(sorted(s.lang_adapters)) or "none"
            raise ValueError(f"no language adapter for {lang!r} (given: {given}); pass one for every target "
                             "language, e.g. --lang-adapter sw=runs/lang-sw")
        needed[lang] = resolve_language_adapter(lang, where, plan["base_model"])
    if source and "source" in s.settings and meta.get("language_adapter"):
        want = meta["language_adapter"].get("weights_sha256")
        have = runs.read_bundle_meta(needed[source]).get("weights_sha256") if source in needed else None
        if want and have and want != have:
            log.warning("the %r language adapter in %s is not the one %s was trained with (weights differ)",
                        source, needed[source], bundle)
    return dict(plan, source=source or meta.get("source_language") or "-", runs=runs_, lang_paths=needed)


def _evaluate_plan(plan: dict, s: TransferSettings, device) -> list[dict]:
    tok = models.load_tokenizer(plan["base_model"], model=plan["base_model"])
    task = make_task(plan["task"], pad_id=tok.pad_token_id, labels=plan["labels"])
    max_length = plan["meta"].get("max_length") or task.default_max_length
    data = {}  # every target's data, checked against the head, before any evaluation
    for target in s.targets:
        split = s.split or default_eval_split(s.eval_data, target)
        examples = type(task).read(s.eval_data, split, lang=target, max_examples=s.max_examples,
                                   labels=plan["labels"]).examples
        task.check_fits(examples, f"{s.eval_data} ({target}, {split})")
        data[target] = (examples, task.encode(examples, tok, max_length, train=False), split)

    model, madx, task_name = load_task_model(plan, task, plan["lang_paths"], s.backend, s.backbone_dtype, device,
                                             s.compile)
    memory = PeakMemory(device)
    records = []
    for target, setting, lang in plan["runs"]:
        examples, features, split = data[target]
        madx.set_active(Stack(lang, task_name) if lang else task_name)
        t0 = time.perf_counter()
        metrics = task.evaluate(model, examples, features, batch_size=s.batch_size, device=device, bf16=s.bf16,
                                graphs=s.cuda_graphs)
        value = metrics[task.main_metric]
        percent = value if task.name == "qa" else 100.0 * value
        rec = {"system": s.system, "task": task.name, "task_adapter": plan["path"], "source": plan["source"],
               "target": target, "setting": setting, "language_adapter": lang, "split": split,
               "metric": task.main_metric,
               "value": percent, "metrics": metrics, "eval_time_s": time.perf_counter() - t0, **memory.read()}
        records.append(rec)
        log.info("%s | %s | source %s -> target %s: %s %.2f", s.system, TRANSFER_SETTINGS[setting], rec["source"], target,
                 task.main_metric, percent)
    del model
    return records


# --------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------
REPORT_FILES = ("transfer_results.json", "transfer_results.csv", "transfer_matrix.csv", "transfer_heatmap.png")


def _check_report_dir(directory: str) -> None:
    clash = [f for f in REPORT_FILES if os.path.exists(os.path.join(directory, f))]
    if clash:
        raise FileExistsError(f"{directory} already holds a transfer report ({', '.join(clash)}); choose another "
                              "--output or remove them")


def row_label(rec: dict) -> str:
    return f"{rec['system']} | {TRANSFER_SETTINGS[rec['setting']]} | src {rec['source']}"


def matrix(records: Sequence[dict]) -> tuple[list[str], list[str], list[list[float | None]]]:
    """Rows (system | setting | source), columns (targets), cells (main metric in percent)."""
    rows, cols = [], []
    for r in records:
        if row_label(r) not in rows:
            rows.append(row_label(r))
        if r["target"] not in cols:
            cols.append(r["target"])
    cells = [[None] * len(cols) for _ in rows]
    for r in records:
        cells[rows.index(row_label(r))][cols.index(r["target"])] = r["value"]
    return rows, cols, cells


def format_table(records: Sequence[dict]) -> str:
    rows, cols, cells = matrix(records)
    if not rows:
        return "(no results)"
    metric = records[0]["metric"]
    width = max(len(r) for r in rows + [f"{metric} (%)"])
    lines = [f"{metric + ' (%)':<{width}}  " + "  ".join(f"{c:>8}" for c in cols)]
    for label, row in zip(rows, cells):
        lines.append(f"{label:<{width}}  " + "  ".join(f"{v:8.2f}" if v is not None else f"{'-':>8}" for v in row))
    return "\n".join(lines)


def write_transfer_report(records: Sequence[dict], output_dir: str, title: str | None = None) -> dict[str, str]:
    """``transfer_results.json`` (every record), ``transfer_results.csv`` (one row per record),
    ``transfer_matrix.csv`` (rows x targets) and ``transfer_heatmap.png``, written as one directory update
    (a reader sees the whole report or none of it; other files in ``output_dir`` are kept)."""
    rows, cols, cells = matrix(records)
    long = io.StringIO()
    writer = csv.writer(long)
    extra = sorted({k for r in records for k, v in r["metrics"].items() if isinstance(v, (int, float))})
    writer.writerow(["system", "task", "source", "target", "setting", "language_adapter", "metric", "value_percent"]
                    + extra)
    for r in records:
        writer.writerow([r["system"], r["task"], r["source"], r["target"], r["setting"], r["language_adapter"] or "",
                         r["metric"], f"{r['value']:.4f}"] + [r["metrics"].get(k, "") for k in extra])
    wide = io.StringIO()
    writer = csv.writer(wide)
    writer.writerow(["row"] + cols)
    for label, row in zip(rows, cells):
        writer.writerow([label] + ["" if v is None else f"{v:.4f}" for v in row])
    metric = records[0]["metric"] if records else ""
    title = title or f"zero-shot transfer, {records[0]['task'] if records else ''} {metric} (%)"

    def build(tmp):
        files.dump_json({"records": list(records), "matrix": {"rows": rows, "columns": cols, "cells": cells}},
                         os.path.join(tmp, "transfer_results.json"))
        for name, text in (("transfer_results.csv", long.getvalue()), ("transfer_matrix.csv", wide.getvalue())):
            with open(os.path.join(tmp, name), "w", encoding="utf-8", newline="") as f:
                f.write(text)
        plot_heatmap(rows, cols, cells, os.path.join(tmp, "transfer_heatmap.png"), title)

    files.replace_directory(output_dir, build, owned=REPORT_FILES)
    return {name: os.path.join(output_dir, name) for name in REPORT_FILES}


def plot_heatmap(rows, cols, cells, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[np.nan if v is None else v for v in row] for row in cells], dtype=float)
    fig, ax = plt.subplots(figsize=(2.0 + 1.1 * len(cols), 1.2 + 0.5 * len(rows)))
    im = ax.imshow(values, cmap="viridis", vmin=0, vmax=max(100.0, float(np.nanmax(values)) if values.size else 100),
                   aspect="auto")
    ax.set_xticks(range(len(cols)), labels=cols)
    ax.set_yticks(range(len(rows)), labels=rows, fontsize=8)
    ax.set_xlabel("target language")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center",
                        color="white" if values[i, j] < 60 else "black", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120, format="png")
    finally:
        plt.close(fig)


__all__ = ["TRANSFER_SETTINGS", "evaluate_transfer", "format_table", "matrix", "write_transfer_report"]
