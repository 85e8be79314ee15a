"""The evaluation's outputs: eval.json (everything), eval.md (the table), predictions.jsonl."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lloco.eval.run import ModeResult, result_dict

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


def _number(scores: dict[str, float], name: str) -> str:
    return f"{scores[name]:.1f}" if name in scores else ""


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
    """Write the three files into ``directory``; returns what eval.json holds."""
    directory.mkdir(parents=True, exist_ok=True)
    report = {**meta, "results": [result_dict(result) for result in results]}
    (directory / JSON_FILE).write_text(json.dumps(report, indent=2))
    header = [
        f"# Evaluation: {meta.get('base_model', '')} with compressor {meta.get('compressor_id', '')}",
        "",
        f"Command: `{meta.get('command', '')}`",
        "",
        "Scores in percent. ctx tokens/query: what the decoder reads besides the prompt (summary vectors in "
        "the compressed modes); ctx ratio: the documents' tokens over that; latency: a query's time in the "
        "generator (continuous batching), compression excluded (offline).",
        "",
    ]
    (directory / MARKDOWN_FILE).write_text("\n".join(header) + markdown_table(results) + "\n")
    with (directory / PREDICTIONS_FILE).open("w", encoding="utf-8") as file:
        for result in results:
            for prediction in result.predictions:
                entry = {"test_set": result.test_set, "mode": result.mode, **prediction}
                file.write(json.dumps(entry, ensure_ascii=False) + "\n")
    return report
