"""The whole platform on one machine: embedded S3 (SeaweedFS), a local Ray, and the Serve app (by default
on loopback: `serve.host`).

`EmbeddedStack` is what `lloco up`, the demo and the serving tests run. It starts the pieces in order
and, if any of them fails, or when the block ends, stops what it started, so nothing is left running.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lloco.auth import KeyRing
from lloco.config import Settings
from lloco.errors import AlreadyExists, FailedPrecondition, Unauthenticated, Unavailable
from lloco.logs import get_logger
from lloco.ports import free_port, port_in_use
from lloco.registry import Tenants
from lloco.serve.app import build_app
from lloco.serve.server import address
from lloco.storage import EmbeddedS3, ObjectStore, keys

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

log = get_logger(__name__)

APP_NAME = "lloco"
HOST = "127.0.0.1"
HEALTH_TIMEOUT_S = 60.0
# Ray on loopback, without telemetry; set before Ray starts so its daemons and workers inherit them.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def _deploy_failure() -> str:
    """The last line of the first failed deployment's status message: a replica constructor's traceback
    ends with its exception (a model spec that names nothing, a compressor that does not fit the model)."""
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    for deployment in app.deployments.values() if app else ():
        lines = [line.strip() for line in deployment.message.splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return ""


def health_status(target: str, timeout_s: float = 5.0, ca_file: Path | None = None) -> str:
    """The grpc.health.v1 status name the server at ``target`` reports (e.g. "SERVING"); over TLS,
    trusting ``ca_file`` (PEM), when one is given."""
    if ca_file is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(ca_file.read_bytes()))
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class EmbeddedStack:
    """SeaweedFS + local Ray + the lloco Serve app on `settings.serve.host`:`settings.serve.grpc_port` (and
    the OpenAI-compatible HTTP API on `serve.http_port`, unless it is None).

    With `serve.tls_cert_file` set, health checks trust that certificate chain (a self-signed
    certificate, or a chain that ends with its root).

    ``jobs`` starts Ray's dashboard (on a free loopback port), which runs Ray's job server, so
    CompressDocuments and SubmitFinetune can submit Ray jobs. ``num_cpus`` is Ray's logical CPU count.
    """

    def __init__(
        self,
        settings: Settings,
        data_dir: Path | None = None,
        num_cpus: float | None = None,
        jobs: bool = True,
    ) -> None:
        self._base_settings = settings
        self.data_dir = Path(data_dir or settings.data_dir)
        self._num_cpus = num_cpus
        self._jobs = jobs
        self._s3: EmbeddedS3 | None = None
        self._ray_started = False
        self._serve_started = False
        self.settings = settings
        self.store: ObjectStore | None = None
        self._ingress: DeploymentHandle | None = None

    @property
    def address(self) -> str:
        """Where gRPC clients on this machine connect (loopback when the server listens everywhere)."""
        return address(self._client_host, self.settings.serve.grpc_port)

    @property
    def openai_base_url(self) -> str | None:
        """The OpenAI-compatible API's base URL for clients on this machine (``.../v1``); None when
        ``serve.http_port`` is off."""
        serve = self.settings.serve
        if serve.http_port is None:
            return None
        return f"{'https' if serve.tls else 'http'}://{address(self._client_host, serve.http_port)}/v1"

    @property
    def _client_host(self) -> str:
        host = self.settings.serve.host
        return {"0.0.0.0": HOST, "::": "::1"}.get(host, host)

    @property
    def s3(self) -> EmbeddedS3:
        """The embedded S3 server (its metrics count what the app asked of the store)."""
        if self._s3 is None:
            raise FailedPrecondition("the stack has not been started")
        return self._s3

    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start S3, Ray and the app, and return once health reports SERVING."""
        serve = self._base_settings.serve
        for port, how in (
            (serve.grpc_port, "--port or LLOCO_SERVE__GRPC_PORT"),
            (serve.http_port, "--http-port or LLOCO_SERVE__HTTP_PORT"),
        ):
            if port is not None and port_in_use(port, serve.host):
                raise FailedPrecondition(
                    f"port {port} is already in use (another `lloco up`?); stop that server or pick another "
                    f"port with {how}"
                )
        try:
            self._start_store()
            self._start_ray()
            self._start_serve()
            self._wait_serving()
        except BaseException:
            self.stop()
            raise
        log.info("lloco is up", address=self.address, data_dir=str(self.data_dir))

    def _start_store(self) -> None:
        self._s3 = EmbeddedS3(self.data_dir / "s3")
        self._s3.start()
        self.settings = self._base_settings.model_copy(update={"store": self._s3.store_settings()})
        self.store = ObjectStore(self.settings.store)
        self.store.ensure_bucket()

    def _start_ray(self) -> None:
        import ray
        from ray._private import ray_constants

        for name, value in RAY_ENV.items():
            os.environ.setdefault(name, value)
        if ray.is_initialized():
            return
        options: dict[str, object] = {"include_dashboard": self._jobs}
        if self._jobs:
            # ray.init cannot move a node's dashboard agent off its default port, and Ray's job server runs
            # no job without its agent: refuse here rather than accept jobs that never start.
            agent_port = ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT
            if port_in_use(agent_port):
                raise FailedPrecondition(
                    f"port {agent_port} (the dashboard agent through which Ray runs jobs) is already in use, "
                    "most likely by another Ray node on this machine: stop it first (`ray stop` stops one "
                    "that `ray start` left running)"
                )
            options.update(dashboard_host=HOST, dashboard_port=free_port())
        ray.init(
            address="local",  # a new instance, never one that `ray start` left running on this machine
            num_cpus=self._num_cpus,
            namespace=APP_NAME,
            configure_logging=False,
            log_to_driver=False,
            **options,
        )
        self._ray_started = True

    def _start_serve(self) -> None:
        from ray import serve
        from ray.serve.config import ProxyLocation

        if serve.status().applications:
            raise FailedPrecondition("Serve already runs applications in this Ray instance; stop them first")
        # No Serve proxies: the Ingress replica runs the API's gRPC server itself (lloco.serve.server).
        serve.start(proxy_location=ProxyLocation.Disabled)
        self._serve_started = True
        try:
            self._ingress = serve.run(build_app(self.settings), name=APP_NAME, route_prefix=None)
        except RuntimeError as error:  # Serve's error names the deployment that failed, not why
            raise FailedPrecondition(f"the lloco app did not start: {_deploy_failure() or error}") from None

    def _wait_serving(self) -> None:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        status, last_error = "UNKNOWN", ""
        while time.monotonic() < deadline:
            try:
                status = self.health()
            except grpc.RpcError as error:
                last_error = f"{error.code().name}: {error.details()}"
            if status == "SERVING":
                return
            time.sleep(0.5)
        raise Unavailable(
            f"lloco on {self.address} did not report SERVING within {HEALTH_TIMEOUT_S:.0f} s "
            f"(status {status}{', ' + last_error if last_error else ''})"
        )

    def stop(self) -> None:
        """Stop what `start` started, newest first; safe to call twice."""
        self.stop_serving()
        if self._ray_started:
            import ray

            self._ray_started = False
            ray.shutdown()
        if self._s3 is not None:
            s3, self._s3 = self._s3, None
            s3.stop()
        log.info("lloco stopped", address=self.address)

    def stop_serving(self) -> None:
        """Stop the Serve app, whose replicas' exit frees their devices, and keep S3 and Ray running (a
        benchmark then runs an engine of its own on the same GPU against the same store); safe to call twice.
        """
        if not self._serve_started:
            return
        from ray import serve

        self._serve_started, self._ingress = False, None
        try:
            serve.shutdown()
        except Exception as error:  # noqa: BLE001 - Ray may be gone already; `stop` still stops Ray and S3
            log.warning("serve shutdown failed", error=repr(error))

    def health(self) -> str:
        return health_status(self.address, ca_file=self.settings.serve.tls_cert_file)

    @property
    def compressor_id(self) -> str:
        """The id under which the running engine stores and finds compressed contexts."""
        if self._ingress is None:
            raise FailedPrecondition("the stack is not running; start it first")
        return self._ingress.compressor_id.remote().result()

    def create_tenant(self, tenant: str) -> str:
        """Create ``tenant`` and return its first API key (AlreadyExists if it exists)."""
        store = self._running_store()
        Tenants(store).create(tenant)
        return KeyRing(store, self.settings.admin_key).create_key(tenant)

    def key_file(self, tenant: str) -> Path:
        """Where `api_key` keeps the tenant's key on this machine (readable by its owner only)."""
        return self.data_dir / "keys" / f"{keys.validate_id('tenant', tenant)}.key"

    def api_key(self, tenant: str) -> str:
        """The tenant's API key for this machine, creating the tenant first if it does not exist yet.

        The key is minted once and kept in `key_file` (mode 0600), so each `lloco up` or demo run
        reuses it instead of piling up keys; a kept key that no longer works (revoked, or its tenant
        deleted) is replaced by a new one.
        """
        store = self._running_store()
        ring = KeyRing(store, self.settings.admin_key)
        path = self.key_file(tenant)
        if path.exists():
            kept = path.read_text().strip()
            try:
                if ring.resolve(kept).tenant == tenant:
                    return kept
            except Unauthenticated:
                log.info("kept api key no longer works; minting another", tenant=tenant)
        try:
            key = self.create_tenant(tenant)
        except AlreadyExists:
            key = ring.create_key(tenant)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(key + "\n")
        os.replace(path.with_suffix(".tmp"), path)
        return key

    def _running_store(self) -> ObjectStore:
        if self.store is None:
            raise FailedPrecondition("the stack is not running; start it first")
        return self.store
