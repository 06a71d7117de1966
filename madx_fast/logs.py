"""What the ``madx`` command prints while it works: one line per event, its own and the libraries'.

``setup(verbosity, rank)`` (the command calls it; a Python caller keeps its own logging) sends madx_fast's log
records and those of the libraries it drives (transformers, huggingface_hub, datasets, torch, urllib3, httpx,
and Python warnings) through one handler on stderr, and takes the libraries' own handlers away, so that each
warning is printed once::

    [madx] training language adapter 'sw': 894,528 parameters (0.32% of the base), 250000 steps of 64
    [huggingface_hub] warning: <the library's message, on one line>

Lines written to a file (stderr not a terminal: a batch job's log) start with a time stamp
(``2025-01-31 14:02:11``; ``stamp()``, also used by the progress lines). Levels by ``verbosity``: -1
(``-q``) madx_fast's warnings and the libraries' errors; 0 madx_fast's progress and the libraries'
warnings; 1 (``-v``) madx_fast's debug lines and the libraries' info; 2 (``-vv``) everything. Processes
other than rank 0 of a data-parallel run print as ``-q``, tagged ``[madx rank N]``.
"""
from __future__ import annotations

import io
import logging
import os
import re
import sys
import time

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
LIBRARIES = ("transformers", "huggingface_hub", "datasets", "torch", "urllib3", "httpx", "filelock", "accelerate",
             "py.warnings")
# verbosity -> (madx_fast's level, the libraries' level)
LEVELS = {-1: (logging.WARNING, logging.ERROR), 0: (logging.INFO, logging.WARNING), 1: (logging.DEBUG, logging.INFO),
          2: (logging.DEBUG, logging.DEBUG)}


def is_terminal(stream) -> bool:
    """A terminal a bar can be drawn on: a tty that reports a width (a pseudo-terminal opened without a size,
    as some job runners do, has 0 columns, where tqdm draws nothing at all)."""
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return True  # a tty without a file descriptor to ask


def stamp() -> str:
    """The time stamp that starts a line written to a log file."""
    return time.strftime(TIME_FORMAT) + " "


class LineFormatter(logging.Formatter):
    """``[madx] message`` for madx_fast's records, ``[library] level: message`` (on one line) for the others;
    with ``stamped``, a time stamp first."""

    def __init__(self, rank: int = 0, stamped: bool = False):
        super().__init__()
        self.tag = "[madx]" if rank == 0 else f"[madx rank {rank}]"
        self.stamped = stamped

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            message += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
        if record.name == "madx_fast" or record.name.startswith("madx_fast."):
            line = f"{self.tag} {message}"
        elif record.name == "py.warnings":  # "path:line: Category: text\n  source line"
            found = re.match(r"(.*?):(\d+): (\w+): (.*)", message.strip().split("\n")[0])
            text = f"{found[3]}: {found[4]} ({os.path.basename(found[1])}:{found[2]})" if found else message
            line = f"[python] warning: {' '.join(text.split())}"
        else:
            line = f"[{record.name.split('.')[0]}] {record.levelname.lower()}: {' '.join(message.split())}"
        return (stamp() if self.stamped else "") + line


class StderrHandler(logging.Handler):
    """Writes to the current ``sys.stderr`` (looked up at each record, so a replaced stderr is followed), above
    a running tqdm bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            try:
                from tqdm import tqdm
                tqdm.write(line + "\n", file=sys.stderr, end="")  # one write (see cli._stderr_line)
            except ImportError:
                sys.stderr.write(line + "\n")
        except Exception:  # noqa: BLE001 - logging must never end the command
            self.handleError(record)


def setup(verbosity: int = 0, rank: int = 0, *, stamped: bool | None = None) -> StderrHandler:
    """Route madx_fast's and the libraries' records through one ``StderrHandler`` (see the module docstring);
    ``stamped`` None: time stamps when stderr is not a terminal. Returns the handler."""
    verbosity = -1 if rank != 0 else max(-1, min(2, verbosity))
    own_level, library_level = LEVELS[verbosity]
    handler = StderrHandler()
    handler.setFormatter(LineFormatter(rank, stamped=not is_terminal(sys.stderr) if stamped is None else stamped))
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, StderrHandler)] + [handler]
    root.setLevel(library_level)
    logging.getLogger("madx_fast").setLevel(own_level)
    _quiet_library_handlers(library_level)
    logging.captureWarnings(False)  # (re)installed: a warnings.catch_warnings() since the last call may have
    logging.captureWarnings(True)   # put another showwarning in place
    return handler


def _quiet_library_handlers(level: int) -> None:
    """The libraries' loggers lose their own handlers (each printed every warning a second time) and pass their
    records on to the root logger's handler, at ``level``."""
    import datasets.utils.logging  # noqa: F401 - imported, each library has installed its handler: removed below
    import huggingface_hub.utils.logging  # noqa: F401
    import transformers.utils.logging
    transformers.utils.logging.disable_default_handler()  # (also marks it configured: it is not added again)
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
        logger.setLevel(level)


__all__ = ["LineFormatter", "StderrHandler", "TIME_FORMAT", "setup", "stamp"]
