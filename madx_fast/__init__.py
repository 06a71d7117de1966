"""madx_fast: MAD-X adapters (language, task, invertible) on fused Triton and CUDA kernels."""
from . import ops, reference
from ._version import __version__  # noqa: F401 (madx_fast.__version__)
from .backends import BackendUnavailableError, resolve_backend
from .modules import BottleneckAdapter, InvertibleAdapter
from .ops import bottleneck_adapter, nice_forward, nice_inverse

__all__ = [
    "BackendUnavailableError", "BottleneckAdapter", "InvertibleAdapter", "bottleneck_adapter", "nice_forward",
    "nice_inverse", "ops", "patch_adapterhub", "reference", "resolve_backend", "unpatch_adapterhub",
]


def patch_adapterhub(model, **options):
    """Run an AdapterHub (`adapters`) model's bottleneck adapters, NICE adapters and language-model loss (masked,
    causal or seq2seq) on madx_fast's fused ops, on every text model type AdapterHub adapts; see
    ``madx_fast.adapterhub_patch.patch_adapterhub`` for the options (``keep_lm_logits``). Needs the optional
    dependency: ``pip install 'madx_fast[adapterhub]'`` (imported here on first use, not by ``import madx_fast``)."""
    from .adapterhub_patch import patch_adapterhub as patch
    return patch(model, **options)


def unpatch_adapterhub(model):
    """Undo ``patch_adapterhub``; see ``madx_fast.adapterhub_patch.unpatch_adapterhub``."""
    from .adapterhub_patch import unpatch_adapterhub as unpatch
    return unpatch(model)
