"""Reading and writing madx_fast's files, in one place: every output appears whole or not at all, nothing but
a regular file or a directory is ever replaced, a failed write is one line naming the file and the cause,
JSON is read one way, files are hashed one way, and a run directory has one writer at a time.

What an output path may name (``output_target``, for every writer below):
  - nothing, or a regular file: written aside and moved into place atomically (below);
  - a character device or a FIFO (``/dev/null``, a named pipe), or an open descriptor's name (``/dev/stdout``,
    ``/dev/fd/N``, ``/proc/self/fd/N``): written through, in place; never replaced, never removed;
  - a symbolic link: followed. What it finally names is treated by these rules: a regular file there is
    replaced atomically in its own directory (the link stays a link and names the new file), a link to
    nothing creates the file it names when that file's directory exists;
  - anything else (a socket, a block device, a directory where a file belongs, a link loop): refused with
    ``WriteError`` before anything is written.
Directories (``replace_directory``) follow links the same way; anything there but a directory is refused.

Writing. ``write_file(path, writer)``: ``writer(tmp)`` fills a temporary file next to ``path``, which is
fsynced and moved onto ``path`` with ``os.replace`` (atomic on POSIX): a reader sees the old file or the new
one. ``write_json(path, obj)`` does that with ``obj`` as JSON; ``append_text(path, text)`` appends (logs).

``replace_directory(directory, build)``: ``build(tmp)`` fills a new temporary sibling directory, which then
takes the place of ``directory``. On Linux the two are exchanged in one ``renameat2(RENAME_EXCHANGE)`` call,
so a reader sees the complete old directory or the complete new one, never a mix and never nothing;
elsewhere the old directory is renamed to ``<directory>.old`` first and a reader that finds only the
``.old`` one puts it back (``recover_directory``). Files of the old directory that the new one does not
write and that are not ``owned`` by the writer (a user's notes, other tools' files) are carried over as
hard links; owned names never survive from an earlier save (no stale weights beside a new config).

Every file and directory written gets the same mode: 0666 / 0777 less the process's umask (whatever mode
the serialiser or ``tempfile`` gave it).

Failures. An OSError while writing (no space, quota, read-only file system, permission, I/O error), also one
that a serialiser wrapped in its own exception (torch's writer does), becomes ``WriteError``: an OSError with
the cause's errno whose message is one line naming the path and the cause. The temporary is removed, so
what was at the path before is unchanged.

Temporary files and directories are named ``.<name>.<pid>.<random>.tmp``; a writer removes those of its
target left by processes that no longer run (a killed save leaves nothing that later runs trip over).

One writer per directory. ``DirectoryLock(directory)`` holds an advisory lock (``fcntl.flock``) on
``<directory>/.madx.lock``, which records the holder's process id, until ``release()``; the operating system
releases it when the process ends however it ends, so a lock left by a killed process never blocks. A second
holder is refused at once with ``DirectoryInUseError`` naming the first one's process id.

Reading and hashing. ``read_json(path, error=...)``: a JSON object, or one ``error`` naming the file (also
for text nested too deeply or too large to parse, ``parse_json``); ``sha256_file(path)``: the file's sha256
(64 hex digits).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from typing import Callable, Iterable

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
LOCK_FILE = ".madx.lock"


class WriteError(OSError):
    """A file or directory that could not be written, or that must not be: ``str()`` is one line naming the
    path and the cause; ``errno`` is the cause's (None for a refused kind of path)."""

    def __init__(self, path, reason: str, err: int | None = None):
        super().__init__(err, reason, os.fspath(path))
        self.message = f"cannot write {os.fspath(path)}: {reason}"

    def __str__(self) -> str:
        return self.message


class DirectoryInUseError(FileExistsError):
    """Another process holds the directory's lock (``DirectoryLock``)."""


# ----------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------
def output_target(path, *, directory: bool = False) -> tuple[str, str]:
    """``(kind, path to write)`` for an output ``path`` (module docstring): kind ``"new"``, ``"file"`` or
    ``"directory"`` (written aside and moved into place at the returned path, links followed) or
    ``"stream"`` (a character device, FIFO or open descriptor: written through); raises WriteError for
    anything else."""
    path = os.path.abspath(os.fspath(path))
    if not directory and _names_descriptor(path):
        return "stream", path
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:  # a link loop, a name too long, a directory that cannot be searched
        raise WriteError(path, _reason(exc), exc.errno) from None
    if st is None:
        real = os.path.realpath(path) if os.path.islink(path) else path
        if real != path and not os.path.isdir(os.path.dirname(real)):
            raise WriteError(path, f"it is a symbolic link to {os.readlink(path)!r}, whose directory does not exist")
        return "new", real
    mode, want = st.st_mode, stat.S_ISDIR if directory else stat.S_ISREG
    if not directory and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        return "stream", path
    if not want(mode):
        what = "a directory" if directory else "a regular file, a character device or a FIFO"
        raise WriteError(path, f"it is {_kind(mode)}, and madx writes {what} there (nothing was changed)")
    real = os.path.realpath(path)
    if real != path and not (os.path.exists(real) and os.path.samestat(os.stat(real), st)):
        raise WriteError(path, "it is a link to a file that has no name of its own to replace")
    return ("directory" if directory else "file"), real


def write_file(path, writer: Callable[[str], None]) -> None:
    """``writer(tmp_path)`` then fsync and ``os.replace`` onto ``path`` (same directory): all or nothing. A
    character device, FIFO or open descriptor is written through (``writer(path)``); see ``output_target``."""
    kind, target = output_target(path)
    if kind == "stream":
        try:
            writer(target)
        except BaseException as exc:
            _raise_write_error(exc, target, "it is written through, so part of the output may have reached it")
        return
    directory, base = os.path.split(target)
    kept = "the previous file is unchanged" if kind == "file" else "nothing was written there"
    try:
        os.makedirs(directory, exist_ok=True)
        remove_stale_temporaries(directory, base)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{base}.{os.getpid()}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise WriteError(target, f"{_reason(exc)}; {kept}", exc.errno) from None
    try:
        writer(tmp)
        _fsync(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, target)
    except BaseException as exc:
        _remove(tmp)
        _raise_write_error(exc, target, kept)
    _fsync_dir(directory)


def write_json(path, obj) -> None:
    """``obj`` as indented, key-sorted JSON (``dump_json``), atomically."""
    write_file(path, lambda tmp: dump_json(obj, tmp))


def append_text(path, text: str) -> None:
    """``text`` appended to the file ``path`` (a log); a failure is a WriteError naming the file."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise WriteError(path, f"{_reason(exc)} (appending to it)", exc.errno) from None


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


def replace_directory(directory, build: Callable[[str], None], *, owned: Iterable[str] = ()) -> None:
    """``build(tmp_dir)`` fills a new directory that then replaces ``directory`` in one step (see the module
    docstring). Entries of an existing ``directory`` that ``build`` did not write are carried over, except
    the names in ``owned`` (what this kind of output consists of: never kept from an earlier save)."""
    kind, directory = output_target(directory, directory=True)
    parent, base = os.path.split(directory)
    kept = "the previous directory is unchanged" if kind == "directory" else "nothing was written there"
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        recover_directory(directory)
        remove_stale_temporaries(parent, base)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{base}.{os.getpid()}.", suffix=".tmp")
        build(tmp)
        _settle(tmp)
        if os.path.isdir(directory):
            owned = set(owned)
            for name in os.listdir(directory):
                if name not in owned and not os.path.lexists(os.path.join(tmp, name)):
                    _link_copy(os.path.join(directory, name), os.path.join(tmp, name))
            _fsync_dir(tmp)
            _swap_in(tmp, directory)
        else:
            os.replace(tmp, directory)
        tmp = None
    except BaseException as exc:
        _raise_write_error(exc, directory, kept, inside=tmp)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(parent)


def file_mode(directory: bool = False) -> int:
    """The mode of everything madx_fast writes: 0666 (0777 for a directory) less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


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
# one writer per directory
# ----------------------------------------------------------------------------------------------------------
class DirectoryLock:
    """An advisory lock on ``directory`` (created if missing) held until ``release()`` or the end of the
    process: ``fcntl.flock`` on ``<directory>/.madx.lock``, which holds this process's id. A directory
    locked by another process raises DirectoryInUseError at once, naming its process id. ``release()``
    removes the lock file, and the directory when this lock created it and it is empty again (a run
    refused before writing anything leaves nothing behind)."""

    def __init__(self, directory):
        import fcntl

        self.directory = os.path.abspath(os.fspath(directory))
        output_target(self.directory, directory=True)  # a file, socket, ... there: refused
        self.created = not os.path.isdir(self.directory)
        self.path = os.path.join(self.directory, LOCK_FILE)
        self._fd = None
        try:
            os.makedirs(self.directory, exist_ok=True)
            while self._fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, file_mode())
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
                    os.close(fd)
                    self._drop_directory()
                    raise DirectoryInUseError(
                        f"{self.directory} is in use by another madx run (process {holder}); wait for it to end, "
                        "or choose another --output") from None
                if _same_inode(fd, self.path):  # not a file its last holder removed in the meantime
                    self._fd = fd
                else:
                    os.close(fd)
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            if isinstance(exc, DirectoryInUseError):
                raise
            self.release()
            raise WriteError(self.path, _reason(exc), exc.errno) from None

    def release(self) -> None:
        if self._fd is not None:
            if _same_inode(self._fd, self.path):
                _remove(self.path)
            os.close(self._fd)
            self._fd = None
        self._drop_directory()

    def _drop_directory(self) -> None:
        if self.created:
            try:
                os.rmdir(self.directory)  # only when empty
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


# ----------------------------------------------------------------------------------------------------------
# reading and hashing
# ----------------------------------------------------------------------------------------------------------
def parse_json(text, error: type[Exception] = ValueError, where: str | None = None):
    """The value of the JSON ``text``; text that is not JSON, nested too deeply or too large to parse is an
    ``error`` saying so (prefixed with ``where``)."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError, MemoryError) as exc:
        raise error(f"{where}: {unreadable_json(exc)}" if where else unreadable_json(exc)) from None


def unreadable_json(exc: BaseException) -> str:
    """Why JSON could not be parsed, in words (``parse_json``'s errors)."""
    if isinstance(exc, RecursionError):
        return "not readable JSON (nested too deeply)"
    if isinstance(exc, MemoryError):
        return "not readable JSON (too large to parse in memory)"
    return f"not valid JSON ({exc})"


def read_json(path, error: type[Exception] = ValueError) -> dict:
    """A JSON object from ``path``; anything else is an ``error`` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    except MemoryError:
        raise error(f"{path}: {unreadable_json(MemoryError())}") from None
    data = parse_json(text, error, os.fspath(path))
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


# ----------------------------------------------------------------------------------------------------------
def _raise_write_error(exc: BaseException, path: str, kept: str, inside: str | None = None):
    """Re-raise ``exc``, as a WriteError naming ``path`` when an OSError caused it (a serialiser may wrap
    the OSError of a failed write in its own exception: the chain is searched)."""
    if isinstance(exc, WriteError):
        raise exc
    cause, seen = exc, 0
    while cause is not None and not isinstance(cause, OSError) and seen < 16:
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    if not isinstance(cause, OSError):
        raise exc
    where = ""
    name = getattr(cause, "filename", None)
    if inside and isinstance(name, str) and name.startswith(inside + os.sep):
        where = f" (writing {os.path.relpath(name, inside)})"
    raise WriteError(path, f"{_reason(cause)}{where}; {kept}", cause.errno) from exc


def _reason(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno) if exc.errno else None
    return f"{exc.strerror or exc}" + (f" ({name})" if name else "")


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISBLK, "a block device"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISFIFO, "a FIFO")):
        if test(mode):
            return what
    return "neither a file nor a directory"


_DESCRIPTORS = re.compile(r"^/proc/(self|thread-self|\d+)(/task/\d+)?/fd$")


def _names_descriptor(path: str) -> bool:
    """Whether ``path`` (absolute) is, or links to, an entry of ``/proc/<pid>/fd`` (``/dev/stdout``,
    ``/dev/fd/1``): an open descriptor, written through whatever it is."""
    for _ in range(40):
        parent = os.path.realpath(os.path.dirname(path))
        if _DESCRIPTORS.match(parent):
            return True
        full = os.path.join(parent, os.path.basename(path))
        if not os.path.islink(full):
            return False
        path = os.path.join(parent, os.readlink(full))
    return False


def _same_inode(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except OSError:
        return False


def _settle(tmp: str) -> None:
    """Before a built directory goes into place: one mode for everything in it, and everything on disk."""
    os.chmod(tmp, file_mode(directory=True))
    for root, dirs, names in os.walk(tmp):
        for name in dirs:
            os.chmod(os.path.join(root, name), file_mode(directory=True))
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode())
                _fsync(path)
    _fsync_dir(tmp)


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
