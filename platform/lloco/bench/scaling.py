"""Scaling across accelerators: compression with 1 vs N compressor actors, finetuning 1 vs 2 tenants at once.

    python -m lloco.bench.scaling --out DIR              # GPU host: LLaMA-2-7B geometry, N = all its GPUs
    python -m lloco.bench.scaling --out DIR --gpus 1     # one GPU: the "N" runs share it (0.5 GPU each)
    python -m lloco.bench.scaling --out DIR --tiny       # CPU: the tiny model, N compressor actors on local Ray

One run, same documents and settings on both sides of each ratio:
- compression: the documents are ingested twice (tenants ``one`` and ``many``); ``run_compress_job``
  compresses ``one`` with a pool of 1 compressor actor and ``many`` with N actors (one GPU each; with a
  single GPU, 2 actors at 0.5 GPU; with ``--tiny``, N actors of 0.5 CPU). Figures: the job's steady
  tokens/s (start-up and the first actor call to end left out) and its wall tokens/s (start-up
  included). Steady counts the other N-1 actors' first calls inside its window, which favours the N run
  by about (C-1)/(C-N) for C equal actor calls when the actors start together; the table prints it.
- finetuning: ``run_finetune_job`` trains tenant ``one`` alone, then ``one`` and ``many`` together (one
  GPU each; 0.5 GPU each on a single GPU; 0.5 CPU each with ``--tiny``), each on the same dataset of
  ``--rows`` questions over its compressed contexts, for ``--train-steps`` steps without held-out rows
  or intermediate checkpoints. A run's aggregate samples/s is its samples over the span from the first
  tenant's first step to the last tenant's last step (from each adapter's train record: ``finished_at``
  minus the summed step ``seconds``), so tenants that do not overlap gain nothing; the overlap of the two
  windows is reported. Each adapter must come out published and current in its tenant's registry.

Weights: as ``lloco.bench.compress`` (random bf16 LLaMA-2-7B shapes, written once under --out, the tiny
tokenizer); ``--tiny`` uses the tiny random test model. Storage: a SeaweedFS ``EmbeddedS3`` under
``--out/s3``; on the GPU host carry the ``weed`` binary as ``lloco.bench.compress`` describes. Ray: the
calling process's Ray if it has one, else the cluster at ``RAY_ADDRESS``, else a local instance with the
host's CPUs (at least 4 logical) and N GPUs. Results: ``scaling.json`` and ``scaling.md`` under --out;
the table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
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
from lloco.config import CompressSettings, FinetuneSettings, ModelSettings, Settings
from lloco.errors import Internal, InvalidArgument
from lloco.logs import get_logger
from lloco.registry import DatasetRow, Registry, Tenants
from lloco.storage import EmbeddedS3, ObjectStore

log = get_logger(__name__)

GOAL_RATIO = 1.8
ACTOR_CPUS = 0.5  # compressor actors and train workers: fractional, or Ray deadlocks on small hosts
MIN_RAY_CPUS = 4  # logical CPUs of the local Ray: room for N fractional actors plus the pipeline's tasks
TENANT_ONE, TENANT_MANY = "one", "many"
DATASET = "bench"
ADAPTER_SOLO, ADAPTER_PAIR = "solo", "pair"


@dataclass(frozen=True)
class Sizes:
    """How much work each side of a ratio does."""

    docs: int
    doc_tokens: int
    batch_size: int  # documents per compressor actor call
    rows: int  # dataset rows per tenant
    train_batch: int
    train_steps: int


GPU_SIZES = Sizes(docs=256, doc_tokens=4608, batch_size=8, rows=64, train_batch=8, train_steps=64)
TINY_SIZES = Sizes(docs=64, doc_tokens=256, batch_size=2, rows=32, train_batch=4, train_steps=300)


@dataclass(frozen=True)
class Placement:
    """Resources of the 1-side and the N-side runs."""

    accelerator: str  # "gpu" or "cpu"
    gpus: int  # GPUs given to Ray (0 on CPU)
    actors: int  # compressor actors of the N-side run
    gpus_per_actor: float  # N-side; the 1-side actor and the lone tenant get a whole GPU
    gpus_per_tenant: float  # each of the two concurrent tenants

    @property
    def single_gpus(self) -> float:
        return 1.0 if self.accelerator == "gpu" else 0.0


def plan_placement(tiny: bool, n: int) -> Placement:
    """N GPUs: N actors and two tenants of one GPU each; one GPU: halves of it; CPU: N (at least 2) actors."""
    if n < 1:
        raise InvalidArgument(f"--gpus must be at least 1, got {n}")
    if tiny:
        return Placement("cpu", 0, max(n, 2), 0.0, 0.0)
    if n == 1:
        return Placement("gpu", 1, 2, 0.5, 0.5)
    return Placement("gpu", n, n, 1.0, 1.0)


@dataclass(frozen=True)
class Bench:
    """What both measurements share: the model on disk, the store, the settings all runs start from."""

    out: Path
    model_dir: Path
    compressor_dir: Path
    geometry: Geometry
    store: ObjectStore
    texts: list[str]

    def settings(self, compress: CompressSettings, finetune: FinetuneSettings) -> Settings:
        return Settings(
            data_dir=self.out / "data",
            store=self.store.settings,
            model=ModelSettings(
                base_model=str(self.model_dir),
                compressor=str(self.compressor_dir),
                cache_dir=self.out / "cache",
            ),
            compress=compress,
            finetune=finetune,
        )


def prepare_model(out: Path, tiny: bool, sizes: Sizes) -> tuple[Path, Path, Geometry, list[str]]:
    """The base model dir, a seeded fresh compressor saved beside it, its geometry, the documents' texts."""
    from lloco.model import Compressor, load_model, tiny_llama_dir

    if tiny:
        model_dir = tiny_llama_dir(out / "tiny-llama", seed=0)
        geometry = Geometry.of_checkpoint(model_dir, "tiny (random fp32)", segment_len=64, k=4)
        device = torch.device("cpu")
    else:
        device = torch.device("cuda")
        geometry = LLAMA2_7B
        model_dir = write_random_llama(out / "llama-2-7b-random", geometry, device)
    base = load_model(str(model_dir), out / "cache", device=device)
    compressor = Compressor.from_base(base, geometry.segment_len, geometry.k, accumulate=True, seed=0)
    compressor_dir = compressor.save(out / "compressor")
    texts = [document_text(i, base.tokenizer, sizes.doc_tokens) for i in range(sizes.docs)]
    del base, compressor
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model_dir, compressor_dir, geometry, texts


def doc_id(index: int) -> str:
    return f"doc-{index:05d}"


def dataset_rows(texts: list[str], rows: int) -> list[DatasetRow]:
    """``rows`` questions over the documents (cycling through them); answers are words of the document."""
    picks = [i % len(texts) for i in range(rows)]
    return [DatasetRow((doc_id(i),), f"Which word opens document {i}?", texts[i].split()[0]) for i in picks]


def populate(store: ObjectStore, texts: list[str], rows: int) -> None:
    """Both tenants get the same documents and the same dataset."""
    from lloco.finetune.datasets import rows_to_jsonl

    for tenant in (TENANT_ONE, TENANT_MANY):
        Tenants(store).create(tenant)
        registry = Registry(store, tenant)
        for i, text in enumerate(texts):
            data = text.encode()
            registry.ingest_document(doc_id(i), data, len(data))
        registry.put_dataset(DATASET, rows_to_jsonl(dataset_rows(texts, rows)))


def measure_compression(
    bench: Bench, tenant: str, actors: int, gpus_per_actor: float, sizes: Sizes
) -> dict[str, Any]:
    """Compress every document of ``tenant`` with a pool of ``actors`` compressor actors."""
    from lloco.compress import run_compress_job

    compress = CompressSettings(
        batch_size=sizes.batch_size,
        pool_size=actors,
        actor_num_gpus=gpus_per_actor,
        actor_num_cpus=ACTOR_CPUS,
    )
    settings = bench.settings(compress, FinetuneSettings())
    summary = run_compress_job(settings, [tenant], bench.out / f"compress-{tenant}.json")
    if summary.failed or summary.compressed != len(bench.texts):
        raise Internal(f"compression of tenant {tenant} did not compress every document: {summary.line()}")
    calls = -(-summary.compressed // sizes.batch_size)
    log.info("compression measured", tenant=tenant, actors=actors, summary=summary.line())
    return {
        "tenant": tenant,
        "actors": actors,
        "gpus_per_actor": gpus_per_actor,
        "cpus_per_actor": ACTOR_CPUS,
        "documents": summary.compressed,
        "tokens": summary.tokens,
        "actor_calls": calls,
        "seconds": summary.seconds,
        "tokens_per_s": summary.tokens_per_s,
        "steady_tokens_per_s": summary.steady_tokens_per_s,
    }


def measure_finetune(
    bench: Bench, tenants: list[str], adapter: str, gpus_per_tenant: float, sizes: Sizes
) -> dict[str, Any]:
    """Finetune ``tenants`` concurrently in one job; per-tenant and aggregate samples/s, published versions."""
    from lloco.finetune import run_finetune_job
    from lloco.finetune.train import TrainOptions

    finetune = FinetuneSettings(
        batch_size=sizes.train_batch,
        grad_accum=1,
        num_workers=1,
        gpus_per_worker=gpus_per_tenant,
        cpus_per_worker=ACTOR_CPUS,
    )
    options = TrainOptions(
        eval_fraction=0.0, max_steps=sizes.train_steps, checkpoint_every_steps=sizes.train_steps, seed=0
    )
    job_id = f"scaling-{adapter}-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    results = run_finetune_job(
        bench.settings(CompressSettings(), finetune), tenants, DATASET, adapter, job_id, options
    )
    wall = time.perf_counter() - started
    log.info("finetune measured", job_id=job_id, tenants=tenants, wall_s=round(wall, 1))
    failed = {tenant: result.error for tenant, result in results.items() if not result.ok}
    if failed:
        raise Internal(f"finetune job {job_id} failed for {failed}")
    per_tenant: dict[str, dict[str, Any]] = {}
    for tenant, result in results.items():
        record = result.metrics
        if record["train_rows"] != sizes.rows or record["steps"] != sizes.train_steps:
            raise Internal(f"tenant {tenant} trained {record['steps']} steps on {record['train_rows']} rows")
        samples = record["steps"] * record["batch_size"] * record["grad_accum"] * record["workers"]
        per_tenant[tenant] = {
            "version": result.version,
            "samples": samples,
            "train_seconds": record["seconds"],
            "samples_per_s": samples / record["seconds"],
            "train_start": record["finished_at"] - record["seconds"],
            "train_end": record["finished_at"],
            "published": published(bench.store, tenant, adapter, result.version),
        }
    windows = [(entry["train_start"], entry["train_end"]) for entry in per_tenant.values()]
    span = max(end for _, end in windows) - min(start for start, _ in windows)
    common = min(end for _, end in windows) - max(start for start, _ in windows)
    samples = sum(entry["samples"] for entry in per_tenant.values())
    return {
        "job_id": job_id,
        "adapter": adapter,
        "tenants": per_tenant,
        "gpus_per_tenant": gpus_per_tenant,
        "cpus_per_tenant": ACTOR_CPUS,
        "samples": samples,
        "train_span_s": span,
        "overlap": max(0.0, common) / span if span > 0 else 1.0,
        "samples_per_s": samples / span,
        "wall_s": wall,
        "wall_samples_per_s": samples / wall,
    }


def published(store: ObjectStore, tenant: str, adapter: str, version: str | None) -> dict[str, Any]:
    """The adapter as the tenant's registry has it: the job's version must be current and its files intact."""
    registry = Registry(store, tenant)
    current = registry.get_adapter(adapter)
    if version is None or current.version != version:
        raise Internal(
            f"tenant {tenant}: adapter {adapter!r} current is {current.version}, the job made {version}"
        )
    files = registry.read_adapter_files(adapter, version)  # checked against the manifest's sha256s
    return {
        "version": current.version,
        "current": current.current,
        "rank": current.rank,
        "files": sorted(files),
    }


def ratio(n_side: float | None, one_side: float | None) -> float | None:
    return None if n_side is None or one_side is None or one_side <= 0 else n_side / one_side


def connect_ray(placement: Placement) -> bool:
    """Use this process's Ray, else join ``RAY_ADDRESS``, else start a local Ray sized for ``placement``.

    Returns True when the Ray instance was started (or joined) here, so it is shut down at the end.
    """
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(configure_logging=False)
        return True
    ray.init(
        address="local",
        num_cpus=max(MIN_RAY_CPUS, os.cpu_count() or 1),
        num_gpus=placement.gpus,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
    )
    return True


def host_info(load_at_start: float) -> dict[str, Any]:
    """The machine, and how busy it was (1-minute load average at the start and the end of the run)."""
    import ray

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "cpu_cores": os.cpu_count(),
        "load_average": {"start": load_at_start, "end": os.getloadavg()[0]},
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "gpus": gpus,
        "ray_resources": {name: ray.cluster_resources().get(name, 0.0) for name in ("CPU", "GPU")},
    }


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Directory for results, weights and S3 data.")
    parser.add_argument("--tiny", action="store_true", help="The tiny test model on CPU actors.")
    parser.add_argument("--gpus", type=int, help="N: GPUs to use (default all); with --tiny, CPU actors (2).")
    defaults = f"GPU {GPU_SIZES}; tiny {TINY_SIZES}"
    parser.add_argument("--docs", type=int, help=f"Documents per tenant. Defaults: {defaults}.")
    parser.add_argument("--doc-tokens", type=int, help="Tokens per document.")
    parser.add_argument("--batch-size", type=int, help="Documents per compressor actor call.")
    parser.add_argument("--rows", type=int, help="Dataset rows per tenant (a multiple of --train-batch).")
    parser.add_argument("--train-batch", type=int, help="Samples per finetune step.")
    parser.add_argument("--train-steps", type=int, help="Finetune steps per tenant.")
    return parser.parse_args(argv)


def choose_sizes(args: argparse.Namespace) -> Sizes:
    defaults = TINY_SIZES if args.tiny else GPU_SIZES
    chosen = {name: getattr(args, name) for name in asdict(defaults)}
    sizes = Sizes(**{name: value or getattr(defaults, name) for name, value in chosen.items()})
    if sizes.rows % sizes.train_batch:
        raise InvalidArgument(f"--rows {sizes.rows} must be a multiple of --train-batch {sizes.train_batch}")
    if min(asdict(sizes).values()) < 1:
        raise InvalidArgument(f"sizes must be positive: {sizes}")
    return sizes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("the 7B geometry needs a GPU; use --tiny on CPU")
    available = torch.cuda.device_count()
    n = args.gpus or (2 if args.tiny else available)
    if not args.tiny and n > available:
        raise SystemExit(f"--gpus {n}: this host has {available} GPUs")
    placement = plan_placement(args.tiny, n)
    sizes = choose_sizes(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(
        ["python -m lloco.bench.scaling", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]
    )
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")

    import ray

    load_at_start = os.getloadavg()[0]
    model_dir, compressor_dir, geometry, texts = prepare_model(out, args.tiny, sizes)
    started_ray = connect_ray(placement)
    try:
        with EmbeddedS3(out / "s3") as server:
            store = ObjectStore(server.store_settings(bucket=f"scaling-{uuid.uuid4().hex[:12]}"))
            store.ensure_bucket()
            populate(store, texts, sizes.rows)
            bench = Bench(out, model_dir, compressor_dir, geometry, store, texts)
            one = measure_compression(bench, TENANT_ONE, 1, placement.single_gpus, sizes)
            many = measure_compression(bench, TENANT_MANY, placement.actors, placement.gpus_per_actor, sizes)
            solo = measure_finetune(bench, [TENANT_ONE], ADAPTER_SOLO, placement.single_gpus, sizes)
            pair = measure_finetune(
                bench, [TENANT_ONE, TENANT_MANY], ADAPTER_PAIR, placement.gpus_per_tenant, sizes
            )
            host = host_info(load_at_start)
    finally:
        if started_ray:
            ray.shutdown()

    calls = many["actor_calls"]
    result = {
        "command": command,
        "date": date,
        "host": host,
        "accelerator": placement.accelerator,
        "placement": asdict(placement),
        "geometry": asdict(geometry),
        "sizes": asdict(sizes),
        "store": {"data_dir": str(out / "s3"), "bucket": store.bucket},
        "goal_ratio": GOAL_RATIO,
        "compression": {
            "one": one,
            "many": many,
            "ratio_steady": ratio(many["steady_tokens_per_s"], one["steady_tokens_per_s"]),
            "ratio_wall": ratio(many["tokens_per_s"], one["tokens_per_s"]),
            "steady_bias_estimate": (calls - 1) / (calls - placement.actors)
            if calls > placement.actors
            else None,
        },
        "finetune": {
            "solo": solo,
            "pair": pair,
            "ratio": ratio(pair["samples_per_s"], solo["samples_per_s"]),
            "ratio_wall": ratio(pair["wall_samples_per_s"], solo["wall_samples_per_s"]),
        },
    }
    table = markdown_table(result)
    (out / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "scaling.md").write_text(table + "\n")
    print(table)
    return result


def markdown_table(result: dict[str, Any]) -> str:
    """The two comparisons as markdown, with what ran where and the command."""
    host, placement, sizes = result["host"], result["placement"], result["sizes"]
    compression, finetune = result["compression"], result["finetune"]
    one, many, solo, pair = compression["one"], compression["many"], finetune["solo"], finetune["pair"]
    gpu = placement["accelerator"] == "gpu"

    def number(value: float | None, spec: str = ",.1f") -> str:
        return "n/a" if value is None else format(value, spec)

    def times(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}x"

    def resources(gpus: float) -> str:
        return f"{gpus:g} GPU" if gpu else f"{ACTOR_CPUS:g} CPU"

    def versions(run: dict[str, Any]) -> str:
        return ", ".join(f"{t} {e['published']['version']}" for t, e in run["tenants"].items())

    def per_tenant(run: dict[str, Any]) -> str:
        return ", ".join(f"{t} {number(e['samples_per_s'])}" for t, e in run["tenants"].items())

    if gpu:
        where = f"{len(host['gpus'])} x {host['gpus'][0]}, {placement['gpus']} used; {host['cpu_cores']} CPU cores"
    else:
        where = (
            f"CPU only: {host['cpu_cores']} cores ({host['cpu']}), Ray with {host['ray_resources']['CPU']:g} "
            "logical CPUs; both sides of each ratio run on these same cores"
        )
    load = host["load_average"]
    where += f"; load average {load['start']:.1f} at the start, {load['end']:.1f} at the end"
    bias = compression["steady_bias_estimate"]
    goal = result["goal_ratio"]
    lines = [
        f"Scaling, {result['geometry']['name']}, {result['date']}",
        f"Host: {where}. torch {host['torch']}, ray {host['ray']}.",
        "",
        f"Compression through the Ray Data job: {sizes['docs']} documents x {sizes['doc_tokens']} tokens, "
        f"S={result['geometry']['segment_len']}, k={result['geometry']['k']}, {sizes['batch_size']} documents "
        "per actor call.",
        "",
        "| compressor actors | resources per actor | tokens | steady tokens/s | wall tokens/s (start-up included) |",
        "|---:|---|---:|---:|---:|",
        f"| 1 | {resources(one['gpus_per_actor'])} | {one['tokens']:,} | "
        f"{number(one['steady_tokens_per_s'], ',.0f')} | {number(one['tokens_per_s'], ',.0f')} |",
        f"| {many['actors']} | {resources(many['gpus_per_actor'])} | {many['tokens']:,} | "
        f"{number(many['steady_tokens_per_s'], ',.0f')} | {number(many['tokens_per_s'], ',.0f')} |",
        f"| {many['actors']} vs 1 | | | **{times(compression['ratio_steady'])}** | "
        f"{times(compression['ratio_wall'])} |",
        "",
        f"Steady counts {many['actors'] - 1} more first call(s) of the {many['actors']}-actor run in its window: "
        f"its figure is high by about {times(bias)} ({many['actor_calls']} calls).",
        "",
        f"Finetuning ({sizes['rows']} rows per tenant over compressed contexts, batch {sizes['train_batch']}, "
        f"{sizes['train_steps']} steps per tenant, one Ray Train trainer per tenant):",
        "",
        "| tenants at once | resources per tenant | samples | samples/s (training span) | samples/s of each | "
        "overlap | samples/s (wall, start-up included) | adapters published |",
        "|---:|---|---:|---:|---|---:|---:|---|",
        f"| 1 | {resources(solo['gpus_per_tenant'])} | {solo['samples']} | "
        f"{number(solo['samples_per_s'])} | {per_tenant(solo)} | | {number(solo['wall_samples_per_s'])} | "
        f"{versions(solo)} |",
        f"| 2 | {resources(pair['gpus_per_tenant'])} | {pair['samples']} | {number(pair['samples_per_s'])} | "
        f"{per_tenant(pair)} | {pair['overlap']:.0%} | {number(pair['wall_samples_per_s'])} | {versions(pair)} |",
        f"| 2 vs 1 | | | **{times(finetune['ratio'])}** | | | {times(finetune['ratio_wall'])} | |",
        "",
        f"Goal (2 GPUs, one per actor or tenant): both bold ratios >= {goal:g}x. " + verdict(result),
        f"Command: `{result['command']}`",
    ]
    return "\n".join(lines)


def verdict(result: dict[str, Any]) -> str:
    """Whether this run can speak to the goal, and if so whether it met it."""
    placement = result["placement"]
    if placement["accelerator"] != "gpu":
        return "This CPU run checks the scripts and the Ray wiring; it does not test the goal."
    if placement["gpus_per_actor"] < 1:
        return "On one GPU the N-side workers share it, so this run does not test the goal."
    met = [
        value is not None and value >= result["goal_ratio"]
        for value in (result["compression"]["ratio_steady"], result["finetune"]["ratio"])
    ]
    if all(met):
        return "Met."
    words = ["met" if ok else "not met" for ok in met]
    return f"Not met (compression {words[0]}, finetune {words[1]})."


if __name__ == "__main__":
    main()
