"""Bad input is refused before any kernel runs, with a message naming the problem."""
import pytest
import torch

from madx_fast import ops
from tests.helpers.devices import fused_backends


def adapter_args(n=4, h=16, d=4, dtype=torch.float32):
    return [torch.randn(n, h, dtype=dtype), torch.randn(n, h, dtype=dtype), torch.randn(d, h), torch.randn(d),
            torch.randn(h, d), torch.randn(h)]


@pytest.mark.parametrize("backend", ["eager"] + fused_backends())
@pytest.mark.parametrize("index,bad,match", [
    (2, torch.randn(4, 15), r"w_down has shape \(4, 15\), expected \(4, 16\)"),
    (4, torch.randn(16, 5), r"w_up has shape \(16, 5\), expected \(16, 4\)"),
    (3, torch.randn(5), r"b_down has shape \(5,\)"),
    (5, torch.randn(17), r"b_up has shape"),
    (1, torch.randn(4, 17), r"residual has shape"),
    (1, torch.randn(4, 16, dtype=torch.float16), r"residual has dtype torch.float16"),
    (0, torch.randint(0, 3, (4, 16)), r"x has dtype torch.int64"),
    (2, torch.randn(4, 16, 1), r"w_down must be 2-D"),
])
def test_adapter_bad_input(backend, index, bad, match):
    args = adapter_args()
    args[index] = bad
    with pytest.raises((ValueError, TypeError), match=match):
        ops.bottleneck_adapter(*args, backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to have two devices")
def test_adapter_mixed_devices():
    args = adapter_args()
    args[2] = args[2].cuda()
    with pytest.raises(ValueError, match="one device"):
        ops.bottleneck_adapter(*args)


def test_adapter_mixed_devices_meta():
    args = adapter_args()
    args[4] = torch.empty(16, 4, device="meta")
    with pytest.raises(ValueError, match=r"w_up on meta"):
        ops.bottleneck_adapter(*args, backend="eager")


def nice_args(h=16):
    return [torch.randn(3, h), torch.randn(4, 8), torch.randn(4), torch.randn(8, 4), torch.randn(8),
            torch.randn(4, 8), torch.randn(4), torch.randn(8, 4), torch.randn(8)]


@pytest.mark.parametrize("backend", ["eager"] + fused_backends())
@pytest.mark.parametrize("index,bad,match", [
    (0, torch.randn(3, 18), r"f_w1 has shape \(4, 8\), expected \(4, 9\)"),
    (3, torch.randn(7, 4), r"f_w2 has shape \(7, 4\), expected \(8, 4\)"),
    (6, torch.randn(3), r"g_b1 has shape \(3,\), expected \(4,\)"),
    (0, torch.randn(3, 1), r"last dimension of at least 2"),
    (8, torch.randn(8).half(), None),
])
def test_nice_bad_input(backend, index, bad, match):
    args = nice_args()
    args[index] = bad
    if match is None:  # mixed weight dtypes are allowed: weights are cast to the activation dtype
        ops.nice_forward(*args, backend=backend)
        return
    with pytest.raises((ValueError, TypeError), match=match):
        ops.nice_forward(*args, backend=backend)
