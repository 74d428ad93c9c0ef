"""Training checkpoints: atomic step directories, finding and pruning them, RNG
state."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError
from ..io import atomic_dir, atomic_path
from .config import TrainConfig

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_RE = re.compile(r"^step_(\d{7,})$")
LATEST_NAME = "latest"

TRAIN_CONFIG_NAME = "train_config.json"
TRAINER_STATE_PT = "trainer_state.pt"
TRAINER_STATE_JSON = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
MODEL_SUBDIR = "model"
FINAL_DIR = "final"


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
    from ..checkpoint import RGEMMA_CONFIG_NAME, WEIGHTS_NAME

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
    from ..checkpoint import save_model

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
