"""The evaluation harness: `lloco eval` on a tiny slice with the tiny random model, every mode, every set;
the passkey documents, the no-context LoRA's examples, the adapters' shared init, the perplexity gap, the
validation split (disjoint from the train rows and the test split; the test split's samples unchanged), and
finetune-recipe sweeps (`--recipes`: one run, documents compressed once; a run without it unchanged)."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lloco.config import FinetuneSettings
from lloco.errors import InvalidArgument
from lloco.eval import passkey as pk
from lloco.eval.adapters import state_digest, train_adapter
from lloco.eval.report import write_report
from lloco.eval.run import ADAPTER_MODE, MODE_LABELS, MODES, EvalOptions, Evaluator, Recipe, middle_cut
from lloco.eval.tasks import (
    EvalDataset,
    hotpotqa_long,
    passkey,
    qmsum,
    sample_rows,
    squad_long,
    tenant_dataset,
)
from lloco.finetune.datasets import HOTPOT_FILE, QASet, load_squad
from lloco.finetune.pretrain_eval import gap_closed
from lloco.model import Compressor, TrainableLora, chat_prompt, load_model
from lloco.model.lora import peft_geometry, read_peft_files
from lloco.registry import DatasetRow, Registry, Tenants
from lloco.registry.evidence import Evidence, sentence_spans

DATA = Path(__file__).resolve().parent / "data" / "qa"  # small subsets of the QA sets (tests/data/README.md)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> object:
    return load_model(str(tiny_model_dir), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def compressor_dir(tiny_base: object, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained compressor (fresh summary embeddings): the harness's plumbing is under test here."""
    return Compressor.from_base(tiny_base, 32, 4, True, seed=1).save(tmp_path_factory.mktemp("compressor"))


@pytest.fixture(scope="module")
def count_tokens(tiny_base: object) -> object:
    return lambda text: len(tiny_base.tokenizer.encode(text, add_special_tokens=False))


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


def words(text: str) -> int:
    return len(text.split())


def _built_in(split: str, seed: int = 0) -> dict[str, EvalDataset]:
    """Every built-in set asked about ``split``, small, sized by words (no tokenizer needed)."""
    return {
        "squad": squad_long(DATA, 5, 7, seed, split),
        "qmsum": qmsum(DATA, 5, 7, seed, split),
        "hotpotqa": hotpotqa_long(DATA, 4, 6, words, (1024, 2048), seed, split),
        "passkey": passkey(3, 4, words, (512, 1024), seed, split),
    }


def _digest(dataset: EvalDataset) -> str:
    def qaset(q: QASet | None) -> list | None:
        if q is None:
            return None
        return [sorted(q.documents.items()), [[list(r.doc_ids), r.question, r.answer] for r in q.rows]]

    tests = [[test.name, qaset(test.qaset), test.depths] for test in dataset.tests]
    return hashlib.sha256(json.dumps([dataset.name, tests, qaset(dataset.train)]).encode()).hexdigest()


# What the code before `--split` (commit 47b826b) built for `_built_in("test", seed)`, documents and rows.
TEST_SPLIT_DIGESTS = {
    0: {
        "squad": "ba229d86218fac10553fd128d4921f06afb88d0c6e701b9cea03c186e96f428e",
        "qmsum": "90836304549c37c8604aad50e5144439df8f0010e1a2150ba34c2b0edc4e2323",
        "hotpotqa": "d3c05e527fa14dd319601d2315114da7e21a6e62700c908045ee4fc0386559c1",
        "passkey": "9bdfb7f03e329050b213d0163717e94cad105a001bf26fceed0a355a12fa5486",
    },
    3: {
        "squad": "19cc71900e1e1d2a4fc2f600f353b6273e389985e907d9f27207aa4a32845034",
        "qmsum": "a1d141352da923fb2e5811d433a9b3dee143f3d63338a419cb659cde567e4849",
        "hotpotqa": "599d7dd93cba58f9e332c61f076ce9a6b1e4a7ca19408d936ecd9806dea04675",
        "passkey": "843177f9a1537b5b81e9bf365b3fa68bf1e319ad86d530cf1a03ff23d7d4340a",
    },
}


@pytest.mark.parametrize("seed", sorted(TEST_SPLIT_DIGESTS))
def test_the_test_split_samples_are_unchanged(seed: int) -> None:
    built = {name: _digest(dataset) for name, dataset in _built_in("test", seed).items()}
    assert built == TEST_SPLIT_DIGESTS[seed]
    assert _digest(squad_long(DATA, 5, 7, seed)) == built["squad"]  # test is the default


def _documents(dataset: EvalDataset) -> dict[str, str]:
    return {doc_id: text for test in dataset.tests for doc_id, text in test.qaset.documents.items()}


def test_validation_documents_are_neither_train_rows_nor_test_documents() -> None:
    validation, test = _built_in("validation"), _built_in("test")
    for name, dataset in validation.items():
        asked = _documents(dataset)
        assert asked and all(len(t.qaset.rows) > 0 for t in dataset.tests), name
        for other in (dataset.train.documents, _documents(test[name])):
            assert not set(asked) & set(other), name
            assert not set(asked.values()) & set(other.values()), name
    squad = validation["squad"]
    assert set(_documents(squad)) <= {f"squad-{i}" for i in range(20, 25)}
    assert all(int(d.split("-")[1]) < 20 for d in squad.train.documents)
    full_train = load_squad(DATA, "train")  # the validation questions are train-side ones
    assert {r.question for r in squad.tests[0].qaset.rows} <= {r.question for r in full_train.rows}
    assert {d.split("-")[1] for d in _documents(validation["qmsum"])} == {"Bed002", "Bed010"}  # QMSum's val
    # HotpotQA: no paragraph of a validation document belongs to a training or a test question
    with gzip.open(DATA / HOTPOT_FILE, "rt") as file:
        questions = {q["_id"]: q for q in json.load(file)}
    ids = list(questions)  # the subset's 50: 0-34 the train rows' side, 35-39 validation, 40-49 test
    hotpot = validation["hotpotqa"]
    assert {d.split("-", 2)[2] for d in hotpot.train.documents} <= set(ids[:35])
    assert {d.split("-", 2)[2] for d in _documents(hotpot)} <= set(ids[35:40])
    others = {
        f"{title}\n{''.join(sentences).strip()}"
        for qid in ids[:35] + ids[40:]
        for title, sentences in questions[qid]["context"]
    }
    held = {p for text in _documents(hotpot).values() for p in text.split("\n\n")}
    train_held = {p for text in hotpot.train.documents.values() for p in text.split("\n\n")}
    assert held and not held & others and not held & train_held
    # passkey: the generator's train material, other documents than the train rows', the same depths
    keyed = validation["passkey"]
    assert all(d.startswith("passkey-validation-") for d in _documents(keyed))
    assert all(d.startswith("passkey-train-") for d in keyed.train.documents)
    assert keyed.train == test["passkey"].train  # the train rows of a test run
    train_text = "\n\n".join(keyed.train.documents.values())
    test_paragraphs = {p for text in _documents(test["passkey"]).values() for p in text.split("\n\n")}
    train_templates = [_template_pattern(t.statement) for t in pk.TEMPLATES["train"]]
    for length, validation_set in zip((512, 1024), keyed.tests, strict=True):
        assert validation_set.depths == tuple(pk.DEPTHS[i % len(pk.DEPTHS)] for i in range(3))
        documents = pk.passkey_documents("validation", length, 3, words, seed=0)
        assert {d.doc_id: d.text for d in documents} == validation_set.qaset.documents
        for document in documents:
            assert not set(document.text.split("\n\n")) & test_paragraphs
            assert document.asked.statement not in train_text
            assert any(pattern.fullmatch(document.asked.statement) for pattern in train_templates)


def test_eval_split_is_checked_before_any_model_loads(tmp_path: Path) -> None:
    from lloco.cli import app
    from typer.testing import CliRunner

    out = tmp_path / "out"
    env = {"LLOCO_QA_DATA_DIR": str(DATA), "LLOCO_DATA_DIR": str(tmp_path / "data")}
    for extra, message in [
        (["--split", "dev"], "--split must be one of test, validation, got 'dev'"),
        (["--split", "validation", "--tenant", "acme", "--dataset", "qa"], "a tenant's datasets have none"),
        (["--split", "validation", "--corpus-documents", "10"], "corpus mode picks its questions"),
    ]:
        result = CliRunner().invoke(app, ["eval", "--output", str(out), *extra], env=env)
        assert result.exit_code == 1 and result.stderr.startswith("error: "), result.output
        assert message in result.stderr and "Traceback" not in result.output
    assert not out.exists()  # refused before any work


def test_bad_eval_options_name_the_field_without_pydantic_noise(tmp_path: Path) -> None:
    from lloco.cli import app
    from typer.testing import CliRunner

    out = tmp_path / "out"
    env = {"LLOCO_QA_DATA_DIR": str(DATA), "LLOCO_DATA_DIR": str(tmp_path / "data")}
    result = CliRunner().invoke(app, ["eval", "--output", str(out), "--perplexity-windows", "0"], env=env)
    assert (result.exit_code, result.stderr) == (
        1,
        "error: bad eval options: perplexity_windows: Input should be greater than or equal to 1\n",
    )
    assert not out.exists()


def _run_eval(
    tiny_model_dir: Path,
    compressor_dir: Path,
    out: Path,
    *options: str,
    recipe: tuple[str, ...] = ("--train-steps", "2", "--learning-rate", "1e-3"),
) -> subprocess.CompletedProcess[str]:
    """`lloco eval` on the tiny model and the committed QA subsets, small, in its own process."""
    command = [
        sys.executable, "-m", "lloco.cli", "eval", "--output", str(out), "--limit", "2", "--train-limit", "4",
        "--max-document-tokens", "512", "--hotpot-lengths", "1024", "--passkey-lengths", "512",
        "--perplexity-windows", "2", "--base-model", str(tiny_model_dir), "--compressor", str(compressor_dir),
        "--data-dir", str(DATA), "--max-batch", "2", "--max-new-tokens", "8", *recipe, *options,
    ]  # fmt: skip
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "LLOCO_MODEL__CACHE_DIR": str(out.parent / "cache"),
        "LLOCO_FINETUNE__BATCH_SIZE": "2", "PYTHONPATH": str(ROOT / "platform"),
    }  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_eval_command_writes_every_mode_of_every_test_set(
    tiny_model_dir: Path, compressor_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    done = _run_eval(tiny_model_dir, compressor_dir, out)
    report = json.loads((out / "eval.json").read_text())
    assert report["command"].startswith("lloco eval --output")
    assert next(iter(report)) == "split" and report["split"] == "test"
    title, _, notice = (out / "eval.md").read_text().splitlines()[:3]
    assert title.startswith("# Evaluation on the test split: ") and notice.startswith("**Split: test.**")
    assert done.stdout.startswith("**Split: test.**")
    test_sets = (
        "squad-long",
        "qmsum",
        "hotpotqa-1k",
        "passkey-512",
    )  # the default datasets, passkey included
    assert report["test_sets"] == dict.fromkeys(test_sets, 2)
    results = report["results"]
    assert [(r["test_set"], r["mode"]) for r in results] == [
        (test_set, mode) for test_set in test_sets for mode in MODES
    ]  # the default modes, lora_none included
    for result in results:  # the rows a run without --recipes wrote before sweeps existed
        assert list(result) == ROW_KEYS_BEFORE_SWEEPS and result["label"] == MODE_LABELS[result["mode"]]
        assert result["skipped"] is None and result["queries"] == 2
        names = {"em", "f1"} if result["metric"] == "qa" else {"rouge1", "rouge2", "rougeL", "rouge_gmean"}
        assert set(result["scores"]) == names
        assert all(0 <= value <= 100 for value in result["scores"].values())
        assert result["latency_s"] > 0
        assert (result["adapter"] is not None) == (result["mode"] in ADAPTER_MODE)
        if result["test_set"] == "passkey-512":
            by_depth = result["scores_by_depth"]
            assert set(by_depth) == {"10%", "30%"} and sum(d["n"] for d in by_depth.values()) == 2
        else:
            assert result["scores_by_depth"] is None
    for test_set in test_sets:
        by_mode = {r["mode"]: r for r in results if r["test_set"] == test_set}
        inits = {by_mode[mode]["adapter"]["init_sha256"] for mode in ADAPTER_MODE}
        assert len(inits) == 1  # the three LoRA modes start from the same weights
        assert by_mode["lora_none"]["context_tokens"] == by_mode["none"]["context_tokens"] == 0
    by_mode = {r["mode"]: r for r in results if r["test_set"] == "squad-long"}
    assert by_mode["full"]["context_tokens"] == by_mode["full"]["document_tokens"] == 512
    assert by_mode["compressed"]["context_tokens"] == by_mode["lloco"]["context_tokens"] == 512 / 32 * 4
    assert by_mode["lloco"]["adapter"]["steps"] == by_mode["lora_none"]["adapter"]["steps"] == 2
    assert (
        by_mode["lloco"]["adapter"]["learning_rate"]
        == by_mode["full_lora"]["adapter"]["learning_rate"]
        == 1e-3
    )
    assert set(by_mode["lloco"]["adapter"]) == ADAPTER_KEYS_BEFORE_SWEEPS | {"learning_rate", "examples"}
    perplexity = report["perplexity"]
    assert perplexity["windows"] == 2 and perplexity["segments_per_window"] == 4
    assert {"no_context", "compressed", "full_text"} <= set(perplexity["perplexity"])
    ppl = perplexity["perplexity"]
    assert perplexity["gap_closed"] == gap_closed(ppl["no_context"], ppl["compressed"], ppl["full_text"])
    ablations = report["ablations"]
    assert ablations["perplexity_gap_closed"] == perplexity["gap_closed"]
    assert [row["test_set"] for row in ablations["lloco_vs_baselines"]] == list(test_sets)
    assert all(list(row) == ABLATION_KEYS_BEFORE_SWEEPS for row in ablations["lloco_vs_baselines"])
    for row in ablations["evidence"]:  # the default modes include the evidence ones: their own ablation
        scores_of = {r["mode"]: r["scores"] for r in results if r["test_set"] == row["test_set"]}
        headline = row["score"]
        assert row["lloco_evidence"] == scores_of["lloco_evidence"][headline]
        assert row["summaries_add"] == pytest.approx(
            scores_of["lloco_evidence"][headline] - scores_of["lora_evidence"][headline]
        )
    assert [row["test_set"] for row in ablations["evidence"]] == list(test_sets)
    assert all(list(row) == ["test_set", "mode", "em", "em_by_depth"] for row in ablations["em_by_depth"])
    assert report["options"]["recipes"] is None
    squad_row = ablations["lloco_vs_baselines"][0]
    assert squad_row["lloco_minus_lora_none"] == pytest.approx(
        by_mode["lloco"]["scores"]["f1"] - by_mode["lora_none"]["scores"]["f1"]
    )
    assert [(row["test_set"], row["mode"]) for row in ablations["em_by_depth"]] == [
        ("passkey-512", mode) for mode in MODES
    ]
    table = (out / "eval.md").read_text()
    assert table.count("| squad-long |") == len(MODES) + 2  # + its two ablation rows
    assert "### Do the summaries add to the evidence?" in table
    assert "LLoCO (compressed + LoRA)" in table and "LoRA, no context" in table
    assert "8.0x" in table  # 512 document tokens read as 4 summary vectors per 32-token segment
    assert "## Ablations" in table and "exact match by depth" in table and "Gap closed" in table
    assert "| test set | score | LLoCO |" in table and "steps, lr" not in table
    predictions = (out / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == len(test_sets) * len(MODES) * 2
    assert all(list(json.loads(line))[:3] == ["test_set", "mode", "question"] for line in predictions)
    assert {json.loads(line).get("depth") for line in predictions if "passkey" in line} == {0.1, 0.3}


@pytest.mark.parametrize("positions", ["summary_tokens", "salient_sentences"])
def test_eval_reads_a_key_value_summary_compressor(
    tiny_model_dir: Path, tiny_base: object, tmp_path: Path, positions: str
) -> None:
    """`lloco eval` takes a key/value-summary compressor (the serving path does not yet): its compressed modes
    decode after the summaries in the generator's cache, LLoCO's LoRA trains after them, the perplexity reads them."""
    kv_dir = tmp_path / "kv"
    if positions == "summary_tokens":
        Compressor.from_base(tiny_base, 32, 4, True, seed=1, summary_form="kv").save(kv_dir)
    else:  # as a user makes one
        command = [sys.executable, "-m", "lloco.cli", "salient-compressor", "--output", str(kv_dir)]
        command += ["--segment-len", "32", "--k", "4", "--base-model", str(tiny_model_dir)]
        env = {
            **os.environ,
            "LLOCO_MODEL__CACHE_DIR": str(tmp_path / "cache"),
            "PYTHONPATH": str(ROOT / "platform"),
        }
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "-salient-" in done.stdout, done.stderr[-2000:]
    out = tmp_path / "eval"
    _run_eval(
        tiny_model_dir, kv_dir, out, "--datasets", "squad,passkey", "--modes", "compressed,lloco,lora_none"
    )
    report = json.loads((out / "eval.json").read_text())
    rows = {(r["test_set"], r["mode"]): r for r in report["results"]}
    assert set(rows) == {
        (t, m) for t in ("squad-long", "passkey-512") for m in ("compressed", "lloco", "lora_none")
    }
    assert all(r["skipped"] is None and r["queries"] == 2 for r in rows.values())
    assert (
        rows["squad-long", "compressed"]["context_tokens"]
        == rows["squad-long", "lloco"]["context_tokens"]
        == 64
    )
    assert (
        rows["squad-long", "lloco"]["adapter"]["steps"] == 2
        and rows["squad-long", "lora_none"]["context_tokens"] == 0
    )
    assert set(report["perplexity"]["perplexity"]) >= {"no_context", "compressed", "full_text"}
    assert report["compressor"]["positions"] == positions


# What a row of eval.json, its adapter summary and an ablation row held before `--recipes` (commit 285b72b).
ROW_KEYS_BEFORE_SWEEPS = [
    "dataset", "test_set", "mode", "metric", "queries", "scores", "context_tokens", "document_tokens",
    "latency_s", "seconds", "adapter", "skipped", "scores_by_depth", "label",
]  # fmt: skip
ADAPTER_KEYS_BEFORE_SWEEPS = {"init", "init_sha256", "steps", "first_loss", "last_loss", "seconds"}
ABLATION_KEYS_BEFORE_SWEEPS = [
    "test_set", "score", "lloco", "lora_none", "full_lora", "lloco_minus_lora_none", "lloco_pct_of_full_lora",
]  # fmt: skip


def test_a_validation_run_asks_train_side_documents_and_says_so_first(
    tiny_model_dir: Path, compressor_dir: Path, tmp_path: Path
) -> None:
    """A validation run, as a finetune recipe is chosen: two recipes swept in the one run."""
    out = tmp_path / "eval"
    sweep = ("--recipes", "2:1e-3:4, 1:5e-4:2")
    done = _run_eval(
        tiny_model_dir,
        compressor_dir,
        out,
        "--split",
        "validation",
        "--modes",
        "none,lora_none",
        recipe=sweep,
    )
    report = json.loads((out / "eval.json").read_text())
    assert next(iter(report)) == "split" and report["split"] == "validation"
    assert report["test_sets"] == dict.fromkeys(("squad-long", "qmsum", "hotpotqa-1k", "passkey-512"), 2)
    recipes = [
        {"train_steps": 2, "learning_rate": 1e-3, "train_rows": 4},
        {"train_steps": 1, "learning_rate": 5e-4, "train_rows": 2},
    ]
    assert report["options"]["recipes"] == recipes
    for test_set in report["test_sets"]:
        rows = [r for r in report["results"] if r["test_set"] == test_set]
        assert [(r["mode"], r.get("recipe"), r["skipped"]) for r in rows] == [
            ("none", None, None),
            ("lora_none", recipes[0], None),
            ("lora_none", recipes[1], None),
        ]
        assert [(r["adapter"]["steps"], r["adapter"]["learning_rate"]) for r in rows[1:]] == [
            (2, 1e-3),
            (1, 5e-4),
        ]
        assert rows[1]["label"] == "LoRA, no context: 2 steps, lr 1e-3, 4 rows"
    assert "| passkey-512 | LoRA, no context: 1 step, lr 5e-4, 2 rows | 2 |" in (out / "eval.md").read_text()
    assert report["perplexity"]["skipped"].startswith("measured in test runs only")  # its prose is test text
    assert report["ablations"]["perplexity_gap_closed"] is None
    title, _, notice = (out / "eval.md").read_text().splitlines()[:3]
    assert title.startswith("# Evaluation on the validation split: ")
    assert notice.startswith("**Split: validation, not test.**")
    assert done.stdout.startswith("**Split: validation, not test.**")
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    squad_questions = {p["question"] for p in predictions if p["test_set"] == "squad-long"}
    assert len(squad_questions) == 2
    assert squad_questions <= {row.question for row in load_squad(DATA, "validation").rows}
    assert [p.get("recipe") for p in predictions if p["test_set"] == "squad-long"] == [None] * 2 + [
        recipes[0]
    ] * 2 + [recipes[1]] * 2


def test_recipes_are_checked_before_any_model_loads(tmp_path: Path) -> None:
    from lloco.cli import app
    from typer.testing import CliRunner

    out = tmp_path / "out"
    env = {"LLOCO_QA_DATA_DIR": str(DATA), "LLOCO_DATA_DIR": str(tmp_path / "data")}
    for extra, message in [
        (["--recipes", "80:5e-4"], "a recipe is STEPS:LR:ROWS (e.g. 80:5e-4:240), got '80:5e-4'"),
        (["--recipes", "80:fast:240"], "got '80:fast:240': could not convert string to float"),
        (["--recipes", "0:5e-4:240"], "steps and rows must be >= 1, the learning rate > 0"),
        (["--recipes", "80:-1e-3:240"], "steps and rows must be >= 1, the learning rate > 0"),
        (["--recipes", " , "], "--recipes takes STEPS:LR:ROWS entries"),
        (["--recipes", "80:5e-4:240,80:0.0005:240"], "recipe 80:5e-4:240 is given twice"),
        (
            ["--recipes", "80:5e-4:240", "--modes", "none,full"],
            "modes has none of lloco, lora_none, full_lora",
        ),
        (["--recipes", "80:5e-4:240", "--train-steps", "80"], "drop --train-steps"),
        (["--recipes", "80:5e-4:240", "--learning-rate", "1e-3"], "drop --learning-rate"),
        (["--recipes", "80:5e-4:240,80:5e-4:500"], "asks up to 500 train rows, but --train-limit loads 400"),
        (["--recipes", "8:1e-3:4", "--corpus-documents", "10"], "corpus mode trains none"),
    ]:
        result = CliRunner().invoke(app, ["eval", "--output", str(out), *extra], env=env)
        assert result.exit_code == 1 and result.stderr.startswith("error: "), result.output
        assert message in result.stderr, result.stderr
    assert not out.exists()  # refused before any work


def test_a_sweep_trains_each_recipe_on_contexts_compressed_once(
    tiny_base: object,
    compressor_dir: Path,
    count_tokens: object,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compressor = Compressor.load(compressor_dir, tiny_base)
    compress_calls = []
    compress = compressor.compress
    monkeypatch.setattr(
        compressor, "compress", lambda *a, **kw: compress_calls.append(1) or compress(*a, **kw)
    )
    dataset = passkey(2, 4, count_tokens, lengths=(512,), seed=0)
    recipes = (Recipe(train_steps=2, learning_rate=1e-3, train_rows=4), Recipe(train_steps=1, train_rows=2))
    options = EvalOptions(
        modes=("none", "compressed", "lloco", "lora_none"), recipes=recipes, max_new_tokens=4
    )
    settings = FinetuneSettings(batch_size=2, learning_rate=5e-4)
    evaluator = Evaluator(tiny_base, compressor, settings, options)
    results = evaluator.run([dataset])
    first, second = (
        {"train_steps": 2, "learning_rate": 1e-3, "train_rows": 4},
        {"train_steps": 1, "learning_rate": 5e-4, "train_rows": 2},  # the settings' learning rate
    )
    assert [(r.mode, r.recipe) for r in results] == [
        ("none", None),
        ("compressed", None),
        ("lloco", first),
        ("lloco", second),
        ("lora_none", first),
        ("lora_none", second),
    ]  # test set, mode, recipe in the order given; the modes without adapters once
    for result in results[2:]:
        recipe, adapter = result.recipe, result.adapter
        assert result.skipped is None and result.queries == 2
        assert (adapter["steps"], adapter["learning_rate"]) == (
            recipe["train_steps"],
            recipe["learning_rate"],
        )
        assert 0 < adapter["examples"] <= recipe["train_rows"]
    lloco_first, lloco_second = results[2].adapter, results[3].adapter
    assert lloco_first["init_sha256"] == lloco_second["init_sha256"]  # the same start, other training
    assert lloco_first["examples"] == 4 and lloco_second["examples"] == 2  # the first 2 of the 4 rows
    assert results[2].label == "LLoCO (compressed + LoRA): 2 steps, lr 1e-3, 4 rows"
    # the documents compressed once: the test side, then the train side at the first LLoCO adapter
    assert len(compress_calls) == 2
    test_tokens = evaluator._tokenize(dataset.tests[0].qaset.documents)
    train_tokens = evaluator._tokenize(dataset.train.documents)
    costs = evaluator.costs[dataset.name]
    assert costs["compressed_tokens"] == sum(map(len, [*test_tokens.values(), *train_tokens.values()]))
    report = write_report(tmp_path, results, {"split": "test"})
    assert [
        (row["recipe"], row["lloco_minus_lora_none"]) for row in report["ablations"]["lloco_vs_baselines"]
    ] == [
        (first, results[2].scores["f1"] - results[4].scores["f1"]),
        (second, results[3].scores["f1"] - results[5].scores["f1"]),
    ]
    by_depth = report["ablations"]["em_by_depth"]
    assert [row.get("recipe") for row in by_depth] == [None, None, first, second, first, second]
    table = (tmp_path / "eval.md").read_text()
    assert "| passkey-512 | recipe | score |" not in table and "| test set | recipe | score |" in table
    assert "| passkey-512 | 1 step, lr 5e-4, 2 rows | F1 |" in table
    assert "| passkey-512 | LoRA, no context: 1 step, lr 5e-4, 2 rows | " in table


def test_a_sweep_refuses_rows_past_the_loaded_and_skips_by_recipe_past_its_budget(
    tiny_base: object, compressor_dir: Path, count_tokens: object
) -> None:
    compressor = Compressor.load(compressor_dir, tiny_base)
    dataset = passkey(1, 3, count_tokens, lengths=(512,), seed=0)
    settings = FinetuneSettings(batch_size=2)
    too_many = EvalOptions(
        modes=("lora_none",), recipes=(Recipe(train_steps=1, learning_rate=1e-3, train_rows=4),)
    )
    evaluator = Evaluator(tiny_base, compressor, settings, too_many)
    with pytest.raises(InvalidArgument, match=r"recipe 1:1e-3:4 asks 4 train rows, but passkey loaded 3"):
        evaluator.run([dataset])
    assert evaluator.costs == {}  # refused before any work
    recipes = tuple(Recipe(train_steps=1, learning_rate=1e-3, train_rows=n) for n in (3, 2))
    options = EvalOptions(modes=("lloco", "lora_none"), recipes=recipes, max_new_tokens=2)
    evaluator = Evaluator(tiny_base, compressor, settings, options)

    def spend_the_budget_after_the_first_recipe(results: list) -> None:
        if sum(r.recipe is not None and r.recipe["train_rows"] == 3 for r in results) == 2:
            evaluator.deadline = 0.0  # as if the time budget ran out here

    results = evaluator.run([dataset], on_result=spend_the_budget_after_the_first_recipe)
    assert [(r.mode, r.recipe["train_rows"], r.skipped) for r in results] == [
        ("lloco", 3, None),
        ("lloco", 2, "time budget spent"),
        ("lora_none", 3, None),
        ("lora_none", 2, "time budget spent"),
    ]


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


def test_gap_closed_arithmetic() -> None:
    assert gap_closed(8.48, 8.25, 4.80) == pytest.approx(0.0625)  # the figures: 6% of the gap
    assert gap_closed(10.0, 10.0, 5.0) == 0.0
    assert gap_closed(10.0, 5.0, 5.0) == 1.0
    assert gap_closed(10.0, 12.0, 5.0) == pytest.approx(-0.4)  # worse than nothing
    assert gap_closed(5.0, 4.0, 5.0) is None and gap_closed(5.0, 4.0, 6.0) is None  # no gap to close


def test_passkey_facts_sit_at_their_depths(tiny_base: object, count_tokens: object) -> None:
    tokenizer = tiny_base.tokenizer
    documents = pk.passkey_documents("test", 8192, 6, count_tokens, seed=0)
    assert [d.asked.depth for d in documents] == [*pk.DEPTHS, pk.DEPTHS[0]]
    fixture = json.loads(pk.FILLER_FILE.read_text())
    filler = {s for a in fixture["splits"]["test"] for p in a["paragraphs"] for s in p}
    for document in documents:
        assert 0.95 * 8192 <= document.tokens <= 8192
        assert document.tokens == len(tokenizer.encode(document.text, add_special_tokens=False))
        assert len(document.facts) == pk.FACTS_PER_DOCUMENT
        assert sorted({f.depth for f in document.facts}) == sorted(f.depth for f in document.facts)
        assert sum(f.kind == document.asked.kind for f in document.facts) >= 2  # a same-kind distractor
        for fact in document.facts:
            assert document.text[fact.char_offset :].startswith(fact.statement)
            assert document.text.count(fact.statement) == 1 and fact.answer in fact.statement
            position = len(tokenizer.encode(document.text[: fact.char_offset], add_special_tokens=False))
            assert abs(position - fact.token_position) <= 2
            assert abs(position / document.tokens - fact.depth) <= 0.02
        sentences = [s for s in filler if s in document.text]
        assert all(document.text.count(s) == 1 for s in sentences)  # filler never repeats in a document
        assert sum(map(len, sentences)) > 0.8 * len(document.text)
    again = pk.passkey_documents("test", 8192, 2, count_tokens, seed=0)
    assert again == documents[:2]  # deterministic, and a smaller count is a prefix
    with pytest.raises(InvalidArgument, match="too few"):
        pk.passkey_documents("test", 10**6, 1, count_tokens)
    with pytest.raises(InvalidArgument, match="split"):
        pk.passkey_documents("dev", 512, 1, count_tokens)


def _template_pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{subject\}", ".+").replace(r"\{value\}", ".+"))


def test_passkey_train_and_test_share_nothing(count_tokens: object) -> None:
    splits = json.loads(pk.FILLER_FILE.read_text())["splits"]
    assert all(25 <= a["squad_index"] < 35 for a in splits["test"])  # SQuAD-long's test articles
    assert all(a["squad_index"] < 25 for a in splits["train"])
    statements = {split: {t.statement for t in pk.TEMPLATES[split]} for split in ("train", "test")}
    assert not statements["train"] & statements["test"]
    for name in ("projects", "first_names", "surnames", "cities"):
        assert not set(getattr(pk.POOLS["train"], name)) & set(getattr(pk.POOLS["test"], name))
    documents = {
        split: pk.passkey_documents(split, 1024, 40, count_tokens, seed=0) for split in ("train", "test")
    }
    answers = {split: {f.answer for d in docs for f in d.facts} for split, docs in documents.items()}
    assert not answers["train"] & answers["test"]
    paragraphs = {split: {p for d in docs for p in d.text.split("\n\n")} for split, docs in documents.items()}
    assert not paragraphs["train"] & paragraphs["test"]
    for split, docs in documents.items():  # every planted sentence follows a template of its own split
        own = [_template_pattern(t.statement) for t in pk.TEMPLATES[split]]
        other = [
            _template_pattern(t.statement) for t in pk.TEMPLATES["test" if split == "train" else "train"]
        ]
        for fact in (f for d in docs for f in d.facts):
            assert any(p.fullmatch(fact.statement) for p in own)
            assert not any(p.fullmatch(fact.statement) for p in other)


def test_evidence_is_the_questions_best_sentences_in_document_order_within_budget(tiny_base: object) -> None:
    text = "Paris is in France.  The Zorbl project started in 1999!\nIts code is 4821. Rome is old?"
    assert [text[a:b] for a, b in sentence_spans(text)] == [
        "Paris is in France.",
        "The Zorbl project started in 1999!",
        "Its code is 4821.",
        "Rome is old?",
    ]
    tokenizer = tiny_base.tokenizer
    cost = lambda part: len(tokenizer.encode(part, add_special_tokens=False)) + 1  # noqa: E731 - plus a space
    started, code = cost("The Zorbl project started in 1999!"), cost("Its code is 4821.")
    evidence = Evidence([text], tokenizer)  # indexed once, asked many questions
    assert evidence.text("When did the Zorbl project start?", started) == "The Zorbl project started in 1999!"
    # room for two sentences: the best one and the best of the rest that fits, in the text's order; a
    # follow-up query from the first hit finds the second ("code" is the only word it shares)
    both = evidence.text("Which code has the Zorbl project?", started + code)
    assert both == "The Zorbl project started in 1999! Its code is 4821."
    ids = evidence.ids("Which code has the Zorbl project?", started + code)
    assert tokenizer.decode(ids) == both and len(ids) <= started + code
    assert evidence.text("Zorbl?", started - 1) == ""  # its sentence does not fit
    assert evidence.text("unrelated words", 1000) == "" and evidence.ids("unrelated words", 1000) == []
    documents = Evidence(["Rome is old.", "The Zorbl code is 4821."], tokenizer)  # their sentences, in order
    assert documents.text("Zorbl code?", 1000) == "The Zorbl code is 4821."
    assert documents.text("Is the Zorbl code as old as Rome?", 1000) == "Rome is old. The Zorbl code is 4821."
    assert Evidence([""], tokenizer).text("Zorbl?", 1000) == ""  # no sentence at all


def test_evidence_modes_read_the_questions_sentences_within_the_budget(
    tiny_base: object, count_tokens: object
) -> None:
    """``lora_evidence`` sees evidence tokens within the whole context budget (documents / ratio) and no
    summaries; ``lloco_evidence`` the summaries, then evidence in what they leave of that budget. Both hold
    the asked fact of every passkey document."""
    compressor = Compressor.salient(tiny_base, 32, 4)  # 8x
    dataset = passkey(2, 4, count_tokens, lengths=(512,), seed=0)
    modes = ("lloco_evidence", "lora_evidence")
    with pytest.raises(InvalidArgument, match="need a context ratio"):
        Evaluator(tiny_base, compressor, FinetuneSettings(context_ratio=0), EvalOptions(modes=modes))
    options = EvalOptions(modes=modes, train_steps=2, context_ratio=2, max_new_tokens=4)
    evaluator = Evaluator(tiny_base, compressor, FinetuneSettings(batch_size=2), options)
    results = {r.mode: r for r in evaluator.run([dataset])}
    assert set(results) == set(modes) and all(r.skipped is None for r in results.values())
    with_summaries, alone = results["lloco_evidence"], results["lora_evidence"]
    summaries = 4 * math.ceil(alone.document_tokens / 32)  # k 4 per 32 tokens
    assert 0 < with_summaries.context_tokens - summaries <= alone.context_tokens <= alone.document_tokens / 2
    assert with_summaries.context_tokens <= with_summaries.document_tokens / 2  # summaries + evidence
    tokens = evaluator._tokenize(dataset.train.documents)
    contexts = evaluator._compress(tokens)
    tokenizer = tiny_base.tokenizer
    built = {
        form: evaluator.examples(dataset, form, tokens, contexts)
        for form in ("evidence", "compressed_evidence")
    }
    for alone_example, after in zip(built["evidence"], built["compressed_evidence"], strict=True):
        row = dataset.train.rows[alone_example.line - 1]
        document_tokens = len(tokens[row.doc_ids[0]])
        for example, evidence, budget in (
            (alone_example, evaluator.evidence(row, tokens, summaries=False), document_tokens // 2),
            (after, evaluator.evidence(row, tokens, summaries=True), document_tokens // 2 - after.prefix_len),
        ):
            assert 0 < len(evidence) <= budget
            assert row.answer in tokenizer.decode(evidence)  # the planted fact's sentence
            prompt = chat_prompt(tokenizer, dataset.question(row))
            assert example.input_ids[: len(evidence) + len(prompt)] == evidence + prompt
        assert alone_example.prefix is None and after.prefix_len == contexts[row.doc_ids[0]].shape[0]


def test_lora_none_examples_hold_no_context_and_the_same_rows(
    tiny_base: object, compressor_dir: Path, count_tokens: object
) -> None:
    compressor = Compressor.load(compressor_dir, tiny_base)
    dataset = passkey(1, 6, count_tokens, lengths=(512, 1024), seed=0)
    probe = Evaluator(tiny_base, compressor, FinetuneSettings(), EvalOptions())
    tokens = probe._tokenize(dataset.train.documents)
    vectors = {doc_id: math.ceil(len(ids) / 32) * 4 for doc_id, ids in tokens.items()}  # S=32, k=4
    assert max(vectors.values()) - min(vectors.values()) >= 48  # 512- and 1024-token documents
    tokenizer = tiny_base.tokenizer
    longest_qa = max(
        len(chat_prompt(tokenizer, dataset.question(row)))
        + len(tokenizer.encode(row.answer, add_special_tokens=False))
        + 1
        for row in dataset.train.rows
    )
    options = EvalOptions(  # room for 64 vectors, not 112 (no evidence mode: no evidence budget to fit)
        modes=("lloco", "lora_none", "full_lora"), train_max_length=longest_qa + 64
    )
    evaluator = Evaluator(tiny_base, compressor, FinetuneSettings(), options)
    contexts = evaluator._compress(tokens)
    built = {
        form: evaluator.examples(dataset, form, tokens, contexts) for form in ("compressed", "none", "full")
    }
    lines = [e.line for e in built["none"]]
    assert lines == [e.line for e in built["compressed"]] == [e.line for e in built["full"]]
    assert lines == [i for i, row in enumerate(dataset.train.rows, 1) if vectors[row.doc_ids[0]] <= 64]
    assert 0 < len(lines) < len(dataset.train.rows)
    for example in built["none"]:
        row = dataset.train.rows[example.line - 1]
        answer = [*tokenizer.encode(row.answer, add_special_tokens=False), tokenizer.eos_token_id]
        assert example.prefix is None and example.prefix_len == 0  # zero context tokens
        assert example.input_ids == chat_prompt(tokenizer, dataset.question(row)) + answer
        assert example.answer_len == len(answer)
    for compressed, full in zip(built["compressed"], built["full"], strict=True):
        assert compressed.prefix_len <= 64 and len(full.input_ids) > len(compressed.input_ids)


@pytest.fixture(scope="module")
def init_files(tiny_base: object) -> dict[str, bytes]:
    """A tiny 'reader' LoRA (r4 on q/v, nonzero B) in PEFT format, as the compressor may ship one."""
    lora = TrainableLora(tiny_base.config, 4, 8, ("q_proj", "v_proj"), seed=5)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for b in lora.b.values():
            b.normal_(0, 0.05, generator=generator)
    return lora.peft_files(tiny_base.model_id, torch.float32)


def test_lloco_and_lora_none_start_from_the_same_init(
    tiny_base: object, compressor_dir: Path, count_tokens: object, init_files: dict[str, bytes]
) -> None:
    compressor = Compressor.load(compressor_dir, tiny_base)
    dataset = passkey(1, 4, count_tokens, lengths=(512,), seed=0)
    options = EvalOptions(modes=("lloco", "lora_none"), train_steps=1, max_new_tokens=4)
    settings = FinetuneSettings(batch_size=2)
    given = Evaluator(tiny_base, compressor, settings, options, adapter_init=init_files).run([dataset])
    digest = state_digest(read_peft_files(init_files)[1])
    assert [(r.mode, r.adapter["init"], r.adapter["init_sha256"]) for r in given] == [
        ("lloco", "given", digest),
        ("lora_none", "given", digest),
    ]
    assert given[0].scores_by_depth is not None and given[1].context_tokens == 0
    default = Evaluator(tiny_base, compressor, settings, options).run([dataset])
    assert default[0].adapter["init"] == default[1].adapter["init"] == "random (seed 0)"
    assert default[0].adapter["init_sha256"] == default[1].adapter["init_sha256"] != digest
    examples = Evaluator(tiny_base, compressor, settings, options).examples(
        dataset, "none", {d: [] for d in dataset.train.documents}, {}
    )
    trained = train_adapter(tiny_base, examples, settings, steps=1, init=init_files)
    assert peft_geometry(trained.files) == (("q_proj", "v_proj"), 4)  # the init's geometry, not the settings'
    broken = {**init_files, "adapter_model.safetensors": b"not safetensors"}
    with pytest.raises(InvalidArgument):
        Evaluator(tiny_base, compressor, settings, options, adapter_init=broken)


def test_a_compressors_reader_is_the_compressed_modes_adapter_and_every_lora_modes_init(
    tiny_base: object, compressor_dir: Path, count_tokens: object, init_files: dict[str, bytes]
) -> None:
    plain = Compressor.load(compressor_dir, tiny_base)
    compressor = Compressor(
        tiny_base, plain.summary_embeds, plain.segment_len, True, plain.adapter_files, plain.output_scale,
        reader_files=init_files,
    )  # fmt: skip
    dataset = passkey(1, 4, count_tokens, lengths=(512,), seed=0)
    options = EvalOptions(modes=("none", "compressed", "lloco", "lora_none"), train_steps=1, max_new_tokens=4)
    results = Evaluator(tiny_base, compressor, FinetuneSettings(batch_size=2), options).run([dataset])
    digest = state_digest(read_peft_files(init_files)[1])
    adapters = {r.mode: r.adapter for r in results}
    assert adapters["none"] is None
    assert adapters["compressed"]["init"] == "compressor reader" and adapters["compressed"]["steps"] == 0
    assert adapters["lloco"]["init_sha256"] == adapters["lora_none"]["init_sha256"] == digest


def test_corpus_mode_retrieves_from_one_corpus_and_scores_recall(
    tiny_base: object, compressor_dir: Path
) -> None:
    """Corpus mode: held-out questions against one corpus of their paragraphs plus distractors; each asked top-k
    gives a retrieval row citing segments of corpus paragraphs, the oracle reads the gold paragraphs whole."""
    from lloco.eval.corpus import corpus_modes, hotpotqa_corpus, run_corpus

    corpus = hotpotqa_corpus(DATA, limit=3, min_documents=60, seed=0)
    assert len(corpus.documents) >= 60 and len(corpus.questions) == 3
    assert all(q.gold and set(q.gold) <= set(corpus.documents) for q in corpus.questions)
    compressor = Compressor.load(compressor_dir, tiny_base)
    evaluator = Evaluator(tiny_base, compressor, FinetuneSettings(), EvalOptions())
    results = run_corpus(evaluator, corpus, top_ks=[4, 1], max_new_tokens=2)
    assert [r.mode for r in results] == corpus_modes([4, 1])
    assert corpus_modes([4, 1]) == ["retrieval@4", "retrieval@1", "retrieval_prev@4", "oracle", "none"]
    retrieval, top_one, with_preceding, oracle, none = results
    assert with_preceding.scores["recall_at_4"] == retrieval.scores["recall_at_4"]
    assert top_one.scores["recall_at_1"] <= retrieval.scores["recall_at_4"]
    assert 0 < top_one.context_tokens == compressor.k  # one segment's own vectors
    assert retrieval.context_tokens <= with_preceding.context_tokens <= 2 * retrieval.context_tokens
    assert 0 <= retrieval.scores["recall_at_4"] <= 100 and "f1" in retrieval.scores
    assert 0 < retrieval.context_tokens <= 4 * compressor.k  # at most top_k segments' own vectors
    for row in results:
        assert row.scores["f1_low"] <= row.scores["f1"] <= row.scores["f1_high"]
        # a retrieval row's share of the oracle's F1 exists exactly when the oracle scored at all
        share = row.mode.startswith("retrieval") and oracle.scores["f1"] > 0
        assert ("f1_vs_oracle" in row.scores) == share
    gold_segments = [
        math.ceil(len(tiny_base.tokenizer.encode(corpus.documents[d], add_special_tokens=False)) / 32)
        for q in corpus.questions
        for d in q.gold
    ]
    assert oracle.context_tokens == sum(gold_segments) * compressor.k / len(corpus.questions)
    assert none.context_tokens == 0 and "recall_at_4" not in none.scores
