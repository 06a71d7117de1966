"""Each layer's FFN intermediate (HF's ``act(dense(x))``) runs as one fused GEMM with the GELU in its epilogue
(``ops.dense_activation``) in an inference forward whose adapters run fused, and as HF's own modules wherever
a gradient is needed, the backend is eager or no adapter is active (madx_fast.model.wiring)."""
from __future__ import annotations

import copy
import io
import os

import pytest
import torch
from transformers import XLMRobertaForTokenClassification

from madx_fast.model import MadxConfig, Stack, add_madx
from madx_fast.model.wiring import MadxIntermediate
from tests.helpers.models import LAYERS, count_fused_backbone_calls, max_diff, padded_batch, randomize, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the fused kernels on the CPU need TRITON_INTERPRET=1")


def _pair(dtype=torch.float32):
    """The same tiny XLM-R with MAD-X (Stack(en, ner), en with NICE) on backend "triton" and on "eager"."""
    torch.manual_seed(0)
    model = XLMRobertaForTokenClassification(tiny_config("xlm-roberta", hidden_dropout_prob=0.0,
                                                         attention_probs_dropout_prob=0.0, num_labels=5)).eval()
    madx = add_madx(model, backend="triton")
    madx.add_adapter("en", MadxConfig.language())
    madx.add_adapter("ner", MadxConfig.task())
    randomize(model)
    madx.set_active(Stack("en", "ner"))
    if dtype != torch.float32:
        madx.cast_backbone(dtype)
    eager = copy.deepcopy(model)
    eager.madx.set_backend("eager")
    return model, eager


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)], ids=["fp32", "fp16"])
def test_inference_fuses_every_intermediate_and_equals_the_eager_model(dtype, tol, monkeypatch):
    calls = count_fused_backbone_calls(monkeypatch, "dense_activation")
    fused, eager = _pair(dtype)
    ids, mask = padded_batch(fused.config)
    with torch.no_grad():
        got = fused(input_ids=ids, attention_mask=mask).logits
        assert calls == ["triton"] * LAYERS
        want = eager(input_ids=ids, attention_mask=mask).logits
    assert len(calls) == LAYERS  # the eager model keeps HF's modules
    assert got.dtype == want.dtype and max_diff(got.float(), want.float()) < tol


def test_training_keeps_hf_modules_and_their_gradients(monkeypatch):
    calls = count_fused_backbone_calls(monkeypatch, "dense_activation")
    fused, eager = _pair()
    ids, mask = padded_batch(fused.config)
    grads = []
    for model in (fused, eager):
        model.madx.train_adapters(Stack("en", "ner"))
        model.train()
        (model(input_ids=ids, attention_mask=mask).logits ** 2).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert calls == []
    assert set(grads[0]) == set(grads[1]) and any("adapters." in n for n in grads[0])
    for name, g in grads[1].items():
        assert max_diff(grads[0][name], g) < 1e-4 * max(1.0, g.abs().max().item()), name


def test_no_adapter_or_an_unknown_activation_keeps_hf_modules(monkeypatch):
    calls = count_fused_backbone_calls(monkeypatch, "dense_activation")
    fused, _ = _pair()
    ids, mask = padded_batch(fused.config)
    with torch.no_grad():
        fused.madx.set_active(None)
        fused(input_ids=ids, attention_mask=mask)
        fused.madx.set_active(Stack("en", "ner"))
        for layer in fused.roberta.encoder.layer:
            layer.intermediate.intermediate_act_fn = torch.nn.SiLU()
        fused(input_ids=ids, attention_mask=mask)
    assert calls == []


def test_wiring_keeps_hf_keys_pickles_and_unwires():
    model, _ = _pair()
    layer = model.roberta.encoder.layer[0]
    assert isinstance(layer.intermediate, MadxIntermediate)
    assert "roberta.encoder.layer.0.intermediate.dense.weight" in model.state_dict()
    assert not any("_output" in k for k in model.state_dict())
    clone = copy.deepcopy(model)
    assert clone.roberta.encoder.layer[0].intermediate._output[0] is clone.roberta.encoder.layer[0].output
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.roberta.encoder.layer[1].intermediate._output[0] is loaded.roberta.encoder.layer[1].output
    model.madx.remove()
    assert type(layer.intermediate).__name__ == "XLMRobertaIntermediate"
