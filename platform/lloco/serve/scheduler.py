"""Continuous batching over `lloco.model.Generator`, with per-tenant fair admission.

One asyncio task owns the generator. Each iteration it gathers what the event loop collected since the
last one (exclusive jobs such as online compression, cancellations, waiting requests that fit a free row
and a LoRA slot) and hands it to one worker thread that runs, in order: the jobs, the cancellations, the
slot loads, the new rows, then one `Generator.step()` (the tokens of the decode step launched last time,
the next decode step launched, the step's chunks of prefill).
Only that thread touches the model, so a step never overlaps another step, a slot load or a job, while
the event loop stays free to accept and stream requests.

Waiting requests are queued per tenant and admitted in the order of the tenants' virtual token counters
(`lloco.serve.fairness`): when rows are scarce, a tenant flooding the engine gets its share, not the
batch. Counters are charged for a request's input when it is admitted and for each token it generates.

Counters only decide who gets a free row; a tenant that took every row while the others were idle keeps
them until its requests finish, often together. With `preemption` on, a tenant with a request waiting and
fewer rows than its share (the rows split by weight among the tenants waiting or running) takes one back
when no row is free, from the tenant furthest above its share if that one holds more than its share + 1
(the + 1 keeps rows from moving back and forth among backlogged tenants whose shares do not divide the
rows): at most one row an iteration, the victim's row that holds the fewest positions (the least work to
redo). The victim goes back to the front of its tenant's queue with the `Resume` the generator gives
(the tokens it emitted and its seed) and, admitted again, prefills its context, prompt and those tokens
and goes on: its stream only pauses (no token repeated or lost; stops and max_new_tokens count across the
cut; TTFT and its first admission time are kept). Its adapter slot is unpinned when it leaves the row and
acquired again like any request's. Nobody's counter pays for the recompute: the victim was charged for its
input and its tokens once, and the scheduler, not the victim, chose to redo them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from lloco.errors import Cancelled, Internal, LlocoError, ResourceExhausted
from lloco.logs import get_logger
from lloco.model import Generator, LoraAdapter, LoraSlots, Resume, SamplingParams, StepOutput
from lloco.serve.caches import AdapterKey, SlotGrant, SlotManager
from lloco.serve.fairness import FairQueue, TenantService

log = get_logger(__name__)

T = TypeVar("T")

TENANT_REPORT_S = 1.0  # per-tenant service is reported at most this often while the engine is busy


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of a request, or (`token_id` None) its end without a token."""

    token_id: int | None
    finished: bool
    reason: str | None


@dataclass
class ScheduledRequest:
    """A tenant's request ready for the model: its compressed context on the device (prefix embeddings
    `[P, D]`, or key/value summaries `[P, kv_width]` from a key/value compressor), prompt ids, adapter."""

    request_id: str
    tenant: str
    prefix_embeds: torch.Tensor | None
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterKey | None = None
    adapter_weights: LoraAdapter | None = None
    prefix_kv: torch.Tensor | None = None
    # names the prefix embeddings and the adapter for the generator's prefix cache (None: not cached)
    prefix_key: Hashable | None = None
    events: asyncio.Queue[TokenEvent | BaseException] = field(default_factory=asyncio.Queue)
    grant: SlotGrant | None = None
    emitted: int = 0  # tokens delivered
    resume: Resume | None = None  # where it stopped when preempted (set by the worker thread)
    # perf_counter times of its way through the scheduler (0.0: not yet): queued, given a row, first token out
    submitted_at: float = 0.0
    admitted_at: float = 0.0
    first_token_at: float = 0.0

    @property
    def input_tokens(self) -> int:
        """Input positions: context positions + prompt tokens."""
        prefixes = (self.prefix_embeds, self.prefix_kv)
        return sum(p.shape[0] for p in prefixes if p is not None) + len(self.prompt_ids)

    @property
    def positions(self) -> int:
        """Positions its row holds once prefilled: what preempting it throws away."""
        return self.input_tokens + self.emitted


@dataclass
class LoopTimes:
    """Where the scheduler's busy time went, totals since it started: the worker thread's iterations (those
    that admitted rows apart: they run the rows' prefill) and the gaps between one iteration's end and the
    next one's start while work was waiting, which the event loop spends delivering the tokens and running
    its other coroutines (streams, preparation) before the next iteration is handed over."""

    iterations: int = 0
    admitting_iterations: int = 0
    admitted_rows: int = 0
    # each admitting iteration's rows squared, summed: over admitted_rows, the group a row came in with
    admitted_rows_squared: int = 0
    worker_s: float = 0.0
    admitting_worker_s: float = 0.0
    gap_s: float = 0.0


@dataclass
class _Job:
    fn: Callable[[], Any]
    done: asyncio.Future[Any]


@dataclass
class _Iteration:
    """What one worker-thread call does, and what it reports back."""

    jobs: list[_Job]
    cancels: list[str]
    preempts: list[ScheduledRequest]
    admissions: list[ScheduledRequest]
    job_results: list[tuple[_Job, Any, BaseException | None]] = field(default_factory=list)
    rejected: list[tuple[ScheduledRequest, BaseException]] = field(default_factory=list)
    loaded: list[AdapterKey] = field(default_factory=list)
    outputs: list[StepOutput] = field(default_factory=list)
    step_error: Exception | None = None
    began: float = 0.0  # the worker's clock (perf_counter)
    ended: float = 0.0


class Scheduler:
    """Admits requests of any tenant and adapter into free rows between decode steps.

    Args:
        generator, lora, slots: the model's generator, its adapter slots and their bookkeeping.
        max_batch: rows (requests running at once).
        max_waiting: requests queued at most, all tenants; more are refused (ResourceExhausted).
        queue: the per-tenant queues and their counters (costs and weights from settings).
        preemption: take rows back for tenants below their share (the module's docstring).
        on_slot_load: an adapter was copied into a slot.
        on_iteration: (requests waiting, requests running) after each iteration.
        on_tenants: the service of the tenants whose queue or service changed, at most every
            ``TENANT_REPORT_S`` while busy, and when the engine goes idle.
    """

    def __init__(
        self,
        generator: Generator,
        lora: LoraSlots,
        slots: SlotManager,
        max_batch: int,
        max_waiting: int,
        queue: FairQueue[ScheduledRequest],
        preemption: bool = False,
        on_slot_load: Callable[[AdapterKey], None] = lambda key: None,
        on_iteration: Callable[[int, int], None] = lambda waiting, active: None,
        on_tenants: Callable[[dict[str, TenantService]], None] = lambda services: None,
    ) -> None:
        self._generator = generator
        self._lora = lora
        self.slots = slots
        self._max_batch = max_batch
        self._max_waiting = max_waiting
        self._on_slot_load = on_slot_load
        self._on_iteration = on_iteration
        self._on_tenants = on_tenants
        self._queue = queue
        self.preemption = preemption
        self._waiting: dict[str, ScheduledRequest] = {}  # by request id, for cancellation
        self._reported_at = 0.0
        self._running: dict[str, ScheduledRequest] = {}
        self._cancelled: set[str] = set()
        self._jobs: list[_Job] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # the model's thread, its own: in the event loop's shared pool (asyncio.to_thread) a step would
        # queue behind whatever else waits there, such as the preparation of a burst of queries
        self._worker: ThreadPoolExecutor | None = None
        self._stopping = False
        self.steps = 0
        self.generated_tokens = 0
        self.preemptions = 0
        self.loop_times = LoopTimes()

    async def start(self) -> None:
        if self._task is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lloco-engine")
            self._task = asyncio.create_task(self._run(), name="lloco-scheduler")

    async def stop(self) -> None:
        """Stop after the step in flight; requests still waiting or running end with reason "cancelled"."""
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        await self._task
        self._task = None
        self._stopping = False
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None
        for rid, request in self._running.items():
            self._generator.cancel(rid)
            self._finish(request)
        for request in [*self._queue.items(), *self._running.values()]:
            request.events.put_nowait(TokenEvent(None, True, "cancelled"))
        self._queue.clear()
        self._waiting.clear()
        self._running.clear()
        self._cancelled.clear()
        for job in self._jobs:
            job.done.set_exception(Cancelled("the engine is shutting down"))
        self._jobs.clear()

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopping

    def waiting(self) -> int:
        return len(self._waiting)

    def active(self) -> int:
        return len(self._running)

    def backlogged(self) -> int:
        """Tenants with requests waiting."""
        return self._queue.backlogged()

    def service(self, tenant: str) -> TenantService:
        """A tenant's queue and service on this engine."""
        return self._queue.service(tenant)

    def forget(self, tenant: str) -> bool:
        """Drop a deleted tenant's counter (kept while it still has requests in flight)."""
        return self._queue.forget(tenant)

    def submit(self, request: ScheduledRequest) -> None:
        """Queue a request; its events arrive on `request.events`.

        Raises:
            ResourceExhausted: the waiting queue is full.
        """
        if not self.alive:
            raise Internal("the engine's scheduler is not running")
        if len(self._waiting) >= self._max_waiting:
            raise ResourceExhausted(f"the engine has {len(self._waiting)} queries waiting; retry later")
        request.submitted_at = time.perf_counter()
        self._queue.push(request.tenant, request)
        self._waiting[request.request_id] = request
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        """Drop a request: at once when still waiting (also when queued again after a preemption: it holds
        no row or slot then), at the next step when it holds a row."""
        request = self._waiting.pop(request_id, None)
        if request is not None:
            self._queue.remove(request.tenant, request)
            return
        if request_id in self._running:
            self._cancelled.add(request_id)
            self._wake.set()

    async def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run blocking `fn` in the model's worker thread between two steps (never during one)."""
        if not self.alive:
            raise Internal("the engine's scheduler is not running")
        job = _Job(fn, asyncio.get_running_loop().create_future())
        self._jobs.append(job)
        self._wake.set()
        return await job.done

    async def preload(self, key: AdapterKey, weights: LoraAdapter) -> bool:
        """Load an adapter into a slot ahead of its requests; False when every slot is pinned."""
        grant = self.slots.acquire(key)
        if grant is None:
            return False
        try:
            if grant.needs_load:
                try:
                    await self.run_exclusive(lambda: self._lora.load(grant.slot, weights))
                except BaseException:
                    self.slots.forget(grant.slot)
                    raise
                self._on_slot_load(key)
        finally:
            self._finish_grant(grant)
        return True

    async def _run(self) -> None:
        try:
            await self._loop()
        except Exception as exc:
            # A bug, not a request's fault: fail everyone rather than leave streams hanging; `alive` turns
            # False, so the replica's health check fails and Serve replaces it.
            log.exception("engine scheduler crashed")
            for request in [*self._waiting.values(), *self._running.values()]:
                request.events.put_nowait(_internal(exc))
            for job in self._jobs:
                job.done.set_exception(_internal(exc))

    async def _loop(self) -> None:
        last_end: float | None = None  # the previous iteration's end, if work has waited ever since
        while not self._stopping:
            if not (self._jobs or self._cancelled or self._waiting or self._running):
                last_end = None
                await self._wake.wait()
                self._wake.clear()
                continue
            self._wake.clear()
            cancels = self._take_cancels()
            preempts, admissions = self._preempt()
            iteration = _Iteration(self._jobs, cancels, preempts, admissions + self._admit())
            self._jobs = []
            await asyncio.get_running_loop().run_in_executor(self._worker, self._iterate, iteration)
            self._time(iteration, last_end)
            last_end = iteration.ended
            self._deliver(iteration)
            self._on_iteration(len(self._waiting), len(self._running))
            self._report_tenants()

    def _time(self, it: _Iteration, last_end: float | None) -> None:
        times, worker = self.loop_times, it.ended - it.began
        times.iterations += 1
        times.worker_s += worker
        if it.admissions:
            times.admitting_iterations += 1
            times.admitted_rows += len(it.admissions)
            times.admitted_rows_squared += len(it.admissions) ** 2
            times.admitting_worker_s += worker
        if last_end is not None:
            times.gap_s += it.began - last_end

    def _report_tenants(self) -> None:
        now = time.monotonic()
        idle = not (self._waiting or self._running)
        if idle or now - self._reported_at >= TENANT_REPORT_S:
            changes = self._queue.take_changes()
            if changes:
                self._on_tenants(changes)
                self._reported_at = now

    def _take_cancels(self) -> list[str]:
        cancels = [rid for rid in self._cancelled if rid in self._running]
        self._cancelled.clear()
        for rid in cancels:
            self._finish(self._running.pop(rid))
        return cancels

    def _admit(self) -> list[ScheduledRequest]:
        """Waiting requests for the free rows: each the oldest of the backlogged tenant with the lowest
        counter (FIFO within a tenant) that can get a slot; the rest keep their place.

        Once a request waits for a slot, adapter requests of the other tenants wait too (base-model ones
        still join): otherwise a steady flow on resident adapters could keep every slot pinned forever.
        """
        admitted: list[ScheduledRequest] = []
        free_rows = self._max_batch - len(self._running)
        slot_blocked = False
        skipped: set[str] = set()
        while free_rows > 0:
            tenant = self._queue.next_tenant(skipped)
            if tenant is None:
                break
            request = self._queue.head(tenant)
            if request.adapter is not None:
                if not slot_blocked:
                    request.grant = self.slots.acquire(request.adapter)
                    slot_blocked = request.grant is None
                if slot_blocked:
                    skipped.add(tenant)
                    continue
            self._start(tenant, request)
            admitted.append(request)
            free_rows -= 1
        return admitted

    def _start(self, tenant: str, request: ScheduledRequest) -> None:
        """Move the tenant's head ``request`` from waiting to running; a resumed one is not charged again."""
        self._queue.admit(tenant, request.input_tokens if request.resume is None else 0)
        request.admitted_at = request.admitted_at or time.perf_counter()
        del self._waiting[request.request_id]
        self._running[request.request_id] = request

    def _preempt(self) -> tuple[list[ScheduledRequest], list[ScheduledRequest]]:
        """When no row is free: the preempted request and the one admitted into its row (at most one
        each), or nothing (the module's docstring has the rule).

        The waiting tenant's adapter must find a slot while the victim still pins its own: a row taken back
        for a request that then waits for a slot would be recomputed for nothing.
        """
        if not self.preemption or len(self._running) < self._max_batch:
            return [], []
        tenant = self._queue.next_below_share(self._max_batch)
        victim = self._victim() if tenant is not None else None
        if tenant is None or victim is None:
            return [], []
        request = self._queue.head(tenant)
        if request.adapter is not None:
            request.grant = self.slots.acquire(request.adapter)
            if request.grant is None:
                return [], []
        del self._running[victim.request_id]
        self._release(victim)
        self._queue.preempt(victim.tenant, victim)
        self._waiting[victim.request_id] = victim
        self.preemptions += 1
        self._start(tenant, request)
        return [victim], [request]

    def _victim(self) -> ScheduledRequest | None:
        """The row holding the fewest positions of the tenant furthest above its share, if it holds more
        than its share + 1 rows."""
        excess: dict[str, float] = {}
        for request in self._running.values():
            if request.tenant not in excess:
                running = self._queue.service(request.tenant).running
                excess[request.tenant] = running - self._queue.row_share(request.tenant, self._max_batch)
        tenant = max(excess, key=excess.__getitem__, default=None)
        if tenant is None or excess[tenant] <= 1:
            return None
        rows = [request for request in self._running.values() if request.tenant == tenant]
        return min(rows, key=lambda request: request.positions)

    def _iterate(self, it: _Iteration) -> None:
        """The worker-thread half: the only code that touches the model."""
        it.began = time.perf_counter()
        try:
            self._run_iteration(it)
        finally:
            it.ended = time.perf_counter()

    def _run_iteration(self, it: _Iteration) -> None:
        for job in it.jobs:
            try:
                it.job_results.append((job, job.fn(), None))
            except Exception as exc:
                it.job_results.append((job, None, exc))
        # a victim the generator does not run is a scheduler bug: raised, it takes the crash path (every
        # stream ends with an error) rather than restart the victim's stream from its first token
        for request in it.preempts:
            request.resume = self._generator.preempt(request.request_id)
        try:
            for rid in it.cancels:
                self._generator.cancel(rid)
        except Exception as exc:
            it.step_error = exc
            it.rejected.extend((request, exc) for request in it.admissions)
            return
        failed_slots: dict[int, Exception] = {}
        for request in it.admissions:
            grant = request.grant
            try:
                if grant is not None and grant.slot in failed_slots:
                    raise failed_slots[grant.slot]
                if grant is not None and grant.needs_load:
                    try:
                        self._lora.load(grant.slot, request.adapter_weights)
                    except Exception as exc:
                        failed_slots[grant.slot] = exc
                        raise
                    it.loaded.append(grant.key)
                slot = grant.slot if grant is not None else -1
                self._generator.add(
                    request.request_id,
                    request.prefix_embeds,
                    request.prompt_ids,
                    slot,
                    request.params,
                    request.prefix_kv,
                    request.resume,
                    request.prefix_key,
                )
            except Exception as exc:
                it.rejected.append((request, exc))
        try:
            if self._generator.active() > 0:
                it.outputs = self._generator.step()
        except Exception as exc:
            it.step_error = exc

    def _deliver(self, it: _Iteration) -> None:
        for job, result, error in it.job_results:
            if job.done.done():  # its caller gave up waiting
                continue
            if error is None:
                job.done.set_result(result)
            else:
                job.done.set_exception(error)
        for request, error in it.rejected:
            if request.grant is not None and request.grant.needs_load and request.grant.key not in it.loaded:
                self.slots.forget(request.grant.slot)
            self._running.pop(request.request_id, None)
            self._finish(request)
            request.events.put_nowait(error if isinstance(error, LlocoError) else _internal(error))
        for key in it.loaded:
            self._on_slot_load(key)
        if it.step_error is not None:
            self._fail_running(it.step_error)
            return
        if it.outputs:
            self.steps += 1
        for out in it.outputs:
            request = self._running.get(out.request_id)
            if request is None:
                continue
            self.generated_tokens += 1
            request.emitted += 1
            self._queue.generated(request.tenant)
            request.first_token_at = request.first_token_at or time.perf_counter()
            request.events.put_nowait(TokenEvent(out.token_id, out.finished, out.reason))
            if out.finished:
                del self._running[out.request_id]
                self._finish(request)

    def _finish(self, request: ScheduledRequest) -> None:
        """A running request left its row (finished, cancelled, rejected or failed)."""
        self._queue.finished(request.tenant)
        self._release(request)

    def _release(self, request: ScheduledRequest) -> None:
        """Unpin the slot of a request leaving its row, if it holds one."""
        if request.grant is not None:
            self._finish_grant(request.grant)
            request.grant = None

    def _finish_grant(self, grant: SlotGrant) -> None:
        """Unpin a slot and wake the loop: a request waiting for a slot may fit now."""
        self.slots.release(grant.slot)
        self._wake.set()

    def _fail_running(self, exc: Exception) -> None:
        """A failed step leaves its rows in an unknown state: end each with an error and drop it."""
        log.error("engine step failed", error=repr(exc), rows=len(self._running))
        for rid, request in list(self._running.items()):
            self._cancelled.add(rid)
            request.events.put_nowait(_internal(exc))


def _internal(exc: BaseException) -> Internal:
    error = Internal(f"engine error ({type(exc).__name__}); see server logs")
    error.__cause__ = exc
    return error
