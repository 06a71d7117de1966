"""Ahead-of-time compilation of the library's Triton launches for a GPU target, on a machine without a GPU.

The Triton interpreter that runs the kernels in CI never lowers them to GPU code, so registers, spills,
shared memory and the kind of tensor-core instruction a kernel gets are only seen by compiling it for the
GPU. This module does that for exactly the launches the library makes:

1. ``recording()`` runs the real launchers (``adapter_forward``, ``nice_coupling``...) on ``meta`` tensors
   and intercepts every ``kernel[grid](...)`` call instead of running it (``JITFunction.run`` is replaced
   for the duration), keeping its grid and real arguments. Meta tensors carry shapes, strides and the
   storage offset of views, so what the JIT derives from them is what it derives on a GPU (allocations are
   at least 256-byte aligned there, as the meta device's address 0 is).
2. ``specialize()`` derives the signature, the constexprs (including integer arguments equal to 1, such as
   a unit stride) and the 16-divisibility attributes with the JIT's OWN binder
   (``triton.runtime.jit.create_function_from_signature`` over ``native_specialize_impl``, and
   ``JITFunction._pack_args``), as a launch on the GPU would: the same compiled code, so the same registers.
3. ``compile_spec()`` compiles one specialization for ``GPUTarget("cuda", arch, 32)`` and reads the cubin's
   registers, stack (spilled registers: Triton kernels keep nothing else on the stack) and shared memory
   with ``cuobjdump --dump-resource-usage``, and the MMA instruction kind from the PTX.

Works with Triton 3.6 (the GPU image) and later (3.9 here): both have the binder and ``_pack_args``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import re
import shutil
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block (opt-in maximum)


@dataclasses.dataclass
class Launch:
    """One intercepted ``kernel[grid](*args, **kwargs)`` call; ``case`` names the problem that made it."""
    fn: JITFunction
    grid: tuple
    args: tuple
    kwargs: dict
    case: str


@contextlib.contextmanager
def recording(log: list, case=lambda: ""):
    """Within the block, Triton launches append a ``Launch`` to ``log`` instead of running (``case()`` labels
    each). The launchers must have been imported without ``TRITON_INTERPRET`` (their kernels are JIT
    functions, and the launchers pick GPU block sizes)."""
    saved = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        dims = tuple(int(g) for g in (grid if isinstance(grid, tuple) else (grid,)))
        log.append(Launch(self, dims + (1,) * (3 - len(dims)), args, dict(kwargs), case()))

    JITFunction.run = run
    try:
        yield log
    finally:
        JITFunction.run = saved


@dataclasses.dataclass(frozen=True)
class Spec:
    """What the JIT compiles for a launch: picklable, so specializations compile in other processes."""
    module: str
    name: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    def key(self):
        return (self.module, self.name, repr(sorted(self.signature.items())), repr(sorted(self.constexprs.items())),
                repr(sorted(self.attrs.items())), repr(sorted(self.options.items())))


def specialize(launch: Launch, arch: int = 90) -> Spec:
    """The signature, constexprs, divisibility attributes and options the JIT derives for this launch."""
    fn = launch.fn
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    return Spec(fn.__module__, fn.__name__, signature, constexprs, attrs, dict(options.__dict__))


def jit_function(module: str, name: str) -> JITFunction:
    return getattr(importlib.import_module(module), name)


def compile_spec(spec: Spec, arch: int = 90):
    """Compile one specialization for sm_``arch``; returns the compiled kernel (``.asm["ptx"]``, ``["cubin"]``)."""
    src = ASTSource(jit_function(spec.module, spec.name), spec.signature, spec.constexprs, spec.attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec.options))


def _cuobjdump() -> str:
    bundled = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else (shutil.which("cuobjdump") or bundled)


def resources(cubin: bytes) -> dict:
    """``{"REG", "STACK", "SHARED", ...}`` of the (single) function in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", fh.name], capture_output=True, text=True,
                             check=True).stdout
    return {key: int(val) for key, val in re.findall(r"\b([A-Z]+):(\d+)\b", out)}


def mma_kind(ptx: str) -> str:
    """The tensor-core instruction a kernel uses: Hopper's warpgroup MMA, the older warp-level one, or none."""
    if re.search(r"\bwgmma\.mma_async", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "none"


def measure(spec: Spec, arch: int = 90) -> dict:
    """Compile and measure: registers, spill bytes, shared bytes, MMA kind (or the compile error)."""
    try:
        compiled = compile_spec(spec, arch)
    except Exception as exc:  # reported per kernel by the callers
        return {"error": compile_error(exc)}
    res = resources(compiled.asm["cubin"])
    return {"registers": res.get("REG", -1), "spill_bytes": res.get("STACK", -1),
            "shared_bytes": int(compiled.metadata.shared), "mma": mma_kind(compiled.asm["ptx"])}


def compile_error(exc: BaseException) -> str:
    """A compile error in one line (Triton chains CompilationErrors through each inlined function, each
    printing source lines), with the outermost place: "at 3:20: NameError(...)"."""
    where = str(exc).splitlines()[0] if str(exc) else ""
    inner = exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    why = getattr(inner, "error_message", None) or (str(inner).strip().splitlines() or [type(inner).__name__])[-1]
    return (f"{where} {why}" if where.startswith("at ") else why)[:300]


def constexpr_values(launch: Launch) -> dict:
    """The launch's constexpr keyword arguments (block sizes, flags) by name."""
    return {k: v for k, v in launch.kwargs.items() if k not in ("num_warps", "num_stages", "num_ctas")}
