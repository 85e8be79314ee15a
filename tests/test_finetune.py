"""Per-tenant LoRA finetuning: data tensors, learning, the concurrent Ray job, resume after a kill, PEFT output.

Everything real: SeaweedFS S3, local Ray Train, a tiny random Llama whose contexts come from a seeded
``Compressor.from_base`` and are stored (and read back) through the registry.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lloco.config import FinetuneSettings, ModelSettings, Settings
from lloco.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from lloco.finetune.data import ExampleBuilder, collate
from lloco.finetune.datasets import rows_to_jsonl
from lloco.finetune.options import TrainOptions
from lloco.finetune.steps import apply_gradients, train_step
from lloco.finetune.train import LoraFinetune
from lloco.jobs import JobRecord, Jobs, settings_env
from lloco.model import Compressor, LoraSlots, TrainableLora, chat_prompt, load_model, tiny_llama_dir
from lloco.model.kv_summary import kv_width
from lloco.registry import DatasetRow, Registry, Tenants
from lloco.registry.evidence import Evidence
from lloco.storage import ObjectStore, keys
from safetensors.torch import load as load_safetensors_bytes

FACTS = [
    ("paris", "france"),
    ("london", "england"),
    ("rome", "italy"),
    ("berlin", "germany"),
    ("madrid", "spain"),
]


def caps_rows(prefix: str = "doc") -> list[DatasetRow]:
    rows = []
    for i, (city, country) in enumerate(FACTS):
        rows.append(DatasetRow((f"{prefix}{i}",), f"What country is {city} the capital of?", country))
        rows.append(DatasetRow((f"{prefix}{i}",), f"Which city is the capital of {country}?", city))
    return rows


@dataclass
class World:
    """Tenants with documents, stored compressed contexts and a dataset, plus settings pointing at them."""

    store: ObjectStore
    settings: Settings
    compressor: Compressor
    base_dir: Path


def make_world(
    s3: object,
    model_dir: Path,
    tmp: Path,
    tenants: tuple[str, ...],
    reader: dict[str, bytes] | None = None,
    salient: bool = False,
    **finetune: object,
) -> World:
    """Tenants with the FACTS documents compressed (4 summary embeddings per 32 tokens; ``salient``: the keys
    and values of 8 salient tokens per 32) and the ``caps`` dataset."""
    store = ObjectStore(s3.store_settings(bucket=f"ft-{uuid.uuid4().hex[:16]}"))
    store.ensure_bucket()
    base = load_model(str(model_dir), tmp / "cache")
    if salient:
        compressor = Compressor.salient(base, segment_len=32, k=8)
    else:
        fresh = Compressor.from_base(base, segment_len=32, k=4, accumulate=True, seed=0)
        compressor = Compressor(
            base, fresh.summary_embeds, 32, True, output_scale=fresh.output_scale, reader_files=reader
        )
    compressor_dir = compressor.save(tmp / "compressor")
    for tenant in tenants:
        Tenants(store).create(tenant)
        registry = Registry(store, tenant)
        for i, (city, country) in enumerate(FACTS):
            text = f"The city of {city} is the capital of {country}. " * 6
            info, _ = registry.ingest_document(f"doc{i}", text.encode(), max_bytes=2**20)
            vectors = compressor.compress([base.tokenizer.encode(text, add_special_tokens=False)])[0]
            registry.put_context(f"doc{i}", compressor.compressor_id, vectors, info.sha256, 32, compressor.k)
        registry.put_dataset("caps", rows_to_jsonl(caps_rows()))
    settings = Settings(
        data_dir=tmp / "data",
        store=store.settings,
        model=ModelSettings(
            base_model=str(model_dir), compressor=str(compressor_dir), cache_dir=tmp / "cache"
        ),
        finetune=FinetuneSettings(batch_size=4, warmup_ratio=0.0, cpus_per_worker=0.5, **finetune),
    )
    return World(store, settings, compressor, model_dir)


@pytest.fixture(scope="module")
def world(s3: object, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> World:
    # a high learning rate, so a few steps move the adapter visibly away from the base model
    return make_world(
        s3, tiny_model_dir, tmp_path_factory.mktemp("world"), ("alpha", "beta", "gamma"), learning_rate=1e-2
    )


def test_rows_become_context_prefix_prompt_and_answer_with_loss_on_answer_only(world: World) -> None:
    registry = Registry(world.store, "alpha")
    tokenizer = world.compressor.base.tokenizer
    eos = tokenizer.eos_token_id
    rows = list(enumerate(registry.read_dataset("caps")[:2], start=1))
    builder = ExampleBuilder(registry, tokenizer, "compressed", world.compressor.compressor_id, 1024, eos)
    first, second = builder.build(rows)
    context, _ = registry.get_context("doc0", world.compressor.compressor_id)
    prompt = chat_prompt(tokenizer, "What country is paris the capital of?")
    answer = [*tokenizer.encode("france", add_special_tokens=False), eos]
    assert torch.equal(first.prefix, context) and first.prefix is second.prefix  # read once, shared
    assert first.input_ids == prompt + answer and first.answer_len == len(answer)
    with_evidence = ExampleBuilder(
        registry, tokenizer, "compressed", world.compressor.compressor_id, 1024, eos, context_ratio=1
    ).build(rows[:1])[0]
    text = registry.read_text("doc0")
    budget = len(tokenizer.encode(text, add_special_tokens=False)) - context.shape[0]  # what summaries leave
    evidence = Evidence([text], tokenizer).ids("What country is paris the capital of?", budget)
    assert evidence and with_evidence.input_ids == evidence + prompt + answer  # between context and prompt
    assert torch.equal(with_evidence.prefix, context)
    longest = context.shape[0] + len(prompt) + len(answer) + len(evidence) - 1  # one position short of it
    tight = ExampleBuilder(
        registry, tokenizer, "compressed", world.compressor.compressor_id, longest, eos, context_ratio=1
    ).build(rows[:1])[0]  # evidence takes only the room the example leaves, as serving's does: no error
    assert tight.length <= longest and tight.input_ids[-len(prompt + answer) :] == prompt + answer

    embed = world.compressor.base.model.embed
    batch = collate([first, second], embed, "cpu")
    length = max(first.length, second.length)
    assert batch.embeds.shape == (2, length, context.shape[1])
    assert torch.equal(batch.embeds[0, : context.shape[0]], context.float())
    assert torch.equal(batch.embeds[0, context.shape[0]], embed(torch.tensor(prompt[:1]))[0])
    # loss only on the answer: logits at the position before each answer token predict it
    n0 = len(answer)
    expected = [first.length - n0 - 1 + j for j in range(n0)]
    assert batch.target_index[:n0].tolist() == expected
    assert batch.targets[:n0].tolist() == answer
    assert batch.targets.numel() == first.answer_len + second.answer_len

    full = ExampleBuilder(registry, tokenizer, "full", None, 60, eos).build(rows[:1])[0]
    document = tokenizer.encode(registry.read_text("doc0"), add_special_tokens=False)
    assert (
        full.prefix is None
        and full.length == 60
        and full.input_ids[-len(prompt + answer) :] == prompt + answer
    )
    kept = full.input_ids[: 60 - len(prompt + answer)]
    head = len(kept) // 2
    assert kept[:head] == document[:head] and kept[head:] == document[len(document) - (len(kept) - head) :]


def test_rows_without_context_or_answer_are_rejected_by_line(world: World) -> None:
    registry = Registry(world.store, "alpha")
    tokenizer = world.compressor.base.tokenizer
    builder = ExampleBuilder(
        registry, tokenizer, "compressed", "other-compressor", 1024, tokenizer.eos_token_id
    )
    with pytest.raises(
        FailedPrecondition, match=r"dataset line 7: document 'doc3' has no compressed context"
    ):
        builder.build([(7, DatasetRow(("doc3",), "q?", "a"))])
    builder = ExampleBuilder(registry, tokenizer, "full", None, 1024, tokenizer.eos_token_id)
    with pytest.raises(InvalidArgument, match=r"dataset line 2: 'answer' must be a non-empty string"):
        builder.build([(1, DatasetRow(("doc0",), "q?", "a")), (2, DatasetRow(("doc0",), "q?", "  "))])
    with pytest.raises(InvalidArgument, match=r"dataset line 5: unknown document 'gone'"):
        builder.build([(5, DatasetRow(("gone",), "q?", "a"))])


def test_dataset_upload_rejects_bad_rows_with_their_line_number(world: World) -> None:
    registry = Registry(world.store, "beta")
    good = json.dumps({"doc_ids": ["doc0"], "question": "q?", "answer": "a"})
    cases = {
        json.dumps(
            {"doc_ids": ["nope"], "question": "q?", "answer": "a"}
        ): r"line 2: unknown document 'nope'",
        json.dumps(
            {"doc_ids": ["doc0"], "question": "q?", "answer": ""}
        ): r"line 2: 'answer' must be a non-empty",
        '{"doc_ids": ["doc0"], "question": ': r"line 2: not valid JSON",
    }
    for bad, message in cases.items():
        with pytest.raises(InvalidArgument, match=message):
            registry.put_dataset("bad", f"{good}\n{bad}\n{good}\n".encode())
    assert "bad" not in registry.list_datasets()


def test_gradient_accumulation_equals_one_large_batch(world: World, tmp_path: Path) -> None:
    registry = Registry(world.store, "alpha")
    tokenizer = world.compressor.base.tokenizer
    builder = ExampleBuilder(
        registry, tokenizer, "compressed", world.compressor.compressor_id, 1024, tokenizer.eos_token_id
    )
    examples = builder.build(list(enumerate(registry.read_dataset("caps")[:4], start=1)))
    base = load_model(str(world.base_dir), tmp_path / "cache")
    base.model.requires_grad_(False)
    after = []
    for micro_batches in ([examples], [examples[:1], examples[1:]]):
        lora = TrainableLora(base.config, 8, 16, ("q_proj", "v_proj"), seed=0)
        with torch.no_grad():  # B nonzero too, so that A's gradient is compared as well
            for b in lora.b.values():
                b.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        trainable = list(lora.parameters())
        optimizer = torch.optim.SGD(trainable, lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        stats = train_step(base.model, lora, micro_batches, optimizer, scheduler, torch.device("cpu"))
        after.append((stats, [p.detach().clone() for p in trainable]))
    (one, params_one), (accumulated, params_accumulated) = after
    assert one.samples == accumulated.samples == 4 and one.tokens == accumulated.tokens
    assert one.loss == pytest.approx(accumulated.loss, rel=1e-5)
    for a, b in zip(params_one, params_accumulated, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_step_with_non_finite_gradients_is_skipped() -> None:
    """One overflowing batch must not turn the weights into NaN: the step is skipped, the optimizer's state
    and the schedule stay, and the next finite step is taken."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    weight.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert not apply_gradients(optimizer, [weight], scheduler)
    assert torch.equal(weight.detach(), torch.ones(3)) and weight.grad is None
    assert optimizer.state[weight] == {} and scheduler.last_epoch == 0
    weight.grad = torch.tensor([1.0, 1.0, 0.0])
    assert apply_gradients(optimizer, [weight], scheduler)
    assert torch.isfinite(weight).all() and weight[0] < 1 and scheduler.last_epoch == 1


def test_training_loss_falls_well_below_its_start(s3: object, tmp_path: Path) -> None:
    # a wider random init than the shared tiny model, so a rank-8 adapter can move the logits far enough
    model_dir = tiny_llama_dir(tmp_path / "model", seed=1, initializer_range=0.3)
    learnable = make_world(s3, model_dir, tmp_path, ("solo",), learning_rate=3e-2)
    recipe = LoraFinetune(
        learnable.settings, "solo", "caps", "default", "learn", TrainOptions(max_steps=40, eval_fraction=0.2)
    )
    recipe.setup()
    eval_before = recipe.evaluate()
    recipe.train()
    record = recipe.save()
    recipe.cleanup()
    losses = [step["loss"] for step in recipe.history]
    assert len(losses) == 40 and all(step["tokens_per_s"] > 0 and step["lr"] > 0 for step in recipe.history)
    assert sum(losses[-5:]) / 5 < 0.3 * losses[0], losses
    assert record["eval_rows"] == 2 and record["train_rows"] == 8 and record["eval_loss"] is not None
    assert record["first_loss"] == losses[0] and eval_before is not None

    # the full-context baseline: the same loop on the raw document tokens
    full = LoraFinetune(
        learnable.settings, "solo", "caps", "full", "learn-full", TrainOptions(mode="full", max_steps=3)
    )
    full.setup()
    full.train()
    record = full.save()
    files = full.adapter_files()
    full.cleanup()
    assert record["mode"] == "full" and record["compressor_id"] is None and record["steps"] == 3
    assert all(math.isfinite(step["loss"]) for step in full.history)
    assert full.history[0]["tokens_per_s"] > 0 and json.loads(files["adapter_config.json"])["r"] == 8


def test_a_tenant_adapter_trains_over_key_value_summaries(s3: object, tmp_path: Path) -> None:
    """With a key/value compressor (the salient-sentence default) a tenant's rows carry each document's keys
    and values, read at every layer before the prompt; the loss falls as with summary embeddings."""
    model_dir = tiny_llama_dir(tmp_path / "model", seed=1, initializer_range=0.3)
    learnable = make_world(s3, model_dir, tmp_path, ("solo",), salient=True, learning_rate=3e-2)
    recipe = LoraFinetune(
        learnable.settings, "solo", "caps", "default", "learn", TrainOptions(max_steps=30, eval_fraction=0.2)
    )
    recipe.setup()
    example = recipe.train_examples[0]
    assert example.kv_prefix and example.prefix.shape[1] == kv_width(learnable.compressor.base.config)
    recipe.train()
    record = recipe.save()
    recipe.cleanup()
    losses = [step["loss"] for step in recipe.history]
    assert (
        record["compressor_id"] == learnable.compressor.compressor_id
        and "-salient-" in record["compressor_id"]
    )
    assert sum(losses[-5:]) / 5 < 0.3 * losses[0], losses
    assert record["context_ratio"] == 8  # finetune.context_ratio's default, which serving reads back

    finetune = learnable.settings.finetune.model_copy(update={"context_ratio": 1})
    with_evidence = LoraFinetune(
        learnable.settings.model_copy(update={"finetune": finetune}),
        "solo", "caps", "default", "evidence", TrainOptions(max_steps=1, eval_fraction=0.2),
    )  # fmt: skip
    with_evidence.setup()
    first, plain = with_evidence.train_examples[0], recipe.train_examples[0]
    assert (
        len(first.input_ids) > len(plain.input_ids)
        and first.input_ids[-len(plain.input_ids) :] == plain.input_ids
    )
    assert with_evidence.record(None)["context_ratio"] == 1  # what serving reads from the published adapter
    with_evidence.cleanup()


# a busy 2-core machine can keep the GCS from answering within Ray's default 5 s connect timeout
RAY_PATIENCE = {"RAY_gcs_rpc_server_connect_timeout_s": "60"}


@dataclass
class RayHead:
    """A Ray head with its job server (the dashboard), as a cluster that ``ray job submit`` talks to."""

    gcs_address: str
    job_server: str


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    # its own temp dir, so this head is never the "current cluster" other ray.init() calls find
    temp_dir = Path(tempfile.mkdtemp(prefix="lloco-ray-", dir="/tmp"))
    ports = {
        name: _free_port()
        for name in (
            "port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
            "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port",
            "ray-client-server-port",
        )
    }  # fmt: skip
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        **RAY_PATIENCE,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "disabled",
    }
    command = [
        str(Path(venv_bin) / "ray"), "start", "--head", "--block", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats",
        f"--temp-dir={temp_dir}", *(f"--{name}={port}" for name, port in ports.items()),
    ]  # fmt: skip
    with (temp_dir / "head.log").open("w") as log:
        head = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    job_server = f"http://127.0.0.1:{ports['dashboard-port']}"
    deadline = time.monotonic() + 240
    while True:
        try:
            urllib.request.urlopen(f"{job_server}/api/version", timeout=2).read()
            break
        except OSError:
            assert head.poll() is None and time.monotonic() < deadline, (temp_dir / "head.log").read_text()[
                -3000:
            ]
            time.sleep(0.5)
    yield RayHead(gcs_address=f"127.0.0.1:{ports['port']}", job_server=job_server)
    os.killpg(head.pid, signal.SIGKILL)  # the head and everything it started share its process group
    head.wait()
    shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class KilledAndResumed:
    """A three-tenant job killed after checkpoints, then resumed under the same id through job submission:
    each tenant's record of it, once the job has ended."""

    job_id: str
    records: dict[str, JobRecord]
    running_after_kill: dict[str, str]  # the records' states after the kill, before the resubmission
    first_log: str


@pytest.fixture(scope="module")
def resumed_job(
    world: World, ray_head: RayHead, tmp_path_factory: pytest.TempPathFactory
) -> KilledAndResumed:
    # gamma's stored dataset (written around put_dataset's checks) names a missing document on line 4
    rows = caps_rows()
    rows[3] = DatasetRow(("doc9",), rows[3].question, rows[3].answer)
    world.store.put_bytes(keys.dataset("gamma", "caps"), rows_to_jsonl(rows))

    job_id = f"job-{uuid.uuid4().hex[:8]}"
    tenants = ["alpha", "beta", "gamma"]
    options = TrainOptions(max_steps=400, checkpoint_every_steps=100)
    env = {**os.environ, **settings_env(world.settings), **RAY_PATIENCE, "RAY_ADDRESS": ray_head.gcs_address}
    command = [sys.executable, "-m", "lloco.cli", "finetune", "--dataset", "caps", "--adapter", "qa",
               "--job-id", job_id, "--tenant", "alpha", "--tenant", "beta", "--tenant", "gamma", "--verbose",
               *options.cli_args()]  # fmt: skip
    snapshots = [
        f"{keys.checkpoints_prefix(job_id)}{t}/checkpoint_manager_snapshot.json" for t in ("alpha", "beta")
    ]
    first_log = tmp_path_factory.mktemp("first") / "first.log"
    with first_log.open("w") as log:
        first = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 480
        # kill for real once Ray Train has registered a checkpoint of both tenants (their snapshots name one)
        while not all(world.store.exists(key) for key in snapshots):
            assert first.poll() is None, first_log.read_text()[-3000:]
            assert time.monotonic() < deadline, (
                "no checkpoints within 480 s: " + first_log.read_text()[-3000:]
            )
            time.sleep(0.1)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    jobs = Jobs(world.settings, world.store, ray_head.job_server)
    killed = {tenant: jobs.records.get(tenant, job_id).state for tenant in tenants}
    for tenant in tenants:  # a killed run publishes nothing
        assert Registry(world.store, tenant).list_adapters() == []

    # the same job id again, now through Ray's job submission API (what SubmitFinetune does)
    submitted = jobs.submit_finetune(tenants, "caps", "qa", options, job_id)
    assert [(r.job_id, r.state, r.shared) for r in submitted] == [(job_id, "QUEUED", True)] * 3
    deadline = time.monotonic() + 600
    while not all((records := {t: jobs.get(t, job_id) for t in tenants})[t].done for t in tenants):
        assert time.monotonic() < deadline, "the resumed job did not finish within 600 s"
        time.sleep(0.25)  # a loopback read of three records: poll often, the job's end is what is waited for
    return KilledAndResumed(job_id, records, killed, first_log.read_text())


@pytest.mark.slow
def test_killed_job_resumes_from_its_last_checkpoints_and_finishes(
    world: World, resumed_job: KilledAndResumed
) -> None:
    # the killed run had recorded itself (the job writes its records, not its submitter): alpha and beta
    # RUNNING when it was killed, gamma FAILED at once
    assert resumed_job.running_after_kill == {"alpha": "RUNNING", "beta": "RUNNING", "gamma": "FAILED"}
    records = resumed_job.records
    assert records["alpha"].state == records["beta"].state == "SUCCEEDED", records
    for tenant in ("alpha", "beta"):
        train = Registry(world.store, tenant).get_adapter("qa").train
        assert train["steps"] == 400 and train["job_id"] == resumed_job.job_id
        assert train["resumed_from_step"] in (100, 200, 300), train  # the step counter started past 0
        assert records[tenant].result["metrics"]["resumed_from_step"] == train["resumed_from_step"]
    assert "resumed from checkpoint" not in resumed_job.first_log


@pytest.mark.slow
def test_two_tenants_train_concurrently_and_publish_versions(
    world: World, resumed_job: KilledAndResumed
) -> None:
    alpha, beta = resumed_job.records["alpha"], resumed_job.records["beta"]
    for record in (alpha, beta):
        version = Registry(world.store, record.tenant).get_adapter("qa")
        assert version.version == record.result["version"] == "v000001" and version.current
        assert record.result["adapter"] == "qa" and record.message == "published adapter 'qa' version v000001"
        assert version.base_model == world.compressor.base.model_id and version.rank == 8
        train = version.train
        assert train["dataset"] == "caps" and train["compressor_id"] == world.compressor.compressor_id
        assert train["eval_loss"] > 0 and train["seconds"] > 0 and train["train_rows"] == 9
    a, b = alpha.result["metrics"], beta.result["metrics"]  # the two trainings overlapped in time
    assert a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]


@pytest.mark.slow
def test_a_failing_tenant_is_reported_alone_and_fails_the_job(
    world: World, resumed_job: KilledAndResumed
) -> None:
    gamma = resumed_job.records["gamma"]
    assert gamma.state == "FAILED" and gamma.result is None
    assert gamma.error == "InvalidArgument: dataset line 4: unknown document 'doc9'", gamma.error
    assert gamma.message == gamma.error
    assert Registry(world.store, "gamma").list_adapters() == []
    assert (
        gamma.started is not None
        and gamma.ended is not None
        and gamma.created <= gamma.started <= gamma.ended
    )


@pytest.mark.slow
def test_job_api_errors(world: World, ray_head: RayHead, resumed_job: KilledAndResumed) -> None:
    jobs = Jobs(world.settings, world.store, ray_head.job_server)
    with pytest.raises(AlreadyExists):
        jobs.submit_finetune(["alpha"], "caps", "qa", job_id=resumed_job.job_id)
    assert jobs.get("alpha", resumed_job.job_id).state == "SUCCEEDED"  # the refused resubmission left it
    with pytest.raises(NotFound):
        jobs.get("alpha", "no-such-job")
    with pytest.raises(InvalidArgument):
        jobs.submit_finetune(["../x"], "caps", "qa")
    with pytest.raises(FailedPrecondition, match="already SUCCEEDED"):
        jobs.cancel("alpha", resumed_job.job_id)
    listed, token = jobs.list("beta", 10, "")
    assert [r.job_id for r in listed] == [resumed_job.job_id] and token == ""


@pytest.mark.slow
def test_published_adapter_loads_in_vanilla_peft_and_in_the_engine_with_equal_logits(
    world: World, resumed_job: KilledAndResumed, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    registry = Registry(world.store, "alpha")
    files = registry.read_adapter_files("qa", resumed_job.records["alpha"].result["version"])
    config = json.loads(files["adapter_config.json"])
    assert config["base_model_name_or_path"] == world.compressor.base.model_id and config["r"] == 8
    assert config["lora_alpha"] == 16 and sorted(config["target_modules"]) == [
        "k_proj",
        "o_proj",
        "q_proj",
        "v_proj",
    ]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    hf = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(world.base_dir, dtype=torch.float32), tmp_path
    )
    hf.eval()

    engine = load_model(str(world.base_dir), tmp_path / "cache")
    slots = LoraSlots(engine.config, n_slots=2, max_rank=16)
    slots.load(1, files)
    context, _ = registry.get_context("doc0", world.compressor.compressor_id)
    prompt = torch.tensor([chat_prompt(engine.tokenizer, "What country is paris the capital of?")])
    with torch.no_grad():
        embeds = torch.cat([context.float()[None], engine.model.embed(prompt)], dim=1)
        reference = hf(inputs_embeds=embeds).logits
        ours = engine.model.lm_head(engine.model.hidden(embeds, slots.batch(torch.tensor([1]))))
        base = engine.model.lm_head(engine.model.hidden(embeds))
    assert (base - reference).abs().max() > 1e-2  # the adapter changes the output...
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)  # ...identically in both


def test_a_tenant_adapter_starts_from_the_compressors_reader(
    s3: object, tiny_model_dir: Path, tmp_path: Path
) -> None:
    base = load_model(str(tiny_model_dir), tmp_path / "cache")
    reader = TrainableLora(base.config, 4, 8.0, ("q_proj", "k_proj", "v_proj", "o_proj"), seed=3)
    with torch.no_grad():
        for b in reader.b.values():
            b.normal_(std=0.1)
    files = reader.peft_files(base.model_id, dtype=torch.float32)
    world = make_world(s3, tiny_model_dir, tmp_path, ("reads",), reader=files)
    recipe = LoraFinetune(world.settings, "reads", "caps", "default", "init", TrainOptions(max_steps=1))
    recipe.setup()
    start = load_safetensors_bytes(recipe.adapter_files()["adapter_model.safetensors"])
    expected = load_safetensors_bytes(files["adapter_model.safetensors"])
    assert set(start) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(start[key], value)
    recipe.train()
    record = recipe.save()
    recipe.cleanup()
    assert record["lora"] == {
        "r": 4,
        "alpha": 8.0,
        "dropout": 0.05,
        "targets": ["k_proj", "o_proj", "q_proj", "v_proj"],
        "init": "reader",
    }
