"""Our Llama forward equals HF transformers' on tiny random checkpoints (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lloco.errors import InvalidArgument
from lloco.model import KVCache, load_model, tiny_llama_dir

VARIANTS = {
    "gqa": {},
    "tied-llama3-bias": {
        "tie_word_embeddings": True,
        "attention_bias": True,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        "rope_theta": 500_000.0,
    },
    "mha-linear-rope": {"num_key_value_heads": 4, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """(our LoadedModel, HF LlamaForCausalLM) on the same random checkpoint."""
    from transformers import LlamaForCausalLM

    overrides = VARIANTS[request.param]
    path = (
        tiny_model_dir
        if not overrides
        else tiny_llama_dir(tmp_path_factory.mktemp(request.param), 1, **overrides)
    )
    ours = load_model(str(path), tmp_path_factory.mktemp("cache"))
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, hf


@torch.no_grad()
def test_token_logits_equal_hf(pair) -> None:
    ours, hf = pair
    ids = torch.randint(0, ours.config.vocab_size, (3, 37), generator=torch.Generator().manual_seed(0))
    ref = hf(ids).logits
    assert rel_err(ours.model(ours.model.embed(ids)), ref) < 1e-4
    cache = KVCache.allocate(ours.config, 4, 64, ours.model.device, ours.model.dtype)
    last = torch.tensor([36, 36, 36])
    logits = ours.model.prefill(ours.model.embed(ids), cache, torch.tensor([2, 0, 3]), last)
    assert rel_err(logits, ref[:, -1]) < 1e-4


@torch.no_grad()
def test_embedding_prefix_logits_equal_hf(pair) -> None:
    ours, hf = pair
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randn(2, 9, ours.config.dim, generator=gen) * 0.05
    ids = torch.randint(0, ours.config.vocab_size, (2, 12), generator=gen)
    embeds = torch.cat([prefix, ours.model.embed(ids)], dim=1)
    ref = hf(inputs_embeds=embeds).logits
    assert rel_err(ours.model(embeds), ref) < 1e-4
    ref_hidden = hf.model(inputs_embeds=embeds).last_hidden_state
    assert rel_err(ours.model.hidden(embeds), ref_hidden) < 1e-4


@torch.no_grad()
def test_cached_decode_equals_full_recompute(pair) -> None:
    """Rows of different lengths prefill together, then decode step by step with per-row positions."""
    ours, hf = pair
    model, gen = ours.model, torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, ours.config.vocab_size, (n,), generator=gen) for n in (5, 17, 11)]
    prefix = torch.randn(4, ours.config.dim, generator=gen) * 0.05  # row 2 also has an embeddings prefix
    inputs = [model.embed(prompts[0]), model.embed(prompts[1]), torch.cat([prefix, model.embed(prompts[2])])]
    lengths = [x.shape[0] for x in inputs]
    padded = torch.zeros(3, max(lengths), ours.config.dim)
    for i, x in enumerate(inputs):
        padded[i, : lengths[i]] = x
    cache = KVCache.allocate(ours.config, 3, 64, model.device, model.dtype)
    model.prefill(padded, cache, torch.arange(3), torch.tensor(lengths) - 1)
    positions = torch.tensor(lengths)
    for step in range(6):
        tokens = torch.randint(0, ours.config.vocab_size, (3,), generator=gen)
        logits = model.decode(tokens, positions, cache, kv_len=32)
        for i in range(3):
            inputs[i] = torch.cat([inputs[i], model.embed(tokens[i : i + 1])])
            ref = hf(inputs_embeds=inputs[i][None]).logits[0, -1]
            assert rel_err(logits[i], ref) < 1e-4, (step, i)
        positions += 1


@torch.no_grad()
def test_prefill_in_chunks_equals_hf(pair) -> None:
    """Rows prefilled chunk by chunk, rows of one forward at different starts and lengths (padding written
    past a row's chunk), each chunk attending to its row's cached keys: logits at every chunk's last token
    equal HF's on the whole prefix, and the cache then decodes like a whole prefill."""
    ours, hf = pair
    model, gen = ours.model, torch.Generator().manual_seed(3)
    prefix = torch.randn(7, ours.config.dim, generator=gen) * 0.05
    ids = [torch.randint(0, ours.config.vocab_size, (n,), generator=gen) for n in (23, 16)]
    inputs = [torch.cat([prefix, model.embed(ids[0])]), model.embed(ids[1])]  # 30 and 16 positions
    cuts = [[0, 4, 13, 30], [0, 9, 10, 16]]  # each row's chunk boundaries, one forward per column
    cache = KVCache.allocate(ours.config, 3, 64, model.device, model.dtype)
    rows = torch.tensor([2, 0])
    for step in range(3):
        spans = [(cut[step], cut[step + 1]) for cut in cuts]
        lengths = [end - start for start, end in spans]
        padded = torch.zeros(2, max(lengths), ours.config.dim)
        for i, (start, end) in enumerate(spans):
            padded[i, : end - start] = inputs[i][start:end]
        starts = torch.tensor([start for start, _ in spans])
        kv_len = max(end for _, end in spans)
        logits = model.prefill(padded, cache, rows, torch.tensor(lengths) - 1, None, starts, kv_len)
        for i, (_, end) in enumerate(spans):
            ref = hf(inputs_embeds=inputs[i][None, :end]).logits[0, -1]
            assert rel_err(logits[i], ref) < 1e-4, (step, i)
    tokens = torch.randint(0, ours.config.vocab_size, (3,), generator=gen)
    positions = torch.tensor([16, 0, 30])  # row 1 is free (position 0)
    logits = model.decode(tokens, positions, cache, kv_len=32)
    for i, row in enumerate([2, 0]):
        ref = hf(inputs_embeds=torch.cat([inputs[i], model.embed(tokens[row : row + 1])])[None]).logits[0, -1]
        assert rel_err(logits[row], ref) < 1e-4, row


def test_training_forward_under_peft_matches_hf_peft_keys_and_logits(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """peft wraps our q/k/v/o like HF's: same adapter keys, same logits, gradients reach the adapter."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import LlamaForCausalLM

    ours = load_model(str(tiny_model_dir), tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    torch.manual_seed(0)
    peft_ours = get_peft_model(ours.model, LoraConfig(**config))
    peft_hf = get_peft_model(hf, LoraConfig(**config))
    ours_state, hf_state = get_peft_model_state_dict(peft_ours), get_peft_model_state_dict(peft_hf)
    assert set(ours_state) == set(hf_state) and len(ours_state) == 4 * 2 * ours.config.n_layers
    peft_hf.load_state_dict(peft_ours.state_dict(), strict=False)
    ids = torch.randint(0, ours.config.vocab_size, (2, 15))
    logits = peft_ours(ours.model.embed(ids))
    assert rel_err(logits.detach(), peft_hf(input_ids=ids).logits.detach()) < 1e-4
    with torch.no_grad(), peft_ours.disable_adapter():
        assert rel_err(peft_ours(ours.model.embed(ids)), logits.detach()) > 1e-3  # the adapter does something
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    grads = [p.grad for n, p in peft_ours.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in peft_ours.named_parameters() if "lora_" not in n)


def test_sliding_window_models_refuse_longer_sequences(tmp_path: Path) -> None:
    """Mistral-style configs load; sequences past the window are refused, never silently full attention."""
    path = tiny_llama_dir(tmp_path / "windowed", 2, sliding_window=48)
    loaded = load_model(str(path), tmp_path / "cache")
    assert loaded.config.sliding_window == 48
    loaded.model(loaded.model.embed(torch.arange(48)[None]))
    with pytest.raises(InvalidArgument, match="sliding attention window"):
        loaded.model(loaded.model.embed(torch.arange(49)[None]))
