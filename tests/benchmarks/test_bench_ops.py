"""Keeps benchmarks/bench_ops.py working (tiny sizes) and times the fused ops with pytest-benchmark."""
import math

import pytest
import torch

from madx_fast import ops
from tests.helpers import load_script
from tests.helpers.devices import DEVICE


def load_bench():
    return load_script("benchmarks/bench_ops.py")


def test_bench_ops_quick_table():
    rows = load_bench().main(["--quick", "--reps", "1"])
    ops_seen = {r["op"] for r in rows}
    assert ops_seen == {"adapter d=8", "adapter d=48", "nice forward", "nice inverse"}
    assert {r["backend"] for r in rows} >= {"eager", "triton"}
    for r in rows:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and math.isfinite(r["fwd_bwd_x"])
        if r["backend"] == "eager":
            assert r["fwd_x"] == 1.0


def test_bench_ops_keeps_going_when_a_case_fails(monkeypatch, capsys):
    """A backend that fails one case (out of memory, a compile error) costs that row, not the table."""
    bench = load_bench()
    real, calls = bench.measure, []

    def measure(make, inputs, dy, backend, device, reps):
        calls.append(backend)
        if backend == "triton" and calls.count("triton") == 1:
            raise RuntimeError("boom")
        return real(make, inputs, dy, backend, device, reps)

    monkeypatch.setattr(bench, "measure", measure)
    rows = bench.main(["--quick", "--reps", "1", "--backends", "eager", "triton", "--tokens", "64"])
    assert "failed (RuntimeError: boom)" in capsys.readouterr().err
    assert sum(r["backend"] == "eager" for r in rows) == 4 and sum(r["backend"] == "triton" for r in rows) == 3
    assert {r["tokens"] for r in rows} == {64}


def test_bench_ops_skips_a_backend_that_cannot_run(capsys, tmp_path):
    rows = load_bench().main(["--quick", "--reps", "1", "--backends", "eager", "cuda", "--tokens", "32",
                              "--json", str(tmp_path / "ops.json")])
    if not torch.cuda.is_available():
        assert "backend cuda: not measured" in capsys.readouterr().err
        assert {r["backend"] for r in rows} == {"eager"}
    assert (tmp_path / "ops.json").stat().st_size > 0


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
