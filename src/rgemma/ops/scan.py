"""The RG-LRU's linear recurrence `h_t = a_t * h_{t-1} + x_t`, scanned over time.

Griffin paper (arXiv 2402.19427) section 2.4; official counterpart
`recurrentgemma.torch.layers.rnn_scan`. Resets are folded into `a` by the caller
(`a_t = 0` where a document starts), so the scan itself is a plain diagonal
linear recurrence.

* `linear_scan_ref`: the specification, a Python loop over every time step,
  differentiated by autograd.
* `linear_scan_step`: one time step (decode), a single multiply-add.
* `linear_scan_chunked`: the fast path. Time is cut into chunks of length L; a loop
  over the L positions inside a chunk runs on all chunks at once (each chunk from a
  zero state, for its final state), a loop over the t / L chunks carries the state
  across them, and a second loop over the L positions rescans every chunk from its
  incoming state, writing the outputs in place. That is about 2 * sqrt(t) + t / L
  small vectorised steps instead of t, with the same float32 arithmetic (products of
  `a`, no divisions or logarithms), so it is exact up to float rounding. Under
  autograd it is one `torch.autograd.Function` (`LinearScanFn`) whose backward is the
  same chunked scan run backwards in time on the output gradient:

      g_t = dy_t + a_{t+1} g_{t+1}   (g_{t-1 last} = dy_last + dh_last)
      dx_t = g_t,   da_t = g_t * h_{t-1},   dh0 = a_1 * g_1

  so the backward costs about what the forward costs: forward + backward measured
  2.6-3.3x the forward, where autograd through the chunked loops cost 24-39x (25x
  faster in float32, 14x with bf16 inputs at (4, 1024, 512); benchmarks/RESULTS.md,
  "Training step vs HF"). It keeps the
  float32 states `h` for `da` (the output itself when x is float32). The Triton
  kernel (`ops.triton.linear_scan_triton`) does the same on CUDA.

All take `(a, x, h0)`, accumulate in float32 and return `y` in the dtype of `x`,
`h_last` in float32. Shapes: b batch, t time, e LRU width, n chunks, L chunk length.
`rgemma.ops.linear_scan` picks one of them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LinearScanFn", "linear_scan_chunked", "linear_scan_ref", "linear_scan_step"]


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


def _chunk_size(t: int, chunk_size: int | None) -> int:
    """The chunk length L: `chunk_size`, else about sqrt(t), near the fewest Python
    steps (2 L + t / L). Measured at (4, 1024, 512) float32 on one core: L = 16-32
    within 2% of each other, 8 and 64 10-25% slower."""
    return max(1, chunk_size or math.isqrt(t))


def _padded(v: Tensor, length: int, value: float) -> Tensor:
    """`v` (b, t, e) as a contiguous float32 (b, length, e), padded at the end in time
    with `value` (a copy only when needed)."""
    v = v.float()
    if length > v.shape[1]:
        v = F.pad(v, (0, 0, 0, length - v.shape[1]), value=value)
    return v.contiguous()


def _scan_chunks(a: Tensor, x: Tensor, h0: Tensor | None, L: int, reverse: bool) -> Tensor:
    """`h_t = a_t * h_{t-1} + x_t` over time (backwards in time: `h_t = a_t * h_{t+1}
    + x_t`, starting after the last step, when `reverse`), no autograd.

    a, x: (b, n * L, e) float32 contiguous; h0: (b, e) float32 or None (zeros), the
    state before the first step (after the last when `reverse`). Returns all states,
    (b, n * L, e) float32, a new tensor.
    """
    b, T, e = x.shape
    n = T // L
    A, X = a.view(b, n, L, e), x.view(b, n, L, e)  # (b, n, L, e)
    steps = range(L - 1, -1, -1) if reverse else range(L)
    # 1. Each chunk from a zero state, all chunks at once: its final local state.
    first, *rest = steps
    h = X[:, :, first]  # (b, n, e)
    for i in rest:
        h = torch.addcmul(X[:, :, i], A[:, :, i], h)
    decay = A.prod(dim=2)  # (b, n, e): the product of a over each chunk
    # 2. Across chunks: the state entering each chunk.
    carry = torch.zeros(b, e, dtype=x.dtype, device=x.device) if h0 is None else h0.float()
    carry_in = torch.empty(b, n, e, dtype=x.dtype, device=x.device)
    for c in range(n - 1, -1, -1) if reverse else range(n):
        carry_in[:, c] = carry
        carry = torch.addcmul(h[:, c], decay[:, c], carry)
    # 3. Rescan every chunk from its incoming state, straight into the output.
    out = torch.empty_like(X)  # (b, n, L, e)
    prev = carry_in
    for i in steps:
        prev = torch.addcmul(X[:, :, i], A[:, :, i], prev, out=out[:, :, i])
    return out.view(b, T, e)


class LinearScanFn(torch.autograd.Function):
    """`linear_scan_chunked` under autograd: forward the chunked scan, backward one
    chunked scan in reverse time (see the module docstring). float32 accumulation;
    gradients in the dtype of each input. Call through `linear_scan_chunked`."""

    @staticmethod
    def forward(ctx, a: Tensor, x: Tensor, h0: Tensor | None, L: int):
        t = x.shape[1]
        length = -(-t // L) * L
        # Padding with a = 1, x = 0 leaves the state unchanged.
        h = _scan_chunks(_padded(a, length, 1.0), _padded(x, length, 0.0), h0, L, False)
        h = h[:, :t]  # (b, t, e) float32, all states
        h_last = h[:, -1].clone()  # (b, e): a tensor of its own, equal to y[:, -1]
        y = h if x.dtype == torch.float32 else h.to(x.dtype)
        ctx.save_for_backward(a, h, h0)
        ctx.L = L
        ctx.x_dtype = x.dtype
        ctx.set_materialize_grads(False)
        return y, h_last

    @staticmethod
    def backward(ctx, dy: Tensor | None, dh_last: Tensor | None):
        a, h, h0 = ctx.saved_tensors
        b, t, e = h.shape
        L = ctx.L
        if dy is None and dh_last is None:
            return None, None, None, None
        length = -(-t // L) * L
        # g_t = dy_t + c_t g_{t+1} with c_t = a_{t+1} (c = 1 after the last step, so
        # the final state's gradient enters there); beyond t: c = 1, dy = 0.
        c = torch.ones(b, length, e, dtype=torch.float32, device=h.device)
        c[:, : t - 1] = a[:, 1:]
        if dy is None:
            dy = torch.zeros(b, length, e, dtype=torch.float32, device=h.device)
        else:
            dy = _padded(dy, length, 0.0)
        g = _scan_chunks(c, dy, dh_last, L, True)[:, :t]  # (b, t, e) float32
        da = dh0 = None
        if ctx.needs_input_grad[0]:
            da = torch.empty(b, t, e, dtype=torch.float32, device=h.device)
            torch.mul(g[:, 1:], h[:, :-1], out=da[:, 1:])  # g_t * h_{t-1}
            if h0 is None:
                da[:, 0] = 0.0
            else:
                torch.mul(g[:, 0], h0, out=da[:, 0])
            da = da.to(a.dtype)
        dx = g.to(ctx.x_dtype) if ctx.needs_input_grad[1] else None
        if h0 is not None and ctx.needs_input_grad[2]:
            dh0 = (a[:, 0].float() * g[:, 0]).to(h0.dtype)
        return da, dx, dh0, None


def linear_scan_chunked(
    a: Tensor, x: Tensor, h0: Tensor | None = None, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Chunked scan, equal to `linear_scan_ref` (same arguments and returns), with a
    backward of its own (`LinearScanFn`) when any input requires grad.

    Args:
        a, x, h0: as `linear_scan_ref` (a, x (b, t, e) any float dtype; h0 (b, e)
            float32 or None).
        chunk_size: the chunk length L; default about sqrt(t).

    Returns:
        y: (b, t, e) all states, dtype of x; h_last: (b, e) float32 final state.
    """
    t = x.shape[1]
    if t == 0:
        return linear_scan_ref(a, x, h0)
    if t == 1:
        return linear_scan_step(a, x, h0)
    L = _chunk_size(t, chunk_size)
    inputs = (a, x) if h0 is None else (a, x, h0)
    if torch.is_grad_enabled() and any(v.requires_grad for v in inputs):
        return LinearScanFn.apply(a, x, h0, L)
    length = -(-t // L) * L
    h = _scan_chunks(_padded(a, length, 1.0), _padded(x, length, 0.0), h0, L, False)
    h = h[:, :t]
    return h.to(x.dtype), h[:, -1].clone()
