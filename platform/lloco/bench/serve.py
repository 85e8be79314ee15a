"""Serving benchmark: what compressed contexts, batched multi-LoRA and the engine's scheduler buy.

    python -m lloco.bench.serve --out DIR            # GPU: LLaMA-2-7B geometry, random bf16 weights
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
      document: generated tokens/s, queries/s, TTFT and latency p50/p99;
  (e), (f) scheduling: decode under a burst of long inputs with and without chunked prefill, and
      per-tenant TTFT and service under a tenant sending ten times the others' rate
      (``lloco.bench.scheduling``).
Each section reports what broke and the run carries on with the next one. JSON and markdown go to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import math
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lloco.bench import scheduling
from lloco.bench.engine import GEOMETRIES, TARGETS, bench_decode, hf_twin, random_adapter, random_llama
from lloco.bench.report import run_section, write_report
from lloco.config import EngineSettings
from lloco.model import Generator, Llama, LlamaConfig, LoraSlots, SamplingParams

GOAL_TTFT_SPEEDUP = 30.0
GOAL_LATENCY_SPEEDUP = 6.0
GOAL_VS_HF = 5.0
GOAL_ADAPTER_RATIO = 0.85
GOAL_VS_PEFT = 20.0
GOAL_STORE_LOAD_MS = 100.0
GOAL_CPU_LOAD_MS = 5.0


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
    ),
    "tiny": Plan(
        geometry="small",
        doc_tokens=(512, 1024, 2048),
        segment_len=128,
        k=8,
        question_tokens=16,
        new_tokens=16,
        repeats=1,
        decode_batch=8,
        decode_prompt=64,
        decode_new_tokens=16,
        peft_new_tokens=4,
        rank=8,
        load_repeats=5,
        clients=8,
        tenants=4,
        load_doc_tokens=1024,
        load_seconds=3.0,
    ),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def p(values: list[float], q: int) -> float:
    """The ``q``-th percentile (nearest rank above), for small samples too."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


def context_vectors(model: Llama, doc_tokens: int, plan: Plan, seed: int) -> torch.Tensor:
    """[ceil(n/S)*k, D] vectors at the embedding table's scale: what a compressed document looks like."""
    n_vectors = math.ceil(doc_tokens / plan.segment_len) * plan.k
    generator = torch.Generator(model.device).manual_seed(seed)
    scale = model.embed(torch.arange(64, device=model.device)).float().std().item()
    vectors = torch.randn(n_vectors, model.config.dim, generator=generator, device=model.device) * scale
    return vectors.to(model.dtype)


def engine_compiles(model: Llama) -> bool:
    """Whether the serving engine compiles its decode step here (``engine.compile``, CUDA only)."""
    return EngineSettings().compile and model.device.type == "cuda"


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


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
        compile=engine_compiles(model),
    )
    time_query(gen, prefix, prompt, plan.new_tokens)  # warm-up: kernels, CUDA graphs of this size
    runs = [time_query(gen, prefix, prompt, plan.new_tokens) for _ in range(plan.repeats)]
    del gen
    free_memory()
    return {
        "ttft_ms": statistics.median(r[0] for r in runs) * 1e3,
        "total_ms": statistics.median(r[1] for r in runs) * 1e3,
    }


@torch.no_grad()
def measure_hf(
    hf: Any, model: Llama, prefix: torch.Tensor, prompt: list[int], plan: Plan
) -> dict[str, float]:
    """HF ``generate`` on the same compressed input, as ``inputs_embeds``: TTFT = one new token."""
    embeds = torch.cat([prefix, model.embed(torch.tensor(prompt, device=model.device))])[None]
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=model.device)

    def generate(n: int) -> float:
        sync(model.device)
        started = time.perf_counter()
        hf.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False
        )
        sync(model.device)
        return time.perf_counter() - started

    generate(2)
    ttft = statistics.median(generate(1) for _ in range(plan.repeats))
    total = statistics.median(generate(plan.new_tokens) for _ in range(plan.repeats))
    return {"ttft_ms": ttft * 1e3, "total_ms": total * 1e3}


def bench_latency(model: Llama, hf: Any, plan: Plan) -> list[dict[str, Any]]:
    rows = []
    vocab = model.config.vocab_size
    for index, doc_tokens in enumerate(plan.doc_tokens):
        question = random_ids(plan.question_tokens, vocab, seed=100 + index)
        prefix = context_vectors(model, doc_tokens, plan, seed=index)
        document = random_ids(doc_tokens, vocab, seed=200 + index)
        compressed = measure_engine(model, prefix, question, plan)
        full = measure_engine(model, None, document + question, plan)
        hf_compressed = measure_hf(hf, model, prefix, question, plan)
        row = {
            "doc_tokens": doc_tokens,
            "context_vectors": prefix.shape[0],
            "compressed": compressed,
            "full": full,
            "hf_compressed": hf_compressed,
            "ttft_speedup": full["ttft_ms"] / compressed["ttft_ms"],
            "latency_speedup": full["total_ms"] / compressed["total_ms"],
            "vs_hf": hf_compressed["total_ms"] / compressed["total_ms"],
        }
        rows.append(row)
        print(
            f"(a) {doc_tokens} tokens -> {prefix.shape[0]} vectors: TTFT {compressed['ttft_ms']:.1f} vs full "
            f"{full['ttft_ms']:.1f} ms, e2e {compressed['total_ms']:.1f} vs full {full['total_ms']:.1f} ms, "
            f"HF {hf_compressed['total_ms']:.1f} ms",
            flush=True,
        )
        free_memory()
    return rows


# -- (b) decode throughput with adapters, and peft's mixed batch -----------------------------------------------


@contextmanager
def adapter_dirs(config: LlamaConfig, count: int, rank: int) -> Iterator[list[Path]]:
    """``count`` random rank-``rank`` adapters in PEFT's on-disk format, in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="lloco-bench-adapters-") as root:
        dirs = []
        for seed in range(count):
            folder = Path(root) / f"a{seed}"
            folder.mkdir()
            for name, data in random_adapter(config, rank, seed).items():
                (folder / name).write_bytes(data)
            dirs.append(folder)
        yield dirs


def bench_adapters(model: Llama, hf: Any, plan: Plan) -> dict[str, Any]:
    config, device = model.config, model.device
    slots = LoraSlots(config, plan.decode_batch, plan.rank, TARGETS, device, model.dtype)
    for slot in range(plan.decode_batch):
        slots.load(slot, random_adapter(config, plan.rank, seed=slot))
    mode = "compiled" if engine_compiles(model) else "graphs"
    ours = bench_decode(
        model, slots, [plan.decode_batch], plan.decode_prompt, plan.decode_new_tokens, [mode], math.inf
    )
    del slots
    free_memory()
    plain = next(r for r in ours if not r["adapters"])
    mixed = next(r for r in ours if r["adapters"])
    with adapter_dirs(config, plan.decode_batch, plan.rank) as dirs:
        peft = bench_peft(hf, dirs, plan, config.vocab_size)
    return {
        "batch": plan.decode_batch,
        "rank": plan.rank,
        "ours_none": plain,
        "ours_mixed": mixed,
        "peft_mixed": peft,
        "mixed_vs_none": mixed["tok_s"] / plain["tok_s"],
        "vs_peft": mixed["tok_s"] / peft["tok_s"],
    }


@torch.no_grad()
def bench_peft(hf: Any, dirs: list[Path], plan: Plan, vocab: int) -> dict[str, Any]:
    """peft's mixed-adapter batch: one adapter name per row; per-step time as (T(1 + n) - T(1)) / n.

    Also times each ``load_adapter`` from local disk (for section (c)). The adapters are removed again.
    """
    from peft import PeftModel

    device = hf.device
    loads = []
    started = time.perf_counter()
    peft_model = PeftModel.from_pretrained(hf, str(dirs[0]), adapter_name="a0")
    sync(device)
    loads.append(time.perf_counter() - started)
    for index, folder in enumerate(dirs[1:], start=1):
        started = time.perf_counter()
        peft_model.load_adapter(str(folder), adapter_name=f"a{index}")
        sync(device)
        loads.append(time.perf_counter() - started)
    names = [f"a{i % len(dirs)}" for i in range(plan.decode_batch)]
    ids = torch.randint(3, vocab, (plan.decode_batch, plan.decode_prompt), device=device)
    mask = torch.ones_like(ids)

    def generate(n: int) -> float:
        sync(device)
        begin = time.perf_counter()
        peft_model.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=names,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
        )
        sync(device)
        return time.perf_counter() - begin

    generate(2)
    one = statistics.median(generate(1) for _ in range(2))
    full = generate(plan.peft_new_tokens + 1)
    step_ms = (full - one) / plan.peft_new_tokens * 1e3
    peft_model.unload()  # puts the plain modules back: hf is the base model again
    free_memory()
    print(f"(b) peft mixed batch {plan.decode_batch}: {step_ms:.1f} ms/step", flush=True)
    return {
        "step_ms": step_ms,
        "tok_s": plan.decode_batch / step_ms * 1e3,
        "load_adapter_ms": [s * 1e3 for s in loads],
        "load_adapter_p50_ms": statistics.median(loads) * 1e3,
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
    resident = slots.prepare(registry.read_adapter_files(published[0].name, published[0].version))
    if device.type == "cuda":
        resident = resident.pin_memory()
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


def padded_tokenizer(vocab_size: int) -> Any:
    """The tiny test tokenizer with placeholder tokens up to ``vocab_size``, so every model id decodes."""
    from lloco.model.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([f"<t{i}>" for i in range(len(tokenizer), vocab_size)])
    return tokenizer


def bench_load(model: Llama, store: Any, plan: Plan) -> dict[str, Any]:
    return asyncio.run(_bench_load(model, store, plan))


async def _bench_load(model: Llama, store: Any, plan: Plan) -> dict[str, Any]:
    from lloco.config import LoraSettings, ServeSettings, Settings
    from lloco.model import Compressor, LoadedModel
    from lloco.registry import Registry, Tenants
    from lloco.serve.engine_core import EngineCore, EngineRequest

    config = model.config
    loaded = LoadedModel(model, padded_tokenizer(config.vocab_size), config, "bench-random", Path("."))
    summary = torch.randn(plan.k, config.dim, generator=torch.Generator().manual_seed(0)) * 0.02
    compressor = Compressor(loaded, summary, plan.segment_len, accumulate=True)
    n_vectors = math.ceil(plan.load_doc_tokens / plan.segment_len) * plan.k
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
    run = uuid.uuid4().hex[:6]
    tenants = [f"load-{run}-{i}" for i in range(plan.tenants)]
    text = " ".join(["the old house near the water"] * (plan.load_doc_tokens // 6)).encode()
    for index, tenant in enumerate(tenants):
        Tenants(store).create(tenant)
        registry = Registry(store, tenant)
        document, _ = registry.ingest_document("doc", text, len(text), tokens=plan.load_doc_tokens)
        vectors = context_vectors(model, plan.load_doc_tokens, plan, seed=1000 + index)
        registry.put_context(
            "doc", compressor.compressor_id, vectors, document.sha256, plan.segment_len, plan.k
        )
        registry.publish_adapter("default", random_adapter(config, plan.rank, seed=index), train={})
    core = EngineCore(settings, store, loaded, compressor)
    await core.start()
    samples: list[tuple[float, float, int]] = []

    async def ask(tenant: str, number: int) -> tuple[float, float, int]:
        request = EngineRequest(
            request_id=uuid.uuid4().hex,
            tenant=tenant,
            doc_ids=("doc",),
            question=f"What does the document say about the house, point {number}?",
            adapter="default",
            adapter_version=None,
            params=SamplingParams(plan.new_tokens),
        )
        started = time.perf_counter()
        first, tokens = None, 0
        async for event in core.generate(request):
            if event.token_ids and first is None:
                first = time.perf_counter()
            tokens += len(event.token_ids)
        done = time.perf_counter()
        return (first or done) - started, done - started, tokens

    async def client(index: int, deadline: float) -> None:
        number = 0
        while time.perf_counter() < deadline:
            samples.append(await ask(tenants[index % len(tenants)], number))
            number += 1

    try:
        await asyncio.gather(*(ask(tenant, -1) for tenant in tenants))  # warm-up: adapters, contexts, graphs
        started = time.perf_counter()
        await asyncio.gather(*(client(i, started + plan.load_seconds) for i in range(plan.clients)))
        wall = time.perf_counter() - started
        metrics = core.metrics()
    finally:
        await core.stop()
        for tenant in tenants:
            Tenants(store).delete(tenant)
    ttft = [s[0] * 1e3 for s in samples]
    latency = [s[1] * 1e3 for s in samples]
    tokens = sum(s[2] for s in samples)
    result = {
        "clients": plan.clients,
        "tenants": plan.tenants,
        "context_vectors": n_vectors,
        "new_tokens": plan.new_tokens,
        "seconds": wall,
        "queries": len(samples),
        "queries_per_s": len(samples) / wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": p(ttft, 50),
        "ttft_p99_ms": p(ttft, 99),
        "latency_p50_ms": p(latency, 50),
        "latency_p99_ms": p(latency, 99),
        "engine_metrics": metrics,
    }
    print(
        f"(d) {plan.clients} clients x {plan.tenants} tenants: {result['tokens_per_s']:.0f} tok/s, "
        f"{result['queries_per_s']:.1f} q/s, TTFT p50 {result['ttft_p50_ms']:.0f} / p99 "
        f"{result['ttft_p99_ms']:.0f} ms",
        flush=True,
    )
    return result


# -- report ------------------------------------------------------------------------------------------------------


def evaluate_goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    goals = []

    def goal(text: str, value: float, target: float, higher_is_better: bool = True, unit: str = "x") -> None:
        met = value >= target if higher_is_better else value <= target
        goals.append({"goal": text, "value": f"{value:.2f}{unit}", "met": met})

    latency = result.get("latency") or []
    if latency:
        longest = max(latency, key=lambda r: r["doc_tokens"])
        tokens = longest["doc_tokens"]
        goal(
            f"TTFT, compressed vs full document ({tokens} tokens) >= 30x",
            longest["ttft_speedup"],
            GOAL_TTFT_SPEEDUP,
        )
        goal(
            f"end to end, compressed vs full ({tokens} tokens) >= 6x",
            longest["latency_speedup"],
            GOAL_LATENCY_SPEEDUP,
        )
        goal(
            f"end to end vs HF generate on the compressed input ({tokens}) >= 5x",
            longest["vs_hf"],
            GOAL_VS_HF,
        )
    adapters = result.get("adapters")
    if adapters:
        goal("decode with distinct adapters vs none >= 0.85x", adapters["mixed_vs_none"], GOAL_ADAPTER_RATIO)
        goal("decode with distinct adapters vs peft's mixed batch >= 20x", adapters["vs_peft"], GOAL_VS_PEFT)
    loads = result.get("adapter_loads")
    if loads:
        goal(
            "adapter load store -> GPU p50 <= 100 ms",
            loads["store_to_gpu_p50_ms"],
            GOAL_STORE_LOAD_MS,
            False,
            " ms",
        )
        goal(
            "adapter load CPU -> GPU p50 <= 5 ms", loads["cpu_to_gpu_p50_ms"], GOAL_CPU_LOAD_MS, False, " ms"
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
            "| document tokens | context vectors | TTFT compressed ms | TTFT full ms | TTFT speedup | e2e compressed ms "
            "| e2e full ms | e2e speedup | HF on compressed ms | vs HF |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["latency"]:
            c, f, h = r["compressed"], r["full"], r["hf_compressed"]
            lines.append(
                f"| {r['doc_tokens']} | {r['context_vectors']} | {c['ttft_ms']:.1f} | {f['ttft_ms']:.1f} | "
                f"{r['ttft_speedup']:.1f}x | {c['total_ms']:.1f} | {f['total_ms']:.1f} | {r['latency_speedup']:.2f}x | "
                f"{h['total_ms']:.1f} | {r['vs_hf']:.2f}x |"
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
            "| tokens/s | queries/s | TTFT p50 ms | TTFT p99 ms | latency p50 ms | latency p99 ms |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {load['tokens_per_s']:,.0f} | {load['queries_per_s']:.1f} | {load['ttft_p50_ms']:.0f} | "
            f"{load['ttft_p99_ms']:.0f} | {load['latency_p50_ms']:.0f} | {load['latency_p99_ms']:.0f} |",
            "",
        ]
    lines += scheduling.render_markdown(result)
    if result.get("goals"):
        lines += ["## Goals (issues 6 and 19)", "", "| goal | value | met |", "|---|---|---|"]
        lines += [f"| {g['goal']} | {g['value']} | {'yes' if g['met'] else 'no'} |" for g in result["goals"]]
        lines.append("")
    if result.get("errors"):
        lines += ["## Errors", ""] + [f"- {e}" for e in result["errors"]] + [""]
    return "\n".join(lines)


@contextmanager
def object_store(endpoint: str | None, bucket: str, root: Path) -> Iterator[Any]:
    """An ObjectStore on a fresh bucket: of the S3 at ``endpoint``, or of a SeaweedFS started here."""
    from lloco.config import StoreSettings
    from lloco.storage import EmbeddedS3, ObjectStore

    if endpoint:
        store = ObjectStore(StoreSettings(endpoint_url=endpoint, bucket=bucket))
        store.ensure_bucket()
        yield store
        return
    with EmbeddedS3(root / "s3") as server:
        store = ObjectStore(server.store_settings(bucket=bucket))
        store.ensure_bucket()
        yield store


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="small geometry on CPU: a smoke run")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--s3-endpoint", default=None, help="an S3 to use instead of a local SeaweedFS")
    parser.add_argument("--sections", default="latency,adapters,adapter_loads,load,prefill_burst,fairness")
    parser.add_argument("--name", default=None, help="output file stem (default serve-h200 / serve-tiny)")
    args = parser.parse_args(argv)
    plan = PLANS["tiny" if args.tiny else "h200"]
    scheduling_plan = scheduling.PLANS["tiny" if args.tiny else "h200"]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = args.name or ("serve-tiny" if args.tiny else "serve-h200")
    sections = set(args.sections.split(","))
    started = time.time()
    import peft
    import transformers

    result: dict[str, Any] = {
        "command": "python -m lloco.bench.serve " + " ".join(sys.argv[1:] if argv is None else argv),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
        "plan": asdict(plan),
        "errors": [],
    }

    def section(key: str, fn: Callable[[], Any]) -> None:
        if key in sections:
            run_section(result, key, fn, free_memory)

    max_positions = max([*plan.doc_tokens, 4096]) + plan.question_tokens + plan.new_tokens + 64
    config = LlamaConfig(**GEOMETRIES[plan.geometry], max_position_embeddings=max_positions)
    torch.manual_seed(0)
    model = random_llama(config, device, dtype, seed=0)
    hf = hf_twin(model)
    print(f"setup done at {time.time() - started:.0f} s", flush=True)
    section("latency", lambda: bench_latency(model, hf, plan))
    section("adapters", lambda: bench_adapters(model, hf, plan))
    section("prefill_burst", lambda: scheduling.bench_prefill_burst(model, scheduling_plan))
    with tempfile.TemporaryDirectory(prefix="lloco-bench-serve-") as root:
        try:
            with object_store(args.s3_endpoint, f"bench-{uuid.uuid4().hex[:12]}", Path(root)) as store:
                section("adapter_loads", lambda: bench_adapter_loads(model, store, plan))
                section("load", lambda: bench_load(model, store, plan))
                section("fairness", lambda: scheduling.bench_fairness(model, store, scheduling_plan, plan))
        except Exception as error:  # noqa: BLE001 - no store: the store sections are reported as errors
            result["errors"].append(f"store: {type(error).__name__}: {error}")
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    result["goals"] = evaluate_goals(result) + scheduling.evaluate_goals(result)
    result["wall_s"] = time.time() - started
    write_report(args.out, name, result, render_markdown(result))
    return result


if __name__ == "__main__":
    main()
