"""The CUDA sources on the CPU emulator (tests/helpers/cuda.py), no GPU needed: the kernels' indexing, bounds
checks, barriers, split-K reductions and the whole launcher / autograd path against madx_fast.reference."""
from __future__ import annotations

import pytest
import torch

from madx_fast import ops, reference
from tests.helpers.cuda import (
    ACTIVATIONS,
    CSRC,
    NICE_MODES,
    adapter_inputs,
    build,
    build_emulator,
    check_adapter,
    check_nice,
    check_nice_backward_at_rebuilt_input,
    nan_padded,
    nice_inputs,
)

EMU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16 works here: it is our C++, not Triton


@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=str)
@pytest.mark.parametrize("n,h,d", [(1, 64, 4), (7, 96, 48), (300, 96, 48), (33, 70, 65), (5, 768, 48)])
@pytest.mark.parametrize("residual", [True, False])
def test_emulated_adapter_parity(emulator, dtype, n, h, d, residual):
    check_adapter("cuda", n, h, d, dtype, "cpu", residual=residual)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_adapter_activations(emulator, activation, dtype):
    check_adapter("cuda", 19, 40, 9, dtype, "cpu", residual=False, activation=activation, scaling=1.3)


@pytest.mark.parametrize("h,dtype", [(96, torch.float16), (768, torch.bfloat16)], ids=str)
def test_emulated_adapter_large_bottleneck_and_splitk(emulator, h, dtype):
    # d = 384: six 64-wide tiles; 1000 tokens give several split-K slices for the weight gradients.
    check_adapter("cuda", 1000, h, 384, dtype, "cpu", seed=h)


def test_emulated_adapter_mixed_weight_dtype(emulator):
    check_adapter("cuda", 9, 64, 8, torch.float16, "cpu", weight_dtype=torch.float32)


@pytest.mark.parametrize("residual", [True, False])
def test_emulated_adapter_out_of_bounds_reads_and_strides(emulator, residual):
    # Inputs live inside NaN-filled buffers with a row stride > H; any stray read shows up as NaN.
    check_adapter("cuda", 37, 72, 12, torch.float32, "cpu", residual=residual, transform=nan_padded)


def test_emulated_adapter_column_strided_input(emulator):
    check_adapter("cuda", 11, 64, 8, torch.float32, "cpu", transform=lambda t: t.t().contiguous().t())


def test_emulated_adapter_zero_tokens(emulator):
    x, r, wd, bd, wu, bu = adapter_inputs(0, 64, 4, torch.float32, "cpu")
    params = [t.requires_grad_() for t in (wd, bd, wu, bu)]
    x.requires_grad_()
    y = ops.bottleneck_adapter(x, None, *params, backend="cuda")
    assert y.shape == (0, 64)
    y.sum().backward()
    assert x.grad.shape == (0, 64)
    for p in params:
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("dtype,recompute", NICE_MODES, ids=str)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("n,h", [(1, 64), (7, 96), (70, 97)])
def test_emulated_nice_parity(emulator, dtype, recompute, inverse, n, h):
    check_nice("cuda", n, h, dtype, "cpu", inverse, recompute)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("n,h", [(7, 96), (70, 97)])
def test_emulated_nice_recompute_low_precision(emulated_launchers, dtype, inverse, n, h):
    check_nice_backward_at_rebuilt_input(emulated_launchers, n, h, dtype, "cpu", inverse)


@pytest.mark.parametrize("activation", ["gelu", "tanh", "silu"])
def test_emulated_nice_activations(emulator, activation):
    check_nice("cuda", 13, 32, torch.float32, "cpu", inverse=True, recompute=True, activation=activation)


def test_emulated_nice_out_of_bounds_reads(emulator):
    check_nice("cuda", 21, 50, torch.float32, "cpu", inverse=False, recompute=False, transform=nan_padded)


@pytest.mark.parametrize("h", [3, 6, 64, 97])  # h = 3: G has a zero-width hidden layer
def test_emulated_nice_roundtrip(emulator, h):
    x, weights = nice_inputs(25, h, torch.float32, "cpu")
    y = ops.nice_forward(x, *weights, backend="cuda")
    assert torch.allclose(ops.nice_inverse(y, *weights, backend="cuda"), x, atol=1e-5, rtol=1e-5)
    assert torch.allclose(y, reference.nice_forward_reference(x, *weights), atol=1e-5, rtol=1e-5)


def test_emulated_module_knows_its_sources():
    ext = build_emulator()
    assert ext.SOURCE_DIGEST == build.source_digest(CSRC)  # the digest define survives the build
    assert build.stale_reason(ext) is None


def test_emulated_launcher_contract(emulated_launchers):
    """Shapes and dtypes exactly as madx_fast/kernels/__init__.py specifies, straight from the launchers."""
    x, r, wd, bd, wu, bu = adapter_inputs(10, 64, 6, torch.bfloat16, "cpu", weight_dtype=torch.float32)
    y, z = emulated_launchers.adapter_forward(x, r, wd, bd, wu, bu, 1.0, reference.ACTIVATION_CODES["relu"])
    assert (y.shape, y.dtype, z.shape, z.dtype) == ((10, 64), torch.bfloat16, (10, 6), torch.bfloat16)
    grads = emulated_launchers.adapter_backward(torch.randn_like(y), x, z, wd, wu, 1.0, 1, True)
    assert [tuple(g.shape) for g in grads] == [(10, 64), (6, 64), (6,), (64, 6), (64,)]
    assert [g.dtype for g in grads] == [torch.bfloat16] + [torch.float32] * 4
    xn, weights = nice_inputs(10, 64, torch.float16, "cpu")
    out = emulated_launchers.nice_coupling(xn, tuple(weights), 1, False)
    assert out.shape == xn.shape and out.dtype == torch.float16
    grads = emulated_launchers.nice_coupling_backward(torch.randn_like(out), out, None, tuple(weights), 1, False)
    assert len(grads) == 9 and grads[0].dtype == torch.float16
    assert [tuple(g.shape) for g in grads[1:]] == [tuple(w.shape) for w in weights]
    assert all(g.dtype == torch.float32 for g in grads[1:])


def test_emulated_bad_inputs_are_named(emulated_launchers):
    x, r, wd, bd, wu, bu = adapter_inputs(4, 16, 2, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="unknown activation code 9"):
        emulated_launchers.adapter_forward(x, r, wd, bd, wu, bu, 1.0, 9)
    with pytest.raises(RuntimeError, match="w_up has shape"):
        emulated_launchers.adapter_forward(x, r, wd, bd, wu[:8], bu, 1.0, 1)
    with pytest.raises(RuntimeError, match="residual has dtype"):
        emulated_launchers.adapter_forward(x, r.half(), wd, bd, wu, bu, 1.0, 1)
