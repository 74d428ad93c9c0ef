"""Test models with random weights of a noticeable size, and the peers (official
`recurrentgemma.torch`, via `benchmarks.peers`) built on the same weights. Test-only:
the peers are oracles, never runtime deps."""

from __future__ import annotations

import warnings

import pytest
import torch

from rgemma.config import GriffinConfig
from rgemma.model import Griffin


def random_model(cfg: GriffinConfig, seed: int = 0, std: float = 0.3) -> Griffin:
    """An rgemma model whose every parameter (norms and biases included, so every
    parameter matters) is N(0, std), and the RG-LRU `a_param` U(-2, 3)."""
    torch.manual_seed(seed)
    model = Griffin(cfg)
    # Drawn per official state_dict key (not per internal parameter), so the model of a
    # seed does not depend on how model.py lays its parameters out; `ffw_up.w` in the
    # (2, m, d) order it has always been drawn in.
    weights = {}
    for name, t in model.state_dict().items():
        if name.endswith("a_param"):
            weights[name] = torch.empty_like(t).uniform_(-2.0, 3.0)
        elif name.endswith("ffw_up.w"):
            two, d, m = t.shape
            weights[name] = torch.empty(two, m, d, dtype=t.dtype).normal_(0.0, std).transpose(1, 2)
        else:
            weights[name] = torch.empty_like(t).normal_(0.0, std)
    model.load_state_dict(weights)
    return model.eval()


def official_model(model: Griffin):
    """The official `recurrentgemma.torch.Griffin` with a copy of `model`'s weights
    (skips the test when the official package is not installed)."""
    warnings.filterwarnings("ignore")
    pytest.importorskip("recurrentgemma.torch", reason="official recurrentgemma not installed")
    from benchmarks.peers import official_model as build

    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return build(model.config, weights)


def random_official(cfg: GriffinConfig, seed: int = 0, std: float = 0.3):
    """An official `recurrentgemma.torch.Griffin` with the weights of
    `random_model(cfg, seed, std)`."""
    return official_model(random_model(cfg, seed, std))


def random_pair(cfg: GriffinConfig, seed: int = 0):
    """(official model, rgemma model) with identical random weights."""
    ours = random_model(cfg, seed)
    return official_model(ours), ours
