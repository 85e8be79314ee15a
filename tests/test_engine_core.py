"""The engine run alone (no Ray): continuous batching across tenants and adapters, adapter versions picked up
live, cancellation, errors and backpressure; a tiny random Llama on CPU and a real SeaweedFS S3.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch
from lloco.compress import PreparedDocument, tokenize_segments
from lloco.config import EngineSettings, LoraSettings, ServeSettings, Settings
from lloco.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from lloco.model import (
    Compressor,
    GenerationRequest,
    Generator,
    LlamaConfig,
    LoadedModel,
    LoraSlots,
    SamplingParams,
    chat_prompt,
    generate,
    load_model,
)
from lloco.registry import Registry, Tenants
from lloco.registry.evidence import Evidence, evidence_budget
from lloco.serve.caches import ContextTier
from lloco.serve.engine_core import (
    EngineCore,
    EngineObserver,
    EngineRequest,
    QueryStats,
    Residency,
    Resolved,
    _TenantReads,
)
from lloco.serve.fairness import TenantService
from lloco.serve.text_stream import TextStream
from lloco.storage import keys
from safetensors.torch import save as save_safetensors

HANDBOOK = (
    "The capital of France is Paris. The river in the city is long and the old house is near the water. "
    "A good company has a great program and the people read the book every week."
)
REPORT = "The report says the north country has a large mountain and the south has a small river. " * 2
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(str(tiny_model_dir), tmp_path_factory.mktemp("models"), dtype=torch.float32)


@pytest.fixture(scope="module")
def compressor(base: LoadedModel) -> Compressor:
    return Compressor.from_base(base, segment_len=16, k=4, accumulate=True, seed=0)


def settings(
    max_batch: int = 4,
    gpu_slots: int = 2,
    max_waiting: int = 16,
    max_seq_len: int = 256,
    prefill_chunk_tokens: int | None = 2048,
) -> Settings:
    return Settings(
        engine=EngineSettings(
            max_batch_size=max_batch,
            max_seq_len=max_seq_len,
            context_cache_gpu_bytes=2**20,
            context_cache_cpu_bytes=2**20,
            prefill_chunk_tokens=prefill_chunk_tokens,
        ),
        lora=LoraSettings(max_rank=8, gpu_slots=gpu_slots, cpu_adapters=8),
        serve=ServeSettings(max_ongoing_requests=max_waiting),
    )


def random_adapter(config: LlamaConfig, seed: int, rank: int = 4) -> dict[str, bytes]:
    """PEFT-format files of a random adapter on q/k/v/o, strong enough to change greedy answers."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "q_proj": (config.dim, config.q_dim),
        "k_proj": (config.dim, config.kv_dim),
        "v_proj": (config.dim, config.kv_dim),
        "o_proj": (config.q_dim, config.dim),
    }
    tensors = {}
    for layer in range(config.n_layers):
        for target, (fan_in, fan_out) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) / math.sqrt(
                fan_in
            )
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(shapes),
        "base_model_name_or_path": "tiny-llama",
    }
    return {
        "adapter_config.json": json.dumps(peft_config).encode(),
        "adapter_model.safetensors": save_safetensors(tensors),
    }


@pytest.fixture
def tenants(store: object, base: LoadedModel) -> dict[str, Registry]:
    """Two tenants, each with a document (not yet compressed) and an adapter."""
    admin = Tenants(store)
    registries = {}
    for tenant, doc_id, text, adapter, seed in [
        ("acme", "handbook", HANDBOOK, "support", 1),
        ("globex", "report", REPORT, "sales", 2),
    ]:
        admin.create(tenant)
        registry = Registry(store, tenant)
        tokens = len(base.tokenizer(text, add_special_tokens=False)["input_ids"])
        registry.ingest_document(doc_id, text.encode(), max_bytes=10_000, tokens=tokens)
        registry.publish_adapter(adapter, random_adapter(base.config, seed), train={"seed": seed})
        registries[tenant] = registry
    return registries


class Recorder(EngineObserver):
    """Keeps what the engine reports, to check batching and per-tenant cache tiers."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.lookups: list[tuple[str, ContextTier]] = []
        self.adapter_loads: list[tuple[str, str]] = []
        self.services: list[tuple[str, TenantService]] = []
        self.done: list[tuple[str, str | None, int]] = []  # (tenant, adapter, generated tokens)
        self.residencies: list[Residency] = []

    def context_lookup(self, tenant: str, tier: ContextTier) -> None:
        self.lookups.append((tenant, tier))

    def adapter_loaded(self, tenant: str, tier: str) -> None:
        self.adapter_loads.append((tenant, tier))

    def scheduled(self, queue_depth: int, batch_size: int) -> None:
        self.batch_sizes.append(batch_size)

    def request_done(self, tenant: str, adapter: str | None, stats: QueryStats) -> None:
        self.done.append((tenant, adapter, stats.generated_tokens))

    def residency(self, residency: Residency) -> None:
        self.residencies.append(residency)

    def tenant_service(self, tenant: str, service: TenantService) -> None:
        self.services.append((tenant, service))


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


@asynccontextmanager
async def engine(
    store: object,
    base: LoadedModel,
    compressor: Compressor,
    config: Settings,
    observer: EngineObserver | None = None,
) -> AsyncIterator[EngineCore]:
    core = EngineCore(config, store, base, compressor, observer=observer)
    await core.start()
    try:
        yield core
    finally:
        await core.stop()


def request(
    tenant: str,
    docs: tuple[str, ...],
    adapter: str | None,
    max_new_tokens: int = 16,
    version: str | None = None,
    question: str = QUESTION,
    stop: tuple[str, ...] = (),
) -> EngineRequest:
    params = SamplingParams(max_new_tokens=max_new_tokens, stop=stop)
    return EngineRequest(f"{tenant}-q", tenant, docs, question, adapter, version, params)


async def collect(core: EngineCore, req: EngineRequest) -> tuple[list[int], str, QueryStats]:
    ids: list[int] = []
    text = ""
    final = None
    async for event in core.generate(req):
        assert final is None, "no event may follow the final one"
        ids.extend(event.token_ids)
        text += event.text
        final = event.final
    assert final is not None
    return ids, text, final


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.005)


def test_two_tenants_with_different_adapters_in_one_batch_match_each_run_alone(
    store: object, base: LoadedModel, compressor: Compressor, tenants: dict[str, Registry]
) -> None:
    requests = [
        request("acme", ("handbook",), "support"),
        request("globex", ("report",), "sales"),
        request("acme", ("handbook",), None),  # the same input on the base model
    ]

    async def scenario() -> None:
        recorder = Recorder()
        async with engine(store, base, compressor, settings(), recorder) as core:
            compressed = [
                *await core.compress("acme", ["handbook"]),
                *await core.compress("globex", ["report"]),
            ]
            alone = [await collect(core, req) for req in requests]
            assert max(recorder.batch_sizes) == 1
            # Hold the model thread until all three wait, so they are admitted and decoded in one batch.
            gate = threading.Event()
            hold = asyncio.create_task(core.scheduler.run_exclusive(gate.wait))
            together = [asyncio.create_task(collect(core, req)) for req in requests]
            await until(lambda: core.scheduler.waiting() == 3)
            gate.set()
            await hold
            batched = await asyncio.gather(*together)
            assert max(recorder.batch_sizes) == 3
            metrics = core.metrics()

        assert [ids for ids, _, _ in batched] == [ids for ids, _, _ in alone]
        assert [text for _, text, _ in batched] == [text for _, text, _ in alone]
        assert alone[0][0] != alone[2][0], "the adapter must change the greedy answer"
        assert alone[0][0] != alone[1][0]
        for (ids, text, stats), req, info in zip(
            alone, requests, [compressed[0], compressed[1], compressed[0]], strict=True
        ):
            doc = tenants[req.tenant].get_document(req.doc_ids[0])
            assert text == base.tokenizer.decode(ids, skip_special_tokens=True)
            assert stats.generated_tokens == len(ids) and 0 < len(ids) <= 16
            assert stats.finish_reason == ("length" if len(ids) == 16 else "stop")
            assert stats.adapter_version == ("v000001" if req.adapter else None)
            assert stats.context_tokens == info.n_vectors == math.ceil(doc.tokens / 16) * 4
            assert stats.document_tokens == doc.tokens
            assert stats.prompt_tokens == len(chat_prompt(base.tokenizer, QUESTION))
            assert 0 < stats.ttft_s <= stats.total_s
        # Contexts: read from S3 once per document, then served from the GPU tier.
        assert recorder.lookups[:3] == [("acme", "s3"), ("globex", "s3"), ("acme", "gpu")]
        assert metrics["context_cache_s3_loads"] == 2 and metrics["context_cache_gpu_hits"] == 4
        assert metrics["adapter_s3_loads"] == 2 and metrics["adapter_slot_loads"] == 2
        assert metrics["batch_size"] == 0 and metrics["queue_depth"] == 0

    run(scenario)


def test_compress_takes_the_document_the_edge_tokenized_without_reading_it(
    recording_store: object, base: LoadedModel, compressor: Compressor, tenants: dict[str, Registry]
) -> None:
    """Issue 19, tokenization once: `compress` hands the documents the edge prepared at ingest to
    `compress_online`, so the handbook's text is read once, by the retrieval index update (its segments'
    text; ``recording_store`` is the real store that also records the keys it reads), not also to be
    compressed, and its context is the compressor's output on the same ids."""
    ids, segments = tokenize_segments(base.tokenizer, HANDBOOK, compressor.segment_len)
    sha = hashlib.sha256(HANDBOOK.encode()).hexdigest()
    prepared = PreparedDocument("acme", "handbook", sha, ids, segments)

    async def scenario() -> None:
        async with engine(recording_store, base, compressor, settings()) as core:
            assert core.segment_len == compressor.segment_len
            (info,) = await core.compress("acme", ["handbook"], [prepared])
            assert info.source_sha == sha and info.segments == segments

    run(scenario)
    assert recording_store.reads.count(keys.doc_source("acme", "handbook")) == 1
    vectors, _ = tenants["acme"].get_context("handbook", compressor.compressor_id)
    assert torch.equal(vectors, compressor.compress([ids])[0].to(torch.bfloat16))


def test_new_adapter_version_is_picked_up_while_running_rows_finish_on_theirs(
    store: object, base: LoadedModel, compressor: Compressor, tenants: dict[str, Registry]
) -> None:
    acme = tenants["acme"]

    async def scenario() -> None:
        async with engine(store, base, compressor, settings(gpu_slots=2)) as core:
            await core.compress("acme", ["handbook"])
            v1_ids, _, _ = await collect(core, request("acme", ("handbook",), "support", max_new_tokens=24))
            long_stream = core.generate(request("acme", ("handbook",), "support", max_new_tokens=24))
            first = await anext(long_stream)  # running on v000001
            during = [
                asyncio.create_task(collect(core, request("acme", ("handbook",), "support")))
                for _ in range(4)
            ]
            published = await asyncio.to_thread(
                acme.publish_adapter, "support", random_adapter(base.config, seed=7), {"seed": 7}
            )
            assert published.version == "v000002"
            later_ids, _, later = await collect(
                core, request("acme", ("handbook",), "support", max_new_tokens=24)
            )
            pinned_ids, _, pinned = await collect(
                core, request("acme", ("handbook",), "support", max_new_tokens=24, version="v000001")
            )
            rest = [event async for event in long_stream]
            results = await asyncio.gather(*during)  # none fails

        long_ids = [*first.token_ids, *(i for event in rest for i in event.token_ids)]
        assert rest[-1].final.adapter_version == "v000001"
        assert long_ids == v1_ids, "a running row keeps its version's slot when a new version is published"
        assert later.adapter_version == "v000002" and later_ids != v1_ids
        assert pinned.adapter_version == "v000001" and pinned_ids == v1_ids
        assert {stats.adapter_version for _, _, stats in results} <= {"v000001", "v000002"}

    run(scenario)


def test_cancelled_stream_frees_its_row_for_the_next_request(
    store: object, base: LoadedModel, compressor: Compressor, tenants: dict[str, Registry]
) -> None:
    async def scenario() -> None:
        async with engine(store, base, compressor, settings(max_batch=1)) as core:
            await core.compress("acme", ["handbook"])
            stream = core.generate(request("acme", ("handbook",), "support", max_new_tokens=200))
            await anext(stream)
            assert core.metrics()["batch_size"] == 1
            waiting = asyncio.create_task(
                collect(core, request("acme", ("handbook",), None, max_new_tokens=8))
            )
            await until(lambda: core.scheduler.waiting() == 1)
            await stream.aclose()  # the consumer stops iterating
            _, _, stats = await waiting
            assert stats.generated_tokens > 0
            await until(lambda: core.metrics()["batch_size"] == 0)

            consumer = asyncio.create_task(
                collect(core, request("acme", ("handbook",), "support", max_new_tokens=200))
            )
            await until(lambda: core.metrics()["generated_tokens"] > stats.generated_tokens + 3)
            consumer.cancel()  # the consumer's task is cancelled
            with pytest.raises(asyncio.CancelledError):
                await consumer
            await until(lambda: core.metrics()["batch_size"] == 0)
            _, _, after = await collect(core, request("globex", (), "sales", max_new_tokens=4))
            metrics = core.metrics()

        assert after.generated_tokens > 0
        # Both 200-token rows stopped early: far fewer tokens were generated than they asked for.
        assert metrics["generated_tokens"] < 200
        assert metrics["batch_size"] == 0 and metrics["queue_depth"] == 0

    run(scenario)


def test_a_querys_stats_say_where_its_time_to_first_token_went(
    store: object, base: LoadedModel, compressor: Compressor, tenants: dict[str, Registry]
) -> None:
    async def scenario() -> None:
        async with engine(store, base, compressor, settings(max_batch=1)) as core:
            await core.compress("acme", ["handbook"])
            # one row: the second query waits in the queue for the whole of the first one
            first, second = await asyncio.gather(
                collect(core, request("acme", ("handbook",), "support", max_new_tokens=24)),
                collect(core, request("globex", (), "sales", max_new_tokens=4)),
            )
        for _, _, stats in (first, second):
            parts = (stats.prepare_s, stats.queue_s, stats.prefill_s)
            assert all(part >= 0 for part in parts) and stats.prefill_s > 0
            assert sum(parts) <= stats.ttft_s + 1e-6
        waited, ran = sorted((first[2], second[2]), key=lambda stats: stats.queue_s)[::-1]
        # both started together; the one that waited got its row only when the other's answer was done
        assert waited.prepare_s + waited.queue_s >= ran.total_s - 0.05
        assert ran.queue_s < waited.queue_s

    run(scenario)


def test_request_errors(
    store: object, base: LoadedModel, compressor: Compressor, tenants: dict[str, Registry]
) -> None:
    async def scenario() -> None:
        async with engine(store, base, compressor, settings(max_seq_len=64)) as core:
            with pytest.raises(NotFound, match="document 'nope' not found"):
                await collect(core, request("acme", ("nope",), None))
            with pytest.raises(
                FailedPrecondition, match="document 'handbook' is not compressed yet; run compress"
            ):
                await collect(core, request("acme", ("handbook",), None))
            await core.compress("acme", ["handbook"])
            with pytest.raises(NotFound, match="adapter 'missing' not found"):
                await collect(core, request("acme", ("handbook",), "missing"))
            with pytest.raises(NotFound, match="tenant 'initech' not found"):
                await collect(core, request("initech", (), None))
            with pytest.raises(InvalidArgument, match="the engine holds 64"):
                await collect(core, request("acme", ("handbook",), None, max_new_tokens=60))
            # A document from another tenant is simply not found.
            with pytest.raises(NotFound, match="document 'report' not found"):
                await collect(core, request("acme", ("report",), None))
            tenants["acme"].ingest_document(
                "handbook", b"New text: the old context is stale now.", max_bytes=1000
            )
            with pytest.raises(FailedPrecondition, match="not compressed yet"):
                await collect(core, request("acme", ("handbook",), None))
            _, _, stats = await collect(core, request("acme", (), None, max_new_tokens=4))
            assert stats.context_tokens == 0 and stats.document_tokens == 0
            assert core.metrics()["batch_size"] == 0

    run(scenario)


def test_full_waiting_queue_is_resource_exhausted(
    store: object, base: LoadedModel, compressor: Compressor, tenants: dict[str, Registry]
) -> None:
    async def scenario() -> None:
        async with engine(store, base, compressor, settings(max_batch=1, max_waiting=1)) as core:
            running = core.generate(request("acme", (), None, max_new_tokens=200))
            await anext(running)
            queued = asyncio.create_task(collect(core, request("acme", (), None, max_new_tokens=2)))
            await until(lambda: core.scheduler.waiting() == 1)
            with pytest.raises(ResourceExhausted, match="retry later"):
                await collect(core, request("globex", (), None))
            await running.aclose()
            await queued

    run(scenario)


def test_one_slot_serves_two_adapters_in_turn_without_evicting_a_running_one(
    store: object, base: LoadedModel, compressor: Compressor, tenants: dict[str, Registry]
) -> None:
    support, sales = request("acme", ("handbook",), "support"), request("globex", ("report",), "sales")

    async def scenario() -> None:
        recorder = Recorder()
        async with engine(store, base, compressor, settings(gpu_slots=1), recorder) as core:
            await core.compress("acme", ["handbook"])
            await core.compress("globex", ["report"])
            assert await core.load_adapter("acme", "support", None) == "v000001"
            assert recorder.adapter_loads == [("acme", "cpu"), ("acme", "gpu")]
            alone = {req.tenant: await collect(core, req) for req in [support, sales]}
            assert core.metrics()["adapter_slot_loads"] == 2  # the preloaded support needed no second load
            await core.load_adapter("acme", "support", None)  # the slot holds support again
            recorder.batch_sizes.clear()

            # Queue support, sales, support in this order while the model thread is held.
            finished: list[str] = []

            async def tagged(tag: str, req: EngineRequest) -> tuple[list[int], str, QueryStats]:
                result = await collect(core, req)
                finished.append(tag)
                return result

            gate = threading.Event()
            hold = asyncio.create_task(core.scheduler.run_exclusive(gate.wait))
            tasks = []
            for tag, req in [("support-1", support), ("sales", sales), ("support-2", support)]:
                tasks.append(asyncio.create_task(tagged(tag, req)))
                await until(lambda: core.scheduler.waiting() == len(tasks))
            gate.set()
            await hold
            results = await asyncio.gather(*tasks)
            metrics = core.metrics()

        assert [ids for ids, _, _ in results] == [alone[r.tenant][0] for r in [support, sales, support]]
        # Four free rows but one slot: sales waited for support-1's row to end, and support-2 (whose adapter
        # was resident) waited behind sales instead of keeping the slot pinned.
        assert finished == ["support-1", "sales", "support-2"]
        assert max(recorder.batch_sizes) == 1
        assert metrics["adapter_slot_loads"] == 5 and metrics["adapter_slot_evictions"] == 4
        # Per-adapter metrics see each query's adapter; residency as the replica went idle: one slot held,
        # both adapters parsed in host memory, every slot eviction counted.
        assert [(t, a) for t, a, _ in recorder.done[-3:]] == [
            ("acme", "support"),
            ("globex", "sales"),
            ("acme", "support"),
        ]
        assert all(tokens > 0 for _, _, tokens in recorder.done)
        last = recorder.residencies[-1]
        assert (last.adapters_gpu, last.adapters_cpu, last.adapter_evictions_gpu) == (1, 2, 4)
        assert last.context_bytes_gpu > 0

    run(scenario)


def test_stop_strings_cut_the_stream(
    store: object, base: LoadedModel, compressor: Compressor, tenants: dict[str, Registry]
) -> None:
    async def scenario() -> None:
        async with engine(store, base, compressor, settings()) as core:
            await core.compress("acme", ["handbook"])
            _, full, _ = await collect(core, request("acme", ("handbook",), "support", max_new_tokens=24))
            stop = full[len(full) // 2 : len(full) // 2 + 3]
            ids, text, stats = await collect(
                core, request("acme", ("handbook",), "support", max_new_tokens=24, stop=(stop,))
            )
        assert len(stop) == 3 and text == full[: full.find(stop)]
        assert stats.finish_reason == "stop" and len(ids) < 24

    run(scenario)


def test_text_stream_never_splits_a_character(base: LoadedModel) -> None:
    text = "Paris é 🙂 你好, the capital!"
    ids = base.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split()), "multi-byte characters span several byte-level tokens"
    stream = TextStream(base.tokenizer)
    deltas = [stream.push(token) for token in ids]
    deltas.append(stream.finish())
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)

    stream = TextStream(base.tokenizer, stop=("capital",))
    deltas = [stream.push(token) for token in ids]
    deltas.append(stream.finish())
    assert "".join(deltas) == text[: text.find("capital")]


def test_stopping_the_engine_ends_running_streams_as_cancelled(
    store: object, base: LoadedModel, compressor: Compressor, tenants: dict[str, Registry]
) -> None:
    async def scenario() -> None:
        core = EngineCore(settings(), store, base, compressor)
        await core.start()
        stream = core.generate(request("acme", (), "support", max_new_tokens=200))
        await anext(stream)
        await core.stop()
        rest = [event async for event in stream]
        assert rest[-1].final is not None and rest[-1].final.finish_reason == "cancelled"
        assert rest[-1].final.generated_tokens < 200
        assert not core.healthy and core.generator.active() == 0

    run(scenario)


def test_a_query_with_documents_and_no_adapter_decodes_with_the_compressors_reader(
    store: object, base: LoadedModel, compressor: Compressor, tenants: dict[str, Registry]
) -> None:
    reader = random_adapter(base.config, seed=7)
    with_reader = Compressor(
        base, compressor.summary_embeds, 16, True, output_scale=compressor.output_scale, reader_files=reader
    )
    registry = tenants["acme"]
    registry.publish_adapter("copy-of-reader", reader, train={})

    async def scenario() -> None:
        async with engine(store, base, with_reader, settings()) as core:
            await core.compress("acme", ["handbook"])
            plain, _, plain_stats = await collect(core, request("acme", ("handbook",), None))
            copy, _, _ = await collect(core, request("acme", ("handbook",), "copy-of-reader"))
            no_docs, _, _ = await collect(core, request("acme", (), None))
        async with engine(store, base, compressor, settings()) as core:
            await core.compress("acme", ["handbook"])
            without_reader, _, _ = await collect(core, request("acme", ("handbook",), None))
            base_no_docs, _, _ = await collect(core, request("acme", (), None))
        assert plain == copy  # the reader in a slot, exactly as the same weights published as an adapter
        assert plain != without_reader
        assert plain_stats.adapter_version is None  # no tenant adapter was used
        assert no_docs == base_no_docs  # without documents there is nothing to read: the base model

    run(scenario)


def test_a_key_value_compressor_serves_its_contexts_into_the_rows_cache(
    store: object, base: LoadedModel, tenants: dict[str, Registry]
) -> None:
    """A salient-sentence compressor (key/value summaries) on the serving path: compressed online, stored,
    and read into the row's KV cache, with a tenant adapter and without. The engine answers exactly what
    a generator given the stored summaries answers; a retrieved segment list takes each segment's own rows,
    the last segment's shorter than k (segment_rows)."""
    salient = Compressor.salient(base, segment_len=16, k=10)
    registry = tenants["acme"]
    n_tokens = registry.get_document("handbook").tokens
    assert 0 < n_tokens % 16 < 10  # the last segment keeps all of its few tokens

    async def scenario() -> None:
        async with engine(store, base, salient, settings()) as core:
            (info,) = await core.compress("acme", ["handbook"])
            assert (
                info.n_vectors == salient.summary_positions(n_tokens) == (n_tokens // 16) * 10 + n_tokens % 16
            )
            tuned, _, stats = await collect(core, request("acme", ("handbook",), "support", 12))
            plain, _, _ = await collect(core, request("acme", ("handbook",), None, 12))
            no_docs, _, _ = await collect(core, request("acme", (), None, 12))
            whole = dataclasses.replace(request("acme", ("handbook",), None, 12), segments=(info.segments,))
            by_segments, _, _ = await collect(core, whole)
            last = dataclasses.replace(whole, segments=(info.segments[-1:],))
            _, _, last_stats = await collect(core, last)
        assert stats.context_tokens == info.n_vectors and last_stats.context_tokens == n_tokens % 16
        assert by_segments == plain and plain != no_docs and tuned != plain

        context, _ = registry.get_context("handbook", salient.compressor_id)
        slots = LoraSlots(base.config, 1, 8, ("q_proj", "k_proj", "v_proj", "o_proj"), "cpu", torch.float32)
        slots.load(0, registry.read_adapter_files("support", "v000001"))
        reference = Generator(base.model, slots, 1, 256, "cpu", torch.float32, base.tokenizer)
        prompt = chat_prompt(base.tokenizer, QUESTION)
        params = SamplingParams(max_new_tokens=12)
        for slot, answer in ((0, tuned), (-1, plain)):
            (text,) = generate(
                reference, [GenerationRequest(prompt, slot=slot, params=params, prefix_kv=context)]
            )
            assert text == base.tokenizer.decode(answer, skip_special_tokens=True)

    run(scenario)


def test_an_adapter_trained_with_evidence_reads_the_questions_sentences_after_the_context(
    store: object, base: LoadedModel, tenants: dict[str, Registry]
) -> None:
    """An adapter whose train record holds a context ratio is served as it was trained: the documents'
    summaries, then the question's evidence (in what the summaries leave of the documents' tokens / ratio),
    then the prompt; the same weights without the record read no evidence. The engine answers what a
    generator given the same input does."""
    salient = Compressor.salient(base, segment_len=16, k=10)
    registry = tenants["acme"]
    files = registry.read_adapter_files("support", "v000001")
    registry.publish_adapter("support-evidence", files, train={"context_ratio": 1})
    n_tokens = registry.get_document("handbook").tokens
    budget = evidence_budget(n_tokens, salient.summary_positions(n_tokens), 1)
    evidence = Evidence([HANDBOOK], base.tokenizer).ids(QUESTION, budget)
    assert base.tokenizer.decode(evidence) == "The capital of France is Paris."

    async def scenario() -> None:
        async with engine(store, base, salient, settings()) as core:
            (info,) = await core.compress("acme", ["handbook"])
            asked = request("acme", ("handbook",), "support-evidence", 12)
            answer, _, stats = await collect(core, asked)
            _, _, without = await collect(core, request("acme", ("handbook",), "support", 12))
            every_segment = dataclasses.replace(asked, segments=(info.segments,))
            by_segments, _, segment_stats = await collect(
                core, every_segment
            )  # their text, boundaries joined
            first_segment = dataclasses.replace(asked, segments=(info.segments[:1],))
            _, _, first_stats = await collect(core, first_segment)
            # evidence takes only the room the engine has left: a long answer leaves it none, and fails nothing
            room = 256 - info.n_vectors - without.prompt_tokens - len(evidence)  # max_seq_len 256
            _, _, crowded = await collect(
                core, dataclasses.replace(asked, params=SamplingParams(max_new_tokens=room + 1))
            )
            assert crowded.context_tokens == info.n_vectors  # the one evidence sentence no longer fits
            # a version whose text is no longer stored (new text came after the query was resolved)
            gone = dataclasses.replace(registry.get_document("handbook"), sha256="0" * 64)
            reads = _TenantReads("acme", registry.uid, lambda: registry)
            with pytest.raises(FailedPrecondition, match="changed while the query was read"):
                core._text_of(reads, gone)
        assert by_segments == answer and segment_stats == dataclasses.replace(
            stats, ttft_s=segment_stats.ttft_s, total_s=segment_stats.total_s, prepare_s=segment_stats.prepare_s,
            queue_s=segment_stats.queue_s, prefill_s=segment_stats.prefill_s,
        )  # fmt: skip
        assert first_stats.context_tokens == 10  # k: its budget, 16 tokens - 10, holds no sentence
        assert stats.context_tokens == info.n_vectors + len(evidence)
        assert without.context_tokens == info.n_vectors and stats.prompt_tokens == without.prompt_tokens

        context, _ = registry.get_context("handbook", salient.compressor_id)
        slots = LoraSlots(base.config, 1, 8, ("q_proj", "k_proj", "v_proj", "o_proj"), "cpu", torch.float32)
        slots.load(0, files)
        reference = Generator(base.model, slots, 1, 256, "cpu", torch.float32, base.tokenizer)
        prompt = evidence + chat_prompt(base.tokenizer, QUESTION)
        params = SamplingParams(max_new_tokens=12)
        (text,) = generate(reference, [GenerationRequest(prompt, slot=0, params=params, prefix_kv=context)])
        assert text == base.tokenizer.decode(answer, skip_special_tokens=True)

    run(scenario)


def test_a_flooding_tenant_does_not_keep_other_tenants_waiting(
    store: object, base: LoadedModel, compressor: Compressor, tenants: dict[str, Registry]
) -> None:
    """One row; acme queues ten queries, then globex one: globex runs second (first come, first served
    would run it eleventh), and the per-tenant service the observer got adds up."""

    async def scenario() -> None:
        recorder = Recorder()
        async with engine(store, base, compressor, settings(max_batch=1), recorder) as core:
            gate = threading.Event()
            hold = asyncio.create_task(core.scheduler.run_exclusive(gate.wait))
            finished: list[str] = []
            results: dict[str, QueryStats] = {}

            async def tagged(tag: str, req: EngineRequest) -> None:
                results[tag] = (await collect(core, req))[2]
                finished.append(tag)

            tasks = [
                asyncio.create_task(tagged(f"acme-{i}", request("acme", (), None, max_new_tokens=3)))
                for i in range(10)
            ]
            await until(lambda: core.scheduler.waiting() == 10)
            tasks.append(asyncio.create_task(tagged("globex", request("globex", (), None, max_new_tokens=3))))
            await until(lambda: core.scheduler.waiting() == 11)
            assert core.metrics()["tenants_waiting"] == 2
            gate.set()
            await hold
            await asyncio.gather(*tasks)
            final = {tenant: core.scheduler.service(tenant) for tenant in ("acme", "globex")}

        assert finished.index("globex") == 1, finished
        assert max(s.waiting for t, s in recorder.services if t == "acme") == 10
        for tenant, service in final.items():
            mine = [stats for tag, stats in results.items() if tag.startswith(tenant)]
            assert service.waiting == 0 and service.running == 0
            assert service.input_tokens == sum(stats.prompt_tokens for stats in mine)
            # EOS ends a query without an emitted token; each generated one was charged
            assert service.output_tokens >= sum(stats.generated_tokens for stats in mine)
            assert service.virtual_tokens == service.input_tokens + 2 * service.output_tokens
            assert [s for t, s in recorder.services if t == tenant][-1] == service  # reported when idle

    run(scenario)


def test_chunked_prefill_answers_what_whole_prefill_does(
    store: object, base: LoadedModel, compressor: Compressor, tenants: dict[str, Registry]
) -> None:
    """Contexts + prompts prefilled 5 positions per step, queries joining while others decode."""
    requests = [
        request("acme", ("handbook",), "support", max_new_tokens=12),
        request("globex", ("report",), "sales", max_new_tokens=12),
        request("acme", ("handbook",), None, max_new_tokens=12),
    ]

    async def answers(chunk: int | None) -> list[list[int]]:
        async with engine(store, base, compressor, settings(prefill_chunk_tokens=chunk)) as core:
            await core.compress("acme", ["handbook"])
            await core.compress("globex", ["report"])
            assert core.generator.prefill_chunk_tokens == chunk
            tasks = []
            for req in requests:
                tasks.append(asyncio.create_task(collect(core, req)))
                await asyncio.sleep(0.01)
            return [ids for ids, _, _ in await asyncio.gather(*tasks)]

    async def scenario() -> None:
        assert await answers(5) == await answers(None)

    run(scenario)


def test_a_context_queried_again_with_the_same_adapter_version_is_not_prefilled_again(
    store: object, base: LoadedModel, compressor: Compressor, tenants: dict[str, Registry]
) -> None:
    """The prefix cache is keyed by tenant, document text, compressor and adapter version: the second query
    of acme's handbook with its adapter hits and answers what the first did (the first another question
    later, too); the base model, another tenant, a new adapter version and a changed document each miss, and
    every answer equals the one of an engine without the cache."""
    registry = tenants["acme"]
    asks = [
        request("acme", ("handbook",), "support"),
        request("acme", ("handbook",), "support"),  # hit
        request("acme", ("handbook",), "support", question="Where is the old house?"),  # hit
        request("acme", ("handbook",), None),  # miss: no adapter
        request("globex", ("report",), "sales"),  # miss: another tenant's context
    ]

    def config(prefix_cache_bytes: int) -> Settings:
        plain = settings()
        return plain.model_copy(
            update={"engine": plain.engine.model_copy(update={"prefix_cache_bytes": prefix_cache_bytes})}
        )

    async def scenario() -> None:
        async with (
            engine(store, base, compressor, config(2**20)) as core,
            engine(store, base, compressor, config(0)) as plain,
        ):
            await core.compress("acme", ["handbook"])
            await core.compress("globex", ["report"])

            async def both(req: EngineRequest) -> list[int]:
                ids = (await collect(core, req))[0]
                assert ids == (await collect(plain, req))[0], req
                return ids

            answers = [await both(req) for req in asks]
            registry.publish_adapter("support", random_adapter(base.config, 9), train={"seed": 9})
            answers.append(await both(asks[0]))  # miss: the new version's keys and values differ
            changed = HANDBOOK + " It rains."
            tokens = len(base.tokenizer(changed, add_special_tokens=False)["input_ids"])
            registry.ingest_document("handbook", changed.encode(), max_bytes=10_000, tokens=tokens)
            await core.compress("acme", ["handbook"])
            answers.append(await both(asks[0]))  # miss: another text, another context
            metrics = core.metrics()
            assert (metrics["prefix_cache_hits"], metrics["prefix_cache_misses"]) == (2, 5)
            assert 0 < metrics["prefix_cache_bytes"] <= 2**20 and plain.metrics()["prefix_cache_bytes"] == 0
            assert answers[1] == answers[0] and answers[5] != answers[0]
            await core.forget_tenant("acme")  # a deleted tenant's entries go at once; globex's stays
            assert 0 < core.metrics()["prefix_cache_bytes"] < metrics["prefix_cache_bytes"]
            await core.forget_tenant("globex")
            assert core.metrics()["prefix_cache_bytes"] == 0

    run(scenario)


def s3_requests(s3: object, bucket: str) -> int:
    """Requests for ``bucket`` the server has answered so far (its own Prometheus counter), whoever sent them."""
    import urllib.request

    with urllib.request.urlopen(s3.metrics_url, timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    label = f'bucket="{bucket}"'
    counted = [line for line in lines if line.startswith("SeaweedFS_s3_request_total{") and label in line]
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in counted))


def test_a_resolved_request_reads_nothing_once_its_context_and_adapter_are_held(
    s3: object, store: object, base: LoadedModel, compressor: Compressor, tenants: dict[str, Registry]
) -> None:
    """What the edge does for the engine: the registry's answers and the prompt ids come with the request,
    so a repeated request reads nothing from the store, and the engine decodes the prompt it was given
    (tokenized once, by the caller) rather than tokenizing the question again."""
    registry = tenants["acme"]
    other_question = "Where is the old house?"

    async def scenario() -> None:
        async with engine(store, base, compressor, settings()) as core:
            await core.compress("acme", ["handbook"])
            resolved = Resolved.read(registry, ("handbook",), "support", None)
            given = dataclasses.replace(
                request("acme", ("handbook",), "support"),
                resolved=resolved,
                prompt_ids=tuple(chat_prompt(base.tokenizer, other_question)),
            )
            await collect(core, given)  # misses: the context and the adapter's files are read once
            before = s3_requests(s3, store.settings.bucket)
            ids, _, stats = await collect(core, given)
            assert s3_requests(s3, store.settings.bucket) == before, (
                "a request resolved by its caller and fully cached read the store"
            )
            unresolved = await collect(core, request("acme", ("handbook",), "support"))
            assert s3_requests(s3, store.settings.bucket) > before, "the engine alone resolves from the store"
            asked, _, _ = await collect(
                core, request("acme", ("handbook",), "support", question=other_question)
            )
        assert ids == asked and stats.prompt_tokens == len(chat_prompt(base.tokenizer, other_question))
        assert unresolved[0] != ids, "the two questions must answer differently, or this proves nothing"

    run(scenario)


def test_stop_strings_are_found_in_the_new_text_only(base: LoadedModel) -> None:
    """Each token decodes a window of a few ids (not the whole answer) and the stop search starts at most
    len(longest stop) - 1 characters before the new text."""
    text = "The river is long. " * 40 + "The end is near."
    ids = base.tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded: list[int] = []
    tokenizer = base.tokenizer

    class Counting:
        def decode(self, window: list[int], **options: object) -> str:
            decoded.append(len(window))
            return tokenizer.decode(window, **options)

    stream = TextStream(Counting(), stop=("end is",))
    out = ""
    for token in ids:
        out += stream.push(token)
        if stream.stopped:
            break
    out += stream.finish()
    assert out == text[: text.find("end is")] and stream.stopped
    assert max(decoded) <= 4, f"decoded windows of up to {max(decoded)} ids"


def test_adapter_labels_are_bounded_per_replica() -> None:
    from lloco.serve.engine import NO_ADAPTER, OTHER_ADAPTERS, AdapterLabels

    labels = AdapterLabels(limit=2)
    assert labels.tags("acme", "support") == {"tenant": "acme", "adapter": "support"}
    assert labels.tags("acme", None) == {"tenant": "acme", "adapter": NO_ADAPTER}
    # Past the limit a new pair folds into one series; pairs seen before keep theirs.
    assert labels.tags("globex", "sales") == {"tenant": "globex", "adapter": OTHER_ADAPTERS}
    assert labels.tags("acme", "support") == {"tenant": "acme", "adapter": "support"}


def test_a_paced_stream_sends_its_first_token_alone_and_joins_later_ones(
    store: object, base: LoadedModel, compressor: Compressor, tenants: dict[str, Registry]
) -> None:
    """The Serve deployment paces its streams (`StreamPacer`): the same tokens and text, the first token as
    soon as it exists, later tokens gathered into fewer events; closing the stream early closes the engine's."""
    from lloco.serve.engine import StreamPacer

    async def scenario() -> None:
        async with engine(store, base, compressor, settings()) as core:
            await core.compress("acme", ["handbook"])
            req = request("acme", ("handbook",), "support", max_new_tokens=24)
            ids, text, _ = await collect(core, req)
            assert len(ids) >= 8, "the tiny model should not stop this early"
            pacer = StreamPacer(messages_per_s=20.0)  # one open stream: 50 ms after each event
            events = [event async for event in pacer.paced(core.generate(req))]
            assert [i for e in events for i in e.token_ids] == ids
            assert "".join(e.text for e in events) == text
            assert len(events[0].token_ids) == 1 and len(events) < len(ids) and events[-1].final is not None
            assert pacer.open == 0

            stream = pacer.paced(core.generate(req))
            await anext(stream)
            assert pacer.open == 1
            await stream.aclose()
            assert pacer.open == 0
            for _ in range(100):  # the engine frees the row at its next step
                if core.scheduler.active() == 0:
                    break
                await asyncio.sleep(0.01)
            assert core.scheduler.active() == 0

    run(scenario)
