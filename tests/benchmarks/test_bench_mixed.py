"""Keeps benchmarks/bench_mixed.py working on CPU (tiny XLM-R architecture, mixed / loop / single workloads)."""
import json
import math

from tests.helpers import load_script


def _bench():
    return load_script("benchmarks/bench_mixed.py")


def test_bench_mixed_tiny_table(tmp_path, capsys):
    out = tmp_path / "mixed.json"
    # the eager adapter ops (fast on a CPU; the grouped kernels are tested in tests/ops/test_grouped.py)
    rows = _bench().main(["--size", "tiny", "--backend", "eager", "--warmup", "0", "--iters", "1",
                          "--json", str(out)])
    assert [r["workload"] for r in rows] == ["mixed", "loop", "single"]
    for r in rows:
        assert (r["impl"], r["B"], r["L"], r["languages"]) == ("eager", 16, 16, 8)
        assert r["ms"] > 0 and math.isclose(r["tokens_per_s"], r["B"] * r["L"] / r["ms"] * 1e3)
        assert math.isclose(r["mixed_vs_loop"], rows[1]["ms"] / rows[0]["ms"])
        assert math.isclose(r["mixed_vs_single"], rows[2]["ms"] / rows[0]["ms"])
        assert r["max_abs_diff_vs_loop"] < 1e-4  # the mixed batch computes what the per-language batches do
    text = capsys.readouterr().out
    assert "# device: CPU" in text and "mixed / loop" in text and "triton" in text and "adapter ops: eager" in text
    assert json.loads(out.read_text())["rows"] == rows
