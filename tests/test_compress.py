"""Offline compression on real local Ray, a real SeaweedFS and a tiny random model; and its online path."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from lloco.compress import PreparedDocument, compress_online, run_compress_job, tokenize_segments
from lloco.compress.pipeline import ActorPlan, plan_actors
from lloco.config import CompressSettings, ModelSettings, Settings
from lloco.errors import InvalidArgument, NotFound
from lloco.model import Compressor, load_compressor, load_model
from lloco.registry import Registry, Tenants
from lloco.registry.records import safetensors_metadata
from lloco.storage import ObjectStore, keys

SEGMENT_LEN = 16
K = 2
MAX_BYTES = 1 << 20
WORDS = (
    "paris",
    "france",
    "river",
    "capital",
    "tenant",
    "document",
    "summary",
    "vector",
    "the",
    "of",
    "is",
    "a",
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Direct compressor calls on one thread, as Ray runs its fractional-CPU workers (OMP_NUM_THREADS=1):
    on the shared 2-core machine two contending threads run the tiny model ten times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def compressor_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base model dir, compressor dir): a seeded fresh compressor on the tiny model, saved."""
    base = load_model(str(tiny_model_dir), tmp_path_factory.mktemp("cache"))
    directory = tmp_path_factory.mktemp("compressor")
    Compressor.from_base(base, SEGMENT_LEN, K, accumulate=True, seed=7).save(directory)
    return tiny_model_dir, directory


@pytest.fixture(scope="module")
def compressor(compressor_dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Compressor:
    """The same compressor, loaded here, for direct calls."""
    base_dir, directory = compressor_dirs
    base = load_model(str(base_dir), tmp_path_factory.mktemp("cache"))
    return load_compressor(str(directory), base)


def make_settings(store: ObjectStore, dirs: tuple[Path, Path], cache: Path, **compress: object) -> Settings:
    return Settings(
        store=store.settings,
        model=ModelSettings(base_model=str(dirs[0]), compressor=str(dirs[1]), cache_dir=cache),
        compress=CompressSettings(**compress),
    )


def text_of(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def ingest(store: ObjectStore, docs: dict[tuple[str, str], str]) -> None:
    tenants = Tenants(store)
    for tenant in sorted({tenant for tenant, _ in docs}):
        if not tenants.exists(tenant):
            tenants.create(tenant)
    for (tenant, doc_id), text in docs.items():
        Registry(store, tenant).ingest_document(doc_id, text.encode(), MAX_BYTES)


def twelve_documents(words: int = 40) -> dict[tuple[str, str], str]:
    """7 documents of acme and 5 of globex, of different lengths (1 to ~12 segments)."""
    return {
        (tenant, f"doc-{i}"): text_of(i, words + 9 * i)
        for i, tenant in enumerate(["acme"] * 7 + ["globex"] * 5)
    }


def token_ids(compressor: Compressor, text: str) -> list[int]:
    """A document's tokens as the platform counts them: the text alone, no special tokens."""
    return compressor.base.tokenizer(text, add_special_tokens=False)["input_ids"]


def expected_vectors(compressor: Compressor, text: str) -> torch.Tensor:
    """A direct compressor call on the document alone, stored the way the registry stores it (bf16)."""
    ids = token_ids(compressor, text)
    return compressor.compress([ids])[0].to(torch.bfloat16)


def assert_contexts(store: ObjectStore, compressor: Compressor, docs: dict[tuple[str, str], str]) -> None:
    """Every document has exactly one context, equal to a direct call on its current text."""
    cid = compressor.compressor_id
    for tenant in {tenant for tenant, _ in docs}:
        names = sorted(store.list_keys(keys.contexts_prefix(tenant, cid)))
        assert names == sorted(keys.context(tenant, cid, d) for t, d in docs if t == tenant)
    for (tenant, doc_id), text in docs.items():
        registry = Registry(store, tenant)
        vectors, info = registry.get_context(doc_id, cid)
        assert info.source_sha == registry.get_document(doc_id).sha256
        assert (info.segment_len, info.k, info.dtype) == (SEGMENT_LEN, K, "bfloat16")
        expected = expected_vectors(compressor, text)
        assert vectors.shape == expected.shape and vectors.shape[0] % K == 0
        assert torch.equal(vectors, expected), f"{tenant}/{doc_id} differs from a direct compressor call"


def test_job_compresses_skips_redoes_changed_and_reports_bad(
    store: ObjectStore,
    ray_local: None,
    compressor_dirs: tuple[Path, Path],
    compressor: Compressor,
    tmp_path: Path,
) -> None:
    docs = twelve_documents()  # 70 to 275 tokens each
    ingest(store, docs)
    settings = make_settings(
        store, compressor_dirs, tmp_path / "cache", batch_size=4, max_document_tokens=500
    )

    summary = run_compress_job(settings, None, tmp_path / "summary.json")
    assert (summary.documents, summary.compressed, summary.skipped, summary.failed) == (12, 12, 0, 0)
    tokens = sum(len(token_ids(compressor, text)) for text in docs.values())
    assert summary.tokens == tokens and summary.tokens_per_s > 0
    assert summary.tenants == ["acme", "globex"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary.to_json()
    assert_contexts(store, compressor, docs)
    for tenant, documents in (("acme", 7), ("globex", 5)):  # the job rebuilt each tenant's retrieval index
        index = Registry(store, tenant).index(compressor.compressor_id).current()
        assert index is not None and index.documents == documents

    again = run_compress_job(settings, None)
    assert (again.compressed, again.skipped, again.failed, again.tokens) == (0, 12, 0, 0)
    only_globex = run_compress_job(settings, ["globex"])
    assert (only_globex.tenants, only_globex.documents, only_globex.skipped) == (["globex"], 5, 5)

    # One document changes; three bad ones arrive. Ingest refuses empty and non-UTF-8 text: those are
    # written as another tool would, straight to the store.
    docs["globex", "doc-9"] = text_of(99, 70)
    ingest(store, {("globex", "doc-9"): docs["globex", "doc-9"]})
    ingest(store, {("acme", "empty"): "x", ("acme", "binary"): "x", ("acme", "long"): text_of(5, 400)})
    store.put_bytes(keys.doc_source("acme", "empty"), b"")
    store.put_bytes(keys.doc_source("acme", "binary"), b"caf\xe9 \xff\xfe")
    changed = run_compress_job(settings, None, tmp_path / "summary.json")
    assert (changed.documents, changed.compressed, changed.skipped, changed.failed) == (15, 1, 11, 3)
    assert changed.tokens == len(token_ids(compressor, docs["globex", "doc-9"]))
    reasons = {(failure.tenant, failure.doc_id): failure.reason for failure in changed.failures}
    assert sorted(reasons) == [("acme", "binary"), ("acme", "empty"), ("acme", "long")]
    assert reasons["acme", "empty"] == "empty (0 bytes, no text)"
    assert reasons["acme", "binary"] == "not valid UTF-8 (byte 3: invalid continuation byte)"
    assert re.fullmatch(r"too long: 6[0-9][0-9] tokens, over the limit of 500", reasons["acme", "long"])
    written = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(f["doc_id"] for f in written["failures"]) == ["binary", "empty", "long"]
    assert_contexts(store, compressor, docs)  # and none for the bad documents


def count_contexts(store: ObjectStore, tenants: list[str]) -> int:
    return sum(len(list(store.list_keys(keys.contexts_prefix(t)))) for t in tenants)


@pytest.mark.slow
def test_job_killed_halfway_then_rerun_finishes_exactly_once(
    store: ObjectStore,
    ray_local: None,
    compressor_dirs: tuple[Path, Path],
    compressor: Compressor,
    tmp_path: Path,
) -> None:
    import ray

    docs = twelve_documents(words=600)  # long documents (~40-90 segments each): the job takes seconds
    ingest(store, docs)
    settings = make_settings(store, compressor_dirs, tmp_path / "cache", batch_size=1, pool_size=1)
    config = tmp_path / "lloco.yaml"
    config.write_text(yaml.safe_dump(json.loads(settings.model_dump_json()) | {"store": store_dict(store)}))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(PLATFORM)}
    job = subprocess.Popen(
        [sys.executable, "-m", "lloco.cli", "compress", "--all", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while count_contexts(store, ["acme", "globex"]) == 0:
            assert job.poll() is None, f"job ended (status {job.returncode}) before writing a context"
            assert time.monotonic() < deadline, "no context written within 120 s"
            time.sleep(0.02)
        job.send_signal(signal.SIGKILL)
    finally:
        job.kill()
        job.wait()
    at_kill = count_contexts(store, ["acme", "globex"])
    assert 0 < at_kill < 12, f"kill landed when {at_kill} of 12 contexts existed"

    summary = run_compress_job(settings, None)
    assert summary.compressed + summary.skipped == 12 and summary.failed == 0
    assert summary.skipped >= at_kill and summary.compressed >= 1
    assert_contexts(store, compressor, docs)


PLATFORM = Path(__file__).parents[1] / "platform"


def store_dict(store: ObjectStore) -> dict[str, object]:
    """The store settings with their secrets in the clear, for a config file."""
    data = store.settings.model_dump()
    for name in ("access_key_id", "secret_access_key"):
        if data[name] is not None:
            data[name] = data[name].get_secret_value()
    return data


def test_online_compression_matches_the_job_path(
    store: ObjectStore, compressor: Compressor, tmp_path: Path
) -> None:
    docs = {("acme", "a"): text_of(1, 50), ("acme", "b"): text_of(2, 120), ("acme", "bad"): "x"}
    ingest(store, docs)
    store.put_bytes(keys.doc_source("acme", "bad"), b"\xc3\x28")
    registry = Registry(store, "acme")

    infos = compress_online(registry, compressor, ["b", "a"])
    assert [info.doc_id for info in infos] == ["b", "a"]
    assert_contexts(store, compressor, {key: docs[key] for key in [("acme", "a"), ("acme", "b")]})
    stamp = store.get_bytes(keys.context("acme", compressor.compressor_id, "a"))
    assert compress_online(registry, compressor, ["a"]) == [infos[1]]  # fresh: not compressed again
    assert store.get_bytes(keys.context("acme", compressor.compressor_id, "a")) == stamp

    with pytest.raises(InvalidArgument, match="'bad': not valid UTF-8"):
        compress_online(registry, compressor, ["bad"])
    registry.ingest_document("c", text_of(3, 40).encode(), MAX_BYTES)
    with pytest.raises(InvalidArgument, match="too long: [0-9]+ tokens, over the limit of 10"):
        compress_online(registry, compressor, ["c"], max_tokens=10)
    assert registry.context_info("c", compressor.compressor_id) is None
    with pytest.raises(NotFound):
        compress_online(registry, compressor, ["missing"])


def stored_parts(blob: bytes) -> tuple[dict[str, str], bytes]:
    """A stored context's header metadata and tensor bytes. Two saves of one context differ only in the
    order of the header's metadata keys (safetensors writes them in hash-map order, new on every save)."""
    (header_length,) = struct.unpack("<Q", blob[:8])
    return safetensors_metadata(blob), blob[8 + header_length :]


def handed(compressor: Compressor, tenant: str, doc_id: str, text: str) -> PreparedDocument:
    """What the edge hands the engine when it ingests ``text``: the text tokenized once with the segment
    table, and the sha256 of the bytes it stored."""
    ids, segments = tokenize_segments(compressor.base.tokenizer, text, compressor.segment_len)
    return PreparedDocument(tenant, doc_id, hashlib.sha256(text.encode()).hexdigest(), ids, segments)


def test_a_handed_document_stores_the_same_context_without_reading_the_document(
    store: ObjectStore, recording_store: ObjectStore, compressor: Compressor
) -> None:
    """Issue 19, tokenization once: a document handed as the edge tokenized it is compressed into the very
    context the read + tokenize path stores (the same ids, so the same header with its segment table and
    the same vector bytes), and its text is not read from the store. ``recording_store`` is the real store that also records
    the keys it reads, so the test can tell the document's text from the other objects read."""
    text = text_of(4, 90)  # several segments
    ingest(store, {("acme", "a"): text})
    registry = Registry(recording_store, "acme")
    context_key = keys.context("acme", compressor.compressor_id, "a")
    source_key = keys.doc_source("acme", "a")

    (read_path,) = compress_online(registry, compressor, ["a"])
    stored = store.get_bytes(context_key)
    assert source_key in recording_store.reads
    assert len(read_path.segments) > 2
    store.delete(context_key)

    document = handed(compressor, "acme", "a", text)
    assert document.token_ids == token_ids(compressor, text)
    recording_store.reads.clear()
    assert compress_online(registry, compressor, ["a"], prepared=[document]) == [read_path]
    assert stored_parts(store.get_bytes(context_key)) == stored_parts(stored)
    assert source_key not in recording_store.reads

    store.delete(context_key)
    with pytest.raises(InvalidArgument, match="'a': too long: [0-9]+ tokens, over the limit of 10"):
        compress_online(registry, compressor, ["a"], max_tokens=10, prepared=[document])
    assert source_key not in recording_store.reads
    assert registry.context_info("a", compressor.compressor_id) is None


def test_a_handed_document_that_is_not_the_stored_one_is_not_used(
    store: ObjectStore, recording_store: ObjectStore, compressor: Compressor
) -> None:
    """The engine takes a handed document only while it is the stored one: after a concurrent rewrite (its
    sha256 is the old text's), with a segment table cut by another segment length, or of another tenant,
    the stored text is read and compressed, and the context is the stored text's."""
    old, new = text_of(5, 60), text_of(6, 75)
    ingest(store, {("acme", "a"): old})
    registry = Registry(recording_store, "acme")
    stale = handed(compressor, "acme", "a", old)
    registry.ingest_document("a", new.encode(), MAX_BYTES)  # rewritten after the edge tokenized the old text
    current = handed(compressor, "acme", "a", new)
    _, miscut = tokenize_segments(compressor.base.tokenizer, new, SEGMENT_LEN * 2)
    context_key = keys.context("acme", compressor.compressor_id, "a")
    source_key = keys.doc_source("acme", "a")

    assert stale.mismatch(current.source_sha, SEGMENT_LEN) is not None
    for unusable in (
        stale,
        dataclasses.replace(current, segments=miscut),
        dataclasses.replace(current, tenant="globex"),
    ):
        recording_store.reads.clear()
        (info,) = compress_online(registry, compressor, ["a"], prepared=[unusable])
        assert info.source_sha == current.source_sha
        assert source_key in recording_store.reads
        assert_contexts(store, compressor, {("acme", "a"): new})
        store.delete(context_key)


def test_actor_plan_fills_gpus_unless_told_otherwise() -> None:
    defaults = CompressSettings()
    assert plan_actors(defaults, 0) == ActorPlan(1, 0.0, 0.5, 64)
    assert plan_actors(defaults, 8) == ActorPlan(8, 1.0, 0.5, 64)
    assert plan_actors(CompressSettings(pool_size=2), 8) == ActorPlan(2, 1.0, 0.5, 64)
    assert plan_actors(CompressSettings(actor_num_gpus=0.5), 2) == ActorPlan(4, 0.5, 0.5, 64)
    assert plan_actors(CompressSettings(actor_num_gpus=0, batch_size=8), 8) == ActorPlan(1, 0.0, 0.5, 8)


def test_cli_needs_tenants_or_all() -> None:
    from lloco.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["compress"])
    assert result.exit_code == 2 and "--tenant T (one or more) or --all" in result.output


def test_benchmark_runs_tiny_on_cpu(ray_local: None, tmp_path: Path) -> None:
    from lloco.bench.compress import main

    result = main(
        ["--out", str(tmp_path), "--tiny", "--docs", "6", "--doc-tokens", "128", "--batch-size", "2"]
    )
    assert result["tokens"] > 6 * 100 and result["bare"]["tokens_per_s"] > 0
    assert result["pipeline"]["tokens_per_s"] > 0 and result["pipeline"]["steady_tokens_per_s"] > 0
    assert json.loads((tmp_path / "compress.json").read_text()) == result


RAY_LINES = re.compile(r"raylet|Running Dataset|Dataset dataset_|core_worker|INFO|\"level\": \"info\"")


@pytest.mark.slow
def test_compress_command_keeps_rays_output_in_a_log_file_unless_verbose(
    store: ObjectStore, ray_local: None, compressor_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    """`lloco compress` in a pipe prints its result line and nothing of Ray's (Ray Data's progress log, raylet
    warnings, INFO logs): those go to DATA_DIR/logs/ray.log; with --verbose they reach the terminal."""
    import ray

    settings = make_settings(store, compressor_dirs, tmp_path / "cache")
    data_dir = tmp_path / "data"
    config = tmp_path / "lloco.yaml"
    config.write_text(
        yaml.safe_dump(
            json.loads(settings.model_dump_json()) | {"store": store_dict(store), "data_dir": str(data_dir)}
        )
    )
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(PLATFORM)}

    def compress(tenant: str, *flags: str) -> subprocess.CompletedProcess[str]:
        ingest(store, {(tenant, "notes"): text_of(7, 60)})
        argv = [sys.executable, "-m", "lloco.cli", "compress", "--tenant", tenant, "--config", str(config)]
        done = subprocess.run([*argv, *flags], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "1 compressed" in done.stdout
        return done

    quiet = compress("quiet")
    log_file = data_dir / "logs" / "ray.log"
    assert not RAY_LINES.search(quiet.stdout + quiet.stderr), quiet.stdout + quiet.stderr
    assert quiet.stderr.strip() == f"Ray's logs: {log_file} (--verbose shows them here)", quiet.stderr
    logged = log_file.read_text()
    assert "Starting execution of Dataset" in logged and "DEBUG" not in logged, logged

    loud = compress("loud", "--verbose")
    assert "Starting execution of Dataset" in loud.stdout + loud.stderr
    assert '"level": "info"' in loud.stderr  # lloco's own info logs too
