"""The evaluation harness: `lloco eval` on a tiny slice with the tiny random model, every mode, every set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lloco.config import FinetuneSettings
from lloco.eval.run import MODES, EvalOptions, Evaluator, middle_cut
from lloco.eval.tasks import sample_rows, squad_long, tenant_dataset
from lloco.finetune.datasets import QASet
from lloco.model import Compressor, load_model
from lloco.registry import DatasetRow, Registry, Tenants

DATA = Path(__file__).resolve().parent / "data" / "qa"  # small subsets of the QA sets (tests/data/README.md)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> object:
    return load_model(str(tiny_model_dir), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def compressor_dir(tiny_base: object, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained compressor (fresh summary embeddings): the harness's plumbing is under test here."""
    return Compressor.from_base(tiny_base, 32, 4, True, seed=1).save(tmp_path_factory.mktemp("compressor"))


def test_middle_cut_and_samples_are_deterministic() -> None:
    assert middle_cut([1, 2, 3], 5) == [1, 2, 3]
    assert middle_cut(list(range(10)), 5) == [0, 1, 7, 8, 9]
    assert middle_cut([1, 2], 0) == []
    rows = [DatasetRow((f"d{i % 3}",), f"q{i}", f"a{i}") for i in range(20)]
    qaset = QASet({"d0": "zero", "d1": "one", "d2": "two"}, rows)
    first, again = sample_rows(qaset, 4, seed=3), sample_rows(qaset, 4, seed=3)
    assert first == again and len(first.rows) == 4
    assert set(first.documents) == {d for row in first.rows for d in row.doc_ids}
    assert sample_rows(qaset, None, 0).rows == rows
    squad = squad_long(DATA, limit=5, train_limit=7, seed=0)
    assert len(squad.tests[0].qaset.rows) == 5 and len(squad.train.rows) == 7
    test_docs, train_docs = set(squad.tests[0].qaset.documents), set(squad.train.documents)
    assert not test_docs & train_docs and all(int(d.split("-")[1]) >= 25 for d in test_docs)


def test_eval_command_writes_every_mode_of_every_test_set(
    tiny_model_dir: Path, compressor_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    command = [
        sys.executable, "-m", "lloco.cli", "eval", "--output", str(out), "--datasets", "squad,qmsum,hotpotqa",
        "--limit", "2", "--train-limit", "4", "--train-steps", "2", "--max-document-tokens", "160",
        "--hotpot-lengths", "1024", "--base-model", str(tiny_model_dir), "--compressor", str(compressor_dir),
        "--data-dir", str(DATA), "--learning-rate", "1e-3", "--max-batch", "2", "--max-new-tokens", "8",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LLOCO_MODEL__CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(
        command, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT / "platform")}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["command"].startswith("lloco eval --output")
    assert report["test_sets"] == {"squad-long": 2, "qmsum": 2, "hotpotqa-1k": 2}
    results = report["results"]
    assert [(r["test_set"], r["mode"]) for r in results] == [
        (test_set, mode) for test_set in ("squad-long", "qmsum", "hotpotqa-1k") for mode in MODES
    ]
    for result in results:
        assert result["skipped"] is None and result["queries"] == 2
        names = {"em", "f1"} if result["metric"] == "qa" else {"rouge1", "rouge2", "rougeL", "rouge_gmean"}
        assert set(result["scores"]) == names
        assert all(0 <= value <= 100 for value in result["scores"].values())
        assert result["latency_s"] > 0
        assert (result["adapter"] is not None) == (result["mode"] in ("lloco", "full_lora"))
    by_mode = {r["mode"]: r for r in results if r["test_set"] == "squad-long"}
    assert by_mode["none"]["context_tokens"] == 0
    assert by_mode["full"]["context_tokens"] == by_mode["full"]["document_tokens"] == 160
    assert by_mode["compressed"]["context_tokens"] == by_mode["lloco"]["context_tokens"] == 160 / 32 * 4
    assert by_mode["lloco"]["adapter"]["steps"] == 2
    table = (out / "eval.md").read_text()
    assert table.count("| squad-long |") == len(MODES) and "LLoCO (compressed + LoRA)" in table
    assert "8.0x" in table  # 160 document tokens read as 4 summary vectors per 32-token segment
    predictions = (out / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 3 * len(MODES) * 2


def test_tenant_dataset_and_time_budget(store: object, tiny_base: object, compressor_dir: Path) -> None:
    Tenants(store).create("acme")
    registry = Registry(store, "acme")
    for doc_id, text in {"a": "Paris is the capital of France. " * 8, "b": "Rome is in Italy. " * 8}.items():
        registry.ingest_document(doc_id, text.encode(), max_bytes=10_000)
    rows = [{"doc_ids": ["a"], "question": "Capital of France?", "answer": "Paris"},
            {"doc_ids": ["a", "b"], "question": "Where is Rome?", "answer": "Italy"}]  # fmt: skip
    registry.put_dataset("qa", "".join(json.dumps(row) + "\n" for row in rows).encode())
    dataset = tenant_dataset(registry, "qa", "qa", "qa", limit=None, seed=0)
    assert dataset.name == "acme/qa" and set(dataset.tests[0].qaset.documents) == {"a", "b"}
    compressor = Compressor.load(compressor_dir, tiny_base)
    options = EvalOptions(modes=("none", "compressed", "lloco"), train_steps=1)
    results = Evaluator(tiny_base, compressor, FinetuneSettings(batch_size=2), options).run([dataset])
    assert [(r.mode, r.skipped) for r in results] == [("none", None), ("compressed", None), ("lloco", None)]
    two_docs = compressor.compress(
        [tiny_base.tokenizer.encode(registry.read_text(d), add_special_tokens=False) for d in "ab"]
    )
    expected = sum(v.shape[0] for v in two_docs) / 2 + two_docs[0].shape[0] / 2
    assert results[1].context_tokens == expected  # row 2 reads both documents' vectors
    without_train = tenant_dataset(registry, "qa", None, "qa", limit=1, seed=0)
    spent = EvalOptions(modes=("none", "full_lora"), time_budget_s=1e-9)
    skipped = Evaluator(tiny_base, compressor, FinetuneSettings(), spent).run([without_train])
    assert [(r.mode, r.skipped) for r in skipped] == [
        ("none", "time budget spent"),
        ("full_lora", "no train rows"),
    ]
