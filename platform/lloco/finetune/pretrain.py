"""Compressor pretraining: the AutoCompressor objective for a base model that has no compressor yet.

A training sequence is cut at random breakpoints into ``segments`` pieces (lengths uniform in
``[S(1 - jitter), S(1 + jitter)]``, shared by the rows of a step). Segment by segment:

- encode segment i: ``[summaries of segments < i] + segment i + k summary embeddings`` through the base
  model *with* the compressor's LoRA; the final-normed hidden states at the k summary positions times a
  learned per-channel output scale are segment i's summary vectors (summary accumulation, exactly what
  ``Compressor.compress`` computes; the scale starts at the embedding table's size, since the final norm
  fixes the size of its output at ~15x a token embedding's and the decoder reads the vectors as inputs);
- decode segment i through the base model *without* LoRA, next-token loss on every token of the segment
  (the first is predicted from the last summary vector), after either ``[summaries of segments < i]``
  (AutoCompressor's next-segment step) or, for a ``reconstruction`` fraction of the segments,
  ``[summaries of segments <= i]`` (autoencoding, as the In-Context Autoencoder pretrains the same
  architecture: it makes the summaries hold their segment's content, which is what questions about a
  compressed document need; next-segment prediction alone gives a weak signal in a short run).

The decoder is the frozen base model because that is what serves queries: the tenant's LoRA slot sits
on it, and the compressor's LoRA only runs when documents are compressed. Only the LoRA, the k summary
embeddings and the output scale train. Stop-gradient as in the AutoCompressors paper: every
``bptt_segments`` decoded segments the loss is backpropagated and the summaries produced so far are
detached, so memory stays bounded and gradients reach back a bounded number of compression steps.

The recipe is a flat ``setup / train / save / cleanup`` class that knows nothing of Ray; ``pretrain``
runs it in one process (one GPU, or the CPU) and ``run_pretrain_job`` wraps the same function in a
Ray Train ``TorchTrainer``. ``save`` writes the compressor (``Compressor.save`` format: summary
embeddings + the LoRA as PEFT files, kept apart from the base weights) and ``pretrain.json``, the record:
command, corpus, options, steps, time, loss curve and held-out next-segment perplexities.
"""

from __future__ import annotations

import gc
import json
import math
import platform as host_platform
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from lloco.config import Settings
from lloco.errors import FailedPrecondition, Internal
from lloco.finetune.corpus import Corpus
from lloco.logs import get_logger
from lloco.model import Compressor, Llama, LoadedModel, load_model
from lloco.model.lora import CONFIG_FILE, WEIGHTS_FILE

log = get_logger(__name__)

RECORD_FILE = "pretrain.json"
ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_GRAD_NORM = 1.0
MIN_LR_FRACTION = 0.1

Report = Callable[[dict[str, Any], Path | None], None]


class _LossWindow:
    """Losses of the steps between two loss-curve points, per kind of decoded segment."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.tokens = 0
        self.started = time.perf_counter()

    def add(self, sums: dict[str, float], tokens: int) -> None:
        for key, value in sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.tokens += tokens

    def means(self) -> dict[str, float]:
        """Mean loss per token: overall, next-segment, reconstruction (when there were any)."""
        means = {}
        total, count = 0.0, 0
        for kind in ("next", "reconstruct"):
            if self.sums.get(f"{kind}_tokens"):
                means[f"{kind}_loss"] = self.sums[kind] / self.sums[f"{kind}_tokens"]
                total, count = total + self.sums[kind], count + self.sums[f"{kind}_tokens"]
        return {"loss": total / count, **means} if count else means


class PretrainOptions(BaseModel):
    """What one pretraining run does; the base model comes from ``settings.model``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus: Path = Field(description="Corpus file (`lloco pretrain-corpus`), tokenized for the base model.")
    output: Path = Field(description="Directory that receives the compressor and pretrain.json.")
    segment_len: int = Field(512, ge=8, description="S: tokens per segment (mean of the random lengths).")
    k: int = Field(32, ge=1, description="Summary vectors per segment.")
    segments: int = Field(8, ge=2, description="Segments per training sequence.")
    jitter: float = Field(0.5, ge=0, lt=1, description="Segment lengths are uniform in [S(1-j), S(1+j)].")
    bptt_segments: int = Field(2, ge=1, description="Decoded segments between stop-gradients.")
    reconstruction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Fraction of segments decoded after their own summaries too (autoencoding, as ICAE); "
        "the others after the earlier summaries only (AutoCompressor's next-segment step).",
    )
    batch_size: int = Field(8, ge=1, description="Sequences per optimizer step.")
    learning_rate: float = Field(
        5e-4, gt=0, description="Peak AdamW learning rate (LoRA and summary embeddings)."
    )
    warmup_steps: int = Field(50, ge=0, description="Linear warmup, then cosine decay to 10% of the peak.")
    lora_rank: int = Field(16, ge=1, le=256)
    lora_alpha: float = Field(32.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_targets: tuple[str, ...] = Field(
        ENCODER_TARGETS, min_length=1, description="Projections of the encoder that get LoRA."
    )
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    time_budget_s: float | None = Field(None, gt=0, description="Stop after this much training time.")
    eval_windows: int = Field(32, ge=1, description="Held-out windows for the perplexity evaluation.")
    eval_segments: int = Field(4, ge=2, description="Segments per held-out window.")
    eval_batch_size: int = Field(8, ge=1)
    log_every: int = Field(10, ge=1, description="Steps per loss-curve point.")
    device: str | None = Field(None, description="cuda / cpu; None: cuda when available.")
    seed: int = Field(0, ge=0)

    @field_validator("lora_targets")
    @classmethod
    def _known_targets(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(targets) - set(ENCODER_TARGETS))
        if unknown:
            raise ValueError(f"unknown LoRA targets {unknown}; choose from {list(ENCODER_TARGETS)}")
        return targets

    @model_validator(mode="after")
    def _bounded(self) -> PretrainOptions:
        if self.max_steps is None and self.time_budget_s is None:
            raise ValueError("set max_steps or time_budget_s (or both): training must end")
        return self

    def segment_lengths(self, rng: np.random.Generator) -> list[int]:
        """Random breakpoints: ``segments`` lengths around ``segment_len``."""
        low = max(1, round(self.segment_len * (1 - self.jitter)))
        high = max(low, round(self.segment_len * (1 + self.jitter)))
        return rng.integers(low, high + 1, size=self.segments).tolist()


class CompressorPretrain:
    """Train summary embeddings and an encoder LoRA for ``settings.model.base_model``.

    Args:
        settings: platform settings (base model spec, cache dir, dtype).
        options: the run.
        command: the command line that started the run, for the record.
        report: receives ``(metrics, directory or None)`` at the end (Ray Train wires it to ``report``).
    """

    def __init__(
        self, settings: Settings, options: PretrainOptions, command: str = "", report: Report | None = None
    ) -> None:
        self.settings, self.options, self.command, self.report = settings, options, command, report
        self.history: list[dict[str, float]] = []
        self.step = 0
        self.elapsed_s = 0.0
        self.tokens_seen = 0

    # -- setup ------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Load the base model and corpus, create fresh summary embeddings, wrap LoRA, build the optimizer."""
        from peft import LoraConfig, get_peft_model

        options = self.options
        torch.manual_seed(options.seed)
        self.rng = np.random.default_rng(options.seed)
        wanted = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(wanted)
        model_settings = self.settings.model
        self.base: LoadedModel = load_model(
            model_settings.base_model, model_settings.cache_dir, None, model_settings.dtype, self.device
        )
        self.corpus = Corpus.load(options.corpus)
        self.corpus.check_tokenizer(self.base.tokenizer)
        window = options.segments * round(options.segment_len * (1 + options.jitter)) + 1
        if len(self.corpus.train_tokens) < window:
            raise FailedPrecondition(
                f"the corpus has {len(self.corpus.train_tokens)} training tokens, fewer than one sequence ({window})"
            )
        self.eval_windows = held_out_windows(
            self.corpus, options.eval_segments * options.segment_len, options.eval_windows
        )
        self.initial = Compressor.from_base(self.base, options.segment_len, options.k, True, options.seed)
        self.summary = torch.nn.Parameter(self.initial.summary_embeds.float().clone())
        assert self.initial.output_scale is not None
        self.scale = torch.nn.Parameter(self.initial.output_scale.float().clone())
        lora = LoraConfig(
            r=options.lora_rank,
            lora_alpha=options.lora_alpha,
            lora_dropout=options.lora_dropout,
            target_modules=list(options.lora_targets),
            bias="none",
        )
        self.peft_model = get_peft_model(self.base.model, lora)
        self.model: Llama = self.peft_model.get_base_model()
        self.peft_model.train()
        lora_params = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.trainable = [*lora_params, self.summary, self.scale]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=options.learning_rate, weight_decay=0.0)
        log.info(
            "pretrain setup",
            model_id=self.base.model_id,
            device=str(self.device),
            train_tokens=len(self.corpus.train_tokens),
            eval_windows=len(self.eval_windows),
            trainable_params=sum(p.numel() for p in self.trainable),
        )

    # -- train ------------------------------------------------------------------------------------------

    def train(self) -> None:
        """Optimizer steps until ``max_steps`` or the time budget is spent."""
        options = self.options
        window = _LossWindow()
        while not self._done():
            started = time.perf_counter()
            lengths = options.segment_lengths(self.rng)
            reconstruct = (self.rng.random(len(lengths)) < options.reconstruction).tolist()
            tokens = self._sample_windows(sum(lengths))
            self._set_learning_rate()
            window.add(self._train_step(tokens, lengths, reconstruct), tokens.numel())
            self.step += 1
            self.elapsed_s += time.perf_counter() - started
            self.tokens_seen += tokens.numel()
            if self.step % options.log_every == 0 or self._done():
                point = {"step": self.step, "elapsed_s": round(self.elapsed_s, 2), **window.means()}
                point["lr"] = self.optimizer.param_groups[0]["lr"]
                point["tokens_per_s"] = window.tokens / (time.perf_counter() - window.started)
                if self.device.type == "cuda":
                    point["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                self.history.append(point)
                log.info("pretrain step", **point)
                window = _LossWindow()

    def _done(self) -> bool:
        options = self.options
        return (options.max_steps is not None and self.step >= options.max_steps) or (
            options.time_budget_s is not None and self.elapsed_s >= options.time_budget_s
        )

    def _progress(self) -> float:
        fractions = [0.0]
        if self.options.max_steps is not None:
            fractions.append(self.step / self.options.max_steps)
        if self.options.time_budget_s is not None:
            fractions.append(self.elapsed_s / self.options.time_budget_s)
        return min(1.0, max(fractions))

    def _set_learning_rate(self) -> None:
        """Linear warmup over steps, then cosine decay over the run's progress (steps or time)."""
        options = self.options
        warmup = min(1.0, (self.step + 1) / options.warmup_steps) if options.warmup_steps else 1.0
        cosine = 0.5 * (1 + math.cos(math.pi * self._progress()))
        lr = options.learning_rate * warmup * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * cosine)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _sample_windows(self, length: int) -> Tensor:
        """``batch_size`` random windows of the packed training stream: [B, length] long."""
        stream = self.corpus.train_tokens
        starts = self.rng.integers(0, len(stream) - length, size=self.options.batch_size)
        rows = np.stack([stream[start : start + length] for start in starts]).astype(np.int64)
        return torch.from_numpy(rows).to(self.device)

    def _autocast(self) -> torch.autocast:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _train_step(self, tokens: Tensor, lengths: list[int], reconstruct: list[bool]) -> dict[str, float]:
        """One optimizer step over [B, sum(lengths)] tokens cut at ``lengths``.

        Segment i is encoded when a later segment needs its summaries or it is reconstructed; it is decoded
        after the summaries of segments < i (next-segment; not segment 0, which has none) or <= i
        (``reconstruct[i]``). Returns summed losses and token counts of both kinds.
        """
        bounds = np.cumsum([0, *lengths]).tolist()
        with torch.no_grad():
            embeds = self.model.embed(tokens)
        decoded = [i for i in range(len(lengths)) if i > 0 or reconstruct[i]]
        targets = tokens.shape[0] * sum(lengths[i] for i in decoded)
        sums = {"next": 0.0, "next_tokens": 0, "reconstruct": 0.0, "reconstruct_tokens": 0}
        summaries: list[Tensor] = []
        pending: list[Tensor] = []
        for i in range(len(lengths)):
            segment = slice(bounds[i], bounds[i + 1])
            with self._autocast():
                if i < len(lengths) - 1 or reconstruct[i]:
                    summaries.append(self._encode(summaries[:i], embeds[:, segment]))
                if i in decoded:
                    prefix = summaries[: i + 1] if reconstruct[i] else summaries[:i]
                    pending.append(self._segment_loss(prefix, tokens[:, segment], embeds[:, segment]))
                    kind = "reconstruct" if reconstruct[i] else "next"
            if i in decoded:
                sums[kind] += float(pending[-1].detach())
                sums[f"{kind}_tokens"] += tokens.shape[0] * lengths[i]
            if pending and (len(pending) % self.options.bptt_segments == 0 or i == len(lengths) - 1):
                (torch.stack(pending).sum() / targets).backward()
                pending = []
                summaries = [s.detach() for s in summaries]
        torch.nn.utils.clip_grad_norm_(self.trainable, MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sums

    def _layers(self, x: Tensor) -> Tensor:
        """The decoder layers (peft-wrapped) over inputs [B, T, D] at positions 0..T-1; before the final norm."""
        length = x.shape[1]
        self.model.ensure_positions(length)
        cos, sin = self.model.rope(torch.arange(length, device=x.device)[None])
        for block in self.model.model.layers:
            x = block(x, cos, sin)
        return x

    def _encode(self, earlier: list[Tensor], segment: Tensor) -> Tensor:
        """Summary vectors [B, k, D] of ``segment`` [B, L, D] after the summaries ``earlier`` (LoRA on)."""
        batch, dtype = segment.shape[0], segment.dtype
        summary = self.summary.to(dtype)[None].expand(batch, -1, -1)
        x = torch.cat([*(s.to(dtype) for s in earlier), segment, summary], dim=1)
        hidden = self._layers(x)
        return self.model.model.norm(hidden[:, -self.options.k :]) * self.scale.to(dtype)

    def _segment_loss(self, summaries: list[Tensor], tokens: Tensor, segment: Tensor) -> Tensor:
        """Summed next-token loss of ``tokens`` [B, L] after ``summaries`` as prefix, on the frozen base
        decoder's inference path (fused projections, no LoRA): the first token is predicted from the last
        summary vector."""
        dtype = segment.dtype
        prefix = torch.cat([s.to(dtype) for s in summaries], dim=1)
        hidden = self.model.hidden(torch.cat([prefix, segment], dim=1))
        logits = self.model.lm_head(hidden[:, prefix.shape[1] - 1 : -1]).float()
        return F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="sum")

    # -- save -------------------------------------------------------------------------------------------

    def save(self, directory: Path | None = None) -> dict[str, Any]:
        """Write the compressor, then score it and write pretrain.json, to ``directory`` (default:
        options.output); returns the record.

        Unwraps LoRA from the base model first, so the perplexities are measured on the inference path
        (``Compressor.compress`` and the plain base model) exactly as the platform will use the result.
        """
        directory = Path(directory or self.options.output)
        files = peft_files(self.peft_model, self.base.model_id)
        summary, scale = self.summary.detach(), self.scale.detach()
        self.peft_model.unload()
        self.base.model.eval()
        for name in ("peft_model", "optimizer", "trainable"):
            self.__dict__.pop(name, None)
        compressor = Compressor(self.base, summary, self.options.segment_len, True, files, scale)
        compressor.save(directory)
        with torch.no_grad():
            perplexity = next_segment_perplexity(
                self.base, compressor, self.initial, self.eval_windows, self.options.eval_batch_size
            )
        record = self.record(compressor, perplexity)
        (directory / RECORD_FILE).write_text(json.dumps(record, indent=2))
        log.info(
            "compressor saved",
            path=str(directory),
            compressor_id=compressor.compressor_id,
            steps=self.step,
            **{f"ppl_{name}": value for name, value in perplexity["perplexity"].items()},
        )
        if self.report is not None:
            self.report({"step": self.step, **perplexity["perplexity"]}, directory)
        return record

    def record(self, compressor: Compressor, perplexity: dict[str, Any]) -> dict[str, Any]:
        """pretrain.json: enough to reproduce and judge the run."""
        import peft
        import transformers

        corpus_meta = {key: value for key, value in self.corpus.meta.items() if key != "tokenizer_sha256"}
        return {
            "command": self.command,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "compressor_id": compressor.compressor_id,
            "base_model": self.base.model_id,
            "objective": "AutoCompressor (summary accumulation, random segment breakpoints, stop-gradient "
            "every bptt_segments) mixed with autoencoding (options.reconstruction); encoder = base + LoRA, "
            "decoder = frozen base",
            "options": json.loads(self.options.model_dump_json()),
            "corpus": {"file": self.options.corpus.name, **corpus_meta},
            "steps": self.step,
            "train_seconds": round(self.elapsed_s, 2),
            "train_tokens_seen": self.tokens_seen,
            "loss_curve": self.history,
            "held_out": perplexity,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "versions": {
                "python": host_platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
        }

    # -- cleanup ----------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Free the model and accelerator memory."""
        for name in ("peft_model", "model", "base", "initial", "optimizer", "trainable", "corpus"):
            self.__dict__.pop(name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def held_out_windows(corpus: Corpus, length: int, count: int) -> Tensor:
    """Up to ``count`` windows [N, length] lying inside single held-out documents, evenly spread.

    Raises:
        FailedPrecondition: no held-out document is that long.
    """
    offsets = corpus.held_out_offsets
    starts = [
        start
        for begin, end in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)
        for start in range(begin, end - length + 1, length)
    ]
    if not starts:
        raise FailedPrecondition(f"no held-out document of the corpus has {length} tokens for evaluation")
    chosen = [starts[i] for i in np.linspace(0, len(starts) - 1, min(count, len(starts))).round().astype(int)]
    rows = np.stack([corpus.held_out_tokens[start : start + length] for start in chosen]).astype(np.int64)
    return torch.from_numpy(rows)


def _summed_nll(model: Llama, embeds: Tensor, targets: Tensor, first: int) -> float:
    """Summed NLL of ``targets`` [B, n] predicted at positions first..first+n-1 of ``embeds`` [B, T, D]."""
    hidden = model.hidden(embeds)[:, first : first + targets.shape[1]]
    logits = model.lm_head(hidden).float()
    return float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))


def next_segment_perplexity(
    base: LoadedModel, compressor: Compressor, initial: Compressor, windows: Tensor, batch_size: int
) -> dict[str, Any]:
    """Held-out perplexity of segments 1..n-1 of each window under five prefixes, on the base decoder.

    Segment i (S tokens) is scored on its tokens 1..S-1 after: nothing (``no_context``); the trained
    compressor's summaries of segments < i (``compressed``); the untrained summary embeddings'
    (``compressed_untrained``); all tokens of segments < i (``full_text``, the upper reference); and the
    trained summaries of segments <= i (``reconstruction``: how much of a segment its own summaries hold).
    """
    model, size, k = base.model, compressor.segment_len, compressor.k
    n = windows.shape[1] // size
    names = ("no_context", "compressed", "compressed_untrained", "full_text", "reconstruction")
    nll = dict.fromkeys(names, 0.0)
    per_segment = {name: [0.0] * n for name in names}
    scored = 0
    for start in range(0, windows.shape[0], batch_size):
        rows = windows[start : start + batch_size].to(model.device)
        embeds = model.embed(rows)
        documents = rows[:, : n * size].tolist()
        trained = torch.stack(compressor.compress(documents))
        untrained = torch.stack(initial.compress(documents))
        for i in range(1, n):
            segment, targets = embeds[:, i * size : (i + 1) * size], rows[:, i * size + 1 : (i + 1) * size]
            prefixes = {
                "no_context": segment[:, :0],
                "compressed": trained[:, : i * k],
                "compressed_untrained": untrained[:, : i * k],
                "full_text": embeds[:, : i * size],
                "reconstruction": trained[:, : (i + 1) * k],
            }
            for name, prefix in prefixes.items():
                inputs = torch.cat([prefix.to(segment.dtype), segment], dim=1)
                value = _summed_nll(model, inputs, targets, prefix.shape[1])
                nll[name] += value
                per_segment[name][i] += value
        scored += rows.shape[0]
    tokens = scored * (n - 1) * (size - 1)
    return {
        "windows": scored,
        "segments_per_window": n,
        "segment_len": size,
        "scored_tokens": tokens,
        "perplexity": {name: math.exp(value / tokens) for name, value in nll.items()},
        "perplexity_by_segment": {
            name: [math.exp(v / (scored * (size - 1))) for v in values[1:]]
            for name, values in per_segment.items()
        },
    }


def peft_files(peft_model: Any, base_model_id: str) -> dict[str, bytes]:
    """A peft-wrapped model's adapter in PEFT's format (HF LlamaForCausalLM keys), as ``LoraSlots`` load it.

    Stored in fp16: the compressor ships inside the package, and the default one's held-out perplexity
    is the same to six digits with fp16 as with fp32 weights (docs/compressor.md)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save

    config = peft_model.peft_config["default"].to_dict()
    config.update(base_model_name_or_path=base_model_id, task_type="CAUSAL_LM", inference_mode=True)
    state = {
        key: value.detach().half().cpu().contiguous()
        for key, value in get_peft_model_state_dict(peft_model).items()
    }
    return {
        CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True, default=_json_value).encode(),
        WEIGHTS_FILE: save(state, metadata={"format": "pt"}),
    }


def _json_value(value: object) -> object:
    if isinstance(value, set | frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "value"):  # enums (peft's TaskType)
        return value.value
    return str(value)


def pretrain(
    settings: Settings, options: PretrainOptions, command: str = "", report: Report | None = None
) -> dict[str, Any]:
    """Run the recipe in this process (one GPU or the CPU) and return the record; no Ray needed."""
    recipe = CompressorPretrain(settings, options, command, report)
    try:
        recipe.setup()
        recipe.train()
        return recipe.save()
    finally:
        recipe.cleanup()


def _train_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker: the same recipe, its output reported as the run's checkpoint."""
    import ray.train

    def report(metrics: dict[str, Any], directory: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory else None
        ray.train.report(metrics, checkpoint=checkpoint)

    staging = Path(tempfile.mkdtemp(prefix="lloco-pretrain-"))
    options = config["options"].model_copy(update={"output": staging / "compressor"})
    try:
        pretrain(config["settings"], options, config["command"], report)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_pretrain_job(
    settings: Settings,
    options: PretrainOptions,
    command: str = "",
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    storage_path: str | None = None,
) -> dict[str, Any]:
    """Pretrain on one Ray Train worker and copy its compressor to ``options.output``; returns the record.

    ``storage_path`` is where Ray Train keeps the run (a local temporary folder by default; on a
    multi-node cluster give a shared path such as ``s3://bucket/prefix``).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(configure_logging=False)
    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    local_storage = None if storage_path else tempfile.mkdtemp(prefix="lloco-pretrain-ray-")
    trainer = TorchTrainer(
        train_loop_per_worker=_train_worker,
        train_loop_config={"settings": settings, "options": options, "command": command},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name="pretrain-compressor", storage_path=storage_path or local_storage),
    )
    try:
        result = trainer.fit()
        if result.checkpoint is None:
            raise Internal("compressor pretraining ended without a saved compressor")
        result.checkpoint.to_directory(str(options.output))
    finally:
        if local_storage:
            shutil.rmtree(local_storage, ignore_errors=True)
    record_path = options.output / RECORD_FILE
    if not record_path.is_file():
        raise Internal(f"the pretraining checkpoint has no {RECORD_FILE}")
    return json.loads(record_path.read_text())
