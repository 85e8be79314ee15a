"""The batch-1 decode step in Triton kernels (``lloco.model.kernels``): five launches per layer.

A decode step of one row only streams weights, so what it costs beyond their bytes is kernels: each one a
gap, and the small ones between the matmuls (norms, RoPE, cache writes, SiLU, residual adds). Here they
fold into the weight streams, and each kernel starts while the previous one drains (programmatic
dependent launch on Hopper); docs/benchmarks/engine-h200-fused.md compares it with the compiled layer
path. Two or more rows go through the compiled path, where cuBLAS wins (per-row accumulators in these
kernels are slower than it from batch 2 on).

Same weights (the fused q|k|v and gate|up views), cache and LoRA slots as ``Llama.decode``, so both paths
serve one Generator.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lloco.model.llama import KVCache, Llama
from lloco.model.lora import LoraSlots


@functools.cache
def available() -> bool:
    """Triton importable (on CUDA it compiles the kernels; under TRITON_INTERPRET=1 they run on CPU)."""
    try:
        import lloco.model.kernels  # noqa: F401
    except ImportError:
        return False
    return True


def supports(model: Llama) -> str | None:
    """Why the kernels cannot run this model, or None when they can."""
    head_dim = model.config.head_dim
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two >= 16"
    return None


class FusedDecoder:
    """Workspace (activations, attention partials, LoRA shrink results) of one Generator's batch-1 steps.

    Buffers are allocated once, so a step captured in a CUDA graph replays on the same addresses.
    """

    def __init__(self, model: Llama, cache: KVCache, lora: LoraSlots | None) -> None:
        from lloco.model import kernels

        self.kernels = kernels
        self.model, self.cache, self.lora = model, cache, lora
        config, device, dtype = model.config, model.device, model.dtype
        self.residual = torch.empty(config.dim, device=device, dtype=dtype)
        self.qkv = torch.empty(config.q_dim + 2 * config.kv_dim, device=device, dtype=dtype)
        self.attended = torch.empty(config.q_dim, device=device, dtype=dtype)
        self.act = torch.empty(config.intermediate_size, device=device, dtype=dtype)
        self.logits = torch.empty(1, config.vocab_size, device=device, dtype=torch.float32)
        self.programs = 2 * _multiprocessors(device)
        self.attention = kernels.AttentionWorkspace(
            1, config.n_heads, config.n_kv_heads, config.head_dim, device
        )
        self.shrunk: dict[str, Tensor] = {}
        if lora is not None:
            self.shrunk = {
                g: torch.zeros(lora.a[g].shape[1] // lora.n_slots, device=device) for g in lora.groups
            }

    def logits_of(self, token: Tensor, position: Tensor, kv_len: int, slot: Tensor | None) -> Tensor:
        """fp32 logits [1, V] of one decode step of cache row 0.

        Args:
            token, position: [1] long, as ``Llama.decode`` takes them.
            kv_len: keys attended, > position (fixes the attention split, so keep it bucketed).
            slot: [1] long LoRA slot (-1 none), or None for no adapters.
        """
        k, model, config = self.kernels, self.model, self.model.config
        x, qkv, attended, act = self.residual, self.qkv, self.attended, self.act
        torch.index_select(model.model.embed_tokens.weight.detach(), 0, token, out=x[None])
        for i, block in enumerate(model.model.layers):
            attn, mlp = block.self_attn, block.mlp
            norm1, norm2 = block.input_layernorm, block.post_attention_layernorm
            k.gemv(
                x, attn.qkv_weight, qkv, norm=norm1.weight, eps=norm1.eps, bias=attn.qkv_bias,
                lora=self._lora(i, "qkv", x, slot, norm1.weight, norm1.eps),
            )  # fmt: skip
            k.decode_attention(
                qkv[None], position, model.rope_cos, model.rope_sin, self.cache.k[i], self.cache.v[i],
                attended[None], self.attention, config.n_heads, config.n_kv_heads, kv_len, self.programs,
            )  # fmt: skip
            k.gemv(
                attended, attn.o_proj.weight, x, residual=True, bias=attn.o_proj.bias,
                lora=self._lora(i, "o", attended, slot),
            )  # fmt: skip
            k.gemv(
                x, mlp.gate_up_weight, act, norm=norm2.weight, eps=norm2.eps, gated=True, bias=mlp.gate_up_bias,
                lora=self._lora(i, "gate_up", x, slot, norm2.weight, norm2.eps),
            )  # fmt: skip
            k.gemv(
                act, mlp.down_proj.weight, x, residual=True, bias=mlp.down_proj.bias,
                lora=self._lora(i, "down", act, slot),
            )  # fmt: skip
        final = model.model.norm
        k.gemv(x, model.lm_head.weight, self.logits[0], norm=final.weight, eps=final.eps)
        return self.logits

    def _lora(
        self,
        layer: int,
        group: str,
        x: Tensor,
        slot: Tensor | None,
        norm: Tensor | None = None,
        eps: float = 0.0,
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """Shrink x through the row's slot now; the projection's kernel adds the expand."""
        if slot is None or group not in self.shrunk:
            return None
        s = self.shrunk[group]
        self.kernels.lora_shrink(x, self.lora.a[group][layer], slot, s, norm=norm, eps=eps)
        return s, self.lora.b[group][layer], slot


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8
