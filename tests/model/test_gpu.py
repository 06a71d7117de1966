"""On a CUDA GPU: MAD-X models on the fused kernels (default backend) agree with the eager reference, in
fp32 and with a bf16 backbone (fp32 master adapters). Skipped without a GPU."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import XLMRobertaForMaskedLM, XLMRobertaForTokenClassification

from madx_fast.model import MadxConfig, Stack, add_madx, madx_mlm_loss
from tests.helpers.models import max_diff, mlm_labels, padded_batch, randomize, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _pair(cls):
    torch.manual_seed(0)
    model = cls(tiny_config("xlm-roberta", attn="sdpa", hidden_size=64, num_labels=5, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0))
    madx = add_madx(model, backend="eager")
    madx.add_adapter("en", MadxConfig.language())
    madx.add_adapter("ner", MadxConfig.task())
    randomize(model, std=0.1)
    madx.set_active(Stack("en", "ner"))
    fused = copy.deepcopy(model)
    fused.madx.set_backend(None)  # the default for CUDA tensors: the fused kernels
    return model.cuda(), fused.cuda()


@pytest.mark.parametrize("cls", [XLMRobertaForMaskedLM, XLMRobertaForTokenClassification],
                         ids=lambda c: c.__name__)
def test_fused_kernels_match_eager_fp32(cls):
    eager, fused = _pair(cls)
    ids, mask = (t.cuda() for t in padded_batch(eager.config))
    for model in (eager, fused):
        model.madx.train_adapters(Stack("en", "ner"))
        model(input_ids=ids, attention_mask=mask).logits.float().pow(2).mean().backward()
    with torch.no_grad():
        assert max_diff(fused(input_ids=ids, attention_mask=mask).logits,
                        eager(input_ids=ids, attention_mask=mask).logits) < 1e-3  # TF32 matmuls allowed
    for (n, a), (_, b) in zip(eager.named_parameters(), fused.named_parameters()):
        if a.grad is not None:
            assert max_diff(a.grad, b.grad) < 1e-2 * max(a.grad.abs().max().item(), 1e-6), n


def test_bf16_backbone_mlm_step_on_fused_kernels():
    eager, fused = _pair(XLMRobertaForMaskedLM)
    ids, mask = (t.cuda() for t in padded_batch(eager.config))
    labels = mlm_labels(ids.cpu(), mask.cpu()).cuda()
    losses = []
    for model in (eager, fused):
        model.madx.set_active("en")
        model.madx.train_adapters("en")
        model.madx.cast_backbone(torch.bfloat16)
        loss = madx_mlm_loss(model, ids, mask, labels)
        loss.backward()
        losses.append(loss.item())
        for p in model.madx.adapter_parameters("en"):
            assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()
    assert abs(losses[0] - losses[1]) < 2e-2 * abs(losses[0])
