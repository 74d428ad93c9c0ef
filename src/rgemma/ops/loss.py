"""The output head and the training loss in one op: tied-embedding logits, soft-cap,
cross-entropy, summed over the learned positions.

    z = h @ E^T,   s = cap * tanh(z / cap),   nll = logsumexp(s) - s[target]
    nll_sum = sum(nll * loss_mask)

RecurrentGemma (arXiv 2404.07839) soft-caps its logits at 30; the loss is the
`recurrentgemma` fine-tuning colab's (float32 cross-entropy on the soft-capped
logits), as `rgemma.training.loss.masked_loss` computes it from full logits.

| implementation | what |
| --- | --- |
| `linear_cross_entropy_ref` | the specification: full (tokens x vocab) float32 logits, soft-cap, `F.cross_entropy` (several float32 (tokens x vocab) tensors live under autograd: 2 GB each for 2,048 tokens of a 256k vocabulary) |
| `linear_cross_entropy_chunked` | rows in chunks: each chunk's logits, loss and logit gradient are made in three reused (rows x vocab) buffers and dropped, so no (tokens x vocab) tensor exists; a `torch.autograd.Function` (`LinearCrossEntropyFn`) |

The chunked forward computes the gradients as it goes (softmax minus the one-hot
target, times the soft-cap's derivative, then two matmuls per chunk into an (n, d)
and a (v, d) float32 buffer); its backward only scales them by the incoming gradient:
three matmuls of the head's size in all, as autograd through the reference.
Recomputing the logits in the backward instead (keeping only the (n,) log-sum-exps)
costs a fourth: measured 1.45x (float32) and 1.3x (bf16 autocast) slower at 4,096
tokens, width 512, vocabulary 32,000 (`benchmarks/train_vs_hf.py --ops`).
Positions whose `loss_mask` is 0 are skipped (their logits are never computed).

The soft-cap is computed through the sigmoid, `cap * tanh(y) = 2 cap sigmoid(2 y) -
cap`, with derivative `1 - tanh^2 = 4 sigmoid (1 - sigmoid)`: torch's CPU sigmoid is
5x faster than its tanh (measured, AVX-512); the constant `- cap` is dropped, since
softmax and log-sum-exp minus the target's logit do not change when every logit
moves by the same amount. The log-sum-exp comes from the fused softmax: the largest
probability is `exp(max - lse)`, never below 1 / v, so `lse = max - log(p_max)`.

Under autocast (the training loop's bf16 mixed precision) the head's matmuls run in
the autocast dtype, as `F.linear` does in the model's `Embedder.decode`, and
everything after them in float32. Shapes: n tokens (b * t), d width, v vocabulary,
c rows per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError

__all__ = [
    "CHUNK_ELEMENTS",
    "LinearCrossEntropyFn",
    "linear_cross_entropy_chunked",
    "linear_cross_entropy_ref",
]

#: Logits per chunk of `linear_cross_entropy_chunked`: rows = CHUNK_ELEMENTS // v,
#: clamped to [MIN_ROWS, n]. 2**23 float32 are 32 MiB per buffer: 262 rows of a
#: 32,000 vocabulary. Measured at 4,096 tokens, width 512, vocabulary 32,000, one
#: core: 256-512 rows within 2%, 64 rows 1.2-1.5x slower (the (v, d) gradient is
#: accumulated once per chunk).
CHUNK_ELEMENTS = 1 << 23
#: Fewest rows per chunk: the (v, d) gradient's matmul has the chunk's rows as its
#: inner dimension, slow below about a hundred (a 256k vocabulary: 128 MiB buffers).
MIN_ROWS = 128
#: Vocabulary rows per block when a bfloat16 chunk's (v, d) gradient is added into
#: the float32 accumulator (there is no mixed-precision addmm on CPU; a mixed-dtype
#: add ran 4x slower than a copy and an add per cache-sized block).
ADD_BLOCK = 4096


def _check(h: Tensor, weight: Tensor, targets: Tensor, loss_mask: Tensor) -> None:
    """InputError naming the argument whose shape (or dtype) does not fit the others."""
    if h.ndim not in (2, 3):
        raise InputError(f"h must be (n, d) or (b, t, d), got shape {tuple(h.shape)}")
    if weight.ndim != 2 or weight.shape[1] != h.shape[-1]:
        raise InputError(
            f"weight must be (vocab, {h.shape[-1]}) to match h's width, got {tuple(weight.shape)}"
        )
    for name, v in (("targets", targets), ("loss_mask", loss_mask)):
        if tuple(v.shape) != tuple(h.shape[:-1]):
            raise InputError(
                f"{name} must have shape {tuple(h.shape[:-1])} (h's without the width), "
                f"got {tuple(v.shape)}"
            )
    if h.dtype != weight.dtype and not torch.is_autocast_enabled(h.device.type):
        raise InputError(
            f"h ({h.dtype}) and weight ({weight.dtype}) must have one dtype outside autocast"
        )


def linear_cross_entropy_ref(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    loss_mask: Tensor,
    soft_cap: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Reference head + loss: full float32 logits, soft-cap, `F.cross_entropy`.

    Args:
        h: (n, d) or (b, t, d) final-norm hidden states, the activation dtype.
        weight: (v, d) the tied embedding (`Embedder.input_embedding`).
        targets: h's leading shape, int64 token ids in [0, v).
        loss_mask: h's leading shape, float: each position's weight (1 learned, 0 not).
        soft_cap: c of `c * tanh(z / c)`, or None for none.
        chunk_size: ignored (one chunk); for the signature of the fast path.

    Returns:
        The float32 scalar `sum(nll * loss_mask)` in nats.

    Raises:
        InputError: shapes that do not fit each other, or h and weight of different
            dtypes outside autocast.
    """
    _check(h, weight, targets, loss_mask)
    logits = F.linear(h, weight).float()  # (..., v), as Embedder.decode(h).float()
    if soft_cap is not None:
        logits = torch.tanh(logits / soft_cap) * soft_cap
    nll = F.cross_entropy(
        logits.reshape(-1, weight.shape[0]).float(), targets.reshape(-1), reduction="none"
    )  # (n,)
    return (nll * loss_mask.reshape(-1).float()).sum()


class LinearCrossEntropyFn(torch.autograd.Function):
    """`linear_cross_entropy_chunked` under autograd: the forward computes the loss and
    both gradients chunk by chunk; the backward scales them by the incoming gradient,
    in place (so it runs once: a second backward, after `retain_graph=True`, raises).
    Call through `linear_cross_entropy_chunked`."""

    @staticmethod
    def forward(ctx, h, weight, targets, loss_mask, soft_cap, rows, compute_dtype):
        need_h, need_w = ctx.needs_input_grad[:2]
        with torch.autocast(h.device.type, enabled=False):
            nll_sum, grad_h, grad_w = _chunked(
                h, weight, targets, loss_mask, soft_cap, rows, compute_dtype, need_h, need_w
            )
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        ctx.done = False
        return nll_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        if ctx.done:
            raise RuntimeError(
                "linear_cross_entropy's backward runs once (its gradients are scaled in place)"
            )
        ctx.done = True
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_out).to(h_dtype)
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_out).to(w_dtype)
        return grad_h, grad_w, None, None, None, None, None


def _chunked(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    loss_mask: Tensor,
    soft_cap: float | None,
    rows: int,
    compute_dtype: torch.dtype,
    need_h: bool,
    need_w: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(nll_sum, grad_h (h's shape) float32 or None, grad_w (v, d) float32 or None),
    the gradients of nll_sum. No autograd; autocast off."""
    f32, dev = torch.float32, h.device
    d, v = h.shape[-1], weight.shape[0]
    x = h.reshape(-1, d)  # (n, d)
    n = x.shape[0]
    tgt, mask = targets.reshape(-1), loss_mask.reshape(-1).to(f32)  # (n,)
    # Only the learned positions: the others add nothing to the loss or the gradients.
    # Whether every position is learned, with weight 1: one host sync.
    all_learned, all_one = torch.stack([(mask != 0).all(), (mask == 1).all()]).tolist()
    keep = None
    if not all_learned:
        keep = (mask != 0).nonzero().squeeze(1)  # (n_kept,)
        x, tgt, mask = x[keep], tgt[keep], mask[keep]
    grad_h = grad_w = None
    if need_h:
        grad_h = (torch.empty if keep is None else torch.zeros)(n, d, dtype=f32, device=dev)
    if need_w:  # written by the first chunk (zeros when there is none)
        grad_w = (torch.empty if x.shape[0] else torch.zeros)(v, d, dtype=f32, device=dev)
    w = weight.to(compute_dtype)  # (v, d): the autocast cast, made once
    wt = w.t()  # (d, v)
    x = x.to(compute_dtype)
    need_grad = need_h or need_w
    nll_sum = torch.zeros((), dtype=f32, device=dev)
    rows = max(1, min(rows, x.shape[0]))
    # The chunk buffers, reused (a fresh large tensor per chunk costs page faults).
    buf_u = torch.empty(rows, v, dtype=f32, device=dev)  # logits, then sigmoid(2 z / cap)
    buf_s = torch.empty(rows, v, dtype=f32, device=dev) if soft_cap is not None else None
    buf_p = torch.empty(rows, v, dtype=f32, device=dev)  # softmax, then the logits' grad
    buf_z = None  # the matmul's output, when not float32
    if compute_dtype != f32:
        buf_z = torch.empty(rows, v, dtype=compute_dtype, device=dev)
        add_blk = min(ADD_BLOCK, v)
        blk16 = torch.empty(add_blk, d, dtype=compute_dtype, device=dev)
        blk32 = torch.empty(add_blk, d, dtype=f32, device=dev)
    for i in range(0, x.shape[0], rows):
        xc, tc, mc = x[i : i + rows], tgt[i : i + rows], mask[i : i + rows]  # (c, d), (c,)
        c = xc.shape[0]
        u = buf_u[:c]  # (c, v)
        if buf_z is None:
            torch.mm(xc, wt, out=u)  # the logits z
        else:  # rounded to the matmul's dtype, as F.linear's output
            u.copy_(torch.mm(xc, wt, out=buf_z[:c]))
        if soft_cap is not None:
            # s + cap = cap * tanh(z / cap) + cap = 2 cap * sigmoid(2 z / cap)
            u.mul_(2.0 / soft_cap).sigmoid_()
            s = torch.mul(u, 2.0 * soft_cap, out=buf_s[:c])  # (c, v)
        else:
            s = u
        target_logit = s.gather(1, tc[:, None])  # (c, 1)
        top = s.amax(dim=1, keepdim=True)  # (c, 1)
        p = torch.softmax(s, dim=1, out=buf_p[:c])  # (c, v)
        lse = top - p.amax(dim=1, keepdim=True).log()  # p_max = exp(top - lse) >= 1 / v
        nll = (lse - target_logit)[:, 0]  # (c,)
        nll_sum += nll.sum() if all_one else (nll * mc).sum()
        if not need_grad:
            continue
        # d nll / d s = softmax - onehot(target); d s / d z = 4 u (1 - u) (= 1 - tanh^2).
        p[torch.arange(c, device=dev), tc] -= 1.0
        if soft_cap is not None:
            p.mul_(u.addcmul_(u, u, value=-1.0)).mul_(4.0)
        gz = p if buf_z is None else buf_z[:c].copy_(p)  # (c, v) in the matmul dtype
        if need_h:
            grad_h_c = torch.mm(gz, w)  # (c, d)
            if not all_one:
                grad_h_c = grad_h_c * mc[:, None]
            if keep is None:
                grad_h[i : i + c] = grad_h_c
            else:
                grad_h[keep[i : i + c]] = grad_h_c.to(f32)
        if need_w:
            xm = xc if all_one else xc * mc[:, None].to(xc.dtype)  # (c, d)
            if buf_z is None and i == 0:
                torch.mm(gz.t(), xm, out=grad_w)  # (v, d) = (v, c) @ (c, d)
            elif buf_z is None:
                grad_w.addmm_(gz.t(), xm)  # (v, d) += (v, c) @ (c, d)
            else:  # the product in the matmul dtype, added in float32 block by block
                for j in range(0, v, add_blk):
                    nb = min(add_blk, v - j)
                    part = torch.mm(gz[:, j : j + nb].t(), xm, out=blk16[:nb])  # (nb, d)
                    if i == 0:
                        grad_w[j : j + nb] = part
                    else:
                        grad_w[j : j + nb] += blk32[:nb].copy_(part)
    if grad_h is not None:
        grad_h = grad_h.view(h.shape)
    return nll_sum, grad_h, grad_w


def linear_cross_entropy_chunked(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    loss_mask: Tensor,
    soft_cap: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """`linear_cross_entropy_ref` in chunks of rows, with its gradients computed in the
    same pass (same arguments and returns).

    Args:
        h, weight, targets, loss_mask, soft_cap: as `linear_cross_entropy_ref`.
        chunk_size: rows of logits per chunk; default `CHUNK_ELEMENTS // v`, at least
            `MIN_ROWS`.

    Memory: three (c, v) float32 chunk buffers (and one in the matmul dtype) and,
    under autograd, an (n, d) and a (v, d) float32 gradient kept for the backward,
    instead of the reference's (n, v) float32 tensors.

    Raises:
        InputError: as `linear_cross_entropy_ref`, or a chunk_size below 1.
    """
    _check(h, weight, targets, loss_mask)
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1 rows, got {chunk_size}")
    rows = chunk_size or max(MIN_ROWS, CHUNK_ELEMENTS // weight.shape[0])
    kind = h.device.type
    autocast = torch.is_autocast_enabled(kind)
    compute_dtype = torch.get_autocast_dtype(kind) if autocast else h.dtype
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return LinearCrossEntropyFn.apply(
            h, weight, targets, loss_mask, soft_cap, rows, compute_dtype
        )
    with torch.autocast(kind, enabled=False):
        out = _chunked(h, weight, targets, loss_mask, soft_cap, rows, compute_dtype, False, False)
    return out[0]
