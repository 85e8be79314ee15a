"""The HTTP server of the OpenAI-compatible API, run by each Ingress replica next to its gRPC server.

A uvicorn server on the replica's own event loop (so its handlers share the replica's engine handle,
key cache and per-tenant accounting with gRPC), listening on ``serve.host:serve.http_port``, with TLS
from the same ``serve.tls_cert_file``/``tls_key_file`` as gRPC. The socket is bound here with
SO_REUSEPORT, as the gRPC server's is, so several replicas on one node share the port. uvicorn neither
configures logging (the replica's structured logs stay the only ones) nor touches the process's signal
handlers (Ray owns them).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from lloco.config import Settings
from lloco.errors import FailedPrecondition
from lloco.logs import get_logger
from lloco.serve.server import address

log = get_logger(__name__)

STARTUP_TIMEOUT_S = 10.0


class _ReplicaServer(uvicorn.Server):
    """uvicorn without its signal handlers: the replica's process (Ray) owns them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """A running HTTP server; `stop` finishes running requests for at most ``grace_s``, then closes."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None]) -> None:
        self._server, self._task = server, task

    async def stop(self, grace_s: float) -> None:
        self._server.config.timeout_graceful_shutdown = grace_s
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def start_http_server(app: ASGIApp, settings: Settings) -> HttpServer:
    """Serve ``app`` on ``serve.host:serve.http_port`` (which must be set).

    Raises:
        FailedPrecondition: the address cannot be bound, or the TLS files cannot be read.
    """
    serve = settings.serve
    assert serve.http_port is not None
    config = uvicorn.Config(
        app,
        ssl_certfile=serve.tls_cert_file,
        ssl_keyfile=serve.tls_key_file,
        lifespan="off",
        log_config=None,
        log_level="warning",
        access_log=False,
        server_header=False,
        proxy_headers=False,
    )
    try:
        config.load()
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
        raise FailedPrecondition(
            f"cannot read the HTTP server's TLS files (serve.tls_cert_file / serve.tls_key_file): {error}"
        ) from error
    listener = _listen(serve.host, serve.http_port)
    server = _ReplicaServer(config)
    task = asyncio.create_task(server.serve(sockets=[listener]), name="lloco-http")
    async with asyncio.timeout(STARTUP_TIMEOUT_S):
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
    if task.done():
        listener.close()
        raise FailedPrecondition(
            f"the HTTP server on {address(serve.host, serve.http_port)} stopped at start"
        )
    log.info("http server listening", address=address(serve.host, serve.http_port), tls=serve.tls)
    return HttpServer(server, task)


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` that other replicas on this node may share (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as error:
        listener.close()
        raise FailedPrecondition(
            f"the HTTP server cannot listen on {address(host, port)}: {error.strerror}"
        ) from error
    listener.setblocking(False)
    return listener
