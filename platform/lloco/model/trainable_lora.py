"""One LoRA adapter as trainable parameters, applied on the inference path (``Llama.hidden``).

The serving path runs fused q|k|v and gate|up projections with adapters from ``LoraSlots``
(``LayerLora.add``). Training an adapter on that same path needs no peft wrapping, runs the fused
projections, and lets two adapters act on one model in one autograd graph — the compressor's encoder
LoRA and its decoder-side reader LoRA are trained together that way.

Parameters, per layer and projection group (the groups of ``lloco.model.lora``):

    A[group]:  [n_layers, n * R, in]     rows (target t, rank j) at t*R + j; kaiming-uniform init (as peft)
    B[target]: [n_layers, R, out_t]      zeros at init, so a fresh adapter is the identity

and for layer i the group's expand weight is the block matrix of the targets' ``B * alpha / R`` placed at
their output columns of the fused projection (the ``LoraSlots`` layout with one slot), so

    delta = (x @ A[group][i].T) @ B_block[group][i]

Files are PEFT's (``adapter_config.json`` + ``adapter_model.safetensors`` with HF LlamaForCausalLM keys),
so what trains here loads into ``LoraSlots`` and into vanilla ``peft``.
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch import Tensor, nn

from lloco.errors import InvalidArgument
from lloco.model.config import LlamaConfig
from lloco.model.lora import (
    CONFIG_FILE,
    GROUPS,
    MODULE_OF,
    WEIGHTS_FILE,
    LayerLora,
    _in_out,
    read_peft_files,
)


class TrainableLora(nn.Module):
    """A LoRA adapter whose weights train, used through ``layer(i)`` like a ``LoraBatch``.

    Args:
        config: the model geometry.
        rank: R.
        alpha: scaling numerator (scaling = alpha / R, as peft without rsLoRA).
        targets: projections that get the adapter (names of ``lloco.model.lora.MODULE_OF``).
        seed: seed of A's initialisation.
    Raises:
        InvalidArgument: rank < 1, or unknown / no targets.
    """

    def __init__(
        self, config: LlamaConfig, rank: int, alpha: float, targets: tuple[str, ...], seed: int = 0
    ) -> None:
        super().__init__()
        unknown = set(targets) - set(MODULE_OF)
        if rank < 1 or unknown or not targets:
            raise InvalidArgument(
                f"LoRA needs rank >= 1 and targets among {sorted(MODULE_OF)}, got {rank}, {targets}"
            )
        self.config, self.rank, self.alpha = config, rank, float(alpha)
        self.groups = {g: tuple(t for t in names if t in targets) for g, names in GROUPS.items()}
        self.groups = {g: names for g, names in self.groups.items() if names}
        self.targets = tuple(t for names in self.groups.values() for t in names)
        generator = torch.Generator().manual_seed(seed)
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        self._columns: dict[str, tuple[int, int]] = {}  # target -> (offset, width) in its group's output
        self._widths: dict[str, int] = {}  # group -> fused output width
        for group, names in self.groups.items():
            fan_in = _in_out(config, GROUPS[group][0])[0]
            a = torch.empty(config.n_layers, len(names) * rank, fan_in)
            bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) on [r, in], as nn.Linear and peft
            a.uniform_(-bound, bound, generator=generator)
            self.a[group] = nn.Parameter(a)
            offset = 0
            for target in GROUPS[group]:
                width = _in_out(config, target)[1]
                if target in names:
                    self._columns[target] = (offset, width)
                    self.b[target] = nn.Parameter(torch.zeros(config.n_layers, rank, width))
                offset += width
            self._widths[group] = offset

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def layer(self, index: int, dtype: torch.dtype | None = None) -> LayerLora:
        """The adapter at layer ``index`` in ``LayerLora`` form (differentiable), cast to ``dtype``."""
        weights = {}
        for group, names in self.groups.items():
            blocks = []
            for target in names:
                offset, width = self._columns[target]
                b = self.b[target][index] * self.scaling
                blocks.append(F.pad(b, (offset, self._widths[group] - offset - width)))
            a, b = self.a[group][index], torch.cat(blocks)
            weights[group] = (a, b) if dtype is None else (a.to(dtype), b.to(dtype))
        one = self.a[next(iter(self.groups))].new_ones(())
        return LayerLora(weights, dict.fromkeys(self.groups, one if dtype is None else one.to(dtype)))

    def bind(self, dtype: torch.dtype) -> _Bound:
        """This adapter for one forward in ``dtype``: what ``Llama.hidden(embeds, lora)`` takes."""
        return _Bound(self, dtype)

    # -- PEFT files -------------------------------------------------------------------------------------

    def peft_files(self, base_model_id: str, dtype: torch.dtype = torch.float16) -> dict[str, bytes]:
        """The adapter as PEFT files (HF LlamaForCausalLM keys, B unscaled, ``lora_alpha`` in the config)."""
        state = {}
        for group, names in self.groups.items():
            a = self.a[group].detach()
            for t_index, target in enumerate(names):
                prefix = f"base_model.model.model.layers.{{}}.{MODULE_OF[target]}.{target}"
                for layer in range(self.config.n_layers):
                    rows = a[layer, t_index * self.rank : (t_index + 1) * self.rank]
                    key = prefix.format(layer)
                    state[f"{key}.lora_A.weight"] = rows.to(dtype).cpu().contiguous()
                    state[f"{key}.lora_B.weight"] = (
                        self.b[target][layer].detach().t().to(dtype).cpu().contiguous()
                    )
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_id,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "target_modules": sorted(self.targets),
            "bias": "none",
            "use_rslora": False,
            "use_dora": False,
            "inference_mode": True,
        }
        return {
            CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True).encode(),
            WEIGHTS_FILE: save(state, metadata={"format": "pt"}),
        }

    @classmethod
    def from_peft_files(cls, config: LlamaConfig, files: dict[str, bytes]) -> TrainableLora:
        """An adapter initialised from PEFT files (continue training, or start a new adapter from it).

        Raises:
            InvalidArgument: rank/alpha patterns, rsLoRA, DoRA or bias (not representable here), or tensors
                that do not fit the model.
        """
        peft_config, tensors = read_peft_files(files)
        unsupported = [
            k for k in ("rank_pattern", "alpha_pattern", "use_rslora", "use_dora") if peft_config.get(k)
        ]
        if unsupported or peft_config.get("bias", "none") != "none":
            raise InvalidArgument(
                f"adapter uses {unsupported or ['bias']}, which a TrainableLora cannot hold"
            )
        targets = peft_config.get("target_modules") or []
        if isinstance(targets, str):
            raise InvalidArgument(f"adapter target_modules must be a list, got {targets!r}")
        lora = cls(config, int(peft_config["r"]), float(peft_config["lora_alpha"]), tuple(targets))
        expected = {
            f"base_model.model.model.layers.{layer}.{MODULE_OF[t]}.{t}.lora_{which}.weight"
            for layer in range(config.n_layers)
            for t in lora.targets
            for which in "AB"
        }
        if set(tensors) != expected:
            raise InvalidArgument(
                f"adapter tensors do not match r={lora.rank} on {list(lora.targets)} for {config.n_layers} layers"
            )
        with torch.no_grad():
            for group, names in lora.groups.items():
                for t_index, target in enumerate(names):
                    rows = slice(t_index * lora.rank, (t_index + 1) * lora.rank)
                    for layer in range(config.n_layers):
                        key = f"base_model.model.model.layers.{layer}.{MODULE_OF[target]}.{target}"
                        a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
                        if (
                            a.shape != lora.a[group][layer, rows].shape
                            or b.t().shape != lora.b[target][layer].shape
                        ):
                            raise InvalidArgument(
                                f"adapter tensor {key} has shapes {tuple(a.shape)}, {tuple(b.shape)}"
                            )
                        lora.a[group][layer, rows] = a.float()
                        lora.b[target][layer] = b.t().float()
        return lora


class _Bound:
    """A ``TrainableLora`` bound to a dtype: ``layer(i)`` as ``Llama.hidden`` calls it on a ``LoraBatch``."""

    def __init__(self, lora: TrainableLora, dtype: torch.dtype) -> None:
        self.lora, self.dtype = lora, dtype

    def layer(self, index: int) -> LayerLora:
        return self.lora.layer(index, self.dtype)


def lora_parameters(*adapters: TrainableLora | None) -> list[Tensor]:
    """The trainable tensors of the given adapters (None skipped)."""
    return [p for adapter in adapters if adapter is not None for p in adapter.parameters()]
