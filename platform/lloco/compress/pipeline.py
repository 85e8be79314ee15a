"""The Ray Data pipeline of the compression job.

    pending documents (driver, sorted longest first)
      -> read + check + tokenize          CPU tasks (S3 GETs, the HF tokenizer)
      -> compress + write contexts        actor pool: one compressor per actor, i-th segments batched;
                                          then one whole-object PUT per document, in parallel threads
      -> one small result row per document, streamed back to the driver

Every stage runs the shared steps of ``lloco.compress.steps``. A bad document travels on as a row
with its ``error`` set, so one document never fails a batch. Contexts are written by the actor that
computed them: a context lands as soon as its batch is done, the summary vectors never cross the
object store (where bf16 has no Arrow type), and the PUTs of a batch (64 x 3.3 MB for 7B documents of
8 segments) are small next to the time its forwards take.

Sizing (defaults of ``settings.compress``): a compressor forward of LLaMA-2-7B over 64 segments is
64 x (1536 + 50) ~ 100k positions, ~1.3 PFLOP: matmuls with M = 100k rows are far into the compute-
bound regime of an H200, and its activations (a few GB per layer, freed layer by layer) fit next to
the 13.5 GB of weights in 141 GB; at the longest documents (``max_document_tokens`` 262k: 171
segments, so late rows carry ~8.5k summary positions before their segment) the MLP activations of
one layer peak near 30 GB, still inside the card. Smaller batches (16: 25k positions) already
saturate the matmuls; 64 leaves room for documents of unequal
length, whose later segments fill fewer rows. One actor per GPU: a 7B model uses one H200 fully, and
a second actor on the same GPU would only duplicate the weights.
"""

from __future__ import annotations

import functools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy, Dataset

from lloco.compress.steps import BadDocument, compress_many, prepare, read_document, store_context
from lloco.config import CompressSettings, Settings, StoreSettings
from lloco.errors import FailedPrecondition, LlocoError
from lloco.logs import get_logger
from lloco.model import CompressorConfig, load_compressor, load_model
from lloco.registry import Registry
from lloco.registry.records import segment_row, segments_from_rows
from lloco.storage import ObjectStore

log = get_logger(__name__)

TASK_NUM_CPUS = 0.25  # read/tokenize tasks wait on S3 most of the time
READ_BATCH = 8  # documents per read/tokenize task: small, so tokenizing spreads over many tasks
WRITE_THREADS = 8  # parallel context PUTs of one actor


@dataclass(frozen=True)
class ActorPlan:
    """How many compressor actors run, with what resources, on how many documents per call."""

    pool_size: int
    num_gpus: float
    num_cpus: float
    batch_size: int


def plan_actors(compress: CompressSettings, cluster_gpus: float) -> ActorPlan:
    """The actor pool for a cluster with ``cluster_gpus`` GPUs.

    Settings given explicitly (YAML, env, arguments) are used as they are. Left at their defaults on a
    cluster with GPUs, they become one actor per GPU: ``actor_num_gpus=1`` and a pool of as many actors
    as the cluster has GPUs. On a CPU-only cluster the defaults stand (one actor, fractional CPUs).
    """
    explicit = compress.model_fields_set
    num_gpus = compress.actor_num_gpus
    if "actor_num_gpus" not in explicit and cluster_gpus >= 1:
        num_gpus = 1.0
    pool_size = compress.pool_size
    if "pool_size" not in explicit and num_gpus > 0:
        pool_size = max(1, math.floor(cluster_gpus / num_gpus))
    return ActorPlan(pool_size, num_gpus, compress.actor_num_cpus, compress.batch_size)


@dataclass(frozen=True)
class WorkItem:
    """A pending document: where it is and how big (the pipeline takes the biggest first)."""

    tenant: str
    doc_id: str
    size: int


def build_dataset(
    items: list[WorkItem],
    settings: Settings,
    compressor: CompressorConfig,
    tokenizer: Any,
    plan: ActorPlan,
) -> Dataset:
    """The lazy pipeline over ``items``; iterate it to run it.

    Rows out: tenant, doc_id, tokens, n_vectors, error ("" when the context was written), and
    done_at: when the actor call that compressed and wrote it ended (epoch seconds; the same for the
    documents of one call).
    """
    ordered = sorted(items, key=lambda item: (-item.size, item.tenant, item.doc_id))
    rows = [{"tenant": item.tenant, "doc_id": item.doc_id} for item in ordered]
    return (
        ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / READ_BATCH)))
        .map_batches(
            read_and_tokenize,
            batch_size=READ_BATCH,
            batch_format="numpy",
            num_cpus=TASK_NUM_CPUS,
            fn_kwargs={
                "store_settings": settings.store,
                "tokenizer": tokenizer,
                "segment_len": compressor.segment_len,
                "max_tokens": settings.compress.max_document_tokens,
            },
        )
        .map_batches(
            CompressorActor,
            batch_size=plan.batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=plan.pool_size),
            num_gpus=plan.num_gpus,
            num_cpus=plan.num_cpus,
            fn_constructor_kwargs={
                "settings": settings,
                "expected": compressor,
                "batch_size": plan.batch_size,
            },
        )
    )


@functools.cache
def _object_store(settings: StoreSettings) -> ObjectStore:
    """One store (one boto3 client and its connection pool) per worker process."""
    return ObjectStore(settings)


class _Registries(dict[str, Registry]):
    """Registries of the tenants one batch touches, each opened once."""

    def __init__(self, store: ObjectStore) -> None:
        super().__init__()
        self._store = store

    def __missing__(self, tenant: str) -> Registry:
        self[tenant] = registry = Registry(self._store, tenant)
        return registry


def read_and_tokenize(
    batch: dict[str, np.ndarray],
    store_settings: StoreSettings,
    tokenizer: Any,
    segment_len: int,
    max_tokens: int,
) -> dict[str, np.ndarray]:
    """Stage 1 (CPU task): stored text -> token ids, or the reason the document is bad."""
    registries = _Registries(_object_store(store_settings))
    shas, token_ids, segments, tokens, errors = [], [], [], [], []
    for tenant, doc_id in zip(batch["tenant"], batch["doc_id"], strict=True):
        sha, ids, table, error = "", np.zeros(0, np.int32), np.zeros((0, 4), np.int64), ""
        try:
            text = read_document(registries[tenant], doc_id)
            doc = prepare(tenant, doc_id, text, tokenizer, segment_len, max_tokens)
            sha, ids = doc.source_sha, np.asarray(doc.token_ids, np.int32)
            table = np.asarray([segment_row(segment) for segment in doc.segments], np.int64).reshape(-1, 4)
        except BadDocument as bad:
            error = bad.reason
        except LlocoError as failure:  # deleted since the job listed it, or the store is down
            error = str(failure)
        shas.append(sha)
        token_ids.append(ids)
        segments.append(table)
        tokens.append(len(ids))
        errors.append(error)
    return {
        "tenant": batch["tenant"],
        "doc_id": batch["doc_id"],
        "source_sha": np.array(shas, dtype=object),
        "token_ids": _ragged(token_ids),
        "segments": _ragged(segments),  # [n_segments, 4] rows of records.segment_row
        "tokens": np.array(tokens, np.int64),
        "error": np.array(errors, dtype=object),
    }


class CompressorActor:
    """Stage 2 (actor pool): loads the base model and compressor once, then compresses batches and
    writes their contexts."""

    def __init__(self, settings: Settings, expected: CompressorConfig, batch_size: int) -> None:
        device = torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")
        if device.type == "cpu" and settings.compress.cpu_threads:
            torch.set_num_threads(settings.compress.cpu_threads)
        self.store = _object_store(settings.store)
        model = settings.model
        base = load_model(model.base_model, model.cache_dir, self.store, model.dtype, device)
        self.compressor = load_compressor(model.compressor, base, model.cache_dir, self.store)
        if self.compressor.config != expected:
            raise FailedPrecondition(
                f"compressor changed since the job started: {expected.compressor_id} -> "
                f"{self.compressor.compressor_id}"
            )
        self.batch_size = batch_size
        self.writers = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="context-put")
        log.info("compressor actor ready", compressor=expected.compressor_id, device=str(device))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = list(batch["error"])
        n_vectors = np.zeros(len(errors), np.int64)
        ready = [i for i, error in enumerate(errors) if not error]
        results = compress_many(
            self.compressor, [batch["token_ids"][i].tolist() for i in ready], self.batch_size
        )
        registries = _Registries(self.store)
        writes = {}
        for i, result in zip(ready, results, strict=True):
            if isinstance(result, LlocoError):
                errors[i] = str(result)
                continue
            try:
                registry = registries[batch["tenant"][i]]
            except LlocoError as failure:  # the tenant was deleted meanwhile
                errors[i] = str(failure)
                continue
            writes[i] = self.writers.submit(
                store_context, registry, self.compressor.config, batch["doc_id"][i],
                batch["source_sha"][i], segments_from_rows(batch["segments"][i].tolist()), result,
            )  # fmt: skip
        for i, write in writes.items():
            try:
                n_vectors[i] = write.result().n_vectors
            except LlocoError as failure:  # changed or deleted meanwhile, or the store is down
                errors[i] = str(failure)
        return {
            "tenant": batch["tenant"],
            "doc_id": batch["doc_id"],
            "tokens": batch["tokens"],
            "n_vectors": n_vectors,
            "error": np.array(errors, dtype=object),
            "done_at": np.full(len(errors), time.time()),
        }


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """An object array of differently shaped arrays (NumPy would try to stack equal shapes)."""
    column = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):
        column[i] = array
    return column
