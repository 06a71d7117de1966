"""Keeps benchmarks/bench_average.py working on CPU (tiny sizes): an Average of K = 2, 4, 8 adapters fused vs K
single-adapter calls and a sum vs eager, forward and forward + backward, in one run."""
import importlib.util
import json
import math

from tests.helpers import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("bench_average", ROOT / "benchmarks" / "bench_average.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_average_quick_table(tmp_path, capsys):
    out = tmp_path / "average.json"
    rows = _bench().main(["--quick", "--reps", "1", "--json", str(out)])
    assert [(r["k"], r["impl"]) for r in rows] == [(k, i) for k in (2, 4, 8) for i in ("fused", "k-calls", "eager")]
    for r in rows:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and math.isfinite(r["fwd_bwd_speedup_vs_k_calls"])
        if r["impl"] == "k-calls":
            assert r["fwd_speedup_vs_k_calls"] == 1.0
    assert "x k-calls" in capsys.readouterr().out
    assert json.loads(out.read_text())["rows"] == rows
