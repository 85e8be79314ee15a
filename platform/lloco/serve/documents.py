"""The edge's reads and writes of tenants' documents: texts to ingest (inline or from the tenant's uploads
folder), the document quota, and which documents have a fresh compressed context.

Every store call runs in its tenant's lane of ``TenantWork``, so one tenant's fan-out never queues ahead
of another tenant's calls.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from lloco.api import lloco_pb2
from lloco.config import LimitSettings
from lloco.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from lloco.registry import ContextInfo, DocumentInfo, Registry
from lloco.serve.edge import TenantWork
from lloco.serve.names import tenant_name
from lloco.storage import ObjectStore, keys


class EdgeDocuments:
    """Documents of the caller's tenant, through ``work``; contexts are those of the engine's compressor
    (``compressor_id``, asked once)."""

    def __init__(
        self,
        store: ObjectStore,
        limits: LimitSettings,
        work: TenantWork,
        compressor_id: Callable[[], Awaitable[str]],
    ) -> None:
        self._store, self._limits, self._work, self._compressor_id = store, limits, work, compressor_id

    async def get(self, registry: Registry, doc_ids: Iterable[str]) -> list[DocumentInfo]:
        """The documents of ``doc_ids``; NotFound names the first missing one."""
        return await self._work.map(registry.tenant, registry.get_document, doc_ids)

    async def get_or_none(self, registry: Registry, doc_id: str) -> DocumentInfo | None:
        return await self._work.run(registry.tenant, _document_or_none, registry, doc_id)

    async def contexts(self, registry: Registry, documents: list[DocumentInfo]) -> list[ContextInfo | None]:
        """Each document's compressed context if it is of the document's current text, else None (pending)."""
        compressor_id = await self._compressor_id()
        infos = await self._work.map(
            registry.tenant, lambda document: registry.context_info(document.doc_id, compressor_id), documents
        )
        return [
            info if info is not None and info.source_sha == document.sha256 else None
            for info, document in zip(infos, documents, strict=True)
        ]

    async def context(self, registry: Registry, document: DocumentInfo) -> ContextInfo | None:
        return (await self.contexts(registry, [document]))[0]

    async def pending(
        self, registry: Registry, doc_ids: list[str]
    ) -> tuple[list[DocumentInfo], list[DocumentInfo]]:
        """The documents of ``doc_ids`` and those of them without a fresh context; with no ids, every
        pending document of the tenant (twice)."""
        if not doc_ids:
            pending = await self._work.run(
                registry.tenant, registry.pending_documents, await self._compressor_id()
            )
            return pending, pending
        infos = await self.get(registry, doc_ids)
        contexts = await self.contexts(registry, infos)
        return infos, [info for info, context in zip(infos, contexts, strict=True) if context is None]

    async def require_compressed(self, registry: Registry, doc_ids: Iterable[str], whose: str) -> None:
        """NotFound for a missing document, FailedPrecondition for one without a fresh context."""
        documents = await self.get(registry, doc_ids)
        for document, context in zip(documents, await self.contexts(registry, documents), strict=True):
            if context is None:
                raise FailedPrecondition(
                    f"document {document.doc_id!r} {whose} has no fresh compressed context; "
                    "call CompressDocuments and wait for it first"
                )

    async def source_text(self, tenant: str, request: lloco_pb2.IngestDocumentRequest) -> bytes:
        """The bytes to ingest: ``content``, or the object ``source_uri`` names, within the size limit."""
        source = request.WhichOneof("source")
        limit = self._limits.max_document_bytes
        if source is None:
            raise InvalidArgument("one of content or source_uri is required")
        if source == "content":
            if len(request.content) > limit:
                raise InvalidArgument(
                    f"content is {len(request.content)} bytes, over the limit of {limit} bytes"
                )
            return request.content
        key = self._upload_key(tenant, request.source_uri)
        return await self._work.run(tenant, self._read_limited, key, limit)

    async def check_quota(self, registry: Registry) -> None:
        """ResourceExhausted when the tenant holds its limit of documents already."""
        limit = self._limits.max_documents
        prefix = keys.docs_prefix(registry.tenant)
        held = await self._work.run(
            registry.tenant, lambda: sum(1 for _ in self._store.list_children(prefix, limit=limit))
        )
        if held >= limit:
            raise ResourceExhausted(
                f"{tenant_name(registry.tenant)} holds {held} documents, its limit; delete some first"
            )

    def _upload_key(self, tenant: str, uri: str) -> str:
        """The store key of a ``source_uri``, which must name an object in the caller's uploads folder.

        The URI's key is normalised first (no ``//``, ``.``/``..``, backslash, ``%``-escape or control
        character: INVALID_ARGUMENT), so what is checked is the key the store will read.
        """
        key = self._store.key_of_uri(uri, "source_uri")
        uploads = keys.uploads_prefix(tenant, self._store.settings.uploads_template)
        if not key.startswith(uploads):
            raise PermissionDenied(
                f"source_uri {keys.show(uri)} is outside {tenant_name(tenant)}'s uploads folder: "
                f"upload the text under {self._store.uri(uploads)!r} and name it there"
            )
        return key

    def _read_limited(self, key: str, limit: int) -> bytes:
        try:
            with self._store.open_stream(key) as stream:
                data = stream.read(limit + 1)
        except NotFound:
            raise NotFound("no object at source_uri") from None
        if len(data) > limit:
            raise InvalidArgument(f"the object at source_uri is over the limit of {limit} bytes")
        return data


def _document_or_none(registry: Registry, doc_id: str) -> DocumentInfo | None:
    try:
        return registry.get_document(doc_id)
    except NotFound:
        return None
