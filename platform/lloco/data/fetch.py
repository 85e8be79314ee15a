"""Download the public QA sets from their publishers into a QA data directory, every file pinned by sha256.

`lloco eval` and `lloco pretrain-corpus` read SQuAD 2.0 dev, HotpotQA dev (distractor) and QMSum from the
QA data directory (settings ``qa_data_dir``) in the layout of ``lloco.finetune.datasets``. The upstream
files never change, so each is pinned by its size and the sha256 of its bytes as published: a file already
in place with that content is kept, and a download that differs (a changed upstream file, a bad mirror, a
truncated transfer) is discarded and reported. SQuAD and HotpotQA are stored gzipped under the loaders'
names; QMSum's meetings and its license come from its GitHub repository at a pinned commit, file by file
(``qmsum-files.txt`` beside this module lists them). A mirror (``{mirror}/{dataset}/{path}``) serves the same
files to hosts that cannot reach the publishers.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO

from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from lloco.errors import FailedPrecondition, InvalidArgument, LlocoError, NotFound, Unavailable
from lloco.finetune.datasets import DATA_PATHS, HOTPOT_FILE, QMSUM_DIR, SQUAD_FILE

QMSUM_COMMIT = "83d7768c1f2b4dfeb091385d3dc7e239b8e5bb7e"
# Where each publisher serves its files; a RemoteFile's path is relative to these.
PUBLISHERS = {
    "squad": "https://rajpurkar.github.io/SQuAD-explorer/dataset/",
    "hotpotqa": "http://curtis.ml.cmu.edu/datasets/hotpot/",
    "qmsum": f"https://raw.githubusercontent.com/Yale-LILY/QMSum/{QMSUM_COMMIT}/",
}
DATASETS = tuple(DATA_PATHS)
QMSUM_MANIFEST = "qmsum-files.txt"
QMSUM_DATA_PREFIX = "data/ALL/"  # the repository's folder of all meetings, split in train/val/test
CHUNK_BYTES = 1 << 20
SHOWN_FAILURES = 5

# Failures of the connection (refused, reset, timed out, cut short), as opposed to the disk's.
NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException)

OnBytes = Callable[[int], None]


@dataclass(frozen=True)
class RemoteFile:
    """One upstream file: where it is published, where it goes, and what it must be."""

    dataset: str  # "squad" | "hotpotqa" | "qmsum"
    path: str  # under the publisher's URL, and under ``{mirror}/{dataset}/``
    target: str  # under the QA data directory
    size: int  # bytes as published
    sha256: str  # of the bytes as published
    gzipped: bool = False  # stored gzipped (the target's name ends in .gz)

    def url(self, mirror: str | None = None) -> str:
        base = f"{mirror.rstrip('/')}/{self.dataset}/" if mirror else PUBLISHERS[self.dataset]
        return base + self.path


def remote_files(datasets: Iterable[str] = DATASETS) -> list[RemoteFile]:
    """The pinned files of the named sets."""
    chosen = list(dict.fromkeys(datasets))
    unknown = sorted(set(chosen) - set(DATASETS))
    if unknown:
        raise InvalidArgument(f"unknown datasets {unknown}; choose from {', '.join(DATASETS)}")
    files: list[RemoteFile] = []
    if "squad" in chosen:
        files.append(
            RemoteFile(
                "squad",
                "dev-v2.0.json",
                SQUAD_FILE,
                4_370_528,
                "80a5225e94905956a6446d296ca1093975c4d3b3260f1d6c8f68bc2ab77182d8",
                gzipped=True,
            )
        )
    if "hotpotqa" in chosen:
        files.append(
            RemoteFile(
                "hotpotqa",
                "hotpot_dev_distractor_v1.json",
                HOTPOT_FILE,
                46_320_117,
                "4e9ecb5c8d3b719f624d66b60f8d56bf227f03914f5f0753d6fa1b359d7104ea",
                gzipped=True,
            )
        )
    if "qmsum" in chosen:
        manifest = resources.files("lloco.data").joinpath(QMSUM_MANIFEST).read_text(encoding="utf-8")
        for line in manifest.splitlines():
            sha256, size, path = line.split()
            target = f"{QMSUM_DIR}/{path.removeprefix(QMSUM_DATA_PREFIX)}"
            files.append(RemoteFile("qmsum", path, target, int(size), sha256))
    return files


def missing(dest: Path, files: Iterable[RemoteFile]) -> list[RemoteFile]:
    """The files not yet in ``dest`` with their pinned content (a damaged or changed copy counts as missing)."""
    return [file for file in files if not _in_place(dest, file)]


def download(
    dest: Path,
    files: Iterable[RemoteFile],
    mirror: str | None = None,
    on_bytes: OnBytes | None = None,
    workers: int = 4,
    timeout_s: float = 60.0,
) -> None:
    """Download ``files`` into ``dest``, a few at a time; each lands only when its size and sha256 match.

    When some fail, the others still finish (and stay); then the first failure's error (NotFound for HTTP
    404, Unavailable for the network after three tries, FailedPrecondition for a size or sha256 mismatch)
    is raised naming every failed file. ``on_bytes`` counts progress (negative when a try is undone).
    """
    files = list(files)
    failures: list[LlocoError] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        running = [pool.submit(_download, file, dest, mirror, on_bytes, timeout_s) for file in files]
        for done in as_completed(running):
            try:
                done.result()
            except LlocoError as error:
                failures.append(error)
    if failures:
        shown = "; ".join(str(error) for error in failures[:SHOWN_FAILURES])
        more = f" (and {len(failures) - SHOWN_FAILURES} more)" if len(failures) > SHOWN_FAILURES else ""
        raise type(failures[0])(f"{len(failures)} of {len(files)} files failed: {shown}{more}")


def sha256_of(path: Path, gzipped: bool) -> str:
    """The sha256 of a stored file's content as published (decompressed when stored gzipped)."""
    digest = hashlib.sha256()
    with gzip.open(path, "rb") if gzipped else path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _in_place(dest: Path, file: RemoteFile) -> bool:
    path = dest / file.target
    if not path.is_file() or (not file.gzipped and path.stat().st_size != file.size):
        return False
    try:
        return sha256_of(path, file.gzipped) == file.sha256
    except (OSError, EOFError):  # a damaged gzip file is fetched again
        return False


@retry(
    retry=retry_if_exception_type(Unavailable),
    stop=stop_after_attempt(3),
    wait=wait_exponential(multiplier=1, max=8),
    reraise=True,
)
def _download(
    file: RemoteFile, dest: Path, mirror: str | None, on_bytes: OnBytes | None, timeout_s: float
) -> None:
    """Stream one file into a ``.part`` beside its target, check size and sha256, then move it in place."""
    url = file.url(mirror)
    target = dest / file.target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f"{target.name}.part")
    digest, size, counted = hashlib.sha256(), 0, 0
    try:
        with _open(url, timeout_s) as response, part.open("wb") as raw, contextlib.ExitStack() as stack:
            sink: IO[bytes] = (
                stack.enter_context(gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0))
                if file.gzipped
                else raw
            )
            while chunk := response.read(CHUNK_BYTES):
                size += len(chunk)
                if size > file.size:
                    break  # not the pinned file; stop reading it
                digest.update(chunk)
                sink.write(chunk)
                if on_bytes:
                    on_bytes(len(chunk))
                    counted += len(chunk)
        if size != file.size or digest.hexdigest() != file.sha256:
            got = (
                f"more than {file.size} bytes"
                if size > file.size
                else f"{size} bytes, sha256 {digest.hexdigest()}"
            )
            raise FailedPrecondition(
                f"{url} is not the pinned file (expected {file.size} bytes, sha256 {file.sha256}; got {got}); "
                "it was not kept"
            )
        os.replace(part, target)
    except NETWORK_ERRORS as error:  # the connection broke mid-transfer: retried
        if on_bytes:
            on_bytes(-counted)
        raise Unavailable(f"cannot download {url}: {type(error).__name__}: {error}") from error
    except LlocoError:
        if on_bytes:
            on_bytes(-counted)
        raise
    finally:
        part.unlink(missing_ok=True)


def _open(url: str, timeout_s: float) -> IO[bytes]:
    from lloco import __version__

    request = urllib.request.Request(url, headers={"User-Agent": f"lloco/{__version__}"})
    try:
        return urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as error:
        if error.code == 404:
            raise NotFound(f"{url}: HTTP 404 Not Found") from error
        if error.code >= 500 or error.code == 429:
            raise Unavailable(f"{url}: HTTP {error.code} {error.reason}") from error
        raise FailedPrecondition(f"{url}: HTTP {error.code} {error.reason}") from error
    except NETWORK_ERRORS as error:
        reason = getattr(error, "reason", error)
        raise Unavailable(
            f"cannot reach {url}: {reason} (offline? fetch on a machine that is online and copy the "
            "directory, or serve the files and pass --mirror)"
        ) from error
