"""Fused backends. Each subpackage (``triton``, ``cuda``) exposes the same four launchers, called by the
custom ops in ``madx_fast.ops`` on 2-D inputs ``[N, H]`` (any row/column strides, N may be 0):

    adapter_forward(x, residual_or_None, w_down, b_down, w_up, b_up, scaling: float, activation: int)
        -> (y [N, H] in x.dtype, z [N, d] pre-activation in x.dtype)
    adapter_backward(dy, x, z, w_down, w_up, scaling, activation, residual_is_input: bool)
        -> (dx [N, H] x.dtype, dw_down [d, H], db_down [d], dw_up [H, d], db_up [H], all float32)
        (dx includes dy when residual_is_input)
    nice_coupling(x, weights, activation, inverse: bool) -> out [N, H]
    nice_coupling_backward(dout, out, inp_or_None, weights, activation, inverse)
        -> (d_inp, df_w1, df_b1, df_w2, df_b2, dg_w1, dg_b1, dg_w2, dg_b2) weight grads float32;
        inp=None rebuilds the input from `out` by inverting the coupling.

Grouped (per-row) launchers, Triton only (the CUDA backend has none): ``x: [B*L, H]`` is B sequence rows of
L tokens, ``groups: [B]`` int32/int64 ids on the device, weights stacked over groups ``[G, ...]``:

    grouped_adapter_forward(x, residual_or_None, groups, w_down, b_down, w_up, b_up, scaling, activation)
        -> (y, z) as adapter_forward
    grouped_adapter_backward(dy, x, z, groups, w_down, w_up, scaling, activation, residual_is_input,
                             weight_grads: bool) -> (dx, dw_down [G, d, H], db_down, dw_up, db_up) float32
    grouped_nice_coupling(x, groups, weights, activation, inverse) -> out
    grouped_nice_coupling_backward(dout, out, inp_or_None, groups, weights, activation, inverse, weight_grads)
        -> (d_inp, 8 weight grads [G, ...] float32)
    (weight_grads=False: only the input gradient is computed; the weight grads are empty tensors)

Averaged adapters (AdapterHub's ``Average``), Triton only: K adapters per token combined with coefficients
``mix [K]`` (per row: ``groups`` and ``mix [G, K]``), weights stacked ``[K, ...]`` (``[G, K, ...]``):

    average_adapter_forward(x, residual_or_None, groups_or_None, mix, w_down, b_down, w_up, b_up, scaling,
                            activation) -> (y [N, H], z [N, K*d])
    average_adapter_backward(dy, x, z, residual_or_None, groups_or_None, mix, w_down, w_up, b_up, scaling,
                             activation, residual_is_input, weight_grads, mix_grad)
        -> (dx, dr (empty when residual_is_input), dw_down, db_down, dw_up, db_up, dmix) float32 grads

``weights`` = (f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2); activation codes in
``madx_fast.reference.ACTIVATION_CODES``. Backends never import each other; both are checked against
``madx_fast.reference``.
"""
import os


def triton_interpreter_enabled() -> bool:
    """Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``; how CI checks them)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
