"""Which of a segment's own tokens a ``salient_sentences`` compressor keeps: whole sentences the model
found surprising and that name things, by their mean surprisal plus a bonus for names and numbers.

A learned summary token must be taught to hold a segment's facts, and at 135M parameters none of the
objectives tried did (docs/compressor.md). A token's own key and value, computed with the whole segment
and the kept tokens before it in view, already hold it and what the layers drew into it from the text
around it; keeping k of them per segment is a compression the frozen decoder reads without training
(it attends to them as to any earlier text). What to keep: the sentences the model predicted worst (mean
surprisal per token, ``-log p(token | everything before it)``), the content a reader could not have
guessed, so a question about a sentence finds the sentence whole rather than a few scattered rare tokens;
within the last sentence that fits, its most surprising tokens. Questions mostly ask for names, numbers and
dates, so a sentence's score adds ``CONTENT_WEIGHT`` times its share of such tokens (a digit, or a word piece
that starts with a capital): at 8x on validation documents it kept the answer of 75% of the passkey questions
against 56% by surprisal alone, and no fewer of the others (docs/compressor.md). The document's first ``SINK_TOKENS``
tokens are always kept: attention heads park their weight on the first positions, and a cache without
them reads worse than no context at all.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SINK_TOKENS = 4
SENTENCE_END = (".", "?", "!")
CONTENT_WEIGHT = 2.0  # nats of mean surprisal a sentence of names and numbers only is worth
_CONTENT = re.compile(r"\d|^\s?[A-Z]")
_KEEP = float("inf")
_TIE_BREAK = 1e-3  # a sentence's own tokens by surprisal, without changing the order of sentences


@cache
def _token_texts(tokenizer: Any) -> tuple[str, ...]:
    """Every token's text, decoded once per tokenizer for the tables below."""
    return tuple(tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))


@cache
def _ends_sentence(tokenizer: Any) -> Tensor:
    """[vocab] bool: the token ends a sentence (its text ends with ., ? or ! or holds a line break)."""
    return torch.tensor([t.rstrip().endswith(SENTENCE_END) or "\n" in t for t in _token_texts(tokenizer)])


@cache
def _names_a_thing(tokenizer: Any) -> Tensor:
    """[vocab] float: 1.0 where the token holds a digit or is a word piece starting with a capital letter."""
    return torch.tensor([1.0 if _CONTENT.search(t) else 0.0 for t in _token_texts(tokenizer)])


def _sentence_mean(values: Tensor, sentence: Tensor, counted: Tensor) -> Tensor:
    """[B, T]: each token's sentence's mean of ``values`` over the tokens where ``counted``."""
    batch, length = values.shape
    zeros = torch.zeros(batch, length, device=values.device)
    totals = zeros.scatter_add(1, sentence, torch.where(counted, values, 0.0))
    counts = zeros.scatter_add(1, sentence, counted.float())
    return (totals / counts.clamp(min=1)).gather(1, sentence)


def token_surprisal(hidden: Tensor, lm_head: nn.Module, token_ids: Tensor, lengths: Tensor) -> Tensor:
    """[B, T] surprisal (nats) of each token given the tokens before it in the row, from the final-normed
    hidden states [B, T, D] of right-padded rows; a row's first token (nothing before it here) and padding get
    NaN. Logits are made one row at a time ([T, V], not [B, T, V]: 3 GB at 64 x 512 rows of SmolLM2)."""
    batch, length = token_ids.shape
    surprisal = torch.full((batch, length), float("nan"), device=token_ids.device)
    for row in range(batch):
        n = int(lengths[row])
        if n > 1:
            surprisal[row, 1:n] = F.cross_entropy(
                lm_head(hidden[row, : n - 1]).float(), token_ids[row, 1:n], reduction="none"
            )
    return surprisal


def salient_positions(
    token_ids: Tensor, surprisal: Tensor, lengths: Tensor, k: int, tokenizer: Any, document_start: bool
) -> list[Tensor]:
    """Per row of right-padded segments [B, T], the sorted indices of the at most k tokens to keep.

    Args:
        token_ids: the segments' tokens.
        surprisal: ``token_surprisal`` of them (NaN where unknown: left out of its sentence's mean surprisal).
        lengths: [B] real tokens per row.
        k: tokens kept per segment (all of a shorter one).
        tokenizer: the base model's, to find sentence ends.
        document_start: the rows are their documents' first segments (their sink tokens are kept).
    """
    device = token_ids.device
    batch, length = token_ids.shape
    ends = _ends_sentence(tokenizer).to(device)[token_ids].long()
    sentence = torch.cumsum(ends, dim=1) - ends  # a sentence's end token is still its own
    real = torch.arange(length, device=device)[None] < lengths[:, None].to(device)
    known = ~surprisal.isnan()
    value = torch.where(known, surprisal, torch.zeros_like(surprisal))
    names = _names_a_thing(tokenizer).to(device)[token_ids]
    score = (
        _sentence_mean(value, sentence, known)
        + CONTENT_WEIGHT * _sentence_mean(names, sentence, real)
        + _TIE_BREAK * value
    )
    if document_start:
        score[:, :SINK_TOKENS] = _KEEP
    score = score.masked_fill(~real, -_KEEP)
    return [score[row].topk(min(k, int(lengths[row]))).indices.sort().values for row in range(batch)]
