"""The loaders of the public QA sets: splits, rows, long-document construction, ingestion, missing files.

They read the committed subsets under tests/data/qa/ (the upstream formats, fewer articles, questions and
turns: tests/data/README.md); the counts below are those of the subsets.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from lloco.errors import InvalidArgument, NotFound
from lloco.finetune.corpus import evaluation_titles
from lloco.finetune.datasets import (
    QASet,
    ingest_qaset,
    load_hotpotqa_long,
    load_qmsum,
    load_squad,
    require_qa_data,
)
from lloco.registry import DatasetRow, Registry, Tenants

DATA = Path(__file__).resolve().parent / "data" / "qa"  # small subsets of the QA sets (tests/data/README.md)


def words(text: str) -> int:
    return len(text.split())


def test_squad_splits_articles_and_keeps_answerable_questions() -> None:
    train, test = load_squad(DATA, "train"), load_squad(DATA, "test")
    assert sorted(train.documents) == [f"squad-{i:02d}" for i in range(25)]
    assert sorted(test.documents) == [f"squad-{i:02d}" for i in range(25, 35)]
    # the subset's 812 questions, 393 of them unanswerable: every answerable one, once
    assert len(train.rows) + len(test.rows) == 812 - 393
    assert all(row.doc_ids[0] in train.documents for row in train.rows)
    assert all(row.doc_ids[0] in test.documents for row in test.rows)
    first = train.rows[0]
    assert first == DatasetRow(
        doc_ids=("squad-00",), question="In what country is Normandy located?", answer="France"
    )
    normans = train.documents["squad-00"]
    assert normans.count("\n\n") == 1  # the subset's 2 paragraphs joined
    assert all(row.answer in train.documents[row.doc_ids[0]] for row in train.rows)


def test_qmsum_uses_its_own_splits_and_every_query() -> None:
    train, val = load_qmsum(DATA, "train"), load_qmsum(DATA, "val")
    assert sorted(train.documents) == ["qmsum-Bdb001", "qmsum-Bed004"]
    assert sorted(val.documents) == ["qmsum-Bed002", "qmsum-Bed010"]
    assert len(train.rows) == 14 and all(row.answer and row.question for row in train.rows)
    assert train.rows[0].question == "Summarize the whole meeting"  # general queries, then specific ones
    transcript = val.documents["qmsum-Bed002"]
    assert transcript.count("\n") == 79 and transcript.splitlines()[0] == "Grad E: I guess ."
    with pytest.raises(InvalidArgument, match="unknown split"):
        load_qmsum(DATA, "dev")  # type: ignore[arg-type]


def test_hotpotqa_long_pads_gold_paragraphs_to_the_target_at_spread_depths() -> None:
    with gzip.open(DATA / "hotpotqa-dev-distractor.json.gz", "rt") as file:
        raw = {q["_id"]: q for q in json.load(file)}
    target = 3072
    qaset = load_hotpotqa_long(DATA, "train", target, words, limit=12, seed=7)
    assert len(qaset.rows) == 12 and len(qaset.documents) == 12
    for row in qaset.rows:
        text = qaset.documents[row.doc_ids[0]]
        paragraphs = text.split("\n\n")
        assert target - 400 <= sum(words(paragraph) for paragraph in paragraphs) <= target
        assert len(paragraphs) > 10  # more than the question's own ten: padded from other questions
        # the gold paragraphs are there, one in each half of the document
        question = raw[row.doc_ids[0].split("-", 2)[2]]
        assert row.question == question["question"] and row.answer == question["answer"]
        gold = {title: "".join(sentences).strip() for title, sentences in question["context"]}
        titles = list(dict.fromkeys(title for title, _ in question["supporting_facts"]))
        positions = [paragraphs.index(f"{title}\n{gold[title]}") for title in titles]
        middle = (len(paragraphs) - 1) / 2
        assert len(positions) == 2 and positions[0] <= middle + 1 and positions[1] >= middle - 1, positions
    assert load_hotpotqa_long(DATA, "train", target, words, limit=12, seed=7) == qaset  # deterministic
    other_seed = load_hotpotqa_long(DATA, "train", target, words, limit=12, seed=8)
    assert other_seed.rows == qaset.rows and other_seed.documents != qaset.documents
    test = load_hotpotqa_long(DATA, "test", target, words, limit=20)
    assert len(test.rows) == 10  # the last 20% of the subset's 50 questions
    assert {row.doc_ids[0] for row in test.rows}.isdisjoint(qaset.documents)
    with pytest.raises(InvalidArgument, match="target_tokens"):
        load_hotpotqa_long(DATA, "train", 10, words)


def test_ingest_stores_documents_and_dataset_and_rejects_a_bad_row_by_line(store: object) -> None:
    Tenants(store).create("acme")
    registry = Registry(store, "acme")
    squad = load_squad(DATA, "test")
    small = QASet(
        {d: squad.documents[d] for d in ("squad-25", "squad-26")},
        [r for r in squad.rows if r.doc_ids[0] in ("squad-25", "squad-26")][:20],
    )
    assert ingest_qaset(registry, small, "squad-small", max_document_bytes=2**20, count_tokens=words) == 20
    assert registry.read_dataset("squad-small") == small.rows
    assert registry.get_document("squad-25").tokens == words(small.documents["squad-25"])
    bad = QASet(small.documents, [*small.rows[:3], DatasetRow(("squad-99",), "Where?", "Nowhere")])
    with pytest.raises(InvalidArgument, match=r"line 4: unknown document 'squad-99'"):
        ingest_qaset(registry, bad, "bad", max_document_bytes=2**20)
    assert "bad" not in registry.list_datasets()


@pytest.mark.parametrize(
    "load",
    [
        lambda data: load_squad(data, "train"),
        lambda data: load_qmsum(data, "test"),
        lambda data: load_hotpotqa_long(data, "test", 4096, words),
        lambda data: require_qa_data(data, ["squad", "qmsum", "hotpotqa"]),
        evaluation_titles,
    ],
    ids=["squad", "qmsum", "hotpotqa", "require", "corpus-exclusions"],
)
def test_a_missing_set_names_lloco_data_fetch(load: Callable[[Path], object], tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"does not exist: download the QA sets with `lloco data fetch`"):
        load(tmp_path / "empty")
    require_qa_data(DATA, ["squad", "qmsum", "hotpotqa"])  # the committed subsets are complete
