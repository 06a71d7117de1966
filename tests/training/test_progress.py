"""Progress output: a bar on a terminal; in a log (stderr is a file) plain lines at most every 10 s and at the
end (step, loss, lr, tokens/s, ETA), and no bar frames from madx_fast or from the libraries under it
(transformers' weight loading, huggingface_hub's downloads, datasets' split preparation)."""
from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

import pytest

from madx_fast.training import progress as P
from tests.helpers.runs import ROOT, env_for_subprocess, madx_command

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "  # lines written to a log start with a time stamp
LINE = re.compile(rf"^{STAMP}\[madx\] step (\d+)/(\d+)(  loss \d+\.\d{{4}}  lr \d\.\d\de[-+]\d\d)?  [\d.]+k? tok/s"
                  r"(  ETA \d+:\d\d:\d\d)?$")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_lines_in_a_log_at_most_every_interval(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(P.time, "perf_counter", lambda: now[0])
    log = io.StringIO()
    bar = P.StepProgress(100, enabled=True, stream=log, interval=10.0)
    assert not bar.draws_bar
    for step in range(1, 101):
        now[0] += 1.0  # one second per step
        logged = step % 10 == 0
        bar.update(step, loss=2.0 + 1 / step if logged else None, lr=1e-4 if logged else None, tokens=500)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and all(LINE.match(line) for line in lines), lines
    steps = [int(LINE.match(line).group(1)) for line in lines]
    assert steps[0] == 1 and steps[-1] == 100 and all(b - a >= 10 for a, b in zip(steps[:-1], steps[1:-1]))
    assert lines[1][20:] == "[madx] step 11/100  loss 2.1000  lr 1.00e-04  500 tok/s  ETA 0:01:29"
    assert "ETA" not in lines[-1]  # done
    # the loss of step 10 is on the line of step 11, and not again on later lines without a new loss
    shown = [line.split("loss ")[1][:6] for line in lines if "loss" in line]
    assert len(shown) == len(set(shown)) == len(lines) - 1, lines  # the first line (step 1) had no loss yet


def test_a_line_never_repeats_a_stale_loss(monkeypatch):
    """Losses every 30 steps, lines every 10 s (a step a second): a loss is on the first line after it came,
    and no other."""
    now = [0.0]
    monkeypatch.setattr(P.time, "perf_counter", lambda: now[0])
    log = io.StringIO()
    bar = P.StepProgress(60, enabled=True, stream=log, interval=10.0)
    for step in range(1, 61):
        now[0] += 1.0
        bar.update(step, loss=float(step) if step % 30 == 0 else None, lr=1e-4 if step % 30 == 0 else None,
                   tokens=10)
    lines = log.getvalue().splitlines()
    with_loss = [LINE.match(line).group(1) for line in lines if "loss" in line]
    assert with_loss == ["31", "60"], lines
    assert "loss 30.0000" in lines[[LINE.match(x).group(1) for x in lines].index("31")]


def test_a_terminal_gets_a_bar_and_no_lines():
    term = _Terminal()
    bar = P.StepProgress(5, enabled=True, stream=term)
    for step in range(1, 6):
        bar.update(step, loss=1.0, lr=1e-4, tokens=10)
    bar.close()
    assert bar.draws_bar and "\r" in term.getvalue() and "[madx] step" not in term.getvalue()
    quiet = io.StringIO()
    P.StepProgress(5, enabled=False, stream=quiet).update(5, loss=1.0, lr=1e-4)
    assert quiet.getvalue() == ""  # --no-progress: the trainer's log lines only


def _set_size(fd, columns, rows=24):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


def test_a_terminal_without_a_width_gets_lines():
    """A pseudo-terminal opened without a size (0 columns), as some job runners give: tqdm would draw nothing
    there, so it gets the plain lines."""
    parent, child = pty.openpty()
    with os.fdopen(child, "w") as tty:
        assert tty.isatty() and not P.is_terminal(tty)
        _set_size(child, 100)
        assert P.is_terminal(tty)
    os.close(parent)


def test_library_bars_follow_stderr():
    import datasets
    import huggingface_hub.utils
    import transformers.utils.logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    try:
        assert P.library_bars(io.StringIO()) is False
        assert not hf_logging.is_progress_bar_enabled() and huggingface_hub.utils.are_progress_bars_disabled()
        assert not datasets.is_progress_bar_enabled()
        assert P.library_bars(_Terminal()) is True
        assert hf_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()
    finally:
        P.library_bars(_Terminal() if was else io.StringIO())


def _train_lang(tiny_base, corpus, out):
    return madx_command("train-lang", "--model", tiny_base, "--lang", "alpha", "--train-data",
                        os.path.join(corpus, "alpha", "text", "train.txt"), "--output", out, "--steps", "6",
                        "--batch-size", "8", "--max-length", "32", "--backend", "eager", "--device", "cpu")


def test_a_command_logging_to_a_file_writes_lines_not_bar_frames(tmp_path, tiny_base, corpus):
    err_path = tmp_path / "stderr.log"
    with open(err_path, "w") as err:
        proc = subprocess.run(_train_lang(tiny_base, corpus, tmp_path / "run"), env=env_for_subprocess(), cwd=ROOT,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True, timeout=300)
    log = err_path.read_text()
    assert proc.returncode == 0, log
    assert "\r" not in log and "it/s" not in log and "%|" not in log, log
    steps = [line for line in log.splitlines() if LINE.match(line)]
    assert steps and steps[-1][20:].startswith("[madx] step 6/6  loss ") and "ETA" not in steps[-1], log
    assert all(re.match(STAMP + r"\[madx\] ", line) for line in log.splitlines()), log


def test_a_command_on_a_terminal_draws_a_bar(tmp_path, tiny_base, corpus):
    parent, child = pty.openpty()
    _set_size(child, 100)
    proc = subprocess.Popen(_train_lang(tiny_base, corpus, tmp_path / "run"), env=env_for_subprocess(), cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=child)
    os.close(child)
    chunks, deadline = [], time.monotonic() + 300
    try:
        while True:
            ready, _, _ = select.select([parent], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                pytest.fail("the command on the terminal did not finish in 300 s")
            try:
                data = os.read(parent, 4096)
            except OSError:  # the command closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=60) == 0
    finally:
        os.close(parent)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    text = b"".join(chunks).decode(errors="replace")
    assert "\r" in text and "train:" in text and "6/6" in text, text  # tqdm's bar, redrawn in place
    assert not any(LINE.match(line.strip("\r")) for line in text.splitlines())
