"""The Triton batch-1 decode step equals ``Llama.decode`` (CPU: the kernels under TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch
from lloco.model import KVCache, Llama, LlamaConfig, LoraSlots
from lloco.model.fused import FusedDecoder, available

pytestmark = pytest.mark.skipif(not available(), reason="triton is not installed")

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_model(config: LlamaConfig, seed: int) -> Llama:
    torch.manual_seed(seed)
    model = Llama(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.rand_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.normal_(0, 0.05)
    model.eval().fuse_projections()
    model.ensure_positions(config.max_position_embeddings)
    return model


def random_slots(config: LlamaConfig, targets: tuple[str, ...]) -> LoraSlots:
    slots = LoraSlots(config, 3, 4, targets)
    for group in slots.groups:
        slots.a[group].normal_(0, 0.1)
        slots.b[group].normal_(0, 0.1)
    return slots


@pytest.mark.parametrize(
    ("geometry", "length", "slot", "targets"),
    [
        (dict(n_heads=4, n_kv_heads=2), 37, -1, ALL_TARGETS),
        (dict(n_heads=4, n_kv_heads=2), 128, 1, ALL_TARGETS),  # the new key opens a chunk
        (dict(n_heads=6, n_kv_heads=2, attention_bias=True, mlp_bias=True), 201, 2, ALL_TARGETS),
        (dict(n_heads=2, n_kv_heads=2, intermediate_size=100), 255, 0, ("q_proj", "v_proj", "down_proj")),
        (dict(n_heads=4, n_kv_heads=1), 0, 0, ALL_TARGETS),  # first position: no keys in the cache yet
    ],
)
@torch.no_grad()
def test_fused_step_equals_decode(geometry: dict, length: int, slot: int, targets: tuple[str, ...]) -> None:
    head_dim = 16
    config = LlamaConfig(
        vocab_size=96,
        dim=head_dim * geometry["n_heads"],
        n_layers=2,
        intermediate_size=geometry.get("intermediate_size", 96),
        max_position_embeddings=320,
        **{k: v for k, v in geometry.items() if k != "intermediate_size"},
    )
    model = random_model(config, seed=length)
    slots = random_slots(config, targets)
    cache = KVCache.allocate(config, 2, config.max_position_embeddings, model.device, model.dtype)
    if length:
        prompt = torch.randint(
            0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length)
        )
        model.prefill(model.embed(prompt), cache, torch.tensor([0]), torch.tensor([length - 1]))
    reference = KVCache([k.clone() for k in cache.k], [v.clone() for v in cache.v])
    fused = FusedDecoder(model, cache, slots if slot >= 0 else None)
    slot_tensor = torch.tensor([slot]) if slot >= 0 else None
    batch = slots.batch(slot_tensor) if slot >= 0 else None
    token, position, kv_len = torch.tensor([5]), torch.tensor([length]), 288
    for _ in range(3):  # the per-head counters are reset for the next layer and step
        expected = model.decode(token, position, reference, kv_len, batch)
        logits = fused.logits_of(token, position, kv_len, slot_tensor)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        for layer in range(config.n_layers):  # the step wrote its key and value where decode does
            torch.testing.assert_close(cache.k[layer], reference.k[layer], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cache.v[layer], reference.v[layer], rtol=1e-5, atol=1e-5)
        token, position = expected.argmax(-1), position + 1
    assert int(fused.attention.count.abs().sum()) == 0


def test_generator_refuses_fused_for_an_unsupported_geometry() -> None:
    from lloco.errors import InvalidArgument
    from lloco.model import Generator

    config = LlamaConfig(vocab_size=96, dim=48, n_layers=1, n_heads=2, n_kv_heads=2, intermediate_size=64)
    model = random_model(config, seed=0)  # head_dim 24: the attention kernel needs a power of two
    with pytest.raises(InvalidArgument, match="head_dim 24"):
        Generator(model, None, 1, 32, fused=True)
