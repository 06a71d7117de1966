"""madx_fast's own MAD-X stack (``add_madx``) computes AdapterHub 1.3's function on the families beyond BERT /
XLM-R: mDeBERTa's DeBERTa-v2, DistilBERT, the pre-LayerNorm XLM-R XL (through the AdapterHub interface a user
writes for it: ``tests.helpers.models.adapterhub_interface``), and the decoder LMs GPT-2, Llama and Mistral.

As in test_parity.py: the same tiny model is built twice, once with ``adapters.init`` + ``add_adapter`` and once
with ``add_madx``; AdapterHub's randomised adapter weights are copied over by state-dict key (the key names are
the same in both libraries, which this checks), then hidden states and task logits are compared (fp32, eval,
padding in the batch) for no adapter, one adapter, Stack(lang, task) and the task adapter alone, and the
gradients of every adapter parameter in train mode. LM heads with the NICE inverse before the projection are
compared with AdapterHub's flex LM heads (masked or causal: AdapterHub applies the inverse only there), and an
adapter AdapterHub saved is loaded with ``import_adapterhub`` (and one madx_fast exported, by AdapterHub).
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

from tests.helpers.models import (
    adapterhub_interface,
    assert_same_grads,
    copy_adapter_weights,
    import_adapterhub,
    max_diff,
    mlm_labels,
    padded_batch,
    randomize,
    tiny_config,
)

adapters = import_adapterhub(module_level=True)
from adapters.composition import Stack as HubStack  # noqa: E402

from madx_fast.model import MadxConfig, Stack, add_madx, madx_lm_loss  # noqa: E402

TOL = 1e-5
PAPER = {"en": adapters.SeqBnInvConfig(reduction_factor=2), "ner": adapters.SeqBnConfig()}
EXOTIC = {
    "en": adapters.SeqBnInvConfig(reduction_factor=4, non_linearity="gelu", inv_adapter_reduction_factor=4,
                                  leave_out=[0]),
    "ner": adapters.SeqBnConfig(reduction_factor={"0": 4, "default": 8}, non_linearity="tanh", scaling=0.5),
}
SETUPS = [(None, None), ("en", "en"), (Stack("en", "ner"), HubStack("en", "ner")), ("ner", "ner")]

# family -> (task class, LM class, flex head type or None (XL: AdapterHub's interface applies the inverse in the
# HF class), {flex head module index: the HF LM head module with the same weights})
FAMILIES = {
    "deberta-v2": ("DebertaV2ForTokenClassification", "DebertaV2ForMaskedLM", "masked_lm",
                   {0: "cls.predictions.transform.dense", 2: "cls.predictions.transform.LayerNorm",
                    3: "cls.predictions.decoder"}),
    "distilbert": ("DistilBertForTokenClassification", "DistilBertForMaskedLM", "masked_lm",
                   {0: "vocab_transform", 2: "vocab_layer_norm", 3: "vocab_projector"}),
    "xlm-roberta-xl": ("XLMRobertaXLForTokenClassification", "XLMRobertaXLForMaskedLM", None, {}),
    "gpt2": ("GPT2ForTokenClassification", "GPT2LMHeadModel", "causal_lm", {0: "lm_head"}),
    "llama": ("LlamaForTokenClassification", "LlamaForCausalLM", "causal_lm", {0: "lm_head"}),
    "mistral": ("MistralForTokenClassification", "MistralForCausalLM", "causal_lm", {0: "lm_head"}),
}


def _add(hub, madx, configs):
    for name, hub_cfg in configs.items():
        hub.add_adapter(name, config=hub_cfg)
        madx.add_adapter(name, MadxConfig.from_adapterhub(hub_cfg))


def task_pair(family, configs, backend="eager"):
    torch.manual_seed(0)
    ours = getattr(transformers, FAMILIES[family][0])(tiny_config(family, num_labels=5)).eval()
    hub = copy.deepcopy(ours)
    adapters.init(hub, interface=adapterhub_interface(family))
    madx = add_madx(ours, backend=backend)
    _add(hub, madx, configs)
    randomize(hub)
    if configs:
        copy_adapter_weights(hub, ours)
    return ours, hub, madx


def lm_pair(family, configs, backend="eager"):
    """HF LM class + madx vs AdapterHub's flex model with the same LM head (which applies NICE^-1), or, for
    XLM-R XL, the HF class through AdapterHub's interface (whose output-embedding hook applies it)."""
    _, lm_class, head_type, head_map = FAMILIES[family]
    torch.manual_seed(0)
    config = tiny_config(family)
    ours = getattr(transformers, lm_class)(config).eval()
    if head_type is None:
        hub = copy.deepcopy(ours)
        adapters.init(hub, interface=adapterhub_interface(family))
    else:
        hub = adapters.AutoAdapterModel.from_config(config).eval()
        _, unexpected = hub.base_model.load_state_dict(ours.base_model.state_dict(), strict=False)
        assert not unexpected
        getattr(hub, f"add_{head_type}_head")("lm", **({"layers": 1} if head_type == "causal_lm" else {}))
        with torch.no_grad():
            for index, path in head_map.items():
                module, flex = ours.get_submodule(path), hub.heads["lm"][index]
                if getattr(module, "bias", None) is not None:
                    module.bias.normal_()
                elif getattr(flex, "bias", None) is not None:  # AdapterHub's causal head has a bias; HF's none
                    flex.bias.zero_()
                flex.load_state_dict(module.state_dict(), strict=False)
        assert torch.equal(hub.heads["lm"][max(head_map)].weight, ours.get_output_embeddings().weight)
    madx = add_madx(ours, backend=backend)
    _add(hub, madx, configs)
    randomize(hub)
    copy_adapter_weights(hub, ours)
    return ours, hub, madx


def _hidden(out):
    return list(out.hidden_states) + [out.logits]


@pytest.mark.parametrize("configs", [PAPER, EXOTIC], ids=["paper", "exotic"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hidden_states_and_task_logits_match_adapterhub(family, configs):
    ours, hub, madx = task_pair(family, configs)
    ids, mask = padded_batch(ours.config)
    with torch.no_grad():
        plain = ours(input_ids=ids, attention_mask=mask).logits
    for our_setup, hub_setup in SETUPS:
        madx.set_active(our_setup)
        hub.set_active_adapters(hub_setup)
        with torch.no_grad():
            a = _hidden(ours(input_ids=ids, attention_mask=mask, output_hidden_states=True))
            b = _hidden(hub(input_ids=ids, attention_mask=mask, output_hidden_states=True))
        for x, y in zip(a, b, strict=True):
            assert max_diff(x, y) < TOL, (our_setup, max_diff(x, y))
        if our_setup is not None:  # the adapters really ran
            assert max_diff(a[-1], plain) > 1e-3


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapter_gradients_match_adapterhub(family):
    """Train mode (dropout on, the same random state): the same loss and gradients for every adapter parameter."""
    ours, hub, madx = task_pair(family, PAPER)
    ids, mask = padded_batch(ours.config)
    madx.set_active(Stack("en", "ner"))
    hub.set_active_adapters(HubStack("en", "ner"))
    losses = []
    for model in (ours, hub):
        model.train()
        torch.manual_seed(7)
        loss = (model(input_ids=ids, attention_mask=mask).logits ** 2).sum()
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < TOL * max(1.0, abs(losses[1]))
    hub_grads = {n: p.grad for n, p in hub.named_parameters() if "adapters." in n}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if "adapters." in n}
    assert assert_same_grads(hub_grads, ours_grads, TOL) >= 24  # "en" and "ner" in both layers, and the NICE


def _lm_labels(model, ids, mask):
    if FAMILIES[model.config.model_type][2] == "causal_lm":
        return ids.masked_fill(mask == 0, -100)
    return mlm_labels(ids, mask)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lm_logits_loss_and_gradients_with_nice_inverse_match_adapterhub(family):
    """MAD-X stage 1 on an LM: the NICE inverse before the (tied or untied) projection, the loss on the model's
    own objective (causal: shifted labels), and madx_lm_loss (head and projection only at the positions with a
    target) equal to it, with the same gradients for the language adapter and its NICE."""
    ours, hub, madx = lm_pair(family, PAPER)
    ids, mask = padded_batch(ours.config)
    labels = _lm_labels(ours, ids, mask)
    hub_kw = {} if FAMILIES[family][2] is None else {"head": "lm"}
    for our_setup, hub_setup in SETUPS:
        madx.set_active(our_setup)
        hub.set_active_adapters(hub_setup)
        with torch.no_grad():
            a = ours(input_ids=ids, attention_mask=mask, labels=labels)
            b = hub(input_ids=ids, attention_mask=mask, labels=labels, **hub_kw)
            fused = madx_lm_loss(ours, ids, mask, labels, chunk_size=3)
        assert max_diff(a.logits, b.logits) < TOL, our_setup
        assert abs(a.loss.item() - b.loss.item()) < TOL and abs(fused.item() - b.loss.item()) < TOL
    madx.set_active("en")
    hub.set_active_adapters("en")
    madx.train_adapters("en")
    hub.train_adapter("en")
    for model in (ours, hub):  # train mode (dropout on) from the same random state
        model.train()
    torch.manual_seed(7)
    madx_lm_loss(ours, ids, mask, labels).backward()
    torch.manual_seed(7)
    hub(input_ids=ids, attention_mask=mask, labels=labels, **hub_kw).loss.backward()
    # (AdapterHub's train_adapter leaves its LM head trainable; MAD-X keeps it frozen: adapters compared)
    hub_grads = {n: p.grad for n, p in hub.named_parameters() if p.requires_grad and "adapters." in n}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert any("invertible_adapters.en." in n for n in ours_grads)
    assert assert_same_grads(hub_grads, ours_grads, TOL) == len(hub_grads)


def test_lm_parity_with_triton_kernels():
    """A decoder LM (pre-LN placement, causal loss) through the Triton kernels (the interpreter on CPU)."""
    ours, hub, madx = lm_pair("llama", PAPER, backend="triton")
    ids, mask = padded_batch(ours.config)
    labels = _lm_labels(ours, ids, mask)
    madx.set_active(Stack("en", "ner"))
    hub.set_active_adapters(HubStack("en", "ner"))
    with torch.no_grad():
        a = madx_lm_loss(ours, ids, mask, labels)
        b = hub(input_ids=ids, attention_mask=mask, labels=labels, head="lm").loss
    assert abs(a.item() - b.item()) < TOL


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapterhub_files_round_trip(family, tmp_path):
    """An adapter AdapterHub saved loads with import_adapterhub (same outputs); one madx_fast exports loads in
    AdapterHub (same outputs)."""
    ours, hub, madx = task_pair(family, {})
    hub.add_adapter("en", config=PAPER["en"])
    randomize(hub)
    hub.save_adapter(str(tmp_path / "hub_en"), "en")
    assert madx.import_adapterhub(tmp_path / "hub_en", set_active=True) == "en"
    hub.set_active_adapters("en")
    ids, mask = padded_batch(ours.config)
    with torch.no_grad():
        assert max_diff(ours(input_ids=ids, attention_mask=mask).logits,
                        hub(input_ids=ids, attention_mask=mask).logits) < TOL
    madx.add_adapter("sw", MadxConfig.language(reduction_factor=4))
    randomize(ours, needle=".sw.", seed=3)
    madx.export_adapterhub(tmp_path / "ours_sw", "sw")
    assert hub.load_adapter(str(tmp_path / "ours_sw"), set_active=True) == "sw"
    madx.set_active("sw")
    with torch.no_grad():
        assert max_diff(ours(input_ids=ids, attention_mask=mask).logits,
                        hub(input_ids=ids, attention_mask=mask).logits) < TOL


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapterhub_flex_tagging_head_loads_into_the_hf_class(family, tmp_path):
    """A task adapter + tagging head AdapterHub trained on its flex model loads into the HF token-classification
    class (Llama names its classifier "score", GPT-2 "classifier") and gives AdapterHub's logits."""
    torch.manual_seed(0)
    config = tiny_config(family, num_labels=5)
    ours = getattr(transformers, FAMILIES[family][0])(config).eval()
    hub = adapters.AutoAdapterModel.from_config(config).eval()
    _, unexpected = hub.base_model.load_state_dict(ours.base_model.state_dict(), strict=False)
    assert not unexpected
    hub.add_adapter("ner", config=PAPER["ner"])
    hub.add_tagging_head("ner", num_labels=5, id2label={i: f"L{i}" for i in range(5)})
    randomize(hub)
    with torch.no_grad():
        for p in hub.heads["ner"].parameters():
            p.normal_()
    hub.set_active_adapters("ner")
    hub.save_adapter(str(tmp_path / "ner"), "ner", with_head=True)
    madx = add_madx(ours, backend="eager")
    assert madx.import_adapterhub(tmp_path / "ner", set_active=True, with_head=True) == "ner"
    ids, mask = padded_batch(config)
    with torch.no_grad():
        assert max_diff(ours(input_ids=ids, attention_mask=mask).logits,
                        hub(input_ids=ids, attention_mask=mask).logits) < TOL
