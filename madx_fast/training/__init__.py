"""MAD-X training: language adapters by masked-LM, task adapters on a frozen language adapter, zero-shot
transfer by swapping the language adapter, and the embedded demo (docs/training.md).

    from madx_fast.training import TrainConfig, train_language_adapter, train_task_adapter, evaluate_transfer

Layout: ``data.py`` (text, WikiANN / SQuAD / COPA data, MLM masking, the seeded example stream),
``tasks.py`` (objectives, heads, metrics), ``trainer.py`` (the loop: schedule, accumulation, bf16,
checkpoints, resume, DDP), ``artifacts.py`` (run directories, adapter bundles, atomic writes),
``stages.py`` (stages 1 and 2), ``transfer.py`` (stage 3: the zero-shot matrix), ``synthetic.py`` and
``demo.py`` (the offline demo). The ``madx`` command (``madx_fast/cli.py``) is a thin layer over these.
"""
from .artifacts import BundleError
from .data import DataError
from .stages import train_language_adapter, train_task_adapter
from .trainer import TrainConfig, Trainer, read_log
from .transfer import evaluate_transfer, write_transfer_report

__all__ = ["BundleError", "DataError", "TrainConfig", "Trainer", "evaluate_transfer", "read_log",
           "train_language_adapter", "train_task_adapter", "write_transfer_report"]
