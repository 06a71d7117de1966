"""MAD-X stage 3: zero-shot cross-lingual transfer, and its report (CSV, JSON, heatmap PNG).

For a task adapter trained in ``Stack(source, task)`` and each target language, the source language adapter
(with its invertible adapter) is replaced by the target's and the task adapter and head are kept:
``Stack(target, task)``. Settings (``settings=``) evaluate other configurations on the same data:

    "target"   Stack(target, task)   MAD-X zero-shot transfer (the default)
    "source"   Stack(source, task)   the source language adapter left in place
    "none"     task adapter alone    no language adapter at evaluation time

A task adapter trained without a language adapter (MAD-X -LAD -INV) is evaluated alone ("none") on every
target. MAD-X -INV is a system whose language adapters were trained with ``invertible=False``: evaluate it
with its own task and language adapters and a ``system`` name, and merge the records into one report.

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

from . import artifacts
from .tasks import get_task
from .trainer import PeakMemory, pick_device

log = logging.getLogger("madx_fast.training")

SETTINGS = {"target": "Stack(target, task)", "source": "Stack(source, task)", "none": "task adapter alone"}


def evaluate_transfer(*, task_adapters: Sequence[str], lang_adapters: dict[str, str], targets: Sequence[str],
                      eval_data: str, split: str = "test", settings: Sequence[str] = ("target",),
                      system: str = "MAD-X", model: str | None = None, batch_size: int = 32,
                      max_examples: int | None = None, device: str | None = None, bf16: bool = False,
                      backend: str | None = None, backbone_dtype: str | None = "auto",
                      cuda_graphs: bool = False, output_dir: str | None = None) -> dict:
    """Evaluate every task adapter (bundle or run directory) on every target language's ``eval_data``
    (``{lang}`` expands; e.g. ``"wikiann:{lang}"`` or ``"data/{lang}/ner"``) in every setting.

    ``lang_adapters`` maps language -> adapter directory; a task adapter's source language adapter is taken
    from there or, if absent, from the path recorded when the task adapter was trained. Returns
    ``{"records": [...]}`` (one per task adapter x target x setting) and, with ``output_dir``, writes the
    report there. ``backbone_dtype`` as in training ("auto": bfloat16 on a GPU, float32 elsewhere);
    ``cuda_graphs`` replays each evaluation forward from CUDA graphs (NER, QA; ``madx_fast.graphs``)."""
    from .stages import backbone_dtype_for
    t_start = time.perf_counter()
    backbone_dtype_for(backbone_dtype)  # a bad name fails before any work
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or not settings:
        raise ValueError(f"unknown transfer setting(s) {unknown}; choose from {sorted(SETTINGS)}")
    if not targets:
        raise ValueError("no target languages")
    if output_dir:
        _check_report_dir(output_dir)
    plans = [_plan(path, lang_adapters, targets, settings) for path in task_adapters]
    if not plans:
        raise ValueError("no task adapters to evaluate")
    kinds = {p["meta"]["task"] for p in plans}
    if len(kinds) > 1:
        raise ValueError(f"task adapters of different tasks {sorted(kinds)} cannot share one transfer matrix")
    _check_same_base(plans, model)

    task = get_task(kinds.pop())
    dev = pick_device(device, _single())
    dtype = backbone_dtype_for(backbone_dtype, dev)
    records = []
    for plan in plans:
        records.extend(_evaluate_plan(plan, task, targets, eval_data, split, system, model, batch_size,
                                      max_examples, dev, bf16, backend, dtype, cuda_graphs))
    result = {"records": records, "system": system, "task": task.name, "targets": list(targets),
              "settings": list(settings), "eval_data": eval_data, "split": split,
              "wall_time_s": time.perf_counter() - t_start}
    if output_dir:
        write_transfer_report(records, output_dir)
    return result


def _single():
    from .trainer import Dist
    return Dist()


def _plan(path: str, lang_adapters: dict, targets, settings) -> dict:
    """Resolve one task adapter and the language adapters its evaluation needs; metadata checks only."""
    bundle = artifacts.find_bundle(path, prefer=("best", "last"))
    meta = artifacts.read_bundle_meta(bundle)
    if meta.get("kind") != "task":
        raise artifacts.BundleError(f"{bundle} is not a task adapter trained by madx_fast (no task metadata in "
                                    f"{artifacts.RUN_META})")
    if not meta.get("has_head"):
        raise artifacts.BundleError(f"{bundle} has no task head")
    source = meta.get("language")
    needed: dict[str, str] = {}
    runs, seen = [], set()
    for target in targets:
        for setting in settings:
            if not source:  # trained without a language adapter: evaluated alone
                setting = "none"
            lang = {"target": target, "source": source, "none": None}[setting]
            if (target, setting) not in seen:
                seen.add((target, setting))
                runs.append((target, setting, lang))
                if lang:
                    needed[lang] = ""
    for lang in needed:
        where = lang_adapters.get(lang)
        if where is None and lang == source and meta.get("language_adapter"):
            where = meta["language_adapter"]["path"]
        if where is None:
            given = ", ".join(sorted(lang_adapters)) or "none"
            raise ValueError(f"no language adapter for {lang!r} (given: {given}); pass one for every target "
                             "language, e.g. --lang-adapter sw=runs/lang-sw")
        found = artifacts.find_bundle(where, prefer=("adapter",))
        lmeta = artifacts.read_bundle_meta(found)
        if lmeta.get("kind") not in (None, "language"):
            raise artifacts.BundleError(f"{found} (for {lang!r}) holds a {lmeta.get('kind')} adapter, not a "
                                        "language adapter")
        needed[lang] = found
    if source and "source" in settings and meta.get("language_adapter"):
        want = meta["language_adapter"].get("weights_sha256")
        have = artifacts.read_bundle_meta(needed[source]).get("weights_sha256") if source in needed else None
        if want and have and want != have:
            log.warning("the %r language adapter in %s is not the one %s was trained with (weights differ)",
                        source, needed[source], bundle)
    label = source or meta.get("source_language") or "-"
    return {"path": bundle, "meta": meta, "source": label, "runs": runs, "lang_paths": needed}


def _check_same_base(plans, model):
    prints = {}
    for plan in plans:
        prints[plan["path"]] = plan["meta"].get("base_fingerprint")
        for lang, path in plan["lang_paths"].items():
            prints[path] = artifacts.read_bundle_meta(path).get("base_fingerprint")
    distinct = {v for v in prints.values() if v}
    if len(distinct) > 1:
        listing = "; ".join(f"{p}: {v}" for p, v in prints.items() if v)
        raise artifacts.BundleError(f"these adapters were trained on different base models ({listing})")


def _evaluate_plan(plan, task, targets, eval_data, split, system, model, batch_size, max_examples, device, bf16,
                   backend, dtype, graphs) -> list[dict]:
    from ..model import Stack, add_madx
    from .stages import load_model, load_tokenizer

    meta = plan["meta"]
    model_name = model or meta.get("base_model")
    labels = meta.get("labels")
    tok = load_tokenizer(model_name)
    task.pad_id = tok.pad_token_id
    max_length = meta.get("max_length") or task.default_max_length
    head_kwargs = task.head_kwargs(labels)  # (also tells the task its label names)
    # every target's data, checked against the head, before any evaluation
    data = {}
    for target in targets:
        examples = task.load(eval_data, split, target, max_examples, labels)
        if labels is not None:
            task.check_fits(examples, labels, f"{eval_data} ({target}, {split})")
        data[target] = (examples, task.encode_eval(examples, tok, max_length))

    the_model = load_model(meta.get("auto_class") or task.auto_class, model_name, **head_kwargs)
    fingerprint = artifacts.base_fingerprint(the_model)
    madx = add_madx(the_model, backend=backend)
    task_name, _ = artifacts.load_bundle(madx, plan["path"], fingerprint=fingerprint, model_name=model_name)
    artifacts.load_head(the_model, plan["path"])
    for lang, path in plan["lang_paths"].items():
        if lang == task_name:
            raise ValueError(f"language {lang!r} has the task adapter's name")
        artifacts.load_bundle(madx, path, load_as=lang, fingerprint=fingerprint, model_name=model_name)
    if dtype is not None:
        madx.cast_backbone(dtype)
    the_model.to(device)
    memory = PeakMemory(device)

    records = []
    for target, setting, lang in plan["runs"]:
        examples, features = data[target]
        madx.set_active(Stack(lang, task_name) if lang else task_name)
        t0 = time.perf_counter()
        metrics = task.evaluate(the_model, examples, features, batch_size=batch_size, device=device, bf16=bf16,
                                graphs=graphs)
        value = metrics[task.main_metric]
        percent = value if task.name == "qa" else 100.0 * value
        rec = {"system": system, "task": task.name, "task_adapter": plan["path"], "source": plan["source"],
               "target": target, "setting": setting, "language_adapter": lang, "metric": task.main_metric,
               "value": percent, "metrics": metrics, "eval_time_s": time.perf_counter() - t0,
               **memory.read()}
        records.append(rec)
        log.info("%s | %s | source %s -> target %s: %s %.2f", system, SETTINGS[setting], rec["source"], target,
                 task.main_metric, percent)
    del the_model
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
    return f"{rec['system']} | {SETTINGS[rec['setting']]} | src {rec['source']}"


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
    ``transfer_matrix.csv`` (rows x targets) and ``transfer_heatmap.png``; each written atomically."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {name: os.path.join(output_dir, name) for name in REPORT_FILES}
    rows, cols, cells = matrix(records)
    artifacts.atomic_write_json(paths["transfer_results.json"],
                                {"records": list(records), "matrix": {"rows": rows, "columns": cols, "cells": cells}})
    long = io.StringIO()
    writer = csv.writer(long)
    extra = sorted({k for r in records for k, v in r["metrics"].items() if isinstance(v, (int, float))})
    writer.writerow(["system", "task", "source", "target", "setting", "language_adapter", "metric", "value_percent"]
                    + extra)
    for r in records:
        writer.writerow([r["system"], r["task"], r["source"], r["target"], r["setting"], r["language_adapter"] or "",
                         r["metric"], f"{r['value']:.4f}"] + [r["metrics"].get(k, "") for k in extra])
    _write_text(paths["transfer_results.csv"], long.getvalue())
    wide = io.StringIO()
    writer = csv.writer(wide)
    writer.writerow(["row"] + cols)
    for label, row in zip(rows, cells):
        writer.writerow([label] + ["" if v is None else f"{v:.4f}" for v in row])
    _write_text(paths["transfer_matrix.csv"], wide.getvalue())
    metric = records[0]["metric"] if records else ""
    plot_heatmap(rows, cols, cells, paths["transfer_heatmap.png"],
                 title or f"zero-shot transfer, {records[0]['task'] if records else ''} {metric} (%)")
    return paths


def _write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    artifacts.atomic_write_bytes(path, write)


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

    def write(tmp):
        fig.savefig(tmp, dpi=120, format="png")
    try:
        artifacts.atomic_write_bytes(path, write)
    finally:
        plt.close(fig)


__all__ = ["SETTINGS", "evaluate_transfer", "format_table", "matrix", "write_transfer_report"]
