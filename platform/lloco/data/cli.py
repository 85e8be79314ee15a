"""`lloco data fetch`: download the public QA sets that `lloco eval` and `lloco pretrain-corpus` read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lloco.data.fetch import DATASETS


def register(app: typer.Typer) -> None:
    data = typer.Typer(
        help="The public QA sets (SQuAD 2.0 dev, HotpotQA dev, QMSum) for evaluation and pretraining.",
        no_args_is_help=True,
    )
    data.command("fetch")(fetch_command)
    app.add_typer(data, name="data")


def fetch_command(
    dest: Annotated[
        Path | None,
        typer.Option(help="Directory to fill (default: settings qa_data_dir, LLOCO_QA_DATA_DIR)."),
    ] = None,
    datasets: Annotated[str, typer.Option(help="Comma list of squad, qmsum, hotpotqa.")] = ",".join(DATASETS),
    mirror: Annotated[
        str | None,
        typer.Option(help="Fetch MIRROR/<dataset>/<upstream path> instead of the publishers' URLs."),
    ] = None,
    config: Annotated[Path | None, typer.Option(help="Settings YAML (else LLOCO_CONFIG / env).")] = None,
) -> None:
    """Download SQuAD 2.0 dev, HotpotQA dev (distractor) and QMSum; every file's sha256 is checked.

    Files already there with the right content are kept, so running it again only completes or repairs.
    """
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from lloco.config import Settings
    from lloco.data.fetch import download, missing, remote_files

    target = dest or Settings.load(config).qa_data_dir
    files = remote_files(part.strip() for part in datasets.split(",") if part.strip())
    todo = missing(target, files)
    if todo:
        columns = (TextColumn("fetching"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        with Progress(*columns, console=Console(stderr=True)) as progress:
            task = progress.add_task("fetch", total=sum(file.size for file in todo))
            download(target, todo, mirror, on_bytes=lambda n: progress.advance(task, n))
    fetched = sum(file.size for file in todo)
    typer.echo(
        f"{target}: {len(todo)} files fetched ({fetched / 1e6:.1f} MB), {len(files) - len(todo)} already there"
    )
