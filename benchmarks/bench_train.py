"""End-to-end MAD-X step benchmark: madx_fast fused vs madx_fast eager vs AdapterHub `adapters` (as is, and
with madx_fast.patch_adapterhub), in one run.

    python benchmarks/bench_train.py                 # GPU: XLM-R base, the sizes in docs/benchmarks.md
    python benchmarks/bench_train.py --size tiny     # CPU-friendly (CI keeps it working)
    python benchmarks/bench_train.py --size base-small --impl eager adapterhub   # XLM-R base, small batches
    python benchmarks/bench_train.py --profile       # + where each step's time goes, by kind of work
    python benchmarks/bench_train.py --json out.json

Workloads (random weights: speed does not depend on them):
  mlm    language adapter (+ NICE) masked-LM training step, B=64, L=256, 15% of tokens masked
  ner    task adapter NER step in Stack(lang, task), B=32, L=128
  infer  zero-shot inference (eval forward) of the NER model, B=32 and B=256, L=128

Implementations, all at the same adapter configuration:
  fused      madx_fast, fused kernels (Triton on GPU), frozen backbone in bf16 with fp32 adapter weights
             on a GPU, SDPA attention, MLM decoder only on masked tokens (host-made positions), attention
             masks prepared on the host (no host-device sync in the step), fused AdamW: the trainer's path
  graphs     the fused model replayed from CUDA graphs: training steps (forward, backward, AdamW) as
             ``madx train-lang/train-task --cuda-graphs`` replays them (madx_fast.training.graphed_step),
             inference as ``madx_fast.graphs.GraphedInference``
  eager      the same madx_fast model with the eager (reference) adapter ops
  adapterhub AdapterHub `adapters` (when importable), its best setting: SDPA + bf16 autocast on a GPU
  hub+patch  the same AdapterHub models and steps after madx_fast.patch_adapterhub(model): its bottleneck and
             NICE adapters on madx_fast's fused ops, the MLM decoder + loss at the labelled positions only

--profile runs a few more steps of each under torch.profiler and prints, per step, the time of each kind of
work (GPU kernel time on a GPU, CPU op self time on a CPU) and what is left of the step's wall time (host
gaps: Python, launches, waiting).

A step is forward + backward + optimizer step; the figure is the median of --iters timed steps after
--warmup steps (CUDA events on a GPU). Peak memory is torch.cuda.max_memory_allocated over the timed steps.
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
    "base": dict(vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1),
    "tiny": dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=130, type_vocab_size=1, pad_token_id=1),
}
SIZES["base-small"] = SIZES["base"]
SHAPES = {
    "base": dict(mlm=(64, 256), ner=(32, 128), infer=[(32, 128), (256, 128)]),
    "base-small": dict(mlm=(4, 128), ner=(4, 128), infer=[(4, 128), (32, 128)]),
    "tiny": dict(mlm=(4, 32), ner=(4, 32), infer=[(4, 32), (16, 32)]),
}
NUM_LABELS = 7


def _timed(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), float("nan")


def _batch(vocab, b, l, seed=0):
    """``(ids, mask, labels, tags)`` made on the host, as a collator makes them (15% of tokens masked)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(5, vocab - 1, (b, l), generator=g, device="cpu")
    labels = torch.full_like(ids, -100)
    masked = torch.rand(b, l, generator=g, device="cpu") < 0.15
    labels[masked] = ids[masked]
    tags = torch.randint(0, NUM_LABELS, (b, l), generator=g, device="cpu")
    mask = torch.ones(b, l, dtype=torch.long, device="cpu")
    return ids, mask, labels, tags


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


def _config(size, attn):
    from transformers import XLMRobertaConfig
    cfg = XLMRobertaConfig(**SIZES[size], num_labels=NUM_LABELS)
    cfg._attn_implementation = attn
    return cfg


def _optimizer(params, fused, capturable=False):
    return torch.optim.AdamW(list(params), lr=1e-4, fused=fused, capturable=capturable)


# ------------------------------------------------------------------------------------------------------------
# madx_fast (fused or eager adapter ops)
# ------------------------------------------------------------------------------------------------------------
def madx_fast_workloads(size, device, backend, lang_rf, gpu=None):
    """The step of each workload. ``gpu`` (default: whether ``device`` is a GPU) picks the GPU settings: the
    backbone in bf16 and fused AdamW (benchmarks/roofline.py plans them on meta tensors)."""
    from transformers import XLMRobertaForMaskedLM, XLMRobertaForTokenClassification

    from madx_fast.model import MadxConfig, Stack, add_madx
    from madx_fast.model.inputs import encoder_attention_mask, mlm_positions

    gpu = device.type == "cuda" if gpu is None else gpu
    low = torch.bfloat16 if gpu else None
    vocab = SIZES[size]["vocab_size"]

    def mlm_model():
        model = XLMRobertaForMaskedLM(_config(size, "sdpa")).to(device)
        madx = add_madx(model, backend=backend)
        madx.add_adapter("en", MadxConfig.language(reduction_factor=lang_rf), set_active=True)
        madx.train_adapters("en")
        if low:
            madx.cast_backbone(low)
        return model, madx

    def mlm(b, l):
        model, madx = mlm_model()
        opt = _optimizer(madx.trainable_parameters(), gpu)
        ids, host_mask, labels, _ = _batch(vocab, b, l)
        ids, mask, positions, targets = _on(device, ids, host_mask, *mlm_positions(labels))
        mask = encoder_attention_mask(model, mask, padded=False, host_mask=host_mask)

        def step():
            loss = madx.mlm_loss(ids, mask, positions=positions, targets=targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, model

    def ner_model():
        model = XLMRobertaForTokenClassification(_config(size, "sdpa")).to(device)
        madx = add_madx(model, backend=backend)
        madx.add_adapter("en", MadxConfig.language(reduction_factor=lang_rf))
        madx.add_adapter("ner", MadxConfig.task())
        madx.set_active(Stack("en", "ner"))
        madx.train_adapters("ner")
        if low:
            madx.cast_backbone(low)
        return model, madx

    def ner(b, l):
        model, madx = ner_model()
        opt = _optimizer(madx.trainable_parameters(), gpu)
        batch = _batch(vocab, b, l)
        ids, mask, _, tags = _on(device, *batch)
        mask = encoder_attention_mask(model, mask, padded=False, host_mask=batch[1])

        def step():
            loss = model(input_ids=ids, attention_mask=mask, labels=tags).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, model

    def infer(b, l):
        model, _ = ner_model()
        model.eval()
        host_ids, host_mask = _batch(vocab, b, l)[:2]
        ids, mask = _on(device, host_ids, host_mask)
        mask = encoder_attention_mask(model, mask, padded=False, host_mask=host_mask)

        def step():
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask).logits
        return step, model

    def graphed_step(model, madx, objective, batch, loss_sum):
        """The training step replayed from CUDA graphs as the trainer's --cuda-graphs replays it (one micro-batch,
        the same update as the plain steps here: AdamW without clipping)."""
        from madx_fast.training.graphed_step import GraphedSteps
        opt = _optimizer(madx.trainable_parameters(), gpu, capturable=gpu)
        no_skip = torch.zeros((), dtype=torch.float32, device=device)

        def run_micro(micro, scale):
            part = loss_sum(micro)
            (part * scale).backward()
            return part.detach().double()

        def update(loss):
            opt.step()
            return no_skip
        steps = GraphedSteps(model, objective, opt, device, grad_accum=1, max_length=batch["input_ids"].shape[1],
                             run_micro=run_micro, optimizer_step=update)
        count = max(int((batch["labels"] != -100).sum()), 1)

        def step():
            steps.step(batch, 1.0 / count)
        return step, model

    def mlm_graphs(b, l):
        from madx_fast.training.tasks.mlm import MlmObjective
        model, madx = mlm_model()
        ids, mask, labels, _ = _batch(vocab, b, l)
        return graphed_step(model, madx, MlmObjective, {"input_ids": ids, "attention_mask": mask, "labels": labels},
                            lambda micro: MlmObjective.loss_sum(model, micro))

    def ner_graphs(b, l):
        model, madx = ner_model()
        ids, mask, _, tags = _batch(vocab, b, l)

        def loss_sum(micro):
            logits = model(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"]).logits
            return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), micro["labels"].flatten(),
                                                     reduction="sum")
        return graphed_step(model, madx, _AsIs, {"input_ids": ids, "attention_mask": mask, "labels": tags}, loss_sum)

    def infer_graphs(b, l):
        from madx_fast.graphs import GraphedInference
        model, _ = ner_model()
        model.eval()
        run = GraphedInference(model)
        ids, mask, _, _ = _batch(vocab, b, l)  # host batch, as from a collator

        def step():
            run(ids, mask)
        return step, model

    return dict(mlm=mlm, ner=ner, infer=infer, mlm_graphs=mlm_graphs, ner_graphs=ner_graphs,
                infer_graphs=infer_graphs)


class _AsIs:
    """An objective whose micro-batches need no host-side preparation (a token-classification batch)."""

    @staticmethod
    def prepare(batch):
        return batch


# ------------------------------------------------------------------------------------------------------------
# AdapterHub `adapters`
# ------------------------------------------------------------------------------------------------------------
def adapterhub_workloads(size, device, lang_rf, patched=False, gpu=None, autocast=None):
    """AdapterHub's models and steps; ``patched``: after ``madx_fast.patch_adapterhub`` (nothing else changes).
    ``gpu`` (default: whether ``device`` is a GPU): its best GPU setting, bf16 autocast and fused AdamW;
    ``autocast``: a context factory standing in for ``torch.autocast`` (benchmarks/roofline.py)."""
    import adapters
    from adapters import SeqBnConfig, SeqBnInvConfig, Stack
    from transformers import XLMRobertaForMaskedLM, XLMRobertaForTokenClassification

    gpu = device.type == "cuda" if gpu is None else gpu
    vocab = SIZES[size]["vocab_size"]

    def ctx():
        if autocast is not None:
            return autocast()
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu)

    def patch(model):
        if patched:
            import madx_fast
            report = madx_fast.patch_adapterhub(model)
            assert report.fully_patched, str(report)
        return model

    def mlm(b, l):
        model = XLMRobertaForMaskedLM(_config(size, "sdpa"))
        adapters.init(model)
        model.add_adapter("en", config=SeqBnInvConfig(reduction_factor=lang_rf))
        model.train_adapter("en")
        patch(model.to(device))
        opt = _optimizer([p for p in model.parameters() if p.requires_grad], gpu)
        ids, mask, labels = _on(device, *_batch(vocab, b, l)[:3])

        def step():
            with ctx():
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, model

    def ner_model():
        model = XLMRobertaForTokenClassification(_config(size, "sdpa"))
        adapters.init(model)
        model.add_adapter("en", config=SeqBnInvConfig(reduction_factor=lang_rf))
        model.add_adapter("ner", config=SeqBnConfig())
        model.train_adapter("ner")
        model.active_adapters = Stack("en", "ner")
        return patch(model.to(device))

    def ner(b, l):
        model = ner_model()
        opt = _optimizer([p for p in model.parameters() if p.requires_grad], gpu)
        ids, mask, _, tags = _on(device, *_batch(vocab, b, l))

        def step():
            with ctx():
                loss = model(input_ids=ids, attention_mask=mask, labels=tags).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, model

    def infer(b, l):
        model = ner_model().eval()
        ids, mask = _on(device, *_batch(vocab, b, l)[:2])

        def step():
            with torch.no_grad(), ctx():
                model(input_ids=ids, attention_mask=mask).logits
        return step, model

    return dict(mlm=mlm, ner=ner, infer=infer)


def implementations(size, device, lang_rf, which):
    impls = {}
    if "fused" in which or "graphs" in which:
        fused = madx_fast_workloads(size, device, None, lang_rf)
        if "fused" in which:
            impls["fused"] = fused
        if "graphs" in which:
            impls["graphs"] = dict(mlm=fused["mlm_graphs"], ner=fused["ner_graphs"], infer=fused["infer_graphs"])
    if "eager" in which:
        impls["eager"] = madx_fast_workloads(size, device, "eager", lang_rf)
    for impl, patched in (("adapterhub", False), ("hub+patch", True)):
        if impl in which:
            try:
                impls[impl] = adapterhub_workloads(size, device, lang_rf, patched=patched)
            except Exception as exc:  # not installed, or incompatible with this transformers
                print(f"# {impl}: not measured ({type(exc).__name__}: {exc})", file=sys.stderr)
    return impls


# ------------------------------------------------------------------------------------------------------------
# where the time goes
# ------------------------------------------------------------------------------------------------------------
# (category, regular expression on kernel / op names); the first match wins
CATEGORIES = [
    ("autograd engine", r"autograd::engine|backward\d+$"),
    ("madx_fast kernels/ops", r"madx_fast|adapter|_nice|nice_|tokens_reduce|fused_linear|rows_times"),
    ("attention", r"flash|fmha|attention|scaled_dot_product|sdpa"),
    ("softmax / cross-entropy", r"softmax|logsumexp|cross_entropy|nll_loss"),
    ("GEMM", r"gemm|matmul|\bmm\b|::mm|addmm|bmm|linear|cutlass|xmma|nvjet|cublas|sm90_|sm80_"),
    ("LayerNorm", r"layer_norm|layernorm"),
    ("dropout / RNG", r"dropout|bernoulli|philox|rand"),
    ("optimizer", r"adam|multi_tensor|foreach|optimizer"),
    ("casts / copies", r"copy|_to_copy|cast|convert|contiguous|::to\b|clone"),
    ("embedding / index", r"embedding|index|gather|scatter|cumsum"),
    ("views / allocation", r"::view|::t$|transpose|as_strided|empty|reshape|expand|slice|permute|squeeze|"
                           r"select|split|chunk|detach|alias|::resize"),
    ("elementwise / reductions", r"elementwise|vectorized|reduce|::mul|::add|::sub|::div|gelu|relu|tanh|where|"
                                 r"sqrt|::sum|mean|exp|lerp|addcmul|::all|::any|::ne|::eq|fill|zero"),
    ("other kernels/ops", r"."),
]


def _categorise(name):
    import re
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return CATEGORIES[-1][0]


def profile_breakdown(step, device, steps):
    """Per-step milliseconds of each category: GPU kernel time on a GPU, CPU op self time on a CPU; plus
    the step's wall time and the part of it no category covers (host gaps)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / steps
    totals = {}
    for evt in prof.key_averages():
        if device.type == "cuda":
            us = getattr(evt, "self_device_time_total", None)
            if us is None:
                us = getattr(evt, "self_cuda_time_total", 0)
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
        else:
            us = evt.self_cpu_time_total
            if evt.key.startswith("ProfilerStep"):
                continue
        if us <= 0:
            continue
        cat = _categorise(evt.key)
        totals[cat] = totals.get(cat, 0.0) + us / 1e3 / steps
    busy = sum(totals.values())
    return dict(wall_ms=wall, busy_ms=busy, host_gap_ms=max(wall - busy, 0.0), by_category=totals,
                measure="GPU kernel time" if device.type == "cuda" else "CPU op self time")


def print_breakdowns(rows):
    cats = [c for c, _ in CATEGORIES]
    for workload in dict.fromkeys((r["workload"], r["B"], r["L"]) for r in rows):
        group = [r for r in rows if (r["workload"], r["B"], r["L"]) == workload and "profile" in r]
        if not group:
            continue
        print(f"\n# where a step's time goes: {workload[0]} B={workload[1]} L={workload[2]} "
              f"(ms per step, {group[0]['profile']['measure']})")
        print(f"{'':<26}" + "".join(f"{r['impl']:>12}" for r in group))
        for cat in cats:
            vals = [r["profile"]["by_category"].get(cat, 0.0) for r in group]
            if any(v >= 0.005 for v in vals):
                print(f"{cat:<26}" + "".join(f"{v:>12.2f}" for v in vals))
        for key, label in (("busy_ms", "sum of the above"), ("host_gap_ms", "host gaps (wall - sum)"),
                           ("wall_ms", "wall time of a step")):
            print(f"{label:<26}" + "".join(f"{r['profile'][key]:>12.2f}" for r in group))


def run(args):
    import transformers
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    size = args.size or ("base" if device.type == "cuda" else "tiny")
    versions = dict(torch=torch.__version__, transformers=transformers.__version__)
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import adapters
        versions["adapters"] = adapters.__version__
    except Exception:
        pass
    print(f"# device: {name}; " + "; ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"# size: {size}; language adapter reduction factor {args.lang_rf}; task adapter rf 16")
    shapes = SHAPES[size]
    impls = implementations(size, device, args.lang_rf, args.impl)
    cases = []
    if "mlm" in args.workloads:
        cases.append(("mlm", *shapes["mlm"]))
    if "ner" in args.workloads:
        cases.append(("ner", *shapes["ner"]))
    if "infer" in args.workloads:
        cases += [("infer", b, l) for b, l in shapes["infer"]]
    rows = []
    for workload, b, l in cases:
        group = []
        for impl, builders in impls.items():
            if workload not in builders:
                continue
            torch.manual_seed(0)
            try:
                step, model = builders[workload](b, l)
                ms, peak = _timed(step, device, args.warmup, args.iters)
                breakdown = profile_breakdown(step, device, args.profile) if args.profile else None
            except torch.cuda.OutOfMemoryError as exc:
                print(f"# {impl} {workload} B={b} L={l}: out of memory ({exc})", file=sys.stderr)
                continue
            group.append(dict(workload=workload, B=b, L=l, impl=impl, step_ms=ms, tokens_per_s=b * l / ms * 1e3,
                              peak_GiB=peak, **({"profile": breakdown} if breakdown else {})))
            del step, model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        base = {r["impl"]: r for r in group}
        for r in group:
            for ref in ("adapterhub", "eager"):
                r[f"x_vs_{ref}"] = (base[ref]["step_ms"] / r["step_ms"]) if ref in base else float("nan")
        rows += group
    print(f"{'workload':<9}{'B':>5}{'L':>5}  {'impl':<11}{'step ms':>10}{'tokens/s':>12}{'peak GiB':>10}"
          f"{'x AdapterHub':>14}{'x eager':>9}")
    for r in rows:
        print(f"{r['workload']:<9}{r['B']:>5}{r['L']:>5}  {r['impl']:<11}{r['step_ms']:>10.2f}"
              f"{r['tokens_per_s']:>12.0f}{r['peak_GiB']:>10.2f}{r['x_vs_adapterhub']:>14.2f}{r['x_vs_eager']:>9.2f}")
    if args.profile:
        print_breakdowns(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=name, versions=versions, size=size, lang_rf=args.lang_rf, rows=rows), fh, indent=1)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), help="model size (default: base on a GPU, tiny on CPU)")
    p.add_argument("--lang-rf", type=float, default=16,
                   help="language adapter reduction factor (16: AdapterHub's seq_bn_inv default; 2: the paper)")
    p.add_argument("--workloads", nargs="+", default=["mlm", "ner", "infer"], choices=["mlm", "ner", "infer"])
    p.add_argument("--impl", nargs="+", default=["fused", "graphs", "eager", "adapterhub", "hub+patch"],
                   choices=["fused", "graphs", "eager", "adapterhub", "hub+patch"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile this many steps of each row and print where the time goes")
    p.add_argument("--json", help="also write the rows as JSON here")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
