"""Continuous batching: one thread owns the model and advances every request.

Each active sequence is one row of a running batch: its own state row, its own
sampling parameters and random generator, its own stop conditions. Every step:

1. drop the rows and prefills of cancelled requests (a client went away);
2. admit queued requests while the batch has free rows (FIFO);
3. prefill: run prompt chunks (batch 1, at most `prefill_chunk` tokens each),
   about `prefill_budget` tokens per step, so a long prompt delays the running
   rows by one chunk per step, not by its whole length. A prompt whose prefix
   state is in the `PrefixCache` starts from it. When a prompt is done, its first
   token is sampled and its state (repeated for `n` choices) joins the batch;
4. decode: one model call on the last token of every row, tokens (b, 1); sample
   each row; send its text piece to its request; rows that stopped leave the
   batch at once (`GriffinState.select`).

Bounded memory: on CPU every distinct input shape makes oneDNN build (and keep,
in its primitive caches) JIT kernels, about 0.6 MB per operation and shape, some
5 MB per model call shape for a small Griffin; and glibc keeps freed memory. With
`shape_buckets` (the default) the model only ever sees a small fixed set of shapes:
prefill pieces of lengths 2^k or 3 * 2^k (a chunk of 100 tokens runs as 96 + 4; 16
lengths up to 256) and decode batches padded to a power of two (capped at `max_batch_size`; the pad
rows repeat a real row and are never sampled), so those caches stop growing once
each shape has been seen, whatever the prompt lengths and the batch size. When the
scheduler has been idle for `idle_trim_s`, it hands freed heap memory back to the
system (`malloc_trim`, glibc only).

Exactness: a row's tokens do not depend on the other rows (the model's rows are
independent, sampling is per row with per-row generators), so a greedy request
gives the tokens of `rgemma.generate` on the same prompt alone; seeded sampling
gives those of `generate(..., seed=seed)` with choice i seeded `seed + i`.

Requests talk to the HTTP layer through a callback `on_event(Event)`, called on
the scheduler thread (the app hands it to its event loop thread-safely).

Counterpart: none in the official code (its sampler is a static batch);
vLLM / TGI do continuous batching over paged KV caches, which Griffin's
fixed-size state makes unnecessary.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import logging
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..generation import (
    RowText,  # the stop-string / UTF-8-safe text tracker of `generate`
    decode_step,
)
from ..sampling import mask_beyond_vocab, sample, validate_sampling
from ..state import GriffinState
from .metrics import Metrics
from .prefix_cache import PrefixCache

__all__ = ["Event", "GenerationRequest", "QueueFull", "SamplingParams", "Scheduler", "TokenLogprob"]

log = logging.getLogger("rgemma.serve")

_request_ids = itertools.count(1)


def _load_malloc_trim() -> Callable[[], None] | None:
    """glibc's `malloc_trim(0)` (free heap pages back to the system), or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim  # absent from musl and other libcs
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: fn(0)


_malloc_trim = _load_malloc_trim()


def release_memory() -> bool:
    """Return freed heap memory to the system (glibc `malloc_trim`); False where
    unsupported."""
    if _malloc_trim is None:
        return False
    _malloc_trim()
    return True


def _piece(n: int) -> int:
    """The longest prefill piece of at most n tokens: 2^k or 3 * 2^k (1, 2, 3, 4, 6, 8,
    12, 16, 24, ...: 16 lengths up to 256; a chunk takes 2.4 calls on average)."""
    p = 1 << (n.bit_length() - 1)
    return p + p // 2 if p >= 2 and n >= p + p // 2 else p


def _join_rows(old: GriffinState | None, n: int, new: GriffinState, size: int) -> GriffinState:
    """Rows [:n] of `old`, then the one row of `new` repeated up to `size` rows (the
    new choices, then pad rows): one copy per tensor."""

    def cat(a: Tensor | None, b: Tensor) -> Tensor:
        rep = b.expand(size - n, *b.shape[1:])
        return rep.contiguous() if a is None or n == 0 else torch.cat([a[:n], rep])

    if old is None:
        return GriffinState(
            blocks=tuple(type(s)(*(cat(None, t) for t in s)) for s in new.blocks),
            next_pos=cat(None, new.next_pos),
        )
    return GriffinState(
        blocks=tuple(
            type(sn)(*(cat(a, b) for a, b in zip(so, sn))) for so, sn in zip(old.blocks, new.blocks)
        ),
        next_pos=cat(old.next_pos, new.next_pos),
    )


class QueueFull(RuntimeError):
    """The scheduler's queue holds `max_queue` requests: try again later."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples and stops.

    Attributes:
        max_tokens: most tokens per choice (>= 0; 0 only prefills).
        temperature, top_k, top_p, min_p: see `rgemma.sampling.sample`; 0 = greedy.
        seed: choice i draws from a generator seeded `seed + i` (None: random).
        stop: stop strings; the text is cut before the first one found.
        logprobs: number of alternatives per sampled token to report (None: no
            logprobs at all; 0: only the sampled token's).
        prompt_logprobs: report the logprob of every prompt token (for `echo`);
            such prompts bypass the prefix cache.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: bool = False

    def __post_init__(self) -> None:
        validate_sampling(self.temperature, self.top_k, self.top_p, self.min_p)
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclasses.dataclass
class TokenLogprob:
    """A token's log-probability (natural log, before temperature) and the best
    alternatives at its position, as (token id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class Event:
    """What the scheduler tells a request.

    kind:
        "token": one sampled token of choice `index`: `text` is the text it releases
            (may be "", text is held back inside a UTF-8 character or a possible stop
            string), `token_id`, `logprob` (when asked).
        "prompt": `prompt_logprobs` of prompt number `index` (one entry per prompt
            token, the first None).
        "done": choice `index` finished: `finish_reason` "stop" | "length",
            `completion_tokens` (sampled tokens, a final EOS / end-of-turn included),
            `prompt_tokens` of its prompt.
        "error": the request failed (`message`); no more events follow.
    """

    kind: str
    index: int = 0
    text: str = ""
    token_id: int | None = None
    logprob: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    message: str = ""


class GenerationRequest:
    """One request: prompts (token ids), `n` choices per prompt, sampling params.

    Choice index of prompt j, sample i: `j * n + i`. `prefix_hints[j]` lists token
    counts where prompt j's shared prefix ends (e.g. after a chat system prompt),
    used as prefix-cache boundaries.
    """

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        n: int = 1,
        on_event: Callable[[Event], None] | None = None,
        prefix_hints: Sequence[Sequence[int]] | None = None,
    ) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("a request needs at least one prompt, each of at least one token")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.id = next(_request_ids)
        self.prompts = [list(p) for p in prompts]
        self.params, self.n = params, n
        self.on_event = on_event or (lambda event: None)
        self.prefix_hints = [tuple(h) for h in (prefix_hints or [()] * len(prompts))]
        self.arrival = time.perf_counter()
        self.cancelled = False
        self.finished = False
        self.first_token_at: float | None = None
        self.rows_left = n * len(prompts)
        self.cached_tokens = 0  # prompt tokens taken from the prefix cache
        self._planned = False  # scheduler bookkeeping
        self._unstarted = 0  # prompts admitted but not yet in the batch

    @property
    def num_rows(self) -> int:
        return self.n * len(self.prompts)

    def __repr__(self) -> str:
        return (
            f"GenerationRequest(id={self.id}, prompts={len(self.prompts)}, n={self.n}, "
            f"max_tokens={self.params.max_tokens})"
        )


class _Prefill:
    """One prompt being prefilled, chunk by chunk, batch 1."""

    def __init__(
        self,
        req: GenerationRequest,
        index: int,
        splits: list[int],
        start: int,
        state: GriffinState | None,
        store: dict[int, Any],
    ) -> None:
        self.req, self.index = req, index
        self.ids = req.prompts[index]
        self.splits = [s for s in splits if s > start]  # chunk end positions, last = len
        self.pos, self.state, self.store = start, state, store
        self.logits: Tensor | None = None  # (1, v) at the last prompt position
        self.prompt_lps: list[TokenLogprob | None] | None = (
            [None] if req.params.prompt_logprobs else None
        )

    @property
    def done(self) -> bool:
        return self.pos >= len(self.ids)


class _Row:
    """One sequence in the running batch."""

    __slots__ = (
        "gen",
        "ids",
        "index",
        "last",
        "last_time",
        "prompt_tokens",
        "req",
        "sampled",
        "text",
    )

    def __init__(
        self,
        req: GenerationRequest,
        index: int,
        tokenizer: Any,
        gen: torch.Generator | None,
        prompt_tokens: int,
    ) -> None:
        self.req, self.index = req, index
        self.text = RowText(tokenizer, req.params.stop)
        self.ids: list[int] = []
        self.gen = gen
        self.last = -1  # last sampled token: the next one fed
        self.sampled = 0  # tokens sampled, stop tokens included
        self.last_time: float | None = None
        self.prompt_tokens = prompt_tokens


class Scheduler:
    """Runs the model for every request on one thread, with continuous batching.

    Args:
        model: a `Griffin` (eval mode) on its device.
        tokenizer: its `Tokenizer`.
        max_batch_size: most rows decoded together (a request takes n x prompts rows).
        max_queue: most requests waiting for rows; `submit` raises `QueueFull` beyond.
        prefill_chunk: tokens per prefill model call.
        prefill_budget: prompt tokens prefilled per step (at least one chunk runs);
            default `prefill_chunk`. Smaller: smoother decoding for the running rows;
            larger: new requests start sooner.
        prefix_cache: a `PrefixCache`, or None for no cache.
        prefix_block: boundary spacing for prefix keys when there is no cache (the
            cache's `block_size` otherwise); chunks are split there either way.
        metrics: where to count tokens and latencies.
        shape_buckets: run the model on a small fixed set of shapes (prefill pieces of
            2^k or 3 * 2^k tokens, decode batches padded to a power of two) so that
            oneDNN's per-shape kernel caches stay bounded (see the module docstring).
            False: every prefill chunk and decode batch runs at its exact size.
        idle_trim_s: after this many idle seconds, hand freed heap memory back to
            the system (glibc `malloc_trim`); None: never.

    Use `start()` / `stop()` for the thread, or call `step()` yourself.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_batch_size: int = 16,
        max_queue: int = 64,
        prefill_chunk: int = 256,
        prefill_budget: int | None = None,
        prefix_cache: PrefixCache | None = None,
        prefix_block: int = 256,
        metrics: Metrics | None = None,
        shape_buckets: bool = True,
        idle_trim_s: float | None = 0.5,
    ) -> None:
        if max_batch_size < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_batch_size and prefill_chunk must be >= 1, max_queue >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget or prefill_chunk
        self.prefix_cache = prefix_cache
        self._keys = prefix_cache or PrefixCache(0, block_size=prefix_block)
        self.metrics = metrics or Metrics()
        self.shape_buckets = shape_buckets
        self.idle_trim_s = idle_trim_s
        self.trims = 0  # times freed memory was handed back
        p = next(model.parameters())
        self.device = p.device
        self.vocab = tokenizer.vocab_size  # model rows beyond it are never sampled
        self.stop_ids = {
            i for i in (tokenizer.eos_id, tokenizer.end_of_turn_id) if i is not None and i >= 0
        }

        self._cond = threading.Condition()
        self._queue: deque[GenerationRequest] = deque()  # guarded by _cond
        self._prefills: deque[_Prefill] = deque()
        self._admitted: list[GenerationRequest] = []  # being prefilled or decoded
        self._rows: list[_Row] = []
        # The running batch's state: the rows of `_rows` first, then pad rows (copies
        # of real rows, never sampled) up to `_bucket(len(_rows))`.
        self._state: GriffinState | None = None
        self._reserved = 0  # rows of admitted requests not yet in the batch
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._token_str: dict[int, str] = {}
        self.peak_rows = 0  # most rows decoded together so far

    # -- public --------------------------------------------------------------------
    @property
    def num_queued(self) -> int:
        return len(self._queue)

    @property
    def num_active(self) -> int:
        return len(self._admitted)

    @property
    def num_rows(self) -> int:
        return len(self._rows)

    @property
    def state_nbytes(self) -> int:
        state = self._state
        return state.nbytes() if state is not None else 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, req: GenerationRequest) -> None:
        """Queue a request.

        Raises:
            ValueError: it needs more rows than `max_batch_size`.
            QueueFull: `max_queue` requests are already waiting.
        """
        if req.num_rows > self.max_batch_size:
            raise ValueError(
                f"the request needs {req.num_rows} rows (n x prompts) but the "
                f"server's max batch size is {self.max_batch_size}"
            )
        with self._cond:
            if len(self._queue) >= self.max_queue and not self._can_admit_now(req):
                raise QueueFull(f"{len(self._queue)} requests are waiting (max {self.max_queue})")
            self._queue.append(req)
            self._cond.notify()

    def cancel(self, req: GenerationRequest) -> None:
        """Stop a request: its rows leave the batch at the next step (no more events)."""
        with self._cond:
            if req.finished or req.cancelled:
                return
            req.cancelled = True
            try:
                self._queue.remove(req)
                req.finished = True
                self.metrics.requests_finished.inc(1, "cancelled")
            except ValueError:
                pass  # admitted: the scheduler thread frees its rows
            self._cond.notify()

    def start(self) -> None:
        """Run the scheduler on a daemon thread."""
        if self.running:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="rgemma-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the thread; queued and active requests get an error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            pending = list(self._queue) + list(self._admitted)
            self._queue.clear()
        for req in pending:
            self._fail(req, "the server is shutting down")
        self._admitted, self._prefills, self._rows, self._state = [], deque(), [], None
        self._reserved = 0

    def has_work(self) -> bool:
        return bool(self._queue or self._prefills or self._rows or self._admitted)

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling step: cancellations, admissions, prefill, one decode step."""
        self._drop_cancelled()
        self._admit()
        self._prefill_some()
        if self._rows:
            try:
                self._decode()
            except Exception as err:  # a model failure: fail the batch, keep serving
                log.exception("decode step failed")
                for req in {id(r.req): r.req for r in self._rows}.values():
                    self._fail(req, f"decode failed: {err}")
                self._rows, self._state = [], None

    # -- the loop ------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        dirty = False  # steps ran since memory was last handed back
        while True:
            with self._cond:
                if dirty and self.idle_trim_s is not None and not self.has_work():
                    # idle: once idle_trim_s pass with nothing to do, trim (below)
                    if not self._stopping:
                        self._cond.wait(self.idle_trim_s)
                    trim = not self._stopping and not self.has_work()
                else:
                    trim = False
                if not trim:
                    while not self._stopping and not self.has_work():
                        self._cond.wait()
                    if self._stopping:
                        return
            if trim:
                dirty = False
                if release_memory():
                    self.trims += 1
                continue
            try:
                self.step()
            except Exception:  # never let the thread die
                log.exception("scheduler step failed")
                time.sleep(0.01)
            dirty = True

    def _can_admit_now(self, req: GenerationRequest) -> bool:
        return (
            not self._queue
            and len(self._rows) + self._reserved + req.num_rows <= self.max_batch_size
        )

    def _drop_cancelled(self) -> None:
        if any(row.req.cancelled for row in self._rows):
            self._remove_rows([i for i, row in enumerate(self._rows) if not row.req.cancelled])
        if any(p.req.cancelled for p in self._prefills):
            self._prefills = deque(p for p in self._prefills if not p.req.cancelled)
        for req in [r for r in self._admitted if r.cancelled]:
            self._retire(req, "cancelled")

    def _admit(self) -> None:
        with self._cond:
            while self._queue:
                req = self._queue[0]
                if len(self._rows) + self._reserved + req.num_rows > self.max_batch_size:
                    break
                self._queue.popleft()
                self._admitted.append(req)
                self._reserved += req.num_rows
                req._unstarted = len(req.prompts)
        for req in list(self._admitted):  # _fail removes from it
            if req._planned:
                continue
            req._planned = True
            try:
                for j in range(len(req.prompts)):
                    self._prefills.append(self._plan_prefill(req, j))
            except Exception as err:
                log.exception("planning a prefill failed")
                self._fail(req, f"prefill failed: {err}")

    def _plan_prefill(self, req: GenerationRequest, j: int) -> _Prefill:
        """Chunk ends and the prefix-cache start / stores of prompt j."""
        ids, hints = req.prompts[j], req.prefix_hints[j] if j < len(req.prefix_hints) else ()
        n = len(ids)
        self.metrics.prompt_tokens.inc(n)
        bounds = self._keys.boundaries(n, hints)
        splits = sorted(set(bounds) | set(range(self.prefill_chunk, n, self.prefill_chunk)) | {n})
        start, state, store = 0, None, {}
        cache = self.prefix_cache
        if cache is not None and bounds and not req.params.prompt_logprobs:
            keys = cache.keys(ids, bounds)
            hit = cache.lookup(keys)
            if hit is not None:
                start, state = hit
                req.cached_tokens += start
                self.metrics.cache_hits.inc()
                self.metrics.cache_hit_tokens.inc(start)
            else:
                self.metrics.cache_misses.inc()
            store = {p: keys[p] for p in cache.plan(keys, hints, start)}
        return _Prefill(req, j, splits, start, state, store)

    # -- prefill -------------------------------------------------------------------
    def _prefill_some(self) -> None:
        budget = self.prefill_budget
        while self._prefills and budget > 0:
            job = self._prefills[0]
            if job.req.cancelled:
                self._prefills.popleft()
                continue
            try:
                budget -= self._prefill_chunk(job)
                if job.done:
                    self._prefills.popleft()
                    self._start_rows(job)
            except Exception as err:
                log.exception("prefill failed")
                self._prefills.popleft()
                self._fail(job.req, f"prefill failed: {err}")

    def _prefill_chunk(self, job: _Prefill) -> int:
        """Run the prompt up to its next split; with `shape_buckets`, as model calls
        on pieces of 2^k or 3 * 2^k tokens (100 tokens: 96 + 4), all in this step."""
        end = job.splits.pop(0)
        n = end - job.pos
        while job.pos < end:
            stop = end if not self.shape_buckets else job.pos + _piece(end - job.pos)
            self._prefill_piece(job, stop)
        self.metrics.prefill_tokens.inc(n)
        if end in job.store and self.prefix_cache is not None:
            self.prefix_cache.store(job.store[end], job.state)
        return n

    def _prefill_piece(self, job: _Prefill, end: int) -> None:
        tokens = torch.tensor([job.ids[job.pos : end]], dtype=torch.long, device=self.device)
        last = end == len(job.ids)
        mode = "all" if job.prompt_lps is not None else ("last" if last else "none")
        logits, job.state = self.model(tokens, None, job.state, logits=mode)
        if job.prompt_lps is not None:  # logits at i predict ids[i + 1]
            lp = torch.log_softmax(self._mask(logits[0]), dim=-1)  # (t, v)
            k = job.req.params.logprobs or 0
            for t in range(end - job.pos):
                i = job.pos + t
                if i + 1 < len(job.ids):
                    job.prompt_lps.append(self._logprob_entry(lp[t], job.ids[i + 1], k))
        if last:
            job.logits = logits[:, -1]  # (1, v)
        job.pos = end

    def _start_rows(self, job: _Prefill) -> None:
        """A prompt is prefilled: sample each choice's first token, join the batch."""
        req, n = job.req, job.req.n
        self._reserved -= n
        req._unstarted -= 1
        if job.prompt_lps is not None:
            self._emit(req, Event("prompt", index=job.index, prompt_logprobs=job.prompt_lps))
        gens = self._generators(req, job.index)
        rows = [
            _Row(req, job.index * n + i, self.tokenizer, gens[i], len(job.ids)) for i in range(n)
        ]
        if req.params.max_tokens == 0:
            for row in rows:
                self._finish_row(row, "length", row.text.finish())
            return
        logits = job.logits.expand(n, -1)  # (n, v)
        toks = self._sample(logits, rows)
        keep = [i for i, row in enumerate(rows) if not self._accept(row, toks[i], logits, i)]
        if not keep or req.cancelled:
            return
        n = len(self._rows)
        self._state = _join_rows(self._state, n, job.state, self._bucket(n + len(keep)))
        self._rows += [rows[i] for i in keep]

    # -- decode --------------------------------------------------------------------
    def _decode(self) -> None:
        rows = self._rows
        last = [r.last for r in rows]
        last += [last[0]] * (self._state.batch_size - len(rows))  # pad rows
        tokens = torch.tensor(last, dtype=torch.long, device=self.device)
        logits, self._state = decode_step(self.model, tokens, self._state)
        logits = logits[: len(rows)]  # (b, v): the pad rows' are never sampled
        self.metrics.decode_steps.inc()
        self.metrics.batch_size.observe(len(rows))
        self.peak_rows = max(self.peak_rows, len(rows))
        toks = self._sample(logits, rows)
        keep = [i for i, row in enumerate(rows) if not self._accept(row, toks[i], logits, i)]
        if len(keep) < len(rows):
            self._remove_rows(keep)

    def _remove_rows(self, keep: list[int]) -> None:
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._state = None
            return
        pad = self._bucket(len(keep)) - len(keep)
        self._state = self._state.select(keep + [keep[-1]] * pad)

    def _bucket(self, n: int) -> int:
        """State rows for n real rows: the next power of two (at most max_batch_size)."""
        if not self.shape_buckets or n <= 1:
            return n
        return min(1 << (n - 1).bit_length(), max(self.max_batch_size, n))

    # -- sampling ------------------------------------------------------------------
    def _mask(self, logits: Tensor) -> Tensor:
        return mask_beyond_vocab(logits, self.vocab)

    def _generators(
        self, req: GenerationRequest, prompt_index: int
    ) -> list[torch.Generator | None]:
        p, n = req.params, req.n
        if p.greedy:
            return [None] * n
        base = p.seed if p.seed is not None else random.getrandbits(62)
        return [
            torch.Generator(device=self.device).manual_seed(base + prompt_index * n + i)
            for i in range(n)
        ]

    def _sample(self, logits: Tensor, rows: list[_Row]) -> list[int]:
        """One token per row, each with its request's parameters. (b, v) -> b ints."""
        logits = self._mask(logits)
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            p = row.req.params
            key = ("greedy",) if p.greedy else (p.temperature, p.top_k, p.top_p, p.min_p)
            groups.setdefault(key, []).append(i)
        if len(groups) == 1 and ("greedy",) in groups:
            return torch.argmax(logits, dim=-1).tolist()  # the one host sync of the step
        out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        for key, idx in groups.items():
            sub = logits[idx] if len(idx) < len(rows) else logits
            ix = torch.tensor(idx, device=logits.device)
            if key == ("greedy",):
                out[ix] = torch.argmax(sub, dim=-1)
            else:
                t, k, tp, mp = key
                out[ix] = sample(sub, t, k, tp, mp, generator=[rows[i].gen for i in idx])
        return out.tolist()

    def _token_text(self, token_id: int) -> str:
        s = self._token_str.get(token_id)
        if s is None:
            piece = self.tokenizer.id_to_piece(token_id)
            s = piece if self.tokenizer.is_byte(token_id) else piece.replace("\u2581", " ")
            if len(self._token_str) < 1_000_000:
                self._token_str[token_id] = s
        return s

    def _logprob_entry(self, lp: Tensor, token_id: int, k: int) -> TokenLogprob:
        """`lp`: (v,) log-softmax of one position."""
        top: list[tuple[int, float]] = []
        if k > 0:
            vals, ids = torch.topk(lp, k)
            top = list(zip(ids.tolist(), vals.tolist()))
        return TokenLogprob(token_id, float(lp[token_id]), top)

    # -- per-row bookkeeping -------------------------------------------------------
    def _accept(self, row: _Row, tok: int, logits: Tensor, i: int) -> bool:
        """Take row's sampled token; emit its text; return whether the row finished.
        Same stopping rules as `rgemma.generate`."""
        req, now = row.req, time.perf_counter()
        if req.first_token_at is None:
            req.first_token_at = now
            self.metrics.ttft.observe(now - req.arrival)
        if row.last_time is not None:
            self.metrics.itl.observe(now - row.last_time)
        row.last_time = now
        row.sampled += 1
        self.metrics.generation_tokens.inc()
        reason = None
        lp = None
        if tok in self.stop_ids:
            reason, piece = "stop", row.text.finish()
        else:
            row.ids.append(tok)
            piece, hit = row.text.push(tok)
            if hit:
                reason = "stop"
            elif len(row.ids) >= req.params.max_tokens:
                reason = "length"
                piece += row.text.finish()
            if req.params.logprobs is not None:
                lp = self._logprob_entry(
                    torch.log_softmax(self._mask(logits[i]), dim=-1), tok, req.params.logprobs
                )
        if tok not in self.stop_ids:
            self._emit(req, Event("token", index=row.index, text=piece, token_id=tok, logprob=lp))
        elif piece:  # a stop token only releases held-back text
            self._emit(req, Event("token", index=row.index, text=piece))
        if reason is not None:
            self._finish_row(row, reason, "")
            return True
        row.last = tok
        return False

    def _finish_row(self, row: _Row, reason: str, piece: str) -> None:
        req = row.req
        if piece:
            self._emit(req, Event("token", index=row.index, text=piece))
        self._emit(
            req,
            Event(
                "done",
                index=row.index,
                finish_reason=reason,
                completion_tokens=row.sampled,
                prompt_tokens=row.prompt_tokens,
            ),
        )
        req.rows_left -= 1
        if req.rows_left == 0:
            self._retire(req, reason)

    def _retire(self, req: GenerationRequest, reason: str) -> None:
        """The request holds no row any more: count it, forget it, free its reserved rows
        (counted first, so that a reader who sees it gone also sees it counted)."""
        if not req.finished:
            req.finished = True
            self.metrics.requests_finished.inc(1, reason)
            self.metrics.e2e.observe(time.perf_counter() - req.arrival)
        if req in self._admitted:
            self._reserved -= req.n * req._unstarted  # prompts that never joined the batch
            req._unstarted = 0
            self._admitted.remove(req)

    def _fail(self, req: GenerationRequest, message: str) -> None:
        req.cancelled = True
        self._emit(req, Event("error", message=message))
        self._retire(req, "error")

    def _emit(self, req: GenerationRequest, event: Event) -> None:
        if req.cancelled and event.kind != "error":
            return
        try:
            req.on_event(event)
        except Exception:  # the receiver is gone (event loop closed): drop the request
            log.debug("dropping events of request %s", req.id, exc_info=True)
            req.cancelled = True
