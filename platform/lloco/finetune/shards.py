"""Tensors saved as safetensors shards of bounded size, so a checkpoint can travel in small files.

A GPU host may hand back only files under a size limit; a training state (LoRA weights and optimizer
moments) is written as ``{stem}-00000.safetensors``, ``{stem}-00001.safetensors``, ... each at most
``max_bytes`` (a tensor larger than that gets a shard of its own), and read back as one dict.
``save_training``/``load_training`` keep a module's weights (as they are) and its AdamW moments (bf16, half
the bytes; the moments tolerate the rounding) in two such stems, ``weights`` and ``optimizer``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lloco.errors import NotFound

DEFAULT_SHARD_BYTES = 15 * 10**6


def save_sharded(
    tensors: dict[str, Tensor], directory: Path, stem: str, max_bytes: int = DEFAULT_SHARD_BYTES
) -> list[Path]:
    """Write ``tensors`` in name order into shards of at most ``max_bytes``; removes older shards of ``stem``."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob(f"{stem}-*.safetensors"):
        old.unlink()
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    paths = []
    for index, shard in enumerate(shards):
        path = directory / f"{stem}-{index:05d}.safetensors"
        save_file(shard, path)
        paths.append(path)
    return paths


def load_sharded(directory: Path, stem: str, device: str = "cpu") -> dict[str, Tensor]:
    """Every tensor of the ``stem`` shards in ``directory``.

    Raises:
        NotFound: no shard of that stem.
    """
    paths = sorted(directory.glob(f"{stem}-*.safetensors"))
    if not paths:
        raise NotFound(f"no {stem}-*.safetensors shards in {directory}")
    tensors: dict[str, Tensor] = {}
    for path in paths:
        tensors.update(load_file(path, device=device))
    return tensors


def save_training(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write ``module``'s parameters and the AdamW state of each (``exp_avg``, ``exp_avg_sq``, ``step``)."""
    weights = {name: param.detach() for name, param in module.named_parameters()}
    moments: dict[str, Tensor] = {}
    for name, param in module.named_parameters():
        state = optimizer.state.get(param)
        if state:
            moments[f"{name}.exp_avg"] = state["exp_avg"].to(torch.bfloat16)
            moments[f"{name}.exp_avg_sq"] = state["exp_avg_sq"].to(torch.bfloat16)
            moments[f"{name}.step"] = torch.as_tensor(float(state["step"]))
    save_sharded(weights, directory, "weights")
    save_sharded(moments, directory, "optimizer")


def load_training(
    directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> None:
    """Load what ``save_training`` wrote into ``module`` (strict) and ``optimizer`` (fp32 moments on ``device``).

    Raises:
        NotFound: no weights or optimizer shards in ``directory``.
    """
    module.load_state_dict(load_sharded(directory, "weights", str(device)))
    moments = load_sharded(directory, "optimizer", str(device))
    for name, param in module.named_parameters():
        if f"{name}.exp_avg" in moments:
            optimizer.state[param] = {
                "step": moments[f"{name}.step"].float().cpu(),
                "exp_avg": moments[f"{name}.exp_avg"].float(),
                "exp_avg_sq": moments[f"{name}.exp_avg_sq"].float(),
            }
