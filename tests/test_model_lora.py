"""Multi-LoRA slots: one batch mixing adapters equals HF + peft run row by row."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lloco.errors import FailedPrecondition, InvalidArgument
from lloco.model import KVCache, LoraSlots, load_model

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = {
    "x1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "x2": dict(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "x3": dict(
        r=2,
        lora_alpha=4,
        target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"o_proj": 6},
        alpha_pattern={"down_proj": 1.0},
    ),
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(our model, HF+peft model holding adapters x1/x2/x3, {name: saved PEFT dir})."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    ours = load_model(str(tiny_model_dir), tmp_path_factory.mktemp("cache"))
    hf = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = None
    for name, config in ADAPTERS.items():
        lora_config = LoraConfig(init_lora_weights=False, **config)
        if peft_model is None:
            peft_model = get_peft_model(hf, lora_config, adapter_name=name)
        else:
            peft_model.add_adapter(name, lora_config)
    out = tmp_path_factory.mktemp("adapters")
    peft_model.save_pretrained(out, selected_adapters=list(ADAPTERS))
    dirs = {
        name: next(p.parent for p in out.rglob("adapter_config.json") if p.parent.name == name)
        for name in ADAPTERS
    }
    return ours, peft_model.eval(), dirs


def reference(peft_model, adapter: str | None, embeds: torch.Tensor) -> torch.Tensor:
    """HF+peft logits at the last position of one row, with one adapter (None = base)."""
    if adapter is None:
        with peft_model.disable_adapter():
            return peft_model(inputs_embeds=embeds[None]).logits[0, -1]
    peft_model.set_adapter(adapter)
    return peft_model(inputs_embeds=embeds[None]).logits[0, -1]


@torch.no_grad()
def test_mixed_adapter_batch_equals_peft_row_by_row(setup) -> None:
    ours, peft_model, dirs = setup
    model, config = ours.model, ours.config
    slots = LoraSlots(config, n_slots=4, max_rank=8, targets=ALL_TARGETS)
    slots.load(0, dirs["x1"])
    slots.load(1, {f.name: f.read_bytes() for f in dirs["x2"].iterdir()})  # bytes, as the registry gives them
    slots.load(3, slots.prepare(dirs["x3"]))
    row_slots = [0, -1, 1, 3, 2, 1]  # slot 2 is empty: base model
    names = {0: "x1", 1: "x2", 3: "x3", -1: None, 2: None}
    gen = torch.Generator().manual_seed(3)
    inputs = [
        model.embed(torch.randint(0, config.vocab_size, (n,), generator=gen)) for n in (7, 12, 5, 9, 12, 3)
    ]
    lengths = [x.shape[0] for x in inputs]
    padded = torch.zeros(len(inputs), max(lengths), config.dim)
    for i, x in enumerate(inputs):
        padded[i, : lengths[i]] = x
    cache = KVCache.allocate(config, len(inputs), 32, model.device, model.dtype)
    lora = slots.batch(torch.tensor(row_slots))
    logits = model.prefill(padded, cache, torch.arange(len(inputs)), torch.tensor(lengths) - 1, lora)
    positions = torch.tensor(lengths)
    for step in range(3):
        for i, slot in enumerate(row_slots):
            ref = reference(peft_model, names[slot], inputs[i])
            assert rel_err(logits[i], ref) < 1e-4, (step, i)
            if names[slot] is not None:  # the adapter changes the output
                assert rel_err(reference(peft_model, None, inputs[i]), ref) > 1e-3
        tokens = logits.argmax(-1)
        inputs = [torch.cat([x, model.embed(t[None])]) for x, t in zip(inputs, tokens, strict=True)]
        logits = model.decode(tokens, positions, cache, kv_len=32, lora=lora)
        positions += 1


@torch.no_grad()
def test_unload_and_reload_replace_a_slot(setup) -> None:
    ours, peft_model, dirs = setup
    model, config = ours.model, ours.config
    slots = LoraSlots(config, n_slots=2, max_rank=8, targets=ALL_TARGETS)
    embeds = model.embed(torch.arange(10, 30))
    cache = KVCache.allocate(config, 1, 32, model.device, model.dtype)

    def run(slot: int) -> torch.Tensor:
        lora = slots.batch(torch.tensor([slot]))
        return model.prefill(embeds[None], cache, torch.tensor([0]), torch.tensor([19]), lora)[0]

    slots.load(1, dirs["x3"])
    slots.load(1, dirs["x1"])  # replaces x3 entirely (its MLP weights must not linger)
    assert rel_err(run(1), reference(peft_model, "x1", embeds)) < 1e-4
    slots.unload(1)
    assert rel_err(run(1), reference(peft_model, None, embeds)) < 1e-4


def test_adapters_the_slots_cannot_serve_are_refused(setup) -> None:
    ours, _, dirs = setup
    attention_only = LoraSlots(ours.config, n_slots=2, max_rank=8)
    with pytest.raises(FailedPrecondition, match="slots serve"):
        attention_only.load(0, dirs["x3"])
    low_rank = LoraSlots(ours.config, n_slots=2, max_rank=4, targets=ALL_TARGETS)
    with pytest.raises(FailedPrecondition, match="rank 8 exceeds"):
        low_rank.load(0, dirs["x2"])
    with pytest.raises(InvalidArgument, match="slot 2"):
        attention_only.load(2, dirs["x1"])
    with pytest.raises(InvalidArgument, match="adapter_model.safetensors"):
        attention_only.load(0, {"adapter_config.json": b"{}"})
    with pytest.raises(InvalidArgument, match="not a readable safetensors"):
        attention_only.load(0, {"adapter_config.json": b"{}", "adapter_model.safetensors": b"junk"})
    files = {f.name: f.read_bytes() for f in dirs["x1"].iterdir()}
    with pytest.raises(InvalidArgument, match="DoRA"):
        attention_only.load(0, files | {"adapter_config.json": b'{"use_dora": true}'})
