"""The import layering docs/internals.md states: every room imports only what its row of the table allows.

The table is read from docs/internals.md (one place for the fact) and every module under platform/lloco is
parsed with ``ast`` (nothing is imported), so a lazy import inside a function counts as much as one at the
top.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "platform" / "lloco"
INTERNALS = ROOT / "docs" / "internals.md"
TABLE_HEADING = "## Layering: which room may import which"
EDGE = re.compile(r"`(\w+)`(?:\s*\(only ([^)]*)\))?")


def allowed_edges(markdown: str) -> dict[str, dict[str, set[str] | None]]:
    """{room: {imported room: None (any module) or the only modules allowed}} from the layering table."""
    section = markdown.split(TABLE_HEADING, 1)[1].split("\n## ", 1)[0]
    table: dict[str, dict[str, set[str] | None]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        room = cells[0].strip("`")
        table[room] = {
            target: (set(re.findall(r"`([\w.]+)`", only)) if only else None)
            for target, only in EDGE.findall(cells[1])
        }
    return table


def room_of(module: str) -> str:
    """The room of a dotted module name under ``lloco`` ("lloco.serve.edge" -> "serve")."""
    return module.split(".")[1] if module.count(".") else ""


def module_name(package: Path, path: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    """Whether a dotted ``lloco.*`` name is a module or package of the real tree (not a class or function)."""
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute ``lloco.*`` import in the file: ``from x import y`` imports x.y when
    that is a module, else x."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.append((node.lineno, submodule if is_module(submodule) else node.module))
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}:{node.lineno}: a relative import; lloco imports absolutely")
    return [(line, name) for line, name in found if name == "lloco" or name.startswith("lloco.")]


def forbidden_imports(package: Path, table: dict[str, dict[str, set[str] | None]]) -> list[str]:
    """Every import of a module under ``package`` that ``table`` does not allow, as "file:line: a -> b"."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        source = room_of(module_name(package, path))
        rules = {} if source == "" else table.get(source)  # the lloco package itself imports no room
        if rules is None:
            problems.append(f"{path.relative_to(package)}: room {source!r} has no row in the layering table")
            continue
        for line, name in imported_modules(path):
            target = room_of(name)
            if target in ("", source):
                continue
            rule = rules.get(target, set())
            if rule is not None and name not in rule:
                problems.append(f"{path.relative_to(package)}:{line}: {source} -> {name}")
    return problems


def test_every_import_follows_the_layering_table() -> None:
    table = allowed_edges(INTERNALS.read_text())
    rooms = {room_of(module_name(PACKAGE, path)) for path in PACKAGE.rglob("*.py")} - {""}
    assert set(table) == rooms, "the layering table and the rooms under platform/lloco differ"
    assert forbidden_imports(PACKAGE, table) == []


@pytest.mark.parametrize(
    ("source", "text", "found"),
    [
        (
            "model/llama.py",
            "from lloco.serve.engine import EngineDeployment\n",
            "model -> lloco.serve.engine",
        ),
        ("model/llama.py", "def f():\n    import lloco.finetune.train\n", "model -> lloco.finetune.train"),
        (
            "serve/app.py",
            "from lloco.compress.online import compress_online\n",
            "serve -> lloco.compress.online",
        ),
        ("serve/app.py", "from lloco.compress import online\n", "serve -> lloco.compress.online"),
        ("eval/run.py", "from lloco.serve import engine\n", "eval -> lloco.serve"),
        ("newroom/x.py", "import json\n", "room 'newroom' has no row"),
    ],
)
def test_a_forbidden_edge_is_found(tmp_path: Path, source: str, text: str, found: str) -> None:
    table = allowed_edges(INTERNALS.read_text())
    package = tmp_path / "lloco"
    path = package / source
    path.parent.mkdir(parents=True)
    path.write_text(text)
    problems = forbidden_imports(package, table)
    assert len(problems) == 1 and found in problems[0]


def test_published_entry_points_and_own_room_pass(tmp_path: Path) -> None:
    table = allowed_edges(INTERNALS.read_text())
    package = tmp_path / "lloco"
    (package / "serve").mkdir(parents=True)
    (package / "serve" / "app.py").write_text(
        "from lloco import __version__\nfrom lloco.compress import compress_online\nfrom lloco.serve import edge\n"
    )
    assert forbidden_imports(package, table) == []
