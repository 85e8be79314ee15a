"""`lloco data fetch` over real HTTP on loopback, and the QA data directory every consumer defaults to.

A local HTTP server plays the mirror (``{mirror}/{dataset}/{upstream path}``), serving the committed subsets
under tests/data/qa/ as the upstream files would be served (SQuAD and HotpotQA as plain JSON).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import shutil
import socket
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from lloco.cli import app
from lloco.data.fetch import RemoteFile, download, missing, remote_files
from lloco.errors import FailedPrecondition, NotFound, Unavailable
from lloco.finetune.datasets import HOTPOT_FILE, SQUAD_FILE, load_hotpotqa_long, load_qmsum, load_squad
from typer.testing import CliRunner

DATA = Path(__file__).resolve().parent / "data" / "qa"  # small subsets of the QA sets (tests/data/README.md)


class _Handler(SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        self.requests.append(self.path)


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """(URL, served directory, request paths): the subsets laid out as their publishers serve them."""
    root = tmp_path / "mirror"
    (root / "squad").mkdir(parents=True)
    (root / "hotpotqa").mkdir()
    (root / "squad" / "dev-v2.0.json").write_bytes(gzip.decompress((DATA / SQUAD_FILE).read_bytes()))
    (root / "hotpotqa" / "hotpot_dev_distractor_v1.json").write_bytes(
        gzip.decompress((DATA / HOTPOT_FILE).read_bytes())
    )
    shutil.copytree(DATA / "qmsum", root / "qmsum" / "data" / "ALL", ignore=shutil.ignore_patterns("LICENSE"))
    shutil.copyfile(DATA / "qmsum" / "LICENSE", root / "qmsum" / "LICENSE")
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", root, requests
    server.shutdown()
    server.server_close()


def _pinned_to(root: Path, file: RemoteFile) -> RemoteFile:
    """The file pinned to what the mirror serves (the subsets are not the upstream files)."""
    served = (root / file.dataset / file.path).read_bytes()
    return dataclasses.replace(file, size=len(served), sha256=hashlib.sha256(served).hexdigest())


def test_fetch_writes_the_layout_the_loaders_read_and_skips_what_is_in_place(
    mirror: tuple[str, Path, list[str]], tmp_path: Path
) -> None:
    url, root, requests = mirror
    served = {f"data/ALL/{p.relative_to(root / 'qmsum/data/ALL')}" for p in root.glob("qmsum/data/ALL/*/*")}
    files = [
        _pinned_to(root, file)
        for file in remote_files()
        if file.dataset != "qmsum" or file.path in served or file.path == "LICENSE"
    ]
    assert len(files) == 2 + 6 + 1  # SQuAD, HotpotQA, six meetings, QMSum's license
    dest = tmp_path / "qa"
    assert missing(dest, files) == files
    progress: list[int] = []
    download(dest, files, mirror=url, on_bytes=progress.append)
    assert sum(progress) == sum(file.size for file in files)
    assert len(requests) == len(files)

    # the loaders read the fetched directory exactly as the committed one
    assert load_squad(dest, "test") == load_squad(DATA, "test")
    assert load_qmsum(dest, "val") == load_qmsum(DATA, "val")
    assert load_hotpotqa_long(dest, "test", 1024, len) == load_hotpotqa_long(DATA, "test", 1024, len)
    assert (dest / "qmsum" / "LICENSE").read_bytes() == (DATA / "qmsum" / "LICENSE").read_bytes()
    assert not list(dest.rglob("*.part"))

    # in place: nothing to fetch again; a damaged file is fetched again, and only it
    assert missing(dest, files) == []
    (dest / SQUAD_FILE).write_bytes(b"not gzip")
    (dest / "qmsum" / "test" / "Bed003.json").write_text("{}")
    again = missing(dest, files)
    assert [file.target for file in again] == [SQUAD_FILE, "qmsum/test/Bed003.json"]
    download(dest, again, mirror=url)
    assert missing(dest, files) == [] and len(requests) == len(files) + 2


def test_a_download_that_is_not_the_pinned_file_is_refused_and_not_kept(
    mirror: tuple[str, Path, list[str]], tmp_path: Path
) -> None:
    url, root, _ = mirror
    (license_file,) = [file for file in remote_files(["qmsum"]) if file.path == "LICENSE"]
    assert _pinned_to(root, license_file) == license_file  # QMSum's license is the upstream file itself
    text = (root / "qmsum" / "LICENSE").read_text()
    (root / "qmsum" / "LICENSE").write_text(text.replace("Yale-LILY", "Yale-LILZ"))  # same size
    dest = tmp_path / "qa"
    with pytest.raises(
        FailedPrecondition, match=r"LICENSE is not the pinned file \(expected 1066 bytes"
    ) as caught:
        download(dest, [license_file], mirror=url)
    got = hashlib.sha256((root / "qmsum" / "LICENSE").read_bytes()).hexdigest()
    assert f"got 1066 bytes, sha256 {got}); it was not kept" in str(caught.value)
    assert not (dest / "qmsum" / "LICENSE").exists() and not list(dest.rglob("*.part"))

    with pytest.raises(
        NotFound, match=r"1 of 1 files failed: .*/qmsum/data/ALL/train/nothing\.json: HTTP 404"
    ):
        download(dest, [dataclasses.replace(license_file, path="data/ALL/train/nothing.json")], mirror=url)


def test_the_command_checks_the_real_pins_and_fills_the_settings_directory(
    mirror: tuple[str, Path, list[str]], tmp_path: Path
) -> None:
    url, _, _ = mirror
    dest = tmp_path / "qa"
    runner = CliRunner()
    # the committed SQuAD subset is not SQuAD 2.0 dev: refused by size before its sha256 is even needed
    result = runner.invoke(
        app, ["data", "fetch", "--dest", str(dest), "--mirror", url, "--datasets", "squad"]
    )
    assert result.exit_code == 1
    assert (
        "squad/dev-v2.0.json is not the pinned file (expected 4370528 bytes, sha256 80a5225e" in result.output
    )
    assert not (dest / SQUAD_FILE).exists()

    # no --dest: settings qa_data_dir; QMSum's license is upstream's and lands there, the meetings do not
    env = {"LLOCO_QA_DATA_DIR": str(dest)}
    result = runner.invoke(app, ["data", "fetch", "--mirror", url, "--datasets", "qmsum"], env=env)
    assert result.exit_code == 1
    assert "232 of 233 files failed" in result.output and "HTTP 404" in result.output
    assert [p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()] == ["qmsum/LICENSE"]
    result = runner.invoke(app, ["data", "fetch", "--datasets", "hotpot"], env=env)
    assert result.exit_code == 1 and "unknown datasets ['hotpot']" in result.output


def test_an_unreachable_source_says_so_after_retrying(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    file = RemoteFile("squad", "dev-v2.0.json", SQUAD_FILE, 10, "0" * 64, gzipped=True)
    with pytest.raises(
        Unavailable, match=r"cannot reach http://127\.0\.0\.1:\d+/squad/dev-v2\.0\.json.*offline"
    ):
        download(tmp_path, [file], mirror=f"http://127.0.0.1:{port}")


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--output", "OUT", "--datasets", "qmsum"],
        ["pretrain-corpus", "--output", "OUT/corpus.npz"],
    ],
    ids=["eval", "pretrain-corpus"],
)
def test_consumers_default_to_the_settings_directory_and_name_the_fetch_command(
    argv: list[str], tmp_path: Path
) -> None:
    empty = tmp_path / "no-data"
    argv = [arg.replace("OUT", str(tmp_path / "out")) for arg in argv]
    result = CliRunner().invoke(app, argv, env={"LLOCO_QA_DATA_DIR": str(empty)})
    assert result.exit_code == 1 and result.stderr.startswith(f"error: {empty}/"), result.output
    assert "download the QA sets with `lloco data fetch`" in result.stderr
    assert not (tmp_path / "out").exists()  # failed before any work
