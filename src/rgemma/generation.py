"""Text generation: chunked prefill, batched decoding, streaming, stateful chat.

The model's state is fixed in size, so a prompt of any length is prefilled in
chunks of bounded memory, and each decode step costs the same whatever the
sequence length. Batches of prompts of different lengths are left-padded with
segment_pos -1, which is exact: greedy results of a batch equal each prompt run
alone.

How to sample and stop is one `rgemma.sampling.SamplingParams`; the public functions
take it as `sampling=` and also accept its fields as keyword arguments (sugar:
`generate(..., max_new_tokens=40, temperature=0.8)`). The batch is run by the row
engine (`rgemma.engine.RowEngine`) that the server's scheduler also uses, so both
sample and stop the same way.

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
    compile_decode(model): a `torch.compile`d decode step (from `rgemma.engine`)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .engine import (
    DEFAULT_CHUNK_SIZE,
    Row,
    RowEngine,
    TokenLogprob,
    activation_dtype,
    compile_decode,
    model_device,
    prefill,
)
from .errors import CheckpointError, InputError
from .sampling import SamplingParams, make_generators
from .state import GriffinState

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ChatSession",
    "GenerationResult",
    "TextStream",
    "compile_decode",
    "find_tokenizer",
    "generate",
    "load",
    "prefill",
    "prompt_state",
    "stream",
]

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

        candidates = [BUNDLED_TOKENIZER_PATH]
    else:
        p = Path(path)
        candidates = [p / "tokenizer.model" if p.is_dir() else p.parent / "tokenizer.model"]
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError("no tokenizer found: looked for " + ", ".join(str(c) for c in candidates))


def check_vocab(model: torch.nn.Module, tokenizer: Any) -> None:
    """Raise `CheckpointError` unless every tokenizer id is a valid model id.

    A tokenizer larger than the model is an error. A smaller one gives a
    `UserWarning` naming both sizes: it is right for a vocabulary padded to a round
    size (the padding rows are never sampled: `generate` masks them), but it is
    also what the tokenizer of another model looks like, whose output is garbage.
    """
    import warnings

    model_vocab = model.config.vocab_size
    if tokenizer.vocab_size > model_vocab:
        raise CheckpointError(
            f"tokenizer {getattr(tokenizer, 'path', '')} has {tokenizer.vocab_size} pieces but "
            f"the model's vocab_size is {model_vocab}: the tokenizer's vocabulary must not "
            "be larger than the model's (is it the tokenizer of another model?)"
        )
    if tokenizer.vocab_size < model_vocab:
        warnings.warn(
            f"tokenizer {getattr(tokenizer, 'path', '')} has {tokenizer.vocab_size} pieces "
            f"but the model's vocab_size is {model_vocab}: fine for a padded vocabulary, "
            "garbage if the tokenizer belongs to another model",
            UserWarning,
            stacklevel=3,
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
# Results
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
        logprobs: with `SamplingParams.logprobs` set, one `TokenLogprob` per entry of
            `token_ids` (natural log, before temperature; `logprobs` alternatives
            each); else None.
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
    logprobs: list[TokenLogprob] | None = dataclasses.field(default=None, repr=False)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


# ----------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------
_BYTES_PROMPT = (
    "{where} is bytes, not text or token ids: decode it first "
    "(e.g. data.decode('utf-8', errors='replace'))"
)


def _as_prompt_list(prompts: Any) -> list[Prompt]:
    """A list of prompts (str or list of ids) from what the caller gave."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)):  # a sequence of ints, not token ids
        raise InputError(_BYTES_PROMPT.format(where="prompts"))
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
        if isinstance(p, (bytes, bytearray)):
            raise InputError(_BYTES_PROMPT.format(where=f"prompts[{i}]"))
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
                ids = tokenizer.encode_chat(messages, add_bos=not continuing)
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
# The generation loop: the row engine on a static batch
# ----------------------------------------------------------------------------------
class _Generation:
    """One batched generation; iterating yields (row, text piece) as rows progress,
    and `results` is set once iteration is over. `sync_every`: the engine's (1: text
    every step, for streams; None, as `generate` sets it: deferred reads on a GPU)."""

    sync_every: int | None = 1

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        prompt_ids: list[list[int]],
        *,
        sampling: SamplingParams,
        state: GriffinState | None,
        chunk_size: int,
        return_state: bool,
        progress: bool | None,
    ) -> None:
        self.model, self.tokenizer, self.prompt_ids = model, tokenizer, prompt_ids
        self.sampling, self.state = sampling, state
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

    def __iter__(self) -> Iterator[tuple[int, str]]:
        p, b = self.sampling, len(self.prompt_ids)
        t0 = time.perf_counter()
        if p.max_new_tokens == 0 and not self.return_state:  # nothing to compute
            self.results = [
                GenerationResult(
                    text="", token_ids=[], prompt_tokens=len(ids), finish_reason="length"
                )
                for ids in self.prompt_ids
            ]
            return
        engine = RowEngine(self.model, self.tokenizer, sync_every=self.sync_every)
        logits, state = engine.prefill_prompts(
            self.prompt_ids, self.state, chunk_size=self.chunk_size, progress=self.progress
        )
        gens = make_generators(p.seed, b, engine.device) if p.seed is not None else [None] * b
        rows = [
            Row(
                p,
                self.tokenizer,
                len(ids),
                generator=gens[r],
                prompt_ids=ids,
                tag=r,
                keep_state=self.return_state,
            )
            for r, ids in enumerate(self.prompt_ids)
        ]
        outs = engine.add(rows, logits, state)  # samples the first tokens (a host sync)
        t1 = time.perf_counter()
        while True:
            for out in outs:
                if out.text:
                    yield out.row.tag, out.text
            if not engine.rows:
                break
            outs = engine.step()
        t2 = time.perf_counter()
        self.results = [
            GenerationResult(
                text=row.text.text,
                token_ids=row.ids,
                prompt_tokens=row.prompt_tokens,
                finish_reason=row.finish_reason or "length",
                stop_token_id=row.stop_token_id,
                stop_string=row.stop_string,
                state=row.state,
                logprobs=row.logprobs if p.logprobs is not None else None,
                prefill_seconds=t1 - t0,
                decode_seconds=t2 - t1,
            )
            for row in rows
        ]


def _prepare(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Any,
    *,
    sampling: SamplingParams,
    chat: bool,
    state: GriffinState | None,
    chunk_size: int,
    return_state: bool,
    progress: bool | None,
) -> _Generation:
    """Check arguments, encode prompts and set up a `_Generation`."""
    if sampling.prompt_logprobs:
        raise InputError(
            "prompt_logprobs is not computed by generate/stream/ChatSession "
            "(the server reports it with echo); use rgemma.scoring for prompt likelihoods"
        )
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise InputError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
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
        sampling=sampling,
        state=state,
        chunk_size=chunk_size,
        return_state=return_state,
        progress=progress,
    )


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: str | Sequence[Prompt],
    *,
    sampling: SamplingParams | None = None,
    chat: bool = False,
    state: GriffinState | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_state: bool = False,
    progress: bool | None = None,
    **options: Any,
) -> list[GenerationResult]:
    """Generate continuations of a batch of prompts.

    Prompts are left-padded (segment_pos -1, pad id `tokenizer.pad_id`), prefilled
    together in chunks, then decoded one token per step for all rows with the
    fixed-size state; finished rows leave the batch. Greedy results equal each
    prompt run alone, token for token.

    Each row stops on EOS, on `<end_of_turn>` (when the tokenizer has it), when its
    text contains a stop string, or after `max_new_tokens` tokens; nothing after its
    stop is in its result. The batch runs on `rgemma.engine.RowEngine`, as the
    server's requests do.

    Args:
        model: a `Griffin`.
        tokenizer: a `rgemma.tokenizer.Tokenizer`.
        prompts: a str, a list of str, a list of token-id lists (used as they are: no
            BOS is added), or one flat list of ids. Text gets BOS first (an empty
            string generates from BOS alone), except when continuing from `state`.
        sampling: how to sample and stop (`rgemma.sampling.SamplingParams`: length
            limit, temperature, top-k/top-p/min-p, seed, stop strings, logprobs); None:
            its defaults (greedy, 256 new tokens). With a seed, row r draws from its
            own generator seeded `seed + r`, so its tokens do not depend on the other
            prompts of the batch (same as that prompt alone with `seed + r`, up to
            float rounding); without one, from torch's global RNG.
        chat: format each text prompt as one user turn of the Gemma chat template
            (`<start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n`).
        state: continue from this state (batch size 1, or one row per prompt), e.g.
            one saved after a long document (`prompt_state`); prompts are then the
            continuation, encoded without BOS, and must not be empty.
        chunk_size: prefill chunk length in tokens.
        return_state: put each row's state in its result (see `GenerationResult`).
        progress: prefill progress bar (see `prefill`).
        **options: `SamplingParams` fields, applied over `sampling` (sugar:
            `generate(model, tok, "Hi", max_new_tokens=20, temperature=0.8, seed=0)`).

    Returns:
        one `GenerationResult` per prompt, in order.

    Raises:
        InputError: empty prompt list, a prompt that is neither text nor ids, ids out
            of range, an unknown or invalid sampling option (the message names it),
            `prompt_logprobs` (not computed here), chunk_size < 1, a state of another
            config or batch size.
    """
    gen = _prepare(
        model,
        tokenizer,
        prompts,
        sampling=SamplingParams.make(sampling, **options),
        chat=chat,
        state=state,
        chunk_size=chunk_size,
        return_state=return_state,
        progress=progress,
    )
    gen.sync_every = None  # nothing streams: the engine may read ids every few steps
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
    *,
    sampling: SamplingParams | None = None,
    chat: bool = False,
    state: GriffinState | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_state: bool = False,
    progress: bool | None = None,
    **options: Any,
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
        sampling=SamplingParams.make(sampling, **options),
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
    device = model_device(model)
    if state is not None:
        state = state.to(device, dtype=activation_dtype(model))
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
        sampling: the `SamplingParams` of every reply; with a seed, turn k (from 0)
            uses `seed + k`.
        chunk_size: prefill chunk length in tokens.
        **options: `SamplingParams` fields over `sampling` (sugar, as for `generate`).

    Attributes:
        messages: the conversation so far, as `{"role", "content"}` dicts.
        state: the model state after the last reply (None before the first turn).
        sampling: the session's `SamplingParams`.

    Raises:
        InputError: a system prompt that is not a str, a tokenizer without the chat
            pieces, an unknown or invalid sampling option.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        system: str | None = None,
        *,
        sampling: SamplingParams | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        **options: Any,
    ) -> None:
        if system is not None:
            from .tokenizer import check_text

            check_text(system, "system")  # a str of valid Unicode
        if tokenizer.start_of_turn_id is None or tokenizer.end_of_turn_id is None:
            raise InputError(
                f"tokenizer {getattr(tokenizer, 'path', '')} has no "
                "<start_of_turn>/<end_of_turn> pieces: it cannot chat"
            )
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.sampling = SamplingParams.make(sampling, **options)
        self.chunk_size = chunk_size
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
        # Close the previous reply, then the user's turn (its text plain: no forged turns).
        close = [self.tokenizer.end_of_turn_id, *self.tokenizer.encode("\n", add_bos=False)]
        return close + self.tokenizer.encode_chat(user, add_bos=False)

    def send_stream(self, user_text: str) -> TextStream:
        """Send a user message; return the reply as a stream of text pieces.

        The conversation and state advance when the stream is exhausted; a stream
        abandoned early leaves the session as it was before this turn.
        """
        ids = self.turn_ids(user_text)
        sampling = self.sampling
        if sampling.seed is not None:
            sampling = sampling.replace(seed=sampling.seed + self.turns)
        gen = _prepare(
            self.model,
            self.tokenizer,
            [ids],
            sampling=sampling,
            chat=False,
            state=self.state,
            chunk_size=self.chunk_size,
            return_state=True,
            progress=None,
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
            CheckpointError: the state file or its `.json` sidecar is missing, not a
                chat state, or has a missing or invalid field (named: see
                `rgemma.state.load_state` and `_check_sidecar`).
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
        system, messages = self._check_sidecar(meta, sidecar)
        if state.batch_size != 1:
            raise CheckpointError(
                f"chat state {os.fspath(path)!r} has batch size {state.batch_size}, expected 1"
            )
        self.system = system
        self.messages = messages
        self.state = state.to(model_device(self.model), dtype=activation_dtype(self.model))

    @staticmethod
    def _check_sidecar(meta: Any, sidecar: str) -> tuple[str | None, list[dict[str, str]]]:
        """(system, messages) of a chat sidecar, every field checked as `save_state`
        writes it: `format` "rgemma-chat", `version` 1, `system` a str or null,
        `messages` an optional system message, then user / model messages in turn,
        ending with a model one, each `{"role", "content"}` with str content.

        Raises:
            CheckpointError: the first field that is missing or invalid, named
                (`messages[3].role`), as one line.
        """
        from .tokenizer import check_text

        def bad(what: str) -> CheckpointError:
            return CheckpointError(f"chat sidecar {sidecar!r}: {what}")

        if not isinstance(meta, Mapping) or meta.get("format") != "rgemma-chat":
            raise CheckpointError(f"{sidecar!r} is not an rgemma chat sidecar")
        if meta.get("version") != 1:
            raise bad(f"'version' is {meta.get('version')!r}; this rgemma reads version 1")
        system = meta.get("system")
        if system is not None and not isinstance(system, str):
            raise bad(f"'system' must be a string or null, got {type(system).__name__}")
        messages = meta.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad("'messages' must be a non-empty list of {'role', 'content'} objects")
        out: list[dict[str, str]] = []
        first = 1 if isinstance(messages[0], Mapping) and messages[0].get("role") == "system" else 0
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or set(m) != {"role", "content"}:
                raise bad(f"messages[{i}] must be an object with exactly 'role' and 'content'")
            want = "system" if i < first else ("user", "model")[(i - first) % 2]
            if m["role"] != want:
                raise bad(f"messages[{i}].role is {m['role']!r}, expected {want!r}")
            try:
                check_text(m["content"], f"messages[{i}].content")
            except InputError as err:
                raise bad(str(err)) from None
            out.append({"role": want, "content": m["content"]})
        if out[-1]["role"] != "model":
            raise bad("'messages' must end with the model's reply")
        return system, out
