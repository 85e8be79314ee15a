"""AutoCompressor-style context encoder: a document becomes k summary vectors per segment.

Segment i of a document runs through the base model as
``[summary vectors of segments < i (if accumulate)] + segment i tokens + k summary embeddings``
(contiguous positions from 0), and the final-normed hidden states at the k summary positions, times a
per-channel ``output_scale`` when the compressor has one, are segment i's summary vectors. The scale
exists because the final norm fixes the size of its output (about 15x a token embedding's for SmolLM2),
which no encoder LoRA can change, while the vectors are read back as input embeddings (by the next
segment's encoding and by the decoder). The i-th segments of many documents run as one right-padded batch; a shorter last
segment just has its summary positions earlier in its row. Without accumulation every segment is encoded
on its own. An optional LoRA adapter (PEFT files, e.g. from compressor pretraining) is applied through a
one-slot ``LoraSlots``, so the compressor shares the base weights with the decoder.

A compressor's summaries have one of two forms (``summary_form``): ``embeddings``, the vectors above, read
back as input embeddings; or ``kv``, the per-layer keys and values of the summary positions
(``lloco.model.kv_summary``), where segment i's pass runs after the key/value summaries of segments < i and
keeps its summary tokens' keys and values (no output scale). Both are ``[positions, width]`` tensors per
document; every consumer (the engine, compression jobs, tenant finetunes, ``lloco eval``) reads both.

Which positions a key/value compressor keeps (``positions``): ``summary_tokens``, the k learned summary
embeddings appended to each segment (above); or ``salient_sentences``, k of the segment's own tokens, whole
sentences by the base model's surprisal (``lloco.model.salient``), which has no weights to train or store.

A compressor may also carry a *reader*: a decoder-side LoRA (PEFT files, in ``reader/``) trained with the
encoder so that the frozen base model reads summary vectors. It never runs inside ``compress``; consumers
that decode after summary vectors apply it (or start a tenant adapter from it) — see docs/compressor.md.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lloco.errors import FailedPrecondition, InvalidArgument, NotFound
from lloco.model.config import LlamaConfig
from lloco.model.kv_summary import kv_width, prefix_hidden
from lloco.model.loading import LoadedModel, build_llama, download_prefix, model_id_for, read_state_dict
from lloco.model.lora import CONFIG_FILE, WEIGHTS_FILE, LoraSlots, peft_geometry
from lloco.model.salient import salient_positions, token_surprisal

if TYPE_CHECKING:
    from lloco.storage import ObjectStore

CONFIG_NAME = "compressor.json"
EMBEDS_NAME = "summary_embeddings.safetensors"
READER_DIR = "reader"
FORMAT = "lloco-compressor/1"
SHIPPED = Path(__file__).parent / "compressors"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SUMMARY_FORMS = ("embeddings", "kv")
POSITIONS = ("summary_tokens", "salient_sentences")
SALIENT_VERSION = 2  # in the id of a salient_sentences compressor: bump when its selection changes


@dataclass(frozen=True)
class CompressorConfig:
    compressor_id: str
    segment_len: int
    k: int
    accumulate: bool
    base_model: str
    dim: int
    summary_form: str = "embeddings"
    positions: str = "summary_tokens"

    def __post_init__(self) -> None:
        if self.segment_len < 1 or self.k < 1:
            raise InvalidArgument(f"segment_len and k must be >= 1, got {self.segment_len}, {self.k}")
        if self.summary_form not in SUMMARY_FORMS:
            raise InvalidArgument(f"summary_form must be one of {SUMMARY_FORMS}, got {self.summary_form!r}")
        if self.positions not in POSITIONS:
            raise InvalidArgument(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.positions == "salient_sentences" and self.summary_form != "kv":
            raise InvalidArgument("a salient_sentences compressor keeps keys and values (summary_form kv)")
        if not _ID.fullmatch(self.compressor_id):
            raise InvalidArgument(f"compressor id {self.compressor_id!r} must match {_ID.pattern}")

    def summary_positions(self, tokens: int) -> int:
        """Positions a document of ``tokens`` tokens compresses to: k per segment (a last segment shorter than
        k keeps all its tokens when salient positions are kept)."""
        full, rest = divmod(tokens, self.segment_len)
        last = min(rest, self.k) if self.positions == "salient_sentences" else self.k if rest else 0
        return full * self.k + last


class Compressor:
    """Encodes token sequences into summary vectors with a frozen base model.

    Args:
        base: the base model it runs on.
        summary_embeds: [k, D] learned summary-token embeddings.
        segment_len: tokens per segment.
        accumulate: feed summaries of earlier segments before each segment.
        adapter_files: optional PEFT adapter (adapter_config.json, adapter_model.safetensors bytes).
        output_scale: optional [D] factor on the summary vectors (None: the final-normed states as they are,
            as princeton-nlp AutoCompressors use them).
        reader_files: optional decoder-side PEFT adapter trained to read the summary vectors.
        compressor_id: stable id of these weights; None derives one from the base model, geometry and a
            digest of the weights.
        summary_form: "embeddings" or "kv" (module docstring); "kv" takes no output scale.
        k: positions kept per segment when ``summary_embeds`` is None: a ``salient_sentences`` compressor
            (no weights but an optional reader; ``Compressor.salient``). Otherwise k is the embeddings' rows.
    """

    def __init__(
        self,
        base: LoadedModel,
        summary_embeds: Tensor | None,
        segment_len: int,
        accumulate: bool,
        adapter_files: dict[str, bytes] | None = None,
        output_scale: Tensor | None = None,
        compressor_id: str | None = None,
        reader_files: dict[str, bytes] | None = None,
        summary_form: str = "embeddings",
        k: int | None = None,
    ) -> None:
        if summary_form == "kv" and output_scale is not None:
            raise InvalidArgument("a key/value-summary compressor has no output scale")
        if summary_embeds is None:
            if k is None or adapter_files is not None:
                raise InvalidArgument("a salient_sentences compressor takes k and no encoder adapter")
            if base.tokenizer is None:
                raise FailedPrecondition(
                    f"base model {base.model_id} has no tokenizer to find sentences with"
                )
        elif summary_embeds.ndim != 2 or summary_embeds.shape[1] != base.config.dim:
            raise FailedPrecondition(
                f"summary embeddings {tuple(summary_embeds.shape)} do not fit model dim {base.config.dim}"
            )
        if output_scale is not None and tuple(output_scale.shape) != (base.config.dim,):
            raise FailedPrecondition(
                f"output scale {tuple(output_scale.shape)} does not fit model dim {base.config.dim}"
            )
        positions = "summary_tokens" if summary_embeds is not None else "salient_sentences"
        k = summary_embeds.shape[0] if summary_embeds is not None else k
        if compressor_id is None and summary_embeds is None:
            digest = hashlib.sha256(f"salient-v{SALIENT_VERSION}".encode())
            for name in sorted(reader_files or {}):
                digest.update(b"reader/" + name.encode() + reader_files[name])
            flag = ("-acc" if accumulate else "") + "-salient"
            compressor_id = f"{base.model_id[:80]}-s{segment_len}-k{k}{flag}-{digest.hexdigest()[:12]}"
        if compressor_id is None:
            digest = hashlib.sha256(summary_embeds.detach().float().cpu().numpy().tobytes())
            if output_scale is not None:
                digest.update(output_scale.detach().float().cpu().numpy().tobytes())
            for name in sorted(adapter_files or {}):
                digest.update(adapter_files[name])
            for name in sorted(reader_files or {}):
                digest.update(b"reader/" + name.encode() + reader_files[name])
            flag = ("-acc" if accumulate else "") + ("-kv" if summary_form == "kv" else "")
            compressor_id = f"{base.model_id[:80]}-s{segment_len}-k{k}{flag}-{digest.hexdigest()[:12]}"
        self.config = CompressorConfig(
            compressor_id, segment_len, k, accumulate, base.model_id, base.config.dim, summary_form, positions
        )
        self.base = base
        model = base.model
        self.summary_embeds = (
            None
            if summary_embeds is None
            else summary_embeds.detach().to(device=model.device, dtype=model.dtype)
        )
        self.output_scale = (
            None if output_scale is None else output_scale.detach().to(device=model.device, dtype=model.dtype)
        )
        self.adapter_files = adapter_files
        self.reader_files = reader_files
        if reader_files is not None:
            peft_geometry(reader_files)  # fails early on a malformed reader
        self.lora: LoraSlots | None = None
        if adapter_files is not None:
            targets, rank = peft_geometry(adapter_files)
            self.lora = LoraSlots(base.config, 1, rank, targets, model.device, model.dtype)
            self.lora.load(0, adapter_files)

    compressor_id = property(lambda self: self.config.compressor_id)
    segment_len = property(lambda self: self.config.segment_len)
    k = property(lambda self: self.config.k)
    accumulate = property(lambda self: self.config.accumulate)
    summary_form = property(lambda self: self.config.summary_form)
    positions = property(lambda self: self.config.positions)

    @property
    def width(self) -> int:
        """Values per summary position: the model width, or ``kv_width`` for key/value summaries."""
        return kv_width(self.base.config) if self.summary_form == "kv" else self.base.config.dim

    @classmethod
    def from_base(
        cls,
        base: LoadedModel,
        segment_len: int,
        k: int,
        accumulate: bool,
        seed: int = 0,
        summary_form: str = "embeddings",
    ) -> Compressor:
        """Fresh summary embeddings: the EOS embedding (as AutoCompressors initialise) plus seeded noise at
        10% of the embedding table's scale, so the k tokens start distinct; for embedding summaries an
        output scale that brings the final norm's output to the embedding table's size. Untrained: for
        pretraining/tests.
        """
        table = base.model.get_input_embeddings().weight.detach().float()
        eos = base.config.eos_token_ids[0] if base.config.eos_token_ids else 0
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(k, base.config.dim, generator=generator) * 0.1 * table.std().item()
        norm = base.model.model.norm.weight.detach().float()
        size = table.pow(2).mean().sqrt() / norm.pow(2).mean().sqrt()
        scale = None if summary_form == "kv" else torch.full((base.config.dim,), size.item())
        return cls(
            base,
            table[eos].cpu()[None] + noise,
            segment_len,
            accumulate,
            output_scale=scale,
            summary_form=summary_form,
        )

    @classmethod
    def salient(
        cls,
        base: LoadedModel,
        segment_len: int,
        k: int,
        accumulate: bool = True,
        reader_files: dict[str, bytes] | None = None,
    ) -> Compressor:
        """A ``salient_sentences`` compressor: per segment, the keys and values of k of its own tokens."""
        return cls(base, None, segment_len, accumulate, reader_files=reader_files, summary_form="kv", k=k)

    def summary_positions(self, tokens: int) -> int:
        """Positions ``compress`` makes of a document of ``tokens`` tokens (``CompressorConfig``)."""
        return self.config.summary_positions(tokens)

    @torch.no_grad()
    def compress(self, token_ids: list[list[int]], batch_size: int = 16) -> list[Tensor]:
        """Summaries of each document: [summary_positions(n), width] in the model's dtype and device.

        The i-th segments of all documents run together, ``batch_size`` rows per forward.
        """
        if batch_size < 1:
            raise InvalidArgument(f"batch_size must be >= 1, got {batch_size}")
        model, size = self.base.model, self.segment_len
        vocab = self.base.config.vocab_size
        if any(not 0 <= t < vocab for doc in token_ids for t in doc):
            raise InvalidArgument(f"token ids must be in [0, {vocab})")
        segments = [[doc[j : j + size] for j in range(0, len(doc), size)] for doc in token_ids]
        summaries: list[list[Tensor]] = [[] for _ in token_ids]
        for i in range(max((len(s) for s in segments), default=0)):
            docs = [d for d, segs in enumerate(segments) if len(segs) > i]
            for start in range(0, len(docs), batch_size):
                chunk = docs[start : start + batch_size]
                outputs = self._encode([segments[d][i] for d in chunk], [summaries[d] for d in chunk])
                for d, vectors in zip(chunk, outputs, strict=True):
                    summaries[d].append(vectors)
        empty = torch.zeros(0, self.width, device=model.device, dtype=model.dtype)
        return [torch.cat(parts) if parts else empty for parts in summaries]

    def _encode(self, segments: list[list[int]], earlier: list[list[Tensor]]) -> Tensor | list[Tensor]:
        """One batch of same-index segments -> summaries [B, k, width] (per row for salient positions)."""
        if self.positions == "salient_sentences":
            return self._encode_salient(segments, earlier)
        if self.summary_form == "kv":
            return self._encode_kv(segments, earlier)
        model, k, dim = self.base.model, self.k, self.base.config.dim
        device = model.device
        prefix = sum(p.shape[0] for p in earlier[0]) if self.accumulate else 0
        lengths = [prefix + len(seg) + k for seg in segments]
        embeds = torch.zeros(len(segments), max(lengths), dim, device=device, dtype=model.dtype)
        for row, (seg, parts) in enumerate(zip(segments, earlier, strict=True)):
            if prefix:
                embeds[row, :prefix] = torch.cat(parts)
            embeds[row, prefix : prefix + len(seg)] = model.embed(torch.tensor(seg, device=device))
            embeds[row, prefix + len(seg) : lengths[row]] = self.summary_embeds
        lora = None
        if self.lora is not None:
            lora = self.lora.batch(torch.zeros(len(segments), dtype=torch.int64, device=device))
        hidden = model.hidden(embeds, lora)
        starts = torch.tensor([length - k for length in lengths], device=device)
        index = starts[:, None] + torch.arange(k, device=device)[None, :]
        vectors = hidden[torch.arange(len(segments), device=device)[:, None], index]
        return vectors if self.output_scale is None else vectors * self.output_scale

    def _encode_kv(self, segments: list[list[int]], earlier: list[list[Tensor]]) -> Tensor:
        """``_encode`` for key/value summaries: each row is ``segment + k summary embeddings`` after the
        key/value summaries of the earlier segments; the summary tokens' keys and values are kept."""
        model, k, device = self.base.model, self.k, self.base.model.device
        lengths = [len(seg) + k for seg in segments]
        embeds = torch.zeros(
            len(segments), max(lengths), self.base.config.dim, device=device, dtype=model.dtype
        )
        for row, seg in enumerate(segments):
            embeds[row, : len(seg)] = model.embed(torch.tensor(seg, device=device))
            embeds[row, len(seg) : lengths[row]] = self.summary_embeds
        prefix = None
        if self.accumulate and earlier[0]:
            prefix = torch.stack([torch.cat(parts) for parts in earlier])
        lora = None
        if self.lora is not None:
            lora = self.lora.batch(torch.zeros(len(segments), dtype=torch.int64, device=device))
        keep = torch.tensor(lengths, device=device)[:, None] - k + torch.arange(k, device=device)[None]
        return prefix_hidden(model, embeds, prefix, lora, keep)[1]

    def _encode_salient(self, segments: list[list[int]], earlier: list[list[Tensor]]) -> list[Tensor]:
        """``_encode`` for salient positions: each segment runs after the earlier segments' kept keys and
        values; its surprisal comes from the same pass, and the chosen tokens' keys and values are kept."""
        model, device = self.base.model, self.base.model.device
        lengths = torch.tensor([len(seg) for seg in segments], device=device)
        token_ids = torch.zeros(len(segments), int(lengths.max()), dtype=torch.int64, device=device)
        for row, seg in enumerate(segments):
            token_ids[row, : len(seg)] = torch.tensor(seg, device=device)
        prefix = None
        if self.accumulate and earlier[0]:
            prefix = torch.stack([torch.cat(parts) for parts in earlier])
        every = torch.arange(token_ids.shape[1], device=device)[None].expand(len(segments), -1)
        hidden, kv = prefix_hidden(model, model.embed(token_ids), prefix, keep=every)
        surprisal = token_surprisal(hidden, model.lm_head, token_ids, lengths)
        kept = salient_positions(
            token_ids, surprisal, lengths, self.k, self.base.tokenizer, document_start=not earlier[0]
        )
        return [kv[row, index] for row, index in enumerate(kept)]

    def save(self, directory: Path | str) -> Path:
        """Write compressor.json, the summary embeddings and the adapter files (if any) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps({"format": FORMAT, **asdict(self.config)}, indent=2))
        if self.summary_embeds is not None:
            tensors = {"summary_embeds": self.summary_embeds.float().cpu().contiguous()}
            if self.output_scale is not None:
                tensors["output_scale"] = self.output_scale.float().cpu().contiguous()
            save_file(tensors, directory / EMBEDS_NAME)
        for name, data in (self.adapter_files or {}).items():
            (directory / name).write_bytes(data)
        if self.reader_files is not None:
            (directory / READER_DIR).mkdir(exist_ok=True)
            for name, data in self.reader_files.items():
                (directory / READER_DIR / name).write_bytes(data)
        return directory

    @classmethod
    def load(cls, directory: Path | str, base: LoadedModel) -> Compressor:
        """Load what ``save`` wrote, onto ``base``.

        Raises:
            NotFound: no compressor.json. FailedPrecondition: written for a different model width.
        """
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise NotFound(f"no {CONFIG_NAME} in {directory}")
        raw = json.loads((directory / CONFIG_NAME).read_text())
        if raw.get("format") != FORMAT:
            raise FailedPrecondition(
                f"{directory / CONFIG_NAME} has format {raw.get('format')!r}, expected {FORMAT}"
            )
        if raw["dim"] != base.config.dim:
            raise FailedPrecondition(
                f"compressor {raw['compressor_id']} is for width {raw['dim']}, base model {base.model_id} has "
                f"{base.config.dim}"
            )
        salient = raw.get("positions", "summary_tokens") == "salient_sentences"
        tensors = {} if salient else load_file(directory / EMBEDS_NAME)
        adapter = reader = None
        if (directory / CONFIG_FILE).is_file():
            adapter = {name: (directory / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
        if (directory / READER_DIR / CONFIG_FILE).is_file():
            reader = {
                name: (directory / READER_DIR / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)
            }
        return cls(
            base,
            tensors.get("summary_embeds"),
            raw["segment_len"],
            raw["accumulate"],
            adapter,
            tensors.get("output_scale"),
            raw["compressor_id"],
            reader,
            raw.get("summary_form", "embeddings"),
            raw["k"] if salient else None,
        )

    @classmethod
    def load_autocompressor(
        cls,
        directory: Path | str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        segment_len: int = 1536,
    ) -> Compressor:
        """Load a princeton-nlp AutoCompressor checkpoint: HF Llama weights plus ``embed_summary.weight``
        [k, D], ``summary_length`` (k) and ``accumulate_summary`` in config.json. It runs on its own weights
        (its base is the checkpoint itself). ``segment_len`` defaults to the paper's 1536 unless the config
        names one (``segment_length``).

        Raises:
            NotFound: not a checkpoint dir. FailedPrecondition: no summary embeddings / summary_length.
        """
        from transformers import AutoTokenizer

        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise NotFound(f"{directory} has no config.json")
        raw = json.loads((directory / "config.json").read_text())
        state = read_state_dict(directory)
        summary = state.pop("embed_summary.weight", None)
        if summary is None or "summary_length" not in raw:
            raise FailedPrecondition(f"{directory} is not an AutoCompressor (embed_summary / summary_length)")
        if summary.shape[0] != raw["summary_length"]:
            raise FailedPrecondition(
                f"embed_summary has {summary.shape[0]} rows, summary_length {raw['summary_length']}"
            )
        device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        config = LlamaConfig.from_hf(raw)
        model = build_llama(config, state, dtype, device)
        tokenizer = (
            AutoTokenizer.from_pretrained(directory)
            if (directory / "tokenizer_config.json").is_file()
            else None
        )
        base = LoadedModel(model, tokenizer, config, model_id_for(str(directory.resolve())), directory)
        segment = int(raw.get("segment_length", segment_len))
        return cls(base, summary, segment, bool(raw.get("accumulate_summary", True)))


def load_compressor(
    spec: str,
    base: LoadedModel,
    cache_dir: Path | None = None,
    store: ObjectStore | None = None,
) -> Compressor:
    """A compressor from a spec: "default" (shipped for the base model), a directory, or an s3:// prefix.

    A directory holds either our format (compressor.json) or a princeton-nlp AutoCompressor checkpoint.

    Raises:
        FailedPrecondition: no compressor is shipped for this base model, or widths differ.
        NotFound / InvalidArgument: the spec names nothing usable.
    """
    if spec == "default":
        directory = SHIPPED / base.model_id
        if not (directory / CONFIG_NAME).is_file():
            raise FailedPrecondition(
                f"no compressor is shipped for base model {base.model_id!r}; train one "
                "(`lloco pretrain-compressor`) and pass its directory or s3:// prefix"
            )
        return Compressor.load(directory, base)
    if spec.startswith("s3://"):
        if cache_dir is None:
            raise InvalidArgument("an s3:// compressor spec needs a cache_dir")
        directory = download_prefix(spec, Path(cache_dir), store)
    else:
        directory = Path(spec).expanduser()
    if (directory / CONFIG_NAME).is_file():
        return Compressor.load(directory, base)
    if (directory / "config.json").is_file():
        compressor = Compressor.load_autocompressor(directory, base.model.device, base.model.dtype)
        if compressor.base.config.dim != base.config.dim:
            raise FailedPrecondition(
                f"AutoCompressor width {compressor.base.config.dim} differs from the decoder's {base.config.dim}"
            )
        return compressor
    raise NotFound(f"compressor spec {spec!r}: no {CONFIG_NAME} or AutoCompressor config.json in {directory}")
