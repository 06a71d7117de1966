"""Keeps benchmarks/bench_train.py working on CPU (tiny XLM-R architecture, every workload and implementation)."""
import importlib.util
import math
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_train_tiny_table():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--size", "tiny", "--warmup", "1", "--iters", "1"])
    impls = {r["impl"] for r in rows}
    assert {"fused", "eager"} <= impls
    assert {(r["workload"], r["B"]) for r in rows} == {("mlm", 4), ("ner", 4), ("infer", 4), ("infer", 16)}
    for r in rows:
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0
        assert math.isclose(r["tokens_per_s"], r["B"] * r["L"] / r["step_ms"] * 1e3)
        if r["impl"] == "eager":
            assert r["x_vs_eager"] == 1.0
