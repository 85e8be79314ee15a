"""Compression inside the serving engine, right after ingest: the job's steps without Ray Data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lloco.compress.steps import (
    BadDocument,
    PreparedDocument,
    compress_many,
    prepare,
    read_document,
    store_context,
    within_limit,
)
from lloco.errors import InvalidArgument, LlocoError
from lloco.logs import get_logger
from lloco.model import Compressor, CompressorConfig
from lloco.registry import ContextInfo, DocumentInfo, Registry

log = get_logger(__name__)

ONLINE_BATCH_SIZE = 16  # segments per forward; online batches are a few small documents


def compress_online(
    registry: Registry,
    compressor: Compressor,
    doc_ids: list[str],
    max_tokens: int | None = None,
    prepared: Sequence[PreparedDocument] = (),
) -> list[ContextInfo]:
    """Compress ``doc_ids`` of ``registry``'s tenant now and store their contexts; one ContextInfo per id.
    The caller then adds them to the tenant's retrieval index (``Registry.index(...).update``), outside
    whatever exclusive section this ran in.

    A document whose context for this compressor is fresh is not compressed again. Every document is
    read and checked before any is compressed, so a bad one fails the call without partial work.

    ``prepared`` holds documents the caller has tokenized already (the edge, the text it just stored:
    ``tokenize_segments`` and the stored bytes' sha256), so they are neither read nor tokenized again.
    One is used only while it is the stored document (``PreparedDocument.mismatch``: same sha256, a
    segment table that cuts its ids by this compressor's segment_len); otherwise (a concurrent rewrite)
    the stored text is read and tokenized as without it. Either way the context is the same.

    Raises:
        NotFound: a document does not exist.
        InvalidArgument: a document is empty, not UTF-8, or longer than ``max_tokens`` (None: no cap).
        FailedPrecondition: a document changed while it was compressed.
    """
    config, tokenizer = compressor.config, compressor.base.tokenizer
    unique = list(dict.fromkeys(doc_ids))
    handed = {doc.doc_id: doc for doc in prepared if doc.tenant == registry.tenant}
    fresh: dict[str, ContextInfo] = {}
    todo: list[PreparedDocument] = []
    bad: list[BadDocument] = []
    for doc_id in unique:
        document = registry.get_document(doc_id)
        existing = registry.context_info(doc_id, config.compressor_id)
        if existing is not None and existing.source_sha == document.sha256:
            fresh[doc_id] = existing
            continue
        try:
            todo.append(_prepare(registry, document, handed.get(doc_id), tokenizer, config, max_tokens))
        except BadDocument as error:
            bad.append(error)
    if bad:
        raise InvalidArgument("; ".join(f"document {e.doc_id!r}: {e.reason}" for e in bad))
    results = compress_many(compressor, [doc.token_ids for doc in todo], ONLINE_BATCH_SIZE)
    for doc, vectors in zip(todo, results, strict=True):
        if isinstance(vectors, LlocoError):
            raise vectors
        fresh[doc.doc_id] = store_context(registry, config, doc.doc_id, doc.source_sha, doc.segments, vectors)
        log.info(
            "document compressed online",
            tenant=registry.tenant,
            doc=doc.doc_id,
            tokens=len(doc.token_ids),
            vectors=int(vectors.shape[0]),
            handed=doc is handed.get(doc.doc_id),  # tokenized by the caller, not read here
        )
    return [fresh[doc_id] for doc_id in doc_ids]


def _prepare(
    registry: Registry,
    document: DocumentInfo,
    handed: PreparedDocument | None,
    tokenizer: Any,
    config: CompressorConfig,
    max_tokens: int | None,
) -> PreparedDocument:
    """``handed`` while it is the stored ``document``, else the stored text read and tokenized.

    Raises:
        BadDocument: the document is empty, not UTF-8 or over ``max_tokens``.
    """
    if handed is not None:
        mismatch = handed.mismatch(document.sha256, config.segment_len)
        if mismatch is None:
            return within_limit(handed, max_tokens)
        log.info("handed document not used", tenant=registry.tenant, doc=document.doc_id, reason=mismatch)
    text = read_document(registry, document.doc_id)
    return prepare(registry.tenant, document.doc_id, text, tokenizer, config.segment_len, max_tokens)
