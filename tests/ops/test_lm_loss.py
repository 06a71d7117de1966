"""The LM loss's softmax cross-entropy (madx_fast.ops.lm_loss): the Triton kernel (interpreter: fp32, fp16)
against the eager specification, losses and the gradient it writes over the logits, odd vocabulary sizes,
ignored rows, NaN and -inf; and the chunking of the fused decoder + loss."""
import pytest
import torch
import torch.nn.functional as F

from madx_fast.model import fused_linear_cross_entropy
from madx_fast.model.mlm_loss import CHUNK_ROWS_MULTIPLE, default_chunk_size
from madx_fast.ops.lm_loss import fused_available, softmax_cross_entropy
from tests.helpers.devices import DEVICE, needs_gpu


def _case(rows=7, vocab=3001, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(dtype).to(DEVICE)
    targets = torch.randint(0, vocab, (rows,), generator=g).to(DEVICE)
    targets[2] = -100
    count = (targets != -100).sum().float()
    return logits, targets, count


def _both(logits, targets, count, grad=True):
    ref_logits, fused_logits = logits.clone(), logits.clone()
    ref = softmax_cross_entropy(ref_logits, targets, count, grad=grad, fused=False)
    got = softmax_cross_entropy(fused_logits, targets, count, grad=grad, fused=True)
    return ref, got, ref_logits, fused_logits


@pytest.mark.parametrize("vocab", [1, 17, 3001])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3),
                                       pytest.param(torch.bfloat16, 2e-2, marks=needs_gpu)])
def test_fused_equals_the_specification(vocab, dtype, tol):
    logits, targets, count = _case(vocab=vocab, dtype=dtype)
    targets = targets.clamp(max=vocab - 1).masked_fill(targets < 0, -100)
    ref, got, g_ref, g_got = _both(logits, targets, count)
    assert got.dtype == torch.float32 and got[2] == 0
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    assert g_got.dtype == dtype
    torch.testing.assert_close(g_got.float(), g_ref.float(), atol=tol, rtol=tol)
    assert torch.all(g_got[2] == 0)  # an ignored row has no gradient


def test_matches_torch_cross_entropy_and_its_gradient():
    logits, targets, count = _case()
    z = logits.clone().requires_grad_()
    expected = F.cross_entropy(z, targets)
    expected.backward()
    g = logits.clone()
    loss = softmax_cross_entropy(g, targets, count).sum() / count
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, z.grad, atol=1e-6, rtol=1e-5)


def test_without_grad_the_logits_are_left_alone():
    logits, targets, count = _case()
    kept = logits.clone()
    softmax_cross_entropy(logits, targets, count, grad=False)
    assert torch.equal(logits, kept)


def test_nan_and_infinite_logits_as_torch():
    logits, targets, count = _case(rows=4, vocab=600)
    targets[:] = torch.tensor([5, 6, -100, 7])
    logits[0, 100] = float("nan")  # a NaN anywhere in a row: NaN loss and gradient
    logits[1, :] = float("-inf")
    logits[1, 6] = 0.0  # one finite logit: the softmax puts all its mass there, loss 0
    logits[3, 9] = float("-inf")  # -inf elsewhere in a row: no effect on the rest
    ref, got, g_ref, g_got = _both(logits, targets, count)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert torch.isnan(got[0]) and got[1] == 0 and torch.isfinite(got[3])
    torch.testing.assert_close(g_got, g_ref, atol=1e-6, rtol=1e-5, equal_nan=True)


def test_fused_path_is_chosen_where_it_can_run():
    logits, _, _ = _case()
    assert fused_available(logits)  # on a GPU, or through the interpreter (TRITON_INTERPRET=1 in the tests)
    assert fused_available(logits.bfloat16()) == (DEVICE.type == "cuda")  # the interpreter's bf16 is wrong


def test_chunks_are_balanced_and_fit_the_budget():
    v = 250002
    assert default_chunk_size(2496, v, 2, 1 << 30) == 1280  # 2 chunks of bf16 logits, rows a multiple of 64
    assert default_chunk_size(2496, v, 4, 1 << 28) == 256  # fp32 at 256 MiB: 10 chunks (<= 268 rows each)
    assert default_chunk_size(50, v, 2, 1 << 30) == 50
    for rows in (1, 63, 64, 1000, 5000):
        size = default_chunk_size(rows, v, 2, 1 << 30)
        assert size * v * 2 <= 1 << 30 and -(-rows // size) == -(-rows // ((1 << 30) // (v * 2)))
    assert CHUNK_ROWS_MULTIPLE == 64


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-2)])
def test_fused_decoder_loss_and_gradients_against_the_full_computation(dtype, tol):
    """fp32: equal to F.cross_entropy(F.linear(...)) within rounding; fp16: within fp16's distance."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 32, generator=g)
    w = torch.randn(1003, 32, generator=g) * 0.3
    b = torch.randn(1003, generator=g)
    t = torch.randint(0, 1003, (37,), generator=g)
    t[::5] = -100
    xr, wr, br = (p.clone().requires_grad_() for p in (x, w, b))
    full = F.cross_entropy(F.linear(xr, wr, br), t)
    full.backward()
    xl, wl, bl = (p.to(dtype).to(DEVICE).requires_grad_() for p in (x, w, b))
    got = fused_linear_cross_entropy(xl, wl, bl, t.to(DEVICE), chunk_size=16)
    (got * 2).backward()  # an upstream gradient that is not 1
    assert abs(got.item() - full.item()) <= tol * max(1.0, abs(full.item()))
    scale = max(1.0, xr.grad.abs().max().item())
    for mine, ref in ((xl.grad, xr.grad), (wl.grad, wr.grad), (bl.grad, br.grad)):
        assert mine.dtype == dtype
        assert (mine.float().cpu() - 2 * ref).abs().max().item() <= tol * scale
