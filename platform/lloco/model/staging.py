"""Stage a base model in the object store, so serving pods load it from there and fetch nothing else.

`push_model` uploads a Hugging Face checkpoint directory (config.json, weights, tokenizer) to
``models/{model_id}/`` of the store, the ``.complete`` marker last. Pods then load it with the spec
it returns (``s3://bucket/[prefix/]models/{model_id}/``), or, for the default model's id, through the
default spec itself: `load_model` reads ``models/smollm2-135m-instruct/`` once its marker is there
instead of converting the GGUF from PyPI. ``lloco model push`` is the command over it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lloco.errors import InvalidArgument, NotFound
from lloco.model.config import LlamaConfig
from lloco.model.loading import COMPLETE_MARKER

if TYPE_CHECKING:
    from lloco.storage import ObjectStore

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass(frozen=True)
class PushedModel:
    """What `push_model` stored: the spec pods load it by, and how much."""

    model_id: str
    spec: str
    files: int
    bytes: int


def checkpoint_files(source: Path) -> list[Path]:
    """The files of an HF Llama-family checkpoint directory that a pod needs, checked before any upload.

    Top-level files only (loading reads nothing else; a hub snapshot's ``original/`` weights would double
    the upload), hidden ones left out.

    Raises:
        NotFound: ``source`` is not a directory, or holds no config.json or no weights.
        InvalidArgument: config.json is not a Llama-family config, or there is no tokenizer.
    """
    if not source.is_dir():
        raise NotFound(f"{source} is not a directory")
    config = source / "config.json"
    if not config.is_file():
        raise NotFound(f"{source} has no config.json: not a Hugging Face checkpoint directory")
    try:
        LlamaConfig.from_hf(json.loads(config.read_text()))
    except json.JSONDecodeError as error:
        raise InvalidArgument(f"{config} is not JSON: {error}") from error
    files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    names = {p.name for p in files}
    weights = [n for n in names if n.endswith(".safetensors") or re.fullmatch(r"pytorch_model.*\.bin", n)]
    if not weights:
        raise NotFound(f"{source} has no *.safetensors or pytorch_model*.bin weights")
    if not names & set(TOKENIZER_FILES):
        raise InvalidArgument(f"{source} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    return files


def push_model(
    store: ObjectStore,
    source: Path,
    model_id: str,
    on_file: Callable[[Path], None] | None = None,
) -> PushedModel:
    """Upload the checkpoint in ``source`` to ``models/{model_id}/``, replacing what was there.

    The old objects go first and the ``.complete`` marker last, so a pod never loads a mix of two
    uploads or a partial one as the default model. ``on_file`` is called after each file (progress).

    Raises:
        InvalidArgument: bad ``model_id`` or checkpoint. NotFound: see `checkpoint_files`.
        Unavailable: the store cannot be reached.
    """
    from lloco.storage import keys

    prefix = keys.model_prefix(model_id)
    files = checkpoint_files(source)
    store.delete_prefix(prefix)
    for file in files:
        store.put_file(prefix + file.name, file)
        if on_file is not None:
            on_file(file)
    store.put_bytes(prefix + COMPLETE_MARKER, b"")
    return PushedModel(model_id, store.uri(prefix), len(files), sum(file.stat().st_size for file in files))
