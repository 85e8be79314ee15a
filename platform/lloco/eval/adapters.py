"""LoRA adapters for the evaluation's LoRA modes, trained in-process on examples the harness builds.

The finetune recipe (``LoraFinetune``) reads its rows and contexts from a tenant registry in S3; the
evaluation runs where there is no store (a lone GPU host), so it drives the recipe's parts directly:
``Example``/``collate`` (prefix + prompt + answer, loss on the answer) and ``answer_loss`` from
``lloco.finetune``, peft LoRA with the platform's ``FinetuneSettings`` (rank, alpha, dropout, targets,
batch size; learning rate unless overridden), AdamW with linear warmup and cosine decay.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from lloco.config import FinetuneSettings
from lloco.errors import InvalidArgument
from lloco.finetune.data import Example, collate
from lloco.finetune.train import MAX_GRAD_NORM, answer_loss, peft_files
from lloco.logs import get_logger
from lloco.model import LoadedModel

log = get_logger(__name__)


@dataclass(frozen=True)
class TrainedAdapter:
    """PEFT files of a trained adapter and how its training went."""

    files: dict[str, bytes]
    steps: int
    first_loss: float
    last_loss: float
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "seconds": round(self.seconds, 2),
        }


def train_adapter(
    base: LoadedModel,
    examples: list[Example],
    hp: FinetuneSettings,
    steps: int,
    learning_rate: float | None = None,
    seed: int = 0,
) -> TrainedAdapter:
    """Train a LoRA adapter on ``examples`` for ``steps`` optimizer steps; ``base`` is left unchanged.

    Each step takes ``hp.batch_size`` examples from a seeded shuffle (reshuffled every pass).

    Raises:
        InvalidArgument: no examples or no steps.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    if not examples or steps < 1:
        raise InvalidArgument(f"adapter training needs examples and steps, got {len(examples)}, {steps}")
    device = base.model.device
    torch.manual_seed(seed)
    config = LoraConfig(
        r=hp.rank,
        lora_alpha=hp.alpha,
        lora_dropout=hp.dropout,
        target_modules=list(hp.target_modules),
        bias="none",
    )
    peft_model = get_peft_model(base.model, config)
    model = peft_model.get_base_model()
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate or hp.learning_rate, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(hp.warmup_ratio * steps), steps)
    rng = random.Random(seed)
    order: list[int] = []
    losses: list[float] = []
    started = time.perf_counter()
    try:
        for _ in range(steps):
            batch_examples = []
            for _ in range(min(hp.batch_size, len(examples))):
                if not order:
                    order = list(range(len(examples)))
                    rng.shuffle(order)
                batch_examples.append(examples[order.pop()])
            batch = collate(batch_examples, model.embed, device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = answer_loss(model, batch)
            answer_tokens = sum(example.answer_len for example in batch_examples)
            (loss / answer_tokens).backward()
            torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item() / answer_tokens)
        files = peft_files(peft_model, base.model_id, torch.float16)
    finally:
        peft_model.unload()
        base.model.eval()
    seconds = time.perf_counter() - started
    log.info(
        "eval adapter trained",
        steps=steps,
        first_loss=losses[0],
        last_loss=losses[-1],
        seconds=round(seconds, 2),
    )
    return TrainedAdapter(files, steps, losses[0], sum(losses[-10:]) / len(losses[-10:]), seconds)
