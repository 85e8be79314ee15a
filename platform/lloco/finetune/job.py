"""The finetune job: one Ray Train ``TorchTrainer`` per tenant, all running at once, adapters published to S3.

Each tenant's trainer checkpoints to ``checkpoints/{job_id}/{tenant}`` in the object store. Ray Train
restores a run whose storage folder already holds a checkpoint snapshot, so rerunning a killed job
with the same job id resumes every tenant from its last checkpoint. A tenant whose training
succeeded gets its adapter published as a new version (``current`` flips); a failed tenant publishes
nothing and its error is reported in the per-tenant result. The job records itself under each tenant
(``lloco.jobs.JobRun``): RUNNING at the start, then each tenant's published version or error.
``lloco.jobs.Jobs.submit_finetune`` submits it to a Ray cluster.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lloco.config import Settings, StoreSettings
from lloco.errors import Internal, InvalidArgument
from lloco.finetune.data import check_rows
from lloco.finetune.options import TrainOptions
from lloco.finetune.train import ADAPTER_FILES, TRAIN_STATE_FILE, LoraFinetune
from lloco.jobs import JobRun, new_job_id
from lloco.logs import get_logger
from lloco.registry import Registry
from lloco.storage import ObjectStore, keys
from lloco.terminal import ray_log_to_driver

log = get_logger(__name__)


@dataclass(frozen=True)
class TenantResult:
    """What the job did for one tenant: the published version, or the error that stopped it."""

    tenant: str
    ok: bool
    adapter: str
    version: str | None = None
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def run_finetune_job(
    settings: Settings,
    tenants: list[str],
    dataset: str,
    adapter: str = "default",
    job_id: str | None = None,
    options: TrainOptions | None = None,
    on_step: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, TenantResult]:
    """Train one adapter per tenant concurrently on Ray; publish each success as a new version.

    ``on_step(tenant, metrics)`` is called in this process after each optimizer step of a tenant's trainer
    (metrics: step, total_steps, epoch, loss, ...), for progress bars; the workers send them through a queue.
    """
    import ray

    _check_request(tenants, dataset, adapter)
    job_id = keys.validate_id("job", job_id or new_job_id("finetune"))
    options = options or TrainOptions()
    store = ObjectStore(settings.store)
    args = {"dataset": dataset, "adapter": adapter, "options": options.model_dump()}
    run = JobRun(store, job_id, "finetune", args)
    run.start(tenants)
    try:
        if not ray.is_initialized():
            ray.init(configure_logging=False, log_to_driver=ray_log_to_driver())
        log.info("finetune job started", job_id=job_id, tenants=tenants, dataset=dataset, adapter=adapter)
        with (
            ThreadPoolExecutor(max_workers=len(tenants), thread_name_prefix="finetune") as pool,
            _StepFeed(on_step) as steps,
        ):
            futures = {
                tenant: pool.submit(
                    _run_tenant, settings, store, tenant, dataset, adapter, job_id, options, run, steps.queue
                )
                for tenant in tenants
            }
            results = {tenant: future.result() for tenant, future in futures.items()}
    except BaseException as error:
        run.fail_unfinished(f"{type(error).__name__}: {error}")
        raise
    log.info(
        "finetune job finished",
        job_id=job_id,
        succeeded=[t for t, r in results.items() if r.ok],
        failed=[t for t, r in results.items() if not r.ok],
    )
    return results


class _StepFeed:
    """Carries the trainers' step metrics to ``on_step`` in the driver: a Ray queue (an actor taking no CPU,
    so it never waits for one) drained by a thread. Without ``on_step`` there is no queue."""

    def __init__(self, on_step: Callable[[str, dict[str, Any]], None] | None) -> None:
        self._on_step = on_step
        self.queue: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _StepFeed:
        if self._on_step is not None:
            from ray.util.queue import Queue

            self.queue = Queue(actor_options={"num_cpus": 0})
            self._thread = threading.Thread(target=self._drain, name="finetune-steps", daemon=True)
            self._thread.start()
        return self

    def _drain(self) -> None:
        from ray.util.queue import Empty

        assert self._on_step is not None and self.queue is not None
        while True:
            try:
                tenant, metrics = self.queue.get(timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            self._on_step(tenant, metrics)

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.queue.shutdown()


def _check_request(tenants: list[str], dataset: str, adapter: str) -> None:
    if not tenants:
        raise InvalidArgument("a finetune job needs at least one tenant")
    if len(set(tenants)) != len(tenants):
        raise InvalidArgument(f"tenants repeat in {tenants}")
    for tenant in tenants:
        keys.validate_id("tenant", tenant)
    keys.validate_id("dataset", dataset)
    keys.validate_id("adapter", adapter)


def _run_tenant(
    settings: Settings,
    store: ObjectStore,
    tenant: str,
    dataset: str,
    adapter: str,
    job_id: str,
    options: TrainOptions,
    run: JobRun,
    steps: Any = None,
) -> TenantResult:
    """Train and publish one tenant, and record it; every failure becomes an unsuccessful result, never an
    exception."""
    started = time.perf_counter()
    try:
        registry = Registry(store, tenant)
        check_rows(registry, registry.read_dataset(dataset))  # fails fast, before any worker starts
        with tempfile.TemporaryDirectory(prefix=f"lloco-adapter-{tenant}-") as scratch:
            final = _train(settings, store, tenant, dataset, adapter, job_id, options, Path(scratch), steps)
            version, metrics = _publish(registry, adapter, job_id, final)
    except Exception as error:  # noqa: BLE001 - every tenant's failure is reported, not raised
        message = _describe(error)
        log.error("finetune failed", job_id=job_id, tenant=tenant, error=message)
        run.fail(tenant, message)
        return TenantResult(tenant, False, adapter, error=message, seconds=time.perf_counter() - started)
    log.info("tenant finished", job_id=job_id, tenant=tenant, adapter=adapter, version=version)
    result = {"adapter": adapter, "version": version, "metrics": metrics}
    run.succeed(tenant, result, f"published adapter {adapter!r} version {version}")
    return TenantResult(
        tenant, True, adapter, version=version, metrics=metrics, seconds=time.perf_counter() - started
    )


def _train(
    settings: Settings,
    store: ObjectStore,
    tenant: str,
    dataset: str,
    adapter: str,
    job_id: str,
    options: TrainOptions,
    scratch: Path,
    steps: Any = None,
) -> Path:
    """Fit the tenant's trainer (resuming when its storage folder has checkpoints); the final checkpoint,
    downloaded into ``scratch``. ``steps``: a Ray queue that gets (tenant, metrics) after each step."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    finetune = settings.finetune
    resources: dict[str, float] = {"CPU": finetune.cpus_per_worker}
    if finetune.gpus_per_worker > 0:
        resources["GPU"] = finetune.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker=_train_worker,
        train_loop_config={
            "settings": settings,
            "tenant": tenant,
            "dataset": dataset,
            "adapter": adapter,
            "job_id": job_id,
            "options": options,
            "steps": steps,
        },
        scaling_config=ScalingConfig(
            num_workers=finetune.num_workers,
            use_gpu=finetune.gpus_per_worker > 0,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=tenant,
            storage_path=storage_path(store, job_id),
            storage_filesystem=s3_filesystem(settings.store),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise Internal(f"training of tenant {tenant!r} ended without a final checkpoint")
    return Path(result.checkpoint.to_directory(str(scratch / "final")))


def _train_worker(config: dict[str, Any]) -> None:
    """The per-worker train loop: the recipe, wired to Ray Train's checkpoint reporting and restore."""
    import ray.train

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    recipe = LoraFinetune(
        settings=config["settings"],
        tenant=config["tenant"],
        dataset=config["dataset"],
        adapter=config["adapter"],
        job_id=config["job_id"],
        options=config["options"],
        rank=rank,
        world_size=world_size,
        report=report,
        on_step=None
        if config["steps"] is None
        else lambda metrics: config["steps"].put((config["tenant"], metrics)),
    )
    try:
        restored = ray.train.get_checkpoint()
        if restored is None:
            recipe.setup(resume_from=None)
        else:
            with restored.as_directory() as directory:
                recipe.setup(resume_from=Path(directory))
        recipe.train()
        recipe.save()
    finally:
        recipe.cleanup()


def _publish(
    registry: Registry, adapter: str, job_id: str, checkpoint_dir: Path
) -> tuple[str, dict[str, Any]]:
    """Publish the final checkpoint's adapter, once per job: a rerun of a published job reuses its version."""
    metrics = json.loads((checkpoint_dir / TRAIN_STATE_FILE).read_text())["record"]
    for existing in registry.list_versions(adapter) if adapter in registry.list_adapters() else []:
        if existing.train.get("job_id") == job_id:
            return existing.version, dict(existing.train)
    files = {name: (checkpoint_dir / name).read_bytes() for name in ADAPTER_FILES}
    published = registry.publish_adapter(adapter, files, train=metrics)
    return published.version, metrics


def _describe(error: BaseException) -> str:
    """The root cause of a failure in words: Ray's wrappers peeled off down to the worker's own error."""
    worker_failures = getattr(error, "worker_failures", None)
    if worker_failures:
        error = next(iter(worker_failures.values()))
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        error = cause
    return f"{type(error).__name__}: {error}"


def storage_path(store: ObjectStore, job_id: str) -> str:
    """The job's checkpoint folder as a pyarrow path (``bucket/prefix/checkpoints/{job}``)."""
    return f"{store.bucket}/{keys.physical(store.prefix, keys.checkpoints_prefix(job_id))}".rstrip("/")


def s3_filesystem(settings: StoreSettings) -> Any:
    """pyarrow's S3 filesystem on the configured endpoint (pyarrow may ignore AWS_ENDPOINT_URL)."""
    from urllib.parse import urlparse

    from pyarrow.fs import S3FileSystem

    options: dict[str, Any] = {"region": settings.region}
    if settings.endpoint_url:
        endpoint = urlparse(settings.endpoint_url)
        options["endpoint_override"] = endpoint.netloc
        options["scheme"] = endpoint.scheme or "http"
    if settings.access_key_id and settings.secret_access_key:
        options["access_key"] = settings.access_key_id.get_secret_value()
        options["secret_key"] = settings.secret_access_key.get_secret_value()
    return S3FileSystem(**options)


def format_results(results: dict[str, TenantResult]) -> str:
    """A plain table, one line per tenant, for the job's log."""
    header = f"{'tenant':<20} {'status':<7} {'version':<9} {'steps':>6} {'train_loss':>10} {'eval_loss':>10}  error"
    lines = [header]
    for result in results.values():
        metrics = result.metrics
        lines.append(
            f"{result.tenant:<20} {'ok' if result.ok else 'FAILED':<7} {result.version or '-':<9} "
            f"{metrics.get('steps', '-')!s:>6} {_number(metrics.get('train_loss')):>10} "
            f"{_number(metrics.get('eval_loss')):>10}  {result.error or ''}"
        )
    return "\n".join(lines)


def _number(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"
