"""Residual add + LayerNorm in one op: ``add_layer_norm(x, residual, weight, bias, eps)`` computes
``torch.nn.functional.layer_norm(x + residual, (H,), weight, bias, eps)``, MAD-X's ``LN(y + a)`` in front of
every adapter of a post-LN layer and after the last one (``madx_fast.model.wiring``).

The eager path is exactly that expression: the specification the fused path is tested against. The fused
path (``madx_fast::add_layer_norm`` and its backward, one Triton kernel each; also for a model on backend
"cuda", which has no kernel of its own for it) reads x and the residual once and writes the output once,
where the eager add and LayerNorm move the row five times. Its backward computes the gradient of ``x + r``
once (it is both inputs' gradient) and the weight and bias gradients only when they are wanted: MAD-X's
backbone LayerNorms are frozen, a full fine-tune trains them. The derivation is in
``madx_fast/kernels/triton/add_norm.py``.

Which path runs: ``backend`` as for the adapter ops (``madx_fast.backends``): "eager" the reference, "triton"
or "cuda" the kernel (bfloat16 refused on Triton's CPU interpreter). ``fused_available`` says whether the
fused path can run for given tensors without raising, which is how the model wiring follows its adapters.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import dispatch
from .checks import check_float, check_residual, check_same_device, check_shape
from .dispatch import LIB


def add_layer_norm_reference(x, residual, weight, bias, eps):
    """The eager specification."""
    return F.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)


@functools.cache
def _kernels():
    from ..kernels.triton import add_norm  # imported on first use, as every backend is (once: host time per call)
    return add_norm


@torch.library.custom_op(f"{LIB}::add_layer_norm", mutates_args=())
def _forward_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [N, H], stats [2, N])``: each row's mean and 1/std (float32), saved for the backward."""
    return _kernels().add_layer_norm_forward(x, residual, weight, bias, eps)


@_forward_op.register_fake
def _(x, residual, weight, bias, eps):
    return x.new_empty(x.shape), x.new_empty((2, x.shape[0]), dtype=torch.float32)


@torch.library.custom_op(f"{LIB}::add_layer_norm_backward", mutates_args=())
def _backward_op(dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 stats: torch.Tensor, weight_grads: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ds [N, H], dwb [2, H] float32)``: the gradient of ``x + residual``, and dw, db (empty unless
    ``weight_grads``)."""
    return _kernels().add_layer_norm_backward(dy, x, residual, weight, stats, weight_grads)


@_backward_op.register_fake
def _(dy, x, residual, weight, stats, weight_grads):
    return x.new_empty(x.shape), x.new_empty((2, x.shape[1]) if weight_grads else (0,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _ = inputs
    _, stats = output
    ctx.save_for_backward(x, residual, weight, stats)
    ctx.set_materialize_grads(False)
    ctx.dtypes = (weight.dtype, bias.dtype)


def _backward(ctx, dout, dstats):
    # stats is an internal output (never returned by ``add_layer_norm``): its gradient is unused
    if dout is None:
        return (None,) * 5
    x, residual, weight, stats = ctx.saved_tensors
    weight_grads = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    ds, dwb = _backward_op(dout, x, residual, weight, stats, weight_grads)
    dw, db = dispatch.in_weight_dtypes(dwb.unbind(0), ctx.dtypes) if weight_grads else (None, None)
    needs = ctx.needs_input_grad
    return (ds if needs[0] else None, ds if needs[1] else None, dw if needs[2] else None,
            db if needs[3] else None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(x, residual, weight, bias):
    check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the hidden size)")
    if residual is None:
        raise ValueError("residual must be a tensor of x's shape (the add + LayerNorm adds it to x)")
    check_residual(residual, x)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_float(name, t)
            check_shape(name, t, (x.shape[-1],))
    check_same_device([("x", x), ("residual", residual), ("weight", weight), ("bias", bias)])


def fused_available(x: torch.Tensor, backend: str | None = None) -> bool:
    """Whether ``add_layer_norm(x, ..., backend=backend)`` would run the fused kernel (not the eager path)
    instead of the reference or an error: the backend resolves to a fused one that computes ``x.dtype`` here
    and the row fits the kernel."""
    return dispatch.triton_kernel_runs(backend, x) and x.shape[-1] <= _kernels().MAX_HIDDEN


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float = 1e-5, *, backend: str | None = None) -> torch.Tensor:
    """``layer_norm(x + residual, (H,), weight, bias, eps)`` for ``x, residual: [..., H]`` of one dtype,
    ``weight, bias: [H]`` (any float dtype, or None: 1 and 0), output in x's dtype (module docstring)."""
    _check_inputs(x, residual, weight, bias)
    name = dispatch.choose_backend(backend, x, grouped=False)
    if name == "eager":
        return add_layer_norm_reference(x, residual, weight, bias, eps)
    h, widest = x.shape[-1], _kernels().MAX_HIDDEN
    if h > widest:
        raise ValueError(f"x has hidden size {h}; the fused add + LayerNorm holds a row on chip and takes at most "
                         f"{widest} (use backend='eager')")
    if weight is None:
        weight = x.new_ones(h, dtype=torch.float32)
    if bias is None:
        bias = weight.new_zeros(h)
    out, _ = _forward_op(dispatch.rows(x, h), dispatch.rows(residual, h), weight, bias, float(eps))
    return out.view(x.shape)
