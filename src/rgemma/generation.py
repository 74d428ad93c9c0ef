"""Text generation: chunked prefill, batched decoding, streaming, stateful chat.

The model's state is fixed in size, so a prompt of any length is prefilled in
chunks of bounded memory, and each decode step costs the same whatever the
sequence length. Batches of prompts of different lengths are left-padded with
segment_pos -1, which is exact: greedy results of a batch equal each prompt run
alone.

Counterpart of `recurrentgemma/torch/sampler.py` (the official sampler), without
its faults (see REFERENCE.md): every row keeps all its tokens, every row stops on
its own (EOS, `<end_of_turn>`, stop strings, length), sampling has temperature,
top-k, top-p and min-p, and prefill may continue from a state.

Public API:
    load(path) -> (model, tokenizer)
    prefill(model, tokens, segment_pos, state) -> (last logits, state)
    generate(model, tokenizer, prompts, ...) -> list[GenerationResult]
    stream(model, tokenizer, prompt, ...) -> TextStream (an iterator of str)
    prompt_state(model, tokenizer, prompt) -> GriffinState (to save and continue)
    ChatSession(model, tokenizer, system=None, ...): multi-turn chat over a state
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import CheckpointError, InputError
from .sampling import make_generators, mask_beyond_vocab, sample, validate_sampling
from .state import GriffinState, concat_states

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ChatSession",
    "GenerationResult",
    "TextStream",
    "find_tokenizer",
    "generate",
    "load",
    "prefill",
    "prompt_state",
    "stream",
]

#: Tokens per prefill call: activations are bounded by chunk_size x batch x width.
DEFAULT_CHUNK_SIZE = 1024
#: Prompts longer than this (tokens per row) get a progress bar when stderr is a TTY.
PROGRESS_MIN_TOKENS = 4096

Prompt = str | Sequence[int]


# ----------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------
def find_tokenizer(path: str | os.PathLike[str] | None) -> Path:
    """Where the tokenizer of a checkpoint is: `tokenizer.model` in a checkpoint
    directory, or beside a checkpoint file; for `path=None`, the bundled one.

    Raises:
        CheckpointError: no `tokenizer.model` there (the message names where it looked).
    """
    if path is None:
        from .tokenizer import BUNDLED_TOKENIZER_PATH

        candidates = [
            Path(__file__).parent / "assets" / "bundled" / "tokenizer.model",
            BUNDLED_TOKENIZER_PATH,
        ]
    else:
        p = Path(path)
        candidates = [p / "tokenizer.model" if p.is_dir() else p.parent / "tokenizer.model"]
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError("no tokenizer found: looked for " + ", ".join(str(c) for c in candidates))


def check_vocab(model: torch.nn.Module, tokenizer: Any) -> None:
    """Raise `CheckpointError` unless every tokenizer id is a valid model id.

    The model's vocabulary may be larger (padding rows never sampled: `generate`
    masks them); a tokenizer larger than the model is an error.
    """
    model_vocab = model.config.vocab_size
    if tokenizer.vocab_size > model_vocab:
        raise CheckpointError(
            f"tokenizer {getattr(tokenizer, 'path', '')} has {tokenizer.vocab_size} pieces but "
            f"the model's vocab_size is {model_vocab}: the tokenizer's vocabulary must not "
            "be larger than the model's (is it the tokenizer of another model?)"
        )


def load(
    path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Load a model and its tokenizer.

    Args:
        path: a checkpoint directory or file (see `rgemma.checkpoint.load_model`); the
            tokenizer is `tokenizer.model` in the directory or beside the file. None:
            the bundled model and tokenizer.
        dtype, device: passed to `load_model`.

    Returns:
        (model `Griffin` in eval mode, `Tokenizer`).

    Raises:
        CheckpointError: unreadable checkpoint, no tokenizer, or a tokenizer with more
            pieces than the model's vocab_size (the message names both numbers).
    """
    from .checkpoint import load_model
    from .tokenizer import Tokenizer

    model = load_model(path, dtype=dtype, device=device)
    source = getattr(model, "source", None) or {}
    tok_path = source.get("tokenizer") if isinstance(source, Mapping) else None
    tokenizer = Tokenizer(tok_path or find_tokenizer(path))
    check_vocab(model, tokenizer)
    return model, tokenizer


# ----------------------------------------------------------------------------------
# Compiled decode step
# ----------------------------------------------------------------------------------
def decode_step(
    model: torch.nn.Module, tokens: Tensor, state: GriffinState
) -> tuple[Tensor, GriffinState]:
    """One decode step of every row: tokens (b,) -> (logits (b, vocab) float32, state).

    `model.decode_step` where the model has one (a `Griffin`'s, compiled after
    `compile_decode`); any other module with Griffin's `forward` (a wrapper) goes
    through its forward. The generation loop and the server's scheduler both call this.
    """
    step = getattr(model, "decode_step", None)
    if step is not None:
        return step(tokens, state)
    logits, state = model(tokens[:, None], None, state, logits="last", validate=False)
    return logits[:, -1], state


class _CompiledDecodeStep:
    """`model.decode_step` through `torch.compile`, falling back to eager (with one
    warning) if compiling fails, e.g. on a machine without a C++ compiler."""

    def __init__(self, model: torch.nn.Module, mode: str | None) -> None:
        self.eager = model.decode_step  # the bound method of the class
        self.compiled = torch.compile(self.eager, mode=mode, dynamic=None)
        self.failed: str | None = None  # why compiling failed, once it has
        self.calls = 0
        # Seconds spent in first calls at a new batch size (those that compile), so
        # speed reports can leave compiling out.
        self.compile_seconds = 0.0
        self._batch_sizes: set[int] = set()

    def __call__(self, tokens: Tensor, state: GriffinState) -> tuple[Tensor, GriffinState]:
        if self.failed is not None:
            return self.eager(tokens, state)
        first = tokens.shape[0] not in self._batch_sizes
        t0 = time.perf_counter()
        try:
            out = self.compiled(tokens, state)
        except Exception as err:  # noqa: BLE001 - any compiler failure means eager
            if self.calls:  # it compiled and ran before: a real error, not the compiler
                raise
            self.failed = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
            print(
                f"rgemma: torch.compile of the decode step failed ({self.failed}); "
                "decoding eagerly",
                file=sys.stderr,
            )
            return self.eager(tokens, state)
        if first:
            self._batch_sizes.add(tokens.shape[0])
            self.compile_seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def compile_decode(model: torch.nn.Module, mode: str | None = None) -> torch.nn.Module:
    """Make every later decode step of `model` a `torch.compile`d one (in place).

    Generation (`generate`, `stream`, `ChatSession`, the server) calls
    `model.decode_step` once per token; this replaces it on this model with a
    compiled version of the same function. Batch-1 decode of small models is
    dominated by per-operator overhead, which compiling removes (the benchmark's
    bundled-model table measures it). The first step compiles (tens of seconds on a
    CPU); a new batch size recompiles once, after which the batch dimension is
    dynamic. If compiling fails the step runs eagerly, with one warning on stderr.
    Prefill is not compiled (its lengths vary).

    Args:
        model: a `Griffin` (quantized or not).
        mode: `torch.compile` mode (None: the default).

    Returns:
        the same model.

    Raises:
        InputError: `model` has no `decode_step`.
    """
    if not callable(getattr(model, "decode_step", None)):
        raise InputError(f"compile_decode expects a rgemma Griffin, got {type(model).__name__}")
    if not isinstance(model.decode_step, _CompiledDecodeStep):
        model.decode_step = _CompiledDecodeStep(model, mode)
    return model


# ----------------------------------------------------------------------------------
# Prefill
# ----------------------------------------------------------------------------------
def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return model.embedder.input_embedding.dtype


@torch.no_grad()
def prefill(
    model: torch.nn.Module,
    tokens: Tensor,
    segment_pos: Tensor | None = None,
    state: GriffinState | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool | None = None,
) -> tuple[Tensor, GriffinState]:
    """Run a prompt through the model in chunks; return the last logits and the state.

    Memory is bounded by `chunk_size` whatever the prompt length (the state is fixed
    in size). Exact: chunking gives the logits and state of one call.

    Args:
        model: a `Griffin`.
        tokens: (b, t) int64, t >= 1.
        segment_pos: (b, t) int64, -1 for left padding; None continues from the
            state's positions (from 0 without a state).
        state: state to continue from; None starts empty.
        chunk_size: tokens per model call.
        progress: show a tqdm bar on stderr; None: only when stderr is a TTY and
            t > `PROGRESS_MIN_TOKENS`.

    Returns:
        (logits (b, v) float32 at the last position, new state).

    Raises:
        InputError: t == 0, chunk_size < 1, or what `Griffin.forward` raises.
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise InputError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    t = tokens.shape[1] if tokens.ndim == 2 else 0
    if t == 0:
        raise InputError(
            f"prefill needs at least one token, got tokens of shape {tuple(tokens.shape)}"
        )
    if progress is None:
        progress = t > PROGRESS_MIN_TOKENS and sys.stderr.isatty()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=t, unit="tok", desc="prefill", file=sys.stderr, leave=False)
    logits = None
    try:
        for start in range(0, t, chunk_size):
            end = min(t, start + chunk_size)
            seg = segment_pos[:, start:end] if segment_pos is not None else None
            logits, state = model(
                tokens[:, start:end], seg, state, logits="last" if end == t else "none"
            )
            if bar is not None:
                bar.update(end - start)
    finally:
        if bar is not None:
            bar.close()
    return logits[:, -1], state


# ----------------------------------------------------------------------------------
# Results and per-row text tracking
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class GenerationResult:
    """What one prompt generated.

    Attributes:
        text: the generated text (no prompt), without the EOS / `<end_of_turn>` token
            and cut right before a stop string.
        token_ids: the generated ids (no prompt). A final EOS / `<end_of_turn>` is not
            included (see `stop_token_id`); with a stop string, ids go up to and
            including the one that completed it, none after.
        prompt_tokens: number of prompt tokens (BOS included, padding excluded).
        finish_reason: "stop" (EOS, end of turn, stop string) or "length".
        stop_token_id: the EOS / `<end_of_turn>` id that stopped the row, else None.
        stop_string: the stop string that stopped the row, else None.
        state: with `return_state=True`, the row's state (batch size 1) after the
            prompt and all of `token_ids`: give it as `state=` to continue.
        prefill_seconds, decode_seconds: wall times of the whole batch's prefill
            (up to the first sampled token) and decode loop.
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    stop_token_id: int | None = None
    stop_string: str | None = None
    state: GriffinState | None = dataclasses.field(default=None, repr=False)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


class RowText:
    """Decodes one row's ids into text pieces safe to print, and finds stop strings.

    A piece never ends inside a UTF-8 character (the tokenizer's `StreamDecoder`
    holds back incomplete byte-fallback sequences), and text that may be the start
    of a stop string is held back until it is known not to be one, so the pieces
    concatenate exactly to the final text. Work per token is O(piece + longest stop).
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.decoder = tokenizer.stream_decoder()
        self.stops = tuple(stops)
        self.parts: list[str] = []
        self.pending = ""  # decoded text held back: it may begin a stop string
        self.stop_string: str | None = None

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one id; return (text to release, whether a stop string completed)."""
        return self._add(self.decoder.push(token_id))

    def finish(self) -> str:
        """End of the row (EOS or length): release everything held back."""
        out, hit = self._add(self.decoder.flush())
        if not hit and self.pending:
            out += self.pending
            self.parts.append(self.pending)
            self.pending = ""
        return out

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def _add(self, piece: str) -> tuple[str, bool]:
        if not piece:
            return "", False
        if not self.stops:
            self.parts.append(piece)
            return piece, False
        buf = self.pending + piece
        best: tuple[int, str] | None = None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            out = buf[: best[0]]
            self.stop_string, self.pending = best[1], ""
            self.parts.append(out)
            return out, True
        # Hold back the longest suffix of buf that is a proper prefix of a stop string.
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        out, self.pending = buf[: len(buf) - hold], buf[len(buf) - hold :]
        if out:
            self.parts.append(out)
        return out, False


# ----------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------
def _as_prompt_list(prompts: Any) -> list[Prompt]:
    """A list of prompts (str or list of ids) from what the caller gave."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Tensor):
        if prompts.ndim == 1:
            return [prompts.tolist()]
        if prompts.ndim == 2:
            return prompts.tolist()
        raise InputError(
            f"a tensor of prompts must be 1-D or 2-D, got shape {tuple(prompts.shape)}"
        )
    if not isinstance(prompts, Sequence):
        raise InputError(
            f"prompts must be a str, a list of str, or a list of token-id lists; got "
            f"{type(prompts).__name__}"
        )
    prompts = list(prompts)
    if not prompts:
        raise InputError("the list of prompts is empty: give at least one prompt")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
        return [prompts]  # one prompt of token ids
    out: list[Prompt] = []
    for i, p in enumerate(prompts):
        if isinstance(p, Tensor):
            p = p.tolist()
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, Sequence) and all(
            isinstance(x, int) and not isinstance(x, bool) for x in p
        ):
            out.append(list(p))
        else:
            raise InputError(
                f"prompts[{i}] must be a str or a list of int token ids, got {type(p).__name__}"
            )
    return out


def _as_stops(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    for s in stops:
        if not isinstance(s, str) or not s:
            raise InputError(f"stop strings must be non-empty str, got {s!r}")
    return stops


def _check_generate_args(
    max_new_tokens: Any, temperature: float, top_k: int, top_p: float, min_p: float, seed: Any
) -> None:
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 0
    ):
        raise InputError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    validate_sampling(temperature, top_k, top_p, min_p)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise InputError(f"seed must be an int or None, got {seed!r}")


def _encode(
    tokenizer: Any, prompts: list[Prompt], *, chat: bool, continuing: bool, vocab_size: int
) -> list[list[int]]:
    """Token ids of each prompt. Text gets BOS unless continuing from a state; with
    `chat`, text is formatted as one user turn. Id lists are used as they are."""
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if chat:
                messages = [{"role": "user", "content": p}]
                if continuing:
                    ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_bos=False)
                else:
                    ids = tokenizer.encode_chat(messages)
            else:
                ids = tokenizer.encode(p, add_bos=not continuing)
        else:
            ids = list(p)
            bad = [x for x in ids if not 0 <= x < vocab_size]
            if bad:
                raise InputError(
                    f"prompts[{i}] has token id {bad[0]}, outside the model's vocabulary "
                    f"[0, {vocab_size})"
                )
        if not ids:
            raise InputError(
                f"prompts[{i}] has no tokens: "
                + (
                    "continuing from a state needs at least one new token"
                    if continuing
                    else "a token-id prompt must not be empty"
                )
            )
        out.append(ids)
    return out


# ----------------------------------------------------------------------------------
# The generation loop
# ----------------------------------------------------------------------------------
class _Generation:
    """One batched generation; iterating yields (row, text piece) as rows progress,
    and `results` is set once iteration is over."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        prompt_ids: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        top_k: int,
        top_p: float,
        min_p: float,
        seed: int | None,
        stops: tuple[str, ...],
        state: GriffinState | None,
        chunk_size: int,
        return_state: bool,
        progress: bool | None,
    ) -> None:
        self.model, self.tokenizer, self.prompt_ids = model, tokenizer, prompt_ids
        self.max_new_tokens = max_new_tokens
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        self.seed, self.stops, self.state = seed, stops, state
        self.chunk_size, self.return_state, self.progress = chunk_size, return_state, progress
        self.results: list[GenerationResult] | None = None
        if state is not None:  # checked now, not at the first step of a stream
            from .state import check_state

            if not isinstance(state, GriffinState):
                raise InputError(f"state must be a GriffinState, got {type(state).__name__}")
            b = len(prompt_ids)
            if state.batch_size not in (1, b):
                raise InputError(
                    f"state has batch size {state.batch_size}; continuing {b} prompt(s) "
                    f"needs a state of batch size {b} or 1"
                )
            check_state(state, model.config, state.batch_size)

    # -- prefill -----------------------------------------------------------------
    def _prefill(self) -> tuple[Tensor, GriffinState]:
        model, prompt_ids = self.model, self.prompt_ids
        device, b = _device(model), len(prompt_ids)
        lengths = [len(p) for p in prompt_ids]
        t = max(lengths)
        state = self.state
        if state is None:
            pad = max(self.tokenizer.pad_id, 0)
            tokens = torch.full((b, t), pad, dtype=torch.long)
            segment_pos = torch.full((b, t), -1, dtype=torch.long)
            for r, ids in enumerate(prompt_ids):
                tokens[r, t - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                segment_pos[r, t - len(ids) :] = torch.arange(len(ids))
            return prefill(
                model,
                tokens.to(device),
                segment_pos.to(device),
                None,
                chunk_size=self.chunk_size,
                progress=self.progress,
            )

        state = state.to(device, dtype=_dtype(model))
        if state.batch_size == 1 and b > 1:
            state = state.select([0] * b)
        if len(set(lengths)) == 1:
            tokens = torch.tensor(prompt_ids, dtype=torch.long, device=device)
            return prefill(
                model, tokens, None, state, chunk_size=self.chunk_size, progress=self.progress
            )
        # Left padding between a state and new tokens would not be exact: rows of
        # different lengths are prefilled one by one, then batched for decoding.
        logits, states = [], []
        for r, ids in enumerate(prompt_ids):
            tokens = torch.tensor([ids], dtype=torch.long, device=device)
            lg, st = prefill(
                model,
                tokens,
                None,
                state.select([r]),
                chunk_size=self.chunk_size,
                progress=self.progress,
            )
            logits.append(lg)
            states.append(st)
        return torch.cat(logits), concat_states(states)

    # -- decode ------------------------------------------------------------------
    def _sample(self, logits: Tensor, gens: list[torch.Generator] | None) -> Tensor:
        logits = mask_beyond_vocab(logits, self.tokenizer.vocab_size)
        return sample(logits, generator=gens, **self.sampling)

    @torch.no_grad()
    def _step(
        self, tokens: Tensor, state: GriffinState, want_logits: bool
    ) -> tuple[Tensor | None, GriffinState]:
        if want_logits:
            return decode_step(self.model, tokens, state)
        _, state = self.model(tokens[:, None], None, state, logits="none", validate=False)
        return None, state

    def __iter__(self) -> Iterator[tuple[int, str]]:
        tokenizer, max_new = self.tokenizer, self.max_new_tokens
        b = len(self.prompt_ids)
        device = _device(self.model)
        stop_ids = {
            i for i in (tokenizer.eos_id, tokenizer.end_of_turn_id) if i is not None and i >= 0
        }

        t0 = time.perf_counter()
        if max_new == 0 and not self.return_state:  # nothing to compute
            self.results = [
                GenerationResult(
                    text="", token_ids=[], prompt_tokens=len(p), finish_reason="length"
                )
                for p in self.prompt_ids
            ]
            return
        logits, state = self._prefill()
        gens = make_generators(self.seed, b, device) if self.seed is not None else None

        ids: list[list[int]] = [[] for _ in range(b)]
        texts = [RowText(tokenizer, self.stops) for _ in range(b)]
        reason: list[str | None] = [None] * b
        stop_token: list[int | None] = [None] * b
        snaps: list[GriffinState | None] = [None] * b
        rows = list(range(b))  # batch position -> prompt index (rows still decoding)

        if max_new == 0:
            for r in range(b):
                reason[r] = "length"
                if self.return_state:
                    snaps[r] = state.select([r])
            next_tok = None
        else:
            next_tok = self._sample(logits, gens)  # (b,)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()

        while next_tok is not None:
            toks = next_tok.tolist()  # the one host sync per step
            fed_snap: list[int] = []  # positions whose last token must be fed first
            for pos, tok in enumerate(toks):
                r = rows[pos]
                if tok in stop_ids:
                    reason[r], stop_token[r] = "stop", tok
                    piece = texts[r].finish()
                    if self.return_state:  # all of ids[r] is already in the state
                        snaps[r] = state.select([pos])
                else:
                    ids[r].append(tok)
                    piece, hit = texts[r].push(tok)
                    if hit:
                        reason[r] = "stop"
                    elif len(ids[r]) >= max_new:
                        reason[r] = "length"
                        piece += texts[r].finish()
                    if reason[r] is not None and self.return_state:
                        fed_snap.append(pos)
                if piece:
                    yield r, piece
            keep = [pos for pos, r in enumerate(rows) if reason[r] is None]
            if not keep and not fed_snap:
                break
            feed = sorted(keep + fed_snap)
            if len(feed) < len(rows):  # drop finished rows from the batch
                state, next_tok = state.select(feed), next_tok[feed]
                gens = [gens[p] for p in feed] if gens is not None else None
                rows = [rows[p] for p in feed]
            logits, state = self._step(next_tok, state, want_logits=bool(keep))
            if fed_snap:
                for pos, r in enumerate(rows):
                    if reason[r] is not None:
                        snaps[r] = state.select([pos])
                keep = [pos for pos, r in enumerate(rows) if reason[r] is None]
                if not keep:
                    break
                if len(keep) < len(rows):
                    state, logits = state.select(keep), logits[keep]
                    gens = [gens[p] for p in keep] if gens is not None else None
                    rows = [rows[p] for p in keep]
            next_tok = self._sample(logits, gens)
        t2 = time.perf_counter()

        self.results = [
            GenerationResult(
                text=texts[r].text,
                token_ids=ids[r],
                prompt_tokens=len(self.prompt_ids[r]),
                finish_reason=reason[r] or "length",
                stop_token_id=stop_token[r],
                stop_string=texts[r].stop_string,
                state=snaps[r],
                prefill_seconds=t1 - t0,
                decode_seconds=t2 - t1,
            )
            for r in range(b)
        ]


def _prepare(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Any,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    seed: int | None,
    stop: str | Sequence[str] | None,
    chat: bool,
    state: GriffinState | None,
    chunk_size: int,
    return_state: bool,
    progress: bool | None,
) -> _Generation:
    """Check arguments, encode prompts and set up a `_Generation`."""
    _check_generate_args(max_new_tokens, temperature, top_k, top_p, min_p, seed)
    stops = _as_stops(stop)
    prompt_list = _as_prompt_list(prompts)
    prompt_ids = _encode(
        tokenizer,
        prompt_list,
        chat=chat,
        continuing=state is not None,
        vocab_size=model.config.vocab_size,
    )
    return _Generation(
        model,
        tokenizer,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seed=seed,
        stops=stops,
        state=state,
        chunk_size=chunk_size,
        return_state=return_state,
        progress=progress,
    )


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: str | Sequence[Prompt],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    chat: bool = False,
    state: GriffinState | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    return_state: bool = False,
    progress: bool | None = None,
) -> list[GenerationResult]:
    """Generate continuations of a batch of prompts.

    Prompts are left-padded (segment_pos -1, pad id `tokenizer.pad_id`), prefilled
    together in chunks, then decoded one token per step for all rows with the
    fixed-size state; finished rows leave the batch. Greedy results equal each
    prompt run alone, token for token.

    Each row stops on EOS, on `<end_of_turn>` (when the tokenizer has it), when its
    text contains a stop string, or after `max_new_tokens` tokens; nothing after its
    stop is in its result.

    Args:
        model: a `Griffin`.
        tokenizer: a `rgemma.tokenizer.Tokenizer`.
        prompts: a str, a list of str, a list of token-id lists (used as they are: no
            BOS is added), or one flat list of ids. Text gets BOS first (an empty
            string generates from BOS alone), except when continuing from `state`.
        max_new_tokens: >= 0; 0 returns empty generations.
        temperature, top_k, top_p, min_p: see `rgemma.sampling.sample`; temperature 0
            is greedy.
        seed: None uses torch's global RNG. An int gives row r its own generator
            seeded `seed + r`, so results are reproducible and row r's tokens do not
            depend on the other prompts of the batch (same as that prompt alone with
            `seed + r`, up to float rounding).
        stop: a stop string or a list of them.
        chat: format each text prompt as one user turn of the Gemma chat template
            (`<start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n`).
        state: continue from this state (batch size 1, or one row per prompt), e.g.
            one saved after a long document (`prompt_state`); prompts are then the
            continuation, encoded without BOS, and must not be empty.
        chunk_size: prefill chunk length in tokens.
        return_state: put each row's state in its result (see `GenerationResult`).
        progress: prefill progress bar (see `prefill`).

    Returns:
        one `GenerationResult` per prompt, in order.

    Raises:
        InputError: empty prompt list, a prompt that is neither text nor ids, ids out
            of range, max_new_tokens < 0, invalid sampling parameters, empty stop
            strings, a state of another config or batch size.
    """
    gen = _prepare(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seed=seed,
        stop=stop,
        chat=chat,
        state=state,
        chunk_size=chunk_size,
        return_state=return_state,
        progress=progress,
    )
    for _ in gen:
        pass
    assert gen.results is not None
    return gen.results


class TextStream(Iterator[str]):
    """Iterator over the text pieces of one generation; `result` is the full
    `GenerationResult` once the iterator is exhausted (None before)."""

    def __init__(
        self, generation: _Generation, on_done: Callable[[GenerationResult], None] | None = None
    ) -> None:
        self._generation = generation
        self._it = iter(generation)
        self._on_done = on_done
        self.result: GenerationResult | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        try:
            _, piece = next(self._it)
        except StopIteration:
            if self.result is None and self._generation.results is not None:
                self.result = self._generation.results[0]
                if self._on_done is not None:
                    self._on_done(self.result)
            raise
        return piece


def stream(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: Prompt,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    chat: bool = False,
    state: GriffinState | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    return_state: bool = False,
    progress: bool | None = None,
) -> TextStream:
    """Generate for ONE prompt, yielding text pieces as they are decoded.

    A piece never splits a UTF-8 character or a byte-fallback sequence, and text
    that may begin a stop string is held back until it is known not to, so the
    pieces concatenate exactly to `generate(...)[0].text` for the same arguments.
    Arguments are as in `generate` (checked before the first piece is asked for).

    Returns:
        a `TextStream`: iterate it for the pieces (non-empty str); its `result`
        attribute holds the `GenerationResult` once it is exhausted.

    Raises:
        InputError: as `generate`, or `prompt` is a list of several prompts.
    """
    if not isinstance(prompt, str):
        prompt_list = _as_prompt_list(prompt)
        if len(prompt_list) != 1:
            raise InputError(f"stream takes one prompt, got {len(prompt_list)}")
        prompt = prompt_list[0]
    gen = _prepare(
        model,
        tokenizer,
        [prompt],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seed=seed,
        stop=stop,
        chat=chat,
        state=state,
        chunk_size=chunk_size,
        return_state=return_state,
        progress=progress,
    )
    return TextStream(gen)


def prompt_state(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: Prompt,
    *,
    add_bos: bool = True,
    state: GriffinState | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool | None = None,
) -> GriffinState:
    """The state after a prompt (e.g. a long system prompt or document), to save with
    `rgemma.state.save_state` and continue later with `generate(..., state=...)`.

    Args:
        prompt: text (encoded with BOS if `add_bos` and no `state`) or token ids.
        state: continue from this state (batch size 1).

    Returns:
        a `GriffinState` of batch size 1.

    Raises:
        InputError: an empty prompt, ids out of range.
    """
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_bos=add_bos and state is None)
    else:
        ids = _as_prompt_list(prompt)
        if len(ids) != 1:
            raise InputError(f"prompt_state takes one prompt, got {len(ids)}")
        ids = _encode(
            tokenizer,
            ids,
            chat=False,
            continuing=state is not None,
            vocab_size=model.config.vocab_size,
        )[0]
    if not ids:
        raise InputError("prompt_state needs at least one token")
    device = _device(model)
    if state is not None:
        state = state.to(device, dtype=_dtype(model))
    tokens = torch.tensor([ids], dtype=torch.long, device=device)
    return prefill(model, tokens, None, state, chunk_size=chunk_size, progress=progress)[1]


# ----------------------------------------------------------------------------------
# Chat
# ----------------------------------------------------------------------------------
class ChatSession:
    """A multi-turn chat that keeps the model's state between turns.

    Each turn feeds only its new tokens. The first turn is `encode_chat` of the
    (system and) user message; later turns feed
    `<end_of_turn>\\n<start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n`
    after the previous reply's tokens, exactly the ids `encode_chat` gives for the
    whole conversation (SentencePiece never merges across `<end_of_turn>`), with the
    model's reply kept as the ids it generated. The `<end_of_turn>` (or EOS) that
    ended a reply is not fed when it is sampled but as the first token of the next
    turn, so a reply cut by `max_new_tokens` is closed the same way. With a stop
    string, the state holds the reply's ids up to the one that completed the stop
    string, while `messages` holds the text cut before it.

    Args:
        model, tokenizer: as for `generate` (the tokenizer needs the chat pieces).
        system: optional system prompt, folded into the first user turn.
        **sampling: `max_new_tokens`, `temperature`, `top_k`, `top_p`, `min_p`,
            `seed` (turn k uses `seed + k`), `stop`, `chunk_size`.

    Attributes:
        messages: the conversation so far, as `{"role", "content"}` dicts.
        state: the model state after the last reply (None before the first turn).
    """

    _SAMPLING = (
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "seed",
        "stop",
        "chunk_size",
    )

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, system: str | None = None, **sampling: Any
    ) -> None:
        unknown = sorted(set(sampling) - set(self._SAMPLING))
        if unknown:
            raise InputError(
                f"unknown ChatSession option(s): {', '.join(unknown)}; "
                f"expected some of {', '.join(self._SAMPLING)}"
            )
        if system is not None and not isinstance(system, str):
            raise InputError(f"system must be a str or None, got {type(system).__name__}")
        if tokenizer.start_of_turn_id is None or tokenizer.end_of_turn_id is None:
            raise InputError(
                f"tokenizer {getattr(tokenizer, 'path', '')} has no "
                "<start_of_turn>/<end_of_turn> pieces: it cannot chat"
            )
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.sampling = {
            "max_new_tokens": 256,
            "temperature": 0.0,
            "top_k": 0,
            "top_p": 1.0,
            "min_p": 0.0,
            "seed": None,
            "stop": None,
            "chunk_size": DEFAULT_CHUNK_SIZE,
        }
        self.sampling.update(sampling)
        s = self.sampling
        _check_generate_args(
            s["max_new_tokens"], s["temperature"], s["top_k"], s["top_p"], s["min_p"], s["seed"]
        )
        _as_stops(s["stop"])
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt is kept)."""
        self.messages: list[dict[str, str]] = []
        self.state: GriffinState | None = None

    @property
    def turns(self) -> int:
        """Number of completed user/model exchanges."""
        return sum(1 for m in self.messages if m["role"] == "model")

    def turn_ids(self, user_text: str) -> list[int]:
        """The ids the next turn with `user_text` feeds (BOS first on the first turn)."""
        if not isinstance(user_text, str):
            raise InputError(f"user_text must be a str, got {type(user_text).__name__}")
        user = [{"role": "user", "content": user_text}]
        if self.state is None:
            system = [{"role": "system", "content": self.system}] if self.system else []
            return self.tokenizer.encode_chat(system + user)
        text = "<end_of_turn>\n" + self.tokenizer.apply_chat_template(user)
        return self.tokenizer.encode(text, add_bos=False)

    def send_stream(self, user_text: str) -> TextStream:
        """Send a user message; return the reply as a stream of text pieces.

        The conversation and state advance when the stream is exhausted; a stream
        abandoned early leaves the session as it was before this turn.
        """
        ids = self.turn_ids(user_text)
        s = dict(self.sampling)
        if s["seed"] is not None:
            s["seed"] += self.turns
        gen = _prepare(
            self.model,
            self.tokenizer,
            [ids],
            chat=False,
            state=self.state,
            return_state=True,
            progress=None,
            **s,
        )
        return TextStream(gen, on_done=lambda result: self._commit(user_text, result))

    def send(self, user_text: str) -> str:
        """Send a user message; return the model's reply text."""
        return "".join(self.send_stream(user_text))

    def _commit(self, user_text: str, result: GenerationResult) -> None:
        if not self.messages and self.system:
            self.messages.append({"role": "system", "content": self.system})
        self.messages.append({"role": "user", "content": user_text})
        self.messages.append({"role": "model", "content": result.text})
        self.state = result.state

    # -- persistence ---------------------------------------------------------------
    @staticmethod
    def _sidecar(path: str | os.PathLike[str]) -> str:
        return os.fspath(path) + ".json"

    def save_state(self, path: str | os.PathLike[str]) -> None:
        """Write the state (safetensors, `rgemma.state.save_state`) to `path` and the
        conversation to `path + ".json"`.

        Raises:
            InputError: no turn has been completed yet (there is no state).
        """
        from .io import atomic_path
        from .state import save_state

        if self.state is None:
            raise InputError("the chat has no state to save yet: send a message first")
        save_state(self.state.to("cpu"), path, self.model.config)
        meta = {
            "format": "rgemma-chat",
            "version": 1,
            "system": self.system,
            "messages": self.messages,
        }
        with atomic_path(self._sidecar(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, ensure_ascii=False, indent=1)

    def load_state(self, path: str | os.PathLike[str]) -> None:
        """Continue the conversation saved by `save_state` at `path`.

        Raises:
            CheckpointError: the state file or its `.json` sidecar is missing or not
                a chat state.
            InputError: the state was saved for another model config.
        """
        from .state import load_state

        state = load_state(path, self.model.config)
        sidecar = self._sidecar(path)
        try:
            with open(sidecar, encoding="utf-8") as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(
                f"chat state {os.fspath(path)!r} has no sidecar file "
                f"{sidecar!r} with the conversation"
            ) from None
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot read chat sidecar {sidecar!r}: {err}") from None
        if (
            not isinstance(meta, Mapping)
            or meta.get("format") != "rgemma-chat"
            or not isinstance(meta.get("messages"), list)
        ):
            raise CheckpointError(f"{sidecar!r} is not an rgemma chat sidecar")
        if state.batch_size != 1:
            raise CheckpointError(
                f"chat state {os.fspath(path)!r} has batch size {state.batch_size}, expected 1"
            )
        self.system = meta.get("system")
        self.messages = [dict(m) for m in meta["messages"]]
        self.state = state.to(_device(self.model), dtype=_dtype(self.model))
