"""``Average``: several adapters' outputs averaged with weights in every layer (AdapterHub 1.3's composition block).

The same tiny model is built with AdapterHub and with madx_fast, with the same adapter weights. AdapterHub's
``Average`` computes ``torch.mean`` over the weighted outputs, ``(1/n) sum_i w_i h_i``;
``Average(..., adapterhub_compat=True)`` must equal it, and madx_fast's own ``Average`` (``sum_i w_i h_i``)
must equal AdapterHub's with the weights multiplied by n and not normalised. Forward and every gradient, in
fp32, on the eager and the fused (Triton) backends; with a task adapter stacked above, alone, per row, and
with adapters of different configurations."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import XLMRobertaForMaskedLM, XLMRobertaForTokenClassification

from madx_fast.model import Average, MadxConfig, PerRow, Stack, add_madx
from tests.helpers.models import (assert_same_grads, copy_adapter_weights, import_adapterhub, max_diff, padded_batch,
                                  randomize, tiny_config)

TOL = 1e-5
BACKENDS = ["eager", "triton"]


def _hub():
    adapters = import_adapterhub()
    from adapters.composition import Average as HubAverage
    from adapters.composition import Stack as HubStack
    return adapters, HubAverage, HubStack


def _pair(cls=XLMRobertaForTokenClassification, backend="eager", configs=None):
    adapters, _, _ = _hub()
    configs = configs or {"es": adapters.SeqBnInvConfig(reduction_factor=2),
                          "pt": adapters.SeqBnInvConfig(reduction_factor=2),
                          "it": adapters.SeqBnInvConfig(reduction_factor=2), "ner": adapters.SeqBnConfig()}
    torch.manual_seed(0)
    ours = cls(tiny_config("xlm-roberta", num_labels=3, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)).eval()
    hub = copy.deepcopy(ours)
    adapters.init(hub)
    madx = add_madx(ours, backend=backend)
    for name, cfg in configs.items():
        hub.add_adapter(name, config=cfg)
        madx.add_adapter(name, MadxConfig.from_adapterhub(cfg))
    randomize(hub)
    copy_adapter_weights(hub, ours)
    return ours, hub, madx


def _run(model, ids, mask, train_params=True):
    """Logits and the gradient of every adapter and head parameter of one forward + backward."""
    model.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        p.requires_grad_(train_params and ("adapters." in name or "classifier" in name))
    out = model(input_ids=ids, attention_mask=mask).logits
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_weights_as_adapterhub_handles_them():
    _, HubAverage, _ = _hub()
    for kwargs in ({}, {"weights": [0.7, 0.3]}, {"weights": [2, 6]}, {"weights": [2, 6], "normalize_weights": False}):
        ours = Average("a", "b", **kwargs)
        hub = HubAverage("a", "b", **kwargs)
        assert list(ours.weights) == pytest.approx(hub.weights)
    assert Average("a", "b").mix() == (0.5, 0.5)
    assert Average("a", "b", adapterhub_compat=True).mix() == (0.25, 0.25)
    assert Average("a", "b", weights=[1, 3]) == Average("a", "b", weights=[0.25, 0.75])
    assert Average("a", "b") != Average("a", "b", adapterhub_compat=True)
    w = torch.tensor([1.0, 3.0], requires_grad=True)
    mix = Average("a", "b", weights=w).mix()
    assert torch.allclose(mix, torch.tensor([0.25, 0.75])) and mix.requires_grad


@pytest.mark.parametrize("bad,match", [
    (dict(names=()), "at least one"), (dict(names=("a", "a")), "twice"), (dict(weights=[1.0]), "2 adapters got 1 weights"),
    (dict(weights=[1.0, -1.0]), "sum to 0"), (dict(weights=[1.0, float("nan")]), "finite"),
    (dict(weights=["x", 1]), "numbers"), (dict(names=("a", Stack("b"))), "names only"),
    (dict(weights=torch.ones(3)), "one weight per adapter"),
])
def test_bad_averages_are_refused(bad, match):
    names = bad.pop("names", ("a", "b"))
    with pytest.raises(ValueError, match=match):
        Average(*names, **bad)


def _setups(compat: bool, weights=(0.7, 0.3)):
    """(ours, AdapterHub's) pairs of the same function."""
    _, HubAverage, HubStack = _hub()
    n = len(weights)
    hub_avg = (HubAverage("es", "pt", weights=list(weights)) if compat else
               HubAverage("es", "pt", weights=[n * w for w in weights], normalize_weights=False))
    ours_avg = Average("es", "pt", weights=list(weights), adapterhub_compat=compat)
    return [(Stack(ours_avg, "ner"), HubStack(hub_avg, "ner")), (ours_avg, hub_avg)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compat", [True, False], ids=["adapterhub_compat", "weighted_average"])
def test_average_equals_adapterhub_forward_and_gradients(backend, compat):
    ours, hub, madx = _pair(backend=backend)
    ids, mask = padded_batch(ours.config)
    for ours_setup, hub_setup in _setups(compat):
        madx.set_active(ours_setup)
        hub.set_active_adapters(hub_setup)
        out_a, grads_a = _run(ours, ids, mask)
        out_b, grads_b = _run(hub, ids, mask)
        assert max_diff(out_a, out_b) < TOL, (ours_setup, max_diff(out_a, out_b))
        reached = assert_same_grads(grads_a, grads_b, TOL)
        assert reached >= 2 * 4 * 2 + 2  # es and pt in both layers, and the head (and ner with the Stack)


def test_an_average_runs_as_one_grouped_launch_forward_and_backward(monkeypatch):
    """Stack(Average of 3, "ner") on Triton: per layer ONE averaged-adapter launch forward and ONE backward for
    the three adapters (not three adapter launches and a sum); single-adapter launches only for "ner"."""
    import madx_fast.kernels.triton as launchers
    ours, _, madx = _pair(backend="triton")
    calls = {}
    for name in ("average_adapter_forward", "average_adapter_backward", "adapter_forward", "adapter_backward"):
        def counting(*args, _name=name, _fn=getattr(launchers, name), **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(launchers, name, counting)
    ids, mask = padded_batch(ours.config)
    madx.set_active(Stack(Average("es", "pt", "it"), "ner"))
    _run(ours, ids, mask)
    layers = ours.config.num_hidden_layers
    assert calls == {"average_adapter_forward": layers, "average_adapter_backward": layers,
                     "adapter_forward": layers, "adapter_backward": layers}


def test_adapterhub_average_blocks_are_read_with_adapterhubs_arithmetic():
    ours, hub, madx = _pair()
    _, HubAverage, HubStack = _hub()
    ids, mask = padded_batch(ours.config)
    setup = HubStack(HubAverage("es", "pt", weights=[0.4, 0.6]), "ner")
    madx.set_active(setup)
    assert madx.active == Stack(Average("es", "pt", weights=[0.4, 0.6], adapterhub_compat=True), "ner")
    hub.set_active_adapters(setup)
    with torch.no_grad():
        assert max_diff(ours(input_ids=ids, attention_mask=mask).logits,
                        hub(input_ids=ids, attention_mask=mask).logits) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_average_of_one_is_that_adapter_and_weights_follow_the_mix(backend):
    ours, _, madx = _pair(backend=backend)
    ids, mask = padded_batch(ours.config)
    with torch.no_grad():
        madx.set_active(Stack("es", "ner"))
        es = ours(input_ids=ids, attention_mask=mask).logits
        madx.set_active(Stack(Average("es"), "ner"))
        assert max_diff(ours(input_ids=ids, attention_mask=mask).logits, es) < TOL
        madx.set_active(Stack(Average("es", "pt", weights=[1.0, 0.0]), "ner"))
        assert max_diff(ours(input_ids=ids, attention_mask=mask).logits, es) < TOL
        madx.set_active(Stack(Average("es", "pt"), "ner"))
        assert max_diff(ours(input_ids=ids, attention_mask=mask).logits, es) > 1e-3


def test_only_the_first_adapters_invertible_adapter_runs():
    """Masked LM: the NICE of the first adapter runs on the embeddings and, inverted, before the decoder."""
    ours, _, madx = _pair(XLMRobertaForMaskedLM)
    ids, mask = padded_batch(ours.config)
    calls = []
    for name in ("es", "pt"):
        inv = madx.invertible_adapter(name)
        inv.register_forward_hook(lambda m, a, o, name=name: calls.append(name))
    madx.set_active(Average("pt", "es"))
    with torch.no_grad():
        ours(input_ids=ids, attention_mask=mask)
    assert calls == ["pt"]


def test_adapters_of_different_configurations_run_one_by_one():
    adapters, HubAverage, HubStack = _hub()
    configs = {"es": adapters.SeqBnInvConfig(reduction_factor=2),
               "pt": adapters.SeqBnInvConfig(reduction_factor=4, non_linearity="gelu", scaling=0.5),
               "ner": adapters.SeqBnConfig()}
    ours, hub, madx = _pair(configs=configs)
    ids, mask = padded_batch(ours.config)
    madx.set_active(Stack(Average("es", "pt", weights=[0.2, 0.8], adapterhub_compat=True), "ner"))
    hub.set_active_adapters(HubStack(HubAverage("es", "pt", weights=[0.2, 0.8]), "ner"))
    out_a, grads_a = _run(ours, ids, mask)
    out_b, grads_b = _run(hub, ids, mask)
    assert max_diff(out_a, out_b) < TOL
    assert_same_grads(grads_a, grads_b, TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_members_may_be_averages(backend):
    """``Stack(PerRow("it", Average("es", "pt", name="qu")), "ner")``: every row equals that row alone with
    ``Stack(its member, "ner")``; gradients reach each adapter from the rows that use it."""
    ours, _, madx = _pair(backend=backend)
    ids, mask = padded_batch(ours.config, batch=4)
    qu = Average("es", "pt", weights=[0.3, 0.7], name="qu")
    madx.set_active(Stack(PerRow("it", qu, "es"), "ner"))
    langs = ["qu", "it", "qu", "es"]
    with madx.row_languages(langs):
        got, grads = _run(ours, ids, mask)
    members = {"it": "it", "qu": qu, "es": "es"}
    for b, lang in enumerate(langs):
        madx.set_active(Stack(members[lang], "ner"))
        with torch.no_grad():
            want = ours(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits[0]
        keep = mask[b].bool()
        assert max_diff(got[b][keep], want[keep]) < TOL, (b, lang)
    layer_grads = {n: g for n, g in grads.items() if (".pt." in n or ".it." in n) and "invertible" not in n}
    assert len(layer_grads) == 2 * 2 * 4 and all(g is not None and g.abs().sum() > 0 for g in layer_grads.values())
    # a member's first adapter's NICE runs for its rows ("es" for "qu"), the others' never ("pt")
    assert all(g is None for n, g in grads.items() if "invertible_adapters.pt." in n)


def test_bad_setups_are_refused():
    ours, _, madx = _pair()
    with pytest.raises(KeyError, match="xx"):
        madx.set_active(Stack(Average("es", "xx"), "ner"))
    with pytest.raises(ValueError, match="twice"):
        madx.set_active(Stack(Average("es", "pt"), "es"))
    madx.delete_adapter("pt")  # removing an averaged adapter drops the Average from the active setup
    madx.add_adapter("pt", MadxConfig.language(leave_out=[1]))
    madx.set_active(Average("es", "pt"))
    ids, mask = padded_batch(ours.config)
    with pytest.raises(ValueError, match="same layers"):
        ours(input_ids=ids, attention_mask=mask)


def test_deleting_an_averaged_adapter_drops_the_block():
    _, _, madx = _pair()
    madx.set_active(Stack(Average("es", "pt"), "ner"))
    madx.delete_adapter("pt")
    assert madx.active == "ner"


# --------------------------------------------------------------------------------------------------------
# average_adapter: a new adapter whose parameters are the weighted sum of others'
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights,normalize", [(None, True), ([0.7, 0.3], True), ([2.0, -0.5], False)])
def test_average_adapter_equals_adapterhubs_base_model_average_adapter(weights, normalize):
    """Bit for bit, NICE included (AdapterHub's base-model method averages it; its top-level method on an
    ``adapters.init`` model leaves the new adapter without one, which madx_fast does not copy)."""
    ours, hub, madx = _pair()
    hub.base_model.average_adapter("avg", ["es", "pt"], weights=weights, normalize_weights=normalize)
    madx.average_adapter("avg", ["es", "pt"], weights=weights, normalize_weights=normalize)
    want = {k: v for k, v in hub.state_dict().items() if ".avg." in k}
    got = {k: v for k, v in ours.state_dict().items() if ".avg." in k}
    assert set(got) == set(want) and any("invertible" in k for k in got)
    assert all(torch.equal(got[k], want[k]) for k in want)
    hub.average_adapter("top", ["es", "pt"], weights=weights, normalize_weights=normalize)
    assert not any("invertible_adapters.top." in k for k in hub.state_dict())


def test_average_adapter_options_and_refusals():
    ours, _, madx = _pair()
    madx.average_adapter("avg", {"es": 1.0, "pt": 3.0}, set_active=True)  # dict weights, normalised
    assert madx.active == "avg"
    es, pt, avg = (madx.adapter_state_dict(n) for n in ("es", "pt", "avg"))
    assert all(torch.allclose(avg[k], 0.25 * es[k] + 0.75 * pt[k]) for k in avg)
    with pytest.raises(ValueError, match="already in the model"):
        madx.average_adapter("avg", ["es", "pt"])
    madx.average_adapter("avg", ["es"], overwrite=True)
    assert all(torch.equal(madx.adapter_state_dict("avg")[k], es[k]) for k in es)
    with pytest.raises(ValueError, match="different configurations"):
        madx.average_adapter("x", ["es", "ner"])
    with pytest.raises(KeyError, match="zz"):
        madx.average_adapter("x", ["es", "zz"])
    with pytest.raises(ValueError, match="combine_strategy"):
        madx.average_adapter("x", ["es", "pt"], combine_strategy="lora_delta_w_svd")
    with pytest.raises(ValueError, match="at least one"):
        madx.average_adapter("x", [])
    assert "x" not in madx
