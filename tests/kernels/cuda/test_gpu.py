"""The real CUDA extension on a GPU: parity for every dtype and the target shapes, non-contiguous inputs,
N = 0, determinism, inverse(forward(x)). Skipped with a reason when torch.cuda.is_available() is False."""
from __future__ import annotations

import pytest
import torch

from madx_fast import ops
from tests.helpers.cuda import (
    ACTIVATIONS,
    NICE_MODES,
    adapter_inputs,
    check_adapter,
    check_nice,
    check_nice_backward_at_rebuilt_input,
    nan_padded,
    nice_inputs,
)

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_SHAPES = [(n, h, d) for n in (1, 7, 1000) for h in (64, 96, 768) for d in (4, 48, 384)]


@needs_gpu
@pytest.mark.gpu
def test_gpu_backend_loads():
    from madx_fast.backends import kernel_module

    module = kernel_module("cuda")
    assert not module._C.EMULATED


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("n,h,d", GPU_SHAPES)
def test_gpu_adapter_parity(dtype, n, h, d):
    # One seed per shape; with n = 1, d = 4 some draws switch every ReLU off, which makes the down-projection
    # gradients exactly zero (check_parity rejects such vacuous comparisons): these seeds do not.
    check_adapter("cuda", n, h, d, dtype, "cuda", residual=(n % 2 == 1), seed=n + h + d)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_adapter_activations(activation, dtype):
    check_adapter("cuda", 1000, 768, 48, dtype, "cuda", residual=False, activation=activation)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_adapter_non_contiguous(dtype):
    check_adapter("cuda", 1000, 768, 48, dtype, "cuda", transform=nan_padded)
    check_adapter("cuda", 1000, 96, 48, dtype, "cuda", transform=lambda t: t.t().contiguous().t())


@needs_gpu
@pytest.mark.gpu
def test_gpu_adapter_mixed_weight_dtype():
    check_adapter("cuda", 1000, 768, 48, torch.bfloat16, "cuda", weight_dtype=torch.float32)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("d", [4, 384])
def test_gpu_adapter_zero_tokens(d):
    x, r, wd, bd, wu, bu = adapter_inputs(0, 768, d, torch.bfloat16, "cuda")
    params = [t.requires_grad_() for t in (wd, bd, wu, bu)]
    x.requires_grad_()
    y = ops.bottleneck_adapter(x, None, *params, backend="cuda")
    assert y.shape == (0, 768)
    y.sum().backward()
    assert x.grad.shape == (0, 768)
    for p in params:
        assert torch.equal(p.grad, torch.zeros_like(p))


@needs_gpu
@pytest.mark.gpu
def test_gpu_weight_gradients_are_deterministic():
    x, r, wd, bd, wu, bu = adapter_inputs(4099, 768, 384, torch.bfloat16, "cuda")
    runs = []
    for _ in range(2):
        params = [t.detach().clone().requires_grad_() for t in (x, wd, bd, wu, bu)]
        y = ops.bottleneck_adapter(params[0], r, *params[1:], backend="cuda")
        y.backward(torch.ones_like(y))
        runs.append([p.grad for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,recompute", NICE_MODES, ids=str)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("n,h", [(1, 64), (7, 96), (1000, 768), (1000, 97)])
def test_gpu_nice_parity(dtype, recompute, inverse, n, h):
    check_nice("cuda", n, h, dtype, "cuda", inverse, recompute)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("n,h", [(7, 96), (1000, 768), (1000, 97)])
def test_gpu_nice_recompute_low_precision(dtype, inverse, n, h):
    from madx_fast.backends import kernel_module

    check_nice_backward_at_rebuilt_input(kernel_module("cuda"), n, h, dtype, "cuda", inverse)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_nice_non_contiguous(dtype):
    check_nice("cuda", 1000, 768, dtype, "cuda", inverse=False, recompute=False, transform=nan_padded)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 6e-2)],
                         ids=str)
def test_gpu_nice_roundtrip(dtype, atol):
    x, weights = nice_inputs(1000, 768, dtype, "cuda")
    y = ops.nice_forward(x, *weights, backend="cuda")
    back = ops.nice_inverse(y, *weights, backend="cuda")
    assert torch.allclose(back.float(), x.float(), atol=atol, rtol=atol)


@needs_gpu
@pytest.mark.gpu
def test_gpu_nice_zero_tokens():
    x, weights = nice_inputs(0, 768, torch.float16, "cuda")
    params = [w.requires_grad_() for w in weights]
    y = ops.nice_forward(x.requires_grad_(), *params, backend="cuda")
    y.sum().backward()
    assert y.shape == (0, 768) and x.grad.shape == (0, 768)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)
