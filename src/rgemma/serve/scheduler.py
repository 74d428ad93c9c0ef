"""Continuous batching: one thread owns the model and advances every request.

The scheduler decides; the row engine (`rgemma.engine.RowEngine`, the one
`rgemma.generate` runs on) runs. Each active sequence is one engine `Row` of the
running batch: its own state row, its request's `SamplingParams`, its own random
generator and stop conditions. Every step, the scheduler:

1. drops the rows and prefills of cancelled requests (a client went away);
2. admits queued requests while the batch has free rows (FIFO);
3. prefills: plans each prompt's chunks (at most `prefill_chunk` tokens, split at
   prefix-cache boundaries and, with shape buckets, into pieces of 2^k or 3 * 2^k
   tokens) and has the engine run about `prefill_budget` tokens per step, so a long
   prompt delays the running rows by one chunk per step, not by its whole length. A
   prompt whose prefix state is in the `PrefixCache` starts from it. When a prompt
   is done, its `n` choices join the engine, which samples their first tokens;
4. decodes: one engine step (one model call on the last token of every row,
   sampling, stop rules; rows that stopped leave the batch at once);

and turns what the engine reports into the request's events and the metrics.

Bounded memory: on CPU every distinct input shape makes oneDNN build (and keep,
in its primitive caches) JIT kernels, about 0.6 MB per operation and shape, some
5 MB per model call shape for a small Griffin; and glibc keeps freed memory. With
`shape_buckets` (the default) the model only ever sees a small fixed set of shapes:
prefill pieces of lengths 2^k or 3 * 2^k (a chunk of 100 tokens runs as 96 + 4; 16
lengths up to 256) and decode batches padded to a power of two (capped at
`max_batch_size`; the pad rows repeat a real row and are never sampled), so those
caches stop growing once each shape has been seen, whatever the prompt lengths and
the batch size. When the scheduler has been idle for `idle_trim_s`, it hands freed
heap memory back to the system (`malloc_trim`, glibc only).

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

from ..engine import PromptPrefill, Row, RowEngine, RowOutput, TokenLogprob
from ..sampling import SamplingParams, make_generators
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


class QueueFull(RuntimeError):
    """The scheduler's queue holds `max_queue` requests: try again later."""


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
        "error": the request failed (`message`; `code` "timeout" when it ran past
            its time limit); no more events follow.
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
    code: str | None = None


class GenerationRequest:
    """One request: prompts (token ids), `n` choices per prompt, one `SamplingParams`
    (`rgemma.sampling`; its `max_new_tokens` is OpenAI's `max_tokens`).

    Choice index of prompt j, sample i: `j * n + i`. `prefix_hints[j]` lists token
    counts where prompt j's shared prefix ends (e.g. after a chat system prompt),
    used as prefix-cache boundaries. With `timeout_s`, a request still queued or
    running that many seconds after it arrived is stopped with an "error" event
    (code "timeout").
    """

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        n: int = 1,
        on_event: Callable[[Event], None] | None = None,
        prefix_hints: Sequence[Sequence[int]] | None = None,
        timeout_s: float | None = None,
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
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else self.arrival + timeout_s
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
            f"max_new_tokens={self.params.max_new_tokens})"
        )


class _Prefill(PromptPrefill):
    """One prompt of a request being prefilled, chunk by chunk, batch 1: the engine's
    `PromptPrefill` plus where its chunks end and which prefix states to cache."""

    def __init__(
        self,
        req: GenerationRequest,
        index: int,
        splits: list[int],
        start: int,
        state: GriffinState | None,
        store: dict[int, Any],
    ) -> None:
        p = req.params
        super().__init__(
            req.prompts[index],
            start=start,
            state=state,
            prompt_logprobs=p.prompt_logprobs,
            top_logprobs=p.logprobs or 0,
        )
        self.req, self.index = req, index
        self.splits = [s for s in splits if s > start]  # chunk end positions, last = len
        self.store = store


class _Choice:
    """The scheduler's tag on an engine `Row`: which request and choice it serves."""

    __slots__ = ("index", "last_time", "req")

    def __init__(self, req: GenerationRequest, index: int) -> None:
        self.req, self.index = req, index
        self.last_time: float | None = None


class Scheduler:
    """Runs the model for every request on one thread, with continuous batching.

    Args:
        model: a `Griffin` (eval mode) on its device (`compile_decode` applies).
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
        # The engine runs the rows: its state holds the real rows first, then pad rows
        # (copies of a real row, never sampled) up to `_bucket(num_rows)`.
        self.engine = RowEngine(model, tokenizer, batch_rows=self._bucket)
        self.device = self.engine.device

        self._cond = threading.Condition()
        self._queue: deque[GenerationRequest] = deque()  # guarded by _cond
        self._prefills: deque[_Prefill] = deque()
        self._admitted: list[GenerationRequest] = []  # being prefilled or decoded
        self._reserved = 0  # rows of admitted requests not yet in the batch
        self._thread: threading.Thread | None = None
        self._stopping = False
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
        """Rows in the running batch (pad rows not counted)."""
        return len(self.engine.rows)

    @property
    def _state(self) -> GriffinState | None:
        """The running batch's state (the engine's)."""
        return self.engine.state

    @property
    def state_nbytes(self) -> int:
        state = self.engine.state
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
        self._admitted, self._prefills = [], deque()
        self.engine.clear()
        self._reserved = 0

    def has_work(self) -> bool:
        return bool(self._queue or self._prefills or self.engine.rows or self._admitted)

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling step: time limits, cancellations, admissions, prefill, one
        decode step."""
        self._expire()
        self._drop_cancelled()
        self._admit()
        self._prefill_some()
        if self.engine.rows:
            try:
                self._decode()
            except Exception as err:  # a model failure: fail the batch, keep serving
                log.exception("decode step failed")
                for req in {id(r.tag.req): r.tag.req for r in self.engine.rows}.values():
                    self._fail(req, f"decode failed: {err}")
                self.engine.clear()

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
            not self._queue and self.num_rows + self._reserved + req.num_rows <= self.max_batch_size
        )

    def _expire(self) -> None:
        """Stop the requests past their deadline (queued or admitted): an "error"
        event with code "timeout"; their rows leave at `_drop_cancelled`."""
        now = time.perf_counter()
        with self._cond:
            late = [r for r in self._queue if r.deadline is not None and now > r.deadline]
            for req in late:
                self._queue.remove(req)
        late += [
            r
            for r in self._admitted
            if r.deadline is not None and now > r.deadline and not r.cancelled
        ]
        for req in late:
            self._fail(
                req,
                f"the request ran past this server's time limit of {req.timeout_s:g} s",
                code="timeout",
            )

    def _drop_cancelled(self) -> None:
        rows = self.engine.rows
        if any(row.tag.req.cancelled for row in rows):
            self.engine.retain([i for i, row in enumerate(rows) if not row.tag.req.cancelled])
        if any(p.req.cancelled for p in self._prefills):
            self._prefills = deque(p for p in self._prefills if not p.req.cancelled)
        for req in [r for r in self._admitted if r.cancelled]:
            self._retire(req, "cancelled")

    def _admit(self) -> None:
        with self._cond:
            while self._queue:
                req = self._queue[0]
                if self.num_rows + self._reserved + req.num_rows > self.max_batch_size:
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
                if self._prefills and self._prefills[0] is job:  # not taken off yet
                    self._prefills.popleft()
                self._fail(job.req, f"prefill failed: {err}")

    def _prefill_chunk(self, job: _Prefill) -> int:
        """Run the prompt up to its next split; with `shape_buckets`, as model calls
        on pieces of 2^k or 3 * 2^k tokens (100 tokens: 96 + 4), all in this step."""
        end = job.splits.pop(0)
        n = end - job.pos
        while job.pos < end:
            stop = end if not self.shape_buckets else job.pos + _piece(end - job.pos)
            self.engine.prefill_piece(job, stop)
        self.metrics.prefill_tokens.inc(n)
        if end in job.store and self.prefix_cache is not None:
            self.prefix_cache.store(job.store[end], job.state)
        return n

    def _start_rows(self, job: _Prefill) -> None:
        """A prompt is prefilled: its n choices join the engine, which samples their
        first tokens."""
        req, n = job.req, job.req.n
        self._reserved -= n
        req._unstarted -= 1
        if job.prompt_logprobs is not None:
            self._emit(req, Event("prompt", index=job.index, prompt_logprobs=job.prompt_logprobs))
        p = req.params
        gens: list[torch.Generator | None] = [None] * n
        if not p.greedy:  # choice i of prompt j: seed + j * n + i
            seed = p.seed if p.seed is not None else random.getrandbits(62)
            gens = make_generators(seed + job.index * n, n, self.device)
        rows = [
            Row(
                p,
                self.tokenizer,
                len(job.ids),
                generator=gens[i],
                prompt_ids=job.ids,
                tag=_Choice(req, job.index * n + i),
            )
            for i in range(n)
        ]
        self._handle(self.engine.add(rows, job.logits, job.state))

    # -- decode --------------------------------------------------------------------
    def _decode(self) -> None:
        n = self.num_rows
        self.metrics.decode_steps.inc()
        self.metrics.batch_size.observe(n)
        self.peak_rows = max(self.peak_rows, n)
        self._handle(self.engine.step())

    def _bucket(self, n: int) -> int:
        """State rows for n real rows: the next power of two (at most max_batch_size)."""
        if not self.shape_buckets or n <= 1:
            return n
        return min(1 << (n - 1).bit_length(), max(self.max_batch_size, n))

    # -- what the engine did -> events ---------------------------------------------------
    def _handle(self, outs: list[RowOutput]) -> None:
        """Count the engine's sampled tokens and send each row's text and end to its
        request."""
        now = time.perf_counter()
        for out in outs:
            choice: _Choice = out.row.tag
            req = choice.req
            if out.token_id is not None:
                if req.first_token_at is None:
                    req.first_token_at = now
                    self.metrics.ttft.observe(now - req.arrival)
                if choice.last_time is not None:
                    self.metrics.itl.observe(now - choice.last_time)
                choice.last_time = now
                self.metrics.generation_tokens.inc()
            if out.token_id is not None and not out.stop_token:
                event = Event(
                    "token",
                    index=choice.index,
                    text=out.text,
                    token_id=out.token_id,
                    logprob=out.logprob,
                )
                self._emit(req, event)
            elif out.text:  # a stop token (or the end) only releases held-back text
                self._emit(req, Event("token", index=choice.index, text=out.text))
            if out.finished:
                self._finish_row(out.row)

    def _finish_row(self, row: Row) -> None:
        choice: _Choice = row.tag
        req = choice.req
        self._emit(
            req,
            Event(
                "done",
                index=choice.index,
                finish_reason=row.finish_reason,
                completion_tokens=row.sampled,
                prompt_tokens=row.prompt_tokens,
            ),
        )
        req.rows_left -= 1
        if req.rows_left == 0:
            self._retire(req, row.finish_reason)

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

    def _fail(self, req: GenerationRequest, message: str, code: str | None = None) -> None:
        req.cancelled = True
        self._emit(req, Event("error", message=message, code=code))
        self._retire(req, "error")

    def _emit(self, req: GenerationRequest, event: Event) -> None:
        if req.cancelled and event.kind != "error":
            return
        try:
            req.on_event(event)
        except Exception:  # the receiver is gone (event loop closed): drop the request
            log.debug("dropping events of request %s", req.id, exc_info=True)
            req.cancelled = True
