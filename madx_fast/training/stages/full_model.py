"""The paper's baselines: every weight of the model trains, no adapter, on the same trainer and data path as
the adapter stages (resume, data parallelism, bf16 autocast, divergence checks, atomic outputs alike).

    FullModelMlmStage     ``madx train-lang --full-model``: masked-LM of the whole model on one language's text
                          (MLM-SRC on the source language, MLM-TRG on a target); writes ``<output>/model``
    FullFinetuneStage     ``madx train-task --full-finetune``: the whole model and the task head on the source
                          language's labels (the XLM-R baseline; from an MLM-SRC / MLM-TRG model directory given
                          as ``--model``, those baselines); writes ``best/`` and ``last/`` model directories

Each overrides what differs from its adapter stage: the model is loaded without MAD-X (``madx`` None), every
parameter trains in float32 (``--bf16`` for bfloat16 autocast), the parameter counts, the record and the
outputs (model directories, ``model_dirs.py``). ``base_model`` / ``base_fingerprint`` name the pretrained
model at the root of the chain (XLM-R for an MLM-TRG model too), ``init_model`` the model directory a run
started from when another full-model run made it.
"""
from __future__ import annotations

import logging
import os

from ...model.wiring import find_parts
from .. import model_dirs, models
from ..tasks import task_class
from .language_adapter import LanguageAdapterStage
from .task_adapter import TaskAdapterStage, check_stage_settings

log = logging.getLogger("madx_fast.training")


class _FullModel:
    """What both full-model stages do alike (mixed into each stage class before the adapter stage)."""

    def resolve_inputs(self) -> list[str]:
        self.start = model_dirs.start_model(self.s.model)
        self.base_model = self.start["path"]  # what loads (the tokenizer too, unless --tokenizer)
        return [self.start["path"]]

    def _load(self, auto_class: str, **kwargs):
        model = models.load_model(auto_class, self.base_model, **kwargs)
        fingerprint = models.base_fingerprint(model)
        self.root, self.init_model = model_dirs.root_and_init(self.start, fingerprint)
        return model, None, fingerprint

    def wire(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(True)

    def place(self):
        """Every weight trains: float32 master weights on the device (``--bf16``: autocast)."""
        self.model.to(self.device)
        return None

    def trained_adapters(self) -> list[str]:
        return []

    def counts(self) -> dict:
        """``base_parameters``: embeddings and encoder; ``head_parameters``: the rest (the task head, or the
        masked-LM head without the decoder weight it shares with the embeddings)."""
        base = sum(p.numel() for p in find_parts(self.model).base.parameters())
        total = sum(p.numel() for p in self.model.parameters())
        return {"base_parameters": base, "trainable_parameters": sum(p.numel() for p in self.model.parameters()
                                                                    if p.requires_grad),
                "head_parameters": total - base}

    def _facts(self) -> dict:
        return {**self.root, "init_model": self.init_model, "adapter": None, "adapter_config": None,
                "backbone_dtype": "float32", "backend": None}

    def identity(self, facts: dict) -> dict:
        return dict({k: facts[k] for k in self.identity_keys},
                    init_fingerprint=(facts["init_model"] or {}).get("fingerprint"))

    def _write(self, sub: str, meta: dict) -> str:
        path = os.path.join(self.s.output_dir, sub)
        model_dirs.write_model_dir(self.model, self.tokenizer, path, dict(self.run_record, **meta))
        return path


class FullModelMlmStage(_FullModel, LanguageAdapterStage):
    kind = "full-mlm"
    identity_keys = ("stage", "language", "base_model", "base_fingerprint", "train_blocks", "data_tokens",
                     "max_length", "objective", "mlm_probability")

    def resolve_inputs(self) -> list[str]:
        inputs = super().resolve_inputs()
        self.choose_objective()  # a decoder's whole model trains by causal LM
        return inputs

    def load_model(self):
        return self._load(self.auto_class, **self.model_kwargs)

    def record(self) -> dict:
        s = self.s
        return {**self._facts(), "stage": self.kind, "language": s.lang, "max_length": self.max_length,
                "objective": self.lm_objective,
                "mlm_probability": s.mlm_probability if self.lm_objective == "masked" else None, "train_blocks": len(self.train_blocks),
                "data_tokens": self.train_blocks.num_tokens, "train_data": s.train_data,
                "auto_class": self.auto_class}

    def describe(self, counts: dict) -> str:
        return (f"training the whole model by {self.lm_objective} LM on {self.s.lang!r}: {counts['trainable_parameters']:,} "
                f"parameters, {self.loop.steps} steps of {self.loop.batch_size}")

    def save(self, result: dict) -> str:
        path = self._write("model", {"steps": self.loop.steps, "final_eval": result["final_eval"]})
        return f"model trained by {self.lm_objective} LM on {self.s.lang!r} written to {path}"


class FullFinetuneStage(_FullModel, TaskAdapterStage):
    kind = "full-task"
    full_model = True
    identity_keys = ("stage", "task", "base_model", "base_fingerprint", "source_language", "labels",
                     "train_features", "max_length")

    def resolve_inputs(self) -> list[str]:
        check_stage_settings(self.s, self.full_model)
        inputs = super().resolve_inputs()
        self.name = self.s.name or task_class(self.s.task).name
        self.lang_path, self.lang = None, self.s.lang
        return inputs

    def load_model(self):
        return self._load(self.task.auto_class, **self.task.head_kwargs())

    def record(self) -> dict:
        s, task = self.s, self.task
        return {**self._facts(), "stage": self.kind, "task": task.name, "language": None,
                "source_language": self.lang, "labels": list(task.labels) if task.labels else None,
                "language_adapter": None, "train_data": s.train_data, "train_features": len(self.items),
                "max_length": self.max_length, "auto_class": task.auto_class}

    def describe(self, counts: dict) -> str:
        return (f"fine-tuning the whole model for {self.task.name} on {self.lang!r}: "
                f"{counts['trainable_parameters']:,} parameters (head {counts['head_parameters']:,}), "
                f"{self.loop.steps} steps of {self.loop.batch_size}")

    def written(self) -> str:
        return "fine-tuned model"

    def _save(self, sub: str, step: int, metrics: dict | None) -> None:
        self._write(sub, {"step": step, "metrics": metrics})


__all__ = ["FullFinetuneStage", "FullModelMlmStage"]
