"""The records of the registry, and how each is stored: documents, contexts, datasets, adapters, tenants.

Everything here is pure: dataclasses, and the conversions between them and the bytes in the store (JSON
metadata, safetensors headers, JSONL dataset rows, adapter manifests), with the checks of what callers send.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch

from lloco.errors import Internal, InvalidArgument

CONTEXT_TENSOR = "vectors"
CONTEXT_DTYPE = torch.bfloat16
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_MANIFEST = "train.json"
DATASET_FIELDS = ("doc_ids", "question", "answer")
_SAFETENSORS_HEADER_LIMIT = 100 * 2**20


@dataclass(frozen=True)
class DocumentInfo:
    tenant: str
    doc_id: str
    sha256: str
    bytes: int
    tokens: int | None
    created: datetime
    updated: datetime


@dataclass(frozen=True)
class Segment:
    """One S-token segment of a compressed document: its place in the document's tokens ``[token_start,
    token_end)`` and text ``[char_start, char_end)``. Its summaries are the context's rows
    ``segment_rows(index, k, n_vectors)``."""

    index: int
    token_start: int
    token_end: int
    char_start: int
    char_end: int


@dataclass(frozen=True)
class ContextInfo:
    """A stored context's header. ``segments`` lists every segment in order (empty for a context written
    before segments were recorded: it can be prepended whole, not retrieved by segment)."""

    tenant: str
    doc_id: str
    compressor_id: str
    source_sha: str
    segment_len: int
    k: int
    dtype: str
    n_vectors: int
    dim: int
    segments: tuple[Segment, ...] = ()


@dataclass(frozen=True)
class DatasetRow:
    doc_ids: tuple[str, ...]
    question: str
    answer: str


@dataclass(frozen=True)
class AdapterVersion:
    tenant: str
    name: str
    version: str
    created: datetime
    base_model: str
    rank: int
    current: bool
    train: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TenantInfo:
    """A tenant as created: ``uid`` tells it apart from an earlier tenant of the same name."""

    tenant: str
    uid: str
    created: datetime


_VISIBLE = re.compile(r"[^\s\x00-\x1f\x7f]")


def document_text(doc_id: str, text: bytes) -> str:
    """``text`` decoded, once it is fit to be a document: UTF-8, no NUL byte, some visible character.

    Raises:
        InvalidArgument: naming the document and what is wrong with its content.
    """
    try:
        decoded = bytes(text).decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidArgument(
            f"content of document {doc_id!r} is not valid UTF-8 (byte {error.start}: {error.reason})"
        ) from None
    if "\x00" in decoded:
        raise InvalidArgument(
            f"content of document {doc_id!r} holds a NUL byte (byte {bytes(text).index(0)}); send text"
        )
    if not _VISIBLE.search(decoded):
        raise InvalidArgument(
            f"content of document {doc_id!r} is empty: no character but whitespace and control characters"
        )
    return decoded


def now() -> datetime:
    return datetime.now(UTC)


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True).encode("utf-8")


def document_json(info: DocumentInfo) -> dict[str, Any]:
    return {
        "doc_id": info.doc_id,
        "sha256": info.sha256,
        "bytes": info.bytes,
        "tokens": info.tokens,
        "created": info.created.isoformat(),
        "updated": info.updated.isoformat(),
    }


def document_from_json(tenant: str, data: dict[str, Any]) -> DocumentInfo:
    return DocumentInfo(
        tenant=tenant,
        doc_id=data["doc_id"],
        sha256=data["sha256"],
        bytes=data["bytes"],
        tokens=data["tokens"],
        created=datetime.fromisoformat(data["created"]),
        updated=datetime.fromisoformat(data["updated"]),
    )


def context_metadata(info: ContextInfo) -> dict[str, str]:
    return {
        "compressor_id": info.compressor_id,
        "source_sha": info.source_sha,
        "segment_len": str(info.segment_len),
        "k": str(info.k),
        "dtype": info.dtype,
        "n_vectors": str(info.n_vectors),
        "dim": str(info.dim),
        "segments": json.dumps([segment_row(s) for s in info.segments], separators=(",", ":")),
    }


def segment_row(segment: Segment) -> list[int]:
    """A segment as stored: ``[token_start, token_end, char_start, char_end]`` (its index is its place)."""
    return [segment.token_start, segment.token_end, segment.char_start, segment.char_end]


def segments_from_rows(rows: list[list[int]]) -> tuple[Segment, ...]:
    return tuple(Segment(i, *map(int, row)) for i, row in enumerate(rows))


def segment_rows(index: int, k: int, n_vectors: int) -> range:
    """The rows of a context of ``n_vectors`` that belong to segment ``index``: ``[index*k, (index+1)*k)``,
    cut at ``n_vectors`` (only the last segment may hold fewer than k: a salient-sentence compressor keeps
    every token of a last segment shorter than k)."""
    return range(index * k, min((index + 1) * k, n_vectors))


def check_segments(segments: tuple[Segment, ...], n_vectors: int, k: int, segment_len: int) -> None:
    """InvalidArgument unless ``segments`` tile the document in order, k vectors each (the last one 1 to k,
    ``segment_rows``), each at most ``segment_len`` tokens (an empty tuple is allowed: no segment table)."""
    if not segments:
        return
    if not (len(segments) - 1) * k < n_vectors <= len(segments) * k:
        raise InvalidArgument(f"{len(segments)} segments of k={k} do not fit {n_vectors} vectors")
    token_end = char_end = 0
    for i, s in enumerate(segments):
        if (
            s.index != i
            or s.token_start != token_end
            or not 0 < s.token_end - s.token_start <= segment_len
            or s.char_start < char_end
            or s.char_end < s.char_start
        ):
            raise InvalidArgument(
                f"segment {i} {s} does not follow segment {i - 1} (segment_len {segment_len})"
            )
        token_end, char_end = s.token_end, s.char_end


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob: an 8-byte little-endian header length, then JSON."""
    (length,) = struct.unpack("<Q", data[:8])
    return _header_metadata(data[8 : 8 + length])


def safetensors_metadata_from_stream(stream: Any) -> dict[str, str]:
    """Like ``safetensors_metadata`` but reads only the header, not the tensors."""
    (length,) = struct.unpack("<Q", stream.read(8))
    if length > _SAFETENSORS_HEADER_LIMIT:
        raise Internal(f"safetensors header of {length} bytes is implausible")
    return _header_metadata(stream.read(length))


def _header_metadata(header: bytes) -> dict[str, str]:
    return dict(json.loads(header).get("__metadata__", {}))


def parse_row(number: int, line: str, known_documents: set[str]) -> DatasetRow:
    """One dataset line as a row; InvalidArgument("line N: ...") says what is wrong with it."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise InvalidArgument(
            f"line {number}: not valid JSON ({error.msg} at column {error.colno})"
        ) from error
    except RecursionError:
        raise InvalidArgument(f"line {number}: JSON nested too deeply") from None
    if not isinstance(row, dict):
        raise InvalidArgument(f"line {number}: expected a JSON object with {', '.join(DATASET_FIELDS)}")
    extra = sorted(set(row) - set(DATASET_FIELDS))
    if extra:
        raise InvalidArgument(f"line {number}: unknown field(s) {', '.join(map(repr, extra))}")
    for name in DATASET_FIELDS:
        if name not in row:
            raise InvalidArgument(f"line {number}: missing field {name!r}")
    doc_ids = row["doc_ids"]
    if not isinstance(doc_ids, list) or not doc_ids or not all(isinstance(d, str) for d in doc_ids):
        raise InvalidArgument(f"line {number}: 'doc_ids' must be a non-empty list of document ids")
    for doc_id in doc_ids:
        if doc_id not in known_documents:
            raise InvalidArgument(f"line {number}: unknown document {doc_id[:128]!r}")
    for name in ("question", "answer"):
        if not isinstance(row[name], str) or not row[name].strip():
            raise InvalidArgument(f"line {number}: {name!r} must be a non-empty string")
    return DatasetRow(doc_ids=tuple(doc_ids), question=row["question"], answer=row["answer"])


def adapter_config(files: dict[str, bytes]) -> dict[str, Any]:
    """The parsed ``adapter_config.json``; InvalidArgument unless the files make a PEFT adapter."""
    for required in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if required not in files:
            raise InvalidArgument(f"adapter files must include {required!r}, got {sorted(files)}")
    try:
        config = json.loads(files[ADAPTER_CONFIG])
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise InvalidArgument(f"{ADAPTER_CONFIG} is not valid JSON") from error
    if not isinstance(config, dict) or not isinstance(config.get("r"), int) or config["r"] < 1:
        raise InvalidArgument(f"{ADAPTER_CONFIG} must be an object with a positive integer rank 'r'")
    return config


def adapter_version(tenant: str, name: str, manifest: dict[str, Any], current: bool) -> AdapterVersion:
    return AdapterVersion(
        tenant=tenant,
        name=name,
        version=manifest["version"],
        created=datetime.fromisoformat(manifest["created"]),
        base_model=manifest["base_model"],
        rank=manifest["rank"],
        current=current,
        train=manifest["train"],
    )
