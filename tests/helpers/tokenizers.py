"""Tokenizers of each family's kind, trained on a few texts with the ``tokenizers`` library and wrapped in the
family's own transformers class (the ``...Fast`` name on transformers 4.x, the plain name on 5.x), saved and
loaded back as the real ones are:

    gpt2        byte-level BPE, ``<|endoftext|>`` as bos / eos / unk, no pad token, no special tokens added
    llama       SentencePiece-style BPE (``▁`` for spaces), ``<unk>`` 0 ``<s>`` 1 ``</s>`` 2, no pad token,
                ``<s>`` in front of every text (Mistral's too)
    distilbert  WordPiece (lower case), ``[PAD]`` 0 ``[UNK]`` 1 ``[CLS]`` 2 ``[SEP]`` 3 ``[MASK]`` 4
    deberta-v2  Unigram (the demo's XLM-R-style pieces), ``<s>`` / ``</s>`` as [CLS] / [SEP]
    xlm-roberta-xl  the demo's XLM-R tokenizer
"""
from __future__ import annotations

import transformers


def _class(name: str):
    return getattr(transformers, name + "Fast", None) or getattr(transformers, name)


def _gpt2(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    end = "<|endoftext|>"
    return _class("GPT2Tokenizer")(tokenizer_object=tok, bos_token=end, eos_token=end, unk_token=end)


def _llama(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                       special_tokens=[("<s>", 1)])
    return _class("LlamaTokenizer")(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _distilbert(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special,
                                                             show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return _class("DistilBertTokenizer")(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]",
                                         pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")


def _xlm_roberta(texts, vocab_size):
    from madx_fast.demo import synthetic
    return synthetic.train_tokenizer(texts, vocab_size=vocab_size)


def _deberta_v2(texts, vocab_size):
    from madx_fast.demo import synthetic
    backend = synthetic.train_tokenizer(texts, vocab_size=vocab_size).backend_tokenizer
    return _class("DebertaV2Tokenizer")(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        sep_token="</s>", pad_token="<pad>", cls_token="<s>", mask_token="<mask>")


BUILDERS = {"gpt2": (_gpt2, 400), "llama": (_llama, 300), "mistral": (_llama, 300), "distilbert": (_distilbert, 300),
            "deberta-v2": (_deberta_v2, 300), "xlm-roberta-xl": (_xlm_roberta, 300)}


def family_tokenizer(family: str, texts):
    """A tokenizer of ``family``'s kind trained on ``texts`` (see the module docstring)."""
    if family not in BUILDERS:
        raise ValueError(f"no tokenizer builder for {family!r}; families: {sorted(BUILDERS)}")
    build, vocab_size = BUILDERS[family]
    return build(list(texts), vocab_size)
