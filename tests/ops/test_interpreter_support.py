"""Triton's CPU interpreter is refused with a clear reason where it cannot run: Triton < 3.7 with numpy >= 2.4.

Triton 3.6's interpreter turns loop bounds into Python ints with ``int(one_element_array)``, which numpy 2.4
made an error, so every kernel with a runtime loop bound died with "only 0-dimensional arrays can be
converted to Python scalars" (checked by hand with triton 3.6.0: numpy 2.4.6 fails, 2.3.5 runs the parity
tests; triton 3.7.0 squeezes the array first). The declared floor stays triton >= 3.6, which GPUs run."""
from __future__ import annotations

import pytest
import torch

from madx_fast import BackendUnavailableError, backends


@pytest.fixture
def versions(monkeypatch):
    def use(triton_version, numpy_version):
        table = {"triton": triton_version, "numpy": numpy_version}
        monkeypatch.setattr(backends, "_installed_version", lambda package: table[package])
        backends.interpreter_problem.cache_clear()
    yield use
    backends.interpreter_problem.cache_clear()


@pytest.mark.skipif(not backends.triton_interpreter_enabled(), reason="the interpreter case (TRITON_INTERPRET=1)")
def test_triton_36_interpreter_with_numpy_24_is_refused(versions):
    versions((3, 6), (2, 4))
    with pytest.raises(BackendUnavailableError) as exc:
        backends.resolve_backend("triton", torch.device("cpu"))
    msg = str(exc.value)
    assert "Triton 3.6" in msg and "numpy 2.4" in msg and "triton >= 3.7" in msg and "numpy < 2.4" in msg
    assert "eager" in msg
    with pytest.raises(BackendUnavailableError):
        backends.resolve_backend("auto", torch.device("cpu"))


@pytest.mark.skipif(not backends.triton_interpreter_enabled(), reason="the interpreter case (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("triton_version,numpy_version", [((3, 6), (2, 3)), ((3, 7), (2, 4)), ((3, 9), (2, 5))])
def test_working_combinations_run(versions, triton_version, numpy_version):
    versions(triton_version, numpy_version)
    assert backends.resolve_backend("triton", torch.device("cpu")) == "triton"


def test_gpus_are_not_affected(versions):
    versions((3, 6), (2, 5))  # the GPU image: triton 3.6, numpy 2.5
    assert backends.resolve_backend("triton", torch.device("cuda")) == "triton"
    assert backends.resolve_backend("eager", torch.device("cpu")) == "eager"


def test_the_installed_versions_are_read():
    triton_version = backends._installed_version("triton")
    assert triton_version is not None and triton_version >= (3, 6)
    assert backends._installed_version("no-such-package-madx") is None
