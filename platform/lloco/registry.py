"""What the platform knows about each tenant: documents, compressed contexts, datasets, adapters.

A ``Registry`` is bound to one tenant and builds every key from that tenant, so no call on it can
reach another tenant's objects. Writes are whole-object PUTs; where several objects make one
thing (an adapter version), the object that makes it visible is written last:
``train.json`` (the version's manifest) after the version's files, the ``current`` pointer after
the manifest. A reader therefore sees a complete version or none.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from lloco.errors import AlreadyExists, FailedPrecondition, Internal, InvalidArgument, LlocoError, NotFound
from lloco.logs import get_logger
from lloco.storage import ObjectStore, keys

log = get_logger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
CONTEXT_TENSOR = "vectors"
CONTEXT_DTYPE = torch.bfloat16
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_MANIFEST = "train.json"
_DATASET_FIELDS = ("doc_ids", "question", "answer")
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
class ContextInfo:
    tenant: str
    doc_id: str
    compressor_id: str
    source_sha: str
    segment_len: int
    k: int
    dtype: str
    n_vectors: int
    dim: int


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


class Tenants:
    """Tenant lifecycle (admin level). A tenant exists while its ``tenant.json`` does.

    Everything a tenant owns lies under its folder, except its API key records (``auth/``, found
    through the index under its folder), its finetune checkpoints (``checkpoints/{job}/{tenant}/``) and,
    with an operator's uploads template outside ``tenants/``, its uploads folder. Deletion removes all
    of them; so does creation, for leftovers of a deletion that was cut short, so a new tenant never
    inherits an old one's objects.
    """

    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    def create(self, tenant: str) -> TenantInfo:
        """Create ``tenant``; AlreadyExists if it is there."""
        if self.exists(tenant):
            raise AlreadyExists(f"tenant {tenant!r} already exists")
        leftovers = self._purge(tenant)
        info = TenantInfo(tenant=tenant, uid=uuid.uuid4().hex, created=_now())
        meta = {"tenant": tenant, "created": info.created.isoformat(), "uid": info.uid}
        self._store.put_bytes(keys.tenant_meta(tenant), _json_bytes(meta), "application/json")
        log.info("tenant created", tenant=tenant, leftovers_removed=leftovers)
        return info

    def exists(self, tenant: str) -> bool:
        return self._store.exists(keys.tenant_meta(tenant))

    def info(self, tenant: str) -> TenantInfo | None:
        """The tenant's creation record; None if there is no such tenant."""
        try:
            meta = json.loads(self._store.get_bytes(keys.tenant_meta(tenant)))
            return TenantInfo(
                tenant=tenant, uid=str(meta["uid"]), created=datetime.fromisoformat(meta["created"])
            )
        except NotFound:
            return None
        except (ValueError, KeyError, TypeError) as error:
            raise Internal(f"tenant {tenant!r} has a damaged record in the store") from error

    def uid(self, tenant: str) -> str | None:
        """What tells this tenant apart from an earlier one of the same name (None: no such tenant)."""
        info = self.info(tenant)
        return info.uid if info else None

    def list(self) -> list[str]:
        return [t for t in self._store.list_children(keys.TENANTS) if self.exists(t)]

    def delete(self, tenant: str) -> int:
        """Delete ``tenant`` and everything it owns; returns the number of objects removed.

        The marker goes first, so the tenant (and every key of it) is gone at once; the rest follows.
        Deleting again finishes a deletion that was cut short. NotFound when there is neither the
        tenant nor anything left of it.
        """
        existed = self.exists(tenant)
        if existed:
            self._store.delete(keys.tenant_meta(tenant))
        removed = self._purge(tenant)
        if not existed and not removed:
            raise NotFound(f"tenant {tenant!r} not found")
        log.info("tenant deleted", tenant=tenant, objects=removed)
        return removed

    def _purge(self, tenant: str) -> int:
        """Remove every object of ``tenant`` (whose marker is gone or not yet written)."""
        store = self._store
        removed = 0
        for index in list(store.list_keys(keys.api_keys_prefix(tenant))):
            try:
                key_hash = json.loads(store.get_bytes(index))["hash"]
                store.delete(keys.api_key(key_hash))
                removed += 1
            except (NotFound, ValueError, KeyError, TypeError, InvalidArgument):
                log.warning(
                    "api key index entry unreadable; its record is dead with the tenant", tenant=tenant
                )
        for job_id in list(store.list_children(keys.CHECKPOINTS)):
            removed += store.delete_prefix(keys.tenant_checkpoints(job_id, tenant))
        uploads = keys.uploads_prefix(tenant, store.settings.uploads_template)
        if not uploads.startswith(keys.tenant_root(tenant)):
            removed += store.delete_prefix(uploads)
        return removed + store.delete_prefix(keys.tenant_root(tenant))


class Registry:
    """One tenant's documents, contexts, datasets and adapters.

    ``uid`` is the tenant's creation uid, read once here: caches of derived state (adapters,
    contexts) key on it, so a tenant deleted and created again under the same name never meets
    the old one's entries.
    """

    def __init__(self, store: ObjectStore, tenant: str) -> None:
        keys.validate_id("tenant", tenant)
        info = Tenants(store).info(tenant)
        if info is None:
            raise NotFound(f"tenant {tenant!r} not found")
        self._store = store
        self.tenant = tenant
        self.uid = info.uid
        self.created = info.created

    # -- documents ----------------------------------------------------------------------------

    def ingest_document(
        self, doc_id: str, text: bytes, max_bytes: int, tokens: int | None = None
    ) -> tuple[DocumentInfo, bool]:
        """Store ``text`` as ``doc_id``. Returns the document and whether anything changed.

        The same text again is a no-op; new text replaces the old one and removes the contexts
        computed from it (they would be stale).
        """
        keys.validate_id("document", doc_id)
        if not isinstance(text, bytes | bytearray):
            raise InvalidArgument(f"document {doc_id!r}: text must be bytes, got {type(text).__name__}")
        if len(text) > max_bytes:
            raise InvalidArgument(
                f"document {doc_id!r} is {len(text)} bytes, over the limit of {max_bytes} bytes"
            )
        document_text(doc_id, text)
        if tokens is not None and tokens < 0:
            raise InvalidArgument(f"document {doc_id!r}: tokens must be >= 0, got {tokens}")
        sha = hashlib.sha256(text).hexdigest()
        previous = self._document_or_none(doc_id)
        if previous is not None and previous.sha256 == sha:
            return previous, False
        now = _now()
        info = DocumentInfo(
            tenant=self.tenant,
            doc_id=doc_id,
            sha256=sha,
            bytes=len(text),
            tokens=tokens,
            created=previous.created if previous else now,
            updated=now,
        )
        self._store.put_bytes(keys.doc_source(self.tenant, doc_id), bytes(text), "text/plain; charset=utf-8")
        self._store.put_bytes(
            keys.doc_meta(self.tenant, doc_id), _json_bytes(_document_json(info)), "application/json"
        )
        if previous is not None:
            self._delete_contexts(doc_id)
        log.info(
            "document ingested",
            tenant=self.tenant,
            doc=doc_id,
            bytes=len(text),
            replaced=previous is not None,
        )
        return info, True

    def get_document(self, doc_id: str) -> DocumentInfo:
        info = self._document_or_none(doc_id)
        if info is None:
            raise NotFound(f"document {doc_id!r} not found")
        return info

    def read_text(self, doc_id: str) -> str:
        """The document's text.

        Raises:
            NotFound: no such document.
            FailedPrecondition: the stored bytes are not UTF-8 (ingest checks; another writer may not have).
        """
        try:
            data = self._store.get_bytes(keys.doc_source(self.tenant, doc_id))
        except NotFound:
            raise NotFound(f"document {doc_id!r} not found") from None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise FailedPrecondition(
                f"document {doc_id!r}: not valid UTF-8 (byte {error.start}: {error.reason})"
            ) from None

    def list_documents(self, page_size: int, page_token: str = "") -> tuple[list[DocumentInfo], str]:
        """One page of documents and the token of the next page ("" after the last)."""
        if page_size < 0:
            raise InvalidArgument(f"page_size must be >= 0, got {page_size}")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_page_token(page_token)
        names = list(
            self._store.list_children(keys.docs_prefix(self.tenant), start_after=after, limit=size + 1)
        )
        documents = [info for info in map(self._document_or_none, names[:size]) if info is not None]
        next_token = _encode_page_token(names[size - 1]) if len(names) > size else ""
        return documents, next_token

    def delete_document(self, doc_id: str) -> None:
        """Delete the document, its contexts and every dataset row naming it.

        The metadata goes last, so a delete cut short leaves the document listed and can be retried.
        """
        self.get_document(doc_id)
        for name in self.list_datasets():
            rows = self.read_dataset(name)
            kept = [row for row in rows if doc_id not in row.doc_ids]
            if len(kept) != len(rows):
                self._write_dataset(name, kept)
                log.info("dataset rows removed", tenant=self.tenant, dataset=name, rows=len(rows) - len(kept))
        self._delete_contexts(doc_id)
        self._store.delete(keys.doc_source(self.tenant, doc_id))
        self._store.delete(keys.doc_meta(self.tenant, doc_id))
        log.info("document deleted", tenant=self.tenant, doc=doc_id)

    def _document_or_none(self, doc_id: str) -> DocumentInfo | None:
        try:
            data = self._store.get_bytes(keys.doc_meta(self.tenant, doc_id))
        except NotFound:
            return None
        return _document_from_json(self.tenant, json.loads(data))

    def _document_ids(self) -> Iterator[str]:
        return self._store.list_children(keys.docs_prefix(self.tenant))

    # -- contexts -----------------------------------------------------------------------------

    def put_context(
        self,
        doc_id: str,
        compressor_id: str,
        vectors: torch.Tensor,
        source_sha: str,
        segment_len: int,
        k: int,
    ) -> ContextInfo:
        """Store a document's summary vectors ``[n_vectors, dim]`` (as bf16) computed from ``source_sha``.

        FailedPrecondition if the document changed since (the context would be stale at once).
        """
        keys.validate_id("compressor", compressor_id)
        if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2 or not vectors.is_floating_point():
            raise InvalidArgument("context vectors must be a floating-point tensor [n_vectors, dim]")
        if vectors.shape[0] == 0 or vectors.shape[1] == 0:
            raise InvalidArgument(f"context vectors must be non-empty, got shape {tuple(vectors.shape)}")
        if segment_len < 1 or k < 1:
            raise InvalidArgument(f"segment_len and k must be >= 1, got {segment_len} and {k}")
        current = self.get_document(doc_id).sha256
        if source_sha != current:
            raise FailedPrecondition(
                f"document {doc_id!r} changed while it was compressed (compressed {source_sha[:12]}, "
                f"now {current[:12]}); compress it again"
            )
        info = ContextInfo(
            tenant=self.tenant,
            doc_id=doc_id,
            compressor_id=compressor_id,
            source_sha=source_sha,
            segment_len=int(segment_len),
            k=int(k),
            dtype=str(CONTEXT_DTYPE).removeprefix("torch."),
            n_vectors=int(vectors.shape[0]),
            dim=int(vectors.shape[1]),
        )
        tensor = vectors.detach().to(device="cpu", dtype=CONTEXT_DTYPE).contiguous()
        data = save_safetensors({CONTEXT_TENSOR: tensor}, metadata=_context_metadata(info))
        self._store.put_bytes(
            keys.context(self.tenant, compressor_id, doc_id), data, "application/octet-stream"
        )
        return info

    def get_context(self, doc_id: str, compressor_id: str) -> tuple[torch.Tensor, ContextInfo]:
        """The summary vectors and their metadata; FailedPrecondition if the document changed since."""
        try:
            data = self._store.get_bytes(keys.context(self.tenant, compressor_id, doc_id))
        except NotFound:
            raise NotFound(f"no context of document {doc_id!r} for compressor {compressor_id!r}") from None
        info = self._context_from_metadata(doc_id, _safetensors_metadata(data))
        current = self.get_document(doc_id).sha256
        if info.source_sha != current:
            raise FailedPrecondition(
                f"context of document {doc_id!r} for compressor {compressor_id!r} is stale (made from "
                f"{info.source_sha[:12]}, document is now {current[:12]}); compress it again"
            )
        return load_safetensors(data)[CONTEXT_TENSOR], info

    def context_info(self, doc_id: str, compressor_id: str) -> ContextInfo | None:
        """The stored context's metadata (fresh or stale: compare ``source_sha``), None if there is none."""
        key = keys.context(self.tenant, compressor_id, doc_id)
        try:
            with self._store.open_stream(key) as stream:
                metadata = _safetensors_metadata_from_stream(stream)
        except NotFound:
            return None
        return self._context_from_metadata(doc_id, metadata)

    def pending_documents(self, compressor_id: str) -> list[DocumentInfo]:
        """Documents with no context for ``compressor_id``, or only a stale one."""
        prefix = keys.contexts_prefix(self.tenant, compressor_id)
        with_context = {
            key[len(prefix) : -len(keys.CONTEXT_SUFFIX)]
            for key in self._store.list_keys(prefix)
            if key.endswith(keys.CONTEXT_SUFFIX)
        }
        pending = []
        for doc_id in self._document_ids():
            info = self._document_or_none(doc_id)
            if info is None:
                continue
            if doc_id in with_context:
                context = self.context_info(doc_id, compressor_id)
                if context is not None and context.source_sha == info.sha256:
                    continue
            pending.append(info)
        return pending

    def _delete_contexts(self, doc_id: str) -> None:
        for compressor_id in list(self._store.list_children(keys.contexts_prefix(self.tenant))):
            self._store.delete(keys.context(self.tenant, compressor_id, doc_id))

    def _context_from_metadata(self, doc_id: str, metadata: dict[str, str]) -> ContextInfo:
        try:
            return ContextInfo(
                tenant=self.tenant,
                doc_id=doc_id,
                compressor_id=metadata["compressor_id"],
                source_sha=metadata["source_sha"],
                segment_len=int(metadata["segment_len"]),
                k=int(metadata["k"]),
                dtype=metadata["dtype"],
                n_vectors=int(metadata["n_vectors"]),
                dim=int(metadata["dim"]),
            )
        except (KeyError, ValueError) as error:
            raise Internal(f"context of document {doc_id!r} has broken metadata ({error!r})") from error

    # -- datasets -----------------------------------------------------------------------------

    def put_dataset(self, name: str, jsonl: bytes) -> int:
        """Validate and store a JSONL dataset; returns its number of rows."""
        keys.validate_id("dataset", name)
        try:
            text = bytes(jsonl).decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidArgument(f"dataset {name!r} is not valid UTF-8 (byte {error.start})") from error
        known = set(self._document_ids())
        rows = [
            _parse_row(number, line, known)
            for number, line in enumerate(text.split("\n"), start=1)
            if line.strip()
        ]
        if not rows:
            raise InvalidArgument(f"dataset {name!r} has no rows")
        self._write_dataset(name, rows)
        log.info("dataset stored", tenant=self.tenant, dataset=name, rows=len(rows))
        return len(rows)

    def read_dataset(self, name: str) -> list[DatasetRow]:
        """The rows of a stored dataset.

        Raises:
            NotFound: no such dataset.
            Internal: the stored object is not what ``put_dataset`` writes (another writer changed it).
        """
        try:
            data = self._store.get_bytes(keys.dataset(self.tenant, name))
        except NotFound:
            raise NotFound(f"dataset {name!r} not found") from None
        rows = []
        try:
            for line in data.decode("utf-8").split("\n"):
                if not line:
                    continue
                row = json.loads(line)
                rows.append(
                    DatasetRow(doc_ids=tuple(row["doc_ids"]), question=row["question"], answer=row["answer"])
                )
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, RecursionError):
            raise Internal(f"dataset {name!r} is damaged in the store; upload it again") from None
        return rows

    def list_datasets(self) -> list[str]:
        prefix = keys.datasets_prefix(self.tenant)
        return [
            key[len(prefix) : -len(keys.DATASET_SUFFIX)]
            for key in self._store.list_keys(prefix)
            if key.endswith(keys.DATASET_SUFFIX) and "/" not in key[len(prefix) :]
        ]

    def _write_dataset(self, name: str, rows: list[DatasetRow]) -> None:
        lines = (
            json.dumps(
                {"doc_ids": list(row.doc_ids), "question": row.question, "answer": row.answer},
                ensure_ascii=False,
            )
            for row in rows
        )
        data = "".join(f"{line}\n" for line in lines).encode("utf-8")
        self._store.put_bytes(keys.dataset(self.tenant, name), data, "application/jsonl")

    # -- adapters -----------------------------------------------------------------------------

    def publish_adapter(self, name: str, files: dict[str, bytes], train: dict[str, Any]) -> AdapterVersion:
        """Store ``files`` (PEFT format) as the next version of adapter ``name`` and make it current.

        Files first, then the manifest (``train.json``: what makes the version exist), then the
        ``current`` pointer. One publisher per adapter at a time.
        """
        keys.validate_id("adapter", name)
        config = _adapter_config(files)
        for filename in files:
            keys.validate_id("adapter file", filename)
            if filename == ADAPTER_MANIFEST:
                raise InvalidArgument(f"adapter file name {ADAPTER_MANIFEST!r} is reserved for the manifest")
        try:
            train_json = json.loads(json.dumps(train))
        except (TypeError, ValueError) as error:
            raise InvalidArgument(f"adapter train info must be JSON-serializable: {error}") from error
        existing = self._version_names(name)
        version = keys.version_name(keys.version_number(existing[-1]) + 1 if existing else 1)
        for filename, data in files.items():
            self._store.put_bytes(keys.adapter_file(self.tenant, name, version, filename), bytes(data))
        manifest = {
            "version": version,
            "created": _now().isoformat(),
            "base_model": str(config.get("base_model_name_or_path") or ""),
            "rank": int(config["r"]),
            "files": {filename: hashlib.sha256(data).hexdigest() for filename, data in files.items()},
            "train": train_json,
        }
        self._store.put_bytes(
            keys.adapter_file(self.tenant, name, version, ADAPTER_MANIFEST),
            _json_bytes(manifest),
            "application/json",
        )
        self._store.put_bytes(keys.adapter_current(self.tenant, name), version.encode(), "text/plain")
        log.info("adapter published", tenant=self.tenant, adapter=name, version=version)
        return _adapter_version(self.tenant, name, manifest, current=True)

    def list_adapters(self) -> list[str]:
        """Adapters with a current version."""
        return [
            name
            for name in self._store.list_children(keys.adapters_prefix(self.tenant))
            if self._store.exists(keys.adapter_current(self.tenant, name))
        ]

    def list_versions(self, name: str) -> list[AdapterVersion]:
        """Every complete version of ``name``, oldest first."""
        current = self._current_version(name)
        return [
            _adapter_version(self.tenant, name, self._manifest(name, version), current=version == current)
            for version in self._version_names(name)
        ]

    def get_adapter(self, name: str, version: str | None = None) -> AdapterVersion:
        """``version`` of adapter ``name``; None means the current one."""
        current = self._current_or_none(name)
        if version is None:
            if current is None:
                raise NotFound(f"adapter {name!r} not found")
            version = current
        manifest = self._manifest(name, keys.validate_version(version))
        return _adapter_version(self.tenant, name, manifest, current=version == current)

    def read_adapter_files(self, name: str, version: str) -> dict[str, bytes]:
        """The PEFT files of one version, checked against its manifest."""
        manifest = self._manifest(name, version)
        files = {}
        for filename, sha in manifest["files"].items():
            data = self._store.get_bytes(keys.adapter_file(self.tenant, name, version, filename))
            if hashlib.sha256(data).hexdigest() != sha:
                raise Internal(f"adapter {name!r} {version}: {filename} does not match its manifest")
            files[filename] = data
        return files

    def set_current(self, name: str, version: str) -> AdapterVersion:
        """Point ``current`` at an existing version (rollback or pin)."""
        manifest = self._manifest(name, keys.validate_version(version))
        self._store.put_bytes(keys.adapter_current(self.tenant, name), version.encode(), "text/plain")
        log.info("adapter current set", tenant=self.tenant, adapter=name, version=version)
        return _adapter_version(self.tenant, name, manifest, current=True)

    def _current_version(self, name: str) -> str:
        current = self._current_or_none(name)
        if current is None:
            raise NotFound(f"adapter {name!r} not found")
        return current

    def _current_or_none(self, name: str) -> str | None:
        try:
            return self._store.get_bytes(keys.adapter_current(self.tenant, name)).decode().strip()
        except NotFound:
            return None

    def _manifest(self, name: str, version: str) -> dict[str, Any]:
        try:
            data = self._store.get_bytes(keys.adapter_file(self.tenant, name, version, ADAPTER_MANIFEST))
        except NotFound:
            raise NotFound(f"adapter {name!r} has no version {version!r}") from None
        return json.loads(data)

    def _version_names(self, name: str) -> list[str]:
        """Complete versions (manifest written), oldest first."""
        prefix = keys.adapter_prefix(self.tenant, name)
        manifests = (
            key[len(prefix) :].split("/")[0]
            for key in self._store.list_keys(prefix)
            if key.endswith(f"/{ADAPTER_MANIFEST}")
        )
        return sorted(manifests, key=keys.version_number)


# -- helpers ------------------------------------------------------------------------------------

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


def _now() -> datetime:
    return datetime.now(UTC)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True).encode("utf-8")


def _document_json(info: DocumentInfo) -> dict[str, Any]:
    return {
        "doc_id": info.doc_id,
        "sha256": info.sha256,
        "bytes": info.bytes,
        "tokens": info.tokens,
        "created": info.created.isoformat(),
        "updated": info.updated.isoformat(),
    }


def _document_from_json(tenant: str, data: dict[str, Any]) -> DocumentInfo:
    return DocumentInfo(
        tenant=tenant,
        doc_id=data["doc_id"],
        sha256=data["sha256"],
        bytes=data["bytes"],
        tokens=data["tokens"],
        created=datetime.fromisoformat(data["created"]),
        updated=datetime.fromisoformat(data["updated"]),
    )


def _encode_page_token(last: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": last}).encode()).decode()


def _decode_page_token(token: str) -> str | None:
    if not token:
        return None
    try:
        after = json.loads(base64.urlsafe_b64decode(token.encode()))["after"]
        return keys.validate_id("document", after)
    except (binascii.Error, ValueError, KeyError, TypeError, LlocoError) as error:
        raise InvalidArgument(f"invalid page_token {token[:40]!r}") from error


def _context_metadata(info: ContextInfo) -> dict[str, str]:
    return {
        "compressor_id": info.compressor_id,
        "source_sha": info.source_sha,
        "segment_len": str(info.segment_len),
        "k": str(info.k),
        "dtype": info.dtype,
        "n_vectors": str(info.n_vectors),
        "dim": str(info.dim),
    }


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob: an 8-byte little-endian header length, then JSON."""
    (length,) = struct.unpack("<Q", data[:8])
    return _header_metadata(data[8 : 8 + length])


def _safetensors_metadata_from_stream(stream: Any) -> dict[str, str]:
    """Like ``_safetensors_metadata`` but reads only the header, not the tensors."""
    (length,) = struct.unpack("<Q", stream.read(8))
    if length > _SAFETENSORS_HEADER_LIMIT:
        raise Internal(f"safetensors header of {length} bytes is implausible")
    return _header_metadata(stream.read(length))


def _header_metadata(header: bytes) -> dict[str, str]:
    return dict(json.loads(header).get("__metadata__", {}))


def _parse_row(number: int, line: str, known_documents: set[str]) -> DatasetRow:
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
        raise InvalidArgument(f"line {number}: expected a JSON object with {', '.join(_DATASET_FIELDS)}")
    extra = sorted(set(row) - set(_DATASET_FIELDS))
    if extra:
        raise InvalidArgument(f"line {number}: unknown field(s) {', '.join(map(repr, extra))}")
    for name in _DATASET_FIELDS:
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


def _adapter_config(files: dict[str, bytes]) -> dict[str, Any]:
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


def _adapter_version(tenant: str, name: str, manifest: dict[str, Any], current: bool) -> AdapterVersion:
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
