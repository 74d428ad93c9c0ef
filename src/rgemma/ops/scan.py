"""The RG-LRU's linear recurrence `h_t = a_t * h_{t-1} + x_t`, scanned over time.

Griffin paper (arXiv 2402.19427) section 2.4; official counterpart
`recurrentgemma.torch.layers.rnn_scan`. Resets are folded into `a` by the caller
(`a_t = 0` where a document starts), so the scan itself is a plain diagonal
linear recurrence.

* `linear_scan_ref`: the specification, a Python loop over every time step.
* `linear_scan_step`: one time step (decode), a single multiply-add.
* `linear_scan_chunked`: the fast path. Time is cut into chunks of length L; a loop
  over the L positions inside a chunk runs on all chunks at once, then a loop over
  the t / L chunks carries the state across them. That is about 2 * sqrt(t) small
  vectorised steps instead of t, with the same float32 arithmetic (products of `a`,
  no divisions or logarithms), so it is exact up to float rounding and
  differentiable by autograd. A single step goes to `linear_scan_step`.

All take `(a, x, h0)`, accumulate in float32 and return `y` in the dtype of `x`,
`h_last` in float32. Shapes: b batch, t time, e LRU width. `rgemma.ops.linear_scan`
picks one of them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_scan_ref(a: Tensor, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reference scan: `h_t = a_t * h_{t-1} + x_t`, one Python step per time step.

    Args:
        a: (b, t, e) decay, any float dtype (0 where a document starts).
        x: (b, t, e) input, any float dtype.
        h0: (b, e) float32 initial state, or None for zeros.

    Returns:
        y: (b, t, e) all states, dtype of x; h_last: (b, e) float32 final state.
    """
    b, t, e = x.shape
    h = torch.zeros(b, e, dtype=torch.float32, device=x.device) if h0 is None else h0.float()
    ys = []
    for i in range(t):
        h = a[:, i].float() * h + x[:, i].float()
        ys.append(h)
    if not ys:
        return x.new_zeros(b, 0, e), h
    return torch.stack(ys, dim=1).to(x.dtype), h


def linear_scan_step(a: Tensor, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One time step (decode): `linear_scan_ref` for t == 1 (same arguments and returns)."""
    h = x[:, 0].float() if h0 is None else a[:, 0].float() * h0 + x[:, 0].float()  # (b, e)
    return h[:, None].to(x.dtype), h


def linear_scan_chunked(
    a: Tensor, x: Tensor, h0: Tensor | None = None, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Two-level chunked scan, equal to `linear_scan_ref` (same arguments and returns).

    `chunk_size` defaults to about sqrt(t), which minimises the number of Python
    steps (chunk_size + t / chunk_size).
    """
    b, t, e = x.shape
    if t == 0:
        return linear_scan_ref(a, x, h0)
    if t == 1:
        return linear_scan_step(a, x, h0)
    L = chunk_size or max(1, math.isqrt(t))
    n = -(-t // L)  # number of chunks
    pad = n * L - t
    a32, x32 = a.float(), x.float()
    if pad:
        # Padding with a = 1, x = 0 leaves the state unchanged.
        a32 = F.pad(a32, (0, 0, 0, pad), value=1.0)
        x32 = F.pad(x32, (0, 0, 0, pad), value=0.0)
    a32 = a32.view(b, n, L, e)  # (b, n, L, e)
    x32 = x32.view(b, n, L, e)

    # 1. Within each chunk, from a zero state: local states and cumulative decay.
    local, decay = [], []
    h = x32[:, :, 0]  # (b, n, e)
    p = a32[:, :, 0]
    local.append(h)
    decay.append(p)
    for i in range(1, L):
        h = a32[:, :, i] * h + x32[:, :, i]
        p = a32[:, :, i] * p
        local.append(h)
        decay.append(p)
    local_t = torch.stack(local, dim=2)  # (b, n, L, e)
    decay_t = torch.stack(decay, dim=2)  # (b, n, L, e): prod of a from chunk start to i

    # 2. Across chunks: the state entering each chunk.
    carry = torch.zeros(b, e, dtype=torch.float32, device=x.device) if h0 is None else h0.float()
    carries = []
    for c in range(n):
        carries.append(carry)
        carry = decay_t[:, c, -1] * carry + local_t[:, c, -1]
    carry_in = torch.stack(carries, dim=1)  # (b, n, e)

    # 3. Fix-up: add the decayed incoming state to every position of the chunk.
    y = local_t + decay_t * carry_in[:, :, None, :]  # (b, n, L, e)
    y = y.reshape(b, n * L, e)[:, :t]
    return y.to(x.dtype), carry
