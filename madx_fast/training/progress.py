"""Progress output: a bar on a terminal, plain lines in a log.

A batch job's stderr (or ``madx demo > log 2>&1``) is a file: a redrawn bar would fill it with thousands of
frames. So ``StepProgress`` draws a tqdm bar only when its stream is a terminal; otherwise it writes one line
``2025-01-31 14:02:11 [madx] step 1200/250000  loss 2.3411  lr 9.95e-05  41.3k tok/s  ETA 1:42:10`` (time
stamped like every line in a log: ``madx_fast.logs``) at most every ``interval`` seconds (and for the last
step). ``progress(iterable, desc)`` wraps long loops (tokenisation, evaluation) the same
way: a bar on a terminal, nothing otherwise. ``LineProgress`` counts the lines of a stream (``madx predict``):
a bar on a terminal, ``[madx] predict: 12000/50000 lines  3 skipped  850 lines/s  ETA 0:00:45`` otherwise. ``library_bars()`` gives the bars of
transformers (loading weights), huggingface_hub (downloads) and datasets (preparing splits) the same rule; the
``madx`` command calls it (a Python caller keeps the libraries' own settings).
"""
from __future__ import annotations

import logging
import sys
import time

from ..logs import is_terminal, stamp  # noqa: F401 (is_terminal: also this module's, as before)

log = logging.getLogger("madx_fast.training")


def progress(iterable, desc: str, min_items: int = 20):
    """A tqdm bar over a long loop when stderr is a terminal; the iterable itself otherwise."""
    try:
        n = len(iterable)
    except TypeError:
        n = None
    if (n is not None and n < min_items) or not is_terminal(sys.stderr):
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def library_bars(stream=None) -> bool:
    """Turn the progress bars of transformers, huggingface_hub and datasets on when ``stream`` (stderr) is a
    terminal and off otherwise; returns whether they are on."""
    on = is_terminal(sys.stderr if stream is None else stream)
    import datasets
    import huggingface_hub.utils
    import transformers.utils.logging
    for enable, disable in ((transformers.utils.logging.enable_progress_bar,
                             transformers.utils.logging.disable_progress_bar),
                            (huggingface_hub.utils.enable_progress_bars, huggingface_hub.utils.disable_progress_bars),
                            (datasets.enable_progress_bars, datasets.disable_progress_bars)):
        (enable if on else disable)()
    return on


class StepProgress:
    """Training steps: ``update(step, loss=..., lr=..., tokens=...)`` after each step (loss and lr at logging
    steps: the mean loss of the steps since the previous one); ``close()`` at the end. A line shows the loss
    only when a new one came since the line before (never the same stale value again). ``enabled=False``
    (``--no-progress``, or a process other than rank 0) prints nothing itself; the trainer then logs lines at
    ``log_every``."""

    def __init__(self, total: int, start: int = 0, *, enabled: bool = True, stream=None, interval: float = 10.0):
        self.total, self.start, self.interval = total, start, interval
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.bar = None
        if enabled and is_terminal(self.stream):
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            file=self.stream)
        self.t0 = time.perf_counter()
        self.last_line = -float("inf")
        self.tokens = 0
        self.loss = self.lr = None  # the newest loss not yet on a line (None: none)

    @property
    def draws_bar(self) -> bool:
        return self.bar is not None

    def update(self, step: int, *, loss: float | None = None, lr: float | None = None, tokens: int = 0) -> None:
        self.tokens += tokens
        if loss is not None:
            self.loss, self.lr = loss, lr
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            return
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last_line < self.interval and step < self.total:
            return
        self.last_line = now
        self.stream.write(stamp() + self.line(step, now) + "\n")
        self.stream.flush()
        self.loss = None

    def line(self, step: int, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self.t0, 1e-9)
        done = step - self.start
        parts = [f"step {step}/{self.total}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}  lr {self.lr:.2e}")
        if self.tokens:
            rate = self.tokens / elapsed
            parts.append(f"{rate / 1e3:.1f}k tok/s" if rate >= 1e3 else f"{rate:.0f} tok/s")
        if done > 0 and step < self.total:
            parts.append(f"ETA {_clock((self.total - step) * elapsed / done)}")
        return "[madx] " + "  ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class LineProgress:
    """Lines of a stream (total unknown for a pipe): ``update(lines, errors)`` after each chunk, ``close()`` at
    the end. A bar on a terminal; otherwise a line at most every ``interval`` seconds; nothing if disabled."""

    def __init__(self, total: int | None = None, *, enabled: bool = True, stream=None, interval: float = 10.0,
                 desc: str = "predict", errors: str = "skipped"):
        self.total, self.interval, self.desc, self.errors_word = total, interval, desc, errors
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.bar = None
        if enabled and is_terminal(self.stream):
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="line", dynamic_ncols=True, file=self.stream)
        self.t0 = time.perf_counter()
        self.last_line = self.t0
        self.lines = self.errors = 0

    def update(self, lines: int, errors: int = 0) -> None:
        self.lines += lines
        self.errors += errors
        if self.bar is not None:
            self.bar.update(lines)
            if self.errors:
                self.bar.set_postfix({self.errors_word: self.errors})
            return
        now = time.perf_counter()
        if not self.enabled or now - self.last_line < self.interval:
            return
        self.last_line = now
        self.stream.write(stamp() + self.line(now) + "\n")
        self.stream.flush()

    def line(self, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self.t0, 1e-9)
        parts = [f"{self.lines}/{self.total} lines" if self.total else f"{self.lines} lines"]
        if self.errors:
            parts.append(f"{self.errors} {self.errors_word}")
        parts.append(f"{self.lines / elapsed:.0f} lines/s")
        if self.total and 0 < self.lines < self.total:
            parts.append(f"ETA {_clock((self.total - self.lines) * elapsed / self.lines)}")
        return f"[madx] {self.desc}: " + "  ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"
