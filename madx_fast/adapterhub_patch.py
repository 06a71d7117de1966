"""madx_fast's fused ops under a model set up with AdapterHub's ``adapters`` library, in one call.

    import madx_fast
    report = madx_fast.patch_adapterhub(model)    # an XLMRobertaAdapterModel, or adapters.init(hf_model)
    ...                                           # train, evaluate, save_adapter: AdapterHub's API as before
    madx_fast.unpatch_adapterhub(model)           # back to AdapterHub's code, exactly

What runs on madx_fast's code (the same function as AdapterHub 1.3, to float32 rounding):

* sequential bottleneck adapters (``seq_bn``/``pfeiffer``, ``seq_bn_inv``/``pfeiffer+inv``, ``double_seq_bn``,
  any reduction factor or per-layer mapping, the activations madx_fast supports, float scaling, dropout,
  ``residual_before_ln`` True/False/"post_add", ``original_ln_before``/``original_ln_after``), alone or in a
  flat ``Stack`` of adapter names: down projection, activation, up projection, scaling and residual in the fused
  ``madx_fast.ops.bottleneck_adapter``;
* NICE invertible adapters: the forward on the embedding output and, in a flex masked-LM head, the inverse
  before the tied decoder, on ``madx_fast.ops.nice_forward`` / ``nice_inverse``;
* the masked-LM loss when ``labels`` are given (flex ``masked_lm`` heads, and HF ``...ForMaskedLM`` models
  after ``adapters.init``): the head and the decoder run only at positions with ``labels != -100``, through the
  chunked fused linear cross-entropy, so the ``B x L x V`` logits are never built. The output's ``logits`` is then
  ``None`` (``patch_adapterhub(model, keep_mlm_logits=True)`` computes them and the loss as AdapterHub does).

Everything else keeps AdapterHub's own code: Parallel / Fuse / Split / BatchSplit / Average compositions, gating,
adapter-level LayerNorms (``ln_before`` / ``ln_after``), PHM (Compacter), learned scaling, stochastic depth,
parallel bottleneck adapters, GLOW coupling, LoRA, prefix / prompt tuning, ReFT. The decision is made at each
forward from the active setup and the adapters there, so adapters added or loaded after the patch and changes
of the active setup are covered; each part that falls back is logged once.

How: instance attributes only, no class is modified. Each ``BottleneckLayer`` gets its own
``bottleneck_layer_forward``, the base model its ``invertible_adapters_forward``, a flex model its
``forward_head`` (which patches masked-LM heads, including ones added later), masked-LM heads their
``forward``, and an HF masked-LM model its ``forward`` and its head's ``forward``. ``unpatch_adapterhub``
removes them (or puts back what was there), leaving every module's ``__dict__`` as it was. Parameters are
AdapterHub's own objects, so optimizers, ``train_adapter``, ``save_adapter`` and ``load_adapter`` see no
difference.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

try:
    import adapters
    from adapters.composition import Stack
    from adapters.configuration import AdapterConfig, BnConfig, ConfigUnion
    from adapters.heads.language_modeling import BertStyleMaskedLMHead
    from adapters.methods.bottleneck import BottleneckLayer
    from adapters.methods.modeling import Adapter, NICECouplingBlock
except ImportError as exc:  # the optional dependency
    raise ImportError(
        "madx_fast.patch_adapterhub needs AdapterHub's `adapters` library (version 1.3): "
        "pip install 'madx_fast[adapterhub]'  (or: pip install 'adapters>=1.3,<1.4')"
    ) from exc

from . import ops, reference
from .backends import BACKENDS
from .model.inputs import IGNORE_INDEX
from .model.mlm_loss import fused_linear_cross_entropy
from .model.wiring import SUPPORTED_MODEL_TYPES, find_parts

logger = logging.getLogger(__name__)

SUPPORTED_ADAPTERS_VERSION = (1, 3)  # the code mirrored below is adapters 1.3's
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
    keep_mlm_logits: bool
    patched: list[str] = field(default_factory=list)
    not_patched: list[str] = field(default_factory=list)

    @property
    def fully_patched(self) -> bool:
        return not self.not_patched

    def __str__(self) -> str:
        lines = [f"madx_fast.patch_adapterhub({self.model_class}): backend {self.backend}, "
                 f"keep_mlm_logits={self.keep_mlm_logits}"]
        lines += [f"  fused:          {p}" for p in self.patched]
        lines += [f"  AdapterHub's:   {p}" for p in self.not_patched]
        return "\n".join(lines)


def patch_adapterhub(model: nn.Module, *, backend: str | None = None,
                     keep_mlm_logits: bool = False) -> AdapterHubPatchReport:
    """Run the bottleneck adapters, NICE invertible adapters and masked-LM loss of an AdapterHub model on
    madx_fast's fused ops, in place; returns (and logs once) a report of what was and was not patched.

    ``model``: an ``XLMRobertaAdapterModel`` / ``BertAdapterModel`` (any heads), or a Hugging Face BERT /
    RoBERTa / XLM-R model after ``adapters.init(model)``; before or after adapters are added or loaded, in train
    or eval mode. ``backend``: madx_fast's op backend (None = "auto": Triton on CUDA tensors, the eager reference
    on CPU tensors unless ``TRITON_INTERPRET=1``). ``keep_mlm_logits``: with labels, also compute the full
    ``B x L x V`` MLM logits (and the loss from them, as AdapterHub does) instead of returning ``logits=None``.
    Calling it again on a patched model updates the options and returns a fresh report.
    """
    _check_model(model)
    if (backend or "auto").lower() not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
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
    patch.keep_mlm_logits = bool(keep_mlm_logits)
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
        self.keep_mlm_logits = False
        self.undo: list[tuple[nn.Module, str, object]] = []
        self.capturing = False  # HF masked-LM: the head passes its input through (see _hf_mlm_forward)
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


def _check_model(model):
    version = tuple(int(v) for v in adapters.__version__.split(".")[:2])
    if version != SUPPORTED_ADAPTERS_VERSION:
        raise RuntimeError(
            f"madx_fast.patch_adapterhub mirrors adapters {'.'.join(map(str, SUPPORTED_ADAPTERS_VERSION))}.x; "
            f"adapters {adapters.__version__} is installed (pip install 'madx_fast[adapterhub]')")
    if getattr(model, "adapters_config", None) is None or not hasattr(model, "base_model"):
        raise TypeError(f"{type(model).__name__} is not set up with AdapterHub's `adapters`: call "
                        "adapters.init(model) first, or use XLMRobertaAdapterModel / BertAdapterModel")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(f"model type {model_type!r} ({type(model).__name__}) is not supported; "
                        f"madx_fast.patch_adapterhub covers {', '.join(SUPPORTED_MODEL_TYPES)} models")


def _install(model, patch):
    for module in model.modules():
        if isinstance(module, BottleneckLayer):
            _override(module, "bottleneck_layer_forward", _bottleneck_layer_forward, patch)
    base = model.base_model
    if hasattr(base, "invertible_adapters_forward") and hasattr(base, "invertible_adapters"):
        _override(base, "invertible_adapters_forward", _invertible_adapters_forward, patch)
    if hasattr(model, "heads") and hasattr(model, "forward_head"):
        _override(model, "forward_head", _forward_head, patch)
    else:
        head = find_parts(model).mlm_head
        if head is not None:  # HF ...ForMaskedLM
            _override(getattr(model, head.root_name), "forward", _hf_head_forward, patch)
            _override(model, "forward", _hf_mlm_forward, patch)


def _patch_heads(model, patch):
    for head in getattr(model, "heads", {}).values() if hasattr(model, "heads") else ():
        if type(head) is BertStyleMaskedLMHead and not _is_patched(head, "forward"):
            _override(head, "forward", _masked_lm_head_forward, patch)


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
    """Flex masked-LM head: every layer before the decoder must act on each row alone."""
    if head.config.get("shift_labels"):
        return None, "shifted labels"
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
    """``[(adapter, activation), ...]`` for the active setup at this layer, or None (AdapterHub's code runs)."""
    setup = layer.get_active_setup()
    if setup is None:  # no active adapter here: AdapterHub's LN(h + residual), nothing to fuse
        return None
    if type(setup) is not Stack or not all(isinstance(child, str) for child in setup):
        patch.log_once(f"active setup {_describe(setup)} runs on AdapterHub's code (madx_fast covers a single "
                       "adapter or a flat Stack of adapters)")
        return None
    plan = []
    for name in setup:
        if name not in layer.adapters:  # leave_out, or another method's adapter: skipped as AdapterHub does
            continue
        adapter = layer.adapters[name]
        act, reason = patch.support(adapter, _bottleneck_support)
        if reason is not None:
            patch.log_once(f"adapter {name!r} runs on AdapterHub's code: {reason}")
            return None
        plan.append((adapter, act))
    return plan or None


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
    """
    plan = _stack_plan(layer, patch)
    if plan is None or (residual_input is not None and residual_input.shape[0] != hidden_states.shape[0]):
        return original(hidden_states, residual_input, layer_norm)
    h = hidden_states
    for adapter, act in plan:
        x, residual = _pre_forward(adapter, h, residual_input, layer_norm)
        h = _adapter_forward(adapter, act, x, residual, patch.backend)
    if plan[-1][0].original_ln_after:
        h = layer_norm(h + residual_input) if layer_norm else h + residual_input
    return h


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
    setup = base._get_active_setup()
    if setup is not None and len(setup) > 0:
        first = setup.first()
        if first in base.invertible_adapters:
            return _nice(base.invertible_adapters[first], patch, repr(first))(hidden_states, rev=rev)
    return hidden_states


# --------------------------------------------------------------------------------------------------------
# Masked-LM heads: decoder and cross-entropy only at labelled positions
# --------------------------------------------------------------------------------------------------------
def _labelled_mlm_loss(hidden, labels, transform, decoder):
    """Mean cross-entropy over positions with ``labels != -100`` of ``decoder(transform(hidden))``, with the
    transform applied to those rows only (it acts on each row alone) and the decoder fused with the loss."""
    h = hidden.reshape(-1, hidden.shape[-1])
    targets = labels.reshape(-1).to(h.device)
    if targets.shape[0] != h.shape[0]:
        raise ValueError(f"labels has {targets.shape[0]} elements but the model output has {h.shape[0]} positions "
                         f"(labels shape {tuple(labels.shape)}, output shape {tuple(hidden.shape)})")
    selected = targets != IGNORE_INDEX
    rows = transform(h[selected])
    return fused_linear_cross_entropy(rows, decoder.weight, decoder.bias, targets[selected])


def _forward_head(model, original, patch, *args, **kwargs):
    _patch_heads(model, patch)  # heads added or loaded after the patch
    return original(*args, **kwargs)


def _masked_lm_head_forward(head, original, patch, outputs, cls_output=None, attention_mask=None,
                            return_dict=False, **kwargs):
    """``BertStyleMaskedLMHead.forward``: dense -> act -> LN -> NICE^-1 -> decoder, then the loss."""
    inv = kwargs.get("invertible_adapter")
    if inv is not None:
        inv = kwargs["invertible_adapter"] = _nice(inv, patch, "(in the masked-LM head)")
    labels = kwargs.get("labels")
    ok, reason = patch.support(head, _head_support)
    if reason is not None:
        patch.log_once(f"masked-LM head {head.name!r} computes all logits on AdapterHub's code: {reason}")
    if labels is None or patch.keep_mlm_logits or reason is not None or kwargs.get("prompt_tokens_length", 0) > 0:
        return original(outputs, cls_output, attention_mask, return_dict, **kwargs)
    n = len(head)

    def transform(rows):
        for i in range(n - 1):
            rows = head[i](rows)
        if inv is not None:
            rows = inv(rows, rev=True) if isinstance(inv, _FusedNice) else inv(rows[None], rev=True)[0]
        return rows

    loss = _labelled_mlm_loss(outputs[0], labels, transform, head[n - 1])
    if return_dict:
        return head._create_model_output(loss, None, outputs)
    return (loss, None) + tuple(outputs[1:])


def _hf_head_forward(head, original, patch, *args, **kwargs):
    """The HF masked-LM head (``lm_head`` / ``cls``): passes its input through while ``_hf_mlm_forward`` runs
    the model for its encoder output."""
    if patch.capturing:
        return args[0] if args else kwargs["sequence_output" if "sequence_output" in kwargs else "features"]
    return original(*args, **kwargs)


def _hf_mlm_forward(model, original, patch, *args, **kwargs):
    """HF ``...ForMaskedLM.forward`` after ``adapters.init``: with labels, AdapterHub's forward runs with the head
    passing the encoder output through (so AdapterHub's forward context, hooks and outputs are its own), then the
    head and decoder run at the labelled positions only. (AdapterHub applies no NICE inverse in these classes,
    so neither does this.)"""
    labels = kwargs.get("labels")
    if labels is None or patch.keep_mlm_logits:
        return original(*args, **kwargs)
    return_dict = kwargs.get("return_dict")
    return_dict = model.config.use_return_dict if return_dict is None else return_dict
    patch.capturing = True
    try:
        out = original(*args, **dict(kwargs, labels=None, return_dict=True))
    finally:
        patch.capturing = False
    head = find_parts(model).mlm_head
    loss = _labelled_mlm_loss(out.logits, labels, head.transform, head.decoder)
    result = type(out)(loss=loss, logits=None, hidden_states=out.hidden_states, attentions=out.attentions)
    for key, value in out.items():  # anything AdapterHub's forward context added (e.g. gating scores)
        if key not in ("loss", "logits", "hidden_states", "attentions"):
            result[key] = value
    if return_dict:
        return result
    return (loss, None) + tuple(v for k, v in result.items() if k not in ("loss", "logits"))


# --------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------
def _adapter_configs(model, name):
    config = model.adapters_config.get(name)
    if config is not None and not isinstance(config, AdapterConfig):
        config = AdapterConfig.load(config)
    return list(config.configs) if isinstance(config, ConfigUnion) else [config]


def _report(model, patch) -> AdapterHubPatchReport:
    report = AdapterHubPatchReport(type(model).__name__, patch.backend or "auto", patch.keep_mlm_logits)
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
    if setup is not None and not (type(setup) is Stack and all(isinstance(c, str) for c in setup)):
        report.not_patched.append(f"active setup {_describe(setup)}: only single adapters and flat Stacks are fused")
    for head_name, head in (getattr(model, "heads", None) or {}).items():
        if type(head) is BertStyleMaskedLMHead:
            _, reason = patch.support(head, _head_support)
            if reason:
                report.not_patched.append(f"masked-LM head {head_name!r}: {reason}")
            else:
                report.patched.append(f"masked-LM head {head_name!r}: {_mlm_note(patch)}")
    if _is_patched(model, "forward"):
        report.patched.append(f"masked-LM loss of {type(model).__name__}: {_mlm_note(patch)}")
    if not model.adapters_config.adapters:
        report.patched.append("no adapters yet: adapters added or loaded later are checked at each forward")
    return report


def _mlm_note(patch) -> str:
    if patch.keep_mlm_logits:
        return "full logits and loss as AdapterHub (keep_mlm_logits=True), NICE inverse fused"
    return ("with labels, decoder + cross-entropy only at labelled positions (logits=None; "
            "keep_mlm_logits=True to get them)")
