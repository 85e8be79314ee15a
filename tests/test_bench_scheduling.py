"""The scheduling sections of the serve benchmark at their smallest, on CPU: a random small-geometry model,
the engine's own classes and a real SeaweedFS store; what they report holds together."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from lloco.bench import scheduling
from lloco.bench.common import GEOMETRIES, random_llama
from lloco.bench.workload import TTFT_PARTS
from lloco.model import LlamaConfig


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(**GEOMETRIES["small"], max_position_embeddings=1024)
    return random_llama(config, torch.device("cpu"), torch.float32, seed=0)


def test_prefill_burst_section_chunks_the_burst_beside_every_decoding_row(model) -> None:
    plan = replace(
        scheduling.PLANS["tiny"],
        decoders=2,
        decoder_prompt=8,
        burst=2,
        burst_tokens=40,
        chunks=(16,),
        steps_before=2,
    )
    result = scheduling.bench_prefill_burst(model, plan)
    whole, chunked = result["runs"]
    tail = 4
    assert whole["prefill_chunk_tokens"] is None and whole["burst_steps"] == 1 + tail
    assert chunked["prefill_chunk_tokens"] == 16 and chunked["burst_steps"] == math.ceil(80 / 16) + tail
    assert whole["steps_without_every_decoder"] == chunked["steps_without_every_decoder"] == 0
    assert whole["decode_captures_during_burst"] == 0  # no CUDA graphs on the CPU
    assert whole["max_step_vs_whole"] == 1.0 and chunked["burst_ttft_max_ms"] > 0
    assert "(e) Decode under a prefill burst" in "\n".join(
        scheduling.render_markdown({"prefill_burst": result})
    )


def test_fairness_section_runs_every_scenario(model, store) -> None:
    plan = replace(
        scheduling.PLANS["tiny"], tenants=2, rows=2, doc_tokens=1024, new_tokens=3, seconds=2.0, load=0.5
    )
    result = scheduling.bench_fairness(model, store, plan)
    assert result["context_vectors"] == 64 and result["capacity_queries_per_s"] > 0
    assert result["even"]["others"]["queries"] > 0 and result["heavy_10x"]["heavy"]["queries"] > 0
    # random weights end no answer early (with the tiny tokenizer's end-of-sequence id, 36 of these did)
    assert result["queries_cut_short"] == 0
    slowest = result["heavy_10x"]["others"]["slowest"]  # where the slowest TTFTs went, by the engine
    parts = sum(slowest[f"{part}_ms"] for part in TTFT_PARTS)
    assert slowest["queries"] >= 1 and 0 < parts <= slowest["ttft_ms"] * 1.01
    saturated = result["saturated"]
    assert sorted(saturated["clients"].values()) == [2, 20] and all(
        v > 0 for v in saturated["served"].values()
    )
    goals = scheduling.evaluate_goals({"fairness": result})
    assert len(goals) == 2 and all(isinstance(g["met"], bool) for g in goals)
    report = "\n".join(scheduling.render_markdown({"fairness": result}))
    assert "(f) Fairness" in report and "Where the others' slowest 1% of TTFTs went" in report
    assert "one at 10x |" in report and "Others' TTFT p99 ratio" in report
    assert list(store.list_keys("tenants/")) == []  # its tenants are deleted again


def test_main_writes_both_sections_and_the_goals(tmp_path) -> None:
    result = scheduling.main(["--out", str(tmp_path), "--tiny", "--sections", "prefill_burst"])
    assert result["errors"] == [] and len(result["prefill_burst"]["runs"]) == 3
    assert (tmp_path / "scheduling-tiny.md").read_text().startswith("# Scheduling benchmark (small")
