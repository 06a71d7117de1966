"""Helpers shared by the test suite: devices and dtypes (``devices``), fused-vs-reference comparison
(``parity``), tiny HF models (``models``), tiny training runs and the ``madx`` command (``runs``),
subprocesses and FIFOs that cannot hang a test (``processes``), the CUDA backend's inputs and emulator
(``cuda``)."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository


def load_script(path: str):
    """A script of the repository (``benchmarks/bench_ops.py``, ``scripts/gpu_tables.py``...) as a module."""
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
