"""The engine's caches against a real S3: byte-bounded LRU tiers, adapter CPU tier, LoRA slot manager."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from lloco.errors import FailedPrecondition, NotFound
from lloco.registry import Registry, Tenants
from lloco.serve.caches import AdapterCache, AdapterKey, ContextCache, LruCache, SlotManager
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

COMPRESSOR = "cmp-test"
DIM = 8
N_VECTORS = 10
STORED_BYTES = N_VECTORS * DIM * 2  # bf16 in the CPU tier
READY_BYTES = N_VECTORS * DIM * 4  # fp32 in the GPU tier


@pytest.fixture
def registry(store: object) -> Registry:
    Tenants(store).create("acme")
    return Registry(store, "acme")


def _compressed_doc(registry: Registry, doc_id: str, seed: int) -> torch.Tensor:
    doc, _ = registry.ingest_document(doc_id, f"text of {doc_id}".encode(), max_bytes=1000)
    vectors = torch.randn(N_VECTORS, DIM, generator=torch.Generator().manual_seed(seed))
    registry.put_context(doc_id, COMPRESSOR, vectors, doc.sha256, segment_len=16, k=5)
    return vectors.to(torch.bfloat16)


def test_lru_is_bounded_by_size_and_evicts_least_recent() -> None:
    cache: LruCache[str, bytes] = LruCache(10, len)
    cache.put("a", b"aaaa")
    cache.put("b", b"bbbb")
    assert cache.get("a") == b"aaaa"  # "b" is now the least recent
    assert cache.put("c", b"cccc") == ["b"]
    assert cache.used == 8 and "b" not in cache and cache.evictions == 1
    assert cache.put("huge", b"x" * 11) == []  # larger than the whole budget: not kept
    assert "huge" not in cache and cache.used == 8
    assert cache.get("b") is None
    assert (cache.hits, cache.misses) == (1, 1)
    disabled: LruCache[str, bytes] = LruCache(0, len)
    disabled.put("a", b"a")
    assert len(disabled) == 0


def test_context_cache_promotes_from_cpu_and_evicts_gpu_over_budget(registry: Registry) -> None:
    stored = {d: _compressed_doc(registry, d, seed) for seed, d in enumerate(["d1", "d2", "d3"])}
    docs = {d: registry.get_document(d) for d in stored}
    cache = ContextCache(2 * READY_BYTES, 3 * STORED_BYTES, torch.device("cpu"), torch.float32)

    tiers = [cache.get(registry, docs[d], COMPRESSOR)[1] for d in ["d1", "d1", "d2", "d3", "d1"]]

    # d3 pushed d1 out of the GPU tier (two fit); the CPU tier still held it.
    assert tiers == ["s3", "gpu", "s3", "s3", "cpu"]
    assert (cache.gpu.hits, cache.cpu.hits, cache.s3_loads) == (1, 1, 3)
    assert cache.gpu.evictions == 2 and cache.cpu.evictions == 0
    assert cache.gpu.used == 2 * READY_BYTES and cache.cpu.used == 3 * STORED_BYTES
    vectors, _ = cache.get(registry, docs["d1"], COMPRESSOR)
    assert vectors.dtype == torch.float32
    assert torch.equal(vectors, stored["d1"].float())


def test_context_cache_cpu_tier_evicts_and_rereads_s3(registry: Registry) -> None:
    for seed, doc_id in enumerate(["d1", "d2", "d3"]):
        _compressed_doc(registry, doc_id, seed)
    docs = [registry.get_document(d) for d in ["d1", "d2", "d3"]]
    cache = ContextCache(0, 2 * STORED_BYTES, torch.device("cpu"), torch.float32)

    tiers = [cache.get(registry, doc, COMPRESSOR)[1] for doc in [*docs, docs[2], docs[0]]]

    assert tiers == ["s3", "s3", "s3", "cpu", "s3"]
    assert cache.cpu.evictions == 2 and cache.cpu.used <= 2 * STORED_BYTES
    assert len(cache.gpu) == 0


def test_missing_or_stale_context_is_a_failed_precondition(registry: Registry) -> None:
    cache = ContextCache(READY_BYTES, STORED_BYTES, torch.device("cpu"), torch.float32)
    raw, _ = registry.ingest_document("raw", b"never compressed", max_bytes=1000)
    with pytest.raises(FailedPrecondition, match="document 'raw' is not compressed yet; run compress"):
        cache.get(registry, raw, COMPRESSOR)

    _compressed_doc(registry, "doc", 0)
    old = registry.get_document("doc")
    cache.get(registry, old, COMPRESSOR)
    new, changed = registry.ingest_document("doc", b"new text", max_bytes=1000)
    assert changed
    with pytest.raises(FailedPrecondition, match="not compressed yet"):
        cache.get(registry, new, COMPRESSOR)


def _adapter_files(seed: int) -> dict[str, bytes]:
    weights = {
        "base_model.model.layer.lora_A.weight": torch.randn(
            2, 4, generator=torch.Generator().manual_seed(seed)
        )
    }
    config = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "peft_type": "LORA"}
    return {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": save_safetensors(weights),
    }


def _parse(files: dict[str, bytes]) -> dict[str, torch.Tensor]:
    return load_safetensors(files["adapter_model.safetensors"])


def test_adapter_cpu_tier_is_lru_by_count_and_keyed_by_version(registry: Registry) -> None:
    for seed, name in enumerate(["a", "b", "c"]):
        registry.publish_adapter(name, _adapter_files(seed), train={})
    registry.publish_adapter("a", _adapter_files(10), train={})  # a@v000002
    cache = AdapterCache(2, _parse)
    key = {name: AdapterKey("acme", registry.uid, name, "v000001") for name in ["a", "b", "c"]}

    first, cached = cache.get(registry, key["a"])
    assert not cached
    assert torch.equal(
        first["base_model.model.layer.lora_A.weight"],
        _parse(_adapter_files(0))["base_model.model.layer.lora_A.weight"],
    )
    assert cache.get(registry, key["a"]) == (first, True)
    cache.get(registry, key["b"])
    cache.get(registry, key["c"])  # evicts a (least recent)
    assert key["a"] not in cache.tier and key["b"] in cache.tier
    newer, cached = cache.get(registry, AdapterKey("acme", registry.uid, "a", "v000002"))
    assert not cached and not torch.equal(
        newer["base_model.model.layer.lora_A.weight"], first["base_model.model.layer.lora_A.weight"]
    )
    assert cache.s3_loads == 4 and cache.tier.evictions == 2


def test_slot_manager_evicts_least_recent_unpinned_slot() -> None:
    a, b, c = (AdapterKey("t", "uid", name, "v000001") for name in "abc")
    slots = SlotManager(2)
    ga, gb = slots.acquire(a), slots.acquire(b)
    assert (ga.slot, ga.needs_load, gb.slot, gb.needs_load) == (0, True, 1, True)
    assert slots.acquire(c) is None  # both pinned by running rows

    again = slots.acquire(a)  # a second row on a: no load, two pins
    assert (again.slot, again.needs_load, slots.pins(0)) == (0, False, 2)
    slots.release(0)
    slots.release(0)
    gc = slots.acquire(c)
    assert (gc.slot, gc.needs_load) == (0, True)  # a evicted; b (pinned) kept
    assert slots.resident() == {c: 0, b: 1} and slots.evictions == 1

    slots.release(1)  # b idle now, c still pinned
    ga = slots.acquire(a)
    assert ga.slot == 1 and slots.resident() == {c: 0, a: 1}
    slots.forget(1)
    assert slots.slot_of(a) is None
    with pytest.raises(ValueError):
        SlotManager(2).release(0)


def test_slot_manager_never_evicts_a_pinned_slot() -> None:
    rng = random.Random(0)
    keys = [AdapterKey("t", "uid", f"a{i}", "v000001") for i in range(6)]
    slots = SlotManager(3)
    held: list[tuple[AdapterKey, int]] = []
    for _ in range(2000):
        if held and (len(held) >= 5 or rng.random() < 0.5):
            key, slot = held.pop(rng.randrange(len(held)))
            slots.release(slot)
            continue
        key = rng.choice(keys)
        grant = slots.acquire(key)
        pinned_slots = {slot for _, slot in held}
        if grant is None:
            assert len(pinned_slots) == 3 and key not in slots.resident()
            continue
        if grant.needs_load:
            assert grant.slot not in pinned_slots
        held.append((key, grant.slot))
        for other, slot in held:
            assert slots.resident().get(other) == slot
    assert slots.evictions > 0


def test_a_deleted_tenants_entries_are_dropped() -> None:
    cache: LruCache[tuple[str, str], int] = LruCache(10, lambda _: 1)
    for key in [("gone", "a"), ("kept", "a"), ("gone", "b")]:
        cache.put(key, 1)
    assert cache.drop(lambda key: key[0] == "gone") == 2
    assert ("kept", "a") in cache and len(cache) == 1 and cache.used == 1

    gone, busy, kept = (AdapterKey(t, "uid", "a", "v000001") for t in ("gone", "gone2", "kept"))
    slots = SlotManager(3)
    for key in (gone, busy, kept):
        slots.acquire(key)
    slots.release(slots.slot_of(gone))
    slots.release(slots.slot_of(kept))
    assert slots.forget_where(lambda key: key.tenant.startswith("gone")) == [0]  # busy's row still runs
    assert slots.resident() == {busy: 1, kept: 2}


def test_entries_expire_after_their_time_to_live() -> None:
    now = [0.0]
    cache: LruCache[str, int] = LruCache(10, lambda _: 1, ttl_s=5.0, clock=lambda: now[0])
    cache.put("a", 1)
    now[0] = 4.9
    assert cache.get("a") == 1  # a hit does not extend the entry's life: the bound is on staleness
    now[0] = 5.0
    assert cache.get("a") is None and len(cache) == 0 and cache.used == 0
    assert (cache.hits, cache.misses) == (1, 1)
    cache.put("a", 2)
    cache.put("b", 3)
    assert cache.drop_items(lambda key, value: value == 3) == 1
    assert "b" not in cache and cache.get("a") == 2


class _SlowReads:
    """The tenant's registry, each store read held for a while, so concurrent misses surely overlap."""

    def __init__(self, registry: Registry, seconds: float) -> None:
        self._registry, self._seconds = registry, seconds
        self.tenant, self.uid = registry.tenant, registry.uid
        self.reads = 0

    def get_context(self, doc_id: str, compressor_id: str):
        self.reads += 1
        time.sleep(self._seconds)
        return self._registry.get_context(doc_id, compressor_id)

    def read_adapter_files(self, name: str, version: str) -> dict[str, bytes]:
        self.reads += 1
        time.sleep(self._seconds)
        return self._registry.read_adapter_files(name, version)


def _at_once(n: int, fn):
    """fn() in n threads released together; their results in thread order."""
    barrier = threading.Barrier(n)

    def run(_: int):
        barrier.wait()
        return fn()

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def test_concurrent_misses_of_one_key_read_the_store_once(registry: Registry) -> None:
    """A burst of queries for a cold context or adapter: the first miss reads the store, the rest wait for
    it and get the same tensors; a failed fill is not remembered (the next miss reads again)."""
    _compressed_doc(registry, "d1", seed=0)
    doc = registry.get_document("d1")
    registry.publish_adapter("a", _adapter_files(0), train={})
    slow = _SlowReads(registry, 0.2)

    contexts = ContextCache(READY_BYTES, STORED_BYTES, torch.device("cpu"), torch.float32)
    got = _at_once(8, lambda: contexts.get(slow, doc, COMPRESSOR))
    assert slow.reads == 1 and contexts.s3_loads == 1
    assert sorted(tier for _, tier in got) == ["gpu"] * 7 + ["s3"]
    assert all(vectors is got[0][0] for vectors, _ in got)

    adapters = AdapterCache(2, _parse)
    key = AdapterKey("acme", registry.uid, "a", "v000001")
    loaded = _at_once(8, lambda: adapters.get(slow, key))
    assert slow.reads == 2 and adapters.s3_loads == 1
    assert sorted(cached for _, cached in loaded) == [False] + [True] * 7
    assert all(weights is loaded[0][0] for weights, _ in loaded)

    missing = AdapterKey("acme", registry.uid, "a", "v000009")

    def ask_missing() -> None:
        with pytest.raises(NotFound):
            adapters.get(slow, missing)

    _at_once(4, ask_missing)
    assert slow.reads == 2 + 4  # each waiter read again after the failure before it
