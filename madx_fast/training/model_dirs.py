"""Full-model directories: what the full-model stages write (``madx train-lang --full-model``,
``madx train-task --full-finetune``) and what ``madx transfer --full-model`` and ``--model`` read.

A *model directory* is what Hugging Face's ``save_pretrained`` writes (``config.json``, ``model.safetensors``
or its shards) with the tokenizer, plus ``madx_run.json``: the run's facts under the names ``run.json``
uses (``stage`` "full-mlm" or "full-task", ``language`` / ``source_language``, ``task``, ``labels``,
``base_model`` and ``base_fingerprint`` of the pretrained model at the root of the chain, ``init_model``,
``seed``, ...) and ``weights_sha256``, the hash of the weights files, checked whenever the directory is
loaded. Like adapter bundles, it is built aside and swapped into place whole.

    path, meta = find_model_dir("runs/mlm-sw")     # a run directory's model/, best/ or last/, or the directory
    root = root_of(path, meta, fingerprint)        # {"base_model", "base_fingerprint"} at the chain's root
"""
from __future__ import annotations

import hashlib
import os

from .. import files
from .._version import __version__
from .runs import RUN_META, BundleError

MODEL_SUBDIRS = ("model", "best", "last")  # where a run directory keeps its model directories
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# what save_pretrained and tokenizers write: never carried over from an earlier save
_OWNED_SUFFIXES = WEIGHT_SUFFIXES + (".json", ".model", ".txt")


def is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def weights_hash(path: str) -> str:
    """The first 16 hex digits of a sha256 over the model directory's weight files (name and content), in name
    order (one file or the shards of a large model)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.endswith(WEIGHT_SUFFIXES):
            h.update(name.encode())
            h.update(files.sha256_file(os.path.join(path, name)).encode())
    return h.hexdigest()[:16]


def write_model_dir(model, tokenizer, directory: str, meta: dict) -> None:
    """``model`` (float32 safetensors) and ``tokenizer`` with ``meta`` as one model directory, swapped in whole."""
    def build(tmp):
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files.dump_json(dict(meta, weights_sha256=weights_hash(tmp), madx_fast_version=__version__),
                        os.path.join(tmp, RUN_META))

    owned = [n for n in os.listdir(directory) if n.endswith(_OWNED_SUFFIXES)] if os.path.isdir(directory) else []
    files.replace_directory(directory, build, owned=owned)


def read_model_meta(path: str) -> dict:
    """``madx_run.json`` of a model directory, or ``{}`` (a model saved elsewhere, e.g. a Hub checkpoint)."""
    meta_path = os.path.join(path, RUN_META)
    return files.read_json(meta_path, error=BundleError) if os.path.isfile(meta_path) else {}


def check_model_weights(path: str, meta: dict) -> None:
    """The weights of a model directory are the ones its run recorded (a replaced or damaged file is refused)."""
    want = meta.get("weights_sha256")
    if want and weights_hash(path) != want:
        raise BundleError(f"{path}: the model weights differ from the ones its run recorded (weights_sha256 {want} "
                          f"in {RUN_META}): a file was replaced or damaged")


def find_model_dir(spec: str, prefer=MODEL_SUBDIRS) -> tuple[str, dict]:
    """``(path, madx_run.json or {})`` of a model: a model directory, a run directory of a full-model stage (its
    ``model/``, ``best/`` or ``last/``, in ``prefer`` order), or a name that is not a local path (a Hub model
    id, returned as it is with ``{}``). Weights are checked against the recorded hash."""
    local = os.path.abspath(os.path.expanduser(spec))
    if not os.path.exists(local):
        if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            raise FileNotFoundError(f"model directory {spec!r} does not exist")
        return spec, {}  # a Hub model id ("xlm-roberta-base", "org/name")
    for candidate in [local] + [os.path.join(local, sub) for sub in prefer]:
        files.recover_directory(candidate)
        if is_model_dir(candidate):
            meta = read_model_meta(candidate)
            check_model_weights(candidate, meta)
            return candidate, meta
    raise BundleError(f"{spec}: no model found (neither a model directory with config.json nor a run directory "
                      f"with {'/'.join(prefer)}/)")


def is_full_model_run(path: str) -> bool:
    """Whether a local path is a full-model run or model directory (not an adapter bundle)."""
    local = os.path.abspath(os.path.expanduser(path))
    return any(is_model_dir(c) and read_model_meta(c).get("stage", "").startswith("full")
               for c in [local] + [os.path.join(local, sub) for sub in MODEL_SUBDIRS])


def start_model(spec: str, prefer=MODEL_SUBDIRS) -> dict:
    """What a full-model stage starts from: ``{"path", "spec", "meta"}``; ``path`` is what loads."""
    path, meta = find_model_dir(spec, prefer)
    return {"path": path, "spec": spec, "meta": meta}


def root_and_init(start: dict, fingerprint: str) -> tuple[dict, dict | None]:
    """``(root, init_model)`` of a run starting from ``start`` (``start_model``) whose weights have
    ``fingerprint``: ``root`` = ``{"base_model", "base_fingerprint"}`` of the pretrained model at the root of the
    chain (what every system of one comparison shares); ``init_model`` = ``{"path", "spec", "fingerprint",
    "language", "weights_sha256"}`` when the run starts from a model a full-model stage trained (MLM-SRC /
    MLM-TRG), else None."""
    meta = start["meta"]
    if not meta.get("stage", "").startswith("full"):
        return {"base_model": start["spec"], "base_fingerprint": fingerprint}, None
    root = {"base_model": meta.get("base_model"), "base_fingerprint": meta.get("base_fingerprint")}
    init = {"path": start["path"], "spec": start["spec"], "fingerprint": fingerprint,
            "language": meta.get("language") if meta.get("stage") == "full-mlm" else
            (meta.get("init_model") or {}).get("language"), "weights_sha256": meta.get("weights_sha256")}
    return root, init


__all__ = ["MODEL_SUBDIRS", "check_model_weights", "find_model_dir", "is_full_model_run", "is_model_dir",
           "read_model_meta", "root_and_init", "start_model", "write_model_dir"]
