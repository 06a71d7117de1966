"""Adapter files: madx_fast's own format, and AdapterHub's (import and export). Depends only on the public
``MadxAdapters`` API (``madx.parts``, ``configs``, ``check_new_name``, ``install_adapter``,
``adapter_state_dict``, ``head_state_dict``, ``check_head_state_dict`` / ``load_head_state_dict``).

Own format, one directory per adapter (docs/file_formats.md):
    madx_adapter.json         {"format": "madx_fast.adapter", "format_version": 1, "name", "config": MadxConfig,
                               "model": {"model_type", "hidden_size", "num_hidden_layers", "model_class",
                               "name_or_path"}, "head": null | {"keys", "model_class", "labels"},
                               "madx_fast_version"}
    madx_adapter.safetensors  model-independent keys: layers.{i}.adapter_down.0.weight, ...,
                              invertible.F.0.weight, ... (float32 master weights)
    madx_head.safetensors     the task head (``with_head=True``): model parameter names, e.g. classifier.weight
                              (run bundles written before this format had ``task_head.safetensors``: still read)
    README.md                 a model card in the Hub's format (card.py; one you wrote yourself is kept)

AdapterHub format (what ``adapters``' ``model.save_adapter(dir, name)`` writes):
    adapter_config.json       {"config": full BnConfig, "hidden_size", "model_class", "model_name",
                               "model_type", "name", "version"}  (indent 2, sorted keys)
    pytorch_adapter.bin | adapter.safetensors
                              {prefix}.encoder.layer.{i}.output.adapters.{name}.adapter_down.0.weight, ...
                              {prefix}.invertible_adapters.{name}.F.0.weight, ...
    head_config.json + pytorch_model_head.bin | model_head.safetensors   (optional task head: a static head of
                              an HF class, or a flex head of an AdapterHub model, mapped to the HF class's names)

Loading reads and checks everything (config options, hidden size, layer count, key names, shapes,
finiteness, the adapter name being free, the head fitting the model) before the model is touched, and raises
AdapterFileError / AdapterConfigError naming the file and the problem; ``.bin`` files are read with
``torch.load(weights_only=True)``, which never runs pickled code. Saving builds the whole directory aside and
swaps it in (``madx_fast.files``): a reader sees the old adapter or the new one, never a mix, and files of
an earlier save never survive an overwrite.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass

import torch

from .. import files
from .._version import __version__
from .card import CARD_FILE, adapter_card, keeps_own_card
from .config import AdapterConfigError, MadxConfig

OWN_CONFIG = "madx_adapter.json"
OWN_WEIGHTS = "madx_adapter.safetensors"
OWN_HEAD_WEIGHTS = "madx_head.safetensors"
LEGACY_BUNDLE_HEAD_WEIGHTS = "task_head.safetensors"  # run bundles of madx_fast 0.1 (read only)
OWN_FORMAT = "madx_fast.adapter"
OWN_FORMAT_VERSION = 1

HUB_CONFIG = "adapter_config.json"
HUB_WEIGHTS = "pytorch_adapter.bin"
HUB_SAFE_WEIGHTS = "adapter.safetensors"
HUB_HEAD_CONFIG = "head_config.json"
HUB_HEAD_WEIGHTS = "pytorch_model_head.bin"
HUB_SAFE_HEAD_WEIGHTS = "model_head.safetensors"
HUB_VERSION = "adapters.1.3.0"  # the AdapterHub release whose format (and semantics) madx_fast matches

# Every file an adapter directory consists of: a save replaces all of them (none survives from before).
ADAPTER_FILES = (OWN_CONFIG, OWN_WEIGHTS, OWN_HEAD_WEIGHTS, LEGACY_BUNDLE_HEAD_WEIGHTS, HUB_CONFIG, HUB_WEIGHTS,
                 HUB_SAFE_WEIGHTS, HUB_HEAD_CONFIG, HUB_HEAD_WEIGHTS, HUB_SAFE_HEAD_WEIGHTS)


class AdapterFileError(ValueError):
    """An adapter file that does not fit the model or is malformed; the message names the file and why."""


@dataclass(frozen=True)
class HeadInfo:
    """What an adapter directory says about its task head, without reading the weights."""

    model_class: str | None      # the HF class the head belongs to, e.g. XLMRobertaForTokenClassification
    labels: list[str] | None     # label names in id order (token classification), when recorded
    num_labels: int | None
    path: str


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter directory's metadata: enough to plan a run (which base model, task, labels) before any
    model is built."""

    path: str
    format: str                  # "madx_fast" or "adapterhub"
    name: str
    config: MadxConfig
    hidden_size: int | None
    model_type: str | None
    base_model: str | None       # the name or path of the base model it was trained on, when recorded
    head: HeadInfo | None


# --------------------------------------------------------------------------------------------------------
# own format
# --------------------------------------------------------------------------------------------------------
def save_adapter(madx, directory, name: str, *, overwrite: bool = False, with_head: bool = False) -> None:
    keep_card = os.path.isdir(os.fspath(directory)) and keeps_own_card(os.fspath(directory))

    def build(tmp):
        write_adapter_files(madx, tmp, name, with_head=with_head)
        if keep_card:  # the user's own README.md stays (carried over from the directory)
            os.remove(os.path.join(tmp, CARD_FILE))
    _write_adapter_directory(directory, build, overwrite=overwrite, what=f"adapter {name!r}")


def write_adapter_files(madx, directory: str, name: str, *, with_head: bool = False, run: dict | None = None) -> None:
    """The files of adapter ``name`` in madx_fast's format, and its model card (README.md; ``run``: the facts of
    the run that trained it, ``card.adapter_card``), into the (new, empty) ``directory``; used inside an atomic
    directory write (``save_adapter``, run bundles)."""
    if name not in madx.configs:
        raise KeyError(f"no adapter named {name!r} in the model (adapters: {sorted(madx.configs) or 'none'})")
    parts, model = madx.parts, madx.model
    weights = _cpu_copies(madx.adapter_state_dict(name))
    head = _cpu_copies(madx.head_state_dict()) if with_head else None
    meta = {
        "format": OWN_FORMAT,
        "format_version": OWN_FORMAT_VERSION,
        "name": name,
        "config": madx.configs[name].to_dict(),
        "model": {"model_type": parts.model_type, "hidden_size": parts.hidden_size,
                  "num_hidden_layers": parts.num_layers, "model_class": type(model).__name__,
                  "name_or_path": getattr(model.config, "name_or_path", "") or ""},
        "head": None if head is None else {"keys": sorted(head), "model_class": type(model).__name__,
                                           "labels": _label_names(model.config)},
        "madx_fast_version": __version__,
    }
    write_safetensors(weights, os.path.join(directory, OWN_WEIGHTS))
    meta["weights_sha256"] = files.sha256_file(os.path.join(directory, OWN_WEIGHTS))
    if head is not None:
        write_safetensors(head, os.path.join(directory, OWN_HEAD_WEIGHTS))
        meta["head"]["sha256"] = files.sha256_file(os.path.join(directory, OWN_HEAD_WEIGHTS))
    meta["checksum"] = _meta_checksum(meta)
    with open(os.path.join(directory, CARD_FILE), "w", encoding="utf-8") as f:
        f.write(adapter_card(name, meta["config"], base_model=meta["model"]["name_or_path"],
                             model_class=type(model).__name__, with_head=head is not None, run=run))
    files.dump_json(meta, os.path.join(directory, OWN_CONFIG))  # last: the config marks a complete adapter


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


def _read_own_meta(directory) -> tuple[str, dict, MadxConfig]:
    config_path = os.path.join(directory, OWN_CONFIG)
    meta = _read_json(config_path)
    if "checksum" in meta and meta["checksum"] != _meta_checksum(meta):
        raise AdapterFileError(f"{config_path}: the file was changed or damaged after it was saved (its checksum "
                               "does not match its content)")
    if meta.get("format") != OWN_FORMAT:
        raise AdapterFileError(f"{config_path}: 'format' is {meta.get('format')!r}, expected {OWN_FORMAT!r}")
    if meta.get("format_version") != OWN_FORMAT_VERSION:
        raise AdapterFileError(f"{config_path}: format_version {meta.get('format_version')!r} is not supported "
                               f"(this madx_fast reads version {OWN_FORMAT_VERSION})")
    for key, kind in (("name", str), ("config", dict), ("model", dict)):
        if not isinstance(meta.get(key), kind):
            raise AdapterFileError(f"{config_path}: entry {key!r} is missing or not a {kind.__name__}")
    try:
        config = MadxConfig.from_dict(meta["config"])
    except (AdapterConfigError, TypeError) as exc:
        raise AdapterConfigError(f"{config_path}: {exc}") from None
    return config_path, meta, config


def _load_own(madx, directory, *, load_as, overwrite, set_active, with_head) -> str:
    config_path, meta, config = _read_own_meta(directory)
    parts = madx.parts
    model_meta = meta["model"]
    for key, have in (("hidden_size", parts.hidden_size), ("num_hidden_layers", parts.num_layers)):
        if key in model_meta and model_meta[key] != have:
            raise AdapterFileError(f"{config_path}: adapter {meta['name']!r} was saved for {key}="
                                   f"{model_meta[key]!r} but this model has {key}={have!r}")
    check_model_type(model_meta.get("model_type"), parts.model_type, f"{config_path}: adapter {meta['name']!r}")
    name = load_as or meta["name"]
    madx.check_new_name(name, overwrite)  # before reading the weights: a clear error, nothing touched
    weights_path = os.path.join(directory, OWN_WEIGHTS)
    _check_sha256(weights_path, meta.get("weights_sha256"))
    state = read_safetensors(weights_path)
    head = read_own_head(directory, meta) if with_head else None
    return _install(madx, name, config, state, head, weights_path, overwrite=overwrite, set_active=set_active)


def read_own_head(directory, meta: dict | None = None) -> tuple[str, dict, bool]:
    """``(path, head weights, pooler optional)`` of an adapter directory in madx_fast's format (or a run bundle
    of 0.1). Heads saved by this version list every parameter, the pooler included; older ones may lack it."""
    head_meta = (meta or {}).get("head") or {}
    for fname in (OWN_HEAD_WEIGHTS, LEGACY_BUNDLE_HEAD_WEIGHTS):
        path = os.path.join(directory, fname)
        if os.path.isfile(path):
            _check_sha256(path, head_meta.get("sha256") if fname == OWN_HEAD_WEIGHTS else None)
            return path, read_safetensors(path), "sha256" not in head_meta
    raise AdapterFileError(f"{directory}: no task head saved with this adapter ({OWN_HEAD_WEIGHTS} missing; save "
                           "it with save_adapter(..., with_head=True))")


# --------------------------------------------------------------------------------------------------------
# AdapterHub format
# --------------------------------------------------------------------------------------------------------
def export_adapterhub(madx, directory, name: str, *, safetensors: bool = False, with_head: bool = False,
                      overwrite: bool = False) -> None:
    if name not in madx.configs:
        raise KeyError(f"no adapter named {name!r} in the model (adapters: {sorted(madx.configs) or 'none'})")
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
    weights = _cpu_copies(to_adapterhub_keys(madx.adapter_state_dict(name), name, parts))
    head = _cpu_copies(madx.head_state_dict()) if with_head else None
    head_meta = None
    if head is not None:
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

    def save(state, tmp, safe_name, bin_name):
        if safetensors:
            write_safetensors(state, os.path.join(tmp, safe_name))
        else:
            with open(os.path.join(tmp, bin_name), "wb") as f:  # a failed write raises its OSError
                torch.save(state, f)

    def build(tmp):
        save(weights, tmp, HUB_SAFE_WEIGHTS, HUB_WEIGHTS)
        if head is not None:
            save(head, tmp, HUB_SAFE_HEAD_WEIGHTS, HUB_HEAD_WEIGHTS)
            files.dump_json(head_meta, os.path.join(tmp, HUB_HEAD_CONFIG))
        files.dump_json(meta, os.path.join(tmp, HUB_CONFIG))

    _write_adapter_directory(directory, build, overwrite=overwrite, what=f"adapter {name!r}")


def _read_hub_meta(directory) -> tuple[str, dict, str, MadxConfig]:
    config_path = os.path.join(directory, HUB_CONFIG)
    if not os.path.isfile(config_path):
        raise AdapterFileError(f"{directory}: no {HUB_CONFIG} (not an AdapterHub adapter directory)")
    meta = _read_json(config_path)
    if not isinstance(meta.get("config"), dict):
        raise AdapterFileError(f"{config_path}: no adapter 'config' entry")
    file_name = meta.get("name")
    if not isinstance(file_name, str) or not file_name:
        raise AdapterFileError(f"{config_path}: no adapter 'name' entry")
    hub_config = dict(meta["config"])
    if "version" not in meta and hub_config.get("non_linearity") in _LEGACY_ACTIVATION_RENAME:
        # adapter-transformers v1/v2 files (no "version") called tanh-GELU "gelu"; AdapterHub renames too.
        hub_config["non_linearity"] = _LEGACY_ACTIVATION_RENAME[hub_config["non_linearity"]]
    try:
        config = MadxConfig.from_adapterhub(hub_config)
    except (AdapterConfigError, TypeError) as exc:
        raise AdapterConfigError(f"{config_path}: adapter {file_name!r}: {exc}") from None
    return config_path, meta, file_name, config


def import_adapterhub(madx, directory, *, load_as=None, overwrite=False, set_active=False, with_head=False) -> str:
    directory = os.fspath(directory)
    config_path, meta, file_name, config = _read_hub_meta(directory)
    parts = madx.parts
    if meta.get("hidden_size") not in (None, parts.hidden_size):
        raise AdapterFileError(f"{config_path}: adapter {file_name!r} is for hidden size {meta['hidden_size']}, "
                               f"this model has {parts.hidden_size}")
    check_model_type(meta.get("model_type"), parts.model_type, f"{config_path}: adapter {file_name!r}")
    name = load_as or file_name
    madx.check_new_name(name, overwrite)
    weights_path, raw = read_hub_weights(directory, HUB_SAFE_WEIGHTS, HUB_WEIGHTS)
    state = from_adapterhub_keys(raw, file_name, parts, weights_path)
    head = read_hub_head(directory, parts.prefix, _head_names(madx)) if with_head else None
    return _install(madx, name, config, state, head, weights_path, overwrite=overwrite, set_active=set_active)


def _head_names(madx) -> set[str]:
    """The parameter names of the model's task head (none: it has no task head, which loading then reports)."""
    try:
        return set(madx.head_state_dict())
    except AdapterFileError:
        return set()


_LEGACY_ACTIVATION_RENAME = {"gelu": "gelu_new", "gelu_orig": "gelu"}


def _layer_key(parts) -> re.Pattern:
    """AdapterHub's key of a layer adapter's weight in this model family (``parts.hub_key``), with or without the
    base model prefix, and adapter-transformers' legacy module names."""
    layers, slot = (re.escape(p) for p in (parts.backbone.layers, parts.backbone.slot))
    return re.compile(
        rf"^(?:(?P<prefix>\w+)\.)?{layers}\.(?P<layer>\d+)\.{slot}\."
        r"(?:adapters|layer_text_lang_adapters|layer_text_task_adapters)\.(?P<name>[^.]+)\."
        r"(?P<param>adapter_down\.0\.(?:weight|bias)|adapter_up\.(?:weight|bias))$"
    )


_INV_KEY = re.compile(
    r"^(?:(?P<prefix>\w+)\.)?(?:invertible_adapters|invertible_lang_adapters)\.(?P<name>[^.]+)\."
    r"(?P<param>[FG]\.[02]\.(?:weight|bias))$"
)


def _install(madx, name, config, state, head, source, *, overwrite, set_active) -> str:
    """The last step of every load, once everything was read: check the head too, then change the model."""
    if head is not None:
        path, weights, pooler_optional = head
        madx.check_head_state_dict(weights, path, pooler_optional=pooler_optional)
    madx.install_adapter(name, config, state, overwrite=overwrite, source=source)
    if head is not None:
        madx.load_head_state_dict(weights, path, pooler_optional=pooler_optional)
    if set_active:
        madx.set_active(name)
    return name


def to_adapterhub_keys(state: dict, name: str, parts) -> dict:
    """``layers.{i}.X`` -> ``{parts.hub_key(i)}.{name}.X`` (``{prefix}.encoder.layer.{i}.output.adapters.{name}.X``
    in BERT / XLM-R); ``invertible.X`` -> ``{prefix}.invertible_adapters.{name}.X``."""
    out = {}
    for key, value in state.items():
        kind, rest = key.split(".", 1)
        if kind == "layers":
            i, param = rest.split(".", 1)
            out[f"{parts.hub_key(int(i))}.{name}.{param}"] = value
        else:
            out[f"{parts.prefix}.invertible_adapters.{name}.{rest}"] = value
    return out


def adapter_of_key(key: str, parts) -> str | None:
    """The adapter a model weight belongs to (its name), for the keys of MAD-X adapter weights in the state dict
    of a model of ``parts``' family or in AdapterHub's files; None for any other key."""
    m = _layer_key(parts).match(key) or _INV_KEY.match(key)
    return m.group("name") if m else None


def from_adapterhub_keys(raw: dict, name: str, parts, source: str) -> dict:
    """The inverse of ``to_adapterhub_keys``; also reads unprefixed keys (files saved from a bare base
    model) and adapter-transformers' legacy module names. Keys of another adapter, of another model family
    (``bert.`` in an XLM-R model) or of anything else are refused by name."""
    out, foreign_prefix, other_name, unknown = {}, set(), set(), []
    prefix, layer_key = parts.prefix, _layer_key(parts)
    for key, value in raw.items():
        m = layer_key.match(key) or _INV_KEY.match(key)
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


def read_hub_weights(directory, safe_name, bin_name) -> tuple[str, dict]:
    """``(path, state dict)`` from AdapterHub's safetensors file, else its ``.bin`` (read weights-only)."""
    safe, binary = os.path.join(directory, safe_name), os.path.join(directory, bin_name)
    if os.path.isfile(safe):
        return safe, read_safetensors(safe)
    if os.path.isfile(binary):
        try:
            state = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling problem, or a refused global, is a bad file
            raise AdapterFileError(f"{binary}: cannot read weights ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise AdapterFileError(f"{binary}: expected a dict of named tensors, got a {type(state).__name__}")
        return binary, state
    raise AdapterFileError(f"{directory}: no weights file ({safe_name} or {bin_name})")


# --------------------------------------------------------------------------------------------------------
# AdapterHub task heads
# --------------------------------------------------------------------------------------------------------
# Flex heads of AdapterHub's model classes, as the HF class whose head computes the same function: module
# index in the flex head -> parameter prefix in the HF model ("{base}" is the base model's attribute; "a|b":
# whichever the model has, e.g. Llama's token classifier is "score").
_FLEX_HEADS = {
    # head_type, layers, use_pooler, activation -> (HF class suffix, {index: HF module})
    ("tagging", 1, False, None): ("ForTokenClassification", {1: "classifier|score"}),
    ("question_answering", 1, False, None): ("ForQuestionAnswering", {1: "qa_outputs"}),
    ("multiple_choice", 1, True, None): ("ForMultipleChoice", {1: "classifier"}),
    ("multiple_choice", 2, False, "tanh"): ("ForMultipleChoice", {1: "{base}.pooler.dense", 4: "classifier"}),
}
_HEAD_CLASSES = {"ForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
                 "ForQuestionAnswering": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
                 "ForMultipleChoice": "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES"}


def _hf_head_class(model_type: str | None, suffix: str) -> str:
    """The HF class of that head for that model type (transformers' auto mapping), or the suffix alone."""
    from transformers.models.auto import modeling_auto
    return getattr(modeling_auto, _HEAD_CLASSES[suffix]).get(model_type or "", suffix)


def _flex_head_key(config: dict) -> tuple:
    layers = config.get("layers", 1)
    activation = config.get("activation_function") if layers > 1 else None
    return (config.get("head_type"), layers, bool(config.get("use_pooler", False)), activation)


def read_hub_head(directory, prefix: str, head_names=()) -> tuple[str, dict, bool]:
    """``(path, head weights by HF parameter name, pooler optional)`` of an AdapterHub adapter directory: a static head
    as saved from an HF class, or a flex head (``heads.<name>.<i>.*``) mapped to the matching HF class's names (of
    the model's own head, ``head_names``, where the classes of a family differ)."""
    info = _hub_head_info(directory)
    path, raw = read_hub_weights(directory, HUB_SAFE_HEAD_WEIGHTS, HUB_HEAD_WEIGHTS)
    meta = _read_json(os.path.join(directory, HUB_HEAD_CONFIG)) if os.path.isfile(
        os.path.join(directory, HUB_HEAD_CONFIG)) else {}
    flex = meta.get("config")
    if not isinstance(flex, dict):
        return path, raw, True  # AdapterHub saves a static head without the base model's pooler
    _, modules = _FLEX_HEADS[_flex_head_key(flex)]  # (_hub_head_info refused the heads not in the table)
    out, unknown = {}, []
    for key, value in raw.items():
        m = re.match(r"^heads\.[^.]+\.(\d+)\.(weight|bias)$", key)
        if m is None or int(m.group(1)) not in modules:
            unknown.append(key)
            continue
        names = modules[int(m.group(1))].format(base=prefix).split("|")
        name = next((n for n in names if f"{n}.{m.group(2)}" in head_names), names[0])
        out[f"{name}.{m.group(2)}"] = value
    if unknown:
        raise AdapterFileError(f"{path}: unexpected keys {unknown[:5]} for a {info.model_class} head")
    return path, out, "{base}.pooler.dense" not in modules.values()


def _hub_head_info(directory) -> HeadInfo:
    config_path = os.path.join(directory, HUB_HEAD_CONFIG)
    if not os.path.isfile(config_path):
        raise AdapterFileError(f"{directory}: no task head saved with this adapter ({HUB_HEAD_CONFIG} missing)")
    meta = _read_json(config_path)
    flex = meta.get("config")
    label2id = meta.get("label2id")
    num_labels = meta.get("num_labels")
    model_class = meta.get("model_class")
    if isinstance(flex, dict):
        key = _flex_head_key(flex)
        if key not in _FLEX_HEADS:
            raise AdapterFileError(
                f"{config_path}: a {flex.get('head_type')!r} head with {flex.get('layers')} layer(s), use_pooler="
                f"{flex.get('use_pooler')}, activation {flex.get('activation_function')!r} has no equivalent HF "
                "head here; madx_fast reads tagging, question-answering and multiple-choice heads of AdapterHub's "
                "default shapes")
        model_class = _hf_head_class(meta.get("model_type"), _FLEX_HEADS[key][0])
        label2id = flex.get("label2id") or label2id
        num_labels = flex.get("num_labels", num_labels)
    if not isinstance(model_class, str) or not model_class:
        raise AdapterFileError(f"{config_path}: no 'model_class' entry (which HF head is this?)")
    labels = None
    if isinstance(label2id, dict) and label2id:
        try:
            labels = [label for label, _ in sorted(label2id.items(), key=lambda kv: int(kv[1]))]
        except (TypeError, ValueError):
            raise AdapterFileError(f"{config_path}: 'label2id' must map label names to integer ids") from None
    return HeadInfo(model_class, labels, num_labels if isinstance(num_labels, int) else None, directory)


# --------------------------------------------------------------------------------------------------------
# metadata without a model
# --------------------------------------------------------------------------------------------------------
def read_adapter_info(directory) -> AdapterInfo:
    """Metadata of an adapter directory of either format (no weights read, no model needed)."""
    directory = os.fspath(directory)
    if os.path.isfile(os.path.join(directory, OWN_CONFIG)):
        _, meta, config = _read_own_meta(directory)
        model, head = meta["model"], meta.get("head")
        head_info = None
        if isinstance(head, dict) or os.path.isfile(os.path.join(directory, LEGACY_BUNDLE_HEAD_WEIGHTS)):
            head = head if isinstance(head, dict) else {}
            labels = head.get("labels")
            head_info = HeadInfo(head.get("model_class") or model.get("model_class"),
                                 list(labels) if isinstance(labels, list) else None,
                                 len(labels) if isinstance(labels, list) else None, directory)
        return AdapterInfo(directory, "madx_fast", meta["name"], config, model.get("hidden_size"),
                           model.get("model_type"), model.get("name_or_path") or None, head_info)
    if os.path.isfile(os.path.join(directory, HUB_CONFIG)):
        _, meta, name, config = _read_hub_meta(directory)
        head_info = _hub_head_info(directory) if os.path.isfile(os.path.join(directory, HUB_HEAD_CONFIG)) else None
        return AdapterInfo(directory, "adapterhub", name, config, meta.get("hidden_size"), meta.get("model_type"),
                           meta.get("model_name") or None, head_info)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"adapter directory {directory!r} does not exist")
    raise AdapterFileError(f"{directory}: no {OWN_CONFIG} (madx_fast) or {HUB_CONFIG} (AdapterHub) found")


# --------------------------------------------------------------------------------------------------------
# checks and low-level reading / writing
# --------------------------------------------------------------------------------------------------------
def check_model_type(recorded, model_type: str, where: str) -> None:
    """An adapter recorded for another model type (BERT's in XLM-R, ...) is refused: the same shapes can
    hold, but the function learned on another backbone's representations is not the one here. A file
    without a model type (older AdapterHub files) is not refused."""
    if recorded in (None, ""):
        return
    if not isinstance(recorded, str) or recorded.replace("_", "-") != model_type.replace("_", "-"):
        raise AdapterFileError(f"{where} was saved for model_type {recorded!r}, but this model is "
                               f"{model_type!r}: load it into a {recorded!r} model")


def check_state_dict(state_dict: dict, expected: dict[str, tuple], where: str,
                     optional: tuple[str, ...] = ()) -> None:
    """Raise AdapterFileError listing missing keys, unexpected keys, wrong shapes / dtypes and non-finite
    values (in that order). Keys starting with one of ``optional`` may be absent."""
    missing = sorted(k for k in set(expected) - set(state_dict) if not k.startswith(optional))
    unexpected = sorted(set(state_dict) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_some(unexpected)}")
    for key in sorted(set(expected) & set(state_dict)):
        t = state_dict[key]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            problems.append(f"{key} is not a floating-point tensor")
        elif tuple(t.shape) != tuple(expected[key]):
            problems.append(f"{key} has shape {tuple(t.shape)}, the model needs {tuple(expected[key])}")
        elif not bool(torch.isfinite(t).all()):
            problems.append(f"{key} holds NaN or Inf values")
    if problems:
        raise AdapterFileError(f"{where}: " + "; ".join(problems))


def _some(keys, n=6):
    return keys if len(keys) <= n else keys[:n] + [f"... ({len(keys) - n} more)"]


def _write_adapter_directory(directory, build, *, overwrite: bool, what: str) -> None:
    """One adapter per directory, swapped in whole; an existing adapter there needs ``overwrite``."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"cannot save {what}: {directory} exists and is not a directory")
    files.recover_directory(directory)
    if os.path.isdir(directory) and not overwrite:
        clash = sorted(f for f in ADAPTER_FILES if os.path.exists(os.path.join(directory, f)))
        if clash:
            raise FileExistsError(f"cannot save {what}: {directory} already holds an adapter ({', '.join(clash)}); "
                                  "pass overwrite=True to replace it")
    files.replace_directory(directory, build, owned=ADAPTER_FILES)


def write_safetensors(state: dict, path: str) -> None:
    """``state`` as a safetensors file, the bytes written by Python: a failed write raises its OSError (which
    ``madx_fast.files`` reports naming the file), where safetensors' own writer would raise its own error."""
    from safetensors.torch import save
    data = save(state, metadata={"format": "pt"})
    with open(path, "wb") as f:
        f.write(data)


def read_safetensors(path) -> dict:
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise AdapterFileError(f"{path}: weights file missing")
    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # noqa: BLE001 - any parse problem is a bad file
        raise AdapterFileError(f"{path}: cannot read safetensors ({type(exc).__name__}: {exc})") from None


def _check_sha256(path, want: str | None) -> None:
    if want and os.path.isfile(path) and files.sha256_file(path) != want:
        raise AdapterFileError(f"{path}: the file was changed or damaged after it was saved (its sha256 differs "
                               f"from the one recorded in {OWN_CONFIG})")


def _meta_checksum(meta: dict) -> str:
    """sha256 of the config's own content (every entry but the checksum, canonical JSON)."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _label_names(config) -> list[str] | None:
    id2label = getattr(config, "id2label", None) or {}
    try:
        return [str(id2label[i]) for i in range(len(id2label))] if id2label else None
    except KeyError:
        return None


def _cpu_copies(state: dict) -> dict:
    """Contiguous CPU copies that share no storage (safetensors and torch.save both need that here)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def _read_json(path) -> dict:
    return files.read_json(path, error=AdapterFileError)
