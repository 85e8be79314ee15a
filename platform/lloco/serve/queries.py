"""Queries at the edge: a Query or QueryStream request checked into an engine request, within the
tenant's limits, and each tenant's queries in flight counted against its limit.

The edge does the request's lookups and tokenization, once, so the engine repeats neither: the registry
records come from `EdgeLookups` (cached, so a repeated query reads nothing from the store) and travel in
`EngineRequest.resolved`; the question is tokenized here into the engine's prompt
(`chat_prompt` in the engine's tokenizer, fetched once) and its count for the limit comes from that.
A unary query gets the whole answer from the engine as one reply (`answer`), a stream its events.

A corpus query (``retrieval`` set, no documents) searches the tenant's retrieval index here
(`lloco.serve.retrieval`, cached by `EdgeLookups`) and sends the engine the segments it chose
(`EngineRequest.segments`); the reply cites them (`Query.retrieved`).
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lloco.api import lloco_pb2
from lloco.auth import Principal
from lloco.config import LimitSettings
from lloco.errors import InvalidArgument, ResourceExhausted, Unavailable
from lloco.model import SamplingParams, chat_prompt
from lloco.registry import Registry
from lloco.serve.engine_core import EngineEvent, EngineRequest
from lloco.serve.engine_facts import EngineFacts
from lloco.serve.lookups import EdgeLookups
from lloco.serve.names import owned, owned_under, tenant_name
from lloco.serve.retrieval import OVER_FETCH, Retrieved, check_retrieval, select
from lloco.storage import keys

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 256
MAX_QUESTION_CHARS = 64 * 1024  # checked before tokenizing, so a huge question costs nothing


@dataclass(frozen=True)
class Query:
    """A checked query, ready for the engine: its request, the deployment's multiplexed model id and, for
    a corpus query, the segments retrieved (what the reply cites)."""

    request: EngineRequest
    multiplexed_model_id: str
    retrieved: Retrieved | None = None


class Queries:
    """Checks queries against ``limits`` and resolves their names through ``lookups``; questions become
    prompts in the engine's tokenizer, and corpus queries search the index of its compressor (``facts``)."""

    def __init__(self, limits: LimitSettings, lookups: EdgeLookups, facts: EngineFacts) -> None:
        self._limits = limits
        self._lookups = lookups
        self._facts = facts
        self._template_tokens: int | None = None
        self._inflight: dict[str, int] = {}

    async def check(
        self, principal: Principal, request: lloco_pb2.QueryRequest | lloco_pb2.QueryStreamRequest
    ) -> Query:
        """The engine request of ``request``, once every field is valid and the caller owns every name."""
        (tenant,) = owned(principal, "tenant", request.tenant, ("tenants",))
        limit = self._limits.max_docs_per_query
        if len(request.documents) > limit:
            raise InvalidArgument(
                f"documents: {len(request.documents)} given, a query may attach at most {limit}"
            )
        doc_ids = tuple(
            owned_under(principal, tenant, "documents", n, "documents") for n in request.documents
        )
        if len(set(doc_ids)) != len(doc_ids):
            raise InvalidArgument("documents: a document is attached more than once")
        corpus = request.HasField("retrieval")
        if corpus and doc_ids:
            raise InvalidArgument("documents and retrieval: name documents or ask the corpus, not both")
        wanted = (
            check_retrieval(
                request.retrieval.top_k,
                request.retrieval.context_budget,
                self._limits.max_retrieval_k,
                self._limits.default_retrieval_k,
            )
            if corpus
            else None
        )
        prompt_ids = await self._prompt(request.question)
        adapter, version = self._adapter(principal, tenant, request.adapter)
        params = self._sampling(request.sampling if request.HasField("sampling") else None)
        registry = await self._lookups.registry(tenant, principal)
        retrieved = await self._retrieve(registry, request.question, *wanted) if wanted else None
        if retrieved is not None:
            doc_ids = retrieved.doc_ids
        resolved = await self._lookups.resolve(registry, doc_ids, adapter, version)
        engine_request = EngineRequest(
            request_id=uuid.uuid4().hex,
            tenant=tenant,
            doc_ids=doc_ids,
            question=request.question,
            adapter=adapter,
            adapter_version=version,
            params=params,
            resolved=resolved,
            prompt_ids=prompt_ids,
            segments=None if retrieved is None else retrieved.segments,
        )
        return Query(engine_request, f"{tenant}/{adapter}" if adapter else "", retrieved)

    async def _retrieve(self, registry: Registry, question: str, top_k: int, budget: int | None) -> Retrieved:
        """The segments of the tenant's corpus a question gets: BM25 hits (over-fetched, so hits of deleted
        or rewritten documents leave room), kept when their document's current text is the one indexed."""
        index = await self._lookups.index(registry, await self._facts.compressor_id())
        hits = await asyncio.to_thread(index.search, question, top_k * OVER_FETCH)
        documents = {
            doc_id: await self._lookups.current_document(registry, doc_id)
            for doc_id in dict.fromkeys(hit.entry.doc_id for hit in hits)
        }
        return select(hits, documents.__getitem__, top_k, budget, await self._facts.summary_vectors())

    @asynccontextmanager
    async def in_flight(self, tenant: str) -> AsyncIterator[None]:
        """Count the tenant's running queries against its limit (per ingress replica)."""
        running = self._inflight.get(tenant, 0)
        limit = self._limits.max_inflight_requests
        if running >= limit:
            raise ResourceExhausted(
                f"{tenant_name(tenant)} already has {running} queries in flight, its limit; retry when one finishes"
            )
        self._inflight[tenant] = running + 1
        try:
            yield
        finally:
            self._inflight[tenant] -= 1
            if not self._inflight[tenant]:
                del self._inflight[tenant]

    async def answer(self, engine: DeploymentHandle, query: Query) -> EngineEvent:
        """The engine's whole answer to ``query`` as one reply, with its final stats, counted in flight;
        leaving before it comes (the caller went away) cancels the request in the engine."""
        handle = engine.options(multiplexed_model_id=query.multiplexed_model_id)
        async with self.in_flight(query.request.tenant):
            response = handle.answer.remote(query.request)
            complete = False
            try:
                answer = await response
                complete = True
            finally:
                if not complete:
                    response.cancel()
        if answer.final is None:
            raise Unavailable("the engine ended the answer without its final stats; retry")
        return answer

    async def events(self, engine: DeploymentHandle, query: Query) -> AsyncIterator[EngineEvent]:
        """The engine's events for ``query``, counted in flight; leaving before the last one (the caller
        went away) cancels the request in the engine, which frees its batch row at the next step."""
        handle = engine.options(stream=True, multiplexed_model_id=query.multiplexed_model_id)
        async with self.in_flight(query.request.tenant):
            response = handle.generate.remote(query.request)
            complete = False
            try:
                async for event in response:
                    complete = event.final is not None
                    yield event
            finally:
                if not complete:
                    response.cancel()

    async def _prompt(self, question: str) -> tuple[int, ...]:
        """The engine's prompt of ``question`` (`chat_prompt`), tokenized once; its question tokens (the
        prompt's less those of the chat template around it) must be within the limit."""
        if not question.strip():
            raise InvalidArgument("question is required and must not be blank")
        limit = self._limits.max_query_tokens
        if len(question) > MAX_QUESTION_CHARS:
            raise InvalidArgument(f"question is {len(question)} characters; keep it under {limit} tokens")
        tokenizer = await self._facts.tokenizer()
        if self._template_tokens is None:
            self._template_tokens = len(await asyncio.to_thread(chat_prompt, tokenizer, ""))
        prompt_ids = await asyncio.to_thread(chat_prompt, tokenizer, question)
        tokens = len(prompt_ids) - self._template_tokens
        if tokens > limit:
            raise InvalidArgument(f"question is {tokens} tokens, over the limit of {limit}; shorten it")
        return tuple(prompt_ids)

    @staticmethod
    def _adapter(principal: Principal, tenant: str, name: str) -> tuple[str | None, str | None]:
        """(adapter, pinned version) of ``tenants/{t}/adapters/{a}[/versions/{v}]``; (None, None) for ""."""
        if not name:
            return None, None
        collections = ("tenants", "adapters", "versions") if "/versions/" in name else ("tenants", "adapters")
        ids = owned(principal, "adapter", name, collections)
        if ids[0] != tenant:
            raise InvalidArgument(f"adapter: {keys.show(name)} is not under {tenant_name(tenant)}")
        return ids[1], ids[2] if len(ids) == 3 else None

    def _sampling(self, sampling: lloco_pb2.SamplingParams | None) -> SamplingParams:
        sampling = sampling or lloco_pb2.SamplingParams()
        limit = self._limits.max_new_tokens
        if sampling.max_new_tokens < 0 or sampling.max_new_tokens > limit:
            raise InvalidArgument(
                f"sampling.max_new_tokens must be 0 (default) to {limit}, got {sampling.max_new_tokens}"
            )
        if not math.isfinite(sampling.temperature) or sampling.temperature < 0:
            raise InvalidArgument(
                f"sampling.temperature must be a finite number >= 0, got {sampling.temperature}"
            )
        if not math.isfinite(sampling.top_p) or not 0 <= sampling.top_p <= 1:
            raise InvalidArgument(f"sampling.top_p must be in (0, 1] (0 means 1), got {sampling.top_p}")
        if len(sampling.stop) > MAX_STOP_SEQUENCES:
            raise InvalidArgument(
                f"sampling.stop: at most {MAX_STOP_SEQUENCES} sequences, got {len(sampling.stop)}"
            )
        for stop in sampling.stop:
            if not stop or len(stop) > MAX_STOP_CHARS:
                raise InvalidArgument(
                    f"sampling.stop: each sequence must be 1 to {MAX_STOP_CHARS} characters"
                )
        return SamplingParams(
            max_new_tokens=sampling.max_new_tokens or limit,
            temperature=sampling.temperature,
            top_p=sampling.top_p or 1.0,
            stop=tuple(sampling.stop),
            seed=sampling.seed if sampling.HasField("seed") else None,
        )
