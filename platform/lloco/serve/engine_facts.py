"""What the edge learns from the engine once: its tokenizer (limits count the tokens the engine will see,
and queries and ingested documents are tokenized once, at the edge), its compressor id (the key contexts
and retrieval indexes are stored under), the compressor's segment length (a document ingested is cut into
segments here, as the compressor cuts it, so online compression takes it as it is) and summary vectors
per segment (a corpus query's budget counts them) and what an adapter must fit to be served (imported
adapters are checked against it before they are published). All are fixed for the app's life, so one
fetch per replica serves every call."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, NamedTuple

from lloco.compress import tokenize_segments

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from lloco.model import LoraFit
    from lloco.registry import Segment


class _Facts(NamedTuple):
    tokenizer: Any
    compressor_id: str
    segment_len: int
    summary_vectors: int


class EngineFacts:
    """The engine's tokenizer, compressor id, segment length, summary vectors per segment and adapter fit,
    fetched on first use."""

    def __init__(self, engine: DeploymentHandle) -> None:
        self._engine = engine
        self._facts: _Facts | None = None
        self._lora_fit: LoraFit | None = None
        self._lock = asyncio.Lock()

    async def _fetch(self) -> _Facts:
        async with self._lock:
            if self._facts is None:
                self._facts = _Facts(
                    tokenizer=await self._engine.tokenizer.remote(),
                    compressor_id=await self._engine.compressor_id.remote(),
                    segment_len=await self._engine.segment_len.remote(),
                    summary_vectors=await self._engine.summary_vectors.remote(),
                )
        return self._facts

    async def tokenizer(self) -> Any:
        """The engine's tokenizer."""
        return (await self._fetch()).tokenizer

    async def tokenize_document(self, text: str) -> tuple[list[int], tuple[Segment, ...]]:
        """A document's token ids as the engine counts and compresses them, and its segment table as the
        compressor cuts it (`lloco.compress.tokenize_segments`)."""
        facts = await self._fetch()
        return await asyncio.to_thread(tokenize_segments, facts.tokenizer, text, facts.segment_len)

    async def compressor_id(self) -> str:
        """The id the engine's contexts are stored under."""
        return (await self._fetch()).compressor_id

    async def summary_vectors(self) -> int:
        """Summary vectors each segment of a context holds (the compressor's k)."""
        return (await self._fetch()).summary_vectors

    async def lora_fit(self) -> LoraFit:
        """What an adapter must fit to be served: the model's geometry and id, the slots' rank and targets."""
        async with self._lock:
            if self._lora_fit is None:
                self._lora_fit = await self._engine.lora_fit.remote()
        return self._lora_fit
