"""A tiny random HF Llama with a real (tiny, trained offline) tokenizer, for tests and CI."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 as in SmolLM2
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_WORD_TEXT = """
the a an of to in and or but is was are were be been has have had do does did not no yes it this that
these those there here what which who whom whose when where why how all any each few more most other
some such only own same so than too very can will just should now city capital country river mountain
paris france london england rome italy berlin germany madrid spain europe world north south east west
question answer document context summary model token memory tenant adapter query read write compress
long short large small first last new old good great high low early late young important public able
time year people way day man woman child thing life hand part place case week company system program
number group problem fact water room mother area money story month lot right study book eye job word
business issue side kind head house service friend father power hour game line end member law car name
"""
_WORDS = _WORD_TEXT.split()


def _corpus(n_sentences: int = 600, seed: int = 0) -> list[str]:
    """Deterministic English-like sentences (a few KB): enough for a byte-level BPE to learn merges."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        words[0] = words[0].capitalize()
        sentences.append(" ".join(words) + rng.choice((".", "?", "!", ",")))
    return sentences


def tiny_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE trained on ``_corpus``, wrapped as a PreTrainedTokenizerFast with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_llama_dir(path: Path | str, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` (dim 64, 2 layers, 4 heads, 2 KV heads) + tokenizer to ``path``.

    ``overrides`` are HF ``LlamaConfig`` fields (e.g. ``tie_word_embeddings=True``, ``rope_scaling={...}``).
    Norm weights and biases are random too, so a forward that forgets one cannot match HF by accident.
    """
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    fields: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10_000.0,
        "initializer_range": 0.05,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    fields.update(overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(HFLlamaConfig(**fields))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.uniform_(0.5, 1.5)
                elif name.endswith(".bias"):
                    param.normal_(0.0, 0.05)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
