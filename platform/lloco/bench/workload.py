"""Shared by the benchmarks that drive the serving engine: a store, random tenants (a compressed document
and an adapter each), timed queries and their summaries (throughput, percentiles, per-tenant shares)."""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lloco.bench.common import context_vectors, padded_tokenizer, percentile, random_adapter
from lloco.model import Llama, SamplingParams

# -- a store and random tenants ----------------------------------------------------------------------------------------


@contextmanager
def object_store(endpoint: str | None, root: Path) -> Iterator[Any]:
    """An ObjectStore on a fresh bucket: of the S3 at ``endpoint`` (keys from the AWS environment), or of a
    SeaweedFS started under ``root``."""
    from lloco.config import StoreSettings
    from lloco.storage import EmbeddedS3, ObjectStore

    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    if endpoint:
        store = ObjectStore(StoreSettings(endpoint_url=endpoint, bucket=bucket))
        store.ensure_bucket()
        yield store
        return
    with EmbeddedS3(root / "s3") as server:
        store = ObjectStore(server.store_settings(bucket=bucket))
        store.ensure_bucket()
        yield store


def random_engine_parts(model: Llama, segment_len: int, k: int) -> tuple[Any, Any]:
    """(LoadedModel with the padded tokenizer, an untrained Compressor of S, k) around ``model``: what
    ``EngineCore`` needs; contexts are planted by ``plant_tenants``, so the compressor never runs."""
    from lloco.model import Compressor, LoadedModel

    config = model.config
    loaded = LoadedModel(model, padded_tokenizer(config.vocab_size), config, "bench-random", Path("."))
    summary = torch.randn(k, config.dim, generator=torch.Generator().manual_seed(0)) * 0.02
    return loaded, Compressor(loaded, summary, segment_len, accumulate=True)


PLANT_WORKERS = 8  # tenants planted (or deleted) at once: their store round trips overlap


def plant_tenants(
    store: Any,
    model: Llama,
    compressor_id: str,
    tenants: list[str],
    doc_tokens: int,
    segment_len: int,
    k: int,
    rank: int,
    seed: int,
) -> list[Any]:
    """Each tenant gets a document "doc" standing for ``doc_tokens`` tokens with a random compressed context,
    and a random rank-``rank`` adapter "default" of its own; ``PLANT_WORKERS`` tenants at a time.

    Returns each tenant's ``Resolved`` (its uid, the document's record, the adapter version): what the edge
    sends from its caches, so a query carrying it reads nothing from the store once the engine holds its
    context and adapter."""
    from lloco.registry import Registry, Tenants
    from lloco.serve.engine_core import Resolved

    text = " ".join(["the old house near the water"] * max(1, doc_tokens // 6)).encode()

    def plant(index: int, tenant: str) -> Resolved:
        Tenants(store).create(tenant)
        registry = Registry(store, tenant)
        document, _ = registry.ingest_document("doc", text, len(text), tokens=doc_tokens)
        vectors = context_vectors(model, doc_tokens, segment_len, k, seed=seed + index)
        registry.put_context("doc", compressor_id, vectors, document.sha256, segment_len, k)
        adapter = registry.publish_adapter(
            "default", random_adapter(model.config, rank, seed=seed + index), train={}
        )
        return Resolved(registry.uid, (document,), adapter)

    with ThreadPoolExecutor(PLANT_WORKERS) as pool:
        return list(pool.map(plant, range(len(tenants)), tenants))


def delete_tenants(store: Any, tenants: list[str]) -> None:
    from lloco.registry import Tenants

    with ThreadPoolExecutor(PLANT_WORKERS) as pool:
        list(pool.map(Tenants(store).delete, tenants))


# -- queries, timed --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuerySample:
    """One query as its client saw it."""

    tenant: str
    ttft_s: float | None  # None: no token came (cancelled before its first)
    latency_s: float
    tokens: int
    # the engine's own account of where the TTFT went (QueryStats: prepare_s, queue_s, prefill_s; through gRPC
    # the reply's stats.prepare_time, queue_time, prefill_time); None when the client did not get it
    ttft_parts: dict[str, float] | None = None
    # the TTFT on the server's clock, from the request's arrival (a gRPC reply's stats.time_to_first_token);
    # the client's TTFT less it is the call's way in and the token's way out, client included
    server_ttft_s: float | None = None


TTFT_PARTS = ("prepare", "queue", "prefill")  # QueryStats' parts of ttft_s, in order


def engine_request(
    tenant: str,
    doc_ids: tuple[str, ...],
    question: str,
    new_tokens: int,
    resolved: Any = None,
    prompt_ids: tuple[int, ...] | None = None,
) -> Any:
    """A greedy query of ``tenant`` with its adapter "default" (current version), ``new_tokens`` long;
    ``resolved`` and ``prompt_ids`` as the edge sends them (None: the engine reads and tokenizes)."""
    from lloco.serve.engine_core import EngineRequest

    return EngineRequest(
        request_id=uuid.uuid4().hex,
        tenant=tenant,
        doc_ids=doc_ids,
        question=question,
        adapter="default",
        adapter_version=None,
        params=SamplingParams(new_tokens),
        resolved=resolved,
        prompt_ids=prompt_ids,
    )


async def engine_query(
    core: Any, request: Any, on_first: Callable[[float], object] | None = None
) -> QuerySample:
    """Run ``request`` on an ``EngineCore``; ``on_first`` gets the TTFT (seconds) as soon as it is known."""
    started = time.perf_counter()
    first, tokens, parts = None, 0, None
    async for event in core.generate(request):
        if event.token_ids and first is None:
            first = time.perf_counter() - started
            if on_first is not None:
                on_first(first)
        tokens += len(event.token_ids)
        if event.final is not None:
            parts = {part: getattr(event.final, f"{part}_s") for part in TTFT_PARTS}
    return QuerySample(request.tenant, first, time.perf_counter() - started, tokens, parts)


def load_summary(samples: Sequence[QuerySample], wall_s: float) -> dict[str, Any]:
    """Throughput and latency percentiles of a load run."""
    ttft = [s.ttft_s * 1e3 for s in samples if s.ttft_s is not None]
    latency = [s.latency_s * 1e3 for s in samples]
    summary = {
        "seconds": wall_s,
        "queries": len(samples),
        "queries_per_s": len(samples) / wall_s,
        "tokens_per_s": sum(s.tokens for s in samples) / wall_s,
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "latency_p50_ms": percentile(latency, 50),
        "latency_p99_ms": percentile(latency, 99),
    }
    return summary | ttft_parts_summary(samples)


def ttft_summary(samples: Sequence[QuerySample]) -> dict[str, float]:
    """p50, p99 and max of the samples' TTFT, in ms (queries without a token left out)."""
    ttft = [s.ttft_s * 1e3 for s in samples if s.ttft_s is not None]
    return {
        "p50_ms": percentile(ttft, 50),
        "p99_ms": percentile(ttft, 99),
        "max_ms": max(ttft, default=math.nan),
    }


def ttft_parts_summary(samples: Sequence[QuerySample]) -> dict[str, Any]:
    """p50/p99 of each part of the engine's TTFT (``TTFT_PARTS``) over the samples that carry them, and of the
    queries' TTFT in the same samples: {"ttft_parts_ms": {part: {"p50", "p99"}, ...}}, or {} when none does."""
    known = [(s.ttft_s, s.ttft_parts) for s in samples if s.ttft_s is not None and s.ttft_parts is not None]
    if not known:
        return {}
    columns = {part: [parts[part] * 1e3 for _, parts in known] for part in TTFT_PARTS}
    columns["ttft"] = [ttft * 1e3 for ttft, _ in known]
    return {
        "ttft_parts_ms": {
            name: {"p50": percentile(values, 50), "p99": percentile(values, 99)}
            for name, values in columns.items()
        }
    }


TTFT_PARTS_LEGEND = (
    "prepare: lookups and the context onto the device; queue: waiting for a generator row; prefill: from the "
    "row to the first token; the rest of TTFT is the token's way to the caller"
)


def ttft_parts_table(parts: dict[str, dict[str, float]]) -> list[str]:
    """Markdown rows of a ``ttft_parts_summary``: a column per part (and TTFT), a row for p50 and p99."""
    return [
        "| | " + " | ".join(parts) + " |",
        "|---|" + "---:|" * len(parts),
        *(f"| {q} | " + " | ".join(f"{parts[name][q]:.1f}" for name in parts) + " |" for q in ("p50", "p99")),
    ]


def tenant_shares(samples: Sequence[QuerySample], tenants: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each tenant's queries, generated tokens and share of all generated tokens."""
    total = sum(s.tokens for s in samples) or 1
    shares = {}
    for tenant in tenants:
        mine = [s for s in samples if s.tenant == tenant]
        tokens = sum(s.tokens for s in mine)
        shares[tenant] = {"queries": len(mine), "tokens": tokens, "share": tokens / total}
    return shares


def varied_new_tokens_range(mean: int) -> tuple[int, int]:
    """The shortest and longest query of a load with varied lengths: mean/2 and 3 mean/2 new tokens."""
    return max(1, mean // 2), mean + mean // 2


def varied_new_tokens(number: int, mean: int) -> int:
    """Query ``number``'s length: uniform in ``varied_new_tokens_range(mean)``, the same sequence wherever it
    is asked. Equal lengths let a closed loop fall into waves (rows admitted together decode together, finish
    together, and their clients' next queries arrive together), a lockstep that one run may keep and another
    lose by chance."""
    return random.Random(number).randint(*varied_new_tokens_range(mean))
