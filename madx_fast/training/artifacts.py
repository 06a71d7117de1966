"""What a training run writes, how it is read back, and the checks that keep saved work safe.

A run directory (``madx train-lang`` / ``madx train-task``)::

    run.json             summary: settings, base model, parameter counts, wall time, peak memory, metrics
    log.jsonl            one JSON object per logged step / evaluation (rebuilt from the checkpoint on resume)
    checkpoint.pt        everything needed to continue the run (written atomically every N steps)
    adapter/             language runs: the trained language (+ invertible) adapter     -- a bundle
    best/, last/         task runs: best on validation / after the last step            -- bundles

A *bundle* is an adapter directory in madx_fast's format (``madx_adapter.json`` + ``.safetensors``, loadable
with ``madx.load_adapter``) plus ``madx_run.json`` (which base model, language, task, labels) and, for task
adapters, ``task_head.safetensors`` (the trained head, by model parameter name). Bundles are built in a
temporary sibling directory and swapped into place, so a reader sees the old bundle or the new one, never
a mix; a crash between the two renames leaves ``<dir>.old``, which readers and writers restore.

The *base fingerprint* hashes a fixed sample of every backbone weight: an adapter trained on one base model
(say xlm-roberta-base) is refused on another of the same shape (a different checkpoint), before any work.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import torch

RUN_META = "madx_run.json"
HEAD_WEIGHTS = "task_head.safetensors"
RUN_SUMMARY = "run.json"
LOG_FILE = "log.jsonl"
CHECKPOINT = "checkpoint.pt"
RUN_OUTPUTS = (RUN_SUMMARY, LOG_FILE, CHECKPOINT, "adapter", "best", "last", "adapterhub")


class BundleError(ValueError):
    """An adapter bundle that is missing, malformed, or made for another model / task."""


# --------------------------------------------------------------------------------------------------------
# atomic files
# --------------------------------------------------------------------------------------------------------
def atomic_write_bytes(path: str, write) -> None:
    """``write(tmp_path)`` then ``os.replace`` onto ``path`` (same directory, fsynced): all or nothing."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")
    atomic_write_bytes(path, write)


def _json_default(obj):
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON")


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None


def restore_interrupted_swap(directory: str) -> None:
    """If a bundle swap was cut between its two renames, put the previous bundle back."""
    old = os.path.abspath(directory) + ".old"
    if os.path.isdir(old):
        if not os.path.exists(directory):
            os.replace(old, directory)
        else:
            shutil.rmtree(old, ignore_errors=True)


def swap_directory(build, directory: str) -> None:
    """``build(tmp_dir)`` fills a new temporary sibling of ``directory``, which then replaces it."""
    directory = os.path.abspath(directory)
    parent, base = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    restore_interrupted_swap(directory)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{base}.", suffix=".tmp")
    try:
        build(tmp)
        os.chmod(tmp, 0o755)
        old = directory + ".old"
        if os.path.exists(directory):
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------------------
# output directories
# --------------------------------------------------------------------------------------------------------
def check_output_dir(directory: str, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a run whose outputs would replace an earlier run's, unless told to (before any work)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f"output {directory!r} exists and is not a directory")
    if not os.path.isdir(directory):
        return
    existing = [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(directory, name))]
    if existing and not (resume or overwrite):
        raise FileExistsError(
            f"output directory {directory!r} already holds a run ({', '.join(existing)}); pass --resume to "
            "continue it, --overwrite to replace it, or choose another --output")


def remove_stale_temporaries(directory: str) -> None:
    """Temporary files / directories a killed run left behind (``.checkpoint.pt.XXXX.tmp``, ``.best.XXXX.tmp``;
    never the real outputs, which only ever appear by ``os.replace``); restore an interrupted bundle swap."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith(".") and name.endswith(".tmp") and any(name.startswith(f".{out}.") for out in RUN_OUTPUTS):
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    for sub in ("adapter", "best", "last"):
        restore_interrupted_swap(os.path.join(directory, sub))


def clear_run_outputs(directory: str) -> None:
    """Remove an earlier run's outputs (``--overwrite``, after every input was checked); other files stay."""
    for name in RUN_OUTPUTS:
        path = os.path.join(directory, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


# --------------------------------------------------------------------------------------------------------
# base-model fingerprint
# --------------------------------------------------------------------------------------------------------
@torch.no_grad()
def base_fingerprint(model) -> str:
    """sha256 over name, shape and a strided sample (<= 4096 values, as float32) of every backbone parameter
    (embeddings and encoder; adapters and the pooler excluded). Compute it before casting the backbone."""
    from ..model.wiring import find_parts

    base = find_parts(model).base
    h = hashlib.sha256()
    for name, p in sorted(base.named_parameters()):
        if "adapters." in name or name.startswith("pooler."):
            continue
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].to("cpu", torch.float32)
        h.update(name.encode())
        h.update(repr(tuple(p.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------
# bundles
# --------------------------------------------------------------------------------------------------------
def head_state(model, madx) -> dict[str, torch.Tensor]:
    """The trainable parameters outside the adapters (the task head), by model parameter name."""
    adapter_ids = {id(p) for n in madx.configs for p in madx.adapter_parameters(n)}
    return {n: p.detach().to("cpu", torch.float32).contiguous().clone() for n, p in model.named_parameters()
            if p.requires_grad and id(p) not in adapter_ids}


def write_bundle(madx, directory: str, name: str, meta: dict, head: dict | None = None) -> None:
    """Adapter ``name`` of ``madx`` + ``meta`` (+ head weights) as one bundle, swapped in atomically."""
    from safetensors.torch import save_file

    def build(tmp):
        madx.save_adapter(tmp, name, overwrite=True)
        if head is not None:
            save_file(head, os.path.join(tmp, HEAD_WEIGHTS), metadata={"format": "pt"})
        weights = os.path.join(tmp, "madx_adapter.safetensors")
        full = dict(meta, adapter=name, weights_sha256=file_sha256(weights), has_head=head is not None)
        with open(os.path.join(tmp, RUN_META), "w", encoding="utf-8") as f:
            json.dump(full, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")

    swap_directory(build, directory)


def find_bundle(path: str, *, prefer=("adapter", "best", "last")) -> str:
    """A bundle directory from a bundle path or a run directory (its ``adapter/``, ``best/`` or ``last/``)."""
    path = os.path.abspath(os.path.expanduser(path))
    for candidate in [path] + [os.path.join(path, p) for p in prefer]:
        restore_interrupted_swap(candidate)
    if not os.path.exists(path):
        raise FileNotFoundError(f"adapter directory {path!r} does not exist")
    if not os.path.isdir(path):
        raise BundleError(f"{path} is a file; give an adapter directory or a run directory")
    if _is_adapter_dir(path):
        return path
    for sub in list(prefer) + [s for s in ("adapter", "best", "last") if s not in prefer]:
        if _is_adapter_dir(os.path.join(path, sub)):
            return os.path.join(path, sub)
    raise BundleError(f"{path}: no adapter found (neither madx_adapter.json / adapter_config.json nor a run "
                      f"directory with {'/'.join(prefer)}/)")


def _is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "madx_adapter.json")) or os.path.isfile(
        os.path.join(path, "adapter_config.json"))


def read_bundle_meta(path: str) -> dict:
    """``madx_run.json`` of a bundle, or ``{}`` for a plain adapter directory (e.g. from AdapterHub)."""
    meta_path = os.path.join(path, RUN_META)
    if not os.path.isfile(meta_path):
        return {}
    meta = read_json(meta_path)
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path}: expected a JSON object")
    return meta


def check_base(meta: dict, fingerprint: str, model_name: str, where: str) -> None:
    want = meta.get("base_fingerprint")
    if want and want != fingerprint:
        raise BundleError(
            f"{where}: this adapter was trained on base model {meta.get('base_model')!r} (weights fingerprint "
            f"{want}), but the model here, {model_name!r}, has fingerprint {fingerprint}: the backbone weights "
            "differ, so the adapter does not fit it. Use the base model the adapter was trained with.")


def load_bundle(madx, path: str, *, load_as: str | None = None, fingerprint: str | None = None,
                model_name: str = "", overwrite: bool = False) -> tuple[str, dict]:
    """Load the adapter of a bundle (or a plain adapter directory) into ``madx`` and check the base model's
    fingerprint against the one it was trained on. Returns ``(name in the model, bundle meta)``."""
    meta = read_bundle_meta(path)
    # shapes first (another architecture gets the file checks' message), then the weights' identity
    name = madx.load_adapter(path, load_as=load_as, overwrite=overwrite)
    if fingerprint is not None:
        try:
            check_base(meta, fingerprint, model_name, path)
        except BundleError:
            madx.delete_adapter(name)
            raise
    return name, meta


def load_head(model, path: str) -> None:
    """Copy ``task_head.safetensors`` into ``model``; names and shapes must match exactly."""
    from safetensors.torch import load_file

    file = os.path.join(path, HEAD_WEIGHTS)
    if not os.path.isfile(file):
        raise BundleError(f"{path}: no {HEAD_WEIGHTS} (not a task-adapter bundle)")
    head = load_file(file)
    params = dict(model.named_parameters())
    missing = sorted(k for k in head if k not in params)
    wrong = sorted(f"{k} {tuple(v.shape)} vs {tuple(params[k].shape)}" for k, v in head.items()
                   if k in params and params[k].shape != v.shape)
    if missing or wrong:
        raise BundleError(f"{file}: the head does not fit {type(model).__name__}: "
                          + "; ".join(([f"unknown parameters {missing[:5]}"] if missing else [])
                                      + ([f"shapes differ: {wrong[:5]}"] if wrong else [])))
    with torch.no_grad():
        for k, v in head.items():
            params[k].copy_(v)
