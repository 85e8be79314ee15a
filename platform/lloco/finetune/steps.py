"""The one LoRA setup and the one train step of every LoRA training in lloco.

Every trainable LoRA starts in :func:`start_lora`. A tenant's finetune (``LoraFinetune``) and the evaluation's
LoRA modes (``lloco.eval.adapters``) build theirs with :func:`tenant_lora` and take optimizer steps with
:func:`train_step`: rows become
``[prefix] + prompt + answer`` (``lloco.finetune.data``), the frozen base model runs its inference path with
the adapter (``TrainableLora``: no peft wrapping, fused projections), and the loss is the cross-entropy of
the answer tokens only. Compressor pretraining starts its encoder and reader LoRAs with :func:`start_lora`
(its own geometry), runs them with ``lora_hidden`` and applies its gradients with :func:`apply_gradients`, so
clipping and stepping are one piece of code.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lloco.config import FinetuneSettings
from lloco.finetune.data import Batch, Example, collate
from lloco.logs import get_logger
from lloco.model import Llama, LlamaConfig, TrainableLora
from lloco.model.kv_summary import prefix_hidden
from lloco.model.trainable_lora import lora_hidden

log = get_logger(__name__)

MAX_GRAD_NORM = 1.0


def start_lora(
    config: LlamaConfig,
    rank: int,
    alpha: float,
    targets: Sequence[str],
    init: dict[str, bytes] | None = None,
    seed: int = 0,
    dropout: float = 0.0,
) -> TrainableLora:
    """An adapter to train: ``rank``, ``alpha`` and ``targets`` with A drawn from ``seed`` and B zero (the base
    model exactly), or, given ``init`` (PEFT files: a compressor's reader, a finished compressor's encoder),
    their geometry and weights; ``dropout`` is this training's either way.

    Raises:
        InvalidArgument: a bad geometry; init files a ``TrainableLora`` cannot hold (rank/alpha patterns,
            rsLoRA, DoRA, bias) or that do not fit the model.
    """
    if init is not None:
        return TrainableLora.from_peft_files(config, init, dropout=dropout)
    return TrainableLora(config, rank, alpha, tuple(targets), seed, dropout=dropout)


def tenant_lora(
    config: LlamaConfig, hp: FinetuneSettings, init: dict[str, bytes] | None = None, seed: int = 0
) -> TrainableLora:
    """A tenant adapter (finetune, the evaluation's LoRA modes): ``start_lora`` with the platform's finetune
    geometry and dropout."""
    return start_lora(config, hp.rank, hp.alpha, hp.target_modules, init, seed, hp.dropout)


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on GPU; a no-op elsewhere (CPU trains in fp32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def answer_loss(
    model: Llama, lora: TrainableLora | None, batch: Batch, gradient_checkpointing: bool = False
) -> Tensor:
    """Summed cross-entropy of the answer tokens of ``batch``, through ``lora``.

    Only the positions that predict an answer token are projected to the vocabulary, so long prefixes cost
    no logits. ``gradient_checkpointing`` recomputes each layer during backward instead of keeping its
    activations.
    """
    if batch.prefix_kv is not None:
        bound = None if lora is None else lora.bind(model.dtype)
        hidden = prefix_hidden(
            model, batch.embeds, batch.prefix_kv, bound, None, gradient_checkpointing, batch.prefix_lengths
        )[0]
    else:
        hidden = lora_hidden(model, batch.embeds, lora, gradient_checkpointing)
    logits = model.lm_head(hidden.flatten(0, 1)[batch.target_index]).float()
    return F.cross_entropy(logits, batch.targets, reduction="sum")


@dataclass(frozen=True)
class StepStats:
    """One optimizer step: mean loss per answer token, positions and rows processed."""

    loss: float
    tokens: int
    samples: int


def apply_gradients(
    optimizer: torch.optim.Optimizer,
    parameters: Iterable[Tensor],
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    world_size: int = 1,
) -> bool:
    """Average the gradients over ``world_size`` workers (a torch.distributed group is up when > 1; LoRA
    gradients are small, so one all-reduce per tensor is cheap), clip their norm at ``MAX_GRAD_NORM``, take
    the optimizer (and scheduler) step, and clear them.

    A step whose gradient norm is not finite (an overflow in one batch) is skipped, gradients cleared:
    applied, it would turn every weight into NaN for good. Returns whether the step was taken."""
    parameters = list(parameters)
    if world_size > 1:
        import torch.distributed as dist

        for param in parameters:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad)
            param.grad /= world_size
    norm = torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
    finite = bool(torch.isfinite(norm))
    if finite:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    else:
        log.warning("optimizer step skipped: gradient norm is not finite", norm=float(norm))
    optimizer.zero_grad(set_to_none=True)
    return finite


def train_step(
    model: Llama,
    lora: TrainableLora,
    micro_batches: Sequence[Sequence[Example]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    gradient_checkpointing: bool = False,
    world_size: int = 1,
) -> StepStats:
    """One optimizer step of ``lora`` over gradient-accumulated micro-batches; the loss is a mean per answer
    token over all of them (so accumulation equals one large batch)."""
    answer_tokens = sum(example.answer_len for batch in micro_batches for example in batch)
    total_loss, tokens, samples = 0.0, 0, 0
    for examples in micro_batches:
        batch = collate(examples, model.embed, device)
        with autocast(device):
            loss = answer_loss(model, lora, batch, gradient_checkpointing)
        (loss / answer_tokens).backward()
        total_loss += loss.item()
        tokens, samples = tokens + batch.tokens, samples + batch.samples
    apply_gradients(optimizer, lora.parameters(), scheduler, world_size)
    return StepStats(total_loss / answer_tokens, tokens, samples)
