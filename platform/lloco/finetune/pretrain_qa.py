"""Question-answering examples for the compressor's QA stage: answer from a document's summaries alone.

The LM objectives teach the summaries to predict and reconstruct text; this stage trains them (and the
reader, when there is one) on what a tenant asks: a document is compressed, the decoder sees only its
summary vectors and ``chat_prompt(qa_question(question))``, and the loss is on the answer tokens.

Sources, all *train* splits (``lloco.finetune.datasets``): SQuAD's train articles 0-24 (an article cut
into runs of whole paragraphs of at most ``chunk_tokens``, each question asked of the first run that
contains its answer) and, only when asked for, HotpotQA-long (the train 80% of dev, each question's gold
paragraphs in a haystack of 1k/2k/4k tokens, lengths taken in turn). HotpotQA is opt-in because the only
copy here is its dev set, from which LongBench's HotpotQA test task was sampled: a compressor that ships
must not learn from a published benchmark's test questions. Planted-fact documents can be added by the
caller (``extra``). A seeded hash of each question holds out ``held_out_fraction`` of them for the probe
that ``lloco.finetune.pretrain`` reports.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lloco.errors import InvalidArgument
from lloco.finetune.datasets import load_hotpotqa_long, load_squad
from lloco.model.prompt import chat_prompt, qa_question

HOTPOT_LENGTHS = (1024, 2048, 4096)
FORMAT = "lloco-pretrain-qa/1"


@dataclass(frozen=True)
class QAText:
    """One question about one document, as text."""

    source: str
    document: str
    question: str
    answer: str


@dataclass(frozen=True)
class QAExamples:
    """Tokenized QA examples: per example the document tokens, the prompt and the answer (+ EOS)."""

    documents: list[np.ndarray]
    prompts: list[list[int]]
    answers: list[list[int]]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.documents)

    def subset(self, indices: Iterable[int]) -> QAExamples:
        chosen = list(indices)
        return QAExamples(
            [self.documents[i] for i in chosen],
            [self.prompts[i] for i in chosen],
            [self.answers[i] for i in chosen],
            [self.sources[i] for i in chosen],
        )

    def spread(self, count: int) -> QAExamples:
        """Up to ``count`` examples taken from each source in turn (a probe that covers every source)."""
        by_source: dict[str, list[int]] = {}
        for index, source in enumerate(self.sources):
            by_source.setdefault(source, []).append(index)
        queues = [list(reversed(indices)) for _, indices in sorted(by_source.items())]
        chosen: list[int] = []
        while len(chosen) < count and any(queues):
            for queue in queues:
                if queue and len(chosen) < count:
                    chosen.append(queue.pop())
        return self.subset(sorted(chosen))

    def save(self, path: Path) -> None:
        """One .npz: documents packed with offsets, prompts and answers as JSON."""
        offsets = np.cumsum([0, *map(len, self.documents)])
        packed = np.concatenate(self.documents) if self.documents else np.zeros(0, np.int32)
        dtype = (
            np.uint16 if packed.size == 0 or packed.max() < 2**16 else np.int32
        )  # half the file when it fits
        meta = {"format": FORMAT, "prompts": self.prompts, "answers": self.answers, "sources": self.sources}
        np.savez_compressed(path, tokens=packed.astype(dtype), offsets=offsets, meta=json.dumps(meta))

    @classmethod
    def load(cls, path: Path) -> QAExamples:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            tokens, offsets = data["tokens"], data["offsets"]
        documents = [tokens[a:b].astype(np.int32) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        return cls(documents, meta["prompts"], meta["answers"], meta["sources"])


def hotpot_texts(
    data_dir: Path, count_tokens: Callable[[str], int], limit: int | None, seed: int
) -> list[QAText]:
    """HotpotQA train questions in haystacks of ``HOTPOT_LENGTHS`` tokens, lengths taken in turn."""
    texts: list[QAText] = []
    for turn, length in enumerate(HOTPOT_LENGTHS):
        qaset = load_hotpotqa_long(data_dir, "train", length, count_tokens, limit=limit, seed=seed)
        for row in qaset.rows[turn :: len(HOTPOT_LENGTHS)]:
            texts.append(QAText("hotpotqa", qaset.documents[row.doc_ids[0]], row.question, row.answer))
    return texts


def squad_texts(data_dir: Path, count_tokens: Callable[[str], int], chunk_tokens: int) -> list[QAText]:
    """SQuAD train articles in runs of whole paragraphs; each question goes to the first run holding its answer."""
    qaset = load_squad(data_dir, "train")
    texts: list[QAText] = []
    for doc_id, document in qaset.documents.items():
        chunks: list[str] = []
        current: list[str] = []
        size = 0
        for paragraph in document.split("\n\n"):
            cost = count_tokens(paragraph)
            if current and size + cost > chunk_tokens:
                chunks.append("\n\n".join(current))
                current, size = [], 0
            current.append(paragraph)
            size += cost
        if current:
            chunks.append("\n\n".join(current))
        for row in qaset.rows:
            if row.doc_ids[0] != doc_id:
                continue
            holder = next((chunk for chunk in chunks if row.answer in chunk), None)
            if holder is not None:
                texts.append(QAText("squad", holder, row.question, row.answer))
    return texts


def tokenize(texts: list[QAText], tokenizer: Any, max_document_tokens: int) -> QAExamples:
    """Token ids of each text (documents without special tokens, cut to ``max_document_tokens``)."""
    eos = tokenizer.eos_token_id
    documents = tokenizer([t.document for t in texts], add_special_tokens=False)["input_ids"]
    answers = tokenizer([t.answer for t in texts], add_special_tokens=False)["input_ids"]
    return QAExamples(
        [np.asarray(doc[:max_document_tokens], dtype=np.int32) for doc in documents],
        [chat_prompt(tokenizer, qa_question(t.question)) for t in texts],
        [[*answer, eos] for answer in answers],
        [t.source for t in texts],
    )


def held_out(text: QAText, fraction: float, seed: int) -> bool:
    """A stable seeded choice by the question's text."""
    digest = hashlib.sha256(f"{seed}:{text.source}:{text.question}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def build_qa_examples(
    data_dir: Path,
    tokenizer: Any,
    max_document_tokens: int,
    held_out_fraction: float = 0.05,
    sources: tuple[str, ...] = ("squad",),
    hotpot_limit: int | None = None,
    squad_chunk_tokens: int = 1536,
    extra: Iterable[QAText] = (),
    seed: int = 0,
) -> tuple[QAExamples, QAExamples]:
    """Train and held-out QA examples from the train splits of ``sources`` ("squad", "hotpotqa") under
    ``data_dir``, and ``extra``.

    Raises:
        InvalidArgument: an unknown source.
    """
    unknown = set(sources) - {"squad", "hotpotqa"}
    if unknown:
        raise InvalidArgument(f"unknown QA sources {sorted(unknown)}; choose from squad, hotpotqa")

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    texts = [
        *(hotpot_texts(data_dir, count_tokens, hotpot_limit, seed) if "hotpotqa" in sources else []),
        *(squad_texts(data_dir, count_tokens, squad_chunk_tokens) if "squad" in sources else []),
        *extra,
    ]
    examples = tokenize(texts, tokenizer, max_document_tokens)
    flags = [held_out(text, held_out_fraction, seed) for text in texts]
    train = examples.subset(i for i, flag in enumerate(flags) if not flag)
    return train, examples.subset(i for i, flag in enumerate(flags) if flag)


def cached_qa_examples(
    cache: Path | None, data_dir: Path | None, tokenizer: Any, max_document_tokens: int, seed: int = 0
) -> tuple[QAExamples | None, QAExamples | None]:
    """Train and held-out examples from ``cache`` (``.train.npz``/``.held_out.npz`` beside it) when it holds
    them, else built from ``data_dir`` (and written to ``cache`` when given); (None, None) without either."""
    if cache is not None and cache.with_suffix(".train.npz").is_file():
        return QAExamples.load(cache.with_suffix(".train.npz")), QAExamples.load(
            cache.with_suffix(".held_out.npz")
        )
    if data_dir is None:
        return None, None
    train, held = build_qa_examples(data_dir, tokenizer, max_document_tokens, seed=seed)
    if cache is not None:
        train.save(cache.with_suffix(".train.npz"))
        held.save(cache.with_suffix(".held_out.npz"))
    return train, held
