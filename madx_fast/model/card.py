"""Model cards: the ``README.md`` that ``save_adapter`` (and every run bundle) writes beside an adapter, in the
Hugging Face Hub's format: YAML front matter (the Hub's model card metadata keys ``library_name``, ``tags``,
``base_model``, ``language``, ``datasets``, ``metrics``, ``pipeline_tag``) and a short text:
what the adapter is, on which base model, its configuration, and, for adapters a ``madx`` run trained, the
training data, steps and metrics of that run (its ``madx_run.json``), and how to load it.

A card that madx_fast did not write (no ``CARD_MARKER``) is never replaced by a later save.
"""
from __future__ import annotations

import json
import os
import re

CARD_FILE = "README.md"
CARD_MARKER = "<!-- written by madx_fast: a later save replaces this card; remove this line to keep your edits -->"
PIPELINE_TAGS = {"TokenClassification": "token-classification", "QuestionAnswering": "question-answering",
                 "MultipleChoice": "multiple-choice", "SequenceClassification": "text-classification",
                 "MaskedLM": "fill-mask"}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]+)?$")


def adapter_card(name: str, config: dict, *, base_model: str = "", model_class: str = "", with_head: bool = False,
                 run: dict | None = None, location: str | None = None, adapterhub: bool = False) -> str:
    """The card of adapter ``name`` (``config``: a MadxConfig dict) trained on ``base_model``, saved from a model of
    ``model_class`` (its head, ``with_head``, saved too); ``adapterhub``: the files are AdapterHub's.
    ``run``: the facts of the run that trained it (``stage``, ``language``, ``task``, ``train_data``,
    ``datasets``: Hub dataset ids, ``steps``, ``step``, ``metrics`` / ``final_eval``, ``labels``), or None.
    ``location``: what ``load_adapter`` is given in the card's example (default: this repository or directory)."""
    run = run or {}
    base = run.get("base_model") or base_model or ""
    kind = _kind(run, config)
    metrics = run.get("metrics") or run.get("final_eval") or {}
    front = _front_matter(base, run, kind, metrics, model_class if with_head else "")
    rows = [("base model", f"`{base}`" if base else "not recorded"), ("adapter", f"`{name}`, a {kind}"),
            ("configuration", _describe_config(config))]
    if run.get("task"):
        rows.append(("task", run["task"] + (f" ({len(run['labels'])} labels)" if run.get("labels") else "")))
    if run.get("language"):
        rows.append(("language", run["language"]))
    if run.get("train_data"):
        rows.append(("training data", f"`{run['train_data']}`"))
    if run.get("steps"):
        checkpoint = run.get("step") and run["step"] != run["steps"]
        rows.append(("training steps", f"{run['steps']:,}" + (f" (this is step {run['step']})" if checkpoint else "")))
    if metrics:
        rows.append(("metrics", ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in metrics.items() if not k.endswith("_time_s"))))
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    cls = model_class if with_head and model_class else "AutoModel"
    usage = (f"from transformers import {cls}\nfrom madx_fast.model import add_madx\n\n"
             f"model = {cls}.from_pretrained({repr(base) if base else '<base model>'})\nmadx = add_madx(model)\n"
             f"name = madx.load_adapter({location or '<this repository or directory>'!r}"
             f"{', with_head=True' if with_head else ''})\nmadx.set_active(name)")
    files = ("AdapterHub's format (`adapter_config.json` + weights; `adapters`' `load_adapter` reads it too)"
             if adapterhub else "madx_fast's format (`madx_adapter.json` + `madx_adapter.safetensors`"
             + (", the task head in `madx_head.safetensors`)" if with_head else ")"))
    return (f"---\n{front}\n---\n{CARD_MARKER}\n\n# {name}: a MAD-X {kind}\n\n"
            f"A MAD-X adapter (Pfeiffer et al., 2020, https://arxiv.org/abs/2005.00052) for "
            f"`{base or 'its base model'}`, in {files}.\n\n{table}\n\n"
            f"## Use\n\n```python\n{usage}\n```\n\n<details><summary>adapter configuration</summary>\n\n```json\n"
            f"{json.dumps(config, indent=1, sort_keys=True)}\n```\n</details>\n")


def _kind(run: dict, config: dict) -> str:
    stage = run.get("stage")
    if stage == "language" or (stage is None and config.get("inv_adapter")):
        return "language adapter" + (" with an invertible (NICE) adapter" if config.get("inv_adapter") else "")
    if stage == "task":
        return f"{run.get('task') or 'task'} task adapter"
    return "adapter"


def _front_matter(base: str, run: dict, kind: str, metrics: dict, head_class: str) -> str:
    """YAML front matter; ``base_model`` only when it is a Hub id (not a local path), ``language`` only as an ISO
    code, ``pipeline_tag`` from the head's class."""
    import yaml
    tags = ["madx_fast", "adapters", "mad-x"]
    tags += ["language-adapter"] if kind.startswith("language") else ["task-adapter"] if "task" in kind else []
    if run.get("task"):
        tags.append(run["task"])
    pipeline = next((tag for suffix, tag in PIPELINE_TAGS.items() if head_class.endswith(suffix)), None)
    languages = [lang for lang in [run.get("language") or run.get("source_language")] if lang and
                 _LANGUAGE.match(lang)]
    data = {"library_name": "madx_fast", "tags": tags,
            "base_model": base if base and _HUB_ID.match(base) and not os.path.exists(base) else None,
            "language": languages, "datasets": list(run.get("datasets") or []),
            "metrics": [k for k, v in metrics.items() if isinstance(v, float) and not k.endswith("_time_s")],
            "pipeline_tag": pipeline}
    return yaml.safe_dump({k: v for k, v in data.items() if v}, sort_keys=False, allow_unicode=True).rstrip("\n")


def _describe_config(config: dict) -> str:
    parts = [f"reduction factor {config.get('reduction_factor')}", f"non-linearity {config.get('non_linearity')}"]
    if config.get("inv_adapter"):
        parts.append(f"invertible adapter {config['inv_adapter']} (reduction factor "
                     f"{config.get('inv_adapter_reduction_factor')})")
    if config.get("leave_out"):
        parts.append(f"no adapter in layers {config['leave_out']}")
    return ", ".join(parts)


def keeps_own_card(directory: str) -> bool:
    """``directory`` holds a README.md that madx_fast did not write (a later save leaves it)."""
    path = os.path.join(directory, CARD_FILE)
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        return CARD_MARKER not in f.read()


__all__ = ["CARD_FILE", "CARD_MARKER", "adapter_card", "keeps_own_card"]
