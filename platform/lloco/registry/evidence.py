"""Evidence: the sentences of a query's documents that a BM25 ranking of its question finds, as text.

The salient-sentence compressor chooses what to keep before any question is known, and no rule of that kind
kept more SQuAD answers than random sentences did (docs/compressor.md). Evidence is the query-aware half:
beside the compressed context, the decoder reads the few sentences the question points at, in what the
summaries leave of the context budget (the documents' tokens / a context ratio), so that summaries and
evidence together stay at the compression ratio asked for (``evidence_budget``). An adapter is trained with
it or not (``finetune.context_ratio``, recorded in the adapter's train record) and serving follows that
record, so a query reads what its adapter learned to read.
``lloco eval``'s ``lloco_evidence`` mode measures it, and ``lora_evidence`` (the same sentences, no
compressed context) is its ablation: what the compressed context adds to them.

Sentences are ranked by the retrieval index's own search (``lloco.registry.index``: BM25 over stemmed
words, then follow-up queries from the best hits, so the second fact of a two-hop question can be found
through the first), each sentence a row of an in-memory index (``Evidence``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lloco.registry.index import IndexEntry, IndexVersion, SegmentIndex, bm25_index
from lloco.registry.records import AdapterVersion, Segment, now

_SENTENCE = re.compile(r"[^\n.!?]*(?:[.!?]+|\n|$)")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) of each sentence of ``text`` (up to and with its ., ! or ?, or a line end), stripped;
    empty ones left out."""
    spans = []
    for match in _SENTENCE.finditer(text):
        start, end = match.span()
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if end > start:
            spans.append((start, end))
    return spans


class Evidence:
    """A query's documents (their texts, in order) split into sentences and indexed once, for any question.

    Building it is the cost (sentence split, token counts, BM25 tokenization and stemming: tens of milliseconds
    for a 32k-token document on a CPU core); a question then costs one search. Callers keep one per document
    set (the engine per document versions, finetuning and evaluation per row's documents)."""

    def __init__(self, texts: Sequence[str], tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.chars = sum(map(len, texts))  # what a cache weighs it by
        self._sentences = [text[a:b] for text in texts for a, b in sentence_spans(text)]
        self._costs: list[int] = []  # a sentence's tokens + 1 (the space that joins it)
        self._index = None
        if self._sentences:
            counted = tokenizer(self._sentences, add_special_tokens=False)["input_ids"]
            self._costs = [len(ids) + 1 for ids in counted]
            entries = tuple(
                IndexEntry("", "", Segment(row, 0, 0, 0, 0)) for row in range(len(self._sentences))
            )
            version = IndexVersion("evidence", "", len(texts), len(self._sentences), now())
            self._index = SegmentIndex(version, entries, bm25_index(self._sentences))

    def text(self, question: str, budget: int) -> str:
        """The sentences ``question`` ranks best, as many as fit ``budget`` tokens, joined by spaces in the
        documents' order; a sentence longer than what is left is passed over for the next one that fits.
        "" when none is found or fits."""
        if self._index is None or budget <= 0:
            return ""
        chosen: list[int] = []
        left = budget
        for hit in self._index.search(question, len(self._sentences)):
            row = hit.entry.segment.index
            if self._costs[row] <= left:
                chosen.append(row)
                left -= self._costs[row]
            if left <= 1:
                break
        return " ".join(self._sentences[row] for row in sorted(chosen))

    def ids(self, question: str, budget: int) -> list[int]:
        """``text`` in the tokenizer's ids, at most ``budget`` of them: what a query reads between its
        documents' compressed contexts and its prompt."""
        chosen = self.text(question, budget)
        return self._tokenizer.encode(chosen, add_special_tokens=False)[:budget] if chosen else []


def evidence_budget(document_tokens: int, summary_positions: int, context_ratio: int) -> int:
    """Evidence tokens a query may read: what its ``summary_positions`` leave of the context budget,
    ``document_tokens // context_ratio`` (0 when the summaries fill it, or ``context_ratio`` is 0)."""
    return max(0, document_tokens // context_ratio - summary_positions) if context_ratio > 0 else 0


def context_ratio(adapter: AdapterVersion | None) -> int:
    """The context ratio ``adapter`` was trained with (its record's ``context_ratio``, which finetuning
    writes from ``finetune.context_ratio``): its queries read evidence within ``evidence_budget``. 0 for
    none, no adapter, or an adapter trained elsewhere (imported: no such record)."""
    value = adapter.train.get("context_ratio", 0) if adapter is not None else 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
