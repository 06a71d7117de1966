"""Op-level benchmark: fused adapter and NICE ops vs eager PyTorch vs torch.compile, in one run.

    python benchmarks/bench_ops.py                 # the full table on a GPU (H=768, d 48/384, 64k/4k tokens)
    python benchmarks/bench_ops.py --quick         # tiny sizes; also runs on CPU via the Triton interpreter
    python benchmarks/bench_ops.py --json out.json
    python benchmarks/bench_ops.py --backends eager triton --dtypes bfloat16 --tokens 65536   # a subset

Every figure is a median (triton.testing.do_bench on CUDA, wall clock on CPU) on fresh random inputs,
printed next to its ratio to eager measured in the same process. "floor" is the fraction of the
memory-bandwidth floor reached: bytes that must move (each N x H tensor read or written once) over the
device-to-device copy bandwidth measured at the start of the run.

A case that fails (a backend that cannot run it, out of memory) is reported on stderr and left out of the
table; the other cases still run. "compile" is torch.compile of the eager reference; its backward-only
timing replays one graph (retain_graph=True), which torch's donated buffers forbid, so it is compiled with
them off.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from madx_fast import ops, reference  # noqa: E402

BACKENDS_FUSED = ("triton", "cuda")


def timer(fn, device, reps):
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device):
    """Bytes read + written per second by a large device-to-device copy (the bandwidth ceiling)."""
    if device.type != "cuda":
        return None
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = timer(lambda: y.copy_(x), device, 5)
    return 2 * x.numel() / (ms * 1e-3)


def peak_memory(fn, device):
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def available_backends(device, wanted):
    names = [b for b in ("eager", "compile") if b in wanted]
    for b in BACKENDS_FUSED:
        if b not in wanted:
            continue
        try:
            from madx_fast.backends import resolve_backend
            resolve_backend(b, device)
            names.append(b)
        except Exception as exc:  # a backend that cannot run here is reported, not fatal
            print(f"# backend {b}: not measured ({exc})", file=sys.stderr)
    return names


def adapter_case(n, h, d, dtype, device):
    x = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    w = [torch.randn(d, h, device=device, dtype=dtype) / h ** 0.5, torch.randn(d, device=device, dtype=dtype) * 0.1,
         torch.randn(h, d, device=device, dtype=dtype) / d ** 0.5, torch.randn(h, device=device, dtype=dtype) * 0.1]
    w = [t.requires_grad_() for t in w]
    dy = torch.randn(n, h, device=device, dtype=dtype)
    inputs = [x, r, *w]
    bytes_fwd = 3 * n * h * x.element_size()  # read x, read r, write y

    def make(backend):
        if backend == "eager":
            return lambda: reference.bottleneck_adapter_reference(x, r, *w, 1.0, "relu")
        if backend == "compile":
            f = torch.compile(lambda x, r, a, b, c, e: reference.bottleneck_adapter_reference(x, r, a, b, c, e))
            return lambda: f(x, r, *w)
        return lambda: ops.bottleneck_adapter(x, r, *w, backend=backend)
    return make, inputs, dy, bytes_fwd


def nice_case(n, h, dtype, device, inverse):
    x = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    len1, len2 = reference.nice_split(h)
    hf, hg = reference.nice_hidden_sizes(h, 2)
    shapes = [(hf, len2), (hf,), (len1, hf), (len1,), (hg, len1), (hg,), (len2, hg), (len2,)]
    w = [(torch.randn(s, device=device, dtype=dtype) * 0.02).requires_grad_() for s in shapes]
    dy = torch.randn(n, h, device=device, dtype=dtype)
    ref = reference.nice_inverse_reference if inverse else reference.nice_forward_reference
    op = ops.nice_inverse if inverse else ops.nice_forward
    bytes_fwd = 2 * n * h * x.element_size()  # read x, write y

    def make(backend):
        if backend == "eager":
            return lambda: ref(x, *w)
        if backend == "compile":
            f = torch.compile(ref)
            return lambda: f(x, *w)
        return lambda: op(x, *w, backend=backend)
    return make, [x, *w], dy, bytes_fwd


def measure(make, inputs, dy, backend, device, reps):
    with _compile_settings(backend):
        return _measure(make, inputs, dy, backend, device, reps)


def _compile_settings(backend):
    """torch.compile without donated buffers: the backward-only timing calls backward with retain_graph=True,
    which a backward compiled with donated buffers refuses ("non-empty donated buffers ...")."""
    if backend != "compile":
        return contextlib.nullcontext()
    return torch._functorch.config.patch(donated_buffer=False)


def _measure(make, inputs, dy, backend, device, reps):
    fwd = make(backend)
    out = fwd()

    def bwd_only():
        torch.autograd.grad(out, inputs, dy, retain_graph=True)

    def fwd_bwd():
        torch.autograd.grad(fwd(), inputs, dy)

    with torch.no_grad():
        t_fwd = timer(fwd, device, reps)
    t_bwd = timer(bwd_only, device, reps)
    t_fb = timer(fwd_bwd, device, reps)
    mem = peak_memory(fwd_bwd, device)
    return t_fwd, t_bwd, t_fb, mem


def run(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    import triton
    print(f"# device: {name}; torch {torch.__version__}; triton {triton.__version__}")
    bw = copy_bandwidth(device)
    if bw:
        print(f"# device-to-device copy bandwidth: {bw / 1e12:.2f} TB/s")
    if args.quick:
        h, ds, tokens = 96, (8, 48), (256,)
        dtypes = [torch.float32]
    else:
        h, ds, tokens = 768, (48, 384), (65536, 4096)  # the MLM batch and the NER batch (roofline.py's shapes)
        dtypes = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    tokens = tuple(args.tokens) if args.tokens else tokens
    dtypes = [getattr(torch, d) for d in args.dtypes] if args.dtypes else dtypes
    wanted = set(args.backends or ("eager", "compile") + BACKENDS_FUSED)
    if device.type != "cuda" and not args.backends:
        wanted.discard("compile")  # inductor on CPU measures C++ codegen, not kernels
    backends = available_backends(device, wanted)
    rows = []
    cases = []
    for dtype in dtypes:
        for d in ds:
            for n in tokens:
                cases.append((f"adapter d={d}", n, dtype, adapter_case(n, h, d, dtype, device)))
        for n in tokens:
            for inverse in (False, True):
                label = "nice inverse" if inverse else "nice forward"
                cases.append((label, n, dtype, nice_case(n, h, dtype, device, inverse)))
    for label, n, dtype, (make, inputs, dy, bytes_fwd) in cases:
        base = (float("nan"),) * 3
        for backend in backends:
            try:
                t_fwd, t_bwd, t_fb, mem = measure(make, inputs, dy, backend, device, args.reps)
            except Exception as exc:  # one failing case must not cost the rest of the table
                print(f"# {label} {n} tokens {str(dtype)[6:]} {backend}: failed ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:300] if str(exc) else ''})", file=sys.stderr, flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if backend == "eager":
                base = (t_fwd, t_bwd, t_fb)
            floor = (bytes_fwd / bw * 1e3) / t_fwd if bw else float("nan")
            rows.append(dict(op=label, tokens=n, dtype=str(dtype).replace("torch.", ""), backend=backend,
                             fwd_ms=t_fwd, bwd_ms=t_bwd, fwd_bwd_ms=t_fb, peak_MiB=mem,
                             fwd_x=base[0] / t_fwd, bwd_x=base[1] / t_bwd, fwd_bwd_x=base[2] / t_fb,
                             fwd_floor_frac=floor))
    header = (f"{'op':<14}{'tokens':>7} {'dtype':<9}{'backend':<8}{'fwd ms':>9}{'x':>6}{'bwd ms':>9}{'x':>6}"
              f"{'f+b ms':>9}{'x':>6}{'peak MiB':>10}{'floor':>7}")
    print(header)
    for r in rows:
        print(f"{r['op']:<14}{r['tokens']:>7} {r['dtype']:<9}{r['backend']:<8}{r['fwd_ms']:>9.3f}{r['fwd_x']:>6.2f}"
              f"{r['bwd_ms']:>9.3f}{r['bwd_x']:>6.2f}{r['fwd_bwd_ms']:>9.3f}{r['fwd_bwd_x']:>6.2f}"
              f"{r['peak_MiB']:>10.1f}{r['fwd_floor_frac']:>7.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=name, torch=torch.__version__, triton=triton.__version__, rows=rows), fh, indent=1)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU-friendly)")
    p.add_argument("--reps", type=int, default=5, help="repetitions per timing on CPU")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--backends", nargs="+", choices=["eager", "compile", *BACKENDS_FUSED],
                   help="measure only these (default: every one that can run here; eager gives the ratios)")
    p.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 and float32 on a GPU, float32 on CPU")
    p.add_argument("--tokens", nargs="+", type=int, help="token counts (default 65536 4096; --quick 256)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
