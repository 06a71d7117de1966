"""MAD-X stage 1: a language adapter (reduction factor 2) and its NICE invertible adapter, trained on unlabeled
text of the language with the objective the model was pretrained with (``--objective`` overrides it): masked-LM
for encoders, causal-LM for decoders (GPT-2, Llama, Mistral); embeddings, layers and the (tied or untied) LM
head stay frozen.

    train_language_adapter(model="xlm-roberta-base", lang="sw", train_data="data/sw.txt", output_dir="runs/sw")
    train_language_adapter(LanguageAdapterSettings(...))          # the same, from a settings object

Every input is checked before training starts. Writes ``<output_dir>/adapter`` (a bundle), ``run.json``
(returned) and, with ``export_adapterhub``, ``<output_dir>/adapterhub``.
"""
from __future__ import annotations

import logging
import os

from ...model import MadxConfig
from .. import data, models, runs
from ..settings import LanguageAdapterSettings
from ..tasks import causal_lm, mlm
from .base import TrainingStage

log = logging.getLogger("madx_fast.training")


class LanguageAdapterStage(TrainingStage):
    kind = "language"
    settings_class = LanguageAdapterSettings
    identity_keys = ("stage", "language", "base_model", "base_fingerprint", "adapter_config", "train_blocks",
                     "data_tokens", "max_length", "mlm_probability", "backbone_dtype", "backend")
    auto_class = "AutoModelForMaskedLM"  # ``resolve_inputs`` sets the objective's class
    need_mask = True

    def resolve_inputs(self) -> list[str]:
        if self.s.full_model:
            raise ValueError("full_model=True asks for the full-model stage: call madx_fast.training.train_language "
                             "(madx train-lang --full-model)")
        inputs = super().resolve_inputs()
        self.choose_objective()
        return inputs

    def choose_objective(self) -> None:
        """The LM objective of ``base_model`` (or ``--objective``) and the model class that trains with it."""
        self.lm_objective, self.auto_class, self.model_kwargs = models.language_model_class(self.base_model,
                                                                                            self.s.objective)
        self.need_mask = self.lm_objective == "masked"

    def read_data(self) -> None:
        s, tok = self.s, self.tokenizer
        self.max_length = models.max_length_for(self.base_model, s.max_length, default=256)  # the paper's 256
        texts, eval_texts = _texts(s)
        causal = self.lm_objective == "causal"
        blocks = causal_lm.causal_data_from_texts if causal else mlm.mlm_data_from_texts
        self.train_blocks = blocks(tok, texts, self.max_length)
        self.heldout = blocks(tok, eval_texts, self.max_length) if eval_texts else None
        self.objective = (causal_lm.CausalLmObjective(self.train_blocks) if causal else
                          mlm.MlmObjective(self.train_blocks, s.mlm_probability))
        self.items = range(len(self.train_blocks))
        log.info("%s: %d training blocks of %d tokens (%d tokens), %d held-out blocks", s.lang,
                 len(self.train_blocks), self.max_length, self.train_blocks.num_tokens,
                 len(self.heldout) if self.heldout else 0)

    def load_model(self):
        return models.wired_model(self.auto_class, self.base_model, self.s.backend, **self.model_kwargs)

    def digested_data(self):
        return self.train_blocks, (None if self.heldout is None else (self.heldout, self.s.max_eval_blocks))

    def wire(self) -> None:
        s = self.s
        self.adapter_config = (MadxConfig.language if s.invertible else MadxConfig.seq_bn)(
            reduction_factor=s.reduction_factor, leave_out=list(s.leave_out))
        self.madx.add_adapter(s.lang, self.adapter_config, set_active=True)
        self.madx.train_adapters(s.lang)

    def trained_adapters(self) -> list[str]:
        return [self.s.lang]

    def record(self) -> dict:
        s = self.s
        return {"stage": self.kind, "language": s.lang, "adapter": s.lang, "base_model": s.model,
                "base_fingerprint": self.fingerprint, "adapter_config": self.adapter_config.to_dict(),
                "max_length": self.max_length, "objective": self.lm_objective,
                "mlm_probability": s.mlm_probability if self.lm_objective == "masked" else None,
                "train_blocks": len(self.train_blocks), "data_tokens": self.train_blocks.num_tokens,
                "train_data": s.train_data, "auto_class": self.auto_class,
                "backbone_dtype": str(self.backbone_dtype or "float32"), "backend": s.backend}

    def identity(self, facts: dict) -> dict:
        """A masked-LM run's identity is the one runs had before the objective was a choice (their checkpoints
        resume); a causal-LM run's names its objective."""
        out = super().identity(facts)
        if facts["objective"] != "masked":
            out["objective"] = facts["objective"]
        return out

    def evaluation(self):
        if self.heldout is None:
            return None
        loop = self.loop
        if self.lm_objective == "causal":
            batches = causal_lm.fixed_batches(self.heldout, loop.eval_batch_size, self.s.max_eval_blocks)
            return lambda: causal_lm.evaluate_causal(self.model, batches, self.device, loop.bf16)
        batches = mlm.fixed_batches(self.heldout, self.s.mlm_probability, loop.eval_batch_size, loop.seed,
                                    self.s.max_eval_blocks)
        return lambda: mlm.evaluate_mlm(self.model, batches, self.device, loop.bf16)

    def describe(self, counts: dict) -> str:
        lang, loop = self.s.lang, self.loop
        return (f"training language adapter {lang!r} ({self.lm_objective} LM): "
                f"{counts[f'adapter_parameters[{lang}]']:,} parameters "
                f"({counts[f'adapter_percent_of_base[{lang}]']:.2f}% of the base), {loop.steps} steps of "
                f"{loop.batch_size}")

    def save(self, result: dict) -> str:
        s, path = self.s, os.path.join(self.s.output_dir, "adapter")
        runs.write_bundle(self.madx, path, s.lang, dict(self.run_record, invertible=s.invertible, steps=self.loop.steps,
                                                        final_eval=result["final_eval"]))
        if s.export_adapterhub:
            self.madx.export_adapterhub(os.path.join(s.output_dir, "adapterhub"), s.lang, overwrite=True)
        return f"language adapter {s.lang!r} written to {path}"


def train_language_adapter(settings: LanguageAdapterSettings | None = None, /, **kwargs) -> dict:
    """Train the language adapter of ``settings`` (a ``LanguageAdapterSettings``, or its fields as keywords)."""
    return LanguageAdapterStage.train(settings, **kwargs)


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
