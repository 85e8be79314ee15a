"""Compressor pretraining: summary vectors that carry a document, for a base model that has no compressor.

The encoder is the base model with a LoRA (``TrainableLora`` on the inference path), k trainable summary
embeddings and a per-channel output scale: segment i runs as ``[summaries of segments < i] + segment i +
k summary embeddings`` and the final-normed states at the summary positions, times the scale, are its
summary vectors (summary accumulation, exactly what ``Compressor.compress`` computes). The scale exists
because the final norm fixes the size of its output (~15x a token embedding's for SmolLM2) while the
vectors are read back as input embeddings. The decoder is the frozen base model, optionally with a
*reader* LoRA trained alongside (``reader_rank`` > 0), which ships with the compressor and is where every
tenant adapter starts.

Each optimizer step is one of two tasks (``qa_fraction`` of the steps are QA):

- ``lm``: a window of the corpus cut at random breakpoints into ``segments`` pieces (lengths uniform in
  ``[S(1-jitter), S(1+jitter)]``); segment i is decoded (next-token loss on all its tokens) after
  ``[summaries of segments < i]`` (AutoCompressor's next-segment step) or, for a ``reconstruction``
  fraction, after ``[summaries of segments <= i]`` (autoencoding, as ICAE: the summaries must hold their
  own segment). Stop-gradient every ``bptt_segments`` decoded segments bounds memory.
- ``qa``: a train-split question's document (``lloco.finetune.pretrain_qa``) is compressed segment by
  segment at fixed S as at inference, and the decoder sees only its summaries and the chat prompt; the
  loss is on the answer. Gradients reach every segment's summaries (each encoder pass is recomputed in
  backward instead of kept).

Runs are resumable: ``checkpoint/`` under the output holds the trainable weights (fp32) and AdamW moments
(bf16) as safetensors shards under 16 MB, the step, clock, data RNG and loss curve; a run continues from
it (``resume``) and its cosine schedule spans the whole run (``max_steps`` / ``time_budget_s``), while
``stop_after_s`` ends one invocation (a GPU host's call). ``init_from`` starts a new run from a finished
compressor's weights (e.g. the shipped one), so training accumulates across sessions; the record keeps
every earlier run. The recipe is a flat ``setup / train / save / cleanup`` class that knows nothing of
Ray; ``lloco.finetune.pretrain_job.run_pretrain_job`` wraps it in a Ray Train ``TorchTrainer``. The options
are ``lloco.finetune.pretrain_options.PretrainOptions``; the LoRAs start, run and take their optimizer steps
through ``lloco.finetune.steps`` and ``lloco.model.trainable_lora``, as tenant finetuning's do.
"""

from __future__ import annotations

import gc
import json
import math
import platform as host_platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.checkpoint import checkpoint

from lloco.config import Settings
from lloco.errors import FailedPrecondition, InvalidArgument
from lloco.eval.passkey import passkey_documents
from lloco.finetune.corpus import Corpus
from lloco.finetune.pretrain_eval import fact_recall, held_out_windows, next_segment_perplexity, qa_probe
from lloco.finetune.pretrain_options import GEOMETRY, PretrainOptions
from lloco.finetune.pretrain_qa import QAExamples, cached_qa_examples
from lloco.finetune.shards import load_training, save_training
from lloco.finetune.steps import apply_gradients, start_lora
from lloco.logs import get_logger
from lloco.model import Compressor, LoadedModel, TrainableLora, load_model
from lloco.model.kv_summary import prefix_hidden
from lloco.model.llama import Block
from lloco.model.lora import peft_geometry
from lloco.model.trainable_lora import lora_hidden

log = get_logger(__name__)

RECORD_FILE = "pretrain.json"
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
MIN_LR_FRACTION = 0.1
# the fact-recall probe's passkey documents (validation split: the train split's names and cities, random
# codes and dates; never the test split, which `lloco eval` keeps for the passkey goal)
FACT_DOCUMENT_TOKENS = 1024
CE_CHUNK = 8192  # positions per logits chunk: the vocabulary projection is recomputed in backward
Report = Callable[[dict[str, Any], Path | None], None]
Task = Literal["lm", "qa"]


class Trainables(nn.Module):
    """Everything pretraining updates: summary embeddings, output scale (embedding summaries only), encoder
    LoRA, optional reader."""

    def __init__(
        self, summary: Tensor, scale: Tensor | None, encoder: TrainableLora, reader: TrainableLora | None
    ) -> None:
        super().__init__()
        self.summary = nn.Parameter(summary.detach().float().clone())
        self.scale = None if scale is None else nn.Parameter(scale.detach().float().clone())
        self.encoder = encoder
        self.reader = reader


@dataclass(frozen=True)
class _Decode:
    """One decoded segment of an LM step: its rows' prefix vectors [B, P, D], embeddings [B, L, D] and
    tokens [B, L]."""

    prefix: Tensor
    segment: Tensor
    tokens: Tensor


class _LossWindow:
    """Losses of the steps between two loss-curve points, per kind."""

    KINDS = ("next", "reconstruct", "qa")

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.tokens = 0
        self.skipped = 0  # steps not applied: their gradients were not finite
        self.started = time.perf_counter()

    def add(self, sums: dict[str, float], tokens: int, applied: bool = True) -> None:
        """A step's loss sums; a step not applied counts as skipped, its (non-finite) losses left out."""
        self.tokens += tokens
        if not applied:
            self.skipped += 1
            return
        for key, value in sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def means(self) -> dict[str, float]:
        """Mean loss per target token: overall and of each kind that occurred."""
        kinds = [kind for kind in self.KINDS if self.sums.get(f"{kind}_tokens")]
        if not kinds:
            return {}
        total = sum(self.sums[kind] for kind in kinds) / sum(self.sums[f"{kind}_tokens"] for kind in kinds)
        return {
            "loss": total,
            **{f"{kind}_loss": self.sums[kind] / self.sums[f"{kind}_tokens"] for kind in kinds},
        }


class CompressorPretrain:
    """Train a compressor (and optionally its reader) for ``settings.model.base_model``.

    Args:
        settings: platform settings (base model spec, cache dir).
        options: the run.
        command: the command line that started this invocation, for the record.
        report: receives ``(metrics, directory or None)`` at the end (Ray Train wires it to ``report``).
    """

    def __init__(
        self, settings: Settings, options: PretrainOptions, command: str = "", report: Report | None = None
    ) -> None:
        self.settings, self.options, self.command, self.report = settings, options, command, report
        self.history: list[dict[str, float]] = []
        self.runs: list[dict[str, Any]] = []  # earlier invocations of this run and earlier runs (init_from)
        self.step = 0
        self.elapsed_s = 0.0
        self.tokens_seen = 0

    # -- setup ------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Load the model, corpus and QA examples; initialise (or restore) the trainables and optimizer."""
        options = self.options
        torch.manual_seed(options.seed)
        self.rng = np.random.default_rng(options.seed)
        self.device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.base: LoadedModel = load_model(
            self.settings.model.base_model, self.settings.model.cache_dir, None, None, self.device
        )
        self.model = self.base.model
        self.model.requires_grad_(False)
        self.model.fuse_projections()
        self.dtype = self.model.dtype
        self.block_fn = torch.compile(Block.infer, dynamic=True) if options.compile else Block.infer
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
        self.qa_train, self.qa_held_out = cached_qa_examples(
            options.qa_cache, options.qa_data, self.base.tokenizer, options.qa_max_tokens, options.seed
        )
        self.qa_buckets = self._buckets(self.qa_train)
        self.initial = Compressor.from_base(
            self.base, options.segment_len, options.k, True, options.seed, options.summary_form
        )
        self.kv = options.summary_form == "kv"
        self.trainables = self._initial_trainables().to(self.device)
        if options.reader_only:
            self._freeze_compressor()
        self.optimizer = torch.optim.AdamW(
            [p for p in self.trainables.parameters() if p.requires_grad],
            lr=options.learning_rate,
            weight_decay=0.0,
        )
        checkpoint_dir = options.output / CHECKPOINT_DIR
        if options.resume and (checkpoint_dir / STATE_FILE).is_file():
            self._restore(checkpoint_dir)
        self._invocation = {"command": self.command, "started": _now(), "first_step": self.step}
        log.info(
            "pretrain setup",
            model_id=self.base.model_id,
            device=str(self.device),
            train_tokens=len(self.corpus.train_tokens),
            qa_train=len(self.qa_train) if self.qa_train else 0,
            step=self.step,
            trainable_params=self.trainable_params,
        )

    @property
    def trainable_params(self) -> int:
        """Parameters the optimizer updates (``reader_only``: the reader's alone)."""
        return sum(p.numel() for p in self.trainables.parameters() if p.requires_grad)

    def _freeze_compressor(self) -> None:
        """``reader_only``: the summary embeddings, output scale and encoder LoRA keep init_from's values.
        Nothing in the encoder's passes then needs a gradient, so autograd records none of them and a step
        costs the reader's backward alone.

        Raises:
            InvalidArgument: there is no reader to train (init_from has none and reader_rank is 0).
        """
        if self.trainables.reader is None:
            raise InvalidArgument(
                f"reader_only: {self.options.init_from} has no reader; give reader_rank > 0 to start one"
            )
        self.trainables.encoder.requires_grad_(False)
        self.trainables.summary.requires_grad_(False)
        if self.trainables.scale is not None:
            self.trainables.scale.requires_grad_(False)

    def _buckets(self, examples: QAExamples | None) -> dict[int, list[int]]:
        """QA example indices by their number of segments (a QA step takes one bucket)."""
        buckets: dict[int, list[int]] = {}
        for index, document in enumerate(examples.documents if examples else []):
            if len(document):
                buckets.setdefault(math.ceil(len(document) / self.options.segment_len), []).append(index)
        return buckets

    def _initial_trainables(self) -> Trainables:
        """Fresh weights, or those of ``init_from`` (whose record becomes this run's earlier history)."""
        options, config = self.options, self.base.config
        encoder_init = reader_init = None
        summary, scale = self.initial.summary_embeds, self.initial.output_scale
        if options.init_from is not None:
            start = Compressor.load(options.init_from, self.base)
            if (
                start.k != options.k
                or start.segment_len != options.segment_len
                or start.summary_form != options.summary_form
                or start.adapter_files is None
            ):
                raise InvalidArgument(
                    f"init_from {options.init_from} has S={start.segment_len}, k={start.k}, "
                    f"{start.summary_form} summaries{'' if start.adapter_files else ', no encoder LoRA'}; this "
                    f"run wants S={options.segment_len}, k={options.k}, {options.summary_form} summaries"
                )
            encoder_init, reader_init = start.adapter_files, start.reader_files
            if reader_init is not None and options.reader_rank:  # its reader continues, none is made
                rank = peft_geometry(reader_init)[1]
                if rank != options.reader_rank:
                    raise InvalidArgument(
                        f"init_from {options.init_from} has a reader of rank {rank}; this run asks for "
                        f"reader_rank={options.reader_rank} (leave it out to continue that reader)"
                    )
            summary = start.summary_embeds
            scale = start.output_scale
            if scale is None and not self.kv:
                scale = torch.ones(config.dim)
            record_path = options.init_from / RECORD_FILE
            if record_path.is_file():
                self.runs = earlier_runs(json.loads(record_path.read_text()))
        encoder = start_lora(
            config, options.lora_rank, options.lora_alpha, options.lora_targets, encoder_init, options.seed
        )
        reader = None
        if reader_init is not None or options.reader_rank:
            reader = start_lora(
                config,
                options.reader_rank,
                options.reader_alpha,
                options.reader_targets,
                reader_init,
                options.seed + 1,
            )
        return Trainables(summary, scale, encoder, reader)

    # -- train ------------------------------------------------------------------------------------------

    def train(self) -> None:
        """Optimizer steps until the run ends or this invocation's ``stop_after_s`` is spent."""
        options = self.options
        window = _LossWindow()
        first_step, started_at = self.step, self.elapsed_s
        last_checkpoint = time.perf_counter()

        def invocation_over() -> bool:
            return (
                options.stop_after_s is not None and self.elapsed_s - started_at >= options.stop_after_s
            ) or (options.stop_after_steps is not None and self.step - first_step >= options.stop_after_steps)

        while not self._done() and not invocation_over():
            started = time.perf_counter()
            self._set_learning_rate()
            task: Task = "qa" if self.qa_buckets and self.rng.random() < options.qa_fraction else "lm"
            sums, tokens = self._qa_step() if task == "qa" else self._lm_step()
            window.add(sums, tokens, applied=apply_gradients(self.optimizer, self.trainables.parameters()))
            self.step += 1
            self.elapsed_s += time.perf_counter() - started
            self.tokens_seen += tokens
            if self.step % options.log_every == 0:
                self._log_point(window)
                window = _LossWindow()
            if (
                options.checkpoint_every_s
                and time.perf_counter() - last_checkpoint > options.checkpoint_every_s
            ):
                self.save_checkpoint()
                last_checkpoint = time.perf_counter()
        if window.sums or window.skipped:
            self._log_point(window)

    def _log_point(self, window: _LossWindow) -> None:
        point = {"step": self.step, "elapsed_s": round(self.elapsed_s, 2), **window.means()}
        if window.skipped:
            point["skipped_steps"] = window.skipped
        point["lr"] = self.optimizer.param_groups[0]["lr"]
        point["tokens_per_s"] = window.tokens / max(1e-9, time.perf_counter() - window.started)
        if self.device.type == "cuda":
            point["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.history.append(point)
        log.info("pretrain step", **point)

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

    # -- the two tasks ----------------------------------------------------------------------------------

    def _lm_step(self) -> tuple[dict[str, float], int]:
        """Backward of one LM step (next-segment and reconstruction losses); returns loss sums and tokens.

        The decodes between two stop-gradients run as one forward (``_decode_losses``): the same losses
        and gradients as one forward each, in fewer and larger kernels.
        """
        options = self.options
        lengths = options.segment_lengths(self.rng)
        reconstruct = (self.rng.random(len(lengths)) < options.reconstruction).tolist()
        stream = self.corpus.train_tokens
        starts = self.rng.integers(0, len(stream) - sum(lengths), size=options.batch_size)
        rows = np.stack([stream[start : start + sum(lengths)] for start in starts]).astype(np.int64)
        tokens = torch.from_numpy(rows).to(self.device)
        bounds = np.cumsum([0, *lengths]).tolist()
        embeds = self.model.embed(tokens)
        decoded = [i for i in range(len(lengths)) if i > 0 or reconstruct[i]]
        unscored = 1 if self.kv else 0  # a key/value prefix has no state to predict a segment's first token
        targets = tokens.shape[0] * sum(lengths[i] - unscored for i in decoded)
        zero = embeds.new_zeros((), dtype=torch.float32)
        losses = {"next": zero, "reconstruct": zero}
        counts = {"next": 0, "reconstruct": 0}
        summaries: list[Tensor] = []
        pending: list[tuple[str, _Decode]] = []

        def queue(i: int, kind: str) -> None:
            prefix = torch.cat(summaries[: i + 1] if kind == "reconstruct" else summaries[:i], dim=1)
            part = slice(bounds[i], bounds[i + 1])
            pending.append((kind, _Decode(prefix, embeds[:, part], tokens[:, part])))

        def backward() -> None:
            step_losses = self._decode_losses([decode for _, decode in pending])
            for (kind, decode), loss in zip(pending, step_losses, strict=True):
                losses[kind] = losses[kind] + loss.detach()
                counts[kind] += decode.tokens.shape[0] * (decode.tokens.shape[1] - unscored)
            (torch.stack(step_losses).sum() / targets).backward()
            pending.clear()

        for i in range(len(lengths)):
            if i > 0 and not reconstruct[i]:
                queue(i, "next")
            if len(pending) >= options.bptt_segments:  # stop-gradient before the next summary is made, so
                backward()  # every later loss reaches a live one
                summaries = [s.detach() for s in summaries]
            if i < len(lengths) - 1 or reconstruct[i]:
                earlier = torch.cat(summaries, dim=1) if summaries else None
                summaries.append(self._encode(earlier, list(embeds[:, bounds[i] : bounds[i + 1]])))
            if reconstruct[i]:
                queue(i, "reconstruct")
        if pending:
            backward()
        sums: dict[str, float] = {kind: float(loss) for kind, loss in losses.items()}  # one sync per step
        sums.update({f"{kind}_tokens": count for kind, count in counts.items()})
        return sums, tokens.numel()

    def _qa_step(self) -> tuple[dict[str, float], int]:
        """Backward of one QA step: documents of one segment count, answers from their summaries alone."""
        options, size = self.options, self.options.segment_len
        counts = sorted(self.qa_buckets)
        weights = np.array([len(self.qa_buckets[n]) for n in counts], dtype=np.float64)
        n = counts[self.rng.choice(len(counts), p=weights / weights.sum())]
        rows = max(1, min(2 * options.batch_size, options.batch_size * options.segments // n))
        chosen = self.rng.choice(self.qa_buckets[n], size=rows, replace=len(self.qa_buckets[n]) < rows)
        examples = self.qa_train.subset(chosen.tolist())
        documents = [
            torch.as_tensor(doc, dtype=torch.int64, device=self.device) for doc in examples.documents
        ]
        summaries: Tensor | None = None
        for i in range(n):
            segments = [self.model.embed(doc[i * size : (i + 1) * size]) for doc in documents]
            if self.options.reader_only:  # nothing to recompute in backward: the encoder records no graph
                vectors = self._encode(summaries, segments)
            else:
                vectors = checkpoint(self._encode, summaries, segments, use_reentrant=False)
            summaries = vectors if summaries is None else torch.cat([summaries, vectors], dim=1)
        assert summaries is not None
        tails = [
            torch.tensor([*p, *a], device=self.device)
            for p, a in zip(examples.prompts, examples.answers, strict=True)
        ]
        tail = pad_sequence([self.model.embed(t) for t in tails], batch_first=True)
        if self.kv:
            hidden, prefix = self._kv_layers(tail, summaries, self.trainables.reader)[0], 0
        else:
            hidden = self._layers(torch.cat([summaries, tail], dim=1), self.trainables.reader)
            prefix = summaries.shape[1]
        positions, targets = [], []
        for row, (prompt, answer) in enumerate(zip(examples.prompts, examples.answers, strict=True)):
            first = prefix + len(prompt) - 1
            positions += [(row, first + j) for j in range(len(answer))]
            targets += answer
        index = torch.tensor(positions, device=self.device)
        loss = self._ce_sum(hidden[index[:, 0], index[:, 1]], torch.tensor(targets, device=self.device))
        (loss / len(targets)).backward()
        document_tokens = sum(len(doc) for doc in documents)
        return {"qa": float(loss.detach()), "qa_tokens": len(targets)}, document_tokens

    # -- model passes -----------------------------------------------------------------------------------

    def _layers(self, x: Tensor, lora: TrainableLora | None) -> Tensor:
        """Final-normed hidden states of inputs [B, T, D] at positions 0..T-1, through ``lora`` (if any)."""
        return lora_hidden(self.model, x, lora, self.options.activation_checkpointing, self.block_fn)

    def _kv_layers(
        self, x: Tensor, prefix: Tensor | None, lora: TrainableLora | None, keep: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``prefix_hidden`` of inputs [B, T, D] after key/value summaries [B, P, width], through ``lora``."""
        bound = None if lora is None else lora.bind(self.dtype)
        return prefix_hidden(self.model, x, prefix, bound, keep, self.options.activation_checkpointing)

    def _encode(self, earlier: Tensor | None, segments: list[Tensor]) -> Tensor:
        """Summaries [B, k, width] of each row's ``segments[b]`` [L_b, D] after ``earlier`` [B, P, width]:
        embedding summaries run behind the earlier ones as input, key/value summaries as every layer's
        prefix."""
        k = self.options.k
        summary = self.trainables.summary.to(self.dtype)
        before = [] if earlier is None or self.kv else [earlier]
        rows = [torch.cat([*(e[b] for e in before), segment, summary]) for b, segment in enumerate(segments)]
        lengths = torch.tensor([row.shape[0] for row in rows], device=self.device)
        index = lengths[:, None] - k + torch.arange(k, device=self.device)[None]
        if self.kv:
            return self._kv_layers(
                pad_sequence(rows, batch_first=True), earlier, self.trainables.encoder, index
            )[1]
        hidden = self._layers(pad_sequence(rows, batch_first=True), self.trainables.encoder)
        vectors = hidden[torch.arange(len(rows), device=self.device)[:, None], index]
        return vectors * self.trainables.scale.to(self.dtype)

    def _decode_losses(self, decodes: list[_Decode]) -> list[Tensor]:
        """Summed next-token loss of each decode's ``tokens`` [B, L] after its ``prefix`` [B, P, D] (P >= 1;
        the first token is predicted from the last prefix vector), all decodes' rows in one right-padded
        forward (causal: padding after a row changes none of its positions). Key/value summaries: one
        forward per prefix length, and a segment's first token is not scored (nothing before it to predict
        it from)."""
        if self.kv:
            return self._kv_decode_losses(decodes)
        rows = [torch.cat([d.prefix[b], d.segment[b]]) for d in decodes for b in range(d.tokens.shape[0])]
        hidden = self._layers(pad_sequence(rows, batch_first=True), self.trainables.reader)
        losses, first = [], 0
        for d in decodes:
            batch, length = d.tokens.shape
            start = d.prefix.shape[1] - 1
            states = hidden[first : first + batch, start : start + length]
            losses.append(self._ce_sum(states.flatten(0, 1), d.tokens.flatten()))
            first += batch
        return losses

    def _kv_decode_losses(self, decodes: list[_Decode]) -> list[Tensor]:
        """``_decode_losses`` after key/value summaries: tokens 1..L-1 of each decode, one forward per
        prefix and segment length."""
        losses: list[Tensor | None] = [None] * len(decodes)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for index, decode in enumerate(decodes):
            by_shape.setdefault((decode.prefix.shape[1], decode.tokens.shape[1]), []).append(index)
        for group in by_shape.values():
            prefix = torch.cat([decodes[i].prefix for i in group])
            hidden = self._kv_layers(
                torch.cat([decodes[i].segment for i in group]), prefix, self.trainables.reader
            )[0]
            first = 0
            for i in group:
                batch, length = decodes[i].tokens.shape
                states = hidden[first : first + batch, : length - 1]
                losses[i] = self._ce_sum(states.flatten(0, 1), decodes[i].tokens[:, 1:].flatten())
                first += batch
        return [loss for loss in losses if loss is not None]

    def _ce_sum(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """Summed cross-entropy of hidden states [N, D] against [N] targets, logits a chunk at a time."""
        weight = self.model.lm_head.weight
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], CE_CHUNK):
            part = slice(start, start + CE_CHUNK)
            total = total + checkpoint(_chunk_ce, weight, hidden[part], targets[part], use_reentrant=False)
        return total

    # -- checkpoints ------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write checkpoint/: weights (fp32) and AdamW moments (bf16) in shards under 16 MB, and the state."""
        directory = self.options.output / CHECKPOINT_DIR
        save_training(directory, self.trainables, self.optimizer)
        state = {
            "step": self.step,
            "elapsed_s": self.elapsed_s,
            "tokens_seen": self.tokens_seen,
            "history": self.history,
            "runs": self.runs,
            "rng": self.rng.bit_generator.state,
            "options": json.loads(self.options.model_dump_json()),
        }
        (directory / STATE_FILE).write_text(json.dumps(state))
        log.info("pretrain checkpoint", path=str(directory), step=self.step)
        return directory

    def _restore(self, directory: Path) -> None:
        """Continue from a checkpoint of this run (same geometry)."""
        state = json.loads((directory / STATE_FILE).read_text())
        mine = json.loads(self.options.model_dump_json())
        # a field a checkpoint predates (reader_only) had its default then
        defaults = {name: field.default for name, field in PretrainOptions.model_fields.items()}
        changed = [name for name in GEOMETRY if state["options"].get(name, defaults[name]) != mine[name]]
        if changed:
            raise InvalidArgument(f"checkpoint {directory} was made with other {changed}; start a new output")
        load_training(directory, self.trainables, self.optimizer, self.device)
        self.step, self.elapsed_s, self.tokens_seen = state["step"], state["elapsed_s"], state["tokens_seen"]
        self.history, self.runs = state["history"], state["runs"]
        self.rng.bit_generator.state = state["rng"]
        log.info("pretrain resumed", path=str(directory), step=self.step, elapsed_s=round(self.elapsed_s, 1))

    # -- save -------------------------------------------------------------------------------------------

    def compressor(self) -> Compressor:
        """The trained weights as a ``Compressor`` on the inference path (LoRA in slots, not in training form)."""
        t = self.trainables
        reader = None if t.reader is None else t.reader.peft_files(self.base.model_id)
        return Compressor(
            self.base,
            t.summary.detach(),
            self.options.segment_len,
            True,
            t.encoder.peft_files(self.base.model_id),
            None if t.scale is None else t.scale.detach(),
            reader_files=reader,
            summary_form=self.options.summary_form,
        )

    def save(self, directory: Path | None = None, evaluate: bool = True) -> dict[str, Any]:
        """Checkpoint, write the compressor and pretrain.json (with held-out scores when ``evaluate``);
        returns the record."""
        directory = Path(directory or self.options.output)
        self._invocation.update(
            ended=_now(),
            last_step=self.step,
            elapsed_s=round(self.elapsed_s, 2),
            tokens_seen=self.tokens_seen,
        )
        self.runs.append(self._invocation)
        self.save_checkpoint()
        compressor = self.compressor()
        compressor.save(directory)
        held_out: dict[str, Any] = {}
        if evaluate:
            windows, batch = self.eval_windows, self.options.eval_batch_size
            held_out["next_segment"] = next_segment_perplexity(
                self.base, compressor, windows, batch, self.initial
            )
            if self.qa_held_out is not None and self.options.eval_qa:
                probe = self.qa_held_out.spread(self.options.eval_qa)
                held_out["qa_probe"] = qa_probe(self.base, compressor, probe, batch)
            if self.options.eval_facts:
                tokenizer = self.base.tokenizer
                documents = passkey_documents(
                    "validation",
                    FACT_DOCUMENT_TOKENS,
                    self.options.eval_facts,
                    lambda text: len(tokenizer.encode(text, add_special_tokens=False)),
                )
                held_out["fact_recall"] = fact_recall(self.base, compressor, documents)
        record = self.record(compressor, held_out)
        (directory / RECORD_FILE).write_text(json.dumps(record, indent=2))
        summary = held_out.get("next_segment", {}).get("perplexity", {})
        log.info(
            "compressor saved",
            path=str(directory),
            compressor_id=compressor.compressor_id,
            steps=self.step,
            gap_closed=held_out.get("next_segment", {}).get("gap_closed"),
            **{f"ppl_{name}": value for name, value in summary.items()},
        )
        if self.report is not None:
            self.report({"step": self.step, **summary}, directory)
        return record

    def record(self, compressor: Compressor, held_out: dict[str, Any]) -> dict[str, Any]:
        """pretrain.json: enough to reproduce and judge the run, and every earlier run it continues."""
        import transformers

        corpus_meta = {key: value for key, value in self.corpus.meta.items() if key != "tokenizer_sha256"}
        finished = [run for run in self.runs if run.get("run_end")]
        return {
            "command": self.command,
            "created": _now(),
            "compressor_id": compressor.compressor_id,
            "base_model": self.base.model_id,
            "objective": (
                "key/value summaries (every layer's keys and values of the summary positions); "
                if self.kv
                else ""
            )
            + "summary accumulation; LM steps: next-segment + autoencoding (options.reconstruction), "
            "random breakpoints, stop-gradient every bptt_segments; QA steps (options.qa_fraction): answer from "
            "the summaries alone; encoder = base + LoRA, decoder = frozen base"
            + (" + reader LoRA" if self.trainables.reader is not None else "")
            + ("; reader only: the compressor kept as init_from left it" if self.options.reader_only else ""),
            "options": json.loads(self.options.model_dump_json()),
            "trainable_params": self.trainable_params,
            "corpus": {"file": self.options.corpus.name, **corpus_meta},
            "qa_examples": {
                "train": len(self.qa_train) if self.qa_train else 0,
                "held_out": len(self.qa_held_out) if self.qa_held_out else 0,
                "sources": sorted(set(self.qa_train.sources)) if self.qa_train else [],
            },
            "steps": self.step,
            "train_seconds": round(self.elapsed_s, 2),
            "train_tokens_seen": self.tokens_seen,
            "runs": self.runs,
            "total_train_seconds": round(sum(run["elapsed_s"] for run in finished) + self.elapsed_s, 2),
            "total_tokens_seen": sum(run["tokens_seen"] for run in finished) + self.tokens_seen,
            "loss_curve": self.history,
            "held_out": held_out,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "versions": {
                "python": host_platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
        }

    # -- cleanup ----------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Free the model and accelerator memory."""
        for name in ("model", "base", "initial", "optimizer", "trainables", "corpus", "qa_train"):
            self.__dict__.pop(name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _chunk_ce(weight: Tensor, hidden: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def earlier_runs(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs a finished compressor's pretrain.json lists, each marked as a whole run's end."""
    runs = record.get("runs")
    if runs is None:  # a record from before runs were kept: one invocation
        runs = [
            {
                "command": record.get("command", ""),
                "ended": record.get("created"),
                "last_step": record.get("steps", 0),
                "elapsed_s": record.get("train_seconds", 0.0),
                "tokens_seen": record.get("train_tokens_seen", 0),
            }
        ]
    last = dict(runs[-1], run_end=True, compressor_id=record.get("compressor_id"))
    return [*runs[:-1], last]


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
