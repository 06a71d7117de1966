"""CUDA backend loader and packaging, no GPU needed: ``import madx_fast`` never touches the extension;
every way the backend can be unavailable ends in a BackendUnavailableError that says why; setup.py and
.ci/compile_cuda degrade cleanly without a CUDA torch / nvcc."""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import madx_fast
from madx_fast import BackendUnavailableError
from tests.helpers import ROOT
from tests.helpers.cuda import adapter_inputs, build, nice_inputs


def test_importing_madx_fast_does_not_load_the_cuda_backend():
    code = ("import sys, madx_fast; "
            "loaded = [m for m in sys.modules if m.startswith(('madx_fast.kernels.cuda', 'madx_fast._cuda_C'))]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)


def test_cuda_backend_on_cpu_tensors_says_why():
    x, r, wd, bd, wu, bu = adapter_inputs(3, 8, 2, torch.float32, "cpu")
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        madx_fast.bottleneck_adapter(x, r, wd, bd, wu, bu, backend="cuda")
    xn, weights = nice_inputs(3, 8, torch.float32, "cpu")
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        madx_fast.nice_forward(xn, *weights, backend="cuda")


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build")
def test_cpu_only_torch_names_the_reason():
    from madx_fast.backends import kernel_module

    with pytest.raises(BackendUnavailableError, match="CUDA build of PyTorch.*CPU-only"):
        kernel_module("cuda")
    assert "madx_fast.kernels.cuda" not in sys.modules  # a failed import leaves nothing half-loaded


def test_loader_without_prebuilt_and_jit_disabled(cuda_torch, monkeypatch):
    monkeypatch.setenv("MADX_FAST_CUDA_NO_JIT", "1")
    with pytest.raises(ImportError, match=r"madx_fast\._cuda_C is not importable.*MADX_FAST_CUDA_NO_JIT"):
        build.load_extension()


def test_loader_without_toolkit(cuda_torch, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.delenv("MADX_FAST_CUDA_NO_JIT", raising=False)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    with pytest.raises(ImportError, match="no CUDA toolkit found"):
        build.load_extension()


def test_loader_without_sources(monkeypatch, tmp_path):
    monkeypatch.delenv("MADX_FAST_CUDA_NO_JIT", raising=False)
    reason = build.jit_unavailable_reason(tmp_path)  # an install without csrc/
    assert reason is not None and f"CUDA sources are not at {tmp_path}" in reason


def test_loader_reports_build_failures(cuda_torch, monkeypatch):
    monkeypatch.delenv("MADX_FAST_CUDA_NO_JIT", raising=False)
    monkeypatch.setattr(build, "jit_unavailable_reason", lambda csrc=None: None)

    def failing_build(csrc=None):
        raise RuntimeError("Error building extension 'madx_fast_cuda': nvcc exploded")

    monkeypatch.setattr(build, "jit_build", failing_build)
    with pytest.raises(ImportError, match="building csrc/ failed: .*nvcc exploded"):
        build.load_extension()


def test_backend_error_carries_the_loader_reason(monkeypatch):
    """backends.kernel_module turns the loader's ImportError into BackendUnavailableError with its text."""
    from madx_fast import backends

    def failing_import(name):
        raise ImportError("the reason from the loader")

    monkeypatch.setattr(backends, "importlib", SimpleNamespace(import_module=failing_import))
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot be loaded: the reason from the loader"):
        backends.kernel_module("cuda")


def test_stale_prebuilt_is_rebuilt(stale_prebuilt, monkeypatch, caplog):
    assert "was built from other sources" in build.stale_reason(stale_prebuilt)
    fresh = SimpleNamespace(SOURCE_DIGEST=build.source_digest())
    monkeypatch.setattr(build, "jit_unavailable_reason", lambda csrc=None: None)
    monkeypatch.setattr(build, "jit_build", lambda csrc=None: fresh)
    with caplog.at_level("WARNING", logger="madx_fast"):
        assert build.load_extension() is fresh
    assert "building csrc/ instead" in caplog.text


def test_stale_prebuilt_is_used_when_nothing_can_be_built(stale_prebuilt, monkeypatch, caplog):
    monkeypatch.setenv("MADX_FAST_CUDA_NO_JIT", "1")
    with caplog.at_level("WARNING", logger="madx_fast"):
        assert build.load_extension() is stale_prebuilt
    assert "using it anyway" in caplog.text


def test_prebuilt_without_sources_is_never_stale(tmp_path):
    assert build.stale_reason(SimpleNamespace(SOURCE_DIGEST="0000"), tmp_path) is None


def test_build_sources_and_digest(tmp_path):
    names = [p.name for p in build.sources()]
    assert any(n.endswith(".cu") for n in names) and "bindings.cpp" in names
    assert not any("emulat" in n for n in names)  # the emulator is for tests, never in the extension
    (tmp_path / "a.cu").write_text("// a\n")
    (tmp_path / "b.cuh").write_text("// b\n")
    before = build.source_digest(tmp_path)
    (tmp_path / "b.cuh").write_text("// b changed\n")  # a header change must force a new JIT build
    assert build.source_digest(tmp_path) != before


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build")
def test_setup_py_installs_pure_python_without_cuda_torch():
    res = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "without the CUDA extension" in res.stderr and "CPU-only" in res.stderr


def test_compile_script_without_nvcc_exits_cleanly():
    env = dict(os.environ, NVCC="/nonexistent/nvcc")
    res = subprocess.run(["bash", str(ROOT / ".ci" / "compile_cuda")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "nvcc not found" in res.stdout


def test_a_build_killed_mid_way_does_not_block_the_next(tmp_path):
    """torch's JIT builder leaves its `lock` file behind when killed mid-build, and waits on it forever the next
    time; exclusive_build removes it once it holds the directory's flock."""
    (tmp_path / build.TORCH_BUILD_LOCK).touch()  # what a killed build leaves
    with build.exclusive_build(tmp_path):
        assert not (tmp_path / build.TORCH_BUILD_LOCK).exists()


def test_builds_of_one_directory_take_turns(tmp_path):
    """While one process builds, another waits for the flock (and so never removes a live torch lock)."""
    code = ("import fcntl, sys\n"
            "fh = open(sys.argv[1], 'a')\n"
            "try:\n"
            "    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "except BlockingIOError:\n"
            "    sys.exit(3)\n")
    probe = [sys.executable, "-c", code, str(tmp_path / "madx_build.lock")]
    with build.exclusive_build(tmp_path):
        (tmp_path / build.TORCH_BUILD_LOCK).touch()  # this process's build in progress
        held = subprocess.run(probe, stdin=subprocess.DEVNULL, timeout=60)
    assert held.returncode == 3
    assert subprocess.run(probe, stdin=subprocess.DEVNULL, timeout=60).returncode == 0  # released on exit
