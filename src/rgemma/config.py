"""Model configuration: `GriffinConfig`, its named presets, and inference from weights.

Counterpart of `recurrentgemma.common.GriffinConfig`. Values of the presets are
those of the official checkpoints (RecurrentGemma, arXiv 2404.07839, Table 1)
and of the Griffin paper (arXiv 2402.19427, section 3).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Mapping
from typing import Any

import torch

from .errors import ConfigError


class BlockType(str, enum.Enum):
    """Kind of temporal-mixing block in a residual block."""

    RECURRENT = "recurrent"
    ATTENTION = "attention"


def griffin_pattern(num_layers: int) -> tuple[BlockType, ...]:
    """The Griffin block pattern: recurrent, recurrent, attention, repeated."""
    cycle = (BlockType.RECURRENT, BlockType.RECURRENT, BlockType.ATTENTION)
    return tuple(cycle[i % 3] for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class GriffinConfig:
    """Hyper-parameters of a Griffin / RecurrentGemma model.

    Attributes:
        vocab_size: number of tokens V (256,000 for the Gemma tokenizer).
        width: model width D (residual stream).
        mlp_expanded_width: hidden width of the gated MLP (the official
            `mlp_expanded_width`; HF's `intermediate_size` is twice this).
        num_heads: attention heads H; also the number of blocks of the RG-LRU's
            block-diagonal gates. Head dim is `width // num_heads`.
        block_types: one `BlockType` per residual block.
        lru_width: width E of the recurrent branch (defaults to `width`).
        attention_window_size: local attention window W: each query sees
            itself and the W tokens before it (W + 1 keys).
        embeddings_scale_by_sqrt_dim: multiply embeddings by sqrt(D), rounded
            to bfloat16 as every official path does.
        logits_soft_cap: c in `c * tanh(logits / c)`; None for no cap.
        conv1d_temporal_width: Conv1D width (4 in every released model).
        rope_max_wavelength: RoPE base (10,000).
        final_w_init_variance_scale: used only for random initialisation.
    """

    vocab_size: int
    width: int
    mlp_expanded_width: int
    num_heads: int
    block_types: tuple[BlockType, ...]
    lru_width: int | None = None
    attention_window_size: int = 2048
    embeddings_scale_by_sqrt_dim: bool = True
    logits_soft_cap: float | None = 30.0
    conv1d_temporal_width: int = 4
    rope_max_wavelength: float = 10_000.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_types", tuple(BlockType(b) for b in self.block_types))
        if self.lru_width is None:
            object.__setattr__(self, "lru_width", self.width)
        for name in (
            "vocab_size",
            "width",
            "mlp_expanded_width",
            "num_heads",
            "lru_width",
            "attention_window_size",
            "conv1d_temporal_width",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"GriffinConfig.{name} must be a positive int, got {value!r}")
        if not self.block_types:
            raise ConfigError("GriffinConfig.block_types must name at least one block")
        if self.width % self.num_heads:
            raise ConfigError(
                f"width ({self.width}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.lru_width % self.num_heads:
            raise ConfigError(
                f"lru_width ({self.lru_width}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.head_dim % 4:
            raise ConfigError(f"head_dim ({self.head_dim}) must be divisible by 4 for RoPE")
        if self.logits_soft_cap is not None and self.logits_soft_cap <= 0:
            raise ConfigError(
                f"logits_soft_cap must be positive or None, got {self.logits_soft_cap}"
            )

    # Derived values -----------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.block_types)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def embedding_scale(self) -> float:
        """sqrt(width) rounded to bfloat16 (50.5 for the 2B model, not 50.596), or 1."""
        if not self.embeddings_scale_by_sqrt_dim:
            return 1.0
        # On the CPU whatever the ambient device (`with torch.device("meta"): Griffin(...)`).
        return float(torch.tensor(math.sqrt(self.width), dtype=torch.bfloat16, device="cpu"))

    def num_parameters(self) -> int:
        """Exact parameter count of `Griffin(self)` (embedding counted once: it is tied)."""
        d, e, m, h = self.width, self.lru_width, self.mlp_expanded_width, self.num_heads
        hd, k = self.head_dim, self.conv1d_temporal_width
        total = self.vocab_size * d + d  # embedding + final norm
        per_mlp = 2 * d * m + 2 * m + m * d + d
        for block in self.block_types:
            total += 2 * d + per_mlp  # two pre-norms + MLP
            if block == BlockType.RECURRENT:
                total += 2 * (d * e + e) + (e * d + d)  # linear_x, linear_y, linear_out
                total += k * e + e  # conv
                total += e + 2 * (h * (e // h) ** 2 + e)  # a_param + two block-diagonal gates
            else:
                total += d * d + 2 * d * hd + d * d + d  # q, k, v, out (+ bias)
        return total

    # Serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["block_types"] = [b.value for b in self.block_types]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GriffinConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"unknown GriffinConfig field(s): {', '.join(unknown)}")
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data and f.default is dataclasses.MISSING
        )
        if missing:
            raise ConfigError(f"GriffinConfig is missing field(s): {', '.join(missing)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"invalid GriffinConfig: {err}") from err

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    # Presets ------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> GriffinConfig:
        """A named preset: one of `PRESETS` (`recurrentgemma-2b`, `recurrentgemma-9b`,
        `griffin-7b`, `hawk-7b`, and the small `tiny` / `test-*` ones)."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(
                f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}"
            ) from None

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        *,
        attention_window_size: int = 2048,
        embeddings_scale_by_sqrt_dim: bool = True,
        logits_soft_cap: float | None = 30.0,
    ) -> GriffinConfig:
        """Infer a config from the shapes of an official-format state_dict.

        What shapes cannot tell (window, embedding scaling, soft-cap) comes from the
        keyword arguments, whose defaults are RecurrentGemma's. Counterpart of
        `recurrentgemma.GriffinConfig.from_torch_params`.

        Raises:
            CheckpointError: a key needed for inference is missing.
        """
        from .errors import CheckpointError

        def shape(key: str) -> tuple[int, ...]:
            if key not in state_dict:
                raise CheckpointError(f"cannot infer the config: key {key!r} is missing")
            return tuple(state_dict[key].shape)

        vocab_size, width = shape("embedder.input_embedding")
        indices = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")})
        if indices != list(range(len(indices))) or not indices:
            raise CheckpointError(f"cannot infer the config: block indices are {indices[:10]}...")
        block_types = []
        lru_width, num_heads, conv_width = None, None, 4
        for i in indices:
            if any(k.startswith(f"blocks.{i}.recurrent_block.") for k in state_dict):
                block_types.append(BlockType.RECURRENT)
                heads, block_width, _ = shape(f"blocks.{i}.recurrent_block.rg_lru.a_gate.w")
                lru_width, num_heads = heads * block_width, heads
                conv_width = shape(f"blocks.{i}.recurrent_block.conv_1d.w")[0]
            elif any(k.startswith(f"blocks.{i}.attention_block.") for k in state_dict):
                block_types.append(BlockType.ATTENTION)
                head_dim = shape(f"blocks.{i}.attention_block.proj_k.weight")[0]
                if num_heads is None:
                    num_heads = width // head_dim
            else:
                raise CheckpointError(
                    f"cannot infer the config: block {i} has neither "
                    f"'blocks.{i}.recurrent_block.*' nor 'blocks.{i}.attention_block.*' keys"
                )
        mlp_expanded_width = shape("blocks.0.mlp_block.ffw_up.w")[2]
        return cls(
            vocab_size=vocab_size,
            width=width,
            mlp_expanded_width=mlp_expanded_width,
            num_heads=num_heads,
            block_types=tuple(block_types),
            lru_width=lru_width,
            attention_window_size=attention_window_size,
            embeddings_scale_by_sqrt_dim=embeddings_scale_by_sqrt_dim,
            logits_soft_cap=logits_soft_cap,
            conv1d_temporal_width=conv_width,
        )

    def check_matches(self, other: GriffinConfig, *, what: str = "checkpoint") -> None:
        """Raise `ConfigError` naming every field where `other` (e.g. inferred from a
        checkpoint's shapes) differs from this declared config (see `config_diff`)."""
        diffs = config_diff(self, other)
        if diffs:
            raise ConfigError(
                f"config does not match the {what} (declared vs {what}): " + "; ".join(diffs)
            )


def _plain(value: Any) -> Any:
    """`value` with enums replaced by their values (`'recurrent'`, not `BlockType...`)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_diff(a: GriffinConfig, b: GriffinConfig) -> list[str]:
    """The `GriffinConfig` fields where `a` and `b` differ, each as `name (a_value vs
    b_value)` with plain values; empty when they are equal.

    Used wherever two configs must agree: a declared config against a checkpoint's
    (`check_matches`), a resumed training run against its checkpoint.
    """
    return [
        f"{f.name} ({_plain(getattr(a, f.name))!r} vs {_plain(getattr(b, f.name))!r})"
        for f in dataclasses.fields(a)
        if getattr(a, f.name) != getattr(b, f.name)
    ]


def _make(**kw: Any) -> GriffinConfig:
    return GriffinConfig(**kw)


PRESETS: dict[str, GriffinConfig] = {
    "recurrentgemma-2b": _make(
        vocab_size=256_000,
        width=2560,
        mlp_expanded_width=7680,
        num_heads=10,
        lru_width=2560,
        block_types=griffin_pattern(26),
        attention_window_size=2048,
        embeddings_scale_by_sqrt_dim=True,
        logits_soft_cap=30.0,
    ),
    "recurrentgemma-9b": _make(
        vocab_size=256_000,
        width=4096,
        mlp_expanded_width=12288,
        num_heads=16,
        lru_width=4096,
        block_types=griffin_pattern(38),
        attention_window_size=2048,
        embeddings_scale_by_sqrt_dim=True,
        logits_soft_cap=30.0,
    ),
    "griffin-7b": _make(
        vocab_size=256_000,
        width=4096,
        mlp_expanded_width=12288,
        num_heads=32,
        lru_width=5632,
        block_types=griffin_pattern(32),
        attention_window_size=1024,
        embeddings_scale_by_sqrt_dim=False,
        logits_soft_cap=None,
    ),
    "hawk-7b": _make(
        vocab_size=256_000,
        width=4096,
        mlp_expanded_width=12288,
        num_heads=32,
        lru_width=5632,
        block_types=(BlockType.RECURRENT,) * 32,
        attention_window_size=1024,
        embeddings_scale_by_sqrt_dim=False,
        logits_soft_cap=None,
    ),
    # The 2B widths with 6 layers (R,R,A,R,R,A): 1.12B parameters, for quick benchmarks.
    "recurrentgemma-2b-6l": _make(
        vocab_size=256_000,
        width=2560,
        mlp_expanded_width=7680,
        num_heads=10,
        lru_width=2560,
        block_types=griffin_pattern(6),
        attention_window_size=2048,
    ),
    # Small configs for tests: every block kind, a window shorter than test sequences.
    "test-tiny": _make(
        vocab_size=256,
        width=32,
        mlp_expanded_width=48,
        num_heads=2,
        lru_width=40,
        block_types=griffin_pattern(3),
        attention_window_size=8,
    ),
    "test-small": _make(
        vocab_size=512,
        width=64,
        mlp_expanded_width=96,
        num_heads=4,
        lru_width=64,
        block_types=griffin_pattern(5),
        attention_window_size=16,
    ),
}
