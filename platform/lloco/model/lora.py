"""Multi-LoRA: adapters in fixed slots, applied to a whole batch with one shrink and one expand matmul.

Layout. Projections that share an input form a group (``qkv``, ``o``, ``gate_up``, ``down``), matching the
fused weights of the inference path. For each layer and group the slots hold

    A: [S * n * R, in]    rows (slot s, target t, rank j) at s*n*R + t*R + j  (n = targets in the group)
    B: [S * n * R, out]   row (s, t, j) is nonzero only in target t's output columns, scaled by alpha/r

with ranks zero-padded to ``R = max_rank``. For a batch whose row b uses slot ``slot[b]`` (-1 = none):

    mask[b, c] = 1 if column c belongs to slot[b] else 0            # the per-row gather, as a 0/1 mask
    delta = ((x @ A.T) * mask) @ B                                  # [B, T, out], added to the projection

Two dense matmuls per group cover every adapter in the batch at once (no Python loop over adapters, no
per-row weight copies, CUDA-graph friendly); their cost grows with S * R, so keep slots x max_rank modest.
Slot tensors are updated in place (``load``/``unload``), never reallocated.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from torch import Tensor

from lloco.errors import InvalidArgument
from lloco.model.config import LlamaConfig
from lloco.model.llama import resolve_device

GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
MODULE_OF = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"} | {
    name: "mlp" for name in ("gate_proj", "up_proj", "down_proj")
}
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_([AB])\.weight$"
)


def _in_out(config: LlamaConfig, target: str) -> tuple[int, int]:
    return {
        "q_proj": (config.dim, config.q_dim),
        "k_proj": (config.dim, config.kv_dim),
        "v_proj": (config.dim, config.kv_dim),
        "o_proj": (config.q_dim, config.dim),
        "gate_proj": (config.dim, config.intermediate_size),
        "up_proj": (config.dim, config.intermediate_size),
        "down_proj": (config.intermediate_size, config.dim),
    }[target]


def read_peft_files(source: dict[str, bytes] | Path) -> tuple[dict, dict[str, Tensor]]:
    """adapter_config.json and adapter_model.safetensors, from a directory or from their bytes.

    Raises:
        InvalidArgument: a file is missing or unreadable.
    """
    try:
        if isinstance(source, dict):
            config_bytes, weight_bytes = source[CONFIG_FILE], source[WEIGHTS_FILE]
        else:
            config_bytes = (Path(source) / CONFIG_FILE).read_bytes()
            weight_bytes = (Path(source) / WEIGHTS_FILE).read_bytes()
    except (KeyError, FileNotFoundError) as exc:
        raise InvalidArgument(f"adapter files need {CONFIG_FILE} and {WEIGHTS_FILE}: {exc}") from exc
    try:
        return json.loads(config_bytes), load_safetensors_bytes(weight_bytes)
    except (ValueError, SafetensorError) as exc:
        raise InvalidArgument(f"unreadable adapter files: {exc}") from exc


def peft_geometry(source: dict[str, bytes] | Path) -> tuple[tuple[str, ...], int]:
    """Target projections and largest rank of PEFT files, read from their tensors.

    Raises:
        InvalidArgument: a tensor is not a LoRA weight of a Llama projection, or there is none.
    """
    targets, rank = set(), 0
    for key, tensor in read_peft_files(source)[1].items():
        match = _KEY.match(key)
        if match is None:
            raise InvalidArgument(f"adapter tensor {key!r} is not a LoRA weight of a Llama projection")
        targets.add(match[3])
        if match[4] == "A":
            rank = max(rank, tensor.shape[0])
    if not targets:
        raise InvalidArgument("adapter has no LoRA weights")
    return tuple(sorted(targets)), rank


def _pattern_value(patterns: dict, module_name: str, default: float) -> float:
    """peft's rank_pattern / alpha_pattern lookup: a key matches a module name's dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter laid out for a ``LoraSlots`` geometry, in host memory (the CPU tier).

    ``a[group]`` is [n_layers, n * R, in] (target-major, ranks padded); ``b[target]`` is [n_layers, R, out]
    with the scaling folded in.
    """

    rank: int
    targets: tuple[str, ...]
    a: dict[str, Tensor]
    b: dict[str, Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    def pin_memory(self) -> LoraAdapter:
        """A copy in page-locked memory, for fast asynchronous copies into GPU slots."""
        return LoraAdapter(
            self.rank,
            self.targets,
            {k: v.pin_memory() for k, v in self.a.items()},
            {k: v.pin_memory() for k, v in self.b.items()},
        )


@dataclass(frozen=True)
class LayerLora:
    """The adapters of one forward at one layer: per-group slot weights and per-row masks."""

    weights: dict[str, tuple[Tensor, Tensor]]  # group -> (A [S*n*R, in], B [S*n*R, out])
    masks: dict[str, Tensor]  # group -> [B, 1, S*n*R]

    def add(self, out: Tensor, group: str, x: Tensor) -> Tensor:
        """out [B, T, out] + ((x [B, T, in] @ A.T) * mask) @ B for the group, if the slots serve it."""
        if group not in self.weights:
            return out
        a, b = self.weights[group]
        return out + ((x @ a.t()) * self.masks[group]) @ b


@dataclass(frozen=True)
class LoraBatch:
    """Which slot each row of a batch uses, expanded to column masks once per forward."""

    slots: LoraSlots
    masks: dict[str, Tensor]

    def layer(self, index: int) -> LayerLora:
        return LayerLora(
            {g: (self.slots.a[g][index], self.slots.b[g][index]) for g in self.slots.groups}, self.masks
        )


class LoraSlots:
    """Fixed adapter slots on one device, stacked per layer and projection group, ranks padded to max_rank."""

    def __init__(
        self,
        config: LlamaConfig,
        n_slots: int,
        max_rank: int,
        targets: tuple[str, ...] = DEFAULT_TARGETS,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if n_slots < 1 or max_rank < 1:
            raise InvalidArgument(
                f"LoRA slots need n_slots >= 1 and max_rank >= 1, got {n_slots}, {max_rank}"
            )
        unknown = set(targets) - set(MODULE_OF)
        if unknown or not targets:
            raise InvalidArgument(f"LoRA targets must be among {sorted(MODULE_OF)}, got {targets}")
        self.config, self.n_slots, self.max_rank = config, n_slots, max_rank
        self.device, self.dtype = resolve_device(device), dtype
        self.groups = {g: tuple(t for t in names if t in targets) for g, names in GROUPS.items()}
        self.groups = {g: names for g, names in self.groups.items() if names}
        self.targets = tuple(t for names in self.groups.values() for t in names)
        self.a: dict[str, Tensor] = {}
        self.b: dict[str, Tensor] = {}
        self._out_offsets: dict[str, int] = {}
        for group, names in self.groups.items():
            fan_in = _in_out(config, GROUPS[group][0])[0]
            fan_out = sum(_in_out(config, t)[1] for t in GROUPS[group])
            rows = n_slots * len(names) * max_rank
            self.a[group] = torch.zeros(config.n_layers, rows, fan_in, device=self.device, dtype=dtype)
            self.b[group] = torch.zeros(config.n_layers, rows, fan_out, device=self.device, dtype=dtype)
            offset = 0
            for target in GROUPS[group]:
                self._out_offsets[target] = offset
                offset += _in_out(config, target)[1]

    def prepare(self, source: dict[str, bytes] | Path) -> LoraAdapter:
        """Parse and validate PEFT files into this geometry's layout (host memory).

        Raises:
            InvalidArgument: unsupported adapter features (DoRA, bias, modules_to_save), a target these slots
                do not serve, a rank above max_rank, or tensors whose shapes do not fit the model.
        """
        peft_config, tensors = read_peft_files(source)
        if peft_config.get("use_dora"):
            raise InvalidArgument("DoRA adapters are not supported")
        if peft_config.get("bias", "none") != "none":
            raise InvalidArgument(f"adapter bias {peft_config.get('bias')!r} is not supported (use 'none')")
        if peft_config.get("modules_to_save"):
            raise InvalidArgument(
                f"adapter modules_to_save {peft_config['modules_to_save']} is not supported"
            )
        pairs: dict[tuple[int, str], dict[str, Tensor]] = {}
        for key, tensor in tensors.items():
            match = _KEY.match(key)
            if match is None:
                raise InvalidArgument(f"adapter tensor {key!r} is not a LoRA weight of a Llama projection")
            layer, module, target, which = int(match[1]), match[2], match[3], match[4]
            if module != MODULE_OF[target] or layer >= self.config.n_layers:
                raise InvalidArgument(
                    f"adapter tensor {key!r} does not fit a {self.config.n_layers}-layer model"
                )
            if target not in self.targets:
                raise InvalidArgument(f"adapter targets {target}; these slots serve {self.targets}")
            pairs.setdefault((layer, target), {})[which] = tensor
        rank = 0
        per_target: dict[str, tuple[Tensor, Tensor]] = {}
        n_layers, max_rank = self.config.n_layers, self.max_rank
        for target in self.targets:
            fan_in, fan_out = _in_out(self.config, target)
            per_target[target] = (
                torch.zeros(n_layers, max_rank, fan_in),
                torch.zeros(n_layers, max_rank, fan_out),
            )
        for (layer, target), pair in pairs.items():
            if set(pair) != {"A", "B"}:
                raise InvalidArgument(f"adapter layer {layer} {target} lacks lora_A or lora_B")
            a, b = pair["A"].float(), pair["B"].float()
            fan_in, fan_out = _in_out(self.config, target)
            r = a.shape[0]
            if a.shape != (r, fan_in) or b.shape != (fan_out, r):
                raise InvalidArgument(
                    f"adapter layer {layer} {target}: shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit "
                    f"[r, {fan_in}], [{fan_out}, r]"
                )
            if r > max_rank:
                raise InvalidArgument(f"adapter rank {r} exceeds the slots' max_rank {max_rank}")
            name = f"model.layers.{layer}.{MODULE_OF[target]}.{target}"
            config_rank = _pattern_value(peft_config.get("rank_pattern") or {}, name, peft_config.get("r", r))
            alpha = _pattern_value(
                peft_config.get("alpha_pattern") or {}, name, peft_config.get("lora_alpha", r)
            )
            scaling = alpha / math.sqrt(config_rank) if peft_config.get("use_rslora") else alpha / config_rank
            per_target[target][0][layer, :r] = a
            per_target[target][1][layer, :r] = b.t() * scaling
            rank = max(rank, r)
        if not pairs:
            raise InvalidArgument("adapter has no LoRA weights")
        a_groups = {
            g: torch.cat([per_target[t][0] for t in names], dim=1).to(self.dtype)
            for g, names in self.groups.items()
        }
        b_targets = {t: per_target[t][1].to(self.dtype) for t in self.targets}
        return LoraAdapter(rank, tuple(sorted({t for _, t in pairs})), a_groups, b_targets)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots:
            raise InvalidArgument(f"LoRA slot {slot} is outside [0, {self.n_slots})")

    @torch.no_grad()
    def load(self, slot: int, adapter: LoraAdapter | dict[str, bytes] | Path) -> LoraAdapter:
        """Copy an adapter into a slot, replacing what was there; returns the prepared adapter."""
        self._check_slot(slot)
        if not isinstance(adapter, LoraAdapter):
            adapter = self.prepare(adapter)
        rank = self.max_rank
        for group, names in self.groups.items():
            rows = slice(slot * len(names) * rank, (slot + 1) * len(names) * rank)
            self.a[group][:, rows].copy_(adapter.a[group], non_blocking=True)
            self.b[group][:, rows].zero_()
            for t_index, target in enumerate(names):
                start = rows.start + t_index * rank
                columns = slice(
                    self._out_offsets[target], self._out_offsets[target] + adapter.b[target].shape[2]
                )
                self.b[group][:, start : start + rank, columns].copy_(adapter.b[target], non_blocking=True)
        return adapter

    @torch.no_grad()
    def unload(self, slot: int) -> None:
        """Zero a slot: rows pointing at it then get the base model."""
        self._check_slot(slot)
        for group, names in self.groups.items():
            rows = slice(slot * len(names) * self.max_rank, (slot + 1) * len(names) * self.max_rank)
            self.a[group][:, rows].zero_()
            self.b[group][:, rows].zero_()

    def batch(self, slots: Tensor) -> LoraBatch:
        """slots [B] long on the slots' device (-1 = no adapter) -> the masks of one forward."""
        one_hot = (slots[:, None] == torch.arange(self.n_slots, device=slots.device)).to(self.dtype)
        batch = slots.shape[0]
        masks = {  # expand + reshape, not repeat_interleave: no host sync, so CUDA graphs can capture it
            g: one_hot[:, :, None]
            .expand(batch, self.n_slots, len(names) * self.max_rank)
            .reshape(batch, 1, -1)
            for g, names in self.groups.items()
        }
        return LoraBatch(self, masks)
