"""The model's fixed-size state (the "cache"): plain data passed in and returned.

Per recurrent block: the RG-LRU hidden state and the last `conv1d_temporal_width - 1`
inputs of the Conv1D. Per local-attention block: the keys and values of the last
`attention_window_size` (w) tokens (after RoPE) as a ring buffer, the key of position
p in slot p % w, with each key's segment_pos (-1 marks an empty slot or a key of an
earlier document). A decode step writes one slot (in place when the caller donates
the state), as the official cache does; since within a document positions increase
by one per token, the slot a new key takes holds the one key that has just left the
window, and any split of a sequence into calls leaves the same state. Whatever the
sequence length, the state's size in bytes is fixed.

Saved states (`save_state`) record the layout; files written before the ring buffer
(keys oldest first) are converted by `load_state`.

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

    keys: Tensor  # (b, w, hd) activation dtype, RoPE applied; position p in slot p % w
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


#: The attention window's layout, recorded by `save_state` ("ring": position p in
#: slot p % w). Files without it hold the earlier layout (oldest key first).
STATE_LAYOUT = "ring"


def ring_layout(state: AttentionState) -> AttentionState:
    """An attention window with every visible key moved to slot position % w (new
    tensors; invisible slots become empty). For windows in another slot order, such as
    states saved before the ring buffer (oldest key first)."""
    w = state.positions.shape[1]
    rows, cols = torch.nonzero(state.positions >= 0, as_tuple=True)
    dst = state.positions[rows, cols].remainder(w)
    keys, values = torch.zeros_like(state.keys), torch.zeros_like(state.values)
    positions = torch.full_like(state.positions, -1)
    keys[rows, dst] = state.keys[rows, cols]
    values[rows, dst] = state.values[rows, cols]
    positions[rows, dst] = state.positions[rows, cols]
    return AttentionState(keys, values, positions)


def save_state(state: GriffinState, path: str | os.PathLike, config: GriffinConfig) -> None:
    """Write a state to a safetensors file (atomically), with the config it belongs to.

    The file holds `next_pos` and `blocks.{i}.{field}` for every block's fields, and
    the metadata `{"format": "rgemma-state", "config": config JSON}`; it gets the
    umask's file mode (`rgemma.io`).

    Raises:
        InputError: `state` is not a `GriffinState` for `config`, `config` is not a
            `GriffinConfig`, or `path` is a directory.
    """
    from safetensors.torch import save_file

    from .io import atomic_path

    if not isinstance(config, GriffinConfig):
        raise InputError(f"save_state needs the model's GriffinConfig, got {type(config).__name__}")
    if not isinstance(state, GriffinState):
        raise InputError(f"save_state needs a GriffinState, got {type(state).__name__}")
    check_state(state, config, state.batch_size)
    if os.path.isdir(path):
        raise InputError(f"cannot save the state to {os.fspath(path)!r}: it is a directory")
    tensors = {"next_pos": state.next_pos.contiguous()}
    for i, s in enumerate(state.blocks):
        for name, t in zip(s._fields, s):
            tensors[f"blocks.{i}.{name}"] = t.contiguous()
    with atomic_path(path) as tmp:
        meta = {"format": "rgemma-state", "config": config.to_json(), "layout": STATE_LAYOUT}
        save_file(tensors, tmp, metadata=meta)


def load_state(
    path: str | os.PathLike, config: GriffinConfig | None = None, device: str | None = None
) -> GriffinState:
    """Read a state written by `save_state`.

    Everything in the file is checked before it is used, so a damaged or hand-made
    file gives one error naming the field: the metadata (`format`, `config`), the
    number of blocks against the config (before anything that size is built), the
    tensor names, dtypes (float32 RG-LRU state, int64 positions, one floating dtype
    for the rest), shapes, finite values and positions >= -1.

    Args:
        path: the state file.
        config: the model's config; the file's must equal it.
        device: where to put the tensors (default CPU).

    Returns:
        the `GriffinState`, its batch size as saved.

    Raises:
        CheckpointError: a missing, unreadable or not-a-state file, or a field of it
            that is missing or invalid (named).
        InputError: the state was saved for another model config (the differing
            fields named).
    """
    import json

    from safetensors import safe_open

    from .config import config_diff
    from .errors import CheckpointError, ConfigError, RgemmaError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"state file {path!r} does not exist")

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"state file {path!r}: {what}")

    try:
        with safe_open(path, framework="pt", device=device or "cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "rgemma-state":
                raise CheckpointError(f"{path!r} is a safetensors file but not an rgemma state")
            if "config" not in meta:
                raise bad("the metadata has no 'config'")
            try:
                data = json.loads(meta["config"])
                if not isinstance(data, dict):
                    raise ConfigError(f"a JSON {type(data).__name__}, not an object")
                saved = GriffinConfig.from_dict(data)
            except (ValueError, ConfigError) as err:
                raise bad(f"metadata 'config' is not a GriffinConfig: {err}") from None
            _check_state_keys(saved, set(f.keys()), bad)  # caps the config by the file
            if config is not None and saved != config:
                diffs = "; ".join(
                    d if len(d) < 200 else d[:196] + "...)" for d in config_diff(config, saved)
                )
                raise InputError(
                    f"state file {path!r} was saved for another model config (model vs "
                    f"file: {diffs})"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except RgemmaError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path!r} is not a readable state file: {err}") from None
    blocks: list[BlockState] = []
    for i, kind in enumerate(saved.block_types):
        cls = RecurrentState if kind == BlockType.RECURRENT else AttentionState
        blocks.append(cls(*(tensors[f"blocks.{i}.{name}"] for name in cls._fields)))
    next_pos = tensors["next_pos"]
    if next_pos.ndim != 1:
        raise bad(f"'next_pos' has shape {tuple(next_pos.shape)}, expected (batch,)")
    state = GriffinState(tuple(blocks), next_pos)
    _check_state_dtypes(state, saved, bad)
    try:
        check_state(state, saved, state.batch_size)
    except InputError as err:
        raise bad(str(err)) from None
    _check_state_values(state, bad)
    if meta.get("layout") != STATE_LAYOUT:  # saved before the ring buffer: oldest first
        blocks = [ring_layout(s) if isinstance(s, AttentionState) else s for s in state.blocks]
        state = state._replace(blocks=tuple(blocks))
    return state


# ----------------------------------------------------------------------------------
# Checks of a state read from a file (load_state)
# ----------------------------------------------------------------------------------
def _state_keys(config: GriffinConfig) -> set[str]:
    keys = {"next_pos"}
    for i, kind in enumerate(config.block_types):
        cls = RecurrentState if kind == BlockType.RECURRENT else AttentionState
        keys.update(f"blocks.{i}.{name}" for name in cls._fields)
    return keys


def _check_state_keys(config: GriffinConfig, keys: set[str], bad) -> None:
    """The file's tensor names against the config's: the number of blocks first (a
    config declaring a million blocks fails here), then missing and unexpected names."""
    blocks = {k.split(".")[1] for k in keys if k.startswith("blocks.") and k.count(".") == 2}
    if len(blocks) != config.num_layers:
        raise bad(
            f"its config declares {config.num_layers} blocks but it holds tensors for {len(blocks)}"
        )
    expected = _state_keys(config)
    missing, unexpected = sorted(expected - keys), sorted(keys - expected)
    if missing:
        raise bad(f"missing tensor(s) {', '.join(map(repr, missing[:6]))}")
    if unexpected:
        raise bad(f"unexpected tensor(s) {', '.join(map(repr, unexpected[:6]))}")


def _check_state_dtypes(state: GriffinState, config: GriffinConfig, bad) -> None:
    """Fields whose dtype `init_state` fixes (float32 RG-LRU state, int64 positions)
    must have it; the others (conv inputs, keys, values) one floating dtype."""
    batch = state.batch_size
    as_f16 = init_state(config, batch, device="meta", dtype=torch.float16)
    as_bf16 = init_state(config, batch, device="meta", dtype=torch.bfloat16)
    activation: torch.dtype | None = None
    named = [("next_pos", state.next_pos, as_f16.next_pos, as_bf16.next_pos)]
    for i, (s, a, b) in enumerate(zip(state.blocks, as_f16.blocks, as_bf16.blocks)):
        named += [(f"blocks.{i}.{n}", *ts) for n, *ts in zip(s._fields, s, a, b)]
    for name, got, a, b in named:
        if a.dtype == b.dtype:
            if got.dtype != a.dtype:
                raise bad(f"tensor {name!r} has dtype {got.dtype}, expected {a.dtype}")
        elif not got.dtype.is_floating_point:
            raise bad(f"tensor {name!r} has dtype {got.dtype}, expected a floating dtype")
        elif activation is None:
            activation = got.dtype
        elif got.dtype != activation:
            raise bad(f"tensor {name!r} has dtype {got.dtype}, the other activations {activation}")


def _check_state_values(state: GriffinState, bad) -> None:
    """Floating tensors finite; integer ones (positions) >= -1, `next_pos` >= 0."""
    if state.next_pos.numel() and int(state.next_pos.min()) < 0:
        raise bad(f"'next_pos' has a negative value {int(state.next_pos.min())}")
    for i, s in enumerate(state.blocks):
        for name, t in zip(s._fields, s):
            if t.dtype.is_floating_point:
                if not bool(torch.isfinite(t).all()):
                    raise bad(f"tensor 'blocks.{i}.{name}' has non-finite values (NaN or inf)")
            elif t.numel() and int(t.min()) < -1:
                raise bad(f"tensor 'blocks.{i}.{name}' has a value {int(t.min())} < -1")
