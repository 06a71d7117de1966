"""CUDA C++ backend (csrc/, madx_fast/kernels/cuda): what is specific to it.

Three groups:

* Loader and packaging, no GPU needed: ``import madx_fast`` never touches the extension; every way the
  backend can be unavailable ends in a BackendUnavailableError that says why; setup.py and
  .ci/compile_cuda degrade cleanly without a CUDA torch / nvcc.
* The CUDA sources on the CPU emulator, no GPU needed: csrc/*.cu compiled as C++ with -DMADX_EMULATE
  (csrc/emulation/cuda_emu.h runs each CUDA thread as a fiber, poisons shared memory, guards every output
  against out-of-bounds writes) and driven through the public ops with backend="cuda", so the kernels'
  indexing, bounds checks, barriers, split-K reductions and the whole launcher/autograd path are checked
  against madx_fast.reference here. Needs a C++ compiler, ninja and the CUDA toolkit's headers
  (cuda_fp16.h); skips with the reason otherwise. The first build takes about a minute (cached by a hash
  of csrc/ in the temp dir).
* The real extension on a GPU: parity for every dtype and the brief's shapes, non-contiguous inputs,
  N = 0, determinism, inverse(forward(x)). Skipped with a reason when torch.cuda.is_available() is False.
"""
from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _parity import FLOOR, check_parity, rel_err

import madx_fast
from madx_fast import BackendUnavailableError, ops, reference

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CUDA_PKG = ROOT / "madx_fast" / "kernels" / "cuda"
GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
ACTIVATIONS = list(reference.ACTIVATION_CODES)  # identity, relu, gelu, gelu_tanh, silu, tanh, leaky_relu


def load_file(name: str, path: Path):
    """Import one file of madx_fast/kernels/cuda on its own: importing the package would try to load the
    extension (and raise without one)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = load_file("madx_cuda_build_under_test", CUDA_PKG / "_build.py")
launchers = load_file("madx_cuda_launchers_under_test", CUDA_PKG / "launchers.py")


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------
def adapter_inputs(n, h, d, dtype, device, residual=True, weight_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    wdt = weight_dtype or dtype
    x = torch.randn(n, h, generator=g).to(device, dtype)
    r = torch.randn(n, h, generator=g).to(device, dtype) if residual else None
    w_down = (torch.randn(d, h, generator=g) / math.sqrt(h)).to(device, wdt)
    b_down = (0.1 * torch.randn(d, generator=g)).to(device, wdt)
    w_up = (torch.randn(h, d, generator=g) / math.sqrt(d)).to(device, wdt)
    b_up = (0.1 * torch.randn(h, generator=g)).to(device, wdt)
    return x, r, w_down, b_down, w_up, b_up


def nice_inputs(n, h, dtype, device, seed=0, reduction_factor=2):
    g = torch.Generator().manual_seed(seed)
    len1, len2 = reference.nice_split(h)
    hf, hg = reference.nice_hidden_sizes(h, reduction_factor)
    shapes = [(hf, len2), (hf,), (len1, hf), (len1,), (hg, len1), (hg,), (len2, hg), (len2,)]
    fans = [len2, len2, hf, hf, len1, len1, hg, hg]
    weights = [(torch.randn(s, generator=g) / math.sqrt(max(f, 1))).to(device, dtype) for s, f in zip(shapes, fans)]
    x = torch.randn(n, h, generator=g).to(device, dtype)
    return x, weights


def nan_padded(t: torch.Tensor) -> torch.Tensor:
    """The same values as a view into a larger NaN-filled buffer (row stride > H, NaN all around): any
    out-of-bounds read by a kernel pulls NaN into its results."""
    n, h = t.shape
    buf = torch.full((n + 2, h + 7), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[1:n + 1, 3:h + 3]
    view.copy_(t)
    return view


def check_adapter(backend, n, h, d, dtype, device, residual=True, activation="relu", scaling=0.7,
                  weight_dtype=None, transform=None, seed=0):
    x, r, wd, bd, wu, bu = adapter_inputs(n, h, d, dtype, device, residual, weight_dtype, seed)

    def prep(t):
        return transform(t) if transform is not None else t

    def fused(x, wd, bd, wu, bu, *rest):
        rr = rest[0] if rest else None
        return ops.bottleneck_adapter(prep(x), None if rr is None else prep(rr), wd, bd, wu, bu, scaling=scaling,
                                      activation=activation, backend=backend)

    def ref(x, wd, bd, wu, bu, *rest):
        rr = rest[0] if rest else None
        return reference.bottleneck_adapter_reference(x, rr, wd, bd, wu, bu, scaling, activation)

    inputs = [x, wd, bd, wu, bu] + ([r] if residual else [])
    names = ["dw_down", "db_down", "dw_up", "db_up"] + (["dresidual"] if residual else [])
    check_parity(fused, ref, inputs, dtype, ["dx"] + names)


def check_nice(backend, n, h, dtype, device, inverse, recompute, activation="relu", transform=None):
    x, weights = nice_inputs(n, h, dtype, device)
    fused_op = ops.nice_inverse if inverse else ops.nice_forward
    ref_op = reference.nice_inverse_reference if inverse else reference.nice_forward_reference

    def fused(x, *w):
        xx = transform(x) if transform is not None else x
        return fused_op(xx, *w, activation=activation, recompute=recompute, backend=backend)

    def ref(x, *w):
        return ref_op(x, *w, activation_name=activation)

    names = ["dx", "df_w1", "df_b1", "df_w2", "df_b2", "dg_w1", "dg_b1", "dg_w2", "dg_b2"]
    check_parity(fused, ref, [x] + weights, dtype, names)


def check_nice_backward_at_rebuilt_input(kernels, n, h, dtype, device, inverse, activation="relu"):
    """Recompute mode in fp16/bf16, checked against the right oracle.

    The backward rebuilds the input from the rounded output (about one ulp off), and with few tokens a
    single ReLU whose pre-activation sits within that ulp of zero moves a bias gradient by several percent,
    so comparing with the reference at the ORIGINAL input mostly measures luck. Instead: the exact
    gradient at the input the backward actually used. That input x* has x*[:, tB] = the rebuilt columns
    (bitwise what the opposite coupling's first step gives) and x*[:, tA] chosen in float64 so that the
    coupling of x* reproduces the saved output's tA columns exactly; the float64 reference gradient at x*
    is then what a correct kernel computes up to its own low-precision arithmetic.
    """
    code = reference.ACTIVATION_CODES[activation]
    g = torch.Generator().manual_seed(1)
    x, w = nice_inputs(n, h, dtype, device)
    out = kernels.nice_coupling(x, w, code, inverse)
    dout = torch.randn(out.shape, generator=g).to(device, dtype)
    got = kernels.nice_coupling_backward(dout, out, None, w, code, inverse)

    len1 = h // 2
    rebuilt = kernels.nice_coupling(out, w, code, not inverse).double()
    out64, w64 = out.double(), [t.double() for t in w]
    if not inverse:  # A = F rewrites x1 from x2; B = G. x*[:, len1:] is rebuilt, x1* = y1 - F(x2*)
        x2 = rebuilt[:, len1:]
        x_star = torch.cat([out64[:, :len1] - reference._mlp(x2, *w64[:4], activation), x2], dim=1)
    else:  # A = G rewrites y2 from y1 (sign -1); B = F. y1* is rebuilt, y2* = x2 + G(y1*)
        y1 = rebuilt[:, :len1]
        x_star = torch.cat([y1, out64[:, len1:] + reference._mlp(y1, *w64[4:], activation)], dim=1)
    ref_fn = reference.nice_inverse_reference if inverse else reference.nice_forward_reference

    def grads_at(inputs, grad_out):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        return torch.autograd.grad(ref_fn(*leaves, activation_name=activation), leaves, grad_out)

    want = grads_at([x_star] + w64, dout.double())
    low = grads_at([x_star.to(dtype)] + w, dout)  # the eager reference's own noise at this precision
    names = ["dx", "df_w1", "df_b1", "df_w2", "df_b2", "dg_w1", "dg_b1", "dg_w2", "dg_b2"]
    report, ok = [], True
    for name, a, lo, r in zip(names, got, low, want):
        tol = max(3 * rel_err(lo, r), FLOOR[dtype])
        err = rel_err(a, r)
        ok &= err <= tol
        report.append(f"{name}: err {err:.2e} (allowed {tol:.1e})")
    assert ok, "recompute backward differs from the reference at its rebuilt input:\n  " + "\n  ".join(report)


# ----------------------------------------------------------------------------------------------------------
# Loader and packaging (no GPU)
# ----------------------------------------------------------------------------------------------------------
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


@pytest.fixture
def cuda_torch(monkeypatch):
    """Pretend torch is a CUDA build with no prebuilt extension, to reach the JIT branch of the loader."""
    monkeypatch.setattr(build, "unavailable_reason", lambda: None)

    def no_prebuilt(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(build, "importlib", SimpleNamespace(import_module=no_prebuilt))


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


@pytest.fixture
def stale_prebuilt(monkeypatch):
    """A prebuilt module built from other sources than csrc/."""
    module = SimpleNamespace(SOURCE_DIGEST="0000")
    monkeypatch.setattr(build, "unavailable_reason", lambda: None)
    monkeypatch.setattr(build, "importlib", SimpleNamespace(import_module=lambda name: module))
    return module


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


# ----------------------------------------------------------------------------------------------------------
# The CUDA sources on the CPU emulator (no GPU)
# ----------------------------------------------------------------------------------------------------------
def _cuda_include_dir() -> str | None:
    """A directory with cuda_fp16.h / cuda_runtime_api.h (the emulator uses the toolkit's host-side headers)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for base in filter(None, candidates):
        for inc in (Path(base) / "include", Path(base) / "targets" / "x86_64-linux" / "include"):
            if (inc / "cuda_fp16.h").is_file() and (inc / "cuda_runtime_api.h").is_file():
                return str(inc)
    return None


def build_emulator():
    """csrc/ compiled for the CPU emulator as a torch extension (CPU tensors in, CPU tensors out)."""
    from torch.utils import cpp_extension

    inc = _cuda_include_dir()
    if inc is None:
        pytest.skip("the emulator build needs the CUDA toolkit's headers (cuda_fp16.h); none found")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("the emulator build needs a C++ compiler")
    if not cpp_extension.is_ninja_available():
        pytest.skip("the emulator build needs ninja")
    digest = build.source_digest(CSRC)
    name = f"madx_fast_cuda_emu_{digest}"
    build_dir = Path(tempfile.gettempdir()) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = []
    for cu in sorted(CSRC.glob("*.cu")):  # each .cu compiled as C++ through a one-line wrapper
        wrapper = build_dir / f"emu_{cu.stem}.cpp"
        text = f'#include "{cu}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        sources.append(str(wrapper))
    sources += [str(p) for p in sorted(CSRC.glob("*.cpp"))]
    return cpp_extension.load(name=name, sources=sources,
                              extra_cflags=["-DMADX_EMULATE", "-O2", f"-DMADX_SOURCE_DIGEST={digest}"],
                              extra_include_paths=[str(CSRC), inc], build_directory=str(build_dir))


@pytest.fixture(scope="module")
def emulated_launchers():
    ext = build_emulator()
    assert ext.EMULATED
    return launchers.make_launchers(ext)


@pytest.fixture
def emulator(emulated_launchers, monkeypatch):
    """backend="cuda" on CPU tensors runs csrc/ on the emulator, through ops.py's custom ops and autograd."""
    monkeypatch.setattr(ops, "resolve_backend", lambda backend, device: backend or "cuda")
    monkeypatch.setattr(ops, "kernel_module", lambda name: emulated_launchers)
    return emulated_launchers


EMU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16 works here: it is our C++, not Triton


@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=str)
@pytest.mark.parametrize("n,h,d", [(1, 64, 4), (7, 96, 48), (300, 96, 48), (33, 70, 65), (5, 768, 48)])
@pytest.mark.parametrize("residual", [True, False])
def test_emulated_adapter_parity(emulator, dtype, n, h, d, residual):
    check_adapter("cuda", n, h, d, dtype, "cpu", residual=residual)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_adapter_activations(emulator, activation, dtype):
    check_adapter("cuda", 19, 40, 9, dtype, "cpu", residual=False, activation=activation, scaling=1.3)


@pytest.mark.parametrize("h,dtype", [(96, torch.float16), (768, torch.bfloat16)], ids=str)
def test_emulated_adapter_large_bottleneck_and_splitk(emulator, h, dtype):
    # d = 384: six 64-wide tiles; 1000 tokens give several split-K slices for the weight gradients.
    check_adapter("cuda", 1000, h, 384, dtype, "cpu", seed=h)


def test_emulated_adapter_mixed_weight_dtype(emulator):
    check_adapter("cuda", 9, 64, 8, torch.float16, "cpu", weight_dtype=torch.float32)


@pytest.mark.parametrize("residual", [True, False])
def test_emulated_adapter_out_of_bounds_reads_and_strides(emulator, residual):
    # Inputs live inside NaN-filled buffers with a row stride > H; any stray read shows up as NaN.
    check_adapter("cuda", 37, 72, 12, torch.float32, "cpu", residual=residual, transform=nan_padded)


def test_emulated_adapter_column_strided_input(emulator):
    check_adapter("cuda", 11, 64, 8, torch.float32, "cpu", transform=lambda t: t.t().contiguous().t())


def test_emulated_adapter_zero_tokens(emulator):
    x, r, wd, bd, wu, bu = adapter_inputs(0, 64, 4, torch.float32, "cpu")
    params = [t.requires_grad_() for t in (wd, bd, wu, bu)]
    x.requires_grad_()
    y = ops.bottleneck_adapter(x, None, *params, backend="cuda")
    assert y.shape == (0, 64)
    y.sum().backward()
    assert x.grad.shape == (0, 64)
    for p in params:
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


NICE_MODES = [  # (dtype, recompute): low-precision recompute has its own oracle, below
    (torch.float32, True), (torch.float32, False), (torch.float16, False), (torch.bfloat16, False)]


@pytest.mark.parametrize("dtype,recompute", NICE_MODES, ids=str)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("n,h", [(1, 64), (7, 96), (70, 97)])
def test_emulated_nice_parity(emulator, dtype, recompute, inverse, n, h):
    check_nice("cuda", n, h, dtype, "cpu", inverse, recompute)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("n,h", [(7, 96), (70, 97)])
def test_emulated_nice_recompute_low_precision(emulated_launchers, dtype, inverse, n, h):
    check_nice_backward_at_rebuilt_input(emulated_launchers, n, h, dtype, "cpu", inverse)


@pytest.mark.parametrize("activation", ["gelu", "tanh", "silu"])
def test_emulated_nice_activations(emulator, activation):
    check_nice("cuda", 13, 32, torch.float32, "cpu", inverse=True, recompute=True, activation=activation)


def test_emulated_nice_out_of_bounds_reads(emulator):
    check_nice("cuda", 21, 50, torch.float32, "cpu", inverse=False, recompute=False, transform=nan_padded)


@pytest.mark.parametrize("h", [3, 6, 64, 97])  # h = 3: G has a zero-width hidden layer
def test_emulated_nice_roundtrip(emulator, h):
    x, weights = nice_inputs(25, h, torch.float32, "cpu")
    y = ops.nice_forward(x, *weights, backend="cuda")
    assert torch.allclose(ops.nice_inverse(y, *weights, backend="cuda"), x, atol=1e-5, rtol=1e-5)
    assert torch.allclose(y, reference.nice_forward_reference(x, *weights), atol=1e-5, rtol=1e-5)


def test_emulated_module_knows_its_sources():
    ext = build_emulator()
    assert ext.SOURCE_DIGEST == build.source_digest(CSRC)  # the digest define survives the build
    assert build.stale_reason(ext) is None


def test_emulated_launcher_contract(emulated_launchers):
    """Shapes and dtypes exactly as madx_fast/kernels/__init__.py specifies, straight from the launchers."""
    x, r, wd, bd, wu, bu = adapter_inputs(10, 64, 6, torch.bfloat16, "cpu", weight_dtype=torch.float32)
    y, z = emulated_launchers.adapter_forward(x, r, wd, bd, wu, bu, 1.0, reference.ACTIVATION_CODES["relu"])
    assert (y.shape, y.dtype, z.shape, z.dtype) == ((10, 64), torch.bfloat16, (10, 6), torch.bfloat16)
    grads = emulated_launchers.adapter_backward(torch.randn_like(y), x, z, wd, wu, 1.0, 1, True)
    assert [tuple(g.shape) for g in grads] == [(10, 64), (6, 64), (6,), (64, 6), (64,)]
    assert [g.dtype for g in grads] == [torch.bfloat16] + [torch.float32] * 4
    xn, weights = nice_inputs(10, 64, torch.float16, "cpu")
    out = emulated_launchers.nice_coupling(xn, tuple(weights), 1, False)
    assert out.shape == xn.shape and out.dtype == torch.float16
    grads = emulated_launchers.nice_coupling_backward(torch.randn_like(out), out, None, tuple(weights), 1, False)
    assert len(grads) == 9 and grads[0].dtype == torch.float16
    assert [tuple(g.shape) for g in grads[1:]] == [tuple(w.shape) for w in weights]
    assert all(g.dtype == torch.float32 for g in grads[1:])


def test_emulated_bad_inputs_are_named(emulated_launchers):
    x, r, wd, bd, wu, bu = adapter_inputs(4, 16, 2, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="unknown activation code 9"):
        emulated_launchers.adapter_forward(x, r, wd, bd, wu, bu, 1.0, 9)
    with pytest.raises(RuntimeError, match="w_up has shape"):
        emulated_launchers.adapter_forward(x, r, wd, bd, wu[:8], bu, 1.0, 1)
    with pytest.raises(RuntimeError, match="residual has dtype"):
        emulated_launchers.adapter_forward(x, r.half(), wd, bd, wu, bu, 1.0, 1)


# ----------------------------------------------------------------------------------------------------------
# The real extension on a GPU
# ----------------------------------------------------------------------------------------------------------
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_SHAPES = [(n, h, d) for n in (1, 7, 1000) for h in (64, 96, 768) for d in (4, 48, 384)]


@needs_gpu
@pytest.mark.gpu
def test_gpu_backend_loads():
    from madx_fast.backends import kernel_module

    module = kernel_module("cuda")
    assert not module._C.EMULATED


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("n,h,d", GPU_SHAPES)
def test_gpu_adapter_parity(dtype, n, h, d):
    # One seed per shape; with n = 1, d = 4 some draws switch every ReLU off, which makes the down-projection
    # gradients exactly zero (check_parity rejects such vacuous comparisons): these seeds do not.
    check_adapter("cuda", n, h, d, dtype, "cuda", residual=(n % 2 == 1), seed=n + h + d)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_adapter_activations(activation, dtype):
    check_adapter("cuda", 1000, 768, 48, dtype, "cuda", residual=False, activation=activation)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_adapter_non_contiguous(dtype):
    check_adapter("cuda", 1000, 768, 48, dtype, "cuda", transform=nan_padded)
    check_adapter("cuda", 1000, 96, 48, dtype, "cuda", transform=lambda t: t.t().contiguous().t())


@needs_gpu
@pytest.mark.gpu
def test_gpu_adapter_mixed_weight_dtype():
    check_adapter("cuda", 1000, 768, 48, torch.bfloat16, "cuda", weight_dtype=torch.float32)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("d", [4, 384])
def test_gpu_adapter_zero_tokens(d):
    x, r, wd, bd, wu, bu = adapter_inputs(0, 768, d, torch.bfloat16, "cuda")
    params = [t.requires_grad_() for t in (wd, bd, wu, bu)]
    x.requires_grad_()
    y = ops.bottleneck_adapter(x, None, *params, backend="cuda")
    assert y.shape == (0, 768)
    y.sum().backward()
    assert x.grad.shape == (0, 768)
    for p in params:
        assert torch.equal(p.grad, torch.zeros_like(p))


@needs_gpu
@pytest.mark.gpu
def test_gpu_weight_gradients_are_deterministic():
    x, r, wd, bd, wu, bu = adapter_inputs(4099, 768, 384, torch.bfloat16, "cuda")
    runs = []
    for _ in range(2):
        params = [t.detach().clone().requires_grad_() for t in (x, wd, bd, wu, bu)]
        y = ops.bottleneck_adapter(params[0], r, *params[1:], backend="cuda")
        y.backward(torch.ones_like(y))
        runs.append([p.grad for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,recompute", NICE_MODES, ids=str)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("n,h", [(1, 64), (7, 96), (1000, 768), (1000, 97)])
def test_gpu_nice_parity(dtype, recompute, inverse, n, h):
    check_nice("cuda", n, h, dtype, "cuda", inverse, recompute)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("n,h", [(7, 96), (1000, 768), (1000, 97)])
def test_gpu_nice_recompute_low_precision(dtype, inverse, n, h):
    from madx_fast.backends import kernel_module

    check_nice_backward_at_rebuilt_input(kernel_module("cuda"), n, h, dtype, "cuda", inverse)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_nice_non_contiguous(dtype):
    check_nice("cuda", 1000, 768, dtype, "cuda", inverse=False, recompute=False, transform=nan_padded)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 6e-2)],
                         ids=str)
def test_gpu_nice_roundtrip(dtype, atol):
    x, weights = nice_inputs(1000, 768, dtype, "cuda")
    y = ops.nice_forward(x, *weights, backend="cuda")
    back = ops.nice_inverse(y, *weights, backend="cuda")
    assert torch.allclose(back.float(), x.float(), atol=atol, rtol=atol)


@needs_gpu
@pytest.mark.gpu
def test_gpu_nice_zero_tokens():
    x, weights = nice_inputs(0, 768, torch.float16, "cuda")
    params = [w.requires_grad_() for w in weights]
    y = ops.nice_forward(x.requires_grad_(), *params, backend="cuda")
    y.sum().backward()
    assert y.shape == (0, 768) and x.grad.shape == (0, 768)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)
