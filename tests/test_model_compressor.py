"""The batched compressor equals a plain per-document, per-segment loop over HF's model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lloco.errors import FailedPrecondition
from lloco.model import Compressor, load_compressor, load_model, tiny_llama_dir
from safetensors.torch import load_file, save_file

SEGMENT, K = 10, 3
DOC_LENGTHS = (23, 50, 7, 0, 10, 31)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return load_model(str(tiny_model_dir), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def docs(base) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, base.config.vocab_size, (n,), generator=gen).tolist() for n in DOC_LENGTHS]


@torch.no_grad()
def reference(
    decoder,
    summary_embeds: torch.Tensor,
    doc: list[int],
    segment: int,
    accumulate: bool,
    scale: torch.Tensor | None,
) -> torch.Tensor:
    """One document, one segment at a time, through an HF ``LlamaModel`` (final-normed hidden states,
    times the output scale if any)."""
    vectors: list[torch.Tensor] = []
    for start in range(0, len(doc), segment):
        parts = [torch.cat(vectors)] if accumulate and vectors else []
        parts += [decoder.embed_tokens(torch.tensor(doc[start : start + segment])), summary_embeds]
        hidden = decoder(inputs_embeds=torch.cat(parts)[None]).last_hidden_state[0]
        summary = hidden[-summary_embeds.shape[0] :]
        vectors.append(summary if scale is None else summary * scale)
    return torch.cat(vectors) if vectors else torch.zeros(0, summary_embeds.shape[1])


def assert_matches(
    outputs: list[torch.Tensor], decoder, compressor: Compressor, docs: list[list[int]]
) -> None:
    for doc, out in zip(docs, outputs, strict=True):
        expected = reference(
            decoder,
            compressor.summary_embeds,
            doc,
            compressor.segment_len,
            compressor.accumulate,
            compressor.output_scale,
        )
        assert out.shape == (
            -(-len(doc) // compressor.segment_len) * compressor.k,
            compressor.base.config.dim,
        )
        if len(doc):
            assert rel_err(out, expected) < 1e-4


@pytest.mark.parametrize("accumulate", [True, False])
def test_batched_segments_equal_reference_loop(base, docs, accumulate: bool) -> None:
    from transformers import LlamaModel

    compressor = Compressor.from_base(base, SEGMENT, K, accumulate, seed=1)
    hf = LlamaModel.from_pretrained(base.path, dtype=torch.float32).eval()
    assert_matches(compressor.compress(docs, batch_size=2), hf, compressor, docs)


def test_adapter_save_load_round_trip(base, docs, tmp_path: Path) -> None:
    """A compressor with a LoRA adapter equals HF+peft's loop, and survives save/load bit for bit."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(4)
    hf = LlamaForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    peft_model = get_peft_model(
        hf, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    files = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}
    fresh = Compressor.from_base(base, SEGMENT, K, True, seed=2)
    scale = fresh.output_scale * torch.linspace(0.5, 2.0, base.config.dim)
    compressor = Compressor(base, fresh.summary_embeds, SEGMENT, True, files, scale)
    assert compressor.compressor_id != fresh.compressor_id
    outputs = compressor.compress(docs, batch_size=4)
    assert_matches(outputs, peft_model.eval().base_model.model.model, compressor, docs)

    loaded = Compressor.load(compressor.save(tmp_path / "saved"), base)
    assert loaded.config == compressor.config
    assert torch.equal(loaded.output_scale, compressor.output_scale)
    for a, b in zip(loaded.compress(docs, batch_size=3), outputs, strict=True):
        assert torch.equal(a, b)
    assert load_compressor(str(tmp_path / "saved"), base).compressor_id == compressor.compressor_id


def test_princeton_autocompressor_layout_loads(tmp_path: Path, docs) -> None:
    """A checkpoint dir with HF Llama weights + embed_summary.weight and summary_length in config.json."""
    from transformers import LlamaModel

    path = tiny_llama_dir(tmp_path / "autocompressor", seed=3)
    weights = load_file(path / "model.safetensors")
    weights["embed_summary.weight"] = torch.randn(5, 64, generator=torch.Generator().manual_seed(9)) * 0.05
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config |= {"summary_length": 5, "accumulate_summary": True, "architectures": ["LlamaAutoCompressorModel"]}
    (path / "config.json").write_text(json.dumps(config))

    compressor = Compressor.load_autocompressor(path, segment_len=SEGMENT)
    assert (compressor.k, compressor.segment_len, compressor.accumulate) == (5, SEGMENT, True)
    assert torch.equal(compressor.summary_embeds, weights["embed_summary.weight"])
    assert compressor.output_scale is None
    hf = LlamaModel.from_pretrained(path, dtype=torch.float32).eval()
    assert_matches(compressor.compress(docs[:3], batch_size=2), hf, compressor, docs[:3])

    decoder = load_model(str(path), tmp_path / "cache")
    assert load_compressor(str(path), decoder).k == 5
    with pytest.raises(FailedPrecondition, match="no compressor is shipped"):
        load_compressor("default", decoder)
