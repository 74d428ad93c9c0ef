"""The row engine: runs the model on a batch of rows, samples them and stops them.

One engine serves `rgemma.generate` / `stream` / `ChatSession` (a static batch: every
row joins at once, the loop runs until the last one stops) and the server's
`Scheduler` (continuous batching: rows join after their prompt is prefilled and leave
when they stop, at any step). The scheduler decides which prompts to prefill and when
rows join or are cancelled; the engine runs (vLLM's split between `schedule()` and
`execute_model()` / `update_from_output()`). It owns:

- chunked prefill, from scratch or from a state (`prefill`, `RowEngine.prefill_prompts`
  for a static batch, `RowEngine.prefill_piece` for one prompt piece by piece, with
  prompt logprobs when asked);
- the decode step (`decode_step`: `model.decode_step`, compiled by `compile_decode`);
- sampling, row by row with each row's `SamplingParams` and its own generator;
- stop rules: EOS / `<end_of_turn>` ids (`stop_token_ids`), stop strings and
  UTF-8-safe text pieces (`RowText`), the length limit;
- per-token logprobs where a row asks for them;
- the logits processors of `SamplingParams` (logit bias, repetition / presence /
  frequency penalties, `min_tokens`, `ignore_eos`): the per-row token counts they
  read live on the model's device (`TokenCounts`), updated from the sampled ids
  there, so they add no host sync;
- rows joining and leaving the batch (the state's rows follow, `GriffinState.select`).

The decode loop makes one host sync per step (the sampled ids, `.tolist()`), plus
one per row and token whose `SamplingParams.logprobs` asks for logprobs, unless the
engine defers it (`sync_every` > 1; `generate` on a GPU): then the ids stay on the
device, are fed straight back, and are read once per block of `sync_every` steps,
where the stop rules are applied step by step, so the outputs do not change. The
rule: deferral applies only while every row stops on stop ids or its length alone
and draws from nothing shared (greedy or its own seeded generator), with no stop
strings, logprobs, kept state or logits processors; `stream`, `ChatSession` and the
server read every step (they release text as it comes).

Counterpart: the official `recurrentgemma/torch/sampler.py` is a static greedy batch
in which every row runs to the longest; vLLM's `EngineCore.step` is the model of the
split between scheduler and engine.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import CheckpointError, InputError
from .sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    mask_beyond_vocab,
    suppress_tokens,
)
from .state import GriffinState, concat_states

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "CompiledDecodeStep",
    "PromptPrefill",
    "Row",
    "RowEngine",
    "RowOutput",
    "RowText",
    "TokenCounts",
    "TokenLogprob",
    "activation_dtype",
    "check_finite_logits",
    "compile_decode",
    "decode_step",
    "model_device",
    "prefill",
    "stop_token_ids",
]

#: Tokens per prefill call: activations are bounded by chunk_size x batch x width.
DEFAULT_CHUNK_SIZE = 1024
#: Decode steps between reads of the sampled ids on an accelerator, where rows allow
#: it (`RowEngine(sync_every=None)`; see `RowEngine._deferrable`).
DEFAULT_SYNC_EVERY = 8
#: Prompts longer than this (tokens per row) get a progress bar when stderr is a TTY.
PROGRESS_MIN_TOKENS = 4096


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters (a `Griffin` lives on one device)."""
    return next(model.parameters()).device


def activation_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's activations and of its state's conv inputs, keys and
    values: that of its embedding table."""
    return model.embedder.input_embedding.dtype


# ----------------------------------------------------------------------------------
# The decode step, compiled or not
# ----------------------------------------------------------------------------------
def decode_step(
    model: torch.nn.Module, tokens: Tensor, state: GriffinState, donate: bool = False
) -> tuple[Tensor, GriffinState]:
    """One decode step of every row: tokens (b,) int64 -> (logits (b, vocab) float32,
    state). `donate`: the caller owns `state` and drops it, so its attention windows
    are written in place (`Griffin.forward`'s `donate`).

    `model.decode_step` where the model has one (a `Griffin`'s, a `CompiledDecodeStep`
    after `compile_decode`); any other module with Griffin's `forward` (a wrapper) goes
    through its forward. Every decode step of the engine goes through here.
    """
    step = getattr(model, "decode_step", None)
    if step is not None:
        return step(tokens, state, donate=True) if donate else step(tokens, state)
    logits, state = model(tokens[:, None], None, state, logits="last", validate=False)
    return logits[:, -1], state


class CompiledDecodeStep:
    """A model's decode step through `torch.compile`, falling back to eager (with one
    warning on stderr) if compiling fails, e.g. on a machine without a C++ compiler.

    Made by `compile_decode`, which sets it as the model's `decode_step` attribute;
    called like `Griffin.decode_step`: (tokens (b,) int64, state) -> (logits (b, vocab)
    float32, state).

    Attributes:
        eager: the model's own (uncompiled) `decode_step`, a bound method.
        failed: None, or why compiling failed ("ErrorType: first line"); from then on
            every call runs `eager`.
        calls: calls that ran the compiled step.
        compile_seconds: seconds spent in first calls at a new batch size or `donate`
            (those that compile), so that speed reports can leave compiling out.
    """

    def __init__(self, model: torch.nn.Module, mode: str | None = None) -> None:
        self.eager = model.decode_step  # the bound method of the class
        self.compiled = torch.compile(self.eager, mode=mode, dynamic=None)
        self.failed: str | None = None
        self.calls = 0
        self.compile_seconds = 0.0
        self._batch_sizes: set[tuple[int, bool]] = set()  # (batch size, donate) compiled
        self._measured: set[int] = set()  # batch sizes whose kernel choices are made

    def __call__(
        self, tokens: Tensor, state: GriffinState, donate: bool = False
    ) -> tuple[Tensor, GriffinState]:
        if self.failed is not None:
            return self.eager(tokens, state, donate)
        key = (tokens.shape[0], bool(donate))  # each compiles once (`donate` is a guard)
        first = key not in self._batch_sizes
        t0 = time.perf_counter()
        try:
            if tokens.shape[0] not in self._measured:  # one eager step (state kept)
                self.eager(tokens, state, False)  # measures the kernel choices that the
                self._measured.add(tokens.shape[0])  # graph then traces (ops.linear)
            out = self.compiled(tokens, state, donate)
        except Exception as err:  # any compiler failure means eager
            if self.calls:  # it compiled and ran before: a real error, not the compiler
                raise
            self.failed = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
            print(
                f"rgemma: torch.compile of the decode step failed ({self.failed}); "
                "decoding eagerly",
                file=sys.stderr,
            )
            return self.eager(tokens, state, donate)
        if first:
            self._batch_sizes.add(key)
            self.compile_seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def compile_decode(model: torch.nn.Module, mode: str | None = None) -> torch.nn.Module:
    """Make every later decode step of `model` a `torch.compile`d one (in place).

    Generation (`generate`, `stream`, `ChatSession`, the server) runs one
    `decode_step(model, ...)` per token; this sets `model.decode_step`, the one
    attribute it changes, to a `CompiledDecodeStep` of the model's own method (whose
    public attributes say whether it compiled and how long that took). Batch-1 decode
    of small models is dominated by per-operator overhead, which compiling removes.
    The first step compiles (tens of seconds on a CPU); a new batch size recompiles
    once, after which the batch dimension is dynamic. Prefill is not compiled (its
    lengths vary). Idempotent.

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
    if not isinstance(model.decode_step, CompiledDecodeStep):
        model.decode_step = CompiledDecodeStep(model, mode)
    return model


# ----------------------------------------------------------------------------------
# Prefill
# ----------------------------------------------------------------------------------
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
    except torch.cuda.OutOfMemoryError:
        raise InputError(prefill_memory_message(model, tokens.shape[0], t, chunk_size)) from None
    finally:
        if bar is not None:
            bar.close()
    return logits[:, -1], state


def check_finite_logits(logits: Tensor, dtype: torch.dtype) -> None:
    """Raise `CheckpointError` if `logits` hold a NaN or an infinity.

    `dtype` is the model's (`activation_dtype`), named in the message.

    Run once per generation, on the logits of the first sampled token (a host sync
    beside the one that reads the sampled ids): a model whose weights are finite
    but overflow in its dtype (float16, bfloat16) otherwise "generates" whatever
    argmax of NaN gives, usually an immediate stop and an empty reply.
    """
    if not bool(torch.isfinite(logits).all()):
        raise CheckpointError(
            "the model's logits at the first step are not finite (NaN/inf): the "
            f"checkpoint's weights or dtype ({str(dtype).removeprefix('torch.')}) are "
            "unusable; load it in float32 (--dtype float32) or check the weights"
        )


def prefill_memory_message(model: torch.nn.Module, batch: int, t: int, chunk_size: int) -> str:
    """The one-line error for a GPU out of memory during prefill: the prompt length
    and an estimate of what it needs (weights + state + one chunk's activations, which
    do not grow with the prompt) against the device's memory."""
    cfg = model.config
    gib = 2**30
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = model.state_nbytes(batch)
    chunk = min(chunk_size, t)
    act_bytes = model.embedder.input_embedding.element_size()
    # Widest activations of a chunk: the MLP's 2 x expanded width, attention logits of
    # the query chunk against window + chunk keys per head (float32), a few widths.
    act = batch * chunk * (2 * cfg.mlp_expanded_width + 4 * cfg.width) * act_bytes
    act += batch * cfg.num_heads * chunk * (cfg.attention_window_size + chunk) * 4
    device = model_device(model)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    return (
        f"GPU out of memory prefilling {batch} x {t:,} tokens (chunks of {chunk_size}): "
        f"estimated {(weights + state + act) / gib:.2f} GiB (weights {weights / gib:.2f}, "
        f"state {state / gib:.2f}, activations per chunk {act / gib:.2f}) of "
        f"{total / gib:.1f} GiB on {device}; lower chunk_size or the batch, or free the GPU"
    )


class PromptPrefill:
    """One prompt being prefilled piece by piece at batch 1 (`RowEngine.prefill_piece`).

    Args:
        ids: the prompt's token ids (at least one).
        start: tokens of `ids` already in `state` (a prefix-cache hit), else 0.
        state: the state after `ids[:start]` (batch 1), or None to start empty.
        prompt_logprobs: also compute the logprob of every prompt token after the
            first (then every piece computes all its logits).
        top_logprobs: alternatives per prompt token to report with `prompt_logprobs`.

    Attributes:
        pos: tokens prefilled so far; `done` once it reaches `len(ids)`.
        state: the state after `ids[:pos]`.
        logits: (1, v) float32 at the last prompt token, once `done`.
        prompt_logprobs: with `prompt_logprobs`, one `TokenLogprob` per prompt token
            prefilled so far, None for the first (nothing predicts it); else None.
    """

    def __init__(
        self,
        ids: Sequence[int],
        *,
        start: int = 0,
        state: GriffinState | None = None,
        prompt_logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> None:
        self.ids = list(ids)
        self.pos, self.state = start, state
        self.logits: Tensor | None = None
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if prompt_logprobs else None
        self.top_logprobs = top_logprobs

    @property
    def done(self) -> bool:
        return self.pos >= len(self.ids)


# ----------------------------------------------------------------------------------
# Per-row text: UTF-8-safe pieces and stop strings
# ----------------------------------------------------------------------------------
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

    def push(self, token_id: int, check: bool = True) -> tuple[str, bool]:
        """Add one id; return (text to release, whether a stop string completed).
        `check=False` (before `min_tokens`): stop strings are not looked for in this
        piece, which is released with whatever was held back."""
        piece = self.decoder.push(token_id)
        if not check:
            out, self.pending = self.pending + piece, ""
            if out:
                self.parts.append(out)
            return out, False
        return self._add(piece)

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
# Rows
# ----------------------------------------------------------------------------------
def stop_token_ids(tokenizer: Any) -> frozenset[int]:
    """The ids that end a row when sampled: EOS, and `<end_of_turn>` where the
    tokenizer has it. They are never part of a row's `ids` nor fed to the model."""
    ids = (tokenizer.eos_id, getattr(tokenizer, "end_of_turn_id", None))
    return frozenset(i for i in ids if i is not None and i >= 0)


@dataclasses.dataclass
class TokenLogprob:
    """A token's log-probability (natural log, before temperature, over the
    tokenizer's vocabulary) and the best `len(top)` alternatives at its position, as
    (token id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class Row:
    """One sequence of a batch: its sampling, its progress and how it ended.

    Args:
        params: how the row samples and stops (`max_new_tokens`, `stop`, `logprobs`).
        tokenizer: decodes the row's text (`RowText`).
        prompt_tokens: its prompt's length (BOS included, padding excluded).
        generator: the row's own `torch.Generator` (on the model's device), or None
            for torch's global RNG.
        prompt_ids: the ids this row's prompt feeds (what `repetition_penalty`
            counts besides the output; None: the output only).
        tag: anything the caller uses to recognise the row (`generate`: the prompt
            index; the server: the request and choice).
        keep_state: keep the row's state once it stops, after its prompt and all of
            `ids` (`state`); a row stopped by a stop string or the length limit stays
            in the batch one more step to feed its last token, without sampling.

    Attributes:
        ids: the sampled ids, a final stop token (EOS / `<end_of_turn>`) excluded.
        sampled: tokens sampled, a final stop token included.
        logprobs: with `params.logprobs` set, one `TokenLogprob` per entry of `ids`.
        finish_reason: None while running; "stop" (stop token or stop string) or
            "length".
        stop_token_id: the stop token that ended the row, else None.
        state: with `keep_state`, the row's state (batch 1) once it has stopped.
    """

    def __init__(
        self,
        params: SamplingParams,
        tokenizer: Any,
        prompt_tokens: int,
        *,
        generator: torch.Generator | None = None,
        prompt_ids: Sequence[int] | None = None,
        tag: Any = None,
        keep_state: bool = False,
    ) -> None:
        vocab = tokenizer.vocab_size
        bad = [i for i, _ in params.logit_bias if i >= vocab]
        if bad:
            raise InputError(f"logit_bias token id {bad[0]} is outside the vocabulary [0, {vocab})")
        self.params, self.prompt_tokens = params, prompt_tokens
        self.prompt_ids = prompt_ids
        self.generator, self.tag, self.keep_state = generator, tag, keep_state
        self.text = RowText(tokenizer, params.stop)
        self.ids: list[int] = []
        self.sampled = 0
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.stop_token_id: int | None = None
        self.state: GriffinState | None = None
        self._feed = False  # stopped, but its last id must still be fed (keep_state)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the row, else None."""
        return self.text.stop_string

    def __repr__(self) -> str:
        return (
            f"Row(tag={self.tag!r}, sampled={self.sampled}, finish_reason={self.finish_reason!r})"
        )


class RowOutput:
    """What one row did in one engine call.

    Attributes:
        row: the `Row`.
        token_id: the id sampled, or None (the row stopped without sampling:
            `max_new_tokens=0`).
        text: the text this releases (often ""; see `RowText`).
        logprob: the sampled id's `TokenLogprob`, when the row asks for logprobs and
            the id is not a stop token.
        stop_token: the sampled id is EOS / `<end_of_turn>` (then `text` is only text
            released by the end of the row).
    """

    __slots__ = ("logprob", "row", "stop_token", "text", "token_id")

    def __init__(
        self,
        row: Row,
        token_id: int | None,
        text: str,
        logprob: TokenLogprob | None = None,
        stop_token: bool = False,
    ) -> None:
        self.row, self.token_id, self.text = row, token_id, text
        self.logprob, self.stop_token = logprob, stop_token

    @property
    def finished(self) -> bool:
        """The row stopped with this output."""
        return self.row.finish_reason is not None


# ----------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------
class RowEngine:
    """A running batch of rows over one model: prefill, decode, sample, stop, leave.

    Use: prefill prompts (`prefill_prompts` for a static batch, `prefill_piece` for
    one prompt piece by piece), `add` the rows with their last logits and state (each
    samples its first token and joins the batch unless it stopped), then `step` until
    `rows` is empty. Every call returns the `RowOutput`s of the rows it sampled;
    rows that stop leave the batch in the same call. `retain` drops rows (cancelled).

    Args:
        model: a `Griffin` (or a module with its `forward`), in eval mode.
        tokenizer: its `Tokenizer` (ids >= `tokenizer.vocab_size` are never sampled).
        batch_rows: state rows to hold for n real rows (>= n); the extra rows repeat
            the last real row and are never sampled (the server pads decode batches
            to a few shapes). Default: n.
        sync_every: read the sampled ids every this many decode steps where the rows
            allow it (see the module docstring; for a static batch: no row may join
            or be retained while ids are pending); 1 reads every step; None:
            `DEFAULT_SYNC_EVERY` on an accelerator, 1 on CPU (where reading is free).

    Attributes:
        rows: the rows in the batch, in state order.
        state: the batch's state (`batch_rows(len(rows))` rows), None when empty.
        stop_ids: `stop_token_ids(tokenizer)`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        batch_rows: Callable[[int], int] | None = None,
        sync_every: int | None = 1,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.device = model_device(model)
        if sync_every is None:  # reading ids costs a sync only on an accelerator
            sync_every = DEFAULT_SYNC_EVERY if self.device.type != "cpu" else 1
        self.sync_every = sync_every
        self._pending: list[Tensor] = []  # (n,) ids sampled, not yet read (deferred)
        self._block = 0  # steps in the current deferred block
        self.vocab = tokenizer.vocab_size  # model rows beyond it are never sampled
        self.stop_ids = stop_token_ids(tokenizer)
        self.batch_rows = batch_rows or (lambda n: n)
        self.rows: list[Row] = []
        self.state: GriffinState | None = None
        self._next: Tensor | None = None  # (len(rows),) int64: the ids fed next step
        self._owned = False  # `state` is the engine's alone: decode steps donate it
        # Token counts / biases of the rows, made when a row that needs them joins.
        self._counts: TokenCounts | None = None
        self._stop_t = torch.tensor(sorted(self.stop_ids), dtype=torch.long, device=self.device)

    # -- prefill ---------------------------------------------------------------------
    @torch.no_grad()
    def prefill_prompts(
        self,
        prompt_ids: Sequence[Sequence[int]],
        state: GriffinState | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: bool | None = None,
    ) -> tuple[Tensor, GriffinState]:
        """Prefill a static batch of prompts together, in chunks.

        Without a state, prompts are left-padded (segment_pos -1, pad id
        `tokenizer.pad_id`), which is exact. From a state, prompts of one length run
        as a batch; prompts of different lengths run one by one (left padding between
        a state and new tokens would not be exact) and their states are stacked.

        Args:
            prompt_ids: b prompts, each of at least one id.
            state: the state to continue (batch 1, repeated for every prompt, or b),
                any device and activation dtype; None starts empty.
            chunk_size, progress: see `prefill`.

        Returns:
            (logits (b, v) float32 at each prompt's last token, state of batch b).
        """
        model, device, b = self.model, self.device, len(prompt_ids)
        lengths = [len(p) for p in prompt_ids]
        if state is None:
            t = max(lengths)
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
                chunk_size=chunk_size,
                progress=progress,
            )
        state = state.to(device, dtype=activation_dtype(model))
        if state.batch_size == 1 and b > 1:
            state = state.select([0] * b)
        if len(set(lengths)) == 1:
            tokens = torch.tensor(prompt_ids, dtype=torch.long, device=device)
            return prefill(model, tokens, None, state, chunk_size=chunk_size, progress=progress)
        logits, states = [], []
        for r, ids in enumerate(prompt_ids):
            tokens = torch.tensor([ids], dtype=torch.long, device=device)
            lg, st = prefill(
                model, tokens, None, state.select([r]), chunk_size=chunk_size, progress=progress
            )
            logits.append(lg)
            states.append(st)
        return torch.cat(logits), concat_states(states)

    @torch.no_grad()
    def prefill_piece(self, job: PromptPrefill, end: int) -> None:
        """Run `job.ids[job.pos:end]` (one model call, batch 1) and advance `job`.

        The last piece keeps the logits at the last prompt token (`job.logits`); with
        `job.prompt_logprobs`, every piece computes all its logits and appends one
        `TokenLogprob` per prompt token it predicts.
        """
        tokens = torch.tensor([job.ids[job.pos : end]], dtype=torch.long, device=self.device)
        last = end == len(job.ids)
        mode = "all" if job.prompt_logprobs is not None else ("last" if last else "none")
        logits, job.state = self.model(tokens, None, job.state, logits=mode)
        if job.prompt_logprobs is not None:  # logits at i predict ids[i + 1]
            lp = torch.log_softmax(self._mask(logits[0]), dim=-1)  # (t, v)
            for t in range(end - job.pos):
                i = job.pos + t
                if i + 1 < len(job.ids):
                    job.prompt_logprobs.append(
                        _logprob_entry(lp[t], job.ids[i + 1], job.top_logprobs)
                    )
        if last:
            job.logits = logits[:, -1]  # (1, v)
        job.pos = end

    # -- rows join, decode, leave ------------------------------------------------------
    @torch.no_grad()
    def add(self, rows: Sequence[Row], logits: Tensor, state: GriffinState) -> list[RowOutput]:
        """Rows whose prompts are prefilled: sample each one's first token and let
        those that did not stop join the batch.

        Args:
            rows: new rows (not yet in the batch).
            logits: (len(rows), v) float32 at each row's last prompt token, or (1, v)
                shared by every row (n choices of one prompt).
            state: the state after each row's prompt: len(rows) rows, or one row
                shared by every row.

        Returns:
            one `RowOutput` per row (rows with `max_new_tokens=0` stop without
            sampling).

        Raises:
            CheckpointError: the logits of a row about to sample are NaN or infinite
                (finite weights that overflow in the model's dtype, e.g. float16);
                checked once here, not at every decode step.
        """
        rows = list(rows)
        if not rows:
            return []
        shared = state.batch_size == 1
        if any(row.params.max_new_tokens > 0 for row in rows):
            check_finite_logits(logits, activation_dtype(self.model))

        def src(i: int) -> int:  # row i's row in `state`
            return 0 if shared else i

        if logits.shape[0] == 1 and len(rows) > 1:
            logits = logits.expand(len(rows), -1)  # (n, v)
        live = [i for i, row in enumerate(rows) if row.params.max_new_tokens > 0]
        outs: list[RowOutput] = []
        for i, row in enumerate(rows):
            if i not in live:
                row.finish_reason = "length"
                outs.append(RowOutput(row, None, row.text.finish()))
        picked, counts = None, None
        if live:
            sub = logits if len(live) == len(rows) else logits[live]
            live_rows = [rows[i] for i in live]
            if any(row.params.adjusts_logits for row in live_rows):
                counts = TokenCounts.start(live_rows, logits.shape[-1], logits.device)
            live_outs, picked = self._accept(live_rows, sub, self._adjust(sub, live_rows, counts))
            if counts is not None:
                counts.update(picked)
            outs += live_outs
        join = []
        for i, row in enumerate(rows):
            if not row.finished or row._feed:
                join.append(i)  # sampled, so in `live`
            elif row.keep_state:
                row.state = state.select([src(i)])
        if join:
            at = {i: j for j, i in enumerate(live)}
            tokens = _take(picked, [at[i] for i in join])
            if counts is not None:
                counts = counts.select([at[i] for i in join])
            self._join([rows[i] for i in join], state, [src(i) for i in join], tokens, counts)
        return outs

    @torch.no_grad()
    def step(self) -> list[RowOutput]:
        """One decode step of every row in the batch: feed each row's last id, sample
        the next, apply the stop rules; rows that stop leave the batch.

        Returns:
            one `RowOutput` per row sampled (rows only feeding their last id for
            `keep_state` are not sampled).
        """
        rows = self.rows
        if not rows:
            return []
        n, size = len(rows), self.state.batch_size
        tokens = self._next  # (n,) on the device: no host-to-device copy per step
        if size > n:  # pad rows: any id, never sampled
            tokens = torch.cat([tokens, tokens.new_zeros(size - n)])
        live = [i for i, row in enumerate(rows) if not row.finished]
        if live:
            logits, self.state = decode_step(self.model, tokens, self.state, self._owned)
        else:  # only rows feeding their last id: no logits needed
            _, self.state = self.model(
                tokens[:, None], None, self.state, logits="none", validate=False
            )
        self._owned = True  # a decode step's state is new or was donated
        for i, row in enumerate(rows):
            if row._feed:  # its state now holds all of its ids
                row._feed, row.state = False, self.state.select([i])
        outs: list[RowOutput] = []
        picked = None
        if live:
            logits = logits[: len(live)] if live[-1] == len(live) - 1 else logits[live]
            if self.sync_every > 1 and len(live) == n and self._deferrable():
                return self._defer(logits)
            live_rows = [rows[i] for i in live]
            counts = self._counts
            if counts is not None and len(live) < n:
                counts = counts.select(live)
            outs, picked = self._accept(live_rows, logits, self._adjust(logits, live_rows, counts))
            if self._counts is not None:
                self._counts.update(picked, None if len(live) == n else live)
            for i in live:
                row = rows[i]
                if row.finished and row.keep_state and not row._feed:
                    row.state = self.state.select([i])
        keep = [i for i, row in enumerate(rows) if not row.finished or row._feed]
        if len(keep) == n:  # no row left (so none was only feeding): all were sampled
            self._next = picked
        else:  # rows kept were all sampled: their next ids are in `picked`
            at = {i: j for j, i in enumerate(live)}
            self._select(keep, _take(picked, [at[i] for i in keep]) if keep else None)
        return outs

    def retain(self, keep: Sequence[int]) -> None:
        """Keep only the rows at positions `keep` (in that order); the others leave
        the batch, e.g. those of a cancelled request."""
        self._select(list(keep))

    def clear(self) -> None:
        """Drop every row."""
        self.rows, self.state, self._next, self._counts = [], None, None, None

    # -- decode without a host sync per step ---------------------------------------------
    def _deferrable(self) -> bool:
        """Whether the ids of this step may be read later (`sync_every` > 1) without
        changing any row's output: every row stops only on stop ids or its length
        (no stop strings), reports no logprobs, keeps no state, samples greedily or
        from its own generator (a row that stopped may draw on: it changes no other
        row's draws), and has no logits processor that reads the host."""
        for row in self.rows:
            p = row.params
            if p.stop or p.logprobs is not None or row.keep_state or row._feed:
                return False
            if p.sampler_key != ("greedy",) and row.generator is None:
                return False
            if getattr(p, "adjusts_logits", False) or getattr(p, "ignore_eos", False):
                return False
            if getattr(p, "min_tokens", 0):
                return False
        return True

    def _defer(self, logits: Tensor) -> list[RowOutput]:
        """Sample every row on the device and feed the ids straight back; read them
        (one host sync) only at the end of a block of `sync_every` steps, cut short so
        that no row passes its length limit, then apply the stop rules step by step
        as `_accept` would have: ids after a row's stop id are dropped, and the rows
        that stopped leave the batch. Returns the block's outputs at its end, else []."""
        rows = self.rows
        if not self._pending:
            left = min(row.params.max_new_tokens - len(row.ids) for row in rows)
            self._block = max(1, min(self.sync_every, left))
        picked = self._pick(logits, rows)  # (n,) on the device
        self._pending.append(picked)
        self._next = picked
        if len(self._pending) < self._block:
            return []
        ids = torch.stack(self._pending, dim=1).tolist()  # (n, block): the one sync
        self._pending = []
        outs: list[RowOutput] = []
        for k in range(len(ids[0])):
            active = [i for i, row in enumerate(rows) if not row.finished]
            if not active:
                break
            step_outs, _ = self._accept(
                [rows[i] for i in active], None, ids=[ids[i][k] for i in active]
            )
            outs += step_outs
        keep = [i for i, row in enumerate(rows) if not row.finished]
        if len(keep) < len(rows):
            self._select(keep)
        return outs

    # -- internals ---------------------------------------------------------------------
    def _select(self, keep: list[int], tokens: Tensor | None = None) -> None:
        """Keep the rows at `keep`; `tokens`: the ids they feed next (default: theirs
        now). Pad rows repeat the last row kept."""
        self.rows = [self.rows[i] for i in keep]
        if self._counts is not None:
            self._counts = self._counts.select(keep) if keep else None
        if not keep:
            self.state = self._next = None
            return
        pad = self.batch_rows(len(keep)) - len(keep)
        idx = torch.as_tensor(keep + [keep[-1]] * pad, dtype=torch.long, device=self.device)
        self.state = self.state.select(idx)
        self._next = tokens if tokens is not None else self._next.index_select(0, idx[: len(keep)])

    def _join(
        self,
        rows: list[Row],
        state: GriffinState,
        src: list[int],
        tokens: Tensor,
        counts: TokenCounts | None = None,
    ) -> None:
        """Append `rows` to the batch; `src[i]` is row i's row in `state`, `tokens`
        (len(rows),) the ids they feed next, `counts` their `TokenCounts` (None: they
        need none). The new state is the old rows, then the new, then pad rows (the
        last row repeated), made with one copy per tensor."""
        n = len(self.rows)
        if counts is not None or self._counts is not None:
            width = (counts or self._counts).counts.shape[1]
            old = self._counts or TokenCounts.zeros(n, width, self.device)
            self._counts = old.cat(counts or TokenCounts.zeros(len(rows), width, self.device))
        size = self.batch_rows(n + len(rows))
        src = src + [src[-1]] * (size - n - len(rows))
        self.rows += rows
        self._next = tokens if n == 0 else torch.cat([self._next, tokens])
        if n == 0 and src == list(range(state.batch_size)):
            self.state = state  # the whole prefilled batch, as it is
            self._owned = False  # the caller may hold it too (e.g. a prefix cache)
            return
        if state.batch_size > 1:
            new = state.select(src)  # a copy
            self.state = concat_states([self.state.head(n), new]) if n else new
        else:  # views of the one row, copied once
            new = state.expand(len(src))
            self.state = concat_states([self.state.head(n), new] if n else [new])

    def _mask(self, logits: Tensor) -> Tensor:
        return mask_beyond_vocab(logits, self.vocab)

    def _sample(self, logits: Tensor, rows: list[Row]) -> tuple[list[int], Tensor]:
        """One id per row, each with its row's parameters and generator: (b, v) ->
        (b ints, the same (b,) int64 on the device). `.tolist()` is the one host sync
        of a decode step."""
        picked = self._pick(logits, rows)
        return picked.tolist(), picked

    def _pick(self, logits: Tensor, rows: list[Row]) -> Tensor:
        """`_sample` without reading the ids: (b, v) -> (b,) int64 on the device."""
        logits = self._mask(logits)
        groups: dict[tuple, list[int]] = {}  # rows that sample alike
        for i, row in enumerate(rows):
            groups.setdefault(row.params.sampler_key, []).append(i)
        if len(groups) == 1 and ("greedy",) in groups:
            return torch.argmax(logits, dim=-1)
        out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        for key, idx in groups.items():
            whole = len(idx) == len(rows)
            sub = logits if whole else logits[idx]
            if key == ("greedy",):
                picked = torch.argmax(sub, dim=-1)
            else:
                gens = [rows[i].generator for i in idx]
                gens = None if all(g is None for g in gens) else gens
                picked = rows[idx[0]].params.sample_rows(sub, generator=gens)
            if whole:
                return picked
            out[torch.tensor(idx, device=logits.device)] = picked
        return out

    def _adjust(self, logits: Tensor, rows: list[Row], counts: TokenCounts | None) -> Tensor:
        """The logits `rows` sample from: their bias and penalties applied (`counts`,
        aligned with `rows`), stop ids suppressed for rows with `ignore_eos` or short
        of `min_tokens`. Returns `logits` itself when no row asks for any of it."""
        if counts is not None:
            logits = counts.apply(logits, rows)
        quiet = [row.params.ignore_eos or row.sampled < row.params.min_tokens for row in rows]
        if any(quiet) and self._stop_t.numel():
            mask = None if all(quiet) else torch.tensor(quiet, device=logits.device)
            logits = suppress_tokens(logits, self._stop_t, mask)
        return logits

    def _accept(
        self,
        rows: list[Row],
        logits: Tensor | None,
        sample_from: Tensor | None = None,
        ids: list[int] | None = None,
    ) -> tuple[list[RowOutput], Tensor | None]:
        """Sample one id per row and apply the stop rules (the same for every caller).
        `logits` are the model's (logprobs report them); `sample_from`, if given, the
        processed ones the ids are drawn from (`_adjust`). Returns the rows' outputs
        and their sampled ids, (len(rows),) on the device."""
        if ids is not None:  # sampled before (`_defer`): only the stop rules
            toks, picked = ids, None
        else:
            toks, picked = self._sample(logits if sample_from is None else sample_from, rows)
        outs = []
        for i, (row, tok) in enumerate(zip(rows, toks)):
            row.sampled += 1
            if tok in self.stop_ids:
                row.finish_reason, row.stop_token_id = "stop", tok
                outs.append(RowOutput(row, tok, row.text.finish(), stop_token=True))
                continue
            row.ids.append(tok)
            piece, hit = row.text.push(tok, check=len(row.ids) >= row.params.min_tokens)
            if hit:
                row.finish_reason = "stop"
            elif len(row.ids) >= row.params.max_new_tokens:
                row.finish_reason = "length"
                piece += row.text.finish()
            lp = None
            if row.params.logprobs is not None:
                lp = _logprob_entry(
                    torch.log_softmax(self._mask(logits[i]), dim=-1), tok, row.params.logprobs
                )
                row.logprobs.append(lp)
            if row.finished and row.keep_state:
                row._feed = True  # the state lacks its last id: feed it next step
            outs.append(RowOutput(row, tok, piece, lp))
        return outs, picked


class TokenCounts:
    """What the logits processors of some rows read, on the model's device, one row
    per engine row (the engine keeps them aligned as rows join and leave).

    Attributes:
        counts: (n, v) float32, times each id was sampled by the row (its output;
            `presence_penalty` / `frequency_penalty`).
        seen: (n, v) bool, ids in the row's prompt (`Row.prompt_ids`) or output
            (`repetition_penalty`).
        bias: (n, v) float32 dense `logit_bias`, or None when no row has one.
    """

    def __init__(self, counts: Tensor, seen: Tensor, bias: Tensor | None) -> None:
        self.counts, self.seen, self.bias = counts, seen, bias

    @classmethod
    def zeros(cls, n: int, width: int, device: torch.device) -> TokenCounts:
        counts = torch.zeros(n, width, dtype=torch.float32, device=device)
        return cls(counts, torch.zeros(n, width, dtype=torch.bool, device=device), None)

    @classmethod
    def start(cls, rows: Sequence[Row], width: int, device: torch.device) -> TokenCounts:
        """Counts of rows about to sample their first token: their prompts seen (when
        they have a repetition penalty), their biases set; one copy to the device."""
        out = cls.zeros(len(rows), width, device)
        for i, row in enumerate(rows):
            p = row.params
            if p.repetition_penalty != 1.0 and row.prompt_ids:
                ids = torch.tensor(sorted(set(row.prompt_ids)), dtype=torch.long)
                out.seen[i, ids[ids < width].to(device)] = True
            if p.logit_bias:
                if out.bias is None:
                    out.bias = torch.zeros_like(out.counts)
                ids, vals = zip(*p.logit_bias)
                out.bias[i, torch.tensor(ids, device=device)] = torch.tensor(vals, device=device)
        return out

    def select(self, idx: Sequence[int]) -> TokenCounts:
        """The rows at `idx` (a copy)."""
        i = torch.as_tensor(list(idx), dtype=torch.long, device=self.counts.device)
        bias = self.bias.index_select(0, i) if self.bias is not None else None
        return TokenCounts(self.counts.index_select(0, i), self.seen.index_select(0, i), bias)

    def cat(self, other: TokenCounts) -> TokenCounts:
        """These rows, then `other`'s."""
        bias = None
        if self.bias is not None or other.bias is not None:
            bias = torch.cat(
                [
                    b if b is not None else torch.zeros_like(c.counts)
                    for b, c in ((self.bias, self), (other.bias, other))
                ]
            )
        return TokenCounts(
            torch.cat([self.counts, other.counts]), torch.cat([self.seen, other.seen]), bias
        )

    def apply(self, logits: Tensor, rows: Sequence[Row]) -> Tensor:
        """`logits` (n, v) of `rows` (aligned with these counts) with each row's bias,
        repetition, presence and frequency penalties applied, in that order (vLLM's)."""
        if self.bias is not None:
            logits = apply_logit_bias(logits, self.bias)
        params = [row.params for row in rows]
        dev = logits.device

        def column(values: list[float]) -> Tensor:  # (n, 1) float32
            return torch.tensor(values, dtype=torch.float32, device=dev)[:, None]

        rep = [p.repetition_penalty for p in params]
        if any(r != 1.0 for r in rep):
            logits = apply_repetition_penalty(logits, self.seen, column(rep))
        pres = [p.presence_penalty for p in params]
        freq = [p.frequency_penalty for p in params]
        if any(pres) or any(freq):
            logits = apply_presence_frequency_penalty(
                logits, self.counts, column(pres), column(freq)
            )
        return logits

    def update(self, picked: Tensor, rows: Sequence[int] | None = None) -> None:
        """Count the ids just sampled, in place on the device (no host sync):
        `picked` (k,) int64 of rows `rows` (None: rows 0..k-1)."""
        k = picked.shape[0]
        dev = self.counts.device
        r = torch.arange(k, device=dev) if rows is None else torch.as_tensor(rows, device=dev)
        self.counts.index_put_((r, picked), torch.ones(k, device=dev), accumulate=True)
        self.seen[r, picked] = True


def _take(t: Tensor, idx: list[int]) -> Tensor:
    """Rows `idx` of `t`: a view when they are its first rows in order, else a copy."""
    if idx == list(range(len(idx))):
        return t[: len(idx)]
    return t.index_select(0, torch.as_tensor(idx, dtype=torch.long, device=t.device))


def _logprob_entry(lp: Tensor, token_id: int, k: int) -> TokenLogprob:
    """`lp`: (v,) log-softmax of one position."""
    top: list[tuple[int, float]] = []
    if k > 0:
        vals, ids = torch.topk(lp, k)
        top = list(zip(ids.tolist(), vals.tolist()))
    return TokenLogprob(token_id, float(lp[token_id]), top)
