"""Where MAD-X plugs into a Hugging Face model, and the pieces wired in there.

One ``Backbone`` entry per model family says where (paths found by attribute, the same in transformers 4.57
and 5.x), placing the adapters exactly where AdapterHub 1.3 places them for that family:

* the bottleneck adapters at the output of every layer's feed-forward block, in one of two ways:
  - post-LayerNorm encoders whose FFN output is a module ``dense -> dropout -> LN(. + a)`` (BERT, RoBERTa,
    XLM-R, DeBERTa-v2): ``layer.output`` is replaced by ``MadxFFNOutput``, which reuses HF's ``dense``,
    ``dropout`` and ``LayerNorm`` (the backbone's state-dict keys do not change) and holds the adapters;
    ``layer.intermediate`` (``act(dense(x))``) by ``MadxIntermediate``, which reuses HF's ``dense`` and
    activation and, for inference where the adapters run fused, runs both as one GEMM (activation epilogue);
  - every other family (DistilBERT; the pre-LayerNorm XLM-R XL, GPT-2, Llama, Mistral): hooks on HF's own
    modules (a forward hook on the FFN block's output, and a pre-hook taking the residual stream where the
    block begins), with the adapters in a new ``layer.output_adapters`` module (``MadxAdapterSlot``);
* the NICE forward of the first active adapter on the embedding output (a forward hook on the module
  AdapterHub hooks: ``embeddings``, GPT-2's ``drop``, Llama's ``embed_tokens``);
* the NICE inverse just before the vocabulary projection of a masked-LM or causal-LM head (a pre-hook on the
  projection, tied to the word embeddings or not; ``lm_heads.py`` finds it).

Adapter parameters sit under AdapterHub's key names (``{prefix}.encoder.layer.{i}.output.adapters.{name}.*``,
``{prefix}.layers.{i}.output_adapters.adapters.{name}.*``, ``{prefix}.invertible_adapters.{name}.*``), so
AdapterHub's saved weights load by key. All wired pieces share one ``MadxState`` (a plain object, not a module)
holding the active setup as a tuple of names (and at most one ``PerRow`` of per-row adapters, run by
``per_row.py`` with the row -> adapter ids of ``MadxState.row_groups``; ``Average`` blocks, run by
``average.py``). Hooks are small picklable objects
holding the state, so a wired model pickles and deep-copies with its wiring.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..ops import dispatch
from ..ops.add_norm import fused_available as fused_add_norm_available
from ..ops.dense import fused_available as fused_dense_available
from . import average, per_row
from .lm_heads import LMHead, find_lm_head
from .stack import Average, PerRow


@dataclass(frozen=True)
class Backbone:
    """Where MAD-X goes in one model family (paths relative to the base model, or to one layer).

    ``output``: the layer's post-LN FFN output module that ``MadxFFNOutput`` replaces, and ``intermediate``
    the FFN's first half ``act(dense(x))`` that ``MadxIntermediate`` replaces; otherwise ``ffn`` (the
    module whose output is the FFN block's output f), ``residual`` (the module whose first input is the
    residual stream a the block adds back; None: ``ffn``'s own input) and ``layer_norm`` (post-LN: the layer's
    LayerNorm, applied to each adapter's input as LN(y + a); None for pre-LN blocks, where the input is y + a).
    """

    model_types: tuple[str, ...]
    layers: str
    embeddings: str
    output: str | None = None
    intermediate: str | None = None
    ffn: str | None = None
    residual: str | None = None
    layer_norm: str | None = None

    @property
    def slot(self) -> str:
        """The layer attribute holding the adapters (its ``adapters`` ModuleDict): AdapterHub's module name."""
        return self.output or "output_adapters"


BACKBONES = (
    Backbone(("xlm-roberta", "roberta", "bert", "deberta-v2"), layers="encoder.layer", embeddings="embeddings",
             output="output", intermediate="intermediate"),
    Backbone(("distilbert",), layers="transformer.layer", embeddings="embeddings", ffn="ffn",
             layer_norm="output_layer_norm"),
    Backbone(("xlm-roberta-xl",), layers="encoder.layer", embeddings="embeddings", ffn="output.dense",
             residual="LayerNorm"),
    Backbone(("gpt2",), layers="h", embeddings="drop", ffn="mlp", residual="ln_2"),
    Backbone(("llama", "mistral"), layers="layers", embeddings="embed_tokens", ffn="mlp",
             residual="post_attention_layernorm"),
)
SUPPORTED_MODEL_TYPES = tuple(t for b in BACKBONES for t in b.model_types)


def backbone_for(model_type: str | None) -> Backbone | None:
    return next((b for b in BACKBONES if model_type in b.model_types), None)


class MadxState:
    """What every wired piece reads on each forward: the active setup (a tuple of adapter names, ``Average``
    blocks or a ``PerRow``, first = the one whose invertible adapter runs), the invertible adapters (owned by
    the base model), for a PerRow setup the group id of each row of the batch (a device tensor, or None), and
    the device tensors of the Averages' constant coefficients (``average.py``; kept for as long as the model:
    a CUDA graph captured with one keeps reading it, whatever setups come and go)."""

    def __init__(self, invertible: nn.ModuleDict):
        self.active: tuple[str | PerRow | Average, ...] = ()
        self.invertible = invertible
        self.row_groups: torch.Tensor | None = None
        self.mixes: dict = {}


def active_layer_adapters(adapters: nn.ModuleDict, state: MadxState, layer: int) -> list:
    """The adapters one layer applies, in stack order: callables ``(x, residual) -> y``."""
    out = []
    for entry in state.active:
        if isinstance(entry, (PerRow, Average)):
            if isinstance(entry, Average):
                adapter = average.layer_adapter(adapters, entry, state, layer)
            elif average.has_average(entry):
                adapter = average.per_row_layer_adapter(adapters, entry, state, layer)
            else:
                adapter = per_row.layer_adapter(adapters, entry, state, layer)
            if adapter is not None:
                out.append(adapter)
        elif entry in adapters:
            out.append(adapters[entry])
    return out


def first_invertible(state: MadxState, x: torch.Tensor, inverse: bool) -> torch.Tensor:
    """The invertible adapter (or its inverse) of the first adapter of the setup, if it has one (of an Average:
    its first adapter's, as AdapterHub)."""
    active = state.active
    if not active:
        return x
    first = active[0]
    if isinstance(first, PerRow):
        return per_row.invertible(state, first, x, inverse)
    if isinstance(first, Average):
        first = first.first()
    if first in state.invertible:
        inv = state.invertible[first]
        return inv.inverse(x) if inverse else inv(x)
    return x


def adapter_stack(f: torch.Tensor, a: torch.Tensor, layer_norm: nn.Module | None, adapters) -> torch.Tensor:
    """MAD-X ("Pfeiffer") placement at the FFN output, for a stack of adapters (docs/spec.md), before the
    block's own residual add:

        y0 = f;   y_k = y_{k-1} + A_k(N(y_{k-1} + a))       (returns y_K)

    ``f`` = FFN output (after dropout), ``a`` = the residual stream the block adds back, ``N`` = the layer's
    output LayerNorm for post-LN blocks (which then compute ``LN(y_K + a)``), the identity for pre-LN blocks
    (which compute ``y_K + a``): AdapterHub's ``residual_before_ln=True``, ``original_ln_before=True``."""
    y = f
    for adapter in adapters:
        x = y + a if layer_norm is None else add_norm(y, a, layer_norm, adapter)
        # Under autocast LN returns float32 while f is bf16: the residual takes the adapter input's dtype
        # (a lossless upcast), which the fused op requires.
        y = adapter(x, y if y.dtype == x.dtype else y.to(x.dtype))
    return y


def pfeiffer_adapter_stack(f: torch.Tensor, a: torch.Tensor, layer_norm: nn.Module, adapters) -> torch.Tensor:
    """``LN(adapter_stack(f, a, LN, adapters) + a)``: a post-LN layer's output. No adapter: ``LN(f + a)``."""
    if not adapters:
        return layer_norm(f + a)
    return add_norm(adapter_stack(f, a, layer_norm, adapters), a, layer_norm, adapters[-1])


# Where the fused backbone ops (add + LayerNorm, and the FFN intermediate's Linear + activation) pay. A
# custom-op call costs more host time than the eager ops it replaces (the add + LayerNorm: about 37 us against
# 12 us on a CPU core, plus a Triton launch) and saves a few passes over memory on the device (two of the add
# + LayerNorm's five; the intermediate's separate activation pass). So they run where the device sets the pace:
# inside a CUDA graph being captured (its host cost is paid once), under torch.compile (traced once), and on
# inputs of at least this many elements, where a step is device-bound even replayed eagerly (the roofline,
# docs/benchmarks.md: 256 x 128 tokens at H = 768, 25M elements, are; 32 x 128, 3M, and an MLM batch of
# 64 x 256, 13M, are not).
FUSED_ADD_NORM_MIN_ELEMENTS = 1 << 24


def _fusion_pays(y: torch.Tensor) -> bool:
    return y.numel() >= FUSED_ADD_NORM_MIN_ELEMENTS or torch.compiler.is_compiling() or dispatch.capturing()


def add_norm(y: torch.Tensor, a: torch.Tensor, layer_norm: nn.Module, adapter) -> torch.Tensor:
    """``layer_norm(y + a)``, in one kernel (``ops.add_layer_norm``) where ``adapter``'s op runs fused (the
    same backend decision), the fusion pays (``FUSED_ADD_NORM_MIN_ELEMENTS``) and the module is a plain
    ``nn.LayerNorm`` over the last dimension without hooks; otherwise (eager backend, autocast, mixed dtypes,
    another norm, a host-bound call) the module itself, as AdapterHub."""
    if (_fusion_pays(y) and type(layer_norm).forward is nn.LayerNorm.forward and len(layer_norm.normalized_shape) == 1
            and not (layer_norm._forward_hooks or layer_norm._forward_pre_hooks) and y.dtype == a.dtype
            and y.shape == a.shape and not _autocasting(y.device)
            and fused_add_norm_available(y, getattr(adapter, "backend", None))):
        return ops.add_layer_norm(y, a, layer_norm.weight, layer_norm.bias, layer_norm.eps,
                                  backend=getattr(adapter, "backend", None))
    return layer_norm(y + a)


def _autocasting(device: torch.device) -> bool:
    """Autocast changes LayerNorm's output dtype (float32): then the module runs, as under autocast it must."""
    if device.type not in ("cpu", "cuda"):
        return torch.is_autocast_enabled()  # the meta device has no autocast state of its own
    return torch.is_autocast_enabled(device.type)


class MadxFFNOutput(nn.Module):
    """Drop-in for HF ``BertOutput`` / ``XLMRobertaOutput`` / ``DebertaV2Output`` with MAD-X adapters.
    ``forward(hidden_states, input_tensor)`` has HF's signature; the backbone submodules are HF's own objects."""

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


def _activation_name(act: nn.Module) -> str | None:
    """The madx_fast name (``reference.ACTIVATIONS``) of an FFN activation module that the fused epilogue
    computes exactly as the module does, or None: transformers' ``GELUActivation`` (``hidden_act="gelu"``,
    exact erf GELU through ``F.gelu``, in transformers 4.57 and 5.x) and torch's ``nn.GELU``. Anything else
    (a hub kernel or the Python GELU, another activation, hooks) keeps the module."""
    if act._forward_hooks or act._forward_pre_hooks:
        return None
    if type(act).forward is nn.GELU.forward:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    from transformers.activations import GELUActivation  # here: the wiring works on HF models only
    if type(act).forward is GELUActivation.forward and getattr(act, "act", None) is torch.nn.functional.gelu:
        return "gelu"
    return None


def dense_activation(x: torch.Tensor, dense: nn.Module, act: nn.Module, adapters) -> torch.Tensor:
    """``act(dense(x))``, in one GEMM with the activation in its epilogue (``ops.dense_activation``) where no
    gradient is needed (the op has no backward), the layer's first adapter's op runs fused (the same backend
    decision as ``add_norm``), the fusion pays (``FUSED_ADD_NORM_MIN_ELEMENTS``), ``dense`` is a plain
    ``nn.Linear`` without hooks in x's dtype, the activation is one the epilogue computes
    (``_activation_name``) and autocast is off; otherwise the modules themselves, as HF."""
    backend = getattr(adapters[0], "backend", None) if adapters else None
    if (adapters and _fusion_pays(x) and type(dense).forward is nn.Linear.forward
            and not (dense._forward_hooks or dense._forward_pre_hooks) and x.dtype == dense.weight.dtype
            and (dense.bias is None or dense.bias.dtype == x.dtype) and not _needs_grad(x, dense)
            and not _autocasting(x.device) and fused_dense_available(x, backend)):
        name = _activation_name(act)
        if name is not None:
            return ops.dense_activation(x, dense.weight, dense.bias, name, backend=backend)
    return act(dense(x))


def _needs_grad(x: torch.Tensor, dense: nn.Module) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, dense.weight, dense.bias))


class MadxIntermediate(nn.Module):
    """Drop-in for HF ``BertIntermediate`` / ``XLMRobertaIntermediate`` (``act(dense(x))``), fused for
    inference where it pays (``dense_activation``). ``dense`` and ``intermediate_act_fn`` are HF's own objects
    (the state-dict keys do not change); the layer's adapters are read from its ``MadxFFNOutput``."""

    def __init__(self, original: nn.Module, output: MadxFFNOutput):
        super().__init__()
        self.dense = original.dense
        self.intermediate_act_fn = original.intermediate_act_fn
        self._output = [output]  # a list: the output module (with the adapters) is not registered twice
        self.train(original.training)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self._output[0]
        wanted = out._madx.active and _fusion_pays(hidden_states)  # else no adapter is looked up (host time)
        adapters = active_layer_adapters(out.adapters, out._madx, out.layer_idx) if wanted else []
        return dense_activation(hidden_states, self.dense, self.intermediate_act_fn, adapters)

    def extra_repr(self):
        return f"layer={self._output[0].layer_idx}"


def _wires_intermediate(module: nn.Module | None) -> bool:
    """An HF FFN intermediate ``act(dense(x))`` (BERT, RoBERTa, XLM-R, DeBERTa-v2), not yet wired."""
    return (module is not None and not isinstance(module, MadxIntermediate)
            and type(module).__name__.endswith("Intermediate")
            and isinstance(getattr(module, "dense", None), nn.Linear)
            and isinstance(getattr(module, "intermediate_act_fn", None), nn.Module))


class MadxAdapterSlot(nn.Module):
    """The adapters of one layer of a hook-wired family (``layer.output_adapters``, AdapterHub's name). Its
    hooks run them: ``ResidualHook`` keeps the residual stream a where the FFN block begins, ``FFNOutputHook``
    turns the block's output f into ``adapter_stack(f, a, ...)``."""

    def __init__(self, state: MadxState, layer_idx: int, layer_norm: nn.Module | None):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.layer_idx = layer_idx
        self._madx = state
        self._layer_norm = [layer_norm]  # a list: HF's LayerNorm is not registered (or saved) twice
        self._residual: torch.Tensor | None = None

    def extra_repr(self):
        return f"layer={self.layer_idx}"


class ResidualHook:
    """Forward pre-hook on the module whose first input is the residual stream (a pre-LN block's norm)."""

    def __init__(self, slot: MadxAdapterSlot):
        self.slot = slot

    def __call__(self, module, args):
        self.slot._residual = args[0]


class FFNOutputHook:
    """Forward hook on the module whose output is the FFN block's output f: returns ``adapter_stack(f, a)``
    with a from ``ResidualHook`` (or, with none, the module's own input). Releases a at once."""

    def __init__(self, slot: MadxAdapterSlot, own_input: bool):
        self.slot, self.own_input = slot, own_input

    def __call__(self, module, args, output):
        slot = self.slot
        a = args[0] if self.own_input else slot._residual
        slot._residual = None
        adapters = active_layer_adapters(slot.adapters, slot._madx, slot.layer_idx)
        if not adapters:
            return output
        if a is None:
            raise RuntimeError(f"layer {slot.layer_idx}: the FFN ran without the residual stream (the pre-hook "
                               "did not run): madx_fast cannot place the adapters")
        return adapter_stack(output, a, slot._layer_norm[0], adapters)


class InvertibleHook:
    """The NICE forward (a forward hook on the embedding output) or inverse (a forward pre-hook on the LM
    head's vocabulary projection) of the first active adapter."""

    def __init__(self, state: MadxState, inverse: bool):
        self.state, self.inverse = state, inverse

    def __call__(self, module, args, output=None):
        if self.inverse:
            return (first_invertible(self.state, args[0], inverse=True),) + tuple(args[1:])
        return first_invertible(self.state, output, inverse=False)


# --------------------------------------------------------------------------------------------------------
# Finding the parts of a model
# --------------------------------------------------------------------------------------------------------
@dataclass
class ModelParts:
    base: nn.Module
    prefix: str  # "roberta" / "bert" / "transformer" / "model": the base model prefix, AdapterHub's key prefix
    model_type: str
    backbone: Backbone
    hidden_size: int
    num_layers: int
    layers: nn.ModuleList
    embeddings: nn.Module  # the module whose output gets the NICE forward
    lm_head: LMHead | None  # a masked-LM or causal-LM head (part of the frozen backbone)

    @property
    def has_lm_head(self) -> bool:
        return self.lm_head is not None

    def slot(self, i: int) -> nn.Module:
        """The module holding layer ``i``'s adapters (``.adapters``), once wired."""
        return self.layers[i].get_submodule(self.backbone.slot)

    def hub_key(self, i: int) -> str:
        """Where AdapterHub's files keep layer ``i``'s adapters: ``{prefix}.{layers}.{i}.{slot}.adapters``."""
        return f"{self.prefix}.{self.backbone.layers}.{i}.{self.backbone.slot}.adapters"


def _require(obj, path: str, what: str):
    cur = obj
    for attr in path.split("."):
        if not hasattr(cur, attr):
            raise TypeError(f"{what}: {type(obj).__name__} has no '{path}' (stopped at '{attr}'); madx_fast wires "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)} models")
        cur = getattr(cur, attr)
    return cur


def find_parts(model: nn.Module) -> ModelParts:
    """Locate the layers, the embedding output and (if any) the LM head of a supported HF model."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    backbone = backbone_for(model_type)
    if backbone is None:
        raise TypeError(f"model type {model_type!r} ({type(model).__name__}) is not supported; madx_fast wires "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)} models")
    prefix = getattr(model, "base_model_prefix", None) or ""
    base = getattr(model, prefix, model) if prefix else model
    layers = _require(base, backbone.layers, "layers")
    for i, layer in enumerate(layers):
        if backbone.output is not None:
            if not isinstance(layer.get_submodule(backbone.output), MadxFFNOutput):
                for attr in ("dense", "dropout", "LayerNorm"):
                    _require(layer, f"{backbone.output}.{attr}", f"FFN output of layer {i}")
        else:
            for path in filter(None, (backbone.ffn, backbone.residual, backbone.layer_norm)):
                _require(layer, path, f"layer {i}")
    embeddings = _require(base, backbone.embeddings, "embeddings")
    lm_head = find_lm_head(model)
    if lm_head is not None and lm_head.decoder is None:
        raise TypeError(f"{type(model).__name__}: its LM head multiplies by the word embeddings without a "
                        "projection module (DeBERTa with legacy=False), where MAD-X cannot place the NICE inverse; "
                        "use a legacy=True head or the base model")
    return ModelParts(base=base, prefix=prefix, model_type=model_type, backbone=backbone,
                      hidden_size=config.hidden_size, num_layers=len(layers), layers=layers, embeddings=embeddings,
                      lm_head=lm_head if lm_head is not None and lm_head.objective != "seq2seq" else None)


# --------------------------------------------------------------------------------------------------------
# Wiring and unwiring
# --------------------------------------------------------------------------------------------------------
def wire(parts: ModelParts, state: MadxState) -> list[tuple]:
    """Put MAD-X's pieces in (nothing that is already there twice); returns what undoes it, in order: entries
    ``("module", parent, attribute, original)`` (a replaced or added module; original None: added) and
    ``("hook", handle)``. Plain data, so that a wired model pickles."""
    undo: list[tuple] = []
    backbone = parts.backbone
    for i, layer in enumerate(parts.layers):
        if backbone.output is not None:
            out = layer.get_submodule(backbone.output)
            if not isinstance(out, MadxFFNOutput):
                undo.append(("module", layer, backbone.output, out))
                out = MadxFFNOutput(out, state, i)
                setattr(layer, backbone.output, out)
            intermediate = getattr(layer, backbone.intermediate, None) if backbone.intermediate else None
            if _wires_intermediate(intermediate):
                undo.append(("module", layer, backbone.intermediate, intermediate))
                setattr(layer, backbone.intermediate, MadxIntermediate(intermediate, out))
        elif not isinstance(getattr(layer, backbone.slot, None), MadxAdapterSlot):
            layer_norm = layer.get_submodule(backbone.layer_norm) if backbone.layer_norm else None
            slot = MadxAdapterSlot(state, i, layer_norm).train(layer.training)
            undo.append(("module", layer, backbone.slot, None))
            setattr(layer, backbone.slot, slot)
            if backbone.residual is not None:
                residual = layer.get_submodule(backbone.residual)
                undo.append(("hook", residual.register_forward_pre_hook(ResidualHook(slot))))
            hook = FFNOutputHook(slot, own_input=backbone.residual is None)
            undo.append(("hook", layer.get_submodule(backbone.ffn).register_forward_hook(hook)))
    if not _has_hook(parts.embeddings._forward_hooks):
        undo.append(("hook", parts.embeddings.register_forward_hook(InvertibleHook(state, inverse=False))))
    if parts.lm_head is not None:
        decoder = parts.lm_head.decoder
        if not _has_hook(decoder._forward_pre_hooks):
            undo.append(("hook", decoder.register_forward_pre_hook(InvertibleHook(state, inverse=True))))
    return undo


def _has_hook(hooks) -> bool:
    return any(isinstance(h, InvertibleHook) for h in hooks.values())


def unwire(undo: list[tuple]) -> None:
    for entry in reversed(undo):
        if entry[0] == "hook":
            entry[1].remove()
        else:
            _, parent, attr, original = entry
            if original is None:
                delattr(parent, attr)
            else:
                setattr(parent, attr, original)
