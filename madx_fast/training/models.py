"""Base models and their tokenizers: how every stage, transfer and predict load, check, wire, cast, place and
compile the model they work on (the device itself: ``devices.py``).

    tok = load_tokenizer(name, need_mask=True)            # a fast tokenizer, checked (a pad token, see below)
    max_length = max_length_for(name, requested, default) # within the model's position table
    objective, auto_class, kwargs = language_model_class(name, objective=None)  # "causal" for GPT-2 / Llama
    check_model_class("AutoModelForMultipleChoice", name, "the copa task")  # refused where HF has no such class
    model, madx, fingerprint = wired_model("AutoModelForMaskedLM", name, backend)
    dtype = place(model, madx, "auto", device)            # bf16 backbone on a GPU, fp32 adapters; .to(device)
    compile_encoder(model, "inductor")                    # --compile: the encoder runs as a compiled graph

The *base fingerprint* hashes a fixed sample of every backbone weight (taken before any cast): an adapter
trained on one base model is refused on another of the same shape (a different checkpoint), before any work.

Tokenizers of every family load the same way: one without a pad token (GPT-2, Llama, Mistral) pads with its
end-of-text token (padding is masked out and never a target, so its id does not matter); a byte-level BPE
(GPT-2, RoBERTa) loads with ``add_prefix_space=True``, so that words given one by one (NER) are tokenized as in
running text. Batches are padded on the right by madx_fast itself (a causal model's real tokens never attend
to padding after them), so the tokenizer's ``padding_side`` is not used; only ``input_ids`` and
``attention_mask`` reach the model (no ``token_type_ids``, which DistilBERT and decoders do not take).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re

import torch

from ..model import add_madx, hub
from ..model.lm_heads import pretraining_objective
from ..model.wiring import SUPPORTED_MODEL_TYPES, find_parts
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
    tok = _tokenizer(name)
    if _byte_level_without_prefix_space(tok):
        tok = _tokenizer(name, add_prefix_space=True)
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
        log.info("the tokenizer of %s has no pad token: padding with %r (masked out, never a target)", name,
                 tok.eos_token)
    check_tokenizer(tok, need_mask=need_mask)
    if model is not None:
        vocab = getattr(load_config(model), "vocab_size", None)
        if vocab is not None and len(tok) > vocab:
            raise DataError(f"the tokenizer {name!r} has {len(tok)} tokens but the model {model!r} embeds only "
                            f"{vocab}: they do not belong together (pass the model's own tokenizer)")
    return tok


def _tokenizer(name: str, **kwargs):
    from transformers import AutoTokenizer
    return from_pretrained(AutoTokenizer.from_pretrained, name, "the tokenizer of", directory="tokenizer directory",
                           **kwargs)


def _byte_level_without_prefix_space(tok) -> bool:
    """A byte-level BPE pre-tokenizer (GPT-2, RoBERTa) without ``add_prefix_space``: it refuses words given one
    by one (transformers 4.x) or joins them without their spaces (5.x)."""
    if getattr(tok, "add_prefix_space", None) is not False:
        return False
    try:
        todo = [json.loads(tok.backend_tokenizer.pre_tokenizer.__getstate__())]
    except Exception:  # noqa: BLE001 - no pre-tokenizer, or one that does not serialize: nothing to change
        return False
    while todo:
        state = todo.pop()
        if state.get("type") == "ByteLevel" and not state.get("add_prefix_space", False):
            return True
        todo.extend(state.get("pretokenizers") or [])
    return False


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
    """The longest sequence a config can embed (RoBERTa / XLM-R positions start after the pad index)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "xlm-roberta-xl"):
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


# The HF Auto class a language adapter's model is built with, per objective.
LM_AUTO_CLASSES = {"masked": "AutoModelForMaskedLM", "causal": "AutoModelForCausalLM"}


def language_model_class(name: str, objective: str | None = None) -> tuple[str, str, dict]:
    """``(objective, HF Auto class, from_pretrained keywords)`` of the model a language adapter trains on:
    ``objective`` None takes the one the model was pretrained with (``lm_heads.pretraining_objective``:
    causal for GPT-2 / Llama / Mistral, masked for the encoders). An encoder trained with the causal
    objective is loaded as a decoder (``is_decoder=True``: each position attends to earlier ones only, else
    it would see the token it predicts). Reads the config only."""
    config = load_config(name)
    model_type = getattr(config, "model_type", None)
    own = pretraining_objective(config)
    objective = objective or own
    if objective not in LM_AUTO_CLASSES:
        what = "an encoder-decoder" if own == "seq2seq" else "not a language model"
        raise ValueError(f"{name!r} ({model_type}) is {what}: a language adapter trains with the masked-LM or "
                         f"causal-LM objective ({' or '.join(LM_AUTO_CLASSES)})")
    check_model_class(LM_AUTO_CLASSES[objective], name, f"the {objective} objective",
                      hint=f"; train its language adapter with --objective {own}" if own in LM_AUTO_CLASSES else "")
    kwargs = {"is_decoder": True} if objective == "causal" and own == "masked" else {}
    return objective, LM_AUTO_CLASSES[objective], kwargs


def check_model_class(auto_class: str, name: str, purpose: str | None = None, *, hint: str = "") -> None:
    """Refuse ``name`` (reading its config only) when transformers has no ``auto_class`` class for its model
    type (``AutoModelForMultipleChoice`` on Llama, ``AutoModelForMaskedLM`` on GPT-2, ...)."""
    from transformers.models.auto import modeling_auto

    if not auto_class.startswith("AutoModelFor"):
        return  # a concrete class (a head's own): loading it says whether it exists
    head = auto_class.removeprefix("AutoModelFor")
    mapping = getattr(modeling_auto, f"MODEL_FOR_{re.sub(r'(?<=[a-z])(?=[A-Z])', '_', head).upper()}_MAPPING_NAMES",
                      None)
    model_type = getattr(load_config(name), "model_type", None)
    if mapping is not None and model_type not in mapping:
        families = ", ".join(sorted(t for t in mapping if t in SUPPORTED_MODEL_TYPES)) or "none"
        raise ValueError(f"transformers has no {model_type} model for {auto_class} (no {model_type} ...For{head} "
                         f"class), so {purpose or auto_class} cannot run on {name!r} (families madx_fast wires that "
                         f"have one: {families}){hint}")


def wired_model(auto_class: str, name: str, backend: str | None, **kwargs):
    """``(model, madx, base fingerprint)``: the HF model from ``name`` with MAD-X wired in."""
    check_model_class(auto_class, name)
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
