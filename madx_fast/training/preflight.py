"""Every local input a command names, checked before anything is read from the network: data files, model,
tokenizer and adapter directories, the input file, and where the outputs go. Runs when a stage's settings
are built (``_StageSettings.build``), so every entry point (``train_language_adapter``, ``train_task_adapter``,
``evaluate_transfer``, ``predict``, the ``madx`` commands) refuses a mistyped path in a moment, naming the
nearest existing names, instead of after a Hub lookup.

The settings' fields are found by their names, which mean the same in every settings class: ``model`` and
``tokenizer`` (a directory or a Hub name), ``train_data`` / ``eval_data`` / ``validation_data`` (data specs,
``madx_fast.training.data``; ``{lang}`` expanded for the languages the settings name), ``lang_adapter`` /
``task_adapter`` / ``task_adapters`` / ``lang_adapters`` (directories or Hub names), ``input`` (a file, or
``-``) and ``directory`` (what ``madx push`` uploads), ``output_dir`` / ``output`` (where the outputs go:
creatable, and a run directory not holding another run unless resumed or overwritten).
"""
from __future__ import annotations

import os

from ..model.hub import HUB_PREFIX
from ..paths import LocalPathError, check_local, check_writable, looks_local, missing_message
from . import data, runs

DATA_FIELDS = ("train_data", "eval_data", "validation_data")
LOCAL_FIELDS = {"input": "input file", "directory": "directory"}  # always local ("-": stdin)
NAME_FIELDS = {"model": "model directory", "tokenizer": "tokenizer directory", "lang_adapter": "adapter directory",
               "task_adapter": "adapter directory", "task_adapters": "adapter directory",
               "lang_adapters": "adapter directory"}


def check_local_inputs(settings) -> None:
    """Raise (FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError, DataError) for the first
    local input of ``settings`` that is missing or unusable; reads nothing from the network."""
    langs = _languages(settings)
    for name in DATA_FIELDS:
        spec = getattr(settings, name, None)
        if spec:
            _check_data(spec, langs)
    for name, what in NAME_FIELDS.items():
        for value in _values(getattr(settings, name, None)):
            if isinstance(value, str) and value and not value.startswith(HUB_PREFIX):
                check_local(value, what)
    for name, what in LOCAL_FIELDS.items():
        source = getattr(settings, name, None)
        if isinstance(source, str) and source not in ("", "-") and not os.path.exists(os.path.expanduser(source)):
            raise LocalPathError(missing_message(source, what))
    _check_outputs(settings)


def _check_outputs(settings) -> None:
    for name in ("output_dir", "output"):
        target = getattr(settings, name, None)
        if isinstance(target, str) and target and target != "-":
            check_writable(target, "output")
    if hasattr(settings, "resume") and getattr(settings, "output_dir", None):
        runs.check_output_dir(settings.output_dir, resume=settings.resume, overwrite=settings.overwrite)


def _values(value) -> list:
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _languages(settings) -> list[str]:
    """The languages a ``{lang}`` data spec is read for: the stage's language, or the transfer targets."""
    lang = getattr(settings, "lang", None)
    return [lang] if lang else list(getattr(settings, "targets", None) or [])


def _check_data(spec: str, langs: list[str]) -> None:
    """A data spec's local path exists (and a dataset name is well formed), per language for ``{lang}``; with
    ``{lang}`` and no language known yet, the directories before ``{lang}``."""
    if "{lang}" not in spec:
        data.resolve_spec(spec)
    elif langs:
        for lang in langs:
            data.resolve_spec(spec, lang)
    else:
        head = spec.split("{lang}")[0].rpartition("/")[0]
        if head and not spec.startswith("hf:") and looks_local(head) and not os.path.exists(os.path.expanduser(head)):
            raise LocalPathError(missing_message(head, "data directory"))


__all__ = ["check_local_inputs"]
