"""The model's fixed-size state (the "cache"): plain data passed in and returned.

Per recurrent block: the RG-LRU hidden state and the last `conv1d_temporal_width - 1`
inputs of the Conv1D. Per local-attention block: the keys and values of the last
`attention_window_size` tokens (after RoPE), in temporal order, with each key's
segment_pos (-1 marks an empty slot or a key of an earlier document). Whatever the
sequence length, the state's size in bytes is fixed.

Counterpart of the official `RecurrentBlockCache` / `AttentionBlockCache`, except
that the official torch model cannot continue from a state with more than one
token, and HF keeps its state on module attributes.

Dimension letters: b batch, e LRU width, w window, k conv width - 1, hd head dim.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .config import BlockType, GriffinConfig
from .errors import InputError


class RecurrentState(NamedTuple):
    """State of one recurrent block."""

    rg_lru: Tensor  # (b, e) float32: RG-LRU hidden state h_t
    conv: Tensor  # (b, k, e) activation dtype: last k inputs of the Conv1D, oldest first


class AttentionState(NamedTuple):
    """State of one local-attention block: a window of keys and values."""

    keys: Tensor  # (b, w, hd) activation dtype, RoPE applied, oldest first
    values: Tensor  # (b, w, hd)
    positions: Tensor  # (b, w) int64 segment_pos of each key; -1 = empty / not visible


BlockState = RecurrentState | AttentionState


class GriffinState(NamedTuple):
    """State of a whole model: one entry per block, plus each row's next segment_pos."""

    blocks: tuple[BlockState, ...]
    next_pos: Tensor  # (b,) int64: segment_pos the next token gets by default

    @property
    def batch_size(self) -> int:
        return self.next_pos.shape[0]

    def nbytes(self) -> int:
        """Size in bytes of every tensor of the state."""
        return sum(t.numel() * t.element_size() for t in _tensors(self))

    def select(self, rows: Tensor | Sequence[int] | int) -> GriffinState:
        """The state of some batch rows (a new batch in the given order)."""
        if isinstance(rows, int):
            rows = [rows]
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.next_pos.device)
        return _map(self, lambda t: t.index_select(0, idx))

    def head(self, n: int) -> GriffinState:
        """The first n rows, as views (no copy)."""
        return _map(self, lambda t: t[:n])

    def expand(self, n: int) -> GriffinState:
        """A batch-1 state's row repeated n times, as views (no copy; `concat_states`
        or `select` makes a copy to write to).

        Raises:
            InputError: the state's batch size is not 1.
        """
        if self.batch_size != 1:
            raise InputError(f"expand needs a state of batch size 1, got {self.batch_size}")
        return _map(self, lambda t: t.expand(n, *t.shape[1:]))

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> GriffinState:
        """Move to a device; `dtype` converts the activation-dtype tensors (conv inputs,
        keys, values), never the float32 RG-LRU state nor the int64 positions."""

        def move(t: Tensor) -> Tensor:
            if dtype is not None:
                t = t.to(dtype)
            return t.to(device) if device is not None else t

        return GriffinState(
            blocks=tuple(
                RecurrentState(s.rg_lru.to(device) if device else s.rg_lru, move(s.conv))
                if isinstance(s, RecurrentState)
                else AttentionState(
                    move(s.keys), move(s.values), s.positions.to(device) if device else s.positions
                )
                for s in self.blocks
            ),
            next_pos=self.next_pos.to(device) if device else self.next_pos,
        )


def _tensors(state: GriffinState) -> list[Tensor]:
    out = [state.next_pos]
    for s in state.blocks:
        out.extend(s)
    return out


def _map(state: GriffinState, fn) -> GriffinState:
    return GriffinState(
        blocks=tuple(type(s)(*(fn(t) for t in s)) for s in state.blocks),
        next_pos=fn(state.next_pos),
    )


def init_state(
    config: GriffinConfig,
    batch_size: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> GriffinState:
    """An empty state: zeros, and every attention slot marked empty (-1)."""
    blocks: list[BlockState] = []
    k = config.conv1d_temporal_width - 1
    for block in config.block_types:
        if block == BlockType.RECURRENT:
            blocks.append(
                RecurrentState(
                    rg_lru=torch.zeros(
                        batch_size, config.lru_width, dtype=torch.float32, device=device
                    ),
                    conv=torch.zeros(batch_size, k, config.lru_width, dtype=dtype, device=device),
                )
            )
        else:
            w, hd = config.attention_window_size, config.head_dim
            blocks.append(
                AttentionState(
                    keys=torch.zeros(batch_size, w, hd, dtype=dtype, device=device),
                    values=torch.zeros(batch_size, w, hd, dtype=dtype, device=device),
                    positions=torch.full((batch_size, w), -1, dtype=torch.long, device=device),
                )
            )
    return GriffinState(tuple(blocks), torch.zeros(batch_size, dtype=torch.long, device=device))


def check_state(state: GriffinState, config: GriffinConfig, batch_size: int) -> None:
    """Raise `InputError` if `state` was not made for this config and batch size."""
    if not isinstance(state, GriffinState):
        raise InputError(f"state must be a GriffinState, got {type(state).__name__}")
    if state.batch_size != batch_size:
        raise InputError(
            f"state has batch size {state.batch_size} but tokens have batch size {batch_size}"
        )
    if len(state.blocks) != config.num_layers:
        raise InputError(
            f"state has {len(state.blocks)} blocks but the model has {config.num_layers}"
        )
    expected = init_state(config, batch_size, device="meta")
    for i, (got, want) in enumerate(zip(state.blocks, expected.blocks)):
        if type(got) is not type(want):
            raise InputError(
                f"state block {i} is a {type(got).__name__}, the model's is a "
                f"{type(want).__name__}: the state is from another config"
            )
        for name, g, w in zip(want._fields, got, want):
            if tuple(g.shape) != tuple(w.shape):
                raise InputError(
                    f"state block {i} field {name!r} has shape {tuple(g.shape)}, expected "
                    f"{tuple(w.shape)}: the state is from another config or batch size"
                )


def concat_states(states: Sequence[GriffinState]) -> GriffinState:
    """Stack the rows of several states into one batch, in order: one new contiguous
    tensor per field, whatever the inputs (views such as `head` and `expand` are
    copied once). Used by batched generation from a state and by the server's
    running batch when rows join it.

    Raises:
        InputError: no states.
    """
    if not states:
        raise InputError("concat_states needs at least one state")
    first = states[0]
    return GriffinState(
        blocks=tuple(
            type(s0)(*(torch.cat([st.blocks[i][j] for st in states]) for j in range(len(s0))))
            for i, s0 in enumerate(first.blocks)
        ),
        next_pos=torch.cat([s.next_pos for s in states]),
    )


def save_state(state: GriffinState, path: str | os.PathLike, config: GriffinConfig) -> None:
    """Write a state to a safetensors file (atomically), with the config it belongs to."""
    from safetensors.torch import save_file

    from .io import atomic_path

    if os.path.isdir(path):
        raise InputError(f"cannot save the state to {os.fspath(path)!r}: it is a directory")
    tensors = {"next_pos": state.next_pos.contiguous()}
    for i, s in enumerate(state.blocks):
        for name, t in zip(s._fields, s):
            tensors[f"blocks.{i}.{name}"] = t.contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "rgemma-state", "config": config.to_json()})


def load_state(
    path: str | os.PathLike, config: GriffinConfig | None = None, device: str | None = None
) -> GriffinState:
    """Read a state written by `save_state`. If `config` is given, raise `InputError`
    when the file's config differs from it."""
    import json

    from safetensors import safe_open

    from .errors import CheckpointError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"state file {path!r} does not exist")
    try:
        with safe_open(path, framework="pt", device=device or "cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path!r} is not a readable state file: {err}") from None
    if meta.get("format") != "rgemma-state":
        raise CheckpointError(f"{path!r} is a safetensors file but not an rgemma state")
    saved = GriffinConfig.from_dict(json.loads(meta["config"]))
    if config is not None and saved != config:
        raise InputError(f"state file {path!r} was saved for another model config")
    blocks: list[BlockState] = []
    for i, kind in enumerate(saved.block_types):
        cls = RecurrentState if kind == BlockType.RECURRENT else AttentionState
        blocks.append(cls(*(tensors[f"blocks.{i}.{name}"] for name in cls._fields)))
    state = GriffinState(tuple(blocks), tensors["next_pos"])
    check_state(state, saved, state.batch_size)
    return state
