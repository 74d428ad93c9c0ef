"""Local multi-query attention: t queries over s keys, one key/value head.

A query sees a key iff both are in the same document (`doc`), the key is valid
(pos >= 0), not in the future, and at most `window` positions back: it sees itself
and the `window` tokens before it (window + 1 keys), as the official mask
`q_pos - k_pos <= window`. Query i always sees key `self_offset + i` (itself), so no
row of the mask is empty and padded queries never produce NaN. Official
counterpart: `recurrentgemma.torch.modules.LocalAttentionBlock.forward`.

* `local_attention_ref`: the specification: logits by one batched matmul over all
  heads, masked, softmax in float32.
* `local_attention_sdpa`: `F.scaled_dot_product_attention` with the same boolean
  mask, the t * h queries as one head over the single key/value head.
* `local_attention_fused`: one SDPA call, queries (b, h, t, hd) over the key/value
  head broadcast to every head, the mask broadcast across heads (CUDA's choice).
* `local_attention_blocked`: the reference per block of `QUERY_BLOCK` queries over
  only the span of keys the block's mask reaches (causal, same document, window):
  from a fresh state most keys are skipped (CPU's choice).

Both take q (b, t, h, hd) pre-scaled by hd^-0.5; k, v (b, s, hd); q_pos, q_doc (b, t);
k_pos, k_doc (b, s) int; and return (b, t, h, hd) in v's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def local_attention_mask(
    q_pos: Tensor, k_pos: Tensor, q_doc: Tensor, k_doc: Tensor, window: int, self_offset: int
) -> Tensor:
    """(b, t, s) bool: which keys each query sees (see the module docstring)."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]  # (b, t, 1), (b, 1, s)
    mask = (kp >= 0) & (q_doc[:, :, None] == k_doc[:, None, :]) & (kp <= qp) & (qp - kp <= window)
    diag = torch.arange(q_pos.shape[1], device=q_pos.device)
    mask[:, diag, diag + self_offset] = True  # every query sees itself
    return mask


def local_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    q_doc: Tensor,
    k_doc: Tensor,
    window: int,
    self_offset: int,
) -> Tensor:
    """Reference local attention: returns (b, t, h, hd); logits (b, t, h, s) in float32."""
    b, t, h, hd = q.shape
    s = k.shape[1]
    mask = local_attention_mask(q_pos, k_pos, q_doc, k_doc, window, self_offset)  # (b, t, s)
    # One key/value head: all heads' queries form one matrix, no transposes needed.
    logits = torch.bmm(q.reshape(b, t * h, hd), k.transpose(1, 2))  # (b, t*h, s)
    logits = logits.view(b, t, h, s).float()
    logits = logits.masked_fill(~mask[:, :, None, :], torch.finfo(torch.float32).min)
    probs = torch.softmax(logits, dim=-1).to(v.dtype)  # (b, t, h, s)
    return torch.bmm(probs.view(b, t * h, s), v).view(b, t, h, hd)


def local_attention_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    q_doc: Tensor,
    k_doc: Tensor,
    window: int,
    self_offset: int,
) -> Tensor:
    """`local_attention_ref` through `F.scaled_dot_product_attention` (same arguments)."""
    b, t, h, hd = q.shape
    s = k.shape[1]
    mask = local_attention_mask(q_pos, k_pos, q_doc, k_doc, window, self_offset)  # (b, t, s)
    mask = mask[:, None, :, None, :].expand(b, 1, t, h, s).reshape(b, 1, t * h, s)
    out = F.scaled_dot_product_attention(
        q.reshape(b, 1, t * h, hd), k[:, None], v[:, None], attn_mask=mask, scale=1.0
    )  # (b, 1, t*h, hd)
    return out.view(b, t, h, hd).to(v.dtype)


def local_attention_fused(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    q_doc: Tensor,
    k_doc: Tensor,
    window: int,
    self_offset: int,
) -> Tensor:
    """`local_attention_ref` as one fused SDPA call per query chunk (same arguments),
    the "fused" implementation that `ops` picks on CUDA.

    Queries as (b, h, t, hd) over the one key/value head broadcast to every head (a
    stride-0 view, no copy) and one (b, 1, t, s) boolean mask broadcast across heads,
    so `F.scaled_dot_product_attention` runs its memory-efficient kernel on CUDA: no
    (t, s) float logits are materialised, and since the model calls this per query
    chunk of `ATTENTION_QUERY_CHUNK` against window + chunk keys, memory is linear in
    the prompt length. The mask is exact (window of `window` + 1 keys, same document,
    causal, padded keys hidden), so this equals the reference up to the kernel's
    float32 accumulation order.

    Returns:
        (b, t, h, hd) in v's dtype (a transposed view).
    """
    b, _, h, hd = q.shape
    s = k.shape[1]
    mask = local_attention_mask(q_pos, k_pos, q_doc, k_doc, window, self_offset)  # (b, t, s)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),  # (b, h, t, hd)
        k[:, None].expand(b, h, s, hd),
        v[:, None].expand(b, h, s, hd),
        attn_mask=mask[:, None],  # (b, 1, t, s)
        scale=1.0,
    )  # (b, h, t, hd)
    return out.transpose(1, 2).to(v.dtype)


#: Queries per block of `local_attention_blocked`. Measured at 4 x 1,024 queries, 4
#: heads of 128, one core, forward + backward, float32 and bf16, one or four
#: documents per row: 128 the fastest or within 8% of it; 64 up to 1.2x and 256 up to
#: 1.3x slower.
QUERY_BLOCK = 128


def local_attention_blocked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    q_doc: Tensor,
    k_doc: Tensor,
    window: int,
    self_offset: int,
) -> Tensor:
    """`local_attention_ref` per block of `QUERY_BLOCK` queries, each over only the
    span of keys its mask reaches (same arguments and returns).

    The mask (`local_attention_mask`) is built once to find, for every block, the
    first and last key any of its queries sees in any row (one host sync per call);
    the block then runs the reference on those keys alone. Keys outside a span are
    masked for all of the block's queries, so each output is the reference's softmax
    over the same visible keys (float32 sums in another order). What is skipped: the
    causal upper triangle, keys of earlier documents, keys beyond the window: from a
    fresh state (a training step) about half the work for one document per row, more
    for packed documents.
    The reference's matmuls stay (SDPA's CPU kernel was as fast in float32 and 1.6-2x
    slower in bfloat16 on the same spans).

    Returns:
        (b, t, h, hd) in v's dtype.
    """
    t, s = q.shape[1], k.shape[1]
    if t <= QUERY_BLOCK:
        return local_attention_ref(q, k, v, q_pos, k_pos, q_doc, k_doc, window, self_offset)
    mask = local_attention_mask(q_pos, k_pos, q_doc, k_doc, window, self_offset)  # (b, t, s)
    n = -(-t // QUERY_BLOCK)
    seen = mask.any(dim=0)  # (t, s): keys some row's query sees
    seen = F.pad(seen, (0, 0, 0, n * QUERY_BLOCK - t)).view(n, QUERY_BLOCK, s).any(dim=1)
    # First and one past the last key of each block's span: every query sees its own
    # key, so no span is empty.
    first = seen.int().argmax(dim=1)  # (n,)
    end = s - seen.flip(1).int().argmax(dim=1)  # (n,)
    outs = []
    for i, (lo, hi) in enumerate(torch.stack([first, end], dim=1).tolist()):
        r0 = i * QUERY_BLOCK
        rows, keys = slice(r0, r0 + QUERY_BLOCK), slice(lo, hi)
        outs.append(
            local_attention_ref(
                q[:, rows],  # (b, c, h, hd)
                k[:, keys],  # (b, hi - lo, hd)
                v[:, keys],
                q_pos[:, rows],
                k_pos[:, keys],
                q_doc[:, rows],
                k_doc[:, keys],
                window,
                self_offset + r0 - lo,  # query r0 + j is key self_offset + r0 + j
            )
        )  # (b, c, h, hd)
    return torch.cat(outs, dim=1)


# ----------------------------------------------------------------------------------
# One decode step against the window (the state), without concatenating it
# ----------------------------------------------------------------------------------
def _step_visible(cache_pos: Tensor, q_pos: Tensor, window: int) -> Tensor:
    """(b, w) bool: which window slots the new query sees. Every valid slot holds a key
    of the query's document unless the query starts a new one (q_pos == 0)."""
    qp = q_pos[:, None]  # (b, 1)
    return (cache_pos >= 0) & (cache_pos <= qp) & (qp - cache_pos <= window) & (qp != 0)


def decode_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache_k: Tensor,
    cache_v: Tensor,
    cache_pos: Tensor,
    q_pos: Tensor,
    window: int,
) -> Tensor:
    """Reference decode attention: `local_attention_ref` over the window's keys followed
    by the new key (the concatenation is the specification).

    Args:
        q: (b, h, hd) the new token's queries, pre-scaled by hd^-0.5.
        k, v: (b, hd) its key (RoPE applied) and value.
        cache_k, cache_v: (b, w, hd) the state's window, any slot order.
        cache_pos: (b, w) int64 segment_pos of each slot; -1 = empty or invisible.
        q_pos: (b,) int64 the new token's segment_pos (0 starts a new document).
        window: the attention window (the query sees itself and `window` keys back).

    Returns:
        (b, h, hd) in v's dtype.
    """
    w = cache_pos.shape[1]
    ctx_k = torch.cat([cache_k, k[:, None]], dim=1)  # (b, w + 1, hd)
    ctx_v = torch.cat([cache_v, v[:, None]], dim=1)
    ctx_pos = torch.cat([cache_pos, q_pos[:, None]], dim=1)  # (b, w + 1)
    q_doc = (q_pos == 0).long()[:, None]  # (b, 1): 1 = a new document
    ctx_doc = torch.cat([torch.zeros_like(cache_pos), q_doc], dim=1)
    out = local_attention_ref(
        q[:, None], ctx_k, ctx_v, q_pos[:, None], ctx_pos, q_doc, ctx_doc, window, w
    )
    return out[:, 0]  # (b, h, hd)


def decode_attention_split(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache_k: Tensor,
    cache_v: Tensor,
    cache_pos: Tensor,
    q_pos: Tensor,
    window: int,
) -> Tensor:
    """`decode_attention_ref` without the concatenation (same arguments and returns).

    The logits against the window (one batched matmul over all heads) and against the
    new key are computed apart and softmaxed together; the output is the window's
    weighted values plus the new value's share. Nothing of size w is copied: with the
    state written in place (`rgemma.state`), a decode step reads the window once.
    """
    visible = _step_visible(cache_pos, q_pos, window)  # (b, w)
    logits = torch.bmm(q, cache_k.transpose(1, 2)).float()  # (b, h, w)
    logits = logits.masked_fill(~visible[:, None, :], torch.finfo(torch.float32).min)
    own = torch.bmm(q, k[:, :, None]).float()  # (b, h, 1): the query sees itself
    probs = torch.softmax(torch.cat([logits, own], dim=-1), dim=-1).to(v.dtype)  # (b, h, w + 1)
    # out = probs[..., :w] @ window values + probs[..., w] * v (one rounding, as a bmm)
    return torch.baddbmm(probs[..., -1:] * v[:, None, :], probs[..., :-1], cache_v)
