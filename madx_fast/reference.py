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
    h = activation(_linear(x, w_down, b_down), activation_name)
    return r + _linear(h, w_up, b_up) * scaling


def _mlp(z, w1, b1, w2, b2, activation_name):
    return _linear(activation(_linear(z, w1, b1), activation_name), w2, b2)


def nice_split(h: int) -> tuple[int, int]:
    """Sizes of the two halves, as AdapterHub splits them: ``[H // 2, H - H // 2]``."""
    return h // 2, h - h // 2


def nice_hidden_sizes(h: int, reduction_factor: float = 2) -> tuple[int, int]:
    """Hidden sizes of F (input x2) and G (input y1): ``int(in_features // reduction_factor)``."""
    len1, len2 = nice_split(h)
    return int(len2 // reduction_factor), int(len1 // reduction_factor)


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
