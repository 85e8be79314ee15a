"""The serving edge end to end: real gRPC on loopback into Ray Serve, a real SeaweedFS, a tiny random Llama.

One `EmbeddedStack` serves the whole module: Ray starts once (or the session's running Ray is reused). Answers
over gRPC are compared with the engine run alone (`EngineCore` in this process, same store and weights).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lloco.api import lloco_pb2, lloco_pb2_grpc
from lloco.client import LlocoClient
from lloco.config import EngineSettings, LimitSettings, LoraSettings, ServeSettings, Settings
from lloco.model import SamplingParams
from lloco.ports import free_port
from lloco.registry import Registry
from lloco.serve.local import EmbeddedStack

pytestmark = pytest.mark.timeout(300)

ADMIN_KEY = "admin-key-for-tests"
REPO = Path(__file__).parents[1]
CACHE_TTL_S = 3.0  # the edge's caches (keys, registry records): short, so out-of-band writes are seen in time
MAX_NEW_TOKENS = 1000  # long enough that a cancelled stream is still decoding when it is cancelled
DOCUMENTS = {
    "acme": "The capital of France is Paris. Paris is a large city on a river in the north of the country. "
    * 3,
    "globex": "Rome is the capital of Italy. The old city has many important public places and a long story. "
    * 3,
}


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(
    tiny_settings: Callable[..., Settings], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedStack]:
    data_dir = tmp_path_factory.mktemp("lloco-data")
    settings = tiny_settings(
        data_dir,
        ADMIN_KEY,
        limits=LimitSettings(
            max_document_bytes=16 * 1024,
            max_documents=5,
            max_inflight_requests=4,
            max_query_tokens=64,
            max_new_tokens=MAX_NEW_TOKENS,
            max_docs_per_query=2,
            online_compress_max_tokens=1024,
            max_page_size=50,
        ),
        lora=LoraSettings(max_rank=8, gpu_slots=4, cpu_adapters=8),
        engine=EngineSettings(max_batch_size=4, max_seq_len=1280),
        serve=ServeSettings(
            grpc_port=free_port(),
            http_port=None,
            max_ongoing_requests=64,
            auth_cache_ttl_s=CACHE_TTL_S,
            metadata_cache_ttl_s=CACHE_TTL_S,
        ),
    )
    with EmbeddedStack(settings, num_cpus=4, jobs=False) as running:
        yield running


@pytest.fixture(scope="module")
def keys(stack: EmbeddedStack) -> dict[str, str]:
    """Tenants acme and globex, created through the admin RPC; their API keys."""
    created = {}
    with LlocoClient(stack.address, ADMIN_KEY, tenant="acme") as admin:
        for tenant in DOCUMENTS:
            reply = admin.create_tenant(tenant)
            assert reply.tenant.name == f"tenants/{tenant}"
            created[tenant] = reply.api_key
    return created


@pytest.fixture(scope="module")
def ingested(
    stack: EmbeddedStack, keys: dict[str, str], peft_adapter: Callable[[int], dict[str, bytes]]
) -> dict[str, lloco_pb2.IngestDocumentResponse]:
    """Each tenant ingests its document (compressed online at once) and publishes an adapter 'style'."""
    replies = {}
    for seed, (tenant, text) in enumerate(DOCUMENTS.items(), start=1):
        with LlocoClient(stack.address, keys[tenant]) as client:
            replies[tenant] = client.ingest("notes", text)
        Registry(stack.store, tenant).publish_adapter("style", peft_adapter(seed), train={"seed": seed})
    return replies


def run_engine_alone(stack: EmbeddedStack, requests: list[object]) -> list[tuple[list[int], object]]:
    """The engine without Serve or gRPC: EngineCore in this process on the same store, all requests at once."""
    from lloco.serve.engine import build_engine_core

    async def run() -> list[tuple[list[int], object]]:
        core = build_engine_core(stack.settings)
        await core.start()
        try:

            async def one(request: object) -> tuple[list[int], object]:
                tokens: list[int] = []
                final = None
                async for event in core.generate(request):
                    tokens.extend(event.token_ids)
                    final = event.final or final
                return tokens, final

            return await asyncio.gather(*(one(r) for r in requests))
        finally:
            await core.stop()

    return asyncio.run(run())


def engine_request(tenant: str, question: str, adapter: str | None, max_new_tokens: int) -> object:
    from lloco.serve.engine_core import EngineRequest

    return EngineRequest(
        request_id=uuid.uuid4().hex,
        tenant=tenant,
        doc_ids=("notes",),
        question=question,
        adapter=adapter,
        adapter_version=None,
        params=SamplingParams(max_new_tokens=max_new_tokens),
    )


def streamed_tokens(
    client: LlocoClient, question: str, adapter: str, max_new_tokens: int
) -> tuple[list[int], lloco_pb2.QueryStreamResponse]:
    tokens: list[int] = []
    last = None
    for message in client.query_stream(question, ["notes"], adapter=adapter, max_new_tokens=max_new_tokens):
        tokens.extend(message.token_ids)
        last = message
    return tokens, last


def engine_metrics() -> dict[str, float]:
    from ray import serve

    return serve.get_deployment_handle("EngineDeployment", "lloco").health.remote().result()


def rpc_error(call: object, *args: object, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call(*args, **kwargs)
        if isinstance(result, Iterator):
            list(result)
    return caught.value


# -- tests ------------------------------------------------------------------------------------------


def test_health_reports_serving(stack: EmbeddedStack) -> None:
    with grpc.insecure_channel(stack.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "lloco.v1.LlocoService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        error = rpc_error(health.Check, health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_two_tenants_in_one_batch_match_the_engine_alone(
    stack: EmbeddedStack, keys: dict[str, str], ingested: dict[str, lloco_pb2.IngestDocumentResponse]
) -> None:
    for tenant, reply in ingested.items():
        assert reply.outcome == lloco_pb2.INGEST_OUTCOME_CREATED
        assert reply.document.name == f"tenants/{tenant}/documents/notes"
        assert reply.document.context_state == lloco_pb2.CONTEXT_STATE_COMPRESSED
        assert 0 < reply.document.context_tokens < reply.document.tokens
    questions = {"acme": "What is the capital of France?", "globex": "Which city is the capital of Italy?"}
    clients = {tenant: LlocoClient(stack.address, key) for tenant, key in keys.items()}
    try:
        with ThreadPoolExecutor(len(clients)) as pool:
            futures = {
                tenant: pool.submit(streamed_tokens, client, questions[tenant], "style", 12)
                for tenant, client in clients.items()
            }
            served = {tenant: future.result() for tenant, future in futures.items()}
        again = clients["acme"].query(questions["acme"], ["notes"], adapter="style", max_new_tokens=12)
    finally:
        for client in clients.values():
            client.close()
    requests = [engine_request(t, questions[t], "style", 12) for t in clients]
    requests.append(engine_request("acme", questions["acme"], None, 12))
    *alone, base_only = run_engine_alone(stack, requests)
    for (tenant, (tokens, last)), (expected, stats) in zip(served.items(), alone, strict=True):
        assert tokens == expected, tenant
        assert last.stats.adapter_version == f"tenants/{tenant}/adapters/style/versions/v000001"
        assert last.stats.context_tokens == stats.context_tokens > 0
        assert last.stats.document_tokens == stats.document_tokens > stats.context_tokens
        assert last.stats.generated_tokens == len(tokens)
        assert last.stats.time_to_first_token.ToNanoseconds() <= last.stats.total_time.ToNanoseconds()
        # where the TTFT went at the engine: within the server's TTFT, which also holds the hops to the engine
        parts = (last.stats.prepare_time, last.stats.queue_time, last.stats.prefill_time)
        assert last.stats.prefill_time.ToNanoseconds() > 0
        assert sum(p.ToNanoseconds() for p in parts) <= last.stats.time_to_first_token.ToNanoseconds()
    assert base_only[0] != alone[0][0], "the adapter must change the answer, or this test proves nothing"
    assert again.answer and again.stats.generated_tokens == len(served["acme"][0])


def test_pending_documents_and_online_compression(
    stack: EmbeddedStack, keys: dict[str, str], ingested: dict[str, lloco_pb2.IngestDocumentResponse]
) -> None:
    long_text = " ".join(f"Line {n}: the old house near the water is large." for n in range(150))
    with LlocoClient(stack.address, keys["acme"]) as client:
        big = client.ingest("long", long_text)
        assert big.document.tokens > stack.settings.limits.online_compress_max_tokens
        assert big.document.context_state == lloco_pb2.CONTEXT_STATE_PENDING
        assert client.get_document("long").context_state == lloco_pb2.CONTEXT_STATE_PENDING
        assert client.ingest("long", long_text).outcome == lloco_pb2.INGEST_OUTCOME_UNCHANGED
        # a document stored without compression (as bulk loaders do) is compressed online on request
        Registry(stack.store, "acme").ingest_document("loaded", b"Berlin is in Germany.", 1024, tokens=6)
        assert client.get_document("loaded").context_state == lloco_pb2.CONTEXT_STATE_PENDING
        job = client.compress(["loaded", "notes"])
        assert job.state == lloco_pb2.JOB_STATE_SUCCEEDED and job.kind == lloco_pb2.JOB_KIND_COMPRESS
        assert list(job.compress_result.compressed_documents) == ["tenants/acme/documents/loaded"]
        assert list(job.compress_result.skipped_documents) == ["tenants/acme/documents/notes"]
        assert client.get_job(job.name.rsplit("/", 1)[-1]) == job  # an online job is polled like a Ray job
        with grpc.insecure_channel(stack.address) as channel:
            request = lloco_pb2.GetJobRequest(name=job.name)
            globex = (("authorization", f"Bearer {keys['globex']}"),)
            error = rpc_error(lloco_pb2_grpc.LlocoServiceStub(channel).GetJob, request, metadata=globex)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        loaded = client.get_document("loaded")
        assert loaded.context_state == lloco_pb2.CONTEXT_STATE_COMPRESSED and loaded.context_tokens > 0
        pages = [d.name.rsplit("/", 1)[-1] for d in client.list_documents(page_size=1)]
        assert sorted(pages) == ["loaded", "long", "notes"]
        error = rpc_error(client.query, "What is it?", ["long"], max_new_tokens=2)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        client.delete_document("loaded")
        client.delete_document("long")
        assert rpc_error(client.get_document, "long").code() == grpc.StatusCode.NOT_FOUND


def test_a_key_cannot_reach_another_tenants_resources(
    stack: EmbeddedStack, keys: dict[str, str], ingested: dict[str, lloco_pb2.IngestDocumentResponse]
) -> None:
    secret = DOCUMENTS["globex"][:20]
    with grpc.insecure_channel(stack.address) as channel:
        stub = lloco_pb2_grpc.LlocoServiceStub(channel)
        acme = (("authorization", f"Bearer {keys['acme']}"),)
        theirs = "tenants/globex/documents/notes"
        calls = [
            (stub.GetDocument, lloco_pb2.GetDocumentRequest(name=theirs)),
            (stub.ListDocuments, lloco_pb2.ListDocumentsRequest(parent="tenants/globex")),
            (stub.DeleteDocument, lloco_pb2.DeleteDocumentRequest(name=theirs)),
            (
                stub.Query,
                lloco_pb2.QueryRequest(tenant="tenants/globex", documents=[theirs], question="What?"),
            ),
            (stub.Query, lloco_pb2.QueryRequest(tenant="tenants/acme", documents=[theirs], question="What?")),
            (stub.QueryStream, lloco_pb2.QueryStreamRequest(tenant="tenants/globex", question="What?")),
            (
                stub.Query,
                lloco_pb2.QueryRequest(
                    tenant="tenants/acme", question="What?", adapter="tenants/globex/adapters/style"
                ),
            ),
            (stub.ListAdapters, lloco_pb2.ListAdaptersRequest(parent="tenants/globex")),
            (stub.GetAdapter, lloco_pb2.GetAdapterRequest(name="tenants/globex/adapters/style")),
            (
                stub.ListAdapterVersions,
                lloco_pb2.ListAdapterVersionsRequest(parent="tenants/globex/adapters/style"),
            ),
            (
                stub.SetCurrentAdapter,
                lloco_pb2.SetCurrentAdapterRequest(version="tenants/globex/adapters/style/versions/v000001"),
            ),
            (stub.CompressDocuments, lloco_pb2.CompressDocumentsRequest(parent="tenants/globex")),
            (stub.CreateApiKey, lloco_pb2.CreateApiKeyRequest(parent="tenants/globex")),
            (stub.CreateTenant, lloco_pb2.CreateTenantRequest(tenant_id="initech")),
        ]
        for method, request in calls:
            error = rpc_error(method, request, metadata=acme, timeout=30)
            assert error.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND), request
            assert secret not in (error.details() or "")
    with LlocoClient(stack.address, keys["globex"]) as globex:
        assert globex.get_document("notes").sha256 == ingested["globex"].document.sha256  # untouched
        assert [a.name for a in globex.list_adapters()] == ["tenants/globex/adapters/style"]
    with LlocoClient(stack.address, keys["acme"]) as acme_client:
        assert [d.name for d in acme_client.list_documents()] == ["tenants/acme/documents/notes"]


def test_missing_or_bad_key_is_unauthenticated(stack: EmbeddedStack, keys: dict[str, str]) -> None:
    with grpc.insecure_channel(stack.address) as channel:
        stub = lloco_pb2_grpc.LlocoServiceStub(channel)
        request = lloco_pb2.ListDocumentsRequest(parent="tenants/acme")
        for metadata in (
            (),
            (("authorization", "Bearer lloco_not-a-real-key"),),
            (("authorization", f"Basic {keys['acme']}"),),
            (("authorization", "Bearer "),),
        ):
            error = rpc_error(stub.ListDocuments, request, metadata=metadata, timeout=10)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            assert "authorization" in error.details() or "API key" in error.details()
        stream = stub.QueryStream(
            lloco_pb2.QueryStreamRequest(tenant="tenants/acme", question="hi"), timeout=10
        )
        assert rpc_error(list, stream).code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("method", "request_", "words"),
    [
        (
            "IngestDocument",
            lloco_pb2.IngestDocumentRequest(parent="tenants/acme", content=b"x"),
            "document_id",
        ),
        (
            "IngestDocument",
            lloco_pb2.IngestDocumentRequest(parent="tenants/acme", document_id="d" * 129, content=b"x"),
            "document_id",
        ),
        (
            "IngestDocument",
            lloco_pb2.IngestDocumentRequest(parent="tenants/acme", document_id="../up", content=b"x"),
            "document_id",
        ),
        (
            "IngestDocument",
            lloco_pb2.IngestDocumentRequest(parent="tenants/acme", document_id="empty", content=b""),
            "content",
        ),
        (
            "IngestDocument",
            lloco_pb2.IngestDocumentRequest(parent="tenants/acme", document_id="blank", content=b" \n "),
            "empty",
        ),
        (
            "IngestDocument",
            lloco_pb2.IngestDocumentRequest(parent="tenants/acme", document_id="bin", content=b"\xff\xfe"),
            "UTF-8",
        ),
        (
            "IngestDocument",
            lloco_pb2.IngestDocumentRequest(
                parent="tenants/acme", document_id="big", content=b"a" * (16 * 1024 + 1)
            ),
            "limit",
        ),
        (
            "IngestDocument",
            lloco_pb2.IngestDocumentRequest(parent="tenants/acme", document_id="x"),
            "content or source_uri",
        ),
        (
            "IngestDocument",
            lloco_pb2.IngestDocumentRequest(
                parent="tenants/acme", document_id="u", source_uri="s3://elsewhere/x"
            ),
            "source_uri",
        ),
        (
            "IngestDocument",
            lloco_pb2.IngestDocumentRequest(parent="acme", document_id="x", content=b"x"),
            "parent",
        ),
        ("GetDocument", lloco_pb2.GetDocumentRequest(name="tenants/acme/docs/notes"), "name"),
        ("GetDocument", lloco_pb2.GetDocumentRequest(name=""), "name is required"),
        ("ListDocuments", lloco_pb2.ListDocumentsRequest(parent="tenants/acme", page_size=-1), "page_size"),
        (
            "ListDocuments",
            lloco_pb2.ListDocumentsRequest(parent="tenants/acme", page_token="garbage!"),
            "page_token",
        ),
        (
            "ListAdapters",
            lloco_pb2.ListAdaptersRequest(parent="tenants/acme", page_token="bm90LW1pbmU="),
            "page_token",
        ),
        ("Query", lloco_pb2.QueryRequest(tenant="tenants/acme", question=""), "question"),
        ("Query", lloco_pb2.QueryRequest(tenant="tenants/acme", question="the " * 200), "tokens"),
        (
            "Query",
            lloco_pb2.QueryRequest(
                tenant="tenants/acme", question="q", documents=["tenants/acme/documents/a"] * 3
            ),
            "at most",
        ),
        (
            "Query",
            lloco_pb2.QueryRequest(
                tenant="tenants/acme", question="q", documents=["tenants/acme/documents/a"] * 2
            ),
            "more than once",
        ),
        ("Query", lloco_pb2.QueryRequest(tenant="tenants/acme", question="q", adapter="style"), "adapter"),
        (
            "Query",
            lloco_pb2.QueryRequest(
                tenant="tenants/acme",
                question="q",
                sampling=lloco_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS + 1),
            ),
            "max_new_tokens",
        ),
        (
            "Query",
            lloco_pb2.QueryRequest(
                tenant="tenants/acme", question="q", sampling=lloco_pb2.SamplingParams(temperature=-1)
            ),
            "temperature",
        ),
        (
            "Query",
            lloco_pb2.QueryRequest(
                tenant="tenants/acme", question="q", sampling=lloco_pb2.SamplingParams(top_p=1.5)
            ),
            "top_p",
        ),
        (
            "Query",
            lloco_pb2.QueryRequest(
                tenant="tenants/acme", question="q", sampling=lloco_pb2.SamplingParams(stop=["x"] * 9)
            ),
            "stop",
        ),
        (
            "QueryStream",
            lloco_pb2.QueryStreamRequest(
                tenant="tenants/acme", question="q", sampling=lloco_pb2.SamplingParams(max_new_tokens=-5)
            ),
            "max_new_tokens",
        ),
        (
            "SetCurrentAdapter",
            lloco_pb2.SetCurrentAdapterRequest(version="tenants/acme/adapters/style/versions/7"),
            "version",
        ),
        (
            "UploadDataset",
            lloco_pb2.UploadDatasetRequest(parent="tenants/acme", dataset_id="qa", content=b'{"oops": 1}\n'),
            "line 1",
        ),
        ("CreateApiKey", lloco_pb2.CreateApiKeyRequest(parent="tenants/"), "parent"),
    ],
)
def test_bad_fields_are_invalid_argument(
    stack: EmbeddedStack, keys: dict[str, str], method: str, request_: object, words: str
) -> None:
    with grpc.insecure_channel(stack.address) as channel:
        call = getattr(lloco_pb2_grpc.LlocoServiceStub(channel), method)
        error = rpc_error(call, request_, metadata=(("authorization", f"Bearer {keys['acme']}"),), timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert words in error.details()


def test_document_quota_is_resource_exhausted(stack: EmbeddedStack, keys: dict[str, str]) -> None:
    with LlocoClient(stack.address, keys["globex"]) as client:
        held = len(list(client.list_documents()))
        for number in range(stack.settings.limits.max_documents - held):
            client.ingest(f"filler-{number}", f"Filler text number {number}.")
        error = rpc_error(client.ingest, "one-too-many", "More text.")
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit" in error.details()
        client.ingest("notes", DOCUMENTS["globex"])  # re-ingesting an existing document is not a new one
        for number in range(stack.settings.limits.max_documents - held):
            client.delete_document(f"filler-{number}")


def test_new_adapter_version_is_picked_up_while_queries_run(
    stack: EmbeddedStack,
    keys: dict[str, str],
    ingested: dict[str, lloco_pb2.IngestDocumentResponse],
    peft_adapter: Callable[[int], dict[str, bytes]],
) -> None:
    """A version published by another writer (here the registry; a finetune job in production) is used by
    every query that starts once the edge's lookups expire (`serve.metadata_cache_ttl_s`)."""
    ttl = stack.settings.serve.metadata_cache_ttl_s
    registry = Registry(stack.store, "acme")
    registry.publish_adapter("rolling", peft_adapter(11), train={})
    published_at: list[float] = []
    results: list[tuple[float, str]] = []
    errors: list[BaseException] = []

    deadline = time.monotonic() + 120

    def ask(client: LlocoClient) -> None:
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                reply = client.query("Where is Paris?", ["notes"], adapter="rolling", max_new_tokens=4)
            except grpc.RpcError as error:
                errors.append(error)
                return
            results.append((started, reply.stats.adapter_version))
            if published_at and started > published_at[0] + ttl:
                return

    with LlocoClient(stack.address, keys["acme"]) as client, ThreadPoolExecutor(3) as pool:
        workers = [pool.submit(ask, client) for _ in range(3)]
        while len(results) < 6 and not errors:
            time.sleep(0.05)
        registry.publish_adapter("rolling", peft_adapter(12), train={})
        published_at.append(time.monotonic())
        for worker in workers:
            worker.result()
    assert not errors, errors
    later = [version for started, version in results if started > published_at[0] + ttl]
    assert later and all(v == "tenants/acme/adapters/rolling/versions/v000002" for v in later)
    assert {v for _, v in results} <= {
        "tenants/acme/adapters/rolling/versions/v000001",
        "tenants/acme/adapters/rolling/versions/v000002",
    }
    with LlocoClient(stack.address, keys["acme"]) as client:
        assert client.get_adapter("rolling").current_version.name.endswith("/versions/v000002")
        assert [v.name.rsplit("/", 1)[-1] for v in client.list_adapter_versions("rolling", page_size=1)] == [
            "v000002",
            "v000001",
        ]
        rolled_back = client.set_current_adapter("rolling", "v000001")
        assert rolled_back.current_version.name.endswith("/versions/v000001")
        pinned = client.query("Where is Paris?", ["notes"], adapter="rolling@v000002", max_new_tokens=2)
        assert pinned.stats.adapter_version.endswith("/versions/v000002")


def s3_requests(stack: EmbeddedStack) -> int:
    """Requests for the platform's bucket that the stack's SeaweedFS has answered so far (its own Prometheus
    counter), from any process. (weed itself now and then lists buckets, outside any bucket.)"""
    import urllib.request

    with urllib.request.urlopen(stack.s3.metrics_url, timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    label = f'bucket="{stack.settings.store.bucket}"'
    counted = [line for line in lines if line.startswith("SeaweedFS_s3_request_total{") and label in line]
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in counted))


def test_a_repeated_query_reads_nothing_from_the_store(
    stack: EmbeddedStack, keys: dict[str, str], ingested: dict[str, lloco_pb2.IngestDocumentResponse]
) -> None:
    """Issue 19: once a query has run, the same query again (tenant, key, adapter, documents) makes no
    object-store request anywhere (edge or engine), unary or streamed; a write through the edge is seen
    by the next query at once."""
    question = "Where is the river?"

    def ask(client: LlocoClient) -> tuple[lloco_pb2.QueryResponse, list[lloco_pb2.QueryStreamResponse]]:
        reply = client.query(question, ["notes"], adapter="style", max_new_tokens=4)
        return reply, list(client.query_stream(question, ["notes"], adapter="style", max_new_tokens=4))

    with LlocoClient(stack.address, keys["acme"]) as client:
        # Entries live CACHE_TTL_S from their first read. Each try first lets every entry cached earlier
        # expire, so the first ask reads all of them afresh; on a machine slow enough that the repeat ends
        # more than CACHE_TTL_S later, the repeat rightly reads again, so the scenario gets three tries.
        for _ in range(3):
            time.sleep(CACHE_TTL_S)
            started = time.monotonic()
            first, _ = ask(client)
            before = s3_requests(stack)
            again, streamed = ask(client)
            read = s3_requests(stack) - before
            if time.monotonic() - started < CACHE_TTL_S:
                break
        assert read == 0, f"a repeated query made {read} object-store requests"
        assert again.answer == first.answer == "".join(m.text_delta for m in streamed)
        assert again.stats.adapter_version == streamed[-1].stats.adapter_version != ""

        changed = client.ingest("notes", DOCUMENTS["acme"] + " The river is called the Seine.")
        assert changed.document.context_state == lloco_pb2.CONTEXT_STATE_COMPRESSED  # online, at once
        after = client.query(question, ["notes"], adapter="style", max_new_tokens=4)
        assert (
            (after.stats.document_tokens, after.stats.context_tokens)
            == (
                changed.document.tokens,
                changed.document.context_tokens,
            )
            != (first.stats.document_tokens, first.stats.context_tokens)
        )
        client.ingest("notes", DOCUMENTS["acme"])  # back to the text the other tests expect
        assert client.query(question, ["notes"], adapter="style", max_new_tokens=4).answer == first.answer


def test_a_unary_answer_is_one_reply_from_the_engine(
    stack: EmbeddedStack, keys: dict[str, str], ingested: dict[str, lloco_pb2.IngestDocumentResponse]
) -> None:
    """The engine deployment's `answer` returns the whole answer in one Ray reply: the text and token ids a
    stream gives in many, and the final stats."""
    from ray import serve

    engine = serve.get_deployment_handle("EngineDeployment", "lloco").options(
        multiplexed_model_id="acme/style"
    )
    request = engine_request("acme", "Tell me about Paris.", "style", 12)
    whole = engine.answer.remote(request).result()
    events = list(engine.options(stream=True).generate.remote(request))
    assert whole.final is not None and whole.final.generated_tokens == len(whole.token_ids) > 0
    assert whole.text == "".join(e.text for e in events)
    assert list(whole.token_ids) == [t for e in events for t in e.token_ids]


def test_cancelled_stream_frees_its_row(
    stack: EmbeddedStack, keys: dict[str, str], ingested: dict[str, lloco_pb2.IngestDocumentResponse]
) -> None:
    topics = ("Paris", "the river", "the city", "a king", "the water", "the company", "a book", "the house")
    candidates = [f"Tell me a long story about {topic}." for topic in topics]
    alone = run_engine_alone(stack, [engine_request("acme", q, None, MAX_NEW_TOKENS) for q in candidates])
    question = next(
        q for q, (_, stats) in zip(candidates, alone, strict=True) if stats.finish_reason == "length"
    )
    # The tiny model decodes the 1,000 tokens in about a second: on a loaded machine a stream can finish
    # before its cancellation reaches the engine, so the scenario gets three tries; a cancellation that
    # never stops decoding fails all three.
    for _ in range(3):
        before = engine_metrics()
        with LlocoClient(stack.address, keys["acme"]) as client:
            stream = client.query_stream(question, ["notes"], max_new_tokens=MAX_NEW_TOKENS)
            received = [next(stream) for _ in range(3)]
            stream.close()  # cancels the call
        deadline = time.monotonic() + 10
        while engine_metrics()["batch_size"] > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        after = engine_metrics()
        assert after["batch_size"] == 0
        assert sum(len(m.token_ids) for m in received) >= 3
        if after["generated_tokens"] - before["generated_tokens"] < MAX_NEW_TOKENS:
            break
    assert after["generated_tokens"] - before["generated_tokens"] < MAX_NEW_TOKENS
    time.sleep(0.3)
    assert engine_metrics()["generated_tokens"] == after["generated_tokens"]  # nothing is still decoding


def test_serve_config_parses_and_names_importable_builders() -> None:
    from lloco.serve.app import load_serve_config

    config = load_serve_config(REPO / "deploy" / "serve.yaml")
    assert [a.import_path for a in config.applications] == ["lloco.serve.app:app"]
    assert not config.grpc_options.grpc_servicer_functions  # the Ingress replicas serve gRPC themselves
    assert config.applications[0].route_prefix is None


@pytest.mark.parametrize(
    ("application", "words"),
    [
        ({"name": "x", "import_path": "lloco.serve.nowhere:app"}, "cannot be imported"),
        (
            {"name": "x", "import_path": "lloco.serve.app:app", "args": {"limits": {"max_new_tokens": 0}}},
            "max_new_tokens",
        ),
        (
            {"name": "x", "import_path": "lloco.serve.app:app", "args": {"no_such_section": {}}},
            "no_such_section",
        ),
        ({"name": "x", "import_path": "lloco.serve.app:app"}, "route_prefix: null"),
    ],
)
def test_serve_config_problems_are_named(tmp_path: Path, application: dict[str, object], words: str) -> None:
    from lloco.errors import InvalidArgument
    from lloco.serve.app import load_serve_config

    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"applications": [application]}))
    with pytest.raises(InvalidArgument, match=words):
        load_serve_config(path)


def test_lloco_up_refuses_a_taken_port_without_a_traceback(stack: EmbeddedStack, tmp_path: Path) -> None:
    port = stack.settings.serve.grpc_port
    result = subprocess.run(
        [sys.executable, "-m", "lloco.cli", "up", "--port", str(port), "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 1
    assert f"port {port} is already in use" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "s3").exists(), "nothing may start when the port is taken"


@pytest.mark.slow
def test_lloco_up_says_why_the_app_did_not_start(compressor_dir: Path, tmp_path: Path) -> None:
    """A replica whose constructor fails (here: a model directory that does not exist) is reported by its
    own error, not by Serve's traceback naming the deployment; S3 and Ray are stopped again."""
    from lloco.ports import free_port

    missing = tmp_path / "no-such-model"
    config = tmp_path / "lloco.yaml"
    settings = {
        "model": {"base_model": str(missing), "compressor": str(compressor_dir), "dtype": "float32"},
        "serve": {"http_port": None},
    }
    config.write_text(yaml.safe_dump(settings))
    command = [sys.executable, "-m", "lloco.cli", "up", "--config", str(config), "--port", str(free_port())]
    result = subprocess.run(
        [*command, "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 1
    assert (
        f"error: the lloco app did not start: lloco.errors.NotFound: model spec '{missing}'" in result.stderr
    )
    assert "Traceback" not in result.stderr + result.stdout
    running = subprocess.run(["pgrep", "-f", str(tmp_path / "data")], capture_output=True, text=True).stdout
    assert running.strip() == ""


def test_lloco_up_refuses_when_rays_job_agent_port_is_taken(tmp_path: Path) -> None:
    """Another Ray node on the machine holds the dashboard agent's port: `lloco up` would start but run no job."""
    from lloco.ports import port_in_use
    from ray._private.ray_constants import DEFAULT_DASHBOARD_AGENT_LISTEN_PORT as agent_port

    with contextlib.ExitStack() as held:
        if not port_in_use(agent_port):
            holder = held.enter_context(socket.socket())
            holder.bind(("127.0.0.1", agent_port))
            holder.listen()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "lloco.cli",
                "up",
                "--port",
                str(free_port()),
                "--data-dir",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
            env={**os.environ, "LLOCO_SERVE__HTTP_PORT": str(free_port())},
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"port {agent_port} (the dashboard agent" in result.stderr and "ray stop" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_serve_config_must_not_start_serves_grpc_proxy(tmp_path: Path) -> None:
    """The Ingress replicas serve gRPC themselves; Serve's proxy on the same port would shadow them."""
    from lloco.errors import InvalidArgument
    from lloco.serve.app import load_serve_config

    config = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    config["grpc_options"] = {
        "port": 50051,
        "grpc_servicer_functions": ["lloco.api.lloco_pb2_grpc.add_LlocoServiceServicer_to_server"],
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(InvalidArgument, match="remove grpc_options"):
        load_serve_config(path)


def test_corpus_queries_retrieve_cite_and_follow_deletes(stack: EmbeddedStack) -> None:
    """A query with `retrieval` asks the tenant's whole corpus: the index follows online compression and
    deletes (through this edge's cache), citations are the stored segments' ranges, another tenant's planted
    term is never retrieved, and bad retrieval fields get their gRPC codes."""
    cid = stack.compressor_id
    filler = "The weather was mild and the market sold bread, fish and cheese to the people of the town. "
    corpora = {
        "corpus-a": {"north": filler * 2 + "zanzibar harbour " + filler, "south": filler * 3},
        "corpus-b": {"east": filler + "quokka island " + filler},
    }
    corpus = lloco_pb2.Retrieval(top_k=4)
    clients = {t: LlocoClient(stack.address, stack.create_tenant(t)) for t in corpora}
    with contextlib.ExitStack() as open_clients:
        for client in clients.values():
            open_clients.enter_context(client)
        a, b = clients["corpus-a"], clients["corpus-b"]
        error = rpc_error(a.query, "where is zanzibar?", max_new_tokens=2, retrieval=corpus)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "no retrieval index" in error.details()
        for tenant, documents in corpora.items():
            for doc_id, text in documents.items():
                reply = clients[tenant].ingest(doc_id, text)
                assert reply.document.context_state == lloco_pb2.CONTEXT_STATE_COMPRESSED

        reply = a.query("where is zanzibar?", max_new_tokens=2, retrieval=corpus)
        assert reply.citations and reply.citations[0].document == "tenants/corpus-a/documents/north"
        table = Registry(stack.store, "corpus-a").context_info("north", cid)
        assert table is not None
        k = table.k
        for citation in reply.citations:
            stored = table.segments[citation.segment] if citation.document.endswith("/north") else None
            if stored is not None:
                ranges = (citation.token_start, citation.token_end, citation.char_start, citation.char_end)
                assert ranges == (stored.token_start, stored.token_end, stored.char_start, stored.char_end)
        cited_tokens = sum(c.token_end - c.token_start for c in reply.citations)
        assert reply.stats.context_tokens == k * len(reply.citations)
        assert reply.stats.document_tokens == cited_tokens
        assert any(
            "zanzibar" in corpora["corpus-a"]["north"][c.char_start : c.char_end] for c in reply.citations
        )

        stream = list(a.query_stream("where is zanzibar?", max_new_tokens=2, retrieval=corpus))
        assert list(stream[0].citations) == list(reply.citations)
        assert all(not m.citations for m in stream[1:])

        foreign = b.query("where is zanzibar?", max_new_tokens=2, retrieval=corpus)
        assert all(c.document.startswith("tenants/corpus-b/") for c in foreign.citations)
        assert not any(
            "zanzibar" in corpora["corpus-b"]["east"][c.char_start : c.char_end] for c in foreign.citations
        )

        budget = lloco_pb2.Retrieval(top_k=4, context_budget=k)  # one segment's vectors
        assert len(a.query("where is zanzibar?", max_new_tokens=2, retrieval=budget).citations) == 1

        a.delete_document("north")
        after = a.query("where is zanzibar?", max_new_tokens=2, retrieval=corpus)
        assert all(not c.document.endswith("/north") for c in after.citations)

        for documents, retrieval, words in [
            (["south"], corpus, "not both"),
            ((), lloco_pb2.Retrieval(top_k=stack.settings.limits.max_retrieval_k + 1), "retrieval.top_k"),
            ((), lloco_pb2.Retrieval(context_budget=-1), "retrieval.context_budget"),
            ((), lloco_pb2.Retrieval(context_budget=k - 1), "cannot hold one segment"),
        ]:
            error = rpc_error(a.query, "zanzibar?", documents, max_new_tokens=2, retrieval=retrieval)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and words in error.details(), (
                error.details()
            )
