"""Compress and finetune jobs: submitted to Ray's job server, recorded in the object store by the job itself.

A job keeps a record under every tenant it works for, ``tenants/{t}/jobs/{id}.json`` (a ``JobRecord``:
kind, what was asked, state, times, result or error), and that record is what the API reports:

- ``Jobs.submit_compress`` / ``submit_finetune`` write it QUEUED, then submit the job's command
  (``python -m lloco.cli compress|finetune ... --job-id ID``) through Ray's job submission API, with the
  settings as ``LLOCO_*`` variables and secrets only by reference (:func:`settings_env`);
- the job writes RUNNING when it starts and SUCCEEDED or FAILED with its result as each tenant's work ends
  (``JobRun``, used by ``run_compress_job`` and ``run_finetune_job``), also when an operator started it
  by hand (``ray job submit -- lloco finetune ...``);
- ``Jobs.get`` / ``list`` / ``cancel`` read it, so they answer after the serving cluster restarts. A
  record still QUEUED or RUNNING is checked with Ray's job server: a job that ended without writing its
  end (killed, out of memory), or that the server no longer knows (its cluster restarted), is recorded
  FAILED then.

Online compression (a small batch the edge compresses itself) is recorded SUCCEEDED at once. A record
holds its tenant's uid: a job of a deleted tenant never writes into, nor shows in, a tenant created again
under the same name. Nothing else in the platform submits jobs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import SecretStr

from lloco.config import SECRETS_FILE_VARIABLE, Settings
from lloco.errors import AlreadyExists, FailedPrecondition, Internal, NotFound, Unavailable
from lloco.finetune.options import TrainOptions
from lloco.logs import get_logger
from lloco.registry import Tenants, pages
from lloco.storage import ObjectStore, keys

log = get_logger(__name__)

JobKind = Literal["compress", "finetune"]
JobState = Literal["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]
DONE: frozenset[str] = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
RECORD_FORMAT = "lloco-job/1"
LOST_AFTER = timedelta(minutes=2)  # how long Ray may not know a QUEUED job yet (its submission in flight)
_TIMES = ("created", "started", "ended")


@dataclass(frozen=True)
class JobRecord:
    """One job as one of its tenants sees it; ``result`` once SUCCEEDED, ``error`` once FAILED.

    Results: compress ``{"compressed": [doc ids], "skipped": [doc ids], "failed": {doc id: reason}}``;
    finetune ``{"adapter": name, "version": "v000001", "metrics": {...}}`` (the version's train.json).
    """

    job_id: str
    tenant: str
    tenant_uid: str
    kind: JobKind
    state: JobState
    created: datetime
    args: dict[str, Any] = field(default_factory=dict)  # what was asked: documents, dataset, adapter, options
    shared: bool = False  # the job works for other tenants too: only an operator stops it
    message: str = ""
    started: datetime | None = None
    ended: datetime | None = None
    result: dict[str, Any] | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.state in DONE

    def to_json(self) -> bytes:
        data = asdict(self)
        for name in _TIMES:
            data[name] = data[name].isoformat() if data[name] else None
        return json.dumps({"format": RECORD_FORMAT, **data}, sort_keys=True, default=str).encode()

    @classmethod
    def from_json(cls, data: bytes) -> JobRecord:
        """Raises Internal for bytes that are not a record (another writer changed it)."""
        try:
            fields = json.loads(data)
            if fields.pop("format") != RECORD_FORMAT:
                raise ValueError("unknown format")
            for name in _TIMES:
                fields[name] = datetime.fromisoformat(fields[name]) if fields.get(name) else None
            return cls(**fields)
        except (ValueError, KeyError, TypeError, RecursionError) as error:
            raise Internal("a job record is damaged in the store") from error


def new_job_id(kind: JobKind) -> str:
    return f"{kind}-{_now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


class JobRecords:
    """Job records in the store, tenant by tenant; only records of the tenant's current uid are read or
    written."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._tenants = Tenants(store)

    def uid(self, tenant: str) -> str:
        """The tenant's uid; NotFound if there is no such tenant."""
        uid = self._tenants.uid(keys.validate_id("tenant", tenant))
        if uid is None:
            raise NotFound(f"tenant {tenant!r} not found")
        return uid

    def get(self, tenant: str, job_id: str) -> JobRecord:
        """NotFound for no record, or one of an earlier tenant of the same name."""
        uid = self.uid(tenant)
        try:
            record = JobRecord.from_json(self._store.get_bytes(keys.job_record(tenant, job_id)))
        except NotFound:
            raise NotFound(f"job {job_id!r} not found") from None
        if record.tenant_uid != uid:
            raise NotFound(f"job {job_id!r} not found")
        return record

    def put(self, record: JobRecord) -> bool:
        """Write ``record`` unless its tenant is gone or was created again since; whether it was written."""
        if self._tenants.uid(record.tenant) != record.tenant_uid:
            log.warning(
                "job record of a deleted tenant not written", job_id=record.job_id, tenant=record.tenant
            )
            return False
        key = keys.job_record(record.tenant, record.job_id)
        self._store.put_bytes(key, record.to_json(), "application/json")
        return True

    def ids(self, tenant: str) -> list[str]:
        prefix = keys.jobs_prefix(tenant)
        return [
            key[len(prefix) : -len(keys.JOB_SUFFIX)]
            for key in self._store.list_keys(prefix)
            if key.endswith(keys.JOB_SUFFIX) and "/" not in key[len(prefix) :]
        ]

    def delete(self, tenant: str, job_id: str) -> None:
        self._store.delete(keys.job_record(tenant, job_id))


class JobRun:
    """What a running job writes about itself, under each tenant it works for.

    ``start`` marks the tenants' records RUNNING (keeping what the submitter recorded: creation time,
    arguments), or creates them for a job started by hand; ``succeed`` / ``fail`` end one tenant's record.
    A CANCELLED record stays so. A record that cannot be written is logged, never raised: the work matters
    more than its record, and ``Jobs`` settles a record whose job ended without it.
    """

    def __init__(self, store: ObjectStore, job_id: str, kind: JobKind, args: dict[str, Any]) -> None:
        self.job_id, self.kind, self.args = job_id, kind, args
        self._records = JobRecords(store)
        self._current: dict[str, JobRecord] = {}

    def start(self, tenants: Sequence[str]) -> None:
        """Mark the job RUNNING under each of ``tenants`` (the job works for all of them)."""
        tenants = list(dict.fromkeys(tenants))
        moment = _now()
        for tenant in tenants:
            try:
                record = self._records.get(tenant, self.job_id)
                if record.state == "CANCELLED":
                    continue
            except NotFound:
                try:
                    uid = self._records.uid(tenant)
                except NotFound:
                    continue  # the job fails for it; nothing to record under a tenant that does not exist
                record = JobRecord(
                    self.job_id, tenant, uid, self.kind, "QUEUED", moment, self.args, len(tenants) > 1
                )
            self._write(replace(record, state="RUNNING", started=moment, message="running", ended=None))

    def succeed(self, tenant: str, result: dict[str, Any], message: str) -> None:
        self._end(tenant, state="SUCCEEDED", result=result, message=message, error=None)

    def fail(self, tenant: str, error: str) -> None:
        self._end(tenant, state="FAILED", result=None, message=error, error=error)

    def fail_unfinished(self, error: str) -> None:
        """End every tenant's record that is still RUNNING (the job stops before finishing them)."""
        for tenant, record in list(self._current.items()):
            if not record.done:
                self.fail(tenant, error)

    def _end(self, tenant: str, **fields: Any) -> None:
        record = self._current.get(tenant)
        if record is None:
            return
        try:
            if self._records.get(tenant, self.job_id).state == "CANCELLED":
                return
        except Exception as error:  # noqa: BLE001 - see the class docstring
            log.warning("job record unreadable", job_id=self.job_id, tenant=tenant, error=repr(error))
        self._write(replace(record, ended=_now(), **fields))

    def _write(self, record: JobRecord) -> None:
        try:
            if self._records.put(record):
                self._current[record.tenant] = record
        except Exception as error:  # noqa: BLE001 - see the class docstring
            log.warning("job record not written", job_id=self.job_id, tenant=record.tenant, error=repr(error))


class Jobs:
    """Submits jobs to the Ray cluster at ``ray_address`` (a GCS address or the job server's URL) and
    answers for them from their records."""

    def __init__(self, settings: Settings, store: ObjectStore, ray_address: str) -> None:
        self._settings, self._ray_address = settings, ray_address
        self.records = JobRecords(store)

    # -- submitting ------------------------------------------------------------------------------------

    def submit_compress(self, tenant: str, documents: Sequence[str]) -> JobRecord:
        """``lloco compress --tenant T`` as a Ray job: it compresses every pending document of the tenant,
        ``documents`` (those the caller named, kept in the record) among them.

        Raises:
            NotFound: no such tenant. Unavailable: Ray's job server did not take the job.
        """
        job_id = new_job_id("compress")
        command = ["compress", "--tenant", tenant, "--job-id", job_id]
        args = {"documents": list(documents)}
        message = f"{len(documents)} documents queued for the compress job"
        (record,) = self._submit("compress", job_id, [tenant], args, command, message)
        return record

    def submit_finetune(
        self,
        tenants: Sequence[str],
        dataset: str,
        adapter: str = "default",
        options: TrainOptions | None = None,
        job_id: str | None = None,
    ) -> list[JobRecord]:
        """``lloco finetune`` as a Ray job (one trainer per tenant); one record per tenant.

        Passing the id of a killed run (one Ray does not know) resumes it from its checkpoints.

        Raises:
            InvalidArgument: bad ids. NotFound: a tenant does not exist. AlreadyExists: Ray knows a job
            of this id. Unavailable: Ray's job server cannot be reached.
        """
        for tenant in tenants:
            keys.validate_id("tenant", tenant)
        keys.validate_id("dataset", dataset)
        keys.validate_id("adapter", adapter)
        options = options or TrainOptions()
        if job_id is not None and self._ray_state(keys.validate_id("job", job_id))[0] not in (
            None,
            "UNKNOWN",
        ):
            raise AlreadyExists(f"finetune job {job_id!r} was already submitted")
        job_id = job_id or new_job_id("finetune")
        command = ["finetune", "--dataset", dataset, "--adapter", adapter, "--job-id", job_id]
        command += [word for tenant in tenants for word in ("--tenant", tenant)] + options.cli_args()
        args = {"dataset": dataset, "adapter": adapter, "options": options.model_dump()}
        message = f"finetuning adapter {adapter!r} on dataset {dataset!r}"
        return self._submit("finetune", job_id, tenants, args, command, message)

    def record_online(
        self, tenant: str, created: datetime, result: dict[str, Any], message: str
    ) -> JobRecord:
        """A compress job the caller ran itself (online compression), recorded SUCCEEDED."""
        record = JobRecord(
            new_job_id("compress"),
            tenant,
            self.records.uid(tenant),
            "compress",
            "SUCCEEDED",
            created,
            {"documents": result["compressed"] + result["skipped"]},
            message=message,
            started=created,
            ended=_now(),
            result=result,
        )
        self.records.put(record)
        return record

    def _submit(
        self,
        kind: JobKind,
        job_id: str,
        tenants: Sequence[str],
        args: dict[str, Any],
        command: list[str],
        message: str,
    ) -> list[JobRecord]:
        created = _now()
        records = [
            JobRecord(
                job_id, t, self.records.uid(t), kind, "QUEUED", created, args, len(tenants) > 1, message
            )
            for t in tenants
        ]
        for record in records:  # before the job can start: it finds its record and carries it on
            self.records.put(record)
        try:
            self._client().submit_job(
                # this Python, not `lloco` on PATH: the job runs where the venv may not be activated
                entrypoint=shlex.join([sys.executable, "-m", "lloco.cli", *command]),
                submission_id=job_id,
                runtime_env={"env_vars": settings_env(self._settings)},
                metadata={"kind": kind, "tenants": ",".join(tenants)},
            )
        except (
            OSError,
            RuntimeError,
            Unavailable,
        ) as error:  # RuntimeError: the job server answered an error
            for record in records:
                self.records.delete(record.tenant, job_id)
            if "already exists" in str(error):
                raise AlreadyExists(f"{kind} job {job_id!r} was already submitted") from error
            log.warning("job not submitted", job_id=job_id, kind=kind, error=repr(error))
            raise Unavailable(f"Ray's job server did not take the {kind} job; retry shortly") from error
        log.info("job submitted", job_id=job_id, kind=kind, tenants=list(tenants))
        return records

    # -- answering ----------------------------------------------------------------------------------------

    def get(self, tenant: str, job_id: str) -> JobRecord:
        """The job's record, settled with Ray's job server while it is QUEUED or RUNNING; NotFound if none."""
        return self._settle(self.records.get(tenant, job_id))

    def list(self, tenant: str, page_size: int, page_token: str) -> tuple[list[JobRecord], str]:
        """One page of the tenant's jobs in id order, and the next page's token."""
        self.records.uid(tenant)
        ids, token = pages.paginate("jobs", self.records.ids(tenant), page_size, page_token)
        found = []
        for job_id in ids:
            try:
                found.append(self.get(tenant, job_id))
            except NotFound:
                continue  # deleted since the listing
        return found, token

    def cancel(self, tenant: str, job_id: str) -> JobRecord:
        """Stop a QUEUED or RUNNING job; it is recorded CANCELLED (a CANCELLED job is returned as it is).

        Raises:
            NotFound: no such job. FailedPrecondition: the job has finished, or it works for other tenants
            too. Unavailable: Ray's job server cannot be reached.
        """
        record = self.get(tenant, job_id)
        if record.state == "CANCELLED":
            return record
        if record.done:
            raise FailedPrecondition(f"job {job_id!r} has already {record.state}; only a running job stops")
        if record.shared:
            raise FailedPrecondition(f"job {job_id!r} works for other tenants too; an operator can stop it")
        try:
            self._client().stop_job(job_id)
        except RuntimeError as error:
            if not _unknown_job(error):
                log.warning("job not stopped", job_id=job_id, error=repr(error))
                raise Unavailable("Ray's job server did not stop the job; retry shortly") from error
            # Ray does not know it (not started yet, or its cluster is gone): nothing runs to stop
        record = self.records.get(tenant, job_id)  # the job may have written since
        if record.done:
            return record
        cancelled = replace(record, state="CANCELLED", ended=_now(), message="cancelled")
        self.records.put(cancelled)
        log.info("job cancelled", job_id=job_id, tenant=tenant)
        return cancelled

    def _settle(self, record: JobRecord) -> JobRecord:
        """``record``, or FAILED / CANCELLED when Ray saw its job end without it or no longer knows the job."""
        if record.done:
            return record
        state, ray_message = self._ray_state(record.job_id)
        if state is None or state in ("PENDING", "RUNNING"):
            return record
        if state == "UNKNOWN":  # a RUNNING job was known to Ray; a QUEUED one may be in submission still
            if record.state == "QUEUED" and _now() - record.created < LOST_AFTER:
                return record
            ending, message = (
                "FAILED",
                "lost: Ray's job server no longer knows the job (its cluster restarted?)",
            )
        else:
            record = self.records.get(record.tenant, record.job_id)  # the job may have just written its end
            if record.done:
                return record
            ending = "CANCELLED" if state == "STOPPED" else "FAILED"
            message = f"the job ended ({state}) without recording its result: {ray_message}".rstrip(": ")
        settled = replace(record, state=ending, ended=_now(), message=message, error=message)
        self.records.put(settled)
        log.warning("job settled from Ray's state", job_id=record.job_id, tenant=record.tenant, state=ending)
        return settled

    def _ray_state(self, job_id: str) -> tuple[str | None, str]:
        """Ray's status of the job ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED", or "UNKNOWN" when
        the job server does not know it) and its message; (None, "") when the job server cannot be asked."""
        try:
            info = self._client().get_job_info(job_id)
        except Unavailable:
            return None, ""
        except (OSError, RuntimeError) as error:
            if isinstance(error, RuntimeError) and _unknown_job(error):
                return "UNKNOWN", ""
            log.warning("job server did not answer", job_id=job_id, error=repr(error))
            return None, ""
        return str(info.status), info.message or ""

    def _client(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        try:
            return JobSubmissionClient(self._ray_address)
        except (OSError, RuntimeError) as error:
            log.warning("job server unreachable", error=repr(error))
            raise Unavailable("Ray's job server is unreachable; retry shortly") from error


def _unknown_job(error: RuntimeError) -> bool:
    return "status code 404" in str(error)


def _now() -> datetime:
    return datetime.now(UTC)


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
