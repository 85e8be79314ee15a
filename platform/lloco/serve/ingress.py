"""The gRPC edge of the Serve app: every `lloco.v1.LlocoService` RPC, and `grpc.health.v1` health.

Each `Ingress` replica runs the API's gRPC server (`lloco.serve.server`: bind address, TLS, message
cap, authentication before the message is read), which calls the method of `Ingress` named like the
RPC with the parsed request and a `CallContext` (the authenticated caller, metadata in, status out).
Each handler resolves the names it was sent to ids of the caller's own tenant (`lloco.serve.names`: a
name under another tenant is PERMISSION_DENIED before anything is read), then works through the
registry and `EdgeDocuments` (store work in the tenant's lane of `TenantWork`), the engine deployment
(compression, queries; `Queries` checks them) or `lloco.jobs` (compress and finetune jobs). Errors of all
RPCs become gRPC statuses in one place, `lloco.serve.edge.grpc_status`, applied by `rpc`.

Next to it, each replica runs the OpenAI-compatible HTTP API (`lloco.serve.openai_api` on
`lloco.serve.http`, when ``serve.http_port`` is set), on the same authentication, `Queries`, engine
handle and metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.handle import DeploymentHandle

from lloco.api import lloco_pb2
from lloco.auth import KeyRing, Principal
from lloco.config import Settings
from lloco.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from lloco.jobs import JobRecord, Jobs
from lloco.logs import get_logger
from lloco.registry import Registry, Tenants, document_text, pages
from lloco.serve import DRAIN_POLL_S, replies
from lloco.serve.adapter_import import AdapterImports
from lloco.serve.compression import EdgeCompression
from lloco.serve.documents import EdgeDocuments
from lloco.serve.edge import EdgeMetrics, HealthProbe, TenantWork, bearer_key, domain_error, rpc
from lloco.serve.engine_facts import EngineFacts
from lloco.serve.http import HttpServer, start_http_server
from lloco.serve.lookups import EdgeLookups
from lloco.serve.names import dataset_name, field_id, owned, owned_under, parse_name, tenant_name
from lloco.serve.openai_api import OpenAIApi
from lloco.serve.queries import Queries
from lloco.serve.server import start_server
from lloco.storage import ObjectStore, keys

log = get_logger(__name__)

SERVICE = "lloco.v1.LlocoService"
HEALTH_WATCH_PERIOD_S = 5.0
HEALTH_WATCH_MAX_S = 30.0
SHUTDOWN_GRACE_S = 5.0


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, graceful_shutdown_wait_loop_s=DRAIN_POLL_S)
class Ingress:
    """Authenticates, validates and limits every call, then serves it from the registry, the engine or the
    jobs module."""

    async def __init__(self, engine: DeploymentHandle, settings: Settings) -> None:
        import ray

        # what __del__ stops: Serve calls it on a replica whose __init__ failed too (a port taken, say)
        self._server: grpc.aio.Server | None = None
        self._http: HttpServer | None = None
        self._work = TenantWork(settings.limits.tenant_storage_concurrency)
        self._engine = engine
        self._limits = settings.limits
        self._store = ObjectStore(settings.store)
        self._keys = KeyRing(self._store, settings.admin_key)
        self._tenants = Tenants(self._store)
        # jobs go to the job server (the dashboard) of the cluster this replica runs in
        self._jobs = Jobs(
            settings, self._store, settings.jobs.ray_address or ray.get_runtime_context().gcs_address
        )
        self._facts = EngineFacts(engine)
        self._metrics = EdgeMetrics()
        self._health = HealthProbe(engine, settings.store, self._work)
        self._lookups = EdgeLookups(
            self._store, self._keys, settings.serve, self._work, self._metrics.cache_lookup
        )
        self._documents = EdgeDocuments(self._store, self._limits, self._work, self._facts.compressor_id)
        self._queries = Queries(self._limits, self._lookups, self._facts)
        self._imports = AdapterImports(self._store, self._work, self._documents, self._facts.lora_fit)
        self._compression = EdgeCompression(
            engine, self._jobs, self._documents, self._lookups, self._work, self._limits
        )
        self._server = await start_server(self, settings)
        self._http = await self._start_http(settings) if settings.serve.http_port is not None else None

    async def _start_http(self, settings: Settings) -> HttpServer:
        """The OpenAI-compatible HTTP API, on this replica's authentication, queries and engine handle."""
        api = OpenAIApi(
            authenticate=self.authenticate,
            record=self.record,
            queries=self._queries,
            engine=self._engine,
            lookups=self._lookups,
            work=self._work,
            limits=self._limits,
            max_ongoing_requests=settings.serve.max_ongoing_requests,
        )
        return await start_http_server(api.app(), settings)

    async def __del__(self) -> None:
        """Serve calls this when it stops the replica: finish running calls for a moment, then close."""
        if self._http is not None:
            await self._http.stop(SHUTDOWN_GRACE_S)
        if self._server is not None:
            await self._server.stop(SHUTDOWN_GRACE_S)
        self._work.close()

    def record(self, method: str, code: grpc.StatusCode, started: float) -> None:
        """Count an answered RPC and its time at the edge."""
        self._metrics.record(method, code, started)

    # -- who is calling -------------------------------------------------------------------------------

    async def authenticate(self, metadata: Sequence[tuple[str, Any]]) -> Principal:
        """The caller holding the bearer key of ``metadata``; Unauthenticated if there is none or it is
        unknown. The gRPC server calls this before it reads the request message."""
        return await self._lookups.principal(bearer_key(metadata))

    async def _caller(self, grpc_context: Any) -> Principal:
        """The caller the server authenticated, or (a call through a handle) the one of its metadata."""
        principal = getattr(grpc_context, "principal", None)
        if principal is not None:
            return principal
        return await self.authenticate(grpc_context.invocation_metadata() if grpc_context is not None else ())

    async def _tenant(self, grpc_context: Any, field: str, name: str) -> tuple[Principal, Registry]:
        """The caller and the registry of the tenant ``name`` (``tenants/{t}``) it may act on."""
        principal = await self._caller(grpc_context)
        (tenant,) = owned(principal, field, name, ("tenants",))
        return principal, await self._lookups.registry(tenant, principal)

    async def compressor_id(self) -> str:
        """The engine's compressor id, for local tools through a handle."""
        return await self._facts.compressor_id()

    # -- identity and administration -------------------------------------------------------------------

    @rpc
    async def GetCaller(
        self, request: lloco_pb2.GetCallerRequest, grpc_context: Any = None
    ) -> lloco_pb2.GetCallerResponse:
        principal = await self._caller(grpc_context)
        tenant = tenant_name(principal.tenant) if principal.tenant else ""
        return lloco_pb2.GetCallerResponse(tenant=tenant, admin=principal.admin)

    @rpc
    async def CreateTenant(
        self, request: lloco_pb2.CreateTenantRequest, grpc_context: Any = None
    ) -> lloco_pb2.CreateTenantResponse:
        if not (await self._caller(grpc_context)).admin:
            raise PermissionDenied("only the admin key can create tenants")
        tenant = field_id("tenant_id", "tenant", request.tenant_id)
        await self._work.run(tenant, self._tenants.create, tenant)
        self._lookups.tenant_changed(tenant)
        key, info = await self._work.run(tenant, self._keys.issue_key, tenant)
        return lloco_pb2.CreateTenantResponse(
            tenant=lloco_pb2.Tenant(name=tenant_name(tenant)), api_key=key, key=replies.api_key_reply(info)
        )

    @rpc
    async def DeleteTenant(
        self, request: lloco_pb2.DeleteTenantRequest, grpc_context: Any = None
    ) -> lloco_pb2.DeleteTenantResponse:
        if not (await self._caller(grpc_context)).admin:
            raise PermissionDenied("only the admin key can delete tenants")
        (tenant,) = parse_name("name", request.name, ("tenants",))
        removed = await self._work.run(tenant, self._tenants.delete, tenant)
        self._lookups.tenant_changed(tenant)
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
        (tenant,) = owned(await self._caller(grpc_context), "parent", request.parent, ("tenants",))
        key, info = await self._work.run(tenant, self._keys.issue_key, tenant)
        return lloco_pb2.CreateApiKeyResponse(api_key=key, key=replies.api_key_reply(info))

    @rpc
    async def ListApiKeys(
        self, request: lloco_pb2.ListApiKeysRequest, grpc_context: Any = None
    ) -> lloco_pb2.ListApiKeysResponse:
        _, registry = await self._tenant(grpc_context, "parent", request.parent)
        found = {
            i.key_id: i for i in await self._work.run(registry.tenant, self._keys.list_keys, registry.tenant)
        }
        page, token = pages.paginate("apiKeys", found, self._page_size(request), request.page_token)
        return lloco_pb2.ListApiKeysResponse(
            api_keys=[replies.api_key_reply(found[k]) for k in page], next_page_token=token
        )

    @rpc
    async def RevokeApiKey(
        self, request: lloco_pb2.RevokeApiKeyRequest, grpc_context: Any = None
    ) -> lloco_pb2.RevokeApiKeyResponse:
        principal = await self._caller(grpc_context)
        tenant, key_id = owned(principal, "name", request.name, ("tenants", "apiKeys"))
        await self._work.run(tenant, self._keys.revoke_id, tenant, key_id)
        self._lookups.key_revoked(tenant)
        return lloco_pb2.RevokeApiKeyResponse()

    def _page_size(self, request: Any) -> int:
        return pages.page_size(request.page_size, self._limits.max_page_size)

    # -- documents ---------------------------------------------------------------------------------------

    @rpc
    async def IngestDocument(
        self, request: lloco_pb2.IngestDocumentRequest, grpc_context: Any = None
    ) -> lloco_pb2.IngestDocumentResponse:
        _, registry = await self._tenant(grpc_context, "parent", request.parent)
        doc_id = field_id("document_id", "document", request.document_id)
        text = await self._documents.source_text(registry.tenant, request)
        decoded = document_text(doc_id, text)
        previous = await self._documents.get_or_none(registry, doc_id)
        if previous is None:
            await self._documents.check_quota(registry)
        token_ids, segments = await self._facts.tokenize_document(decoded)
        info, changed = await self._work.run(
            registry.tenant,
            registry.ingest_document,
            doc_id,
            text,
            self._limits.max_document_bytes,
            len(token_ids),
        )
        if changed:
            self._lookups.document_written(registry, info)
        context = await self._compression.after_ingest(registry, info, token_ids, segments)
        return lloco_pb2.IngestDocumentResponse(
            document=replies.document_reply(info, context), outcome=replies.ingest_outcome(previous, changed)
        )

    @rpc
    async def GetDocument(
        self, request: lloco_pb2.GetDocumentRequest, grpc_context: Any = None
    ) -> lloco_pb2.GetDocumentResponse:
        principal = await self._caller(grpc_context)
        tenant, doc_id = owned(principal, "name", request.name, ("tenants", "documents"))
        registry = await self._lookups.registry(tenant, principal)
        info = await self._work.run(tenant, registry.get_document, doc_id)
        context = await self._documents.context(registry, info)
        return lloco_pb2.GetDocumentResponse(document=replies.document_reply(info, context))

    @rpc
    async def ListDocuments(
        self, request: lloco_pb2.ListDocumentsRequest, grpc_context: Any = None
    ) -> lloco_pb2.ListDocumentsResponse:
        _, registry = await self._tenant(grpc_context, "parent", request.parent)
        infos, token = await self._work.run(
            registry.tenant, registry.list_documents, self._page_size(request), request.page_token
        )
        contexts = await self._documents.contexts(registry, infos)
        documents = [replies.document_reply(i, c) for i, c in zip(infos, contexts, strict=True)]
        return lloco_pb2.ListDocumentsResponse(documents=documents, next_page_token=token)

    @rpc
    async def DeleteDocument(
        self, request: lloco_pb2.DeleteDocumentRequest, grpc_context: Any = None
    ) -> lloco_pb2.DeleteDocumentResponse:
        principal = await self._caller(grpc_context)
        tenant, doc_id = owned(principal, "name", request.name, ("tenants", "documents"))
        registry = await self._lookups.registry(tenant, principal)
        await self._work.run(tenant, registry.delete_document, doc_id)
        self._lookups.document_deleted(tenant, doc_id)
        return lloco_pb2.DeleteDocumentResponse()

    @rpc
    async def CompressDocuments(
        self, request: lloco_pb2.CompressDocumentsRequest, grpc_context: Any = None
    ) -> lloco_pb2.CompressDocumentsResponse:
        limit = self._limits.max_names_per_call
        if len(request.documents) > limit:
            raise InvalidArgument(
                f"documents: {len(request.documents)} names given, at most {limit} per call; "
                "split the work, or name none to compress every pending document"
            )
        principal, registry = await self._tenant(grpc_context, "parent", request.parent)
        doc_ids = [
            owned_under(principal, registry.tenant, "documents", n, "documents") for n in request.documents
        ]
        if len(set(doc_ids)) != len(doc_ids):
            raise InvalidArgument("documents: a document is named more than once")
        record = await self._compression.compress(registry, doc_ids)
        return lloco_pb2.CompressDocumentsResponse(job=replies.job_reply(record))

    # -- queries ------------------------------------------------------------------------------------

    @rpc
    async def Query(
        self, request: lloco_pb2.QueryRequest, grpc_context: Any = None
    ) -> lloco_pb2.QueryResponse:
        clock = replies.Clock(time.perf_counter())
        query = await self._queries.check(await self._caller(grpc_context), request)
        sent = time.perf_counter()
        answer = await self._queries.answer(self._engine, query)
        return replies.query_reply(query.request, answer, query.retrieved, clock, sent)

    @rpc
    async def QueryStream(
        self, request: lloco_pb2.QueryStreamRequest, grpc_context: Any = None
    ) -> AsyncIterator[lloco_pb2.QueryStreamResponse]:
        clock = replies.Clock(time.perf_counter())
        query = await self._queries.check(await self._caller(grpc_context), request)
        citations = replies.citations_reply(query.request.tenant, query.retrieved)
        async with aclosing(self._queries.events(self._engine, query)) as events:
            async for event in events:
                if event.token_ids:
                    clock.token()
                yield replies.stream_reply(query.request, event, citations, clock)
                citations = []  # the first message alone

    # -- adapters ---------------------------------------------------------------------------------------

    async def _adapter(self, registry: Registry, name: str) -> lloco_pb2.Adapter:
        versions = await self._work.run(registry.tenant, registry.list_versions, name)
        if not versions:
            raise NotFound(f"adapter {name!r} not found")
        return replies.adapter_reply(registry.tenant, name, versions)

    @rpc
    async def ListAdapters(
        self, request: lloco_pb2.ListAdaptersRequest, grpc_context: Any = None
    ) -> lloco_pb2.ListAdaptersResponse:
        _, registry = await self._tenant(grpc_context, "parent", request.parent)
        names = await self._work.run(registry.tenant, registry.list_adapters)
        page, token = pages.paginate("adapters", names, self._page_size(request), request.page_token)
        adapters = [await self._adapter(registry, name) for name in page]
        return lloco_pb2.ListAdaptersResponse(adapters=adapters, next_page_token=token)

    @rpc
    async def GetAdapter(
        self, request: lloco_pb2.GetAdapterRequest, grpc_context: Any = None
    ) -> lloco_pb2.GetAdapterResponse:
        principal = await self._caller(grpc_context)
        tenant, name = owned(principal, "name", request.name, ("tenants", "adapters"))
        registry = await self._lookups.registry(tenant, principal)
        return lloco_pb2.GetAdapterResponse(adapter=await self._adapter(registry, name))

    @rpc
    async def ListAdapterVersions(
        self, request: lloco_pb2.ListAdapterVersionsRequest, grpc_context: Any = None
    ) -> lloco_pb2.ListAdapterVersionsResponse:
        principal = await self._caller(grpc_context)
        tenant, name = owned(principal, "parent", request.parent, ("tenants", "adapters"))
        registry = await self._lookups.registry(tenant, principal)
        versions = {v.version: v for v in await self._work.run(tenant, registry.list_versions, name)}
        if not versions:
            raise NotFound(f"adapter {name!r} not found")
        size = self._page_size(request)
        page, token = pages.paginate("versions", versions, size, request.page_token, newest_first=True)
        return lloco_pb2.ListAdapterVersionsResponse(
            versions=[replies.version_reply(versions[v]) for v in page], next_page_token=token
        )

    @rpc
    async def SetCurrentAdapter(
        self, request: lloco_pb2.SetCurrentAdapterRequest, grpc_context: Any = None
    ) -> lloco_pb2.SetCurrentAdapterResponse:
        principal = await self._caller(grpc_context)
        collections = ("tenants", "adapters", "versions")
        tenant, name, version = owned(principal, "version", request.version, collections)
        registry = await self._lookups.registry(tenant, principal)
        await self._work.run(tenant, registry.set_current, name, version)
        self._lookups.adapter_changed(tenant, name)
        return lloco_pb2.SetCurrentAdapterResponse(adapter=await self._adapter(registry, name))

    @rpc
    async def ImportAdapter(
        self, request: lloco_pb2.ImportAdapterRequest, grpc_context: Any = None
    ) -> lloco_pb2.ImportAdapterResponse:
        principal = await self._caller(grpc_context)
        tenant, name = owned(principal, "parent", request.parent, ("tenants", "adapters"))
        registry = await self._lookups.registry(tenant, principal)
        version = await self._imports.publish(registry, name, request)
        self._lookups.adapter_changed(tenant, name)
        return lloco_pb2.ImportAdapterResponse(version=replies.version_reply(version))

    # -- datasets and jobs -----------------------------------------------------------------------------

    @rpc
    async def UploadDataset(
        self, request: lloco_pb2.UploadDatasetRequest, grpc_context: Any = None
    ) -> lloco_pb2.UploadDatasetResponse:
        _, registry = await self._tenant(grpc_context, "parent", request.parent)
        dataset = field_id("dataset_id", "dataset", request.dataset_id)
        limit = self._limits.max_document_bytes
        if not request.content:
            raise InvalidArgument(
                'content is required: JSONL rows {"doc_ids": [...], "question": ..., "answer": ...}'
            )
        if len(request.content) > limit:
            raise InvalidArgument(f"content is {len(request.content)} bytes, over the limit of {limit} bytes")
        rows = await self._work.run(registry.tenant, registry.put_dataset, dataset, request.content)
        stored = lloco_pb2.Dataset(name=dataset_name(registry.tenant, dataset), row_count=rows)
        return lloco_pb2.UploadDatasetResponse(dataset=stored)

    @rpc
    async def ListDatasets(
        self, request: lloco_pb2.ListDatasetsRequest, grpc_context: Any = None
    ) -> lloco_pb2.ListDatasetsResponse:
        _, registry = await self._tenant(grpc_context, "parent", request.parent)
        names = await self._work.run(registry.tenant, registry.list_datasets)
        page, token = pages.paginate("datasets", names, self._page_size(request), request.page_token)
        datasets = [lloco_pb2.Dataset(name=dataset_name(registry.tenant, n)) for n in page]
        return lloco_pb2.ListDatasetsResponse(datasets=datasets, next_page_token=token)

    @rpc
    async def SubmitFinetune(
        self, request: lloco_pb2.SubmitFinetuneRequest, grpc_context: Any = None
    ) -> lloco_pb2.SubmitFinetuneResponse:
        principal, registry = await self._tenant(grpc_context, "parent", request.parent)
        tenant = registry.tenant
        dataset = owned_under(principal, tenant, "dataset", request.dataset, "datasets")
        adapter = field_id("adapter_id", "adapter", request.adapter_id or "default")
        rows = await self._work.run(tenant, registry.read_dataset, dataset)
        doc_ids = dict.fromkeys(d for row in rows for d in row.doc_ids)
        await self._documents.require_compressed(registry, doc_ids, f"of dataset {dataset!r}")
        (record,) = await self._work.run(tenant, self._jobs.submit_finetune, [tenant], dataset, adapter)
        return lloco_pb2.SubmitFinetuneResponse(job=replies.job_reply(record))

    @rpc
    async def GetJob(
        self, request: lloco_pb2.GetJobRequest, grpc_context: Any = None
    ) -> lloco_pb2.GetJobResponse:
        tenant, job_id = owned(await self._caller(grpc_context), "name", request.name, ("tenants", "jobs"))
        record = await self._work.run(tenant, self._jobs.get, tenant, job_id)
        self._seen([record])
        return lloco_pb2.GetJobResponse(job=replies.job_reply(record))

    @rpc
    async def ListJobs(
        self, request: lloco_pb2.ListJobsRequest, grpc_context: Any = None
    ) -> lloco_pb2.ListJobsResponse:
        (tenant,) = owned(await self._caller(grpc_context), "parent", request.parent, ("tenants",))
        size = self._page_size(request)
        records, token = await self._work.run(tenant, self._jobs.list, tenant, size, request.page_token)
        self._seen(records)
        return lloco_pb2.ListJobsResponse(jobs=[replies.job_reply(r) for r in records], next_page_token=token)

    def _seen(self, records: list[JobRecord]) -> None:
        """A finetune seen to have succeeded published a new current version: queries through this replica
        use it from now on (elsewhere, once the lookups' entries expire)."""
        for record in records:
            if record.kind == "finetune" and record.state == "SUCCEEDED" and record.result:
                self._lookups.adapter_changed(record.tenant, record.result["adapter"])

    @rpc
    async def CancelJob(
        self, request: lloco_pb2.CancelJobRequest, grpc_context: Any = None
    ) -> lloco_pb2.CancelJobResponse:
        tenant, job_id = owned(await self._caller(grpc_context), "name", request.name, ("tenants", "jobs"))
        record = await self._work.run(tenant, self._jobs.cancel, tenant, job_id)
        return lloco_pb2.CancelJobResponse(job=replies.job_reply(record))

    # -- grpc.health.v1 ---------------------------------------------------------------------------------

    @rpc
    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None
    ) -> health_pb2.HealthCheckResponse:
        """SERVING while the engine and the object store answer; no key needed (load balancers call it)."""
        if request.service not in ("", SERVICE):
            raise NotFound(f"unknown service {keys.show(request.service)}; ask for '' or {SERVICE!r}")
        return health_pb2.HealthCheckResponse(status=await self._health.status())

    @rpc
    async def Watch(
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The serving status now, then every few seconds, for at most `HEALTH_WATCH_MAX_S`; then the stream
        ends (OK) and the caller watches again, so a watch whose caller went away ends by itself."""
        if request.service not in ("", SERVICE):
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            return
        deadline = time.monotonic() + HEALTH_WATCH_MAX_S
        while True:
            yield health_pb2.HealthCheckResponse(status=await self._health.status())
            if time.monotonic() + HEALTH_WATCH_PERIOD_S > deadline:
                return
            await asyncio.sleep(HEALTH_WATCH_PERIOD_S)
