"""Keeps benchmarks/bench_train.py working on CPU (tiny XLM-R architecture, every workload and implementation,
the profile breakdown)."""
import math

from tests.helpers import load_script


def _bench():
    return load_script("benchmarks/bench_train.py")


def _adapterhub_usable():
    try:
        import adapters
        adapters.XLMRobertaAdapterModel  # noqa: B018 (imports lazily)
        return True
    except Exception:  # noqa: BLE001
        return False


def test_bench_train_tiny_table():
    rows = _bench().main(["--size", "tiny", "--warmup", "1", "--iters", "1"])
    impls = {r["impl"] for r in rows}
    assert {"fused", "graphs", "eager"} <= impls
    if _adapterhub_usable():  # AdapterHub as is and patched, in the same run, for every workload
        for impl in ("adapterhub", "hub+patch"):
            assert {(r["workload"], r["B"]) for r in rows if r["impl"] == impl} == {
                ("mlm", 4), ("ner", 4), ("infer", 4), ("infer", 16)}
    assert {(r["workload"], r["B"]) for r in rows} == {("mlm", 4), ("ner", 4), ("infer", 4), ("infer", 16)}
    assert {r["workload"] for r in rows if r["impl"] == "graphs"} == {"mlm", "ner", "infer"}
    for r in rows:
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0
        assert math.isclose(r["tokens_per_s"], r["B"] * r["L"] / r["step_ms"] * 1e3)
        if r["impl"] == "eager":
            assert r["x_vs_eager"] == 1.0


def test_bench_train_profile_breakdown(capsys):
    bench = _bench()
    rows = bench.main(["--size", "tiny", "--warmup", "1", "--iters", "1", "--profile", "1", "--workloads", "ner",
                       "--impl", "eager"])
    prof = rows[0]["profile"]
    assert prof["wall_ms"] > 0 and 0 < prof["busy_ms"] <= prof["wall_ms"] * 1.5
    cats = prof["by_category"]
    assert cats["GEMM"] > 0 and cats["optimizer"] > 0 and set(cats) <= {c for c, _ in bench.CATEGORIES}
    assert "where a step's time goes: ner" in capsys.readouterr().out
    assert bench._categorise("aten::addmm") == "GEMM"
    assert bench._categorise("madx_fast::adapter_forward") == "madx_fast kernels/ops"
    assert bench._categorise("sm90_xmma_gemm_bf16bf16_bf16f32") == "GEMM"
    assert bench._categorise("pytorch_flash::flash_fwd_kernel") == "attention"
