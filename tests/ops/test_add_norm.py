"""The fused residual add + LayerNorm (madx_fast.ops.add_layer_norm) against its eager specification
``F.layer_norm(x + r, (H,), w, b, eps)``: forward and every gradient, fp32 and fp16 (bf16 on a GPU), odd
widths and row counts, frozen and trainable weights, NaN / Inf, bad input."""
import pytest
import torch
import torch.nn.functional as F

from madx_fast.backends import BackendDtypeError
from madx_fast.ops import add_layer_norm
from madx_fast.ops.add_norm import fused_available
from tests.helpers.devices import DEVICE, GPU, dtypes, needs_gpu

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _case(rows, h, dtype, seed=0, weight_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, h, generator=g) * 2 + 0.5).to(dtype).to(DEVICE)
    r = torch.randn(rows, h, generator=g).to(dtype).to(DEVICE)
    w = (1 + 0.3 * torch.randn(h, generator=g)).to(weight_dtype).to(DEVICE)
    b = (0.1 * torch.randn(h, generator=g)).to(weight_dtype).to(DEVICE)
    dy = torch.randn(rows, h, generator=g).to(dtype).to(DEVICE)
    return x, r, w, b, dy


def _reference(x, r, w, b, eps):
    """The specification, computed in float32 from the same rounded sum for fp16 / bf16 (the CPU has no
    fp16 LayerNorm of a mixed-dtype weight): the LayerNorm's float32 statistics, rounded output."""
    s = (x + r).float()
    return F.layer_norm(s, (x.shape[-1],), None if w is None else w.float(),
                        None if b is None else b.float(), eps).to(x.dtype)


def _grads(fn, x, r, w, b, dy, eps=1e-5):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point() and need)
              for t, need in ((x, True), (r, True), (w, w.requires_grad), (b, b.requires_grad))]
    out = fn(*leaves, eps)
    out.backward(dy)
    return out.detach(), [t.grad for t in leaves]


def _fused(x, r, w, b, eps):
    return add_layer_norm(x, r, w, b, eps, backend="triton")


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("rows,h", [(1, 37), (67, 773), (5, 4096), (3, 1)])
def test_forward_and_backward_match_the_specification(dtype, rows, h):
    x, r, w, b, dy = _case(rows, h, dtype)
    w.requires_grad_(), b.requires_grad_()
    out, grads = _grads(_fused, x, r, w, b, dy)
    ref, ref_grads = _grads(_reference, x, r, w, b, dy)
    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    for got, want, name in zip(grads, ref_grads, ("x", "residual", "weight", "bias")):
        assert got.dtype == want.dtype, name
        scale = want.abs().max().clamp(min=1)  # the weight gradients sum over rows: compare to their size
        torch.testing.assert_close(got.float() / scale, want.float() / scale, atol=tol, rtol=tol, msg=name)


def test_float32_equals_torch_layer_norm_of_the_sum():
    """In float32 the specification is literally ``F.layer_norm(x + r, ...)``: one path, no re-rounding."""
    x, r, w, b, dy = _case(9, 768 + 5, torch.float32, seed=3)
    w.requires_grad_(), b.requires_grad_()
    out, grads = _grads(_fused, x, r, w, b, dy, eps=1e-12)
    ref, ref_grads = _grads(lambda x, r, w, b, eps: F.layer_norm(x + r, (x.shape[-1],), w, b, eps), x, r, w, b, dy,
                            eps=1e-12)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_eager_backend_is_the_specification():
    x, r, w, b, _ = _case(4, 33, torch.float32)
    assert torch.equal(add_layer_norm(x, r, w, b, 1e-5, backend="eager"),
                       F.layer_norm(x + r, (33,), w, b, 1e-5))


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16])
def test_frozen_weights_get_no_gradient_and_trainable_ones_theirs_in_their_dtype(weight_dtype):
    x, r, w, b, dy = _case(130, 96, torch.float16, weight_dtype=weight_dtype)
    _, (dx, dr, dw, db) = _grads(_fused, x, r, w, b, dy)  # frozen: MAD-X's backbone LayerNorm
    assert dw is None and db is None and dx is not None and torch.equal(dx, dr)
    _, ref_grads = _grads(_reference, x, r, w, b, dy)
    torch.testing.assert_close(dx.float(), ref_grads[0].float(), atol=4e-3, rtol=4e-3)
    w.requires_grad_()  # the weight trains, the bias does not
    _, (_, _, dw, db) = _grads(_fused, x, r, w, b, dy)
    _, (_, _, ref_dw, _) = _grads(_reference, x, r, w, b, dy)
    assert db is None and dw.dtype == weight_dtype
    torch.testing.assert_close(dw.float(), ref_dw.float(), atol=2e-2, rtol=4e-3)


def test_leading_dimensions_and_strided_rows():
    x, r, w, b, _ = _case(24, 50, torch.float32)
    x3, r3 = x.view(2, 12, 50), r.view(2, 12, 50)
    torch.testing.assert_close(_fused(x3, r3, w, b, 1e-5), _reference(x3, r3, w, b, 1e-5), atol=2e-5, rtol=2e-5)
    wide = torch.randn(24, 80, device=DEVICE)[:, 10:60]  # rows 80 apart
    torch.testing.assert_close(_fused(wide, r, w, b, 1e-5), _reference(wide, r, w, b, 1e-5), atol=2e-5, rtol=2e-5)


def test_no_rows_and_no_affine():
    x, r, w, b, dy = _case(0, 40, torch.float32)
    w.requires_grad_()
    out, (dx, _, dw, _) = _grads(_fused, x, r, w, b, dy)
    assert out.shape == (0, 40) and dx.shape == (0, 40) and torch.equal(dw, torch.zeros_like(dw))
    x, r, *_ = _case(5, 40, torch.float32)
    torch.testing.assert_close(_fused(x, r, None, None, 1e-5), _reference(x, r, None, None, 1e-5), atol=2e-5,
                               rtol=2e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_spread_over_their_row_as_in_the_specification(bad):
    x, r, w, b, dy = _case(6, 45, torch.float32)
    x[2, 7] = bad
    w.requires_grad_()
    out, (dx, _, dw, _) = _grads(_fused, x, r, w, b, dy)
    ref, (ref_dx, _, ref_dw, _) = _grads(_reference, x, r, w, b, dy)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5, equal_nan=True)
    torch.testing.assert_close(dx, ref_dx, atol=2e-5, rtol=2e-5, equal_nan=True)
    assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3, 4, 5]]).all()  # that row only
    assert torch.equal(torch.isnan(dw), torch.isnan(ref_dw))


def test_bad_input_is_named():
    x, r, w, b, _ = _case(4, 16, torch.float32)
    with pytest.raises(ValueError, match=r"residual has shape \(4, 15\)"):
        add_layer_norm(x, r[:, :15], w, b)
    with pytest.raises(TypeError, match="residual has dtype torch.float16"):
        add_layer_norm(x, r.half(), w, b)
    with pytest.raises(ValueError, match=r"weight has shape \(15,\), expected \(16,\)"):
        add_layer_norm(x, r, w[:15], b)
    with pytest.raises(TypeError, match="bias has dtype torch.int64"):
        add_layer_norm(x, r, w, b.long())
    with pytest.raises(ValueError, match="on one device.*meta"):
        add_layer_norm(x, r, w.to("meta"), b)
    with pytest.raises(ValueError, match="residual must be a tensor"):
        add_layer_norm(x, None, w, b)


@pytest.mark.skipif(GPU, reason="the bf16 refusal is the CPU interpreter's")
def test_bfloat16_is_refused_on_the_interpreter_and_not_fused():
    x, r, w, b, _ = _case(3, 16, torch.bfloat16)
    assert not fused_available(x) and fused_available(x.float())
    with pytest.raises(BackendDtypeError, match="bfloat16"):
        add_layer_norm(x, r, w, b, backend="triton")
    assert not fused_available(x.float(), backend="eager")


@needs_gpu
def test_fused_path_is_chosen_on_the_gpu_for_bfloat16():
    x, *_ = _case(3, 16, torch.bfloat16)
    assert fused_available(x)
