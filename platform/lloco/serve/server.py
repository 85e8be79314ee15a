"""The gRPC server of the API, run by each Ingress replica in place of Ray Serve's gRPC proxy.

Serve's proxy (Ray 2.60) listens on every interface, speaks no TLS, reads request messages of up to
2 GiB before any code of ours runs (the size is an environment variable of the proxy process, read
before authentication is possible), answers its own ``ray.serve.RayServeAPIService`` and reflection
without a key, and turns a message that does not parse into UNKNOWN. This server, a ``grpc.aio``
server on the replica's event loop calling the Ingress' methods directly:

- listens on ``serve.host:serve.grpc_port``, with TLS when ``serve.tls_cert_file``/``tls_key_file``
  are set; several replicas on one node share the port (SO_REUSEPORT);
- refuses a message over ``limits.message_bytes`` from its length prefix, before holding its body;
- authenticates a call from its metadata before reading its message: every method is registered as
  request-streaming, so the message of an unauthenticated call is never read;
- parses the message itself: bytes that are not the request type (strings that are not UTF-8, a
  broken encoding) are INVALID_ARGUMENT;
- serves ``lloco.v1.LlocoService`` and ``grpc.health.v1.Health`` and nothing else; at most
  ``serve.max_ongoing_requests`` calls at once (RESOURCE_EXHAUSTED beyond).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2

from lloco.api import lloco_pb2
from lloco.auth import Principal
from lloco.config import Settings
from lloco.errors import FailedPrecondition, InvalidArgument
from lloco.logs import get_logger
from lloco.serve.edge import grpc_status

log = get_logger(__name__)

MAX_METADATA_BYTES = 16 * 1024
MAX_STREAMS_PER_CONNECTION = 128
# (module, service, whether its calls carry an API key)
SERVICES: tuple[tuple[ModuleType, str, bool], ...] = (
    (lloco_pb2, "LlocoService", True),
    (health_pb2, "Health", False),
)


class Servicer(Protocol):
    """What the server needs of the Ingress: the RPC methods by name, plus these two."""

    async def authenticate(self, metadata: Sequence[tuple[str, Any]]) -> Principal: ...

    def record(self, method: str, code: grpc.StatusCode, started: float) -> None: ...


@dataclass
class CallContext:
    """What an RPC method sees of its call: the caller the server authenticated, metadata in, status out."""

    call: grpc.aio.ServicerContext
    principal: Principal | None

    def invocation_metadata(self) -> Sequence[tuple[str, Any]]:
        return self.call.invocation_metadata() or ()

    def set_code(self, code: grpc.StatusCode) -> None:
        self.call.set_code(code)

    def set_details(self, details: str) -> None:
        self.call.set_details(details)


def address(host: str, port: int) -> str:
    """``host:port`` as gRPC binds and dials it (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_server(servicer: Servicer, settings: Settings) -> grpc.aio.Server:
    """Listen on ``serve.host:serve.grpc_port`` and serve the API from ``servicer``'s methods.

    Raises:
        FailedPrecondition: the address cannot be bound, or the TLS files cannot be read.
    """
    serve = settings.serve
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.limits.message_bytes),
            ("grpc.max_metadata_size", MAX_METADATA_BYTES),
            ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
            ("grpc.so_reuseport", 1),
        ],
        maximum_concurrent_rpcs=serve.max_ongoing_requests,
    )
    server.add_generic_rpc_handlers(tuple(_handlers(servicer)))
    where = address(serve.host, serve.grpc_port)
    try:
        if serve.tls:
            server.add_secure_port(where, _credentials(settings))
        else:
            server.add_insecure_port(where)
    except RuntimeError as error:
        raise FailedPrecondition(f"the gRPC server cannot listen on {where}: {error}") from error
    await server.start()
    log.info(
        "grpc server listening", address=where, tls=serve.tls, max_message_bytes=settings.limits.message_bytes
    )
    return server


def _credentials(settings: Settings) -> grpc.ServerCredentials:
    serve = settings.serve
    try:
        key = serve.tls_key_file.read_bytes()  # type: ignore[union-attr]
        chain = serve.tls_cert_file.read_bytes()  # type: ignore[union-attr]
    except OSError as error:
        raise FailedPrecondition(
            f"cannot read the gRPC server's TLS files (serve.tls_cert_file / serve.tls_key_file): "
            f"{error.strerror}: {error.filename}"
        ) from error
    return grpc.ssl_server_credentials([(key, chain)])


def _handlers(servicer: Servicer) -> list[grpc.GenericRpcHandler]:
    handlers = []
    for module, service_name, authenticated in SERVICES:
        service = module.DESCRIPTOR.services_by_name[service_name]
        methods = {}
        for method in service.methods:
            if not hasattr(servicer, method.name):
                continue  # e.g. Health.List: answered UNIMPLEMENTED
            call = _Method(servicer, method.name, GetMessageClass(method.input_type), authenticated)
            if method.server_streaming:
                methods[method.name] = grpc.stream_stream_rpc_method_handler(call.stream)
            else:
                methods[method.name] = grpc.stream_unary_rpc_method_handler(call.unary)
        handlers.append(grpc.method_handlers_generic_handler(service.full_name, methods))
    return handlers


@dataclass(frozen=True)
class _Method:
    """One RPC: authenticate from metadata, then read and parse the one request message, then call the
    servicer's method (which maps its own errors to the call's status)."""

    servicer: Servicer
    name: str
    request_type: type[Message]
    authenticated: bool

    async def unary(self, requests: AsyncIterator[bytes], call: grpc.aio.ServicerContext) -> bytes:
        request, context = await self._open(requests, call)
        method: Callable[[Message, CallContext], Awaitable[Message]] = getattr(self.servicer, self.name)
        reply = await method(request, context)
        return reply.SerializeToString()

    async def stream(
        self, requests: AsyncIterator[bytes], call: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        request, context = await self._open(requests, call)
        method: Callable[[Message, CallContext], AsyncIterator[Message]] = getattr(self.servicer, self.name)
        try:
            async for reply in method(request, context):
                yield reply.SerializeToString()
        except Exception:  # noqa: BLE001 - the method has set the call's status from the error already
            return

    async def _open(
        self, requests: AsyncIterator[bytes], call: grpc.aio.ServicerContext
    ) -> tuple[Message, CallContext]:
        started = time.perf_counter()
        try:
            principal = None
            if self.authenticated:
                principal = await self.servicer.authenticate(call.invocation_metadata() or ())
            return self._parse(await _first(requests)), CallContext(call, principal)
        except Exception as error:  # noqa: BLE001 - every refusal becomes a status below
            code, details = grpc_status(self.name, error)
            self.servicer.record(self.name, code, started)
            await call.abort(code, details)  # raises: the call ends with this status
            raise

    def _parse(self, data: bytes) -> Message:
        try:
            return self.request_type.FromString(data)
        except (DecodeError, RecursionError) as error:
            raise InvalidArgument(
                f"the request is not a valid {self.request_type.DESCRIPTOR.full_name} message (a broken "
                "encoding, or a string field that is not UTF-8)"
            ) from error


async def _first(requests: AsyncIterator[bytes]) -> bytes:
    async for data in requests:
        return data
    raise InvalidArgument("the call carried no request message")
