"""The peers, built on the same weights as an rgemma model: the official
`recurrentgemma.torch.Griffin` and HF's `RecurrentGemmaForCausalLM`; and the HF
`GemmaForCausalLM` transformer baseline of a matched shape.

One module for the test oracles (`tests/oracle.py`) and the benchmarks: the weights
always come from rgemma (`Griffin.reset_parameters(seed)`, a checkpoint, or a test's
own weights) and are handed to a peer as an official-format state_dict. The peers are
oracles and baselines, never runtime dependencies of rgemma: each function imports
its package when called.
"""

from __future__ import annotations

import dataclasses
from collections.abc import MutableMapping
from typing import Any

import torch

from rgemma.config import BlockType, GriffinConfig
from rgemma.errors import CheckpointError
from rgemma.model import Griffin

__all__ = [
    "GemmaShape",
    "contiguous",
    "gemma_model",
    "hf_model",
    "official_config",
    "official_model",
    "random_griffin",
    "random_state_dict",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_griffin(cfg: GriffinConfig, dtype: str = "float32", seed: int = 0) -> Griffin:
    """An rgemma `Griffin` with its own random initialisation
    (`Griffin.reset_parameters(seed)`), built in place in `dtype` (no float32 copy),
    in eval mode. Deterministic in (cfg, dtype, seed)."""
    model = Griffin(cfg, device="meta", dtype=DTYPES[dtype]).to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():  # what reset_parameters leaves: 0 (the final norm)
            p.zero_()
    model.reset_parameters(seed)
    return model.eval()


def contiguous(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` with every tensor made contiguous, in place, one at a time (an
    rgemma state_dict hands out `ffw_up.w` as a transposed view); returns it."""
    for key in list(state_dict):
        state_dict[key] = state_dict[key].contiguous()
    return state_dict


def random_state_dict(cfg: GriffinConfig, dtype: str = "float32", seed: int = 0) -> dict:
    """The official-format state_dict of `random_griffin(cfg, dtype, seed)`: the same
    weights for every implementation of a benchmark."""
    return contiguous(random_griffin(cfg, dtype, seed).state_dict())


def official_config(cfg: GriffinConfig):
    """The official `recurrentgemma.torch.GriffinConfig` of a `GriffinConfig`."""
    import recurrentgemma.torch as rg

    return rg.GriffinConfig(
        vocab_size=cfg.vocab_size,
        width=cfg.width,
        mlp_expanded_width=cfg.mlp_expanded_width,
        num_heads=cfg.num_heads,
        lru_width=cfg.lru_width,
        attention_window_size=cfg.attention_window_size,
        block_types=tuple(
            rg.TemporalBlockType.RECURRENT
            if b == BlockType.RECURRENT
            else rg.TemporalBlockType.ATTENTION
            for b in cfg.block_types
        ),
        embeddings_scale_by_sqrt_dim=cfg.embeddings_scale_by_sqrt_dim,
        logits_soft_cap=cfg.logits_soft_cap or 0.0,
    )


def official_model(cfg: GriffinConfig, state_dict: MutableMapping[str, torch.Tensor]):
    """The official `recurrentgemma.torch.Griffin` holding the tensors of an
    official-format state_dict (an rgemma `Griffin.state_dict()`), in eval mode.

    The tensors are taken, not copied (`load_state_dict(assign=True)`): pass copies to
    keep the rgemma model independent. The dtype is the tensors'.
    """
    import recurrentgemma.torch as rg

    dtype = next(iter(state_dict.values())).dtype
    model = rg.Griffin(
        official_config(cfg), gradient_checkpointing=False, device="meta", dtype=dtype
    )
    model.load_state_dict(contiguous(dict(state_dict)), strict=True, assign=True)
    return model.eval()


def hf_model(cfg: GriffinConfig, state_dict: MutableMapping[str, torch.Tensor]):
    """HF `RecurrentGemmaForCausalLM` holding the tensors of an official-format
    state_dict, converted key by key (`rgemma.checkpoint.official_to_hf`), in eval mode.

    `state_dict` is emptied as it is converted, so at most one layer's copies exist
    at a time. Raises `CheckpointError` if HF's model does not take every tensor.
    """
    import transformers
    from transformers.initialization import no_init_weights

    from rgemma.checkpoint import griffin_to_hf_config, official_to_hf

    hf_cfg = transformers.RecurrentGemmaConfig(**griffin_to_hf_config(cfg))
    with no_init_weights():
        model = transformers.RecurrentGemmaForCausalLM(hf_cfg)
    hf_sd = {}
    for key in list(state_dict):
        hf_sd.update(official_to_hf({key: state_dict.pop(key)}))
    result = model.load_state_dict(hf_sd, strict=False, assign=True)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        raise CheckpointError(
            f"HF conversion: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as HF's checkpoints
    return model.eval()


@dataclasses.dataclass(frozen=True)
class GemmaShape:
    """A Gemma (transformer) shape: the HF `GemmaConfig` fields that matter.

    The defaults are Gemma-2B: hidden 2048, 18 layers, 8 heads, 1 KV head, head dim
    256, MLP 16384, vocabulary 256,000, tied embedding.
    """

    vocab_size: int = 256_000
    hidden_size: int = 2048
    num_layers: int = 18
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    intermediate_size: int = 16384

    def num_parameters(self) -> int:
        d, hd, m = self.hidden_size, self.head_dim, self.intermediate_size
        attn = d * self.num_heads * hd * 2 + d * self.num_kv_heads * hd * 2
        per_layer = attn + 3 * d * m + 2 * d
        return self.vocab_size * d + self.num_layers * per_layer + d

    def hf_config(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": 1 << 20,
            "hidden_activation": "gelu_pytorch_tanh",
            "tie_word_embeddings": True,
        }


def gemma_model(shape: GemmaShape, dtype: str = "float32", seed: int = 0):
    """HF `GemmaForCausalLM` of `shape` with random weights (matrices ~ N(0, 1/fan_in),
    norms and biases 0), in eval mode: the transformer baseline."""
    import transformers
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**shape.hf_config()))
    model.to(DTYPES[dtype])
    model.lm_head.weight = model.model.embed_tokens.weight  # Gemma ties the head
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
            else:
                p.zero_()
    return model.eval()
