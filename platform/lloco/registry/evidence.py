"""Evidence: the sentences of a query's documents that a BM25 ranking of its question finds, as text.

The salient-sentence compressor chooses what to keep before any question is known, and no rule of that kind
kept more SQuAD answers than random sentences did (docs/compressor.md). Evidence is the query-aware half:
beside the compressed context, the decoder reads the few sentences the question points at, within a token
budget (the documents' tokens / an evidence ratio) that keeps the whole context at the compression ratio
asked for. An adapter is trained with it or not (``finetune.evidence_ratio``, recorded in the adapter's
train record) and serving follows that record, so a query reads what its adapter learned to read.
``lloco eval``'s ``lloco_evidence`` mode measures it, and ``lora_evidence`` (the same sentences, no
compressed context) is its ablation: what the compressed context adds to them.

Sentences are ranked by the retrieval index's own search (``lloco.registry.index``: BM25 over stemmed
words, then follow-up queries from the best hits, so the second fact of a two-hop question can be found
through the first), each sentence a row of a throwaway index.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
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


def evidence_text(
    texts: Sequence[str], question: str, budget: int, count_tokens: Callable[[str], int]
) -> str:
    """The sentences of ``texts`` (a query's documents, in order) that ``question`` ranks best, as many as fit
    ``budget`` tokens (``count_tokens`` of each, plus one for the space that joins them), joined in the
    documents' order; a sentence longer than what is left is passed over for the next one that fits. ""
    when none is found."""
    sentences = [(i, start, end) for i, text in enumerate(texts) for start, end in sentence_spans(text)]
    if budget <= 0 or not sentences:
        return ""
    entries = tuple(
        IndexEntry(str(i), "", Segment(row, 0, 0, start, end))
        for row, (i, start, end) in enumerate(sentences)
    )
    version = IndexVersion("evidence", "", len(texts), len(sentences), now())
    index = SegmentIndex(version, entries, bm25_index([texts[i][a:b] for i, a, b in sentences]))
    chosen: list[int] = []
    left = budget
    for hit in index.search(question, len(sentences)):
        i, start, end = sentences[hit.entry.segment.index]
        cost = count_tokens(texts[i][start:end]) + 1
        if cost <= left:
            chosen.append(hit.entry.segment.index)
            left -= cost
        if left <= 1:
            break
    return " ".join(texts[i][a:b] for i, a, b in (sentences[row] for row in sorted(chosen)))


def evidence_ids(texts: Sequence[str], question: str, budget: int, tokenizer: Any) -> list[int]:
    """``evidence_text`` in ``tokenizer``'s ids (counted with it), at most ``budget`` of them: what a query
    reads between its documents' compressed contexts and its prompt."""
    count = lambda part: len(tokenizer.encode(part, add_special_tokens=False))  # noqa: E731
    chosen = evidence_text(texts, question, budget, count)
    return tokenizer.encode(chosen, add_special_tokens=False)[:budget] if chosen else []


def evidence_ratio(adapter: AdapterVersion | None) -> int:
    """The evidence ratio ``adapter`` was trained with (its record's ``evidence_ratio``, which finetuning
    writes from ``finetune.evidence_ratio``): its queries read evidence within their documents' tokens / it.
    0 for none, no adapter, or an adapter trained elsewhere (imported: no such record)."""
    value = adapter.train.get("evidence_ratio", 0) if adapter is not None else 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
