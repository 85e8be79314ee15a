"""Kernel benchmark of the batch-1 decode step (``lloco.model.fused``) on one GPU, random bf16 weights.

    PYTHONPATH=platform python -m lloco.bench.kernels --out DIR

1. Accuracy: the bf16 fused step and the bf16 layer path (``Llama.decode``), each against the same model in
   fp32, over 8 greedy steps of a 700-token context, with and without a LoRA on all seven projections.
2. Each weight stream of a 7B layer (and the LM head) as a fused kernel vs cuBLAS ``F.linear``, weights
   rotated past the L2 cache, graph-replayed back to back.
3. Decode attention (RoPE, cache write, split keys, merge) vs cuDNN SDPA over 640..32k keys.
4. The decode step at batch 1: fused vs the compiled layer path, and fused without programmatic
   dependent launch (PDL) to show what the overlap of consecutive kernels buys.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lloco.bench.engine import GEOMETRIES, TARGETS, bench_decode, random_adapter, random_llama, rel_err
from lloco.bench.report import run_section, write_report
from lloco.model import KVCache, Llama, LlamaConfig, LoraSlots, kernels
from lloco.model.fused import FusedDecoder

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BANDWIDTH = 4.3e12  # bytes/s, the copy bandwidth measured on the H200 (the floor of lloco.bench.engine)


def graph_us(fn: Callable[[], object], inner: int = 10, outer: int = 15) -> float:
    """Median microseconds of ``fn`` replayed ``inner`` times per CUDA graph launch."""
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
def check_accuracy(device: torch.device, geometry: str, layers: int, steps: int = 8) -> list[dict[str, Any]]:
    config = LlamaConfig(**(GEOMETRIES[geometry] | dict(n_layers=layers)), max_position_embeddings=2048)
    model = random_llama(config, device, torch.bfloat16, seed=0)
    reference = copy.deepcopy(model).float()
    reference.fused = False
    reference.fuse_projections()
    for m in (model, reference):
        m.ensure_positions(2048)
    slots = _random_slots(config, device, torch.bfloat16)
    ref_slots = LoraSlots(config, 4, 8, ALL_TARGETS, device, torch.float32)
    for group in slots.groups:
        ref_slots.a[group].copy_(slots.a[group])
        ref_slots.b[group].copy_(slots.b[group])
    ids = torch.randint(0, config.vocab_size, (1, 700), device=device)
    rows = []
    for lora in (False, True):
        caches = {}
        for name, m in (("fused", model), ("layers", model), ("fp32", reference)):
            caches[name] = KVCache.allocate(config, 1, 2048, device, m.dtype)
            m.prefill(
                m.embed(ids),
                caches[name],
                torch.tensor([0], device=device),
                torch.tensor([699], device=device),
            )
        slot = torch.tensor([2 if lora else -1], device=device)
        fused = FusedDecoder(model, caches["fused"], slots if lora else None)
        token, position = torch.tensor([7], device=device), torch.tensor([700], device=device)
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
def bench_gemv(device: torch.device) -> list[dict[str, Any]]:
    config = LlamaConfig(**GEOMETRIES["llama2-7b"])
    shapes = {  # name: (rows, cols, gated, normed input, residual output)
        "q|k|v (+RMSNorm)": (config.q_dim + 2 * config.kv_dim, config.dim, False, True, False),
        "o (+residual)": (config.dim, config.q_dim, False, False, True),
        "gate|up (+RMSNorm, SiLU*up)": (2 * config.intermediate_size, config.dim, True, True, False),
        "down (+residual)": (config.dim, config.intermediate_size, False, False, True),
        "lm_head (+RMSNorm)": (config.vocab_size, config.dim, False, True, False),
    }
    rows = []
    for name, shape in shapes.items():
        rows.append({"shape": name} | _time_stream(device, *shape))
        print("gemv", rows[-1], flush=True)
    return rows


def _time_stream(device: torch.device, n: int, k: int, gated: bool, normed: bool, residual: bool) -> dict:
    copies = max(2, int(250e6 // (n * k * 2)) + 1)  # rotate past the 50 MB L2
    weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    norm = torch.rand(k, device=device, dtype=torch.bfloat16) + 0.5 if normed else None
    x = torch.randn(k, device=device, dtype=torch.bfloat16)
    out = torch.zeros(n // 2 if gated else n, device=device, dtype=torch.bfloat16)

    def fused() -> None:
        for w in weights:
            kernels.gemv(x, w, out, residual=residual, norm=norm, eps=1e-5, gated=gated)

    def cublas() -> None:
        for w in weights:
            F.linear(x[None], w)

    row: dict[str, Any] = {"rows": n, "cols": k, "block": kernels.default_block(n, k)}
    for key, fn in (("cublas", cublas), ("fused", fused)):
        row[f"{key}_us"] = graph_us(fn) / copies
        row[f"{key}_tb_s"] = n * k * 2 / row[f"{key}_us"] / 1e6
    return row


@torch.no_grad()
def bench_attention(device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for keys in (640, 1152, 4096, 16384, 32768):
        rows.append(_time_attention(device, keys))
        print("attention", rows[-1], flush=True)
    return rows


def _time_attention(device: torch.device, keys: int) -> dict[str, Any]:
    heads, head_dim = GEOMETRIES["llama2-7b"]["n_heads"], 128
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    k_cache = torch.randn(1, heads, keys + 64, head_dim, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    qkv = torch.randn(1, 3 * heads * head_dim, device=device, dtype=torch.bfloat16)
    cos, sin = (
        torch.randn(keys + 64, head_dim, device=device),
        torch.randn(keys + 64, head_dim, device=device),
    )
    position = torch.tensor([keys - 1], device=device)
    out = torch.empty(1, heads * head_dim, device=device, dtype=torch.bfloat16)
    workspace = kernels.AttentionWorkspace(1, heads, heads, head_dim, device)
    q = torch.randn(1, heads, 1, head_dim, device=device, dtype=torch.bfloat16)
    bias = torch.zeros(1, 1, 1, keys, device=device, dtype=torch.bfloat16)

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
        "floor_us": 2 * keys * heads * head_dim * 2 / BANDWIDTH * 1e6,
    }


@torch.no_grad()
def bench_step(model: Llama, slots: LoraSlots) -> list[dict[str, Any]]:
    rows = []
    for modes, pdl in ((["fused", "compiled"], True), (["fused"], False)):
        launch_options = kernels._launch_options
        if not pdl:
            kernels._launch_options = lambda t: dict(PDL=False)
        try:
            for row in bench_decode(model, slots, [1], 512, 128, modes, float("inf")):
                rows.append(row | {"pdl": pdl if row["mode"] == "fused" else None})
        finally:
            kernels._launch_options = launch_options
    return rows


def render_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Batch-1 decode kernels (llama2-7b geometry, random bf16 weights)",
        "",
        f"`{result['command']}` on {result['gpu']}, {result['date']}; torch {result['torch']}, "
        f"triton {result['triton']}.",
        "",
        "## Accuracy against the same model in fp32 (8 greedy steps, 700-token context)",
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
        "## Decode attention, batch 1, 32 heads",
        "",
        "| keys | splits per head | fused us | cuDNN SDPA us | floor us |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in result.get("attention", []):
        lines.append(
            f"| {r['keys']} | {r['splits']} | {r['fused_us']:.1f} | {r['sdpa_us']:.1f} | {r['floor_us']:.1f} |"
        )
    lines += [
        "",
        "The fused kernel also applies RoPE and writes the new key and value (SDPA does neither).",
        "",
        "## Decode step, batch 1 (512-token prompts, 128 new tokens)",
        "",
        "| path | PDL | adapters | ms/step | vs floor |",
        "|---|---|---|---:|---:|",
    ]
    for r in result.get("step", []):
        pdl = "" if r["pdl"] is None else ("on" if r["pdl"] else "off")
        adapters = "8 mixed" if r["adapters"] else "none"
        lines.append(f"| {r['mode']} | {pdl} | {adapters} | {r['step_ms']:.2f} | {r['vs_floor']:.2f}x |")
    if result["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", default="kernels-h200", help="output file stem")
    args = parser.parse_args(argv)
    import triton

    device = torch.device("cuda")
    started = time.time()
    result: dict[str, Any] = {
        "command": "python -m lloco.bench.kernels " + " ".join(sys.argv[1:] if argv is None else argv),
        "gpu": torch.cuda.get_device_name(device),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "errors": [],
    }

    def section(name: str, fn: Callable[[], Any]) -> None:
        run_section(result, name, fn, torch.cuda.empty_cache)

    section("accuracy", lambda: check_accuracy(device, "llama2-7b", 4) + check_accuracy(device, "small", 4))
    section("gemv", lambda: bench_gemv(device))
    section("attention", lambda: bench_attention(device))
    config = LlamaConfig(**GEOMETRIES["llama2-7b"], max_position_embeddings=4096)
    model = random_llama(config, device, torch.bfloat16, seed=0)
    slots = LoraSlots(config, 8, 8, TARGETS, device, torch.bfloat16)
    for slot in range(8):
        slots.load(slot, random_adapter(config, 8, seed=slot))
    section("step", lambda: bench_step(model, slots))
    result["wall_s"] = time.time() - started
    write_report(args.out, args.name, result, render_markdown(result))
    return result


if __name__ == "__main__":
    main()
