"""bfloat16 on the Triton backend without a GPU is refused with a clear error, not computed wrongly.

Triton's CPU interpreter (TRITON_INTERPRET=1, how CI runs the kernels) gets bfloat16 arithmetic wrong;
the ops say so (naming bfloat16, the interpreter and what to use instead) before any kernel runs. On a GPU
bfloat16 keeps running on the Triton kernels. The command-line side is in
tests/training/test_bf16_interpreter.py."""
from __future__ import annotations

import pytest
import torch

from madx_fast import BackendUnavailableError, ops, reference
from madx_fast.backends import BackendDtypeError, check_backend_dtype, resolve_backend
from tests.helpers.devices import GPU

CPU = torch.device("cpu")


def adapter_args(dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=g).to(device, dtype)
    w = [torch.randn(4, 16, generator=g), torch.zeros(4), torch.randn(16, 4, generator=g), torch.zeros(16)]
    return x, [t.to(device) for t in w]  # fp32 master weights, as the model keeps them


def nice_args(dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 8), (4,), (8, 4), (8,), (4, 8), (4,), (8, 4), (8,)]
    return torch.randn(5, 16, generator=g).to(device, dtype), [0.1 * torch.randn(s, generator=g).to(device)
                                                              for s in shapes]


def assert_clear(exc: pytest.ExceptionInfo):
    msg = str(exc.value)
    for words in ("bfloat16", "interpreter", "TRITON_INTERPRET=1", "float32", "eager", "GPU"):
        assert words in msg, msg


@pytest.mark.skipif(GPU, reason="the interpreter case: CPU tensors without a GPU")
@pytest.mark.parametrize("backend", ["triton", "auto", None])
def test_adapter_refuses_bf16_on_the_interpreter(backend):
    x, w = adapter_args(torch.bfloat16)
    x.requires_grad_()
    with pytest.raises(BackendDtypeError) as exc:
        ops.bottleneck_adapter(x, None, *w, backend=backend)
    assert_clear(exc)
    assert x.grad is None


@pytest.mark.skipif(GPU, reason="the interpreter case: CPU tensors without a GPU")
@pytest.mark.parametrize("inverse", [False, True])
def test_nice_refuses_bf16_on_the_interpreter(inverse):
    x, w = nice_args(torch.bfloat16)
    with pytest.raises(BackendDtypeError) as exc:
        (ops.nice_inverse if inverse else ops.nice_forward)(x, *w, backend="triton")
    assert_clear(exc)


@pytest.mark.skipif(GPU, reason="the interpreter case: CPU tensors without a GPU")
def test_grouped_ops_refuse_bf16_on_the_interpreter():
    """The per-row ops run the same kernels' arithmetic: refused alike, before any kernel runs."""
    x, w = adapter_args(torch.bfloat16)
    groups = torch.tensor([0, 1, 0, 1, 1])
    stacked = [torch.stack([t, t + 1]) for t in w]
    with pytest.raises(BackendDtypeError) as exc:
        ops.grouped_bottleneck_adapter(x, None, groups, *stacked, backend="triton")
    assert_clear(exc)
    xn, wn = nice_args(torch.bfloat16)
    for fn in (ops.grouped_nice_forward, ops.grouped_nice_inverse):
        with pytest.raises(BackendDtypeError) as exc:
            fn(xn, groups, *[torch.stack([t, t]) for t in wn], backend="triton")
        assert_clear(exc)


@pytest.mark.skipif(GPU, reason="the interpreter case: CPU tensors without a GPU")
def test_the_refusal_is_a_backend_error_and_a_value_error():
    """Callers that catch BackendUnavailableError (backend fallbacks) or ValueError (the madx command line's
    one-line errors) both see it."""
    name = resolve_backend("auto", CPU)
    assert name == "triton"
    with pytest.raises(BackendUnavailableError):
        check_backend_dtype(name, CPU, torch.bfloat16)
    with pytest.raises(ValueError):
        check_backend_dtype(name, CPU, torch.bfloat16)


@pytest.mark.skipif(GPU, reason="the interpreter case: CPU tensors without a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_other_dtypes_still_run_on_the_interpreter(dtype):
    x, w = adapter_args(dtype)
    y = ops.bottleneck_adapter(x, None, *w, backend="triton")
    want = reference.bottleneck_adapter_reference(x, None, *w)
    assert torch.allclose(y.float(), want.float(), atol=1e-2, rtol=1e-2)


def test_bf16_stays_available_where_it_is_right():
    """The eager reference computes bf16 on the CPU; the Triton backend takes bf16 CUDA tensors (no GPU is
    needed to resolve the backend for a CUDA device)."""
    x, w = adapter_args(torch.bfloat16)
    y = ops.bottleneck_adapter(x, None, *w, backend="eager")
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    check_backend_dtype("triton", torch.device("cuda"), torch.bfloat16)
    check_backend_dtype("eager", CPU, torch.bfloat16)
    check_backend_dtype("cuda", CPU, torch.bfloat16)  # the CUDA sources' CPU emulator computes bf16 right


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: bfloat16 on the real Triton kernels")
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_bf16_runs_on_the_gpu(backend):
    x, w = adapter_args(torch.bfloat16, "cuda")
    y = ops.bottleneck_adapter(x, None, *w, backend=backend)
    want = reference.bottleneck_adapter_reference(x.float(), None, *w)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - want).norm() / want.norm()).item() < 2e-2
    xn, wn = nice_args(torch.bfloat16, "cuda")
    yn = ops.nice_forward(xn, *wn, backend=backend)
    wantn = reference.nice_forward_reference(xn.float(), *wn)
    assert ((yn.float() - wantn).norm() / wantn.norm()).item() < 2e-2
