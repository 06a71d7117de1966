"""Base models and their tokenizers: how every stage, transfer and predict load, check, wire, cast, place and
compile the model they work on (the device itself: ``devices.py``).

    tok = load_tokenizer(name, need_mask=True)            # a fast tokenizer, checked
    max_length = max_length_for(name, requested, default) # within the model's position table
    model, madx, fingerprint = wired_model("AutoModelForMaskedLM", name, backend)
    dtype = place(model, madx, "auto", device)            # bf16 backbone on a GPU, fp32 adapters; .to(device)
    compile_encoder(model, "inductor")                    # --compile: the encoder runs as a compiled graph

The *base fingerprint* hashes a fixed sample of every backbone weight (taken before any cast): an adapter
trained on one base model is refused on another of the same shape (a different checkpoint), before any work.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging

import torch

from ..model import add_madx, hub
from ..model.wiring import find_parts
from ..paths import check_local
from .data import DataError

log = logging.getLogger("madx_fast.training")


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' "newly initialized weights" notices (madx_fast logs what it builds itself)."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_tokenizer(name: str, *, need_mask: bool = False, model: str | None = None):
    """The fast tokenizer ``name``, checked; with ``model``, also that every token id has a row in the model's
    embedding matrix (a larger tokenizer would fail deep in the embeddings)."""
    from transformers import AutoTokenizer
    tok = from_pretrained(AutoTokenizer.from_pretrained, name, "the tokenizer of", directory="tokenizer directory")
    check_tokenizer(tok, need_mask=need_mask)
    if model is not None:
        vocab = getattr(load_config(model), "vocab_size", None)
        if vocab is not None and len(tok) > vocab:
            raise DataError(f"the tokenizer {name!r} has {len(tok)} tokens but the model {model!r} embeds only "
                            f"{vocab}: they do not belong together (pass the model's own tokenizer)")
    return tok


def check_tokenizer(tokenizer, need_mask: bool = False) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer; madx_fast needs one for "
                        "word alignment and answer offsets")
    if tokenizer.pad_token_id is None:
        raise DataError("the tokenizer has no pad token")
    if need_mask and tokenizer.mask_token_id is None:
        raise DataError("the tokenizer has no mask token, so it cannot be used for masked-LM training")
    if bos_id(tokenizer) is None or eos_id(tokenizer) is None:
        raise DataError("the tokenizer has no <s>/</s> (or [CLS]/[SEP]) tokens")


def bos_id(tok) -> int:
    return tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id


def eos_id(tok) -> int:
    return tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id


def load_config(name: str):
    from transformers import AutoConfig
    return from_pretrained(AutoConfig.from_pretrained, name, "the config of")


def load_model(auto_class: str, name: str, **kwargs):
    import transformers
    cls = getattr(transformers, auto_class)
    with quiet_transformers():
        return from_pretrained(cls.from_pretrained, name, "the model", **kwargs)


def from_pretrained(load, name: str, what: str, *, directory: str = "model directory", **kwargs):
    """``load(name, **kwargs)`` (a ``from_pretrained``) for a model, config or tokenizer ``name``: a local path
    (``paths.looks_local``) must exist, and is never looked up on the Hub; a Hub name (``hf:`` forces that
    reading) is read through huggingface_hub's cache, and from the cache alone when the Hub cannot be reached
    (no retries). Any failure is an OSError of one line saying what was tried and what to do."""
    forced = isinstance(name, str) and name.startswith(hub.HUB_PREFIX)
    if forced:
        name = name[len(hub.HUB_PREFIX):]
    local = not forced and check_local(name, directory)
    unreachable = None if local or hub._offline() else hub.unreachable_reason()
    if unreachable:
        kwargs["local_files_only"] = True
    try:
        loaded = load(name, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line naming what was loaded
        why = None if local else hub.hub_failure(exc, name)
        raise OSError(f"cannot load {what} {name!r}: "
                      + (why or f"{type(exc).__name__}: {' '.join(str(exc).split())}")) from None
    if unreachable:
        log.info("the Hugging Face Hub cannot be reached (%s): %s %r read from the cache", unreachable, what, name)
    return loaded


def position_limit(config) -> int | None:
    """The longest sequence a BERT / XLM-R config can embed (RoBERTa positions start after the pad index)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and getattr(config, "model_type", "") in ("roberta", "xlm-roberta"):
        limit -= (config.pad_token_id or 0) + 1
    return limit


def max_length_for(model: str, requested: int | None, default: int) -> int:
    """``requested``, or ``default`` capped at the model's positions; a longer request is refused up front
    (it would fail deep in the embeddings)."""
    limit = position_limit(load_config(model))
    if requested is None:
        return min(default, limit or default)
    if limit is not None and requested > limit:
        raise ValueError(f"max_length {requested} is longer than the model's {limit} positions")
    return requested


def backbone_dtype_for(name, device=None) -> torch.dtype | None:
    """The dtype to keep the frozen backbone in (None: leave it float32). ``"auto"`` is bfloat16 on a GPU that
    has it, float32 elsewhere: the fast path; adapters keep float32 master weights either way. ``device=None``
    only checks the name."""
    if name == "auto":
        dev = torch.device(device) if device is not None else None
        if dev is not None and dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if name in (None, "", "float32", "fp32", torch.float32):
        return None
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if isinstance(name, torch.dtype):
        return name
    if name not in table:
        raise ValueError(f"backbone dtype {name!r}: choose auto, float32, bfloat16 or float16")
    return table[name]


@torch.no_grad()
def base_fingerprint(model) -> str:
    """sha256 over name, shape and a strided sample (<= 4096 values, as float32) of every backbone parameter
    (embeddings and encoder; adapters and the pooler excluded). Compute it before casting the backbone."""
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


def wired_model(auto_class: str, name: str, backend: str | None, **kwargs):
    """``(model, madx, base fingerprint)``: the HF model from ``name`` with MAD-X wired in."""
    model = load_model(auto_class, name, **kwargs)
    fingerprint = base_fingerprint(model)
    return model, add_madx(model, backend=backend), fingerprint


def place(model, madx, backbone_dtype: str, device: torch.device) -> torch.dtype | None:
    """Cast the frozen backbone (adapters and task head stay float32) and move the model to ``device``;
    returns the backbone dtype (None: float32)."""
    dtype = backbone_dtype_for(backbone_dtype, device)
    if dtype is not None:
        madx.cast_backbone(dtype)
    model.to(device)
    return dtype


def compile_encoder(model, backend: str | bool | None) -> None:
    """``--compile``: torch.compile the model's encoder (embeddings, layers, MAD-X adapters and NICE, whose ops
    are custom ops with fake implementations) in place, as one graph (``fullgraph``: a graph break is an error,
    not a silent slow path). In place (``nn.Module.compile``), so parameter names, state dicts, checkpoints and
    DDP see the same module. The heads and the masked-LM loss (chunked over a data-dependent number of rows)
    stay eager. Shapes that change from batch to batch (sequence lengths) are compiled once more as dynamic
    shapes, then reused: no recompilation per step."""
    if not backend:
        return
    find_parts(model).base.compile(backend="inductor" if backend is True else backend, fullgraph=True)


def param_counts(madx, names) -> dict:
    """``base_parameters`` and, per adapter, ``adapter_parameters[name]`` and its percent of the base."""
    adapter_ids = {id(p) for n in madx.configs for p in madx.adapter_parameters(n)}
    base = sum(p.numel() for p in madx.parts.base.parameters() if id(p) not in adapter_ids)
    out = {"base_parameters": base}
    for n in names:
        k = madx.num_parameters(n)
        out[f"adapter_parameters[{n}]"] = k
        out[f"adapter_percent_of_base[{n}]"] = 100.0 * k / base
    return out
