"""The masked-position-only, chunked fused linear cross-entropy equals the full computation (loss and
gradients) and never materialises the B x L x V logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BertForMaskedLM, XLMRobertaForMaskedLM

from madx_fast.model import MadxConfig, Stack, add_madx, fused_linear_cross_entropy, madx_mlm_loss
from tests.helpers.models import max_diff, mlm_labels, padded_batch, randomize, tiny_config


def _problem(n=13, h=16, v=37, dtype=torch.float32, seed=0, ignored=(2, 7)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g) * 0.5).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[list(ignored)] = -100
    return x, w, b, t


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t.requires_grad])


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 100])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_linear_cross_entropy_equals_full(chunk_size, with_bias):
    x, w, b, t = _problem()
    b = b if with_bias else None
    full = F.cross_entropy(F.linear(x, w, b), t)
    fused = fused_linear_cross_entropy(x, w, b, t, chunk_size=chunk_size)
    assert abs(full.item() - fused.item()) < 1e-6
    ins = (x, w) if b is None else (x, w, b)
    for g_full, g_fused in zip(_grads(full * 3.0, *ins), _grads(fused * 3.0, *ins)):  # upstream grad != 1
        assert max_diff(g_full, g_fused) < 1e-6


def test_frozen_decoder_gets_no_gradient_and_input_grad_is_right():
    x, w, b, t = _problem()
    w.requires_grad_(False)
    b.requires_grad_(False)
    fused = fused_linear_cross_entropy(x, w, b, t, chunk_size=3)
    (gx,) = torch.autograd.grad(fused, x)
    (gx_full,) = torch.autograd.grad(F.cross_entropy(F.linear(x, w, b), t), x)
    assert max_diff(gx, gx_full) < 1e-6
    assert w.grad is None


def test_bf16_close_to_fp32():
    x, w, b, t = _problem(n=40, h=32, v=300)
    ref = fused_linear_cross_entropy(x, w, b, t, chunk_size=7)
    xb, wb, bb = (p.detach().bfloat16().requires_grad_() for p in (x, w, b))
    got = fused_linear_cross_entropy(xb, wb, bb, t, chunk_size=7)
    assert got.dtype == torch.float32 and abs(got.item() - ref.item()) < 2e-2 * abs(ref.item())
    gx_ref, = torch.autograd.grad(ref, x)
    gx, = torch.autograd.grad(got, xb)
    assert gx.dtype == torch.bfloat16
    assert max_diff(gx, gx_ref) < 3e-2 * gx_ref.abs().max().item()


def test_no_labelled_rows_gives_zero_loss():
    x, w, b, t = _problem()
    t[:] = -100
    loss = fused_linear_cross_entropy(x, w, b, t)
    assert loss.item() == 0
    (gx,) = torch.autograd.grad(loss, x)
    assert gx.abs().max() == 0


def _mlm_model(cls, family, **kw):
    torch.manual_seed(0)
    model = cls(tiny_config(family, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw))
    with torch.no_grad():
        model.get_output_embeddings().bias.normal_()
    madx = add_madx(model, backend="eager")
    madx.add_adapter("en", MadxConfig.language())
    madx.add_adapter("ner", "seq_bn")
    randomize(model)
    return model, madx


@pytest.mark.parametrize("cls,family", [(XLMRobertaForMaskedLM, "xlm-roberta"), (BertForMaskedLM, "bert")],
                         ids=["xlm-roberta", "bert"])
def test_madx_mlm_loss_equals_hf_loss_and_gradients(cls, family):
    model, madx = _mlm_model(cls, family)
    madx.set_active(Stack("en", "ner"))
    madx.train_adapters(Stack("en", "ner"), train_head=True)
    model.train()  # dropout is 0: train mode, deterministic
    ids, mask = padded_batch(model.config)
    labels = mlm_labels(ids, mask)
    params = [p for p in model.parameters() if p.requires_grad]
    full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    g_full = torch.autograd.grad(full, params)
    fused = madx_mlm_loss(model, ids, mask, labels, chunk_size=3)
    g_fused = torch.autograd.grad(fused, params)
    assert abs(full.item() - fused.item()) < 1e-5
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("invertible_adapters.en" in n for n in names)
    for name, a, b in zip(names, g_full, g_fused):
        assert max_diff(a, b) < 1e-5, name
    # the handle's method is the same function
    assert abs(madx.mlm_loss(ids, mask, labels).item() - full.item()) < 1e-5


def test_madx_mlm_loss_on_a_plain_hf_model():
    torch.manual_seed(0)
    model = XLMRobertaForMaskedLM(tiny_config("xlm-roberta")).eval()
    ids, mask = padded_batch(model.config)
    labels = mlm_labels(ids, mask)
    with torch.no_grad():
        assert abs(model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
                   - madx_mlm_loss(model, ids, mask, labels).item()) < 1e-5


class _LargestTensor(TorchDispatchMode):
    """Records the largest newly allocated tensor any op produces (views of inputs do not count)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in flat_in if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_the_full_logits():
    model, madx = _mlm_model(XLMRobertaForMaskedLM, "xlm-roberta", vocab_size=1000)
    madx.set_active("en")
    madx.train_adapters("en")
    ids, mask = padded_batch(model.config, batch=4, length=16)
    labels = mlm_labels(ids, mask, rate=0.15)
    full_logits = ids.numel() * model.config.vocab_size
    with _LargestTensor() as spy:
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert spy.largest >= full_logits  # the detector sees HF's full logits
    model.zero_grad()
    with _LargestTensor() as spy:
        madx_mlm_loss(model, ids, mask, labels, chunk_size=4).backward()
    assert spy.largest < full_logits // 4, spy.largest
    assert madx.invertible_adapter("en").G[2].weight.grad is not None


def test_follows_resized_token_embeddings():
    model, madx = _mlm_model(XLMRobertaForMaskedLM, "xlm-roberta")
    madx.set_active("en")
    model.resize_token_embeddings(120)
    model.eval()
    ids, mask = padded_batch(model.config)
    labels = mlm_labels(ids, mask)
    labels[0, 1] = 110  # a new token id
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert abs(madx_mlm_loss(model, ids, mask, labels).item() - full.item()) < 1e-5
