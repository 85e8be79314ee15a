"""Dataset rows -> training tensors: a context prefix, the chat prompt, the answer; loss on the answer only.

A row becomes ``[context] + chat_prompt(question) + answer + eos``. The context is, in ``compressed`` mode,
the stored summary vectors of the row's documents (concatenated, read from the registry, never
re-encoded) placed as input embeddings, then, with an evidence ratio, the question's evidence tokens
(``lloco.registry.evidence``, as serving computes them); in ``full`` mode, the documents' raw tokens (the
full-context baseline), cut in the middle when the row would exceed ``max_length`` (as LongBench does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lloco.errors import FailedPrecondition, InvalidArgument, NotFound
from lloco.model import chat_prompt
from lloco.registry import DatasetRow, Registry
from lloco.registry.evidence import Evidence, evidence_budget

Mode = Literal["compressed", "full"]
DOCUMENT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Example:
    """One row ready for the model: ``prefix`` vectors, then ``input_ids``, whose last ``answer_len`` are the target."""

    line: int
    prefix: Tensor | None  # [P, D] summary vectors (compressed mode) or None
    input_ids: list[int]  # [document tokens (full mode)] + prompt + answer + eos
    answer_len: int
    kv_prefix: bool = False  # ``prefix`` holds key/value summaries [P, kv_width] (lloco.model.kv_summary)

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix is None else self.prefix.shape[0]

    @property
    def length(self) -> int:
        return self.prefix_len + len(self.input_ids)


@dataclass(frozen=True)
class Batch:
    """A right-padded batch and where its loss is: logits at ``target_index`` (flat [B*L]) predict ``targets``."""

    embeds: Tensor  # [B, L, D]
    target_index: Tensor  # [N] long
    targets: Tensor  # [N] long
    tokens: int  # real (unpadded) positions in the batch
    samples: int
    # key/value summaries read before ``embeds`` (Example.kv_prefix): [B, P, kv_width] right-padded, and each
    # row's summary positions [B] long
    prefix_kv: Tensor | None = None
    prefix_lengths: Tensor | None = None


def check_rows(registry: Registry, rows: Sequence[DatasetRow]) -> None:
    """Fail fast, before any worker starts, on a row with an empty field or naming a missing document.

    ``Registry.put_dataset`` validates uploads; this also catches datasets whose documents went away or
    that were written around it. Raises InvalidArgument naming the first bad line.
    """
    present: dict[str, bool] = {}
    for line, row in enumerate(rows, start=1):
        for name in ("question", "answer"):
            if not getattr(row, name).strip():
                raise InvalidArgument(f"dataset line {line}: {name!r} must be a non-empty string")
        if not row.doc_ids:
            raise InvalidArgument(f"dataset line {line}: 'doc_ids' must name at least one document")
        for doc_id in row.doc_ids:
            if doc_id not in present:
                try:
                    registry.get_document(doc_id)
                    present[doc_id] = True
                except NotFound:
                    present[doc_id] = False
            if not present[doc_id]:
                raise InvalidArgument(f"dataset line {line}: unknown document {doc_id!r}")


class ExampleBuilder:
    """Turns a tenant's rows into examples, reading each document's context (or text) once.

    Args:
        registry: the tenant's registry (contexts and documents come from here).
        tokenizer: the base model's HF tokenizer.
        mode: ``compressed`` (summary vectors) or ``full`` (raw document tokens).
        compressor_id: whose contexts to use; required in compressed mode.
        max_length: the longest example in positions (prefix + tokens).
        eos_token_id: appended to every answer, so the model learns to stop.
        kv_prefix: the compressor's contexts are key/value summaries (``Example.kv_prefix``).
        context_ratio: compressed mode: the question's evidence follows the context, in what the context
            leaves of the documents' tokens / this (``lloco.registry.evidence.evidence_budget``; 0: none).
    """

    def __init__(
        self,
        registry: Registry,
        tokenizer: Any,
        mode: Mode,
        compressor_id: str | None,
        max_length: int,
        eos_token_id: int,
        kv_prefix: bool = False,
        context_ratio: int = 0,
    ) -> None:
        if mode not in ("compressed", "full"):
            raise InvalidArgument(f"finetune mode must be 'compressed' or 'full', got {mode!r}")
        if mode == "compressed" and not compressor_id:
            raise InvalidArgument("compressed finetuning needs a compressor id")
        self.registry, self.tokenizer, self.mode = registry, tokenizer, mode
        self.compressor_id, self.max_length, self.eos_token_id = compressor_id, max_length, eos_token_id
        self.kv_prefix, self.context_ratio = kv_prefix, context_ratio
        self._contexts: dict[str, Tensor] = {}
        self._prefixes: dict[tuple[str, ...], Tensor] = {}
        self._texts: dict[str, str] = {}
        self._indexed: dict[tuple[str, ...], Evidence] = {}  # per row's documents
        self._documents: dict[str, list[int]] = {}

    def build(self, rows: Sequence[tuple[int, DatasetRow]]) -> list[Example]:
        """Examples of ``(line number, row)`` pairs; errors name the dataset line they come from."""
        return [self._example(line, row) for line, row in rows]

    def _example(self, line: int, row: DatasetRow) -> Example:
        if not row.answer.strip():
            raise InvalidArgument(f"dataset line {line}: 'answer' must be a non-empty string")
        if not row.doc_ids:
            raise InvalidArgument(f"dataset line {line}: 'doc_ids' must name at least one document")
        prompt = list(chat_prompt(self.tokenizer, row.question))
        answer = [*self.tokenizer.encode(row.answer, add_special_tokens=False), self.eos_token_id]
        if self.mode == "compressed":
            prefix = self._prefix(line, row.doc_ids)
            room = self.max_length - prefix.shape[0] - len(prompt) - len(answer)
            evidence = self._evidence(line, row, prefix.shape[0], room) if self.context_ratio else []
            example = Example(line, prefix, evidence + prompt + answer, len(answer), self.kv_prefix)
            if example.length > self.max_length:
                raise InvalidArgument(
                    f"dataset line {line}: {example.length} positions (context {example.prefix_len}) exceed "
                    f"the longest trainable sequence, {self.max_length}"
                )
            return example
        document = self._document_tokens(line, row.doc_ids)
        room = self.max_length - len(prompt) - len(answer)
        if room < 0:
            raise InvalidArgument(
                f"dataset line {line}: question and answer alone exceed {self.max_length} tokens"
            )
        if len(document) > room:
            document = document[: room // 2] + document[len(document) - (room - room // 2) :] if room else []
        return Example(line, None, document + prompt + answer, len(answer))

    def _prefix(self, line: int, doc_ids: tuple[str, ...]) -> Tensor:
        """The concatenated contexts of the documents; rows naming the same documents share one tensor."""
        if doc_ids not in self._prefixes:
            contexts = [self._context(line, doc_id) for doc_id in doc_ids]
            self._prefixes[doc_ids] = contexts[0] if len(contexts) == 1 else torch.cat(contexts)
        return self._prefixes[doc_ids]

    def _context(self, line: int, doc_id: str) -> Tensor:
        if doc_id not in self._contexts:
            try:
                vectors, _ = self.registry.get_context(doc_id, self.compressor_id)
            except NotFound as error:
                raise FailedPrecondition(
                    f"dataset line {line}: document {doc_id!r} has no compressed context for compressor "
                    f"{self.compressor_id!r} (run `lloco compress`): {error}"
                ) from error
            except FailedPrecondition as error:
                raise FailedPrecondition(f"dataset line {line}: {error}") from error
            self._contexts[doc_id] = vectors
        return self._contexts[doc_id]

    def _evidence(self, line: int, row: DatasetRow, context_positions: int, room: int) -> list[int]:
        """The row's evidence tokens, in what its context leaves of its documents' tokens / ``context_ratio``
        and within the ``room`` the example leaves (as serving gives evidence only the room a query leaves)."""
        document_tokens = sum(len(self._tokens(line, doc_id)) for doc_id in row.doc_ids)
        budget = min(evidence_budget(document_tokens, context_positions, self.context_ratio), room)
        if row.doc_ids not in self._indexed:  # rows naming the same documents share one index
            texts = [self._text(line, doc_id) for doc_id in row.doc_ids]
            self._indexed[row.doc_ids] = Evidence(texts, self.tokenizer)
        return self._indexed[row.doc_ids].ids(row.question, budget)

    def _text(self, line: int, doc_id: str) -> str:
        if doc_id not in self._texts:
            try:
                self._texts[doc_id] = self.registry.read_text(doc_id)
            except NotFound as error:
                raise InvalidArgument(f"dataset line {line}: unknown document {doc_id!r}") from error
        return self._texts[doc_id]

    def _tokens(self, line: int, doc_id: str) -> list[int]:
        if doc_id not in self._documents:
            self._documents[doc_id] = self.tokenizer.encode(
                self._text(line, doc_id), add_special_tokens=False
            )
        return self._documents[doc_id]

    def _document_tokens(self, line: int, doc_ids: Sequence[str]) -> list[int]:
        tokens: list[int] = []
        separator = self.tokenizer.encode(DOCUMENT_SEPARATOR, add_special_tokens=False)
        for index, doc_id in enumerate(doc_ids):
            tokens += (separator if index else []) + self._tokens(line, doc_id)
        return tokens


def collate(
    examples: Sequence[Example], embed: Callable[[Tensor], Tensor], device: torch.device | str
) -> Batch:
    """Right-pad examples into input embeddings: each row's prefix vectors, then its token embeddings (key/value
    summaries instead go right-padded into ``prefix_kv``, the embeddings holding the tokens alone).

    Args:
        examples: the rows of the batch.
        embed: token ids [B, L] -> embeddings [B, L, D] (the base model's frozen embedding table).
        device: where the batch goes.
    Returns:
        The batch; padded positions are zeros after each row's end and never reach the loss.
    Raises:
        InvalidArgument: key/value and embedding prefixes mixed in one batch.
    """
    kinds = {example.kv_prefix for example in examples if example.prefix is not None}
    if len(kinds) > 1:
        raise InvalidArgument("a batch mixes key/value summaries and prefix embeddings")
    kv = kinds == {True}
    inline = [0 if kv or example.prefix is None else example.prefix_len for example in examples]
    length = max(start + len(example.input_ids) for start, example in zip(inline, examples, strict=True))
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    target_index: list[Tensor] = []
    targets: list[Tensor] = []
    for row, (start, example) in enumerate(zip(inline, examples, strict=True)):
        end = start + len(example.input_ids)
        row_ids = torch.tensor(example.input_ids, dtype=torch.long)
        ids[row, start:end] = row_ids
        answer_start = end - example.answer_len
        # logits at position t predict the token at t + 1
        target_index.append(row * length + torch.arange(answer_start - 1, end - 1))
        targets.append(row_ids[-example.answer_len :])
    embeds = embed(ids.to(device))
    prefix_kv = prefix_lengths = None
    if kv:
        prefix_kv, prefix_lengths = _padded_prefixes(examples, device, embeds.dtype)
    elif any(inline):
        # out of place: the embedding output may be a leaf that requires grad (peft hooks it)
        prefix = torch.zeros_like(embeds, requires_grad=False)
        is_prefix = torch.zeros(len(examples), length, 1, dtype=torch.bool)
        for row, example in enumerate(examples):
            if example.prefix is not None:
                prefix[row, : example.prefix_len] = example.prefix.to(device=device, dtype=embeds.dtype)
                is_prefix[row, : example.prefix_len] = True
        embeds = torch.where(is_prefix.to(device), prefix, embeds)
    return Batch(
        embeds=embeds,
        target_index=torch.cat(target_index).to(device),
        targets=torch.cat(targets).to(device),
        tokens=sum(example.length for example in examples),
        samples=len(examples),
        prefix_kv=prefix_kv,
        prefix_lengths=prefix_lengths,
    )


def _padded_prefixes(
    examples: Sequence[Example], device: torch.device | str, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Key/value-summary prefixes right-padded into [B, P, kv_width] and each row's length [B]."""
    prefixes = [example.prefix for example in examples]
    present = [prefix for prefix in prefixes if prefix is not None]
    padded = torch.zeros(len(examples), max(p.shape[0] for p in present), present[0].shape[1])
    lengths = torch.zeros(len(examples), dtype=torch.long)
    for row, prefix in enumerate(prefixes):
        if prefix is not None:
            padded[row, : prefix.shape[0]] = prefix.float().cpu()
            lengths[row] = prefix.shape[0]
    return padded.to(device=device, dtype=dtype), lengths.to(device)
