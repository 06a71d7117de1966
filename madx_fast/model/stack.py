"""The active adapter setup: one adapter, or a ``Stack`` of adapters applied in order.

MAD-X uses exactly these two setups: ``"en"`` (stage 1, language adapter alone) and ``Stack("en", "ner")``
(stages 2 and 3). Internally a setup is a tuple of adapter names, which is what the wired layers read on
every forward (a plain tuple: torch.compile guards on it and recompiles when the setup changes).
"""
from __future__ import annotations

from typing import Iterable, Union


class Stack:
    """Adapters applied one after the other in every layer: ``Stack("en", "ner")``.

    The invertible adapter of the first adapter (the language adapter) runs on the embeddings and, inverted,
    before the masked-LM decoder."""

    def __init__(self, *names: str):
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


Setup = Union[str, Stack, Iterable[str], None]


def normalize_setup(setup: Setup) -> tuple[str, ...]:
    """A setup as a tuple of adapter names. Accepts a name, ``Stack``, a list/tuple of names (a stack), None
    (no adapter), and AdapterHub's ``adapters.composition.Stack``; other composition blocks (Fuse, Parallel,
    Split, ...) are not MAD-X and are refused by name."""
    if setup is None:
        return ()
    if isinstance(setup, str):
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
        if not isinstance(n, str):
            raise ValueError(f"a Stack holds adapter names only (nested blocks are not supported), got {n!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter setup {names} names an adapter twice")
    return names


def setup_repr(names: tuple[str, ...]):
    """The user-facing form of a normalized setup: None, a name, or a Stack."""
    if not names:
        return None
    if len(names) == 1:
        return names[0]
    return Stack(*names)
