"""Public functional ops, registered as torch custom ops with autograd and fake (meta) implementations.

    y = bottleneck_adapter(x, residual, w_down, b_down, w_up, b_up, scaling=1.0, activation="relu")
    y = nice_forward(x, f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2)
    x = nice_inverse(y, f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2)

Per-row (grouped) versions, where row ``b`` of ``x [B, ..., H]`` uses the weights of group ``groups[b]``,
weights stacked over groups ``[G, ...]`` (many languages in one batch):

    y = grouped_bottleneck_adapter(x, residual, groups, w_down, b_down, w_up, b_up, scaling=1.0, activation="relu")
    y = grouped_nice_forward(x, groups, f_w1, ..., g_b2);  x = grouped_nice_inverse(y, groups, f_w1, ..., g_b2)

Averaged adapters (AdapterHub's ``Average``): K adapters on one input, outputs combined with coefficients
``mix [K]`` (or per row: ``mix [G, K]`` with ``groups``), weights stacked over adapters ``[K, ...]``:

    y = average_bottleneck_adapter(x, residual, mix, w_down, b_down, w_up, b_up, groups=None, scaling=1.0)

Residual add + LayerNorm (MAD-X's ``LN(y + a)`` around the adapters of post-LN layers), one kernel:

    out = add_layer_norm(x, residual, weight, bias, eps=1e-5)

A backbone Linear and its activation (a layer's FFN intermediate), one GEMM with the activation in its
epilogue, for inference only (no backward):

    out = dense_activation(x, weight, bias, "gelu")

``backend`` picks the implementation (see ``madx_fast.backends``). The eager backend is the reference in
``madx_fast.reference``; the fused backends run through custom ops (``madx_fast::adapter_forward``,
``madx_fast::nice_coupling``, their grouped versions and backwards), which torch.compile treats as opaque
nodes (no graph break) and whose fake implementations give it the output shapes.

Shapes: ``x, residual: [..., H]``, ``w_down: [d, H]``, ``b_down: [d]``, ``w_up: [H, d]``, ``b_up: [H]``;
NICE ``F: H-H//2 -> hf -> H//2`` and ``G: H//2 -> hg -> H-H//2`` as nn.Linear weights ``[out, in]``, in the
order of ``NiceWeights``. Matrix products run in ``x.dtype`` with float32 accumulation; weight gradients come
back in the weights' dtype (so fp32 master weights work with bf16 activations).

One module per op family, the single op and its grouped version side by side:

* ``adapter.py``: ``bottleneck_adapter``, ``grouped_bottleneck_adapter``
* ``average.py``: ``average_bottleneck_adapter`` (one launch per product for all K adapters)
* ``add_norm.py``: ``add_layer_norm`` (its weight gradients only when the LayerNorm trains)
* ``dense.py``: ``dense_activation`` (inference only)
* ``nice.py``: ``nice_forward`` / ``nice_inverse``, ``grouped_nice_forward`` / ``grouped_nice_inverse``
* ``checks.py``: the input checks both families share (dtype, shape, device, group ids)
* ``dispatch.py``: the custom-op namespace, the backend choice, the launcher lookup and the cast of the
  kernels' float32 weight gradients to the weights' dtype
"""
from ..reference import NiceWeights
from .adapter import bottleneck_adapter, grouped_bottleneck_adapter
from .add_norm import add_layer_norm
from .average import average_bottleneck_adapter
from .dense import dense_activation
from .nice import grouped_nice_forward, grouped_nice_inverse, nice_forward, nice_inverse

__all__ = ["NiceWeights", "add_layer_norm", "average_bottleneck_adapter", "bottleneck_adapter", "dense_activation", "grouped_bottleneck_adapter", "grouped_nice_forward",
           "grouped_nice_inverse", "nice_forward", "nice_inverse"]
