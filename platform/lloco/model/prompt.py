"""The one prompt format shared by finetuning, evaluation and serving."""

from __future__ import annotations

from typing import Any


def chat_prompt(tokenizer: Any, question: str) -> list[int]:
    """Token ids of ``question`` as a single user turn in the tokenizer's chat template, ready for the answer.

    The decoder input is ``[compressed context embeddings] + chat_prompt(tokenizer, question)``.
    """
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


QA_INSTRUCTION = "Answer with a short phrase."


def qa_question(question: str) -> str:
    """A short-answer question as finetuning, evaluation and compressor pretraining all ask it."""
    return f"{question}\n\n{QA_INSTRUCTION}"
