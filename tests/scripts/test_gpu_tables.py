"""scripts/gpu_tables.py puts the roofline's predictions beside the figures a GPU session measured: each
measured row finds its predicted one by case, tokens and implementation, and each target its measured ratio."""
import json

from tests.helpers import load_script


def _tables():
    return load_script("scripts/gpu_tables.py")


def _session_files():
    ops = dict(device="H100", torch="2.11", triton="3.6", rows=[
        dict(op="adapter d=48", tokens=65536, dtype=dt, backend=b, fwd_bwd_ms=ms)
        for dt, b, ms in (("bfloat16", "triton", 0.25), ("bfloat16", "eager", 0.75), ("float32", "triton", 9.0))])
    train = dict(device="H100", lang_rf=16, size="base", rows=[
        dict(workload="ner", B=32, L=128, impl=i, step_ms=ms) for i, ms in (("fused", 8.0), ("adapterhub", 40.0))])
    rf2 = dict(device="H100", lang_rf=2, size="base",
               rows=[dict(workload="ner", B=32, L=128, impl="fused", step_ms=1.0)])
    mixed = dict(rows=[dict(impl="graphs", workload=w, B=256, L=128, ms=ms)
                       for w, ms in (("mixed", 10.0), ("loop", 25.0))])
    docs = {"bench_ops": ops, "bench_train_ner": train, "bench_train_mlm_rf2": rf2, "bench_mixed": mixed}
    return {f"json/{name}.json": json.dumps(doc).encode() for name, doc in docs.items()}


def _roofline():
    def row(case, tokens, impl, ms, base, x):
        return dict(case=case, tokens=tokens, impl=impl, predicted_ms=ms, baseline=base, x_baseline=x)
    mixed = "mixed-language infer B=256 L=128"
    rows = [row("adapter d=48", 65536, "fused", 0.3, "eager", 1.9),
            row("adapter d=48", 65536, "eager", 0.57, "eager", 1.0),
            row("ner B=32 L=128", 4096, "fused", 30.0, "adapterhub", 1.0),
            row("ner B=32 L=128", 4096, "adapterhub", 30.0, "adapterhub", 1.0),
            row(mixed, 32768, "mixed graphs", 16.0, "loop", 1.1),
            row("ner B=32 L=128", 4096, "graphs", 6.0, "adapterhub", 5.0)]
    targets = [
        dict(target="adapter", case="adapter d=48", impl="fused", baseline="eager", at_least=2.9, predicted_x=1.9),
        dict(target="NER", case="ner B=32 L=128", impl="fused", baseline="adapterhub", at_least=5, predicted_x=1.0),
        dict(target="mixed", case=mixed, impl="mixed graphs", baseline="loop graphs", at_least=2, predicted_x=1.1)]
    return dict(rows=rows, targets=targets)


def test_predicted_beside_measured():
    md = _tables().predicted_vs_measured(_session_files(), _roofline()).splitlines()
    assert "| adapter d=48 | 65536 | fused | 0.300 | 0.250 | 1.90 | 3.00 (eager) |" in md  # bf16 rows only
    assert "| ner B=32 L=128 | 4096 | fused | 30.000 | 8.000 | 1.00 | 5.00 (adapterhub) |" in md  # rf 16 only
    assert "| ner B=32 L=128 | 4096 | graphs | 6.000 | - | 5.00 | - (adapterhub) |" in md  # not measured: empty
    assert "| mixed-language infer B=256 L=128 | 32768 | mixed graphs | 16.000 | 10.000 | 1.10 | - (loop) |" in md
    assert "| adapter | 2.9x | 1.90x | 3.00x |" in md
    assert "| NER | 5x | 1.00x | 5.00x |" in md
    assert "| mixed | 2x | 1.10x | 2.50x |" in md
