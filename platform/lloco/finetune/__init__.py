"""Per-tenant LoRA finetuning on compressed contexts: datasets, the train recipe, the concurrent Ray job."""

from __future__ import annotations

from typing import Any

__all__ = ["run_finetune_job"]


def __getattr__(name: str) -> Any:
    """``run_finetune_job`` on first use, so importing the package (for the CLI) stays light."""
    if name == "run_finetune_job":
        from lloco.finetune.job import run_finetune_job

        return run_finetune_job
    raise AttributeError(name)
