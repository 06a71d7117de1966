"""Helpers shared by the test suite: devices and dtypes (``devices``), fused-vs-reference comparison
(``parity``), tiny HF models (``models``), tiny training runs and the ``madx`` command (``runs``),
subprocesses and FIFOs that cannot hang a test (``processes``), the CUDA backend's inputs and emulator
(``cuda``)."""
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository
