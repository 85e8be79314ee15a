"""The compression job: find the pending documents of some tenants, run the pipeline, report.

Idempotent and resumable by construction: the documents to do are those without a fresh context
(``Registry.pending_documents``: none stored for this compressor, or one made from other bytes), and
a context is one whole-object PUT. A rerun therefore skips finished documents, and a job killed at
any point leaves each context either complete or absent.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lloco.config import Settings
from lloco.errors import LlocoError
from lloco.jobs import JobRun, new_job_id
from lloco.logs import get_logger
from lloco.registry import DocumentInfo, Registry, Tenants
from lloco.storage import ObjectStore, keys

log = get_logger(__name__)

SCAN_THREADS = 8  # tenants scanned at once; each scan is a series of small S3 GETs
SCAN_PAGE = 1000


@dataclass(frozen=True)
class DocumentFailure:
    tenant: str
    doc_id: str
    reason: str


@dataclass
class CompressSummary:
    """What a job did. ``documents`` = ``compressed`` + ``skipped`` + ``failed``."""

    compressor_id: str
    tenants: list[str]
    documents: int = 0
    compressed: int = 0  # contexts written
    skipped: int = 0  # context already fresh
    failed: int = 0
    tokens: int = 0  # tokens of the compressed documents
    vectors: int = 0  # summary vectors written
    seconds: float = 0.0  # pipeline wall time, actor start-up (model loading) included
    tokens_per_s: float = 0.0
    steady_tokens_per_s: float | None = None  # start-up excluded; see _collect
    failures: list[DocumentFailure] = field(default_factory=list)

    @property
    def finished(self) -> int:
        """Documents settled so far: compressed, skipped or failed."""
        return self.compressed + self.skipped + self.failed

    def line(self) -> str:
        """The one-line console summary."""
        steady = f", steady {self.steady_tokens_per_s:,.0f}" if self.steady_tokens_per_s is not None else ""
        return (
            f"compress {self.compressor_id}: {self.documents} docs in {len(self.tenants)} tenants: "
            f"{self.compressed} compressed ({self.compressed} contexts, {self.vectors:,} vectors, "
            f"{self.tokens:,} tokens), {self.skipped} skipped, {self.failed} failed; "
            f"{self.tokens_per_s:,.0f} tokens/s{steady} in {self.seconds:.1f} s"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_compress_job(
    settings: Settings,
    tenants: list[str] | None,
    summary_path: Path | None = None,
    job_id: str | None = None,
    on_progress: Callable[[CompressSummary], None] | None = None,
) -> CompressSummary:
    """Compress every pending document of ``tenants`` (None: every tenant) and store the contexts.

    Joins the Ray cluster of this process (see ``connect_ray``). Bad documents are reported in the
    summary (and logged); they do not stop the others. ``on_progress(summary)`` is called once the documents
    are counted and as results stream in (``summary.finished`` of ``summary.documents``: for progress bars). The job records itself (``lloco.jobs.JobRun``)
    under each named tenant, or with ``tenants=None`` under each tenant that had pending documents.

    Raises:
        NotFound: a named tenant does not exist. Errors of loading the model or compressor.
    """
    store = ObjectStore(settings.store)
    names = _resolve_tenants(store, tenants)
    run = JobRun(store, keys.validate_id("job", job_id or new_job_id("compress")), "compress", {})
    if tenants is not None:
        run.start(names)
    try:
        summary, done = _compress(
            settings, store, names, run if tenants is None else None, on_progress or (lambda _: None)
        )
    except BaseException as error:
        run.fail_unfinished(f"{type(error).__name__}: {error}")
        raise
    for tenant, outcome in done.items():
        failed = outcome["failed"]
        message = f"compressed {len(outcome['compressed'])} documents"
        if failed:
            message += "; not compressed: " + "; ".join(f"{doc} ({reason})" for doc, reason in failed.items())
        outcome["index"] = _rebuild_index(settings, store, tenant, summary.compressor_id)
        message += f"; retrieval index: {outcome['index']}"
        run.succeed(tenant, outcome, message)
    if summary_path is not None:
        summary_path = Path(summary_path)
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    return summary


def _compress(
    settings: Settings,
    store: ObjectStore,
    names: list[str],
    run: JobRun | None,
    on_progress: Callable[[CompressSummary], None],
) -> tuple[CompressSummary, dict[str, dict[str, Any]]]:
    """Scan, then compress every pending document of ``names``: the summary, and per tenant the documents
    compressed and failed (``run``, when given, is started for the tenants with pending documents)."""
    from lloco.compress.pipeline import WorkItem, build_dataset, plan_actors
    from lloco.model import load_compressor, load_model

    model = settings.model
    # The compressor's identity and the tokenizer, without weights in memory (the meta device).
    base = load_model(model.base_model, model.cache_dir, store, device="meta")
    compressor = load_compressor(model.compressor, base, model.cache_dir, store).config
    summary = CompressSummary(compressor.compressor_id, names)
    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        scans = list(pool.map(lambda tenant: _scan(store, tenant, compressor.compressor_id), names))
    items = [WorkItem(doc.tenant, doc.doc_id, doc.bytes) for pending, _ in scans for doc in pending]
    summary.skipped = sum(max(0, total - len(pending)) for pending, total in scans)
    summary.documents = summary.skipped + len(items)
    working = (
        names
        if run is None
        else [tenant for tenant, (pending, _) in zip(names, scans, strict=True) if pending]
    )
    if run is not None:
        run.start(working)
    done: dict[str, dict[str, Any]] = {t: {"compressed": [], "skipped": [], "failed": {}} for t in working}
    log.info(
        "compress job started",
        compressor=compressor.compressor_id,
        tenants=len(names),
        documents=summary.documents,
        pending=len(items),
    )
    on_progress(summary)
    if items:
        import ray

        connect_ray()
        cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
        plan = plan_actors(settings.compress, cluster_gpus)
        log.info("compressor pool", cluster_gpus=cluster_gpus, **asdict(plan))
        if plan.num_gpus * plan.pool_size > cluster_gpus:
            log.warning(
                "the compressor pool needs more GPUs than the cluster has now; it waits for them",
                needed=plan.num_gpus * plan.pool_size,
                cluster_gpus=cluster_gpus,
            )
        dataset = build_dataset(items, settings, compressor, base.tokenizer, plan)
        _collect(dataset, summary, done, on_progress)
    log.info("compress job finished", **{k: v for k, v in summary.to_json().items() if k != "failures"})
    return summary, done


def _rebuild_index(settings: Settings, store: ObjectStore, tenant: str, compressor_id: str) -> str:
    """Rebuild the tenant's retrieval index from its fresh contexts; what happened, in a few words (a
    failed rebuild leaves the last version in place and fails no document)."""
    try:
        index = Registry(store, tenant).index(compressor_id, settings.limits.max_corpus_segments)
        version = index.rebuild()
    except LlocoError as error:
        log.warning("retrieval index not rebuilt", tenant=tenant, error=str(error))
        return f"not rebuilt ({type(error).__name__}: {error})"
    return f"{version.segments} segments of {version.documents} documents (build {version.build_id})"


def connect_ray() -> None:
    """Join a Ray cluster: the one this process is in already, the one at ``RAY_ADDRESS``, one running
    on this machine; else start a local instance."""
    import ray

    from lloco.terminal import ray_log_to_driver

    if ray.is_initialized():
        return
    log_to_driver = ray_log_to_driver()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=log_to_driver)
        return
    try:
        ray.init(address="auto", log_to_driver=log_to_driver)
    except ConnectionError:
        ray.init(include_dashboard=False, log_to_driver=log_to_driver)


def _resolve_tenants(store: ObjectStore, tenants: list[str] | None) -> list[str]:
    if tenants is None:
        return sorted(Tenants(store).list())
    names = list(dict.fromkeys(tenants))
    for name in names:
        Registry(store, name)  # NotFound for an unknown tenant, before any work starts
    return names


def _scan(store: ObjectStore, tenant: str, compressor_id: str) -> tuple[list[DocumentInfo], int]:
    """The tenant's pending documents, and how many documents it has."""
    registry = Registry(store, tenant)
    pending = registry.pending_documents(compressor_id)
    total, token = 0, ""
    while True:
        page, token = registry.list_documents(SCAN_PAGE, token)
        total += len(page)
        if not token:
            return pending, total


def _collect(
    dataset: Any,
    summary: CompressSummary,
    done: dict[str, dict[str, Any]],
    on_progress: Callable[[CompressSummary], None],
) -> None:
    """Run the pipeline, folding its result rows into ``summary`` and each tenant's outcome in ``done``
    (``compressed`` ids, ``failed`` id -> reason) as they stream in.

    Steady throughput leaves out the start-up (workers, model loading, the first batch): the tokens of
    every actor call but the first to end, over the time from that first end to the last.
    """
    start = time.perf_counter()
    call_tokens: dict[float, int] = {}  # actor call end (done_at) -> tokens of its documents
    for block in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for i, error in enumerate(block["error"]):
            tenant, doc_id = str(block["tenant"][i]), str(block["doc_id"][i])
            if error:
                summary.failed += 1
                summary.failures.append(DocumentFailure(tenant, doc_id, str(error)))
                done[tenant]["failed"][doc_id] = str(error)
                log.warning("document failed", tenant=tenant, doc=doc_id, reason=str(error))
                continue
            tokens = int(block["tokens"][i])
            done[tenant]["compressed"].append(doc_id)
            summary.compressed += 1
            summary.vectors += int(block["n_vectors"][i])
            summary.tokens += tokens
            done_at = float(block["done_at"][i])
            call_tokens[done_at] = call_tokens.get(done_at, 0) + tokens
        on_progress(summary)
    summary.seconds = time.perf_counter() - start
    summary.tokens_per_s = summary.tokens / summary.seconds if summary.seconds > 0 else 0.0
    if len(call_tokens) >= 2:
        first, last = min(call_tokens), max(call_tokens)
        summary.steady_tokens_per_s = (summary.tokens - call_tokens[first]) / (last - first)
