"""Per-tenant fair admission (virtual token counters): the queue's guarantees as properties, checked on an
engine simulated step by step (rows, one token per running request per step); the engine's own use of it
is tested in test_engine_core.py.

The bound: while a tenant g is backlogged, any other tenant f can be served at most ``2 * rows * C`` more
weighted tokens than g over any interval, C being the largest weighted cost of one request (f may hold
every row with requests admitted just before g's turn, and gain as much again from its in-flight ones).
Without counters (first come, first served) a tenant sending ten times the others' rate pulls ahead
without bound, and without the lift a returning tenant holds every row until its counter catches up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lloco.errors import InvalidArgument
from lloco.serve.fairness import FairQueue, TenantLimiter, TenantService

INPUT_COST, OUTPUT_COST = 1.0, 2.0


@dataclass(frozen=True)
class Request:
    tenant: str
    input_tokens: int
    output_tokens: int


@dataclass
class Trace:
    """Per step: each tenant's weighted service so far, and the tenants backlogged after admission."""

    served: list[dict[str, float]]
    backlogged: list[set[str]]


def weighted(service: TenantService, weight: float) -> float:
    return (service.input_tokens * INPUT_COST + service.output_tokens * OUTPUT_COST) / weight


def simulate(
    queue: FairQueue[Request],
    rows: int,
    steps: int,
    arrivals: Callable[[int], list[Request]],
    weights: dict[str, float],
) -> Trace:
    """Each step: arrivals join, free rows take requests in the queue's order, every running request
    generates one token, finished ones leave their rows (the Scheduler's loop, without slots)."""
    running: list[list] = []  # [request, tokens left]
    trace = Trace([], [])
    for step in range(steps):
        for request in arrivals(step):
            queue.push(request.tenant, request)
        while len(running) < rows and (tenant := queue.next_tenant()) is not None:
            request = queue.head(tenant)
            queue.admit(tenant, request.input_tokens)
            running.append([request, request.output_tokens])
        trace.backlogged.append({t for t in weights if queue.service(t).waiting})
        for entry in running:
            queue.generated(entry[0].tenant)
            entry[1] -= 1
        for entry in [e for e in running if e[1] == 0]:
            queue.finished(entry[0].tenant)
            running.remove(entry)
        trace.served.append({t: weighted(queue.service(t), w) for t, w in weights.items()})
    return trace


def max_lead(trace: Trace, f: str, g: str) -> float:
    """The most f was served beyond g over any interval during which g stayed backlogged."""
    lead = 0.0
    low = None  # lowest (W_f - W_g) since g's backlog began
    for served, backlogged in zip(trace.served, trace.backlogged, strict=True):
        if g not in backlogged:
            low = None
            continue
        gap = served[f] - served[g]
        low = gap if low is None else min(low, gap)
        lead = max(lead, gap - low)
    return lead


def bound(rows: int, max_input: int, max_output: int, weight: float = 1.0) -> float:
    return 2 * rows * (INPUT_COST * max_input + OUTPUT_COST * max_output) / weight


sizes = st.tuples(st.integers(1, 40), st.integers(1, 12))  # (input, output) tokens of a request


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 4),
    light=st.integers(1, 3),
    heavy_sizes=st.lists(sizes, min_size=1, max_size=5),
    light_sizes=st.lists(sizes, min_size=1, max_size=5),
    period=st.integers(1, 4),
)
def test_a_tenant_sending_ten_times_the_rate_gets_no_more_than_its_share(
    rows: int, light: int, heavy_sizes: list, light_sizes: list, period: int
) -> None:
    tenants = ["heavy", *(f"light{i}" for i in range(light))]

    def arrivals(step: int) -> list[Request]:
        if step % period:
            return []
        n = step // period
        burst = [Request("heavy", *heavy_sizes[(n * 10 + i) % len(heavy_sizes)]) for i in range(10)]
        return burst + [Request(t, *light_sizes[n % len(light_sizes)]) for t in tenants[1:]]

    queue: FairQueue[Request] = FairQueue(INPUT_COST, OUTPUT_COST, {})
    trace = simulate(queue, rows, 300, arrivals, dict.fromkeys(tenants, 1.0))
    limit = bound(rows, 40, 12)
    for g in tenants[1:]:
        assert max_lead(trace, "heavy", g) <= limit, g


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 4),
    away=st.integers(40, 160),
    burst=st.integers(5, 40),
    size=sizes,
)
def test_a_returning_tenant_starts_at_the_backlogged_minimum_and_starves_no_one(
    rows: int, away: int, burst: int, size: tuple[int, int]
) -> None:
    """B is backlogged from the start; A, idle until ``away``, returns with a burst: from then on neither
    gets more than the bound beyond the other, however much B was served while A was away."""

    def arrivals(step: int) -> list[Request]:
        if step == 0:
            return [Request("B", *size) for _ in range(4 * (away + 150))]  # backlogged throughout
        if step == away:
            return [Request("A", *size) for _ in range(burst)]
        return []

    queue: FairQueue[Request] = FairQueue(INPUT_COST, OUTPUT_COST, {})
    trace = simulate(queue, rows, away + 150, arrivals, {"A": 1.0, "B": 1.0})
    limit = bound(rows, *size)
    assert max_lead(trace, "A", "B") <= limit
    assert max_lead(trace, "B", "A") <= limit
    assert queue.service("A").virtual_tokens >= trace.served[away - 1]["B"]  # lifted, not from 0


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 4),
    weights=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=2, max_size=4),
    size=sizes,
)
def test_service_follows_the_weights(rows: int, weights: list[float], size: tuple[int, int]) -> None:
    """Every tenant backlogged throughout: weighted service stays within the bound of each other's."""
    tenants = {f"t{i}": w for i, w in enumerate(weights)}

    def arrivals(step: int) -> list[Request]:
        return [Request(t, *size) for t in tenants for _ in range(4 * 900)] if step == 0 else []

    queue: FairQueue[Request] = FairQueue(INPUT_COST, OUTPUT_COST, tenants)
    trace = simulate(queue, rows, 900, arrivals, tenants)
    limit = bound(rows, *size, weight=min(weights))
    for served, backlogged in zip(trace.served, trace.backlogged, strict=True):
        assert backlogged == set(tenants)
        assert max(served.values()) - min(served.values()) <= limit
    # so raw tokens follow the weights: each tenant got more than the bound
    assert min(trace.served[-1].values()) >= limit


def test_queue_order_bookkeeping_and_settings() -> None:
    queue: FairQueue[str] = FairQueue(1.0, 2.0, {"b": 2.0})
    queue.push("a", "a1")
    queue.push("a", "a2")
    queue.push("b", "b1")
    assert len(queue) == 3 and queue.backlogged() == 2 and queue.items() == ["a1", "a2", "b1"]
    assert queue.next_tenant() == "a"  # counters equal: the oldest head
    assert queue.admit("a", 10) == "a1"
    assert queue.service("a") == TenantService(waiting=1, running=1, input_tokens=10, virtual_tokens=10.0)
    assert queue.next_tenant() == "b" and queue.next_tenant(skip={"b"}) == "a"
    queue.admit("b", 10)
    assert queue.service("b").virtual_tokens == 5.0  # weight 2 halves the cost
    queue.generated("b", 4)
    assert queue.service("b").virtual_tokens == 9.0
    queue.push("b", "b2")  # back in the queue: lifted to the lowest backlogged counter (a's), a is older
    assert queue.service("b").virtual_tokens == 10.0 and queue.next_tenant() == "a"
    assert queue.remove("b", "b2")
    assert queue.remove("a", "a2") and not queue.remove("a", "a2") and queue.backlogged() == 0
    changes = queue.take_changes()
    assert set(changes) == {"a", "b"} and changes["b"].output_tokens == 4 and queue.take_changes() == {}
    assert not queue.forget("a")  # a request of it still runs
    queue.finished("a")
    assert queue.forget("a") and queue.service("a") == TenantService()
    queue.push("c", "c1")  # nobody backlogged: lifted to the lowest counter of tenants running (b)
    assert queue.service("c").virtual_tokens == 10.0
    queue.clear()
    assert len(queue) == 0 and queue.service("c").waiting == 0 and queue.backlogged() == 0
    queue.push("c", "c2")  # the queue works on after a clear
    assert queue.backlogged() == 1 and queue.next_tenant() == "c"
    tie: FairQueue[str] = FairQueue(1.0, 2.0, {})
    tie.push("heavy", "h1")
    tie.push("heavy", "h2")
    tie.admit("heavy", 0)
    tie.push("light", "l1")  # lifted to heavy's counter: a tie, and light runs nothing, so it goes first
    assert tie.next_tenant() == "light"
    with pytest.raises(InvalidArgument, match="weights"):
        FairQueue(1.0, 2.0, {"a": 0.0})
    with pytest.raises(InvalidArgument, match="costs"):
        FairQueue(0.0, 0.0, {})


def test_row_shares_and_a_preempted_request_back_at_the_front() -> None:
    queue: FairQueue[str] = FairQueue(1.0, 2.0, {"b": 3.0})
    assert queue.row_share("a", 8) == 8.0  # alone: every row
    for item in ("a1", "a2", "a3"):
        queue.push("a", item)
    queue.admit("a", 10)
    queue.admit("a", 10)
    queue.push("b", "b1")  # lifted to a's counter, 20
    assert queue.row_share("a", 8) == 2.0 and queue.row_share("b", 8) == 6.0  # split by weight
    assert queue.row_share("c", 8) == 8 / 5  # a tenant about to wait counts itself in
    assert queue.next_below_share(8) == "b"  # a runs 2 rows: its share
    queue.generated("b", 3)  # b's counter 22 passes a's 20
    assert queue.next_below_share(16) == "a" and queue.next_below_share(8) == "b"
    queue.preempt("a", "a1")
    assert queue.head("a") == "a1" and len(queue) == 3 and queue.next_below_share(8) == "a"
    assert queue.service("a") == TenantService(
        waiting=2, running=1, input_tokens=20, virtual_tokens=20.0, preemptions=1
    )
    assert queue.take_changes()["a"].preemptions == 1


def test_admission_does_not_slow_down_with_tenants_gone_idle() -> None:
    """An engine that served thousands of tenants keeps their counters; admitting the few now sending must
    look at those few (backlogged or running), not at every tenant ever seen (a thousand adapters'
    tenants served round-robin made each push and pick scan them all)."""

    def admissions_s(idle: int) -> float:
        queue: FairQueue[Request] = FairQueue(INPUT_COST, OUTPUT_COST, {})
        for index in range(idle):
            tenant = f"idle-{index}"
            queue.push(tenant, Request(tenant, 1, 1))
            queue.admit(tenant, 1)
            queue.finished(tenant)
        started = time.perf_counter()
        for number in range(200):
            sender = f"busy-{number % 4}"
            queue.push(sender, Request(sender, 1, 1))
            chosen = queue.next_tenant()
            assert chosen is not None
            queue.admit(chosen, 1)
            queue.finished(chosen)
        return time.perf_counter() - started

    few = min(admissions_s(0) for _ in range(3))
    many = min(admissions_s(20_000) for _ in range(3))
    assert many < 10 * few + 0.01, (few, many)  # scanning 20,000 tenants per admission: ~100x slower


def test_the_limiter_lets_other_tenants_in_while_one_tenant_waits_for_its_own() -> None:
    """A burst of one tenant holds at most ``limit`` places; another tenant's task enters at once, and a
    tenant's gate is dropped when its last task leaves (a thousand tenants leave nothing behind)."""

    async def scenario() -> None:
        limiter = TenantLimiter(2)
        release = asyncio.Event()
        inside: list[str] = []

        async def task(tenant: str) -> None:
            async with limiter.hold(tenant):
                inside.append(tenant)
                await release.wait()

        burst = [asyncio.create_task(task("heavy")) for _ in range(5)]
        await asyncio.sleep(0)
        light = asyncio.create_task(task("light"))
        for _ in range(5):
            await asyncio.sleep(0)
        assert inside == ["heavy", "heavy", "light"] and len(limiter) == 2
        release.set()
        await asyncio.gather(*burst, light)
        assert inside.count("heavy") == 5 and len(limiter) == 0

    asyncio.run(scenario())
    with pytest.raises(InvalidArgument):
        TenantLimiter(0)
