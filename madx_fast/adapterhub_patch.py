"""madx_fast's fused ops under a model set up with AdapterHub's ``adapters`` library, in one call.

    import madx_fast
    report = madx_fast.patch_adapterhub(model)    # an XxxAdapterModel, or adapters.init(hf_model)
    ...                                           # train, evaluate, save_adapter: AdapterHub's API as before
    madx_fast.unpatch_adapterhub(model)           # back to AdapterHub's code, exactly

Covered model types (``COVERED_MODEL_TYPES``): every text model AdapterHub 1.3 puts bottleneck adapters on,
encoders, decoders and encoder-decoders (BERT, RoBERTa, XLM-R, X-MOD, ALBERT, DistilBERT, ELECTRA, DeBERTa,
DeBERTa-v2, BertGeneration, GPT-2, GPT-J, Llama, Mistral, T5, mT5, BART, mBART, PLBart, bert2bert
``EncoderDecoderModel``), and the models AdapterHub runs through its plugin interface (its built-in ones, e.g.
Qwen2, and one a user writes, e.g. for XLM-R XL). Vision and audio models (ViT, BEiT, CLIP, Whisper) keep
AdapterHub's code entirely; the report says so. What runs on madx_fast's code (the same function as AdapterHub
1.3, to float32 rounding):

* sequential bottleneck adapters (``seq_bn``/``pfeiffer``, ``seq_bn_inv``/``pfeiffer+inv``, ``double_seq_bn``,
  any reduction factor or per-layer mapping, the activations madx_fast supports, float scaling, dropout,
  ``residual_before_ln`` True/False/"post_add", ``original_ln_before``/``original_ln_after``), alone or in a
  flat ``Stack`` of adapter names, wherever the model places them (post-LN and pre-LN blocks, attention,
  cross-attention and FFN outputs): down projection, activation, up projection, scaling and residual in the
  fused ``madx_fast.ops.bottleneck_adapter``; ``Average`` blocks of such adapters (alone or in a Stack), with
  AdapterHub's own arithmetic (``torch.mean`` over the weighted outputs, i.e. coefficients ``w_i / n``): the
  members of one configuration in one ``madx_fast.ops.average_bottleneck_adapter``;
* NICE invertible adapters: the forward on the embedding output (the encoder's, in encoder-decoders; a
  bert2bert decoder skips it, as AdapterHub does) and the inverse where AdapterHub applies it (flex LM heads,
  on the encoder-decoder's decoder output too; before the output embeddings of plugin-interface models), on
  ``madx_fast.ops.nice_forward`` / ``nice_inverse``;
* the LM loss when ``labels`` are given: flex ``masked_lm`` / ``causal_lm`` / ``seq2seq_lm`` heads, and the HF
  ``...ForMaskedLM`` / ``...ForCausalLM`` / ``...LMHeadModel`` / ``...ForConditionalGeneration`` /
  ``EncoderDecoderModel`` classes after ``adapters.init``: the head and the vocabulary projection run only at
  the positions that have a target (the causal LM's shifted labels), through the chunked fused linear
  cross-entropy, so the ``B x L x V`` logits are never built. The output's ``logits`` is then ``None``
  (``patch_adapterhub(model, keep_lm_logits=True)`` computes them and the loss as AdapterHub does).

Everything else keeps AdapterHub's own code: Parallel / Fuse / Split / BatchSplit compositions (and Average blocks
of anything but adapter names), gating,
adapter-level LayerNorms (``ln_before`` / ``ln_after``), PHM (Compacter), learned scaling, stochastic depth,
parallel bottleneck adapters, GLOW coupling, LoRA, prefix / prompt tuning, ReFT. The decision is made at each
forward from the active setup and the adapters there, so adapters added or loaded after the patch and changes
of the active setup are covered; each part that falls back is logged once.

How: instance attributes only, no class is modified. Each ``BottleneckLayer`` gets its own
``bottleneck_layer_forward``, each module owning invertible adapters its ``invertible_adapters_forward`` (a
plugin-interface model's invertible-adapter layer its ``forward``), a flex model its ``forward_head`` (which
patches LM heads, including ones added later), LM heads their ``forward``, and an HF LM class its ``forward``
and its head modules' ``forward``. ``unpatch_adapterhub`` removes them (or puts back what was there), leaving
every module's ``__dict__`` as it was. Parameters are AdapterHub's own objects, so optimizers, ``train_adapter``,
``save_adapter`` and ``load_adapter`` see no difference.
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

try:
    import adapters
    from adapters.composition import Average, Stack
    from adapters.configuration import AdapterConfig, BnConfig, ConfigUnion
    from adapters.heads.language_modeling import BertStyleMaskedLMHead, CausalLMHead, Seq2SeqLMHead
    from adapters.methods.bottleneck import BottleneckLayer
    from adapters.methods.invertible import InvertibleAdapterLayer
    from adapters.methods.modeling import Adapter, NICECouplingBlock
    from adapters.model_mixin import InvertibleAdaptersMixin
except ImportError as exc:  # the optional dependency
    raise ImportError(
        "madx_fast.patch_adapterhub needs AdapterHub's `adapters` library (version 1.3): "
        "pip install 'madx_fast[adapterhub]'  (or: pip install 'adapters>=1.3,<1.4')"
    ) from exc

from . import ops, reference
from .backends import BACKENDS
from .model.lm_heads import find_lm_head, lm_objective
from .model.mlm_loss import lm_loss_at_labels

logger = logging.getLogger(__name__)

SUPPORTED_ADAPTERS_VERSION = (1, 3)  # the code mirrored below is adapters 1.3's
# Model types whose patched models the parity tests (tests/model/test_adapterhub_patch*.py) compare with
# AdapterHub's: every text type adapters 1.3 supports, and plugin-interface models (AdapterHub's built-in
# interfaces, and XLM-R XL through a user's).
COVERED_MODEL_TYPES = (
    "albert", "bart", "bert", "bert-generation", "deberta", "deberta-v2", "distilbert", "electra", "encoder-decoder",
    "gpt2", "gptj", "llama", "mbart", "mistral", "mt5", "plbart", "roberta", "t5", "xlm-roberta", "xmod",
    "gemma2", "gemma3_text", "modernbert", "phi", "qwen2", "qwen3", "xlm-roberta-xl",
)
VISION_AUDIO_MODEL_TYPES = ("vit", "beit", "clip", "clip_vision_model", "clip_text_model", "whisper")
_LM_HEADS = (BertStyleMaskedLMHead, CausalLMHead, Seq2SeqLMHead)
_ATTR = "_madx_fast_adapterhub"  # the patch state, on the model
_MISSING = object()


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------
@dataclass
class AdapterHubPatchReport:
    """What ``patch_adapterhub`` put on madx_fast's code (``patched``) and what stays on AdapterHub's
    (``not_patched``, each with the reason), for the model as it is at the call. Later changes (adapters added,
    another active setup) are decided at each forward and logged once when they fall back."""

    model_class: str
    backend: str
    keep_lm_logits: bool
    patched: list[str] = field(default_factory=list)
    not_patched: list[str] = field(default_factory=list)

    @property
    def fully_patched(self) -> bool:
        return not self.not_patched

    @property
    def keep_mlm_logits(self) -> bool:
        """The name ``keep_lm_logits`` had when only masked-LM losses were fused."""
        return self.keep_lm_logits

    def __str__(self) -> str:
        lines = [f"madx_fast.patch_adapterhub({self.model_class}): backend {self.backend}, "
                 f"keep_lm_logits={self.keep_lm_logits}"]
        lines += [f"  fused:          {p}" for p in self.patched]
        lines += [f"  AdapterHub's:   {p}" for p in self.not_patched]
        return "\n".join(lines)


def patch_adapterhub(model: nn.Module, *, backend: str | None = None, keep_lm_logits: bool = False,
                     keep_mlm_logits: bool = False) -> AdapterHubPatchReport:
    """Run the bottleneck adapters, NICE invertible adapters and LM loss of an AdapterHub model on madx_fast's
    fused ops, in place; returns (and logs once) a report of what was and was not patched.

    ``model``: any ``XxxAdapterModel`` (any heads), or a Hugging Face model after ``adapters.init(model)``;
    before or after adapters are added or loaded, in train or eval mode. A model type outside
    ``COVERED_MODEL_TYPES`` (vision and audio models) is left to AdapterHub entirely, and the report says so.
    ``backend``: madx_fast's op backend (None = "auto": Triton on CUDA tensors, the eager reference on CPU
    tensors unless ``TRITON_INTERPRET=1``). ``keep_lm_logits`` (or its former name ``keep_mlm_logits``): with
    labels, also compute the full ``B x L x V`` logits (and the loss from them, as AdapterHub does) instead of
    returning ``logits=None``. Calling it again on a patched model updates the options and returns a fresh report.
    """
    model_type = _check_model(model)
    if (backend or "auto").lower() not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if model_type not in COVERED_MODEL_TYPES:
        kind = "a vision / audio model" if model_type in VISION_AUDIO_MODEL_TYPES else \
            "not covered by madx_fast's parity tests"
        report = AdapterHubPatchReport(type(model).__name__, backend or "auto", bool(keep_lm_logits or keep_mlm_logits))
        report.not_patched.append(f"model type {model_type!r} ({kind}): everything runs on AdapterHub's code")
        logger.warning("%s", report)
        return report
    patch = model.__dict__.get(_ATTR)
    if patch is None:
        patch = _Patch()
        try:
            _install(model, patch)
        except BaseException:
            _undo(patch)  # a model the patch cannot take is left as it was
            raise
        model.__dict__[_ATTR] = patch
    patch.backend = backend
    patch.keep_lm_logits = bool(keep_lm_logits or keep_mlm_logits)
    _patch_heads(model, patch)
    report = _report(model, patch)
    (logger.warning if report.not_patched else logger.info)("%s", report)
    return report


def unpatch_adapterhub(model: nn.Module) -> bool:
    """Undo ``patch_adapterhub``: every patched module gets back exactly the attributes it had. Returns False
    when the model was not patched."""
    patch = model.__dict__.pop(_ATTR, None)
    if patch is None:
        return False
    _undo(patch)
    return True


# --------------------------------------------------------------------------------------------------------
# Patch state and installation
# --------------------------------------------------------------------------------------------------------
class _Patch:
    """Options, what to undo, per-module support decisions (cached by identity) and the messages logged once."""

    def __init__(self):
        self.backend: str | None = None
        self.keep_lm_logits = False
        self.undo: list[tuple[nn.Module, str, object]] = []
        self.capturing = False  # HF LM class: the head modules pass their input through (see _hf_lm_forward)
        self.captured: torch.Tensor | None = None
        self._support: dict[int, tuple[weakref.ref, str | None, str | None]] = {}
        self._logged: set[str] = set()

    def log_once(self, message: str):
        if message not in self._logged:
            self._logged.add(message)
            logger.warning("madx_fast.patch_adapterhub: %s", message)

    def support(self, module: nn.Module, check) -> tuple[str | None, str | None]:
        """``(activation, None)`` when ``module`` runs on the fused ops, ``(None, reason)`` otherwise."""
        entry = self._support.get(id(module))
        if entry is None or entry[0]() is not module:
            entry = (weakref.ref(module), *check(module))
            self._support[id(module)] = entry
        return entry[1], entry[2]


class _Override:
    """An instance attribute standing in for a method: calls ``impl(module, original, patch, *args, **kwargs)``.

    ``__wrapped__`` makes ``inspect.signature`` report the original's signature (HF's Trainer reads the model's
    forward signature to pick the batch columns). A plain object rather than a closure, so that
    ``copy.deepcopy(model)`` gives a copy whose overrides call into the copy."""

    def __init__(self, module, impl, original, patch):
        self.module, self.impl, self.original, self.patch = module, impl, original, patch
        self.__wrapped__ = original

    def __call__(self, *args, **kwargs):
        return self.impl(self.module, self.original, self.patch, *args, **kwargs)


def _undo(patch: _Patch):
    for module, attr, previous in reversed(patch.undo):
        if previous is _MISSING:
            module.__dict__.pop(attr, None)
        else:
            module.__dict__[attr] = previous
    patch.undo.clear()


def _override(module: nn.Module, attr: str, impl, patch: _Patch):
    previous = module.__dict__.get(attr, _MISSING)
    original = getattr(module, attr)
    patch.undo.append((module, attr, previous))
    module.__dict__[attr] = _Override(module, impl, original, patch)


def _is_patched(module: nn.Module, attr: str) -> bool:
    return isinstance(module.__dict__.get(attr), _Override)


def _check_model(model) -> str | None:
    """The model's type, once it is known to be an AdapterHub model of the supported ``adapters`` version."""
    version = tuple(int(v) for v in adapters.__version__.split(".")[:2])
    if version != SUPPORTED_ADAPTERS_VERSION:
        raise RuntimeError(
            f"madx_fast.patch_adapterhub mirrors adapters {'.'.join(map(str, SUPPORTED_ADAPTERS_VERSION))}.x; "
            f"adapters {adapters.__version__} is installed (pip install 'madx_fast[adapterhub]')")
    if getattr(model, "adapters_config", None) is None or not hasattr(model, "base_model"):
        raise TypeError(f"{type(model).__name__} is not set up with AdapterHub's `adapters`: call "
                        "adapters.init(model) first, or use an XxxAdapterModel class such as XLMRobertaAdapterModel")
    return getattr(getattr(model, "config", None), "model_type", None)


def _install(model, patch):
    for module in model.modules():
        if isinstance(module, BottleneckLayer):
            _override(module, "bottleneck_layer_forward", _bottleneck_layer_forward, patch)
        elif isinstance(module, InvertibleAdapterLayer):  # plugin-interface models
            _override(module, "forward", _invertible_layer_forward, patch)
        # The modules that own invertible adapters (the base model, or an encoder-decoder's encoder). An instance
        # attribute is AdapterHub's own relay (EncoderDecoderModel; its decoder, which skips the forward NICE).
        if isinstance(module, InvertibleAdaptersMixin) and "invertible_adapters_forward" not in module.__dict__ \
                and hasattr(module, "invertible_adapters"):
            _override(module, "invertible_adapters_forward", _invertible_adapters_forward, patch)
    if hasattr(model, "heads") and hasattr(model, "forward_head"):
        _override(model, "forward_head", _forward_head, patch)
        return
    head = find_lm_head(model)
    if head is not None:  # HF ...ForMaskedLM / ...ForCausalLM / ...ForConditionalGeneration / EncoderDecoderModel
        for module in _captured_modules(head):
            _override(module, "forward", _hf_head_forward, patch)
        _override(model, "forward", _hf_lm_forward, patch)


def _patch_heads(model, patch):
    for head in getattr(model, "heads", {}).values() if hasattr(model, "heads") else ():
        if type(head) in _LM_HEADS and not _is_patched(head, "forward"):
            _override(head, "forward", _lm_head_forward, patch)


# --------------------------------------------------------------------------------------------------------
# Which modules the fused ops can stand in for
# --------------------------------------------------------------------------------------------------------
_PROBE = torch.linspace(-6.0, 6.0, 97, dtype=torch.float64)
_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "tanh", "leaky_relu", "identity")


def _activation_name(module: nn.Module) -> str | None:
    """The madx_fast activation a parameter-free activation module computes, found by evaluating it (float64)
    at points where every supported activation differs from the others; None when it is none of them."""
    if any(True for _ in module.parameters()):
        return None
    try:
        with torch.no_grad():
            got = module(_PROBE.clone())
    except Exception:  # noqa: BLE001 - an activation that cannot run on a float64 CPU tensor is not ours
        return None
    for name in _ACTIVATIONS:
        want = reference.activation(_PROBE, name)
        if isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got, want, rtol=1e-9,
                                                                                         atol=1e-12):
            return name
    return None


def _bottleneck_support(adapter: nn.Module) -> tuple[str | None, str | None]:
    if type(adapter) is not Adapter:
        what = "parallel bottleneck adapter (is_parallel)" if type(adapter).__name__ == "ParallelAdapter" else \
            type(adapter).__name__
        return None, what
    if adapter.use_gating:
        return None, "gating (use_gating)"
    if adapter.add_layer_norm_before or adapter.add_layer_norm_after:
        return None, "adapter-level LayerNorm (ln_before / ln_after)"
    if hasattr(adapter, "DropPath"):
        return None, "stochastic depth"
    if not isinstance(adapter.scaling, float):
        return None, "learned scaling"
    down, up = adapter.adapter_down, adapter.adapter_up
    if len(down) != 2 or type(down[0]) is not nn.Linear or type(up) is not nn.Linear:
        return None, "PHM / Compacter layers"
    if adapter.residual_before_ln == "post_add" and not adapter.original_ln_before:
        return None, "residual_before_ln='post_add' without original_ln_before"
    act = _activation_name(down[1])
    if act is None:
        return None, f"activation {down[1]!r} (madx_fast: {', '.join(sorted(reference.ACTIVATIONS))})"
    return act, None


def _nice_support(block: nn.Module) -> tuple[str | None, str | None]:
    if type(block) is not NICECouplingBlock:
        return None, f"{type(block).__name__} invertible adapter (madx_fast fuses NICE)"
    if block.conditional:
        return None, "conditional NICE coupling"
    acts = set()
    for mlp in (block.F, block.G):
        if len(mlp) != 3 or type(mlp[0]) is not nn.Linear or type(mlp[2]) is not nn.Linear:
            return None, "NICE sub-networks other than Linear -> activation -> Linear"
        acts.add(_activation_name(mlp[1]))
    if None in acts or len(acts) != 1:
        return None, "NICE activation not supported by madx_fast"
    return acts.pop(), None


def _head_support(head: nn.Module) -> tuple[str | None, str | None]:
    """Flex LM head: every layer before the projection must act on each row alone."""
    layers = [head[i] for i in range(len(head))]
    if type(layers[-1]) is not nn.Linear or not all(
            isinstance(m, (nn.Linear, nn.LayerNorm)) or type(m).__name__ == "Activation_Function_Class"
            for m in layers[:-1]):
        return None, "head layers other than Linear / activation / LayerNorm"
    return "ok", None


# --------------------------------------------------------------------------------------------------------
# Bottleneck adapters: BottleneckLayer.bottleneck_layer_forward for a flat Stack of supported adapters
# --------------------------------------------------------------------------------------------------------
def _describe(setup) -> str:
    return f"{type(setup).__name__}[{', '.join(map(str, setup))}]" if hasattr(setup, "__iter__") else repr(setup)


def _stack_plan(layer, patch):
    """The active setup at this layer as a list of steps, or None (AdapterHub's code runs). A step is
    ``[(adapter, activation)]`` (one adapter) or an ``_AverageStep`` (an ``Average`` of adapter names)."""
    setup = layer.get_active_setup()
    if setup is None:  # no active adapter here: AdapterHub's LN(h + residual), nothing to fuse
        return None
    children = [setup] if type(setup) is Average else list(setup) if type(setup) is Stack else None
    if children is None or not all(isinstance(c, str) or _flat_average(c) for c in children):
        patch.log_once(f"active setup {_describe(setup)} runs on AdapterHub's code (madx_fast covers a single "
                       "adapter, a flat Stack of adapters and Average blocks of adapters)")
        return None
    plan = []
    for child in children:
        if isinstance(child, str):
            if child not in layer.adapters:  # leave_out, or another method's adapter: skipped as AdapterHub does
                continue
            step = _supported(layer, child, patch)
            if step is None:
                return None
            plan.append([step])
            continue
        present = [c for c in child if c in layer.adapters]
        if len(present) != len(child):  # AdapterHub's own behaviour (skipping, or failing) is kept
            patch.log_once(f"{_describe(child)} runs on AdapterHub's code where not all its adapters are in the layer")
            return None
        steps = [_supported(layer, c, patch) for c in child]
        if any(step is None for step in steps):
            return None
        plan.append(_AverageStep(steps, list(child.weights)))
    return plan or None


def _flat_average(block) -> bool:
    return type(block) is Average and all(isinstance(c, str) for c in block)


def _supported(layer, name, patch):
    """``(adapter, activation)`` when the fused op can stand in for adapter ``name``, else None (logged once)."""
    adapter = layer.adapters[name]
    act, reason = patch.support(adapter, _bottleneck_support)
    if reason is not None:
        patch.log_once(f"adapter {name!r} runs on AdapterHub's code: {reason}")
        return None
    return adapter, act


@dataclass
class _AverageStep:
    """An ``Average`` of adapters in one layer: its members ``[(adapter, activation)]`` and AdapterHub's weights
    (as its block stores them: normalised unless ``normalize_weights=False``)."""

    members: list
    weights: list

    def __iter__(self):  # the plan's last adapter: the Average's last member (AdapterHub's ``last``)
        return iter(self.members)

    def __getitem__(self, i):
        return self.members[i]


def _pre_forward(adapter, h, input_tensor, layer_norm):
    """``Adapter.pre_forward`` of adapters 1.3 (no fusion query): the adapter's input and its residual."""
    residual = None
    if adapter.residual_before_ln is True:
        residual = h
    if adapter.original_ln_before:
        if layer_norm:
            h = h + input_tensor
            if adapter.residual_before_ln == "post_add":
                residual = h
            h = layer_norm(h)
        elif input_tensor is not None:
            h = h + input_tensor
    if not adapter.residual_before_ln:
        residual = h
    return h, residual


def _compute_dtype(x, residual):
    """Under autocast the adapter's products run in the autocast dtype, as AdapterHub's nn.Linear do, when the
    residual already has it (MAD-X: the FFN output); otherwise in the wider of the two dtypes."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        low = torch.get_autocast_dtype(device)
        if residual.dtype == low:
            return low
    return x.dtype if x.dtype == residual.dtype else torch.promote_types(x.dtype, residual.dtype)


def _adapter_forward(adapter, act, x, residual, backend):
    """``residual + dropout(scaling * (W_up act(W_down x + b_down) + b_up))``: ``Adapter.forward``'s output."""
    down, up = adapter.adapter_down[0], adapter.adapter_up
    dtype = _compute_dtype(x, residual)
    if x.dtype != dtype or residual.dtype != dtype:
        same = residual is x
        x = x.to(dtype)
        residual = x if same else residual.to(dtype)
    kw = dict(scaling=adapter.scaling, activation=act, backend=backend)
    if adapter.dropout.training and adapter.dropout.p > 0:
        # the dropout mask falls between the scaled up projection and the residual add: the fused op gives
        # the scaled delta (zero residual); the mask is drawn on the same shape, in the same order as AdapterHub
        delta = ops.bottleneck_adapter(x, torch.zeros_like(x), down.weight, down.bias, up.weight, up.bias, **kw)
        return adapter.dropout(delta) + residual
    return ops.bottleneck_adapter(x, residual, down.weight, down.bias, up.weight, up.bias, **kw)


def _bottleneck_layer_forward(layer, original, patch, hidden_states, residual_input, layer_norm):
    """``BottleneckLayer.bottleneck_layer_forward`` for Stack(a1, ..., ak) (adapters 1.3's compose_stack ->
    pre_block -> compose_single, then the last adapter's post_forward):

        h_0 = hidden_states;  x_i, r_i = pre_forward_i(h_{i-1}, residual_input);  h_i = r_i + A_i(x_i)
        out = LN(h_k + residual_input) if original_ln_after else h_k

    An ``Average(b_1, ..., b_n)`` step (compose_average) runs its first member's pre_forward once and every
    member on the same input: ``h_i = mean_j(w_j (r + B_j(x)))`` over j (AdapterHub's mean of the weighted
    outputs, ``_average_forward``); the post_forward is then its last member's.
    """
    plan = _stack_plan(layer, patch)
    if plan is None or (residual_input is not None and residual_input.shape[0] != hidden_states.shape[0]):
        return original(hidden_states, residual_input, layer_norm)
    h = hidden_states
    for step in plan:
        x, residual = _pre_forward(step[0][0], h, residual_input, layer_norm)
        if isinstance(step, _AverageStep):
            h = _average_forward(step, x, residual, patch.backend)
        else:
            h = _adapter_forward(step[0][0], step[0][1], x, residual, patch.backend)
    if list(plan[-1])[-1][0].original_ln_after:
        h = layer_norm(h + residual_input) if layer_norm else h + residual_input
    return h


def _average_forward(step: _AverageStep, x, residual, backend):
    """AdapterHub's ``compose_average`` + ``mean``: ``torch.mean(stack_j(h_j) * w_j, 0) = sum_j (w_j / n) h_j``
    with ``h_j = r + dropout(s_j up_j(act(down_j(x))))``. Members of one configuration (and no dropout to draw)
    run as one ``madx_fast.ops.average_bottleneck_adapter`` with coefficients ``w_j / n``; others one by one,
    combined with AdapterHub's own expression. The result has AdapterHub's dtype (its float32 weights promote
    the stacked outputs)."""
    members, n = step.members, len(step.members)
    first = members[0][0]
    same = all(a.scaling == first.scaling and act == members[0][1] and
               a.adapter_down[0].weight.shape == first.adapter_down[0].weight.shape for a, act in members)
    dropout = any(a.dropout.training and a.dropout.p > 0 for a, _ in members)
    out_dtype = torch.promote_types(x.dtype, torch.float32)
    if not same or dropout:
        outs = [_adapter_forward(a, act, x, residual, backend) for a, act in members]
        weights = torch.tensor(step.weights)[:, None, None, None].to(outs[0].device)
        return torch.mean(torch.stack(outs, 0) * weights, dim=0)
    dtype = _compute_dtype(x, residual)
    if x.dtype != dtype or residual.dtype != dtype:
        same_tensor = residual is x
        x = x.to(dtype)
        residual = x if same_tensor else residual.to(dtype)
    mix = torch.tensor(step.weights, dtype=torch.float32, device=x.device) / n
    stacked = [torch.stack([getattr(a.adapter_down[0], p) for a, _ in members]) for p in ("weight", "bias")] + \
              [torch.stack([getattr(a.adapter_up, p) for a, _ in members]) for p in ("weight", "bias")]
    y = ops.average_bottleneck_adapter(x, residual, mix, *stacked, scaling=first.scaling, activation=members[0][1],
                                       backend=backend)
    return y.to(out_dtype)


# --------------------------------------------------------------------------------------------------------
# NICE invertible adapters
# --------------------------------------------------------------------------------------------------------
def _nice_weights(block):
    return (block.F[0].weight, block.F[0].bias, block.F[2].weight, block.F[2].bias,
            block.G[0].weight, block.G[0].bias, block.G[2].weight, block.G[2].bias)


class _FusedNice:
    """Stands in for a NICECouplingBlock where AdapterHub calls it: ``block(x, rev=...)``."""

    def __init__(self, block, activation, backend):
        self.block, self.activation, self.backend = block, activation, backend

    def __call__(self, x, rev=False):
        fn = ops.nice_inverse if rev else ops.nice_forward
        return fn(x, *_nice_weights(self.block), activation=self.activation, backend=self.backend)


def _nice(block, patch, label):
    """The fused stand-in for ``block``, or the block itself (logged once) when it is not supported."""
    act, reason = patch.support(block, _nice_support)
    if reason is not None:
        patch.log_once(f"invertible adapter {label} runs on AdapterHub's code: {reason}")
        return block
    return _FusedNice(block, act, patch.backend)


def _invertible_adapters_forward(base, original, patch, hidden_states, rev=False):
    """``InvertibleAdaptersMixin.invertible_adapters_forward``: the invertible adapter of the first adapter of
    the active setup, forward (on the embedding output) or inverse."""
    return _first_nice(base._get_active_setup(), base.invertible_adapters, patch, hidden_states, rev)


def _invertible_layer_forward(layer, original, patch, hidden_states, rev=False):
    """``InvertibleAdapterLayer.forward`` (plugin-interface models): the same, with the layer's active setup."""
    return _first_nice(layer.get_active_setup(), layer, patch, hidden_states, rev)


def _first_nice(setup, blocks, patch, hidden_states, rev):
    if setup is not None and len(setup) > 0:
        first = setup.first()
        if first in blocks:
            return _nice(blocks[first], patch, repr(first))(hidden_states, rev=rev)
    return hidden_states


# --------------------------------------------------------------------------------------------------------
# LM heads: head, projection and cross-entropy only at the positions that have a target
# --------------------------------------------------------------------------------------------------------
def _forward_head(model, original, patch, *args, **kwargs):
    _patch_heads(model, patch)  # heads added or loaded after the patch
    return original(*args, **kwargs)


def _lm_head_forward(head, original, patch, outputs, cls_output=None, attention_mask=None, return_dict=False,
                     **kwargs):
    """The flex ``masked_lm`` / ``causal_lm`` / ``seq2seq_lm`` head (``CausalLMHead.forward``): layers ->
    NICE^-1 -> projection, then the loss (on the shifted labels when ``shift_labels``)."""
    inv = kwargs.get("invertible_adapter")
    if inv is not None:
        inv = kwargs["invertible_adapter"] = _nice(inv, patch, "(in the LM head)")
    labels = kwargs.get("labels")
    _, reason = patch.support(head, _head_support)
    if reason is not None:
        patch.log_once(f"LM head {head.name!r} computes all logits on AdapterHub's code: {reason}")
    if labels is None or patch.keep_lm_logits or reason is not None or kwargs.get("prompt_tokens_length", 0) > 0:
        return original(outputs, cls_output, attention_mask, return_dict, **kwargs)
    n = len(head)

    def head_rows(rows):
        for i in range(n - 1):
            rows = head[i](rows)
        if inv is not None:
            rows = inv(rows, rev=True) if isinstance(inv, _FusedNice) else inv(rows[None], rev=True)[0]
        return rows

    last = head[n - 1]
    loss = lm_loss_at_labels(outputs[0], labels, head_rows, last.weight, last.bias,
                             shift=bool(head.config.get("shift_labels")))
    if return_dict:
        return head._create_model_output(loss, None, outputs)
    return (loss, None) + tuple(outputs[1:])


def _captured_modules(head) -> list[nn.Module]:
    """What passes its input through while ``_hf_lm_forward`` runs the model: the vocabulary projection (the
    head's transform, and any hook before the projection, run at every position: a small cost next to the
    projection's), or the head's modules where there is no projection module (DeBERTa with ``legacy=False``)."""
    return [head.decoder] if head.decoder is not None else head.module_list()


def _hf_head_forward(module, original, patch, *args, **kwargs):
    """A module of ``_captured_modules``: passes its input through (and keeps it) while ``_hf_lm_forward`` runs
    the model for what the projection gets."""
    if patch.capturing:
        patch.captured = args[0] if args else next(iter(kwargs.values()))
        return patch.captured
    return original(*args, **kwargs)


# Arguments with which the fused path would compute something else than the model: AdapterHub's code runs.
_HF_LM_FALLBACK_ARGS = ("shift_labels", "logits_to_keep", "num_logits_to_keep")
# What each HF seq2seq class does itself with labels and no decoder inputs (transformers 4.57), besides deriving
# them from the labels: BART / mBART turn the decoder cache off, EncoderDecoderModel masks the decoder's padding.
_SEQ2SEQ_WITH_LABELS = {
    "BartForConditionalGeneration": {"use_cache": False}, "MBartForConditionalGeneration": {"use_cache": False},
    "PLBartForConditionalGeneration": {}, "T5ForConditionalGeneration": {}, "MT5ForConditionalGeneration": {},
    "EncoderDecoderModel": {"decoder_attention_mask": True},
}


def _hf_lm_forward(model, original, patch, *args, **kwargs):
    """An HF LM class's forward after ``adapters.init``, with labels: AdapterHub's forward runs with the
    vocabulary projection passing its input through (so AdapterHub's forward context, hooks and outputs are its
    own; a plugin-interface model's NICE inverse, a pre-hook on the projection, runs there too), then the
    projection runs fused with the loss at the positions with a target only. A seq2seq model first gets what it
    would make of the labels itself (``_seq2seq_label_inputs``); a causal LM honours ``num_items_in_batch`` as
    HF's causal loss does. (AdapterHub applies no NICE inverse in the mixin-based HF classes, so neither does
    this.)"""
    labels = kwargs.get("labels")
    head = find_lm_head(model)
    if labels is None or patch.keep_lm_logits:
        return original(*args, **kwargs)
    fallback = _hf_lm_fallback(head, args, kwargs)
    if fallback:
        patch.log_once(f"{type(model).__name__} computes its loss on AdapterHub's code when called with {fallback}")
        return original(*args, **kwargs)
    return_dict = kwargs.get("return_dict")
    return_dict = model.config.use_return_dict if return_dict is None else return_dict
    kwargs = dict(kwargs, labels=None, return_dict=True)
    num_items = kwargs.pop("num_items_in_batch", None)
    if head.objective == "seq2seq":
        _seq2seq_label_inputs(model, head, labels, kwargs)
    patch.capturing = True
    if head.extra_bias is not None:  # BART's "logits + final_logits_bias": the hidden states pass through it too
        head.owner.__dict__[head.extra_bias] = torch.zeros(())
    try:
        out = original(**kwargs)
        hidden = patch.captured
    finally:
        patch.capturing, patch.captured = False, None
        if head.extra_bias is not None:
            del head.owner.__dict__[head.extra_bias]
    rows = (lambda x: x) if head.decoder is not None else head.decoder_input
    loss = lm_loss_at_labels(hidden, labels, rows, head.weight, head.bias, shift=head.shift,
                             reduction="mean" if num_items is None else "sum")
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    return _hf_lm_output(out, loss, return_dict)


def _hf_lm_fallback(head, args, kwargs) -> list[str]:
    """Why the fused loss would not compute what the model does with these arguments (empty: it would)."""
    why = [k for k in _HF_LM_FALLBACK_ARGS if kwargs.get(k) is not None and not (
        isinstance(kwargs[k], int) and kwargs[k] == 0)]
    if args:
        why.append("positional arguments")
    if head.objective == "seq2seq" and head.class_name not in _SEQ2SEQ_WITH_LABELS:
        why.append(f"a seq2seq class madx_fast does not mirror ({head.class_name})")
    if head.objective != "causal" and kwargs.get("num_items_in_batch") is not None:
        why.append("num_items_in_batch")  # HF's causal classes divide by it; whether others do varies
    return why


def _seq2seq_label_inputs(model, head, labels, kwargs) -> None:
    """What the seq2seq class does with labels and no decoder inputs (``_SEQ2SEQ_WITH_LABELS``): decoder inputs
    from the labels (``prepare_decoder_input_ids_from_labels``), and its cache or decoder-mask choices."""
    if kwargs.get("decoder_input_ids") is not None or kwargs.get("decoder_inputs_embeds") is not None:
        return
    decoder_ids = kwargs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels)
    does = _SEQ2SEQ_WITH_LABELS[head.class_name]
    if "use_cache" in does:
        kwargs["use_cache"] = does["use_cache"]
    if does.get("decoder_attention_mask") and kwargs.get("decoder_attention_mask") is None:
        kwargs["decoder_attention_mask"] = (decoder_ids != model.config.pad_token_id).to(decoder_ids.dtype)


def _hf_lm_output(out, loss, return_dict):
    """The model's output with the fused ``loss`` and ``logits=None``; a tuple keeps AdapterHub's positions."""
    fields = {f.name for f in dataclasses.fields(out)}
    result = type(out)(**{k: v for k, v in out.items() if k in fields and k not in ("loss", "logits")}, loss=loss)
    for key, value in out.items():  # anything AdapterHub's forward context added (e.g. gating scores)
        if key not in fields:
            result[key] = value
    if return_dict:
        return result
    return (loss, None) + tuple(v for k, v in result.items() if k != "loss")


# --------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------
def _adapter_configs(model, name):
    config = model.adapters_config.get(name)
    if config is not None and not isinstance(config, AdapterConfig):
        config = AdapterConfig.load(config)
    return list(config.configs) if isinstance(config, ConfigUnion) else [config]


def _report(model, patch) -> AdapterHubPatchReport:
    report = AdapterHubPatchReport(type(model).__name__, patch.backend or "auto", patch.keep_lm_logits)
    layers = [m for m in model.modules() if _is_patched(m, "bottleneck_layer_forward")]
    base = model.base_model
    invertible = getattr(base, "invertible_adapters", {})
    for name in model.adapters_config.adapters:
        for config in _adapter_configs(model, name):
            if not isinstance(config, BnConfig):
                kind = getattr(config, "architecture", None) or type(config).__name__
                report.not_patched.append(f"adapter {name!r}: {kind} (madx_fast fuses bottleneck adapters only)")
                continue
            modules = [layer.adapters[name] for layer in layers if name in layer.adapters]
            reasons = {patch.support(m, _bottleneck_support)[1] for m in modules} - {None}
            if reasons:
                report.not_patched.append(f"adapter {name!r}: {'; '.join(sorted(reasons))}")
            elif modules:
                report.patched.append(f"adapter {name!r}: bottleneck in {len(modules)} places, on "
                                      "madx_fast.ops.bottleneck_adapter")
            if name in invertible:
                act, reason = patch.support(invertible[name], _nice_support)
                (report.not_patched if reason else report.patched).append(
                    f"invertible adapter {name!r}: " + (reason or "NICE on madx_fast.ops.nice_forward / nice_inverse"))
    for fusion in getattr(model.adapters_config, "fusions", {}) or {}:
        report.not_patched.append(f"AdapterFusion {fusion!r} (Fuse composition)")
    setup = model.adapters_config.active_setup
    if setup is not None and not (_flat_average(setup) or type(setup) is Stack and all(
            isinstance(c, str) or _flat_average(c) for c in setup)):
        report.not_patched.append(f"active setup {_describe(setup)}: only single adapters, flat Stacks and Average "
                                  "blocks of adapters are fused")
    for head_name, head in (getattr(model, "heads", None) or {}).items():
        if type(head) in _LM_HEADS:
            _, reason = patch.support(head, _head_support)
            kind = head.config.get("head_type", "LM")
            if reason:
                report.not_patched.append(f"{kind} head {head_name!r}: {reason}")
            else:
                report.patched.append(f"{kind} head {head_name!r}: {_lm_note(patch)}")
    if _is_patched(model, "forward"):
        report.patched.append(f"{find_lm_head(model).objective}-LM loss of {type(model).__name__}: {_lm_note(patch)}")
    elif not hasattr(model, "heads") and lm_objective(model) is not None:
        report.not_patched.append(f"{lm_objective(model)}-LM loss of {type(model).__name__}: a head madx_fast does "
                                  "not know (madx_fast.model.lm_heads); the logits and loss stay AdapterHub's")
    if not model.adapters_config.adapters:
        report.patched.append("no adapters yet: adapters added or loaded later are checked at each forward")
    return report


def _lm_note(patch) -> str:
    if patch.keep_lm_logits:
        return "full logits and loss as AdapterHub (keep_lm_logits=True), NICE inverse fused"
    return ("with labels, projection + cross-entropy only at the positions with a target (logits=None; "
            "keep_lm_logits=True to get them)")
