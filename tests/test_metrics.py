"""Answer metrics against hand-computed values (official SQuAD normalization, ROUGE F-measures) and bootstrap
intervals."""

import math

import pytest
from lloco.eval.metrics import bootstrap_interval, exact_match, f1_score, normalize_answer, rouge


def test_normalization_drops_case_punctuation_and_articles() -> None:
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"


def test_exact_match_takes_any_gold() -> None:
    assert exact_match("the Paris", ["London", "Paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0


def test_f1_partial_overlap() -> None:
    # prediction {paris, france}, gold {paris}: precision 1/2, recall 1 -> F1 2/3
    assert f1_score("Paris France", ["Paris"]) == pytest.approx(2 / 3)
    assert f1_score("Berlin", ["Paris"]) == 0.0
    assert f1_score("", [""]) == 1.0


def test_rouge_by_hand() -> None:
    scores = rouge("the cat sat on the mat", "the cat lay on the mat")
    # tokens after normalization: [cat, sat, on, mat] vs [cat, lay, on, mat]
    assert scores["rouge1"] == pytest.approx(3 / 4)
    assert scores["rouge2"] == pytest.approx(1 / 3)  # bigrams: only (on, mat) shared of 3
    assert scores["rougeL"] == pytest.approx(3 / 4)  # LCS cat, on, mat
    assert scores["rouge_gmean"] == pytest.approx(math.prod([3 / 4, 1 / 3, 3 / 4]) ** (1 / 3))
    assert rouge("x", "y")["rouge_gmean"] == 0.0


def test_bootstrap_intervals_of_a_mean_and_of_a_paired_ratio() -> None:
    assert bootstrap_interval([0.5] * 20) == (0.5, 0.5)
    low, high = bootstrap_interval([0.0, 1.0] * 50)
    assert low < 0.5 < high and high - low < 0.3  # the mean of 100 coin flips: about 0.40-0.60
    baseline = [0.1 * (i % 7) for i in range(60)]
    assert bootstrap_interval([2 * v for v in baseline], baseline) == pytest.approx((2.0, 2.0))
    unpaired = bootstrap_interval(baseline[::-1], baseline)  # same values, other questions: the ratio varies
    assert unpaired[0] < 1.0 < unpaired[1]
    with pytest.raises(ValueError):
        bootstrap_interval([1.0, 2.0], [1.0])
