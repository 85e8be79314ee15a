"""Serving benchmark: what compressed contexts, batched multi-LoRA and the engine's scheduler buy.

    python -m lloco.bench.serve --out DIR            # GPU: LLaMA-2-7B geometry, random bf16 weights, (a)-(d)
    python -m lloco.bench.serve --out DIR --sections adapter_churn   # GPU: (g), a call of its own
    python -m lloco.bench.serve --out DIR --tiny     # CPU: a small geometry, a smoke run of every section

No Ray: the engine's own classes (`Generator`, `LoraSlots`, `EngineCore`) on one device, and a SeaweedFS
server on loopback as the store (or any S3 at ``--s3-endpoint``, keys from the AWS environment variables;
``lloco.bench.compress`` says how to carry the ``weed`` binary to a host without a package index).
Weights are random (speed does not depend on their values); the tokenizer is the tiny test tokenizer
padded to the model's vocabulary, so every generated id decodes.

  (a) latency, batch 1, 64 new tokens: TTFT and end to end with the compressed context of an
      8k/16k/32k-token document (ceil(n/S)*k vectors, S=1536, k=50 as in the paper) vs the full document
      on the same engine, and HF ``generate`` on the same compressed input (``inputs_embeds``);
  (b) decode throughput at batch 32: 32 distinct rank-8 adapters vs none (our slots), and vs peft's
      mixed-adapter batch (``adapter_names``) on the same weights;
  (c) adapter load latency, p50, rank-8 adapter: store -> GPU slot (read, parse, copy) and CPU tier ->
      GPU slot (copy from pinned memory), beside peft's ``load_adapter`` from local disk;
  (d) EngineCore under 64 concurrent clients of 16 tenants, each tenant with its own adapter and
      document, each query carrying what the edge sends from its caches (the tenant's records, the prompt
      tokenized): generated tokens/s, queries/s, TTFT and latency p50/p99, where the TTFT went;
  (g) adapter churn (``adapter_churn``): one EngineCore with as many GPU slots as rows (32) and a CPU tier
      holding every adapter, 32 closed-loop clients asking round-robin first over 32 tenants (their adapters
      resident after warm-up), then over 1,000 (each query swaps its adapter from the CPU tier into a slot),
      each tenant with its own adapter and a one-segment document, queries of 32-96 new tokens: tokens/s, TTFT p50/p99 and swaps of both
      runs, the CPU tier's warm-up time and host memory; 1,000 is capped to what half the host's available
      memory holds. (e) and (f) are ``lloco.bench.scheduling``'s.
HF baselines: ``generate`` with its default dynamic cache and with its static cache (compiled on CUDA);
ratios are taken against the stronger. Scheduling (chunked prefill, fairness) is ``lloco.bench.scheduling``;
the same load through gRPC and the whole stack is ``lloco.bench.e2e``.
Each section reports what broke and the run carries on with the next one. JSON and markdown go to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
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
    HF_CACHES,
    TARGETS,
    Floors,
    adapter_dirs,
    add_run_arguments,
    compressed_length,
    context_vectors,
    engine_compiles,
    free_memory,
    goals_and_errors,
    hf_generate_ms,
    hf_twin,
    measure_decode,
    peft_mixed_decode,
    random_adapter,
    random_ids,
    random_llama,
    run_info,
    sync,
)
from lloco.bench.report import run_section, write_report, write_unfinished
from lloco.bench.workload import (
    TTFT_PARTS_LEGEND,
    QuerySample,
    delete_tenants,
    engine_query,
    engine_request,
    load_summary,
    object_store,
    plant_tenants,
    random_engine_parts,
    ttft_parts_table,
    ttft_summary,
    varied_new_tokens,
    varied_new_tokens_range,
)
from lloco.config import EngineSettings
from lloco.errors import Internal, ResourceExhausted
from lloco.model import Generator, Llama, LlamaConfig, LoraSlots, SamplingParams, chat_prompt

GOAL_ADAPTER_RATIO = 0.93  # issue 19
GOAL_CHURN_RATIO = (
    0.8  # issue 19: many adapters round-robin through the slots vs as many as the slots, resident
)
CHURN_HOST_MEMORY_SHARE = 0.5  # of the host's available memory, the most (g)'s CPU tier may hold
CHURN_QUESTION = "What does the document say about the house?"
SECTIONS = ("latency", "adapters", "adapter_loads", "load", "adapter_churn")
# on the GPU, (g) plants and loads a thousand adapters: a call of its own (docs/benchmarks/README.md)
GPU_DEFAULT_SECTIONS = ("latency", "adapters", "adapter_loads", "load")


@dataclass(frozen=True)
class Plan:
    """Sizes of one run."""

    geometry: str
    doc_tokens: tuple[int, ...]
    segment_len: int
    k: int
    question_tokens: int
    new_tokens: int
    repeats: int
    decode_batch: int
    decode_prompt: int
    decode_new_tokens: int
    peft_new_tokens: int
    rank: int
    load_repeats: int
    clients: int
    tenants: int
    load_doc_tokens: int
    load_seconds: float
    churn_batch: int
    churn_adapters: int
    churn_doc_tokens: int
    churn_seconds: float


PLANS = {
    "h200": Plan(
        geometry="llama2-7b",
        doc_tokens=(8192, 16384, 32768),
        segment_len=1536,
        k=50,
        question_tokens=32,
        new_tokens=64,
        repeats=3,
        decode_batch=32,
        decode_prompt=512,
        decode_new_tokens=64,
        peft_new_tokens=8,
        rank=8,
        load_repeats=20,
        clients=64,
        tenants=16,
        load_doc_tokens=8192,
        load_seconds=60.0,
        churn_batch=32,
        churn_adapters=1000,
        churn_doc_tokens=1536,
        churn_seconds=60.0,
    ),
    "tiny": Plan(
        geometry="small",
        doc_tokens=(256, 512),
        segment_len=128,
        k=8,
        question_tokens=8,
        new_tokens=4,
        repeats=1,
        decode_batch=4,
        decode_prompt=16,
        decode_new_tokens=4,
        peft_new_tokens=4,
        rank=8,
        load_repeats=3,
        clients=4,
        tenants=2,
        load_doc_tokens=256,
        load_seconds=1.5,
        churn_batch=8,
        churn_adapters=64,
        churn_doc_tokens=128,
        churn_seconds=1.5,
    ),
}


# -- (a) latency of one query ------------------------------------------------------------------------------


def time_query(
    gen: Generator, prefix: torch.Tensor | None, prompt: list[int], new_tokens: int
) -> tuple[float, float]:
    """(TTFT, end to end) in seconds of one request alone on ``gen``: prefill, first token, the rest."""
    sync(gen.device)
    started = time.perf_counter()
    gen.add(uuid.uuid4().hex, prefix, prompt, -1, SamplingParams(new_tokens))
    first = None
    while gen.active():
        if gen.step() and first is None:
            first = time.perf_counter()
    done = time.perf_counter()
    return (first or done) - started, done - started


def measure_engine(
    model: Llama, prefix: torch.Tensor | None, prompt: list[int], plan: Plan
) -> dict[str, float]:
    """Median TTFT and latency on a generator sized for this query (as the engine would be configured)."""
    length = (0 if prefix is None else prefix.shape[0]) + len(prompt)
    gen = Generator(
        model,
        None,
        1,
        length + plan.new_tokens + 8,
        eos_token_ids=(),
        max_prefill_tokens=max(length, 16),
        compile=engine_compiles(model.device),
    )
    time_query(gen, prefix, prompt, plan.new_tokens)  # warm-up: kernels, CUDA graphs of this size
    runs = [time_query(gen, prefix, prompt, plan.new_tokens) for _ in range(plan.repeats)]
    del gen
    free_memory()
    return {
        "ttft_ms": statistics.median(r[0] for r in runs) * 1e3,
        "total_ms": statistics.median(r[1] for r in runs) * 1e3,
    }


def measure_hf(
    hf: Any, model: Llama, prefix: torch.Tensor, prompt: list[int], plan: Plan, cache: str
) -> dict[str, Any]:
    """HF ``generate`` on the same compressed input, as ``inputs_embeds``, with HF's ``cache``: TTFT = the
    median time to one new token, end to end = to ``plan.new_tokens`` (each after an untimed same call)."""
    embeds = torch.cat([prefix, model.embed(torch.tensor(prompt, device=model.device))])[None]
    inputs = dict(
        inputs_embeds=embeds,
        attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=model.device),
    )
    ttft, warm_first = hf_generate_ms(hf, 1, cache, plan.repeats, **inputs)
    total, warm_total = hf_generate_ms(hf, plan.new_tokens, cache, plan.repeats, **inputs)
    return {"cache": cache, "ttft_ms": ttft, "total_ms": total, "warmup_s": warm_first + warm_total}


def bench_latency(model: Llama, hf: Any, plan: Plan) -> list[dict[str, Any]]:
    rows = []
    vocab = model.config.vocab_size
    for index, doc_tokens in enumerate(plan.doc_tokens):
        question = random_ids(plan.question_tokens, vocab, seed=100 + index)
        prefix = context_vectors(model, doc_tokens, plan.segment_len, plan.k, seed=index)
        document = random_ids(doc_tokens, vocab, seed=200 + index)
        compressed = measure_engine(model, prefix, question, plan)
        full = measure_engine(model, None, document + question, plan)
        hf_runs = [measure_hf(hf, model, prefix, question, plan, cache) for cache in HF_CACHES]
        hf_best = min(hf_runs, key=lambda r: r["total_ms"])
        row = {
            "doc_tokens": doc_tokens,
            "context_vectors": prefix.shape[0],
            "compressed": compressed,
            "full": full,
            "hf_compressed": hf_runs,
            "ttft_speedup": full["ttft_ms"] / compressed["ttft_ms"],
            "latency_speedup": full["total_ms"] / compressed["total_ms"],
            "vs_hf": hf_best["total_ms"] / compressed["total_ms"],
            "vs_hf_cache": hf_best["cache"],
        }
        rows.append(row)
        print(
            f"(a) {doc_tokens} tokens -> {prefix.shape[0]} vectors: TTFT {compressed['ttft_ms']:.1f} vs full "
            f"{full['ttft_ms']:.1f} ms, e2e {compressed['total_ms']:.1f} vs full {full['total_ms']:.1f} ms, "
            f"HF ({hf_best['cache']} cache) {hf_best['total_ms']:.1f} ms",
            flush=True,
        )
        free_memory()
    return rows


# -- (b) decode throughput with adapters, and peft's mixed batch -----------------------------------------------


def bench_adapters(model: Llama, hf: Any, plan: Plan, floors: Floors) -> dict[str, Any]:
    config, device = model.config, model.device
    slots = LoraSlots(config, plan.decode_batch, plan.rank, TARGETS, device, model.dtype)
    for slot in range(plan.decode_batch):
        slots.load(slot, random_adapter(config, plan.rank, seed=slot))
    mode = "compiled" if engine_compiles(device) else "graphs"
    ours = measure_decode(
        model, slots, [plan.decode_batch], plan.decode_prompt, plan.decode_new_tokens, [mode], floors
    )
    del slots
    free_memory()
    plain = next(r for r in ours if not r["adapters"])
    mixed = next(r for r in ours if r["adapters"])
    with adapter_dirs(config, plan.decode_batch, plan.rank) as dirs:
        peft = peft_mixed_decode(hf, dirs, plan.decode_batch, plan.decode_prompt, plan.peft_new_tokens)
    return {
        "batch": plan.decode_batch,
        "rank": plan.rank,
        "ours_none": plain,
        "ours_mixed": mixed,
        "peft_mixed": peft,
        "mixed_vs_none": mixed["tok_s"] / plain["tok_s"],
        "vs_peft": mixed["tok_s"] / peft["tok_s"],
    }


# -- (c) adapter load latency ------------------------------------------------------------------------------------


def bench_adapter_loads(model: Llama, store: Any, plan: Plan) -> dict[str, Any]:
    """Store -> GPU slot as the engine does a miss (read, parse, copy), and CPU tier -> GPU slot (copy)."""
    from lloco.registry import Registry, Tenants

    config, device = model.config, model.device
    tenant = f"bench-{uuid.uuid4().hex[:8]}"
    Tenants(store).create(tenant)
    registry = Registry(store, tenant)
    published = [
        registry.publish_adapter(f"a{seed}", random_adapter(config, plan.rank, seed), train={})
        for seed in range(plan.load_repeats)
    ]
    slots = LoraSlots(config, 2, plan.rank, TARGETS, device, model.dtype)
    slots.load(0, random_adapter(config, plan.rank, 0))  # warm-up: first-touch allocations
    store_ms, cpu_ms = [], []
    for version in published:
        sync(device)
        started = time.perf_counter()
        adapter = slots.prepare(registry.read_adapter_files(version.name, version.version))
        slots.load(0, adapter)
        sync(device)
        store_ms.append((time.perf_counter() - started) * 1e3)
    resident = slots.prepare(
        registry.read_adapter_files(published[0].name, published[0].version), pin_memory=device.type == "cuda"
    )
    for _ in range(plan.load_repeats):
        sync(device)
        started = time.perf_counter()
        slots.load(1, resident)
        sync(device)
        cpu_ms.append((time.perf_counter() - started) * 1e3)
    Tenants(store).delete(tenant)
    result = {
        "adapter_mb": resident.nbytes / 2**20,
        "store_to_gpu_ms": store_ms,
        "cpu_to_gpu_ms": cpu_ms,
        "store_to_gpu_p50_ms": statistics.median(store_ms),
        "cpu_to_gpu_p50_ms": statistics.median(cpu_ms),
    }
    print(
        f"(c) rank-{plan.rank} adapter ({result['adapter_mb']:.1f} MB): store->GPU p50 "
        f"{result['store_to_gpu_p50_ms']:.1f} ms, CPU->GPU p50 {result['cpu_to_gpu_p50_ms']:.2f} ms",
        flush=True,
    )
    return result


# -- (d) the engine under concurrent load ------------------------------------------------------------------------


def bench_load(model: Llama, store: Any, plan: Plan) -> dict[str, Any]:
    return asyncio.run(_bench_load(model, store, plan))


async def _bench_load(model: Llama, store: Any, plan: Plan) -> dict[str, Any]:
    from lloco.config import LoraSettings, ServeSettings, Settings
    from lloco.serve.engine_core import EngineCore

    loaded, compressor = random_engine_parts(model, plan.segment_len, plan.k)
    n_vectors = compressed_length(plan.load_doc_tokens, plan.segment_len, plan.k)
    max_seq_len = math.ceil((n_vectors + plan.question_tokens * 2 + plan.new_tokens + 64) / 128) * 128
    settings = Settings(
        engine=EngineSettings(
            max_batch_size=plan.clients,
            max_seq_len=max_seq_len,
            context_cache_gpu_bytes=2**30,
            context_cache_cpu_bytes=2**30,
        ),
        lora=LoraSettings(max_rank=plan.rank, gpu_slots=plan.tenants, cpu_adapters=2 * plan.tenants),
        serve=ServeSettings(max_ongoing_requests=4 * plan.clients),
    )
    tenants = [f"load-{uuid.uuid4().hex[:6]}-{i}" for i in range(plan.tenants)]
    resolved = plant_tenants(
        store,
        model,
        compressor.compressor_id,
        tenants,
        plan.load_doc_tokens,
        plan.segment_len,
        plan.k,
        plan.rank,
        1000,
    )
    core = EngineCore(settings, store, loaded, compressor)
    await core.start()
    samples: list[QuerySample] = []
    later: list[QuerySample] = []  # all but each client's first query, which all clients send at once

    def ask(index: int, number: int) -> Any:
        # what the edge sends from its caches: the tenant's records, the prompt tokenized before the call
        question = f"What does the document say about the house, point {number}?"
        prompt_ids = tuple(chat_prompt(loaded.tokenizer, question))
        request = engine_request(
            tenants[index], ("doc",), question, plan.new_tokens, resolved[index], prompt_ids
        )
        return engine_query(core, request)

    async def client(index: int, deadline: float) -> None:
        number = 0
        while time.perf_counter() < deadline:
            sample = await ask(index % len(tenants), number)
            samples.append(sample)
            if number:
                later.append(sample)
            number += 1

    try:
        # warm-up: adapters, contexts, graphs
        await asyncio.gather(*(ask(index, -1) for index in range(len(tenants))))
        started = time.perf_counter()
        await asyncio.gather(*(client(i, started + plan.load_seconds) for i in range(plan.clients)))
        wall = time.perf_counter() - started
        metrics = core.metrics()
    finally:
        await core.stop()
        delete_tenants(store, tenants)
    steady = ttft_summary(later)
    result = {
        "clients": plan.clients,
        "tenants": plan.tenants,
        "context_vectors": n_vectors,
        "new_tokens": plan.new_tokens,
        **load_summary(samples, wall),
        "ttft_p50_steady_ms": steady["p50_ms"],
        "ttft_p99_steady_ms": steady["p99_ms"],
        "engine_metrics": metrics,
    }
    print(
        f"(d) {plan.clients} clients x {plan.tenants} tenants: {result['tokens_per_s']:.0f} tok/s, "
        f"{result['queries_per_s']:.1f} q/s, TTFT p50 {result['ttft_p50_ms']:.0f} / p99 "
        f"{result['ttft_p99_ms']:.0f} ms (after each client's first: p99 {result['ttft_p99_steady_ms']:.0f} ms)",
        flush=True,
    )
    return result


# -- (g) many adapters through few slots ---------------------------------------------------------------------------


def available_host_memory() -> int:
    """Bytes the host can still give a process without swapping (Linux's MemAvailable)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise Internal("/proc/meminfo has no MemAvailable line")


def bench_adapter_churn(model: Llama, store: Any, plan: Plan) -> dict[str, Any]:
    return asyncio.run(_bench_adapter_churn(model, store, plan))


async def _bench_adapter_churn(model: Llama, store: Any, plan: Plan) -> dict[str, Any]:
    from lloco.config import LoraSettings, ServeSettings, Settings
    from lloco.serve.engine_core import EngineCore

    config, batch = model.config, plan.churn_batch
    # one adapter in the CPU tier: the slots' layout (ranks padded), in the engine's dtype
    layout = LoraSlots(config, 1, plan.rank, TARGETS, "cpu", model.dtype)
    adapter_bytes = layout.prepare(random_adapter(config, plan.rank, seed=0)).nbytes
    available = available_host_memory()
    n_adapters = min(plan.churn_adapters, int(CHURN_HOST_MEMORY_SHARE * available) // adapter_bytes)
    if n_adapters < plan.churn_adapters:
        print(
            f"(g) {plan.churn_adapters} adapters of {adapter_bytes / 2**20:.1f} MB would hold "
            f"{plan.churn_adapters * adapter_bytes / 2**30:.1f} GiB in the CPU tier; "
            f"{CHURN_HOST_MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GiB available holds {n_adapters}",
            flush=True,
        )
    if n_adapters <= batch:
        raise ResourceExhausted(
            f"host memory holds {n_adapters} adapters of {adapter_bytes / 2**20:.1f} MB in the CPU tier: "
            f"no more than the {batch} GPU slots, nothing would churn"
        )
    loaded, compressor = random_engine_parts(model, plan.segment_len, plan.k)
    prompt_ids = tuple(chat_prompt(loaded.tokenizer, CHURN_QUESTION))
    n_vectors = compressed_length(plan.churn_doc_tokens, plan.segment_len, plan.k)
    longest = varied_new_tokens_range(plan.new_tokens)[1]
    context_bytes = n_adapters * n_vectors * config.dim * 4  # every tenant's context, fp32 at most
    settings = Settings(
        engine=EngineSettings(
            max_batch_size=batch,
            max_seq_len=math.ceil((n_vectors + len(prompt_ids) + longest) / 128) * 128,
            context_cache_gpu_bytes=context_bytes,
            context_cache_cpu_bytes=context_bytes,
        ),
        lora=LoraSettings(max_rank=plan.rank, gpu_slots=batch, cpu_adapters=n_adapters),
        serve=ServeSettings(max_ongoing_requests=4 * batch),
    )
    tenants = [f"churn-{uuid.uuid4().hex[:6]}-{i}" for i in range(n_adapters)]
    started = time.perf_counter()
    resolved = plant_tenants(
        store,
        model,
        compressor.compressor_id,
        tenants,
        plan.churn_doc_tokens,
        plan.segment_len,
        plan.k,
        plan.rank,
        2000,
    )
    plant_s = time.perf_counter() - started
    print(f"(g) {n_adapters} tenants planted (a context and an adapter each) in {plant_s:.1f} s", flush=True)
    core = EngineCore(settings, store, loaded, compressor)
    await core.start()
    try:
        # the resident warm-up decodes as long as the longest query: the decode shapes both runs meet are
        # compiled (CUDA graphs captured) before either window; the churn warm-up only loads
        resident = await _adapter_run(core, tenants[:batch], resolved[:batch], prompt_ids, plan, longest)
        churn = await _adapter_run(core, tenants, resolved, prompt_ids, plan, 1)
    finally:
        await core.stop()
        delete_tenants(store, tenants)
    for run in (resident, churn):
        run["cpu_tier_gib"] = run["cpu_tier_adapters"] * adapter_bytes / 2**30
    result = {
        "batch": batch,
        "gpu_slots": batch,
        "rank": plan.rank,
        "adapter_mb": adapter_bytes / 2**20,
        "adapters_requested": plan.churn_adapters,
        "host_memory_available_gib": available / 2**30,
        "context_vectors": n_vectors,
        "new_tokens": plan.new_tokens,
        "new_tokens_range": varied_new_tokens_range(plan.new_tokens),
        "plant_s": plant_s,
        "resident": resident,
        "churn": churn,
        "churn_vs_resident": churn["tokens_per_s"] / resident["tokens_per_s"],
    }
    for label, run in (("resident", resident), ("churn", churn)):
        print(
            f"(g) {label}: {run['adapters']} adapters through {batch} slots: {run['tokens_per_s']:.0f} tok/s, "
            f"TTFT p50 {run['ttft_p50_ms']:.0f} / p99 {run['ttft_p99_ms']:.0f} ms, {run['slot_loads']} swaps "
            f"(CPU tier -> slot) in {run['queries']} queries (warm-up {run['warmup_s']:.1f} s, CPU tier "
            f"{run['cpu_tier_gib']:.2f} GiB)",
            flush=True,
        )
    return result


async def _adapter_run(
    core: Any,
    tenants: list[str],
    resolved: list[Any],
    prompt_ids: tuple[int, ...],
    plan: Plan,
    warm_up_tokens: int,
) -> dict[str, Any]:
    """One closed-loop run over ``tenants`` round-robin, one client per row: a warm-up query of each tenant,
    ``warm_up_tokens`` long (its adapter into the CPU tier and a slot, its context into the cache), then the
    timed window, with the engine's adapter counters over the window."""

    def request(number: int, new_tokens: int) -> Any:
        index = number % len(tenants)
        return engine_request(
            tenants[index], ("doc",), CHURN_QUESTION, new_tokens, resolved[index], prompt_ids
        )

    started, cold = time.perf_counter(), core.metrics()
    await _closed_loop(core, lambda n: request(n, warm_up_tokens), plan.churn_batch, count=len(tenants))
    warmup_s = time.perf_counter() - started
    before, evicted = core.metrics(), core.residency().adapter_evictions_cpu
    samples, wall = await _closed_loop(
        core,
        lambda n: request(n, varied_new_tokens(n, plan.new_tokens)),
        plan.churn_batch,
        seconds=plan.churn_seconds,
    )
    after = core.metrics()
    return {
        "adapters": len(tenants),
        "warmup_s": warmup_s,
        # the warm-up's adapter fills from the store: how many, their reads and parses (seconds summed over
        # the engine's threads, so a sum far above warmup_s means they overlapped)
        "warmup_store_loads": int(before["adapter_s3_loads"] - cold["adapter_s3_loads"]),
        "warmup_read_s": before["adapter_s3_read_seconds"] - cold["adapter_s3_read_seconds"],
        "warmup_parse_s": before["adapter_parse_seconds"] - cold["adapter_parse_seconds"],
        "cpu_tier_adapters": len(core.adapters.tier),
        **load_summary(samples, wall),
        "slot_loads": int(after["adapter_slot_loads"] - before["adapter_slot_loads"]),
        "store_loads": int(after["adapter_s3_loads"] - before["adapter_s3_loads"]),
        "cpu_tier_evictions": core.residency().adapter_evictions_cpu - evicted,
    }


async def _closed_loop(
    core: Any,
    request_of: Callable[[int], Any],
    clients: int,
    count: int | None = None,
    seconds: float | None = None,
) -> tuple[list[QuerySample], float]:
    """``clients`` clients, each sending its next query when its last one ended; query number n (counted over
    all clients) is ``request_of(n)``. Ends after ``count`` queries or ``seconds``; returns the samples and
    the wall seconds."""
    numbers = itertools.count()
    samples: list[QuerySample] = []
    started = time.perf_counter()
    deadline = math.inf if seconds is None else started + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            number = next(numbers)
            if count is not None and number >= count:
                return
            samples.append(await engine_query(core, request_of(number)))

    await asyncio.gather(*(client() for _ in range(clients)))
    return samples, time.perf_counter() - started


# -- report ------------------------------------------------------------------------------------------------------


def evaluate_goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 19's goals for this bench's sections (its gRPC goals are ``lloco.bench.e2e``'s)."""
    goals = []
    adapters = result.get("adapters")
    if adapters:
        ratio = adapters["mixed_vs_none"]
        goals.append(
            {
                "goal": f"{adapters['batch']} distinct adapters at batch {adapters['batch']} >= "
                f"{GOAL_ADAPTER_RATIO}x of no adapters",
                "value": f"{ratio:.3f}x",
                "met": ratio >= GOAL_ADAPTER_RATIO,
            }
        )
    churn = result.get("adapter_churn")
    if churn:
        ratio = churn["churn_vs_resident"]
        goals.append(
            {
                "goal": f"{churn['churn']['adapters']} distinct adapters round-robin (CPU tier -> "
                f"{churn['gpu_slots']} GPU slots) >= {GOAL_CHURN_RATIO}x of {churn['batch']} resident ones, "
                f"batch {churn['batch']}",
                "value": f"{ratio:.3f}x",
                "met": ratio >= GOAL_CHURN_RATIO,
            }
        )
    return goals


def render_markdown(result: dict[str, Any]) -> str:
    plan = result["plan"]
    lines = [
        f"# Serving benchmark ({plan['geometry']}, random {result['dtype']} weights)",
        "",
        f"`{result['command']}` on {result['device_name']}, {result['date']}; torch {result['torch']}, "
        f"transformers {result['transformers']}, peft {result['peft']}.",
        "",
    ]
    if result.get("latency"):
        lines += [
            f"## (a) One query, batch 1, {plan['new_tokens']} new tokens (S={plan['segment_len']}, k={plan['k']})",
            "",
            "HF runs `generate` on the same compressed input (`inputs_embeds`) with its default dynamic cache and "
            "with its static cache (compiled on CUDA); vs HF is against the faster of the two.",
            "",
            "| document tokens | context vectors | TTFT compressed ms | TTFT full ms | TTFT speedup | e2e compressed ms "
            "| e2e full ms | e2e speedup | HF dynamic e2e ms | HF static e2e ms | vs HF |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["latency"]:
            c, f = r["compressed"], r["full"]
            hf = {h["cache"]: h["total_ms"] for h in r["hf_compressed"]}
            lines.append(
                f"| {r['doc_tokens']} | {r['context_vectors']} | {c['ttft_ms']:.1f} | {f['ttft_ms']:.1f} | "
                f"{r['ttft_speedup']:.1f}x | {c['total_ms']:.1f} | {f['total_ms']:.1f} | {r['latency_speedup']:.2f}x | "
                f"{hf.get('dynamic', math.nan):.1f} | {hf.get('static', math.nan):.1f} | {r['vs_hf']:.2f}x ({r['vs_hf_cache']}) |"
            )
        lines.append("")
    adapters = result.get("adapters")
    if adapters:
        lines += [
            f"## (b) Decode at batch {adapters['batch']}, {plan['decode_prompt']}-token prompts, rank-{adapters['rank']} adapters",
            "",
            "| variant | ms/step | tok/s | vs no adapters |",
            "|---|---:|---:|---:|",
        ]
        none = adapters["ours_none"]["tok_s"]
        for label, row in (
            ("ours, no adapters", adapters["ours_none"]),
            (f"ours, {adapters['batch']} distinct adapters", adapters["ours_mixed"]),
            (f"peft mixed batch (`adapter_names`), {adapters['batch']} adapters", adapters["peft_mixed"]),
        ):
            lines.append(
                f"| {label} | {row['step_ms']:.2f} | {row['tok_s']:,.0f} | {row['tok_s'] / none:.3f}x |"
            )
        lines += ["", f"Ours with adapters vs peft: {adapters['vs_peft']:.1f}x.", ""]
    loads = result.get("adapter_loads")
    if loads:
        peft_ms = (adapters or {}).get("peft_mixed", {}).get("load_adapter_p50_ms")
        lines += [
            f"## (c) Adapter load, rank {plan['rank']} ({loads['adapter_mb']:.1f} MB), p50 of {len(loads['cpu_to_gpu_ms'])}",
            "",
            "| path | p50 ms |",
            "|---|---:|",
            f"| store -> GPU slot (read, parse, copy) | {loads['store_to_gpu_p50_ms']:.1f} |",
            f"| CPU tier -> GPU slot (pinned copy) | {loads['cpu_to_gpu_p50_ms']:.2f} |",
        ]
        if peft_ms is not None:
            lines.append(f"| peft `load_adapter` from local disk | {peft_ms:.1f} |")
        lines.append("")
    load = result.get("load")
    if load:
        lines += [
            f"## (d) EngineCore under load: {load['clients']} clients, {load['tenants']} tenants "
            f"({load['context_vectors']} context vectors, {load['new_tokens']} new tokens, {load['seconds']:.0f} s)",
            "",
            "| tokens/s | queries/s | TTFT p50 ms | TTFT p99 ms | TTFT p50 / p99 ms after each client's first | "
            "latency p50 ms | latency p99 ms |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {load['tokens_per_s']:,.0f} | {load['queries_per_s']:.1f} | {load['ttft_p50_ms']:.0f} | "
            f"{load['ttft_p99_ms']:.0f} | {load['ttft_p50_steady_ms']:.0f} / {load['ttft_p99_steady_ms']:.0f} | "
            f"{load['latency_p50_ms']:.0f} | {load['latency_p99_ms']:.0f} |",
            "",
        ]
        if load.get("ttft_parts_ms"):
            lines += [
                f"Where the TTFT went, over every query (EngineCore's clock, ms; {TTFT_PARTS_LEGEND}):",
                "",
                *ttft_parts_table(load["ttft_parts_ms"]),
                "",
            ]
    churn = result.get("adapter_churn")
    if churn:
        resident, churned = churn["resident"], churn["churn"]
        lines += [
            f"## (g) Adapter churn: {churned['adapters']} adapters round-robin through {churn['gpu_slots']} GPU "
            f"slots vs {resident['adapters']} resident (batch {churn['batch']}, rank {churn['rank']}, "
            f"{churn['adapter_mb']:.1f} MB each; {churn['context_vectors']} context vectors, "
            f"{churn['new_tokens_range'][0]}-{churn['new_tokens_range'][1]} new tokens, {churned['seconds']:.0f} s each)",
            "",
            f"One tenant per adapter, {churn['batch']} closed-loop clients. Swaps: CPU tier -> GPU slot copies "
            "in the timed window (after each run's warm-up query per tenant).",
            "",
            "| adapters | tokens/s | queries/s | TTFT p50 ms | TTFT p99 ms | swaps | store loads | vs resident |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for run in (resident, churned):
            lines.append(
                f"| {run['adapters']} | {run['tokens_per_s']:,.0f} | {run['queries_per_s']:.1f} | "
                f"{run['ttft_p50_ms']:.0f} | {run['ttft_p99_ms']:.0f} | {run['slot_loads']} | "
                f"{run['store_loads']} | {run['tokens_per_s'] / resident['tokens_per_s']:.3f}x |"
            )
        for label, run in (("resident", resident), ("churn", churned)):
            if run.get("ttft_parts_ms"):
                lines += [
                    "",
                    f"TTFT parts, {label} (ms; {TTFT_PARTS_LEGEND}):",
                    "",
                    *ttft_parts_table(run["ttft_parts_ms"]),
                ]
        lines += [
            "",
            f"Planting {churned['adapters']} tenants (a context and an adapter each): {churn['plant_s']:.1f} s. "
            f"CPU tier warm-up (every adapter from the store, once): {churned['warmup_s']:.1f} s for "
            f"{churned['warmup_store_loads']} store loads (their reads {churned['warmup_read_s']:.1f} s and parses "
            f"{churned['warmup_parse_s']:.1f} s, summed over the engine's threads); it then held "
            f"{churned['cpu_tier_adapters']} adapters, {churned['cpu_tier_gib']:.2f} GiB of host memory "
            f"({churn['host_memory_available_gib']:.0f} GiB were available).",
            "",
        ]
    lines += goals_and_errors(result)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser)
    parser.add_argument(
        "--sections",
        default=None,
        help=f"comma-separated, of {','.join(SECTIONS)} (default: all with --tiny, else "
        f"{','.join(GPU_DEFAULT_SECTIONS)})",
    )
    parser.add_argument(
        "--churn-seconds", type=float, default=None, help="length of each adapter_churn window (default 60)"
    )
    parser.add_argument("--name", default=None, help="output file stem (default serve-h200 / serve-tiny)")
    args = parser.parse_args(argv)
    sections = (
        set(args.sections.split(","))
        if args.sections
        else set(SECTIONS if args.tiny else GPU_DEFAULT_SECTIONS)
    )
    if sections - set(SECTIONS):
        parser.error(
            f"unknown sections {sorted(sections - set(SECTIONS))}; choose among {', '.join(SECTIONS)}"
        )
    plan = PLANS["tiny" if args.tiny else "h200"]
    if args.churn_seconds is not None:
        plan = replace(plan, churn_seconds=args.churn_seconds)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = args.name or ("serve-tiny" if args.tiny else "serve-h200")
    started = time.time()
    result: dict[str, Any] = run_info("lloco.bench.serve", argv, device) | {
        "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
        "plan": asdict(plan),
        "errors": [],
    }

    def section(key: str, fn: Callable[[], Any]) -> None:
        if key in sections:
            run_section(result, key, fn, free_memory)
            write_unfinished(args.out, name, result, render_markdown)

    max_positions = max([*plan.doc_tokens, 4096]) + plan.question_tokens + plan.new_tokens + 64
    config = LlamaConfig(**GEOMETRIES[plan.geometry], max_position_embeddings=max_positions)
    torch.manual_seed(0)
    model = random_llama(config, device, dtype, seed=0)
    hf = hf_twin(model)
    print(f"setup done at {time.time() - started:.0f} s", flush=True)
    section("latency", lambda: bench_latency(model, hf, plan))
    if "adapters" in sections:
        floors = Floors.of(device)
        result["floors"] = floors.describe()
        section("adapters", lambda: bench_adapters(model, hf, plan, floors))
    with tempfile.TemporaryDirectory(prefix="lloco-bench-serve-") as root:
        try:
            with object_store(args.s3_endpoint, Path(root)) as store:
                section("adapter_loads", lambda: bench_adapter_loads(model, store, plan))
                section("load", lambda: bench_load(model, store, plan))
                section("adapter_churn", lambda: bench_adapter_churn(model, store, plan))
        except Exception as error:  # noqa: BLE001 - no store: the store sections are reported as errors
            result["errors"].append(f"store: {type(error).__name__}: {error}")
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    result["goals"] = evaluate_goals(result)
    result["wall_s"] = time.time() - started
    write_report(args.out, name, result, render_markdown(result))
    return result


if __name__ == "__main__":
    main()
