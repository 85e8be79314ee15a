"""Llama-family decoder in plain PyTorch, one layer implementation for training, compression and serving.

Parameter names equal Hugging Face ``LlamaForCausalLM``'s (``model.layers.N.self_attn.q_proj.weight``...),
so HF checkpoints load as they are and peft adapters trained on this module carry HF's keys.

Two paths through the same weights:

- ``forward(embeds)`` calls the ``nn.Linear`` modules, so autograd and ``peft.get_peft_model`` work.
- ``hidden`` / ``prefill`` / ``decode`` (inference) use fused q|k|v and gate|up weights (views shared with
  the modules, see ``fuse_projections``), multi-LoRA slots, and a static KV cache with per-row positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lloco.errors import InvalidArgument
from lloco.model.config import LlamaConfig

if TYPE_CHECKING:
    from lloco.model.lora import LayerLora, LoraBatch

try:  # optional: used for causal prefill on CUDA when installed (the `gpu` extra)
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


def resolve_device(device: torch.device | str) -> torch.device:
    """A device with its index ("cuda" -> "cuda:N" of the current device), so devices compare equal."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, cast back before the weight (as HF does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_frequencies(config: LlamaConfig) -> Tensor:
    """Inverse RoPE frequencies [head_dim/2] in fp32, with linear or llama3 scaling applied."""
    hd = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = config.rope_scaling or {}
    if config.rope_type == "linear":
        return inv / float(scaling["factor"])
    if config.rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    return inv


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, hd]; cos, sin: [B or 1, T, hd] in x's dtype."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of a right-padded batch: q [B, H, T, hd], k/v [B, Hkv, T, hd] -> [B, H, T, hd].

    Right padding needs no mask: a real position never attends to a later (padded) one.
    """
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


@dataclass(frozen=True)
class KVCache:
    """Preallocated keys and values, one [max_batch, n_kv_heads, max_seq_len, head_dim] pair per layer."""

    k: list[Tensor]
    v: list[Tensor]

    @classmethod
    def allocate(
        cls, config: LlamaConfig, max_batch: int, max_seq_len: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        shape = (max_batch, config.n_kv_heads, max_seq_len, config.head_dim)
        return cls(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)],
        )

    @property
    def max_batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.k[0].shape[2]


@dataclass(frozen=True)
class Prefill:
    """A chunk of each row's input: keys/values written to cache ``rows``.

    ``positions`` None: every chunk starts at position 0, so causal attention over the batch alone. Else
    each token sits at ``positions`` and attends to its row's cached keys up to its own position (those
    of earlier chunks and the causal part of its chunk), as ``mask`` says.
    """

    rows: Tensor  # [B] long: cache row of each batch row
    positions: Tensor | None = None  # [B, T] long: cache position of each token
    mask: Tensor | None = None  # [B, 1, T, L] bool: key visible to query (L keys read from the cache)


@dataclass(frozen=True)
class Decode:
    """One new token per row at ``positions``; cache rows are batch rows 0..B-1."""

    batch_index: Tensor  # [B] long: arange(B)
    positions: Tensor  # [B] long: where each row's token sits
    bias: Tensor  # [B, 1, 1, L] additive mask: 0 for keys <= position, -inf after


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.q_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.dim, config.kv_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.dim, config.kv_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.q_dim, config.dim, bias=config.attention_bias)
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)

    def _heads(self, x: Tensor, n: int) -> Tensor:
        return x.view(x.shape[0], x.shape[1], n, self.head_dim).transpose(1, 2)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Training path: h [B, T, D] -> [B, T, D], causal, through the (peft-wrappable) modules."""
        q = apply_rope(self._heads(self.q_proj(h), self.n_heads), cos, sin)
        k = apply_rope(self._heads(self.k_proj(h), self.n_kv_heads), cos, sin)
        v = self._heads(self.v_proj(h), self.n_kv_heads)
        out = causal_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.o_proj(out)

    def infer(
        self,
        h: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv: tuple[Tensor, Tensor] | None,
        plan: Prefill | Decode | None,
        lora: LayerLora | None,
    ) -> Tensor:
        """Inference path: fused q|k|v, optional multi-LoRA, optional KV cache (see ``Prefill``/``Decode``)."""
        qkv = F.linear(h, self.qkv_weight, self.qkv_bias)
        if lora is not None:
            qkv = lora.add(qkv, "qkv", h)
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = qkv.split([q_dim, kv_dim, kv_dim], dim=-1)
        q = apply_rope(self._heads(q, self.n_heads), cos, sin)
        k = apply_rope(self._heads(k, self.n_kv_heads), cos, sin)
        v = self._heads(v, self.n_kv_heads)
        if isinstance(plan, Decode):
            out = self._decode_attention(q, k, v, kv, plan)
        elif isinstance(plan, Prefill) and plan.positions is not None:
            out = self._chunk_attention(q, k, v, kv, plan)
        else:
            if isinstance(plan, Prefill):
                k_cache, v_cache = kv
                k_cache[plan.rows, :, : k.shape[2]] = k
                v_cache[plan.rows, :, : v.shape[2]] = v
            out = causal_attention(q, k, v)
        out = out.transpose(1, 2).flatten(2)
        o = F.linear(out, self.o_proj.weight, self.o_proj.bias)
        if lora is not None:
            o = lora.add(o, "o", out)
        return o

    def _chunk_attention(
        self, q: Tensor, k: Tensor, v: Tensor, kv: tuple[Tensor, Tensor], plan: Prefill
    ) -> Tensor:
        """q/k/v [B, H(kv), T, hd] of chunks at ``plan.positions``: write their keys, attend over the cache.

        Query heads of a KV head fold into its rows (as in decode), so a masked kernel serves GQA too.
        """
        k_cache, v_cache = kv
        rows = plan.rows[:, None]
        k_cache[rows, :, plan.positions] = k.transpose(1, 2)
        v_cache[rows, :, plan.positions] = v.transpose(1, 2)
        batch, _, length, _ = q.shape
        keys_len = plan.mask.shape[-1]
        keys, values = k_cache[plan.rows, :, :keys_len], v_cache[plan.rows, :, :keys_len]
        group = self.n_heads // self.n_kv_heads
        grouped = q.reshape(batch, self.n_kv_heads, group * length, self.head_dim)
        mask = plan.mask.expand(batch, group, length, keys_len).reshape(batch, 1, group * length, keys_len)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)
        return out.reshape(batch, self.n_heads, length, self.head_dim)

    def _decode_attention(
        self, q: Tensor, k: Tensor, v: Tensor, kv: tuple[Tensor, Tensor], plan: Decode
    ) -> Tensor:
        """q [B, H, 1, hd] against cache rows 0..B-1, keys [0, L); query heads of a KV head fold into one row."""
        k_cache, v_cache = kv
        k_cache[plan.batch_index, :, plan.positions] = k[:, :, 0]
        v_cache[plan.batch_index, :, plan.positions] = v[:, :, 0]
        batch, length = q.shape[0], plan.bias.shape[-1]
        keys, values = k_cache[:batch, :, :length], v_cache[:batch, :, :length]
        grouped = q.reshape(batch, self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=plan.bias)
        return out.reshape(batch, self.n_heads, 1, self.head_dim)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.dim, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.dim, bias=config.mlp_bias)
        self.register_buffer("gate_up_weight", None, persistent=False)
        self.register_buffer("gate_up_bias", None, persistent=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    def infer(self, h: Tensor, lora: LayerLora | None) -> Tensor:
        gate_up = F.linear(h, self.gate_up_weight, self.gate_up_bias)
        if lora is not None:
            gate_up = lora.add(gate_up, "gate_up", h)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up
        out = F.linear(act, self.down_proj.weight, self.down_proj.bias)
        if lora is not None:
            out = lora.add(out, "down", act)
        return out


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.dim, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.dim, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))

    def infer(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv: tuple[Tensor, Tensor] | None,
        plan: Prefill | Decode | None,
        lora: LayerLora | None,
    ) -> Tensor:
        """One layer of the inference path; a free function of its tensors, so one compile serves all layers."""
        x = x + self.self_attn.infer(self.input_layernorm(x), cos, sin, kv, plan, lora)
        return x + self.mlp.infer(self.post_attention_layernorm(x), lora)


class BlockFn(Protocol):
    """``Block.infer`` or a compiled version of it (the Generator's one compile site)."""

    def __call__(
        self,
        block: Block,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv: tuple[Tensor, Tensor] | None,
        plan: Prefill | Decode | None,
        lora: LayerLora | None,
    ) -> Tensor: ...


class Decoder(nn.Module):
    """HF's ``LlamaModel`` part: embeddings, layers, final norm (named ``model`` inside ``Llama``)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.rms_norm_eps)


class Llama(nn.Module):
    """A Llama-family causal LM; see the module docstring for its paths."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self.fused = False

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def embed(self, tokens: Tensor) -> Tensor:
        """tokens [B, T] long -> embeddings [B, T, D]."""
        return self.model.embed_tokens(tokens)

    @torch.no_grad()
    def ensure_positions(self, n: int) -> None:
        """Make the cos/sin tables cover positions [0, n) on the model's device (fp32, as HF computes them).

        Raises:
            InvalidArgument: n exceeds the model's sliding window (full attention would differ from it).
        """
        window = self.config.sliding_window
        if window is not None and n > window:
            raise InvalidArgument(f"{n} positions exceed the model's sliding attention window ({window})")
        if self.rope_cos is not None and self.rope_cos.shape[0] >= n and self.rope_cos.device == self.device:
            return
        n = max(n, self.config.max_position_embeddings)
        inv = rope_frequencies(self.config).to(self.device)
        freqs = torch.arange(n, device=self.device, dtype=torch.int64).float()[:, None] * inv[None, :]
        table = torch.cat((freqs, freqs), dim=-1)
        self.rope_cos, self.rope_sin = table.cos(), table.sin()

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [B, T] long -> cos, sin [B, T, head_dim] in the model dtype."""
        return self.rope_cos[positions].to(self.dtype), self.rope_sin[positions].to(self.dtype)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Concatenate q|k|v and gate|up weights for the inference path; the modules keep views into them.

        Idempotent. Call after the model reached its device and dtype: ``.to()`` afterwards would copy the
        views apart (still correct, twice the memory).
        """
        if self.fused:
            return
        for block in self.model.layers:
            attn, mlp = block.self_attn, block.mlp
            attn.qkv_weight, attn.qkv_bias = _fuse(attn.q_proj, attn.k_proj, attn.v_proj)
            mlp.gate_up_weight, mlp.gate_up_bias = _fuse(mlp.gate_proj, mlp.up_proj)
        self.fused = True

    def forward(self, embeds: Tensor) -> Tensor:
        """Training/reference path: embeds [B, T, D] (right-padded) -> logits [B, T, V], causal, no cache.

        Right padding needs no lengths: real positions never attend to later ones; mask padded positions
        out of the loss. Runs through the ``nn.Linear`` modules, so peft-wrapped projections take effect.
        """
        length = embeds.shape[1]
        self.ensure_positions(length)
        cos, sin = self.rope(torch.arange(length, device=embeds.device)[None])
        x = embeds
        for block in self.model.layers:
            x = block(x, cos, sin)
        return self.lm_head(self.model.norm(x))

    def hidden(self, embeds: Tensor, lora: LoraBatch | None = None) -> Tensor:
        """Final-normed hidden states [B, T, D] of right-padded embeds [B, T, D]; causal, no cache."""
        self.fuse_projections()
        length = embeds.shape[1]
        self.ensure_positions(length)
        cos, sin = self.rope(torch.arange(length, device=embeds.device)[None])
        x = embeds
        for i, block in enumerate(self.model.layers):
            x = block.infer(x, cos, sin, None, None, None if lora is None else lora.layer(i))
        return self.model.norm(x)

    def prefill(
        self,
        embeds: Tensor,
        cache: KVCache,
        rows: Tensor,
        last: Tensor,
        lora: LoraBatch | None = None,
        starts: Tensor | None = None,
        kv_len: int = 0,
    ) -> Tensor:
        """Run a chunk of each row's input (all of it, or a part: chunked prefill) and fill its cache row.

        Args:
            embeds: [B, T, D] right-padded chunks of the rows' inputs (prefix embeddings + prompt token
                embeddings).
            cache: the static cache; row ``rows[b]`` gets keys/values for positions [start, start + length).
            rows: [B] long, cache row of each batch row.
            last: [B] long, index in the chunk of each row's last real token (chunk length - 1).
            lora: per-row adapters, or None.
            starts: [B] long, position of each chunk's first token: the row's keys [0, start) are in the
                cache from its earlier chunks, and the chunk attends to them. None: every chunk starts at 0
                (attention over the batch alone, no cache read). A padding token is written at its row's
                next position (start + length), which a later chunk or decode step overwrites before any
                query reads it; that position must lie inside the cache.
            kv_len: with ``starts``, keys read from the cache: >= max(start + length).
        Returns:
            fp32 logits [B, V] at each row's last real token.
        """
        length = embeds.shape[1]
        steps = torch.arange(length, device=embeds.device)
        if starts is None:
            cos, sin = self.rope(steps[None])
            plan = Prefill(rows=rows)
        else:
            positions = starts[:, None] + torch.minimum(steps[None, :], last[:, None] + 1)
            cos, sin = self.rope(positions)
            keys = torch.arange(kv_len, device=embeds.device)
            mask = keys[None, None, None, :] <= positions[:, None, :, None]
            plan = Prefill(rows=rows, positions=positions, mask=mask)
        x = embeds
        for i, block in enumerate(self.model.layers):
            kv = (cache.k[i], cache.v[i])
            x = block.infer(x, cos, sin, kv, plan, None if lora is None else lora.layer(i))
        h = x[torch.arange(x.shape[0], device=x.device), last]
        return self.lm_head(self.model.norm(h)).float()

    def decode(
        self,
        tokens: Tensor,
        positions: Tensor,
        cache: KVCache,
        kv_len: int,
        lora: LoraBatch | None = None,
        block_fn: BlockFn = Block.infer,
    ) -> Tensor:
        """One token for each of cache rows 0..B-1.

        Args:
            tokens: [B] long, the token each row feeds now.
            positions: [B] long, its position (the row's keys [0, position) are in the cache).
            cache: the static cache, written at ``positions``.
            kv_len: keys attended, > max(positions); a bucket so shapes stay few (CUDA graphs).
            lora: per-row adapters, or None.
            block_fn: ``Block.infer`` or its compiled version.
        Returns:
            fp32 logits [B, V].
        """
        batch = tokens.shape[0]
        x = self.embed(tokens)[:, None]
        cos, sin = self.rope(positions[:, None])
        keys = torch.arange(kv_len, device=tokens.device)
        bias = torch.zeros(batch, 1, 1, kv_len, device=tokens.device, dtype=x.dtype)
        bias = bias.masked_fill(keys[None, None, None, :] > positions[:, None, None, None], float("-inf"))
        plan = Decode(batch_index=torch.arange(batch, device=tokens.device), positions=positions, bias=bias)
        for i, block in enumerate(self.model.layers):
            kv = (cache.k[i], cache.v[i])
            x = block_fn(block, x, cos, sin, kv, plan, None if lora is None else lora.layer(i))
        return self.lm_head(self.model.norm(x[:, 0])).float()


def _fuse(*linears: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """One weight (and bias) for linears sharing an input; each module's parameters become views of it."""
    weight = torch.cat([linear.weight for linear in linears])
    bias = None if linears[0].bias is None else torch.cat([linear.bias for linear in linears])
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(weight[start : start + rows], requires_grad=linear.weight.requires_grad)
        if bias is not None:
            linear.bias = nn.Parameter(bias[start : start + rows], requires_grad=linear.bias.requires_grad)
        start += rows
    return weight, bias
