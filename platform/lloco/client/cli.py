"""Client commands of `lloco`: talk to a running lloco server over gRPC with a tenant's API key.

Every command takes ``--target`` (``LLOCO_TARGET``), ``--tenant-key`` (``LLOCO_API_KEY``) and, for a
server that speaks TLS, ``--tls`` (``LLOCO_TLS``) with an optional ``--ca`` PEM file (``LLOCO_CA``).
Server errors print as ``error: <CODE>: <message>`` and exit with status 1.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

    from lloco.api import lloco_pb2
    from lloco.client import LlocoClient

DEFAULT_TARGET = "127.0.0.1:50051"
Command = Callable[..., None]

Target = Annotated[str, typer.Option("--target", envvar="LLOCO_TARGET", help="Server address host:port.")]
TenantKey = Annotated[
    str,
    typer.Option(
        "--tenant-key", envvar="LLOCO_API_KEY", help="API key (tenant or admin).", show_default=False
    ),
]
Timeout = Annotated[float, typer.Option("--timeout", min=0.001, help="Deadline of each call, in seconds.")]
Tenant = Annotated[
    str, typer.Option("--tenant", envvar="LLOCO_TENANT", help="Tenant id; needed only with the admin key.")
]
Tls = Annotated[bool, typer.Option("--tls/--no-tls", envvar="LLOCO_TLS", help="Speak TLS to the server.")]
Ca = Annotated[
    Path | None,
    typer.Option(
        "--ca", envvar="LLOCO_CA", help="PEM file of the server's CA (implies --tls).", show_default=False
    ),
]


@contextmanager
def _connect(
    target: str, key: str, timeout_s: float, tenant: str = "", tls: bool = False, ca: Path | None = None
) -> Iterator[LlocoClient]:
    """A client whose failures end the command with ``error: <CODE>: <message>`` and status 1."""
    import grpc

    from lloco.client import LlocoClient
    from lloco.errors import LlocoError

    try:
        with LlocoClient(target, key, timeout_s=timeout_s, tenant=tenant or None, tls=tls, ca=ca) as client:
            yield client
    except grpc.RpcError as error:
        _fail(f"{error.code().name}: {error.details()}")
    except LlocoError as error:
        _fail(f"{error.code.name}: {error}")


def connected(timeout_s: float = 30.0, tenant_option: bool = True) -> Callable[[Command], Command]:
    """A command that talks to the server: it takes the connection options (--target, --tenant-key, --tenant
    unless ``tenant_option`` is False, --timeout defaulting to ``timeout_s``, --tls, --ca) and is called with a
    connected client as its first argument, ``client``, whose failures end it as ``_connect`` says."""

    def decorate(command: Command) -> Command:
        # the client's annotation names a class imported only for type checkers: it is not evaluated here
        signature = inspect.signature(command, locals={"LlocoClient": None}, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "client"]
        options = {
            "target": (Target, DEFAULT_TARGET),
            "key": (TenantKey, ...),
            **({"tenant": (Tenant, "")} if tenant_option else {}),
            "timeout": (Timeout, timeout_s),
            "tls": (Tls, False),
            "ca": (Ca, None),
        }
        added = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
            for name, (annotation, default) in options.items()
        ]

        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> None:
            target, key, tenant = kwargs.pop("target"), kwargs.pop("key"), kwargs.pop("tenant", "")
            timeout, tls, ca = kwargs.pop("timeout"), kwargs.pop("tls"), kwargs.pop("ca")
            with _connect(target, key, timeout, tenant, tls, ca) as client:
                command(client, *args, **kwargs)

        # typer reads the options from the signature (and its annotations): the command's own, then these
        run.__signature__ = inspect.Signature([*own, *added])  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in (*own, *added)}
        return run

    return decorate


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _label(enum: EnumTypeWrapper, value: int) -> str:
    """A readable enum value: ContextState COMPRESSED (2) -> "compressed"."""
    prefix = enum.Name(0).removesuffix("UNSPECIFIED")
    return enum.Name(value).removeprefix(prefix).lower()


def _document_line(document: lloco_pb2.Document) -> str:
    from lloco.api import lloco_pb2

    state = _label(lloco_pb2.ContextState, document.context_state)
    context = f" -> {document.context_tokens} vectors" if document.context_tokens else ""
    return f"{document.name}\t{document.size_bytes} bytes\t{document.tokens} tokens\t{state}{context}"


def _job_line(job: lloco_pb2.Job) -> str:
    from lloco.api import lloco_pb2

    kind = _label(lloco_pb2.JobKind, job.kind)
    state = _label(lloco_pb2.JobState, job.state)
    line = f"{job.name}\t{kind}\t{state}"
    if job.message:
        line += f"\t{job.message}"
    if job.HasField("finetune_result"):
        line += (
            f"\tpublished {job.finetune_result.adapter_version} (loss {job.finetune_result.final_loss:.4f})"
        )
    if job.HasField("compress_result"):
        result = job.compress_result
        line += f"\tcompressed {len(result.compressed_documents)}, skipped {len(result.skipped_documents)}"
    return line


def _adapter_line(adapter: lloco_pb2.Adapter) -> str:
    current = adapter.current_version.name.rsplit("/", 1)[-1] if adapter.current_version.name else "-"
    return f"{adapter.name}\tcurrent {current}\t{adapter.version_count} versions"


def _version_line(version: lloco_pb2.AdapterVersion) -> str:
    marker = "*" if version.current else " "
    created = version.create_time.ToDatetime().isoformat(timespec="seconds")
    return f"{marker} {version.name}\trank {version.rank}\t{version.base_model}\t{created}"


def stats_line(finish_reason: int, stats: lloco_pb2.QueryStats) -> str:
    """One line a person can read: why it stopped, tokens used, compression ratio, adapter, timings."""
    from lloco.api import lloco_pb2

    reason = _label(lloco_pb2.FinishReason, finish_reason)
    context = f"context {stats.context_tokens} (from {stats.document_tokens} document tokens"
    if stats.context_tokens:
        context += f", {stats.document_tokens / stats.context_tokens:.1f}x"
    context += ")"
    ttft_ms = stats.time_to_first_token.ToMilliseconds()
    total_s = stats.total_time.ToMilliseconds() / 1000
    adapter = stats.adapter_version or "none"
    # the part of the TTFT spent waiting for a decode row: what a busy server (or a tenant's fair share) costs
    queued_ms = stats.queue_time.ToMilliseconds()
    return (
        f"[{reason}] prompt {stats.prompt_tokens}, {context}, generated {stats.generated_tokens}; "
        f"adapter {adapter}; ttft {ttft_ms} ms (queued {queued_ms} ms), total {total_s:.2f} s"
    )


def _read_source(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as error:
        _fail(f"cannot read {path}: {error.strerror}")


@connected(timeout_s=120.0)
def ingest(
    client: LlocoClient,
    files: Annotated[list[str] | None, typer.Argument(help="Text files; '-' or none reads stdin.")] = None,
    doc_id: Annotated[
        str, typer.Option("--id", help="Document id (required for stdin; default: the file name's stem).")
    ] = "",
    uri: Annotated[
        str,
        typer.Option(
            "--uri", help="Ingest s3://bucket/.../tenants/{tenant}/uploads/KEY (needs --id) instead of files."
        ),
    ] = "",
) -> None:
    """Store documents (UTF-8 text); small ones are compressed at once, larger ones are left pending."""
    from lloco.api import lloco_pb2

    if uri:
        if files or not doc_id:
            raise typer.BadParameter("--uri takes no files and needs --id", param_hint="--uri")
        reply = client.ingest_uri(doc_id, uri)
        outcome = _label(lloco_pb2.IngestOutcome, reply.outcome)
        typer.echo(f"{outcome}\t{_document_line(reply.document)}\tsha256 {reply.document.sha256[:12]}")
        return
    sources = files or ["-"]
    if doc_id and len(sources) > 1:
        raise typer.BadParameter("--id names one document; give one file", param_hint="--id")
    if "-" in sources and not doc_id:
        raise typer.BadParameter("reading stdin needs --id", param_hint="--id")
    for source in sources:
        name = doc_id or Path(source).stem
        reply = client.ingest(name, _read_source(source))
        outcome = _label(lloco_pb2.IngestOutcome, reply.outcome)
        typer.echo(f"{outcome}\t{_document_line(reply.document)}\tsha256 {reply.document.sha256[:12]}")


def query(
    question: Annotated[str, typer.Argument(help="The question.")],
    docs: Annotated[
        list[str] | None, typer.Option("--doc", "-d", help="Document id (repeat for several).")
    ] = None,
    adapter: Annotated[
        str, typer.Option("--adapter", "-a", help="Adapter NAME or NAME@VERSION; none: base model.")
    ] = "",
    max_new_tokens: Annotated[int, typer.Option(min=0, help="0: the server's default.")] = 0,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop sequence (repeatable).")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    corpus: Annotated[
        bool,
        typer.Option(
            "--corpus", help="Ask the tenant's whole corpus (no --doc): retrieve segments, cite them."
        ),
    ] = False,
    top_k: Annotated[
        int, typer.Option(min=0, help="With --corpus: segments to retrieve; 0: the server's.")
    ] = 0,
    budget: Annotated[
        int, typer.Option(min=0, help="With --corpus: summary vectors the segments may take; 0: no limit.")
    ] = 0,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print tokens as they come.")] = True,
    target: Target = DEFAULT_TARGET,
    key: TenantKey = ...,
    tenant: Tenant = "",
    timeout: Timeout = 120.0,
    tls: Tls = False,
    ca: Ca = None,
) -> None:
    """Ask a question over compressed documents (or, with --corpus, the whole corpus); the answer goes to
    stdout, the citations and the stats line to stderr."""
    from lloco.api import lloco_pb2

    options = {
        "retrieval": lloco_pb2.Retrieval(top_k=top_k, context_budget=budget) if corpus else None,
        "doc_ids": docs or (),
        "adapter": adapter,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "stop": stop or (),
        "seed": seed,
    }
    with _connect(target, key, timeout, tenant, tls, ca) as client:
        if not stream:
            reply = client.query(question, **options)
            _echo_citations(reply.citations)
            typer.echo(reply.answer)
            typer.echo(stats_line(reply.finish_reason, reply.stats), err=True)
            return
        messages = client.query_stream(question, **options)
        try:
            for message in messages:
                _echo_citations(message.citations)
                sys.stdout.write(message.text_delta)
                sys.stdout.flush()
                if message.HasField("stats"):
                    sys.stdout.write("\n")
                    typer.echo(stats_line(message.finish_reason, message.stats), err=True)
        finally:
            messages.close()  # type: ignore[attr-defined]


def _echo_citations(citations: Sequence[lloco_pb2.Citation]) -> None:
    """One stderr line per cited segment: document, segment, its token range and score."""
    for c in citations:
        typer.echo(
            f"cite\t{c.document}\tsegment {c.segment}\ttokens [{c.token_start}, {c.token_end})\t"
            f"score {c.score:.3f}",
            err=True,
        )


def _docs_app() -> typer.Typer:
    docs = typer.Typer(help="List, show and delete documents.", no_args_is_help=False)

    @docs.callback(invoke_without_command=True)
    def list_documents(
        context: typer.Context,
        target: Target = DEFAULT_TARGET,
        key: TenantKey = "",
        tenant: Tenant = "",
        timeout: Timeout = 30.0,
        tls: Tls = False,
        ca: Ca = None,
    ) -> None:
        """List the tenant's documents (the default), or run a subcommand."""
        if context.invoked_subcommand is not None:
            return
        if not key:
            raise typer.BadParameter("missing --tenant-key (or LLOCO_API_KEY)", param_hint="--tenant-key")
        with _connect(target, key, timeout, tenant, tls, ca) as client:
            for document in client.list_documents():
                typer.echo(_document_line(document))

    @docs.command("get")
    @connected()
    def get_document(
        client: LlocoClient,
        doc_id: str,
    ) -> None:
        """Show one document."""
        document = client.get_document(doc_id)
        typer.echo(f"{_document_line(document)}\tsha256 {document.sha256}")

    @docs.command("delete")
    @connected()
    def delete_document(
        client: LlocoClient,
        doc_id: str,
    ) -> None:
        """Delete a document with its compressed contexts and the dataset rows naming it."""
        client.delete_document(doc_id)
        typer.echo(f"deleted {client.names.document(doc_id)}")

    return docs


def _adapters_app() -> typer.Typer:
    adapters = typer.Typer(
        help="List adapters and their versions, import PEFT adapters, and pin or roll back the current one."
    )

    @adapters.callback(invoke_without_command=True)
    def list_adapters(
        context: typer.Context,
        target: Target = DEFAULT_TARGET,
        key: TenantKey = "",
        tenant: Tenant = "",
        timeout: Timeout = 30.0,
        tls: Tls = False,
        ca: Ca = None,
    ) -> None:
        """List the tenant's adapters (the default), or run a subcommand."""
        if context.invoked_subcommand is not None:
            return
        if not key:
            raise typer.BadParameter("missing --tenant-key (or LLOCO_API_KEY)", param_hint="--tenant-key")
        with _connect(target, key, timeout, tenant, tls, ca) as client:
            for adapter in client.list_adapters():
                typer.echo(_adapter_line(adapter))

    @adapters.command("versions")
    @connected()
    def list_versions(
        client: LlocoClient,
        adapter: str,
    ) -> None:
        """List an adapter's versions, newest first."""
        for version in client.list_adapter_versions(adapter):
            typer.echo(_version_line(version))

    @adapters.command("set-current")
    @connected()
    def set_current(
        client: LlocoClient,
        adapter: str,
        version: str,
    ) -> None:
        """Make VERSION (e.g. v000002) the adapter's current version (rollback or pin)."""
        typer.echo(_adapter_line(client.set_current_adapter(adapter, version)))

    @adapters.command("import")
    @connected(timeout_s=120.0)
    def import_adapter(
        client: LlocoClient,
        directory: Annotated[
            Path | None,
            typer.Argument(help="A PEFT adapter folder (adapter_config.json, adapter_model.safetensors)."),
        ] = None,
        adapter: Annotated[
            str, typer.Option("--adapter", "-a", help="The adapter it becomes a version of.")
        ] = "",
        uri: Annotated[
            str,
            typer.Option(
                "--uri", help="Import the folder s3://bucket/.../tenants/{tenant}/uploads/DIR/ instead."
            ),
        ] = "",
    ) -> None:
        """Import a LoRA adapter trained with peft as the adapter's next version (now current)."""
        if not adapter:
            raise typer.BadParameter("name the adapter to import into", param_hint="--adapter")
        if (directory is None) == (not uri):
            raise typer.BadParameter("give either a folder or --uri", param_hint="DIRECTORY / --uri")
        if uri:
            version = client.import_adapter_uri(adapter, uri)
        else:
            version = client.import_adapter(adapter, directory)
        typer.echo(_version_line(version))

    return adapters


def _dataset_app() -> typer.Typer:
    dataset = typer.Typer(
        help="Finetuning datasets (JSONL rows doc_ids/question/answer).", no_args_is_help=True
    )

    @dataset.command("upload")
    @connected(timeout_s=120.0)
    def upload(
        client: LlocoClient,
        file: Annotated[str, typer.Argument(help="JSONL file, or '-' for stdin.")],
        dataset_id: Annotated[
            str, typer.Option("--id", help="Dataset id (default: the file name's stem).")
        ] = "",
    ) -> None:
        """Upload (or replace) a dataset."""
        if file == "-" and not dataset_id:
            raise typer.BadParameter("reading stdin needs --id", param_hint="--id")
        stored = client.upload_dataset(dataset_id or Path(file).stem, _read_source(file))
        typer.echo(f"{stored.name}\t{stored.row_count} rows")

    @dataset.command("list")
    @connected()
    def list_datasets(
        client: LlocoClient,
    ) -> None:
        """List the tenant's datasets."""
        for stored in client.list_datasets():
            typer.echo(stored.name)

    return dataset


def _jobs_app() -> typer.Typer:
    jobs = typer.Typer(help="Compress and finetune jobs: start, list, follow, cancel.", no_args_is_help=True)

    @jobs.command("list")
    @connected()
    def list_jobs(
        client: LlocoClient,
    ) -> None:
        """List the tenant's jobs, oldest first."""
        found = sorted(client.list_jobs(), key=lambda job: (job.create_time.ToNanoseconds(), job.name))
        for job in found:
            typer.echo(_job_line(job))

    @jobs.command("get")
    @connected()
    def get_job(
        client: LlocoClient,
        job_id: str,
    ) -> None:
        """Show a job's state."""
        typer.echo(_job_line(client.get_job(job_id)))

    @jobs.command("wait")
    @connected()
    def wait_job(
        client: LlocoClient,
        job_id: str,
        wait: Annotated[
            float, typer.Option("--wait", min=1, help="Give up after this many seconds.")
        ] = 3600.0,
    ) -> None:
        """Wait until a job ends and show it; exit status 1 unless it SUCCEEDED."""
        from lloco.api import lloco_pb2
        from lloco.terminal import progress

        with progress(transient=True) as bars:
            task = bars.add_task(f"job {job_id}", total=None, detail="")

            def show(job: lloco_pb2.Job) -> None:
                bars.update(task, detail=lloco_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_"))

            job = client.wait_job(job_id, wait, on_poll=show)
        typer.echo(_job_line(job))
        if job.state != lloco_pb2.JOB_STATE_SUCCEEDED:
            raise typer.Exit(1)

    @jobs.command("cancel")
    @connected(timeout_s=60.0)
    def cancel_job(
        client: LlocoClient,
        job_id: str,
    ) -> None:
        """Stop a queued or running job."""
        typer.echo(_job_line(client.cancel_job(job_id)))

    @jobs.command("compress")
    @connected(timeout_s=600.0)
    def compress(
        client: LlocoClient,
        doc_ids: Annotated[
            list[str] | None, typer.Argument(help="Document ids; none: every pending one.")
        ] = None,
    ) -> None:
        """Compress documents: online for small batches, otherwise as a Ray job."""
        typer.echo(_job_line(client.compress(doc_ids or ())))

    @jobs.command("finetune")
    @connected(timeout_s=60.0)
    def finetune(
        client: LlocoClient,
        dataset_id: Annotated[str, typer.Argument(help="Dataset id.")],
        adapter: Annotated[str, typer.Option(help="Adapter to publish a new version of.")] = "default",
    ) -> None:
        """Submit a LoRA finetuning job on a dataset."""
        typer.echo(_job_line(client.submit_finetune(dataset_id, adapter)))

    return jobs


def _admin_app() -> typer.Typer:
    admin = typer.Typer(help="Tenant administration (admin key).", no_args_is_help=True)

    @admin.command("create-tenant")
    @connected(tenant_option=False)
    def create_tenant(
        client: LlocoClient,
        tenant_id: str,
    ) -> None:
        """Create a tenant; prints its first API key (shown only once)."""
        reply = client.create_tenant(tenant_id)
        typer.echo(f"{reply.tenant.name}\t{reply.api_key}")

    @admin.command("create-key")
    @connected(tenant_option=False)
    def create_key(
        client: LlocoClient,
        tenant_id: Annotated[str, typer.Argument(help="Tenant id; default: the key's own tenant.")] = "",
    ) -> None:
        """Create another API key for a tenant; prints it (shown only once; `list-keys` shows its name)."""
        typer.echo(client.create_api_key(tenant_id or None).api_key)

    @admin.command("list-keys")
    @connected(tenant_option=False)
    def list_keys(
        client: LlocoClient,
        tenant_id: Annotated[str, typer.Argument(help="Tenant id; default: the key's own tenant.")] = "",
    ) -> None:
        """List a tenant's API keys: name, first characters, creation time (never the secrets)."""
        for api_key in client.list_api_keys(tenant_id or None):
            created = api_key.create_time.ToDatetime().isoformat(timespec="seconds")
            typer.echo(f"{api_key.name}\t{api_key.hint}...\t{created}")

    @admin.command("revoke-key")
    @connected(tenant_option=False)
    def revoke_key(
        client: LlocoClient,
        key_name: Annotated[str, typer.Argument(help="The key's id or name (tenants/{t}/apiKeys/{id}).")],
        tenant_id: Annotated[str, typer.Option("--tenant", help="Tenant of a bare key id.")] = "",
    ) -> None:
        """Revoke an API key: it stops working at once."""
        client.revoke_api_key(key_name, tenant_id or None)
        typer.echo(f"revoked {key_name}")

    @admin.command("delete-tenant")
    @connected(tenant_option=False, timeout_s=300.0)
    def delete_tenant(
        client: LlocoClient,
        tenant_id: str,
        yes: Annotated[
            bool, typer.Option("--yes", help="Confirm: everything of the tenant is deleted.")
        ] = False,
    ) -> None:
        """Delete a tenant with its documents, contexts, datasets, adapters, jobs, uploads and keys."""
        if not yes:
            raise typer.BadParameter("deleting a tenant cannot be undone: pass --yes", param_hint="--yes")
        removed = client.delete_tenant(tenant_id)
        typer.echo(f"deleted tenants/{tenant_id} ({removed} objects)")

    return admin


COMMANDS: tuple[Callable[..., None], ...] = (ingest, query)


def register(app: typer.Typer) -> None:
    for command in COMMANDS:
        app.command()(command)
    app.add_typer(_docs_app(), name="docs")
    app.add_typer(_adapters_app(), name="adapters")
    app.add_typer(_dataset_app(), name="dataset")
    app.add_typer(_jobs_app(), name="jobs")
    app.add_typer(_admin_app(), name="admin")
