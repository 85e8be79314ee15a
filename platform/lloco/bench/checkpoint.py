"""Random checkpoints on disk and synthetic documents, for benchmarks of what loads a model by path (the
compress and finetune jobs, the serving stack)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lloco.bench.common import GEOMETRIES, PAPER_K, PAPER_SEGMENT_LEN, padded_tokenizer

WORDS = (
    "paris",
    "france",
    "river",
    "capital",
    "tenant",
    "document",
    "summary",
    "vector",
    "the",
    "of",
    "is",
    "a",
)


def document_text(seed: int, tokenizer: Any, tokens: int) -> str:
    """Deterministic words that tokenize to about ``tokens`` tokens."""
    from lloco.compress.steps import tokenize

    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(tokens)]
    per_word = len(tokenize(tokenizer, " ".join(words[:200]))) / 200
    return " ".join(words[: int(tokens / per_word)])


@dataclass(frozen=True)
class Geometry:
    """A model geometry with a compressor's segment length S and summary length k."""

    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    vocab_size: int
    segment_len: int
    k: int

    @classmethod
    def named(cls, name: str, label: str, segment_len: int, k: int) -> Geometry:
        return cls(label, segment_len=segment_len, k=k, **GEOMETRIES[name])

    @classmethod
    def of_checkpoint(cls, model_dir: Path, label: str, segment_len: int, k: int) -> Geometry:
        raw = json.loads((model_dir / "config.json").read_text())
        return cls(
            label,
            raw["hidden_size"],
            raw["num_hidden_layers"],
            raw["num_attention_heads"],
            raw["num_key_value_heads"],
            raw["intermediate_size"],
            raw["vocab_size"],
            segment_len,
            k,
        )

    def matmul_params(self) -> int:
        """Weights of the linear layers a forward runs (no embedding lookup, no LM head)."""
        head_dim = self.dim // self.n_heads
        attention = (
            self.dim * (self.n_heads + 2 * self.n_kv_heads) * head_dim + self.n_heads * head_dim * self.dim
        )
        return self.n_layers * (attention + 3 * self.dim * self.intermediate_size)


LLAMA2_7B = Geometry.named("llama2-7b", "llama-2-7b (random bf16)", PAPER_SEGMENT_LEN, PAPER_K)


def write_random_llama(path: Path, geometry: Geometry, device: torch.device) -> Path:
    """An HF Llama checkpoint with random bf16 weights of ``geometry`` (one shard per layer) + the tiny
    tokenizer padded to the vocabulary; kept when ``path`` already holds one."""
    from safetensors.torch import save_file

    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(0)
    head_dim = geometry.dim // geometry.n_heads

    def weight(rows: int, cols: int) -> torch.Tensor:
        values = torch.randn(rows, cols, generator=generator, device=device, dtype=torch.bfloat16)
        return (values * 0.02).cpu()

    def ones() -> torch.Tensor:
        return torch.ones(geometry.dim, dtype=torch.bfloat16)

    save_file(
        {
            "model.embed_tokens.weight": weight(geometry.vocab_size, geometry.dim),
            "lm_head.weight": weight(geometry.vocab_size, geometry.dim),
            "model.norm.weight": ones(),
        },
        path / "model-outer.safetensors",
    )
    for layer in range(geometry.n_layers):
        prefix = f"model.layers.{layer}."
        save_file(
            {
                prefix + "self_attn.q_proj.weight": weight(geometry.n_heads * head_dim, geometry.dim),
                prefix + "self_attn.k_proj.weight": weight(geometry.n_kv_heads * head_dim, geometry.dim),
                prefix + "self_attn.v_proj.weight": weight(geometry.n_kv_heads * head_dim, geometry.dim),
                prefix + "self_attn.o_proj.weight": weight(geometry.dim, geometry.n_heads * head_dim),
                prefix + "mlp.gate_proj.weight": weight(geometry.intermediate_size, geometry.dim),
                prefix + "mlp.up_proj.weight": weight(geometry.intermediate_size, geometry.dim),
                prefix + "mlp.down_proj.weight": weight(geometry.dim, geometry.intermediate_size),
                prefix + "input_layernorm.weight": ones(),
                prefix + "post_attention_layernorm.weight": ones(),
            },
            path / f"model-layer-{layer:03d}.safetensors",
        )
    tokenizer = padded_tokenizer(geometry.vocab_size)
    tokenizer.save_pretrained(path)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": geometry.dim,
        "intermediate_size": geometry.intermediate_size,
        "num_hidden_layers": geometry.n_layers,
        "num_attention_heads": geometry.n_heads,
        "num_key_value_heads": geometry.n_kv_heads,
        "vocab_size": geometry.vocab_size,
        "max_position_embeddings": 65536,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "torch_dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))  # last: marks the checkpoint complete
    return path
