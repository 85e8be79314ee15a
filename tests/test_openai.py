"""The OpenAI-compatible HTTP API, called with the official `openai` client against the real stack.

One `EmbeddedStack` (SeaweedFS, a local Ray, the Serve app whose Ingress replica serves gRPC and HTTP on
loopback, a tiny random Llama) holds two tenants, each with a document and a PEFT adapter 'style'.
Answers over HTTP are compared with the gRPC `Query` answers for the same greedy request.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import openai
import pytest
from lloco.api import lloco_pb2
from lloco.client import LlocoClient
from lloco.config import EngineSettings, LimitSettings, LoraSettings, ServeSettings, Settings
from lloco.ports import free_port
from lloco.registry import Registry
from lloco.serve.local import EmbeddedStack

pytestmark = pytest.mark.timeout(300)

ADMIN_KEY = "admin-key-for-openai-tests"
MAX_NEW_TOKENS = 64
MAX_QUERY_TOKENS = 64
DOCUMENTS = {
    "acme": "The capital of France is Paris. Paris is a large city on a river in the north of the country. "
    * 3,
    "globex": "Rome is the capital of Italy. The old city has many important public places and a long story. "
    * 3,
}
QUESTIONS = {"acme": "What is the capital of France?", "globex": "Which city is the capital of Italy?"}


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(
    tiny_settings: Callable[..., Settings], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedStack]:
    data_dir = tmp_path_factory.mktemp("lloco-openai")
    settings = tiny_settings(
        data_dir,
        ADMIN_KEY,
        limits=LimitSettings(
            max_document_bytes=16 * 1024,
            max_message_bytes=64 * 1024,
            max_inflight_requests=4,
            max_query_tokens=MAX_QUERY_TOKENS,
            max_new_tokens=MAX_NEW_TOKENS,
            max_docs_per_query=2,
            online_compress_max_tokens=1024,
        ),
        lora=LoraSettings(max_rank=8, gpu_slots=4, cpu_adapters=8),
        engine=EngineSettings(max_batch_size=4, max_seq_len=512),
        serve=ServeSettings(grpc_port=free_port(), http_port=free_port(), max_ongoing_requests=64),
    )
    with EmbeddedStack(settings, num_cpus=4, jobs=False) as running:
        yield running


@pytest.fixture(scope="module")
def keys(stack: EmbeddedStack, peft_adapter: Callable[[int], dict[str, bytes]]) -> dict[str, str]:
    """Tenants acme and globex, each with its document 'notes' (compressed at once) and adapter 'style'."""
    created = {}
    for seed, (tenant, text) in enumerate(DOCUMENTS.items(), start=1):
        created[tenant] = stack.create_tenant(tenant)
        with LlocoClient(stack.address, created[tenant]) as client:
            client.ingest("notes", text)
        Registry(stack.store, tenant).publish_adapter("style", peft_adapter(seed), train={"seed": seed})
    return created


def client_of(stack: EmbeddedStack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.openai_base_url, api_key=key, max_retries=0, timeout=60)


def raw(stack: EmbeddedStack, key: str | None, method: str, path: str, **kwargs: object) -> httpx2.Response:
    """A plain HTTP call (for what the openai client will not send: broken JSON, huge bodies)."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    headers.update(kwargs.pop("headers", {}))  # type: ignore[arg-type]
    return httpx2.request(method, stack.openai_base_url + path, headers=headers, timeout=60, **kwargs)


def grpc_answer(stack: EmbeddedStack, key: str, question: str, adapter: str, max_new_tokens: int) -> str:
    with LlocoClient(stack.address, key) as client:
        reply = client.query(question, ["notes"], adapter=adapter, max_new_tokens=max_new_tokens)
    return reply.answer


# -- tests ------------------------------------------------------------------------------------------


def test_each_tenant_lists_only_its_own_models(stack: EmbeddedStack, keys: dict[str, str]) -> None:
    for tenant, key in keys.items():
        client = client_of(stack, key)
        ids = [model.id for model in client.models.list()]
        assert ids == [f"tenants/{tenant}", f"tenants/{tenant}/adapters/style"]
        model = client.models.retrieve(f"tenants/{tenant}/adapters/style")
        assert model.owned_by == f"tenants/{tenant}" and model.created > 0
        assert client.models.retrieve("style@v000001").id == "style@v000001"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("no-such-adapter")
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client_of(stack, keys["acme"]).models.retrieve("tenants/globex/adapters/style")
    assert "another tenant" in str(caught.value)


def test_answers_equal_the_grpc_query_chat_and_completions_streamed_or_not(
    stack: EmbeddedStack, keys: dict[str, str]
) -> None:
    for tenant, key in keys.items():
        question, client = QUESTIONS[tenant], client_of(stack, key)
        expected = grpc_answer(stack, key, question, "style", 12)
        assert expected.strip(), "an empty answer would prove nothing"
        documents = {"documents": ["notes"]}
        chat = client.chat.completions.create(
            model="style",
            messages=[{"role": "user", "content": question}],
            max_tokens=12,
            extra_body=documents,
        )
        assert chat.choices[0].message.content == expected
        assert chat.choices[0].finish_reason in ("stop", "length")
        assert chat.model == f"tenants/{tenant}/adapters/style"
        assert chat.usage.completion_tokens <= 12 and chat.usage.prompt_tokens > 0
        extension = chat.model_extra["lloco"]
        assert extension["adapter_version"] == f"tenants/{tenant}/adapters/style/versions/v000001"
        assert 0 < extension["context_tokens"] < extension["document_tokens"]

        completion = client.completions.create(
            model=f"tenants/{tenant}/adapters/style", prompt=question, max_tokens=12, extra_body=documents
        )
        assert completion.choices[0].text == expected

        chunks = list(
            client.chat.completions.create(
                model="style@v000001",
                messages=[{"role": "user", "content": [{"type": "text", "text": question}]}],
                max_tokens=12,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"documents": [f"tenants/{tenant}/documents/notes"]},
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert chunks[-2].choices[0].finish_reason == chat.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
        assert len({c.id for c in chunks}) == 1

        streamed = client.completions.create(
            model="style", prompt=question, max_tokens=12, stream=True, extra_body=documents
        )
        assert "".join(c.choices[0].text for c in streamed) == expected


def test_the_retrieval_extension_asks_the_corpus_and_cites_as_grpc_does(
    stack: EmbeddedStack, keys: dict[str, str]
) -> None:
    """``extra_body={"retrieval": ...}`` is gRPC's Retrieval: the same answer, the citations in ``lloco``."""
    question, key = QUESTIONS["acme"], keys["acme"]
    with LlocoClient(stack.address, key) as grpc_client:
        expected = grpc_client.query(question, max_new_tokens=8, retrieval=lloco_pb2.Retrieval(top_k=2))
    assert expected.citations, "a query citing nothing would prove nothing"
    fields = ("document", "segment", "token_start", "token_end", "char_start", "char_end")
    wanted = [tuple(getattr(c, f) for f in fields) for c in expected.citations]
    client = client_of(stack, key)
    retrieval = {"retrieval": {"top_k": 2}}
    chat = client.chat.completions.create(
        model="tenants/acme",
        messages=[{"role": "user", "content": question}],
        max_tokens=8,
        extra_body=retrieval,
    )
    assert chat.choices[0].message.content == expected.answer
    cited = chat.model_extra["lloco"]["citations"]
    assert [tuple(c[f] for f in fields) for c in cited] == wanted
    chunks = list(
        client.completions.create(
            model="tenants/acme", prompt=question, max_tokens=8, stream=True, extra_body=retrieval
        )
    )
    assert [tuple(c[f] for f in fields) for c in chunks[-1].model_extra["lloco"]["citations"]] == wanted
    error = raw(
        stack,
        key,
        "POST",
        "/chat/completions",
        json={
            "model": "tenants/acme",
            "messages": [{"role": "user", "content": "hi"}],
            "retrieval": {"top_k": -1},
        },
    )
    assert error.status_code == 400 and error.json()["error"]["param"] == "retrieval"


def test_the_tenant_as_model_is_the_base_model(stack: EmbeddedStack, keys: dict[str, str]) -> None:
    key, question = keys["acme"], QUESTIONS["acme"]
    expected = grpc_answer(stack, key, question, "", 12)
    reply = client_of(stack, key).chat.completions.create(
        model="tenants/acme",
        messages=[{"role": "user", "content": question}],
        max_tokens=12,
        extra_body={"documents": ["notes"]},
    )
    assert reply.choices[0].message.content == expected
    assert reply.model_extra["lloco"]["adapter_version"] is None


def test_stream_is_server_sent_events_ending_with_done(stack: EmbeddedStack, keys: dict[str, str]) -> None:
    body = {
        "model": "style",
        "prompt": QUESTIONS["acme"],
        "max_tokens": 5,
        "stream": True,
        "documents": ["notes"],
    }
    reply = raw(stack, keys["acme"], "POST", "/completions", json=body)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = [line for line in reply.text.split("\n\n") if line]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    ("call", "error_type", "param"),
    [
        # the bearer key
        (
            lambda c, k: c.with_options(api_key="lloco_not-a-key").models.list(),
            openai.AuthenticationError,
            None,
        ),
        # the model
        (lambda c, k: chat(c, model="nothing-here"), openai.NotFoundError, None),
        (lambda c, k: chat(c, model="tenants/globex/adapters/style"), openai.PermissionDeniedError, None),
        (lambda c, k: chat(c, model="tenants/acme/gadgets/x"), openai.BadRequestError, "model"),
        (lambda c, k: chat(c, model="style@v9"), openai.BadRequestError, "model"),
        (lambda c, k: chat(c, model="style@v000009"), openai.NotFoundError, None),
        (lambda c, k: chat(c, stream=True, model="nothing-here"), openai.NotFoundError, None),
        # documents
        (lambda c, k: chat(c, extra_body={"documents": ["missing"]}), openai.NotFoundError, None),
        (
            lambda c, k: chat(c, extra_body={"documents": ["notes", "notes"]}),
            openai.BadRequestError,
            "documents",
        ),
        (
            lambda c, k: chat(c, extra_body={"documents": ["a", "b", "c"]}),
            openai.BadRequestError,
            "documents",
        ),
        (
            lambda c, k: chat(c, extra_body={"documents": ["tenants/globex/documents/notes"]}),
            openai.PermissionDeniedError,
            None,
        ),
        # messages and sampling
        (lambda c, k: chat(c, messages=[]), openai.BadRequestError, "messages"),
        (
            lambda c, k: chat(c, messages=[{"role": "system", "content": "Be brief."}, USER]),
            openai.BadRequestError,
            "messages",
        ),
        (
            lambda c, k: chat(c, messages=[{"role": "user", "content": "   "}]),
            openai.BadRequestError,
            "messages",
        ),
        (
            lambda c, k: chat(c, messages=[{"role": "user", "content": "word " * 500}]),
            openai.BadRequestError,
            "messages",
        ),
        (lambda c, k: chat(c, max_tokens=MAX_NEW_TOKENS + 1), openai.BadRequestError, "max_tokens"),
        (lambda c, k: chat(c, max_tokens=0), openai.BadRequestError, "max_tokens"),
        (lambda c, k: chat(c, temperature=-1), openai.BadRequestError, "temperature"),
        (lambda c, k: chat(c, n=2), openai.BadRequestError, "n"),
        (lambda c, k: chat(c, stop=["x"] * 9), openai.BadRequestError, "stop"),
        (lambda c, k: chat(c, frequency_penalty=0.5), openai.BadRequestError, "frequency_penalty"),
        (lambda c, k: chat(c, extra_body={"colour": "blue"}), openai.BadRequestError, "colour"),
        (
            lambda c, k: c.completions.create(model="style", prompt=["a", "b"]),
            openai.BadRequestError,
            "prompt",
        ),
    ],
)
def test_bad_requests_get_their_status_and_an_openai_error_body(
    stack: EmbeddedStack, keys: dict[str, str], call: object, error_type: type, param: str | None
) -> None:
    with pytest.raises(error_type) as caught:
        call(client_of(stack, keys["acme"]), keys["acme"])  # type: ignore[operator]
    error = caught.value.body
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]
    assert "s3://" not in error["message"] and "Traceback" not in error["message"]


USER = {"role": "user", "content": QUESTIONS["acme"]}


def chat(client: openai.OpenAI, **fields: object) -> object:
    request: dict[str, object] = {"model": "style", "messages": [USER], "max_tokens": 4}
    request.update(fields)
    if request.get("stream"):
        return list(client.chat.completions.create(**request))  # type: ignore[call-overload]
    return client.chat.completions.create(**request)  # type: ignore[call-overload]


def test_transport_refusals(stack: EmbeddedStack, keys: dict[str, str]) -> None:
    key, limit = keys["acme"], stack.settings.limits.message_bytes
    missing = raw(stack, None, "GET", "/models")
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    broken = raw(stack, key, "POST", "/chat/completions", content=b'{"model": "style", "messages": [')
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    declared = raw(stack, key, "POST", "/chat/completions", content=b"x" * (limit + 1))
    assert declared.status_code == 413 and str(limit) in declared.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused once the cap is passed, the rest unread
        yield b'{"model": "style", "prompt": "'
        for _ in range(limit // 4096 + 2):
            yield b"a" * 4096

    chunked = raw(stack, key, "POST", "/completions", content=chunks())
    assert chunked.status_code == 413
    unknown = raw(stack, key, "GET", "/engines")
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
    wrong = raw(stack, key, "GET", "/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "invalid_argument"
    admin = raw(stack, ADMIN_KEY, "GET", "/models")
    assert admin.status_code == 400 and "no tenant" in admin.json()["error"]["message"]


def test_tls_with_the_grpc_certificate(stack: EmbeddedStack, keys: dict[str, str], tmp_path: Path) -> None:
    """A second Ingress (its own Serve app, same engine and store) with TLS: HTTPS on the HTTP port."""
    import ssl

    from lloco.serve.ingress import Ingress
    from ray import serve
    from test_isolation import self_signed_certificate

    chain, private = self_signed_certificate(tmp_path)
    serve_tls = {
        "grpc_port": free_port(),
        "http_port": free_port(),
        "tls_cert_file": chain,
        "tls_key_file": private,
    }
    settings = stack.settings.model_copy(update={"serve": stack.settings.serve.model_copy(update=serve_tls)})
    engine = serve.get_deployment_handle("EngineDeployment", "lloco")
    serve.run(Ingress.bind(engine, settings), name="lloco-tls", route_prefix=None)
    base_url = f"https://127.0.0.1:{serve_tls['http_port']}/v1"
    try:
        trusting = httpx2.Client(verify=ssl.create_default_context(cafile=str(chain)))
        client = openai.OpenAI(base_url=base_url, api_key=keys["acme"], max_retries=0, http_client=trusting)
        assert [m.id for m in client.models.list()][0] == "tenants/acme"
        for url in (base_url, base_url.replace("https:", "http:")):  # the system's CAs, or plain text
            with pytest.raises(openai.APIConnectionError):
                openai.OpenAI(base_url=url, api_key=keys["acme"], max_retries=0, timeout=10).models.list()
    finally:
        serve.delete("lloco-tls")


def test_http_and_grpc_ports_must_differ() -> None:
    with pytest.raises(ValueError, match="must differ"):
        ServeSettings(grpc_port=9000, http_port=9000)
    assert ServeSettings(http_port=None).http_port is None


def test_lloco_up_refuses_a_taken_http_port(stack: EmbeddedStack, tmp_path: Path) -> None:
    port = stack.settings.serve.http_port
    result = subprocess.run(
        [sys.executable, "-m", "lloco.cli", "up", "--port", str(free_port()), "--http-port", str(port)]
        + ["--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 1
    assert f"port {port} is already in use" in result.stderr and "--http-port" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "s3").exists(), "nothing may start when the port is taken"
