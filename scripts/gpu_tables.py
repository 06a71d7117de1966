"""Markdown tables from what `scripts/gpu_session.sh` returned, ready for docs/benchmarks.md.

    python scripts/gpu_tables.py gpu_out/gpu_session.tar.gz     # or an unpacked folder with logs/ and json/

Prints the device and versions (phase a), the test totals of each test phase (its JUnit XML), the op
benchmark rows (bench_ops*.json: medians, ratios to eager measured in the same run, peak memory, fraction of
the bandwidth floor) and the training-step rows (bench_train_*.json: step time, tokens/s, peak memory,
ratios to AdapterHub and to madx_fast eager measured in the same process). Nothing is computed here that
the benchmarks did not measure.

    python scripts/gpu_tables.py gpu_out/gpu_session.tar.gz --roofline roofline.json

also prints the roofline's predictions (``benchmarks/roofline.py --json``) beside the measured figure of the
same case and implementation, and each target's predicted and measured ratio.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

TEST_PHASES = {"e": "ops and fused model paths", "f": "training", "g": "CUDA backend"}


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


def measured_times(files: dict[str, bytes]) -> dict:
    """(roofline case, tokens, impl) -> measured milliseconds, from every benchmark JSON of the session."""
    out = {}
    for name, data in files.items():
        if not (name.startswith("json/") and name.endswith(".json")):
            continue
        doc = json.loads(data)
        for r in doc.get("rows", []):
            if name.startswith("json/bench_ops") and r.get("dtype") == "bfloat16":
                impl = {"triton": "fused", "eager": "eager"}.get(r["backend"])
                if impl:
                    out[(r["op"], r["tokens"], impl)] = r["fwd_bwd_ms"]
            elif name.startswith("json/bench_train") and doc.get("lang_rf") == 16:
                out[(f"{r['workload']} B={r['B']} L={r['L']}", r["B"] * r["L"], r["impl"])] = r["step_ms"]
            elif name.startswith("json/bench_mixed"):
                impl = r["workload"] + (" graphs" if r["impl"] == "graphs" else "")
                out[(f"mixed-language infer B={r['B']} L={r['L']}", r["B"] * r["L"], impl)] = r["ms"]
    return out


def predicted_vs_measured(files: dict[str, bytes], roofline: dict) -> str:
    """The roofline's rows and targets with the measured figures beside them (empty where not measured)."""
    measured = measured_times(files)
    rows = {(r["case"], r["tokens"], r["impl"]): r for r in roofline["rows"]}
    out = ["| case | tokens | impl | predicted ms | measured ms | predicted x | measured x (baseline) |",
           "|---|---|---|---|---|---|---|"]
    for (case, tokens, impl), r in rows.items():
        got = measured.get((case, tokens, impl))
        base = measured.get((case, tokens, r["baseline"]))
        ratio = base / got if got and base else None
        out.append(f"| {case} | {tokens} | {impl} | {_num(r['predicted_ms'], 3)} | {_num(got, 3)} | "
                   f"{_num(r['x_baseline'])} | {_num(ratio)} ({r['baseline']}) |")
    out += ["", "| target | at least | predicted | measured |", "|---|---|---|---|"]
    for t in roofline.get("targets", []):
        case, impl, base = t["case"], t["impl"], t["baseline"]
        tokens = next((k[1] for k in rows if k[0] == case and k[2] == impl), None)
        got, ref = measured.get((case, tokens, impl)), measured.get((case, tokens, base))
        out.append(f"| {t['target']} | {t['at_least']}x | {_num(t['predicted_x'])}x | "
                   f"{_num(ref / got if got and ref else None)}x |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="gpu_session.tar.gz, or a folder holding its logs/ and json/")
    p.add_argument("--roofline", type=Path, help="benchmarks/roofline.py --json output: predicted beside measured")
    args = p.parse_args(argv)
    for path in (args.source, args.roofline):
        if path is not None and not path.exists():
            print(f"gpu_tables: {path} does not exist", file=sys.stderr)
            return 2
    files = _read_all(args.source)
    print(tables(files))
    if args.roofline:
        print()
        print(predicted_vs_measured(files, json.loads(args.roofline.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
