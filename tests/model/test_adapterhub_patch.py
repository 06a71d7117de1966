"""madx_fast.patch_adapterhub: an AdapterHub model on madx_fast's fused ops computes the same function.

Every check builds the same tiny XLM-R / BERT twice (one copy patched, one left to AdapterHub), runs both with
the same random state (so dropout masks agree in train mode) on a padded batch, and compares the loss, the
outputs and the gradient of every trainable parameter, in float32, with the eager reference ops and with the
Triton kernels (through the interpreter on CPU). A spy on madx_fast's ops tells whether the fused path really
ran (for covered setups) or did not (for what stays on AdapterHub's code, where the outputs must be bitwise
AdapterHub's).
"""
from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.models import (
    Spy,
    assert_same,
    import_adapterhub,
    max_diff,
    mlm_labels,
    padded_batch,
    randomize,
    run,
    tiny_config,
)

adapters = import_adapterhub(module_level=True)
from adapters.composition import Fuse, Parallel  # noqa: E402
from adapters.composition import Stack as HubStack  # noqa: E402
from transformers import (  # noqa: E402
    BertForMaskedLM,
    BertForTokenClassification,
    XLMRobertaForMaskedLM,
    XLMRobertaForTokenClassification,
)

import madx_fast  # noqa: E402

TOL = 1e-5

PAPER = {"en": adapters.SeqBnInvConfig(reduction_factor=2), "ner": adapters.SeqBnConfig()}
EXOTIC = {  # per-layer reduction, other activations, scaling, dropout, residual/LN placements, leave_out
    "en": adapters.SeqBnInvConfig(reduction_factor={"0": 4, "default": 8}, non_linearity="gelu",
                                  inv_adapter_reduction_factor=4, scaling=0.5, dropout=0.2),
    "ner": adapters.SeqBnConfig(reduction_factor=4, non_linearity="tanh", residual_before_ln=False,
                                original_ln_after=False, leave_out=[1]),
}


def _needs_triton(backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("CPU models: the Triton kernels need TRITON_INTERPRET=1 (tests/conftest.py sets it)")


# --------------------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------------------
def flex_model(family, configs, head="mlm", **cfg_kw):
    """XLMRobertaAdapterModel / BertAdapterModel with a masked-LM ("mlm") or tagging ("ner") head."""
    torch.manual_seed(0)
    config = tiny_config(family, **cfg_kw)
    cls = adapters.XLMRobertaAdapterModel if family == "xlm-roberta" else adapters.BertAdapterModel
    model = cls(config)
    if head == "mlm":
        model.add_masked_lm_head("mlm")
        with torch.no_grad():
            model.heads["mlm"][3].bias.normal_()
    else:
        model.add_tagging_head("ner", num_labels=5)
    for name, cfg in configs.items():
        model.add_adapter(name, config=cfg)
    randomize(model)
    return model


def hf_model(cls, family, configs, **cfg_kw):
    torch.manual_seed(0)
    model = cls(tiny_config(family, **cfg_kw))
    adapters.init(model)
    for name, cfg in configs.items():
        model.add_adapter(name, config=cfg)
    randomize(model)
    return model


def twins(model, **options):
    """(AdapterHub's, patched copy): identical weights."""
    patched = copy.deepcopy(model)
    report = madx_fast.patch_adapterhub(patched, **options)
    return model, patched, report


def batch_for(model, head="mlm"):
    ids, mask = padded_batch(model.config)
    if head == "mlm":
        return dict(input_ids=ids, attention_mask=mask, labels=mlm_labels(ids, mask))
    tags = torch.randint(0, 5, ids.shape, generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, attention_mask=mask, labels=tags)


# --------------------------------------------------------------------------------------------------------
# parity: flex heads, HF classes, configs, train / eval, eager / Triton
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,configs,backend", [
    ("xlm-roberta", PAPER, "eager"), ("xlm-roberta", EXOTIC, "triton"), ("bert", PAPER, "triton"),
], ids=["xlmr-paper-eager", "xlmr-exotic-triton", "bert-paper-triton"])
def test_flex_masked_lm_matches_adapterhub(family, configs, backend, monkeypatch):
    """MAD-X stage 1 and 2 setups with NICE (forward on the embeddings, inverse in the head): loss and every
    trainable gradient in train mode (dropout on), outputs in eval mode; logits=None with labels."""
    _needs_triton(backend)
    hub, ours, _ = twins(flex_model(family, configs), backend=backend)
    spy = Spy(monkeypatch)
    batch = batch_for(hub)
    for hub_setup, train in ((HubStack("en"), "en"), (HubStack("en", "ner"), HubStack("en", "ner"))):
        for model in (hub, ours):
            model.set_active_adapters(hub_setup)
            model.train_adapter(train)
        spy.reset()
        a, b = run(hub, batch, train=True), run(ours, batch, train=True)
        assert b[1].get("logits") is None and a[1]["logits"] is not None  # only the loss is computed
        assert assert_same(a, b, logits=False) >= 8
        assert spy.calls["bottleneck_adapter"] >= 2 and spy.calls["nice_forward"] == 1
        assert spy.calls["nice_inverse"] == 1 and spy.calls["fused_linear_cross_entropy"] == 1
        a = run(hub, dict(batch, labels=None), train=False, backward=False)
        b = run(ours, dict(batch, labels=None), train=False, backward=False)
        assert_same(a, b)  # inference: full logits, NICE inverse fused
    for model in (hub, ours):  # no adapter active: AdapterHub's own plain path
        model.set_active_adapters(None)
    spy.reset()
    assert_same(run(hub, dict(batch, labels=None), False, False), run(ours, dict(batch, labels=None), False, False))
    assert spy.calls["bottleneck_adapter"] == 0


def test_flex_tagging_head_in_stack_matches_adapterhub():
    hub, ours, _ = twins(flex_model("xlm-roberta", PAPER, head="ner"))
    for model in (hub, ours):
        model.set_active_adapters(HubStack("en", "ner"))
        model.train_adapter("ner")
    batch = batch_for(hub, head="ner")
    assert assert_same(run(hub, batch, True), run(ours, batch, True)) >= 6  # "ner" adapters + head
    assert_same(run(hub, batch, False, False), run(ours, batch, False, False))


@pytest.mark.parametrize("cls,family,backend", [
    (XLMRobertaForMaskedLM, "xlm-roberta", "triton"), (BertForMaskedLM, "bert", "eager"),
], ids=["xlmr-triton", "bert-eager"])
def test_hf_masked_lm_after_init_matches_adapterhub(cls, family, backend, monkeypatch):
    """HF ...ForMaskedLM after adapters.init: loss and gradients at labelled positions only (AdapterHub
    applies no NICE inverse in these classes; neither does the patch)."""
    _needs_triton(backend)
    hub, ours, report = twins(hf_model(cls, family, PAPER), backend=backend)
    assert any("masked-LM loss" in p for p in report.patched)
    spy = Spy(monkeypatch)
    batch = batch_for(hub)
    for model in (hub, ours):
        model.set_active_adapters(HubStack("en", "ner"))
        model.train_adapter(HubStack("en", "ner"))
    a, b = run(hub, batch, True), run(ours, batch, True)
    assert b[1].get("logits") is None
    assert assert_same(a, b, logits=False) >= 8
    assert spy.calls["fused_linear_cross_entropy"] == 1 and spy.calls["nice_inverse"] == 0
    # tuple outputs keep AdapterHub's positions: (loss, logits=None, hidden states...)
    ours.eval()
    with torch.no_grad():
        t = ours(**batch, return_dict=False, output_hidden_states=True)
    assert abs(t[0].item() - a[0].item()) < 0.5 and t[1] is None and len(t[2]) == 3
    assert_same(run(hub, dict(batch, labels=None), False, False), run(ours, dict(batch, labels=None), False, False))
    # the one documented difference: a batch without a labelled token gives loss 0 and zero gradients
    # (AdapterHub's mean over no token is NaN, which poisons the weights through the optimizer)
    unlabelled = dict(batch, labels=torch.full_like(batch["labels"], -100))
    assert torch.isnan(run(hub, unlabelled, True)[0])
    loss, _, grads = run(ours, unlabelled, True)
    assert loss.item() == 0 and all(g is None or not g.any() for g in grads.values())


def test_hf_token_classification_after_init_matches_adapterhub():
    hub, ours, _ = twins(hf_model(BertForTokenClassification, "bert", EXOTIC, num_labels=5))
    for model in (hub, ours):
        model.set_active_adapters(HubStack("en", "ner"))
        model.train_adapter(HubStack("en", "ner"))
    batch = batch_for(hub, head="ner")
    assert assert_same(run(hub, batch, True), run(ours, batch, True)) >= 8


SINGLE_CONFIGS = {
    "pfeiffer-rf3-gelu_new": adapters.SeqBnConfig(reduction_factor=3, non_linearity="gelu_new"),
    "silu-post_add": adapters.SeqBnConfig(non_linearity="silu", residual_before_ln="post_add", dropout=0.3),
    "leakyrelu-no-ln": adapters.SeqBnConfig(non_linearity="leakyrelu", original_ln_before=False,
                                            original_ln_after=False, scaling=2.0),
    "houlsby-double": adapters.DoubleSeqBnConfig(reduction_factor=4),  # attention + FFN outputs, swish
    "pfeiffer+inv-linear": adapters.SeqBnInvConfig(non_linearity="linear", reduction_factor=8),
}


@pytest.mark.parametrize("name", sorted(SINGLE_CONFIGS))
def test_bottleneck_configs_match_adapterhub(name, monkeypatch):
    """Options and placements beyond MAD-X's defaults, single adapter, train mode with grads (Triton when the
    interpreter is on)."""
    hub, ours, report = twins(hf_model(XLMRobertaForTokenClassification, "xlm-roberta", {"a": SINGLE_CONFIGS[name]},
                                       num_labels=5))
    assert not report.not_patched, report
    spy = Spy(monkeypatch)
    for model in (hub, ours):
        model.set_active_adapters("a")
        model.train_adapter("a")
    batch = batch_for(hub, head="ner")
    assert assert_same(run(hub, batch, True), run(ours, batch, True)) >= 4
    assert spy.calls["bottleneck_adapter"] == (4 if name == "houlsby-double" else 2)


def test_keep_mlm_logits_computes_logits_and_loss_as_adapterhub(monkeypatch):
    hub, ours, report = twins(flex_model("xlm-roberta", PAPER), keep_mlm_logits=True)
    assert report.keep_mlm_logits
    spy = Spy(monkeypatch)
    for model in (hub, ours):
        model.set_active_adapters("en")
        model.train_adapter("en")
    batch = batch_for(hub)
    assert_same(run(hub, batch, True), run(ours, batch, True))  # logits compared too
    assert spy.calls["fused_linear_cross_entropy"] == 0 and spy.calls["nice_inverse"] == 1
    madx_fast.patch_adapterhub(ours)  # calling again updates the option
    assert run(ours, batch, True)[1].get("logits") is None


# --------------------------------------------------------------------------------------------------------
# dynamics: adapters and heads added / loaded after the patch, setups switched, save_adapter
# --------------------------------------------------------------------------------------------------------
def test_adapters_and_heads_added_or_loaded_after_the_patch(tmp_path, monkeypatch):
    donor = flex_model("xlm-roberta", {"sw": adapters.SeqBnInvConfig(reduction_factor=4)})
    donor.save_adapter(str(tmp_path / "sw"), "sw")
    hub = adapters.XLMRobertaAdapterModel(tiny_config())
    ours = copy.deepcopy(hub)
    report = madx_fast.patch_adapterhub(ours)  # nothing added yet
    assert any("no adapters yet" in p for p in report.patched)
    spy = Spy(monkeypatch)
    for model in (hub, ours):
        model.add_masked_lm_head("mlm")
        model.add_adapter("en", config=PAPER["en"])
        model.add_adapter("ner", config=PAPER["ner"])
        model.load_adapter(str(tmp_path / "sw"))
    ours.load_state_dict(hub.state_dict())
    batch = batch_for(hub)
    for setup in (HubStack("sw", "ner"), HubStack("ner", "en")):
        for model in (hub, ours):
            model.set_active_adapters(setup)
            model.train_adapter(setup)
        spy.reset()
        assert assert_same(run(hub, batch, True), run(ours, batch, True), logits=False) > 0, setup
        assert spy.calls["bottleneck_adapter"] >= 2 and spy.calls["fused_linear_cross_entropy"] == 1
        assert spy.calls["nice_forward"] == (0 if setup.first() == "ner" else 1)  # the first adapter's NICE
    # an AdapterSetup context overrides the active setup, as in AdapterHub
    with adapters.AdapterSetup(HubStack("en"), head_setup="mlm"):
        a, b = run(hub, batch, False, False), run(ours, batch, False, False)
    assert_same(a, b, logits=False)


def test_save_adapter_after_patched_training_loads_unpatched(tmp_path):
    model = flex_model("xlm-roberta", PAPER)
    madx_fast.patch_adapterhub(model)
    model.set_active_adapters("en")
    model.train_adapter("en")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = batch_for(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".en." in k}
    for _ in range(2):
        model.train()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(max_diff(before[k], v) > 0 for k, v in model.state_dict().items() if ".en." in k)
    model.save_adapter(str(tmp_path / "en"), "en")
    fresh = adapters.XLMRobertaAdapterModel(tiny_config())
    fresh.add_masked_lm_head("mlm")
    missing, unexpected = fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "adapters." not in k},
                                                strict=False)
    assert not missing and not unexpected
    assert fresh.load_adapter(str(tmp_path / "en"), set_active=True) == "en"
    a, b = run(model, dict(batch, labels=None), False, False)[1], run(fresh, dict(batch, labels=None), False, False)[1]
    assert a.keys() == b.keys() and "logits" in a
    assert all(max_diff(a[k], b[k]) < TOL for k in a)


# --------------------------------------------------------------------------------------------------------
# what stays on AdapterHub's code
# --------------------------------------------------------------------------------------------------------
def _uncovered_cases():
    return {
        "parallel": ({"a": adapters.SeqBnConfig(), "b": adapters.SeqBnConfig(reduction_factor=8)},
                     Parallel("a", "b"), "Parallel"),
        "fuse": ({"a": adapters.SeqBnConfig(), "b": adapters.SeqBnConfig()}, Fuse("a", "b"), "Fuse"),
        "gating": ({"a": adapters.SeqBnConfig(use_gating=True)}, HubStack("a"), "gating"),
        "adapter-ln": ({"a": adapters.SeqBnConfig(ln_before=True)}, HubStack("a"), "LayerNorm"),
        "compacter": ({"a": adapters.CompacterConfig(reduction_factor=4)}, HubStack("a"), "PHM"),
        "lora": ({"a": adapters.LoRAConfig(r=4)}, HubStack("a"), "lora"),
        "prefix": ({"a": adapters.PrefixTuningConfig(prefix_length=3)}, HubStack("a"), "prefix_tuning"),
        "par_bn": ({"a": adapters.ParBnConfig()}, HubStack("a"), "parallel bottleneck"),
    }


@pytest.mark.parametrize("case", sorted(_uncovered_cases()))
def test_uncovered_parts_stay_on_adapterhub_code(case, monkeypatch, caplog):
    configs, setup, reason = _uncovered_cases()[case]
    model = hf_model(XLMRobertaForTokenClassification, "xlm-roberta", configs, num_labels=5)
    if case == "fuse":
        model.add_adapter_fusion(Fuse("a", "b"))
    model.set_active_adapters(setup)
    hub = copy.deepcopy(model)
    with caplog.at_level(logging.INFO, logger="madx_fast.adapterhub_patch"):
        report = madx_fast.patch_adapterhub(model)
    assert not report.fully_patched and any(reason in p for p in report.not_patched), str(report)
    assert len([r for r in caplog.records if r.name == "madx_fast.adapterhub_patch"]) == 1  # logged once
    assert reason in caplog.records[-1].getMessage()
    spy = Spy(monkeypatch)
    ids, mask = padded_batch(model.config, batch=4)
    for m in (hub, model):
        m.eval()
    with torch.no_grad():
        a = hub(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)  # AdapterHub's own code ran, bit for bit
    assert spy.calls["bottleneck_adapter"] == 0


def test_other_methods_mixed_with_a_bottleneck_stack(monkeypatch):
    """LoRA (AdapterHub's code) and a bottleneck adapter (fused) in one Stack: same function."""
    hub, ours, report = twins(hf_model(XLMRobertaForTokenClassification, "xlm-roberta",
                                       {"lora": adapters.LoRAConfig(r=4), "bn": adapters.SeqBnConfig()},
                                       num_labels=5))
    assert any("'lora'" in p for p in report.not_patched) and any("'bn'" in p for p in report.patched)
    spy = Spy(monkeypatch)
    for model in (hub, ours):
        model.set_active_adapters(HubStack("lora", "bn"))
        model.train_adapter(HubStack("lora", "bn"))
    batch = batch_for(hub, head="ner")
    assert assert_same(run(hub, batch, True), run(ours, batch, True)) >= 8
    assert spy.calls["bottleneck_adapter"] == 2


# --------------------------------------------------------------------------------------------------------
# unpatch, copies, errors, the optional dependency
# --------------------------------------------------------------------------------------------------------
def _instance_dicts(model):
    return {name: dict(m.__dict__) for name, m in model.named_modules()}


def test_unpatch_restores_every_module_exactly():
    model = flex_model("xlm-roberta", PAPER)
    model.set_active_adapters(HubStack("en", "ner"))
    batch = dict(batch_for(model), labels=None)
    model.eval()
    with torch.no_grad():
        want = model(**batch).logits
    before = _instance_dicts(model)
    madx_fast.patch_adapterhub(model)
    assert madx_fast.patch_adapterhub(model).patched  # idempotent
    with torch.no_grad():
        model(**batch_for(model))  # patches the masked-LM head lazily too
    assert madx_fast.unpatch_adapterhub(model) is True
    assert madx_fast.unpatch_adapterhub(model) is False
    after = _instance_dicts(model)
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), name
        assert all(before[name][k] is after[name][k] for k in before[name]
                   if not isinstance(before[name][k], (bool, int, float, str))), name
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, want)


def test_deepcopy_of_a_patched_model_runs_its_own_weights():
    model = flex_model("xlm-roberta", PAPER, head="ner")
    model.set_active_adapters("en")
    madx_fast.patch_adapterhub(model)
    clone = copy.deepcopy(model).eval()
    model.eval()
    batch = dict(batch_for(model, head="ner"), labels=None)
    with torch.no_grad():
        a = model(**batch).logits
        clone.roberta.encoder.layer[0].output.adapters["en"].adapter_up.bias.add_(1.0)
        assert torch.equal(model(**batch).logits, a) and not torch.equal(clone(**batch).logits, a)
    assert madx_fast.unpatch_adapterhub(clone) and madx_fast.unpatch_adapterhub(model)


def test_bad_models_are_refused_unchanged():
    plain = XLMRobertaForTokenClassification(tiny_config())
    snapshot = _instance_dicts(plain)
    with pytest.raises(TypeError, match=r"adapters\.init"):
        madx_fast.patch_adapterhub(plain)
    assert _instance_dicts(plain).keys() == snapshot.keys() and "_madx_fast_adapterhub" not in plain.__dict__
    model = flex_model("xlm-roberta", PAPER)
    with pytest.raises(ValueError, match="backend"):
        madx_fast.patch_adapterhub(model, backend="fast")
    assert "_madx_fast_adapterhub" not in model.__dict__


def test_cpu_autocast_bf16_eager_close_to_adapterhub():
    """Under autocast the adapter products run in bf16 like AdapterHub's nn.Linear (eager ops: the Triton
    interpreter's bf16 is broken, a GPU checks the kernels)."""
    hub, ours, _ = twins(hf_model(XLMRobertaForTokenClassification, "xlm-roberta", PAPER, num_labels=5),
                         backend="eager")
    batch = dict(batch_for(hub, head="ner"), labels=None)
    for model in (hub, ours):
        model.set_active_adapters(HubStack("en", "ner"))
        model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = hub(**batch).logits, ours(**batch).logits
    assert a.dtype == b.dtype
    assert max_diff(a, b) < 5e-2 * max(1.0, a.abs().max().item())


def test_import_madx_fast_leaves_adapters_alone_and_names_the_extra():
    code = ("import sys, madx_fast; assert 'adapters' not in sys.modules, 'adapters imported'; "
            "assert callable(madx_fast.patch_adapterhub) and callable(madx_fast.unpatch_adapterhub); "
            "sys.modules['adapters'] = None\n"
            "try:\n    madx_fast.patch_adapterhub(object())\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'madx_fast[adapterhub]'" in out.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels, bf16)")
def test_gpu_patched_mlm_step_close_to_adapterhub_fp32_and_bf16_autocast():
    hub, ours, _ = twins(flex_model("xlm-roberta", PAPER, attn="sdpa", hidden_size=64))
    hub, ours = hub.cuda(), ours.cuda()
    batch = {k: v.cuda() for k, v in batch_for(hub).items()}
    for model in (hub, ours):
        model.set_active_adapters(HubStack("en", "ner"))
        model.train_adapter(HubStack("en", "ner"))
    a, b = run(hub, batch, False), run(ours, batch, False)
    assert_same(a, b, tol=1e-2, logits=False)  # TF32 products in the kernels
    for model in (hub, ours):
        model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = [m(**batch).loss for m in (hub, ours)]
    for loss in losses:
        loss.backward()
    assert abs(losses[0].item() - losses[1].item()) < 3e-2 * max(1.0, abs(losses[0].item()))
    for (name, p), (_, q) in zip(hub.named_parameters(), ours.named_parameters()):
        if p.grad is not None:
            assert q.grad is not None and torch.isfinite(q.grad).all(), name
            assert max_diff(p.grad, q.grad) < 0.1 * max(p.grad.abs().max().item(), 1e-3), name
