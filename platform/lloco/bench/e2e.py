"""End-to-end benchmark: what a tenant gets through the public gRPC API, beside the engine alone, in one run.

    python -m lloco.bench.e2e --out DIR            # GPU: LLaMA-2-7B geometry, random bf16 weights
    python -m lloco.bench.e2e --out DIR --tiny     # CPU: the tiny random test model, a smoke run

Starts the real stack (``lloco.serve.local.EmbeddedStack``: SeaweedFS, a local Ray, the Serve app, the gRPC
ingress), creates T tenants, each with its API key, a document ingested over gRPC (``IngestDocument``;
compressed online by the engine with an untrained compressor of S, k) and its own adapter: a random rank-r
LoRA published to the tenant's registry (not finetuned: speed does not depend on the weights). Then:

- single: one query at a time, tenant 0's long document (the 32k-token one on the GPU), ``new_tokens``
  greedy tokens, through gRPC (``LlocoClient.query_stream``), through ``EngineCore`` driven directly in
  this process on the same store and weights (the engine-only figure), and with the full document as
  the prompt on a batch-1 ``Generator`` of the same weights: TTFT and end to end, medians after a warm-up;
- load: each tenant's first query (cold: adapter and context loaded; its TTFT reported apart), then C
  streaming clients (threads, one channel each; client j acts for tenant j mod T) each send Q queries back
  to back over their tenant's document and adapter (``new_tokens`` each, or with ``--varied-lengths`` a
  length drawn per query around it, since equal lengths let the closed loop fall into waves), all starting
  at the same instant; the same requests then go to the ``EngineCore`` alone with the same concurrency.
  TTFT and latency p50/p99, TTFT also without each client's first query (the simultaneous start queues C
  prefills behind each other), generated tokens/s, queries/s and each tenant's share of the generated
  tokens, for both; and for both, the engine scheduler's iterations over the load (``LoopTimes``: rows
  per admitting iteration, averaged over the iterations and over the rows (the group an admitted row came
  in with: waves weigh by their size), the worker thread's time per iteration, the event loop's gap before
  the next one).

TTFT is measured by the client: from the call to the first message carrying a token. Results: JSON and
markdown under --out, with issue 19's goals.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from lloco.bench.checkpoint import LLAMA2_7B, document_text, write_random_llama
from lloco.bench.common import (
    engine_compiles,
    free_memory,
    goals_and_errors,
    percentile,
    random_adapter,
    run_info,
    sync,
)
from lloco.bench.report import write_report
from lloco.bench.workload import (
    TTFT_PARTS,
    TTFT_PARTS_LEGEND,
    QuerySample,
    engine_query,
    engine_request,
    load_summary,
    tenant_shares,
    ttft_parts_summary,
    ttft_parts_table,
    ttft_summary,
    varied_new_tokens,
    varied_new_tokens_range,
)

if TYPE_CHECKING:
    from lloco.config import Settings

ADMIN_KEY = "bench-e2e-admin"
QUESTION = "What does the document say about the river, question {n}?"
# issue 19's goals for the path through gRPC
GOAL_TTFT_VS_ENGINE = 1.3  # gRPC TTFT over the engine-only TTFT, at most
GOAL_VS_FULL = 6.0  # full document end to end over gRPC end to end, at least
GOAL_THROUGHPUT = 0.8  # gRPC tokens/s over the engine-only tokens/s under the same load, at least
GOAL_TTFT_P99_MS = 500.0  # under load, at most


@dataclass(frozen=True)
class E2EPlan:
    """Sizes of one run."""

    geometry: str  # "llama2-7b" (random, written under --out) or "tiny" (the tiny test model)
    tenants: int
    clients: int
    queries_per_client: int
    doc_tokens: int  # each tenant's document
    long_doc_tokens: int  # tenant 0's document of the single-query section
    new_tokens: int
    segment_len: int
    k: int
    rank: int
    repeats: int
    max_batch: int
    varied_lengths: bool = False  # the load's queries: new_tokens each, or varied_new_tokens around it


def load_new_tokens(plan: E2EPlan, number: int) -> int:
    """Load query ``number``'s length (the same on both paths)."""
    return varied_new_tokens(number, plan.new_tokens) if plan.varied_lengths else plan.new_tokens


def longest_new_tokens(plan: E2EPlan) -> int:
    return varied_new_tokens_range(plan.new_tokens)[1] if plan.varied_lengths else plan.new_tokens


PLANS = {
    "h200": E2EPlan("llama2-7b", 16, 64, 8, 8192, 32768, 64, LLAMA2_7B.segment_len, LLAMA2_7B.k, 8, 3, 64),
    "tiny": E2EPlan("tiny", 2, 4, 2, 200, 400, 4, 32, 4, 8, 1, 4),
}


# -- the stack and its tenants -----------------------------------------------------------------------------------


def prepare_model(out: Path, plan: E2EPlan, device: torch.device) -> tuple[Path, Path, Any]:
    """(base model dir, compressor dir, the base loaded here): random weights, an untrained compressor."""
    from lloco.model import Compressor, load_model, tiny_llama_dir

    if plan.geometry == "tiny":
        model_dir = tiny_llama_dir(out / "tiny-llama", seed=0)
    else:
        model_dir = write_random_llama(out / "llama-2-7b-random", LLAMA2_7B, device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    base = load_model(str(model_dir), out / "cache", dtype=dtype, device=device)
    compressor = Compressor.from_base(base, plan.segment_len, plan.k, accumulate=True, seed=0)
    return model_dir, compressor.save(out / "compressor"), base


def stack_settings(
    out: Path, plan: E2EPlan, model_dir: Path, compressor_dir: Path, device: torch.device
) -> Any:
    from pydantic import SecretStr

    from lloco.config import (
        EngineSettings,
        LimitSettings,
        LoraSettings,
        ModelSettings,
        ServeSettings,
        Settings,
    )
    from lloco.ports import free_port

    vectors = math.ceil(plan.long_doc_tokens / plan.segment_len) * plan.k
    return Settings(
        data_dir=out / "stack",
        admin_key=SecretStr(ADMIN_KEY),
        model=ModelSettings(
            base_model=str(model_dir),
            compressor=str(compressor_dir),
            dtype="bfloat16" if device.type == "cuda" else "float32",
            cache_dir=out / "cache",
        ),
        limits=LimitSettings(
            max_document_bytes=64 * 2**20,
            max_inflight_requests=plan.clients,
            max_new_tokens=longest_new_tokens(plan),
            online_compress_max_tokens=2 * plan.long_doc_tokens,
        ),
        lora=LoraSettings(max_rank=plan.rank, gpu_slots=plan.tenants, cpu_adapters=2 * plan.tenants),
        engine=EngineSettings(
            max_batch_size=plan.max_batch,
            max_seq_len=math.ceil((vectors + 256 + longest_new_tokens(plan)) / 128) * 128,
            # every query prefills its context, as the full-document baseline does and as the goals were set;
            # `--set engine.prefix_cache_bytes=N` measures the prefix cache (the single query then hits too)
            prefix_cache_bytes=0,
        ),
        serve=ServeSettings(
            grpc_port=free_port(),
            max_ongoing_requests=4 * plan.clients,
            engine_num_gpus=1.0 if device.type == "cuda" else 0.0,
        ),
    )


@dataclass(frozen=True)
class Tenant:
    name: str
    key: str
    documents: dict[str, str]  # id -> text


def create_tenants(stack: Any, plan: E2EPlan, tokenizer: Any, config: Any) -> list[Tenant]:
    """Tenants with a key, documents ingested over gRPC (compressed online) and a published random adapter."""
    from lloco.client import LlocoClient
    from lloco.errors import FailedPrecondition
    from lloco.registry import Registry

    run = uuid.uuid4().hex[:6]
    tenants = []
    for index in range(plan.tenants):
        name = f"e2e-{run}-{index}"
        key = stack.create_tenant(name)
        documents = {"doc": document_text(index, tokenizer, plan.doc_tokens)}
        if index == 0:
            documents["long"] = document_text(1000, tokenizer, plan.long_doc_tokens)
        with LlocoClient(stack.address, key) as client:
            for doc_id, text in documents.items():
                client.ingest(doc_id, text)
        registry = Registry(stack.store, name)
        for doc_id in documents:
            if registry.context_info(doc_id, stack.compressor_id) is None:
                raise FailedPrecondition(f"{name}/{doc_id} was not compressed at ingest")
        adapter = random_adapter(config, plan.rank, seed=index)
        registry.publish_adapter("default", adapter, train={"source": "lloco.bench.e2e random adapter"})
        tenants.append(Tenant(name, key, documents))
    return tenants


# -- driving it through gRPC -------------------------------------------------------------------------------------


def grpc_query(client: Any, tenant: str, doc_id: str, number: int, new_tokens: int) -> QuerySample:
    """One streamed query through the public API, timed by the client."""
    started = time.perf_counter()
    first, tokens, server_ttft, parts = None, 0, None, None
    for message in client.query_stream(
        QUESTION.format(n=number), [doc_id], adapter="default", max_new_tokens=new_tokens
    ):
        if message.token_ids and first is None:
            first = time.perf_counter() - started
        tokens += len(message.token_ids)
        if message.HasField("stats"):  # the last message
            stats = message.stats
            server_ttft = stats.time_to_first_token.ToNanoseconds() / 1e9
            parts = {part: getattr(stats, f"{part}_time").ToNanoseconds() / 1e9 for part in TTFT_PARTS}
    return QuerySample(tenant, first, time.perf_counter() - started, tokens, parts, server_ttft)


def grpc_single(stack: Any, tenant: Tenant, plan: E2EPlan) -> dict[str, float]:
    from lloco.client import LlocoClient

    with LlocoClient(stack.address, tenant.key) as client:
        grpc_query(client, tenant.name, "long", -1, plan.new_tokens)  # warm-up: context, adapter
        runs = [grpc_query(client, tenant.name, "long", n, plan.new_tokens) for n in range(plan.repeats)]
    return _single(runs)


def grpc_load(stack: Any, tenants: list[Tenant], plan: E2EPlan) -> dict[str, Any]:
    """Each tenant's first query (cold: its adapter and context are loaded), then C client threads, each Q
    queries back to back, all started together."""
    from lloco.client import LlocoClient

    def warm_up(tenant: Tenant) -> QuerySample:
        with LlocoClient(stack.address, tenant.key) as client:
            return grpc_query(client, tenant.name, "doc", -1, plan.new_tokens)

    with ThreadPoolExecutor(len(tenants)) as pool:
        cold = list(pool.map(warm_up, tenants))
    samples: list[tuple[int, QuerySample]] = []  # (query number of its client, sample)
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(plan.clients + 1)

    def client_thread(index: int) -> None:
        tenant = tenants[index % len(tenants)]
        try:
            with LlocoClient(stack.address, tenant.key) as client:
                _ = client.names  # resolve the caller once, before the clock starts
                barrier.wait()
                for n in range(plan.queries_per_client):
                    number = index * 1000 + n
                    sample = grpc_query(client, tenant.name, "doc", number, load_new_tokens(plan, number))
                    with lock:
                        samples.append((n, sample))
        except BaseException as error:  # noqa: BLE001 - reported after the run
            barrier.abort()
            errors.append(error)

    threads = [threading.Thread(target=client_thread, args=(i,), daemon=True) for i in range(plan.clients)]
    for thread in threads:
        thread.start()
    before = replica_metrics()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return _load(samples, wall, tenants) | {
        "cold_ttft": ttft_summary(cold),
        "scheduler": scheduler_summary(before, replica_metrics(), wall),
    }


# -- the same requests on the engine alone ---------------------------------------------------------------------------


def edge_records(store: Any, tenants: list[Tenant]) -> dict[tuple[str, str], Any]:
    """(tenant, doc id) -> the ``Resolved`` the edge sends from its caches once warm (tenant uid, the
    document's record, the current "default" adapter version): read once here, so the engine-alone path
    reads from the store what the gRPC path's engine reads, nothing per query."""
    from lloco.registry import Registry
    from lloco.serve.engine_core import Resolved

    records = {}
    for tenant in tenants:
        registry = Registry(store, tenant.name)
        adapter = registry.get_adapter("default", None)
        for doc_id in tenant.documents:
            records[tenant.name, doc_id] = Resolved(registry.uid, (registry.get_document(doc_id),), adapter)
    return records


def engine_requests(
    tenant: Tenant,
    doc_id: str,
    number: int,
    new_tokens: int,
    records: dict[tuple[str, str], Any],
    tokenizer: Any,
) -> Any:
    """The request the edge would send: its cached records and the prompt it tokenized (before the timed call,
    as the edge's work is not the engine's)."""
    from lloco.model import chat_prompt

    question = QUESTION.format(n=number)
    return engine_request(
        tenant.name,
        (doc_id,),
        question,
        new_tokens,
        records[tenant.name, doc_id],
        tuple(chat_prompt(tokenizer, question)),
    )


async def engine_alone(stack: Any, base: Any, tenants: list[Tenant], plan: E2EPlan) -> dict[str, Any]:
    """Single and load sections on an ``EngineCore`` of the stack's settings, store and weights."""
    from lloco.model import load_compressor
    from lloco.serve.engine_core import EngineCore

    compressor = load_compressor(stack.settings.model.compressor, base)
    core = EngineCore(stack.settings, stack.store, base, compressor)
    began = time.perf_counter()
    await core.start()  # warm-up and the decode graphs of engine.capture_decode_modes: a replica's start
    start_s = time.perf_counter() - began
    records = edge_records(stack.store, tenants)

    def request(tenant: Tenant, doc_id: str, number: int, new_tokens: int = plan.new_tokens) -> Any:
        return engine_requests(tenant, doc_id, number, new_tokens, records, base.tokenizer)

    try:
        owner = tenants[0]
        await engine_query(core, request(owner, "long", -1))  # warm-up
        single = [await engine_query(core, request(owner, "long", n)) for n in range(plan.repeats)]
        before_cold = _captures(core)
        cold = await asyncio.gather(*(engine_query(core, request(t, "doc", -1)) for t in tenants))
        before_load = _captures(core)
        samples: list[tuple[int, QuerySample]] = []

        async def client(index: int) -> None:
            tenant = tenants[index % len(tenants)]
            for n in range(plan.queries_per_client):
                number = index * 1000 + n
                sample = await engine_query(
                    core, request(tenant, "doc", number, load_new_tokens(plan, number))
                )
                samples.append((n, sample))

        before = core.metrics()
        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(plan.clients)))
        wall = time.perf_counter() - started
        scheduler = scheduler_summary(before, core.metrics(), wall)
    finally:
        await core.stop()
    captures = {  # decode shapes captured as CUDA graphs on first use in each phase: (count, host seconds)
        "cold": [b - a for a, b in zip(before_cold, before_load, strict=True)],
        "load": [b - a for a, b in zip(before_load, _captures(core), strict=True)],
    }
    load = _load(samples, wall, tenants) | {
        "cold_ttft": ttft_summary(cold),
        "graph_captures": captures,
        "start_s": start_s,
        "scheduler": scheduler,
    }
    return {"single": _single(single), "load": load}


def wait_for_device_memory(device: torch.device, timeout_s: float = 60.0) -> None:
    """Wait until other processes (the stopped replica) hold at most 2 GiB of ``device``, so the engine
    built next gets what the replica had; FailedPrecondition after ``timeout_s``."""
    from lloco.errors import FailedPrecondition

    if device.type != "cuda":
        return
    deadline = time.monotonic() + timeout_s
    while True:
        free, total = torch.cuda.mem_get_info(device)
        others = total - free - torch.cuda.memory_reserved(device)
        if others <= 2 * 2**30:
            return
        if time.monotonic() > deadline:
            raise FailedPrecondition(f"other processes still hold {others / 2**30:.1f} GiB of {device}")
        time.sleep(0.5)


def _captures(core: Any) -> tuple[float, float]:
    metrics = core.metrics()
    return metrics["decode_graph_captures"], metrics["decode_graph_capture_seconds"]


def replica_metrics() -> dict[str, float]:
    """The engine replica's metrics (its `health()`), read by the driver through a Serve handle."""
    from ray import serve

    from lloco.serve.local import APP_NAME

    return serve.get_deployment_handle("EngineDeployment", app_name=APP_NAME).health.remote().result()


def scheduler_summary(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """The engine scheduler's iterations during the load, from its `LoopTimes` in the metrics read before and
    after: how often it stepped, how many rows an admitting iteration took in (per iteration, and per row:
    the size of the group a row was admitted with, where a few large waves show), the worker thread's time
    per iteration (admitting or not), the event loop's gap between iterations while work waited, and the
    prefix cache's hits and misses (contexts whose prefill was skipped or done)."""
    from lloco.serve.scheduler import LoopTimes

    names = [counter.name for counter in fields(LoopTimes)]
    d = {name: after[f"scheduler_{name}"] - before[f"scheduler_{name}"] for name in names}
    plain = d["iterations"] - d["admitting_iterations"]
    return {
        "iterations_per_s": d["iterations"] / wall,
        "admitting_share": d["admitting_iterations"] / max(d["iterations"], 1),
        "rows_per_admitting_iteration": d["admitted_rows"] / max(d["admitting_iterations"], 1),
        "rows_admitted_with": d["admitted_rows_squared"] / max(d["admitted_rows"], 1),
        "worker_ms_admitting": 1e3 * d["admitting_worker_s"] / max(d["admitting_iterations"], 1),
        "worker_ms_other": 1e3 * (d["worker_s"] - d["admitting_worker_s"]) / max(plain, 1),
        "gap_ms": 1e3 * d["gap_s"] / max(d["iterations"], 1),
        "worker_share": d["worker_s"] / wall,
        "gap_share": d["gap_s"] / wall,
        **{
            f"prefix_cache_{n}": after[f"prefix_cache_{n}"] - before[f"prefix_cache_{n}"]
            for n in ("hits", "misses")
        },
    }


@torch.no_grad()
def full_document(base: Any, tenant: Tenant, plan: E2EPlan) -> dict[str, float]:
    """The long document's text as the prompt (no compression) on a batch-1 ``Generator`` of the same weights,
    compiled as the engine's."""
    from lloco.compress.steps import tokenize
    from lloco.model import Generator, SamplingParams, chat_prompt

    ids = tokenize(base.tokenizer, tenant.documents["long"]) + chat_prompt(
        base.tokenizer, QUESTION.format(n=0)
    )
    model = base.model
    gen = Generator(
        model,
        None,
        1,
        len(ids) + plan.new_tokens + 8,
        eos_token_ids=(),
        max_prefill_tokens=max(len(ids), 16),
        compile=engine_compiles(model.device),
    )

    def once() -> QuerySample:
        sync(model.device)
        started = time.perf_counter()
        gen.add(uuid.uuid4().hex, None, ids, -1, SamplingParams(plan.new_tokens))
        first, tokens = None, 0
        while gen.active():
            out = gen.step()
            if out and first is None:
                first = time.perf_counter() - started
            tokens += len(out)
        return QuerySample(tenant.name, first, time.perf_counter() - started, tokens)

    once()
    runs = [once() for _ in range(plan.repeats)]
    return _single(runs) | {"prompt_tokens": len(ids)}


def _single(runs: list[QuerySample]) -> dict[str, float]:
    at_server = [r.server_ttft_s for r in runs if r.server_ttft_s is not None]
    parts = [r.ttft_parts for r in runs if r.ttft_parts is not None]
    return (
        {
            "ttft_ms": statistics.median(r.ttft_s or r.latency_s for r in runs) * 1e3,
            "total_ms": statistics.median(r.latency_s for r in runs) * 1e3,
            "tokens": statistics.median(r.tokens for r in runs),
        }
        | ({"server_ttft_ms": statistics.median(at_server) * 1e3} if at_server else {})
        | (
            {"ttft_parts_ms": {p: statistics.median(r[p] for r in parts) * 1e3 for p in TTFT_PARTS}}
            if parts
            else {}
        )
    )


def _load(samples: list[tuple[int, QuerySample]], wall: float, tenants: list[Tenant]) -> dict[str, Any]:
    """Throughput and percentiles of every query; TTFT also without each client's first query (``steady``),
    which all C clients send at the same instant, so its prefills queue behind each other by design."""
    every = [sample for _, sample in samples]
    later = [sample for n, sample in samples if n > 0]
    steady = ttft_summary(later)
    parts = ttft_parts_summary(later)
    at_server = [s.server_ttft_s * 1e3 for s in later if s.server_ttft_s is not None]
    return (
        load_summary(every, wall)
        | {
            "ttft_p50_steady_ms": steady["p50_ms"],
            "ttft_p99_steady_ms": steady["p99_ms"],
            "tenants": tenant_shares(every, [t.name for t in tenants]),
        }
        | ({"ttft_parts_steady_ms": parts["ttft_parts_ms"]} if parts else {})
        | (
            {
                "server_ttft_p50_steady_ms": percentile(at_server, 50),
                "server_ttft_p99_steady_ms": percentile(at_server, 99),
            }
            if at_server
            else {}
        )
    )


# -- report -------------------------------------------------------------------------------------------------------


def evaluate_goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    goals = []

    def goal(text: str, value: float, met: bool, unit: str = "x") -> None:
        goals.append({"goal": text, "value": f"{value:.2f}{unit}", "met": met})

    single = result.get("single", {})
    if "grpc" in single and "engine" in single:
        ratio = single["grpc"]["ttft_ms"] / single["engine"]["ttft_ms"]
        goal(
            f"gRPC TTFT <= {GOAL_TTFT_VS_ENGINE}x the engine-only TTFT (long document)",
            ratio,
            ratio <= GOAL_TTFT_VS_ENGINE,
        )
    if "grpc" in single and "full_document" in single:
        speedup = single["full_document"]["total_ms"] / single["grpc"]["total_ms"]
        goal(
            f"end to end through gRPC vs the full document >= {GOAL_VS_FULL}x",
            speedup,
            speedup >= GOAL_VS_FULL,
        )
    load = result.get("load", {})
    if "grpc" in load and "engine" in load:
        ratio = load["grpc"]["tokens_per_s"] / load["engine"]["tokens_per_s"]
        goal(
            f"tokens/s through gRPC >= {GOAL_THROUGHPUT}x the engine's under the same load",
            ratio,
            ratio >= GOAL_THROUGHPUT,
        )
    if "grpc" in load:
        p99 = load["grpc"]["ttft_p99_steady_ms"]
        goal(
            f"TTFT p99 through gRPC under load <= {GOAL_TTFT_P99_MS:.0f} ms (after each client's first query)",
            p99,
            p99 <= GOAL_TTFT_P99_MS,
            " ms",
        )
    return goals


def lengths_words(plan: dict[str, Any]) -> str:
    if not plan.get("varied_lengths"):
        return f"{plan['new_tokens']} new tokens per query"
    shortest, longest = varied_new_tokens_range(plan["new_tokens"])
    return (
        f"{plan['new_tokens']} new tokens per single query, {shortest}-{longest} per load query (uniform, the "
        "same sequence on both paths)"
    )


def render_markdown(result: dict[str, Any]) -> str:
    plan = result["plan"]
    lines = [
        f"# End to end through gRPC ({plan['geometry']}, random {result['dtype']} weights)",
        "",
        f"`{result['command']}` on {result['device_name']}, {result['date']}; torch {result['torch']}.",
        "",
        f"{plan['tenants']} tenants, each with a {plan['doc_tokens']}-token document compressed at ingest "
        f"(S={plan['segment_len']}, k={plan['k']}) and its own adapter (a random rank-{plan['rank']} LoRA, "
        "published, not finetuned); greedy, "
        f"{lengths_words(plan)}; the engine streams at most "
        f"{result.get('stream_messages_per_s')} messages/s (serve.stream_messages_per_s).",
        "",
    ]
    single = result.get("single", {})
    if single:
        lines += [
            f"## One query at a time ({plan['long_doc_tokens']}-token document), median of {plan['repeats']}",
            "",
            "| path | TTFT ms | end to end ms |",
            "|---|---:|---:|",
        ]
        full_label = (
            f"full document as the prompt ({single.get('full_document', {}).get('prompt_tokens')} tokens)"
        )
        for label, key in (
            ("gRPC (compressed context)", "grpc"),
            ("EngineCore alone (compressed context)", "engine"),
            (full_label, "full_document"),
        ):
            if key in single:
                lines.append(f"| {label} | {single[key]['ttft_ms']:.1f} | {single[key]['total_ms']:.1f} |")
        if "server_ttft_ms" in single.get("grpc", {}):
            lines += [
                "",
                f"The gRPC query's TTFT at the server (the reply's stats, the Ingress's clock): "
                f"{single['grpc']['server_ttft_ms']:.1f} ms.",
            ]
        for label, key in (("the gRPC query's", "grpc"), ("EngineCore alone's", "engine")):
            if parts := single.get(key, {}).get("ttft_parts_ms"):
                lines += [
                    "",
                    f"Where {label} TTFT went (the engine's clock, medians): "
                    + ", ".join(f"{name} {value:.1f} ms" for name, value in parts.items())
                    + ".",
                ]
        lines.append("")
    load = result.get("load", {})
    if load:
        lines += [
            f"## Load: {plan['clients']} streaming clients x {plan['queries_per_client']} queries over "
            f"{plan['tenants']} tenants",
            "",
            "| path | tokens/s | queries/s | TTFT p50 ms | TTFT p99 ms | TTFT p50 / p99 ms after each client's "
            "first | latency p50 ms | latency p99 ms | each tenant's first query (cold): TTFT p50 / max ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label, key in (("gRPC", "grpc"), ("EngineCore alone", "engine")):
            if key not in load:
                continue
            r = load[key]
            lines.append(
                f"| {label} | {r['tokens_per_s']:,.1f} | {r['queries_per_s']:.2f} | {r['ttft_p50_ms']:.0f} | "
                f"{r['ttft_p99_ms']:.0f} | {r['ttft_p50_steady_ms']:.0f} / {r['ttft_p99_steady_ms']:.0f} | "
                f"{r['latency_p50_ms']:.0f} | {r['latency_p99_ms']:.0f} | "
                f"{r['cold_ttft']['p50_ms']:.0f} / {r['cold_ttft']['max_ms']:.0f} |"
            )
        if "server_ttft_p50_steady_ms" in load.get("grpc", {}):
            r = load["grpc"]
            lines += [
                "",
                "The gRPC path's TTFT at the server (each reply's stats.time_to_first_token: the Ingress's clock "
                "from the request's arrival, so the edge's checks, both Ray hops and the engine), after each "
                f"client's first query: p50 {r['server_ttft_p50_steady_ms']:.0f} / p99 "
                f"{r['server_ttft_p99_steady_ms']:.0f} ms; the rest of the clients' TTFT is the call's way to the "
                "server and the token's way back, the client threads included.",
            ]
        if "graph_captures" in load.get("engine", {}):
            captures = load["engine"]["graph_captures"]
            lines += [
                "",
                "Decode shapes captured as CUDA graphs on first use by EngineCore alone (count, host seconds): "
                f"during the tenants' first queries {captures['cold'][0]:.0f} ({captures['cold'][1]:.1f} s), "
                f"during the load {captures['load'][0]:.0f} ({captures['load'][1]:.1f} s); "
                f"EngineCore's start (warm-up and graphs captured ahead) took {load['engine']['start_s']:.1f} s.",
            ]
        steps = {
            key: load[key]["scheduler"] for key in ("grpc", "engine") if "scheduler" in load.get(key, {})
        }
        if steps:
            lines += [
                "",
                "The engine's scheduler during the load (its iterations: the worker thread's time, those admitting "
                "rows apart, and the gap to the next iteration while work waited, which the event loop spends "
                "delivering tokens and running its other coroutines):",
                "",
                "| path | iterations/s | admitting | rows per admitting iteration (mean over rows) | "
                "worker ms admitting / other | gap ms per iteration | worker / gap share of the wall | "
                "prefix cache hits / misses |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for label, key in (("gRPC", "grpc"), ("EngineCore alone", "engine")):
                if r := steps.get(key):
                    lines.append(
                        f"| {label} | {r['iterations_per_s']:.1f} | {r['admitting_share']:.0%} | "
                        f"{r['rows_per_admitting_iteration']:.2f} ({r['rows_admitted_with']:.1f}) | "
                        f"{r['worker_ms_admitting']:.1f} / "
                        f"{r['worker_ms_other']:.1f} | {r['gap_ms']:.2f} | {r['worker_share']:.0%} / "
                        f"{r['gap_share']:.0%} | {r['prefix_cache_hits']:.0f} / {r['prefix_cache_misses']:.0f} |"
                    )
        for label, key in (("the gRPC path's", "grpc"), ("EngineCore alone's", "engine")):
            parts = load.get(key, {}).get("ttft_parts_steady_ms")
            if parts:
                lines += [
                    "",
                    f"Where {label} TTFT went after each client's first query (the engine's clock, ms; "
                    f"{TTFT_PARTS_LEGEND}; ttft is the client's):",
                    "",
                    *ttft_parts_table(parts),
                ]
        paths = [key for key in ("grpc", "engine") if key in load]
        lines += [
            "",
            "| tenant | " + " | ".join(f"{key} queries | {key} share of tokens" for key in paths) + " |",
            "|---|" + "---:|---:|" * len(paths),
        ]
        for tenant in load[paths[0]]["tenants"]:
            cells = [
                f"{load[key]['tenants'][tenant]['queries']} | {load[key]['tenants'][tenant]['share']:.1%}"
                for key in paths
            ]
            lines.append(f"| {tenant} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += goals_and_errors(result)
    return "\n".join(lines)


def measure(
    out: Path,
    plan: E2EPlan,
    device: torch.device,
    result: dict[str, Any],
    started: float,
    assignments: list[str],
) -> None:
    """Fill ``result`` section by section, so that a run cut short keeps what it measured."""
    from lloco.serve.local import EmbeddedStack

    def progress(stage: str) -> None:
        print(f"[e2e {time.time() - started:6.0f} s] {stage}", flush=True)

    progress("writing the weights")
    model_dir, compressor_dir, base = prepare_model(out, plan, device)
    free_memory()  # what writing the weights left cached, before the engine replica claims its memory
    settings = with_assignments(stack_settings(out, plan, model_dir, compressor_dir, device), assignments)
    result["stream_messages_per_s"] = settings.serve.stream_messages_per_s
    progress("starting the stack")
    single: dict[str, Any] = result.setdefault("single", {})
    load: dict[str, Any] = result.setdefault("load", {})
    with EmbeddedStack(settings, jobs=False) as stack:
        progress("creating tenants (documents ingested over gRPC, adapters published)")
        tenants = create_tenants(stack, plan, base.tokenizer, base.config)
        progress("single queries through gRPC")
        single["grpc"] = grpc_single(stack, tenants[0], plan)
        progress("load through gRPC")
        load["grpc"] = grpc_load(stack, tenants, plan)
        progress("the same on EngineCore alone")
        stack.stop_serving()  # the replica's device memory: an 80 GB card does not hold two engines
        wait_for_device_memory(device)
        alone = asyncio.run(engine_alone(stack, base, tenants, plan))
        single["engine"] = alone["single"]
        load["engine"] = alone["load"]
    progress("the full document on a Generator")
    free_memory()  # the engine alone's KV cache (a reference cycle keeps it until a collection)
    single["full_document"] = full_document(base, tenants[0], plan)  # the stack's GPU work is done
    progress("done")


def with_assignments(settings: Settings, assignments: list[str]) -> Settings:
    """``settings`` with each "section.field=value" of ``--set`` applied (the value read as YAML), validated
    again."""
    data = settings.model_dump()
    for assignment in assignments:
        path, equals, value = assignment.partition("=")
        *sections, name = path.split(".")
        node = data
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if not equals or not isinstance(node, dict) or name not in node:
            raise ValueError(f"--set {assignment!r} names no setting (expected SECTION.FIELD=VALUE)")
        node[name] = yaml.safe_load(value)
    return type(settings).model_validate(data)


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="results, weights, the stack's data")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model on CPU: a smoke run")
    parser.add_argument("--tenants", type=int, default=None)
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--queries", type=int, default=None, help="queries per client")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument(
        "--varied-lengths",
        action="store_true",
        help="the load's queries ask for new-tokens/2 to 3 new-tokens/2 tokens (uniform, the same sequence on "
        "both paths) instead of new-tokens each",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="a lloco setting for both paths, e.g. engine.prefill_chunk_tokens=4096 (the value read as YAML; "
        "repeatable)",
    )
    parser.add_argument("--name", default=None, help="output file stem (default e2e-h200 / e2e-tiny)")
    args = parser.parse_args(argv)
    plan = PLANS["tiny" if args.tiny else "h200"]
    overrides = dict(
        tenants=args.tenants,
        clients=args.clients,
        queries_per_client=args.queries,
        new_tokens=args.new_tokens,
        varied_lengths=args.varied_lengths or None,
    )
    plan = replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result: dict[str, Any] = run_info("lloco.bench.e2e", argv, device) | {
        "dtype": "bf16" if device.type == "cuda" else "fp32",
        "plan": asdict(plan),
        "adapters": "random rank-r LoRA per tenant, published to its registry (not finetuned)",
        "errors": [],
    }
    signal.signal(signal.SIGTERM, _stop)  # a host call's `timeout` ends it: still write what was measured
    try:
        measure(out, plan, device, result, started, args.set)
    except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 - reported with what was measured
        result["errors"].append(f"{type(error).__name__}: {error}")
    free_memory()
    result["goals"] = evaluate_goals(result)
    result["wall_s"] = time.time() - started
    write_report(out, args.name or ("e2e-tiny" if args.tiny else "e2e-h200"), result, render_markdown(result))
    return result


if __name__ == "__main__":
    main()
