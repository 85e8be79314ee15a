"""The evaluation harness: every test set answered in every mode, scored, timed, token-counted.

Modes (what the decoder sees before ``chat_prompt(question)``; the same base model throughout):

- ``none``: nothing (no context).
- ``truncated``: the document's tokens cut in the middle to fit the model's window with the prompt and
  the answer (as LongBench truncates).
- ``full``: all of the document's tokens, past the window if it is longer.
- ``compressed``: the document's summary vectors from the compressor; no tenant LoRA (the compressor's
  reader adapter when it ships one, else none: what a tenant without an adapter gets).
- ``lloco``: the summary vectors, with a LoRA trained on the dataset's train rows in that form.
- ``lora_none``: nothing, with a LoRA trained on the same rows with no context at all (prompt and answer
  only): what a LoRA learns without the document (the answers' form, the set's priors). LLoCO minus this
  is what the summary vectors carry.
- ``full_lora``: all of the document's tokens, with a LoRA trained on the train rows with full documents
  (cut in the middle to ``train_max_length`` for training).
- ``lloco_evidence``: the summary vectors, then the question's evidence (``lloco.registry.evidence``: the
  document sentences a BM25 ranking of the question finds, in what the summary vectors leave of the
  documents' tokens / the context ratio, ``finetune.context_ratio`` unless ``context_ratio`` says
  otherwise), with a LoRA trained in that form: what the platform serves to an adapter trained with
  evidence (its default).
- ``lora_evidence``: the evidence alone, given the whole context budget (the documents' tokens / the
  context ratio), with a LoRA trained in that form: retrieval at the same budget, against which the summary
  vectors must earn their positions.

The LoRA modes train on the same rows (those whose compressed form fits ``train_max_length``), with
the same steps, hyperparameters, seed and initial weights (a seeded random init, or ``adapter_init``, which
defaults to the compressor's reader when it has one, as tenant finetuning starts from it), so that they
differ only in the context their examples hold.

A finetune recipe (``Recipe``: optimizer steps, learning rate, train rows) is what the LoRA modes train
with: one, from ``train_steps`` and ``learning_rate`` on every loaded row, unless ``recipes`` sweeps several.
A sweep trains and scores every LoRA mode once per recipe on the documents tokenized and compressed once;
a recipe's rows are the first ``train_rows`` of the loaded (seeded-sampled) train rows, so a smaller
recipe's rows are a subset of a larger one's. Its rows name their recipe (``ModeResult.recipe``).

The held-out perplexity (``held_out_perplexity``) measures the compressor without any LoRA or question:
the base decoder's next-segment perplexity after no context, the compressed earlier segments and the
full earlier text, and the share of the gap between none and full that the compressed prefix closes.

Generation goes through ``lloco.model.Generator`` (continuous batching, greedy), no Ray. Latency is a
query's time from entering the generator to its last token; compression is offline in LLoCO and is
timed separately.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from lloco.config import FinetuneSettings
from lloco.errors import InvalidArgument
from lloco.eval.adapters import TrainedAdapter, state_digest, train_adapter
from lloco.eval.metrics import exact_match, f1_score, rouge
from lloco.eval.tasks import MAX_NEW_TOKENS, EvalDataset, TestSet
from lloco.finetune.data import DOCUMENT_SEPARATOR, Example
from lloco.finetune.pretrain_eval import next_segment_perplexity
from lloco.finetune.steps import tenant_lora
from lloco.logs import get_logger
from lloco.model import Compressor, Generator, LoadedModel, LoraSlots, SamplingParams, chat_prompt
from lloco.model.lora import peft_geometry, read_peft_files
from lloco.registry import DatasetRow
from lloco.registry.evidence import Evidence, evidence_budget

log = get_logger(__name__)

Mode = Literal[
    "none",
    "truncated",
    "full",
    "compressed",
    "lloco",
    "lora_none",
    "full_lora",
    "lloco_evidence",
    "lora_evidence",
]
MODES: tuple[Mode, ...] = (
    "none", "truncated", "full", "compressed", "lloco", "lora_none", "full_lora", "lloco_evidence", "lora_evidence"
)  # fmt: skip
MODE_LABELS: dict[str, str] = {
    "none": "no context",
    "truncated": "truncated to window",
    "full": "full document",
    "compressed": "compressed, no tenant LoRA",
    "lloco": "LLoCO (compressed + LoRA)",
    "lora_none": "LoRA, no context",
    "full_lora": "full-context LoRA",
    "lloco_evidence": "LLoCO + evidence sentences",
    "lora_evidence": "LoRA, evidence sentences only",
}
ExampleForm = Literal["compressed", "none", "full", "compressed_evidence", "evidence"]
ADAPTER_MODE: dict[str, ExampleForm] = {
    "lloco": "compressed",
    "lora_none": "none",
    "full_lora": "full",
    "lloco_evidence": "compressed_evidence",
    "lora_evidence": "evidence",
}
COMPRESSED_MODES = frozenset({"compressed", "lloco", "lloco_evidence"})
EVIDENCE_MODES = frozenset({"lloco_evidence", "lora_evidence"})
PERPLEXITY_BATCH = 8  # held-out windows per forward


class Recipe(BaseModel):
    """A LoRA finetune recipe of the LoRA modes: how long, how fast, on how many train rows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train_steps: int = Field(ge=1, description="Optimizer steps.")
    learning_rate: float | None = Field(
        None, gt=0, description="Peak learning rate; None: settings.finetune."
    )
    train_rows: int | None = Field(
        None, ge=1, description="The first N loaded train rows (a prefix of the seeded sample); None: all."
    )

    @classmethod
    def parse(cls, spec: str) -> Recipe:
        """``STEPS:LR:ROWS`` (e.g. ``80:5e-4:240``) as a recipe.

        Raises:
            InvalidArgument: not three fields, or a field out of range.
        """
        fields = spec.strip().split(":")
        try:
            if len(fields) != 3:
                raise ValueError("expected 3 fields")
            steps, learning_rate, rows = int(fields[0]), float(fields[1]), int(fields[2])
            if steps < 1 or rows < 1 or not 0 < learning_rate < math.inf:
                raise ValueError("steps and rows must be >= 1, the learning rate > 0")
        except ValueError as error:
            raise InvalidArgument(
                f"a recipe is STEPS:LR:ROWS (e.g. 80:5e-4:240), got {spec.strip()!r}: {error}"
            ) from error
        return cls(train_steps=steps, learning_rate=learning_rate, train_rows=rows)


def parse_recipes(specs: str) -> tuple[Recipe, ...]:
    """A comma list of ``STEPS:LR:ROWS`` recipes (``--recipes``), in the order given.

    Raises:
        InvalidArgument: none, or a malformed one (``Recipe.parse``); ``EvalOptions`` refuses repeats.
    """
    recipes = tuple(Recipe.parse(spec) for spec in specs.split(",") if spec.strip())
    if not recipes:
        raise InvalidArgument(
            f"--recipes takes STEPS:LR:ROWS entries, e.g. 80:5e-4:240,160:5e-4:240; got {specs!r}"
        )
    return recipes


def check_recipes(recipes: Sequence[Recipe], datasets: Sequence[EvalDataset]) -> None:
    """Refuse, before any work, a recipe that asks more train rows than a dataset loaded.

    Raises:
        InvalidArgument: naming the recipe, the rows it asks and the dataset's loaded rows.
    """
    for dataset in (d for d in datasets if d.train is not None):
        loaded = len(dataset.train.rows)
        for recipe in recipes:
            if recipe.train_rows is not None and recipe.train_rows > loaded:
                raise InvalidArgument(
                    f"recipe {recipe_spec(recipe)} asks {recipe.train_rows} train rows, but {dataset.name} "
                    f"loaded {loaded} (--train-limit, or all the set has): ask at most {loaded}"
                )


def _short_float(value: float) -> str:
    """5e-4 as "5e-4", 2.5e-5 as "2.5e-5" (a learning rate as one writes it)."""
    mantissa, exponent = f"{value:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def recipe_spec(recipe: Recipe) -> str:
    """A recipe as ``--recipes`` writes it."""
    rate = "default" if recipe.learning_rate is None else _short_float(recipe.learning_rate)
    return f"{recipe.train_steps}:{rate}:{recipe.train_rows or 'all'}"


def recipe_label(recipe: dict[str, Any]) -> str:
    """A row's recorded recipe (``ModeResult.recipe``) in words: "80 steps, lr 5e-4, 240 rows"."""
    steps, rows = recipe["train_steps"], recipe["train_rows"]
    return (
        f"{steps} step{'s' * (steps != 1)}, lr {_short_float(recipe['learning_rate'])}, "
        f"{rows} row{'s' * (rows != 1)}"
    )


def mode_label(mode: str, recipe: dict[str, Any] | None = None) -> str:
    """A row's mode in words, with its recorded recipe when it has one (a sweep's LoRA rows)."""
    return MODE_LABELS[mode] if recipe is None else f"{MODE_LABELS[mode]}: {recipe_label(recipe)}"


class EvalOptions(BaseModel):
    """How much work the evaluation does, and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modes: tuple[Mode, ...] = Field(MODES, min_length=1, description="Modes to run; rows keep this order.")
    train_steps: int = Field(100, ge=1, description="Optimizer steps of each LoRA mode's adapter.")
    learning_rate: float | None = Field(
        None, gt=0, description="LoRA learning rate; None: settings.finetune."
    )
    recipes: tuple[Recipe, ...] | None = Field(
        None,
        min_length=1,
        description="A sweep: every LoRA mode trained and scored once per recipe, in this order (instead of "
        "train_steps and learning_rate on every loaded row); None: no sweep.",
    )
    train_max_length: int | None = Field(
        None, ge=8, description="Longest training example; None: the model's window."
    )
    max_batch: int = Field(32, ge=1, description="Queries decoded together.")
    max_batch_tokens: int = Field(
        1 << 20, ge=1, description="KV-cache positions per generator (rows x length)."
    )
    max_document_tokens: int | None = Field(
        None, ge=1, description="Cut documents to their first N tokens (small machines); None: whole."
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="Answer length; None: 32 for QA, 160 for summaries."
    )
    compress_batch_size: int = Field(16, ge=1, description="Segments per compressor forward.")
    context_ratio: int | None = Field(
        None,
        ge=1,
        description="Evidence modes: a query's summary vectors and evidence hold at most its documents' "
        "tokens / this (the evidence what the summaries leave); None: finetune.context_ratio, what tenant "
        "adapters train with.",
    )
    perplexity_windows: int = Field(32, ge=1, description="Held-out windows of the perplexity gap.")
    perplexity_segments: int = Field(
        4, ge=2, description="Segments (of the compressor's S tokens) per held-out window."
    )
    time_budget_s: float | None = Field(None, gt=0, description="Work still to start after this is skipped.")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _sweep_has_lora_modes(self) -> EvalOptions:
        if self.recipes is not None:
            repeated = [recipe for i, recipe in enumerate(self.recipes) if recipe in self.recipes[:i]]
            if repeated:
                raise ValueError(f"recipe {recipe_spec(repeated[0])} is given twice; each recipe once")
            if not set(ADAPTER_MODE) & set(self.modes):
                raise ValueError(
                    f"recipes train the LoRA modes, and modes has none of {', '.join(ADAPTER_MODE)}"
                )
        return self

    def recipes_to_run(self) -> tuple[Recipe, ...]:
        """The sweep's recipes, or the one recipe of ``train_steps`` and ``learning_rate`` on every row."""
        return self.recipes or (Recipe(train_steps=self.train_steps, learning_rate=self.learning_rate),)


@dataclass
class ModeResult:
    """One row of the table: a test set answered in one mode."""

    dataset: str
    test_set: str
    mode: str
    metric: str
    queries: int = 0
    scores: dict[str, float] = field(default_factory=dict)
    context_tokens: float = 0.0  # per query: what the decoder attends to besides the prompt
    document_tokens: float = 0.0  # per query: the documents' full token count
    latency_s: float = 0.0  # per query, entering the generator to the last token
    seconds: float = 0.0  # the whole mode on this test set
    adapter: dict[str, Any] | None = None
    # a sweep's LoRA rows: {train_steps, learning_rate (the one used), train_rows}; None: no sweep, or no LoRA
    recipe: dict[str, Any] | None = None
    skipped: str | None = None
    # test sets with depths: depth ("10%") -> the scores of its questions and their count "n"
    scores_by_depth: dict[str, dict[str, float]] | None = None
    predictions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return mode_label(self.mode, self.recipe)


@dataclass(frozen=True)
class _Request:
    prefix: Tensor | None
    prompt_ids: list[int]
    context_tokens: int
    document_tokens: int


def middle_cut(tokens: Sequence[int], room: int) -> list[int]:
    """``tokens`` if they fit in ``room``, else their head and tail (room split evenly)."""
    if len(tokens) <= room:
        return list(tokens)
    if room <= 0:
        return []
    return [*tokens[: room // 2], *tokens[len(tokens) - (room - room // 2) :]]


class Evaluator:
    """Runs datasets through every mode with one base model and one compressor.

    Args:
        base: the decoder (and the compressor's base).
        compressor: encodes documents for the compressed modes.
        finetune: LoRA hyperparameters of the LoRA modes (the platform's finetune settings).
        options: sizes, budget, modes.
        adapter_init: PEFT files every LoRA mode's adapter starts from (their own rank and targets); None:
            the compressor's reader if it has one, else a random init under ``options.seed``.

    Raises:
        InvalidArgument: a tokenizer without EOS.
        InvalidArgument / FailedPrecondition: an ``adapter_init`` the platform's LoRA slots cannot serve
            (``check_peft_files``) or its training cannot start from (checked here, before any work).
    """

    def __init__(
        self,
        base: LoadedModel,
        compressor: Compressor,
        finetune: FinetuneSettings,
        options: EvalOptions,
        adapter_init: dict[str, bytes] | None = None,
    ) -> None:
        self.base, self.compressor, self.finetune, self.options = base, compressor, finetune, options
        self.adapter_init = adapter_init if adapter_init is not None else compressor.reader_files
        self.reader = None  # the compressor's reader as the "compressed" mode's adapter
        if compressor.reader_files is not None:
            digest = state_digest(read_peft_files(compressor.reader_files)[1])
            self.reader = TrainedAdapter(
                compressor.reader_files, 0, None, 0, math.nan, math.nan, 0.0, "compressor reader", digest
            )
        if adapter_init is not None:
            targets, rank = peft_geometry(adapter_init)
            LoraSlots(base.config, 1, rank, targets, "cpu", torch.float32).prepare(adapter_init)
            tenant_lora(base.config, finetune, adapter_init)  # and that training can start from
        self.tokenizer = base.tokenizer
        self.window = base.config.max_position_embeddings
        self.separator = self.tokenizer.encode(DOCUMENT_SEPARATOR, add_special_tokens=False)
        self.eos = self.tokenizer.eos_token_id
        if self.eos is None:
            raise InvalidArgument(f"the tokenizer of {base.model_id} has no EOS token")
        self.deadline = None if options.time_budget_s is None else time.perf_counter() + options.time_budget_s
        self.costs: dict[str, dict[str, float]] = {}
        self.texts: dict[str, str] = {}  # the documents' texts by id, for the evidence modes
        self._evidence: dict[tuple[str, ...], Evidence] = {}  # per row's documents
        self.context_ratio = options.context_ratio or finetune.context_ratio
        if not self.context_ratio and EVIDENCE_MODES & set(options.modes):
            raise InvalidArgument(
                "the evidence modes need a context ratio: finetune.context_ratio is 0; give --context-ratio"
            )

    def _answer_tokens(self, dataset: EvalDataset) -> int:
        return self.options.max_new_tokens or MAX_NEW_TOKENS[dataset.metric]

    def _out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    # -- documents --------------------------------------------------------------------------------------

    def _tokenize(self, documents: dict[str, str]) -> dict[str, list[int]]:
        ids = self.tokenizer(list(documents.values()), add_special_tokens=False)["input_ids"]
        cap = self.options.max_document_tokens
        return {
            doc_id: tokens[:cap] if cap else tokens for doc_id, tokens in zip(documents, ids, strict=True)
        }

    def _compress(self, tokens: dict[str, list[int]]) -> dict[str, Tensor]:
        vectors = self.compressor.compress(list(tokens.values()), batch_size=self.options.compress_batch_size)
        return dict(zip(tokens, vectors, strict=True))

    def _joined(self, row: DatasetRow, tokens: dict[str, list[int]]) -> list[int]:
        joined: list[int] = []
        for index, doc_id in enumerate(row.doc_ids):
            joined += (self.separator if index else []) + tokens[doc_id]
        return joined

    def _prefix(self, row: DatasetRow, contexts: dict[str, Tensor]) -> Tensor:
        return torch.cat([contexts[doc_id] for doc_id in row.doc_ids])

    def _evidence_budget(self, row: DatasetRow, tokens: dict[str, list[int]], summaries: bool) -> int:
        """Evidence tokens beside the row's summary vectors (``summaries``) or alone."""
        summary_positions = self._summary_vectors(row, tokens) if summaries else 0
        document_tokens = sum(len(tokens[doc_id]) for doc_id in row.doc_ids)
        return evidence_budget(document_tokens, summary_positions, self.context_ratio)

    def evidence(self, row: DatasetRow, tokens: dict[str, list[int]], summaries: bool) -> list[int]:
        """The row's evidence tokens (``lloco.registry.evidence``) within ``_evidence_budget``, from the texts
        of its documents (``self.texts``)."""
        if row.doc_ids not in self._evidence:
            self._evidence[row.doc_ids] = Evidence(
                [self.texts[doc_id] for doc_id in row.doc_ids], self.tokenizer
            )
        return self._evidence[row.doc_ids].ids(row.question, self._evidence_budget(row, tokens, summaries))

    # -- adapters ---------------------------------------------------------------------------------------

    def _summary_vectors(self, row: DatasetRow, tokens: dict[str, list[int]]) -> int:
        """How many summary vectors the row's documents compress to, known without compressing."""
        return sum(self.compressor.summary_positions(len(tokens[doc_id])) for doc_id in row.doc_ids)

    def examples(
        self,
        dataset: EvalDataset,
        form: ExampleForm,
        tokens: dict[str, list[int]],
        contexts: dict[str, Tensor],
        rows: int | None = None,
    ) -> list[Example]:
        """The training examples of a LoRA mode: ``[context] + chat_prompt(question) + answer + eos``, the
        context being the summary vectors (``compressed``), nothing (``none``), the document cut in the
        middle to fit (``full``), the summary vectors then the row's evidence tokens
        (``compressed_evidence``) or the evidence alone (``evidence``), from the first ``rows`` train rows
        (None: all). Every form keeps the same rows: those whose compressed form (or, when the run has an
        evidence mode, the longer of it and the context budget) fits ``train_max_length`` (``contexts`` need
        only hold the train documents for the compressed forms, ``self.texts`` their texts for the evidence
        forms).

        Raises:
            InvalidArgument: no train row fits.
        """
        max_length = self.options.train_max_length or self.window
        with_evidence = bool(EVIDENCE_MODES & set(self.options.modes))
        kv = self.compressor.summary_form == "kv"
        examples = []
        for line, row in enumerate(dataset.train.rows[:rows], start=1):
            prompt = chat_prompt(self.tokenizer, dataset.question(row))
            answer = [*self.tokenizer.encode(row.answer, add_special_tokens=False), self.eos]
            context = self._summary_vectors(row, tokens)
            # the evidence forms: summaries and the evidence they leave room for, or the whole budget's evidence
            if with_evidence:
                context = max(context, self._evidence_budget(row, tokens, summaries=False))
            if context + len(prompt) + len(answer) > max_length:
                continue
            if form == "compressed":
                examples.append(Example(line, self._prefix(row, contexts), prompt + answer, len(answer), kv))
            elif form == "none":
                examples.append(Example(line, None, prompt + answer, len(answer)))
            elif form == "compressed_evidence":
                ids = self.evidence(row, tokens, summaries=True) + prompt + answer
                examples.append(Example(line, self._prefix(row, contexts), ids, len(answer), kv))
            elif form == "evidence":
                examples.append(
                    Example(
                        line, None, self.evidence(row, tokens, summaries=False) + prompt + answer, len(answer)
                    )
                )
            else:
                document = middle_cut(self._joined(row, tokens), max_length - len(prompt) - len(answer))
                examples.append(Example(line, None, document + prompt + answer, len(answer)))
        if not examples:
            taken = "" if rows is None else f" of its first {rows}"
            raise InvalidArgument(f"no train row{taken} of {dataset.name} fits {max_length} positions")
        return examples

    def _train(self, examples: list[Example], recipe: Recipe) -> TrainedAdapter:
        return train_adapter(
            self.base,
            examples,
            self.finetune,
            recipe.train_steps,
            recipe.learning_rate,
            self.options.seed,
            self.adapter_init,
        )

    def _recipe_record(self, recipe: Recipe, loaded_rows: int) -> dict[str, Any] | None:
        """What a sweep's LoRA row records of its recipe (the learning rate and rows it used); None when the
        run sweeps nothing, so that its rows stay as they were before sweeps existed."""
        if self.options.recipes is None:
            return None
        return {
            "train_steps": recipe.train_steps,
            "learning_rate": recipe.learning_rate or self.finetune.learning_rate,
            "train_rows": recipe.train_rows or loaded_rows,
        }

    # -- held-out perplexity ----------------------------------------------------------------------------

    def held_out_perplexity(self, documents: dict[str, str], source: str) -> dict[str, Any]:
        """Next-segment perplexity of the base decoder on windows of ``perplexity_segments`` x S tokens
        inside ``documents`` (held-out text), after no context, the compressed earlier segments, the
        summaries of a fresh, untrained compressor (a reference), the full earlier text, and the
        compressed segments up to and including the scored one; plus ``gap_closed`` (compressed between
        none and full text) and ``source`` (what the text is). ``skipped`` says why when there is no window.
        """
        size = self.compressor.segment_len
        length = self.options.perplexity_segments * size
        tokens = self._tokenize(documents)
        starts = [
            (doc_id, start)
            for doc_id, ids in tokens.items()
            for start in range(0, len(ids) - length + 1, length)
        ]
        text = {
            "source": source,
            "documents": len(documents),
            "document_tokens": sum(map(len, tokens.values())),
        }
        if not starts:
            return {**text, "skipped": f"no held-out document has {length} tokens"}
        count = min(self.options.perplexity_windows, len(starts))
        chosen = [starts[round(i * (len(starts) - 1) / max(1, count - 1))] for i in range(count)]
        windows = torch.tensor([tokens[doc_id][start : start + length] for doc_id, start in chosen])
        fresh = (  # an untrained compressor of the same geometry; a salient one has nothing to train
            None
            if self.compressor.positions == "salient_sentences"
            else Compressor.from_base(
                self.base,
                size,
                self.compressor.k,
                self.compressor.accumulate,
                self.options.seed,
                self.compressor.summary_form,
            )
        )
        started = time.perf_counter()
        result = next_segment_perplexity(self.base, self.compressor, windows, PERPLEXITY_BATCH, fresh)
        log.info("held-out perplexity", gap_closed=result["gap_closed"], **result["perplexity"])
        return {**text, **result, "seconds": round(time.perf_counter() - started, 2)}

    # -- running ----------------------------------------------------------------------------------------

    def run(
        self, datasets: Sequence[EvalDataset], on_result: Callable[[list[ModeResult]], None] | None = None
    ) -> list[ModeResult]:
        """Every mode of every test set of every dataset, in order; work past the time budget is skipped.

        ``on_result`` sees the results so far after each one (to write partial reports).

        Raises:
            InvalidArgument: a recipe asks more train rows than a dataset loaded (``check_recipes``).
        """
        check_recipes(self.options.recipes_to_run(), datasets)
        results: list[ModeResult] = []
        for dataset in datasets:
            self._run_dataset(dataset, results, on_result)
        return results

    def _run_dataset(
        self,
        dataset: EvalDataset,
        results: list[ModeResult],
        on_result: Callable[[list[ModeResult]], None] | None,
    ) -> None:
        """The modes without adapters first, then recipe by recipe each LoRA mode (train, answer), so that a
        spent time budget still leaves the cheap rows and whole recipes; the documents are tokenized and
        compressed once for all of it. The rows are kept in (test set, mode, recipe) order."""
        modes = self.options.modes
        recipes = self.options.recipes_to_run()
        first = len(results)
        tests = {test.name: i for i, test in enumerate(dataset.tests)}
        ranks: dict[int, tuple[int, int, int]] = {}  # id(result) -> (test set, mode, recipe) positions

        def record(result: ModeResult, recipe_index: int = 0) -> None:
            ranks[id(result)] = (tests[result.test_set], modes.index(result.mode), recipe_index)
            results.append(result)
            results[first:] = sorted(results[first:], key=lambda r: ranks[id(r)])
            if on_result is not None:
                on_result(results)
            log.info(
                "eval mode done",
                test_set=result.test_set,
                mode=result.mode,
                recipe=result.recipe,
                skipped=result.skipped,
                seconds=round(result.seconds, 2),
                **result.scores,
            )

        started = time.perf_counter()
        test_documents = {d: t for test in dataset.tests for d, t in test.qaset.documents.items()}
        self.texts.update(test_documents)
        tokens = self._tokenize(test_documents)
        costs: dict[str, float] = {"tokenize_s": time.perf_counter() - started, "documents": len(tokens)}
        self.costs[dataset.name] = costs
        contexts: dict[str, Tensor] = {}
        if COMPRESSED_MODES & set(modes) and not self._out_of_time():
            contexts = self._timed_compress(tokens, costs)
        for test in dataset.tests:
            for mode in (m for m in modes if m not in ADAPTER_MODE):
                result = ModeResult(dataset.name, test.name, mode, dataset.metric)
                if self._out_of_time() or (mode in COMPRESSED_MODES and not contexts):
                    result.skipped = "time budget spent"
                else:
                    adapter = self.reader if mode == "compressed" else None
                    self._run_mode(result, dataset, test, tokens, contexts, adapter)
                record(result)
        train_tokens: dict[str, list[int]] | None = None
        train_compressed = False
        loaded_rows = len(dataset.train.rows) if dataset.train is not None else 0
        for recipe_index, recipe in enumerate(recipes):
            for mode in (m for m in modes if m in ADAPTER_MODE):
                adapter: TrainedAdapter | None = None
                reason = None
                if dataset.train is None:
                    reason = "no train rows"
                elif self._out_of_time():
                    reason = "time budget spent"
                else:
                    train_tokens = train_tokens or self._tokenize(dataset.train.documents)
                    self.texts.update(dataset.train.documents)
                    if mode in COMPRESSED_MODES and not train_compressed:
                        contexts.update(self._timed_compress(train_tokens, costs))
                        train_compressed = True
                    examples = self.examples(
                        dataset, ADAPTER_MODE[mode], train_tokens, contexts, recipe.train_rows
                    )
                    adapter = self._train(examples, recipe)
                for test in dataset.tests:
                    result = ModeResult(dataset.name, test.name, mode, dataset.metric)
                    result.recipe = self._recipe_record(recipe, loaded_rows)
                    if reason is not None or self._out_of_time():
                        result.skipped = reason or "time budget spent"
                    else:
                        self._run_mode(result, dataset, test, tokens, contexts, adapter)
                    record(result, recipe_index)

    def _timed_compress(self, tokens: dict[str, list[int]], costs: dict[str, float]) -> dict[str, Tensor]:
        started = time.perf_counter()
        contexts = self._compress(tokens)
        costs["compress_s"] = costs.get("compress_s", 0.0) + time.perf_counter() - started
        costs["compressed_tokens"] = costs.get("compressed_tokens", 0) + sum(map(len, tokens.values()))
        return contexts

    def _request(
        self, mode: str, row: DatasetRow, dataset: EvalDataset, tokens: dict, contexts: dict
    ) -> _Request:
        prompt = chat_prompt(self.tokenizer, dataset.question(row))
        document = self._joined(row, tokens)
        if mode in ("none", "lora_none"):
            return _Request(None, prompt, 0, len(document))
        evidence = self.evidence(row, tokens, mode in COMPRESSED_MODES) if mode in EVIDENCE_MODES else []
        if mode in COMPRESSED_MODES:
            prefix = self._prefix(row, contexts)
            return _Request(prefix, evidence + prompt, prefix.shape[0] + len(evidence), len(document))
        if mode == "lora_evidence":
            return _Request(None, evidence + prompt, len(evidence), len(document))
        if mode == "truncated":
            document = middle_cut(document, self.window - len(prompt) - self._answer_tokens(dataset))
        return _Request(None, document + prompt, len(document), len(self._joined(row, tokens)))

    def _run_mode(
        self,
        result: ModeResult,
        dataset: EvalDataset,
        test: TestSet,
        tokens: dict,
        contexts: dict,
        adapter: TrainedAdapter | None,
    ) -> None:
        started = time.perf_counter()
        rows = test.qaset.rows
        requests = [self._request(result.mode, row, dataset, tokens, contexts) for row in rows]
        texts, latencies = self._generate(requests, self._answer_tokens(dataset), adapter)
        scores: list[dict[str, float]] = []
        for row, text in zip(rows, texts, strict=True):
            if dataset.metric == "qa":
                scores.append(
                    {"em": 100 * exact_match(text, [row.answer]), "f1": 100 * f1_score(text, [row.answer])}
                )
            else:
                scores.append({name: 100 * value for name, value in rouge(text, row.answer).items()})
        count = len(rows)
        result.queries = count
        result.scores = _mean(scores)
        if test.depths is not None:
            by_depth: dict[float, list[dict[str, float]]] = {}
            for depth, score in zip(test.depths, scores, strict=True):
                by_depth.setdefault(depth, []).append(score)
            result.scores_by_depth = {
                depth_name(depth): {**_mean(group), "n": len(group)}
                for depth, group in sorted(by_depth.items())
            }
        result.context_tokens = sum(r.context_tokens for r in requests) / count
        result.document_tokens = sum(r.document_tokens for r in requests) / count
        result.latency_s = sum(latencies) / count
        result.adapter = adapter.summary() if adapter is not None else None
        result.predictions = [
            {"question": row.question, "answer": row.answer, "prediction": text}
            for row, text in zip(rows, texts, strict=True)
        ]
        if test.depths is not None:
            for prediction, depth in zip(result.predictions, test.depths, strict=True):
                prediction["depth"] = depth
        result.seconds = time.perf_counter() - started

    def _generate(
        self, requests: list[_Request], max_new_tokens: int, adapter: TrainedAdapter | None
    ) -> tuple[list[str], list[float]]:
        """Greedy answers and per-query latencies, through one continuous-batching generator."""
        model = self.base.model
        longest = max((0 if r.prefix is None else r.prefix.shape[0]) + len(r.prompt_ids) for r in requests)
        max_seq_len = longest + max_new_tokens
        rows = max(
            1, min(self.options.max_batch, len(requests), self.options.max_batch_tokens // max_seq_len)
        )
        slots = None
        if adapter is not None:
            targets, rank = peft_geometry(adapter.files)
            slots = LoraSlots(self.base.config, 1, rank, targets, model.device, model.dtype)
            slots.load(0, adapter.files)
        generator = Generator(model, slots, rows, max_seq_len, tokenizer=self.tokenizer)
        params = SamplingParams(max_new_tokens=max_new_tokens)
        slot = -1 if adapter is None else 0
        pending = deque(enumerate(requests))
        tokens: dict[int, list[int]] = {i: [] for i in range(len(requests))}
        entered: dict[int, float] = {}
        latencies = [0.0] * len(requests)
        finished = 0
        while finished < len(requests):
            while pending and generator.free_rows():
                index, request = pending.popleft()
                if self.compressor.summary_form == "kv" and request.prefix is not None:
                    generator.add(str(index), None, request.prompt_ids, slot, params, request.prefix)
                else:
                    generator.add(str(index), request.prefix, request.prompt_ids, slot, params)
                entered[index] = time.perf_counter()
            for out in generator.step():
                index = int(out.request_id)
                if out.reason != "eos":
                    tokens[index].append(out.token_id)
                if out.finished:
                    latencies[index] = time.perf_counter() - entered[index]
                    finished += 1
        texts = [
            self.tokenizer.decode(tokens[i], skip_special_tokens=True).strip() for i in range(len(requests))
        ]
        return texts, latencies


def depth_name(depth: float) -> str:
    """A depth as the table shows it: 0.1 -> "10%"."""
    return f"{depth:.0%}"


def _mean(scores: list[dict[str, float]]) -> dict[str, float]:
    return {name: sum(score[name] for score in scores) / len(scores) for name in scores[0]}


def result_dict(result: ModeResult, with_predictions: bool = False) -> dict[str, Any]:
    """A result as JSON-ready data (predictions only when asked; ``recipe`` only on a sweep's LoRA rows, so
    that a run without a sweep writes the rows it wrote before sweeps existed)."""
    data = asdict(result)
    data["label"] = result.label
    if result.recipe is None:
        data.pop("recipe")
    if not with_predictions:
        data.pop("predictions")
    return data
