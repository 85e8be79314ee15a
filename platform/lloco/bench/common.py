"""What every benchmark shares, so each figure is produced one way: model geometries, random models and
adapters, HF twins and baselines, timing, device figures and memory floors, a store, random tenants.

Timing: on CUDA, ``timed_ms`` reads CUDA events around the work (host clock elsewhere); callers time after
a warm-up call (kernel selection, CUDA graph capture, compilation), which they report apart, and report
medians. Floors: a decode step must at least read the weights and the KV cache in use once; its floor is
given at two bandwidths, ``Floors.measured`` (a device-to-device copy timed in the same run, read + write
bytes) and ``Floors.spec`` (the device's data-sheet figure, when the device is in ``DEVICE_SPECS``).
Benchmarks never import each other: what two of them need lives here.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from lloco.model import Generator, Llama, LlamaConfig, SamplingParams
from lloco.model.loading import build_llama

GEOMETRIES: dict[str, dict[str, int]] = {
    "llama2-7b": dict(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, intermediate_size=11008
    ),
    "small": dict(vocab_size=1024, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, intermediate_size=512),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
PAPER_SEGMENT_LEN, PAPER_K = 1536, 50  # LLoCO's compressor on LLaMA-2-7B: segments of S tokens -> k vectors


@dataclass(frozen=True)
class DeviceSpec:
    """Data-sheet figures of an accelerator (dense, no sparsity)."""

    memory_bandwidth: float  # bytes/s
    bf16_flops: float  # FLOP/s


DEVICE_SPECS = {  # matched as a substring of torch.cuda.get_device_name
    "H200": DeviceSpec(memory_bandwidth=4.8e12, bf16_flops=989e12),
    "H100": DeviceSpec(memory_bandwidth=3.35e12, bf16_flops=989e12),  # SXM
}


def device_spec(device: torch.device) -> DeviceSpec | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((spec for key, spec in DEVICE_SPECS.items() if key in name), None)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_info(module: str, argv: Sequence[str] | None, device: torch.device) -> dict[str, Any]:
    """The fields every result starts with: the command, where and when it ran, library versions."""
    import peft
    import transformers

    args = list(sys.argv[1:] if argv is None else argv)
    return {
        "command": " ".join([f"python -m {module}", *args]),
        "device_name": device_name(device),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


# -- timing --------------------------------------------------------------------------------------------------


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a bench that drives the engine on a random model: where results go, the tiny smoke
    geometry, the device and an S3 to use."""
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="small geometry on CPU: a smoke run")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--s3-endpoint", default=None, help="an S3 to use instead of a local SeaweedFS")


def goals_and_errors(result: dict[str, Any]) -> list[str]:
    """The closing sections of a bench's markdown: its goals (met or not) and the errors of its run."""
    lines: list[str] = []
    if result.get("goals"):
        lines += ["## Goals (issue 19)", "", "| goal | value | met |", "|---|---|---|"]
        lines += [f"| {g['goal']} | {g['value']} | {'yes' if g['met'] else 'no'} |" for g in result["goals"]]
        lines.append("")
    if result.get("errors"):
        lines += ["## Errors", ""] + [f"- {e}" for e in result["errors"]] + [""]
    return lines


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of ``fn`` by CUDA events (host clock on CPU)."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median of ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    return statistics.median(timed_ms(fn, device) for _ in range(repeats))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank above), for small samples too; NaN for none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


# -- device figures and floors ----------------------------------------------------------------------------------


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> float:
    """Bytes/s of a device-to-device copy (read + write bytes), median of ``repeats`` after a warm-up."""
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**26)
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = median_ms(functools.partial(target.copy_, source), device, repeats)
    del source, target
    return 2 * nbytes / (ms / 1e3)


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5
) -> float:
    """FLOP/s of one square ``n`` x ``n`` matmul in ``dtype``, median of ``repeats`` after a warm-up."""
    n = n or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(functools.partial(torch.mm, a, b), device, repeats)
    return 2 * n**3 / (ms / 1e3)


@dataclass(frozen=True)
class Floors:
    """Bandwidths a memory floor is computed at: measured in this run (device copy) and the data sheet's."""

    measured: float  # bytes/s
    spec: float | None  # bytes/s; None: the device is not in DEVICE_SPECS

    @classmethod
    def of(cls, device: torch.device) -> Floors:
        spec = device_spec(device)
        return cls(measure_copy_bandwidth(device), spec.memory_bandwidth if spec else None)

    def floor_ms(self, nbytes: float) -> dict[str, float | None]:
        return {
            "floor_measured_ms": nbytes / self.measured * 1e3,
            "floor_spec_ms": nbytes / self.spec * 1e3 if self.spec else None,
        }

    def describe(self) -> dict[str, float | None]:
        return {
            "measured_copy_tb_s": self.measured / 1e12,
            "spec_tb_s": self.spec / 1e12 if self.spec else None,
        }


def decode_bytes(config: LlamaConfig, batch: int, mean_position: float, weight_bytes: int = 2) -> float:
    """Bytes a decode step must read at least: every weight but the embedding table, plus the KV in use."""
    weights = weight_bytes * (
        config.n_layers
        * (
            config.dim * (config.q_dim + 2 * config.kv_dim)
            + config.q_dim * config.dim
            + 3 * config.dim * config.intermediate_size
            + 2 * config.dim
        )
        + config.dim
        + config.vocab_size * config.dim
    )
    kv = weight_bytes * batch * mean_position * 2 * config.n_layers * config.kv_dim
    return weights + kv


# -- random models, adapters, inputs --------------------------------------------------------------------------------


def random_llama(config: LlamaConfig, device: torch.device, dtype: torch.dtype, seed: int) -> Llama:
    """Our Llama with N(0, 0.02) weights and norms near 1, generated on the device (speed does not depend
    on the values)."""
    generator = torch.Generator(device).manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in Llama(config).state_dict().items()}
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            state[name] = 1 + 0.1 * torch.rand(shape, generator=generator, device=device, dtype=dtype)
        else:
            state[name] = 0.02 * torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return build_llama(config, state, dtype, device)


def random_adapter(config: LlamaConfig, rank: int, seed: int) -> dict[str, bytes]:
    """A rank-``rank`` LoRA on q/k/v/o in PEFT's file format (HF key names), random A and B."""
    generator = torch.Generator().manual_seed(seed)
    fans = {"q_proj": (config.dim, config.q_dim), "k_proj": (config.dim, config.kv_dim)}
    fans |= {"v_proj": (config.dim, config.kv_dim), "o_proj": (config.q_dim, config.dim)}
    tensors = {}
    for layer in range(config.n_layers):
        for target, (fan_in, fan_out) in fans.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            tensors[f"{key}.lora_A.weight"] = (
                torch.randn(rank, fan_in, generator=generator) * 0.02
            ).bfloat16()
            tensors[f"{key}.lora_B.weight"] = (
                torch.randn(fan_out, rank, generator=generator) * 0.02
            ).bfloat16()
    peft_config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS)}
    return {
        "adapter_config.json": json.dumps(peft_config).encode(),
        "adapter_model.safetensors": save_safetensors(tensors),
    }


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    """``n`` token ids in [3, vocab): no special token of the test tokenizer."""
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def compressed_length(doc_tokens: int, segment_len: int, k: int) -> int:
    """Summary vectors of a compressed document: ceil(n / S) * k."""
    return math.ceil(doc_tokens / segment_len) * k


def context_vectors(model: Llama, doc_tokens: int, segment_len: int, k: int, seed: int) -> torch.Tensor:
    """[ceil(n/S)*k, D] vectors at the embedding table's scale: what a compressed document looks like."""
    generator = torch.Generator(model.device).manual_seed(seed)
    scale = model.embed(torch.arange(64, device=model.device)).float().std().item()
    shape = (compressed_length(doc_tokens, segment_len, k), model.config.dim)
    return (torch.randn(*shape, generator=generator, device=model.device) * scale).to(model.dtype)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def padded_tokenizer(vocab_size: int) -> Any:
    """The tiny test tokenizer with placeholder tokens up to ``vocab_size``, so every model id decodes, and
    without an end-of-sequence token: random weights would end some tenants' queries at their first token
    (a CPU run of the fairness section had one tenant's end at once), and a load would not be the one the
    bench states. The chat template still writes its turn ends."""
    from lloco.model.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([f"<t{i}>" for i in range(len(tokenizer), vocab_size)])
    tokenizer.eos_token = None
    return tokenizer


def engine_compiles(device: torch.device) -> bool:
    """Whether the serving engine compiles its decode step here (``engine.compile``, CUDA only)."""
    from lloco.config import EngineSettings

    return EngineSettings().compile and device.type == "cuda"


# -- our decode, measured -------------------------------------------------------------------------------------------

MODES: dict[str, dict[str, bool]] = {  # decode variants: Generator options (CUDA graphs only on CUDA)
    "eager": dict(cuda_graphs=False, fused=False),
    "graphs": dict(fused=False),
    "compiled": dict(compile=True, fused=False),
    "fused": dict(compile=True, fused=True),  # Triton kernels at batch 1, the compiled layers above
}


def mode_options(mode: str, device: torch.device) -> dict[str, bool]:
    return MODES[mode] | ({} if device.type == "cuda" else dict(cuda_graphs=False))


def run_to_end(
    gen: Generator, prompts: list[list[int]], slots: list[int], new_tokens: int
) -> tuple[dict[str, list[int]], list[float]]:
    """Add requests, step until done; returns tokens per request and per-step ms of the decode steps."""
    for i, (prompt, slot) in enumerate(zip(prompts, slots, strict=True)):
        gen.add(f"r{i}", None, prompt, slot, SamplingParams(new_tokens))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    step_ms = []
    outputs: list = []
    first = True
    while gen.active():
        outputs.clear()
        ms = timed_ms(lambda: outputs.extend(gen.step()), gen.device)
        if not first:  # the first step is the prefill
            step_ms.append(ms)
        first = False
        for out in outputs:
            tokens[out.request_id].append(out.token_id)
    return tokens, step_ms


@torch.no_grad()
def measure_decode(
    model: Llama,
    slots: Any,
    batches: list[int],
    prompt_len: int,
    new_tokens: int,
    modes: list[str],
    floors: Floors,
    deadline: float = math.inf,
) -> list[dict[str, Any]]:
    """Median ms per decode step of our ``Generator`` per mode and batch, without and with adapters (the
    rows round-robin over ``slots``' loaded adapters), beside the step's memory floor at both bandwidths.
    A run (graph capture, compilation) precedes the timed one and is reported as warm-up."""
    rows = []
    for mode in modes:
        for batch in batches:
            if mode == "fused" and batch > 1:  # the fused kernels run batch 1; larger steps are "compiled"
                continue
            for adapters in (False, True):
                if time.time() > deadline:
                    rows.append(
                        {"mode": mode, "batch": batch, "adapters": adapters, "skipped": "time budget"}
                    )
                    continue
                gen = Generator(
                    model,
                    slots,
                    batch,
                    prompt_len + new_tokens + 8,
                    eos_token_ids=(),
                    **mode_options(mode, model.device),
                )
                prompts = [random_ids(prompt_len, model.config.vocab_size, seed=i) for i in range(batch)]
                row_slots = [i % slots.n_slots if adapters else -1 for i in range(batch)]
                start = time.perf_counter()
                _, warm_ms = run_to_end(gen, prompts, row_slots, new_tokens)
                warmup_s = time.perf_counter() - start
                _, step_ms = run_to_end(gen, prompts, row_slots, new_tokens)
                median = statistics.median(step_ms)
                floor = floors.floor_ms(decode_bytes(model.config, batch, prompt_len + new_tokens / 2))
                row = {
                    "mode": mode,
                    "batch": batch,
                    "adapters": adapters,
                    "step_ms": median,
                    "tok_s": batch / median * 1e3,
                    **floor,
                    "vs_measured_floor": median / floor["floor_measured_ms"],
                    "vs_spec_floor": median / floor["floor_spec_ms"] if floor["floor_spec_ms"] else None,
                    "warmup_s": warmup_s,
                    "warmup_extra_s": (sum(warm_ms) - median * len(warm_ms)) / 1e3,
                    "steps": len(step_ms),
                }
                rows.append(row)
                print(
                    f"decode {mode} batch {batch} adapters {adapters}: {median:.2f} ms/step "
                    f"({row['tok_s']:.0f} tok/s, {row['vs_measured_floor']:.2f}x the measured-copy floor), "
                    f"warm-up {warmup_s:.1f} s",
                    flush=True,
                )
                del gen  # frees its KV cache and graphs before the next size
                free_memory()
    return rows


# -- HF baselines ----------------------------------------------------------------------------------------------------

HF_CACHES = (
    "dynamic",
    "static",
)  # HF generate's default cache; static cache + torch.compile (what a user would pick)


def hf_twin(model: Llama) -> Any:
    """HF ``LlamaForCausalLM`` sharing our model's weight tensors (no second copy)."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    c = model.config
    hf_config = HFLlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.dim,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_config)
    hf.load_state_dict(model.state_dict(), strict=True, assign=True)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_config).to(model.device)
    hf.generation_config.pad_token_id = 0
    hf.generation_config.eos_token_id = None
    return hf.eval()


def hf_compiles(cache: str, device: torch.device) -> bool:
    """Whether HF ``generate`` compiles its decode forward: with a static cache, on CUDA (HF's own rule)."""
    return cache == "static" and device.type == "cuda"


@torch.no_grad()
def hf_generate_ms(hf: Any, new_tokens: int, cache: str, repeats: int, **inputs: Any) -> tuple[float, float]:
    """(median ms, warm-up s) of ``hf.generate(**inputs)`` making exactly ``new_tokens`` greedy tokens with
    HF's ``cache`` ("dynamic" or "static"). The warm-up is the same call (with a static cache it compiles
    the decode forward for this shape)."""
    device = hf.device
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if cache == "static":
        options["cache_implementation"] = "static"
    call = functools.partial(hf.generate, **inputs, **options)
    started = time.perf_counter()
    call()
    sync(device)
    warmup_s = time.perf_counter() - started
    return statistics.median(timed_ms(call, device) for _ in range(repeats)), warmup_s


def hf_decode(
    hf: Any, batch: int, prompt_len: int, new_tokens: int, cache: str, repeats: int = 2
) -> dict[str, Any]:
    """HF ``generate`` per decode step, (T(1 + n tokens) - T(1 token)) / n, on random prompts."""
    ids = torch.tensor(
        [random_ids(prompt_len, hf.config.vocab_size, seed=i) for i in range(batch)], device=hf.device
    )
    one, warm_one = hf_generate_ms(hf, 1, cache, repeats, input_ids=ids)
    full, warm_full = hf_generate_ms(hf, new_tokens + 1, cache, 1, input_ids=ids)
    step = (full - one) / new_tokens
    print(f"hf decode ({cache} cache) batch {batch}: {step:.2f} ms/step", flush=True)
    return {
        "cache": cache,
        "compiled": hf_compiles(cache, hf.device),
        "batch": batch,
        "step_ms": step,
        "tok_s": batch / step * 1e3,
        "prefill_ms": one,
        "warmup_s": warm_one + warm_full,
    }


def strongest(rows: list[dict[str, Any]], batch: int, key: str = "tok_s") -> dict[str, Any] | None:
    """The fastest of ``rows`` at ``batch`` (the baseline a ratio is taken against)."""
    return max((r for r in rows if r.get("batch") == batch and key in r), key=lambda r: r[key], default=None)


@contextmanager
def adapter_dirs(config: LlamaConfig, count: int, rank: int) -> Iterator[list[Path]]:
    """``count`` random rank-``rank`` adapters in PEFT's on-disk format, in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="lloco-bench-adapters-") as root:
        dirs = []
        for seed in range(count):
            folder = Path(root) / f"a{seed}"
            folder.mkdir()
            for name, data in random_adapter(config, rank, seed).items():
                (folder / name).write_bytes(data)
            dirs.append(folder)
        yield dirs


@torch.no_grad()
def peft_mixed_decode(
    hf: Any, dirs: list[Path], batch: int, prompt_len: int, new_tokens: int
) -> dict[str, Any]:
    """peft's mixed-adapter batch: one adapter name per row; per-step time as (T(1 + n) - T(1)) / n.

    Also times each ``load_adapter`` from local disk. The adapters are removed again.
    """
    from peft import PeftModel

    device = hf.device
    loads = []
    started = time.perf_counter()
    peft_model = PeftModel.from_pretrained(hf, str(dirs[0]), adapter_name="a0")
    sync(device)
    loads.append(time.perf_counter() - started)
    for index, folder in enumerate(dirs[1:], start=1):
        started = time.perf_counter()
        peft_model.load_adapter(str(folder), adapter_name=f"a{index}")
        sync(device)
        loads.append(time.perf_counter() - started)
    names = [f"a{i % len(dirs)}" for i in range(batch)]
    ids = torch.tensor(
        [random_ids(prompt_len, hf.config.vocab_size, seed=i) for i in range(batch)], device=device
    )
    mask = torch.ones_like(ids)

    def generate(n: int) -> float:
        sync(device)
        begin = time.perf_counter()
        peft_model.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=names,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
        )
        sync(device)
        return time.perf_counter() - begin

    generate(2)
    one = statistics.median(generate(1) for _ in range(2))
    full = generate(new_tokens + 1)
    step_ms = (full - one) / new_tokens * 1e3
    peft_model.unload()  # puts the plain modules back: hf is the base model again
    free_memory()
    print(f"peft mixed batch {batch}: {step_ms:.1f} ms/step", flush=True)
    return {
        "step_ms": step_ms,
        "tok_s": batch / step_ms * 1e3,
        "load_adapter_ms": [s * 1e3 for s in loads],
        "load_adapter_p50_ms": statistics.median(loads) * 1e3,
    }
