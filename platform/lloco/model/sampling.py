"""How a request samples: its parameters, the on-device sampler and stop-string cuts.

The sampler takes per-row temperature, top-p and seed tensors, so one batch mixes greedy and sampled rows
without host syncs; its noise is a hash of (seed, position, token id) instead of an RNG state, so a row's
tokens do not depend on which other rows share its batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lloco.errors import InvalidArgument

SampleMode = Literal["greedy", "sample", "top_p"]
_M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples; temperature 0 is greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InvalidArgument(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise InvalidArgument("stop strings must not be empty")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidArgument(f"seed must be in [0, 2**63), got {self.seed}")


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash on int64 tensors holding values in [0, 2**32) (products stay below 2**63)."""
    x = ((x >> 16) ^ x) * _MIX & _M32
    x = ((x >> 16) ^ x) * _MIX & _M32
    return (x >> 16) ^ x


def gumbel_noise(seeds: Tensor, positions: Tensor, vocab_size: int) -> Tensor:
    """Gumbel(0, 1) noise [B, V], a pure function of (seed, position, token id): no RNG state, no host sync."""
    key = _mix32((seeds & _M32) ^ _mix32((seeds >> 32) & _M32))
    key = _mix32(key ^ _mix32(positions & _M32))
    ids = _mix32(torch.arange(vocab_size, device=seeds.device, dtype=torch.int64))
    bits = _mix32(key[:, None] ^ ids[None, :])
    uniform = ((bits >> 8).float() + 0.5) / float(1 << 24)
    return -torch.log(-torch.log(uniform))


def sample(
    logits: Tensor, temperature: Tensor, top_p: Tensor, seeds: Tensor, positions: Tensor, mode: SampleMode
) -> Tensor:
    """Next tokens [B] from fp32 logits [B, V] and per-row temperature/top_p/seed; temperature 0 rows are greedy.

    ``positions`` [B] are the positions of the tokens being sampled (they key the noise).
    """
    greedy = logits.argmax(-1)
    if mode == "greedy":
        return greedy
    scaled = logits / temperature.clamp_min(1e-6)[:, None]
    if mode == "top_p":
        ordered = scaled.sort(-1, descending=True).values
        probs = ordered.softmax(-1)
        kept = (probs.cumsum(-1) - probs < top_p[:, None]) | (top_p[:, None] >= 1)
        cutoff = ordered.masked_fill(~kept, float("inf")).amin(-1, keepdim=True)
        scaled = scaled.masked_fill(scaled < cutoff, float("-inf"))
    sampled = (scaled + gumbel_noise(seeds, positions, logits.shape[-1])).argmax(-1)
    return torch.where(temperature > 0, sampled, greedy)


def truncate_at_stop(text: str, stop: Iterable[str]) -> str:
    """Text before the earliest stop string (all of it when none occurs)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]
