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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from torch import Tensor

from lloco.errors import FailedPrecondition, InvalidArgument
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
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's lora_alpha when a config leaves it out
_HEADER_BYTES_PER_TENSOR = 512  # a safetensors header entry: key, dtype, shape, offsets
# PEFT config fields whose LoRA forward is not W + scaling * B @ A on the projections (or that add weights)
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA",
    "modules_to_save": "modules_to_save (whole trained modules)",
    "fan_in_fan_out": "fan_in_fan_out (transposed weights)",
    "lora_bias": "lora_bias",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
    "megatron_config": "megatron_config",
}
# rank_pattern / alpha_pattern keys: peft matches them as regular expressions; plain module names only, so a
# caller's pattern cannot make the match backtrack without end
_MODULE_NAME = re.compile(r"[A-Za-z0-9_.]{1,200}")
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


def read_peft_files(
    source: dict[str, bytes] | Path, max_tensors: int | None = None
) -> tuple[dict, dict[str, Tensor]]:
    """adapter_config.json and adapter_model.safetensors, from a directory or from their bytes.

    Args:
        max_tensors: refuse weights with more tensors than this, counted in the safetensors header before
            any tensor is built (a file of many tiny tensors costs far more to load than its size says).
    Raises:
        InvalidArgument: a file is missing or unreadable, the weights are a pickle (a PyTorch ``.bin``), or
            the config is not a JSON object.
        FailedPrecondition: more tensors than ``max_tensors``.
    """
    try:
        if isinstance(source, dict):
            config_bytes, weight_bytes = source[CONFIG_FILE], source[WEIGHTS_FILE]
        else:
            config_bytes = (Path(source) / CONFIG_FILE).read_bytes()
            weight_bytes = (Path(source) / WEIGHTS_FILE).read_bytes()
    except (KeyError, FileNotFoundError) as exc:
        raise InvalidArgument(f"adapter files need {CONFIG_FILE} and {WEIGHTS_FILE}: {exc}") from exc
    if _is_pickle(weight_bytes):
        raise InvalidArgument(
            f"{WEIGHTS_FILE} is a pickle (a PyTorch .bin file), which is never loaded: save the adapter as "
            "safetensors (peft's save_pretrained does by default)"
        )
    try:
        config = json.loads(config_bytes)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"{CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidArgument(f"{CONFIG_FILE} must be a JSON object, got {type(config).__name__}")
    count = _tensor_count(weight_bytes)
    if max_tensors is not None and count is not None and count > max_tensors:
        raise FailedPrecondition(
            f"{WEIGHTS_FILE} holds {count} tensors; a LoRA of the served model has at most {max_tensors} "
            "(lora_A and lora_B of each projection of each layer)"
        )
    try:
        return config, load_safetensors_bytes(weight_bytes)
    except (ValueError, SafetensorError) as exc:
        raise InvalidArgument(f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}") from exc


def _tensor_count(data: bytes) -> int | None:
    """Entries of a safetensors header (its 8-byte little-endian length, then JSON); None when the header does
    not parse (the safetensors reader then says why)."""
    length = int.from_bytes(data[:8], "little")
    if len(data) < 8 or length > len(data) - 8:
        return None
    try:
        header = json.loads(data[8 : 8 + length])
    except (ValueError, RecursionError):
        return None
    return len(header) - ("__metadata__" in header) if isinstance(header, dict) else None


def _is_pickle(data: bytes) -> bool:
    """torch.save's zip archive or a bare pickle (protocol 2+), not a safetensors file (whose 8-byte header
    length is followed by the header's opening brace)."""
    if data[8:9] == b"{":
        return False
    return data.startswith(b"PK\x03\x04") or (
        data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    )


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
class LoraFit:
    """What an adapter must fit to be served: the base model's geometry, the slots' largest rank and the
    projections they adapt, and (when known) the served model's id, which a PEFT config's
    ``base_model_name_or_path`` must then name."""

    config: LlamaConfig
    max_rank: int
    targets: tuple[str, ...]
    model_id: str | None = None

    @property
    def max_weights_bytes(self) -> int:
        """The largest ``adapter_model.safetensors`` that can fit: every target of every layer at max_rank
        in fp32, plus room for the header. A larger file is refused before it is parsed."""
        per_layer = sum(self.max_rank * sum(_in_out(self.config, t)) for t in self.targets)
        tensors = 2 * len(self.targets) * self.config.n_layers
        return 4 * per_layer * self.config.n_layers + _HEADER_BYTES_PER_TENSOR * tensors + 2**20


@dataclass(frozen=True)
class PeftLora:
    """PEFT files checked against a ``LoraFit``, in host memory as the file stored them.

    ``weights[(layer, target)]`` is (A [r, in], B [out, r]) and ``scales[(layer, target)]`` its scaling: the
    adapter's delta on that projection is ``scaling * (x @ A.T) @ B.T``, whatever the config's alpha, rsLoRA
    and patterns.
    """

    rank: int
    targets: tuple[str, ...]
    base_model: str
    weights: dict[tuple[int, str], tuple[Tensor, Tensor]]
    scales: dict[tuple[int, str], float]


def check_peft_files(source: dict[str, bytes] | Path, fit: LoraFit) -> PeftLora:
    """Parse and validate PEFT LoRA files against what the server runs; allocates no slot.

    The files alone must make a plain LoRA (``W + scaling * B @ A`` on Llama projections, float weights);
    then they must fit ``fit``: the model's layers and projection shapes, the slots' targets and rank,
    and the model's name when the config gives one.

    Raises:
        InvalidArgument: the files themselves: missing, not JSON / safetensors (a pickle is refused unread),
            a config that is not a LoRA one or asks for a variant these slots do not compute (DoRA, bias,
            modules_to_save, ...), tensors that are not LoRA weights of Llama projections, non-float or
            non-finite weights, lora_A/lora_B that do not pair up or disagree with the config's rank.
        FailedPrecondition: files that do not fit ``fit``: another base model (name, layer count or
            shapes), a projection the slots do not adapt, a rank above ``fit.max_rank``, more tensors than
            a LoRA of the model can have (counted before any is loaded).
    """
    peft_config, tensors = read_peft_files(source, max_tensors=2 * fit.config.n_layers * len(MODULE_OF))
    rank_of, alpha_of, rslora = _lora_config(peft_config)
    pairs: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, tensor in sorted(tensors.items()):  # the first fault of a file is the same on every run
        match = _KEY.match(key)
        if match is None or match[2] != MODULE_OF[match[3]]:
            raise InvalidArgument(
                f"adapter tensor {key!r} is not a LoRA weight of a Llama projection "
                f"(base_model.model.model.layers.N.{{self_attn|mlp}}.{{{'|'.join(MODULE_OF)}}}.lora_{{A|B}}.weight)"
            )
        if tensor.dtype not in _WEIGHT_DTYPES:
            raise InvalidArgument(
                f"adapter tensor {key!r} is {tensor.dtype}; LoRA weights must be float16, bfloat16 or float32"
            )
        if tensor.dim() != 2:
            raise InvalidArgument(
                f"adapter tensor {key!r} has shape {tuple(tensor.shape)}; LoRA weights are 2-D"
            )
        pairs.setdefault((int(match[1]), match[3]), {})[match[4]] = tensor
    if not pairs:
        raise InvalidArgument("adapter has no LoRA weights")
    _check_finite(tensors)
    scales: dict[tuple[int, str], float] = {}
    for (layer, target), pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise InvalidArgument(f"adapter layer {layer} {target} lacks lora_A or lora_B")
        r = pair["A"].shape[0]
        if pair["B"].shape[1] != r:
            raise InvalidArgument(
                f"adapter layer {layer} {target}: lora_A {tuple(pair['A'].shape)} and lora_B "
                f"{tuple(pair['B'].shape)} do not share a rank"
            )
        name = f"model.layers.{layer}.{MODULE_OF[target]}.{target}"
        config_rank = rank_of(name)
        if config_rank != r:
            raise InvalidArgument(
                f"adapter layer {layer} {target} has rank {r} but {CONFIG_FILE} gives it rank {config_rank}"
            )
        alpha = alpha_of(name)
        scales[(layer, target)] = alpha / math.sqrt(r) if rslora else alpha / r
    _check_fit(peft_config, pairs, fit)
    return PeftLora(
        rank=max(pair["A"].shape[0] for pair in pairs.values()),
        targets=tuple(sorted({t for _, t in pairs})),
        base_model=str(peft_config.get("base_model_name_or_path") or ""),
        weights={key: (pair["A"], pair["B"]) for key, pair in pairs.items()},
        scales=scales,
    )


def _check_finite(tensors: dict[str, Tensor]) -> None:
    """InvalidArgument naming the first tensor (by key) that holds NaN or an infinity.

    This runs on every fill of the CPU tier, so it is one reduction over all weights of a dtype at once: a 7B
    adapter has hundreds of small tensors, whose checks one by one cost more in per-operation overhead than
    in bytes read, and the smallest and largest values are finite exactly when every value is (NaN
    propagates), a reduction many times faster than ``isfinite`` on bf16 CPU tensors. The culprit is looked for
    only when that fails.
    """
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for tensor in tensors.values():
        by_dtype.setdefault(tensor.dtype, []).append(tensor.reshape(-1))
    values = [torch.cat(flat) for flat in by_dtype.values()]
    if all(torch.isfinite(torch.stack(torch.aminmax(v))).all() for v in values if v.numel()):
        return
    key = next(key for key, tensor in sorted(tensors.items()) if not torch.isfinite(tensor).all())
    raise InvalidArgument(f"adapter tensor {key!r} holds NaN or infinite values")


def _lora_config(
    peft_config: dict[str, Any],
) -> tuple[Callable[[str], int], Callable[[str], float], bool]:
    """The rank and alpha of a module (by name, after rank/alpha patterns) and rsLoRA, from a PEFT config.

    Raises:
        InvalidArgument: not a LoRA config, malformed values, or a variant whose forward is not
            ``W + scaling * B @ A`` (named in the message).
    """
    peft_type = peft_config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise InvalidArgument(f"{CONFIG_FILE}: peft_type {peft_type!r} is not a LoRA adapter (LORA)")
    if peft_config.get("bias", "none") != "none":
        raise InvalidArgument(f"adapter bias {peft_config.get('bias')!r} is not supported (use 'none')")
    variants = [name for field, name in _UNSUPPORTED_FIELDS.items() if peft_config.get(field)]
    if variants:
        raise InvalidArgument(
            f"adapter uses {', '.join(variants)}, which these slots do not compute: only a plain LoRA "
            "(W + scaling * B @ A, optionally rsLoRA and rank/alpha patterns) is served"
        )
    rank = peft_config.get("r")
    alpha = peft_config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    rank_pattern = peft_config.get("rank_pattern") or {}
    alpha_pattern = peft_config.get("alpha_pattern") or {}
    rslora = peft_config.get("use_rslora", False)
    if not _positive(rank, int) or not _positive(alpha, float) or not isinstance(rslora, bool):
        raise InvalidArgument(
            f"{CONFIG_FILE} needs a positive integer r, a positive lora_alpha and a boolean use_rslora, got "
            f"{rank!r}, {alpha!r}, {rslora!r}"
        )
    for field, patterns, kind in (
        ("rank_pattern", rank_pattern, int),
        ("alpha_pattern", alpha_pattern, float),
    ):
        if not isinstance(patterns, dict) or not all(
            isinstance(k, str) and _MODULE_NAME.fullmatch(k) and _positive(v, kind)
            for k, v in patterns.items()
        ):
            raise InvalidArgument(
                f"{CONFIG_FILE}: {field} must map module names (letters, digits, '_' and '.') to positive "
                "numbers"
            )
    return (
        lambda name: int(_pattern_value(rank_pattern, name, rank)),
        lambda name: float(_pattern_value(alpha_pattern, name, alpha)),
        rslora,
    )


def _positive(value: object, kind: type) -> bool:
    """An int (kind int) or a real number (kind float) above zero; booleans are neither."""
    allowed = (int,) if kind is int else (int, float)
    return isinstance(value, allowed) and not isinstance(value, bool) and value > 0 and math.isfinite(value)


def _check_fit(
    peft_config: dict[str, Any], pairs: dict[tuple[int, str], dict[str, Tensor]], fit: LoraFit
) -> None:
    """FailedPrecondition unless well-formed LoRA weights fit the served model and slots."""
    config, served = fit.config, fit.model_id or "the served model"
    base = str(peft_config.get("base_model_name_or_path") or "")
    if fit.model_id and base and _model_name(base) != _model_name(fit.model_id):
        raise FailedPrecondition(
            f"adapter was trained on {base!r}; this server runs {fit.model_id!r}. If it was trained on this "
            f"model under another name, set base_model_name_or_path in {CONFIG_FILE} to {fit.model_id!r}"
        )
    for (layer, target), pair in sorted(pairs.items()):
        if layer >= config.n_layers:
            raise FailedPrecondition(
                f"adapter has weights for layer {layer}; {served} has {config.n_layers} layers: it was "
                "trained on another base model"
            )
        if target not in fit.targets:
            raise FailedPrecondition(
                f"adapter adapts {target}; this server's adapter slots serve {list(fit.targets)}"
            )
        fan_in, fan_out = _in_out(config, target)
        a, b = pair["A"], pair["B"]
        if a.shape[1] != fan_in or b.shape[0] != fan_out:
            raise FailedPrecondition(
                f"adapter layer {layer} {target}: shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit "
                f"{served}'s [r, {fan_in}], [{fan_out}, r]: it was trained on another base model"
            )
        if a.shape[0] > fit.max_rank:
            raise FailedPrecondition(
                f"adapter rank {a.shape[0]} exceeds the slots' max_rank {fit.max_rank} (lora.max_rank)"
            )


def _model_name(name: str) -> str:
    """A model's name without its owner or folder: "HuggingFaceTB/SmolLM2-135M-Instruct",
    "/models/SmolLM2-135M-Instruct/" and "smollm2-135m-instruct" are one name."""
    return re.split(r"/|--", name.rstrip("/"))[-1].lower()


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
        self.fit = LoraFit(config, max_rank, self.targets)
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

    def prepare(self, source: dict[str, bytes] | Path, pin_memory: bool = False) -> LoraAdapter:
        """Parse and validate PEFT files (``check_peft_files`` against ``self.fit``) into this geometry's
        layout, in host memory: page-locked with ``pin_memory`` (CUDA slots copy from it asynchronously).

        Raises:
            InvalidArgument / FailedPrecondition: as ``check_peft_files``.
        """
        checked = check_peft_files(source, self.fit)
        n_layers, rank = self.config.n_layers, self.max_rank
        # A goes straight into the final layout (page-locked when asked), one copy per weight; B through one
        # fp32 stack per target, scaled there and rounded once to the slots' dtype.
        a_groups = {
            group: torch.zeros(
                n_layers,
                len(names) * rank,
                _in_out(self.config, names[0])[0],
                dtype=self.dtype,
                pin_memory=pin_memory,
            )
            for group, names in self.groups.items()
        }
        b_scaled = {t: torch.zeros(n_layers, rank, _in_out(self.config, t)[1]) for t in self.targets}
        scales = {
            t: torch.tensor([checked.scales.get((layer, t), 0.0) for layer in range(n_layers)]).view(-1, 1, 1)
            for t in self.targets
        }
        a_rows = {
            t: (group, index * rank) for group, names in self.groups.items() for index, t in enumerate(names)
        }
        for (layer, target), (a, b) in checked.weights.items():
            group, row = a_rows[target]
            a_groups[group][layer, row : row + a.shape[0]].copy_(a)
            b_scaled[target][layer, : b.shape[1]].copy_(b.t())
        b_targets = {
            t: torch.empty(b.shape, dtype=self.dtype, pin_memory=pin_memory).copy_(b.mul_(scales[t]))
            for t, b in b_scaled.items()
        }
        return LoraAdapter(checked.rank, checked.targets, a_groups, b_targets)

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
