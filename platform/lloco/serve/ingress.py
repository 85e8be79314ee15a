"""The gRPC edge of the Serve app: every `lloco.v1.LlocoService` RPC, and `grpc.health.v1` health.

Each `Ingress` replica runs the API's gRPC server (`lloco.serve.server`: bind address, TLS, message
cap, authentication before the message is read), which calls the method of `Ingress` named like the
RPC with the parsed request and a `CallContext` (the authenticated caller, metadata in, status out).
Each RPC resolves the resource names it was sent to ids of the caller's own tenant (a name under
another tenant is PERMISSION_DENIED before anything is read), validates every field, applies the
tenant's limits, then works through the registry (documents, adapters, datasets) or the engine
deployment (compression, queries); its object-store work runs through `TenantWork`, at most a few
calls of one tenant at a time. Errors of all RPCs become gRPC statuses in one place,
`lloco.serve.edge.grpc_status`, applied by `rpc`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import inspect
import math
import shlex
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle

from lloco.api import lloco_pb2
from lloco.auth import ApiKeyInfo, KeyRing, Principal
from lloco.config import Settings
from lloco.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from lloco.logs import get_logger
from lloco.model import SamplingParams
from lloco.registry import AdapterVersion, ContextInfo, DocumentInfo, Registry, Tenants, document_text
from lloco.serve.edge import TenantWork, domain_error, grpc_status
from lloco.serve.engine_core import EngineEvent, EngineRequest, QueryStats
from lloco.serve.server import start_server
from lloco.storage import ObjectStore, keys

log = get_logger(__name__)

SERVICE = "lloco.v1.LlocoService"
DEFAULT_PAGE_SIZE = 100
MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 256
MAX_QUESTION_CHARS = 64 * 1024  # checked before tokenizing, so a huge question costs nothing
HEALTH_TIMEOUT_S = 5.0
HEALTH_WATCH_PERIOD_S = 5.0
HEALTH_WATCH_MAX_S = 30.0
SHUTDOWN_GRACE_S = 5.0

# -- errors: the one place where exceptions become gRPC statuses ------------------------------------


def _reply_types() -> dict[str, type[Message]]:
    """The reply message class of every RPC the ingress serves, by method name."""
    types: dict[str, type[Message]] = {}
    for module, service in ((lloco_pb2, "LlocoService"), (health_pb2, "Health")):
        for method in module.DESCRIPTOR.services_by_name[service].methods:
            types[method.name] = getattr(module, method.output_type.name)
    return types


_REPLY_TYPES = _reply_types()


def rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run an RPC method, turning any exception into the gRPC status and message the caller sees.

    Unary methods answer an empty reply with the status set; streaming methods set the status and
    re-raise, which ends the stream with it. Cancellation passes through untouched.
    """
    name = method.__name__
    reply_type = _REPLY_TYPES[name]

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def streaming(
            self: Ingress, request: Message, grpc_context: Any = None
        ) -> AsyncIterator[Message]:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                async for reply in method(self, request, grpc_context):
                    yield reply
            except Exception as error:
                code, details = grpc_status(name, error)
                if grpc_context is not None:
                    grpc_context.set_code(code)
                    grpc_context.set_details(details)
                raise
            finally:
                self.record(name, code, started)

        return streaming

    @functools.wraps(method)
    async def unary(self: Ingress, request: Message, grpc_context: Any = None) -> Message:
        started = time.perf_counter()
        try:
            reply = await method(self, request, grpc_context)
        except Exception as error:
            code, details = grpc_status(name, error)
            self.record(name, code, started)
            if grpc_context is None:
                raise
            grpc_context.set_code(code)
            grpc_context.set_details(details)
            return reply_type()
        self.record(name, grpc.StatusCode.OK, started)
        return reply

    return unary


# -- resource names -----------------------------------------------------------------------------


def parse_name(field: str, value: str, collections: tuple[str, ...]) -> list[str]:
    """The ids of a resource name: ``collections=("tenants", "documents")`` parses
    ``tenants/{tenant}/documents/{document}`` into ``[tenant, document]``."""
    template = "/".join(f"{c}/{{{c[:-1]}}}" for c in collections)
    if not value:
        raise InvalidArgument(f"{field} is required: a name of the form {template!r}")
    parts = value.split("/")
    if len(parts) != 2 * len(collections) or tuple(parts[0::2]) != collections:
        raise InvalidArgument(f"{field} {keys.show(value)} is not a name of the form {template!r}")
    ids = parts[1::2]
    try:
        for collection, value_id in zip(collections, ids, strict=True):
            if collection == "versions":
                keys.validate_version(value_id)
            else:
                keys.validate_id(collection[:-1], value_id)
    except InvalidArgument as error:
        raise InvalidArgument(f"{field}: {error}") from None
    return ids


def tenant_name(tenant: str) -> str:
    return f"tenants/{tenant}"


def document_name(tenant: str, doc_id: str) -> str:
    return f"tenants/{tenant}/documents/{doc_id}"


def adapter_name(tenant: str, adapter: str) -> str:
    return f"tenants/{tenant}/adapters/{adapter}"


def version_name(tenant: str, adapter: str, version: str) -> str:
    return f"tenants/{tenant}/adapters/{adapter}/versions/{version}"


def job_name(tenant: str, job_id: str) -> str:
    return f"tenants/{tenant}/jobs/{job_id}"


def api_key_name(tenant: str, key_id: str) -> str:
    return f"tenants/{tenant}/apiKeys/{key_id}"


# -- paging ----------------------------------------------------------------------------------------


def _page_size(requested: int, maximum: int) -> int:
    """AIP-158: 0 is the default, negative is an error, over the maximum is lowered to it."""
    if requested < 0:
        raise InvalidArgument(f"page_size must be >= 0, got {requested}")
    return min(requested or DEFAULT_PAGE_SIZE, maximum)


def _page_token(collection: str, last: str) -> str:
    return base64.urlsafe_b64encode(f"{collection}:{last}".encode()).decode()


def _after(collection: str, token: str) -> str | None:
    """The last id of the previous page, from a token that a List call of ``collection`` issued."""
    if not token:
        return None
    try:
        kind, _, last = base64.urlsafe_b64decode(token.encode("ascii")).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeError, ValueError):
        kind, last = "", ""
    if kind != collection or not last:
        raise InvalidArgument(
            f"page_token {keys.show(token)} was not issued by this List call; start from ''"
        )
    return last


def paginate(
    collection: str, ids: Iterable[str], size: int, token: str, newest_first: bool = False
) -> tuple[list[str], str]:
    """One page of ``ids`` (ascending, or descending with ``newest_first``) and the next page's token."""
    after = _after(collection, token)
    ordered = sorted(ids, reverse=newest_first)
    if after is not None:
        ordered = [i for i in ordered if (i < after if newest_first else i > after)]
    page = ordered[:size]
    return page, _page_token(collection, page[-1]) if len(ordered) > size else ""


# -- replies -------------------------------------------------------------------------------------


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def document_reply(info: DocumentInfo, context: ContextInfo | None) -> lloco_pb2.Document:
    return lloco_pb2.Document(
        name=document_name(info.tenant, info.doc_id),
        sha256=info.sha256,
        size_bytes=info.bytes,
        tokens=info.tokens or 0,
        context_state=lloco_pb2.CONTEXT_STATE_COMPRESSED if context else lloco_pb2.CONTEXT_STATE_PENDING,
        context_tokens=context.n_vectors if context else 0,
        create_time=_timestamp(info.created),
        update_time=_timestamp(info.updated),
    )


def version_reply(version: AdapterVersion) -> lloco_pb2.AdapterVersion:
    return lloco_pb2.AdapterVersion(
        name=version_name(version.tenant, version.name, version.version),
        base_model=version.base_model,
        rank=version.rank,
        current=version.current,
        create_time=_timestamp(version.created),
        train_info={str(k): str(v) for k, v in version.train.items()},
    )


def adapter_reply(tenant: str, name: str, versions: list[AdapterVersion]) -> lloco_pb2.Adapter:
    current = next((v for v in versions if v.current), None)
    return lloco_pb2.Adapter(
        name=adapter_name(tenant, name),
        current_version=version_reply(current) if current else None,
        version_count=len(versions),
    )


def api_key_reply(info: ApiKeyInfo) -> lloco_pb2.ApiKey:
    return lloco_pb2.ApiKey(
        name=api_key_name(info.tenant, info.key_id), hint=info.hint, create_time=_timestamp(info.created)
    )


_FINISH_REASONS = {
    "stop": lloco_pb2.FINISH_REASON_STOP,
    "length": lloco_pb2.FINISH_REASON_LENGTH,
    "cancelled": lloco_pb2.FINISH_REASON_CANCELLED,
}


@dataclass
class _Clock:
    """Timings as the caller sees them: from the request's arrival at the edge."""

    arrived: float
    first_token: float | None = None

    def token(self) -> None:
        self.first_token = self.first_token or time.perf_counter()


def stats_reply(tenant: str, adapter: str | None, stats: QueryStats, clock: _Clock) -> lloco_pb2.QueryStats:
    done = time.perf_counter()
    version = stats.adapter_version
    return lloco_pb2.QueryStats(
        prompt_tokens=stats.prompt_tokens,
        context_tokens=stats.context_tokens,
        document_tokens=stats.document_tokens,
        generated_tokens=stats.generated_tokens,
        adapter_version=version_name(tenant, adapter, version) if adapter and version else "",
        time_to_first_token=_duration((clock.first_token or done) - clock.arrived),
        total_time=_duration(done - clock.arrived),
    )


# -- the deployment ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Query:
    """A validated query, ready for the engine."""

    request: EngineRequest
    multiplexed_model_id: str


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Ingress:
    """Authenticates, validates and limits every call, then serves it from the registry or the engine."""

    async def __init__(self, engine: DeploymentHandle, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings
        self._limits = settings.limits
        self._store = ObjectStore(settings.store)
        # health probes: one quick attempt, so a dead store shows as NOT_SERVING in seconds
        self._probe_store = ObjectStore(
            settings.store.model_copy(
                update={"connect_timeout_s": 1.0, "read_timeout_s": 2.0, "max_attempts": 1}
            )
        )
        self._keys = KeyRing(self._store, settings.admin_key)
        self._tenants = Tenants(self._store)
        self._inflight: dict[str, int] = {}
        self._engine_tokenizer: Any = None
        self._compressor_id: str | None = None
        self._engine_facts_lock = asyncio.Lock()
        self._requests = metrics.Counter(
            "lloco_edge_requests", "RPCs answered, by method and status code.", tag_keys=("method", "code")
        )
        self._latency = metrics.Histogram(
            "lloco_edge_request_seconds",
            "Time at the edge per RPC (streams: until the last message).",
            [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
            tag_keys=("method",),
        )
        self._work = TenantWork(settings.limits.tenant_storage_concurrency)
        self._server = await start_server(self, settings)

    async def __del__(self) -> None:
        """Serve calls this when it stops the replica: finish running calls for a moment, then close."""
        await self._server.stop(SHUTDOWN_GRACE_S)
        self._work.close()

    def record(self, method: str, code: grpc.StatusCode, started: float) -> None:
        """Count an answered RPC and its time at the edge (Ray metrics)."""
        self._requests.inc(tags={"method": method, "code": code.name})
        self._latency.observe(time.perf_counter() - started, tags={"method": method})

    # -- who is calling, and may it touch this tenant ----------------------------------------------

    async def authenticate(self, metadata: Sequence[tuple[str, Any]]) -> Principal:
        """The caller holding the bearer key of ``metadata``; Unauthenticated if there is none or it is
        unknown. The gRPC server calls this before it reads the request message."""
        value = dict(metadata).get("authorization", "")
        if not value:
            raise Unauthenticated("missing 'authorization: Bearer <api key>' metadata")
        scheme, _, key = value.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("malformed 'authorization' metadata: expected 'Bearer <api key>'")
        key = key.strip()
        lane = f"key:{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"
        return await self._work.run(lane, self._keys.resolve, key)

    async def _caller(self, grpc_context: Any) -> Principal:
        """The caller the server authenticated, or (a call through a handle) the one of its metadata."""
        principal = getattr(grpc_context, "principal", None)
        if principal is not None:
            return principal
        return await self.authenticate(grpc_context.invocation_metadata() if grpc_context is not None else ())

    @staticmethod
    def _authorize(principal: Principal, tenant: str) -> None:
        if not principal.admin and principal.tenant != tenant:
            raise PermissionDenied(
                f"this API key cannot act on {tenant_name(tenant)}: it belongs to another tenant"
            )

    def _owned(self, principal: Principal, field: str, name: str, collections: tuple[str, ...]) -> list[str]:
        """The ids of ``name``, once the caller is allowed to act on its tenant."""
        ids = parse_name(field, name, collections)
        self._authorize(principal, ids[0])
        return ids

    async def _registry(self, tenant: str) -> Registry:
        return await self._work.run(tenant, Registry, self._store, tenant)

    async def _tenant(self, principal: Principal, field: str, name: str) -> Registry:
        (tenant,) = self._owned(principal, field, name, ("tenants",))
        return await self._registry(tenant)

    def _same_tenant(self, principal: Principal, tenant: str, field: str, name: str, collection: str) -> str:
        """The id of a ``tenants/{t}/{collection}/{id}`` name that must lie under ``tenant``."""
        owner, value_id = self._owned(principal, field, name, ("tenants", collection))
        if owner != tenant:
            raise InvalidArgument(f"{field}: {keys.show(name)} is not under {tenant_name(tenant)}")
        return value_id

    # -- tokens and compression ----------------------------------------------------------------------

    async def _tokenizer(self) -> Any:
        """The engine's tokenizer, fetched once, so limits are counted in the tokens the engine will see."""
        async with self._engine_facts_lock:
            if self._engine_tokenizer is None:
                self._engine_tokenizer = await self._engine.tokenizer.remote()
        return self._engine_tokenizer

    async def _count_tokens(self, text: str) -> int:
        tokenizer = await self._tokenizer()
        return await asyncio.to_thread(lambda: len(tokenizer(text, add_special_tokens=False)["input_ids"]))

    async def _compressor(self) -> str:
        """The id the engine's contexts are stored under, fetched once (fixed for the app's life)."""
        async with self._engine_facts_lock:
            if self._compressor_id is None:
                self._compressor_id = await self._engine.compressor_id.remote()
        return self._compressor_id

    async def compressor_id(self) -> str:
        """The engine's compressor id, for local tools through a handle (the gRPC proxy never routes here)."""
        return await self._compressor()

    async def _context(self, registry: Registry, document: DocumentInfo) -> ContextInfo | None:
        """The document's compressed context if it is of the document's current text, else None (pending)."""
        return (await self._contexts(registry, [document]))[0]

    async def _contexts(self, registry: Registry, documents: list[DocumentInfo]) -> list[ContextInfo | None]:
        compressor_id = await self._compressor()
        infos = await self._work.map(
            registry.tenant, lambda document: registry.context_info(document.doc_id, compressor_id), documents
        )
        return [
            info if info is not None and info.source_sha == document.sha256 else None
            for info, document in zip(infos, documents, strict=True)
        ]

    async def _documents(self, registry: Registry, doc_ids: Iterable[str]) -> list[DocumentInfo]:
        """The documents of ``doc_ids``; NotFound names the first missing one."""
        return await self._work.map(registry.tenant, registry.get_document, doc_ids)

    async def _compress_now(self, tenant: str, doc_ids: list[str]) -> list[ContextInfo]:
        return await self._engine.compress.remote(tenant, doc_ids)

    # -- identity and administration -----------------------------------------------------------------

    @rpc
    async def GetCaller(
        self, request: lloco_pb2.GetCallerRequest, grpc_context: Any = None
    ) -> lloco_pb2.GetCallerResponse:
        principal = await self._caller(grpc_context)
        return lloco_pb2.GetCallerResponse(
            tenant=tenant_name(principal.tenant) if principal.tenant else "", admin=principal.admin
        )

    @rpc
    async def CreateTenant(
        self, request: lloco_pb2.CreateTenantRequest, grpc_context: Any = None
    ) -> lloco_pb2.CreateTenantResponse:
        principal = await self._caller(grpc_context)
        if not principal.admin:
            raise PermissionDenied("only the admin key can create tenants")
        tenant = _field_id("tenant_id", "tenant", request.tenant_id)
        await self._work.run(tenant, self._tenants.create, tenant)
        key, info = await self._work.run(tenant, self._keys.issue_key, tenant)
        return lloco_pb2.CreateTenantResponse(
            tenant=lloco_pb2.Tenant(name=tenant_name(tenant)), api_key=key, key=api_key_reply(info)
        )

    @rpc
    async def DeleteTenant(
        self, request: lloco_pb2.DeleteTenantRequest, grpc_context: Any = None
    ) -> lloco_pb2.DeleteTenantResponse:
        principal = await self._caller(grpc_context)
        if not principal.admin:
            raise PermissionDenied("only the admin key can delete tenants")
        (tenant,) = parse_name("name", request.name, ("tenants",))
        removed = await self._work.run(tenant, self._tenants.delete, tenant)
        try:  # the engine replica this reaches drops its cached state now; the others never match it
            await self._engine.forget_tenant.remote(tenant)
        except Exception as error:  # noqa: BLE001 - the tenant is deleted; caches are keyed by its uid
            log.warning(
                "engine did not forget a deleted tenant", tenant=tenant, error=repr(domain_error(error))
            )
        return lloco_pb2.DeleteTenantResponse(deleted_objects=removed)

    @rpc
    async def CreateApiKey(
        self, request: lloco_pb2.CreateApiKeyRequest, grpc_context: Any = None
    ) -> lloco_pb2.CreateApiKeyResponse:
        principal = await self._caller(grpc_context)
        (tenant,) = self._owned(principal, "parent", request.parent, ("tenants",))
        key, info = await self._work.run(tenant, self._keys.issue_key, tenant)
        return lloco_pb2.CreateApiKeyResponse(api_key=key, key=api_key_reply(info))

    @rpc
    async def ListApiKeys(
        self, request: lloco_pb2.ListApiKeysRequest, grpc_context: Any = None
    ) -> lloco_pb2.ListApiKeysResponse:
        principal = await self._caller(grpc_context)
        registry = await self._tenant(principal, "parent", request.parent)
        size = _page_size(request.page_size, self._limits.max_page_size)
        found = {
            info.key_id: info
            for info in await self._work.run(registry.tenant, self._keys.list_keys, registry.tenant)
        }
        page, token = paginate("apiKeys", found, size, request.page_token)
        return lloco_pb2.ListApiKeysResponse(
            api_keys=[api_key_reply(found[k]) for k in page], next_page_token=token
        )

    @rpc
    async def RevokeApiKey(
        self, request: lloco_pb2.RevokeApiKeyRequest, grpc_context: Any = None
    ) -> lloco_pb2.RevokeApiKeyResponse:
        principal = await self._caller(grpc_context)
        tenant, key_id = self._owned(principal, "name", request.name, ("tenants", "apiKeys"))
        await self._work.run(tenant, self._keys.revoke_id, tenant, key_id)
        return lloco_pb2.RevokeApiKeyResponse()

    # -- documents -------------------------------------------------------------------------------------

    @rpc
    async def IngestDocument(
        self, request: lloco_pb2.IngestDocumentRequest, grpc_context: Any = None
    ) -> lloco_pb2.IngestDocumentResponse:
        principal = await self._caller(grpc_context)
        registry = await self._tenant(principal, "parent", request.parent)
        doc_id = _field_id("document_id", "document", request.document_id)
        text = await self._source_text(registry.tenant, request)
        decoded = document_text(doc_id, text)
        previous = await self._work.run(registry.tenant, _document_or_none, registry, doc_id)
        if previous is None:
            await self._check_document_quota(registry)
        tokens = await self._count_tokens(decoded)
        info, changed = await self._work.run(
            registry.tenant, registry.ingest_document, doc_id, text, self._limits.max_document_bytes, tokens
        )
        outcome = (
            lloco_pb2.INGEST_OUTCOME_CREATED
            if previous is None
            else lloco_pb2.INGEST_OUTCOME_UPDATED
            if changed
            else lloco_pb2.INGEST_OUTCOME_UNCHANGED
        )
        context = await self._context(registry, info)
        if context is None and tokens <= self._limits.online_compress_max_tokens:
            (context,) = await self._compress_now(registry.tenant, [doc_id])
        return lloco_pb2.IngestDocumentResponse(document=document_reply(info, context), outcome=outcome)

    async def _source_text(self, tenant: str, request: lloco_pb2.IngestDocumentRequest) -> bytes:
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

    async def _check_document_quota(self, registry: Registry) -> None:
        limit = self._limits.max_documents
        prefix = keys.docs_prefix(registry.tenant)
        held = await self._work.run(
            registry.tenant, lambda: sum(1 for _ in self._store.list_children(prefix, limit=limit))
        )
        if held >= limit:
            raise ResourceExhausted(
                f"{tenant_name(registry.tenant)} holds {held} documents, its limit; delete some first"
            )

    @rpc
    async def GetDocument(
        self, request: lloco_pb2.GetDocumentRequest, grpc_context: Any = None
    ) -> lloco_pb2.GetDocumentResponse:
        principal = await self._caller(grpc_context)
        tenant, doc_id = self._owned(principal, "name", request.name, ("tenants", "documents"))
        registry = await self._registry(tenant)
        info = await self._work.run(tenant, registry.get_document, doc_id)
        return lloco_pb2.GetDocumentResponse(
            document=document_reply(info, await self._context(registry, info))
        )

    @rpc
    async def ListDocuments(
        self, request: lloco_pb2.ListDocumentsRequest, grpc_context: Any = None
    ) -> lloco_pb2.ListDocumentsResponse:
        principal = await self._caller(grpc_context)
        registry = await self._tenant(principal, "parent", request.parent)
        size = _page_size(request.page_size, self._limits.max_page_size)
        infos, token = await self._work.run(
            registry.tenant, registry.list_documents, size, request.page_token
        )
        contexts = await self._contexts(registry, infos)
        documents = [document_reply(info, context) for info, context in zip(infos, contexts, strict=True)]
        return lloco_pb2.ListDocumentsResponse(documents=documents, next_page_token=token)

    @rpc
    async def DeleteDocument(
        self, request: lloco_pb2.DeleteDocumentRequest, grpc_context: Any = None
    ) -> lloco_pb2.DeleteDocumentResponse:
        principal = await self._caller(grpc_context)
        tenant, doc_id = self._owned(principal, "name", request.name, ("tenants", "documents"))
        registry = await self._registry(tenant)
        await self._work.run(tenant, registry.delete_document, doc_id)
        return lloco_pb2.DeleteDocumentResponse()

    @rpc
    async def CompressDocuments(
        self, request: lloco_pb2.CompressDocumentsRequest, grpc_context: Any = None
    ) -> lloco_pb2.CompressDocumentsResponse:
        principal = await self._caller(grpc_context)
        limit = self._limits.max_names_per_call
        if len(request.documents) > limit:
            raise InvalidArgument(
                f"documents: {len(request.documents)} names given, at most {limit} per call; "
                "split the work, or name none to compress every pending document"
            )
        registry = await self._tenant(principal, "parent", request.parent)
        tenant = registry.tenant
        doc_ids = [
            self._same_tenant(principal, tenant, "documents", n, "documents") for n in request.documents
        ]
        if len(set(doc_ids)) != len(doc_ids):
            raise InvalidArgument("documents: a document is named more than once")
        compressor_id = await self._compressor()
        if doc_ids:
            infos = await self._documents(registry, doc_ids)
            contexts = await self._contexts(registry, infos)
            pending = [i for i, c in zip(infos, contexts, strict=True) if c is None]
        else:
            pending = await self._work.run(tenant, registry.pending_documents, compressor_id)
            infos = pending
        skipped = [document_name(tenant, i.doc_id) for i in infos if i not in pending]
        created = _now()
        tokens = [i.tokens for i in pending]
        if None in tokens or sum(t or 0 for t in tokens) > self._limits.online_compress_max_tokens:
            job_id = await self._work.run(
                tenant, self._submit_compress_job, tenant, [i.doc_id for i in pending]
            )
            job = lloco_pb2.Job(
                name=job_name(tenant, job_id),
                kind=lloco_pb2.JOB_KIND_COMPRESS,
                state=lloco_pb2.JOB_STATE_QUEUED,
                message=f"{len(pending)} documents queued for the compress job",
                create_time=_timestamp(created),
            )
            return lloco_pb2.CompressDocumentsResponse(job=job)
        contexts = await self._compress_now(tenant, [i.doc_id for i in pending]) if pending else []
        job_id = _new_job_id("compress")
        job = lloco_pb2.Job(
            name=job_name(tenant, job_id),
            kind=lloco_pb2.JOB_KIND_COMPRESS,
            state=lloco_pb2.JOB_STATE_SUCCEEDED,
            message=f"compressed {len(contexts)} documents online",
            create_time=_timestamp(created),
            start_time=_timestamp(created),
            end_time=_timestamp(_now()),
            compress_result=lloco_pb2.CompressResult(
                compressed_documents=[document_name(tenant, c.doc_id) for c in contexts],
                skipped_documents=skipped,
            ),
        )
        # kept so that GetJob answers for it as for a Ray job; deleted with the tenant
        await self._work.run(
            tenant,
            self._store.put_bytes,
            keys.job_record(tenant, job_id),
            job.SerializeToString(),
            "application/x-protobuf",
        )
        return lloco_pb2.CompressDocumentsResponse(job=job)

    # -- queries ------------------------------------------------------------------------------------

    async def _query(
        self, principal: Principal, request: lloco_pb2.QueryRequest | lloco_pb2.QueryStreamRequest
    ) -> _Query:
        (tenant,) = self._owned(principal, "tenant", request.tenant, ("tenants",))
        limit = self._limits.max_docs_per_query
        if len(request.documents) > limit:
            raise InvalidArgument(
                f"documents: {len(request.documents)} given, a query may attach at most {limit}"
            )
        doc_ids = tuple(
            self._same_tenant(principal, tenant, "documents", n, "documents") for n in request.documents
        )
        if len(set(doc_ids)) != len(doc_ids):
            raise InvalidArgument("documents: a document is attached more than once")
        question = await self._question(request.question)
        adapter, version = self._query_adapter(principal, tenant, request.adapter)
        params = self._sampling(request.sampling if request.HasField("sampling") else None)
        engine_request = EngineRequest(
            request_id=uuid.uuid4().hex,
            tenant=tenant,
            doc_ids=doc_ids,
            question=question,
            adapter=adapter,
            adapter_version=version,
            params=params,
        )
        return _Query(engine_request, f"{tenant}/{adapter}" if adapter else "")

    async def _question(self, question: str) -> str:
        if not question.strip():
            raise InvalidArgument("question is required and must not be blank")
        limit = self._limits.max_query_tokens
        if len(question) > MAX_QUESTION_CHARS:
            raise InvalidArgument(f"question is {len(question)} characters; keep it under {limit} tokens")
        tokens = await self._count_tokens(question)
        if tokens > limit:
            raise InvalidArgument(f"question is {tokens} tokens, over the limit of {limit}; shorten it")
        return question

    def _query_adapter(self, principal: Principal, tenant: str, name: str) -> tuple[str | None, str | None]:
        """(adapter, pinned version) of ``tenants/{t}/adapters/{a}[/versions/{v}]``; (None, None) for ""."""
        if not name:
            return None, None
        collections = ("tenants", "adapters", "versions") if "/versions/" in name else ("tenants", "adapters")
        ids = self._owned(principal, "adapter", name, collections)
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

    @asynccontextmanager
    async def _in_flight(self, tenant: str) -> AsyncIterator[None]:
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

    async def _events(self, query: _Query) -> AsyncIterator[EngineEvent]:
        """The engine's events for ``query``; leaving before the last one (the caller went away) cancels
        the request in the engine, which frees its batch row at the next step."""
        handle = self._engine.options(stream=True, multiplexed_model_id=query.multiplexed_model_id)
        async with self._in_flight(query.request.tenant):
            response = handle.generate.remote(query.request)
            complete = False
            try:
                async for event in response:
                    complete = event.final is not None
                    yield event
            finally:
                if not complete:
                    response.cancel()

    @rpc
    async def Query(
        self, request: lloco_pb2.QueryRequest, grpc_context: Any = None
    ) -> lloco_pb2.QueryResponse:
        clock = _Clock(time.perf_counter())
        principal = await self._caller(grpc_context)
        query = await self._query(principal, request)
        answer: list[str] = []
        final: QueryStats | None = None
        async with aclosing(self._events(query)) as events:
            async for event in events:
                if event.token_ids:
                    clock.token()
                answer.append(event.text)
                final = event.final or final
        if final is None:
            raise Unavailable("the engine ended the answer without its final stats; retry")
        return lloco_pb2.QueryResponse(
            answer="".join(answer),
            finish_reason=_FINISH_REASONS[final.finish_reason],
            stats=stats_reply(query.request.tenant, query.request.adapter, final, clock),
        )

    @rpc
    async def QueryStream(
        self, request: lloco_pb2.QueryStreamRequest, grpc_context: Any = None
    ) -> AsyncIterator[lloco_pb2.QueryStreamResponse]:
        clock = _Clock(time.perf_counter())
        principal = await self._caller(grpc_context)
        query = await self._query(principal, request)
        async with aclosing(self._events(query)) as events:
            async for event in events:
                if event.token_ids:
                    clock.token()
                reply = lloco_pb2.QueryStreamResponse(text_delta=event.text, token_ids=event.token_ids)
                if event.final is not None:
                    reply.finish_reason = _FINISH_REASONS[event.final.finish_reason]
                    reply.stats.CopyFrom(
                        stats_reply(query.request.tenant, query.request.adapter, event.final, clock)
                    )
                yield reply

    # -- adapters ---------------------------------------------------------------------------------------

    async def _adapter(self, registry: Registry, name: str) -> lloco_pb2.Adapter:
        versions = await self._work.run(registry.tenant, registry.list_versions, name)
        if not versions:
            raise NotFound(f"adapter {name!r} not found")
        return adapter_reply(registry.tenant, name, versions)

    @rpc
    async def ListAdapters(
        self, request: lloco_pb2.ListAdaptersRequest, grpc_context: Any = None
    ) -> lloco_pb2.ListAdaptersResponse:
        principal = await self._caller(grpc_context)
        registry = await self._tenant(principal, "parent", request.parent)
        size = _page_size(request.page_size, self._limits.max_page_size)
        names, token = paginate(
            "adapters",
            await self._work.run(registry.tenant, registry.list_adapters),
            size,
            request.page_token,
        )
        adapters = [await self._adapter(registry, name) for name in names]
        return lloco_pb2.ListAdaptersResponse(adapters=adapters, next_page_token=token)

    @rpc
    async def GetAdapter(
        self, request: lloco_pb2.GetAdapterRequest, grpc_context: Any = None
    ) -> lloco_pb2.GetAdapterResponse:
        principal = await self._caller(grpc_context)
        tenant, name = self._owned(principal, "name", request.name, ("tenants", "adapters"))
        registry = await self._registry(tenant)
        return lloco_pb2.GetAdapterResponse(adapter=await self._adapter(registry, name))

    @rpc
    async def ListAdapterVersions(
        self, request: lloco_pb2.ListAdapterVersionsRequest, grpc_context: Any = None
    ) -> lloco_pb2.ListAdapterVersionsResponse:
        principal = await self._caller(grpc_context)
        tenant, name = self._owned(principal, "parent", request.parent, ("tenants", "adapters"))
        registry = await self._registry(tenant)
        size = _page_size(request.page_size, self._limits.max_page_size)
        versions = {v.version: v for v in await self._work.run(tenant, registry.list_versions, name)}
        if not versions:
            raise NotFound(f"adapter {name!r} not found")
        page, token = paginate("versions", versions, size, request.page_token, newest_first=True)
        return lloco_pb2.ListAdapterVersionsResponse(
            versions=[version_reply(versions[v]) for v in page], next_page_token=token
        )

    @rpc
    async def SetCurrentAdapter(
        self, request: lloco_pb2.SetCurrentAdapterRequest, grpc_context: Any = None
    ) -> lloco_pb2.SetCurrentAdapterResponse:
        principal = await self._caller(grpc_context)
        tenant, name, version = self._owned(
            principal, "version", request.version, ("tenants", "adapters", "versions")
        )
        registry = await self._registry(tenant)
        await self._work.run(tenant, registry.set_current, name, version)
        return lloco_pb2.SetCurrentAdapterResponse(adapter=await self._adapter(registry, name))

    # -- datasets and jobs -----------------------------------------------------------------------------

    @rpc
    async def UploadDataset(
        self, request: lloco_pb2.UploadDatasetRequest, grpc_context: Any = None
    ) -> lloco_pb2.UploadDatasetResponse:
        principal = await self._caller(grpc_context)
        registry = await self._tenant(principal, "parent", request.parent)
        dataset = _field_id("dataset_id", "dataset", request.dataset_id)
        limit = self._limits.max_document_bytes
        if not request.content:
            raise InvalidArgument(
                'content is required: JSONL rows {"doc_ids": [...], "question": ..., "answer": ...}'
            )
        if len(request.content) > limit:
            raise InvalidArgument(f"content is {len(request.content)} bytes, over the limit of {limit} bytes")
        rows = await self._work.run(registry.tenant, registry.put_dataset, dataset, request.content)
        return lloco_pb2.UploadDatasetResponse(
            dataset=lloco_pb2.Dataset(
                name=f"{tenant_name(registry.tenant)}/datasets/{dataset}", row_count=rows
            )
        )

    @rpc
    async def ListDatasets(
        self, request: lloco_pb2.ListDatasetsRequest, grpc_context: Any = None
    ) -> lloco_pb2.ListDatasetsResponse:
        principal = await self._caller(grpc_context)
        registry = await self._tenant(principal, "parent", request.parent)
        size = _page_size(request.page_size, self._limits.max_page_size)
        names, token = paginate(
            "datasets",
            await self._work.run(registry.tenant, registry.list_datasets),
            size,
            request.page_token,
        )
        prefix = tenant_name(registry.tenant)
        return lloco_pb2.ListDatasetsResponse(
            datasets=[lloco_pb2.Dataset(name=f"{prefix}/datasets/{n}") for n in names], next_page_token=token
        )

    @rpc
    async def SubmitFinetune(
        self, request: lloco_pb2.SubmitFinetuneRequest, grpc_context: Any = None
    ) -> lloco_pb2.SubmitFinetuneResponse:
        from lloco.finetune.job import submit_finetune_job

        principal = await self._caller(grpc_context)
        registry = await self._tenant(principal, "parent", request.parent)
        tenant = registry.tenant
        dataset = self._same_tenant(principal, tenant, "dataset", request.dataset, "datasets")
        adapter = _field_id("adapter_id", "adapter", request.adapter_id or "default")
        rows = await self._work.run(tenant, registry.read_dataset, dataset)
        documents = await self._documents(registry, dict.fromkeys(d for row in rows for d in row.doc_ids))
        for document, context in zip(documents, await self._contexts(registry, documents), strict=True):
            if context is None:
                raise FailedPrecondition(
                    f"document {document.doc_id!r} of dataset {dataset!r} has no fresh compressed context; "
                    "call CompressDocuments and wait for it first"
                )
        created = _now()
        job_id = await self._work.run(
            tenant, submit_finetune_job, _ray_address(), [tenant], dataset, adapter, self._settings
        )
        job = lloco_pb2.Job(
            name=job_name(tenant, job_id),
            kind=lloco_pb2.JOB_KIND_FINETUNE,
            state=lloco_pb2.JOB_STATE_QUEUED,
            message=f"finetuning adapter {adapter!r} on dataset {dataset!r}",
            create_time=_timestamp(created),
        )
        return lloco_pb2.SubmitFinetuneResponse(job=job)

    @rpc
    async def GetJob(
        self, request: lloco_pb2.GetJobRequest, grpc_context: Any = None
    ) -> lloco_pb2.GetJobResponse:
        from lloco.finetune.job import get_job

        principal = await self._caller(grpc_context)
        tenant, job_id = self._owned(principal, "name", request.name, ("tenants", "jobs"))
        record = await self._work.run(tenant, self._job_record, tenant, job_id)
        if record is not None:
            return lloco_pb2.GetJobResponse(job=record)
        registry = await self._registry(tenant)
        metadata = await self._work.run(tenant, _job_metadata, job_id)
        if tenant not in metadata.get("tenants", "").split(","):
            raise NotFound(f"job {job_id!r} not found")  # another tenant's job: as if it did not exist
        state = await self._work.run(tenant, get_job, _ray_address(), job_id)
        if state.create_time is not None and state.create_time < registry.created:
            raise NotFound(f"job {job_id!r} not found")  # a job of a deleted tenant of the same name
        job = lloco_pb2.Job(
            name=job_name(tenant, job_id),
            state=_JOB_STATES[state.state],
            message=state.message,
            create_time=_timestamp(state.create_time),
            start_time=_timestamp(state.start_time),
            end_time=_timestamp(state.end_time),
        )
        if metadata.get("kind") == "compress":
            job.kind = lloco_pb2.JOB_KIND_COMPRESS
            if state.state == "SUCCEEDED":
                result, missed = await self._compress_result(tenant, metadata)
                job.compress_result.CopyFrom(result)
                if missed:
                    job.message = f"not compressed (changed, deleted or failed): {', '.join(missed)}"
        else:
            job.kind = lloco_pb2.JOB_KIND_FINETUNE
            result = (state.results or {}).get(tenant)
            if result is not None and result.ok and result.version:
                job.finetune_result.CopyFrom(
                    lloco_pb2.FinetuneResult(
                        adapter_version=version_name(tenant, result.adapter, result.version),
                        final_loss=float(result.metrics.get("train_loss", 0.0)),
                    )
                )
        return lloco_pb2.GetJobResponse(job=job)

    def _job_record(self, tenant: str, job_id: str) -> lloco_pb2.Job | None:
        """The job as CompressDocuments stored it when it ran online; None for Ray's jobs."""
        try:
            return lloco_pb2.Job.FromString(self._store.get_bytes(keys.job_record(tenant, job_id)))
        except NotFound:
            return None

    async def _compress_result(
        self, tenant: str, metadata: dict[str, str]
    ) -> tuple[lloco_pb2.CompressResult, list[str]]:
        """The documents a finished compress job was queued with: those now compressed, and the rest."""
        registry = await self._registry(tenant)
        compressed, missed = [], []
        for doc_id in filter(None, metadata.get("documents", "").split(",")):
            document = await self._work.run(tenant, _document_or_none, registry, doc_id)
            fresh = document is not None and await self._context(registry, document) is not None
            (compressed if fresh else missed).append(document_name(tenant, doc_id))
        return lloco_pb2.CompressResult(compressed_documents=compressed), missed

    def _submit_compress_job(self, tenant: str, doc_ids: list[str]) -> str:
        """Submit ``lloco compress`` for the tenant (it compresses every pending document) as a Ray job."""
        from ray.job_submission import JobSubmissionClient

        from lloco.finetune.job import settings_env

        job_id = _new_job_id("compress")
        try:
            JobSubmissionClient(_ray_address()).submit_job(
                # this Python, not `lloco` on PATH: the job runs where the venv may not be activated
                entrypoint=shlex.join([sys.executable, "-m", "lloco.cli", "compress", "--tenant", tenant]),
                submission_id=job_id,
                runtime_env={"env_vars": settings_env(self._settings)},
                metadata={"kind": "compress", "tenants": tenant, "documents": ",".join(doc_ids)},
            )
        except (ConnectionError, RuntimeError) as error:  # RuntimeError: the job server answered an error
            log.warning("compress job not submitted", tenant=tenant, error=repr(error))
            raise Unavailable("Ray's job server did not take the compress job; retry shortly") from error
        log.info("compress job submitted", job_id=job_id, tenant=tenant, documents=len(doc_ids))
        return job_id

    # -- grpc.health.v1 ---------------------------------------------------------------------------------

    async def _serving(self) -> int:
        """SERVING when both the engine and the object store answer: without the store every keyed call
        fails, so a load balancer should send callers elsewhere."""
        try:
            await asyncio.wait_for(self._engine.health.remote(), HEALTH_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - any failure of the probe means "not serving"
            log.warning("engine unhealthy", error=repr(domain_error(error)))
            return health_pb2.HealthCheckResponse.NOT_SERVING
        try:
            await asyncio.wait_for(self._work.run(None, self._probe_store.check), HEALTH_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - any failure of the probe means "not serving"
            log.warning("object store unreachable", error=repr(error), cause=repr(error.__cause__))
            return health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse.SERVING

    @rpc
    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None
    ) -> health_pb2.HealthCheckResponse:
        """SERVING while the engine and the object store answer; no key needed (load balancers call it)."""
        if request.service not in ("", SERVICE):
            raise NotFound(f"unknown service {keys.show(request.service)}; ask for '' or {SERVICE!r}")
        return health_pb2.HealthCheckResponse(status=await self._serving())

    @rpc
    async def Watch(
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The serving status now, then every few seconds, for at most `HEALTH_WATCH_MAX_S`; then the stream
        ends (OK) and the caller watches again. The bound stops a watch whose cancellation Serve's proxy
        missed (seen when a client cancels between two messages) from running in the replica forever."""
        if request.service not in ("", SERVICE):
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            return
        deadline = time.monotonic() + HEALTH_WATCH_MAX_S
        while True:
            yield health_pb2.HealthCheckResponse(status=await self._serving())
            if time.monotonic() + HEALTH_WATCH_PERIOD_S > deadline:
                return
            await asyncio.sleep(HEALTH_WATCH_PERIOD_S)


def _field_id(field: str, kind: str, value: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    try:
        return keys.validate_id(kind, value)
    except InvalidArgument as error:
        raise InvalidArgument(f"{field}: {error}") from None


def _now() -> datetime:
    return datetime.now(UTC)


def _ray_address() -> str:
    """The GCS address of the cluster this replica runs in: jobs go to its job server (the dashboard)."""
    import ray

    return ray.get_runtime_context().gcs_address


def _new_job_id(kind: str) -> str:
    return f"{kind}-{_now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def _job_metadata(job_id: str) -> dict[str, str]:
    """The metadata lloco attached to a Ray job when it submitted it; NotFound for an unknown job."""
    from ray.job_submission import JobSubmissionClient

    try:
        info = JobSubmissionClient(_ray_address()).get_job_info(job_id)
    except ConnectionError as error:
        log.warning("job server unreachable", job_id=job_id, error=repr(error))
        raise Unavailable("Ray's job server is unreachable; retry shortly") from error
    except RuntimeError:
        raise NotFound(f"job {job_id!r} not found") from None
    return dict(info.metadata or {})


_JOB_STATES = {
    "QUEUED": lloco_pb2.JOB_STATE_QUEUED,
    "RUNNING": lloco_pb2.JOB_STATE_RUNNING,
    "SUCCEEDED": lloco_pb2.JOB_STATE_SUCCEEDED,
    "FAILED": lloco_pb2.JOB_STATE_FAILED,
    "CANCELLED": lloco_pb2.JOB_STATE_CANCELLED,
}


def _document_or_none(registry: Registry, doc_id: str) -> DocumentInfo | None:
    try:
        return registry.get_document(doc_id)
    except NotFound:
        return None
