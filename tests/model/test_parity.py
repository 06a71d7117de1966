"""madx_fast computes the same function as AdapterHub ``adapters`` 1.3.0 (the reference library).

The same tiny XLM-R / BERT is built twice, once with ``adapters.init`` + ``add_adapter`` and once with
``add_madx``; AdapterHub's randomised adapter weights are copied over by state-dict key (the key names are
the same in both libraries, which this also checks), then hidden states, task logits and MLM logits (with
the NICE inverse: AdapterHub applies it only in its flex-head models) are compared in fp32, eval mode,
with padding in the batch, for no adapter, one adapter and Stack(lang, task).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from tests.helpers.models import (
    copy_adapter_weights,
    count_fused_backbone_calls,
    import_adapterhub,
    max_diff,
    mlm_labels,
    padded_batch,
    randomize,
    tiny_config,
)

adapters = import_adapterhub(module_level=True)
from adapters.composition import Stack as HubStack  # noqa: E402
from transformers import (  # noqa: E402
    BertForMaskedLM,
    BertForTokenClassification,
    BertModel,
    XLMRobertaForMaskedLM,
    XLMRobertaForMultipleChoice,
    XLMRobertaForQuestionAnswering,
    XLMRobertaForTokenClassification,
    XLMRobertaModel,
)

from madx_fast.model import MadxConfig, Stack, add_madx, madx_mlm_loss  # noqa: E402

TOL = 1e-4

# (AdapterHub config, name) pairs; madx_fast reads the same config through MadxConfig.from_adapterhub.
PAPER = {"en": adapters.SeqBnInvConfig(reduction_factor=2), "ner": adapters.SeqBnConfig()}
EXOTIC = {
    "en": adapters.SeqBnInvConfig(reduction_factor=4, non_linearity="gelu", inv_adapter_reduction_factor=4,
                                  leave_out=[0]),
    "ner": adapters.SeqBnConfig(reduction_factor={"0": 4, "default": 8}, non_linearity="tanh", scaling=0.5,
                                leave_out=[1]),
}
SETUPS = [(None, None), ("en", "en"), (Stack("en", "ner"), HubStack("en", "ner")), ("ner", "ner")]


def _pair(cls, family, configs, backend="eager", **cfg_kw):
    torch.manual_seed(0)
    ours = cls(tiny_config(family, **cfg_kw)).eval()
    hub = copy.deepcopy(ours)
    adapters.init(hub)
    madx = add_madx(ours, backend=backend)
    for name, hub_cfg in configs.items():
        hub.add_adapter(name, config=hub_cfg)
        madx.add_adapter(name, MadxConfig.from_adapterhub(hub_cfg))
    randomize(hub)
    copy_adapter_weights(hub, ours)
    return ours, hub, madx


def _outputs(model, ids, mask, **kw):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw)
    tensors = [t for t in out.hidden_states]
    for name in ("logits", "start_logits", "end_logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            tensors.append(getattr(out, name))
    return tensors


@pytest.mark.parametrize("configs", [PAPER, EXOTIC], ids=["paper", "exotic"])
@pytest.mark.parametrize("cls,family", [
    (XLMRobertaModel, "xlm-roberta"), (XLMRobertaForTokenClassification, "xlm-roberta"),
    (XLMRobertaForQuestionAnswering, "xlm-roberta"), (BertModel, "bert"), (BertForTokenClassification, "bert"),
], ids=lambda x: x.__name__ if isinstance(x, type) else None)
def test_hidden_states_and_task_logits_match_adapterhub(cls, family, configs):
    num_labels = 2 if cls is XLMRobertaForQuestionAnswering else 5
    ours, hub, madx = _pair(cls, family, configs, num_labels=num_labels)
    ids, mask = padded_batch(ours.config)
    plain = _outputs(ours, ids, mask)
    for our_setup, hub_setup in SETUPS:
        madx.set_active(our_setup)
        hub.set_active_adapters(hub_setup)
        a, b = _outputs(ours, ids, mask), _outputs(hub, ids, mask)
        for x, y in zip(a, b):
            assert max_diff(x, y) < TOL, (our_setup, max_diff(x, y))
        if our_setup is not None:  # the adapters really ran
            assert max_diff(a[-1], plain[-1]) > 1e-3


def test_multiple_choice_logits_match_adapterhub():
    ours, hub, madx = _pair(XLMRobertaForMultipleChoice, "xlm-roberta", PAPER)
    ids, mask = padded_batch(ours.config, batch=6, length=7)
    ids, mask = ids.view(2, 3, 7), mask.view(2, 3, 7)
    for our_setup, hub_setup in SETUPS:
        madx.set_active(our_setup)
        hub.set_active_adapters(hub_setup)
        with torch.no_grad():
            a = ours(input_ids=ids, attention_mask=mask).logits
            b = hub(input_ids=ids, attention_mask=mask).logits
        assert a.shape == (2, 3)
        assert max_diff(a, b) < TOL, our_setup


def _triton_on_cpu_or_skip():
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU models: needs TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")


def _ffn_layer_norm(name: str) -> bool:
    """A parameter of a layer's FFN-output LayerNorm: the one MAD-X's add + LayerNorm applies."""
    return ".output.LayerNorm." in name and ".attention." not in name


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_adapter_gradients_match_adapterhub(backend, monkeypatch):
    """Same loss -> same gradients for every adapter parameter (training path, Stack with NICE), and for the
    backbone's LayerNorms, which train here (nothing is frozen): with backend "triton" MAD-X's add + LayerNorm
    runs fused, its weight gradients included."""
    if backend == "triton":
        _triton_on_cpu_or_skip()
    calls = count_fused_backbone_calls(monkeypatch, "add_layer_norm")
    ours, hub, madx = _pair(XLMRobertaForTokenClassification, "xlm-roberta", PAPER, backend=backend, num_labels=5)
    ids, mask = padded_batch(ours.config)
    madx.set_active(Stack("en", "ner"))
    hub.set_active_adapters(HubStack("en", "ner"))
    for model in (ours, hub):
        (model(input_ids=ids, attention_mask=mask).logits ** 2).sum().backward()
    layers = ours.config.num_hidden_layers
    assert len(calls) == (3 * layers if backend == "triton" else 0)  # before each adapter and after the last
    compared = [n for n, _ in hub.named_parameters() if "adapters." in n or _ffn_layer_norm(n)]
    hub_grads = {n: p.grad for n, p in hub.named_parameters() if n in compared}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if n in compared}
    assert set(hub_grads) == set(ours_grads) and sum("LayerNorm" in n for n in compared) == 2 * layers
    for name, g in hub_grads.items():
        if g is None:  # not reached by this setup in AdapterHub (e.g. "ner" invertible: none exists)
            assert ours_grads[name] is None or ours_grads[name].abs().max() == 0, name
            continue
        assert max_diff(ours_grads[name], g) < TOL * max(1.0, g.abs().max().item()), name


def test_fused_add_norm_hidden_states_match_adapterhub_with_a_frozen_backbone(monkeypatch):
    """MAD-X task training: the backbone (its LayerNorms too) frozen, the fused add + LayerNorm skipping their
    gradients; outputs and the task adapter's gradients as AdapterHub's."""
    _triton_on_cpu_or_skip()
    calls = count_fused_backbone_calls(monkeypatch, "add_layer_norm")
    ours, hub, madx = _pair(XLMRobertaForTokenClassification, "xlm-roberta", PAPER, backend="triton", num_labels=5)
    ids, mask = padded_batch(ours.config)
    madx.set_active(Stack("en", "ner"))
    madx.train_adapters(Stack("en", "ner"))
    hub.set_active_adapters(HubStack("en", "ner"))
    hub.train_adapter(HubStack("en", "ner"))
    ours.eval(), hub.eval()
    outs = [model(input_ids=ids, attention_mask=mask).logits for model in (ours, hub)]
    assert max_diff(*outs) < TOL and calls
    for out in outs:
        (out ** 2).sum().backward()
    ln = [p for n, p in ours.named_parameters() if _ffn_layer_norm(n)]
    assert ln and all(not p.requires_grad and p.grad is None for p in ln)
    hub_params = dict(hub.named_parameters())
    trained = [(n, p) for n, p in ours.named_parameters() if p.requires_grad and "adapters.ner." in n]
    assert trained
    for name, p in trained:
        g = hub_params[name].grad
        assert max_diff(p.grad, g) < TOL * max(1.0, g.abs().max().item()), name


def _mlm_pair(family, configs, backend="eager"):
    """HF ...ForMaskedLM + madx vs AdapterHub's flex-head model with a masked-LM head (applies NICE^-1)."""
    torch.manual_seed(0)
    config = tiny_config(family)
    if family == "xlm-roberta":
        ours = XLMRobertaForMaskedLM(config).eval()
        hub = adapters.XLMRobertaAdapterModel(config).eval()
        base, hub_base = ours.roberta, hub.roberta
        dense, ln, bias = ours.lm_head.dense, ours.lm_head.layer_norm, ours.lm_head.bias
    else:
        ours = BertForMaskedLM(config).eval()
        hub = adapters.BertAdapterModel(config).eval()
        base, hub_base = ours.bert, hub.bert
        t = ours.cls.predictions.transform
        dense, ln, bias = t.dense, t.LayerNorm, ours.cls.predictions.bias
    with torch.no_grad():
        bias.normal_()
    _, unexpected = hub_base.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected
    hub.add_masked_lm_head("mlm")
    head = hub.heads["mlm"]
    with torch.no_grad():
        head[0].load_state_dict(dense.state_dict())
        head[2].load_state_dict(ln.state_dict())
        head[3].bias.copy_(bias)
    assert torch.equal(head[3].weight, ours.get_output_embeddings().weight)
    madx = add_madx(ours, backend=backend)
    for name, hub_cfg in configs.items():
        hub.add_adapter(name, config=hub_cfg)
        madx.add_adapter(name, MadxConfig.from_adapterhub(hub_cfg))
    randomize(hub)
    copy_adapter_weights(hub, ours)
    return ours, hub, madx


@pytest.mark.parametrize("configs", [PAPER, EXOTIC], ids=["paper", "exotic"])
@pytest.mark.parametrize("family", ["xlm-roberta", "bert"])
def test_mlm_logits_with_nice_inverse_match_adapterhub_flex_head(family, configs):
    _check_mlm_parity(*_mlm_pair(family, configs))


def test_mlm_parity_with_triton_kernels():
    """The same check with the fused Triton kernels (the interpreter on CPU; tiny shapes)."""
    pytest.importorskip("triton")
    try:
        import madx_fast.kernels.triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"Triton kernels not importable: {exc}")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU models: needs TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")
    _check_mlm_parity(*_mlm_pair("xlm-roberta", PAPER, backend="triton"))


def _check_mlm_parity(ours, hub, madx):
    ids, mask = padded_batch(ours.config)
    labels = mlm_labels(ids, mask)
    for our_setup, hub_setup in SETUPS:
        madx.set_active(our_setup)
        hub.set_active_adapters(hub_setup)
        with torch.no_grad():
            a = ours(input_ids=ids, attention_mask=mask, labels=labels)
            b = hub(input_ids=ids, attention_mask=mask, labels=labels, head="mlm")
            fused = madx_mlm_loss(ours, ids, mask, labels, chunk_size=2)
        assert max_diff(a.logits, b.logits) < TOL, our_setup
        assert abs(a.loss.item() - b.loss.item()) < TOL
        assert abs(fused.item() - b.loss.item()) < TOL
