"""rgemma: RecurrentGemma (Griffin) in PyTorch.

Public API (imported lazily, so `import rgemma` is cheap):

    GriffinConfig, Griffin, GriffinState        the model and its fixed-size state
    load_model, save_model                      checkpoints (official .pt, HF, rgemma)
    Tokenizer, load                             tokenizer; (model, tokenizer) in one call
    generate, stream                            batched generation and streaming
    train                                       training / fine-tuning
    quantize                                    weight-only int8
    compile_decode                              torch.compile the decode step
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
    "save_model": "checkpoint",
    "Tokenizer": "tokenizer",
    "load": "generation",
    "generate": "generation",
    "stream": "generation",
    "GenerationResult": "generation",
    "ChatSession": "generation",
    "prompt_state": "generation",
    "compile_decode": "generation",
    "train": "training",
    "TrainConfig": "training",
    "quantize": "quantization",
    "RgemmaError": "errors",
    "ConfigError": "errors",
    "CheckpointError": "errors",
    "InputError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rgemma' has no attribute {name!r}")
