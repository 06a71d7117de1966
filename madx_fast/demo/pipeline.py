"""``madx demo``: the whole MAD-X pipeline, offline, on a CPU, in a few minutes.

With no arguments it
1. writes three synthetic languages (``synthetic.py``: shared named entities, different words and word
   order) into ``<out>/data``: unlabeled text and WikiANN-format NER data per language;
2. trains a BPE tokenizer on the text (``tokenizers``), wraps it as XLM-R's fast tokenizer, and pretrains a
   small XLM-R-architecture model (hidden 64, 2 layers) by full masked-LM on all three languages, or takes
   it from the cache (``~/.cache/madx_fast``, or ``$MADX_FAST_CACHE``) when an identical one was built
   before; the base is copied to ``<out>/base``;
3. trains a language adapter + invertible adapter per language (MLM, backbone frozen);
4. trains a NER task adapter in ``Stack(source, ner)`` for each source language (alpha and beta) and, as
   the paper's ablations, the same on language adapters without invertible adapters (MAD-X -INV) and
   without any language adapter (MAD-X -LAD -INV);
5. trains the paper's full-model baselines, every weight: the model fine-tuned on each source (XLM-R), and
   for each target the model trained by masked LM on the target's text, then fine-tuned on the source
   (XLM-R MLM-TRG) (``--no-baselines`` to skip);
6. evaluates zero-shot transfer to every language: with the target's language adapter (MAD-X), with the
   source's left in place, with none, the ablations and the full models; prints the report's table (the
   paper's layout, and each row's difference to XLM-R) and writes it with CSV / JSON / two heatmap PNGs to
   ``<out>/transfer``, every adapter and model to ``<out>``;
7. (synthetic languages, ``--no-related`` to skip) a language without text of its own: delta, built from alpha's
   and beta's words and grammar, has NER test data but no text, so no language adapter. Each MAD-X task
   adapter is evaluated on it with no language adapter, with alpha's, with beta's, with their ``Average``, with
   the two merged into one adapter (``madx merge``) and with EMEA (weights tuned per batch); the table goes to
   ``<out>/related`` and the summary says which did best, measured.

The banners number the steps that run (``--no-baselines``: the transfer is step 5 and delta's step 6).

It reports what it measured (F1 on the generated test sets, time, peak memory, parameter counts). The step
counts and learning rates below were chosen so that the small model learns the three languages within a few
CPU minutes; nothing was chosen for the transfer numbers, which come out as they come out.

Real setting (network for the hub, a GPU to be quick)::

    madx demo --model xlm-roberta-base --sources en --targets en,sw,qu --max-length 128 \
        --text-data "wikimedia/wikipedia:20231101.{lang}" --max-texts 200000 --ner-data "wikiann:{lang}"
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass

from .. import files
from ..training.reporting import check_report_to
from ..training.settings import BACKENDS, TrainConfig, csv_list, opt
from . import synthetic

log = logging.getLogger("madx_fast.training")

DEMO_MARKER = "demo_summary.json"
DEMO_OUTPUTS = ("data", "base", "base-pretraining", "transfer", "related", DEMO_MARKER)
DEMO_PREFIXES = ("lang-", "ner-", "task-", "ft-", "mlm-")
CACHE_VERSION = 1


@dataclass
class DemoConfig:
    """The demo's settings; the fields with a flag are ``madx demo``'s flags (generated from them, like every
    command's). With ``--model`` the defaults are ``real_model_config``'s."""

    output_dir: str = opt("madx_demo_out", flag="--output", aliases=("--output-dir",),
                          help="directory for everything the demo writes")
    overwrite: bool = opt(False, help="replace an earlier demo's outputs in --output")
    # languages: task adapters are trained on each source and evaluated on every target
    sources: list[str] = opt(default_factory=lambda: ["alpha", "beta"], parse=csv_list,
                             help="comma-separated source languages")
    targets: list[str] = opt(default_factory=lambda: ["alpha", "beta", "gamma"], parse=csv_list,
                             help="comma-separated target languages")
    # data: None = the synthetic languages; otherwise specs with {lang} (files, directories, HF datasets)
    text_data: str | None = opt(None, help="unlabeled text per language ({lang}) for real data")
    text_eval_data: str | None = opt(None, help="held-out text per language ({lang})")
    ner_data: str | None = opt(None, help="NER data per language ({lang}), e.g. wikiann:{lang}")
    max_texts: int | None = opt(None, help="read at most this many texts per language")
    # base model: None = build and pretrain the small one (or load it from the cache)
    model: str | None = opt(None, help="a pretrained base model instead of the small one (then the paper's lr / "
                            "batch / reduction factors, 10k MLM steps, 10 NER epochs, length 128; override with "
                            "the flags below)")
    hidden_size: int = opt(64, cli=False)
    num_layers: int = opt(2, cli=False)
    vocab_size: int = opt(800, cli=False)
    max_length: int = opt(32, help="sequence length")
    pretrain_steps: int = opt(2500, help="full-MLM steps of the small base model")
    pretrain_lr: float = opt(2e-3, cli=False)
    # adapters (bottlenecks: 32 for languages, 16 for the task at hidden size 64; the paper's rf 16 would
    # leave a task bottleneck of 4 at this size)
    lang_steps: int = opt(300, help="steps per language adapter")
    lang_lr: float = opt(2e-3, cli=False)
    lang_reduction_factor: float = opt(2, cli=False)
    task_epochs: float = opt(15, help="NER task adapter epochs")
    task_lr: float = opt(2e-3, cli=False)
    task_reduction_factor: float = opt(4, cli=False)
    batch_size: int = opt(64, help="MLM batch (pretraining, language adapters)")
    task_batch_size: int = opt(32, help="NER batch")
    ablations: bool = opt(True, flag="--no-ablations", help="skip MAD-X -INV and -LAD -INV")
    # the full-model baselines: XLM-R fine-tuned on the source; MLM-TRG: masked LM on the target, then that
    baselines: bool = opt(True, flag="--no-baselines", help="skip the full-model baselines (XLM-R, XLM-R MLM-TRG)")
    mlm_steps: int = opt(300, help="full-model MLM steps per target language (MLM-TRG)")
    mlm_lr: float = opt(5e-4, cli=False)
    finetune_lr: float = opt(1e-3, cli=False)
    related: bool = opt(True, flag="--no-related", help="skip the last step, the language without text (delta, "
                        "served by alpha's and beta's adapters)")
    # synthetic data sizes
    text_sentences: int = opt(6000, cli=False)
    ner_train: int = opt(1000, cli=False)
    ner_validation: int = opt(200, cli=False)
    ner_test: int = opt(500, cli=False)
    seed: int = opt(0, help="seed of the data, the models and the runs")
    backend: str | None = opt(None, choices=BACKENDS, help="adapter kernels (default: triton on CUDA, eager on CPU)")
    device: str | None = opt(None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    bf16: bool = opt(False, help="bfloat16 autocast")
    progress: bool = opt(True, flag="--no-progress", help="no progress bars (log lines instead)")
    threads: int | None = opt(None, help="torch CPU threads (default for the small synthetic model: the cores no "
                              "other process keeps busy, by the load average, since a thread waiting for a core "
                              "stalls every step; torch's own choice with --model)")
    report_to: list[str] = opt(default_factory=list, parse=csv_list, metavar="TOOLS",
                               help="log every run's curves to: tensorboard (<run>/tensorboard), wandb")
    cache_dir: str | None = opt(None, help="where the pretrained small base is cached (default ~/.cache/madx_fast "
                                "or $MADX_FAST_CACHE)")
    use_cache: bool = opt(True, flag="--no-cache", help="pretrain the base model even if it is cached")


def real_model_config(model: str, **overrides) -> DemoConfig:
    """The demo pipeline on a pretrained model with the paper's hyperparameters (lr 1e-4, batch 64 for
    language adapters and 16 for NER, task reduction factor 16) and shorter schedules: 10k MLM steps per
    language, 10 NER epochs, sequences of 128 tokens. The full-model baselines take lr 2e-5 for fine-tuning
    and 5e-5 for masked LM (common choices for XLM-R, not the paper's)."""
    cfg = DemoConfig(model=model, max_length=128, lang_steps=10_000, lang_lr=1e-4, task_epochs=10, task_lr=1e-4,
                     task_reduction_factor=16, batch_size=64, task_batch_size=16, mlm_steps=10_000, mlm_lr=5e-5,
                     finetune_lr=2e-5)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def check_demo_output(directory: str, overwrite: bool) -> None:
    """Never replace a user's files: an existing, non-empty output directory needs ``overwrite``, and even
    then only the demo's own outputs are removed."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f"{directory!r} exists and is not a directory")
    if os.path.isdir(directory) and os.listdir(directory) and not overwrite:
        raise FileExistsError(f"output directory {directory!r} is not empty; pass --output DIR for a new one, "
                              "or --overwrite to replace the outputs of an earlier demo run there")


def _clear_demo_outputs(directory: str) -> None:
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name in DEMO_OUTPUTS or name.startswith(DEMO_PREFIXES):
            path = os.path.join(directory, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def run_demo(cfg: DemoConfig | None = None) -> dict:
    """Run the pipeline; returns (and writes to ``<out>/demo_summary.json``) everything it measured. torch's
    CPU thread count is the demo's (``threads``) while it runs, and the caller's again afterwards."""
    import torch
    before = torch.get_num_threads()
    try:
        return _Demo(cfg or DemoConfig()).run()
    finally:
        torch.set_num_threads(before)


class _Demo:
    """One run of the pipeline: its steps in order, each timed; ``runs`` collects a row per training run."""

    def __init__(self, cfg: DemoConfig):
        self.cfg, self.out = cfg, os.path.abspath(cfg.output_dir)
        self.languages = list(dict.fromkeys(cfg.sources + cfg.targets))
        self.runs: list[dict] = []
        self.timings: dict[str, float] = {}
        a, b = synthetic.RELATED["delta"]
        # step 6 runs on the synthetic languages when alpha and beta are among them and delta is not
        self.related = (cfg.related and cfg.text_data is None and "delta" not in self.languages
                        and {a, b} <= set(self.languages))
        self.step_names = (["data", "base", "language adapters", "task adapters"]
                           + ["baselines"] * cfg.baselines + ["transfer"] + ["related"] * self.related)

    def _step(self, name: str) -> str:
        """``n/N``: the step's number among the steps that run (baselines and delta's step are optional)."""
        return f"{self.step_names.index(name) + 1}/{len(self.step_names)}"

    def run(self) -> dict:
        t0 = time.perf_counter()
        cfg, out = self.cfg, self.out
        check_demo_output(out, cfg.overwrite)
        check_report_to(cfg.report_to)
        self._check_languages()
        threads = _set_threads(cfg)
        if cfg.overwrite:
            _clear_demo_outputs(out)
        os.makedirs(out, exist_ok=True)
        paths, specs = self._timed("data", self._data)
        base = self._timed("base_model", self._base_model, paths)
        systems = [("MAD-X", True)] + ([("MAD-X -INV", False)] if cfg.ablations else [])
        lang_dirs = self._timed("language_adapters", self._language_adapters, base, specs, systems)
        task_dirs = self._timed("task_adapters", self._task_adapters, base, specs, systems, lang_dirs)
        full_dirs = self._timed("baselines", self._baselines, base, specs) if cfg.baselines else []
        records, report, written = self._timed("transfer", self._transfer, specs, lang_dirs, task_dirs, full_dirs)
        related = self._timed("related_language", self._related_language, lang_dirs, task_dirs)
        self.timings["total"] = time.perf_counter() - t0
        summary = {"config": asdict(cfg), "base_model": base, "runs": self.runs, "transfer": records,
                   "report": written, "table": report, "timings_s": self.timings, "torch_threads": threads}
        if related is not None:
            summary["related_language"] = related
        files.write_json(os.path.join(out, DEMO_MARKER), summary)
        _print_summary(summary, out)
        return summary

    def _timed(self, name: str, step, *args):
        t = time.perf_counter()
        result = step(*args)
        self.timings[name] = time.perf_counter() - t
        return result

    def _check_languages(self) -> None:
        cfg = self.cfg
        if not cfg.sources or not cfg.targets:
            raise ValueError("the demo needs at least one source and one target language")
        if cfg.ner_data is None or cfg.text_data is None:
            if cfg.ner_data or cfg.text_data:
                raise ValueError("give both --text-data and --ner-data for real data (or neither for the synthetic "
                                 "languages)")
            bad = [lang for lang in self.languages if lang not in synthetic.LANGUAGES]
            if bad:
                raise ValueError(f"unknown synthetic language(s) {bad}; the demo's languages are "
                                 f"{list(synthetic.LANGUAGES)} (give --text-data / --ner-data for others)")

    def _data(self):
        """Step 1: ``(paths of the synthetic files or None, {"text", "text_eval", "ner"}: data specs)``."""
        cfg, out = self.cfg, self.out
        if cfg.text_data is not None:
            return None, {"text": cfg.text_data, "text_eval": cfg.text_eval_data, "ner": cfg.ner_data}
        _banner(f"{self._step('data')} data: synthetic languages {', '.join(self.languages)}")
        paths = synthetic.write_corpus(os.path.join(out, "data"), self.languages, text_sentences=cfg.text_sentences,
                                       ner_train=cfg.ner_train, ner_validation=cfg.ner_validation,
                                       ner_test=cfg.ner_test, seed=cfg.seed)
        log.info("wrote %s (%.1f MB)", os.path.join(out, "data"), _du(os.path.join(out, "data")) / 2 ** 20)
        return paths, {"text": os.path.join(out, "data", "{lang}", "text", "train.txt"),
                       "text_eval": os.path.join(out, "data", "{lang}", "text", "validation.txt"),
                       "ner": os.path.join(out, "data", "{lang}", "ner")}

    def _base_model(self, paths) -> str:
        """Step 2: the given base model, or the small one pretrained here (or taken from the cache)."""
        cfg = self.cfg
        if cfg.model is not None:
            _banner(f"{self._step('base')} base model: {cfg.model}")
            return cfg.model
        _banner(f"{self._step('base')} base model: XLM-R architecture, hidden {cfg.hidden_size}, "
                f"{cfg.num_layers} layers")
        base, pretrain = _base_model(cfg, paths, self.languages, self.out)
        if pretrain:
            self.runs.append(pretrain)
        return base

    def _loop(self, steps, lr, warmup=0.1, batch_size=None) -> TrainConfig:
        cfg = self.cfg
        return TrainConfig(steps=steps or 1, batch_size=batch_size or cfg.batch_size, learning_rate=lr,
                           warmup_steps=int(warmup * (steps or 0)), seed=cfg.seed, log_every=20,
                           eval_every=max(1, (steps or 1) // 2), save_every=max(1, (steps or 1) // 2),
                           eval_batch_size=64, progress=cfg.progress, device=cfg.device, bf16=cfg.bf16,
                           report_to=list(cfg.report_to))

    def _task_loop(self, lr: float) -> TrainConfig:
        """The NER loop: its steps and per-epoch validation come from the epochs."""
        cfg = self.cfg
        return dataclasses.replace(self._loop(1, lr, warmup=0.0, batch_size=cfg.task_batch_size), eval_every=0,
                                   save_every=0)

    def _language_adapters(self, base: str, specs: dict, systems) -> dict[str, dict[str, str]]:
        """Step 3: a language adapter per language and system (MAD-X; MAD-X -INV without NICE)."""
        from ..training import train_language_adapter
        cfg, lang_dirs = self.cfg, {}
        for system, invertible in systems:
            lang_dirs[system] = {}
            for lang in self.languages:
                suffix = "" if invertible else "-noinv"
                _banner(f"{self._step('language adapters')} language adapter {lang}"
                        f"{' (no invertible adapter)' if not invertible else ''}")
                d = os.path.join(self.out, f"lang-{lang}{suffix}")
                self.runs.append(_run_row(train_language_adapter(
                    model=base, lang=lang, train_data=specs["text"], eval_data=specs["text_eval"], output_dir=d,
                    config=self._loop(cfg.lang_steps, cfg.lang_lr), max_length=cfg.max_length,
                    invertible=invertible, reduction_factor=cfg.lang_reduction_factor, backend=cfg.backend,
                    max_texts=cfg.max_texts), f"language adapter {lang}{suffix}"))
                lang_dirs[system][lang] = d
        return lang_dirs

    def _task_adapters(self, base: str, specs: dict, systems, lang_dirs) -> dict[str, list[str]]:
        """Step 4: a NER task adapter per source on each system's language adapter, and with none (-LAD -INV)."""
        from ..training import train_task_adapter
        cfg = self.cfg

        def train(name: str, label: str, **lang) -> str:
            d = os.path.join(self.out, name)
            self.runs.append(_run_row(train_task_adapter(
                model=base, output_dir=d, config=self._task_loop(cfg.task_lr), task="ner", train_data=specs["ner"],
                max_length=cfg.max_length, backend=cfg.backend, epochs=cfg.task_epochs,
                reduction_factor=cfg.task_reduction_factor, **lang), label))
            return d

        task_dirs: dict[str, list[str]] = {}
        for system, invertible in systems:
            suffix = "" if invertible else "-noinv"
            task_dirs[system] = []
            for src in cfg.sources:
                _banner(f"{self._step('task adapters')} NER task adapter on Stack({src}, ner)"
                        f"{' -INV' if not invertible else ''}")
                task_dirs[system].append(train(f"ner-{src}{suffix}", f"NER adapter on {src}{suffix}",
                                               lang_adapter=lang_dirs[system][src]))
        if cfg.ablations:
            task_dirs["MAD-X -LAD -INV"] = []
            for src in cfg.sources:
                _banner(f"{self._step('task adapters')} NER task adapter on {src}, no language adapter (-LAD -INV)")
                task_dirs["MAD-X -LAD -INV"].append(train(f"ner-{src}-nolang", f"NER adapter on {src}, no lang "
                                                          "adapter", lang=src))
        return task_dirs

    def _baselines(self, base: str, specs: dict) -> list[str]:
        """Step 5: the paper's full-model baselines, every weight trained: XLM-R fine-tuned on each source, and
        MLM-TRG, the whole model trained by masked LM on a target's text, then fine-tuned on the source."""
        from ..training import train_language, train_task
        cfg, mlm_dirs, full_dirs = self.cfg, {}, []
        for lang in dict.fromkeys(t for src in cfg.sources for t in cfg.targets if t != src):
            _banner(f"{self._step('baselines')} baseline: the whole model by masked LM on {lang} (for MLM-TRG)")
            mlm_dirs[lang] = os.path.join(self.out, f"mlm-{lang}")
            self.runs.append(_run_row(train_language(
                model=base, lang=lang, full_model=True, train_data=specs["text"], eval_data=specs["text_eval"],
                output_dir=mlm_dirs[lang], config=self._loop(cfg.mlm_steps, cfg.mlm_lr), max_length=cfg.max_length,
                max_texts=cfg.max_texts), f"full model MLM on {lang}"))
        for src in cfg.sources:
            starts = [(base, f"ft-{src}", f"NER full fine-tuning on {src}")] + [
                (mlm_dirs[t], f"ft-{src}-mlm-{t}", f"NER fine-tuning on {src}, MLM {t}") for t in cfg.targets
                if t != src]
            for model, name, label in starts:
                _banner(f"{self._step('baselines')} baseline: {label}")
                full_dirs.append(os.path.join(self.out, name))
                self.runs.append(_run_row(train_task(
                    model=model, lang=src, full_finetune=True, output_dir=full_dirs[-1], task="ner",
                    train_data=specs["ner"], config=self._task_loop(cfg.finetune_lr), max_length=cfg.max_length,
                    epochs=cfg.task_epochs), label))
        return full_dirs

    def _transfer(self, specs: dict, lang_dirs, task_dirs, full_dirs):
        """Step 6 (5 without baselines): zero-shot transfer of every system to every target, in one report:
        MAD-X in its three settings, then the ablations and the full models as named systems of one call."""
        from ..training import evaluate_transfer
        from ..training.report import build_report, write_report
        cfg = self.cfg
        _banner(f"{self._step('transfer')} zero-shot transfer: {', '.join(cfg.sources)} -> {', '.join(cfg.targets)}")
        common = dict(targets=cfg.targets, eval_data=specs["ner"], split="test", device=cfg.device, bf16=cfg.bf16,
                      backend=cfg.backend)
        records = evaluate_transfer(task_adapters=task_dirs["MAD-X"], lang_adapters=lang_dirs["MAD-X"],
                                    settings=("target", "source", "none"), system="MAD-X", **common)["records"]
        others = [f"{system}={d}" for system, dirs in task_dirs.items() if system != "MAD-X" for d in dirs]
        if others or full_dirs:
            langs = {f"{system}:{lang}": d for system, by_lang in lang_dirs.items() if system != "MAD-X"
                     for lang, d in by_lang.items()}
            records += evaluate_transfer(task_adapters=others, full_models=full_dirs, lang_adapters=langs,
                                         **common)["records"]
        report = build_report(records)
        written = write_report(records, report, os.path.join(self.out, "transfer"),
                               title="zero-shot NER transfer, entity F1 (%)")
        return records, report, written

    def _related_language(self, lang_dirs, task_dirs) -> dict | None:
        """The last step: delta, which has NER data but no text (so no adapter), served by alpha's and beta's adapters:
        alone, averaged, merged and ensembled with EMEA, under every MAD-X task adapter."""
        from ..training import evaluate_transfer
        from ..training.merge import merge_adapters
        cfg = self.cfg
        lang, (a, b) = "delta", synthetic.RELATED["delta"]
        if not self.related:
            return None  # (real data, delta given text of its own, or alpha / beta not among the languages)
        _banner(f"{self._step('related')} a language without text: {lang}, served by {a}'s and {b}'s adapters")
        data = os.path.join(self.out, "data")
        synthetic.write_corpus(data, [lang], text=False, ner_train=0, ner_validation=0, ner_test=cfg.ner_test,
                               seed=cfg.seed)
        merged = os.path.join(self.out, f"lang-{lang}-merged")
        merge_adapters(adapters={a: lang_dirs["MAD-X"][a], b: lang_dirs["MAD-X"][b]}, output_dir=merged, name=lang)
        given = {a: lang_dirs["MAD-X"][a], b: lang_dirs["MAD-X"][b]}
        rows, records = [], []
        for label, value, setting in RELATED_ROWS:
            value = value and value.format(a=a, b=b)
            value = merged if value == "merged" else given.get(value, value)  # a related language: its directory
            res = evaluate_transfer(task_adapters=task_dirs["MAD-X"], targets=[lang], settings=[setting],
                                    lang_adapters={**given, **({lang: value} if value else {})},
                                    eval_data=os.path.join(data, "{lang}", "ner"), split="test",
                                    system=label.format(a=a, b=b), device=cfg.device, bf16=cfg.bf16,
                                    backend=cfg.backend)
            for rec in res["records"]:
                records.append(rec)
                rows.append({"method": rec["system"], "source": rec["source"], "f1": rec["value"],
                             "language_adapter": rec["language_adapter"]})
        from ..training import write_transfer_report
        report = write_transfer_report(records, os.path.join(self.out, "related"),
                                       title=f"NER on {lang} (no text of its own), entity F1 (%)")
        return {"language": lang, "related": [a, b], "rows": rows, "finding": related_finding(rows),
                "report": report, "merged_adapter": merged}


# The last step (7; 6 without baselines): how the language without text is served (label, --lang-adapter
# value, transfer setting); {a}, {b}: the related languages (a value naming one: its adapter directory). The
# ensembles name their members by the related languages' own --lang-adapter entries.
RELATED_ROWS = (("no language adapter", None, "none"), ("{a}'s adapter", "{a}", "target"),
                ("{b}'s adapter", "{b}", "target"), ("Average({a}, {b})", "avg:{a},{b}", "target"),
                ("merged {a}+{b}", "merged", "target"), ("EMEA({a}, {b})", "emea:{a},{b}", "target"))


def _related_table(rows: list[dict]) -> str:
    sources = list(dict.fromkeys(r["source"] for r in rows))
    width = max(len(r["method"]) for r in rows)
    lines = [f"{'':<{width}}  " + "  ".join(f"{'src ' + s:>10}" for s in sources)]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = {r["source"]: r["f1"] for r in rows if r["method"] == method}
        lines.append(f"{method:<{width}}  " + "  ".join(f"{cells.get(s, float('nan')):>10.2f}" for s in sources))
    return "\n".join(lines)


def related_finding(rows: list[dict]) -> str:
    """What the rows show, in words computed from them: per task adapter, the better single related adapter,
    the best combination of both (Average, merged, EMEA) and its margin, and no language adapter."""
    parts = []
    for src in dict.fromkeys(r["source"] for r in rows):
        mine = {r["method"]: r["f1"] for r in rows if r["source"] == src}
        singles = {m: v for m, v in mine.items() if m.endswith("'s adapter")}
        combined = {m: v for m, v in mine.items() if m not in singles and m != "no language adapter"}
        single, combo = max(singles, key=singles.get), max(combined, key=combined.get)
        parts.append(f"task adapter on {src}: the better single adapter is {single} ({singles[single]:.1f} F1), "
                     f"the best combination {combo} ({combined[combo]:.1f}, {combined[combo] - singles[single]:+.1f}), "
                     f"no language adapter {mine['no language adapter']:.1f}")
    return "; ".join(parts)


def _print_summary(summary: dict, out: str) -> None:
    from ..training.report import format_report
    report = summary["report"]
    print()
    print(format_runs(summary["runs"]))
    print()
    print("Zero-shot NER (seqeval entity F1 %, test sets of the target languages):")
    print(format_report(summary["table"]))
    print()
    print(f"report: {', '.join(report.values())}")
    related = summary.get("related_language")
    if related:
        print()
        print(f"A language without text: {related['language']} (related to {', '.join(related['related'])}), "
              "NER entity F1 % on its test set:")
        print(_related_table(related["rows"]))
        print(f"measured: {related['finding']}")
    print(f"models and adapters: {out}/lang-*/adapter, {out}/ner-*/best, {out}/ft-*/best, {out}/mlm-*/model;  total "
          f"wall time {summary['timings_s']['total']:.1f} s")


def idle_cores(cores: int) -> int:
    """Of ``cores``, how many no other process keeps busy (the 1-minute load average), at least one.

    For the small synthetic model a thread that must wait for a core stalls every step: measured (docs/training.md,
    the demo) on 2 cores, 2 threads were 1.4x faster than 1 on an idle machine and 5x slower at load 15."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average on this system: every core
        return cores
    return max(1, min(cores, int(cores - load + 0.5)))


def _set_threads(cfg: DemoConfig) -> int:
    """``--threads``, else for the small synthetic model the cores not already busy (``idle_cores``), with
    ``--model`` torch's own choice; returns the count the demo runs with."""
    import torch
    threads = cfg.threads if cfg.threads is not None else None if cfg.model else idle_cores(torch.get_num_threads())
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    log.info("torch CPU threads: %d", torch.get_num_threads())
    return torch.get_num_threads()


def _banner(text: str) -> None:
    log.info("==== %s", text)


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _run_row(summary: dict, label: str) -> dict:
    adapter = summary.get("adapter")
    counts = {k: v for k, v in summary.items() if k.startswith("adapter_parameters[")}
    final = summary.get("final_eval") or {}
    best = summary.get("best")
    return {"run": label, "stage": summary["stage"], "adapter": adapter,
            "adapter_parameters": summary.get(f"adapter_parameters[{adapter}]") if adapter else None,
            "trainable_parameters": summary.get("trainable_parameters"), "all_counts": counts,
            "base_parameters": summary.get("base_parameters"), "steps": summary.get("steps"),
            "train_time_s": summary.get("train_time_s"), "wall_time_s": summary.get("wall_time_s"),
            "peak_memory_mb": summary.get("peak_memory_mb"), "peak_memory_kind": summary.get("peak_memory_kind"),
            "tokens_per_s": summary.get("tokens_per_s"),
            "result": (f"held-out MLM loss {final['mlm_loss']:.3f} (ppl {final['perplexity']:.1f})"
                       if "mlm_loss" in final else
                       f"best validation F1 {100 * best['value']:.1f} (step {best['step']})" if best else "")}


def format_runs(runs: list[dict]) -> str:
    """The training runs as an aligned table of the columns that vary; a column with one value on every row
    is said once below it."""
    from ..training.report import markdown_table
    headers = ["run", "trained params", "steps", "time s", "peak MB", "result"]
    rows = [[r["run"], f"{r['adapter_parameters'] or r.get('trainable_parameters') or r.get('base_parameters') or 0:,}",
             r["steps"] or 0, f"{r['wall_time_s'] or 0:.1f}", f"{r['peak_memory_mb'] or 0:.0f}", r["result"]]
            for r in runs]
    lines = [markdown_table(headers, rows, drop_constant=True)]
    same = [f"{h} {rows[0][j]}" for j, h in enumerate(headers) if len(rows) > 1 and len({str(r[j]) for r in rows}) == 1]
    if same:
        lines.append(f"(every run: {', '.join(same)})")
    base = next((r["base_parameters"] for r in runs if r.get("base_parameters")), None)
    if base:
        kind = runs[-1].get("peak_memory_kind")
        lines.append(f"(trained params: an adapter's, or every weight of a full-model run; base model {base:,}; "
                     f"peak MB: {kind}, cumulative over the process)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# the small base model
# --------------------------------------------------------------------------------------------------------
def _cache_root(cfg: DemoConfig) -> str:
    return cfg.cache_dir or os.environ.get("MADX_FAST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "madx_fast")


def _base_key(cfg: DemoConfig, languages) -> str:
    import torch
    import transformers
    keys = {k: getattr(cfg, k) for k in ("hidden_size", "num_layers", "vocab_size", "max_length", "pretrain_steps",
                                         "pretrain_lr", "batch_size", "text_sentences", "seed")}
    keys.update(languages=sorted(languages), version=CACHE_VERSION, torch=torch.__version__.split("+")[0],
                transformers=transformers.__version__.split(".")[0])
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12]


def _base_model(cfg: DemoConfig, paths, languages, out: str):
    """The pretrained small base in ``<out>/base``: from the cache, or built and pretrained now."""
    target = os.path.join(out, "base")
    cached = os.path.join(_cache_root(cfg), f"demo-base-{_base_key(cfg, languages)}")
    if cfg.use_cache and os.path.isfile(os.path.join(cached, "config.json")):
        log.info("using the cached pretrained base model %s", cached)
        shutil.copytree(cached, target)
        return target, None
    texts = []
    for lang in languages:
        with open(paths[lang]["text"], encoding="utf-8") as f:
            texts.extend(line.strip() for line in f if line.strip())
    summary = pretrain_base(texts, target, cfg, os.path.join(out, "base-pretraining"))
    if cfg.use_cache:
        try:
            files.replace_directory(cached, lambda tmp: shutil.copytree(target, tmp, dirs_exist_ok=True))
            log.info("cached the base model in %s (delete it, or pass --no-cache, to pretrain again)", cached)
        except OSError as exc:  # a read-only home is no reason to fail the demo
            log.warning("could not cache the base model in %s: %s", cached, exc)
    return target, summary


def pretrain_base(texts, target: str, cfg: DemoConfig, run_dir: str) -> dict:
    """Tokenizer + XLM-R-architecture masked-LM from scratch, every parameter trained (full MLM)."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

    from ..training.tasks.mlm import MlmObjective, mlm_data_from_texts
    from ..training.trainer import Trainer, seed_everything

    t0 = time.perf_counter()
    tok = synthetic.train_tokenizer(texts, cfg.vocab_size)
    rng = __import__("random").Random(cfg.seed)
    shuffled = list(texts)
    rng.shuffle(shuffled)  # mix the languages within blocks
    mlm = mlm_data_from_texts(tok, shuffled, cfg.max_length)
    h = cfg.hidden_size
    config = XLMRobertaConfig(vocab_size=len(tok), hidden_size=h, num_hidden_layers=cfg.num_layers,
                              num_attention_heads=max(1, h // 32), intermediate_size=4 * h,
                              max_position_embeddings=cfg.max_length + 2, type_vocab_size=1, layer_norm_eps=1e-5,
                              pad_token_id=tok.pad_token_id, bos_token_id=0, eos_token_id=2)
    seed_everything(cfg.seed)
    model = XLMRobertaForMaskedLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("pretraining %s parameters on %d blocks (%d tokens) for %d steps", f"{n_params:,}", len(mlm),
             mlm.num_tokens, cfg.pretrain_steps)
    device = torch.device(cfg.device) if cfg.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    train_cfg = TrainConfig(steps=cfg.pretrain_steps, batch_size=cfg.batch_size, learning_rate=cfg.pretrain_lr,
                            warmup_steps=cfg.pretrain_steps // 10, weight_decay=0.01, seed=cfg.seed, log_every=20,
                            save_every=0, progress=cfg.progress, device=str(device), bf16=cfg.bf16,
                            report_to=list(cfg.report_to))
    result = Trainer(model, MlmObjective(mlm), range(len(mlm)), train_cfg, run_dir,
                     identity={"stage": "demo-pretraining"}).run()
    model.to("cpu")

    def build(tmp):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    files.replace_directory(target, build)
    return {"run": "base model pretraining (full MLM)", "stage": "pretrain", "adapter": None,
            "adapter_parameters": None, "base_parameters": n_params, "steps": cfg.pretrain_steps,
            "train_time_s": result["train_time_s"], "wall_time_s": time.perf_counter() - t0,
            "peak_memory_mb": result["peak_memory_mb"], "peak_memory_kind": result["peak_memory_kind"],
            "tokens_per_s": result["tokens_per_s"], "result": f"final MLM loss {result['final_loss']:.3f}"}
