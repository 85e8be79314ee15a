"""Tenants, documents, contexts, datasets and adapters, stored in a real SeaweedFS."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import boto3
import grpc
import pytest
import torch
from lloco.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
    to_grpc_status,
)
from lloco.registry import DatasetRow, Registry, Tenants
from lloco.storage import EmbeddedS3, ObjectStore, keys
from safetensors import safe_open

LIMIT = 1 << 20


@pytest.fixture
def registry(store: ObjectStore) -> Registry:
    Tenants(store).create("acme")
    return Registry(store, "acme")


def _adapter_files(marker: str, rank: int = 8) -> dict[str, bytes]:
    """PEFT-shaped files that carry ``marker`` in every file, to detect mixed versions."""
    config = {"r": rank, "lora_alpha": 16, "base_model_name_or_path": "tiny-llama", "marker": marker}
    return {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": marker.encode() * 2000,
    }


def test_tenants_lifecycle(store: ObjectStore) -> None:
    tenants = Tenants(store)
    assert tenants.list() == []
    tenants.create("acme")
    tenants.create("beta")
    assert tenants.exists("acme") and not tenants.exists("gamma")
    assert sorted(tenants.list()) == ["acme", "beta"]
    with pytest.raises(AlreadyExists):
        tenants.create("acme")
    with pytest.raises(InvalidArgument, match="invalid tenant id '../x'"):
        tenants.create("../x")
    with pytest.raises(NotFound, match="tenant 'gamma' not found"):
        Registry(store, "gamma")

    Registry(store, "beta").ingest_document("doc", b"text", LIMIT)
    tenants.delete("beta")
    assert tenants.list() == ["acme"]
    assert list(store.list_keys(keys.tenant_root("beta"))) == []
    with pytest.raises(NotFound):
        Registry(store, "beta")
    with pytest.raises(NotFound):
        tenants.delete("beta")


def test_deleting_a_tenant_removes_everything_it_owns(s3: EmbeddedS3) -> None:
    """Keys (outside the tenant's folder), checkpoints and an uploads folder outside tenants/ go too, and a
    deletion cut short is finished by the next create, so a new tenant of that name starts empty."""
    from lloco.auth import KeyRing

    settings = s3.store_settings(bucket=f"t-{os.urandom(8).hex()}").model_copy(
        update={"uploads_template": "incoming/{tenant}/"}
    )
    store = ObjectStore(settings)
    store.ensure_bucket()
    tenants = Tenants(store)
    for tenant in ("acme", "acme2"):
        tenants.create(tenant)
        Registry(store, tenant).ingest_document("doc", b"text", LIMIT)
        store.put_bytes(f"incoming/{tenant}/upload.txt", b"upload")
        store.put_bytes(f"{keys.tenant_checkpoints('job-1', tenant)}state.bin", b"weights")
    ring = KeyRing(store, None)
    key, kept = ring.create_key("acme"), ring.create_key("acme2")
    assert tenants.delete("acme") == 6  # key record + index, checkpoint, upload, document source + meta
    assert ring.resolve(kept).tenant == "acme2"
    left = sorted(store.list_keys(""))
    assert not [k for k in left if "/acme/" in k or k.startswith(("incoming/acme/", "tenants/acme/"))], left
    assert len(list(store.list_keys("auth/"))) == 1
    with pytest.raises(NotFound):
        tenants.delete("acme")

    # a deletion cut short after the marker: the next create finishes it
    store.put_bytes(keys.doc_source("acme", "stale"), b"old tenant's text")
    store.put_bytes("incoming/acme/old.txt", b"old upload")
    tenants.create("acme")
    assert list(store.list_keys("incoming/acme/")) == []
    assert [k for k in store.list_keys(keys.tenant_root("acme"))] == [keys.tenant_meta("acme")]
    with pytest.raises(Unauthenticated):
        ring.resolve(key)


def test_document_round_trip_and_idempotent_reingest(registry: Registry, store: ObjectStore) -> None:
    text = "Die Lösung steht auf Seite 42.\n".encode()
    info, changed = registry.ingest_document("report", text, LIMIT, tokens=9)
    assert changed
    assert (info.tenant, info.doc_id, info.bytes, info.tokens) == ("acme", "report", len(text), 9)
    assert info.sha256 == hashlib.sha256(text).hexdigest()
    assert registry.get_document("report") == info
    assert registry.read_text("report") == text.decode()
    meta = json.loads(store.get_bytes(keys.doc_meta("acme", "report")))
    assert {"sha256", "bytes", "tokens", "created", "updated"} <= set(meta)

    again, changed = registry.ingest_document("report", text, LIMIT, tokens=9)
    assert not changed and again == info

    new_text = text + b"Nachtrag.\n"
    updated, changed = registry.ingest_document("report", new_text, LIMIT)
    assert changed
    assert updated.sha256 == hashlib.sha256(new_text).hexdigest() != info.sha256
    assert updated.created == info.created and updated.updated >= info.updated
    assert registry.read_text("report") == new_text.decode()
    with pytest.raises(NotFound, match="document 'other' not found"):
        registry.get_document("other")
    with pytest.raises(NotFound):
        registry.read_text("other")


@pytest.mark.parametrize("bad_id", ["../x", "a/b", "", "x" * 129])
def test_bad_document_ids_are_rejected(registry: Registry, bad_id: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid document id"):
        registry.ingest_document(bad_id, b"text", LIMIT)
    with pytest.raises(InvalidArgument, match="invalid document id"):
        registry.get_document(bad_id)


def test_bad_text_is_rejected(registry: Registry) -> None:
    with pytest.raises(InvalidArgument, match=r"'latin' is not valid UTF-8 \(byte 4"):
        registry.ingest_document("latin", "Stra\xdfe".encode("latin-1"), LIMIT)
    with pytest.raises(InvalidArgument, match="is 11 bytes, over the limit of 10 bytes"):
        registry.ingest_document("long", b"x" * 11, 10)
    with pytest.raises(InvalidArgument, match="is empty"):
        registry.ingest_document("empty", b"", LIMIT)
    for blank in (b" \n\t ", b"\x01\x02\x1f\x7f"):
        with pytest.raises(InvalidArgument, match="is empty: no character but whitespace"):
            registry.ingest_document("blank", blank, LIMIT)
    for nul in (b"\x00" * 64, b"text then \x00 a NUL"):
        with pytest.raises(InvalidArgument, match="holds a NUL byte"):
            registry.ingest_document("nul", nul, LIMIT)
    assert registry.list_documents(0)[0] == []


def test_list_documents_in_pages(registry: Registry) -> None:
    ids = {f"doc-{i}" for i in range(7)} | {"doc", "doc.x"}
    for doc_id in ids:
        registry.ingest_document(doc_id, doc_id.encode(), LIMIT)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page, token = registry.list_documents(4, token)
        seen += [info.doc_id for info in page]
        pages += 1
        if not token:
            break
    assert pages == 3 and sorted(seen) == sorted(ids) and len(seen) == len(ids)
    everything, last = registry.list_documents(0)
    assert {info.doc_id for info in everything} == ids and last == ""
    with pytest.raises(InvalidArgument, match="page_size"):
        registry.list_documents(-1)
    with pytest.raises(InvalidArgument, match="page_token"):
        registry.list_documents(2, "not-a-token")


def test_contexts_round_trip_in_bf16_and_go_stale(
    registry: Registry, store: ObjectStore, tmp_path: Path
) -> None:
    info, _ = registry.ingest_document("report", b"the original text", LIMIT)
    registry.ingest_document("memo", b"another", LIMIT)
    assert {d.doc_id for d in registry.pending_documents("ac1")} == {"report", "memo"}

    vectors = torch.randn(6, 16)
    context = registry.put_context("report", "ac1", vectors, info.sha256, segment_len=1536, k=3)
    assert (context.n_vectors, context.dim, context.dtype, context.k) == (6, 16, "bfloat16", 3)
    loaded, loaded_info = registry.get_context("report", "ac1")
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded, vectors.to(torch.bfloat16))
    assert loaded_info == context == registry.context_info("report", "ac1")
    assert registry.context_info("report", "other") is None
    assert [d.doc_id for d in registry.pending_documents("ac1")] == ["memo"]

    stored = store.get_bytes(keys.context("acme", "ac1", "report"))
    (tmp_path / "c.safetensors").write_bytes(stored)
    with safe_open(tmp_path / "c.safetensors", framework="pt") as plain:  # what any safetensors reader sees
        assert plain.metadata() == {
            "source_sha": info.sha256,
            "compressor_id": "ac1",
            "segment_len": "1536",
            "k": "3",
            "dtype": "bfloat16",
            "n_vectors": "6",
            "dim": "16",
            "segments": "[]",  # no segment table given: prepended whole, never retrieved by segment
        }

    with pytest.raises(FailedPrecondition, match="changed while it was compressed"):
        registry.put_context("report", "ac1", vectors, "0" * 64, segment_len=1536, k=3)
    with pytest.raises(InvalidArgument):
        registry.put_context("report", "ac1", torch.randn(6), info.sha256, segment_len=1536, k=3)
    with pytest.raises(NotFound):
        registry.get_context("memo", "ac1")

    registry.ingest_document("report", b"the revised text", LIMIT)
    assert registry.context_info("report", "ac1") is None  # changed text removed the old context
    # A compression job that finished just as the text changed leaves a context of the old text:
    store.put_bytes(keys.context("acme", "ac1", "report"), stored)
    with pytest.raises(FailedPrecondition, match="stale"):
        registry.get_context("report", "ac1")
    assert registry.context_info("report", "ac1").source_sha == info.sha256
    assert {d.doc_id for d in registry.pending_documents("ac1")} == {"report", "memo"}


def test_datasets_validate_every_line(registry: Registry) -> None:
    registry.ingest_document("a", b"alpha", LIMIT)
    registry.ingest_document("b", b"beta", LIMIT)
    good = [
        {"doc_ids": ["a"], "question": "What is first?", "answer": "alpha"},
        {"doc_ids": ["a", "b"], "question": "Both?", "answer": "alpha\u2028beta"},
    ]
    jsonl = "\n".join(json.dumps(row, ensure_ascii=False) for row in good) + "\n\n"
    assert registry.put_dataset("qa", jsonl.encode()) == 2
    assert registry.read_dataset("qa") == [
        DatasetRow(("a",), "What is first?", "alpha"),
        DatasetRow(("a", "b"), "Both?", "alpha\u2028beta"),
    ]
    assert registry.list_datasets() == ["qa"]

    first = json.dumps(good[0])
    bad_lines = {
        "{not json": "line 2: not valid JSON",
        '["a"]': "line 2: expected a JSON object",
        json.dumps({"doc_ids": ["a"], "question": "q"}): "line 2: missing field 'answer'",
        json.dumps(
            {"doc_ids": [], "question": "q", "answer": "x"}
        ): "line 2: 'doc_ids' must be a non-empty list",
        json.dumps({"doc_ids": ["zzz"], "question": "q", "answer": "x"}): "line 2: unknown document 'zzz'",
        json.dumps(
            {"doc_ids": ["a"], "question": " ", "answer": "x"}
        ): "line 2: 'question' must be a non-empty",
        json.dumps({"doc_ids": ["a"], "question": "q", "answer": "x", "hint": 1}): "line 2: unknown field",
    }
    for line, message in bad_lines.items():
        with pytest.raises(InvalidArgument, match=message.replace("[", r"\[")):
            registry.put_dataset("bad", f"{first}\n{line}\n".encode())
    deep = '{"doc_ids": ' + "[" * 100_000 + "]" * 100_000 + ', "question": "q", "answer": "a"}'
    with pytest.raises(InvalidArgument, match="line 2: JSON nested too deeply"):
        registry.put_dataset("bad", f"{first}\n{deep}\n".encode())
    with pytest.raises(InvalidArgument, match="no rows"):
        registry.put_dataset("bad", b"\n")
    with pytest.raises(InvalidArgument, match="UTF-8"):
        registry.put_dataset("bad", b"\xff")
    assert registry.list_datasets() == ["qa"]
    with pytest.raises(NotFound):
        registry.read_dataset("bad")


def test_objects_damaged_by_another_writer_give_typed_errors(registry: Registry, store: ObjectStore) -> None:
    """Ingest and upload validate; an object rewritten behind the registry's back still fails cleanly."""
    registry.ingest_document("a", b"alpha", LIMIT)
    store.put_bytes(keys.doc_source("acme", "a"), b"ok \xff")
    with pytest.raises(FailedPrecondition, match=r"'a': not valid UTF-8 \(byte 3"):
        registry.read_text("a")
    registry.put_dataset("qa", b'{"doc_ids": ["a"], "question": "q", "answer": "x"}\n')
    store.put_bytes(keys.dataset("acme", "qa"), b'{"doc_ids": ["a"]\n')
    with pytest.raises(Internal, match="dataset 'qa' is damaged in the store"):
        registry.read_dataset("qa")


def test_delete_document_removes_contexts_and_dataset_rows(registry: Registry) -> None:
    a, _ = registry.ingest_document("a", b"alpha", LIMIT)
    registry.ingest_document("b", b"beta", LIMIT)
    registry.put_context("a", "ac1", torch.randn(2, 4), a.sha256, 8, 1)
    registry.put_context("a", "ac2", torch.randn(2, 4), a.sha256, 8, 1)
    rows = [
        {"doc_ids": ["a"], "question": "q1", "answer": "x"},
        {"doc_ids": ["b"], "question": "q2", "answer": "y"},
        {"doc_ids": ["b", "a"], "question": "q3", "answer": "z"},
    ]
    registry.put_dataset("qa", "\n".join(map(json.dumps, rows)).encode())
    registry.put_dataset("only-b", json.dumps(rows[1]).encode())

    registry.delete_document("a")
    with pytest.raises(NotFound):
        registry.get_document("a")
    assert registry.context_info("a", "ac1") is None and registry.context_info("a", "ac2") is None
    assert registry.read_dataset("qa") == [DatasetRow(("b",), "q2", "y")]
    assert registry.read_dataset("only-b") == [DatasetRow(("b",), "q2", "y")]
    assert registry.read_text("b") == "beta"
    with pytest.raises(NotFound):
        registry.delete_document("a")


def test_adapter_versions_current_and_rollback(registry: Registry, store: ObjectStore) -> None:
    with pytest.raises(NotFound):
        registry.get_adapter("default")
    first = registry.publish_adapter("default", _adapter_files("one"), {"loss": 1.5, "epochs": 3})
    second = registry.publish_adapter("default", _adapter_files("two", rank=16), {"loss": 0.9})
    assert (first.version, second.version) == ("v000001", "v000002")
    assert (second.rank, second.base_model, second.train, second.current) == (
        16,
        "tiny-llama",
        {"loss": 0.9},
        True,
    )
    assert registry.list_adapters() == ["default"]
    assert [(v.version, v.current) for v in registry.list_versions("default")] == [
        ("v000001", False),
        ("v000002", True),
    ]
    assert registry.get_adapter("default").version == "v000002"
    assert registry.read_adapter_files("default", "v000001") == _adapter_files("one")
    assert store.exists(keys.adapter_file("acme", "default", "v000001", "train.json"))

    rolled = registry.set_current("default", "v000001")
    assert rolled.current and rolled.version == "v000001"
    assert registry.get_adapter("default").version == "v000001"
    assert not registry.get_adapter("default", "v000002").current
    assert registry.publish_adapter("default", _adapter_files("three"), {}).version == "v000003"

    with pytest.raises(NotFound, match="no version 'v000009'"):
        registry.set_current("default", "v000009")
    with pytest.raises(InvalidArgument, match="adapter version"):
        registry.set_current("default", "latest")
    with pytest.raises(InvalidArgument, match="adapter_model.safetensors"):
        registry.publish_adapter("default", {"adapter_config.json": b'{"r": 8}'}, {})
    with pytest.raises(InvalidArgument, match="rank"):
        registry.publish_adapter("default", {**_adapter_files("x"), "adapter_config.json": b"{}"}, {})
    with pytest.raises(InvalidArgument, match="reserved"):
        registry.publish_adapter("default", {**_adapter_files("x"), "train.json": b"{}"}, {})
    with pytest.raises(NotFound):
        registry.list_versions("missing")


def test_concurrent_reader_never_sees_a_mixed_version(registry: Registry) -> None:
    registry.publish_adapter("live", _adapter_files("v000001"), {"marker": "v000001"})
    stop = threading.Event()
    seen: list[str] = []
    failures: list[str] = []

    def read_forever() -> None:
        while not stop.is_set():
            try:
                version = registry.get_adapter("live")
                files = registry.read_adapter_files("live", version.version)
            except Exception as error:  # any failure at all is a finding of this test
                failures.append(repr(error))
                return
            markers = {
                json.loads(files["adapter_config.json"])["marker"],
                files["adapter_model.safetensors"][:7].decode(),
                version.train["marker"],
            }
            if markers != {version.version}:
                failures.append(f"{version.version} read with {markers}")
            seen.append(version.version)

    reader = threading.Thread(target=read_forever)
    reader.start()
    try:
        for number in range(2, 9):
            marker = keys.version_name(number)
            assert (
                registry.publish_adapter("live", _adapter_files(marker), {"marker": marker}).version == marker
            )
            time.sleep(0.05)
    finally:
        stop.set()
        reader.join()
    assert failures == []
    assert len(set(seen)) >= 3, f"reader saw too few versions to mean anything: {sorted(set(seen))}"


def test_one_tenant_cannot_reach_another(store: ObjectStore) -> None:
    tenants = Tenants(store)
    tenants.create("alpha")
    tenants.create("beta")
    alpha, beta = Registry(store, "alpha"), Registry(store, "beta")
    info, _ = alpha.ingest_document("secret", b"alpha's secret", LIMIT)
    alpha.put_context("secret", "ac1", torch.randn(2, 4), info.sha256, 8, 1)
    alpha.put_dataset("qa", json.dumps({"doc_ids": ["secret"], "question": "q", "answer": "a"}).encode())
    alpha.publish_adapter("default", _adapter_files("alpha"), {})

    assert beta.list_documents(0) == ([], "")
    assert beta.list_datasets() == [] and beta.list_adapters() == []
    assert beta.pending_documents("ac1") == []
    for call in (
        lambda: beta.get_document("secret"),
        lambda: beta.read_text("secret"),
        lambda: beta.get_context("secret", "ac1"),
        lambda: beta.read_dataset("qa"),
        lambda: beta.get_adapter("default"),
        lambda: beta.read_adapter_files("default", "v000001"),
    ):
        with pytest.raises(NotFound):
            call()
    for escape in ("../alpha/docs/secret", "..", "alpha/docs/secret"):
        with pytest.raises(InvalidArgument):
            beta.read_text(escape)
    with pytest.raises(InvalidArgument):
        beta.put_dataset("qa", json.dumps({"doc_ids": ["secret"], "question": "q", "answer": "a"}).encode())
    assert alpha.read_text("secret") == "alpha's secret"


def test_fifty_megabyte_document_goes_through_multipart(
    registry: Registry, store: ObjectStore, s3: EmbeddedS3
) -> None:
    text = os.urandom(25 * 2**20).hex().encode()  # 50 MiB of ASCII
    info, changed = registry.ingest_document("big", text, 64 * 2**20)
    assert changed and info.bytes == len(text)
    assert info.sha256 == hashlib.sha256(text).hexdigest()
    raw = boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
    )
    etag = raw.head_object(Bucket=store.bucket, Key=keys.doc_source("acme", "big"))["ETag"].strip('"')
    assert etag.rsplit("-", 1)[1] == str(-(-len(text) // store.settings.multipart_threshold_bytes))
    assert hashlib.sha256(registry.read_text("big").encode()).hexdigest() == info.sha256


@pytest.fixture
def own_server(tmp_path: Path):
    server = EmbeddedS3(tmp_path / "s3")
    server.start()
    yield server
    server.stop()


def test_outage_is_unavailable_and_damages_nothing(own_server: EmbeddedS3, tmp_path: Path) -> None:
    store = ObjectStore(own_server.store_settings(bucket="registry"))
    store.ensure_bucket()
    Tenants(store).create("acme")
    registry = Registry(store, "acme")
    info, _ = registry.ingest_document("report", b"important text", LIMIT)
    vectors = torch.randn(4, 8)
    registry.put_context("report", "ac1", vectors, info.sha256, 16, 2)
    registry.put_dataset("qa", json.dumps({"doc_ids": ["report"], "question": "q", "answer": "a"}).encode())
    registry.publish_adapter("default", _adapter_files("one"), {"loss": 1.0})

    own_server.stop()
    for call in (
        lambda: registry.ingest_document("report", b"changed during the outage", LIMIT),
        lambda: registry.get_document("report"),
        lambda: registry.list_documents(0),
        lambda: registry.publish_adapter("default", _adapter_files("two"), {}),
        lambda: Registry(store, "acme"),
    ):
        started = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            call()
        assert time.monotonic() - started < 15
        assert to_grpc_status(caught.value)[0] == grpc.StatusCode.UNAVAILABLE

    def assert_intact(registry: Registry) -> None:
        assert registry.get_document("report") == info
        assert registry.read_text("report") == "important text"
        assert torch.equal(registry.get_context("report", "ac1")[0], vectors.to(torch.bfloat16))
        assert registry.read_dataset("qa") == [DatasetRow(("report",), "q", "a")]
        assert registry.get_adapter("default").version == "v000001"
        assert registry.read_adapter_files("default", "v000001") == _adapter_files("one")

    own_server.start()
    assert_intact(registry)
    own_server.stop()
    with EmbeddedS3(own_server.data_dir) as fresh:  # a new server process, new ports, same data dir
        fresh_store = ObjectStore(fresh.store_settings(bucket="registry"))
        assert_intact(Registry(fresh_store, "acme"))
