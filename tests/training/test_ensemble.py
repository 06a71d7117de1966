"""A target language served by an ensemble of other languages' adapters (``--lang-adapter qu=avg:es,pt`` /
``qu=emea:es,pt``): the syntax, EMEA's entropy-minimisation steps (the entropy goes down, nothing but the
ensemble weights changes, an ensemble of one is its member), and both in ``madx transfer`` and ``madx predict``."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from transformers import XLMRobertaForTokenClassification

from madx_fast.model import Average, MadxConfig, PerRow, Stack, add_madx
from madx_fast.training import evaluate_transfer, predict_stream
from madx_fast.training.ensemble import (EnsembleSpec, check_ensembles, ensemble_block, entropy_minimisation,
                                         parse_ensemble, prediction_entropy)
from madx_fast.training.settings import TransferSettings
from tests.helpers.models import max_diff, padded_batch, randomize, tiny_config

NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]


def test_the_ensemble_syntax():
    assert parse_ensemble("qu", "runs/lang-qu") is None
    assert parse_ensemble("qu", "c:/adapters/qu") is None  # a path with a colon is still a path
    assert parse_ensemble("qu", "avg:es,pt") == EnsembleSpec("avg", ("es", "pt"))
    assert parse_ensemble("qu", "avg:es=0.7, pt=0.3") == EnsembleSpec("avg", ("es", "pt"), (0.7, 0.3))
    assert str(parse_ensemble("qu", "emea:es,pt")) == "emea:es,pt"
    for value, match in (("avg:", "member languages"), ("avg:es,,pt", "member languages"),
                         ("avg:es=1,pt", "every member or for none"), ("emea:es=1,pt=2", "tunes the weights"),
                         ("avg:es,es", "twice"), ("avg:qu,es", "its own language"), ("avg:es=x", "not a number"),
                         ("avg:es=1,pt=-1", "not sum to 0")):
        with pytest.raises(ValueError, match=match):
            parse_ensemble("qu", value)
    with pytest.raises(ValueError, match="'pt' is not a --lang-adapter entry"):
        check_ensembles({"es": "d", "qu": "avg:es,pt"})
    with pytest.raises(ValueError, match="itself an ensemble"):
        check_ensembles({"es": "d", "pt": "avg:es", "qu": "avg:es,pt"})
    # one system's ensemble (SYSTEM:LANG=): its members are that system's entries, else the plain ones
    assert check_ensembles({"S:es": "d", "pt": "d", "S:qu": "avg:es,pt"}) == {"S:qu": EnsembleSpec("avg", ("es", "pt"))}
    assert list(check_ensembles({"{lang}": "runs/lang-{lang}", "qu": "emea:es,pt"})) == ["qu"]
    with pytest.raises(ValueError, match="'es' is not a --lang-adapter entry"):
        check_ensembles({"T:es": "d", "pt": "d", "S:qu": "avg:es,pt"})  # another system's es is not S's
    with pytest.raises(ValueError, match="itself an ensemble"):
        check_ensembles({"es": "d", "S:es": "avg:pt", "pt": "d", "S:qu": "avg:es,pt"})
    with pytest.raises(ValueError, match="its own language"):
        check_ensembles({"es": "d", "S:qu": "avg:qu,es"})
    with pytest.raises(ValueError, match="serves one language"):
        check_ensembles({"es": "d", "{lang}": "avg:es"})
    with pytest.raises(ValueError, match="do not combine with --cuda-graphs"):
        TransferSettings(task_adapters=["t"], targets=["qu"], eval_data="d", cuda_graphs=True,
                         lang_adapters={"es": "d", "pt": "d", "qu": "emea:es,pt"}).check()


def _model(backend="eager"):
    torch.manual_seed(0)
    model = XLMRobertaForTokenClassification(tiny_config("xlm-roberta", num_labels=len(NER_LABELS),
                                                         hidden_dropout_prob=0.0,
                                                         attention_probs_dropout_prob=0.0)).eval()
    madx = add_madx(model, backend=backend)
    for lang in ("es", "pt", "it"):
        madx.add_adapter(lang, MadxConfig.language())
    madx.add_adapter("ner", MadxConfig.task())
    randomize(model, "adapters.", std=0.5)
    randomize(model, "classifier", std=2.0, seed=1)
    return model, madx


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_emea_lowers_the_entropy_and_changes_nothing_but_the_weights(backend):
    model, madx = _model(backend)
    ids, mask = padded_batch(model.config, batch=4)
    block = ensemble_block("qu", EnsembleSpec("emea", ("es", "pt", "it")), "cpu")
    madx.set_active(Stack(block, "ner"))
    uniform = _logits(model, ids, mask)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with entropy_minimisation(model, madx, steps=4, lr=2.0) as hook:
        tuned = _logits(model, ids, mask)
    first, last = hook.last
    assert last < first - 1e-3, hook.last
    h_uniform = prediction_entropy(type("Out", (), {"logits": uniform})(), ids, model.config.pad_token_id).mean()
    assert abs(h_uniform.item() - first) < 1e-4  # the steps start from uniform weights
    w = block.weights.detach()
    assert w.min() > 0 and abs(w.sum().item() - 1) < 1e-6 and max_diff(w, torch.full((3,), 1 / 3)) > 1e-3
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    # the prediction is the Average with the tuned weights
    madx.set_active(Stack(Average("es", "pt", "it", weights=w.tolist()), "ner"))
    assert max_diff(tuned, _logits(model, ids, mask)) < 1e-5
    assert max_diff(tuned, uniform) > 1e-4


def test_an_emea_ensemble_of_one_is_its_member():
    model, madx = _model()
    ids, mask = padded_batch(model.config)
    madx.set_active(Stack("es", "ner"))
    want = _logits(model, ids, mask)
    madx.set_active(Stack(ensemble_block("qu", EnsembleSpec("emea", ("es",)), "cpu"), "ner"))
    with entropy_minimisation(model, madx, steps=3, lr=5.0):
        assert torch.equal(_logits(model, ids, mask), want)


def test_emea_in_a_mixed_batch_tunes_only_its_rows():
    """PerRow("es", emea(pt, it)): the "es" rows are what they are without any ensemble; the ensemble's rows
    get lower entropy."""
    model, madx = _model()
    ids, mask = padded_batch(model.config, batch=4)
    langs = ["qu", "es", "qu", "es"]
    madx.set_active(Stack("es", "ner"))
    alone = _logits(model, ids, mask)
    block = ensemble_block("qu", EnsembleSpec("emea", ("pt", "it")), "cpu")
    madx.set_active(Stack(PerRow("es", block), "ner"))
    with madx.row_languages(langs), entropy_minimisation(model, madx, steps=3, lr=2.0) as hook:
        got = _logits(model, ids, mask)
    assert hook.last[1] < hook.last[0]
    for b in (1, 3):
        assert max_diff(got[b], alone[b]) < 1e-5


# --------------------------------------------------------------------------------------------------------
# madx transfer and madx predict
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_base, corpus):
    """Random language adapters for alpha and beta, a NER task adapter with its head, and NER data for "qu"
    (a copy of beta's: a language with data but no adapter)."""
    out = tmp_path_factory.mktemp("ensemble")
    model = XLMRobertaForTokenClassification.from_pretrained(
        tiny_base, num_labels=len(NER_LABELS), id2label=dict(enumerate(NER_LABELS)),
        label2id={n: i for i, n in enumerate(NER_LABELS)})
    madx = add_madx(model, backend="eager")
    dirs = {}
    for lang in ("alpha", "beta"):
        madx.add_adapter(lang, MadxConfig.language())
    madx.add_adapter("ner", MadxConfig.task())
    randomize(model, "adapters.", std=0.3, seed=1)
    randomize(model, "classifier", std=1.0, seed=2)
    for lang in ("alpha", "beta"):
        dirs[lang] = str(out / f"lang-{lang}")
        madx.save_adapter(dirs[lang], lang)
    dirs["ner"] = str(out / "ner")
    madx.save_adapter(dirs["ner"], "ner", with_head=True)
    data = out / "data"
    for lang in ("alpha", "beta"):
        shutil.copytree(os.path.join(corpus, lang, "ner"), data / lang / "ner")
    shutil.copytree(os.path.join(corpus, "beta", "ner"), data / "qu" / "ner")
    dirs["data"] = str(data / "{lang}" / "ner")
    return dirs


def test_transfer_to_a_language_served_by_an_ensemble(saved):
    langs = {"alpha": saved["alpha"], "beta": saved["beta"]}
    common = dict(task_adapters=[saved["ner"]], eval_data=saved["data"], backend="eager", device="cpu")
    plain = evaluate_transfer(lang_adapters=langs, targets=["beta"], **common)["records"][0]
    ens = evaluate_transfer(lang_adapters={**langs, "qu": "avg:beta=1,alpha=0", "qe": "emea:beta"},
                            targets=["qu"], **common)["records"]
    assert ens[0]["language_adapter"] == "avg:beta=1,alpha=0"
    assert ens[0]["metrics"] == plain["metrics"]  # the same data through an ensemble that is beta's adapter
    mixed = evaluate_transfer(lang_adapters={**langs, "qu": "emea:alpha,beta"}, targets=["qu", "alpha"],
                              emea_steps=2, emea_lr=1.0, **common)["records"]
    assert [r["language_adapter"] for r in mixed] == ["emea:alpha,beta", "alpha"]
    assert 0.0 <= mixed[0]["value"] <= 100.0 and mixed[0]["metrics"]["examples"] > 0


def test_each_system_has_its_own_ensemble(saved):
    """``SYSTEM:qu=avg:...`` serves that system's task adapters only, and a plain ensemble's members are each
    system's own adapters (``SYSTEM:beta=`` before ``beta=``): one call, two systems, two different ensembles."""
    langs = {"alpha": saved["alpha"], "beta": saved["beta"]}
    common = dict(eval_data=saved["data"], backend="eager", device="cpu")
    on_beta = {a: evaluate_transfer(task_adapters=[saved["ner"]], lang_adapters={"beta": saved[a]}, targets=["beta"],
                                    **common)["records"][0]["metrics"] for a in ("alpha", "beta")}
    scoped = evaluate_transfer(task_adapters=[f"A={saved['ner']}", f"B={saved['ner']}"], targets=["qu"],
                               lang_adapters={**langs, "A:qu": "avg:beta=1,alpha=0", "B:qu": "avg:alpha=1,beta=0"},
                               **common)["records"]
    assert [(r["system"], r["language_adapter"]) for r in scoped] == [("A", "avg:beta=1,alpha=0"),
                                                                       ("B", "avg:alpha=1,beta=0")]
    assert scoped[0]["metrics"] == on_beta["beta"] and scoped[1]["metrics"] == on_beta["alpha"]
    members = evaluate_transfer(task_adapters=[f"A={saved['ner']}", f"B={saved['ner']}"], targets=["qu"],
                                lang_adapters={**langs, "B:beta": saved["alpha"], "qu": "avg:beta"},
                                **common)["records"]
    assert members[0]["metrics"] == on_beta["beta"] and members[1]["metrics"] == on_beta["alpha"]


def test_predict_lines_of_an_ensemble_language(saved, tiny_base, corpus):
    with open(os.path.join(corpus, "beta", "ner", "test.jsonl"), encoding="utf-8") as f:
        sentences = [json.loads(line)["tokens"] for line in f][:6]
    lines = [{"lang": lang, "tokens": words} for words, lang in zip(sentences, ["qu", "alpha", "qu", "beta", "qu",
                                                                                 "alpha"])]
    common = dict(task_adapter=saved["ner"], batch_size=4, backend="eager", device="cpu", progress=False)
    langs = {"alpha": saved["alpha"], "beta": saved["beta"]}
    plain = list(predict_stream([dict(r, lang="beta") if r["lang"] == "qu" else r for r in lines],
                                lang_adapters=langs, **common))
    avg = list(predict_stream(lines, lang_adapters={**langs, "qu": "avg:beta"}, **common))
    assert [r["tags"] for r in avg] == [r["tags"] for r in plain]
    # the graph-replay path (on a CPU: rows padded to the graphs' fixed shapes) with an Average member
    graphed = list(predict_stream(lines, lang_adapters={**langs, "qu": "avg:beta"}, cuda_graphs=True, **common))
    assert [r["tags"] for r in graphed] == [r["tags"] for r in plain]
    emea = list(predict_stream(lines, lang_adapters={**langs, "qu": "emea:alpha,beta"}, emea_steps=2, **common))
    assert [r["lang"] for r in emea] == [r["lang"] for r in lines]
    assert all(e["tags"] == p["tags"] for e, p, r in zip(emea, plain, lines) if r["lang"] != "qu")
