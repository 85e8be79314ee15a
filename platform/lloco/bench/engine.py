"""Engine benchmark: our decoder beside HF transformers on one GPU, with random bf16 weights.

    python -m lloco.bench.engine --out DIR               # GPU: LLaMA-2-7B geometry
    python -m lloco.bench.engine --out DIR --tiny        # CPU: the small geometry, a smoke run

First checks bf16 correctness against HF on a small geometry (logits, cached decode, greedy tokens, CUDA
graphs, compiled and fused steps against eager). Then, on LLaMA-2-7B geometry (random weights: speed does not
depend on their values): prefill tokens/s at 2k/8k/32k tokens beside HF's forward, and decode ms/step at
batch 1/8/32 with and without rank-8 adapters (distinct per row up to ``--adapters``), beside two HF
``generate`` baselines on the same weights in the same run: HF's default dynamic cache, and its static cache
(on CUDA HF then compiles the decode forward with ``torch.compile``). Ratios are taken against the stronger
of the two. Times are CUDA-event medians after warm-up; warm-up (graph capture, compilation) is reported
apart. A decode step's memory floor (weights read + KV bytes read) is printed at two bandwidths: the
device-to-device copy bandwidth measured at the start of the run, and the device's data-sheet bandwidth.
``--sections cold_shapes`` (not run by default) times a fresh engine's first queries with its decode
graphs captured on first use and all at start. ``--profile-batch N`` then profiles 32 decode steps at batch
N (the last of ``--modes``; ``--profile-adapters``: distinct adapters per row): device time per kernel name
per step, and how much of the step the device sits idle.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lloco.bench.common import (
    GEOMETRIES,
    HF_CACHES,
    MODES,
    TARGETS,
    Floors,
    context_vectors,
    free_memory,
    goals_and_errors,
    hf_decode,
    hf_twin,
    measure_decode,
    median_ms,
    mode_options,
    random_adapter,
    random_ids,
    random_llama,
    rel_err,
    run_info,
    run_to_end,
    strongest,
    timed_ms,
)
from lloco.bench.report import run_section, write_report, write_unfinished
from lloco.model import Generator, Llama, LlamaConfig, LoraSlots, SamplingParams

# issue 19's goals for the decode step (H200, 7B geometry)
GOAL_BATCH32_VS_FLOOR = 1.15  # ms/step over the measured-copy floor, at most
GOAL_VS_HF = {1: 2.0, 32: 1.6}  # tokens/s over the strongest HF baseline, at least
GOAL_ADAPTERS = 0.93  # distinct adapters vs none at batch 32, at least
SECTIONS = ("correctness", "prefill", "hf_decode", "decode", "cold_shapes")


@torch.no_grad()
def profile_decode(
    model: Llama,
    slots: LoraSlots,
    batch: int,
    prompt_len: int,
    steps: int,
    mode: str,
    adapters: bool = False,
    top: int = 20,
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
    prompts = [random_ids(prompt_len, model.config.vocab_size, seed=i) for i in range(batch)]
    row_slots = [i % slots.n_slots if adapters else -1 for i in range(batch)]  # distinct adapters per row
    run_to_end(gen, prompts, row_slots, steps)  # warm-up: graph capture, compilation
    for i, (prompt, slot) in enumerate(zip(prompts, row_slots, strict=True)):
        gen.add(f"p{i}", None, prompt, slot, SamplingParams(steps + 1))
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
        "adapters": adapters,
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
    """One sequence's prefill: our Generator (a 1-token request) vs HF's forward with a cache, same ids."""
    device, vocab = model.device, model.config.vocab_size
    gen = Generator(model, None, 1, max(lengths) + 16, cuda_graphs=False, max_prefill_tokens=max(lengths))
    rows = []
    for length in lengths:
        ids = random_ids(length, vocab, seed=length)
        hf_ids = torch.tensor([ids], device=device)
        row: dict[str, Any] = {"tokens": length}
        for name, fn in (
            ("ours", lambda ids=ids: _prefill_ours(gen, ids)),
            ("hf", lambda hf_ids=hf_ids: hf(input_ids=hf_ids, use_cache=True, logits_to_keep=1)),
        ):
            ms = median_ms(fn, device, repeats)
            row[f"{name}_ms"], row[f"{name}_tok_s"] = ms, length / ms * 1e3
        row["speedup"] = row["hf_ms"] / row["ours_ms"]
        rows.append(row)
        print(f"prefill {length}: ours {row['ours_ms']:.1f} ms, hf {row['hf_ms']:.1f} ms", flush=True)
    return rows


def _prefill_ours(gen: Generator, ids: list[int]) -> None:
    gen.add("p", None, ids, params=SamplingParams(1))  # one token: the request ends with its prefill
    gen.step()


def bench_hf_decode(hf: Any, batches: list[int], prompt_len: int, new_tokens: int) -> list[dict[str, Any]]:
    """Both HF baselines at every batch."""
    rows = []
    for cache in HF_CACHES:
        for batch in batches:
            rows.append(hf_decode(hf, batch, prompt_len, new_tokens, cache))
            free_memory()
    return rows


@torch.no_grad()
def bench_cold_shapes(
    model: Llama, slots: LoraSlots, mode: str, seq_len: int, tenants: int, new_tokens: int
) -> dict[str, Any]:
    """Tenants' first queries on a fresh engine, its decode graphs captured on first use ("lazy") or all at
    start (``Generator.capture_decode_graphs``, "at_start"), after ``Generator.warm_up`` as EngineCore runs it.

    One tenant joins every other step with its own adapter and a compressed context of varied length, so
    the batch and key lengths pass through many shape classes, as when a server's first queries arrive;
    the same arrivals then run again on the now warm engine. Times are host clock (what a client waits).
    """
    result: dict[str, Any] = {"seq_len": seq_len, "tenants": tenants, "new_tokens": new_tokens, "mode": mode}
    for start in ("lazy", "at_start"):
        gen = Generator(
            model,
            slots,
            32,
            seq_len,
            eos_token_ids=(),
            prefill_chunk_tokens=2048,
            **mode_options(mode, model.device),
        )
        began = time.perf_counter()
        gen.warm_up(random_ids(8, model.config.vocab_size, seed=1))  # what EngineCore's start runs first
        warmed = time.perf_counter()
        captured = gen.capture_decode_graphs() if start == "at_start" else 0
        row = {
            "warm_up_s": warmed - began,
            "captured_at_start": captured,
            "capture_at_start_s": time.perf_counter() - warmed,
            "shape_classes": len(gen.decode_shapes()),
            "first": _arrivals(gen, tenants, new_tokens),
            "again": _arrivals(gen, tenants, new_tokens),
        }
        result[start] = row
        print(
            f"cold shapes, {start}: captured {captured} at start in {row['capture_at_start_s']:.1f} s; first "
            f"arrivals TTFT p50 {row['first']['ttft_p50_ms']:.0f} ms, max {row['first']['ttft_max_ms']:.0f} ms",
            flush=True,
        )
        del gen
        free_memory()
    return result


def _arrivals(gen: Generator, tenants: int, new_tokens: int) -> dict[str, Any]:
    """One tenant joins every other step (adapter slot = tenant) with 1/6 to 6/6 of the longest context
    that fits; TTFT and step times, and the captures on the way."""
    model, prompt_len = gen.model, 40
    longest = gen.max_seq_len - prompt_len - new_tokens
    queued = [
        (
            f"t{i}",
            context_vectors(model, longest * (1 + i % 6) // 6, 1, 1, seed=i),
            random_ids(prompt_len, model.config.vocab_size, seed=i),
            i,
        )
        for i in range(tenants)
    ]
    captures, capture_s = gen.graph_captures, gen.graph_capture_s
    added: dict[str, float] = {}
    first: dict[str, float] = {}
    step_ms: list[float] = []
    began = time.perf_counter()
    while queued or gen.active():
        if queued and len(step_ms) % 2 == 0:
            request_id, prefix, prompt, slot = queued.pop(0)
            gen.add(request_id, prefix, prompt, slot, SamplingParams(new_tokens))
            added[request_id] = time.perf_counter()
        stepped = time.perf_counter()
        outputs = gen.step()
        now = time.perf_counter()
        step_ms.append((now - stepped) * 1e3)
        for out in outputs:
            first.setdefault(out.request_id, now)
    ttft = sorted((first[r] - added[r]) * 1e3 for r in added)
    return {
        "wall_s": time.perf_counter() - began,
        "ttft_p50_ms": statistics.median(ttft),
        "ttft_max_ms": ttft[-1],
        "step_p50_ms": statistics.median(step_ms),
        "step_max_ms": max(step_ms),
        "steps": len(step_ms),
        "captures": gen.graph_captures - captures,
        "capture_s": gen.graph_capture_s - capture_s,
    }


def _ratio(value: float | None, spec: str = ".2f", unit: str = "x") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def render_markdown(result: dict[str, Any]) -> str:
    """The tables of a result, with issue 19's goals."""
    floors = result.get("floors") or {}
    spec_label = (
        f"data-sheet bandwidth ({floors['spec_tb_s']:.2f} TB/s)"
        if floors.get("spec_tb_s")
        else "data-sheet bandwidth (none known for this device)"
    )
    lines = [
        f"# Engine benchmark ({result['geometry_name']}, random {result['dtype']} weights)",
        "",
        f"`{result['command']}` on {result['device_name']}, {result['date']}; torch {result['torch']}, "
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
    hf_rows = result.get("hf_decode") or []
    if hf_rows:
        lines += [
            f"## HF `generate` decode ({result['prompt_len']}-token prompts, same weights)",
            "",
            "| cache | compiled | batch | ms/step | tok/s | warm-up s |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in hf_rows:
            lines.append(
                f"| {r['cache']} | {'yes' if r['compiled'] else 'no'} | {r['batch']} | {r['step_ms']:.2f} | "
                f"{r['tok_s']:,.0f} | {r['warmup_s']:.1f} |"
            )
        lines.append("")
    if result.get("decode"):
        lines += [
            f"## Decode ({result['prompt_len']}-token prompts, {result['new_tokens']} new tokens, "
            f"{result['n_adapters']} rank-{result['rank']} adapters round-robin when on)",
            "",
            f"Floors: weights + KV bytes read per step, at the copy bandwidth measured in this run "
            f"({floors.get('measured_copy_tb_s', 0):.3g} TB/s) and at the {spec_label}. Ours / HF is against "
            "the stronger HF baseline at that batch (named).",
            "",
            "| mode | batch | adapters | ms/step | tok/s | floor ms (measured copy) | vs floor | floor ms (data sheet) "
            "| vs floor | ours / HF | warm-up s |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["decode"]:
            if "skipped" in r:
                lines.append(
                    f"| {r['mode']} | {r['batch']} | {r['adapters']} | skipped: {r['skipped']} |" + " |" * 7
                )
                continue
            ref = strongest(hf_rows, r["batch"])
            versus = f"{r['tok_s'] / ref['tok_s']:.2f}x ({ref['cache']})" if ref else "-"
            adapters = f"{min(result['n_adapters'], r['batch'])} distinct" if r["adapters"] else "none"
            lines.append(
                f"| {r['mode']} | {r['batch']} | {adapters} | {r['step_ms']:.2f} | {r['tok_s']:,.0f} | "
                f"{r['floor_measured_ms']:.2f} | {r['vs_measured_floor']:.2f}x | "
                f"{_ratio(r['floor_spec_ms'], '.2f', '')} | {_ratio(r['vs_spec_floor'])} | {versus} | "
                f"{r['warmup_s']:.1f} |"
            )
        lines.append("")
    cold = result.get("cold_shapes")
    if cold:
        lines += [
            f"## A fresh engine's first queries ({cold['tenants']} tenants joining one every other step, "
            f"{cold['mode']}, max_seq_len {cold['seq_len']}, {cold['new_tokens']} new tokens)",
            "",
            "Decode graphs captured on first use (lazy) or all at start; the same arrivals run twice.",
            "",
            "| start | graphs at start | capture s | run | TTFT p50 ms | TTFT max ms | step p50 ms | step max ms "
            "| captured on the way | their s | wall s |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for start in ("lazy", "at_start"):
            row = cold[start]
            for run in ("first", "again"):
                r = row[run]
                lines.append(
                    f"| {start} | {row['captured_at_start']} of {row['shape_classes']} | "
                    f"{row['capture_at_start_s']:.1f} | {run} | {r['ttft_p50_ms']:.0f} | {r['ttft_max_ms']:.0f} | "
                    f"{r['step_p50_ms']:.1f} | {r['step_max_ms']:.0f} | {r['captures']} | {r['capture_s']:.1f} | "
                    f"{r['wall_s']:.1f} |"
                )
        lines.append("")
    profiled = result.get("profile")
    if profiled:
        lines += [
            f"## Where a decode step goes ({profiled['mode']}, batch {profiled['batch']}, "
            f"{'distinct adapters' if profiled.get('adapters') else 'no adapters'}, "
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
    lines += goals_and_errors(result)
    return "\n".join(lines)


def evaluate_goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 19's decode goals, from the fastest of our modes at each batch."""
    decode = [r for r in result.get("decode", []) if "skipped" not in r]
    hf_rows = result.get("hf_decode") or []
    goals = []

    def best(batch: int, adapters: bool) -> dict[str, Any] | None:
        return min(
            (r for r in decode if r["batch"] == batch and r["adapters"] == adapters),
            key=lambda r: r["step_ms"],
            default=None,
        )

    top = max((r["batch"] for r in decode), default=None)
    if top is not None and (row := best(top, False)):
        goals.append(
            {
                "goal": f"decode at batch {top} <= {GOAL_BATCH32_VS_FLOOR}x the measured-copy floor",
                "value": f"{row['vs_measured_floor']:.2f}x ({row['mode']}; "
                f"{_ratio(row['vs_spec_floor'])} of the data-sheet floor)",
                "met": row["vs_measured_floor"] <= GOAL_BATCH32_VS_FLOOR,
            }
        )
    for batch in sorted({r["batch"] for r in decode}):
        ours, ref = best(batch, False), strongest(hf_rows, batch)
        target = GOAL_VS_HF.get(batch)
        if ours and ref and target:
            ratio = ours["tok_s"] / ref["tok_s"]
            goals.append(
                {
                    "goal": f">= {target}x the strongest HF baseline at batch {batch}",
                    "value": f"{ratio:.2f}x (vs HF {ref['cache']} cache{', compiled' if ref['compiled'] else ''})",
                    "met": ratio >= target,
                }
            )
    if top is not None and (plain := best(top, False)) and (mixed := best(top, True)):
        distinct = min(result["n_adapters"], top)
        ratio = mixed["tok_s"] / plain["tok_s"]
        goals.append(
            {
                "goal": f"{distinct} distinct adapters at batch {top} >= {GOAL_ADAPTERS}x of no adapters",
                "value": f"{ratio:.3f}x",
                "met": ratio >= GOAL_ADAPTERS,
            }
        )
    return goals


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="small geometry on CPU, few tokens: a smoke run")
    parser.add_argument(
        "--geometry", choices=sorted(GEOMETRIES), default=None, help="default llama2-7b (tiny: small)"
    )
    parser.add_argument("--device", default=None, help="default: cuda (tiny: cpu)")
    parser.add_argument("--prefill", default=None, help="prefill lengths (default 2048,8192,32768)")
    parser.add_argument("--batches", default=None, help="decode batches (default 1,8,32)")
    parser.add_argument("--prompt-len", type=int, default=None, help="default 512")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128")
    parser.add_argument("--hf-new-tokens", type=int, default=None, help="default 32")
    parser.add_argument(
        "--adapters", type=int, default=32, help="distinct adapters (rows round-robin over them)"
    )
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--modes", default=None, help=f"decode variants: {', '.join(MODES)} (default compiled,fused)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (tiny: 1)")
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="later decode rows are skipped past this"
    )
    parser.add_argument(
        "--sections",
        default="correctness,prefill,hf_decode,decode",
        help=f"comma-separated, of {', '.join(SECTIONS)} (cold_shapes: a fresh engine's first queries)",
    )
    parser.add_argument(
        "--cold-seq-len", type=int, default=None, help="cold_shapes' max_seq_len (default 1024)"
    )
    parser.add_argument(
        "--profile-batch", type=int, default=0, help="also profile decode steps at this batch (0: no)"
    )
    parser.add_argument(
        "--profile-adapters", action="store_true", help="profiled rows use distinct adapters (round-robin)"
    )
    parser.add_argument("--name", default=None, help="output file stem (default engine-h200 / engine-tiny)")
    args = parser.parse_args(argv)
    tiny = args.tiny
    geometry = args.geometry or ("small" if tiny else "llama2-7b")
    device = torch.device(args.device or ("cpu" if tiny else "cuda"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths = [int(x) for x in (args.prefill or ("32" if tiny else "2048,8192,32768")).split(",") if x]
    batches = [int(x) for x in (args.batches or ("1,2" if tiny else "1,8,32")).split(",") if x]
    prompt_len = args.prompt_len or (8 if tiny else 512)
    new_tokens = args.new_tokens or (3 if tiny else 128)
    hf_new_tokens = args.hf_new_tokens or (2 if tiny else 32)
    modes = [m for m in (args.modes or ("eager" if tiny else "compiled,fused")).split(",") if m]
    started = time.time()
    result: dict[str, Any] = run_info("lloco.bench.engine", argv, device) | {
        "geometry_name": geometry,
        "geometry": GEOMETRIES[geometry],
        "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "n_adapters": args.adapters,
        "rank": args.rank,
        "errors": [],
    }

    report_name = args.name or ("engine-tiny" if tiny else "engine-h200")

    def section(name: str, fn: Callable[[], Any]) -> None:
        run_section(result, name, fn, free_memory)
        write_unfinished(args.out, report_name, result, render_markdown)

    sections = [name for name in args.sections.split(",") if name]
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    if "correctness" in sections:
        section("correctness", lambda: check_correctness(device, dtype, modes))
    floors = Floors.of(device)
    result["floors"] = floors.describe()
    config = LlamaConfig(**GEOMETRIES[geometry], max_position_embeddings=max([4096, *lengths]) + 64)
    model = random_llama(config, device, dtype, seed=0)
    hf = hf_twin(model) if {"prefill", "hf_decode"} & set(sections) else None
    slots = LoraSlots(config, args.adapters, args.rank, TARGETS, device, dtype)
    for slot in range(args.adapters):
        slots.load(slot, random_adapter(config, args.rank, seed=slot))
    print(f"setup done at {time.time() - started:.0f} s", flush=True)
    if "prefill" in sections:
        section("prefill", lambda: bench_prefill(model, hf, lengths, args.repeats or (1 if tiny else 3)))
    if "hf_decode" in sections:
        section("hf_decode", lambda: bench_hf_decode(hf, batches, prompt_len, hf_new_tokens))
    if "decode" in sections:
        section(
            "decode",
            lambda: measure_decode(
                model, slots, batches, prompt_len, new_tokens, modes, floors, started + args.budget_s
            ),
        )
    if "cold_shapes" in sections:
        cold_seq_len = args.cold_seq_len or (128 if tiny else 1024)
        section(
            "cold_shapes",
            lambda: bench_cold_shapes(
                model, slots, modes[-1], cold_seq_len, 4 if tiny else 16, 3 if tiny else 32
            ),
        )
    if args.profile_batch:
        section(
            "profile",
            lambda: profile_decode(
                model, slots, args.profile_batch, prompt_len, 32, modes[-1], args.profile_adapters
            ),
        )
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    result["goals"] = evaluate_goals(result)
    result["wall_s"] = time.time() - started
    write_report(args.out, report_name, result, render_markdown(result))
    return result


if __name__ == "__main__":
    main()
