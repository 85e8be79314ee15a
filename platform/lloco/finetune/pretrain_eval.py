"""How much of a document a compressor's summaries carry: held-out perplexity and a QA probe.

Both score on the inference path, exactly as the platform decodes: ``Compressor.compress`` for the
summaries, the base model's ``hidden`` for the decoder, with the compressor's reader adapter (if it has
one) in a one-slot ``LoraSlots``. The same decoder scores every prefix, so the differences between rows
are the context's alone.

- ``next_segment_perplexity``: segments 1..n-1 of held-out windows after no context, the compressed
  earlier segments, the untrained compressor's summaries, the full earlier text, and the summaries of
  segments up to and including the scored one (reconstruction). ``gap_closed`` =
  (ppl_none - ppl_compressed) / (ppl_none - ppl_full): the share of what the full text buys that the
  summaries buy.
- ``qa_probe``: answer NLL per token of held-out QA examples after no context, the document's summaries,
  and the document's tokens, and the share of answers the greedy choice gets exactly right.
- ``fact_recall``: whether summaries hold strings, not just topics: each planted fact of passkey documents
  (random codes and dates, names, cities) read back, teacher-forced, in its own segment after the summaries
  of the segments before it, after those of its own segment too (what autoencoding trains), after nothing,
  and after the segment's own text (the copy ceiling); per fact kind, answers the greedy choice gets exactly.

Key/value summaries (``Compressor.summary_form`` "kv") are read by ``lloco.model.kv_summary.prefix_hidden``,
the same function the pretraining's decoder passes use; the full-text and no-context rows are the same
either way.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lloco.errors import FailedPrecondition
from lloco.eval.passkey import PasskeyDocument
from lloco.finetune.corpus import Corpus
from lloco.finetune.pretrain_qa import QAExamples
from lloco.model import Compressor, Llama, LoadedModel, LoraBatch, LoraSlots
from lloco.model.kv_summary import prefix_hidden
from lloco.model.lora import peft_geometry


def reader_slots(base: LoadedModel, compressor: Compressor) -> LoraSlots | None:
    """The compressor's reader in a one-slot ``LoraSlots`` on the base model's device, or None."""
    if compressor.reader_files is None:
        return None
    targets, rank = peft_geometry(compressor.reader_files)
    model = base.model
    slots = LoraSlots(base.config, 1, rank, targets, model.device, model.dtype)
    slots.load(0, compressor.reader_files)
    return slots


def _batch(slots: LoraSlots | None, rows: int) -> LoraBatch | None:
    if slots is None:
        return None
    return slots.batch(torch.zeros(rows, dtype=torch.int64, device=slots.device))


def gap_closed(none: float, compressed: float, full: float) -> float | None:
    """(none - compressed) / (none - full); None when the full text does not beat no context."""
    return (none - compressed) / (none - full) if none > full else None


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


def _answer_scores(
    model: Llama,
    prefix: Tensor,
    tail: Tensor,
    targets: Tensor,
    first: int,
    lora: LoraBatch | None,
    kv: bool = False,
) -> tuple[float, int]:
    """Summed NLL of ``targets`` [B, n] predicted at positions first..first+n-1 of ``tail`` [B, T, D] after
    ``prefix`` [B, P, width] (embeddings, or key/value summaries when ``kv``), and how many rows the
    greedy choice gets exactly right at every target (teacher-forced argmax = greedy decoding of them)."""
    if kv:
        hidden = prefix_hidden(model, tail, prefix if prefix.shape[1] else None, lora)[0]
    else:
        hidden = model.hidden(torch.cat([prefix.to(tail.dtype), tail], dim=1), lora)
        first += prefix.shape[1]
    logits = model.lm_head(hidden[:, first : first + targets.shape[1]]).float()
    nll = float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
    return nll, int((logits.argmax(-1) == targets).all(dim=1).sum())


@torch.no_grad()
def next_segment_perplexity(
    base: LoadedModel,
    compressor: Compressor,
    windows: Tensor,
    batch_size: int,
    initial: Compressor | None = None,
) -> dict[str, Any]:
    """Held-out perplexity of segments 1..n-1 of each window under each prefix (module docstring)."""
    model, size, k = base.model, compressor.segment_len, compressor.k
    n = windows.shape[1] // size
    names = ["no_context", "compressed", "full_text", "reconstruction"]
    if initial is not None:
        names.insert(2, "compressed_untrained")
    nll = dict.fromkeys(names, 0.0)
    per_segment = {name: [0.0] * n for name in names}
    slots = reader_slots(base, compressor)
    scored = 0
    for start in range(0, windows.shape[0], batch_size):
        rows = windows[start : start + batch_size].to(model.device)
        lora = _batch(slots, rows.shape[0])
        embeds = model.embed(rows)
        documents = rows[:, : n * size].tolist()
        trained = torch.stack(compressor.compress(documents))
        untrained = torch.stack(initial.compress(documents)) if initial is not None else None
        summaries_of = {"compressed": compressor, "reconstruction": compressor}
        if initial is not None:
            summaries_of["compressed_untrained"] = initial
        for i in range(1, n):
            segment, targets = embeds[:, i * size : (i + 1) * size], rows[:, i * size + 1 : (i + 1) * size]
            prefixes = {
                "no_context": segment[:, :0],
                "compressed": trained[:, : i * k],
                "full_text": embeds[:, : i * size],
                "reconstruction": trained[:, : (i + 1) * k],
            }
            if untrained is not None:
                prefixes["compressed_untrained"] = untrained[:, : i * k]
            for name, prefix in prefixes.items():
                kv = name in summaries_of and summaries_of[name].summary_form == "kv"
                value = _answer_scores(model, prefix, segment, targets, 0, lora, kv)[0]
                nll[name] += value
                per_segment[name][i] += value
        scored += rows.shape[0]
    tokens = scored * (n - 1) * (size - 1)
    perplexity = {name: math.exp(value / tokens) for name, value in nll.items()}
    return {
        "windows": scored,
        "segments_per_window": n,
        "segment_len": size,
        "scored_tokens": tokens,
        "decoder": "base + reader" if slots is not None else "base",
        "perplexity": perplexity,
        "gap_closed": gap_closed(perplexity["no_context"], perplexity["compressed"], perplexity["full_text"]),
        "perplexity_by_segment": {
            name: [math.exp(v / (scored * (size - 1))) for v in values[1:]]
            for name, values in per_segment.items()
        },
    }


@torch.no_grad()
def qa_probe(
    base: LoadedModel, compressor: Compressor, examples: QAExamples, batch_size: int
) -> dict[str, Any]:
    """Answer NLL per token of ``examples`` after no context, the summaries, the summaries of *another*
    example's document of the same source (``compressed_other``: what answer-format priors alone would score;
    only what ``compressed`` does better is the document's own content), and the document's tokens (one
    example per forward; ``batch_size`` segments per compressor forward)."""
    model = base.model
    device = model.device
    slots = reader_slots(base, compressor)
    summaries = compressor.compress([doc.tolist() for doc in examples.documents], batch_size=batch_size)
    names = ("no_context", "compressed", "compressed_other", "full_text")
    other = _other_of_same_source(examples.sources)
    nll: dict[str, dict[str, float]] = {}  # source -> prefix -> summed NLL
    exact: dict[str, dict[str, int]] = {}  # source -> prefix -> answers greedy gets exactly right
    tokens: dict[str, int] = {}
    counts: dict[str, int] = {}
    lora = _batch(slots, 1)
    for index, vectors in enumerate(summaries):
        source = examples.sources[index]
        prompt = torch.tensor(examples.prompts[index], device=device)
        answer = torch.tensor(examples.answers[index], device=device)
        document = torch.tensor(examples.documents[index], device=device, dtype=torch.int64)
        tail = model.embed(torch.cat([prompt, answer])[None])
        prefixes = {
            "no_context": tail[:, :0],
            "compressed": vectors[None].to(tail.dtype),
            "compressed_other": summaries[other[index]][None].to(tail.dtype),
            "full_text": model.embed(document[None]),
        }
        sums = nll.setdefault(source, dict.fromkeys(names, 0.0))
        hits = exact.setdefault(source, dict.fromkeys(names, 0))
        for name, prefix in prefixes.items():
            kv = name.startswith("compressed") and compressor.summary_form == "kv"
            value, right = _answer_scores(model, prefix, tail, answer[None], len(prompt) - 1, lora, kv)
            sums[name] += value
            hits[name] += right
        tokens[source] = tokens.get(source, 0) + len(answer)
        counts[source] = counts.get(source, 0) + 1
    total = max(1, sum(tokens.values()))
    return {
        "examples": len(examples),
        "answer_tokens": sum(tokens.values()),
        "decoder": "base + reader" if slots is not None else "base",
        "answer_nll": {name: sum(sums[name] for sums in nll.values()) / total for name in names},
        "answer_nll_by_source": {
            source: {name: value / tokens[source] for name, value in sums.items()}
            for source, sums in sorted(nll.items())
        },
        "answer_exact": {
            name: sum(hits[name] for hits in exact.values()) / max(1, len(summaries)) for name in names
        },
        "answer_exact_by_source": {
            source: {name: value / counts[source] for name, value in hits.items()}
            for source, hits in sorted(exact.items())
        },
    }


FACT_PREFIXES = ("no_context", "earlier_summaries", "own_summaries", "segment_text")


@torch.no_grad()
def fact_recall(
    base: LoadedModel, compressor: Compressor, documents: list[PasskeyDocument]
) -> dict[str, Any]:
    """Planted facts read back from summaries (module docstring). For the fact's answer tokens
    ``first..last`` in segment i: the segment's tokens up to the last answer token (from one token before
    the segment when the answer opens it) follow each prefix; ``segment_text`` is segment i's full text."""
    model, size, k = base.model, compressor.segment_len, compressor.k
    kv = compressor.summary_form == "kv"
    lora = _batch(reader_slots(base, compressor), 1)
    nll = dict.fromkeys(FACT_PREFIXES, 0.0)
    exact: dict[str, dict[str, int]] = {}  # kind -> prefix -> facts read back exactly
    facts: dict[str, int] = {}
    tokens = 0
    for document in documents:
        encoded = base.tokenizer(document.text, add_special_tokens=False, return_offsets_mapping=True)
        ids, spans = encoded["input_ids"], encoded["offset_mapping"]
        summaries = compressor.compress([ids])[0][None]
        embeds = model.embed(torch.tensor([ids], device=model.device))
        for fact in document.facts:
            start = document.text.index(fact.answer, fact.char_offset)
            end = start + len(fact.answer)
            answer = [j for j, (a, b) in enumerate(spans) if a < end and b > start]
            first, last = answer[0], answer[-1]
            i = first // size
            lo = max(0, min(i * size, first - 1))
            targets = torch.tensor([ids[first : last + 1]], device=model.device)
            prefixes = {
                "no_context": embeds[:, :0],
                "earlier_summaries": summaries[:, : i * k],
                "own_summaries": summaries[:, : (i + 1) * k],
                "segment_text": embeds[:, i * size : (i + 1) * size],
            }
            hits = exact.setdefault(fact.kind, dict.fromkeys(FACT_PREFIXES, 0))
            for name, prefix in prefixes.items():
                value, right = _answer_scores(
                    model,
                    prefix,
                    embeds[:, lo:last],
                    targets,
                    first - lo - 1,
                    lora,
                    kv and "summaries" in name,
                )
                nll[name] += value
                hits[name] += right
            facts[fact.kind] = facts.get(fact.kind, 0) + 1
            tokens += targets.shape[1]
    total = sum(facts.values())
    return {
        "documents": len(documents),
        "facts": total,
        "answer_tokens": tokens,
        "decoder": "base + reader" if lora is not None else "base",
        "answer_nll": {name: value / max(1, tokens) for name, value in nll.items()},
        "exact": {name: sum(h[name] for h in exact.values()) / max(1, total) for name in FACT_PREFIXES},
        "exact_by_kind": {
            kind: {name: value / facts[kind] for name, value in hits.items()}
            for kind, hits in sorted(exact.items())
        },
    }


def _other_of_same_source(sources: list[str]) -> list[int]:
    """For each example, the next example of its source (cyclically; itself when it is its source's only one)."""
    by_source: dict[str, list[int]] = {}
    for index, source in enumerate(sources):
        by_source.setdefault(source, []).append(index)
    other = list(range(len(sources)))
    for indexes in by_source.values():
        for position, index in enumerate(indexes):
            other[index] = indexes[(position + 1) % len(indexes)]
    return other
