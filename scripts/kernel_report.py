"""Kernel report: every Triton kernel the library launches at the target shapes, compiled for sm_90 as the JIT
would compile it, with its grid, registers, spills, shared memory and tensor-core instruction kind.

    python scripts/kernel_report.py --json report.json           # all cases (what CI runs)
    python scripts/kernel_report.py --markdown                   # the tables of docs/triton_kernels.md
    python scripts/kernel_report.py --only nice --jobs 2         # cases or kernels containing "nice"

Cases (bf16 activations, fp32 master weights as in training, relu): the bottleneck adapter forward and
backward at H=768 with d=48 (task adapters, rf 16) and d=384 (language adapters, rf 2); NICE forward and
inverse with their backward in both modes (input rebuilt / saved); the grouped (per-row) kernels with 8
languages; the averaged adapters (an ``Average`` of K = 2, 4, 8 language adapters, d=384, coefficients
with gradients as test-time ensembling needs them); each at 65536 tokens (B=64 x L=1024 or 256 x 256 rows)
and 4096 (the NER batch, 32 x 128); and the
hidden sizes of the other models users adapt (1024: XLM-R large; 1536: DeBERTa-v2 xlarge; 2048: Llama 3.2 1B;
2560: XLM-R XL; 4096: XLM-R XXL, Llama/Mistral 7B) with the bottlenecks of rf 16 and 2, their NICE (rf 2:
the GEMM route from H=1536 on) and their grouped NICE; MAD-X's residual add + LayerNorm (forward, and backward
with the backbone's LayerNorm frozen or trained) at every hidden size; the MLM decoder's loss kernel on a
GPU-sized chunk of XLM-R's logits (V=250002, 15% of the tokens masked); the backbone FFN's intermediate
Linear with GELU in its epilogue (H=768 -> 3072, bf16 weights: the fused inference path).

The launches are recorded by running the real launchers on meta tensors (``madx_fast.kernels.triton.aot``):
the JIT's own specialization (unit strides as constants, 16-divisibility), the launchers' own block sizes,
grids and warps (planned for 132 SMs). One JSON record per launch:
``{"kernel", "case", "tokens", "dtype", "grid", "num_warps", "num_stages", "registers", "spill_bytes",
"shared_bytes", "mma"}``; ``mma`` is "wgmma", "mma.sync" or "none" as read from the PTX. Identical
specializations compile once (and Triton's on-disk cache keeps them across runs).

Exits non-zero when any kernel at any of these shapes fails to compile, needs more shared memory than sm_90
has (227 KB a block), spills, or uses mma.sync (not Hopper's wgmma) in a bf16 kernel.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the launchers must pick GPU block sizes, the kernels stay JIT
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT default (3.9 warns when it is unset)

import torch  # noqa: E402
import triton  # noqa: E402

from madx_fast.kernels.triton import add_norm, aot, grouped, linear, lm_loss  # noqa: E402
from madx_fast.kernels.triton import average as averaged  # noqa: E402
from madx_fast.kernels.triton import adapter as single  # noqa: E402
from madx_fast.kernels.triton import nice as coupling  # noqa: E402
from madx_fast.reference import ACTIVATION_CODES, nice_hidden_sizes, nice_split  # noqa: E402

ARCH = 90
MAIN_H = 768
OTHER_H = (1024, 1536, 2048, 2560, 4096)
TOKENS = (65536, 4096)
LANGUAGES = 8
VOCAB = 250002  # XLM-R's vocabulary: the MLM decoder's logits
MASKED = 0.15  # the share of tokens the MLM objective predicts
META = torch.device("meta")
FIELDS = ("kernel", "case", "tokens", "dtype", "grid", "num_warps", "num_stages", "registers", "spill_bytes",
          "shared_bytes", "mma")


def _rows(tokens: int) -> tuple[int, int]:
    """(sequence rows B, tokens per row L) of a grouped batch: L=256 for the MLM batch, 128 for NER."""
    length = 256 if tokens >= 65536 else 128
    return tokens // length, length


def _adapter(h, d, tokens, dt, act):
    x, r = torch.empty(tokens, h, device=META, dtype=dt), torch.empty(tokens, h, device=META, dtype=dt)
    wd, bd = torch.empty(d, h, device=META), torch.empty(d, device=META)
    wu, bu = torch.empty(h, d, device=META), torch.empty(h, device=META)
    yield "forward"
    _, z = single.adapter_forward(x, r, wd, bd, wu, bu, 1.0, act)
    yield "backward"
    single.adapter_backward(x, x, z, wd, wu, 1.0, act, False)


def nice_weights(h, groups=None):
    """fp32 NICE weights (rf 2) on the meta device, stacked over ``groups`` when given."""
    len1, len2 = nice_split(h)
    hf, hg = nice_hidden_sizes(h, 2)
    shapes = [(hf, len2), (hf,), (len1, hf), (len1,), (hg, len1), (hg,), (len2, hg), (len2,)]
    lead = (groups,) if groups else ()
    return [torch.empty(lead + s, device=META) for s in shapes]


def _nice(h, tokens, dt, act, inverse):
    x, w = torch.empty(tokens, h, device=META, dtype=dt), nice_weights(h)
    yield "coupling"
    out = coupling.nice_coupling(x, w, act, inverse)
    yield "backward, input rebuilt"
    coupling.nice_coupling_backward(out, out, None, w, act, inverse)
    yield "backward, input saved"
    coupling.nice_coupling_backward(out, out, x, w, act, inverse)


def _grouped_adapter(h, d, tokens, dt, act):
    rows, length = _rows(tokens)
    groups = torch.empty(rows, device=META, dtype=torch.int64)
    x = torch.empty(tokens, h, device=META, dtype=dt)
    wd, bd = torch.empty(LANGUAGES, d, h, device=META), torch.empty(LANGUAGES, d, device=META)
    wu, bu = torch.empty(LANGUAGES, h, d, device=META), torch.empty(LANGUAGES, h, device=META)
    yield "forward"
    _, z = grouped.grouped_adapter_forward(x, x, groups, wd, bd, wu, bu, 1.0, act)
    yield "backward"
    grouped.grouped_adapter_backward(x, x, z, groups, wd, wu, 1.0, act, False, True)


def _grouped_nice(h, tokens, dt, act, inverse):
    rows, _ = _rows(tokens)
    groups = torch.empty(rows, device=META, dtype=torch.int64)
    x, w = torch.empty(tokens, h, device=META, dtype=dt), nice_weights(h, LANGUAGES)
    yield "coupling"
    out = grouped.grouped_nice_coupling(x, groups, w, act, inverse)
    yield "backward, input rebuilt"
    grouped.grouped_nice_coupling_backward(out, out, None, groups, w, act, inverse, True)
    yield "backward, input saved"
    grouped.grouped_nice_coupling_backward(out, out, x, groups, w, act, inverse, True)


def _average(h, d, k, tokens, dt, act):
    x = torch.empty(tokens, h, device=META, dtype=dt)
    mix = torch.empty(k, device=META)
    wd, bd = torch.empty(k, d, h, device=META), torch.empty(k, d, device=META)
    wu, bu = torch.empty(k, h, d, device=META), torch.empty(k, h, device=META)
    yield "forward"
    _, z = averaged.average_adapter_forward(x, x, None, mix, wd, bd, wu, bu, 1.0, act)
    yield "backward"
    averaged.average_adapter_backward(x, x, z, x, None, mix, wd, wu, bu, 1.0, act, False, True, True)


def _mlm_loss(rows, dt):
    logits = torch.empty(rows, VOCAB, device=META, dtype=dt)
    targets, count = torch.empty(rows, device=META, dtype=torch.int64), torch.empty(1, device=META)
    yield "loss"
    lm_loss.softmax_cross_entropy(logits, targets, count, -100, False)
    yield "loss and gradient"
    lm_loss.softmax_cross_entropy(logits, targets, count, -100, True)


def _add_norm(h, tokens, dt):
    x, r = torch.empty(tokens, h, device=META, dtype=dt), torch.empty(tokens, h, device=META, dtype=dt)
    w, b = torch.empty(h, device=META, dtype=dt), torch.empty(h, device=META, dtype=dt)  # the backbone's LN
    yield "forward"
    _, stats = add_norm.add_layer_norm_forward(x, r, w, b, 1e-5)
    yield "backward, frozen LN"
    add_norm.add_layer_norm_backward(x, x, r, w, stats, False)
    yield "backward, LN trained"
    add_norm.add_layer_norm_backward(x, x, r, w, stats, True)


def _dense_activation(h, n, tokens, dt):
    x = torch.empty(tokens, h, device=META, dtype=dt)
    w, b = torch.empty(n, h, device=META, dtype=dt), torch.empty(n, device=META, dtype=dt)  # the backbone's
    yield "forward"
    linear.fused_linear(x, w, (w.stride(0), w.stride(1)), n, linear.EPI_BIAS_ACT, bias=b,
                        activation=ACTIVATION_CODES["gelu"])


def problems():
    """(case label, tokens, generator of phases that launches the kernels) for every target shape."""
    from madx_fast.model.mlm_loss import CHUNK_BYTES_GPU, default_chunk_size  # here: the compiler processes
    # (spawned, they import this script) need not import transformers
    dt, act = torch.bfloat16, ACTIVATION_CODES["relu"]
    for h in (MAIN_H,) + OTHER_H:
        for tokens in TOKENS:
            for rf in (16, 2):
                d = h // rf
                yield f"adapter H={h} d={d}", tokens, _adapter(h, d, tokens, dt, act)
            for inverse in (False, True):
                yield f"NICE H={h} ({'inverse' if inverse else 'forward'})", tokens, _nice(h, tokens, dt, act, inverse)
            yield f"add + LayerNorm H={h} (bf16 LN weights)", tokens, _add_norm(h, tokens, dt)
            if h == MAIN_H:  # the decoder's loss kernel, on a chunk of the masked tokens' logits (GPU chunk size)
                rows = default_chunk_size(int(tokens * MASKED), VOCAB, 2, CHUNK_BYTES_GPU)
                yield f"MLM loss H={h} V={VOCAB} {rows} rows", tokens, _mlm_loss(rows, dt)
                yield f"FFN intermediate H={h} -> {4 * h} + GELU", tokens, _dense_activation(h, 4 * h, tokens, dt)
    for h in (MAIN_H,) + OTHER_H:
        for tokens in TOKENS:
            rows, length = _rows(tokens)
            if h == MAIN_H:  # the grouped adapter runs the GEMM route at every size: its shapes at the targets
                for d in (48, 384):
                    yield (f"grouped adapter G={LANGUAGES} H={h} d={d} {rows}x{length}", tokens,
                           _grouped_adapter(h, d, tokens, dt, act))
            for inverse in (False, True):
                yield (f"grouped NICE G={LANGUAGES} H={h} {rows}x{length} ({'inverse' if inverse else 'forward'})",
                       tokens, _grouped_nice(h, tokens, dt, act, inverse))
    for tokens in TOKENS:  # the averaged adapters (test-time ensembles) at the main width
        for k in (2, 4, 8):
            yield f"Average K={k} H={MAIN_H} d=384", tokens, _average(MAIN_H, 384, k, tokens, dt, act)


def record(only: str = ""):
    """Every launch of every case (or of those whose case or kernel name contains ``only``):
    ``[(aot.Launch, tokens)]``."""
    launches, label, tokens_of = [], {"case": ""}, []
    with aot.recording(launches, lambda: label["case"]):
        for case, tokens, phases in problems():
            for phase in phases:  # advancing the generator runs the phase's launchers
                label["case"] = f"{case}: {phase}"
            tokens_of.extend([tokens] * (len(launches) - len(tokens_of)))
    return [(launch, tokens) for launch, tokens in zip(launches, tokens_of)
            if not only or only in launch.case or only in launch.fn.__name__]


def measure_all(launches, jobs: int):
    """Compile each distinct specialization once (in ``jobs`` processes); one record per launch."""
    specs = [aot.specialize(launch, ARCH) for launch, _ in launches]
    distinct = list({spec.key(): spec for spec in specs}.values())
    if jobs <= 1:
        measured = [aot.measure(spec, ARCH) for spec in distinct]
    else:  # fresh processes (spawn): they import the real kernels, not this process's recording
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            measured = list(pool.map(aot.measure, distinct, [ARCH] * len(distinct)))
    by_key = {spec.key(): m for spec, m in zip(distinct, measured)}
    records = []
    for (launch, tokens), spec in zip(launches, specs):
        dtypes = [str(a.dtype)[6:] for a in launch.args if isinstance(a, torch.Tensor) and a.dtype.is_floating_point]
        rec = {"kernel": launch.fn.__name__, "case": launch.case, "tokens": tokens,
               "dtype": dtypes[0] if dtypes else "", "grid": list(launch.grid),
               "num_warps": spec.options["num_warps"], "num_stages": spec.options["num_stages"]}
        rec.update(by_key[spec.key()])
        records.append(rec)
    return records, len(distinct)


def problems_of(rec) -> list[str]:
    """Why a record fails the report: compile error, shared memory over sm_90's, spills, mma.sync in bf16."""
    if "error" in rec:
        return [f"compile error: {rec['error']}"]
    out = []
    if rec["shared_bytes"] > aot.SHARED_LIMIT[ARCH]:
        out.append(f"needs {rec['shared_bytes']} B of shared memory (sm_{ARCH} has {aot.SHARED_LIMIT[ARCH]})")
    if rec["spill_bytes"] > 0:
        out.append(f"spills {rec['spill_bytes']} B")
    if rec["dtype"] == "bfloat16" and rec["mma"] == "mma.sync":
        out.append("mma.sync (not wgmma) in bf16")
    return out


def ctas(rec) -> int:
    g = rec["grid"]
    return g[0] * g[1] * g[2]


def markdown(records) -> str:
    """The report as markdown tables: every launch at H=768 (launches of one case and phase that compiled to
    the same figures are one row, ``x2``: two such launches, e.g. the weight gradients), then per kernel,
    hidden size and token count of the other sizes the range over their launches (the largest registers,
    spills and shared memory: what the report's verdict rests on)."""
    head = ("| kernel | case | tokens | CTAs | warps | stages | regs | spill B | smem KB | mma |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    rows = {}
    for r in records:
        if f"H={MAIN_H} " in r["case"]:
            stats = ("error",) if "error" in r else (ctas(r), r["num_warps"], r["num_stages"], r["registers"],
                                                      r["spill_bytes"], round(r["shared_bytes"] / 1024), r["mma"])
            key = (r["kernel"], r["case"], r["tokens"], stats)
            rows[key] = rows.get(key, 0) + 1

    def line(key, count):
        kernel, case, tokens, stats = key
        times = f" x{count}" if count > 1 else ""
        return f"| `{kernel}`{times} | {case} | {tokens} | " + " | ".join(str(v) for v in stats) + " |\n"
    text = f"Hidden size {MAIN_H} (the MAD-X targets), every launch:\n\n" + head
    text += "".join(line(k, c) for k, c in rows.items())
    other = [r for r in records if f"H={MAIN_H} " not in r["case"]]
    if other:
        text += ("\nOther hidden sizes (rf 16 and 2 bottlenecks, NICE rf 2, grouped NICE), per kernel the range over "
                 "its launches (worst figures):\n\n" + _summary(other))
    return text


def _summary(records) -> str:
    """One row per (kernel, hidden size, tokens): launches, CTA range, warps, stages, the largest registers,
    spills and shared memory, the MMA kinds."""
    groups = {}
    for r in records:
        h = re.search(r"H=(\d+) ", r["case"]).group(1)
        groups.setdefault((r["kernel"], f"H={h}", r["tokens"]), []).append(r)
    out = ("| kernel | hidden size | tokens | launches | CTAs | warps | stages | regs | spill B | smem KB | mma |\n"
           "|---|---|---|---|---|---|---|---|---|---|---|\n")
    for (kernel, hidden, tokens), rs in groups.items():
        if any("error" in r for r in rs):
            out += f"| `{kernel}` | {hidden} | {tokens} | {len(rs)} | error |\n"
            continue
        counts = sorted({ctas(r) for r in rs})

        def values(field):
            return "/".join(str(v) for v in sorted({r[field] for r in rs}))
        cells = (len(rs), f"{counts[0]}-{counts[-1]}" if len(counts) > 1 else counts[0], values("num_warps"),
                 values("num_stages"), max(r["registers"] for r in rs), max(r["spill_bytes"] for r in rs),
                 round(max(r["shared_bytes"] for r in rs) / 1024), values("mma"))
        out += f"| `{kernel}` | {hidden} | {tokens} | " + " | ".join(str(v) for v in cells) + " |\n"
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="write the records here")
    p.add_argument("--markdown", action="store_true", help="print the markdown tables instead of the text table")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: all cores)")
    p.add_argument("--only", default="", help="only launches whose case or kernel name contains this")
    args = p.parse_args(argv)
    launches = record(args.only)
    records, compiled = measure_all(launches, args.jobs)
    failures = [(r, why) for r in records for why in problems_of(r)]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"triton": triton.__version__, "arch": ARCH, "records": records}, fh, indent=1)
    print(f"# triton {triton.__version__}, sm_{ARCH}: {len(records)} launches, {compiled} distinct kernels compiled")
    if args.markdown:
        print(markdown(records))
    else:
        for r in records:
            stats = r.get("error") or (f"{r['num_warps']:>3}w {r['num_stages']}s {r['registers']:>4} regs "
                                       f"{r['spill_bytes']:>5} spill {r['shared_bytes']:>7} smem {r['mma']}")
            print(f"{r['kernel']:<30} {r['case']:<62} {r['tokens']:>6} {ctas(r):>6} CTAs  {stats}")
    for r, why in failures:
        print(f"FAIL {r['kernel']} [{r['case']}, {r['tokens']} tokens]: {why}")
    print(f"# {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
