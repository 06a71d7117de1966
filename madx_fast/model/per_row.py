"""Many languages in one batch: per-row language adapters (``PerRow``) under a shared task adapter.

    madx.set_active(Stack(PerRow("en", "sw", "qu"), "ner"))
    with madx.row_languages(["sw", "en", "sw", "qu"]):        # one language per row of the batch
        logits = model(input_ids=ids, attention_mask=mask).logits

Row ``b`` then computes exactly what ``Stack(its language, "ner")`` computes on it alone: its language's NICE on
the embeddings, its language adapter then the shared task adapter in every layer, and (masked-LM models) its
language's NICE inverse before the decoder. Each per-row product is one grouped kernel launch for all the
languages (``madx_fast.ops.grouped_bottleneck_adapter`` / ``grouped_nice_forward`` / ``grouped_nice_inverse``),
with the languages' weights stacked over groups and the row -> language ids (``MadxState.row_groups``) a
device tensor: nothing reads the ids on the host, and the compiled graph or captured CUDA graph of one batch
shape serves every mix of languages.

Row languages come as names, as group ids (positions in the PerRow) in a list or a host tensor (both checked),
or as a device tensor of ids (used as is: checking it would need a host-device sync). A PerRow of one
language runs the single-adapter path, unchanged.

This module holds the per-row pieces the wired layers call (``wiring.py``) and the checks behind
``MadxAdapters.set_active`` / ``row_languages`` (``controller.py``).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from .. import ops, reference
from ..backends import resolve_backend
from .stack import PerRow, adapter_names, first_adapter, per_row_entry


# --------------------------------------------------------------------------------------------------------
# Row languages -> group ids
# --------------------------------------------------------------------------------------------------------
def row_group_ids(active: tuple, languages, device: torch.device | str | None = None) -> torch.Tensor:
    """The group id of every row (a 1-D integer tensor on ``device``) for the PerRow of the ``active`` setup.

    ``languages``: adapter names (``["sw", "en", ...]``), ids into the PerRow (a list or a CPU tensor; checked
    here, on the host), or a tensor of ids on the device (not checked: that would be a host-device sync).
    ``device=None`` leaves the ids where they are (names and lists become CPU tensors)."""
    entry = per_row_entry(active)
    if entry is None:
        raise ValueError("row languages need a PerRow in the active setup (e.g. "
                         "madx.set_active(Stack(PerRow('en', 'sw'), 'ner'))); the active setup has none")
    if isinstance(languages, torch.Tensor):
        ids = languages
        if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 1:
            raise ValueError(f"row languages as a tensor must be 1-D int32/int64 group ids (positions in "
                             f"{entry!r}), got dtype {ids.dtype} and shape {tuple(ids.shape)}")
        if ids.device.type == "cpu":
            _check_ids(ids.tolist(), entry)
    else:
        if isinstance(languages, (str, bytes)) or not isinstance(languages, Sequence):
            raise TypeError(f"row languages must be a list of adapter names or group ids, one per row, or a "
                            f"tensor of ids; got {type(languages).__name__}")
        values = [entry.index(v) if isinstance(v, str) else v for v in languages]
        _check_ids(values, entry)
        ids = torch.tensor(values, dtype=torch.long)
    if device is not None and ids.device != torch.device(device):
        if torch.device(device).type == "cuda" and ids.device.type == "cpu":
            ids = ids.pin_memory().to(device, non_blocking=True)
        else:
            ids = ids.to(device)
    return ids


def _check_ids(values, entry: PerRow) -> None:
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(entry):
            raise ValueError(f"row {i}: language {v!r} is neither one of {entry!r} nor a group id in "
                             f"[0, {len(entry)})")


def needs_row_languages(active: tuple) -> bool:
    """Whether a forward with this setup needs the row languages (a PerRow of two or more adapters)."""
    entry = per_row_entry(active)
    return entry is not None and len(entry) > 1


def row_groups(state, entry: PerRow, x: torch.Tensor) -> torch.Tensor:
    groups = state.row_groups
    if groups is None:
        raise ValueError(f"the active setup runs {entry!r}: say each row's language for this forward, e.g. "
                         f"`with model.madx.row_languages([...]):` (one name per row)")
    if groups.shape[0] != x.shape[0]:
        raise ValueError(f"row languages were given for {groups.shape[0]} rows, but the batch has {x.shape[0]} "
                         f"rows (tensor of shape {tuple(x.shape)})")
    return groups


# --------------------------------------------------------------------------------------------------------
# The per-row pieces the wired layers call
# --------------------------------------------------------------------------------------------------------
def stacked(tensors, what: str, entry: PerRow) -> torch.Tensor:
    """``torch.stack`` of one weight over the PerRow's languages (differentiable: each language's parameter
    gets its own gradient), with an error naming the languages when their shapes differ."""
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        listing = ", ".join(f"{n}: {tuple(t.shape)}" for n, t in zip(entry.labels, tensors))
        raise ValueError(f"{entry!r}: the languages' {what} differ in shape ({listing}); per-row languages need "
                         "adapters of one configuration")
    return torch.stack(tensors)


def grouped_backend(backend: str | None, device: torch.device) -> str:
    """The adapters' backend for the grouped ops: the CUDA C++ backend has no grouped kernels, so per-row
    adapters of a model on backend "cuda" run on the Triton ones."""
    name = resolve_backend(backend, device)
    return "triton" if name == "cuda" else name


class GroupedBottleneck:
    """The per-row language adapters of one layer, called like a ``BottleneckAdapter``: ``(x, residual) -> y``
    with row ``b`` of ``x [B, L, H]`` through the adapter of the language the row ids give it."""

    def __init__(self, modules, entry: PerRow, state, layer: int):
        self.modules, self.entry, self.state, self.layer = modules, entry, state, layer

    @property
    def backend(self) -> str | None:
        """The backend its adapter modules ask for (the first one's), which the wiring's add + LayerNorm follows."""
        return self.modules[0].backend

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        groups = row_groups(self.state, self.entry, x)
        first = self.modules[0]
        downs = [m.adapter_down[0] for m in self.modules]
        ups = [m.adapter_up for m in self.modules]
        what = f"layer {self.layer} adapter"
        w_down = stacked([d.weight for d in downs], f"{what} down-projection weights", self.entry)
        b_down = stacked([d.bias for d in downs], f"{what} down-projection biases", self.entry)
        w_up = stacked([u.weight for u in ups], f"{what} up-projection weights", self.entry)
        b_up = stacked([u.bias for u in ups], f"{what} up-projection biases", self.entry)
        if first.training and first.dropout.p > 0:
            # Dropout sits between the scaled adapter output and the residual add: not in the fused kernels.
            r = x if residual is None else residual
            delta = reference.grouped_bottleneck_adapter_reference(
                x, torch.zeros_like(r), groups, w_down, b_down, w_up, b_up, first.scaling, first.activation)
            return r + first.dropout(delta)
        return ops.grouped_bottleneck_adapter(x, residual, groups, w_down, b_down, w_up, b_up,
                                              scaling=first.scaling, activation=first.activation,
                                              backend=grouped_backend(first.backend, x.device))


def layer_adapter(adapters, entry: PerRow, state, layer: int):
    """What a layer runs for a PerRow entry of the setup: None when no language has an adapter in this layer,
    the adapter itself for a one-language PerRow (the single-adapter path), else a ``GroupedBottleneck``."""
    present = [n for n in entry.names if n in adapters]
    if not present:
        return None
    if len(entry) == 1:
        return adapters[entry.names[0]]
    if len(present) != len(entry):
        missing = [n for n in entry.names if n not in adapters]
        raise ValueError(f"{entry!r}: layer {layer} has adapters for {present} but not for {missing}; per-row "
                         "languages need adapters in the same layers")
    return GroupedBottleneck([adapters[n] for n in entry.names], entry, state, layer)


def invertible(state, entry: PerRow, x: torch.Tensor, inverse: bool) -> torch.Tensor:
    """The NICE coupling (``inverse=False``, on the embeddings) or its inverse (before the masked-LM decoder)
    of each row's language. ``x: [rows, ..., H]`` with one row language per row."""
    firsts = [first_adapter(m) for m in entry.names]  # an Average member: its first adapter's (as AdapterHub)
    modules = [state.invertible[n] if n in state.invertible else None for n in firsts]
    if all(m is None for m in modules):
        return x
    if len(entry) == 1:
        return modules[0].inverse(x) if inverse else modules[0](x)
    if any(m is None for m in modules):
        have = [n for n, m in zip(firsts, modules) if m is not None]
        lack = [n for n, m in zip(firsts, modules) if m is None]
        raise ValueError(f"{entry!r}: {have} have invertible adapters but {lack} do not; per-row languages need "
                         "adapters of one configuration")
    groups = row_groups(state, entry, x)
    names = ("F.0.weight", "F.0.bias", "F.2.weight", "F.2.bias", "G.0.weight", "G.0.bias", "G.2.weight",
             "G.2.bias")
    per_module = [m.weights() for m in modules]
    weights = [stacked([w[i] for w in per_module], f"invertible adapter {names[i]}", entry) for i in range(8)]
    first = modules[0]
    fn = ops.grouped_nice_inverse if inverse else ops.grouped_nice_forward
    return fn(x, groups, *weights, activation=first.activation, recompute=first.recompute,
              backend=grouped_backend(first.backend, x.device))


@contextlib.contextmanager
def select_rows(state, row_index: torch.Tensor | None):
    """Within the block, the row ids follow tensors whose rows were gathered from the batch (``hidden[row_index]``,
    e.g. the labelled positions the LM loss decodes); a no-op when no row ids are set or ``row_index`` is None."""
    previous = state.row_groups
    if previous is None or row_index is None:
        yield
        return
    state.row_groups = previous[row_index]
    try:
        yield
    finally:
        state.row_groups = previous


# --------------------------------------------------------------------------------------------------------
# Checks at set_active
# --------------------------------------------------------------------------------------------------------
def check_compatible(madx, entry: PerRow) -> None:
    """The adapters of a PerRow (those its Average members average too) run as one grouped op per layer: same layers, bottleneck sizes, activation,
    scaling and dropout, and all or none with an invertible adapter of one shape. Raises naming the first
    difference."""
    names = adapter_names((entry,))  # Average members: every adapter they average
    first = names[0]
    ref_layers = madx.layer_adapters(first)
    ref_inv = madx.invertible_adapter(first)
    for name in names[1:]:
        layers = madx.layer_adapters(name)
        if set(layers) != set(ref_layers):
            raise ValueError(f"{entry!r}: {name!r} has adapters in layers {sorted(layers)} but {first!r} in "
                             f"{sorted(ref_layers)}; per-row languages need adapters in the same layers")
        for i in sorted(layers):
            a, b = layers[i], ref_layers[i]
            for what, va, vb in (("bottleneck size", a.bottleneck, b.bottleneck),
                                 ("activation", a.activation, b.activation), ("scaling", a.scaling, b.scaling),
                                 ("dropout", a.dropout.p, b.dropout.p)):
                if va != vb:
                    raise ValueError(f"{entry!r}: layer {i}: {name!r} has {what} {va} but {first!r} has {vb}; "
                                     "per-row languages need adapters of one configuration")
        inv = madx.invertible_adapter(name)
        if (inv is None) != (ref_inv is None):
            raise ValueError(f"{entry!r}: {name!r} {'has no' if inv is None else 'has an'} invertible adapter but "
                             f"{first!r} {'has one' if inv is None else 'has none'}; per-row languages need "
                             "adapters of one configuration")
        if inv is not None:
            shape = [tuple(w.shape) for w in inv.weights()]
            ref_shape = [tuple(w.shape) for w in ref_inv.weights()]
            if shape != ref_shape or inv.activation != ref_inv.activation:
                raise ValueError(f"{entry!r}: the invertible adapters of {name!r} and {first!r} differ (shapes "
                                 f"{shape[0]}/{shape[4]} vs {ref_shape[0]}/{ref_shape[4]}, activation "
                                 f"{inv.activation} vs {ref_inv.activation})")
