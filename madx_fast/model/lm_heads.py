"""The language-model head of a Hugging Face model: what turns its hidden states into vocabulary logits, and
which loss the model computes from them.

``find_lm_head(model)`` describes the head of an HF ``...ForMaskedLM`` / ``...ForCausalLM`` /
``...LMHeadModel`` / ``...ForConditionalGeneration`` / ``EncoderDecoderModel`` (transformers 4.57 and 5.x):

* ``objective``: ``"masked"`` (the label of position t is predicted at t; mean cross-entropy),
  ``"causal"`` (predicted at t - 1: shifted labels; HF's causal loss, which honours ``num_items_in_batch``)
  or ``"seq2seq"`` (the decoder's position t predicts label t; the decoder inputs are the labels shifted
  right by the model's ``prepare_decoder_input_ids_from_labels``);
* ``decoder_input(h)``: the head's layers before the vocabulary projection (dense -> activation -> LayerNorm
  in BERT-style heads; nothing in GPT/Llama/T5/BART heads), a function of each position alone;
* ``weight`` / ``bias``: the vocabulary projection (BART's ``final_logits_bias`` included), read on use since
  ``resize_token_embeddings`` replaces modules;
* ``modules``: the modules the model's forward calls, in order, to turn hidden states into logits (what a fused
  loss skips), and ``decoder``: the projection as an ``nn.Linear`` (None where the model multiplies by the word
  embeddings itself: DeBERTa with ``legacy=False``), before which an invertible adapter's inverse belongs.

The fused loss then needs the head only at the labelled positions: ``decoder_input(h)`` and a fused linear
cross-entropy over ``weight`` / ``bias`` (``madx_fast.model.mlm_loss``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

OBJECTIVES = ("masked", "causal", "seq2seq")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_CAUSAL_CLASSES = ("BertGenerationDecoder",)


@dataclass
class LMHead:
    """An HF model's language-model head (see the module docstring), as attribute paths in ``owner`` (the model
    itself, or the decoder of an ``EncoderDecoderModel``), read on use: plain data, so a model holding it
    pickles. ``steps``: the transform's callables in order (``"gelu@lm_head"``: the GELU of that module's
    modeling file); ``decoder``: the projection Linear, or ``weight`` / ``bias`` where there is none;
    ``extra_bias``: a bias the model adds after the projection (BART's ``final_logits_bias``)."""

    objective: str
    class_name: str  # the HF class of the model (for an encoder-decoder: EncoderDecoderModel)
    owner: nn.Module
    modules: tuple[str, ...]  # attributes of ``owner`` the forward calls on the hidden states, in order
    steps: tuple[str, ...] = ()
    decoder_path: str | None = None
    weight_path: str | None = None
    bias_path: str | None = None
    extra_bias: str | None = None

    @property
    def shift(self) -> bool:
        """Whether position t is scored against label t + 1 (causal LM)."""
        return self.objective == "causal"

    @property
    def decoder(self) -> nn.Linear | None:
        return None if self.decoder_path is None else _get(self.owner, self.decoder_path)

    @property
    def weight(self) -> torch.Tensor:
        return self.decoder.weight if self.decoder_path else _get(self.owner, self.weight_path)

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.decoder.bias if self.decoder_path else _get(self.owner, self.bias_path)
        if self.extra_bias is None:
            return b
        extra = _get(self.owner, self.extra_bias).reshape(-1)
        return extra if b is None else b + extra

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def decoder_input(self, h: torch.Tensor) -> torch.Tensor:
        """The rows the vocabulary projection sees for hidden states ``h``: the transform, a function of each
        row alone (the identity where the head has none)."""
        for step in self.steps:
            if step.startswith("gelu@"):
                h = module_gelu(_get(self.owner, step[5:]))(h)
            else:
                h = _get(self.owner, step)(h)
        return h

    def module_list(self) -> list[nn.Module]:
        return [getattr(self.owner, name) for name in self.modules]


def _get(obj, path: str):
    for attr in path.split("."):
        obj = getattr(obj, attr)
    return obj


def _class_name(model: nn.Module) -> str:
    """The HF class name (AdapterHub's ``adapters.init`` may swap in a ``...WithAdapters`` subclass)."""
    name = type(model).__name__
    return name[:-len("WithAdapters")] if name.endswith("WithAdapters") else name


def lm_objective(model: nn.Module) -> str | None:
    """The objective an HF model class trains with (``"masked"`` / ``"causal"`` / ``"seq2seq"``), from its
    class name; None for a class without a language-model head."""
    name = _class_name(model)
    if name.endswith("ForMaskedLM"):
        return "masked"
    if name.endswith(_CAUSAL_SUFFIXES) or name in _CAUSAL_CLASSES:
        return "causal"
    if name.endswith("ForConditionalGeneration") or name == "EncoderDecoderModel":
        return "seq2seq"
    return None


def pretraining_objective(config) -> str | None:
    """The objective a model type is pretrained with, from its config: ``"seq2seq"`` for an encoder-decoder,
    ``"causal"`` for a decoder (``is_decoder``, or a type transformers has a causal-LM class for and no
    masked-LM class: GPT-2, Llama, Mistral, ...), ``"masked"`` for an encoder with a masked-LM class; None
    for a type with neither. A causal model attends only to earlier positions."""
    from transformers.models.auto import modeling_auto

    model_type = getattr(config, "model_type", None) or ""
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if getattr(config, "is_decoder", False):
        return "causal"
    if model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "masked"
    if model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    return None


def find_lm_head(model: nn.Module) -> LMHead | None:
    """The LM head of an HF model (None when its class has none, or its head is not one of the known kinds)."""
    objective = lm_objective(model)
    if objective is None:
        return None
    owner = model.decoder if _class_name(model) == "EncoderDecoderModel" else model
    for finder in _FINDERS:
        head = finder(owner)
        if head is not None:
            return LMHead(objective, _class_name(model), owner, **head)
    return None


def module_gelu(module: nn.Module):
    """The GELU the HF module's own forward calls (``gelu`` in its modeling file), exact GELU otherwise."""
    return getattr(sys.modules.get(type(module).__module__), "gelu", None) or F.gelu


def _has(obj, *attrs) -> bool:
    return all(getattr(obj, a, None) is not None for a in attrs)


# Each finder: the head's fields (paths in ``owner``) when ``owner`` has that kind of head, else None.
def _deberta_lm_predictions(owner):
    """DeBERTa (v1/v2) with ``legacy=False``: dense -> act -> LN, then ``h @ word_embeddings.T + bias``."""
    head = getattr(getattr(owner, "lm_predictions", None), "lm_head", None)
    if head is None or not _has(head, "dense", "LayerNorm", "bias"):
        return None
    p = "lm_predictions.lm_head"
    return dict(modules=("lm_predictions",), steps=(f"{p}.dense", f"{p}.transform_act_fn", f"{p}.LayerNorm"),
                weight_path=f"{owner.base_model_prefix}.embeddings.word_embeddings.weight", bias_path=f"{p}.bias")


def _bert_cls(owner):
    """BERT / DeBERTa (legacy) / BertLMHeadModel: ``cls.predictions`` = transform + decoder."""
    predictions = getattr(getattr(owner, "cls", None), "predictions", None)
    if predictions is None or not _has(predictions, "transform", "decoder"):
        return None
    return dict(modules=("cls",), steps=("cls.predictions.transform",), decoder_path="cls.predictions.decoder")


def _roberta_lm_head(owner):
    """RoBERTa / XLM-R / XLM-R XL / X-MOD / CamemBERT: ``lm_head`` = dense -> gelu -> layer_norm -> decoder."""
    head = getattr(owner, "lm_head", None)
    if head is None or not _has(head, "dense", "layer_norm", "decoder"):
        return None
    return dict(modules=("lm_head",), steps=("lm_head.dense", "gelu@lm_head", "lm_head.layer_norm"),
                decoder_path="lm_head.decoder")


def _albert_predictions(owner):
    """ALBERT: ``predictions`` = dense -> activation -> LayerNorm -> decoder (embedding size)."""
    head = getattr(owner, "predictions", None)
    if head is None or not _has(head, "dense", "activation", "LayerNorm", "decoder"):
        return None
    return dict(modules=("predictions",), steps=("predictions.dense", "predictions.activation",
                                                  "predictions.LayerNorm"), decoder_path="predictions.decoder")


def _electra_generator(owner):
    """ELECTRA generator: ``generator_predictions`` (dense -> act -> LN), then ``generator_lm_head``."""
    if not _has(owner, "generator_predictions", "generator_lm_head"):
        return None
    return dict(modules=("generator_predictions", "generator_lm_head"), steps=("generator_predictions",),
                decoder_path="generator_lm_head")


def _distilbert_vocab(owner):
    """DistilBERT: ``vocab_transform`` -> ``activation`` -> ``vocab_layer_norm`` -> ``vocab_projector``."""
    if not _has(owner, "vocab_transform", "activation", "vocab_layer_norm", "vocab_projector"):
        return None
    steps = ("vocab_transform", "activation", "vocab_layer_norm")
    return dict(modules=steps + ("vocab_projector",), steps=steps, decoder_path="vocab_projector")


def _decoder_only_lm_head(owner):
    """BertGenerationDecoder: ``lm_head.decoder``, no transform."""
    head = getattr(owner, "lm_head", None)
    if head is None or isinstance(head, nn.Linear) or not isinstance(getattr(head, "decoder", None), nn.Linear):
        return None
    return dict(modules=("lm_head",), decoder_path="lm_head.decoder")


def _linear_lm_head(owner):
    """GPT-2 / GPT-J / Llama / Mistral / T5 / BART / ...: ``lm_head`` is the projection (BART family: plus
    ``final_logits_bias``)."""
    if not isinstance(getattr(owner, "lm_head", None), nn.Linear):
        return None
    extra = "final_logits_bias" if isinstance(getattr(owner, "final_logits_bias", None), torch.Tensor) else None
    return dict(modules=("lm_head",), decoder_path="lm_head", extra_bias=extra)


_FINDERS = (_deberta_lm_predictions, _bert_cls, _roberta_lm_head, _albert_predictions, _electra_generator,
            _distilbert_vocab, _decoder_only_lm_head, _linear_lm_head)
