"""One tenant's registry: its documents, compressed contexts, datasets and versioned adapters.

A ``Registry`` is bound to one tenant and builds every key from that tenant, so no call on it can
reach another tenant's objects. Writes are whole-object PUTs; where several objects make one
thing (an adapter version), the object that makes it visible is written last:
``train.json`` (the version's manifest) after the version's files, the ``current`` pointer after
the manifest. A reader therefore sees a complete version or none.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from lloco.errors import FailedPrecondition, Internal, InvalidArgument, NotFound
from lloco.logs import get_logger
from lloco.registry import pages
from lloco.registry.index import TenantIndex
from lloco.registry.records import (
    ADAPTER_MANIFEST,
    CONTEXT_DTYPE,
    CONTEXT_TENSOR,
    AdapterVersion,
    ContextInfo,
    DatasetRow,
    DocumentInfo,
    Segment,
    adapter_config,
    adapter_version,
    check_segments,
    context_metadata,
    document_from_json,
    document_json,
    document_text,
    json_bytes,
    now,
    parse_row,
    safetensors_metadata,
    safetensors_metadata_from_stream,
    segments_from_rows,
)
from lloco.registry.tenants import Tenants
from lloco.storage import ObjectStore, keys

log = get_logger(__name__)


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
        moment = now()
        info = DocumentInfo(
            tenant=self.tenant,
            doc_id=doc_id,
            sha256=sha,
            bytes=len(text),
            tokens=tokens,
            created=previous.created if previous else moment,
            updated=moment,
        )
        self._store.put_bytes(keys.doc_source(self.tenant, doc_id), bytes(text), "text/plain; charset=utf-8")
        self._store.put_bytes(
            keys.doc_meta(self.tenant, doc_id), json_bytes(document_json(info)), "application/json"
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
        size = pages.page_size(page_size)
        after = pages.after("documents", page_token)
        if after is not None and not keys.is_id(after):  # it becomes part of a store listing's start key
            raise InvalidArgument(f"page_token {keys.show(page_token)} was not issued by this List call")
        names = list(
            self._store.list_children(keys.docs_prefix(self.tenant), start_after=after, limit=size + 1)
        )
        documents = [info for info in map(self._document_or_none, names[:size]) if info is not None]
        next_token = pages.page_token("documents", names[size - 1]) if len(names) > size else ""
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
        return document_from_json(self.tenant, json.loads(data))

    def document_ids(self) -> Iterator[str]:
        """Every document's id (store listing order)."""
        return self._store.list_children(keys.docs_prefix(self.tenant))

    # -- retrieval index ----------------------------------------------------------------------

    def index(self, compressor_id: str, max_segments: int | None = None) -> TenantIndex:
        """This tenant's retrieval index over ``compressor_id``'s segments (``lloco.registry.index``)."""
        return TenantIndex(self, self._store, compressor_id, max_segments)

    def _unindex(self, doc_id: str) -> None:
        """Drop a document's segments from every index of the tenant (its text changed or it is deleted)."""
        for compressor_id in list(self._store.list_children(keys.index_prefix(self.tenant))):
            self.index(compressor_id).remove([doc_id])

    # -- contexts -----------------------------------------------------------------------------

    def put_context(
        self,
        doc_id: str,
        compressor_id: str,
        vectors: torch.Tensor,
        source_sha: str,
        segment_len: int,
        k: int,
        segments: tuple[Segment, ...] = (),
    ) -> ContextInfo:
        """Store a document's summary vectors ``[n_vectors, dim]`` (as bf16) computed from ``source_sha``,
        with its segment table (``k`` vectors per segment, in order; ``records.check_segments``).

        FailedPrecondition if the document changed since (the context would be stale at once).
        """
        keys.validate_id("compressor", compressor_id)
        if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2 or not vectors.is_floating_point():
            raise InvalidArgument("context vectors must be a floating-point tensor [n_vectors, dim]")
        if vectors.shape[0] == 0 or vectors.shape[1] == 0:
            raise InvalidArgument(f"context vectors must be non-empty, got shape {tuple(vectors.shape)}")
        if segment_len < 1 or k < 1:
            raise InvalidArgument(f"segment_len and k must be >= 1, got {segment_len} and {k}")
        check_segments(tuple(segments), int(vectors.shape[0]), k, segment_len)
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
            segments=tuple(segments),
        )
        tensor = vectors.detach().to(device="cpu", dtype=CONTEXT_DTYPE).contiguous()
        data = save_safetensors({CONTEXT_TENSOR: tensor}, metadata=context_metadata(info))
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
        info = self._context_from_metadata(doc_id, safetensors_metadata(data))
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
                metadata = safetensors_metadata_from_stream(stream)
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
        for doc_id in self.document_ids():
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
        """Remove a document's contexts and its segments from the retrieval indexes."""
        for compressor_id in list(self._store.list_children(keys.contexts_prefix(self.tenant))):
            self._store.delete(keys.context(self.tenant, compressor_id, doc_id))
        self._unindex(doc_id)

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
                segments=segments_from_rows(json.loads(metadata.get("segments", "[]"))),
            )
        except (KeyError, ValueError, TypeError) as error:
            raise Internal(f"context of document {doc_id!r} has broken metadata ({error!r})") from error

    # -- datasets -----------------------------------------------------------------------------

    def put_dataset(self, name: str, jsonl: bytes) -> int:
        """Validate and store a JSONL dataset; returns its number of rows."""
        keys.validate_id("dataset", name)
        try:
            text = bytes(jsonl).decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidArgument(f"dataset {name!r} is not valid UTF-8 (byte {error.start})") from error
        known = set(self.document_ids())
        rows = [
            parse_row(number, line, known)
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
        config = adapter_config(files)
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
            "created": now().isoformat(),
            "base_model": str(config.get("base_model_name_or_path") or ""),
            "rank": int(config["r"]),
            "files": {filename: hashlib.sha256(data).hexdigest() for filename, data in files.items()},
            "train": train_json,
        }
        self._store.put_bytes(
            keys.adapter_file(self.tenant, name, version, ADAPTER_MANIFEST),
            json_bytes(manifest),
            "application/json",
        )
        self._store.put_bytes(keys.adapter_current(self.tenant, name), version.encode(), "text/plain")
        log.info("adapter published", tenant=self.tenant, adapter=name, version=version)
        return adapter_version(self.tenant, name, manifest, current=True)

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
            adapter_version(self.tenant, name, self._manifest(name, version), current=version == current)
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
        return adapter_version(self.tenant, name, manifest, current=version == current)

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
        return adapter_version(self.tenant, name, manifest, current=True)

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
