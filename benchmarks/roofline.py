"""Roofline on paper: the device work of madx_fast fused, eager and AdapterHub at the target shapes, counted
on a CPU, and the H100 times it predicts.

    python benchmarks/roofline.py                      # XLM-R base shapes: the table, about a minute
    python benchmarks/roofline.py --json roofline.json
    python benchmarks/roofline.py --size tiny          # tiny shapes (what CI runs)
    python benchmarks/roofline.py --only ops           # or: models
    python benchmarks/roofline.py --only models --breakdown "infer B=256 L=128 graphs"   # device ms per op

What is counted, and how: each case runs on ``meta`` tensors (shapes, no data) under
``madx_fast.testing.device_ops.DeviceOps``, which records every aten op the code dispatches (views and
allocations cost no kernel), every Triton launch of madx_fast's fused ops (their launchers run for real on
the meta tensors and each ``kernel[grid](...)`` is recorded, not run), the FLOPs of matrix products and
attention (torch's own formulas; a fused op's FLOPs are its eager reference's on the same shapes) and the
bytes each op moves (each tensor argument read or written once). ``madx_fast.testing.gpu_plan`` makes the
choices a CUDA GPU makes where the meta device would differ: the fused Triton path with GPU launch plans,
flash / memory-efficient attention, fused AdamW, and CUDA autocast for AdapterHub's bf16 setting.

Cases (bf16 activations, H=768):

* ops, forward + backward (gradients for the input and every weight), at 65536 and 4096 tokens: the
  bottleneck adapter at d=48 and d=384, the NICE coupling and its inverse, and the grouped (per-row) ops
  with 8 languages against the same rows as 8 per-language calls. Implementations: ``fused`` (Triton),
  ``eager`` (the reference with bf16 weights, as ``bench_ops.py`` times it), ``adapterhub`` (its adapter
  module, fp32 weights under bf16 autocast), and for grouped ops ``fused loop`` / ``eager loop``.
* models, XLM-R base (12 layers, vocabulary 250002), the steps of ``bench_train.py``: a language-adapter
  MLM training step (B=64, L=256), a NER training step in Stack(en, ner) (B=32, L=128), and inference
  (B=32 and 256, L=128); ``fused``, ``graphs`` (the fused forward replayed from a CUDA graph), ``eager``
  and ``adapterhub`` (AdapterHub ``adapters`` 1.3 with bf16 autocast, when importable).

The time model (a prediction, not a measurement; its constants are stated below):

* device time of an op: ``max(bytes / BANDWIDTH, FLOPs / rate) + KERNEL_US`` per kernel it launches, the rate
  being ``GEMM_RATE`` for fp16/bf16 products, ``ATTENTION_RATE`` for attention and ``FP32_RATE`` for fp32
  products; a fused op's launches and aten ops share its FLOPs (one ``max`` over the op's bytes and FLOPs).
  Only compulsory traffic is counted: re-reads that hit L2 or shared memory, and whether a kernel's tiles
  fill the GPU, are the kernel report's concern (``scripts/kernel_report.py``);
* host time of a model step: the CPU time of the same step (same layers, adapters and code path) at tiny
  widths (``PROXY_WIDTHS``, batch ``PROXY_SHAPE``) on real CPU tensors, one thread, Triton launches skipped:
  Python, dispatcher, autograd and small CPU kernels standing in for the launches; plus ``TRITON_LAUNCH_US``
  per Triton launch. It is measured on this machine's CPU (its thread CPU time, so other processes barely
  move it); a host-bound row's ratio to another host-bound row is the robust part. Ops get no host time
  (their weight-sized work, such as casts and partial sums, cannot be made small without changing the op);
* a step: ``max(device, host)`` (the GPU runs behind the host unless the host is the slower); ``graphs``:
  the device time alone with ``GRAPH_KERNEL_US`` per kernel (a replayed graph has no host work per op).
  Host reads (syncs) are counted (``host_reads``) and not added.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BANDWIDTH = 2.99e12  # bytes/s read + written: H100 SXM device-to-device copy
GEMM_RATE = 755e12  # FLOP/s: bf16 8192^3 matmul on an H100 SXM
ATTENTION_RATE = 400e12  # FLOP/s: flash attention on an H100 (about half the GEMM rate at head dim 64)
FP32_RATE = 50e12  # FLOP/s: fp32 matmul without TF32 (torch's default), about 3/4 of the FP32 FMA peak
KERNEL_US = 2.0  # device time per kernel beyond its traffic: launch gap, ramp-up and tail
GRAPH_KERNEL_US = 1.0  # the same inside a replayed CUDA graph
TRITON_LAUNCH_US = 12.0  # host time of one Triton launch from Python (binder, cache lookup, driver launch)
PROXY_WIDTHS = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=1000)
PROXY_SHAPE = (2, 32)  # B, L of a model step's host-side proxy
H = 768
SIZES = {
    "base": dict(tokens=(65536, 4096), ds=(48, 384), languages=8),
    "tiny": dict(tokens=(512, 64), ds=(8, 40), languages=4),
}


def _load(name):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------------
# counting
# --------------------------------------------------------------------------------------------------------
def count(phases):
    """Run ``phases`` (name -> callable, in order) on meta tensors the GPU way; returns the DeviceOps."""
    from madx_fast.testing.device_ops import DeviceOps
    from madx_fast.testing.gpu_plan import planned_gpu
    with planned_gpu(), DeviceOps(answer_meta_reads=True) as ops:
        for name, fn in phases.items():
            ops.phase = name
            fn()
    return ops


def predict(ops, graphed=False) -> dict:
    """Device milliseconds of the recorded ops under the time model (module docstring)."""
    per_kernel = GRAPH_KERNEL_US if graphed else KERNEL_US
    groups: dict = {}
    for i, r in enumerate(ops.records):
        key = i if r.parent is None else r.parent
        g = groups.setdefault(key, dict(bytes=0.0, flops=0.0, kernels=0, rate=GEMM_RATE))
        g["bytes"] += r.bytes
        g["kernels"] += r.kernels
        if r.flops:
            g["flops"] += r.flops
            g["rate"] = (ATTENTION_RATE if "attention" in r.name else
                         FP32_RATE if r.dtype == "float32" else GEMM_RATE)
    by_op: dict = {}  # device ms per outermost op name (a fused op's launches under its own name)
    for key, g in groups.items():
        ms = (max(g["bytes"] / BANDWIDTH, g["flops"] / g["rate"]) + g["kernels"] * per_kernel * 1e-6) * 1e3
        name = ops.records[key].name
        by_op[name] = by_op.get(name, 0.0) + ms
    device_ms = sum(by_op.values())
    by_op = dict(sorted(((n, ms) for n, ms in by_op.items() if ms > 0), key=lambda kv: -kv[1]))
    return dict(device_ms=device_ms, by_op=by_op, **ops.totals())


def measured(case, impl, build, tokens):
    """The row of one op case: ``build(device, tokens)`` -> phases, counted on meta tensors. No host time: an
    op's weight-sized work (casts, partial sums) cannot be made small in a CPU proxy without changing the op."""
    return row(case, impl, count(build(torch.device("meta"), tokens)), tokens=tokens)


def host_cpu_ms(phases, warmup=2, repeats=5) -> float:
    """Median CPU milliseconds (this thread's CPU time: robust to other processes on the machine) of running
    ``phases`` once, on one thread, with Triton launches skipped: the host-side proxy of a case."""
    from madx_fast.testing.gpu_plan import planned_gpu
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    try:
        with planned_gpu(host_proxy=True):
            for i in range(warmup + repeats):
                t = time.thread_time()
                for fn in phases.values():
                    fn()
                if i >= warmup:
                    times.append((time.thread_time() - t) * 1e3)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def row(case, impl, ops, proxy_ms=None, graphed=False, tokens=None):
    """One result: the counts, the device time and, from the host proxy's CPU time plus the Triton launches,
    the host time; the step is the slower of the two (the device alone when ``graphed``)."""
    out = dict(case=case, impl=impl, tokens=tokens, **predict(ops, graphed))
    if graphed:
        out["host_ms"] = 0.0
    elif proxy_ms is not None:
        out["proxy_cpu_ms"] = proxy_ms
        out["host_ms"] = proxy_ms + out["triton_launches"] * TRITON_LAUNCH_US * 1e-3
    out["predicted_ms"] = max(out["device_ms"], out.get("host_ms", 0.0))
    return out


# --------------------------------------------------------------------------------------------------------
# op cases
# --------------------------------------------------------------------------------------------------------
def _fwd_bwd(fwd, inputs, dy=None):
    """Phases: ``fwd()``, then the gradients of its output for ``inputs``."""
    state = {}

    def forward():
        state["y"] = fwd()

    def backward():
        y = state.pop("y")
        torch.autograd.grad(y, inputs, torch.empty_like(y) if dy is None else dy)
    return dict(forward=forward, backward=backward)


def _autocast(device):
    """bf16 autocast as on a GPU: CUDA's policy emulated on meta tensors, the real one on the CPU proxy."""
    from madx_fast.testing.gpu_plan import cuda_autocast
    return cuda_autocast(torch.bfloat16) if device.type == "meta" else torch.autocast("cpu", dtype=torch.bfloat16)


def _single(kind, impl, d=0, inverse=False):
    """``build(device, n)`` of a single op: bench_ops.py's case for fused / eager, AdapterHub's module (fp32
    weights, bf16 input under autocast) for adapterhub."""
    def build(device, n):
        bench_ops = _load("bench_ops")
        if impl == "adapterhub":
            return _adapterhub_op(kind, device, n, d, inverse)
        make, inputs, dy, _ = (bench_ops.adapter_case(n, H, d, torch.bfloat16, device) if kind == "adapter" else
                               bench_ops.nice_case(n, H, torch.bfloat16, device, inverse))
        return _fwd_bwd(make("triton" if impl == "fused" else "eager"), inputs, dy)
    return build


def _adapterhub_op(kind, device, n, d, inverse):
    from adapters import SeqBnConfig
    from adapters.methods.modeling import Adapter, NICECouplingBlock
    with device:
        module = (Adapter("a", H, d, SeqBnConfig()) if kind == "adapter"
                  else NICECouplingBlock([[H]], non_linearity="relu", reduction_factor=2))
    x = torch.randn(1, n, H, device=device, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)

    def fwd():
        with _autocast(device):
            return module(x, r)[0] if kind == "adapter" else module(x, rev=inverse)
    return _fwd_bwd(fwd, [x, r, *module.parameters()] if kind == "adapter" else [x, *module.parameters()])


def _grouped(kind, impl, d, languages):
    """``build(device, n)`` of a per-row op over ``n`` tokens in ``languages`` equal shares (rows of 128
    tokens, one language each): the grouped op (impl "fused") or the per-language loop of single ops."""
    from madx_fast import ops, reference

    def build(device, n):
        length = 128 if n >= 128 * languages else max(1, n // languages)
        rows = n // length
        groups = torch.arange(languages, device=device).repeat_interleave(rows // languages)
        shapes = ([(d, H), (d,), (H, d), (H,)] if kind == "adapter" else
                  list(reference.nice_weight_shapes(H, *reference.nice_hidden_sizes(H, 2)).values()))
        stacked = [(torch.randn(languages, *s, device=device) * 0.02).requires_grad_() for s in shapes]
        x = torch.randn(rows, length, H, device=device, dtype=torch.bfloat16, requires_grad=True)
        backend = "eager" if impl == "eager loop" else "triton"
        if impl == "fused":
            if kind == "adapter":
                return _fwd_bwd(lambda: ops.grouped_bottleneck_adapter(x, None, groups, *stacked), [x, *stacked])
            return _fwd_bwd(lambda: ops.grouped_nice_forward(x, groups, *stacked), [x, *stacked])
        parts = [p.detach().requires_grad_() for p in x.chunk(languages)]

        def loop():
            outs = []
            for g, part in enumerate(parts):
                w = [t[g] for t in stacked]
                outs.append(ops.bottleneck_adapter(part, None, *w, backend=backend) if kind == "adapter"
                            else ops.nice_forward(part, *w, backend=backend))
            return torch.cat(outs)
        return _fwd_bwd(loop, [*parts, *stacked])
    return build


def op_rows(size):
    """Every op case at ``size``: single ops against eager and AdapterHub, grouped ops against the loop."""
    spec, rows = SIZES[size], []
    single = [(f"adapter d={d}", "adapter", d, False) for d in spec["ds"]]
    single += [(f"nice {'inverse' if inv else 'forward'}", "nice", 0, inv) for inv in (False, True)]
    single_impls = ["fused", "eager"] + (["adapterhub"] if _adapterhub_importable() else [])
    grouped = [(f"grouped adapter d={d} G={spec['languages']}", "adapter", d) for d in spec["ds"]]
    grouped.append((f"grouped nice G={spec['languages']}", "nice", 0))
    for n in spec["tokens"]:
        for label, kind, d, inverse in single:
            rows += [measured(label, impl, _single(kind, impl, d, inverse), n) for impl in single_impls]
        for label, kind, d in grouped:
            rows += [measured(label, impl, _grouped(kind, impl, d, spec["languages"]), n)
                     for impl in ("fused", "fused loop", "eager loop")]
    return rows


def _adapterhub_importable():
    try:
        import adapters  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 (not installed, or refusing this transformers)
        return False


# --------------------------------------------------------------------------------------------------------
# model cases
# --------------------------------------------------------------------------------------------------------
def model_rows(size, lang_rf):
    """The steps of bench_train.py: counted on meta tensors at ``size`` (after a warm-up step: the optimizer
    makes its state then), and run on the CPU at the host-side proxy: the same layers, adapters and step at
    ``PROXY_WIDTHS`` and batch ``PROXY_SHAPE``, where the arithmetic is small beside the host's work."""
    from madx_fast.testing.gpu_plan import cuda_autocast
    bench = _load("bench_train")
    bench.SIZES["host-proxy"] = dict(bench.SIZES[size], **PROXY_WIDTHS)
    meta, cpu = torch.device("meta"), torch.device("cpu")

    def builders(impl, device, at):
        if impl == "adapterhub":  # real CPU autocast on the proxy, CUDA's emulated on meta tensors
            autocast = (lambda: cuda_autocast(torch.bfloat16)) if device.type == "meta" else None
            return bench.adapterhub_workloads(at, device, lang_rf, gpu=True, autocast=autocast)
        return bench.madx_fast_workloads(at, device, "eager" if impl == "eager" else None, lang_rf, gpu=True)
    shapes = bench.SHAPES[size]
    cases = [("mlm", *shapes["mlm"]), ("ner", *shapes["ner"])] + [("infer", b, l) for b, l in shapes["infer"]]
    impls = ["fused", "eager"] + (["adapterhub"] if _adapterhub_importable() else [])
    rows = []
    for workload, b, l in cases:
        label = f"{workload} B={b} L={l}"
        for impl in impls:
            with meta:
                step, _ = builders(impl, meta, size)[workload](b, l)
            count(dict(warmup=step))
            ops = count(dict(step=step))
            with cpu:
                proxy, _ = builders(impl, cpu, "host-proxy")[workload](*PROXY_SHAPE)
            rows.append(row(label, impl, ops, proxy_ms=host_cpu_ms(dict(step=proxy)), tokens=b * l))
            if impl == "fused":  # the step replayed from a CUDA graph: training as --cuda-graphs runs it
                rows.append(row(label, "graphs", _graphed_ops(bench, workload, size, lang_rf, b, l),
                                graphed=True, tokens=b * l))
    return rows


def _graphed_ops(bench, workload, size, lang_rf, b, l):
    """The device ops of a step replayed from a CUDA graph, counted as captured (``gpu_plan.graph_capture``:
    what runs fused only where it pays, does): a training step from the graphed step itself (padded shapes,
    the padded mask form; ``bench_train.py``'s ``*_graphs`` workloads), an inference forward from the fused
    one."""
    from madx_fast.testing.gpu_plan import graph_capture
    name = workload if workload == "infer" else f"{workload}_graphs"
    with torch.device("meta"):
        step, _ = bench.madx_fast_workloads(size, torch.device("meta"), None, lang_rf, gpu=True)[name](b, l)
    with graph_capture():
        count(dict(warmup=step))
        return count(dict(step=step))


def mixed_rows(size):
    """bench_mixed.py's eval forwards on meta tensors: one batch of rows in 8 languages (per-row adapters),
    the same rows as 8 per-language batches, and one language for the whole batch; each also from a graph.
    The host proxy runs the same forwards at ``PROXY_WIDTHS``, one ``PROXY_SHAPE[1]``-token row per language."""
    from madx_fast.testing.gpu_plan import graph_capture
    mixed = _load("bench_mixed")
    languages = tuple(f"l{i}" for i in range(SIZES[size]["languages"]))
    mixed.SIZES["host-proxy"] = dict(config=dict(mixed.SIZES[size]["config"], **PROXY_WIDTHS),
                                     batch=len(languages), length=PROXY_SHAPE[1])

    def workloads(device, at):
        with device:
            model, madx = mixed.build_model(at, device, languages, gpu=True)
        ids, mask, langs = mixed.make_batch(at, len(languages))
        return mixed.workloads(model, madx, languages, ids, mask, langs, "eager", device), ids.shape
    work, (b, length) = workloads(torch.device("meta"), size)
    proxy, _ = workloads(torch.device("cpu"), "host-proxy")
    rows = []
    for name in mixed.WORKLOADS:
        label = f"mixed-language infer B={b} L={length}"
        ops = count(dict(step=work[name][0]))
        rows.append(row(label, name, ops, proxy_ms=host_cpu_ms(dict(step=proxy[name][0])), tokens=b * length))
        with graph_capture():  # what runs fused only where it pays runs fused in a captured forward
            captured = count(dict(step=work[name][0]))
        rows.append(row(label, f"{name} graphs", captured, graphed=True, tokens=b * length))
    return rows


# --------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------
BASELINES = ("adapterhub", "eager loop", "eager", "loop")  # the first present in a case is its baseline


def add_ratios(rows):
    """``x_baseline``: the baseline's predicted time over this row's, per case; ``baseline`` names it (models:
    AdapterHub; single ops: eager; grouped ops: the eager per-language loop) and ``x_eager`` /
    ``x_adapterhub`` give both where present."""
    by_case: dict = {}
    for r in rows:
        by_case.setdefault((r["case"], r["tokens"]), {})[r["impl"]] = r
    for impls in by_case.values():
        models = any("B=" in r["case"] for r in impls.values())
        base = "adapterhub" if models and "adapterhub" in impls else next(
            (b for b in BASELINES[1:] if b in impls), None)
        for r in impls.values():
            r["baseline"] = base
            r["x_baseline"] = impls[base]["predicted_ms"] / r["predicted_ms"] if base else float("nan")
            for ref in ("eager", "adapterhub", "fused loop"):
                if ref in impls:
                    r[f"x_{ref.replace(' ', '_')}"] = impls[ref]["predicted_ms"] / r["predicted_ms"]
    return rows


# issue 21's targets: (what, case, impl, baseline, at least); ops at 65536 tokens
TARGETS = [
    ("adapter op d=48, fwd+bwd, vs eager", "adapter d=48", "fused", "eager", 2.9),
    ("adapter op d=384, fwd+bwd, vs eager", "adapter d=384", "fused", "eager", 2.0),
    ("NICE coupling, fwd+bwd, vs eager", "nice forward", "fused", "eager", 3.0),
    ("NICE inverse, fwd+bwd, vs eager", "nice inverse", "fused", "eager", 3.0),
    ("MLM step vs AdapterHub", "mlm B=64 L=256", "fused", "adapterhub", 5.0),
    ("MLM step from a CUDA graph vs AdapterHub", "mlm B=64 L=256", "graphs", "adapterhub", 5.0),
    ("NER step vs AdapterHub", "ner B=32 L=128", "fused", "adapterhub", 5.0),
    ("NER step from a CUDA graph vs AdapterHub", "ner B=32 L=128", "graphs", "adapterhub", 5.0),
    ("inference B=32 vs AdapterHub", "infer B=32 L=128", "fused", "adapterhub", 5.0),
    ("inference B=32 from a CUDA graph vs AdapterHub", "infer B=32 L=128", "graphs", "adapterhub", 5.0),
    ("inference B=256 from a CUDA graph vs AdapterHub", "infer B=256 L=128", "graphs", "adapterhub", 2.0),
    ("8 languages in one batch vs the per-language loop", "mixed-language infer B=256 L=128", "mixed", "loop", 2.0),
    ("the same, both from CUDA graphs", "mixed-language infer B=256 L=128", "mixed graphs", "loop graphs", 2.0),
]
TARGET_TOKENS = 65536


def target_rows(rows):
    """Each target with its predicted ratio (where the run has both rows)."""
    index = {(r["case"], r["impl"], r["tokens"]): r for r in rows}
    out = []
    for what, case, impl, base, goal in TARGETS:
        tokens = TARGET_TOKENS if "B=" not in case else next((t for c, i, t in index if c == case), None)
        mine, ref = index.get((case, impl, tokens)), index.get((case, base, tokens))
        if mine and ref:
            ratio = ref["predicted_ms"] / mine["predicted_ms"]
            out.append(dict(target=what, case=case, impl=impl, baseline=base, at_least=goal, predicted_x=ratio,
                            meets=ratio >= goal, predicted_ms=mine["predicted_ms"], baseline_ms=ref["predicted_ms"]))
    return out


def print_table(rows, out=sys.stdout):
    print(f"{'case':<26}{'tokens':>7} {'impl':<11}{'ops':>6}{'triton':>7}{'GFLOP':>9}{'GB':>8}{'dev ms':>9}"
          f"{'host ms':>9}{'pred ms':>9}{'x base':>8}  base", file=out)
    for r in rows:
        host = f"{r['host_ms']:>9.2f}" if "host_ms" in r else f"{'-':>9}"
        print(f"{r['case']:<26}{r['tokens']:>7} {r['impl']:<11}{r['kernels']:>6}{r['triton_launches']:>7}"
              f"{r['flops'] / 1e9:>9.1f}{r['bytes'] / 1e9:>8.3f}{r['device_ms']:>9.3f}{host}{r['predicted_ms']:>9.3f}"
              f"{r['x_baseline']:>8.2f}  {r['baseline'] or '-'}", file=out)


def print_markdown(rows, targets, out=sys.stdout):
    """The tables of docs/benchmarks.md: predicted, with an empty column for the measured figure (ops at the
    target size only; the printed table and the JSON hold every row)."""
    print("\n| target (H100) | at least | predicted | measured |\n|---|---|---|---|", file=out)
    for t in targets:
        print(f"| {t['target']} | {t['at_least']}x | {t['predicted_x']:.2f}x | |", file=out)
    print("\n| case | tokens | impl | device ops | Triton launches | GFLOP | GB | predicted ms | x baseline "
          "| measured ms | measured x |\n|---|---|---|---|---|---|---|---|---|---|---|", file=out)
    for r in rows:
        if "B=" not in r["case"] and r["tokens"] != TARGET_TOKENS:
            continue
        print(f"| {r['case']} | {r['tokens']} | {r['impl']} | {r['kernels']} | {r['triton_launches']} | "
              f"{r['flops'] / 1e9:.1f} | {r['bytes'] / 1e9:.3f} | {r['predicted_ms']:.3f} | "
              f"{r['x_baseline']:.2f} ({r['baseline']}) | | |", file=out)


def print_breakdown(rows, top=8, out=sys.stdout):
    """Where each row's predicted device time goes: the ops that take most of it (device ms per op name)."""
    for r in rows:
        print(f"\n# {r['case']} {r['impl']}: {r['device_ms']:.3f} device ms, of which", file=out)
        for name, ms in list(r["by_op"].items())[:top]:
            print(f"  {name:<52}{ms:>8.3f} ms  {ms / r['device_ms']:>5.1%}", file=out)


def constants():
    return dict(bandwidth_Bps=BANDWIDTH, gemm_flops=GEMM_RATE, attention_flops=ATTENTION_RATE, fp32_flops=FP32_RATE,
                kernel_us=KERNEL_US, graph_kernel_us=GRAPH_KERNEL_US, triton_launch_us=TRITON_LAUNCH_US,
                proxy_widths=PROXY_WIDTHS, proxy_shape=PROXY_SHAPE)


def run(args):
    import transformers
    import triton
    rows = []
    if "ops" in args.only:
        rows += op_rows(args.size)
    if "models" in args.only:
        rows += model_rows(args.size, args.lang_rf)
        rows += mixed_rows(args.size)
    add_ratios(rows)
    targets = target_rows(rows)
    versions = dict(torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__)
    print(f"# roofline (predictions, H100 model: {BANDWIDTH / 1e12:.2f} TB/s, {GEMM_RATE / 1e12:.0f} TFLOP/s bf16); "
          f"counted on meta tensors; " + "; ".join(f"{k} {v}" for k, v in versions.items()))
    print_table(rows)
    if targets:
        print("\n# targets (predicted)")
        for t in targets:
            print(f"{t['target']:<52}{t['predicted_x']:>6.2f}x  (>= {t['at_least']}: "
                  f"{'meets' if t['meets'] else 'short'})")
    if args.markdown:
        print_markdown(rows, targets)
    if args.breakdown:
        print_breakdown([r for r in rows if args.breakdown in f"{r['case']} {r['impl']}"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(size=args.size, lang_rf=args.lang_rf, versions=versions, model=constants(), rows=rows,
                           targets=targets), fh, indent=1)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="base")
    p.add_argument("--only", nargs="+", choices=["ops", "models"], default=["ops", "models"])
    p.add_argument("--lang-rf", type=float, default=16, help="language adapter reduction factor (as bench_train)")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--markdown", action="store_true", help="also print the tables of docs/benchmarks.md")
    p.add_argument("--breakdown", metavar="TEXT", help="also print the device time per op of the rows whose case "
                   "and impl contain TEXT (e.g. 'B=256 L=128 graphs')")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # the launchers plan for a GPU; their kernels are recorded, not run
    main()
