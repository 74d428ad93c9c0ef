"""AdamW parameter groups (the official recipe's weight-decay exemptions) and the
learning-rate schedule (linear warm-up, cosine decay)."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from .config import TrainConfig

# Parameter names (suffixes) that get no weight decay: the official recipe leaves
# norms, biases, the embedding and the RG-LRU decay parameter undecayed.
NO_DECAY_SUFFIXES = (".scale", ".bias", ".b", "a_param")
NO_DECAY_NAMES = ("embedder.input_embedding",)


# ----------------------------------------------------------------------------------
# Optimiser, schedule, loss
# ----------------------------------------------------------------------------------
def is_no_decay(name: str) -> bool:
    """Whether parameter `name` is exempt from weight decay (norm scales, biases,
    the embedding, the RG-LRU `a_param`)."""
    return name in NO_DECAY_NAMES or name.endswith(NO_DECAY_SUFFIXES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: `[{decayed, weight_decay}, {undecayed, 0.0}]`.

    Each group also has `names`, the parameter names in it (for inspection; torch
    optimisers keep unknown group keys). Only parameters with `requires_grad`.
    """
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_no_decay(name):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warm-up from
    `lr / warmup_steps` to `lr` over `warmup_steps` steps, then a cosine from `lr`
    down to `min_lr` at `max_steps`; `min_lr` after that."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
