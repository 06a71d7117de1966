"""nn.Modules holding adapter parameters and calling the fused ops.

Parameter names follow AdapterHub's modules (``adapter_down.0``, ``adapter_up``; ``F.0``, ``F.2``, ``G.0``,
``G.2``), so a state dict moves between the two libraries by prefix alone.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops, reference


def bottleneck_size(hidden_size: int, reduction_factor: float) -> int:
    """AdapterHub's bottleneck width: ``int(hidden_size // reduction_factor)``."""
    d = int(hidden_size // reduction_factor)
    if d < 1:
        raise ValueError(f"reduction_factor {reduction_factor} leaves no bottleneck for hidden size {hidden_size}")
    return d


class _Activation(nn.Module):
    """Placeholder at index 1 of ``adapter_down`` / ``F`` / ``G`` so that indices match AdapterHub's."""

    def __init__(self, name: str):
        super().__init__()
        self.name = reference.canonical_activation(name)

    def forward(self, z):
        return reference.activation(z, self.name)

    def extra_repr(self):
        return self.name


class BottleneckAdapter(nn.Module):
    """Sequential bottleneck adapter: ``residual + scaling * (W_up act(W_down x + b_down) + b_up)``.

    ``init_weights`` as AdapterHub's: "bert" (N(0, 0.02) weights, zero biases; the default), "mam_adapter"
    (kaiming-uniform down projection, zero biases and up projection: the identity at start) or "houlsby"
    (N(0, 0.01) truncated to [-0.02, 0.02], zero biases).
    """

    def __init__(self, hidden_size: int, reduction_factor: float = 16, activation: str = "relu",
                 scaling: float = 1.0, init_weights: str = "bert", dropout: float = 0.0,
                 backend: str | None = None, bottleneck: int | None = None):
        super().__init__()
        d = bottleneck if bottleneck is not None else bottleneck_size(hidden_size, reduction_factor)
        self.hidden_size, self.bottleneck = hidden_size, d
        self.activation = reference.canonical_activation(activation)
        self.scaling = float(scaling)
        self.backend = backend
        self.adapter_down = nn.Sequential(nn.Linear(hidden_size, d), _Activation(self.activation))
        self.adapter_up = nn.Linear(d, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters(init_weights)

    @staticmethod
    def parameter_shapes(hidden_size: int, bottleneck: int) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every parameter (AdapterHub's names): the one statement of the adapter's size."""
        h, d = hidden_size, bottleneck
        return {"adapter_down.0.weight": (d, h), "adapter_down.0.bias": (d,), "adapter_up.weight": (h, d),
                "adapter_up.bias": (h,)}

    def reset_parameters(self, init_weights: str = "bert"):
        down, up = self.adapter_down[0], self.adapter_up
        if init_weights == "bert":
            reference.init_linear_bert(down.weight, down.bias)
            reference.init_linear_bert(up.weight, up.bias)
        elif init_weights == "mam_adapter":
            reference.init_linear_kaiming(down.weight, down.bias)
            with torch.no_grad():
                up.weight.zero_()
                up.bias.zero_()
        elif init_weights == "houlsby":
            with torch.no_grad():
                for lin in (down, up):
                    nn.init.trunc_normal_(lin.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                    lin.bias.zero_()
        else:
            raise ValueError(f"unknown init_weights {init_weights!r}; choose 'bert', 'mam_adapter' or 'houlsby'")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        down, up = self.adapter_down[0], self.adapter_up
        if self.training and self.dropout.p > 0:
            # Dropout sits between the scaled adapter output and the residual add: not in the fused kernel.
            r = x if residual is None else residual
            delta = reference.bottleneck_adapter_reference(
                x, torch.zeros_like(r), down.weight, down.bias, up.weight, up.bias, self.scaling, self.activation
            )
            return r + self.dropout(delta)
        return ops.bottleneck_adapter(x, residual, down.weight, down.bias, up.weight, up.bias,
                                      scaling=self.scaling, activation=self.activation, backend=self.backend)

    def extra_repr(self):
        return f"hidden_size={self.hidden_size}, bottleneck={self.bottleneck}, scaling={self.scaling}"


class InvertibleAdapter(nn.Module):
    """NICE coupling block (MAD-X's invertible adapter): ``forward`` on embeddings, ``inverse`` before the
    masked-LM decoder. F: ``H - H//2 -> hidden -> H//2``, G: ``H//2 -> hidden -> H - H//2``,
    hidden ``= int(in // reduction_factor)``."""

    # AdapterHub's parameter names, one per ``reference.NiceWeights`` field in its order
    PARAMETER_NAMES = ("F.0.weight", "F.0.bias", "F.2.weight", "F.2.bias", "G.0.weight", "G.0.bias", "G.2.weight",
                       "G.2.bias")

    def __init__(self, hidden_size: int, reduction_factor: float = 2, activation: str = "relu",
                 recompute: bool = True, backend: str | None = None):
        super().__init__()
        len1, len2 = reference.nice_split(hidden_size)
        hf, hg = reference.nice_hidden_sizes(hidden_size, reduction_factor)
        if min(hf, hg) < 1:
            raise ValueError(f"reduction_factor {reduction_factor} leaves no hidden units for size {hidden_size}")
        self.hidden_size = hidden_size
        self.activation = reference.canonical_activation(activation)
        self.recompute, self.backend = recompute, backend
        self.F = nn.Sequential(nn.Linear(len2, hf), _Activation(self.activation), nn.Linear(hf, len1))
        self.G = nn.Sequential(nn.Linear(len1, hg), _Activation(self.activation), nn.Linear(hg, len2))
        self.reset_parameters()

    @staticmethod
    def parameter_shapes(hidden_size: int, reduction_factor: float) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every parameter (AdapterHub's names): the one statement of the block's size."""
        hf, hg = reference.nice_hidden_sizes(hidden_size, reduction_factor)
        shapes = reference.nice_weight_shapes(hidden_size, hf, hg)
        return dict(zip(InvertibleAdapter.PARAMETER_NAMES, shapes.values()))

    def reset_parameters(self):
        for lin in (self.F[0], self.F[2], self.G[0], self.G[2]):
            reference.init_linear_bert(lin.weight, lin.bias)

    def weights(self) -> reference.NiceWeights:
        """The parameters in the order the NICE ops take them (``PARAMETER_NAMES``, field by field)."""
        return reference.NiceWeights(self.F[0].weight, self.F[0].bias, self.F[2].weight, self.F[2].bias,
                                     self.G[0].weight, self.G[0].bias, self.G[2].weight, self.G[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.nice_forward(x, *self.weights(), activation=self.activation, recompute=self.recompute,
                                backend=self.backend)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return ops.nice_inverse(y, *self.weights(), activation=self.activation, recompute=self.recompute,
                                backend=self.backend)
