"""What each benchmark does with its result: sections that fail without ending the run; JSON and markdown."""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_section(
    result: dict[str, Any], name: str, fn: Callable[[], Any], cleanup: Callable[[], object]
) -> None:
    """``result[name] = fn()``; a failure goes to ``result["errors"]`` and the benchmark carries on."""
    try:
        result[name] = fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark reports what broke and goes to its next section
        result["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
        print(f"{name} failed: {exc!r}", flush=True)
        traceback.print_exc()  # to the log: where it broke, which the one-line error does not say
    cleanup()


UNFINISHED = (
    "Unfinished run: written after its last finished section; the run stopped before its end (a time limit, "
    "a crash), so the sections after it are missing."
)


def write_unfinished(
    out: Path, name: str, result: dict[str, Any], render: Callable[[dict[str, Any]], str]
) -> None:
    """The report as it stands after a section, marked unfinished. A GPU host's call ends at its time limit
    with whatever files the bench left: this way those are the sections it measured; the final
    ``write_report`` replaces them."""
    marked = result | {"unfinished": UNFINISHED}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(marked, indent=2, default=str))
    (out / f"{name}.md").write_text(f"> {UNFINISHED}\n\n{render(marked)}")


def write_report(out: Path, name: str, result: dict[str, Any], markdown: str) -> None:
    """``out/name.json`` and ``out/name.md``; the markdown also goes to stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"{name}.md").write_text(markdown)
    print(markdown, flush=True)
