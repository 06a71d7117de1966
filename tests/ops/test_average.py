"""The averaged-adapter op (AdapterHub's ``Average``: K adapters combined with coefficients) on the fused Triton
kernels vs the eager reference: forward and every gradient (the coefficients' included), fp32 and fp16, shapes
that are no multiple of the block sizes, one ensemble for the batch and per-row ensembles; it equals K
single-adapter calls and a weighted sum; NaN/Inf stay in their group; frozen weights; empty batches; errors."""
import math

import pytest
import torch

from madx_fast import ops, reference
from madx_fast.backends import BackendUnavailableError
from tests.helpers.devices import DEVICE, needs_gpu
from tests.helpers.parity import check_parity

GRADS = ["dx", "dmix", "dw_down", "db_down", "dw_up", "db_up", "dresidual"]


def inputs(b, length, h, d, k, dtype, groups=None, seed=0):
    """``[x, mix, w_down, b_down, w_up, b_up, residual]``; weights ``[K, ...]`` or ``[G, K, ...]``."""
    gen = torch.Generator().manual_seed(seed)
    lead = (k,) if groups is None else (groups, k)
    x = torch.randn(b, length, h, generator=gen).to(DEVICE, dtype)
    r = torch.randn(b, length, h, generator=gen).to(DEVICE, dtype)
    mix = (0.2 + torch.rand(lead, generator=gen)).to(DEVICE)
    w_down = (torch.randn(*lead, d, h, generator=gen) / math.sqrt(h)).to(DEVICE, dtype)
    b_down = (0.1 * torch.randn(*lead, d, generator=gen)).to(DEVICE, dtype)
    w_up = (torch.randn(*lead, h, d, generator=gen) / math.sqrt(d)).to(DEVICE, dtype)
    b_up = (0.1 * torch.randn(*lead, h, generator=gen)).to(DEVICE, dtype)
    return [x, mix, w_down, b_down, w_up, b_up, r]


def fused(groups=None, scaling=0.7, activation="relu", backend="triton"):
    def f(x, mix, wd, bd, wu, bu, r):
        return ops.average_bottleneck_adapter(x, r, mix, wd, bd, wu, bu, groups=groups, scaling=scaling,
                                              activation=activation, backend=backend)
    return f


def ref(groups=None, scaling=0.7, activation="relu"):
    def f(x, mix, wd, bd, wu, bu, r):
        return reference.average_bottleneck_adapter_reference(x, r, mix, wd, bd, wu, bu, scaling, activation,
                                                              groups=groups)
    return f


# (rows, tokens per row, hidden, bottleneck, adapters): odd sizes, narrow and wide bottlenecks, K = 1..8
CASES = [(3, 7, 48, 24, 2), (2, 13, 40, 160, 3), (4, 5, 64, 8, 8), (1, 33, 24, 12, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_gpu)])
@pytest.mark.parametrize("b,length,h,d,k", CASES)
def test_average_matches_reference(dtype, b, length, h, d, k):
    check_parity(fused(), ref(), inputs(b, length, h, d, k, dtype), dtype, GRADS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_row_ensembles_match_reference(dtype):
    groups = torch.tensor([2, 0, 2, 1, 2], device=DEVICE)
    check_parity(fused(groups, activation="gelu"), ref(groups, activation="gelu"),
                 inputs(5, 9, 56, 40, 3, dtype, groups=3), dtype, GRADS)


def test_residual_is_input_and_activations():
    x, mix, wd, bd, wu, bu, _ = inputs(3, 11, 40, 24, 3, torch.float32, seed=1)
    for activation in ("tanh", "silu"):
        f = fused(activation=activation, scaling=1.3)
        g = ref(activation=activation, scaling=1.3)
        check_parity(lambda x, m, *w: f(x, m, *w, x), lambda x, m, *w: g(x, m, *w, None), [x, mix, wd, bd, wu, bu],
                     torch.float32, GRADS[:6])


def test_equals_k_single_adapter_calls_and_a_weighted_sum():
    x, mix, wd, bd, wu, bu, r = inputs(3, 10, 64, 136, 4, torch.float32, seed=2)
    y = fused()(x, mix, wd, bd, wu, bu, r)
    want = sum(mix[k] * ops.bottleneck_adapter(x, r, wd[k], bd[k], wu[k], bu[k], scaling=0.7, backend="triton")
               for k in range(4))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def _grads(fn, tensors, dy, want=None):
    leaves = [t.detach().clone().requires_grad_(want is None or i in want) for i, t in enumerate(tensors)]
    out = fn(*leaves)
    needed = [t for t in leaves if t.requires_grad]
    return [out] + list(torch.autograd.grad(out, needed, dy))


def test_frozen_weights_and_fixed_coefficients_compute_only_what_is_needed():
    """Test-time ensembling: gradients of x and the coefficients only (weights frozen); inference with fixed
    coefficients: x only. Each equals the reference's."""
    tensors = inputs(2, 9, 48, 32, 3, torch.float32, seed=4)
    dy = torch.randn_like(tensors[0])
    for want in ({0, 1}, {0}, {1}):
        got = _grads(fused(), tensors, dy, want)
        exp = _grads(ref(), tensors, dy, want)
        for a, b in zip(got, exp):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_nan_and_inf_stay_in_their_group():
    groups = torch.tensor([1, 0, 1, 2], device=DEVICE)
    x, mix, wd, bd, wu, bu, r = inputs(4, 6, 40, 20, 2, torch.float32, groups=3, seed=5)
    wd[0, 1, 3, 5] = float("nan")  # group 0's second adapter
    x[2, 4, 7] = float("inf")       # a token of a group-1 row
    dy = torch.randn_like(x)
    got = _grads(fused(groups), [x, mix, wd, bd, wu, bu, r], dy)
    exp = _grads(ref(groups), [x, mix, wd, bd, wu, bu, r], dy)
    y = got[0]
    assert torch.isnan(y[1]).any() and not torch.isnan(y[[0, 3]]).any()  # group 0's row only ...
    assert torch.isfinite(y[3]).all()                                      # ... and group 2 untouched
    for a, b in zip(got, exp):  # and exactly where the reference has them
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    dmix, dwd = got[2], got[3]
    assert torch.isfinite(dmix[2]).all() and torch.isfinite(dwd[2]).all()


def test_empty_batch_and_zero_padded_members():
    x, mix, wd, bd, wu, bu, r = inputs(2, 5, 32, 16, 2, torch.float32, seed=6)
    empty = [t[:0] if i in (0, 6) else t for i, t in enumerate([x, mix, wd, bd, wu, bu, r])]
    got = _grads(fused(), empty, torch.empty_like(empty[0]))
    assert got[0].shape == (0, 5, 32) and all(torch.equal(g, torch.zeros_like(g)) for g in got[2:] if g.dim())
    # a member padded with a zero-weight adapter of coefficient 0 changes nothing
    pad = [torch.cat([t, torch.zeros_like(t[:1])]) for t in (mix, wd, bd, wu, bu)]
    torch.testing.assert_close(fused()(x, pad[0], *pad[1:], r), fused()(x, mix, wd, bd, wu, bu, r))


def test_bad_inputs_are_named():
    x, mix, wd, bd, wu, bu, r = inputs(2, 5, 32, 16, 2, torch.float32)
    f = fused()
    with pytest.raises(ValueError, match="mix has shape"):
        f(x, mix[:1], wd, bd, wu, bu, r)
    with pytest.raises(ValueError, match="w_down must be 3-D"):
        f(x, mix, wd[0], bd, wu, bu, r)
    with pytest.raises(ValueError, match="w_up has shape"):
        f(x, mix, wd, bd, wu[:, :, :3], bu, r)
    with pytest.raises(ValueError, match="outside"):
        ops.average_bottleneck_adapter(x, r, mix[None], wd[None], bd[None], wu[None], bu[None],
                                       groups=torch.tensor([0, 1]), backend="triton")
    with pytest.raises(BackendUnavailableError, match="cuda"):  # no CUDA C++ kernels for it (nor, here, a GPU)
        fused(backend="cuda")(x, mix, wd, bd, wu, bu, r)
