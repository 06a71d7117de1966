"""Data: specs, text reading and packing, BERT masking, the seeded stream, WikiANN / CoNLL / HF-dataset NER with
first-sub-token label alignment, SQuAD windows, COPA."""
from __future__ import annotations

import json
import os

import pytest
import torch

from madx_fast.training import data as D
from madx_fast.training.tasks import copa, mlm, ner, qa
from madx_fast.training.trainer import ShuffledStream


@pytest.fixture(scope="module")
def tok(tiny_base):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_base)


# ---------------------------------------------------------------------------------------------------------
def test_specs(tmp_path):
    f = tmp_path / "sw.txt"
    f.write_text("hello\n")
    assert D.resolve_spec(str(f)).kind == "local"
    assert D.resolve_spec(str(tmp_path / "{lang}.txt"), "sw").path == str(f)
    assert D.resolve_spec("wikiann:sw").name == "unimelb-nlp/wikiann"  # short names: tests/training/test_datasets.py
    assert D.resolve_spec("wikiann:{lang}", "qu").config == "qu"
    assert (D.resolve_spec("google/xquad:xquad.de").name, D.resolve_spec("google/xquad:xquad.de").config) == \
        ("google/xquad", "xquad.de")
    assert D.resolve_spec("hf:" + str(f)).kind == "hf"  # forced
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.resolve_spec(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError):
        D.resolve_spec("data/missing.jsonl")
    with pytest.raises(D.DataError, match="no language"):
        D.resolve_spec("wikiann:{lang}")


def test_read_texts_file_and_directory(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("one\n\n two \n")
    (tmp_path / "d" / "sub" / "b.txt").write_text("three\n")
    (tmp_path / "d" / "c.jsonl").write_text(json.dumps({"text": "four"}) + "\n")
    (tmp_path / "d" / ".hidden.txt").write_text("no\n")
    assert D.read_texts(str(tmp_path / "d")) == ["one", "two", "four", "three"]
    assert D.read_texts(str(tmp_path / "d"), max_texts=2) == ["one", "two"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match="no text files"):
        D.read_texts(str(tmp_path / "empty"))


def test_read_texts_from_a_hf_dataset(tmp_path):
    """The HF-datasets path (``datasets.load_dataset``), on a local data directory."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps({"content": f"line {i}"}) + "\n" for i in range(5)))
    assert D.read_texts("hf:" + str(tmp_path / "ds"), text_column="content") == [f"line {i}" for i in range(5)]
    with pytest.raises(D.DataError, match="no column 'text'"):
        D.read_texts("hf:" + str(tmp_path / "ds"))
    with pytest.raises(D.DataError, match="cannot load dataset"):
        D.read_texts("hf:" + str(tmp_path / "nope"))


def test_pack_blocks():
    ids, mask = mlm.pack_blocks([[5, 6, 7], [8], [], [9, 10]], max_length=6, bos_id=0, eos_id=2, pad_id=1)
    # stream 5 6 7 </s> 8 </s> 9 10, cut into pieces of 4, each wrapped in <s> ... </s>
    assert ids.tolist() == [[0, 5, 6, 7, 2, 2], [0, 8, 2, 9, 10, 2]]
    assert mask.tolist() == [[1] * 6] * 2
    ids, mask = mlm.pack_blocks([[5, 6, 7, 8, 9]], max_length=5, bos_id=0, eos_id=2, pad_id=1)
    assert ids.tolist() == [[0, 5, 6, 7, 2], [0, 8, 9, 2, 1]] and mask[1].tolist() == [1, 1, 1, 1, 0]


def test_mask_tokens_80_10_10():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (400, 128))
    ids[:, 0], ids[:, -1] = 0, 2
    mask = torch.ones_like(ids)
    mask[:, 100:] = 0
    ids[:, 100:] = 1
    inputs, labels = mlm.mask_tokens(ids, mask, (0, 1, 2, 3, 4), 4, 1000, g)
    sel = labels != -100
    assert not sel[:, 0].any() and not sel[:, 100:].any()  # specials and padding never selected
    rate = sel.sum().item() / (400 * 98)
    assert 0.14 < rate < 0.16
    assert torch.equal(labels[sel], ids[sel])
    masked = (inputs == 4) & sel
    kept = (inputs == ids) & sel
    random = sel & ~masked & ~kept
    n = sel.sum().item()
    assert 0.78 < masked.sum().item() / n < 0.82
    assert 0.09 < kept.sum().item() / n < 0.11 + 0.002  # random ids may hit the original (1/1000)
    assert 0.08 < random.sum().item() / n < 0.11
    assert torch.equal(inputs[~sel], ids[~sel])
    # a function of the generator state alone
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = mlm.mask_tokens(ids, mask, (0, 1, 2), 4, 1000, g1)
    b = mlm.mask_tokens(ids, mask, (0, 1, 2), 4, 1000, g2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_shuffled_stream_state():
    s = ShuffledStream(10, seed=3)
    first = s.take(7)
    state = s.state_dict()
    rest = s.take(25)
    t = ShuffledStream(10, seed=3)
    t.load_state_dict(state)
    assert t.take(25) == rest
    assert sorted(first + rest[:3]) == list(range(10))  # every example once per epoch
    assert rest[3:13] != first + rest[:3]  # a new order in the next epoch
    with pytest.raises(D.DataError, match="seed"):
        ShuffledStream(10, seed=4).load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------
def test_ner_json_conll_and_first_subtoken_alignment(tmp_path, tok):
    (tmp_path / "a.jsonl").write_text(json.dumps({"tokens": ["Ana", "Kovacsalot", "visited", "Marlow"],
                                                  "ner_tags": ["B-PER", "I-PER", "O", "B-LOC"]}) + "\n")
    examples, labels = ner.read_ner(str(tmp_path / "a.jsonl"), "train")
    assert labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]  # BIO completed for every type
    (feat,) = ner.encode_ner(examples, tok, labels, 32)
    word_ids, lab = feat["word_ids"], feat["labels"]
    assert word_ids[0] is None and lab[0] == -100
    for pos, w in enumerate(word_ids):
        if w is None:
            assert lab[pos] == -100
        elif pos > 0 and word_ids[pos - 1] == w:
            assert lab[pos] == -100  # later sub-tokens of a word
        else:
            assert lab[pos] == labels.index(examples[0].tags[w])
    assert sum(x != -100 for x in lab) == 4
    assert len([w for w in word_ids if w == 1]) > 1  # the long word really was split

    (tmp_path / "b.conll").write_text("-DOCSTART- O\n\nsw:Ana B-PER\nsw:yuko O\nsw:Nairobi B-LOC\n\nsw:Sawa O\n")
    examples, labels = ner.read_ner(str(tmp_path / "b.conll"), "train")
    assert [e.tokens for e in examples] == [["Ana", "yuko", "Nairobi"], ["Sawa"]]

    # integer tags are read with WikiANN's names
    (tmp_path / "c.jsonl").write_text(json.dumps({"tokens": ["Ana", "x"], "ner_tags": [1, 0]}) + "\n")
    examples, labels = ner.read_ner(str(tmp_path / "c.jsonl"), "train")
    assert labels == list(ner.WIKIANN_LABELS) and examples[0].tags == ["B-PER", "O"]
    with pytest.raises(D.DataError, match="not among the head's labels"):
        ner.encode_ner(examples, tok, ["O", "B-LOC"], 32)


def test_ner_split_files_in_a_directory(corpus):
    train, _ = ner.read_ner(os.path.join(corpus, "alpha", "ner"), "train")
    val, _ = ner.read_ner(os.path.join(corpus, "alpha", "ner"), "validation")
    assert len(train) == 64 and len(val) == 24


def test_ner_from_a_hf_dataset_with_classlabels(tmp_path):
    """WikiANN's layout through ``datasets.load_dataset``: ``ner_tags`` ClassLabel ids with their names."""
    import datasets
    names = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    ds = datasets.Dataset.from_dict({"tokens": [["Ana", "in", "Marlow"]], "ner_tags": [[1, 0, 5]]}, features=features)
    (tmp_path / "wikiann_like").mkdir()
    ds.to_parquet(str(tmp_path / "wikiann_like" / "validation.parquet"))
    examples, labels = ner.read_ner("hf:" + str(tmp_path / "wikiann_like"), "validation")
    assert labels == names and examples[0].tags == ["B-PER", "O", "B-LOC"]


def test_squad_windows_point_at_the_answer(tmp_path, tok):
    ctx = "Ana Kovac travelled to Marlow in 1990 . " * 3 + "Boris met Greta in Velden ."
    rec = {"id": "q1", "question": "Where did Boris meet Greta ?", "context": ctx,
           "answers": {"text": ["Velden"], "answer_start": [ctx.index("Velden")]}}
    (tmp_path / "qa.jsonl").write_text(json.dumps(rec) + "\n")
    examples = qa.read_squad(str(tmp_path / "qa.jsonl"), "validation")
    try:
        feats = qa.encode_qa_train(examples, tok, max_length=40, doc_stride=8)
    except D.DataError as exc:  # tokenizers 0.23.1/0.23.2 drop overflow windows: refused, not trained on wrongly
        import tokenizers
        assert "tokenizers#2091" in str(exc) and tokenizers.__version__ in ("0.23.1", "0.23.2"), exc
        return
    assert len(feats) > 1  # the context did not fit one window
    with_answer = [f for f in feats if f["start_positions"] > 0]
    assert with_answer
    for f in with_answer:
        text = tok.decode(f["input_ids"][f["start_positions"]:f["end_positions"] + 1]).strip()
        assert text == "Velden"
    evals = qa.encode_qa_eval(examples, tok, max_length=40, doc_stride=8)
    assert all(f["offsets"][0] is None for f in evals)  # question/special positions are not answers
    bad = dict(rec, answers={"text": ["Velden"], "answer_start": [len(ctx)]})
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(D.DataError, match="outside its context"):
        qa.read_squad(str(tmp_path / "bad.jsonl"), "train")
    with pytest.raises(D.DataError, match="raise --max-length"):
        qa.encode_qa_train(examples, tok, max_length=12, doc_stride=8)


def test_copa(tmp_path, tok):
    rec = {"premise": "The man fell.", "choice1": "He slipped.", "choice2": "He sang.", "question": "cause", "label": 0}
    (tmp_path / "copa.jsonl").write_text(json.dumps(rec) + "\n")
    (ex,) = copa.read_copa(str(tmp_path / "copa.jsonl"), "test")
    (feat,) = copa.encode_copa([ex], tok, 32)
    assert len(feat["choice_ids"]) == 2 and feat["label"] == 0
    (tmp_path / "bad.jsonl").write_text(json.dumps(dict(rec, label=2)) + "\n")
    with pytest.raises(D.DataError, match="does not fit a 2-choice head"):
        copa.read_copa(str(tmp_path / "bad.jsonl"), "test")
