"""MAD-X stages 1 and 2 as functions: the Python API under ``madx train-lang`` and ``madx train-task``.

    train_language_adapter(model="xlm-roberta-base", lang="sw", train_data="data/sw.txt", output_dir="runs/sw")
    train_task_adapter(task="ner", lang_adapter="runs/en", train_data="wikiann:en", output_dir="runs/ner-en")

Stage 1: a language adapter (reduction factor 2) and its NICE invertible adapter, trained by masked-LM on
unlabeled text of the language; embeddings, encoder and the tied MLM head stay frozen.
Stage 2: a task adapter (reduction factor 16) in ``Stack(source_language, task)`` with the language adapter
frozen, plus the task head; the checkpoint with the best validation score is kept.
Stage 3 (zero-shot transfer) is in ``transfer.py``.

Each function checks every input (output directory, data, labels, adapters, base model) before training
starts, and returns the run summary it writes to ``<output_dir>/run.json``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import Sequence

import torch

from . import artifacts
from . import data as D
from .tasks import MlmObjective, Task, evaluate_mlm, get_task
from ..model.controller import check_adapter_name
from .trainer import Dist, TrainConfig, Trainer, init_distributed, pick_device, seed_everything

log = logging.getLogger("madx_fast.training")

# The paper's stage-1 settings (Pfeiffer et al., 2020): 250k steps, batch 64, lr 1e-4, 15% masking.
PAPER_LANG = dict(steps=250_000, batch_size=64, learning_rate=1e-4)
# Stage 2 (NER on WikiANN): 100 epochs, batch 16, lr 1e-4.
PAPER_TASK = dict(batch_size=16, learning_rate=1e-4)
PAPER_TASK_EPOCHS = 100


# --------------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_transformers():
    """Hide transformers' "newly initialized weights" notices (we log what we build ourselves)."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - a missing model dir / hub id / file all mean the same here
        raise OSError(f"cannot load the tokenizer of {name!r}: {type(exc).__name__}: {exc}") from None
    D.check_tokenizer(tok)
    return tok


def load_model(auto_class: str, name: str, **kwargs):
    import transformers
    cls = getattr(transformers, auto_class)
    try:
        with _quiet_transformers():
            return cls.from_pretrained(name, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise OSError(f"cannot load {auto_class}.from_pretrained({name!r}): {type(exc).__name__}: {exc}") from None


def backbone_dtype_for(name, device=None) -> torch.dtype | None:
    """The dtype to keep the frozen backbone in (None: leave it float32). ``"auto"`` (the default of the
    command line and of the stage functions) is bfloat16 on a GPU that has it, float32 elsewhere: the fast
    path, adapters keep float32 master weights either way. ``device=None`` only checks the name."""
    if name == "auto":
        dev = torch.device(device) if device is not None else None
        if dev is not None and dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if name in (None, "", "float32", "fp32", torch.float32):
        return None
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if isinstance(name, torch.dtype):
        return name
    if name not in table:
        raise ValueError(f"backbone dtype {name!r}: choose auto, float32, bfloat16 or float16")
    return table[name]


def _param_counts(madx, model, names: Sequence[str]) -> dict:
    adapter_ids = {id(p) for n in madx.configs for p in madx.adapter_parameters(n)}
    base = sum(p.numel() for p in madx.parts.base.parameters() if id(p) not in adapter_ids)
    out = {"base_parameters": base}
    for n in names:
        k = madx.num_parameters(n)
        out[f"adapter_parameters[{n}]"] = k
        out[f"adapter_percent_of_base[{n}]"] = 100.0 * k / base
    return out


def _prepare_output(output_dir: str, resume: bool, overwrite: bool, ctx: Dist) -> None:
    """After every input has been checked: with ``overwrite``, remove the earlier run's outputs."""
    if ctx.main and overwrite and not resume and os.path.isdir(output_dir):
        artifacts.clear_run_outputs(output_dir)
    if ctx.main:
        os.makedirs(output_dir, exist_ok=True)
        artifacts.remove_stale_temporaries(output_dir)
    ctx.barrier()


# --------------------------------------------------------------------------------------------------------
# stage 1: language adapter
# --------------------------------------------------------------------------------------------------------
def train_language_adapter(*, model: str, lang: str, train_data: str, output_dir: str,
                           config: TrainConfig | None = None, eval_data: str | None = None,
                           eval_fraction: float = 0.01, max_eval_blocks: int = 512, text_column: str = "text",
                           max_texts: int | None = None, max_length: int | None = None,
                           train_split: str = "train", eval_split: str = "validation",
                           mlm_probability: float = 0.15,
                           reduction_factor: float = 2, invertible: bool = True,
                           leave_out: Sequence[int] = (), backend: str | None = None,
                           backbone_dtype: str | None = "auto", tokenizer: str | None = None,
                           resume: bool = False, overwrite: bool = False, export_adapterhub: bool = False) -> dict:
    """Train the language adapter ``lang`` (+ NICE invertible adapter unless ``invertible=False``) of the
    masked-LM model ``model`` on ``train_data`` (a text file, directory or HF dataset; ``{lang}`` expands).
    Held-out MLM loss / perplexity every ``config.eval_every`` steps on ``eval_data``, or on the last
    ``eval_fraction`` of the texts (``train_split`` / ``eval_split`` name the splits of HF datasets).
    ``max_length`` defaults to 256 (fewer where the model has fewer
    positions). Writes ``<output_dir>/adapter`` (a bundle) and ``run.json``."""
    t_start = time.perf_counter()
    config = config or TrainConfig(**PAPER_LANG)
    config.check()
    check_adapter_name(lang, "language")
    artifacts.check_output_dir(output_dir, resume=resume, overwrite=overwrite)
    backbone_dtype_for(backbone_dtype)  # a bad name fails before any work
    ctx = init_distributed(config.device)
    config.check_split(ctx.world)
    device = pick_device(config.device, ctx)

    tok = load_tokenizer(tokenizer or model)
    D.check_tokenizer(tok, need_mask=True)
    model_config = load_config(model)
    if max_length is None:  # 256 as the paper, or less where the model has fewer positions
        max_length = min(256, position_limit(model_config) or 256)
    check_max_length(model_config, max_length)
    texts = D.read_texts(train_data, lang=lang, split=train_split, text_column=text_column, max_texts=max_texts)
    if eval_data:
        eval_texts = D.read_texts(eval_data, lang=lang, split=eval_split, text_column=text_column,
                                  max_texts=max_texts)
    elif eval_fraction > 0 and len(texts) > 1:
        n_eval = max(1, int(len(texts) * eval_fraction))
        texts, eval_texts = texts[:-n_eval], texts[-n_eval:]
    else:
        eval_texts = []
    train = D.mlm_data_from_texts(tok, texts, max_length)
    heldout = D.mlm_data_from_texts(tok, eval_texts, max_length) if eval_texts else None
    log.info("%s: %d training blocks of %d tokens (%d tokens), %d held-out blocks", lang, len(train), max_length,
             train.num_tokens, len(heldout) if heldout else 0)

    seed_everything(config.seed)
    mlm_model = load_model("AutoModelForMaskedLM", model)
    madx, fingerprint = _wire(mlm_model, backend)
    from ..model import MadxConfig
    adapter_cfg = MadxConfig.language(reduction_factor=reduction_factor, leave_out=list(leave_out))
    if not invertible:
        adapter_cfg = MadxConfig.seq_bn(reduction_factor=reduction_factor, leave_out=list(leave_out))
    madx.add_adapter(lang, adapter_cfg)
    madx.set_active(lang)
    madx.train_adapters(lang)
    dtype = backbone_dtype_for(backbone_dtype, device)
    if dtype is not None:
        madx.cast_backbone(dtype)
    mlm_model.to(device)
    _prepare_output(output_dir, resume, overwrite, ctx)

    eval_batches = _fixed_mlm_batches(heldout, config, mlm_probability, max_eval_blocks) if heldout else None
    evaluate = (lambda: evaluate_mlm(mlm_model, eval_batches, device, config.bf16)) if eval_batches else None
    counts = _param_counts(madx, mlm_model, [lang])
    identity = {"stage": "language", "model": model, "lang": lang, "base_fingerprint": fingerprint,
                "adapter": adapter_cfg.to_dict(), "blocks": len(train), "data_tokens": train.num_tokens,
                "max_length": max_length, "mlm_probability": mlm_probability}
    trainer = Trainer(mlm_model, MlmObjective(train, mlm_probability), range(len(train)), config, output_dir,
                      evaluate=evaluate, identity=identity, ctx=ctx, device=device)
    log.info("training language adapter %r: %s parameters (%.2f%% of the base), %d steps of %d", lang,
             f"{counts[f'adapter_parameters[{lang}]']:,}", counts[f"adapter_percent_of_base[{lang}]"],
             config.steps, config.batch_size)
    result = trainer.run(resume=resume)

    summary = {"stage": "language", "language": lang, "base_model": model, "base_fingerprint": fingerprint,
               "train_data": train_data, "eval_data": eval_data, "invertible": invertible,
               "adapter_config": adapter_cfg.to_dict(), "max_length": max_length,
               "mlm_probability": mlm_probability, "train_blocks": len(train),
               "config": _config_dict(config), "backend": backend, "backbone_dtype": str(dtype or "float32"),
               **counts, **result}
    if ctx.main:
        meta = {"kind": "language", "language": lang, "base_model": model, "base_fingerprint": fingerprint,
                "invertible": invertible, "max_length": max_length, "steps": config.steps,
                "final_eval": result["final_eval"]}
        artifacts.write_bundle(madx, os.path.join(output_dir, "adapter"), lang, meta)
        if export_adapterhub:
            madx.export_adapterhub(os.path.join(output_dir, "adapterhub"), lang, overwrite=True)
        summary["wall_time_s"] = time.perf_counter() - t_start
        artifacts.atomic_write_json(os.path.join(output_dir, artifacts.RUN_SUMMARY), summary)
        log.info("language adapter %r written to %s (train %.1fs, peak memory %.0f MB)", lang,
                 os.path.join(output_dir, "adapter"), result["train_time_s"], result["peak_memory_mb"])
    ctx.barrier()
    return summary


def position_limit(config) -> int | None:
    """The longest sequence a BERT / XLM-R config can embed (RoBERTa positions start after the pad index)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and getattr(config, "model_type", "") in ("roberta", "xlm-roberta"):
        limit -= (config.pad_token_id or 0) + 1
    return limit


def load_config(name: str):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001
        raise OSError(f"cannot load the config of {name!r}: {type(exc).__name__}: {exc}") from None


def check_max_length(config, max_length: int) -> None:
    """A sequence longer than the model's position table fails deep in the embeddings: say so up front."""
    limit = position_limit(config)
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length {max_length} is longer than the model's {limit} positions")


def _wire(model, backend):
    from ..model import add_madx
    fingerprint = artifacts.base_fingerprint(model)
    return add_madx(model, backend=backend), fingerprint


def _fixed_mlm_batches(mlm: D.MlmData, config: TrainConfig, p: float, max_blocks: int) -> list[dict]:
    """Held-out batches masked once with a fixed generator: every evaluation scores the same masks."""
    g = torch.Generator().manual_seed(config.seed + 104729)
    objective = MlmObjective(mlm, p)
    n = min(len(mlm), max_blocks)
    return [objective.make_batch(range(i, min(i + config.eval_batch_size, n)), g)
            for i in range(0, n, config.eval_batch_size)]


def _config_dict(config: TrainConfig) -> dict:
    import dataclasses
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------------------------------------
# stage 2: task adapter
# --------------------------------------------------------------------------------------------------------
def train_task_adapter(*, task: str, train_data: str, output_dir: str, model: str | None = None,
                       lang_adapter: str | None = None, lang: str | None = None,
                       validation_data: str | None = None, train_split: str = "train",
                       validation_split: str = "validation", labels: Sequence[str] | None = None,
                       name: str | None = None, config: TrainConfig | None = None, epochs: float | None = None,
                       max_length: int | None = None, reduction_factor: float = 16,
                       max_train_examples: int | None = None, max_eval_examples: int | None = None,
                       backend: str | None = None, backbone_dtype: str | None = "auto",
                       tokenizer: str | None = None, resume: bool = False, overwrite: bool = False) -> dict:
    """Train a task adapter for ``task`` ("ner", "qa", "copa") stacked on the frozen language adapter in
    ``lang_adapter`` (a bundle or run directory; None trains the task adapter alone: MAD-X -LAD -INV).

    ``model`` defaults to the base model the language adapter was trained on. ``validation_data`` defaults to
    ``train_data`` (its validation split) when that is a dataset name or a directory. ``epochs`` sets the
    number of steps to ``epochs * ceil(examples / batch_size)``. Writes ``best/`` (best validation score),
    ``last/`` (bundles with the head) and ``run.json``."""
    t_start = time.perf_counter()
    config = config or TrainConfig(**PAPER_TASK, steps=1)
    the_task: Task = get_task(task)
    name = name or the_task.name
    check_adapter_name(name, "task adapter name")
    artifacts.check_output_dir(output_dir, resume=resume, overwrite=overwrite)
    backbone_dtype_for(backbone_dtype)  # a bad name fails before any work

    lang_path, lang_meta = None, {}
    if lang_adapter:
        lang_path = artifacts.find_bundle(lang_adapter, prefer=("adapter",))
        lang_meta = artifacts.read_bundle_meta(lang_path)
        if lang_meta.get("kind") not in (None, "language"):
            raise artifacts.BundleError(f"{lang_path} holds a {lang_meta.get('kind')} adapter, not a language "
                                        "adapter")
        lang = lang or lang_meta.get("language") or lang_meta.get("adapter") or _adapter_name(lang_path)
        check_adapter_name(lang, "language")
        if lang == name:
            raise ValueError(f"the task adapter and the language adapter are both named {name!r}; pass name=...")
    model = model or lang_meta.get("base_model")
    if not model:
        raise ValueError("no base model: pass model=... (or a language adapter trained by madx_fast, which "
                         "records its base model)")
    if validation_data is None and _has_splits(train_data, lang):
        validation_data = train_data

    ctx = init_distributed(config.device)
    config.check_split(ctx.world)
    device = pick_device(config.device, ctx)
    tok = load_tokenizer(tokenizer or model)
    the_task.pad_id = tok.pad_token_id
    model_config = load_config(model)
    if max_length is None:  # the task's usual length, or less where the model has fewer positions
        max_length = min(the_task.default_max_length, position_limit(model_config) or the_task.default_max_length)
    check_max_length(model_config, max_length)
    train_examples = the_task.load(train_data, train_split, lang, max_train_examples, labels)
    label_names = the_task.labels_of(train_examples)
    if labels:
        label_names = list(labels)
    if label_names is not None:
        the_task.check_fits(train_examples, label_names, f"{train_data} ({train_split})")
    head_kwargs = the_task.head_kwargs(label_names)
    val_examples = val_features = None
    if validation_data:
        val_examples = the_task.load(validation_data, validation_split, lang, max_eval_examples, label_names)
        if label_names is not None:
            the_task.check_fits(val_examples, label_names, f"{validation_data} ({validation_split})")
        val_features = the_task.encode_eval(val_examples, tok, max_length)
    train_features = the_task.encode_train(train_examples, tok, max_length)
    if epochs:
        per_epoch = math.ceil(len(train_features) / config.batch_size)
        config.steps = max(1, math.ceil(epochs * per_epoch))
        if not config.eval_every:  # validate once per epoch (the paper keeps the best epoch)
            config.eval_every = per_epoch
    config.check()
    log.info("%s: %d training features, %s validation examples", name, len(train_features),
             len(val_examples) if val_examples else "no")

    seed_everything(config.seed)
    task_model = load_model(the_task.auto_class, model, **head_kwargs)
    madx, fingerprint = _wire(task_model, backend)
    if lang_path:
        artifacts.load_bundle(madx, lang_path, load_as=lang, fingerprint=fingerprint, model_name=model)
    from ..model import MadxConfig, Stack
    task_cfg = MadxConfig.task(reduction_factor=reduction_factor)
    madx.add_adapter(name, task_cfg)
    madx.set_active(Stack(lang, name) if lang_path else name)
    madx.train_adapters(name)
    extra = set(the_task.extra_trainable(task_model))
    for n, p in task_model.named_parameters():
        if n in extra:
            p.requires_grad_(True)
    dtype = backbone_dtype_for(backbone_dtype, device)
    if dtype is not None:
        madx.cast_backbone(dtype)
    task_model.to(device)
    _prepare_output(output_dir, resume, overwrite, ctx)

    meta = {"kind": "task", "task": the_task.name, "labels": label_names, "base_model": model,
            "base_fingerprint": fingerprint, "language": lang if lang_path else None, "source_language": lang,
            "language_adapter": ({"path": lang_path, "weights_sha256": lang_meta.get("weights_sha256"),
                                  "invertible": madx.invertible_adapter(lang) is not None} if lang_path else None),
            "max_length": max_length, "auto_class": the_task.auto_class}

    def save(directory, step, metrics):
        artifacts.write_bundle(madx, os.path.join(output_dir, directory), name,
                               dict(meta, step=step, metrics=metrics), artifacts.head_state(task_model, madx))

    def evaluate():
        return the_task.evaluate(task_model, val_examples, val_features, batch_size=config.eval_batch_size,
                                 device=device, bf16=config.bf16)

    counts = _param_counts(madx, task_model, [name] + ([lang] if lang_path else []))
    counts["head_parameters"] = sum(v.numel() for v in artifacts.head_state(task_model, madx).values())
    identity = {"stage": "task", "task": the_task.name, "model": model, "base_fingerprint": fingerprint,
                "language": lang if lang_path else None, "labels": label_names, "features": len(train_features),
                "max_length": max_length, "adapter": task_cfg.to_dict(),
                "language_weights": lang_meta.get("weights_sha256")}
    trainer = Trainer(task_model, the_task, train_features, config, output_dir,
                      evaluate=evaluate if val_features else None, main_metric=the_task.main_metric,
                      on_best=lambda step, metrics: save("best", step, metrics), identity=identity, ctx=ctx,
                      device=device)
    log.info("training task adapter %r (%s) on %s: %s parameters + head %s, %d steps of %d", name,
             the_task.name, f"Stack({lang!r}, {name!r})" if lang_path else f"{name!r} alone",
             f"{counts[f'adapter_parameters[{name}]']:,}", f"{counts['head_parameters']:,}", config.steps,
             config.batch_size)
    result = trainer.run(resume=resume)

    summary = {"stage": "task", "task": the_task.name, "adapter": name, "language": meta["language"],
               "language_adapter": lang_path, "base_model": model, "base_fingerprint": fingerprint,
               "labels": label_names, "train_data": train_data, "validation_data": validation_data,
               "train_features": len(train_features), "max_length": max_length, "config": _config_dict(config),
               "epochs": epochs, "backend": backend, "backbone_dtype": str(dtype or "float32"), **counts, **result}
    if ctx.main:
        save("last", config.steps, result["final_eval"])
        if not val_features:
            save("best", config.steps, None)
        summary["wall_time_s"] = time.perf_counter() - t_start
        artifacts.atomic_write_json(os.path.join(output_dir, artifacts.RUN_SUMMARY), summary)
        best = result["best"]
        log.info("task adapter %r written to %s%s (train %.1fs, peak memory %.0f MB)", name, output_dir,
                 f"; best {best['metric']} {best['value']:.4g} at step {best['step']}" if best else "",
                 result["train_time_s"], result["peak_memory_mb"])
    ctx.barrier()
    return summary


def _adapter_name(path: str) -> str:
    meta_file = os.path.join(path, "madx_adapter.json")
    if os.path.isfile(meta_file):
        return artifacts.read_json(meta_file).get("name") or os.path.basename(path)
    hub = os.path.join(path, "adapter_config.json")
    if os.path.isfile(hub):
        return artifacts.read_json(hub).get("name") or os.path.basename(path)
    return os.path.basename(os.path.normpath(path))


def _has_splits(spec: str, lang: str | None) -> bool:
    """A dataset name or a directory has a validation split to find; a single file does not."""
    try:
        source = D.resolve_spec(spec, lang)
    except (FileNotFoundError, D.DataError):
        return False
    if source.kind == "hf":
        return True
    if not os.path.isdir(source.path):
        return False
    try:
        D.split_file(source.path, "validation")
    except (FileNotFoundError, D.DataError):
        return False
    return True
