"""``madx report``: transfer records of separate runs merged into the paper's table (rows in the paper's order,
a block per source, the mean over the zero-shot targets, mean +- std over seeds, the difference to the
baseline), refused when the runs used different base models or evaluation data, never written over an
existing report unless asked. Records are made here as ``madx transfer`` writes them (no model runs)."""
from __future__ import annotations

import csv
import json
import math

import pytest

from madx_fast.cli import main
from madx_fast.training.report import ReportError, build_report, format_report, markdown_table, write_report

TARGETS = ("alpha", "beta", "gamma")


def _rec(system, target, value, *, source="alpha", seed=None, run=None, setting="target", kind="adapters",
         init=None, lad=True, invertible=True, base="fp-base", data=None):
    return {"system": system, "task": "ner", "metric": "f1", "model_kind": kind, "source": source, "target": target,
            "setting": None if kind == "full" else setting, "language_adapter": target if lad else None,
            "split": "test", "value": value, "metrics": {"f1": value / 100, "examples": 10},
            "base_model": "base", "base_fingerprint": base, "eval_fingerprint": data or f"data-{target}",
            "seed": seed, "run_id": run or f"{system}-{source}-{seed}", "trained_with_language_adapter": lad,
            "invertible": invertible if lad and kind != "full" else None, "init_language": init,
            "task_adapter": None, "model": None}


def _records():
    """MAD-X (3 seeds), MAD-X -INV, -LAD -INV, XLM-R (2 seeds), MLM-TRG (one model per target), from alpha."""
    out = []
    for seed, shift in ((1, 0.0), (2, 2.0), (3, 4.0)):
        out += [_rec("MAD-X", t, v + shift, seed=seed) for t, v in zip(TARGETS, (90.0, 50.0, 30.0))]
    out += [_rec("MAD-X -INV", t, v, invertible=False) for t, v in zip(TARGETS, (89.0, 45.0, 25.0))]
    out += [_rec("MAD-X -LAD -INV", t, v, setting="none", lad=False) for t, v in zip(TARGETS, (88.0, 40.0, 20.0))]
    out += [_rec("XLM-R", t, v + s, kind="full", seed=seed) for seed, s in ((1, -1.0), (2, 1.0))
            for t, v in zip(TARGETS, (95.0, 42.0, 10.0))]
    out += [_rec("XLM-R MLM-TRG", t, v, kind="full", init=t, run=f"trg-{t}") for t, v in (("beta", 48.0),
                                                                                          ("gamma", 14.0))]
    out += [_rec("MAD-X", t, 60.0, setting="source") for t in TARGETS]
    return out


def test_layout_means_spread_and_differences():
    report = build_report(_records())
    names = [r["name"] for r in report["rows"]]
    # the paper's order, whatever order the runs came in
    assert names == ["XLM-R", "XLM-R MLM-TRG", "MAD-X -LAD -INV", "MAD-X -INV", "MAD-X", "MAD-X, source adapter"]
    rows = {r["name"]: r for r in report["rows"]}
    madx = rows["MAD-X"]
    assert madx["cells"]["beta"]["mean"] == pytest.approx(52.0) and madx["cells"]["beta"]["n"] == 3
    assert madx["cells"]["beta"]["std"] == pytest.approx(2.0) and madx["cells"]["beta"]["seeds"] == [1, 2, 3]
    # the mean leaves out the source's own column; its spread is over the seeds' own means
    assert madx["mean"]["mean"] == pytest.approx((52.0 + 32.0) / 2) and madx["mean"]["std"] == pytest.approx(2.0)
    assert rows["MAD-X -INV"]["cells"]["beta"]["std"] is None and rows["MAD-X -INV"]["mean"]["n"] == 1
    assert "alpha" not in rows["XLM-R MLM-TRG"]["cells"] and rows["XLM-R MLM-TRG"]["mean"]["mean"] == 31.0
    # differences to the full fine-tuning baseline, per target and for the mean
    assert report["baseline"] == "XLM-R"
    diff = {d["name"]: d for d in report["difference"]}
    assert "XLM-R" not in diff and diff["MAD-X"]["cells"]["gamma"] == pytest.approx(32.0 - 10.0)
    assert diff["MAD-X"]["mean"] == pytest.approx(42.0 - 26.0)
    # without the full model, -LAD -INV is the baseline
    no_full = [r for r in _records() if r["model_kind"] != "full"]
    assert build_report(no_full)["baseline"] == "MAD-X -LAD -INV"
    assert build_report(no_full, baseline="MAD-X -INV")["baseline"] == "MAD-X -INV"
    with pytest.raises(ReportError, match="baseline 'XLM-R' is not a row"):
        build_report(no_full, baseline="XLM-R")
    assert build_report([r for r in no_full if r["system"] == "MAD-X"])["difference"] is None


def test_source_blocks_stay_apart():
    records = _records() + [_rec("MAD-X", t, 70.0, source="beta", run="b") for t in TARGETS]
    report = build_report(records)
    assert [r["source"] for r in report["rows"]] == ["alpha"] * 6 + ["beta"]
    beta = report["rows"][-1]
    assert beta["zero_shot_targets"] == ["alpha", "gamma"] and beta["mean"]["mean"] == 70.0
    assert all(d["source"] == "alpha" for d in report["difference"])  # beta has no baseline row: no difference


def test_table_is_aligned_and_says_what_it_shows():
    text = format_report(build_report(_records()))
    assert "mean ± standard deviation over up to 3 runs" in text and "difference to XLM-R" in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    widths = {len(line) for line in table[:8]}
    assert len(widths) == 1  # every line of the first table as long as the others: aligned columns
    assert "| alpha  | MAD-X " in text and "52.0 ± 2.0" in text and "+22.0" in text
    rows = [["a", "1", "5"], ["bb", "22", "5"]]
    plain = markdown_table(["name", "n", "same"], rows, drop_constant=True)
    assert plain.splitlines() == ["| name |  n |", "|:-----|---:|", "| a    |  1 |", "| bb   | 22 |"]


def test_refuses_other_base_models_other_data_and_runs_given_twice():
    records = _records()
    with pytest.raises(ReportError, match="different base models"):
        build_report(records + [_rec("MAD-X", "beta", 1.0, base="fp-other", run="o")])
    with pytest.raises(ReportError, match="target 'beta' was evaluated on different data"):
        build_report(records + [_rec("MAD-X", "beta", 1.0, data="other-beta", run="o")])
    with pytest.raises(ReportError, match="in the results twice"):
        build_report(records + [dict(records[0])])
    with pytest.raises(ReportError, match="mix tasks"):
        build_report(records + [dict(_rec("MAD-X", "beta", 1.0, run="o"), task="qa")])


def test_files_and_the_command(tmp_path, capsys):
    """Two transfer directories (as separate madx transfer runs write them) merged by ``madx report``."""
    records = _records()
    adapters = [r for r in records if r["model_kind"] != "full"]
    full = [r for r in records if r["model_kind"] == "full"]
    for name, part in (("t-adapters", adapters), ("t-full", full)):
        write_report(part, build_report(part), str(tmp_path / name))
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "t-adapters"), str(tmp_path / "t-full"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "XLM-R MLM-TRG" in printed and "report written to" in printed
    merged = json.load(open(out / "transfer_results.json"))
    assert len(merged["records"]) == len(records) and merged["report"]["baseline"] == "XLM-R"
    for name in ("transfer_heatmap.png", "transfer_difference.png"):
        assert open(out / name, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    matrix = list(csv.reader(open(out / "transfer_matrix.csv")))
    assert matrix[0] == ["source", "system", *TARGETS, "mean", *[f"{c} std" for c in (*TARGETS, "mean")], "n"]
    madx = next(row for row in matrix if row[1] == "MAD-X")
    assert float(madx[3]) == pytest.approx(52.0) and float(madx[7]) == pytest.approx(2.0) and madx[-1] == "3"
    assert open(out / "transfer_matrix.md").read().startswith("ner f1 (%)")
    # an existing report is never replaced unless asked; a refused call leaves it as it was
    before = (out / "transfer_matrix.md").read_bytes()
    assert main(["report", str(tmp_path / "t-adapters"), "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "transfer_matrix.md").read_bytes() == before
    assert main(["report", str(tmp_path / "t-adapters"), "--output", str(out), "--overwrite"]) == 0
    assert len(json.load(open(out / "transfer_results.json"))["records"]) == len(adapters)
    assert (out / "transfer_difference.png").exists()  # -LAD -INV is the baseline now
    assert json.load(open(out / "transfer_results.json"))["report"]["baseline"] == "MAD-X -LAD -INV"
    # a run directory given twice, or one without results, is refused
    assert main(["report", str(tmp_path / "t-full"), str(tmp_path / "t-full")]) == 2
    assert "twice" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no transfer_results.json" in capsys.readouterr().err


def test_std_is_the_sample_standard_deviation():
    values = [81.0, 84.0, 90.0]
    records = [_rec("MAD-X", "beta", v, seed=i) for i, v in enumerate(values)]
    cell = build_report(records)["rows"][0]["cells"]["beta"]
    mean = sum(values) / 3
    assert cell["std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 2))
