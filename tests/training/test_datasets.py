"""The paper's datasets by their Hub names, offline: the one alias table (short names -> current repository
and config name), the splits each has (XQuAD: validation only; XCOPA: no train; a missing split is refused
with the splits that exist, before any download), the default evaluation split, and reading through
``datasets.load_dataset`` from a ``datasets`` cache written by its own builder (HF_DATASETS_OFFLINE=1), up to
``madx train-task`` / ``madx transfer`` on ``wikiann:{lang}``."""
from __future__ import annotations

import json
import os

import datasets
import pytest

from madx_fast.cli import main
from madx_fast.training import data as D
from madx_fast.training.tasks.copa import CopaTask
from madx_fast.training.tasks.ner import NerTask
from madx_fast.training.tasks.qa import QaTask
from tests.helpers.datasets_cache import add_dataset, copa_features, squad_features, wikiann_features

WIKIANN = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]


def test_short_names_resolve_to_the_current_hub_repositories_and_configs():
    def hf(spec, lang=None):
        s = D.resolve_spec(spec, lang)
        return s.kind, s.name, s.config
    assert hf("wikiann:sw") == ("hf", "unimelb-nlp/wikiann", "sw")
    assert hf("wikiann:{lang}", "qu") == hf("unimelb-nlp/wikiann:qu") == ("hf", "unimelb-nlp/wikiann", "qu")
    assert hf("xquad:de") == hf("xquad:xquad.de") == hf("google/xquad:xquad.de") == ("hf", "google/xquad", "xquad.de")
    assert hf("xcopa:{lang}", "sw") == ("hf", "cambridgeltl/xcopa", "sw")
    assert hf("squad") == hf("rajpurkar/squad") == ("hf", "rajpurkar/squad", "plain_text")
    assert hf("copa") == hf("super_glue:copa") == hf("aps/super_glue:copa") == ("hf", "aps/super_glue", "copa")
    assert hf("wikipedia:sw") == hf("wikimedia/wikipedia:20231101.sw") == ("hf", "wikimedia/wikipedia", "20231101.sw")
    assert hf("wikipedia:20220301.sw")[2] == "20220301.sw"  # a config written in full is kept
    assert D.resolve_spec("aps/super_glue:boolq").known is None  # another dataset of the repository: as given
    assert hf("someone/data:cfg") == ("hf", "someone/data", "cfg")
    for spec, match in (("xquad:xx", "no config 'xquad.xx'.*languages: ar, de"), ("xcopa:de", "no config 'de'"),
                        ("wikiann", "one config per language: write wikiann:{lang}"),
                        ("conll2003", "not a Hub dataset id.*wikiann, xquad, xcopa, squad, copa, wikipedia")):
        with pytest.raises(D.DataError, match=match):
            D.resolve_spec(spec)


def test_splits_each_dataset_has():
    def split(spec, name):
        return D.hf_split(D.resolve_spec(spec), name)
    assert split("wikiann:sw", "test") == "test" and split("xquad:de", "dev") == "validation"
    with pytest.raises(D.DataError, match=r"google/xquad:xquad.de has no 'test' split \(splits: validation\)\. "
                                          "XQuAD is one evaluation set"):
        split("xquad:de", "test")
    with pytest.raises(D.DataError, match=r"has no 'train' split \(splits: validation, test\).*English COPA"):
        split("xcopa:sw", "train")
    with pytest.raises(D.DataError, match=r"has no 'validation' split \(splits: train\).*--eval-fraction"):
        split("wikipedia:sw", "validation")
    assert split("someone/data", "whatever") == "whatever"  # unknown datasets: datasets decides
    assert [D.default_eval_split(s, "de") for s in ("xquad:{lang}", "wikiann:{lang}", "xcopa:sw", "copa", "x/y")] == \
        ["validation", "test", "test", "validation", "test"]


# ------------------------------------------------------------------------------------------------------------
# through `datasets`, offline, from its own cache
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ds_cache(tmp_path_factory, corpus):
    cache = str(tmp_path_factory.mktemp("datasets_cache"))
    for lang in ("alpha", "beta"):
        splits = {}
        for split in ("train", "validation", "test"):
            with open(os.path.join(corpus, lang, "ner", f"{split}.jsonl"), encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
            splits[split] = [{"tokens": r["tokens"], "ner_tags": [WIKIANN.index(t) for t in r["ner_tags"]],
                              "langs": [lang] * len(r["tokens"]), "spans": []} for r in rows]
        add_dataset(cache, "unimelb-nlp/wikiann", lang, splits, wikiann_features())
    context = "Nairobi is the capital of Kenya."
    add_dataset(cache, "google/xquad", "xquad.de", {"validation": [
        {"id": "q1", "context": context, "question": "What is the capital?",
         "answers": {"text": ["Nairobi"], "answer_start": [0]}}]}, squad_features())
    copa = {"premise": "The man fell.", "choice1": "He slipped.", "choice2": "He sang.", "question": "cause",
            "idx": 0, "label": 0}
    add_dataset(cache, "aps/super_glue", "copa", {"train": [copa], "validation": [copa],
                                                  "test": [dict(copa, label=-1)]}, copa_features())
    return cache


@pytest.fixture
def offline(ds_cache, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", ds_cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return ds_cache


def test_tasks_read_the_paper_datasets_by_name_offline(offline, corpus):
    train = NerTask.read("wikiann:{lang}", "train", lang="alpha")
    assert train.labels == WIKIANN  # the ClassLabel names of the dataset
    with open(os.path.join(corpus, "alpha", "ner", "train.jsonl"), encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert (train.examples[0].tokens, train.examples[0].tags) == (first["tokens"], first["ner_tags"])
    qa = QaTask.read("xquad:{lang}", D.default_eval_split("xquad:{lang}", "de"), lang="de").examples
    assert qa[0].answers == [{"text": "Nairobi", "answer_start": 0}]
    assert CopaTask.read("copa", "train").examples[0].choices == ["He slipped.", "He sang."]
    with pytest.raises(D.DataError, match="no label.*use a labelled split"):
        CopaTask.read("copa", "test")
    with pytest.raises(D.DataError, match="has no 'test' split"):
        QaTask.read("xquad:de", "test")
    with pytest.raises(D.DataError, match="cannot load dataset 'unimelb-nlp/wikiann'.*HF_DATASETS_OFFLINE"):
        NerTask.read("wikiann:gamma", "train")  # not in the cache
    # a dataset outside the table: datasets' own split check, reported with the splits there are
    add_dataset(offline, "someone/ner", "default", {"train": [{"tokens": ["a"], "ner_tags": [0], "langs": ["x"],
                                                              "spans": []}]}, wikiann_features())
    with pytest.raises(D.DataError, match=r"someone/ner:default has no 'test' split \(splits: train\)"):
        NerTask.read("someone/ner:default", "test")


def test_train_and_transfer_on_wikiann_by_name(offline, capsys, tmp_path, tiny_base):
    """The documented NER path, with WikiANN by its short name: train-task on the source language, then the
    zero-shot matrix with transfer's default split (WikiANN's test)."""
    out = tmp_path / "ner"
    code = main(["train-task", "--task", "ner", "--model", tiny_base, "--lang", "alpha", "--train-data",
                 "wikiann:alpha", "--output", str(out), "--steps", "2", "--batch-size", "8", "--backend", "eager",
                 "--device", "cpu", "--max-length", "32", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["labels"] == WIKIANN and run["final_eval"]["examples"] == 24  # wikiann:alpha's validation split
    code = main(["transfer", "--task-adapter", str(out), "--targets", "alpha,beta", "--eval-data", "wikiann:{lang}",
                 "--output", str(tmp_path / "report"), "--backend", "eager", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "report" / "transfer_results.json").read_text())
    assert {(r["target"], r["split"], r["metrics"]["examples"]) for r in report["records"]} == \
        {("alpha", "test", 24), ("beta", "test", 24)}
