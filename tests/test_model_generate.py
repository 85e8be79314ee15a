"""Continuous batching: a mixed batch generates exactly what each request generates alone."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from lloco.errors import AlreadyExists, FailedPrecondition, InvalidArgument, ResourceExhausted
from lloco.model import (
    GenerationRequest,
    Generator,
    LoraSlots,
    Resume,
    SamplingParams,
    chat_prompt,
    generate,
    load_model,
)
from lloco.model import fused as fused_decode


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return load_model(str(tiny_model_dir), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def slots(base, tmp_path_factory: pytest.TempPathFactory) -> LoraSlots:
    """Two random adapters (peft-written) in slots 0 and 1."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    lora = LoraSlots(base.config, n_slots=3, max_rank=8)
    for slot, rank in ((0, 4), (1, 8)):
        torch.manual_seed(slot)
        hf = LlamaForCausalLM.from_pretrained(base.path, dtype=torch.float32)
        config = LoraConfig(
            r=rank, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
        )
        out = tmp_path_factory.mktemp(f"adapter{slot}")
        get_peft_model(hf, config).save_pretrained(out)
        lora.load(slot, out)
    return lora


def requests(base) -> list[GenerationRequest]:
    """Rows with prefixes of 0/6/13 embeddings, different prompts, adapters, greedy and sampled."""
    gen = torch.Generator().manual_seed(7)
    prefix = lambda n: torch.randn(n, base.config.dim, generator=gen) * 0.05  # noqa: E731
    tok = base.tokenizer
    return [
        GenerationRequest(chat_prompt(tok, "What is the capital of France?"), None, -1, SamplingParams(12)),
        GenerationRequest(chat_prompt(tok, "Name a river."), prefix(6), 0, SamplingParams(9)),
        GenerationRequest(
            chat_prompt(tok, "A long question about the world?"), prefix(13), 1, SamplingParams(14)
        ),
        GenerationRequest(
            chat_prompt(tok, "Tell a story."),
            prefix(3),
            1,
            SamplingParams(10, temperature=0.9, top_p=0.8, seed=5),
        ),
        GenerationRequest(chat_prompt(tok, "Hi"), None, 0, SamplingParams(7, temperature=1.3, seed=11)),
    ]


def run_tokens(gen: Generator, batch: list[tuple[str, GenerationRequest]], late: list | None = None) -> dict:
    """Drive a generator to completion; ``late`` requests join after two steps (continuous batching)."""
    for request_id, r in batch:
        gen.add(request_id, r.prefix_embeds, r.prompt_ids, r.slot, r.params)
    tokens: dict[str, list[int]] = {request_id: [] for request_id, _ in batch + (late or [])}
    steps = 0
    while gen.active() or late:
        if steps == 2 and late:
            for request_id, r in late:
                gen.add(request_id, r.prefix_embeds, r.prompt_ids, r.slot, r.params)
            late = None
        for out in gen.step():
            tokens[out.request_id].append(out.token_id)
        steps += 1
    return tokens


def test_mixed_batch_equals_rows_alone(base, slots) -> None:
    reqs = requests(base)
    named = [(f"r{i}", r) for i, r in enumerate(reqs)]
    gen = Generator(
        base.model, slots, max_batch=8, max_seq_len=64, tokenizer=base.tokenizer, eos_token_ids=()
    )
    together = run_tokens(gen, named[:3], late=named[3:])
    for request_id, r in named:
        alone = Generator(base.model, slots, max_batch=1, max_seq_len=64, eos_token_ids=())
        assert run_tokens(alone, [(request_id, r)])[request_id] == together[request_id], request_id
        assert len(together[request_id]) == r.params.max_new_tokens
    base_only = Generator(base.model, None, 1, 64, eos_token_ids=())
    plain = GenerationRequest(reqs[1].prompt_ids, reqs[1].prefix_embeds, -1, reqs[1].params)
    assert run_tokens(base_only, [("x", plain)])["x"] != together["r1"]  # the adapter matters


def test_greedy_equals_hf_generate(base, tiny_model_dir: Path) -> None:
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = chat_prompt(base.tokenizer, "What is the capital of France?")
    expected = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None)[
        0, len(ids) :
    ]
    gen = Generator(base.model, None, 2, 64, eos_token_ids=())
    assert (
        run_tokens(gen, [("q", GenerationRequest(ids, params=SamplingParams(16)))])["q"] == expected.tolist()
    )


def test_eos_and_stop_strings_end_requests(base) -> None:
    ids = chat_prompt(base.tokenizer, "What is the capital of France?")
    free = run_tokens(
        Generator(base.model, None, 1, 64, eos_token_ids=()),
        [("q", GenerationRequest(ids, params=SamplingParams(20)))],
    )["q"]
    eos = free[4]
    gen = Generator(base.model, None, 1, 64, tokenizer=base.tokenizer, eos_token_ids=[eos])
    gen.add("q", None, ids, params=SamplingParams(20))
    outs = []
    while gen.active():
        outs += gen.step()
    first = free.index(eos)
    assert [o.token_id for o in outs] == free[: first + 1]
    assert outs[-1].finished and outs[-1].reason == "eos" and not any(o.finished for o in outs[:-1])
    # generate() leaves the EOS token out of the text
    text = generate(gen, [GenerationRequest(ids, params=SamplingParams(20))])[0]
    assert text == base.tokenizer.decode(free[:first], skip_special_tokens=True)

    full = base.tokenizer.decode(free, skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip()
    gen = Generator(base.model, None, 2, 64, tokenizer=base.tokenizer, eos_token_ids=())
    text = generate(gen, [GenerationRequest(ids, params=SamplingParams(20, stop=("never-seen", stop)))])[0]
    assert text == full[: full.index(stop)]
    gen.add("s", None, ids, params=SamplingParams(20, stop=(stop,)))
    outs = []
    while gen.active():
        outs += gen.step()
    assert outs[-1].reason == "stop" and len(outs) < 20
    assert stop in base.tokenizer.decode([o.token_id for o in outs], skip_special_tokens=True)


def test_rows_limits_and_cancel(base, slots) -> None:
    gen = Generator(base.model, slots, max_batch=2, max_seq_len=32)
    gen.add("a", None, [5, 6, 7], params=SamplingParams(10))
    with pytest.raises(AlreadyExists):
        gen.add("a", None, [5], params=SamplingParams(2))
    gen.add("b", None, [5, 6], params=SamplingParams(10))
    with pytest.raises(ResourceExhausted):
        gen.add("c", None, [5], params=SamplingParams(2))
    gen.step()
    gen.cancel("a")
    gen.cancel("a")  # already gone: ignored
    assert gen.free_rows() == 1 and gen.active() == 1
    with pytest.raises(InvalidArgument, match="exceed max_seq_len"):
        gen.add("c", None, list(range(30)), params=SamplingParams(5))
    with pytest.raises(InvalidArgument, match="slot 7"):
        gen.add("c", None, [5], slot=7, params=SamplingParams(2))
    with pytest.raises(InvalidArgument, match="prefix"):
        gen.add("c", torch.zeros(3, 5), [5], params=SamplingParams(2))
    with pytest.raises(InvalidArgument, match="stop strings need"):
        gen.add("c", None, [5], params=SamplingParams(3, stop=("x",)))
    with pytest.raises(InvalidArgument, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(FailedPrecondition):
        generate(gen, [GenerationRequest([5], params=SamplingParams(2))], tokenizer=base.tokenizer)
    while gen.active():
        gen.step()
    assert gen.free_rows() == 2
    assert gen._launched is None  # pipelining launched no step past a request's length


def test_cancel_and_join_mid_stream_leave_other_rows_exact(base, slots) -> None:
    """Decode steps are pipelined (each launched before the previous one's tokens are read): a request
    cancelled mid-stream and another that then takes its row change no other row's tokens."""
    named = [(f"r{i}", r) for i, r in enumerate(requests(base)[:4])]
    alone = {
        request_id: run_tokens(Generator(base.model, slots, 1, 64, eos_token_ids=()), [(request_id, r)])[
            request_id
        ]
        for request_id, r in named
    }
    gen = Generator(base.model, slots, max_batch=3, max_seq_len=64, eos_token_ids=())
    for request_id, r in named[:3]:
        gen.add(request_id, r.prefix_embeds, r.prompt_ids, r.slot, r.params)
    tokens: dict[str, list[int]] = {request_id: [] for request_id, _ in named}
    steps = 0
    while gen.active() or steps < 7:
        if steps == 4:
            gen.cancel("r1")
        if steps == 6:
            request_id, r = named[3]
            gen.add(request_id, r.prefix_embeds, r.prompt_ids, r.slot, r.params)
        for out in gen.step():
            tokens[out.request_id].append(out.token_id)
        steps += 1
    for request_id in ("r0", "r2", "r3"):
        assert tokens[request_id] == alone[request_id], request_id
    assert 0 < len(tokens["r1"]) < len(alone["r1"]) and tokens["r1"] == alone["r1"][: len(tokens["r1"])]


def test_a_preempted_request_resumed_emits_exactly_what_it_would_have(base, slots) -> None:
    """Rows preempted mid-stream (a chained decode step in flight) and resumed later in other rows, beside
    other rows: every request's tokens, joined across the cut, are the ones it emits alone (greedy, and
    sampled with its own or the generator's seed), neither repeated nor lost."""
    named = dict((f"r{i}", r) for i, r in enumerate(requests(base)))
    unseeded = named["r4"]
    named["r4"] = GenerationRequest(unseeded.prompt_ids, None, 0, SamplingParams(7, temperature=1.3))
    gen = Generator(base.model, slots, max_batch=3, max_seq_len=64, eos_token_ids=())
    tokens: dict[str, list[int]] = {request_id: [] for request_id in named}
    resumes: dict[str, Resume] = {}
    waiting = list(named)
    victims = {2: "r1", 4: "r3", 6: "r4"}  # r3 and r4 joined in the rows their predecessor left
    steps = 0
    while gen.active() or waiting:
        if steps in victims:
            victim = victims[steps]
            resumes[victim] = gen.preempt(victim)
            assert list(resumes[victim].generated) == tokens[victim] and tokens[victim]
            waiting.append(victim)
        while waiting and gen.free_rows():
            request_id = waiting.pop(0)
            r = named[request_id]
            gen.add(
                request_id, r.prefix_embeds, r.prompt_ids, r.slot, r.params, resume=resumes.get(request_id)
            )
        for out in gen.step():
            tokens[out.request_id].append(out.token_id)
        steps += 1
    for request_id, r in named.items():
        params = r.params
        if params.temperature > 0 and params.seed is None:  # the seed the generator drew, kept on resume
            params = SamplingParams(params.max_new_tokens, params.temperature, seed=resumes[request_id].seed)
        alone = Generator(base.model, slots, 1, 64, eos_token_ids=())
        request = GenerationRequest(r.prompt_ids, r.prefix_embeds, r.slot, params)
        assert tokens[request_id] == run_tokens(alone, [(request_id, request)])[request_id], request_id


def test_a_resumed_request_stops_where_it_would_have(base) -> None:
    """Stop strings spanning the cut and max_new_tokens count the tokens emitted before a preemption."""
    ids = chat_prompt(base.tokenizer, "What is the capital of France?")
    free = run_tokens(
        Generator(base.model, None, 1, 64, eos_token_ids=()),
        [("q", GenerationRequest(ids, params=SamplingParams(20)))],
    )["q"]
    cut = 6
    before = base.tokenizer.decode(free[:cut], skip_special_tokens=True)
    full = base.tokenizer.decode(free, skip_special_tokens=True)
    stop = full[len(before) - 2 : len(before) + 2]
    assert stop not in before and stop in full  # it can only be found after the cut
    for params in (SamplingParams(20, stop=(stop,)), SamplingParams(cut + 3)):
        gen = Generator(base.model, None, 2, 64, tokenizer=base.tokenizer, eos_token_ids=())
        gen.add("q", None, ids, params=params)
        outs = []
        while len(outs) < cut:
            outs += gen.step()
        resume = gen.preempt("q")
        assert list(resume.generated) == [o.token_id for o in outs] and gen.active() == 0
        gen.add("q", None, ids, params=params, resume=resume)
        while gen.active():
            outs += gen.step()
        plain = Generator(base.model, None, 2, 64, tokenizer=base.tokenizer, eos_token_ids=())
        plain.add("q", None, ids, params=params)
        expected = []
        while plain.active():
            expected += plain.step()
        assert outs == expected and len(outs) > cut
    with pytest.raises(FailedPrecondition):
        gen.preempt("q")  # finished
    with pytest.raises(InvalidArgument, match="fewer than"):
        gen.add("q", None, ids, params=SamplingParams(3), resume=Resume((1, 2, 3), 0))


@pytest.mark.skipif(not fused_decode.available(), reason="triton is not installed")
def test_fused_batch1_steps_equal_layer_steps(base, slots) -> None:
    """Rows alone (batch 1: the Triton kernels) and joining later (batch 2+: the layer path) on one cache.

    Alone, each kind of row (prefix or none, adapter slot or none, greedy or sampled) stops after
    ``ALONE_TOKENS``: on the CPU every kernel step runs in Triton's interpreter, at about a second each."""
    batch = list(enumerate(requests(base)))
    first = [(f"r{i}", r) for i, r in batch[:2]]
    late = [(f"r{i}", r) for i, r in batch[2:]]
    alone = {f"r{i}": shortened(r, ALONE_TOKENS) for i, r in batch}
    results = {}
    for fused in (False, True):
        gen = Generator(base.model, slots, 4, 160, eos_token_ids=(), fused=fused)
        mixed = run_tokens(gen, first[:1], late[:1])
        singles = {rid: run_tokens(gen, [(rid, r)])[rid] for rid, r in alone.items()}
        results[fused] = (mixed, singles)
    assert results[True] == results[False]


ALONE_TOKENS = 6  # a prefill, then five decode steps


def shortened(request: GenerationRequest, tokens: int) -> GenerationRequest:
    """The request with at most ``tokens`` new tokens (same prompt, prefix, slot and sampling)."""
    params = replace(request.params, max_new_tokens=min(tokens, request.params.max_new_tokens))
    return replace(request, params=params)


def long_request(
    base, prefix_len: int, question: str, slot: int, params: SamplingParams
) -> GenerationRequest:
    """A compressed-context-like input: ``prefix_len`` prefix embeddings, then a chat prompt."""
    gen = torch.Generator().manual_seed(prefix_len)
    prefix = torch.randn(prefix_len, base.config.dim, generator=gen) * 0.05
    return GenerationRequest(chat_prompt(base.tokenizer, question), prefix, slot, params)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_prefill_generates_what_unchunked_prefill_does(base, slots, chunk: int) -> None:
    """Prefix embeddings + prompt ids prefilled in chunks of ``chunk`` positions, beside decoding rows and
    rows joining later, with adapters: every row generates exactly what it generates alone, unchunked."""
    reqs = [
        *requests(base),
        long_request(base, 40, "What does the long report say about rivers?", 1, SamplingParams(9)),
        long_request(base, 23, "Summarize it.", -1, SamplingParams(8, temperature=0.8, seed=3)),
    ]
    named = [(f"r{i}", r) for i, r in enumerate(reqs)]
    alone = {
        rid: run_tokens(Generator(base.model, slots, 1, 96, eos_token_ids=()), [(rid, r)])[rid]
        for rid, r in named
    }
    gen = Generator(base.model, slots, 8, 96, eos_token_ids=(), prefill_chunk_tokens=chunk)
    together = run_tokens(gen, named[:3], late=named[3:])
    assert together == alone


def test_a_cached_prefix_is_not_prefilled_again_and_generates_what_its_prefill_does(base, slots) -> None:
    """Three rows share one prefix: the first prefills it and keeps its keys and values, the second (same
    adapter, another question) takes them from the cache and prefills its prompt alone, the third (another
    adapter: another key) prefills it again. With a budget of one prompt's positions a step the hit gets its
    first token in its first step, a miss does not; each row generates what it does alone, uncached."""
    from lloco.serve.caches import LruCache, tensor_bytes

    prefix = long_request(base, 30, "unused", 1, SamplingParams()).prefix_embeds
    questions = [("Which river is long?", 1), ("Where is the old house?", 1), ("Which river is long?", 0)]
    reqs = [
        GenerationRequest(chat_prompt(base.tokenizer, q), prefix, slot, SamplingParams(10))
        for q, slot in questions
    ]
    alone = [run_tokens(Generator(base.model, slots, 1, 96, eos_token_ids=()), [("r", r)])["r"] for r in reqs]
    budget = max(len(r.prompt_ids) for r in reqs)
    cache: LruCache = LruCache(2**20, tensor_bytes)
    gen = Generator(
        base.model, slots, 2, 96, eos_token_ids=(), prefill_chunk_tokens=budget, prefix_cache=cache
    )
    steps_to_first = []
    for i, r in enumerate(reqs):
        gen.add(f"r{i}", r.prefix_embeds, r.prompt_ids, r.slot, r.params, prefix_key=("doc", r.slot))
        tokens: list[int] = []
        steps, first = 0, None
        while gen.active():
            steps += 1
            tokens += [out.token_id for out in gen.step()]
            first = first or (steps if tokens else None)
        steps_to_first.append(first)
        assert tokens == alone[i], i
    assert steps_to_first == [
        -(-(30 + len(r.prompt_ids)) // budget) if i != 1 else 1 for i, r in enumerate(reqs)
    ]
    assert min(steps_to_first[0], steps_to_first[2]) > 1
    assert (cache.hits, cache.misses, len(cache)) == (1, 2, 2)
    config = base.config
    assert cache.used == 2 * config.n_layers * 2 * config.n_kv_heads * 30 * config.head_dim * 4


def test_a_row_prefilled_in_chunks_below_decoding_rows_keeps_its_keys(base, slots) -> None:
    """Decode steps cover every cache row below the highest decoding one; a row part-way through its
    prefill there (a freed row taken by a long input) must not have its cached keys overwritten."""
    decoders = [(f"d{i}", r) for i, r in enumerate(requests(base)[:3])]
    late = ("long", long_request(base, 30, "Which city is the capital?", 0, SamplingParams(16)))
    alone = run_tokens(Generator(base.model, slots, 1, 96, eos_token_ids=()), [late])["long"]
    gen = Generator(base.model, slots, 4, 96, eos_token_ids=(), prefill_chunk_tokens=4)
    for rid, r in decoders:
        gen.add(rid, r.prefix_embeds, r.prompt_ids, r.slot, SamplingParams(50))
    started: set[str] = set()
    while len(started) < 3:
        started |= {out.request_id for out in gen.step()}
    gen.cancel("d0")  # frees row 0 while rows 1 and 2 decode
    rid, r = late
    gen.add(rid, r.prefix_embeds, r.prompt_ids, r.slot, r.params)
    tokens: list[int] = []
    while gen.active() > 2 or not tokens:
        tokens += [out.token_id for out in gen.step() if out.request_id == rid]
    assert tokens == alone


def test_decoding_rows_get_a_token_every_step_while_long_inputs_are_chunked(base) -> None:
    budget = 8
    gen = Generator(base.model, None, 4, 128, eos_token_ids=(), prefill_chunk_tokens=budget)
    for rid in ("a", "b"):
        gen.add(rid, None, chat_prompt(base.tokenizer, f"Question {rid}?"), params=SamplingParams(60))
    started: set[str] = set()
    while started != {"a", "b"}:  # both prefilled (over steps: their prompts exceed the budget)
        started |= {out.request_id for out in gen.step()}
    gen.step()  # the first decode step of both
    first = long_request(base, 41, "A long question about a long document?", -1, SamplingParams(4))
    second = long_request(base, 19, "Another one?", -1, SamplingParams(4))
    inputs = {rid: r.prefix_embeds.shape[0] + len(r.prompt_ids) for rid, r in (("x", first), ("y", second))}
    for rid, r in (("x", first), ("y", second)):
        gen.add(rid, r.prefix_embeds, r.prompt_ids, r.slot, r.params)
    first_token_step: dict[str, int] = {}
    for step in range(1, 40):
        outputs = gen.step()
        ids = [out.request_id for out in outputs]
        assert ids.count("a") == 1 and ids.count("b") == 1, f"step {step}: {ids}"
        for rid in ("x", "y"):
            if rid in ids and rid not in first_token_step:
                first_token_step[rid] = step
        if len(first_token_step) == 2:
            break
    # At most `budget` input positions per step, first come first served: x completes after
    # ceil(|x| / budget) steps, y once both inputs fit the positions of the steps so far.
    assert first_token_step == {
        "x": -(-inputs["x"] // budget),
        "y": -(-(inputs["x"] + inputs["y"]) // budget),
    }
    unchunked = Generator(base.model, None, 4, 128, eos_token_ids=())
    for rid, r in (("x", first), ("y", second)):
        unchunked.add(rid, r.prefix_embeds, r.prompt_ids, r.slot, r.params)
    assert {out.request_id for out in unchunked.step()} == {"x", "y"}  # whole inputs in one step
    with pytest.raises(InvalidArgument, match="prefill_chunk_tokens"):
        Generator(base.model, None, 1, 64, prefill_chunk_tokens=0)


class _ShapeRecorder(Generator):
    """A Generator that records the shape class of every decode step it runs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ran: set[tuple] = set()

    def _decode_body(self, batch, kv_len, use_lora, mode) -> None:
        self.ran.add((batch, kv_len, use_lora, mode))
        super()._decode_body(batch, kv_len, use_lora, mode)


def test_decode_shapes_cover_every_step_a_generator_runs(base, slots) -> None:
    """What a server captures at start (``decode_shapes``) is every shape its steps can meet: rows of
    several lengths, adapters on and off, every sampling mode, a batch size that is no power of two."""
    gen = _ShapeRecorder(base.model, slots, max_batch=7, max_seq_len=112, kv_bucket=16, eos_token_ids=())
    reqs = [*requests(base), long_request(base, 40, "What does the long report say?", 1, SamplingParams(36))]
    named = [(f"r{i}", r) for i, r in enumerate(reqs)]
    for batch in (named[:1], named[3:4], named[:3], named):
        run_tokens(gen, batch, late=[("late", reqs[0])] if batch is named else None)
    shapes = set(gen.decode_shapes(("greedy", "sample", "top_p")))
    assert gen.ran <= shapes
    assert {batch for batch, *_ in gen.ran} == {1, 4, 7} and {m for *_, m in gen.ran} == {"greedy", "top_p"}
    batches = {batch for batch, *_ in shapes}
    assert batches == {1, 2, 4, 7} and {kv for _, kv, *_ in shapes} == {16, 32, 48, 64, 80, 96, 112}
    assert len(Generator(base.model, None, 6, 96, kv_bucket=16).decode_shapes()) == 4 * 6  # no adapter class
    assert gen.capture_decode_graphs() == 0  # on the CPU there are no graphs to capture


def test_the_decode_step_keeps_no_autograd_graph_whoever_calls_it(base) -> None:
    """A server captures its decode graphs at start, outside any ``no_grad`` block (EngineCore's warm-up
    thread). Under grad mode the step wrote keys that require grad into the cache, so the compiled layer
    function recompiled inside the capture (and failed there) and kept every activation for a backward pass.
    The step turns gradients off itself; a GPU capture calls the same method, which CI cannot run."""
    assert any(p.requires_grad for p in base.model.parameters())  # what made the cache require grad
    gen = Generator(base.model, None, 2, 64, eos_token_ids=())
    with torch.enable_grad():
        for shape in gen.decode_shapes()[:2]:
            gen._decode_body(*shape)
    assert not any(t.requires_grad for t in (*gen.cache.k, *gen.cache.v))
