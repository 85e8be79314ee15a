"""What one finetune run does beyond the platform's hyperparameters: a pydantic model with no heavy imports,
so the job submitter (``lloco.jobs``) can turn it into the ``lloco finetune`` command line."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainOptions(BaseModel):
    """What one finetune run does beyond the platform's ``settings.finetune`` (hyperparameters)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["compressed", "full"] = Field(
        "compressed", description="compressed: LLoCO (summary vectors as prefix); full: raw document tokens."
    )
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="Rows held out (seeded) for the evaluation loss."
    )
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (else epochs)."
    )
    checkpoint_every_steps: int | None = Field(None, ge=1, description="Checkpoint period; None: each epoch.")
    max_length: int | None = Field(
        None, ge=8, description="Longest example in positions; None: the model's max_position_embeddings."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute each layer in backward (long inputs).")
    seed: int = Field(0, ge=0, description="Seed of the split, data order and dropout.")

    def cli_args(self) -> list[str]:
        """The ``lloco finetune`` flags that reproduce these options."""
        args = ["--mode", self.mode, "--eval-fraction", str(self.eval_fraction), "--seed", str(self.seed)]
        if self.max_steps is not None:
            args += ["--max-steps", str(self.max_steps)]
        if self.checkpoint_every_steps is not None:
            args += ["--checkpoint-every", str(self.checkpoint_every_steps)]
        if self.max_length is not None:
            args += ["--max-length", str(self.max_length)]
        if self.gradient_checkpointing:
            args += ["--gradient-checkpointing"]
        return args
