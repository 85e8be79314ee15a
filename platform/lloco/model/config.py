"""Model geometry of a Llama-family decoder, read from a Hugging Face config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lloco.errors import InvalidArgument

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class LlamaConfig:
    """Everything our forward needs to know about a checkpoint; nothing about how it runs."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    head_dim: int = 0
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None  # Mistral-style local attention; longer sequences are refused

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        for name in (
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "intermediate_size",
            "head_dim",
        ):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise InvalidArgument(
                f"model config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.hidden_act != "silu":
            raise InvalidArgument(
                f"model config: activation {self.hidden_act!r} is not supported (silu only)"
            )
        rope_type = self.rope_type
        if rope_type not in ROPE_TYPES:
            raise InvalidArgument(
                f"model config: rope type {rope_type!r} is not supported (one of {ROPE_TYPES})"
            )
        self.eos_token_ids = tuple(self.eos_token_ids)

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf_config: Any) -> LlamaConfig:
        """From a transformers ``LlamaConfig`` (or MistralConfig...) or its ``config.json`` dict.

        Raises:
            InvalidArgument: the architecture is not Llama-like (missing fields, unsupported RoPE).
        """
        raw = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        try:
            rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
            theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10_000.0)))
            if rope.get("rope_type", rope.get("type", "default")) == "default":
                rope = {}
            eos = raw.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (int(eos),))
            n_heads = int(raw["num_attention_heads"])
            return cls(
                vocab_size=int(raw["vocab_size"]),
                dim=int(raw["hidden_size"]),
                n_layers=int(raw["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
                intermediate_size=int(raw["intermediate_size"]),
                rope_theta=theta,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                rope_scaling=rope or None,
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=eos_ids,
                head_dim=int(raw.get("head_dim") or 0),
                attention_bias=bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                hidden_act=str(raw.get("hidden_act", "silu")),
                sliding_window=raw.get("sliding_window") if raw.get("use_sliding_window", True) else None,
            )
        except KeyError as exc:
            raise InvalidArgument(f"model config lacks {exc.args[0]!r}: not a Llama-family config") from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain fields plus ``model_type`` so peft recognises the architecture (default target modules)."""
        return {**dataclasses.asdict(self), "model_type": "llama"}
