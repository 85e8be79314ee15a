"""The loaders of the shared QA sets: splits, rows, long-document construction, ingestion."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from lloco.errors import InvalidArgument
from lloco.finetune.datasets import QASet, ingest_qaset, load_hotpotqa_long, load_qmsum, load_squad
from lloco.registry import DatasetRow, Registry, Tenants

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def words(text: str) -> int:
    return len(text.split())


def test_squad_splits_articles_and_keeps_answerable_questions() -> None:
    train, test = load_squad(DATA, "train"), load_squad(DATA, "test")
    assert sorted(train.documents) == [f"squad-{i:02d}" for i in range(25)]
    assert sorted(test.documents) == [f"squad-{i:02d}" for i in range(25, 35)]
    assert len(train.rows) + len(test.rows) == 5928  # every answerable question, once
    assert all(row.doc_ids[0] in train.documents for row in train.rows)
    assert all(row.doc_ids[0] in test.documents for row in test.rows)
    first = train.rows[0]
    assert first == DatasetRow(
        doc_ids=("squad-00",), question="In what country is Normandy located?", answer="France"
    )
    normans = train.documents["squad-00"]
    assert normans.count("\n\n") == 38  # 39 paragraphs joined
    assert all(row.answer in train.documents[row.doc_ids[0]] for row in train.rows[:200])


def test_qmsum_uses_its_own_splits_and_every_query() -> None:
    train, val = load_qmsum(DATA, "train"), load_qmsum(DATA, "val")
    assert len(train.documents) == 162 and len(val.documents) == 35
    assert set(train.documents).isdisjoint(val.documents)
    assert len(train.rows) >= 1200 and all(row.answer and row.question for row in train.rows)
    transcript = next(iter(val.documents.values()))
    assert transcript.count("\n") > 50 and ": " in transcript.splitlines()[0]
    with pytest.raises(InvalidArgument, match="unknown split"):
        load_qmsum(DATA, "dev")  # type: ignore[arg-type]


def test_hotpotqa_long_pads_gold_paragraphs_to_the_target_at_spread_depths() -> None:
    with gzip.open(DATA / "hotpotqa-dev-distractor.json.gz", "rt") as file:
        raw = {q["_id"]: q for q in json.load(file)}
    target = 4096
    qaset = load_hotpotqa_long(DATA, "train", target, words, limit=12, seed=7)
    assert len(qaset.rows) == 12 and len(qaset.documents) == 12
    for row in qaset.rows:
        text = qaset.documents[row.doc_ids[0]]
        paragraphs = text.split("\n\n")
        assert target - 400 <= sum(words(paragraph) for paragraph in paragraphs) <= target
        assert len(paragraphs) > 20
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
    assert {row.doc_ids[0] for row in test.rows}.isdisjoint(qaset.documents)
    with pytest.raises(InvalidArgument, match="target_tokens"):
        load_hotpotqa_long(DATA, "train", 10, words)


def test_ingest_stores_documents_and_dataset_and_rejects_a_bad_row_by_line(store: object) -> None:
    Tenants(store).create("acme")
    registry = Registry(store, "acme")
    squad = load_squad(DATA, "test")
    small = QASet(
        {d: squad.documents[d] for d in ("squad-25", "squad-26")},
        [r for r in squad.rows if r.doc_ids[0] in ("squad-25", "squad-26")][:30],
    )
    assert ingest_qaset(registry, small, "squad-small", max_document_bytes=2**20, count_tokens=words) == 30
    assert registry.read_dataset("squad-small") == small.rows
    assert registry.get_document("squad-25").tokens == words(small.documents["squad-25"])
    bad = QASet(small.documents, [*small.rows[:3], DatasetRow(("squad-99",), "Where?", "Nowhere")])
    with pytest.raises(InvalidArgument, match=r"line 4: unknown document 'squad-99'"):
        ingest_qaset(registry, bad, "bad", max_document_bytes=2**20)
    assert "bad" not in registry.list_datasets()
