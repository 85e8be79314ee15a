"""What is evaluated: test sets (documents + questions + golds) and the train rows of their LoRA modes.

Every sample is deterministic. SQuAD-long: test articles 25-34, a seeded sample of ``limit`` answerable
questions; train rows from articles 0-24. QMSum: a seeded sample of the test queries; train rows from
its train split. HotpotQA-long: the first ``limit`` questions of the test split (the last 20% of dev),
each in a haystack of 4k/8k/16k tokens; train rows from the train split, haystack lengths taken in turn.
The pretraining corpus leaves out every Wikipedia title of that test split (``lloco.finetune.corpus``).
Passkey: generated fact-recall documents (``lloco.eval.passkey``), ``limit`` per length, and ``train_limit``
train documents from the disjoint train split. A tenant's dataset in the registry is a test set too,
with an optional train dataset.

``split="validation"`` (``EVAL_SPLITS``) asks the same way about the validation split instead, which lies
inside the train side (``lloco.finetune.datasets``, ``lloco.eval.passkey``), and trains the LoRA modes on
the train side without it: SQuAD articles 20-24 (train rows from 0-19), QMSum's val split (train rows from
train), HotpotQA's last eighth of train questions (train rows from the others), passkey documents of the
validation stream (train rows as in a test run). It is what a finetune recipe is chosen on; the test split
stays for reporting.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from lloco.errors import InvalidArgument
from lloco.eval.passkey import PasskeyDocument, passkey_documents
from lloco.finetune.datasets import QMSUM_VALIDATION, QASet, load_hotpotqa_long, load_qmsum, load_squad
from lloco.model.prompt import QA_INSTRUCTION
from lloco.registry import DatasetRow, Registry

Metric = Literal["qa", "summary"]
EvalSplit = Literal["test", "validation"]
EVAL_SPLITS: tuple[EvalSplit, ...] = ("test", "validation")  # what `lloco eval --split` asks
DATASETS = ("squad", "qmsum", "hotpotqa", "passkey")
HOTPOT_LENGTHS = (4096, 8192, 16384)
PASSKEY_LENGTHS = (2048, 4096, 8192)
PASSKEY_ALL = 100  # documents per length when there is no limit (the set is generated: it has no end)
MAX_NEW_TOKENS: dict[Metric, int] = {"qa": 32, "summary": 160}  # answers of QMSum run ~65 words


@dataclass(frozen=True)
class TestSet:
    """Rows to answer and the documents they name; ``depths``, when given, is where in its document
    each row's answer sits (a fraction of the tokens before it), for scores by depth."""

    name: str
    qaset: QASet
    depths: tuple[float, ...] | None = None


@dataclass(frozen=True)
class EvalDataset:
    """Test sets that share a metric (and so an answer length) and the adapters of the LoRA modes.

    ``train`` is None when there is nothing to train the LoRA modes on (they are then skipped).
    ``instruction`` is appended to every question, in training and testing alike.
    """

    name: str
    metric: Metric
    tests: list[TestSet]
    train: QASet | None
    instruction: str = ""

    def question(self, row: DatasetRow) -> str:
        return f"{row.question}\n\n{self.instruction}" if self.instruction else row.question


def sample_rows(qaset: QASet, limit: int | None, seed: int) -> QASet:
    """A seeded sample of ``limit`` rows (all when None), in their original order, and only their documents."""
    rows = qaset.rows
    if limit is not None and limit < len(rows):
        chosen = sorted(random.Random(seed).sample(range(len(rows)), limit))
        rows = [rows[i] for i in chosen]
    named = {doc_id for row in rows for doc_id in row.doc_ids}
    return QASet({d: text for d, text in qaset.documents.items() if d in named}, list(rows))


def check_split(split: str) -> EvalSplit:
    """``split`` if ``lloco eval`` can ask it; InvalidArgument otherwise."""
    if split not in EVAL_SPLITS:
        raise InvalidArgument(f"--split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
    return cast(EvalSplit, split)


def squad_long(
    data_dir: Path, limit: int | None, train_limit: int | None, seed: int, split: EvalSplit = "test"
) -> EvalDataset:
    validation = check_split(split) == "validation"
    test = sample_rows(load_squad(data_dir, split), limit, seed)
    train = sample_rows(load_squad(data_dir, "train", hold_out_validation=validation), train_limit, seed)
    return EvalDataset("squad-long", "qa", [TestSet("squad-long", test)], train, QA_INSTRUCTION)


def qmsum(
    data_dir: Path, limit: int | None, train_limit: int | None, seed: int, split: EvalSplit = "test"
) -> EvalDataset:
    asked = QMSUM_VALIDATION if check_split(split) == "validation" else "test"
    test = sample_rows(load_qmsum(data_dir, asked), limit, seed)
    train = sample_rows(load_qmsum(data_dir, "train"), train_limit, seed)
    return EvalDataset("qmsum", "summary", [TestSet("qmsum", test)], train)


def hotpotqa_long(
    data_dir: Path,
    limit: int | None,
    train_limit: int | None,
    count_tokens: Callable[[str], int],
    lengths: Sequence[int] = HOTPOT_LENGTHS,
    seed: int = 0,
    split: EvalSplit = "test",
) -> EvalDataset:
    """One test set per haystack length (the same questions); train question j (of the first ``train_limit``)
    sits in a haystack of ``lengths[j % len(lengths)]`` tokens."""
    validation = check_split(split) == "validation"
    tests = [
        TestSet(
            length_name("hotpotqa", length),
            load_hotpotqa_long(data_dir, split, length, count_tokens, limit=limit, seed=seed),
        )
        for length in lengths
    ]
    documents: dict[str, str] = {}
    rows: list[DatasetRow] = []
    for turn, length in enumerate(lengths):
        part = load_hotpotqa_long(
            data_dir, "train", length, count_tokens, train_limit, seed, hold_out_validation=validation
        )
        documents.update(part.documents)
        rows += part.rows[turn :: len(lengths)]
    train = sample_rows(QASet(documents, rows), None, seed)
    return EvalDataset("hotpotqa-long", "qa", tests, train, QA_INSTRUCTION)


def length_name(prefix: str, length: int) -> str:
    """``hotpotqa-4k`` for 4096 tokens; ``passkey-300`` for lengths that are not whole k."""
    return f"{prefix}-{length // 1024}k" if length % 1024 == 0 else f"{prefix}-{length}"


def _passkey_qaset(documents: list[PasskeyDocument]) -> QASet:
    rows = [DatasetRow((doc.doc_id,), doc.asked.question, doc.asked.answer) for doc in documents]
    return QASet({doc.doc_id: doc.text for doc in documents}, rows)


def passkey(
    limit: int | None,
    train_limit: int | None,
    count_tokens: Callable[[str], int],
    lengths: Sequence[int] = PASSKEY_LENGTHS,
    seed: int = 0,
    split: EvalSplit = "test",
) -> EvalDataset:
    """One test set per document length (``limit`` documents, ``PASSKEY_ALL`` when None), with each
    question's depth; train document j (of ``train_limit``) has ``lengths[j % len(lengths)]`` tokens and
    comes from the train split (for the test split: other filler, templates, names and values; for the
    validation split: other documents of the same material)."""
    tests = []
    for length in lengths:
        documents = passkey_documents(
            check_split(split), length, PASSKEY_ALL if limit is None else limit, count_tokens, seed
        )
        depths = tuple(doc.asked.depth for doc in documents)
        tests.append(TestSet(length_name("passkey", length), _passkey_qaset(documents), depths))
    train_count = PASSKEY_ALL if train_limit is None else train_limit
    train_documents = [
        document
        for turn, length in enumerate(lengths)
        for document in passkey_documents(
            "train", length, len(range(turn, train_count, len(lengths))), count_tokens, seed
        )
    ]
    train = _passkey_qaset(train_documents) if train_documents else None
    return EvalDataset("passkey", "qa", tests, train, QA_INSTRUCTION)


def tenant_dataset(
    registry: Registry, dataset: str, train_dataset: str | None, metric: Metric, limit: int | None, seed: int
) -> EvalDataset:
    """A tenant's dataset (and optional train dataset) with the documents they name, read from the registry."""

    def read(name: str, cap: int | None) -> QASet:
        rows = registry.read_dataset(name)
        if not rows:
            raise InvalidArgument(f"tenant {registry.tenant!r} dataset {name!r} has no rows")
        sampled = sample_rows(QASet({}, rows), cap, seed).rows
        doc_ids = sorted({doc_id for row in sampled for doc_id in row.doc_ids})
        return QASet({doc_id: registry.read_text(doc_id) for doc_id in doc_ids}, sampled)

    name = f"{registry.tenant}/{dataset}"
    train = read(train_dataset, None) if train_dataset else None
    return EvalDataset(name, metric, [TestSet(name, read(dataset, limit))], train)
