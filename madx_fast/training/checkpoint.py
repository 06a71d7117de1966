"""Training checkpoints: everything a run needs to continue exactly, stored as tensors and plain data.

``checkpoint.pt`` holds the trainable weights, the optimizer and schedule state, the data stream position,
the masking generator, every process's torch / CUDA / Python / NumPy RNG state (as tensors and numbers), the
step history and the best score, and the run's *identity* (the settings that must not change on resume).
It is written atomically (``madx_fast.files``) and read with ``torch.load(weights_only=True)``: a file
copied from elsewhere cannot run code when a run is resumed. A checkpoint is checked whole (format,
identity, parameter names, shapes, dtypes, finite values) before anything in memory changes.
"""
from __future__ import annotations

import hashlib
import logging
import random

import numpy as np
import torch

from .. import files

FORMAT = "madx_fast.checkpoint"
VERSION = 2  # 2: RNG states as tensors (weights-only); 1 held pickled NumPy arrays (still read)

# Keys of the identity whose names changed when the run records got one vocabulary (version 1 -> now).
_OLD_IDENTITY_KEYS = {"lang": "language", "model": "base_model", "adapter": "adapter_config",
                      "blocks": "train_blocks", "features": "train_features",
                      "language_weights": "language_weights_sha256"}


# Entries of the identity that describe the data (stages/base.py computes the digests): what
# ``--allow-data-change`` lets differ on resume, and how a refusal names them.
DATA_IDENTITY = {"train_data_sha256": "training data", "eval_data_sha256": "evaluation data",
                 "train_blocks": "training blocks", "data_tokens": "training tokens",
                 "train_features": "training features"}
_DIGESTS = ("train_data_sha256", "eval_data_sha256")

log = logging.getLogger("madx_fast.training")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run; the message names the file and the problem."""


def rng_state() -> dict:
    """This process's RNG states, as tensors and plain numbers."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, mt, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
        np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["cached_gaussian"]))
    else:  # version 1
        random.setstate(py)
        np.random.set_state(npy)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(path: str, ckpt: dict) -> None:
    ckpt = dict(ckpt, format=FORMAT, version=VERSION)
    ckpt["digest"] = _digest(ckpt)

    def save(tmp):
        with open(tmp, "wb") as f:  # through a Python file: a failed write raises its OSError (files.WriteError)
            torch.save(ckpt, f)
    files.write_file(path, save)


def _digest(ckpt: dict) -> str:
    """sha256 over every value of the checkpoint (tensors by dtype, shape and bytes), so that a changed or
    damaged file is recognised even where it still unpickles."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=repr):
                feed(k)
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[" if isinstance(x, list) else b"(")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    feed({k: v for k, v in ckpt.items() if k != "digest"})
    return h.hexdigest()


def read_checkpoint(path: str) -> dict:
    """The checkpoint at ``path``, loaded without running any code from the file."""
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):  # version 1 stored NumPy RNG arrays
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file, or one that asks for code, is reported as such
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {first[:300]}); it is "
                              "damaged or not a madx_fast checkpoint (it is never unpickled beyond plain data "
                              "and tensors)") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a madx_fast training checkpoint")
    if "digest" in ckpt and ckpt["digest"] != _digest(ckpt):
        raise CheckpointError(f"{path}: the checkpoint was changed or damaged after it was written (its content "
                              "does not match its digest)")
    for key in ("identity", "step", "history", "trainable", "optimizer", "scheduler", "stream", "mask_generator",
                "rng"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: the checkpoint has no {key!r} entry")
    if ckpt.get("version", 1) == 1:  # its identity had fewer entries: compare those it has
        ckpt["identity"] = {_OLD_IDENTITY_KEYS.get(k, k): v for k, v in ckpt["identity"].items()}
        ckpt["identity_keys_only"] = True
    return ckpt


def check_checkpoint(path: str, ckpt: dict, identity: dict, params: list, *,
                     allow_data_change: bool = False) -> dict:
    """Raise CheckpointError unless ``ckpt`` belongs to a run of this ``identity`` and holds a finite tensor of
    the right shape and dtype for each trainable parameter ``(name, param)``. Differences in the data
    (``DATA_IDENTITY``) are refused as well unless ``allow_data_change``; returns the ones accepted,
    ``{key: (checkpoint's, now)}``. A checkpoint without data digests (madx_fast before they were recorded)
    has its data compared by size only."""
    have = ckpt["identity"]
    if ckpt.get("identity_keys_only"):
        identity = {k: v for k, v in identity.items() if k in have}
    unrecorded = [k for k in _DIGESTS if k in identity and k not in have]
    if unrecorded:
        log.warning("%s records no data digest (written by an earlier madx_fast): the data are compared by size "
                    "only", path)
    diff = {k: (have.get(k), v) for k, v in identity.items() if have.get(k) != v and k not in unrecorded}
    diff.update({k: (v, None) for k, v in have.items() if k not in identity})
    data = {k: diff.pop(k) for k in list(diff) if k in DATA_IDENTITY}
    if diff or (data and not allow_data_change):
        raise CheckpointError(_identity_refusal(path, diff, data))
    _check_trainable(path, ckpt, params)
    return data


def _identity_refusal(path: str, diff: dict, data: dict) -> str:
    """One line: which settings and which data differ from the checkpoint's, and what to do."""
    def short(v):
        return v[:12] if isinstance(v, str) and len(v) == 64 else v
    parts = []
    if diff:
        listing = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        parts.append(f"belongs to a run with other settings ({listing})")
    if data:
        listing = "; ".join(f"{DATA_IDENTITY[k]} ({k}): checkpoint {short(a)!r}, now {short(b)!r}"
                            for k, (a, b) in sorted(data.items()))
        parts.append(f"was written for other data (content, order or encoding: {listing})")
    fix = "resume with the original settings and data"
    if data and not diff:
        fix += ", pass --allow-data-change to continue on these data"
    return f"{path} {' and '.join(parts)}; {fix}, or start over with --overwrite"


def _check_trainable(path: str, ckpt: dict, params: list) -> None:
    saved = ckpt["trainable"]
    names = {n for n, _ in params}
    if not isinstance(saved, dict) or set(saved) != names:
        missing = sorted(names - set(saved)) if isinstance(saved, dict) else sorted(names)
        extra = sorted(set(saved) - names) if isinstance(saved, dict) else []
        raise CheckpointError(f"{path}: trainable parameters differ from this run's (missing {missing[:4]}, "
                              f"unexpected {extra[:4]})")
    for n, p in params:
        t = saved[n]
        if not isinstance(t, torch.Tensor) or t.shape != p.shape or t.dtype != p.dtype:
            what = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(f"{path}: {n} is {what}, this run's parameter is {tuple(p.shape)} {p.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: {n} holds NaN or Inf values")
    if not isinstance(ckpt["rng"], list) or not ckpt["rng"]:
        raise CheckpointError(f"{path}: no RNG states")


_NUMPY_ARRAY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
try:  # the reconstructor NumPy arrays pickle through (moved in NumPy 2)
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - NumPy 1
    from numpy.core.multiarray import _reconstruct as _np_reconstruct
_NUMPY_ARRAY_GLOBALS.append(_np_reconstruct)
