"""LoRA (Hu et al., arXiv 2106.09685) on a `Griffin`, applied from outside the model.

`apply_lora(model, rank, alpha)` swaps each targeted projection for a `LoRALinear`
wrapper (torchtune's `components/lora` pattern; `model.py` knows nothing of it):

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,   A (r, in), B (out, r)

with W and b the frozen base parameters, registered on the wrapper under their own
names, so `model.state_dict()` keeps the official keys and adds
`...lora_A.weight` / `...lora_B.weight`. A is Kaiming-uniform and B zero (PEFT's
default), so an untrained adapter leaves the logits unchanged. `merge_lora` folds
`W += (alpha / r) B A` in and puts the plain `Linear` back.

Targets (`DEFAULT_TARGETS`, every projection of the model) by rgemma module name, or
by HF's name for the same module (`q_proj` for `proj_q`, ...):

    rgemma        HF (PEFT target_modules)   where
    linear_x      linear_x                   recurrent block, d -> e
    linear_y      linear_y                   recurrent block, d -> e
    linear_out    linear_out                 recurrent block, e -> d
    proj_q        q_proj                     attention block, d -> d
    proj_k        k_proj                     attention block, d -> hd
    proj_v        v_proj                     attention block, d -> hd
    proj_final    o_proj                     attention block, d -> d
    gate_proj     gate_proj                  MLP, official ffw_up half 0, d -> m
    up_proj       up_proj                    MLP, official ffw_up half 1, d -> m
    ffw_down      down_proj                  MLP, m -> d

With `gates=True` the RG-LRU gates (`input_gate`, `a_gate`, block-diagonal) get a
rank-r adapter per head (`LoRABlockDiagonal`), which merges into the block
structure. HF's gates are plain parameters, not modules PEFT can wrap, so such an
adapter is rgemma-only: `save_adapter` refuses it (merge it instead).

On disk (`save_adapter` / `load_adapter`) adapters use PEFT's format, named after
HF's `RecurrentGemmaForCausalLM` (the key map of `rgemma.checkpoint`):
`adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules, ...) and
`adapter_model.safetensors` with keys such as
`base_model.model.model.layers.0.temporal_block.linear_x.lora_A.weight`, so
`peft.PeftModel.from_pretrained(RecurrentGemmaForCausalLM, dir)` loads an adapter
trained by rgemma, and adapters trained with PEFT on HF load into rgemma. The
safetensors metadata also holds the base model's config and fingerprint
(`base_fingerprint`), which `load_adapter` checks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .config import GriffinConfig, config_diff
from .errors import CheckpointError, ConfigError, InputError
from .formats import LAYER_KEY_MAP, LAYER_SPLIT_MAP
from .io import atomic_dir
from .model import BlockDiagonalLinear, Griffin, Linear
from .ops import linear

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "DEFAULT_TARGETS",
    "GATE_TARGETS",
    "AdapterSize",
    "LoRABlockDiagonal",
    "LoRALinear",
    "adapter_size",
    "apply_lora",
    "base_fingerprint",
    "has_lora",
    "load_adapter",
    "lora_state_dict",
    "merge_lora",
    "resolve_targets",
    "save_adapter",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_ADAPTER_BIN_NAME = "adapter_model.bin"  # PEFT's older format, read only
_PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM -> RecurrentGemmaForCausalLM

# ----------------------------------------------------------------------------------
# Targets (data)
# ----------------------------------------------------------------------------------
#: rgemma target name -> its module path inside a block (after `blocks.{i}.`).
_LINEAR_TARGETS: dict[str, str] = {
    "linear_x": "recurrent_block.linear_x",
    "linear_y": "recurrent_block.linear_y",
    "linear_out": "recurrent_block.linear_out",
    "proj_q": "attention_block.proj_q",
    "proj_k": "attention_block.proj_k",
    "proj_v": "attention_block.proj_v",
    "proj_final": "attention_block.proj_final",
    "gate_proj": "mlp_block.ffw_up.gate_proj",
    "up_proj": "mlp_block.ffw_up.up_proj",
    "ffw_down": "mlp_block.ffw_down",
}
#: The RG-LRU gates (`apply_lora(..., gates=True)`): rgemma-only.
_GATE_TARGETS: dict[str, str] = {
    "input_gate": "recurrent_block.rg_lru.input_gate",
    "a_gate": "recurrent_block.rg_lru.a_gate",
}

#: Every projection of the model: the recurrent block's three linears, the attention
#: block's four, and the MLP's three (both halves of the official `ffw_up`).
DEFAULT_TARGETS: tuple[str, ...] = tuple(_LINEAR_TARGETS)
#: The RG-LRU gates, targeted with `gates=True` (or by name).
GATE_TARGETS: tuple[str, ...] = tuple(_GATE_TARGETS)


def _hf_module(path: str) -> str:
    """A linear's module path inside a block -> HF's (`attention_block.proj_q` ->
    `temporal_block.q_proj`), read off `rgemma.checkpoint`'s key maps."""
    if path + ".weight" in LAYER_KEY_MAP:
        return LAYER_KEY_MAP[path + ".weight"].removesuffix(".weight")
    parent, half = path.rsplit(".", 1)  # mlp_block.ffw_up, gate_proj | up_proj
    halves = LAYER_SPLIT_MAP[parent + ".w"]  # (gate_proj.weight, up_proj.weight)
    return halves[("gate_proj", "up_proj").index(half)].removesuffix(".weight")


#: rgemma target name -> HF module path inside a layer (after `model.layers.{i}.`).
_HF_MODULES: dict[str, str] = {name: _hf_module(p) for name, p in _LINEAR_TARGETS.items()}
#: HF module path inside a layer -> rgemma target name.
_FROM_HF_MODULE: dict[str, str] = {hf: name for name, hf in _HF_MODULES.items()}
#: HF's short names accepted as targets (`q_proj`) -> rgemma's (`proj_q`).
_HF_ALIASES: dict[str, str] = {hf.rsplit(".", 1)[1]: name for name, hf in _HF_MODULES.items()}
#: Module path inside a block -> rgemma target name (linears and gates).
_BY_PATH: dict[str, str] = {p: n for n, p in {**_LINEAR_TARGETS, **_GATE_TARGETS}.items()}


def _target_of(path: str) -> str:
    """`blocks.{i}.<module path>` -> its rgemma target name."""
    return _BY_PATH[path.split(".", 2)[2]]


def resolve_targets(targets: Iterable[str] | str, gates: bool = False) -> list[str]:
    """Target names (rgemma's or HF's) -> rgemma names, in `DEFAULT_TARGETS` order.

    Raises:
        ConfigError: not a list of strings, empty, or an unknown name (the valid ones
        listed).
    """
    if isinstance(targets, str) or not isinstance(targets, Iterable):
        raise ConfigError(f"LoRA targets must be a list of module names, got {targets!r}")
    names = list(targets)
    if not names and not gates:
        raise ConfigError(f"LoRA targets are empty; valid: {', '.join(DEFAULT_TARGETS)}")
    out = set(_GATE_TARGETS) if gates else set()
    for name in names:
        if not isinstance(name, str):
            raise ConfigError(f"LoRA target {name!r} is not a module name")
        name = _HF_ALIASES.get(name, name)
        if name not in _LINEAR_TARGETS and name not in _GATE_TARGETS:
            hf = ", ".join(f"{k} ({v})" for k, v in _HF_ALIASES.items() if k != v)
            raise ConfigError(
                f"unknown LoRA target {name!r}; valid: {', '.join(DEFAULT_TARGETS + GATE_TARGETS)}"
                f" (HF's names also accepted: {hf})"
            )
        out.add(name)
    return [n for n in (*DEFAULT_TARGETS, *GATE_TARGETS) if n in out]


# ----------------------------------------------------------------------------------
# Wrappers
# ----------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """A linear plus a low-rank update: `base(x) + (alpha / r) * B(A(dropout(x)))`.

    The base's `weight` (out, in) and `bias` (out,) or None are registered on the
    wrapper under the same names (frozen), so state_dict keys do not change; `lora_A`
    is `nn.Linear(in, r)` (Kaiming-uniform, as PEFT) and `lora_B` `nn.Linear(r, out)`
    (zeros), no biases, on the base's device and dtype. `in_features` /
    `out_features` are the base's: it stands in for the `nn.Linear` it wraps.

    Args:
        base: the `nn.Linear` to wrap (its parameters are taken, not copied).
        rank: r >= 1.
        alpha: the scale numerator; the update is multiplied by alpha / r.
        dropout: dropout probability on the adapter's input (training only).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.weight = base.weight
        self.bias = base.bias
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **kw)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform (a = sqrt(5), nn.Linear's and PEFT's), B zeros."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out)."""
        out = linear(x, self.weight, self.bias)
        return out + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta_weight(self) -> Tensor:
        """`(alpha / r) * B @ A`, (out, in) float32: what merging adds to `weight`."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged(self) -> Linear:
        """A plain `Linear` with `weight + delta_weight()` (rounded once to the weight's
        dtype, in place on the base parameter) and the same bias."""
        with torch.no_grad():
            self.weight.copy_(self.weight.float() + self.delta_weight())
        out = Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        out.weight, out.bias = self.weight, self.bias
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, alpha={self.alpha:g}"
        )


class LoRABlockDiagonal(nn.Module):
    """A `BlockDiagonalLinear` (the RG-LRU gates) plus a rank-r update per head:
    `w[h] + (alpha / r) A[h] @ B[h]`, so it merges into the block structure.

    Parameters: the base's `w` (h, i, i) and `b` (h, i), frozen, under their own names;
    `lora_A` (h, i, r) Kaiming-uniform per head (bound 1 / sqrt(i), as `LoRALinear`'s
    A) and `lora_B` (h, r, i) zeros. rgemma-only: HF has no gate modules for PEFT.
    """

    def __init__(self, base: BlockDiagonalLinear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.num_blocks = base.num_blocks
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.w, self.b = base.w, base.b
        h, i, j = base.w.shape
        kw = {"device": base.w.device, "dtype": base.w.dtype}
        self.lora_A = nn.Parameter(torch.empty(h, i, rank, **kw))
        self.lora_B = nn.Parameter(torch.zeros(h, rank, j, **kw))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A uniform in +-1 / sqrt(i) per head (Kaiming-uniform, a = sqrt(5)), B zeros."""
        bound = 1.0 / math.sqrt(self.lora_A.shape[1])
        self.lora_A.uniform_(-bound, bound)
        self.lora_B.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """x (..., h * i) -> (..., h * i)."""
        *lead, e = x.shape
        xh = x.reshape(-1, self.num_blocks, e // self.num_blocks).transpose(0, 1)  # (h, n, i)
        y = torch.baddbmm(self.b[:, None, :], xh, self.w)  # (h, n, i): the base
        low = torch.bmm(torch.bmm(self.dropout(xh), self.lora_A), self.lora_B)  # (h, n, i)
        y = y + low * self.scaling
        return y.transpose(0, 1).reshape(*lead, e)

    def delta_weight(self) -> Tensor:
        """`(alpha / r) * A @ B` per head, (h, i, i) float32."""
        return torch.bmm(self.lora_A.float(), self.lora_B.float()) * self.scaling

    def merged(self) -> BlockDiagonalLinear:
        """A plain `BlockDiagonalLinear` with `w + delta_weight()` and the same `b`."""
        with torch.no_grad():
            self.w.copy_(self.w.float() + self.delta_weight())
        h, i, _ = self.w.shape
        out = BlockDiagonalLinear(h * i, h, device="meta")
        out.w, out.b = self.w, self.b
        return out


_WRAPPERS = (LoRALinear, LoRABlockDiagonal)


def _is_adapter(name: str) -> bool:
    """Whether parameter `name` belongs to an adapter (`...lora_A[.weight]`)."""
    return any(part in ("lora_A", "lora_B") for part in name.split("."))


def _unwrap(model: nn.Module) -> Griffin:
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if not isinstance(model, Griffin):
        raise InputError(f"LoRA expects a rgemma Griffin model, got {type(model).__name__}")
    if getattr(model, "quantization", None):
        raise InputError(
            f"LoRA needs a float model, this one is {model.quantization}-quantized "
            "(quantize after merging: merge_lora, then rgemma.quantize)"
        )
    return model


def _lora_modules(model: Griffin) -> dict[str, nn.Module]:
    """{"blocks.{i}.<path>": wrapper} for every LoRA wrapper of the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _WRAPPERS)}


def has_lora(model: nn.Module) -> bool:
    """Whether `model` holds any LoRA wrapper (unmerged adapters)."""
    return any(isinstance(m, _WRAPPERS) for m in model.modules())


def _target_paths(model: Griffin, targets: Sequence[str]) -> dict[str, str]:
    """{"blocks.{i}.<module path>": target name} of every module `targets` (rgemma
    names) reach, in model order (a block kind without the module is skipped)."""
    paths = {**_LINEAR_TARGETS, **_GATE_TARGETS}
    out = {}
    for i, block in enumerate(model.blocks):
        for name in targets:
            try:
                block.get_submodule(paths[name])
            except AttributeError:  # e.g. proj_q in a recurrent block
                continue
            out[f"blocks.{i}.{paths[name]}"] = name
    return out


def _wrap(model: Griffin, paths: Iterable[str], rank: int, alpha: float, dropout: float) -> None:
    """Swap the module at each path for its LoRA wrapper; freeze every base parameter."""
    model.requires_grad_(False)
    for path in paths:
        parent_path, attr = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        base = getattr(parent, attr)
        cls = LoRABlockDiagonal if isinstance(base, BlockDiagonalLinear) else LoRALinear
        setattr(parent, attr, cls(base, rank, alpha, dropout))


def _check_hyper(rank: Any, alpha: Any, dropout: Any) -> None:
    """Raise ConfigError unless rank is an int >= 1, alpha > 0, 0 <= dropout < 1."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"LoRA rank must be an int >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ConfigError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"LoRA dropout must be a number in [0, 1), got {dropout!r}")


# ----------------------------------------------------------------------------------
# Apply, read, merge
# ----------------------------------------------------------------------------------
def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: Iterable[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    *,
    gates: bool = False,
) -> nn.Module:
    """Add LoRA adapters to `model` in place and freeze its base parameters.

    Each targeted module in every block becomes a `LoRALinear` (the RG-LRU gates a
    `LoRABlockDiagonal`) on the base's device and dtype, drawn from torch's global
    RNG (seed it for reproducible adapters); every other parameter gets
    `requires_grad=False`, the adapters' `requires_grad=True`. Untrained adapters
    leave the logits unchanged (B = 0).

    Args:
        model: a float `Griffin` (or its `torch.compile` wrapper) without adapters.
        rank: r >= 1.
        alpha: positive; the update is scaled by alpha / r.
        targets: module names, rgemma's or HF's (see the module docstring); default
            every projection.
        dropout: in [0, 1): dropout on the adapters' input in training mode.
        gates: also adapt the RG-LRU gates (rgemma-only: `save_adapter` refuses them).

    Returns:
        `model`.

    Raises:
        ConfigError: rank, alpha or dropout out of range; an unknown target name
            (valid names listed); a named target that no block of this model has
            (e.g. `proj_q` in an all-recurrent model; when every projection is named,
            as by default, those the model has are taken).
        InputError: not a `Griffin`, quantized, or already holding adapters.
    """
    _check_hyper(rank, alpha, dropout)
    griffin = _unwrap(model)
    names = resolve_targets(targets, gates)
    every = set(DEFAULT_TARGETS) <= set(names)  # "every projection": those the model has
    if has_lora(griffin):
        raise InputError("the model already has LoRA adapters (merge_lora them first)")
    paths = _target_paths(griffin, names)
    found = set(paths.values())
    missing = [n for n in names if n not in found and not (every and n in _LINEAR_TARGETS)]
    if missing or not paths:
        kinds = ", ".join(sorted({b.value for b in griffin.config.block_types}))
        raise ConfigError(
            f"LoRA target(s) {', '.join(missing or names)} name no module of this model "
            f"(its blocks: {kinds})"
        )
    _wrap(griffin, paths, rank, float(alpha), float(dropout))
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter parameters only: `{"blocks.{i}.<path>.lora_A.weight": (r, in), ...
    ".lora_B.weight": (out, r)}` (gates: `...lora_A` (h, i, r), `...lora_B` (h, r, i)),
    detached, on their device; rgemma's names, as in `model.state_dict()`."""
    griffin = _unwrap(model)
    return {name: p.detach() for name, p in griffin.named_parameters() if _is_adapter(name)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight in place and remove the wrappers.

    `W += (alpha / r) * B @ A`, computed in float32 and rounded once to W's dtype; the
    wrapper is replaced by a plain `Linear` (`BlockDiagonalLinear` for the gates)
    holding the same parameter objects. Parameters keep their `requires_grad` (the
    base stays frozen). Merged logits equal the unmerged ones within the dtype's
    rounding of W.

    Returns:
        `model`.

    Raises:
        InputError: not a `Griffin`, or a model without adapters.
    """
    griffin = _unwrap(model)
    modules = _lora_modules(griffin)
    if not modules:
        raise InputError("the model has no LoRA adapters to merge")
    for path, wrapper in modules.items():
        parent_path, attr = path.rsplit(".", 1)
        setattr(griffin.get_submodule(parent_path), attr, wrapper.merged())
    return model


# ----------------------------------------------------------------------------------
# Size and fingerprint
# ----------------------------------------------------------------------------------
class AdapterSize(NamedTuple):
    """Bytes of an adapter's parameters and of the base model's."""

    adapter_bytes: int
    base_bytes: int

    @property
    def share(self) -> float:
        """adapter_bytes / base_bytes."""
        return self.adapter_bytes / max(1, self.base_bytes)

    def describe(self) -> str:
        """ "adapter 1.23 MB (0.85% of the base's 145.00 MB)"."""
        return (
            f"adapter {self.adapter_bytes / 1e6:.2f} MB ({100 * self.share:.2f}% of the "
            f"base's {self.base_bytes / 1e6:.2f} MB)"
        )


def adapter_size(model: nn.Module) -> AdapterSize:
    """Bytes of the adapter parameters (what `save_adapter` writes, in their dtype)
    and of the base parameters (everything else)."""
    griffin = _unwrap(model)
    adapter = base = 0
    for name, p in griffin.named_parameters():
        n = p.numel() * p.element_size()
        if _is_adapter(name):
            adapter += n
        else:
            base += n
    return AdapterSize(adapter, base)


#: Values of each base parameter a fingerprint reads: this many at each end.
_FINGERPRINT_VALUES = 16


def base_fingerprint(model: nn.Module) -> str:
    """A short hash identifying the base weights an adapter belongs to.

    sha256 (first 16 hex digits) over every base parameter (not the adapters) in
    model order: its name, shape, and its first and last 16 values rounded to
    bfloat16. The same for a checkpoint loaded in float32 or bfloat16 (or with
    another attention window), different for another model shape or another training
    of the same shape. Cheap: no pass over the weights.

    Raises:
        InputError: not a `Griffin`; meta or sharded (DTensor) parameters (compute it
        before `fully_shard` and pass it to `save_adapter(fingerprint=...)`).
    """
    griffin = _unwrap(model)
    h = hashlib.sha256()
    k = _FINGERPRINT_VALUES
    for name, p in griffin.named_parameters():
        if _is_adapter(name):
            continue
        if p.is_meta or _is_dtensor(p):
            raise InputError(
                f"parameter {name} is {'on the meta device' if p.is_meta else 'sharded'}: "
                "compute base_fingerprint(model) on the full weights and pass it to "
                "save_adapter(fingerprint=...)"
            )
        flat = p.detach().reshape(-1)
        ends = torch.cat([flat[:k], flat[-k:]]).to("cpu", torch.bfloat16)
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(ends.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


# ----------------------------------------------------------------------------------
# PEFT format
# ----------------------------------------------------------------------------------
def _hf_key(path: str, which: str) -> str:
    """rgemma wrapper path `blocks.{i}.<module>` + "lora_A" -> PEFT's key."""
    i = path.split(".", 2)[1]
    return f"{_PEFT_PREFIX}model.layers.{i}.{_HF_MODULES[_target_of(path)]}.{which}.weight"


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    base_model: str | None = None,
    *,
    fingerprint: str | None = None,
) -> Path:
    """Write the model's adapters in PEFT's format, named after HF's modules.

    Files: `adapter_config.json` (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha,
    lora_dropout, target_modules with HF's names, bias "none", fan_in_fan_out false,
    base_model_name_or_path, ...) and `adapter_model.safetensors` (the adapter
    tensors in their dtype, keys `base_model.model.model.layers.{i}.<hf module>.
    lora_{A,B}.weight`; metadata: the base's `GriffinConfig` and `base_fingerprint`).
    Written atomically: a reader sees the old directory or the whole new one.

    Args:
        model: a `Griffin` with adapters from `apply_lora` / `load_adapter`.
        path: the directory to write (replaced if it is an adapter directory).
        base_model: `base_model_name_or_path` for PEFT (default: the path the model
            was loaded from, `model.source["path"]`, if any).
        fingerprint: the base's `base_fingerprint`, when the parameters are sharded.

    Returns:
        The adapter directory. `adapter_size(model)` gives its size and share.

    Raises:
        InputError: no adapters; adapters of different ranks, alphas or dropouts;
            adapters on the RG-LRU gates (no PEFT equivalent: merge them instead).
        CheckpointError: `path` is a file or a non-empty directory that is not an
            adapter directory.
    """
    from safetensors.torch import save_file

    griffin = _unwrap(model)
    modules = _lora_modules(griffin)
    if not modules:
        raise InputError("the model has no LoRA adapters to save (apply_lora first)")
    gates = [p for p, m in modules.items() if isinstance(m, LoRABlockDiagonal)]
    if gates:
        raise InputError(
            f"LoRA on the RG-LRU gates ({gates[0]}, ...) has no PEFT/HF equivalent (HF's "
            "gates are parameters, not modules): merge it into the base (merge_lora, "
            "rgemma convert --merge-adapter) or train without gates"
        )
    hyper = {(m.rank, m.alpha, _dropout_p(m)) for m in modules.values()}
    if len(hyper) != 1:
        raise InputError(f"adapters with different (rank, alpha, dropout): {sorted(hyper)}")
    rank, alpha, dropout = hyper.pop()
    path = Path(os.fspath(path)).expanduser().absolute()
    if path.exists() and (
        not path.is_dir() or (any(path.iterdir()) and not (path / ADAPTER_CONFIG_NAME).is_file())
    ):
        raise CheckpointError(
            f"refusing to write the adapter to {path}: it exists and is not an adapter "
            f"directory (no {ADAPTER_CONFIG_NAME})"
        )
    tensors = {}
    for p, m in modules.items():
        for which in ("lora_A", "lora_B"):
            w = getattr(m, which).weight.detach()
            tensors[_hf_key(p, which)] = w.to("cpu", copy=True).contiguous()
    targets = sorted({_HF_MODULES[_target_of(p)].rsplit(".", 1)[1] for p in modules})
    if base_model is None:
        base_model = (getattr(griffin, "source", None) or {}).get("path")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "base_model_name_or_path": base_model,
        "revision": None,
    }
    metadata = {
        "format": "pt",
        "rgemma_base_config": json.dumps(griffin.config.to_dict(), sort_keys=True),
        "rgemma_base_fingerprint": fingerprint or base_fingerprint(griffin),
    }
    with atomic_dir(path) as tmp:
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS_NAME), metadata=metadata)
        with open(os.path.join(tmp, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
    return path


def _dropout_p(module: nn.Module) -> float:
    return float(module.dropout.p) if isinstance(module.dropout, nn.Dropout) else 0.0


#: adapter_config.json fields rgemma cannot honour -> the value it needs.
_UNSUPPORTED = {
    "fan_in_fan_out": False,
    "use_dora": False,
    "bias": "none",
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
    "target_parameters": None,
    "lora_bias": False,
}


#: GriffinConfig fields that decide parameter shapes (an adapter needs them equal).
_SHAPE_FIELDS = (
    "vocab_size",
    "width",
    "mlp_expanded_width",
    "num_heads",
    "lru_width",
    "block_types",
    "conv1d_temporal_width",
)


def _read_adapter_config(path: Path) -> dict[str, Any]:
    file = path / ADAPTER_CONFIG_NAME
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {file}: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: not a JSON object")
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{file}: peft_type is {config.get('peft_type')!r}, not 'LORA'")
    for key, needed in _UNSUPPORTED.items():
        value = config.get(key, needed)
        if value != needed and not (needed in (None, {}) and not value):
            raise CheckpointError(
                f"{file}: {key} = {value!r} is not supported (rgemma needs {needed!r})"
            )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise CheckpointError(f"{file}: {key} must be a positive number, got {value!r}")
    if not isinstance(config["r"], int):
        raise CheckpointError(f"{file}: r must be an int, got {config['r']!r}")
    return config


def _read_adapter_tensors(path: Path) -> tuple[Path, dict[str, Tensor], dict[str, str]]:
    file = path / ADAPTER_WEIGHTS_NAME
    if file.is_file():
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(file, "pt") as f:
                metadata = f.metadata() or {}
            return file, load_file(file), metadata
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read {file}: {err}") from None
    file = path / _ADAPTER_BIN_NAME
    if file.is_file():
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
            raise CheckpointError(f"cannot read {file}: {err}") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{file}: not a state_dict")
        return file, state, {}
    raise CheckpointError(f"{path} has no {ADAPTER_WEIGHTS_NAME} (nor {_ADAPTER_BIN_NAME})")


def load_adapter(
    model: nn.Module, path: str | os.PathLike, *, check_base: bool = True
) -> nn.Module:
    """Add the LoRA adapter in PEFT directory `path` to `model` (in place).

    Reads `adapter_config.json` (r, lora_alpha, lora_dropout) and the adapter
    tensors (`adapter_model.safetensors`, or PEFT's older `adapter_model.bin`); the
    modules to wrap are the ones the tensors name (HF's names, so adapters written by
    PEFT for HF's RecurrentGemma load too). The adapters are cast to the model's dtype
    and device; base parameters are frozen, adapters trainable (as `apply_lora`).

    Args:
        model: a float `Griffin` without adapters.
        path: the adapter directory.
        check_base: compare the adapter's recorded base fingerprint (written by
            `save_adapter`; PEFT's own files have none) with `base_fingerprint(model)`.

    Returns:
        `model`.

    Raises:
        CheckpointError: a missing or unreadable file; an adapter_config option rgemma
            does not support (named); a key that names no module of this model, an A
            without its B, a tensor whose shape does not fit the module (file, key,
            shapes named); an adapter made for another base model (its config or
            fingerprint differs).
        InputError: not a `Griffin`, quantized, or already holding adapters.
    """
    griffin = _unwrap(model)
    if has_lora(griffin):
        raise InputError("the model already has LoRA adapters (merge_lora them first)")
    path = Path(os.fspath(path)).expanduser()
    if not path.is_dir():
        raise CheckpointError(
            f"adapter {path} is not a directory (expected {ADAPTER_CONFIG_NAME} "
            f"and {ADAPTER_WEIGHTS_NAME})"
        )
    config = _read_adapter_config(path)
    file, tensors, metadata = _read_adapter_tensors(path)
    rank, alpha = config["r"], float(config["lora_alpha"])
    if config.get("use_rslora"):  # scaling alpha / sqrt(r) = (alpha sqrt(r)) / r
        alpha *= math.sqrt(rank)
    dropout = float(config.get("lora_dropout") or 0.0)

    if "rgemma_base_config" in metadata:  # written by save_adapter: name the fields
        try:
            adapter_cfg = GriffinConfig.from_dict(json.loads(metadata["rgemma_base_config"]))
        except (ValueError, TypeError) as err:
            raise CheckpointError(f"{file}: invalid rgemma_base_config metadata: {err}") from None
        diffs = [
            d for d in config_diff(adapter_cfg, griffin.config) if d.split()[0] in _SHAPE_FIELDS
        ]
        if diffs:
            raise CheckpointError(
                f"{file} is an adapter for another model shape (adapter vs this model): "
                + "; ".join(diffs)
            )
    if check_base and "rgemma_base_fingerprint" in metadata:
        mine, theirs = base_fingerprint(griffin), metadata["rgemma_base_fingerprint"]
        if mine != theirs:
            raise CheckpointError(
                f"{file} was trained on another base model (base fingerprint {theirs}, this "
                f"model's {mine}); pass check_base=False to apply it anyway"
            )

    # HF key -> (rgemma wrapper path, "lora_A" | "lora_B"), every name and shape checked.
    found: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        module, which = _parse_peft_key(key, file)
        i, inner = module
        if i >= len(griffin.blocks):
            raise CheckpointError(
                f"{file}: key {key!r} is for layer {i}; this model has {len(griffin.blocks)}"
            )
        target_path = f"blocks.{i}.{_LINEAR_TARGETS[inner]}"
        try:
            base = griffin.get_submodule(target_path)
        except AttributeError:
            kind = griffin.blocks[i].block_type.value
            raise CheckpointError(
                f"{file}: key {key!r} names {inner}, which layer {i} ({kind}) does not have"
            ) from None
        expect = (rank, base.in_features) if which == "lora_A" else (base.out_features, rank)
        if tuple(t.shape) != expect:
            raise CheckpointError(
                f"{file}: key {key!r} has shape {tuple(t.shape)}, this model needs {expect} "
                f"(r={rank}, {target_path} is {base.in_features} -> {base.out_features})"
            )
        if not t.is_floating_point():
            raise CheckpointError(f"{file}: key {key!r} has dtype {t.dtype}, not floating point")
        found.setdefault(target_path, {})[which] = t
    if not found:
        raise CheckpointError(f"{file} holds no LoRA tensors")
    for target_path, pair in found.items():
        if len(pair) != 2:
            have = next(iter(pair))
            other = "lora_B" if have == "lora_A" else "lora_A"
            raise CheckpointError(f"{file}: {target_path} has {have} but no {other}")

    _wrap(griffin, found, rank, alpha, dropout)
    with torch.no_grad():
        for target_path, pair in found.items():
            wrapper = griffin.get_submodule(target_path)
            for which, t in pair.items():
                getattr(wrapper, which).weight.copy_(t)
    return model


def _parse_peft_key(key: str, file: Path) -> tuple[tuple[int, str], str]:
    """PEFT's `base_model.model.model.layers.{i}.<hf module>.lora_A[.default].weight`
    -> ((i, rgemma target name), "lora_A")."""
    bare = key.removeprefix(_PEFT_PREFIX).removeprefix("model.")
    parts = bare.split(".")
    if parts[-1] == "weight" and len(parts) >= 5 and parts[0] == "layers" and parts[1].isdigit():
        inner = parts[2:-1]
        if len(inner) >= 2 and inner[-1] not in ("lora_A", "lora_B"):  # adapter name
            inner = inner[:-1]
        which, hf_module = inner[-1], ".".join(inner[:-1])
        if which in ("lora_A", "lora_B") and hf_module in _FROM_HF_MODULE:
            return (int(parts[1]), _FROM_HF_MODULE[hf_module]), which
    raise CheckpointError(
        f"{file}: key {key!r} is not a LoRA weight of a RecurrentGemma projection "
        f"(expected {_PEFT_PREFIX}model.layers.<i>.<module>.lora_A.weight with module one "
        f"of {', '.join(sorted(_FROM_HF_MODULE))})"
    )
