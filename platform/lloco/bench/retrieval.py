"""Retrieval benchmark, on CPU: what a corpus query adds at the edge, and how often it finds the gold paragraphs.

  python -m lloco.bench.retrieval --out DIR                          # latency, 10,000 segments (issue 21's size)
  python -m lloco.bench.retrieval --out DIR --segments 500           # a smoke run
  python -m lloco.bench.retrieval --out DIR --recall --data-dir DIR  # recall@2/4/8 on HotpotQA corpora

Latency: one tenant's index of ``--segments`` segments of ``--segment-words`` words each (synthetic text: words
drawn from a Zipf-like vocabulary, as natural text's are), built by the index's own code (`bm25_index`, the rows
a `SegmentIndex` serves). A query's added work is timed as the edge does it once the index is loaded (the
`IndexCache` hit): `SegmentIndex.search` of a ``--question-words`` question for ``top_k * OVER_FETCH`` hits,
then `select` (documents current, budget, document order); p50/p99 in ms over ``--queries`` questions, for the
question's round alone (``feedback_hits=0``) and as served (with the follow-up queries). The build time is
reported beside them.

Recall (``--recall``): the eval's corpus (`hotpotqa_corpus`: ``--questions`` HotpotQA questions with their
paragraphs plus distractor paragraphs up to each ``--documents`` size, from the dev file in ``--data-dir``),
each paragraph cut into ``--segment-len``-token segments by the default model's tokenizer (or ``--tokenizer``)
and indexed as a tenant's build is; each question retrieves as the edge does (`retrieve`) and scores the share
of its gold paragraphs with a retrieved segment, at top_k 2, 4 and 8 (and the time of the top_k 8 searches).
Both sides of the file's split: ``train`` (what the retrieval's constants were tuned on) and ``held-out`` (the
figure to quote). Three retrievers: the format-1 index (stop words only, the question alone: retrieval before
stems and follow-ups), the current format with the question alone, and as served. JSON and markdown go to --out.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

from lloco.bench.common import percentile
from lloco.bench.report import write_report
from lloco.compress.steps import tokenize_segments
from lloco.eval.corpus import CORPUS_SIDES, corpus_index, gold_recall, hotpotqa_corpus, retrieve
from lloco.registry import DocumentInfo, Segment
from lloco.registry.index import (
    FEEDBACK_HITS,
    FEEDBACK_TERMS,
    INDEX_FORMAT,
    QUESTION_WEIGHT,
    IndexEntry,
    IndexVersion,
    SegmentIndex,
    bm25_index,
)
from lloco.serve.retrieval import OVER_FETCH, select

VOCABULARY = 20_000
SEGMENTS_PER_DOCUMENT = 8
TOP_K = 8
K = 50  # the paper's summary vectors per segment
RECALL_AT = (2, 4, 8)
FORMAT_1 = "lloco-index/1"
RETRIEVERS = {  # name: (index format, feedback hits)
    "format 1, question only": (FORMAT_1, 0),
    "stems, question only": (INDEX_FORMAT, 0),
    "stems + follow-ups (served)": (INDEX_FORMAT, FEEDBACK_HITS),
}


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


def latency(args: argparse.Namespace) -> dict[str, Any]:
    """The added ms per query on the synthetic index, the question's round alone and as served."""
    started = time.perf_counter()
    index, documents = build(args.segments, args.segment_words, seed=0)
    build_s = time.perf_counter() - started
    rng = random.Random(1)
    questions = [words(rng, args.question_words) for _ in range(args.queries)]
    index.search(questions[0], TOP_K * OVER_FETCH)  # first call: bm25s's lazy setup
    rows: dict[str, Any] = {}
    for name, feedback_hits in (("question only", 0), ("served (with follow-ups)", FEEDBACK_HITS)):
        times_ms, cited = [], []
        for question in questions:
            t0 = time.perf_counter()
            hits = index.search(question, TOP_K * OVER_FETCH, feedback_hits)
            retrieved = select(hits, documents.__getitem__, TOP_K, None, K)
            times_ms.append((time.perf_counter() - t0) * 1e3)
            cited.append(len(retrieved.hits))
        rows[name] = {
            "p50": round(percentile(times_ms, 50), 3),
            "p99": round(percentile(times_ms, 99), 3),
            "max": round(max(times_ms), 3),
            "mean_segments_cited": round(sum(cited) / len(cited), 2),
        }
    return {
        "segments": args.segments,
        "documents": len(documents),
        "segment_words": args.segment_words,
        "question_words": args.question_words,
        "queries": args.queries,
        "build_s": round(build_s, 2),
        "added_ms": rows,
    }


def recall(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Recall@2/4/8 of each retriever on each side's corpus of each size, and its search time at top_k 8."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer or _default_tokenizer_dir()))
    results = []
    for documents in args.documents:
        for side in CORPUS_SIDES[::-1]:  # train (tuned on) first
            corpus = hotpotqa_corpus(args.data_dir, args.questions, documents, side=side)
            tables = {
                d: tokenize_segments(tokenizer, text, args.segment_len)[1]
                for d, text in corpus.documents.items()
            }
            for name, (index_format, feedback_hits) in RETRIEVERS.items():
                index = corpus_index(corpus, tables, index_format)
                row: dict[str, Any] = {
                    "side": side,
                    "retriever": name,
                    "questions": len(corpus.questions),
                    "documents": len(corpus.documents),
                    "segments": len(index.entries),
                }
                for k in RECALL_AT:
                    shares, times_ms = [], []
                    for question in corpus.questions:
                        started = time.perf_counter()
                        retrieved = retrieve(index, question.question, k, feedback_hits)
                        times_ms.append((time.perf_counter() - started) * 1e3)
                        shares.append(gold_recall(question, retrieved))
                    row[f"recall@{k}"] = round(sum(shares) / len(shares), 4)
                row["search_ms_p50"] = round(percentile(times_ms, 50), 3)  # at top_k 8
                print(row, flush=True)
                results.append(row)
    return results


def _default_tokenizer_dir() -> Path:
    from lloco.config import Settings
    from lloco.model.loading import default_model_dir

    return default_model_dir(Settings().model.cache_dir)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--segments", type=int, default=10_000)
    parser.add_argument("--segment-words", type=int, default=400)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--question-words", type=int, default=10)
    parser.add_argument("--recall", action="store_true", help="also recall@k on HotpotQA corpora")
    parser.add_argument("--data-dir", type=Path, help="holds the HotpotQA dev file (`lloco data fetch`)")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--documents", type=int, nargs="+", default=[1000], help="corpus sizes (paragraphs)")
    parser.add_argument("--segment-len", type=int, default=512)
    parser.add_argument("--tokenizer", type=Path, help="default: the default model's (model.cache_dir)")
    parser.add_argument("--name", help="default: retrieval-cpu, with --recall retrieval-recall-cpu")
    args = parser.parse_args(argv)
    if args.recall and args.data_dir is None:
        parser.error("--recall needs --data-dir")

    result: dict[str, Any] = {
        "command": "python -m lloco.bench.retrieval " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": f"CPU ({os.cpu_count()} cores)",
        "machine": f"{platform.processor() or platform.machine()}, searches on one thread (n_threads=1)",
        "bm25s": importlib.metadata.version("bm25s"),
        "index_format": INDEX_FORMAT,
        "search": {
            "feedback_hits": FEEDBACK_HITS,
            "feedback_terms": FEEDBACK_TERMS,
            "question_weight": QUESTION_WEIGHT,
        },
        "top_k": TOP_K,
        "hits_scored": TOP_K * OVER_FETCH,
        **latency(args),
    }
    if args.recall:
        result["recall"] = recall(args)
    write_report(
        args.out,
        args.name or ("retrieval-recall-cpu" if args.recall else "retrieval-cpu"),
        result,
        _markdown(result),
    )
    return result


def _markdown(result: dict[str, Any]) -> str:
    search = result["search"]
    lines = [
        "# Retrieval on CPU" if "recall" in result else "# Retrieval latency (CPU)",
        "",
        f"`{result['command']}` on {result['date']}, {result['device']}, {result['machine']}, "
        f"bm25s {result['bm25s']}, index {result['index_format']}; search: {search['feedback_hits']} "
        f"follow-up queries of {search['feedback_terms']} hit terms, question weight "
        f"{search['question_weight']}.",
        "",
    ]
    if "recall" in result:
        lines += [
            "## Recall of the gold paragraphs (HotpotQA corpus)",
            "",
            "| side | retriever | questions | documents | segments | recall@2 | recall@4 | recall@8 | "
            "ms p50 (top_k 8) |",
            "|---|---|---|---|---|---|---|---|---|",
            *(
                f"| {r['side']} | {r['retriever']} | {r['questions']} | {r['documents']} | {r['segments']} | "
                f"{r['recall@2']:.3f} | {r['recall@4']:.3f} | {r['recall@8']:.3f} | {r['search_ms_p50']} |"
                for r in result["recall"]
            ),
            "",
            "Recall: the share of a question's gold paragraphs with a retrieved segment, averaged over the "
            "questions; ms: search and selection of one question on that corpus (real text).",
            "",
            "## Added time per query",
            "",
        ]
    lines += [
        f"One tenant's index: {result['segments']} segments ({result['documents']} documents, "
        f"{result['segment_words']} words each), built in {result['build_s']} s. Each of {result['queries']} "
        f"questions of {result['question_words']} words: search for {result['hits_scored']} hits, then select "
        f"top_k={result['top_k']}.",
        "",
        "| search | p50 ms | p99 ms | max ms | segments cited (mean) |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {row['p50']} | {row['p99']} | {row['max']} | {row['mean_segments_cited']} |"
            for name, row in result["added_ms"].items()
        ),
        "",
        "Not included: loading the index on a cache miss (once per TTL per replica) and the document lookups "
        "(cached at the edge).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
