"""The end-to-end benchmark at its smallest on CPU: the real stack (SeaweedFS, local Ray, Serve, gRPC), the tiny
random model, two tenants with their own documents and adapters, streaming clients over the public API."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest
from lloco.bench import e2e
from lloco.model.generate import Generator

pytestmark = pytest.mark.timeout(300)


def test_tiny_run_measures_grpc_beside_the_engine_alone(
    tmp_path: Path, ray_local: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    engines_alive: list[int] = []
    measure_full_document = e2e.full_document

    def full_document(*args: Any) -> dict[str, float]:
        """On an 80 GB card the engine alone's KV cache and the full document's do not fit side by side."""
        engines_alive.append(sum(isinstance(o, Generator) for o in gc.get_objects()))
        return measure_full_document(*args)

    monkeypatch.setattr(e2e, "full_document", full_document)
    out = tmp_path / "bench"
    paced = ["--set", "serve.stream_messages_per_s=500", "--varied-lengths"]
    result = e2e.main(
        ["--out", str(out), "--tiny", "--clients", "2", "--queries", "2", "--new-tokens", "3", *paced]
    )
    assert engines_alive == [0]

    assert json.loads((out / "e2e-tiny.json").read_text()) == json.loads(json.dumps(result, default=str))
    assert result["errors"] == []
    single, load = result["single"], result["load"]
    assert set(single) == {"grpc", "engine", "full_document"}
    for path in single.values():
        assert 0 < path["ttft_ms"] <= path["total_ms"] and path["tokens"] == 3
    assert 0 < single["grpc"]["server_ttft_ms"] <= single["grpc"]["ttft_ms"]
    assert single["full_document"]["prompt_tokens"] > e2e.PLANS["tiny"].long_doc_tokens * 0.9
    # --varied-lengths: the load's queries ask for 1-4 tokens, the same sequence on both paths
    plan = e2e.E2EPlan(**result["plan"])
    asked = [e2e.load_new_tokens(plan, client * 1000 + n) for client in (0, 1) for n in (0, 1)]
    assert plan.varied_lengths and all(1 <= tokens <= 4 for tokens in asked) and len(set(asked)) > 1
    for path in ("grpc", "engine"):
        run = load[path]
        assert run["queries"] == 2 * 2 and run["tokens_per_s"] > 0  # the same requests on both paths
        assert run["ttft_p50_ms"] <= run["ttft_p99_ms"] <= run["latency_p99_ms"]
        assert 0 < run["ttft_p50_steady_ms"] <= run["ttft_p99_steady_ms"] <= run["ttft_p99_ms"]
        assert 0 < run["cold_ttft"]["p50_ms"] <= run["cold_ttft"]["max_ms"]  # one warm-up query per tenant
        shares = run["tenants"]
        assert len(shares) == 2 and all(row["queries"] == 2 for row in shares.values())
        assert sorted(row["tokens"] for row in shares.values()) == sorted([sum(asked[:2]), sum(asked[2:])])
        assert sum(row["share"] for row in shares.values()) == pytest.approx(1.0)
    # the server's clock (the replies' stats) starts after the client's and stops before it
    grpc_load = load["grpc"]
    assert 0 < grpc_load["server_ttft_p50_steady_ms"] <= grpc_load["ttft_p50_steady_ms"]
    assert "server_ttft_p50_steady_ms" not in load["engine"]
    assert load["engine"]["graph_captures"]["load"] == [0, 0]  # no CUDA graphs on the CPU
    assert load["engine"]["start_s"] > 0
    for path in ("grpc", "engine"):  # every query admitted once, at most a batch of rows an iteration
        steps = load[path]["scheduler"]
        assert steps["iterations_per_s"] > 0 and 0 < steps["admitting_share"] <= 1
        assert 1 <= steps["rows_per_admitting_iteration"] <= e2e.PLANS["tiny"].max_batch
        assert (
            steps["rows_per_admitting_iteration"]
            <= steps["rows_admitted_with"]
            <= e2e.PLANS["tiny"].max_batch
        )
        assert steps["worker_ms_admitting"] > 0 and steps["worker_ms_other"] >= 0 and steps["gap_ms"] >= 0
        assert 0 < steps["worker_share"] + steps["gap_share"] <= 1
        # bench.e2e prefills every context (its prefix cache is off): every load query missed
        assert steps["prefix_cache_hits"] == 0 < steps["prefix_cache_misses"], path
    # the engine's own account of its TTFT, on both paths (gRPC replies carry it in their stats); per query:
    # test_engine_core
    for path in ("grpc", "engine"):
        parts = load[path]["ttft_parts_steady_ms"]
        assert set(parts) == {"prepare", "queue", "prefill", "ttft"}
        assert all(0 <= parts[name]["p50"] <= parts[name]["p99"] for name in parts)
        assert single[path]["ttft_parts_ms"]["prefill"] > 0
    # the engine's parts fit in the server's TTFT, which fits in the client's
    assert sum(single["grpc"]["ttft_parts_ms"].values()) <= single["grpc"]["server_ttft_ms"]
    assert [g["goal"].split(" ")[0] for g in result["goals"]] == ["gRPC", "end", "tokens/s", "TTFT"]
    table = (out / "e2e-tiny.md").read_text()
    assert "| gRPC (compressed context) |" in table and "| EngineCore alone |" in table
    assert table.count("| | prepare | queue | prefill | ttft |") == 2
    assert "| path | iterations/s | admitting |" in table and table.count("% |") >= 2
    assert "Where the gRPC query's TTFT went (the engine's clock, medians): prepare " in table
    assert "The gRPC path's TTFT at the server" in table
    assert result["stream_messages_per_s"] == 500 and "at most 500.0 messages/s" in table


def test_set_names_a_setting_or_is_refused(tmp_path: Path) -> None:
    from lloco.config import Settings

    settings = Settings(data_dir=tmp_path)
    changed = e2e.with_assignments(settings, ["engine.prefill_chunk_tokens=4096", "serve.http_port=null"])
    assert changed.engine.prefill_chunk_tokens == 4096 and changed.serve.http_port is None
    assert changed.model_dump() == settings.model_dump() | {
        "engine": settings.engine.model_dump() | {"prefill_chunk_tokens": 4096},
        "serve": settings.serve.model_dump() | {"http_port": None},
    }
    for wrong in (
        "engine.no_such_field=1",
        "engine.prefill_chunk_tokens",
        "nothing=1",
        "engine.max_batch_size.x=1",
    ):
        with pytest.raises(ValueError, match="names no setting"):
            e2e.with_assignments(settings, [wrong])


def test_a_run_cut_short_reports_what_it_measured() -> None:
    """A host call's time limit can end the run between sections: the goals and the table cover what finished."""
    partial = {
        "command": "python -m lloco.bench.e2e",
        "device_name": "cpu",
        "date": "today",
        "torch": "2",
        "dtype": "fp32",
        "plan": vars(e2e.PLANS["tiny"]),
        "single": {"grpc": {"ttft_ms": 20.0, "total_ms": 40.0, "tokens": 3}},
        "load": {},
        "errors": ["KeyboardInterrupt: stopped by signal 15"],
    }
    assert e2e.evaluate_goals(partial) == []
    table = e2e.render_markdown(partial | {"goals": []})
    assert "| gRPC (compressed context) | 20.0 | 40.0 |" in table and "EngineCore alone" not in table
    assert "stopped by signal 15" in table
