"""The fused Linear + activation (madx_fast.ops.dense_activation, inference only) against its eager
specification ``act(F.linear(x, w, b))``: fp32 and fp16 (bf16 on a GPU), odd shapes and leading dimensions,
every activation, NaN / Inf at the reference's positions, bad input named, no backward."""
import pytest
import torch

from madx_fast import reference
from madx_fast.backends import BackendDtypeError
from madx_fast.ops import dense_activation
from madx_fast.ops.dense import dense_activation_reference, fused_available
from tests.helpers.devices import DEVICE, GPU, dtypes
from tests.ops.test_nan import _quiet_numpy, reference_gelu_at_inf  # noqa: F401 (autouse fixtures)
from tests.ops.test_nan import SPECIALS, exact_mismatch, poisoned

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _case(lead, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE, dtype)
    b = (0.5 * torch.randn(n, generator=g)).to(DEVICE, dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("lead,n,k", [((3, 67), 37, 19), ((130,), 3072 // 16, 48), ((1,), 1, 1), ((2, 0), 5, 7)])
@pytest.mark.parametrize("activation", ["gelu", "relu", "gelu_tanh"])
def test_forward_matches_the_specification(dtype, lead, n, k, activation):
    x, w, b = _case(lead, n, k, dtype)
    with torch.no_grad():
        out = dense_activation(x, w, b, activation, backend="triton")
        ref = dense_activation_reference(x, w, b, activation)
    assert out.dtype == dtype and out.shape == (*lead, n)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_every_activation_and_no_bias_and_strided_input():
    x, w, b = _case((9,), 21, 40, torch.float32)
    xt = x.t()  # [40, 9] viewed as 40 rows of 9 features, not contiguous
    for name in reference.ACTIVATION_CODES:
        got = dense_activation(xt, w[:, :9], None, name, backend="triton")
        torch.testing.assert_close(got, dense_activation_reference(xt, w[:, :9], None, name), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_nan_and_inf_as_the_reference(dtype, activation):
    tensors = list(_case((11,), 13, 10, dtype, seed=1))
    problems = []
    for index, name in enumerate(("x", "weight", "bias")):
        for k, (label, value) in enumerate(SPECIALS.items()):
            case = poisoned(tensors, index, 5 * k + 2, value)
            got = dense_activation(*case, activation, backend="triton")
            why = exact_mismatch("out", got, dense_activation_reference(*case, activation), TOL[dtype])
            if why:
                problems.append(f"{label} in {name}: {why}")
    assert not problems, "\n".join(problems)


def test_eager_backend_is_the_specification():
    x, w, b = _case((4,), 6, 5, torch.float32)
    assert torch.equal(dense_activation(x, w, b, "gelu", backend="eager"), dense_activation_reference(x, w, b, "gelu"))


def test_bad_input_is_named():
    x, w, b = _case((4,), 6, 5, torch.float32)
    with pytest.raises(ValueError, match=r"weight has shape \(6, 4\) \[out, in\] but x has 5 input features"):
        dense_activation(x, w[:, :4], b, "gelu")
    with pytest.raises(ValueError, match=r"bias has shape \(5,\), expected \(6,\)"):
        dense_activation(x, w, b[:5], "gelu")
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but x has torch.float32"):
        dense_activation(x, w.half(), b, "gelu")
    with pytest.raises(ValueError, match=r"weight must be 2-D"):
        dense_activation(x, w[0], b, "gelu")
    with pytest.raises(ValueError, match="on one device.*meta"):
        dense_activation(x, w.to("meta"), b.to("meta"), "gelu")
    with pytest.raises(ValueError, match="unknown activation 'swiglu'"):
        dense_activation(x, w, b, "swiglu")


def test_no_backward_it_refuses_inputs_that_want_a_gradient():
    x, w, b = _case((4,), 6, 5, torch.float32)
    w.requires_grad_()
    with pytest.raises(RuntimeError, match="for inference: it has no backward"):
        dense_activation(x, w, b, "gelu", backend="triton")
    with torch.no_grad():
        assert dense_activation(x, w, b, "gelu", backend="triton").shape == (4, 6)


@pytest.mark.skipif(GPU, reason="the bf16 refusal is the CPU interpreter's")
def test_bfloat16_is_refused_on_the_interpreter_and_not_fused():
    x, w, b = _case((3,), 4, 16, torch.bfloat16)
    assert not fused_available(x) and fused_available(x.float())
    with pytest.raises(BackendDtypeError, match="bfloat16"):
        dense_activation(x, w, b, "gelu", backend="triton")
    assert not fused_available(x.float(), backend="eager")
