"""Finetuning throughput: LLoCO (compressed contexts) vs full-context LoRA, our loop vs HF transformers + peft.

    python -m lloco.bench.finetune --out DIR           # GPU: LLaMA-2-7B geometry, random bf16 weights
    python -m lloco.bench.finetune --out DIR --tiny    # CPU smoke run: a small geometry, short documents

A training sample is a question (32 tokens) and its answer (16 tokens) about one document of n tokens
(8k, 16k, 32k). Compressed: the document enters as its compressed context, ceil(n / 1536) * 50 summary
vectors (the paper's S = 1536, k = 50) as an embeddings prefix, batch 8. Full context: the document's n
raw tokens, batch 1. Our loop is the finetune recipe's ``train_step`` (the ``TrainableLora`` r=8 on
q/k/v/o, AdamW, bf16 autocast, logits only at answer positions); the reference is HF ``LlamaForCausalLM`` +
peft on the same weights. Both run every configuration twice, with activation checkpointing off and on (the
same setting on both sides of each ratio); a configuration that does not fit in memory is reported as such.
Samples/s are host-timed over steps after warm-up, with the device synchronised. Then two tenants train
at once on one GPU (two processes, each capped at half the memory: a fractional GPU each) against one
tenant alone. Random weights: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import math
import multiprocessing
import queue as queue_module
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lloco.bench.common import GEOMETRIES, hf_twin, random_llama
from lloco.finetune.data import Example
from lloco.finetune.steps import autocast, start_lora, train_step
from lloco.model import Llama, LlamaConfig, TrainableLora

SEGMENT_LEN, SUMMARY_K = 1536, 50
PROMPT_TOKENS, ANSWER_TOKENS = 32, 16
COMPRESSED_BATCH, FULL_BATCH = 8, 1
MODES = (("compressed", COMPRESSED_BATCH), ("full", FULL_BATCH))
LORA = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
CHECKPOINTING = (False, True)
GOAL_OURS_VS_HF = 1.2  # issue 19: samples/s over HF+peft at the longest document, same checkpointing


@dataclass(frozen=True)
class Run:
    """What one invocation measures."""

    geometry: str
    lengths: tuple[int, ...]
    warmup: int
    steps: int
    concurrent_length: int
    device: str
    dtype: str


def context_vectors(tokens: int) -> int:
    """Summary vectors of a compressed document of ``tokens`` tokens."""
    return math.ceil(tokens / SEGMENT_LEN) * SUMMARY_K


def samples(
    config: LlamaConfig, mode: str, tokens: int, count: int, device: torch.device, seed: int
) -> list[Example]:
    """Synthetic training rows: random ids (and random prefix vectors when compressed)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for line in range(count):
        ids = torch.randint(
            3, config.vocab_size, (PROMPT_TOKENS + ANSWER_TOKENS,), generator=generator
        ).tolist()
        if mode == "compressed":
            prefix = 0.02 * torch.randn(context_vectors(tokens), config.dim, generator=generator)
            rows.append(Example(line, prefix.to(device), ids, ANSWER_TOKENS))
        else:
            document = torch.randint(3, config.vocab_size, (tokens,), generator=generator).tolist()
            rows.append(Example(line, None, document + ids, ANSWER_TOKENS))
    return rows


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    step: Callable[[], tuple[int, int]], warmup: int, steps: int, device: torch.device
) -> dict[str, float]:
    """Samples/s and tokens/s of ``step`` (which returns samples, positions) over ``steps`` timed calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    done_samples = done_tokens = 0
    for _ in range(steps):
        batch_samples, batch_tokens = step()
        done_samples += batch_samples
        done_tokens += batch_tokens
    synchronize(device)
    seconds = time.perf_counter() - started
    result = {
        "samples_per_s": done_samples / seconds,
        "tokens_per_s": done_tokens / seconds,
        "step_s": seconds / steps,
    }
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def measure_or_oom(
    step: Callable[[], tuple[int, int]], warmup: int, steps: int, device: torch.device
) -> dict[str, Any]:
    """``measure``, or {"oom": True} when the configuration does not fit in the device's memory."""
    try:
        return measure(step, warmup, steps, device)
    except torch.OutOfMemoryError:
        return {"oom": True}


def setting(checkpointing: bool) -> str:
    return "on" if checkpointing else "off"


def lora_config(task_type: str | None) -> Any:
    from peft import LoraConfig

    return LoraConfig(**LORA, bias="none", task_type=task_type)


def our_lora(model: Llama) -> TrainableLora:
    """The recipe's adapter (``TrainableLora``, LORA's geometry) on the frozen ``model``, in training mode."""
    model.requires_grad_(False)
    lora = start_lora(
        model.config, LORA["r"], LORA["lora_alpha"], LORA["target_modules"], dropout=LORA["lora_dropout"]
    )
    return lora.to(model.device).train()


def optimizer_for(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any, list[torch.Tensor]]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-5, weight_decay=0.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), trainable


def ours(model: Llama, run: Run, device: torch.device) -> dict[str, dict[str, Any]]:
    """Our recipe's step on our Llama, compressed and full, for each document length."""
    lora = our_lora(model)
    optimizer, scheduler, _ = optimizer_for(lora)
    results: dict[str, dict[str, Any]] = {}
    for tokens in run.lengths:
        for (mode, batch), checkpointing in itertools.product(MODES, CHECKPOINTING):
            rows = samples(model.config, mode, tokens, batch, device, seed=tokens)

            def step(rows: list[Example] = rows, checkpointing: bool = checkpointing) -> tuple[int, int]:
                stats = train_step(model, lora, [rows], optimizer, scheduler, device, checkpointing)
                return stats.samples, stats.tokens

            key = f"{mode}/{tokens}/{setting(checkpointing)}"
            results[key] = {
                "batch": batch,
                "checkpointing": checkpointing,
                "positions": rows[0].length,
                **measure_or_oom(step, run.warmup, run.steps, device),
            }
            print(f"ours {key}: {results[key]}", flush=True)
            free(device)
    return results


def hf_peft(model: Any, run: Run, device: torch.device, config: LlamaConfig) -> dict[str, dict[str, Any]]:
    """HF LlamaForCausalLM + peft, the same rows, HF's own loss over labels, checkpointing off and on."""
    from peft import get_peft_model

    model.config.use_cache = False
    peft_model = get_peft_model(model, lora_config("CAUSAL_LM"))
    peft_model.train()
    optimizer, scheduler, trainable = optimizer_for(peft_model)
    embed = model.get_input_embeddings()
    results: dict[str, dict[str, Any]] = {}
    for tokens in run.lengths:
        for (mode, batch), checkpointing in itertools.product(MODES, CHECKPOINTING):
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_disable()
            rows = samples(config, mode, tokens, batch, device, seed=tokens)
            ids = torch.tensor([row.input_ids for row in rows], device=device)
            labels = ids.clone()
            labels[:, : ids.shape[1] - ANSWER_TOKENS] = -100
            prefix = torch.stack([row.prefix for row in rows]) if mode == "compressed" else None

            def step(
                ids: torch.Tensor = ids, labels: torch.Tensor = labels, prefix: Any = prefix
            ) -> tuple[int, int]:
                with autocast(device):
                    if prefix is None:
                        loss = peft_model(input_ids=ids, labels=labels).loss
                    else:
                        embeds = torch.cat([prefix.to(embed.weight.dtype), embed(ids)], dim=1)
                        ignore = torch.full(prefix.shape[:2], -100, device=device, dtype=labels.dtype)
                        loss = peft_model(
                            inputs_embeds=embeds, labels=torch.cat([ignore, labels], dim=1)
                        ).loss
                loss.backward()
                loss.item()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                prefix_len = 0 if prefix is None else prefix.shape[1]
                return ids.shape[0], ids.shape[0] * (ids.shape[1] + prefix_len)

            key = f"{mode}/{tokens}/{setting(checkpointing)}"
            results[key] = {
                "batch": batch,
                "checkpointing": checkpointing,
                "positions": rows[0].length,
                **measure_or_oom(step, run.warmup, run.steps, device),
            }
            print(f"hf   {key}: {results[key]}", flush=True)
            free(device)
    return results


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def tenant_process(
    run: Run, config: dict[str, Any], memory_fraction: float, barrier: Any, queue: Any
) -> None:
    """One tenant's compressed training in its own process (a fractional GPU: half the memory)."""
    device = torch.device(run.device)
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(memory_fraction, torch.cuda.current_device())
    llama_config = LlamaConfig(**config)
    model = random_llama(llama_config, device, getattr(torch, run.dtype), seed=0)
    lora = our_lora(model)
    optimizer, scheduler, _ = optimizer_for(lora)
    rows = samples(llama_config, "compressed", run.concurrent_length, COMPRESSED_BATCH, device, seed=1)

    def step() -> tuple[int, int]:
        stats = train_step(model, lora, [rows], optimizer, scheduler, device)
        return stats.samples, stats.tokens

    for _ in range(run.warmup):
        step()
    barrier.wait()  # all tenants start their timed steps together
    queue.put(measure(step, 0, run.steps * 2, device))


def tenants_at_once(run: Run, config: dict[str, Any], count: int) -> list[dict[str, float]]:
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(count), context.Queue()
    processes = [
        context.Process(target=tenant_process, args=(run, config, 1.0 / 2, barrier, queue))
        for _ in range(count)
    ]
    for process in processes:
        process.start()
    results: list[dict[str, float]] = []
    while len(results) < count:
        try:
            results.append(queue.get(timeout=5))
        except queue_module.Empty:
            failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if failed:  # a dead tenant never reaches the barrier: stop the others instead of waiting forever
                for process in processes:
                    process.kill()
                raise RuntimeError(f"a tenant process exited with {failed[0]}") from None
    for process in processes:
        process.join()
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="Directory for finetune.json and finetune.md."
    )
    parser.add_argument(
        "--tiny", action="store_true", help="Small geometry and short documents (CPU smoke run)."
    )
    parser.add_argument("--steps", type=int, default=None, help="Timed steps per configuration.")
    parser.add_argument("--warmup", type=int, default=None, help="Warm-up steps per configuration.")
    parser.add_argument(
        "--sections",
        default="throughput,tenants",
        help="throughput (ours vs HF+peft, compressed vs full), tenants (two at once vs one alone).",
    )
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    cuda = torch.cuda.is_available() and not args.tiny
    run = Run(
        geometry="small" if args.tiny else "llama2-7b",
        lengths=(512, 1024, 2048) if args.tiny else (8192, 16384, 32768),
        warmup=args.warmup if args.warmup is not None else (1 if args.tiny else 2),
        steps=args.steps if args.steps is not None else (2 if args.tiny else 4),
        concurrent_length=1024 if args.tiny else 8192,
        device="cuda" if cuda else "cpu",
        dtype="bfloat16" if cuda else "float32",
    )
    device, dtype = torch.device(run.device), getattr(torch, run.dtype)
    config = dict(GEOMETRIES[run.geometry], max_position_embeddings=4096)
    llama_config = LlamaConfig(**config)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": " ".join(
            ["python -m lloco.bench.finetune", *(argv if argv is not None else sys.argv[1:])]
        ),
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "versions": versions(),
        "run": asdict(run),
        "geometry": config,
    }
    if "throughput" in sections:
        model = random_llama(llama_config, device, dtype, seed=0)
        hf = hf_twin(model)  # shares our weight tensors: one copy in memory
        result["ours"] = ours(model, run, device)
        free(device)
        result["hf_peft"] = hf_peft(hf, run, device, llama_config)
        del model, hf
        free(device)
        result["summary"] = summary(result, run)
    if "tenants" in sections:
        alone = tenants_at_once(run, config, 1)
        together = tenants_at_once(run, config, 2)
        result["tenants"] = {
            "length": run.concurrent_length,
            "alone_samples_per_s": alone[0]["samples_per_s"],
            "concurrent_samples_per_s": [r["samples_per_s"] for r in together],
            "concurrent_total_samples_per_s": sum(r["samples_per_s"] for r in together),
        }
        result["tenants"]["total_vs_alone"] = (
            result["tenants"]["concurrent_total_samples_per_s"] / alone[0]["samples_per_s"]
        )
    (args.out / "finetune.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "finetune.md").write_text(markdown(result, run))
    print(markdown(result, run))
    return result


def summary(result: dict[str, Any], run: Run) -> dict[str, Any]:
    """Ratios per length: ours / HF+peft per mode and checkpointing setting (same on both sides), and
    compressed / full per loop (each side at its faster setting that fit)."""

    def rate(loop: str, mode: str, tokens: int, checkpointing: bool) -> float | None:
        return result[loop][f"{mode}/{tokens}/{setting(checkpointing)}"].get("samples_per_s")

    def best(loop: str, mode: str, tokens: int) -> float | None:
        rates = [r for c in CHECKPOINTING if (r := rate(loop, mode, tokens, c)) is not None]
        return max(rates, default=None)

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a / b

    rows = {}
    for tokens in run.lengths:
        row: dict[str, float | None] = {
            f"ours_vs_hf_{mode}_checkpointing_{setting(c)}": ratio(
                rate("ours", mode, tokens, c), rate("hf_peft", mode, tokens, c)
            )
            for (mode, _), c in itertools.product(MODES, CHECKPOINTING)
        }
        for loop in ("ours", "hf_peft"):
            row[f"{loop}_compressed_vs_full"] = ratio(
                best(loop, "compressed", tokens), best(loop, "full", tokens)
            )
        rows[str(tokens)] = row
    longest = rows[str(run.lengths[-1])]
    goals = [
        {
            "goal": f"ours >= {GOAL_OURS_VS_HF}x HF+peft samples/s, compressed, n = {run.lengths[-1]}, "
            f"checkpointing {setting(c)} on both sides (issue 19)",
            "value": "n/a (out of memory)" if value is None else f"{value:.2f}x",
            "met": value is not None and value >= GOAL_OURS_VS_HF,
        }
        for c in CHECKPOINTING
        for value in [longest[f"ours_vs_hf_compressed_checkpointing_{setting(c)}"]]
    ]
    return {"by_length": rows, "goals": goals}


def markdown(result: dict[str, Any], run: Run) -> str:
    lines = [
        f"# Finetuning throughput ({run.geometry}, random {run.dtype} weights)",
        "",
        f"`{result['command']}` on {result['device']}, {result['when']}; {result['versions']}.",
        "",
        f"Sample: {PROMPT_TOKENS}-token question + {ANSWER_TOKENS}-token answer about a document of n tokens. "
        f"Compressed: ceil(n/{SEGMENT_LEN})*{SUMMARY_K} context vectors, batch {COMPRESSED_BATCH}. "
        f"Full: n tokens, batch {FULL_BATCH}. LoRA r=8 q/k/v/o. Each loop runs with activation checkpointing "
        "off and on; ratios between loops compare the same setting.",
        "",
    ]
    if "summary" in result:
        lines += throughput_markdown(result, run)
    if "tenants" in result:
        tenants = result["tenants"]
        lines += [
            f"Two tenants on one device (compressed, n = {tenants['length']}, half the memory each): "
            f"alone {tenants['alone_samples_per_s']:.2f} samples/s; together "
            f"{' + '.join(f'{v:.2f}' for v in tenants['concurrent_samples_per_s'])} = "
            f"{tenants['concurrent_total_samples_per_s']:.2f} samples/s ({tenants['total_vs_alone']:.2f}x alone).",
            "",
        ]
    return "\n".join(lines)


def throughput_markdown(result: dict[str, Any], run: Run) -> list[str]:
    def cell(row: dict[str, Any], key: str, spec: str) -> str:
        return "OOM" if row.get("oom") else format(row.get(key, 0), spec)

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    lines = [
        "| n | loop | checkpointing | compressed samples/s | full samples/s | compressed peak GB | full peak GB |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for tokens, (name, key), c in itertools.product(
        run.lengths, (("ours", "ours"), ("HF+peft", "hf_peft")), CHECKPOINTING
    ):
        compressed = result[key][f"compressed/{tokens}/{setting(c)}"]
        full = result[key][f"full/{tokens}/{setting(c)}"]
        lines.append(
            f"| {tokens} | {name} | {setting(c)} | {cell(compressed, 'samples_per_s', '.2f')} | "
            f"{cell(full, 'samples_per_s', '.3f')} | {cell(compressed, 'peak_memory_gb', '.1f')} | "
            f"{cell(full, 'peak_memory_gb', '.1f')} |"
        )
    lines += [
        "",
        "| n | ours / HF+peft compressed, off | on | ours / HF+peft full, off | on | ours compressed / full "
        "| HF+peft compressed / full |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for tokens, row in result["summary"]["by_length"].items():
        lines.append(
            f"| {tokens} | {ratio(row['ours_vs_hf_compressed_checkpointing_off'])} | "
            f"{ratio(row['ours_vs_hf_compressed_checkpointing_on'])} | "
            f"{ratio(row['ours_vs_hf_full_checkpointing_off'])} | {ratio(row['ours_vs_hf_full_checkpointing_on'])} | "
            f"{ratio(row['ours_compressed_vs_full'])} | {ratio(row['hf_peft_compressed_vs_full'])} |"
        )
    lines += ["", "| goal | value | met |", "|---|---|---|"]
    lines += [
        f"| {g['goal']} | {g['value']} | {'yes' if g['met'] else 'no'} |" for g in result["summary"]["goals"]
    ]
    lines.append("")
    return lines


def versions() -> str:
    import peft
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"


if __name__ == "__main__":
    main()
