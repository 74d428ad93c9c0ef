"""Shared helpers for the generation and CLI tests: a tiny SentencePiece tokenizer
trained on the fly, tiny random Griffins whose vocab equals it, and a scripted
model that emits chosen ids (to force EOS, byte-fallback pieces, stop strings)."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import shutil
import tempfile
from pathlib import Path

import torch
from oracle import random_model
from torch import nn

from rgemma.config import GriffinConfig

TEXT = """\
It is a truth universally acknowledged, that a single man in possession of a good
fortune, must be in want of a wife. However little known the feelings or views of
such a man may be on his first entering a neighbourhood, this truth is so well fixed
in the minds of the surrounding families, that he is considered the rightful property
of some one or other of their daughters.
Call me Ishmael. Some years ago, never mind how long precisely, having little or no
money in my purse, and nothing particular to interest me on shore, I thought I would
sail about a little and see the watery part of the world.
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer
the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.
Hello world! The quick brown fox jumps over the lazy dog. 0123456789
"""


@functools.cache
def tokenizer_dir() -> Path:
    """A directory holding `tokenizer.model` (vocab 400, Gemma-style, trained once)."""
    from rgemma.tokenizer import train_tokenizer

    d = Path(tempfile.mkdtemp(prefix="rgemma-test-tok-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    lines = [line for line in TEXT.splitlines() if line]
    texts = [TEXT] * 3 + [" ".join(reversed(lines))] + [line.upper() for line in lines]
    train_tokenizer([], d / "tokenizer.model", 400, texts=texts, num_threads=1, newline_pieces=2)
    return d


@functools.cache
def tokenizer():
    from rgemma.tokenizer import Tokenizer

    return Tokenizer(tokenizer_dir() / "tokenizer.model")


def tiny_config(window: int = 8) -> GriffinConfig:
    cfg = GriffinConfig.preset("test-tiny")
    return dataclasses.replace(cfg, vocab_size=tokenizer().vocab_size, attention_window_size=window)


@functools.cache
def tiny_model(seed: int = 0):
    return random_model(tiny_config(), seed=seed)


class ScriptedModel(nn.Module):
    """Wraps a real Griffin (for its state) but makes its logits pick chosen ids.

    `chains` maps (last fed token, its segment_pos) to the next token; `script`
    builds the chain of a prompt: after a prompt ending with `last` at position
    `pos`, the model emits `ids` in order, then `after` forever.
    """

    def __init__(self, inner: nn.Module, after: int = 10):
        super().__init__()
        self.inner, self.after = inner, after
        self.config = inner.config
        self.embedder = inner.embedder
        self.chains: dict[tuple[int, int], int] = {}

    def script(self, prompt_ids: list[int], ids: list[int], start_pos: int = 0) -> None:
        prev, pos = prompt_ids[-1], start_pos + len(prompt_ids) - 1
        for tok in ids:
            assert (prev, pos) not in self.chains, "colliding scripts"
            self.chains[(prev, pos)] = tok
            prev, pos = tok, pos + 1

    def init_state(self, b):
        return self.inner.init_state(b)

    def forward(self, tokens, segment_pos=None, state=None, *, logits="all", validate=True):
        assert logits in ("last", "none")
        out, new_state = self.inner(tokens, segment_pos, state, logits=logits, validate=validate)
        if out is None:
            return out, new_state
        out = torch.zeros_like(out)  # (b, 1, v)
        last, pos = tokens[:, -1].tolist(), (new_state.next_pos - 1).tolist()
        for r in range(out.shape[0]):
            out[r, 0, self.chains.get((last[r], pos[r]), self.after)] = 10.0
        return out, new_state
