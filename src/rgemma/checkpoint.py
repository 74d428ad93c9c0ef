"""Checkpoint formats as data: key maps, pure state_dict -> state_dict conversions,
and `load_model` / `save_model`.

Three on-disk formats load with one call, `load_model(path)`:

- official: the official / Kaggle PyTorch checkpoint, a state_dict `.pt` / `.ckpt`
  file with the official key names (`embedder.input_embedding`,
  `blocks.{i}.recurrent_block.rg_lru.a_gate.w`, ...), which are also `Griffin`'s
  own names. The config is inferred from the shapes.
- hf: a Hugging Face directory (`config.json` + `model.safetensors`, or shards
  `model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`).
- rgemma: our own directory, `rgemma_config.json` + `model.safetensors` (official
  key names, tied embedding stored once) + optionally `tokenizer.model`.

Official <-> HF key map (per layer i; HF prefixes `model.`):

    embedder.input_embedding                 model.embed_tokens.weight
    blocks.i.{temporal,channel}_pre_norm.scale   model.layers.i.{..}_pre_norm.weight
    blocks.i.recurrent_block.linear_{x,y,out}.*  model.layers.i.temporal_block.linear_*.*
    blocks.i.recurrent_block.conv_1d.w (k, e)    ...temporal_block.conv_1d.weight (e, 1, k)
                                                 (transpose, no flip)
    blocks.i.recurrent_block.conv_1d.b           ...temporal_block.conv_1d.bias
    ...rg_lru.a_param                            ...rg_lru.recurrent_param
    ...rg_lru.input_gate.{w,b}                   ...rg_lru.input_gate_{weight,bias}
    ...rg_lru.a_gate.{w,b}                       ...rg_lru.recurrent_gate_{weight,bias}
    blocks.i.attention_block.proj_{q,k,v}.weight ...temporal_block.{q,k,v}_proj.weight
    blocks.i.attention_block.proj_final.*        ...temporal_block.o_proj.*
    blocks.i.mlp_block.ffw_up.w (2, d, m)        ...mlp_block.{gate,up}_proj.weight = w[0].T, w[1].T
    blocks.i.mlp_block.ffw_up.b (2, 1, 1, m)     ...mlp_block.{gate,up}_proj.bias = b[0], b[1] (m,)
    blocks.i.mlp_block.ffw_down.*                ...mlp_block.down_proj.*
    final_norm.scale                             model.final_norm.weight

HF's `lm_head.weight` is tied to the embedding: when a checkpoint has it, it must
equal the embedding and is dropped. HF config differences: `intermediate_size` is
2x our `mlp_expanded_width`; HF's attention with `attention_window_size = W` lets a
query see W keys (itself and W - 1 before), the official model W + 1 keys. A
HF checkpoint's window number is kept as is: rgemma follows the official semantics,
so results differ from HF's from position W on (HF is the one that is off).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import json
import math
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import BlockType, GriffinConfig
from .errors import CheckpointError, ConfigError
from .formats import (
    EMBED_HF as _EMBED_HF,
)
from .formats import (
    EMBED_OFFICIAL as _EMBED_OFFICIAL,
)
from .formats import (
    GLOBAL_KEY_MAP,
    HF_BIN_NAME,
    HF_CONFIG_NAME,
    HF_INDEX_NAME,
    LAYER_KEY_MAP,
    LAYER_SPLIT_MAP,
    RGEMMA_CONFIG_NAME,
    RGEMMA_FORMAT_VERSION,
    TOKENIZER_NAME,
    TORCH_SUFFIXES,
    WEIGHTS_NAME,
)
from .formats import (
    LM_HEAD_HF as _LM_HEAD_HF,
)
from .io import atomic_dir

__all__ = [
    "RGEMMA_CONFIG_NAME",
    "TOKENIZER_NAME",
    "WEIGHTS_NAME",
    "bundled_model_path",
    "griffin_to_hf_config",
    "hf_config_to_griffin",
    "hf_to_official",
    "hf_tokenizer_files",
    "load_model",
    "official_to_hf",
    "save_hf",
    "save_model",
]

_CONV_SUFFIX = "recurrent_block.conv_1d.w"
_HF_LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_OFFICIAL_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Inverse maps, HF suffix -> official suffix.
_HF_LAYER_TO_OFFICIAL = {hf: off for off, hf in LAYER_KEY_MAP.items()}
_HF_SPLIT_TO_OFFICIAL = {
    hf: (off, j) for off, pair in LAYER_SPLIT_MAP.items() for j, hf in enumerate(pair)
}
_HF_GLOBAL_TO_OFFICIAL = {hf.removeprefix("model."): off for off, hf in GLOBAL_KEY_MAP.items()}


def _check_layer(key: str, index: int, num_layers: int | None) -> None:
    if num_layers is not None and index >= num_layers:
        raise CheckpointError(
            f"unexpected key {key!r}: layer {index} does not exist in a {num_layers}-layer model"
        )


def official_to_hf(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Convert an official-format state_dict (`Griffin.state_dict()`) to HF names.

    Args:
        state_dict: official keys -> tensors (any device, meta included: shapes only
            are enough for a meta tensor).

    Returns:
        HF `RecurrentGemmaForCausalLM` keys (prefixed `model.`, no `lm_head.weight`:
        it is tied) -> contiguous tensors. `conv_1d.w` (k, e) becomes (e, 1, k) by a
        transpose (no flip); `ffw_up.w` (2, d, m) becomes `gate_proj.weight` = w[0].T and
        `up_proj.weight` = w[1].T, both (m, d); `ffw_up.b` (2, 1, 1, m) becomes two (m,)
        biases.

    Raises:
        CheckpointError: a key that is not an official Griffin key (named).

    Counterpart: HF's `convert_recurrent_gemma_to_hf.py` (which works on the JAX
    checkpoint); this is the PyTorch-name equivalent.
    """
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if key in GLOBAL_KEY_MAP:
            out[GLOBAL_KEY_MAP[key]] = tensor
            continue
        match = _OFFICIAL_BLOCK_RE.match(key)
        if match is None:
            raise CheckpointError(f"unknown official checkpoint key {key!r}")
        i, suffix = int(match.group(1)), match.group(2)
        prefix = f"model.layers.{i}."
        if suffix == _CONV_SUFFIX:
            out[prefix + LAYER_KEY_MAP[suffix]] = tensor.T.unsqueeze(1).contiguous()  # (e, 1, k)
        elif suffix in LAYER_KEY_MAP:
            out[prefix + LAYER_KEY_MAP[suffix]] = tensor
        elif suffix in LAYER_SPLIT_MAP:
            first, second = LAYER_SPLIT_MAP[suffix]
            if suffix.endswith(".w"):  # (2, d, m) -> 2 x (m, d)
                out[prefix + first] = tensor[0].T.contiguous()
                out[prefix + second] = tensor[1].T.contiguous()
            else:  # (2, 1, 1, m) -> 2 x (m,)
                out[prefix + first] = tensor[0].reshape(-1).contiguous()
                out[prefix + second] = tensor[1].reshape(-1).contiguous()
        else:
            raise CheckpointError(f"unknown official checkpoint key {key!r}")
    return out


def hf_to_official(
    state_dict: Mapping[str, Tensor], num_layers: int | None = None
) -> dict[str, Tensor]:
    """Convert a HF RecurrentGemma state_dict to official names (`Griffin`'s own).

    Args:
        state_dict: HF keys, with or without the `model.` prefix (a
            `RecurrentGemmaForCausalLM` or a bare `RecurrentGemmaModel`), -> tensors.
            It may hold only some layers (a loader converts layer by layer).
        num_layers: if given, a layer index >= num_layers is an error.

    Returns:
        Official keys -> tensors: `conv_1d.weight` (e, 1, k) -> `conv_1d.w` (k, e);
        `gate_proj` / `up_proj` weights (m, d) -> `ffw_up.w` (2, d, m) and biases (m,) ->
        `ffw_up.b` (2, 1, 1, m). A `lm_head.weight` equal to the embedding is dropped.

    Raises:
        CheckpointError: an unknown key (named); one of a gate_proj / up_proj pair
        without the other; a `lm_head.weight` that differs from the embedding (rgemma's
        head is tied) or comes without it.
    """
    out: dict[str, Tensor] = {}
    pairs: dict[str, list[Tensor | None]] = {}
    pair_keys: dict[str, list[str]] = {}
    lm_head = None
    for key, tensor in state_dict.items():
        if key == _LM_HEAD_HF:
            lm_head = tensor
            continue
        bare = key.removeprefix("model.")
        if bare in _HF_GLOBAL_TO_OFFICIAL:
            out[_HF_GLOBAL_TO_OFFICIAL[bare]] = tensor
            continue
        match = _HF_LAYER_RE.match(key)
        if match is None:
            raise CheckpointError(f"unknown HF checkpoint key {key!r}")
        i, suffix = int(match.group(1)), match.group(2)
        _check_layer(key, i, num_layers)
        prefix = f"blocks.{i}."
        if suffix in _HF_LAYER_TO_OFFICIAL:
            official = _HF_LAYER_TO_OFFICIAL[suffix]
            if official == _CONV_SUFFIX:
                if tensor.ndim != 3 or tensor.shape[1] != 1:
                    raise CheckpointError(
                        f"key {key!r} has shape {tuple(tensor.shape)}, expected (lru_width, 1, k)"
                    )
                tensor = tensor[:, 0, :].T.contiguous()  # (e, 1, k) -> (k, e)
            out[prefix + official] = tensor
        elif suffix in _HF_SPLIT_TO_OFFICIAL:
            official, j = _HF_SPLIT_TO_OFFICIAL[suffix]
            pairs.setdefault(prefix + official, [None, None])[j] = tensor
            pair_keys.setdefault(prefix + official, ["", ""])[j] = key
        else:
            raise CheckpointError(f"unknown HF checkpoint key {key!r}")

    for official, (gate, up) in pairs.items():
        if gate is None or up is None:
            have = next(k for k in pair_keys[official] if k)
            missing = (
                have.replace("gate_proj", "up_proj")
                if up is None
                else have.replace("up_proj", "gate_proj")
            )
            raise CheckpointError(f"HF checkpoint has {have!r} but is missing key {missing!r}")
        if gate.shape != up.shape or gate.ndim not in (1, 2):
            raise CheckpointError(
                f"{pair_keys[official][0]!r} {tuple(gate.shape)} and {pair_keys[official][1]!r} "
                f"{tuple(up.shape)} must have the same (m, d) or (m,) shape"
            )
        if official.endswith(".w"):
            out[official] = torch.stack([gate.T, up.T])  # (2, d, m)
        else:
            out[official] = torch.stack([gate, up]).reshape(2, 1, 1, -1)  # (2, 1, 1, m)

    if lm_head is not None:
        embed = out.get(_EMBED_OFFICIAL)
        if embed is None:
            raise CheckpointError(f"HF checkpoint has {_LM_HEAD_HF!r} without {_EMBED_HF!r}")
        tied = (
            embed.is_meta
            or lm_head.is_meta
            or (embed.shape == lm_head.shape and torch.equal(embed, lm_head.to(embed.dtype)))
        )
        if not tied:
            raise CheckpointError(
                f"{_LM_HEAD_HF!r} differs from the embedding: rgemma's output head is tied to "
                "the embedding, untied heads are not supported"
            )
    return out


# ----------------------------------------------------------------------------------
# HF config <-> GriffinConfig
# ----------------------------------------------------------------------------------
def hf_config_to_griffin(config_json: Mapping[str, Any]) -> GriffinConfig:
    """Build a `GriffinConfig` from a HF `config.json` dict (or a `RecurrentGemmaConfig`).

    Reads `vocab_size`, `hidden_size` (width), `intermediate_size` (2x
    mlp_expanded_width), `num_attention_heads`, `lru_width`, `num_hidden_layers`,
    `block_types` or `_block_types` (a pattern repeated to num_hidden_layers, as HF
    does), `attention_window_size` (same number; see the module docstring for HF's
    one-key-shorter window), `logits_soft_cap` (0 or null: none),
    `embeddings_scale_by_sqrt_dim` (default true; HF itself always scales),
    `conv1d_width`, and `rope_theta` / `partial_rotary_factor` at the top level or in
    `rope_parameters`.

    Raises:
        ConfigError: a missing or invalid field, or one rgemma cannot represent:
        `partial_rotary_factor` other than 0.5, `num_key_value_heads` other than 1,
        `head_dim` other than hidden_size / heads, attention biases, an activation other
        than tanh-GELU, `rms_norm_eps` other than 1e-6, untied embeddings, an odd
        `intermediate_size`, a `model_type` other than `recurrent_gemma`.
    """
    if hasattr(config_json, "to_dict") and not isinstance(config_json, Mapping):
        config_json = config_json.to_dict()
    cj = dict(config_json)

    def need(name: str) -> Any:
        if cj.get(name) is None:
            raise ConfigError(f"HF config is missing {name!r}")
        return cj[name]

    model_type = cj.get("model_type", "recurrent_gemma")
    if model_type != "recurrent_gemma":
        raise ConfigError(f"HF config has model_type {model_type!r}, expected 'recurrent_gemma'")
    width = need("hidden_size")
    num_heads = need("num_attention_heads")
    num_layers = need("num_hidden_layers")
    intermediate = need("intermediate_size")
    if not isinstance(intermediate, int) or intermediate % 2:
        raise ConfigError(
            f"HF intermediate_size must be an even int (2x the MLP width), got {intermediate!r}"
        )
    rope = dict(cj.get("rope_parameters") or {})
    rope_theta = rope.get("rope_theta", cj.get("rope_theta", 10_000.0))
    partial = rope.get("partial_rotary_factor", cj.get("partial_rotary_factor", 0.5))
    if partial != 0.5:
        raise ConfigError(
            f"HF partial_rotary_factor must be 0.5 (RoPE on half of each head), got {partial!r}"
        )
    kv_heads = cj.get("num_key_value_heads")
    if kv_heads is None:  # HF's default: as many as query heads
        kv_heads = num_heads
    if kv_heads != 1:
        raise ConfigError(
            f"HF num_key_value_heads must be 1 (multi-query attention), got {kv_heads!r}"
        )
    if isinstance(width, int) and isinstance(num_heads, int) and num_heads > 0:
        head_dim = cj.get("head_dim")
        if head_dim is not None and head_dim != width // num_heads:
            raise ConfigError(
                f"HF head_dim {head_dim!r} must equal hidden_size / num_attention_heads "
                f"({width} / {num_heads})"
            )
    if cj.get("attention_bias"):
        raise ConfigError("HF attention_bias must be false (q/k/v projections have no bias)")
    act = cj.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"):
        raise ConfigError(f"HF hidden_activation must be 'gelu_pytorch_tanh', got {act!r}")
    eps = cj.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or not math.isclose(eps, 1e-6, rel_tol=1e-3):
        raise ConfigError(f"HF rms_norm_eps must be 1e-6 (fixed in rgemma's RMSNorm), got {eps!r}")
    if cj.get("tie_word_embeddings", True) is False:
        raise ConfigError("HF tie_word_embeddings must be true (rgemma's output head is tied)")

    pattern = (
        cj.get("block_types") or cj.get("_block_types") or ["recurrent", "recurrent", "attention"]
    )
    if not isinstance(num_layers, int) or num_layers <= 0:
        raise ConfigError(f"HF num_hidden_layers must be a positive int, got {num_layers!r}")
    try:
        pattern = [BlockType(b) for b in pattern]
    except ValueError as err:
        raise ConfigError(f"HF block_types: {err}") from err
    block_types = tuple((pattern * math.ceil(num_layers / len(pattern)))[:num_layers])

    cap = cj.get("logits_soft_cap", 30.0)
    try:
        return GriffinConfig(
            vocab_size=need("vocab_size"),
            width=width,
            mlp_expanded_width=intermediate // 2,
            num_heads=num_heads,
            block_types=block_types,
            lru_width=cj.get("lru_width") or width,
            # `save_hf(exact_window=True)` writes HF's window one larger, and ours here.
            attention_window_size=cj.get(
                "rgemma_attention_window_size", cj.get("attention_window_size", 2048)
            ),
            embeddings_scale_by_sqrt_dim=bool(cj.get("embeddings_scale_by_sqrt_dim", True)),
            logits_soft_cap=float(cap) if cap else None,
            conv1d_temporal_width=cj.get("conv1d_width", 4),
            rope_max_wavelength=float(rope_theta),
        )
    except ConfigError as err:
        raise ConfigError(f"invalid HF config: {err}") from err


def griffin_to_hf_config(cfg: GriffinConfig) -> dict[str, Any]:
    """A HF `config.json` dict for `cfg` (inverse of `hf_config_to_griffin`).

    `block_types` is written in full (one entry per layer). HF's own model always
    scales the embeddings and always soft-caps; a config without them
    (`embeddings_scale_by_sqrt_dim=False`, `logits_soft_cap=None`) is written as is and
    round-trips through rgemma, but HF's model would not honour it.
    """
    return {
        "architectures": ["RecurrentGemmaForCausalLM"],
        "model_type": "recurrent_gemma",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "intermediate_size": 2 * cfg.mlp_expanded_width,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": 1,
        "head_dim": cfg.head_dim,
        "lru_width": cfg.lru_width,
        "num_hidden_layers": cfg.num_layers,
        "block_types": [b.value for b in cfg.block_types],
        "attention_window_size": cfg.attention_window_size,
        "conv1d_width": cfg.conv1d_temporal_width,
        "logits_soft_cap": cfg.logits_soft_cap,
        "embeddings_scale_by_sqrt_dim": cfg.embeddings_scale_by_sqrt_dim,
        "rope_theta": cfg.rope_max_wavelength,
        "partial_rotary_factor": 0.5,
        "rope_parameters": {
            "rope_theta": cfg.rope_max_wavelength,
            "partial_rotary_factor": 0.5,
            "rope_type": "default",
        },
        "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
    }


# ----------------------------------------------------------------------------------
# Reading tensors: a name -> shape view first (for validation), tensors on demand
# ----------------------------------------------------------------------------------
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _Source:
    """Tensors of a checkpoint: `shapes` and `dtypes` by name, `get(name)` on demand."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype | None]
    get: Callable[[str], Tensor]


def _torch_source(path: Path) -> _Source:
    """A `.pt` state_dict, loaded with `weights_only=True` (never unpickling arbitrary
    objects) and memory-mapped when the file allows it."""
    errors = (
        RuntimeError,
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        OSError,
        zipfile.BadZipFile,
        AttributeError,
        KeyError,
        TypeError,
        ImportError,
    )
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    if not magic.startswith((b"PK", b"\x80")):  # neither torch's zip format nor a pickle
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle; "
            f"it starts with {magic!r})"
        )
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # legacy (non-zip) file: load without mmap
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except errors as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} is not a readable PyTorch state_dict (truncated, corrupt, or not a "
            f"checkpoint): {type(err).__name__}: {first}"
        ) from err
    if isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{path} does not hold a state_dict (a dict of tensors): got {type(obj).__name__}"
        )
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(
                f"{path} is not a plain state_dict: entry {key!r} is a(n) {type(value).__name__}, "
                "not a tensor"
            )
    src = _Source()
    src.shapes = {k: tuple(v.shape) for k, v in obj.items()}
    src.dtypes = {k: v.dtype for k, v in obj.items()}
    src.get = obj.__getitem__
    return src


def _safetensors_source(
    files: Mapping[str, Path], stack: contextlib.ExitStack, index: Path | None = None
) -> _Source:
    """Tensors of one or more safetensors files. `files` maps each tensor name to its
    file when an index says so; {"": file} means "every tensor of that file"."""
    from safetensors import SafetensorError, safe_open

    handles: dict[Path, Any] = {}
    where: dict[str, Path] = {}
    src = _Source()
    src.shapes, src.dtypes = {}, {}
    unique = sorted(set(files.values()))
    for file in unique:
        if not file.is_file():
            via = f" (named in {index})" if index else ""
            raise CheckpointError(f"checkpoint shard {file} does not exist{via}")
        try:
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            names = list(handle.keys())
            for name in names:
                sl = handle.get_slice(name)
                src.shapes[name] = tuple(sl.get_shape())
                src.dtypes[name] = _ST_DTYPES.get(sl.get_dtype())
                where[name] = file
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"{file} is not a readable safetensors file (truncated or corrupt): {err}"
            ) from err
        handles[file] = handle
    if "" not in files:  # an index: every name it lists must be in its shard
        for name, file in files.items():
            if where.get(name) != file:
                raise CheckpointError(f"{index} says {name!r} is in {file.name}, but it is not")
        src.shapes = {k: src.shapes[k] for k in files}
        src.dtypes = {k: src.dtypes[k] for k in files}

    def get(name: str) -> Tensor:
        file = where[name]
        try:
            return handles[file].get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"cannot read {name!r} from {file}: {err}") from err

    src.get = get
    return src


# ----------------------------------------------------------------------------------
# Finding a checkpoint
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class _Found:
    format: str  # "official", "hf", "rgemma" or "flax"
    path: Path
    weights: list[Path]  # a torch file, or safetensors file(s)
    index: Path | None = None
    config_file: Path | None = None
    tokenizer: Path | None = None


def bundled_model_path(chat: bool = False) -> Path:
    """Directory of a model shipped inside the package: the base model
    (`rgemma/assets/bundled/`), or with `chat=True` the chat model fine-tuned from it
    (`rgemma/assets/bundled-chat/`, `rgemma.defaults.CHAT_MODEL`)."""
    from .defaults import CHAT_MODEL

    name = CHAT_MODEL if chat else "bundled"
    return Path(str(importlib.resources.files("rgemma").joinpath("assets", name)))


def _find(path: Path) -> _Found:
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if path.is_file():
        directory = path.parent
        tok = directory / TOKENIZER_NAME
        tok = tok if tok.is_file() else None
        if path.suffix == ".safetensors":
            if (directory / RGEMMA_CONFIG_NAME).is_file():
                return _Found(
                    "rgemma",
                    path,
                    [path],
                    config_file=directory / RGEMMA_CONFIG_NAME,
                    tokenizer=tok,
                )
            if (directory / HF_CONFIG_NAME).is_file():
                return _Found(
                    "hf", path, [path], config_file=directory / HF_CONFIG_NAME, tokenizer=tok
                )
            return _Found("official", path, [path], tokenizer=tok)
        if path.suffix == ".json":
            return _find(directory)
        return _Found("official", path, [path], tokenizer=tok)

    tok = path / TOKENIZER_NAME
    tok = tok if tok.is_file() else None
    if (path / RGEMMA_CONFIG_NAME).is_file():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(
                f"rgemma checkpoint {path} has {RGEMMA_CONFIG_NAME} but no {WEIGHTS_NAME}"
            )
        return _Found(
            "rgemma", path, [weights], config_file=path / RGEMMA_CONFIG_NAME, tokenizer=tok
        )
    if (path / HF_CONFIG_NAME).is_file():
        config_file = path / HF_CONFIG_NAME
        if (path / HF_INDEX_NAME).is_file():
            return _Found(
                "hf", path, [], index=path / HF_INDEX_NAME, config_file=config_file, tokenizer=tok
            )
        for name in (WEIGHTS_NAME, HF_BIN_NAME):
            if (path / name).is_file():
                return _Found("hf", path, [path / name], config_file=config_file, tokenizer=tok)
        raise CheckpointError(
            f"HF checkpoint {path} has {HF_CONFIG_NAME} but none of {WEIGHTS_NAME}, "
            f"{HF_INDEX_NAME}, {HF_BIN_NAME}"
        )
    if any((path / marker).exists() for marker in ORBAX_MARKERS):  # official Flax (orbax)
        parent_tok = path.parent / TOKENIZER_NAME
        return _Found(
            "flax", path, [path], tokenizer=tok or (parent_tok if parent_tok.is_file() else None)
        )
    torch_files = sorted(p for p in path.iterdir() if p.suffix in TORCH_SUFFIXES and p.is_file())
    if len(torch_files) == 1:
        return _Found("official", path, torch_files, tokenizer=tok)
    if len(torch_files) > 1:
        names = ", ".join(p.name for p in torch_files)
        raise CheckpointError(f"{path} holds several checkpoints ({names}); pass one file")
    raise CheckpointError(
        f"no checkpoint found in {path}: looked for {RGEMMA_CONFIG_NAME} + {WEIGHTS_NAME} "
        f"(rgemma), {HF_CONFIG_NAME} + {WEIGHTS_NAME} or {HF_INDEX_NAME} (HF), and a "
        f"{'/'.join('*' + s for s in TORCH_SUFFIXES)} state_dict (official PyTorch)"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


#: Files that mark a directory as an orbax checkpoint (the official Flax/JAX weights).
ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")


def flax_to_official(params: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten official Flax parameters (`recurrentgemma.jax.Griffin`'s tree, with or
    without its top-level "params") to official PyTorch names.

    Nested keys join with "."; a Dense layer's `kernel` (in, out) becomes `weight`
    (out, in) by a transpose; every other array keeps its name and layout
    (`conv_1d.w` (k, e), `ffw_up.w` (2, d, m), `rg_lru.a_param`, the norms' `scale`,
    `embedder.input_embedding`). Arrays are numpy-like, returned as given (the
    transposes are numpy views).
    """
    out: dict[str, Any] = {}

    def walk(tree: Mapping[str, Any], prefix: str) -> None:
        for key, value in tree.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                walk(value, name + ".")
            elif name.endswith(".kernel"):
                out[name.removesuffix("kernel") + "weight"] = value.T
            else:
                out[name] = value

    walk(params.get("params", params) if isinstance(params, Mapping) else params, "")
    return out


def _flax_source(path: Path) -> _Source:
    """Arrays of an orbax checkpoint of official Flax parameters, under official names."""
    import numpy as np

    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise CheckpointError(
            f"{path} is an orbax (official Flax/JAX) checkpoint; reading it needs "
            'orbax-checkpoint: `pip install "rgemma[flax]"`'
        ) from None
    try:
        tree = ocp.PyTreeCheckpointer().restore(str(path))
    except Exception as err:  # orbax raises many kinds: each becomes one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"cannot read orbax checkpoint {path}: {first}") from err
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{path} holds a {type(tree).__name__}, not a parameter tree")
    arrays = {k: np.asarray(v) for k, v in flax_to_official(tree).items()}

    def to_torch(a: Any) -> Tensor:
        if a.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: reinterpret the bits
            return torch.from_numpy(np.array(a).view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(np.array(a))  # a writable copy

    src = _Source()
    src.shapes = {k: tuple(a.shape) for k, a in arrays.items()}
    src.dtypes = {k: to_torch(a.reshape(-1)[:0]).dtype for k, a in arrays.items()}
    src.get = lambda name: to_torch(arrays[name])
    return src


def _open_source(found: _Found, stack: contextlib.ExitStack) -> _Source:
    if found.format == "flax":
        return _flax_source(found.path)
    if found.index is not None:
        index = _read_json(found.index)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{found.index} has no 'weight_map'")
        files = {k: found.index.parent / v for k, v in weight_map.items()}
        return _safetensors_source(files, stack, index=found.index)
    weights = found.weights[0]
    if weights.suffix == ".safetensors":
        return _safetensors_source({"": weights}, stack)
    return _torch_source(weights)


# ----------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------
def _listing(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _validate(
    where: str,
    shapes: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    cfg: GriffinConfig,
    allowed_extra: Iterable[str] = (),
) -> None:
    missing = set(expected) - set(shapes)
    if missing:
        raise CheckpointError(
            f"{where} is missing {len(missing)} key(s) the config needs: {_listing(missing)}"
        )
    unexpected = set(shapes) - set(expected) - set(allowed_extra)
    if unexpected:
        raise CheckpointError(
            f"{where} has {len(unexpected)} unexpected key(s): {_listing(unexpected)}"
        )
    bad = [
        f"{k!r}: expected {tuple(expected[k])}, got {tuple(shapes[k])}"
        for k in sorted(expected)
        if tuple(shapes[k]) != tuple(expected[k])
    ]
    if bad:
        raise CheckpointError(
            f"{where} has {len(bad)} tensor(s) whose shape does not match the config "
            f"(width {cfg.width}, lru_width {cfg.lru_width}, mlp {cfg.mlp_expanded_width}, "
            f"heads {cfg.num_heads}, vocab {cfg.vocab_size}): " + "; ".join(bad[:8])
        )


_LAYER_INDEX_RE = re.compile(r"^(?:model\.)?(?:layers|blocks)\.(\d+)\.")


def _check_declared_layers(found: _Found, data: Mapping[str, Any], where: str) -> None:
    """Cap what a config file declares by what the weights hold: its number of layers
    (`block_types` of an rgemma config, `num_hidden_layers` of a HF one) must be the
    number of layers the checkpoint has keys for. Checked on the raw JSON, before a
    config or a (meta) model of the declared size is built, so a config declaring a
    million layers fails at once instead of building them first.

    Raises:
        CheckpointError: the two numbers differ (both named).
    """
    if found.format == "rgemma":
        body = data.get("config", data)
        types = body.get("block_types") if isinstance(body, Mapping) else None
        declared = len(types) if isinstance(types, list) else None
        field = "config.block_types" if "config" in data else "block_types"
    else:
        declared = data.get("num_hidden_layers")
        field = "num_hidden_layers"
    if not isinstance(declared, int) or isinstance(declared, bool):
        return  # a missing or invalid field: the config's own check names it
    with contextlib.ExitStack() as stack:
        shapes = _open_source(found, stack).shapes
    layers = {int(m.group(1)) for k in shapes if (m := _LAYER_INDEX_RE.match(k))}
    if declared != len(layers):
        held = f"layers {min(layers)}..{max(layers)}" if layers else "no layer keys"
        raise CheckpointError(
            f"{found.config_file} declares {declared} layers ({field}) but {where} holds "
            f"weights for {len(layers)} ({held}): the config does not belong to these weights"
        )


def _check_finite(where: str, key: str, tensor: Tensor, stored: Tensor) -> None:
    """Raise `CheckpointError` if `tensor` (a loaded weight) has a NaN or infinity.

    Checked in slices of 2**24 elements, so the boolean mask never costs more than
    16 MB whatever the tensor's size; `stored` (the tensor as in the file) tells an
    overflow of the target dtype from a damaged file.
    """
    flat = tensor.reshape(-1)
    step = 1 << 24
    if all(bool(torch.isfinite(flat[i : i + step]).all()) for i in range(0, flat.numel(), step)):
        return
    count = int((~torch.isfinite(flat)).sum())
    if stored.dtype != tensor.dtype and bool(torch.isfinite(stored).all()):
        raise CheckpointError(
            f"{where}: tensor {key!r} overflows {tensor.dtype} ({count} values become "
            f"inf when converted from {stored.dtype}): load it in a wider dtype"
        )
    raise CheckpointError(
        f"{where}: tensor {key!r} has {count} non-finite value(s) (NaN or inf) of "
        f"{flat.numel()}: the checkpoint is damaged (e.g. a diverged training run)"
    )


def _meta(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _expected_official(cfg: GriffinConfig) -> dict[str, tuple[int, ...]]:
    from .model import Griffin

    return {k: tuple(v.shape) for k, v in Griffin(cfg, device="meta").state_dict().items()}


def _is_hf_naming(keys: Iterable[str]) -> bool:
    return any(k.startswith(("model.", "layers.", "embed_tokens.", "lm_head.")) for k in keys)


def _infer(
    official_shapes: Mapping[str, tuple[int, ...]], declared: GriffinConfig | None, where: str
) -> GriffinConfig:
    """Config from shapes; what shapes cannot tell (window, embedding scale, soft-cap,
    RoPE base) comes from the declared config, or RecurrentGemma's defaults."""
    kw = {}
    if declared is not None:
        kw = {
            "attention_window_size": declared.attention_window_size,
            "embeddings_scale_by_sqrt_dim": declared.embeddings_scale_by_sqrt_dim,
            "logits_soft_cap": declared.logits_soft_cap,
        }
    try:
        inferred = GriffinConfig.from_state_dict(_meta(official_shapes), **kw)
    except CheckpointError as err:
        raise CheckpointError(f"{where}: {err}") from err
    except ConfigError as err:
        raise CheckpointError(f"{where}: the shapes give an invalid config: {err}") from err
    # The RoPE base is not in the shapes.
    changes: dict[str, Any] = {}
    if declared is not None:
        changes["rope_max_wavelength"] = declared.rope_max_wavelength
    try:
        return dataclasses.replace(inferred, **changes) if changes else inferred
    except ConfigError as err:
        raise CheckpointError(f"{where}: the shapes give an invalid config: {err}") from err


# ----------------------------------------------------------------------------------
# load_model
# ----------------------------------------------------------------------------------
def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        result = dtype
    else:
        aliases = {
            "bf16": "bfloat16",
            "fp16": "float16",
            "half": "float16",
            "fp32": "float32",
            "float": "float32",
            "fp64": "float64",
            "double": "float64",
        }
        name = aliases.get(str(dtype).lower().removeprefix("torch."), str(dtype).lower())
        result = getattr(torch, name.removeprefix("torch."), None)
        if not isinstance(result, torch.dtype):
            raise ConfigError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    if result is not None and not result.is_floating_point:
        raise ConfigError(f"dtype must be a floating-point dtype, got {result}")
    return result


def load_model(
    path: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    config: GriffinConfig | str | None = None,
    *,
    adapter: str | os.PathLike | None = None,
    merge_adapter: bool = True,
):
    """Load a `Griffin` from an official `.pt`, a HF directory or an rgemma directory.

    Formats are detected from the path (see the module docstring): a `.pt` / `.ckpt` /
    `.pth` state_dict file or a directory with exactly one (config inferred from the
    shapes; Kaggle's wrapping `{"model": state_dict}` is accepted); a directory with
    `config.json` and `model.safetensors` or a sharded index (HF names); a directory
    with `rgemma_config.json` + `model.safetensors`. `.pt` files are read with
    `torch.load(weights_only=True, mmap=True)`: no arbitrary object is unpickled. A
    training checkpoint (`OUT/checkpoints/step_XXXXXXX`, or a run directory `OUT` or
    its `checkpoints/` for the newest complete one) gives its model, resharded from
    any number of ranks, with LoRA adapters merged into their base
    (`training.checkpoint.load_checkpoint_model`; `source["format"]` "training").

    The model is built on the meta device and the checkpoint's tensors are assigned
    to it (`load_state_dict(strict=True, assign=True)`), so no random weights are
    allocated first: the 2B model in bfloat16 needs about its 5.4 GB, not twice.

    Args:
        path: the checkpoint file or directory; None loads the bundled model
            (`rgemma/assets/bundled/`).
        dtype: parameter dtype (torch dtype or name such as "bfloat16"); default: the
            dtype of the checkpoint's embedding (every tensor is cast to it), except
            that a float32 checkpoint loads as bfloat16 on a CUDA device.
        device: where to put the parameters (default CPU).
        config: a declared `GriffinConfig` (or preset name) the checkpoint must match;
            for an official `.pt` it also supplies what shapes cannot tell (attention
            window, embedding scaling, soft-cap, RoPE base), which otherwise default to
            RecurrentGemma's.
        adapter: a LoRA adapter directory in PEFT's format (`rgemma.lora.save_adapter`,
            or PEFT's `save_pretrained` for HF's RecurrentGemma) to apply to the model
            (`rgemma.lora.load_adapter`: shapes and the base's fingerprint checked).
        merge_adapter: fold the adapter into the weights (`rgemma.lora.merge_lora`,
            the default: then the model runs at the base model's speed, with logits
            equal to the unmerged model's within the dtype's rounding); False keeps the
            `LoRALinear` wrappers (to continue training the adapter, or to inspect it).

    Returns:
        `Griffin` in eval mode with `requires_grad=False` (call `.requires_grad_(True)`
        to train it), every parameter a real tensor of `dtype` on `device`,
        with `model.source = {"format": "official" | "hf" | "rgemma", "path": str,
        "tokenizer": str | None, "bundled": bool}`, plus with an adapter
        `"adapter": {"path": str, "merged": bool, "bytes": int}` (its parameters' bytes).

    Raises:
        CheckpointError: nonexistent path; a directory without a checkpoint (says what
            was looked for); a truncated, corrupt or non-checkpoint file (named);
            missing or unexpected keys (listed); a shape that does not match the config
            (key, expected, got); a sharded index naming a missing shard; no bundled
            model installed (when `path` is None).
        ConfigError: the checkpoint's config differs from the declared `config`
            (fields named); an invalid config file; an invalid `dtype`.
    """
    from .model import Griffin

    if adapter is not None:
        return _with_adapter(load_model(path, dtype, device, config), adapter, merge_adapter)
    dtype = _as_dtype(dtype)
    bundled = path is None
    if bundled:
        path = bundled_model_path()
        if not (path / RGEMMA_CONFIG_NAME).is_file():
            raise CheckpointError(
                f"no bundled model is installed (looked in {path}); pass a checkpoint path "
                "(`load_model(path)`, or `--model PATH` on the command line)"
            )
    from .hub import resolve_model_path

    path = Path(os.fspath(resolve_model_path(path))).expanduser().absolute()  # Hub ids too
    if isinstance(config, str):
        config = GriffinConfig.preset(config)
    if _may_be_training_run(path):
        from .training.checkpoint import load_checkpoint_model, resolve_checkpoint

        ckpt = resolve_checkpoint(path)
        if ckpt is not None:
            return load_checkpoint_model(ckpt, dtype, device, config, load_base=load_model)
    found = _find(path)
    where = f"checkpoint {found.weights[0] if found.weights else found.index}"

    file_cfg: GriffinConfig | None = None
    if found.config_file is not None:
        data = _read_json(found.config_file)
        _check_declared_layers(found, data, where)  # before building anything that size
        try:
            if found.format == "rgemma":
                file_cfg = GriffinConfig.from_dict(data.get("config", data))
            else:
                file_cfg = hf_config_to_griffin(data)
        except ConfigError as err:
            raise ConfigError(f"{found.config_file}: {err}") from err
        if found.format == "rgemma" and data.get("quantization"):  # save_model of a quantized
            if dtype not in (None, torch.float32):
                raise ConfigError(
                    f"{path} is {data['quantization']}-quantized (int8 weights, float32 "
                    f"for the rest); it cannot be loaded as {dtype}"
                )
            if config is not None:
                config.check_matches(file_cfg)
            model = _load_quantized(found, file_cfg, data["quantization"], device)
            model.source = {
                "format": "rgemma",
                "path": str(path),
                "tokenizer": str(found.tokenizer) if found.tokenizer else None,
                "bundled": bundled,
            }
            return model.eval().requires_grad_(False)

    with contextlib.ExitStack() as stack:
        src = _open_source(found, stack)
        hf_names = _is_hf_naming(src.shapes)
        if found.format == "hf" and not hf_names:
            raise CheckpointError(
                f"{where} has no HF RecurrentGemma keys "
                f"(first keys: {_listing(list(src.shapes)[:5], 5)})"
            )
        if file_cfg is not None:
            cfg = file_cfg
        elif hf_names:  # a lone HF-named state_dict: convert the shapes, then infer
            official_shapes = {
                k: tuple(v.shape) for k, v in hf_to_official(_meta(src.shapes)).items()
            }
            cfg = _infer(official_shapes, config, where)
        else:
            cfg = _infer(src.shapes, config, where)
        if config is not None:
            config.check_matches(cfg)
        num_layers = cfg.num_layers

        # Validate names and shapes in the checkpoint's own naming, before reading.
        expected = _expected_official(cfg)
        if hf_names:
            expected_hf = {k: tuple(v.shape) for k, v in official_to_hf(_meta(expected)).items()}
            shapes = {
                (k if k.startswith(("model.", "lm_head.")) else "model." + k): s
                for k, s in src.shapes.items()
            }
            _validate(where, shapes, expected_hf, cfg, allowed_extra=(_LM_HEAD_HF,))
        else:
            _validate(where, src.shapes, expected, cfg)

        for key, dt in src.dtypes.items():
            if dt is None or not dt.is_floating_point:
                raise CheckpointError(f"{where}: tensor {key!r} has dtype {dt}, not floating point")
        embed_key = next(
            k
            for k in src.shapes
            if k == _EMBED_OFFICIAL or k.removeprefix("model.") == "embed_tokens.weight"
        )
        target = dtype or src.dtypes[embed_key]
        on_gpu = torch.device(device or "cpu").type == "cuda"
        if dtype is None and target == torch.float32 and on_gpu:
            target = torch.bfloat16  # unspecified on a GPU: bfloat16, half the bytes

        def cast(key: str) -> Tensor:
            # copy=True: never keep a parameter backed by the memory-mapped file (writing
            # over that file later, e.g. torch.save to the same path, would corrupt or
            # crash the model). One tensor at a time, so the peak stays about one model.
            t = src.get(key)
            out = t.to(device=device or "cpu", dtype=target, copy=True).contiguous()
            _check_finite(where, key, out, t)
            return out

        state: dict[str, Tensor] = {}
        if hf_names:
            groups: dict[int, list[str]] = {}
            for key in src.shapes:
                m = _HF_LAYER_RE.match(key)
                groups.setdefault(int(m.group(1)) if m else -1, []).append(key)
            for _, keys in sorted(groups.items()):  # one layer at a time: small peak memory
                state.update(hf_to_official({k: cast(k) for k in keys}, num_layers))
        else:
            for key in src.shapes:
                state[key] = cast(key)

    model = Griffin(cfg, device="meta", dtype=target)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{where}: tensors left on the meta device: {_listing(left)}")
    model.source = {
        "format": "hf" if hf_names else found.format,
        "path": str(path),
        "tokenizer": str(found.tokenizer) if found.tokenizer else None,
        "bundled": bundled,
    }
    # Loaded for inference: no autograd graph is recorded by plain `model(...)` calls
    # (training re-enables gradients with `model.requires_grad_(True)`).
    return model.eval().requires_grad_(False)


def _may_be_training_run(path: Path) -> bool:
    """Whether `path` may be a training checkpoint or run directory (the names of
    `training.checkpoint`'s layout), checked before importing the training code."""
    return path.is_dir() and (
        (path / "COMPLETE").exists()
        or path.name.startswith("step_")
        or path.name == "checkpoints"
        or (path / "checkpoints").is_dir()
    )


def _with_adapter(model, adapter: str | os.PathLike, merge: bool):
    """`model` with the LoRA adapter in directory `adapter` applied (and merged)."""
    from . import lora

    lora.load_adapter(model, adapter)
    nbytes = lora.adapter_size(model).adapter_bytes
    if merge:
        lora.merge_lora(model)
    model.source["adapter"] = {"path": os.fspath(adapter), "merged": merge, "bytes": nbytes}
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------
def _plain_state(model) -> tuple[GriffinConfig, dict[str, Tensor]]:
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, GriffinConfig):
        raise CheckpointError(f"save expects a rgemma Griffin model, got {type(model).__name__}")
    adapters = [n for n, _ in model.named_parameters() if ".lora_A" in n]
    if adapters:
        raise CheckpointError(
            f"the model has unmerged LoRA adapters ({adapters[0]}, ...): merge them first "
            "(rgemma.lora.merge_lora) or save them alone (rgemma.lora.save_adapter)"
        )
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return cfg, state


def _check_target(path: Path, marker: str) -> None:
    """Refuse to replace a non-empty directory that is not a checkpoint (rgemma or HF:
    `rgemma convert --force` may replace one kind with the other)."""
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"cannot save to {path}: it exists and is not a directory")
        markers = (marker, RGEMMA_CONFIG_NAME, HF_CONFIG_NAME)
        if any(path.iterdir()) and not any((path / m).is_file() for m in markers):
            raise CheckpointError(
                f"refusing to overwrite {path}: it is a non-empty directory without {marker}"
            )


#: Buffers of a quantized model that are derived from others (not saved).
_DERIVED_SCALE_SUFFIXES = ("scale_bf16", "row_scale_bf16")


def _load_quantized(
    found: _Found, cfg: GriffinConfig, mode: Any, device: torch.device | str | None
):
    """A quantized rgemma checkpoint: the quantized module tree is built on the meta
    device (`rgemma.quantize` of a meta model) and the saved int8 weights and scales
    are assigned to it, with no re-quantization; the bfloat16 scale copies are
    derived from the float32 ones. Every floating-point tensor (scales, unquantized
    weights) is checked for NaN/inf as on the normal path (`_check_finite`)."""
    from .model import Griffin
    from .quantization import quantize

    where = f"checkpoint {found.weights[0]}"
    if mode != "int8":
        raise CheckpointError(f"{found.config_file}: unknown quantization {mode!r}")
    model = quantize(Griffin(cfg, device="meta", dtype=torch.float32), mode)
    expected = model.state_dict()
    with contextlib.ExitStack() as stack:
        src = _open_source(found, stack)
        wanted = {k: tuple(v.shape) for k, v in expected.items()}
        wanted = {k: s for k, s in wanted.items() if not k.endswith(_DERIVED_SCALE_SUFFIXES)}
        _validate(where, src.shapes, wanted, cfg)
        state = {}
        for key in wanted:
            if src.dtypes[key] != expected[key].dtype:
                raise CheckpointError(
                    f"{where}: tensor {key!r} has dtype {src.dtypes[key]}, expected "
                    f"{expected[key].dtype} in an {mode} checkpoint"
                )
            t = src.get(key)
            state[key] = t.to(device=device or "cpu", copy=True).contiguous()
            if state[key].is_floating_point():  # scales and unquantized weights
                _check_finite(where, key, state[key], t)
    for key in expected:
        if key.endswith(_DERIVED_SCALE_SUFFIXES):
            state[key] = state[key.removesuffix("_bf16")].to(torch.bfloat16)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def save_model(
    model, path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None
) -> Path:
    """Save `model` in rgemma's format: a directory with `model.safetensors` (official
    key names, contiguous tensors, the tied embedding stored once), `rgemma_config.json`
    and, if given, a copy of `tokenizer_path` as `tokenizer.model`.

    Written atomically: a temporary directory beside `path` replaces it in one rename,
    so a reader sees the old checkpoint or the whole new one.

    Returns:
        The checkpoint directory.

    A quantized model (`rgemma.quantize`) is saved as it is: its int8 weights and
    float32 scales (`*.weight_int8`, `*.scale`, `embedder.table_int8`,
    `embedder.row_scale`; the bfloat16 copies of the scales are derived on load),
    float32 for the rest, and `"quantization": "int8"` in `rgemma_config.json`;
    `load_model` rebuilds the quantized model from them without re-quantizing, so
    its logits are identical.

    Raises:
        CheckpointError: `model` is not a `Griffin`; `path` is a file, or a non-empty
        directory that is not an rgemma checkpoint; `tokenizer_path` does not exist.
    """
    from safetensors.torch import save_file

    path = Path(os.fspath(path)).expanduser().absolute()
    cfg, state = _plain_state(model)
    quantization = getattr(getattr(model, "_orig_mod", model), "quantization", None)
    if quantization == "int4":  # its codes may be in torch's machine-specific packing
        raise CheckpointError(
            "cannot save an int4-quantized model: save the float model and quantize "
            "it after loading (rgemma.quantize(model, 'int4'), --quantize int4)"
        )
    if quantization:  # the bfloat16 scales are copies of the float32 ones
        state = {k: v for k, v in state.items() if not k.endswith(_DERIVED_SCALE_SUFFIXES)}
    _check_target(path, RGEMMA_CONFIG_NAME)
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise CheckpointError(f"tokenizer file {tokenizer_path} does not exist")
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    with atomic_dir(path) as tmp:
        save_file(
            state,
            os.path.join(tmp, WEIGHTS_NAME),
            metadata={"format": "pt", "rgemma_format": str(RGEMMA_FORMAT_VERSION)},
        )
        meta = {"rgemma_format": RGEMMA_FORMAT_VERSION, "dtype": dtype, "config": cfg.to_dict()}
        if quantization:
            meta["quantization"] = quantization
        with open(os.path.join(tmp, RGEMMA_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, os.path.join(tmp, TOKENIZER_NAME))
    return path


#: Gemma's chat format as a HF chat template (Jinja), written into
#: `tokenizer_config.json`: the same string as `Tokenizer.apply_chat_template` with
#: BOS first (roles user/model, `assistant` as `model`, a leading system message
#: folded into the first user turn as `system + "\n\n" + user`).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system=none) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}"
    "{{ raise_exception('only the first message may be a system message') }}"
    "{%- endif -%}"
    "{%- if loop.last or messages[1]['role'] != 'user' -%}"
    "{{ '<start_of_turn>user\n' + message['content'] + '<end_of_turn>\n' }}"
    "{%- else -%}{%- set ns.system = message['content'] -%}{%- endif -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] in ['assistant', 'model'] "
    "else message['role'] -%}"
    "{%- set content = message['content'] -%}"
    "{%- if ns.system is not none and loop.index0 == 1 -%}"
    "{%- set content = ns.system + '\n\n' + content -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + content + '<end_of_turn>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

#: Default largest safetensors shard of `save_hf` (HF's own default, 5 GB).
HF_MAX_SHARD_BYTES = 5 * 10**9


def _parse_size(size: int | str) -> int:
    """Bytes of `5GB`, `500MB`, `10KiB` or an int."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", str(size).lower())
        if m is None:
            raise ConfigError(f"invalid size {size!r}; use bytes or e.g. '5GB', '500MB'")
        unit = m.group(2).rstrip("b")
        base = 1024 if unit.endswith("i") else 1000
        value = int(float(m.group(1)) * base ** " kmgt".index(unit.rstrip("i") or " "))
    if value < 1:
        raise ConfigError(f"shard size must be positive, got {size!r}")
    return value


def _shards(state: Mapping[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    """Split a state_dict into consecutive groups of at most `max_bytes` (a tensor
    larger than that gets a shard of its own)."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    return shards


def hf_tokenizer_files(tokenizer_path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The JSON files beside `tokenizer.model` that make `AutoTokenizer.from_pretrained`
    load it as Google's own Gemma tokenizer: `tokenizer_config.json` (class
    `GemmaTokenizer`, BOS added, no EOS, the special tokens, the Gemma chat template)
    and `special_tokens_map.json`.

    Raises:
        CheckpointError: not a SentencePiece model file.
    """
    from .tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    special = {
        "bos_token": tok.sp.id_to_piece(tok.bos_id),
        "eos_token": tok.sp.id_to_piece(tok.eos_id),
        "pad_token": tok.sp.id_to_piece(tok.pad_id) if tok.pad_id >= 0 else None,
        "unk_token": tok.sp.id_to_piece(tok.sp.unk_id()),
    }
    special = {k: v for k, v in special.items() if v is not None}
    chat = tok.start_of_turn_id is not None and tok.end_of_turn_id is not None
    extra = ["<start_of_turn>", "<end_of_turn>"] if chat else []
    config: dict[str, Any] = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        **special,
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "sp_model_kwargs": {},
        "legacy": False,
        "padding_side": "left",
    }
    if chat:
        config["chat_template"] = GEMMA_CHAT_TEMPLATE
    return {
        "tokenizer_config.json": config,
        "special_tokens_map.json": {**special, "additional_special_tokens": extra},
    }


def _write_json(path: str | os.PathLike, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def save_hf(
    model,
    path: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    *,
    max_shard_size: int | str = HF_MAX_SHARD_BYTES,
    exact_window: bool = False,
) -> Path:
    """Save `model` as a Hugging Face RecurrentGemma directory, as Google publishes
    theirs: `transformers.AutoModelForCausalLM.from_pretrained` and
    `AutoTokenizer.from_pretrained` load it, and so does `load_model`.

    Files: `config.json` (`RecurrentGemmaConfig`); `model.safetensors`, or shards
    `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json` when the
    weights exceed `max_shard_size` (HF names, see the module docstring; no
    `lm_head.weight`: it is tied); `generation_config.json` (BOS, pad, and EOS plus
    `<end_of_turn>` as stop ids); with a tokenizer, `tokenizer.model`,
    `tokenizer_config.json` (BOS added, special tokens, the Gemma chat template) and
    `special_tokens_map.json`. Written atomically like `save_model`.

    The attention window: HF's attention with `attention_window_size = W` lets a query
    see W keys, the official model W + 1 (itself and the W before it), so by default
    HF's logits differ from rgemma's from position W on (2,048 for the 2B model).
    `exact_window=True` writes `attention_window_size = W + 1`, so that HF computes
    the official model exactly at every position, and records W as
    `rgemma_attention_window_size`, which `load_model` reads back.

    Args:
        model: a `Griffin` (not quantized), any dtype; saved in its dtype.
        path: the directory to write.
        tokenizer_path: a SentencePiece `tokenizer.model` to ship beside the weights.
        max_shard_size: largest shard, bytes or a string such as "5GB" / "500MB".
        exact_window: write HF's window one larger (see above).

    Returns:
        The checkpoint directory.

    Raises:
        CheckpointError: `model` is not a `Griffin` or is quantized; `path` is a file,
            or a non-empty directory that is not a HF checkpoint; `tokenizer_path`
            does not exist or is not a SentencePiece model.
        ConfigError: a bad `max_shard_size`.
    """
    from safetensors.torch import save_file

    if getattr(model, "quantization", None):
        raise CheckpointError(
            f"cannot save an {model.quantization}-quantized model in HF format: HF has no "
            "such layout (save it with save_model, or save the float model)"
        )
    max_bytes = _parse_size(max_shard_size)
    path = Path(os.fspath(path)).expanduser().absolute()
    cfg, state = _plain_state(model)
    _check_target(path, HF_CONFIG_NAME)
    tok_files = {}
    if tokenizer_path is not None:
        if not Path(tokenizer_path).is_file():
            raise CheckpointError(f"tokenizer file {tokenizer_path} does not exist")
        tok_files = hf_tokenizer_files(tokenizer_path)
    hf_state = official_to_hf(state)
    del state
    hf_cfg = griffin_to_hf_config(cfg)
    dtype = str(hf_state[_EMBED_HF].dtype).removeprefix("torch.")
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = dtype
    if exact_window:
        hf_cfg["attention_window_size"] = cfg.attention_window_size + 1
        hf_cfg["rgemma_attention_window_size"] = cfg.attention_window_size
    special = tok_files.get("tokenizer_config.json", {})
    eos = [hf_cfg["eos_token_id"]]
    if tokenizer_path is not None:
        from .tokenizer import Tokenizer

        tok = Tokenizer(tokenizer_path)
        hf_cfg.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        eos = [tok.eos_id] + ([tok.end_of_turn_id] if "chat_template" in special else [])
    generation = {
        "bos_token_id": hf_cfg["bos_token_id"],
        "eos_token_id": eos if len(eos) > 1 else eos[0],
        "pad_token_id": hf_cfg["pad_token_id"],
    }
    shards = _shards(hf_state, max_bytes)
    with atomic_dir(path) as tmp:
        if len(shards) == 1:
            save_file(hf_state, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in hf_state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            _write_json(os.path.join(tmp, HF_INDEX_NAME), index)
        _write_json(os.path.join(tmp, HF_CONFIG_NAME), hf_cfg)
        _write_json(os.path.join(tmp, "generation_config.json"), generation)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, os.path.join(tmp, TOKENIZER_NAME))
            for name, data in tok_files.items():
                _write_json(os.path.join(tmp, name), data)
    return path
