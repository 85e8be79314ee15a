"""Corpus mode of the eval: questions asked of one tenant's whole corpus, as a corpus query serves them.

HotpotQA's held-out questions (the test side of the committed or fetched dev-distractor file, never a
benchmark test split; or the training side's, which is what retrieval is tuned on) against one corpus holding
every paragraph of those questions (each a document) plus distractor paragraphs of the file up to
``min_documents``. Every paragraph is compressed once, cut into the compressor's segments
(`tokenize_segments`), and indexed by the platform's own BM25 (`bm25_index` over `indexed_text`); each
question retrieves as the edge does (`SegmentIndex.search`, `select`) and is answered over its segments' own
summary vectors (`segment_vectors`), with the compressor's reader as the compressed mode is.

Rows: ``retrieval@K`` for each asked ``K`` (top-K segments), ``retrieval_prev@K`` (the first K's segments,
each with its document's preceding segment's vectors too: the alternative to a segment's own vectors alone),
``oracle`` (the gold paragraphs whole), ``none`` (no context). Scores: answer EM/F1 with a bootstrap interval
of F1, each retrieval row's F1 as a share of the oracle row's (paired interval over the same questions), and
recall@K of the gold paragraphs (a gold paragraph counts when one of its segments is retrieved).
"""

from __future__ import annotations

import datetime
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lloco.compress.steps import tokenize_segments
from lloco.errors import InvalidArgument
from lloco.eval.metrics import bootstrap_interval, exact_match, f1_score
from lloco.eval.run import Evaluator, ModeResult, _Request
from lloco.finetune.datasets import HOTPOT_FILE, HOTPOT_TRAIN_FRACTION, read_json
from lloco.model import chat_prompt
from lloco.registry import Segment
from lloco.registry.index import (
    FEEDBACK_HITS,
    INDEX_FORMAT,
    IndexEntry,
    IndexVersion,
    SegmentIndex,
    bm25_index,
    indexed_text,
)
from lloco.serve.engine_core import segment_vectors
from lloco.serve.retrieval import OVER_FETCH, Retrieved, select

REFERENCE_MODES = ("oracle", "none")
CORPUS_SIDES = ("held-out", "train")  # which side of the dev file's split the questions come from
QA_INSTRUCTION = "Answer the question with a short phrase from the documents."


@dataclass(frozen=True)
class CorpusQuestion:
    question: str
    answer: str
    gold: tuple[str, ...]  # the paragraphs (document ids) its supporting facts come from


@dataclass(frozen=True)
class Corpus:
    documents: dict[str, str]
    questions: list[CorpusQuestion]


def hotpotqa_corpus(
    data_dir: Path, limit: int | None, min_documents: int, seed: int = 0, side: str = "held-out"
) -> Corpus:
    """The first ``limit`` held-out questions, their paragraphs, and distractor paragraphs of the whole file
    (seeded draw; only the questions are held out) until the corpus holds ``min_documents`` (or every
    paragraph there is). ``side="train"`` asks the training side's questions instead, built the same way:
    what retrieval is tuned on, so the held-out figures are not."""
    questions = read_json(data_dir / HOTPOT_FILE)
    if side not in CORPUS_SIDES:
        raise InvalidArgument(f"corpus side must be one of {CORPUS_SIDES}, got {side!r}")
    cut = int(len(questions) * HOTPOT_TRAIN_FRACTION)
    side_questions = questions[cut:] if side == "held-out" else questions[:cut]
    ids: dict[str, str] = {}

    def doc_id(paragraph: str) -> str:
        return ids.setdefault(paragraph, f"p{len(ids):05d}")

    chosen = side_questions[:limit] if limit is not None else side_questions
    asked = []
    for question in chosen:
        own = {title: doc_id(f"{title}\n{''.join(s).strip()}") for title, s in question["context"]}
        gold = tuple(dict.fromkeys(own[t] for t, _ in question["supporting_facts"] if t in own))
        asked.append(CorpusQuestion(question["question"].strip(), question["answer"].strip(), gold))
    pool = [f"{title}\n{''.join(s).strip()}" for q in questions for title, s in q["context"]]
    random.Random(seed).shuffle(pool)
    for paragraph in pool:
        if len(ids) >= min_documents:
            break
        doc_id(paragraph)
    return Corpus({i: paragraph for paragraph, i in ids.items()}, asked)


def corpus_modes(top_ks: Sequence[int]) -> list[str]:
    """The rows of a corpus run asking ``top_ks`` (in order), as `run_corpus` returns them."""
    if not top_ks or any(k < 1 for k in top_ks) or len(set(top_ks)) != len(top_ks):
        raise InvalidArgument(f"corpus top-k values must be distinct and >= 1, got {list(top_ks)}")
    return [*(f"retrieval@{k}" for k in top_ks), f"retrieval_prev@{top_ks[0]}", *REFERENCE_MODES]


def run_corpus(
    evaluator: Evaluator, corpus: Corpus, top_ks: Sequence[int], max_new_tokens: int
) -> list[ModeResult]:
    """The rows of ``corpus`` (`corpus_modes`), answered greedily by ``evaluator``'s model."""
    modes = corpus_modes(top_ks)
    compressor, tokenizer = evaluator.compressor, evaluator.tokenizer
    k = compressor.k
    started = time.perf_counter()
    tables = {
        d: tokenize_segments(tokenizer, text, compressor.segment_len) for d, text in corpus.documents.items()
    }
    contexts = evaluator._compress({d: ids for d, (ids, _) in tables.items()})  # noqa: SLF001 - the eval's own batching
    index = corpus_index(corpus, {d: segments for d, (_, segments) in tables.items()})
    prepared_s = time.perf_counter() - started

    results, f1s = [], {}
    for mode in modes:
        started = time.perf_counter()
        kind, _, top_k = mode.partition("@")
        requests, recalls = [], []
        for question in corpus.questions:
            prompt = chat_prompt(tokenizer, f"{question.question}\n\n{QA_INSTRUCTION}")
            gold_tokens = sum(len(tables[d][0]) for d in question.gold)
            if kind == "none":
                requests.append(_Request(None, prompt, 0, gold_tokens))
                continue
            if kind == "oracle":
                picked: list[tuple[str, tuple[Segment, ...]]] = [(d, tables[d][1]) for d in question.gold]
            else:
                retrieved = retrieve(index, question.question, int(top_k))
                picked = list(zip(retrieved.doc_ids, retrieved.segments, strict=True))
                if kind == "retrieval_prev":
                    picked = [(d, _with_preceding(tables[d][1], segments)) for d, segments in picked]
                recalls.append(gold_recall(question, retrieved))
            parts = [segment_vectors(contexts[d], segments, k) for d, segments in picked]
            prefix = torch.cat(parts) if parts else None
            tokens = sum(s.token_end - s.token_start for _, segments in picked for s in segments)
            requests.append(_Request(prefix, prompt, 0 if prefix is None else prefix.shape[0], tokens))
        texts, latencies = evaluator._generate(requests, max_new_tokens, evaluator.reader)  # noqa: SLF001
        result = ModeResult("hotpotqa-corpus", f"hotpotqa-corpus-{len(corpus.documents)}", mode, "qa")
        count = len(requests)
        f1s[mode] = [f1_score(t, [q.answer]) for t, q in zip(texts, corpus.questions, strict=True)]
        low, high = bootstrap_interval(f1s[mode])
        result.queries = count
        result.scores = {
            "em": 100
            * sum(exact_match(t, [q.answer]) for t, q in zip(texts, corpus.questions, strict=True))
            / count,
            "f1": 100 * sum(f1s[mode]) / count,
            "f1_low": 100 * low,
            "f1_high": 100 * high,
        }
        if recalls:
            result.scores[f"recall_at_{top_k}"] = 100 * sum(recalls) / len(recalls)
        result.context_tokens = sum(r.context_tokens for r in requests) / count
        result.document_tokens = sum(r.document_tokens for r in requests) / count
        result.latency_s = sum(latencies) / count
        result.seconds = time.perf_counter() - started + (prepared_s if mode == modes[0] else 0.0)
        result.predictions = [
            {"question": q.question, "answer": q.answer, "prediction": t}
            for q, t in zip(corpus.questions, texts, strict=True)
        ]
        results.append(result)
    oracle = f1s["oracle"]
    for result in results:
        if result.mode.startswith("retrieval") and sum(oracle) > 0:
            low, high = bootstrap_interval(f1s[result.mode], oracle)
            result.scores |= {
                "f1_vs_oracle": sum(f1s[result.mode]) / sum(oracle),
                "f1_vs_oracle_low": low,
                "f1_vs_oracle_high": high,
            }
    return results


def corpus_index(
    corpus: Corpus, tables: dict[str, tuple[Segment, ...]], index_format: str = INDEX_FORMAT
) -> SegmentIndex:
    """The platform's index of every segment of ``corpus`` (``tables``: each document's segments), as a
    tenant's build holds it (`bm25_index` over `indexed_text`)."""
    rows = [
        (IndexEntry(d, "", segment), indexed_text(corpus.documents[d], segment))
        for d, segments in tables.items()
        for segment in segments
    ]
    now = datetime.datetime.now(datetime.UTC)
    version = IndexVersion("eval", "eval", len(tables), len(rows), now, index_format)
    return SegmentIndex(version, tuple(e for e, _ in rows), bm25_index([t for _, t in rows], index_format))


def retrieve(index: SegmentIndex, question: str, top_k: int, feedback_hits: int = FEEDBACK_HITS) -> Retrieved:
    """The segments a corpus query of ``question`` prepends, as the edge chooses them (`SegmentIndex.search`
    for ``top_k * OVER_FETCH`` hits, then `select`; every corpus paragraph is current, no budget)."""
    hits = index.search(question, top_k * OVER_FETCH, feedback_hits)
    return select(hits, lambda _: _CURRENT, top_k, None, 1)


def gold_recall(question: CorpusQuestion, retrieved: Retrieved) -> float:
    """The share of the question's gold paragraphs with a retrieved segment."""
    return len(set(question.gold) & set(retrieved.doc_ids)) / max(1, len(question.gold))


def _with_preceding(table: tuple[Segment, ...], segments: tuple[Segment, ...]) -> tuple[Segment, ...]:
    """``segments`` and each one's preceding segment of the document, in order (the alternative to a segment's
    own vectors alone: with accumulation its vectors were computed after the preceding summaries)."""
    indices = sorted({i for s in segments for i in (s.index - 1, s.index) if i >= 0})
    return tuple(table[i] for i in indices)


@dataclass(frozen=True)
class _Current:
    """What `select` reads of a document: every corpus paragraph is current (sha256 as indexed)."""

    sha256: str


_CURRENT = _Current("")


def write_corpus_report(directory: Path, results: list[ModeResult], meta: dict[str, Any]) -> str:
    """``corpus.json`` (meta, rows, predictions) and ``corpus.md`` (the table) in ``directory``; returns the
    markdown."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [
        {k: v for k, v in asdict(r).items() if k not in ("predictions", "recipe")} for r in results
    ]  # no LoRA
    predictions = {r.mode: r.predictions for r in results}
    (directory / "corpus.json").write_text(
        json.dumps({**meta, "results": rows, "predictions": predictions}, indent=2)
    )
    lines = [
        f"# Corpus eval: {meta.get('base_model', '')} with compressor {meta.get('compressor_id', '')}",
        "",
        f"Command: `{meta.get('command', '')}`",
        "",
        f"{meta.get('questions')} HotpotQA {meta.get('side', 'held-out')} questions against one corpus of "
        f"{meta.get('documents')} paragraphs; scores in percent, F1 with its 95% bootstrap interval; F1 / oracle: "
        "the row's F1 as a share of the oracle row's (paired interval over the same questions); recall@K: gold "
        "paragraphs with a retrieved segment.",
        "",
        "| row | EM | F1 | F1 / oracle | recall@K | ctx vectors/query | doc tokens/query | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        scores = r.scores
        recall = next((f"{v:.1f}" for name, v in scores.items() if name.startswith("recall_at_")), "")
        share = (
            f"{scores['f1_vs_oracle']:.2f}x [{scores['f1_vs_oracle_low']:.2f}, {scores['f1_vs_oracle_high']:.2f}]"
            if "f1_vs_oracle" in scores
            else ""
        )
        lines.append(
            f"| {r.mode} | {scores['em']:.1f} | {scores['f1']:.1f} [{scores['f1_low']:.1f}, {scores['f1_high']:.1f}] "
            f"| {share} | {recall} | {r.context_tokens:.0f} | {r.document_tokens:.0f} | {r.seconds:.1f} |"
        )
    markdown = "\n".join(lines) + "\n"
    (directory / "corpus.md").write_text(markdown)
    return markdown
