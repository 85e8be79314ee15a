"""The API's reply messages, built from the platform's records (registry, keys, jobs, engine stats)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from lloco.api import lloco_pb2
from lloco.auth import ApiKeyInfo
from lloco.jobs import JobRecord
from lloco.registry import AdapterVersion, ContextInfo, DocumentInfo
from lloco.serve.engine_core import EngineEvent, EngineRequest, QueryStats
from lloco.serve.names import adapter_name, api_key_name, document_name, job_name, version_name
from lloco.serve.retrieval import Retrieved

FINISH_REASONS = {
    "stop": lloco_pb2.FINISH_REASON_STOP,
    "length": lloco_pb2.FINISH_REASON_LENGTH,
    "cancelled": lloco_pb2.FINISH_REASON_CANCELLED,
}
JOB_KINDS = {"compress": lloco_pb2.JOB_KIND_COMPRESS, "finetune": lloco_pb2.JOB_KIND_FINETUNE}
JOB_STATES = {
    "QUEUED": lloco_pb2.JOB_STATE_QUEUED,
    "RUNNING": lloco_pb2.JOB_STATE_RUNNING,
    "SUCCEEDED": lloco_pb2.JOB_STATE_SUCCEEDED,
    "FAILED": lloco_pb2.JOB_STATE_FAILED,
    "CANCELLED": lloco_pb2.JOB_STATE_CANCELLED,
}


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def duration(seconds: float) -> Duration:
    value = Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def document_reply(info: DocumentInfo, context: ContextInfo | None) -> lloco_pb2.Document:
    return lloco_pb2.Document(
        name=document_name(info.tenant, info.doc_id),
        sha256=info.sha256,
        size_bytes=info.bytes,
        tokens=info.tokens or 0,
        context_state=lloco_pb2.CONTEXT_STATE_COMPRESSED if context else lloco_pb2.CONTEXT_STATE_PENDING,
        context_tokens=context.n_vectors if context else 0,
        create_time=timestamp(info.created),
        update_time=timestamp(info.updated),
    )


def version_reply(version: AdapterVersion) -> lloco_pb2.AdapterVersion:
    return lloco_pb2.AdapterVersion(
        name=version_name(version.tenant, version.name, version.version),
        base_model=version.base_model,
        rank=version.rank,
        current=version.current,
        create_time=timestamp(version.created),
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
        name=api_key_name(info.tenant, info.key_id), hint=info.hint, create_time=timestamp(info.created)
    )


def job_reply(record: JobRecord) -> lloco_pb2.Job:
    """A job as its tenant sees it: results once SUCCEEDED (documents and adapter versions by name)."""
    tenant = record.tenant
    job = lloco_pb2.Job(
        name=job_name(tenant, record.job_id),
        kind=JOB_KINDS[record.kind],
        state=JOB_STATES[record.state],
        message=record.message,
        create_time=timestamp(record.created),
        start_time=timestamp(record.started),
        end_time=timestamp(record.ended),
    )
    result = record.result if record.state == "SUCCEEDED" else None
    if result is not None and record.kind == "compress":
        job.compress_result.CopyFrom(
            lloco_pb2.CompressResult(
                compressed_documents=[document_name(tenant, d) for d in result.get("compressed", [])],
                skipped_documents=[document_name(tenant, d) for d in result.get("skipped", [])],
            )
        )
    elif result is not None and record.kind == "finetune":
        job.finetune_result.CopyFrom(
            lloco_pb2.FinetuneResult(
                adapter_version=version_name(tenant, result["adapter"], result["version"]),
                final_loss=float(result.get("metrics", {}).get("train_loss") or 0.0),
            )
        )
    return job


@dataclass
class Clock:
    """Timings as the caller sees them: from the request's arrival at the edge."""

    arrived: float
    first_token: float | None = None

    def token(self) -> None:
        self.first_token = self.first_token or time.perf_counter()


def citations_reply(tenant: str, retrieved: Retrieved | None) -> list[lloco_pb2.Citation]:
    """The segments a corpus query prepended, in their order; none for a query that named documents."""
    if retrieved is None:
        return []
    return [
        lloco_pb2.Citation(
            document=document_name(tenant, hit.entry.doc_id),
            segment=hit.entry.segment.index,
            token_start=hit.entry.segment.token_start,
            token_end=hit.entry.segment.token_end,
            char_start=hit.entry.segment.char_start,
            char_end=hit.entry.segment.char_end,
            score=hit.score,
        )
        for hit in retrieved.hits
    ]


def stats_reply(tenant: str, adapter: str | None, stats: QueryStats, clock: Clock) -> lloco_pb2.QueryStats:
    done = time.perf_counter()
    version = stats.adapter_version
    return lloco_pb2.QueryStats(
        prompt_tokens=stats.prompt_tokens,
        context_tokens=stats.context_tokens,
        document_tokens=stats.document_tokens,
        generated_tokens=stats.generated_tokens,
        adapter_version=version_name(tenant, adapter, version) if adapter and version else "",
        time_to_first_token=duration((clock.first_token or done) - clock.arrived),
        total_time=duration(done - clock.arrived),
        prepare_time=duration(stats.prepare_s),
        queue_time=duration(stats.queue_s),
        prefill_time=duration(stats.prefill_s),
    )


def query_reply(
    request: EngineRequest, answer: EngineEvent, retrieved: Retrieved | None, clock: Clock, sent: float
) -> lloco_pb2.QueryResponse:
    """A unary query's reply: the whole answer (with its final stats) sent to the engine at ``sent``."""
    assert answer.final is not None  # Queries.answer raises Unavailable otherwise
    if answer.final.generated_tokens:
        clock.first_token = sent + answer.final.ttft_s
    return lloco_pb2.QueryResponse(
        answer=answer.text,
        finish_reason=FINISH_REASONS[answer.final.finish_reason],
        stats=stats_reply(request.tenant, request.adapter, answer.final, clock),
        citations=citations_reply(request.tenant, retrieved),
    )


def stream_reply(
    request: EngineRequest, event: EngineEvent, citations: list[lloco_pb2.Citation], clock: Clock
) -> lloco_pb2.QueryStreamResponse:
    """One message of a streamed answer; the last one carries the finish reason and the stats."""
    reply = lloco_pb2.QueryStreamResponse(
        text_delta=event.text, token_ids=event.token_ids, citations=citations
    )
    if event.final is not None:
        reply.finish_reason = FINISH_REASONS[event.final.finish_reason]
        reply.stats.CopyFrom(stats_reply(request.tenant, request.adapter, event.final, clock))
    return reply


def ingest_outcome(previous: DocumentInfo | None, changed: bool) -> int:
    """What an IngestDocument did: created the document, updated its text, or found the same text."""
    if previous is None:
        return lloco_pb2.INGEST_OUTCOME_CREATED
    return lloco_pb2.INGEST_OUTCOME_UPDATED if changed else lloco_pb2.INGEST_OUTCOME_UNCHANGED
