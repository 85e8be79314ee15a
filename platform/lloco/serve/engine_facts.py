"""What the edge learns from the engine once: its tokenizer (limits count the tokens the engine will see,
and queries are tokenized once, at the edge), its compressor id (the key contexts and retrieval indexes
are stored under), the compressor's summary vectors per segment (a corpus query's budget counts them) and
what an adapter must fit to be served (imported adapters are checked against it before they are
published). All are fixed for the app's life, so one fetch per replica serves every call."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from lloco.model import LoraFit


class EngineFacts:
    """The engine's tokenizer, compressor id, summary vectors per segment and adapter fit, fetched on first
    use."""

    def __init__(self, engine: DeploymentHandle) -> None:
        self._engine = engine
        self._facts: tuple[Any, str, int] | None = None
        self._lora_fit: LoraFit | None = None
        self._lock = asyncio.Lock()

    async def _fetch(self) -> tuple[Any, str, int]:
        async with self._lock:
            if self._facts is None:
                self._facts = (
                    await self._engine.tokenizer.remote(),
                    await self._engine.compressor_id.remote(),
                    await self._engine.summary_vectors.remote(),
                )
        return self._facts

    async def tokenizer(self) -> Any:
        """The engine's tokenizer."""
        return (await self._fetch())[0]

    async def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` as the engine counts them."""
        tokenizer = await self.tokenizer()
        return await asyncio.to_thread(lambda: len(tokenizer(text, add_special_tokens=False)["input_ids"]))

    async def compressor_id(self) -> str:
        """The id the engine's contexts are stored under."""
        return (await self._fetch())[1]

    async def summary_vectors(self) -> int:
        """Summary vectors each segment of a context holds (the compressor's k)."""
        return (await self._fetch())[2]

    async def lora_fit(self) -> LoraFit:
        """What an adapter must fit to be served: the model's geometry and id, the slots' rank and targets."""
        async with self._lock:
            if self._lora_fit is None:
                self._lora_fit = await self._engine.lora_fit.remote()
        return self._lora_fit
