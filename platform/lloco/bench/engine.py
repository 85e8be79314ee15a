"""Engine benchmark: our decoder beside HF transformers on one GPU, with random bf16 weights.

    PYTHONPATH=platform python -m lloco.bench.engine --out DIR

First checks bf16 correctness against HF on a small geometry (logits, cached decode, greedy tokens, CUDA
graphs, compiled and fused steps against eager). Then, on LLaMA-2-7B geometry (random weights: speed does not
depend on their values): prefill tokens/s at 2k/8k/32k tokens, decode tokens/s at batch 1/8/32 with and
without 8 rank-8 adapters, each beside HF ``generate``/forward on the same weights in the same run. Times
are CUDA-event medians after warm-up; warm-up (graph capture, compilation) is reported apart. The memory
floor of a decode step is (weights read + KV bytes read) / 4.3 TB/s, the copy bandwidth measured on the H200.
``--profile-batch N`` then profiles 32 decode steps at batch N (the last of ``--modes``): device time per
kernel name per step, and how much of the step the device sits idle.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from lloco.bench.report import run_section, write_report
from lloco.model import Generator, Llama, LlamaConfig, LoraSlots, SamplingParams
from lloco.model.loading import build_llama

GEOMETRIES: dict[str, dict[str, int]] = {
    "llama2-7b": dict(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, intermediate_size=11008
    ),
    "small": dict(vocab_size=1024, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, intermediate_size=512),
}
COPY_BANDWIDTH = 4.3e12  # bytes/s, device-to-device copy measured on the H200 (NOTES.md)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MODES: dict[str, dict[str, bool]] = {  # decode variants: Generator options (CUDA graphs only on CUDA)
    "eager": dict(cuda_graphs=False, fused=False),
    "graphs": dict(fused=False),
    "compiled": dict(compile=True, fused=False),
    "fused": dict(compile=True, fused=True),  # Triton kernels at batch 1, the compiled layers above
}


def mode_options(mode: str, device: torch.device) -> dict[str, bool]:
    return MODES[mode] | ({} if device.type == "cuda" else dict(cuda_graphs=False))


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


def random_llama(config: LlamaConfig, device: torch.device, dtype: torch.dtype, seed: int) -> Llama:
    """Our Llama with N(0, 0.02) weights and norms near 1, generated on the device."""
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


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def run_to_end(
    gen: Generator, prompts: list[list[int]], slots: list[int], new_tokens: int
) -> tuple[dict, list]:
    """Add requests, step until done; returns tokens per request and per-step ms of the decode steps."""
    for i, (prompt, slot) in enumerate(zip(prompts, slots, strict=True)):
        gen.add(f"r{i}", None, prompt, slot, SamplingParams(new_tokens))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    step_ms = []
    outputs: list = []
    first = True
    while gen.active():
        outputs.clear()
        ms = timed_ms(functools.partial(_step_into, gen, outputs), gen.device)
        if not first:
            step_ms.append(ms)
        first = False
        for out in outputs:
            tokens[out.request_id].append(out.token_id)
    return tokens, step_ms


def _step_into(gen: Generator, outputs: list) -> None:
    outputs.extend(gen.step())


@torch.no_grad()
def profile_decode(
    model: Llama, slots: LoraSlots, batch: int, prompt_len: int, steps: int, mode: str, top: int = 20
) -> dict[str, Any]:
    """Where decode steps spend their time: kernels grouped by name, per step, beside the measured step.

    The gap between the step (CUDA events around ``Generator.step``) and the sum of its kernels is time the
    device waits: host work between steps and launch latency between kernels.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = model.device.type == "cuda"
    gen = Generator(
        model,
        slots,
        batch,
        prompt_len + 2 * steps + 8,
        eos_token_ids=(),
        **mode_options(mode, model.device),
    )
    prompts = [torch.randint(0, model.config.vocab_size, (prompt_len,)).tolist() for _ in range(batch)]
    run_to_end(gen, prompts, [-1] * batch, steps)  # warm-up: graph capture, compilation
    for i, prompt in enumerate(prompts):
        gen.add(f"p{i}", None, prompt, -1, SamplingParams(steps + 1))
    gen.step()  # prefill, left out
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        step_ms = [timed_ms(gen.step, model.device) for _ in range(steps)]
    while gen.active():
        gen.step()
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    kernels = [e for e in prof.key_averages() if e.device_type == kind]
    attribute = "self_device_time_total" if cuda else "self_cpu_time_total"
    per_step = sorted(
        (
            {
                "name": e.key[:120],
                "calls_per_step": e.count / steps,
                "us_per_step": getattr(e, attribute) / steps,
            }
            for e in kernels
        ),
        key=lambda row: -row["us_per_step"],
    )
    kernel_ms = sum(row["us_per_step"] for row in per_step) / 1e3
    step = statistics.median(step_ms)
    return {
        "mode": mode,
        "batch": batch,
        "steps": steps,
        "step_ms": step,
        "kernel_ms_per_step": kernel_ms,
        "kernels_per_step": sum(row["calls_per_step"] for row in per_step),
        "idle_ms_per_step": step - kernel_ms,
        "top": per_step[:top],
    }


@torch.no_grad()
def check_correctness(device: torch.device, dtype: torch.dtype, modes: list[str]) -> dict[str, Any]:
    """bf16 agreement with HF on the small geometry, and of graph/compiled steps with eager ones."""
    config = LlamaConfig(**GEOMETRIES["small"], max_position_embeddings=1024)
    model = random_llama(config, device, dtype, seed=0)
    hf = hf_twin(model)
    generator = torch.Generator(device).manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (4, 200), generator=generator, device=device)
    ref = hf(ids).logits
    report: dict[str, Any] = {"geometry": GEOMETRIES["small"], "dtype": str(dtype)}
    report["forward_rel_err"] = rel_err(model(model.embed(ids)), ref)
    from lloco.model import KVCache

    cache = KVCache.allocate(config, 4, 256, device, dtype)
    last = torch.full((4,), 199, device=device)
    logits = model.prefill(model.embed(ids), cache, torch.arange(4, device=device), last)
    report["prefill_rel_err"] = rel_err(logits, ref[:, -1])
    seq, positions, errors = ids, torch.full((4,), 200, device=device), []
    for _ in range(4):
        tokens = logits.argmax(-1)
        seq = torch.cat([seq, tokens[:, None]], dim=1)
        logits = model.decode(tokens, positions, cache, kv_len=256)
        errors.append(rel_err(logits, hf(seq).logits[:, -1]))
        positions += 1
    report["decode_rel_err"] = max(errors)
    prompts = [ids[i, : 50 + 30 * i].tolist() for i in range(4)]
    slots = LoraSlots(config, 2, 8, TARGETS, device, dtype)
    slots.load(0, random_adapter(config, 8, 0))
    slots.load(1, random_adapter(config, 4, 1))
    row_slots = [-1, 0, 1, 0]
    outputs = {}
    for name in MODES:
        if name == "eager" or name in modes:
            gen = Generator(model, slots, 4, 256, eos_token_ids=(), **mode_options(name, device))
            outputs[name] = run_to_end(gen, prompts, row_slots, 24)[0]
    if "graphs" in outputs:
        report["graphs_equal_eager"] = outputs["graphs"] == outputs["eager"]
    for name in ("compiled", "fused"):
        if name in outputs:
            report[f"{name}_token_agreement"] = _agreement(outputs[name], outputs["eager"])
    base_only = run_to_end(
        Generator(model, None, 4, 256, eos_token_ids=(), **mode_options("eager", device)),
        prompts,
        [-1] * 4,
        24,
    )[0]
    hf_tokens = {}
    for i, prompt in enumerate(prompts):
        out = hf.generate(torch.tensor([prompt], device=device), max_new_tokens=24, do_sample=False)
        hf_tokens[f"r{i}"] = out[0, len(prompt) :].tolist()
    report["greedy_token_agreement_hf"] = _agreement(base_only, hf_tokens)
    return report


def _agreement(a: dict[str, list[int]], b: dict[str, list[int]]) -> float:
    """Mean fraction of each sequence's tokens equal up to its first divergence (bf16 may flip a near-tie)."""
    fractions = []
    for key in a:
        same = next((i for i, (x, y) in enumerate(zip(a[key], b[key], strict=False)) if x != y), len(a[key]))
        fractions.append(same / max(len(a[key]), 1))
    return sum(fractions) / len(fractions)


@torch.no_grad()
def bench_prefill(model: Llama, hf: Any, lengths: list[int], repeats: int) -> list[dict[str, Any]]:
    device, vocab = model.device, model.config.vocab_size
    gen = Generator(model, None, 1, max(lengths) + 16, cuda_graphs=False, max_prefill_tokens=max(lengths))
    rows = []
    for length in lengths:
        ids = torch.randint(0, vocab, (length,)).tolist()
        runs = {
            "ours": functools.partial(_prefill_ours, gen, ids),
            "hf": functools.partial(_prefill_hf, hf, torch.tensor([ids], device=device)),
        }
        row: dict[str, Any] = {"tokens": length}
        for name, fn in runs.items():
            fn()
            ms = statistics.median(timed_ms(fn, device) for _ in range(repeats))
            row[f"{name}_ms"], row[f"{name}_tok_s"] = ms, length / ms * 1e3
        row["speedup"] = row["hf_ms"] / row["ours_ms"]
        rows.append(row)
        print(f"prefill {length}: ours {row['ours_ms']:.1f} ms, hf {row['hf_ms']:.1f} ms", flush=True)
    return rows


def _prefill_ours(gen: Generator, ids: list[int]) -> None:
    gen.add("p", None, ids, params=SamplingParams(1))  # one token: the request ends with its prefill
    gen.step()


def _prefill_hf(hf: Any, ids: torch.Tensor) -> None:
    hf(input_ids=ids, use_cache=True, logits_to_keep=1)


def decode_floor_ms(config: LlamaConfig, batch: int, mean_position: float) -> float:
    """Bytes a decode step must read at least (weights but the embedding table, plus the KV in use) / 4.3 TB/s."""
    weights = 2 * (
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
    kv = 2 * batch * mean_position * 2 * config.n_layers * config.kv_dim
    return (weights + kv) / COPY_BANDWIDTH * 1e3


@torch.no_grad()
def bench_decode(
    model: Llama,
    slots: LoraSlots,
    batches: list[int],
    prompt_len: int,
    new_tokens: int,
    modes: list[str],
    deadline: float,
) -> list[dict[str, Any]]:
    config, rows = model.config, []
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
                prompts = [torch.randint(0, config.vocab_size, (prompt_len,)).tolist() for _ in range(batch)]
                row_slots = [i % slots.n_slots if adapters else -1 for i in range(batch)]
                start = time.perf_counter()
                _, warm_ms = run_to_end(gen, prompts, row_slots, new_tokens)
                warmup_s = time.perf_counter() - start
                _, step_ms = run_to_end(gen, prompts, row_slots, new_tokens)
                median = statistics.median(step_ms)
                floor = decode_floor_ms(config, batch, prompt_len + new_tokens / 2)
                row = {
                    "mode": mode,
                    "batch": batch,
                    "adapters": adapters,
                    "step_ms": median,
                    "tok_s": batch / median * 1e3,
                    "floor_ms": floor,
                    "vs_floor": median / floor,
                    "warmup_s": warmup_s,
                    "warmup_extra_s": (sum(warm_ms) - median * len(warm_ms)) / 1e3,
                    "steps": len(step_ms),
                }
                rows.append(row)
                print(
                    f"decode {mode} batch {batch} adapters {adapters}: {median:.2f} ms/step "
                    f"({row['tok_s']:.0f} tok/s, {row['vs_floor']:.2f}x floor), warm-up {warmup_s:.1f} s",
                    flush=True,
                )
                del gen  # frees its KV cache and graphs before the next size
                _free()
    return rows


@torch.no_grad()
def bench_hf_decode(hf: Any, batches: list[int], prompt_len: int, new_tokens: int, vocab: int) -> list[dict]:
    """HF ``generate`` per decode step: (time for 1 + n tokens - time for 1 token) / n."""
    device, rows = hf.device, []
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, prompt_len), device=device)
        _hf_generate(hf, ids, 2)
        one = statistics.median(
            timed_ms(functools.partial(_hf_generate, hf, ids, 1), device) for _ in range(2)
        )
        full = timed_ms(functools.partial(_hf_generate, hf, ids, new_tokens + 1), device)
        step = (full - one) / new_tokens
        rows.append({"batch": batch, "step_ms": step, "tok_s": batch / step * 1e3, "prefill_ms": one})
        print(f"hf decode batch {batch}: {step:.2f} ms/step", flush=True)
        _free()
    return rows


def _hf_generate(hf: Any, ids: torch.Tensor, n: int) -> None:
    hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def render_markdown(result: dict[str, Any]) -> str:
    """The tables of a result, with the goals of issue 3."""
    lines = [
        f"# Engine benchmark ({result['geometry_name']}, random {result['dtype']} weights)",
        "",
        f"`{result['command']}` on {result['gpu']}, {result['date']}; torch {result['torch']}, "
        f"transformers {result['transformers']}.",
        "",
    ]
    check = result.get("correctness", {})
    if check:
        lines += [
            "## bf16 correctness (small geometry, vs HF on the same weights)",
            "",
            "| check | value |",
            "|---|---|",
        ]
        lines += [
            f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in check.items()
            if k != "geometry"
        ]
        lines.append("")
    if result.get("prefill"):
        lines += [
            "## Prefill (one sequence)",
            "",
            "| tokens | ours tok/s | HF tok/s | ours / HF |",
            "|---:|---:|---:|---:|",
        ]
        for r in result["prefill"]:
            lines.append(
                f"| {r['tokens']} | {r['ours_tok_s']:,.0f} | {r['hf_tok_s']:,.0f} | {r['speedup']:.2f}x |"
            )
        lines.append("")
    if result.get("decode"):
        hf = {r["batch"]: r for r in result.get("hf_decode", [])}
        lines += [
            f"## Decode ({result['prompt_len']}-token prompts, {result['new_tokens']} new tokens, "
            f"{result['n_adapters']} rank-{result['rank']} adapters round-robin when on)",
            "",
            "| mode | batch | adapters | ms/step | tok/s | floor ms | vs floor | HF tok/s | ours / HF | warm-up s |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["decode"]:
            if "skipped" in r:
                lines.append(
                    f"| {r['mode']} | {r['batch']} | {r['adapters']} | skipped: {r['skipped']} | | | | | | |"
                )
                continue
            ref = hf.get(r["batch"])
            ratio = f"{r['tok_s'] / ref['tok_s']:.2f}x" if ref else "-"
            hf_tok = f"{ref['tok_s']:,.0f}" if ref else "-"
            lines.append(
                f"| {r['mode']} | {r['batch']} | {str(result['n_adapters']) + ' mixed' if r['adapters'] else 'none'} | {r['step_ms']:.2f} | "
                f"{r['tok_s']:,.0f} | {r['floor_ms']:.2f} | {r['vs_floor']:.2f}x | {hf_tok} | {ratio} | "
                f"{r['warmup_s']:.1f} |"
            )
        lines.append("")
        lines += [
            "HF decode (`generate`, default cache, same weights): "
            + ", ".join(
                f"batch {r['batch']}: {r['step_ms']:.1f} ms/step" for r in result.get("hf_decode", [])
            ),
            "",
        ]
    profiled = result.get("profile")
    if profiled:
        lines += [
            f"## Where a decode step goes ({profiled['mode']}, batch {profiled['batch']}, "
            f"{profiled['steps']} steps profiled)",
            "",
            f"Step {profiled['step_ms']:.2f} ms: kernels {profiled['kernel_ms_per_step']:.2f} ms "
            f"({profiled['kernels_per_step']:.0f} launches), device idle {profiled['idle_ms_per_step']:.2f} ms.",
            "",
            "| kernel | calls per step | us per step |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| `{row['name']}` | {row['calls_per_step']:.0f} | {row['us_per_step']:.1f} |"
            for row in profiled["top"]
        ]
        lines.append("")
    goals = result.get("goals")
    if goals:
        lines += ["## Goals (issue 3)", "", "| goal | value | met |", "|---|---|---|"]
        lines += [f"| {g['goal']} | {g['value']} | {'yes' if g['met'] else 'no'} |" for g in goals]
        lines.append("")
    if result.get("errors"):
        lines += ["## Errors", ""] + [f"- {e}" for e in result["errors"]] + [""]
    return "\n".join(lines)


def evaluate_goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    decode = [r for r in result.get("decode", []) if "skipped" not in r]
    hf = {r["batch"]: r for r in result.get("hf_decode", [])}
    goals = []
    best = lambda batch, adapters: min(  # noqa: E731
        (r for r in decode if r["batch"] == batch and r["adapters"] == adapters),
        key=lambda r: r["step_ms"],
        default=None,
    )
    one = best(1, False)
    if one:
        goals.append(
            {
                "goal": "decode batch 1 within 1.3x of the memory floor",
                "value": f"{one['vs_floor']:.2f}x ({one['mode']})",
                "met": one["vs_floor"] <= 1.3,
            }
        )
    big = max((r["batch"] for r in decode), default=None)
    if big and best(big, False) and big in hf:
        ratio = best(big, False)["tok_s"] / hf[big]["tok_s"]
        goals.append(
            {
                "goal": f">= 3x HF decode throughput at batch {big}",
                "value": f"{ratio:.2f}x",
                "met": ratio >= 3,
            }
        )
    for batch in sorted({r["batch"] for r in decode}):
        plain, mixed = best(batch, False), best(batch, True)
        if plain and mixed:
            cost = 1 - mixed["tok_s"] / plain["tok_s"]
            goals.append(
                {
                    "goal": f"adapters cost <= 15% of decode throughput (batch {batch})",
                    "value": f"{cost:.1%}",
                    "met": cost <= 0.15,
                }
            )
    return goals


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="llama2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prefill", default="2048,8192,32768")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--hf-new-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--modes", default="compiled,fused", help=f"decode variants: {', '.join(MODES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="later decode rows are skipped past this"
    )
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument(
        "--profile-batch", type=int, default=0, help="also profile decode steps at this batch (0: no)"
    )
    parser.add_argument("--name", default="engine-h200", help="output file stem")
    args = parser.parse_args(argv)
    started = time.time()
    device = torch.device(args.device)
    dtype = torch.bfloat16
    import transformers

    result: dict[str, Any] = {
        "command": "python -m lloco.bench.engine " + " ".join(sys.argv[1:] if argv is None else argv),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "geometry_name": args.geometry,
        "geometry": GEOMETRIES[args.geometry],
        "dtype": "bf16",
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "n_adapters": args.adapters,
        "rank": args.rank,
        "errors": [],
    }

    def section(name: str, fn: Callable[[], Any]) -> None:
        run_section(result, name, fn, _free)

    modes = [m for m in args.modes.split(",") if m]
    if not args.skip_check:
        section("correctness", lambda: check_correctness(device, dtype, modes))
        print(json.dumps(result.get("correctness"), indent=1), flush=True)
    lengths = [int(x) for x in args.prefill.split(",") if x]
    batches = [int(x) for x in args.batches.split(",") if x]
    config = LlamaConfig(**GEOMETRIES[args.geometry], max_position_embeddings=max([4096, *lengths]) + 64)
    model = random_llama(config, device, dtype, seed=0)
    hf = hf_twin(model)
    slots = LoraSlots(config, args.adapters, args.rank, TARGETS, device, dtype)
    for slot in range(args.adapters):
        slots.load(slot, random_adapter(config, args.rank, seed=slot))
    print(f"setup done at {time.time() - started:.0f} s", flush=True)
    section("prefill", lambda: bench_prefill(model, hf, lengths, args.repeats))
    section(
        "hf_decode",
        lambda: bench_hf_decode(hf, batches, args.prompt_len, args.hf_new_tokens, config.vocab_size),
    )
    section(
        "decode",
        lambda: bench_decode(
            model, slots, batches, args.prompt_len, args.new_tokens, modes, started + args.budget_s
        ),
    )
    if args.profile_batch:
        section(
            "profile",
            lambda: profile_decode(model, slots, args.profile_batch, args.prompt_len, 32, modes[-1]),
        )
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    result["goals"] = evaluate_goals(result)
    result["wall_s"] = time.time() - started
    write_report(args.out, args.name, result, render_markdown(result))
    return result


if __name__ == "__main__":
    main()
