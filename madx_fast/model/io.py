"""Adapter files: madx_fast's own format, and AdapterHub's (import and export).

Own format, one directory per adapter:
    madx_adapter.json         {"format": "madx_fast.adapter", "format_version": 1, "name", "config": MadxConfig,
                               "model": {"model_type", "hidden_size", "num_hidden_layers"}, "madx_fast_version"}
    madx_adapter.safetensors  model-independent keys: layers.{i}.adapter_down.0.weight, ...,
                              invertible.F.0.weight, ... (float32 master weights)

AdapterHub format (what ``adapters``' ``model.save_adapter(dir, name)`` writes; madx-spec.md):
    adapter_config.json       {"config": full BnConfig, "hidden_size", "model_class", "model_name",
                               "model_type", "name", "version"}  (indent 2, sorted keys)
    pytorch_adapter.bin | adapter.safetensors
                              {prefix}.encoder.layer.{i}.output.adapters.{name}.adapter_down.0.weight, ...
                              {prefix}.invertible_adapters.{name}.F.0.weight, ...
    head_config.json + pytorch_model_head.bin | model_head.safetensors   (optional static task head)

Loading checks everything (config options, hidden size, layer count, key names, shapes, the adapter name
being free) before the model is touched, and raises AdapterFileError / AdapterConfigError naming the file
and the problem. Saving writes to temporary files in the target directory (or a temporary directory next to
it) and moves them into place with ``os.replace``: a crash leaves no half-written file, and existing adapter
files are only replaced with ``overwrite=True``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Callable

import torch

from .config import AdapterConfigError, MadxConfig

OWN_CONFIG = "madx_adapter.json"
OWN_WEIGHTS = "madx_adapter.safetensors"
OWN_HEAD_WEIGHTS = "madx_head.safetensors"
OWN_FORMAT = "madx_fast.adapter"
OWN_FORMAT_VERSION = 1

HUB_CONFIG = "adapter_config.json"
HUB_WEIGHTS = "pytorch_adapter.bin"
HUB_SAFE_WEIGHTS = "adapter.safetensors"
HUB_HEAD_CONFIG = "head_config.json"
HUB_HEAD_WEIGHTS = "pytorch_model_head.bin"
HUB_SAFE_HEAD_WEIGHTS = "model_head.safetensors"
HUB_VERSION = "adapters.1.3.0"  # the AdapterHub release whose format (and semantics) madx_fast matches


class AdapterFileError(ValueError):
    """An adapter file that does not fit the model or is malformed; the message names the file and why."""


# --------------------------------------------------------------------------------------------------------
# own format
# --------------------------------------------------------------------------------------------------------
def save_adapter(madx, directory, name: str, *, overwrite: bool = False, with_head: bool = False) -> None:
    from safetensors.torch import save_file

    madx._require(name)
    parts = madx.parts
    meta = {
        "format": OWN_FORMAT,
        "format_version": OWN_FORMAT_VERSION,
        "name": name,
        "config": madx.configs[name].to_dict(),
        "model": {"model_type": parts.model_type, "hidden_size": parts.hidden_size,
                  "num_hidden_layers": parts.num_layers, "model_class": type(madx.model).__name__},
        "madx_fast_version": _version(),
    }
    weights = _cpu_copies(madx.adapter_state_dict(name))
    files = {OWN_WEIGHTS: lambda p: save_file(weights, p, metadata={"format": "pt"})}
    if with_head:
        head = _cpu_copies(_head_state_dict(madx))
        meta["head"] = {"keys": sorted(head)}
        files[OWN_HEAD_WEIGHTS] = lambda p: save_file(head, p, metadata={"format": "pt"})
    files[OWN_CONFIG] = lambda p: _write_json(meta, p)  # last: the config marks a complete save
    atomic_write_files(directory, files, overwrite=overwrite, what=f"adapter {name!r}")


def load_adapter(madx, directory, *, load_as=None, overwrite=False, set_active=False, with_head=False) -> str:
    directory = os.fspath(directory)
    if os.path.isfile(os.path.join(directory, OWN_CONFIG)):
        return _load_own(madx, directory, load_as=load_as, overwrite=overwrite, set_active=set_active,
                         with_head=with_head)
    if os.path.isfile(os.path.join(directory, HUB_CONFIG)):
        return import_adapterhub(madx, directory, load_as=load_as, overwrite=overwrite, set_active=set_active,
                                 with_head=with_head)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"adapter directory {directory!r} does not exist")
    raise AdapterFileError(f"{directory}: no {OWN_CONFIG} (madx_fast) or {HUB_CONFIG} (AdapterHub) found")


def _load_own(madx, directory, *, load_as, overwrite, set_active, with_head) -> str:
    from safetensors.torch import load_file

    config_path = os.path.join(directory, OWN_CONFIG)
    meta = _read_json(config_path)
    if meta.get("format") != OWN_FORMAT:
        raise AdapterFileError(f"{config_path}: 'format' is {meta.get('format')!r}, expected {OWN_FORMAT!r}")
    if meta.get("format_version") != OWN_FORMAT_VERSION:
        raise AdapterFileError(f"{config_path}: format_version {meta.get('format_version')!r} is not supported "
                               f"(this madx_fast reads version {OWN_FORMAT_VERSION})")
    for key in ("name", "config", "model"):
        if key not in meta:
            raise AdapterFileError(f"{config_path}: missing entry {key!r}")
    parts = madx.parts
    model_meta = meta["model"]
    for key, have in (("hidden_size", parts.hidden_size), ("num_hidden_layers", parts.num_layers),
                      ("model_type", parts.model_type)):
        if key in model_meta and model_meta[key] != have:
            raise AdapterFileError(f"{config_path}: adapter {meta['name']!r} was saved for {key}="
                                   f"{model_meta[key]!r} but this model has {key}={have!r}")
    try:
        config = MadxConfig.from_dict(meta["config"])
    except AdapterConfigError as exc:
        raise AdapterConfigError(f"{config_path}: {exc}") from None
    name = load_as or meta["name"]
    madx.check_new_name(name, overwrite)  # before reading the weights: a clear error, nothing touched
    weights_path = os.path.join(directory, OWN_WEIGHTS)
    state = _read_safetensors(weights_path, load_file)
    head = None
    if with_head:
        head = _read_safetensors(os.path.join(directory, OWN_HEAD_WEIGHTS), load_file)
        _check_head(madx, head, os.path.join(directory, OWN_HEAD_WEIGHTS))
    return _install(madx, name, config, state, head, weights_path, overwrite=overwrite, set_active=set_active)


# --------------------------------------------------------------------------------------------------------
# AdapterHub format
# --------------------------------------------------------------------------------------------------------
def export_adapterhub(madx, directory, name: str, *, safetensors: bool = False, with_head: bool = False,
                      overwrite: bool = False) -> None:
    madx._require(name)
    parts, model = madx.parts, madx.model
    meta = {
        "config": madx.configs[name].to_adapterhub(),
        "hidden_size": parts.hidden_size,
        "model_class": type(model).__name__,
        "model_name": getattr(model.config, "name_or_path", "") or "",
        "model_type": parts.model_type,
        "name": name,
        "version": HUB_VERSION,
    }
    weights = _cpu_copies(to_adapterhub_keys(madx.adapter_state_dict(name), name, parts.prefix))
    files: dict[str, Callable[[str], None]] = {}
    stale = []
    if safetensors:
        files[HUB_SAFE_WEIGHTS] = lambda p: _save_safetensors(weights, p)
        stale.append(HUB_WEIGHTS)
    else:
        files[HUB_WEIGHTS] = lambda p: torch.save(weights, p)
        stale.append(HUB_SAFE_WEIGHTS)
    if with_head:
        head = _cpu_copies(_head_state_dict(madx))
        head_meta = {
            "config": None,
            "hidden_size": parts.hidden_size,
            "label2id": dict(getattr(model.config, "label2id", {}) or {}),
            "model_class": type(model).__name__,
            "model_name": meta["model_name"],
            "model_type": parts.model_type,
            "name": None,
            "num_labels": getattr(model.config, "num_labels", None),
            "version": HUB_VERSION,
        }
        if safetensors:
            files[HUB_SAFE_HEAD_WEIGHTS] = lambda p: _save_safetensors(head, p)
            stale.append(HUB_HEAD_WEIGHTS)
        else:
            files[HUB_HEAD_WEIGHTS] = lambda p: torch.save(head, p)
            stale.append(HUB_SAFE_HEAD_WEIGHTS)
        files[HUB_HEAD_CONFIG] = lambda p: _write_json(head_meta, p)
    files[HUB_CONFIG] = lambda p: _write_json(meta, p)
    # An old weights file in the other format would shadow or contradict the new one: remove it after.
    atomic_write_files(directory, files, overwrite=overwrite, what=f"adapter {name!r}", stale=stale)


def import_adapterhub(madx, directory, *, load_as=None, overwrite=False, set_active=False, with_head=False) -> str:
    directory = os.fspath(directory)
    config_path = os.path.join(directory, HUB_CONFIG)
    if not os.path.isfile(config_path):
        raise AdapterFileError(f"{directory}: no {HUB_CONFIG} (not an AdapterHub adapter directory)")
    meta = _read_json(config_path)
    if not isinstance(meta.get("config"), dict):
        raise AdapterFileError(f"{config_path}: no adapter 'config' entry")
    file_name = meta.get("name")
    if not isinstance(file_name, str) or not file_name:
        raise AdapterFileError(f"{config_path}: no adapter 'name' entry")
    parts = madx.parts
    if meta.get("hidden_size") not in (None, parts.hidden_size):
        raise AdapterFileError(f"{config_path}: adapter {file_name!r} is for hidden size {meta['hidden_size']}, "
                               f"this model has {parts.hidden_size}")
    hub_config = dict(meta["config"])
    if "version" not in meta and hub_config.get("non_linearity") in _LEGACY_ACTIVATION_RENAME:
        # adapter-transformers v1/v2 files (no "version") called tanh-GELU "gelu"; AdapterHub renames too.
        hub_config["non_linearity"] = _LEGACY_ACTIVATION_RENAME[hub_config["non_linearity"]]
    try:
        config = MadxConfig.from_adapterhub(hub_config)
    except AdapterConfigError as exc:
        raise AdapterConfigError(f"{config_path}: adapter {file_name!r}: {exc}") from None
    name = load_as or file_name
    madx.check_new_name(name, overwrite)
    weights_path, raw = _read_hub_weights(directory, HUB_SAFE_WEIGHTS, HUB_WEIGHTS)
    state = from_adapterhub_keys(raw, file_name, parts.prefix, weights_path)
    head = None
    if with_head:
        head = _read_hub_head(madx, directory)
    return _install(madx, name, config, state, head, weights_path, overwrite=overwrite, set_active=set_active)


_LEGACY_ACTIVATION_RENAME = {"gelu": "gelu_new", "gelu_orig": "gelu"}
_LAYER_KEY = re.compile(
    r"^(?:(?P<prefix>\w+)\.)?encoder\.layer\.(?P<layer>\d+)\.output\."
    r"(?:adapters|layer_text_lang_adapters|layer_text_task_adapters)\.(?P<name>[^.]+)\."
    r"(?P<param>adapter_down\.0\.(?:weight|bias)|adapter_up\.(?:weight|bias))$"
)
_INV_KEY = re.compile(
    r"^(?:(?P<prefix>\w+)\.)?(?:invertible_adapters|invertible_lang_adapters)\.(?P<name>[^.]+)\."
    r"(?P<param>[FG]\.[02]\.(?:weight|bias))$"
)


def _install(madx, name, config, state, head, source, *, overwrite, set_active) -> str:
    """The last step of every load, once everything was read and checked: install, head, activate."""
    madx.install_adapter(name, config, state, overwrite=overwrite, source=source)
    if head is not None:
        _load_head(madx, head)
    if set_active:
        madx.set_active(name)
    return name


def to_adapterhub_keys(state: dict, name: str, prefix: str) -> dict:
    """``layers.{i}.X`` -> ``{prefix}.encoder.layer.{i}.output.adapters.{name}.X``;
    ``invertible.X`` -> ``{prefix}.invertible_adapters.{name}.X``."""
    out = {}
    for key, value in state.items():
        kind, rest = key.split(".", 1)
        if kind == "layers":
            i, param = rest.split(".", 1)
            out[f"{prefix}.encoder.layer.{i}.output.adapters.{name}.{param}"] = value
        else:
            out[f"{prefix}.invertible_adapters.{name}.{rest}"] = value
    return out


def from_adapterhub_keys(raw: dict, name: str, prefix: str, source: str) -> dict:
    """The inverse of ``to_adapterhub_keys``; also reads unprefixed keys (files saved from a bare base
    model) and adapter-transformers' legacy module names. Keys of another adapter, of another model family
    (``bert.`` in an XLM-R model) or of anything else are refused by name."""
    out, foreign_prefix, other_name, unknown = {}, set(), set(), []
    for key, value in raw.items():
        m = _LAYER_KEY.match(key) or _INV_KEY.match(key)
        if m is None:
            unknown.append(key)
            continue
        if m.group("prefix") not in (None, prefix):
            foreign_prefix.add(m.group("prefix"))
            continue
        if m.group("name") != name:
            other_name.add(m.group("name"))
            continue
        new = f"layers.{m.group('layer')}.{m.group('param')}" if "layer" in m.groupdict() \
            else f"invertible.{m.group('param')}"
        out[new] = value
    if foreign_prefix:
        raise AdapterFileError(f"{source}: keys start with {sorted(foreign_prefix)} but this model's base is "
                               f"{prefix!r}: the adapter was saved from another model family")
    if other_name:
        raise AdapterFileError(f"{source}: keys belong to adapter(s) {sorted(other_name)}, but "
                               f"{HUB_CONFIG} names the adapter {name!r}")
    if unknown:
        shown = unknown[:5] + ([f"... ({len(unknown) - 5} more)"] if len(unknown) > 5 else [])
        raise AdapterFileError(f"{source}: unexpected keys {shown} (not bottleneck or NICE adapter weights)")
    return out


def _read_hub_weights(directory, safe_name, bin_name):
    safe, binary = os.path.join(directory, safe_name), os.path.join(directory, bin_name)
    if os.path.isfile(safe):
        from safetensors.torch import load_file
        return safe, _read_safetensors(safe, load_file)
    if os.path.isfile(binary):
        try:
            state = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling problem is a bad file
            raise AdapterFileError(f"{binary}: cannot read weights ({type(exc).__name__}: {exc})") from None
        if not isinstance(state, dict):
            raise AdapterFileError(f"{binary}: holds a {type(state).__name__}, expected a dict of tensors")
        return binary, state
    raise AdapterFileError(f"{directory}: no weights file ({safe_name} or {bin_name})")


# --------------------------------------------------------------------------------------------------------
# static task heads (every parameter outside the base model, as AdapterHub saves them for HF classes)
# --------------------------------------------------------------------------------------------------------
def _head_state_dict(madx) -> dict:
    prefix = madx.parts.prefix + "."
    if madx.parts.base is madx.model:
        raise AdapterFileError(f"{type(madx.model).__name__} has no task head to save")
    return {k: v for k, v in madx.model.state_dict().items() if not k.startswith(prefix)}


def _check_head(madx, head: dict, source: str) -> None:
    if madx.parts.is_masked_lm:
        raise AdapterFileError(f"{source}: loading a masked-LM head is not supported (its decoder is tied to the "
                               "word embeddings, which loading would overwrite); load a task head instead")
    from .controller import check_state_dict
    expected = {k: tuple(v.shape) for k, v in _head_state_dict(madx).items()}
    check_state_dict(head, expected, f"{source}: head of {type(madx.model).__name__}")


def _read_hub_head(madx, directory) -> dict:
    config_path = os.path.join(directory, HUB_HEAD_CONFIG)
    if os.path.isfile(config_path):
        head_meta = _read_json(config_path)
        if head_meta.get("model_class") != type(madx.model).__name__:
            raise AdapterFileError(f"{config_path}: head of a {head_meta.get('model_class')!r} does not fit a "
                                   f"{type(madx.model).__name__}")
    path, head = _read_hub_weights(directory, HUB_SAFE_HEAD_WEIGHTS, HUB_HEAD_WEIGHTS)
    _check_head(madx, head, path)
    return head


def _load_head(madx, head: dict) -> None:
    params = dict(madx.model.state_dict(keep_vars=True))
    with torch.no_grad():
        for key, value in head.items():
            params[key].copy_(value)


# --------------------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------------------
def atomic_write_files(directory, files: dict[str, Callable[[str], None]], *, overwrite: bool, what: str,
                       stale: list[str] = ()) -> None:
    """Write ``files`` (name -> writer(path)) into ``directory`` so that no half-written file is ever visible.

    A new directory is built as a temporary sibling and renamed into place. In an existing directory each
    file goes to a temporary file there first and is moved with ``os.replace`` in the given order (the
    config last); existing files of these names are an error unless ``overwrite``."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"cannot save {what}: {directory} exists and is not a directory")
    if os.path.isdir(directory):
        clash = sorted(f for f in list(files) + list(stale) if os.path.exists(os.path.join(directory, f)))
        if clash and not overwrite:
            raise FileExistsError(f"cannot save {what}: {directory} already holds {clash}; pass overwrite=True "
                                  "to replace them")
        temps = {}
        try:
            for fname, writer in files.items():
                fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{fname}.", suffix=".tmp")
                os.close(fd)
                temps[fname] = tmp
                writer(tmp)
                _fsync(tmp)
                os.chmod(tmp, 0o666 & ~_umask())
            for fname, tmp in temps.items():
                os.replace(tmp, os.path.join(directory, fname))
            temps = {}
            for fname in stale:
                path = os.path.join(directory, fname)
                if os.path.exists(path):
                    os.remove(path)
        finally:
            for tmp in temps.values():
                if os.path.exists(tmp):
                    os.remove(tmp)
        return
    parent, base = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    tmpdir = tempfile.mkdtemp(dir=parent, prefix=f".{base}.", suffix=".tmp")
    try:
        for fname, writer in files.items():
            path = os.path.join(tmpdir, fname)
            writer(path)
            _fsync(path)
            os.chmod(path, 0o666 & ~_umask())
        os.chmod(tmpdir, 0o777 & ~_umask())
        os.replace(tmpdir, directory)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json(obj, path):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def _read_json(path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(path, load_file) -> dict:
    if not os.path.isfile(path):
        raise AdapterFileError(f"{path}: weights file missing")
    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # noqa: BLE001 - any parse problem is a bad file
        raise AdapterFileError(f"{path}: cannot read safetensors ({type(exc).__name__}: {exc})") from None


def _save_safetensors(state, path):
    from safetensors.torch import save_file
    save_file(state, path, metadata={"format": "pt"})


def _cpu_copies(state: dict) -> dict:
    """Contiguous CPU copies that share no storage (safetensors and torch.save both need that here)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def _version() -> str:
    from .. import __version__
    return __version__
