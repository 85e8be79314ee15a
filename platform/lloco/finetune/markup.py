"""Markup to the text a reader sees: HTML without navigation, sidebars and indexes; POD, reST, man pages and
Vim help without markup. ``CONVERTERS`` maps a corpus source's format to its converter; ``tidy`` is the
whitespace clean-up every extracted text ends with.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from html.entities import name2codepoint
from html.parser import HTMLParser

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
    return tidy(_TEXINFO_NAVIGATION.sub("", "".join(extractor.parts)))


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
    return tidy(text)


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
    return tidy(text)


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
    return tidy("\n".join(lines))


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
    return tidy("\n\n".join(part.strip("\n") if not part.startswith("\n") else part for part in out))


def tidy(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\xa0", " ").splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


CONVERTERS: dict[str, Callable[[str], str]] = {
    "html": html_to_text,
    "pod": pod_to_text,
    "rst": rst_to_text,
    "vimhelp": vimhelp_to_text,
    "man": man_to_text,
}
