"""Tiny configs of every model family the tests build, padded batches, randomised adapters, and AdapterHub when it
is usable."""
from __future__ import annotations

import torch
import transformers

H, LAYERS, VOCAB = 32, 2, 100

# The tiny config of each family, by model type: hidden 32, 2 layers (each of encoder and decoder), 4 heads,
# FFN 64, vocabulary 100. The names are each config class's own; ``overrides`` use them too.
_TINY = {
    "xlm-roberta": ("XLMRobertaConfig", dict(layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                             type_vocab_size=1)),
    "roberta": ("RobertaConfig", dict(layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    "xlm-roberta-xl": ("XLMRobertaXLConfig", dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    "xmod": ("XmodConfig", dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, languages=["en_XX", "sw_KE"],
                                default_language="en_XX")),
    "bert": ("BertConfig", dict(pad_token_id=0, type_vocab_size=2)),
    "bert-generation": ("BertGenerationConfig", dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)),
    "electra": ("ElectraConfig", dict(pad_token_id=0, embedding_size=16)),
    "albert": ("AlbertConfig", dict(pad_token_id=0, embedding_size=16)),
    "deberta": ("DebertaConfig", dict(pad_token_id=0)),
    "deberta-v2": ("DebertaV2Config", dict(pad_token_id=0)),
}
_BERT_STYLE = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=40)
_SEQ2SEQ = dict(vocab_size=VOCAB, d_model=H, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=40,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
_T5 = dict(vocab_size=VOCAB, d_model=H, d_kv=8, d_ff=64, num_layers=LAYERS, num_decoder_layers=LAYERS, num_heads=4,
           pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
_LLAMA = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=40, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_GPT = dict(vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=4, n_positions=40, bos_token_id=1, eos_token_id=2)
_TINY.update({
    "distilbert": ("DistilBertConfig", dict(vocab_size=VOCAB, dim=H, n_layers=LAYERS, n_heads=4, hidden_dim=64,
                                            max_position_embeddings=40, pad_token_id=0)),
    "gpt2": ("GPT2Config", dict(_GPT, pad_token_id=0)),
    "gptj": ("GPTJConfig", dict(_GPT, rotary_dim=4, pad_token_id=0)),
    "llama": ("LlamaConfig", _LLAMA),
    "mistral": ("MistralConfig", _LLAMA),
    "qwen2": ("Qwen2Config", _LLAMA),
    "qwen3": ("Qwen3Config", dict(_LLAMA, head_dim=8)),
    "gemma2": ("Gemma2Config", dict(_LLAMA, head_dim=8)),
    "gemma3_text": ("Gemma3TextConfig", dict(_LLAMA, head_dim=8)),
    "phi": ("PhiConfig", _LLAMA),
    "modernbert": ("ModernBertConfig", dict(_BERT_STYLE, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                            cls_token_id=1, sep_token_id=2)),
    "bart": ("BartConfig", _SEQ2SEQ),
    "mbart": ("MBartConfig", _SEQ2SEQ),
    "plbart": ("PLBartConfig", _SEQ2SEQ),
    "t5": ("T5Config", _T5),
    "mt5": ("MT5Config", _T5),
    "vit": ("ViTConfig", dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
                              image_size=8, patch_size=4, num_channels=3)),
})
FAMILIES = tuple(_TINY)


def tiny_config(family: str = "xlm-roberta", attn: str = "eager", **overrides):
    """The tiny config of ``family`` (a model type, see ``_TINY``), with ``attn`` attention."""
    if family not in _TINY:
        raise ValueError(f"no tiny config for {family!r}; families: {FAMILIES}")
    cls_name, kwargs = _TINY[family]
    base = _BERT_STYLE if family in ("xlm-roberta", "roberta", "xlm-roberta-xl", "xmod", "bert", "bert-generation",
                                     "electra", "albert", "deberta", "deberta-v2") else {}
    return getattr(transformers, cls_name)(**{**base, **kwargs, "attn_implementation": attn, **overrides})


def adapterhub_interface(family: str):
    """The ``adapters.AdapterModelInterface`` a user writes to run AdapterHub on a family it has no built-in
    support for (XLM-R XL: pre-LN, adapters after the FFN's output projection, the residual taken before the
    block's LayerNorm), or None where AdapterHub supports the family itself."""
    if family != "xlm-roberta-xl":
        return None
    import adapters
    return adapters.AdapterModelInterface(
        adapter_methods=["bottleneck", "invertible"], model_embeddings="embeddings", model_layers="encoder.layer",
        layer_self_attn="attention", layer_cross_attn=None, attn_k_proj="self.key", attn_q_proj="self.query",
        attn_v_proj="self.value", attn_o_proj="output.dense", layer_intermediate_proj="intermediate.dense",
        layer_output_proj="output.dense", layer_pre_self_attn="attention.self_attn_layer_norm",
        layer_pre_ffn="LayerNorm", layer_ln_1=None, layer_ln_2=None,
    )


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


def copy_adapter_weights(hub, ours):
    """Copy AdapterHub's adapter weights into madx_fast's model by key: the names must match exactly."""
    sd = {k: v for k, v in hub.state_dict().items() if "adapters." in k}
    assert sd
    ours_keys = {k for k in ours.state_dict() if "adapters." in k}
    assert ours_keys == set(sd), f"key names differ: {sorted(ours_keys ^ set(sd))[:6]}"
    _, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected


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


# --------------------------------------------------------------------------------------------------------
# Comparing a model on madx_fast's code with the same model on AdapterHub's
# --------------------------------------------------------------------------------------------------------
class Spy:
    """Counts calls of madx_fast's fused ops made by the patch."""

    def __init__(self, monkeypatch):
        import madx_fast
        from madx_fast.model import mlm_loss

        self.calls = {"bottleneck_adapter": 0, "average_bottleneck_adapter": 0, "nice_forward": 0, "nice_inverse": 0,
                      "fused_linear_cross_entropy": 0}
        for name in ("bottleneck_adapter", "average_bottleneck_adapter", "nice_forward", "nice_inverse"):
            monkeypatch.setattr(madx_fast.ops, name, self._counting(name, getattr(madx_fast.ops, name)))
        monkeypatch.setattr(mlm_loss, "fused_linear_cross_entropy", self._counting(
            "fused_linear_cross_entropy", mlm_loss.fused_linear_cross_entropy))

    def _counting(self, name, fn):
        def wrapper(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    def reset(self):
        for k in self.calls:
            self.calls[k] = 0

    @property
    def total(self):
        return sum(self.calls.values())


def run(model, batch, train, backward=True, **kw):
    """Loss, output tensors (hidden states: encoder and decoder ones too; logits) and trainable grads of one
    forward (+ backward) from a fixed random state."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    out = model(**batch, output_hidden_states=True, **kw)
    tensors = {f"hidden:{key}:{i}": h for key in ("hidden_states", "encoder_hidden_states", "decoder_hidden_states")
               for i, h in enumerate(getattr(out, key, None) or ())}
    assert tensors, "the model returned no hidden states"
    if getattr(out, "logits", None) is not None:
        tensors["logits"] = out.logits
    loss = getattr(out, "loss", None)
    if backward:
        (loss if loss is not None else tensors["logits"].square().mean()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss, tensors, grads


def assert_same(a, b, tol=1e-5, logits=True):
    """Two ``run`` results agree (loss, outputs, every gradient, to ``tol`` relative to the gradient's size);
    returns how many parameters got a gradient."""
    loss_a, out_a, grads_a = a
    loss_b, out_b, grads_b = b
    if loss_a is not None or loss_b is not None:
        assert abs(loss_a.item() - loss_b.item()) < tol, (loss_a.item(), loss_b.item())
    keys = set(out_a) & set(out_b)
    assert keys >= {k for k in out_a if k.startswith("hidden")}
    if logits:
        assert "logits" in keys
    for k in keys:
        assert max_diff(out_a[k], out_b[k]) < tol, (k, max_diff(out_a[k], out_b[k]))
    return assert_same_grads(grads_a, grads_b, tol)


def assert_same_grads(grads_a: dict, grads_b: dict, tol=1e-5) -> int:
    """The same parameters with the same gradients (to ``tol`` relative to each gradient's size; a parameter
    one side did not reach has none or zeros on the other); returns how many got a gradient."""
    assert set(grads_a) == set(grads_b)
    reached = 0
    for name, g in grads_a.items():
        if g is None:
            assert grads_b[name] is None or grads_b[name].abs().max() == 0, name
            continue
        reached += 1
        assert grads_b[name] is not None, name
        scale = max(1.0, g.abs().max().item())
        assert max_diff(g, grads_b[name]) < tol * scale, (name, max_diff(g, grads_b[name]))
    return reached


def count_fused_backbone_calls(monkeypatch, op_name: str) -> list:
    """The backends of the wiring's calls of a fused backbone op (``ops.add_layer_norm``,
    ``ops.dense_activation``), which small test batches then take as if they were large
    (``wiring.FUSED_ADD_NORM_MIN_ELEMENTS`` set to 0)."""
    from madx_fast import ops
    from madx_fast.model import wiring
    monkeypatch.setattr(wiring, "FUSED_ADD_NORM_MIN_ELEMENTS", 0)
    calls = []
    real = getattr(ops, op_name)

    def counted(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)
    monkeypatch.setattr(ops, op_name, counted)
    return calls
