"""Backend selection: auto, the environment override, and clear errors for unavailable backends."""
import pytest
import torch

from madx_fast import BackendUnavailableError, ops, resolve_backend
from madx_fast.backends import ENV_VAR


def test_auto_picks_triton_under_interpreter_and_eager_without(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(None, torch.device("cpu")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", torch.device("cpu")) == "eager"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "eager")
    assert resolve_backend(None, torch.device("cpu")) == "eager"
    assert resolve_backend("triton", torch.device("cpu")) == "triton"  # an explicit choice wins
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_backend(None, torch.device("cpu"))


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="'fast'"):
        resolve_backend("fast", torch.device("cpu"))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        resolve_backend("triton", torch.device("cpu"))


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    x = torch.randn(4, 8)
    w = torch.randn(2, 8), torch.zeros(2), torch.randn(8, 2), torch.zeros(8)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        ops.bottleneck_adapter(x, None, *w, backend="cuda")


def test_eager_backend_equals_reference(monkeypatch):
    from madx_fast import reference
    x = torch.randn(6, 8)
    w = torch.randn(2, 8), torch.randn(2), torch.randn(8, 2), torch.randn(8)
    y = ops.bottleneck_adapter(x, None, *w, scaling=2.0, backend="eager")
    assert torch.equal(y, reference.bottleneck_adapter_reference(x, None, *w, 2.0, "relu"))
