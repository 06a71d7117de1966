"""``madx transfer`` on every kind of task-adapter directory: a run bundle, an adapter saved from Python with
``save_adapter(with_head=True)``, AdapterHub directories (our export with a static head, and the real
``adapters`` library's save of a flex tagging head), and a bundle written by madx_fast 0.1. All evaluate to
the same numbers, because they hold the same adapter and head."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file
from transformers import XLMRobertaForTokenClassification

from madx_fast.cli import main
from madx_fast.model import add_madx
from madx_fast.training import evaluate_transfer, train_language_adapter, train_task_adapter
from tests.helpers.models import import_adapterhub
from tests.helpers.runs import quiet_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base, corpus):
    out = tmp_path_factory.mktemp("transfer")
    langs = {}
    for lang in ("alpha", "beta"):
        langs[lang] = str(out / f"lang-{lang}")
        train_language_adapter(model=tiny_base, lang=lang, train_data=os.path.join(corpus, lang, "text", "train.txt"),
                               output_dir=langs[lang], config=quiet_config(steps=3), max_length=32, backend="eager")
    ner = str(out / "ner-alpha")
    train_task_adapter(task="ner", lang_adapter=langs["alpha"], train_data=os.path.join(corpus, "alpha", "ner"),
                       output_dir=ner, config=quiet_config(steps=8), max_length=32, backend="eager")
    return {"langs": langs, "ner": ner, "out": out}


def _evaluate(task_adapter, trained, corpus, settings=("target", "none")):
    result = evaluate_transfer(task_adapters=[task_adapter], lang_adapters=trained["langs"], targets=["alpha", "beta"],
                               eval_data=os.path.join(corpus, "{lang}", "ner"), settings=list(settings),
                               backend="eager", device="cpu")
    return {(r["target"], r["setting"]): r["metrics"] for r in result["records"]}


def _reloaded(trained, tiny_base):
    """The trained task adapter and head, loaded from its bundle into a fresh model."""
    meta = json.load(open(os.path.join(trained["ner"], "best", "madx_adapter.json")))
    labels = meta["head"]["labels"]
    model = XLMRobertaForTokenClassification.from_pretrained(
        tiny_base, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    madx = add_madx(model, backend="eager")
    madx.load_adapter(os.path.join(trained["ner"], "best"), with_head=True)
    return model, madx


def test_python_saved_and_adapterhub_task_adapters_evaluate_like_the_bundle(trained, tiny_base, corpus, tmp_path):
    want = _evaluate(trained["ner"], trained, corpus)
    assert want[("alpha", "target")]["examples"] > 0
    model, madx = _reloaded(trained, tiny_base)
    madx.save_adapter(tmp_path / "python", "ner", with_head=True)
    assert not os.path.exists(tmp_path / "python" / "madx_run.json")  # a plain adapter directory, no run record
    madx.export_adapterhub(tmp_path / "hub", "ner", with_head=True)
    assert _evaluate(str(tmp_path / "python"), trained, corpus) == want
    assert _evaluate(str(tmp_path / "hub"), trained, corpus) == want
    # the same through the command line
    assert main(["transfer", "--task-adapter", str(tmp_path / "python"), "--targets", "alpha,beta",
                 "--lang-adapter", *[f"{k}={v}" for k, v in trained["langs"].items()], "--eval-data",
                 os.path.join(corpus, "{lang}", "ner"), "--backend", "eager", "--device", "cpu", "--output",
                 str(tmp_path / "report")]) == 0
    records = json.load(open(tmp_path / "report" / "transfer_results.json"))["records"]
    assert {(r["target"], r["setting"]): r["metrics"]["f1"] for r in records} == \
        {k: v["f1"] for k, v in want.items() if k[1] == "target"}


def test_adapterhub_flex_head_evaluates_like_the_bundle(trained, tiny_base, corpus, tmp_path):
    adapters = import_adapterhub()
    want = _evaluate(trained["ner"], trained, corpus)
    model, madx = _reloaded(trained, tiny_base)
    madx.export_adapterhub(tmp_path / "static", "ner", with_head=True)
    hub = adapters.XLMRobertaAdapterModel.from_pretrained(tiny_base)
    hub.load_adapter(str(tmp_path / "static"), with_head=True)  # AdapterHub turns the static head into a flex one
    hub.save_adapter(str(tmp_path / "flex"), "ner", with_head=True)
    head_config = json.load(open(tmp_path / "flex" / "head_config.json"))
    assert head_config["config"]["head_type"] == "tagging"
    assert _evaluate(str(tmp_path / "flex"), trained, corpus) == want


def test_bundle_of_madx_fast_0_1_still_evaluates(trained, corpus, tmp_path):
    """0.1 bundles: ``kind`` instead of ``stage``, ``task_head.safetensors``, labels only in madx_run.json."""
    want = _evaluate(trained["ner"], trained, corpus, settings=("target", "source", "none"))
    old = tmp_path / "old"
    shutil.copytree(os.path.join(trained["ner"], "best"), old)
    save_file(load_file(old / "madx_head.safetensors"), old / "task_head.safetensors")
    os.remove(old / "madx_head.safetensors")
    adapter_meta = json.load(open(old / "madx_adapter.json"))
    for key in ("head", "checksum", "weights_sha256"):  # 0.1 had none of these
        adapter_meta.pop(key)
    adapter_meta["model"].pop("name_or_path")
    json.dump(adapter_meta, open(old / "madx_adapter.json", "w"))
    run_meta = json.load(open(old / "madx_run.json"))
    run_meta["kind"] = run_meta.pop("stage")
    run_meta["has_head"] = True
    json.dump(run_meta, open(old / "madx_run.json", "w"))
    assert _evaluate(str(old), trained, corpus, settings=("target", "source", "none")) == want


def test_plain_adapter_without_a_run_record_cannot_name_its_source(trained, tiny_base, corpus, tmp_path):
    _, madx = _reloaded(trained, tiny_base)
    madx.save_adapter(tmp_path / "python", "ner", with_head=True)
    with pytest.raises(ValueError, match="'source' setting needs a run bundle"):
        _evaluate(str(tmp_path / "python"), trained, corpus, settings=("source",))
    madx.save_adapter(tmp_path / "headless", "ner")
    from madx_fast.training import BundleError
    with pytest.raises(BundleError, match="has no task head"):
        _evaluate(str(tmp_path / "headless"), trained, corpus)
