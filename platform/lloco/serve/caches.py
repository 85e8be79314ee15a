"""The serving caches: `LruCache` (the one bounded map, optionally with a time to live, used by the
edge's lookups too), and the engine's: compressed contexts (a GPU and a CPU tier, each bounded in bytes),
adapters (a CPU tier of parsed PEFT tensors) and the manager of the model's fixed LoRA slots.

The engine's caches are filled from S3 through the tenant's registry (`TenantObjects`), so a replica
warms itself on demand; their keys name immutable things (a context of one source text, an adapter
version), so they never need invalidating, only freeing (`forget_tenant`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

import torch

from lloco.errors import FailedPrecondition, NotFound
from lloco.logs import get_logger
from lloco.registry import ContextInfo, DocumentInfo

log = get_logger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

ContextTier = Literal["gpu", "cpu", "s3"]


class LruCache(Generic[K, V]):
    """A thread-safe LRU map bounded by the total `size_of` of its values (bytes, or 1 per entry).

    A value larger than the whole capacity is not kept; a capacity of 0 disables the cache. With
    ``ttl_s``, an entry older than that is a miss (and is dropped): the bound on how stale a cached
    fact read from shared storage can be when another process changes it.
    """

    def __init__(
        self,
        capacity: int,
        size_of: Callable[[V], int],
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if ttl_s is not None and ttl_s < 0:
            raise ValueError(f"ttl_s must be >= 0, got {ttl_s}")
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._size_of = size_of
        self._clock = clock
        self._entries: OrderedDict[K, tuple[V, int, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.used = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: K) -> V | None:
        """The value (now most recently used), counting a hit or a miss; an expired entry is a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self.ttl_s is not None and self._clock() - entry[2] >= self.ttl_s:
                del self._entries[key]
                self.used -= entry[1]
                entry = None
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: K, value: V) -> list[K]:
        """Insert `value`, evicting least recently used entries until it fits; returns the evicted keys."""
        size = self._size_of(value)
        evicted: list[K] = []
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self.used -= previous[1]
            if size > self.capacity:
                return evicted
            while self.used + size > self.capacity:
                old_key, (_, old_size, _) = self._entries.popitem(last=False)
                self.used -= old_size
                self.evictions += 1
                evicted.append(old_key)
            self._entries[key] = (value, size, self._clock())
            self.used += size
        return evicted

    def drop(self, matches: Callable[[K], bool]) -> int:
        """Remove every entry whose key ``matches``; returns how many."""
        return self.drop_items(lambda key, _: matches(key))

    def drop_items(self, matches: Callable[[K, V], bool]) -> int:
        """Remove every entry whose key and value ``matches``; returns how many."""
        with self._lock:
            doomed = [key for key, (value, _, _) in self._entries.items() if matches(key, value)]
            for key in doomed:
                self.used -= self._entries.pop(key)[1]
        return len(doomed)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class SingleFlight(Generic[K]):
    """One fill per key at a time. Of concurrent misses of a key the first loads it and the others wait, then
    find it in the cache: a burst of queries for a cold adapter or context reads the store once, not once per
    query (16 MB each for a 7B rank-8 adapter)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held: dict[K, tuple[threading.Lock, int]] = {}  # key -> (its lock, threads holding or waiting)

    @contextmanager
    def hold(self, key: K) -> Iterator[None]:
        with self._guard:
            lock, waiting = self._held.get(key, (threading.Lock(), 0))
            self._held[key] = (lock, waiting + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, waiting = self._held[key]
                if waiting == 1:
                    del self._held[key]
                else:
                    self._held[key] = (lock, waiting - 1)


class TenantObjects(Protocol):
    """What the engine's caches read of a tenant on a miss: `lloco.registry.Registry` is one."""

    tenant: str
    uid: str

    def get_context(self, doc_id: str, compressor_id: str) -> tuple[torch.Tensor, ContextInfo]: ...

    def read_adapter_files(self, name: str, version: str) -> dict[str, bytes]: ...


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass(frozen=True)
class ContextKey:
    """A compressed context is valid for one source text (sha) under one compressor, of one tenant
    (by its creation uid: a re-created tenant of the same name is another tenant)."""

    tenant: str
    tenant_uid: str
    doc_id: str
    compressor_id: str
    source_sha: str


@dataclass(frozen=True)
class PrefixKey:
    """The keys and values a query's summary embeddings leave in the generator's prefix cache depend on its
    contexts (which documents, which of their segments) and on the adapter that read them, so a new
    adapter version or document text is another key (nothing to invalidate)."""

    contexts: tuple[ContextKey, ...]  # one tenant's
    segments: tuple[tuple[int, ...], ...] | None  # per context, the segments taken (None: whole contexts)
    adapter: AdapterKey | None

    @property
    def tenant(self) -> str:
        return self.contexts[0].tenant


def context_key(registry: TenantObjects, doc: DocumentInfo, compressor_id: str) -> ContextKey:
    return ContextKey(registry.tenant, registry.uid, doc.doc_id, compressor_id, doc.sha256)


class ContextCache:
    """Compressed contexts: a GPU tier holding them ready for the decoder (device, model dtype) and a
    CPU tier holding them as stored; both LRU and bounded in bytes; misses read S3.
    """

    def __init__(self, gpu_bytes: int, cpu_bytes: int, device: torch.device, dtype: torch.dtype) -> None:
        self.gpu: LruCache[ContextKey, torch.Tensor] = LruCache(gpu_bytes, tensor_bytes)
        self.cpu: LruCache[ContextKey, torch.Tensor] = LruCache(cpu_bytes, tensor_bytes)
        self.s3_loads = 0
        self._device = device
        self._dtype = dtype
        self._filling: SingleFlight[ContextKey] = SingleFlight()

    def get(
        self, registry: TenantObjects, doc: DocumentInfo, compressor_id: str
    ) -> tuple[torch.Tensor, ContextTier]:
        """The context of `doc` as `[n_vectors, dim]` on the engine's device, and the tier it came from.

        Raises:
            FailedPrecondition: the document has no context for this compressor, or only a stale one.
        """
        key = context_key(registry, doc, compressor_id)
        ready = self.gpu.get(key)
        if ready is not None:
            return ready, "gpu"
        with self._filling.hold(key):
            ready = self.gpu.get(key)
            if ready is not None:  # filled while this request waited for another one's fill
                return ready, "gpu"
            stored = self.cpu.get(key)
            tier: ContextTier = "cpu"
            if stored is None:
                stored = self._load(registry, doc, compressor_id)
                self.cpu.put(key, stored)
                tier = "s3"
            ready = stored.to(device=self._device, dtype=self._dtype)
            self.gpu.put(key, ready)
            return ready, tier

    def _load(self, registry: TenantObjects, doc: DocumentInfo, compressor_id: str) -> torch.Tensor:
        not_ready = f"document {doc.doc_id!r} is not compressed yet; run compress"
        try:
            vectors, info = registry.get_context(doc.doc_id, compressor_id)
        except (NotFound, FailedPrecondition) as exc:
            raise FailedPrecondition(not_ready) from exc
        if info.source_sha != doc.sha256:
            raise FailedPrecondition(not_ready)
        self.s3_loads += 1
        return vectors.detach().to("cpu")


@dataclass(frozen=True)
class AdapterKey:
    """Slots and cache entries are keyed by version, so a new `current` never disturbs running rows, and
    by the tenant's creation uid, so a tenant deleted and created again never gets the old weights."""

    tenant: str
    tenant_uid: str
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.tenant}/{self.name}@{self.version}"


class AdapterCache(Generic[V]):
    """The CPU tier of adapters: parsed PEFT tensors, LRU by count, filled from S3.

    ``read_s`` and ``parse_s`` sum the fills' store reads and parses (host seconds over all threads): with
    ``s3_loads`` they say whether cold adapters are slow to read or to lay out."""

    def __init__(self, capacity: int, parse: Callable[[dict[str, bytes]], V]) -> None:
        self.tier: LruCache[AdapterKey, V] = LruCache(capacity, lambda _: 1)
        self.s3_loads = 0
        self.read_s = 0.0
        self.parse_s = 0.0
        self._parse = parse
        self._filling: SingleFlight[AdapterKey] = SingleFlight()

    def get(self, registry: TenantObjects, key: AdapterKey) -> tuple[V, bool]:
        """The parsed adapter and whether it was already in the CPU tier (or filled by a concurrent miss)."""
        parsed = self.tier.get(key)
        if parsed is not None:
            return parsed, True
        with self._filling.hold(key):
            parsed = self.tier.get(key)
            if parsed is not None:  # filled while this request waited for another one's fill
                return parsed, True
            started = time.perf_counter()
            files = registry.read_adapter_files(key.name, key.version)
            read = time.perf_counter()
            parsed = self._parse(files)
            self.read_s += read - started
            self.parse_s += time.perf_counter() - read
            self.s3_loads += 1
            self.tier.put(key, parsed)
        log.info("adapter loaded from s3", adapter=str(key))
        return parsed, False


@dataclass(frozen=True)
class SlotGrant:
    """A pinned slot for one row; `needs_load` when the slot does not yet hold the adapter's weights."""

    slot: int
    key: AdapterKey
    needs_load: bool


class SlotManager:
    """Assigns adapters to the model's fixed LoRA slots: LRU eviction among slots no running row uses.

    Not thread-safe: the scheduler calls it from its event loop only.
    """

    def __init__(self, n_slots: int) -> None:
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        self._holder: list[AdapterKey | None] = [None] * n_slots
        self._pins = [0] * n_slots
        self._recency: OrderedDict[int, None] = OrderedDict((slot, None) for slot in range(n_slots))
        self.loads = 0
        self.evictions = 0

    def acquire(self, key: AdapterKey) -> SlotGrant | None:
        """Pin a slot holding `key`, assigning the least recently used unpinned slot when it has none.

        Returns None when every slot is pinned by running rows.
        """
        slot = self.slot_of(key)
        needs_load = slot is None
        if slot is None:
            slot = next((s for s in self._recency if self._pins[s] == 0), None)
            if slot is None:
                return None
            if self._holder[slot] is not None:
                self.evictions += 1
                log.debug("adapter slot evicted", slot=slot, adapter=str(self._holder[slot]), by=str(key))
            self._holder[slot] = key
            self.loads += 1
        self._pins[slot] += 1
        self._recency.move_to_end(slot)
        return SlotGrant(slot, key, needs_load)

    def release(self, slot: int) -> None:
        """Unpin a slot; it stays resident until an eviction needs it."""
        if self._pins[slot] <= 0:
            raise ValueError(f"slot {slot} is not pinned")
        self._pins[slot] -= 1
        self._recency.move_to_end(slot)

    def forget(self, slot: int) -> None:
        """Mark a slot empty (its load failed), so no later request trusts its weights."""
        self._holder[slot] = None
        self._recency.move_to_end(slot, last=False)

    def forget_where(self, matches: Callable[[AdapterKey], bool]) -> list[int]:
        """Empty the unpinned slots whose adapter ``matches`` (a deleted tenant's); returns them."""
        slots = [
            s
            for s, held in enumerate(self._holder)
            if held is not None and matches(held) and not self._pins[s]
        ]
        for slot in slots:
            self.forget(slot)
        return slots

    def slot_of(self, key: AdapterKey) -> int | None:
        return next((s for s, held in enumerate(self._holder) if held == key), None)

    def pins(self, slot: int) -> int:
        return self._pins[slot]

    def resident(self) -> dict[AdapterKey, int]:
        return {held: s for s, held in enumerate(self._holder) if held is not None}
