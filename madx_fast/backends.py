"""Which implementation runs an op: "eager" (the reference), "triton" or "cuda".

``backend=None`` or ``"auto"`` means the default: the ``MADX_FAST_BACKEND`` environment variable when it is
set, otherwise Triton for CUDA tensors and eager for CPU tensors (Triton on CPU tensors only when its
interpreter is on, ``TRITON_INTERPRET=1``, which is how CI checks the kernels without a GPU). The
interpreter's bfloat16 arithmetic is broken (results off by orders of magnitude), so bfloat16 tensors on
the Triton backend without a GPU are refused (``BackendDtypeError``) rather than computed wrongly, and so is
the interpreter of Triton < 3.7 with numpy >= 2.4, which cannot run at all (see ``interpreter_problem``).

Every fused backend is a module exposing the same four launchers (see ``madx_fast/kernels/triton``):
``adapter_forward``, ``adapter_backward``, ``nice_coupling``, ``nice_coupling_backward``.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os

import torch

from .kernels import triton_interpreter_enabled

BACKENDS = ("auto", "eager", "triton", "cuda")
ENV_VAR = "MADX_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why."""


class BackendDtypeError(BackendUnavailableError, ValueError):
    """The backend cannot compute in the tensors' dtype here (also a ValueError: the dtype is what to change)."""


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Turn a user's choice (None, "auto", or a name) into "eager", "triton" or "cuda" for tensors on ``device``."""
    choice = (backend or "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if choice == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"{ENV_VAR}={env!r} is not a backend; choose one of {BACKENDS}")
            choice = env
        elif device.type == "cuda" or triton_interpreter_enabled():
            choice = "triton"
        else:
            choice = "eager"
    if choice == "triton" and device.type != "cuda" and not triton_interpreter_enabled():
        raise BackendUnavailableError(
            f"backend 'triton' needs CUDA tensors (got tensors on {device}); set TRITON_INTERPRET=1 "
            "(before importing madx_fast) to run the Triton kernels on the CPU, or use backend='eager'"
        )
    if choice == "triton" and device.type != "cuda" and interpreter_problem():
        raise BackendUnavailableError(interpreter_problem())
    if choice == "cuda":
        if device.type != "cuda":
            raise BackendUnavailableError(f"backend 'cuda' needs CUDA tensors (got tensors on {device})")
        kernel_module("cuda")  # raises with the reason when the extension cannot be built or loaded
    return choice


def _installed_version(package: str) -> tuple[int, ...] | None:
    try:
        text = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2] if part.isdigit())


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run here, or None. Triton 3.6's interpreter turns one-element
    arrays into loop bounds with ``int(array)``, which numpy 2.4 made an error ("only 0-dimensional arrays
    can be converted to Python scalars"); Triton 3.7 fixed it. On a GPU the interpreter is not used."""
    triton_version, numpy_version = _installed_version("triton"), _installed_version("numpy")
    if triton_version and numpy_version and triton_version < (3, 7) and numpy_version >= (2, 4):
        return (f"Triton {'.'.join(map(str, triton_version))}'s CPU interpreter (TRITON_INTERPRET=1) cannot run "
                f"with numpy {'.'.join(map(str, numpy_version))}: it converts one-element arrays to Python ints, "
                "which numpy >= 2.4 refuses. Install triton >= 3.7 or numpy < 2.4 to run the Triton kernels on "
                "the CPU, or use backend='eager' (on a GPU, Triton 3.6 is fine)")
    return None


def check_backend_dtype(name: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse what a resolved backend would compute wrongly: bfloat16 on Triton's CPU interpreter."""
    if name == "triton" and device.type != "cuda" and dtype == torch.bfloat16:
        raise BackendDtypeError(
            f"backend 'triton' cannot compute bfloat16 on the {device.type.upper()}: Triton's CPU interpreter "
            "(TRITON_INTERPRET=1) gets bfloat16 arithmetic wrong (results off by orders of magnitude). Use "
            "float32 or float16 there (madx: --backbone-dtype float32 and no --bf16), backend='eager' for "
            "bfloat16 on the CPU, or a CUDA GPU, where the Triton kernels compute bfloat16 correctly"
        )


_MODULES = {"triton": "madx_fast.kernels.triton", "cuda": "madx_fast.kernels.cuda"}


def kernel_module(name: str):
    """The launcher module of a fused backend, imported on first use."""
    try:
        return importlib.import_module(_MODULES[name])
    except KeyError:
        raise ValueError(f"{name!r} is not a fused backend; choose one of {tuple(_MODULES)}") from None
    except ImportError as exc:
        raise BackendUnavailableError(f"backend {name!r} cannot be loaded: {exc}") from exc
