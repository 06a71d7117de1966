"""Public functional ops, registered as torch custom ops with autograd and fake (meta) implementations.

    y = bottleneck_adapter(x, residual, w_down, b_down, w_up, b_up, scaling=1.0, activation="relu")
    y = nice_forward(x, f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2)
    x = nice_inverse(y, f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2)

Per-row (grouped) versions, where row ``b`` of ``x [B, ..., H]`` uses the weights of group ``groups[b]``,
weights stacked over groups ``[G, ...]`` (many languages in one batch):

    y = grouped_bottleneck_adapter(x, residual, groups, w_down, b_down, w_up, b_up, scaling=1.0, activation="relu")
    y = grouped_nice_forward(x, groups, f_w1, ..., g_b2);  x = grouped_nice_inverse(y, groups, f_w1, ..., g_b2)

``backend`` picks the implementation (see ``madx_fast.backends``). The eager backend is the reference in
``madx_fast.reference``; the fused backends run through the custom ops below, which torch.compile treats
as opaque nodes (no graph break) and whose fake implementations give it the output shapes.

Shapes: ``x, residual: [..., H]``, ``w_down: [d, H]``, ``b_down: [d]``, ``w_up: [H, d]``, ``b_up: [H]``;
NICE ``F: H-H//2 -> hf -> H//2`` and ``G: H//2 -> hg -> H-H//2`` as nn.Linear weights ``[out, in]``.
Matrix products run in ``x.dtype`` with float32 accumulation; weight gradients come back in the weights'
dtype (so fp32 master weights work with bf16 activations).
"""
from __future__ import annotations

import torch

from . import reference
from .backends import BackendUnavailableError, check_backend_dtype, kernel_module, resolve_backend

LIB = "madx_fast"


# --------------------------------------------------------------------------------------------------------
# Input checks: every problem is named before any kernel runs.
# --------------------------------------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_float(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; madx_fast supports float32, float16 and bfloat16")


def _check_same_device(named):
    devices = {name: t.device for name, t in named if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def _check_shape(name, t, shape):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _check_adapter_inputs(x, residual, w_down, b_down, w_up, b_up):
    _check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the hidden size)")
    h = x.shape[-1]
    for name, t in (("w_down", w_down), ("w_up", w_up)):
        _check_float(name, t)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [out, in], got shape {tuple(t.shape)}")
    d = w_down.shape[0]
    _check_shape("w_down", w_down, (d, h))
    _check_shape("w_up", w_up, (h, d))
    if b_down is not None:
        _check_float("b_down", b_down)
        _check_shape("b_down", b_down, (d,))
    if b_up is not None:
        _check_float("b_up", b_up)
        _check_shape("b_up", b_up, (h,))
    if residual is not None and residual is not x:
        _check_float("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual has dtype {residual.dtype} but x has {x.dtype}")
    _check_same_device(
        [("x", x), ("residual", residual), ("w_down", w_down), ("b_down", b_down), ("w_up", w_up), ("b_up", b_up)]
    )


def _check_nice_inputs(x, weights):
    _check_float("x", x)
    h = x.shape[-1] if x.dim() else 0
    if x.dim() < 1 or h < 2:
        raise ValueError(f"x must have a last dimension of at least 2 to split, got shape {tuple(x.shape)}")
    len1, len2 = reference.nice_split(h)
    f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2 = weights
    names = ("f_w1", "f_b1", "f_w2", "f_b2", "g_w1", "g_b1", "g_w2", "g_b2")
    for name, t in zip(names, weights):
        _check_float(name, t)
    for name, t in (("f_w1", f_w1), ("g_w1", g_w1), ("f_w2", f_w2), ("g_w2", g_w2)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [out, in], got shape {tuple(t.shape)}")
    hf, hg = f_w1.shape[0], g_w1.shape[0]
    _check_shape("f_w1", f_w1, (hf, len2))
    _check_shape("f_b1", f_b1, (hf,))
    _check_shape("f_w2", f_w2, (len1, hf))
    _check_shape("f_b2", f_b2, (len1,))
    _check_shape("g_w1", g_w1, (hg, len1))
    _check_shape("g_b1", g_b1, (hg,))
    _check_shape("g_w2", g_w2, (len2, hg))
    _check_shape("g_b2", g_b2, (len2,))
    _check_same_device([("x", x)] + list(zip(names, weights)))


def _flat(t, h):
    """[..., H] -> [N, H] without a copy where strides allow (the kernels take a row and a column stride)."""
    return t.reshape(-1, h)


# --------------------------------------------------------------------------------------------------------
# Bottleneck adapter custom ops
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{LIB}::adapter_forward", mutates_args=())
def _adapter_forward_op(
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
    return kernel_module(backend).adapter_forward(x, residual, w_down, b_down, w_up, b_up, scaling, activation)


@_adapter_forward_op.register_fake
def _(x, residual, w_down, b_down, w_up, b_up, scaling, activation, backend):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], w_down.shape[0]))


@torch.library.custom_op(f"{LIB}::adapter_backward", mutates_args=())
def _adapter_backward_op(
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
    return kernel_module(backend).adapter_backward(dy, x, z, w_down, w_up, scaling, activation, residual_is_input)


@_adapter_backward_op.register_fake
def _(dy, x, z, w_down, w_up, scaling, activation, residual_is_input, backend):
    d, h = w_down.shape
    f32 = dict(dtype=torch.float32)
    return (
        x.new_empty(x.shape),
        x.new_empty((d, h), **f32),
        x.new_empty((d,), **f32),
        x.new_empty((h, d), **f32),
        x.new_empty((h,), **f32),
    )


def _adapter_setup_context(ctx, inputs, output):
    x, residual, w_down, b_down, w_up, b_up, scaling, activation, backend = inputs
    _, z = output
    ctx.save_for_backward(x, z, w_down, w_up)
    ctx.scaling, ctx.activation, ctx.backend = scaling, activation, backend
    ctx.residual_is_input = residual is None
    ctx.dtypes = (w_down.dtype, b_down.dtype, w_up.dtype, b_up.dtype)


def _adapter_backward(ctx, dy, dz):
    # dz is never used: z is an internal saved tensor (the public API does not return it).
    x, z, w_down, w_up = ctx.saved_tensors
    dx, dwd, dbd, dwu, dbu = _adapter_backward_op(
        dy.contiguous(), x, z, w_down, w_up, ctx.scaling, ctx.activation, ctx.residual_is_input, ctx.backend
    )
    dr = None if ctx.residual_is_input else dy
    t_wd, t_bd, t_wu, t_bu = ctx.dtypes
    return dx, dr, dwd.to(t_wd), dbd.to(t_bd), dwu.to(t_wu), dbu.to(t_bu), None, None, None


_adapter_forward_op.register_autograd(_adapter_backward, setup_context=_adapter_setup_context)


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
    _check_adapter_inputs(x, residual, w_down, b_down, w_up, b_up)
    act = reference.canonical_activation(activation)
    name = resolve_backend(backend, x.device)
    check_backend_dtype(name, x.device, x.dtype)
    if residual is x:
        residual = None
    if name == "eager":
        return reference.bottleneck_adapter_reference(x, residual, w_down, b_down, w_up, b_up, scaling, act)
    h, d = x.shape[-1], w_down.shape[0]
    if b_down is None:
        b_down = w_down.new_zeros(d)
    if b_up is None:
        b_up = w_up.new_zeros(h)
    x2 = _flat(x, h)
    r2 = None if residual is None else _flat(residual, h)
    y, _ = _adapter_forward_op(
        x2, r2, w_down, b_down, w_up, b_up, float(scaling), reference.ACTIVATION_CODES[act], name
    )
    return y.view(x.shape)


# --------------------------------------------------------------------------------------------------------
# NICE coupling custom ops: one op for both directions (``inverse`` flag), as in the kernels.
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{LIB}::nice_coupling", mutates_args=())
def _nice_op(
    x: torch.Tensor,
    f_w1: torch.Tensor,
    f_b1: torch.Tensor,
    f_w2: torch.Tensor,
    f_b2: torch.Tensor,
    g_w1: torch.Tensor,
    g_b1: torch.Tensor,
    g_w2: torch.Tensor,
    g_b2: torch.Tensor,
    activation: int,
    inverse: bool,
    recompute: bool,
    backend: str,
) -> torch.Tensor:
    weights = (f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2)
    return kernel_module(backend).nice_coupling(x, weights, activation, inverse)


@_nice_op.register_fake
def _(x, f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2, activation, inverse, recompute, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op(f"{LIB}::nice_coupling_backward", mutates_args=())
def _nice_backward_op(
    dout: torch.Tensor,
    out: torch.Tensor,
    inp: torch.Tensor | None,
    f_w1: torch.Tensor,
    f_b1: torch.Tensor,
    f_w2: torch.Tensor,
    f_b2: torch.Tensor,
    g_w1: torch.Tensor,
    g_b1: torch.Tensor,
    g_w2: torch.Tensor,
    g_b2: torch.Tensor,
    activation: int,
    inverse: bool,
    backend: str,
) -> list[torch.Tensor]:
    """Returns ``[d_inp, df_w1, df_b1, df_w2, df_b2, dg_w1, dg_b1, dg_w2, dg_b2]``; weight grads in float32.
    ``inp=None`` recomputes the input from ``out`` (the coupling is invertible) instead of reading it."""
    weights = (f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2)
    return list(kernel_module(backend).nice_coupling_backward(dout, out, inp, weights, activation, inverse))


@_nice_backward_op.register_fake
def _(dout, out, inp, f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2, activation, inverse, backend):
    weights = (f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2)
    return [out.new_empty(out.shape)] + [out.new_empty(w.shape, dtype=torch.float32) for w in weights]


def _nice_setup_context(ctx, inputs, output):
    x, *weights = inputs[:9]
    activation, inverse, recompute, backend = inputs[9:]
    # Recompute mode keeps only the output alive: backward rebuilds the input by inverting the coupling.
    ctx.save_for_backward(output, None if recompute else x, *weights)
    ctx.activation, ctx.inverse, ctx.backend = activation, inverse, backend
    ctx.dtypes = [w.dtype for w in weights]


def _nice_backward(ctx, dout):
    out, inp, *weights = ctx.saved_tensors
    grads = _nice_backward_op(dout.contiguous(), out, inp, *weights, ctx.activation, ctx.inverse, ctx.backend)
    return (grads[0], *[g.to(t) for g, t in zip(grads[1:], ctx.dtypes)], None, None, None, None)


_nice_op.register_autograd(_nice_backward, setup_context=_nice_setup_context)


def _nice(x, weights, activation, backend, inverse, recompute):
    _check_nice_inputs(x, weights)
    act = reference.canonical_activation(activation)
    name = resolve_backend(backend, x.device)
    check_backend_dtype(name, x.device, x.dtype)
    if name == "eager":
        fn = reference.nice_inverse_reference if inverse else reference.nice_forward_reference
        return fn(x, *weights, activation_name=act)
    h = x.shape[-1]
    out = _nice_op(_flat(x, h), *weights, reference.ACTIVATION_CODES[act], inverse, recompute, name)
    return out.view(x.shape)


def nice_forward(x, f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2, *, activation="relu", recompute=True,
                 backend=None):
    """NICE coupling ``y1 = x1 + F(x2); y2 = x2 + G(y1)`` on the last dim of ``x``.

    ``recompute=True`` (default) saves only the output for backward and rebuilds the input by inversion;
    ``recompute=False`` also keeps the input alive (one N x H tensor more, a few small GEMMs less)."""
    weights = (f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2)
    return _nice(x, weights, activation, backend, inverse=False, recompute=recompute)


def nice_inverse(y, f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2, *, activation="relu", recompute=True,
                 backend=None):
    """Inverse NICE coupling ``x2 = y2 - G(y1); x1 = y1 - F(x2)``; same weights as ``nice_forward``."""
    weights = (f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2)
    return _nice(y, weights, activation, backend, inverse=True, recompute=recompute)


# --------------------------------------------------------------------------------------------------------
# Grouped (per-row) ops: row b of x [B, ..., H] runs the adapter of group groups[b]; weights stacked [G, ...].
# --------------------------------------------------------------------------------------------------------
_INT_DTYPES = (torch.int32, torch.int64)


def _check_groups(groups, x, num_groups):
    if not isinstance(groups, torch.Tensor):
        raise TypeError(f"groups must be a torch.Tensor of row group ids, got {type(groups).__name__}")
    if groups.dtype not in _INT_DTYPES:
        raise TypeError(f"groups has dtype {groups.dtype}; it must be int32 or int64 (one group id per row)")
    if x.dim() < 2:
        raise ValueError(f"x must be [rows, ..., H] (at least 2-D) for per-row groups, got shape {tuple(x.shape)}")
    if groups.dim() != 1 or groups.shape[0] != x.shape[0]:
        raise ValueError(f"groups has shape {tuple(groups.shape)}, expected ({x.shape[0]},): one id per row of x "
                         f"(x has shape {tuple(x.shape)})")
    if num_groups < 1:
        raise ValueError("the stacked weights hold no group (their first dimension is 0)")
    if groups.device.type == "cpu" and groups.numel() and not torch.compiler.is_compiling():
        # host data: checked without a device sync (a compiled graph has no values to look at)
        lo, hi = int(groups.min()), int(groups.max())
        if lo < 0 or hi >= num_groups:
            raise ValueError(f"groups holds ids in [{lo}, {hi}], outside [0, {num_groups}) (the weights stack "
                             f"{num_groups} groups)")


def _check_grouped_adapter_inputs(x, residual, groups, w_down, b_down, w_up, b_up):
    _check_float("x", x)
    for name, t in (("w_down", w_down), ("w_up", w_up)):
        _check_float(name, t)
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D [groups, out, in] (weights stacked over groups), got shape "
                             f"{tuple(t.shape)}")
    h = x.shape[-1] if x.dim() else 0
    g, d = w_down.shape[0], w_down.shape[1]
    _check_shape("w_down", w_down, (g, d, h))
    _check_shape("w_up", w_up, (g, h, d))
    if b_down is not None:
        _check_float("b_down", b_down)
        _check_shape("b_down", b_down, (g, d))
    if b_up is not None:
        _check_float("b_up", b_up)
        _check_shape("b_up", b_up, (g, h))
    if residual is not None and residual is not x:
        _check_float("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual has dtype {residual.dtype} but x has {x.dtype}")
    _check_groups(groups, x, g)
    _check_same_device([("x", x), ("residual", residual), ("groups", groups), ("w_down", w_down),
                        ("b_down", b_down), ("w_up", w_up), ("b_up", b_up)])


def _check_grouped_nice_inputs(x, groups, weights):
    _check_float("x", x)
    h = x.shape[-1] if x.dim() else 0
    if x.dim() < 1 or h < 2:
        raise ValueError(f"x must have a last dimension of at least 2 to split, got shape {tuple(x.shape)}")
    names = ("f_w1", "f_b1", "f_w2", "f_b2", "g_w1", "g_b1", "g_w2", "g_b2")
    for name, t in zip(names, weights):
        _check_float(name, t)
    f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2 = weights
    for name, t in (("f_w1", f_w1), ("g_w1", g_w1), ("f_w2", f_w2), ("g_w2", g_w2)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D [groups, out, in] (weights stacked over groups), got shape "
                             f"{tuple(t.shape)}")
    len1, len2 = reference.nice_split(h)
    g, hf, hg = f_w1.shape[0], f_w1.shape[1], g_w1.shape[1]
    for name, t, shape in (("f_w1", f_w1, (g, hf, len2)), ("f_b1", f_b1, (g, hf)), ("f_w2", f_w2, (g, len1, hf)),
                           ("f_b2", f_b2, (g, len1)), ("g_w1", g_w1, (g, hg, len1)), ("g_b1", g_b1, (g, hg)),
                           ("g_w2", g_w2, (g, len2, hg)), ("g_b2", g_b2, (g, len2))):
        _check_shape(name, t, shape)
    _check_groups(groups, x, g)
    _check_same_device([("x", x), ("groups", groups)] + list(zip(names, weights)))


def _grouped_backend(backend, device) -> str:
    name = resolve_backend(backend, device)
    if name == "cuda":
        raise BackendUnavailableError(
            "backend 'cuda' has no grouped (per-row) kernels; use backend='triton' (or 'eager'). A model on "
            "backend 'cuda' runs its per-row adapters on the Triton kernels by itself")
    return name


@torch.library.custom_op(f"{LIB}::grouped_adapter_forward", mutates_args=())
def _grouped_adapter_forward_op(
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
    return kernel_module(backend).grouped_adapter_forward(x, residual, groups, w_down, b_down, w_up, b_up,
                                                          scaling, activation)


@_grouped_adapter_forward_op.register_fake
def _(x, residual, groups, w_down, b_down, w_up, b_up, scaling, activation, backend):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], w_down.shape[1]))


@torch.library.custom_op(f"{LIB}::grouped_adapter_backward", mutates_args=())
def _grouped_adapter_backward_op(
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
    return kernel_module(backend).grouped_adapter_backward(dy, x, z, groups, w_down, w_up, scaling, activation,
                                                           residual_is_input, weight_grads)


@_grouped_adapter_backward_op.register_fake
def _(dy, x, z, groups, w_down, w_up, scaling, activation, residual_is_input, weight_grads, backend):
    g, d, h = w_down.shape
    f32 = dict(dtype=torch.float32)
    if not weight_grads:
        return (x.new_empty(x.shape),) + tuple(x.new_empty((0,), **f32) for _ in range(4))
    return (x.new_empty(x.shape), x.new_empty((g, d, h), **f32), x.new_empty((g, d), **f32),
            x.new_empty((g, h, d), **f32), x.new_empty((g, h), **f32))


def _grouped_adapter_setup_context(ctx, inputs, output):
    x, residual, groups, w_down, b_down, w_up, b_up, scaling, activation, backend = inputs
    _, z = output
    ctx.save_for_backward(x, z, groups, w_down, w_up)
    ctx.scaling, ctx.activation, ctx.backend = scaling, activation, backend
    ctx.residual_is_input = residual is None
    ctx.dtypes = (w_down.dtype, b_down.dtype, w_up.dtype, b_up.dtype)


def _grouped_adapter_backward(ctx, dy, dz):
    x, z, groups, w_down, w_up = ctx.saved_tensors
    # Frozen per-row adapters (MAD-X task training stacks a trained task adapter on frozen language adapters)
    # skip the four per-group weight reductions.
    weight_grads = any(ctx.needs_input_grad[3:7])
    dx, dwd, dbd, dwu, dbu = _grouped_adapter_backward_op(
        dy.contiguous(), x, z, groups, w_down, w_up, ctx.scaling, ctx.activation, ctx.residual_is_input,
        weight_grads, ctx.backend)
    dr = None if ctx.residual_is_input else dy
    if not weight_grads:
        return dx, dr, None, None, None, None, None, None, None, None
    t_wd, t_bd, t_wu, t_bu = ctx.dtypes
    return dx, dr, None, dwd.to(t_wd), dbd.to(t_bd), dwu.to(t_wu), dbu.to(t_bu), None, None, None


_grouped_adapter_forward_op.register_autograd(_grouped_adapter_backward,
                                              setup_context=_grouped_adapter_setup_context)


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
    _check_grouped_adapter_inputs(x, residual, groups, w_down, b_down, w_up, b_up)
    act = reference.canonical_activation(activation)
    name = _grouped_backend(backend, x.device)
    if residual is x:
        residual = None
    if name == "eager":
        return reference.grouped_bottleneck_adapter_reference(x, residual, groups, w_down, b_down, w_up, b_up,
                                                              scaling, act)
    g, d, h = w_down.shape
    if b_down is None:
        b_down = w_down.new_zeros(g, d)
    if b_up is None:
        b_up = w_up.new_zeros(g, h)
    y, _ = _grouped_adapter_forward_op(
        _flat(x, h), None if residual is None else _flat(residual, h), groups.contiguous(), w_down, b_down, w_up,
        b_up, float(scaling), reference.ACTIVATION_CODES[act], name)
    return y.view(x.shape)


@torch.library.custom_op(f"{LIB}::grouped_nice_coupling", mutates_args=())
def _grouped_nice_op(
    x: torch.Tensor,
    groups: torch.Tensor,
    f_w1: torch.Tensor,
    f_b1: torch.Tensor,
    f_w2: torch.Tensor,
    f_b2: torch.Tensor,
    g_w1: torch.Tensor,
    g_b1: torch.Tensor,
    g_w2: torch.Tensor,
    g_b2: torch.Tensor,
    activation: int,
    inverse: bool,
    recompute: bool,
    backend: str,
) -> torch.Tensor:
    weights = (f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2)
    return kernel_module(backend).grouped_nice_coupling(x, groups, weights, activation, inverse)


@_grouped_nice_op.register_fake
def _(x, groups, f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2, activation, inverse, recompute, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op(f"{LIB}::grouped_nice_coupling_backward", mutates_args=())
def _grouped_nice_backward_op(
    dout: torch.Tensor,
    out: torch.Tensor,
    inp: torch.Tensor | None,
    groups: torch.Tensor,
    f_w1: torch.Tensor,
    f_b1: torch.Tensor,
    f_w2: torch.Tensor,
    f_b2: torch.Tensor,
    g_w1: torch.Tensor,
    g_b1: torch.Tensor,
    g_w2: torch.Tensor,
    g_b2: torch.Tensor,
    activation: int,
    inverse: bool,
    weight_grads: bool,
    backend: str,
) -> list[torch.Tensor]:
    """``[d_inp, df_w1, ..., dg_b2]``, weight grads ``[G, ...]`` float32 (empty unless weight_grads)."""
    weights = (f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2)
    return list(kernel_module(backend).grouped_nice_coupling_backward(dout, out, inp, groups, weights, activation,
                                                                      inverse, weight_grads))


@_grouped_nice_backward_op.register_fake
def _(dout, out, inp, groups, f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2, activation, inverse, weight_grads,
      backend):
    weights = (f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2)
    shapes = [w.shape if weight_grads else (0,) for w in weights]
    return [out.new_empty(out.shape)] + [out.new_empty(s, dtype=torch.float32) for s in shapes]


def _grouped_nice_setup_context(ctx, inputs, output):
    x, groups, *weights = inputs[:10]
    activation, inverse, recompute, backend = inputs[10:]
    ctx.save_for_backward(output, None if recompute else x, groups, *weights)
    ctx.activation, ctx.inverse, ctx.backend = activation, inverse, backend
    ctx.dtypes = [w.dtype for w in weights]


def _grouped_nice_backward(ctx, dout):
    out, inp, groups, *weights = ctx.saved_tensors
    weight_grads = any(ctx.needs_input_grad[2:10])
    grads = _grouped_nice_backward_op(dout.contiguous(), out, inp, groups, *weights, ctx.activation, ctx.inverse,
                                      weight_grads, ctx.backend)
    if not weight_grads:
        return (grads[0], None) + (None,) * 8 + (None,) * 4
    return (grads[0], None, *[g.to(t) for g, t in zip(grads[1:], ctx.dtypes)], None, None, None, None)


_grouped_nice_op.register_autograd(_grouped_nice_backward, setup_context=_grouped_nice_setup_context)


def _grouped_nice(x, groups, weights, activation, backend, inverse, recompute):
    _check_grouped_nice_inputs(x, groups, weights)
    act = reference.canonical_activation(activation)
    name = _grouped_backend(backend, x.device)
    if name == "eager":
        return reference.grouped_nice_reference(x, groups, *weights, activation_name=act, inverse=inverse)
    h = x.shape[-1]
    out = _grouped_nice_op(_flat(x, h), groups.contiguous(), *weights, reference.ACTIVATION_CODES[act], inverse,
                           recompute, name)
    return out.view(x.shape)


def grouped_nice_forward(x, groups, f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2, *, activation="relu",
                         recompute=True, backend=None):
    """Per-row NICE coupling forward: row ``b`` of ``x [B, ..., H]`` through ``nice_forward`` with the weights of
    group ``groups[b]``, each weight stacked over groups (``f_w1 [G, hf, H - H//2]``, ``f_b1 [G, hf]``, ...)."""
    weights = (f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2)
    return _grouped_nice(x, groups, weights, activation, backend, inverse=False, recompute=recompute)


def grouped_nice_inverse(y, groups, f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2, *, activation="relu",
                         recompute=True, backend=None):
    """Per-row inverse NICE coupling; the inverse of ``grouped_nice_forward`` with the same weights and groups."""
    weights = (f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2)
    return _grouped_nice(y, groups, weights, activation, backend, inverse=True, recompute=recompute)
