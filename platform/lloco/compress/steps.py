"""The steps that turn one stored document into one stored context.

Both the Ray Data job (``pipeline.py``) and the online path (``online.py``) run exactly these
functions, so a context does not depend on which of them made it:

1. ``read_document`` + ``prepare``: the stored text (strict UTF-8), its sha256 (the context is
   labelled with the sha of what was compressed, not of what the metadata said when the job began),
   token ids, and the checks that make a document bad (empty, undecodable, over the token cap):
   a bad document raises ``BadDocument`` with a short reason. The online path may instead be handed
   the ``PreparedDocument`` the edge made of the text it stored (``PreparedDocument.mismatch`` says
   when it may not stand for the stored one).
2. ``compress_many``: the compressor over many documents at once (it batches the i-th segments of
   all of them); a failing batch is retried one document at a time, so one bad input fails alone.
3. ``store_context``: checks the vector count against the segment count, then writes the context
   with ``Registry.put_context`` (one whole-object PUT: a reader sees all of it or nothing).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lloco.errors import FailedPrecondition, Internal, InvalidArgument, LlocoError
from lloco.model import Compressor, CompressorConfig
from lloco.registry import ContextInfo, Registry, Segment
from lloco.registry.records import check_segments

STORAGE_DTYPE = torch.bfloat16  # what Registry.put_context stores; casting earlier halves the transfer


class BadDocument(InvalidArgument):
    """A document that cannot be compressed as stored; ``reason`` says why in a few words."""

    def __init__(self, tenant: str, doc_id: str, reason: str) -> None:
        super().__init__(f"document {doc_id!r} of tenant {tenant!r}: {reason}")
        self.tenant = tenant
        self.doc_id = doc_id
        self.reason = reason


@dataclass(frozen=True)
class PreparedDocument:
    """A document ready for the compressor."""

    tenant: str
    doc_id: str
    source_sha: str  # sha256 of the bytes token_ids were made from
    token_ids: list[int]
    segments: tuple[Segment, ...]  # the segment table stored with the context (Registry.put_context)

    def mismatch(self, current_sha: str, segment_len: int) -> str | None:
        """Why this document may not stand for the stored one whose sha256 is ``current_sha``, cut into
        segments of ``segment_len`` tokens (None: it may). It may not when it is of another text (the
        document was rewritten since), has no tokens, or its segment table is not ``tokenize_segments``'
        cut of its token ids (``check_segments`` for the order of the character spans)."""
        if self.source_sha != current_sha:
            return f"made from {self.source_sha[:12]}, the document is now {current_sha[:12]}"
        if not self.token_ids:
            return "no tokens"
        n = len(self.token_ids)
        cut = [(start, min(start + segment_len, n)) for start in range(0, n, segment_len)]
        if [(s.token_start, s.token_end) for s in self.segments] != cut:
            return f"its segments do not cut its {n} tokens into segments of {segment_len}"
        try:
            check_segments(self.segments, len(self.segments), 1, segment_len)
        except InvalidArgument as error:
            return str(error)
        return None


def read_document(registry: Registry, doc_id: str) -> str:
    """The stored text of a document.

    Raises:
        BadDocument: the stored bytes are not UTF-8 (ingest checks this; another writer may not have).
        NotFound: no such document.
    """
    try:
        return registry.read_text(doc_id)
    except FailedPrecondition as error:
        raise BadDocument(
            registry.tenant, doc_id, str(error).removeprefix(f"document {doc_id!r}: ")
        ) from None


def tokenize(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a whole document: the text alone, no special tokens (as the AutoCompressors encode
    contexts, as compressor pretraining cuts its segments, and as ingest and the engine count tokens)."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def count_segments(n_tokens: int, segment_len: int) -> int:
    return math.ceil(n_tokens / segment_len)


def tokenize_segments(tokenizer: Any, text: str, segment_len: int) -> tuple[list[int], tuple[Segment, ...]]:
    """``tokenize`` plus the segment table: segment i holds tokens ``[i*S, min((i+1)*S, n))`` and the text
    from its first token's start to the next segment's start (the last one: to the end), so the segments'
    texts tile the document and whitespace between tokens belongs to one of them. Needs a fast tokenizer
    (character offsets)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    token_ids = list(encoded["input_ids"])
    offsets = encoded["offset_mapping"]
    starts = [0] + [int(offsets[i][0]) for i in range(segment_len, len(token_ids), segment_len)]
    ends = starts[1:] + [len(text)]
    segments = tuple(
        Segment(i, i * segment_len, min((i + 1) * segment_len, len(token_ids)), start, end)
        for i, (start, end) in enumerate(zip(starts, ends, strict=True))
    )
    return token_ids, segments if token_ids else ()


def prepare(
    tenant: str, doc_id: str, text: str, tokenizer: Any, segment_len: int, max_tokens: int | None
) -> PreparedDocument:
    """Check and tokenize one document's text.

    Raises:
        BadDocument: empty (no text besides whitespace) or over ``max_tokens`` tokens (None: no cap).
    """
    data = text.encode("utf-8")  # decoding was strict, so these are the stored bytes exactly
    if not text.strip():
        raise BadDocument(tenant, doc_id, f"empty ({len(data)} bytes, no text)")
    token_ids, segments = tokenize_segments(tokenizer, text, segment_len)
    return within_limit(
        PreparedDocument(tenant, doc_id, hashlib.sha256(data).hexdigest(), token_ids, segments), max_tokens
    )


def within_limit(document: PreparedDocument, max_tokens: int | None) -> PreparedDocument:
    """``document``, checked against the token cap (None: no cap).

    Raises:
        BadDocument: over ``max_tokens`` tokens.
    """
    n = len(document.token_ids)
    if max_tokens is not None and n > max_tokens:
        raise BadDocument(
            document.tenant, document.doc_id, f"too long: {n} tokens, over the limit of {max_tokens}"
        )
    return document


def compress_many(
    compressor: Compressor, token_ids: Sequence[list[int]], batch_size: int
) -> list[torch.Tensor | LlocoError]:
    """Summaries ``[summary_positions(n), width]`` (bf16, on CPU) of each document, or the error that
    document alone raised.

    All documents go through one ``Compressor.compress`` call, ``batch_size`` segments per forward.
    If that call fails (a bad input, or memory for the whole batch), each document is tried alone.
    """
    try:
        vectors = compressor.compress(list(token_ids), batch_size)
    except (LlocoError, RuntimeError) as error:
        if len(token_ids) == 1:
            return [_as_lloco_error(error)]
        return [_compress_one(compressor, ids, batch_size) for ids in token_ids]
    return [v.to(device="cpu", dtype=STORAGE_DTYPE) for v in vectors]


def _compress_one(compressor: Compressor, ids: list[int], batch_size: int) -> torch.Tensor | LlocoError:
    try:
        (vectors,) = compressor.compress([ids], batch_size)
    except (LlocoError, RuntimeError) as error:
        return _as_lloco_error(error)
    return vectors.to(device="cpu", dtype=STORAGE_DTYPE)


def _as_lloco_error(error: Exception) -> LlocoError:
    if isinstance(error, LlocoError):
        return error
    return Internal(f"compressor failed: {type(error).__name__}: {error}")


def store_context(
    registry: Registry,
    compressor: CompressorConfig,
    doc_id: str,
    source_sha: str,
    segments: tuple[Segment, ...],
    vectors: torch.Tensor,
) -> ContextInfo:
    """Write one document's context, computed from the bytes whose sha256 is ``source_sha``.

    Raises:
        Internal: the vectors do not have the rows ``summary_positions`` says for the segments' tokens
            (compressor and segmentation disagree).
        FailedPrecondition: the document changed since it was read (from ``Registry.put_context``).
    """
    tokens = segments[-1].token_end if segments else 0
    if vectors.ndim != 2 or vectors.shape[0] != compressor.summary_positions(tokens):
        raise Internal(
            f"document {doc_id!r}: compressor returned {tuple(vectors.shape)} vectors for "
            f"{len(segments)} segments ({tokens} tokens) of k={compressor.k}"
        )
    return registry.put_context(
        doc_id, compressor.compressor_id, vectors, source_sha, compressor.segment_len, compressor.k, segments
    )
