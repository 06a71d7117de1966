"""MAD-X wiring on HF models, checked against docs/spec.md's formulas directly (no ``adapters`` needed: these tests
also run with transformers 5.x): placement formulas, the active setup, freezing, dtypes, SDPA."""
from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BertForMaskedLM,
    BertForTokenClassification,
    BertModel,
    XLMRobertaForMaskedLM,
    XLMRobertaForMultipleChoice,
    XLMRobertaForQuestionAnswering,
    XLMRobertaForTokenClassification,
    XLMRobertaModel,
)

from madx_fast import reference
from madx_fast.model import AdapterExistsError, MadxConfig, Stack, add_madx, madx_mlm_loss
from madx_fast.model.wiring import InvertibleHook, MadxFFNOutput
from tests.helpers.models import LAYERS, max_diff, mlm_labels, padded_batch, randomize, tiny_config

ALL_CLASSES = [
    (XLMRobertaModel, "xlm-roberta"), (XLMRobertaForMaskedLM, "xlm-roberta"),
    (XLMRobertaForTokenClassification, "xlm-roberta"), (XLMRobertaForQuestionAnswering, "xlm-roberta"),
    (XLMRobertaForMultipleChoice, "xlm-roberta"), (BertModel, "bert"), (BertForMaskedLM, "bert"),
    (BertForTokenClassification, "bert"),
]


def _model(cls=XLMRobertaForTokenClassification, family="xlm-roberta", attn="eager", seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("num_labels", 5)
    return cls(tiny_config(family, attn=attn, **kw)).eval()


def _madx_model(cls=XLMRobertaForTokenClassification, family="xlm-roberta", attn="eager", **kw):
    model = _model(cls, family, attn, **kw)
    madx = add_madx(model, backend="eager")
    madx.add_adapter("en", MadxConfig.language())
    madx.add_adapter("sw", MadxConfig.language())
    madx.add_adapter("ner", MadxConfig.task())
    randomize(model)
    return model, madx


def _inputs(model, cls):
    ids, mask = padded_batch(model.config, batch=6 if cls is XLMRobertaForMultipleChoice else 3)
    if cls is XLMRobertaForMultipleChoice:
        ids, mask = ids.view(2, 3, -1), mask.view(2, 3, -1)
    return dict(input_ids=ids, attention_mask=mask)


def _out(model, **inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out[0]


@pytest.mark.parametrize("cls,family", ALL_CLASSES, ids=lambda x: x.__name__ if isinstance(x, type) else None)
def test_no_active_adapter_is_the_unmodified_model(cls, family):
    plain = _model(cls, family, num_labels=2)
    model = copy.deepcopy(plain)
    keys_before = set(model.state_dict())
    madx = add_madx(model, backend="eager")
    madx.add_adapter("en", "seq_bn_inv")
    randomize(model)
    inputs = _inputs(model, cls)
    assert max_diff(_out(model, **inputs), _out(plain, **inputs)) == 0
    # backbone keys unchanged; adapter keys are AdapterHub's
    keys_after = set(model.state_dict())
    assert keys_before <= keys_after
    prefix = model.base_model_prefix
    for key in keys_after - keys_before:
        assert key.startswith((f"{prefix}.encoder.layer.", f"{prefix}.invertible_adapters.en.", "encoder.layer.",
                               "invertible_adapters.en.")), key
    madx.set_active("en")
    assert max_diff(_out(model, **inputs), _out(plain, **inputs)) > 1e-3


def test_ffn_output_follows_the_spec_for_a_stack():
    model, madx = _madx_model()
    out_module = model.roberta.encoder.layer[1].output
    assert isinstance(out_module, MadxFFNOutput)
    g = torch.Generator().manual_seed(1)
    inter = torch.randn(2, 5, 64, generator=g)
    a = torch.randn(2, 5, 32, generator=g)
    ln = out_module.LayerNorm

    def A(name, x, r):
        ad = out_module.adapters[name]
        return reference.bottleneck_adapter_reference(x, r, ad.adapter_down[0].weight, ad.adapter_down[0].bias,
                                                      ad.adapter_up.weight, ad.adapter_up.bias, 1.0, "relu")

    with torch.no_grad():
        f = out_module.dense(inter)
        madx.set_active(Stack("en", "ner"))
        y1 = A("en", ln(f + a), f)
        y2 = A("ner", ln(y1 + a), y1)
        assert max_diff(out_module(inter, a), ln(y2 + a)) < 1e-6
        madx.set_active("ner")
        assert max_diff(out_module(inter, a), ln(A("ner", ln(f + a), f) + a)) < 1e-6
        madx.set_active(None)
        assert max_diff(out_module(inter, a), ln(f + a)) == 0


@pytest.mark.parametrize("cls,family", [(XLMRobertaForMaskedLM, "xlm-roberta"), (BertForMaskedLM, "bert")],
                         ids=["xlm-roberta", "bert"])
def test_nice_on_embeddings_and_inverse_before_the_decoder(cls, family):
    model, madx = _madx_model(cls, family)
    base = model.base_model
    ids, mask = padded_batch(model.config)
    inv = madx.invertible_adapter("en")
    with torch.no_grad():
        madx.set_active(None)
        emb_plain = base.embeddings(input_ids=ids)
        madx.set_active(Stack("en", "ner"))
        assert max_diff(base.embeddings(input_ids=ids), reference.nice_forward_reference(emb_plain, *inv.weights()))\
            < 1e-6
        # head: decoder(NICE^-1(LN(GELU(dense(h)))))
        h = base(input_ids=ids, attention_mask=mask)[0]
        if family == "xlm-roberta":
            head = model.lm_head
            z = F.layer_norm(F.gelu(head.dense(h)), (32,), head.layer_norm.weight, head.layer_norm.bias,
                             head.layer_norm.eps)
            decoder = head.decoder
        else:
            t = model.cls.predictions.transform
            z = F.layer_norm(F.gelu(t.dense(h)), (32,), t.LayerNorm.weight, t.LayerNorm.bias, t.LayerNorm.eps)
            decoder = model.cls.predictions.decoder
        want = F.linear(reference.nice_inverse_reference(z, *inv.weights()), decoder.weight, decoder.bias)
        assert max_diff(model(input_ids=ids, attention_mask=mask).logits, want) < 1e-5
        # the invertible adapter of the FIRST adapter only: "ner" first -> no NICE at all
        madx.set_active(Stack("ner", "en"))
        assert max_diff(base.embeddings(input_ids=ids), emb_plain) == 0


def test_swap_language_at_inference():
    model, madx = _madx_model()
    inputs = _inputs(model, XLMRobertaForTokenClassification)
    madx.set_active(Stack("en", "ner"))
    en = _out(model, **inputs)
    madx.active = Stack("sw", "ner")
    sw = _out(model, **inputs)
    assert max_diff(en, sw) > 1e-3
    with madx.activated(Stack("en", "ner")):
        assert max_diff(_out(model, **inputs), en) == 0
    assert madx.active == Stack("sw", "ner")
    assert max_diff(_out(model, **inputs), sw) == 0


def test_leave_out_and_per_layer_reduction_factor():
    model = _model()
    madx = add_madx(model, backend="eager")
    madx.add_adapter("t", MadxConfig(reduction_factor={"0": 4, "default": 8}, leave_out=[1]))
    layers = madx.layer_adapters("t")
    assert list(layers) == [0] and layers[0].bottleneck == 8
    madx.add_adapter("u", MadxConfig(reduction_factor={"1": 2, "default": 16}))
    assert {i: m.bottleneck for i, m in madx.layer_adapters("u").items()} == {0: 2, 1: 16}
    with pytest.raises(ValueError, match="leave_out names layer"):
        madx.add_adapter("v", MadxConfig(leave_out=[5]))
    assert "v" not in madx


def test_init_methods():
    model = _model()
    plain = copy.deepcopy(model)
    madx = add_madx(model, backend="eager")
    madx.add_adapter("m", MadxConfig(init_weights="mam_adapter"), set_active=True)
    inputs = _inputs(model, XLMRobertaForTokenClassification)
    assert max_diff(_out(model, **inputs), _out(plain, **inputs)) < 1e-6  # identity at start
    for m in madx.layer_adapters("m").values():
        assert m.adapter_down[0].bias.abs().max() == 0 and m.adapter_up.weight.abs().max() == 0
    madx.add_adapter("h", MadxConfig(init_weights="houlsby", init_weights_seed=3))
    w = [m.adapter_down[0].weight for m in madx.layer_adapters("h").values()]
    assert torch.equal(w[0], w[1]) and w[0].abs().max() <= 0.02  # seeded: the same init in every layer
    madx.add_adapter("b", MadxConfig())
    w = madx.layer_adapters("b")[0].adapter_down[0].weight
    assert 0.01 < w.std().item() < 0.04


def test_train_adapters_freezes_everything_else():
    model, madx = _madx_model()
    madx.set_active(Stack("en", "ner"))
    madx.train_adapters("ner")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".adapters.ner." in n or n.startswith("classifier")}
    assert madx.active == Stack("en", "ner")  # unchanged
    (model(**_inputs(model, XLMRobertaForTokenClassification)).logits ** 2).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)

    mlm, madx = _madx_model(XLMRobertaForMaskedLM)
    madx.train_adapters("en")
    trainable = {n for n, p in mlm.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in mlm.named_parameters()
                         if ".adapters.en." in n or "invertible_adapters.en." in n}
    madx.train_adapters(Stack("en", "ner"), train_invertible=False, train_head=True)
    trainable = {n for n, p in mlm.named_parameters() if p.requires_grad}
    assert not any("invertible" in n for n in trainable)
    assert "lm_head.dense.weight" in trainable and "roberta.embeddings.word_embeddings.weight" not in trainable


def test_bf16_backbone_with_fp32_master_adapters():
    model, madx = _madx_model()
    ref = copy.deepcopy(model)
    madx.set_active(Stack("en", "ner"))
    ref.madx.set_active(Stack("en", "ner"))
    madx.train_adapters(Stack("en", "ner"))
    madx.cast_backbone(torch.bfloat16)
    assert model.roberta.encoder.layer[0].output.LayerNorm.weight.dtype == torch.bfloat16
    assert model.roberta.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n in ("en", "ner") for p in madx.adapter_parameters(n))
    assert model.classifier.weight.dtype == torch.float32
    model.train()
    inputs = _inputs(model, XLMRobertaForTokenClassification)
    logits = model(**inputs).logits
    assert logits.dtype == torch.float32
    logits.float().pow(2).mean().backward()
    for n in ("en", "ner"):
        for p in madx.adapter_parameters(n):
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    model.eval()
    with torch.no_grad():
        want = ref(**inputs).logits
        got = model(**inputs).logits
    assert max_diff(got, want) < 0.1 * want.abs().max().item()
    madx.cast_backbone(torch.float32)  # and back
    assert max_diff(_out(model, **inputs), want) < 1e-2


def test_bf16_masked_lm_training_step():
    model, madx = _madx_model(XLMRobertaForMaskedLM)
    madx.set_active("en")
    madx.train_adapters("en")
    madx.cast_backbone(torch.bfloat16)
    assert model.lm_head.decoder.weight is model.roberta.embeddings.word_embeddings.weight or torch.equal(
        model.lm_head.decoder.weight, model.roberta.embeddings.word_embeddings.weight)
    assert model.lm_head.decoder.weight.dtype == torch.bfloat16
    ids, mask = padded_batch(model.config)
    labels = mlm_labels(ids, mask)
    model.train()
    loss = madx_mlm_loss(model, ids, mask, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    inv = madx.invertible_adapter("en")
    assert inv.F[0].weight.grad is not None and inv.F[0].weight.grad.dtype == torch.float32


def test_autocast_bf16_lines_up_residual_and_layernorm_dtypes():
    model, madx = _madx_model()
    madx.set_active(Stack("en", "ner"))
    inputs = _inputs(model, XLMRobertaForTokenClassification)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(**inputs).logits
    logits.float().sum().backward()
    assert madx.layer_adapters("ner")[0].adapter_up.weight.grad is not None


@pytest.mark.parametrize("cls,family", [(XLMRobertaForMaskedLM, "xlm-roberta"), (BertForTokenClassification, "bert")],
                         ids=["xlm-roberta", "bert"])
def test_sdpa_attention_equals_eager(cls, family):
    eager, _ = _madx_model(cls, family, attn="eager")
    sdpa, _ = _madx_model(cls, family, attn="sdpa")
    sdpa.load_state_dict(eager.state_dict())
    for model in (eager, sdpa):
        model.madx.set_active(Stack("en", "ner"))
    inputs = _inputs(eager, cls)
    assert max_diff(_out(eager, **inputs), _out(sdpa, **inputs)) < 1e-5


def test_adapter_dropout_only_in_training():
    model = _model()
    madx = add_madx(model, backend="eager")
    madx.add_adapter("d", MadxConfig(dropout=0.5), set_active=True)
    randomize(model)
    inputs = _inputs(model, XLMRobertaForTokenClassification)
    assert max_diff(_out(model, **inputs), _out(model, **inputs)) == 0
    model.train()
    torch.manual_seed(0)
    a = model(**inputs).logits
    model.roberta.embeddings.dropout.p = 0.0  # isolate the adapter dropout from HF's own
    for layer in model.roberta.encoder.layer:
        layer.output.dropout.p = 0.0
    torch.manual_seed(1)
    b = model(**inputs).logits
    assert max_diff(a, b) > 0


def test_errors_name_the_problem():
    model, madx = _madx_model()
    with pytest.raises(KeyError, match="'de'"):
        madx.set_active(Stack("en", "de"))
    with pytest.raises(AdapterExistsError, match="'en'"):
        madx.add_adapter("en", "seq_bn")
    with pytest.raises(ValueError, match="adapter name"):
        madx.add_adapter("a.b", "seq_bn")

    class Fuse:
        children = ["en", "sw"]

    with pytest.raises(ValueError, match="Fuse"):
        madx.set_active(Fuse())
    with pytest.raises(ValueError, match="twice"):
        madx.set_active(Stack("en", "en"))
    from transformers import T5Config, T5Model
    with pytest.raises(TypeError, match="'t5'"):
        add_madx(T5Model(T5Config(num_layers=1, d_model=32, d_kv=8, d_ff=64, num_heads=2, vocab_size=50)))


def test_overwrite_delete_and_remove():
    model, madx = _madx_model()
    plain = _model()
    inputs = _inputs(model, XLMRobertaForTokenClassification)
    madx.set_active(Stack("en", "ner"))
    before = _out(model, **inputs)
    madx.add_adapter("ner", MadxConfig.task(reduction_factor=4), overwrite=True)
    assert madx.layer_adapters("ner")[0].bottleneck == 8
    assert madx.active == Stack("en", "ner")
    madx.delete_adapter("en")
    assert madx.active == "ner" and "invertible_adapters.en" not in str(dict(model.named_parameters()).keys())
    assert add_madx(model) is madx  # idempotent
    madx.remove()
    assert not isinstance(model.roberta.encoder.layer[0].output, MadxFFNOutput)
    assert not model.roberta.embeddings._forward_hooks
    assert not hasattr(model, "madx")
    assert max_diff(_out(model, **inputs), _out(plain, **inputs)) == 0
    assert before.shape == _out(plain, **inputs).shape


def test_mlm_head_keeps_hf_modules_with_the_inverse_before_the_decoder():
    model = _model(XLMRobertaForMaskedLM)
    head = dict(model.lm_head.named_modules())
    add_madx(model, backend="eager")
    assert dict(model.lm_head.named_modules()) == head  # HF's own modules, nothing replaced
    hooks = list(model.lm_head.decoder._forward_pre_hooks.values())
    assert len(hooks) == 1 and isinstance(hooks[0], InvertibleHook) and hooks[0].inverse
    assert len(model.roberta.encoder.layer) == LAYERS


def test_wired_model_pickles_and_deepcopies():
    import io
    model, madx = _madx_model(XLMRobertaForMaskedLM)
    madx.set_active(Stack("en", "ner"))
    inputs = _inputs(model, XLMRobertaForMaskedLM)
    want = _out(model, **inputs)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.madx.model is loaded and loaded.madx.active == Stack("en", "ner")
    assert max_diff(_out(loaded, **inputs), want) == 0
    loaded.madx.set_active(None)  # the copy's setup is its own
    assert madx.active == Stack("en", "ner")
    clone = copy.deepcopy(model)
    assert max_diff(_out(clone, **inputs), want) == 0


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the fused add + LayerNorm on the CPU needs TRITON_INTERPRET=1")
def test_add_norm_fuses_only_where_it_pays(monkeypatch):
    """MAD-X's LN(y + a) takes the fused op for activations of at least FUSED_ADD_NORM_MIN_ELEMENTS, or while
    a CUDA graph is being captured; a smaller call keeps the module (two eager ops cost less host time)."""
    import types

    from madx_fast import ops
    from madx_fast.model import wiring
    from madx_fast.testing.gpu_plan import graph_capture
    calls = []
    real = ops.add_layer_norm
    monkeypatch.setattr(ops, "add_layer_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    ln = torch.nn.LayerNorm(8)
    y, a = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    adapter = types.SimpleNamespace(backend="triton")
    expected = ln(y + a)
    for threshold, captured, fused in ((48, False, True), (49, False, False), (49, True, True)):
        monkeypatch.setattr(wiring, "FUSED_ADD_NORM_MIN_ELEMENTS", threshold)
        calls.clear()
        with graph_capture() if captured else contextlib.nullcontext():
            out = wiring.add_norm(y, a, ln, adapter)
        assert len(calls) == int(fused), (threshold, captured)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
