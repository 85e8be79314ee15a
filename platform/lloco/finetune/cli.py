"""`lloco finetune`: the plain entry point of the finetune job (also what `ray job submit` runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lloco.terminal import VERBOSE_HELP, finetune_bars, progress, quiet_ray


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune)


def finetune(
    tenant: Annotated[list[str], typer.Option("--tenant", help="Tenant to train (repeat for several).")],
    dataset: Annotated[str, typer.Option(help="Dataset of each tenant to train on.")],
    adapter: Annotated[str, typer.Option(help="Adapter that gets the new version.")] = "default",
    job_id: Annotated[str | None, typer.Option(help="Job id; the same id resumes a killed job.")] = None,
    mode: Annotated[
        str, typer.Option(help="compressed (LLoCO) or full (raw document tokens).")
    ] = "compressed",
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="Checkpoint every N steps (default: each epoch).")
    ] = None,
    eval_fraction: Annotated[
        float | None, typer.Option(help="Rows held out for the evaluation loss.")
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(help="Longest example; full mode cuts documents to fit.")
    ] = None,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute layers in backward.")] = False,
    seed: Annotated[int | None, typer.Option(help="Seed of the split, data order and dropout.")] = None,
    config: Annotated[Path | None, typer.Option(help="Settings YAML (else LLOCO_CONFIG / env).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)] = False,
) -> None:
    """Train a LoRA adapter per tenant concurrently on Ray Train and publish each as a new version."""
    from lloco.config import Settings
    from lloco.finetune.job import format_results, run_finetune_job
    from lloco.finetune.options import TrainOptions

    chosen = {
        "mode": mode,
        "max_steps": max_steps,
        "checkpoint_every_steps": checkpoint_every,
        "eval_fraction": eval_fraction,
        "max_length": max_length,
        "gradient_checkpointing": gradient_checkpointing,
        "seed": seed,
    }
    options = TrainOptions(**{name: value for name, value in chosen.items() if value is not None})
    settings = Settings.load(config)
    quiet_ray(settings.data_dir, verbose)
    with progress() as bars:
        results = run_finetune_job(
            settings,
            tenant,
            dataset,
            adapter=adapter,
            job_id=job_id,
            options=options,
            on_step=finetune_bars(bars, tenant),
        )
    typer.echo(format_results(results))
    if not all(result.ok for result in results.values()):
        raise typer.Exit(1)
