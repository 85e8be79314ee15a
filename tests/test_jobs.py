"""Jobs: records the jobs write themselves (SeaweedFS), and the API's GetJob / ListJobs / CancelJob across a
restart of `lloco up` (a real subprocess: embedded S3, local Ray with its job server, Ray jobs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import yaml
from lloco.api import lloco_pb2
from lloco.client import LlocoClient
from lloco.config import Settings
from lloco.errors import Internal, NotFound
from lloco.jobs import JobRecord, JobRecords, JobRun, Jobs
from lloco.registry import Tenants
from lloco.storage import EmbeddedS3, ObjectStore, keys

REPO = Path(__file__).parents[1]
NO_RAY = "http://127.0.0.1:9"  # nothing listens there: Ray's job server cannot be asked
POLL_S = 0.25  # GetJob is one loopback call: poll often, so the test waits for a state, not for the poll


def test_a_job_records_itself_and_a_cancelled_record_stays_cancelled(store: ObjectStore) -> None:
    tenants = Tenants(store)
    for tenant in ("acme", "globex"):
        tenants.create(tenant)
    records = JobRecords(store)
    queued = JobRecord(
        "finetune-1", "acme", tenants.uid("acme"), "finetune", "QUEUED", datetime.now(UTC), {"dataset": "qa"}
    )
    assert records.put(queued)

    run = JobRun(store, "finetune-1", "finetune", {"dataset": "qa", "adapter": "default"})
    run.start(["acme", "globex", "nobody"])  # a tenant that does not exist gets no record
    acme, globex = records.get("acme", "finetune-1"), records.get("globex", "finetune-1")
    assert acme.state == globex.state == "RUNNING" and acme.started is not None
    assert acme.created == queued.created and acme.args == {
        "dataset": "qa"
    }  # the submitter's record, carried on
    assert globex.args == {"dataset": "qa", "adapter": "default"} and globex.shared
    assert records.ids("acme") == ["finetune-1"] and records.ids("nobody") == []

    records.put(replace(globex, state="CANCELLED"))  # cancelled while it ran
    run.succeed("acme", {"adapter": "default", "version": "v000001", "metrics": {}}, "published")
    run.succeed("globex", {"adapter": "default", "version": "v000001", "metrics": {}}, "published")
    run.fail_unfinished("stopped")
    acme, globex = records.get("acme", "finetune-1"), records.get("globex", "finetune-1")
    assert acme.state == "SUCCEEDED" and acme.result["version"] == "v000001" and acme.ended >= acme.started
    assert globex.state == "CANCELLED" and globex.result is None

    # without Ray's job server a record is answered as it is; a damaged one is INTERNAL
    jobs = Jobs(Settings(), store, NO_RAY)
    assert jobs.get("acme", "finetune-1") == acme
    assert jobs.list("acme", 10, "") == ([acme], "")
    store.put_bytes(keys.job_record("acme", "broken"), b"{not json")
    with pytest.raises(Internal):
        jobs.get("acme", "broken")


def test_a_job_of_a_deleted_tenant_never_writes_into_the_new_one(store: ObjectStore) -> None:
    tenants = Tenants(store)
    tenants.create("acme")
    run = JobRun(store, "compress-1", "compress", {})
    run.start(["acme"])
    tenants.delete("acme")
    tenants.create("acme")  # the same name, a new tenant
    run.succeed("acme", {"compressed": ["old"], "skipped": [], "failed": {}}, "compressed 1 documents")
    with pytest.raises(NotFound):
        JobRecords(store).get("acme", "compress-1")
    assert JobRecords(store).ids("acme") == []


# -- the API across a restart of `lloco up` ------------------------------------------------------------


@contextmanager
def lloco_up(config: Path, port: int, log: Path) -> Iterator[str]:
    """`lloco up` as a subprocess until the block ends (SIGTERM, as Ctrl-C); yields the tenant's API key."""
    with log.open("a") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "lloco.cli", "up", "--config", str(config), "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=output,
            text=True,
            start_new_session=True,
            cwd=REPO,
        )
    try:
        key = None
        deadline = time.monotonic() + 240
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("api key: "):
                key = line.removeprefix("api key: ").strip()
            if line.startswith("press Ctrl-C"):
                break
            assert time.monotonic() < deadline, log.read_text()[-3000:]
        assert key and process.poll() is None, log.read_text()[-3000:]
        yield key
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for(client: LlocoClient, job_id: str, states: set[int], timeout_s: float = 300) -> lloco_pb2.Job:
    deadline = time.monotonic() + timeout_s
    while (job := client.get_job(job_id)).state not in states:
        assert time.monotonic() < deadline, job
        time.sleep(POLL_S)
    return job


def crash_left_running(data_dir: Path, tenant: str, job_id: str) -> JobRecord:
    """Put a job's record back to RUNNING with `lloco up` stopped, as a hard crash of the whole machine leaves
    it (no process wrote its end), and return what the job had recorded itself.

    A job whose Ray node stops under it usually records its own failure (ActorDiedError: the owner's node
    has crashed) before its driver dies, but not always: the test makes the case deterministic so the restart
    must settle a RUNNING record whose Ray job is gone."""
    with EmbeddedS3(data_dir / "s3") as s3:
        records = JobRecords(ObjectStore(s3.store_settings()))
        recorded = records.get(tenant, job_id)
        assert records.put(replace(recorded, state="RUNNING", ended=None, message="", error=None))
    return recorded


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_jobs_answer_after_lloco_up_restarts(
    tiny_model_dir: Path, compressor_dir: Path, tmp_path: Path
) -> None:
    from lloco.ports import free_port

    settings = {
        "data_dir": str(tmp_path / "data"),
        "admin_key": "admin-key-for-tests",
        "model": {
            "base_model": str(tiny_model_dir),
            "compressor": str(compressor_dir),
            "dtype": "float32",
            "cache_dir": str(tmp_path / "cache"),
        },
        "limits": {"online_compress_max_tokens": 0},  # every compression is a Ray job
        "engine": {"max_batch_size": 2, "max_seq_len": 512},
        "lora": {"max_rank": 8, "gpu_slots": 2, "cpu_adapters": 4},
        "finetune": {"epochs": 1000, "batch_size": 2},  # long enough to be cancelled, or lost, while it runs
        "serve": {"http_port": None},  # gRPC only: no fixed HTTP port to collide on
    }
    config = tmp_path / "lloco.yaml"
    config.write_text(yaml.safe_dump(settings))
    port, log = free_port(), tmp_path / "up.log"
    rows = [{"doc_ids": ["notes"], "question": f"Question {i}?", "answer": f"answer {i}"} for i in range(4)]

    with lloco_up(config, port, log) as key, LlocoClient(f"127.0.0.1:{port}", key, timeout_s=60) as client:
        client.ingest("notes", "The river runs north past the old mill. " * 20)
        queued = client.compress(["notes"])
        assert queued.kind == lloco_pb2.JOB_KIND_COMPRESS and queued.state == lloco_pb2.JOB_STATE_QUEUED
        compress_id = queued.name.rsplit("/", 1)[-1]
        compressed = client.wait_job(compress_id, timeout_s=300, poll_s=POLL_S)
        assert compressed.state == lloco_pb2.JOB_STATE_SUCCEEDED, compressed
        assert list(compressed.compress_result.compressed_documents) == ["tenants/demo/documents/notes"]
        assert compressed.start_time.ToDatetime() <= compressed.end_time.ToDatetime()

        client.upload_dataset("qa", "\n".join(json.dumps(row) for row in rows).encode())
        cancelled_id = client.submit_finetune("qa", "first").name.rsplit("/", 1)[-1]
        cancelled = client.cancel_job(cancelled_id)
        assert cancelled.state == lloco_pb2.JOB_STATE_CANCELLED and cancelled.end_time.seconds > 0
        lost_id = client.submit_finetune("qa", "second").name.rsplit("/", 1)[-1]
        wait_for(client, lost_id, {lloco_pb2.JOB_STATE_RUNNING})
        with pytest.raises(grpc.RpcError) as refused:
            client.cancel_job(compress_id)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert client.get_job(cancelled_id).state == lloco_pb2.JOB_STATE_CANCELLED  # it stayed so
    # `lloco up` stopped: its Ray cluster, and the finetune job still running in it, are gone
    recorded = crash_left_running(tmp_path / "data", "demo", lost_id)
    assert recorded.state in ("RUNNING", "FAILED"), recorded  # FAILED: the job saw its node go

    with lloco_up(config, port, log) as key, LlocoClient(f"127.0.0.1:{port}", key, timeout_s=60) as client:
        assert client.get_job(compress_id) == compressed
        assert client.get_job(cancelled_id).state == lloco_pb2.JOB_STATE_CANCELLED
        lost = client.get_job(lost_id)
        assert lost.state == lloco_pb2.JOB_STATE_FAILED and "lost" in lost.message, lost
        listed = {job.name.rsplit("/", 1)[-1]: job.state for job in client.list_jobs(page_size=1)}
        assert listed == {
            compress_id: lloco_pb2.JOB_STATE_SUCCEEDED,
            cancelled_id: lloco_pb2.JOB_STATE_CANCELLED,
            lost_id: lloco_pb2.JOB_STATE_FAILED,
        }
        assert [a.name for a in client.list_adapters()] == []  # neither finetune published anything
        with pytest.raises(grpc.RpcError) as missing:
            client.get_job("compress-19700101-000000-000000")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
