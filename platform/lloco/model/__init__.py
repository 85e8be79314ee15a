"""Model core: Llama-family forward, multi-LoRA slots, compressor, continuous-batching generation.

Plain PyTorch; nothing here imports Ray or other platform rooms (``lloco.storage`` only lazily, for s3://).
"""

from lloco.model.compressor import Compressor, CompressorConfig, load_compressor
from lloco.model.config import LlamaConfig
from lloco.model.generate import (
    GenerationRequest,
    Generator,
    Resume,
    SamplingParams,
    StepOutput,
    generate,
    truncate_at_stop,
)
from lloco.model.llama import KVCache, Llama
from lloco.model.loading import DEFAULT_MODEL, LoadedModel, load_model, resolve_dtype
from lloco.model.lora import LoraAdapter, LoraBatch, LoraFit, LoraSlots, check_peft_files
from lloco.model.prompt import QA_INSTRUCTION, chat_prompt, qa_question
from lloco.model.tiny import tiny_llama_dir
from lloco.model.trainable_lora import TrainableLora

__all__ = [
    "DEFAULT_MODEL",
    "QA_INSTRUCTION",
    "Compressor",
    "CompressorConfig",
    "GenerationRequest",
    "Generator",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "LoadedModel",
    "LoraAdapter",
    "LoraBatch",
    "LoraFit",
    "LoraSlots",
    "Resume",
    "SamplingParams",
    "StepOutput",
    "TrainableLora",
    "chat_prompt",
    "check_peft_files",
    "generate",
    "load_compressor",
    "load_model",
    "qa_question",
    "resolve_dtype",
    "tiny_llama_dir",
    "truncate_at_stop",
]
