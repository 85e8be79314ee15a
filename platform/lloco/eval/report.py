"""The evaluation's outputs: eval.json (everything), eval.md (the tables), predictions.jsonl.

Besides one row per (test set, mode), or per (test set, mode, recipe) for the LoRA modes of a recipe sweep,
both carry the ablations that say whether the compressed context informs answers: LLoCO against the LoRA
trained without context and the full-context LoRA (per recipe in a sweep), passkey exact match by length
and depth, and the held-out perplexity gap the compressor closes. Both name the
split that was asked first (eval.json's ``split``, eval.md's title and first line), so that validation
figures are never read as test figures.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lloco.eval.passkey import DEPTHS
from lloco.eval.run import ModeResult, depth_name, mode_label, recipe_label, result_dict

JSON_FILE = "eval.json"
MARKDOWN_FILE = "eval.md"
PREDICTIONS_FILE = "predictions.jsonl"

_COLUMNS = (
    "test set",
    "mode",
    "n",
    "EM",
    "F1",
    "R-1",
    "R-2",
    "R-L",
    "R-gmean",
    "ctx tokens/query",
    "ctx ratio",
    "latency s/query",
)


HEADLINE = {"qa": "f1", "summary": "rouge_gmean"}  # the score the ablations compare
_HEADLINE_NAMES = {"f1": "F1", "rouge_gmean": "R-gmean"}
_PERPLEXITY_ROWS = (
    ("no_context", "no context"),
    ("compressed", "compressed earlier segments"),
    ("compressed_untrained", "fresh (untrained) summary embeddings"),
    ("full_text", "full earlier text"),
    ("reconstruction", "compressed segments up to the scored one"),
)


_SPLIT_NOTICES = {
    "test": "**Split: test.** Questions about the test split's documents: the figures to report. Choose a "
    "finetune recipe (steps, learning rate, rows) on `--split validation`, never on these.",
    "validation": "**Split: validation, not test.** Questions about train-side documents that no LoRA train "
    "row holds: for choosing a finetune recipe (steps, learning rate, rows). Report figures from "
    "`--split test`.",
}


def split_notice(split: str) -> str:
    """The line that opens a report of ``split`` (``lloco.eval.tasks.EVAL_SPLITS``): what its figures are for."""
    return _SPLIT_NOTICES[split]


def _number(scores: dict[str, float], name: str) -> str:
    return f"{scores[name]:.1f}" if name in scores else ""


def _score(
    results: Sequence[ModeResult], test_set: str, mode: str, recipe: dict[str, Any] | None
) -> float | None:
    for result in results:
        if (
            result.test_set == test_set
            and result.mode == mode
            and result.recipe == recipe
            and not result.skipped
        ):
            return result.scores[HEADLINE[result.metric]]
    return None


def _with_recipe(row: dict[str, Any], recipe: dict[str, Any] | None) -> dict[str, Any]:
    """``row`` and its ``recipe`` when it has one (a sweep's), else ``row`` as it was before sweeps."""
    return row if recipe is None else {**row, "recipe": recipe}


def ablations(results: Sequence[ModeResult], perplexity: dict[str, Any] | None) -> dict[str, Any]:
    """The ablation summary: per test set (and recipe, in a sweep) LLoCO, the no-context LoRA and the
    full-context LoRA on the headline score, LLoCO minus the no-context LoRA (points) and LLoCO as a
    percentage of the full-context LoRA (None where a mode did not run or the full-context LoRA scored 0);
    exact match by depth of every row of a test set that has depths; the perplexity gap closed; and, when the
    evidence modes ran, what the summaries add to the evidence (``_evidence_compared``)."""
    compared, evidence = [], []
    for test_set, metric in dict.fromkeys((r.test_set, r.metric) for r in results):
        recipes: list[dict[str, Any]] = []  # a sweep's, in their order; none without a sweep
        for result in results:
            if result.test_set == test_set and result.recipe is not None and result.recipe not in recipes:
                recipes.append(result.recipe)
        compared += [_compared(results, test_set, metric, recipe) for recipe in recipes or [None]]
        evidence += [_evidence_compared(results, test_set, metric, recipe) for recipe in recipes or [None]]
    by_depth = [
        _with_recipe(
            {
                "test_set": r.test_set,
                "mode": r.mode,
                "em": r.scores["em"],
                "em_by_depth": {depth: scores["em"] for depth, scores in r.scores_by_depth.items()},
            },
            r.recipe,
        )
        for r in results
        if r.scores_by_depth and not r.skipped
    ]
    closed = perplexity.get("gap_closed") if perplexity else None
    summary = {"lloco_vs_baselines": compared, "em_by_depth": by_depth, "perplexity_gap_closed": closed}
    evidence = [
        row for row in evidence if row["lloco_evidence"] is not None or row["lora_evidence"] is not None
    ]
    return {**summary, "evidence": evidence} if evidence else summary


def _evidence_compared(
    results: Sequence[ModeResult], test_set: str, metric: str, recipe: dict[str, Any] | None
) -> dict[str, Any]:
    """LLoCO with evidence against the evidence alone (the summaries' part: their difference) and against the
    no-context and full-context LoRAs, on the headline score."""
    with_evidence, alone, lora_none, full_lora = (
        _score(results, test_set, m, recipe)
        for m in ("lloco_evidence", "lora_evidence", "lora_none", "full_lora")
    )
    return _with_recipe(
        {
            "test_set": test_set,
            "score": HEADLINE[metric],
            "lloco_evidence": with_evidence,
            "lora_evidence": alone,
            "lora_none": lora_none,
            "full_lora": full_lora,
            "summaries_add": None if with_evidence is None or alone is None else with_evidence - alone,
        },
        recipe,
    )


def _compared(
    results: Sequence[ModeResult], test_set: str, metric: str, recipe: dict[str, Any] | None
) -> dict[str, Any]:
    lloco, lora_none, full_lora = (
        _score(results, test_set, m, recipe) for m in ("lloco", "lora_none", "full_lora")
    )
    return _with_recipe(
        {
            "test_set": test_set,
            "score": HEADLINE[metric],
            "lloco": lloco,
            "lora_none": lora_none,
            "full_lora": full_lora,
            "lloco_minus_lora_none": None if lloco is None or lora_none is None else lloco - lora_none,
            "lloco_pct_of_full_lora": None if lloco is None or not full_lora else 100 * lloco / full_lora,
        },
        recipe,
    )


def _cell(value: float | None, form: str = "{:.1f}") -> str:
    return "" if value is None else form.format(value)


# An ablation table's score columns: (heading, row key, format of the value).
_BASELINE_COLUMNS = (
    ("LLoCO", "lloco", "{:.1f}"),
    ("LoRA, no context", "lora_none", "{:.1f}"),
    ("full-context LoRA", "full_lora", "{:.1f}"),
    ("LLoCO - LoRA no context", "lloco_minus_lora_none", "{:+.1f}"),
    ("LLoCO / full-context LoRA", "lloco_pct_of_full_lora", "{:.0f}%"),
)
_EVIDENCE_COLUMNS = (
    ("LLoCO + evidence", "lloco_evidence", "{:.1f}"),
    ("evidence alone", "lora_evidence", "{:.1f}"),
    ("LoRA, no context", "lora_none", "{:.1f}"),
    ("full-context LoRA", "full_lora", "{:.1f}"),
    ("what the summaries add", "summaries_add", "{:+.1f}"),
)


def _score_table(
    rows: list[dict[str, Any]], recipe_column: list[str], score_columns: tuple[tuple[str, str, str], ...]
) -> list[str]:
    """A markdown table of ablation rows: test set, the recipe (a sweep's), the score's name, then
    ``score_columns`` (heading, row key, format)."""
    columns = ["test set", *recipe_column, "score", *(heading for heading, _, _ in score_columns)]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(recipe_column) + "---|" + "---:|" * len(score_columns),
    ]
    for row in rows:
        recipe = [recipe_label(row["recipe"]) if "recipe" in row else ""] if recipe_column else []
        cells = [row["test_set"], *recipe, _HEADLINE_NAMES[row["score"]]]
        cells += [_cell(row[key], form) for _, key, form in score_columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ablation_markdown(summary: dict[str, Any], perplexity: dict[str, Any] | None) -> str:
    """The ablations as markdown sections (after the main table); a sweep's have a recipe column."""
    recipe_column = ["recipe"] if any("recipe" in row for row in summary["lloco_vs_baselines"]) else []
    lines = [
        "## Ablations",
        "",
        "Does the compressed context inform answers? LLoCO against a LoRA trained on the same rows, steps, "
        "seed and initial weights with no context at all (LoRA, no context), and against the full-context "
        "LoRA (F1 for QA, R-gmean for summaries).",
        "",
        *_score_table(summary["lloco_vs_baselines"], recipe_column, _BASELINE_COLUMNS),
    ]
    if summary.get("evidence"):
        lines += [
            "",
            "### Do the summaries add to the evidence?",
            "",
            "LLoCO with the question's evidence sentences (in what the summaries leave of the context budget) "
            "against a LoRA trained on evidence alone given the whole budget (same rows, steps, seed and initial "
            "weights): their difference is what the compressed context adds over retrieval at the same budget.",
            "",
            *_score_table(summary["evidence"], recipe_column, _EVIDENCE_COLUMNS),
        ]
    if summary["em_by_depth"]:
        depths = [depth_name(depth) for depth in DEPTHS]
        lines += [
            "",
            "### Fact recall (passkey): exact match by depth of the asked fact",
            "",
            "| test set | mode | all | " + " | ".join(depths) + " |",
            "|---|---|---:|" + "---:|" * len(depths),
        ]
        for row in summary["em_by_depth"]:
            cells = [row["test_set"], mode_label(row["mode"], row.get("recipe")), _cell(row["em"])]
            cells += [_cell(row["em_by_depth"].get(depth)) for depth in depths]
            lines.append("| " + " | ".join(cells) + " |")
    decoder = (perplexity or {}).get("decoder", "base")
    lines += ["", f"### Held-out perplexity (decoder: {decoder}; no tenant LoRA)", ""]
    if not perplexity:
        lines.append("Not measured.")
    elif perplexity.get("skipped"):
        lines.append(f"Skipped: {perplexity['skipped']}.")
    else:
        closed = perplexity["gap_closed"]
        lines += [
            f"Next-segment perplexity on {perplexity['windows']} windows of {perplexity['segments_per_window']} x "
            f"{perplexity['segment_len']} tokens of held-out prose ({perplexity['source']}), "
            f"{perplexity['scored_tokens']} scored tokens.",
            "",
            "| prefix | perplexity |",
            "|---|---:|",
            *(
                f"| {label} | {perplexity['perplexity'][name]:.2f} |"
                for name, label in _PERPLEXITY_ROWS
                if name in perplexity["perplexity"]
            ),
            "",
            "Gap closed, (none - compressed) / (none - full text): "
            + (
                "n/a (the full text is no better than none)" if closed is None else f"**{100 * closed:.1f}%**"
            ),
        ]
    return "\n".join(lines)


def markdown_table(results: Sequence[ModeResult]) -> str:
    """One line per (test set, mode). ``ctx ratio`` is document tokens over context tokens (x fewer)."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for result in results:
        if result.skipped:
            cells = [result.test_set, result.label, "", *[""] * 7, "", f"skipped: {result.skipped}"]
        else:
            ratio = f"{result.document_tokens / result.context_tokens:.1f}x" if result.context_tokens else ""
            scores = result.scores
            cells = [
                result.test_set,
                result.label,
                str(result.queries),
                *(
                    _number(scores, name)
                    for name in ("em", "f1", "rouge1", "rouge2", "rougeL", "rouge_gmean")
                ),
                f"{result.context_tokens:.0f}",
                ratio,
                f"{result.latency_s:.3f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(directory: Path, results: Sequence[ModeResult], meta: dict[str, Any]) -> dict[str, Any]:
    """Write the three files into ``directory``; returns what eval.json holds (``meta``, the ablations,
    the results). ``meta["split"]`` is the split asked (``test`` or ``validation``); ``meta["perplexity"]``
    is ``Evaluator.held_out_perplexity``'s result, if measured."""
    directory.mkdir(parents=True, exist_ok=True)
    perplexity = meta.get("perplexity")
    summary = ablations(results, perplexity)
    report = {**meta, "ablations": summary, "results": [result_dict(result) for result in results]}
    (directory / JSON_FILE).write_text(json.dumps(report, indent=2))
    header = [
        f"# Evaluation on the {meta['split']} split: {meta.get('base_model', '')} with compressor "
        f"{meta.get('compressor_id', '')}",
        "",
        split_notice(meta["split"]),
        "",
        f"Command: `{meta.get('command', '')}`",
        "",
        "Scores in percent. ctx tokens/query: what the decoder reads besides the prompt (summary vectors in "
        "the compressed modes); ctx ratio: the documents' tokens over that; latency: a query's time in the "
        "generator (continuous batching), compression excluded (offline).",
        "",
    ]
    body = markdown_table(results) + "\n\n" + ablation_markdown(summary, perplexity)
    (directory / MARKDOWN_FILE).write_text("\n".join(header) + body + "\n")
    with (directory / PREDICTIONS_FILE).open("w", encoding="utf-8") as file:
        for result in results:
            for prediction in result.predictions:
                entry = _with_recipe({"test_set": result.test_set, "mode": result.mode}, result.recipe)
                entry.update(prediction)
                file.write(json.dumps(entry, ensure_ascii=False) + "\n")
    return report
