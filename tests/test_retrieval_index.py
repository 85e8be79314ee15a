"""Segment tables of contexts and the per-tenant retrieval index, on a real SeaweedFS and a tiny model."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import bm25s
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lloco.compress import compress_online
from lloco.compress.steps import tokenize_segments
from lloco.errors import Internal, InvalidArgument, NotFound, ResourceExhausted
from lloco.model import Compressor, load_model
from lloco.registry import DocumentInfo, Registry, Segment, Tenants
from lloco.registry.index import BM25_FILES, INDEX_FORMAT, TEXTS_FILE
from lloco.registry.records import check_segments, segment_rows
from lloco.storage import ObjectStore, keys

SEGMENT_LEN = 24
K = 2
MAX_BYTES = 1 << 20
FILLER = "the river runs past the old mill and the town square where people meet on market days"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def compressor(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Compressor:
    base = load_model(str(tiny_model_dir), tmp_path_factory.mktemp("cache"))
    return Compressor.from_base(base, SEGMENT_LEN, K, accumulate=True, seed=3)


def tenant(store: ObjectStore, name: str) -> Registry:
    Tenants(store).create(name)
    return Registry(store, name)


def add(registry: Registry, compressor: Compressor, docs: dict[str, str]) -> None:
    """Ingest, compress online and index, as the engine's online path does."""
    for doc_id, text in docs.items():
        registry.ingest_document(doc_id, text.encode(), MAX_BYTES)
    compress_online(registry, compressor, list(docs))
    registry.index(compressor.compressor_id).update(docs)


def found(registry: Registry, compressor: Compressor, question: str, k: int = 8) -> list[str]:
    """The documents whose segments hold the question's words (the search's first round: follow-ups also
    find related segments), best first, each once (a word cut by a segment boundary is in both)."""
    index = registry.index(compressor.compressor_id).load()
    if index is None:
        return []
    return list(dict.fromkeys(hit.entry.doc_id for hit in index.search(question, k, feedback_hits=0)))


def test_segment_table_tiles_tokens_and_text(store: ObjectStore, compressor: Compressor) -> None:
    registry = tenant(store, "acme")
    text = f"{FILLER}. Zanzibar café!  {FILLER}\n{FILLER}"
    add(registry, compressor, {"doc": text})
    info = registry.context_info("doc", compressor.compressor_id)
    ids, expected = tokenize_segments(compressor.base.tokenizer, text, SEGMENT_LEN)
    assert info is not None and info.segments == expected and len(info.segments) * K == info.n_vectors
    assert [s.token_end - s.token_start for s in info.segments[:-1]] == [SEGMENT_LEN] * (
        len(ids) // SEGMENT_LEN
    )
    assert info.segments[-1].token_end == len(ids)
    assert "".join(text[s.char_start : s.char_end] for s in info.segments) == text
    tokenizer = compressor.base.tokenizer
    for s in info.segments:  # a segment's text tokenizes to its tokens up to a merge at the edges
        piece = tokenizer(text[s.char_start : s.char_end], add_special_tokens=False)["input_ids"]
        assert abs(len(piece) - (s.token_end - s.token_start)) <= 2
    vectors, read = registry.get_context("doc", compressor.compressor_id)
    assert read.segments == info.segments and vectors.shape[0] == info.n_vectors


def test_bad_segment_tables_are_refused() -> None:
    good = (Segment(0, 0, 4, 0, 10), Segment(1, 4, 6, 10, 14))
    check_segments(good, 4, 2, 4)
    check_segments(good, 3, 2, 4)  # a last segment may keep fewer than k (a salient compressor's short one)
    assert [list(segment_rows(i, 2, 3)) for i in (0, 1)] == [[0, 1], [2]]
    for bad, n_vectors in [
        (good, 6),  # one segment short of the vectors
        (good, 2),  # the last segment holds none
        ((Segment(0, 0, 4, 0, 10), Segment(1, 5, 6, 10, 14)), 4),  # a gap in the tokens
        ((Segment(0, 0, 5, 0, 10), Segment(1, 5, 6, 10, 14)), 4),  # longer than segment_len
        ((Segment(0, 0, 4, 0, 10), Segment(2, 4, 6, 10, 14)), 4),  # out of order
    ]:
        with pytest.raises(InvalidArgument):
            check_segments(bad, n_vectors, 2, 4)


def test_index_follows_ingest_update_and_delete(store: ObjectStore, compressor: Compressor) -> None:
    registry = tenant(store, "acme")
    cid = compressor.compressor_id
    assert registry.index(cid).current() is None and registry.index(cid).load() is None
    add(registry, compressor, {"mill": f"{FILLER} zanzibar", "port": f"{FILLER} quixotic harbour"})
    assert found(registry, compressor, "zanzibar") == ["mill"]
    assert found(registry, compressor, "quixotic harbour") == ["port"]
    hits = registry.index(cid).load().search("zanzibar", 3)
    context = registry.context_info("mill", cid)
    assert hits[0].entry.segment in context.segments and hits[0].entry.source_sha == context.source_sha
    assert hits[0].score > 0

    registry.ingest_document("mill", f"{FILLER} xylophone".encode(), MAX_BYTES)  # new text: unindexed at once
    assert found(registry, compressor, "zanzibar") == [] and found(registry, compressor, "xylophone") == []
    add(registry, compressor, {"mill": f"{FILLER} xylophone"})
    assert found(registry, compressor, "xylophone") == ["mill"]

    registry.delete_document("port")
    assert found(registry, compressor, "quixotic harbour") == []
    version = registry.index(cid).current()
    assert (version.documents, version.segments) == (1, len(registry.context_info("mill", cid).segments))
    folder = keys.index_prefix("acme", cid) + "builds/"
    builds = {key[len(folder) :].split("/")[0] for key in store.list_keys(folder)}
    assert version.build_id in builds and len(builds) == 2  # the current build and the one it replaced

    rebuilt = registry.index(cid).rebuild()
    assert registry.index(cid).load().entries == registry.index(cid).load(version).entries
    assert rebuilt.segments == version.segments
    assert found(registry, compressor, "the of and") == []  # stop words only: no question to score
    registry.delete_document("mill")
    assert registry.index(cid).load().search("xylophone river", 4) == []


def test_stems_match_other_forms_of_a_word(store: ObjectStore, compressor: Compressor) -> None:
    registry = tenant(store, "acme")
    add(registry, compressor, {"keepers": "Two keepers were designing lanterns.", "mill": FILLER})
    assert found(registry, compressor, "lantern design") == ["keepers"]  # plain BM25: no word in common
    assert found(registry, compressor, "designs") == ["keepers"]


def test_a_follow_up_query_finds_what_the_first_hit_names(store: ObjectStore, compressor: Compressor) -> None:
    """A two-fact question names only the first fact's document; the second (who built it, where that one
    was born) is found through the first hit's own terms. Plain BM25 ranks it below documents that merely
    share the question's words. (Segments long enough to hold each document whole.)"""
    compressor = Compressor.from_base(compressor.base, 128, K, accumulate=True, seed=3)
    registry = tenant(store, "acme")
    docs = {
        "lighthouse": "The Quixotic Harbour lighthouse was built by Zebulon Marsh.",
        "marsh": "Zebulon Marsh was born in Kirkwall, a town of the Orkney islands.",
        "berg": "Anna Berg was born in Oslo. Born a sailor, she sailed from the harbour.",
        "lund": "Per Lund, born in Bergen, was born to sing.",
        "mill": "The old mill by the harbour was born of the river.",
    }
    add(registry, compressor, docs)
    index = registry.index(compressor.compressor_id).load()
    question = "Where was the builder of the Quixotic Harbour lighthouse born?"

    def documents(hits: list) -> list[str]:
        return list(dict.fromkeys(hit.entry.doc_id for hit in hits))

    assert documents(index.search(question, 8))[:2] == ["lighthouse", "marsh"]
    assert "marsh" not in documents(index.search(question, 8, feedback_hits=0))[:2]
    scores = [hit.score for hit in index.search(question, 8)]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0


def test_a_build_of_the_previous_format_is_searched_then_rewritten(
    store: ObjectStore, compressor: Compressor
) -> None:
    """A tenant whose current build is format 1 (stop words only, what lloco wrote before stems): queries
    read it as format 1 (the edge's cache too), and the next update re-indexes it in the current format."""
    from lloco.serve.retrieval import IndexCache

    registry = tenant(store, "acme")
    cid = compressor.compressor_id
    add(registry, compressor, {"keepers": "Two keepers were designing lanterns.", "mill": FILLER})
    version = registry.index(cid).current()
    prefix = keys.index_version_prefix("acme", cid, version.build_id)
    texts = json.loads(gzip.decompress(store.get_bytes(prefix + TEXTS_FILE)))
    old = bm25s.BM25()  # as format 1 was written: bm25s tokens, English stop words, no stems
    old.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    with tempfile.TemporaryDirectory() as folder:
        old.save(folder, show_progress=False)
        for name in BM25_FILES:
            store.put_bytes(prefix + name, Path(folder, name).read_bytes())
    pointer_key = keys.index_current("acme", cid)
    pointer = json.loads(store.get_bytes(pointer_key))
    store.put_bytes(pointer_key, json.dumps({**pointer, "format": "lloco-index/1"}).encode())

    assert registry.index(cid).current().format == "lloco-index/1"
    index = IndexCache(ttl_s=0.0).get(registry, cid)
    assert [hit.entry.doc_id for hit in index.search("designing lanterns", 8)][:1] == ["keepers"]
    assert index.search("lantern design", 8) == []  # format 1 has no stems: no match, and no error

    assert registry.index(cid).update([]).format == INDEX_FORMAT
    assert found(registry, compressor, "lantern design") == ["keepers"]

    store.put_bytes(pointer_key, json.dumps({**pointer, "format": "lloco-index/9"}).encode())
    with pytest.raises(Internal, match="cannot read"):
        registry.index(cid).current()


def test_index_size_is_capped(store: ObjectStore, compressor: Compressor) -> None:
    registry = tenant(store, "acme")
    add(registry, compressor, {"a": FILLER})
    segments = registry.index(compressor.compressor_id).current().segments
    registry.ingest_document("b", f"{FILLER} {FILLER}".encode(), MAX_BYTES)
    compress_online(registry, compressor, ["b"])
    with pytest.raises(ResourceExhausted, match="limits.max_corpus_segments"):
        registry.index(compressor.compressor_id, max_segments=segments + 1).update(["b"])
    assert registry.index(compressor.compressor_id).current().segments == segments  # the last version stays


TERMS = st.text(alphabet="bcdfghjklmnpqrstvwxz", min_size=6, max_size=10)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(terms=st.lists(TERMS, min_size=4, max_size=4, unique=True))
def test_another_tenants_segments_never_appear(
    store: ObjectStore, compressor: Compressor, terms: list[str]
) -> None:
    """Each tenant holds documents planted with unique terms; a search for any term, in any tenant's
    index, returns only that tenant's documents."""
    registries = {}
    for name, planted in (("acme", terms[:2]), ("globex", terms[2:])):
        if Tenants(store).exists(name):
            Tenants(store).delete(name)
        registries[name] = registry = tenant(store, name)
        add(registry, compressor, {f"{name}-{i}": f"{term} {FILLER}" for i, term in enumerate(planted)})
    for name, registry in registries.items():
        own = terms[:2] if name == "acme" else terms[2:]
        for term in terms:
            expected = [f"{name}-{own.index(term)}"] if term in own else []
            assert found(registry, compressor, term) == expected


def test_corpus_query_selection_budget_staleness_and_errors(
    store: ObjectStore, compressor: Compressor
) -> None:
    """The edge's choice of segments: tenant-scoped cache, deleted documents dropped, budget and top_k,
    document order; the engine's slice of those segments' own vectors."""
    from lloco.errors import FailedPrecondition
    from lloco.serve.engine_core import segment_vectors
    from lloco.serve.retrieval import OVER_FETCH, IndexCache, Retrieved, check_retrieval, select

    registry = tenant(store, "acme")
    cid = compressor.compressor_id
    cache = IndexCache(ttl_s=0.0)

    def retrieve(
        cache: IndexCache, registry: Registry, cid: str, question: str, top_k: int, budget: int | None, k: int
    ) -> Retrieved:
        """What the edge does (serve/queries.py), with the registry's records in place of its cached ones."""

        def current(doc_id: str) -> DocumentInfo | None:
            try:
                return registry.get_document(doc_id)
            except NotFound:
                return None

        hits = cache.get(registry, cid).search(question, top_k * OVER_FETCH)
        return select(hits, current, top_k, budget, k)

    with pytest.raises(FailedPrecondition, match="no retrieval index yet"):
        retrieve(cache, registry, cid, "zanzibar", 4, None, K)
    docs = {"a": f"zanzibar {FILLER} {FILLER} zanzibar", "b": f"{FILLER} zanzibar", "c": FILLER}
    add(registry, compressor, docs)

    got = retrieve(cache, registry, cid, "zanzibar", 8, None, K)
    # a and b hold the word; c (filler only) is found by the follow-ups, as related text
    assert set(got.doc_ids) == {"a", "b", "c"}
    assert len(got.hits) == sum(map(len, got.segments))
    for doc_id, segments in zip(got.doc_ids, got.segments, strict=True):
        indices = [s.index for s in segments]
        assert indices == sorted(indices)  # a document's segments in order
        table = registry.context_info(doc_id, cid).segments
        for hit in (h for h in got.hits if h.entry.doc_id == doc_id):
            assert hit.entry.segment == table[hit.entry.segment.index]  # citations are the stored ranges
    one = retrieve(cache, registry, cid, "zanzibar", 8, K, K)  # a budget of one segment's vectors
    assert len(one.hits) == 1 and one.hits[0].score == max(h.score for h in got.hits)
    with pytest.raises(InvalidArgument, match="cannot hold one segment"):
        retrieve(cache, registry, cid, "zanzibar", 8, K - 1, K)

    Tenants(store).create("globex")
    with pytest.raises(FailedPrecondition):  # another tenant's index is never reached
        retrieve(cache, Registry(store, "globex"), cid, "zanzibar", 8, None, K)

    registry.delete_document("b")
    assert "b" not in retrieve(cache, registry, cid, "zanzibar", 8, None, K).doc_ids

    assert check_retrieval(0, 0, 64, 8) == (8, None)
    for top_k, budget in [(-1, 0), (65, 0), (1, -1)]:
        with pytest.raises(InvalidArgument):
            check_retrieval(top_k, budget, 64, 8)

    vectors, info = registry.get_context("a", cid)
    picked = segment_vectors(vectors, (info.segments[-1], info.segments[0]), K)
    assert torch.equal(picked, torch.cat([vectors[-K:], vectors[:K]]))
    with pytest.raises(InvalidArgument):
        segment_vectors(vectors, (Segment(len(info.segments), 0, 1, 0, 1),), K)


def test_the_default_top_k_must_fit_the_limit() -> None:
    from lloco.config import LimitSettings
    from pydantic import ValidationError

    assert LimitSettings(max_retrieval_k=8, default_retrieval_k=8).default_retrieval_k == 8
    with pytest.raises(ValidationError, match="default_retrieval_k \\(9\\) must not exceed"):
        LimitSettings(max_retrieval_k=8, default_retrieval_k=9)


def test_bm25s_keeps_an_installed_jax_off_the_gpu(tmp_path: Path) -> None:
    """bm25s runs a JAX top-k as it is imported when JAX is installed, and JAX then claims 75% of the GPU's
    memory (a pretraining process on the GPU host lost 105 GB so). JAX is no dependency of lloco and not
    installed here, so a stand-in `jax` package on the path records what bm25s does with it: the platform
    JAX would start on when imported through lloco, and whether a search ever uses JAX (it must take NumPy)."""
    fake = tmp_path / "jax"
    fake.mkdir()
    (fake / "__init__.py").write_text("import os\nPLATFORMS = os.environ.get('JAX_PLATFORMS')\nCALLS = []\n")
    (fake / "lax.py").write_text(
        "import jax\n\ndef top_k(scores, k):\n    jax.CALLS.append(k)\n    return scores[:k], list(range(k))\n"
    )
    script = (
        "import lloco.registry.index as ix\nimport datetime, jax\n"
        "after_import = list(jax.CALLS)\n"
        "entries = tuple(ix.IndexEntry(f'd{i}', '', ix.Segment(0, 0, 4, 0, 10)) for i in range(3))\n"
        "version = ix.IndexVersion('b', 'c', 3, 3, datetime.datetime.now(datetime.UTC))\n"
        "index = ix.SegmentIndex(version, entries, ix.bm25_index(['red fox', 'blue whale', 'green frog']))\n"
        "hits = index.search('whale', 2)\n"
        "print(jax.PLATFORMS, after_import, jax.CALLS, [h.entry.doc_id for h in hits])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    # imported by bm25s (its one import-time top-k), on the CPU; the search itself never called JAX
    assert done.stdout.split("\n")[0] == "cpu [1] [1] ['d1']"
