"""MAD-X stage 1: a language adapter (reduction factor 2) and its NICE invertible adapter, trained by masked-LM
on unlabeled text of the language; embeddings, encoder and the tied MLM head stay frozen.

    train_language_adapter(model="xlm-roberta-base", lang="sw", train_data="data/sw.txt", output_dir="runs/sw")
    train_language_adapter(LanguageAdapterSettings(...))          # the same, from a settings object

Every input is checked before training starts. Writes ``<output_dir>/adapter`` (a bundle), ``run.json``
(returned) and, with ``export_adapterhub``, ``<output_dir>/adapterhub``.
"""
from __future__ import annotations

import logging
import os
import time

from .. import files
from ..model import MadxConfig
from . import data, models, runs
from .devices import pick_device
from .distributed import init_distributed
from .settings import LanguageAdapterSettings
from .tasks import mlm
from .trainer import Trainer, seed_everything

log = logging.getLogger("madx_fast.training")


def train_language_adapter(settings: LanguageAdapterSettings | None = None, /, **kwargs) -> dict:
    """Train the language adapter of ``settings`` (a ``LanguageAdapterSettings``, or its fields as keywords)."""
    s = LanguageAdapterSettings.build(settings, **kwargs)
    t_start = time.perf_counter()
    runs.check_output_dir(s.output_dir, resume=s.resume, overwrite=s.overwrite)
    procs = init_distributed(s.config.device)
    s.config.check_split(procs.world)
    device = pick_device(s.config.device, procs.local_rank)

    tok = models.load_tokenizer(s.tokenizer or s.model, need_mask=True, model=s.model)
    max_length = models.max_length_for(s.model, s.max_length, default=256)  # the paper's 256, if it fits
    texts, eval_texts = _texts(s)
    train = mlm.mlm_data_from_texts(tok, texts, max_length)
    heldout = mlm.mlm_data_from_texts(tok, eval_texts, max_length) if eval_texts else None
    log.info("%s: %d training blocks of %d tokens (%d tokens), %d held-out blocks", s.lang, len(train), max_length,
             train.num_tokens, len(heldout) if heldout else 0)

    seed_everything(s.config.seed)
    model, madx, fingerprint = models.wired_model("AutoModelForMaskedLM", s.model, s.backend)
    adapter_config = (MadxConfig.language if s.invertible else MadxConfig.seq_bn)(
        reduction_factor=s.reduction_factor, leave_out=list(s.leave_out))
    madx.add_adapter(s.lang, adapter_config, set_active=True)
    madx.train_adapters(s.lang)
    dtype = models.place(model, madx, s.backbone_dtype, device)
    models.compile_encoder(model, s.config.compile)
    runs.prepare_output(s.output_dir, resume=s.resume, overwrite=s.overwrite, main=procs.main)

    record = {"stage": "language", "language": s.lang, "adapter": s.lang, "base_model": s.model,
              "base_fingerprint": fingerprint, "adapter_config": adapter_config.to_dict(), "max_length": max_length,
              "mlm_probability": s.mlm_probability, "train_blocks": len(train), "data_tokens": train.num_tokens,
              "backbone_dtype": str(dtype or "float32"), "backend": s.backend}
    evaluate = None
    if heldout is not None:
        batches = mlm.fixed_batches(heldout, s.mlm_probability, s.config.eval_batch_size, s.config.seed,
                                    s.max_eval_blocks)
        evaluate = lambda: mlm.evaluate_mlm(model, batches, device, s.config.bf16)  # noqa: E731
    counts = models.param_counts(madx, [s.lang])
    log.info("training language adapter %r: %s parameters (%.2f%% of the base), %d steps of %d", s.lang,
             f"{counts[f'adapter_parameters[{s.lang}]']:,}", counts[f"adapter_percent_of_base[{s.lang}]"],
             s.config.steps, s.config.batch_size)
    trainer = Trainer(model, mlm.MlmObjective(train, s.mlm_probability), range(len(train)), s.config, s.output_dir,
                      evaluate=evaluate, identity=_identity(record), procs=procs, device=device)
    result = trainer.run(resume=s.resume)

    summary = {**record, "settings": s.to_dict(), "config": s.to_dict()["config"], **counts, **result}
    if procs.main:
        runs.write_bundle(madx, os.path.join(s.output_dir, "adapter"), s.lang,
                          dict(record, invertible=s.invertible, steps=s.config.steps, final_eval=result["final_eval"]))
        if s.export_adapterhub:
            madx.export_adapterhub(os.path.join(s.output_dir, "adapterhub"), s.lang, overwrite=True)
        summary["wall_time_s"] = time.perf_counter() - t_start
        files.write_json(os.path.join(s.output_dir, runs.RUN_SUMMARY), summary)
        log.info("language adapter %r written to %s (train %.1fs, peak memory %.0f MB)", s.lang,
                 os.path.join(s.output_dir, "adapter"), result["train_time_s"], result["peak_memory_mb"])
    procs.barrier()
    return summary


def _texts(s: LanguageAdapterSettings) -> tuple[list[str], list[str]]:
    """Training texts, and held-out texts: ``eval_data``, else the last ``eval_fraction`` of the training text."""
    texts = data.read_texts(s.train_data, lang=s.lang, split=s.train_split, text_column=s.text_column,
                            max_texts=s.max_texts)
    if s.eval_data:
        return texts, data.read_texts(s.eval_data, lang=s.lang, split=s.eval_split, text_column=s.text_column,
                                      max_texts=s.max_texts)
    if s.eval_fraction > 0 and len(texts) > 1:
        n_eval = max(1, int(len(texts) * s.eval_fraction))
        return texts[:-n_eval], texts[-n_eval:]
    return texts, []


def _identity(record: dict) -> dict:
    """What must not change when the run is resumed (the loop's own settings are added by the Trainer)."""
    keys = ("stage", "language", "base_model", "base_fingerprint", "adapter_config", "train_blocks", "data_tokens",
            "max_length", "mlm_probability", "backbone_dtype", "backend")
    return {k: record[k] for k in keys}
