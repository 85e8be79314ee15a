"""Answer-quality metrics: SQuAD-style EM/F1 and ROUGE-1/2/L (QMSum); bootstrap intervals of a mean score and of
the ratio of two rows. (The perplexity gap a compressor closes is ``lloco.finetune.pretrain_eval.gap_closed``.)"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the official SQuAD normalization)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: Iterable[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer."""
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(gold) for gold in golds))


def _token_f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """Best token-overlap F1 of the prediction against any gold answer, in [0, 1]."""
    return max((_token_f1(prediction, gold) for gold in golds), default=0.0)


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _f(overlap: float, predicted: int, expected: int) -> float:
    if overlap == 0 or predicted == 0 or expected == 0:
        return 0.0
    precision, recall = overlap / predicted, overlap / expected
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures on normalized tokens, and their geometric mean (QMSum's summary number)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    scores = {}
    for n in (1, 2):
        p, e = _ngrams(predicted, n), _ngrams(expected, n)
        scores[f"rouge{n}"] = _f(sum((p & e).values()), sum(p.values()), sum(e.values()))
    scores["rougeL"] = _f(_lcs_length(predicted, expected), len(predicted), len(expected))
    values = [scores["rouge1"], scores["rouge2"], scores["rougeL"]]
    scores["rouge_gmean"] = math.prod(values) ** (1 / 3) if all(values) else 0.0
    return scores


def bootstrap_interval(
    numerator: Sequence[float],
    denominator: Sequence[float] | None = None,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``mean(numerator)``, or with ``denominator`` (paired: the same
    questions, resampled together) of ``mean(numerator) / mean(denominator)``.

    A few hundred questions of a small model's F1 leave differences of a point or two within noise; the
    interval says how far a row's score or its ratio to another row can be trusted. (A seeded NumPy
    resample: one statistic does not warrant SciPy as a dependency.)"""
    values = np.asarray(numerator, dtype=np.float64)
    if values.size == 0:
        return (math.nan, math.nan)
    picks = np.random.default_rng(seed).integers(0, values.size, size=(resamples, values.size))
    statistic = values[picks].mean(axis=1)
    if denominator is not None:
        below = np.asarray(denominator, dtype=np.float64)
        if below.shape != values.shape:
            raise ValueError("a paired interval needs one denominator value per numerator value")
        with np.errstate(divide="ignore", invalid="ignore"):
            statistic = statistic / below[picks].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(statistic, [tail, 100 - tail])
    return (float(low), float(high))
