"""When the edge compresses documents itself and when it leaves them to a job.

Short documents are compressed online, on the engine replica between decode steps, so a tenant can query
one right after ingesting it (one just ingested is handed to the engine as the edge tokenized it, so it is
tokenized once); anything longer (or of unknown length) goes to a Ray job through `lloco.jobs`. Either way the tenant's retrieval index changes, and this replica's cached copy is dropped.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from lloco.compress import PreparedDocument
from lloco.config import LimitSettings
from lloco.jobs import JobRecord, Jobs
from lloco.registry import ContextInfo, DocumentInfo, Registry, Segment
from lloco.serve.documents import EdgeDocuments
from lloco.serve.edge import TenantWork
from lloco.serve.lookups import EdgeLookups

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle


class EdgeCompression:
    """Compression the edge starts: online on ``engine`` under ``limits.online_compress_max_tokens``, else
    a compress job of ``jobs``."""

    def __init__(
        self,
        engine: DeploymentHandle,
        jobs: Jobs,
        documents: EdgeDocuments,
        lookups: EdgeLookups,
        work: TenantWork,
        limits: LimitSettings,
    ) -> None:
        self._engine, self._jobs, self._documents = engine, jobs, documents
        self._lookups, self._work, self._max_tokens = lookups, work, limits.online_compress_max_tokens

    async def after_ingest(
        self, registry: Registry, info: DocumentInfo, token_ids: list[int], segments: tuple[Segment, ...]
    ) -> ContextInfo | None:
        """The context of a document just ingested (``info``; ``token_ids`` and ``segments``: its text as
        `EngineFacts.tokenize_document` cut it): its fresh one, else one made now if it is short enough,
        else None (pending: a compress job makes it). The engine is handed the tokenized text with the
        stored bytes' sha256, so it neither reads nor tokenizes the document again."""
        context = await self._documents.context(registry, info)
        if context is None and len(token_ids) <= self._max_tokens:
            prepared = PreparedDocument(registry.tenant, info.doc_id, info.sha256, token_ids, segments)
            (context,) = await self._engine.compress.remote(registry.tenant, [info.doc_id], [prepared])
            self._lookups.index_changed(registry.tenant)
        return context

    async def compress(self, registry: Registry, doc_ids: list[str]) -> JobRecord:
        """Compress the pending ones of ``doc_ids`` (every pending document when empty): online when they
        are short in all, else as a job; the job's record either way (an online one is SUCCEEDED)."""
        tenant = registry.tenant
        infos, pending = await self._documents.pending(registry, doc_ids)
        created = datetime.now(UTC)
        tokens = [i.tokens for i in pending]
        pending_ids = [i.doc_id for i in pending]
        if None in tokens or sum(t or 0 for t in tokens) > self._max_tokens:
            return await self._work.run(tenant, self._jobs.submit_compress, tenant, pending_ids)
        contexts = await self._engine.compress.remote(tenant, pending_ids) if pending else []
        self._lookups.index_changed(tenant)
        result = {
            "compressed": [c.doc_id for c in contexts],
            "skipped": [i.doc_id for i in infos if i not in pending],
            "failed": {},
        }
        message = f"compressed {len(contexts)} documents online"
        return await self._work.run(tenant, self._jobs.record_online, tenant, created, result, message)
