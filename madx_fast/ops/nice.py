"""NICE coupling ops: ``nice_forward`` / ``nice_inverse`` and their per-row versions ``grouped_nice_forward`` /
``grouped_nice_inverse``. One custom op serves both directions (an ``inverse`` flag, as in the kernels).

The single coupling is the grouped one without groups: one input check, one autograd setup and one backward
serve both. The custom ops' schemas list the eight weights by their ``NiceWeights`` names (written out here
once, from the tuple's fields) so that compiled graphs and traces keep naming each weight.

Backward of the forward coupling ``y1 = x1 + F(x2); y2 = x2 + G(y1)``, with ``J_G(y1)^T v`` the gradient of
``<v, G(y1)>`` with respect to ``y1``: ``dy1' = dy1 + J_G(y1)^T dy2`` (y1 also feeds y2), ``dx1 = dy1'``,
``dx2 = dy2 + J_F(x2)^T dy1'``; G's weight gradients come from ``dy2`` at input ``y1``, F's from ``dy1'`` at
input ``x2``. The inverse ``x2 = y2 - G(y1); x1 = y1 - F(x2)`` runs the same sequence with F and G swapped and
the MLP terms negated. Recompute mode saves only the output and rebuilds the input by running the coupling
the other way (``inp=None`` to the backward kernel).
"""
from __future__ import annotations

import torch

from .. import reference
from ..reference import NiceWeights
from . import dispatch
from .checks import check_float, check_groups, check_matrix, check_same_device, check_shape
from .dispatch import LIB

_N = len(NiceWeights._fields)
_WEIGHT_PARAMS = ", ".join(f"Tensor {name}" for name in NiceWeights._fields)


def _check_inputs(x, groups, weights: NiceWeights):
    """Shapes of ``reference.nice_weight_shapes``, each led by ``G`` with ``groups`` (stacked over groups)."""
    stacked = groups is not None
    check_float("x", x)
    h = x.shape[-1] if x.dim() else 0
    if x.dim() < 1 or h < 2:
        raise ValueError(f"x must have a last dimension of at least 2 to split, got shape {tuple(x.shape)}")
    named = weights._asdict()
    for name, t in named.items():
        check_float(name, t)
    for name in ("f_w1", "g_w1", "f_w2", "g_w2"):
        check_matrix(name, named[name], stacked)
    *lead, hf, _ = weights.f_w1.shape
    hg = weights.g_w1.shape[-2]
    for name, shape in reference.nice_weight_shapes(h, hf, hg).items():
        check_shape(name, named[name], (*lead, *shape))
    if stacked:
        check_groups(groups, x, weights.f_w1.shape[0])
    check_same_device([("x", x), ("groups", groups), *named.items()])


# --------------------------------------------------------------------------------------------------------
# Custom ops: the schemas are spelled out (the weights from NiceWeights), so the functions take ``*args``:
# the eight weights, then the flags.
# --------------------------------------------------------------------------------------------------------
def _schema(leading: str, flags: str, returns: str) -> str:
    return f"({leading}, {_WEIGHT_PARAMS}, {flags}) -> {returns}"


@torch.library.custom_op(f"{LIB}::nice_coupling", mutates_args=(), schema=_schema(
    "Tensor x", "SymInt activation, bool inverse, bool recompute, str backend", "Tensor"))
def _coupling_op(x, *args):
    """The coupling (``inverse=False``) or its inverse on ``x [N, H]``."""
    *weights, activation, inverse, recompute, backend = args
    return dispatch.launchers(backend).nice_coupling(x, NiceWeights(*weights), activation, inverse)


@torch.library.custom_op(f"{LIB}::grouped_nice_coupling", mutates_args=(), schema=_schema(
    "Tensor x, Tensor groups", "SymInt activation, bool inverse, bool recompute, str backend", "Tensor"))
def _grouped_coupling_op(x, groups, *args):
    """Row ``b`` of ``x [B*L, H]`` through the coupling of group ``groups[b]``; weights stacked ``[G, ...]``."""
    *weights, activation, inverse, recompute, backend = args
    return dispatch.launchers(backend).grouped_nice_coupling(x, groups, NiceWeights(*weights), activation, inverse)


@_coupling_op.register_fake
def _(x, *args):
    return x.new_empty(x.shape)


@_grouped_coupling_op.register_fake
def _(x, groups, *args):
    return x.new_empty(x.shape)


@torch.library.custom_op(f"{LIB}::nice_coupling_backward", mutates_args=(), schema=_schema(
    "Tensor dout, Tensor out, Tensor? inp", "SymInt activation, bool inverse, str backend", "Tensor[]"))
def _backward_op(dout, out, inp, *args):
    """``[d_inp, df_w1, ..., dg_b2]``, weight grads in float32. ``inp=None`` recomputes the input from ``out``
    (the coupling is invertible) instead of reading it."""
    *weights, activation, inverse, backend = args
    launchers = dispatch.launchers(backend)
    return list(launchers.nice_coupling_backward(dout, out, inp, NiceWeights(*weights), activation, inverse))


@torch.library.custom_op(f"{LIB}::grouped_nice_coupling_backward", mutates_args=(), schema=_schema(
    "Tensor dout, Tensor out, Tensor? inp, Tensor groups", "SymInt activation, bool inverse, bool weight_grads, "
    "str backend", "Tensor[]"))
def _grouped_backward_op(dout, out, inp, groups, *args):
    """``[d_inp, df_w1, ..., dg_b2]``, weight grads ``[G, ...]`` float32 (empty unless weight_grads)."""
    *weights, activation, inverse, weight_grads, backend = args
    launchers = dispatch.launchers(backend)
    return list(launchers.grouped_nice_coupling_backward(dout, out, inp, groups, NiceWeights(*weights), activation,
                                                         inverse, weight_grads))


def _fake_grads(out, weights, weight_grads=True):
    shapes = [w.shape if weight_grads else (0,) for w in weights]
    return [out.new_empty(out.shape)] + [out.new_empty(s, dtype=torch.float32) for s in shapes]


@_backward_op.register_fake
def _(dout, out, inp, *args):
    return _fake_grads(out, args[:_N])


@_grouped_backward_op.register_fake
def _(dout, out, inp, groups, *args):
    *weights, activation, inverse, weight_grads, backend = args
    return _fake_grads(out, weights, weight_grads)


# --------------------------------------------------------------------------------------------------------
# Autograd, one for both forward ops: ``groups`` is an empty list for the single coupling.
# --------------------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, *tensors, activation, inverse, recompute, backend = inputs
    groups, weights = tensors[:-_N], tensors[-_N:]
    # Recompute mode keeps only the output alive: backward rebuilds the input by inverting the coupling.
    ctx.save_for_backward(output, None if recompute else x, *groups, *weights)
    ctx.activation, ctx.inverse, ctx.backend = activation, inverse, backend
    ctx.dtypes = [w.dtype for w in weights]


def _backward(ctx, dout):
    out, inp, *tensors = ctx.saved_tensors
    groups, weights = tensors[:-_N], tensors[-_N:]
    first_weight = 1 + len(groups)  # f_w1's place among the forward op's inputs
    weight_grads = any(ctx.needs_input_grad[first_weight:first_weight + _N])
    if groups:
        # Frozen per-row couplings skip the per-group weight reductions.
        grads = _grouped_backward_op(dout.contiguous(), out, inp, *groups, *weights, ctx.activation, ctx.inverse,
                                     weight_grads, ctx.backend)
    else:
        grads = _backward_op(dout.contiguous(), out, inp, *weights, ctx.activation, ctx.inverse, ctx.backend)
    dw = dispatch.in_weight_dtypes(grads[1:], ctx.dtypes) if weight_grads else [None] * _N
    return (grads[0], *[None] * len(groups), *dw, None, None, None, None)


_coupling_op.register_autograd(_backward, setup_context=_setup_context)
_grouped_coupling_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------
def _coupling(x, groups, weights: NiceWeights, activation, backend, inverse, recompute):
    """All four public functions: ``groups=None`` is the single coupling."""
    _check_inputs(x, groups, weights)
    act = reference.canonical_activation(activation)
    name = dispatch.choose_backend(backend, x, grouped=groups is not None)
    if name == "eager":
        if groups is None:
            fn = reference.nice_inverse_reference if inverse else reference.nice_forward_reference
            return fn(x, *weights, activation_name=act)
        return reference.grouped_nice_reference(x, groups, *weights, activation_name=act, inverse=inverse)
    h = x.shape[-1]
    flags = (reference.ACTIVATION_CODES[act], inverse, recompute, name)
    if groups is None:
        out = _coupling_op(dispatch.rows(x, h), *weights, *flags)
    else:
        out = _grouped_coupling_op(dispatch.rows(x, h), groups.contiguous(), *weights, *flags)
    return out.view(x.shape)


def nice_forward(x, f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2, *, activation="relu", recompute=True,
                 backend=None):
    """NICE coupling ``y1 = x1 + F(x2); y2 = x2 + G(y1)`` on the last dim of ``x``.

    ``recompute=True`` (default) saves only the output for backward and rebuilds the input by inversion;
    ``recompute=False`` also keeps the input alive (one N x H tensor more, a few small GEMMs less)."""
    weights = NiceWeights(f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2)
    return _coupling(x, None, weights, activation, backend, inverse=False, recompute=recompute)


def nice_inverse(y, f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2, *, activation="relu", recompute=True,
                 backend=None):
    """Inverse NICE coupling ``x2 = y2 - G(y1); x1 = y1 - F(x2)``; same weights as ``nice_forward``."""
    weights = NiceWeights(f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2)
    return _coupling(y, None, weights, activation, backend, inverse=True, recompute=recompute)


def grouped_nice_forward(x, groups, f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2, *, activation="relu",
                         recompute=True, backend=None):
    """Per-row NICE coupling forward: row ``b`` of ``x [B, ..., H]`` through ``nice_forward`` with the weights of
    group ``groups[b]``, each weight stacked over groups (``f_w1 [G, hf, H - H//2]``, ``f_b1 [G, hf]``, ...).
    Backends "triton" and "eager"; "cuda" has no grouped kernels and is refused."""
    weights = NiceWeights(f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2)
    return _coupling(x, groups, weights, activation, backend, inverse=False, recompute=recompute)


def grouped_nice_inverse(y, groups, f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2, *, activation="relu",
                         recompute=True, backend=None):
    """Per-row inverse NICE coupling; the inverse of ``grouped_nice_forward`` with the same weights and groups."""
    weights = NiceWeights(f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2)
    return _coupling(y, groups, weights, activation, backend, inverse=True, recompute=recompute)
