"""Many languages in one batch: ``Stack(PerRow(...), task)`` with each row's language given per batch.

Every row equals that row run alone with ``Stack(its language, task)`` (padding, any row order, repeated and
absent languages), a one-language PerRow is today's path bit for bit, the masked-LM head inverts each row's
NICE, mixed-language training gives each adapter the gradient of its own rows, torch.compile keeps one graph
for every mix, and bad setups or row languages are refused with the reason."""
from __future__ import annotations

import re

import pytest
import torch
from transformers import BertForMaskedLM, XLMRobertaForMaskedLM, XLMRobertaForTokenClassification

from madx_fast.model import MadxConfig, PerRow, Stack, add_madx
from madx_fast.model.inputs import mlm_positions
from tests.helpers.models import max_diff, mlm_labels, padded_batch, randomize, tiny_config

LANGS = ("en", "sw", "qu", "yo")


def _model(cls=XLMRobertaForTokenClassification, family="xlm-roberta", backend="triton", langs=LANGS, **kw):
    torch.manual_seed(0)
    model = cls(tiny_config(family, attn="sdpa", num_labels=3, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, **kw)).eval()
    madx = add_madx(model, backend=backend)
    for lang in langs:
        madx.add_adapter(lang, MadxConfig.language())
    madx.add_adapter("ner", MadxConfig.task())
    randomize(model)
    return model, madx


def _batch(model, rows=5, length=9, seed=0):
    ids, mask = padded_batch(model.config, batch=rows, length=length, seed=seed)
    mask[4 % rows, 5:] = 0  # another padded row
    ids[mask == 0] = model.config.pad_token_id
    return ids, mask


def _alone(model, madx, ids, mask, langs, task="ner"):
    """Each row run by itself with Stack(its language, task)."""
    previous = madx.active
    rows = []
    for b, lang in enumerate(langs):
        madx.set_active(Stack(lang, task) if task else lang)
        with torch.no_grad():
            rows.append(model(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits[0])
    madx.set_active(previous)
    return rows


def _assert_rows_equal(got, want, mask, tol=1e-5):
    for b, row in enumerate(want):
        keep = mask[b].bool()
        assert max_diff(got[b][keep], row[keep]) < tol, f"row {b}: {max_diff(got[b][keep], row[keep])}"


@pytest.mark.parametrize("cls,family,backend", [(XLMRobertaForTokenClassification, "xlm-roberta", "triton"),
                                                (BertForMaskedLM, "bert", "triton"),
                                                (XLMRobertaForMaskedLM, "xlm-roberta", "eager")])
def test_every_row_equals_its_language_alone(cls, family, backend):
    model, madx = _model(cls, family, backend)
    ids, mask = _batch(model)
    langs = ["sw", "en", "sw", "yo", "sw"]  # unsorted, "sw" repeated, "qu" absent
    madx.set_active(Stack(PerRow(*LANGS), "ner"))
    with torch.no_grad(), madx.row_languages(langs):
        got = model(input_ids=ids, attention_mask=mask).logits
    assert madx.state.row_groups is None  # the context restores
    _assert_rows_equal(got, _alone(model, madx, ids, mask, langs), mask)
    # the same rows in another order give the same rows
    perm = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad(), madx.row_languages([langs[i] for i in perm]):
        again = model(input_ids=ids[perm], attention_mask=mask[perm]).logits
    _assert_rows_equal(again, [got[i] for i in perm], mask[perm])


def test_language_ids_as_tensors_and_a_lone_per_row():
    """Ids (positions in the PerRow) as a list or tensor; PerRow without a task adapter (stage-1 style)."""
    model, madx = _model(XLMRobertaForMaskedLM)
    ids, mask = _batch(model, rows=3)
    madx.set_active(PerRow("qu", "en"))
    madx.set_row_languages(torch.tensor([1, 0, 1]))
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    madx.set_row_languages(None)
    _assert_rows_equal(got, _alone(model, madx, ids, mask, ["en", "qu", "en"], task=None), mask)


def test_one_language_is_todays_path_and_one_mix_is_close_to_it():
    model, madx = _model(XLMRobertaForMaskedLM)
    ids, mask = _batch(model)
    madx.set_active(Stack("sw", "ner"))
    with torch.no_grad():
        today = model(input_ids=ids, attention_mask=mask).logits
    madx.set_active(Stack(PerRow("sw"), "ner"))
    with torch.no_grad():  # no row languages needed: every row is "sw"
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, today)
    madx.set_active(Stack(PerRow(*LANGS), "ner"))
    with torch.no_grad(), madx.row_languages(["sw"] * 5):
        assert max_diff(model(input_ids=ids, attention_mask=mask).logits, today) < 1e-5


def _mlm_inputs(model):
    ids, mask = _batch(model, rows=4)
    return ids, mask, mlm_labels(ids, mask, seed=1)


def test_mixed_language_mlm_training_gives_each_language_its_rows_gradients():
    """Stage 1 for several languages in one batch: the summed MLM loss and every language adapter's gradient
    equal those of the rows of that language run alone; the positions path (host-made, no sync) too."""
    model, madx = _model(XLMRobertaForMaskedLM, langs=("en", "sw", "qu"))
    ids, mask, labels = _mlm_inputs(model)
    langs = ["qu", "en", "qu", "sw"]
    setup = PerRow("en", "sw", "qu")
    madx.train_adapters(setup)
    madx.set_active(setup)
    with madx.row_languages(langs):
        loss = madx.mlm_loss(ids, mask, labels, reduction="sum")
        loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    with madx.row_languages(langs):
        positions, targets = mlm_positions(labels)
        loss_pos = madx.mlm_loss(ids, mask, positions=positions, targets=targets, reduction="sum")
    assert abs(loss_pos.item() - loss.item()) < 1e-4
    model.zero_grad()
    total = 0.0
    for b, lang in enumerate(langs):
        madx.set_active(lang)
        part = madx.mlm_loss(ids[b:b + 1], mask[b:b + 1], labels[b:b + 1], reduction="sum")
        part.backward()
        total += part.item()
    assert abs(total - loss.item()) < 1e-4 * max(1.0, abs(total))
    assert {re.search(r"adapters\.(\w+)\.", n).group(1) for n in got} == {"en", "sw", "qu"}
    for n, p in model.named_parameters():
        if n in got:
            assert max_diff(got[n], p.grad) < 1e-4, n


def test_task_training_on_mixed_languages_and_frozen_language_adapters():
    """Stack(PerRow(...), "ner") training "ner": the task adapter and head get the gradient of the whole mixed
    batch (equal to the sum over per-language sub-batches); the language adapters stay without gradients."""
    model, madx = _model()
    ids, mask = _batch(model, rows=4)
    tags = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(2))
    tags[mask == 0] = -100
    langs = ["yo", "en", "en", "sw"]
    madx.set_active(Stack(PerRow(*LANGS), "ner"))
    madx.train_adapters("ner")
    model.train()
    with madx.row_languages(langs):
        logits = model(input_ids=ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 3), tags.reshape(-1), reduction="sum")
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(".adapters.ner." in n for n in got) and "classifier.weight" in got
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    model.zero_grad()
    for lang in set(langs):
        rows = [b for b, x in enumerate(langs) if x == lang]
        madx.set_active(Stack(lang, "ner"))
        out = model(input_ids=ids[rows], attention_mask=mask[rows]).logits
        torch.nn.functional.cross_entropy(out.reshape(-1, 3), tags[rows].reshape(-1), reduction="sum").backward()
    for n, p in model.named_parameters():
        if n in got:
            assert max_diff(got[n], p.grad) < 1e-4, n


def test_compiles_fullgraph_once_for_every_language_mix():
    """(Eager adapter ops here, for time: tests/ops/test_grouped.py compiles the fused custom ops.)"""
    from torch._dynamo.testing import CompileCounterWithBackend

    model, madx = _model(XLMRobertaForMaskedLM, backend="eager")
    ids, mask = _batch(model, rows=4)
    madx.set_active(Stack(PerRow(*LANGS), "ner"))
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    try:
        for langs in (["en", "sw", "qu", "yo"], ["yo", "yo", "yo", "yo"], ["sw", "en", "en", "sw"]):
            with torch.no_grad(), madx.row_languages(langs):
                got = compiled(input_ids=ids, attention_mask=mask).logits
                want = model(input_ids=ids, attention_mask=mask).logits
            assert max_diff(got, want) < 1e-5
        assert counter.frame_count == 1
    finally:
        torch._dynamo.reset()


def test_bad_setups_and_row_languages_are_refused():
    model, madx = _model(langs=("en", "sw"))
    madx.add_adapter("small", MadxConfig.language(reduction_factor=4))
    madx.add_adapter("plain", MadxConfig.task(reduction_factor=2))  # no invertible adapter
    madx.add_adapter("late", MadxConfig.language(leave_out=[1]))
    ids, mask = _batch(model, rows=3)
    with pytest.raises(ValueError, match=r"layer 0: 'small' has bottleneck size 8 but 'en' has 16"):
        madx.set_active(Stack(PerRow("en", "small"), "ner"))
    with pytest.raises(ValueError, match=r"'late' has adapters in layers \[0\] but 'en' in \[0, 1\]"):
        madx.set_active(PerRow("en", "late"))
    with pytest.raises(ValueError, match="'plain' has no invertible adapter"):
        madx.set_active(PerRow("en", "plain"))
    with pytest.raises(KeyError, match="no adapter named 'fr'"):
        madx.set_active(Stack(PerRow("en", "fr"), "ner"))
    with pytest.raises(ValueError, match="names an adapter twice"):
        madx.set_active(Stack(PerRow("en", "sw"), "en"))
    with pytest.raises(ValueError, match="more than one PerRow"):
        madx.set_active(Stack(PerRow("en"), PerRow("sw")))
    with pytest.raises(ValueError, match="row languages need a PerRow in the active setup"):
        madx.set_row_languages(["en"])
    assert madx.active is None
    madx.set_active(Stack(PerRow("en", "sw"), "ner"))
    assert madx.active == Stack(PerRow("en", "sw"), "ner")
    with pytest.raises(ValueError, match="say each row's language"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(KeyError, match="'fr' is not one of the per-row adapters PerRow"):
        madx.set_row_languages(["en", "fr", "sw"])
    with pytest.raises(ValueError, match=r"row 1: language 2 is neither one of PerRow\('en', 'sw'\)"):
        madx.set_row_languages([0, 2, 1])
    with pytest.raises(ValueError, match="given for 2 rows, but the batch has 3 rows"):
        with madx.row_languages(["en", "sw"]):
            model(input_ids=ids, attention_mask=mask)
    madx.train_adapters(Stack(PerRow("en", "sw"), "ner"))  # every named adapter trains
    assert all(p.requires_grad for n in ("en", "sw", "ner") for p in madx.adapter_parameters(n))
    madx.delete_adapter("sw")  # the PerRow goes with it (its row ids would point elsewhere)
    assert madx.active == "ner"
