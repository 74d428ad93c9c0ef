"""Activation checkpointing and data parallelism, applied to the training objective
from outside the model (the pattern of torchtitan's `parallelize.py`).

`parallelize(objective, mode=..., activation_checkpointing=..., dist=...)`:

1. activation checkpointing per `ResidualBlock`: each block's activations are
   recomputed in the backward pass instead of kept (`torch.distributed._composable.
   checkpoint`, non-reentrant `torch.utils.checkpoint` run by hooks: the module tree
   and the parameter names stay as they are, so parameter groups, state dicts and
   checkpoints are the same with and without it);
2. with more than one process, data parallelism:
   * `"fsdp"`: FSDP2 (`torch.distributed.fsdp.fully_shard`) per residual block, then
     at the root, the `LMObjective`: parameters, gradients and optimizer state are
     sharded over the ranks (dim 0), each block's parameters all-gathered for its
     forward and backward and resharded after; the root group holds the embedding
     and the final norm, used by the trunk and by the tied output head inside the
     objective's one forward;
   * `"ddp"`: `DistributedDataParallel`: a full replica per rank, gradients
     all-reduced (averaged) in buckets during the backward pass.

Both average gradients over ranks; the loop scales each rank's loss by the world
size so that the result is the gradient of the global sum divided by the global
count of target tokens (see `loop`).

Precision: parameters, gradients, their reduction and the optimizer state stay
float32 in every mode. bf16 compute is `torch.autocast` around the forward (the
loop's `TrainConfig.bf16`), not FSDP2's `MixedPrecisionPolicy(param_dtype=bf16)`:
autocast is the same code on one process, under DDP and under FSDP2, so N processes
train exactly like one; and it casts only matmul inputs, so the RG-LRU's
`a_param`, its gates and recurrence, the norms and the loss stay float32 (a bf16
copy of `a_param` would move a = exp(-8 softplus(a_param) gate) close to 1 by
several percent of 1 - a, the memory of the recurrence). The price: FSDP2
all-gathers float32 parameters (twice the bytes of bf16).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..model import Griffin
from .distributed import Dist

MODES = ("fsdp", "ddp")


def apply_activation_checkpointing(model: Griffin) -> None:
    """Recompute each residual block in the backward pass (in place): only the
    blocks' inputs are kept from the forward pass.

    Non-reentrant `torch.utils.checkpoint` run from forward hooks
    (`torch.distributed._composable.checkpoint`): it takes the blocks' state tuples
    as they are, works under FSDP2 and DDP, and restores the RNG state for the
    recomputation. Parameter names and the module tree are unchanged.
    """
    from torch.distributed._composable import checkpoint

    for block in model.blocks:
        checkpoint(block)


def parallelize(
    objective: nn.Module,
    *,
    mode: str,
    activation_checkpointing: bool,
    dist: Dist,
) -> nn.Module:
    """Prepare `objective` (an `LMObjective`) for training on `dist`'s ranks.

    Args:
        objective: the `LMObjective` whose `model` is a `Griffin` on `dist.device`,
            with identical parameters on every rank (the same seed or checkpoint).
        mode: "fsdp" or "ddp": how to use more than one process (ignored with one).
        activation_checkpointing: recompute each residual block in the backward pass.
        dist: this process's `Dist`.

    Returns:
        the module to call in the training step: `objective` itself (changed in
        place: checkpointed blocks; FSDP2 turns its parameters into sharded
        `DTensor`s) or, for DDP, a `DistributedDataParallel` around it. Create the
        optimizer after this call, over `objective.parameters()`.

    Raises:
        ConfigError: an unknown `mode`.
    """
    if mode not in MODES:
        raise ConfigError(f"TrainConfig.data_parallel must be one of {MODES}, got {mode!r}")
    model: Griffin = objective.model
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if not dist.is_distributed:
        return objective
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Every parameter (the tied embedding twice) is used in every forward.
        return DistributedDataParallel(
            objective, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # A block returns its new state, whose conv window and attention cache are views
    # of activations: FSDP2 warns that an in-place op on a returned view would skip
    # its backward hook. The trunk only copies them (`_dense`), never writes them.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view")
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    last = len(model.blocks) - 1
    for i, block in enumerate(model.blocks):
        # The last block's parameters are all-gathered again right away by the
        # backward pass: keeping them saves one all-gather (torchtitan does the same).
        fully_shard(block, mesh=mesh, reshard_after_forward=i < last)
    fully_shard(objective, mesh=mesh)
    return objective


def grad_sync(module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Context for one micro-batch's backward: with `enabled` False, DDP skips its
    gradient all-reduce (`no_sync`; the gradients accumulate locally and the next
    synchronised backward reduces their sum). FSDP2 and one process: no change."""
    from torch.nn.parallel import DistributedDataParallel

    if not enabled and isinstance(module, DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Clip the gradients of `params` to a global L2 norm of `max_norm` (in place)
    and return the norm before clipping, a 0-d float32 tensor on their device.

    Under FSDP2 the gradients are shards (`DTensor`): `clip_grad_norm_` reduces the
    norm over all ranks, and the result is made a plain tensor (`full_tensor`), the
    same on every rank. `max_norm=math.inf` only measures (the factor is exactly 1).
    """
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm, foreach=True)
    full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP2
    return full() if full is not None else norm


def unwrap(module: nn.Module) -> nn.Module:
    """The `LMObjective` inside what `parallelize` returned."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


def is_fsdp(module: nn.Module) -> bool:
    """Whether `parallelize` sharded `module` with FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(module), FSDPModule)


@contextmanager
def plain_model(module: nn.Module) -> Iterator[Griffin]:
    """The `Griffin` of `module` (what `parallelize` returned), callable as a plain
    model (`model(tokens, segment_pos, state)`, `rgemma.scoring`) on every rank.

    Under FSDP2 the root's parameters (embedding, final norm) are all-gathered for
    the duration (`FSDPModule.unshard`) and the blocks gather theirs in their own
    forward hooks; every rank must then make the same calls, as in the training
    step. On the way out every FSDP2 module is resharded (the last block keeps its
    parameters gathered after a forward, for a backward that evaluation never runs),
    so the model holds its sharded parameters again (those the optimizer updates).
    Under DDP or one process the model is used as it is.
    """
    from torch.distributed.fsdp import FSDPModule

    objective = unwrap(module)
    if not is_fsdp(objective):
        yield objective.model
        return
    objective.unshard()
    try:
        yield objective.model
    finally:
        for m in objective.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def gather_full_state_dict(module: nn.Module, dist: Dist) -> dict[str, Any] | None:
    """The model's full state_dict (official keys, float32, on the CPU) on rank 0,
    None on the other ranks. A collective under FSDP2: call it on every rank.

    Under FSDP2 the shards are all-gathered
    (`torch.distributed.checkpoint.state_dict.get_model_state_dict` with
    `full_state_dict=True, cpu_offload=True`, which keeps the result on rank 0 only);
    otherwise rank 0 copies its replica.
    """
    model = unwrap(module).model
    if is_fsdp(module):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        return state if dist.is_main else None
    if not dist.is_main:
        return None
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def griffin_from_state_dict(
    config: Any, state: dict[str, Any], lora: tuple[Any, ...] | None = None
) -> Griffin:
    """A CPU `Griffin` of `config` holding `state` (`gather_full_state_dict`'s),
    built on the meta device without a random initialisation.

    Args:
        config: the model's `GriffinConfig`.
        state: its full state_dict (official keys, with `...lora_A.weight` /
            `...lora_B.weight` under LoRA).
        lora: `(rank, alpha, targets, dropout)` of `rgemma.lora.apply_lora` when the
            state holds adapters (None: none).
    """
    model = Griffin(config, device="meta", dtype=torch.float32)
    if lora is not None:
        from ..lora import apply_lora

        apply_lora(model, *lora)
    model.load_state_dict(state, strict=True, assign=True)
    return model
