"""Build the peers (official `recurrentgemma.torch`, HF transformers) on the same random
weights as an rgemma model. Test-only: the peers are oracles, never runtime deps."""

from __future__ import annotations

import warnings

import pytest
import torch

from rgemma.config import BlockType, GriffinConfig
from rgemma.model import Griffin


def official_module():
    warnings.filterwarnings("ignore")
    return pytest.importorskip("recurrentgemma.torch", reason="official recurrentgemma not installed")


def official_config(cfg: GriffinConfig):
    rg = official_module()
    return rg.GriffinConfig(
        vocab_size=cfg.vocab_size,
        width=cfg.width,
        mlp_expanded_width=cfg.mlp_expanded_width,
        num_heads=cfg.num_heads,
        lru_width=cfg.lru_width,
        attention_window_size=cfg.attention_window_size,
        block_types=tuple(
            rg.TemporalBlockType.RECURRENT if b == BlockType.RECURRENT
            else rg.TemporalBlockType.ATTENTION
            for b in cfg.block_types
        ),
        embeddings_scale_by_sqrt_dim=cfg.embeddings_scale_by_sqrt_dim,
        logits_soft_cap=cfg.logits_soft_cap if cfg.logits_soft_cap is not None else 0.0,
    )


def random_official(cfg: GriffinConfig, seed: int = 0, std: float = 0.3):
    """An official `recurrentgemma.torch.Griffin` with random weights (all params
    random, norms and biases included, so every parameter matters)."""
    rg = official_module()
    torch.manual_seed(seed)
    model = rg.Griffin(official_config(cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("a_param"):
                p.uniform_(-2.0, 3.0)
            else:
                p.normal_(0.0, std)
    return model.eval()


def random_pair(cfg: GriffinConfig, seed: int = 0):
    """(official model, rgemma model) with identical random weights."""
    official = random_official(cfg, seed)
    ours = Griffin(cfg)
    ours.load_state_dict(official.state_dict(), strict=True)
    return official, ours.eval()


def random_model(cfg: GriffinConfig, seed: int = 0, std: float = 0.3) -> Griffin:
    """An rgemma model with random weights of a noticeable size (no official needed)."""
    torch.manual_seed(seed)
    model = Griffin(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("a_param"):
                p.uniform_(-2.0, 3.0)
            else:
                p.normal_(0.0, std)
    return model.eval()
