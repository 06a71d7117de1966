"""madx_fast.patch_adapterhub on every text model type AdapterHub 1.3 puts bottleneck adapters on: the patched
model computes AdapterHub's function (loss, outputs, every gradient, fp32), as the ``XxxAdapterModel`` with its
LM head and as the HF LM class after ``adapters.init``.

Each check builds one tiny model, copies it, patches the copy, and runs both from the same random state in
train mode (dropout on) with a language adapter + NICE ("en") stacked under a task adapter at every placement
the model has (attention, cross-attention and FFN outputs: ``double_seq_bn`` with ``cross_adapter``). A spy on
madx_fast's ops tells that the fused path ran: the NICE forward once (on the encoder's embeddings), its inverse
where AdapterHub applies it (flex LM heads; plugin-interface models), the fused cross-entropy once.
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

from tests.helpers.models import (
    Spy,
    adapterhub_interface,
    assert_same,
    import_adapterhub,
    mlm_labels,
    padded_batch,
    randomize,
    run,
    tiny_config,
)

adapters = import_adapterhub(module_level=True)
from adapters.composition import Stack  # noqa: E402

import madx_fast  # noqa: E402
from madx_fast import adapterhub_patch  # noqa: E402

LANG = adapters.SeqBnInvConfig(reduction_factor=2)
TASK = adapters.DoubleSeqBnConfig(reduction_factor=4, cross_adapter=True, non_linearity="gelu")
SETUP = Stack("en", "ner")

# model type -> (flex head, HF LM class, objective)
TEXT_TYPES = {
    "albert": ("masked_lm", "AlbertForMaskedLM"),
    "bart": ("seq2seq_lm", "BartForConditionalGeneration"),
    "bert": ("masked_lm", "BertForMaskedLM"),
    "bert-generation": ("causal_lm", "BertGenerationDecoder"),
    "deberta": ("masked_lm", "DebertaForMaskedLM"),
    "deberta-v2": ("masked_lm", "DebertaV2ForMaskedLM"),
    "distilbert": ("masked_lm", "DistilBertForMaskedLM"),
    "electra": ("masked_lm", "ElectraForMaskedLM"),
    "gpt2": ("causal_lm", "GPT2LMHeadModel"),
    "gptj": ("causal_lm", "GPTJForCausalLM"),
    "llama": ("causal_lm", "LlamaForCausalLM"),
    "mbart": ("seq2seq_lm", "MBartForConditionalGeneration"),
    "mistral": ("causal_lm", "MistralForCausalLM"),
    "mt5": ("seq2seq_lm", "MT5ForConditionalGeneration"),
    "plbart": ("seq2seq_lm", "PLBartForConditionalGeneration"),
    "roberta": ("causal_lm", "RobertaForCausalLM"),  # an encoder family trained as a decoder
    "t5": ("seq2seq_lm", "T5ForConditionalGeneration"),
    "xlm-roberta": ("masked_lm", "XLMRobertaForMaskedLM"),
    "xmod": ("masked_lm", "XmodForMaskedLM"),
}
TRITON = {"llama", "t5"}  # also through the Triton kernels (interpreter on CPU): pre-LN and seq2seq placements


def _config(family):
    config = tiny_config(family)
    if TEXT_TYPES[family][0] == "causal_lm" and family in ("bert-generation", "roberta"):
        config.is_decoder = True  # an encoder family as a decoder: causal attention
        config.use_cache = False  # (AdapterHub's BertGeneration layers cannot take HF's cache objects)
    return config


def _add_adapters(model):
    model.add_adapter("en", config=LANG)
    model.add_adapter("ner", config=TASK)
    randomize(model)
    model.set_active_adapters(SETUP)
    model.train_adapter(SETUP)
    return model


def flex_model(family):
    torch.manual_seed(0)
    model = adapters.AutoAdapterModel.from_config(_config(family))
    head = TEXT_TYPES[family][0]
    getattr(model, f"add_{head}_head")("lm")
    return _add_adapters(model)


def hf_model(family):
    torch.manual_seed(0)
    model = getattr(transformers, TEXT_TYPES[family][1])(_config(family))
    adapters.init(model)
    return _add_adapters(model)


def encoder_decoder_model():
    """bert2bert: AdapterHub relays the decoder's invertible adapters to the encoder's and skips the forward NICE
    on the decoder's embeddings."""
    torch.manual_seed(0)
    decoder_config = tiny_config("bert", is_decoder=True, add_cross_attention=True)
    model = transformers.EncoderDecoderModel(encoder=transformers.BertModel(tiny_config("bert")),
                                             decoder=transformers.BertLMHeadModel(decoder_config))
    model.config.decoder_start_token_id, model.config.pad_token_id = 2, 0
    adapters.init(model)
    return _add_adapters(model)


def lm_batch(config, objective, flex):
    ids, mask = padded_batch(config)
    if objective == "masked_lm":
        return dict(input_ids=ids, attention_mask=mask, labels=mlm_labels(ids, mask))
    if objective == "causal_lm":
        return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    targets, target_mask = padded_batch(config, length=7, seed=1)
    batch = dict(input_ids=ids, attention_mask=mask, labels=targets.masked_fill(target_mask == 0, -100))
    if flex:  # AdapterHub's BART-family flex models take the decoder inputs as given (HF classes shift the labels)
        batch["decoder_input_ids"] = targets
    return batch


def _compare(hub, ours, batch, monkeypatch, *, nice_inverse, fused_loss=True):
    spy = Spy(monkeypatch)
    a, b = run(hub, batch, train=True), run(ours, batch, train=True)
    assert a[1].get("logits") is not None and (b[1].get("logits") is None) == fused_loss  # only the loss computed
    assert assert_same(a, b, logits=False) >= 12  # "en" + NICE + "ner" at every placement
    assert spy.calls["nice_forward"] == 1 and spy.calls["nice_inverse"] == nice_inverse
    assert spy.calls["fused_linear_cross_entropy"] == int(fused_loss) and spy.calls["bottleneck_adapter"] >= 4
    eval_batch = {k: v for k, v in batch.items() if k != "labels"}
    if "decoder_input_ids" not in eval_batch and "labels" in batch and hub.config.is_encoder_decoder:
        eval_batch["decoder_input_ids"] = hub.prepare_decoder_input_ids_from_labels(batch["labels"])
    assert_same(run(hub, eval_batch, False, False), run(ours, eval_batch, False, False))  # logits compared


@pytest.mark.parametrize("kind", ["flex", "hf"])
@pytest.mark.parametrize("family", sorted(TEXT_TYPES))
def test_lm_matches_adapterhub(family, kind, monkeypatch):
    """The ``XxxAdapterModel`` with its LM head (which applies the NICE inverse), and the HF LM class after
    ``adapters.init`` (where AdapterHub applies none)."""
    flex = kind == "flex"
    hub = flex_model(family) if flex else hf_model(family)
    ours = copy.deepcopy(hub)
    report = madx_fast.patch_adapterhub(ours, backend="triton" if family in TRITON else "eager")
    fused_loss = f"{TEXT_TYPES[family][0]} head 'lm'" if flex else "-LM loss of"
    assert report.fully_patched and any(fused_loss in p for p in report.patched), str(report)
    batch = lm_batch(hub.config, TEXT_TYPES[family][0], flex=flex)
    _compare(hub, ours, batch, monkeypatch, nice_inverse=int(flex))


def test_encoder_decoder_matches_adapterhub_with_the_decoder_skipping_nice(monkeypatch):
    hub = encoder_decoder_model()
    ours = copy.deepcopy(hub)
    assert madx_fast.patch_adapterhub(ours).fully_patched
    decoder_base = ours.decoder.base_model
    assert not isinstance(decoder_base.__dict__["invertible_adapters_forward"], adapterhub_patch._Override)
    batch = lm_batch(hub.config.encoder, "seq2seq_lm", flex=False)
    _compare(hub, ours, batch, monkeypatch, nice_inverse=0)  # the NICE forward once: the encoder's


def test_causal_lm_tuple_output_and_num_items_in_batch(monkeypatch):
    """HF's causal loss with ``num_items_in_batch`` (what Trainer passes under gradient accumulation): the sum
    over the batch's targets divided by it; tuple outputs keep AdapterHub's positions (loss, logits=None, ...)."""
    hub = hf_model("llama")
    ours = copy.deepcopy(hub)
    madx_fast.patch_adapterhub(ours, backend="eager")
    batch = lm_batch(hub.config, "causal_lm", flex=False)
    for n in (7, torch.tensor(11.0)):
        a, b = run(hub, dict(batch, num_items_in_batch=n), True), run(ours, dict(batch, num_items_in_batch=n), True)
        assert assert_same(a, b, logits=False) > 0
    ours.eval()
    with torch.no_grad():
        t = ours(**batch, return_dict=False)
        want = hub.eval()(**batch).loss
    assert t[1] is None and abs(t[0].item() - want.item()) < 1e-5


def test_causal_lm_with_explicit_shift_labels_runs_on_adapterhub(monkeypatch):
    hub = hf_model("llama").eval()
    ours = copy.deepcopy(hub)
    madx_fast.patch_adapterhub(ours, backend="eager")
    batch = lm_batch(hub.config, "causal_lm", flex=False)
    spy = Spy(monkeypatch)
    with torch.no_grad():
        a, b = hub(**batch, shift_labels=batch["labels"]), ours(**batch, shift_labels=batch["labels"])
    assert b.logits is not None and torch.equal(a.loss, b.loss) and spy.calls["fused_linear_cross_entropy"] == 0


def test_keep_lm_logits_on_a_causal_flex_head(monkeypatch):
    hub = flex_model("gpt2")
    ours = copy.deepcopy(hub)
    report = madx_fast.patch_adapterhub(ours, keep_lm_logits=True, backend="eager")
    assert report.keep_lm_logits and report.keep_mlm_logits
    spy = Spy(monkeypatch)
    batch = lm_batch(hub.config, "causal_lm", flex=True)
    assert_same(run(hub, batch, True), run(ours, batch, True))  # logits compared too
    assert spy.calls["fused_linear_cross_entropy"] == 0 and spy.calls["nice_inverse"] == 1


# --------------------------------------------------------------------------------------------------------
# Plugin-interface models: AdapterHub's built-in interfaces, and one a user writes (XLM-R XL, pre-LN)
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,family,interface", [
    ("Qwen2ForCausalLM", "qwen2", None), ("Qwen3ForCausalLM", "qwen3", None), ("Gemma2ForCausalLM", "gemma2", None),
    ("Gemma3ForCausalLM", "gemma3_text", None), ("PhiForCausalLM", "phi", None),
    ("ModernBertForMaskedLM", "modernbert", None),
    ("XLMRobertaXLForMaskedLM", "xlm-roberta-xl", adapterhub_interface("xlm-roberta-xl")),
], ids=lambda x: x if isinstance(x, str) and "For" not in x else None)
def test_plugin_interface_model_matches_adapterhub(cls, family, interface, monkeypatch):
    """Hooked bottleneck layers (pre-LN blocks: the residual taken where the block begins; Gemma's post-FFN norms;
    Phi's parallel block without one) and the invertible-adapter layer, whose inverse AdapterHub runs before the
    output embeddings, in HF classes too. (ModernBERT's MLM head is not one madx_fast knows: its loss stays
    AdapterHub's, and the report says so.)"""
    torch.manual_seed(0)
    hub = getattr(transformers, cls)(tiny_config(family))
    adapters.init(hub, interface=interface)
    hub.add_adapter("en", config=LANG)
    hub.add_adapter("ner", config=adapters.SeqBnConfig(reduction_factor=4))
    randomize(hub)
    hub.set_active_adapters(SETUP)
    hub.train_adapter(SETUP)
    ours = copy.deepcopy(hub)
    report = madx_fast.patch_adapterhub(ours, backend="eager")
    known_head = family != "modernbert"
    assert report.fully_patched == known_head, str(report)
    objective = "causal_lm" if "Causal" in cls else "masked_lm"
    _compare(hub, ours, lm_batch(hub.config, objective, flex=False), monkeypatch, nice_inverse=1,
             fused_loss=known_head)


def test_vision_models_stay_on_adapterhub_code():
    torch.manual_seed(0)
    hub = adapters.AutoAdapterModel.from_config(tiny_config("vit"))
    hub.add_image_classification_head("cls", num_labels=3)
    hub.add_adapter("a", config=adapters.SeqBnConfig(reduction_factor=4))
    hub.set_active_adapters("a")
    ours = copy.deepcopy(hub)
    before = {n: dict(m.__dict__) for n, m in ours.named_modules()}
    report = madx_fast.patch_adapterhub(ours)
    assert not report.patched and "vision / audio" in report.not_patched[0]
    assert {n: dict(m.__dict__) for n, m in ours.named_modules()}.keys() == before.keys()
    assert not any(isinstance(v, adapterhub_patch._Override) for m in ours.modules() for v in m.__dict__.values())
    pixels = torch.randn(2, 3, 8, 8)
    hub.eval(), ours.eval()
    with torch.no_grad():
        assert torch.equal(hub(pixel_values=pixels).logits, ours(pixel_values=pixels).logits)
