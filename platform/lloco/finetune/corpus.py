"""The compressor's pretraining corpus: long English text as token ids, in one file under a size cap.

Sources (nothing else): the HTML manuals of ``python3.11-doc`` and ``postgresql-doc-15`` and the POD pages
of ``perl-doc`` (Debian packages, fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``), and
the Wikipedia paragraphs of HotpotQA's train split (one document per question: its paragraphs joined).

Never the evaluation documents: every Wikipedia title that occurs in the HotpotQA test split (the last
20% of dev, from which ``lloco eval`` samples its questions and draws its haystack fillers) or that names
a SQuAD test article is left out, paragraph by paragraph; QMSum is not a source at all.

The file is a compressed ``.npz`` (see :class:`Corpus`): documents tokenized with the base model's
tokenizer, each followed by EOS, packed into a train stream and a held-out stream (a seeded ~4% of the
documents, for next-segment perplexity). ``build_corpus`` keeps the file under ``max_bytes`` (the GPU
host takes ~45 MB per call) by dropping documents in a seeded order.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from html.entities import name2codepoint
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np

from lloco.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from lloco.finetune.datasets import (
    HOTPOT_FILE,
    HOTPOT_TRAIN_FRACTION,
    SQUAD_FILE,
    SQUAD_TEST_ARTICLES,
    read_json,
)
from lloco.logs import get_logger

log = get_logger(__name__)

FORMAT = "lloco-corpus/1"
DEBIAN_PACKAGES = ("python3.11-doc", "postgresql-doc-15", "perl-doc")
MIN_DOCUMENT_CHARS = 500
HELD_OUT_FRACTION = 0.04

# Sphinx (Python) and DocBook (PostgreSQL) page furniture: navigation, search boxes, footers.
_SKIPPED_CLASSES = frozenset(
    {"sphinxsidebar", "related", "footer", "mobile-nav", "menu-wrapper", "inline-search", "headerlink",
     "navheader", "navfooter", "toc", "toctree-wrapper", "version_switcher_placeholder", "language_switcher_placeholder"}
)  # fmt: skip
_SKIPPED_TAGS = frozenset({"script", "style", "head", "nav", "form", "button", "noscript", "svg"})
_SKIPPED_ROLES = frozenset({"navigation", "search"})
_BLOCK_TAGS = frozenset(
    {"p", "div", "br", "li", "dt", "dd", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table",
     "section", "blockquote", "ul", "ol", "dl", "hr", "title"}
)  # fmt: skip
_VOID_TAGS = frozenset({"br", "hr", "img", "input", "meta", "link", "wbr", "col", "area", "base", "source"})
_SKIPPED_PAGES = re.compile(
    r"^(genindex.*|search|py-modindex|modindex|bookindex|index|contents|copyright)\.html$"
)


@dataclass(frozen=True)
class Document:
    """One long text of the corpus and where it came from."""

    source: str  # "python-doc", "postgresql-doc", "perl-doc", "hotpotqa"
    name: str
    text: str


# -- Debian documentation --------------------------------------------------------------------------


def fetch_debian_docs(work_dir: Path, packages: Iterable[str] = DEBIAN_PACKAGES) -> Path:
    """Download the packages (``apt-get download``) and unpack them (``dpkg-deb -x``); returns the root.

    Idempotent: a package already unpacked under ``work_dir`` is not fetched again.

    Raises:
        Unavailable: apt-get or dpkg-deb failed (no network, unknown package).
    """
    work_dir = Path(work_dir)
    debs, root = work_dir / "debs", work_dir / "root"
    debs.mkdir(parents=True, exist_ok=True)
    for package in packages:
        marker = work_dir / f".{package}.unpacked"
        if marker.exists():
            continue
        _run(["apt-get", "download", package], debs)
        deb = max(debs.glob(f"{package}_*.deb"), key=lambda path: path.stat().st_mtime)
        _run(["dpkg-deb", "-x", str(deb), str(root)], work_dir)
        marker.touch()
    return root


def _run(command: list[str], cwd: Path) -> None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise Unavailable(f"{' '.join(command)} failed: {error}") from error
    if done.returncode != 0:
        raise Unavailable(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")


def debian_documents(root: Path) -> Iterator[Document]:
    """The manual pages under an unpacked root, as plain text, in a stable (sorted) order."""
    sources = (
        ("python-doc", sorted((root / "usr/share/doc/python3.11/html").rglob("*.html")), html_to_text),
        ("postgresql-doc", sorted((root / "usr/share/doc/postgresql-doc-15/html").glob("*.html")), html_to_text),
        ("perl-doc", sorted(root.glob("usr/share/perl/*/pod/*.pod")), pod_to_text),
    )  # fmt: skip
    for source, paths, convert in sources:
        for path in paths:
            if _SKIPPED_PAGES.match(path.name) or "_static" in path.parts or "_sources" in path.parts:
                continue
            text = convert(path.read_text(encoding="utf-8", errors="replace"))
            if len(text) >= MIN_DOCUMENT_CHARS:
                yield Document(source, path.relative_to(root).as_posix(), text)


class _TextExtractor(HTMLParser):
    """Visible text of a page, with page furniture (navigation, sidebars, footers) left out."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._stack: list[tuple[str, bool]] = []  # (tag, skipped)
        self._pre = 0

    @property
    def _skipping(self) -> bool:
        return bool(self._stack) and self._stack[-1][1]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        classes = set((values.get("class") or "").split())
        skipped = (
            self._skipping
            or tag in _SKIPPED_TAGS
            or bool(classes & _SKIPPED_CLASSES)
            or values.get("role") in _SKIPPED_ROLES
        )
        if tag in _BLOCK_TAGS and not self._skipping:
            self.parts.append("\n")
        if tag in _VOID_TAGS:
            return
        self._stack.append((tag, skipped))
        if tag == "pre" and not skipped:
            self._pre += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID_TAGS or all(open_tag != tag for open_tag, _ in self._stack):
            return
        while self._stack:  # close unclosed inner tags too (<p> without </p>)
            open_tag, skipped = self._stack.pop()
            if open_tag == "pre" and not skipped:
                self._pre -= 1
            if open_tag == tag:
                break
        if tag in _BLOCK_TAGS and not self._skipping:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data if self._pre else re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """Readable text of an HTML page: paragraphs on their own lines, code blocks kept as they are."""
    extractor = _TextExtractor()
    extractor.feed(html)
    extractor.close()
    return _tidy("".join(extractor.parts))


_POD_CODE = re.compile(r"([A-Z])<([^<>]*)>")
_POD_CODE_LONG = re.compile(r"([A-Z])<{2,}\s+(.*?)\s+>{2,}", re.DOTALL)
_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'"}


def _pod_escape(body: str) -> str:
    """E<...>: a name (lt, gt, HTML entity names) or a number (0x hex, 0 octal, else decimal)."""
    if body in _POD_ESCAPES:
        return _POD_ESCAPES[body]
    if body in name2codepoint:
        return chr(name2codepoint[body])
    try:
        if body.lower().startswith("0x"):
            return chr(int(body, 16))
        return chr(int(body, 8) if body.startswith("0") and len(body) > 1 else int(body))
    except ValueError:
        return ""


def _pod_code(match: re.Match[str]) -> str:
    code, body = match[1], match[2]
    if code in ("X", "Z"):
        return ""
    if code == "E":
        return _pod_escape(body)
    if code == "L":
        return body.split("|", 1)[0] if "|" in body else body.replace('"', "")
    return body


def pod_to_text(pod: str) -> str:
    """Plain text of a Perl POD page: headings and items as lines, formatting codes resolved."""
    lines: list[str] = []
    in_pod, skipping = True, False
    for line in pod.splitlines():
        if line.startswith("="):
            command, _, rest = line[1:].partition(" ")
            in_pod = command != "cut"
            if command in ("begin", "for"):
                skipping = command == "begin" and not rest.strip().startswith("text")
            elif command == "end":
                skipping = False
            elif command.startswith("head") or command == "item":
                lines += ["", rest.strip(), ""]
            continue
        if in_pod and not skipping:
            lines.append(line)
    text = "\n".join(lines)
    text = _POD_CODE_LONG.sub(lambda m: _pod_code(m), text)
    for _ in range(4):  # nested codes resolve from the inside out
        text, count = _POD_CODE.subn(_pod_code, text)
        if count == 0:
            break
    return _tidy(text)


def _tidy(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\xa0", " ").splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# -- HotpotQA paragraphs ---------------------------------------------------------------------------


def evaluation_titles(data_dir: Path) -> set[str]:
    """Wikipedia titles the evaluation may show: the HotpotQA test split's and the SQuAD test articles'."""
    questions = read_json(data_dir / HOTPOT_FILE)
    cut = int(len(questions) * HOTPOT_TRAIN_FRACTION)
    titles = {title for question in questions[cut:] for title, _ in question["context"]}
    articles = read_json(data_dir / SQUAD_FILE)["data"]
    titles |= {articles[index]["title"].replace("_", " ") for index in SQUAD_TEST_ARTICLES}
    return titles


def hotpot_documents(data_dir: Path, excluded_titles: set[str]) -> Iterator[Document]:
    """One document per HotpotQA train-split question: its paragraphs not seen before and not excluded."""
    questions = read_json(data_dir / HOTPOT_FILE)
    seen: set[str] = set()
    for question in questions[: int(len(questions) * HOTPOT_TRAIN_FRACTION)]:
        paragraphs = []
        for title, sentences in question["context"]:
            if title in excluded_titles or title in seen:
                continue
            seen.add(title)
            paragraphs.append(f"{title}\n{''.join(sentences).strip()}")
        text = "\n\n".join(paragraphs)
        if len(text) >= MIN_DOCUMENT_CHARS:
            yield Document("hotpotqa", question["_id"], text)


# -- the corpus file -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """A loaded corpus file: two packed token streams and their document boundaries.

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
        """Read a corpus file; InvalidArgument if it is not one."""
        path = Path(path)
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

    def check_tokenizer(self, tokenizer: Any) -> None:
        """FailedPrecondition unless the corpus was tokenized by this tokenizer."""
        expected = self.meta["tokenizer_sha256"]
        if tokenizer_fingerprint(tokenizer) != expected:
            raise FailedPrecondition(
                f"the corpus was tokenized for {self.meta['model_id']} (tokenizer {expected[:12]}); "
                "rebuild it with this model's tokenizer (`lloco pretrain-corpus --model ...`)"
            )


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, normalization)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def _held_out(document: Document, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{document.source}:{document.name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _pack(docs: list[list[int]], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(doc) for doc in docs])
    tokens = np.fromiter((t for doc in docs for t in doc), dtype=dtype, count=int(offsets[-1]))
    return tokens, offsets


def _write(path: Path, train: list[list[int]], held_out: list[list[int]], meta: dict[str, Any]) -> int:
    dtype = np.dtype(np.uint16 if meta["vocab_size"] <= 2**16 else np.uint32)
    train_tokens, train_offsets = _pack(train, dtype)
    held_out_tokens, held_out_offsets = _pack(held_out, dtype)
    meta = {**meta, "train_tokens": int(train_offsets[-1]), "held_out_tokens": int(held_out_offsets[-1])}
    meta["train_documents"], meta["held_out_documents"] = len(train), len(held_out)
    staging = path.with_name(path.name + ".partial.npz")
    np.savez_compressed(
        staging,
        train_tokens=train_tokens,
        train_offsets=train_offsets,
        held_out_tokens=held_out_tokens,
        held_out_offsets=held_out_offsets,
        meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8),
    )
    staging.replace(path)
    return path.stat().st_size


def build_corpus(
    output: Path,
    tokenizer: Any,
    model_id: str,
    documents: Iterable[Document],
    max_bytes: int,
    held_out_fraction: float = HELD_OUT_FRACTION,
    seed: int = 0,
    excluded: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokenize ``documents`` and write a corpus file of at most ``max_bytes``; returns its metadata.

    Every document ends with the tokenizer's EOS. A seeded ``held_out_fraction`` of the documents (by a
    hash of their name, so the split does not move when the cap changes) forms the held-out stream. When
    the whole set does not fit, documents are dropped in a seeded order until the file fits.

    Raises:
        InvalidArgument: a cap too small for even the held-out stream, or no documents.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidArgument(f"the tokenizer of {model_id} has no EOS token")
    docs = list(documents)
    if not docs:
        raise InvalidArgument("no documents to build a corpus from")
    tokenized: list[list[int]] = []
    for start in range(0, len(docs), 256):
        batch = [doc.text for doc in docs[start : start + 256]]
        tokenized += [ids + [eos] for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]]
    held = [_held_out(doc, held_out_fraction, seed) for doc in docs]
    train_order = [i for i in range(len(docs)) if not held[i]]
    random.Random(seed).shuffle(train_order)
    held_out = [tokenized[i] for i in range(len(docs)) if held[i]]
    sources: dict[str, dict[str, int]] = {}
    meta = {
        "format": FORMAT,
        "model_id": model_id,
        "vocab_size": len(tokenizer),
        "eos_token_id": eos,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "held_out_fraction": held_out_fraction,
        "seed": seed,
        "max_bytes": max_bytes,
        "excluded": excluded or {},
    }
    keep = len(train_order)
    for _ in range(8):
        chosen = sorted(train_order[:keep])
        sources = {}
        for i in chosen + [i for i in range(len(docs)) if held[i]]:
            entry = sources.setdefault(docs[i].source, {"documents": 0, "tokens": 0})
            entry["documents"] += 1
            entry["tokens"] += len(tokenized[i])
        size = _write(output, [tokenized[i] for i in chosen], held_out, {**meta, "sources": sources})
        if size <= max_bytes:
            break
        if keep == 0:
            raise InvalidArgument(f"even the held-out stream alone takes {size} bytes, over {max_bytes}")
        keep = int(keep * max_bytes / size * 0.97)
    else:
        raise InvalidArgument(f"could not fit the corpus under {max_bytes} bytes")
    result = Corpus.load(output).meta
    log.info(
        "corpus written",
        path=str(output),
        bytes=size,
        train_tokens=result["train_tokens"],
        held_out_tokens=result["held_out_tokens"],
        documents_dropped=len(train_order) - keep,
    )
    return result


def default_documents(work_dir: Path, data_dir: Path) -> tuple[Iterator[Document], dict[str, Any]]:
    """The default sources (Debian manuals, HotpotQA train paragraphs) and a record of what was excluded."""
    root = fetch_debian_docs(work_dir)
    excluded_titles = evaluation_titles(data_dir)
    excluded = {
        "rule": "Wikipedia titles of the HotpotQA test split (last 20% of dev) and of SQuAD test articles",
        "titles": len(excluded_titles),
        "titles_sha256": hashlib.sha256("\n".join(sorted(excluded_titles)).encode()).hexdigest(),
    }

    def documents() -> Iterator[Document]:
        yield from debian_documents(root)
        yield from hotpot_documents(data_dir, excluded_titles)

    return documents(), excluded
