"""Keeps benchmarks/roofline.py working (tiny shapes, every case and implementation) and checks its counts and
its time model against what they must be by hand."""
import json
import math

import pytest

from tests.helpers import load_script


def _roofline():
    return load_script("benchmarks/roofline.py")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("roofline") / "roofline.json"
    rows = _roofline().main(["--size", "tiny", "--json", str(path)])
    return rows, json.loads(path.read_text())


def _row(rows, case, impl, tokens=None):
    (r,) = [r for r in rows if r["case"] == case and r["impl"] == impl and tokens in (None, r["tokens"])]
    return r


def test_every_case_and_implementation(tiny):
    rows, saved = tiny
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["model"]["bandwidth_Bps"] == 2.99e12
    impls = {(r["case"], r["tokens"]): set() for r in rows}
    for r in rows:
        impls[(r["case"], r["tokens"])].add(r["impl"])
    tokens = _roofline().SIZES["tiny"]["tokens"]
    for n in tokens:
        for case in ("adapter d=8", "adapter d=40", "nice forward", "nice inverse"):
            assert {"fused", "eager"} <= impls[(case, n)]
        for case in ("grouped adapter d=8 G=4", "grouped adapter d=40 G=4", "grouped nice G=4"):
            assert impls[(case, n)] == {"fused", "fused loop", "eager loop"}
    models = {case for case, _ in impls if "B=" in case}
    assert models == {"mlm B=4 L=32", "ner B=4 L=32", "infer B=4 L=32", "infer B=16 L=32",
                      "mixed-language infer B=16 L=16"}
    for case in ("mlm B=4 L=32", "ner B=4 L=32", "infer B=4 L=32"):
        assert {"fused", "graphs", "eager"} <= {i for (c, _), s in impls.items() if c == case for i in s}
    assert {i for (c, _), s in impls.items() if c.startswith("mixed") for i in s} == {
        "mixed", "mixed graphs", "loop", "loop graphs", "single", "single graphs"}


def test_time_model(tiny):
    rows, _ = tiny
    roof = _roofline()
    for r in rows:
        assert r["predicted_ms"] == max(r["device_ms"], r.get("host_ms", 0.0))
        # the device time is at least the traffic at full bandwidth plus the fixed cost of every kernel
        graphed = r["impl"].endswith("graphs")
        per_kernel = roof.GRAPH_KERNEL_US if graphed else roof.KERNEL_US
        assert r["device_ms"] >= (r["bytes"] / roof.BANDWIDTH + r["kernels"] * per_kernel * 1e-6) * 1e3 * 0.999
        assert r["device_ms"] >= r["flops"] / roof.GEMM_RATE * 1e3
        assert math.isclose(sum(r["by_op"].values()), r["device_ms"])  # the breakdown accounts for all of it
        if "B=" in r["case"] and not graphed:
            assert r["host_ms"] >= r["proxy_cpu_ms"] > 0
            assert math.isclose(r["host_ms"] - r["proxy_cpu_ms"], r["triton_launches"] * roof.TRITON_LAUNCH_US / 1e3)
    graphs = _row(rows, "infer B=4 L=32", "graphs")
    fused = _row(rows, "infer B=4 L=32", "fused")
    assert graphs["host_ms"] == 0 and graphs["flops"] == fused["flops"]
    assert graphs["device_ms"] < fused["device_ms"]
    # MAD-X's add + LayerNorm (3 per layer in Stack(lang, task)) and the FFN intermediate's Linear + GELU (1 per
    # layer): in the captured forward one fused kernel in place of two ops each, and in the breakdown; this
    # small batch replayed eagerly keeps the two
    layers = roof._load("bench_train").SIZES["tiny"]["num_hidden_layers"]
    assert fused["kernels"] - graphs["kernels"] == 3 * layers + layers
    for op in ("madx_fast.add_layer_norm.default", "madx_fast.dense_activation.default"):
        assert op in graphs["by_op"] and op not in fused["by_op"], op


def test_counts_against_hand_counts(tiny):
    rows, _ = tiny
    n, h, d = 512, 768, 8
    eager = _row(rows, "adapter d=8", "eager", n)
    fused = _row(rows, "adapter d=8", "fused", n)
    # forward 2 products of n x h x d, backward 4 (dx, da, dW_down, dW_up): 12 n h d in all, in both
    assert eager["flops"] == fused["flops"] == 12 * n * h * d
    assert fused["fused_calls"] == 2 and eager["fused_calls"] == eager["triton_launches"] == 0
    # the fused op moves less than eager: eager reads and writes the N x H activations more often
    assert fused["bytes"] < eager["bytes"]
    for r in rows:
        assert r["x_baseline"] > 0
        if r["impl"] == r["baseline"]:
            assert r["x_baseline"] == 1.0
    # the mixed batch runs each layer's per-row adapters as one grouped call: fewer kernels than 4 batches
    mixed, loop = (_row(rows, "mixed-language infer B=16 L=16", i) for i in ("mixed", "loop"))
    assert mixed["kernels"] < loop["kernels"] and mixed["flops"] == loop["flops"]
    # the grouped op is one call per product for all groups; the loop is one per group
    grouped = _row(rows, "grouped adapter d=8 G=4", "fused", n)
    loop = _row(rows, "grouped adapter d=8 G=4", "fused loop", n)
    assert grouped["fused_calls"] == 2 and loop["fused_calls"] == 2 * 4
    # the masked-LM decoder runs on the masked rows only: the fused MLM step does fewer FLOPs than AdapterHub's
    hub = [r for r in rows if r["case"] == "mlm B=4 L=32" and r["impl"] == "adapterhub"]
    if hub:
        assert _row(rows, "mlm B=4 L=32", "fused")["flops"] < hub[0]["flops"]
