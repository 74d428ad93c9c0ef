"""Held-out evaluation during training: validation documents scored whole by
`rgemma.scoring`."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..scoring import Score, score_documents
from .config import TrainConfig


def _autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if not cfg.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def evaluate(
    model: nn.Module,
    documents: Any,
    *,
    max_tokens: int | None = None,
    byte_lengths: Tensor | None = None,
    chunk_size: int = 1024,
    batch_size: int = 1,
    bf16: bool = False,
) -> dict[str, float]:
    """Held-out loss: validation documents scored whole over the model's state.

    Each document is scored from its `<bos>` on, in chunks of `chunk_size` tokens,
    by `rgemma.scoring` (the scorer of `scripts/eval_bundled.py` and `rgemma eval`),
    on the tokens it trains on (`TokenizedDocument.trainable`: every token of a
    text, only completions or model turns of fine-tuning data). Unlike the packed
    training sequences, no document is cut at `seq_len`: the figure is the model's
    perplexity on whole documents.

    Args:
        model: a `Griffin` (put in eval mode for the call, then restored).
        documents: a validation `data.PackedDataset` (its `docs` are scored; its
            iteration position is not touched) or a list of `TokenizedDocument`.
        max_tokens: score at most this many tokens: documents in order, the last
            one cut to fit (None: all).
        byte_lengths: `token_byte_lengths(tokenizer)`, to report bits per byte.
        chunk_size: tokens per forward call per document.
        batch_size: documents scored together.
        bf16: evaluate under bfloat16 autocast (on the model's device).

    Returns:
        `val_loss` (nats per scored token), `val_ppl` (exp of it), `val_tokens`, and
        `val_bpb` (total nats / ln 2 / total UTF-8 bytes of the scored tokens) when
        `byte_lengths` is given.
    """
    docs = list(getattr(documents, "docs", documents))
    if max_tokens is not None:
        kept, budget = [], max_tokens
        for d in docs:
            if budget <= 0:
                break
            if len(d.tokens) - 1 > budget:
                d = type(d)(d.tokens[: budget + 1], d.trainable[: budget + 1])
            kept.append(d)
            budget -= len(d.tokens) - 1
        docs = kept
    num_bytes = None
    if byte_lengths is not None:
        num_bytes = [
            int(byte_lengths[torch.from_numpy(d.tokens[d.trainable].astype(np.int64))].sum())
            for d in docs
        ]
    device = next(model.parameters()).device
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with ctx:
            scores = score_documents(
                model,
                [d.tokens for d in docs],
                masks=[d.trainable for d in docs],
                num_bytes=num_bytes,
                chunk_size=chunk_size,
                batch_size=batch_size,
            )
    finally:
        model.train(was_training)
    total = sum(scores, Score())
    loss = total.nll_per_token if total.tokens else 0.0
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": total.tokens}
    if byte_lengths is not None and total.bytes > 0:
        out["val_bpb"] = total.bits_per_byte
    return out
