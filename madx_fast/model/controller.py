"""``add_madx(model)``: MAD-X on a Hugging Face encoder or decoder LM, managed through ``model.madx``.

    model = XLMRobertaForTokenClassification.from_pretrained("xlm-roberta-base", num_labels=7)
    madx = add_madx(model)                                   # == model.madx
    madx.add_adapter("en", MadxConfig.language())            # rf 2 + NICE invertible adapter
    madx.add_adapter("ner", MadxConfig.task())               # rf 16
    madx.set_active(Stack("en", "ner"))
    madx.train_adapters("ner")                               # only "ner" and the task head train
    ...
    madx.set_active(Stack("sw", "ner"))                      # zero-shot: swap the language adapter

The model keeps its class and forward: ``model(**batch)`` runs the active setup. Everything below is
bookkeeping (which adapters exist, their configs, the active setup, freezing, dtypes); the math is in
``wiring.py`` (placement) and ``madx_fast.modules`` / ``madx_fast.ops`` (the adapters themselves).
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch
from torch import nn

from ..modules import BottleneckAdapter, InvertibleAdapter
from . import adapter_files, per_row, pretrained_record
from .adapter_files import AdapterFileError, check_state_dict
from .config import AdapterConfigError, MadxConfig
from .hub import resolve_adapter
from .stack import Average, PerRow, Setup, Stack, adapter_names, normalize_setup, setup_repr, without_adapter
from .wiring import MadxState, find_parts, unwire, wire

_NAME_RE = re.compile(r"^[^.\s]+$")  # it becomes a module name: no dots, no blanks


class AdapterExistsError(ValueError):
    """An adapter of that name is already in the model (pass ``overwrite=True`` to replace it)."""


def check_adapter_name(name, what: str = "adapter name") -> None:
    """Adapter names become module names and parts of parameter names: non-empty, no dots, no blanks."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"{what} {name!r} must be a non-empty string without dots or blanks (it names an "
                         "adapter, and becomes part of parameter names)")


def add_madx(model: nn.Module, backend: str | None = None) -> "MadxAdapters":
    """Wire MAD-X into ``model`` in place and return its handle (also available as ``model.madx``).

    ``model``: an HF model of a family in ``SUPPORTED_MODEL_TYPES`` (BERT, RoBERTa, XLM-R, XLM-R XL,
    DeBERTa-v2, DistilBERT, GPT-2, Llama, Mistral) of any class (``...Model``, ``...ForMaskedLM``,
    ``...ForCausalLM`` / ``GPT2LMHeadModel``, ``...ForTokenClassification``, ``...ForQuestionAnswering``,
    ``...ForMultipleChoice``, ...), from ``from_pretrained`` or from a config. With no adapter active the model
    computes exactly what it did before. ``backend`` picks the adapter kernels (None: ``madx_fast``'s default
    for the device)."""
    existing = getattr(model, "madx", None)
    if isinstance(existing, MadxAdapters):
        if backend is not None:
            existing.set_backend(backend)
        return existing
    return MadxAdapters(model, backend=backend)


class MadxAdapters:
    """The MAD-X adapters of one model: add / delete / activate / freeze / save / load.

    Parameters live in the model's own module tree, under AdapterHub's names
    (``{prefix}.encoder.layer.{i}.output.adapters.{name}.*`` in BERT / XLM-R,
    ``{prefix}.layers.{i}.output_adapters.adapters.{name}.*`` in Llama, ...; ``{prefix}.invertible_adapters.{name}.*``),
    so ``model.state_dict()``, ``.to()``, optimizers and ``save_pretrained`` see them as usual."""

    def __init__(self, model: nn.Module, backend: str | None = None):
        self.model = model
        self.parts = find_parts(model)
        base = self.parts.base
        if not isinstance(getattr(base, "invertible_adapters", None), nn.ModuleDict):
            base.invertible_adapters = nn.ModuleDict()
        self.state = MadxState(base.invertible_adapters)
        self.configs: dict[str, MadxConfig] = {}
        self.backend = backend
        self.backbone_dtype: torch.dtype | None = None
        self._head_hooks: list = []
        self._undo = wire(self.parts, self.state)
        model.madx = self
        pretrained_record.install_save_hook(model)  # save_pretrained records the adapters (pretrained_record.py)

    # ---------------------------------------------------------------------------------------------------
    # adapters
    # ---------------------------------------------------------------------------------------------------
    @property
    def adapters(self) -> dict[str, MadxConfig]:
        """Name -> config of every adapter in the model."""
        return dict(self.configs)

    def __contains__(self, name: str) -> bool:
        return name in self.configs

    def add_adapter(self, name: str, config: MadxConfig | str | dict | None = None, *, overwrite: bool = False,
                    set_active: bool = False) -> None:
        """Add adapter ``name`` (``config``: a MadxConfig, a preset name such as ``"seq_bn_inv"``, or an
        AdapterHub config dict; default ``seq_bn``). An existing adapter of that name is an error unless
        ``overwrite=True``. New adapters are float32 (master weights) on the model's device and trainable."""
        config = MadxConfig.coerce(config)
        self.check_new_name(name, overwrite)
        layer_adapters, invertible = self._build(name, config)
        self._attach(name, config, layer_adapters, invertible)
        if set_active:
            self.set_active(name)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (and its invertible adapter) from the model and from the active setup."""
        self._require(name)
        for slot in self._slots():
            if name in slot.adapters:
                del slot.adapters[name]
        if name in self.state.invertible:
            del self.state.invertible[name]
        del self.configs[name]
        self.state.active = without_adapter(self.state.active, name)

    def layer_adapters(self, name: str) -> dict[int, BottleneckAdapter]:
        """Layer index -> BottleneckAdapter of adapter ``name``."""
        self._require(name)
        return {i: slot.adapters[name] for i, slot in enumerate(self._slots()) if name in slot.adapters}

    def invertible_adapter(self, name: str) -> InvertibleAdapter | None:
        self._require(name)
        return self.state.invertible[name] if name in self.state.invertible else None

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """All parameters of adapter ``name``: its bottleneck in every layer and its invertible adapter."""
        for module in self.layer_adapters(name).values():
            yield from module.parameters()
        inv = self.invertible_adapter(name)
        if inv is not None:
            yield from inv.parameters()

    def num_parameters(self, name: str) -> int:
        return sum(p.numel() for p in self.adapter_parameters(name))

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The weights of adapter ``name`` under model-independent keys: ``layers.{i}.adapter_down.0.weight``,
        ``layers.{i}.adapter_up.bias``, ``invertible.F.0.weight``, ..."""
        out = {}
        for i, module in self.layer_adapters(name).items():
            for key, value in module.state_dict().items():
                out[f"layers.{i}.{key}"] = value
        inv = self.invertible_adapter(name)
        if inv is not None:
            for key, value in inv.state_dict().items():
                out[f"invertible.{key}"] = value
        return out

    def install_adapter(self, name: str, config: MadxConfig, state_dict: dict[str, torch.Tensor], *,
                        overwrite: bool = False, source: str = "state dict") -> None:
        """Add adapter ``name`` with the given weights (keys as ``adapter_state_dict``). Every problem (name
        taken, config not fitting the model, missing / unexpected keys, wrong shapes) is raised before the
        model is touched; ``source`` names the file in the messages."""
        self.check_new_name(name, overwrite)
        try:
            expected = config.state_shapes(self.parts.hidden_size, self.parts.num_layers)
        except AdapterConfigError as exc:
            raise AdapterConfigError(f"{source}: adapter {name!r}: {exc}") from None
        check_state_dict(state_dict, expected, f"{source}: adapter {name!r}")
        layer_adapters, invertible = self._build(name, config)
        with torch.no_grad():
            for i, module in layer_adapters.items():
                for key, param in module.state_dict().items():
                    param.copy_(state_dict[f"layers.{i}.{key}"])
            if invertible is not None:
                for key, param in invertible.state_dict().items():
                    param.copy_(state_dict[f"invertible.{key}"])
        self._attach(name, config, layer_adapters, invertible)

    def average_adapter(self, adapter_name: str, adapter_list, weights=None, normalize_weights: bool = True, *,
                        combine_strategy: str = "linear", overwrite: bool = False, set_active: bool = False) -> None:
        """Add adapter ``adapter_name`` whose parameters are the weighted sum of those of ``adapter_list``'s
        adapters (AdapterHub's ``average_adapter``, "linear" strategy): every layer's bottleneck weights and
        biases and, for adapters with one, the invertible (NICE) adapter's. A merged adapter costs no more
        than one adapter at inference (unlike ``Average``, which runs them all).

        ``adapter_list``: names, or a dict name -> weight (its weights are used when ``weights`` is None).
        Weights as AdapterHub's: None gives each ``1/n``; given ones are divided by their sum when
        ``normalize_weights``. The adapters must share one configuration (dropout and initialisation aside);
        the new adapter takes the first's. The NICE parameters are averaged as AdapterHub's base-model
        ``model.base_model.average_adapter`` does (its top-level ``model.average_adapter`` on a flex-head or
        ``adapters.init`` model gives the new adapter no invertible adapter at all)."""
        if combine_strategy != "linear":
            raise ValueError(f"combine_strategy {combine_strategy!r} is not supported; bottleneck and invertible "
                             "adapters are averaged 'linear'ly (as AdapterHub does for them)")
        names, coefficients = _average_coefficients(adapter_list, weights, normalize_weights)
        for n in names:
            self._require(n)
        config = self.configs[names[0]]
        for n in names[1:]:
            if _config_identity(self.configs[n]) != _config_identity(config):
                raise ValueError(f"cannot average adapters of different configurations: {names[0]!r} has "
                                 f"{self.configs[names[0]]} but {n!r} has {self.configs[n]}")
        self.check_new_name(adapter_name, overwrite)
        state: dict[str, torch.Tensor] = {}
        with torch.no_grad():  # in AdapterHub's order: w_0 v_0 + w_1 v_1 + ... per parameter
            for n, w in zip(names, coefficients):
                for key, value in self.adapter_state_dict(n).items():
                    state[key] = w * value if key not in state else state[key] + w * value
        self.install_adapter(adapter_name, config, state, overwrite=overwrite,
                             source=f"average of {', '.join(names)}")
        if set_active:
            self.set_active(adapter_name)

    # ---------------------------------------------------------------------------------------------------
    # active setup
    # ---------------------------------------------------------------------------------------------------
    @property
    def active(self):
        """The active setup: None, a name (or Average / PerRow block), or a Stack."""
        return setup_repr(self.state.active)

    @active.setter
    def active(self, setup: Setup) -> None:
        self.set_active(setup)

    def set_active(self, setup: Setup) -> None:
        """Activate ``setup``: an adapter name, ``Stack(lang, task)`` (or a list of names), or None for the
        plain model. Takes effect on the next forward; switch at any time (e.g. swap the language).
        ``Stack(PerRow("en", "sw"), task)`` runs each row of a batch in its own language (``row_languages``);
        ``Stack(Average("es", "pt", weights=[0.7, 0.3]), task)`` a weighted average of adapters (``Average``)."""
        names = normalize_setup(setup)
        for n in adapter_names(names):
            self._require(n)
        for entry in names:
            if isinstance(entry, PerRow):  # many languages in one batch: see per_row.py
                per_row.check_compatible(self, entry)
        self.state.active = names

    @contextlib.contextmanager
    def activated(self, setup: Setup):
        """``with madx.activated(Stack("sw", "ner")): ...`` runs a block with another setup."""
        previous = self.state.active
        self.set_active(setup)
        try:
            yield self
        finally:
            self.state.active = previous

    def set_row_languages(self, languages) -> None:
        """Each row's language for the next forwards of a ``PerRow`` setup (``None`` clears it): adapter names
        (one per row), group ids (positions in the PerRow) in a list or host tensor, or a device tensor of ids
        (used as is, never read back). See ``row_languages`` and docs/model_api.md."""
        self.state.row_groups = None if languages is None else per_row.row_group_ids(
            self.state.active, languages, _module_device(self.parts.embeddings))

    @contextlib.contextmanager
    def row_languages(self, languages):
        """``with madx.row_languages(["sw", "en", "qu"]): model(**batch)`` runs a ``Stack(PerRow(...), task)``
        setup with each row in its own language; yields the row ids (a device tensor)."""
        previous = self.state.row_groups
        self.set_row_languages(languages)
        try:
            yield self.state.row_groups
        finally:
            self.state.row_groups = previous

    # ---------------------------------------------------------------------------------------------------
    # training setup
    # ---------------------------------------------------------------------------------------------------
    def head_modules(self) -> dict[str, nn.Module]:
        """Top-level modules of the model outside the base model (the task head), e.g. ``classifier``."""
        if self.parts.base is self.model:
            return {}
        return {n: m for n, m in self.model.named_children() if m is not self.parts.base}

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """The task head's weights by model parameter name: the parameters of the modules outside the base
        model (``classifier``, ``qa_outputs``, ...) and the base model's pooler where it has one (the
        multiple-choice and BERT sequence-classification heads run on it). An LM head is not a task
        head (its decoder is tied to the word embeddings; MAD-X keeps it frozen) and a bare encoder has none."""
        if self.parts.base is self.model or self.parts.has_lm_head:
            kind = f"a {self.parts.lm_head.objective}-LM head (part of the frozen backbone)" if \
                self.parts.has_lm_head else "no task head"
            raise AdapterFileError(f"{type(self.model).__name__} has {kind}; only task heads (token "
                                   "classification, question answering, multiple choice, ...) are saved and loaded")
        base_ids = {id(p) for p in self.parts.base.parameters()}
        pooler = f"{self.parts.prefix}.pooler."
        return {n: p.detach() for n, p in self.model.named_parameters()
                if id(p) not in base_ids or n.startswith(pooler)}

    def check_head_state_dict(self, head: dict[str, torch.Tensor], source: str = "head state dict", *,
                              pooler_optional: bool = False) -> None:
        """Raise AdapterFileError unless ``head`` fits this model's task head exactly (names, shapes, finite
        values). ``pooler_optional``: the base model's pooler may be absent (AdapterHub saves heads of HF
        classes without it; the model then keeps its own)."""
        try:
            expected = {k: tuple(v.shape) for k, v in self.head_state_dict().items()}
        except AdapterFileError as exc:
            raise AdapterFileError(f"{source}: {exc}") from None
        check_state_dict(head, expected, f"{source}: head of {type(self.model).__name__}",
                         optional=(f"{self.parts.prefix}.pooler.",) if pooler_optional else ())

    def load_head_state_dict(self, head: dict[str, torch.Tensor], source: str = "head state dict", *,
                             pooler_optional: bool = False) -> None:
        """Copy ``head`` (checked first, see ``check_head_state_dict``) into the model's task head."""
        self.check_head_state_dict(head, source, pooler_optional=pooler_optional)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for key, value in head.items():
                params[key].copy_(value)

    def train_adapters(self, setup: Setup, *, train_head: bool | None = None, train_invertible: bool = True) -> None:
        """Freeze the model except the adapters in ``setup`` (with their invertible adapters unless
        ``train_invertible=False``) and, if ``train_head``, the task head. ``train_head=None`` means True for
        task models and False for masked-LM and causal-LM models (MAD-X trains language adapters with the
        embeddings, the LM head and the tied or untied projection frozen). Does not change the active setup."""
        names = adapter_names(normalize_setup(setup))
        for n in names:
            self._require(n)
        if train_head is None:
            train_head = not self.parts.has_lm_head
        for p in self.model.parameters():
            p.requires_grad_(False)
        for n in names:
            for module in self.layer_adapters(n).values():
                module.requires_grad_(True)
            inv = self.invertible_adapter(n)
            if inv is not None and train_invertible:
                inv.requires_grad_(True)
        if train_head:
            base_params = {id(p) for p in self.parts.base.parameters()}
            for module in self.head_modules().values():
                for p in module.parameters():
                    if id(p) not in base_params:  # e.g. a decoder tied to the word embeddings stays frozen
                        p.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def cast_backbone(self, dtype: torch.dtype = torch.bfloat16) -> None:
        """Keep the frozen backbone in ``dtype`` (e.g. bf16) while every adapter keeps float32 master
        weights. The task head of a model without an LM head (small, trained) also stays float32 and gets its
        inputs cast to float32, so it returns float32 logits; an LM head is backbone (its decoder is tied to
        the word embeddings). Activations then flow in ``dtype`` through the encoder: the adapter ops take
        fp32 weights with ``dtype`` activations, residuals and LayerNorm outputs all have ``dtype``.
        Call before creating the optimizer; ``dtype=torch.float32`` undoes it."""
        keep = {id(p) for n in self.configs for p in self.adapter_parameters(n)}
        heads = {} if self.parts.has_lm_head else self.head_modules()
        base_params = {id(p) for p in self.parts.base.parameters()}
        for module in heads.values():
            keep |= {id(p) for p in module.parameters() if id(p) not in base_params}
        for module in self.model.modules():
            for key, p in module._parameters.items():
                if p is not None and id(p) not in keep and p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)  # in place: keeps tied parameters tied and optimizer refs valid
            for key, b in module._buffers.items():
                if b is not None and b.is_floating_point() and b.dtype != dtype:
                    module._buffers[key] = b.to(dtype)
        for module in heads.values():
            for p in module.parameters():
                if id(p) in keep and p.dtype != torch.float32:
                    p.data = p.data.float()
        for handle in self._head_hooks:
            handle.remove()
        self._head_hooks = []
        if dtype != torch.float32:
            for module in heads.values():
                if any(True for _ in module.parameters()):
                    self._head_hooks.append(module.register_forward_pre_hook(_cast_inputs_to_float32,
                                                                             with_kwargs=True))
        self.backbone_dtype = dtype

    def set_backend(self, backend: str | None) -> None:
        """Kernel backend for every adapter op ("eager", "triton", "cuda", or None for the default)."""
        self.backend = backend
        for module in self._adapter_modules():
            module.backend = backend

    # ---------------------------------------------------------------------------------------------------
    # files (adapter_files.py)
    # ---------------------------------------------------------------------------------------------------
    def save_adapter(self, directory, name: str, *, overwrite: bool = False, with_head: bool = False) -> None:
        """Save adapter ``name`` in madx_fast's format (madx_adapter.json + madx_adapter.safetensors; with
        ``with_head`` also the task head, madx_head.safetensors)."""
        adapter_files.save_adapter(self, directory, name, overwrite=overwrite, with_head=with_head)

    def load_adapter(self, directory, *, load_as: str | None = None, overwrite: bool = False,
                     set_active: bool = False, with_head: bool = False) -> str:
        """Load an adapter saved by ``save_adapter`` or by AdapterHub (``save_adapter`` there; detected by
        its adapter_config.json) from a directory or a Hugging Face Hub repository (``org/name[@revision]
        [/folder]``, or an AdapterHub short name such as ``en/wiki@ukp``: ``madx_fast.model.hub``). Returns the
        adapter's name in the model."""
        return adapter_files.load_adapter(self, self._resolve(directory), load_as=load_as, overwrite=overwrite,
                                          set_active=set_active, with_head=with_head)

    def export_adapterhub(self, directory, name: str, *, safetensors: bool = False, with_head: bool = False,
                          overwrite: bool = False) -> None:
        """Write adapter ``name`` in AdapterHub's format (adapter_config.json + pytorch_adapter.bin, or
        adapter.safetensors), loadable with ``adapters``' ``model.load_adapter(directory)``."""
        adapter_files.export_adapterhub(self, directory, name, safetensors=safetensors, with_head=with_head,
                             overwrite=overwrite)

    def import_adapterhub(self, directory, *, load_as: str | None = None, overwrite: bool = False,
                          set_active: bool = False, with_head: bool = False) -> str:
        """Load an adapter written by AdapterHub's ``save_adapter``, from a directory or a Hub repository
        (as ``load_adapter``); returns its name in the model."""
        return adapter_files.import_adapterhub(self, self._resolve(directory), load_as=load_as, overwrite=overwrite,
                                               set_active=set_active, with_head=with_head)

    def push_adapter_to_hub(self, repo_id: str, name: str, *, with_head: bool = False, private: bool | None = None,
                            revision: str | None = None, commit_message: str | None = None,
                            token: str | None = None) -> str:
        """Push adapter ``name`` (madx_fast's format and a model card; ``with_head``: the task head too) to the
        Hugging Face Hub repository ``repo_id``, created if missing (push.py); returns the commit's URL."""
        from .push import push_adapter_to_hub
        return push_adapter_to_hub(self, repo_id, name, with_head=with_head, private=private, revision=revision,
                                   commit_message=commit_message, token=token)

    def _resolve(self, directory) -> str:
        """The local directory of an adapter given as a path or a Hub name (the model's base model name picks
        AdapterHub's short names)."""
        return resolve_adapter(directory, model_name=getattr(self.model.config, "name_or_path", None)).path

    # ---------------------------------------------------------------------------------------------------
    # training loss
    # ---------------------------------------------------------------------------------------------------
    def mlm_loss(self, input_ids, attention_mask=None, labels=None, **kwargs) -> torch.Tensor:
        """Masked-LM loss with the decoder computed only at masked positions (see ``madx_mlm_loss``)."""
        from .mlm_loss import madx_mlm_loss
        return madx_mlm_loss(self.model, input_ids, attention_mask, labels, **kwargs)

    def lm_loss(self, input_ids, attention_mask=None, labels=None, **kwargs) -> torch.Tensor:
        """The model's LM loss (masked or causal, ``objective=`` to choose) with the head and projection only at
        labelled positions (see ``madx_lm_loss``)."""
        from .mlm_loss import madx_lm_loss
        return madx_lm_loss(self.model, input_ids, attention_mask, labels, **kwargs)

    # ---------------------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Undo ``add_madx``: restore HF's modules and drop every adapter."""
        unwire(self._undo)
        for handle in self._head_hooks:
            handle.remove()
        base = self.parts.base
        if "invertible_adapters" in base._modules:
            del base._modules["invertible_adapters"]
        if self.model.__dict__.get("madx") is self:
            del self.model.__dict__["madx"]
            pretrained_record.remove_save_hook(self.model)
        self.configs.clear()
        self.state.active = ()

    def __repr__(self):
        items = ", ".join(f"{n}: {self.num_parameters(n):,} params" for n in self.configs)
        return f"MadxAdapters(active={self.active!r}, adapters={{{items}}})"

    # ---------------------------------------------------------------------------------------------------
    # internals
    # ---------------------------------------------------------------------------------------------------
    def _require(self, name: str) -> None:
        if name not in self.configs:
            have = sorted(self.configs) or "none"
            raise KeyError(f"no adapter named {name!r} in the model (adapters: {have})")

    def check_new_name(self, name: str, overwrite: bool = False) -> None:
        """Raise unless ``name`` is a valid adapter name that is free (or ``overwrite`` allows replacing it)."""
        check_adapter_name(name)
        if name in self.configs and not overwrite:
            raise AdapterExistsError(f"an adapter named {name!r} is already in the model; pass overwrite=True "
                                     "to replace it, or load_as=... to load under another name")

    def _adapter_modules(self):
        for slot in self._slots():
            yield from slot.adapters.values()
        yield from self.state.invertible.values()

    def _slots(self) -> list[nn.Module]:
        return [self.parts.slot(i) for i in range(self.parts.num_layers)]

    def _build(self, name: str, config: MadxConfig):
        """New modules for one adapter, not yet attached to the model (so a failure changes nothing)."""
        h, n = self.parts.hidden_size, self.parts.num_layers
        config.check_fits(h, n)
        layer_adapters = {}
        for i in config.layers(n):
            device = _module_device(self.parts.layers[i])
            with _seeded(config.init_weights_seed), torch.device(device):
                module = BottleneckAdapter(h, config.reduction_factor_for(i), activation=config.non_linearity,
                                           scaling=config.scaling, init_weights="bert", dropout=config.dropout,
                                           backend=self.backend)
                _init_bottleneck(module, config.init_weights)
            layer_adapters[i] = module.train(self.model.training)
        invertible = None
        if config.inv_adapter is not None:
            with _seeded(config.init_weights_seed), torch.device(_module_device(self.parts.embeddings)):
                invertible = InvertibleAdapter(h, config.inv_adapter_reduction_factor,
                                               activation=config.non_linearity, backend=self.backend)
            invertible.train(self.model.training)
        return layer_adapters, invertible

    def _attach(self, name, config, layer_adapters, invertible) -> None:
        for i, slot in enumerate(self._slots()):
            if i in layer_adapters:
                slot.adapters[name] = layer_adapters[i]
            elif name in slot.adapters:
                del slot.adapters[name]
        if invertible is not None:
            self.state.invertible[name] = invertible
        elif name in self.state.invertible:
            del self.state.invertible[name]
        self.configs[name] = config


def _average_coefficients(adapter_list, weights, normalize: bool) -> tuple[list[str], list[float]]:
    """``(names, coefficients)`` of ``average_adapter``: AdapterHub's weight handling (``stack.Average``'s)."""
    if isinstance(adapter_list, str):
        raise TypeError(f"adapter_list must be a list of adapter names (or a dict name -> weight), got the string "
                        f"{adapter_list!r}")
    if isinstance(adapter_list, dict):
        names = list(adapter_list)
        if weights is None:
            weights = list(adapter_list.values())
    else:
        names = list(adapter_list)
    if not names:
        raise ValueError("no adapters to average: give at least one adapter name")
    return names, list(Average(*names, weights=weights, normalize_weights=normalize).weights)


def _config_identity(config: MadxConfig) -> dict:
    """What must agree between adapters averaged into one (AdapterHub ignores dropout and initialisation)."""
    return {k: v for k, v in config.to_dict().items() if k not in ("dropout", "init_weights", "init_weights_seed")}


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def _seeded(seed):
    """AdapterHub's ``init_weights_seed``: the same seed before each module's init (without touching the
    caller's global RNG state afterwards)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _init_bottleneck(module: BottleneckAdapter, method: str) -> None:
    """Initialise like AdapterHub (the schemes live in ``BottleneckAdapter.reset_parameters``)."""
    try:
        module.reset_parameters(method)
    except ValueError as exc:
        raise AdapterConfigError(str(exc)) from None


def _cast_inputs_to_float32(module, args, kwargs):
    """Forward pre-hook of a float32 task head on a low-precision backbone."""
    def cast(x):
        return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


__all__ = ["AdapterExistsError", "MadxAdapters", "Stack", "add_madx", "check_adapter_name"]
