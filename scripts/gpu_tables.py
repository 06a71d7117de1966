"""Markdown tables from what `scripts/gpu_session.sh` returned, ready for docs/benchmarks.md.

    python scripts/gpu_tables.py gpu_out/gpu_session.tar.gz     # or an unpacked folder with logs/ and json/

Prints the device and versions (phase a), the test totals of each test phase (its JUnit XML), the op
benchmark rows (bench_ops*.json: medians, ratios to eager measured in the same run, peak memory, fraction of
the bandwidth floor) and the training-step rows (bench_train_*.json: step time, tokens/s, peak memory,
ratios to AdapterHub and to madx_fast eager measured in the same process). Nothing is computed here that
the benchmarks did not measure.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

TEST_PHASES = {"b": "ops and fused model paths", "e1": "CUDA backend", "e2": "training"}


def _read_all(source: Path) -> dict[str, bytes]:
    """name -> content of every file in the archive (or folder)."""
    if source.is_dir():
        return {str(p.relative_to(source)): p.read_bytes() for p in source.rglob("*") if p.is_file()}
    with tarfile.open(source) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _num(value, digits=2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def tables(files: dict[str, bytes]) -> str:
    out = []
    a = files.get("logs/a.log", b"").decode(errors="replace").splitlines()
    out += [line for line in a if line.startswith(("python ", "device:", "adapterhub set:", "training set:"))]
    rows = []
    for phase, what in TEST_PHASES.items():
        xml = files.get(f"logs/{phase}.xml")
        if xml is None:
            continue
        suite = ET.fromstring(xml)
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        get = lambda key: int(suite.get(key, 0))  # noqa: E731
        passed = get("tests") - get("failures") - get("errors") - get("skipped")
        rows.append(f"| {phase} | {what} | {passed} | {get('failures')} | {get('errors')} | {get('skipped')} | "
                    f"{float(suite.get('time', 0)):.0f} |")
    if rows:
        out += ["", "| phase | tests | passed | failed | errors | skipped | s |", "|---|---|---|---|---|---|---|", *rows]
    ops = [(name, json.loads(data)) for name, data in sorted(files.items())
           if name.startswith("json/bench_ops") and name.endswith(".json")]
    if ops:
        out += ["", f"Op level ({ops[0][1]['device']}; torch {ops[0][1]['torch']}, triton {ops[0][1]['triton']}):", "",
                "| op | tokens | dtype | backend | fwd ms | x eager | bwd ms | x eager | fwd+bwd ms | x eager | "
                "peak MiB | fwd floor |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for _, doc in ops:
            for r in doc["rows"]:
                out.append(f"| {r['op']} | {r['tokens']} | {r['dtype']} | {r['backend']} | {_num(r['fwd_ms'], 3)} | "
                           f"{_num(r['fwd_x'])} | {_num(r['bwd_ms'], 3)} | {_num(r['bwd_x'])} | "
                           f"{_num(r['fwd_bwd_ms'], 3)} | {_num(r['fwd_bwd_x'])} | {_num(r['peak_MiB'], 0)} | "
                           f"{_num(r['fwd_floor_frac'])} |")
    train = [(name, json.loads(data)) for name, data in sorted(files.items())
             if name.startswith("json/bench_train") and name.endswith(".json")]
    if train:
        doc = train[0][1]
        versions = "; ".join(f"{k} {v}" for k, v in doc.get("versions", {}).items())
        out += ["", f"Training steps ({doc['device']}; {versions}; size {doc['size']}):", "",
                "| workload | language rf | B x L | impl | step ms | tokens/s | peak GiB | x AdapterHub | x eager |",
                "|---|---|---|---|---|---|---|---|---|"]
        for _, doc in train:
            for r in doc["rows"]:
                out.append(f"| {r['workload']} | {_num(doc.get('lang_rf'), 0)} | {r['B']} x {r['L']} | {r['impl']} | "
                           f"{_num(r['step_ms'])} | {_num(r['tokens_per_s'], 0)} | {_num(r['peak_GiB'])} | "
                           f"{_num(r['x_vs_adapterhub'])} | {_num(r['x_vs_eager'])} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="gpu_session.tar.gz, or a folder holding its logs/ and json/")
    args = p.parse_args(argv)
    if not args.source.exists():
        print(f"gpu_tables: {args.source} does not exist", file=sys.stderr)
        return 2
    print(tables(_read_all(args.source)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
