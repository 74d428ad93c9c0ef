"""Build the peers (official `recurrentgemma.torch`, HF transformers) on the same random
weights as an rgemma model. Test-only: the peers are oracles, never runtime deps."""

from __future__ import annotations

import warnings

import pytest
import torch

from rgemma.config import GriffinConfig
from rgemma.model import Griffin


def official_module():
    warnings.filterwarnings("ignore")
    return pytest.importorskip("recurrentgemma.torch", reason="official recurrentgemma not installed")


def official_config(cfg: GriffinConfig):
    official_module()
    from rgemma.bench import official_config as convert

    return convert(cfg)


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
