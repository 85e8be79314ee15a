"""Helpers of the API edge shared by the gRPC server and the handlers: the status a caller sees for an
error, per-method and cache metrics, the bearer key of a call, health, and fair scheduling of blocking object-store
work.

Statuses: `grpc_status` is the one place where an exception becomes a gRPC code and message (through
`lloco.errors.to_grpc_status`, after Ray's wrappers are peeled); messages of lloco errors are written
for callers, anything else is INTERNAL with no detail, and the full error goes to the log. The
OpenAI-compatible HTTP API maps that code to an HTTP status and OpenAI error type (`HTTP_ERRORS`,
`http_error`). The `rpc`
decorator applies it to every RPC method and counts the method's calls and time (`EdgeMetrics`).

Store work: the edge answers every tenant from one event loop; its object-store calls (boto3, blocking) run on a
thread pool. Left alone, one tenant's fan-out (thousands of names in a call, or many calls at once)
queues thousands of store reads ahead of every other tenant's. `TenantWork` gives each tenant at most
`per_tenant` running calls: the rest wait on the tenant's own semaphore, not in the pool's queue, so
another tenant's call finds a free thread at once.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from lloco.api import lloco_pb2
from lloco.config import StoreSettings
from lloco.errors import LlocoError, ResourceExhausted, Unauthenticated, Unavailable, to_grpc_status
from lloco.logs import get_logger

log = get_logger(__name__)

T = TypeVar("T")
U = TypeVar("U")


def domain_error(error: BaseException) -> BaseException:
    """``error`` as the lloco error a caller should see: Ray's wrappers peeled, Ray's failures named."""
    from ray.exceptions import RayActorError, RayTaskError, RpcError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    while isinstance(error, RayTaskError) and isinstance(error.cause, BaseException):
        error = error.cause
    if isinstance(error, LlocoError):
        return error
    if isinstance(error, BackPressureError):
        return ResourceExhausted("the engine is at capacity; retry shortly")
    if isinstance(error, DeploymentUnavailableError | RayActorError):
        return Unavailable("the engine is not available right now; retry shortly")
    if isinstance(error, RpcError):
        return Unavailable("the Ray cluster did not answer; retry shortly")
    return error


def grpc_status(method: str, error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message the caller of ``method`` gets for ``error``; logs the error."""
    original = error
    error = domain_error(error)
    code, details = to_grpc_status(error)
    if code == grpc.StatusCode.INTERNAL:
        log.error("rpc failed", method=method, error=repr(original), exc_info=original)
    else:
        log.info("rpc refused", method=method, code=code.name, details=details, cause=_cause(original))
    return code, details


# The HTTP status and OpenAI error type of each status code: the OpenAI-compatible API's errors are the same
# typed errors, through the same `grpc_status`, then this table (codes absent here are 500 server_error).
HTTP_ERRORS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}


def openai_error_body(message: str, kind: str, code: str, param: str | None = None) -> dict[str, Any]:
    """An OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def http_error(method: str, error: BaseException, param: str | None = None) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error body the caller of ``method`` gets for ``error`` (logged as
    `grpc_status` logs it); ``code`` is the status code's name in lower case, as gRPC callers see it."""
    code, details = grpc_status(method, error)
    status, kind = HTTP_ERRORS.get(code, (500, "server_error"))
    return status, openai_error_body(details, kind, code.name.lower(), param)


class EdgeMetrics:
    """RPCs answered by method and status code, and their time at the edge (Ray metrics)."""

    LATENCY_BOUNDS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]

    def __init__(self) -> None:
        from ray.serve import metrics

        self._requests = metrics.Counter(
            "lloco_edge_requests", "RPCs answered, by method and status code.", tag_keys=("method", "code")
        )
        self._latency = metrics.Histogram(
            "lloco_edge_request_seconds",
            "Time at the edge per RPC (streams: until the last message).",
            self.LATENCY_BOUNDS_S,
            tag_keys=("method",),
        )
        self._cache_lookups = metrics.Counter(
            "lloco_edge_cache_lookups",
            "Lookups in the edge's caches (api_keys, tenants, documents, adapters), by result (hit, miss).",
            tag_keys=("cache", "result"),
        )

    def record(self, method: str, code: grpc.StatusCode, started: float) -> None:
        self._requests.inc(tags={"method": method, "code": code.name})
        self._latency.observe(time.perf_counter() - started, tags={"method": method})

    def cache_lookup(self, cache: str, hit: bool) -> None:
        """A lookup in one of the edge's caches (`lloco.serve.lookups`), found there or not."""
        self._cache_lookups.inc(tags={"cache": cache, "result": "hit" if hit else "miss"})


class Recorder(Protocol):
    """What `rpc` needs of the object whose methods it wraps."""

    def record(self, method: str, code: grpc.StatusCode, started: float) -> None: ...


def _reply_types() -> dict[str, type[Message]]:
    """The reply message class of every RPC the edge serves, by method name."""
    types: dict[str, type[Message]] = {}
    for module, service in ((lloco_pb2, "LlocoService"), (health_pb2, "Health")):
        for method in module.DESCRIPTOR.services_by_name[service].methods:
            types[method.name] = getattr(module, method.output_type.name)
    return types


_REPLY_TYPES = _reply_types()


def rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run an RPC method, turning any exception into the gRPC status and message the caller sees.

    Unary methods answer an empty reply with the status set; streaming methods set the status and
    re-raise, which ends the stream with it. Cancellation passes through untouched. Each call is
    counted with its final status (``self.record``).
    """
    name = method.__name__
    reply_type = _REPLY_TYPES[name]

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def streaming(
            self: Recorder, request: Message, grpc_context: Any = None
        ) -> AsyncIterator[Message]:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                async for reply in method(self, request, grpc_context):
                    yield reply
            except Exception as error:
                code, details = grpc_status(name, error)
                if grpc_context is not None:
                    grpc_context.set_code(code)
                    grpc_context.set_details(details)
                raise
            finally:
                self.record(name, code, started)

        return streaming

    @functools.wraps(method)
    async def unary(self: Recorder, request: Message, grpc_context: Any = None) -> Message:
        started = time.perf_counter()
        try:
            reply = await method(self, request, grpc_context)
        except Exception as error:
            code, details = grpc_status(name, error)
            self.record(name, code, started)
            if grpc_context is None:
                raise
            grpc_context.set_code(code)
            grpc_context.set_details(details)
            return reply_type()
        self.record(name, grpc.StatusCode.OK, started)
        return reply

    return unary


def _cause(error: BaseException) -> str | None:
    """What lies under an error whose message was written for callers (a storage error, say), for the log."""
    cause = error.__cause__ or error.__context__
    return repr(cause)[:500] if cause is not None else None


def bearer_key(metadata: Sequence[tuple[str, Any]]) -> str:
    """The API key of ``authorization: Bearer <key>`` metadata; Unauthenticated if missing or malformed."""
    value = dict(metadata).get("authorization", "")
    if not value:
        raise Unauthenticated("missing 'authorization: Bearer <api key>' metadata")
    scheme, _, key = value.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthenticated("malformed 'authorization' metadata: expected 'Bearer <api key>'")
    return key.strip()


class TenantWork:
    """Runs blocking calls on a thread pool, at most ``per_tenant`` of one lane at a time.

    A lane is a tenant id, or for work done before the tenant is known, a name that cannot be a tenant
    id: authentication runs in a lane per presented key (``key:<digest>``), so a flood of calls with one
    key cannot hold the threads that other callers' authentication needs; health probes use ``None``.
    The pool has room for ``tenants_at_full_speed`` busy lanes.
    """

    def __init__(self, per_tenant: int, tenants_at_full_speed: int = 8) -> None:
        if per_tenant < 1:
            raise ValueError(f"per_tenant must be >= 1, got {per_tenant}")
        self.per_tenant = per_tenant
        self._pool = ThreadPoolExecutor(
            max_workers=per_tenant * (tenants_at_full_speed + 1), thread_name_prefix="edge-store"
        )
        self._lanes: dict[str | None, tuple[asyncio.Semaphore, list[int]]] = {}

    @staticmethod
    def key_lane(key: str) -> str:
        """The lane of authenticating ``key``: never a tenant id, and one per key."""
        return f"key:{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"

    async def run(self, tenant: str | None, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the pool once the lane ``tenant`` has room."""
        lane = self._lanes.get(tenant)
        if lane is None:
            lane = self._lanes[tenant] = (asyncio.Semaphore(self.per_tenant), [0])
        semaphore, users = lane
        users[0] += 1
        try:
            async with semaphore:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._pool, functools.partial(fn, *args))
        finally:
            users[0] -= 1
            if not users[0]:
                del self._lanes[tenant]

    async def map(self, tenant: str, fn: Callable[[U], T], items: Iterable[U]) -> list[T]:
        """``[fn(item) for item in items]``, at most the tenant's lane count at a time; the first failure
        stops the rest (none is started after it) and is raised."""
        todo = list(items)
        results: list[Any] = [None] * len(todo)
        positions = iter(range(len(todo)))

        async def worker() -> None:
            for position in positions:  # one iterator shared by the workers: each item is taken once
                results[position] = await self.run(tenant, fn, todo[position])

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(self.per_tenant, len(todo))):
                    group.create_task(worker())
        except BaseExceptionGroup as failures:
            raise failures.exceptions[0] from None
        return results

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class HealthProbe:
    """grpc.health.v1's status: SERVING when both the engine and the object store answer, since without
    the store every keyed call fails and a load balancer should send callers elsewhere. The store is
    probed with one quick attempt, so a dead store shows as NOT_SERVING in seconds."""

    TIMEOUT_S = 5.0

    def __init__(self, engine: Any, store: StoreSettings, work: TenantWork) -> None:
        from lloco.storage import ObjectStore

        self._engine, self._work = engine, work
        quick = {"connect_timeout_s": 1.0, "read_timeout_s": 2.0, "max_attempts": 1}
        self._store = ObjectStore(store.model_copy(update=quick))

    async def status(self) -> int:
        try:
            await asyncio.wait_for(self._engine.health.remote(), self.TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - any failure of the probe means "not serving"
            log.warning("engine unhealthy", error=repr(domain_error(error)))
            return health_pb2.HealthCheckResponse.NOT_SERVING
        try:
            await asyncio.wait_for(self._work.run(None, self._store.check), self.TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - any failure of the probe means "not serving"
            log.warning("object store unreachable", error=repr(error), cause=repr(error.__cause__))
            return health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse.SERVING
