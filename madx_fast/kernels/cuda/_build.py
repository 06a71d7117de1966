"""Finding or building the compiled CUDA extension (sources in the repository's ``csrc/``).

Order: the prebuilt module ``madx_fast._cuda_C`` (``setup.py`` builds it when a CUDA toolkit and a CUDA
build of torch are present at install time), else a JIT build of ``csrc/`` with
``torch.utils.cpp_extension.load`` (ninja; cached under torch's extension directory, so only the first use
pays for it). Every way this can fail ends in an ImportError whose message says why, which
``madx_fast.backends`` turns into a ``BackendUnavailableError``. Nothing here runs when madx_fast is
imported: only ``import madx_fast.kernels.cuda`` (first use of ``backend="cuda"``) loads it.

Environment: ``MADX_FAST_CUDA_NO_JIT=1`` disables the JIT build; ``MADX_FAST_CUDA_VERBOSE=1`` shows the
compiler output; ``TORCH_CUDA_ARCH_LIST`` (torch's own variable) picks the GPU architectures.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: builds there are not serialised across processes
    fcntl = None

logger = logging.getLogger("madx_fast")

PREBUILT = "madx_fast._cuda_C"
CSRC = Path(__file__).resolve().parents[3] / "csrc"


def sources(csrc: Path = CSRC) -> list[Path]:
    """The extension's translation units: every csrc/*.cu and csrc/*.cpp (setup.py uses the same rule)."""
    return sorted(csrc.glob("*.cu")) + sorted(csrc.glob("*.cpp"))


def source_digest(csrc: Path = CSRC) -> str:
    """Hash of every file under csrc/ (headers included): a new JIT build whenever any of them changes."""
    h = hashlib.sha256()
    for path in sorted(p for p in csrc.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(csrc)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def unavailable_reason() -> str | None:
    """Why no CUDA extension can be used with this torch, or None."""
    import torch

    if torch.version.cuda is None:
        return (f"the CUDA backend needs a CUDA build of PyTorch, but torch {torch.__version__} is CPU-only "
                "(install a CUDA wheel of torch, or use backend='triton' or 'eager')")
    return None


def jit_unavailable_reason(csrc: Path = CSRC) -> str | None:
    """Why csrc/ cannot be JIT-built here, or None."""
    if os.environ.get("MADX_FAST_CUDA_NO_JIT", "0") not in ("", "0"):
        return "MADX_FAST_CUDA_NO_JIT is set, so csrc/ is not JIT-built"
    if not sources(csrc):
        return (f"the CUDA sources are not at {csrc} (a wheel install without them): reinstall madx_fast from a "
                "source checkout with a CUDA toolkit present (pip install --no-build-isolation .)")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found to build csrc/ (nvcc not on PATH and CUDA_HOME not set)"
    if not cpp_extension.is_ninja_available():
        return "building csrc/ needs ninja (pip install ninja)"
    return None


TORCH_BUILD_LOCK = "lock"  # the file torch's FileBaton creates in a build directory while it builds there


@contextlib.contextmanager
def exclusive_build(build_dir: Path):
    """Hold the one right to build in ``build_dir`` across processes.

    torch's JIT builder marks a build in progress with a plain file (``lock``) that it deletes when the build
    ends; a process killed mid-build (Ctrl-C, a timeout, a CI runner stopping) leaves the file behind, and
    every later build of the same extension then waits for it forever. Here builders first take an flock on a
    file of their own, which the kernel releases when its holder dies; whoever holds it is the only madx_fast
    builder of that directory, so a torch ``lock`` file still present is stale and is removed."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "madx_build.lock", "a") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        stale = build_dir / TORCH_BUILD_LOCK
        if stale.exists():
            logger.warning("madx_fast: removing %s, left by a build that was killed", stale)
            stale.unlink(missing_ok=True)
        yield  # the flock goes with the file when it closes


def jit_build(csrc: Path = CSRC):
    """Compile csrc/ with torch's JIT extension builder and import the result."""
    from torch.utils import cpp_extension

    digest = source_digest(csrc)
    name = f"madx_fast_cuda_{digest}"
    build_dir = Path(cpp_extension.get_default_build_root()) / name
    logger.warning("madx_fast: building the CUDA extension %s from %s (first use only; this takes a minute or two)",
                   name, csrc)
    with exclusive_build(build_dir):
        return cpp_extension.load(
            name=name,
            sources=[str(p) for p in sources(csrc)],
            extra_include_paths=[str(csrc)],
            extra_cflags=["-O3", f"-DMADX_SOURCE_DIGEST={digest}"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
            build_directory=str(build_dir),
            verbose=os.environ.get("MADX_FAST_CUDA_VERBOSE", "0") not in ("", "0"),
        )


def stale_reason(module, csrc: Path = CSRC) -> str | None:
    """Why a prebuilt module does not match the csrc/ next to it (an editable install edited since its
    build), or None. Installs without csrc/ have nothing to compare with."""
    if not sources(csrc):
        return None
    built, current = getattr(module, "SOURCE_DIGEST", ""), source_digest(csrc)
    if built != current:
        return f"{PREBUILT} was built from other sources (digest {built or 'unknown'}) than {csrc} ({current})"
    return None


def load_extension():
    """The compiled extension module; ImportError with the reason when there is none."""
    reason = unavailable_reason()
    if reason:
        raise ImportError(reason)
    try:
        module = importlib.import_module(PREBUILT)
    except ImportError as exc:
        prebuilt_error = f"{PREBUILT} is not importable ({exc})"
    else:
        stale = stale_reason(module)
        if stale is None:
            return module
        if jit_unavailable_reason() is not None:  # nothing better to offer: use it, but say so
            logger.warning("madx_fast: %s; using it anyway", stale)
            return module
        logger.warning("madx_fast: %s; building csrc/ instead", stale)
        prebuilt_error = stale
    reason = jit_unavailable_reason()
    if reason:
        raise ImportError(f"{prebuilt_error}, and {reason}")
    try:
        return jit_build()
    except Exception as exc:  # compiler errors, missing headers, ...: say so instead of crashing the caller
        raise ImportError(f"{prebuilt_error}, and building csrc/ failed: {exc}") from exc
