"""Tiny BERT / XLM-R configs, padded batches, randomised adapters, and AdapterHub when it is usable."""
from __future__ import annotations

import torch
from transformers import BertConfig, XLMRobertaConfig

H, LAYERS, VOCAB = 32, 2, 100


def tiny_config(family: str = "xlm-roberta", attn: str = "eager", **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=40, attn_implementation=attn)
    common.update(overrides)
    if family == "xlm-roberta":
        return XLMRobertaConfig(layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                type_vocab_size=1, **common)
    if family == "bert":
        return BertConfig(pad_token_id=0, type_vocab_size=2, **common)
    raise ValueError(family)


def padded_batch(config, batch: int = 3, length: int = 9, seed: int = 0):
    """input_ids and attention_mask with right padding in rows 1 and 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, config.vocab_size, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, length - 3:] = 0
    if batch > 2:
        mask[2, 3:] = 0
    ids[mask == 0] = config.pad_token_id
    return ids, mask


def mlm_labels(ids, mask, seed: int = 0, rate: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    pick = (torch.rand(ids.shape, generator=g) < rate) & (mask == 1)
    pick[0, 1] = True
    labels = torch.full_like(ids, -100)
    labels[pick] = ids[pick]
    return labels


@torch.no_grad()
def randomize(model, needle: str = "adapters.", std: float = 0.3, seed: int = 0):
    """Non-trivial values (biases too) for every parameter whose name contains ``needle``."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if needle in name:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def import_adapterhub(module_level: bool = False):
    """AdapterHub's ``adapters`` (the reference library), or a skip: it needs transformers 4.57.x and imports
    lazily, so a broken install only shows when a name is used."""
    import pytest
    try:
        import adapters
        from adapters.composition import Stack  # noqa: F401
        adapters.init, adapters.SeqBnConfig, adapters.XLMRobertaAdapterModel  # noqa: B018
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"AdapterHub `adapters` is not usable here ({type(exc).__name__}: {exc})",
                    allow_module_level=module_level)
    return adapters
