"""Averaged adapters (AdapterHub's ``Average``): the K adapters in one fused op vs K separate adapter calls and a
weighted sum, forward and forward + backward, for K = 2, 4, 8, in one run.

    python benchmarks/bench_average.py                 # GPU: H=768, d=384 (MAD-X language adapters), 8k/64k tokens
    python benchmarks/bench_average.py --quick         # tiny sizes; also runs on CPU via the Triton interpreter
    python benchmarks/bench_average.py --ks 2 4 --tokens 8192 --json average.json

Implementations, on the same inputs (x, residual, K stacked adapters, coefficients):

  fused      ``madx_fast.ops.average_bottleneck_adapter``: one launch per product for all K adapters, the
             coefficients applied in the kernels (``madx_fast/kernels/triton/average.py``)
  k-calls    ``sum_k m_k * madx_fast.ops.bottleneck_adapter(x, r, adapter k)``: K fused single-adapter ops and the
             weighted sum in PyTorch (what an Average costs without the grouped kernels)
  eager      the eager reference (``reference.average_bottleneck_adapter_reference``)

"fwd" is an inference forward (no grad); "fwd+bwd" a forward and the gradients of x, the residual and every
adapter weight (as when the averaged adapters train; test-time ensembling needs the coefficients' instead).
Medians: ``triton.testing.do_bench`` on CUDA, wall clock on a CPU (where the fused implementations run in
Triton's interpreter: the CPU figures measure the interpreter, not the kernels). Ratios are to k-calls,
measured side by side in this process. A case that fails is reported on stderr and left out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from madx_fast import ops, reference  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import timer  # noqa: E402  (median ms: do_bench on CUDA, wall clock on a CPU)

IMPLS = ("fused", "k-calls", "eager")


def case(n: int, h: int, d: int, k: int, dtype, device, backend: str):
    """``(inputs, {impl: forward function}, dy)`` of one size."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()
    x, r = rand(n, h), rand(n, h)
    wd, bd, wu, bu = rand(k, d, h, scale=h ** -0.5), rand(k, d, scale=0.1), rand(k, h, d, scale=d ** -0.5), \
        rand(k, h, scale=0.1)
    mix = torch.full((k,), 1.0 / k, device=device)
    inputs = [x, r, wd, bd, wu, bu]

    def fused():
        return ops.average_bottleneck_adapter(x, r, mix, wd, bd, wu, bu, backend=backend)

    def k_calls():
        out = None
        for i in range(k):
            term = mix[i].to(dtype) * ops.bottleneck_adapter(x, r, wd[i], bd[i], wu[i], bu[i], backend=backend)
            out = term if out is None else out + term
        return out

    def eager():
        return reference.average_bottleneck_adapter_reference(x, r, mix, wd, bd, wu, bu)
    return inputs, {"fused": fused, "k-calls": k_calls, "eager": eager}, torch.randn(n, h, device=device, dtype=dtype)


def measure(fwd, inputs, dy, device, reps: int) -> tuple[float, float]:
    def fwd_bwd():
        torch.autograd.grad(fwd(), inputs, dy)
    with torch.no_grad():
        t_fwd = timer(fwd, device, reps)
    return t_fwd, timer(fwd_bwd, device, reps)


def run(args) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import triton
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"# device: {name}; torch {torch.__version__}; triton {triton.__version__}")
    if args.quick:
        h, d, tokens, dtypes = 64, 32, (128,), [torch.float32]
    else:
        h, d, tokens = 768, 384, (8192, 65536)
        dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.float32]
    tokens = tuple(args.tokens) if args.tokens else tokens
    dtypes = [getattr(torch, t) for t in args.dtypes] if args.dtypes else dtypes
    backend = "triton"
    rows = []
    for dtype in dtypes:
        for n in tokens:
            for k in args.ks:
                inputs, impls, dy = case(n, h, d, k, dtype, device, backend)
                got = {}
                for impl in [i for i in IMPLS if i in args.impls]:
                    try:
                        got[impl] = measure(impls[impl], inputs, dy, device, args.reps)
                    except Exception as exc:  # one failing case must not cost the rest of the table
                        print(f"# K={k} {n} tokens {str(dtype)[6:]} {impl}: failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300] if str(exc) else ''})", file=sys.stderr)
                base = got.get("k-calls", (float("nan"),) * 2)
                for impl, (t_fwd, t_fb) in got.items():
                    rows.append({"k": k, "tokens": n, "H": h, "d": d, "dtype": str(dtype)[6:], "impl": impl,
                                 "fwd_ms": t_fwd, "fwd_bwd_ms": t_fb, "fwd_speedup_vs_k_calls": base[0] / t_fwd,
                                 "fwd_bwd_speedup_vs_k_calls": base[1] / t_fb})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def table(rows) -> str:
    head = f"{'K':>2} {'tokens':>7} {'dtype':<9} {'impl':<8} {'fwd ms':>9} {'x k-calls':>9} {'fwd+bwd ms':>11} {'x k-calls':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['k']:>2} {r['tokens']:>7} {r['dtype']:<9} {r['impl']:<8} {r['fwd_ms']:>9.3f} "
                     f"{r['fwd_speedup_vs_k_calls']:>9.2f} {r['fwd_bwd_ms']:>11.3f} {r['fwd_bwd_speedup_vs_k_calls']:>9.2f}")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU-friendly; what CI runs)")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8], help="adapters per Average (default 2 4 8)")
    p.add_argument("--tokens", type=int, nargs="+", help="token counts (default: 8192 65536; quick: 128)")
    p.add_argument("--dtypes", nargs="+", help="float32 / float16 / bfloat16 (default: bf16 on a GPU, fp32 on CPU)")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions on a CPU (the GPU uses do_bench)")
    p.add_argument("--json", metavar="PATH", help="write the rows here")
    args = p.parse_args(argv)
    rows = run(args)
    print(table(rows))
    print("(x k-calls: time of K single-adapter calls and a weighted sum over this implementation's; > 1 is faster)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
