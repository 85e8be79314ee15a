"""One typed settings object for the whole platform.

Values come from (highest first) constructor arguments, ``LLOCO_*`` environment variables
(nested with ``__``, e.g. ``LLOCO_STORE__BUCKET``), a secrets YAML file named by
``LLOCO_SECRETS_FILE`` (readable by its owner only: how secrets reach Ray jobs by reference, see
``lloco.jobs.settings_env``), an optional YAML config file, then the defaults here.
Defaults live only in this schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "lloco"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreSettings(_Section):
    """Where every object of the platform lives: any S3 (AWS, SeaweedFS, MinIO)."""

    endpoint_url: str | None = Field(None, description="S3 endpoint override; None means AWS.")
    bucket: str = Field("lloco", min_length=3, max_length=63, description="Bucket holding all objects.")
    prefix: str = Field("", description="Key prefix inside the bucket, for sharing one bucket.")
    region: str = Field("us-east-1", description="S3 region.")
    access_key_id: SecretStr | None = Field(None, description="Static access key; None uses the AWS chain.")
    secret_access_key: SecretStr | None = Field(None, description="Static secret key.")
    connect_timeout_s: float = Field(2.0, gt=0, le=60, description="Per-attempt connect timeout.")
    read_timeout_s: float = Field(30.0, gt=0, le=600, description="Per-attempt read timeout.")
    max_attempts: int = Field(4, ge=1, le=10, description="Attempts on transient errors (with backoff).")
    multipart_threshold_bytes: int = Field(16 * 2**20, ge=5 * 2**20, description="Multipart above this.")
    uploads_template: str = Field(
        "tenants/{tenant}/uploads/",
        description="The folder (in this bucket, under `prefix`) from which a tenant may ingest by "
        "source_uri; '{tenant}' is one whole segment. Checked by the store: the tenant's uploads/ folder "
        "or a folder outside the platform's own areas.",
    )


class ModelSettings(_Section):
    """Which base model and compressor the platform serves."""

    base_model: str = Field(
        "smollm2-135m-instruct",
        description="Model spec: 'smollm2-135m-instruct' (default GGUF), a local HF dir, an HF id, or s3://.",
    )
    compressor: str = Field("default", description="Compressor spec: 'default' (shipped), a dir, or s3://.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU."
    )
    cache_dir: Path = Field(DEFAULT_DATA_DIR / "models", description="Local cache of converted models.")


class LimitSettings(_Section):
    """Per-tenant limits applied at the edge."""

    max_document_bytes: int = Field(4 * 2**20, ge=1, description="Largest inline document.")
    max_documents: int = Field(10_000, ge=1, description="Documents a tenant may hold.")
    max_inflight_requests: int = Field(
        32, ge=1, description="Queries a tenant may have running at once on one API (ingress) replica."
    )
    max_query_tokens: int = Field(2048, ge=1, description="Question tokens a query may carry.")
    max_new_tokens: int = Field(512, ge=1, description="Tokens a query may generate.")
    max_docs_per_query: int = Field(8, ge=1, description="Documents one query may attach.")
    online_compress_max_tokens: int = Field(8192, ge=0, description="Ingest compresses at once below this.")
    max_page_size: int = Field(1000, ge=1, description="Largest page a List call returns.")
    max_message_bytes: int | None = Field(
        None,
        ge=4096,
        description="Largest request message the gRPC server reads (larger ones are refused before they "
        "are held); None means max_document_bytes + 1 MiB, room for a whole document and its fields.",
    )
    max_names_per_call: int = Field(
        1000, ge=1, description="Resource names one call may carry (CompressDocuments' documents)."
    )
    max_retrieval_k: int = Field(
        64, ge=1, le=1024, description="Segments a corpus query may retrieve (its `top_k`)."
    )
    default_retrieval_k: int = Field(
        8, ge=1, description="Segments a corpus query retrieves when it names no top_k."
    )
    max_corpus_segments: int = Field(
        200_000,
        ge=1,
        description="Segments a tenant's retrieval index may hold for one compressor; a rebuild or update "
        "that would exceed it fails with RESOURCE_EXHAUSTED (the index keeps its last version).",
    )
    tenant_storage_concurrency: int = Field(
        8,
        ge=1,
        description="Object-store calls a tenant's requests may have running at once on one API replica; "
        "the rest wait, so one tenant's fan-out cannot hold the store threads other tenants need.",
    )

    @model_validator(mode="after")
    def _default_k_within_max(self) -> LimitSettings:
        if self.default_retrieval_k > self.max_retrieval_k:
            raise ValueError(
                f"limits.default_retrieval_k ({self.default_retrieval_k}) must not exceed "
                f"limits.max_retrieval_k ({self.max_retrieval_k})"
            )
        return self

    @property
    def message_bytes(self) -> int:
        """The gRPC receive limit: `max_message_bytes`, or room for the largest document plus 1 MiB."""
        return self.max_message_bytes or self.max_document_bytes + 2**20


class LoraSettings(_Section):
    """Adapter slots on the serving engine."""

    max_rank: int = Field(16, ge=1, le=256, description="Ranks are padded to this in GPU slots.")
    gpu_slots: int = Field(8, ge=1, le=1024, description="Adapters resident on the accelerator.")
    cpu_adapters: int = Field(64, ge=1, description="Adapters kept in host memory (LRU).")


class EngineSettings(_Section):
    """Serving engine: batching and caches."""

    max_batch_size: int = Field(32, ge=1, le=1024, description="Rows decoded together.")
    max_seq_len: int = Field(4096, ge=64, description="Context + prompt + generated tokens per row.")
    context_cache_gpu_bytes: int = Field(
        2 * 2**30, ge=0, description="Accelerator tier of the context cache."
    )
    context_cache_cpu_bytes: int = Field(8 * 2**30, ge=0, description="Host tier of the context cache.")
    prefix_cache_bytes: int = Field(
        2 * 2**30,
        ge=0,
        description="Accelerator memory for the keys and values of compressed contexts already prefilled, by "
        "document(s) and adapter version: a context queried again with the same adapter skips its prefill and "
        "only the prompt is prefilled (contexts of embedding compressors; key/value summaries need no prefill). "
        "Taken as entries fill it, on top of the KV cache (max_batch_size x max_seq_len positions); an entry "
        "that finds no free device memory is not kept. 0 turns it off.",
    )
    compile: bool = Field(
        True,
        description="On CUDA, compile the decode step's layer function with torch.compile: faster decode "
        "than CUDA graphs alone, for a longer replica start (the engine compiles its shape classes before "
        "taking queries; docs/benchmarks has both figures).",
    )
    capture_decode_modes: list[Literal["greedy", "sample", "top_p"]] = Field(
        ["greedy"],
        description="On CUDA, sampling modes whose decode step the engine captures as CUDA graphs at start, "
        "for every batch and key-length class (a longer replica start; docs/benchmarks has the figures). "
        "A class first met while serving is captured then, and that step waits for it: every running "
        "query's next token comes later. Greedy covers queries with temperature 0; [] captures lazily.",
    )
    prefill_chunk_tokens: int | None = Field(
        2048,
        ge=1,
        description="Input positions (context vectors and prompt tokens) prefilled per engine step, over "
        "all new requests in admission order: a longer input is prefilled in chunks over several steps, "
        "each beside a decode step of the running requests, so a burst of long inputs delays their next "
        "token by one chunk's time per step instead of by the whole burst. Larger chunks bring the first "
        "token of long inputs sooner and stall decoding longer. None: each new request is prefilled whole.",
    )
    input_token_cost: float = Field(
        1.0,
        ge=0,
        description="Fair admission between tenants: the virtual-token cost of one input position (context "
        "vector or prompt token), charged to a tenant's counter when its request is admitted.",
    )
    output_token_cost: float = Field(
        2.0,
        ge=0,
        description="Fair admission between tenants: the virtual-token cost of one generated token, charged "
        "as it is generated (a decode step costs more per token than prefill).",
    )
    fair_preemption: bool = Field(
        False,
        description="Fair admission between tenants: when no row is free and a tenant with a query waiting "
        "holds fewer rows than its share (the rows split by weight among the tenants with queries waiting "
        "or running), take one row an engine step from the tenant furthest above its share, if it holds "
        "more than its share + 1: that query goes back to the front of its tenant's queue and, admitted "
        "again, recomputes its context, prompt and tokens so far, then streams on (a pause, no token "
        "repeated). Counters alone only order free rows, so a tenant that took every row while the others "
        "were idle keeps them until its queries end. Off by default: on an H100 it made the other tenants' "
        "TTFT p99 worse, not better, in every GPU run (docs/benchmarks/scheduling-preemption-h100-*, "
        "scheduling-trials-h100).",
    )
    tenant_weights: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict,
        description="Fair admission between tenants: a tenant's share while several have queries waiting "
        "(tenants not listed weigh 1). Costs are divided by the weight, so a tenant weighing twice another "
        "is served twice its tokens.",
    )

    @model_validator(mode="after")
    def _some_cost(self) -> EngineSettings:
        if self.input_token_cost == 0 and self.output_token_cost == 0:
            raise ValueError("engine.input_token_cost and engine.output_token_cost must not both be 0")
        return self


class ServeSettings(_Section):
    """The Ray Serve application."""

    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address the gRPC and HTTP servers listen on: loopback for `lloco up`; '0.0.0.0' or '::' for "
        "every interface (the Helm chart).",
    )
    grpc_port: int = Field(50051, ge=1, le=65535, description="gRPC port.")
    http_port: int | None = Field(
        8100,
        ge=1,
        le=65535,
        description="Port of the OpenAI-compatible HTTP API (/v1/...), on the same host and with the same "
        "TLS files as gRPC (not 8000: Ray Serve's own HTTP proxy takes that one on a cluster); None turns it off.",
    )
    tls_cert_file: Path | None = Field(
        None,
        description="PEM certificate chain of the gRPC and HTTP servers; with tls_key_file, the API speaks TLS.",
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    engine_replicas: int = Field(1, ge=1, description="Engine replicas.")
    engine_num_gpus: float = Field(0.0, ge=0, description="GPUs per engine replica (0 on CPU).")
    max_ongoing_requests: int = Field(256, ge=1, description="Requests a replica accepts at once.")
    stream_messages_per_s: float = Field(
        1000.0,
        gt=0,
        description="Streamed answer messages an engine replica sends per second, all its streams together: "
        "with many streams open, tokens gather into fewer, larger messages (each costs Ray a round trip); a "
        "stream's first token is never held back, and a lone stream still gets each token as it comes.",
    )
    auth_cache_ttl_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="How long an edge replica trusts a resolved API key (0: every call reads the store). A key "
        "revoked or a tenant deleted through a replica stops working there at once; on the other replicas "
        "within this time.",
    )
    metadata_cache_ttl_s: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="How long an edge replica trusts the registry records a query needs (tenant, documents, "
        "adapter versions; 0: every query reads the store). Writes through the replica update them at once; "
        "writes elsewhere (finetune jobs, other replicas, tools) are seen within this time.",
    )
    metadata_cache_entries: int = Field(
        65_536, ge=0, description="Records each of the edge's lookup caches holds at most (LRU)."
    )

    @model_validator(mode="after")
    def _tls_pair_and_ports(self) -> ServeSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("serve.tls_cert_file and serve.tls_key_file are set together or not at all")
        if self.http_port == self.grpc_port:
            raise ValueError(f"serve.http_port and serve.grpc_port must differ (both are {self.grpc_port})")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


class CompressSettings(_Section):
    """The offline compression job."""

    batch_size: int = Field(64, ge=1, description="Segments per compressor forward.")
    pool_size: int = Field(1, ge=1, description="Compressor actors (one per GPU).")
    actor_num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (1 on a GPU cluster).")
    actor_num_cpus: float = Field(0.5, gt=0, description="CPUs per actor; fractional on small machines.")
    max_document_tokens: int = Field(262_144, ge=1, description="Longer documents are reported and skipped.")
    cpu_threads: int | None = Field(
        None, ge=1, description="Torch threads of an actor on CPU; None keeps Ray's (one per whole CPU held)."
    )


class FinetuneSettings(_Section):
    """Per-tenant LoRA finetuning (paper defaults)."""

    rank: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] = Field(("q_proj", "k_proj", "v_proj", "o_proj"))
    learning_rate: float = Field(2e-5, gt=0)
    epochs: float = Field(3.0, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    context_ratio: int = Field(
        8,
        ge=0,
        description="Compressed adapters also read the question's evidence (lloco.registry.evidence: the "
        "documents' sentences BM25 ranks best) before the prompt, in what the summaries leave of the "
        "documents' tokens / this, so the whole context stays within it; the adapter records it and "
        "serving follows its record. 0: no evidence.",
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers per tenant.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPU fraction per worker (0 on CPU).")
    cpus_per_worker: float = Field(0.5, gt=0)


class JobsSettings(_Section):
    """Where the jobs submitted through the API (CompressDocuments, SubmitFinetune) run."""

    ray_address: str | None = Field(
        None,
        min_length=1,
        description="Ray cluster that takes the API's compress and finetune jobs: its job server "
        "(`http://HOST:8265`, the dashboard) or its GCS address (`HOST:6379`). The Helm chart's jobs "
        "cluster (`jobsCluster.enabled`) sets it, so jobs neither load the serving cluster nor vanish "
        "with it in an upgrade. None: the serving cluster's own.",
    )


class Settings(BaseSettings):
    """The platform's settings."""

    model_config = SettingsConfigDict(env_prefix="LLOCO_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Field(DEFAULT_DATA_DIR, description="Local state: embedded S3 data, caches.")
    qa_data_dir: Path = Field(
        DEFAULT_DATA_DIR / "qa-data",
        description="The public QA sets (SQuAD 2.0 dev, HotpotQA dev, QMSum) that `lloco eval` and "
        "`lloco pretrain-corpus` read; `lloco data fetch` downloads them here.",
    )
    admin_key: SecretStr | None = Field(None, description="Key with admin scope (tenant management).")
    store: StoreSettings = StoreSettings()
    model: ModelSettings = ModelSettings()
    limits: LimitSettings = LimitSettings()
    lora: LoraSettings = LoraSettings()
    engine: EngineSettings = EngineSettings()
    serve: ServeSettings = ServeSettings()
    compress: CompressSettings = CompressSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    jobs: JobsSettings = JobsSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _SecretsSource(settings_cls), _YamlSource(settings_cls)

    @classmethod
    def load(cls, path: Path | str | None = None, **overrides: Any) -> Settings:
        """Settings from an optional YAML file (``LLOCO_CONFIG`` when no path is given)."""
        _YamlSource.path = Path(path) if path else None
        try:
            return cls(**overrides)
        finally:
            _YamlSource.path = None


SECRETS_FILE_VARIABLE = "LLOCO_SECRETS_FILE"


def _read_mapping(path: Path, what: str) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a mapping, got {type(data).__name__}")
    return data


class _YamlSource(PydanticBaseSettingsSource):
    path: Path | None = None

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        import os

        path = self.path or (Path(os.environ["LLOCO_CONFIG"]) if os.environ.get("LLOCO_CONFIG") else None)
        return _read_mapping(path, "config file") if path else {}


class _SecretsSource(PydanticBaseSettingsSource):
    """Settings (secrets) from the YAML file ``LLOCO_SECRETS_FILE`` names, which only its owner may read."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        import os

        name = os.environ.get(SECRETS_FILE_VARIABLE)
        if not name:
            return {}
        path = Path(name)
        if path.stat().st_mode & 0o077:
            raise ValueError(f"secrets file {path} is readable by others: chmod 600 it")
        return _read_mapping(path, "secrets file")
