"""Compile every Triton kernel for a GPU target on a machine without a GPU, and report its resources.

The Triton interpreter (how CI runs the kernels) never lowers them to GPU code, so an error that only the
real compiler sees (a type it rejects, a global it refuses, a shape tl.dot refuses, too much shared memory)
would pass CI. This script runs the launchers on `meta` tensors with every launch intercepted, derives
each launch's specialization the way the JIT does (unit strides as constants, 16-divisibility attributes:
``madx_fast.kernels.triton.aot``, shared with scripts/kernel_report.py), compiles each distinct one ahead
of time for sm_90 (H100/H200) and reads the cubin's registers, stack (spills) and shared memory with the
cuobjdump that ships with Triton:

    python scripts/triton_compile_check.py              # quick set: bf16 and fp32, d 48 and 384, relu
    python scripts/triton_compile_check.py --full       # every code path and configuration (what CI runs)
    python scripts/triton_compile_check.py --all        # every specialization the library can launch
    python scripts/triton_compile_check.py --full --jobs 2    # across 2 processes (default: all cores)
    python scripts/triton_compile_check.py --arch 80    # another target (sm_80)

What varies a kernel at compile time: its flags (activation, separate residual or not, GEMM epilogue, NICE
direction, input saved or rebuilt), the storage dtype (bf16, fp16, fp32; fp32 also with TF32 products when
torch's allow_tf32 is on) and the block configuration (from the bottleneck width d and the NICE hidden
width). The activations compute in float32 whatever the storage dtype (every kernel converts before
calling them), so activation code and dtype-dependent code (loads, casts, tl.dot) do not interact.
``--full`` therefore crosses them instead of multiplying them out:

* every activation on every route in bf16: the one-kernel adapter (d=48), the GEMM route (d=384, all
  epilogues and weight-gradient reductions), NICE (hidden width 192) with the input saved or rebuilt;
* every dtype, and fp32 with TF32, on every route with relu, NICE in both directions on both of its routes
  (H=768: the fused kernels; H=1536, 384 hidden units: the GEMM route with its lost-row epilogues);
* every block configuration with relu in bf16 and fp32 (fp16 tiles are bf16's): d=4 and d=96 (bottleneck
  tiles 16 and 128 beside d=48's 64), NICE hidden width 16, and NICE at H=1024 (hidden width 256, as in
  XLM-R large: the fused kernels' chunked configuration of hidden widths over 192; wider models take the GEMM
  route, compiled at H=1536). The
  adapters' block configurations do not depend on H, so d=4..384 cover every model's bottleneck tiles.

The grouped (per-row language) kernels of ``grouped.py`` are recorded for 8 languages with rows of 128
tokens: the quick set in bf16 with relu, ``--full`` also fp16, fp32, NICE at H=1536 (the GEMM route), gelu,
short rows (9 tokens: blocks cut at row ends) and d=48 (their activation code is the same device functions
the other kernels compile with every activation); ``--all`` every combination.

The averaged-adapter kernels of ``average.py`` (an ``Average`` of K=3 adapters, and per-row ensembles of 4
groups) likewise: the quick set in bf16 with relu, ``--full`` also fp16, fp32, gelu, d=48, short rows and the
input as the residual.

The kernels that stand in for the backbone's own ops (``_record_backbone``): the fused residual add +
LayerNorm, the FFN intermediate's Linear + activation (the GEMM's ``EPI_BIAS_ACT`` epilogue) and the MLM
decoder's loss kernel; the quick set in bf16, ``--full`` in every dtype at the smallest and largest rows
the add + LayerNorm plans, every activation on the intermediate, and two vocabulary sizes.

``--all`` multiplies everything out (also d=24 and 192, every activation in every dtype, block
configuration and direction): about 2200 specializations, against about 400 for ``--full`` and 76 for the
quick set. Launches that compile to the same specialization are compiled once.

It exits non-zero when a kernel fails to compile, needs more shared memory than the target has, or spills
more than --max-stack bytes.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import multiprocessing
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the launchers must pick GPU block sizes, the kernels stay JIT
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT default (3.9 warns when it is unset)

import torch  # noqa: E402
import triton  # noqa: E402

from madx_fast.kernels.triton import adapter, add_norm, aot, average, grouped, linear, lm_loss, nice  # noqa: E402
from madx_fast import reference  # noqa: E402
from madx_fast.reference import ACTIVATION_CODES  # noqa: E402

SHARED_LIMIT = aot.SHARED_LIMIT
# Hidden sizes of other models whose fused NICE block configuration differs from H=768's: 1024 (XLM-R large:
# hidden width 256, 16-wide chunks in bf16/fp16). From H=1536 on NICE takes the GEMM route (nice.route), whose
# kernels are the same at every width and are compiled at 1536.
OTHER_NICE_H = (1024,)


@contextlib.contextmanager
def _tf32(enabled: bool):
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _problems(mode: str):
    """(kind, dtype, size, activation, tf32, NICE directions) of every launcher call to record: "quick",
    "full" or "all" (see the module doc)."""
    relu, bf16, fp16, fp32 = ACTIVATION_CODES["relu"], torch.bfloat16, torch.float16, torch.float32
    every = sorted(set(ACTIVATION_CODES.values()))
    both = (False, True)
    if mode == "quick":
        for dt in (bf16, fp32):
            yield from [("adapter", dt, 48, relu, False, None), ("adapter", dt, 384, relu, False, None),
                        ("nice", dt, 768, relu, False, both)]
    elif mode == "full":
        for act in every:  # every activation on every route, in bf16
            yield from [("adapter", bf16, 48, act, False, None), ("adapter", bf16, 384, act, False, None),
                        ("nice", bf16, 768, act, False, (False,))]
        for dt, tf32 in ((bf16, False), (fp16, False), (fp32, False), (fp32, True)):  # every dtype, relu
            yield from [("adapter", dt, 48, relu, tf32, None), ("adapter", dt, 384, relu, tf32, None),
                        ("nice", dt, 768, relu, tf32, both), ("nice", dt, 1536, relu, tf32, both)]
        for dt in (bf16, fp32):  # the other block configurations
            yield from [("adapter", dt, 4, relu, False, None), ("adapter", dt, 96, relu, False, None),
                        ("nice", dt, 64, relu, False, (False,))]
        for dt in (bf16, fp32):  # NICE of the larger models: wider hidden chunks, 16-wide K steps
            yield from [("nice", dt, h, relu, False, (False,)) for h in OTHER_NICE_H]
    else:
        for dt, tf32 in ((bf16, False), (fp16, False), (fp32, False), (fp32, True)):
            for act in every:
                for d in (4, 24, 48, 96, 192, 384):
                    yield "adapter", dt, d, act, tf32, None
                for h in (64, 768, 1536):
                    yield "nice", dt, h, act, tf32, both


def record_launches(mode: str):
    """Run the launchers on meta tensors for the problems of ``_problems``; return the recorded launches."""
    log = []
    current = {"label": ""}
    with aot.recording(log, lambda: current["label"]):
        _record_single(mode, current)
        _record_grouped(mode, current)
        _record_average(mode, current)
        _record_backbone(mode, current)
    return log


def _record_single(mode: str, current: dict) -> None:
    meta = torch.device("meta")
    n = 65536
    for kind, dt, size, act, tf32, inverses in _problems(mode):
        tag = f"{str(dt)[6:]}{' tf32' if tf32 else ''} act={act}"
        with _tf32(tf32):
            if kind == "adapter":
                h, d = 768, size
                x = torch.empty(n, h, device=meta, dtype=dt)
                wd, bd = torch.empty(d, h, device=meta), torch.empty(d, device=meta)
                wu, bu = torch.empty(h, d, device=meta), torch.empty(h, device=meta)
                for residual in (x, None):  # a separate residual, or the input as the residual
                    current["label"] = f"H={h} d={d} {tag}"
                    _, z = adapter.adapter_forward(x, residual, wd, bd, wu, bu, 1.0, act)
                    adapter.adapter_backward(x, x, z, wd, wu, 1.0, act, residual is None)
            else:
                h = size
                x = torch.empty(n, h, device=meta, dtype=dt)
                w = [torch.empty(s, device=meta) for s in _nice_shapes(h)]
                for inverse in inverses:
                    current["label"] = f"H={h} {'inverse' if inverse else 'forward'} {tag}"
                    out = nice.nice_coupling(x, w, act, inverse)
                    for inp in (None, x):  # input rebuilt, or saved
                        nice.nice_coupling_backward(out, out, inp, w, act, inverse)


def _nice_shapes(h: int):
    """The eight NICE weight shapes at hidden size h, rf 2 (H=1536 and wider: the GEMM route)."""
    return list(reference.nice_weight_shapes(h, *reference.nice_hidden_sizes(h, 2)).values())


def _record_grouped(mode: str, current: dict) -> None:
    """The grouped (per-row) kernels: 8 languages, rows of 128 tokens (and 9: blocks cut at row ends)."""
    meta = torch.device("meta")
    g = 8
    relu, every = ACTIVATION_CODES["relu"], sorted(set(ACTIVATION_CODES.values()))
    if mode == "quick":
        problems = [(torch.bfloat16, 128, 768, 384, relu)]
    elif mode == "full":  # (the activation code is the device functions the other kernels compile with every one)
        gelu = ACTIVATION_CODES["gelu"]
        problems = [(dt, 128, h, 384, relu) for dt in (torch.bfloat16, torch.float16, torch.float32)
                    for h in (768, 1536)]
        problems += [(torch.bfloat16, 128, 768, 384, gelu), (torch.bfloat16, 9, 768, 384, relu),
                     (torch.float32, 9, 768, 48, relu)]
    else:
        problems = [(dt, length, h, d, act) for dt in (torch.bfloat16, torch.float16, torch.float32)
                    for length in (128, 9) for h, d in ((768, 48), (768, 384), (1536, 384)) for act in every]
    for dt, length, h, d, act in problems:
        rows = 256 if length == 128 else 1024
        groups = torch.empty(rows, device=meta, dtype=torch.int64)
        x = torch.empty(rows * length, h, device=meta, dtype=dt)
        current["label"] = f"grouped G={g} L={length} H={h} d={d} {str(dt)[6:]} act={act}"
        wd, bd = torch.empty(g, d, h, device=meta), torch.empty(g, d, device=meta)
        wu, bu = torch.empty(g, h, d, device=meta), torch.empty(g, h, device=meta)
        _, z = grouped.grouped_adapter_forward(x, x, groups, wd, bd, wu, bu, 1.0, act)
        grouped.grouped_adapter_backward(x, x, z, groups, wd, wu, 1.0, act, True, True, splits=2)
        if d == 384:  # NICE rf 2: the fused route at H=768, the GEMM route at 1536
            w = [torch.empty((g, *s), device=meta) for s in _nice_shapes(h)]
            for inverse in (False, True):
                current["label"] = (f"grouped G={g} L={length} H={h} {'inverse' if inverse else 'forward'} "
                                    f"{str(dt)[6:]}")
                out = grouped.grouped_nice_coupling(x, groups, w, act, inverse)
                for inp in (None, x):
                    grouped.grouped_nice_coupling_backward(out, out, inp, groups, w, act, inverse, True, splits=2)


def _record_average(mode: str, current: dict) -> None:
    """The averaged-adapter kernels (``average.py``): K=3 adapters, one ensemble for the batch and per-row
    ensembles (4 groups, rows of 128 tokens and of 9); the quick set bf16 relu, ``--full`` also fp16, fp32,
    gelu, d=48 and the input as the residual, ``--all`` every combination."""
    meta = torch.device("meta")
    k, g, h = 3, 4, 768
    relu, every = ACTIVATION_CODES["relu"], sorted(set(ACTIVATION_CODES.values()))
    if mode == "quick":
        problems = [(torch.bfloat16, 128, 384, relu, False)]
    elif mode == "full":
        problems = [(dt, 128, 384, relu, False) for dt in (torch.bfloat16, torch.float16, torch.float32)]
        problems += [(torch.bfloat16, 128, 384, ACTIVATION_CODES["gelu"], False), (torch.bfloat16, 9, 48, relu, True),
                     (torch.float32, 9, 48, relu, True)]
    else:
        problems = [(dt, length, d, act, same) for dt in (torch.bfloat16, torch.float16, torch.float32)
                    for length in (128, 9) for d in (48, 384) for act in every for same in (False, True)]
    for dt, length, d, act, same in problems:
        rows = 256 if length == 128 else 1024
        x = torch.empty(rows * length, h, device=meta, dtype=dt)
        residual = None if same else torch.empty_like(x)
        for groups in (None, torch.empty(rows, device=meta, dtype=torch.int64)):
            lead = (k,) if groups is None else (g, k)
            current["label"] = f"average K={k}{'' if groups is None else f' G={g}'} L={length} d={d} {str(dt)[6:]}"
            mix = torch.empty(lead, device=meta)
            wd, bd = torch.empty(*lead, d, h, device=meta), torch.empty(*lead, d, device=meta)
            wu, bu = torch.empty(*lead, h, d, device=meta), torch.empty(*lead, h, device=meta)
            _, z = average.average_adapter_forward(x, residual, groups, mix, wd, bd, wu, bu, 1.0, act)
            average.average_adapter_backward(x, x, z, residual, groups, mix, wd, wu, bu, 1.0, act, same, True,
                                             groups is None, splits=2)


def _record_backbone(mode: str, current: dict) -> None:
    """The kernels that stand in for the backbone's own ops: the fused residual add + LayerNorm (forward, and
    its backward with the LayerNorm frozen and trained), the FFN intermediate's Linear + activation
    (``linear.EPI_BIAS_ACT``, inference) and the MLM decoder's loss (``lm_loss``, with and without the
    gradient). Their block configurations depend on the hidden size (add + LayerNorm: the row's power of two)
    and the vocabulary, not on the adapters. The quick set: bf16 at H=768; ``--full`` also fp16, fp32 (TF32 for
    the GEMM), the LayerNorm's weights in fp32 beside bf16 activations (the op takes weights of any float
    dtype, and fp32 ones for None), H=64 and 4096 (the
    smallest and largest rows the add + LayerNorm plans), every activation on the intermediate in bf16, and
    a vocabulary of 1000 (one block); ``--all`` every activation in every dtype."""
    meta = torch.device("meta")
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    gelu, every = ACTIVATION_CODES["gelu"], sorted(set(ACTIVATION_CODES.values()))
    if mode == "quick":
        norms, denses, losses = [(bf16, bf16, 768)], [(bf16, False, gelu)], [(bf16, 250002)]
    else:
        dtypes = (bf16, fp16, fp32)
        norms = [(dt, dt, h) for dt in dtypes for h in (768, 4096)] + [(bf16, fp32, 768), (fp32, fp32, 64)]
        denses = [(bf16, False, act) for act in every] + [(dt, tf32, gelu) for dt, tf32 in
                                                          ((fp16, False), (fp32, False), (fp32, True))]
        if mode == "all":
            denses = [(dt, tf32, act) for dt, tf32 in ((bf16, False), (fp16, False), (fp32, False), (fp32, True))
                      for act in every]
        losses = [(dt, v) for dt in dtypes for v in (250002, 1000)]
    n = 65536
    for dt, wdt, h in norms:
        current["label"] = f"add+LN H={h} {str(dt)[6:]} LN {str(wdt)[6:]}"
        x, r = torch.empty(n, h, device=meta, dtype=dt), torch.empty(n, h, device=meta, dtype=dt)
        w, b = torch.empty(h, device=meta, dtype=wdt), torch.empty(h, device=meta, dtype=wdt)
        _, stats = add_norm.add_layer_norm_forward(x, r, w, b, 1e-5)
        for trained in (False, True):
            add_norm.add_layer_norm_backward(x, x, r, w, stats, trained)
    for dt, tf32, act in denses:
        h = 768
        current["label"] = f"FFN H={h}->{4 * h} {str(dt)[6:]}{' tf32' if tf32 else ''} act={act}"
        x = torch.empty(n, h, device=meta, dtype=dt)
        w, b = torch.empty(4 * h, h, device=meta, dtype=dt), torch.empty(4 * h, device=meta, dtype=dt)
        with _tf32(tf32):
            linear.fused_linear(x, w, (w.stride(0), w.stride(1)), 4 * h, linear.EPI_BIAS_ACT, bias=b, activation=act)
    for dt, vocab in losses:
        current["label"] = f"MLM loss V={vocab} {str(dt)[6:]}"
        logits = torch.empty(4096, vocab, device=meta, dtype=dt)
        targets, count = torch.empty(4096, device=meta, dtype=torch.int64), torch.empty(1, device=meta)
        for grad in (False, True):
            lm_loss.softmax_cross_entropy(logits, targets, count, -100, grad)


def compile_tasks(mode: str, arch: int = 90):
    """The distinct specializations to compile: ``[(aot.Spec, label, blocks)]``."""
    seen, tasks = set(), []
    for launch in record_launches(mode):
        spec = aot.specialize(launch, arch)
        if spec.key() in seen:
            continue
        seen.add(spec.key())
        blocks = " ".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in launch.kwargs.items()
                          if k.startswith("BLOCK_") or k[:2] in ("HA", "HB"))
        tasks.append((spec, launch.case, blocks))
    return tasks


def compile_one(task, arch: int, max_stack):
    """Compile one specialization; return (its report line, whether it failed)."""
    spec, label, blocks = task
    head = f"{spec.name:<28}{label:<42}{blocks:<40}"
    res = aot.measure(spec, arch)
    if "error" in res:
        return f"{head} COMPILE ERROR: {res['error']}", True
    stack, shared = res["spill_bytes"], res["shared_bytes"]
    line = f"{head}{spec.options.get('num_warps', 4):>6}{res['registers']:>6}{stack:>7}{shared:>8}  {res['mma']}"
    if shared > SHARED_LIMIT[arch]:
        return f"{line}  needs {shared} B of shared memory (limit {SHARED_LIMIT[arch]})", True
    if max_stack is not None and stack > max_stack:
        return f"{line}  spills more than {max_stack} B", True
    return line, False


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sets = p.add_mutually_exclusive_group()
    sets.add_argument("--full", action="store_true", help="every code path and configuration (see above; CI)")
    sets.add_argument("--all", action="store_true", help="every specialization the library can launch")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: all cores)")
    p.add_argument("--max-stack", type=int, default=None, help="fail when a kernel spills more bytes than this")
    p.add_argument("--only", default="", help="compile only launches whose kernel name or problem contains this")
    args = p.parse_args(argv)
    mode = "all" if args.all else "full" if args.full else "quick"
    tasks = [t for t in compile_tasks(mode, args.arch) if not args.only or args.only in t[0].name or args.only in t[1]]
    print(f"# triton {triton.__version__}, target sm_{args.arch}, {mode} set: {len(tasks)} specializations, "
          f"{min(args.jobs, len(tasks))} processes", flush=True)
    print(f"{'kernel':<28}{'problem':<42}{'blocks':<40}{'warps':>6}{'regs':>6}{'stack':>7}{'smem':>8}  mma")
    failures = 0
    with contextlib.ExitStack() as stack:
        if args.jobs <= 1:
            results = (compile_one(t, args.arch, args.max_stack) for t in tasks)
        else:
            # fresh processes (spawn): they import the real kernels, not this process's recorders
            pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
                args.jobs, mp_context=multiprocessing.get_context("spawn")))
            results = pool.map(compile_one, tasks, [args.arch] * len(tasks), [args.max_stack] * len(tasks),
                               chunksize=2)
        for line, failed in results:  # in order, as they come
            print(line, flush=True)
            failures += failed
    print(f"# {len(tasks)} kernels compiled, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
