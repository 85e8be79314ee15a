"""A tenant's retrieval index: BM25 (``bm25s``) over the texts of its compressed segments, one per compressor.

A context records its segment table (``records.Segment``: token and character ranges), so a segment's text
is a slice of the document's text and its summaries are ``k`` rows of the context. The index lists every
segment of every fresh context of one compressor and scores them against a question; a query then
prepends the chosen segments' summaries (``lloco.serve``).

Search is two rounds of BM25 (`SegmentIndex.search`): the question, then one follow-up query from each of
its best hits (the question's words that hit lacks, plus the hit's own strongest terms), fused by rank.
Questions that need two facts often name only the first: the second segment is found through what the
first one says (the "bridge" of a multi-hop question), which plain BM25 on the question misses.

Stored under the tenant's prefix (``keys.index_prefix``), so it goes with the tenant and no other tenant's
reader can reach it:

- ``builds/{build_id}/``: one immutable version: ``entries.json`` (which segment each BM25 row is: document,
  text digest, segment), ``texts.json.gz`` (the rows' texts, so an update re-indexes without re-reading
  every document) and bm25s's own files (absent when the index is empty);
- ``current.json``: the version readers load, written last. Readers key their caches on its build id. Its
  ``format`` says how the build tokenized its texts, and questions are tokenized the same way: format 2
  (`INDEX_FORMAT`) English stop words dropped and Snowball English stems (PyStemmer), format 1 (builds of
  earlier versions) stop words only. Older builds stay searchable; the next update or rebuild re-indexes
  their stored texts in the current format.

Writers: the compress job rebuilds the index from every fresh context (``rebuild``); online compression,
new text for a document and deleting one update it (``update``: the current version's rows, those of the
named documents re-read). Two writers at once may each publish a version missing the other's change; the
next update or rebuild repairs it. Queries never depend on this for correctness: a hit whose document was
deleted or whose text changed (its digest differs from the document's) is dropped by the reader
(``lloco.serve``), so a deleted document is never retrieved even from a version that still lists it.
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
import tempfile
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

# bm25s uses JAX for its top-k when JAX is installed and runs one JAX operation as it is imported, which makes
# JAX claim 75% of every visible GPU's memory: on a GPU host with JAX installed, a pretraining process lost
# 105 GB before its first step. lloco takes bm25s's NumPy top-k (`SegmentIndex.search`), so JAX, when it
# is there, is kept on the CPU (unless the process chose its platforms itself).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import bm25s  # noqa: E402 - after the line above
import numpy as np  # noqa: E402
import Stemmer  # noqa: E402

from lloco.errors import Internal, NotFound, ResourceExhausted
from lloco.logs import get_logger
from lloco.registry.records import Segment, json_bytes, now, segment_row
from lloco.storage import keys

if TYPE_CHECKING:
    from lloco.registry.tenant import Registry
    from lloco.storage import ObjectStore

log = get_logger(__name__)

INDEX_FORMAT = "lloco-index/2"
STEMMED_FORMATS = {"lloco-index/1": False, INDEX_FORMAT: True}  # the formats read: whether texts were stemmed
ENTRIES_FILE = "entries.json"
TEXTS_FILE = "texts.json.gz"
BM25_FILES = (
    "data.csc.index.npy",
    "indices.csc.index.npy",
    "indptr.csc.index.npy",
    "vocab.index.json",
    "params.index.json",
)
STOPWORDS = "en"  # the same tokenization for segments and questions
FEEDBACK_HITS = 3  # the question's best hits that each make a follow-up query
FEEDBACK_TERMS = 10  # a hit's terms in its follow-up query: those with the highest BM25 weight in it
QUESTION_WEIGHT = 1.5  # the question's own ranking in the fusion, against 1 for each follow-up's


@dataclass(frozen=True)
class IndexEntry:
    """One row of the index: a segment of a document, as compressed from the text with digest ``source_sha``."""

    doc_id: str
    source_sha: str
    segment: Segment


@dataclass(frozen=True)
class SegmentHit:
    """A segment found for a question; ``score``: its fused rank score (`SegmentIndex.search`), higher first."""

    entry: IndexEntry
    score: float


@dataclass(frozen=True)
class IndexVersion:
    """What ``current.json`` says: the build readers load, and its size."""

    build_id: str
    compressor_id: str
    documents: int
    segments: int
    built: datetime
    format: str = INDEX_FORMAT


class SegmentIndex:
    """One loaded index version: immutable, searched from many threads."""

    def __init__(
        self, version: IndexVersion, entries: tuple[IndexEntry, ...], bm25: bm25s.BM25 | None
    ) -> None:
        self.version = version
        self.entries = entries
        self._bm25 = bm25
        self._stem = STEMMED_FORMATS[version.format]
        self._row_terms = _row_terms(bm25) if bm25 is not None else None

    def search(self, question: str, k: int, feedback_hits: int = FEEDBACK_HITS) -> list[SegmentHit]:
        """The ``k`` best segments for ``question``, best first (ties: index order).

        Round one ranks the segments by BM25 against the question. Each of its ``feedback_hits`` best hits
        then asks a follow-up: the question's terms that hit lacks (what is still to be found) and the
        hit's ``FEEDBACK_TERMS`` strongest terms (what it is about: the names a second fact is filed under).
        Every ranking lists up to ``k`` segments with a positive score (a follow-up's without the hit that
        made it); a segment's score is its reciprocal-rank fusion over them, ``QUESTION_WEIGHT / rank`` in
        the question's ranking plus ``1 / rank`` in each follow-up's (1-based), so a segment found by
        several rounds rises. ``feedback_hits=0``: round one only (the segments holding the question's
        terms). The constants were tuned on HotpotQA's training-side questions
        (docs/benchmarks/retrieval-recall-cpu.md).
        """
        if self._bm25 is None or self._row_terms is None or k < 1:
            return []
        vocabulary = self._bm25.vocab_dict
        tokens = bm25s.tokenize(
            question, stopwords=STOPWORDS, stemmer=_stemmer(self._stem), return_ids=False, show_progress=False
        )[0]
        terms = [vocabulary[token] for token in tokens if token in vocabulary]
        if not terms:
            return []
        depth = min(k, len(self.entries))
        first = self._ranked([terms], depth)[0]
        fused: dict[int, float] = defaultdict(float)
        for rank, row in enumerate(first, start=1):
            fused[row] += QUESTION_WEIGHT / rank
        follow_ups = [(row, query) for row in first[:feedback_hits] if (query := self._follow_up(terms, row))]
        if follow_ups:
            rankings = self._ranked([query for _, query in follow_ups], depth + 1)
            for (origin, _), ranking in zip(follow_ups, rankings, strict=True):
                for rank, row in enumerate([row for row in ranking if row != origin][:depth], start=1):
                    fused[row] += 1 / rank
        best = sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:k]
        return [SegmentHit(self.entries[row], score) for row, score in best]

    def _ranked(self, queries: list[list[int]], k: int) -> list[list[int]]:
        """For each query (term ids), the rows with a positive BM25 score, best first, at most ``k``."""
        assert self._bm25 is not None
        rows, scores = self._bm25.retrieve(
            queries, k=min(k, len(self.entries)), show_progress=False, n_threads=1, backend_selection="numpy"
        )
        return [
            [int(row) for row, score in zip(ranked, scored, strict=True) if score > 0]
            for ranked, scored in zip(rows, scores, strict=True)
        ]

    def _follow_up(self, question: list[int], row: int) -> list[int]:
        """The follow-up query of hit ``row``: the question's terms it lacks, then its strongest terms that
        are not the question's ([] when it has none)."""
        assert self._row_terms is not None
        terms, offsets = self._row_terms
        own = terms[offsets[row] : offsets[row + 1]].tolist()
        asked = set(question)
        strongest = [term for term in own if term not in asked][:FEEDBACK_TERMS]
        if not strongest:
            return []
        present = set(own)
        return [term for term in question if term not in present] + strongest


class TenantIndex:
    """The retrieval index of one tenant for one compressor: read, build, update. Made by
    ``Registry.index``, so it reaches only that tenant's keys.

    ``max_segments`` caps what a build may hold (None: no cap); removing documents never hits it.
    """

    def __init__(
        self, registry: Registry, store: ObjectStore, compressor_id: str, max_segments: int | None = None
    ) -> None:
        keys.validate_id("compressor", compressor_id)
        self._registry = registry
        self._store = store
        self.tenant = registry.tenant
        self.compressor_id = compressor_id
        self._max_segments = max_segments

    def current(self) -> IndexVersion | None:
        """The version readers load now; None before the first build."""
        try:
            data = json.loads(self._store.get_bytes(keys.index_current(self.tenant, self.compressor_id)))
        except NotFound:
            return None
        try:
            version = IndexVersion(
                build_id=data["build_id"],
                compressor_id=data["compressor_id"],
                documents=int(data["documents"]),
                segments=int(data["segments"]),
                built=datetime.fromisoformat(data["built"]),
                format=data["format"],
            )
        except (KeyError, TypeError, ValueError) as error:
            raise Internal(
                f"retrieval index of tenant {self.tenant!r} has a broken pointer ({error!r})"
            ) from error
        if version.format not in STEMMED_FORMATS:
            raise Internal(
                f"retrieval index of tenant {self.tenant!r} is in format {version.format!r}, which this "
                f"version of lloco cannot read (it reads {sorted(STEMMED_FORMATS)})"
            )
        return version

    def load(self, version: IndexVersion | None = None) -> SegmentIndex | None:
        """The searchable index of ``version`` (None: the current one); None when there is none.

        Raises NotFound when the version's files are gone (a newer build removed them: read ``current``
        again)."""
        version = version or self.current()
        if version is None:
            return None
        prefix = keys.index_version_prefix(self.tenant, self.compressor_id, version.build_id)
        try:
            entries = _entries_from_json(json.loads(self._store.get_bytes(prefix + ENTRIES_FILE)))
        except NotFound:
            raise NotFound(
                f"retrieval index build {version.build_id!r} was replaced; load the current one"
            ) from None
        if not entries:
            return SegmentIndex(version, (), None)
        with tempfile.TemporaryDirectory(prefix="lloco-index-") as folder:
            for name in BM25_FILES:
                Path(folder, name).write_bytes(self._store.get_bytes(prefix + name))
            bm25 = bm25s.BM25.load(folder, mmap=False, show_progress=False, verbosity=0)
        return SegmentIndex(version, entries, bm25)

    def rebuild(self) -> IndexVersion:
        """A new version from every fresh context of this compressor (the compress job's last step)."""
        rows: list[tuple[IndexEntry, str]] = []
        for doc_id in self._registry.document_ids():
            rows.extend(self._document_rows(doc_id))
        return self._publish(rows)

    def update(self, doc_ids: Iterable[str]) -> IndexVersion:
        """A new version: the current one's rows, those of ``doc_ids`` replaced by their fresh contexts'
        segments (none when a document is gone or has no fresh context)."""
        changed = set(doc_ids)
        rows = [row for row in self._current_rows() if row[0].doc_id not in changed]
        for doc_id in sorted(changed):
            rows.extend(self._document_rows(doc_id))
        return self._publish(rows)

    def remove(self, doc_ids: Iterable[str]) -> IndexVersion | None:
        """Drop ``doc_ids``' rows from the current version (a deleted or rewritten document); None when
        there is no index yet."""
        gone = set(doc_ids)
        if self.current() is None:
            return None
        return self._publish([row for row in self._current_rows() if row[0].doc_id not in gone])

    def _document_rows(self, doc_id: str) -> list[tuple[IndexEntry, str]]:
        """The segments of the document's fresh context with their texts ([] if there is none)."""
        try:
            document = self._registry.get_document(doc_id)
        except NotFound:
            return []
        context = self._registry.context_info(doc_id, self.compressor_id)
        if context is None or context.source_sha != document.sha256 or not context.segments:
            return []
        try:
            text = self._registry.read_text(doc_id)
        except NotFound:
            return []
        return [(IndexEntry(doc_id, context.source_sha, s), indexed_text(text, s)) for s in context.segments]

    def _current_rows(self) -> list[tuple[IndexEntry, str]]:
        version = self.current()
        if version is None:
            return []
        prefix = keys.index_version_prefix(self.tenant, self.compressor_id, version.build_id)
        entries = _entries_from_json(json.loads(self._store.get_bytes(prefix + ENTRIES_FILE)))
        texts = json.loads(gzip.decompress(self._store.get_bytes(prefix + TEXTS_FILE)))
        if len(texts) != len(entries):
            raise Internal(
                f"retrieval index build {version.build_id!r} has {len(texts)} texts for {len(entries)} rows"
            )
        return list(zip(entries, texts, strict=True))

    def _publish(self, rows: list[tuple[IndexEntry, str]]) -> IndexVersion:
        """Write a build of ``rows``, point ``current.json`` at it, then remove builds older than the one
        it replaced (a reader may still be loading that one)."""
        if self._max_segments is not None and len(rows) > self._max_segments:
            raise ResourceExhausted(
                f"tenant {self.tenant!r}: {len(rows)} segments to index, over the limit of {self._max_segments} "
                "(limits.max_corpus_segments)"
            )
        rows.sort(key=lambda row: (row[0].doc_id, row[0].segment.index))
        previous = self.current()
        build_id = secrets.token_hex(8)
        prefix = keys.index_version_prefix(self.tenant, self.compressor_id, build_id)
        entries = [entry for entry, _ in rows]
        texts = [text for _, text in rows]
        if rows:
            bm25 = bm25_index(texts)
            with tempfile.TemporaryDirectory(prefix="lloco-index-") as folder:
                bm25.save(folder, show_progress=False)
                for name in BM25_FILES:
                    self._store.put_bytes(prefix + name, Path(folder, name).read_bytes())
        self._store.put_bytes(prefix + TEXTS_FILE, gzip.compress(json_bytes(texts)), "application/gzip")
        self._store.put_bytes(prefix + ENTRIES_FILE, json_bytes(_entries_json(self.compressor_id, entries)))
        version = IndexVersion(
            build_id=build_id,
            compressor_id=self.compressor_id,
            documents=len({entry.doc_id for entry in entries}),
            segments=len(entries),
            built=now(),
        )
        self._store.put_bytes(
            keys.index_current(self.tenant, self.compressor_id),
            json_bytes(
                {
                    "format": version.format,
                    "build_id": version.build_id,
                    "compressor_id": version.compressor_id,
                    "documents": version.documents,
                    "segments": version.segments,
                    "built": version.built.isoformat(),
                }
            ),
            "application/json",
        )
        keep = {build_id} | ({previous.build_id} if previous else set())
        builds = keys.index_prefix(self.tenant, self.compressor_id) + "builds/"
        for old in list(self._store.list_children(builds)):
            if old not in keep:
                self._store.delete_prefix(f"{builds}{old}/")
        log.info(
            "retrieval index published",
            tenant=self.tenant,
            compressor=self.compressor_id,
            build=build_id,
            documents=version.documents,
            segments=version.segments,
        )
        return version


def bm25_index(texts: list[str], index_format: str = INDEX_FORMAT) -> bm25s.BM25:
    """BM25 over ``texts`` (row i = texts[i]), tokenized as `SegmentIndex.search` tokenizes questions for
    a build of ``index_format`` (builds are written in `INDEX_FORMAT`; format 1 is measured against it).
    Term ids in order of first use: bm25s numbers stems in set order, which differs between processes, and
    the follow-up queries break ties between equal term weights by id."""
    tokens = bm25s.tokenize(
        texts,
        stopwords=STOPWORDS,
        stemmer=_stemmer(STEMMED_FORMATS[index_format]),
        return_ids=False,
        show_progress=False,
    )
    vocabulary: dict[str, int] = {}
    ids = [[vocabulary.setdefault(token, len(vocabulary)) for token in row] for row in tokens]
    bm25 = bm25s.BM25()
    bm25.index(bm25s.tokenization.Tokenized(ids=ids, vocab=vocabulary), show_progress=False)
    return bm25


_stemmers = threading.local()


def _stemmer(stem: bool) -> Stemmer.Stemmer | None:
    """The Snowball English stemmer of this thread (a PyStemmer stemmer keeps state between calls), or None."""
    if not stem:
        return None
    stemmer = getattr(_stemmers, "english", None)
    if stemmer is None:
        stemmer = _stemmers.english = Stemmer.Stemmer("english")
    return stemmer


def _row_terms(bm25: bm25s.BM25) -> tuple[np.ndarray, np.ndarray]:
    """Each row's term ids, highest BM25 weight first: (terms, offsets), row r's are
    ``terms[offsets[r]:offsets[r + 1]]``. The transpose of bm25s's term-by-row weight matrix (CSC), made
    once per loaded index for the follow-up queries."""
    scores = bm25.scores
    starts, rows, weights = scores["indptr"], scores["indices"], scores["data"]
    terms = np.repeat(np.arange(len(starts) - 1, dtype=np.int32), np.diff(starts))
    order = np.lexsort((-weights, rows))
    offsets = np.zeros(int(scores["num_docs"]) + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=int(scores["num_docs"])), out=offsets[1:])
    return terms[order], offsets


def indexed_text(text: str, segment: Segment) -> str:
    """The text a segment is indexed by: its span widened to whole words, so a word cut by a segment
    boundary (segments end at token counts, not words) is found in both segments."""
    start, end = segment.char_start, segment.char_end
    while start > 0 and text[start - 1].isalnum():
        start -= 1
    while end < len(text) and text[end].isalnum():
        end += 1
    return text[start:end]


def _entries_json(compressor_id: str, entries: list[IndexEntry]) -> dict[str, Any]:
    return {
        "format": INDEX_FORMAT,
        "compressor_id": compressor_id,
        # [doc_id, source_sha, segment index, token_start, token_end, char_start, char_end]
        "entries": [[e.doc_id, e.source_sha, e.segment.index, *segment_row(e.segment)] for e in entries],
    }


def _entries_from_json(data: dict[str, Any]) -> tuple[IndexEntry, ...]:
    try:
        return tuple(
            IndexEntry(str(doc_id), str(sha), Segment(int(index), *map(int, ranges)))
            for doc_id, sha, index, *ranges in data["entries"]
        )
    except (KeyError, TypeError, ValueError) as error:
        raise Internal(f"retrieval index has broken entries ({error!r})") from error


__all__ = ["IndexEntry", "IndexVersion", "SegmentHit", "SegmentIndex", "TenantIndex"]
