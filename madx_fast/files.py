"""Reading and writing madx_fast's files, in one place: every output appears whole or not at all, JSON is
read and written one way, files are hashed one way.

Writing. ``write_file(path, writer)``: ``writer(tmp)`` fills a temporary file next to ``path``, which is
fsynced and moved onto ``path`` with ``os.replace`` (atomic on POSIX): a reader sees the old file or the new
one. ``write_json(path, obj)`` does that with ``obj`` as JSON.

``replace_directory(directory, build)``: ``build(tmp)`` fills a new temporary sibling directory, which then
takes the place of ``directory``. On Linux the two are exchanged in one ``renameat2(RENAME_EXCHANGE)`` call,
so a reader sees the complete old directory or the complete new one, never a mix and never nothing;
elsewhere the old directory is renamed to ``<directory>.old`` first and a reader that finds only the
``.old`` one puts it back (``recover_directory``). Files of the old directory that the new one does not
write and that are not ``owned`` by the writer (a user's notes, other tools' files) are carried over as
hard links; owned names never survive from an earlier save (no stale weights beside a new config).

Temporary files and directories are named ``.<name>.<pid>.<random>.tmp``; a writer removes those of its
target left by processes that no longer run (a killed save leaves nothing that later runs trip over).

Reading and hashing. ``read_json(path, error=...)``: a JSON object, or one ``error`` naming the file;
``sha256_file(path)``: the file's sha256 (64 hex digits).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from typing import Callable, Iterable

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def write_file(path, writer: Callable[[str], None]) -> None:
    """``writer(tmp_path)`` then fsync and ``os.replace`` onto ``path`` (same directory): all or nothing."""
    path = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(directory, base)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{base}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        writer(tmp)
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(directory)


def write_json(path, obj) -> None:
    """``obj`` as indented, key-sorted JSON (``dump_json``), atomically."""
    write_file(path, lambda tmp: dump_json(obj, tmp))


def dump_json(obj, path) -> None:
    """``obj`` as indented, key-sorted JSON into ``path`` as it is (for a file inside a directory being built
    by ``replace_directory``; elsewhere ``write_json``). Tensor and numpy scalars, dtypes and devices are
    written as numbers and strings (``json_default``)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=json_default)
        f.write("\n")


def json_default(obj):
    """JSON for what runs record besides plain values: tensor and numpy scalars, torch dtypes and devices."""
    if hasattr(obj, "item"):
        return obj.item()
    if type(obj).__module__ == "torch":  # dtypes, devices
        return str(obj)
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON")


def read_json(path, error: type[Exception] = ValueError) -> dict:
    """A JSON object from ``path``; anything else is an ``error`` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def sha256_file(path) -> str:
    """The sha256 of the file's bytes, 64 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def replace_directory(directory, build: Callable[[str], None], *, owned: Iterable[str] = ()) -> None:
    """``build(tmp_dir)`` fills a new directory that then replaces ``directory`` in one step (see the module
    docstring). Entries of an existing ``directory`` that ``build`` did not write are carried over, except
    the names in ``owned`` (what this kind of output consists of: never kept from an earlier save)."""
    directory = os.path.abspath(os.fspath(directory))
    parent, base = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    recover_directory(directory)
    remove_stale_temporaries(parent, base)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{base}.{os.getpid()}.", suffix=".tmp")
    try:
        build(tmp)
        owned = set(owned)
        if os.path.isdir(directory):
            for name in os.listdir(directory):
                if name not in owned and not os.path.lexists(os.path.join(tmp, name)):
                    _link_copy(os.path.join(directory, name), os.path.join(tmp, name))
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync(os.path.join(root, name))
        os.chmod(tmp, 0o777 & ~_umask())
        _fsync_dir(tmp)
        if os.path.isdir(directory):
            _swap_in(tmp, directory)
        else:
            os.replace(tmp, directory)
            tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(parent)


def recover_directory(directory) -> None:
    """Undo a directory swap cut between its two renames (only possible where RENAME_EXCHANGE is not):
    ``<directory>.old`` without ``<directory>`` is put back; with both, the leftover ``.old`` is removed."""
    directory = os.path.abspath(os.fspath(directory))
    old = directory + ".old"
    if os.path.isdir(old):
        if not os.path.exists(directory):
            os.replace(old, directory)
        else:
            shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(parent, base: str | None = None, *, pidless: Iterable[str] = ()) -> None:
    """Remove ``.<base>.<pid>.*.tmp`` entries of ``parent`` (every base if None) whose process is gone, and
    ``.<name>.*.tmp`` entries of the names in ``pidless`` whatever their process (temporaries of madx_fast
    0.1, which carried no process id)."""
    if not os.path.isdir(parent):
        return
    pidless = tuple(pidless)
    for name in os.listdir(parent):
        if not (name.startswith(".") and name.endswith(".tmp")):
            continue
        stem = name[1:-len(".tmp")]
        old = any(stem.startswith(f"{p}.") and _pid_in(stem[len(p) + 1:]) is None for p in pidless)
        if base is not None:
            if not stem.startswith(base + "."):
                continue
            stem = stem[len(base) + 1:]
        pid = _pid_in(stem)
        if not old and (pid is None or _alive(pid)):
            continue
        path = os.path.join(parent, name)
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else _remove(path)


# ----------------------------------------------------------------------------------------------------------
def _swap_in(new: str, directory: str) -> None:
    """Put ``new`` in the place of the existing ``directory``; ``new``'s path then holds the old one and is
    removed."""
    if _exchange(new, directory):
        shutil.rmtree(new, ignore_errors=True)
        return
    old = directory + ".old"
    os.replace(directory, old)
    os.replace(new, directory)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Atomically exchange two paths with Linux's renameat2(RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "renameat2"):
        return False
    res = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if res == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):
        return False  # the file system or kernel cannot exchange: fall back to two renames
    raise OSError(err, os.strerror(err), b)


_LIBC = []


def _libc():
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True))
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def _link_copy(src: str, dst: str) -> None:
    """Carry an entry over into the new directory without copying data where a hard link will do."""
    def link_or_copy(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
    elif os.path.islink(src):
        os.symlink(os.readlink(src), dst)
    else:
        link_or_copy(src, dst)


def _pid_in(stem: str) -> int | None:
    head = stem.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
