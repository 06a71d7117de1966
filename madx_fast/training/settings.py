"""Every setting of every stage, defined once: a dataclass per stage that is the Python function's argument,
generates the ``madx`` command's flags, and is recorded in ``run.json`` under the same names.

    TrainConfig                 the training loop (steps, batch, lr, schedule, precision, checkpoints, device)
    LanguageAdapterSettings     stage 1, ``train_language_adapter`` / ``madx train-lang`` (``full_model``: the
                                whole model by MLM instead, the MLM-SRC / MLM-TRG baselines)
    TaskAdapterSettings         stage 2, ``train_task_adapter`` / ``madx train-task`` (``full_finetune``: the
                                whole model instead, the XLM-R baseline; ``seeds``: a run per seed)
    TransferSettings            stage 3, ``evaluate_transfer`` / ``madx transfer``
    ReportSettings              transfer results of several runs in one report, ``madx report``
    PredictSettings             mixed-language inference on JSONL, ``predict`` / ``madx predict``
    MergeSettings               one adapter averaged from several, ``merge_adapters`` / ``madx merge``
    PushSettings                a run or adapter onto the Hugging Face Hub, ``push`` / ``madx push``

    ParameterBudgetSettings     the parameter budget table, ``madx params``

A field's flag is ``--`` + its name with dashes, unless its metadata says otherwise (``flag``; ``positional``: a
positional argument); ``help``, ``choices``, ``nargs``, a ``parse`` function for each command-line string and a
``collect`` function for the parsed value (e.g. ``LANG=DIR`` items into a dict) come from the metadata too.
Fields without a flag (``cli=False``) exist for Python callers only. ``check()`` validates what can be validated
without reading anything (it runs before any file or model is touched). ``madx demo``'s flags come the same way from
``madx_fast.demo.DemoConfig``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ..model.controller import check_adapter_name
from .ensemble import check_ensembles
from ..model.lm_heads import OBJECTIVES

# the objectives a language adapter trains with (an encoder-decoder's seq2seq objective is not one of them)
LM_OBJECTIVES = tuple(o for o in OBJECTIVES if o != "seq2seq")

BACKENDS = ("auto", "eager", "triton", "cuda")
BACKBONE_DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # torch.compile backends (the last two: to debug)


def opt(default=dataclasses.MISSING, *, help: str = "", flag: str | None = None, cli: bool = True,  # noqa: A002
        parse: Callable[[str], Any] | None = None, collect: Callable[[list], Any] | None = None, choices=None,
        nargs=None, metavar=None, const=None, default_factory=None, aliases: tuple[str, ...] = (),
        positional: bool = False):
    """A settings field with its command-line flag (``nargs="?"`` with ``const``: a flag whose value may be
    left out; ``collect``: turns the parsed list of a ``nargs`` flag into the field's value; ``aliases``: other
    spellings of the flag, kept working; ``positional``: a positional argument instead of a flag)."""
    meta = {"help": help, "flag": flag, "cli": cli, "parse": parse, "collect": collect, "choices": choices,
            "nargs": nargs, "metavar": metavar, "const": const, "aliases": aliases, "positional": positional}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _number(name: str, value, *, minimum=None, above=None, below=None, integer=False) -> None:
    """A finite number in range, or a ValueError naming the setting."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    ok = ok and (minimum is None or value >= minimum) and (above is None or value > above)
    ok = ok and (below is None or value < below)
    if not ok:
        rng = " and ".join(s for s in (f">= {minimum}" if minimum is not None else "",
                                       f"> {above}" if above is not None else "",
                                       f"< {below}" if below is not None else "") if s)
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind}{' ' + rng if rng else ''}, got {value!r}")


# --------------------------------------------------------------------------------------------------------
# the training loop
# --------------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Loop settings. ``batch_size`` is the global batch (all processes and accumulation steps together)."""

    steps: int | None = opt(1000, help="optimizer steps")
    batch_size: int = opt(64, help="global batch: all processes and accumulation steps together")
    learning_rate: float = opt(1e-4, flag="--lr", help="peak learning rate")
    warmup_steps: int = opt(0, help="linear warm-up steps, then linear decay to 0")
    weight_decay: float = opt(0.0, help="AdamW weight decay")
    grad_accum: int = opt(1, help="gradient accumulation steps per optimizer step")
    max_grad_norm: float | None = opt(1.0, help="gradient clipping by global norm (0: off)",
                                      parse=lambda s: float(s) or None)
    bf16: bool = opt(False, help="bfloat16 autocast for the forward pass (with --backbone-dtype float32)")
    seed: int = opt(42, help="seed of the data order, masks, dropout and initialisation")
    log_every: int = opt(10, help="log the loss every N steps (0: every step)")
    eval_every: int = opt(0, help="evaluate every N steps (0: only at the end)")
    save_every: int = opt(500, help="checkpoint every N steps (0: only at the end)")
    eval_batch_size: int = opt(64, help="batch size of evaluations")
    skip_nonfinite: int = opt(0, help="skip up to N optimizer steps whose loss or gradients are not finite before "
                                      "stopping the run (0: stop at the first)")
    progress: bool = opt(True, flag="--no-progress", help="no progress bar or progress lines (log lines instead)")
    device: str | None = opt(None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    compile: str | None = opt(None, nargs="?", const="inductor", choices=COMPILE_BACKENDS, metavar="BACKEND",
                              help="torch.compile the encoder (adapters included) with BACKEND (default inductor)")
    cuda_graphs: bool = opt(False, help="replay each optimizer step (forward, backward, clipping, AdamW) from a CUDA "
                                        "graph; batches padded to a few fixed shapes (one process, bfloat16 or "
                                        "float32 backbone)")
    report_to: list[str] = opt(default_factory=list, parse=csv_list, metavar="TOOLS",
                               help="also log the loss, learning rate, throughput and evaluation metrics of every "
                                    "logging step to: tensorboard (<output>/tensorboard), wandb; comma-separated")

    def check(self, *, steps_required: bool = True) -> None:
        """``steps_required=False``: ``steps`` may still be None (a stage's settings, where None means "the
        stage decides": the task's epochs)."""
        _check_compile(self.compile)
        if self.compile and self.cuda_graphs:
            raise ValueError("--compile and --cuda-graphs each capture the training step: choose one")
        from .reporting import check_report_to
        check_report_to(self.report_to)
        if self.steps is None and steps_required:
            raise ValueError("steps is not set (None): give steps (or, for a task adapter, epochs)")
        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size"):
            if name == "steps" and self.steps is None:
                continue
            _number(name, getattr(self, name), minimum=1, integer=True)
        for name in ("warmup_steps", "log_every", "eval_every", "save_every", "skip_nonfinite"):
            _number(name, getattr(self, name), minimum=0, integer=True)
        _number("learning_rate", self.learning_rate, above=0)
        _number("weight_decay", self.weight_decay, minimum=0)
        if self.max_grad_norm is not None:
            _number("max_grad_norm", self.max_grad_norm, above=0)

    def check_split(self, world: int) -> None:
        """The global batch must split evenly over ``world`` processes x ``grad_accum`` micro-batches."""
        per_process = self.batch_size / world
        if per_process != int(per_process) or int(per_process) % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} must split evenly over {world} process(es) x "
                             f"{self.grad_accum} accumulation step(s)")

    def identity(self) -> dict:
        """Settings that must not change when a run is resumed."""
        keys = ("steps", "batch_size", "learning_rate", "warmup_steps", "weight_decay", "max_grad_norm", "bf16",
                "seed")
        return {k: getattr(self, k) for k in keys}


def _check_compile(backend) -> None:
    if backend not in (None, True) + COMPILE_BACKENDS:
        raise ValueError(f"compile backend {backend!r}: choose one of {', '.join(COMPILE_BACKENDS)}")


# The paper's settings (Pfeiffer et al., 2020). Stage 1: 250k steps, batch 64, lr 1e-4, 15% masking.
PAPER_LANG_LOOP = dict(steps=250_000, batch_size=64, learning_rate=1e-4)
# Stage 2 (NER on WikiANN): 100 epochs, batch 16, lr 1e-4. steps None: the task's default length (its
# ``default_epochs``: NER 100, the paper's; QA and COPA, for which madx_fast does not reproduce the paper's
# schedule, TrainConfig's 1000 steps), unless steps or epochs are given.
PAPER_TASK_LOOP = dict(steps=None, batch_size=16, learning_rate=1e-4)


# --------------------------------------------------------------------------------------------------------
# the stages
# --------------------------------------------------------------------------------------------------------
class _StageSettings:
    """What every stage's settings share: building from keywords, checks, flags, the run.json record."""

    # a stage whose loop (``config``) may leave ``steps`` None, for the stage to decide (a task: its epochs)
    steps_from_stage = False

    @classmethod
    def build(cls, given=None, /, **kwargs):
        """``given`` settings, or settings made from keyword arguments (the stage functions take either)."""
        if given is not None and kwargs:
            raise TypeError(f"pass either a {cls.__name__} or keyword arguments, not both")
        if given is None:
            given = cls(**kwargs)
        elif not isinstance(given, cls):
            raise TypeError(f"expected {cls.__name__}, got {type(given).__name__}")
        given.check()
        from .preflight import check_local_inputs
        check_local_inputs(given)  # every local path, before anything touches the network
        return given

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        loop = getattr(self, "config", None)
        if loop is not None:
            loop.check(steps_required=not self.steps_from_stage)
        if getattr(self, "backbone_dtype", "auto") not in BACKBONE_DTYPES:
            raise ValueError(f"backbone dtype {self.backbone_dtype!r}: choose one of {', '.join(BACKBONE_DTYPES)}")
        if getattr(self, "backend", None) not in (None,) + BACKENDS:
            raise ValueError(f"backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")


@dataclass
class LanguageAdapterSettings(_StageSettings):
    """Stage 1: a language adapter (+ NICE invertible adapter) trained by masked-LM (causal-LM for a decoder) on the
    language's text."""

    model: str = opt(help="HF masked-LM model name or directory (e.g. xlm-roberta-base)")
    lang: str = opt(help="language code; also the adapter's name")
    train_data: str = opt(help="text file, directory of text files, or HF dataset 'name[:config]'; {lang} expands")
    output_dir: str = opt(flag="--output", help="run directory")
    eval_data: str | None = opt(None, help="held-out text (default: the last --eval-fraction of the training text)")
    eval_fraction: float = opt(0.01, help="share of the training text held out when there is no --eval-data")
    train_split: str = opt("train", help="split of an HF dataset --train-data")
    eval_split: str = opt("validation", help="split of an HF dataset --eval-data")
    max_length: int | None = opt(None, help="block length (default 256, or the model's limit)")
    mlm_probability: float = opt(0.15, help="share of tokens masked (80%% <mask>, 10%% random, 10%% kept), with the "
                                            "masked objective")
    objective: str | None = opt(None, choices=LM_OBJECTIVES, help="masked-LM or causal-LM training (default: the "
                                "model's own: causal for decoders such as GPT-2, Llama, Mistral; masked otherwise)")
    reduction_factor: float = opt(2, help="bottleneck = hidden size // reduction factor (paper: 2)")
    invertible: bool = opt(True, flag="--no-invertible", help="no NICE invertible adapter (MAD-X -INV)")
    leave_out: list[int] = opt(default_factory=list, nargs="*", parse=int, help="layers without an adapter")
    text_column: str = opt("text", help="text field of JSON records and HF datasets")
    max_texts: int | None = opt(None, help="read at most this many texts (streams HF datasets)")
    tokenizer: str | None = opt(None, help="tokenizer name or directory (default: --model)")
    export_adapterhub: bool = opt(False, help="also write <output>/adapterhub in AdapterHub's format")
    backbone_dtype: str = opt("auto", choices=BACKBONE_DTYPES,
                              help="frozen backbone dtype; adapters stay float32 (auto: bfloat16 on a GPU)")
    backend: str | None = opt(None, choices=BACKENDS, help="adapter kernels (default: triton on CUDA, eager on CPU)")
    resume: bool = opt(False, help="continue the run in --output from its last checkpoint (fresh if none)")
    overwrite: bool = opt(False, help="replace an earlier run's outputs in --output")
    full_model: bool = opt(False, help="train every weight of the model by MLM, no adapter (the MLM-SRC / MLM-TRG "
                                       "baselines); writes <output>/model, a model directory for train-task --model")
    allow_data_change: bool = opt(False, help="with --resume: continue although the training or evaluation data "
                                             "differ from the checkpoint's (recorded in run.json's data_changes)")
    max_eval_blocks: int = opt(512, cli=False)
    config: TrainConfig = opt(default_factory=lambda: TrainConfig(**PAPER_LANG_LOOP), cli=False)

    def check(self) -> None:
        super().check()
        for name in ("model", "lang", "train_data", "output_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} is required")
        check_adapter_name(self.lang, "language")
        if self.full_model:
            _check_full_model(self, "--full-model", export_adapterhub=False, leave_out=[])
        _number("eval_fraction", self.eval_fraction, minimum=0, below=1)
        _number("mlm_probability", self.mlm_probability, above=0, below=1)
        if self.objective not in (None,) + LM_OBJECTIVES:
            raise ValueError(f"objective {self.objective!r}: choose one of {', '.join(LM_OBJECTIVES)} (or None: the "
                             "model's own)")
        _number("reduction_factor", self.reduction_factor, above=0)
        if self.max_length is not None:
            _number("max_length", self.max_length, minimum=3, integer=True)


@dataclass
class TaskAdapterSettings(_StageSettings):
    """Stage 2: a task adapter (NER, QA, COPA) trained in Stack(source language, task) with the language adapter
    frozen, plus the task head; the best checkpoint on validation is kept."""

    steps_from_stage = True  # steps None: the task's default length (its epochs), unless steps or epochs are given

    task: str = opt(help="ner (WikiANN format), qa (SQuAD format), copa (COPA/XCOPA)")
    train_data: str = opt(help="file, directory with split files, or HF dataset")
    output_dir: str = opt(flag="--output", help="run directory")
    model: str | None = opt(None, help="base model (default: the one the language adapter was trained on)")
    lang_adapter: str | None = opt(None, help="the source language adapter (run or adapter directory); omit for "
                                              "MAD-X -LAD -INV")
    lang: str | None = opt(None, help="source language (default: the language adapter's)")
    validation_data: str | None = opt(None, help="default: the validation split of --train-data when it is a "
                                                 "dataset or directory")
    train_split: str = opt("train", help="split of --train-data")
    validation_split: str = opt("validation", help="split of --validation-data")
    labels: list[str] | None = opt(None, parse=csv_list, help="NER label names in id order, comma-separated")
    name: str | None = opt(None, help="task adapter name (default: the task)")
    epochs: float | None = opt(None, help="sets --steps to epochs x batches per epoch (without --steps or --epochs: "
                                          "the task's default, NER 100 epochs as the paper; QA, COPA 1000 steps)")
    max_length: int | None = opt(None, help="sequence length (default: the task's, or the model's limit)")
    reduction_factor: float = opt(16, help="bottleneck = hidden size // reduction factor (paper: 16)")
    max_train_examples: int | None = opt(None, help="use at most this many training examples")
    max_eval_examples: int | None = opt(None, help="use at most this many validation examples")
    tokenizer: str | None = opt(None, help="tokenizer name or directory (default: the model's)")
    backbone_dtype: str = opt("auto", choices=BACKBONE_DTYPES,
                              help="frozen backbone dtype; adapters and head stay float32 (auto: bfloat16 on a GPU)")
    backend: str | None = opt(None, choices=BACKENDS, help="adapter kernels (default: triton on CUDA, eager on CPU)")
    resume: bool = opt(False, help="continue the run in --output from its last checkpoint (fresh if none)")
    overwrite: bool = opt(False, help="replace an earlier run's outputs in --output")
    full_finetune: bool = opt(False, help="train every weight of --model and the head, no adapters (the XLM-R "
                                          "baseline; --model may be a train-lang --full-model run: MLM-SRC / MLM-TRG)")
    seeds: list[int] | None = opt(None, parse=lambda text: [int(v) for v in csv_list(text)],
                                  help="comma-separated seeds: one run per seed, in <output>/seed-<N> (--seed ignored)")
    allow_data_change: bool = opt(False, help="with --resume: continue although the training or evaluation data "
                                             "differ from the checkpoint's (recorded in run.json's data_changes)")
    config: TrainConfig = opt(default_factory=lambda: TrainConfig(**PAPER_TASK_LOOP), cli=False)

    def check(self) -> None:
        super().check()
        for name in ("task", "train_data", "output_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} is required")
        if self.full_finetune:
            _check_full_model(self, "--full-finetune", lang_adapter=None)
            if not self.model or not self.lang:
                raise ValueError("--full-finetune needs --model (a model name or directory) and --lang (the language "
                                 "of the training data, the transfer's source)")
        if self.seeds is not None:
            if not self.seeds or len(set(self.seeds)) != len(self.seeds):
                raise ValueError(f"seeds must be distinct integers, got {self.seeds!r}")
            for seed in self.seeds:
                _number("seed", seed, minimum=0, integer=True)
        for name, what in ((self.name, "task adapter name"), (self.lang, "language")):
            if name is not None:
                check_adapter_name(name, what)
        _number("reduction_factor", self.reduction_factor, above=0)
        if self.epochs is not None:
            _number("epochs", self.epochs, above=0)
        if self.max_length is not None:
            _number("max_length", self.max_length, minimum=3, integer=True)
        for name in ("max_train_examples", "max_eval_examples"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name), minimum=1, integer=True)


def _check_full_model(settings, flag: str, **unused) -> None:
    """A full-model stage trains float32 weights and no adapter: refuse the adapter settings given with it."""
    if settings.backbone_dtype not in ("auto", "float32"):
        raise ValueError(f"{flag} trains every weight in float32 (use --bf16 for bfloat16 autocast); "
                         f"--backbone-dtype {settings.backbone_dtype} is for a frozen backbone")
    for name, default in unused.items():
        if getattr(settings, name) != default:
            raise ValueError(f"{flag} trains no adapter: --{name.replace('_', '-')} does not apply")


def _named_values(items, form: str, where: str) -> dict[str, str]:
    """``NAME=VALUE`` items as a dict; ``form`` (e.g. "LANG=DIR") and ``where`` (the flag) name them in errors."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{where} takes {form}, got {item!r}")
        if name in out:
            raise ValueError(f"{where} names {name!r} twice")
        out[name] = value
    return out


def _lang_adapter_map(items) -> dict[str, str]:
    return _named_values(items, "LANG=DIR", "--lang-adapter")


# Test-time ensembles (``madx_fast.training.ensemble``): madx_fast's defaults, not tuned on any benchmark.
EMEA_STEPS, EMEA_LR = 3, 1.0


def _check_ensembles(s) -> None:
    """The ensembles among ``--lang-adapter`` entries name adapter entries; EMEA's settings are sane and its
    eager steps are not asked to run inside a captured forward."""
    ensembles = check_ensembles(s.lang_adapters if isinstance(s.lang_adapters, dict) else {})
    _number("emea_steps", s.emea_steps, minimum=0, integer=True)
    _number("emea_lr", s.emea_lr, minimum=0)
    emea = sorted(lang for lang, spec in ensembles.items() if spec.kind == "emea")
    if emea and (s.cuda_graphs or getattr(s, "compile", None)):
        raise ValueError(f"EMEA ensembles ({', '.join(emea)}) tune their weights eagerly before each batch: they do "
                         "not combine with --cuda-graphs or --compile")


def split_system(item: str) -> tuple[str | None, str]:
    """``(SYSTEM, DIR)`` of a ``[SYSTEM=]DIR`` entry of ``--task-adapter`` / ``--full-model`` (None: no system
    given); a path that exists as written is a path, even with a ``=`` in it."""
    system, sep, path = item.partition("=")
    if not sep or os.path.exists(os.path.expanduser(item)):
        return None, item
    return system, path


# the configurations stage 3 evaluates a task adapter in (``settings=``; madx_fast.training.transfer)
TRANSFER_SETTINGS = {"target": "Stack(target, task)", "source": "Stack(source, task)", "none": "task adapter alone"}


@dataclass
class TransferSettings(_StageSettings):
    """Stage 3: the zero-shot transfer matrix, task adapters x target languages x settings."""

    targets: list[str] = opt(parse=csv_list, help="comma-separated target languages")
    eval_data: str = opt(help="evaluation data spec with {lang}, e.g. wikiann:{lang}")
    task_adapters: list[str] = opt(default_factory=list, flag="--task-adapter", nargs="+", metavar="[SYSTEM=]DIR",
                                   help="task adapter run, bundle or adapter directories (madx_fast or AdapterHub "
                                        "format, saved with their head; a directory of seed-N runs stands for each), "
                                        "each under the system SYSTEM (default --system)")
    full_models: list[str] = opt(default_factory=list, flag="--full-model", nargs="+", metavar="[SYSTEM=]DIR",
                                 help="fully fine-tuned models (train-task --full-finetune runs or their model "
                                      "directories), each a system (default: XLM-R, XLM-R MLM-SRC or XLM-R "
                                      "MLM-TRG after the run; an MLM-TRG model is evaluated on its language only)")
    output_dir: str | None = opt(None, flag="--output", help="directory for the CSV / JSON / Markdown / PNG report")
    lang_adapters: dict[str, str] = opt(default_factory=dict, flag="--lang-adapter", nargs="*",
                                        metavar="[SYSTEM:]LANG=DIR", collect=_lang_adapter_map,
                                        help="language adapters, e.g. sw=runs/lang-sw; SYSTEM:sw=... is the one the "
                                             "task adapters of SYSTEM use (e.g. mad-x-inv:sw=runs/lang-sw-noinv); "
                                             "{lang}=runs/lang-{lang} stands for every language; a language "
                                             "without one: an ensemble of others, qu=avg:es,pt (weights: "
                                             "avg:es=0.7,pt=0.3) or qu=emea:es,pt (weights tuned per batch); "
                                             "mad-x:qu=avg:es,pt for one system")
    split: str | None = opt(None, help="split of the evaluation data (default: test, or the dataset's evaluation "
                                       "split where it has no test split: validation for XQuAD)")
    settings: list[str] = opt(default_factory=lambda: ["target"], parse=csv_list,
                              help="comma-separated: target, source, none")
    system: str = opt("MAD-X", help="the system of --task-adapter entries without SYSTEM= (a row name of the report)")
    model: str | None = opt(None, help="base model (default: the one the adapters were trained on)")
    batch_size: int = opt(32, help="evaluation batch size")
    max_examples: int | None = opt(None, help="evaluate at most this many examples per target")
    device: str | None = opt(None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    bf16: bool = opt(False, help="bfloat16 autocast (with --backbone-dtype float32)")
    backbone_dtype: str = opt("auto", choices=BACKBONE_DTYPES,
                              help="frozen backbone dtype (auto: bfloat16 on a GPU, float32 on the CPU)")
    cuda_graphs: bool = opt(False, help="replay each evaluation forward from CUDA graphs (NER, QA)")
    backend: str | None = opt(None, choices=BACKENDS, help="adapter kernels (default: triton on CUDA, eager on CPU)")
    compile: str | None = opt(None, nargs="?", const="inductor", choices=COMPILE_BACKENDS, metavar="BACKEND",
                              help="torch.compile the encoder (adapters included) with BACKEND (default inductor)")
    emea_steps: int = opt(EMEA_STEPS, help="entropy-minimisation steps per batch of an emea: ensemble")
    emea_lr: float = opt(EMEA_LR, help="step size of the emea: ensembles' weights (exponentiated gradient)")

    def check(self) -> None:
        super().check()
        _check_compile(self.compile)
        if self.compile and self.cuda_graphs:
            raise ValueError("--compile and --cuda-graphs each capture the evaluation forward: choose one")
        _check_ensembles(self)
        if not self.task_adapters and not self.full_models:
            raise ValueError("nothing to evaluate: give --task-adapter or --full-model")
        if not self.targets:
            raise ValueError("no target languages")
        if not self.eval_data:
            raise ValueError("eval_data is required")
        unknown = [s for s in self.settings if s not in TRANSFER_SETTINGS]
        if unknown or not self.settings:
            raise ValueError(f"unknown transfer setting(s) {unknown}; choose from {sorted(TRANSFER_SETTINGS)}")
        _number("batch_size", self.batch_size, minimum=1, integer=True)
        for lang in [key.rpartition(":")[2] for key in self.lang_adapters] + list(self.targets):
            check_adapter_name(lang, "language")
        for name in [self.system] + [split_system(item)[0] for item in self.task_adapters + self.full_models]:
            if name is not None and (not name.strip() or ":" in name or "=" in name):
                raise ValueError(f"system name {name!r} must be non-empty, without ':' or '='")


ON_ERROR = ("skip", "record", "fail")


@dataclass
class PredictSettings(_StageSettings):
    """Inference on a JSONL stream in mixed-language batches: each line's language adapter (``lang``) stacked
    under one task adapter, ``Stack(PerRow(...), task)`` (docs/training.md, "Predict")."""

    task_adapter: str = opt(help="task adapter run, bundle or adapter directory (madx_fast or AdapterHub format, "
                                 "saved with its head)")
    lang_adapters: dict[str, str] = opt(flag="--lang-adapter", nargs="+", metavar="LANG=DIR",
                                        collect=_lang_adapter_map,
                                        help="a language adapter per value of the lines' 'lang' field, e.g. "
                                             "sw=runs/lang-sw qu=runs/lang-qu; or an ensemble of others, "
                                             "qu=avg:es,pt or qu=emea:es,pt")
    input: str = opt("-", help="JSONL input file, or - for stdin")
    output: str | None = opt(None, help="JSONL output file, written atomically (default: stdout)")
    on_error: str = opt("skip", choices=ON_ERROR, help="a malformed line or one in a language without an adapter: "
                        "skip it (reported on stderr), write an error record in its place, or fail")
    model: str | None = opt(None, help="base model (default: the one the adapters were trained on)")
    batch_size: int = opt(32, help="examples per forward: a NER or QA window each (long inputs have several), a COPA "
                                   "line (with both choices)")
    chunk_lines: int = opt(1024, help="lines read, predicted and written at a time: bounds memory; rows are "
                                      "sorted by length within a chunk")
    max_length: int | None = opt(None, help="tokens per row (default: the task adapter's, or the task's, within "
                                            "the model's limit); longer inputs are windowed (NER, QA) or cut (COPA)")
    device: str | None = opt(None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    bf16: bool = opt(False, help="bfloat16 autocast (with --backbone-dtype float32)")
    backbone_dtype: str = opt("auto", choices=BACKBONE_DTYPES,
                              help="frozen backbone dtype (auto: bfloat16 on a GPU, float32 on the CPU)")
    cuda_graphs: bool = opt(False, help="replay each forward from CUDA graphs (NER, QA; batches padded to a few "
                                        "fixed shapes)")
    backend: str | None = opt(None, choices=BACKENDS, help="adapter kernels (default: triton on CUDA, eager on CPU)")
    progress: bool = opt(True, flag="--no-progress", help="no progress bar or progress lines")
    emea_steps: int = opt(EMEA_STEPS, help="entropy-minimisation steps per batch of an emea: ensemble")
    emea_lr: float = opt(EMEA_LR, help="step size of the emea: ensembles' weights (exponentiated gradient)")
    max_line_bytes: int = opt(1 << 20, help="longest input line read (bytes); a longer one is that line's error, "
                                            "skipped unread")

    def check(self) -> None:
        super().check()
        _check_ensembles(self)
        if not isinstance(self.task_adapter, str) or not self.task_adapter:
            raise ValueError("task_adapter is required")
        if not isinstance(self.lang_adapters, dict) or not self.lang_adapters:
            raise ValueError("no language adapters: pass one per language of the input, e.g. "
                             "--lang-adapter sw=runs/lang-sw")
        for lang in self.lang_adapters:
            check_adapter_name(lang, "language")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error {self.on_error!r}: choose one of {', '.join(ON_ERROR)}")
        for name in ("batch_size", "chunk_lines", "max_line_bytes"):
            _number(name, getattr(self, name), minimum=1, integer=True)
        if self.max_length is not None:
            _number("max_length", self.max_length, minimum=3, integer=True)
        if not isinstance(self.input, str) or not self.input:
            raise ValueError("input is required (a file, or - for stdin)")


def _merge_inputs(items) -> dict[str, str]:
    return _named_values(items, "NAME=DIR for each adapter to average", "madx merge")


def csv_floats(text: str) -> list[float]:
    try:
        return [float(t) for t in csv_list(text)]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


@dataclass
class MergeSettings(_StageSettings):
    """One adapter whose parameters are the weighted average of several adapters' (``madx merge``;
    ``MadxAdapters.average_adapter``): written as a normal adapter directory."""

    adapters: dict[str, str] = opt(positional=True, nargs="+", metavar="NAME=DIR", collect=_merge_inputs,
                                   help="the adapters to average, in order: a name and a run, bundle or adapter "
                                        "directory (or Hub name) each, e.g. es=runs/lang-es pt=runs/lang-pt")
    output_dir: str = opt(flag="--output", help="directory of the merged adapter")
    weights: list[float] | None = opt(None, parse=csv_floats, help="comma-separated weights, one per adapter in "
                                                                   "order (default: equal)")
    normalize_weights: bool = opt(True, flag="--no-normalize", help="use --weights as given instead of dividing "
                                                                    "them by their sum")
    name: str | None = opt(None, help="name of the merged adapter (default: the names joined by '+')")
    model: str | None = opt(None, help="base model (default: the one the adapters record)")
    overwrite: bool = opt(False, help="replace an adapter already in --output")

    def check(self) -> None:
        super().check()
        if not isinstance(self.adapters, dict) or not self.adapters:
            raise ValueError("no adapters to merge: give NAME=DIR for each, e.g. es=runs/lang-es pt=runs/lang-pt")
        for name in self.adapters:
            check_adapter_name(name)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError("output_dir is required (--output DIR)")
        if self.name is not None:
            check_adapter_name(self.name)
        if self.weights is not None:
            if len(self.weights) != len(self.adapters):
                raise ValueError(f"{len(self.weights)} weights for {len(self.adapters)} adapters: give one per adapter")
            for w in self.weights:
                _number("weight", w)


@dataclass
class ParameterBudgetSettings(_StageSettings):
    """What MAD-X adds per language and per task to a base model (``madx params``;
    ``madx_fast.model.params.parameter_budget``)."""

    model: str | None = opt(None, help="model name or directory (default: XLM-R base, offline)")
    langs: list[str] = opt(default_factory=lambda: ["en"], parse=csv_list, help="comma-separated languages to count")
    lang_reduction_factor: float = opt(2, help="reduction factor of the language adapters")
    task_reduction_factor: float = opt(16, help="reduction factor of the task adapter")
    invertible: bool = opt(True, flag="--no-invertible", help="language adapters without NICE (MAD-X -INV)")


@dataclass
class PushSettings(_StageSettings):
    """A run, bundle or adapter directory uploaded to a Hugging Face Hub repository with a model card
    (``madx push``; ``madx_fast.training.publish.push``)."""

    directory: str = opt(positional=True, metavar="DIR", help="a run directory (madx train-lang / train-task), an "
                         "adapter bundle, or an adapter directory (madx_fast or AdapterHub format)")
    repo_id: str = opt(positional=True, metavar="REPO_ID", help="the Hub repository, e.g. me/madx-lang-sw (created "
                       "if missing)")
    private: bool = opt(False, help="create the repository private")
    revision: str | None = opt(None, help="branch to commit to, created if missing (default: main)")
    message: str | None = opt(None, help="commit message (default: what is pushed)")
    include_checkpoint: bool = opt(False, help="also push a run's checkpoint.pt (the optimizer state, to resume "
                                               "elsewhere; large)")
    token: str | None = opt(None, cli=False)  # default: the token huggingface_hub finds (HF_TOKEN, `hf auth login`)

    def check(self) -> None:
        super().check()
        for name in ("directory", "repo_id"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} is required")
        from huggingface_hub.utils import HFValidationError, validate_repo_id
        try:
            validate_repo_id(self.repo_id)
        except HFValidationError:
            raise ValueError(f"{self.repo_id!r} is not a Hub repository id (write 'namespace/name', e.g. "
                             "me/madx-lang-sw)") from None


@dataclass
class ReportSettings(_StageSettings):
    """Transfer results of separate runs merged into one report (``madx report``;
    ``madx_fast.training.report``)."""

    runs: list[str] = opt(positional=True, nargs="+", metavar="RUN_DIR",
                          help="transfer report directories (madx transfer --output, or an earlier madx report)")
    output_dir: str | None = opt(None, flag="--output", help="directory for the merged report (CSV, JSON, Markdown, "
                                                            "heatmaps); without it the table is only printed")
    overwrite: bool = opt(False, help="replace a report already in --output")
    baseline: str | None = opt(None, help="the system the difference heatmap subtracts (default: full fine-tuning "
                                          "without MLM, the XLM-R baseline; else MAD-X -LAD -INV)")
    title: str | None = opt(None, help="title of the heatmaps")

    def check(self) -> None:
        super().check()
        if not self.runs or not all(isinstance(r, str) and r for r in self.runs):
            raise ValueError("no transfer results to report: give one or more run directories")


# --------------------------------------------------------------------------------------------------------
# command-line flags
# --------------------------------------------------------------------------------------------------------
def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(parser, cls, *, given_only: bool = False) -> None:
    """Add a flag for every CLI field of ``cls`` and, for a stage that trains (a ``config`` field), for every
    TrainConfig field in a group titled "config", showing that stage's defaults. ``given_only``: a flag left
    out sets nothing (``args_values`` then holds only the flags given; the command decides the defaults)."""
    _add_fields(parser, cls, None, given_only)
    loop = next((f for f in dataclasses.fields(cls) if f.name == "config"), None)
    if loop is not None:
        group = parser.add_argument_group("config", "the training loop (TrainConfig; run.json's \"config\")")
        _add_fields(group, TrainConfig, loop.default_factory(), given_only)


def _add_fields(parser, cls, defaults, given_only: bool) -> None:
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        default = getattr(defaults, f.name) if defaults is not None else (
            f.default if f.default is not dataclasses.MISSING else
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kwargs = {"dest": f.name, "help": meta.get("help", "")}
        if isinstance(default, bool):
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            kwargs["type"] = meta.get("parse") or _scalar_type(f)
            kwargs["metavar"] = _flag(f).lstrip("-").upper().replace("-", "_") if meta.get("choices") is None \
                else None
            for key in ("choices", "nargs", "metavar", "const"):
                if meta.get(key) is not None:
                    kwargs[key] = meta[key]
        if required:
            kwargs["required"] = True
        elif not isinstance(default, bool) and default not in (None, [], {}):
            kwargs["help"] += f" (default {','.join(map(str, default)) if isinstance(default, list) else default})"
        kwargs["default"] = None if required else argparse.SUPPRESS if given_only else default
        if meta.get("positional"):
            del kwargs["dest"], kwargs["required"]
            parser.add_argument(f.name, **kwargs)
        else:
            parser.add_argument(_flag(f), *meta.get("aliases", ()), **kwargs)


def _scalar_type(f: dataclasses.Field):
    hint = str(f.type)
    if hint.startswith("int"):
        return int
    if hint.startswith("float"):
        return float
    return str


def args_values(cls, args) -> dict:
    """The values of ``cls``'s CLI fields in parsed arguments (``add_arguments``'s flags), by field name;
    with ``given_only`` flags, only those given."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True) and hasattr(args, f.name):
            collect = f.metadata.get("collect")
            values[f.name] = collect(getattr(args, f.name) or []) if collect else getattr(args, f.name)
    return values


def from_args(cls, args):
    """The settings object of ``cls`` from parsed arguments (``add_arguments``'s flags)."""
    values = args_values(cls, args)
    if any(f.name == "config" for f in dataclasses.fields(cls)):
        values["config"] = TrainConfig(**args_values(TrainConfig, args))
    return cls(**values)
