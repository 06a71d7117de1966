"""Four small synthetic languages for the demo: generated deterministically, nothing downloaded or shipped.

They share one inventory of named entities (person, location and organisation names, spelled the same) and
one set of meanings (travel, work, meetings, foundings, plain clauses), but differ in everything else:

    alpha  SVO, prepositions, entities capitalised, other words lower case
    beta   SOV, postpositions, every noun capitalised (so capitals alone do not mark entities)
    gamma  VSO, prepositions, no capitals at all
    delta  related to alpha and beta (``RELATED``): each word is alpha's or beta's (half the meanings each),
           alpha's word order and capitals, beta's postpositions and adjectives after the noun. The demo gives
           it no text of its own (no language adapter can be trained): it borrows alpha's and beta's

Content and function words are pseudo-words built from each language's own syllables. Some strings are
ambiguous on purpose: a few surnames are also city names, and organisation names contain city names
("Marlow Union" is an ORG, "Marlow" alone a LOC or a PER), so a tagger needs the context, which is exactly
what differs between the languages. ``write_corpus`` writes unlabeled text (MLM) and WikiANN-format NER
files (``tokens`` + ``ner_tags`` as strings) per language; a few MB at the default sizes.
"""
from __future__ import annotations

import json
import os
import random

LANGUAGES = ("alpha", "beta", "gamma", "delta")
# a language built from others: delta's words and grammar come from alpha's and beta's (``Language``)
RELATED = {"delta": ("alpha", "beta")}
NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]

_FIRST = ("Ana Boris Cira Dario Elin Farid Greta Hugo Ines Jonas Kira Luca Mira Nils Olga Pavel Rosa Sami "
          "Tomas Una Vera Yusuf Zora Emil Lena Oskar Ida Milan Nora Teo").split()
_LAST = ("Kovac Lindqvist Moreau Novak Petrov Quiroga Santos Tanaka Umarov Varga Weiss Yilmaz Zeller Brandt "
         "Castell Dumont Falk Horvat Ivanova Jensen Kaur Laine Marlow Ostrava Rieti").split()
_CITIES = ("Marlow Ostrava Rieti Velden Korsa Almira Brenna Castra Dunmore Elsbury Fenwick Galdor Harwick "
           "Istra Jorvik Kelso Lorna Mendel Norvik Orsk Palma Quell Rendal Sarno Tovar").split()
_ORG_HEADS = "Union Group Bank Institute Council Works Press Alliance".split()


def _names(n: int, seed: str) -> list[str]:
    """More shared proper names, from syllables no language uses for its own words."""
    rng = random.Random(seed)
    syl = "bra del fin gor han jel kas lum mar nor pol rav sel tam vor wil zan bek dar".split()
    out = set()
    while len(out) < n:
        out.add("".join(rng.choice(syl) for _ in range(rng.randint(2, 3))).capitalize())
    return sorted(out)


_LAST = _LAST + _names(60, "surnames")
_CITIES = _CITIES + _names(50, "cities")
_ORG_NAMES = "Nordia Veltra Omnicorp Sundral Kestrel Arvani Talon Brightwater".split()

# meanings -> (kind, count): nouns, verbs, adjectives and function words each language names differently
_NOUNS = ["house", "river", "book", "market", "letter", "bridge", "school", "garden", "road", "ship", "song",
          "field", "table", "window", "forest", "bread", "stone", "horse", "lamp", "tower"]
_VERBS = ["travel", "work", "meet", "found", "say", "open", "visit", "build", "sell", "write", "see", "carry",
          "leave", "join", "praise"]
_ADJS = ["old", "new", "big", "small", "red", "quiet", "green", "famous", "cold", "busy"]
_FUNCTION = ["to", "in", "for", "with", "by", "that", "and", "the", "a", "of", "year", "yesterday", "today",
             "is", "city", "company", "person"]

_SYLLABLES = {
    "alpha": ("ka ta lo mi re sa nu pe ri do fa ve li mo su ne ra ti".split(), 2),
    "beta": ("zu ith qe oth ul gar mek dov sur yth bal kor ush wen".split(), 2),
    "gamma": ("aa ei ou lan mor sei tak vii roh nai kuu pel".split(), 2),
}


def _lexicon(lang: str) -> dict[str, str]:
    """Meaning -> word for one language: distinct pseudo-words from the language's syllables; a related
    language's (delta) words are its parents', each meaning's from one of them, half from each."""
    if lang in RELATED:
        parents = [_lexicon(p) for p in RELATED[lang]]
        meanings = sorted(parents[0])
        picks = random.Random(f"lexicon-{lang}").sample(meanings, len(meanings) // 2)
        return {m: parents[0][m] if m in picks else parents[1][m] for m in meanings}
    rng = random.Random(f"lexicon-{lang}")
    syllables, base = _SYLLABLES[lang]
    used, lex = set(), {}
    for meaning in _FUNCTION + _NOUNS + _VERBS + _ADJS:
        short = meaning in _FUNCTION
        for attempt in range(10_000):
            # function words are short: one syllable while free ones remain, then two
            n = (1 if attempt < 50 else 2) if short else base + rng.randint(0, 1)
            word = "".join(rng.choice(syllables) for _ in range(n))
            if word not in used and len(word) > 1:
                used.add(word)
                lex[meaning] = word
                break
        else:  # pragma: no cover - the syllable inventories are large enough
            raise RuntimeError(f"{lang}: ran out of words")
    return lex


class Language:
    """Realises abstract clauses as tagged token lists in one language."""

    def __init__(self, name: str):
        if name not in LANGUAGES:
            raise ValueError(f"unknown synthetic language {name!r}; choose from {LANGUAGES}")
        self.name, self.lex = name, _lexicon(name)

    # words --------------------------------------------------------------------------------------------
    def w(self, meaning: str, pos: str = "O") -> list[tuple[str, str]]:
        word = self.lex[meaning]
        if self.name == "beta" and meaning in _NOUNS + ["city", "company", "person", "year"]:
            word = word.capitalize()
        return [(word, "O")]

    def entity(self, tokens: list[str], kind: str) -> list[tuple[str, str]]:
        out = []
        for i, t in enumerate(tokens):
            out.append((t.lower() if self.name == "gamma" else t, ("B-" if i == 0 else "I-") + kind))
        return out

    def pp(self, prep: str, np_: list) -> list:
        """Adposition phrase: preposition before (alpha, gamma) or postposition after (beta, delta)."""
        return np_ + self.w(prep) if self.name in ("beta", "delta") else self.w(prep) + np_

    def clause(self, subj: list, verb: str, obj: list, extra: list) -> list:
        v = self.w(verb)
        if self.name in ("alpha", "delta"):
            return subj + v + obj + extra
        if self.name == "beta":
            return subj + obj + extra + v
        return v + subj + obj + extra

    def noun_phrase(self, rng) -> list:
        words = self.w("the") + (self.w(rng.choice(_ADJS)) if rng.random() < 0.5 else [])
        noun = self.w(rng.choice(_NOUNS))
        if self.name in ("beta", "delta"):  # adjective after the noun
            return self.w("the") + noun + words[1:]
        return words + noun


def _person(rng, lang: Language):
    toks = [rng.choice(_FIRST), rng.choice(_LAST)] if rng.random() < 0.7 else [rng.choice(_LAST)]
    return lang.entity(toks, "PER")


def _place(rng, lang: Language):
    return lang.entity([rng.choice(_CITIES)], "LOC")


def _org(rng, lang: Language):
    if rng.random() < 0.5:
        toks = [rng.choice(_CITIES), rng.choice(_ORG_HEADS)]
    else:
        toks = [rng.choice(_ORG_NAMES)] + ([rng.choice(_ORG_HEADS)] if rng.random() < 0.6 else [])
    return lang.entity(toks, "ORG")


def sentence(rng: random.Random, lang: Language) -> list[tuple[str, str]]:
    """One tagged sentence: a random frame realised in ``lang``."""
    frame = rng.randrange(8)
    when = []
    if rng.random() < 0.3:
        when = lang.pp("in", lang.w("year") + [(str(rng.randint(1890, 2024)), "O")])
    elif rng.random() < 0.2:
        when = lang.w(rng.choice(["yesterday", "today"]))
    if frame == 0:
        s = lang.clause(_person(rng, lang), "travel", lang.pp("to", _place(rng, lang)), when)
    elif frame == 1:
        s = lang.clause(_person(rng, lang), "work", lang.pp("for", _org(rng, lang)), lang.pp("in", _place(rng, lang)))
    elif frame == 2:
        s = lang.clause(_person(rng, lang), "meet", _person(rng, lang), lang.pp("in", _place(rng, lang)) + when)
    elif frame == 3:
        s = lang.clause(_org(rng, lang), "found", lang.w("a") + lang.w("company"), lang.pp("by", _person(rng, lang)))
    elif frame == 4:
        inner = lang.clause(_org(rng, lang), "open", lang.noun_phrase(rng), lang.pp("in", _place(rng, lang)))
        s = lang.clause(_person(rng, lang), "say", lang.w("that") + inner, [])
    elif frame == 5:
        s = lang.clause(_place(rng, lang), "is", lang.w("a") + lang.w(rng.choice(_ADJS)) + lang.w("city"), when)
    elif frame == 6:
        s = lang.clause(_person(rng, lang), rng.choice(["visit", "leave", "praise"]),
                        _place(rng, lang) if rng.random() < 0.5 else _org(rng, lang), when)
    else:  # no entity: content words only
        s = lang.clause(lang.noun_phrase(rng), rng.choice(_VERBS), lang.noun_phrase(rng),
                        lang.pp("with", lang.noun_phrase(rng)) if rng.random() < 0.5 else when)
    s = s + [(".", "O")]
    if lang.name != "gamma" and s[0][1] == "O":
        s[0] = (s[0][0].capitalize(), "O")
    return s


def generate(lang: str, n: int, seed: int) -> list[list[tuple[str, str]]]:
    rng = random.Random(f"{lang}-{seed}")
    language = Language(lang)
    return [sentence(rng, language) for _ in range(n)]


def write_corpus(directory: str, languages=LANGUAGES, *, text_sentences: int = 12000, ner_train: int = 2000,
                 ner_validation: int = 300, ner_test: int = 500, seed: int = 0,
                 text: bool = True) -> dict[str, dict[str, str]]:
    """Per language: ``text/train.txt`` and ``text/validation.txt`` (one sentence a line; not with
    ``text=False``: a language without text) and ``ner/{train,validation,test}.jsonl`` (``{"tokens": [...],
    "ner_tags": [...]}``). Returns the paths."""
    paths = {}
    for lang in languages:
        root = os.path.join(directory, lang)
        os.makedirs(os.path.join(root, "ner"), exist_ok=True)
        if text:
            os.makedirs(os.path.join(root, "text"), exist_ok=True)
            sentences = generate(lang, text_sentences, seed)
            n_val = max(1, text_sentences // 20)
            for split, rows in (("train", sentences[n_val:]), ("validation", sentences[:n_val])):
                with open(os.path.join(root, "text", f"{split}.txt"), "w", encoding="utf-8") as f:
                    f.writelines(" ".join(t for t, _ in s) + "\n" for s in rows)
        ner = generate(lang, ner_train + ner_validation + ner_test, seed + 1)
        splits = {"train": ner[:ner_train], "validation": ner[ner_train:ner_train + ner_validation],
                  "test": ner[ner_train + ner_validation:]}
        for split, rows in splits.items():
            with open(os.path.join(root, "ner", f"{split}.jsonl"), "w", encoding="utf-8") as f:
                for s in rows:
                    f.write(json.dumps({"tokens": [t for t, _ in s], "ner_tags": [g for _, g in s]}) + "\n")
        paths[lang] = {"ner": os.path.join(root, "ner")}
        if text:
            paths[lang].update(text=os.path.join(root, "text", "train.txt"),
                               text_eval=os.path.join(root, "text", "validation.txt"))
    return paths


def train_tokenizer(texts, vocab_size: int = 800):
    """An XLM-R-style (SentencePiece Unigram) tokenizer built with the ``tokenizers`` library, wrapped as XLM-R's
    fast tokenizer (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` 4).

    The piece inventory comes from a BPE trainer, the Unigram scores are the pieces' log-frequencies in the
    BPE-segmented text (add-one smoothed). ``tokenizers``' own Unigram trainer breaks a corpus this small and
    repetitive into single characters; transformers 5's XLM-R tokenizer class needs a Unigram model."""
    import math
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]

    def frame(tok):
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        return tok

    bpe = frame(Tokenizer(models.BPE(unk_token="<unk>")))
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                       show_progress=False))
    counts = Counter(t for enc in bpe.encode_batch(list(texts)) for t in enc.tokens)
    pieces = [p for p, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]) if p not in special]
    total = sum(counts[p] for p in pieces) + len(pieces)
    vocab = [(t, 0.0) for t in special] + [(p, math.log((counts[p] + 1) / total)) for p in pieces]
    backend = frame(Tokenizer(models.Unigram(vocab, unk_id=special.index("<unk>"), byte_fallback=False)))
    backend.post_processor = TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                special_tokens=[("<s>", 0), ("</s>", 2)])
    try:
        from transformers import XLMRobertaTokenizerFast as TokenizerClass
    except ImportError:  # transformers versions without the separate *Fast name
        from transformers import XLMRobertaTokenizer as TokenizerClass
    return TokenizerClass(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                          cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
