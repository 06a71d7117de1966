"""A backbone Linear and its activation in one op, for inference: ``dense_activation(x, weight, bias,
activation)`` computes ``act(F.linear(x, weight, bias))``, a BERT/RoBERTa/XLM-R layer's FFN intermediate
(``intermediate_act_fn(dense(x))``, the 3072-wide GELU of XLM-R base) without its separate activation pass.

The eager path is exactly that expression: the specification the fused path is tested against. The fused
path (``madx_fast::dense_activation``, one Triton GEMM with the ``EPI_BIAS_ACT`` epilogue of
``madx_fast/kernels/triton/linear.py``) rounds ``x W^T + b`` to x's dtype before the activation, as HF's
Linear stores its output before the activation reads it, so the two paths agree to the activation's own
rounding. It writes the wide intermediate once where the eager path writes it twice and reads it once more.

Inference only: the op has no backward. With grad mode on and an input that requires grad it refuses (the
model wiring, ``madx_fast.model.wiring``, then runs HF's own module).

Which path runs: ``backend`` as for the adapter ops (``madx_fast.backends``): "eager" the reference, "triton"
or "cuda" the Triton kernel (bfloat16 refused on Triton's CPU interpreter). ``fused_available`` says whether
the fused path would run for ``x`` without raising, which is how the model wiring follows its adapters.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import reference
from ..reference import ACTIVATION_CODES, canonical_activation
from . import dispatch
from .checks import check_float, check_matrix, check_same_device, check_shape
from .dispatch import LIB


def dense_activation_reference(x, weight, bias, activation):
    """The eager specification."""
    return reference.activation(F.linear(x, weight, bias), activation)


@functools.cache
def _linear():
    from ..kernels.triton import linear  # imported on first use, as every backend is
    return linear


@torch.library.custom_op(f"{LIB}::dense_activation", mutates_args=())
def _forward_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: int) -> torch.Tensor:
    """``act(x @ weight^T + bias)`` for ``x [M, K]``, ``weight [N, K]`` (any strides), ``bias [N]``."""
    linear = _linear()
    return linear.fused_linear(x, weight, (weight.stride(0), weight.stride(1)), weight.shape[0],
                               linear.EPI_BIAS_ACT, bias=bias, activation=activation)


@_forward_op.register_fake
def _(x, weight, bias, activation):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _check_inputs(x, weight, bias):
    check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the input features)")
    check_matrix("weight", weight, stacked=False)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)} [out, in] but x has {x.shape[-1]} input "
                         f"features (x shape {tuple(x.shape)})")
    if bias is not None:
        check_float("bias", bias)
        check_shape("bias", bias, (weight.shape[0],))
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype} (F.linear computes in one dtype)")
    check_same_device([("x", x), ("weight", weight), ("bias", bias)])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raise RuntimeError("dense_activation is for inference: it has no backward; call it under torch.no_grad() "
                           "or with inputs that do not require grad")


def fused_available(x: torch.Tensor, backend: str | None = None) -> bool:
    """Whether ``dense_activation(x, ..., backend=backend)`` would run the fused kernel (not the eager path)
    instead of the reference or an error."""
    return dispatch.triton_kernel_runs(backend, x)


def dense_activation(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str, *,
                     backend: str | None = None) -> torch.Tensor:
    """``act(F.linear(x, weight, bias))`` for ``x [..., K]``, ``weight [N, K]`` (nn.Linear's layout), ``bias
    [N]`` or None, all of one dtype; output ``[..., N]`` in x's dtype. ``activation``: a name of
    ``madx_fast.reference.ACTIVATIONS`` ("gelu" is the exact erf GELU, transformers' "gelu")."""
    name = canonical_activation(activation)
    _check_inputs(x, weight, bias)
    if dispatch.choose_backend(backend, x, grouped=False) == "eager":
        return dense_activation_reference(x, weight, bias, name)
    n, k = weight.shape
    if bias is None:
        bias = x.new_zeros(n)
    out = _forward_op(dispatch.rows(x, k), weight, bias, ACTIVATION_CODES[name])
    return out.view(*x.shape[:-1], n)
