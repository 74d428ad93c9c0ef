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
