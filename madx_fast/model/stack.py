"""The active adapter setup: one adapter, or a ``Stack`` of adapters applied in order.

MAD-X uses exactly these two setups: ``"en"`` (stage 1, language adapter alone) and ``Stack("en", "ner")``
(stages 2 and 3). Internally a setup is a tuple of adapter names, which is what the wired layers read on
every forward (a plain tuple: torch.compile guards on it and recompiles when the setup changes).

``PerRow("en", "sw", "qu")`` in place of one name runs many languages in one batch: each row of the batch uses
its own language's adapter (``Stack(PerRow("en", "sw"), "ner")``: per-row language adapters under a shared
task adapter). Which row has which language is data given per batch (``MadxAdapters.row_languages``), not
part of the setup: one setup, and so one compiled graph, serves every mix of languages.
"""
from __future__ import annotations

from typing import Iterable, Union


class Stack:
    """Adapters applied one after the other in every layer: ``Stack("en", "ner")``.

    The invertible adapter of the first adapter (the language adapter) runs on the embeddings and, inverted,
    before the masked-LM decoder."""

    def __init__(self, *names: "str | PerRow"):
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
    first in the setup. A row's outputs equal running it alone with ``Stack(its language, "ner")``."""

    def __init__(self, *names: str):
        if len(names) == 1 and isinstance(names[0], (list, tuple)):
            names = tuple(names[0])
        if not names:
            raise ValueError("PerRow needs at least one adapter name")
        for n in names:
            if not isinstance(n, str):
                raise ValueError(f"PerRow holds adapter names only, got {n!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"PerRow{tuple(names)} names an adapter twice")
        self.names = tuple(names)

    def index(self, name: str) -> int:
        """The group id of adapter ``name`` (its position in the PerRow)."""
        try:
            return self.names.index(name)
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


Setup = Union[str, Stack, PerRow, Iterable[str], None]


def normalize_setup(setup: Setup) -> tuple[str, ...]:
    """A setup as a tuple of adapter names. Accepts a name, ``Stack``, a list/tuple of names (a stack), None
    (no adapter), and AdapterHub's ``adapters.composition.Stack``; other composition blocks (Fuse, Parallel,
    Split, ...) are not MAD-X and are refused by name."""
    if setup is None:
        return ()
    if isinstance(setup, (str, PerRow)):
        return (setup,)
    if isinstance(setup, Stack):
        names = setup.names
    elif hasattr(setup, "children") and not isinstance(setup, (list, tuple)):
        kind = type(setup).__name__
        if kind != "Stack":
            raise ValueError(f"adapter composition {kind} is not supported; madx_fast runs a name or Stack(...)")
        names = tuple(setup.children)
    elif isinstance(setup, (list, tuple)):
        names = tuple(setup)
    else:
        raise TypeError(f"cannot use a {type(setup).__name__} as an adapter setup; pass a name or Stack(...)")
    for n in names:
        if not isinstance(n, (str, PerRow)):
            raise ValueError(f"a Stack holds adapter names and at most one PerRow (other nested blocks are not "
                             f"supported), got {n!r}")
    if sum(isinstance(n, PerRow) for n in names) > 1:
        raise ValueError(f"adapter setup {names} holds more than one PerRow; one set of row languages per batch")
    flat = adapter_names(names)
    if len(set(flat)) != len(flat):
        raise ValueError(f"adapter setup {names} names an adapter twice")
    return names


def adapter_names(names: tuple) -> tuple[str, ...]:
    """Every adapter name of a normalized setup, the per-row ones included, in order."""
    out = []
    for n in names:
        out.extend(n.names if isinstance(n, PerRow) else (n,))
    return tuple(out)


def per_row_entry(names: tuple) -> PerRow | None:
    """The PerRow of a normalized setup, or None."""
    for n in names:
        if isinstance(n, PerRow):
            return n
    return None


def without_adapter(names: tuple, name: str) -> tuple:
    """A normalized setup with adapter ``name`` dropped; a PerRow holding it is dropped whole (the row
    languages given for it would otherwise point at other adapters)."""
    return tuple(n for n in names if n != name and not (isinstance(n, PerRow) and name in n.names))


def setup_repr(names: tuple[str, ...]):
    """The user-facing form of a normalized setup: None, a name, or a Stack."""
    if not names:
        return None
    if len(names) == 1:
        return names[0]
    return Stack(*names)
