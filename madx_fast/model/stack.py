"""The active adapter setup: one adapter, or a ``Stack`` of adapters applied in order.

MAD-X uses exactly these two setups: ``"en"`` (stage 1, language adapter alone) and ``Stack("en", "ner")``
(stages 2 and 3). Internally a setup is a tuple of adapter names, which is what the wired layers read on
every forward (a plain tuple: torch.compile guards on it and recompiles when the setup changes).

``PerRow("en", "sw", "qu")`` in place of one name runs many languages in one batch: each row of the batch uses
its own language's adapter (``Stack(PerRow("en", "sw"), "ner")``: per-row language adapters under a shared
task adapter). Which row has which language is data given per batch (``MadxAdapters.row_languages``), not
part of the setup: one setup, and so one compiled graph, serves every mix of languages.

``Average("es", "pt", weights=[0.7, 0.3])`` in place of one name (in a Stack, or as a member of a PerRow)
combines several adapters' outputs with weights in every layer: a language without an adapter of its own
served by related languages' adapters (``average.py`` runs it).
"""
from __future__ import annotations

import math
from typing import Iterable, Union

import torch


class Stack:
    """Adapters applied one after the other in every layer: ``Stack("en", "ner")``.

    The invertible adapter of the first adapter (the language adapter) runs on the embeddings and, inverted,
    before the masked-LM decoder."""

    def __init__(self, *names: "str | PerRow | Average"):
        if len(names) == 1 and isinstance(names[0], (list, tuple)):
            names = tuple(names[0])
        self.names = tuple(names)

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)

    def __eq__(self, other):
        return isinstance(other, Stack) and self.names == other.names

    def __hash__(self):
        return hash(("Stack",) + self.names)

    def __repr__(self):
        return "Stack(" + ", ".join(repr(n) for n in self.names) + ")"

    def first(self) -> str:
        return self.names[0]


class PerRow:
    """Per-row adapters: row ``b`` of a batch runs the adapter ``names[i]`` that ``MadxAdapters.row_languages``
    gives it (its language), e.g. ``Stack(PerRow("en", "sw", "qu"), "ner")``. All the named adapters run in one
    grouped kernel launch per product; their invertible (NICE) adapters run per row too when the PerRow is
    first in the setup. A row's outputs equal running it alone with ``Stack(its language, "ner")``.

    A member may be an ``Average`` (a language served by an ensemble of adapters, e.g. ``PerRow("sw",
    Average("es", "pt", name="qu"))``): its rows run the weighted average of its adapters (and its first
    adapter's NICE); row languages name it by its ``label``."""

    def __init__(self, *names: "str | Average"):
        if len(names) == 1 and isinstance(names[0], (list, tuple)):
            names = tuple(names[0])
        if not names:
            raise ValueError("PerRow needs at least one adapter name")
        for n in names:
            if not isinstance(n, (str, Average)):
                raise ValueError(f"PerRow holds adapter names and Average blocks only, got {n!r}")
        self.names = tuple(names)
        labels = self.labels
        if len(set(labels)) != len(labels):
            raise ValueError(f"PerRow{tuple(names)} names a language twice")

    @property
    def labels(self) -> tuple[str, ...]:
        """The name of each member as row languages give it: an adapter name, or an Average's ``label``."""
        return tuple(member_label(n) for n in self.names)

    def index(self, name: str) -> int:
        """The group id of member ``name`` (its position in the PerRow; an Average by its label)."""
        try:
            return self.labels.index(name)
        except ValueError:
            raise KeyError(f"{name!r} is not one of the per-row adapters {self!r}") from None

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)

    def __eq__(self, other):
        return isinstance(other, PerRow) and self.names == other.names

    def __hash__(self):
        return hash(("PerRow",) + self.names)

    def __repr__(self):
        return "PerRow(" + ", ".join(repr(n) for n in self.names) + ")"


class Average:
    """Several adapters in parallel in every layer, their outputs combined with weights: AdapterHub 1.3's
    ``Average(*adapters, weights=None, normalize_weights=True)``, e.g. ``Stack(Average("es", "pt",
    weights=[0.7, 0.3]), "ner")`` (a target language without an adapter of its own, served by related ones).

    Weights as AdapterHub's: None gives each adapter ``1/n``; given weights are divided by their sum when
    ``normalize_weights`` (default), used as they are otherwise. ``weights`` may also be a 1-D float tensor
    (e.g. one being optimised, as test-time ensembling does: ``madx_fast.training.ensemble``); it is then used
    as is (normalised with tensor ops when ``normalize_weights``), so gradients reach it.

    What a layer computes, for an adapter input x (the layer's LN(y + a)) and residual y, with each adapter's
    output ``h_i = y + s_i (W_up_i act(W_down_i x + b_down_i) + b_up_i)``:

    * ``adapterhub_compat=False`` (default): the weighted average ``sum_i w_i h_i`` (with normalised weights:
      ``y + sum_i w_i delta_i``, an average of the adapters' outputs);
    * ``adapterhub_compat=True``: AdapterHub 1.3's own result, ``torch.mean`` over the weighted outputs,
      ``(1/n) sum_i w_i h_i``: with default weights ``Average(a, b)`` gives ``(h_a + h_b) / 4``, the residual
      stream scaled by ``1/n`` too. For comparisons with AdapterHub (``patch_adapterhub`` computes this).

    Only the first adapter's invertible (NICE) adapter runs, on the embeddings and inverted before an LM head,
    as in AdapterHub (its ``first()``). ``name``: how row languages and messages name the block when it is a
    member of a ``PerRow`` (default ``avg(es,pt)``)."""

    def __init__(self, *names: str, weights=None, normalize_weights: bool = True, adapterhub_compat: bool = False,
                 name: str | None = None):
        if len(names) == 1 and isinstance(names[0], (list, tuple)):
            names = tuple(names[0])
        if not names:
            raise ValueError("Average needs at least one adapter name")
        for n in names:
            if not isinstance(n, str):
                raise ValueError(f"Average holds adapter names only (nested blocks are not supported), got {n!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"Average{tuple(names)} names an adapter twice")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"Average name must be a non-empty string, got {name!r}")
        self.names = tuple(names)
        self.weights = _average_weights(weights, len(names), bool(normalize_weights))
        self.adapterhub_compat = bool(adapterhub_compat)
        self.name = name

    @property
    def label(self) -> str:
        return self.name or "avg(" + ",".join(self.names) + ")"

    def first(self) -> str:
        """The adapter whose invertible adapter runs (AdapterHub's ``first()``)."""
        return self.names[0]

    def mix(self):
        """The coefficient of each adapter's output: the weights, or (``adapterhub_compat``) the weights over n.
        A tuple of floats, or a tensor when the weights are one."""
        n = len(self.names)
        if isinstance(self.weights, torch.Tensor):
            return self.weights / n if self.adapterhub_compat else self.weights
        return tuple(w / n for w in self.weights) if self.adapterhub_compat else self.weights

    def _key(self):
        weights = ("tensor", id(self.weights)) if isinstance(self.weights, torch.Tensor) else self.weights
        return ("Average", self.names, weights, self.adapterhub_compat, self.name)

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)

    def __eq__(self, other):
        return isinstance(other, Average) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        weights = "tensor" if isinstance(self.weights, torch.Tensor) else "[" + ", ".join(
            f"{w:.4g}" for w in self.weights) + "]"
        extra = (", adapterhub_compat=True" if self.adapterhub_compat else "") + (
            f", name={self.name!r}" if self.name else "")
        return "Average(" + ", ".join(repr(n) for n in self.names) + f", weights={weights}{extra})"


def _average_weights(weights, n: int, normalize: bool):
    """AdapterHub's weight handling: None -> 1/n each; else the weights, divided by their sum if ``normalize``."""
    if weights is None:
        return (1.0 / n,) * n
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1 or weights.shape[0] != n or not weights.is_floating_point():
            raise ValueError(f"Average weights as a tensor must be 1-D floating point with one weight per adapter "
                             f"({n}), got dtype {weights.dtype} and shape {tuple(weights.shape)}")
        return weights / weights.sum() if normalize else weights
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ValueError(f"Average weights must be numbers, one per adapter, got {weights!r}") from None
    if len(values) != n:
        raise ValueError(f"Average of {n} adapters got {len(values)} weights")
    if not all(math.isfinite(w) for w in values):
        raise ValueError(f"Average weights must be finite, got {values}")
    if normalize:
        total = sum(values)
        if total == 0:
            raise ValueError(f"Average weights {values} sum to 0: they cannot be normalised (normalize_weights=False "
                             "uses them as they are)")
        values = [w / total for w in values]
    return tuple(values)


def member_label(member) -> str:
    """How row languages and messages name a setup member: an adapter name, or an Average's label."""
    return member.label if isinstance(member, Average) else member


def first_adapter(member) -> str:
    """The adapter of a name or Average member whose invertible adapter runs."""
    return member.first() if isinstance(member, Average) else member


Setup = Union[str, Stack, PerRow, Average, Iterable[str], None]


def normalize_setup(setup: Setup) -> tuple:
    """A setup as a tuple of entries: adapter names, ``Average`` blocks and at most one ``PerRow``. Accepts a
    name, ``Stack``, ``Average``, ``PerRow``, a list/tuple of names (a stack), None (no adapter), and
    AdapterHub's ``adapters.composition.Stack`` and ``Average`` (an AdapterHub Average keeps AdapterHub's
    arithmetic: ``adapterhub_compat=True``); other composition blocks (Fuse, Parallel, Split, ...) are not
    MAD-X and are refused by name."""
    if setup is None:
        return ()
    if isinstance(setup, (str, PerRow, Average)):
        names = (setup,)
    elif isinstance(setup, Stack):
        names = setup.names
    elif _hub_block(setup) == "Average":
        names = (_from_hub_average(setup),)
    elif _hub_block(setup) is not None:
        kind = _hub_block(setup)
        if kind != "Stack":
            raise ValueError(f"adapter composition {kind} is not supported; madx_fast runs a name, Stack(...) or "
                             "Average(...)")
        names = tuple(_from_hub_average(c) if _hub_block(c) == "Average" else c for c in setup.children)
    elif isinstance(setup, (list, tuple)):
        names = tuple(setup)
    else:
        raise TypeError(f"cannot use a {type(setup).__name__} as an adapter setup; pass a name or Stack(...)")
    for n in names:
        if not isinstance(n, (str, PerRow, Average)):
            raise ValueError(f"a Stack holds adapter names, Average blocks and at most one PerRow (other nested "
                             f"blocks are not supported), got {n!r}")
    if sum(isinstance(n, PerRow) for n in names) > 1:
        raise ValueError(f"adapter setup {names} holds more than one PerRow; one set of row languages per batch")
    seen: set[str] = set()
    for n in names:
        mine = set(adapter_names((n,)))
        if mine & seen or (isinstance(n, str) and n in seen):
            raise ValueError(f"adapter setup {names} names an adapter twice")
        seen |= mine
    return names


def _hub_block(setup) -> str | None:
    """The class name of an AdapterHub composition block (``adapters.composition``), or None."""
    if hasattr(setup, "children") and not isinstance(setup, (list, tuple, str, Stack, PerRow, Average)):
        return type(setup).__name__
    return None


def _from_hub_average(block) -> Average:
    """AdapterHub's ``Average`` (its weights already normalised, as it stores them) as madx_fast's, computing
    AdapterHub's result."""
    for c in block.children:
        if not isinstance(c, str):
            raise ValueError(f"an Average of {type(c).__name__} blocks is not supported; madx_fast averages adapters")
    return Average(*block.children, weights=list(block.weights), normalize_weights=False, adapterhub_compat=True)


def adapter_names(names: tuple) -> tuple[str, ...]:
    """Every adapter name of a normalized setup, the per-row and averaged ones included, in order (once each)."""
    out: list[str] = []
    for n in names:
        members = n.names if isinstance(n, PerRow) else (n,)
        for m in members:
            out.extend(m.names if isinstance(m, Average) else (m,))
    return tuple(dict.fromkeys(out))


def per_row_entry(names: tuple) -> PerRow | None:
    """The PerRow of a normalized setup, or None."""
    for n in names:
        if isinstance(n, PerRow):
            return n
    return None


def without_adapter(names: tuple, name: str) -> tuple:
    """A normalized setup with adapter ``name`` dropped; an Average or PerRow holding it is dropped whole (the
    row languages given for a PerRow would otherwise point at other adapters)."""
    return tuple(n for n in names if name not in adapter_names((n,)))


def setup_repr(names: tuple):
    """The user-facing form of a normalized setup: None, a name (or block), or a Stack."""
    if not names:
        return None
    if len(names) == 1:
        return names[0]
    return Stack(*names)
