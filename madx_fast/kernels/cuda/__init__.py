"""CUDA C++ backend: the kernels in ``csrc/`` (tiled tensor-core GEMMs with fused prologues/epilogues),
behind the launcher contract of ``madx_fast/kernels/__init__.py``. Design: ``docs/cuda_backend.md``.

Importing this module loads the prebuilt extension ``madx_fast._cuda_C`` or JIT-builds ``csrc/`` (see
``_build.py``); when neither works it raises ImportError saying why. ``import madx_fast`` never imports it.
"""
from ._build import load_extension
from .launchers import make_launchers

_C = load_extension()
_launchers = make_launchers(_C)

adapter_forward = _launchers.adapter_forward
adapter_backward = _launchers.adapter_backward
nice_coupling = _launchers.nice_coupling
nice_coupling_backward = _launchers.nice_coupling_backward

__all__ = ["adapter_forward", "adapter_backward", "nice_coupling", "nice_coupling_backward"]
