"""The `lloco` command. Each room registers its own commands; heavy imports happen inside them.

A ``LlocoError`` any command raises ends it here, in one place: ``error: <message>`` on stderr and exit
status 1, never a traceback (those are for bugs, not for a bad flag or a missing file).
"""

from __future__ import annotations

import importlib
from typing import Any

import click
import typer
from typer.core import TyperGroup

from lloco.errors import LlocoError


class _Commands(TyperGroup):
    """The command group; turns a command's ``LlocoError`` into its message and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LlocoError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Commands,
    help="lloco: multi-tenant LLoCO serving on Ray.",
    no_args_is_help=True,
    add_completion=False,
)

# Each module defines `register(app: typer.Typer) -> None`.
COMMAND_MODULES: tuple[str, ...] = (
    "lloco.demo",
    "lloco.serve.cli",
    "lloco.client.cli",
    "lloco.compress.cli",
    "lloco.finetune.cli",
    "lloco.finetune.pretrain_cli",
    "lloco.eval.cli",
    "lloco.data.cli",
    "lloco.model_cli",
)

for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


@app.callback()
def main() -> None:
    """Offline context compression, per-tenant LoRA finetuning and multi-tenant serving on Ray."""


@app.command()
def version() -> None:
    """Print the package version."""
    from lloco import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()
