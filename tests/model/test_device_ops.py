"""What an adapter costs a forward in device ops (issue 21, item 4): an eval forward of a 12-layer XLM-R base
Stack(en, ner) model (en with NICE) with an fp16 backbone issues at most 4 device ops per adapter application
beyond the same model with no adapter active: the fused kernel, MAD-X's add + LayerNorm, and nothing else (no
per-call weight casts, no glue). Counted on meta tensors the way a GPU runs it (madx_fast.testing)."""
import collections
import contextlib

import pytest
import torch
from transformers import XLMRobertaConfig, XLMRobertaForTokenClassification

from madx_fast.model import MadxConfig, Stack, add_madx
from madx_fast.model.inputs import encoder_attention_mask
from madx_fast.testing.device_ops import DeviceOps
from madx_fast.testing.gpu_plan import graph_capture, planned_gpu

MAX_OPS_PER_APPLICATION = 4


def _xlmr_base_on_meta():
    cfg = XLMRobertaConfig(vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                           num_labels=7)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = XLMRobertaForTokenClassification(cfg)
        madx = add_madx(model)
        madx.add_adapter("en", MadxConfig.language(reduction_factor=2))  # d=384 and NICE: the paper's
        madx.add_adapter("ner", MadxConfig.task())
    madx.cast_backbone(torch.float16)
    return model.eval(), madx


def _forward_ops(model, madx, setup, captured):
    madx.set_active(setup)
    ids = torch.zeros(32, 128, dtype=torch.long, device="meta")
    mask = encoder_attention_mask(model, torch.ones(32, 128, dtype=torch.long, device="meta"), padded=False)
    capture = graph_capture() if captured else contextlib.nullcontext()
    with planned_gpu(), capture, DeviceOps(answer_meta_reads=True) as count, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    return count


@pytest.mark.parametrize("captured", [False, True], ids=["eager", "captured"])
def test_an_adapter_application_costs_at_most_four_device_ops(captured):
    """Replayed eagerly, this host-bound batch keeps MAD-X's add + LayerNorm as two ops and the FFN
    intermediate's Linear and GELU as two (the fused ops cost more host time than they save); captured in a
    CUDA graph each pair is one fused op."""
    model, madx = _xlmr_base_on_meta()
    plain = _forward_ops(model, madx, None, captured)
    stacked = _forward_ops(model, madx, Stack("en", "ner"), captured)
    fused = collections.Counter(r.name.split(".")[1] for r in stacked.records if r.kind == "fused")
    applications = sum(k for n, k in fused.items() if n not in ("add_layer_norm", "dense_activation"))
    assert applications == 2 * 12 + 1  # two bottleneck adapters per layer and the NICE coupling
    # MAD-X's LN(y + a) before each adapter and after the last, and each layer's FFN intermediate
    # (Linear + GELU): fused in the graph
    assert fused["add_layer_norm"] == (3 * 12 if captured else 0)
    assert fused["dense_activation"] == (12 if captured else 0)
    extra = stacked.totals()["kernels"] - plain.totals()["kernels"]
    added = collections.Counter(r.name for r in stacked.records if r.kernels)
    added.subtract(r.name for r in plain.records if r.kernels)
    listing = ", ".join(f"{n} x{k}" for n, k in added.most_common() if k)
    assert extra <= MAX_OPS_PER_APPLICATION * applications, (
        f"{extra / applications:.2f} device ops per adapter application (at most {MAX_OPS_PER_APPLICATION}): "
        f"{listing}")
    assert not any("_to_copy" in n or n.startswith("aten.to") for n, k in added.items() if k > 0), listing
