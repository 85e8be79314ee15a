"""Scheduling benchmark: chunked prefill and per-tenant fair admission, with random weights.

  python -m lloco.bench.scheduling --out DIR           # GPU: LLaMA-2-7B geometry, random bf16 weights
  python -m lloco.bench.scheduling --out DIR --tiny    # CPU: the small geometry, a smoke run

(e) decode under a prefill burst (``Generator`` alone): rows decode while a burst of long inputs arrives
    at once; for whole prefill and each chunk budget (``prefill_chunk_tokens``): the decoding rows' step
    time before the burst (p50) and while it is prefilled (p50, p99, max), and the burst's TTFT; timed
    on a second burst, after an untimed one that captures the burst's decode shapes (the bare ``Generator``
    captures on first use: the first burst would time a capture as a step), with the count of graphs
    still captured during the timed one (the decoders may reach a new key-length class).
(f) per-tenant fairness (``EngineCore``, every tenant with its compressed context and its own adapter):
    open-loop Poisson arrivals, first every tenant at the same rate (half the engine's capacity in all),
    then one tenant at ten times that rate: the other tenants' TTFT p50/p99 in both runs and the ratio of
    their p99; then every tenant saturating the engine (closed loop, the heavy tenant with ten times the
    clients): each tenant's weighted service (input + 2 x output tokens), the heavy one's against the
    others' mean. For the others' slowest 1% of TTFTs each run also reports the engine's account of where
    the time went (prepare, queue for a row, prefill).
    Contexts have the paper's geometry (S=1536, k=50; tiny: S=128, k=8). The store is a SeaweedFS on
    loopback, or the S3 at ``--s3-endpoint``. JSON and markdown go to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lloco.bench.common import (
    GEOMETRIES,
    PAPER_K,
    PAPER_SEGMENT_LEN,
    add_run_arguments,
    compressed_length,
    engine_compiles,
    free_memory,
    goals_and_errors,
    percentile,
    random_ids,
    random_llama,
    run_info,
)
from lloco.bench.report import run_section, write_report, write_unfinished
from lloco.bench.workload import (
    TTFT_PARTS,
    QuerySample,
    delete_tenants,
    engine_query,
    engine_request,
    object_store,
    plant_tenants,
    random_engine_parts,
)
from lloco.model import Generator, Llama, LlamaConfig, SamplingParams

GOAL_OTHERS_TTFT_P99_RATIO = 1.5  # issue 19: others' p99 TTFT with a 10x-rate tenant / without
# issue 19: the 10x tenant gets no more than its fair share while the others are backlogged; its service
# over the others' mean, with room for the counters' bounded lag (a few requests' cost over a run)
GOAL_HEAVY_SHARE = 1.1
HEAVY_RATE = 10


@dataclass(frozen=True)
class SchedulingPlan:
    """Sizes of the scheduling sections."""

    decoders: int  # rows decoding when the burst arrives
    decoder_prompt: int
    burst: int  # requests arriving at once
    burst_tokens: int  # input positions of each
    chunks: tuple[int, ...]  # prefill budgets compared with whole prefill
    steps_before: int  # decode steps timed before the burst
    tenants: int
    doc_tokens: int  # document each tenant's compressed context stands for
    new_tokens: int
    rows: int  # the engine's max_batch_size in (f)
    load: float  # offered load of the even run, as a fraction of the measured capacity
    seconds: float  # length of each run of (f)
    rank: int
    segment_len: int  # of the compressed contexts
    k: int
    geometry: str


PLANS = {
    "h200": SchedulingPlan(
        decoders=16,
        decoder_prompt=512,
        burst=4,
        burst_tokens=4096,
        chunks=(512, 2048),
        steps_before=16,
        tenants=8,
        doc_tokens=8192,
        new_tokens=64,
        rows=32,
        load=0.5,
        seconds=30.0,
        rank=8,
        segment_len=PAPER_SEGMENT_LEN,
        k=PAPER_K,
        geometry="llama2-7b",
    ),
    "tiny": SchedulingPlan(
        decoders=4,
        decoder_prompt=32,
        burst=2,
        burst_tokens=256,
        chunks=(32, 128),
        steps_before=6,
        tenants=4,
        doc_tokens=1024,
        new_tokens=8,
        rows=4,
        load=0.5,
        seconds=3.0,
        rank=8,
        segment_len=128,
        k=8,
        geometry="small",
    ),
}


# -- (e) decode under a prefill burst -------------------------------------------------------------------------


def bench_prefill_burst(model: Llama, plan: SchedulingPlan) -> dict[str, Any]:
    """Decode step times around a burst of long inputs, for whole prefill and each chunk budget."""
    runs = [_burst_run(model, plan, chunk) for chunk in (None, *plan.chunks)]
    whole = runs[0]
    for run in runs:
        run["max_step_vs_whole"] = run["burst_step_max_ms"] / whole["burst_step_max_ms"]
    return {"plan": asdict(plan), "runs": runs}


def _burst_run(model: Llama, plan: SchedulingPlan, chunk: int | None) -> dict[str, Any]:
    vocab = model.config.vocab_size
    tail = 4  # steps timed after the burst's last first token
    prefill_steps = math.ceil(
        (plan.decoders * plan.decoder_prompt + plan.burst * plan.burst_tokens) / min(plan.chunks)
    )
    # that the decoders live through, at most: two bursts (an untimed one captures their decode shapes)
    steps = 2 * (prefill_steps + tail) + 3 + plan.steps_before + 8
    max_seq_len = max(plan.burst_tokens + 8, plan.decoder_prompt + steps + 8)
    gen = Generator(
        model,
        None,
        plan.decoders + plan.burst,
        max_seq_len,
        eos_token_ids=(),
        compile=engine_compiles(model.device),
        max_prefill_tokens=max(16384, plan.burst * plan.burst_tokens),
        prefill_chunk_tokens=chunk,
    )
    decode_new = max_seq_len - plan.decoder_prompt - 1
    for i in range(plan.decoders):
        gen.add(
            f"d{i}",
            None,
            random_ids(plan.decoder_prompt, vocab, seed=i),
            params=SamplingParams(decode_new),
        )
    started: set[str] = set()
    while len(started) < plan.decoders:  # prefill of the decoders, then warm-up steps (graphs, compile)
        started |= {out.request_id for out in gen.step()}
    for _ in range(3):
        gen.step()
    _burst(gen, plan, tail, "warm")  # the burst's decode shapes (a larger batch) are captured on first use
    before = [_timed_step(gen)[0] for _ in range(plan.steps_before)]
    captures = gen.graph_captures
    during, first_token, stalled = _burst(gen, plan, tail, "b")
    captures = gen.graph_captures - captures  # the decoders may still reach a new key-length class
    del gen
    free_memory()
    run = {
        "prefill_chunk_tokens": chunk,
        "before_step_p50_ms": statistics.median(before),
        "burst_steps": len(during),
        "steps_without_every_decoder": stalled,
        "decode_captures_during_burst": captures,
        "burst_step_p50_ms": statistics.median(during),
        "burst_step_p99_ms": percentile(during, 99),
        "burst_step_max_ms": max(during),
        "burst_ttft_p50_ms": statistics.median(first_token.values()),
        "burst_ttft_max_ms": max(first_token.values()),
    }
    print(
        f"(e) burst {plan.burst} x {plan.burst_tokens} beside {plan.decoders} decoding rows, chunk {chunk}: "
        f"step {run['before_step_p50_ms']:.1f} ms before, max {run['burst_step_max_ms']:.1f} ms during; "
        f"burst TTFT max {run['burst_ttft_max_ms']:.0f} ms",
        flush=True,
    )
    return run


def _burst(
    gen: Generator, plan: SchedulingPlan, tail: int, tag: str
) -> tuple[list[float], dict[str, float], int]:
    """Add the burst, step until each of its inputs has its first token, then ``tail`` steps more: every
    step's time, each input's TTFT (ms), and the steps that missed a decoding row."""
    added = time.perf_counter()
    for i in range(plan.burst):
        prompt = random_ids(plan.burst_tokens, gen.model.config.vocab_size, seed=1000 + i)
        # done at its first token: the decoders' shapes come back after the burst
        gen.add(f"{tag}{i}", None, prompt, params=SamplingParams(1))
    during, first_token, stalled = [], {}, 0
    while len(first_token) < plan.burst:
        ms, outputs = _timed_step(gen)
        during.append(ms)
        done = time.perf_counter()
        for out in outputs:
            if out.request_id.startswith(tag) and out.request_id not in first_token:
                first_token[out.request_id] = (done - added) * 1e3
        stalled += sum(1 for out in outputs if out.request_id.startswith("d")) != plan.decoders
    during += [_timed_step(gen)[0] for _ in range(tail)]
    return during, first_token, stalled


def _timed_step(gen: Generator) -> tuple[float, list]:
    """Wall milliseconds of one step (what a decoding row waits for its token), and its outputs."""
    started = time.perf_counter()
    outputs = gen.step()
    return (time.perf_counter() - started) * 1e3, outputs


# -- (f) per-tenant fairness -----------------------------------------------------------------------------------


def bench_fairness(model: Llama, store: Any, plan: SchedulingPlan) -> dict[str, Any]:
    return asyncio.run(_bench_fairness(model, store, plan))


async def _bench_fairness(model: Llama, store: Any, plan: SchedulingPlan) -> dict[str, Any]:
    from lloco.config import EngineSettings, LoraSettings, ServeSettings, Settings
    from lloco.serve.engine_core import EngineCore

    loaded, compressor = random_engine_parts(model, plan.segment_len, plan.k)
    n_vectors = compressed_length(plan.doc_tokens, plan.segment_len, plan.k)
    engine = EngineSettings(
        max_batch_size=plan.rows,
        max_seq_len=math.ceil((n_vectors + 64 + plan.new_tokens + 64) / 128) * 128,
        context_cache_gpu_bytes=2**30,
        context_cache_cpu_bytes=2**30,
    )
    settings = Settings(
        engine=engine,
        lora=LoraSettings(max_rank=plan.rank, gpu_slots=plan.tenants, cpu_adapters=2 * plan.tenants),
        serve=ServeSettings(max_ongoing_requests=64 * plan.rows),
    )
    tenants = [f"fair-{uuid.uuid4().hex[:6]}-{i}" for i in range(plan.tenants)]
    plant_tenants(
        store,
        model,
        compressor.compressor_id,
        tenants,
        plan.doc_tokens,
        plan.segment_len,
        plan.k,
        plan.rank,
        2000,
    )
    core = EngineCore(settings, store, loaded, compressor)
    await core.start()
    heavy, others = tenants[0], tenants[1:]
    try:
        await asyncio.gather(*(_ask(core, tenant, plan) for tenant in tenants))  # adapters, contexts, graphs
        capacity = await _capacity(core, tenants, plan)
        rate = plan.load * capacity / plan.tenants
        even = await _open_loop(core, dict.fromkeys(tenants, rate), plan)
        flood = await _open_loop(core, {t: rate * (HEAVY_RATE if t == heavy else 1) for t in tenants}, plan)
        saturated = await _closed_loop(core, tenants, heavy, plan, engine)
    finally:
        await core.stop()
        delete_tenants(store, tenants)
    even_others, flood_others = _ttft(even, others), _ttft(flood, others)
    result = {
        "plan": asdict(plan),
        "context_vectors": n_vectors,
        "capacity_queries_per_s": capacity,
        "rate_per_tenant": rate,
        "even": {"others": even_others, "heavy": _ttft(even, [heavy])},
        "heavy_10x": {"others": flood_others, "heavy": _ttft(flood, [heavy])},
        "others_ttft_p99_ratio": flood_others["p99_ms"] / even_others["p99_ms"],
        "saturated": saturated,
        # open-loop queries that ended before their new_tokens (the load would not be the one stated)
        "queries_cut_short": sum(
            sample.tokens < plan.new_tokens for run in (even, flood) for sample in run.ended
        ),
    }
    print(
        f"(f) {plan.tenants} tenants, {rate:.2f} q/s each: others' TTFT p99 {even_others['p99_ms']:.0f} ms; "
        f"one at {HEAVY_RATE}x: {flood_others['p99_ms']:.0f} ms ({result['others_ttft_p99_ratio']:.2f}x); "
        f"saturated heavy's service {saturated['heavy_vs_others']:.2f}x the others' mean",
        flush=True,
    )
    return result


def _ask(
    core: Any, tenant: str, plan: SchedulingPlan, on_first: Callable[[float], object] | None = None
) -> Any:
    """One query of ``tenant`` (an awaitable QuerySample); its TTFT goes to ``on_first`` once known."""
    question = "What does the document say about the house?"
    return engine_query(core, engine_request(tenant, ("doc",), question, plan.new_tokens), on_first)


async def _capacity(core: Any, tenants: list[str], plan: SchedulingPlan) -> float:
    """Queries per second with every row busy: a full batch of queries, timed (after one untimed)."""
    wall = 0.0
    for _ in range(2):
        started = time.perf_counter()
        await asyncio.gather(*(_ask(core, tenants[i % len(tenants)], plan) for i in range(plan.rows)))
        wall = time.perf_counter() - started
    return plan.rows / wall


@dataclass(frozen=True)
class _Run:
    """One open-loop run: TTFTs by tenant (seconds), and the queries that ended."""

    ttfts: dict[str, list[float]]
    ended: list[QuerySample]


SLOWEST_FRACTION = 0.01  # the others' slowest queries whose TTFT parts are reported: their p99's tail


async def _open_loop(core: Any, rates: dict[str, float], plan: SchedulingPlan) -> _Run:
    """Poisson arrivals per tenant for ``plan.seconds``; queries still running a run-length later are
    cancelled. Returns each tenant's TTFTs in seconds (queries cancelled before their first token have
    none) and the samples of the queries that ended (with the engine's account of their TTFT)."""
    ttfts: dict[str, list[float]] = {tenant: [] for tenant in rates}
    asks: list[asyncio.Task[QuerySample]] = []

    async def arrivals(tenant: str, rate: float, seed: int, deadline: float) -> None:
        draw = random.Random(seed)
        while True:
            await asyncio.sleep(draw.expovariate(rate))
            if time.perf_counter() >= deadline:
                return
            asks.append(asyncio.create_task(_ask(core, tenant, plan, ttfts[tenant].append)))

    deadline = time.perf_counter() + plan.seconds
    await asyncio.gather(*(arrivals(t, r, i, deadline) for i, (t, r) in enumerate(rates.items())))
    if asks:
        _, pending = await asyncio.wait(asks, timeout=plan.seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    ended = [task.result() for task in asks if task.done() and not task.cancelled() and not task.exception()]
    return _Run(ttfts, ended)


def _ttft(run: _Run, tenants: list[str]) -> dict[str, Any]:
    """The tenants' TTFT p50/p99 (ms), and where the slowest 1% (at least 3) of their ended queries' TTFT
    went by the engine's account (mean ms of `TTFT_PARTS`: before the queue, in it, admitted to first
    token): what the scheduler would have to change to lower the p99."""
    answered = [ttft * 1e3 for tenant in tenants for ttft in run.ttfts[tenant]]
    timed = sorted(
        (s for s in run.ended if s.tenant in tenants and s.ttft_s is not None and s.ttft_parts),
        key=lambda s: s.ttft_s or 0.0,
        reverse=True,
    )
    slowest = timed[: max(3, math.ceil(SLOWEST_FRACTION * len(timed)))]
    return {
        "queries": len(answered),
        "p50_ms": percentile(answered, 50),
        "p99_ms": percentile(answered, 99),
        "slowest": {
            "queries": len(slowest),
            "ttft_ms": statistics.mean(s.ttft_s * 1e3 for s in slowest) if slowest else math.nan,
        }
        | {
            f"{part}_ms": statistics.mean(s.ttft_parts[part] * 1e3 for s in slowest) if slowest else math.nan
            for part in TTFT_PARTS
        },
    }


async def _closed_loop(
    core: Any, tenants: list[str], heavy: str, plan: SchedulingPlan, engine: Any
) -> dict[str, Any]:
    """Every tenant keeps more queries outstanding than its share of rows (the heavy one ten times as many):
    weighted service per tenant over the run's last four fifths."""
    per_tenant = max(2, math.ceil(2 * plan.rows / plan.tenants))
    clients = {t: per_tenant * (HEAVY_RATE if t == heavy else 1) for t in tenants}

    async def client(tenant: str) -> None:
        while True:
            await _ask(core, tenant, plan)

    tasks = [asyncio.create_task(client(t)) for t, n in clients.items() for _ in range(n)]
    await asyncio.sleep(plan.seconds / 5)
    start = {t: core.scheduler.service(t) for t in tenants}
    await asyncio.sleep(plan.seconds * 4 / 5)
    end = {t: core.scheduler.service(t) for t in tenants}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    served = {
        t: (end[t].input_tokens - start[t].input_tokens) * engine.input_token_cost
        + (end[t].output_tokens - start[t].output_tokens) * engine.output_token_cost
        for t in tenants
    }
    others = statistics.mean(served[t] for t in tenants if t != heavy)
    return {
        "clients": clients,
        "served": served,
        "heavy_vs_others": served[heavy] / others if others else math.nan,
    }


# -- report -----------------------------------------------------------------------------------------------------


def evaluate_goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    goals = []
    fairness = result.get("fairness")
    if fairness:
        ratio = fairness["others_ttft_p99_ratio"]
        goals.append(
            {
                "goal": f"others' TTFT p99 with one tenant at {HEAVY_RATE}x their rate / without <= 1.5x (issue 19)",
                "value": f"{ratio:.2f}x",
                "met": ratio <= GOAL_OTHERS_TTFT_P99_RATIO,
            }
        )
        share = fairness["saturated"]["heavy_vs_others"]
        goals.append(
            {
                "goal": f"the {HEAVY_RATE}x tenant's service while all are backlogged <= 1.1x the others' "
                "mean (its fair share within the counters' bounded lag; issue 19)",
                "value": f"{share:.2f}x",
                "met": share <= GOAL_HEAVY_SHARE,
            }
        )
    return goals


def render_markdown(result: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    burst = result.get("prefill_burst")
    if burst:
        plan = burst["plan"]
        lines += [
            f"## (e) Decode under a prefill burst: {plan['burst']} inputs of {plan['burst_tokens']} positions "
            f"arrive beside {plan['decoders']} decoding rows",
            "",
            "| prefill per step | step p50 before ms | steps | steps missing a decoder | step p50 ms "
            "| step p99 ms | step max ms | max vs whole | burst TTFT p50 ms | burst TTFT max ms "
            "| decode graphs captured meanwhile |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in burst["runs"]:
            label = "whole" if r["prefill_chunk_tokens"] is None else f"{r['prefill_chunk_tokens']} positions"
            lines.append(
                f"| {label} | {r['before_step_p50_ms']:.1f} | {r['burst_steps']} | "
                f"{r['steps_without_every_decoder']} | {r['burst_step_p50_ms']:.1f} | "
                f"{r['burst_step_p99_ms']:.1f} | {r['burst_step_max_ms']:.1f} | {r['max_step_vs_whole']:.2f}x | "
                f"{r['burst_ttft_p50_ms']:.0f} | {r['burst_ttft_max_ms']:.0f} | "
                f"{r['decode_captures_during_burst']} |"
            )
        lines.append("")
    fairness = result.get("fairness")
    if fairness:
        plan = fairness["plan"]
        lines += [
            f"## (f) Fairness: {plan['tenants']} tenants, own adapter and context ({fairness['context_vectors']} "
            f"vectors) each, {plan['rows']} rows, {plan['seconds']:.0f} s per run",
            "",
            f"Capacity {fairness['capacity_queries_per_s']:.2f} queries/s; even run at "
            f"{fairness['rate_per_tenant']:.2f} queries/s per tenant.",
            "",
            "| run | others' queries | others' TTFT p50 ms | others' TTFT p99 ms | heavy's queries "
            "| heavy's TTFT p50 ms |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        runs = [
            ("every tenant at the same rate", fairness["even"]),
            (f"one at {HEAVY_RATE}x", fairness["heavy_10x"]),
        ]
        for label, run in runs:
            o, h = run["others"], run["heavy"]
            lines.append(
                f"| {label} | {o['queries']} | {o['p50_ms']:.0f} | {o['p99_ms']:.0f} | {h['queries']} | "
                f"{h['p50_ms']:.0f} |"
            )
        lines += [
            "",
            "Where the others' slowest 1% of TTFTs went (the engine's account, mean ms: prepare = before the "
            "fair queue, queue = waiting for a row, prefill = admitted to first token):",
            "",
            "| run | queries | TTFT | prepare | queue | prefill |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for label, run in runs:
            slow = run["others"]["slowest"]
            lines.append(
                f"| {label} | {slow['queries']} | {slow['ttft_ms']:.0f} | "
                + " | ".join(f"{slow[f'{part}_ms']:.0f}" for part in TTFT_PARTS)
                + " |"
            )
        saturated = fairness["saturated"]
        lines += [
            "",
            f"Others' TTFT p99 ratio: {fairness['others_ttft_p99_ratio']:.2f}x. Saturated (closed loop, clients "
            f"per tenant {sorted(set(saturated['clients'].values()))}): the heavy tenant's weighted service over "
            f"the others' mean {saturated['heavy_vs_others']:.2f}x (weighted tokens in all "
            f"{sum(saturated['served'].values()):,.0f}).",
            "",
        ]
    return lines


def render_full(result: dict[str, Any]) -> str:
    lines = [
        f"# Scheduling benchmark ({result['plan']['geometry']}, random {result['dtype']} weights)",
        "",
        f"`{result['command']}` on {result['device_name']}, {result['date']}; torch {result['torch']}.",
        "",
        *render_markdown(result),
    ]
    lines += goals_and_errors(result)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser)
    parser.add_argument("--sections", default="prefill_burst,fairness")
    parser.add_argument("--seconds", type=float, default=None, help="length of each fairness run")
    parser.add_argument(
        "--name", default=None, help="output file stem (default scheduling-h200 / scheduling-tiny)"
    )
    args = parser.parse_args(argv)
    plan = PLANS["tiny" if args.tiny else "h200"]
    if args.seconds is not None:
        plan = replace(plan, seconds=args.seconds)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sections = set(args.sections.split(","))
    started = time.time()
    result: dict[str, Any] = run_info("lloco.bench.scheduling", argv, device) | {
        "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
        "plan": asdict(plan),
        "errors": [],
    }

    name = args.name or ("scheduling-tiny" if args.tiny else "scheduling-h200")

    def section(key: str, fn: Callable[[], Any]) -> None:
        if key in sections:
            run_section(result, key, fn, free_memory)
            write_unfinished(args.out, name, result, render_full)

    max_positions = max(plan.burst_tokens, plan.decoder_prompt, 4096) + 256
    config = LlamaConfig(**GEOMETRIES[plan.geometry], max_position_embeddings=max_positions)
    model = random_llama(config, device, dtype, seed=0)
    section("prefill_burst", lambda: bench_prefill_burst(model, plan))
    if "fairness" in sections:
        with tempfile.TemporaryDirectory(prefix="lloco-bench-scheduling-") as root:
            try:
                with object_store(args.s3_endpoint, Path(root)) as store:
                    section("fairness", lambda: bench_fairness(model, store, plan))
            except Exception as error:  # noqa: BLE001 - no store: the section is reported as an error
                result["errors"].append(f"store: {type(error).__name__}: {error}")
    result["goals"] = evaluate_goals(result)
    result["wall_s"] = time.time() - started
    write_report(args.out, name, result, render_full(result))
    return result


if __name__ == "__main__":
    main()
