"""Adapter configuration: ``MadxConfig`` and its conversion to and from AdapterHub's ``BnConfig`` dicts.

madx_fast implements one adapter architecture, MAD-X's sequential bottleneck with "Pfeiffer" placement
(AdapterHub ``seq_bn`` / ``pfeiffer``), optionally with a NICE invertible adapter (``seq_bn_inv`` /
``pfeiffer+inv``). ``MadxConfig`` holds the options that change the function within that architecture; the
AdapterHub options that would change the architecture itself (``ln_before``, ``is_parallel``, gating, PHM,
...) must have their Pfeiffer values, and a file asking for anything else is refused by name.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from .. import reference
from ..modules import BottleneckAdapter, InvertibleAdapter, bottleneck_size


class AdapterConfigError(ValueError):
    """An adapter configuration madx_fast cannot run: the message names the option and the value."""


# AdapterHub 1.3.0 BnConfig fields with the values of its "seq_bn" preset, in declaration order. Exported
# adapter_config.json files carry all of them, as `adapters` writes them.
ADAPTERHUB_SEQ_BN_DEFAULTS: dict[str, Any] = {
    "mh_adapter": False,
    "output_adapter": True,
    "reduction_factor": 16,
    "non_linearity": "relu",
    "original_ln_before": True,
    "original_ln_after": True,
    "ln_before": False,
    "ln_after": False,
    "init_weights": "bert",
    "init_weights_seed": None,
    "is_parallel": False,
    "scaling": 1.0,
    "use_gating": False,
    "residual_before_ln": True,
    "adapter_residual_before_ln": False,
    "inv_adapter": None,
    "inv_adapter_reduction_factor": None,
    "cross_adapter": False,
    "leave_out": [],
    "dropout": 0.0,
    "phm_layer": False,
    "phm_dim": 4,
    "factorized_phm_W": True,
    "shared_W_phm": False,
    "shared_phm_rule": True,
    "factorized_phm_rule": False,
    "phm_c_init": "normal",
    "phm_init_range": 0.0001,
    "learn_phm": True,
    "hypercomplex_nonlinearity": "glorot-uniform",
    "phm_rank": 1,
    "phm_bias": True,
    "stochastic_depth": 0.0,
}

# Options that select the architecture: anything but these values is a different adapter.
_ARCHITECTURE_FIXED = {
    "mh_adapter": False,
    "output_adapter": True,
    "original_ln_before": True,
    "original_ln_after": True,
    "ln_before": False,
    "ln_after": False,
    "is_parallel": False,
    "use_gating": False,
    "residual_before_ln": True,
    "adapter_residual_before_ln": False,
    "cross_adapter": False,
    "phm_layer": False,
    "stochastic_depth": 0.0,
}
# PHM sub-options only matter with phm_layer=True (refused above): any value is accepted and dropped.
_IGNORED_WITHOUT_PHM = {
    "phm_dim", "factorized_phm_W", "shared_W_phm", "shared_phm_rule", "factorized_phm_rule", "phm_c_init",
    "phm_init_range", "learn_phm", "hypercomplex_nonlinearity", "phm_rank", "phm_bias",
}
INIT_METHODS = ("bert", "mam_adapter", "houlsby")

# AdapterHub config names for this architecture (its ADAPTER_CONFIG_MAP keys).
_PRESETS = {"seq_bn": False, "pfeiffer": False, "seq_bn_inv": True, "pfeiffer+inv": True}


@dataclass
class MadxConfig:
    """One adapter: a bottleneck ``A`` at the FFN output of every layer not in ``leave_out``, and, with
    ``inv_adapter="nice"``, an invertible adapter on the embeddings (used when the adapter is first in the
    active stack). Field names and meanings are AdapterHub's:

    - ``reduction_factor``: bottleneck ``d = int(H // reduction_factor)``; a number, or a mapping from layer
      index (as a string) to a number with an optional ``"default"``.
    - ``non_linearity``: activation of the bottleneck and of the NICE sub-networks (``relu``, ``gelu``, ...).
    - ``scaling``: ``s`` in ``r + s * up(act(down(x)))``.
    - ``init_weights``: ``"bert"`` (N(0, 0.02), zero biases), ``"mam_adapter"`` (identity at start) or
      ``"houlsby"``; ``init_weights_seed`` re-seeds before each layer's adapter (same init in every layer).
    - ``leave_out``: layer indices with no adapter (``[11]`` is "MAD-X 2.0" on a 12-layer model).
    - ``dropout``: dropout on the adapter's output before the residual add (training only).
    - ``inv_adapter``: ``None`` or ``"nice"``; ``inv_adapter_reduction_factor`` sizes its sub-networks.
    """

    reduction_factor: float | dict[str, float] = 16
    non_linearity: str = "relu"
    scaling: float = 1.0
    init_weights: str = "bert"
    init_weights_seed: int | None = None
    leave_out: list[int] = field(default_factory=list)
    dropout: float = 0.0
    inv_adapter: str | None = None
    inv_adapter_reduction_factor: float | None = None

    def __post_init__(self):
        self.validate()

    # ---------------------------------------------------------------------------------------------------
    # presets
    # ---------------------------------------------------------------------------------------------------
    @classmethod
    def seq_bn(cls, **overrides) -> "MadxConfig":
        """AdapterHub ``seq_bn`` ("pfeiffer"): reduction factor 16, relu, no invertible adapter."""
        return cls(**overrides)

    @classmethod
    def seq_bn_inv(cls, **overrides) -> "MadxConfig":
        """AdapterHub ``seq_bn_inv`` ("pfeiffer+inv"): ``seq_bn`` plus a NICE invertible adapter (rf 2)."""
        overrides.setdefault("inv_adapter", "nice")
        overrides.setdefault("inv_adapter_reduction_factor", 2)
        return cls(**overrides)

    @classmethod
    def language(cls, reduction_factor: float = 2, **overrides) -> "MadxConfig":
        """A MAD-X language adapter as in the paper: reduction factor 2 plus a NICE invertible adapter (rf 2)."""
        return cls.seq_bn_inv(reduction_factor=reduction_factor, **overrides)

    @classmethod
    def task(cls, reduction_factor: float = 16, **overrides) -> "MadxConfig":
        """A MAD-X task adapter: ``seq_bn`` with no invertible adapter (reduction factor 16 by default)."""
        return cls.seq_bn(reduction_factor=reduction_factor, **overrides)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "MadxConfig":
        """``"seq_bn"``/``"pfeiffer"``, ``"seq_bn_inv"``/``"pfeiffer+inv"``, ``"language"`` or ``"task"``."""
        key = name.lower()
        if key == "language":
            return cls.language(**overrides)
        if key == "task":
            return cls.task(**overrides)
        if key not in _PRESETS:
            raise AdapterConfigError(
                f"unknown adapter config name {name!r}; madx_fast runs {sorted(_PRESETS) + ['language', 'task']}"
            )
        return cls.seq_bn_inv(**overrides) if _PRESETS[key] else cls.seq_bn(**overrides)

    @classmethod
    def coerce(cls, config: "MadxConfig | str | Mapping | None") -> "MadxConfig":
        """Accept a MadxConfig, a preset name, our own dict, or an AdapterHub BnConfig dict/object."""
        if config is None:
            return cls.seq_bn()
        if isinstance(config, MadxConfig):
            return config
        if isinstance(config, str):
            return cls.from_name(config)
        if isinstance(config, Mapping):
            own = {f.name for f in fields(cls)}
            if set(config) <= own:
                return cls(**dict(config))
            return cls.from_adapterhub(config)
        raise AdapterConfigError(f"cannot make an adapter config from a {type(config).__name__}")

    # ---------------------------------------------------------------------------------------------------
    # checks
    # ---------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise AdapterConfigError naming the first option madx_fast cannot run."""
        rf = self.reduction_factor
        if isinstance(rf, Mapping):
            if not rf:
                raise AdapterConfigError("reduction_factor mapping is empty; give at least a 'default'")
            for key, value in rf.items():
                if key != "default" and not str(key).isdigit():
                    raise AdapterConfigError(
                        f"reduction_factor mapping key {key!r} is neither a layer index nor 'default'"
                    )
                _check_positive("reduction_factor", value, where=f"[{key!r}]")
            self.reduction_factor = {str(k): v for k, v in rf.items()}
        else:
            _check_positive("reduction_factor", rf)
        try:
            reference.canonical_activation(self.non_linearity)
        except ValueError as exc:
            raise AdapterConfigError(f"non_linearity: {exc}") from None
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling):
            raise AdapterConfigError(
                f"scaling must be a finite number, got {self.scaling!r} (learned or per-channel scaling is not "
                "supported)"
            )
        self.scaling = float(self.scaling)
        if self.init_weights not in INIT_METHODS:
            raise AdapterConfigError(f"init_weights {self.init_weights!r} is not one of {INIT_METHODS}")
        if self.init_weights_seed is not None and (
            isinstance(self.init_weights_seed, bool) or not isinstance(self.init_weights_seed, int)
        ):
            raise AdapterConfigError(f"init_weights_seed must be an int or None, got {self.init_weights_seed!r}")
        if self.leave_out is None:
            self.leave_out = []
        if isinstance(self.leave_out, (str, bytes)) or not hasattr(self.leave_out, "__iter__"):
            raise AdapterConfigError(f"leave_out must be a list of layer indices, got {self.leave_out!r}")
        leave_out = list(self.leave_out)
        for i in leave_out:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise AdapterConfigError(f"leave_out entries must be layer indices >= 0, got {i!r}")
        self.leave_out = sorted(set(leave_out))
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise AdapterConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if self.inv_adapter is not None:
            if self.inv_adapter == "glow":
                raise AdapterConfigError(
                    "inv_adapter 'glow' is not supported (AdapterHub's GLOW coupling is broken upstream); use 'nice'"
                )
            if self.inv_adapter != "nice":
                raise AdapterConfigError(f"inv_adapter must be None or 'nice', got {self.inv_adapter!r}")
            if self.inv_adapter_reduction_factor is None:
                raise AdapterConfigError("inv_adapter 'nice' needs inv_adapter_reduction_factor (MAD-X uses 2)")
            _check_positive("inv_adapter_reduction_factor", self.inv_adapter_reduction_factor)

    def reduction_factor_for(self, layer: int) -> float:
        """The reduction factor of ``layer`` (a mapping needs the layer's key or a ``"default"``)."""
        rf = self.reduction_factor
        if not isinstance(rf, Mapping):
            return rf
        if str(layer) in rf:
            return rf[str(layer)]
        if "default" in rf:
            return rf["default"]
        raise AdapterConfigError(
            f"reduction_factor mapping {rf} gives no value for layer {layer} and no 'default'"
        )

    def check_fits(self, hidden_size: int, num_layers: int) -> None:
        """Raise AdapterConfigError when this config cannot be built on a model of this size."""
        bad = [i for i in self.leave_out if i >= num_layers]
        if bad:
            raise AdapterConfigError(f"leave_out names layer(s) {bad} but the model has {num_layers} layers")
        if isinstance(self.reduction_factor, Mapping):
            bad = [k for k in self.reduction_factor if k != "default" and int(k) >= num_layers]
            if bad:
                raise AdapterConfigError(
                    f"reduction_factor names layer(s) {bad} but the model has {num_layers} layers"
                )
        for i in self.layers(num_layers):
            rf = self.reduction_factor_for(i)
            try:
                bottleneck_size(hidden_size, rf)
            except ValueError:
                raise AdapterConfigError(
                    f"reduction_factor {rf} leaves no bottleneck at hidden size {hidden_size} (layer {i})"
                ) from None
        if self.inv_adapter is not None and min(reference.nice_hidden_sizes(
                hidden_size, self.inv_adapter_reduction_factor)) < 1:
            raise AdapterConfigError(
                f"inv_adapter_reduction_factor {self.inv_adapter_reduction_factor} leaves no hidden units at "
                f"hidden size {hidden_size}"
            )

    def layers(self, num_layers: int) -> list[int]:
        """Indices of the layers that get an adapter."""
        skip = set(self.leave_out)
        return [i for i in range(num_layers) if i not in skip]

    def state_shapes(self, hidden_size: int, num_layers: int) -> dict[str, tuple[int, ...]]:
        """Key -> shape of every weight of an adapter of this config on a model of this size, under the
        model-independent keys of ``MadxAdapters.adapter_state_dict`` (``layers.{i}.adapter_up.weight``,
        ``invertible.F.0.weight``, ...). Raises AdapterConfigError when the config does not fit the model."""
        self.check_fits(hidden_size, num_layers)
        shapes = {}
        for i in self.layers(num_layers):
            d = bottleneck_size(hidden_size, self.reduction_factor_for(i))
            shapes.update({f"layers.{i}.{k}": s for k, s in BottleneckAdapter.parameter_shapes(hidden_size, d).items()})
        if self.inv_adapter is not None:
            inv = InvertibleAdapter.parameter_shapes(hidden_size, self.inv_adapter_reduction_factor)
            shapes.update({f"invertible.{k}": s for k, s in inv.items()})
        return shapes

    def num_parameters(self, hidden_size: int, num_layers: int) -> int:
        """Parameters of an adapter of this config on a model of this size (from ``state_shapes``)."""
        return sum(math.prod(s) for s in self.state_shapes(hidden_size, num_layers).values())

    # ---------------------------------------------------------------------------------------------------
    # serialisation
    # ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MadxConfig":
        """Our own JSON form; unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterConfigError(f"unknown adapter option(s) {unknown}; known options are {sorted(known)}")
        return cls(**dict(data))

    def to_adapterhub(self) -> dict[str, Any]:
        """The full AdapterHub BnConfig dict (every field, as ``adapters`` writes it to adapter_config.json)."""
        out = dict(ADAPTERHUB_SEQ_BN_DEFAULTS)
        rf = self.reduction_factor
        out.update(
            reduction_factor=dict(rf) if isinstance(rf, Mapping) else _plain_number(rf),
            non_linearity=self.non_linearity,
            scaling=self.scaling,
            init_weights=self.init_weights,
            init_weights_seed=self.init_weights_seed,
            leave_out=list(self.leave_out),
            dropout=self.dropout,
            inv_adapter=self.inv_adapter,
            inv_adapter_reduction_factor=None if self.inv_adapter is None
            else _plain_number(self.inv_adapter_reduction_factor),
        )
        return out

    @classmethod
    def from_adapterhub(cls, config: Mapping[str, Any]) -> "MadxConfig":
        """Read an AdapterHub BnConfig dict (the ``"config"`` entry of adapter_config.json, or a BnConfig).

        Unknown options and options that select another architecture are refused with their names."""
        data = dict(config.items()) if not hasattr(config, "to_dict") else dict(config.to_dict())
        data = {**data, **{k: v for k, v in getattr(config, "__dict__", {}).items() if k not in data}}
        architecture = data.pop("architecture", None)
        if architecture not in (None, "bottleneck"):
            raise AdapterConfigError(
                f"adapter architecture {architecture!r} is not supported; madx_fast runs bottleneck adapters "
                "(AdapterHub seq_bn / seq_bn_inv)"
            )
        legacy_inv = data.pop("invertible_adapter", None)  # adapter-transformers v1: nested {block_type, ...}
        if legacy_inv:
            data.setdefault("inv_adapter", legacy_inv.get("block_type"))
            data.setdefault("inv_adapter_reduction_factor", legacy_inv.get("reduction_factor"))
        unknown = sorted(set(data) - set(ADAPTERHUB_SEQ_BN_DEFAULTS))
        if unknown:
            raise AdapterConfigError(f"unknown adapter option(s) {unknown} in AdapterHub config")
        for key, want in _ARCHITECTURE_FIXED.items():
            if key in data and not _same(data[key], want):
                raise AdapterConfigError(
                    f"adapter option {key}={data[key]!r} is not supported: madx_fast runs the MAD-X "
                    f"('Pfeiffer', seq_bn) placement, which needs {key}={want!r}"
                )
        for key in ("reduction_factor", "non_linearity"):
            if key not in data:
                raise AdapterConfigError(f"AdapterHub config lacks the required option {key!r}")
        own = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in own}
        if kwargs.get("inv_adapter") is None:
            kwargs["inv_adapter_reduction_factor"] = None
        return cls(**kwargs)


def _check_positive(name, value, where=""):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise AdapterConfigError(f"{name}{where} must be a positive number, got {value!r}")


def _plain_number(x):
    """16.0 -> 16 so that exported JSON looks like AdapterHub's."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _same(a, b):
    if isinstance(b, bool) or isinstance(a, bool):
        return a is b or a == b and type(a) is type(b)
    return a == b
