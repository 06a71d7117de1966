"""A model with MAD-X adapters, saved and loaded back like any Hugging Face model.

    model.save_pretrained("out/ner-model")                   # after add_madx, as usual (also Trainer checkpoints,
                                                             # push_to_hub)
    model = madx_fast.model.from_pretrained("out/ner-model")  # the same model: its HF class, add_madx, every
                                                             # adapter, the active setup
    madx = madx_fast.model.load_madx(model, "out/ner-model") # the same for a model you loaded yourself

``save_pretrained`` on a model wired with ``add_madx`` writes what HF writes: ``model.safetensors`` holds the
adapters' weights with the rest of the model, under AdapterHub's parameter names
(``roberta.encoder.layer.{i}.output.adapters.{name}.*``, ``roberta.invertible_adapters.{name}.*``), so that
Hugging Face's ``Trainer`` resumes and reloads its checkpoints with the adapters in them. Besides,
``config.json`` records the adapters under ``"madx"`` (``pretrained_record.py``, the hook ``add_madx`` puts on
``save_pretrained``): ``{"format": "madx_fast.pretrained", "format_version":
1, "adapters": {name: MadxConfig}, "active": the active setup, "madx_fast_version"}``. A plain
``AutoModel...from_pretrained`` of that directory loads the base model and the head, and names the adapter
weights it did not use; ``from_pretrained`` / ``load_madx`` here put them back.
"""
from __future__ import annotations

import logging
import os

from .. import files
from .adapter_files import AdapterFileError, adapter_of_key, from_adapterhub_keys
from .config import MadxConfig
from .controller import add_madx
from .pretrained_record import CONFIG_KEY, FORMAT, FORMAT_VERSION
from .stack import PerRow
from .wiring import find_parts

log = logging.getLogger("madx_fast")

# --------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------
def from_pretrained(name_or_path, model_class=None, *, backend: str | None = None, **kwargs):
    """The model ``save_pretrained`` wrote (a directory or Hub repository) with its MAD-X adapters and active
    setup: ``model_class`` (an HF class or its name; default the one config.json names), loaded with HF's
    ``from_pretrained(name_or_path, **kwargs)``, then ``load_madx``. Returns the model (``model.madx``)."""
    import transformers
    from transformers.utils import logging as hf_logging

    hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only", "subfolder")
                  if k in kwargs}
    config = kwargs.pop("config", None) or transformers.AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
    cls = model_class or (config.architectures or [None])[0]
    if isinstance(cls, str):
        if not hasattr(transformers, cls):
            raise ValueError(f"{name_or_path}: transformers has no model class {cls!r}")
        cls = getattr(transformers, cls)
    if cls is None:
        raise ValueError(f"{name_or_path}: config.json names no architecture; pass model_class=...")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its notice lists the adapter weights, which load_madx reads next
    try:
        model, info = cls.from_pretrained(name_or_path, config=config, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    parts = find_parts(model)
    missing = [k for k in info.get("missing_keys", ()) if not adapter_of_key(k, parts)]
    unused = [k for k in info.get("unexpected_keys", ()) if not adapter_of_key(k, parts)]
    if missing or unused:
        log.warning("%s: %s", name_or_path, "; ".join(
            f"{what} {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for what, keys in (("newly initialised:", missing), ("not used:", unused)) if keys))
    load_madx(model, name_or_path, backend=backend, **hub_kwargs)
    return model


def load_madx(model, name_or_path=None, *, backend: str | None = None, **hub_kwargs):
    """Wire MAD-X into ``model`` (``add_madx``) and restore the adapters and active setup that ``save_pretrained``
    recorded in ``name_or_path`` (a directory or Hub repository; default: where the model was loaded from).
    The record is ``model.config.madx`` when the model was loaded from there, else read from config.json.
    Everything is read and checked before the model changes. Returns ``model.madx``."""
    where = os.fspath(name_or_path) if name_or_path is not None else model.config._name_or_path
    record = model.config.__dict__.get(CONFIG_KEY) or _read_record(where, hub_kwargs)
    _check_record(record, where)
    parts = find_parts(model)
    weights = _adapter_weights(where, parts, hub_kwargs)
    madx = add_madx(model, backend=backend)
    states = {}
    for name, config in record["adapters"].items():
        own = {k: v for k, v in weights.items() if adapter_of_key(k, parts) == name}
        states[name] = (MadxConfig.from_dict(config), from_adapterhub_keys(own, name, madx.parts, where))
    for name, (config, state) in states.items():
        madx.install_adapter(name, config, state, overwrite=name in madx.configs, source=where)
    active = [PerRow(*e["per_row"]) if isinstance(e, dict) else e for e in record["active"]]
    madx.set_active(active or None)
    model.config.__dict__.pop(CONFIG_KEY, None)  # the save hook writes it afresh; never a stale copy
    return madx


def _check_record(record, where: str) -> None:
    if record is None:
        raise AdapterFileError(f"{where}: config.json records no MAD-X adapters (no {CONFIG_KEY!r} entry): save the "
                               "model with save_pretrained after add_madx")
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise AdapterFileError(f"{where}: config.json's {CONFIG_KEY!r} entry is not a {FORMAT} record")
    if record.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(f"{where}: {FORMAT} format_version {record.get('format_version')!r} is not supported "
                               f"(this madx_fast reads version {FORMAT_VERSION})")
    if not isinstance(record.get("adapters"), dict) or not isinstance(record.get("active"), list):
        raise AdapterFileError(f"{where}: config.json's {CONFIG_KEY!r} entry lacks 'adapters' or 'active'")


def _read_record(where: str, hub_kwargs: dict):
    path = _file(where, "config.json", hub_kwargs)
    if path is None:
        raise AdapterFileError(f"{where}: no config.json")
    return files.read_json(path, error=AdapterFileError).get(CONFIG_KEY)


def _file(where: str, name: str, hub_kwargs: dict) -> str | None:
    """A file of the saved model: in the directory, or (a Hub repository) from the Hub cache, where
    ``from_pretrained`` has just put it. None when there is no such file."""
    subfolder = hub_kwargs.get("subfolder") or ""
    if os.path.isdir(where):
        path = os.path.join(where, subfolder, name)
        return path if os.path.isfile(path) else None
    from huggingface_hub import try_to_load_from_cache
    found = try_to_load_from_cache(where, f"{subfolder}/{name}" if subfolder else name,
                                   cache_dir=hub_kwargs.get("cache_dir"), revision=hub_kwargs.get("revision"))
    return found if isinstance(found, str) else None


def _adapter_weights(where: str, parts, hub_kwargs: dict) -> dict:
    """Every MAD-X adapter weight (keys of ``parts``' model family) of the saved model's weight files (one file,
    or the shards of an index)."""
    for name in WEIGHT_FILES:
        path = _file(where, name, hub_kwargs)
        if path is None:
            continue
        if name.endswith(".index.json"):
            weight_map = files.read_json(path, error=AdapterFileError).get("weight_map", {})
            shards = sorted({f for k, f in weight_map.items() if adapter_of_key(k, parts)})
            out = {}
            for shard in shards:
                out.update(_read_weights(_file(where, shard, hub_kwargs) or os.path.join(os.path.dirname(path),
                                                                                         shard), parts))
            return out
        return _read_weights(path, parts)
    raise AdapterFileError(f"{where}: no model weights ({', '.join(WEIGHT_FILES)})")


def _read_weights(path: str, parts) -> dict:
    """The adapter weights of one weights file (safetensors: only those tensors are read; ``.bin``: weights-only)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(path, framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys() if adapter_of_key(k, parts)}
        import torch
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any parse problem is a bad file
        raise AdapterFileError(f"{path}: cannot read the weights ({type(exc).__name__}: {exc})") from None
    return {k: v for k, v in state.items() if adapter_of_key(k, parts)}


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

__all__ = ["from_pretrained", "load_madx"]
