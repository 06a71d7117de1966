"""GraphedInference: the same outputs as a plain eval forward across shapes, masks, adapter swaps and weight
changes; its cache keys (shape, padding, active setup, parameter storages) on the CPU, the captured graphs
on a GPU."""
from __future__ import annotations

import pytest
import torch
from transformers import XLMRobertaConfig, XLMRobertaForTokenClassification

from madx_fast.graphs import GraphedInference
from madx_fast.model import MadxConfig, Stack, add_madx
from madx_fast.model.inputs import TRANSFORMERS_MAJOR

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model(device, backend="eager"):
    torch.manual_seed(0)
    cfg = XLMRobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1,
                           num_labels=5, attn_implementation="sdpa")
    model = XLMRobertaForTokenClassification(cfg)
    madx = add_madx(model, backend=backend)
    for name in ("en", "sw"):
        madx.add_adapter(name, MadxConfig.language())
    madx.add_adapter("ner", MadxConfig.task())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adapters." in n:
                p.normal_(0, 0.3)
    madx.set_active(Stack("en", "ner"))
    return model.to(device).eval(), madx


def _batch(b, length, pad_rows=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 120, (b, length), generator=g)
    mask = torch.ones_like(ids)
    for r in pad_rows:
        mask[r, length // 2:] = 0
        ids[r, length // 2:] = 1
    return ids, mask


def _plain(model, ids, mask):
    with torch.no_grad():
        dev = next(model.parameters()).device
        return model(input_ids=ids.to(dev), attention_mask=None if mask is None else mask.to(dev)).logits


@pytest.mark.parametrize("device", DEVICES)
def test_same_outputs_as_the_plain_forward(device):
    model, madx = _model(device, backend=None)
    run = GraphedInference(model)
    cases = [_batch(4, 16), _batch(4, 16, pad_rows=(1, 3), seed=1), _batch(4, 16, seed=2), _batch(3, 9, (0,), 3)]
    for ids, mask in cases + cases[::-1]:  # each shape again after others: buffers refreshed on every call
        ref = _plain(model, ids, mask)
        got = run(ids, mask)
        rows = mask.bool().to(ref.device)
        torch.testing.assert_close(got[rows], ref[rows], rtol=1e-4, atol=1e-4)
    ids, _ = _batch(4, 16, seed=5)
    torch.testing.assert_close(run(ids), _plain(model, ids, None), rtol=1e-4, atol=1e-4)
    # a device mask is taken as is (never read back)
    ids, mask = _batch(4, 16, pad_rows=(2,), seed=6)
    got = run(ids.to(device), mask.to(device))
    rows = mask.bool().to(device)
    torch.testing.assert_close(got[rows], _plain(model, ids, mask)[rows], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_adapter_swaps_and_new_weights_are_never_replayed_stale(device):
    model, madx = _model(device)
    run = GraphedInference(model, max_graphs=2)
    ids, mask = _batch(4, 16)
    first = run(ids, mask)
    madx.set_active(Stack("sw", "ner"))
    swapped = run(ids, mask)
    torch.testing.assert_close(swapped, _plain(model, ids, mask))
    assert (swapped - first).abs().max() > 1e-3  # the swap changed the function
    with torch.no_grad():  # weights updated in place are seen by the same entry
        madx.layer_adapters("sw")[0].adapter_down[0].weight.mul_(2)
    torch.testing.assert_close(run(ids, mask), _plain(model, ids, mask))
    madx.delete_adapter("en")  # new storages for the cache key after a reload
    madx.add_adapter("en", MadxConfig.language())
    madx.set_active(Stack("en", "ner"))
    torch.testing.assert_close(run(ids, mask), _plain(model, ids, mask))
    assert len(run._entries) <= 2  # least recently used entries dropped
    out = run(ids, mask)
    out.add_(1)  # the result is the caller's copy
    torch.testing.assert_close(run(ids, mask), _plain(model, ids, mask))


def test_errors():
    model, _ = _model("cpu")
    run = GraphedInference(model)
    ids, mask = _batch(2, 8)
    with pytest.raises(ValueError, match="input_ids must be"):
        run(ids[0])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        run(ids, mask[:, :4])
    model.train()
    with pytest.raises(ValueError, match="eval"):
        run(ids, mask)
    with pytest.raises(ValueError, match="max_graphs"):
        GraphedInference(model, max_graphs=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphs_are_captured_once_per_shape_on_the_gpu():
    model, madx = _model("cuda", backend=None)
    madx.cast_backbone(torch.bfloat16)
    run = GraphedInference(model)
    for seed in range(3):
        ids, mask = _batch(8, 32, seed=seed)
        torch.testing.assert_close(run(ids, mask), _plain(model, ids, mask), rtol=2e-2, atol=2e-2)
    assert run.captures == 1
    ids, mask = _batch(8, 32, pad_rows=(1,))
    torch.testing.assert_close(run(ids, mask)[mask.bool().cuda()], _plain(model, ids, mask)[mask.bool().cuda()],
                               rtol=2e-2, atol=2e-2)
    # a padded batch needs its own graph on transformers 5 (no mask vs a 4D one); 4.x always uses the mask
    assert run.captures == (2 if TRANSFORMERS_MAJOR >= 5 else 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_captured_under_autocast_stays_valid():
    """A capture inside autocast must not point at autocast's cached weight casts (freed when it exits)."""
    model, _ = _model("cuda", backend=None)
    run = GraphedInference(model)
    ids, mask = _batch(8, 32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        first = run(ids, mask)
    torch.cuda.empty_cache()
    junk = [torch.randn(1 << 20, device="cuda") for _ in range(8)]  # reuse freed memory
    with torch.autocast("cuda", dtype=torch.bfloat16):
        again = run(ids, mask)
    del junk
    torch.testing.assert_close(again, first)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(again.float(), _plain(model, ids, mask).float(), rtol=3e-2, atol=3e-2)
