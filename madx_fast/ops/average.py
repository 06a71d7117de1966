"""Averaged bottleneck adapters (AdapterHub's ``Average``): ``average_bottleneck_adapter``.

K adapters read the same input ``x``; their outputs ``h_k = r + delta_k`` are combined with coefficients
``mix``:

    y = (sum_k mix[k]) r + sum_k mix[k] s (W_up[k] act(z_k) + b_up[k]),      z_k = W_down[k] x + b_down[k]

Weights are stacked over the K adapters (``w_down [K, d, H]``, ...). With ``groups`` every sequence row has an
ensemble of its own (``PerRow`` members that are ``Average`` blocks): ``mix [G, K]``, weights ``[G, K, ...]``,
row ``b`` using group ``groups[b]``. On the fused backend the K adapters run together: one launch per product
for all of them, the coefficients applied in the kernels (``madx_fast/kernels/triton/average.py``), never K
adapter calls and a sum.

Backward, per row with ``c = sum_k mix[k]`` and ``g_k = dy W_up[k]`` (``[N, d]``):

    dr        = c dy                                             (dx gets it too when the residual is x)
    dz_k      = mix[k] s g_k * act'(z_k);     dx = sum_k dz_k W_down[k]
    dW_up[k]  = mix[k] s dy^T act(z_k);       db_up[k] = mix[k] s sum_rows dy
    dW_down[k] = dz_k^T x;                    db_down[k] = sum_rows dz_k
    dmix[k]   = <dy, r> + s (<g_k, act(z_k)> + <sum_rows dy, b_up[k]>)        (summed over the rows of a group)

since ``d y / d mix[k] = h_k = r + s (W_up[k] act(z_k) + b_up[k])`` and ``<dy, W_up act(z)> = <dy W_up, act(z)>``.
The kernels compute ``<g_k, act(z_k)>`` in the ``dz`` epilogue (where ``g_k`` is at hand); ``<dy, r>`` and
the bias term are one pass over ``dy`` (and ``r``) outside, only when ``mix`` needs a gradient (test-time
ensembling).
"""
from __future__ import annotations

import torch

from .. import reference
from ..backends import BackendUnavailableError
from . import dispatch
from .checks import check_float, check_groups, check_residual, check_same_device, check_shape
from .dispatch import LIB


def _check_inputs(x, residual, groups, mix, w_down, b_down, w_up, b_up):
    """``w_down [*G, K, d, H]``, ``b_down [*G, K, d]``, ``w_up [*G, K, H, d]``, ``b_up [*G, K, H]``, ``mix [*G, K]``
    (``*G``: ``G`` with ``groups``)."""
    stacked = groups is not None
    check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the hidden size)")
    h = x.shape[-1]
    dims = 4 if stacked else 3
    for name, t in (("w_down", w_down), ("w_up", w_up)):
        check_float(name, t)
        if t.dim() != dims:
            lead = "[groups, adapters, out, in]" if stacked else "[adapters, out, in]"
            raise ValueError(f"{name} must be {dims}-D {lead} (weights stacked over the averaged adapters), got "
                             f"shape {tuple(t.shape)}")
    *lead, d, _ = w_down.shape
    check_shape("w_down", w_down, (*lead, d, h))
    check_shape("w_up", w_up, (*lead, h, d))
    for name, bias, size in (("b_down", b_down, d), ("b_up", b_up, h)):
        if bias is not None:
            check_float(name, bias)
            check_shape(name, bias, (*lead, size))
    check_float("mix", mix)
    check_shape("mix", mix, tuple(lead))
    if lead[-1] < 1:
        raise ValueError("the stacked weights hold no adapter (their adapter dimension is 0)")
    check_residual(residual, x)
    if stacked:
        check_groups(groups, x, lead[0])
    check_same_device([("x", x), ("residual", residual), ("groups", groups), ("mix", mix), ("w_down", w_down),
                       ("b_down", b_down), ("w_up", w_up), ("b_up", b_up)])


# --------------------------------------------------------------------------------------------------------
# Custom ops: forward and backward (groups None: one ensemble for every row)
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{LIB}::average_adapter_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    groups: torch.Tensor | None,
    mix: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    scaling: float,
    activation: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [N, H], z [N, K*d])``: z holds every adapter's pre-activation side by side (saved for backward)."""
    return dispatch.launchers(backend).average_adapter_forward(x, residual, groups, mix, w_down, b_down, w_up, b_up,
                                                               scaling, activation)


@_forward_op.register_fake
def _(x, residual, groups, mix, w_down, b_down, w_up, b_up, scaling, activation, backend):
    k, d = w_down.shape[-3], w_down.shape[-2]
    return x.new_empty(x.shape), x.new_empty((x.shape[0], k * d))


@torch.library.custom_op(f"{LIB}::average_adapter_backward", mutates_args=())
def _backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    residual: torch.Tensor | None,
    groups: torch.Tensor | None,
    mix: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    scaling: float,
    activation: int,
    residual_is_input: bool,
    weight_grads: bool,
    mix_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dr, dw_down, db_down, dw_up, db_up, dmix)``; weight and mix grads float32, empty when not asked
    for; ``dr`` empty when the residual is x. ``residual`` is needed only for ``mix_grad``."""
    return dispatch.launchers(backend).average_adapter_backward(
        dy, x, z, residual, groups, mix, w_down, w_up, b_up, scaling, activation, residual_is_input, weight_grads,
        mix_grad)


@_backward_op.register_fake
def _(dy, x, z, residual, groups, mix, w_down, w_up, b_up, scaling, activation, residual_is_input, weight_grads,
      mix_grad, backend):
    def f32(shape, want):
        return x.new_empty(shape if want else (0,), dtype=torch.float32)
    dr = x.new_empty(x.shape if not residual_is_input else (0,))
    *lead, d, h = w_down.shape
    return (x.new_empty(x.shape), dr, f32(w_down.shape, weight_grads), f32((*lead, d), weight_grads),
            f32(w_up.shape, weight_grads), f32((*lead, h), weight_grads), f32(mix.shape, mix_grad))


def _setup_context(ctx, inputs, output):
    x, residual, groups, mix, w_down, b_down, w_up, b_up, scaling, activation, backend = inputs
    _, z = output
    ctx.mix_grad = bool(ctx.needs_input_grad[3])
    ctx.weight_grads = any(ctx.needs_input_grad[4:8])
    ctx.residual_is_input = residual is None
    ctx.has_groups = groups is not None
    # the residual is kept only for the mix gradient (<dy, r>): MAD-X's stacks never need it otherwise
    keep_r = residual if (ctx.mix_grad and residual is not None) else None
    ctx.has_r = keep_r is not None
    ctx.save_for_backward(x, z, *([groups] if groups is not None else []), *([keep_r] if keep_r is not None else []),
                          mix, w_down, w_up, b_up)
    ctx.scaling, ctx.activation, ctx.backend = scaling, activation, backend
    ctx.dtypes = (w_down.dtype, b_down.dtype, w_up.dtype, b_up.dtype)
    ctx.mix_dtype = mix.dtype


def _backward(ctx, dy, dz):
    # dz is never used: z is an internal saved tensor (the public API does not return it).
    saved = list(ctx.saved_tensors)
    x, z = saved[:2]
    rest = saved[2:]
    groups = rest.pop(0) if ctx.has_groups else None
    residual = rest.pop(0) if ctx.has_r else None
    mix, w_down, w_up, b_up = rest
    dx, dr, *dw, dmix = _backward_op(dy.contiguous(), x, z, residual, groups, mix, w_down, w_up, b_up, ctx.scaling,
                                     ctx.activation, ctx.residual_is_input, ctx.weight_grads, ctx.mix_grad,
                                     ctx.backend)
    dw = dispatch.in_weight_dtypes(dw, ctx.dtypes) if ctx.weight_grads else [None] * 4
    dmix = dmix.to(ctx.mix_dtype) if ctx.mix_grad else None
    return (dx, None if ctx.residual_is_input else dr, None, dmix, *dw, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------------
def average_bottleneck_adapter(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    mix: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    *,
    groups: torch.Tensor | None = None,
    scaling: float = 1.0,
    activation: str = "relu",
    backend: str | None = None,
) -> torch.Tensor:
    """K bottleneck adapters on ``x`` combined with coefficients ``mix`` (AdapterHub's ``Average``):
    ``(sum_k mix[k]) r + sum_k mix[k] * scaling * (W_up[k] act(W_down[k] x + b_down[k]) + b_up[k])``.

    Weights stacked over adapters: ``w_down [K, d, H]``, ``b_down [K, d]``, ``w_up [K, H, d]``, ``b_up [K, H]``,
    ``mix [K]`` (a float tensor on x's device: a gradient reaches it when it requires one). With ``groups [B]``
    (one id per row of ``x [B, ..., H]``): ``mix [G, K]`` and weights ``[G, K, ...]``, row ``b`` through group
    ``groups[b]``'s ensemble. ``residual=None`` (or ``residual is x``) uses ``x``. Backends: "triton" (the K
    adapters in one launch per product) and "eager" (``reference.average_bottleneck_adapter_reference``);
    "cuda" has no such kernels and is refused (a model on "cuda" runs its Averages on Triton)."""
    _check_inputs(x, residual, groups, mix, w_down, b_down, w_up, b_up)
    act = reference.canonical_activation(activation)
    if dispatch.resolve_backend(backend, x.device) == "cuda":
        raise BackendUnavailableError("backend 'cuda' has no averaged-adapter kernels; use backend='triton' (or "
                                      "'eager'). A model on backend 'cuda' runs its Average blocks on Triton itself")
    name = dispatch.choose_backend(backend, x, grouped=True)
    if residual is x:
        residual = None
    if name == "eager":
        return reference.average_bottleneck_adapter_reference(x, residual, mix, w_down, b_down, w_up, b_up, scaling,
                                                              act, groups=groups)
    *lead, d, h = w_down.shape
    if b_down is None:
        b_down = w_down.new_zeros(*lead, d)
    if b_up is None:
        b_up = w_up.new_zeros(*lead, h)
    r = None if residual is None else dispatch.rows(residual, h)
    y, _ = _forward_op(dispatch.rows(x, h), r, None if groups is None else groups.contiguous(), mix, w_down, b_down,
                       w_up, b_up, float(scaling), reference.ACTIVATION_CODES[act], name)
    return y.view(x.shape)
