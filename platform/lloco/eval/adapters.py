"""LoRA adapters for the evaluation's LoRA modes, trained in-process on examples the harness builds.

The finetune recipe (``LoraFinetune``) reads its rows and contexts from a tenant registry in S3; the
evaluation runs where there is no store (a lone GPU host), so it takes the recipe's parts directly: the
examples (``Example``: prefix + prompt + answer, loss on the answer), the LoRA setup and the train step of
``lloco.finetune.steps`` with the platform's ``FinetuneSettings`` (rank, alpha, dropout, targets, batch size;
learning rate unless overridden), AdamW with linear warmup and cosine decay.

An adapter starts from a seeded random init (A random, B zero: the base model exactly), or from given PEFT
files (``init``: e.g. a "reader" LoRA pretrained with the compressor), whose rank, alpha and targets it then
keeps. The init's digest is recorded, so two adapters that differ only in their data can be shown to have
started from the same weights.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from lloco.config import FinetuneSettings
from lloco.errors import InvalidArgument
from lloco.finetune.data import Example
from lloco.finetune.steps import tenant_lora, train_step
from lloco.logs import get_logger
from lloco.model import LoadedModel

log = get_logger(__name__)


@dataclass(frozen=True)
class TrainedAdapter:
    """PEFT files of a trained adapter and how its training went."""

    files: dict[str, bytes]
    steps: int
    learning_rate: float | None  # the peak learning rate it trained with (None: not trained here)
    examples: int  # the training examples it drew its batches from
    first_loss: float
    last_loss: float
    seconds: float
    init: str  # "random (seed N)" or "given"
    init_sha256: str  # state_digest of the LoRA weights before the first step

    def summary(self) -> dict[str, Any]:
        return {
            "init": self.init,
            "init_sha256": self.init_sha256,
            "steps": self.steps,
            "learning_rate": self.learning_rate,
            "examples": self.examples,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "seconds": round(self.seconds, 2),
        }


def state_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of LoRA weights in PEFT's key names, as fp32 in key order: equal digests, equal weights."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def train_adapter(
    base: LoadedModel,
    examples: list[Example],
    hp: FinetuneSettings,
    steps: int,
    learning_rate: float | None = None,
    seed: int = 0,
    init: dict[str, bytes] | None = None,
) -> TrainedAdapter:
    """Train a LoRA adapter on ``examples`` for ``steps`` optimizer steps; ``base`` is left unchanged.

    Each step takes ``hp.batch_size`` examples from a seeded shuffle (reshuffled every pass). The adapter
    starts from ``init`` (PEFT files, their own geometry) when given, else from a random init under ``seed``.

    Raises:
        InvalidArgument: no examples or no steps; init files that do not fit the model.
    """
    from transformers import get_cosine_schedule_with_warmup

    if not examples or steps < 1:
        raise InvalidArgument(f"adapter training needs examples and steps, got {len(examples)}, {steps}")
    device = base.model.device
    torch.manual_seed(seed)  # LoRA dropout
    lora = tenant_lora(base.config, hp, init, seed).to(device)
    init_sha256 = state_digest(lora.peft_state())
    base.model.requires_grad_(False)
    lora.train()
    started = time.perf_counter()
    learning_rate = learning_rate or hp.learning_rate
    optimizer = torch.optim.AdamW(lora.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(hp.warmup_ratio * steps), steps)
    rng = random.Random(seed)
    order: list[int] = []
    losses: list[float] = []
    for _ in range(steps):
        batch_examples = []
        for _ in range(min(hp.batch_size, len(examples))):
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch_examples.append(examples[order.pop()])
        losses.append(train_step(base.model, lora, [batch_examples], optimizer, scheduler, device).loss)
    files = lora.peft_files(base.model_id, torch.float16)
    seconds = time.perf_counter() - started
    log.info(
        "eval adapter trained",
        steps=steps,
        learning_rate=learning_rate,
        examples=len(examples),
        first_loss=losses[0],
        last_loss=losses[-1],
        seconds=round(seconds, 2),
    )
    init_name = "given" if init is not None else f"random (seed {seed})"
    last_loss = sum(losses[-10:]) / len(losses[-10:])
    return TrainedAdapter(
        files, steps, learning_rate, len(examples), losses[0], last_loss, seconds, init_name, init_sha256
    )
