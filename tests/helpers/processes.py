"""What a test waits for, bounded: subprocesses that cannot read the test runner's standard input and that are
killed with everything they started when they overrun (``run_bounded``, ``Bounded``), and a FIFO reader under
which a writer can neither block nor be left waiting (``FifoReader``). No test using these can hang CI."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time


class Bounded(subprocess.Popen):
    """``subprocess.Popen`` in its own session with standard input ``/dev/null`` unless given; ``kill_all()``
    (and leaving a ``with`` block) kills the process and whatever it started (torchrun's workers, a shell's
    children), so nothing outlives the test."""

    def __init__(self, cmd, **kwargs):
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        super().__init__(cmd, start_new_session=True, **kwargs)

    def kill_all(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass

    def __exit__(self, *exc):
        self.kill_all()
        return super().__exit__(*exc)


def run_bounded(cmd, *, timeout: float, input=None, capture_output=False, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` with standard input ``/dev/null`` unless ``input`` feeds it; past ``timeout`` seconds
    the process and everything it started are killed and ``subprocess.TimeoutExpired`` is raised."""
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    with Bounded(cmd, **kwargs) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill_all()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class FifoReader:
    """Reads a FIFO in a thread, its read end open from before the writer comes until ``close()``: the writer's
    open never waits for a reader and its writes never wait for room, so a writer that writes through cannot
    hang the test, and one that replaced the FIFO instead leaves ``close()`` returning nothing."""

    def __init__(self, path):
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._done = threading.Event()
        self._data = bytearray()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            finished = self._done.is_set()  # read before draining: what was written by then is read
            try:
                chunk = os.read(self._fd, 1 << 16)
            except BlockingIOError:  # a writer is there, nothing written yet
                chunk = b""
            if chunk:
                self._data += chunk
            elif finished:
                return
            else:
                time.sleep(0.005)

    def close(self) -> bytes:
        """Everything written to the FIFO so far (call after the writer is done)."""
        self._done.set()
        self._thread.join(timeout=30)
        os.close(self._fd)
        return bytes(self._data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self._done.is_set():
            self.close()


def unshare_available() -> bool:
    """Whether this system lets a test mount a small tmpfs of its own (``unshare -rm``: user and mount
    namespaces), to fill a real file system up."""
    import shutil
    if not shutil.which("unshare") or not shutil.which("mount"):
        return False
    try:
        return run_bounded(["unshare", "-rm", "true"], timeout=30, capture_output=True).returncode == 0
    except subprocess.TimeoutExpired:
        return False
