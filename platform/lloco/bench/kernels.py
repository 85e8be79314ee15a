"""Kernel benchmark of the batch-1 decode step (``lloco.model.fused``) on one GPU, random bf16 weights.

    python -m lloco.bench.kernels --out DIR                             # GPU: LLaMA-2-7B shapes
    TRITON_INTERPRET=1 python -m lloco.bench.kernels --out DIR --tiny   # CPU: tiny shapes, a smoke run

1. Accuracy: the fused step and the layer path (``Llama.decode``), each against the same model in fp32,
   over 8 greedy steps of a 700-token context, with and without a LoRA on all seven projections.
2. Each weight stream of a 7B layer (and the LM head) as a fused kernel vs cuBLAS ``F.linear``, weights
   rotated past the L2 cache, graph-replayed back to back.
3. Decode attention (RoPE, cache write, split keys, merge) vs cuDNN SDPA over 640..32k keys.
4. The decode step at batch 1: fused vs the compiled layer path, and fused without programmatic
   dependent launch (PDL) to show what the overlap of consecutive kernels buys.
Floors are given at the copy bandwidth measured in the run and at the device's data-sheet bandwidth.
``--tiny`` runs every section at toy sizes on the CPU (Triton's interpreter, host-clock timing, fp32, the
eager layer path instead of the compiled one): it checks the code paths, not the speed.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lloco.bench.common import (
    GEOMETRIES,
    TARGETS,
    Floors,
    device_name,
    free_memory,
    measure_decode,
    random_adapter,
    random_llama,
    rel_err,
    timed_ms,
)
from lloco.bench.report import run_section, write_report, write_unfinished
from lloco.model import KVCache, Llama, LlamaConfig, LoraSlots, kernels
from lloco.model.fused import FusedDecoder

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128)


@dataclass(frozen=True)
class KernelPlan:
    """Sizes of one run."""

    geometry: dict[str, int]  # of the streams, attention and the step
    accuracy: tuple[tuple[str, int], ...]  # (geometry name, layers) checked
    context: int  # tokens before the accuracy check's greedy steps
    steps: int
    keys: tuple[int, ...]  # attention lengths timed
    step_prompt: int
    step_new_tokens: int
    layer_mode: str  # the layer path the fused step is compared with
    dtype: str


PLANS = {
    "h200": KernelPlan(
        GEOMETRIES["llama2-7b"], (("llama2-7b", 4), ("small", 4)), 700, 8, (640, 1152, 4096, 16384, 32768),
        512, 128, "compiled", "bfloat16",
    ),
    "tiny": KernelPlan(TINY, (("tiny", 1),), 40, 2, (40, 100), 16, 4, "eager", "float32"),
}  # fmt: skip


def graph_us(fn: Callable[[], object], inner: int = 10, outer: int = 15) -> float:
    """Median microseconds of ``fn`` replayed ``inner`` times per CUDA graph launch (on CPU: host-timed
    calls, after one untimed)."""
    if not torch.cuda.is_available():
        fn()
        return statistics.median(timed_ms(fn, torch.device("cpu")) * 1e3 for _ in range(3))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    times = []
    for _ in range(outer):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) / inner * 1e3)
    return statistics.median(times)


def _random_slots(config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> LoraSlots:
    slots = LoraSlots(config, 4, 8, ALL_TARGETS, device, dtype)
    for group in slots.groups:
        slots.a[group].normal_(0, 0.02)
        slots.b[group].normal_(0, 0.02)
    return slots


@torch.no_grad()
def check_accuracy(
    device: torch.device, geometry: str, layers: int, plan: KernelPlan
) -> list[dict[str, Any]]:
    shapes = TINY if geometry == "tiny" else GEOMETRIES[geometry]
    config = LlamaConfig(**(shapes | dict(n_layers=layers)), max_position_embeddings=2048)
    dtype, steps, context = getattr(torch, plan.dtype), plan.steps, plan.context
    model = random_llama(config, device, dtype, seed=0)
    reference = copy.deepcopy(model).float()
    reference.fused = False
    reference.fuse_projections()
    for m in (model, reference):
        m.ensure_positions(2048)
    slots = _random_slots(config, device, dtype)
    ref_slots = LoraSlots(config, 4, 8, ALL_TARGETS, device, torch.float32)
    for group in slots.groups:
        ref_slots.a[group].copy_(slots.a[group])
        ref_slots.b[group].copy_(slots.b[group])
    ids = torch.randint(0, config.vocab_size, (1, context), device=device)
    rows = []
    for lora in (False, True):
        caches = {}
        for name, m in (("fused", model), ("layers", model), ("fp32", reference)):
            caches[name] = KVCache.allocate(config, 1, 2048, device, m.dtype)
            m.prefill(
                m.embed(ids),
                caches[name],
                torch.tensor([0], device=device),
                torch.tensor([context - 1], device=device),
            )
        slot = torch.tensor([2 if lora else -1], device=device)
        fused = FusedDecoder(model, caches["fused"], slots if lora else None)
        token, position = torch.tensor([7], device=device), torch.tensor([context], device=device)
        errors: dict[str, list[float]] = {"fused": [], "layers": []}
        agree = {"fused": 0, "layers": 0}
        for _ in range(steps):
            ref = reference.decode(
                token, position, caches["fp32"], 1024, ref_slots.batch(slot) if lora else None
            )
            got = {
                "fused": fused.logits_of(token, position, 1024, slot if lora else None).clone(),
                "layers": model.decode(
                    token, position, caches["layers"], 1024, slots.batch(slot) if lora else None
                ),
            }
            for name, logits in got.items():
                errors[name].append(rel_err(logits, ref))
                agree[name] += int(logits.argmax(-1).item() == ref.argmax(-1).item())
            token, position = ref.argmax(-1), position + 1
        rows.append(
            {
                "geometry": geometry,
                "layers": layers,
                "lora": lora,
                "fused_rel_err": max(errors["fused"]),
                "layers_rel_err": max(errors["layers"]),
                "fused_argmax_agree": agree["fused"] / steps,
                "layers_argmax_agree": agree["layers"] / steps,
            }
        )
        print("accuracy", rows[-1], flush=True)
    return rows


@torch.no_grad()
def bench_gemv(device: torch.device, plan: KernelPlan) -> list[dict[str, Any]]:
    config = LlamaConfig(**plan.geometry)
    shapes = {  # name: (rows, cols, gated, normed input, residual output)
        "q|k|v (+RMSNorm)": (config.q_dim + 2 * config.kv_dim, config.dim, False, True, False),
        "o (+residual)": (config.dim, config.q_dim, False, False, True),
        "gate|up (+RMSNorm, SiLU*up)": (2 * config.intermediate_size, config.dim, True, True, False),
        "down (+residual)": (config.dim, config.intermediate_size, False, False, True),
        "lm_head (+RMSNorm)": (config.vocab_size, config.dim, False, True, False),
    }
    rows = []
    for name, shape in shapes.items():
        rows.append({"shape": name} | _time_stream(device, getattr(torch, plan.dtype), *shape))
        print("gemv", rows[-1], flush=True)
    return rows


def _time_stream(
    device: torch.device, dtype: torch.dtype, n: int, k: int, gated: bool, normed: bool, residual: bool
) -> dict:
    copies = max(2, int(250e6 // (n * k * 2)) + 1) if device.type == "cuda" else 1  # rotate past the 50 MB L2
    weights = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(copies)]
    norm = torch.rand(k, device=device, dtype=dtype) + 0.5 if normed else None
    x = torch.randn(k, device=device, dtype=dtype)
    out = torch.zeros(n // 2 if gated else n, device=device, dtype=dtype)

    def fused() -> None:
        for w in weights:
            kernels.gemv(x, w, out, residual=residual, norm=norm, eps=1e-5, gated=gated)

    def cublas() -> None:
        for w in weights:
            F.linear(x[None], w)

    row: dict[str, Any] = {"rows": n, "cols": k, "block": kernels.default_block(n, k)}
    for key, fn in (("cublas", cublas), ("fused", fused)):
        row[f"{key}_us"] = graph_us(fn) / copies
        row[f"{key}_tb_s"] = n * k * weights[0].element_size() / row[f"{key}_us"] / 1e6
    return row


@torch.no_grad()
def bench_attention(device: torch.device, plan: KernelPlan, floors: Floors) -> list[dict[str, Any]]:
    rows = []
    for keys in plan.keys:
        rows.append(_time_attention(device, keys, plan, floors))
        print("attention", rows[-1], flush=True)
    return rows


def _time_attention(device: torch.device, keys: int, plan: KernelPlan, floors: Floors) -> dict[str, Any]:
    heads = plan.geometry["n_heads"]
    head_dim = plan.geometry["dim"] // heads
    dtype = getattr(torch, plan.dtype)
    cuda = device.type == "cuda"
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count if cuda else 4
    k_cache = torch.randn(1, heads, keys + 64, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    qkv = torch.randn(1, 3 * heads * head_dim, device=device, dtype=dtype)
    cos, sin = (
        torch.randn(keys + 64, head_dim, device=device),
        torch.randn(keys + 64, head_dim, device=device),
    )
    position = torch.tensor([keys - 1], device=device)
    out = torch.empty(1, heads * head_dim, device=device, dtype=dtype)
    workspace = kernels.AttentionWorkspace(1, heads, heads, head_dim, device)
    q = torch.randn(1, heads, 1, head_dim, device=device, dtype=dtype)
    bias = torch.zeros(1, 1, 1, keys, device=device, dtype=dtype)

    def fused() -> None:
        kernels.decode_attention(
            qkv, position, cos, sin, k_cache, v_cache, out, workspace, heads, heads, keys, programs
        )

    def sdpa() -> None:
        F.scaled_dot_product_attention(q, k_cache[:, :, :keys], v_cache[:, :, :keys], attn_mask=bias)

    return {
        "keys": keys,
        "splits": kernels.attention_split(1, heads, keys, programs)[1],
        "fused_us": graph_us(fused),
        "sdpa_us": graph_us(sdpa),
        **{
            name.replace("_ms", "_us"): None if ms is None else ms * 1e3
            for name, ms in floors.floor_ms(2 * keys * heads * head_dim * k_cache.element_size()).items()
        },
    }


@torch.no_grad()
def bench_step(model: Llama, slots: LoraSlots, floors: Floors, plan: KernelPlan) -> list[dict[str, Any]]:
    rows = []
    for modes, pdl in ((["fused", plan.layer_mode], True), (["fused"], False)):
        launch_options = kernels._launch_options
        if not pdl:
            kernels._launch_options = lambda t: dict(PDL=False)
        try:
            for row in measure_decode(
                model, slots, [1], plan.step_prompt, plan.step_new_tokens, modes, floors
            ):
                rows.append(row | {"pdl": pdl if row["mode"] == "fused" else None})
        finally:
            kernels._launch_options = launch_options
    return rows


def render_markdown(result: dict[str, Any]) -> str:
    plan, floors = result["plan"], result.get("floors") or {}
    spec = f"{floors['spec_tb_s']:.2f} TB/s" if floors.get("spec_tb_s") else "n/a"
    lines = [
        f"# Batch-1 decode kernels ({plan['geometry']['dim']}-dim geometry, random {plan['dtype']} weights)",
        "",
        f"`{result['command']}` on {result['device_name']}, {result['date']}; torch {result['torch']}, "
        f"triton {result['triton']}. Floors at the measured copy bandwidth "
        f"({floors.get('measured_copy_tb_s', 0):.2f} TB/s) and at the data sheet's ({spec}).",
        "",
        f"## Accuracy against the same model in fp32 ({plan['steps']} greedy steps, {plan['context']}-token context)",
        "",
        "| geometry | layers | LoRA (7 projections) | fused max rel err | layer path max rel err "
        "| fused argmax agree | layer path argmax agree |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in result.get("accuracy", []):
        lines.append(
            f"| {r['geometry']} | {r['layers']} | {r['lora']} | {r['fused_rel_err']:.4f} | "
            f"{r['layers_rel_err']:.4f} | {r['fused_argmax_agree']:.2f} | {r['layers_argmax_agree']:.2f} |"
        )
    lines += [
        "",
        "## Weight streams (one row), back to back in a CUDA graph",
        "",
        "| stream | block (N, K, warps) | cuBLAS us | TB/s | fused us | TB/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result.get("gemv", []):
        lines.append(
            f"| {r['shape']} | {tuple(r['block'])} | {r['cublas_us']:.1f} | {r['cublas_tb_s']:.2f} | "
            f"{r['fused_us']:.1f} | {r['fused_tb_s']:.2f} |"
        )
    lines += [
        "",
        "cuBLAS does only the matmul; the fused kernels also do the norm, SiLU*up or residual add.",
        "",
        f"## Decode attention, batch 1, {plan['geometry']['n_heads']} heads",
        "",
        "| keys | splits per head | fused us | cuDNN SDPA us | floor us (measured copy) | floor us (data sheet) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result.get("attention", []):
        spec_us = "-" if r["floor_spec_us"] is None else f"{r['floor_spec_us']:.1f}"
        lines.append(
            f"| {r['keys']} | {r['splits']} | {r['fused_us']:.1f} | {r['sdpa_us']:.1f} | "
            f"{r['floor_measured_us']:.1f} | {spec_us} |"
        )
    lines += [
        "",
        "The fused kernel also applies RoPE and writes the new key and value (SDPA does neither).",
        "",
        f"## Decode step, batch 1 ({plan['step_prompt']}-token prompts, {plan['step_new_tokens']} new tokens)",
        "",
        "| path | PDL | adapters | ms/step | vs floor (measured copy) | vs floor (data sheet) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in result.get("step", []):
        pdl = "" if r["pdl"] is None else ("on" if r["pdl"] else "off")
        adapters = "8 mixed" if r["adapters"] else "none"
        spec_ratio = "-" if r["vs_spec_floor"] is None else f"{r['vs_spec_floor']:.2f}x"
        lines.append(
            f"| {r['mode']} | {pdl} | {adapters} | {r['step_ms']:.2f} | {r['vs_measured_floor']:.2f}x | {spec_ratio} |"
        )
    if result["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--tiny", action="store_true", help="toy sizes on CPU (TRITON_INTERPRET=1): a smoke run"
    )
    parser.add_argument("--name", default=None, help="output file stem (default kernels-h200 / kernels-tiny)")
    args = parser.parse_args(argv)
    import triton

    plan = PLANS["tiny" if args.tiny else "h200"]
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = getattr(torch, plan.dtype)
    started = time.time()
    result: dict[str, Any] = {
        "command": "python -m lloco.bench.kernels " + " ".join(sys.argv[1:] if argv is None else argv),
        "device_name": device_name(device),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "plan": asdict(plan),
        "errors": [],
    }

    report_name = args.name or ("kernels-tiny" if args.tiny else "kernels-h200")

    def section(name: str, fn: Callable[[], Any]) -> None:
        run_section(result, name, fn, free_memory)
        write_unfinished(args.out, report_name, result, render_markdown)

    floors = Floors.of(device)
    result["floors"] = floors.describe()
    section(
        "accuracy",
        lambda: [row for name, layers in plan.accuracy for row in check_accuracy(device, name, layers, plan)],
    )
    section("gemv", lambda: bench_gemv(device, plan))
    section("attention", lambda: bench_attention(device, plan, floors))
    config = LlamaConfig(**plan.geometry, max_position_embeddings=4096)
    model = random_llama(config, device, dtype, seed=0)
    slots = LoraSlots(config, 8, 8, TARGETS, device, dtype)
    for slot in range(8):
        slots.load(slot, random_adapter(config, 8, seed=slot))
    section("step", lambda: bench_step(model, slots, floors, plan))
    result["wall_s"] = time.time() - started
    write_report(args.out, report_name, result, render_markdown(result))
    return result


if __name__ == "__main__":
    main()
