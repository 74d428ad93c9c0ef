"""Scoring: the log-likelihood of token sequences under a model, over its fixed-size state.

One scorer for every figure the project reports (training evaluation, the bundled
model's perplexity, the benchmarks' quality checks, `rgemma eval`):

    score = score_text(model, tokenizer, "It is a truth universally acknowledged")
    score.nll_per_token, score.perplexity, score.bits_per_byte

A sequence `ids` is scored as a language model reads it: token `ids[i]` (i >= 1) is
predicted from `ids[:i]`, so the first token is context only (BOS for a document).
The model runs over the sequence in chunks of `chunk_size` tokens, carrying its state
from chunk to chunk: a document of any length is scored whole, exactly as one forward
pass would score it, and memory holds one chunk's logits, never the document's.
Per chunk, the cross-entropy is taken in float32 on the (chunk x vocab) logits and
summed per row in float64.

Units: `Score.nll` is summed negative log-likelihood in nats (natural log); per token
it is the usual cross-entropy loss, `exp` of it the perplexity; `bits_per_byte`
divides the summed nats by ln 2 and by the UTF-8 byte length of the scored text, so
it compares models with different tokenizers.

Dimension letters: b batch (rows), c chunk, v vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError
from .state import GriffinState, check_state

__all__ = [
    "Score",
    "score_batch",
    "score_documents",
    "score_ids",
    "score_stream",
    "score_text",
    "score_texts",
]

DEFAULT_CHUNK_SIZE = 1024

TokenIds = Sequence[int] | Tensor | np.ndarray  # (t,) integer ids


@dataclasses.dataclass(frozen=True)
class Score:
    """What a scorer measured: summed NLL, how many tokens, how many bytes.

    Scores add (`a + b`, `sum(scores)`), so per-document scores give the corpus's.

    Attributes:
        nll: summed negative log-likelihood of the scored tokens, in nats.
        tokens: number of scored (predicted) tokens.
        bytes: UTF-8 bytes of the text those tokens spell (0 when unknown).
        greedy: whether every scored token was the model's most likely next token
            (lm-eval's `is_greedy`); None when not computed (`score_batch(greedy=True)`
            computes it). A sum is greedy when all its parts are.
    """

    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0
    greedy: bool | None = None

    @property
    def nll_per_token(self) -> float:
        """Mean cross-entropy in nats per token (NaN when no token was scored)."""
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        """`exp(nll_per_token)` (inf past float range, NaN when no token was scored)."""
        x = self.nll_per_token
        return math.exp(x) if x < 709.0 else (x if math.isnan(x) else math.inf)

    @property
    def bits_per_byte(self) -> float:
        """`nll / ln 2 / bytes`: bits per UTF-8 byte (NaN when `bytes` is 0)."""
        return self.nll / math.log(2) / self.bytes if self.bytes else math.nan

    def __add__(self, other: Score) -> Score:
        if not isinstance(other, Score):
            return NotImplemented
        greedy = None
        if self.greedy is not None and other.greedy is not None:
            greedy = self.greedy and other.greedy
        return Score(
            self.nll + other.nll, self.tokens + other.tokens, self.bytes + other.bytes, greedy
        )

    def __radd__(self, other: Any) -> Score:
        if isinstance(other, int) and other == 0:  # sum() starts from 0
            return self
        return NotImplemented

    def to_dict(self) -> dict[str, float | int]:
        """The fields and the derived figures, for JSON reports (`greedy` only when
        computed)."""

        def finite(x: float) -> float | None:  # JSON has no NaN or inf: null instead
            return x if math.isfinite(x) else None

        out = {
            "nll": self.nll,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "nll_per_token": finite(self.nll_per_token),
            "perplexity": finite(self.perplexity),
            "bits_per_byte": finite(self.bits_per_byte),
        }
        if self.greedy is not None:
            out["greedy"] = self.greedy
        return out


# ----------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------
def _as_id_list(ids: Any, vocab_size: int, what: str) -> list[int]:
    """`ids` as a list of ints in [0, vocab_size), at least 2 of them."""
    if isinstance(ids, np.ndarray):
        ids = torch.from_numpy(ids)
    if isinstance(ids, Tensor):
        if ids.ndim != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise InputError(
                f"{what} must be a 1-D integer tensor or a list of ints, "
                f"got a {ids.dtype} tensor of shape {tuple(ids.shape)}"
            )
        out = ids.tolist()
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise InputError(f"{what} must be a list of token ids, got {type(ids).__name__}")
    else:
        out = list(ids)
        for t in out:
            if not isinstance(t, int) or isinstance(t, bool):
                raise InputError(f"{what} must hold ints, got {type(t).__name__} {t!r}")
    if len(out) < 2:
        raise InputError(
            f"{what} has {len(out)} token(s); scoring needs at least 2 (the first is "
            "context only, e.g. BOS)"
        )
    lo, hi = min(out), max(out)
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise InputError(f"{what}: token id {bad} is out of range [0, {vocab_size})")
    return out


def _as_mask(mask: Any, n: int, what: str) -> list[bool]:
    if isinstance(mask, (Tensor, np.ndarray)):
        mask = mask.tolist()
    if isinstance(mask, (str, bytes)) or not isinstance(mask, Sequence) or len(mask) != n:
        got = len(mask) if isinstance(mask, Sequence) else type(mask).__name__
        raise InputError(f"{what} must be a sequence of {n} bools (one per token), got {got}")
    return [bool(m) for m in mask]


def _check_chunk_size(chunk_size: Any) -> int:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise InputError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return chunk_size


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------------
# The scorer
# ----------------------------------------------------------------------------------
@torch.no_grad()
def score_batch(
    model: nn.Module,
    rows: Sequence[TokenIds],
    *,
    masks: Sequence[Sequence[bool] | Tensor | None] | None = None,
    num_bytes: Sequence[int] | None = None,
    state: GriffinState | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    greedy: bool = False,
) -> list[Score]:
    """Score several token sequences as one batch: the core every scorer calls.

    Row r predicts `rows[r][i]` from `rows[r][:i]` for every i >= 1 (where
    `masks[r][i]` is set). The rows run together in chunks of `chunk_size` time
    steps; a shorter row is padded on the right (causal: the padding never reaches
    its scored tokens) and leaves the batch at the first chunk it has no tokens in,
    so a batch costs about what its rows cost alone. Each row's score equals the
    score of that row alone, and of one forward pass over it, to float32 rounding.

    Args:
        model: a `Griffin` (any dtype; put it in eval mode). It is called under
            `torch.no_grad`; an enclosing `torch.autocast` applies.
        rows: b sequences of token ids (lists of ints, 1-D integer tensors or numpy
            arrays), each at least 2 long; any lengths.
        masks: per row None (score every token but the first) or one bool per token,
            True where that token is scored (fine-tuning data scores only
            completions); entry 0 is ignored (the first token is never predicted).
        num_bytes: per row, the UTF-8 bytes of the scored text, copied into the
            scores (for bits per byte); default 0.
        state: a `GriffinState` of batch size b to continue from: the model's state
            after the tokens that precede each row (its first token is then the last
            context token, whose logits predict the second). None: an empty state
            (each row starts a document).
        chunk_size: time steps per forward call; memory holds (b x chunk_size x
            vocab) float32 logits.
        greedy: also set `Score.greedy`: whether each scored token is the argmax of
            its logits (ties count as greedy when the target is among the maxima).

    Returns:
        one `Score` per row, in order: summed NLL in nats, scored tokens, bytes
        (and `greedy` when asked).

    Raises:
        InputError: no rows, a row shorter than 2 tokens or with an id outside the
            vocabulary, a mask of the wrong length, a bad `chunk_size`, or a state of
            another config or batch size.
    """
    chunk_size = _check_chunk_size(chunk_size)
    if isinstance(rows, (str, bytes, Tensor)) or not isinstance(rows, Sequence) or not rows:
        raise InputError("rows must be a non-empty list of token-id sequences")
    vocab_size = model.config.vocab_size
    ids = [
        _as_id_list(r, vocab_size, f"row {i}" if len(rows) > 1 else "ids")
        for i, r in enumerate(rows)
    ]
    b = len(ids)
    if masks is not None and len(masks) != b:
        raise InputError(f"masks has {len(masks)} entries for {b} rows")
    if num_bytes is not None and len(num_bytes) != b:
        raise InputError(f"num_bytes has {len(num_bytes)} entries for {b} rows")
    scored = []
    for i, row in enumerate(ids):
        m = None if masks is None else masks[i]
        m = [True] * len(row) if m is None else _as_mask(m, len(row), f"mask of row {i}")
        scored.append(m[1:])  # aligned with the targets row[1:]
    device = _model_device(model)
    if state is not None:
        check_state(state, model.config, b)
        state = state.to(device)
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64  # no float64 on MPS

    inputs = [row[:-1] for row in ids]  # the last token predicts nothing
    lengths = [len(x) for x in inputs]
    nll = torch.zeros(b, dtype=acc_dtype, device=device)
    misses = torch.zeros(b, dtype=torch.long, device=device)  # scored tokens not the argmax
    alive = list(range(b))  # original row of each batch row of `state`
    for start in range(0, max(lengths), chunk_size):
        still = [r for r in alive if lengths[r] > start]
        if len(still) < len(alive):  # rows that are done leave the batch
            if state is not None:
                state = state.select([alive.index(r) for r in still])
            alive = still
        width = min(chunk_size, max(lengths[r] for r in alive) - start)
        x = torch.zeros(len(alive), width, dtype=torch.long)  # (b, c), right padding 0
        y = torch.zeros(len(alive), width, dtype=torch.long)
        keep = torch.zeros(len(alive), width, dtype=torch.bool)
        for j, r in enumerate(alive):
            n = min(width, lengths[r] - start)
            x[j, :n] = torch.tensor(inputs[r][start : start + n])
            y[j, :n] = torch.tensor(ids[r][start + 1 : start + 1 + n])
            keep[j, :n] = torch.tensor(scored[r][start : start + n])
        logits, state = model(x.to(device), None, state, validate=False)  # (b, c, v) float32
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), y.to(device).reshape(-1), reduction="none"
        ).view(len(alive), width)  # (b, c) nats
        per_row = (ce.to(acc_dtype) * keep.to(device)).sum(1)  # (b,)
        nll.index_add_(0, torch.tensor(alive, device=device), per_row)
        if greedy:  # the target's logit below the row's max: not the greedy choice
            target = logits.gather(-1, y.to(device)[..., None])[..., 0]  # (b, c)
            miss = (target < logits.amax(-1)) & keep.to(device)
            misses.index_add_(0, torch.tensor(alive, device=device), miss.sum(1))
        del logits, ce
    totals = nll.tolist()  # the only host syncs
    missed = misses.tolist() if greedy else [None] * b
    return [
        Score(
            nll=float(totals[r]),
            tokens=sum(scored[r]),
            bytes=int(num_bytes[r]) if num_bytes is not None else 0,
            greedy=None if missed[r] is None else missed[r] == 0,
        )
        for r in range(b)
    ]


def score_ids(
    model: nn.Module,
    ids: TokenIds,
    *,
    state: GriffinState | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    num_bytes: int = 0,
    mask: Sequence[bool] | Tensor | None = None,
) -> Score:
    """Log-likelihood of one token sequence, chunked over the model's state.

    Token `ids[i]` (i >= 1) is predicted from `ids[:i]`: for a document give
    `[bos, *tokens, eos]`. Equals `F.cross_entropy(logits[:-1], ids[1:],
    reduction="sum")` over one forward pass, to float32 rounding, in bounded memory.
    Splits add up: with `st` the state after `ids[:k]` (`model(torch.tensor([ids[:k]]))`),
    `score_ids(ids[:k + 1]) + score_ids(ids[k:], state=st) == score_ids(ids)`.

    Args:
        model: a `Griffin` in eval mode.
        ids: (t,) token ids, t >= 2 (a list of ints or a 1-D integer tensor).
        state: the model's state after the tokens before `ids` (batch size 1); None
            starts empty.
        chunk_size: tokens per forward call (memory: chunk_size x vocab float32 logits).
        num_bytes: UTF-8 bytes of the scored text, copied into the score.
        mask: (t,) bools, True where a token is scored (entry 0 ignored); None: all.

    Returns:
        `Score(nll in nats, tokens = t - 1 or the mask's count, bytes = num_bytes)`.

    Raises:
        InputError: fewer than 2 tokens, an id outside the vocabulary, a bad
            `chunk_size` or mask, a state of another config or batch size.
    """
    [score] = score_batch(
        model,
        [ids],
        masks=None if mask is None else [mask],
        num_bytes=[num_bytes],
        state=state,
        chunk_size=chunk_size,
    )
    return score


@torch.no_grad()
def score_stream(
    model: nn.Module,
    pieces: Iterable[TokenIds],
    *,
    num_bytes: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Score:
    """Log-likelihood of one sequence that arrives in pieces, in bounded memory.

    The sequence is the concatenation of `pieces` (e.g. the blocks of a text file
    too large to tokenize at once); it is scored as `score_ids` would score it whole,
    each token predicted from everything before it, because the model's fixed-size
    state is carried from piece to piece: memory holds one piece's ids, the state and
    one chunk's logits, whatever the total length. Pieces may be of any length
    (empty ones are skipped).

    Args:
        model: a `Griffin` in eval mode.
        pieces: an iterable of (t_i,) token-id sequences; the first token of the
            first piece is context only (BOS for a document).
        num_bytes: UTF-8 bytes of the scored text, copied into the score.
        chunk_size: tokens per forward call.

    Returns:
        `Score(nll in nats, tokens = total length - 1, bytes = num_bytes)`.

    Raises:
        InputError: fewer than 2 tokens in all, an id outside the vocabulary, a bad
            `chunk_size`.
    """
    chunk_size = _check_chunk_size(chunk_size)
    vocab_size = model.config.vocab_size
    device = _model_device(model)
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    nll = torch.zeros((), dtype=acc_dtype, device=device)
    state: GriffinState | None = None
    last: list[int] = []  # the previous piece's last token: it predicts this piece's first
    count = 0
    for i, piece in enumerate(pieces):
        if isinstance(piece, np.ndarray):
            piece = torch.from_numpy(piece)
        ids = piece.tolist() if isinstance(piece, Tensor) else list(piece)
        if not ids:
            continue
        row = [*last, *ids]
        if len(row) < 2:  # the very first token alone: context for the next piece
            last = _as_id_list(ids * 2, vocab_size, f"piece {i}")[:1]
            continue
        row = _as_id_list(row, vocab_size, f"piece {i}")
        inputs = row[:-1]  # the last token predicts nothing (yet): it leads the next piece
        for start in range(0, len(inputs), chunk_size):
            x = torch.tensor([inputs[start : start + chunk_size]], device=device)  # (1, c)
            y = torch.tensor(row[start + 1 : start + 1 + x.shape[1]], device=device)  # (c,)
            logits, state = model(x, None, state, validate=False)  # (1, c, v) float32
            ce = F.cross_entropy(logits[0].float(), y, reduction="none")  # (c,) nats
            nll += ce.to(acc_dtype).sum()
            count += x.shape[1]
            del logits, ce
        last = row[-1:]
    if count == 0:
        raise InputError("the pieces hold fewer than 2 tokens; scoring needs at least 2")
    return Score(nll=float(nll), tokens=count, bytes=int(num_bytes))


def score_documents(
    model: nn.Module,
    documents: Sequence[TokenIds],
    *,
    masks: Sequence[Sequence[bool] | Tensor | None] | None = None,
    num_bytes: Sequence[int] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    batch_size: int = 1,
    progress: bool = False,
) -> list[Score]:
    """Score many documents, each whole and from an empty state; one score each.

    Documents are grouped `batch_size` at a time, longest first (so rows of a batch
    have similar lengths), and run through `score_batch`; the scores come back in
    the documents' order. `sum(scores)` is the corpus's score.

    Args:
        model: a `Griffin` in eval mode.
        documents: token-id sequences, each at least 2 long (`[bos, ..., eos]`).
        masks, num_bytes: per document, as in `score_batch`.
        chunk_size: time steps per forward call.
        batch_size: documents per batch (memory: batch_size x chunk_size x vocab).
        progress: show a tqdm bar over the tokens on stderr.

    Raises:
        InputError: as `score_batch`, or a bad `batch_size`.
    """
    chunk_size = _check_chunk_size(chunk_size)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size must be an int >= 1, got {batch_size!r}")
    n = len(documents)
    for name, per_doc in (("masks", masks), ("num_bytes", num_bytes)):
        if per_doc is not None and len(per_doc) != n:
            raise InputError(f"{name} has {len(per_doc)} entries for {n} documents")
    order = sorted(range(n), key=lambda i: -len(documents[i]))
    scores: list[Score | None] = [None] * n
    from tqdm import tqdm

    total = sum(max(len(d) - 1, 0) for d in documents)
    with tqdm(total=total, disable=not progress, desc="score", unit="tok", leave=False) as bar:
        for lo in range(0, n, batch_size):
            group = order[lo : lo + batch_size]
            try:
                got = score_batch(
                    model,
                    [documents[i] for i in group],
                    masks=None if masks is None else [masks[i] for i in group],
                    num_bytes=None if num_bytes is None else [num_bytes[i] for i in group],
                    chunk_size=chunk_size,
                )
            except InputError as err:
                if len(group) == 1:
                    raise InputError(f"document {group[0]}: {err}") from None
                raise
            for i, s in zip(group, got):
                scores[i] = s
            bar.update(sum(len(documents[i]) - 1 for i in group))
    return scores  # type: ignore[return-value]


def score_texts(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    batch_size: int = 1,
    progress: bool = False,
) -> list[Score]:
    """Score texts as documents: each `<bos> text <eos>`, whole; one score each.

    Every token after BOS is scored, EOS included (a document's end is part of the
    text's likelihood); `bytes` is the UTF-8 length of the text.

    Args:
        model: a `Griffin` in eval mode.
        tokenizer: a `rgemma.Tokenizer` (its `encode(text, add_bos, add_eos)`).
        texts: the documents.
        chunk_size, batch_size, progress: as in `score_documents`.

    Raises:
        InputError: a text that is not a str; as `score_documents`.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InputError(f"texts must be a list of str, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"text {i} must be a str, got {type(t).__name__}")
    # Documents are plain text: `<bos>` written in them is characters, not the id.
    docs = [tokenizer.encode(t, add_bos=True, add_eos=True, special=False) for t in texts]
    return score_documents(
        model,
        docs,
        num_bytes=[len(t.encode("utf-8")) for t in texts],
        chunk_size=chunk_size,
        batch_size=batch_size,
        progress=progress,
    )


def score_text(
    model: nn.Module, tokenizer: Any, text: str, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Score:
    """Log-likelihood of one text as a document: `<bos> text <eos>`, scored whole.

    Args:
        model: a `Griffin` in eval mode.
        tokenizer: a `rgemma.Tokenizer`.
        text: the document (may be empty: then only EOS is scored).
        chunk_size: tokens per forward call.

    Returns:
        `Score(nll in nats over every token after BOS, EOS included; tokens;
        bytes = len(text.encode("utf-8")))`.

    Raises:
        InputError: `text` is not a str, or a bad `chunk_size`.
    """
    if not isinstance(text, str):
        raise InputError(f"text must be a str, got {type(text).__name__}")
    [score] = score_texts(model, tokenizer, [text], chunk_size=chunk_size)
    return score
