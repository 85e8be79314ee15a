"""Per-tenant fair admission with virtual token counters (VTC: Sheng et al., "Fairness in Serving Large
Language Models", OSDI 2024).

Every tenant has a counter of the service it has received, in weighted tokens: each input position it is
admitted with (compressed-context vectors and prompt tokens) costs ``input_cost``, each token generated for
it ``output_cost``, both divided by the tenant's weight. Requests wait in one FIFO queue per tenant; when a
row frees, the next request comes from the backlogged tenant (one with requests waiting) whose counter is
lowest. A tenant that had nothing waiting is lifted, when it sends again, to the lowest counter among the
other backlogged tenants (when none is backlogged: among the tenants with requests running), so idle time
earns no credit it could later spend holding the engine while the others wait. While several tenants are
backlogged their counters stay close: one sending ten times the others' rate gets about the same weighted
service as each of them (its weight's share), and whatever capacity they leave.

Counters order admission only; a scheduler that takes rows back (``preempt``) compares tenants' rows with
their ``row_share``: the rows split by weight among the tenants waiting or running.

Before a query reaches the queue it is prepared (store reads on cache misses, tokenization, evidence) in
worker threads every tenant shares; ``TenantLimiter`` keeps one tenant's burst from taking all of them, so
the others' queries are not prepared only after the whole burst (first in, first out).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from itertools import count
from typing import Generic, TypeVar

from lloco.errors import InvalidArgument

T = TypeVar("T")


@dataclass(frozen=True)
class TenantService:
    """One tenant's queue and service on one engine: what the per-tenant metrics report."""

    waiting: int = 0  # requests queued
    running: int = 0  # requests holding a row
    input_tokens: int = 0  # input positions admitted (context vectors + prompt tokens)
    output_tokens: int = 0  # tokens generated
    virtual_tokens: float = 0.0  # the counter: weighted tokens served, after lifts
    preemptions: int = 0  # requests of it taken out of their row and queued again


@dataclass
class _Tenant(Generic[T]):
    queue: deque[tuple[int, T]] = field(default_factory=deque)  # (arrival number, item)
    service: TenantService = field(default_factory=TenantService)


class FairQueue(Generic[T]):
    """Per-tenant FIFO queues, admitted in the order of the tenants' virtual token counters.

    Args:
        input_cost: counter cost of one admitted input position.
        output_cost: counter cost of one generated token.
        weights: tenant -> share (default 1); a tenant of weight 2 is served twice the tokens of a tenant
            of weight 1 while both are backlogged.
    Raises:
        InvalidArgument: a negative cost, both costs zero, or a weight that is not positive.
    """

    def __init__(self, input_cost: float, output_cost: float, weights: Mapping[str, float]) -> None:
        if input_cost < 0 or output_cost < 0 or input_cost + output_cost == 0:
            raise InvalidArgument(
                f"token costs must be >= 0 and not both 0, got input {input_cost}, output {output_cost}"
            )
        bad = {tenant: weight for tenant, weight in weights.items() if not weight > 0}
        if bad:
            raise InvalidArgument(f"tenant weights must be > 0, got {bad}")
        self._input_cost, self._output_cost = input_cost, output_cost
        self._weights = dict(weights)
        self._tenants: dict[str, _Tenant[T]] = {}
        # the tenants with requests waiting, and with requests running: admission looks at these only, so
        # its cost does not grow with the tenants that ever sent (a thousand, idle, on a busy engine)
        self._backlogged: set[str] = set()
        self._serving: set[str] = set()
        self._arrivals = count()
        self._waiting = 0
        self._touched: set[str] = set()

    def __len__(self) -> int:
        """Requests waiting, all tenants."""
        return self._waiting

    def backlogged(self) -> int:
        """Tenants with requests waiting."""
        return len(self._backlogged)

    def push(self, tenant: str, item: T) -> None:
        """Queue ``item`` at the back of ``tenant``'s queue, lifting a returning tenant's counter."""
        state = self._tenants.setdefault(tenant, _Tenant())
        if not state.queue:
            floor = self._lift_floor(tenant)
            if floor is not None and floor > state.service.virtual_tokens:
                state.service = replace(state.service, virtual_tokens=floor)
        state.queue.append((next(self._arrivals), item))
        self._count(tenant, state, waiting=1)

    def remove(self, tenant: str, item: T) -> bool:
        """Take a waiting ``item`` out of the queue (a cancelled request); False if it is not waiting."""
        state = self._tenants.get(tenant)
        if state is None:
            return False
        for entry in state.queue:
            if entry[1] is item:
                state.queue.remove(entry)
                self._count(tenant, state, waiting=-1)
                return True
        return False

    def items(self) -> list[T]:
        """Every waiting item, oldest first."""
        entries = [entry for state in self._tenants.values() for entry in state.queue]
        return [item for _, item in sorted(entries, key=lambda entry: entry[0])]

    def clear(self) -> None:
        """Drop every waiting item (the engine stops); counters and service stay."""
        for tenant in list(self._backlogged):
            state = self._tenants[tenant]
            dropped = len(state.queue)
            state.queue.clear()
            self._count(tenant, state, waiting=-dropped)

    def next_tenant(self, skip: set[str] = frozenset()) -> str | None:
        """The backlogged tenant (outside ``skip``) with the lowest counter. Ties (a returning tenant lifted
        to the lowest counter) go to the tenant with fewer requests running, then to the oldest head."""
        best: tuple[float, int, int] | None = None
        chosen = None
        for tenant in self._backlogged - skip:
            state = self._tenants[tenant]
            key = (state.service.virtual_tokens, state.service.running, state.queue[0][0])
            if best is None or key < best:
                best, chosen = key, tenant
        return chosen

    def head(self, tenant: str) -> T:
        """The oldest waiting item of a backlogged tenant."""
        return self._tenants[tenant].queue[0][1]

    def admit(self, tenant: str, input_tokens: int) -> T:
        """Take the tenant's head to run, charging its counter for ``input_tokens`` input positions."""
        state = self._tenants[tenant]
        _, item = state.queue.popleft()
        self._count(tenant, state, waiting=-1, running=1, input_tokens=input_tokens)
        return item

    def preempt(self, tenant: str, item: T) -> None:
        """A running item of the tenant leaves its row and goes back to the front of its queue, to be
        admitted before the tenant's other waiting items. No lift: the tenant was being served, not idle;
        for ties it counts as arriving now."""
        state = self._tenants[tenant]
        state.queue.appendleft((next(self._arrivals), item))
        self._count(tenant, state, waiting=1, running=-1, preemptions=1)

    def next_below_share(self, rows: int) -> str | None:
        """``next_tenant`` among the backlogged tenants running fewer requests than their ``row_share``."""
        at_share = {
            t for t in self._backlogged if self._tenants[t].service.running >= self.row_share(t, rows)
        }
        return self.next_tenant(at_share)

    def row_share(self, tenant: str, rows: int) -> float:
        """The tenant's share of ``rows``: split by weight among the tenants waiting or running, itself
        included."""
        sharing = self._backlogged | self._serving | {tenant}
        return rows * self._weight(tenant) / sum(self._weight(t) for t in sharing)

    def generated(self, tenant: str, tokens: int = 1) -> None:
        """Charge a running tenant for tokens generated for it."""
        self._count(tenant, self._tenants[tenant], output_tokens=tokens)

    def finished(self, tenant: str) -> None:
        """One of the tenant's running requests left its row."""
        self._count(tenant, self._tenants[tenant], running=-1)

    def service(self, tenant: str) -> TenantService:
        state = self._tenants.get(tenant)
        return TenantService() if state is None else state.service

    def take_changes(self) -> dict[str, TenantService]:
        """The service of every tenant whose queue or service changed since the last call."""
        changed = {
            tenant: self._tenants[tenant].service for tenant in self._touched if tenant in self._tenants
        }
        self._touched.clear()
        return changed

    def forget(self, tenant: str) -> bool:
        """Drop the counter and service of a tenant with nothing waiting or running (a deleted tenant);
        False, and nothing dropped, while it still has requests in flight."""
        state = self._tenants.get(tenant)
        if state is None or state.queue or state.service.running:
            return False
        del self._tenants[tenant]
        self._touched.discard(tenant)
        return True

    def _weight(self, tenant: str) -> float:
        return self._weights.get(tenant, 1.0)

    def _lift_floor(self, tenant: str) -> float | None:
        """The lowest counter of the other backlogged tenants, else of the others running requests."""
        for active in (self._backlogged - {tenant}, self._serving - {tenant}):
            if active:
                return min(self._tenants[t].service.virtual_tokens for t in active)
        return None

    def _count(
        self,
        tenant: str,
        state: _Tenant[T],
        waiting: int = 0,
        running: int = 0,
        input_tokens: int = 0,
        output_tokens: int = 0,
        preemptions: int = 0,
    ) -> None:
        old = state.service
        cost = input_tokens * self._input_cost + output_tokens * self._output_cost
        state.service = TenantService(
            waiting=old.waiting + waiting,
            running=old.running + running,
            input_tokens=old.input_tokens + input_tokens,
            output_tokens=old.output_tokens + output_tokens,
            virtual_tokens=old.virtual_tokens + cost / self._weight(tenant),
            preemptions=old.preemptions + preemptions,
        )
        self._waiting += waiting
        self._touched.add(tenant)
        if state.queue:
            self._backlogged.add(tenant)
        else:
            self._backlogged.discard(tenant)
        if state.service.running:
            self._serving.add(tenant)
        else:
            self._serving.discard(tenant)


@dataclass
class _Gate:
    semaphore: asyncio.Semaphore
    users: int = 0  # tasks holding or waiting for the semaphore


class TenantLimiter:
    """At most ``limit`` tasks of one tenant at once in a shared resource; the others of that tenant wait
    for their own tenant's tasks, not in front of every other tenant's.

    Raises:
        InvalidArgument: a limit below 1.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise InvalidArgument(f"the per-tenant limit must be >= 1, got {limit}")
        self._limit = limit
        self._gates: dict[str, _Gate] = {}  # tenants with tasks holding or waiting; dropped when none

    def __len__(self) -> int:
        """Tenants with tasks holding or waiting."""
        return len(self._gates)

    @asynccontextmanager
    async def hold(self, tenant: str) -> AsyncIterator[None]:
        """Wait until fewer than ``limit`` of the tenant's tasks hold it, and hold it for the block."""
        gate = self._gates.get(tenant)
        if gate is None:
            gate = self._gates[tenant] = _Gate(asyncio.Semaphore(self._limit))
        gate.users += 1
        try:
            async with gate.semaphore:
                yield
        finally:
            gate.users -= 1
            if not gate.users:
                del self._gates[tenant]
