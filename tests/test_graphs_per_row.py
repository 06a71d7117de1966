"""GraphedInference with a per-row language setup: the row -> language ids are an input buffer of the graph, so
one graph per shape serves every mix of languages (bookkeeping on the CPU, captured graphs on a GPU)."""
from __future__ import annotations

import pytest
import torch
from transformers import XLMRobertaConfig, XLMRobertaForTokenClassification

from madx_fast.graphs import GraphedInference
from madx_fast.model import MadxConfig, PerRow, Stack, add_madx

LANGS = ("en", "sw", "qu")


def _model(device, backend=None):
    torch.manual_seed(0)
    cfg = XLMRobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1,
                           num_labels=5, attn_implementation="sdpa")
    model = XLMRobertaForTokenClassification(cfg)
    madx = add_madx(model, backend=backend)
    for name in LANGS:
        madx.add_adapter(name, MadxConfig.language())
    madx.add_adapter("ner", MadxConfig.task())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adapters." in n:
                p.normal_(0, 0.3)
    madx.set_active(Stack(PerRow(*LANGS), "ner"))
    return model.to(device).eval(), madx


def _batch(b, length, seed=0, pad_row=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 120, (b, length), generator=g)
    mask = torch.ones_like(ids)
    if pad_row is not None:
        mask[pad_row, length // 2:] = 0
        ids[pad_row, length // 2:] = 1
    return ids, mask


def _plain(model, madx, ids, mask, langs):
    dev = next(model.parameters()).device
    with torch.no_grad(), madx.row_languages(langs):
        return model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits


def test_one_entry_per_shape_for_every_language_mix():
    model, madx = _model("cpu", backend="eager")
    run = GraphedInference(model)
    ids, mask = _batch(4, 12, pad_row=2)
    mixes = [["en", "sw", "qu", "en"], ["qu", "qu", "qu", "qu"], [1, 0, 0, 2], torch.tensor([2, 1, 0, 1])]
    outs = []
    for langs in mixes:
        got = run(ids, mask, languages=langs)
        rows = mask.bool()
        torch.testing.assert_close(got[rows], _plain(model, madx, ids, mask, langs)[rows], rtol=1e-5, atol=1e-5)
        outs.append(got)
    assert len(run._entries) == 1  # the mix is data in the entry's buffer, not part of its key
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # the languages changed the function
    with madx.row_languages(["sw", "sw", "en", "qu"]):  # the ids set on the model are used by default
        torch.testing.assert_close(run(ids, mask), _plain(model, madx, ids, mask, ["sw", "sw", "en", "qu"]))


def test_per_row_errors():
    model, madx = _model("cpu", backend="eager")
    run = GraphedInference(model)
    ids, mask = _batch(3, 8)
    with pytest.raises(ValueError, match="pass languages="):
        run(ids, mask)
    with pytest.raises(ValueError, match="languages has 2 entries, but the batch has 3 rows"):
        run(ids, mask, languages=["en", "sw"])
    with pytest.raises(KeyError, match="'fr' is not one of the per-row adapters"):
        run(ids, mask, languages=["en", "fr", "sw"])
    madx.set_active(Stack("en", "ner"))
    with pytest.raises(ValueError, match="has no PerRow"):
        run(ids, mask, languages=["en", "sw", "qu"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_graph_per_shape_for_every_language_mix_on_the_gpu():
    model, madx = _model("cuda")
    madx.cast_backbone(torch.bfloat16)
    run = GraphedInference(model)
    ids, mask = _batch(8, 32)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        langs = torch.randint(0, len(LANGS), (8,), generator=g)
        torch.testing.assert_close(run(ids, mask, languages=langs), _plain(model, madx, ids, mask, langs),
                                   rtol=2e-2, atol=2e-2)
    langs = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1], device="cuda")  # device ids: copied in, never read back
    torch.testing.assert_close(run(ids, mask, languages=langs), _plain(model, madx, ids, mask, langs.cpu()),
                               rtol=2e-2, atol=2e-2)
    assert run.captures == 1
