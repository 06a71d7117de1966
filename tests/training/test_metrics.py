"""Metrics: seqeval entity F1, SQuAD v1.1 F1 / EM, span decoding, accuracy; the learning-rate schedule."""
from __future__ import annotations

import numpy as np
import pytest

from madx_fast.training.tasks.copa import accuracy
from madx_fast.training.tasks.ner import ner_scores
from madx_fast.training.tasks.qa import best_span, normalize_answer, squad_scores
from madx_fast.training.trainer import linear_schedule


def test_ner_scores_are_entity_level():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    s = ner_scores(true, pred)
    # entities: PER ok, LOC missed (predicted ORG), ORG ok -> P = 2/3, R = 2/3
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    # a partially found entity counts as wrong
    assert ner_scores([["B-PER", "I-PER"]], [["B-PER", "O"]])["f1"] == 0.0
    assert ner_scores([["O"]], [["O"]])["f1"] == 0.0  # no entities: seqeval's zero_division


def test_squad_scores():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    s = squad_scores(["the Marlow", "river bank", ""], [["Marlow"], ["the river", "bank of the river"], ["x"]])
    assert s["exact_match"] == pytest.approx(100 / 3)
    # "river bank" vs "the river": P 1/2, R 1 -> 2/3; vs "bank of the river": P 1, R 2/3 -> 0.8 (best)
    assert s["f1"] == pytest.approx(100 * (1 + 0.8 + 0) / 3)


def test_best_span_respects_context_and_order():
    context = "Ana went to Marlow"
    offsets = [None, (0, 3), (4, 8), (9, 11), (12, 18), None]
    start = np.array([9.0, 0, 0, 0, 5, 0])
    end = np.array([9.0, 0, 6, 0, 4, 0])
    score, text = best_span(start, end, offsets, context)
    assert text == "Marlow" and score == 9.0  # position 0 (outside the context) is skipped; end 2 < start 4 too
    assert best_span(start, end, offsets, context, max_answer_length=1)[1] == "Marlow"


def test_accuracy():
    assert accuracy([0, 1, 1], [0, 1, 0]) == pytest.approx(2 / 3)


def test_linear_schedule():
    f = linear_schedule(warmup=4, total=10)
    assert [round(f(s), 3) for s in range(11)] == [0.2, 0.4, 0.6, 0.8, 1.0, 0.833, 0.667, 0.5, 0.333, 0.167, 0.0]
    g = linear_schedule(warmup=0, total=4)
    assert [g(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
