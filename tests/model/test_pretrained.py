"""A model wired with ``add_madx`` and saved with ``save_pretrained`` loads back whole: its HF class, every
adapter, the active setup (``madx_fast.model.from_pretrained``, or ``load_madx`` on a model loaded by hand),
from one weights file, shards, or ``.bin``; and ``save_adapter`` writes a model card in the Hub's format."""
from __future__ import annotations

import copy
import inspect
import json
import os

import pytest
import torch
import yaml
from transformers import AutoModel, AutoModelForTokenClassification, XLMRobertaForTokenClassification

from madx_fast.model import AdapterFileError, MadxConfig, PerRow, Stack, add_madx, from_pretrained, load_madx
from madx_fast.model.card import CARD_MARKER
from tests.helpers.models import randomize, tiny_config


@pytest.fixture
def wired():
    torch.manual_seed(0)
    model = XLMRobertaForTokenClassification(tiny_config(num_labels=5)).eval()
    madx = add_madx(model, backend="eager")
    madx.add_adapter("en", MadxConfig.language())
    madx.add_adapter("sw", MadxConfig.language(leave_out=[1]))
    madx.add_adapter("ner", MadxConfig.task())
    randomize(model)
    madx.set_active(Stack("sw", "ner"))
    return model


def _ids(seed=0):
    return torch.randint(4, 100, (3, 9), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("layout", ["one file", "shards", "bin"])
def test_save_pretrained_then_from_pretrained_is_the_same_model(wired, tmp_path, layout):
    kwargs = {"one file": {}, "shards": {"max_shard_size": "40KB"}, "bin": {"safe_serialization": False}}[layout]
    if "safe_serialization" in kwargs and "safe_serialization" not in inspect.signature(
            type(wired).save_pretrained).parameters:
        kwargs = {"max_shard_size": "20KB"}  # transformers 5 writes safetensors only: shards again, smaller
    wired.save_pretrained(tmp_path / "m", **kwargs)
    names = os.listdir(tmp_path / "m")
    assert ("model.safetensors.index.json" in names) == (layout == "shards") or layout == "bin"
    record = json.loads((tmp_path / "m" / "config.json").read_text())["madx"]
    assert record["active"] == ["sw", "ner"] and set(record["adapters"]) == {"en", "sw", "ner"}
    assert record["adapters"]["sw"]["leave_out"] == [1]
    loaded = from_pretrained(tmp_path / "m", backend="eager", attn_implementation="eager").eval()
    assert type(loaded) is XLMRobertaForTokenClassification
    assert loaded.madx.active == Stack("sw", "ner") and set(loaded.madx.adapters) == {"en", "sw", "ner"}
    assert loaded.madx.adapters["sw"] == wired.madx.adapters["sw"]
    assert torch.equal(_logits(loaded, _ids()), _logits(wired, _ids()))
    for setup in ("en", Stack("en", "ner"), None):  # every adapter came back, not only the active ones
        wired.madx.set_active(setup), loaded.madx.set_active(setup)
        assert torch.equal(_logits(loaded, _ids(1)), _logits(wired, _ids(1))), setup
    assert "madx" not in loaded.config.__dict__  # no stale record on the loaded model


def test_plain_hf_loading_drops_the_adapters_and_load_madx_puts_them_back(wired, tmp_path):
    wired.save_pretrained(tmp_path / "m")
    plain = AutoModelForTokenClassification.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    assert not torch.equal(_logits(plain, _ids()), _logits(wired, _ids()))  # the adapters matter
    madx = load_madx(plain, backend="eager")  # from where it was loaded
    assert madx is plain.madx and madx.active == Stack("sw", "ner")
    assert torch.equal(_logits(plain, _ids()), _logits(wired, _ids()))
    # the bare encoder of the same checkpoint (no "roberta." prefix) takes the same adapters
    encoder = AutoModel.from_pretrained(tmp_path / "m", add_pooling_layer=False, attn_implementation="eager").eval()
    load_madx(encoder, tmp_path / "m", backend="eager")
    with torch.no_grad():
        want = wired.roberta(input_ids=_ids()).last_hidden_state
        assert torch.equal(encoder(input_ids=_ids()).last_hidden_state, want)


def test_a_saved_model_saves_again_and_a_copy_saves_its_own_adapters(wired, tmp_path):
    wired.save_pretrained(tmp_path / "a")
    loaded = from_pretrained(tmp_path / "a", backend="eager", attn_implementation="eager")
    loaded.madx.delete_adapter("en")
    loaded.save_pretrained(tmp_path / "b")
    assert set(json.loads((tmp_path / "b" / "config.json").read_text())["madx"]["adapters"]) == {"sw", "ner"}
    twin = copy.deepcopy(wired)
    twin.madx.delete_adapter("ner")
    twin.madx.set_active("sw")
    twin.save_pretrained(tmp_path / "c")
    assert set(json.loads((tmp_path / "c" / "config.json").read_text())["madx"]["adapters"]) == {"en", "sw"}
    assert from_pretrained(tmp_path / "c", backend="eager").madx.active == "sw"
    assert "ner" in wired.madx.adapters  # the original is untouched
    wired.madx.remove()  # add_madx undone: save_pretrained is HF's own again
    wired.save_pretrained(tmp_path / "d")
    assert "madx" not in json.loads((tmp_path / "d" / "config.json").read_text())


def test_a_per_row_setup_round_trips(wired, tmp_path):
    wired.madx.add_adapter("qu", MadxConfig.language())
    wired.madx.set_active(Stack(PerRow("en", "qu"), "ner"))
    wired.save_pretrained(tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m", backend="eager", attn_implementation="eager")
    assert loaded.madx.active == Stack(PerRow("en", "qu"), "ner")


@pytest.mark.parametrize("family,cls", [("deberta-v2", "DebertaV2ForTokenClassification"),
                                        ("distilbert", "DistilBertForTokenClassification"),
                                        ("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM")])
def test_other_model_families_round_trip(tmp_path, family, cls):
    """Each family keeps its adapters under its own AdapterHub names (``parts.hub_key``); they come back."""
    import transformers
    torch.manual_seed(0)
    model = getattr(transformers, cls)(tiny_config(family)).eval()
    madx = add_madx(model, backend="eager")
    madx.add_adapter("en", MadxConfig.language())
    madx.add_adapter("task", MadxConfig.task())
    randomize(model)
    madx.set_active(Stack("en", "task"))
    model.save_pretrained(tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m", backend="eager", attn_implementation="eager").eval()
    assert type(loaded) is type(model) and loaded.madx.active == Stack("en", "task")
    assert torch.equal(_logits(loaded, _ids()), _logits(model, _ids()))


def test_a_model_without_adapters_is_refused_by_name(tmp_path):
    XLMRobertaForTokenClassification(tiny_config(num_labels=5)).save_pretrained(tmp_path / "plain")
    with pytest.raises(AdapterFileError, match="config.json records no MAD-X adapters"):
        from_pretrained(tmp_path / "plain")


def _front_matter(path) -> dict:
    text = open(path, encoding="utf-8").read()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_save_adapter_writes_a_model_card_and_keeps_a_users_own(wired, tmp_path):
    wired.config.name_or_path = "xlm-roberta-base"
    wired.madx.save_adapter(tmp_path / "ner", "ner", with_head=True)
    card = (tmp_path / "ner" / "README.md").read_text()
    meta = _front_matter(tmp_path / "ner" / "README.md")
    assert meta["library_name"] == "madx_fast" and meta["base_model"] == "xlm-roberta-base"
    assert meta["pipeline_tag"] == "token-classification" and "mad-x" in meta["tags"]
    assert CARD_MARKER in card and "madx_head.safetensors" in card and "with_head=True" in card
    mine = "# my own card\n"
    (tmp_path / "ner" / "README.md").write_text(mine)
    wired.madx.save_adapter(tmp_path / "ner", "ner", with_head=True, overwrite=True)
    assert (tmp_path / "ner" / "README.md").read_text() == mine
