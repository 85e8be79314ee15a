"""The OpenAI-compatible HTTP API: ``GET /v1/models``, ``GET /v1/models/{model}``,
``POST /v1/chat/completions`` and ``POST /v1/completions`` (``stream: true``: server-sent events, then
``data: [DONE]``), served by each Ingress replica (`lloco.serve.http`) with the gRPC API's own parts.

Each request is checked as a gRPC call is, in the same order: at most ``serve.max_ongoing_requests``
requests at once per replica; the bearer key (``Authorization: Bearer <key>``, resolved by the
Ingress' `authenticate`) before the body is read; the body, read up to ``limits.message_bytes`` and
refused past it without holding the rest (413). The query becomes the gRPC ``QueryRequest``
(`openai_schema`), checked by the same `Queries` (limits, ownership, the tenant's queries in flight) and
answered from the same engine handle. Errors are the same typed errors: `lloco.serve.edge.http_error`
gives the HTTP status and the OpenAI error body, so a caller's mistake is a 4xx, never a 500. A streamed
answer's first event (adapter and contexts resolved) is awaited before the response starts, so those
errors have their status too; a failure after it ends the stream with an error event and no ``[DONE]``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from lloco.auth import Principal
from lloco.config import LimitSettings
from lloco.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from lloco.registry import Registry
from lloco.serve import replies
from lloco.serve.edge import TenantWork, http_error, openai_error_body
from lloco.serve.engine_core import EngineEvent
from lloco.serve.lookups import EdgeLookups
from lloco.serve.names import adapter_name, tenant_name
from lloco.serve.openai_schema import (
    ChatCompletionBody,
    CompletionBody,
    Reply,
    citation_objects,
    model_ids,
    model_object,
    parse_body,
    query_param,
    query_request,
)
from lloco.serve.queries import Queries
from lloco.storage import keys

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

Authenticate = Callable[[Sequence[tuple[str, Any]]], Awaitable[Principal]]
Record = Callable[[str, grpc.StatusCode, float], None]
Handler = Callable[[Request, Principal], Awaitable[Response]]

# the metrics' method name of each route (the gRPC API's are its RPC names)
ROUTES = {
    "/v1/models": "ListModels",
    "/v1/models/": "GetModel",  # a prefix: /v1/models/{model}
    "/v1/chat/completions": "ChatCompletions",
    "/v1/completions": "Completions",
}


class Refusal(Exception):
    """A refusal with an OpenAI error body: ``error`` (its status code, through `http_error`, gives the
    HTTP status) about the request parameter ``param``, or the HTTP layer's own refusal with ``status``."""

    def __init__(self, error: BaseException, param: str | None = None, status: int | None = None) -> None:
        super().__init__(str(error))
        self.error, self.param, self.status = error, param, status


class OpenAIApi:
    """The routes' handlers, over the Ingress' authentication, metrics, queries, engine and registry."""

    def __init__(
        self,
        *,
        authenticate: Authenticate,
        record: Record,
        queries: Queries,
        engine: DeploymentHandle,
        lookups: EdgeLookups,
        work: TenantWork,
        limits: LimitSettings,
        max_ongoing_requests: int,
    ) -> None:
        self._authenticate, self._record = authenticate, record
        self._queries, self._engine, self._lookups, self._work = queries, engine, lookups, work
        self._body_limit = limits.message_bytes
        self._max_ongoing = max_ongoing_requests
        self._ongoing = 0

    def app(self) -> ASGIApp:
        """The ASGI application: the four routes (any other path or method: an OpenAI error body), under
        the replica's cap on requests at once (a stream counts until it ends)."""
        routes = [
            Route("/v1/models", self._endpoint(self.list_models), methods=["GET"]),
            Route("/v1/models/{model:path}", self._endpoint(self.get_model), methods=["GET"]),
            Route("/v1/chat/completions", self._endpoint(self.chat_completions), methods=["POST"]),
            Route("/v1/completions", self._endpoint(self.completions), methods=["POST"]),
        ]
        return self._capped(Starlette(routes=routes, exception_handlers={HTTPException: _route_refusal}))

    def _capped(self, app: ASGIApp) -> ASGIApp:
        async def capped(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return await app(scope, receive, send)
            if self._ongoing >= self._max_ongoing:
                busy = ResourceExhausted(
                    f"the server is answering {self._ongoing} requests, its limit; retry shortly"
                )
                response = self._refused(_method(scope["path"]), time.perf_counter(), Refusal(busy))
                return await response(scope, receive, send)
            self._ongoing += 1
            try:
                await app(scope, receive, send)
            finally:
                self._ongoing -= 1

        return capped

    def _endpoint(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` behind the key check, the error mapping and the metrics."""

        async def endpoint(request: Request) -> Response:
            method, started = _method(request.url.path), time.perf_counter()
            try:
                principal = await self._authenticate(
                    [("authorization", request.headers.get("authorization", ""))]
                )
                response = await handler(request, principal)
            except Refusal as refusal:
                return self._refused(method, started, refusal)
            except Exception as error:  # noqa: BLE001 - every failure becomes a status and an error body
                return self._refused(method, started, Refusal(error))
            if isinstance(response, StreamingResponse) and isinstance(response.body_iterator, EventStream):
                response.body_iterator = self._recorded(method, started, response.body_iterator)
            else:
                self._record(method, grpc.StatusCode.OK, started)
            return response

        return endpoint

    def _refused(self, method: str, started: float, refusal: Refusal) -> Response:
        status, body = http_error(method, refusal.error, refusal.param)
        self._record(method, grpc.StatusCode[body["error"]["code"].upper()], started)
        return JSONResponse(body, status_code=refusal.status or status)

    async def _recorded(self, method: str, started: float, stream: EventStream) -> AsyncIterator[bytes]:
        """A stream's chunks; once it ends, counted in the metrics with the status it ended with."""
        try:
            async for chunk in stream:
                yield chunk
        finally:
            self._record(method, stream.code, started)

    async def _json(self, request: Request) -> object:
        """The request's JSON body, read up to the message cap (a longer body is refused unread)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._body_limit:
            raise self._too_large(int(declared))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self._body_limit:
                raise self._too_large(size)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise Refusal(InvalidArgument(f"the body is not valid JSON: {error}")) from None

    def _too_large(self, size: int) -> Refusal:
        message = f"the body is {size} bytes or more, over the limit of {self._body_limit} bytes"
        return Refusal(InvalidArgument(message), status=413)

    # -- models -------------------------------------------------------------------------------------------

    async def list_models(self, request: Request, principal: Principal) -> Response:
        """The caller's tenant as a model (the base model, no adapter), then each of its adapters."""
        if principal.tenant is None:
            raise InvalidArgument("the admin key belongs to no tenant: list models with a tenant's API key")
        registry = await self._lookups.registry(principal.tenant, principal)
        tenant = registry.tenant
        names = await self._work.run(tenant, registry.list_adapters)
        created = await self._work.map(tenant, lambda name: _created(registry, name), names)
        models = [model_object(tenant_name(tenant), int(registry.created.timestamp()), tenant)]
        models += [
            model_object(adapter_name(tenant, name), when, tenant)
            for name, when in zip(names, created, strict=True)
        ]
        return JSONResponse({"object": "list", "data": models})

    async def get_model(self, request: Request, principal: Principal) -> Response:
        """One model, by any name a completion takes; NotFound without such an adapter (version)."""
        model = request.path_params["model"]
        try:
            tenant, adapter, version = model_ids(principal, model)
        except InvalidArgument as error:
            raise Refusal(error, "model") from None
        registry = await self._lookups.registry(tenant, principal)
        if adapter is None:
            return JSONResponse(model_object(model, int(registry.created.timestamp()), tenant))
        found = await self._work.run(tenant, registry.get_adapter, adapter, version)
        return JSONResponse(model_object(model, int(found.created.timestamp()), tenant))

    # -- completions --------------------------------------------------------------------------------------

    async def chat_completions(self, request: Request, principal: Principal) -> Response:
        return await self._complete(request, principal, chat=True)

    async def completions(self, request: Request, principal: Principal) -> Response:
        return await self._complete(request, principal, chat=False)

    async def _complete(self, request: Request, principal: Principal, chat: bool) -> Response:
        try:
            body = parse_body(ChatCompletionBody if chat else CompletionBody, await self._json(request))
            query_message = query_request(principal, body)
            query = await self._queries.check(principal, query_message)
        except InvalidArgument as error:
            raise Refusal(error, query_param(str(error), "messages" if chat else "prompt")) from None
        citations = (
            citation_objects(replies.citations_reply(query.request.tenant, query.retrieved))
            if query.retrieved is not None
            else None
        )
        reply = Reply(
            chat,
            query_message.adapter or query_message.tenant,
            query.request.tenant,
            query.request.adapter,
            citations,
        )
        if not body.stream:
            answer = await self._queries.answer(self._engine, query)
            assert answer.final is not None  # Queries.answer raises Unavailable otherwise
            return JSONResponse(reply.whole(answer.text, answer.final))
        events = self._queries.events(self._engine, query)
        try:
            first = await anext(events)
        except StopAsyncIteration:
            raise Unavailable("the engine ended the answer without its final stats; retry") from None
        except BaseException:
            await events.aclose()
            raise
        stream = EventStream(reply, first, events, body.include_usage())
        return StreamingResponse(stream, media_type="text/event-stream")


class EventStream:
    """Server-sent events of a streamed answer: a chunk per engine event (the last with the finish
    reason), the usage chunk if asked for, then ``[DONE]``. An error after the first event ends the stream
    with an error event; leaving early closes ``events``, which cancels the query in the engine. ``code``
    is the status it ended with (CANCELLED until it ends: the caller went away)."""

    def __init__(
        self, reply: Reply, first: EngineEvent, events: AsyncIterator[EngineEvent], include_usage: bool
    ) -> None:
        self._reply, self._first, self._events, self._include_usage = reply, first, events, include_usage
        self.code = grpc.StatusCode.CANCELLED

    async def __aiter__(self) -> AsyncIterator[bytes]:
        reply = self._reply
        async with aclosing(self._events) as events:
            try:
                event, is_first = self._first, True
                while event.final is None:
                    yield _event(reply.chunk(event.text, first=is_first))
                    event, is_first = await anext(events), False
                yield _event(reply.chunk(event.text, first=is_first, stats=event.final))
                if self._include_usage:
                    yield _event(reply.usage_chunk(event.final))
                yield b"data: [DONE]\n\n"
                self.code = grpc.StatusCode.OK
            except Exception as error:  # noqa: BLE001 - the response has started: the error is its last event
                if isinstance(error, StopAsyncIteration):
                    error = Unavailable("the engine ended the answer without its final stats; retry")
                _, body = http_error("stream", error)
                self.code = grpc.StatusCode[body["error"]["code"].upper()]
                yield _event(body)


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _created(registry: Registry, name: str) -> int:
    """When the adapter's current version was published (0: removed since it was listed)."""
    try:
        return int(registry.get_adapter(name).created.timestamp())
    except NotFound:
        return 0


def _method(path: str) -> str:
    """The route's name in the metrics (``HTTP`` for a path the API does not serve)."""
    if path in ROUTES:
        return ROUTES[path]
    return ROUTES["/v1/models/"] if path.startswith("/v1/models/") else "HTTP"


async def _route_refusal(request: Request, error: Exception) -> Response:
    """Starlette's own refusals (no such route, a method the route does not take) as OpenAI error bodies."""
    assert isinstance(error, HTTPException)
    if error.status_code == 404:
        message = f"no route {keys.show(request.url.path)}: the API serves /v1/models, /v1/chat/completions, /v1/completions"
        return JSONResponse(openai_error_body(message, "not_found_error", "not_found"), status_code=404)
    message = f"{request.method} {keys.show(request.url.path)}: {error.detail}"
    body = openai_error_body(message, "invalid_request_error", "invalid_argument")
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)
