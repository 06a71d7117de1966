"""The training stages: ``base.py`` (the skeleton: the steps every run takes, and run.json's keys),
``language_adapter.py`` (stage 1, ``madx train-lang``), ``task_adapter.py`` (stage 2, ``madx train-task``) and
``full_model.py`` (the baselines that train every weight: ``--full-model``, ``--full-finetune``). A new stage is
a ``TrainingStage`` subclass in a module of its own that fills in the skeleton's hooks.

``train_language`` and ``train_task`` are the commands' entry points: they pick the stage the settings ask
for (adapter or full model) and, with ``seeds``, run the task stage once per seed (``madx_fast/training/seeds.py``)."""
from ..seeds import train_each_seed
from ..settings import LanguageAdapterSettings, TaskAdapterSettings
from .base import RUN_FACTS, TrainingStage
from .full_model import FullFinetuneStage, FullModelMlmStage
from .language_adapter import LanguageAdapterStage, train_language_adapter
from .task_adapter import TaskAdapterStage, train_task_adapter


def train_language(settings: LanguageAdapterSettings | None = None, /, **kwargs) -> dict:
    """``madx train-lang``: a language adapter, or with ``full_model`` the whole model by masked LM; run.json."""
    s = LanguageAdapterSettings.build(settings, **kwargs)
    return (FullModelMlmStage if s.full_model else LanguageAdapterStage)(s).run()


def train_task(settings: TaskAdapterSettings | None = None, /, **kwargs) -> dict:
    """``madx train-task``: a task adapter, or with ``full_finetune`` the whole model; run.json, or with
    ``seeds`` ``{"seeds", "output_dir", "runs": [run.json of each seed]}``."""
    s = TaskAdapterSettings.build(settings, **kwargs)
    stage = FullFinetuneStage if s.full_finetune else TaskAdapterStage
    if s.seeds is None:
        return stage(s).run()
    return train_each_seed(lambda one: stage(one).run(), s)


__all__ = ["FullFinetuneStage", "FullModelMlmStage", "LanguageAdapterStage", "RUN_FACTS", "TaskAdapterStage",
           "TrainingStage", "train_language", "train_language_adapter", "train_task", "train_task_adapter"]
