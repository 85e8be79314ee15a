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
so what trains here loads into ``LoraSlots`` and into vanilla ``peft``. This is the one trainable LoRA of the
platform: tenant finetunes, the evaluation's LoRA modes and compressor pretraining all train it.

LoRA dropout (peft's ``lora_dropout``) drops input features of the adapter path only, in training mode:
``delta = (dropout(x) @ A.T) @ B``. The projections of one group share one dropout mask (peft draws one per
projection); it is a regulariser either way, and inference is unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lloco.errors import InvalidArgument
from lloco.model.config import LlamaConfig
from lloco.model.llama import Block, BlockFn, Llama
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
        dropout: LoRA dropout probability while training (``module.train()``).
    Raises:
        InvalidArgument: rank < 1, unknown / no targets, dropout outside [0, 1).
    """

    def __init__(
        self,
        config: LlamaConfig,
        rank: int,
        alpha: float,
        targets: tuple[str, ...],
        seed: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        unknown = set(targets) - set(MODULE_OF)
        if rank < 1 or unknown or not targets or not 0 <= dropout < 1:
            raise InvalidArgument(
                f"LoRA needs rank >= 1, targets among {sorted(MODULE_OF)} and dropout in [0, 1), got {rank}, "
                f"{targets}, {dropout}"
            )
        self.config, self.rank, self.alpha, self.dropout = config, rank, float(alpha), float(dropout)
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

    def layers(self, dtype: torch.dtype | None = None) -> list[LayerLora]:
        """The adapter of every layer in ``LayerLora`` form (differentiable), cast to ``dtype``.

        One forward's worth: the expand matrices of all layers are built together (a few operations per
        group, not per layer), so a forward through many layers launches no per-layer weight preparation.
        """
        weights = {}
        for group, names in self.groups.items():
            blocks = []
            for target in names:
                offset, width = self._columns[target]
                blocks.append(
                    F.pad(self.b[target] * self.scaling, (offset, self._widths[group] - offset - width))
                )
            a, b = self.a[group], torch.cat(blocks, dim=1)
            weights[group] = (a, b) if dtype is None else (a.to(dtype), b.to(dtype))
        one = self.a[next(iter(self.groups))].new_ones(())
        masks = dict.fromkeys(self.groups, one if dtype is None else one.to(dtype))
        per_layer = [{g: (a[i], b[i]) for g, (a, b) in weights.items()} for i in range(self.config.n_layers)]
        if self.training and self.dropout:
            return [_DroppingLayerLora(layer, masks, self.dropout) for layer in per_layer]
        return [LayerLora(layer, masks) for layer in per_layer]

    def bind(self, dtype: torch.dtype) -> _Bound:
        """This adapter for one forward in ``dtype``: what ``Llama.hidden(embeds, lora)`` takes."""
        return _Bound(self, dtype)

    # -- PEFT files -------------------------------------------------------------------------------------

    def peft_state(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """The weights as peft names them for HF's LlamaForCausalLM (B unscaled), on the CPU in ``dtype``."""
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
        return state

    def peft_files(self, base_model_id: str, dtype: torch.dtype = torch.float16) -> dict[str, bytes]:
        """The adapter as PEFT files (HF LlamaForCausalLM keys, B unscaled, ``lora_alpha`` in the config)."""
        state = self.peft_state(dtype)
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_id,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
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
    def from_peft_files(
        cls, config: LlamaConfig, files: dict[str, bytes], dropout: float = 0.0
    ) -> TrainableLora:
        """An adapter initialised from PEFT files (continue training, or start a new adapter from it), with
        their rank, alpha and targets; ``dropout`` is this training's.

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
        lora = cls(
            config, int(peft_config["r"]), float(peft_config["lora_alpha"]), tuple(targets), dropout=dropout
        )
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


@dataclass(frozen=True)
class _DroppingLayerLora(LayerLora):
    """A training layer's adapter with LoRA dropout on the adapter path's input."""

    dropout: float

    def add(self, out: Tensor, group: str, x: Tensor) -> Tensor:
        if group not in self.weights:
            return out
        return super().add(out, group, F.dropout(x, self.dropout, training=True))


class _Bound:
    """A ``TrainableLora`` bound to a dtype for one forward: ``layer(i)`` as ``Llama.hidden`` calls it on a
    ``LoraBatch`` (all layers' weights prepared at the first call)."""

    def __init__(self, lora: TrainableLora, dtype: torch.dtype) -> None:
        self.lora, self.dtype = lora, dtype
        self._layers: list[LayerLora] | None = None

    def layer(self, index: int) -> LayerLora:
        if self._layers is None:
            self._layers = self.lora.layers(self.dtype)
        return self._layers[index]


def lora_parameters(*adapters: TrainableLora | None) -> list[Tensor]:
    """The trainable tensors of the given adapters (None skipped)."""
    return [p for adapter in adapters if adapter is not None for p in adapter.parameters()]


def lora_hidden(
    model: Llama,
    x: Tensor,
    lora: TrainableLora | None,
    checkpointing: bool = False,
    block_fn: BlockFn = Block.infer,
) -> Tensor:
    """Final-normed hidden states [B, T, D] of right-padded inputs ``x`` [B, T, D] at positions 0..T-1,
    through ``lora`` (None: the base model), on the inference path with its fused projections; causal, no
    cache, differentiable. ``checkpointing`` recomputes each layer in backward instead of keeping its
    activations; ``block_fn`` is ``Block.infer`` or a compiled version of it."""
    model.fuse_projections()
    length = x.shape[1]
    model.ensure_positions(length)
    cos, sin = model.rope(torch.arange(length, device=x.device)[None])
    layer_loras = None if lora is None else lora.layers(model.dtype)
    for i, block in enumerate(model.model.layers):
        layer_lora = None if layer_loras is None else layer_loras[i]
        if checkpointing:
            x = checkpoint(block_fn, block, x, cos, sin, None, None, layer_lora, use_reentrant=False)
        else:
            x = block_fn(block, x, cos, sin, None, None, layer_lora)
    return model.model.norm(x)
