"""The finetune job: one Ray Train ``TorchTrainer`` per tenant, all running at once, adapters published to S3.

Each tenant's trainer checkpoints to ``checkpoints/{job_id}/{tenant}`` in the object store. Ray Train
restores a run whose storage folder already holds a checkpoint snapshot, so rerunning a killed job
with the same job id resumes every tenant from its last checkpoint. A tenant whose training
succeeded gets its adapter published as a new version (``current`` flips); a failed tenant publishes
nothing and its error is reported in the per-tenant result. The same job runs under ``ray job
submit`` through :func:`submit_finetune_job`, and :func:`get_job` tracks it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import SecretStr

from lloco.config import SECRETS_FILE_VARIABLE, Settings, StoreSettings
from lloco.errors import AlreadyExists, Internal, InvalidArgument, NotFound, Unavailable
from lloco.finetune.data import check_rows
from lloco.finetune.train import ADAPTER_FILES, TRAIN_STATE_FILE, LoraFinetune, TrainOptions
from lloco.logs import get_logger
from lloco.registry import Registry
from lloco.storage import ObjectStore, keys

log = get_logger(__name__)

RESULTS_MARKER = "lloco-finetune-results"


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


JobStatus = Literal["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]


@dataclass(frozen=True)
class JobState:
    """A submitted finetune job as the API reports it; ``results`` once the job has finished."""

    job_id: str
    state: JobStatus
    message: str
    create_time: datetime | None
    start_time: datetime | None
    end_time: datetime | None
    results: dict[str, TenantResult] | None


def new_job_id() -> str:
    return f"finetune-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def run_finetune_job(
    settings: Settings,
    tenants: list[str],
    dataset: str,
    adapter: str = "default",
    job_id: str | None = None,
    options: TrainOptions | None = None,
) -> dict[str, TenantResult]:
    """Train one adapter per tenant concurrently on Ray; publish each success as a new version."""
    import ray

    _check_request(tenants, dataset, adapter)
    job_id = keys.validate_id("job", job_id or new_job_id())
    options = options or TrainOptions()
    if not ray.is_initialized():
        ray.init(configure_logging=False)
    log.info("finetune job started", job_id=job_id, tenants=tenants, dataset=dataset, adapter=adapter)
    store = ObjectStore(settings.store)
    with ThreadPoolExecutor(max_workers=len(tenants), thread_name_prefix="finetune") as pool:
        futures = {
            tenant: pool.submit(_run_tenant, settings, store, tenant, dataset, adapter, job_id, options)
            for tenant in tenants
        }
        results = {tenant: future.result() for tenant, future in futures.items()}
    log.info(
        "finetune job finished",
        job_id=job_id,
        succeeded=[t for t, r in results.items() if r.ok],
        failed=[t for t, r in results.items() if not r.ok],
    )
    return results


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
) -> TenantResult:
    """Train and publish one tenant; every failure becomes an unsuccessful result, never an exception."""
    started = time.perf_counter()
    try:
        registry = Registry(store, tenant)
        check_rows(registry, registry.read_dataset(dataset))  # fails fast, before any worker starts
        with tempfile.TemporaryDirectory(prefix=f"lloco-adapter-{tenant}-") as scratch:
            final = _train(settings, store, tenant, dataset, adapter, job_id, options, Path(scratch))
            version, metrics = _publish(registry, adapter, job_id, final)
    except Exception as error:  # noqa: BLE001 - every tenant's failure is reported, not raised
        message = _describe(error)
        log.error("finetune failed", job_id=job_id, tenant=tenant, error=message)
        return TenantResult(tenant, False, adapter, error=message, seconds=time.perf_counter() - started)
    log.info("tenant finished", job_id=job_id, tenant=tenant, adapter=adapter, version=version)
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
) -> Path:
    """Fit the tenant's trainer (resuming when its storage folder has checkpoints); the final checkpoint,
    downloaded into ``scratch``."""
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


def results_line(results: dict[str, TenantResult]) -> str:
    """One machine-readable line that :func:`get_job` finds in the job's log."""
    return f"{RESULTS_MARKER} {json.dumps({t: asdict(r) for t, r in results.items()}, default=str)}"


def _number(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def submit_finetune_job(
    ray_address: str,
    tenants: list[str],
    dataset: str,
    adapter: str,
    settings: Settings,
    options: TrainOptions | None = None,
    job_id: str | None = None,
) -> str:
    """Submit ``lloco finetune`` through Ray's job submission API; returns the job id.

    The job id is also Ray's submission id. Passing the id of a killed run (one not submitted under that
    id before) resumes it from its checkpoints. The job runs with the caller's explicitly set settings
    as ``LLOCO_*`` environment variables, secrets by reference (`settings_env`), so it reaches the same
    store and model.

    Raises:
        InvalidArgument: bad ids. AlreadyExists: a job with this id was submitted before.
        Unavailable: Ray's job server cannot be reached.
    """
    _check_request(tenants, dataset, adapter)
    job_id = keys.validate_id("job", job_id or new_job_id())
    # this Python, not `lloco` on PATH: the job runs where the venv may not be activated
    command = [sys.executable, "-m", "lloco.cli", "finetune", "--dataset", dataset, "--adapter", adapter]
    command += ["--job-id", job_id]
    for tenant in tenants:
        command += ["--tenant", tenant]
    command += (options or TrainOptions()).cli_args()
    client = _job_client(ray_address)
    try:
        client.submit_job(
            entrypoint=shlex.join(command),
            submission_id=job_id,
            runtime_env={"env_vars": settings_env(settings)},
            metadata={
                "kind": "finetune",
                "tenants": ",".join(tenants),
                "dataset": dataset,
                "adapter": adapter,
            },
        )
    except RuntimeError as error:
        if "already exists" in str(error):
            raise AlreadyExists(f"finetune job {job_id!r} was already submitted") from error
        log.warning("finetune job refused", job_id=job_id, ray_address=ray_address, error=repr(error))
        raise Unavailable(f"Ray's job server refused finetune job {job_id!r}; retry shortly") from error
    log.info("finetune job submitted", job_id=job_id, tenants=tenants, dataset=dataset, adapter=adapter)
    return job_id


def _job_client(ray_address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(ray_address)
    except ConnectionError as error:
        log.warning("job server unreachable", ray_address=ray_address, error=repr(error))
        raise Unavailable("Ray's job server is unreachable; retry shortly") from error


_STATES: dict[str, JobStatus] = {
    "PENDING": "QUEUED",
    "RUNNING": "RUNNING",
    "SUCCEEDED": "SUCCEEDED",
    "FAILED": "FAILED",
    "STOPPED": "CANCELLED",
}


def get_job(ray_address: str, job_id: str) -> JobState:
    """The state of a submitted finetune job; per-tenant results once it has finished."""
    client = _job_client(ray_address)
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as error:
        raise NotFound(f"no finetune job {job_id!r}") from error
    state = _STATES[str(info.status)]
    results = _parse_results(client.get_job_logs(job_id)) if state in ("SUCCEEDED", "FAILED") else None
    message = info.message or ""
    if results:
        failed = [r for r in results.values() if not r.ok]
        message = "; ".join(f"{r.tenant}: {r.error}" for r in failed) or message
    return JobState(
        job_id=job_id,
        state=state,
        message=message,
        create_time=_time(info.start_time),
        start_time=_time(info.start_time) if state != "QUEUED" else None,
        end_time=_time(info.end_time),
        results=results,
    )


def _parse_results(logs: str) -> dict[str, TenantResult] | None:
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULTS_MARKER):
            payload = json.loads(line[len(RESULTS_MARKER) :])
            return {tenant: TenantResult(**result) for tenant, result in payload.items()}
    return None


def _time(milliseconds: int | None) -> datetime | None:
    return datetime.fromtimestamp(milliseconds / 1000, UTC) if milliseconds else None


def settings_env(settings: Settings) -> dict[str, str]:
    """The explicitly set settings as ``LLOCO_SECTION__FIELD`` environment variables for a job.

    Secrets never travel in it: a job's environment is recorded with the job and shown by Ray's job
    API and dashboard. The admin key is left out (jobs do not need it). Store credentials the job's
    node does not have in its own environment (the Helm chart gives every Ray container them from a
    Kubernetes Secret) are written to a file readable by this user only, under ``data_dir/secrets``,
    and only its path is passed (``LLOCO_SECRETS_FILE``), for a job on this machine or a shared disk.
    """
    env: dict[str, str] = {}
    secrets: dict[str, dict[str, str]] = {}

    def flatten(prefix: str, values: dict[str, Any], section: str | None) -> None:
        for name, value in values.items():
            key = f"{prefix}__{name.upper()}" if prefix else f"LLOCO_{name.upper()}"
            if isinstance(value, dict):
                flatten(key, value, name)
            elif isinstance(value, SecretStr):
                if section is not None and os.environ.get(key) != value.get_secret_value():
                    secrets.setdefault(section, {})[name] = value.get_secret_value()
            elif isinstance(value, str | Path):
                env[key] = str(value)
            elif value is not None:
                env[key] = json.dumps(value)

    flatten("", settings.model_dump(exclude_unset=True), None)
    if secrets:
        env[SECRETS_FILE_VARIABLE] = str(_secrets_file(settings.data_dir, secrets))
    return env


def _secrets_file(data_dir: Path, secrets: dict[str, dict[str, str]]) -> Path:
    """``secrets`` as a settings YAML file only its owner can read, named by its content's digest."""
    text = yaml.safe_dump(secrets, sort_keys=True)
    folder = data_dir / "secrets"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"job-{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    if not path.exists():
        partial = path.with_suffix(f".{uuid.uuid4().hex[:8]}.part")
        with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
            handle.write(text)
        os.replace(partial, path)
    return path
