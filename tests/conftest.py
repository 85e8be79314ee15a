"""Shared fixtures: a real SeaweedFS S3 server, a tiny random Llama, local Ray."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest

QA_DATA = (
    Path(__file__).resolve().parent / "data" / "qa"
)  # small subsets of the QA sets (tests/data/README.md)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s, so a finished trainer's fit() returned up to 2 s after its
# last step; every Ray node the tests start (ray_local, `ray start`, `lloco up`, job drivers) inherits this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
if "TRITON_INTERPRET" not in os.environ:  # the decode kernels run on CPU tensors in Triton's interpreter
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A running SeaweedFS S3 server for the whole session."""
    from lloco.storage import EmbeddedS3

    server = EmbeddedS3(tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def store(s3: object) -> object:
    """An ObjectStore on a fresh bucket, so tests never see each other's objects."""
    from lloco.storage import ObjectStore

    bucket = f"t-{uuid.uuid4().hex[:20]}"
    object_store = ObjectStore(s3.store_settings(bucket=bucket))
    object_store.ensure_bucket()
    return object_store


@pytest.fixture
def recording_store(store: object) -> object:
    """The `store` bucket through a real ObjectStore that also records the key of every object it reads
    (``reads``: get_bytes and open_stream, in order), so a test can tell which objects a call read. The
    reads still go to SeaweedFS; its own request counter (``EmbeddedS3.metrics_url``) counts requests
    per bucket and method, not per key."""
    from lloco.storage import ObjectStore

    class RecordingStore(ObjectStore):
        def __init__(self, settings: Any) -> None:
            super().__init__(settings)
            self.reads: list[str] = []

        def get_bytes(self, key: str) -> bytes:
            self.reads.append(key)
            return super().get_bytes(key)

        def open_stream(self, key: str) -> Any:
            self.reads.append(key)
            return super().open_stream(key)

    return RecordingStore(store.settings)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random HF Llama (GQA, tied embeddings off) with a real tokenizer."""
    from lloco.model import tiny_llama_dir

    return tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def compressor_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh (untrained) compressor for the tiny model: segments of 32 tokens into 4 vectors."""
    from lloco.model import Compressor, load_model

    base = load_model(str(tiny_model_dir), tmp_path_factory.mktemp("model-cache"), dtype="float32")
    return Compressor.from_base(base, segment_len=32, k=4, accumulate=True, seed=0).save(
        tmp_path_factory.mktemp("compressor")
    )


@pytest.fixture(scope="session")
def tiny_settings(tiny_model_dir: Path, compressor_dir: Path) -> Callable[..., Any]:
    """Makes the Settings of a stack serving the tiny model with the ``compressor_dir`` compressor in
    float32: ``make(data_dir, admin_key, **sections)``, the other sections (limits, lora, engine, serve)
    as keyword arguments."""
    from lloco.config import ModelSettings, Settings
    from pydantic import SecretStr

    def make(data_dir: Path, admin_key: str, **sections: Any) -> Settings:
        model = ModelSettings(
            base_model=str(tiny_model_dir),
            compressor=str(compressor_dir),
            dtype="float32",
            cache_dir=data_dir / "models",
        )
        return Settings(data_dir=data_dir, admin_key=SecretStr(admin_key), model=model, **sections)

    return make


@pytest.fixture(scope="session")
def peft_adapter(tiny_model_dir: Path) -> Callable[[int], dict[str, bytes]]:
    """Makes the files of a PEFT rank-8 LoRA on q/k/v/o of the tiny model, random non-zero A and B (a seed
    each), as `save_pretrained` writes them."""

    def make(seed: int) -> dict[str, bytes]:
        import tempfile

        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        config = LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False,
        )
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:
                    parameter.normal_(0.0, 0.3)
        with tempfile.TemporaryDirectory() as directory:
            peft_model.save_pretrained(directory)
            return {
                name: (Path(directory) / name).read_bytes()
                for name in ("adapter_config.json", "adapter_model.safetensors")
            }

    return make


@pytest.fixture(scope="session", autouse=True)
def ray_agents_off_the_default_port() -> Iterator[None]:
    """Every Ray node this test process starts gives its dashboard agent a free port.

    Patches RayParams.__init__ (the one mock here): ray.init has no argument for the agent's port, whose
    default 52365 must stay free for the `lloco up` subprocesses tests start (tests/test_jobs.py), whose
    job server takes no job without its agent (and `lloco up` refuses to start when the port is taken)."""
    from lloco.ports import free_port
    from ray._private.parameter import RayParams

    init_params = RayParams.__init__

    def with_free_agent_port(params: RayParams, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("dashboard_agent_listen_port", free_port())
        init_params(params, *args, **kwargs)

    with patch.object(RayParams, "__init__", with_free_agent_port):
        yield


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray instance for the session, on loopback."""
    import ray

    ray.init(
        address="local",  # never attach to a cluster someone started with `ray start`
        num_cpus=4,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parents[1] / "platform")}},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tiny_base: object, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small pretraining corpus: 80 HotpotQA train-side documents, tokenized for the module's ``tiny_base``."""
    from lloco.finetune.corpus import build_corpus, evaluation_titles, hotpot_documents

    documents = list(itertools.islice(hotpot_documents(QA_DATA, evaluation_titles(QA_DATA)), 80))
    path = tmp_path_factory.mktemp("corpus") / "corpus.npz"
    build_corpus(path, tiny_base.tokenizer, tiny_base.model_id, documents, 10**7, held_out_fraction=0.1)
    return path


@pytest.fixture(scope="module")
def qa_cache(tiny_base: object, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """QA examples from the train splits (30 HotpotQA questions, SQuAD train articles), cut to 48 tokens."""
    from lloco.finetune.pretrain_qa import build_qa_examples

    path = tmp_path_factory.mktemp("qa") / "qa"
    train, held = build_qa_examples(
        QA_DATA,
        tiny_base.tokenizer,
        48,
        held_out_fraction=0.1,
        sources=("squad", "hotpotqa"),
        hotpot_limit=30,
    )
    train.save(path.with_suffix(".train.npz"))
    held.save(path.with_suffix(".held_out.npz"))
    return path
