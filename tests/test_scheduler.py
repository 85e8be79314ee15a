"""The scheduler's preemption by recompute, driven directly on the tiny model (no store, no compressor)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import torch
from lloco.model import (
    Generator,
    LoadedModel,
    LoraAdapter,
    LoraSlots,
    SamplingParams,
    chat_prompt,
    load_model,
)
from lloco.serve.caches import AdapterKey, SlotManager
from lloco.serve.fairness import FairQueue
from lloco.serve.scheduler import ScheduledRequest, Scheduler, TokenEvent
from safetensors.torch import save as save_safetensors

ADAPTER = AdapterKey("acme", "uid-acme", "support", "v1")


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(str(tiny_model_dir), tmp_path_factory.mktemp("cache"), dtype="float32")


@pytest.fixture(scope="module")
def adapter(base: LoadedModel) -> LoraAdapter:
    """A random adapter on q/v, strong enough to change greedy answers."""
    config, generator = base.config, torch.Generator().manual_seed(3)
    tensors = {}
    for layer in range(config.n_layers):
        for target, (fan_in, fan_out) in {
            "q_proj": (config.dim, config.q_dim),
            "v_proj": (config.dim, config.kv_dim),
        }.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(4, fan_in, generator=generator) / fan_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, 4, generator=generator)
    peft = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    files = {
        "adapter_config.json": json.dumps(peft).encode(),
        "adapter_model.safetensors": save_safetensors(tensors),
    }
    return LoraSlots(base.config, n_slots=2, max_rank=8).prepare(files)


def scheduler(base: LoadedModel, max_batch: int, preemption: bool) -> Scheduler:
    lora = LoraSlots(base.config, n_slots=2, max_rank=8)
    generator = Generator(base.model, lora, max_batch, 160, tokenizer=base.tokenizer, eos_token_ids=())
    return Scheduler(
        generator, lora, SlotManager(2), max_batch, 64, FairQueue(1.0, 2.0, {}), preemption=preemption
    )


def query(
    base: LoadedModel, tenant: str, number: int, tokens: int, adapter: LoraAdapter | None = None
) -> ScheduledRequest:
    """A greedy request; ``adapter`` (acme's) or the base model."""
    prompt = chat_prompt(base.tokenizer, f"Question {number} of {tenant}: tell me about rivers.")
    return ScheduledRequest(
        f"{tenant}-{number}",
        tenant,
        None,
        prompt,
        SamplingParams(tokens),
        ADAPTER if adapter is not None else None,
        adapter,
    )


async def tokens_of(request: ScheduledRequest) -> list[int]:
    """Every token of a request's stream until it finishes (failing on an error or a second end)."""
    tokens: list[int] = []
    while True:
        event = await request.events.get()
        assert isinstance(event, TokenEvent), event
        assert event.token_id is not None and event.reason in (None, "length")
        tokens.append(event.token_id)
        if event.finished:
            assert request.events.empty()
            return tokens


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met")


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


async def paused(sched: Scheduler, submit: Callable[[], None]) -> None:
    """Submit while the engine is held between two steps, so the next iteration meets them all at once."""
    gate = threading.Event()
    hold = asyncio.create_task(sched.run_exclusive(gate.wait))
    await until(lambda: not sched._jobs)  # the worker thread is in the gate
    submit()
    gate.set()
    await hold


def test_a_tenant_below_its_share_takes_a_row_back_and_the_victim_goes_on_unchanged(
    base: LoadedModel, adapter: LoraAdapter
) -> None:
    """Four rows, all acme's (its adapter, long answers); globex asks. With preemption globex is admitted
    in the next iteration and finishes first; the preempted acme request, resumed by recompute, streams
    exactly the tokens it streams without preemption, acme is charged for its input once, and the victim's
    slot pin is given back and taken again. Without preemption globex waits for an acme request to end."""

    async def scenario(preemption: bool) -> tuple[dict[str, list[int]], list[str], int]:
        sched = scheduler(base, max_batch=4, preemption=preemption)
        iterations: list[bool] = []
        await sched.start()
        acme = [query(base, "acme", i, 40, adapter) for i in range(4)]
        globex = query(base, "globex", 0, 4)
        finished: list[str] = []

        async def stream(request: ScheduledRequest) -> list[int]:
            tokens = await tokens_of(request)
            finished.append(request.request_id)
            return tokens

        tasks = {}
        for request in acme:
            sched.submit(request)
            tasks[request.request_id] = asyncio.create_task(stream(request))
        await until(lambda: all(request.emitted >= 3 for request in acme))
        sched._on_iteration = lambda waiting, active: iterations.append(globex.admitted_at > 0)
        await paused(sched, lambda: sched.submit(globex))
        tasks["globex"] = asyncio.create_task(stream(globex))
        if preemption:
            await until(lambda: sched.preemptions == 1)
            slot = sched.slots.slot_of(ADAPTER)
            assert slot is not None and sched.slots.pins(slot) == 3  # the victim's pin given back
        results = {rid: await task for rid, task in tasks.items()}
        await sched.stop()
        service = sched.service("acme")
        assert service.input_tokens == sum(request.input_tokens for request in acme)  # charged once
        assert service.preemptions == sched.preemptions and sched.service("globex").preemptions == 0
        assert service.running == service.waiting == 0 and sched.slots.pins(0) == sched.slots.pins(1) == 0
        assert iterations[0] is False  # the iteration that held the engine
        return results, finished, iterations.index(True)

    async def both() -> None:
        preempted, order, admitted_after = await scenario(preemption=True)
        kept, kept_order, kept_after = await scenario(preemption=False)
        assert admitted_after == 1 and kept_after > 1
        assert order[0] == "globex-0" and kept_order[0] != "globex-0", (order, kept_order)
        assert preempted == kept  # every stream token for token, the preempted one included
        assert all(len(tokens) == 40 for rid, tokens in preempted.items() if rid != "globex")

    run(both)


@pytest.mark.parametrize("layout", ["at share + 1", "a row free"])
def test_no_row_is_taken_back_from_a_tenant_near_its_share_or_while_a_row_is_free(
    base: LoadedModel, layout: str
) -> None:
    """At share + 1: four rows, acme three and globex one, globex asks again (shares of 2): acme is not
    above share + 1, so globex waits. A row free: five rows, acme four (share 2.5, so 1.5 above), globex
    asks: it takes the free row."""

    async def scenario() -> None:
        rows, acme_rows = (4, 3) if layout == "at share + 1" else (5, 4)
        sched = scheduler(base, max_batch=rows, preemption=True)
        await sched.start()
        running = [query(base, "acme", i, 30) for i in range(acme_rows)]
        if layout == "at share + 1":
            running.append(query(base, "globex", 0, 30))
        for request in running:
            sched.submit(request)
        await until(lambda: all(request.emitted >= 2 for request in running))
        late = query(base, "globex", 1, 3)
        await paused(sched, lambda: sched.submit(late))
        streams = [tokens_of(request) for request in [*running, late]]
        results = await asyncio.gather(*streams)
        await sched.stop()
        assert sched.preemptions == 0 and sched.service("acme").preemptions == 0
        assert [len(tokens) for tokens in results] == [30] * len(running) + [3]
        queued = late.admitted_at - late.submitted_at
        if layout == "at share + 1":  # admitted only once an acme or globex row ended
            assert late.admitted_at > max(request.first_token_at for request in running) and queued > 0

    run(scenario)


def test_a_request_cancelled_while_queued_again_after_preemption_ends_cleanly(
    base: LoadedModel, adapter: LoraAdapter
) -> None:
    """The victim, cancelled while it waits for a row again, leaves nothing behind: no row, no slot pin,
    no queue entry or count, no further event; the others finish."""

    async def scenario() -> None:
        sched = scheduler(base, max_batch=4, preemption=True)
        await sched.start()
        acme = [query(base, "acme", i, 40, adapter) for i in range(4)]
        for request in acme:
            sched.submit(request)
        await until(lambda: all(request.emitted >= 3 for request in acme))
        globex = query(base, "globex", 0, 30)
        await paused(sched, lambda: sched.submit(globex))
        await until(lambda: sched.preemptions == 1)
        (victim,) = [request for request in acme if request.request_id in sched._waiting]
        before = victim.events.qsize()
        sched.cancel(victim.request_id)
        assert sched.waiting() == 0 and sched.service("acme").waiting == 0
        others = [request for request in acme if request is not victim]
        results = await asyncio.gather(*(tokens_of(request) for request in [*others, globex]))
        assert [len(tokens) for tokens in results] == [40, 40, 40, 30]
        await until(lambda: sched.active() == 0)
        assert victim.events.qsize() == before and 0 < before < 40  # its tokens so far, then nothing
        assert sched._generator.active() == 0 and sched._generator.free_rows() == 4
        assert sched.slots.pins(0) == sched.slots.pins(1) == 0
        service = sched.service("acme")
        assert service.running == service.waiting == 0 and service.preemptions == 1
        assert sched.forget("acme")  # nothing of acme in flight
        await sched.stop()

    run(scenario)


def test_steps_run_on_the_schedulers_own_thread_while_the_shared_pool_is_full(base: LoadedModel) -> None:
    """The model runs on one thread of the scheduler's own: with the event loop's shared worker threads all
    blocked (as by a burst of queries being prepared), requests still get their tokens."""

    async def scenario() -> None:
        sched = scheduler(base, 2, preemption=False)
        await sched.start()
        gate = threading.Event()
        blockers = [asyncio.create_task(asyncio.to_thread(gate.wait)) for _ in range(64)]
        try:
            name = lambda: threading.current_thread().name  # noqa: E731
            names = {await asyncio.wait_for(sched.run_exclusive(name), 60) for _ in range(3)}
            request = query(base, "acme", 0, 3)
            sched.submit(request)
            assert len(await asyncio.wait_for(tokens_of(request), 60)) == 3
        finally:
            gate.set()
            await asyncio.gather(*blockers)
            await sched.stop()
        assert len(names) == 1 and names.pop().startswith("lloco-engine")

    run(scenario)


def test_loop_times_count_admissions_and_the_event_loops_gaps(base: LoadedModel) -> None:
    """Three requests meet one iteration with two rows: two are admitted together, the third when a row
    frees. While rows decode, the event loop is blocked for 0.3 s: the next iteration waits for it, and
    that wait is counted as a gap, not as the worker's time."""

    async def scenario() -> None:
        sched = scheduler(base, 2, preemption=False)
        await sched.start()
        began = time.perf_counter()
        try:
            requests = [query(base, "acme", n, 12) for n in range(3)]
            await paused(sched, lambda: [sched.submit(request) for request in requests])
            await until(lambda: sched.steps >= 2)
            time.sleep(0.3)  # the point: the event loop busy with something else
            answers = await asyncio.wait_for(asyncio.gather(*map(tokens_of, requests)), 60)
            assert [len(answer) for answer in answers] == [12, 12, 12]
        finally:
            await sched.stop()
        wall = time.perf_counter() - began
        times = sched.loop_times
        assert times.admitted_rows == 3 and times.admitting_iterations == 2
        assert times.admitted_rows_squared == 2**2 + 1**2
        assert times.iterations > sched.steps >= 24  # and the paused() job's iteration
        assert times.worker_s > times.admitting_worker_s > 0
        assert times.gap_s >= 0.29 and times.gap_s + times.worker_s <= wall

    run(scenario)
