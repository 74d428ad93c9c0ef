"""rgemma: RecurrentGemma (Griffin) in PyTorch.

Public API (imported lazily, so `import rgemma` is cheap):

    GriffinConfig, Griffin, GriffinState        the model and its fixed-size state
    load_model, save_model, save_hf             checkpoints (official .pt, HF, rgemma, Flax)
    bundled_model_path                          the shipped models' directories (base, chat)
    Tokenizer, load                             tokenizer; (model, tokenizer) in one call
    SamplingParams                              how to sample and stop, made once
    generate, stream, ChatSession               batched generation, streaming, chat
    train                                       training / fine-tuning
    quantize                                    weight-only int8
    compile_decode, CompiledDecodeStep          torch.compile the decode step
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GriffinConfig": "config",
    "BlockType": "config",
    "Griffin": "model",
    "GriffinState": "state",
    "RecurrentState": "state",
    "AttentionState": "state",
    "save_state": "state",
    "load_state": "state",
    "load_model": "checkpoint",
    "bundled_model_path": "checkpoint",
    "save_model": "checkpoint",
    "save_hf": "checkpoint",
    "Tokenizer": "tokenizer",
    "load": "generation",
    "generate": "generation",
    "stream": "generation",
    "GenerationResult": "generation",
    "ChatSession": "generation",
    "prompt_state": "generation",
    "SamplingParams": "sampling",
    "compile_decode": "engine",
    "CompiledDecodeStep": "engine",
    "train": "training",
    "TrainConfig": "training",
    "quantize": "quantization",
    "RgemmaError": "errors",
    "ConfigError": "errors",
    "CheckpointError": "errors",
    "InputError": "errors",
}

__all__ = [
    "AttentionState",
    "BlockType",
    "ChatSession",
    "CheckpointError",
    "CompiledDecodeStep",
    "ConfigError",
    "GenerationResult",
    "Griffin",
    "GriffinConfig",
    "GriffinState",
    "InputError",
    "RecurrentState",
    "RgemmaError",
    "SamplingParams",
    "Tokenizer",
    "TrainConfig",
    "bundled_model_path",
    "compile_decode",
    "generate",
    "load",
    "load_model",
    "load_state",
    "prompt_state",
    "quantize",
    "save_hf",
    "save_model",
    "save_state",
    "stream",
    "train",
]  # = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rgemma' has no attribute {name!r}")
