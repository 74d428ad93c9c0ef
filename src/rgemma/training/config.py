"""`TrainConfig`: every field of a training run, read from JSON/TOML with `key=value`
overrides; `model_config_from` turns its `model` field into a `GriffinConfig`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import BlockType, GriffinConfig, griffin_pattern
from ..errors import ConfigError
from ..lora import DEFAULT_TARGETS as LORA_TARGETS
from ..lora import resolve_targets


# ----------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainConfig:
    """Everything a training or fine-tuning run needs; load it with `from_file`.

    Paths are used as given: relative ones are relative to the current directory
    (run `rgemma train` from the repository root). Data paths may be glob patterns.

    Attributes:
        model: the model to train from scratch: a preset name (`"test-tiny"`), an
            inline `GriffinConfig` dict (`block_types` may be replaced by
            `num_layers`, which gives the Griffin pattern R, R, A, ...), or a dict
            `{"preset": name, **overrides}`. With `init_from` it may be left out;
            if given it must match the checkpoint.
        init_from: fine-tune from this checkpoint (official `.pt`, HF or rgemma dir).
        lora_rank: LoRA rank r (`rgemma.lora.apply_lora`): the base weights are frozen
            and only the adapters train; 0 (default) trains every parameter.
        lora_alpha: LoRA scale numerator (the update is scaled by alpha / r).
        lora_targets: the modules that get adapters, rgemma's or HF's names (default
            every projection, `rgemma.lora.DEFAULT_TARGETS`; add "input_gate" and
            "a_gate" for the RG-LRU gates, rgemma-only).
        lora_dropout: dropout on the adapters' input, in [0, 1).
        tokenizer: SentencePiece `tokenizer.model`; default: the one beside
            `init_from`, else the bundled one (`rgemma/assets/bundled/tokenizer.model`).
        train_data: files, directories (searched for `*.txt`, `*.jsonl`) and globs.
        val_data: held-out files; when empty, `val_fraction` of the training
            documents are held out (chosen by a hash of their content).
        val_fraction: share of documents held out when `val_data` is empty (0: no
            validation).
        doc_chars: plain-text files are cut into documents of at most this many
            characters (None: one document per file); see `data.split_text`.
        seq_len: tokens per packed sequence t; >= 2 and, if `max_seq_len` is set,
            at most `max_seq_len`. Griffin has no hard limit (the recurrence and the
            local attention window do not depend on t); memory grows linearly in t.
        max_seq_len: an optional cap on `seq_len` (a guard for configs).
        carry_state: train long documents with their full context (truncated
            backpropagation through time, `data.StreamDataset`): documents lie whole,
            end to end, in `batch_size x processes x grad_accum` parallel streams
            (micro-batch j of a step holds streams [j*R, (j+1)*R), R = batch_size x
            processes); each step trains the next `seq_len` tokens of every stream,
            continuing from the model state (RG-LRU, Conv1D and attention window) the
            previous segment ended in, detached: memory is bounded whatever the
            document length, and no document, chat or completion is cut. The carried
            state is saved with the data position (exact resume). Needs `seq_len` >=
            the model's `attention_window_size` (`check_carry_state`) and at least one
            document per stream. False: packed sequences (`data.PackedDataset`), each
            on its own, chats longer than `seq_len` shortened with a warning.
        batch_size: sequences per micro-batch b, per process.
        grad_accum: micro-batches per optimiser step; the step's loss is the sum of
            the masked token losses over all of them (and all processes) divided by
            their count.
        global_batch_size: sequences per optimiser step over all processes
            (batch_size x processes x grad_accum). None: that product. When set,
            `grad_accum` is derived from it (leave grad_accum at 1) and it must be a
            multiple of batch_size x processes; the same config then trains the same
            way on any number of processes.
        data_parallel: with several processes (`torchrun`): "fsdp" (FSDP2, parameters,
            gradients and optimiser state sharded per residual block) or "ddp"
            (a full replica per process). Ignored with one process.
        max_steps: optimiser steps of the whole run (the cosine ends here).
        lr: peak learning rate; min_lr: the cosine's floor.
        warmup_steps: linear warm-up from 0 over this many steps.
        weight_decay: AdamW decoupled weight decay of the decayed group.
        beta1, beta2, eps: AdamW's.
        grad_clip: clip the global gradient norm to this (0: no clipping).
        bf16: run forward/backward under bfloat16 autocast (parameters, optimiser
            state, gradient reduction, RG-LRU recurrence and loss stay float32).
        gradient_checkpointing: recompute each residual block in the backward pass
            (activation checkpointing, `training.parallel`).
        device: "cpu", "cuda", "cuda:1", or "auto" (cuda if available). Under
            torchrun, "cuda" gives each process `cuda:LOCAL_RANK`.
        num_threads: torch CPU threads (None: torch's default).
        seed: seeds the initialisation, the data order and the RNGs.
        out_dir: where checkpoints, metrics and the final model go.
        save_every: checkpoint every this many steps (0: only at the end).
        keep_last: how many step checkpoints to keep (>= 1).
        eval_every: evaluate every this many steps (0: only at the end).
        eval_batches: the evaluation's budget: validation documents are scored
            whole (`evaluate`), up to `eval_batches * batch_size * processes *
            seq_len` tokens (None: all of them).
        log_every: log the training loss every this many steps.
        resume: continue from the newest complete checkpoint in `out_dir` (a fresh
            start if there is none).
        progress: show progress on stderr: a tqdm bar with ETA on a terminal, else a
            line every `log_every` steps (see `training.metrics`).
        save_final: write `out_dir/final/` at the end of the run.
        tensorboard: also log to TensorBoard in `out_dir/tensorboard/` (needs the
            tensorboard package).
    """

    model: str | dict[str, Any] | None = None
    init_from: str | None = None
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: list(LORA_TARGETS))
    lora_dropout: float = 0.0
    tokenizer: str | None = None
    train_data: list[str] = dataclasses.field(default_factory=list)
    val_data: list[str] = dataclasses.field(default_factory=list)
    val_fraction: float = 0.01
    doc_chars: int | None = 16_000
    seq_len: int = 256
    max_seq_len: int | None = None
    carry_state: bool = False
    batch_size: int = 8
    grad_accum: int = 1
    global_batch_size: int | None = None
    data_parallel: str = "fsdp"
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    device: str = "cpu"
    num_threads: int | None = None
    seed: int = 0
    out_dir: str = "runs/train"
    save_every: int = 500
    keep_last: int = 3
    eval_every: int = 500
    eval_batches: int | None = 50
    log_every: int = 10
    resume: bool = False
    progress: bool = True
    save_final: bool = True
    tensorboard: bool = False

    def __post_init__(self) -> None:
        for name in ("train_data", "val_data"):
            value = getattr(self, name)
            if isinstance(value, (str, os.PathLike)):
                setattr(self, name, [os.fspath(value)])
            elif value is None:
                setattr(self, name, [])
            else:
                setattr(self, name, [os.fspath(v) for v in value])
        self.validate()

    # ------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check types and ranges of every field.

        Raises:
            ConfigError: naming the field and the bad value.
        """

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def need_int(name: str, minimum: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if not is_int(v) or v < minimum:
                raise ConfigError(f"TrainConfig.{name} must be an int >= {minimum}, got {v!r}")

        def need_float(name: str, lo: float, hi: float = math.inf) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise ConfigError(f"TrainConfig.{name} must be a number in [{lo}, {hi}], got {v!r}")

        need_int("seq_len", 2)
        need_int("max_seq_len", 2, optional=True)
        if self.max_seq_len is not None and self.seq_len > self.max_seq_len:
            raise ConfigError(
                f"TrainConfig.seq_len {self.seq_len} exceeds max_seq_len {self.max_seq_len}"
            )
        for name in ("batch_size", "grad_accum", "max_steps", "keep_last", "log_every"):
            need_int(name, 1)
        for name in ("warmup_steps", "save_every", "eval_every", "seed"):
            need_int(name, 0)
        need_int("eval_batches", 1, optional=True)
        need_int("global_batch_size", 1, optional=True)
        if self.global_batch_size is not None and self.grad_accum != 1:
            raise ConfigError(
                f"TrainConfig.grad_accum ({self.grad_accum}) and global_batch_size "
                f"({self.global_batch_size}) both set: give one (grad_accum is derived "
                "from global_batch_size)"
            )
        if self.data_parallel not in ("fsdp", "ddp"):
            raise ConfigError(
                f"TrainConfig.data_parallel must be 'fsdp' or 'ddp', got {self.data_parallel!r}"
            )
        need_int("num_threads", 1, optional=True)
        need_int("lora_rank", 0)
        need_float("lora_dropout", 0.0, 0.999)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise ConfigError(f"TrainConfig.lora_alpha must be a number, got {self.lora_alpha!r}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"TrainConfig.lora_alpha must be positive, got {self.lora_alpha!r}")
        try:
            resolve_targets(self.lora_targets)
        except ConfigError as err:
            raise ConfigError(f"TrainConfig.lora_targets: {err}") from None
        if not self.lora_rank:
            unused = [
                name
                for name, default in (
                    ("lora_targets", list(LORA_TARGETS)),
                    ("lora_alpha", 16.0),
                    ("lora_dropout", 0.0),
                )
                if getattr(self, name) != default
            ]
            if unused:
                raise ConfigError(
                    f"TrainConfig.{unused[0]} is set but lora_rank is 0 (a full fine-tune, "
                    "no adapters): set lora_rank (--lora-rank R) to train LoRA adapters"
                )
        need_int("doc_chars", 1, optional=True)
        need_float("lr", 0.0)
        need_float("min_lr", 0.0)
        need_float("weight_decay", 0.0)
        need_float("beta1", 0.0, 1.0)
        need_float("beta2", 0.0, 1.0)
        need_float("eps", 0.0)
        need_float("grad_clip", 0.0)
        need_float("val_fraction", 0.0, 0.999)
        if self.lr <= 0:
            raise ConfigError(f"TrainConfig.lr must be positive, got {self.lr!r}")
        if self.min_lr > self.lr:
            raise ConfigError(f"TrainConfig.min_lr ({self.min_lr}) exceeds lr ({self.lr})")
        if self.warmup_steps > self.max_steps:
            raise ConfigError(
                f"TrainConfig.warmup_steps ({self.warmup_steps}) exceeds "
                f"TrainConfig.max_steps ({self.max_steps}): lower warmup_steps "
                f"(e.g. warmup_steps={max(0, self.max_steps // 10)}) or raise max_steps"
            )
        for name in (
            "bf16",
            "gradient_checkpointing",
            "resume",
            "progress",
            "save_final",
            "tensorboard",
            "carry_state",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"TrainConfig.{name} must be true or false, got {getattr(self, name)!r}"
                )
        if self.model is None and self.init_from is None:
            raise ConfigError("TrainConfig needs a 'model' (preset or config) or 'init_from'")
        if self.model is not None and not isinstance(self.model, (str, dict)):
            kind = type(self.model).__name__
            raise ConfigError(f"TrainConfig.model must be a preset name or a dict, got {kind}")
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(f"TrainConfig.device must be a string, got {self.device!r}")
        if not self.out_dir:
            raise ConfigError("TrainConfig.out_dir must be set")

    def grad_accum_for(self, world_size: int) -> int:
        """Micro-batches per optimiser step on `world_size` processes: `grad_accum`,
        or `global_batch_size / (batch_size * world_size)` when that is set.

        Raises:
            ConfigError: `global_batch_size` is not a multiple of batch_size x
                world_size (all three named).
        """
        if self.global_batch_size is None:
            return self.grad_accum
        per_micro = self.batch_size * world_size
        if self.global_batch_size % per_micro:
            raise ConfigError(
                f"TrainConfig.global_batch_size {self.global_batch_size} does not divide "
                f"across {world_size} process(es) x batch_size {self.batch_size}: make it "
                f"a multiple of {per_micro}, or change batch_size"
            )
        return self.global_batch_size // per_micro

    # ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (inverse of `from_dict`)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a dict, rejecting unknown keys.

        Raises:
            ConfigError: an unknown key (named) or an invalid value.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"a train config must be a JSON/TOML object, got {type(data).__name__}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(
                f"unknown train config key(s): {', '.join(unknown)}; "
                f"valid keys: {', '.join(sorted(fields))}"
            )
        try:
            return cls(**dict(data))
        except TypeError as err:
            raise ConfigError(f"invalid train config: {err}") from None

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, overrides: Mapping[str, Any] | Sequence[str] = ()
    ) -> TrainConfig:
        """Load a `.json` or `.toml` train config, then apply `overrides`.

        Args:
            path: the config file.
            overrides: a dict of values, or `key=value` strings as on the command
                line (see `apply_overrides`).

        Raises:
            ConfigError: unreadable or invalid file (named), unknown keys, bad values.
        """
        data = read_config_file(path)
        data = apply_overrides(data, overrides)
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON or TOML (by suffix `.toml`) config file into a dict.

    Raises:
        ConfigError: the file is missing, not valid JSON/TOML, or not an object.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read train config {path}: {err.strerror}") from None
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ModuleNotFoundError:
                raise ConfigError(
                    f"{path}: reading TOML needs Python >= 3.11 or the 'tomli' package"
                ) from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"{path}: invalid TOML: {err}") from None
    else:
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8: {err}") from None
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
            ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a train config must be an object, got {type(data).__name__}")
    return data


def _parse_value(text: str) -> Any:
    """A command-line value: JSON if it parses (numbers, true/false, null, lists,
    objects), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(
    data: Mapping[str, Any], overrides: Mapping[str, Any] | Sequence[str]
) -> dict[str, Any]:
    """Return `data` with overrides applied.

    Args:
        data: a train config dict.
        overrides: a dict (`{"lr": 3e-4}`), or strings `key=value`, where the value
            is parsed as JSON when possible (`lr=3e-4`, `bf16=true`,
            `train_data=["a.txt","b.txt"]`) and a dotted key sets a field of an
            inline model config (`model.width=128`).

    Raises:
        ConfigError: a string without `=`, or a dotted key into a non-dict.
    """
    out = json.loads(json.dumps(dict(data)))  # deep copy
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like key=value")
            key, value = item.split("=", 1)
            items.append((key.strip(), _parse_value(value)))
    for key, value in items:
        parts = key.split(".")
        target = out
        for part in parts[:-1]:
            if isinstance(target.get(part), str):  # a preset name: turn into a dict
                target[part] = {"preset": target[part]}
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a table")
        target[parts[-1]] = value
    return out


def model_config_from(spec: str | Mapping[str, Any]) -> GriffinConfig:
    """A `GriffinConfig` from a preset name or an inline dict (see `TrainConfig.model`).

    Raises:
        ConfigError: unknown preset, unknown or missing fields, invalid values.
    """
    if isinstance(spec, str):
        return GriffinConfig.preset(spec)
    data = dict(spec)
    if "preset" in data:
        base = GriffinConfig.preset(data.pop("preset")).to_dict()
        if "num_layers" in data:
            base.pop("block_types")
        base.update(data)
        data = base
    if "num_layers" in data:
        if "block_types" in data:
            raise ConfigError("model config: give 'block_types' or 'num_layers', not both")
        n = data.pop("num_layers")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"model config: num_layers must be a positive int, got {n!r}")
        data["block_types"] = [b.value for b in griffin_pattern(n)]
    if "block_types" in data and isinstance(data["block_types"], str):
        raise ConfigError("model config: block_types must be a list of 'recurrent'/'attention'")
    return GriffinConfig.from_dict(data)


def check_carry_state(cfg: TrainConfig, model_config: GriffinConfig) -> None:
    """Check that `cfg.seq_len` suits carried-state training of this model.

    With `carry_state`, a query also reads the keys of the previous segments that lie
    in its attention window, and those are detached: the attention learns only
    through the keys of its own segment. A segment shorter than the window would cut
    most of that gradient (a query at segment position i reads min(i, w) + 1 keys
    with gradient of the w + 1 it attends to), so the segment must be at least one
    window long. Models without attention blocks, and packed training, take any
    `seq_len`.

    Raises:
        ConfigError: `carry_state` with `seq_len` < `attention_window_size` (both
            named, with what to change).
    """
    window = model_config.attention_window_size
    has_attention = BlockType.ATTENTION in model_config.block_types
    if cfg.carry_state and has_attention and cfg.seq_len < window:
        raise ConfigError(
            f"TrainConfig.seq_len {cfg.seq_len} is shorter than the model's "
            f"attention_window_size {window}: with carry_state a segment must span at "
            f"least one attention window (the keys of earlier segments are detached); "
            f"set seq_len >= {window}, or carry_state=false"
        )


# ----------------------------------------------------------------------------------
