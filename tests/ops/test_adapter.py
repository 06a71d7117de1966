"""Fused bottleneck adapter vs the eager reference: forward and every gradient."""
import math

import pytest
import torch

from madx_fast import ops, reference
from tests.helpers.devices import DEVICE, dtypes, fused_backends
from tests.helpers.parity import check_parity

NAMES_R = ["dx", "dw_down", "db_down", "dw_up", "db_up", "dresidual"]
NAMES_X = ["dx", "dw_down", "db_down", "dw_up", "db_up"]


def make_inputs(n, h, d, dtype, residual=True, weight_dtype=None, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    wdt = weight_dtype or dtype
    shape = (n, h) if lead is None else (*lead, h)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    r = torch.randn(shape, generator=g).to(DEVICE, dtype) if residual else None
    w_down = (torch.randn(d, h, generator=g) / math.sqrt(h)).to(DEVICE, wdt)
    b_down = (0.1 * torch.randn(d, generator=g)).to(DEVICE, wdt)
    w_up = (torch.randn(h, d, generator=g) / math.sqrt(d)).to(DEVICE, wdt)
    b_up = (0.1 * torch.randn(h, generator=g)).to(DEVICE, wdt)
    return x, r, w_down, b_down, w_up, b_up


def fused_fn(backend, scaling=0.7, activation="relu"):
    def f(x, r, wd, bd, wu, bu):
        return ops.bottleneck_adapter(x, r, wd, bd, wu, bu, scaling=scaling, activation=activation, backend=backend)
    return f


def ref_fn(scaling=0.7, activation="relu"):
    def f(x, r, wd, bd, wu, bu):
        return reference.bottleneck_adapter_reference(x, r, wd, bd, wu, bu, scaling, activation)
    return f


def reorder(inputs):
    """check_parity wants x first and None-free trailing grads: put the residual last."""
    x, r, wd, bd, wu, bu = inputs
    return [x, wd, bd, wu, bu, r]


def unorder(f):
    return lambda x, wd, bd, wu, bu, r: f(x, r, wd, bd, wu, bu)


SHAPES = [  # (tokens, hidden, bottleneck): none is a multiple of every block size
    (1, 64, 4),
    (7, 96, 48),
    (1000, 768, 48),
    (1000, 768, 384),
    (257, 1024, 192),
    (33, 96, 384),
]


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("n,h,d", SHAPES)
def test_adapter_matches_reference(backend, dtype, n, h, d):
    inputs = reorder(make_inputs(n, h, d, dtype))
    check_parity(unorder(fused_fn(backend)), unorder(ref_fn()), inputs, dtype, NAMES_R)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "silu", "tanh", "linear", "leakyrelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_adapter_activations(backend, activation, dtype):
    inputs = reorder(make_inputs(77, 96, 48, dtype, seed=1))
    check_parity(unorder(fused_fn(backend, 1.3, activation)), unorder(ref_fn(1.3, activation)), inputs, dtype,
                 NAMES_R)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("residual_mode", ["none", "same_tensor"])
def test_adapter_residual_is_input(backend, dtype, residual_mode):
    """r = x: one tensor read in forward, dy added inside the dx kernel; dx must include that path."""
    x, _, wd, bd, wu, bu = make_inputs(300, 96, 48, dtype, residual=False, seed=2)

    def fused(x, wd, bd, wu, bu):
        r = None if residual_mode == "none" else x
        return ops.bottleneck_adapter(x, r, wd, bd, wu, bu, scaling=0.5, backend=backend)

    def ref(x, wd, bd, wu, bu):
        return reference.bottleneck_adapter_reference(x, x, wd, bd, wu, bu, 0.5, "relu")

    check_parity(fused, ref, [x, wd, bd, wu, bu], dtype, NAMES_X)


@pytest.mark.parametrize("backend", fused_backends())
def test_adapter_leading_dims_and_noncontiguous(backend):
    """[B, L, H] inputs, a row-strided x (a slice of a wider tensor) and a column-strided residual."""
    x, r, wd, bd, wu, bu = make_inputs(5 * 13, 96, 48, torch.float32, seed=3)
    wide = torch.randn(5, 13, 2 * 96, device=DEVICE)
    wide[..., :96] = x.view(5, 13, 96)
    x_nc = wide[..., :96]
    r_nc = r.view(5, 13, 96).transpose(0, 1).contiguous().transpose(0, 1)
    assert not x_nc.is_contiguous() and not r_nc.is_contiguous()
    check_parity(unorder(fused_fn(backend)), unorder(ref_fn()), [x_nc, wd, bd, wu, bu, r_nc], torch.float32,
                 NAMES_R)


@pytest.mark.parametrize("backend", fused_backends())
def test_adapter_transposed_input(backend):
    """A column-major [N, H] input (stride (1, N))."""
    x, r, wd, bd, wu, bu = make_inputs(70, 64, 4, torch.float32, seed=4)
    x_t = x.t().contiguous().t()
    assert x_t.stride() == (1, 70)
    check_parity(unorder(fused_fn(backend)), unorder(ref_fn()), [x_t, wd, bd, wu, bu, r], torch.float32, NAMES_R)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="bf16 needs a GPU"))])
def test_adapter_fp32_master_weights(backend, dtype):
    """Low-precision activations with fp32 weights: products in the activation dtype, grads in fp32."""
    inputs = reorder(make_inputs(200, 96, 48, dtype, weight_dtype=torch.float32, seed=5))
    _, grads = check_parity(unorder(fused_fn(backend)), unorder(ref_fn()), inputs, dtype, NAMES_R)
    assert grads[1].dtype == torch.float32 and grads[0].dtype == dtype


@pytest.mark.parametrize("backend", fused_backends())
def test_adapter_zero_tokens(backend):
    x, r, wd, bd, wu, bu = make_inputs(0, 64, 4, torch.float32)
    leaves = [t.requires_grad_() for t in (x, r, wd, bd, wu, bu)]
    y = ops.bottleneck_adapter(*leaves, backend=backend)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() == 0 for t in leaves[2:])


@pytest.mark.parametrize("backend", fused_backends())
def test_adapter_deterministic(backend):
    x, r, wd, bd, wu, bu = make_inputs(1000, 96, 48, torch.float32, seed=6)
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (x, r, wd, bd, wu, bu)]
        y = ops.bottleneck_adapter(*leaves, backend=backend)
        y.backward(torch.ones_like(y))
        runs.append([y] + [t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_adapter_small_blocks_multi_split():
    """The launchers with tiny blocks and several token splits: every loop and mask path runs."""
    from madx_fast.kernels import triton as tk

    x, r, wd, bd, wu, bu = make_inputs(203, 100, 20, torch.float32, seed=7)
    act = reference.ACTIVATION_CODES["gelu"]
    y, z = tk.adapter_forward(x, r, wd, bd, wu, bu, 0.9, act, block_m=16, block_h=32)
    ref = reference.bottleneck_adapter_reference(x.double(), r.double(), wd.double(), bd.double(), wu.double(),
                                                 bu.double(), 0.9, "gelu")
    assert torch.allclose(y.double(), ref, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(y)
    got = tk.adapter_backward(dy, x, z, wd, wu, 0.9, act, False, block_m=16, block_h=32, splits=5)
    leaves = [t.double().requires_grad_() for t in (x, wd, bd, wu, bu)]
    ref = reference.bottleneck_adapter_reference(leaves[0], r.double(), *leaves[1:], 0.9, "gelu")
    want = torch.autograd.grad(ref, leaves, dy.double())
    for name, a, b in zip(NAMES_X, got, want):
        assert torch.allclose(a.double(), b, atol=1e-4, rtol=1e-4), name


@pytest.mark.slow
@pytest.mark.parametrize("backend", fused_backends())
def test_adapter_many_tokens(backend):
    inputs = reorder(make_inputs(65536, 64, 48, torch.float16, seed=8))
    check_parity(unorder(fused_fn(backend)), unorder(ref_fn()), inputs, torch.float16, NAMES_R)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("activation", ["gelu", "silu", "leakyrelu"])
def test_adapter_wide_bottleneck_path(backend, activation):
    """d > 128 runs as GEMMs with fused epilogues: every epilogue, with r = x and with a strided x."""
    x, _, wd, bd, wu, bu = make_inputs(300, 96, 160, torch.float32, residual=False, seed=9)
    x_nc = torch.cat([x, torch.randn_like(x)], dim=1)[:, :96]

    def fused(x, wd, bd, wu, bu):
        return ops.bottleneck_adapter(x, x, wd, bd, wu, bu, scaling=0.6, activation=activation, backend=backend)

    def ref(x, wd, bd, wu, bu):
        return reference.bottleneck_adapter_reference(x, x, wd, bd, wu, bu, 0.6, activation)

    check_parity(fused, ref, [x_nc, wd, bd, wu, bu], torch.float32, NAMES_X)
