"""`lloco compress`: the offline compression job as a plain entry point (`ray job submit -- lloco compress --all`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
) -> None:
    """Compress every pending document of the tenants into contexts (Ray Data; joins the Ray cluster at
    RAY_ADDRESS or one running here, else starts a local one). Exit status 3: some documents failed
    (listed in the summary); the others were compressed."""
    if bool(tenant) == all_tenants:
        raise typer.BadParameter("give --tenant T (one or more) or --all")
    from lloco.compress.job import run_compress_job
    from lloco.config import Settings
    from lloco.errors import LlocoError

    try:
        result = run_compress_job(Settings.load(config), None if all_tenants else tenant, summary, job_id)
    except LlocoError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from error
    typer.echo(result.line())
    for failure in result.failures:
        typer.echo(f"failed: tenant {failure.tenant} document {failure.doc_id}: {failure.reason}", err=True)
    if result.failed:
        raise typer.Exit(EXIT_SOME_FAILED)
