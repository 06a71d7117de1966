"""Bottleneck adapter ops: ``bottleneck_adapter`` and its per-row version ``grouped_bottleneck_adapter``.

The single adapter is the grouped one without groups: one input check, one autograd setup and one backward
serve both, and only the custom ops (their names and schemas are recorded by compiled graphs) are two.

Backward of ``y = r + s * (W_up a + b_up)``, ``a = act(z)``, ``z = W_down x + b_down``, with ``g = s * dy``:
``db_up = sum_rows g``, ``dW_up = g^T a``, ``dz = (g W_up) * act'(z)``, ``db_down = sum_rows dz``,
``dW_down = dz^T x``, ``dx = dz W_down`` (plus ``dy`` when the residual is x itself), ``dr = dy``. Per row
groups, each weight gradient sums over the rows of its group only. The kernels compute these; the ops save
``x`` and ``z`` for them (``z`` is an internal output, never returned by the public functions).
"""
from __future__ import annotations

import torch

from .. import reference
from . import dispatch
from .checks import check_float, check_groups, check_matrix, check_residual, check_same_device, check_shape
from .dispatch import LIB


def _check_inputs(x, residual, groups, w_down, b_down, w_up, b_up):
    """``w_down [*G, d, H]``, ``b_down [*G, d]``, ``w_up [*G, H, d]``, ``b_up [*G, H]`` (biases optional), where
    ``*G`` is ``G`` with ``groups`` (weights stacked over groups) and nothing without."""
    stacked = groups is not None
    check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the hidden size)")
    h = x.shape[-1]
    check_matrix("w_down", w_down, stacked)
    check_matrix("w_up", w_up, stacked)
    *lead, d, _ = w_down.shape
    check_shape("w_down", w_down, (*lead, d, h))
    check_shape("w_up", w_up, (*lead, h, d))
    for name, bias, size in (("b_down", b_down, d), ("b_up", b_up, h)):
        if bias is not None:
            check_float(name, bias)
            check_shape(name, bias, (*lead, size))
    check_residual(residual, x)
    if stacked:
        check_groups(groups, x, w_down.shape[0])
    check_same_device([("x", x), ("residual", residual), ("groups", groups), ("w_down", w_down),
                       ("b_down", b_down), ("w_up", w_up), ("b_up", b_up)])


# --------------------------------------------------------------------------------------------------------
# Custom ops: the single adapter's and the grouped one's, each a forward and a backward
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{LIB}::adapter_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    scaling: float,
    activation: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(y [N, H], z [N, d])`` with ``z = W_down x + b_down`` (pre-activation, saved for backward)."""
    return dispatch.launchers(backend).adapter_forward(x, residual, w_down, b_down, w_up, b_up, scaling, activation)


@torch.library.custom_op(f"{LIB}::grouped_adapter_forward", mutates_args=())
def _grouped_forward_op(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    groups: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    scaling: float,
    activation: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [N, H], z [N, d])`` for ``x: [B*L, H]``, ``groups: [B]``, stacked weights."""
    return dispatch.launchers(backend).grouped_adapter_forward(x, residual, groups, w_down, b_down, w_up, b_up,
                                                               scaling, activation)


@_forward_op.register_fake
def _(x, residual, w_down, b_down, w_up, b_up, scaling, activation, backend):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], w_down.shape[-2]))


@_grouped_forward_op.register_fake
def _(x, residual, groups, w_down, b_down, w_up, b_up, scaling, activation, backend):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], w_down.shape[-2]))


@torch.library.custom_op(f"{LIB}::adapter_backward", mutates_args=())
def _backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    scaling: float,
    activation: int,
    residual_is_input: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dx, dw_down, db_down, dw_up, db_up)``; weight grads in float32."""
    return dispatch.launchers(backend).adapter_backward(dy, x, z, w_down, w_up, scaling, activation,
                                                        residual_is_input)


@torch.library.custom_op(f"{LIB}::grouped_adapter_backward", mutates_args=())
def _grouped_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    groups: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    scaling: float,
    activation: int,
    residual_is_input: bool,
    weight_grads: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dw_down, db_down, dw_up, db_up)``, weight grads ``[G, ...]`` float32 (empty unless weight_grads)."""
    return dispatch.launchers(backend).grouped_adapter_backward(dy, x, z, groups, w_down, w_up, scaling, activation,
                                                                residual_is_input, weight_grads)


def _fake_grads(x, w_down, w_up, weight_grads=True):
    """``(dx, dw_down, db_down, dw_up, db_up)`` shaped as the kernels return them."""
    *lead, d, h = w_down.shape
    shapes = (w_down.shape, (*lead, d), w_up.shape, (*lead, h)) if weight_grads else ((0,),) * 4
    return (x.new_empty(x.shape), *(x.new_empty(s, dtype=torch.float32) for s in shapes))


@_backward_op.register_fake
def _(dy, x, z, w_down, w_up, scaling, activation, residual_is_input, backend):
    return _fake_grads(x, w_down, w_up)


@_grouped_backward_op.register_fake
def _(dy, x, z, groups, w_down, w_up, scaling, activation, residual_is_input, weight_grads, backend):
    return _fake_grads(x, w_down, w_up, weight_grads)


# --------------------------------------------------------------------------------------------------------
# Autograd, one for both forward ops: ``groups`` is an empty list for the single adapter.
# --------------------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, residual, *groups, w_down, b_down, w_up, b_up, scaling, activation, backend = inputs
    _, z = output
    ctx.save_for_backward(x, z, *groups, w_down, w_up)
    # z is internal (never returned by the public functions): its gradient stays None instead of a
    # zero-filled N x d tensor, one kernel less per backward
    ctx.set_materialize_grads(False)
    ctx.scaling, ctx.activation, ctx.backend = scaling, activation, backend
    ctx.residual_is_input = residual is None
    ctx.dtypes = (w_down.dtype, b_down.dtype, w_up.dtype, b_up.dtype)


def _backward(ctx, dy, dz):
    # dz is never used: z is an internal saved tensor (the public API does not return it).
    x, z, *groups, w_down, w_up = ctx.saved_tensors
    first_weight = 2 + len(groups)  # w_down's place among the forward op's inputs
    if dy is None:  # y did not reach the loss (gradients are not materialised as zeros: see setup)
        return (None,) * (first_weight + 7)
    weight_grads = any(ctx.needs_input_grad[first_weight:first_weight + 4])
    flags = (ctx.scaling, ctx.activation, ctx.residual_is_input)
    if groups:
        # Frozen per-row adapters (MAD-X task training stacks a trained task adapter on frozen language
        # adapters) skip the four per-group weight reductions.
        dx, *dw = _grouped_backward_op(dy.contiguous(), x, z, *groups, w_down, w_up, *flags, weight_grads,
                                       ctx.backend)
    else:
        dx, *dw = _backward_op(dy.contiguous(), x, z, w_down, w_up, *flags, ctx.backend)
    dr = None if ctx.residual_is_input else dy
    dw = dispatch.in_weight_dtypes(dw, ctx.dtypes) if weight_grads else [None] * 4
    return (dx, dr, *[None] * len(groups), *dw, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)
_grouped_forward_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------
def bottleneck_adapter(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    *,
    scaling: float = 1.0,
    activation: str = "relu",
    backend: str | None = None,
) -> torch.Tensor:
    """Fused bottleneck adapter ``residual + scaling * (W_up act(W_down x + b_down) + b_up)``.

    ``residual=None`` (or ``residual is x``) uses ``x`` as the residual: then x is read once in forward and
    the residual gradient is added inside the dx kernel.
    """
    return _adapter(x, residual, None, w_down, b_down, w_up, b_up, scaling, activation, backend)


def grouped_bottleneck_adapter(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    groups: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    *,
    scaling: float = 1.0,
    activation: str = "relu",
    backend: str | None = None,
) -> torch.Tensor:
    """Per-row bottleneck adapter: row ``b`` of ``x [B, ..., H]`` gets
    ``residual + scaling * (W_up[g] act(W_down[g] x + b_down[g]) + b_up[g])`` with ``g = groups[b]``.

    ``groups: [B]`` int32/int64 ids in ``[0, G)`` (on the device for the fused path: it is never read on the
    host; CPU ids are range-checked); weights stacked over groups: ``w_down [G, d, H]``, ``b_down [G, d]``,
    ``w_up [G, H, d]``, ``b_up [G, H]`` (e.g. ``torch.stack`` of each language's). ``residual=None`` (or
    ``residual is x``) uses ``x``. Backends: "triton" (one launch per product for all groups) and "eager"
    (``reference.grouped_bottleneck_adapter_reference``); "cuda" has no grouped kernels and is refused."""
    return _adapter(x, residual, groups, w_down, b_down, w_up, b_up, scaling, activation, backend)


def _adapter(x, residual, groups, w_down, b_down, w_up, b_up, scaling, activation, backend):
    """Both public functions: ``groups=None`` is the single adapter."""
    _check_inputs(x, residual, groups, w_down, b_down, w_up, b_up)
    act = reference.canonical_activation(activation)
    name = dispatch.choose_backend(backend, x, grouped=groups is not None)
    if residual is x:
        residual = None
    if name == "eager":
        if groups is None:
            return reference.bottleneck_adapter_reference(x, residual, w_down, b_down, w_up, b_up, scaling, act)
        return reference.grouped_bottleneck_adapter_reference(x, residual, groups, w_down, b_down, w_up, b_up,
                                                              scaling, act)
    *lead, d, h = w_down.shape
    if b_down is None:
        b_down = w_down.new_zeros(*lead, d)
    if b_up is None:
        b_up = w_up.new_zeros(*lead, h)
    r = None if residual is None else dispatch.rows(residual, h)
    weights = (w_down, b_down, w_up, b_up)
    flags = (float(scaling), reference.ACTIVATION_CODES[act], name)
    if groups is None:
        y, _ = _forward_op(dispatch.rows(x, h), r, *weights, *flags)
    else:
        y, _ = _grouped_forward_op(dispatch.rows(x, h), r, groups.contiguous(), *weights, *flags)
    return y.view(x.shape)
