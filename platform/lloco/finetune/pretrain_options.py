"""What one compressor pretraining run does (``PretrainOptions``), validated before anything loads.

The options are also the run's identity on disk: a checkpoint records them, and a resumed run must agree
on every field of ``GEOMETRY`` (the shapes of what is trained, and which of them train).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lloco.model.lora import MODULE_OF

ALL_TARGETS = tuple(MODULE_OF)
GEOMETRY = (
    "segment_len",
    "k",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "reader_rank",
    "reader_alpha",
    "reader_targets",
    "reader_only",
    "summary_form",
)


class PretrainOptions(BaseModel):
    """What one pretraining run does; the base model comes from ``settings.model``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus: Path = Field(description="Corpus file (`lloco pretrain-corpus`), tokenized for the base model.")
    output: Path = Field(description="Directory that receives the compressor, pretrain.json and checkpoint/.")
    init_from: Path | None = Field(
        None,
        description="A compressor directory whose weights (and reader) start this run; its record is kept.",
    )
    resume: bool = Field(True, description="Continue from output/checkpoint/ when it exists.")
    segment_len: int = Field(512, ge=8, description="S: tokens per segment (mean of the random lengths).")
    k: int = Field(32, ge=1, description="Summary vectors per segment (compression S/k).")
    summary_form: Literal["embeddings", "kv"] = Field(
        "embeddings",
        description="Summaries as input embeddings (final hidden states x scale) or as every layer's keys and "
        "values of the summary positions (lloco.model.kv_summary).",
    )
    segments: int = Field(8, ge=2, description="Segments per LM training sequence.")
    jitter: float = Field(0.5, ge=0, lt=1, description="LM segment lengths are uniform in [S(1-j), S(1+j)].")
    bptt_segments: int = Field(2, ge=1, description="Decoded LM segments between stop-gradients.")
    reconstruction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Fraction of LM segments decoded after their own summaries too (autoencoding).",
    )
    qa_data: Path | None = Field(None, description="Directory of the QA train splits (SQuAD, HotpotQA).")
    qa_cache: Path | None = Field(
        None, description="Tokenized QA examples (.npz): read if present, else written."
    )
    qa_fraction: float = Field(0.0, ge=0, le=1, description="Fraction of steps that are QA steps.")
    qa_max_tokens: int = Field(4096, ge=8, description="QA documents are cut to this many tokens.")
    batch_size: int = Field(
        8,
        ge=1,
        description="LM sequences per step (a QA step takes as many document tokens, at most 2x the rows).",
    )
    learning_rate: float = Field(5e-4, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(50, ge=0, description="Linear warmup, then cosine decay to 10% of the peak.")
    lora_rank: int = Field(16, ge=1, le=256, description="Encoder LoRA rank.")
    lora_alpha: float = Field(32.0, gt=0)
    lora_targets: tuple[str, ...] = Field(
        ALL_TARGETS, min_length=1, description="Encoder projections with LoRA."
    )
    reader_rank: int = Field(0, ge=0, le=256, description="Decoder-side reader LoRA rank; 0: frozen decoder.")
    reader_alpha: float = Field(32.0, gt=0)
    reader_targets: tuple[str, ...] = Field(ALL_TARGETS, min_length=1)
    reader_only: bool = Field(
        False,
        description="Train the reader alone on init_from's compressor, which stays as it is: does a decoder "
        "that learned to read the summaries find what a frozen one cannot?",
    )
    max_steps: int | None = Field(None, ge=1, description="The run ends after this many optimizer steps.")
    time_budget_s: float | None = Field(None, gt=0, description="The run ends after this much training time.")
    stop_after_s: float | None = Field(
        None,
        gt=0,
        description="This invocation stops (checkpoint + compressor) after this much training time.",
    )
    stop_after_steps: int | None = Field(
        None, ge=1, description="This invocation stops after this many steps."
    )
    checkpoint_every_s: float | None = Field(None, gt=0, description="Also checkpoint this often.")
    activation_checkpointing: bool = Field(
        False, description="Recompute each layer in backward (bigger batches)."
    )
    compile: bool = Field(False, description="torch.compile the layer function (dynamic shapes; GPU runs).")
    eval_windows: int = Field(32, ge=1, description="Held-out windows for the perplexity evaluation.")
    eval_segments: int = Field(4, ge=2, description="Segments per held-out window.")
    eval_batch_size: int = Field(8, ge=1)
    eval_qa: int = Field(64, ge=0, description="Held-out QA examples for the answer-NLL probe.")
    eval_facts: int = Field(
        8,
        ge=0,
        description="Passkey validation documents whose planted facts the fact-recall probe reads back.",
    )
    log_every: int = Field(10, ge=1, description="Steps per loss-curve point.")
    device: str | None = Field(None, description="cuda / cpu; None: cuda when available.")
    seed: int = Field(0, ge=0)

    @field_validator("lora_targets", "reader_targets")
    @classmethod
    def _known_targets(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(targets) - set(ALL_TARGETS))
        if unknown:
            raise ValueError(f"unknown LoRA targets {unknown}; choose from {list(ALL_TARGETS)}")
        return targets

    @model_validator(mode="after")
    def _bounded(self) -> PretrainOptions:
        if self.max_steps is None and self.time_budget_s is None:
            raise ValueError("set max_steps or time_budget_s (or both): training must end")
        if self.qa_fraction > 0 and self.qa_data is None and self.qa_cache is None:
            raise ValueError("qa_fraction > 0 needs qa_data or an existing qa_cache")
        if self.reader_only and self.init_from is None:
            raise ValueError("reader_only trains a reader for an existing compressor: give init_from")
        return self

    def segment_lengths(self, rng: np.random.Generator) -> list[int]:
        """Random breakpoints: ``segments`` lengths around ``segment_len``."""
        low = max(1, round(self.segment_len * (1 - self.jitter)))
        high = max(low, round(self.segment_len * (1 + self.jitter)))
        return rng.integers(low, high + 1, size=self.segments).tolist()
