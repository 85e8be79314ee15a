"""`lloco compress`: the offline compression job as a plain entry point (`ray job submit -- lloco compress --all`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lloco.terminal import VERBOSE_HELP, progress, quiet_ray

EXIT_SOME_FAILED = 3  # 1: the job failed; 2: usage error (click)


def register(app: typer.Typer) -> None:
    app.command("compress")(compress)


def compress(
    tenant: Annotated[
        list[str] | None, typer.Option("--tenant", help="A tenant to compress (repeatable).")
    ] = None,
    all_tenants: Annotated[bool, typer.Option("--all", help="Compress every tenant.")] = False,
    summary: Annotated[Path | None, typer.Option(help="Write the job summary as JSON here.")] = None,
    job_id: Annotated[
        str | None, typer.Option(help="Job id the job records itself under (default: a new one).")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="Settings YAML (else LLOCO_CONFIG / env).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)] = False,
) -> None:
    """Compress every pending document of the tenants into contexts (Ray Data; joins the Ray cluster at
    RAY_ADDRESS or one running here, else starts a local one). Exit status 3: some documents failed
    (listed in the summary); the others were compressed."""
    if bool(tenant) == all_tenants:
        raise typer.BadParameter("give --tenant T (one or more) or --all")
    from lloco.compress.job import CompressSummary, run_compress_job
    from lloco.config import Settings

    settings = Settings.load(config)
    quiet_ray(settings.data_dir, verbose)
    with progress() as bars:
        task = bars.add_task("compress", total=None, detail="documents")

        def show(now: CompressSummary) -> None:
            bars.update(task, total=now.documents, completed=now.finished, detail=f"{now.failed} failed")

        result = run_compress_job(settings, None if all_tenants else tenant, summary, job_id, show)
    typer.echo(result.line())
    for failure in result.failures:
        typer.echo(f"failed: tenant {failure.tenant} document {failure.doc_id}: {failure.reason}", err=True)
    if result.failed:
        raise typer.Exit(EXIT_SOME_FAILED)
