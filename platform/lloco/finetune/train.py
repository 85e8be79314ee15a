"""The LoRA finetuning recipe: one flat ``setup / train / save / cleanup`` class (STYLE rule 3).

One tenant, one dataset: rows become ``[compressed context] + chat prompt + answer`` (or the raw document
tokens in ``full`` mode), a ``TrainableLora`` on the frozen base model (``lloco.finetune.steps``: the setup
and train step the evaluation shares), AdamW with a cosine schedule after a linear warmup, gradient
accumulation, bf16 autocast on GPU, loss on answer tokens only.
The recipe knows nothing of Ray: it takes its rank and world size, and a ``report`` callback that receives
metrics and (from rank 0) a checkpoint directory, which the job wires to ``ray.train.report``.
A checkpoint is a loadable PEFT adapter plus the optimizer, scheduler and step, so a resumed run
continues exactly where the checkpoint left it.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lloco.config import Settings
from lloco.errors import InvalidArgument
from lloco.finetune.data import Example, ExampleBuilder, collate
from lloco.finetune.options import TrainOptions
from lloco.finetune.steps import StepStats, answer_loss, autocast, tenant_lora, train_step
from lloco.logs import get_logger
from lloco.model import Llama, TrainableLora, load_compressor, load_model
from lloco.model.lora import CONFIG_FILE, WEIGHTS_FILE
from lloco.registry import DatasetRow, Registry
from lloco.storage import ObjectStore

log = get_logger(__name__)

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
TRAIN_STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.pt"
LOSS_WINDOW = 10


Report = Callable[[dict[str, Any], Path | None], None]
OnStep = Callable[
    [dict[str, Any]], None
]  # a step's metrics (step, total_steps, epoch, loss, ...), rank 0 only


def split_rows(rows: Sequence[DatasetRow], eval_fraction: float, seed: int) -> tuple[list, list]:
    """(line, row) pairs split into train and held-out eval, by a seeded permutation; lines are 1-based."""
    numbered = list(enumerate(rows, start=1))
    count = int(len(numbered) * eval_fraction)
    if count == 0:
        return numbered, []
    order = torch.randperm(len(numbered), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[:count])
    return [p for i, p in enumerate(numbered) if i not in held_out], [
        p for i, p in enumerate(numbered) if i in held_out
    ]


class LoraFinetune:
    """Train one tenant's LoRA adapter on one dataset.

    Args:
        settings: platform settings (store, base model, compressor, ``finetune`` hyperparameters).
        tenant, dataset, adapter, job_id: what is trained, and for the record.
        options: run options (mode, held-out fraction, steps, checkpoints).
        rank, world_size: this worker among data-parallel workers (gradients are averaged across them).
        report: receives ``(metrics, checkpoint_dir or None)`` at every checkpoint and at the end, on every
            rank (rank 0 passes the directory); None keeps checkpoints local (tests, benchmarks).
    """

    def __init__(
        self,
        settings: Settings,
        tenant: str,
        dataset: str,
        adapter: str,
        job_id: str,
        options: TrainOptions,
        rank: int = 0,
        world_size: int = 1,
        report: Report | None = None,
        on_step: OnStep | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise InvalidArgument(f"rank {rank} is outside world size {world_size}")
        self.settings, self.options = settings, options
        self.tenant, self.dataset, self.adapter, self.job_id = tenant, dataset, adapter, job_id
        self.rank, self.world_size, self.report = rank, world_size, report
        self.on_step = on_step
        self.history: list[dict[str, float]] = []
        self.step = 0
        self.resumed_from_step = 0
        self.elapsed_s = 0.0
        self.started_at = time.time()
        self._workdir = Path(tempfile.mkdtemp(prefix=f"lloco-finetune-{tenant}-"))

    # -- setup ------------------------------------------------------------------------------------------

    def setup(self, resume_from: Path | None = None) -> None:
        """Load the base model and data, build the LoRA and the optimizer; restore a checkpoint if given."""
        from transformers import get_cosine_schedule_with_warmup

        hp = self.settings.finetune
        torch.manual_seed(self.options.seed)
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if self._use_gpu() else torch.device("cpu")
        )
        store = ObjectStore(self.settings.store)
        registry = Registry(store, self.tenant)
        rows = registry.read_dataset(self.dataset)
        base = load_model(
            self.settings.model.base_model,
            self.settings.model.cache_dir,
            store,
            self.settings.model.dtype,
            self.device,
        )
        self.model_id, self.tokenizer = base.model_id, base.tokenizer
        self.compressor_id = None
        self.context_ratio = hp.context_ratio if self.options.mode == "compressed" else 0
        reader = None
        kv_prefix = False
        if self.options.mode == "compressed":
            compressor = load_compressor(
                self.settings.model.compressor, base, self.settings.model.cache_dir, store
            )
            self.compressor_id, reader = compressor.compressor_id, compressor.reader_files
            kv_prefix = compressor.summary_form == "kv"
            del compressor
        self.init = "reader" if reader is not None else "fresh"
        eos = (
            self.tokenizer.eos_token_id
            if self.tokenizer.eos_token_id is not None
            else base.config.eos_token_ids[0]
        )
        builder = ExampleBuilder(
            registry,
            self.tokenizer,
            self.options.mode,
            self.compressor_id,
            self.options.max_length or base.config.max_position_embeddings,
            eos,
            kv_prefix,
            self.context_ratio,
        )
        train_rows, eval_rows = split_rows(rows, self.options.eval_fraction, self.options.seed)
        self.train_examples = builder.build(train_rows)
        self.eval_examples = builder.build(eval_rows)
        if len(self.train_examples) < self.world_size:
            raise InvalidArgument(
                f"dataset {self.dataset!r} has {len(self.train_examples)} training rows, fewer than "
                f"{self.world_size} workers"
            )
        self.model: Llama = base.model.requires_grad_(False)
        self.lora: TrainableLora = tenant_lora(base.config, hp, reader, self.options.seed).to(self.device)
        self.lora.train()
        self.optimizer = torch.optim.AdamW(self.lora.parameters(), lr=hp.learning_rate, weight_decay=0.0)
        per_step = hp.batch_size * hp.grad_accum
        self.steps_per_epoch = math.ceil(self._shard_size() / per_step)
        self.total_steps = self.options.max_steps or max(1, math.ceil(hp.epochs * self.steps_per_epoch))
        warmup = math.ceil(hp.warmup_ratio * self.total_steps)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup, self.total_steps)
        self.checkpoint_every = self.options.checkpoint_every_steps or self.steps_per_epoch
        if resume_from is not None:
            self._restore(resume_from)
        torch.manual_seed(self.options.seed + self.step)
        log.info(
            "finetune setup",
            tenant=self.tenant,
            job_id=self.job_id,
            mode=self.options.mode,
            rank=self.rank,
            device=str(self.device),
            train_rows=len(self.train_examples),
            eval_rows=len(self.eval_examples),
            total_steps=self.total_steps,
            start_step=self.step,
            trainable_params=sum(p.numel() for p in self.lora.parameters()),
        )

    def _use_gpu(self) -> bool:
        return self.settings.finetune.gpus_per_worker > 0 and torch.cuda.is_available()

    def _shard_size(self) -> int:
        return len(self.train_examples) // self.world_size

    # -- train ------------------------------------------------------------------------------------------

    def train(self) -> None:
        """Optimizer steps until ``total_steps``, checkpointing every ``checkpoint_every`` steps."""
        while self.step < self.total_steps:
            started = time.perf_counter()
            lr = self.scheduler.get_last_lr()[0]  # the rate this step applies
            stats = self._train_step(self._step_examples(self.step))
            self.step += 1
            seconds = time.perf_counter() - started
            self.elapsed_s += seconds
            metrics = {
                "step": self.step,
                "epoch": round(self.step / self.steps_per_epoch, 4),
                "loss": stats.loss,
                "lr": lr,
                "tokens_per_s": stats.tokens / seconds,
                "samples_per_s": stats.samples / seconds,
            }
            if self.device.type == "cuda":
                metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.history.append(metrics)
            if self.rank == 0:
                log.info(
                    "train step",
                    tenant=self.tenant,
                    job_id=self.job_id,
                    total_steps=self.total_steps,
                    **metrics,
                )
                if self.on_step is not None:
                    self.on_step({**metrics, "total_steps": self.total_steps})
            if self.step % self.checkpoint_every == 0 and self.step < self.total_steps:
                self._checkpoint(final=False)

    def _step_examples(self, step: int) -> list[list[Example]]:
        """This worker's micro-batches of optimizer step ``step`` (a seeded shuffle per epoch)."""
        hp = self.settings.finetune
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(
            len(self.train_examples), generator=torch.Generator().manual_seed(self.options.seed + epoch)
        )
        shard = order[: self._shard_size() * self.world_size][self.rank :: self.world_size].tolist()
        chosen = shard[index * hp.batch_size * hp.grad_accum : (index + 1) * hp.batch_size * hp.grad_accum]
        return [
            [self.train_examples[i] for i in chosen[start : start + hp.batch_size]]
            for start in range(0, len(chosen), hp.batch_size)
        ]

    def _train_step(self, micro_batches: list[list[Example]]) -> StepStats:
        return train_step(
            self.model,
            self.lora,
            micro_batches,
            self.optimizer,
            self.scheduler,
            self.device,
            self.options.gradient_checkpointing,
            self.world_size,
        )

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss per answer token on the held-out rows (None when nothing is held out)."""
        if not self.eval_examples:
            return None
        self.lora.eval()
        total, count = 0.0, 0
        size = self.settings.finetune.batch_size
        for start in range(0, len(self.eval_examples), size):
            examples = self.eval_examples[start : start + size]
            batch = collate(examples, self.model.embed, self.device)
            with autocast(self.device):
                total += answer_loss(self.model, self.lora, batch).item()
            count += sum(example.answer_len for example in examples)
        self.lora.train()
        return total / count

    # -- save -------------------------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        """Evaluate, then write and report the final checkpoint (the adapter to publish); returns the record."""
        record = self.record(self.evaluate() if self.rank == 0 else None)
        self._checkpoint(final=True, record=record)
        log.info(
            "finetune finished",
            tenant=self.tenant,
            job_id=self.job_id,
            **{k: record[k] for k in ("steps", "train_loss", "eval_loss", "seconds")},
        )
        return record

    def record(self, eval_loss: float | None) -> dict[str, Any]:
        """What train.json says about the run."""
        hp = self.settings.finetune
        recent = [m["loss"] for m in self.history[-LOSS_WINDOW:]]
        return {
            "job_id": self.job_id,
            "tenant": self.tenant,
            "dataset": self.dataset,
            "adapter": self.adapter,
            "mode": self.options.mode,
            "base_model": self.model_id,
            "compressor_id": self.compressor_id,
            "context_ratio": self.context_ratio,
            "train_rows": len(self.train_examples),
            "eval_rows": len(self.eval_examples),
            "steps": self.step,
            "epochs": round(self.step / self.steps_per_epoch, 4),
            "train_loss": sum(recent) / len(recent) if recent else None,
            "first_loss": self.history[0]["loss"] if self.history else None,
            "eval_loss": eval_loss,
            "seconds": round(self.elapsed_s, 3),
            "started_at": self.started_at,
            "finished_at": time.time(),
            "resumed_from_step": self.resumed_from_step,
            "workers": self.world_size,
            "lora": {
                "r": self.lora.rank,
                "alpha": self.lora.alpha,
                "dropout": self.lora.dropout,
                "targets": sorted(self.lora.targets),
                "init": self.init,
            },
            "learning_rate": hp.learning_rate,
            "batch_size": hp.batch_size,
            "grad_accum": hp.grad_accum,
        }

    def adapter_files(self) -> dict[str, bytes]:
        """The adapter in PEFT's format (fp32, as trained), with the keys peft writes for HF's LlamaForCausalLM."""
        return self.lora.peft_files(self.model_id, torch.float32)

    def _checkpoint(self, final: bool, record: dict[str, Any] | None = None) -> None:
        """Write the adapter + optimizer state (rank 0) and report it; every rank reports, as Ray requires."""
        metrics = {
            "step": self.step,
            "final": final,
            "loss": self.history[-1]["loss"] if self.history else None,
        }
        if record is not None:
            metrics.update(eval_loss=record["eval_loss"], train_loss=record["train_loss"])
        directory = None
        if self.rank == 0:
            directory = self._workdir / f"step-{self.step:08d}"
            directory.mkdir(parents=True, exist_ok=True)
            for name, data in self.adapter_files().items():
                (directory / name).write_bytes(data)
            torch.save(
                {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                directory / OPTIMIZER_FILE,
            )
            state = {
                "step": self.step,
                "elapsed_s": self.elapsed_s,
                "final": final,
                "history": self.history,
                "record": record,
            }
            (directory / TRAIN_STATE_FILE).write_text(json.dumps(state))
        if self.report is not None:
            self.report(metrics, directory)
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
        log.info(
            "checkpoint", tenant=self.tenant, job_id=self.job_id, step=self.step, final=final, rank=self.rank
        )

    def _restore(self, directory: Path) -> None:
        """Continue from a checkpoint: adapter weights, optimizer, scheduler, step, loss history."""
        files = {name: (directory / name).read_bytes() for name in ADAPTER_FILES}
        restored = TrainableLora.from_peft_files(self.model.config, files, self.lora.dropout)
        self.lora.load_state_dict(restored.state_dict())
        state = torch.load(directory / OPTIMIZER_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        train_state = json.loads((directory / TRAIN_STATE_FILE).read_text())
        self.step = self.resumed_from_step = int(train_state["step"])
        self.elapsed_s = float(train_state["elapsed_s"])
        self.history = list(train_state["history"])
        log.info("resumed from checkpoint", tenant=self.tenant, job_id=self.job_id, step=self.step)

    # -- cleanup ----------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Free the model and its accelerator memory, remove local checkpoint files."""
        for name in ("lora", "model", "optimizer", "scheduler"):
            self.__dict__.pop(name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        shutil.rmtree(self._workdir, ignore_errors=True)
