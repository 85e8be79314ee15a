"""The OpenAI-compatible API's wire format: request bodies checked for type and OpenAI's own bounds
(pydantic), turned into the gRPC API's `QueryRequest`, and the reply objects built from engine events.

A request becomes exactly the `QueryRequest` a gRPC caller would send, so `lloco.serve.queries` checks
both APIs' queries alike (limits, names, ownership). What the API accepts:

- ``model``: ``tenants/{t}/adapters/{a}`` (current version), ``tenants/{t}/adapters/{a}/versions/{v}``
  (pinned), or for the caller's own tenant ``{a}`` and ``{a}@{v}`` (``v`` as versions are listed,
  ``v000002``); ``tenants/{t}`` is the base model with no adapter of the tenant.
- ``documents`` (extension): document ids of the caller's tenant, or ``tenants/{t}/documents/{d}``
  names, whose compressed contexts are prepended in order (``extra_body={"documents": [...]}`` in the
  ``openai`` client).
- ``retrieval`` (extension, instead of ``documents``): ``{"top_k": n, "context_budget": v}`` (0 or left
  out: the server default, no budget) asks the tenant's whole corpus, as gRPC's ``Retrieval``; the reply's
  ``lloco`` object (the last chunk's, streamed) lists ``citations`` (document, segment, token and text
  ranges, score).
- chat: exactly one message, of role ``user`` (text, or text parts): lloco answers one question over
  the attached documents, in the chat template its adapters were trained on. completions: ``prompt``
  (one string) is asked the same way.
- sampling: ``max_tokens`` (chat also ``max_completion_tokens``), ``temperature``, ``top_p``, ``stop``,
  ``seed``; an omitted field takes the server default, as in gRPC (temperature 0: greedy). ``n`` = 1,
  zero penalties and ``logprobs`` off are accepted as the defaults they are; ``user`` is ignored;
  any other field is refused.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lloco.api import lloco_pb2
from lloco.auth import Principal
from lloco.errors import InvalidArgument
from lloco.serve.engine_core import QueryStats
from lloco.serve.names import adapter_name, document_name, owned, tenant_name, version_name
from lloco.storage import keys

ADAPTER = ("tenants", "adapters")
ADAPTER_VERSION = ("tenants", "adapters", "versions")
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
# engine finish reasons -> OpenAI's ("abort": vLLM's word for a request the server stopped)
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class RetrievalOption(BaseModel):
    """The ``retrieval`` extension: gRPC's `Retrieval`, whose own checks (limits) apply."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    top_k: int = Field(0, ge=0, le=INT32_MAX)
    context_budget: int = Field(0, ge=0, le=INT32_MAX)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=1024)
    documents: list[str] = Field(default_factory=list, max_length=1024)
    retrieval: RetrievalOption | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=INT64_MAX)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = Field(None, max_length=256)

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported; leave it out or send 0")
        return value

    def sampling(self) -> lloco_pb2.SamplingParams:
        """The gRPC sampling fields of this body (unset: the server defaults)."""
        sampling = lloco_pb2.SamplingParams(
            max_new_tokens=self.max_new_tokens() or 0,
            temperature=self.temperature or 0.0,
            top_p=self.top_p or 0.0,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or ()),
        )
        if self.seed is not None:
            sampling.seed = self.seed
        return sampling

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: Literal[False] | None = None

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def question(self) -> str:
        if len(self.messages) != 1 or self.messages[0].role != "user":
            raise InvalidArgument(
                "messages: send exactly one message, of role 'user': lloco answers one question over the "
                "attached documents (no system prompt, no earlier turns)"
            )
        return self.messages[0].text()


class CompletionBody(_Body):
    prompt: str | list[str]
    echo: Literal[False] = False
    best_of: Literal[1] | None = None
    logprobs: None = None
    suffix: None = None

    def question(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise InvalidArgument(f"prompt: one prompt per request, got {len(self.prompt)}")
        return self.prompt[0]


def parse_body(body_type: type[_Body], data: object) -> _Body:
    """``data`` (parsed JSON) as ``body_type``; InvalidArgument naming the first bad field."""
    try:
        return body_type.model_validate(data)
    except ValidationError as error:
        first = error.errors(include_url=False, include_input=False)[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unrecognized request argument (not supported by this server)"
        raise InvalidArgument(f"{field}: {message}") from None


# the fields of a QueryRequest, by the name an OpenAI caller sent them as (for the error's ``param``;
# ``question`` is ``messages`` or ``prompt``)
QUERY_PARAMS = {
    "tenant": "model",
    "adapter": "model",
    "documents": "documents",
    "retrieval.top_k": "retrieval",
    "retrieval.context_budget": "retrieval",
    "sampling.max_new_tokens": "max_tokens",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.stop": "stop",
}


def query_param(message: str, question_param: str) -> str | None:
    """The OpenAI parameter an InvalidArgument about a request is about: its message starts with the
    field, a ``QueryRequest`` field (`Queries`) or the body's own (``parse_body``: ``field: ...``)."""
    first = message.split(" ", 1)[0]
    field = first.rstrip(":")
    if field == "question":
        return question_param
    return QUERY_PARAMS.get(field, field if first.endswith(":") else None)


def query_request(principal: Principal, body: ChatCompletionBody | CompletionBody) -> lloco_pb2.QueryRequest:
    """The gRPC QueryRequest of ``body``, sent by ``principal``."""
    tenant, adapter = model_names(principal, body.model)
    return lloco_pb2.QueryRequest(
        tenant=tenant,
        documents=[_document(tenant, d) for d in body.documents],
        question=body.question(),
        adapter=adapter,
        sampling=body.sampling(),
        retrieval=(
            lloco_pb2.Retrieval(top_k=body.retrieval.top_k, context_budget=body.retrieval.context_budget)
            if body.retrieval is not None
            else None
        ),
    )


def model_names(principal: Principal, model: str) -> tuple[str, str]:
    """(``tenants/{t}``, the adapter's resource name or "" for the base model) that ``model`` names; the
    names are checked where they are used (`Queries`, `model_ids`)."""
    if model.startswith("tenants/"):
        parts = model.split("/")
        return "/".join(parts[:2]), model if len(parts) > 2 else ""
    if principal.tenant is None:
        raise InvalidArgument(
            f"model: {keys.show(model)} is short for one of the caller's adapters, and the admin key has no "
            "tenant; name it in full: tenants/{tenant}/adapters/{adapter}"
        )
    adapter, at, version = model.partition("@")
    if not adapter or (at and not version):
        raise InvalidArgument(
            f"model: {keys.show(model)} is not a model name: expected an adapter id, 'adapter@version' or "
            "'tenants/{tenant}/adapters/{adapter}'"
        )
    tenant = principal.tenant
    name = version_name(tenant, adapter, version) if at else adapter_name(tenant, adapter)
    return tenant_name(tenant), name


def model_ids(principal: Principal, model: str) -> tuple[str, str | None, str | None]:
    """(tenant, adapter or None for the base model, pinned version or None) of ``model``, once
    ``principal`` may act on its tenant (PermissionDenied otherwise)."""
    tenant_full, adapter_full = model_names(principal, model)
    (tenant,) = owned(principal, "model", tenant_full, ("tenants",))
    if not adapter_full:
        return tenant, None, None
    pinned = "/versions/" in adapter_full
    ids = owned(principal, "model", adapter_full, ADAPTER_VERSION if pinned else ADAPTER)
    return tenant, ids[1], ids[2] if pinned else None


def _document(tenant: str, document: str) -> str:
    """A document name: ``document`` itself when it is one, else the id of one under ``tenant``."""
    return document if "/" in document else document_name(tenant.removeprefix("tenants/"), document)


# -- replies ------------------------------------------------------------------------------------------


def completion_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(stats: QueryStats) -> dict[str, int]:
    """OpenAI usage: the prompt counts every position the decoder attended to before the answer (the
    compressed-context vectors and the question's tokens)."""
    prompt = stats.prompt_tokens + stats.context_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": prompt + stats.generated_tokens,
    }


def lloco_stats(
    tenant: str, adapter: str | None, stats: QueryStats, citations: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The ``lloco`` extension of a final reply: what the compressed context stood for, which version
    answered and, for a corpus query, the segments cited."""
    version = stats.adapter_version
    extension: dict[str, Any] = {
        "context_tokens": stats.context_tokens,
        "document_tokens": stats.document_tokens,
        "adapter_version": version_name(tenant, adapter, version) if adapter and version else None,
    }
    if citations is not None:
        extension["citations"] = citations
    return extension


def citation_objects(citations: list[lloco_pb2.Citation]) -> list[dict[str, Any]]:
    """gRPC's citations as JSON objects (field names as in the proto)."""
    fields = ("document", "segment", "token_start", "token_end", "char_start", "char_end", "score")
    return [{name: getattr(c, name) for name in fields} for c in citations]


class Reply:
    """The reply objects of one completion (chat or text), all with the same id, time and model."""

    def __init__(
        self,
        chat: bool,
        model: str,
        tenant: str,
        adapter: str | None,
        citations: list[dict[str, Any]] | None = None,
    ) -> None:
        """``citations``: a corpus query's (`citation_objects`); None for one that named documents."""
        self.chat, self.model, self.tenant, self.adapter = chat, model, tenant, adapter
        self.citations = citations
        self.id = completion_id(chat)
        self.created = int(time.time())

    def _object(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def whole(self, text: str, stats: QueryStats) -> dict[str, Any]:
        """The non-streaming reply."""
        finish = FINISH_REASONS[stats.finish_reason]
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(finish_reason=finish, logprobs=None)
        reply = self._object("chat.completion" if self.chat else "text_completion", [choice])
        reply.update(usage=usage(stats), lloco=lloco_stats(self.tenant, self.adapter, stats, self.citations))
        return reply

    def chunk(self, text: str, first: bool = False, stats: QueryStats | None = None) -> dict[str, Any]:
        """A streamed chunk: ``text`` (the chat's first also names the role); with ``stats``, the last one,
        carrying the finish reason."""
        if self.chat:
            delta: dict[str, str] = {"role": "assistant"} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text}
        choice.update(finish_reason=FINISH_REASONS[stats.finish_reason] if stats else None, logprobs=None)
        chunk = self._object("chat.completion.chunk" if self.chat else "text_completion", [choice])
        if stats is not None:
            chunk["lloco"] = lloco_stats(self.tenant, self.adapter, stats, self.citations)
        return chunk

    def usage_chunk(self, stats: QueryStats) -> dict[str, Any]:
        """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
        chunk = self._object("chat.completion.chunk" if self.chat else "text_completion", [])
        chunk["usage"] = usage(stats)
        return chunk


def model_object(name: str, created: int, tenant: str) -> dict[str, Any]:
    """An entry of /v1/models."""
    return {"id": name, "object": "model", "created": created, "owned_by": tenant_name(tenant)}
