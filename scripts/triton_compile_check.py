"""Compile every Triton kernel for a GPU target on a machine without a GPU, and report its resources.

The Triton interpreter (how CI runs the kernels) never lowers them to GPU code, so an error that only the
real compiler sees (a type it rejects, a shape tl.dot refuses) would pass CI. This script runs the
launchers on `meta` tensors with the kernels replaced by recorders, then compiles each recorded launch
ahead of time for sm_90 (H100/H200) and reads the cubin's registers, stack (spills) and shared memory
with the cuobjdump that ships with Triton:

    python scripts/triton_compile_check.py              # the CI set: bf16 and fp32, H=768, d 48 and 384
                                                        # (+ grouped per-row kernels: bf16, 8 groups, L=128, d=384)
    python scripts/triton_compile_check.py --full       # every dtype, d in {4, 48, 192, 384}, all activations
    python scripts/triton_compile_check.py --arch 80    # another target (sm_80)

It exits non-zero when a kernel fails to compile, or when one spills more than --max-stack bytes.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # the launchers must pick GPU block sizes, the kernels stay JIT

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from madx_fast.kernels.triton import adapter, grouped, linear, nice, weight_grad  # noqa: E402
from madx_fast.reference import ACTIVATION_CODES  # noqa: E402

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
                 torch.int32: "i32"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages")
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block (opt-in maximum)


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the call instead of running it."""

    def __init__(self, fn, log, label):
        self.fn, self.log, self.label = fn, log, label

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.log.append((self.fn, self.label(), args, kwargs))
        return record


def _signature(fn, args, kwargs):
    sig, constexprs = {}, {}
    names = fn.arg_names
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + _TRITON_TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i64" if abs(value) >= 2**31 else "i32"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    for name, value in kwargs.items():
        if name in _LAUNCH_OPTIONS:
            continue
        sig[name] = "constexpr"
        constexprs[(names.index(name),)] = value
    return sig, constexprs


def _resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([tool, "--dump-resource-usage", fh.name], capture_output=True, text=True).stdout
    fields = {}
    for line in out.splitlines():
        if "REG:" in line:
            for item in line.split():
                if ":" in item:
                    key, _, val = item.partition(":")
                    if val.isdigit():
                        fields[key] = int(val)
    return fields


def record_launches(full: bool):
    """Run the launchers on meta tensors for the problem sizes that matter; return the recorded launches."""
    log = []
    current = {"label": ""}
    label = lambda: current["label"]  # noqa: E731
    for module, names in ((adapter, ["_adapter_fwd_kernel", "_adapter_bwd_da_kernel", "_adapter_bwd_dx_dw_kernel"]),
                          (nice, ["_nice_fwd_kernel", "_nice_bwd_kernel"]), (weight_grad, ["_tn_kernel"]),
                          (linear, ["_linear_kernel"]),
                          (grouped, ["_grouped_linear_kernel", "_grouped_tn_kernel", "_grouped_nice_fwd_kernel",
                                     "_grouped_nice_bwd_kernel"])):
        for name in names:
            setattr(module, name, _Recorder(getattr(module, name), log, label))
    # (the launchers call fused_linear / tokens_reduce, which look the patched kernels up as module globals)
    meta = torch.device("meta")
    n, h = 65536, 768
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if full else [torch.bfloat16, torch.float32]
    bottlenecks = [4, 48, 192, 384] if full else [48, 384]
    activations = sorted(set(ACTIVATION_CODES.values())) if full else [ACTIVATION_CODES["relu"]]
    for dt in dtypes:
        for d in bottlenecks:
            for act in activations:
                current["label"] = f"H={h} d={d} {str(dt)[6:]} act={act}"
                x = torch.empty(n, h, device=meta, dtype=dt)
                wd, bd = torch.empty(d, h, device=meta), torch.empty(d, device=meta)
                wu, bu = torch.empty(h, d, device=meta), torch.empty(h, device=meta)
                _, z = adapter.adapter_forward(x, x if d != 48 else None, wd, bd, wu, bu, 1.0, act)
                adapter.adapter_backward(x, x, z, wd, wu, 1.0, act, d == 48)
        for inverse in (False, True):
            current["label"] = f"H={h} {'inverse' if inverse else 'forward'} {str(dt)[6:]}"
            x = torch.empty(n, h, device=meta, dtype=dt)
            shapes = [(192, 384), (192,), (384, 192), (384,)] * 2
            w = [torch.empty(s, device=meta) for s in shapes]
            out = nice.nice_coupling(x, w, ACTIVATION_CODES["relu"], inverse)
            for inp in (None, x):
                nice.nice_coupling_backward(out, out, inp, w, ACTIVATION_CODES["relu"], inverse)
        if full or dt == torch.bfloat16:  # the CI set: the GPU inference dtype (keeps CI time small)
            _record_grouped(dt, current, full)
    return log


def _record_grouped(dt, current, full):
    """The grouped (per-row) kernels: 8 languages, rows of L=128 tokens (--full: also L=9, short rows and small
    blocks, every epilogue, activation and direction). The CI set compiles each grouped kernel once per
    variant that is new code (the tile code is shared with the single-adapter kernels compiled above)."""
    meta = torch.device("meta")
    g, h = 8, 768
    relu = ACTIVATION_CODES["relu"]
    lengths = [128, 9] if full else [128]
    bottlenecks = [48, 384] if full else [384]
    activations = sorted(set(ACTIVATION_CODES.values())) if full else [relu]
    shapes = [(g, 192, 384), (g, 192), (g, 384, 192), (g, 384)] * 2
    for length in lengths:
        rows = 256 if length == 128 else 1024
        groups = torch.empty(rows, device=meta, dtype=torch.int64)
        x = torch.empty(rows * length, h, device=meta, dtype=dt)
        for d in bottlenecks:
            for act in activations:
                current["label"] = f"grouped G={g} L={length} d={d} {str(dt)[6:]} act={act}"
                wd, bd = torch.empty(g, d, h, device=meta), torch.empty(g, d, device=meta)
                wu, bu = torch.empty(g, h, d, device=meta), torch.empty(g, h, device=meta)
                _, z = grouped.grouped_adapter_forward(x, x, groups, wd, bd, wu, bu, 1.0, act)
                if full:
                    grouped.grouped_adapter_backward(x, x, z, groups, wd, wu, 1.0, act, True, True, splits=2)
                else:  # the per-group weight reduction, with and without the activation on load
                    segments = grouped.row_segments(groups, g)
                    grouped.grouped_tokens_reduce(x, z, segments, g, length, act, splits=2)
                    grouped.grouped_tokens_reduce(z, x, segments, g, length, splits=2)
        w = [torch.empty(s, device=meta) for s in shapes]
        for inverse in (False, True) if full else (False,):
            current["label"] = f"grouped G={g} L={length} {'inverse' if inverse else 'forward'} {str(dt)[6:]}"
            out = grouped.grouped_nice_coupling(x, groups, w, relu, inverse)
            for inp in (None, x) if full else (None,):
                grouped.grouped_nice_coupling_backward(out, out, inp, groups, w, relu, inverse, full, splits=2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--max-stack", type=int, default=None, help="fail when a kernel spills more bytes than this")
    p.add_argument("--only", default="", help="compile only launches whose kernel name or problem contains this")
    args = p.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    seen, failures = set(), 0
    print(f"# triton {triton.__version__}, target sm_{args.arch}")
    print(f"{'kernel':<28}{'problem':<34}{'blocks':<40}{'warps':>6}{'regs':>6}{'stack':>7}{'smem':>8}")
    for fn, label, fargs, kwargs in record_launches(args.full):
        if args.only and args.only not in fn.__name__ and args.only not in label:
            continue
        sig, constexprs = _signature(fn, fargs, kwargs)
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())), kwargs.get("num_warps"))
        if key in seen:
            continue
        seen.add(key)
        blocks = " ".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in kwargs.items()
                          if k.startswith("BLOCK_"))
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target,
                                      options={o: kwargs[o] for o in _LAUNCH_OPTIONS if o in kwargs})
        except Exception as exc:  # report every failure, then fail
            failures += 1
            print(f"{fn.__name__:<28}{label:<34}{blocks:<40} COMPILE ERROR: {str(exc).splitlines()[0][:200]}")
            continue
        res = _resources(compiled.asm["cubin"])
        if compiled.metadata.shared > SHARED_LIMIT[args.arch]:
            failures += 1
            print(f"{fn.__name__:<28}{label:<34}{blocks:<40} needs {compiled.metadata.shared} B of shared memory")
        stack = res.get("STACK", -1)
        print(f"{fn.__name__:<28}{label:<34}{blocks:<40}{kwargs.get('num_warps', 4):>6}{res.get('REG', -1):>6}"
              f"{stack:>7}{compiled.metadata.shared:>8}")
        if args.max_stack is not None and stack > args.max_stack:
            failures += 1
    print(f"# {len(seen)} kernels compiled, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
