"""What a training run writes, how it is read back, and the checks that keep saved work safe.

A run directory (``madx train-lang`` / ``madx train-task``)::

    run.json             summary: settings, base model, parameter counts, wall time, peak memory, metrics
    log.jsonl            one JSON object per logged step / evaluation (rebuilt from the checkpoint on resume)
    checkpoint.pt        everything needed to continue the run (written atomically every N steps)
    adapter/             language runs: the trained language (+ invertible) adapter     -- a bundle
    best/, last/         task runs: best on validation / after the last step            -- bundles
    model/               full-model MLM runs (best/, last/ of full fine-tuning): model directories (model_dirs.py)
    tensorboard/, wandb/ with --report-to: the trackers' files (madx_fast.training.reporting)

A *bundle* is an adapter directory in madx_fast's format (``madx_adapter.json`` + ``.safetensors``, and for
task adapters the head, ``madx_head.safetensors``: what ``madx.save_adapter(..., with_head=True)`` writes)
plus ``madx_run.json``: the run's facts under the names run.json uses (``stage``, ``language``, ``task``,
``base_model``, ``base_fingerprint``, ...) and the sha256 of the weights, checked when the bundle is loaded.
Bundles are built aside and swapped into place whole (``madx_fast.files``). Bundles of madx_fast 0.1 (their
``kind`` key, ``task_head.safetensors``) are still read.
"""
from __future__ import annotations

import os
import shutil

from .. import files
from .._version import __version__
from ..model.adapter_files import (ADAPTER_FILES, HUB_CONFIG, OWN_CONFIG, OWN_WEIGHTS, read_adapter_info,
                                   write_adapter_files)
from ..model.hub import resolve_adapter

RUN_META = "madx_run.json"
RUN_SUMMARY = "run.json"
LOG_FILE = "log.jsonl"
CHECKPOINT = "checkpoint.pt"
RUN_OUTPUTS = (RUN_SUMMARY, LOG_FILE, CHECKPOINT, "adapter", "best", "last", "adapterhub", "model", "tensorboard",
               "wandb")
BUNDLES = ("adapter", "best", "last")


class BundleError(ValueError):
    """An adapter bundle that is missing, malformed, or made for another model / task."""


# --------------------------------------------------------------------------------------------------------
# output directories
# --------------------------------------------------------------------------------------------------------
def check_output_dir(directory: str, *, resume: bool, overwrite: bool, inputs=()) -> None:
    """Refuse to start a run whose outputs would replace an earlier run's, unless told to, and never let
    ``--overwrite`` remove one of the run's own ``inputs`` (checked before any work)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f"output {directory!r} exists and is not a directory")
    out = os.path.realpath(directory)
    for path in inputs:
        if not path:
            continue
        real = os.path.realpath(os.path.expanduser(path))
        for name in RUN_OUTPUTS:
            target = os.path.join(out, name)
            if real == out or real == target or real.startswith(target + os.sep):
                raise ValueError(f"{path} is an input of this run and also an output in {directory} ({name}): "
                                 "the run would overwrite it; choose another --output")
    if not os.path.isdir(directory):
        return
    existing = [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(directory, name))]
    if existing == [LOG_FILE]:
        existing = []  # only the log of a run that failed before its first checkpoint: nothing to lose
    if existing and not (resume or overwrite):
        raise FileExistsError(
            f"output directory {directory!r} already holds a run ({', '.join(existing)}); pass --resume to "
            "continue it, --overwrite to replace it, or choose another --output")


def prepare_output(directory: str, *, resume: bool, overwrite: bool) -> None:
    """After every input has been checked (on process 0 only): with ``overwrite``, remove the earlier run's
    outputs; clean what killed runs left behind."""
    if overwrite and not resume and os.path.isdir(directory):
        clear_run_outputs(directory)
    os.makedirs(directory, exist_ok=True)
    # what killed runs left: temporaries (never the real outputs, which only ever appear by atomic renames),
    # those of madx_fast 0.1 too (no process id in their names), and bundle swaps cut halfway
    files.remove_stale_temporaries(directory, pidless=RUN_OUTPUTS)
    for sub in BUNDLES:
        files.recover_directory(os.path.join(directory, sub))


def clear_run_outputs(directory: str) -> None:
    """Remove an earlier run's outputs (``--overwrite``, after every input was checked); other files stay."""
    for name in RUN_OUTPUTS:
        path = os.path.join(directory, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def weights_hash(path: str) -> str:
    """A bundle's ``weights_sha256``: the first 16 hex digits of the weights file's sha256."""
    return files.sha256_file(path)[:16]


# --------------------------------------------------------------------------------------------------------
# bundles
# --------------------------------------------------------------------------------------------------------
def write_bundle(madx, directory: str, name: str, meta: dict, *, with_head: bool = False) -> None:
    """Adapter ``name`` of ``madx`` (with its task head) + ``meta`` as one bundle, swapped in whole."""
    def build(tmp):
        write_adapter_files(madx, tmp, name, with_head=with_head, run=card_facts(meta))
        full = dict(meta, adapter=name, weights_sha256=weights_hash(os.path.join(tmp, OWN_WEIGHTS)),
                    madx_fast_version=__version__)
        files.dump_json(full, os.path.join(tmp, RUN_META))

    files.replace_directory(directory, build, owned=ADAPTER_FILES + (RUN_META,))


def card_facts(meta: dict) -> dict:
    """A run's facts for its model card: ``meta`` and the Hub datasets its training data came from."""
    from .data import resolve_spec
    try:
        source = resolve_spec(meta.get("train_data") or "", meta.get("language") or meta.get("source_language"))
    except (OSError, ValueError):  # a spec that no longer resolves (moved files): no datasets entry
        source = None
    return dict(meta, datasets=[source.name] if source is not None and source.kind == "hf" else [])


def find_bundle(path: str, *, prefer=BUNDLES, model_name: str | None = None) -> str:
    """A bundle directory from a bundle path or a run directory (its ``adapter/``, ``best/`` or ``last/``),
    local or on the Hugging Face Hub (``org/name[@revision][/folder]``, or an AdapterHub short name for the
    base model ``model_name``: ``madx_fast.model.hub``)."""
    local = os.path.abspath(os.path.expanduser(path))
    for candidate in [local] + [os.path.join(local, p) for p in prefer]:
        files.recover_directory(candidate)  # a local bundle whose swap was cut: put back before looking
    path = os.path.abspath(resolve_adapter(path, model_name=model_name, files=ADAPTER_FILES + (RUN_META,),
                                           subdirs=BUNDLES).path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"adapter directory {path!r} does not exist")
    if not os.path.isdir(path):
        raise BundleError(f"{path} is a file; give an adapter directory or a run directory")
    if is_adapter_dir(path):
        return path
    for sub in list(prefer) + [s for s in BUNDLES if s not in prefer]:
        if is_adapter_dir(os.path.join(path, sub)):
            return os.path.join(path, sub)
    raise BundleError(f"{path}: no adapter found (neither {OWN_CONFIG} / {HUB_CONFIG} nor a run directory with "
                      f"{'/'.join(prefer)}/)")


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, OWN_CONFIG)) or os.path.isfile(os.path.join(path, HUB_CONFIG))


def read_bundle_meta(path: str) -> dict:
    """``madx_run.json`` of a bundle (0.1's ``kind`` read as ``stage``), or ``{}`` for a plain adapter
    directory (saved from Python, or from AdapterHub)."""
    meta_path = os.path.join(path, RUN_META)
    if not os.path.isfile(meta_path):
        return {}
    meta = files.read_json(meta_path, error=BundleError)
    if "stage" not in meta and "kind" in meta:
        meta["stage"] = meta.pop("kind")
    return meta


def check_weights(path: str, meta: dict) -> None:
    """The weights of a bundle are the ones its run recorded (a replaced or damaged file is refused)."""
    want = meta.get("weights_sha256")
    weights = os.path.join(path, OWN_WEIGHTS)
    if want and os.path.isfile(weights) and weights_hash(weights) != want:
        raise BundleError(f"{weights}: the weights differ from the ones this bundle's run recorded "
                          f"(sha256 {want} in {RUN_META}): the file was replaced or damaged")


def check_base(meta: dict, fingerprint: str, model_name: str, where: str) -> None:
    want = meta.get("base_fingerprint")
    if want and want != fingerprint:
        raise BundleError(
            f"{where}: this adapter was trained on base model {meta.get('base_model')!r} (weights fingerprint "
            f"{want}), but the model here, {model_name!r}, has fingerprint {fingerprint}: the backbone weights "
            "differ, so the adapter does not fit it. Use the base model the adapter was trained with.")


def load_bundle(madx, path: str, *, load_as: str | None = None, fingerprint: str | None = None,
                model_name: str = "", overwrite: bool = False, with_head: bool = False) -> tuple[str, dict]:
    """Load the adapter of a bundle (or a plain adapter directory) into ``madx``: the recorded weights hash
    and the base model's fingerprint are checked first, so a refused bundle changes nothing.
    Returns ``(name in the model, bundle meta)``."""
    meta = read_bundle_meta(path)
    check_weights(path, meta)
    info = read_adapter_info(path)
    same_architecture = info.hidden_size in (None, madx.parts.hidden_size) and \
        info.model_type in (None, madx.parts.model_type)
    if fingerprint is not None and same_architecture:  # (another architecture gets the file checks' message)
        check_base(meta, fingerprint, model_name, path)
    return madx.load_adapter(path, load_as=load_as, overwrite=overwrite, with_head=with_head), meta
