"""``madx push`` and ``push_adapter_to_hub`` upload through huggingface_hub's API, with the token from the
usual places, to a Hub on loopback that records every request; what arrives loads back as the adapter that
was pushed. Model cards carry the run's facts in the Hub's format."""
from __future__ import annotations

import json
import os

import huggingface_hub.constants
import pytest
import torch
import yaml
from transformers import XLMRobertaForTokenClassification

from madx_fast.cli import main
from madx_fast.model import MadxConfig, add_madx
from madx_fast.model.card import adapter_card
from madx_fast.training import train_language_adapter
from madx_fast.training.runs import card_facts
from tests.helpers.hub_cache import add_files
from tests.helpers.hub_server import REFUSED_TOKEN, HubServer, closed_port, use_endpoint
from tests.helpers.models import randomize, tiny_config
from tests.helpers.processes import run_bounded
from tests.helpers.runs import ROOT, env_for_subprocess, madx_command, quiet_config

TOKEN = "hf_test_token"


@pytest.fixture
def hub(monkeypatch):
    with HubServer() as server:
        use_endpoint(monkeypatch, server.endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", TOKEN)  # the usual place huggingface_hub reads it from
        yield server


@pytest.fixture(scope="module")
def lang_run(tmp_path_factory, tiny_base, corpus):
    out = str(tmp_path_factory.mktemp("push") / "lang-alpha")
    train_language_adapter(model=tiny_base, lang="alpha", train_data=os.path.join(corpus, "alpha", "text", "train.txt"),
                           output_dir=out, config=quiet_config(steps=2, save_every=1), max_length=32, backend="eager")
    return out


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_push_adapter_to_hub_uploads_what_loads_back(hub, tmp_path, monkeypatch):
    torch.manual_seed(1)
    model = XLMRobertaForTokenClassification(tiny_config(num_labels=3)).eval()
    madx = add_madx(model, backend="eager")
    madx.add_adapter("ner", MadxConfig.task())
    randomize(model)
    url = madx.push_adapter_to_hub("me/ner-tiny", "ner", with_head=True, private=True)
    repo = hub.repos["me/ner-tiny"]
    assert url.startswith(hub.endpoint) and repo.private and repo.commits == [("main", "madx_fast: adapter ner")]
    assert set(repo.files) == {"madx_adapter.json", "madx_adapter.safetensors", "madx_head.safetensors", "README.md"}
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests if r.method == "POST")
    assert _front_matter(repo.files["README.md"].decode())["library_name"] == "madx_fast"
    # what arrived on the Hub, read back through huggingface_hub's cache (offline), is the adapter pushed
    cache = str(tmp_path / "cache")
    add_files(cache, "me/ner-tiny", repo.files)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    torch.manual_seed(1)  # the same backbone; the adapter and the head come from the Hub
    other = XLMRobertaForTokenClassification(tiny_config(num_labels=3)).eval()
    torch.nn.init.zeros_(other.classifier.weight)
    name = add_madx(other, backend="eager").load_adapter("me/ner-tiny", with_head=True, set_active=True)
    madx.set_active("ner")
    ids = torch.randint(4, 100, (2, 7))
    assert name == "ner" and torch.equal(other(input_ids=ids).logits, model(input_ids=ids).logits)


def test_madx_push_a_run_directory(hub, lang_run, capsys):
    assert main(["push", lang_run, "me/lang-alpha", "--revision", "v1", "--message", "first"]) == 0
    assert capsys.readouterr().out.strip().startswith(hub.endpoint)
    repo = hub.repos["me/lang-alpha"]
    assert repo.branches == ["v1"] and repo.commits == [("v1", "first")] and not repo.private
    assert {"run.json", "log.jsonl", "README.md", "adapter/madx_adapter.json", "adapter/madx_adapter.safetensors",
            "adapter/madx_run.json", "adapter/README.md"} <= set(repo.files)
    assert "checkpoint.pt" not in repo.files  # the optimizer state stays home unless asked for
    with open(os.path.join(lang_run, "adapter", "madx_adapter.safetensors"), "rb") as f:
        assert repo.files["adapter/madx_adapter.safetensors"] == f.read()
    card = repo.files["README.md"].decode()
    meta = _front_matter(card)
    assert meta["tags"][:3] == ["madx_fast", "adapters", "mad-x"] and "language-adapter" in meta["tags"]
    assert set(meta["metrics"]) == {"mlm_loss", "perplexity"}
    assert "train.txt" in card and "load_adapter('me/lang-alpha/adapter')" in card
    assert main(["push", lang_run, "me/lang-alpha-full", "--include-checkpoint", "--private"]) == 0
    assert "checkpoint.pt" in hub.repos["me/lang-alpha-full"].files and hub.repos["me/lang-alpha-full"].private


def test_push_through_hf_endpoint_from_a_shell(lang_run):
    """The command as a user runs it: HF_ENDPOINT and HF_TOKEN in the environment."""
    with HubServer() as server:
        env = env_for_subprocess(HF_ENDPOINT=server.endpoint, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0")
        proc = run_bounded(madx_command("push", os.path.join(lang_run, "adapter"), "me/alpha"), env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "madx_adapter.safetensors" in server.repos["me/alpha"].files
        assert [r for r in server.requests if r.headers.get("authorization") == f"Bearer {TOKEN}"]


def test_push_failures_are_one_line(hub, lang_run, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", REFUSED_TOKEN)
    assert main(["push", lang_run, "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did not accept the token (401)" in err and "hf auth login" in err, err
    before = len(hub.requests)
    assert main(["push", str(tmp_path / "nope"), "me/x"]) == 2
    assert "does not exist" in capsys.readouterr().err and len(hub.requests) == before  # checked first
    assert main(["push", lang_run, "not a repo id"]) == 2
    assert "is not a Hub repository id" in capsys.readouterr().err
    use_endpoint(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    assert main(["push", lang_run, "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot be reached (connection refused)" in err, err


def test_a_cards_front_matter_names_the_base_model_language_datasets_and_metrics():
    facts = card_facts({"stage": "task", "task": "ner", "language": "sw", "base_model": "xlm-roberta-base",
                        "train_data": "wikiann:{lang}", "labels": ["O", "B-PER", "I-PER"], "steps": 1000,
                        "step": 800, "metrics": {"f1": 0.81, "eval_time_s": 3.0}})
    assert facts["datasets"] == ["unimelb-nlp/wikiann"]
    card = adapter_card("ner", MadxConfig.task().to_dict(), model_class="XLMRobertaForTokenClassification",
                        with_head=True, run=facts)
    meta = _front_matter(card)
    assert meta["base_model"] == "xlm-roberta-base" and meta["language"] == ["sw"]
    assert meta["datasets"] == ["unimelb-nlp/wikiann"] and meta["metrics"] == ["f1"]
    assert meta["pipeline_tag"] == "token-classification" and "task-adapter" in meta["tags"] and "ner" in meta["tags"]
    assert "f1 0.81" in card and "1,000 (this is step 800)" in card and "3 labels" in card
    json.dumps(meta)  # plain data
