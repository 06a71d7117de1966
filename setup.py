"""Build hook: pyproject.toml holds the metadata; this file only adds the optional CUDA extension.

The extension ``madx_fast._cuda_C`` (csrc/*.cu, csrc/*.cpp) is built when torch is importable at build
time, is a CUDA build (torch.version.cuda) and a CUDA toolkit is found (CUDA_HOME / nvcc). Otherwise
madx_fast installs as pure Python: ``backend="cuda"`` then JIT-builds csrc/ on first use, or says why it
cannot. pip builds in an isolated environment without torch by default, so a plain ``pip install -e .``
is always the fast pure-Python install; to build the extension use the environment's own torch:

    pip install --no-build-isolation -e .        (MADX_FAST_NO_CUDA_EXT=1 skips it even then)
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup


def _skip(reason):
    print(f"madx_fast: installing without the CUDA extension: {reason}", file=sys.stderr)
    return {}


def cuda_extension():
    if os.environ.get("MADX_FAST_NO_CUDA_EXT", "0") not in ("", "0"):
        return _skip("MADX_FAST_NO_CUDA_EXT is set")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:  # pip's isolated build environment: no torch there, and none should be pulled in
        return _skip("torch is not importable at build time")
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is a CPU-only build")
    if CUDA_HOME is None:
        return _skip("no CUDA toolkit found (nvcc / CUDA_HOME)")
    root = Path(__file__).resolve().parent
    # Same rule as madx_fast/kernels/cuda/_build.py: every top-level .cu and .cpp of csrc/ (relative paths).
    sources = sorted(str(p.relative_to(root)) for p in (root / "csrc").glob("*.cu"))
    sources += sorted(str(p.relative_to(root)) for p in (root / "csrc").glob("*.cpp"))
    # The loader compares this digest of csrc/ with the sources next to it (stale editable builds).
    spec = importlib.util.spec_from_file_location("_madx_cuda_build", root / "madx_fast/kernels/cuda/_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    ext = CUDAExtension(
        name="madx_fast._cuda_C",
        sources=sources,
        include_dirs=[str(root / "csrc")],
        extra_compile_args={"cxx": ["-O3", f"-DMADX_SOURCE_DIGEST={build.source_digest(root / 'csrc')}"],
                            "nvcc": ["-O3", "-lineinfo"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**cuda_extension())
