"""Loaders that turn the public QA sets into tenant documents and dataset rows.

The sets live in a QA data directory (settings ``qa_data_dir``, ``--data-dir`` on the commands) in the
layout ``lloco data fetch`` writes: ``squad-v2-dev.json.gz``, ``hotpotqa-dev-distractor.json.gz`` and
``qmsum/{train,val,test}/*.json``, the upstream files as published (the two single files gzipped). Each loader returns a :class:`QASet`: the documents a tenant ingests (``{doc_id: text}``) and the rows
(``doc_ids``, ``question``, ``answer``) of a dataset over them. Splits follow the project's data README:
SQuAD articles 0-24 train and 25-34 test; QMSum its own train/val/test; HotpotQA (dev only here) its
first 80% of questions train, the rest test. The validation split (what ``lloco eval --split validation``
asks, to choose a finetune recipe without touching the test split) lies inside the train side: SQuAD
articles 20-24, QMSum's own val, the last eighth of HotpotQA's train questions (only those whose gold
paragraphs belong to no other train or test question, in haystacks of their own paragraphs that do
neither); ``hold_out_validation=True`` gives the train side without it. Every loader is deterministic.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lloco.errors import InvalidArgument, NotFound
from lloco.registry import DatasetRow, Registry

SQUAD_FILE = "squad-v2-dev.json.gz"
HOTPOT_FILE = "hotpotqa-dev-distractor.json.gz"
QMSUM_DIR = "qmsum"
QMSUM_SPLITS = ("train", "val", "test")
QMSUM_VALIDATION = "val"  # QMSum's own validation split: what `lloco eval --split validation` asks
# What each set needs in the QA data directory (the names `lloco eval --datasets` takes).
DATA_PATHS = {"squad": SQUAD_FILE, "qmsum": QMSUM_DIR, "hotpotqa": HOTPOT_FILE}

SQUAD_TRAIN_ARTICLES = range(0, 25)
SQUAD_VALIDATION_ARTICLES = range(20, 25)  # inside the train side
SQUAD_TEST_ARTICLES = range(25, 35)
HOTPOT_TRAIN_FRACTION = 0.8  # of the dev file's questions, in file order: the train side; the rest test
HOTPOT_VALIDATION_FRACTION = 1 / 8  # of the train side's questions, its last ones: validation
HOTPOT_TARGET_TOKENS = (4096, 8192, 16384)

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")


@dataclass(frozen=True)
class QASet:
    """Documents to ingest and the dataset rows that ask about them."""

    documents: dict[str, str]
    rows: list[DatasetRow]

    def jsonl(self) -> bytes:
        """The rows in the registry's dataset format, one JSON object a line."""
        return rows_to_jsonl(self.rows)


def rows_to_jsonl(rows: Iterable[DatasetRow]) -> bytes:
    lines = (
        json.dumps(
            {"doc_ids": list(row.doc_ids), "question": row.question, "answer": row.answer}, ensure_ascii=False
        )
        for row in rows
    )
    return "".join(f"{line}\n" for line in lines).encode("utf-8")


def ingest_qaset(
    registry: Registry,
    qaset: QASet,
    dataset: str,
    max_document_bytes: int,
    count_tokens: Callable[[str], int] | None = None,
) -> int:
    """Ingest the documents into a tenant's registry and store the rows as dataset ``dataset``; returns rows."""
    for doc_id, text in qaset.documents.items():
        tokens = count_tokens(text) if count_tokens else None
        registry.ingest_document(doc_id, text.encode("utf-8"), max_bytes=max_document_bytes, tokens=tokens)
    return registry.put_dataset(dataset, qaset.jsonl())


def load_squad(data_dir: Path, split: Split, hold_out_validation: bool = False) -> QASet:
    """SQuAD-long: an article (its paragraphs joined) is a document; answerable questions, first gold answer.

    ``hold_out_validation`` leaves the validation articles out of the train split.
    """
    articles = read_json(data_dir / SQUAD_FILE)["data"]
    indices = {
        "train": SQUAD_TRAIN_ARTICLES,
        "validation": SQUAD_VALIDATION_ARTICLES,
        "test": SQUAD_TEST_ARTICLES,
    }[_check_split(split, SPLITS)]
    if split == "train" and hold_out_validation:
        indices = [index for index in indices if index not in SQUAD_VALIDATION_ARTICLES]
    documents: dict[str, str] = {}
    rows: list[DatasetRow] = []
    for index in indices:
        article = articles[index]
        doc_id = f"squad-{index:02d}"
        documents[doc_id] = "\n\n".join(paragraph["context"] for paragraph in article["paragraphs"])
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                if qa.get("is_impossible") or not qa["answers"]:
                    continue
                answer = qa["answers"][0]["text"].strip()
                if answer:
                    rows.append(DatasetRow(doc_ids=(doc_id,), question=qa["question"].strip(), answer=answer))
    return QASet(documents, rows)


def load_qmsum(data_dir: Path, split: Literal["train", "val", "test"]) -> QASet:
    """QMSum: a meeting transcript ("speaker: utterance" lines) is a document; every query -> its answer."""
    folder = data_dir / QMSUM_DIR / _check_split(split, QMSUM_SPLITS)
    files = sorted(folder.glob("*.json"))
    if not files:
        raise _missing(folder)
    documents: dict[str, str] = {}
    rows: list[DatasetRow] = []
    for path in files:
        meeting = read_json(path)
        doc_id = f"qmsum-{path.stem}"
        documents[doc_id] = "\n".join(
            f"{turn['speaker']}: {turn['content']}" for turn in meeting["meeting_transcripts"]
        )
        for query in [*meeting["general_query_list"], *meeting["specific_query_list"]]:
            answer = query["answer"].strip()
            if answer:
                rows.append(DatasetRow(doc_ids=(doc_id,), question=query["query"].strip(), answer=answer))
    return QASet(documents, rows)


def load_hotpotqa_long(
    data_dir: Path,
    split: Split,
    target_tokens: int,
    count_tokens: Callable[[str], int],
    limit: int | None = None,
    seed: int = 0,
    hold_out_validation: bool = False,
) -> QASet:
    """HotpotQA-long: per question, its gold paragraphs padded with other questions' paragraphs.

    As LongBench and RULER build long multi-hop documents: the question's own distractors and then
    paragraphs drawn from other questions of the same split fill the document up to ``target_tokens``
    (as counted by ``count_tokens``, summed over paragraphs); the gold paragraphs sit at spread depths,
    one in each equal band of the document. Deterministic for a given ``seed``. A validation document
    holds no paragraph (by title) of a test question or of a train question outside the validation
    split (``hotpot_questions``); ``hold_out_validation`` leaves the validation questions out of the
    train split, whose haystacks then hold only the remaining train questions' paragraphs.
    """
    if target_tokens < 256:
        raise InvalidArgument(f"target_tokens must be at least 256, got {target_tokens}")
    questions, excluded = hotpot_questions(read_json(data_dir / HOTPOT_FILE), split, hold_out_validation)
    pool = _paragraph_pool(questions, excluded)
    token_counts: dict[str, int] = {}

    def tokens_of(paragraph: str) -> int:
        if paragraph not in token_counts:
            token_counts[paragraph] = count_tokens(paragraph)
        return token_counts[paragraph]

    documents: dict[str, str] = {}
    rows: list[DatasetRow] = []
    for question in questions[:limit] if limit is not None else questions:
        gold_titles = list(dict.fromkeys(title for title, _ in question["supporting_facts"]))
        own = {
            title: _paragraph(title, sentences)
            for title, sentences in question["context"]
            if title not in excluded
        }
        gold = [own[title] for title in gold_titles if title in own]
        rng = random.Random(f"{seed}:{question['_id']}")
        fillers = [text for title, text in own.items() if title not in gold_titles]
        rng.shuffle(fillers)
        budget = target_tokens - sum(tokens_of(paragraph) for paragraph in gold)
        chosen: list[str] = []
        seen = set(gold)
        for paragraph in _fill_candidates(fillers, pool, rng):
            if paragraph in seen:
                continue
            cost = tokens_of(paragraph)
            if cost > budget:
                break
            chosen.append(paragraph)
            seen.add(paragraph)
            budget -= cost
        doc_id = f"hotpot-{target_tokens // 1024}k-{question['_id']}"
        documents[doc_id] = "\n\n".join(_spread(gold, chosen, rng))
        rows.append(
            DatasetRow(
                doc_ids=(doc_id,), question=question["question"].strip(), answer=question["answer"].strip()
            )
        )
    return QASet(documents, rows)


def hotpot_questions(
    questions: list[dict], split: Split, hold_out_validation: bool = False
) -> tuple[list[dict], set[str]]:
    """The questions of ``split`` (of the dev file's ``questions``, in file order) and the paragraph titles
    its documents must not hold. Train: the first ``HOTPOT_TRAIN_FRACTION``, without its last
    ``HOTPOT_VALIDATION_FRACTION`` when ``hold_out_validation``; test: the rest. Validation: those last
    train questions, less any whose gold paragraph is also a paragraph of another train question or of a
    test question (HotpotQA questions share Wikipedia paragraphs); every such title is excluded."""
    cut = int(len(questions) * HOTPOT_TRAIN_FRACTION)
    validation_start = cut - int(cut * HOTPOT_VALIDATION_FRACTION)
    if _check_split(split, SPLITS) == "test":
        return questions[cut:], set()
    if split == "train":
        return questions[: validation_start if hold_out_validation else cut], set()
    others = questions[:validation_start] + questions[cut:]
    excluded = {title for question in others for title, _ in question["context"]}
    asked = [
        question
        for question in questions[validation_start:cut]
        if not {title for title, _ in question["supporting_facts"]} & excluded
    ]
    return asked, excluded


def _paragraph(title: str, sentences: list[str]) -> str:
    return f"{title}\n{''.join(sentences).strip()}"


def _paragraph_pool(questions: list[dict], excluded: set[str]) -> list[str]:
    """Every distinct paragraph of the split whose title is not ``excluded``, in first-seen order (so
    sampling is reproducible)."""
    pool: dict[str, None] = {}
    for question in questions:
        for title, sentences in question["context"]:
            if title not in excluded:
                pool.setdefault(_paragraph(title, sentences), None)
    return list(pool)


def _fill_candidates(own_fillers: list[str], pool: list[str], rng: random.Random) -> Iterable[str]:
    """The question's own distractors first, then random paragraphs of the split (a bounded number of draws)."""
    yield from own_fillers
    for _ in range(len(pool)):
        yield pool[rng.randrange(len(pool))]


def _spread(gold: list[str], fillers: list[str], rng: random.Random) -> list[str]:
    """Fillers with each gold paragraph inserted at a random point of its own equal band."""
    bands = len(gold)
    positions = [
        rng.randint(len(fillers) * band // bands, len(fillers) * (band + 1) // bands) for band in range(bands)
    ]
    document = list(fillers)
    for offset, (position, paragraph) in enumerate(zip(positions, gold, strict=True)):
        document.insert(position + offset, paragraph)
    return document


def _check_split(split: str, allowed: tuple[str, ...]) -> str:
    if split not in allowed:
        raise InvalidArgument(f"unknown split {split!r}: expected one of {', '.join(allowed)}")
    return split


def require_qa_data(data_dir: Path, names: Iterable[str]) -> None:
    """Fail early, before any model loads, when a named set (``squad``, ``qmsum``, ``hotpotqa``) is absent;
    names of sets that are not downloaded (e.g. the generated ``passkey``) are ignored."""
    for name in names:
        if name not in DATA_PATHS:
            continue
        path = data_dir / DATA_PATHS[name]
        if not path.exists():
            raise _missing(path)


def read_json(path: Path) -> Any:
    """A JSON file of a QA set (gzipped when its name ends in ``.gz``)."""
    if not path.is_file():
        raise _missing(path)
    with (
        gzip.open(path, "rt", encoding="utf-8")
        if path.suffix == ".gz"
        else path.open(encoding="utf-8") as file
    ):
        return json.load(file)


def _missing(path: Path) -> NotFound:
    return NotFound(
        f"{path} does not exist: download the QA sets with `lloco data fetch` (into settings qa_data_dir, "
        "or --dest DIR and then --data-dir DIR), or point --data-dir / LLOCO_QA_DATA_DIR at a copy"
    )
