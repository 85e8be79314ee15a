"""Serving commands of `lloco`: `lloco up` (everything on this machine) and `lloco serve` (a Ray cluster)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn

import typer

DEFAULT_TENANT = "demo"


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def up(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Settings YAML (default: LLOCO_CONFIG, else built-ins)."),
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", min=1, max=65535, help="gRPC port (serve.grpc_port).")
    ] = None,
    http_port: Annotated[
        int | None,
        typer.Option(
            "--http-port", min=1, max=65535, help="Port of the OpenAI-compatible HTTP API (serve.http_port)."
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option("--host", help="Listen address (serve.host; 0.0.0.0 for every interface)."),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Where S3 data and caches live.")
    ] = None,
    tenant: Annotated[
        str, typer.Option("--tenant", help="Tenant to create (or reuse) and print its kept key for.")
    ] = (DEFAULT_TENANT),
    check: Annotated[
        bool, typer.Option("--check", help="Start, report health, stop; exit 1 unless SERVING.")
    ] = False,
) -> None:
    """Run lloco on this machine: embedded S3, local Ray and the app, gRPC and OpenAI-compatible HTTP (on
    serve.host, 127.0.0.1 by default), until Ctrl-C."""
    from lloco.config import Settings
    from lloco.errors import LlocoError
    from lloco.serve.local import EmbeddedStack

    overrides: dict[str, Any] = {}
    given = (("grpc_port", port), ("http_port", http_port), ("host", host))
    serve = {name: value for name, value in given if value is not None}
    if serve:
        overrides["serve"] = serve
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    try:
        settings = Settings.load(config, **overrides)
    except (OSError, ValueError) as error:
        _fail(f"bad settings: {error}")
    typer.echo(
        f"starting lloco on {settings.serve.host}:{settings.serve.grpc_port} (data in {settings.data_dir}) ..."
    )
    try:
        with EmbeddedStack(settings) as stack:
            # `kill` stops it as cleanly as Ctrl-C; set after Ray started, which installs its own handler
            signal.signal(signal.SIGTERM, _interrupt)
            key = stack.api_key(tenant)
            status = stack.health()
            typer.echo(f"lloco is up on {stack.address}: health {status}")
            cert = stack.settings.serve.tls_cert_file
            tls = f" LLOCO_CA={cert}" if cert else ""
            typer.echo(
                f"tenant: tenants/{tenant}\napi key: {key}\n"
                f"  (kept in {stack.key_file(tenant)}, readable by you only, and reused by the next "
                "`lloco up`; the server stores only its hash; `lloco admin revoke-key` revokes it)"
            )
            typer.echo(
                "try it:\n"
                f"  export LLOCO_TARGET={stack.address} LLOCO_API_KEY={key}{tls}\n"
                "  lloco ingest notes.txt\n"
                "  lloco query 'What do the notes say?' --doc notes"
            )
            if stack.openai_base_url:
                typer.echo(
                    f"OpenAI-compatible API: {stack.openai_base_url} (the same key; model 'tenants/{tenant}' "
                    "or an adapter id; documents in extra_body={'documents': [...]})"
                )
            if check:
                if status != "SERVING":
                    raise typer.Exit(1)
                return
            typer.echo("press Ctrl-C to stop")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        typer.echo("stopped")
    except LlocoError as error:
        _fail(str(error))


def serve_command(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="Serve config YAML (as for `serve deploy`).")
    ],
    address: Annotated[
        str,
        typer.Option("--address", envvar="RAY_DASHBOARD_ADDRESS", help="The Ray cluster's dashboard URL."),
    ] = "http://127.0.0.1:8265",
) -> None:
    """Deploy a Serve config (applications and gRPC options) to a running Ray cluster, as `serve deploy`."""
    from lloco.errors import LlocoError
    from lloco.serve.app import deploy_config

    try:
        names = deploy_config(config, address)
    except LlocoError as error:
        _fail(str(error))
    typer.echo(f"deployed {', '.join(names)} to the Ray cluster at {address}")


def register(app: typer.Typer) -> None:
    app.command("up")(up)
    app.command("serve")(serve_command)
