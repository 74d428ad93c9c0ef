"""The Griffin / RecurrentGemma network, read top to bottom, smallest part first.

Papers: Griffin (arXiv 2402.19427) section 2; RecurrentGemma (arXiv 2404.07839).
Official counterpart: `recurrentgemma.torch.{layers,modules,griffin}`; state_dict
keys and shapes are the official ones, so an official state_dict loads with
`load_state_dict(strict=True)` (parameter names too, except the MLP's up projection:
two `nn.Linear`s inside, `ffw_up.gate_proj` / `ffw_up.up_proj`, see `MLPBlock`).

Dimension letters: b batch, t time (new tokens), s keys (window + new tokens),
d width, e LRU width, m MLP width, h heads, hd head dim, w window, v vocabulary.

`segment_pos` (b, t) int: each token's position within its document; 0 starts a
document (resets the RG-LRU, cuts the Conv1D window, starts a new attention
segment); -1 marks padding, before, after or between a row's real tokens. Padding
is invisible: no real token sees it, the RG-LRU carries its state through it, the
Conv1D reaches over it, it takes no attention slot, and a row's returned state is the
state after its last real token (so rows can be padded on either side).

The numeric kernels (RG-LRU scan, Conv1D, local attention, linear) come from
`rgemma.ops`, each beside its reference and chosen per device.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import BlockType, GriffinConfig
from .errors import InputError
from .ops import (
    conv1d,
    decode_attention,
    linear,
    linear_epilogue,
    linear_scan,
    local_attention,
    rglru_gates,
)
from .ops.rglru import SqrtBoundDerivative
from .state import AttentionState, GriffinState, RecurrentState, _map, check_state, init_state

LogitsMode = Literal["all", "last", "none"]

#: Local attention runs over queries in chunks of this many tokens, so its logits
#: are never larger than (chunk x (window + chunk)) per head: memory linear in time.
ATTENTION_QUERY_CHUNK = 1024


# ----------------------------------------------------------------------------------
# Small layers
# ----------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + 1e-6) * (1 + scale)`, computed in float32.

    Official: `recurrentgemma.torch.layers.RMSNorm` (scale initialised to 0).
    """

    def __init__(self, width: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.zeros(width, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        var = x32.pow(2).mean(dim=-1, keepdim=True)
        return (x32 * torch.rsqrt(var + self.eps) * (1.0 + self.scale.float())).to(x.dtype)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state_dict keys) computed with `ops.linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def _plain(*modules: nn.Module) -> bool:
    """Whether every module is a plain `Linear` without hooks (not LoRA-wrapped,
    quantized or hooked), so its matmul may take a fused epilogue."""
    return all(
        type(m) is Linear and not (m._forward_hooks or m._forward_pre_hooks) for m in modules
    )


class Embedder(nn.Module):
    """Token embedding, tied with the output head.

    `encode`: E[token] * sqrt(d) (the scale rounded to bfloat16, as in every official
    path: 50.5 for the 2B model). `decode`: x @ E^T.
    """

    def __init__(self, vocab_size: int, width: int, scale: float, device=None, dtype=None):
        super().__init__()
        self.scale = scale
        self.input_embedding = nn.Parameter(
            torch.empty(vocab_size, width, device=device, dtype=dtype)
        )

    def encode(self, tokens: Tensor) -> Tensor:
        x = F.embedding(tokens, self.input_embedding)  # (b, t, d)
        return x * self.scale if self.scale != 1.0 else x

    def decode(self, x: Tensor) -> Tensor:
        return linear(x, self.input_embedding)  # (b, t, v)


class BlockDiagonalLinear(nn.Module):
    """`y[..., h, j] = sum_i x[..., h, i] w[h, i, j] + b[h, j]`: `num_blocks` independent
    square linears (the RG-LRU gates). Official: `layers.BlockDiagonalLinear`."""

    def __init__(self, width: int, num_blocks: int, device=None, dtype=None):
        super().__init__()
        self.num_blocks = num_blocks
        bw = width // num_blocks
        self.w = nn.Parameter(torch.empty(num_blocks, bw, bw, device=device, dtype=dtype))
        self.b = nn.Parameter(torch.zeros(num_blocks, bw, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        *lead, e = x.shape
        xh = x.reshape(-1, self.num_blocks, e // self.num_blocks).transpose(0, 1)  # (h, n, i)
        y = torch.baddbmm(self.b[:, None, :], xh, self.w)  # (h, n, j)
        return y.transpose(0, 1).reshape(*lead, e)


# sqrt with its derivative clipped at 1000 (Griffin section 2.4), used by the RG-LRU
# gates; it lives beside them in `ops.rglru`.
_SqrtBoundDerivative = SqrtBoundDerivative


# ----------------------------------------------------------------------------------
# Temporal mixing: Conv1D, RG-LRU, recurrent block, local attention
# ----------------------------------------------------------------------------------
class Conv1D(nn.Module):
    """Depthwise causal convolution of temporal width k+1 = 4, with bias.

    `out[t] = b + sum_{j=0..k} w[k-j] * x[t-j]`, where the tap j is dropped when it
    would reach across a document start (segment_pos[t] < j). The state carries the
    last k inputs, so any split of a sequence into calls gives the same output.
    Padding (segment_pos -1, given as `pad`) is skipped: a real input's taps reach the
    real inputs before it, and the new state holds the last k real inputs.
    Official: `layers.Conv1D` (weight `w` of shape (k+1, e)), which has no padding
    except on the left of a document start. Computed by `ops.conv1d`.
    """

    def __init__(self, width: int, temporal_width: int, device=None, dtype=None):
        super().__init__()
        self.temporal_width = temporal_width
        self.w = nn.Parameter(torch.empty(temporal_width, width, device=device, dtype=dtype))
        self.b = nn.Parameter(torch.zeros(width, device=device, dtype=dtype))

    def forward(
        self, x: Tensor, segment_pos: Tensor, conv_state: Tensor, pad: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """x: (b, t, e); segment_pos: (b, t); conv_state: (b, k, e); pad: None or (b, t)
        bool, True at padding -> (out (b, t, e), new state (b, k, e)). The output at a
        padding position is meaningless (no later layer reads it)."""
        if pad is None:
            return conv1d(x, segment_pos, conv_state, self.w, self.b)
        b, t, e = x.shape
        k = self.temporal_width - 1
        # Move each row's padding in front of its state (the order of the real inputs
        # kept), so every real input follows the real inputs before it; then the plain
        # conv, and each output back to its place. Sort keys are unique: no ties.
        real = torch.cat([pad.new_ones(b, k), ~pad], dim=1)  # (b, k + t); the state is real
        index = torch.arange(k + t, device=x.device)
        order = torch.argsort(real.long() * (k + t) + index, dim=1)  # (b, k + t): padding first
        ctx = torch.cat([conv_state.to(x.dtype), x], dim=1)  # (b, k + t, e)
        ctx = ctx.gather(1, order[..., None].expand(b, k + t, e))
        # The state's inputs land among the new ones as padding: outputs nobody reads.
        pos = torch.cat([segment_pos.new_full((b, k), -1), segment_pos], dim=1).gather(1, order)
        out, new_state = conv1d(ctx[:, k:], pos[:, k:], ctx[:, :k], self.w, self.b)
        where = torch.empty_like(order).scatter_(1, order, index.expand(b, k + t))  # inverse
        src = (where[:, k:] - k).clamp(min=0)  # (b, t): input i's output in `out`
        return out.gather(1, src[..., None].expand(b, t, e)), new_state


def init_rg_lru_a_param(param: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Fill `param` (any shape, device, dtype) with the official RG-LRU initialisation.

    The decay at full gate, `a = exp(-softplus(a_param))`, has a^2 uniform in
    [0.9^2, 0.999^2]: `a_param = log(exp(-0.5 * log(u)) - 1)`, u ~ U(0.81, 0.998).
    Drawn in float32 on the CPU from `generator`, so a seed gives the same values on
    any device. Official: `recurrentgemma.torch.layers.rnn_param_init(min_rad=0.9,
    max_rad=0.999)`. Returns `param`, filled in place.
    """
    u = torch.rand(param.shape, generator=generator) * (0.999**2 - 0.9**2) + 0.9**2
    with torch.no_grad():
        param.copy_(torch.log(torch.expm1(-0.5 * torch.log(u))))
    return param


class RGLRU(nn.Module):
    """Real-Gated Linear Recurrent Unit (Griffin section 2.4). Official: `layers.RGLRU`.

        gate_x = sigmoid(W_x x + b_x),  gate_a = sigmoid(W_a x + b_a)
        log_a = -8 * gate_a * softplus(a_param)
        h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (gate_x * x_t)

    and at a document start (segment_pos == 0): a = 0, multiplier 1; at padding (`pad`)
    a = 1 and input 0, so h passes through unchanged. Gates and
    recurrence run in float32 whatever the activation dtype; the recurrence is
    `ops.linear_scan`. `a_param` is initialised by `init_rg_lru_a_param`.
    """

    def __init__(self, width: int, num_heads: int, device=None, dtype=None):
        super().__init__()
        self.a_param = nn.Parameter(torch.empty(width, device=device, dtype=dtype))
        self.input_gate = BlockDiagonalLinear(width, num_heads, device=device, dtype=dtype)
        self.a_gate = BlockDiagonalLinear(width, num_heads, device=device, dtype=dtype)

    def forward(
        self, x: Tensor, segment_pos: Tensor, h0: Tensor, pad: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """x: (b, t, e); segment_pos: (b, t); h0: (b, e) float32; pad: None or (b, t)
        bool, True at padding -> (y (b, t, e), h_last (b, e) float32)."""
        # The gates' element-wise math (sigmoids, decay, sqrt(1 - a^2) with its bounded
        # derivative, document starts and padding): `ops.rglru_gates`, float32.
        gate_x, gate_a = self.input_gate(x), self.a_gate(x)  # (b, t, e) pre-activations
        a, normed_x = rglru_gates(x, gate_x, gate_a, self.a_param, segment_pos, pad)
        y, h_last = linear_scan(a, normed_x, h0)
        return y.to(x.dtype), h_last


class RecurrentBlock(nn.Module):
    """Griffin's recurrent temporal block (Griffin figure 2):
    `linear_out(gelu(linear_y(x)) * RG-LRU(Conv1D(linear_x(x))))`.
    Official: `modules.RecurrentBlock`."""

    def __init__(self, config: GriffinConfig, device=None, dtype=None):
        super().__init__()
        d, e = config.width, config.lru_width
        kw = {"device": device, "dtype": dtype}
        self.linear_y = Linear(d, e, **kw)
        self.linear_x = Linear(d, e, **kw)
        self.linear_out = Linear(e, d, **kw)
        self.conv_1d = Conv1D(e, config.conv1d_temporal_width, **kw)
        self.rg_lru = RGLRU(e, config.num_heads, **kw)

    def forward(
        self,
        x: Tensor,
        segment_pos: Tensor,
        state: RecurrentState,
        donate: bool = False,
        pad: Tensor | None = None,
    ) -> tuple[Tensor, RecurrentState]:
        """`donate` is accepted for a uniform block call; the (small) recurrent state is
        always returned as new tensors. `pad`: None (no padding) or (b, t) bool."""
        if _plain(self.linear_y):  # the GELU fused into the matmul where it pays
            y = linear_epilogue(x, self.linear_y.weight, self.linear_y.bias, "gelu_tanh")
        else:
            y = F.gelu(self.linear_y(x), approximate="tanh")  # (b, t, e)
        x, conv_state = self.conv_1d(self.linear_x(x), segment_pos, state.conv, pad)
        x, h = self.rg_lru(x, segment_pos, state.rg_lru, pad)
        return self.linear_out(x * y), RecurrentState(rg_lru=h, conv=conv_state)


def apply_rope(x: Tensor, positions: Tensor, max_wavelength: float = 10_000.0) -> Tensor:
    """Rotary embedding on the first half of the last dim (rotate-half style).

    x: (b, t, ..., hd); positions: (b, t). Official: `modules._apply_rope`.
    """
    rope_dim = x.shape[-1] // 2
    x_rope, x_pass = x[..., :rope_dim], x[..., rope_dim:]
    freq_exponents = 2.0 * torch.arange(rope_dim // 2, device=x.device) / rope_dim
    inv_freq = 1.0 / (max_wavelength**freq_exponents)  # (rope_dim / 2,)
    pos = positions.reshape(*positions.shape, *([1] * (x.ndim - 2)))  # (b, t, 1.., 1)
    angles = pos.to(torch.float32) * inv_freq  # (b, t, ..., rope_dim / 2)
    sin, cos = torch.sin(angles), torch.cos(angles)
    first, second = x_rope.float().chunk(2, dim=-1)
    rotated = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
    return torch.cat([rotated.to(x.dtype), x_pass], dim=-1)


class LocalAttentionBlock(nn.Module):
    """Local multi-query attention (one key/value head) with RoPE.

    Official: `modules.LocalAttentionBlock`. The state's window is a ring buffer
    (`rgemma.state.AttentionState`): the key of position p lives in slot p % w.

    * A decode step (t == 1) attends over the window plus its own key without
      concatenating them (`ops.decode_attention`), then writes its key into its slot:
      O(1) writes per step. With `donate=True` the state's window is written in place
      (the engine's decode step), else into a copy.
    * A longer call runs in query chunks of `ATTENTION_QUERY_CHUNK` tokens against the
      window plus the chunk, so the attention logits are never larger than
      (chunk x (window + chunk)) per head: memory is linear in t. From a fresh state
      (an empty window: every training step) the chunks attend to the new tokens
      only, without the ring (`_prefill`). The attention itself is
      `ops.local_attention`.
    """

    def __init__(self, config: GriffinConfig, device=None, dtype=None):
        super().__init__()
        d, hd = config.width, config.head_dim
        kw = {"device": device, "dtype": dtype}
        self.num_heads, self.head_dim = config.num_heads, hd
        self.window = config.attention_window_size
        self.rope_max_wavelength = config.rope_max_wavelength
        self.proj_q = Linear(d, d, bias=False, **kw)
        self.proj_k = Linear(d, hd, bias=False, **kw)
        self.proj_v = Linear(d, hd, bias=False, **kw)
        self.proj_final = Linear(d, d, bias=True, **kw)

    def forward(
        self,
        x: Tensor,
        segment_pos: Tensor,
        state: AttentionState,
        donate: bool = False,
        pad: Tensor | None = None,
    ) -> tuple[Tensor, AttentionState]:
        """x (b, t, d), segment_pos (b, t) -> (out (b, t, d), new state). `pad` is
        accepted for a uniform block call: padding is read from segment_pos < 0 (its
        keys are never visible, and it writes no slot)."""
        b, t, _ = x.shape
        q = self.proj_q(x).view(b, t, self.num_heads, self.head_dim)  # (b, t, h, hd)
        q = apply_rope(q, segment_pos, self.rope_max_wavelength) * self.head_dim**-0.5
        k = apply_rope(self.proj_k(x), segment_pos, self.rope_max_wavelength)  # (b, t, hd)
        v = self.proj_v(x)  # (b, t, hd)
        if t == 1:
            out, new_state = self._step(q[:, 0], k[:, 0], v[:, 0], segment_pos[:, 0], state, donate)
        else:
            out, new_state = self._prefill(q, k, v, segment_pos, state)
        return self.proj_final(out.reshape(b, t, -1)), new_state

    def _step(
        self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, state: AttentionState, donate: bool
    ) -> tuple[Tensor, AttentionState]:
        """One token per row: q (b, h, hd), k, v (b, hd), pos (b,) -> ((b, h, hd), state)."""
        keys, values, positions = state
        if not (donate and keys.dtype == k.dtype and _writable(keys, values, positions)):
            keys = keys.to(k.dtype, memory_format=torch.contiguous_format, copy=True)
            values = values.to(v.dtype, memory_format=torch.contiguous_format, copy=True)
            positions = positions.clone(memory_format=torch.contiguous_format)
        out = decode_attention(q, k, v, keys, values, positions, pos, self.window)  # (b, h, hd)
        # The ring write: slot pos % w holds the key w positions back, which this query
        # has just seen and no later one can. A document start hides every earlier key;
        # a padded token (pos -1) writes nothing.
        rows = torch.arange(pos.shape[0], device=pos.device)
        slot = pos.remainder(positions.shape[1])  # (b,)
        keep = (pos < 0)[:, None]  # (b, 1)
        positions.masked_fill_((pos == 0)[:, None], -1)
        keys[rows, slot] = torch.where(keep, keys[rows, slot], k)
        values[rows, slot] = torch.where(keep, values[rows, slot], v)
        positions[rows, slot] = torch.where(keep[:, 0], positions[rows, slot], pos)
        return out, AttentionState(keys, values, positions)

    def _prefill(
        self, q: Tensor, k: Tensor, v: Tensor, segment_pos: Tensor, state: AttentionState
    ) -> tuple[Tensor, AttentionState]:
        """t tokens per row: q (b, t, h, hd), k, v (b, t, hd) -> ((b, t, h, hd), state).

        From a fresh state (no valid key in the window) whose new tokens are in order
        (`_keys_in_order`), each query chunk attends to new tokens only: itself and
        the `window` tokens before it, sliced from k and v (no empty slots, no ring
        copies), and the ring is written once at the end. Otherwise each chunk
        attends to the ring followed by itself, then is written into the ring (a fresh
        state's first chunk still skips the empty ring).
        """
        # Document index of each new token: 0 continues the state's document.
        doc = torch.cumsum((segment_pos == 0).long(), dim=1)  # (b, t)
        ring_k, ring_v = state.keys.to(k.dtype), state.values.to(v.dtype)  # (b, w, hd)
        ring_pos = state.positions  # (b, w)
        ring_doc = torch.zeros_like(ring_pos)
        # One host sync per call (never in a decode step).
        fresh = ~(ring_pos >= 0).any()
        fresh, in_order = torch.stack([fresh, _keys_in_order(segment_pos)]).tolist()
        direct = fresh and in_order
        outs = []
        for start in range(0, segment_pos.shape[1], ATTENTION_QUERY_CHUNK):
            end = start + ATTENTION_QUERY_CHUNK
            q_pos, q_doc = segment_pos[:, start:end], doc[:, start:end]
            if direct or (fresh and start == 0):  # query i is key start - lo + i
                lo = max(0, start - self.window)
                ctx_k, ctx_v = k[:, lo:end], v[:, lo:end]  # (b, s, hd)
                ctx_pos, ctx_doc = segment_pos[:, lo:end], doc[:, lo:end]  # (b, s)
                offset = start - lo
            else:  # query i is key w + i
                ctx_k = torch.cat([ring_k, k[:, start:end]], dim=1)  # (b, s, hd)
                ctx_v = torch.cat([ring_v, v[:, start:end]], dim=1)
                ctx_pos = torch.cat([ring_pos, q_pos], dim=1)  # (b, s)
                ctx_doc = torch.cat([ring_doc, q_doc], dim=1)
                offset = ring_pos.shape[1]
            qc = q[:, start:end]  # (b, chunk, h, hd)
            ctx = (ctx_k, ctx_v, q_pos, ctx_pos, q_doc, ctx_doc)
            outs.append(local_attention(qc, *ctx, self.window, offset))  # (b, chunk, h, hd)
            if not direct:
                new = (k[:, start:end], v[:, start:end], q_pos, q_doc)
                ring_k, ring_v, ring_pos, ring_doc = _ring_write(
                    (ring_k, ring_v, ring_pos, ring_doc), new, q_pos
                )
        if direct:  # every new token at once; the latest of each slot wins
            ring_k, ring_v, ring_pos, ring_doc = _ring_write(
                (ring_k, ring_v, ring_pos, ring_doc), (k, v, segment_pos, doc), segment_pos
            )
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]  # (b, t, h, hd)
        # Keys of documents before the row's last one can never be seen again.
        ring_pos = ring_pos.masked_fill(ring_doc != doc[:, -1:], -1)
        return out, AttentionState(ring_k, ring_v, ring_pos)


def _keys_in_order(segment_pos: Tensor) -> Tensor:
    """0-dim bool: in every row, the keys any query sees are among the `window` tokens
    before it, so a fresh prefill can slice them from the new tokens.

    True when, in each row, positions rise by at least 1 from a real token to the next
    within a document (a document restarts at 0) and no padding sits between real
    tokens (padding before the first or after the last is fine): a visible key i of
    query j (same document) then has j - i <= pos_j - pos_i <= window.
    segment_pos: (b, t) int, -1 at padding.
    """
    real = segment_pos >= 0  # (b, t)
    prev, nxt = segment_pos[:, :-1], segment_pos[:, 1:]  # (b, t - 1)
    rising = (nxt > prev) | (nxt == 0) | (prev < 0) | (nxt < 0)
    before = torch.cumsum(real, dim=1) > 0  # a real token at or before
    after = torch.cumsum(real.flip(1), dim=1).flip(1) > 0  # a real token at or after
    return rising.all() & ~(~real & before & after).any()


def _writable(*tensors: Tensor) -> bool:
    """Every tensor row-major and owning its elements (no broadcast views such as
    `GriffinState.expand`'s), so writing one slot changes one row's slot only."""
    return all(_dense(t) is t and t.stride()[0] != 0 for t in tensors)


def _ring_write(ring: tuple[Tensor, ...], new: tuple[Tensor, ...], pos: Tensor):
    """Write c new tokens into a ring of w slots: token i goes to slot pos[i] % w, the
    latest token winning a slot; tokens with pos < 0 (padding) write nothing.

    ring: tensors (b, w, ...); new: the matching (b, c, ...); pos (b, c) int64.
    Returns new tensors (the ring is not modified).
    """
    b, w = ring[0].shape[:2]
    c = pos.shape[1]
    slot = torch.where(pos >= 0, pos.remainder(w), w)  # (b, c); w: a slot for nothing
    order = torch.arange(c, device=pos.device).expand(b, c)
    latest = torch.full((b, w + 1), -1, dtype=torch.long, device=pos.device)
    latest = latest.scatter_reduce(1, slot, order, "amax")[:, :w]  # (b, w): -1 = not written
    hit, src = latest >= 0, latest.clamp(min=0)
    out = []
    for old, upd in zip(ring, new):
        if upd.ndim == 3:  # (b, c, hd)
            got = upd.gather(1, src[..., None].expand(b, w, upd.shape[2]))
            out.append(torch.where(hit[..., None], got, old))
        else:  # (b, c)
            out.append(torch.where(hit, upd.gather(1, src), old))
    return tuple(out)


# ----------------------------------------------------------------------------------
# MLP, residual block, model
# ----------------------------------------------------------------------------------
class GatedUpProjection(nn.Module):
    """The MLP's two up projections, `gate_proj` (official half 0, the one through the
    GELU) and `up_proj` (half 1): each a `Linear(d, m)`, weight (m, d) in nn.Linear's
    layout and bias (m,), so PEFT and `rgemma.lora` reach each one like any linear.

    `state_dict()` gives, and `load_state_dict()` takes, the official tensors instead:
    `w` (2, d, m) = stack(gate.weight.T, up.weight.T) and `b` (2, 1, 1, m), a
    contiguous copy per call (the internal names `gate_proj.weight` etc. load too).
    Any other module under `gate_proj` / `up_proj` (a LoRA wrapper's `lora_A.weight`)
    keeps its own keys. Official: `ffw_up` of `modules.MLPBlock`, an `Einsum`.
    """

    def __init__(self, width: int, expanded_width: int, device=None, dtype=None):
        super().__init__()
        # Uninitialised (`Griffin.reset_parameters` draws them, in the official (2, d, m)
        # order): nn.Linear's own init would consume the RNG, changing the model a seed
        # gives compared with the single (2, m, d) parameter this replaced.
        kw = {"device": device if device is not None else torch.get_default_device()}
        self.gate_proj = nn.utils.skip_init(Linear, width, expanded_width, dtype=dtype, **kw)
        self.up_proj = nn.utils.skip_init(Linear, width, expanded_width, dtype=dtype, **kw)
        self.register_state_dict_post_hook(_up_to_official)
        self.register_load_state_dict_pre_hook(_up_from_official)

    @property
    def w(self) -> Tensor:
        """The official weight (2, d, m), a new tensor."""
        return torch.stack([self.gate_proj.weight.T, self.up_proj.weight.T])

    @property
    def b(self) -> Tensor:
        """The official bias (2, 1, 1, m), a new tensor."""
        return torch.stack([self.gate_proj.bias, self.up_proj.bias]).reshape(2, 1, 1, -1)


_UP_HALVES = ("gate_proj", "up_proj")


def _up_to_official(module, state_dict, prefix, local_metadata) -> None:
    """state_dict hook: `gate_proj` / `up_proj` weights (m, d) and biases (m,) -> the
    official `w` (2, d, m) and `b` (2, 1, 1, m), each one contiguous copy (as big as
    the copy a checkpoint writer makes anyway; meta tensors stay meta)."""
    w = [state_dict.pop(f"{prefix}{half}.weight") for half in _UP_HALVES]
    b = [state_dict.pop(f"{prefix}{half}.bias") for half in _UP_HALVES]
    state_dict[prefix + "w"] = torch.stack([w[0].T, w[1].T])  # (2, d, m)
    state_dict[prefix + "b"] = torch.stack(b).reshape(2, 1, 1, -1)  # (2, 1, 1, m)


def _up_from_official(
    module, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs
) -> None:
    """load_state_dict pre-hook: the official `w` (2, d, m) and `b` (2, 1, 1, m) ->
    `gate_proj` / `up_proj` weights (m, d) and biases (m,). A tensor of another shape
    is reported (named by its official key) and not loaded."""
    m, d = module.gate_proj.weight.shape
    for key, shape in (("w", (2, d, m)), ("b", (2, 1, 1, m))):
        t = state_dict.get(prefix + key)
        if not isinstance(t, Tensor):
            continue
        del state_dict[prefix + key]
        if tuple(t.shape) != shape:
            error_msgs.append(
                f"size mismatch for {prefix}{key}: copying a param with shape "
                f"{tuple(t.shape)} from checkpoint, the shape in current model is {shape}."
            )
            continue
        for j, half in enumerate(_UP_HALVES):
            if key == "w":  # (d, m) -> (m, d), contiguous: a parameter of its own
                state_dict[f"{prefix}{half}.weight"] = t[j].T.contiguous()
            else:
                state_dict[f"{prefix}{half}.bias"] = t[j].reshape(m)


class MLPBlock(nn.Module):
    """Gated MLP: `ffw_down(gelu_tanh(gate_proj(x)) * up_proj(x))`, where
    `ffw_up.gate_proj(x) = x W0 + b0` and `ffw_up.up_proj(x) = x W1 + b1`.

    Official: `modules.MLPBlock`, with `ffw_up.w` of shape (2, d, m) and `ffw_up.b`
    of shape (2, 1, 1, m): the keys and shapes `state_dict()` returns and
    `load_state_dict()` takes (`GatedUpProjection`). Inside, the two halves are two
    `Linear`s with (m, d) weights, which PEFT / `rgemma.lora` can wrap one by one: on
    CPU a bfloat16 vector-matrix product over the (d, m) layout ran at half the speed
    (measured in benchmarks/RESULTS.md); two (m, d) products read the same bytes as
    one (2m, d) (the quantized MLP concatenates them once).
    """

    def __init__(self, width: int, expanded_width: int, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.ffw_up = GatedUpProjection(width, expanded_width, **kw)
        self.ffw_down = Linear(expanded_width, width, **kw)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """x (b, t, d) -> (b, t, d); with `residual` (b, t, d), `residual + mlp(x)`.
        The GELU, the product and the residual add run as matmul epilogues
        (`ops.linear_epilogue`) when the three projections are plain `Linear`s."""
        gate_proj, up_proj, down = self.ffw_up.gate_proj, self.ffw_up.up_proj, self.ffw_down
        if _plain(gate_proj, up_proj, down):  # each element-wise op fused into a matmul
            gate = linear_epilogue(x, gate_proj.weight, gate_proj.bias, "gelu_tanh")
            gate = linear_epilogue(x, up_proj.weight, up_proj.bias, "mul", gate)  # (b, t, m)
            if residual is None:
                return linear(gate, down.weight, down.bias)
            return linear_epilogue(gate, down.weight, down.bias, "add", residual)
        gate = F.gelu(gate_proj(x), approximate="tanh")  # (b, t, m)
        out = down(gate * up_proj(x))
        return out if residual is None else residual + out


class ResidualBlock(nn.Module):
    """`h = x + temporal(norm(x))`; `out = h + mlp(norm(h))`. Official: `ResidualBlock`."""

    def __init__(self, config: GriffinConfig, block_type: BlockType, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.block_type = block_type
        self.temporal_pre_norm = RMSNorm(config.width, **kw)
        if block_type == BlockType.RECURRENT:
            self.recurrent_block = RecurrentBlock(config, **kw)
        else:
            self.attention_block = LocalAttentionBlock(config, **kw)
        self.channel_pre_norm = RMSNorm(config.width, **kw)
        self.mlp_block = MLPBlock(config.width, config.mlp_expanded_width, **kw)

    @property
    def temporal_block(self) -> nn.Module:
        if self.block_type == BlockType.RECURRENT:
            return self.recurrent_block
        return self.attention_block

    def forward(
        self, x: Tensor, segment_pos: Tensor, state, donate: bool = False, pad: Tensor | None = None
    ):
        """x (b, t, d) -> (out (b, t, d), new block state); `pad` as in `Griffin.forward`."""
        y, state = self.temporal_block(self.temporal_pre_norm(x), segment_pos, state, donate, pad)
        x = x + y
        if isinstance(self.mlp_block, MLPBlock):  # the residual add fused into ffw_down
            return self.mlp_block(self.channel_pre_norm(x), residual=x), state
        return x + self.mlp_block(self.channel_pre_norm(x)), state


def _dense(t: Tensor) -> Tensor:
    """`t` with row-major strides, size-1 dimensions included (`contiguous()` keeps
    any stride on those, and a compiled step guards on strides)."""
    stride, expect = t.stride(), []
    acc = 1
    for n in reversed(t.shape):
        expect.append(acc)
        acc *= n
    if tuple(reversed(expect)) == stride:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _padding_to_skip(segment_pos: Tensor) -> Tensor | None:
    """(b, t) bool, True at padding (segment_pos < 0), or None when no padding needs
    skipping: none at all, or only left padding before a document start (segment_pos
    0), which the document start already cuts off (the RG-LRU resets, the Conv1D taps
    stop), the common batched-prompt case, left on the plain path. One host sync."""
    pad = segment_pos < 0  # (b, t)
    seen_real = torch.cumsum(~pad, dim=1) > 0  # (b, t): a real token at or before
    first = (~pad).long().argmax(dim=1, keepdim=True)  # (b, 1): first real token
    starts = segment_pos.gather(1, first)[:, 0] == 0  # (b,)
    plain_row = ~pad.any(dim=1) | (~(pad & seen_real).any(dim=1) & seen_real[:, -1] & starts)
    return None if bool(plain_row.all()) else pad


class Griffin(nn.Module):
    """The Griffin / RecurrentGemma language model.

    Args:
        config: the `GriffinConfig`.
        device, dtype: where and in which dtype to create the parameters. Use
            `device="meta"` to build without allocating (e.g. before loading weights).

    Official: `recurrentgemma.torch.Griffin` (same parameter names and shapes).
    """

    def __init__(self, config: GriffinConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        kw = {"device": device, "dtype": dtype}
        self.embedder = Embedder(config.vocab_size, config.width, config.embedding_scale, **kw)
        self.blocks = nn.ModuleList(ResidualBlock(config, bt, **kw) for bt in config.block_types)
        self.final_norm = RMSNorm(config.width, **kw)
        if torch.device(device or "cpu").type != "meta":
            self.reset_parameters()

    # ------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Random initialisation following the official recipe's scales (variance
        scaling by fan-in; output projections scaled by 2 / num_layers; RG-LRU
        `a_param` by `init_rg_lru_a_param`)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        cfg = self.config
        out_scale = 2.0 / cfg.num_layers

        def normal_(p: Tensor, std: float) -> None:
            p.normal_(0.0, std, generator=gen)  # in place: no float32 temporary

        normal_(self.embedder.input_embedding, 1.0 / math.sqrt(cfg.width))
        for block in self.blocks:
            for name, p in block.named_parameters():
                if p.ndim == 1 or name.endswith(".b"):  # biases (the RG-LRU gates' are 2-D)
                    p.zero_()
            mlp = block.mlp_block
            # Drawn in the official (2, d, m) order, so a seed gives the same model as before.
            gate, up = mlp.ffw_up.gate_proj.weight, mlp.ffw_up.up_proj.weight  # (m, d) each
            both = torch.empty(2, *gate.T.shape, dtype=gate.dtype)  # (2, d, m)
            normal_(both, 1.0 / math.sqrt(cfg.width))
            gate.copy_(both[0].T)
            up.copy_(both[1].T)
            normal_(mlp.ffw_down.weight, math.sqrt(out_scale / cfg.mlp_expanded_width))
            tb = block.temporal_block
            if block.block_type == BlockType.RECURRENT:
                for lin in (tb.linear_x, tb.linear_y):
                    normal_(lin.weight, 1.0 / math.sqrt(cfg.width))
                normal_(tb.linear_out.weight, math.sqrt(out_scale / cfg.lru_width))
                normal_(tb.conv_1d.w, 1.0 / math.sqrt(cfg.conv1d_temporal_width * 1.0))
                bw = cfg.lru_width // cfg.num_heads
                normal_(tb.rg_lru.input_gate.w, 1.0 / math.sqrt(bw))
                normal_(tb.rg_lru.a_gate.w, 1.0 / math.sqrt(bw))
                init_rg_lru_a_param(tb.rg_lru.a_param, gen)
            else:
                for lin in (tb.proj_q, tb.proj_k, tb.proj_v):
                    normal_(lin.weight, 1.0 / math.sqrt(cfg.width))
                normal_(tb.proj_final.weight, math.sqrt(out_scale / cfg.width))

    def init_state(self, batch_size: int) -> GriffinState:
        """An empty state for `batch_size` rows, on the model's device and dtype."""
        p = self.embedder.input_embedding
        return init_state(self.config, batch_size, device=p.device, dtype=p.dtype)

    def state_nbytes(self, batch_size: int = 1) -> int:
        """Bytes of the state for `batch_size` rows (fixed, whatever the length)."""
        return init_state(
            self.config, batch_size, device="meta", dtype=self.embedder.input_embedding.dtype
        ).nbytes()

    # ------------------------------------------------------------------------------
    def _check_inputs(self, tokens: Tensor, segment_pos: Tensor | None) -> None:
        if not isinstance(tokens, Tensor) or tokens.ndim != 2:
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise InputError(f"tokens must be an int tensor of shape (batch, time), got {shape}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise InputError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        if 0 in tokens.shape:
            raise InputError(
                f"tokens must have at least one row and one time step, "
                f"got shape {tuple(tokens.shape)}"
            )
        if tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise InputError(
                    f"token id {bad} is out of range [0, {self.config.vocab_size}) "
                    f"for vocab_size {self.config.vocab_size}"
                )
        if segment_pos is not None:
            if not isinstance(segment_pos, Tensor) or segment_pos.shape != tokens.shape:
                got = tuple(segment_pos.shape) if isinstance(segment_pos, Tensor) else segment_pos
                raise InputError(
                    f"segment_pos must have the shape of tokens {tuple(tokens.shape)}, got {got}"
                )
            if segment_pos.is_floating_point() or segment_pos.dtype == torch.bool:
                raise InputError(f"segment_pos must be an integer tensor, got {segment_pos.dtype}")
            if bool((segment_pos < -1).any()):
                raise InputError(
                    f"segment_pos must be >= -1 (-1 marks padding), got {int(segment_pos.min())}"
                )

    def _trunk(
        self,
        tokens: Tensor,
        segment_pos: Tensor | None,
        state: GriffinState | None,
        *,
        validate: bool,
        donate: bool,
    ) -> tuple[Tensor, GriffinState]:
        """Embedding and residual blocks: (x (b, t, d) before `final_norm`, new state)."""
        if validate:
            self._check_inputs(tokens, segment_pos)
        b, t = tokens.shape
        if state is None:
            state = self.init_state(b)
        elif validate:
            check_state(state, self.config, b)
        pad = None  # (b, t) bool where segment_pos < 0, or None when no row has padding
        if segment_pos is None:
            segment_pos = state.next_pos[:, None] + torch.arange(t, device=tokens.device)
        else:
            segment_pos = segment_pos.to(device=tokens.device, dtype=torch.long)
            pad = _padding_to_skip(segment_pos)

        x = self.embedder.encode(tokens)  # (b, t, d)
        new_blocks = []
        for block, block_state in zip(self.blocks, state.blocks):
            x, block_state = block(x, segment_pos, block_state, donate, pad)
            new_blocks.append(block_state)
        if t == 0:
            next_pos = state.next_pos
        elif pad is None:
            next_pos = segment_pos[:, -1] + 1
        else:  # after each row's last real token; a row of padding only keeps its own
            index = torch.arange(t, device=tokens.device).expand(b, t)
            last = index.masked_fill(pad, -1).amax(dim=1)  # (b,): -1 when no real token
            last_pos = segment_pos.gather(1, last.clamp(min=0)[:, None])[:, 0]
            next_pos = torch.where(last >= 0, last_pos + 1, state.next_pos)
        new_state = GriffinState(tuple(new_blocks), next_pos.clamp(min=0))
        # Contiguous: the state's layout must not depend on the call's length (slices of
        # a prefill's activations would carry its strides: a compiled decode step
        # would recompile for every prompt length). The state is small: a cheap copy.
        new_state = _map(new_state, _dense)

        return x, new_state

    def hidden(
        self,
        tokens: Tensor,
        segment_pos: Tensor | None = None,
        state: GriffinState | None = None,
        *,
        validate: bool = True,
        donate: bool = False,
    ) -> tuple[Tensor, GriffinState]:
        """The final-norm hidden states: `forward` without the output head.

        Arguments as in `forward`. Returns (h (b, t, d) in the activation dtype, after
        `final_norm`, new state). Logits are `embedder.decode(h)` soft-capped; the
        training loss computes them chunk by chunk from `h` (`ops.linear_cross_entropy`)
        instead of materialising (b, t, vocab_size) float32 logits.
        """
        x, new_state = self._trunk(tokens, segment_pos, state, validate=validate, donate=donate)
        return self.final_norm(x), new_state

    def forward(
        self,
        tokens: Tensor,
        segment_pos: Tensor | None = None,
        state: GriffinState | None = None,
        *,
        logits: LogitsMode = "all",
        validate: bool = True,
        donate: bool = False,
    ) -> tuple[Tensor | None, GriffinState]:
        """Run the model on new tokens, continuing from `state`.

        Args:
            tokens: (b, t) int64 token ids.
            segment_pos: (b, t) int position of each token in its document; 0 starts a
                document, -1 marks padding, anywhere in a row (left, right or both):
                the logits at the real tokens and the returned state are those of the
                row without its padding, and the row's next position is its last real
                token's + 1 (a row of padding only keeps its state). Default: continue
                from the state's positions (from 0 without a state).
            state: a `GriffinState` from `init_state` or an earlier call; None starts
                empty. It is not modified (unless `donate`).
            logits: "all" -> (b, t, v) (meaningless at padding); "last" -> (b, 1, v)
                for the last time step only (a right-padded row's is padding's);
                "none" -> None (prefill that only needs the state).
            validate: check token range, shapes and state (one host sync).
            donate: a decode step (t == 1) may write the attention windows of `state`
                in place (O(1) per step instead of a copy of the window): the returned
                state then shares them, and `state` must not be used again. For the
                owner of a state, e.g. the engine's decode loop; views that are not
                writable per row (`GriffinState.expand`) are copied first.

        Returns:
            (logits float32 soft-capped, new state). Any split of a sequence into calls
            gives the logits of one call over the whole sequence.

        Raises:
            InputError: tokens out of vocabulary range, segment_pos of the wrong shape or
            below -1, a state from another config or batch size.
        """
        if logits not in ("all", "last", "none"):
            raise InputError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
        x, new_state = self._trunk(tokens, segment_pos, state, validate=validate, donate=donate)
        if logits == "none":
            return None, new_state
        if logits == "last":
            x = x[:, -1:]
        out = self.embedder.decode(self.final_norm(x)).float()  # (b, t, v), converted once
        cap = self.config.logits_soft_cap
        if cap is not None:
            if out.requires_grad:
                out = torch.tanh(out / cap) * cap
            else:  # a fresh float32 tensor: in place, no (b, t, v) temporaries
                out.div_(cap).tanh_().mul_(cap)
        return out, new_state

    @torch.no_grad()
    def decode_step(
        self, tokens: Tensor, state: GriffinState, donate: bool = False
    ) -> tuple[Tensor, GriffinState]:
        """One decode step for every row, without input checks (the generation loop's),
        without autograd (so the decode kernels measured fastest apply, `ops.linear`).

        Args:
            tokens: (b,) int64, the last sampled token of each row.
            state: the `GriffinState` of batch size b that those tokens continue.
            donate: write the state's attention windows in place (see `forward`);
                `state` must not be used again.

        Returns:
            (logits (b, vocab_size) float32 soft-capped, the next state).

        `rgemma.compile_decode(model)` replaces this method on one model with a
        `torch.compile`d version of it.
        """
        logits, state = self(
            tokens[:, None], None, state, logits="last", validate=False, donate=donate
        )
        return logits[:, -1], state
