"""Triton kernels for the RG-LRU scan and the Conv1D, beside their references.

The GPU counterparts of `ops.scan.linear_scan_ref` and `ops.conv1d.conv1d_ref`, with
the same signatures, returns and dtypes, forward and backward (each a
`torch.autograd.Function` whose backward is a Triton kernel). The dispatcher
(`rgemma.ops`) imports this module on first use and takes `KERNELS` as the "triton"
implementation of each op, chosen by "auto" on CUDA; without the `triton` package
the import fails and the references' fast paths stay in place.

* `linear_scan_triton`: `h_t = a_t * h_{t-1} + x_t` (Griffin arXiv 2402.19427
  section 2.4; document resets are folded into `a` by the caller). One program per
  (row, block of channels) walks time in tiles of `BLOCK_T` steps: a tile of `a`
  and `x` is loaded at once, scanned with `tl.associative_scan` (the pair
  (a, x) composes as (a1 * a2, a2 * x1 + x2)), and the carried float32 state is
  added in (`y = A_cum * h + X_cum`). The backward is the same scan run in reverse
  time on the output gradient: `dh_t = dy_t + a_{t+1} dh_{t+1}`, then
  `dx_t = dh_t`, `da_t = dh_t * h_{t-1}`, `dh0 = a_0 * dh_0`. The forward keeps the
  float32 states for it (y itself when x is float32, else one extra float32 copy).
  State and accumulation are float32 whatever the input dtype.
* `conv1d_triton`: `out[t] = b + sum_{j=0..k} w[k-j] * x[t-j]`, each tap dropped when
  it reaches across a document start (`segment_pos[t] < j`), taps before the first
  input read from `conv_state`. One program per (row, tile of time, block of
  channels), float32 accumulation. Backward: one kernel for the gradient of the
  concatenated (conv_state, x) sequence (the transposed convolution, same masks),
  one for per-tile partial sums of the weights' gradient (summed by torch).
  The new state (the last k inputs) is sliced by torch, so autograd handles it.

A single time step (decode, t == 1) runs the references' step paths (plain torch,
which `torch.compile` and CUDA graphs capture). With `TRITON_INTERPRET=1` (set
before this module is first imported) the kernels run on CPU tensors through
Triton's interpreter, which is how `tests/ops/test_triton.py` checks them without a
GPU; autotuning is then off (one configuration). Counterparts: the official code
has a fast scan only for TPU (Pallas, `recurrentgemma.jax.scan`); fattorib's "A fast
RG-LRU kernel" (2024) is an independent Triton scan.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import InputError
from .scan import linear_scan_ref, linear_scan_step

#: True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 at
#: import): the kernels then accept CPU tensors and are not autotuned.
INTERPRET = bool(triton.knobs.runtime.interpret)

# Tile sizes: under the interpreter one small configuration (fast tests); on a GPU
# autotuned over these, keyed on the channel count.
_SCAN_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_E": be}, num_warps=w)
    for bt, be, w in [(16, 32, 2), (32, 32, 4), (32, 64, 4), (64, 64, 4), (16, 128, 4)]
]
_CONV_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_E": be}, num_warps=w)
    for bt, be, w in [(16, 128, 4), (32, 128, 4), (64, 64, 4), (32, 256, 8)]
]
_INTERPRET_BLOCKS = {"BLOCK_T": 8, "BLOCK_E": 32}


def _tuned(configs, key):
    """`triton.autotune(configs, key)` on a GPU; the kernel as it is under the
    interpreter (then its blocks are passed as `_INTERPRET_BLOCKS`)."""
    if INTERPRET:
        return lambda fn: fn
    return triton.autotune(configs=configs, key=key)


def _blocks() -> dict[str, int]:
    return dict(_INTERPRET_BLOCKS) if INTERPRET else {}


def _check_device(name: str, x: Tensor) -> None:
    if not x.is_cuda and not INTERPRET:
        raise InputError(
            f"{name}: the triton kernels need CUDA tensors (got {x.device.type}); "
            "set TRITON_INTERPRET=1 before importing rgemma to run them on CPU, "
            "or choose another implementation"
        )


# ----------------------------------------------------------------------------------
# RG-LRU linear scan
# ----------------------------------------------------------------------------------
@triton.jit
def _affine_combine(a1, x1, a2, x2):
    """(a1, x1) then (a2, x2): h -> a2 * (a1 * h + x1) + x2."""
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _last_row(v, rows, n: tl.constexpr):
    """Row n - 1 of a (n, BLOCK_E) tile, exactly (a sum of zeros and that row)."""
    return tl.sum(tl.where((rows == n - 1)[:, None], v, 0.0), axis=0)


@_tuned(_SCAN_CONFIGS, key=["E"])
@triton.jit
def _scan_fwd_kernel(
    a_ptr,
    x_ptr,
    h0_ptr,
    y_ptr,
    h32_ptr,
    h_last_ptr,
    T,
    E,
    HAS_H0: tl.constexpr,
    STORE_H32: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # Program (row b, channels cols): a, x, y (b, T, E) contiguous; h0, h_last (b, E).
    pid_b, pid_e = tl.program_id(0), tl.program_id(1)
    cols = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)  # (BLOCK_E,)
    col_ok = cols < E
    rows = tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * E + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_E], dtype=tl.float32)
    base = pid_b.to(tl.int64) * T * E
    for t0 in range(0, T, BLOCK_T):
        t = t0 + rows
        off = base + t.to(tl.int64)[:, None] * E + cols[None, :]  # (BLOCK_T, BLOCK_E)
        ok = (t < T)[:, None] & col_ok[None, :]
        # Beyond T: a = 1, x = 0 leave the state unchanged.
        a = tl.load(a_ptr + off, mask=ok, other=1.0).to(tl.float32)
        x = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
        a_cum, x_cum = tl.associative_scan((a, x), 0, _affine_combine)
        y = a_cum * h[None, :] + x_cum  # (BLOCK_T, BLOCK_E) float32 states
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=ok)
        if STORE_H32:
            tl.store(h32_ptr + off, y, mask=ok)
        h = _last_row(y, rows, BLOCK_T)
    tl.store(h_last_ptr + pid_b * E + cols, h, mask=col_ok)


@_tuned(_SCAN_CONFIGS, key=["E"])
@triton.jit
def _scan_bwd_kernel(
    a_ptr,
    h_ptr,
    h0_ptr,
    dy_ptr,
    dh_last_ptr,
    da_ptr,
    dx_ptr,
    dh0_ptr,
    T,
    E,
    HAS_H0: tl.constexpr,
    HAS_DH_LAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # Reverse scan: dh_t = dy_t + a_{t+1} dh_{t+1}, from dh_T := dh_last (a_T := 1).
    # h (b, T, E) float32 forward states; da, dx (b, T, E); dh0 (b, E) float32.
    pid_b, pid_e = tl.program_id(0), tl.program_id(1)
    cols = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    col_ok = cols < E
    rows = tl.arange(0, BLOCK_T)
    if HAS_DH_LAST:
        g = tl.load(dh_last_ptr + pid_b * E + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        g = tl.zeros([BLOCK_E], dtype=tl.float32)
    base = pid_b.to(tl.int64) * T * E
    n_tiles = tl.cdiv(T, BLOCK_T)
    for i in range(n_tiles):
        # Tile rows in reverse time: row r is time t = end - 1 - r.
        t = (n_tiles - i) * BLOCK_T - 1 - rows
        t64 = t.to(tl.int64)[:, None]
        ok = (t < T)[:, None] & col_ok[None, :]
        off = base + t64 * E + cols[None, :]
        dy = tl.load(dy_ptr + off, mask=ok, other=0.0).to(tl.float32)
        nxt = (t + 1 < T)[:, None] & col_ok[None, :]
        a_next = tl.load(a_ptr + off + E, mask=nxt, other=1.0).to(tl.float32)
        a_cum, g_cum = tl.associative_scan((a_next, dy), 0, _affine_combine)
        dh = a_cum * g[None, :] + g_cum  # (BLOCK_T, BLOCK_E): dh_t
        prev = (t >= 1)[:, None] & ok
        h_prev = tl.load(h_ptr + off - E, mask=prev, other=0.0)
        if HAS_H0:
            first = (t == 0)[:, None] & col_ok[None, :]
            h_init = tl.load(h0_ptr + pid_b * E + cols, mask=col_ok, other=0.0).to(tl.float32)
            h_prev = tl.where(first, h_init[None, :], h_prev)
        tl.store(dx_ptr + off, dh.to(dx_ptr.dtype.element_ty), mask=ok)
        tl.store(da_ptr + off, (dh * h_prev).to(da_ptr.dtype.element_ty), mask=ok)
        g = _last_row(dh, rows, BLOCK_T)  # dh at the tile's first time step
    if HAS_H0:
        a0 = tl.load(a_ptr + base + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(dh0_ptr + pid_b * E + cols, a0 * g, mask=col_ok)


def _scan_grid(b: int, e: int):
    return lambda meta: (b, triton.cdiv(e, meta["BLOCK_E"]))


class _LinearScan(torch.autograd.Function):
    """(a, x, h0 or None) -> (y in x's dtype, h_last float32), Triton both ways."""

    @staticmethod
    def forward(ctx, a: Tensor, x: Tensor, h0: Tensor | None, keep_states: bool):
        b, t, e = x.shape
        a, x = a.contiguous(), x.contiguous()
        h0c = h0.float().contiguous() if h0 is not None else None
        y = torch.empty_like(x)
        h_last = torch.empty(b, e, dtype=torch.float32, device=x.device)
        # Float32 states for the backward: y itself when x is float32.
        store = keep_states and x.dtype != torch.float32
        h32 = torch.empty(b, t, e, dtype=torch.float32, device=x.device) if store else y
        _scan_fwd_kernel[_scan_grid(b, e)](
            a, x, h0c if h0c is not None else h_last, y, h32, h_last, t, e,
            HAS_H0=h0c is not None, STORE_H32=store, **_blocks(),
        )  # fmt: skip
        if keep_states:
            ctx.save_for_backward(a, h32 if x.dtype != torch.float32 else y, h0c)
            ctx.x_dtype, ctx.has_h0 = x.dtype, h0 is not None
        return y, h_last

    @staticmethod
    def backward(ctx, dy: Tensor | None, dh_last: Tensor | None):
        a, h32, h0 = ctx.saved_tensors
        b, t, e = a.shape
        dy = torch.zeros(b, t, e, dtype=ctx.x_dtype, device=a.device) if dy is None else dy
        dy = dy.contiguous()
        da = torch.empty_like(a)
        dx = torch.empty(b, t, e, dtype=ctx.x_dtype, device=a.device)
        dh0 = torch.empty(b, e, dtype=torch.float32, device=a.device) if ctx.has_h0 else None
        dh_last = dh_last.float().contiguous() if dh_last is not None else None
        _scan_bwd_kernel[_scan_grid(b, e)](
            a, h32, h0 if h0 is not None else da, dy, dh_last if dh_last is not None else dy,
            da, dx, dh0 if dh0 is not None else da, t, e,
            HAS_H0=ctx.has_h0, HAS_DH_LAST=dh_last is not None, **_blocks(),
        )  # fmt: skip
        return da, dx, dh0, None


def linear_scan_triton(a: Tensor, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`linear_scan_ref` as Triton kernels (same arguments, returns and dtypes).

    Args:
        a: (b, t, e) decay, any float dtype (0 where a document starts).
        x: (b, t, e) input, any float dtype.
        h0: (b, e) float32 initial state, or None for zeros.

    Returns:
        y: (b, t, e) all states, dtype of x; h_last: (b, e) float32 final state.
        Differentiable in a, x and h0 (Triton reverse scan).

    Raises:
        InputError: CPU tensors outside the interpreter, or shapes that disagree.
    """
    _check_device("linear_scan_triton", x)
    b, t, e = x.shape
    if a.shape != x.shape or (h0 is not None and tuple(h0.shape) != (b, e)):
        h0_shape = None if h0 is None else tuple(h0.shape)
        raise InputError(
            f"linear_scan_triton: a {tuple(a.shape)}, x {tuple(x.shape)} and h0 {h0_shape} "
            "do not agree (a, x: (b, t, e); h0: (b, e))"
        )
    if t == 0:
        return linear_scan_ref(a, x, h0)
    if t == 1:
        return linear_scan_step(a, x, h0)
    keep = torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in (a, x, h0))
    return _LinearScan.apply(a, x, h0, keep)


# ----------------------------------------------------------------------------------
# Conv1D
# ----------------------------------------------------------------------------------
@triton.jit
def _conv_tap(x_ptr, state_ptr, bt_base, bk_base, src, cols, ok, K: tl.constexpr, E):
    """x at times `src` of this row (BLOCK_T,), from conv_state where src < 0."""
    in_x = ok & (src >= 0)[:, None]
    in_state = ok & ((src < 0) & (src >= -K))[:, None]
    src64 = src.to(tl.int64)[:, None]
    xv = tl.load(x_ptr + bt_base + src64 * E + cols[None, :], mask=in_x, other=0.0)
    sv = tl.load(state_ptr + bk_base + (src64 + K) * E + cols[None, :], mask=in_state, other=0.0)
    return tl.where(in_x, xv.to(tl.float32), sv.to(tl.float32))


@_tuned(_CONV_CONFIGS, key=["E"])
@triton.jit
def _conv_fwd_kernel(
    x_ptr,
    pos_ptr,
    state_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    T,
    E,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # x, out (B, T, E); pos (B, T); state (B, K, E); w (K + 1, E); b (E,).
    pid_b, pid_t, pid_e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    col_ok = cols < E
    ok = (t < T)[:, None] & col_ok[None, :]
    bt_base = pid_b.to(tl.int64) * T * E
    bk_base = pid_b.to(tl.int64) * K * E
    pos = tl.load(pos_ptr + pid_b.to(tl.int64) * T + t, mask=t < T, other=-1)
    bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32) + bias[None, :]
    for j in tl.static_range(K + 1):  # the tap j steps back, weighted by w[K - j]
        v = _conv_tap(x_ptr, state_ptr, bt_base, bk_base, t - j, cols, ok, K, E)
        wj = tl.load(w_ptr + (K - j) * E + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.where((pos >= j)[:, None], v * wj[None, :], 0.0)
    off = bt_base + t.to(tl.int64)[:, None] * E + cols[None, :]
    tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=ok)


@_tuned(_CONV_CONFIGS, key=["E"])
@triton.jit
def _conv_bwd_input_kernel(
    dout_ptr,
    pos_ptr,
    w_ptr,
    dctx_ptr,
    T,
    E,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # Gradient of ctx = cat(state, x) (B, K + T, E) float32: ctx index c is time
    # c - K and feeds output t = c - K + j through w[K - j] when pos[t] >= j.
    pid_b, pid_t, pid_e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    col_ok = cols < E
    bt_base = pid_b.to(tl.int64) * T * E
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for j in tl.static_range(K + 1):
        t = c - K + j
        t_ok = (t >= 0) & (t < T)
        pos = tl.load(pos_ptr + pid_b.to(tl.int64) * T + t, mask=t_ok, other=-1)
        m = (t_ok & (pos >= j))[:, None] & col_ok[None, :]
        g = tl.load(dout_ptr + bt_base + t.to(tl.int64)[:, None] * E + cols[None, :], mask=m)
        wj = tl.load(w_ptr + (K - j) * E + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.where(m, g.to(tl.float32) * wj[None, :], 0.0)
    off = pid_b.to(tl.int64) * (T + K) * E + c.to(tl.int64)[:, None] * E + cols[None, :]
    tl.store(dctx_ptr + off, acc, mask=(c < T + K)[:, None] & col_ok[None, :])


@_tuned(_CONV_CONFIGS, key=["E"])
@triton.jit
def _conv_bwd_weight_kernel(
    dout_ptr,
    pos_ptr,
    x_ptr,
    state_ptr,
    dw_part_ptr,
    T,
    E,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # Per (row, time tile): sum_t dout[t] * x[t - j] * (pos[t] >= j) into
    # dw_part (B * n_tiles, K + 1, E) float32 at w's index K - j.
    pid_b, pid_t, pid_e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    col_ok = cols < E
    ok = (t < T)[:, None] & col_ok[None, :]
    bt_base = pid_b.to(tl.int64) * T * E
    bk_base = pid_b.to(tl.int64) * K * E
    pos = tl.load(pos_ptr + pid_b.to(tl.int64) * T + t, mask=t < T, other=-1)
    g = tl.load(dout_ptr + bt_base + t.to(tl.int64)[:, None] * E + cols[None, :], mask=ok)
    g = tl.where(ok, g.to(tl.float32), 0.0)
    part = (pid_b.to(tl.int64) * tl.num_programs(1) + pid_t) * (K + 1) * E
    for j in tl.static_range(K + 1):
        v = _conv_tap(x_ptr, state_ptr, bt_base, bk_base, t - j, cols, ok, K, E)
        s = tl.sum(tl.where((pos >= j)[:, None], g * v, 0.0), axis=0)  # (BLOCK_E,)
        tl.store(dw_part_ptr + part + (K - j) * E + cols, s, mask=col_ok)


def _conv_grid(b: int, t: int, e: int):
    return lambda meta: (b, triton.cdiv(t, meta["BLOCK_T"]), triton.cdiv(e, meta["BLOCK_E"]))


class _Conv1D(torch.autograd.Function):
    """(x, segment_pos, conv_state in x's dtype, w, b) -> out, Triton both ways."""

    @staticmethod
    def forward(ctx, x, segment_pos, conv_state, w, b):
        bsz, t, e = x.shape
        k = w.shape[0] - 1
        x, conv_state, w, b = (
            x.contiguous(),
            conv_state.contiguous(),
            w.contiguous(),
            b.contiguous(),
        )
        pos = segment_pos.to(torch.int32).contiguous()
        out = torch.empty_like(x)
        _conv_fwd_kernel[_conv_grid(bsz, t, e)](
            x, pos, conv_state, w, b, out, t, e, K=k, **_blocks()
        )
        ctx.save_for_backward(x, pos, conv_state, w)
        ctx.b_dtype = b.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        x, pos, conv_state, w = ctx.saved_tensors
        bsz, t, e = x.shape
        k = w.shape[0] - 1
        dout = dout.contiguous()
        dx = dstate = dw = db = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            dctx = torch.empty(bsz, k + t, e, dtype=torch.float32, device=x.device)
            _conv_bwd_input_kernel[_conv_grid(bsz, t + k, e)](
                dout, pos, w, dctx, t, e, K=k, **_blocks()
            )
            dstate, dx = dctx[:, :k].to(conv_state.dtype), dctx[:, k:].to(x.dtype)
        if ctx.needs_input_grad[3]:
            parts = {}

            def grid(meta):
                parts["n"] = triton.cdiv(t, meta["BLOCK_T"])
                return (bsz, parts["n"], triton.cdiv(e, meta["BLOCK_E"]))

            # Sized for the smallest time tile any configuration uses.
            min_bt = min(c.kwargs["BLOCK_T"] for c in _CONV_CONFIGS)
            n_max = triton.cdiv(t, _INTERPRET_BLOCKS["BLOCK_T"] if INTERPRET else min_bt)
            dw_part = torch.empty(bsz * n_max, k + 1, e, dtype=torch.float32, device=x.device)
            _conv_bwd_weight_kernel[grid](dout, pos, x, conv_state, dw_part, t, e, K=k, **_blocks())
            dw = dw_part[: bsz * parts["n"]].sum(0).to(w.dtype)
        if ctx.needs_input_grad[4]:
            db = dout.float().sum((0, 1)).to(ctx.b_dtype)
        return dx, None, dstate, dw, db


def conv1d_triton(
    x: Tensor, segment_pos: Tensor, conv_state: Tensor, w: Tensor, b: Tensor
) -> tuple[Tensor, Tensor]:
    """`conv1d_ref` as Triton kernels (same arguments, returns and dtypes).

    Args:
        x: (b, t, e) input, any float dtype.
        segment_pos: (b, t) int, position in the document (0 starts one, -1 pads).
        conv_state: (b, k, e) the k inputs before x (cast to x's dtype).
        w: (k + 1, e) taps, w[k] on the current input; b: (e,) bias.

    Returns:
        out: (b, t, e) in x's dtype (float32 accumulation); new conv_state (b, k, e):
        the last k inputs of cat(conv_state, x). Differentiable in x, conv_state, w
        and b (Triton kernels).

    Raises:
        InputError: CPU tensors outside the interpreter, or shapes that disagree.
    """
    _check_device("conv1d_triton", x)
    bsz, t, e = x.shape
    k = w.shape[0] - 1
    if (
        tuple(segment_pos.shape) != (bsz, t)
        or tuple(conv_state.shape) != (bsz, k, e)
        or tuple(w.shape) != (k + 1, e)
        or tuple(b.shape) != (e,)
    ):
        raise InputError(
            f"conv1d_triton: x {tuple(x.shape)}, segment_pos {tuple(segment_pos.shape)}, "
            f"conv_state {tuple(conv_state.shape)}, w {tuple(w.shape)}, b {tuple(b.shape)} "
            "do not agree (x (b, t, e), segment_pos (b, t), conv_state (b, k, e), "
            "w (k + 1, e), b (e,))"
        )
    state = conv_state.to(x.dtype)
    if t == 0:
        return x.clone(), state
    out = _Conv1D.apply(x, segment_pos, state, w, b)
    # The last k inputs of cat(state, x), without copying all of x.
    new_state = x[:, t - k :].clone() if t >= k else torch.cat([state[:, t:], x], dim=1)
    return out, new_state


#: {op: kernel}: what the dispatcher takes as each op's "triton" implementation.
KERNELS = {"scan": linear_scan_triton, "conv1d": conv1d_triton}

__all__ = ["INTERPRET", "KERNELS", "conv1d_triton", "linear_scan_triton"]
