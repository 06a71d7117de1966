"""Keeps benchmarks/bench_ops.py working (tiny sizes) and times the fused ops with pytest-benchmark."""
import importlib.util
import math

import pytest
import torch

from madx_fast import ops
from tests.helpers import ROOT
from tests.helpers.devices import DEVICE


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_ops", ROOT / "benchmarks" / "bench_ops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_ops_quick_table():
    rows = load_bench().main(["--quick", "--reps", "1"])
    ops_seen = {r["op"] for r in rows}
    assert ops_seen == {"adapter d=8", "adapter d=48", "nice forward", "nice inverse"}
    assert {r["backend"] for r in rows} >= {"eager", "triton"}
    for r in rows:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and math.isfinite(r["fwd_bwd_x"])
        if r["backend"] == "eager":
            assert r["fwd_x"] == 1.0


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_benchmark_adapter_fwd_bwd(benchmark, backend):
    x = torch.randn(512, 96, device=DEVICE, requires_grad=True)
    w = [torch.randn(48, 96, device=DEVICE, requires_grad=True), torch.zeros(48, device=DEVICE, requires_grad=True),
         torch.randn(96, 48, device=DEVICE, requires_grad=True), torch.zeros(96, device=DEVICE, requires_grad=True)]

    def step():
        y = ops.bottleneck_adapter(x, None, *w, backend=backend)
        torch.autograd.grad(y.sum(), [x, *w])
        return y

    y = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    assert y.shape == x.shape


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_benchmark_nice_fwd_bwd(benchmark, backend):
    x = torch.randn(512, 96, device=DEVICE, requires_grad=True)
    w = [(0.02 * torch.randn(s, device=DEVICE)).requires_grad_()
         for s in [(24, 48), (24,), (48, 24), (48,), (24, 48), (24,), (48, 24), (48,)]]

    def step():
        y = ops.nice_forward(x, *w, backend=backend)
        torch.autograd.grad(y.sum(), [x, *w])
        return y

    y = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    assert y.shape == x.shape
