"""Adapters by Hugging Face Hub name, offline: a Hub cache built on disk in huggingface_hub's own layout
(tests/helpers/hub_cache.py) is read with HF_HUB_OFFLINE=1 through ``huggingface_hub.snapshot_download``, as
after a real download. Covered: both AdapterHub layouts (``.bin``; safetensors with a head) and madx_fast's
own, at a branch, a tag, a commit and in a folder; ``load_adapter`` and ``import_adapterhub``; AdapterHub's
short names (mapped, ambiguous, unmapped: refused with what to write); clear errors that change nothing;
``.bin`` weights never run pickled code."""
from __future__ import annotations

import json
import os

import huggingface_hub
import pytest
import torch
from transformers import XLMRobertaForMaskedLM, XLMRobertaForTokenClassification

from madx_fast.model import (
    AdapterFileError,
    AdapterNameError,
    AdapterNotFoundError,
    MadxConfig,
    Stack,
    add_madx,
    hub,
    resolve_adapter,
)
from tests.helpers.hub_cache import add_files, add_snapshot
from tests.helpers.models import max_diff, padded_batch, randomize, tiny_config


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hub cache, offline (as HF_HUB_OFFLINE=1 and HF_HUB_CACHE would set it at import)."""
    directory = str(tmp_path / "hub")
    os.makedirs(directory)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", directory)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return directory


def _model(cls=XLMRobertaForTokenClassification, seed=0, name="xlm-roberta-base"):
    torch.manual_seed(seed)
    model = cls(tiny_config(num_labels=5)).eval()
    model.config._name_or_path = name
    return model


def _trained(tmp_path):
    """A source model with a language adapter and a task adapter + head, saved in every layout."""
    model = _model()
    madx = add_madx(model, backend="eager")
    madx.add_adapter("en", MadxConfig.language())
    madx.add_adapter("ner", MadxConfig.task())
    randomize(model)
    randomize(model, needle="classifier", seed=1)
    madx.set_active(Stack("en", "ner"))
    out = {"model": model, "madx": madx}
    for kind, save in {"hub_bin": lambda d: madx.export_adapterhub(d, "en"),
                       "hub_safe_head": lambda d: madx.export_adapterhub(d, "ner", safetensors=True, with_head=True),
                       "own_head": lambda d: madx.save_adapter(d, "ner", with_head=True),
                       "own_en": lambda d: madx.save_adapter(d, "en")}.items():
        save(tmp_path / kind)
        out[kind] = str(tmp_path / kind)
    return out


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch[0], attention_mask=batch[1]).logits


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------------------
# names
# ------------------------------------------------------------------------------------------------------------
def test_hub_location_syntax():
    loc = hub.parse_hub_location
    assert loc("AdapterHub/x") == hub.HubLocation("AdapterHub/x", None, "")
    assert loc("org/name@v1.0") == hub.HubLocation("org/name", "v1.0", "")
    assert loc("org/name@v1.0/runs/lang-sw/") == hub.HubLocation("org/name", "v1.0", "runs/lang-sw")
    assert loc("org/name/runs/lang-sw") == hub.HubLocation("org/name", None, "runs/lang-sw")
    assert loc("org/name@refs%2Fpr%2F3/a") == hub.HubLocation("org/name", "refs/pr/3", "a")
    for bad in ("justaname", "org/name@", "org/name/../x", "/org/name"):
        with pytest.raises(AdapterNameError):
            loc(bad)


def test_adapterhub_short_names_map_as_adapterhub_redirects_them():
    short = hub.adapterhub_short_name
    assert short("en/wiki@ukp", "xlm-roberta-base") == "AdapterHub/xlm-roberta-base-en-wiki_pfeiffer"
    assert short("sw/wiki", "FacebookAI/xlm-roberta-large") == "AdapterHub/xlm-roberta-large-sw-wiki_pfeiffer"
    assert short("en/wiki@ukp", "bert-base-multilingual-cased") == \
        "AdapterHub/bert-base-multilingual-cased-en-wiki_pfeiffer_relu"
    assert short("id/wiki", "google-bert/bert-base-multilingual-cased") == \
        "AdapterHub/bert-base-multilingual-cased_wiki_id_pfeiffer"
    assert short("qu", "xlm-roberta-base") == "AdapterHub/xlm-roberta-base-qu-wiki_pfeiffer"  # a task alone
    assert short("@ukp/xlm-roberta-base-en-wiki_pfeiffer", None) == "AdapterHub/xlm-roberta-base-en-wiki_pfeiffer"
    # Hub repository ids are not short names
    assert short("AdapterHub/xlm-roberta-base-en-wiki_pfeiffer", "xlm-roberta-base") is None
    assert short("org/name@v2", None) is None
    # ambiguous on mBERT (a language adapter and a WikiANN task adapter), as in AdapterHub
    with pytest.raises(AdapterNameError, match="several.*en/wiki.*wikiann/en"):
        short("en", "bert-base-multilingual-cased")
    # the model decides: without one, the message lists the repository ids to write
    with pytest.raises(AdapterNameError, match="pass the base model.*AdapterHub/xlm-roberta-base-en-wiki_pfeiffer "
                                               "on xlm-roberta-base"):
        short("en/wiki@ukp", None)
    with pytest.raises(AdapterNameError, match="'roberta-base' is not one of"):
        short("en/wiki@ukp", "roberta-base")
    # not in the table: refused with what to write instead
    for name, model in (("sst-2", "xlm-roberta-base"), ("en/wiki@other", "xlm-roberta-base"),
                        ("am/wiki", "xlm-roberta-base"), ("sst-2", None)):
        with pytest.raises(AdapterNameError, match="write the adapter's Hugging Face Hub repository id"):
            short(name, model)
    assert short("xx/wiki", "xlm-roberta-base") is None  # not an AdapterHub name: a Hub repository id


def test_index_table_is_well_formed():
    for model, entries in hub.ADAPTERHUB_INDEX.items():
        assert len(entries) >= 16, model
        for key, file_name in entries.items():
            task, subtask = key.split("/")
            assert file_name.startswith(model) and "pfeiffer" in file_name, (key, file_name)
            assert (task in file_name) or (subtask in file_name), (key, file_name)


# ------------------------------------------------------------------------------------------------------------
# loading from the cache, offline
# ------------------------------------------------------------------------------------------------------------
def test_every_layout_loads_from_the_hub_cache(cache, tmp_path):
    src = _trained(tmp_path)
    batch = padded_batch(src["model"].config)
    want = _logits(src["model"], batch)
    add_snapshot(cache, "someone/lang-en", src["hub_bin"])                                 # AdapterHub .bin, main
    tagged = add_snapshot(cache, "someone/ner", src["hub_safe_head"], refs=("v1",), subfolder="hub/ner")
    commit = add_snapshot(cache, "someone/madx", src["own_head"], subfolder="ner")        # own format + head

    for task_spec in ("someone/ner@v1/hub/ner", f"someone/ner@{tagged}/hub/ner", f"someone/madx@{commit}/ner",
                      "someone/madx/ner"):
        target = _model()  # the source's backbone; adapters and head come from the cache
        madx = add_madx(target, backend="eager")
        assert madx.load_adapter("someone/lang-en") == "en"
        assert madx.load_adapter(task_spec, with_head=True) == "ner"
        madx.set_active(Stack("en", "ner"))
        assert max_diff(_logits(target, batch), want) < 1e-6, task_spec

    target = _model(seed=4)
    madx = add_madx(target, backend="eager")
    assert madx.import_adapterhub("hf:someone/lang-en", load_as="en2") == "en2"
    resolved = resolve_adapter("someone/ner@v1/hub/ner")
    assert resolved.commit == tagged and resolved.ref == f"someone/ner@{tagged}/hub/ner"
    assert os.path.realpath(os.path.join(resolved.path, "adapter_config.json")).startswith(os.path.realpath(cache))


def test_short_name_loads_the_adapter_adapterhub_would(cache, tmp_path):
    src = _trained(tmp_path)
    # a file as adapter-transformers v1 wrote it (no "version"; legacy key names) under the redirected id
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    meta = json.loads(open(os.path.join(src["hub_bin"], "adapter_config.json")).read())
    meta.pop("version")
    (legacy / "adapter_config.json").write_text(json.dumps(meta))
    weights = torch.load(os.path.join(src["hub_bin"], "pytorch_adapter.bin"), weights_only=True)
    torch.save({k.replace("output.adapters", "output.layer_text_lang_adapters")
                .replace("invertible_adapters", "invertible_lang_adapters"): v for k, v in weights.items()},
               legacy / "pytorch_adapter.bin")
    add_snapshot(cache, "AdapterHub/xlm-roberta-base-en-wiki_pfeiffer", str(legacy))
    batch = padded_batch(src["model"].config)
    src["madx"].set_active("en")
    want = _logits(src["model"], batch)
    for name in ("en/wiki@ukp", "en/wiki", "@ukp/xlm-roberta-base-en-wiki_pfeiffer"):
        target = _model()  # config name "xlm-roberta-base": the short name's model
        target.classifier.load_state_dict(src["model"].classifier.state_dict())
        madx = add_madx(target, backend="eager")
        assert madx.load_adapter(name, set_active=True) == "en"
        assert max_diff(_logits(target, batch), want) < 1e-6, name
    other = add_madx(_model(seed=5, name="roberta-base"), backend="eager")
    with pytest.raises(AdapterNameError, match="'roberta-base' is not one of"):
        other.load_adapter("en/wiki@ukp")


def test_errors_name_what_was_looked_for_and_change_nothing(cache, tmp_path):
    src = _trained(tmp_path)
    add_snapshot(cache, "someone/lang-en", src["hub_bin"])
    target = _model(seed=6)
    madx = add_madx(target, backend="eager")
    before, adapters = _state(target), dict(madx.adapters)
    cases = [
        ("someone/missing", AdapterNotFoundError, "'someone/missing' is not a directory here, and the Hub "
                                                  "repository someone/missing: it is not in the Hugging Face cache"),
        ("someone/lang-en@v9", AdapterNotFoundError, "someone/lang-en@v9.*HF_HUB_OFFLINE=1"),
        ("someone/lang-en/sub", AdapterNotFoundError, "folder 'sub'.* holds no adapter files"),
        ("./runs/lang-en", AdapterNotFoundError, "does not exist"),      # a path: never a Hub lookup
        (str(tmp_path / "nope"), FileNotFoundError, "does not exist"),
        ("justaword", AdapterNameError, "write the adapter's Hugging Face Hub repository id"),
        ("some one/x", AdapterNameError, "not a valid Hub repository id"),
    ]
    for spec, exc, match in cases:
        with pytest.raises(exc, match=match):
            madx.load_adapter(spec)
        now = target.state_dict()
        assert dict(madx.adapters) == adapters and all(torch.equal(now[k], v) for k, v in before.items())


def test_a_local_directory_wins_over_a_hub_name_unless_hf_is_written(cache, tmp_path, monkeypatch):
    src = _trained(tmp_path)
    add_snapshot(cache, "someone/en", src["own_en"])
    os.makedirs(tmp_path / "cwd" / "someone")
    monkeypatch.chdir(tmp_path / "cwd")
    os.symlink(src["hub_bin"], "someone/en")   # a local directory of the same name
    assert resolve_adapter("someone/en").local and resolve_adapter("someone/en").path == "someone/en"
    assert not resolve_adapter("hf:someone/en").local


def test_bin_weights_never_run_pickled_code(cache, tmp_path):
    """A .bin from the Hub is read with torch.load(weights_only=True): a pickle that would run code is refused
    with the file named, and its code never runs."""
    src = _trained(tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    files = {"adapter_config.json": open(os.path.join(src["hub_bin"], "adapter_config.json"), "rb").read()}
    evil = tmp_path / "evil.bin"
    torch.save({"x": Exploit()}, evil)
    files["pytorch_adapter.bin"] = evil.read_bytes()
    marker.unlink(missing_ok=True)
    add_files(cache, "attacker/adapter", files)
    madx = add_madx(_model(XLMRobertaForMaskedLM), backend="eager")
    with pytest.raises(AdapterFileError, match="pytorch_adapter.bin: cannot read weights"):
        madx.load_adapter("attacker/adapter")
    assert not marker.exists() and "en" not in madx
