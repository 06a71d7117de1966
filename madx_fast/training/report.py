"""Transfer results as the paper's table: records of any number of transfer runs (``madx transfer --output``)
merged into one matrix, system x target with the mean over the targets, a block of rows per source language
(``madx report RUN_DIR... --output DIR``; ``madx transfer`` writes the same report for its own records).

    report = build_report(records)          # checks, cells (mean, std, n over seeds), baseline differences
    print(format_report(report))            # the aligned Markdown table
    write_report(records, report, "runs/report")

Rows, in the paper's order within a source block: full fine-tuning (XLM-R), after masked-LM on the source
(MLM-SRC) or the target (MLM-TRG), task adapters without a language adapter (MAD-X -LAD -INV), with language
adapters without (-INV) and with invertible adapters (MAD-X), then the other transfer settings (the source's
adapter left in place, none). Columns: the targets and ``mean``, the mean over the targets other than the row's
source (the zero-shot ones; the source's own cell is shown, greyed in the heatmaps, and not averaged).

Repeated runs (``--seeds``, or the same system trained again and evaluated by another ``madx transfer``) fill
one cell: the mean, the sample standard deviation and the number of runs. The mean column's spread is taken
over the runs' own means when every target has the same seeds. The difference heatmap subtracts, per source
and target, the baseline: full fine-tuning without MLM (the XLM-R baseline), else MAD-X -LAD -INV.

Runs are merged only when they evaluated one task on the same data with adapters / models of the same base
model: the records' ``base_fingerprint`` (the pretrained model's weights) must agree, and per target the
``eval_fingerprint`` (a hash of the examples evaluated) and split; a run recorded twice is refused.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
from typing import Sequence

from .. import files
from .report_plots import plot_difference, plot_matrix
from .settings import ReportSettings

log = logging.getLogger("madx_fast.training")

RESULTS, RESULTS_CSV = "transfer_results.json", "transfer_results.csv"
MATRIX_CSV, MATRIX_MD = "transfer_matrix.csv", "transfer_matrix.md"
HEATMAP, DIFFERENCE = "transfer_heatmap.png", "transfer_difference.png"
REPORT_FILES = (RESULTS, RESULTS_CSV, MATRIX_CSV, MATRIX_MD, HEATMAP, DIFFERENCE)
MEAN = "mean"


class ReportError(ValueError):
    """Transfer results that cannot be put into one report (another base model, other data, a run twice)."""


# --------------------------------------------------------------------------------------------------------
# records -> report
# --------------------------------------------------------------------------------------------------------
def row_name(rec: dict) -> str:
    """The row of a record within its source block: the system, and the transfer setting where it is not the
    system's own (the source's adapter left in place, no language adapter)."""
    setting = rec.get("setting")
    if rec.get("model_kind") == "full" or setting in (None, "target"):
        return rec["system"]
    if setting == "none" and not rec.get("trained_with_language_adapter", True):
        return rec["system"]  # MAD-X -LAD -INV: its task adapter never had a language adapter
    return f"{rec['system']}, {'source adapter' if setting == 'source' else 'no language adapter'}"


def row_rank(rec: dict) -> int:
    """The paper's row order: XLM-R, MLM-SRC, MLM-TRG, -LAD -INV, -INV, MAD-X, other settings."""
    if rec.get("model_kind") == "full":
        init = rec.get("init_language")
        return 0 if not init else 1 if init == rec["source"] else 2
    if not rec.get("trained_with_language_adapter", True):
        return 3
    if rec.get("setting") == "target":
        return 4 if rec.get("invertible") is False else 5
    return 6


def build_report(records: Sequence[dict], baseline: str | None = None) -> dict:
    """The report of ``records`` (see the module docstring); ``baseline``: the system the differences
    subtract (None: full fine-tuning without MLM, else MAD-X -LAD -INV, else none)."""
    if not records:
        raise ReportError("no transfer results to report")
    facts = _check_mergeable(records)
    targets = list(dict.fromkeys(r["target"] for r in records))
    sources = list(dict.fromkeys(r["source"] for r in records))
    rows = _rows(records, targets)
    base = _baseline_name(rows, baseline)
    return {**facts, "sources": sources, "targets": targets, "rows": rows,
            "baseline": base, "difference": _differences(rows, base, targets) if base else None}


def _check_mergeable(records: Sequence[dict]) -> dict:
    """One task and metric, one base model, per target one evaluation set: the shared facts, or a ReportError."""
    facts = {}
    for key in ("task", "metric"):
        values = {r[key] for r in records}
        if len(values) > 1:
            raise ReportError(f"the results mix {key}s {sorted(values)}: one report holds one {key}")
        facts[key] = values.pop()
    prints = {}
    for r in records:
        if r.get("base_fingerprint"):
            prints.setdefault(r["base_fingerprint"], set()).add(f"{r.get('base_model')} ({_origin(r)})")
    if len(prints) > 1:
        listing = "; ".join(f"{fp}: {', '.join(sorted(where))}" for fp, where in prints.items())
        raise ReportError(f"the results come from different base models (weights fingerprints {listing}): a "
                          "comparison needs one base model")
    facts["base_fingerprint"] = next(iter(prints), None)
    facts["base_model"] = next((r.get("base_model") for r in records if r.get("base_fingerprint")), None)
    facts["eval_data"] = {}
    for r in records:
        seen = facts["eval_data"].setdefault(r["target"], {"split": r["split"], "fingerprint": None,
                                                            "examples": r["metrics"].get("examples")})
        fp = r.get("eval_fingerprint")
        if r["split"] != seen["split"] or (fp and seen["fingerprint"] and fp != seen["fingerprint"]):
            raise ReportError(f"target {r['target']!r} was evaluated on different data ({_origin(r)}: split "
                              f"{r['split']}, data fingerprint {fp}; before: split {seen['split']}, fingerprint "
                              f"{seen['fingerprint']}): the cells would not be comparable")
        seen["fingerprint"] = seen["fingerprint"] or fp
    unchecked = sorted({_origin(r) for r in records if not (r.get("eval_fingerprint") and r.get("base_fingerprint"))})
    if unchecked and len(records) > 1:
        log.warning("results without fingerprints (base model or evaluation data unchecked): %s", ", ".join(unchecked))
    return facts


def _origin(rec: dict) -> str:
    return rec.get("run_dir") or rec.get("task_adapter") or rec.get("model") or rec["system"]


def _rows(records: Sequence[dict], targets: list[str]) -> list[dict]:
    """Rows in source-block and paper order, each with its cells and its mean over the zero-shot targets."""
    rows: dict[tuple, dict] = {}
    order = {}
    for i, r in enumerate(records):
        key = (r["source"], row_name(r))
        row = rows.setdefault(key, {"source": r["source"], "name": key[1], "system": r["system"],
                                    "setting": r.get("setting"), "rank": row_rank(r), "runs": {}})
        order.setdefault(key, i)
        runs = row["runs"].setdefault(r["target"], {})
        run = r.get("run_id") or _origin(r)
        if run in runs:
            raise ReportError(f"the run {run} is in the results twice (row {key[1]!r}, source {key[0]}, target "
                              f"{r['target']}): give each transfer result once")
        runs[run] = (r.get("seed"), r["value"])
    sources = list(dict.fromkeys(r["source"] for r in records))
    out = []
    for key in sorted(rows, key=lambda k: (sources.index(k[0]), rows[k]["rank"], order[k])):
        row = rows[key]
        runs = row.pop("runs")
        row["cells"] = {t: _stats([v for _, v in runs[t].values()], [s for s, _ in runs[t].values()])
                        for t in targets if t in runs}
        row["zero_shot_targets"] = [t for t in targets if t != row["source"]]
        row[MEAN] = _row_mean(runs, row["zero_shot_targets"])
        out.append(row)
    return out


def _stats(values: list[float], seeds: list | None = None) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "seeds": sorted(s for s in (seeds or []) if s is not None) or None}


def _row_mean(runs: dict, targets: list[str]) -> dict | None:
    """The mean over ``targets`` (None unless every one has a cell); its spread over the runs when every
    target has the same seeds (each seed's own mean over the targets)."""
    if not targets or any(t not in runs for t in targets):
        return None
    means = [sum(v for _, v in runs[t].values()) / len(runs[t]) for t in targets]
    out = {"mean": sum(means) / len(means), "std": None, "n": min(len(runs[t]) for t in targets), "seeds": None}
    by_seed = [{seed: value for seed, value in runs[t].values()} for t in targets]
    seeds = set(by_seed[0])
    if len(seeds) > 1 and None not in seeds and all(set(b) == seeds and len(b) == len(runs[t])
                                                    for b, t in zip(by_seed, targets)):
        per_seed = [sum(b[seed] for b in by_seed) / len(targets) for seed in sorted(seeds)]
        out.update(_stats(per_seed, sorted(seeds)))  # the same mean: every target has every seed
    return out


def _baseline_name(rows: list[dict], wanted: str | None) -> str | None:
    if wanted is not None:
        if not any(r["name"] == wanted for r in rows):
            raise ReportError(f"baseline {wanted!r} is not a row of the report (rows: "
                              f"{', '.join(dict.fromkeys(r['name'] for r in rows))})")
        return wanted
    for rank in (0, 3):  # full fine-tuning (XLM-R), else MAD-X -LAD -INV
        found = next((r["name"] for r in rows if r["rank"] == rank), None)
        if found:
            return found
    return None


def _differences(rows: list[dict], base: str, targets: list[str]) -> list[dict]:
    """Each row minus the baseline row of its source block, per target and for the mean."""
    baselines = {r["source"]: r for r in rows if r["name"] == base}
    out = []
    for r in rows:
        ref = baselines.get(r["source"])
        if ref is None or r is ref:
            continue
        cells = {t: r["cells"][t]["mean"] - ref["cells"][t]["mean"] for t in targets
                 if t in r["cells"] and t in ref["cells"]}
        mean = r[MEAN]["mean"] - ref[MEAN]["mean"] if r[MEAN] and ref[MEAN] else None
        out.append({"source": r["source"], "name": r["name"], "cells": cells, MEAN: mean})
    return out


# --------------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence], *, right: Sequence[bool] | None = None,
                   drop_constant: bool = False) -> str:
    """An aligned Markdown table (every column padded to its widest cell, so it reads as a table in a terminal
    too); ``None`` cells print as ``-``. ``right``: right-aligned columns (default: those whose cells are all
    numbers). ``drop_constant``: leave out columns that hold one value on every row (with 2 rows or more)."""
    cells = [["-" if v is None else str(v) for v in row] for row in rows]
    keep = list(range(len(headers)))
    if drop_constant and len(cells) > 1:
        keep = [j for j in keep if len({row[j] for row in cells}) > 1]
    if right is None:
        right = [all(_numeric(row[j]) for row in cells) and bool(cells) for j in range(len(headers))]
    widths = {j: max([len(headers[j])] + [len(row[j]) for row in cells]) for j in keep}

    def line(values):
        return "| " + " | ".join(v.rjust(widths[j]) if right[j] else v.ljust(widths[j])
                                 for j, v in zip(keep, values)) + " |"

    rule = "|" + "|".join(("-" * (widths[j] + 1) + ":") if right[j] else (":" + "-" * (widths[j] + 1))
                          for j in keep) + "|"
    return "\n".join([line([headers[j] for j in keep]), rule] + [line([row[j] for j in keep]) for row in cells])


def _numeric(text: str) -> bool:
    head = text.split(" ")[0].replace(",", "").lstrip("+-")
    return text == "-" or head.replace(".", "", 1).isdigit()


def _fmt(stats: dict | None) -> str | None:
    if stats is None:
        return None
    return f"{stats['mean']:.1f}" + (f" ± {stats['std']:.1f}" if stats.get("std") is not None else "")


def _headline(report: dict) -> str:
    split = ", ".join(sorted({e["split"] for e in report["eval_data"].values()}))
    n = max((c["n"] for r in report["rows"] for c in r["cells"].values()), default=1)
    spread = f"; mean ± standard deviation over up to {n} runs (seeds)" if n > 1 else ""
    return (f"{report['task']} {report['metric']} (%), {split} split; mean: over the targets other than the row's "
            f"source{spread}")


def format_report(report: dict) -> str:
    """The report's table, aligned, with a line saying what the numbers are (and the differences, if any)."""
    targets = report["targets"]
    body = [[r["source"], r["name"]] + [_fmt(r["cells"].get(t)) for t in targets] + [_fmt(r[MEAN])]
            for r in report["rows"]]
    text = [_headline(report), "", markdown_table(["source", "system"] + targets + [MEAN], body,
                                                  right=[False, False] + [True] * (len(targets) + 1))]
    if report["difference"]:
        diff = [[d["source"], d["name"]] + [_signed(d["cells"].get(t)) for t in targets] + [_signed(d[MEAN])]
                for d in report["difference"]]
        text += ["", f"difference to {report['baseline']} (points):", "",
                 markdown_table(["source", "system"] + targets + [MEAN], diff,
                                right=[False, False] + [True] * (len(targets) + 1))]
    return "\n".join(text)


def _signed(value: float | None) -> str | None:
    return None if value is None else f"{value:+.1f}"


# --------------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------------
def check_report_dir(directory: str, overwrite: bool = False) -> None:
    """Never replace a report unless told to (``--overwrite``)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f"{directory} exists and is not a directory")
    clash = [f for f in REPORT_FILES if os.path.exists(os.path.join(directory, f))]
    if clash and not overwrite:
        raise FileExistsError(f"{directory} already holds a transfer report ({', '.join(clash)}); choose another "
                              "--output, or pass --overwrite to replace it")


def write_report(records: Sequence[dict], report: dict, output_dir: str, title: str | None = None) -> dict[str, str]:
    """Every report file (``REPORT_FILES``; the difference heatmap only with a baseline), written as one
    directory update: a reader sees the whole report or none of it; other files in ``output_dir`` are kept."""
    title = title or f"zero-shot transfer, {report['task']} {report['metric']} (%)"

    def build(tmp):
        files.dump_json({"records": list(records), "report": report}, os.path.join(tmp, RESULTS))
        for name, text in ((RESULTS_CSV, _records_csv(records)), (MATRIX_CSV, _matrix_csv(report)),
                           (MATRIX_MD, format_report(report) + "\n")):
            with open(os.path.join(tmp, name), "w", encoding="utf-8", newline="") as f:
                f.write(text)
        plot_matrix(report, os.path.join(tmp, HEATMAP), title)
        if report["difference"]:
            plot_difference(report, os.path.join(tmp, DIFFERENCE), title)

    files.replace_directory(output_dir, build, owned=REPORT_FILES)
    return {name: os.path.join(output_dir, name) for name in REPORT_FILES
            if name != DIFFERENCE or report["difference"]}


def _records_csv(records: Sequence[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    extra = sorted({k for r in records for k, v in r["metrics"].items() if isinstance(v, (int, float))})
    writer.writerow(["system", "row", "task", "source", "target", "setting", "language_adapter", "seed", "metric",
                     "value_percent"] + extra)
    for r in records:
        writer.writerow([r["system"], row_name(r), r["task"], r["source"], r["target"], r.get("setting") or "",
                         r.get("language_adapter") or "", "" if r.get("seed") is None else r["seed"], r["metric"],
                         f"{r['value']:.4f}"] + [r["metrics"].get(k, "") for k in extra])
    return out.getvalue()


def _matrix_csv(report: dict) -> str:
    """source, system, a column per target and the mean; with repeated runs also ``<column> std`` and ``n``."""
    out = io.StringIO()
    writer = csv.writer(out)
    columns = report["targets"] + [MEAN]
    spread = any(c["n"] > 1 for r in report["rows"] for c in r["cells"].values())
    writer.writerow(["source", "system"] + columns + ([f"{c} std" for c in columns] + ["n"] if spread else []))
    for r in report["rows"]:
        stats = [r["cells"].get(t) for t in report["targets"]] + [r[MEAN]]
        line = [r["source"], r["name"]] + ["" if s is None else f"{s['mean']:.4f}" for s in stats]
        if spread:
            line += ["" if s is None or s["std"] is None else f"{s['std']:.4f}" for s in stats]
            line.append(max(c["n"] for c in r["cells"].values()))
        writer.writerow(line)
    return out.getvalue()


# --------------------------------------------------------------------------------------------------------
# madx report
# --------------------------------------------------------------------------------------------------------
def read_results(directory: str) -> list[dict]:
    """The records of a transfer report directory, each marked with the directory it came from."""
    path = os.path.join(directory, RESULTS) if os.path.isdir(directory) else directory
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {RESULTS} (give directories written by madx transfer --output "
                                "or madx report --output)")
    data = files.read_json(path, error=ReportError)
    records = data.get("records")
    if not isinstance(records, list) or not all(isinstance(r, dict) and "value" in r for r in records):
        raise ReportError(f"{path} holds no transfer records")
    return [dict(r, run_dir=r.get("run_dir") or os.path.dirname(os.path.abspath(path))) for r in records]


def merge_runs(settings: ReportSettings | None = None, /, echo=None, **kwargs) -> dict:
    """``madx report``: the records of every run directory, checked and merged into one report; printed with
    ``echo`` and, with ``output_dir``, written there. Returns ``{"records", "report", "files"}``."""
    s = ReportSettings.build(settings, **kwargs)
    if s.output_dir:
        check_report_dir(s.output_dir, s.overwrite)
    records = [r for d in s.runs for r in read_results(d)]
    report = build_report(records, s.baseline)
    report["runs"] = list(s.runs)
    written = write_report(records, report, s.output_dir, s.title) if s.output_dir else {}
    if echo is not None:
        echo(format_report(report))
        if written:
            echo(f"report written to {s.output_dir}: {', '.join(os.path.basename(p) for p in written.values())}")
    return {"records": records, "report": report, "files": written}


__all__ = ["REPORT_FILES", "ReportError", "build_report", "check_report_dir", "format_report",
           "markdown_table", "merge_runs", "read_results", "row_name", "write_report"]
