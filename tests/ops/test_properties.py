"""Property-based checks over random shapes (hypothesis): the fused ops equal the reference in float32
for any token count, hidden size and bottleneck, including the odd ones no hand-written case lists."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from madx_fast import ops, reference
from tests.helpers.devices import DEVICE

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(n=st.integers(0, 300), h=st.integers(2, 200), d=st.integers(1, 70), seed=st.integers(0, 2**16),
       scaling=st.floats(-2.0, 2.0), same_residual=st.booleans(),
       activation=st.sampled_from(["relu", "gelu", "silu", "tanh", "linear"]))
def test_adapter_any_shape(n, h, d, seed, scaling, same_residual, activation):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=torch.float64)
    r = x if same_residual else torch.randn(n, h, generator=g, dtype=torch.float64)
    w = [torch.randn(d, h, generator=g, dtype=torch.float64) / h ** 0.5, torch.randn(d, generator=g, dtype=torch.float64),
         torch.randn(h, d, generator=g, dtype=torch.float64) / d ** 0.5, torch.randn(h, generator=g, dtype=torch.float64)]
    leaves = [t.float().to(DEVICE).requires_grad_() for t in [x] + w]
    r32 = leaves[0] if same_residual else r.float().to(DEVICE)
    y = ops.bottleneck_adapter(leaves[0], r32, *leaves[1:], scaling=scaling, activation=activation, backend="triton")
    dy = torch.randn(n, h, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(y, leaves, dy.float().to(DEVICE)) if n else None
    ref_leaves = [t.clone().requires_grad_() for t in [x] + w]
    rr = ref_leaves[0] if same_residual else r
    y_ref = reference.bottleneck_adapter_reference(ref_leaves[0], rr, *ref_leaves[1:], scaling, activation)
    assert torch.allclose(y.double().cpu(), y_ref, atol=1e-4, rtol=1e-4)
    if n:
        want = torch.autograd.grad(y_ref, ref_leaves, dy)
        for a, b in zip(grads, want):
            assert torch.allclose(a.double().cpu(), b, atol=2e-4 * (1 + n ** 0.5), rtol=1e-4)


@SETTINGS
@given(n=st.integers(0, 200), h=st.integers(4, 160), rf=st.sampled_from([1, 2, 3, 8]), seed=st.integers(0, 2**16),
       inverse=st.booleans(), recompute=st.booleans())
def test_nice_any_shape(n, h, rf, seed, inverse, recompute):
    g = torch.Generator().manual_seed(seed)
    len1, len2 = reference.nice_split(h)
    hf, hg = reference.nice_hidden_sizes(h, rf)
    if min(hf, hg) < 1:
        return
    shapes = [(hf, len2), (hf,), (len1, hf), (len1,), (hg, len1), (hg,), (len2, hg), (len2,)]
    w = [torch.randn(s, generator=g, dtype=torch.float64) / s[-1] ** 0.5 for s in shapes]
    x = torch.randn(n, h, generator=g, dtype=torch.float64)
    op = ops.nice_inverse if inverse else ops.nice_forward
    fn = reference.nice_inverse_reference if inverse else reference.nice_forward_reference
    leaves = [t.float().to(DEVICE).requires_grad_() for t in [x] + w]
    y = op(*leaves, recompute=recompute, backend="triton")
    ref_leaves = [t.clone().requires_grad_() for t in [x] + w]
    y_ref = fn(*ref_leaves)
    assert torch.allclose(y.double().cpu(), y_ref, atol=1e-4, rtol=1e-4)
    if n:
        dy = torch.randn(n, h, generator=g, dtype=torch.float64)
        grads = torch.autograd.grad(y, leaves, dy.float().to(DEVICE))
        want = torch.autograd.grad(y_ref, ref_leaves, dy)
        for a, b in zip(grads, want):
            assert torch.allclose(a.double().cpu(), b, atol=2e-4 * (1 + n ** 0.5), rtol=1e-3)
