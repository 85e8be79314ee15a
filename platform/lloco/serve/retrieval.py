"""Corpus queries at the edge: which segments of a tenant's compressed documents a question gets.

A query with ``retrieval`` set names no documents: the tenant's retrieval index (``lloco.registry.index``,
one per compressor) scores every indexed segment against the question; the best ``top_k`` whose document
still has the text they were compressed from, within the context budget, are prepended (their own ``k``
summary vectors each, grouped by document, in segment order) and cited in the reply.

Loaded indexes are cached per replica under the tenant's uid, compressor and build id (immutable); the
pointer to the current build is read again after ``ttl_s``, as the edge's other registry lookups are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lloco.errors import FailedPrecondition, InvalidArgument, NotFound
from lloco.registry import DocumentInfo, Registry, Segment
from lloco.registry.index import SegmentHit, SegmentIndex
from lloco.serve.caches import LruCache

OVER_FETCH = 4  # hits scored per segment asked for: room for those of deleted or rewritten documents


@dataclass(frozen=True)
class Retrieved:
    """What a corpus query prepends: ``doc_ids`` in order, for each the segments taken (in order; the
    engine's `EngineRequest.segments`), and the citations in the same order (document, segment, score)."""

    doc_ids: tuple[str, ...]
    segments: tuple[tuple[Segment, ...], ...]
    hits: tuple[SegmentHit, ...]


def check_retrieval(top_k: int, context_budget: int, max_k: int, default_k: int) -> tuple[int, int | None]:
    """The request's ``top_k`` (0: ``default_k``) and budget (0: None, no limit), or InvalidArgument."""
    if top_k < 0 or top_k > max_k:
        raise InvalidArgument(f"retrieval.top_k must be 0 (the default, {default_k}) to {max_k}, got {top_k}")
    if context_budget < 0:
        raise InvalidArgument(f"retrieval.context_budget must be >= 0 (0: no limit), got {context_budget}")
    return top_k or min(default_k, max_k), context_budget or None


def select(
    hits: list[SegmentHit],
    current: Callable[[str], DocumentInfo | None],
    top_k: int,
    budget: int | None,
    vectors_per_segment: int,
) -> Retrieved:
    """The best ``top_k`` hits whose document is current (``current(doc_id)``'s sha256 is the one the
    segment was compressed from; None: deleted) and whose ``vectors_per_segment`` fit in ``budget``,
    grouped by document (best document first), each document's segments in order.

    Raises InvalidArgument when the budget cannot hold one segment."""
    if budget is not None and budget < vectors_per_segment:
        raise InvalidArgument(
            f"retrieval.context_budget {budget} cannot hold one segment ({vectors_per_segment} vectors)"
        )
    limit = top_k if budget is None else min(top_k, budget // vectors_per_segment)
    shas: dict[str, str | None] = {}
    chosen: list[SegmentHit] = []
    for hit in hits:
        doc_id = hit.entry.doc_id
        if doc_id not in shas:
            document = current(doc_id)
            shas[doc_id] = None if document is None else document.sha256
        if shas[doc_id] == hit.entry.source_sha:
            chosen.append(hit)
            if len(chosen) == limit:
                break
    rank = {doc_id: i for i, doc_id in enumerate(dict.fromkeys(hit.entry.doc_id for hit in chosen))}
    ordered = sorted(chosen, key=lambda hit: (rank[hit.entry.doc_id], hit.entry.segment.index))
    doc_ids = tuple(rank)
    segments = tuple(
        tuple(hit.entry.segment for hit in ordered if hit.entry.doc_id == doc_id) for doc_id in doc_ids
    )
    return Retrieved(doc_ids, segments, tuple(ordered))


class IndexCache:
    """Loaded retrieval indexes of this replica. Which build is a tenant's current one is re-read after
    ``ttl_s``; builds are immutable, so a loaded one is reused until the pointer names another (at most
    ``max_indexes`` of each, LRU). Thread-safe; loading runs in the caller's thread (a store lane)."""

    def __init__(self, ttl_s: float, max_indexes: int = 64) -> None:
        def one(_: SegmentIndex) -> int:
            return 1

        self._current: LruCache[tuple[str, str, str], SegmentIndex] = LruCache(max_indexes, one, ttl_s)
        self._builds: LruCache[tuple[str, str, str, str], SegmentIndex] = LruCache(max_indexes, one)

    def get(self, registry: Registry, compressor_id: str) -> SegmentIndex:
        """The tenant's current index for ``compressor_id``.

        Raises FailedPrecondition when the tenant has none yet (nothing compressed)."""
        key = (registry.tenant, registry.uid, compressor_id)
        index = self._current.get(key)
        if index is not None:
            return index
        tenant_index = registry.index(compressor_id)
        version = tenant_index.current()
        if version is None:
            raise FailedPrecondition(
                f"tenant {registry.tenant!r} has no retrieval index yet: compress its documents first"
            )
        index = self._builds.get((*key, version.build_id))
        if index is None:
            try:
                index = tenant_index.load(version)
            except NotFound:  # replaced while we read it: take the newer one
                index = tenant_index.load()
            assert (
                index is not None
            )  # a current pointer existed a moment ago and builds are never unpublished
            build = index.version.build_id
            self._builds.drop(lambda held: held[:3] == key and held[3] != build)  # superseded builds
            self._builds.put((*key, build), index)
        self._current.put(key, index)
        return index

    def forget_tenant(self, tenant: str) -> None:
        self._current.drop(lambda key: key[0] == tenant)
        self._builds.drop(lambda key: key[0] == tenant)
