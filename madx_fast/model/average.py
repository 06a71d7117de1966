"""Running an ``Average`` entry of the active setup: several adapters on the same input, their outputs combined
with weights in every layer (a language without an adapter of its own served by related languages' adapters).

    madx.set_active(Stack(Average("es", "pt", weights=[0.7, 0.3]), "ner"))
    madx.set_active(Stack(PerRow("sw", Average("es", "pt", name="qu")), "ner"))   # per-row ensembles

An ``Average`` whose adapters share one configuration (bottleneck size, activation, scaling) runs as ONE fused
op per layer (``madx_fast.ops.average_bottleneck_adapter``: the adapters' weights stacked, the coefficients
applied inside the kernels); adapters of different configurations, or dropout while training, run one by one
through their own modules and are summed (what AdapterHub does). A ``PerRow`` with ``Average`` members runs
all its rows in one grouped op: every member padded to the largest ensemble with zero-weight adapters of
coefficient 0 (a plain name is an ensemble of one with coefficient 1).

Coefficients (``Average.mix()``): the weights, or the weights over n with ``adapterhub_compat``. Float weights
become a device tensor once per block and device (``MadxState.mixes``, kept: no host-to-device copy per
forward, and a captured CUDA graph's tensor stays valid); tensor weights (test-time ensembling) are used as they are, gradients included.
"""
from __future__ import annotations

import torch

from .. import ops, reference
from .per_row import grouped_backend, row_groups, stacked
from .stack import Average, PerRow


def _mix_tensor(state, key, values, device) -> torch.Tensor:
    """The cached float32 device tensor of constant coefficients ``values`` (nested lists allowed)."""
    cache_key = (key, device)
    t = state.mixes.get(cache_key)
    if t is None:
        t = state.mixes[cache_key] = torch.tensor(values, dtype=torch.float32, device=device)
    return t


def average_mix(state, entry: Average, device) -> torch.Tensor:
    """``[K]`` coefficients of an Average on ``device``: cached for float weights, the live tensor otherwise."""
    mix = entry.mix()
    if isinstance(mix, torch.Tensor):
        return mix.to(device=device, dtype=torch.float32)
    return _mix_tensor(state, entry, list(mix), device)


def _same_configuration(modules) -> bool:
    first = modules[0]
    return all(m.bottleneck == first.bottleneck and m.activation == first.activation and m.scaling == first.scaling
               for m in modules[1:])


def _stacked_weights(module_lists, entry, what: str, over_groups: bool):
    """``(w_down, b_down, w_up, b_up)`` stacked over the modules of each list ``[K, ...]`` and, with
    ``over_groups``, over the lists ``[G, K, ...]``; a missing module (None) is an adapter of zeros.
    Differentiable: each adapter's parameters get their own gradients."""
    out = []
    for attr in ("adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight", "adapter_up.bias"):
        ref = next(m for ms in module_lists for m in ms if m is not None).get_parameter(attr)
        rows = [torch.stack([m.get_parameter(attr) if m is not None else torch.zeros_like(ref) for m in ms])
                for ms in module_lists]
        out.append(stacked(rows, f"{what} {attr}", entry) if over_groups else rows[0])
    return out


class AverageBottleneck:
    """The adapters of an ``Average`` in one layer, called like a ``BottleneckAdapter``: ``(x, residual) -> y``."""

    def __init__(self, modules, entry: Average, state, layer: int):
        self.modules, self.entry, self.state, self.layer = modules, entry, state, layer

    @property
    def backend(self) -> str | None:
        """The backend its adapter modules ask for (the first one's), which the wiring's add + LayerNorm follows."""
        return self.modules[0].backend

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        mix = average_mix(self.state, self.entry, x.device)
        first = self.modules[0]
        dropout = first.training and any(m.dropout.p > 0 for m in self.modules)
        if dropout or not _same_configuration(self.modules):
            # one adapter at a time (each its own dropout mask, as AdapterHub draws them), summed
            out = None
            for k, module in enumerate(self.modules):
                term = mix[k].to(x.dtype) * module(x, residual)
                out = term if out is None else out + term
            return out
        wd, bd, wu, bu = _stacked_weights([self.modules], self.entry.names, f"layer {self.layer} adapter", False)
        return ops.average_bottleneck_adapter(x, residual, mix, wd, bd, wu, bu, scaling=first.scaling,
                                              activation=first.activation,
                                              backend=grouped_backend(first.backend, x.device))


def layer_adapter(adapters, entry: Average, state, layer: int):
    """What a layer runs for an Average entry: None when none of its adapters is in this layer, else an
    ``AverageBottleneck`` (all of them must be here: an average over some layers' subsets is refused)."""
    present = [n for n in entry.names if n in adapters]
    if not present:
        return None
    if len(present) != len(entry):
        missing = [n for n in entry.names if n not in adapters]
        raise ValueError(f"{entry!r}: layer {layer} has adapters for {present} but not for {missing}; averaged "
                         "adapters need adapters in the same layers")
    return AverageBottleneck([adapters[n] for n in entry.names], entry, state, layer)


# --------------------------------------------------------------------------------------------------------
# PerRow members that are Averages: per-row ensembles in one grouped op
# --------------------------------------------------------------------------------------------------------
def has_average(entry: PerRow) -> bool:
    return any(isinstance(m, Average) for m in entry.names)


def _member_names(member) -> tuple[str, ...]:
    return member.names if isinstance(member, Average) else (member,)


def per_row_mix(state, entry: PerRow, device) -> torch.Tensor:
    """``[G, K]`` coefficients of a PerRow's members (a name: ``[1, 0, ...]``), padded with zeros to the
    largest ensemble K."""
    k = max(len(_member_names(m)) for m in entry.names)
    mixes = [m.mix() if isinstance(m, Average) else (1.0,) for m in entry.names]
    if not any(isinstance(m, torch.Tensor) for m in mixes):
        return _mix_tensor(state, entry, [list(m) + [0.0] * (k - len(m)) for m in mixes], device)
    rows = []
    for m in mixes:
        t = m.to(device=device, dtype=torch.float32) if isinstance(m, torch.Tensor) else torch.tensor(
            m, dtype=torch.float32, device=device)
        rows.append(torch.cat([t, t.new_zeros(k - t.shape[0])]))
    return torch.stack(rows)


class PerRowAverage:
    """The per-row members of one layer (names and Averages), called like a ``BottleneckAdapter``: row ``b``
    through the ensemble of its member."""

    def __init__(self, module_lists, entry: PerRow, state, layer: int):
        self.module_lists, self.entry, self.state, self.layer = module_lists, entry, state, layer

    @property
    def backend(self) -> str | None:
        """The backend its adapter modules ask for (the first one's), which the wiring's add + LayerNorm follows."""
        return self.module_lists[0][0].backend

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        groups = row_groups(self.state, self.entry, x)
        mix = per_row_mix(self.state, self.entry, x.device)
        k = mix.shape[1]
        padded = [list(ms) + [None] * (k - len(ms)) for ms in self.module_lists]
        wd, bd, wu, bu = _stacked_weights(padded, self.entry, f"layer {self.layer} adapter", True)
        first = self.module_lists[0][0]
        if first.training and first.dropout.p > 0:
            # Dropout between the combined delta and the residual add: not in the fused kernels.
            r = x if residual is None else residual
            coef = mix.sum(-1)[groups].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
            delta = reference.average_bottleneck_adapter_reference(
                x, torch.zeros_like(r), mix, wd, bd, wu, bu, first.scaling, first.activation, groups=groups)
            return coef * r + first.dropout(delta)
        return ops.average_bottleneck_adapter(x, residual, mix, wd, bd, wu, bu, groups=groups, scaling=first.scaling,
                                              activation=first.activation,
                                              backend=grouped_backend(first.backend, x.device))


def per_row_layer_adapter(adapters, entry: PerRow, state, layer: int):
    """A PerRow with Average members in one layer: None when none of its adapters is here, else a
    ``PerRowAverage`` (every adapter of every member must be here)."""
    if len(entry) == 1:  # every row in the one member: the Average itself
        return layer_adapter(adapters, entry.names[0], state, layer)
    names = [n for m in entry.names for n in _member_names(m)]
    present = [n for n in names if n in adapters]
    if not present:
        return None
    if len(present) != len(names):
        missing = sorted({n for n in names if n not in adapters})
        raise ValueError(f"{entry!r}: layer {layer} has adapters for {sorted(set(present))} but not for {missing}; "
                         "per-row languages need adapters in the same layers")
    return PerRowAverage([[adapters[n] for n in _member_names(m)] for m in entry.names], entry, state, layer)
