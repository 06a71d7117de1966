"""The four launchers of the kernel contract (``madx_fast/kernels/__init__.py``) on a compiled extension.

The extension (``csrc/ops.cpp``) does the work: input checks, casting the weights to the activation dtype,
allocation on the current CUDA stream, and the kernel sequence. ``make_launchers`` takes the module so the
same launchers run on the real extension and, in the tests, on the CPU-emulated build of the same sources.
"""
from __future__ import annotations

from types import SimpleNamespace


def make_launchers(ext) -> SimpleNamespace:
    def adapter_forward(x, residual, w_down, b_down, w_up, b_up, scaling, activation):
        """-> (y [N, H] x.dtype, z [N, d] x.dtype): z = W_down x + b_down, y = r + s (W_up act(z) + b_up)."""
        y, z = ext.adapter_forward(x, residual, w_down, b_down, w_up, b_up, float(scaling), int(activation))
        return y, z

    def adapter_backward(dy, x, z, w_down, w_up, scaling, activation, residual_is_input):
        """-> (dx, dw_down, db_down, dw_up, db_up); weight gradients float32, dx includes dy if r is x."""
        return tuple(ext.adapter_backward(dy, x, z, w_down, w_up, float(scaling), int(activation),
                                          bool(residual_is_input)))

    def nice_coupling(x, weights, activation, inverse):
        """NICE coupling (inverse=False) or its inverse on [N, H]."""
        return ext.nice_coupling(x, list(weights), int(activation), bool(inverse))

    def nice_coupling_backward(dout, out, inp, weights, activation, inverse):
        """-> (d_inp, df_w1, df_b1, df_w2, df_b2, dg_w1, dg_b1, dg_w2, dg_b2); inp=None rebuilds it from out."""
        return tuple(ext.nice_coupling_backward(dout, out, inp, list(weights), int(activation), bool(inverse)))

    return SimpleNamespace(adapter_forward=adapter_forward, adapter_backward=adapter_backward,
                           nice_coupling=nice_coupling, nice_coupling_backward=nice_coupling_backward)
