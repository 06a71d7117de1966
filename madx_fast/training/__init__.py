"""MAD-X training: language adapters by masked-LM, task adapters on a frozen language adapter, zero-shot
transfer by swapping the language adapter (docs/training.md).

    from madx_fast.training import TrainConfig, train_language_adapter, train_task_adapter, evaluate_transfer

Reading order: ``settings.py`` (every setting of every stage, once: Python arguments, CLI flags, run.json
keys) -> ``stages/`` (``base.py``: the skeleton every training run follows, and run.json's keys;
``language_adapter.py``, ``task_adapter.py``: stages 1 and 2; ``full_model.py``: the baselines that train every
weight, writing ``model_dirs.py``'s model directories; ``seeds.py``: a run per seed) and ``transfer.py`` (stage 3,
with ``report.py``: the matrix of one or many runs, ``madx report``) -> ``models.py``
(models, tokenizers, dtypes), ``devices.py`` and ``tasks/`` (``mlm``, ``ner``, ``qa``, ``copa``: read -> encode
-> collate -> loss -> metrics -> predict lines) -> ``trainer.py`` (the loop) with ``checkpoint.py``,
``distributed.py``, ``progress.py``, ``batches.py``; ``runs.py`` (run directories and bundles) and ``data.py``
(data specs, generic readers); ``loading.py`` (trained adapters resolved and loaded for ``transfer.py`` and
``predict.py``: mixed-language inference on JSON lines).
The ``madx`` command (``madx_fast/cli.py``) is a thin layer over these; the demo is ``madx_fast.demo``.
"""
from .data import DataError
from .runs import BundleError
from .predict import predict_stream
from .report import merge_runs
from .settings import (LanguageAdapterSettings, PredictSettings, ReportSettings, TaskAdapterSettings, TrainConfig,
                       TransferSettings)
from .stages import train_language, train_language_adapter, train_task, train_task_adapter
from .trainer import Trainer, read_log
from .transfer import evaluate_transfer, write_transfer_report

__all__ = ["BundleError", "DataError", "LanguageAdapterSettings", "PredictSettings", "ReportSettings",
           "TaskAdapterSettings", "TrainConfig", "TransferSettings", "Trainer", "evaluate_transfer", "merge_runs",
           "predict_stream", "read_log", "train_language", "train_language_adapter", "train_task",
           "train_task_adapter", "write_transfer_report"]
