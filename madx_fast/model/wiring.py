"""Where MAD-X plugs into a Hugging Face BERT / XLM-R model, and the modules that replace HF's there.

Three places, found by attribute (the same in transformers 4.57 and 5.x):

* ``encoder.layer[i].output`` (``BertOutput`` / ``XLMRobertaOutput``: dense -> dropout -> LN(. + a)) is
  replaced by ``MadxFFNOutput``, which reuses the same ``dense``, ``dropout`` and ``LayerNorm`` modules (so
  the state-dict keys of the backbone do not change) and adds ``adapters.{name}``: the AdapterHub key
  ``{prefix}.encoder.layer.{i}.output.adapters.{name}.adapter_down.0.weight`` falls out of the module tree.
* ``embeddings.dropout`` (the last op of the embeddings: LN -> dropout) becomes ``DropoutThenInvertible``:
  the NICE forward of the first active adapter runs on the embedding output.
* the masked-LM head's LayerNorm (``lm_head.layer_norm`` for XLM-R/RoBERTa,
  ``cls.predictions.transform.LayerNorm`` for BERT) becomes ``LayerNormThenInverse``: the NICE inverse runs
  after dense -> GELU -> LN and before the tied decoder, in the plain HF ``...ForMaskedLM`` classes.

The invertible adapters live in ``{prefix}.invertible_adapters.{name}`` (a ModuleDict on the base model),
again AdapterHub's key names. All replaced modules share one ``MadxState`` (a plain object, not a module)
holding the active setup as a tuple of names (and at most one ``PerRow`` of per-row adapters, run by
``per_row.py`` with the row -> adapter ids of ``MadxState.row_groups``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import per_row
from .stack import PerRow

SUPPORTED_MODEL_TYPES = ("xlm-roberta", "roberta", "bert")


class MadxState:
    """What every wired module reads on each forward: the active setup (a tuple of adapter names or a
    ``PerRow``, first = the one whose invertible adapter runs), the invertible adapters (owned by the base
    model) and, for a PerRow setup, the group id of each row of the batch (a device tensor, or None)."""

    def __init__(self, invertible: nn.ModuleDict):
        self.active: tuple[str | PerRow, ...] = ()
        self.invertible = invertible
        self.row_groups: torch.Tensor | None = None


def active_layer_adapters(adapters: nn.ModuleDict, state: MadxState, layer: int) -> list:
    """The adapters one layer applies, in stack order: callables ``(x, residual) -> y``."""
    out = []
    for entry in state.active:
        if isinstance(entry, PerRow):
            adapter = per_row.layer_adapter(adapters, entry, state, layer)
            if adapter is not None:
                out.append(adapter)
        elif entry in adapters:
            out.append(adapters[entry])
    return out


def first_invertible(state: MadxState, x: torch.Tensor, inverse: bool) -> torch.Tensor:
    """The invertible adapter (or its inverse) of the first adapter of the setup, if it has one."""
    active = state.active
    if not active:
        return x
    first = active[0]
    if isinstance(first, PerRow):
        return per_row.invertible(state, first, x, inverse)
    if first in state.invertible:
        inv = state.invertible[first]
        return inv.inverse(x) if inverse else inv(x)
    return x


def pfeiffer_adapter_stack(f: torch.Tensor, a: torch.Tensor, layer_norm: nn.Module, adapters) -> torch.Tensor:
    """MAD-X ("Pfeiffer") placement at the FFN output, for a stack of adapters (docs/spec.md):

        y0 = f;   y_k = y_{k-1} + A_k(LN(y_{k-1} + a));   out = LN(y_K + a)

    ``f`` = FFN output (after dropout), ``a`` = attention block output, ``LN`` = the layer's own output
    LayerNorm (applied once per adapter to build its input, and once at the end). No adapter: ``LN(f + a)``.
    """
    y = f
    for adapter in adapters:
        x = layer_norm(y + a)
        # Under autocast LN returns float32 while f is bf16: the residual takes the adapter input's dtype
        # (a lossless upcast), which the fused op requires.
        y = adapter(x, y if y.dtype == x.dtype else y.to(x.dtype))
    return layer_norm(y + a)


class MadxFFNOutput(nn.Module):
    """Drop-in for HF ``BertOutput`` / ``XLMRobertaOutput`` with MAD-X adapters. ``forward(hidden_states,
    input_tensor)`` has HF's signature; the backbone submodules are HF's own objects."""

    def __init__(self, original: nn.Module, state: MadxState, layer_idx: int):
        super().__init__()
        self.dense = original.dense
        self.dropout = original.dropout
        self.LayerNorm = original.LayerNorm
        self.adapters = nn.ModuleDict()
        self.layer_idx = layer_idx
        self._madx = state
        self.train(original.training)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        f = self.dropout(self.dense(hidden_states))
        adapters = active_layer_adapters(self.adapters, self._madx, self.layer_idx)
        return pfeiffer_adapter_stack(f, input_tensor, self.LayerNorm, adapters)

    def extra_repr(self):
        return f"layer={self.layer_idx}"


class DropoutThenInvertible(nn.Dropout):
    """The embeddings' final dropout followed by the NICE forward of the first active adapter (if it has one):
    ``h0 = NICE_lang(Dropout(LN_emb(E)))``."""

    def __init__(self, original: nn.Dropout, state: MadxState):
        super().__init__(p=original.p, inplace=original.inplace)
        self._madx = state
        self.train(original.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return first_invertible(self._madx, super().forward(x), inverse=False)


class LayerNormThenInverse(nn.LayerNorm):
    """The masked-LM head's LayerNorm followed by the NICE inverse of the first active adapter (if it has one):
    ``logits = Decoder(NICE_lang^-1(LN_head(GELU(W_h h + b_h))))``. Shares HF's weight and bias Parameters."""

    def __init__(self, original: nn.LayerNorm, state: MadxState):
        super().__init__(original.normalized_shape, eps=original.eps, elementwise_affine=original.elementwise_affine,
                         bias=original.bias is not None, device="meta")
        if original.elementwise_affine:
            self.weight = original.weight
            self.bias = original.bias
        self._madx = state
        self.train(original.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return first_invertible(self._madx, super().forward(x), inverse=True)


# --------------------------------------------------------------------------------------------------------
# Finding the parts of a model
# --------------------------------------------------------------------------------------------------------
@dataclass
class MaskedLMHead:
    """The pieces of a masked-LM head the fused loss needs. ``transform`` maps hidden states to decoder
    inputs (dense -> GELU -> LN -> NICE^-1, the LN being our wrapper); ``decoder`` is the tied Linear."""

    parent: nn.Module  # the module holding the LayerNorm attribute
    ln_attr: str
    decoder_parent: nn.Module  # holds ``.decoder``: read on use, as resize_token_embeddings replaces it
    root_name: str  # top-level attribute of the model that holds the head ("lm_head" / "cls")
    gelu: Callable | None = None  # XLM-R style head (dense, gelu, layer_norm); None: ``parent`` is the transform

    @property
    def decoder(self) -> nn.Linear:
        return self.decoder_parent.decoder

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        if self.gelu is None:
            return self.parent(h)
        return self.parent.layer_norm(self.gelu(self.parent.dense(h)))


@dataclass
class ModelParts:
    base: nn.Module
    prefix: str  # "roberta" / "bert": AdapterHub's key prefix
    model_type: str
    hidden_size: int
    num_layers: int
    layers: nn.ModuleList
    embeddings: nn.Module
    mlm_head: MaskedLMHead | None

    @property
    def is_masked_lm(self) -> bool:
        return self.mlm_head is not None


def _require(obj, path: str, what: str):
    cur = obj
    for attr in path.split("."):
        if not hasattr(cur, attr):
            raise TypeError(f"{what}: {type(obj).__name__} has no '{path}' (stopped at '{attr}'); madx_fast wires "
                            f"BERT / RoBERTa / XLM-R encoders ({', '.join(SUPPORTED_MODEL_TYPES)})")
        cur = getattr(cur, attr)
    return cur


def find_parts(model: nn.Module) -> ModelParts:
    """Locate encoder layers, embeddings and (if any) the masked-LM head of an HF BERT / XLM-R model."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(f"model type {model_type!r} ({type(model).__name__}) is not supported; madx_fast wires "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)} models")
    prefix = getattr(model, "base_model_prefix", None) or ""
    base = getattr(model, prefix, model) if prefix else model
    layers = _require(base, "encoder.layer", "encoder layers")
    for i, layer in enumerate(layers):
        out = layer.output
        if not isinstance(out, MadxFFNOutput):
            for attr in ("dense", "dropout", "LayerNorm"):
                _require(out, attr, f"FFN output of layer {i}")
    embeddings = _require(base, "embeddings", "embeddings")
    _require(embeddings, "dropout", "embeddings")
    return ModelParts(base=base, prefix=prefix, model_type=model_type, hidden_size=config.hidden_size,
                      num_layers=len(layers), layers=layers, embeddings=embeddings, mlm_head=_find_mlm_head(model))


def _module_gelu(module: nn.Module):
    """The GELU the HF module's own forward calls (``gelu`` in its modeling file), exact GELU otherwise."""
    return getattr(sys.modules.get(type(module).__module__), "gelu", None) or F.gelu


def _find_mlm_head(model: nn.Module) -> MaskedLMHead | None:
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None and all(hasattr(lm_head, a) for a in ("dense", "layer_norm", "decoder")):
        return MaskedLMHead(lm_head, "layer_norm", lm_head, "lm_head", gelu=_module_gelu(lm_head))
    cls = getattr(model, "cls", None)
    predictions = getattr(cls, "predictions", None)
    if predictions is not None and hasattr(predictions, "transform") and hasattr(predictions, "decoder"):
        _require(predictions, "transform.LayerNorm", "masked-LM head")
        return MaskedLMHead(predictions.transform, "LayerNorm", predictions, "cls")
    return None


# --------------------------------------------------------------------------------------------------------
# Patching and un-patching
# --------------------------------------------------------------------------------------------------------
def wire(parts: ModelParts, state: MadxState) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace the three kinds of modules; returns ``(parent, attribute, original)`` to undo it."""
    undo = []
    for i, layer in enumerate(parts.layers):
        if not isinstance(layer.output, MadxFFNOutput):
            undo.append((layer, "output", layer.output))
            layer.output = MadxFFNOutput(layer.output, state, i)
    emb = parts.embeddings
    if not isinstance(emb.dropout, DropoutThenInvertible):
        undo.append((emb, "dropout", emb.dropout))
        emb.dropout = DropoutThenInvertible(emb.dropout, state)
    head = parts.mlm_head
    if head is not None:
        ln = getattr(head.parent, head.ln_attr)
        if not isinstance(ln, LayerNormThenInverse):
            undo.append((head.parent, head.ln_attr, ln))
            setattr(head.parent, head.ln_attr, LayerNormThenInverse(ln, state))
    return undo


def unwire(undo: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, attr, original in reversed(undo):
        setattr(parent, attr, original)
