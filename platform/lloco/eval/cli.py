"""`lloco eval`: answer quality per context token, LLoCO against its baselines, as JSON and a markdown table.

Runs in one process (no Ray): ``python -m lloco.eval.cli`` is the same command without the rest of the
``lloco`` CLI.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lloco.finetune.pretrain_cli import command_line
from lloco.terminal import progress, quiet_logs

if TYPE_CHECKING:
    from lloco.model import Compressor

PERPLEXITY_SOURCE = (
    "the passkey test filler without facts: the 10 SQuAD 2.0 dev articles of SQuAD-long's test split, "
    "which the pretraining corpus excludes"
)
PERPLEXITY_NOT_IN_VALIDATION = (
    "measured in test runs only: its held-out prose is test-split text, and it scores the compressor, "
    "which no finetune recipe chosen on the validation split changes"
)


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)


def _compressor_meta(compressor: Compressor) -> dict[str, object]:
    """What a report records of the compressor's geometry beside its id."""
    config = compressor.config
    keys = ("segment_len", "k", "accumulate", "summary_form", "positions")
    return {key: getattr(config, key) for key in keys}


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def evaluate(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option(help="Directory for eval.json, eval.md, predictions.jsonl.")],
    datasets: Annotated[
        str, typer.Option(help="Comma list of squad, qmsum, hotpotqa, passkey ('' for none).")
    ] = "squad,qmsum,hotpotqa,passkey",
    modes: Annotated[
        str,
        typer.Option(
            help="Comma list of none, truncated, full, compressed, lloco, lora_none, full_lora, "
            "lloco_evidence, lora_evidence."
        ),
    ] = "none,truncated,full,compressed,lloco,lora_none,full_lora,lloco_evidence,lora_evidence",
    split: Annotated[
        str,
        typer.Option(
            help="Which questions are asked: test (what is reported) or validation (train-side documents that "
            "no LoRA train row holds: what a finetune recipe is chosen on)."
        ),
    ] = "test",
    limit: Annotated[int | None, typer.Option(help="Test questions per test set (seeded sample).")] = 50,
    train_limit: Annotated[int | None, typer.Option(help="Train rows per dataset for the LoRA modes.")] = 400,
    train_steps: Annotated[int, typer.Option(help="Optimizer steps of each LoRA mode.")] = 100,
    learning_rate: Annotated[
        float | None, typer.Option(help="LoRA learning rate (default: settings).")
    ] = None,
    recipes: Annotated[
        str | None,
        typer.Option(
            help="A finetune sweep instead of --train-steps/--learning-rate: comma list of STEPS:LR:ROWS, e.g. "
            "80:5e-4:240,160:5e-4:240; every LoRA mode trained and scored once per recipe on contexts "
            "compressed once, on the first ROWS of the --train-limit loaded rows.",
        ),
    ] = None,
    train_max_length: Annotated[
        int | None, typer.Option(help="Longest training example (default: window).")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Queries decoded together.")] = 32,
    max_batch_tokens: Annotated[int, typer.Option(help="KV-cache positions per generator.")] = 1 << 20,
    max_document_tokens: Annotated[
        int | None, typer.Option(help="Cut documents to N tokens (small hosts).")
    ] = None,
    compress_batch_size: Annotated[int, typer.Option(help="Segments per compressor forward.")] = 16,
    context_ratio: Annotated[
        int | None,
        typer.Option(
            help="Evidence modes: a query's summary vectors and evidence hold at most its documents' tokens / "
            "N (default: the settings' finetune.context_ratio)."
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Answer length (default: 32 for QA, 160 for QMSum).")
    ] = None,
    hotpot_lengths: Annotated[
        str, typer.Option(help="HotpotQA haystack lengths in tokens.")
    ] = "4096,8192,16384",
    passkey_lengths: Annotated[
        str, typer.Option(help="Passkey (fact recall) document lengths in tokens.")
    ] = "2048,4096,8192",
    perplexity_windows: Annotated[
        int, typer.Option(help="Held-out windows for the perplexity gap closed.")
    ] = 32,
    adapter_init: Annotated[
        Path | None,
        typer.Option(
            help="PEFT adapter directory every LoRA mode starts from (default: the compressor's reader, else "
            "a seeded random init)."
        ),
    ] = None,
    time_budget: Annotated[
        float | None, typer.Option(help="Skip work not started after this many seconds.")
    ] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model spec (default: settings).")] = None,
    compressor: Annotated[str | None, typer.Option(help="Compressor spec (default: settings).")] = None,
    device: Annotated[str | None, typer.Option(help="cuda or cpu (default: cuda when available).")] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="SQuAD/QMSum/HotpotQA files (default: settings qa_data_dir; `lloco data fetch`)."),
    ] = None,
    tenant: Annotated[
        str | None, typer.Option(help="Also evaluate this tenant's dataset (registry).")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="The tenant's test dataset.")] = None,
    train_dataset: Annotated[
        str | None, typer.Option(help="The tenant's train dataset (LoRA modes).")
    ] = None,
    tenant_metric: Annotated[str, typer.Option(help="qa (EM/F1) or summary (ROUGE).")] = "qa",
    seed: Annotated[int, typer.Option(help="Seed of the samples and of training.")] = 0,
    corpus_documents: Annotated[
        int,
        typer.Option(
            help="Corpus mode instead of the datasets: --limit HotpotQA held-out questions against one corpus of "
            "at least N paragraphs (theirs + distractors): retrieval, oracle, no context; corpus.json/md.",
        ),
    ] = 0,
    corpus_top_k: Annotated[
        str,
        typer.Option(help="Segments retrieved per question, one retrieval row each (corpus mode): e.g. 8,4."),
    ] = "8",
    corpus_side: Annotated[
        str,
        typer.Option(
            help="Which side of the HotpotQA file's split asks (corpus mode): held-out (what is reported) or "
            "train (what retrieval settings are chosen on)."
        ),
    ] = "held-out",
    config: Annotated[Path | None, typer.Option(help="Settings YAML (else LLOCO_CONFIG / env).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show lloco's info logs.")] = False,
) -> None:
    """Evaluate the base model and compressor on long-document QA and fact recall in every mode, and the
    compressor's held-out perplexity gap; write JSON and markdown."""
    import torch
    from pydantic import ValidationError

    from lloco.config import Settings
    from lloco.errors import InvalidArgument, invalid_fields
    from lloco.eval import passkey, tasks
    from lloco.eval.adapters import state_digest
    from lloco.eval.report import ablation_markdown, markdown_table, split_notice, write_report
    from lloco.eval.run import (
        ADAPTER_MODE,
        EvalOptions,
        Evaluator,
        check_recipes,
        parse_recipes,
        recipe_label,
    )
    from lloco.finetune.datasets import require_qa_data
    from lloco.model import load_compressor, load_model
    from lloco.model.lora import CONFIG_FILE, WEIGHTS_FILE, peft_geometry, read_peft_files

    started = time.perf_counter()
    quiet_logs(verbose)
    settings = Settings.load(config)
    unknown = set(_csv(datasets)) - set(tasks.DATASETS)
    if unknown:
        raise InvalidArgument(f"unknown datasets {sorted(unknown)}; choose from {', '.join(tasks.DATASETS)}")
    split = tasks.check_split(split)
    if split == "validation" and tenant is not None:
        raise InvalidArgument(
            "--split validation asks the built-in datasets' validation splits; a tenant's datasets have none: "
            "evaluate --tenant with --split test, and hold out rows of your own as the --dataset"
        )
    if split == "validation" and corpus_documents:
        raise InvalidArgument(
            "--split validation is for the datasets; corpus mode picks its questions with --corpus-side "
            "(train: what retrieval settings are chosen on)"
        )
    data_dir = data_dir or settings.qa_data_dir
    require_qa_data(data_dir, _csv(datasets))  # before any model loads
    if tenant is not None and dataset is None:
        raise InvalidArgument("--tenant needs --dataset")
    if tenant_metric not in ("qa", "summary"):
        raise InvalidArgument(f"--tenant-metric must be qa or summary, got {tenant_metric!r}")
    if corpus_documents:
        from lloco.eval.corpus import CORPUS_SIDES, corpus_modes

        if corpus_side not in CORPUS_SIDES:
            raise InvalidArgument(
                f"--corpus-side must be one of {', '.join(CORPUS_SIDES)}, got {corpus_side!r}"
            )
        try:
            top_ks = [int(value) for value in _csv(corpus_top_k)]
        except ValueError as error:
            raise InvalidArgument(f"--corpus-top-k takes integers, e.g. 8,4: {error}") from error
        corpus_modes(top_ks)  # the values' own checks, before any model loads
    sweep = None
    if recipes is not None:
        if corpus_documents:
            raise InvalidArgument("--recipes trains the LoRA modes; corpus mode trains none")
        # typer's own click does not export ParameterSource: its members' names are the API
        given = [
            name
            for name in ("train_steps", "learning_rate")
            if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"
        ]
        if given:
            flags = " and ".join("--" + name.replace("_", "-") for name in given)
            raise InvalidArgument(f"--recipes gives each recipe its steps and learning rate: drop {flags}")
        sweep = parse_recipes(recipes)
        most = max(recipe.train_rows for recipe in sweep)
        if train_limit is not None and most > train_limit:
            raise InvalidArgument(
                f"--recipes asks up to {most} train rows, but --train-limit loads {train_limit}: raise "
                f"--train-limit to {most} or ask fewer rows"
            )
    try:
        options = EvalOptions(
            modes=tuple(_csv(modes)),
            train_steps=train_steps,
            learning_rate=learning_rate,
            recipes=sweep,
            train_max_length=train_max_length,
            max_batch=max_batch,
            max_batch_tokens=max_batch_tokens,
            max_document_tokens=max_document_tokens,
            max_new_tokens=max_new_tokens,
            compress_batch_size=compress_batch_size,
            context_ratio=context_ratio,
            perplexity_windows=perplexity_windows,
            time_budget_s=time_budget,
            seed=seed,
        )
    except ValidationError as error:
        raise invalid_fields("eval options", error) from None
    init_files = None
    if adapter_init is not None:
        try:
            init_files = {name: (adapter_init / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
        except OSError as error:
            raise InvalidArgument(
                f"--adapter-init needs {CONFIG_FILE} and {WEIGHTS_FILE}: {error}"
            ) from error
    store = None
    compressor_spec = compressor or settings.model.compressor
    if tenant is not None or compressor_spec.startswith("s3://"):
        from lloco.storage import ObjectStore

        store = ObjectStore(settings.store)
    run_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = load_model(
        base_model or settings.model.base_model,
        settings.model.cache_dir,
        store,
        settings.model.dtype,
        run_device,
    )
    encoder = load_compressor(compressor_spec, base, settings.model.cache_dir, store)

    def count_tokens(text: str) -> int:
        return len(base.tokenizer.encode(text, add_special_tokens=False))

    if corpus_documents:
        from lloco.eval.corpus import hotpotqa_corpus, run_corpus, write_corpus_report

        corpus = hotpotqa_corpus(data_dir, limit, corpus_documents, seed, corpus_side)
        results = run_corpus(
            Evaluator(base, encoder, settings.finetune, options, init_files),
            corpus,
            top_ks,
            max_new_tokens or 32,
        )
        meta = {
            "command": command_line(ctx, "eval"),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "base_model": base.model_id,
            "compressor_id": encoder.compressor_id,
            "compressor": _compressor_meta(encoder),
            "device": torch.cuda.get_device_name(run_device) if run_device.type == "cuda" else "cpu",
            "questions": len(corpus.questions),
            "documents": len(corpus.documents),
            "side": corpus_side,
            "top_k": top_ks,
            "seconds": round(time.perf_counter() - started, 2),
        }
        typer.echo(write_corpus_report(output, results, meta))
        return
    chosen = _csv(datasets)
    suite = []
    if "squad" in chosen:
        suite.append(tasks.squad_long(data_dir, limit, train_limit, seed, split))
    if "qmsum" in chosen:
        suite.append(tasks.qmsum(data_dir, limit, train_limit, seed, split))
    if "hotpotqa" in chosen:
        lengths = [int(value) for value in _csv(hotpot_lengths)]
        suite.append(tasks.hotpotqa_long(data_dir, limit, train_limit, count_tokens, lengths, seed, split))
    if "passkey" in chosen:
        lengths = [int(value) for value in _csv(passkey_lengths)]
        suite.append(tasks.passkey(limit, train_limit, count_tokens, lengths, seed, split))
    if tenant is not None:
        from lloco.registry import Registry

        registry = Registry(store, tenant)
        suite.append(tasks.tenant_dataset(registry, dataset, train_dataset, tenant_metric, limit, seed))
    if not suite:
        raise InvalidArgument("nothing to evaluate: name --datasets or a --tenant")
    check_recipes(options.recipes_to_run(), suite)  # before the perplexity and the modes
    if time_budget is not None:  # the budget counts from the command's start, loading included
        options = options.model_copy(
            update={"time_budget_s": max(1e-3, time_budget - (time.perf_counter() - started))}
        )
    evaluator = Evaluator(base, encoder, settings.finetune, options, init_files)
    init_meta = None
    if evaluator.adapter_init is not None:
        targets, rank = peft_geometry(evaluator.adapter_init)
        digest = state_digest(read_peft_files(evaluator.adapter_init)[1])
        source = str(adapter_init) if init_files is not None else "the compressor's reader"
        init_meta = {"source": source, "rank": rank, "targets": list(targets), "sha256": digest}
    meta = {
        "split": split,
        "command": command_line(ctx, "eval"),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_model": base.model_id,
        "compressor_id": encoder.compressor_id,
        "compressor": _compressor_meta(encoder),
        "device": torch.cuda.get_device_name(run_device) if run_device.type == "cuda" else "cpu",
        "options": json.loads(options.model_dump_json()),
        "lora": json.loads(settings.finetune.model_dump_json()),
        "adapter_init": init_meta,
        "test_sets": {test.name: len(test.qaset.rows) for item in suite for test in item.tests},
        "train_rows": {item.name: len(item.train.rows) if item.train else 0 for item in suite},
    }

    def report(results: list) -> dict:
        seconds = round(time.perf_counter() - started, 2)
        return write_report(output, results, {**meta, "costs": evaluator.costs, "seconds": seconds})

    meta["perplexity"] = (
        evaluator.held_out_perplexity(passkey.filler_articles("test"), PERPLEXITY_SOURCE)
        if split == "test"
        else {"skipped": PERPLEXITY_NOT_IN_VALIDATION}
    )
    with progress() as bars:
        trained = sum(mode in ADAPTER_MODE for mode in options.modes)
        per_test_set = len(options.modes) + trained * (len(options.recipes_to_run()) - 1)
        runs = sum(len(item.tests) for item in suite) * per_test_set
        task = bars.add_task("eval", total=runs, detail="(test set, mode, recipe) runs")

        def report_and_show(results: list) -> dict:
            last = results[-1] if results else None
            if last is not None:
                recipe = "" if last.recipe is None else f" ({recipe_label(last.recipe)})"
                detail = f"{last.test_set} {last.mode}{recipe}: {last.skipped or f'{last.queries} questions'}"
                bars.update(task, completed=len(results), detail=detail)
            return report(results)

        results = evaluator.run(suite, on_result=report_and_show)
    final = report(results)
    typer.echo(
        split_notice(split)
        + "\n\n"
        + markdown_table(results)
        + "\n\n"
        + ablation_markdown(final["ablations"], meta["perplexity"])
    )


if __name__ == "__main__":
    _app = typer.Typer(add_completion=False)
    register(_app)
    _app()
