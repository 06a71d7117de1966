"""NaN and Inf go through the fused kernels exactly as through the eager reference, forward and backward.

A diverged adapter must look diverged on every backend: one NaN, +Inf or -Inf is placed in the input, the
residual, a weight or a bias, and the fused op's output and every gradient must have NaN, +Inf and -Inf at
exactly the reference's positions (finite values close to the reference's), for every activation, on
both fused backends: Triton (its interpreter on CPU) and the CUDA C++ sources (their CPU emulator here,
the real extension on a GPU). Both adapter routes run (the one-kernel route, and the GEMM route of wide
bottlenecks), and NICE in both directions with the input saved.

NICE's default recompute mode rebuilds the input from the output, which cannot be done where the output
holds Inf or NaN (x + Inf - Inf). There the promise is weaker and checked as such: the forward is exact,
and the backward never gives a finite value the reference does not (a finite gradient is the reference's;
wherever the reference is not finite, neither is the fused op); where the output is finite it is exact.

One quirk of the oracle: torch's vectorised CPU GELU returns NaN for +Inf (its scalar path and its CUDA
kernel return +Inf, as the formula does). Where that quirk shows, the reference's exact GELU is evaluated
as +Inf at +Inf (``reference_gelu_at_inf``); its gradient there stays NaN, as torch's.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from madx_fast import ops, reference
from madx_fast.ops import dispatch
from tests.helpers.devices import DEVICE, GPU

SPECIALS = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
ACTIVATIONS = list(reference.ACTIVATION_CODES)
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}
ADAPTER_TENSORS = ["x", "residual", "w_down", "b_down", "w_up", "b_up"]
NICE_TENSORS = ["x1", "x2", "f_w1", "f_b1", "f_w2", "f_b2", "g_w1", "g_b1", "g_w2", "g_b2"]
# Where NICE cases place the value: both halves of the input and, in F and G, a weight and a bias of each
# layer (each MLP is stage A in one direction and stage B in the other).
NICE_PLACES = ["x1", "x2", "f_w1", "f_b2", "g_b1", "g_w2"]


def fused_backends():
    """Triton everywhere; the CUDA C++ sources on their CPU emulator without a GPU, the extension with one."""
    if GPU:
        return ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
    return ["triton", "cuda-emulated"]


def skip_bf16_on_the_interpreter(backend, dtype):
    if dtype == torch.bfloat16 and backend == "triton" and not GPU:
        pytest.skip("bf16 Triton kernels need a GPU (the interpreter's bf16 arithmetic is broken)")


@pytest.fixture(scope="module")
def emulated_launchers():
    from tests.helpers.cuda import build_emulator, launchers  # csrc/ compiled as C++, cached by source hash
    return launchers.make_launchers(build_emulator())


@pytest.fixture
def backend(request, monkeypatch):
    name = request.param
    if name == "cuda-emulated":
        launchers = request.getfixturevalue("emulated_launchers")
        monkeypatch.setattr(dispatch, "resolve_backend", lambda backend, device: backend or "cuda")
        monkeypatch.setattr(dispatch, "kernel_module", lambda backend: launchers)
        return "cuda"
    return name


@pytest.fixture(autouse=True)
def reference_gelu_at_inf(monkeypatch):
    """Work around torch's vectorised CPU GELU quirk (module doc) where it shows on this device."""
    probe = F.gelu(torch.full((64,), math.inf, device=DEVICE))
    if not torch.isnan(probe).any():
        return
    exact = reference.activation

    def activation(z, name):
        out = exact(z, name)
        if reference.canonical_activation(name) == "gelu":
            out = torch.where(z == math.inf, z, out)
        return out

    monkeypatch.setattr(reference, "activation", activation)


@pytest.fixture(autouse=True)
def _quiet_numpy():
    # the Triton interpreter computes with numpy, which warns on Inf - Inf and 0 * Inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# --------------------------------------------------------------------------------------------------------
# Comparing a result with the reference's, NaN/Inf positions first
# --------------------------------------------------------------------------------------------------------
def kinds(t: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 +Inf, 2 -Inf, 3 NaN."""
    t = t.float()
    return torch.where(torch.isnan(t), 3, torch.where(torch.isposinf(t), 1, torch.where(torch.isneginf(t), 2, 0)))


def finite_close(got, want, tol):
    both = torch.isfinite(got) & torch.isfinite(want)
    g, w = got.double()[both], want.double()[both]
    return bool(((g - w).abs() <= tol * (1 + w.abs())).all())


def exact_mismatch(name, got, want, tol):
    """'' when ``got`` has NaN/+Inf/-Inf exactly where ``want`` has and close finite values, else why not."""
    kg, kw = kinds(got), kinds(want)
    if not torch.equal(kg, kw):
        where = (kg != kw).nonzero()[0].tolist()
        labels = ("finite", "+inf", "-inf", "nan")
        return (f"{name}: {int((kg != kw).sum())} of {kg.numel()} elements differ in kind, first at {where}: "
                f"fused {labels[kg[tuple(where)]]}, reference {labels[kw[tuple(where)]]}")
    if not finite_close(got, want, tol):
        return f"{name}: finite values differ from the reference's"
    return ""


def never_wrong_finite_mismatch(name, got, want, tol):
    """Recompute mode where the output is not finite: no finite value the reference does not have."""
    if (torch.isfinite(got) & ~torch.isfinite(want)).any():
        return f"{name}: finite where the reference is not"
    if not finite_close(got, want, tol):
        return f"{name}: finite values differ from the reference's"
    return ""


def outputs_and_grads(fn, tensors, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, dy)]


def poisoned(tensors, index, position, value):
    tensors = [t.clone() for t in tensors]
    tensors[index].view(-1)[position % tensors[index].numel()] = value
    return tensors


# --------------------------------------------------------------------------------------------------------
# Bottleneck adapter
# --------------------------------------------------------------------------------------------------------
def adapter_tensors(n, h, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(n, h, generator=g), torch.randn(n, h, generator=g),
          torch.randn(d, h, generator=g) / math.sqrt(h), 0.1 * torch.randn(d, generator=g),
          torch.randn(h, d, generator=g) / math.sqrt(d), 0.1 * torch.randn(h, generator=g)]
    dy = torch.randn(n, h, generator=g)
    return [t.to(DEVICE, dtype) for t in ts], dy.to(DEVICE, dtype)


def adapter_cases():
    """(dtype, route, d): d > 128 takes the GEMM route (linear.py). Its low-precision handling is the fused
    route's (casts on load and store), so the CPU runs it in fp32 only, which keeps CI short."""
    low = [torch.float16, torch.bfloat16]
    cases = [(dt, "fused", 5) for dt in [torch.float32, *low]] + [(torch.float32, "gemm", 130)]
    return cases + ([(dt, "gemm", 130) for dt in low] if GPU else [])


@pytest.mark.parametrize("backend", fused_backends(), indirect=True)
@pytest.mark.parametrize("dtype,route,d", adapter_cases(), ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_adapter_propagates_nan_and_inf_like_the_reference(backend, dtype, route, d, activation):
    skip_bf16_on_the_interpreter(backend, dtype)
    n, h, scaling = 7, 24, 0.7
    tensors, dy = adapter_tensors(n, h, d, dtype, seed=d)

    def fused(x, r, wd, bd, wu, bu):
        return ops.bottleneck_adapter(x, r, wd, bd, wu, bu, scaling=scaling, activation=activation, backend=backend)

    def ref(x, r, wd, bd, wu, bu):
        return reference.bottleneck_adapter_reference(x, r, wd, bd, wu, bu, scaling, activation)

    names = ["y"] + [f"d{t}" for t in ADAPTER_TENSORS]
    problems, cases = [], 0
    for index, tensor_name in enumerate(ADAPTER_TENSORS):
        for k, (label, value) in enumerate(SPECIALS.items()):
            if (dtype != torch.float32 or route == "gemm") and (index + k + ACTIVATIONS.index(activation)) % 3:
                continue  # a third of the cases: each tensor and each activation still meet every special value
            case = poisoned(tensors, index, 7 * k + 3, value)
            got = outputs_and_grads(fused, case, dy)
            want = outputs_and_grads(ref, case, dy)
            cases += 1
            for name, a, b in zip(names, got, want):
                why = exact_mismatch(name, a, b, TOL[dtype])
                if why:
                    problems.append(f"{label} in {tensor_name}: {why}")
    assert cases > 0
    assert not problems, f"{activation}, {dtype}, {route} route:\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------------------------------------
# NICE coupling
# --------------------------------------------------------------------------------------------------------
def nice_tensors(n, h, dtype, seed, rf=2):
    g = torch.Generator().manual_seed(seed)
    len1, len2 = reference.nice_split(h)
    hf, hg = reference.nice_hidden_sizes(h, rf)
    shapes = [(hf, len2), (hf,), (len1, hf), (len1,), (hg, len1), (hg,), (len2, hg), (len2,)]
    fans = [len2, len2, hf, hf, len1, len1, hg, hg]
    weights = [torch.randn(s, generator=g) / math.sqrt(f) for s, f in zip(shapes, fans)]
    x = torch.randn(n, h, generator=g)
    dy = torch.randn(n, h, generator=g)
    return [t.to(DEVICE, dtype) for t in [x, *weights]], dy.to(DEVICE, dtype)


def nice_poison_position(tensor_name, n, h):
    """Flat position in the tensor the name refers to (x1 and x2 are the two halves of x)."""
    len1 = h // 2
    if tensor_name == "x1":
        return 0, 2 * h + 1  # row 2, a column of x1
    if tensor_name == "x2":
        return 0, 4 * h + len1 + 2  # row 4, a column of x2
    return 1 + NICE_TENSORS.index(tensor_name) - 2, 5


# The Triton NICE's GEMM route (stage MLPs wider than WIDE_HIDDEN = 256 units): rf 0.04 on H = 21 gives 275 and
# 250 hidden units. Its activation code is the device functions every route shares (all activations run above
# and in the adapter's GEMM route); here the NaN flow through its GEMMs, column views and lost-row marks runs
# with three activations of different NaN rules, each place meeting every special value.
WIDE_RF = 0.04
WIDE_ACTIVATIONS = ["relu", "gelu", "tanh"]


@pytest.mark.parametrize("backend", fused_backends(), indirect=True)
@pytest.mark.parametrize("recompute", [False, True], ids=["input-saved", "recompute"])
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nice_propagates_nan_and_inf_like_the_reference(backend, recompute, inverse, activation):
    problems = nice_nan_problems(backend, recompute, inverse, activation, ACTIVATIONS.index(activation), rf=2)
    assert not problems, f"{activation}, {'inverse' if inverse else 'forward'}, recompute={recompute}:\n  " + \
        "\n  ".join(problems)


@pytest.mark.parametrize("recompute", [False, True], ids=["input-saved", "recompute"])
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("activation", WIDE_ACTIVATIONS)
def test_nice_wide_route_propagates_nan_and_inf_like_the_reference(recompute, inverse, activation):
    from madx_fast.kernels.triton import nice as triton_nice

    hidden = reference.nice_hidden_sizes(21, WIDE_RF)
    assert triton_nice.route(*hidden) == "gemm", hidden
    problems = nice_nan_problems("triton", recompute, inverse, activation, WIDE_ACTIVATIONS.index(activation),
                                 rf=WIDE_RF)
    assert not problems, f"{activation}, {'inverse' if inverse else 'forward'}, recompute={recompute}:\n  " + \
        "\n  ".join(problems)


def nice_nan_problems(backend, recompute, inverse, activation, shift, rf):
    """Why the fused op's NaN/Inf differ from the reference's (empty: they do not), over a third of the
    (place, special value) cases, chosen by ``shift`` so that every activation set meets them all."""
    n, h, dtype = 7, 21, torch.float32
    tensors, dy = nice_tensors(n, h, dtype, seed=3, rf=rf)
    fused_op = ops.nice_inverse if inverse else ops.nice_forward
    ref_op = reference.nice_inverse_reference if inverse else reference.nice_forward_reference

    def fused(*t):
        return fused_op(*t, activation=activation, recompute=recompute, backend=backend)

    def ref(*t):
        return ref_op(*t, activation_name=activation)

    names = ["out", "dx", "df_w1", "df_b1", "df_w2", "df_b2", "dg_w1", "dg_b1", "dg_w2", "dg_b2"]
    problems, cases = [], 0
    for j, tensor_name in enumerate(NICE_PLACES):
        for k, (label, value) in enumerate(SPECIALS.items()):
            if (j + k + shift) % 3:
                continue  # each tensor and each activation still meet every special value
            index, position = nice_poison_position(tensor_name, n, h)
            case = poisoned(tensors, index, position, value)
            got = outputs_and_grads(fused, case, dy)
            want = outputs_and_grads(ref, case, dy)
            cases += 1
            exact = not recompute or bool(torch.isfinite(want[0]).all())
            for i, (name, a, b) in enumerate(zip(names, got, want)):
                check = exact_mismatch if exact or i == 0 else never_wrong_finite_mismatch
                why = check(name, a, b, TOL[dtype])
                if why:
                    problems.append(f"{label} in {tensor_name}: {why}")
    assert cases > 0
    return problems


@pytest.mark.parametrize("backend", fused_backends(), indirect=True)
def test_nice_recompute_says_nan_where_the_input_is_lost(backend):
    """The case the weaker promise is for: x2 = +Inf in one token, relu, forward. The reference's gradient
    of that token's x2 is partly finite, but the output (y2 = Inf) no longer tells x2: the fused op must
    answer NaN there, not a guess."""
    check_lost_input_gives_nan(backend, rf=2)


def test_nice_wide_route_recompute_says_nan_where_the_input_is_lost():
    """The same on the Triton GEMM route (its zA GEMM marks the lost token, its dzA GEMM poisons it)."""
    check_lost_input_gives_nan("triton", rf=WIDE_RF)


def check_lost_input_gives_nan(backend, rf):
    n, h = 7, 21
    len1 = h // 2
    tensors, dy = nice_tensors(n, h, torch.float32, seed=3, rf=rf)
    index, position = nice_poison_position("x2", n, h)
    case = poisoned(tensors, index, position, math.inf)
    got = outputs_and_grads(lambda *t: ops.nice_forward(*t, activation="relu", recompute=True, backend=backend),
                            case, dy)
    want = outputs_and_grads(lambda *t: reference.nice_forward_reference(*t, activation_name="relu"), case, dy)
    row = position // h
    assert torch.isfinite(want[1][row, len1:]).any()  # the reference knows more than the output tells
    assert torch.isnan(got[1][row, len1:]).all()
    names = ["out", "dx", "df_w1", "df_b1", "df_w2", "df_b2", "dg_w1", "dg_b1", "dg_w2", "dg_b2"]
    for name, a, b in zip(names, got, want):
        assert not never_wrong_finite_mismatch(name, a, b, TOL[torch.float32])
    # the other tokens' input gradients are exact
    others = torch.arange(n) != row
    assert not exact_mismatch("dx", got[1][others], want[1][others], TOL[torch.float32])
