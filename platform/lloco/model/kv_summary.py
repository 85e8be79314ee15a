"""Summaries as per-layer keys and values: the decoder attends to them at every layer.

An embedding summary is one input vector per position, which the decoder must turn into keys and values
through all its layers; a 135M decoder learned to read its segment back from such vectors by position but
not to look a fact up in them by a question (docs/compressor.md). A *key/value summary* position instead
holds, for every layer, the key and value the encoder computed there (as 500xCompressor and Activation
Beacon keep them): a question's queries meet them in each layer's own key space, the way they meet
earlier tokens of a text.

A position is stored as one flat vector of width ``kv_width(config)`` = layers x 2 x kv heads x head dim
(keys before RoPE, then values, layer by layer), so a document's summaries stay a ``[positions, width]``
tensor as embedding summaries are (``[positions, dim]``). Keys are kept *before* RoPE and rotated to
wherever they are read: position j of the prefix at position j, the text after it from the prefix's end,
so summaries keep their order and positions stay contiguous whatever the encoder's layout was.

``prefix_hidden`` runs right-padded inputs after such a prefix (rows may have different numbers of summary
positions, right-padded), with an optional LoRA, and can keep the keys and values of chosen positions: the
encoder's pass (keep the summary tokens' own), the decoder's in pretraining and in tenant finetuning (keep
nothing) are the same function. ``rotated_prefix`` gives what a KV cache holds after a document's summaries,
which is how the generator serves them (``Generator.add(prefix_kv=...)``).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lloco.model.config import LlamaConfig
from lloco.model.llama import Block, Llama, apply_rope
from lloco.model.lora import LayerLora


class LayerLoras(Protocol):
    """A ``LoraBatch`` or a bound ``TrainableLora``: the adapter of layer i."""

    def layer(self, index: int) -> LayerLora: ...


def kv_width(config: LlamaConfig) -> int:
    """Values one key/value summary position holds: layers x (key + value) x kv heads x head dim."""
    return config.n_layers * 2 * config.kv_dim


def _layer_kv(prefix: Tensor, layer: int, config: LlamaConfig) -> tuple[Tensor, Tensor]:
    """Layer ``layer``'s keys (pre-RoPE) and values [B, Hkv, P, hd] of flat summaries [B, P, width]."""
    batch, positions, _ = prefix.shape
    part = prefix.view(batch, positions, config.n_layers, 2, config.n_kv_heads, config.head_dim)[:, :, layer]
    return part[:, :, 0].transpose(1, 2), part[:, :, 1].transpose(1, 2)


def _block(
    block: Block,
    x: Tensor,
    rope: tuple[Tensor, Tensor, Tensor, Tensor],
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    mask: Tensor,
    lora: LayerLora | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer over x [B, T, D] after pre-RoPE prefix keys/values [B, Hkv, P, hd]; returns the new x and
    x's own keys (pre-RoPE) and values [B, Hkv, T, hd]. ``rope``: cos/sin of the prefix's positions and of
    x's; ``mask`` [B or 1, 1, T, P + T]: key visible to query."""
    attn = block.self_attn
    heads, kv_heads, head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
    prefix_cos, prefix_sin, cos, sin = rope
    h = block.input_layernorm(x)
    qkv = F.linear(h, attn.qkv_weight, attn.qkv_bias)
    if lora is not None:
        qkv = lora.add(qkv, "qkv", h)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = attn._heads(q, heads), attn._heads(k, kv_heads), attn._heads(v, kv_heads)
    keys, values = apply_rope(k, cos, sin), v
    if prefix_k is not None:
        keys = torch.cat([apply_rope(prefix_k, prefix_cos, prefix_sin), keys], dim=2)
        values = torch.cat([prefix_v, values], dim=2)
    group = heads // kv_heads
    out = F.scaled_dot_product_attention(
        apply_rope(q, cos, sin),
        keys.repeat_interleave(group, dim=1),
        values.repeat_interleave(group, dim=1),
        attn_mask=mask,
    )
    out = out.transpose(1, 2).flatten(2)
    o = F.linear(out, attn.o_proj.weight, attn.o_proj.bias)
    if lora is not None:
        o = lora.add(o, "o", out)
    x = x + o
    return x + block.mlp.infer(block.post_attention_layernorm(x), lora), k, v


def prefix_hidden(
    model: Llama,
    x: Tensor,
    prefix: Tensor | None,
    lora: LayerLoras | None = None,
    keep: Tensor | None = None,
    checkpointing: bool = False,
    prefix_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Final-normed hidden states [B, T, D] of right-padded inputs x [B, T, D] after key/value summaries.

    Args:
        model: the base model (its fused projections are used).
        x: input embeddings, causal among themselves, every position of the row's prefix visible.
        prefix: flat summaries [B, P, kv_width], or None.
        lora: the adapter of each layer (encoder or reader LoRA), or None.
        keep: [B, K] indices into x whose keys (pre-RoPE) and values to return, or None.
        checkpointing: recompute each layer in backward instead of keeping its activations.
        prefix_lengths: [B] summary positions of each row (its prefix right-padded to P); None: all P. Row b's
            inputs sit at positions prefix_lengths[b]...
    Returns:
        hidden states, and the kept positions' flat summaries [B, K, kv_width] (None without ``keep``).
    """
    model.fuse_projections()
    config = model.config
    batch, length, _ = x.shape
    device = x.device
    prefix_len = 0 if prefix is None else prefix.shape[1]
    steps = torch.arange(length, device=device)
    starts = (
        torch.full((batch,), prefix_len, device=device)
        if prefix_lengths is None or prefix is None
        else prefix_lengths.to(device)
    )
    positions = starts[:, None] + steps[None]  # [B, T]
    model.ensure_positions(prefix_len + length)
    cos, sin = model.rope(positions)
    prefix_cos, prefix_sin = model.rope(torch.arange(prefix_len, device=device)[None])
    causal = steps[None, :] <= steps[:, None]  # [T, T]
    visible = torch.arange(prefix_len, device=device)[None, :] < starts[:, None]  # [B, P]
    mask = torch.cat(
        [visible[:, None, :].expand(batch, length, prefix_len), causal.expand(batch, -1, -1)], dim=2
    )
    mask = mask[:, None]  # [B, 1, T, P + T]
    rows = torch.arange(batch, device=device)[:, None]
    prefix = None if prefix is None else prefix.to(x.dtype)
    kept = []
    for i, block in enumerate(model.model.layers):
        prefix_k, prefix_v = (None, None) if prefix is None else _layer_kv(prefix, i, config)
        layer_lora = None if lora is None else lora.layer(i)
        args = (block, x, (prefix_cos, prefix_sin, cos, sin), prefix_k, prefix_v, mask, layer_lora)
        x, k, v = checkpoint(_block, *args, use_reentrant=False) if checkpointing else _block(*args)
        if keep is not None:
            kept.append(torch.stack([k.transpose(1, 2)[rows, keep], v.transpose(1, 2)[rows, keep]], dim=2))
    summaries = None
    if keep is not None:  # per layer [B, K, 2, Hkv, hd] -> [B, K, layers, 2, Hkv, hd] -> flat
        summaries = torch.stack(kept, dim=2).flatten(2)
    return model.model.norm(x), summaries


def rotated_prefix(model: Llama, prefix: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Each layer's keys (RoPE applied at positions 0..P-1) and values [Hkv, P, hd] of one document's flat
    summaries [P, kv_width]: what a KV cache holds after reading them."""
    config = model.config
    model.ensure_positions(prefix.shape[0])
    cos, sin = model.rope(torch.arange(prefix.shape[0], device=prefix.device)[None])
    layers = []
    for i in range(config.n_layers):
        k, v = _layer_kv(prefix[None], i, config)
        layers.append((apply_rope(k, cos, sin)[0], v[0]))
    return layers
