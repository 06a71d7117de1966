"""``madx merge``: one adapter whose parameters are the weighted average of several adapters' (a language without
text of its own borrowing from related languages at no inference cost; ``MadxAdapters.average_adapter``).

    madx merge --output runs/lang-qu es=runs/lang-es pt=runs/lang-pt --weights 0.7,0.3 --name qu

The inputs are run directories, bundles, adapter directories (madx_fast's or AdapterHub's format) or Hub names,
checked to share one base model (by the recorded weights fingerprint) and one configuration. They are loaded
into the base model's architecture without its weights (nothing runs: only adapter parameters are read,
averaged and written), averaged (every layer's bottleneck and the NICE invertible adapter), and written to
``--output`` as a bundle: a normal adapter directory in madx_fast's format plus ``madx_run.json`` recording the
inputs, their weights and the base model (a merged language adapter is a language adapter to ``madx transfer``
and ``madx predict``).
"""
from __future__ import annotations

import logging
import os

import torch

from ..model import add_madx
from ..model.adapter_files import ADAPTER_FILES, read_adapter_info
from . import models, runs
from .loading import check_same_base
from .settings import MergeSettings

log = logging.getLogger("madx_fast.training")


def merge_adapters(settings: MergeSettings | None = None, /, **kwargs) -> dict:
    """Average the adapters of ``settings`` (a ``MergeSettings``, or its fields as keywords) into one and write it
    to ``output_dir``; returns ``{"path", "name", "weights", "inputs", "base_model", "stage"}``."""
    s = MergeSettings.build(settings, **kwargs)
    _check_output(s.output_dir, s.overwrite)
    paths = {name: runs.find_bundle(where, prefer=("adapter", "best", "last"), model_name=s.model)
             for name, where in s.adapters.items()}
    metas = {name: runs.read_bundle_meta(path) for name, path in paths.items()}
    check_same_base(paths.values())
    base_model = s.model or _recorded_base(paths, metas)
    stages = {meta.get("stage") for meta in metas.values()}
    stage = stages.pop() if len(stages) == 1 else None
    model, madx = _skeleton(base_model)
    for name, path in paths.items():
        runs.load_bundle(madx, path, load_as=name)
    name = s.name or "+".join(paths)
    madx.average_adapter(name, list(paths), weights=s.weights, normalize_weights=s.normalize_weights)
    coefficients = _coefficients(s)
    fingerprints = {m.get("base_fingerprint") for m in metas.values()} - {None}
    meta = {"stage": stage, "base_model": base_model, "merged_from": [
        {"name": n, "path": paths[n], "weight": w, "weights_sha256": metas[n].get("weights_sha256")}
        for n, w in zip(paths, coefficients)]}
    if stage == "language":
        meta["language"] = name
    if fingerprints:
        meta["base_fingerprint"] = fingerprints.pop()
    runs.write_bundle(madx, os.path.abspath(s.output_dir), name, meta)
    log.info("merged %s into adapter %r in %s", ", ".join(f"{n} x {w:.4g}" for n, w in zip(paths, coefficients)),
             name, s.output_dir)
    return {"path": os.path.abspath(s.output_dir), "name": name, "weights": coefficients, "inputs": paths,
            "base_model": base_model, "stage": stage}


def _coefficients(s: MergeSettings) -> list[float]:
    """The weights ``average_adapter`` applies (AdapterHub's handling: equal, or divided by their sum)."""
    n = len(s.adapters)
    if s.weights is None:
        return [1.0 / n] * n
    total = sum(s.weights) if s.normalize_weights else 1.0
    return [w / total for w in s.weights]


def _check_output(directory: str, overwrite: bool) -> None:
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"--output {directory!r} exists and is not a directory")
    if os.path.isdir(directory) and not overwrite:
        clash = sorted(f for f in ADAPTER_FILES + (runs.RUN_META,) if os.path.exists(os.path.join(directory, f)))
        if clash:
            raise FileExistsError(f"{directory} already holds an adapter ({', '.join(clash)}); pass --overwrite to "
                                  "replace it, or choose another --output")


def _recorded_base(paths: dict, metas: dict) -> str:
    """The base model the inputs record (run records first, then the adapter files); all must agree."""
    named = {}
    for name, path in paths.items():
        base = metas[name].get("base_model") or read_adapter_info(path).base_model
        if base:
            named[name] = base
    if not named:
        raise ValueError("none of the adapters records its base model: pass --model")
    if len(set(named.values())) > 1:
        listing = ", ".join(f"{n}: {b}" for n, b in named.items())
        raise runs.BundleError(f"the adapters record different base models ({listing}); pass --model to choose one "
                               "if they really share it")
    return next(iter(named.values()))


def _skeleton(base_model: str):
    """``(model, madx)``: the base model's architecture (from its config) with MAD-X wired in, its backbone left
    uninitialised (built on the meta device, then given empty CPU memory): enough to load, average and save
    adapters, never to run."""
    from transformers import AutoModel
    config = models.load_config(base_model)
    with models.quiet_transformers(), torch.device("meta"):
        model = AutoModel.from_config(config)
    model.to_empty(device="cpu")
    return model, add_madx(model)


__all__ = ["merge_adapters"]
