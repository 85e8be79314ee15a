"""What the edge learns from the engine once: its tokenizer (limits count the tokens the engine will see,
and queries are tokenized once, at the edge) and its compressor id (the key contexts are stored under).
Both are fixed for the app's life, so one fetch per replica serves every call."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle


class EngineFacts:
    """The engine's tokenizer and compressor id, fetched on first use."""

    def __init__(self, engine: DeploymentHandle) -> None:
        self._engine = engine
        self._facts: tuple[Any, str] | None = None
        self._lock = asyncio.Lock()

    async def _fetch(self) -> tuple[Any, str]:
        async with self._lock:
            if self._facts is None:
                self._facts = (
                    await self._engine.tokenizer.remote(),
                    await self._engine.compressor_id.remote(),
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
