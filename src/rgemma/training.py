"""Training and fine-tuning: `train(TrainConfig) -> dict`.

One loop for both pre-training a fresh `Griffin` (from a preset or an inline model
config) and fine-tuning any checkpoint `load_model` reads (`init_from`):

* data: `rgemma.data` reads text files, directories and JSONL, tokenizes every
  document as `<bos> ... <eos>`, packs documents into sequences of `seq_len` tokens
  (`segment_pos` restarts at 0 at each document, so packed documents never see each
  other) and splits validation off by document;
* loss: cross-entropy in float32 over the positions where `loss_mask` is set,
  summed and divided by their count over the whole (accumulated) batch;
* optimiser: AdamW, no weight decay on norms (`*.scale`), biases (`*.bias`, `*.b`),
  the embedding (`embedder.input_embedding`) and the RG-LRU `a_param`, as in the
  official fine-tuning recipe (`recurrentgemma` colab `finetuning_tutorial`);
  linear warm-up then cosine decay to `min_lr`; global gradient-norm clipping;
  gradient accumulation; optional bfloat16 autocast and activation checkpointing;
* evaluation: held-out loss, perplexity and bits per byte every `eval_every` steps,
  validation documents scored whole over the model's state (`rgemma.scoring`);
* logging: a tqdm bar (loss, tokens/s, ETA) and `out_dir/metrics.jsonl`;
* checkpoints: `out_dir/checkpoints/step_XXXXXXX/`, each written into a temporary
  directory and renamed into place (`io.atomic_dir`), so a kill at any moment
  leaves only complete checkpoints; `resume=True` continues from the newest one
  exactly (the same losses, bit for bit, as a run that was never stopped);
* the final model: `out_dir/final/`, an rgemma model directory (`save_model`)
  with the tokenizer copied in, loadable with `rgemma.load_model`.

Checkpoint layout::

    out_dir/
      metrics.jsonl                 one JSON object per log / eval event
      train_config.json             the config of the latest start or resume
      checkpoints/
        latest                      name of the newest complete checkpoint (a hint)
        step_0000500/
          model/                    rgemma model dir (rgemma_config.json,
                                    model.safetensors, tokenizer.model)
          optimizer.pt              AdamW state_dict
          trainer_state.pt          step, tokens seen, data position, RNG states
          trainer_state.json        the same, human-readable (no RNG)
          train_config.json         the TrainConfig of the run that wrote it
      final/                        rgemma model dir of the last step

Dimension letters: b batch, t time (seq_len), v vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import GriffinConfig, config_diff, griffin_pattern
from .device import resolve_device
from .errors import CheckpointError, ConfigError, InputError, RgemmaError
from .io import atomic_dir, atomic_path
from .scoring import Score, score_documents

__all__ = [
    "TrainConfig",
    "TrainingDiverged",
    "evaluate",
    "find_checkpoints",
    "latest_checkpoint",
    "lr_at",
    "masked_loss",
    "param_groups",
    "token_byte_lengths",
    "train",
]

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_RE = re.compile(r"^step_(\d{7,})$")
LATEST_NAME = "latest"
METRICS_NAME = "metrics.jsonl"
TRAIN_CONFIG_NAME = "train_config.json"
TRAINER_STATE_PT = "trainer_state.pt"
TRAINER_STATE_JSON = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
MODEL_SUBDIR = "model"
FINAL_DIR = "final"

# Parameter names (suffixes) that get no weight decay: the official recipe leaves
# norms, biases, the embedding and the RG-LRU decay parameter undecayed.
NO_DECAY_SUFFIXES = (".scale", ".bias", ".b", "a_param")
NO_DECAY_NAMES = ("embedder.input_embedding",)


class TrainingDiverged(RgemmaError):
    """The training loss became NaN or infinite (the step range is named)."""


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
        batch_size: sequences per micro-batch b.
        grad_accum: micro-batches per optimiser step; the step's loss is the sum of
            the masked token losses over all of them divided by their count.
        max_steps: optimiser steps of the whole run (the cosine ends here).
        lr: peak learning rate; min_lr: the cosine's floor.
        warmup_steps: linear warm-up from 0 over this many steps.
        weight_decay: AdamW decoupled weight decay of the decayed group.
        beta1, beta2, eps: AdamW's.
        grad_clip: clip the global gradient norm to this (0: no clipping).
        bf16: run forward/backward under bfloat16 autocast (parameters, optimiser
            state, RG-LRU recurrence and loss stay float32).
        gradient_checkpointing: recompute each block in the backward pass.
        device: "cpu", "cuda", "cuda:1", or "auto" (cuda if available).
        num_threads: torch CPU threads (None: torch's default).
        seed: seeds the initialisation, the data order and the RNGs.
        out_dir: where checkpoints, metrics and the final model go.
        save_every: checkpoint every this many steps (0: only at the end).
        keep_last: how many step checkpoints to keep (>= 1).
        eval_every: evaluate every this many steps (0: only at the end).
        eval_batches: the evaluation's budget: validation documents are scored
            whole (`evaluate`), up to `eval_batches * batch_size * seq_len` tokens
            (None: all of them).
        log_every: log the training loss every this many steps.
        resume: continue from the newest complete checkpoint in `out_dir` (a fresh
            start if there is none).
        progress: show a tqdm progress bar.
        save_final: write `out_dir/final/` at the end of the run.
    """

    model: str | dict[str, Any] | None = None
    init_from: str | None = None
    tokenizer: str | None = None
    train_data: list[str] = dataclasses.field(default_factory=list)
    val_data: list[str] = dataclasses.field(default_factory=list)
    val_fraction: float = 0.01
    doc_chars: int | None = 16_000
    seq_len: int = 256
    max_seq_len: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
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
        need_int("num_threads", 1, optional=True)
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
        for name in ("bf16", "gradient_checkpointing", "resume", "progress", "save_final"):
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


def masked_loss(logits: Tensor, targets: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy over the masked positions, in float32.

    Args:
        logits: (b, t, v) float.
        targets: (b, t) int64 target ids.
        loss_mask: (b, t) float, 1 where the target is learned.

    Returns:
        (sum of the masked negative log-likelihoods in nats, number of masked
        positions), both float32 scalars. The mean loss is their ratio.
    """
    v = logits.shape[-1]
    nll = F.cross_entropy(
        logits.reshape(-1, v).float(), targets.reshape(-1), reduction="none"
    )  # (b * t,)
    mask = loss_mask.reshape(-1).float()
    return (nll * mask).sum(), mask.sum()


def token_byte_lengths(tokenizer: Any) -> Tensor:
    """UTF-8 length in bytes of each vocabulary piece, for bits per byte.

    Byte-fallback pieces count 1, control pieces (`<pad>`, `<bos>`, `<eos>`) and
    `<unk>` 0, other pieces the bytes of their text (`▁` is a space). The sum over a
    document's tokens is the byte length of its text.

    Returns:
        (vocab_size,) float64.
    """
    sp = tokenizer.sp
    lengths = []
    for i in range(sp.vocab_size()):
        if sp.is_byte(i):
            lengths.append(1)
        elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            lengths.append(0)
        else:
            lengths.append(len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")))
    return torch.tensor(lengths, dtype=torch.float64)


def _autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if not cfg.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def evaluate(
    model: nn.Module,
    documents: Any,
    *,
    max_tokens: int | None = None,
    byte_lengths: Tensor | None = None,
    chunk_size: int = 1024,
    batch_size: int = 1,
    bf16: bool = False,
) -> dict[str, float]:
    """Held-out loss: validation documents scored whole over the model's state.

    Each document is scored from its `<bos>` on, in chunks of `chunk_size` tokens,
    by `rgemma.scoring` (the scorer of `scripts/eval_bundled.py` and `rgemma eval`),
    on the tokens it trains on (`TokenizedDocument.trainable`: every token of a
    text, only completions or model turns of fine-tuning data). Unlike the packed
    training sequences, no document is cut at `seq_len`: the figure is the model's
    perplexity on whole documents.

    Args:
        model: a `Griffin` (put in eval mode for the call, then restored).
        documents: a validation `data.PackedDataset` (its `docs` are scored; its
            iteration position is not touched) or a list of `TokenizedDocument`.
        max_tokens: score at most this many tokens: documents in order, the last
            one cut to fit (None: all).
        byte_lengths: `token_byte_lengths(tokenizer)`, to report bits per byte.
        chunk_size: tokens per forward call per document.
        batch_size: documents scored together.
        bf16: evaluate under bfloat16 autocast (on the model's device).

    Returns:
        `val_loss` (nats per scored token), `val_ppl` (exp of it), `val_tokens`, and
        `val_bpb` (total nats / ln 2 / total UTF-8 bytes of the scored tokens) when
        `byte_lengths` is given.
    """
    docs = list(getattr(documents, "docs", documents))
    if max_tokens is not None:
        kept, budget = [], max_tokens
        for d in docs:
            if budget <= 0:
                break
            if len(d.tokens) - 1 > budget:
                d = type(d)(d.tokens[: budget + 1], d.trainable[: budget + 1])
            kept.append(d)
            budget -= len(d.tokens) - 1
        docs = kept
    num_bytes = None
    if byte_lengths is not None:
        num_bytes = [
            int(byte_lengths[torch.from_numpy(d.tokens[d.trainable].astype(np.int64))].sum())
            for d in docs
        ]
    device = next(model.parameters()).device
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with ctx:
            scores = score_documents(
                model,
                [d.tokens for d in docs],
                masks=[d.trainable for d in docs],
                num_bytes=num_bytes,
                chunk_size=chunk_size,
                batch_size=batch_size,
            )
    finally:
        model.train(was_training)
    total = sum(scores, Score())
    loss = total.nll_per_token if total.tokens else 0.0
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": total.tokens}
    if byte_lengths is not None and total.bytes > 0:
        out["val_bpb"] = total.bits_per_byte
    return out


# ----------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------
def checkpoint_name(step: int) -> str:
    """`step_0000123`."""
    return f"step_{step:07d}"


def _step_dirs(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Directories named `step_XXXXXXX` under `out_dir/checkpoints`, as (step, path),
    oldest first, complete or not."""
    root = Path(out_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = CHECKPOINT_RE.match(entry.name)
        if m and entry.is_dir():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def find_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `out_dir/checkpoints`, as (step, path), oldest first.

    Only directories named `step_XXXXXXX` count (temporary `.tmp-*` ones are
    incomplete by construction); one without all its files, or with a truncated
    weights, optimizer or trainer-state file, is skipped.
    """
    return [(step, path) for step, path in _step_dirs(out_dir) if _is_complete(path)]


def _is_complete(path: Path) -> bool:
    from .checkpoint import RGEMMA_CONFIG_NAME, WEIGHTS_NAME

    needed = [
        path / TRAINER_STATE_PT,
        path / OPTIMIZER_NAME,
        path / TRAIN_CONFIG_NAME,
        path / MODEL_SUBDIR / RGEMMA_CONFIG_NAME,
        path / MODEL_SUBDIR / WEIGHTS_NAME,
    ]
    if not all(p.is_file() for p in needed):
        return False
    # A file cut short (a crash or a full disk while copying a run) counts as missing.
    if not _safetensors_intact(path / MODEL_SUBDIR / WEIGHTS_NAME):
        return False
    return all(zipfile.is_zipfile(p) for p in needed[:2])


def _safetensors_intact(path: Path) -> bool:
    """Whether a .safetensors file's header parses and its data fits in the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return False
            header = json.loads(f.read(n))
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
        return 8 + n + end <= size
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def damaged_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories (`step_XXXXXXX`) under `out_dir` that are incomplete
    or have a truncated file, oldest first; `find_checkpoints` skips them."""
    return [path for _, path in _step_dirs(out_dir) if not _is_complete(path)]


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory under `out_dir`, or None."""
    found = find_checkpoints(out_dir)
    return found[-1][1] if found else None


def clean_incomplete(out_dir: str | os.PathLike) -> list[Path]:
    """Remove leftovers of interrupted checkpoint writes (`.tmp-*`, `.old-*`,
    `.del-*` directories under `out_dir/checkpoints`). Returns what was removed."""
    root = Path(out_dir) / CHECKPOINT_DIR
    removed = []
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith((".tmp-", ".old-", ".del-")):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()
                removed.append(entry)
    return removed


def _fsync_tree(path: str) -> None:
    """fsync every file under `path` (so a renamed checkpoint survives power loss)."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), *npst[2:]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    data_state: Mapping[str, Any],
    tokens_seen: int,
    tokenizer_path: str | os.PathLike | None,
    device: torch.device,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` atomically, update `latest`, prune to `keep_last`.

    Everything goes into a temporary directory beside the final one, which is
    fsynced and renamed into place only when complete; a crash at any point
    leaves the earlier checkpoints untouched and at most a `.tmp-*` directory,
    which `clean_incomplete` removes.

    Returns:
        the checkpoint directory.
    """
    from .checkpoint import save_model

    root = Path(out_dir) / CHECKPOINT_DIR
    path = root / checkpoint_name(step)
    info = {
        "step": step,
        "tokens_seen": tokens_seen,
        "data": dict(data_state),
        "time": time.time(),
        **dict(extra or {}),
    }
    with atomic_dir(path) as tmp:
        save_model(model, os.path.join(tmp, MODEL_SUBDIR), tokenizer_path=tokenizer_path)
        with open(os.path.join(tmp, TRAIN_CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(cfg.to_json() + "\n")
        torch.save(optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_NAME))
        with open(os.path.join(tmp, TRAINER_STATE_JSON), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, default=str)
            f.write("\n")
        # Written last: a checkpoint directory is complete iff it has this file.
        torch.save({**info, "rng": _rng_state(device)}, os.path.join(tmp, TRAINER_STATE_PT))
        _fsync_tree(tmp)
    with atomic_path(root / LATEST_NAME) as tmp_latest:
        Path(tmp_latest).write_text(path.name + "\n", encoding="utf-8")
    # Prune: move aside first (one rename), so a half-deleted directory never
    # carries a checkpoint name.
    found = find_checkpoints(out_dir)
    for _, old in found[: max(0, len(found) - cfg.keep_last)]:
        trash = root / f".del-{old.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return path


def _load_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / TRAINER_STATE_PT, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise CheckpointError(f"cannot read {path / TRAINER_STATE_PT}: {err}") from None


# ----------------------------------------------------------------------------------
# Setup helpers
# ----------------------------------------------------------------------------------
def _warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"rgemma: warning: {message}", file=sys.stderr, flush=True)


def _build_data(cfg: TrainConfig, tokenizer: Any) -> tuple[Any, Any]:
    """(train PackedDataset, validation PackedDataset or None): `data.build_datasets`
    on the config's data fields."""
    from .data import build_datasets

    if not cfg.train_data:
        raise ConfigError("TrainConfig.train_data is empty: give files, directories or globs")
    return build_datasets(
        cfg.train_data,
        tokenizer,
        cfg.seq_len,
        cfg.batch_size,
        val_paths=cfg.val_data,
        val_fraction=cfg.val_fraction,
        doc_chars=cfg.doc_chars,
        seed=cfg.seed,
    )


def _requested_model_config(cfg: TrainConfig) -> GriffinConfig | None:
    return model_config_from(cfg.model) if cfg.model is not None else None


def _build_model(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, str | None]:
    """A fresh or `init_from` model in float32 on `device`, and the tokenizer path
    found beside `init_from` (or None)."""
    from .checkpoint import load_model
    from .model import Griffin

    declared = _requested_model_config(cfg)
    if cfg.init_from is not None:
        model = load_model(cfg.init_from, dtype=torch.float32, device=device, config=declared)
        model.requires_grad_(True)  # load_model returns an inference model
        tok = getattr(model, "source", {}).get("tokenizer")
        return model, tok
    torch.manual_seed(cfg.seed)
    model = Griffin(declared, dtype=torch.float32)
    return model.to(device), None


def _write_metrics(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric records after `step` (they were logged by a run that died before
    its next checkpoint, and the resumed run logs them again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if rec.get("step", 0) <= step:
            kept.append(line)
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(k + "\n" for k in kept), encoding="utf-8")


def _check_resume_compatible(ckpt: Path, cfg: TrainConfig, ckpt_model_cfg: GriffinConfig) -> None:
    """Raise ConfigError if this run's model differs from the checkpoint's."""
    saved = read_config_file(ckpt / TRAIN_CONFIG_NAME)
    requested = _requested_model_config(cfg)
    if requested is None and cfg.init_from is not None:
        if saved.get("init_from") == cfg.init_from:
            return  # the same starting checkpoint, hence the same config
        from .checkpoint import load_model

        requested = load_model(cfg.init_from, dtype=torch.float32).config
    diffs = config_diff(ckpt_model_cfg, requested)
    if diffs:
        raise ConfigError(
            f"cannot resume from {ckpt}: its model config differs from this run's in "
            f"{len(diffs)} field(s) (checkpoint vs this config): " + "; ".join(diffs)
        )


# ----------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------
def train(config: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Train or fine-tune a Griffin model as described by `config`.

    Args:
        config: a `TrainConfig` (or a dict for `TrainConfig.from_dict`).

    Returns:
        dict with `step` (optimiser steps done), `tokens_seen`, `losses` (list of
        [step, loss] of every step run in this call, loss in nats per target
        token), `train_loss` (the last step's), `val_loss`, `val_ppl`, `val_bpb`
        (last evaluation, if any), `tokens_per_s` (training throughput of this
        call), `elapsed_s`, `out_dir`, `checkpoint` (newest checkpoint dir) and
        `final_dir` (or None).

    Raises:
        ConfigError: invalid config; a resume directory whose model config differs
            (the differing fields are named).
        InputError: bad data (empty or non-UTF-8 files, bad JSONL lines: the file
            and line are named), a data position that does not fit the data.
        CheckpointError: an unreadable `init_from` or resume checkpoint.
    """
    from .checkpoint import load_model
    from .tokenizer import BUNDLED_TOKENIZER_PATH, Tokenizer

    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    cfg.validate()
    device = resolve_device(cfg.device, what="TrainConfig.device", error=ConfigError)
    out_dir = Path(cfg.out_dir)
    metrics_path = out_dir / METRICS_NAME

    old_threads = torch.get_num_threads()
    # Denormal floats (tiny gradients, Adam moments) slow CPU math by 10x or more;
    # flushing them to zero changes nothing measurable in training. Reset to torch's
    # default (off) on the way out.
    torch.set_flush_denormal(True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        # -- resume point -----------------------------------------------------------
        ckpt: Path | None = None
        if cfg.resume:
            clean_incomplete(out_dir)
            ckpt = latest_checkpoint(out_dir)
            for bad in damaged_checkpoints(out_dir):
                if ckpt is None or bad.name > ckpt.name:
                    _warn(
                        f"checkpoint {bad} is incomplete or truncated: skipped"
                        + (f", resuming from {ckpt.name}" if ckpt is not None else "")
                    )
            if ckpt is None:
                _warn(f"no checkpoint in {out_dir}: starting from scratch")
        elif find_checkpoints(out_dir):
            raise ConfigError(
                f"{out_dir} already holds checkpoints of a run; continue it with "
                "resume=true (--resume), or choose another out_dir (--out)"
            )

        # -- model ------------------------------------------------------------------
        init_tok: str | None = None
        if ckpt is not None:
            model = load_model(ckpt / MODEL_SUBDIR, dtype=torch.float32, device=device)
            _check_resume_compatible(ckpt, cfg, model.config)
            init_tok = getattr(model, "source", {}).get("tokenizer")
        else:
            model, init_tok = _build_model(cfg, device)
        model_cfg: GriffinConfig = model.config
        model.train()
        model.requires_grad_(True)  # `load_model` returns a frozen (inference) model
        model.gradient_checkpointing = cfg.gradient_checkpointing

        # -- tokenizer and data -----------------------------------------------------
        tok_path = cfg.tokenizer or init_tok or str(BUNDLED_TOKENIZER_PATH)
        tokenizer = Tokenizer(tok_path)
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise ConfigError(
                f"tokenizer {tok_path} has {tokenizer.vocab_size} pieces but the model's "
                f"vocab_size is {model_cfg.vocab_size}"
            )
        train_set, val_set = _build_data(cfg, tokenizer)
        byte_lengths = token_byte_lengths(tokenizer)

        # -- optimiser --------------------------------------------------------------
        groups = param_groups(model, cfg.weight_decay)
        optimizer = torch.optim.AdamW(
            groups,
            lr=lr_at(0, cfg),
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            foreach=True,
        )

        step, tokens_seen = 0, 0
        if ckpt is not None:
            state = _load_trainer_state(ckpt)
            try:
                opt_state = torch.load(
                    ckpt / OPTIMIZER_NAME, map_location=device, weights_only=True
                )
                optimizer.load_state_dict(opt_state)
            except Exception as err:  # noqa: BLE001
                raise CheckpointError(f"cannot restore {ckpt / OPTIMIZER_NAME}: {err}") from None
            try:
                train_set.load_state_dict(state["data"])
            except InputError as err:
                raise InputError(f"cannot resume from {ckpt}: {err}") from None
            step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
            _set_rng_state(state["rng"], device)
            _truncate_metrics(metrics_path, step)
        else:
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
            clean_incomplete(out_dir)
            with contextlib.suppress(FileNotFoundError):
                metrics_path.unlink()  # of an earlier attempt that saved no checkpoint
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_dir / TRAIN_CONFIG_NAME) as tmp:
            Path(tmp).write_text(cfg.to_json() + "\n", encoding="utf-8")

        start_record = {
            "event": "start" if ckpt is None else "resume",
            "step": step,
            "resumed_from": str(ckpt) if ckpt else None,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "train_tokens_per_epoch": train_set.num_tokens,
            "val_tokens": val_set.num_tokens if val_set is not None else 0,
            "device": str(device),
            "threads": torch.get_num_threads(),
        }
        _write_metrics(metrics_path, start_record)

        result = _loop(
            cfg,
            model,
            optimizer,
            train_set,
            val_set,
            byte_lengths,
            device,
            step,
            tokens_seen,
            tok_path,
            metrics_path,
            ckpt,
        )
        return result
    finally:
        torch.set_num_threads(old_threads)
        torch.set_flush_denormal(False)


def _loop(
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_set: Any,
    val_set: Any,
    byte_lengths: Tensor,
    device: torch.device,
    step: int,
    tokens_seen: int,
    tok_path: str,
    metrics_path: Path,
    ckpt: Path | None,
) -> dict[str, Any]:
    """The optimisation loop from `step` to `cfg.max_steps` (see `train`)."""
    from tqdm import tqdm

    out_dir = Path(cfg.out_dir)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    losses: list[list[float]] = []
    pending: list[tuple[int, Tensor, Tensor, float]] = []  # (step, loss, grad norm, lr)
    last_eval: dict[str, float] = {}
    last_ckpt = ckpt
    start_step = step
    t_start = time.perf_counter()
    train_time = 0.0  # seconds spent in training steps (no evaluation, no checkpointing)
    time_at_log, tokens_at_log = train_time, tokens_seen

    def do_eval() -> None:
        nonlocal last_eval
        if val_set is None:
            return
        t0 = time.perf_counter()
        budget = cfg.eval_batches
        last_eval = evaluate(
            model,
            val_set,
            max_tokens=None if budget is None else budget * cfg.batch_size * cfg.seq_len,
            byte_lengths=byte_lengths,
            chunk_size=cfg.seq_len,
            batch_size=cfg.batch_size,
            bf16=cfg.bf16,
        )
        record = {
            "event": "eval",
            "step": step,
            **last_eval,
            "eval_s": round(time.perf_counter() - t0, 3),
        }
        _write_metrics(metrics_path, record)
        bar.write(
            f"step {step}: val_loss {last_eval['val_loss']:.4f} "
            f"ppl {last_eval['val_ppl']:.2f}"
            + (f" bpb {last_eval['val_bpb']:.4f}" if "val_bpb" in last_eval else "")
        )

    def flush_logs() -> None:
        nonlocal time_at_log, tokens_at_log
        if not pending:
            return
        now = time.perf_counter()
        vals = torch.stack([p[1] for p in pending]).tolist()
        norms = torch.stack([p[2] for p in pending]).tolist()
        for (s, _, _, _), v in zip(pending, vals):
            losses.append([s, v])
        if not all(math.isfinite(v) for v in vals):
            raise TrainingDiverged(
                f"training loss is not finite at step {pending[0][0]}..{pending[-1][0]}: "
                f"{vals}; lower lr, or enable grad_clip"
            )
        tok_s = (tokens_seen - tokens_at_log) / max(train_time - time_at_log, 1e-9)
        record = {
            "event": "train",
            "step": pending[-1][0],
            "loss": vals[-1],
            "loss_avg": sum(vals) / len(vals),
            "grad_norm": norms[-1],
            "lr": pending[-1][3],
            "tokens_seen": tokens_seen,
            "tokens_per_s": round(tok_s, 1),
            "elapsed_s": round(now - t_start, 3),
        }
        _write_metrics(metrics_path, record)
        bar.set_postfix(loss=f"{vals[-1]:.4f}", tok_s=f"{tok_s:.0f}", refresh=False)
        pending.clear()
        time_at_log, tokens_at_log = train_time, tokens_seen

    def do_save() -> None:
        nonlocal last_ckpt
        flush_logs()
        last_ckpt = save_checkpoint(
            out_dir,
            step,
            model=model,
            optimizer=optimizer,
            cfg=cfg,
            data_state=train_set.state_dict(),
            tokens_seen=tokens_seen,
            tokenizer_path=tok_path,
            device=device,
            extra={"val": last_eval} if last_eval else None,
        )

    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        disable=not (cfg.progress and sys.stderr.isatty()),
        desc="train",
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    data_iter = iter(train_set)
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [next(data_iter) for _ in range(cfg.grad_accum)]
            # Normalise by the number of target tokens of the whole step, so the
            # gradient is that of the mean loss over all of them (sum / count).
            count = sum(b.loss_mask.sum() for b in micro).to(device).clamp(min=1.0)
            step_loss = torch.zeros((), device=device)
            for b in micro:
                with _autocast(cfg, device):
                    logits, _ = model(b.tokens.to(device), b.segment_pos.to(device), validate=False)
                nll_sum, _ = masked_loss(logits, b.targets.to(device), b.loss_mask.to(device))
                loss = nll_sum / count
                loss.backward()
                step_loss += loss.detach()
                del logits, loss
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
            else:  # an infinite max norm measures without clipping (factor exactly 1)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, math.inf, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            train_time += time.perf_counter() - t0
            pending.append((step, step_loss, grad_norm.detach(), lr))
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                flush_logs()
            bar.update(1)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                do_eval()
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                do_save()
        flush_logs()
        if step > start_step or not last_eval:
            do_eval()
        if last_ckpt is None or step > start_step:
            do_save()
    finally:
        bar.close()

    final_dir = None
    if cfg.save_final:
        from .checkpoint import save_model

        final_dir = save_model(model, out_dir / FINAL_DIR, tokenizer_path=tok_path)
    elapsed = time.perf_counter() - t_start
    trained_tokens = (step - start_step) * tokens_per_step
    result = {
        "step": step,
        "tokens_seen": tokens_seen,
        "losses": losses,
        "train_loss": losses[-1][1] if losses else None,
        "val_loss": last_eval.get("val_loss"),
        "val_ppl": last_eval.get("val_ppl"),
        "val_bpb": last_eval.get("val_bpb"),
        "tokens_per_s": trained_tokens / train_time if train_time > 0 else None,
        "elapsed_s": elapsed,
        "out_dir": str(out_dir),
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "final_dir": str(final_dir) if final_dir else None,
    }
    _write_metrics(
        metrics_path, {"event": "end", **{k: v for k, v in result.items() if k != "losses"}}
    )
    return result
