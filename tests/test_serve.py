"""The serving edge end to end: real gRPC on loopback into Ray Serve, a real SeaweedFS, a tiny random Llama.

One `EmbeddedStack` serves the whole module: Ray starts once (or the session's running Ray is reused). Answers
over gRPC are compared with the engine run alone (`EngineCore` in this process, same store and weights).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lloco.api import lloco_pb2, lloco_pb2_grpc
from lloco.client import LlocoClient
from lloco.config import EngineSettings, LimitSettings, LoraSettings, ModelSettings, ServeSettings, Settings
from lloco.model import SamplingParams
from lloco.registry import Registry
from lloco.serve.local import EmbeddedStack, free_port
from pydantic import SecretStr

pytestmark = pytest.mark.timeout(300)

ADMIN_KEY = "admin-key-for-tests"
REPO = Path(__file__).parents[1]
MAX_NEW_TOKENS = 1000  # long enough that a cancelled stream is still decoding when it is cancelled
DOCUMENTS = {
    "acme": "The capital of France is Paris. Paris is a large city on a river in the north of the country. "
    * 3,
    "globex": "Rome is the capital of Italy. The old city has many important public places and a long story. "
    * 3,
}


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compressor_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh (untrained) compressor for the tiny model: segments of 32 tokens into 4 vectors."""
    from lloco.model import Compressor, load_model

    base = load_model(str(tiny_model_dir), tmp_path_factory.mktemp("model-cache"), dtype="float32")
    return Compressor.from_base(base, segment_len=32, k=4, accumulate=True, seed=0).save(
        tmp_path_factory.mktemp("compressor")
    )


@pytest.fixture(scope="module")
def stack(
    tiny_model_dir: Path, compressor_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedStack]:
    data_dir = tmp_path_factory.mktemp("lloco-data")
    settings = Settings(
        data_dir=data_dir,
        admin_key=SecretStr(ADMIN_KEY),
        model=ModelSettings(
            base_model=str(tiny_model_dir),
            compressor=str(compressor_dir),
            dtype="float32",
            cache_dir=data_dir / "models",
        ),
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
        serve=ServeSettings(grpc_port=free_port(), http_port=None, max_ongoing_requests=64),
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
def ingested(stack: EmbeddedStack, keys: dict[str, str]) -> dict[str, lloco_pb2.IngestDocumentResponse]:
    """Each tenant ingests its document (compressed online at once) and publishes an adapter 'style'."""
    replies = {}
    for seed, (tenant, text) in enumerate(DOCUMENTS.items(), start=1):
        with LlocoClient(stack.address, keys[tenant]) as client:
            replies[tenant] = client.ingest("notes", text)
        Registry(stack.store, tenant).publish_adapter(
            "style", adapter_files(stack, seed), train={"seed": seed}
        )
    return replies


def adapter_files(stack: EmbeddedStack, seed: int) -> dict[str, bytes]:
    """A PEFT rank-8 LoRA on q/k/v/o of the tiny model, with random (non-zero) A and B."""
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(stack.settings.model.base_model)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, 0.3)
    with tempfile.TemporaryDirectory() as directory:
        peft_model.save_pretrained(directory)
        return {
            name: (Path(directory) / name).read_bytes()
            for name in ("adapter_config.json", "adapter_model.safetensors")
        }


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
    stack: EmbeddedStack, keys: dict[str, str], ingested: dict[str, lloco_pb2.IngestDocumentResponse]
) -> None:
    registry = Registry(stack.store, "acme")
    registry.publish_adapter("rolling", adapter_files(stack, 11), train={})
    published = threading.Event()
    results: list[tuple[bool, str]] = []
    errors: list[BaseException] = []

    def ask(client: LlocoClient) -> None:
        while len(results) < 40:
            started_after_publish = published.is_set()
            try:
                reply = client.query("Where is Paris?", ["notes"], adapter="rolling", max_new_tokens=4)
            except grpc.RpcError as error:
                errors.append(error)
                return
            results.append((started_after_publish, reply.stats.adapter_version))
            if started_after_publish and len(results) > 24:
                return

    with LlocoClient(stack.address, keys["acme"]) as client, ThreadPoolExecutor(3) as pool:
        workers = [pool.submit(ask, client) for _ in range(3)]
        while len(results) < 6 and not errors:
            time.sleep(0.05)
        registry.publish_adapter("rolling", adapter_files(stack, 12), train={})
        published.set()
        for worker in workers:
            worker.result()
    assert not errors, errors
    later = [version for after, version in results if after]
    assert later and all(v == "tenants/acme/adapters/rolling/versions/v000002" for v in later)
    assert {v for after, v in results if not after} <= {
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
