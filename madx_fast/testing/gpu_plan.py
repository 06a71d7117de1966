"""Run code on ``meta`` tensors the way a CUDA GPU would run it, to count its device work without a GPU
(``madx_fast.testing.device_ops``; ``benchmarks/roofline.py``).

Meta tensors carry shapes, strides and dtypes but no data, so a whole XLM-R base step at B=64, L=256 runs in
well under a second on any CPU. Where PyTorch or madx_fast would choose differently on a GPU than on the meta
device, ``planned_gpu()`` makes the GPU's choice:

* madx_fast's ops take the fused Triton path (the default backend on a GPU) unless the model asks for
  "eager", and the launchers plan their block sizes and grids for a GPU (not for Triton's CPU interpreter);
* ``F.scaled_dot_product_attention`` runs the kernel CUDA would pick: flash attention without a mask in
  fp16/bf16, memory-efficient attention with one (a boolean mask first made an additive one, as CUDA does);
  on the meta device PyTorch would otherwise decompose it into its math fallback (matmuls and a softmax);
* ``F.dropout`` in training runs CUDA's fused ``native_dropout`` (on the meta device PyTorch would draw a
  mask, scale it and multiply: three kernels);
* fused optimizers (``AdamW(fused=True)``) accept meta parameters.

``cuda_autocast(dtype)`` stands in for ``torch.autocast("cuda", dtype)``, which does nothing to meta
tensors: it applies CUDA autocast's documented op lists at the function level (matrix products and
attention in ``dtype``; LayerNorm, softmax, losses, reductions and the other float32 ops in float32), and
caches the cast of a leaf tensor that requires grad as autocast does, so the casts it issues are counted as
real autocast's would be.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .device_ops import intercepted_launches

_aten = torch.ops.aten
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256


def cuda_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` through the aten kernel a CUDA GPU would choose (module docstring)."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    if attn_mask is None and query.dtype in _LOW_PRECISION and query.shape[-1] <= _FLASH_MAX_HEAD_DIM:
        return _aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                         scale=scale)[0]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill_(attn_mask.logical_not(),
                                                                               float("-inf"))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return _aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, grad, dropout_p, is_causal,
                                                         scale=scale)[0]


def cuda_dropout(input, p=0.5, training=True, inplace=False):
    """``F.dropout`` as on a GPU: one fused ``native_dropout`` kernel (mask and scaled output), where PyTorch
    on the meta device would draw, scale and multiply in three."""
    if not training or p == 0 or input.numel() == 0:
        return input
    if p == 1 or inplace:
        return F.dropout(input, p, training, inplace)
    return torch.native_dropout(input, p, True)[0]


class _CudaKernels(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return cuda_attention(*args, **(kwargs or {}))
        if func is F.dropout:
            return cuda_dropout(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _fused_backend(real_resolve, devices):
    """``resolve_backend`` with the GPU's default on ``devices``: "triton" unless "eager" is asked for."""
    def resolve(backend, device):
        if device.type not in devices:
            return real_resolve(backend, device)
        return "eager" if (backend or "auto").lower() == "eager" else "triton"
    return resolve


def _no_dtype_check(real_check, devices):
    def check(name, device, dtype):
        if device.type not in devices:
            real_check(name, device, dtype)
    return check


def _import_triton_kernels():
    """Import every module of the Triton backend now. ``@triton.jit`` reads ``TRITON_INTERPRET`` when a module
    is imported: one first imported inside ``planned_gpu`` (which unsets it) would hold GPU-only kernels for the
    rest of a process that runs them through the interpreter."""
    import importlib
    import pkgutil

    import madx_fast.kernels.triton as package
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


@contextlib.contextmanager
def graph_capture():
    """Within the block, code takes the paths it takes while a CUDA graph is being captured
    (``madx_fast.ops.dispatch.capturing`` answers True): the roofline counts a replayed step's ops so."""
    from ..ops import dispatch
    saved = dispatch.capturing
    dispatch.capturing = lambda: True
    try:
        yield
    finally:
        dispatch.capturing = saved


@contextlib.contextmanager
def planned_gpu(host_proxy: bool = False):
    """Within the block, code on meta tensors takes the paths a CUDA GPU takes (module docstring).

    ``host_proxy=True`` is for timing the host side of a step on small CPU tensors instead: CPU tensors take
    the fused path too (bfloat16 allowed), Triton launches are skipped (their outputs are never written), and
    attention is left to the CPU's own kernel (no Python mode on every torch call)."""
    import torch.optim.optimizer as optimizer_module
    import torch.utils._foreach_utils as foreach_utils

    from .. import backends
    from ..ops import dispatch

    devices = ("meta", "cpu") if host_proxy else ("meta",)
    _import_triton_kernels()  # before the variable goes: the kernels keep the kind this process gave them
    saved_env = os.environ.pop("TRITON_INTERPRET", None)  # launchers read it per call: plan for a GPU
    # every madx_fast module that resolves backends (the ops, the per-row adapters) by the one function
    resolvers = [m for name, m in list(sys.modules.items()) if name.startswith("madx_fast")
                 and getattr(m, "resolve_backend", None) is backends.resolve_backend]
    saved = [(m, "resolve_backend", backends.resolve_backend) for m in resolvers]
    saved += [(dispatch, "check_backend_dtype", dispatch.check_backend_dtype),
              (foreach_utils, "_get_fused_kernels_supported_devices",
               foreach_utils._get_fused_kernels_supported_devices),
              (optimizer_module, "_get_fused_kernels_supported_devices",
               optimizer_module._get_fused_kernels_supported_devices)]
    fused_devices = foreach_utils._get_fused_kernels_supported_devices
    for m in resolvers:
        m.resolve_backend = _fused_backend(backends.resolve_backend, devices)
    dispatch.check_backend_dtype = _no_dtype_check(dispatch.check_backend_dtype, devices)
    foreach_utils._get_fused_kernels_supported_devices = optimizer_module._get_fused_kernels_supported_devices = (
        lambda: [*fused_devices(), "meta"])
    try:
        # host proxy: Triton launches return at once (their outputs stay unwritten), the launcher's host side runs
        with intercepted_launches(lambda *launch: None) if host_proxy else _CudaKernels():
            yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        if saved_env is not None:
            os.environ["TRITON_INTERPRET"] = saved_env


# CUDA autocast's op lists (torch.amp documentation, "CUDA Ops that can autocast to ..."), by function name
AUTOCAST_LOW = frozenset({
    "__matmul__", "__rmatmul__", "addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm", "chain_matmul", "multi_dot",
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear", "matmul",
    "mm", "mv", "prelu", "scaled_dot_product_attention"})
AUTOCAST_FP32 = frozenset({
    "__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin", "binary_cross_entropy_with_logits", "cosh",
    "cosine_embedding_loss", "cdist", "cosine_similarity", "cross_entropy", "cumprod", "cumsum", "dist", "erfinv",
    "exp", "expm1", "group_norm", "hinge_embedding_loss", "kl_div", "l1_loss", "layer_norm", "log", "log_softmax",
    "log10", "log1p", "log2", "margin_ranking_loss", "mse_loss", "multilabel_margin_loss", "multi_margin_loss",
    "nll_loss", "norm", "normalize", "pdist", "poisson_nll_loss", "pow", "prod", "reciprocal", "rsqrt", "sinh",
    "smooth_l1_loss", "soft_margin_loss", "softmax", "softmin", "softplus", "sum", "renorm", "tan",
    "triplet_margin_loss"})


class cuda_autocast(TorchFunctionMode):  # noqa: N801 (used like torch.autocast)
    """``torch.autocast("cuda", dtype)`` for code on meta tensors (module docstring)."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        self._cache: dict[int, torch.Tensor] = {}

    def _cast(self, t, dtype):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()) or t.dtype in (dtype, torch.float64):
            return t
        if t.is_leaf and t.requires_grad:  # autocast caches these casts within its region
            if id(t) not in self._cache:
                self._cache[id(t)] = t.to(dtype)
            return self._cache[id(t)]
        return t.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in AUTOCAST_LOW or name in AUTOCAST_FP32:
            dtype = self.dtype if name in AUTOCAST_LOW else torch.float32
            if dtype == torch.float32 and kwargs.get("dtype") is not None:
                return func(*args, **kwargs)  # an explicit dtype wins, as in autocast
            args = tuple(self._cast(a, dtype) for a in args)
            kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)
