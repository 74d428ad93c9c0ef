"""Process-group plumbing for training under `torchrun`: which rank this is, its
device, and the few collectives the loop needs.

`torchrun --nproc_per_node N -m rgemma train ...` starts N processes with `RANK`,
`WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` in their environment.
`init_distributed` reads them, joins the process group (gloo on CPU, NCCL on CUDA)
when there is more than one process, and picks the device of this rank
(`cuda:LOCAL_RANK`). A plain `python -m rgemma train` is one process: no process
group, every helper here is then a no-op. `distributed` wraps a run: it initialises,
yields the `Dist`, and destroys the process group it created on the way out, also
when the run raises.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as tdist
from torch import Tensor

from ..device import resolve_device
from ..errors import ConfigError, InputError

T = TypeVar("T", bound=tuple)  # a NamedTuple of tensors (`data.Batch`)


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the run.

    Attributes:
        rank: this process's global rank, in [0, world_size).
        world_size: the number of processes (1 without torchrun).
        local_rank: the rank on this machine (selects `cuda:local_rank`).
        device: the torch device this rank trains on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, shows progress and writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """More than one process (a process group is initialised)."""
        return self.world_size > 1


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def read_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (0, 1, 0 when unset).

    Raises:
        ConfigError: a value that is not an integer, or out of range (both named).
    """
    env = os.environ if env is None else env
    rank = _env_int(env, "RANK", 0)
    world = _env_int(env, "WORLD_SIZE", 1)
    local = _env_int(env, "LOCAL_RANK", rank)
    if world < 1:
        raise ConfigError(f"environment variable WORLD_SIZE={world} must be >= 1")
    if not 0 <= rank < world:
        raise ConfigError(f"environment variable RANK={rank} is not in [0, WORLD_SIZE={world})")
    if not 0 <= local <= rank:
        raise ConfigError(f"environment variable LOCAL_RANK={local} is not in [0, RANK={rank}]")
    return rank, world, local


def _rank_device(name: str, world: int, local_rank: int, local_world: int) -> torch.device:
    """The device of a rank for `TrainConfig.device` `name` (see `init_distributed`);
    `local_world` is the number of processes on this machine."""
    device = resolve_device(name, what="TrainConfig.device", error=ConfigError)
    if device.type != "cuda" or world == 1:
        return device
    if device.index is not None:
        raise ConfigError(
            f"TrainConfig.device {name} names one GPU, but torchrun started {world} "
            "processes: use device=cuda (each process takes cuda:LOCAL_RANK)"
        )
    count = torch.cuda.device_count()
    # Checked against the processes per machine, so every rank (rank 0 included)
    # stops with the same message, not only those without a GPU.
    if max(local_world, local_rank + 1) > count:
        raise ConfigError(
            f"TrainConfig.device cuda: {max(local_world, local_rank + 1)} processes on this "
            f"machine but only {count} GPU(s) visible: start at most {count} per machine "
            "(torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


def init_distributed(device: str, env: Mapping[str, str] | None = None) -> Dist:
    """Join the process group described by torchrun's environment and pick this
    rank's device.

    The process group is initialised (`env://` rendezvous, gloo on CPU, NCCL on
    CUDA) when `WORLD_SIZE` > 1 and none exists yet; an existing one (a caller's own
    launcher) is used as it is, with its rank and size.

    Args:
        device: `TrainConfig.device`: "cpu", "cuda" (each rank takes
            `cuda:LOCAL_RANK`), "cuda:K" (one process only) or "auto".
        env: the environment to read (default: `os.environ`).

    Returns:
        this process's `Dist`.

    Raises:
        ConfigError: bad torchrun variables, no `MASTER_ADDR`/`MASTER_PORT` with
            several processes, a device that cannot serve this rank (a single GPU
            named for several processes, more processes per node than GPUs, CUDA
            missing).
    """
    env = os.environ if env is None else env
    if tdist.is_available() and tdist.is_initialized():
        rank, world = tdist.get_rank(), tdist.get_world_size()
        local = _env_int(env, "LOCAL_RANK", rank)
        local_world = _env_int(env, "LOCAL_WORLD_SIZE", 1)
        return Dist(rank, world, local, _rank_device(device, world, local, local_world))
    rank, world, local = read_env(env)
    dev = _rank_device(device, world, local, _env_int(env, "LOCAL_WORLD_SIZE", 1))
    if world == 1:
        return Dist(0, 1, 0, dev)
    if not tdist.is_available():
        raise ConfigError(f"WORLD_SIZE={world}, but this torch build has no torch.distributed")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world} but {' and '.join(missing)} not set: start several "
            "processes with torchrun (torchrun --nproc_per_node N -m rgemma train ...)"
        )
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        tdist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
    else:
        tdist.init_process_group("gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, dev)


@contextlib.contextmanager
def distributed(device: str, env: Mapping[str, str] | None = None) -> Iterator[Dist]:
    """`init_distributed`, then `destroy_process_group` on the way out (also on an
    error) if this call created the process group."""
    created = not (tdist.is_available() and tdist.is_initialized())
    dist = init_distributed(device, env)
    try:
        yield dist
    finally:
        if created and dist.is_distributed and tdist.is_initialized():
            tdist.destroy_process_group()


def all_reduce_sum(tensor: Tensor, dist: Dist) -> Tensor:
    """`tensor` summed over ranks, in place (returned); unchanged with one process."""
    if dist.is_distributed:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def barrier(dist: Dist) -> None:
    """Wait for every rank (no-op with one process)."""
    if dist.is_distributed:
        tdist.barrier()


def check_same_config(config: Mapping[str, object], dist: Dist) -> None:
    """Raise on every rank unless all ranks run the same train config (one
    all_gather_object). Ranks with different batch sizes, data or step counts would
    wait forever on each other's collectives; this names the difference instead.

    Args:
        config: this rank's `TrainConfig.to_dict()`.
        dist: this process's `Dist`.

    Raises:
        ConfigError: naming the first rank that differs from rank 0 and the fields
            (with both values).
    """
    if not dist.is_distributed:
        return
    configs: list[object] = [None] * dist.world_size
    tdist.all_gather_object(configs, dict(config))
    ref = configs[0]
    for rank, other in enumerate(configs[1:], start=1):
        if other != ref:
            keys = sorted(set(ref) | set(other))  # type: ignore[arg-type]
            diffs = [
                f"{k} ({ref.get(k)!r} on rank 0, {other.get(k)!r} on rank {rank})"  # type: ignore[union-attr]
                for k in keys
                if ref.get(k) != other.get(k)  # type: ignore[union-attr]
            ]
            raise ConfigError(
                f"the processes run different train configs: {'; '.join(diffs)}; "
                "start every rank with the same config and overrides"
            )


def local_rows(batch: T, dist: Dist) -> T:
    """This rank's rows of a batch that holds every rank's: rows
    `[rank * b, (rank + 1) * b)`, `b = rows / world_size`.

    Args:
        batch: a NamedTuple of (world_size * b, ...) tensors (`data.Batch`).
        dist: this process's `Dist`.

    Returns:
        the same NamedTuple of (b, ...) views.

    Raises:
        InputError: the batch's rows do not divide by the world size.
    """
    if not dist.is_distributed:
        return batch
    rows = batch[0].shape[0]
    if rows % dist.world_size:
        raise InputError(f"a batch of {rows} rows does not split over {dist.world_size} ranks")
    b = rows // dist.world_size
    return type(batch)(*(t[dist.rank * b : (dist.rank + 1) * b] for t in batch))
