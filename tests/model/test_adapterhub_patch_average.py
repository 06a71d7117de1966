"""patch_adapterhub covers AdapterHub's ``Average`` blocks with AdapterHub's own arithmetic (``torch.mean`` over
the weighted outputs): a patched model and an unpatched copy give the same loss, outputs and gradient of every
trainable parameter, alone and stacked under a task adapter, in train mode (dropout masks drawn as AdapterHub
draws them) and eval mode, with the members fused into one op when they share a configuration."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.models import Spy, assert_same, import_adapterhub, run
from tests.model.test_adapterhub_patch import batch_for, flex_model, hf_model, twins

adapters = import_adapterhub(module_level=True)
from adapters.composition import Average as HubAverage  # noqa: E402
from adapters.composition import Stack as HubStack  # noqa: E402
from transformers import XLMRobertaForTokenClassification  # noqa: E402

import madx_fast  # noqa: E402

LANGS = {"es": adapters.SeqBnInvConfig(reduction_factor=2), "pt": adapters.SeqBnInvConfig(reduction_factor=2),
         "ner": adapters.SeqBnConfig()}
MIXED = {"es": adapters.SeqBnInvConfig(reduction_factor=2, dropout=0.2),
         "pt": adapters.SeqBnInvConfig(reduction_factor=4, non_linearity="gelu", scaling=0.5),
         "ner": adapters.SeqBnConfig()}


def _train_all(model, setup):
    model.set_active_adapters(setup)
    model.train_adapter(HubStack("es", "pt", "ner"))  # (train_adapter activates what it trains)
    model.set_active_adapters(setup)


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("setup", [
    HubAverage("es", "pt", weights=[0.7, 0.3]), HubStack(HubAverage("es", "pt"), "ner"),
    HubStack(HubAverage("pt", "es", weights=[3.0, 1.0], normalize_weights=False), "ner"),
], ids=["alone", "stacked", "unnormalised"])
def test_average_matches_adapterhub(setup, backend, monkeypatch):
    hub, ours, _ = twins(flex_model("xlm-roberta", LANGS), backend=backend)
    spy = Spy(monkeypatch)
    batch = batch_for(hub)
    for model in (hub, ours):
        _train_all(model, setup)
    a, b = run(hub, batch, train=True), run(ours, batch, train=True)
    assert assert_same(a, b, logits=False) >= 2 * 4 * 2 + 8  # es and pt in both layers, the first's NICE
    assert spy.calls["average_bottleneck_adapter"] == 2 and spy.calls["nice_forward"] == 1
    assert_same(run(hub, dict(batch, labels=None), False, False), run(ours, dict(batch, labels=None), False, False))


def test_members_of_different_configurations_and_dropout_run_one_by_one(monkeypatch):
    hub, ours, _ = twins(hf_model(XLMRobertaForTokenClassification, "xlm-roberta", MIXED, num_labels=5))
    spy = Spy(monkeypatch)
    batch = batch_for(hub, head="ner")
    setup = HubStack(HubAverage("es", "pt", weights=[0.4, 0.6]), "ner")
    for model in (hub, ours):
        _train_all(model, setup)
    assert assert_same(run(hub, batch, True), run(ours, batch, True)) >= 2 * 4 * 2
    assert spy.calls["average_bottleneck_adapter"] == 0 and spy.calls["bottleneck_adapter"] >= 2 * 3


def test_what_stays_on_adapterhubs_code_and_the_report():
    hub, ours, report = twins(flex_model("xlm-roberta", LANGS))
    nested = HubAverage(HubStack("es", "ner"), "pt")
    for model in (hub, ours):
        model.set_active_adapters(nested)
    batch = batch_for(hub)
    a, b = run(hub, dict(batch, labels=None), False, False), run(ours, dict(batch, labels=None), False, False)
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])  # bitwise AdapterHub's
    for model in (hub, ours):
        model.set_active_adapters(HubStack(HubAverage("es", "pt"), "ner"))
    report = madx_fast.patch_adapterhub(ours)
    assert not any("active setup" in line for line in report.not_patched), report
    assert madx_fast.unpatch_adapterhub(ours)
    assert_same(run(hub, dict(batch, labels=None), False, False), run(ours, dict(batch, labels=None), False, False))
