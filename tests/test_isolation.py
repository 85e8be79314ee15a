"""Tenant isolation and abuse resistance, tried as an attacker would, against the real stack.

One `EmbeddedStack` (SeaweedFS, a local Ray, the Serve app with its own gRPC server on loopback, a tiny
random Llama) holds two tenants: alpha, the victim, with secrets planted in every kind of object it owns,
and beta, the attacker. The tests named after a finding of the adversarial probe (issue 17, findings
1-11) each reproduce that finding; the property test sends beta's calls with generated resource names
and source URIs to every RPC and checks that no byte of alpha's objects ever comes back to beta or is
copied for it. The storage outage test runs last: it stops the S3 server and starts it again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lloco.api import lloco_pb2
from lloco.client import LlocoClient
from lloco.config import EngineSettings, LimitSettings, LoraSettings, ServeSettings, Settings
from lloco.jobs import JobRecord, JobRecords
from lloco.ports import free_port
from lloco.registry import Registry, Tenants
from lloco.serve.local import EmbeddedStack
from lloco.storage import keys
from pydantic import SecretStr

pytestmark = pytest.mark.timeout(600)

ADMIN_KEY = "admin-key-for-isolation-tests"
BUCKET = "lloco"
SERVICE = "/lloco.v1.LlocoService/"
REPO = Path(__file__).parents[1]
MAX_DOCUMENT_BYTES = 16 * 1024
BETA_NOTES = "Rome is the capital of Italy. The old city has many public places and a long story. " * 2
NAMES_PER_EXAMPLE = 100
EXAMPLES = 100  # 100 x 100 = 10,000 generated names and URIs
NAMES_PER_CALL = 1000  # the default limits.max_names_per_call


def marker(what: str) -> str:
    """A secret no generator can guess: it may appear only where alpha (or the operator) put it."""
    return f"ALPHA-SECRET-{what}-{uuid.uuid4().hex}"


# -- the stack and the two tenants -------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(
    tiny_settings: Callable[..., Settings], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedStack]:
    data_dir = tmp_path_factory.mktemp("isolation")
    settings = tiny_settings(
        data_dir,
        ADMIN_KEY,
        limits=LimitSettings(
            max_document_bytes=MAX_DOCUMENT_BYTES,
            max_documents=40,
            max_new_tokens=16,
            online_compress_max_tokens=1024,
        ),
        lora=LoraSettings(max_rank=8, gpu_slots=4, cpu_adapters=8),
        engine=EngineSettings(max_batch_size=4, max_seq_len=1024),
        serve=ServeSettings(grpc_port=free_port(), http_port=None, max_ongoing_requests=64),
    )
    with EmbeddedStack(settings, num_cpus=4, jobs=False) as running:
        assert running.settings.store.bucket == BUCKET
        yield running


def create_tenant(stack: EmbeddedStack, tenant: str) -> str:
    with LlocoClient(stack.address, ADMIN_KEY, tenant=tenant) as admin:
        return admin.create_tenant(tenant).api_key


@dataclass
class Planted:
    """Alpha's objects, each carrying a secret marker, and what must never reach beta."""

    alpha_key: str
    beta_key: str
    forbidden: list[bytes]  # markers, alpha's document digests, uid, key and key hash
    alpha_objects: dict[str, str]  # every object of alpha (and the operator's), key -> sha256


@pytest.fixture(scope="module")
def planted(stack: EmbeddedStack, peft_adapter: Callable[[int], dict[str, bytes]]) -> Planted:
    store = stack.store
    alpha_key, beta_key = create_tenant(stack, "alpha"), create_tenant(stack, "beta")
    secrets: dict[str, str] = {}
    with LlocoClient(stack.address, alpha_key) as alpha:
        secrets["doc"] = marker("doc")
        alpha.ingest("secret", f"The vault code is {secrets['doc']}. Keep it.")
        secrets["dataset"] = marker("dataset")
        row = {"doc_ids": ["secret"], "question": f"What is {secrets['dataset']}?", "answer": "the code"}
        alpha.upload_dataset("qa", json.dumps(row).encode())
    secrets["adapter"] = marker("adapter")
    Registry(store, "alpha").publish_adapter("style", peft_adapter(1), train={"note": secrets["adapter"]})
    secrets["upload"] = marker("upload")
    store.put_bytes("tenants/alpha/uploads/private.txt", secrets["upload"].encode())
    secrets["checkpoint"] = marker("checkpoint")
    store.put_bytes(f"{keys.checkpoints_prefix('job-alpha')}alpha/state.json", secrets["checkpoint"].encode())
    secrets["job"] = marker("job")
    uid = Tenants(store).uid("alpha")
    record = JobRecord(
        "job-alpha", "alpha", uid, "compress", "SUCCEEDED", datetime.now(UTC), message=secrets["job"]
    )
    JobRecords(store).put(record)
    secrets["operator"] = marker("operator")
    store.put_bytes("staging/operator.txt", secrets["operator"].encode())

    with LlocoClient(stack.address, beta_key) as beta:
        beta.ingest("notes", BETA_NOTES)
    store.put_bytes("tenants/beta/uploads/mine.txt", b"Beta's own upload: the river is long.")

    alpha_objects = {
        key: hashlib.sha256(store.get_bytes(key)).hexdigest()
        for prefix in ("tenants/alpha/", "staging/", "checkpoints/")
        for key in store.list_keys(prefix)
    }
    alpha_hash = hashlib.sha256(alpha_key.encode()).hexdigest()
    alpha_objects[keys.api_key(alpha_hash)] = hashlib.sha256(
        store.get_bytes(keys.api_key(alpha_hash))
    ).hexdigest()
    documents = [d.sha256 for d in Registry(store, "alpha").list_documents(0)[0]]
    forbidden = [
        s.encode()
        for s in [*secrets.values(), *documents, Tenants(store).uid("alpha"), alpha_key, alpha_hash]
    ]
    return Planted(alpha_key, beta_key, forbidden, alpha_objects)


# -- calling the API -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    code: grpc.StatusCode
    details: str
    payload: bytes  # the serialized reply (every message of a stream)


def call(channel: grpc.Channel, method: str, request: object, key: str | None, timeout: float = 60) -> Answer:
    """One RPC with ``key`` (none: no metadata); never raises for a status."""
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    streaming = method == "QueryStream"
    path = method if method.startswith("/") else SERVICE + method
    try:
        if streaming:
            stub = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
            payload = b"".join(stub(raw, metadata=metadata, timeout=timeout))
        else:
            stub = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            payload = stub(raw, metadata=metadata, timeout=timeout)
    except grpc.RpcError as error:
        return Answer(error.code(), error.details() or "", b"")
    return Answer(grpc.StatusCode.OK, "", payload)


def ingest_uri(document_id: str, uri: str) -> lloco_pb2.IngestDocumentRequest:
    return lloco_pb2.IngestDocumentRequest(parent="tenants/beta", document_id=document_id, source_uri=uri)


def beta_documents(stack: EmbeddedStack) -> dict[str, str]:
    return {d.doc_id: d.sha256 for d in Registry(stack.store, "beta").list_documents(0)[0]}


def assert_nothing_leaked(planted: Planted, answers: list[Answer]) -> None:
    for answer in answers:
        seen = answer.payload + answer.details.encode()
        leaked = [secret for secret in planted.forbidden if secret in seen]
        assert not leaked, (answer.code, answer.details[:300], leaked)


# -- finding 1: a source_uri with '//' copied another tenant's objects --------------------------------


def test_finding_1_source_uri_cannot_copy_another_tenants_objects(
    stack: EmbeddedStack, planted: Planted
) -> None:
    alpha_hash = hashlib.sha256(planted.alpha_key.encode()).hexdigest()
    targets = [
        keys.doc_source("alpha", "secret"),
        keys.tenant_meta("alpha"),
        keys.dataset("alpha", "qa"),
        keys.adapter_file("alpha", "style", "v000001", "train.json"),
        keys.api_key(alpha_hash),
        f"{keys.checkpoints_prefix('job-alpha')}alpha/state.json",
        "tenants/alpha/uploads/private.txt",
    ]
    shapes = [
        "{}",
        "/{}",
        "//{}",
        "./{}",
        "tenants/beta/uploads/../../../{}",
        "tenants/beta/uploads//../../../{}",
    ]
    before = beta_documents(stack)
    answers = []
    with grpc.insecure_channel(stack.address) as channel:
        for number, (target, shape) in enumerate((t, s) for t in targets for s in shapes):
            uri = f"s3://{BUCKET}/" + shape.format(target)
            answer = call(channel, "IngestDocument", ingest_uri(f"copy-{number}", uri), planted.beta_key)
            assert answer.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED), (
                uri,
                answer,
            )
            answers.append(answer)
    assert_nothing_leaked(planted, answers)
    assert beta_documents(stack) == before


# -- finding 2: source_uri read any object outside the reserved areas ---------------------------------


def test_finding_2_source_uri_reads_only_the_callers_uploads(stack: EmbeddedStack, planted: Planted) -> None:
    with grpc.insecure_channel(stack.address) as channel:

        def ingest(document_id: str, key: str) -> Answer:
            return call(
                channel, "IngestDocument", ingest_uri(document_id, f"s3://{BUCKET}/{key}"), planted.beta_key
            )

        for key in ("staging/operator.txt", "tenants/alpha/uploads/private.txt", "tenants/beta/mine.txt"):
            denied = ingest("foreign", key)
            assert denied.code == grpc.StatusCode.PERMISSION_DENIED, (key, denied)
            assert "tenants/beta/uploads/" in denied.details  # says where beta's uploads go
        assert ingest("missing", "tenants/beta/uploads/nothing-here.txt").code == grpc.StatusCode.NOT_FOUND
        mine = ingest("mine", "tenants/beta/uploads/mine.txt")
        assert mine.code == grpc.StatusCode.OK, mine
    upload = stack.store.get_bytes("tenants/beta/uploads/mine.txt")
    assert beta_documents(stack)["mine"] == hashlib.sha256(upload).hexdigest()
    assert "foreign" not in beta_documents(stack)


# -- finding 3: an unauthenticated 300 MB message was held whole ------------------------------------


def listening_sockets(port: int) -> list[tuple[str, str]]:
    """(local address as hex, socket inode) of every socket listening on ``port`` on this machine."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                found.append((address, fields[9]))
    return found


def server_pid(port: int) -> int:
    """The process holding the socket that listens on ``port``."""
    inodes = {f"socket:[{inode}]" for _, inode in listening_sockets(port)}
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (process / "fd").iterdir()):
                return int(process.name)
        except OSError:
            continue
    raise AssertionError(f"no process listens on port {port}")


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


def test_finding_3_a_300mb_message_is_refused_without_being_held(
    stack: EmbeddedStack, planted: Planted
) -> None:
    pid = server_pid(stack.settings.serve.grpc_port)
    cap = MAX_DOCUMENT_BYTES + 2**20  # the default cap: the document limit plus 1 MiB (checked below)
    huge = lloco_pb2.IngestDocumentRequest(
        parent="tenants/beta", document_id="huge", content=b"x" * (300 * 2**20)
    ).SerializeToString()
    with grpc.insecure_channel(stack.address) as channel:
        for key, refusals in (
            (None, {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}),
            (planted.beta_key, {grpc.StatusCode.RESOURCE_EXHAUSTED}),
        ):
            # The replica's other threads (Ray's core worker, metrics) allocate too; a message held in
            # memory would show in every try, so the smallest growth of three tries is the message's.
            # Typically 4 MiB; on a loaded machine an authenticated refusal once grew 15.5 MiB at the least
            # (not explained yet: HTTP/2 receive buffers are the suspect), hence 24 MiB of slack, still a
            # twelfth of the 300 MB sent.
            growths = []
            for _ in range(3):
                Path(f"/proc/{pid}/clear_refs").write_text(
                    "5"
                )  # restart the peak-RSS count at the current RSS
                before = peak_rss(pid)
                started = time.monotonic()
                answer = call(channel, "IngestDocument", huge, key)
                growths.append(peak_rss(pid) - before)
                assert answer.code in refusals, answer
                assert time.monotonic() - started < 30
            grown = min(growths)
            print(
                f"refused {answer.code.name}: server peak RSS grew "
                f"{', '.join(f'{g / 2**20:.1f}' for g in growths)} MiB (cap {cap / 2**20:.1f} MiB)"
            )
            assert grown <= cap + 24 * 2**20, (
                f"server grew {grown / 2**20:.0f} MiB for a refused message (cap {cap})"
            )
        fits = call(channel, "GetCaller", lloco_pb2.GetCallerRequest(), planted.beta_key)
        assert fits.code == grpc.StatusCode.OK  # the server is unharmed
    assert stack.settings.limits.message_bytes == cap


# -- finding 4: thousands of names queued store reads that starved other tenants ---------------------


ATTACKER = """
import json, sys, threading, time
import grpc
from lloco.api import lloco_pb2

target, key, limit, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])


def compress(count):
    names = [f"tenants/beta/documents/missing-{i}" for i in range(count)]
    return lloco_pb2.CompressDocumentsRequest(parent="tenants/beta", documents=names).SerializeToString()


requests = {"50k": compress(50_000), "over": compress(limit + 1), "at": compress(limit)}
answers = []
channel = grpc.insecure_channel(target)
method = channel.unary_unary("/lloco.v1.LlocoService/CompressDocuments")
metadata = (("authorization", f"Bearer {key}"),)


def attack(deadline):
    while time.monotonic() < deadline:
        for kind, request in requests.items():
            started = time.perf_counter()
            try:
                method(request, metadata=metadata, timeout=30)
                code, details = "OK", ""
            except grpc.RpcError as error:
                code, details = error.code().name, error.details()
            answers.append((kind, code, details, time.perf_counter() - started))


print("ready", flush=True)
threads = [threading.Thread(target=attack, args=(time.monotonic() + seconds,)) for _ in range(3)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps(answers))
"""


def test_finding_4_fan_out_is_bounded_and_other_tenants_are_not_delayed(
    stack: EmbeddedStack, planted: Planted
) -> None:
    """Beta (another process, three threads) sends 50k names, one over the limit, and exactly the limit of
    unknown names, over and over; alpha's calls meanwhile take about as long as without beta."""
    limit = NAMES_PER_CALL
    alpha_call = lloco_pb2.GetDocumentRequest(name="tenants/alpha/documents/secret")
    fifty_k = lloco_pb2.CompressDocumentsRequest(
        parent="tenants/beta", documents=[f"tenants/beta/documents/missing-{i}" for i in range(50_000)]
    )

    with grpc.insecure_channel(stack.address) as channel:

        def alpha_latencies(count: int) -> list[float]:
            latencies = []
            for _ in range(count):
                started = time.perf_counter()
                assert call(channel, "GetDocument", alpha_call, planted.alpha_key).code == grpc.StatusCode.OK
                latencies.append(time.perf_counter() - started)
                time.sleep(0.02)
            return latencies

        baseline = alpha_latencies(20)
        started = time.perf_counter()
        alone = call(channel, "CompressDocuments", fifty_k, planted.beta_key)
        alone_s = time.perf_counter() - started
        attacker = subprocess.Popen(
            [sys.executable, "-c", ATTACKER, stack.address, planted.beta_key, str(limit), "4"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO / "platform",
        )
        assert attacker.stdout is not None and attacker.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        during = alpha_latencies(30)
        out, _ = attacker.communicate(timeout=120)
    answers = json.loads(out)
    refused = {
        "50k": {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"},
        "over": {"INVALID_ARGUMENT"},
        "at": {"NOT_FOUND"},
    }
    for kind, code, details, _ in answers:
        assert code in refused[kind], (kind, code, details)
        assert kind != "over" or f"at most {limit} per call" in details
    loaded = [seconds for kind, _, _, seconds in answers if kind == "50k"]
    print(
        f"50k names answered in {alone_s * 1000:.0f} ms alone ({alone.code.name}), median "
        f"{statistics.median(loaded) * 1000:.0f} ms under load; alpha's GetDocument: median "
        f"{statistics.median(baseline) * 1000:.0f} ms alone, {statistics.median(during) * 1000:.0f} ms "
        f"(max {max(during) * 1000:.0f} ms) under beta's {len(answers)} fan-out calls"
    )
    assert alone.code.name in refused["50k"] and alone_s < 1.0 and statistics.median(loaded) < 1.0
    delay = statistics.median(during) - statistics.median(baseline)
    assert delay < 0.2, f"alpha delayed {delay * 1000:.0f} ms by beta's fan-out"
    assert stack.settings.limits.max_names_per_call == NAMES_PER_CALL


# -- finding 5: a re-created tenant was served the old tenant's adapter -------------------------------


def test_finding_5_a_recreated_tenant_never_gets_the_old_adapter(
    stack: EmbeddedStack, peft_adapter: Callable[[int], dict[str, bytes]]
) -> None:
    def answer(key: str, adapter: str) -> str:
        with LlocoClient(stack.address, key) as client:
            return client.query("Where is the old city?", ["notes"], adapter=adapter, max_new_tokens=8).answer

    key = create_tenant(stack, "phoenix")
    with LlocoClient(stack.address, key) as client:
        client.ingest("notes", BETA_NOTES)
    Registry(stack.store, "phoenix").publish_adapter("style", peft_adapter(1), train={})
    old = answer(key, "style")  # now in the engine's adapter caches and a slot

    Tenants(stack.store).delete("phoenix")  # the store-level delete: nothing tells the engine
    key = create_tenant(stack, "phoenix")
    with LlocoClient(stack.address, key) as client:
        client.ingest("notes", BETA_NOTES)
    registry = Registry(stack.store, "phoenix")
    registry.publish_adapter("style", peft_adapter(2), train={})  # the same name and version again
    registry.publish_adapter("fresh", peft_adapter(2), train={})  # never cached anywhere
    expected = answer(key, "fresh")
    assert expected != old, "the two adapters must answer differently, or this test proves nothing"
    assert answer(key, "style") == expected


# -- finding 6: the port listened everywhere and Serve's own service answered without a key ----------


def test_finding_6_the_api_listens_on_loopback_and_serves_nothing_else(stack: EmbeddedStack) -> None:
    sockets = listening_sockets(stack.settings.serve.grpc_port)
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, as IPv4 or IPv4-mapped IPv6
    assert sockets and all(address in loopback for address, _ in sockets), sockets
    with grpc.insecure_channel(stack.address) as channel:
        for path in (
            "/ray.serve.RayServeAPIService/ListApplications",
            "/ray.serve.RayServeAPIService/Healthz",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            "/grpc.health.v1.Health/List",
        ):
            assert call(channel, path, b"", None).code == grpc.StatusCode.UNIMPLEMENTED, path
        assert call(channel, "GetCaller", b"", None).code == grpc.StatusCode.UNAUTHENTICATED


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A fresh self-signed certificate for 127.0.0.1 and localhost (PEM files: chain, key)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lloco test")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    chain, private = directory / "tls.crt", directory / "tls.key"
    chain.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    private.chmod(0o600)
    return chain, private


def test_tls_api_with_a_self_signed_certificate(
    stack: EmbeddedStack, planted: Planted, tmp_path: Path
) -> None:
    """A second Ingress (its own Serve app, same engine and store) speaking TLS: clients and the CLI need --ca."""
    from lloco.serve.ingress import Ingress
    from lloco.serve.local import health_status
    from ray import serve

    chain, private = self_signed_certificate(tmp_path)
    port = free_port()
    tls_settings = stack.settings.model_copy(
        update={
            "serve": stack.settings.serve.model_copy(
                update={"grpc_port": port, "tls_cert_file": chain, "tls_key_file": private}
            )
        }
    )
    engine = serve.get_deployment_handle("EngineDeployment", "lloco")
    serve.run(Ingress.bind(engine, tls_settings), name="lloco-tls", route_prefix=None)
    target = f"127.0.0.1:{port}"
    try:
        assert health_status(target, ca_file=chain) == "SERVING"
        with LlocoClient(target, planted.beta_key, ca=chain) as client:
            assert client.caller().tenant == "tenants/beta"
        for client in (
            LlocoClient(target, planted.beta_key, timeout_s=5),
            LlocoClient(target, planted.beta_key, timeout_s=5, tls=True),
        ):
            with client, pytest.raises(grpc.RpcError) as refused:  # plain text, or TLS not trusting the cert
                client.caller()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        cli = subprocess.run(
            [sys.executable, "-m", "lloco.cli", "docs", "--target", target, "--tls", "--ca", str(chain)],
            env={**os.environ, "LLOCO_API_KEY": planted.beta_key},
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert cli.returncode == 0 and "tenants/beta/documents/notes" in cli.stdout, cli.stderr
    finally:
        serve.delete("lloco-tls")


# -- finding 7: no way to revoke a key or delete a tenant; every `lloco up` minted another key ---------


def test_finding_7_keys_are_revoked_and_tenants_deleted_over_the_api(
    stack: EmbeddedStack, planted: Planted
) -> None:
    store = stack.store
    with grpc.insecure_channel(stack.address) as channel:
        created = lloco_pb2.CreateTenantResponse.FromString(
            call(channel, "CreateTenant", lloco_pb2.CreateTenantRequest(tenant_id="temp"), ADMIN_KEY).payload
        )
        first = created.api_key
        assert created.key.name.startswith("tenants/temp/apiKeys/") and first.startswith(created.key.hint)
        second = lloco_pb2.CreateApiKeyResponse.FromString(
            call(channel, "CreateApiKey", lloco_pb2.CreateApiKeyRequest(parent="tenants/temp"), first).payload
        )
        listed = lloco_pb2.ListApiKeysResponse.FromString(
            call(channel, "ListApiKeys", lloco_pb2.ListApiKeysRequest(parent="tenants/temp"), first).payload
        )
        assert sorted(k.name for k in listed.api_keys) == sorted([created.key.name, second.key.name])
        assert not any(first.encode() in k.SerializeToString() for k in listed.api_keys)  # hints, not secrets

        # another tenant may neither see, revoke nor delete them
        for method, request in (
            ("ListApiKeys", lloco_pb2.ListApiKeysRequest(parent="tenants/temp")),
            ("RevokeApiKey", lloco_pb2.RevokeApiKeyRequest(name=second.key.name)),
            ("DeleteTenant", lloco_pb2.DeleteTenantRequest(name="tenants/temp")),
        ):
            assert call(channel, method, request, planted.beta_key).code == grpc.StatusCode.PERMISSION_DENIED
        revoke = lloco_pb2.RevokeApiKeyRequest(name=second.key.name)
        assert call(channel, "RevokeApiKey", revoke, first).code == grpc.StatusCode.OK
        assert call(channel, "GetCaller", b"", second.api_key).code == grpc.StatusCode.UNAUTHENTICATED
        assert call(channel, "RevokeApiKey", revoke, first).code == grpc.StatusCode.NOT_FOUND

        with LlocoClient(stack.address, first) as client:
            client.ingest("doc", "Text of a tenant that will be deleted.")
        store.put_bytes("tenants/temp/uploads/up.txt", b"upload")
        store.put_bytes(f"{keys.checkpoints_prefix('job-temp')}temp/state.json", b"{}")
        delete = lloco_pb2.DeleteTenantRequest(name="tenants/temp")
        deleted = call(channel, "DeleteTenant", delete, ADMIN_KEY)
        assert deleted.code == grpc.StatusCode.OK
        assert lloco_pb2.DeleteTenantResponse.FromString(deleted.payload).deleted_objects >= 5
        assert call(channel, "GetCaller", b"", first).code == grpc.StatusCode.UNAUTHENTICATED
        assert call(channel, "DeleteTenant", delete, ADMIN_KEY).code == grpc.StatusCode.NOT_FOUND
    left = [k for k in store.list_keys("") if "/temp/" in k or k.startswith("tenants/temp")]
    assert left == []
    assert not store.exists(keys.api_key(hashlib.sha256(first.encode()).hexdigest()))


def test_finding_7_lloco_up_reuses_its_kept_key(stack: EmbeddedStack) -> None:
    first, again = stack.api_key("keeper"), stack.api_key("keeper")
    assert first == again
    path = stack.key_file("keeper")
    assert path.read_text().strip() == first and path.stat().st_mode & 0o777 == 0o600
    with LlocoClient(stack.address, first) as client:
        (name,) = [k.name for k in client.list_api_keys()]
        client.revoke_api_key(name)
    replaced = stack.api_key("keeper")  # the kept key no longer works: a new one replaces it
    assert replaced != first and path.read_text().strip() == replaced
    with LlocoClient(stack.address, replaced) as client:
        assert client.caller().tenant == "tenants/keeper"


# -- finding 9: decode and recursion errors were INTERNAL or UNKNOWN; NUL documents were accepted ------


def test_finding_9_malformed_input_is_invalid_argument(stack: EmbeddedStack, planted: Planted) -> None:
    deep = '{"doc_ids": ' + "[" * 50_000 + "]" * 50_000 + ', "question": "q", "answer": "a"}\n'
    requests = [
        (
            "UploadDataset",
            lloco_pb2.UploadDatasetRequest(parent="tenants/beta", dataset_id="deep", content=deep.encode()),
        ),
        ("IngestDocument", ingest_uri("dot", f"s3://{BUCKET}/tenants/beta/uploads/./mine.txt")),
        ("IngestDocument", ingest_uri("back", f"s3://{BUCKET}/tenants\\beta\\uploads\\mine.txt")),
        ("IngestDocument", ingest_uri("pct", f"s3://{BUCKET}/tenants/beta/uploads/%2e%2e/mine.txt")),
        ("IngestDocument", ingest_uri("ctl", f"s3://{BUCKET}/tenants/beta/uploads/mine.txt\n")),
        (
            "IngestDocument",
            lloco_pb2.IngestDocumentRequest(parent="tenants/beta", document_id="nul", content=b"\x00" * 64),
        ),
        (
            "IngestDocument",
            lloco_pb2.IngestDocumentRequest(
                parent="tenants/beta", document_id="nul2", content=b"text\x00more"
            ),
        ),
        ("GetDocument", b"\x0a\x02\xff\xfe"),  # name = two bytes that are not UTF-8
        ("GetDocument", b"\x0a\xff"),  # a length running past the end
        ("ListDocuments", b"\x1a\x03\xc3\x28\x00"),  # page_token, not UTF-8
    ]
    with grpc.insecure_channel(stack.address) as channel:
        for method, request in requests:
            answer = call(channel, method, request, planted.beta_key)
            assert answer.code == grpc.StatusCode.INVALID_ARGUMENT, (method, request, answer)
    assert not {"nul", "nul2", "dot", "back", "pct", "ctl"} & set(beta_documents(stack))


# -- finding 11: the admin key and the storage secret travelled to every Ray job ----------------------


def test_finding_11_jobs_get_no_secrets_in_their_environment(stack: EmbeddedStack, tmp_path: Path) -> None:
    from lloco.jobs import settings_env

    store = stack.settings.store.model_copy(
        update={
            "access_key_id": SecretStr(marker("key-id")),
            "secret_access_key": SecretStr(marker("secret")),
        }
    )
    settings = stack.settings.model_copy(update={"data_dir": tmp_path, "store": store})
    env = settings_env(settings)
    secrets = [ADMIN_KEY, store.secret_access_key.get_secret_value(), store.access_key_id.get_secret_value()]
    assert not [value for value in env.values() for secret in secrets if secret in value], env
    reference = Path(env["LLOCO_SECRETS_FILE"])
    assert reference.stat().st_mode & 0o777 == 0o600 and ADMIN_KEY not in reference.read_text()
    # the job still reaches the store: Settings in a fresh process read the referenced file
    probe = "from lloco.config import Settings; s = Settings(); print(s.store.secret_access_key.get_secret_value(), s.admin_key)"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LLOCO_")}
    shown = subprocess.run(
        [sys.executable, "-c", probe],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO / "platform",
    )
    assert shown.stdout.split() == [secrets[1], "None"], shown.stderr[-2000:]


# -- the property: no byte of alpha's objects reaches beta, whatever names and URIs it sends --------------

SEGMENTS = [
    "tenants", "alpha", "beta", "documents", "docs", "adapters", "datasets", "jobs", "versions", "apiKeys",
    "api-keys", "uploads", "auth", "models", "checkpoints", "contexts", "job-alpha", "secret", "notes", "mine.txt",
    "source.txt", "meta.json", "tenant.json", "train.json", "state.json", "current", "v000001", "style", "qa",
    "private.txt", "operator.txt", "staging", ".", "..", "", "%2e%2e", "%2F", "..%2f", "\\", "..\\", "\x00",
    "\n", " ", "ALPHA", "alpha\u200b", "\u0430lpha", "*", "?", "#", "~", "alpha.", "-", "_", "a" * 130,
]  # fmt: skip
URI_PREFIXES = [
    f"s3://{BUCKET}/", f"s3://{BUCKET}//", f"s3:///{BUCKET}/", f"s3://{BUCKET.upper()}/", f"s3://{BUCKET}/./",
    f"s3:/{BUCKET}/", f"S3://{BUCKET}/", f"s3://{BUCKET}%2F", "s3://other/", "", "file:///", f"s3://{BUCKET}\\",
    f"s3://{BUCKET}/tenants/beta/uploads/", f"s3://{BUCKET}/tenants/beta/uploads/../../",
    f"s3://{BUCKET}/tenants/beta/uploads//", f"s3://{BUCKET}/tenants/beta/uploads/%2e%2e/", "http://127.0.0.1/lloco/",
]  # fmt: skip
SEGMENT = st.one_of(st.sampled_from(SEGMENTS), st.text(max_size=8))
NAME = st.builds(
    lambda head, path, tail: head + path + tail,
    st.sampled_from(
        ["", "/", "//", "./", "tenants/beta/", "tenants/beta/../", "tenants/alpha/", "tenants/beta//"]
    ),
    st.lists(SEGMENT, max_size=7).map("/".join),
    st.sampled_from(["", "/", "//"]),
)
URI = st.builds(lambda prefix, name: prefix + name, st.sampled_from(URI_PREFIXES), NAME)
BETA = "tenants/beta"
ONE_TOKEN = lloco_pb2.SamplingParams(max_new_tokens=1)


def _token(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode("utf-8", "surrogatepass")).decode()


# Every RPC, with the generated text in each of its name, id, token and URI fields.
BUILDERS: list[Callable[[str], tuple[str, object]]] = [
    lambda s: ("IngestDocument", ingest_uri("fetched", s)),
    lambda s: ("IngestDocument", lloco_pb2.IngestDocumentRequest(parent=s, document_id="x", content=b"beta text")),
    lambda s: ("IngestDocument", lloco_pb2.IngestDocumentRequest(parent=BETA, document_id=s, source_uri=f"s3://{BUCKET}/tenants/alpha/uploads/private.txt")),
    lambda s: ("GetDocument", lloco_pb2.GetDocumentRequest(name=s)),
    lambda s: ("ListDocuments", lloco_pb2.ListDocumentsRequest(parent=s)),
    lambda s: ("ListDocuments", lloco_pb2.ListDocumentsRequest(parent=BETA, page_token=s)),
    lambda s: ("ListDocuments", lloco_pb2.ListDocumentsRequest(parent=BETA, page_token=_token(json.dumps({"list": "documents", "after": s})))),
    lambda s: ("DeleteDocument", lloco_pb2.DeleteDocumentRequest(name=s)),
    lambda s: ("CompressDocuments", lloco_pb2.CompressDocumentsRequest(parent=s)),
    lambda s: ("CompressDocuments", lloco_pb2.CompressDocumentsRequest(parent=BETA, documents=[s])),
    lambda s: ("Query", lloco_pb2.QueryRequest(tenant=s, question="What is it?", sampling=ONE_TOKEN)),
    lambda s: ("Query", lloco_pb2.QueryRequest(tenant=BETA, documents=[s], question="What?", sampling=ONE_TOKEN)),
    lambda s: ("Query", lloco_pb2.QueryRequest(tenant=BETA, adapter=s, question="What?", sampling=ONE_TOKEN)),
    lambda s: ("QueryStream", lloco_pb2.QueryStreamRequest(tenant=BETA, documents=[s], question="What?", sampling=ONE_TOKEN)),
    lambda s: ("QueryStream", lloco_pb2.QueryStreamRequest(tenant=BETA, adapter=s, question="What?", sampling=ONE_TOKEN)),
    lambda s: ("ListAdapters", lloco_pb2.ListAdaptersRequest(parent=s)),
    lambda s: ("ListAdapters", lloco_pb2.ListAdaptersRequest(parent=BETA, page_token=_token(json.dumps({"list": "adapters", "after": s})))),
    lambda s: ("GetAdapter", lloco_pb2.GetAdapterRequest(name=s)),
    lambda s: ("ListAdapterVersions", lloco_pb2.ListAdapterVersionsRequest(parent=s)),
    lambda s: ("SetCurrentAdapter", lloco_pb2.SetCurrentAdapterRequest(version=s)),
    lambda s: ("UploadDataset", lloco_pb2.UploadDatasetRequest(parent=s, dataset_id="d", content=b'{"doc_ids": ["notes"], "question": "q", "answer": "a"}')),
    lambda s: ("UploadDataset", lloco_pb2.UploadDatasetRequest(parent=BETA, dataset_id=s, content=b'{"doc_ids": ["notes"], "question": "q", "answer": "a"}')),
    lambda s: ("UploadDataset", lloco_pb2.UploadDatasetRequest(parent=BETA, dataset_id="d", content=json.dumps({"doc_ids": [s], "question": "q", "answer": "a"}).encode())),
    lambda s: ("ListDatasets", lloco_pb2.ListDatasetsRequest(parent=s)),
    lambda s: ("ListDatasets", lloco_pb2.ListDatasetsRequest(parent=BETA, page_token=_token(json.dumps({"list": "datasets", "after": s})))),
    lambda s: ("SubmitFinetune", lloco_pb2.SubmitFinetuneRequest(parent=BETA, dataset=s)),
    lambda s: ("SubmitFinetune", lloco_pb2.SubmitFinetuneRequest(parent=BETA, dataset="tenants/alpha/datasets/qa", adapter_id=s)),
    lambda s: ("GetJob", lloco_pb2.GetJobRequest(name=s)),
    lambda s: ("ListJobs", lloco_pb2.ListJobsRequest(parent=s)),
    lambda s: ("ListJobs", lloco_pb2.ListJobsRequest(parent=BETA, page_token=_token(json.dumps({"list": "jobs", "after": s})))),
    lambda s: ("CancelJob", lloco_pb2.CancelJobRequest(name=s)),
    lambda s: ("CreateTenant", lloco_pb2.CreateTenantRequest(tenant_id=s)),
    lambda s: ("CreateApiKey", lloco_pb2.CreateApiKeyRequest(parent=s)),
    lambda s: ("GetCaller", lloco_pb2.GetCallerRequest()),
    lambda s: ("DeleteTenant", lloco_pb2.DeleteTenantRequest(name=s)),
    lambda s: ("ListApiKeys", lloco_pb2.ListApiKeysRequest(parent=s)),
    lambda s: ("ListApiKeys", lloco_pb2.ListApiKeysRequest(parent=BETA, page_token=_token(json.dumps({"list": "apiKeys", "after": s})))),
    lambda s: ("RevokeApiKey", lloco_pb2.RevokeApiKeyRequest(name=s)),
]  # fmt: skip
CALLS = st.tuples(st.sampled_from(range(len(BUILDERS))), st.one_of(NAME, URI))


def stored_under(stack: EmbeddedStack, prefix: str) -> dict[str, bytes]:
    return {key: stack.store.get_bytes(key) for key in stack.store.list_keys(prefix)}


@pytest.mark.slow
def test_no_byte_of_one_tenant_reaches_another(stack: EmbeddedStack, planted: Planted) -> None:
    """10,000 generated names and URIs from beta across every RPC: nothing of alpha's is returned to beta,
    copied for it, or changed."""
    sent: list[int] = []
    codes: dict[str, int] = {}
    with grpc.insecure_channel(stack.address) as channel, ThreadPoolExecutor(16) as pool:

        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(st.lists(CALLS, min_size=NAMES_PER_EXAMPLE, max_size=NAMES_PER_EXAMPLE))
        def beta_attacks(batch: list[tuple[int, str]]) -> None:
            requests = [BUILDERS[number](text) for number, text in batch]
            answers = list(
                pool.map(lambda r: call(channel, r[0], r[1], planted.beta_key, timeout=120), requests)
            )
            sent.append(len(batch))
            for answer in answers:
                codes[answer.code.name] = codes.get(answer.code.name, 0) + 1
                assert answer.code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), answer
            assert_nothing_leaked(planted, answers)

        beta_attacks()
    assert sum(sent) >= EXAMPLES * NAMES_PER_EXAMPLE, sum(sent)
    assert (
        codes.get("OK", 0) > 0
        and codes.get("PERMISSION_DENIED", 0) > 0
        and codes.get("INVALID_ARGUMENT", 0) > 0
    ), codes

    # nothing was copied for beta ...
    for key, data in stored_under(stack, "tenants/beta/").items():
        assert not [secret for secret in planted.forbidden if secret in data], key
    # ... and nothing of alpha's (or the operator's) changed
    for key, digest in planted.alpha_objects.items():
        assert hashlib.sha256(stack.store.get_bytes(key)).hexdigest() == digest, key


# -- findings 8 and 10: with the store down, errors leaked its endpoint and health said SERVING ----------
# (last in the module: it stops the S3 server, then starts it again)


def test_findings_8_and_10_store_outage_errors_name_nothing_internal_and_health_is_not_serving(
    stack: EmbeddedStack, planted: Planted
) -> None:
    s3 = stack._s3  # the stack's own embedded S3, stopped and started again here
    endpoint = stack.settings.store.endpoint_url
    alpha_hash = hashlib.sha256(planted.alpha_key.encode()).hexdigest()
    s3.stop()
    try:
        with grpc.insecure_channel(stack.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 30
            while (
                status := health.Check(health_pb2.HealthCheckRequest(), timeout=20).status
            ) == health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "health still SERVING 30 s into a store outage"
                time.sleep(0.5)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            for method, request, key in (
                ("GetCaller", b"", planted.alpha_key),
                (
                    "GetDocument",
                    lloco_pb2.GetDocumentRequest(name="tenants/beta/documents/notes"),
                    planted.beta_key,
                ),
                (
                    "IngestDocument",
                    ingest_uri("u", f"s3://{BUCKET}/tenants/beta/uploads/mine.txt"),
                    planted.beta_key,
                ),
            ):
                answer = call(channel, method, request, key)
                assert answer.code == grpc.StatusCode.UNAVAILABLE, (method, answer)
                for internal in (
                    endpoint,
                    endpoint.split("//")[-1],
                    str(s3.port),
                    "auth/",
                    alpha_hash[:16],
                    "api-keys",
                    "Error",
                    "botocore",
                ):
                    assert internal not in answer.details, (method, internal, answer.details)
    finally:
        s3.start()
    with grpc.insecure_channel(stack.address) as channel:
        deadline = time.monotonic() + 30
        while (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=20).status
            != health_pb2.HealthCheckResponse.SERVING
        ):
            assert time.monotonic() < deadline, "health not SERVING again after the store came back"
            time.sleep(0.5)
        assert call(channel, "GetCaller", b"", planted.beta_key).code == grpc.StatusCode.OK
