"""`lloco demo`'s code path end to end with a tiny model and a short schedule: every stage's result is checked."""

from __future__ import annotations

from pathlib import Path

import pytest
from lloco.config import ModelSettings, ServeSettings, Settings
from lloco.demo import DemoOptions, format_table, load_articles, run_demo, split_questions
from pydantic import SecretStr


def test_held_out_questions_are_never_trained_on() -> None:
    options = DemoOptions()
    for articles in load_articles().values():
        for article in articles:
            train, held_out = split_questions(article, options)
            assert held_out and train
            assert not {q for q, _ in train} & {q for q, _ in held_out}


@pytest.mark.slow
def test_demo_runs_every_stage(tiny_model_dir: Path, tmp_path: Path) -> None:
    from lloco.model import Compressor, load_model
    from lloco.ports import free_port

    base = load_model(str(tiny_model_dir), tmp_path / "cache", dtype="float32")
    # the kind of compressor the default model ships: key/value summaries of salient sentences, so the
    # compress job, the tenant finetunes and the engine run on keys and values end to end (16x here: at 8x the
    # articles' contexts would pass the tiny model's 1,024 positions)
    compressor_dir = Compressor.salient(base, segment_len=256, k=16).save(tmp_path / "compressor")
    settings = Settings(
        data_dir=tmp_path / "data",
        admin_key=SecretStr("demo-admin-key"),
        model=ModelSettings(
            base_model=str(tiny_model_dir),
            compressor=str(compressor_dir),
            dtype="float32",
            cache_dir=tmp_path / "cache",
        ),
        serve=ServeSettings(grpc_port=free_port(), http_port=None),
    )
    options = DemoOptions(
        articles_per_tenant=1,
        train_questions_per_article=8,
        held_out_per_article=2,
        max_new_tokens=8,
        train_steps=3,
    )
    import ray

    ray_was_running = ray.is_initialized()
    lines: list[str] = []
    report = run_demo(settings, options, echo=lines.append)

    assert report.documents == {"acme": ["Amazon_rainforest"], "globex": ["Sky_United_Kingdom"]}
    assert report.contexts == {"acme": 1, "globex": 1}
    assert report.compress_summary["compressed"] == 2 and report.compress_summary["failed"] == 0
    assert report.adapters == {"acme": "v000001", "globex": "v000001"}
    assert report.train_steps == {"acme": 3, "globex": 3}  # every trainer step reached the progress bars
    assert len(report.answers) == 4
    for row in report.answers:
        assert row.adapter_version == "v000001"
        assert 0 < row.context_tokens < row.document_tokens
        assert 0.0 <= row.f1 <= 1.0 and row.latency_s > 0
    assert set(report.stage_seconds) and all(f"[{n}/7]" in "\n".join(lines) for n in range(1, 8))
    assert "mean F1" in format_table(report)
    # Nothing left running: Ray is back as it was and no SeaweedFS serves the demo's data dir.
    import subprocess

    assert ray.is_initialized() == ray_was_running
    running = subprocess.run(["pgrep", "-f", str(tmp_path / "data")], capture_output=True, text=True).stdout
    assert running.strip() == ""

    # A second run on the same data reuses tenants, documents and contexts, and publishes new versions.
    again = run_demo(settings, options, echo=lines.append)
    assert again.compress_summary["compressed"] == 0 and again.compress_summary["skipped"] == 2
    assert again.adapters == {"acme": "v000002", "globex": "v000002"}
    assert len(again.answers) == 4 and {row.adapter_version for row in again.answers} == {"v000002"}


def test_demo_command_is_registered() -> None:
    from lloco.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0, result.output
    assert "--keep-running" in result.output
