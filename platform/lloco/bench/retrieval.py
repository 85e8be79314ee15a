"""Retrieval latency benchmark: what a corpus query adds at the edge, on CPU.

  python -m lloco.bench.retrieval --out DIR                 # 10,000 segments (issue 21's size)
  python -m lloco.bench.retrieval --out DIR --segments 500  # a smoke run

One tenant's index of ``--segments`` segments of ``--segment-words`` words each (synthetic text: words drawn
from a Zipf-like vocabulary, as natural text's are), built by the index's own code (`bm25_index`, the rows a
`SegmentIndex` serves). A query's added work is timed as the edge does it once the index is loaded (the
`IndexCache` hit): `SegmentIndex.search` of a ``--question-words`` question for ``top_k * OVER_FETCH``
hits, then `select` (documents current, budget, document order). p50/p99 in ms over ``--queries``
questions; the build time and the loaded index's size are reported beside them. JSON and markdown go to --out.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

from lloco.bench.common import percentile
from lloco.bench.report import write_report
from lloco.registry import DocumentInfo, Segment
from lloco.registry.index import IndexEntry, IndexVersion, SegmentIndex, bm25_index
from lloco.serve.retrieval import OVER_FETCH, select

VOCABULARY = 20_000
SEGMENTS_PER_DOCUMENT = 8
TOP_K = 8
K = 50  # the paper's summary vectors per segment


def words(rng: random.Random, n: int) -> str:
    """``n`` words of a Zipf-like distribution over ``VOCABULARY`` made-up words."""
    ranks = [min(int(rng.paretovariate(1.0)), VOCABULARY) for _ in range(n)]
    return " ".join(f"w{rank:05d}x{rank % 7}" for rank in ranks)


def build(segments: int, segment_words: int, seed: int) -> tuple[SegmentIndex, dict[str, DocumentInfo]]:
    """An index of ``segments`` synthetic segments, ``SEGMENTS_PER_DOCUMENT`` per document."""
    rng = random.Random(seed)
    texts = [words(rng, segment_words) for _ in range(segments)]
    entries = tuple(
        IndexEntry(
            f"doc-{i // SEGMENTS_PER_DOCUMENT:05d}", "sha", Segment(i % SEGMENTS_PER_DOCUMENT, 0, 1, 0, 1)
        )
        for i in range(segments)
    )
    now = datetime.datetime.now(datetime.UTC)
    documents = {
        entry.doc_id: DocumentInfo(
            tenant="bench", doc_id=entry.doc_id, sha256="sha", bytes=0, tokens=None, created=now, updated=now
        )
        for entry in entries
    }
    version = IndexVersion("bench", "bench", len(documents), segments, now)
    return SegmentIndex(version, entries, bm25_index(texts)), documents


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--segments", type=int, default=10_000)
    parser.add_argument("--segment-words", type=int, default=400)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--question-words", type=int, default=10)
    parser.add_argument("--name", default="retrieval-cpu")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    index, documents = build(args.segments, args.segment_words, seed=0)
    build_s = time.perf_counter() - started
    rng = random.Random(1)
    questions = [words(rng, args.question_words) for _ in range(args.queries)]
    index.search(questions[0], TOP_K * OVER_FETCH)  # first call: bm25s's lazy setup
    times_ms, cited = [], []
    for question in questions:
        t0 = time.perf_counter()
        hits = index.search(question, TOP_K * OVER_FETCH)
        retrieved = select(hits, documents.__getitem__, TOP_K, None, K)
        times_ms.append((time.perf_counter() - t0) * 1e3)
        cited.append(len(retrieved.hits))
    result: dict[str, Any] = {
        "command": "python -m lloco.bench.retrieval " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, CPU, one thread (n_threads=1)",
        "bm25s": importlib.metadata.version("bm25s"),
        "segments": args.segments,
        "documents": len(documents),
        "segment_words": args.segment_words,
        "question_words": args.question_words,
        "queries": args.queries,
        "top_k": TOP_K,
        "hits_scored": TOP_K * OVER_FETCH,
        "build_s": round(build_s, 2),
        "added_ms": {
            "p50": round(percentile(times_ms, 50), 3),
            "p99": round(percentile(times_ms, 99), 3),
            "max": round(max(times_ms), 3),
        },
        "mean_segments_cited": round(sum(cited) / len(cited), 2),
    }
    added = result["added_ms"]
    markdown = "\n".join(
        [
            "# Retrieval latency (CPU)",
            "",
            f"`{result['command']}` on {result['date']}, {result['machine']}, bm25s {result['bm25s']}.",
            "",
            f"One tenant's index: {args.segments} segments ({len(documents)} documents, {args.segment_words} "
            f"words each), built in {result['build_s']} s. Each of {args.queries} questions of "
            f"{args.question_words} words: search for {TOP_K * OVER_FETCH} hits, then select top_k={TOP_K}.",
            "",
            "| added per query | ms |",
            "|---|---|",
            f"| p50 | {added['p50']} |",
            f"| p99 | {added['p99']} |",
            f"| max | {added['max']} |",
            "",
            f"Segments cited per query (mean): {result['mean_segments_cited']}. Not included: loading the "
            "index on a cache miss (once per TTL per replica) and the document lookups (cached at the edge).",
            "",
        ]
    )
    write_report(args.out, args.name, result, markdown)
    return result


if __name__ == "__main__":
    main()
