"""The training stages: ``base.py`` (the skeleton: the steps every run takes, and run.json's keys),
``language_adapter.py`` (stage 1, ``madx train-lang``) and ``task_adapter.py`` (stage 2, ``madx train-task``).
A new stage is a ``TrainingStage`` subclass in a module of its own that fills in the skeleton's hooks."""
from .base import RUN_FACTS, TrainingStage
from .language_adapter import LanguageAdapterStage, train_language_adapter
from .task_adapter import TaskAdapterStage, train_task_adapter

__all__ = ["LanguageAdapterStage", "RUN_FACTS", "TaskAdapterStage", "TrainingStage", "train_language_adapter",
           "train_task_adapter"]
