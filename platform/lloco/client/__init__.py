"""A thin typed Python client for the lloco gRPC API (`lloco.v1.LlocoService`).

Callers pass plain ids (``"report"``, ``"default@v000002"``) or full resource names; the
client builds the names in one place (`ResourceNames`) and sends ``authorization: Bearer <key>``
with every call. gRPC failures surface as ``grpc.RpcError`` with the server's status code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import grpc

from lloco.api import lloco_pb2, lloco_pb2_grpc
from lloco.errors import DeadlineExceeded, InvalidArgument, NotFound

TENANTS = "tenants/"
# the files of a PEFT adapter folder (save_pretrained); the .bin is its pickled form, never sent
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLED_WEIGHTS = "adapter_model.bin"

Item = TypeVar("Item")
Streamed = TypeVar("Streamed", covariant=True)


class _Page(Protocol):
    next_page_token: str


class _StreamCall(Protocol[Streamed]):
    """What grpc returns for a server-streaming call: an iterator that can be cancelled."""

    def __iter__(self) -> Iterator[Streamed]: ...

    def cancel(self) -> bool: ...


@dataclass(frozen=True)
class ResourceNames:
    """Builds a tenant's resource names from plain ids; full names under the tenant pass through."""

    tenant_id: str

    @property
    def tenant(self) -> str:
        return f"{TENANTS}{self.tenant_id}"

    def _child(self, collection: str, value: str) -> str:
        if not value:
            raise InvalidArgument(f"empty {collection[:-1]} id")
        if value.startswith(TENANTS):
            parts = value.split("/")
            if len(parts) != 4 or parts[2] != collection:
                raise InvalidArgument(
                    f"{value!r} is not a name of the form tenants/{{tenant}}/{collection}/{{id}}"
                )
            return value
        return f"{self.tenant}/{collection}/{value}"

    def document(self, doc_id: str) -> str:
        return self._child("documents", doc_id)

    def dataset(self, dataset_id: str) -> str:
        return self._child("datasets", dataset_id)

    def job(self, job_id: str) -> str:
        return self._child("jobs", job_id)

    def api_key(self, key_id: str) -> str:
        return self._child("apiKeys", key_id)

    def adapter(self, adapter_id: str) -> str:
        """``name`` -> tenants/{t}/adapters/{name}; a ``@version`` suffix is rejected here."""
        if "@" in adapter_id:
            raise InvalidArgument(f"adapter {adapter_id!r}: a version is not allowed here")
        return self._child("adapters", adapter_id)

    def adapter_version(self, adapter_id: str, version: str) -> str:
        return f"{self.adapter(adapter_id)}/versions/{version}"

    def adapter_spec(self, spec: str) -> str:
        """``name[@version]`` -> the adapter's name (current version) or its version's name; "" -> ""."""
        if not spec or spec.startswith(TENANTS):
            return spec
        adapter_id, _, version = spec.partition("@")
        return self.adapter_version(adapter_id, version) if version else self.adapter(adapter_id)


class LlocoClient:
    """One channel to a lloco server, acting for the tenant the API key belongs to.

    ``tenant`` is needed only with the admin key (which belongs to no tenant); otherwise the
    client asks the server once (GetCaller). ``tls`` speaks TLS, trusting the system's roots, or
    ``ca`` (a PEM file of the server's CA or self-signed certificate; implies ``tls``).
    """

    def __init__(
        self,
        target: str,
        api_key: str,
        timeout_s: float = 120.0,
        tenant: str | None = None,
        tls: bool = False,
        ca: Path | str | None = None,
    ) -> None:
        if not api_key:
            raise InvalidArgument("an API key is required")
        if timeout_s <= 0:
            raise InvalidArgument(f"timeout_s must be > 0, got {timeout_s}")
        if tls or ca:
            self._channel = grpc.secure_channel(target, channel_credentials(ca))
        else:
            self._channel = grpc.insecure_channel(target)
        self._stub = lloco_pb2_grpc.LlocoServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._timeout_s = timeout_s
        self._names = ResourceNames(tenant.removeprefix(TENANTS)) if tenant else None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LlocoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., Item], request: object) -> Item:
        return method(request, timeout=self._timeout_s, metadata=self._metadata)

    @property
    def names(self) -> ResourceNames:
        """The caller's tenant names, resolved from the key on first use."""
        if self._names is None:
            caller = self.caller()
            if not caller.tenant:
                raise InvalidArgument("the admin key belongs to no tenant: pass tenant= to act on one")
            self._names = ResourceNames(caller.tenant.removeprefix(TENANTS))
        return self._names

    def _pages(
        self,
        method: Callable[..., _Page],
        request_type: type,
        parent: str,
        items: Callable[[_Page], Sequence[Item]],
        page_size: int,
    ) -> Iterator[Item]:
        token = ""
        while True:
            page = self._call(method, request_type(parent=parent, page_size=page_size, page_token=token))
            yield from items(page)
            token = page.next_page_token
            if not token:
                return

    # identity and administration

    def caller(self) -> lloco_pb2.GetCallerResponse:
        return self._call(self._stub.GetCaller, lloco_pb2.GetCallerRequest())

    def create_tenant(self, tenant_id: str) -> lloco_pb2.CreateTenantResponse:
        """Admin only: the new tenant and its first API key (shown only now)."""
        return self._call(self._stub.CreateTenant, lloco_pb2.CreateTenantRequest(tenant_id=tenant_id))

    def create_api_key(self, tenant_id: str | None = None) -> lloco_pb2.CreateApiKeyResponse:
        """Another key for ``tenant_id`` (default: the caller's tenant): the secret (shown only now) and
        the key's resource (its name revokes it)."""
        parent = self._tenant_names(tenant_id).tenant
        return self._call(self._stub.CreateApiKey, lloco_pb2.CreateApiKeyRequest(parent=parent))

    def list_api_keys(self, tenant_id: str | None = None, page_size: int = 0) -> Iterator[lloco_pb2.ApiKey]:
        """The keys of ``tenant_id`` (default: the caller's tenant): names and hints, never secrets."""
        return self._pages(
            self._stub.ListApiKeys,
            lloco_pb2.ListApiKeysRequest,
            self._tenant_names(tenant_id).tenant,
            lambda page: page.api_keys,
            page_size,
        )

    def revoke_api_key(self, key: str, tenant_id: str | None = None) -> None:
        """Revokes a key, named by its id or its full name (tenants/{t}/apiKeys/{id})."""
        name = self._tenant_names(tenant_id).api_key(key)
        self._call(self._stub.RevokeApiKey, lloco_pb2.RevokeApiKeyRequest(name=name))

    def delete_tenant(self, tenant_id: str) -> int:
        """Admin only: deletes the tenant and everything it owns; returns the objects removed."""
        request = lloco_pb2.DeleteTenantRequest(name=ResourceNames(tenant_id).tenant)
        return self._call(self._stub.DeleteTenant, request).deleted_objects

    def _tenant_names(self, tenant_id: str | None) -> ResourceNames:
        return ResourceNames(tenant_id.removeprefix(TENANTS)) if tenant_id else self.names

    # documents

    def ingest(self, doc_id: str, text: str | bytes) -> lloco_pb2.IngestDocumentResponse:
        content = text.encode("utf-8") if isinstance(text, str) else text
        request = lloco_pb2.IngestDocumentRequest(
            parent=self.names.tenant, document_id=doc_id, content=content
        )
        return self._call(self._stub.IngestDocument, request)

    def ingest_uri(self, doc_id: str, source_uri: str) -> lloco_pb2.IngestDocumentResponse:
        """Ingests a text already in the platform's object store (s3://bucket/key)."""
        request = lloco_pb2.IngestDocumentRequest(
            parent=self.names.tenant, document_id=doc_id, source_uri=source_uri
        )
        return self._call(self._stub.IngestDocument, request)

    def get_document(self, doc_id: str) -> lloco_pb2.Document:
        request = lloco_pb2.GetDocumentRequest(name=self.names.document(doc_id))
        return self._call(self._stub.GetDocument, request).document

    def list_documents(self, page_size: int = 0) -> Iterator[lloco_pb2.Document]:
        """Every document of the tenant, fetching pages as the iteration goes."""
        return self._pages(
            self._stub.ListDocuments,
            lloco_pb2.ListDocumentsRequest,
            self.names.tenant,
            lambda page: page.documents,
            page_size,
        )

    def delete_document(self, doc_id: str) -> None:
        self._call(
            self._stub.DeleteDocument, lloco_pb2.DeleteDocumentRequest(name=self.names.document(doc_id))
        )

    def compress(self, doc_ids: Sequence[str] = ()) -> lloco_pb2.Job:
        """Compresses the given documents (all pending ones when empty); SUCCEEDED at once if run online."""
        documents = [self.names.document(doc_id) for doc_id in doc_ids]
        request = lloco_pb2.CompressDocumentsRequest(parent=self.names.tenant, documents=documents)
        return self._call(self._stub.CompressDocuments, request).job

    # queries

    def _query_fields(
        self,
        question: str,
        doc_ids: Sequence[str],
        adapter: str,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop: Sequence[str],
        seed: int | None,
        retrieval: lloco_pb2.Retrieval | None,
    ) -> dict[str, object]:
        sampling = lloco_pb2.SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=list(stop), seed=seed
        )
        return {
            "tenant": self.names.tenant,
            "documents": [self.names.document(doc_id) for doc_id in doc_ids],
            "question": question,
            "adapter": self.names.adapter_spec(adapter),
            "sampling": sampling,
            "retrieval": retrieval,
        }

    def query(
        self,
        question: str,
        doc_ids: Sequence[str] = (),
        adapter: str = "",
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        retrieval: lloco_pb2.Retrieval | None = None,
    ) -> lloco_pb2.QueryResponse:
        """Answers ``question`` over the documents' compressed contexts; ``adapter`` is ``name[@version]``.
        With ``retrieval`` (and no ``doc_ids``) it asks the tenant's whole corpus and the reply's
        ``citations`` name the segments used."""
        fields = self._query_fields(
            question, doc_ids, adapter, max_new_tokens, temperature, top_p, stop, seed, retrieval
        )
        return self._call(self._stub.Query, lloco_pb2.QueryRequest(**fields))

    def query_stream(
        self,
        question: str,
        doc_ids: Sequence[str] = (),
        adapter: str = "",
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        retrieval: lloco_pb2.Retrieval | None = None,
    ) -> Iterator[lloco_pb2.QueryStreamResponse]:
        """As `query`, streamed (a corpus query's citations come in the first message); closing the
        iterator early cancels the call (the server frees its row)."""
        fields = self._query_fields(
            question, doc_ids, adapter, max_new_tokens, temperature, top_p, stop, seed, retrieval
        )
        call = self._call(self._stub.QueryStream, lloco_pb2.QueryStreamRequest(**fields))
        return _cancel_on_close(call)

    # adapters

    def list_adapters(self, page_size: int = 0) -> Iterator[lloco_pb2.Adapter]:
        return self._pages(
            self._stub.ListAdapters,
            lloco_pb2.ListAdaptersRequest,
            self.names.tenant,
            lambda page: page.adapters,
            page_size,
        )

    def get_adapter(self, adapter_id: str) -> lloco_pb2.Adapter:
        request = lloco_pb2.GetAdapterRequest(name=self.names.adapter(adapter_id))
        return self._call(self._stub.GetAdapter, request).adapter

    def list_adapter_versions(
        self, adapter_id: str, page_size: int = 0
    ) -> Iterator[lloco_pb2.AdapterVersion]:
        """Versions of one adapter, newest first."""
        return self._pages(
            self._stub.ListAdapterVersions,
            lloco_pb2.ListAdapterVersionsRequest,
            self.names.adapter(adapter_id),
            lambda page: page.versions,
            page_size,
        )

    def set_current_adapter(self, adapter_id: str, version: str) -> lloco_pb2.Adapter:
        """Rolls back or pins: ``version`` (e.g. ``v000002``) becomes the adapter's current one."""
        request = lloco_pb2.SetCurrentAdapterRequest(version=self.names.adapter_version(adapter_id, version))
        return self._call(self._stub.SetCurrentAdapter, request).adapter

    def import_adapter(self, adapter_id: str, directory: Path | str) -> lloco_pb2.AdapterVersion:
        """Imports the PEFT adapter saved in ``directory`` (adapter_config.json and adapter_model.safetensors,
        as peft's ``save_pretrained`` writes them) as the adapter's next version, now current.

        Raises:
            NotFound: a file is missing. InvalidArgument: the weights are a pickle (adapter_model.bin);
                they are never sent.
        """
        folder = Path(directory)
        if not (folder / PEFT_WEIGHTS).is_file() and (folder / PEFT_PICKLED_WEIGHTS).is_file():
            raise InvalidArgument(
                f"{folder} holds {PEFT_PICKLED_WEIGHTS}, a pickle, which lloco never loads: save the adapter "
                f"as {PEFT_WEIGHTS} (peft's save_pretrained does by default)"
            )
        try:
            files = lloco_pb2.PeftAdapterFiles(
                adapter_config=(folder / PEFT_CONFIG).read_bytes(),
                adapter_model=(folder / PEFT_WEIGHTS).read_bytes(),
            )
        except FileNotFoundError as error:
            raise NotFound(f"{folder} is not a PEFT adapter folder: no {Path(error.filename).name}") from None
        request = lloco_pb2.ImportAdapterRequest(parent=self.names.adapter(adapter_id), files=files)
        return self._call(self._stub.ImportAdapter, request).version

    def import_adapter_uri(self, adapter_id: str, source_uri: str) -> lloco_pb2.AdapterVersion:
        """Imports the PEFT adapter in a folder of the tenant's uploads folder (s3://bucket/.../uploads/DIR/)
        as the adapter's next version, now current."""
        request = lloco_pb2.ImportAdapterRequest(parent=self.names.adapter(adapter_id), source_uri=source_uri)
        return self._call(self._stub.ImportAdapter, request).version

    # datasets and jobs

    def upload_dataset(self, dataset_id: str, jsonl: bytes) -> lloco_pb2.Dataset:
        request = lloco_pb2.UploadDatasetRequest(
            parent=self.names.tenant, dataset_id=dataset_id, content=jsonl
        )
        return self._call(self._stub.UploadDataset, request).dataset

    def list_datasets(self, page_size: int = 0) -> Iterator[lloco_pb2.Dataset]:
        return self._pages(
            self._stub.ListDatasets,
            lloco_pb2.ListDatasetsRequest,
            self.names.tenant,
            lambda page: page.datasets,
            page_size,
        )

    def submit_finetune(self, dataset_id: str, adapter_id: str = "default") -> lloco_pb2.Job:
        request = lloco_pb2.SubmitFinetuneRequest(
            parent=self.names.tenant, dataset=self.names.dataset(dataset_id), adapter_id=adapter_id
        )
        return self._call(self._stub.SubmitFinetune, request).job

    def get_job(self, job_id: str) -> lloco_pb2.Job:
        return self._call(self._stub.GetJob, lloco_pb2.GetJobRequest(name=self.names.job(job_id))).job

    def list_jobs(self, page_size: int = 0) -> Iterator[lloco_pb2.Job]:
        """Every job of the tenant, in id order, fetching pages as the iteration goes."""
        return self._pages(
            self._stub.ListJobs,
            lloco_pb2.ListJobsRequest,
            self.names.tenant,
            lambda page: page.jobs,
            page_size,
        )

    def cancel_job(self, job_id: str) -> lloco_pb2.Job:
        """Stops a QUEUED or RUNNING job; returns it CANCELLED."""
        request = lloco_pb2.CancelJobRequest(name=self.names.job(job_id))
        return self._call(self._stub.CancelJob, request).job

    def wait_job(
        self,
        job_id: str,
        timeout_s: float,
        poll_s: float = 2.0,
        on_poll: Callable[[lloco_pb2.Job], None] | None = None,
    ) -> lloco_pb2.Job:
        """Polls GetJob until the job has ended (SUCCEEDED, FAILED or CANCELLED) and returns it; ``on_poll``
        sees the job after each poll (for a spinner).

        Raises:
            DeadlineExceeded: the job is still QUEUED or RUNNING after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while (job := self.get_job(job_id)).state in (
            lloco_pb2.JOB_STATE_QUEUED,
            lloco_pb2.JOB_STATE_RUNNING,
        ):
            if on_poll is not None:
                on_poll(job)
            if time.monotonic() + poll_s > deadline:
                state = lloco_pb2.JobState.Name(job.state)
                raise DeadlineExceeded(f"job {job.name} is still {state} after {timeout_s:.0f} s")
            time.sleep(poll_s)
        return job


def channel_credentials(ca: Path | str | None = None) -> grpc.ChannelCredentials:
    """TLS credentials trusting ``ca`` (a PEM file), or the system's roots when there is none."""
    if ca is None:
        return grpc.ssl_channel_credentials()
    try:
        return grpc.ssl_channel_credentials(Path(ca).read_bytes())
    except OSError as error:
        raise InvalidArgument(f"cannot read the CA file {ca}: {error.strerror}") from error


def _cancel_on_close(call: _StreamCall[Item]) -> Iterator[Item]:
    try:
        yield from call
    finally:
        call.cancel()
