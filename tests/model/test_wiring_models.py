"""MAD-X wiring on the families beyond BERT / XLM-R (DeBERTa-v2, DistilBERT, XLM-R XL, GPT-2, Llama, Mistral),
checked against docs/spec.md's formulas directly (no ``adapters`` needed: these tests also run with
transformers 5.x): placement in post-LN and pre-LN blocks, NICE on the embedding output and its inverse before
the (tied or untied) LM projection, the causal-LM loss at the positions with a target, freezing, pickling,
per-row languages, bf16 and torch.compile on a decoder."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
import transformers

from madx_fast import reference
from madx_fast.model import AdapterFileError, MadxConfig, PerRow, Stack, add_madx, madx_lm_loss
from madx_fast.model.inputs import mlm_positions
from madx_fast.model.wiring import InvertibleHook, MadxAdapterSlot, backbone_for
from tests.helpers.models import max_diff, mlm_labels, padded_batch, randomize, tiny_config

# family -> (LM class, task class, layers of the base model, the embedding-output module, the projection)
FAMILIES = {
    "deberta-v2": ("DebertaV2ForMaskedLM", "DebertaV2ForTokenClassification"),
    "distilbert": ("DistilBertForMaskedLM", "DistilBertForTokenClassification"),
    "xlm-roberta-xl": ("XLMRobertaXLForMaskedLM", "XLMRobertaXLForTokenClassification"),
    "gpt2": ("GPT2LMHeadModel", "GPT2ForTokenClassification"),
    "llama": ("LlamaForCausalLM", "LlamaForTokenClassification"),
    "mistral": ("MistralForCausalLM", "MistralForTokenClassification"),
}
CAUSAL = ("gpt2", "llama", "mistral")


def _model(family, lm=True, **kw):
    torch.manual_seed(0)
    cls = getattr(transformers, FAMILIES[family][0 if lm else 1])
    return cls(tiny_config(family, **({} if lm else {"num_labels": 5}), **kw)).eval()


def _madx(model, backend="eager", langs=("en",)):
    madx = add_madx(model, backend=backend)
    for lang in langs:
        madx.add_adapter(lang, MadxConfig.language())
    madx.add_adapter("ner", MadxConfig.task(reduction_factor=4))
    randomize(model)
    return madx


def _labels(family, ids, mask):
    return ids.masked_fill(mask == 0, -100) if family in CAUSAL else mlm_labels(ids, mask)


def _keep(store, key, index=0):
    """A forward (pre-)hook that keeps an argument (``index``) or the output (``index=None``) in ``store``."""
    def hook(module, args, output=None):
        store[key] = output if index is None else args[index]
    return hook


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("lm", [True, False], ids=["lm", "task"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_no_active_adapter_is_the_unmodified_model_and_keys_are_adapterhubs(family, lm):
    plain = _model(family, lm)
    model = copy.deepcopy(plain)
    keys_before = set(model.state_dict())
    madx = _madx(model)
    ids, mask = padded_batch(model.config)
    assert torch.equal(_logits(model, ids, mask), _logits(plain, ids, mask))
    keys_after = set(model.state_dict())
    assert keys_before <= keys_after
    backbone, prefix = backbone_for(family), model.base_model_prefix
    layer_prefix = f"{prefix}.{backbone.layers}."
    for key in keys_after - keys_before:
        assert key.startswith(f"{prefix}.invertible_adapters.en.") or (
            key.startswith(layer_prefix) and f".{backbone.slot}.adapters." in key), key
    madx.set_active(Stack("en", "ner"))
    assert max_diff(_logits(model, ids, mask), _logits(plain, ids, mask)) > 1e-3
    madx.remove()
    assert torch.equal(_logits(model, ids, mask), _logits(plain, ids, mask))
    assert set(model.state_dict()) == keys_before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _adapter(madx, name, layer):
    ad = madx.layer_adapters(name)[layer]
    return lambda x, r: reference.bottleneck_adapter_reference(x, r, ad.adapter_down[0].weight, ad.adapter_down[0].bias,
                                                               ad.adapter_up.weight, ad.adapter_up.bias, 1.0, "relu")


@pytest.mark.parametrize("family", ["llama", "gpt2", "xlm-roberta-xl"])
def test_pre_ln_block_follows_the_spec_for_a_stack(family):
    """Pre-LN (AdapterHub's placement for GPT-2 / Llama, and its interface placement for XLM-R XL): with a the
    residual stream entering the FFN block and f the block's FFN output,
    y_0 = f, y_k = y_{k-1} + A_k(y_{k-1} + a), block output = a + y_K."""
    model = _model(family)
    madx = _madx(model)
    madx.set_active(Stack("en", "ner"))
    backbone = backbone_for(family)
    layer = model.base_model.get_submodule(backbone.layers)[1]
    seen = {}
    norm, ffn = layer.get_submodule(backbone.residual), layer.get_submodule(backbone.ffn)
    handles = [norm.register_forward_pre_hook(_keep(seen, "a")), layer.register_forward_hook(_keep(seen, "out", None))]
    ids, mask = padded_batch(model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        for h in handles:
            h.remove()
        a = seen["a"]
        if family == "xlm-roberta-xl":  # the FFN block: dense(intermediate(LN(a))), then + a
            f = ffn.forward(layer.intermediate(norm(a)))
        else:
            f = ffn.forward(norm(a))  # the HF module's own forward, without the hook
        y = f
        for name in ("en", "ner"):
            y = y + _adapter(madx, name, 1)(y + a, torch.zeros_like(y))
        out = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
    assert max_diff(out, a + y) < 1e-5


def test_distilbert_post_ln_block_follows_the_spec():
    """Post-LN (AdapterHub's DistilBERT placement): y_k = y_{k-1} + A_k(LN(y_{k-1} + a)), output LN(y_K + a)."""
    model = _model("distilbert")
    madx = _madx(model)
    madx.set_active(Stack("en", "ner"))
    layer = model.distilbert.transformer.layer[0]
    seen = {}
    handles = [layer.ffn.register_forward_pre_hook(_keep(seen, "a")),
               layer.register_forward_hook(_keep(seen, "out", None))]
    ids, mask = padded_batch(model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        for h in handles:
            h.remove()
        a, ln = seen["a"], layer.output_layer_norm
        y = layer.ffn.forward(a)
        for name in ("en", "ner"):
            y = y + _adapter(madx, name, 0)(ln(y + a), torch.zeros_like(y))
    out = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
    assert max_diff(out, ln(y + a)) < 1e-5


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_nice_on_the_embedding_output_and_inverse_before_the_projection(family):
    """logits = W NICE^-1(head transform(h)) + b, with the first adapter's NICE on the embedding output; tied
    (GPT-2, the encoders) or untied (Llama, Mistral) projection."""
    model = _model(family)
    madx = _madx(model)
    inv = madx.invertible_adapter("en")
    head = madx.parts.lm_head
    assert isinstance(list(head.decoder._forward_pre_hooks.values())[0], InvertibleHook)
    tied = head.weight is model.get_input_embeddings().weight
    assert tied == (family not in ("llama", "mistral"))
    ids, mask = padded_batch(model.config)
    seen = {}
    handle = madx.parts.embeddings.register_forward_hook(_keep(seen, "e", None))  # runs after madx's own hook
    with torch.no_grad():
        madx.set_active(None)
        plain = model.base_model(input_ids=ids, attention_mask=mask)[0]
        e = seen["e"]
        madx.set_active(Stack("en", "ner"))
        h = model.base_model(input_ids=ids, attention_mask=mask)[0]
        assert max_diff(seen["e"], reference.nice_forward_reference(e, *inv.weights())) < 1e-5
        want = F.linear(reference.nice_inverse_reference(head.decoder_input(h), *inv.weights()), head.weight,
                        head.bias)
        assert max_diff(_logits(model, ids, mask), want) < 1e-5 and max_diff(h, plain) > 1e-3
        madx.set_active(Stack("ner", "en"))  # the first adapter's NICE only: "ner" has none
        model.base_model(input_ids=ids, attention_mask=mask)
        assert torch.equal(seen["e"], e)
    handle.remove()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lm_loss_equals_the_models_and_its_gradients(family):
    """madx_lm_loss (the model's objective: causal = shifted labels) = model(labels=...).loss, with the same
    gradients; the positions form (no host sync) and reduction="sum" agree."""
    model = _model(family)
    madx = _madx(model)
    madx.set_active("en")
    madx.train_adapters("en")
    ids, mask = padded_batch(model.config)
    labels = _labels(family, ids, mask)
    assert madx.parts.lm_head.objective == ("causal" if family in CAUSAL else "masked")
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    got = madx_lm_loss(model, ids, mask, labels, chunk_size=4)
    got.backward()
    assert abs(got.item() - want.item()) < 1e-5
    assert want_grads and any("invertible_adapters" in n for n in want_grads)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert max_diff(p.grad, want_grads[n]) < 1e-5 * max(1.0, want_grads[n].abs().max().item()), n
    pos, tgt = mlm_positions(labels, multiple=8, shift=family in CAUSAL)
    with torch.no_grad():
        assert abs(madx_lm_loss(model, ids, mask, positions=pos, targets=tgt).item() - want.item()) < 1e-5
        total = madx_lm_loss(model, ids, mask, positions=pos, targets=tgt, reduction="sum")
    n_targets = int((tgt != -100).sum())
    assert abs(total.item() / n_targets - want.item()) < 1e-5


def test_objective_override_and_bad_arguments():
    model = _model("llama")
    _madx(model)
    ids, mask = padded_batch(model.config)
    labels = _labels("llama", ids, mask)
    with torch.no_grad():
        causal = madx_lm_loss(model, ids, mask, labels)
        same_position = madx_lm_loss(model, ids, mask, labels, objective="masked")
    assert abs(causal.item() - same_position.item()) > 1e-4  # another target per position
    with pytest.raises(ValueError, match="objective"):
        madx_lm_loss(model, ids, mask, labels, objective="seq2seq")
    with pytest.raises(TypeError, match="no masked-LM or causal-LM head"):
        task = _model("llama", lm=False)
        _madx(task)
        madx_lm_loss(task, ids, mask, labels)


@pytest.mark.parametrize("family", CAUSAL)
def test_train_adapters_keeps_the_lm_head_frozen_and_it_is_no_task_head(family):
    model = _model(family)
    madx = _madx(model)
    madx.train_adapters("en")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if ".adapters.en." in n or "invertible_adapters.en." in n}
    with pytest.raises(AdapterFileError, match="causal-LM head"):
        madx.head_state_dict()
    task = _model(family, lm=False)
    madx = _madx(task)
    madx.train_adapters(Stack("en", "ner"))
    head = {n for n, p in task.named_parameters() if p.requires_grad and not n.startswith(f"{task.base_model_prefix}.")}
    assert head == {n for n, _ in task.named_parameters() if n.startswith(("classifier.", "score."))} and head


def test_wired_decoder_pickles_and_deepcopies():
    model = _model("llama")
    madx = _madx(model)
    madx.set_active(Stack("en", "ner"))
    ids, mask = padded_batch(model.config)
    want = _logits(model, ids, mask)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(_logits(loaded, ids, mask), want)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.madx.layer_adapters("ner")[0].adapter_up.bias.add_(1.0)
    assert torch.equal(_logits(model, ids, mask), want) and not torch.equal(_logits(clone, ids, mask), want)
    loaded.madx.set_active(None)  # each copy's setup is its own
    assert madx.active == Stack("en", "ner")
    clone.madx.remove()
    assert torch.equal(_logits(model, ids, mask), want)
    slot = model.model.layers[0].output_adapters
    assert isinstance(slot, MadxAdapterSlot) and slot._residual is None  # nothing kept between forwards


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_per_row_languages_on_a_decoder(family):
    """Stack(PerRow(...), task) on a decoder: every row equals its language alone, and the causal LM loss
    inverts each row's own NICE."""
    model = _model(family)
    madx = _madx(model, backend="eager", langs=("en", "sw"))
    ids, mask = padded_batch(model.config, batch=3)
    langs = ["sw", "en", "sw"]
    madx.set_active(Stack(PerRow("en", "sw"), "ner"))
    with madx.row_languages(langs):
        got = _logits(model, ids, mask)
        labels = _labels(family, ids, mask)
        with torch.no_grad():
            mixed = madx_lm_loss(model, ids, mask, labels, reduction="sum")
    total = 0.0
    for b, lang in enumerate(langs):
        madx.set_active(Stack(lang, "ner"))
        row = _logits(model, ids[b:b + 1], mask[b:b + 1])[0]
        keep = mask[b].bool()
        assert max_diff(got[b][keep], row[keep]) < 1e-5
        with torch.no_grad():
            total += madx_lm_loss(model, ids[b:b + 1], mask[b:b + 1], labels[b:b + 1], reduction="sum").item()
    assert abs(mixed.item() - total) < 1e-4


def test_bf16_decoder_training_step_with_fp32_master_adapters():
    model = _model("llama")
    madx = _madx(model)
    madx.set_active("en")
    madx.train_adapters("en")
    madx.cast_backbone(torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in madx.adapter_parameters("en"))
    ids, mask = padded_batch(model.config)
    model.train()
    loss = madx_lm_loss(model, ids, mask, _labels("llama", ids, mask))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in madx.adapter_parameters("en"))


def test_decoder_base_compiles_fullgraph_with_equal_gradients():
    """The training path compiles the base model with fullgraph=True: the hooks (residual kept between two
    modules of a layer, adapters at the FFN output, NICE on the embeddings) trace without a graph break."""
    model = _model("llama")
    madx = _madx(model)
    madx.set_active(Stack("en", "ner"))
    madx.train_adapters("ner")
    model.train()
    eager = copy.deepcopy(model)
    ids, mask = padded_batch(model.config)
    labels = _labels("llama", ids, mask)
    model.model.compile(backend="aot_eager", fullgraph=True)
    madx_lm_loss(model, ids, mask, labels).backward()
    madx_lm_loss(eager, ids, mask, labels).backward()
    grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    assert grads and all(".adapters.ner." in n for n in grads)
    for n, p in model.named_parameters():
        if n in grads:
            assert max_diff(p.grad, grads[n]) < 1e-5, n


def test_non_legacy_deberta_head_is_refused_by_name():
    model = transformers.DebertaV2ForMaskedLM(tiny_config("deberta-v2", legacy=False))
    with pytest.raises(TypeError, match="legacy=False"):
        add_madx(model)
    assert not hasattr(model, "madx")
