"""`lloco demo`: the whole platform end to end on one machine, through the code paths a cluster uses.

Embedded S3 + local Ray + the Serve app on loopback; two tenants ingest SQuAD articles over gRPC, the Ray Data
job compresses them, Ray Train finetunes both tenants' adapters concurrently, and held-out questions are asked
over gRPC as each tenant. The data is a small SQuAD subset shipped in ``demo_data/`` (CC BY-SA 4.0, see NOTICE).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer

from lloco.config import Settings
from lloco.errors import FailedPrecondition, LlocoError
from lloco.terminal import VERBOSE_HELP, finetune_bars, progress, quiet_ray

DATASET = "demo-train"
ADAPTER = "demo"
MIN_FREE_BYTES = 3 * 2**30


@dataclass(frozen=True)
class DemoOptions:
    """How much the demo does; the defaults finish in minutes on two CPU cores."""

    tenants: tuple[str, ...] = ("acme", "globex")
    articles_per_tenant: int = 2
    train_questions_per_article: int = 24
    held_out_per_article: int = 2
    max_new_tokens: int = 24
    train_steps: int = 16
    learning_rate: float = 2e-4
    seed: int = 0


@dataclass(frozen=True)
class Article:
    doc_id: str
    title: str
    text: str
    qas: tuple[tuple[str, tuple[str, ...]], ...]  # (question, gold answers)


@dataclass(frozen=True)
class AnswerRow:
    tenant: str
    question: str
    answer: str
    gold: str
    f1: float
    context_tokens: int
    document_tokens: int
    latency_s: float
    adapter_version: str


@dataclass
class DemoReport:
    """What every stage produced; the CI test checks each of them."""

    documents: dict[str, list[str]] = field(default_factory=dict)
    contexts: dict[str, int] = field(default_factory=dict)
    adapters: dict[str, str] = field(default_factory=dict)
    train_steps: dict[str, int] = field(default_factory=dict)  # the last step each trainer reported
    answers: list[AnswerRow] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    compress_summary: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_f1(self) -> float:
        return sum(row.f1 for row in self.answers) / max(1, len(self.answers))


def load_articles() -> dict[str, list[Article]]:
    """The shipped SQuAD subset: tenant -> its articles."""
    raw = json.loads(resources.files("lloco").joinpath("demo_data/squad_demo.json").read_text())
    return {
        tenant: [
            Article(
                a["doc_id"],
                a["title"],
                a["text"],
                tuple((q["question"], tuple(q["answers"])) for q in a["qas"]),
            )
            for a in articles
        ]
        for tenant, articles in raw["tenants"].items()
    }


def split_questions(
    article: Article, options: DemoOptions
) -> tuple[list[tuple[str, tuple[str, ...]]], list[tuple[str, tuple[str, ...]]]]:
    """A seeded split of an article's questions into (train, held out); held-out ones are never trained on."""
    questions = list(article.qas)
    random.Random(f"{options.seed}:{article.doc_id}").shuffle(questions)
    held_out = questions[: options.held_out_per_article]
    train = questions[options.held_out_per_article :][: options.train_questions_per_article]
    return train, held_out


def dataset_jsonl(articles: list[Article], options: DemoOptions) -> bytes:
    rows = [
        {"doc_ids": [article.doc_id], "question": question, "answer": answers[0]}
        for article in articles
        for question, answers in split_questions(article, options)[0]
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


Echo = Callable[[str], None]


@contextmanager
def _stage(name: str, number: int, total: int, report: DemoReport, echo: Echo) -> Iterator[None]:
    echo(f"[{number}/{total}] {name} ...")
    started = time.perf_counter()
    try:
        yield
    except LlocoError as error:
        raise type(error)(f"stage '{name}' failed: {error}") from error
    except Exception as error:
        raise FailedPrecondition(f"stage '{name}' failed: {type(error).__name__}: {error}") from error
    seconds = time.perf_counter() - started
    report.stage_seconds[name] = round(seconds, 2)
    echo(f"[{number}/{total}] {name}: done in {seconds:.1f} s")


def check_disk(data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(data_dir).free
    if free < MIN_FREE_BYTES:
        raise FailedPrecondition(
            f"only {free / 2**30:.1f} GiB free under {data_dir}; the demo needs {MIN_FREE_BYTES / 2**30:.0f} GiB "
            "(model cache, S3 data): free some space or pass --data-dir"
        )


def demo_settings(settings: Settings, options: DemoOptions) -> Settings:
    """The demo's settings: every document goes through the Ray Data job; a short training schedule."""
    return settings.model_copy(
        update={
            "limits": settings.limits.model_copy(update={"online_compress_max_tokens": 0}),
            "engine": settings.engine.model_copy(update={"max_batch_size": 8, "max_seq_len": 2048}),
            # The engine idles while the job runs: let the one compressor actor use every core.
            "compress": settings.compress.model_copy(update={"cpu_threads": os.cpu_count()}),
            "finetune": settings.finetune.model_copy(
                update={"learning_rate": options.learning_rate, "batch_size": 4, "warmup_ratio": 0.1}
            ),
        }
    )


def run_demo(
    settings: Settings,
    options: DemoOptions = DemoOptions(),
    echo: Echo = print,
    keep_running: Callable[[Any, dict[str, str]], None] | None = None,
) -> DemoReport:
    """Run every stage; raise a LlocoError naming the stage that failed, with nothing left running.

    ``keep_running(stack, keys)`` is called with the stack still up, when given (``--keep-running``).
    """
    from lloco.client import LlocoClient
    from lloco.compress import run_compress_job
    from lloco.eval.metrics import f1_score
    from lloco.finetune.job import run_finetune_job
    from lloco.finetune.train import TrainOptions
    from lloco.model import load_model
    from lloco.serve.local import EmbeddedStack

    settings = demo_settings(settings, options)
    check_disk(settings.data_dir)
    articles = load_articles()
    missing = [t for t in options.tenants if t not in articles]
    if missing:
        raise FailedPrecondition(f"the shipped demo data has no tenant {missing}; it has {sorted(articles)}")
    chosen = {tenant: articles[tenant][: options.articles_per_tenant] for tenant in options.tenants}
    report = DemoReport()
    total = 7

    with _stage("fetch the base model (cached after the first run)", 1, total, report, echo):
        load_model(settings.model.base_model, settings.model.cache_dir)

    with _stage("start embedded S3, local Ray and the Serve app", 2, total, report, echo):
        # Ray's CPUs are scheduling tokens: the engine replica holds one, so count at least four to let
        # the compressor actor and both tenants' trainers run beside it.
        stack = EmbeddedStack(settings, jobs=False, num_cpus=max(4, os.cpu_count() or 1))
        stack.start()
    try:
        keys: dict[str, str] = {}
        with _stage("create tenants and ingest documents over gRPC", 3, total, report, echo):
            for tenant in options.tenants:
                keys[tenant] = stack.api_key(tenant)  # a rerun reuses the tenants of the first run
                with LlocoClient(stack.address, keys[tenant]) as client:
                    for article in chosen[tenant]:
                        reply = client.ingest(article.doc_id, article.text)
                        echo(f"    {tenant}: {article.doc_id} ({reply.document.tokens} tokens)")
                    report.documents[tenant] = [d.name.rsplit("/", 1)[-1] for d in client.list_documents()]

        with _stage("compress documents with the Ray Data job", 4, total, report, echo), progress() as bars:
            task = bars.add_task("documents", total=None, detail="")
            summary = run_compress_job(
                stack.settings,
                list(options.tenants),
                on_progress=lambda now: bars.update(task, total=now.documents, completed=now.finished),
            )
            if summary.failed:
                raise FailedPrecondition(f"{summary.failed} documents failed: {summary.failures}")
            report.compress_summary = summary.to_json()
            report.contexts = _count_contexts(stack, options.tenants, summary.compressor_id)
            echo(f"    {summary.line()}")

        with _stage("finetune both tenants' adapters concurrently with Ray Train", 5, total, report, echo):
            for tenant in options.tenants:
                with LlocoClient(stack.address, keys[tenant]) as client:
                    client.upload_dataset(DATASET, dataset_jsonl(chosen[tenant], options))
            with progress() as bars:
                show_step = finetune_bars(bars, list(options.tenants))

                def on_step(tenant: str, metrics: dict[str, Any]) -> None:
                    report.train_steps[tenant] = metrics["step"]
                    show_step(tenant, metrics)

                results = run_finetune_job(
                    stack.settings,
                    list(options.tenants),
                    DATASET,
                    ADAPTER,
                    options=TrainOptions(max_steps=options.train_steps, eval_fraction=0.1, seed=options.seed),
                    on_step=on_step,
                )
            failed = {t: r.error for t, r in results.items() if not r.ok}
            if failed:
                raise FailedPrecondition(f"finetuning failed for {failed}")
            report.adapters = {t: r.version or "" for t, r in results.items()}
            for tenant, result in results.items():
                echo(f"    {tenant}: adapter {ADAPTER} {result.version} ({result.seconds:.0f} s)")

        with _stage("ask held-out questions over gRPC as each tenant", 6, total, report, echo):
            for tenant in options.tenants:
                with LlocoClient(stack.address, keys[tenant]) as client:
                    for article in chosen[tenant]:
                        for question, golds in split_questions(article, options)[1]:
                            started = time.perf_counter()
                            reply = client.query(
                                question,
                                [article.doc_id],
                                adapter=ADAPTER,
                                max_new_tokens=options.max_new_tokens,
                            )
                            answer = reply.answer.strip()
                            report.answers.append(
                                AnswerRow(
                                    tenant=tenant,
                                    question=question,
                                    answer=answer,
                                    gold=golds[0],
                                    f1=f1_score(answer, golds),
                                    context_tokens=reply.stats.context_tokens,
                                    document_tokens=reply.stats.document_tokens,
                                    latency_s=time.perf_counter() - started,
                                    adapter_version=reply.stats.adapter_version.rsplit("/", 1)[-1],
                                )
                            )

        with _stage("report", 7, total, report, echo):
            echo(format_table(report))
        if keep_running is not None:
            keep_running(stack, keys)
    finally:
        stack.stop()
    return report


def _count_contexts(stack: Any, tenants: tuple[str, ...], compressor_id: str) -> dict[str, int]:
    from lloco.registry import Registry

    counts = {}
    for tenant in tenants:
        registry = Registry(stack.store, tenant)
        documents, _ = registry.list_documents(page_size=1000)
        counts[tenant] = sum(
            1 for doc in documents if registry.context_info(doc.doc_id, compressor_id) is not None
        )
    return counts


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(report: DemoReport) -> str:
    """The demo's answer table, in markdown so it reads in a terminal and pastes into docs."""
    lines = [
        "| tenant | question | answer | gold | F1 | context vs document tokens | latency |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for row in report.answers:
        ratio = row.document_tokens / row.context_tokens if row.context_tokens else 0.0
        lines.append(
            f"| {row.tenant} | {_clip(row.question, 48)} | {_clip(row.answer, 40)} | {_clip(row.gold, 24)} | "
            f"{row.f1:.2f} | {row.context_tokens} vs {row.document_tokens} ({ratio:.0f}x) | {row.latency_s:.2f} s |"
        )
    lines.append(f"\nmean F1 {report.mean_f1:.3f} over {len(report.answers)} held-out questions")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        keep_running: Annotated[
            bool, typer.Option("--keep-running", help="Leave the stack up and say how to query it.")
        ] = False,
        config: Annotated[Path | None, typer.Option("--config", help="YAML settings file.")] = None,
        data_dir: Annotated[
            Path | None, typer.Option("--data-dir", help="Local state (S3 data, model cache).")
        ] = None,
        port: Annotated[
            int | None, typer.Option("--port", help="gRPC port (default from settings: 50051).")
        ] = None,
        train_steps: Annotated[
            int, typer.Option(help="Optimizer steps per tenant.")
        ] = DemoOptions.train_steps,
        verbose: Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)] = False,
    ) -> None:
        """Run the whole platform end to end on embedded defaults and print an answer table."""
        overrides: dict[str, Any] = {}
        if data_dir is not None:
            overrides["data_dir"] = data_dir
        settings = Settings.load(config, **overrides)
        if port is not None:
            settings = settings.model_copy(
                update={"serve": settings.serve.model_copy(update={"grpc_port": port})}
            )
        quiet_ray(settings.data_dir, verbose)
        run_demo(
            settings,
            DemoOptions(train_steps=train_steps),
            echo=typer.echo,
            keep_running=_wait_for_interrupt if keep_running else None,
        )


def _wait_for_interrupt(stack: Any, keys: dict[str, str]) -> None:
    print(f"\nlloco is running on {stack.address}. Query it, e.g.:")
    for tenant, key in keys.items():
        print(f"  # as {tenant}:")
        print(
            f"  LLOCO_API_KEY={key} lloco query --target {stack.address} --doc <doc-id> --adapter {ADAPTER} 'question?'"
        )
    print("Press Ctrl-C to stop.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping ...")
