"""Grouped (per-row) adapter and NICE ops vs the eager per-row reference: forward and every gradient, fp32 and
fp16, on shapes that are no multiple of the block sizes; each row equal to the single-adapter op with its
group's weights; NaN/Inf kept inside its group; empty groups; one group; frozen weights; input errors."""
import math

import pytest
import torch

from madx_fast import ops, reference
from madx_fast.backends import BackendUnavailableError
from tests.helpers.devices import DEVICE, needs_gpu
from tests.helpers.parity import check_parity

ADAPTER_GRADS = ["dx", "dw_down", "db_down", "dw_up", "db_up", "dresidual"]
NICE_GRADS = ["dx", "df_w1", "df_b1", "df_w2", "df_b2", "dg_w1", "dg_b1", "dg_w2", "dg_b2"]


def adapter_inputs(b, length, h, d, g, dtype, seed=0, weight_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    wdt = weight_dtype or dtype
    x = torch.randn(b, length, h, generator=gen).to(DEVICE, dtype)
    r = torch.randn(b, length, h, generator=gen).to(DEVICE, dtype)
    w_down = (torch.randn(g, d, h, generator=gen) / math.sqrt(h)).to(DEVICE, wdt)
    b_down = (0.1 * torch.randn(g, d, generator=gen)).to(DEVICE, wdt)
    w_up = (torch.randn(g, h, d, generator=gen) / math.sqrt(d)).to(DEVICE, wdt)
    b_up = (0.1 * torch.randn(g, h, generator=gen)).to(DEVICE, wdt)
    return [x, w_down, b_down, w_up, b_up, r]


def nice_inputs(b, length, h, g, dtype, seed=0, rf=2):
    gen = torch.Generator().manual_seed(seed)
    len1, len2 = reference.nice_split(h)
    hf, hg = reference.nice_hidden_sizes(h, rf)
    shapes = [(g, hf, len2), (g, hf), (g, len1, hf), (g, len1), (g, hg, len1), (g, hg), (g, len2, hg), (g, len2)]
    weights = [(torch.randn(s, generator=gen) / math.sqrt(s[-1] if len(s) == 3 else 4)).to(DEVICE, dtype)
               for s in shapes]
    x = torch.randn(b, length, h, generator=gen).to(DEVICE, dtype)
    return [x] + weights


def groups_of(ids):
    return torch.tensor(ids, device=DEVICE)


def grouped_adapter(groups, backend="triton", scaling=0.7, activation="relu"):
    def f(x, wd, bd, wu, bu, r):
        return ops.grouped_bottleneck_adapter(x, r, groups, wd, bd, wu, bu, scaling=scaling, activation=activation,
                                              backend=backend)
    return f


def grouped_adapter_ref(groups, scaling=0.7, activation="relu"):
    def f(x, wd, bd, wu, bu, r):
        return reference.grouped_bottleneck_adapter_reference(x, r, groups, wd, bd, wu, bu, scaling, activation)
    return f


def grouped_nice(groups, inverse, recompute=True, backend="triton", activation="relu"):
    fn = ops.grouped_nice_inverse if inverse else ops.grouped_nice_forward
    return lambda x, *w: fn(x, groups, *w, activation=activation, recompute=recompute, backend=backend)


def grouped_nice_ref(groups, inverse, activation="relu"):
    return lambda x, *w: reference.grouped_nice_reference(x, groups, *w, activation_name=activation, inverse=inverse)


# (rows, tokens per row, hidden, bottleneck, groups, row ids): odd sizes; repeated, absent and unsorted groups
ADAPTER_CASES = [
    (5, 7, 96, 40, 3, [2, 0, 2, 1, 2]),
    (4, 19, 64, 160, 4, [3, 1, 1, 3]),        # wide bottleneck, groups 0 and 2 absent
    (6, 1, 48, 8, 2, [1, 0, 0, 1, 1, 0]),      # one token per row (per-token groups)
    (3, 16, 72, 24, 2, [1, 0, 1]),             # rows a multiple of the token block (the flat-index path)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_gpu)])
@pytest.mark.parametrize("b,length,h,d,g,ids", ADAPTER_CASES)
def test_grouped_adapter_matches_reference(dtype, b, length, h, d, g, ids):
    inputs = adapter_inputs(b, length, h, d, g, dtype)
    groups = groups_of(ids)
    check_parity(grouped_adapter(groups), grouped_adapter_ref(groups), inputs, dtype, ADAPTER_GRADS)


@pytest.mark.parametrize("activation", ["gelu", "tanh"])
def test_grouped_adapter_activation_and_residual_is_input(activation):
    x, wd, bd, wu, bu, _ = adapter_inputs(3, 11, 80, 24, 2, torch.float32, seed=1)
    groups = groups_of([1, 0, 1])

    def fused(x, wd, bd, wu, bu):
        return ops.grouped_bottleneck_adapter(x, x, groups, wd, bd, wu, bu, scaling=1.3, activation=activation,
                                              backend="triton")

    def ref(x, wd, bd, wu, bu):
        return reference.grouped_bottleneck_adapter_reference(x, None, groups, wd, bd, wu, bu, 1.3, activation)
    check_parity(fused, ref, [x, wd, bd, wu, bu], torch.float32, ADAPTER_GRADS[:5])


def test_grouped_adapter_rows_equal_the_single_adapter_op():
    """Row b of the grouped op equals the single-adapter fused op run on that row alone with group g's weights;
    with one group the grouped op equals the single-adapter op."""
    x, wd, bd, wu, bu, r = adapter_inputs(4, 9, 64, 136, 3, torch.float32, seed=2)
    ids = [2, 0, 0, 2]
    y = ops.grouped_bottleneck_adapter(x, r, groups_of(ids), wd, bd, wu, bu, scaling=0.5, backend="triton")
    for row, g in enumerate(ids):
        alone = ops.bottleneck_adapter(x[row], r[row], wd[g], bd[g], wu[g], bu[g], scaling=0.5, backend="triton")
        torch.testing.assert_close(y[row], alone, rtol=1e-5, atol=1e-5)
    one = ops.grouped_bottleneck_adapter(x, r, groups_of([0] * 4), wd[:1], bd[:1], wu[:1], bu[:1], scaling=0.5,
                                         backend="triton")
    torch.testing.assert_close(one, ops.bottleneck_adapter(x, r, wd[0], bd[0], wu[0], bu[0], scaling=0.5,
                                                           backend="triton"), rtol=1e-5, atol=1e-5)


def _grads(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out] + list(torch.autograd.grad(out, leaves, dy))


def test_grouped_adapter_nan_and_inf_stay_in_their_group_and_empty_groups_get_zero_grads():
    x, wd, bd, wu, bu, r = adapter_inputs(5, 6, 48, 20, 4, torch.float32, seed=3)
    ids = [0, 1, 0, 2, 1]  # group 3 is empty
    groups = groups_of(ids)
    wd[0, 3, 5] = float("nan")  # group 0's weights
    x[2, 1, 7] = float("inf")   # a row of group 0
    dy = torch.randn_like(x)
    got = _grads(grouped_adapter(groups), [x, wd, bd, wu, bu, r], dy)
    want = _grads(grouped_adapter_ref(groups), [x, wd, bd, wu, bu, r], dy)
    clean_rows = torch.tensor([g != 0 for g in ids], device=DEVICE)
    for name, a, b in zip(["out", "dx"], got[:2], want[:2]):
        assert torch.isfinite(a[clean_rows]).all(), name
        torch.testing.assert_close(a[clean_rows], b[clean_rows], rtol=1e-5, atol=1e-5)
    assert not torch.isfinite(got[0][~clean_rows]).all()  # the poisoned group does show it
    for name, a, b in zip(ADAPTER_GRADS[1:5], got[2:6], want[2:6]):
        assert torch.isfinite(a[1:]).all(), name
        torch.testing.assert_close(a[1:], b[1:], rtol=1e-5, atol=1e-5)
        assert torch.equal(a[3], torch.zeros_like(a[3])), name  # empty group


def test_grouped_adapter_frozen_weights_give_input_grads_only():
    x, wd, bd, wu, bu, r = adapter_inputs(3, 10, 64, 160, 2, torch.float32, seed=4)
    groups = groups_of([1, 0, 1])
    xl = x.clone().requires_grad_()
    y = ops.grouped_bottleneck_adapter(xl, r, groups, wd, bd, wu, bu, backend="triton")
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, [xl], dy)
    xr = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(reference.grouped_bottleneck_adapter_reference(xr, r, groups, wd, bd, wu, bu),
                                  [xr], dy)
    torch.testing.assert_close(dx, want, rtol=1e-5, atol=1e-5)


def test_grouped_launchers_small_blocks_several_splits_deterministic():
    """The reduction split into several ranges per group (and one group holding every row); the same inputs
    give the same bits."""
    from madx_fast.kernels.triton import grouped

    x, wd, bd, wu, bu, r = adapter_inputs(7, 5, 40, 12, 3, torch.float32, seed=5)
    ids = [1, 1, 1, 1, 1, 1, 1]
    groups = groups_of(ids)
    act = reference.ACTIVATION_CODES["silu"]
    x2, r2 = x.view(-1, 40), r.view(-1, 40)
    y, z = grouped.grouped_adapter_forward(x2, r2, groups, wd, bd, wu, bu, 0.9, act)
    dy = torch.randn_like(y)
    runs = [grouped.grouped_adapter_backward(dy, x2, z, groups, wd, wu, 0.9, act, False, True, splits=3)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    leaves = [t.double().requires_grad_() for t in (x2, wd[1], bd[1], wu[1], bu[1])]
    ref = reference.bottleneck_adapter_reference(leaves[0], r2.double(), *leaves[1:], 0.9, "silu")
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    want = torch.autograd.grad(ref, leaves, dy.double())
    got = runs[0]
    for name, a, b in zip(["dx", "dw_down", "db_down", "dw_up", "db_up"], got, want):
        a = a if name == "dx" else a[1]
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=name)
    for a in got[1:]:
        assert not a[0].any() and not a[2].any()  # groups 0 and 2 are empty


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("recompute", [True, False])
def test_grouped_nice_matches_reference(dtype, inverse, recompute):
    inputs = nice_inputs(4, 9, 70, 3, dtype, seed=6)
    groups = groups_of([2, 2, 0, 1])
    check_parity(grouped_nice(groups, inverse, recompute), grouped_nice_ref(groups, inverse), inputs, dtype,
                 NICE_GRADS, factor=4.0 if recompute else 3.0)


def test_grouped_nice_rows_equal_single_nice_and_invert():
    x, *w = nice_inputs(3, 5, 64, 2, torch.float32, seed=7)
    ids = [1, 0, 1]
    groups = groups_of(ids)
    y = ops.grouped_nice_forward(x, groups, *w, backend="triton")
    for row, g in enumerate(ids):
        torch.testing.assert_close(y[row], ops.nice_forward(x[row], *(t[g] for t in w), backend="triton"),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.grouped_nice_inverse(y, groups, *w, backend="triton"), x, rtol=1e-4, atol=1e-4)


# rf 0.075: stage MLPs of 280 and 266 (H=41) or 320 (H=48) hidden units, wider than the Triton NICE's
# WIDE_HIDDEN: its per-row GEMM route (grouped_linear with the coupling's epilogues)
WIDE_RF = 0.075


# (fp16 with gelu: see test_nice.py's WIDE_CASES, a relu flip near zero dominates errors on tensors this small)
@pytest.mark.parametrize("dtype,activation,recompute", [(torch.float32, "relu", True), (torch.float32, "relu", False),
                                                        (torch.float16, "gelu", True)], ids=str)
@pytest.mark.parametrize("inverse", [False, True])
def test_grouped_nice_wide_route_matches_reference(dtype, activation, inverse, recompute):
    from madx_fast.kernels.triton import nice as triton_nice

    inputs = nice_inputs(3, 9, 41, 3, dtype, seed=14, rf=WIDE_RF)
    assert triton_nice.route(inputs[1].shape[1], inputs[5].shape[1]) == "gemm"
    groups = groups_of([2, 0, 2])  # group 1 absent
    check_parity(grouped_nice(groups, inverse, recompute, activation=activation),
                 grouped_nice_ref(groups, inverse, activation), inputs, dtype, NICE_GRADS,
                 factor=4.0 if recompute else 3.0)


@pytest.mark.parametrize("rf", [2, WIDE_RF], ids=["fused-route", "gemm-route"])
def test_grouped_nice_nan_stays_in_its_group_and_frozen_weights(rf):
    x, *w = nice_inputs(4, 6, 48, 3, torch.float32, seed=8, rf=rf)
    ids = [0, 1, 0, 1]  # group 2 empty
    groups = groups_of(ids)
    w[0][0, 2, 3] = float("nan")  # f_w1 of group 0
    dy = torch.randn_like(x)
    got = _grads(grouped_nice(groups, False), [x] + w, dy)
    want = _grads(grouped_nice_ref(groups, False), [x] + w, dy)
    clean = torch.tensor([g != 0 for g in ids], device=DEVICE)
    for a, b in zip(got[:2], want[:2]):
        assert torch.isfinite(a[clean]).all()
        torch.testing.assert_close(a[clean], b[clean], rtol=1e-5, atol=1e-5)
    for name, a, b in zip(NICE_GRADS[1:], got[2:], want[2:]):
        assert torch.isfinite(a[1:]).all(), name
        torch.testing.assert_close(a[1:], b[1:], rtol=1e-4, atol=1e-5, msg=name)
        assert not a[2].any(), name
    # frozen weights: only the input gradient (the weight reductions are skipped)
    xl = x.clone().requires_grad_()
    out = ops.grouped_nice_inverse(xl, groups, *w, backend="triton")
    (dx,) = torch.autograd.grad(out, [xl], dy)
    xr = x.clone().requires_grad_()
    (want_dx,) = torch.autograd.grad(reference.grouped_nice_reference(xr, groups, *w, inverse=True), [xr], dy)
    torch.testing.assert_close(dx[clean], want_dx[clean], rtol=1e-5, atol=1e-5)


def test_grouped_zero_rows():
    x, wd, bd, wu, bu, r = adapter_inputs(0, 4, 32, 8, 2, torch.float32)
    leaves = [t.requires_grad_() for t in (x, wd, bd, wu, bu)]
    y = ops.grouped_bottleneck_adapter(leaves[0], None, groups_of([]).long(), *leaves[1:], backend="triton")
    assert y.shape == (0, 4, 32)
    y.sum().backward()
    assert all(t.grad is not None and not t.grad.any() for t in leaves[1:])
    xn, *w = nice_inputs(0, 3, 32, 2, torch.float32)
    assert ops.grouped_nice_forward(xn, groups_of([]).long(), *w, backend="triton").shape == (0, 3, 32)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_grouped_errors(backend):
    x, wd, bd, wu, bu, r = adapter_inputs(3, 4, 32, 8, 2, torch.float32)
    groups = groups_of([0, 1, 1])

    def call(**kw):
        args = dict(x=x, residual=r, groups=groups, w_down=wd, b_down=bd, w_up=wu, b_up=bu)
        args.update(kw)
        return ops.grouped_bottleneck_adapter(*args.values(), backend=backend)
    with pytest.raises(ValueError, match=r"groups has shape \(2,\), expected \(3,\)"):
        call(groups=groups[:2])
    with pytest.raises(TypeError, match="groups has dtype torch.float32"):
        call(groups=groups.float())
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match=r"ids in \[0, 2\], outside \[0, 2\)"):
            call(groups=torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="w_down must be 3-D"):
        call(w_down=wd[0])
    with pytest.raises(ValueError, match=r"b_up has shape \(2, 31\), expected \(2, 32\)"):
        call(b_up=bu[:, :31])
    with pytest.raises(ValueError, match="at least 2-D"):
        call(x=x[0, 0], residual=r[0, 0])
    xn, *w = nice_inputs(3, 4, 32, 2, torch.float32)
    with pytest.raises(ValueError, match=r"g_b2 has shape \(1, 16\), expected \(2, 16\)"):
        ops.grouped_nice_forward(xn, groups, *w[:7], w[7][:1], backend=backend)


def test_grouped_cuda_backend_is_refused_with_a_reason():
    x, wd, bd, wu, bu, r = adapter_inputs(2, 3, 32, 8, 2, torch.float32)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        ops.grouped_bottleneck_adapter(x, r, groups_of([0, 1]), wd, bd, wu, bu, backend="cuda")


def test_grouped_ops_compile_fullgraph_without_recompiling_per_mix():
    """One compiled graph serves every mix of row ids (they are tensor data, not guards)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    x, wd, bd, wu, bu, r = adapter_inputs(4, 5, 32, 8, 3, torch.float32, seed=9)
    xn, *w = nice_inputs(4, 5, 32, 3, torch.float32, seed=9)

    def f(x, groups):
        y = ops.grouped_bottleneck_adapter(x, r, groups, wd, bd, wu, bu, backend="triton")
        return ops.grouped_nice_inverse(y, groups, *w, backend="triton")

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    for ids in ([0, 1, 2, 0], [2, 2, 2, 2], [1, 0, 0, 1]):
        groups = groups_of(ids)
        torch.testing.assert_close(compiled(x, groups), f(x, groups), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_grouped_launchers_and_reference_read_nothing_back_to_the_host():
    """No host read (a host-device sync on a GPU) in the launchers (the device-side sort for the weight
    reductions included) nor in the eager reference: the ids stay device data."""
    from madx_fast.kernels.triton import grouped
    from madx_fast.kernels.triton import nice as triton_nice
    from madx_fast.testing.sync_check import HostReads

    x, wd, bd, wu, bu, _ = adapter_inputs(4, 5, 32, 12, 3, torch.float32, seed=10)
    xn, *w = nice_inputs(4, 5, 32, 3, torch.float32, seed=10)
    w_wide = nice_inputs(4, 5, 32, 3, torch.float32, seed=10, rf=0.05)[1:]  # 320 hidden units: the GEMM route
    assert triton_nice.route(w_wide[0].shape[1], w_wide[4].shape[1]) == "gemm"
    groups = groups_of([2, 0, 2, 1])
    with HostReads(raise_on_read=True):
        x2 = x.view(-1, 32)
        y, z = grouped.grouped_adapter_forward(x2, None, groups, wd, bd, wu, bu, 1.0, 1)
        grouped.grouped_adapter_backward(y, x2, z, groups, wd, wu, 1.0, 1, True, True)
        out = grouped.grouped_nice_coupling(xn.view(-1, 32), groups, w, 1, True)
        grouped.grouped_nice_coupling_backward(out, out, None, groups, w, 1, True, True)
        out = grouped.grouped_nice_coupling(xn.view(-1, 32), groups, w_wide, 1, False)  # the GEMM route
        grouped.grouped_nice_coupling_backward(out, out, None, groups, w_wide, 1, False, True)
        reference.grouped_bottleneck_adapter_reference(x, None, groups, wd, bd, wu, bu)
        reference.grouped_nice_reference(xn, groups, *w)
