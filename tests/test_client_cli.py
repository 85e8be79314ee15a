"""LlocoClient and the client CLI against a small real gRPC server on loopback.

The server implements a few RPCs of the generated servicer over an in-memory table, records what
arrives (metadata, resource names, cancellations), and answers errors through `lloco.errors`.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from lloco.api import lloco_pb2, lloco_pb2_grpc
from lloco.cli import app
from lloco.client import LlocoClient, ResourceNames
from lloco.errors import (
    InvalidArgument,
    LlocoError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    to_grpc_status,
)
from typer.testing import CliRunner, Result

if TYPE_CHECKING:
    from lloco.config import Settings
    from lloco.serve.local import EmbeddedStack

KEYS = {"key-acme": "acme", "key-beta": "beta", "key-admin": ""}
STREAM_WORDS = 200


class RecordingServicer(lloco_pb2_grpc.LlocoServiceServicer):
    """Documents in memory, per tenant; every request and its metadata is kept for the assertions."""

    def __init__(self) -> None:
        self.documents: dict[str, lloco_pb2.Document] = {}
        self.requests: list[tuple[str, object, dict[str, str]]] = []
        self.stream_cancelled = threading.Event()

    def _enter(self, method: str, request: object, context: grpc.ServicerContext) -> str:
        """Records the call and returns the caller's tenant id ("" for admin); aborts on a bad key."""
        metadata = dict(context.invocation_metadata())
        self.requests.append((method, request, metadata))
        scheme, _, key = metadata.get("authorization", "").partition(" ")
        if scheme != "Bearer" or key not in KEYS:
            self._abort(context, Unauthenticated("missing or unknown API key"))
        return KEYS[key]

    @staticmethod
    def _abort(context: grpc.ServicerContext, error: LlocoError) -> None:
        context.abort(*to_grpc_status(error))

    def _own(self, tenant: str, name: str, context: grpc.ServicerContext) -> None:
        if not name.startswith(f"tenants/{tenant}/") and tenant:
            self._abort(context, PermissionDenied(f"{name} is not under tenants/{tenant}"))

    def calls(self, method: str) -> list[object]:
        return [request for name, request, _ in self.requests if name == method]

    def GetCaller(self, request, context):  # noqa: N802 (generated method names)
        tenant = self._enter("GetCaller", request, context)
        return lloco_pb2.GetCallerResponse(tenant=f"tenants/{tenant}" if tenant else "", admin=not tenant)

    def IngestDocument(self, request, context):  # noqa: N802
        tenant = self._enter("IngestDocument", request, context)
        self._own(tenant, request.parent + "/", context)
        try:
            request.content.decode("utf-8")
        except UnicodeDecodeError:
            self._abort(context, InvalidArgument("content is not UTF-8 text"))
        name = f"{request.parent}/documents/{request.document_id}"
        sha = hashlib.sha256(request.content).hexdigest()
        old = self.documents.get(name)
        outcome = (
            lloco_pb2.INGEST_OUTCOME_CREATED
            if old is None
            else lloco_pb2.INGEST_OUTCOME_UNCHANGED
            if old.sha256 == sha
            else lloco_pb2.INGEST_OUTCOME_UPDATED
        )
        document = lloco_pb2.Document(
            name=name,
            sha256=sha,
            size_bytes=len(request.content),
            tokens=len(request.content.split()),
            context_state=lloco_pb2.CONTEXT_STATE_PENDING,
        )
        self.documents[name] = document
        return lloco_pb2.IngestDocumentResponse(document=document, outcome=outcome)

    def GetDocument(self, request, context):  # noqa: N802
        tenant = self._enter("GetDocument", request, context)
        self._own(tenant, request.name, context)
        if request.name not in self.documents:
            self._abort(context, NotFound(f"document {request.name} not found"))
        return lloco_pb2.GetDocumentResponse(document=self.documents[request.name])

    def ListDocuments(self, request, context):  # noqa: N802
        tenant = self._enter("ListDocuments", request, context)
        self._own(tenant, request.parent + "/", context)
        if request.page_size < 0:
            self._abort(context, InvalidArgument("page_size must be >= 0"))
        names = sorted(name for name in self.documents if name.startswith(request.parent + "/documents/"))
        start = names.index(request.page_token) if request.page_token else 0
        end = start + (request.page_size or 100)
        return lloco_pb2.ListDocumentsResponse(
            documents=[self.documents[name] for name in names[start:end]],
            next_page_token=names[end] if end < len(names) else "",
        )

    def QueryStream(self, request, context):  # noqa: N802
        self._enter("QueryStream", request, context)
        context.add_callback(self.stream_cancelled.set)
        words = request.question.split()
        generated = request.sampling.max_new_tokens or STREAM_WORDS
        for index in range(generated):
            if not context.is_active():
                return
            yield lloco_pb2.QueryStreamResponse(text_delta=words[index % len(words)] + " ", token_ids=[index])
            time.sleep(0.01)
        stats = lloco_pb2.QueryStats(
            prompt_tokens=len(words),
            context_tokens=10,
            document_tokens=300,
            generated_tokens=generated,
            adapter_version=request.adapter,
        )
        stats.time_to_first_token.FromMilliseconds(12)
        stats.queue_time.FromMilliseconds(5)
        stats.total_time.FromMilliseconds(1500)
        yield lloco_pb2.QueryStreamResponse(finish_reason=lloco_pb2.FINISH_REASON_STOP, stats=stats)


@pytest.fixture
def server() -> Iterator[tuple[RecordingServicer, str]]:
    servicer = RecordingServicer()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    lloco_pb2_grpc.add_LlocoServiceServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield servicer, f"127.0.0.1:{port}"
    grpc_server.stop(grace=None)


def test_resource_names_from_ids_and_names() -> None:
    names = ResourceNames("acme")
    assert names.tenant == "tenants/acme"
    assert names.document("report.v2") == "tenants/acme/documents/report.v2"
    assert names.document("tenants/acme/documents/x") == "tenants/acme/documents/x"
    assert names.adapter_spec("") == ""
    assert names.adapter_spec("default") == "tenants/acme/adapters/default"
    assert names.adapter_spec("default@v000002") == "tenants/acme/adapters/default/versions/v000002"
    assert names.job("raysubmit_1") == "tenants/acme/jobs/raysubmit_1"
    with pytest.raises(InvalidArgument, match="not a name of the form"):
        names.document("tenants/acme/adapters/x")
    with pytest.raises(InvalidArgument, match="empty document id"):
        names.document("")
    with pytest.raises(InvalidArgument, match="version is not allowed"):
        names.adapter("default@v1")


def test_client_sends_key_and_builds_names(server: tuple[RecordingServicer, str]) -> None:
    servicer, target = server
    with LlocoClient(target, "key-acme", timeout_s=10) as client:
        created = client.ingest("report", "alpha beta gamma")
        again = client.ingest("report", b"alpha beta gamma")
        updated = client.ingest("report", "alpha beta")
        document = client.get_document("report")

    assert created.outcome == lloco_pb2.INGEST_OUTCOME_CREATED
    assert again.outcome == lloco_pb2.INGEST_OUTCOME_UNCHANGED
    assert updated.outcome == lloco_pb2.INGEST_OUTCOME_UPDATED
    assert document.name == "tenants/acme/documents/report"
    assert document.sha256 == hashlib.sha256(b"alpha beta").hexdigest()
    assert len(servicer.calls("GetCaller")) == 1, "the tenant is resolved once per client"
    (ingest, *_) = servicer.calls("IngestDocument")
    assert (ingest.parent, ingest.document_id) == ("tenants/acme", "report")
    assert servicer.calls("GetDocument")[0].name == "tenants/acme/documents/report"
    assert {metadata["authorization"] for _, _, metadata in servicer.requests} == {"Bearer key-acme"}


def test_list_documents_walks_every_page(server: tuple[RecordingServicer, str]) -> None:
    servicer, target = server
    with LlocoClient(target, "key-acme", timeout_s=10) as client:
        for index in range(5):
            client.ingest(f"doc-{index}", f"text {index}")
        names = [document.name for document in client.list_documents(page_size=2)]
    assert names == [f"tenants/acme/documents/doc-{index}" for index in range(5)]
    assert [request.page_size for request in servicer.calls("ListDocuments")] == [2, 2, 2]


def test_admin_key_needs_a_tenant(server: tuple[RecordingServicer, str]) -> None:
    _, target = server
    with (
        LlocoClient(target, "key-admin", timeout_s=10) as client,
        pytest.raises(InvalidArgument, match="admin"),
    ):
        client.get_document("report")
    with LlocoClient(target, "key-admin", timeout_s=10, tenant="beta") as client:
        assert client.ingest("x", "hello").document.name == "tenants/beta/documents/x"


def test_server_errors_keep_their_code(server: tuple[RecordingServicer, str]) -> None:
    _, target = server
    with LlocoClient(target, "key-acme", timeout_s=10) as client:
        with pytest.raises(grpc.RpcError) as missing:
            client.get_document("nope")
        with pytest.raises(grpc.RpcError) as foreign:
            client.get_document("tenants/beta/documents/x")
    with LlocoClient(target, "wrong-key", timeout_s=10) as client, pytest.raises(grpc.RpcError) as unknown:
        client.ingest("x", "hello")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert foreign.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_query_stream_names_and_cancel_on_close(server: tuple[RecordingServicer, str]) -> None:
    servicer, target = server
    with LlocoClient(target, "key-acme", timeout_s=10) as client:
        stream = client.query_stream("one two three", doc_ids=["a", "b"], adapter="default@v000003", seed=7)
        first = [next(stream).text_delta for _ in range(3)]
        stream.close()
        assert servicer.stream_cancelled.wait(5), "closing the iterator cancels the call"
    assert first == ["one ", "two ", "three "]
    (request,) = servicer.calls("QueryStream")
    assert request.tenant == "tenants/acme"
    assert list(request.documents) == ["tenants/acme/documents/a", "tenants/acme/documents/b"]
    assert request.adapter == "tenants/acme/adapters/default/versions/v000003"
    assert request.sampling.HasField("seed") and request.sampling.seed == 7
    assert request.sampling.top_p == 1.0


def _run(*args: str, stdin: str | bytes | None = None) -> Result:
    return CliRunner().invoke(
        app, list(args), input=stdin, catch_exceptions=False, env={"LLOCO_API_KEY": None}
    )


def test_cli_ingest_docs_and_query(server: tuple[RecordingServicer, str]) -> None:
    servicer, target = server
    common = ["--target", target, "--tenant-key", "key-acme"]
    ingested = _run("ingest", "--id", "notes", *common, stdin="some words here")
    assert ingested.exit_code == 0, ingested.output
    assert ingested.stdout.startswith("created\ttenants/acme/documents/notes\t15 bytes\t3 tokens\tpending")

    listed = _run("docs", *common)
    assert listed.exit_code == 0 and "tenants/acme/documents/notes" in listed.stdout

    answered = _run(
        "query", "why not now", "-d", "notes", "--adapter", "default", "--max-new-tokens", "3", *common
    )
    assert answered.exit_code == 0, answered.output
    assert answered.stdout == "why not now \n"
    assert answered.stderr.strip() == (
        "[stop] prompt 3, context 10 (from 300 document tokens, 30.0x), generated 3; "
        "adapter tenants/acme/adapters/default; ttft 12 ms (queued 5 ms), total 1.50 s"
    )
    assert servicer.calls("QueryStream")[0].documents == ["tenants/acme/documents/notes"]


def test_cli_shows_errors_without_traceback(server: tuple[RecordingServicer, str]) -> None:
    _, target = server
    missing = _run("docs", "get", "nope", "--target", target, "--tenant-key", "key-acme")
    assert missing.exit_code == 1
    assert missing.stderr == "error: NOT_FOUND: document tenants/acme/documents/nope not found\n"

    bad_text = _run(
        "ingest", "--id", "bin", "--target", target, "--tenant-key", "key-acme", stdin=b"\xff\xfe"
    )
    assert (bad_text.exit_code, bad_text.stderr) == (
        1,
        "error: INVALID_ARGUMENT: content is not UTF-8 text\n",
    )

    unknown = _run("docs", "--target", target, "--tenant-key", "stolen")
    assert (unknown.exit_code, unknown.stderr) == (1, "error: UNAUTHENTICATED: missing or unknown API key\n")

    unreachable = _run("docs", "--target", "127.0.0.1:1", "--tenant-key", "k", "--timeout", "2")
    assert unreachable.exit_code == 1 and unreachable.stderr.startswith("error: UNAVAILABLE: ")
    assert "Traceback" not in missing.output + unknown.output + unreachable.output


def test_cli_parsing(tmp_path: Path) -> None:
    top = _run("--help")
    for command in ("ingest", "query", "docs", "adapters", "dataset", "jobs", "admin"):
        assert command in top.stdout
    no_id = _run("ingest", "--tenant-key", "k", stdin="text")
    assert no_id.exit_code == 2 and "reading stdin needs --id" in no_id.stderr
    two_ids = _run("ingest", "a.txt", "b.txt", "--id", "x", "--tenant-key", "k")
    assert two_ids.exit_code == 2 and "--id names one document" in two_ids.stderr
    no_key = _run("query", "why?")
    assert no_key.exit_code == 2 and "--tenant-key" in no_key.stderr
    absent = tmp_path / "absent.txt"
    unreadable = _run("ingest", str(absent), "--target", "127.0.0.1:1", "--tenant-key", "k", "--timeout", "2")
    assert (unreadable.exit_code, unreadable.stderr) == (
        1,
        f"error: cannot read {absent}: No such file or directory\n",
    )


# -- end to end: the CLI against the real lloco server (Ray Serve, SeaweedFS, a tiny random Llama) ---------

ADMIN_KEY = "admin-key-for-cli-tests"
NOTES = "The capital of France is Paris. Paris is a large city on a river in the north of the country. " * 3


@pytest.fixture(scope="module")
def lloco_server(
    ray_local: None, tiny_settings: Callable[..., Settings], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedStack]:
    """`EmbeddedStack` serving a tiny model with a fresh compressor (32-token segments into 4 vectors)."""
    from lloco.config import EngineSettings, LimitSettings, ServeSettings
    from lloco.ports import free_port
    from lloco.serve.local import EmbeddedStack

    data_dir = tmp_path_factory.mktemp("cli-lloco")
    settings = tiny_settings(
        data_dir,
        ADMIN_KEY,
        limits=LimitSettings(max_new_tokens=32, online_compress_max_tokens=1024),
        engine=EngineSettings(max_batch_size=2, max_seq_len=512),
        serve=ServeSettings(grpc_port=free_port(), http_port=None),
    )
    with EmbeddedStack(settings, jobs=False) as stack:
        yield stack


def test_cli_end_to_end(
    lloco_server: EmbeddedStack, peft_adapter: Callable[[int], dict[str, bytes]], tmp_path: Path
) -> None:
    target = lloco_server.address
    created = _run("admin", "create-tenant", "cli", "--target", target, "--tenant-key", ADMIN_KEY)
    assert created.exit_code == 0, created.output
    tenant_name, key = created.stdout.strip().split("\t")
    assert tenant_name == "tenants/cli" and key
    common = ["--target", target, "--tenant-key", key]

    notes = tmp_path / "notes.txt"
    notes.write_text(NOTES)
    first = _run("ingest", str(notes), *common)
    second = _run("ingest", str(notes), *common)
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith(f"created\ttenants/cli/documents/notes\t{len(NOTES)} bytes\t")
    assert "\tcompressed -> " in first.stdout
    assert second.stdout.startswith("unchanged\ttenants/cli/documents/notes")
    assert "tenants/cli/documents/notes" in _run("docs", *common).stdout

    question = ["query", "What is the capital of France?", "-d", "notes", "--max-new-tokens", "8", *common]
    streamed = _run(*question)
    unary = _run(*question, "--no-stream")
    assert streamed.exit_code == 0 and unary.exit_code == 0, streamed.output + unary.output
    assert streamed.stdout == unary.stdout, "greedy: the streamed text is the unary answer"
    stats = streamed.stderr.strip()
    assert stats.startswith(("[stop] prompt ", "[length] prompt ")) and "adapter none;" in stats, stats
    context, document = map(int, re.search(r"context (\d+) \(from (\d+) document tokens", stats).groups())
    assert context == math.ceil(document / 32) * 4, f"32-token segments into 4 vectors each: {stats}"
    corpus = _run("query", "capital of France", "--corpus", "--top-k", "2", "--max-new-tokens", "4", *common)
    cites = [line for line in corpus.stderr.splitlines() if line.startswith("cite\t")]
    assert corpus.exit_code == 0 and 1 <= len(cites) <= 2, corpus.output
    assert all(line.startswith("cite\ttenants/cli/documents/notes\tsegment ") for line in cites), cites

    from lloco.registry import Registry

    registry = Registry(lloco_server.store, "cli")
    for seed in (1, 2):
        registry.publish_adapter("style", peft_adapter(seed), train={"seed": seed})
    assert "tenants/cli/adapters/style\tcurrent v000002\t2 versions" in _run("adapters", *common).stdout
    rolled_back = _run("adapters", "set-current", "style", "v000001", *common)
    assert rolled_back.stdout.strip() == "tenants/cli/adapters/style\tcurrent v000001\t2 versions"
    versions = _run("adapters", "versions", "style", *common).stdout.splitlines()
    assert [line.split("\t")[0] for line in versions] == [
        "  tenants/cli/adapters/style/versions/v000002",
        "* tenants/cli/adapters/style/versions/v000001",
    ]
    current = _run(*question, "--adapter", "style")
    pinned = _run(*question, "--adapter", "style@v000002")
    assert "adapter tenants/cli/adapters/style/versions/v000001;" in current.stderr
    assert "adapter tenants/cli/adapters/style/versions/v000002;" in pinned.stderr

    rows = tmp_path / "qa.jsonl"
    rows.write_text('{"doc_ids": ["notes"], "question": "Capital?", "answer": "Paris"}\n' * 2)
    assert _run("dataset", "upload", str(rows), *common).stdout.strip() == "tenants/cli/datasets/qa\t2 rows"
    assert _run("dataset", "list", *common).stdout.strip() == "tenants/cli/datasets/qa"

    missing = _run("docs", "get", "nope", *common)
    assert missing.exit_code == 1 and missing.stderr.startswith("error: NOT_FOUND: ")
    foreign = _run("docs", "get", "tenants/other/documents/x", *common)
    assert foreign.exit_code == 1 and foreign.stderr.startswith("error: PERMISSION_DENIED: ")

    lloco_server.store.put_bytes("tenants/cli/uploads/more.txt", NOTES.encode())
    uploaded = _run(
        "ingest", "--uri", lloco_server.store.uri("tenants/cli/uploads/more.txt"), "--id", "more", *common
    )
    assert uploaded.stdout.startswith("created\ttenants/cli/documents/more\t"), uploaded.output
    foreign_uri = _run(
        "ingest", "--uri", lloco_server.store.uri("tenants/other/uploads/x"), "--id", "x", *common
    )
    assert foreign_uri.exit_code == 1 and foreign_uri.stderr.startswith("error: PERMISSION_DENIED: ")

    second_key = _run("admin", "create-key", *common).stdout.strip()
    listed = _run("admin", "list-keys", *common).stdout.splitlines()
    assert len(listed) == 2 and all(line.startswith("tenants/cli/apiKeys/") for line in listed)
    hints = {line.split("\t")[1]: line.split("\t")[0] for line in listed}
    assert set(hints) == {key[:10] + "...", second_key[:10] + "..."}
    assert _run("admin", "revoke-key", hints[second_key[:10] + "..."], *common).exit_code == 0
    revoked = _run("docs", "--target", target, "--tenant-key", second_key)
    assert revoked.exit_code == 1 and revoked.stderr.startswith("error: UNAUTHENTICATED: ")
    admin = ["--target", target, "--tenant-key", ADMIN_KEY]
    assert _run("admin", "delete-tenant", "cli", *admin).exit_code == 2  # needs --yes
    deleted = _run("admin", "delete-tenant", "cli", "--yes", *admin)
    assert deleted.exit_code == 0 and deleted.stdout.startswith("deleted tenants/cli (")
    gone = _run("docs", *common)
    assert gone.exit_code == 1 and gone.stderr.startswith("error: UNAUTHENTICATED: ")
