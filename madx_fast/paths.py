"""Local paths versus Hugging Face Hub names, for every argument that may be either (models, tokenizers,
adapters, data).

A name is a *local path* when it exists, or when it looks like one: it starts with ``./``, ``../``, ``/`` or
``~`` (or is ``.`` / ``..``), or its first component is a directory here (``runs/lang-alph`` when ``runs/``
exists). A local path that does not exist is an error naming the nearest existing names, found before any
network access; it never becomes a Hub lookup. Anything else may be a Hub name (``hf:`` forces that reading
where a command takes Hub names).

    looks_local("runs/lang-alph")              # True when ./runs is a directory
    check_local("runs/lang-alph", "adapter directory")
    # FileNotFoundError: adapter directory 'runs/lang-alph' does not exist (did you mean 'runs/lang-alpha'?)
"""
from __future__ import annotations

import difflib
import os


class LocalPathError(FileNotFoundError):
    """A local path (or a name that looks like one) that does not exist; the message names the nearest
    existing names."""


def explicit_path(text: str) -> bool:
    """``text`` is written as a path: ``.``, ``..``, or it starts with ``./``, ``../``, ``/`` or ``~``."""
    return isinstance(text, str) and (text in (".", "..") or text.startswith(("./", "../", "/", "~")) or
                                      os.path.isabs(text))


def looks_local(text: str) -> bool:
    """Whether ``text`` names a local path (see the module docstring), whether or not it exists."""
    if not isinstance(text, str) or not text:
        return False
    if explicit_path(text):
        return True
    if os.path.exists(text):
        return True
    first, sep, _ = text.partition("/")
    return bool(sep and first and os.path.isdir(first))


def nearest_names(path: str, n: int = 3) -> list[str]:
    """Existing paths close to the missing ``path``: the first missing component compared (difflib) with the
    entries of its deepest existing directory, written the way ``path`` was (relative stays relative)."""
    parts = path.rstrip("/").split("/")
    base = "/" if path.startswith("/") else ""
    for i in range(len(parts)):
        prefix = "/".join(parts[:i])
        where = os.path.expanduser(prefix if prefix else base or ".")
        if not os.path.exists(os.path.join(where, parts[i]) if parts[i] else where):
            break
    else:
        return []
    try:
        entries = sorted(os.listdir(where))
    except OSError:
        return []
    rest = "/".join(parts[i + 1:])
    out = []
    for name in difflib.get_close_matches(parts[i], entries, n=n, cutoff=0.6):
        candidate = "/".join(parts[:i] + [name]) or name
        if rest and os.path.exists(os.path.join(os.path.expanduser(candidate), rest)):
            candidate += "/" + rest
        out.append(candidate)
    return out


def missing_message(path: str, what: str, *, hub_hint: bool = False) -> str:
    """``"<what> '<path>' does not exist (did you mean ...?)"``; ``hub_hint``: the name could also be meant as a
    Hub repository (it only looked local because its first component is a directory here)."""
    near = nearest_names(path)
    msg = f"{what} {path!r} does not exist"
    if near:
        msg += f" (did you mean {' or '.join(repr(p) for p in near)}?)"
    if hub_hint:
        msg += f"; to mean the Hugging Face Hub name instead, write hf:{path}"
    return msg


def check_local(path: str, what: str, *, hub_hint: bool = True) -> bool:
    """True when ``path`` is an existing local path, False when it is not path-like (a Hub name); raises
    LocalPathError for a path-like name that does not exist."""
    if not looks_local(path):
        return False
    if os.path.exists(os.path.expanduser(path)):
        return True
    raise LocalPathError(missing_message(path, what, hub_hint=hub_hint and not explicit_path(path)))


def check_writable(path: str, what: str) -> None:
    """``path`` can be created or written: it is not under a file, and its deepest existing directory is
    writable. Raises OSError naming the problem."""
    full = os.path.abspath(os.path.expanduser(path))
    parent = full
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent != full and not os.path.isdir(parent):
        raise NotADirectoryError(f"{what} {path!r}: {parent!r} is a file, not a directory")
    directory = parent if os.path.isdir(parent) else os.path.dirname(parent)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path!r}: the directory {directory!r} is not writable")


__all__ = ["LocalPathError", "check_local", "explicit_path", "check_writable", "looks_local", "missing_message", "nearest_names"]
