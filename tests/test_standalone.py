"""The repository stands alone: no tracked file reaches for a directory beside the clone.

A development checkout may have other directories next to it (this one's team keeps reference data there);
a user's clone does not, and tests that pass here by reading them fail there. Third-party data the tests
need is committed under tests/data/ instead.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BESIDE_THE_CLONE = re.compile(r"\.\./shared\b|/work/share[d]\b|parents?\b[^\n]{0,40}/\s*[\"']shared[\"']")


def test_no_tracked_file_reads_a_directory_beside_the_clone() -> None:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    offenders = []
    for name in filter(None, listed.decode().split("\0")):
        path = REPO / name
        if not path.is_file() or path.suffix in {".gz", ".safetensors", ".npz"}:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        offenders += [
            f"{name}:{text.count(chr(10), 0, match.start()) + 1}: {match.group()}"
            for match in BESIDE_THE_CLONE.finditer(text)
        ]
    assert not offenders, "paths outside the repository:\n" + "\n".join(offenders)
