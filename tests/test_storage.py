"""Object store, key layout and embedded SeaweedFS, against real SeaweedFS servers."""

from __future__ import annotations

import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import boto3
import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lloco.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable, to_grpc_status
from lloco.storage import EmbeddedS3, ObjectStore, keys


def _raw_client(server: EmbeddedS3):
    """A plain boto3 client, to look at objects the way any other S3 tool would."""
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
    )


@pytest.mark.parametrize("good", ["a", "A9", "report-2024_v1.2", "x" * 128, "0..1"])
def test_validate_id_accepts(good: str) -> None:
    assert keys.validate_id("document", good) == good


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "x" * 129, ".hidden", "-x", "a b", "é", "a\n"])
def test_validate_id_rejects_with_kind_and_value(bad: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        keys.validate_id("document", bad)
    message = str(caught.value)
    assert message.startswith("invalid document id ")
    assert repr(bad[:40]) in message
    assert len(message) < 300


def test_validate_id_rejects_non_strings() -> None:
    with pytest.raises(InvalidArgument, match="invalid tenant id None"):
        keys.validate_id("tenant", None)


def test_key_layout_follows_the_design() -> None:
    assert keys.doc_source("acme", "report") == "tenants/acme/docs/report/source.txt"
    assert keys.doc_meta("acme", "report") == "tenants/acme/docs/report/meta.json"
    assert keys.context("acme", "ac-1", "report") == "tenants/acme/contexts/ac-1/report.safetensors"
    assert keys.dataset("acme", "qa") == "tenants/acme/datasets/qa.jsonl"
    assert keys.adapter_file("acme", "default", "v000002", "adapter_config.json") == (
        "tenants/acme/adapters/default/v000002/adapter_config.json"
    )
    assert keys.adapter_current("acme", "default") == "tenants/acme/adapters/default/current"
    assert keys.model_prefix("smollm2") == "models/smollm2/"
    assert keys.checkpoints_prefix("job-1") == "checkpoints/job-1/"
    assert keys.physical("team/", "tenants/acme/") == "team/tenants/acme/"
    assert keys.logical("team", "team/tenants/acme/") == "tenants/acme/"
    for build in (lambda: keys.doc_source("../acme", "x"), lambda: keys.context("acme", "a/b", "x")):
        with pytest.raises(InvalidArgument):
            build()
    with pytest.raises(InvalidArgument, match="adapter version"):
        keys.adapter_file("acme", "default", "../v1", "x")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "/a",
        "a/",
        "a//b",
        "a/./b",
        "a/../b",
        "..",
        ".",
        "a\\b",
        "a/%2e%2e/b",
        "a%2Fb",
        "a\nb",
        "a\x00b",
        "a\x7fb",
    ]
    + ["x" * 1025],
)
def test_normalize_key_refuses_keys_that_read_as_another(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        keys.normalize_key(bad, "source_uri")
    if bad and not bad.endswith("/"):  # the root and folders are fine as prefixes, the rest never reach S3
        with pytest.raises(InvalidArgument):
            keys.physical("", bad)


@given(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=6))
@settings(max_examples=500, deadline=None, derandomize=True)
def test_a_normalized_key_has_one_reading(segments: list[str]) -> None:
    """Whatever text comes in, an accepted key splits into plain segments and names no other key."""
    text = "/".join(segments)
    try:
        key = keys.normalize_key(text)
    except InvalidArgument:
        return
    assert key == text
    for segment in key.split("/"):
        assert segment not in ("", ".", "..") and "\\" not in segment and "%" not in segment
        assert all(ord(c) >= 0x20 and c != "\x7f" for c in segment)


@given(
    st.from_regex(keys.ID_PATTERN, fullmatch=True),
    st.from_regex(keys.ID_PATTERN, fullmatch=True),
    st.sampled_from(
        ["tenants/{tenant}/uploads/", "tenants/{tenant}/uploads/in/", "incoming/{tenant}/", "x/{tenant}/y/"]
    ),
)
@settings(max_examples=300, deadline=None, derandomize=True)
def test_no_tenants_uploads_folder_holds_anothers(one: str, two: str, template: str) -> None:
    keys.check_uploads_template(template)
    first, second = keys.uploads_prefix(one, template), keys.uploads_prefix(two, template)
    assert (first == second) == (one == two)
    assert one == two or not (first.startswith(second) or second.startswith(first))


@pytest.mark.parametrize(
    "template",
    [
        "tenants/{tenant}/",
        "tenants/{tenant}/docs/",
        "auth/{tenant}/",
        "incoming/x{tenant}/",
        "in/{tenant}",
        "in/",
    ]
    + ["in/{tenant}/{tenant}/", "checkpoints/{tenant}/", "in//{tenant}/"],
)
def test_uploads_templates_that_could_reach_other_data_are_refused(template: str, s3: EmbeddedS3) -> None:
    with pytest.raises(InvalidArgument):
        keys.check_uploads_template(template)
    with pytest.raises(InvalidArgument):
        ObjectStore(s3.store_settings(bucket="any").model_copy(update={"uploads_template": template}))


def test_key_of_uri_is_the_inverse_of_uri(s3: EmbeddedS3) -> None:
    store = ObjectStore(s3.store_settings(bucket="lloco", prefix="team"))
    assert store.key_of_uri(store.uri("tenants/a/uploads/x.txt")) == "tenants/a/uploads/x.txt"
    for uri in (
        "s3://lloco/tenants/a/uploads/x.txt",  # outside the prefix
        "s3://other/team/tenants/a/x",
        "s3://lloco/team//tenants/a/x",
        "s3://lloco/team/tenants/a/./x",
        "s3://lloco/team/tenants\\a\\x",
        "s3://lloco/team/",
    ):
        with pytest.raises(InvalidArgument, match="source_uri"):
            store.key_of_uri(uri, "source_uri")


def test_object_round_trips(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("a/one", b"first", "text/plain")
    assert store.get_bytes("a/one") == b"first"
    assert store.exists("a/one") and not store.exists("a/two")

    payload = bytes(range(256)) * 5000
    store.put_bytes("a/blob", payload)
    with store.open_stream("a/blob") as stream:
        chunks = []
        while chunk := stream.read(100_000):
            chunks.append(chunk)
    assert b"".join(chunks) == payload

    source = tmp_path / "source.bin"
    source.write_bytes(payload[::-1])
    store.put_file("b/file", source)
    store.download_file("b/file", tmp_path / "out" / "copy.bin")
    assert (tmp_path / "out" / "copy.bin").read_bytes() == payload[::-1]

    for missing in (lambda: store.get_bytes("nope"), lambda: store.open_stream("nope")):
        with pytest.raises(NotFound):
            missing()
    with pytest.raises(NotFound):
        store.download_file("nope", tmp_path / "out" / "nope.bin")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["copy.bin"]  # no partial file left

    store.delete("a/one")
    store.delete("a/one")  # deleting a missing object is fine
    assert not store.exists("a/one")


def test_listing_paginates_and_children_resume(store: ObjectStore) -> None:
    names = ["d", "d-x", "d.x", "d0", "e", "Z"] + [f"n{i:04d}" for i in range(1001)]
    for name in names[:6]:
        store.put_bytes(f"docs/{name}/meta.json", b"{}")
        store.put_bytes(f"docs/{name}/source.txt", b"text")
    threads = [
        threading.Thread(target=lambda part=part: [store.put_bytes(f"many/{n}", b"") for n in part])
        for part in (names[6::4], names[7::4], names[8::4], names[9::4])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    listed = list(store.list_keys("many/"))  # more than one page of 1000
    assert sorted(listed) == sorted(f"many/{n}" for n in names[6:])
    assert len(list(store.list_keys("many/", limit=7))) == 7
    after = list(store.list_keys("many/", start_after=listed[9]))
    assert after == listed[10:]

    children = list(store.list_children("docs/"))
    assert sorted(children) == sorted(names[:6])
    resumed: list[str] = []
    last = None
    while page := list(store.list_children("docs/", start_after=last, limit=2)):
        resumed += page
        last = page[-1]
    assert resumed == children

    assert store.delete_prefix("many/") == 1001
    assert list(store.list_keys("many/")) == []
    with pytest.raises(InvalidArgument):
        store.delete_prefix("")


def test_volume_slots_do_not_depend_on_free_disk(s3: EmbeddedS3) -> None:
    """Each bucket takes a volume; weed's default count (free disk / volume size) ran out mid-suite on a
    machine with 45 GB free ("no free volumes left"), so the embedded server fixes it."""
    import json
    import urllib.request

    from lloco.storage.embedded import MAX_VOLUMES

    with urllib.request.urlopen(f"{s3.master_url}/dir/status", timeout=5) as reply:
        topology = json.load(reply)["Topology"]
    assert topology["Max"] == MAX_VOLUMES


def test_a_nearly_full_disk_refuses_to_start_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With under 1% of its disk free weed starts, answers, and fails every write (seen in CI: "retry
    shortly" for the rest of the run), so the server refuses to start instead. The disk reading is the
    one taken on a 300 MB tmpfs holding 298 MB, where weed reported no writable volume slots at all."""
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(300 * 2**20, 298 * 2**20, 2 * 2**20)
    )
    server = EmbeddedS3(tmp_path / "s3")
    with pytest.raises(ResourceExhausted) as caught:
        server.start()
    assert "MiB free on the disk of" in str(caught.value) and "read-only" in str(caught.value)
    assert not server.running and to_grpc_status(caught.value)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_prefixes_share_a_bucket_without_seeing_each_other(s3: EmbeddedS3) -> None:
    bucket = f"t-{uuid.uuid4().hex[:20]}"
    one = ObjectStore(s3.store_settings(bucket=bucket, prefix="team-one"))
    two = ObjectStore(s3.store_settings(bucket=bucket, prefix="team-two/"))
    one.ensure_bucket()
    one.put_bytes("tenants/x/a", b"1")
    two.put_bytes("tenants/x/a", b"2")
    assert one.get_bytes("tenants/x/a") == b"1" and two.get_bytes("tenants/x/a") == b"2"
    assert list(one.list_keys("")) == ["tenants/x/a"]
    assert two.uri("tenants/x/a") == f"s3://{bucket}/team-two/tenants/x/a"
    raw = _raw_client(s3).list_objects_v2(Bucket=bucket)
    assert sorted(o["Key"] for o in raw["Contents"]) == ["team-one/tenants/x/a", "team-two/tenants/x/a"]


def test_large_objects_use_multipart(s3: EmbeddedS3, tmp_path: Path) -> None:
    settings = s3.store_settings(bucket=f"t-{uuid.uuid4().hex[:20]}").model_copy(
        update={"multipart_threshold_bytes": 5 * 2**20}
    )
    store = ObjectStore(settings)
    store.ensure_bucket()
    data = bytes(range(256)) * (12 * 2**20 // 256)
    store.put_bytes("big/bytes", data)
    path = tmp_path / "big.bin"
    path.write_bytes(data[::-1])
    store.put_file("big/file", path)
    raw = _raw_client(s3)
    for key in ("big/bytes", "big/file"):
        assert raw.head_object(Bucket=settings.bucket, Key=key)["ETag"].strip('"').endswith("-3")
    assert store.get_bytes("big/bytes") == data
    store.download_file("big/file", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data[::-1]


@pytest.fixture
def own_server(tmp_path: Path):
    """A server of this test's own, free to be stopped and restarted."""
    server = EmbeddedS3(tmp_path / "s3")
    server.start()
    yield server
    server.stop()


def test_outage_fails_fast_with_unavailable_then_recovers(own_server: EmbeddedS3, s3: EmbeddedS3) -> None:
    assert own_server.endpoint_url != s3.endpoint_url  # two servers side by side
    store = ObjectStore(own_server.store_settings(bucket="outage"))
    store.ensure_bucket()
    store.put_bytes("kept", b"precious")
    own_server.stop()

    for call in (
        lambda: store.get_bytes("kept"),
        lambda: store.put_bytes("new", b"x"),
        lambda: store.exists("kept"),
        lambda: list(store.list_keys("")),
        store.check,
    ):
        started = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            call()
        assert time.monotonic() - started < 15
        code, message = to_grpc_status(caught.value)
        assert code == grpc.StatusCode.UNAVAILABLE
        # callers see neither the endpoint, nor the key, nor the storage error (the log has them)
        assert str(own_server.port) not in message and "kept" not in message and "Error" not in message

    own_server.start()
    assert store.get_bytes("kept") == b"precious"


def test_retries_ride_out_a_short_outage(own_server: EmbeddedS3) -> None:
    settings = own_server.store_settings(bucket="retries").model_copy(update={"max_attempts": 10})
    store = ObjectStore(settings)
    store.ensure_bucket()
    store.put_bytes("kept", b"still here")
    own_server.stop()
    restart = threading.Timer(0.5, own_server.start)
    restart.start()
    try:
        assert store.get_bytes("kept") == b"still here"  # first attempts fail: nothing listens
    finally:
        restart.join()


def test_data_survives_a_new_server_on_the_same_dir(tmp_path: Path) -> None:
    with EmbeddedS3(tmp_path / "s3") as first:
        store = ObjectStore(first.store_settings(bucket="durable"))
        store.ensure_bucket()
        store.put_bytes("k", b"v" * 1000)
        sockets = list(Path("/tmp").glob(f"seaweedfs-s3-{first.port}.sock"))
    assert sockets and not any(path.exists() for path in sockets)  # stop() cleans up weed's sockets
    with EmbeddedS3(tmp_path / "s3") as second:
        assert ObjectStore(second.store_settings(bucket="durable")).get_bytes("k") == b"v" * 1000


def test_start_failure_reports_the_server_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        server = EmbeddedS3(tmp_path / "s3", port=taken.getsockname()[1])
        with pytest.raises(Unavailable, match="(?s)exited.*not available"):
            server.start()
        assert not server.running


def test_start_retries_when_another_process_takes_a_probed_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ports are probed, released and then bound by weed: a port taken in between must not fail the start."""
    from lloco.storage import embedded

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        probes = iter([taken.getsockname()[1]])
        real_probe = embedded.free_port
        monkeypatch.setattr(embedded, "free_port", lambda: next(probes, None) or real_probe())
        with EmbeddedS3(tmp_path / "s3") as server:
            assert ObjectStore(server.store_settings(bucket="raced")).ensure_bucket() is None
            assert taken.getsockname()[1] not in server._ports
