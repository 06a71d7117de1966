"""Fixtures of the CUDA backend tests: the emulated extension, and loader states."""
from types import SimpleNamespace

import pytest

from madx_fast.ops import dispatch
from tests.helpers.cuda import build, build_emulator, launchers


@pytest.fixture(scope="module")
def emulated_launchers():
    ext = build_emulator()
    assert ext.EMULATED
    return launchers.make_launchers(ext)


@pytest.fixture
def emulator(emulated_launchers, monkeypatch):
    """backend="cuda" on CPU tensors runs csrc/ on the emulator, through madx_fast.ops' custom ops and autograd."""
    monkeypatch.setattr(dispatch, "resolve_backend", lambda backend, device: backend or "cuda")
    monkeypatch.setattr(dispatch, "kernel_module", lambda name: emulated_launchers)
    return emulated_launchers


@pytest.fixture
def cuda_torch(monkeypatch):
    """Pretend torch is a CUDA build with no prebuilt extension, to reach the JIT branch of the loader."""
    monkeypatch.setattr(build, "unavailable_reason", lambda: None)

    def no_prebuilt(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(build, "importlib", SimpleNamespace(import_module=no_prebuilt))


@pytest.fixture
def stale_prebuilt(monkeypatch):
    """A prebuilt module built from other sources than csrc/."""
    module = SimpleNamespace(SOURCE_DIGEST="0000")
    monkeypatch.setattr(build, "unavailable_reason", lambda: None)
    monkeypatch.setattr(build, "importlib", SimpleNamespace(import_module=lambda name: module))
    return module
