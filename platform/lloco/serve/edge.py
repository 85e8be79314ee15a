"""Helpers of the API edge shared by the gRPC server and the handlers: the status a caller sees for an
error, and fair scheduling of blocking object-store work.

Statuses: `grpc_status` is the one place where an exception becomes a gRPC code and message (through
`lloco.errors.to_grpc_status`, after Ray's wrappers are peeled); messages of lloco errors are written
for callers, anything else is INTERNAL with no detail, and the full error goes to the log.

Store work: the edge answers every tenant from one event loop; its object-store calls (boto3, blocking) run on a
thread pool. Left alone, one tenant's fan-out (thousands of names in a call, or many calls at once)
queues thousands of store reads ahead of every other tenant's. `TenantWork` gives each tenant at most
`per_tenant` running calls: the rest wait on the tenant's own semaphore, not in the pool's queue, so
another tenant's call finds a free thread at once.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from lloco.errors import LlocoError, ResourceExhausted, Unavailable, to_grpc_status
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


def _cause(error: BaseException) -> str | None:
    """What lies under an error whose message was written for callers (a storage error, say), for the log."""
    cause = error.__cause__ or error.__context__
    return repr(cause)[:500] if cause is not None else None


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
