"""Continuous batching over a static KV cache: requests join and leave between decode steps.

The hot path (``Generator._decode_body``) has static shapes per (batch bucket, key-length bucket, adapters
on/off, sampling mode): on CUDA each such shape is captured once as a CUDA graph and replayed; with
``compile=True`` the layer function inside it is compiled once by ``torch.compile`` (the one compile site).
A batch-1 step runs the Triton kernels of ``lloco.model.fused`` instead when they are available (``fused``).
Sampling (``lloco.model.sampling``) runs on the device from per-row parameters, with noise hashed from
(seed, position), so a row's tokens do not depend on which other rows share its batch.

Decode steps are pipelined: a step's tokens are read (and emitted) by the next ``step`` call, which first
launches the following decode step when no request joined or left in between, its input tokens chained
from the previous step's output on the device. The host's work per step (emitting tokens, stop checks,
the caller's own, such as the serving scheduler's thread hand-off) then overlaps the GPU's instead of
leaving it idle (docs/benchmarks has the figures). A request that ends by EOS or a stop string costs its
row one wasted decode (one that ends by length none: the chain stops before).

Chunked prefill (``prefill_chunk_tokens``): a step prefills at most that many input positions of the queued
rows, so a burst of long inputs delays the decoding rows' next token by one bounded chunk per step instead
of by the whole burst. A chunk writes its keys into the row's cache and attends to the keys its earlier
chunks wrote, so the row's tokens do not depend on the cut. Steps with prefill work run the decode step as
usual (CUDA graph, compiled layers or the batch-1 kernels) plus one eager prefill forward, and they are not
chained on the device (the host reads the first tokens of rows whose input completes); pure decode steps
are unchanged.

A compressed context comes as prefix embeddings (read through every layer like prompt tokens) or, from a
key/value-summary compressor (``lloco.model.kv_summary``), as every layer's keys and values
(``prefix_kv``): those are written straight into the row's cache (keys rotated to positions 0..P-1) when
the row's prefill begins, and only the prompt is prefilled, after them.

Prefix embeddings of a context queried again need not be prefilled again: their keys and values depend only
on the embeddings and the row's adapter, not on the prompt after them. With a ``prefix_cache`` and a
``prefix_key`` naming both, a row leaves its prefix's keys and values there once prefilled, and a later row
of the same key has them written into its cache row (as key/value summaries are) and prefills its prompt
alone. A tenant's repeated queries over one document then cost a prompt's prefill, not the context's.
"""

from __future__ import annotations

import functools
import heapq
import random
import time
import uuid
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from lloco.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
)
from lloco.model import fused as fused_decode
from lloco.model.kv_summary import kv_width, rotated_prefix
from lloco.model.llama import Block, BlockFn, KVCache, Llama, resolve_device
from lloco.model.lora import LoraSlots
from lloco.model.sampling import SampleMode, SamplingParams, gumbel_noise, sample, truncate_at_stop

__all__ = [
    "GenerationRequest",
    "Generator",
    "Resume",
    "SamplingParams",
    "StepOutput",
    "generate",
    "gumbel_noise",
    "sample",
    "truncate_at_stop",
]

if TYPE_CHECKING:
    from lloco.model.loading import LoadedModel


@dataclass(frozen=True)
class StepOutput:
    """One new token of one request; ``reason`` ("eos", "stop", "length") when it finished the request."""

    request_id: str
    token_id: int
    finished: bool
    reason: str | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """Input of ``generate``: a compressed context (prefix embeddings [P, D] or key/value summaries
    [P, kv_width]) then prompt tokens."""

    prompt_ids: list[int]
    prefix_embeds: Tensor | None = None
    slot: int = -1
    params: SamplingParams = field(default_factory=SamplingParams)
    prefix_kv: Tensor | None = None


class PrefixCache(Protocol):
    """Where a ``Generator`` keeps prefill results of prefix embeddings: ``[layers, 2, kv_heads, P,
    head_dim]`` keys (rotated to positions 0..P-1) and values, by the caller's key. The caller bounds it."""

    def get(self, key: Hashable) -> Tensor | None: ...

    def put(self, key: Hashable, value: Tensor) -> object: ...


@dataclass(frozen=True)
class Resume:
    """Where a preempted request stopped (``Generator.preempt``), to go on from with ``Generator.add``: the
    tokens it had emitted and the seed its sampling noise was keyed by."""

    generated: tuple[int, ...]
    seed: int


@dataclass(frozen=True)
class _Launch:
    """A decode step on the device whose tokens the host has not read yet."""

    rows: list[_Row]
    batch: int
    tokens: Tensor  # pinned host buffer the step's tokens are copied into
    done: torch.cuda.Event | None  # recorded after that copy (CUDA)


@dataclass
class _Row:
    request_id: str
    index: int
    slot: int
    params: SamplingParams
    seed: int
    prefix: Tensor | None  # prefix embeddings; dropped once the whole input is in the cache
    prompt_ids: list[int]
    input_len: int  # prefix + prompt
    prefix_len: int  # positions before the prompt (embeddings or key/value summaries)
    kv: Tensor | None = None  # key/value summaries [P, kv_width] until written into the cache
    cached: Tensor | None = None  # its prefix's keys and values from the prefix cache, until written
    keep_as: Hashable | None = None  # the prefix cache's key for its prefix, until its prefill kept them
    position: int = 0  # where the next fed token sits (= tokens in the cache)
    # emitted tokens; a resumed row starts with those it had emitted before, also at the end of its prompt
    generated: list[int] = field(default_factory=list)

    @property
    def decoding(self) -> bool:
        """Its whole input is in the cache (a resumed row has generated tokens before that)."""
        return self.position >= self.input_len

    def input_embeds(self, model: Llama, start: int, end: int) -> Tensor:
        """Embeddings [end - start, D] of input positions [start, end): prefix vectors, then prompt tokens."""
        parts = []
        prefix_len = self.prefix_len
        if start < prefix_len:
            parts.append(self.prefix[start : min(end, prefix_len)])
        if end > prefix_len:
            ids = self.prompt_ids[max(start, prefix_len) - prefix_len : end - prefix_len]
            parts.append(model.embed(_on_device(ids, torch.int64, model.device)))
        return torch.cat(parts)


def _on_device(values: list[int] | list[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host list as a tensor on ``device``, without waiting for the work queued there.

    A copy from pageable memory synchronizes the stream: a step's prefill, queued after its decode launch,
    would wait for that decode to finish before launching its first kernel, and the GPU would then idle
    while the host launches the prefill. From page-locked memory the copy is queued like a kernel (the
    host allocator keeps the buffer until the copy has run).
    """
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


@dataclass(frozen=True)
class _Chunk:
    """Input positions [start, start + length) of a row, prefilled in one forward."""

    row: _Row
    start: int
    length: int


@functools.cache
def compiled_block() -> BlockFn:
    """The one ``torch.compile`` site: the layer function of the decode step, shared by all Generators (and
    all layers: weights are inputs, so one compilation per shape class serves every layer).

    Shape classes are few (batch 1 or more, adapters on or off, per model geometry) but can pass dynamo's
    default of 8 recompilations in a process holding several models; past it dynamo silently runs eager.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(Block.infer, dynamic=True)


# (batch bucket, key-length bucket, adapters on, sampling mode): one CUDA graph each
DecodeShape = tuple[int, int, bool, SampleMode]


def _bucket(n: int, granule: int, cap: int) -> int:
    return min(-(-n // granule) * granule, cap)


def _pow2_bucket(n: int, cap: int) -> int:
    return min(1 << (n - 1).bit_length(), cap)


class Generator:
    """Continuous batching: ``add`` requests, call ``step`` until they finish; rows are cache rows.

    Args:
        model: the base model (on its device and dtype).
        lora: adapter slots, or None for base-model-only serving.
        max_batch: rows of the KV cache (requests decoded at once).
        max_seq_len: prefix + prompt + generated tokens per row.
        device, dtype: must match the model's (None: take the model's).
        tokenizer: needed for stop strings; its EOS token ends requests.
        eos_token_ids: tokens that end a request (default: the model config's and the tokenizer's).
        compile: compile the layer function of the decode step (CUDA; compile time on first use).
        cuda_graphs: capture decode steps as CUDA graphs (default: on CUDA).
        fused: run batch-1 steps through the Triton kernels of ``lloco.model.fused`` (default: on CUDA for
            bf16/fp16 models when Triton is installed and the kernels support the geometry).
        max_prefill_tokens: padded tokens per prefill forward; longer batches prefill in several forwards.
        kv_bucket: key-length granularity of decode shapes (more shapes vs less padding).
        prefill_chunk_tokens: input positions prefilled per step, over all queued rows in the order they
            were added; a longer input is prefilled in chunks over several steps, each beside the step's
            decode of the other rows (chunked prefill). None: every queued row is prefilled whole in the
            step after it was added.
        prefix_cache: prefix embeddings' keys and values by ``add``'s ``prefix_key`` (the module's
            docstring), or None: every prefix is prefilled.
    """

    def __init__(
        self,
        model: Llama,
        lora: LoraSlots | None,
        max_batch: int,
        max_seq_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        tokenizer: Any = None,
        *,
        eos_token_ids: Iterable[int] | None = None,
        compile: bool = False,
        cuda_graphs: bool | None = None,
        fused: bool | None = None,
        max_prefill_tokens: int = 16384,
        kv_bucket: int = 128,
        prefill_chunk_tokens: int | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.device = resolve_device(device if device is not None else model.device)
        self.dtype = dtype or model.dtype
        if self.device != resolve_device(model.device) or self.dtype != model.dtype:
            raise InvalidArgument(
                f"model is on {model.device}/{model.dtype}, generator asked {self.device}/{self.dtype}"
            )
        if max_batch < 1 or max_seq_len < 2:
            raise InvalidArgument(
                f"max_batch must be >= 1 and max_seq_len >= 2, got {max_batch}, {max_seq_len}"
            )
        if prefill_chunk_tokens is not None and prefill_chunk_tokens < 1:
            raise InvalidArgument(f"prefill_chunk_tokens must be >= 1 or None, got {prefill_chunk_tokens}")
        if lora is not None and (lora.device != self.device or lora.dtype != self.dtype):
            raise InvalidArgument(
                f"LoRA slots on {lora.device}/{lora.dtype}, model on {self.device}/{self.dtype}"
            )
        self.model, self.lora, self.tokenizer = model, lora, tokenizer
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.max_prefill_tokens, self.kv_bucket = max_prefill_tokens, kv_bucket
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.prefix_cache = prefix_cache
        eos = set(model.config.eos_token_ids) if eos_token_ids is None else set(eos_token_ids)
        if eos_token_ids is None and tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        model.fuse_projections()
        model.ensure_positions(max_seq_len)
        self.cache = KVCache.allocate(model.config, max_batch, max_seq_len, self.device, self.dtype)
        pin = self.device.type == "cuda"
        # per-row decode inputs: tokens, positions, slots, seeds | temperature, top_p
        self._host_long = torch.zeros(4, max_batch, dtype=torch.int64, pin_memory=pin)
        self._host_float = torch.zeros(2, max_batch, dtype=torch.float32, pin_memory=pin)
        self._long = torch.zeros(4, max_batch, dtype=torch.int64, device=self.device)
        self._float = torch.zeros(2, max_batch, dtype=torch.float32, device=self.device)
        self._next = torch.zeros(max_batch, dtype=torch.int64, device=self.device)
        # two launches can be in flight (the one being read, the one chained after it)
        self._host_next = torch.zeros(2, max_batch, dtype=torch.int64, pin_memory=pin)
        self._launches = 0
        self._launched: _Launch | None = None
        self._block_fn: BlockFn = compiled_block() if compile else Block.infer
        if fused and not fused_decode.available():
            raise InvalidArgument("fused decode needs Triton (pip install triton)")
        if fused and (reason := fused_decode.supports(model)):
            raise InvalidArgument(f"fused decode cannot run this model: {reason}")
        if fused is None:  # by default where it was measured: CUDA, 16-bit weights
            fused = (
                self.device.type == "cuda"
                and self.dtype in (torch.bfloat16, torch.float16)
                and fused_decode.available()
                and fused_decode.supports(model) is None
            )
        self._fused = fused_decode.FusedDecoder(model, self.cache, lora) if fused else None
        self._use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs: dict[DecodeShape, torch.cuda.CUDAGraph] = {}
        # Decode shapes captured on first use and the host time they took (the step waits for it); those
        # of ``capture_decode_graphs`` are not counted.
        self.graph_captures = 0
        self.graph_capture_s = 0.0
        self._pool = torch.cuda.graph_pool_handle() if self._use_graphs else None
        self._free = list(range(max_batch))
        self._rows: dict[str, _Row] = {}
        self._pending: list[_Row] = []
        self._seeds = random.Random()

    # -- requests -------------------------------------------------------------------------------------

    def add(
        self,
        request_id: str,
        prefix_embeds: Tensor | None,
        prompt_ids: Sequence[int],
        slot: int = -1,
        params: SamplingParams | None = None,
        prefix_kv: Tensor | None = None,
        resume: Resume | None = None,
        prefix_key: Hashable | None = None,
    ) -> None:
        """Queue a request; it is prefilled at the next ``step``.

        Args:
            request_id: unique among running requests.
            prefix_embeds: [P, D] embeddings placed before the prompt (compressed contexts), or None.
            prefix_kv: [P, kv_width] key/value summaries placed before the prompt instead (needs prompt
                tokens: the first token is sampled after the prompt's last), or None.
            prompt_ids: prompt token ids.
            slot: LoRA slot, -1 for the base model.
            params: sampling parameters (default greedy, 256 tokens).
            resume: a preempted request going on (``preempt``), with the same other arguments: the tokens
                it had emitted are prefilled after the prompt and count as generated, so stop strings and
                ``max_new_tokens`` apply across the cut and it emits what it would have without it (its
                seed kept; greedy rows token for token, up to the numerics of prefill against decode).
            prefix_key: names ``prefix_embeds`` and the adapter in ``slot`` for the prefix cache (they must
                be the same whenever the key is): a hit skips the prefix's prefill, a miss keeps its keys
                and values. Ignored without a prefix cache, prefix embeddings or prompt tokens.
        Raises:
            AlreadyExists: the id is running. ResourceExhausted: no free row.
            InvalidArgument: empty input, too long for max_seq_len, bad slot, token ids or prefix shape.
        """
        params = params or SamplingParams()
        if request_id in self._rows:
            raise AlreadyExists(f"request {request_id!r} is already running")
        vocab = self.model.config.vocab_size
        generated = list(resume.generated) if resume is not None else []
        if len(generated) >= params.max_new_tokens:
            raise InvalidArgument(f"a resumed request must have fewer than {params.max_new_tokens} tokens")
        prompt = [int(t) for t in prompt_ids] + generated
        if any(not 0 <= t < vocab for t in prompt):
            raise InvalidArgument(f"prompt token ids must be in [0, {vocab})")
        if prefix_embeds is not None:
            if prefix_embeds.ndim != 2 or prefix_embeds.shape[1] != self.model.config.dim:
                raise InvalidArgument(
                    f"prefix embeddings must be [P, {self.model.config.dim}], got {tuple(prefix_embeds.shape)}"
                )
            prefix_embeds = prefix_embeds.to(device=self.device, dtype=self.dtype)
        if prefix_kv is not None:
            width = kv_width(self.model.config)
            if prefix_embeds is not None or not prompt or prefix_kv.ndim != 2 or prefix_kv.shape[1] != width:
                raise InvalidArgument(
                    f"key/value summaries must be [P, {width}], alone and before prompt tokens, got "
                    f"{tuple(prefix_kv.shape)} with {len(prompt)} prompt tokens"
                    + (" and prefix embeddings" if prefix_embeds is not None else "")
                )
            prefix_kv = prefix_kv.to(device=self.device, dtype=self.dtype)
        prefix = prefix_embeds if prefix_kv is None else prefix_kv
        prefix_len = 0 if prefix is None else prefix.shape[0]
        row = _Row(
            request_id,
            -1,
            slot,
            params,
            0,
            prefix_embeds,
            prompt,
            prefix_len + len(prompt),
            prefix_len,
            prefix_kv,
            generated=generated,
        )
        input_len = row.input_len - len(generated)
        if input_len == 0:
            raise InvalidArgument("a request needs prefix embeddings or prompt tokens")
        if input_len + params.max_new_tokens > self.max_seq_len:
            raise InvalidArgument(
                f"{input_len} input + {params.max_new_tokens} new tokens exceed max_seq_len {self.max_seq_len}"
            )
        if slot != -1 and (self.lora is None or not 0 <= slot < self.lora.n_slots):
            raise InvalidArgument(f"LoRA slot {slot} does not exist")
        if params.stop and self.tokenizer is None:
            raise InvalidArgument("stop strings need a generator with a tokenizer")
        if not self._free:
            raise ResourceExhausted(f"all {self.max_batch} rows are busy")
        if prefix_key is not None and prefix_embeds is not None and prompt and self.prefix_cache is not None:
            row.cached = self.prefix_cache.get(prefix_key)
            if row.cached is None:
                row.keep_as = prefix_key
            else:
                row.prefix = None  # its keys and values come from the cache
        row.index = heapq.heappop(self._free)
        if resume is not None:
            row.seed = resume.seed
        else:
            row.seed = params.seed if params.seed is not None else self._seeds.getrandbits(62)
        self._rows[request_id] = row
        self._pending.append(row)

    def cancel(self, request_id: str) -> None:
        """Stop a request and free its row; finished or unknown ids are ignored."""
        self._drop(request_id)

    def preempt(self, request_id: str) -> Resume:
        """Stop a running request and free its row, returning where it stopped: ``add`` with ``resume``
        goes on from there, recomputing its keys. The token of a decode step in flight for it is dropped
        unread (never emitted), so it goes on right after the last token it emitted.

        Raises:
            FailedPrecondition: the request is not running (finished or unknown).
        """
        row = self._drop(request_id)
        if row is None:
            raise FailedPrecondition(f"request {request_id!r} is not running")
        return Resume(tuple(row.generated), row.seed)

    def _drop(self, request_id: str) -> _Row | None:
        row = self._rows.pop(request_id, None)
        if row is None:
            return None
        if row in self._pending:
            self._pending.remove(row)
        heapq.heappush(self._free, row.index)
        return row

    def active(self) -> int:
        """Requests queued or decoding."""
        return len(self._rows)

    def free_rows(self) -> int:
        return len(self._free)

    # -- stepping -------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        """Advance every decoding request by one token and prefill queued input.

        Emits the tokens of the decode step launched by the previous call; before reading them, launches
        the next decode step chained on the device if the same requests are still running and none is
        queued. Otherwise launches it from the host's view of the rows after emitting, then prefills the
        queued rows in the order they were added, at most ``prefill_chunk_tokens`` input positions in all
        (every queued row whole without a budget); a row whose whole input is in the cache gets its first
        token. So while a long input is prefilled chunk by chunk, every decoding row still gets a token
        per step.
        """
        outputs: list[StepOutput] = []
        self._place_prefixes()
        previous, self._launched = self._launched, None
        if previous is not None and self._can_chain(previous):
            self._launched = self._launch(previous.rows, chained=True)
        if previous is not None:
            outputs += self._read(previous)
        if self._launched is None:
            decoding = [row for row in self._rows.values() if row.decoding]
            if decoding:
                self._launched = self._launch(decoding, chained=False)
            chunks = self._prefill_chunks()
            while chunks:
                outputs += self._prefill(self._take_forward(chunks))
        return outputs

    def _place_prefixes(self) -> None:
        """Write queued rows' key/value summaries, or their prefixes' cached keys and values, into their
        cache rows; their prefill starts after them.

        Runs before this step's decode launch, so that launch's inputs put such a row's padding key at its
        first prompt position (overwritten by its prefill), not inside the prefix; launches already on the
        device ran earlier on the stream.
        """
        for row in self._pending:
            if row.kv is not None:
                layers = rotated_prefix(self.model, row.kv)
            elif row.cached is not None:
                layers = row.cached
            else:
                continue
            for layer, (keys, values) in enumerate(layers):
                self.cache.k[layer][row.index, :, : row.prefix_len] = keys
                self.cache.v[layer][row.index, :, : row.prefix_len] = values
            row.position, row.kv, row.cached = row.prefix_len, None, None

    def _keep_prefix(self, row: _Row) -> None:
        """Put the keys and values of the row's prefix, just prefilled, into the prefix cache; when the device
        has no room for the copy beside the KV cache the prefix is not kept (the cache saves work, it is
        never needed)."""
        end = row.prefix_len
        key, row.keep_as = row.keep_as, None
        keys = self.cache.k[0]
        try:  # one allocation, the entry's size (stacking per layer would hold each layer twice)
            kept = keys.new_empty((len(self.cache.k), 2, keys.shape[1], end, keys.shape[3]))
        except torch.OutOfMemoryError:
            return
        for layer, (k, v) in enumerate(zip(self.cache.k, self.cache.v, strict=True)):
            kept[layer, 0] = k[row.index, :, :end]
            kept[layer, 1] = v[row.index, :, :end]
        self.prefix_cache.put(key, kept)

    def _can_chain(self, launch: _Launch) -> bool:
        """No request queued, the launch's rows are exactly the running decoding rows, and none of them
        ends by length with the launch's token (so a chained step is only wasted on an EOS or stop)."""
        if self._pending or any(self._rows.get(row.request_id) is not row for row in launch.rows):
            return False
        if any(len(row.generated) + 1 >= row.params.max_new_tokens for row in launch.rows):
            return False
        return sum(1 for row in self._rows.values() if row.decoding) == len(launch.rows)

    def _prefill_chunks(self) -> list[_Chunk]:
        """This step's prefill work: the queued rows' next input positions, in the order the rows were
        added, within the step's budget (the last row taken may get only part of its rest)."""
        budget = self.prefill_chunk_tokens
        chunks = []
        for row in self._pending:
            length = row.input_len - row.position
            if budget is not None:
                if budget == 0:
                    break
                length = min(length, budget)
                budget -= length
            chunks.append(_Chunk(row, row.position, length))
        return chunks

    def _take_forward(self, chunks: list[_Chunk]) -> list[_Chunk]:
        """The leading chunks that fit one forward of ``max_prefill_tokens`` padded tokens (at least one)."""
        group: list[_Chunk] = []
        longest = 0
        for chunk in chunks:
            longest = max(longest, chunk.length)
            if group and longest * (len(group) + 1) > self.max_prefill_tokens:
                break
            group.append(chunk)
        del chunks[: len(group)]
        return group

    def _prefill(self, chunks: list[_Chunk]) -> list[StepOutput]:
        """One prefill forward over ``chunks``; rows whose input is then complete sample their first token.

        Chunks that all start at position 0 attend over the batch alone (no cache read); others read
        their rows' cached keys. Either way a row's keys and first token do not depend on how its input
        was cut into chunks, nor on the other rows of the forward.
        """
        lengths = [chunk.length for chunk in chunks]
        embeds = torch.zeros(
            len(chunks), max(lengths), self.model.config.dim, device=self.device, dtype=self.dtype
        )
        for i, chunk in enumerate(chunks):
            embeds[i, : chunk.length] = chunk.row.input_embeds(
                self.model, chunk.start, chunk.start + chunk.length
            )
        rows = [chunk.row for chunk in chunks]
        slots = [row.slot for row in rows]
        lora = None
        if self.lora is not None and any(slot >= 0 for slot in slots):
            lora = self.lora.batch(self._long_tensor(slots))
        last = self._long_tensor(lengths) - 1
        indexes = self._long_tensor([row.index for row in rows])
        if any(chunk.start for chunk in chunks):
            starts = self._long_tensor([chunk.start for chunk in chunks])
            kv_len = max(chunk.start + chunk.length for chunk in chunks)
            logits = self.model.prefill(embeds, self.cache, indexes, last, lora, starts, kv_len)
        else:
            logits = self.model.prefill(embeds, self.cache, indexes, last, lora)
        complete = []
        for i, chunk in enumerate(chunks):
            chunk.row.position += chunk.length
            if chunk.row.keep_as is not None and chunk.row.position >= chunk.row.prefix_len:
                self._keep_prefix(chunk.row)
            if chunk.row.position == chunk.row.input_len:
                complete.append(i)
        if not complete:
            return []
        rows = [rows[i] for i in complete]
        for row in rows:
            self._pending.remove(row)
            row.prefix = None  # in the cache now
        params = [row.params for row in rows]
        tokens = sample(
            logits[self._long_tensor(complete)],
            _on_device([p.temperature for p in params], torch.float32, self.device),
            _on_device([p.top_p for p in params], torch.float32, self.device),
            self._long_tensor([row.seed for row in rows]),
            self._long_tensor([row.input_len for row in rows]),
            self._mode(params),
        ).tolist()
        return [self._emit(row, token) for row, token in zip(rows, tokens, strict=True)]

    def _launch(self, rows: list[_Row], chained: bool) -> _Launch:
        """Start a decode step for ``rows`` without waiting for it.

        Chained: the same rows as the previous launch, each feeding the token that launch produces (still
        on the device) one position further. Otherwise the inputs come from the host's rows.
        """
        batch = _pow2_bucket(max(row.index for row in rows) + 1, self.max_batch)
        kv_len = _bucket(max(row.position for row in rows) + 1, self.kv_bucket, self.max_seq_len)
        if chained:
            self._long[0, :batch].copy_(self._next[:batch])
            self._long[1, :batch] += 1
        else:
            self._write_inputs(rows, batch)
        use_lora = self.lora is not None and any(row.slot >= 0 for row in rows)
        key: DecodeShape = (batch, kv_len, use_lora, self._mode([row.params for row in rows]))
        if self._use_graphs:
            self._replay(key)
        else:
            self._decode_body(*key)
        tokens = self._host_next[self._launches % 2]
        self._launches += 1
        tokens[:batch].copy_(self._next[:batch], non_blocking=True)
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        for row in rows:
            row.position += 1
        return _Launch(rows, batch, tokens, done)

    def _write_inputs(self, rows: list[_Row], batch: int) -> None:
        """Per-row decode inputs from the host (rows' last tokens, positions, slots, seeds, sampling)."""
        host_long, host_float = self._host_long.numpy(), self._host_float.numpy()
        host_long[:, :batch] = 0
        host_long[2, :batch] = -1
        host_float[:, :batch] = 0
        index = [row.index for row in rows]
        host_long[:, index] = [
            [row.generated[-1] for row in rows],
            [row.position for row in rows],
            [row.slot for row in rows],
            [row.seed for row in rows],
        ]
        # Every row below `batch` is decoded; one that is not decoding writes a key at its position. A row
        # part-way through its prefill gets the position its next chunk writes first, so its cached
        # keys stay intact (free rows and rows not started yet take position 0).
        for row in self._pending:
            if row.index < batch:
                host_long[1, row.index] = row.position
        host_float[:, index] = [[row.params.temperature for row in rows], [row.params.top_p for row in rows]]
        self._long[:, :batch].copy_(self._host_long[:, :batch], non_blocking=True)
        self._float[:, :batch].copy_(self._host_float[:, :batch], non_blocking=True)

    def _read(self, launch: _Launch) -> list[StepOutput]:
        """Wait for a launched step's tokens and emit them for its rows that are still running."""
        if launch.done is not None:
            launch.done.synchronize()
        tokens = launch.tokens[: launch.batch].tolist()
        return [
            self._emit(row, tokens[row.index]) for row in launch.rows if self._rows.get(row.request_id) is row
        ]

    @torch.no_grad()
    def _decode_body(self, batch: int, kv_len: int, use_lora: bool, mode: SampleMode) -> None:
        """The static-shape decode step: reads the per-row input buffers, writes ``_next``.

        Without gradients whoever calls it: under grad mode the compiled layer function recompiles for it
        (inside a CUDA graph capture, where compiling fails) and every activation is kept for a backward
        pass that never comes (a batch-8 capture of a 7B model ran out of 80 GB)."""
        tokens, positions, slots, seeds = self._long[:, :batch]
        if self._fused is not None and batch == 1:
            logits = self._fused.logits_of(tokens, positions, kv_len, slots if use_lora else None)
        else:
            lora = self.lora.batch(slots) if use_lora else None
            logits = self.model.decode(tokens, positions, self.cache, kv_len, lora, self._block_fn)
        temperature, top_p = self._float[:, :batch]
        self._next[:batch].copy_(sample(logits, temperature, top_p, seeds, positions + 1, mode))

    def warm_up(self, prompt_ids: Sequence[int]) -> None:
        """Run a short request through each shape class that compiles apart (one row or two, adapters off
        and on) while no request runs: prefill, sampling and, on a GPU, the decode step's compilation.
        Slot 0 may be empty (zero weights): its rows then compute what the base model does."""
        params = SamplingParams(max_new_tokens=2)
        for rows in sorted({1, min(2, self.max_batch)}):
            for slot in (-1, 0) if self.lora is not None else (-1,):
                for row in range(rows):
                    self.add(f"warm-up-{rows}-{slot}-{row}", None, prompt_ids, slot, params)
                while self.active():
                    self.step()

    def decode_shapes(self, modes: Iterable[SampleMode] = ("greedy",)) -> list[DecodeShape]:
        """Every shape class a decode step of ``modes`` can run in: (batch bucket, key-length bucket,
        adapters on, sampling mode), the keys of its CUDA graphs."""
        batches = sorted({_pow2_bucket(n, self.max_batch) for n in range(1, self.max_batch + 1)})
        kv_lens = sorted(
            {
                _bucket(n, self.kv_bucket, self.max_seq_len)
                for n in range(1, self.max_seq_len + 1, self.kv_bucket)
            }
        )
        adapters = (False, True) if self.lora is not None else (False,)
        return [
            (batch, kv_len, use_lora, mode)
            for mode in modes
            for use_lora in adapters
            for batch in batches
            for kv_len in kv_lens
        ]

    @torch.no_grad()
    def capture_decode_graphs(self, modes: Iterable[SampleMode] = ("greedy",)) -> int:
        """Capture the CUDA graph of every decode shape class of ``modes`` now, before requests run.

        A shape met first while serving is captured then, and the step waits for it: every running row's
        next token, and the first token of the rows that joined, come that much later. A server captures
        the classes it will meet at start instead. Returns how many were captured (0 without CUDA graphs).
        Raises FailedPrecondition while requests run (a capture writes keys into every row it covers).
        """
        if not self._use_graphs:
            return 0
        if self._rows:
            raise FailedPrecondition("decode graphs are captured before requests start")
        # inputs of idle rows: token 0 at position 0, no adapter, greedy
        self._long.zero_()
        self._long[2].fill_(-1)
        self._float.zero_()
        missing = [key for key in self.decode_shapes(modes) if key not in self._graphs]
        for key in missing:
            self._graphs[key] = self._capture(key)
        torch.cuda.synchronize(self.device)
        return len(missing)

    def _replay(self, key: DecodeShape) -> None:
        graph = self._graphs.get(key)
        if graph is None:
            started = time.perf_counter()
            graph = self._graphs[key] = self._capture(key)
            self.graph_captures += 1
            self.graph_capture_s += time.perf_counter() - started
        graph.replay()

    def _capture(self, key: DecodeShape) -> torch.cuda.CUDAGraph:
        # Warm up outside capture (compilation, autotuning); it computes what the replay recomputes.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._decode_body(*key)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # A server captures while other threads work on the GPU (a query's context copied in, an adapter
        # pinned): "thread_local" keeps their calls from invalidating this capture.
        try:
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                self._decode_body(*key)
        except RuntimeError as error:  # CUDA reports where the capture ended, not which step broke it
            raise Internal(
                f"capturing the decode step of shape {key} (batch, key length, adapters, sampling) as a "
                f"CUDA graph failed: {error}"
            ) from error
        return graph

    def _long_tensor(self, values: list[int]) -> Tensor:
        return _on_device(values, torch.int64, self.device)

    @staticmethod
    def _mode(params: list[SamplingParams]) -> SampleMode:
        sampling = [p for p in params if p.temperature > 0]
        if not sampling:
            return "greedy"
        return "top_p" if any(p.top_p < 1 for p in sampling) else "sample"

    def _emit(self, row: _Row, token: int) -> StepOutput:
        row.generated.append(token)
        reason = None
        if token in self.eos_token_ids:
            reason = "eos"
        elif row.params.stop and self._hit_stop(row):
            reason = "stop"
        elif len(row.generated) >= row.params.max_new_tokens:
            reason = "length"
        if reason is not None:
            self._rows.pop(row.request_id)
            heapq.heappush(self._free, row.index)
        return StepOutput(row.request_id, token, reason is not None, reason)

    def _hit_stop(self, row: _Row) -> bool:
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        return any(s in text for s in row.params.stop)


def generate(
    gen_or_model: Generator | LoadedModel,
    requests: Sequence[GenerationRequest],
    tokenizer: Any = None,
    max_batch: int = 8,
) -> list[str]:
    """Run requests to completion (continuous batching) and return their texts, cut at stop strings.

    Given a ``LoadedModel``, builds a base-model Generator sized for the requests; given an idle Generator,
    uses its rows and adapters.

    Raises:
        FailedPrecondition: the Generator is running other requests (their tokens would be lost here).
    """
    if isinstance(gen_or_model, Generator):
        gen = gen_or_model
        if gen.active():
            raise FailedPrecondition(f"generate needs an idle Generator; {gen.active()} requests are running")
        tokenizer = tokenizer or gen.tokenizer
    else:
        tokenizer = tokenizer or gen_or_model.tokenizer
        needed = max(
            sum(p.shape[0] for p in (r.prefix_embeds, r.prefix_kv) if p is not None)
            + len(r.prompt_ids)
            + r.params.max_new_tokens
            for r in requests
        )
        gen = Generator(gen_or_model.model, None, min(max_batch, len(requests)), needed, tokenizer=tokenizer)
    if tokenizer is None:
        raise InvalidArgument("generate needs a tokenizer to return texts")
    run = uuid.uuid4().hex[:8]
    ids = {f"{run}-{i}": i for i in range(len(requests))}
    queue = deque(ids.items())
    tokens: dict[int, list[int]] = {i: [] for i in ids.values()}
    finished: set[int] = set()
    while len(finished) < len(requests):
        while queue and gen.free_rows():
            request_id, i = queue.popleft()
            request = requests[i]
            gen.add(
                request_id,
                request.prefix_embeds,
                request.prompt_ids,
                request.slot,
                request.params,
                request.prefix_kv,
            )
        for out in gen.step():
            i = ids[out.request_id]
            if out.reason != "eos":
                tokens[i].append(out.token_id)
            if out.finished:
                finished.add(i)
    return [
        truncate_at_stop(tokenizer.decode(tokens[i], skip_special_tokens=True), requests[i].params.stop)
        for i in range(len(requests))
    ]
