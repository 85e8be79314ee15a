"""The serving engine, free of Ray: one base model answering every tenant's queries.

A query is `[compressed contexts of its documents, concatenated] + chat_prompt(question)`, decoded with
the tenant's adapter in a LoRA slot (a query with documents and no adapter: the compressor's reader, when it
ships one, since a tenant adapter starts from it and the base model alone was never taught to read summary
vectors). `lloco.serve.engine` wraps it in Ray Serve.

What a request names is resolved against the registry (the tenant's uid, its documents' current text
digests, the adapter version) by the caller when it sends `EngineRequest.resolved` (the edge, from its
caches), else here, on every request. Contexts and adapter weights are cached under those immutable
versions, so a request whose contexts and adapter are held reads nothing from the store, and new versions
and recompressed documents are picked up without a restart. The question is tokenized once per request:
by the caller when it sends `prompt_ids`, else here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lloco.compress import PreparedDocument, compress_online
from lloco.config import Settings
from lloco.errors import FailedPrecondition, Internal, InvalidArgument, NotFound
from lloco.logs import get_logger
from lloco.model import (
    Compressor,
    Generator,
    LoadedModel,
    LoraAdapter,
    LoraFit,
    LoraSlots,
    SamplingParams,
    chat_prompt,
)
from lloco.registry import AdapterVersion, ContextInfo, DocumentInfo, Registry, Segment, segment_rows
from lloco.registry.evidence import Evidence, context_ratio, evidence_budget
from lloco.serve.caches import (
    AdapterCache,
    AdapterKey,
    ContextCache,
    ContextTier,
    LruCache,
    PrefixKey,
    SlotManager,
    context_key,
    tensor_bytes,
)
from lloco.serve.fairness import FairQueue, TenantLimiter, TenantService
from lloco.serve.scheduler import ScheduledRequest, Scheduler
from lloco.serve.text_stream import TextStream
from lloco.storage import ObjectStore

log = get_logger(__name__)

# Generator reasons -> the API's: an EOS token and a stop string both mean the answer ended.
_FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "cancelled"}
# queries of one tenant prepared at once in the event loop's shared worker threads (min(32, cores + 4)): a
# tenant's burst waits behind its own queries, not in front of the other tenants' (lloco.serve.fairness)
PREPARES_PER_TENANT = 4
READER_ADAPTER = "reader"  # the slot key name of the compressor's reader (tenant "": no tenant owns it)
DOCUMENT_TEXT_CACHE_CHARS = 64 << 20  # document texts kept per replica for evidence (characters)
EVIDENCE_CACHE_CHARS = (
    16 << 20
)  # indexed sentences of queries' document sets kept per replica (their characters)
RESIDENCY_REPORT_S = 1.0  # what the replica holds is reported at most this often while busy, and when idle


def _between(start: float, end: float) -> float:
    """Seconds from ``start`` to ``end``, two scheduler stamps; 0.0 when either never happened (a query
    cancelled in the queue has no row, one that ended before a token has no first token)."""
    return max(0.0, end - start) if start and end else 0.0


def segment_vectors(vectors: torch.Tensor, segments: tuple[Segment, ...], k: int) -> torch.Tensor:
    """The rows of a context that belong to ``segments``, in their order: each segment's own summaries
    (``segment_rows``; with accumulation they were computed seeing the document's earlier summaries, which
    are not prepended with it).

    Raises InvalidArgument for a segment the context does not have."""
    n_segments = math.ceil(vectors.shape[0] / k)
    indices = [s.index for s in segments]
    if any(not 0 <= index < n_segments for index in indices):
        raise InvalidArgument(f"segments {indices} out of range for a context of {n_segments} segments")
    rows = [row for index in indices for row in segment_rows(index, k, vectors.shape[0])]
    return vectors[torch.tensor(rows, dtype=torch.long, device=vectors.device)]


@dataclass(frozen=True)
class Resolved:
    """What the registry says of a request's names: the tenant's creation uid, each document's record (in
    the order of `EngineRequest.doc_ids`; its sha256 keys the context) and the adapter version (None: no
    adapter). Each names an immutable thing, so the engine reads the store only for what it does not hold."""

    tenant_uid: str
    documents: tuple[DocumentInfo, ...]
    adapter: AdapterVersion | None

    @classmethod
    def read(
        cls, registry: Registry, doc_ids: tuple[str, ...], adapter: str | None, version: str | None
    ) -> Resolved:
        """Resolve from the store (NotFound for a missing document or adapter version)."""
        return cls(
            tenant_uid=registry.uid,
            documents=tuple(registry.get_document(doc_id) for doc_id in doc_ids),
            adapter=registry.get_adapter(adapter, version) if adapter else None,
        )


def _text_spans(segments: Sequence[Segment]) -> list[tuple[int, int]]:
    """The character spans of ``segments`` (in order), adjacent ones merged: a sentence across a segment
    boundary stays one sentence."""
    spans: list[tuple[int, int]] = []
    for segment in segments:
        if spans and segment.char_start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], segment.char_end))
        else:
            spans.append((segment.char_start, segment.char_end))
    return spans


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    tenant: str
    doc_ids: tuple[str, ...]
    question: str
    adapter: str | None  # adapter name; None = the base model
    adapter_version: str | None  # None = the adapter's current version
    params: SamplingParams
    # The caller's work, so the engine does not repeat it: the registry's answers (None: read them here)
    # and chat_prompt(tokenizer, question) in this engine's tokenizer (None: tokenize here).
    resolved: Resolved | None = None
    prompt_ids: tuple[int, ...] | None = None
    # A corpus query (serve.retrieval): per document of doc_ids, the segments whose own k summary vectors
    # are prepended, in order (None: every document whole).
    segments: tuple[tuple[Segment, ...], ...] | None = None


@dataclass(frozen=True)
class QueryStats:
    prompt_tokens: int
    context_tokens: int  # compressed-context vectors the decoder attended to
    document_tokens: int  # tokens of the original documents they stand for
    generated_tokens: int
    adapter_version: str | None
    ttft_s: float
    total_s: float
    finish_reason: str  # "stop" | "length" | "cancelled"
    # Where ttft_s went, in order (what is left of it is the first token's way back to the caller):
    prepare_s: float  # registry and cache lookups, the context onto the device, before the scheduler
    queue_s: float  # in the scheduler's queue until given a generator row (admissions happen between steps,
    # so this includes waiting for the running step to end, even with rows free)
    prefill_s: float  # from the row to the first token: an adapter's slot load, prefill chunks, >= one step


@dataclass(frozen=True)
class EngineEvent:
    """Tokens of a request: in a stream, the text and ids since the previous event (several tokens when
    they were ready together), the last event carrying `final`; from `EngineCore.answer`, the whole answer."""

    text: str
    token_ids: tuple[int, ...]
    final: QueryStats | None = None


@dataclass(frozen=True)
class Residency:
    """What one engine replica holds per tier, and its evictions so far (cumulative counts)."""

    adapters_gpu: int  # adapters in LoRA slots (the compressor's reader included)
    adapters_cpu: int  # parsed adapters in the CPU tier
    adapter_evictions_gpu: int
    adapter_evictions_cpu: int
    context_bytes_gpu: int
    context_bytes_cpu: int
    context_evictions_gpu: int
    context_evictions_cpu: int


class EngineObserver:
    """Receives per-tenant events for metrics; this base records nothing (the Ray deployment exports them)."""

    def context_lookup(self, tenant: str, tier: ContextTier) -> None:
        """A document's context was served from `tier` ("gpu", "cpu" or "s3")."""

    def adapter_loaded(self, tenant: str, tier: str) -> None:
        """An adapter was loaded into the CPU tier (from S3, tier "cpu") or into a GPU slot (tier "gpu")."""

    def request_done(self, tenant: str, adapter: str | None, stats: QueryStats) -> None:
        """A query finished; ``adapter`` is the tenant's adapter it asked for (None: none)."""

    def scheduled(self, queue_depth: int, batch_size: int) -> None:
        """The scheduler finished an iteration."""

    def tenant_service(self, tenant: str, service: TenantService) -> None:
        """A tenant's queue or service changed (reported at most every `scheduler.TENANT_REPORT_S` while
        the engine is busy, and when it goes idle)."""

    def residency(self, residency: Residency) -> None:
        """What the replica holds (reported at most every `RESIDENCY_REPORT_S` while busy, and when idle)."""


@dataclass
class _Prepared:
    """A request resolved against the registry: everything the scheduler needs, plus stats inputs."""

    prefix: torch.Tensor | None  # the contexts, concatenated: embeddings or key/value summaries
    prompt_ids: list[int]  # the evidence tokens, then the prompt
    evidence_tokens: int
    document_tokens: int
    adapter: AdapterKey | None
    adapter_weights: LoraAdapter | None
    prefix_key: PrefixKey | None  # the generator's prefix cache


class EngineCore:
    """Continuous-batching, multi-adapter, context-cached generation over one `LoadedModel`."""

    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        model: LoadedModel,
        compressor: Compressor,
        observer: EngineObserver | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._model = model
        self._compressor = compressor
        self._kv_summaries = compressor.summary_form == "kv"  # contexts go into rows' caches as keys/values
        self._observer = observer or EngineObserver()
        weight = next(model.model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        engine = settings.engine
        self.lora = LoraSlots(
            model.config,
            settings.lora.gpu_slots,
            settings.lora.max_rank,
            settings.finetune.target_modules,
            self.device,
            self.dtype,
        )
        # keys and values of prefix embeddings prefilled before, by contexts and adapter (none for key/value
        # summaries: those go into the cache without a prefill)
        self.prefixes: LruCache[PrefixKey, torch.Tensor] = LruCache(engine.prefix_cache_bytes, tensor_bytes)
        self.generator = Generator(
            model.model,
            self.lora,
            engine.max_batch_size,
            engine.max_seq_len,
            self.device,
            self.dtype,
            model.tokenizer,
            compile=engine.compile and self.device.type == "cuda",
            prefill_chunk_tokens=engine.prefill_chunk_tokens,
            prefix_cache=self.prefixes,
        )
        self.contexts = ContextCache(
            engine.context_cache_gpu_bytes, engine.context_cache_cpu_bytes, self.device, self.dtype
        )
        self.adapters = AdapterCache(settings.lora.cpu_adapters, self._parse_adapter)
        self._reader = self._prepare_reader(compressor)
        self._document_tokens: LruCache[tuple[str, str, str, str], int] = LruCache(4096, lambda _: 1)
        self._document_texts: LruCache[tuple[str, str, str, str], str] = LruCache(
            DOCUMENT_TEXT_CACHE_CHARS, len
        )
        self._evidence: LruCache[tuple[Any, ...], Evidence] = LruCache(
            EVIDENCE_CACHE_CHARS, lambda e: e.chars
        )
        self.scheduler = Scheduler(
            self.generator,
            self.lora,
            SlotManager(settings.lora.gpu_slots),
            max_batch=engine.max_batch_size,
            max_waiting=settings.serve.max_ongoing_requests,
            queue=FairQueue(engine.input_token_cost, engine.output_token_cost, engine.tenant_weights),
            preemption=engine.fair_preemption,
            on_slot_load=lambda key: self._observer.adapter_loaded(key.tenant, "gpu"),
            on_iteration=self._scheduled,
            on_tenants=self._report_tenants,
        )
        self._preparing = TenantLimiter(PREPARES_PER_TENANT)
        self.requests = 0
        self._residency_at = float("-inf")

    async def start(self) -> None:
        await asyncio.to_thread(self._warm_up)
        await self.scheduler.start()

    def _warm_up(self) -> None:
        """``Generator.warm_up`` before the first query, then capture the CUDA graphs of every batch and
        key-length class of ``engine.capture_decode_modes``: on a GPU, seconds a tenant would otherwise wait
        for."""
        started = time.perf_counter()
        self.generator.warm_up(chat_prompt(self._model.tokenizer, "Hello"))
        warmed = time.perf_counter()
        captured = self.generator.capture_decode_graphs(self._settings.engine.capture_decode_modes)
        log.info(
            "engine warmed up",
            seconds=round(warmed - started, 2),
            decode_graphs_captured=captured,
            capture_seconds=round(time.perf_counter() - warmed, 2),
            device=str(self.device),
        )

    async def stop(self) -> None:
        await self.scheduler.stop()

    @property
    def healthy(self) -> bool:
        return self.scheduler.alive

    async def generate(self, req: EngineRequest) -> AsyncIterator[EngineEvent]:
        """Stream the answer to `req`: text deltas (several tokens in one event when they were ready
        together), then one event carrying the final `QueryStats`.

        Closing the iterator (or cancelling its consumer) frees the request's row at the next step.

        Raises:
            NotFound: the tenant, a document or the adapter (version) does not exist.
            FailedPrecondition: a document is not compressed yet (or only for older text).
            InvalidArgument: context + prompt + max_new_tokens exceed the engine's max_seq_len.
            ResourceExhausted: the engine's waiting queue is full.
        """
        started = time.perf_counter()
        self.requests += 1
        async with self._preparing.hold(req.tenant):
            prepared = await asyncio.to_thread(self._prepare, req)
        prepared_at = time.perf_counter()
        scheduled = ScheduledRequest(
            request_id=f"{req.request_id}:{uuid.uuid4().hex[:8]}",
            tenant=req.tenant,
            prefix_embeds=None if self._kv_summaries else prepared.prefix,
            prefix_kv=prepared.prefix if self._kv_summaries else None,
            prompt_ids=prepared.prompt_ids,
            # stop strings are found here, once, as the text is decoded (TextStream), not by the generator
            params=dataclasses.replace(req.params, stop=()),
            adapter=prepared.adapter,
            adapter_weights=prepared.adapter_weights,
            prefix_key=prepared.prefix_key,
        )
        self.scheduler.submit(scheduled)
        text = TextStream(self._model.tokenizer, req.params.stop)
        generated = 0
        first_token_at: float | None = None
        reason: str | None = None  # set when the answer ended
        row_freed = False  # the scheduler ended the row itself (finished or failed)
        try:
            while reason is None:
                ready = [await scheduled.events.get()]
                while not scheduled.events.empty():
                    ready.append(scheduled.events.get_nowait())
                first_token_at = first_token_at or time.perf_counter()
                delta, fresh = "", []
                for event in ready:
                    if isinstance(event, BaseException):
                        row_freed = True
                        raise event
                    if event.token_id is not None and event.reason != "eos":
                        fresh.append(event.token_id)
                        delta += text.push(event.token_id)
                        if text.stopped:
                            reason = "stop"
                            break
                    if event.finished:
                        row_freed = True
                        reason = event.reason or "stop"
                        break
                generated += len(fresh)
                if reason is None:
                    yield EngineEvent(delta, tuple(fresh))
            delta += text.finish()
            done = time.perf_counter()
            stats = QueryStats(
                prompt_tokens=len(prepared.prompt_ids) - prepared.evidence_tokens,
                context_tokens=prepared.evidence_tokens
                + (0 if prepared.prefix is None else int(prepared.prefix.shape[0])),
                document_tokens=prepared.document_tokens,
                generated_tokens=generated,
                adapter_version=prepared.adapter.version if req.adapter else None,
                ttft_s=(first_token_at or done) - started,
                total_s=done - started,
                finish_reason=_FINISH_REASONS[reason],
                prepare_s=prepared_at - started,
                queue_s=_between(scheduled.submitted_at, scheduled.admitted_at),
                prefill_s=_between(scheduled.admitted_at, scheduled.first_token_at),
            )
            self._observer.request_done(req.tenant, req.adapter, stats)
            yield EngineEvent(delta, tuple(fresh), stats)
        finally:
            if not row_freed:
                self.scheduler.cancel(scheduled.request_id)

    async def answer(self, req: EngineRequest) -> EngineEvent:
        """The whole answer to `req` as one event (text, every token id, the final stats): what a unary
        call returns, with nothing sent per token. Raises what `generate` raises."""
        parts: list[str] = []
        token_ids: list[int] = []
        async for event in self.generate(req):
            parts.append(event.text)
            token_ids.extend(event.token_ids)
            if event.final is not None:
                return EngineEvent("".join(parts), tuple(token_ids), event.final)
        raise Internal("the engine ended an answer without its final stats")

    @property
    def compressor_id(self) -> str:
        return self._compressor.compressor_id

    @property
    def segment_len(self) -> int:
        """Tokens per segment of the compressor: how a document handed to `compress` must be cut."""
        return self._compressor.segment_len

    @property
    def summary_vectors(self) -> int:
        """Summary positions per segment (the compressor's k): what one retrieved segment prepends at most."""
        return self._compressor.k

    @property
    def tokenizer(self) -> Any:
        return self._model.tokenizer

    @property
    def lora_fit(self) -> LoraFit:
        """What an adapter must fit to be served here: the model's geometry and id, the slots' rank and
        targets (``lloco.model.lora.check_peft_files``)."""
        return dataclasses.replace(self.lora.fit, model_id=self._model.model_id)

    async def compress(
        self, tenant: str, doc_ids: list[str], prepared: Sequence[PreparedDocument] = ()
    ) -> list[ContextInfo]:
        """Compress small documents now, on this engine's model, between decode steps; then add their
        segments to the tenant's retrieval index (in a worker thread: decoding goes on meanwhile).
        ``prepared``: documents the caller tokenized already (the edge, at ingest), used while they are the
        stored ones (`compress_online`).

        Raises:
            NotFound: the tenant or a document does not exist.
            InvalidArgument: a document is empty or longer than `limits.online_compress_max_tokens`.
            ResourceExhausted: the index would pass `limits.max_corpus_segments` (the contexts are stored).
        """
        registry = await asyncio.to_thread(Registry, self._store, tenant)
        limits = self._settings.limits
        contexts = await self.scheduler.run_exclusive(
            lambda: compress_online(
                registry, self._compressor, doc_ids, limits.online_compress_max_tokens, prepared
            )
        )
        index = registry.index(self.compressor_id, limits.max_corpus_segments)
        await asyncio.to_thread(index.update, list(dict.fromkeys(doc_ids)))
        return contexts

    async def load_adapter(self, tenant: str, name: str, version: str | None) -> str:
        """Bring an adapter into the CPU tier and, when a slot is free of running rows, into a GPU slot.

        Returns the resolved version (the current one when `version` is None).
        """
        key, weights = await asyncio.to_thread(
            self._resolve_adapter, Registry(self._store, tenant), name, version
        )
        await self.scheduler.preload(key, weights)
        return key.version

    async def forget_tenant(self, tenant: str) -> int:
        """Drop everything this engine holds of ``tenant`` (a deleted tenant): cached contexts, their
        prefilled keys and values, adapters and token counts, the adapter slots no running row uses
        (zeroed), and its fairness counter unless requests of it are still in flight. Returns the entries
        dropped.

        Entries are keyed by the tenant's creation uid too, so a re-created tenant of the same name never
        reads them even before this runs; this frees the memory at once.
        """
        mine = lambda key: key.tenant == tenant  # noqa: E731 - one predicate for every cache
        dropped = self.contexts.gpu.drop(mine) + self.contexts.cpu.drop(mine) + self.adapters.tier.drop(mine)
        dropped += self.prefixes.drop(mine)
        dropped += self._document_tokens.drop(lambda key: key[0] == tenant)
        dropped += self.scheduler.forget(tenant)
        for slot in self.scheduler.slots.forget_where(mine):
            self.lora.unload(slot)
            dropped += 1
        log.info("tenant forgotten", tenant=tenant, entries=dropped)
        return dropped

    def metrics(self) -> dict[str, float]:
        slots = self.scheduler.slots
        return {
            "queue_depth": self.scheduler.waiting(),
            "tenants_waiting": self.scheduler.backlogged(),
            "batch_size": self.scheduler.active(),
            "requests": self.requests,
            "generated_tokens": self.scheduler.generated_tokens,
            "steps": self.scheduler.steps,
            "preemptions": self.scheduler.preemptions,
            **{
                f"scheduler_{name}": value
                for name, value in dataclasses.asdict(self.scheduler.loop_times).items()
            },
            "context_cache_gpu_hits": self.contexts.gpu.hits,
            "context_cache_cpu_hits": self.contexts.cpu.hits,
            "context_cache_s3_loads": self.contexts.s3_loads,
            "context_cache_gpu_bytes": self.contexts.gpu.used,
            "context_cache_cpu_bytes": self.contexts.cpu.used,
            "context_cache_gpu_evictions": self.contexts.gpu.evictions,
            "context_cache_cpu_evictions": self.contexts.cpu.evictions,
            "prefix_cache_hits": self.prefixes.hits,
            "prefix_cache_misses": self.prefixes.misses,
            "prefix_cache_bytes": self.prefixes.used,
            "prefix_cache_evictions": self.prefixes.evictions,
            "adapter_cpu_hits": self.adapters.tier.hits,
            "adapter_s3_loads": self.adapters.s3_loads,
            "adapter_s3_read_seconds": self.adapters.read_s,
            "adapter_parse_seconds": self.adapters.parse_s,
            "adapter_slot_loads": slots.loads,
            "adapter_slot_evictions": slots.evictions,
            "decode_graph_captures": self.generator.graph_captures,
            "decode_graph_capture_seconds": self.generator.graph_capture_s,
        }

    def residency(self) -> Residency:
        slots = self.scheduler.slots
        return Residency(
            adapters_gpu=len(slots.resident()),
            adapters_cpu=len(self.adapters.tier),
            adapter_evictions_gpu=slots.evictions,
            adapter_evictions_cpu=self.adapters.tier.evictions,
            context_bytes_gpu=self.contexts.gpu.used,
            context_bytes_cpu=self.contexts.cpu.used,
            context_evictions_gpu=self.contexts.gpu.evictions,
            context_evictions_cpu=self.contexts.cpu.evictions,
        )

    def _scheduled(self, waiting: int, active: int) -> None:
        self._observer.scheduled(waiting, active)
        now = time.monotonic()
        if not (waiting or active) or now - self._residency_at >= RESIDENCY_REPORT_S:
            self._residency_at = now
            self._observer.residency(self.residency())

    def _report_tenants(self, services: dict[str, TenantService]) -> None:
        for tenant, service in services.items():
            self._observer.tenant_service(tenant, service)

    def _prepare_reader(self, compressor: Compressor) -> tuple[AdapterKey, LoraAdapter] | None:
        """The compressor's reader (a decoder-side LoRA trained to read its summary vectors), laid out for the
        slots: what a query with documents and no adapter of its own decodes with.

        Raises:
            FailedPrecondition: the reader's rank or targets do not fit the engine's slots.
        """
        if compressor.reader_files is None:
            return None
        try:
            weights = self._parse_adapter(compressor.reader_files)
        except (InvalidArgument, FailedPrecondition) as error:
            raise FailedPrecondition(
                f"compressor {compressor.compressor_id} has a reader these LoRA slots cannot hold ({error}); "
                "raise lora.max_rank or serve its targets (finetune.target_modules)"
            ) from error
        return AdapterKey("", "", READER_ADAPTER, compressor.compressor_id), weights

    def _prepare(self, req: EngineRequest) -> _Prepared:
        """Blocking half of a request (store reads on cache misses, tokenization when the caller did not),
        run in a worker thread. With `req.resolved` and everything cached it reads nothing from the store."""
        if req.resolved is None:
            opened = Registry(self._store, req.tenant)
            resolved = Resolved.read(opened, req.doc_ids, req.adapter, req.adapter_version)
            registry: Callable[[], Registry] = lambda: opened  # noqa: E731 - already open
        else:
            resolved = req.resolved
            registry = self._registry_reader(req.tenant, resolved.tenant_uid)
        objects = _TenantReads(req.tenant, resolved.tenant_uid, registry)
        adapter, weights = (
            self._adapter_weights(objects, resolved.adapter) if resolved.adapter else (None, None)
        )
        if adapter is None and req.doc_ids and self._reader is not None:
            adapter, weights = (
                self._reader
            )  # no adapter of its own: the compressor's reader reads the context
        contexts = []
        context_keys = []
        for doc in resolved.documents:
            context_keys.append(context_key(objects, doc, self.compressor_id))
            vectors, tier = self.contexts.get(objects, doc, self.compressor_id)
            self._observer.context_lookup(req.tenant, tier)
            contexts.append(vectors)
        prompt_ids = (
            list(req.prompt_ids)
            if req.prompt_ids is not None
            else chat_prompt(self._model.tokenizer, req.question)
        )
        if req.segments is None:
            document_tokens = sum(self._tokens_of(objects, doc) for doc in resolved.documents)
        else:
            k = self._compressor.k
            contexts = [
                segment_vectors(v, segments, k) for v, segments in zip(contexts, req.segments, strict=True)
            ]
            document_tokens = sum(s.token_end - s.token_start for segments in req.segments for s in segments)
        prefix = torch.cat(contexts) if contexts else None
        context_tokens = 0 if prefix is None else prefix.shape[0]
        limit = self._settings.engine.max_seq_len
        budget = evidence_budget(document_tokens, context_tokens, context_ratio(resolved.adapter))
        evidence: list[int] = []
        if budget and resolved.documents:  # within the budget and the room the query leaves
            room = limit - context_tokens - len(prompt_ids) - req.params.max_new_tokens
            found = self._evidence_of(objects, resolved.documents, req.segments)
            evidence = found.ids(req.question, min(budget, room))
        prompt_ids = evidence + prompt_ids
        needed = context_tokens + len(prompt_ids) + req.params.max_new_tokens
        if needed > limit:
            raise InvalidArgument(
                f"the query needs {needed} positions (context {context_tokens} + prompt {len(prompt_ids)} "
                f"+ max_new_tokens {req.params.max_new_tokens}) but the engine holds {limit}; "
                "attach fewer documents, shorten the question or ask for fewer new tokens"
            )
        segments = (
            None if req.segments is None else tuple(tuple(s.index for s in taken) for taken in req.segments)
        )
        prefix_key = PrefixKey(tuple(context_keys), segments, adapter) if context_keys else None
        return _Prepared(prefix, prompt_ids, len(evidence), document_tokens, adapter, weights, prefix_key)

    def _registry_reader(self, tenant: str, uid: str) -> Callable[[], Registry]:
        """The tenant's registry, opened on first use (a cache miss) and only if the tenant is still the
        one of ``uid``: a request resolved for a tenant since deleted (and maybe re-created) reads nothing."""

        @functools.cache
        def registry() -> Registry:
            opened = Registry(self._store, tenant)
            if opened.uid != uid:
                raise NotFound(f"tenant {tenant!r} not found")
            return opened

        return registry

    def _resolve_adapter(
        self, registry: Registry, name: str, version: str | None
    ) -> tuple[AdapterKey, LoraAdapter]:
        info = registry.get_adapter(name, version)
        return self._adapter_weights(_TenantReads(registry.tenant, registry.uid, lambda: registry), info)

    def _adapter_weights(self, objects: _TenantReads, info: AdapterVersion) -> tuple[AdapterKey, LoraAdapter]:
        """The parsed weights of an adapter version (CPU tier, else the store) and its slot key."""
        if info.rank > self._settings.lora.max_rank:
            raise FailedPrecondition(
                f"adapter {info.name!r} {info.version} has rank {info.rank}; this engine serves ranks up to "
                f"{self._settings.lora.max_rank} (lora.max_rank)"
            )
        key = AdapterKey(objects.tenant, objects.uid, info.name, info.version)
        weights, cached = self.adapters.get(objects, key)
        if not cached:
            self._observer.adapter_loaded(objects.tenant, "cpu")
        return key, weights

    def _parse_adapter(self, files: dict[str, bytes]) -> LoraAdapter:
        """PEFT files -> the slots' layout in host memory (page-locked on CUDA for fast slot loads)."""
        return self.lora.prepare(files, pin_memory=self.device.type == "cuda")

    def _tokens_of(self, objects: _TenantReads, doc: DocumentInfo) -> int:
        """The document's token count: recorded at ingest, else counted once per text version."""
        if doc.tokens is not None:
            return doc.tokens
        key = (objects.tenant, objects.uid, doc.doc_id, doc.sha256)
        tokens = self._document_tokens.get(key)
        if tokens is None:
            text = self._text_of(objects, doc)
            tokens = len(self._model.tokenizer(text, add_special_tokens=False)["input_ids"])
            self._document_tokens.put(key, tokens)
        return tokens

    def _evidence_of(
        self,
        objects: _TenantReads,
        documents: tuple[DocumentInfo, ...],
        segments: tuple[tuple[Segment, ...], ...] | None,
    ) -> Evidence:
        """The indexed sentences of a query's documents (of a corpus query's segments, adjacent ones joined),
        built once per document versions and spans while they stay in the cache."""
        spans = (
            [None] * len(documents)
            if segments is None
            else [tuple(_text_spans(chosen)) for chosen in segments]
        )
        key = (
            objects.tenant,
            objects.uid,
            *((d.doc_id, d.sha256, s) for d, s in zip(documents, spans, strict=True)),
        )
        found = self._evidence.get(key)
        if found is None:
            texts = []
            for doc, doc_spans in zip(documents, spans, strict=True):
                text = self._text_of(objects, doc)
                texts += [text] if doc_spans is None else [text[start:end] for start, end in doc_spans]
            found = Evidence(texts, self._model.tokenizer)
            self._evidence.put(key, found)
        return found

    def _text_of(self, objects: _TenantReads, doc: DocumentInfo) -> str:
        """The document's text (the version ``doc`` names), read once while it stays in the cache.

        Raises:
            FailedPrecondition: the stored text is no longer that version (new text came meanwhile).
        """
        key = (objects.tenant, objects.uid, doc.doc_id, doc.sha256)
        text = self._document_texts.get(key)
        if text is None:
            text = objects.registry().read_text(doc.doc_id)
            if hashlib.sha256(text.encode()).hexdigest() != doc.sha256:
                raise FailedPrecondition(
                    f"document {doc.doc_id!r} changed while the query was read; ask again"
                )
            self._document_texts.put(key, text)
        return text


@dataclass(frozen=True)
class _TenantReads:
    """A tenant's objects as the engine's caches read them on a miss (`caches.TenantObjects`), through a
    registry opened only then."""

    tenant: str
    uid: str
    registry: Callable[[], Registry]

    def get_context(self, doc_id: str, compressor_id: str) -> tuple[torch.Tensor, ContextInfo]:
        return self.registry().get_context(doc_id, compressor_id)

    def read_adapter_files(self, name: str, version: str) -> dict[str, bytes]:
        return self.registry().read_adapter_files(name, version)
