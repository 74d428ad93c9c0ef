"""The training loss: masked next-token cross-entropy in float32; byte lengths of
the vocabulary for bits per byte."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_loss(logits: Tensor, targets: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy over the masked positions, in float32.

    Args:
        logits: (b, t, v) float.
        targets: (b, t) int64 target ids.
        loss_mask: (b, t) float, 1 where the target is learned.

    Returns:
        (sum of the masked negative log-likelihoods in nats, number of masked
        positions), both float32 scalars. The mean loss is their ratio.
    """
    v = logits.shape[-1]
    nll = F.cross_entropy(
        logits.reshape(-1, v).float(), targets.reshape(-1), reduction="none"
    )  # (b * t,)
    mask = loss_mask.reshape(-1).float()
    return (nll * mask).sum(), mask.sum()


def token_byte_lengths(tokenizer: Any) -> Tensor:
    """UTF-8 length in bytes of each vocabulary piece, for bits per byte.

    Byte-fallback pieces count 1, control pieces (`<pad>`, `<bos>`, `<eos>`) and
    `<unk>` 0, other pieces the bytes of their text (`▁` is a space). The sum over a
    document's tokens is the byte length of its text.

    Returns:
        (vocab_size,) float64.
    """
    sp = tokenizer.sp
    lengths = []
    for i in range(sp.vocab_size()):
        if sp.is_byte(i):
            lengths.append(1)
        elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            lengths.append(0)
        else:
            lengths.append(len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")))
    return torch.tensor(lengths, dtype=torch.float64)
