"""The engine as a Ray Serve deployment: a thin shell over `EngineCore` that adds adapter-aware routing
(`@serve.multiplexed` keyed by "{tenant}/{adapter}", so requests prefer replicas already holding the
adapter), health checks and Prometheus metrics through Ray: per tenant, per adapter, and what each replica holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

import torch
from ray import serve
from ray.serve import metrics
from ray.serve.deployment import Application

from lloco.compress import PreparedDocument
from lloco.config import Settings
from lloco.errors import Unavailable
from lloco.logs import get_logger
from lloco.model import LoraFit, load_compressor, load_model
from lloco.registry import ContextInfo
from lloco.serve import DRAIN_POLL_S
from lloco.serve.caches import ContextTier
from lloco.serve.engine_core import (
    EngineCore,
    EngineEvent,
    EngineObserver,
    EngineRequest,
    QueryStats,
    Residency,
)
from lloco.serve.fairness import TenantService
from lloco.storage import ObjectStore

log = get_logger(__name__)

_LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
_RATE_BOUNDARIES = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000]
ADAPTER_SERIES_LIMIT = 512  # (tenant, adapter) label pairs one replica exports before folding into OTHER
NO_ADAPTER = "none"  # the adapter label of a query that asked for no adapter of its own
OTHER_ADAPTERS = "_other"  # the adapter label of every pair past ADAPTER_SERIES_LIMIT


class AdapterLabels:
    """Bounded label values for per-adapter series: the first `limit` (tenant, adapter) pairs a replica
    sees keep their adapter name; later ones share `OTHER_ADAPTERS`, so a tenant minting adapter names
    cannot grow Prometheus' series without bound. Versions are never labels (each publish would add one).
    """

    def __init__(self, limit: int = ADAPTER_SERIES_LIMIT) -> None:
        self._limit = limit
        self._known: set[tuple[str, str]] = set()

    def tags(self, tenant: str, adapter: str | None) -> dict[str, str]:
        pair = (tenant, adapter or NO_ADAPTER)
        if pair not in self._known:
            if len(self._known) >= self._limit:
                return {"tenant": tenant, "adapter": OTHER_ADAPTERS}
            self._known.add(pair)
        return {"tenant": pair[0], "adapter": pair[1]}


def engine_device(settings: Settings) -> tuple[torch.device, torch.dtype]:
    """GPU in bf16 when there is one, else CPU in fp32; `model.dtype` overrides the dtype."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if settings.model.dtype != "auto":
        return device, getattr(torch, settings.model.dtype)
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def build_engine_core(settings: Settings, observer: EngineObserver | None = None) -> EngineCore:
    """Store, base model and compressor from settings, wired into an (unstarted) EngineCore."""
    store = ObjectStore(settings.store)
    device, dtype = engine_device(settings)
    model = load_model(
        settings.model.base_model, settings.model.cache_dir, store=store, dtype=dtype, device=device
    )
    compressor = load_compressor(settings.model.compressor, model)
    log.info("engine model loaded", model=model.model_id, device=str(device), dtype=str(dtype))
    return EngineCore(settings, store, model, compressor, observer=observer)


class PrometheusObserver(EngineObserver):
    """Exports the engine's events as Ray metrics (scraped by Prometheus), tagged per tenant."""

    def __init__(self) -> None:
        self.ttft = metrics.Histogram(
            "lloco_engine_ttft_seconds", "Time to first token.", _LATENCY_BOUNDARIES, tag_keys=("tenant",)
        )
        self.latency = metrics.Histogram(
            "lloco_engine_query_seconds", "Query time, end to end.", _LATENCY_BOUNDARIES, tag_keys=("tenant",)
        )
        self.ttft_parts = metrics.Histogram(  # no tenant label: where a slow first token comes from, per replica
            "lloco_engine_ttft_part_seconds",
            "Parts of the time to first token: prepare (lookups, context onto the device), queue (waiting "
            "for a generator row), prefill (from the row to the first token).",
            _LATENCY_BOUNDARIES,
            tag_keys=("part",),
        )
        self.decode_rate = metrics.Histogram(
            "lloco_engine_tokens_per_second",
            "Decode rate of each query.",
            _RATE_BOUNDARIES,
            tag_keys=("tenant",),
        )
        self.tokens = metrics.Counter(
            "lloco_engine_generated_tokens", "Tokens generated (rate() gives tokens/s).", tag_keys=("tenant",)
        )
        self.queries = metrics.Counter(
            "lloco_engine_queries", "Finished queries by finish reason.", tag_keys=("tenant", "finish_reason")
        )
        self.context_hits = metrics.Counter(
            "lloco_engine_context_cache_hits",
            "Contexts served per tier (gpu, cpu; s3 = missed both tiers).",
            tag_keys=("tenant", "tier"),
        )
        self.adapter_loads = metrics.Counter(
            "lloco_engine_adapter_loads",
            "Adapter loads: S3 -> CPU tier (cpu), CPU -> slot (gpu).",
            tag_keys=("tenant", "tier"),
        )
        self.queue_depth = metrics.Gauge("lloco_engine_queue_depth", "Queries waiting for a row.")
        self.batch_size = metrics.Gauge("lloco_engine_batch_size", "Rows in the running batch.")
        self.tenant_waiting = metrics.Gauge(
            "lloco_engine_tenant_queue_depth", "A tenant's queries waiting for a row.", tag_keys=("tenant",)
        )
        self.tenant_running = metrics.Gauge(
            "lloco_engine_tenant_running", "A tenant's queries holding a row.", tag_keys=("tenant",)
        )
        self.tenant_counter = metrics.Gauge(
            "lloco_engine_tenant_virtual_tokens",
            "A tenant's fair-admission counter: weighted tokens served, after lifts.",
            tag_keys=("tenant",),
        )
        self.tenant_tokens = metrics.Counter(
            "lloco_engine_tenant_tokens_served",
            "Tokens served to a tenant: input positions admitted (kind input), tokens generated (output).",
            tag_keys=("tenant", "kind"),
        )
        self.tenant_preemptions = metrics.Counter(
            "lloco_engine_tenant_preemptions",
            "A tenant's queries taken out of their row for another tenant below its share "
            "(engine.fair_preemption); each recomputes its input and tokens so far when admitted again.",
            tag_keys=("tenant",),
        )
        self.adapter_queries = metrics.Counter(
            "lloco_engine_adapter_queries",
            "Finished queries per adapter (adapter none: no adapter of the tenant's; _other: past the "
            "replica's label limit).",
            tag_keys=("tenant", "adapter"),
        )
        self.adapter_tokens = metrics.Counter(
            "lloco_engine_adapter_generated_tokens",
            "Tokens generated per adapter (labels as lloco_engine_adapter_queries).",
            tag_keys=("tenant", "adapter"),
        )
        self.adapters_resident = metrics.Gauge(
            "lloco_engine_adapters_resident",
            "Adapters a replica holds: in LoRA slots (tier gpu), parsed in host memory (tier cpu).",
            tag_keys=("tier",),
        )
        self.adapter_evictions = metrics.Counter(
            "lloco_engine_adapter_evictions",
            "Adapters evicted from a LoRA slot (tier gpu) or from host memory (tier cpu).",
            tag_keys=("tier",),
        )
        self.context_bytes = metrics.Gauge(
            "lloco_engine_context_cache_bytes",
            "Bytes of compressed contexts held per tier.",
            tag_keys=("tier",),
        )
        self.context_evictions = metrics.Counter(
            "lloco_engine_context_cache_evictions", "Contexts evicted per tier.", tag_keys=("tier",)
        )
        self._served: dict[str, TenantService] = {}
        self._adapter_labels = AdapterLabels()
        self._residency: Residency | None = None

    def context_lookup(self, tenant: str, tier: ContextTier) -> None:
        self.context_hits.inc(tags={"tenant": tenant, "tier": tier})

    def adapter_loaded(self, tenant: str, tier: str) -> None:
        self.adapter_loads.inc(tags={"tenant": tenant, "tier": tier})

    def request_done(self, tenant: str, adapter: str | None, stats: QueryStats) -> None:
        tags = {"tenant": tenant}
        self.ttft.observe(stats.ttft_s, tags=tags)
        for part, seconds in (
            ("prepare", stats.prepare_s),
            ("queue", stats.queue_s),
            ("prefill", stats.prefill_s),
        ):
            self.ttft_parts.observe(seconds, tags={"part": part})
        self.latency.observe(stats.total_s, tags=tags)
        if stats.generated_tokens > 1 and stats.total_s > stats.ttft_s:
            self.decode_rate.observe((stats.generated_tokens - 1) / (stats.total_s - stats.ttft_s), tags=tags)
        self.tokens.inc(stats.generated_tokens, tags=tags)
        self.queries.inc(tags={"tenant": tenant, "finish_reason": stats.finish_reason})
        adapter_tags = self._adapter_labels.tags(tenant, adapter)
        self.adapter_queries.inc(tags=adapter_tags)
        self.adapter_tokens.inc(stats.generated_tokens, tags=adapter_tags)

    def residency(self, residency: Residency) -> None:
        before = self._residency
        for tier in ("gpu", "cpu"):
            tags = {"tier": tier}
            self.adapters_resident.set(getattr(residency, f"adapters_{tier}"), tags=tags)
            self.context_bytes.set(getattr(residency, f"context_bytes_{tier}"), tags=tags)
            for counter, field in (
                (self.adapter_evictions, f"adapter_evictions_{tier}"),
                (self.context_evictions, f"context_evictions_{tier}"),
            ):
                evicted = getattr(residency, field) - (getattr(before, field) if before else 0)
                if evicted > 0:
                    counter.inc(evicted, tags=tags)
        self._residency = residency

    def scheduled(self, queue_depth: int, batch_size: int) -> None:
        self.queue_depth.set(queue_depth)
        self.batch_size.set(batch_size)

    def tenant_service(self, tenant: str, service: TenantService) -> None:
        tags = {"tenant": tenant}
        self.tenant_waiting.set(service.waiting, tags=tags)
        self.tenant_running.set(service.running, tags=tags)
        self.tenant_counter.set(service.virtual_tokens, tags=tags)
        before = self._served.get(tenant, TenantService())
        for counter, kind, now, then in (
            (self.tenant_tokens, "input", service.input_tokens, before.input_tokens),
            (self.tenant_tokens, "output", service.output_tokens, before.output_tokens),
            (self.tenant_preemptions, None, service.preemptions, before.preemptions),
        ):
            served = now - then if now >= then else now  # a forgotten tenant's service restarts at 0
            if served:
                counter.inc(served, tags={"tenant": tenant} | ({"kind": kind} if kind else {}))
        self._served[tenant] = service


class StreamPacer:
    """Spaces the events of a replica's streams so that together they send about ``messages_per_s``.

    Each event streamed through a Serve handle is a Ray object that the replica puts and the caller fetches,
    a cost per item in both processes (in the engine's, on the thread that also runs the scheduler's host
    work). A decode step makes a token for every running row, so one item per token is thousands of items
    a second at a large batch. After a stream sends an event it waits ``open streams / messages_per_s``
    before taking the next: the tokens made meanwhile leave as one event (`EngineCore.generate` joins those
    ready together). The first event is sent as soon as it exists, and one stream alone waits a
    millisecond, less than a decode step.
    """

    def __init__(self, messages_per_s: float) -> None:
        self._messages_per_s = messages_per_s
        self.open = 0

    def pause_s(self) -> float:
        return self.open / self._messages_per_s

    async def paced(self, events: AsyncIterator[EngineEvent]) -> AsyncIterator[EngineEvent]:
        """``events`` with a pause after each one but the last; closing this closes ``events``."""
        self.open += 1
        try:
            async with aclosing(events):  # type: ignore[type-var]
                async for event in events:
                    yield event
                    if event.final is None:
                        await asyncio.sleep(self.pause_s())
        finally:
            self.open -= 1


@serve.deployment(graceful_shutdown_wait_loop_s=DRAIN_POLL_S)
class EngineDeployment:
    """One base model per replica serving every tenant; see `EngineCore`."""

    async def __init__(self, settings: Settings) -> None:
        self._core = await asyncio.to_thread(build_engine_core, settings, PrometheusObserver())
        self._pacer = StreamPacer(settings.serve.stream_messages_per_s)
        await self._core.start()

        async def load_adapter(model_id: str) -> str:
            tenant, name = model_id.split("/", 1)
            return await self._core.load_adapter(tenant, name, None)

        # Wired here because the model count comes from settings; Serve then reports which adapters this
        # replica holds, and routes requests with the same multiplexed id ("tenant/adapter") to it.
        self.hold_adapter = serve.multiplexed(max_num_models_per_replica=settings.lora.gpu_slots)(
            load_adapter
        )

    async def generate(self, req: EngineRequest) -> AsyncIterator[EngineEvent]:
        """Stream the answer (call through a handle with `stream=True`, multiplexed id "tenant/adapter")."""
        if req.adapter is not None:
            await self.hold_adapter(f"{req.tenant}/{req.adapter}")
        async with aclosing(self._pacer.paced(self._core.generate(req))) as events:
            async for event in events:
                yield event

    async def answer(self, req: EngineRequest) -> EngineEvent:
        """The whole answer as one reply (a unary call through a handle, multiplexed id "tenant/adapter")."""
        if req.adapter is not None:
            await self.hold_adapter(f"{req.tenant}/{req.adapter}")
        return await self._core.answer(req)

    async def compress(
        self, tenant: str, doc_ids: list[str], prepared: Sequence[PreparedDocument] = ()
    ) -> list[ContextInfo]:
        return await self._core.compress(tenant, doc_ids, prepared)

    async def forget_tenant(self, tenant: str) -> int:
        """Drop this replica's cached state of a deleted tenant (see `EngineCore.forget_tenant`)."""
        return await self._core.forget_tenant(tenant)

    async def compressor_id(self) -> str:
        """The id under which this engine's contexts are stored (fixed for the replica's life)."""
        return self._core.compressor_id

    async def segment_len(self) -> int:
        """Tokens per segment of this engine's compressor: the edge cuts what it ingests the same way."""
        return self._core.segment_len

    async def summary_vectors(self) -> int:
        """Summary vectors per segment of this engine's contexts (a corpus query's budget counts them)."""
        return self._core.summary_vectors

    async def tokenizer(self) -> Any:
        """The base model's tokenizer, so the edge counts limits in the tokens the engine sees."""
        return self._core.tokenizer

    async def lora_fit(self) -> LoraFit:
        """What an adapter must fit to be served (fixed for the replica's life): the edge checks imported
        adapters against it before it publishes them."""
        return self._core.lora_fit

    async def health(self) -> dict[str, float]:
        """The engine's counters; raises Unavailable when its scheduler is not running."""
        await self.check_health()
        return self._core.metrics()

    async def check_health(self) -> None:
        """Serve's replica health probe."""
        if not self._core.healthy:
            raise Unavailable("the engine's scheduler is not running")


def bind_engine(settings: Settings) -> Application:
    """The engine deployment with its replicas and GPUs from `settings.serve`."""
    return EngineDeployment.options(
        num_replicas=settings.serve.engine_replicas,
        max_ongoing_requests=settings.serve.max_ongoing_requests,
        ray_actor_options={"num_gpus": settings.serve.engine_num_gpus},
    ).bind(settings)
