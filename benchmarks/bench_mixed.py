"""Mixed-language inference: many languages in one batch vs the same rows split by language, in one run.

    python benchmarks/bench_mixed.py                   # GPU: XLM-R base architecture, B=256, L=128, 8 languages
    python benchmarks/bench_mixed.py --size tiny       # CPU-friendly (CI keeps it working)
    python benchmarks/bench_mixed.py --impl eager --json mixed.json
    python benchmarks/bench_mixed.py --backend eager   # the eager reference ops (per-row: G times the work)

Model: an XLM-R base architecture token classifier (random weights: speed does not depend on them) with 8
language adapters (reduction factor 2 + NICE, the paper's) and one NER task adapter (reduction factor 16); SDPA
attention; on a GPU the frozen backbone in bf16 with fp32 adapter weights (``cast_backbone``) and the Triton
kernels. Every workload is an eval forward (no grad) over the same B x L tokens:

  mixed    one batch of B rows, B/8 rows per language in shuffled order, Stack(PerRow(l0..l7), "ner") with
           each row's language given per batch (the grouped per-row kernels)
  loop     the same rows split by language: 8 batches of B/8 rows, Stack(l_i, "ner") each (what a mixed
           stream costs without per-row adapters)
  single   one language for all B rows, Stack(l0, "ner"): the ceiling a mixed batch can reach

Implementations: ``graphs`` replays each forward from CUDA graphs (``madx_fast.graphs.GraphedInference``: one
graph for the mixed batch whatever its mix, one per language for the loop); ``eager`` calls the model. On a
CPU only ``eager`` runs, through the Triton interpreter unless ``TRITON_INTERPRET=0`` (the times then measure
the interpreter, not the kernels; ``--backend eager`` runs the eager reference ops instead). Figures: median of
--iters timed runs after --warmup (CUDA events on a GPU), tokens/s, and the ratios mixed/loop (target on a GPU:
>= 2) and mixed/single (target: >= 0.85), measured side by side in this process. The script also prints how far
the mixed outputs are from the loop's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SIZES = {
    "base": dict(config=dict(vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                             pad_token_id=1), batch=256, length=128),
    "tiny": dict(config=dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=130, type_vocab_size=1, pad_token_id=1),
                 batch=16, length=16),
}
NUM_LABELS = 7
WORKLOADS = ("mixed", "loop", "single")


def _timed(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def build_model(size, device, languages, backend=None, gpu=None):
    """The model and its handle; ``gpu`` (default: whether ``device`` is a GPU): the backbone in bf16."""
    from transformers import XLMRobertaConfig, XLMRobertaForTokenClassification

    from madx_fast.model import MadxConfig, add_madx

    cfg = XLMRobertaConfig(**SIZES[size]["config"], num_labels=NUM_LABELS)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = XLMRobertaForTokenClassification(cfg).to(device)
    madx = add_madx(model, backend=backend)
    for lang in languages:
        madx.add_adapter(lang, MadxConfig.language())
    madx.add_adapter("ner", MadxConfig.task())
    with torch.no_grad():  # non-trivial adapters (AdapterHub's init is close to the identity)
        for name, p in model.named_parameters():
            if "adapters." in name:
                p.normal_(0, 0.02)
    if device.type == "cuda" if gpu is None else gpu:
        madx.cast_backbone(torch.bfloat16)
    return model.eval(), madx


def make_batch(size, num_languages, seed=0):
    """Host tensors as a collator makes them: ids, an all-ones mask, and each row's language (balanced,
    shuffled)."""
    b, length = SIZES[size]["batch"], SIZES[size]["length"]
    if b % num_languages:
        raise ValueError(f"batch {b} does not split evenly over {num_languages} languages")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, SIZES[size]["config"]["vocab_size"] - 1, (b, length), generator=g)
    mask = torch.ones_like(ids)
    langs = torch.arange(num_languages).repeat_interleave(b // num_languages)[torch.randperm(b, generator=g)]
    return ids, mask, langs


def workloads(model, madx, languages, ids, mask, langs, impl, device):
    """name -> (a callable running the workload once, a callable returning its logits in row order)."""
    from madx_fast.graphs import GraphedInference
    from madx_fast.model import PerRow, Stack

    mixed_setup = Stack(PerRow(*languages), "ner")
    by_lang = [torch.nonzero(langs == i).squeeze(1) for i in range(len(languages))]

    def activate(setup):  # (set_active checks a PerRow's adapters: done once, not per timed call)
        if madx.active != setup:
            madx.set_active(setup)
    if impl == "graphs":
        runner = GraphedInference(model, max_graphs=len(languages) + 2)
        full = (ids, mask)  # host tensors, as a collator makes them: the runner copies them in

        def forward(setup, x, m, row_langs=None):
            activate(setup)
            return runner(x, m, languages=row_langs)
    else:
        full = (ids.to(device), mask.to(device))  # moved once: the eager figures time the forwards only

        def forward(setup, x, m, row_langs=None):
            activate(setup)
            with torch.no_grad():
                if row_langs is None:
                    return model(input_ids=x, attention_mask=m).logits
                with madx.row_languages(row_langs):
                    return model(input_ids=x, attention_mask=m).logits
    split = [(full[0][rows.to(full[0].device)], full[1][rows.to(full[1].device)]) for rows in by_lang]

    def mixed():
        return forward(mixed_setup, *full, langs)

    def loop():
        return [forward(Stack(lang, "ner"), *split[i]) for i, lang in enumerate(languages)]

    def single():
        return forward(Stack(languages[0], "ner"), *full)

    def loop_in_row_order():
        out = torch.empty(ids.shape + (NUM_LABELS,), dtype=torch.float32, device=device)
        for rows, logits in zip(by_lang, loop()):
            out[rows.to(device)] = logits.float()
        return out
    return dict(mixed=(mixed, lambda: mixed().float()), loop=(loop, loop_in_row_order), single=(single, None))


def run(args) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    languages = tuple(f"l{i}" for i in range(args.languages))
    model, madx = build_model(args.size, device, languages, args.backend)
    ids, mask, langs = make_batch(args.size, len(languages))
    b, length = ids.shape
    impls = args.impl or (["graphs", "eager"] if device.type == "cuda" else ["eager"])
    rows = []
    for impl in impls:
        if impl == "graphs" and device.type != "cuda":
            print("# graphs: needs a CUDA GPU (CUDA graphs); skipped", file=sys.stderr)
            continue
        work = workloads(model, madx, languages, ids, mask, langs, impl, device)
        diff = (work["mixed"][1]() - work["loop"][1]()).abs().max().item()
        times = {name: _timed(work[name][0], device, args.warmup, args.iters) for name in WORKLOADS}
        for name in WORKLOADS:
            rows.append(dict(impl=impl, workload=name, B=b, L=length, languages=len(languages),
                             ms=times[name], tokens_per_s=b * length / times[name] * 1e3,
                             mixed_vs_loop=times["loop"] / times["mixed"],
                             mixed_vs_single=times["single"] / times["mixed"], max_abs_diff_vs_loop=diff))
    return rows


def report(rows, args):
    import transformers
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    versions = dict(torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__)
    print(f"# device: {device}; " + "; ".join(f"{k} {v}" for k, v in versions.items())
          + (" (Triton interpreter: times measure it, not the kernels)" if os.environ.get("TRITON_INTERPRET") == "1"
             and not torch.cuda.is_available() else ""))
    if rows:
        r0 = rows[0]
        print(f"# size {args.size}: B={r0['B']} L={r0['L']}, {r0['languages']} languages (rf 2 + NICE) mixed "
              f"evenly, task adapter rf 16; eval forward; adapter ops: {args.backend or 'default'}")
    print(f"{'impl':<8}{'workload':<10}{'ms':>10}{'tokens/s':>14}")
    for r in rows:
        print(f"{r['impl']:<8}{r['workload']:<10}{r['ms']:>10.2f}{r['tokens_per_s']:>14.0f}")
    for impl in dict.fromkeys(r["impl"] for r in rows):
        r = next(x for x in rows if x["impl"] == impl)
        print(f"# {impl}: mixed / loop = {r['mixed_vs_loop']:.2f}x (target >= 2), mixed / single = "
              f"{r['mixed_vs_single']:.2f} (target >= 0.85); max |mixed - loop| logits = "
              f"{r['max_abs_diff_vs_loop']:.2e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=device, versions=versions, size=args.size, rows=rows), fh, indent=1)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="base" if torch.cuda.is_available() else "tiny")
    p.add_argument("--languages", type=int, default=8)
    p.add_argument("--impl", nargs="+", choices=["graphs", "eager"], default=None)
    p.add_argument("--backend", choices=["triton", "eager"], default=None,
                   help="adapter kernels (default: madx_fast's for the device: Triton on a GPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = run(args)
    report(rows, args)
    return rows


if __name__ == "__main__":
    main()
