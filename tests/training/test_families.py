"""The training commands on the model families beyond XLM-R, on tiny random models with tokenizers of each
family's kind (tests/helpers/tokenizers.py): a decoder's language adapter trained with the causal-LM objective
(chosen from the model; the loss is HF's causal loss; only the adapter trains; a resumed run is the same run),
NER on DeBERTa-v2, DistilBERT, XLM-R XL, GPT-2, Llama and Mistral, QA on Llama, COPA on DistilBERT, transfer and mixed-language predict on Llama, the
families without a head class refused up front, and the command line end to end on GPT-2."""
from __future__ import annotations

import json
import os

import pytest
import torch

from madx_fast.model import MadxConfig, Stack, add_madx
from madx_fast.model.adapter_files import read_adapter_info
from madx_fast.training import evaluate_transfer, models, train_language_adapter, train_task_adapter
from madx_fast.training.predict import predict_stream
from madx_fast.training.tasks import causal_lm
from tests.helpers.models import randomize
from tests.training.test_sync import micro_step_reads  # noqa: F401 (a fixture)
from tests.helpers.runs import (
    StoppedAfterCheckpoint,
    adapter_tensors,
    build_tiny_family_base,
    quiet_config,
    run_madx,
    step_losses,
    stop_after_checkpoint,
)

MAX_LENGTH = 32


@pytest.fixture(scope="module")
def bases(tmp_path_factory, corpus):
    """family -> a tiny base model directory, built on first use."""
    root, built = tmp_path_factory.mktemp("family_bases"), {}

    def get(family):
        if family not in built:
            built[family] = build_tiny_family_base(str(root / family), corpus, family)
        return built[family]
    return get


def _text(corpus, lang, split="train"):
    return os.path.join(corpus, lang, "text", f"{split}.txt")


def _train_lang(base, corpus, out, lang="alpha", steps=4, loop=None, **kwargs):
    kwargs.setdefault("eval_data", _text(corpus, lang, "validation"))
    return train_language_adapter(model=base, lang=lang, train_data=_text(corpus, lang), output_dir=str(out),
                                  max_length=MAX_LENGTH, backend="eager",
                                  config=quiet_config(steps=steps, **(loop or {})), **kwargs)


def _head_class(bundle) -> str:
    return read_adapter_info(str(bundle)).head.model_class


@pytest.fixture(scope="module")
def llama_langs(tmp_path_factory, bases, corpus):
    """Causal-LM language adapters alpha and beta on the tiny Llama."""
    out = tmp_path_factory.mktemp("llama_langs")
    return {lang: (_train_lang(bases("llama"), corpus, out / lang, lang), str(out / lang))
            for lang in ("alpha", "beta")}


# --------------------------------------------------------------------------------------------------------
# stage 1 on decoders: the causal-LM objective
# --------------------------------------------------------------------------------------------------------
def test_causal_objective_is_hf_causal_loss(bases, corpus):
    """The objective's summed loss over its count is HF's own ``labels=`` loss of the causal LM (labels shifted,
    padding ignored) on a padded batch of packed blocks, and its count is the targets HF scores."""
    from transformers import AutoModelForCausalLM

    base = bases("llama")
    tok = models.load_tokenizer(base)
    blocks = causal_lm.causal_data_from_texts(tok, open(_text(corpus, "alpha")).read().splitlines()[:40], 16)
    assert blocks.attention_mask[-1].sum() < 16, "the last block is padded"
    objective = causal_lm.CausalLmObjective(blocks)
    batch = objective.make_batch([0, len(blocks) - 1])
    model = AutoModelForCausalLM.from_pretrained(base)
    madx = add_madx(model, backend="eager")
    madx.add_adapter("alpha", MadxConfig.language(), set_active=True)
    randomize(model)
    with torch.no_grad():
        ours = objective.loss_sum(model, objective.prepare(batch)) / objective.count(batch)
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert abs(ours.item() - hf.item()) < 1e-5
    assert objective.count(batch) == int(batch["attention_mask"][:, 1:].sum())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_language_adapter(tmp_path, bases, corpus, family):
    """Chosen from the model (no --objective); the held-out loss goes down; only the adapter trains and the
    backbone never moves: a fresh model with the saved adapter reproduces the final held-out loss."""
    base = bases(family)
    run = tmp_path / "run"
    summary = train_language_adapter(model=base, lang="alpha", train_data=_text(corpus, "alpha"),
                                     eval_data=_text(corpus, "alpha", "validation"), output_dir=str(run),
                                     max_length=MAX_LENGTH, backend="eager",
                                     config=quiet_config(steps=12, learning_rate=1e-2, eval_every=4))
    assert (summary["objective"], summary["auto_class"], summary["mlm_probability"]) == (
        "causal", "AutoModelForCausalLM", None)
    evals = [e["eval"]["lm_loss"] for e in map(json.loads, open(run / "log.jsonl")) if "eval" in e]
    assert len(evals) == 3 and evals[-1] < evals[0], evals
    assert summary["final_eval"]["predicted_tokens"] > 0 and summary["final_eval"]["perplexity"] > 1
    assert summary["trainable_parameters"] == summary["adapter_parameters[alpha]"]
    weights = adapter_tensors(str(run / "adapter"))
    assert {k.split(".")[0] for k in weights} == {"layers", "invertible"}

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base)
    add_madx(model, backend="eager").load_adapter(str(run / "adapter"), set_active=True)
    tok = models.load_tokenizer(base)
    heldout = causal_lm.causal_data_from_texts(tok, open(_text(corpus, "alpha", "validation")).read().splitlines(),
                                               MAX_LENGTH)
    again = causal_lm.evaluate_causal(model, causal_lm.fixed_batches(heldout, 16, 512), "cpu")
    assert again["lm_loss"] == pytest.approx(summary["final_eval"]["lm_loss"], abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_steps_read_nothing_back(tmp_path, bases, corpus, micro_step_reads, family):
    """A causal-LM step (host-made shifted positions; no mask for an unpadded batch, the model's own causal mask
    for a padded one) queues its work without reading device data back, on transformers 4.x too."""
    _train_lang(bases(family), corpus, tmp_path / "run", steps=3, loop=dict(grad_accum=2, batch_size=4),
                eval_fraction=0, eval_data=None, max_texts=6)  # a few blocks, the last one padded
    assert micro_step_reads and all(not reads for reads in micro_step_reads), micro_step_reads


def test_causal_run_resumes_exactly(tmp_path, bases, corpus):
    """Stopped after its step-4 checkpoint and resumed: the same losses and adapter as straight through."""
    base = bases("llama")
    kwargs = dict(loop=dict(save_every=4, eval_every=4), steps=8)
    _train_lang(base, corpus, tmp_path / "straight", **kwargs)
    with stop_after_checkpoint(4), pytest.raises(StoppedAfterCheckpoint):
        _train_lang(base, corpus, tmp_path / "part", **kwargs)
    summary = _train_lang(base, corpus, tmp_path / "part", resume=True, **kwargs)
    assert summary["objective"] == "causal"
    assert step_losses(str(tmp_path / "part")) == step_losses(str(tmp_path / "straight"))
    a, b = adapter_tensors(str(tmp_path / "part" / "adapter")), adapter_tensors(str(tmp_path / "straight" / "adapter"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_objective_choice_and_refusals(tmp_path, bases, corpus, tiny_base):
    # the model's own objective, or the one asked for where transformers has the class
    assert models.language_model_class(bases("gpt2")) == ("causal", "AutoModelForCausalLM", {})
    assert models.language_model_class(bases("distilbert")) == ("masked", "AutoModelForMaskedLM", {})
    # an encoder trained causally attends to earlier positions only
    assert models.language_model_class(tiny_base, "causal") == ("causal", "AutoModelForCausalLM",
                                                                {"is_decoder": True})
    out = tmp_path / "refused"
    with pytest.raises(ValueError, match=r"no gpt2 model for AutoModelForMaskedLM.*--objective causal"):
        _train_lang(bases("gpt2"), corpus, out, objective="masked")
    with pytest.raises(ValueError, match=r"no distilbert model for AutoModelForCausalLM.*--objective masked"):
        _train_lang(bases("distilbert"), corpus, out, objective="causal")
    with pytest.raises(ValueError, match="objective 'seq2seq': choose one of masked, causal"):
        _train_lang(bases("gpt2"), corpus, out, objective="seq2seq")
    assert not out.exists()


# --------------------------------------------------------------------------------------------------------
# stage 2 and 3 on every family
# --------------------------------------------------------------------------------------------------------
HEADS = {"deberta-v2": "DebertaV2ForTokenClassification", "distilbert": "DistilBertForTokenClassification",
         "gpt2": "GPT2ForTokenClassification", "mistral": "MistralForTokenClassification",
         "xlm-roberta-xl": "XLMRobertaXLForTokenClassification"}  # Llama: below, on its language adapter


@pytest.mark.parametrize("family", sorted(HEADS))
def test_ner_task_adapter(tmp_path, bases, corpus, family):
    """MAD-X -LAD: the task adapter and the head train, nothing else; the head is the family's own class."""
    run = tmp_path / "ner"
    summary = train_task_adapter(task="ner", model=bases(family), lang="alpha",
                                 train_data=os.path.join(corpus, "alpha", "ner"), output_dir=str(run),
                                 config=quiet_config(steps=3), max_length=MAX_LENGTH, backend="eager")
    assert summary["trainable_parameters"] == summary["adapter_parameters[ner]"] + summary["head_parameters"]
    assert 0 <= summary["final_eval"]["f1"] <= 1
    assert _head_class(run / "best") == HEADS[family]


@pytest.fixture(scope="module")
def llama_ner(tmp_path_factory, llama_langs, corpus):
    run = tmp_path_factory.mktemp("llama_ner") / "ner"
    summary = train_task_adapter(task="ner", lang_adapter=llama_langs["alpha"][1],
                                 train_data=os.path.join(corpus, "alpha", "ner"), output_dir=str(run),
                                 config=quiet_config(steps=4), max_length=MAX_LENGTH, backend="eager")
    return summary, str(run)


def test_llama_ner_on_a_causal_language_adapter(llama_ner, llama_langs):
    summary, run = llama_ner
    assert summary["language"] == "alpha" and summary["language_adapter"]["invertible"]
    assert summary["base_model"] == llama_langs["alpha"][0]["base_model"]
    assert summary["trainable_parameters"] == summary["adapter_parameters[ner]"] + summary["head_parameters"]
    assert _head_class(os.path.join(run, "best")) == "LlamaForTokenClassification"


def test_llama_transfer(llama_ner, llama_langs, corpus):
    _, run = llama_ner
    result = evaluate_transfer(task_adapters=[run], lang_adapters={k: v[1] for k, v in llama_langs.items()},
                               targets=["alpha", "beta"], eval_data=os.path.join(corpus, "{lang}", "ner"),
                               settings=["target", "none"], backend="eager", max_examples=8)
    by = {(r["target"], r["setting"]): r for r in result["records"]}
    assert set(by) == {(t, s) for t in ("alpha", "beta") for s in ("target", "none")}
    assert by[("beta", "target")]["language_adapter"] == "beta" and by[("beta", "none")]["language_adapter"] is None
    assert all(0 <= r["value"] <= 100 for r in by.values())


def test_llama_mixed_language_predict_equals_each_line_alone(llama_ner, llama_langs, corpus):
    """Lines of both languages in shared, right-padded batches (``Stack(PerRow(alpha, beta), ner)`` on a causal
    model) get what each gets alone, unpadded, with ``Stack(its language, ner)``."""
    from transformers import AutoModelForTokenClassification

    _, run = llama_ner
    langs = {k: v[1] for k, v in llama_langs.items()}
    sentences = [json.loads(line)["tokens"] for line in open(os.path.join(corpus, "alpha", "ner", "test.jsonl"))][:6]
    lines = [{"lang": ("alpha", "beta")[i % 2], "tokens": words} for i, words in enumerate(sentences)]
    out = list(predict_stream(lines, task_adapter=run, lang_adapters=langs, batch_size=4, device="cpu",
                              backend="eager", progress=False))
    assert len({len(words) for words in sentences}) > 1, "rows of different lengths share a batch"

    base = llama_langs["alpha"][0]["base_model"]
    model = AutoModelForTokenClassification.from_pretrained(base, num_labels=7).eval()
    madx = add_madx(model, backend="eager")
    for lang, path in langs.items():
        madx.load_adapter(os.path.join(path, "adapter"), load_as=lang)
    task = madx.load_adapter(os.path.join(run, "best"), with_head=True)
    labels = read_adapter_info(os.path.join(run, "best")).head.labels
    tok = models.load_tokenizer(base)

    def alone(lang, words):
        madx.set_active(Stack(lang, task))
        enc = tok(words, is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            best = model(input_ids=enc["input_ids"]).logits[0].argmax(-1)
        first = {w: pos for pos, w in reversed(list(enumerate(enc.word_ids()))) if w is not None}
        return [labels[int(best[first[w]])] for w in range(len(words))]

    for line, got in zip(lines, out):
        assert got["tags"] == alone(line["lang"], line["tokens"])
    # the test can fail: some line's tags depend on its language
    assert any(alone(lang, line["tokens"]) != got["tags"] for line, got in zip(lines, out) for lang in langs
               if lang != line["lang"])


def test_llama_qa(tmp_path, bases, corpus):
    from tests.training.test_pipeline import _squad
    data = str(tmp_path / "squad.json")
    _squad(data, n=6)
    summary = train_task_adapter(task="qa", model=bases("llama"), lang="alpha", train_data=data,
                                 validation_data=data, output_dir=str(tmp_path / "qa"),
                                 config=quiet_config(steps=2, batch_size=4), max_length=MAX_LENGTH, backend="eager")
    assert {"f1", "exact_match"} <= set(summary["final_eval"])
    assert _head_class(tmp_path / "qa" / "best") == "LlamaForQuestionAnswering"


def _copa(path, n=1):
    path.write_text("".join(json.dumps({"premise": "Ana Kovac travelled to Marlow .", "choice1": "The river is quiet .",
                                        "choice2": "Ana met Boris .", "question": ("cause", "effect")[i % 2],
                                        "label": i % 2}) + "\n" for i in range(n)))
    return str(path)


def test_copa_on_distilbert(tmp_path, bases):
    """A multiple-choice head without a pooler in the base model (pre_classifier + classifier)."""
    data = _copa(tmp_path / "copa.jsonl", 4)
    summary = train_task_adapter(task="copa", model=bases("distilbert"), lang="alpha", train_data=data,
                                 validation_data=data, output_dir=str(tmp_path / "copa"),
                                 config=quiet_config(steps=2, batch_size=2), max_length=MAX_LENGTH, backend="eager")
    assert 0 <= summary["final_eval"]["accuracy"] <= 1
    assert _head_class(tmp_path / "copa" / "best") == "DistilBertForMultipleChoice"
    assert summary["trainable_parameters"] == summary["adapter_parameters[copa]"] + summary["head_parameters"]


def test_copa_refused_on_a_decoder_before_any_work(tmp_path, bases):
    path = _copa(tmp_path / "copa.jsonl")
    with pytest.raises(ValueError, match=r"no llama model for AutoModelForMultipleChoice.*the copa task cannot run"):
        train_task_adapter(task="copa", model=bases("llama"), lang="alpha", train_data=path,
                           output_dir=str(tmp_path / "copa"), config=quiet_config(steps=1), backend="eager")
    assert not (tmp_path / "copa").exists()


# --------------------------------------------------------------------------------------------------------
# the command line on a decoder
# --------------------------------------------------------------------------------------------------------
def test_cli_on_gpt2(tmp_path, bases, corpus):
    """train-lang (causal, asked for by flag) -> train-task --task ner on it -> predict, as a user runs them."""
    base, common = bases("gpt2"), ["--backend", "eager", "--device", "cpu", "--no-progress", "--max-length", MAX_LENGTH]
    lang, ner = tmp_path / "lang", tmp_path / "ner"
    run_madx("train-lang", "--model", base, "--lang", "alpha", "--train-data", _text(corpus, "alpha"),
             "--output", lang, "--objective", "causal", "--steps", 3, "--batch-size", 4, *common)
    assert json.load(open(lang / "run.json"))["objective"] == "causal"
    run_madx("train-task", "--task", "ner", "--lang-adapter", lang, "--train-data",
             os.path.join(corpus, "alpha", "ner"), "--output", ner, "--steps", 2, "--batch-size", 4, *common)
    lines = tmp_path / "in.jsonl"
    lines.write_text("".join(json.dumps({"lang": "alpha", "text": text}) + "\n" for text in ("Boris met Greta .",
                                                                                          "Jonas saka do")))
    out = tmp_path / "out.jsonl"
    run_madx("predict", "--task-adapter", ner, "--lang-adapter", f"alpha={lang}", "--input", lines, "--output", out,
             "--backend", "eager", "--device", "cpu", "--no-progress")
    records = [json.loads(line) for line in open(out)]
    assert [r["words"] for r in records] == [["Boris", "met", "Greta", "."], ["Jonas", "saka", "do"]]
    assert all(len(r["tags"]) == len(r["words"]) for r in records)


def test_causal_objective_on_an_encoder(tmp_path, tiny_base, corpus):
    """``--objective causal`` on XLM-R: loaded as a decoder (each position sees the ones before it only); the
    objective's loss is HF's causal loss of that model, padded batches included."""
    from transformers import AutoModelForCausalLM

    from madx_fast.training.batches import model_batch

    summary = _train_lang(tiny_base, corpus, tmp_path / "run", objective="causal", steps=2)
    assert (summary["objective"], summary["auto_class"]) == ("causal", "AutoModelForCausalLM")
    model = AutoModelForCausalLM.from_pretrained(tiny_base, is_decoder=True).eval()
    tok = models.load_tokenizer(tiny_base)
    blocks = causal_lm.causal_data_from_texts(tok, open(_text(corpus, "alpha")).read().splitlines()[:40], 16)
    objective = causal_lm.CausalLmObjective(blocks)
    batch = objective.make_batch([0, len(blocks) - 1])
    assert not batch["attention_mask"].all()
    with torch.no_grad():
        ours = objective.loss_sum(model, model_batch(model, objective.prepare(batch), "cpu")) / objective.count(batch)
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert abs(ours.item() - hf.item()) < 1e-5


def test_full_model_language_training_of_a_decoder_is_causal(tmp_path, bases, corpus):
    """MLM-SRC / MLM-TRG for a decoder (`train-lang --full-model`): the whole model trains by causal LM, as its
    language adapter would, and the run records that objective."""
    from transformers import AutoModelForCausalLM

    from madx_fast.training import train_language

    base, out = bases("gpt2"), str(tmp_path / "full")
    summary = train_language(model=base, lang="alpha", full_model=True, train_data=_text(corpus, "alpha"),
                             eval_data=_text(corpus, "alpha", "validation"), output_dir=out,
                             max_length=MAX_LENGTH, config=quiet_config(steps=6, learning_rate=2e-3, log_every=1))
    losses = step_losses(out)
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2])
    assert summary["stage"] == "full-mlm" and summary["objective"] == "causal"
    assert summary["mlm_probability"] is None
    before = AutoModelForCausalLM.from_pretrained(base).state_dict()
    after = AutoModelForCausalLM.from_pretrained(os.path.join(out, "model")).state_dict()
    moved = [k for k in before if k.startswith("transformer.h.") and not torch.equal(before[k], after[k])]
    assert moved, "no decoder block weight moved"
