"""MAD-X models compile with torch.compile(fullgraph=True): no graph break in the encoder or the heads
(embedding NICE, FFN adapters, NICE inverse in the MLM head, fp32 task head on a bf16 backbone)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertForTokenClassification, XLMRobertaForMaskedLM

from madx_fast.model import MadxConfig, Stack, add_madx
from tests.helpers.models import max_diff, padded_batch, randomize, tiny_config


def _model(cls, family, **kw):
    torch.manual_seed(0)
    model = cls(tiny_config(family, attn="sdpa", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            num_labels=3, **kw))
    madx = add_madx(model, backend="eager")
    madx.add_adapter("en", MadxConfig.language())
    madx.add_adapter("sw", MadxConfig.language())
    madx.add_adapter("ner", MadxConfig.task())
    randomize(model)
    return model, madx


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_masked_lm_with_nice_compiles_fullgraph_and_follows_setup_switches():
    model, madx = _model(XLMRobertaForMaskedLM, "xlm-roberta")
    model.eval()
    ids, mask = padded_batch(model.config)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for setup in (Stack("en", "ner"), Stack("sw", "ner"), None):
        madx.set_active(setup)
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).logits
            got = compiled(input_ids=ids, attention_mask=mask).logits
        assert max_diff(got, want) < 1e-5, setup


def test_training_step_compiles_fullgraph_with_equal_gradients():
    model, madx = _model(BertForTokenClassification, "bert")
    madx.set_active(Stack("en", "ner"))
    madx.train_adapters("ner")
    model.train()
    eager = copy.deepcopy(model)
    ids, mask = padded_batch(model.config)
    labels = torch.randint(0, 3, ids.shape)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    eager(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    assert any(".adapters.ner." in n for n in grads) and "classifier.weight" in grads
    for n, p in model.named_parameters():
        if n in grads:
            assert max_diff(p.grad, grads[n]) < 1e-5, n


def test_bf16_backbone_compiles_fullgraph():
    model, madx = _model(BertForTokenClassification, "bert")
    madx.set_active(Stack("en", "ner"))
    madx.train_adapters("ner")
    madx.cast_backbone(torch.bfloat16)
    model.eval()
    ids, mask = padded_batch(model.config)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = compiled(input_ids=ids, attention_mask=mask).logits
    assert got.dtype == torch.float32
    assert max_diff(got, want) < 1e-2
