"""Compressor pretraining on Ray: the recipe (``lloco.finetune.pretrain``) on one Ray Train worker, its output
(compressor + checkpoint) reported as the run's checkpoint and copied back to ``options.output``."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lloco.config import Settings
from lloco.errors import Internal
from lloco.finetune.pretrain import RECORD_FILE, pretrain
from lloco.finetune.pretrain_options import PretrainOptions
from lloco.terminal import ray_log_to_driver


def _train_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker: the same recipe, its output reported as the run's checkpoint."""
    import ray.train

    def report(metrics: dict[str, Any], directory: Path | None) -> None:
        checkpoint_ = ray.train.Checkpoint.from_directory(str(directory)) if directory else None
        ray.train.report(metrics, checkpoint=checkpoint_)

    staging = Path(tempfile.mkdtemp(prefix="lloco-pretrain-"))
    options = config["options"].model_copy(update={"output": staging / "compressor"})
    if config["options"].output.is_dir():  # a resumable run: start from the caller's output
        shutil.copytree(config["options"].output, options.output)
    try:
        pretrain(config["settings"], options, config["command"], report)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_pretrain_job(
    settings: Settings,
    options: PretrainOptions,
    command: str = "",
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    storage_path: str | None = None,
) -> dict[str, Any]:
    """Pretrain on one Ray Train worker and copy its output (compressor + checkpoint) to ``options.output``.

    ``storage_path`` is where Ray Train keeps the run (a local temporary folder by default; on a
    multi-node cluster give a shared path such as ``s3://bucket/prefix``).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(configure_logging=False, log_to_driver=ray_log_to_driver())
    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    local_storage = None if storage_path else tempfile.mkdtemp(prefix="lloco-pretrain-ray-")
    trainer = TorchTrainer(
        train_loop_per_worker=_train_worker,
        train_loop_config={"settings": settings, "options": options, "command": command},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name="pretrain-compressor", storage_path=storage_path or local_storage),
    )
    try:
        result = trainer.fit()
        if result.checkpoint is None:
            raise Internal("compressor pretraining ended without a saved compressor")
        result.checkpoint.to_directory(str(options.output))
    finally:
        if local_storage:
            shutil.rmtree(local_storage, ignore_errors=True)
    record_path = options.output / RECORD_FILE
    if not record_path.is_file():
        raise Internal(f"the pretraining checkpoint has no {RECORD_FILE}")
    return json.loads(record_path.read_text())
