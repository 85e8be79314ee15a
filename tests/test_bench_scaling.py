"""The scaling benchmark end to end on CPU: local Ray, a real SeaweedFS, the tiny random model, smallest sizes."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from lloco.bench.scaling import choose_sizes, main, parse_args, plan_placement
from lloco.config import FinetuneSettings
from lloco.errors import InvalidArgument
from lloco.registry import Registry
from lloco.storage import EmbeddedS3, ObjectStore, keys

SMALLEST = ["--docs", "4", "--doc-tokens", "128", "--batch-size", "2", "--rows", "4", "--train-batch", "2"]
STEPS = 2
COMPRESSION_RUN = {
    "tenant",
    "actors",
    "gpus_per_actor",
    "cpus_per_actor",
    "documents",
    "tokens",
    "actor_calls",
    "seconds",
    "tokens_per_s",
    "steady_tokens_per_s",
}
TENANT_RUN = {"version", "samples", "train_seconds", "samples_per_s", "train_start", "train_end", "published"}
FINETUNE_RUN = {
    "job_id",
    "adapter",
    "tenants",
    "gpus_per_tenant",
    "cpus_per_tenant",
    "samples",
    "train_span_s",
    "overlap",
    "samples_per_s",
    "wall_s",
    "wall_samples_per_s",
}
TOP = {
    "command",
    "date",
    "host",
    "accelerator",
    "placement",
    "geometry",
    "sizes",
    "store",
    "goal_ratio",
    "compression",
    "finetune",
}
HOST = {"cpu_cores", "load_average", "cpu", "platform", "python", "torch", "ray", "gpus", "ray_resources"}


def test_one_gpu_runs_the_n_side_on_halves_and_cpu_runs_at_least_two_actors() -> None:
    one_gpu, two_gpus, cpu = plan_placement(False, 1), plan_placement(False, 2), plan_placement(True, 1)
    assert (one_gpu.actors, one_gpu.gpus_per_actor, one_gpu.gpus_per_tenant, one_gpu.single_gpus) == (
        2,
        0.5,
        0.5,
        1.0,
    )
    assert (two_gpus.actors, two_gpus.gpus_per_actor, two_gpus.gpus_per_tenant) == (2, 1.0, 1.0)
    assert (cpu.accelerator, cpu.gpus, cpu.actors, cpu.single_gpus) == ("cpu", 0, 2, 0.0)
    with pytest.raises(InvalidArgument, match="--gpus must be at least 1"):
        plan_placement(False, 0)
    with pytest.raises(InvalidArgument, match="--rows 5 must be a multiple of --train-batch 2"):
        choose_sizes(parse_args(["--out", "x", "--tiny", "--rows", "5", "--train-batch", "2"]))


@pytest.mark.slow
def test_tiny_run_records_every_figure_and_publishes_both_adapters(
    tmp_path: Path, ray_local: None, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench"
    result = main(["--out", str(out), "--tiny", *SMALLEST, "--train-steps", str(STEPS)])

    recorded = json.loads((out / "scaling.json").read_text())
    assert recorded == result
    assert set(recorded) == TOP and set(recorded["host"]) == HOST
    assert recorded["command"].startswith("python -m lloco.bench.scaling --out ")
    assert datetime.datetime.fromisoformat(recorded["date"]).tzinfo is not None
    assert recorded["accelerator"] == "cpu" and recorded["host"]["ray_resources"]["CPU"] >= 1

    compression = recorded["compression"]
    assert set(compression) == {"one", "many", "ratio_steady", "ratio_wall", "steady_bias_estimate"}
    one, many = compression["one"], compression["many"]
    assert set(one) == set(many) == COMPRESSION_RUN
    assert (one["actors"], many["actors"]) == (1, 2)
    assert one["documents"] == many["documents"] == 4
    assert one["tokens"] == many["tokens"] > 0  # the same documents on both sides
    assert compression["ratio_wall"] == pytest.approx(many["tokens_per_s"] / one["tokens_per_s"])

    finetune = recorded["finetune"]
    assert set(finetune) == {"solo", "pair", "ratio", "ratio_wall"}
    solo, pair = finetune["solo"], finetune["pair"]
    assert set(solo) == set(pair) == FINETUNE_RUN
    assert set(solo["tenants"]) == {"one"} and set(pair["tenants"]) == {"one", "many"}
    for run in (solo, pair):
        for entry in run["tenants"].values():
            assert set(entry) == TENANT_RUN
            assert entry["samples"] == STEPS * 2 and entry["samples_per_s"] > 0
            assert entry["published"]["current"] and entry["published"]["version"] == entry["version"]
        assert run["samples"] == STEPS * 2 * len(run["tenants"])
        assert 0.0 <= run["overlap"] <= 1.0 and run["samples_per_s"] > 0
    assert finetune["ratio"] == pytest.approx(pair["samples_per_s"] / solo["samples_per_s"])

    # the store, opened again by a new server on the same data: contexts and both tenants' adapters are there
    with EmbeddedS3(Path(recorded["store"]["data_dir"])) as server:
        store = ObjectStore(server.store_settings(bucket=recorded["store"]["bucket"]))
        for tenant in ("one", "many"):
            registry = Registry(store, tenant)
            assert len(list(store.list_keys(keys.contexts_prefix(tenant)))) == 4
            adapter = registry.get_adapter("pair")
            assert adapter.current and adapter.version == pair["tenants"][tenant]["version"]
            assert adapter.rank == FinetuneSettings().rank
            files = registry.read_adapter_files("pair", adapter.version)
            assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
        assert Registry(store, "one").get_adapter("solo").version == solo["tenants"]["one"]["version"]

    table = (out / "scaling.md").read_text().rstrip()
    assert capsys.readouterr().out.rstrip().endswith(table)  # the table is printed last
    assert "| 2 vs 1 |" in table and f"CPU only: {recorded['host']['cpu_cores']} cores" in table
    assert f"`{recorded['command']}`" in table
