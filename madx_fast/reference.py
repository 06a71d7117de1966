"""Eager PyTorch reference for every madx_fast op: the specification and the test oracle.

Nothing here is fast; everything here is plain torch ops, so autograd derives the gradients that the
fused backends must reproduce. The math follows MAD-X as AdapterHub's `adapters` implements it
(docs/spec.md):

* bottleneck adapter:  ``y = r + s * (W_up · act(W_down · x + b_down) + b_up)``
* NICE coupling, with ``x = [x1, x2]`` split at ``H // 2``:
  forward ``y1 = x1 + F(x2); y2 = x2 + G(y1)``, inverse ``x2 = y2 - G(y1); x1 = y1 - F(x2)``,
  where ``F(z) = W_F2 · act(W_F1 · z + b_F1) + b_F2`` and likewise ``G``.

Precision contract shared by all backends: the matrix products run in the activation dtype (weights are
cast to ``x.dtype``, as autocast does), accumulate in float32, and the output has ``x.dtype``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Activation names as AdapterHub configs spell them (transformers' ACT2FN keys), mapped to one canonical
# name each. The integer codes are what the Triton/CUDA kernels take as a compile-time constant.
ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",  # exact (erf) GELU, transformers' "gelu"
    "gelu_new": "gelu_tanh",  # tanh approximation
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
    "tanh": "tanh",
    "linear": "identity",
    "identity": "identity",
    "leakyrelu": "leaky_relu",
    "leaky_relu": "leaky_relu",
}
ACTIVATION_CODES = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "tanh": 5, "leaky_relu": 6}
LEAKY_RELU_SLOPE = 0.01


def canonical_activation(name: str | None) -> str:
    """Canonical activation name for an AdapterHub/transformers name; a clear error for unknown ones."""
    if name is None:
        return "identity"
    key = str(name).lower()
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; madx_fast supports {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[key]


def activation(z: torch.Tensor, name: str) -> torch.Tensor:
    name = canonical_activation(name)
    if name == "relu":
        return F.relu(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "silu":
        return F.silu(z)
    if name == "tanh":
        return torch.tanh(z)
    if name == "leaky_relu":
        return F.leaky_relu(z, LEAKY_RELU_SLOPE)
    return z


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


def bottleneck_adapter_reference(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    scaling: float = 1.0,
    activation_name: str = "relu",
) -> torch.Tensor:
    """``residual + scaling * (W_up act(W_down x + b_down) + b_up)``; ``residual=None`` means ``x``."""
    r = x if residual is None else residual
    return r + _bottleneck_delta(x, w_down, b_down, w_up, b_up, scaling, activation_name)


def _bottleneck_delta(x, w_down, b_down, w_up, b_up, scaling, activation_name):
    """``scaling * (W_up act(W_down x + b_down) + b_up)``: the adapter's contribution, without the residual."""
    h = activation(_linear(x, w_down, b_down), activation_name)
    return _linear(h, w_up, b_up) * scaling


def _mlp(z, w1, b1, w2, b2, activation_name):
    return _linear(activation(_linear(z, w1, b1), activation_name), w2, b2)


def nice_split(h: int) -> tuple[int, int]:
    """Sizes of the two halves, as AdapterHub splits them: ``[H // 2, H - H // 2]``."""
    return h // 2, h - h // 2


def nice_hidden_sizes(h: int, reduction_factor: float = 2) -> tuple[int, int]:
    """Hidden sizes of F (input x2) and G (input y1): ``int(in_features // reduction_factor)``."""
    len1, len2 = nice_split(h)
    return int(len2 // reduction_factor), int(len1 // reduction_factor)


class NiceWeights(NamedTuple):
    """The eight weights of a NICE coupling in the order every NICE function takes them: F's two linear layers
    (input ``x2``), then G's (input ``y1``), each as nn.Linear ``weight [out, in]`` and ``bias [out]``."""

    f_w1: torch.Tensor
    f_b1: torch.Tensor
    f_w2: torch.Tensor
    f_b2: torch.Tensor
    g_w1: torch.Tensor
    g_b1: torch.Tensor
    g_w2: torch.Tensor
    g_b2: torch.Tensor


def nice_weight_shapes(h: int, hf: int, hg: int) -> dict[str, tuple[int, ...]]:
    """``NiceWeights`` field -> shape for hidden size ``h`` and F / G hidden sizes ``hf`` / ``hg``:
    ``F: H - H//2 -> hf -> H//2``, ``G: H//2 -> hg -> H - H//2``."""
    len1, len2 = nice_split(h)
    shapes = ((hf, len2), (hf,), (len1, hf), (len1,), (hg, len1), (hg,), (len2, hg), (len2,))
    return dict(zip(NiceWeights._fields, shapes))


def nice_forward_reference(x, f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2, activation_name="relu"):
    """NICE coupling forward: ``y1 = x1 + F(x2); y2 = x2 + G(y1)``."""
    len1, _ = nice_split(x.shape[-1])
    x1, x2 = x[..., :len1], x[..., len1:]
    y1 = x1 + _mlp(x2, f_w1, f_b1, f_w2, f_b2, activation_name)
    y2 = x2 + _mlp(y1, g_w1, g_b1, g_w2, g_b2, activation_name)
    return torch.cat([y1, y2], dim=-1)


def nice_inverse_reference(y, f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2, activation_name="relu"):
    """NICE coupling inverse: ``x2 = y2 - G(y1); x1 = y1 - F(x2)``."""
    len1, _ = nice_split(y.shape[-1])
    y1, y2 = y[..., :len1], y[..., len1:]
    x2 = y2 - _mlp(y1, g_w1, g_b1, g_w2, g_b2, activation_name)
    x1 = y1 - _mlp(x2, f_w1, f_b1, f_w2, f_b2, activation_name)
    return torch.cat([x1, x2], dim=-1)


# --------------------------------------------------------------------------------------------------------
# Per-row (grouped) adapters: row b of a batch runs the adapter of group ``groups[b]``.
# --------------------------------------------------------------------------------------------------------
def _row_mask(groups: torch.Tensor, g: int, like: torch.Tensor) -> torch.Tensor:
    """``groups == g`` shaped to broadcast over ``like`` = [B, ..., H]."""
    return (groups == g).view(groups.shape[0], *([1] * (like.dim() - 1)))


def _per_group(x, groups, num_groups, fn):
    """``out[b] = fn(g, x masked to the rows of group g)[b]`` with ``g = groups[b]``: each group's function runs
    on the batch with every other group's rows zeroed, and only its own rows are kept (``torch.where`` selects,
    it never multiplies: a NaN or Inf that one group's weights or rows produce never reaches another group's
    rows, in the output or in any gradient). Rows whose id is outside ``[0, G)`` come out as zeros."""
    out = torch.zeros_like(x)
    for g in range(num_groups):
        m = _row_mask(groups, g, x)
        out = torch.where(m, fn(g, torch.where(m, x, torch.zeros_like(x))), out)
    return out


def grouped_bottleneck_adapter_reference(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    groups: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    scaling: float = 1.0,
    activation_name: str = "relu",
) -> torch.Tensor:
    """Per-row bottleneck adapter: row ``b`` of ``x [B, ..., H]`` is ``bottleneck_adapter_reference`` with the
    weights of group ``groups[b]``, from weights stacked over groups: ``w_down [G, d, H]``, ``b_down [G, d]``,
    ``w_up [G, H, d]``, ``b_up [G, H]``. ``residual=None`` means ``x``. Computes every group on the whole batch
    (G times the work of one adapter): a specification, not a fast path."""
    r = x if residual is None else residual

    def delta(g, xg):
        return _bottleneck_delta(xg, w_down[g], None if b_down is None else b_down[g], w_up[g],
                                 None if b_up is None else b_up[g], scaling, activation_name)
    return r + _per_group(x, groups, w_down.shape[0], delta)


def grouped_nice_reference(x, groups, f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2, activation_name="relu",
                           inverse=False):
    """Per-row NICE coupling: row ``b`` of ``x [B, ..., H]`` through ``nice_forward_reference`` (or
    ``nice_inverse_reference``) with the weights of group ``groups[b]``; each weight stacked over groups
    (``f_w1 [G, hf, H - H//2]``, ``f_b1 [G, hf]``, ...)."""
    weights = NiceWeights(f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2)
    fn = nice_inverse_reference if inverse else nice_forward_reference
    return _per_group(x, groups, f_w1.shape[0],
                      lambda g, xg: fn(xg, *(w[g] for w in weights), activation_name=activation_name))


# --------------------------------------------------------------------------------------------------------
# Averaged adapters (AdapterHub's Average): several adapters on the same input, outputs combined with weights.
# --------------------------------------------------------------------------------------------------------
def _mixed_delta(x, mix, w_down, b_down, w_up, b_up, scaling, activation_name):
    """``sum_k mix[k] * delta_k(x)`` over the K adapters stacked in ``w_down [K, d, H]``, ..., ``mix [K]``."""
    out = torch.zeros_like(x)
    for k in range(w_down.shape[0]):
        delta = _bottleneck_delta(x, w_down[k], None if b_down is None else b_down[k], w_up[k],
                                  None if b_up is None else b_up[k], scaling, activation_name)
        out = out + mix[k].to(x.dtype) * delta
    return out


def average_bottleneck_adapter_reference(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    mix: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    scaling: float = 1.0,
    activation_name: str = "relu",
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """K adapters on one input, their outputs ``h_k = r + delta_k(x)`` combined with coefficients ``mix``:

        y = sum_k mix[k] h_k = (sum_k mix[k]) r + sum_k mix[k] * scaling * (W_up[k] act(W_down[k] x + b_down[k]) + b_up[k])

    with the weights stacked over adapters (``w_down [K, d, H]``, ``b_down [K, d]``, ``w_up [K, H, d]``,
    ``b_up [K, H]``) and ``mix [K]``. ``residual=None`` means ``x``. With ``groups [B]`` (one id per row of
    ``x [B, ..., H]``), every row has its own ensemble: ``mix [G, K]`` and weights ``[G, K, ...]``, row ``b``
    using group ``groups[b]``'s (a zero coefficient with zero weights pads a group of fewer adapters).
    AdapterHub's ``Average`` is ``mix = weights`` (madx_fast) or ``weights / K`` (AdapterHub 1.3's own mean)."""
    r = x if residual is None else residual
    if groups is None:
        coef = mix.sum().to(x.dtype)
        return r * coef + _mixed_delta(x, mix, w_down, b_down, w_up, b_up, scaling, activation_name)

    def delta(g, xg):
        return _mixed_delta(xg, mix[g], w_down[g], None if b_down is None else b_down[g], w_up[g],
                            None if b_up is None else b_up[g], scaling, activation_name)
    coef = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    totals = mix.sum(-1).to(x.dtype)
    for g in range(mix.shape[0]):
        coef = torch.where(groups == g, totals[g], coef)
    return r * coef.view(-1, *([1] * (x.dim() - 1))) + _per_group(x, groups, mix.shape[0], delta)


def init_linear_bert(weight: torch.Tensor, bias: torch.Tensor | None, std: float = 0.02) -> None:
    """AdapterHub's ``init_weights="bert"``: weights N(0, 0.02), biases zero."""
    with torch.no_grad():
        weight.normal_(0.0, std)
        if bias is not None:
            bias.zero_()


def init_linear_kaiming(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """AdapterHub's ``mam_adapter`` down projection: kaiming-uniform (a=sqrt(5)) weight, zero bias."""
    with torch.no_grad():
        torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if bias is not None:
            bias.zero_()
