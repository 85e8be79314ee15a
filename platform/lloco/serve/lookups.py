"""What the edge remembers of the store, so a repeated query reads nothing from it: who holds an API key,
each tenant's registry (its creation uid), document records and adapter versions.

Every entry has a time to live (`serve.auth_cache_ttl_s` for keys, `serve.metadata_cache_ttl_s` for the
rest). The writes this replica serves update it at once (`key_revoked`, `tenant_changed`,
`document_written`, `document_deleted`, `adapter_changed`); writes elsewhere (another edge replica, a
finetune job publishing a version, tools writing the store) are seen once the entry expires. Entries are
keyed by the tenant's uid, and a tenant key's principal carries the uid it was issued for: a tenant
deleted and created again under its name never meets the old one's entries, and an old key cached here
stops working as soon as this replica sees the new tenant.

Contexts are not looked up here: a document record's sha256 names the only context the engine will use,
and the engine caches contexts under it. Retrieval indexes are (`lloco.serve.retrieval.IndexCache`, the
same TTL, keyed by the tenant's uid): a compression this replica asked the engine for, or a deleted
tenant, drops the tenant's entry at once. A hit of a document deleted or rewritten since its segment was
indexed is never used, whatever the index says: its record's sha256 no longer matches the segment's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

from lloco.auth import KeyRing, Principal
from lloco.config import ServeSettings
from lloco.errors import NotFound, Unauthenticated
from lloco.registry import AdapterVersion, DocumentInfo, Registry
from lloco.registry.index import SegmentIndex
from lloco.serve.caches import LruCache
from lloco.serve.edge import TenantWork
from lloco.serve.engine_core import Resolved
from lloco.serve.retrieval import IndexCache
from lloco.storage import ObjectStore

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

CACHES = ("api_keys", "tenants", "documents", "adapters")  # the `cache` names given to `on_lookup`


class EdgeLookups:
    """Cached answers of the key ring and the registry, read through the tenant's lane of ``work``.

    ``on_lookup(cache, hit)`` is told of every lookup (the edge's metrics).
    """

    def __init__(
        self,
        store: ObjectStore,
        keyring: KeyRing,
        settings: ServeSettings,
        work: TenantWork,
        on_lookup: Callable[[str, bool], None] = lambda cache, hit: None,
    ) -> None:
        self._store, self._keyring, self._work, self._on_lookup = store, keyring, work, on_lookup
        size, ttl = settings.metadata_cache_entries, settings.metadata_cache_ttl_s
        one = lambda _: 1  # noqa: E731 - entries are counted, not weighed
        self._principals: LruCache[bytes, Principal] = LruCache(size, one, settings.auth_cache_ttl_s)
        self._registries: LruCache[str, Registry] = LruCache(size, one, ttl)
        self._documents: LruCache[tuple[str, str, str], DocumentInfo] = LruCache(size, one, ttl)
        self._adapters: LruCache[tuple[str, str, str, str | None], AdapterVersion] = LruCache(size, one, ttl)
        self._indexes = IndexCache(ttl)

    # -- reads ------------------------------------------------------------------------------------------

    async def principal(self, key: str) -> Principal:
        """Who holds ``key``; Unauthenticated for an unknown or revoked one (never remembered)."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        principal = self._get("api_keys", self._principals, digest)
        if principal is None:
            principal = await self._work.run(TenantWork.key_lane(key), self._keyring.resolve, key)
            self._principals.put(digest, principal)
        return principal

    async def registry(self, tenant: str, principal: Principal | None = None) -> Registry:
        """The registry of ``tenant``; NotFound if there is none. For a tenant's own principal, the registry
        of the tenant its key was issued for, else Unauthenticated (the tenant was deleted since)."""
        registry = self._get("tenants", self._registries, tenant)
        uid = principal.tenant_uid if principal is not None and principal.tenant == tenant else None
        if registry is None or (uid is not None and registry.uid != uid):
            registry = await self._work.run(tenant, Registry, self._store, tenant)
            self._registries.put(tenant, registry)
        if uid is not None and registry.uid != uid:
            self.key_revoked(tenant)
            raise Unauthenticated("the API key's tenant no longer exists")
        return registry

    async def resolve(
        self, registry: Registry, doc_ids: Iterable[str], adapter: str | None, version: str | None
    ) -> Resolved:
        """The records a query of ``registry``'s tenant needs; NotFound names a missing document or
        adapter (version)."""
        tenant, uid = registry.tenant, registry.uid
        documents = []
        for doc_id in doc_ids:
            document = self._get("documents", self._documents, (tenant, uid, doc_id))
            if document is None:
                document = await self._work.run(tenant, registry.get_document, doc_id)
                self._documents.put((tenant, uid, doc_id), document)
            documents.append(document)
        adapter_version = None
        if adapter is not None:
            key = (tenant, uid, adapter, version)
            adapter_version = self._get("adapters", self._adapters, key)
            if adapter_version is None:
                adapter_version = await self._work.run(tenant, registry.get_adapter, adapter, version)
                self._adapters.put(key, adapter_version)
        return Resolved(tenant_uid=uid, documents=tuple(documents), adapter=adapter_version)

    async def current_document(self, registry: Registry, doc_id: str) -> DocumentInfo | None:
        """The record of ``doc_id`` (cached as `resolve`'s), or None when it was deleted."""
        try:
            (document,) = (await self.resolve(registry, (doc_id,), None, None)).documents
        except NotFound:
            return None
        return document

    async def index(self, registry: Registry, compressor_id: str) -> SegmentIndex:
        """The tenant's current retrieval index for ``compressor_id``; FailedPrecondition if it has none."""
        return await self._work.run(registry.tenant, self._indexes.get, registry, compressor_id)

    def _get(self, cache: str, entries: LruCache[K, V], key: K) -> V | None:
        value = entries.get(key)
        self._on_lookup(cache, value is not None)
        return value

    # -- writes served by this replica ---------------------------------------------------------------------

    def key_revoked(self, tenant: str) -> None:
        """A key of ``tenant`` was revoked: every key of it is resolved again on its next call."""
        self._principals.drop_items(lambda _, principal: principal.tenant == tenant)

    def tenant_changed(self, tenant: str) -> None:
        """``tenant`` was created or deleted: forget everything of that name."""
        self.key_revoked(tenant)
        self._registries.drop(lambda name: name == tenant)
        for entries in (self._documents, self._adapters):
            entries.drop(lambda key: key[0] == tenant)
        self._indexes.forget_tenant(tenant)

    def index_changed(self, tenant: str) -> None:
        """This replica had documents of ``tenant`` compressed (their segments indexed): load its index again."""
        self._indexes.forget_tenant(tenant)

    def document_written(self, registry: Registry, document: DocumentInfo) -> None:
        """A document was ingested (new or changed text): remember its new record."""
        self._documents.put((registry.tenant, registry.uid, document.doc_id), document)

    def document_deleted(self, tenant: str, doc_id: str) -> None:
        self._documents.drop(lambda key: key[0] == tenant and key[2] == doc_id)

    def adapter_changed(self, tenant: str, name: str) -> None:
        """Adapter ``name`` of ``tenant`` got a new current version (rollback, or a finetune seen to end)."""
        self._adapters.drop(lambda key: key[0] == tenant and key[2] == name)
