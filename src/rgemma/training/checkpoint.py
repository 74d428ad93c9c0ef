"""Training checkpoints: sharded (`torch.distributed.checkpoint`), atomic, resumable
on any number of processes.

A checkpoint is the directory `out_dir/checkpoints/step_XXXXXXX/`:

    dcp/                  a torch.distributed.checkpoint (DCP) directory: `.metadata`
                          and one `__R_0.distcp` file per rank R. Keys:
                          `model.<parameter name>`: the trainable parameters (all of
                          them; only the `lora_A` / `lora_B` adapters under LoRA, the
                          frozen base being the run's `init_from`), named as
                          `named_parameters` names them (the official keys, except
                          the MLP's `ffw_up.gate_proj.*` / `ffw_up.up_proj.*`);
                          `optim.state.<name>.<exp_avg | exp_avg_sq | step>` and
                          `optim.param_groups.<name>.<lr | ...>`: AdamW, keyed by
                          parameter name, never by position
    rng/rank_00000.pt     the torch, Python, numpy (and CUDA) RNG states of rank 0;
                          one file per rank
    trainer_state.pt      step, tokens seen, data position (`train_set.state_dict()`,
                          tensors allowed), world size (written by rank 0)
    trainer_state.json    the same without tensors and RNG, human-readable
    train_config.json     the TrainConfig of the run that wrote it
    rgemma_config.json    the model's GriffinConfig, as `save_model` writes it
    tokenizer.model       the run's tokenizer
    COMPLETE              written last: step, world size and the size of every file

The learning rate is a function of the step (`optim.lr_at`), so the step is the
scheduler's whole state.

Writing (`save_checkpoint`, called by every rank at the same step): rank 0 makes
`.tmp-step_XXXXXXX` beside the final directory; every rank writes its DCP shard and
its RNG file into it (fsynced), rank 0 the small files; the ranks agree (one
all-reduce) that every write succeeded; rank 0 writes `COMPLETE`, fsyncs and
renames the directory to `step_XXXXXXX` in one `os.replace`, then rewrites
`latest` and prunes to `keep_last` (each old checkpoint is renamed aside before it
is deleted). So a directory named `step_XXXXXXX` is complete whatever moment any
rank is killed; `clean_incomplete` removes the `.tmp-*`, `.old-*` and `.del-*`
leftovers. A write that fails (a full disk: ENOSPC, EDQUOT, EFBIG) removes the
temporary directory and raises a one-line `CheckpointError` on every rank, naming
the directory and the bytes the checkpoint needs; the previous checkpoint is left
as it was. `out_dir` must be on a filesystem every rank sees (as DCP needs: rank 0
writes the metadata of all shards and publishes the directory).

Resuming (`load_checkpoint`): DCP reshards the model and optimizer onto whatever
the current run is (one process without a process group, DDP, FSDP2 on any number
of ranks). Rank r restores the RNG file of rank r, so a resume on as many ranks
continues every random stream (LoRA dropout) exactly. On more ranks than the
checkpoint was written by, a rank without a file seeds its RNGs from (TrainConfig
seed, step, rank): a stream of its own, reproducible. (On another number of ranks
the rows of a batch meet other ranks' streams, so dropout masks differ from the
uninterrupted run's; without dropout, training draws no random numbers and the
losses do not depend on the RNGs. The data order is the data set's, restored from
its position.)

`load_checkpoint_model` (behind `rgemma.load_model` and `rgemma convert`) reads the
model out of a checkpoint, a `checkpoints/` directory or a run directory (its newest
complete checkpoint) as a plain `Griffin`, without a process group.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from ..io import atomic_path
from .config import TrainConfig

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_RE = re.compile(r"^step_(\d{7,})$")
LATEST_NAME = "latest"

TRAIN_CONFIG_NAME = "train_config.json"
TRAINER_STATE_PT = "trainer_state.pt"
TRAINER_STATE_JSON = "trainer_state.json"
COMPLETE_NAME = "COMPLETE"
DCP_SUBDIR = "dcp"
RNG_SUBDIR = "rng"
FINAL_DIR = "final"
TMP_PREFIX = ".tmp-"
LEFTOVER_PREFIXES = (TMP_PREFIX, ".old-", ".del-")

#: errno values of a full disk, a full quota and a file-size limit (RLIMIT_FSIZE).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

#: Test hook, read only by `save_checkpoint`: "RANK:STEP" makes that rank stall
#: (sleep for an hour) inside the save of that step, after its shard is written and
#: before the checkpoint is published, so that a test can kill the run there.
STALL_ENV = "RGEMMA_TEST_CKPT_STALL"

# Key groups of the DCP state dict.
_MODEL, _OPTIM = "model", "optim"


def _warn(message: str) -> None:
    print(f"rgemma: warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------
# Finding checkpoints
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


def is_complete(path: str | os.PathLike) -> bool:
    """Whether `path` is a complete training checkpoint: its `COMPLETE` marker parses
    and every file it lists (the DCP `.metadata` and shards, the trainer state, each
    rank's RNG file, ...) exists with the size it had when the checkpoint was written,
    so a file cut short (a crash or a full disk while copying a run) makes it
    incomplete."""
    path = Path(path)
    try:
        marker = json.loads((path / COMPLETE_NAME).read_text(encoding="utf-8"))
        files = marker["files"]
        needed = {f"{DCP_SUBDIR}/.metadata", TRAINER_STATE_PT, TRAIN_CONFIG_NAME}
        if not needed <= files.keys():
            return False
        return all((path / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def find_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `out_dir/checkpoints`, as (step, path), oldest first.

    Only directories named `step_XXXXXXX` count (temporary `.tmp-*` ones are
    incomplete by construction); one that `is_complete` rejects is skipped.
    """
    return [(step, path) for step, path in _step_dirs(out_dir) if is_complete(path)]


def damaged_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories (`step_XXXXXXX`) under `out_dir` that are incomplete
    or have a truncated file, oldest first; `find_checkpoints` skips them."""
    return [path for _, path in _step_dirs(out_dir) if not is_complete(path)]


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory under `out_dir`, or None. (The
    `latest` file is a hint for people; this scans the directories.)"""
    found = find_checkpoints(out_dir)
    return found[-1][1] if found else None


def clean_incomplete(out_dir: str | os.PathLike) -> list[Path]:
    """Remove leftovers of interrupted checkpoint writes (`.tmp-*`, `.old-*`,
    `.del-*` entries under `out_dir/checkpoints`). Returns what was removed.

    Call it on rank 0 only, before any rank starts writing a checkpoint."""
    root = Path(out_dir) / CHECKPOINT_DIR
    removed = []
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(LEFTOVER_PREFIXES):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()
                removed.append(entry)
    return removed


def resolve_checkpoint(path: str | os.PathLike) -> Path | None:
    """The training checkpoint `path` names, or None if it names none.

    `path` may be a checkpoint (`.../checkpoints/step_XXXXXXX`), a `checkpoints`
    directory or a run directory (`out_dir`): the last two give their newest complete
    checkpoint.

    Raises:
        CheckpointError: a checkpoint directory that is incomplete or truncated; a
            run or `checkpoints` directory without a complete checkpoint.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    started = (path / DCP_SUBDIR).is_dir() or (path / TRAINER_STATE_PT).is_file()
    if (path / COMPLETE_NAME).exists() or (CHECKPOINT_RE.match(path.name) and started):
        if not is_complete(path):
            raise CheckpointError(
                f"training checkpoint {path} is incomplete or has a truncated file "
                f"(its {COMPLETE_NAME} marker does not match its files)"
            )
        return path
    run_dir = path.parent if path.name == CHECKPOINT_DIR else path
    if not (run_dir / CHECKPOINT_DIR).is_dir():
        return None
    newest = latest_checkpoint(run_dir)
    if newest is None:
        raise CheckpointError(f"run directory {run_dir} has no complete checkpoint")
    return newest


# ----------------------------------------------------------------------------------
# Process group helpers (a single process without one is world size 1)
# ----------------------------------------------------------------------------------
def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest `value` over all ranks (an all-reduce, so also a barrier; `value`
    itself without a process group). The tensor lives on `device` if it is a GPU
    (NCCL), else on the CPU (gloo)."""
    import torch.distributed as dist

    if not _distributed():
        return value
    where = device if device.type == "cuda" else torch.device("cpu")  # NCCL or gloo
    t = torch.tensor([value], dtype=torch.int64, device=where)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """Silence DCP's warning that it saves or loads in a single process (the intent
    here whenever there is no process group)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        yield


# ----------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------
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


def _seed_rngs(seed: int, step: int, rank: int) -> None:
    """Seed torch, Python and numpy from (seed, step, rank): a stream of its own for a
    rank the checkpoint has no RNG file for."""
    (derived,) = np.random.SeedSequence([seed, step, rank]).generate_state(1)
    torch.manual_seed(int(derived))
    random.seed(int(derived))
    np.random.seed(int(derived))


def _rng_file(rank: int) -> str:
    return f"{RNG_SUBDIR}/rank_{rank:05d}.pt"


# ----------------------------------------------------------------------------------
# State dicts
# ----------------------------------------------------------------------------------
def _optim_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # A flat optimizer state keyed by parameter name reshards like the model.
    return StateDictOptions(flatten_optimizer_state_dict=True)


def _griffin(model: nn.Module) -> nn.Module:
    """The `Griffin` inside a DDP or `torch.compile` wrapper (FSDP2 wraps nothing)."""
    from torch.nn.parallel import DistributedDataParallel

    model = getattr(model, "_orig_mod", model)
    if isinstance(model, DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _model_state(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters by `named_parameters` name (the official names, but
    `ffw_up.gate_proj.*` / `ffw_up.up_proj.*` for the MLP's halves, and
    `....lora_A.weight` / `....lora_B.weight` for LoRA adapters), detached views of
    the parameters themselves: DCP saves them as they are and loads into them in
    place. This rank's shards (DTensors) under FSDP2.

    Parameters, not `state_dict()`: the official keys' `ffw_up.w` is a stacked copy
    of two parameters (no place to load into, and a frozen base under LoRA would be
    saved with it).
    """
    return {n: p.detach() for n, p in _griffin(model).named_parameters() if p.requires_grad}


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model": trainable parameters, "optim": flat optimizer state}, both keyed by
    parameter name; DTensors under FSDP2 (each rank holds its shards)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    griffin = _griffin(model)
    optim_sd = get_optimizer_state_dict(griffin, optimizer, options=_optim_options())
    return {_MODEL: _model_state(griffin), _OPTIM: optim_sd}


def _nbytes(tree: Mapping[str, Any]) -> int:
    """Bytes of the tensors in a (nested) state dict, counting a DTensor's whole
    (global) size."""
    total = 0
    for value in tree.values():
        if isinstance(value, Mapping):
            total += _nbytes(value)
        elif isinstance(value, Tensor):
            total += value.numel() * value.element_size()
    return total


def _human(n: float) -> str:
    """`1.9 MB`: bytes in decimal units."""
    if n < 1000:
        return f"{n:.0f} bytes"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            break
    return f"{n:.1f} {unit}"


def _dcp_failure(err: BaseException) -> BaseException:
    """The first underlying exception of a DCP `CheckpointException` (which wraps
    what each rank raised), or `err` itself."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, Mapping) and failures:
        first = failures[min(failures)]
        if isinstance(first, tuple) and first and isinstance(first[0], BaseException):
            return first[0]
    return err


# ----------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------
def _fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so the names created or renamed in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _jsonable(tree: Mapping[str, Any]) -> dict[str, Any]:
    """`tree` without its tensors (for the human-readable trainer state)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out[key] = _jsonable(value)
        elif not isinstance(value, Tensor):
            out[key] = value
    return out


def _stall_for_test(rank: int, step: int) -> None:
    spec = os.environ.get(STALL_ENV)
    if spec and spec == f"{rank}:{step}":
        time.sleep(3600)


class _Phase:
    """Runs one phase of a checkpoint write on every rank and makes every rank raise
    if the phase failed on any (so none is left waiting in a collective)."""

    OK, FAILED, DISK_FULL = 0, 1, 2  # the largest over the ranks wins

    def __init__(self, tmp: Path, final: Path, needed: int, device: torch.device):
        self.tmp, self.final, self.needed, self.device = tmp, final, needed, device

    def run(self, fn, *args: Any) -> None:
        from torch.distributed.checkpoint.api import CheckpointException

        error: BaseException | None = None
        try:
            fn(*args)
        except OSError as err:
            error = err
        except CheckpointException as err:  # what DCP raises on every rank
            error = _dcp_failure(err)
            if isinstance(error, KeyboardInterrupt):
                raise error from None  # a second Ctrl-C while DCP was writing
        # Anything else (a bug, KeyboardInterrupt) propagates: `save_checkpoint`
        # removes the temporary directory.
        full = isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS
        code = self.DISK_FULL if full else self.OK if error is None else self.FAILED
        worst = max_over_ranks(code, self.device)
        if worst == self.OK:
            return
        rank, _ = _rank_world()
        if rank == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)
        root = self.final.parent
        previous = latest_checkpoint(root.parent)
        kept = (
            f"the previous checkpoint {previous} is intact"
            if previous is not None
            else "there is no earlier checkpoint"
        )
        if worst == self.DISK_FULL:
            try:
                free = f"{_human(shutil.disk_usage(root).free)} free there"
            except OSError:
                free = "free space unknown"
            why = os.strerror(error.errno) if full else "disk full on another rank"
            raise CheckpointError(
                f"no room to write checkpoint {self.final.name} in {root} ({why}): it "
                f"needs about {_human(self.needed)}, {free}; {kept}"
            ) from None
        if error is not None:
            detail = " ".join(str(error).split()) or type(error).__name__
            raise CheckpointError(
                f"cannot write checkpoint {self.final.name} in {root}: {detail}; {kept}"
            ) from error
        raise CheckpointError(
            f"writing checkpoint {self.final.name} in {root} failed on another rank "
            f"(see its error); {kept}"
        )


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
    previous: Path | None = None,
    base_fingerprint: str | None = None,
) -> Path:
    """Write checkpoint `step` atomically, update `latest`, prune to `keep_last`.

    Every rank calls it at the same step (it is a collective under torch.distributed;
    without a process group it is one process's checkpoint). See the module
    docstring for the layout and the protocol: a kill of any rank at any moment
    leaves the earlier checkpoints untouched and at most a `.tmp-*` directory.

    Args:
        out_dir: the run directory; the checkpoint goes to
            `out_dir/checkpoints/step_XXXXXXX`.
        step: optimiser steps done.
        model: the `Griffin` being trained, as its parameters are now (plain, inside
            DDP, or sharded in place by FSDP2); its trainable parameters are saved.
        optimizer: the optimiser over those parameters.
        cfg: the run's config (`train_config.json`; `keep_last`).
        data_state: `train_set.state_dict()`, the same on every rank (rank 0's is
            written); values JSON-able or tensors.
        tokens_seen: tokens trained on so far (all ranks together).
        tokenizer_path: the tokenizer to copy in (None: none).
        device: the training device (each rank's RNG; the collectives' tensors).
        extra: more JSON-able trainer-state entries (e.g. the last evaluation).
        previous: the checkpoint this run wrote last; if it has vanished (the
            checkpoint directory was deleted during the run) a warning names it and
            the directory is made again.
        base_fingerprint: under LoRA, `lora.base_fingerprint` of the frozen base
            (computed before sharding); `load_checkpoint` and `load_checkpoint_model`
            check the base they rebuild against it.

    Returns:
        the checkpoint directory.

    Raises:
        CheckpointError (on every rank): the disk, the quota or a file-size limit is
            full (the directory and the bytes needed are named), or another write
            error; the temporary directory is removed and the previous checkpoint is
            left as it was.
    """
    import torch.distributed.checkpoint as dcp

    rank, world = _rank_world()
    root = Path(out_dir).absolute() / CHECKPOINT_DIR
    final = root / checkpoint_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    state = _state_dicts(model, optimizer)
    phase = _Phase(tmp, final, _nbytes(state), device)
    if base_fingerprint is not None:
        extra = {**dict(extra or {}), "base_fingerprint": base_fingerprint}
    griffin = _griffin(model)

    def prepare() -> None:
        if previous is not None and not previous.is_dir():
            _warn(
                f"checkpoint {previous} has disappeared ({root} deleted during the run?); "
                f"writing {final.name} anyway"
            )
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a stale one of a killed attempt
        (tmp / DCP_SUBDIR).mkdir(parents=True)
        (tmp / RNG_SUBDIR).mkdir()

    def write() -> None:
        from torch.distributed.checkpoint import FileSystemWriter

        with _quiet_single_process():
            dcp.save(
                state,
                storage_writer=FileSystemWriter(tmp / DCP_SUBDIR, sync_files=True),
                no_dist=not _distributed(),
            )
        torch.save(_rng_state(device), tmp / _rng_file(rank))
        _fsync_file(tmp / _rng_file(rank))
        if rank == 0:
            _write_rank0_files(
                tmp, step, griffin, cfg, data_state, tokens_seen, world, tokenizer_path, extra
            )
        _stall_for_test(rank, step)

    def publish() -> None:
        if rank != 0:
            return
        files = {
            p.relative_to(tmp).as_posix(): p.stat().st_size
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        _write_json(tmp / COMPLETE_NAME, {"step": step, "world_size": world, "files": files})
        for d in (tmp / DCP_SUBDIR, tmp / RNG_SUBDIR, tmp):
            _fsync_dir(d)
        aside = None
        if final.exists():  # a damaged directory of that name (e.g. copied in)
            aside = root / f".old-{final.name}"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)  # the one rename that makes the checkpoint visible
        _fsync_dir(root)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    try:
        phase.run(prepare if rank == 0 else lambda: None)
        phase.run(write)
        phase.run(publish)
    except BaseException:
        if rank == 0:  # KeyboardInterrupt or a bug: never leave the temp dir behind
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        _update_latest(root, final)
        _prune(out_dir, cfg.keep_last)
    return final


def _trainer_info(
    step: int,
    tokens_seen: int,
    data_state: Mapping[str, Any],
    world: int,
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    return {
        "step": step,
        "tokens_seen": tokens_seen,
        "data": dict(data_state),
        "world_size": world,
        "time": time.time(),
        **dict(extra or {}),
    }


def _write_rank0_files(
    tmp: Path,
    step: int,
    model: nn.Module,
    cfg: TrainConfig,
    data_state: Mapping[str, Any],
    tokens_seen: int,
    world: int,
    tokenizer_path: str | os.PathLike | None,
    extra: Mapping[str, Any] | None,
) -> None:
    """The files of a checkpoint besides the DCP shards and the RNG states, fsynced."""
    from ..formats import RGEMMA_CONFIG_NAME, RGEMMA_FORMAT_VERSION, TOKENIZER_NAME

    info = _trainer_info(step, tokens_seen, data_state, world, extra)
    torch.save(info, tmp / TRAINER_STATE_PT)
    _fsync_file(tmp / TRAINER_STATE_PT)
    _write_json(tmp / TRAINER_STATE_JSON, _jsonable(info))
    with open(tmp / TRAIN_CONFIG_NAME, "w", encoding="utf-8") as f:
        f.write(cfg.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    meta = {
        "rgemma_format": RGEMMA_FORMAT_VERSION,
        "dtype": dtype,
        "config": model.config.to_dict(),
    }
    _write_json(tmp / RGEMMA_CONFIG_NAME, meta)
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER_NAME)
        _fsync_file(tmp / TOKENIZER_NAME)


def _update_latest(root: Path, final: Path) -> None:
    """Point `root/latest` at `final` (a hint for people: resuming scans the
    directories). A failure to write it only warns: the checkpoint is published."""
    try:
        with atomic_path(root / LATEST_NAME) as tmp_latest:
            Path(tmp_latest).write_text(final.name + "\n", encoding="utf-8")
    except OSError as err:
        _warn(f"cannot update {root / LATEST_NAME}: {err.strerror or err}")


def _prune(out_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints; each is renamed
    aside first (one rename), so a half-deleted directory never carries a checkpoint
    name."""
    root = Path(out_dir) / CHECKPOINT_DIR
    found = find_checkpoints(out_dir)
    for _, old in found[: max(0, len(found) - keep_last)]:
        trash = root / f".del-{old.name}"
        shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(old, trash)
        except OSError as err:  # only rank 0 prunes: never stop it for this
            _warn(f"cannot remove old checkpoint {old}: {err.strerror or err}")
            continue
        shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------
def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer state of checkpoint `path`: `step`, `tokens_seen`, `data` (the
    data set's position), `world_size` (ranks that wrote it), `time`, and whatever
    `extra` the loop added.

    Raises:
        CheckpointError: the file is missing or unreadable (named).
    """
    file = Path(path) / TRAINER_STATE_PT
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise CheckpointError(f"cannot read {file}: {err}") from None


def checkpoint_model_config(path: str | os.PathLike):
    """The `GriffinConfig` of the model in training checkpoint `path`.

    Raises:
        CheckpointError: `rgemma_config.json` is missing or not valid JSON.
        ConfigError: it holds an invalid config (the file is named).
    """
    from ..config import GriffinConfig
    from ..formats import RGEMMA_CONFIG_NAME

    file = Path(path) / RGEMMA_CONFIG_NAME
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {file}: {err}") from None
    try:
        return GriffinConfig.from_dict(data["config"])
    except (ConfigError, KeyError, TypeError) as err:
        raise ConfigError(f"{file}: {err}") from None


def _dcp_load(state: dict[str, Any], path: Path, *, no_dist: bool) -> None:
    """`dcp.load` into `state` in place; a failure is a one-line CheckpointError."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=path / DCP_SUBDIR, no_dist=no_dist)
    except CheckpointException as err:
        cause = _dcp_failure(err)
        if isinstance(cause, KeyboardInterrupt):
            raise cause from None
        detail = " ".join(str(cause).split()) or type(cause).__name__
        raise CheckpointError(f"cannot restore {path / DCP_SUBDIR}: {detail}") from None


def read_checkpoint_state(path: str | os.PathLike) -> dict[str, Any]:
    """The sharded part of checkpoint `path` gathered in one process, for inspection
    and tests: `{"model": {parameter name: tensor}, "optim": {"state.<name>.<field>":
    tensor, "param_groups.<name>.<field>": value}}` (full tensors, on the CPU).

    Raises:
        CheckpointError: the DCP directory is missing or unreadable.
    """
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with _quiet_single_process():
                dcp_to_torch_save(path / DCP_SUBDIR, Path(tmp) / "state.pt")
        except (OSError, RuntimeError, ValueError) as err:
            detail = " ".join(str(err).split())
            raise CheckpointError(f"cannot read {path / DCP_SUBDIR}: {detail}") from None
        return torch.load(Path(tmp) / "state.pt", map_location="cpu", weights_only=True)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    seed: int,
    base_fingerprint: str | None = None,
) -> dict[str, Any]:
    """Restore `model`'s trainable parameters, `optimizer` and this rank's RNGs from
    checkpoint `path`; every rank calls it (a collective under torch.distributed).

    The checkpoint may have been written by any number of ranks and any
    parallelism: DCP reshards it onto `model` as it is now (plain, DDP, FSDP2).

    Args:
        path: a complete checkpoint directory.
        model: the `Griffin` to train, built with the checkpoint's config (and the
            same LoRA adapters, if any), already parallelised.
        optimizer: the optimiser over its trainable parameters, made as for a fresh
            run (its state is replaced).
        device: the training device (this rank's CUDA RNG).
        seed: the run's seed (`TrainConfig.seed`): seeds a rank the checkpoint has no
            RNG file for (see the module docstring).
        base_fingerprint: under LoRA, the fingerprint of the base `model` was built
            on; it must equal the one the checkpoint recorded.

    Returns:
        the trainer state (`read_trainer_state`).

    Raises:
        CheckpointError: an unreadable file, parameters that do not match the
            checkpoint's (names the key), LoRA adapters saved for another base.
    """
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    path = Path(path)
    info = read_trainer_state(path)
    saved_base = info.get("base_fingerprint")
    if saved_base is not None and base_fingerprint is not None and saved_base != base_fingerprint:
        raise CheckpointError(
            f"cannot resume from {path}: its LoRA adapters were trained on base "
            f"{saved_base}, but init_from now holds another model ({base_fingerprint})"
        )
    state = _state_dicts(model, optimizer)
    _dcp_load(state, path, no_dist=not _distributed())  # the parameters, in place
    try:
        set_optimizer_state_dict(
            _griffin(model), optimizer, state[_OPTIM], options=_optim_options()
        )
    except (RuntimeError, KeyError, ValueError) as err:
        detail = " ".join(str(err).split())
        raise CheckpointError(f"cannot restore {path / DCP_SUBDIR}: {detail}") from None
    rank, _ = _rank_world()
    rng_file = path / _rng_file(rank)
    if rng_file.is_file():
        try:
            rng = torch.load(rng_file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"cannot read {rng_file}: {err}") from None
        _set_rng_state(rng, device)
    else:  # more ranks than the checkpoint was written by
        _seed_rngs(seed, int(info["step"]), rank)
    return info


def load_checkpoint_model(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    config=None,
    *,
    load_base=None,
):
    """The model of a training checkpoint as a plain `Griffin` (no process group
    needed; the checkpoint may come from any number of ranks).

    Args:
        path: a complete checkpoint directory (see `resolve_checkpoint` for run and
            `checkpoints` directories).
        dtype: parameter dtype (default: the checkpoint's, bfloat16 for a float32
            checkpoint loaded onto a CUDA device, as `load_model`).
        device: where to put the parameters (default CPU).
        config: a declared `GriffinConfig` the checkpoint must match.
        load_base: `rgemma.load_model` (passed in by it, so that this module does not
            import the loader that imports it): reads a LoRA run's `init_from` base.

    Returns:
        `Griffin` in eval mode with `requires_grad=False`, `model.source` set as
        `load_model` does (`"format": "training"`).

    Raises:
        CheckpointError: unreadable files, a model key missing from the checkpoint.
        ConfigError: the checkpoint's config differs from `config`.
    """
    from ..formats import RGEMMA_CONFIG_NAME, TOKENIZER_NAME
    from ..model import Griffin

    path = Path(path)
    cfg = checkpoint_model_config(path)
    if config is not None:
        config.check_matches(cfg)
    saved = json.loads((path / RGEMMA_CONFIG_NAME).read_text(encoding="utf-8")).get("dtype")
    saved_dtype = getattr(torch, str(saved), None)
    if not isinstance(saved_dtype, torch.dtype):
        saved_dtype = torch.float32
    train_cfg = _read_train_config(path)
    if train_cfg.get("lora_rank"):
        model = _base_with_adapters(path, cfg, train_cfg, saved_dtype, load_base)
    else:
        # Built without initialising (the checkpoint overwrites every parameter).
        model = Griffin(cfg, device="meta", dtype=saved_dtype).to_empty(device="cpu")
        state = {_MODEL: {n: p.detach() for n, p in model.named_parameters()}}
        _dcp_load(state, path, no_dist=True)  # into the parameters, in place
    target = dtype or saved_dtype
    on_gpu = torch.device(device or "cpu").type == "cuda"
    if dtype is None and target == torch.float32 and on_gpu:
        target = torch.bfloat16
    model = model.to(device=device or "cpu", dtype=target)
    tok = path / TOKENIZER_NAME
    model.source = {
        "format": "training",
        "path": str(path),
        "tokenizer": str(tok) if tok.is_file() else None,
        "bundled": False,
    }
    return model.eval().requires_grad_(False)


def _read_train_config(path: Path) -> dict[str, Any]:
    file = path / TRAIN_CONFIG_NAME
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {file}: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} is not a JSON object")
    return data


def _base_with_adapters(
    path: Path, cfg, train_cfg: Mapping[str, Any], dtype: torch.dtype, load_base
):
    """The base model of a LoRA run with the checkpoint's adapters merged in, float
    (`dtype`) on the CPU. The base is the run's `init_from`, or for a run from
    scratch the model its seed initialised (as `training.loop` builds it).

    Raises:
        CheckpointError: a base whose fingerprint differs from the one the run
            recorded (`base_fingerprint` in the trainer state).
    """
    from ..lora import DEFAULT_TARGETS, apply_lora, base_fingerprint, merge_lora
    from ..model import Griffin

    base_path = train_cfg.get("init_from")
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
        if base_path:
            if load_base is None:
                raise CheckpointError(
                    f"{path} holds LoRA adapters for the base {base_path}: load it with "
                    "rgemma.load_model, which reads the base"
                )
            model = load_base(base_path, dtype=dtype, config=cfg)
        else:
            torch.manual_seed(int(train_cfg.get("seed", 0)))
            model = Griffin(cfg, dtype=torch.float32).to(dtype)
        expected = read_trainer_state(path).get("base_fingerprint")
        if expected is not None and base_fingerprint(model) != expected:
            where = f"its init_from {base_path}" if base_path else "the seeded initialisation"
            raise CheckpointError(
                f"{path} holds LoRA adapters for base {expected}, but {where} gives "
                f"another model ({base_fingerprint(model)})"
            )
        apply_lora(  # the adapters' random init is overwritten below
            model,
            int(train_cfg["lora_rank"]),
            float(train_cfg.get("lora_alpha", 16.0)),
            train_cfg.get("lora_targets") or DEFAULT_TARGETS,
            float(train_cfg.get("lora_dropout", 0.0)),
        )
    adapters = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    _dcp_load({_MODEL: adapters}, path, no_dist=True)  # into the adapters, in place
    return merge_lora(model)
