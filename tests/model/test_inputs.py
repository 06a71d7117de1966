"""Host-prepared inputs: masked positions for the MLM decoder and the attention mask in the form HF does not
test, both giving the same function as the plain inputs, and a forward + backward that reads nothing back
from the device (checked on the CPU with madx_fast.testing.sync_check.HostReads)."""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers import (
    AutoModelForTokenClassification,
    BertForMaskedLM,
    BertForTokenClassification,
    XLMRobertaForMaskedLM,
    XLMRobertaForTokenClassification,
)

from madx_fast.model import MadxConfig, Stack, add_madx, madx_mlm_loss
from madx_fast.model.inputs import encoder_attention_mask, mlm_positions
from madx_fast.model.wiring import SUPPORTED_MODEL_TYPES
from madx_fast.testing.sync_check import HostReads
from tests.helpers.models import max_diff, mlm_labels, padded_batch, randomize, tiny_config

HF5 = int(transformers.__version__.split(".")[0]) >= 5
FAMILIES = [("xlm-roberta", XLMRobertaForMaskedLM, XLMRobertaForTokenClassification),
            ("bert", BertForMaskedLM, BertForTokenClassification)]


def test_mlm_positions_lists_the_labelled_tokens_padded_to_a_multiple():
    labels = torch.full((3, 5), -100)
    labels[0, 1], labels[1, 4], labels[2, 0] = 7, 8, 9
    pos, tgt = mlm_positions(labels, multiple=4)
    assert pos.tolist() == [1, 9, 10, 0] and tgt.tolist() == [7, 8, 9, -100]
    pos, tgt = mlm_positions(torch.full((2, 3), -100), multiple=8)
    assert pos.shape == (8,) and (tgt == -100).all()
    with pytest.raises(ValueError, match="labels must be"):
        mlm_positions(labels.flatten())
    with pytest.raises(ValueError, match="multiple"):
        mlm_positions(labels, multiple=0)


def _mlm(cls, family, attn="sdpa"):
    torch.manual_seed(0)
    model = cls(tiny_config(family, attn=attn, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    madx = add_madx(model, backend="eager")
    madx.add_adapter("en", MadxConfig.language(), set_active=True)
    madx.train_adapters("en")
    randomize(model)
    return model.train(), madx


@pytest.mark.parametrize("family,cls", [(f, m) for f, m, _ in FAMILIES], ids=[f for f, _, _ in FAMILIES])
def test_positions_give_the_labels_loss_and_gradients(family, cls):
    model, _ = _mlm(cls, family)
    ids, mask = padded_batch(model.config)
    labels = mlm_labels(ids, mask)
    params = [p for p in model.parameters() if p.requires_grad]
    ref = madx_mlm_loss(model, ids, mask, labels)
    g_ref = torch.autograd.grad(ref, params)
    pos, tgt = mlm_positions(labels, multiple=16)
    got = madx_mlm_loss(model, ids, mask, positions=pos, targets=tgt)
    g_got = torch.autograd.grad(got, params)
    assert abs(ref.item() - got.item()) < 1e-6
    for a, b in zip(g_ref, g_got):
        assert max_diff(a, b) < 1e-6
    total = madx_mlm_loss(model, ids, mask, positions=pos, targets=tgt, reduction="sum")
    n = int((labels != -100).sum())
    assert abs(total.item() - ref.item() * n) < 1e-4 * n


def test_positions_argument_errors():
    model, _ = _mlm(XLMRobertaForMaskedLM, "xlm-roberta")
    ids, mask = padded_batch(model.config)
    pos, tgt = mlm_positions(mlm_labels(ids, mask))
    with pytest.raises(ValueError, match="together"):
        madx_mlm_loss(model, ids, mask, positions=pos)
    with pytest.raises(ValueError, match="needs labels"):
        madx_mlm_loss(model, ids, mask)
    with pytest.raises(ValueError, match="1-D of one length"):
        madx_mlm_loss(model, ids, mask, positions=pos, targets=tgt[:-1])
    with pytest.raises(ValueError, match="reduction"):
        madx_mlm_loss(model, ids, mask, positions=pos, targets=tgt, reduction="none")


def _ner(cls, family, attn, dtype=None):
    torch.manual_seed(0)
    model = cls.from_config(tiny_config(family, attn=attn, num_labels=5))
    madx = add_madx(model, backend="eager")
    madx.add_adapter("en", MadxConfig.language())
    madx.add_adapter("ner", MadxConfig.task())
    madx.set_active(Stack("en", "ner"))
    madx.train_adapters("ner")
    randomize(model)
    if dtype is not None:
        madx.cast_backbone(dtype)
    return model.eval()


# every attention kernel and dtype on the families of FAMILIES; one case of every other family add_madx wires
# (DeBERTa-v2 has only eager attention in HF)
MASK_CASES = [(f, a, d) for f, _, _ in FAMILIES for a in ("sdpa", "eager") for d in (None, torch.bfloat16)] + [
    (f, "eager" if f == "deberta-v2" else "sdpa", torch.bfloat16 if f == "llama" else None)
    for f in SUPPORTED_MODEL_TYPES if f not in {f for f, _, _ in FAMILIES}]


@pytest.mark.parametrize("family,attn,dtype", MASK_CASES,
                         ids=[f"{f}-{a}-{'bf16-backbone' if d else 'fp32'}" for f, a, d in MASK_CASES])
def test_encoder_attention_mask_computes_the_same_function(family, attn, dtype):
    """A causal model (GPT-2, Llama, Mistral) keeps its own causal mask, DeBERTa its mask on the embeddings."""
    model = _ner(AutoModelForTokenClassification, family, attn, dtype)
    ids, mask = padded_batch(model.config, batch=4, length=11)
    full = torch.ones_like(mask)
    with torch.no_grad():
        for m, padded in ((mask, True), (full, False)):
            ref = model(input_ids=ids, attention_mask=m).logits
            prepared = encoder_attention_mask(model, m, padded=padded)
            got = model(input_ids=ids, attention_mask=prepared).logits
            rows = m.bool()  # padding positions' outputs are not defined the same way by every form
            tol = 1e-5 if dtype is None else 2e-2
            assert max_diff(ref[rows], got[rows]) < tol, (padded, max_diff(ref[rows], got[rows]))
    if family != "deberta-v2" and (HF5 or family in CAUSAL):  # no mask: SDPA's flash or causal kernel
        assert encoder_attention_mask(model, full, padded=False) is None
    assert encoder_attention_mask(model, None, padded=False) is None


def _expected_reads(family: str, padded: bool) -> bool:
    """Where HF still tests the mask (a host read): transformers 4.x's DistilBERT always, and its encoders'
    unpadded batches (see madx_fast/model/inputs.py); DeBERTa tests nothing."""
    if HF5 or family == "deberta-v2" or family in CAUSAL:
        return False
    return family == "distilbert" or not padded


CAUSAL = ("gpt2", "llama", "mistral")


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("family", SUPPORTED_MODEL_TYPES)
def test_prepared_mask_forward_reads_nothing_back(family, padded):
    """The forward of every wired family with the prepared mask reads nothing back from the device (decoders'
    configs without a pad token, as their checkpoints have: HF looks for one in the ids when there is no mask)."""
    overrides = {"pad_token_id": None} if family in CAUSAL else {}
    model = AutoModelForTokenClassification.from_config(
        tiny_config(family, attn="eager" if family == "deberta-v2" else "sdpa", num_labels=3, **overrides)).eval()
    add_madx(model, backend="eager").add_adapter("en", MadxConfig.language(), set_active=True)
    ids, mask = padded_batch(tiny_config(family), batch=4, length=11)
    if not padded:
        mask = torch.ones_like(mask)
    with torch.no_grad(), HostReads() as reads:
        model(input_ids=ids, attention_mask=encoder_attention_mask(model, mask, padded=padded))
    assert bool(reads.reads) == _expected_reads(family, padded), reads.report()


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_mlm_step_reads_nothing_back(padded):
    """Forward + backward of the MLM loss with host-made positions and mask: no op that needs device data on
    the host. On transformers 4.x an unpadded batch keeps HF's own all-ones check (see model/inputs.py)."""
    model, _ = _mlm(XLMRobertaForMaskedLM, "xlm-roberta")
    ids, mask = padded_batch(model.config, batch=4, length=11)
    if not padded:
        mask = torch.ones_like(mask)
    labels = mlm_labels(ids, mask)
    pos, tgt = mlm_positions(labels)
    prepared = encoder_attention_mask(model, mask, padded=padded)
    with HostReads() as reads:
        madx_mlm_loss(model, ids, prepared, positions=pos, targets=tgt, reduction="sum").backward()
    if HF5 or padded:
        assert not reads.reads, reads.report()
    else:
        assert reads.reads and all("transformers" in r.where for r in reads.reads), reads.report()
    with HostReads() as reads:  # the detector is not vacuous: the labels path selects with a boolean mask
        madx_mlm_loss(model, ids, prepared, labels)
    assert any("madx_fast/model/mlm_loss.py" in r.where for r in reads.reads), reads.report()


def test_host_reads_can_refuse():
    x = torch.ones(3)
    with pytest.raises(RuntimeError, match="host read"):
        with HostReads(raise_on_read=True):
            bool(x.sum() > 0)
    with HostReads() as reads:
        (x * 2).sum()
    assert reads.report() == "no host reads"
