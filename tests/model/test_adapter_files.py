"""Adapter files: madx_fast's own format, AdapterHub import/export (both ways with the real ``adapters``),
refusal of files that do not fit (model left unchanged), atomic saving, no silent overwrite."""
from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertForTokenClassification, XLMRobertaForMaskedLM, XLMRobertaForTokenClassification

from madx_fast.model import (
    AdapterConfigError,
    AdapterExistsError,
    AdapterFileError,
    MadxConfig,
    Stack,
    adapter_files,
    add_madx,
)
from tests.helpers.models import import_adapterhub, max_diff, padded_batch, randomize, tiny_config


def _model(cls=XLMRobertaForTokenClassification, family="xlm-roberta", seed=0, **kw):
    torch.manual_seed(seed)
    return cls(tiny_config(family, num_labels=5, **kw)).eval()


def _trained(cls=XLMRobertaForTokenClassification, family="xlm-roberta", **kw):
    model = _model(cls, family, **kw)
    madx = add_madx(model, backend="eager")
    madx.add_adapter("en", MadxConfig.language(leave_out=[1], non_linearity="gelu"))
    madx.add_adapter("ner", MadxConfig.task(reduction_factor={"0": 4, "default": 8}, scaling=0.5))
    randomize(model)
    randomize(model, needle="classifier", seed=1)
    madx.set_active(Stack("en", "ner"))
    return model, madx


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch[0], attention_mask=batch[1]).logits


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap, madx, configs):
    now = model.state_dict()
    assert set(now) == set(snap)
    assert all(torch.equal(now[k], snap[k]) for k in snap)
    assert madx.adapters == configs


# ------------------------------------------------------------------------------------------------------------
# own format
# ------------------------------------------------------------------------------------------------------------
def test_own_format_round_trip(tmp_path):
    model, madx = _trained()
    batch = padded_batch(model.config)
    want = _logits(model, batch)
    madx.save_adapter(tmp_path / "en", "en")
    madx.save_adapter(tmp_path / "ner", "ner", with_head=True)
    assert sorted(os.listdir(tmp_path / "en")) == ["README.md", "madx_adapter.json", "madx_adapter.safetensors"]
    meta = json.loads((tmp_path / "en" / "madx_adapter.json").read_text())
    assert meta["config"]["inv_adapter"] == "nice" and meta["model"]["hidden_size"] == 32

    fresh = _model()
    m2 = add_madx(fresh, backend="eager")
    assert m2.load_adapter(tmp_path / "en") == "en"
    assert m2.load_adapter(tmp_path / "ner", with_head=True) == "ner"
    m2.set_active(Stack("en", "ner"))
    assert max_diff(_logits(fresh, batch), want) < 1e-6
    assert m2.adapters == madx.adapters
    # load under another name: swap languages with the same file
    m2.load_adapter(tmp_path / "en", load_as="sw")
    m2.set_active(Stack("sw", "ner"))
    assert max_diff(_logits(fresh, batch), want) < 1e-6


def test_own_format_refuses_files_that_do_not_fit(tmp_path):
    model, madx = _trained()
    madx.save_adapter(tmp_path / "en", "en")
    target = _model(seed=3)
    tm = add_madx(target, backend="eager")
    tm.add_adapter("keep", "seq_bn")
    snap, configs = _snapshot(target), tm.adapters

    def refused(directory, exc, match, **kw):
        with pytest.raises(exc, match=match):
            tm.load_adapter(directory, **kw)
        _unchanged(target, snap, tm, configs)

    # hidden size / layer count of another model
    wide = _model(hidden_size=48, num_attention_heads=4)
    add_madx(wide, backend="eager").add_adapter("en", "seq_bn_inv")
    wide.madx.save_adapter(tmp_path / "wide", "en")
    refused(tmp_path / "wide", AdapterFileError, "hidden_size=48")
    deep = _model(num_hidden_layers=3)
    add_madx(deep, backend="eager").add_adapter("en", "seq_bn")
    deep.madx.save_adapter(tmp_path / "deep", "en")
    refused(tmp_path / "deep", AdapterFileError, "num_hidden_layers=3")

    def variant(name, edit_meta=None, edit_weights=None, keep_checksums=False):
        """A copy edited by hand (without the integrity checksums, as files of earlier versions have)."""
        d = tmp_path / name
        d.mkdir()
        meta = json.loads((tmp_path / "en" / "madx_adapter.json").read_text())
        if not keep_checksums:
            meta.pop("checksum"), meta.pop("weights_sha256")
        weights = load_file(str(tmp_path / "en" / "madx_adapter.safetensors"))
        if edit_meta:
            edit_meta(meta)
        if edit_weights:
            edit_weights(weights)
        (d / "madx_adapter.json").write_text(json.dumps(meta))
        save_file(weights, str(d / "madx_adapter.safetensors"))
        return d

    refused(variant("opt", edit_meta=lambda m: m["config"].update(magic=1)), AdapterConfigError, "magic")
    # with the checksums a saved file carries, any edit is caught first
    refused(variant("edited", edit_meta=lambda m: m["config"].update(scaling=2.0), keep_checksums=True),
            AdapterFileError, "changed or damaged")
    refused(variant("reweighted", edit_weights=lambda w: w["layers.0.adapter_up.bias"].add_(1), keep_checksums=True),
            AdapterFileError, "changed or damaged")
    refused(variant("act", edit_meta=lambda m: m["config"].update(non_linearity="wiggle")), AdapterConfigError,
            "wiggle")
    refused(variant("miss", edit_weights=lambda w: w.pop("invertible.G.2.bias")), AdapterFileError,
            r"missing keys \['invertible.G.2.bias'\]")
    refused(variant("extra", edit_weights=lambda w: w.update({"layers.1.adapter_up.bias": torch.zeros(32)})),
            AdapterFileError, "unexpected keys")
    refused(variant("shape", edit_weights=lambda w: w.update({"layers.0.adapter_up.bias": torch.zeros(31)})),
            AdapterFileError, r"layers.0.adapter_up.bias has shape \(31,\)")
    refused(tmp_path / "nothing_here", FileNotFoundError, "does not exist")
    # name taken: refused unless asked
    tm.load_adapter(tmp_path / "en")
    snap, configs = _snapshot(target), tm.adapters
    refused(tmp_path / "en", AdapterExistsError, "'en' is already")
    tm.load_adapter(tmp_path / "en", overwrite=True)


def test_atomic_save_and_no_silent_overwrite(tmp_path, monkeypatch):
    model, madx = _trained()
    out = tmp_path / "en"
    madx.save_adapter(out, "en")
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        madx.save_adapter(out, "ner")  # another adapter into the same directory
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before

    # a crash while writing leaves the old files intact and no temporary file behind
    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("safetensors.torch.save", boom)
    with pytest.raises(OSError, match=f"cannot write {out}: No space left on device"):
        madx.save_adapter(out, "ner", overwrite=True)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    with pytest.raises(OSError, match="No space left on device"):
        madx.save_adapter(tmp_path / "new", "ner")
    assert sorted(os.listdir(tmp_path)) == ["en"]
    monkeypatch.undo()
    madx.save_adapter(out, "ner", overwrite=True)
    assert json.loads((out / "madx_adapter.json").read_text())["name"] == "ner"
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------------------
# AdapterHub format (structure only: no `adapters` needed)
# ------------------------------------------------------------------------------------------------------------
def test_adapterhub_export_layout(tmp_path):
    model, madx = _trained()
    madx.export_adapterhub(tmp_path / "en", "en")
    meta = json.loads((tmp_path / "en" / "adapter_config.json").read_text())
    assert meta["name"] == "en" and meta["hidden_size"] == 32 and meta["model_type"] == "xlm-roberta"
    assert meta["version"] == "adapters.1.3.0" and meta["config"]["inv_adapter"] == "nice"
    weights = torch.load(tmp_path / "en" / "pytorch_adapter.bin", weights_only=True)
    assert set(weights) == {
        "roberta.encoder.layer.0.output.adapters.en.adapter_down.0.weight",
        "roberta.encoder.layer.0.output.adapters.en.adapter_down.0.bias",
        "roberta.encoder.layer.0.output.adapters.en.adapter_up.weight",
        "roberta.encoder.layer.0.output.adapters.en.adapter_up.bias",
    } | {f"roberta.invertible_adapters.en.{m}.{i}.{p}" for m in "FG" for i in (0, 2) for p in ("weight", "bias")}
    assert weights["roberta.invertible_adapters.en.F.0.weight"].shape == (8, 16)
    # safetensors variant replaces the .bin (no stale file that would shadow it)
    madx.export_adapterhub(tmp_path / "en", "en", safetensors=True, overwrite=True)
    assert sorted(os.listdir(tmp_path / "en")) == ["adapter.safetensors", "adapter_config.json"]


def test_adapterhub_import_refusals(tmp_path):
    model, madx = _trained()
    madx.export_adapterhub(tmp_path / "en", "en")
    target = _model(seed=2)
    tm = add_madx(target, backend="eager")
    snap, configs = _snapshot(target), tm.adapters

    def variant(name, edit_meta=None, edit_weights=None):
        d = tmp_path / name
        d.mkdir()
        meta = json.loads((tmp_path / "en" / "adapter_config.json").read_text())
        weights = torch.load(tmp_path / "en" / "pytorch_adapter.bin", weights_only=True)
        if edit_meta:
            edit_meta(meta)
        if edit_weights:
            weights = edit_weights(weights) or weights
        (d / "adapter_config.json").write_text(json.dumps(meta))
        torch.save(weights, d / "pytorch_adapter.bin")
        return d

    cases = [
        (variant("ln", lambda m: m["config"].update(ln_before=True)), AdapterConfigError, "ln_before=True"),
        (variant("mh", lambda m: m["config"].update(mh_adapter=True)), AdapterConfigError, "mh_adapter"),
        (variant("glow", lambda m: m["config"].update(inv_adapter="glow")), AdapterConfigError, "glow"),
        (variant("unk", lambda m: m["config"].update(frobnicate=2)), AdapterConfigError, "frobnicate"),
        (variant("hid", lambda m: m.update(hidden_size=768)), AdapterFileError, "hidden size 768"),
        (variant("bert", edit_weights=lambda w: {k.replace("roberta.", "bert."): v for k, v in w.items()}),
         AdapterFileError, r"\['bert'\]"),
        (variant("other", edit_weights=lambda w: {k.replace(".en.", ".de."): v for k, v in w.items()}),
         AdapterFileError, r"adapter\(s\) \['de'\]"),
        (variant("shape", edit_weights=lambda w: w.update(
            {"roberta.invertible_adapters.en.F.0.weight": torch.zeros(8, 17)})), AdapterFileError, "F.0.weight"),
        (variant("layer", edit_weights=lambda w: w.update(
            {"roberta.encoder.layer.7.output.adapters.en.adapter_up.bias": torch.zeros(32)})), AdapterFileError,
         "unexpected keys"),
    ]
    for directory, exc, match in cases:
        with pytest.raises(exc, match=match):
            tm.import_adapterhub(directory)
        _unchanged(target, snap, tm, configs)


def test_adapterhub_legacy_key_names_and_unprefixed_keys(tmp_path):
    model, madx = _trained()
    batch = padded_batch(model.config)
    madx.set_active("en")
    want = _logits(model, batch)
    madx.export_adapterhub(tmp_path / "en", "en")
    w = torch.load(tmp_path / "en" / "pytorch_adapter.bin", weights_only=True)
    legacy = {k.replace("roberta.", "", 1).replace("output.adapters", "output.layer_text_lang_adapters")
              .replace("invertible_adapters", "invertible_lang_adapters"): v for k, v in w.items()}
    torch.save(legacy, tmp_path / "en" / "pytorch_adapter.bin")
    target = _model()
    target.classifier.load_state_dict(model.classifier.state_dict())
    tm = add_madx(target, backend="eager")
    tm.import_adapterhub(tmp_path / "en", set_active=True)
    assert max_diff(_logits(target, batch), want) < 1e-6


# ------------------------------------------------------------------------------------------------------------
# with the real AdapterHub library, both ways
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("safetensors", [False, True], ids=["bin", "safetensors"])
@pytest.mark.parametrize("cls,family", [(XLMRobertaForTokenClassification, "xlm-roberta"),
                                        (BertForTokenClassification, "bert")], ids=["xlm-roberta", "bert"])
def test_madx_export_loads_in_adapterhub(tmp_path, cls, family, safetensors):
    adapters = import_adapterhub()
    model, madx = _trained(cls, family)
    batch = padded_batch(model.config)
    want = _logits(model, batch)
    madx.export_adapterhub(tmp_path / "en", "en", safetensors=safetensors)
    madx.export_adapterhub(tmp_path / "ner", "ner", safetensors=safetensors, with_head=True)

    hub = _model(cls, family)
    adapters.init(hub)
    hub.load_adapter(str(tmp_path / "en"), use_safetensors=safetensors)
    hub.load_adapter(str(tmp_path / "ner"), use_safetensors=safetensors, with_head=True)
    hub.set_active_adapters(adapters.Stack("en", "ner"))
    assert hub.adapters_config.match("en", adapters.BnConfig)["inv_adapter"] == "nice"
    assert max_diff(_logits(hub, batch), want) < 1e-5


@pytest.mark.parametrize("safetensors", [False, True], ids=["bin", "safetensors"])
def test_adapterhub_save_loads_in_madx(tmp_path, safetensors):
    adapters = import_adapterhub()
    hub = _model()
    adapters.init(hub)
    hub.add_adapter("en", config=adapters.SeqBnInvConfig(reduction_factor=2, leave_out=[1]))
    hub.add_adapter("ner", config=adapters.SeqBnConfig(scaling=2.0, non_linearity="gelu"))
    randomize(hub)
    randomize(hub, needle="classifier", seed=1)
    hub.set_active_adapters(adapters.Stack("en", "ner"))
    batch = padded_batch(hub.config)
    want = _logits(hub, batch)
    hub.save_adapter(str(tmp_path / "en"), "en", use_safetensors=safetensors)
    hub.save_adapter(str(tmp_path / "ner"), "ner", use_safetensors=safetensors)  # with its static head

    ours = _model()
    madx = add_madx(ours, backend="eager")
    assert madx.load_adapter(tmp_path / "en") == "en"  # format detected from adapter_config.json
    assert madx.import_adapterhub(tmp_path / "ner", with_head=True) == "ner"
    madx.set_active(Stack("en", "ner"))
    assert max_diff(_logits(ours, batch), want) < 1e-5
    assert madx.adapters["en"] == MadxConfig.language(leave_out=[1])

    # our export of an AdapterHub adapter writes the same adapter_config.json as AdapterHub does
    madx.export_adapterhub(tmp_path / "again", "en")
    theirs = json.loads((tmp_path / "en" / "adapter_config.json").read_text())
    mine = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert mine == theirs


def test_masked_lm_adapter_from_adapterhub_static_model(tmp_path):
    """An adapter trained in AdapterHub on XLMRobertaForMaskedLM; madx applies its NICE inverse in the head."""
    adapters = import_adapterhub()
    hub = _model(XLMRobertaForMaskedLM)
    adapters.init(hub)
    hub.add_adapter("en", config="seq_bn_inv")
    randomize(hub)
    hub.save_adapter(str(tmp_path / "en"), "en")
    ours = _model(XLMRobertaForMaskedLM)
    madx = add_madx(ours, backend="eager")
    madx.load_adapter(tmp_path / "en", set_active=True)
    with pytest.raises(AdapterFileError, match="masked-LM head"):
        madx.load_adapter(tmp_path / "en", load_as="en2", with_head=True)
    assert "en2" not in madx
    for key, value in hub.state_dict().items():
        if "adapters." in key:
            assert torch.equal(ours.state_dict()[key], value), key


def test_bad_files_are_named(tmp_path):
    model, madx = _trained()
    d = tmp_path / "broken"
    d.mkdir()
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="adapter_config.json: not valid JSON"):
        madx.load_adapter(d)
    (d / "adapter_config.json").write_text(json.dumps({"name": "x", "config": {"reduction_factor": 2,
                                                                                 "non_linearity": "relu"}}))
    with pytest.raises(AdapterFileError, match="no weights file"):
        madx.load_adapter(d)
    (d / "pytorch_adapter.bin").write_bytes(b"garbage")
    with pytest.raises(AdapterFileError, match="cannot read weights"):
        madx.load_adapter(d)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterFileError, match="no madx_adapter.json"):
        madx.load_adapter(empty)
    assert adapter_files.HUB_WEIGHTS == "pytorch_adapter.bin"
