"""The CUDA backend's test inputs and checks, and csrc/ built for the CPU emulator.

csrc/*.cu compiled as C++ with -DMADX_EMULATE (csrc/emulation/cuda_emu.h runs each CUDA thread as a fiber,
poisons shared memory, guards every output against out-of-bounds writes) gives a CPU extension with the
real extension's functions: tests drive it through the public ops with backend="cuda". Building it needs a
C++ compiler, ninja and the CUDA toolkit's headers (cuda_fp16.h); ``build_emulator`` skips with the reason
otherwise. The first build takes about a minute (cached by a hash of csrc/ in the temp dir).
"""
from __future__ import annotations

import importlib.util
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from madx_fast import ops, reference
from tests.helpers import ROOT
from tests.helpers.parity import FLOOR, check_parity, rel_err

CSRC = ROOT / "csrc"
CUDA_PKG = ROOT / "madx_fast" / "kernels" / "cuda"
NICE_MODES = [  # (dtype, recompute): low-precision recompute has its own oracle, below
    (torch.float32, True), (torch.float32, False), (torch.float16, False), (torch.bfloat16, False)]
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
    with build.exclusive_build(build_dir):
        return cpp_extension.load(name=name, sources=sources,
                                  extra_cflags=["-DMADX_EMULATE", "-O2", f"-DMADX_SOURCE_DIGEST={digest}"],
                                  extra_include_paths=[str(CSRC), inc], build_directory=str(build_dir))
