"""Fused NICE coupling (forward and inverse) vs the eager reference: outputs and every gradient."""
import pytest
import torch

from madx_fast import ops, reference
from tests.helpers.devices import DEVICE, dtypes, fused_backends, needs_gpu
from tests.helpers.parity import check_parity

# Rebuilding the input from a rounded output adds about one ulp to every input element, and through the
# ReLUs near zero a little more gradient error than eager at the same precision: allow 4x instead of 3x.
RECOMPUTE_FACTOR = 4
NAMES = ["dx", "df_w1", "df_b1", "df_w2", "df_b2", "dg_w1", "dg_b1", "dg_w2", "dg_b2"]


def make_weights(h, dtype, rf=2, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    len1, len2 = reference.nice_split(h)
    hf, hg = reference.nice_hidden_sizes(h, rf)

    def lin(o, i):
        return ((scale / i ** 0.5) * torch.randn(o, i, generator=g)).to(DEVICE, dtype), \
               (0.1 * torch.randn(o, generator=g)).to(DEVICE, dtype)

    f_w1, f_b1 = lin(hf, len2)
    f_w2, f_b2 = lin(len1, hf)
    g_w1, g_b1 = lin(hg, len1)
    g_w2, g_b2 = lin(len2, hg)
    return [f_w1, f_b1, f_w2, f_b2, g_w1, g_b1, g_w2, g_b2]


def fused(backend, inverse, recompute, activation="relu"):
    op = ops.nice_inverse if inverse else ops.nice_forward

    def f(x, *w):
        return op(x, *w, activation=activation, recompute=recompute, backend=backend)
    return f


def ref(inverse, activation="relu"):
    fn = reference.nice_inverse_reference if inverse else reference.nice_forward_reference
    return lambda x, *w: fn(x, *w, activation_name=activation)


SHAPES = [(1, 64), (7, 96), (1000, 768), (129, 1024), (50, 97)]  # 97: odd width, unequal halves


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "save_input"])
@pytest.mark.parametrize("n,h,dtype", [(n, h, torch.float32) for n, h in SHAPES]
                         + [(n, h, torch.float16) for n, h in SHAPES if h != 97]  # odd width: fp32 only
                         + [pytest.param(n, h, torch.bfloat16, marks=needs_gpu) for n, h in SHAPES if h != 97])
def test_nice_matches_reference(backend, dtype, inverse, recompute, n, h):
    g = torch.Generator().manual_seed(n + h)
    x = torch.randn(n, h, generator=g).to(DEVICE, dtype)
    w = make_weights(h, dtype, seed=h)
    check_parity(fused(backend, inverse, recompute), ref(inverse), [x, *w], dtype, NAMES,
                 factor=RECOMPUTE_FACTOR if recompute else 3)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("activation", ["gelu", "silu", "tanh", "linear"])
def test_nice_activations(backend, activation):
    x = torch.randn(40, 96, device=DEVICE)
    w = make_weights(96, torch.float32, seed=3)
    for inverse in (False, True):
        check_parity(fused(backend, inverse, True, activation), ref(inverse, activation), [x, *w], torch.float32,
                     NAMES)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", dtypes())
def test_nice_inverse_of_forward_is_identity(backend, dtype):
    x = torch.randn(3, 41, 768, device=DEVICE, dtype=dtype)
    w = make_weights(768, dtype, scale=0.3, seed=4)
    y = ops.nice_forward(x, *w, backend=backend)
    assert (y - x).abs().max() > 1e-2, "the coupling should change its input"
    back = ops.nice_inverse(y, *w, backend=backend)
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    assert torch.allclose(back.float(), x.float(), atol=tol, rtol=0), (back.float() - x.float()).abs().max()


@pytest.mark.parametrize("backend", fused_backends())
def test_nice_noncontiguous_and_leading_dims(backend):
    base = torch.randn(4, 9, 2 * 96, device=DEVICE)
    x = base[..., 96:]  # row stride 192
    assert not x.is_contiguous()
    w = make_weights(96, torch.float32, seed=5)
    for inverse in (False, True):
        for recompute in (False, True):
            check_parity(fused(backend, inverse, recompute), ref(inverse), [x, *w], torch.float32, NAMES)


@pytest.mark.parametrize("backend", fused_backends())
def test_nice_zero_tokens(backend):
    x = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    w = [t.requires_grad_() for t in make_weights(64, torch.float32)]
    y = ops.nice_forward(x, *w, backend=backend)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() == 0 for t in w)


def test_nice_small_blocks_multi_split():
    """The launchers with tiny blocks and several token splits, both directions and both save modes."""
    from madx_fast.kernels import triton as tk

    h = 100
    x = torch.randn(203, h, device=DEVICE)
    w = make_weights(h, torch.float32, seed=6)
    act = reference.ACTIVATION_CODES["relu"]
    for inverse in (False, True):
        out = tk.nice_coupling(x, w, act, inverse, block_m=16, block_k=16)
        leaves = [t.double().requires_grad_() for t in [x, *w]]
        want_out = ref(inverse)(*leaves)
        assert torch.allclose(out.double(), want_out, atol=1e-5)
        dout = torch.randn_like(out)
        want = torch.autograd.grad(want_out, leaves, dout.double())
        for inp in (None, x):
            got = tk.nice_coupling_backward(dout, out, inp, w, act, inverse, block_m=16, block_k=16, splits=3)
            for name, a, b in zip(NAMES, got, want):
                assert torch.allclose(a.double(), b, atol=1e-4, rtol=1e-4), (inverse, inp is None, name)


@pytest.mark.parametrize("backend", fused_backends())
def test_nice_deterministic(backend):
    x = torch.randn(700, 96, device=DEVICE)
    w = make_weights(96, torch.float32, seed=7)
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in [x, *w]]
        y = ops.nice_forward(*leaves, backend=backend)
        y.backward(torch.ones_like(y))
        runs.append([y] + [t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("backend", fused_backends())
def test_nice_many_tokens(backend):
    x = torch.randn(65536, 64, device=DEVICE, dtype=torch.float16)
    w = make_weights(64, torch.float16, seed=8)
    check_parity(fused(backend, False, True), ref(False), [x, *w], torch.float16, NAMES, factor=RECOMPUTE_FACTOR)


# --------------------------------------------------------------------------------------------------------
# The Triton "gemm" route (kernels/triton/nice.py: a stage MLP wider than WIDE_HIDDEN = 256 hidden units, i.e.
# H >= 1536 at rf 2). Stand-ins that take it at a cost the interpreter affords: a small odd H (unequal halves)
# with wide stage MLPs (rf 0.075: 280 and 266 hidden units, no multiple of a tile); and one real size,
# H = 1536 (384 hidden units per stage).
# --------------------------------------------------------------------------------------------------------
WIDE_RF = 0.075


def wide_inputs(n, h, dtype, rf, seed):
    from madx_fast.kernels.triton import nice as triton_nice

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(DEVICE, dtype)
    w = make_weights(h, dtype, rf=rf, seed=seed)
    assert triton_nice.route(w[0].shape[0], w[4].shape[0]) == "gemm"
    return [x, *w]


# fp16 runs with gelu: with relu, a one-ulp difference in a stage's input (rounding order, or the rebuilt
# input) flips the pre-activations within an ulp of zero, and on tensors this small one flip moves a gradient's
# relative error by about 1/sqrt(its size), on either route alike (the next test); a smooth activation
# measures the rounding alone. The real size runs each direction once (about 6 s per case in the interpreter).
WIDE_CASES = [(37, 41, WIDE_RF, dtype, act, recompute, inverse) for dtype, act in
              ((torch.float32, "relu"), (torch.float16, "gelu")) for recompute in (True, False)
              for inverse in (False, True)]
WIDE_CASES += [(19, 1536, 2, torch.float32, "relu", True, False), (19, 1536, 2, torch.float16, "gelu", True, True)]
WIDE_CASES += [pytest.param(300, 2048, 2, torch.bfloat16, "gelu", True, inverse, marks=needs_gpu)
               for inverse in (False, True)]


@pytest.mark.parametrize("n,h,rf,dtype,activation,recompute,inverse", WIDE_CASES, ids=str)
def test_nice_wide_route_matches_reference(n, h, rf, dtype, activation, recompute, inverse):
    inputs = wide_inputs(n, h, dtype, rf, seed=n + h)
    check_parity(fused("triton", inverse, recompute, activation), ref(inverse, activation), inputs, dtype, NAMES,
                 factor=RECOMPUTE_FACTOR if recompute else 3)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_nice_wide_route_computes_what_the_fused_route_does(monkeypatch, inverse):
    """The GEMM route's products and epilogues are the fused kernels' arithmetic: on the same inputs (fp16, relu,
    the input rebuilt) both routes give the same output and gradients up to fp32 summation order."""
    from madx_fast.kernels.triton import nice as triton_nice

    inputs = wide_inputs(37, 41, torch.float16, WIDE_RF, seed=11)
    dy = torch.randn(37, 41, generator=torch.Generator().manual_seed(12)).to(DEVICE, torch.float16)
    results = {}
    for route, threshold in (("gemm", triton_nice.WIDE_HIDDEN), ("fused", 1 << 20)):
        monkeypatch.setattr(triton_nice, "WIDE_HIDDEN", threshold)
        assert triton_nice.route(inputs[1].shape[0], inputs[5].shape[0]) == route
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = fused("triton", inverse, True)(*leaves)
        results[route] = [out, *torch.autograd.grad(out, leaves, dy)]
    for name, a, b in zip(["out"] + NAMES, results["gemm"], results["fused"]):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-3, atol=2e-3 * b.float().abs().max().item(),
                                   msg=name)


def test_nice_wide_route_small_token_count_and_strided_input():
    """The GEMM route on a strided input view (its halves are column views, never copied) and a single token."""
    x_wide = torch.randn(5, 3, 2 * 41, device=DEVICE)
    w = wide_inputs(1, 41, torch.float32, WIDE_RF, seed=13)[1:]
    for x in (x_wide[..., 41:], x_wide[:1, :1, :41]):
        for inverse in (False, True):
            check_parity(fused("triton", inverse, True), ref(inverse), [x, *w], torch.float32, NAMES)
