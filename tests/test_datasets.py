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
    HOTPOT_FILE,
    SQUAD_VALIDATION_ARTICLES,
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


def test_squad_validation_articles_are_held_out_of_the_train_side() -> None:
    validation = load_squad(DATA, "validation")
    held_out = load_squad(DATA, "train", hold_out_validation=True)
    assert sorted(validation.documents) == [f"squad-{i:02d}" for i in SQUAD_VALIDATION_ARTICLES] != []
    assert sorted(held_out.documents) == [f"squad-{i:02d}" for i in range(20)]
    assert held_out.rows + validation.rows == load_squad(DATA, "train").rows  # the train side, cut in two
    assert load_squad(DATA, "test", hold_out_validation=True) == load_squad(DATA, "test")


def _paragraphs(question: dict) -> dict[str, str]:
    return {title: f"{title}\n{''.join(sentences).strip()}" for title, sentences in question["context"]}


def test_hotpotqa_validation_documents_hold_no_paragraph_of_a_train_or_test_question(tmp_path: Path) -> None:
    """The subset's 50 questions: 0-34 train, 35-39 validation, 40-49 test. Questions share paragraphs in the
    full set (not in this subset), so the test plants shared ones: question 36 gets a train and a test
    question's paragraph among its distractors, and question 37's gold paragraph is also question 1's."""
    with gzip.open(DATA / HOTPOT_FILE, "rt") as file:
        questions = json.load(file)
    questions[36]["context"][0] = questions[0]["context"][0]
    questions[36]["context"][1] = questions[45]["context"][0]
    gold = questions[37]["supporting_facts"][0][0]
    questions[1]["context"].append(next(entry for entry in questions[37]["context"] if entry[0] == gold))
    data = tmp_path / "qa"
    data.mkdir()
    with gzip.open(data / HOTPOT_FILE, "wt") as file:
        json.dump(questions, file)
    validation = load_hotpotqa_long(data, "validation", 1024, words, seed=3)
    asked = [row.doc_ids[0].split("-", 2)[2] for row in validation.rows]
    assert asked == [questions[i]["_id"] for i in (35, 36, 38, 39)]  # 37's gold paragraph is a train one
    others = {p for q in questions[:35] + questions[40:] for p in _paragraphs(q).values()}
    other_titles = {title for q in questions[:35] + questions[40:] for title in _paragraphs(q)}
    held = {p for text in validation.documents.values() for p in text.split("\n\n")}
    assert not held & others and not {p.split("\n", 1)[0] for p in held} & other_titles
    assert held <= {p for i in (35, 36, 38, 39) for p in _paragraphs(questions[i]).values()}  # their own
    for index, row in zip((35, 36, 38, 39), validation.rows, strict=True):  # gold paragraphs in place
        own = _paragraphs(questions[index])
        text = validation.documents[row.doc_ids[0]]
        assert all(own[title] in text for title, _ in questions[index]["supporting_facts"])
    train = load_hotpotqa_long(data, "train", 1024, words, seed=3, hold_out_validation=True)
    assert len(train.rows) == 35
    fit = {p for q in questions[:35] for p in _paragraphs(q).values()}
    assert {p for text in train.documents.values() for p in text.split("\n\n")} <= fit
    assert len(load_hotpotqa_long(data, "train", 1024, words, seed=3).rows) == 40  # the whole train side


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
