"""The HTTP layer: an OpenAI-compatible FastAPI app over a `Scheduler`.

Endpoints:
    POST /v1/completions        prompt (text, token ids, or lists of them), `echo`,
                                `logprobs` (0..5 alternatives), `stream`
    POST /v1/chat/completions   messages in the Gemma chat template; stops at
                                `<end_of_turn>`; `logprobs` / `top_logprobs`, `stream`
    GET  /v1/models             the one served model
    POST /tokenize              vLLM's: {"prompt", "add_special_tokens"} -> {"tokens",
                                "count", "max_model_len"} (rgemma's own tokenizer)
    POST /detokenize            vLLM's: {"tokens"} -> {"prompt"}
    GET  /tokenizer_info        vLLM's: the special tokens and the chat template
    GET  /health                200 {"status": "ok"} while the scheduler runs
    GET  /metrics               Prometheus text (see `metrics.Metrics`)

Both generation endpoints take `max_tokens`, `temperature`, `top_p`, `top_k`
(extension), `min_p` (extension), `presence_penalty`, `frequency_penalty`,
`repetition_penalty` (extension), `logit_bias`, `ignore_eos` and `min_tokens`
(extensions), `seed`, `stop`, `n`, `stream`, `stream_options.include_usage`; every
other field is refused, naming it (see `protocol`). Every prompt starts with BOS, as
the model was trained: a text prompt is encoded with one, and a token-id prompt that
does not start with BOS gets one in front, which `echo` and its logprobs leave out
(they cover the ids as sent; the first one's logprob is then given BOS). So
lm-eval's `local-completions` model, tokenizing through /tokenize, scores as rgemma's
own lm-eval model does. A non-streamed response carries
`usage`; a stream carries it only with `stream_options.include_usage`, as its own
last chunk with empty `choices` (as OpenAI). Sampling defaults are the CLI's, from
one place (`rgemma.sampling.default_sampling`: temperature 0.8, top_p 0.95, the
repetition penalty when sampling); `max_tokens` defaults to
`ServeConfig.default_max_tokens` (512, `--max-tokens-default`). The `model` field is
optional and not checked (one model is served).

Limits, so that one client cannot stall the others: a body larger than
`max_body_bytes` is refused with 413 before it is read (from Content-Length, or
while it streams in); prompts are tokenized off the event loop (a text that cannot
fit `max_prompt_tokens` is refused before tokenizing); a full queue answers 503 with
`Retry-After`; a request still running after `request_timeout_s` is stopped (504);
the API key is compared in constant time. /health and /metrics never wait for
generation (the event loop only parses, routes and streams).

Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 for
bad JSON, wrong types, invalid values and unsupported fields (param names the field)
and limits (prompt longer than `max_prompt_tokens`, `max_tokens` above the limit,
more rows than the batch); 401 for a wrong or missing API key (`Authorization:
Bearer KEY`, only on /v1/* and the tokenizer endpoints); 413 for a body over the
limit; 503 with `Retry-After` when the queue is full; 504 past the time limit.

A client that disconnects (streaming or not) cancels its request: its rows leave
the batch at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..defaults import MAX_TOKENS_DEFAULT
from ..errors import InputError
from ..sampling import SamplingParams, default_sampling
from .metrics import Metrics
from .prefix_cache import PrefixCache
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    FieldError,
    TokenizeRequest,
    error_body,
    param_of,
)
from .scheduler import Event, GenerationRequest, QueueFull, Scheduler

__all__ = ["ServeConfig", "create_app"]

log = logging.getLogger("rgemma.serve")


@dataclasses.dataclass
class ServeConfig:
    """Server settings (the `rgemma serve` options).

    Attributes:
        model_name: the id in /v1/models and in responses.
        max_batch_size: most sequences decoded together (a request with `n` choices
            takes n rows).
        max_queue: most requests waiting for rows; beyond, 503.
        max_prompt_tokens: longest prompt accepted (400 beyond).
        max_tokens: the largest `max_tokens` accepted (400 beyond).
        default_max_tokens: `max_tokens` of a request that gives none (both
            endpoints; at most `max_tokens`).
        api_key: when set, /v1/* and the tokenizer endpoints require
            `Authorization: Bearer <api_key>`.
        max_body_bytes: largest request body (413 beyond, refused before reading it).
        request_timeout_s: a request still queued or running after this many seconds
            is stopped with 504 (None: no limit).
        prefill_chunk: prompt tokens per prefill call (the longest pause a new
            prompt causes the running rows).
        prefix_cache_bytes: byte budget of the prefix state cache (0: off).
        prefix_block: prefix-cache boundaries every this many tokens.
        prefix_min_tokens: shortest prefix worth caching.
        shape_buckets: run the model only on prefill pieces of 2^k or 3 * 2^k tokens
            and on decode batches padded to a power of two, so that memory (oneDNN's
            per-shape kernel caches) stays bounded whatever the traffic (see
            `rgemma.serve.scheduler`).
    """

    model_name: str = "rgemma"
    max_batch_size: int = 16
    max_queue: int = 64
    max_prompt_tokens: int = 8192
    max_tokens: int = 4096
    default_max_tokens: int = MAX_TOKENS_DEFAULT
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    request_timeout_s: float | None = 600.0
    prefill_chunk: int = 256
    prefix_cache_bytes: int = 1 << 30
    prefix_block: int = 256
    prefix_min_tokens: int = 16
    shape_buckets: bool = True


_DISCONNECTED = object()
_TOKENIZER_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")
_ENDPOINTS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/health",
    "/metrics",
    *_TOKENIZER_PATHS,
)


def _drop_event(event: Event) -> None:
    """The receiver of a request whose client is done with it."""


# ----------------------------------------------------------------------------------
# One request's bridge between the scheduler thread and the event loop
# ----------------------------------------------------------------------------------
class _Bridge:
    """Receives a request's events from the scheduler thread into an asyncio queue;
    a watcher task cancels the request when the client disconnects."""

    def __init__(self, scheduler: Scheduler, request: Request) -> None:
        self.scheduler, self.request = scheduler, request
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.req: GenerationRequest | None = None
        self.disconnected = False

    def on_event(self, event: Event) -> None:  # scheduler thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def _watch(self) -> None:
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                if self.req is not None:
                    self.scheduler.cancel(self.req)
                self.queue.put_nowait(_DISCONNECTED)
                return

    async def events(self) -> AsyncIterator[Event]:
        """The request's events until every choice is done (or an error, or the client
        left); leaving early cancels the request."""
        assert self.req is not None
        watcher = asyncio.ensure_future(self._watch())
        remaining = self.req.num_rows
        try:
            while remaining:
                event = await self.queue.get()
                if event is _DISCONNECTED:
                    return
                if event.kind == "done":
                    remaining -= 1
                yield event
                if event.kind == "error":
                    return
        finally:
            watcher.cancel()
            if remaining:
                self.scheduler.cancel(self.req)
            # Break the request <-> bridge cycle (req.on_event is our bound method), so
            # that both are freed as soon as the handler lets go, not at the next
            # cyclic garbage collection; late events (a cancelled request's) are dropped.
            self.req.on_event = _drop_event


# ----------------------------------------------------------------------------------
# The server: request -> GenerationRequest, events -> OpenAI responses
# ----------------------------------------------------------------------------------
class _Choice:
    __slots__ = ("completion_tokens", "finish_reason", "logprobs", "prompt_tokens", "text")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.logprobs: list[Any] = []

    def done(self, event: Event) -> None:
        """Record a "done" event."""
        self.finish_reason, self.completion_tokens = event.finish_reason, event.completion_tokens


class _Server:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: ServeConfig,
        scheduler: Scheduler | None,
        metrics: Metrics | None,
    ) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.metrics = metrics or (scheduler.metrics if scheduler else Metrics())
        if scheduler is None:
            cache = (
                PrefixCache(
                    config.prefix_cache_bytes, config.prefix_block, config.prefix_min_tokens
                )
                if config.prefix_cache_bytes > 0
                else None
            )
            scheduler = Scheduler(
                model,
                tokenizer,
                max_batch_size=config.max_batch_size,
                max_queue=config.max_queue,
                prefill_chunk=config.prefill_chunk,
                prefix_cache=cache,
                prefix_block=config.prefix_block,
                metrics=self.metrics,
                shape_buckets=config.shape_buckets,
            )
        self.scheduler = scheduler
        self.metrics.bind_scheduler(scheduler)
        self.created = int(time.time())
        self.vocab = min(tokenizer.vocab_size, model.config.vocab_size)
        self._token_str: dict[int, str] = {}
        # The longest piece in UTF-8 bytes (a byte-fallback piece is one byte).
        self.max_piece_bytes = max(
            1,
            max(
                len(tokenizer.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
                for i in range(tokenizer.vocab_size)
                if not tokenizer.is_byte(i)
            ),
        )

    # -- request -> GenerationRequest ---------------------------------------------
    def _check_prompt(self, ids: list[int], param: str) -> None:
        if len(ids) > self.config.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; this server accepts at "
                f"most {self.config.max_prompt_tokens}",
                param=param,
                code="context_length_exceeded",
            )

    def _check_text_length(self, text: str, param: str) -> None:
        """Refuse, without tokenizing it, a text that cannot fit `max_prompt_tokens`:
        a token covers at most `max_piece_bytes` bytes of UTF-8."""
        limit = self.config.max_prompt_tokens * self.max_piece_bytes
        if len(text) > limit or len(text.encode("utf-8", errors="surrogatepass")) > limit:
            raise APIError(
                400,
                f"the {param} text is longer than {self.config.max_prompt_tokens} tokens "
                f"can be ({limit:,} bytes); this server accepts at most "
                f"{self.config.max_prompt_tokens} prompt tokens",
                param=param,
                code="context_length_exceeded",
            )

    def _params(
        self,
        body: Any,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_logprobs: bool,
    ) -> SamplingParams:
        """The request's `SamplingParams`: OpenAI's `max_tokens` (or
        `max_completion_tokens`) is `max_new_tokens` (default
        `config.default_max_tokens`); fields not given take the CLI's defaults
        (`default_sampling`); `top_k` 0 or -1 is off."""
        name = (
            "max_completion_tokens"
            if getattr(body, "max_completion_tokens", None) is not None
            else "max_tokens"
        )
        if max_tokens is None:
            max_tokens = min(self.config.default_max_tokens, self.config.max_tokens)
        if max_tokens > self.config.max_tokens:
            raise APIError(
                400,
                f"{name} is {max_tokens}; this server allows at most {self.config.max_tokens}",
                param=name,
                code="invalid_value",
            )
        if body.min_tokens > max_tokens:
            raise APIError(
                400,
                f"min_tokens ({body.min_tokens}) must not exceed {name} ({max_tokens})",
                param="min_tokens",
                code="invalid_value",
            )
        bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
        bad = sorted(k for k in bias if k >= self.vocab)
        if bad:
            raise APIError(
                400,
                f"logit_bias token id {bad[0]} is outside the vocabulary [0, {self.vocab})",
                param="logit_bias",
                code="invalid_value",
            )

        def number(x: float | None) -> float | None:
            return None if x is None else float(x)

        fields = {
            "max_new_tokens": max_tokens,
            "temperature": number(body.temperature),
            "top_k": body.top_k if body.top_k is not None and body.top_k > 0 else None,
            "top_p": number(body.top_p),
            "min_p": number(body.min_p),
            "seed": body.seed,
            "stop": body.stops,
            "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs,
            "presence_penalty": number(body.presence_penalty),
            "frequency_penalty": number(body.frequency_penalty),
            "repetition_penalty": number(body.repetition_penalty),
            "logit_bias": bias,
            "ignore_eos": body.ignore_eos,
            "min_tokens": body.min_tokens,
        }
        try:
            return default_sampling(**fields)
        except (InputError, ValueError) as err:
            msg = str(err)
            param = next((f for f in fields if msg.startswith(f + " ")), None)
            raise APIError(400, msg, param=param, code="invalid_value") from None

    def completion_prompts(
        self, body: CompletionRequest
    ) -> tuple[list[list[int]], list[str], list[int]]:
        """Token ids, echo texts and echo starts of each prompt: a token-id prompt
        without BOS gets one in front (echo starts after it, at 1)."""
        p = body.prompt
        if isinstance(p, str):
            raw: list[Any] = [p]
        elif p and all(isinstance(x, int) for x in p):
            raw = [p]
        else:
            raw = list(p)
        ids_list, texts, starts = [], [], []
        for item in raw:
            start = 0
            if isinstance(item, str):
                self._check_text_length(item, "prompt")
                try:  # e.g. a lone surrogate ("\ud800" in the JSON): 400, not 500
                    ids = self.tokenizer.encode(item, add_bos=True)
                except InputError as err:
                    raise APIError(400, str(err), param="prompt", code="invalid_value") from None
                texts.append(item)
            else:
                bad = [x for x in item if not 0 <= x < self.vocab]
                if bad:
                    raise APIError(
                        400,
                        f"token id {bad[0]} is outside the vocabulary [0, {self.vocab})",
                        param="prompt",
                        code="invalid_value",
                    )
                ids = list(item)
                texts.append(self.tokenizer.decode(ids))
                if ids[0] != self.tokenizer.bos_id:  # as a text prompt: BOS first
                    ids.insert(0, self.tokenizer.bos_id)
                    start = 1
            self._check_prompt(ids, "prompt")
            ids_list.append(ids)
            starts.append(start)
        return ids_list, texts, starts

    def tokenize(self, body: TokenizeRequest) -> list[int]:
        """`/tokenize`: the ids of a raw prompt, as `/v1/completions` encodes one
        (control text such as `<bos>` is its id), BOS first with
        `add_special_tokens`."""
        self._check_text_length(body.prompt, "prompt")
        try:
            return self.tokenizer.encode(body.prompt, add_bos=body.add_special_tokens)
        except InputError as err:
            raise APIError(400, str(err), param="prompt", code="invalid_value") from None

    def tokenizer_info(self) -> dict[str, Any]:
        """`/tokenizer_info` (vLLM's): the tokenizer's special tokens and the Gemma
        chat template (HF's jinja form), which lm-eval's remote tokenizer reads."""
        from ..checkpoint import GEMMA_CHAT_TEMPLATE

        tok = self.tokenizer
        return {
            "tokenizer_class": "GemmaTokenizer",
            "bos_token": tok.id_to_piece(tok.bos_id),
            "eos_token": tok.id_to_piece(tok.eos_id),
            "pad_token": tok.id_to_piece(tok.pad_id),
            "add_bos_token": True,
            "add_eos_token": False,
            "model_max_length": self.config.max_prompt_tokens,
            "chat_template": GEMMA_CHAT_TEMPLATE,
        }

    def chat_prompt(self, body: ChatCompletionRequest) -> tuple[list[int], list[int]]:
        """Token ids of the chat and its prefix-cache hints (end of the system prompt,
        end of the last finished turn)."""
        role = {"developer": "system", "assistant": "model"}
        messages = [{"role": role.get(m.role, m.role), "content": m.text()} for m in body.messages]
        self._check_text_length("".join(m["content"] for m in messages), "messages")
        tok = self.tokenizer
        try:
            ids = tok.encode_chat(messages)
        except InputError as err:
            raise APIError(400, str(err), param="messages", code="invalid_value") from None
        self._check_prompt(ids, "messages")
        hints = []
        if messages[0]["role"] == "system":
            probe = tok.encode_chat(
                [messages[0], {"role": "user", "content": ""}], add_generation_prompt=False
            )
            common = 0
            for a, b in zip(ids, probe):
                if a != b:
                    break
                common += 1
            hints.append(common)
        eot = tok.end_of_turn_id
        last_eot = max((i + 1 for i, t in enumerate(ids) if t == eot), default=0)
        if last_eot:
            hints.append(last_eot)
        return ids, hints

    def submit(
        self,
        bridge: _Bridge,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        hints: list[list[int]] | None = None,
    ) -> GenerationRequest:
        rows = n * len(prompts)
        if rows > self.config.max_batch_size:
            raise APIError(
                400,
                f"n x prompts = {rows} sequences; this server batches at most "
                f"{self.config.max_batch_size}",
                param="n",
                code="invalid_value",
            )
        req = GenerationRequest(
            prompts,
            params,
            n=n,
            on_event=bridge.on_event,
            prefix_hints=hints,
            timeout_s=self.config.request_timeout_s,
        )
        bridge.req = req
        try:
            self.scheduler.submit(req)
        except QueueFull as err:
            raise APIError(
                503,
                f"the server is busy: {err}; retry later",
                code="queue_full",
                type="server_error",
                headers={"Retry-After": "1"},
            ) from None
        except ValueError as err:
            raise APIError(400, str(err), param="n", code="invalid_value") from None
        return req

    # -- response pieces ---------------------------------------------------------------
    def usage(self, req: GenerationRequest, choices: list[_Choice]) -> dict[str, Any]:
        prompt = sum(len(p) for p in req.prompts)
        completion = sum(c.completion_tokens for c in choices)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": req.cached_tokens},
        }

    def stream_end(
        self,
        body: Any,
        req: GenerationRequest,
        choices: list[_Choice],
        last: dict[str, Any] | None,
        template: dict[str, Any],
    ) -> Iterator[str]:
        """The end of a stream: the held-back final chunk `last`, then, only when
        `stream_options.include_usage` is true, a usage chunk with empty `choices`
        (built on `template`; OpenAI's), then `[DONE]`."""
        if last is not None:
            yield _sse(last)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield _sse({**template, "choices": [], "usage": self.usage(req, choices)})
        yield "data: [DONE]\n\n"

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes a token stands for: its piece with SentencePiece's word
        marker as a space; a byte-fallback piece `<0x3D>` is the one byte 0x3D."""
        piece = self.tokenizer.id_to_piece(token_id)
        if self.tokenizer.is_byte(token_id):
            return bytes([int(piece[3:-1], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def token_text(self, token_id: int) -> str:
        """A token as OpenAI's logprobs show it: the text of its bytes (`<0x3D>` is
        "="; a byte that is only part of a UTF-8 character shows as `\\xe2`)."""
        s = self._token_str.get(token_id)
        if s is None:
            s = self.token_bytes(token_id).decode("utf-8", errors="backslashreplace")
            if len(self._token_str) < 1_000_000:
                self._token_str[token_id] = s
        return s

    def chat_logprob(self, lp) -> dict[str, Any]:
        """OpenAI chat logprobs entry: `token` (text), `logprob`, `bytes` (the token's
        UTF-8 bytes), `top_logprobs`."""

        def entry(token_id: int, value: float) -> dict[str, Any]:
            return {
                "token": self.token_text(token_id),
                "logprob": value,
                "bytes": list(self.token_bytes(token_id)),
            }

        out = entry(lp.token_id, lp.logprob)
        out["top_logprobs"] = [entry(i, v) for i, v in lp.top]
        return out

    def completion_logprobs(self, entries: list[Any], offset: int) -> dict[str, Any]:
        """OpenAI legacy logprobs of `entries`, (token id, TokenLogprob or None for the
        first prompt token); `text_offset` counts characters of the decoded text from
        `offset` (a byte-fallback token adds its character once it is complete)."""
        tokens, lps, tops, offsets = [], [], [], []
        decoder = self.tokenizer.stream_decoder()
        for token_id, lp in entries:
            tokens.append(self.token_text(token_id))
            lps.append(lp.logprob if lp is not None else None)
            tops.append(
                {self.token_text(i): v for i, v in lp.top} if lp is not None and lp.top else None
            )
            offsets.append(offset)
            offset += len(decoder.push(token_id))
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }


def _event_error(event: Event) -> APIError:
    """The error of a failed request: 504 past its time limit, else 500."""
    if event.code == "timeout":
        return APIError(504, event.message, code="timeout", type="server_error")
    return APIError(500, event.message, type="server_error")


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------
def _as_json(scope: dict) -> dict:
    """`scope` with a JSON Content-Type: a body sent as text/plain (curl -d, some
    clients) is parsed as JSON anyway, and fails as invalid JSON if it is not."""
    headers = list(scope.get("headers") or [])
    for name, value in headers:
        if name == b"content-type" and b"json" in value.lower():
            return scope
    headers = [(n, v) for n, v in headers if n != b"content-type"]
    headers.append((b"content-type", b"application/json"))
    return {**scope, "headers": headers}


class _Guard:
    """ASGI middleware: the body size limit (413), the API key on /v1/* (compared in
    constant time), and request counts per endpoint and status."""

    def __init__(self, app: Any, server: _Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "other"
        status = [500]

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        guarded = path.startswith("/v1/") or path in _TOKENIZER_PATHS
        if scope.get("method") == "POST" and guarded:
            scope = _as_json(scope)
        key = self.server.config.api_key
        limit = self.server.config.max_body_bytes
        too_large = APIError(
            413,
            f"the request body is larger than this server's limit of {limit:,} bytes",
            code="request_too_large",
        )
        try:
            length = dict(scope.get("headers") or {}).get(b"content-length")
            if length is not None and length.strip().isdigit() and int(length) > limit:
                raise too_large  # refused before a byte of the body is read
            received = [0]
            inner_receive = receive

            async def receive() -> dict:  # counts a body sent without Content-Length
                message = await inner_receive()
                if message["type"] == "http.request":
                    received[0] += len(message.get("body", b""))
                    if received[0] > limit:  # FastAPI passes an HTTPException through
                        raise StarletteHTTPException(413, too_large.message)
                return message

            if key and guarded:
                headers = dict(scope.get("headers") or {})
                auth = headers.get(b"authorization", b"").decode("latin-1")
                if not auth:
                    raise APIError(
                        401,
                        "missing API key: send 'Authorization: Bearer KEY'",
                        code="invalid_api_key",
                    )
                given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
                # Constant time, whatever the lengths: compare digests.
                if not hmac.compare_digest(
                    hashlib.sha256(given.encode()).digest(), hashlib.sha256(key.encode()).digest()
                ):
                    raise APIError(401, "incorrect API key", code="invalid_api_key")
            await self.app(scope, receive, send_counted)
        except APIError as err:
            headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
            response = JSONResponse(err.body(), status_code=err.status, headers=headers)
            await response(scope, receive, send_counted)
        finally:
            self.server.metrics.requests.inc(1, endpoint, str(status[0]))


def create_app(
    model: Any,
    tokenizer: Any,
    config: ServeConfig | None = None,
    *,
    scheduler: Scheduler | None = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """The OpenAI-compatible app serving `model` (a `Griffin`) with `tokenizer`.

    The scheduler thread starts with the app's lifespan (uvicorn, or
    `with TestClient(app)`) and stops with it. `app.state.server.scheduler` is the
    `Scheduler`.
    """
    config = config or ServeConfig()
    server = _Server(model, tokenizer, config, scheduler, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.scheduler.stop)

    app = FastAPI(title="rgemma", version="0.1.0", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(_Guard, server=server)

    # -- errors ------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        first = errors[0] if errors else {}
        kind = first.get("type", "")
        if kind == "json_invalid":
            ctx = first.get("ctx") or {}
            return JSONResponse(
                error_body(f"invalid JSON body: {ctx.get('error', kind)}", code="invalid_json"),
                status_code=400,
            )
        cause = (first.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            param, msg = cause.param, str(cause)
        else:
            param = param_of(tuple(first.get("loc", ())))
            msg = first.get("msg", "invalid request")
            if kind == "extra_forbidden":
                return JSONResponse(
                    error_body(
                        f"unsupported parameter {param!r}: this server does not implement "
                        "it (see the rgemma serve documentation for the supported fields)",
                        param=param,
                        code="unsupported_parameter",
                    ),
                    status_code=400,
                )
            if param is None and kind in ("model_attributes_type", "dict_type"):
                msg = "the request body must be a JSON object"
            elif param is None and kind == "missing":
                msg = "the request body is empty: send a JSON object"
            elif param is not None:
                got = first.get("input")
                shown = json.dumps(got)[:80] if kind != "missing" else None
                msg = (
                    f"missing required parameter {param!r}"
                    if kind == "missing"
                    else f"invalid value for {param!r}: {msg} (got {shown})"
                )
        code = (
            "missing_required_parameter"
            if kind == "missing"
            else "invalid_type"
            if kind.endswith("_type") or kind.startswith("literal")
            else "invalid_value"
        )
        return JSONResponse(error_body(msg, param=param, code=code), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(
                str(err.detail),
                param=None,
                code={404: "not_found", 413: "request_too_large"}.get(err.status_code),
            ),
            status_code=err.status_code,
            headers=err.headers,
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {err}", "server_error"), status_code=500)

    # -- plain endpoints -------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        ok = server.scheduler.running
        return JSONResponse({"status": "ok" if ok else "stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> PlainTextResponse:
        return PlainTextResponse(
            server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": config.model_name,
                    "object": "model",
                    "created": server.created,
                    "owned_by": "rgemma",
                }
            ],
        }

    # -- tokenizer (vLLM's endpoints) -------------------------------------------------
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        ids = await asyncio.to_thread(server.tokenize, body)
        out: dict[str, Any] = {
            "count": len(ids),
            "max_model_len": config.max_prompt_tokens,
            "tokens": ids,
        }
        if body.return_token_strs:
            out["token_strs"] = [server.tokenizer.id_to_piece(i) for i in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        bad = [x for x in body.tokens if not 0 <= x < server.vocab]
        if bad:
            raise APIError(
                400,
                f"token id {bad[0]} is outside the vocabulary [0, {server.vocab})",
                param="tokens",
                code="invalid_value",
            )
        return {"prompt": await asyncio.to_thread(server.tokenizer.decode, body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return server.tokenizer_info()

    # -- completions -------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        params = server._params(
            body,
            body.max_tokens,
            body.logprobs,
            prompt_logprobs=body.echo and body.logprobs is not None,
        )
        # Tokenizing is CPU work (SentencePiece releases the GIL): off the event loop.
        prompts, texts, starts = await asyncio.to_thread(server.completion_prompts, body)
        bridge = _Bridge(server.scheduler, request)
        req = server.submit(bridge, prompts, params, body.n)
        n = body.n
        choices = [_Choice() for _ in range(req.num_rows)]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = [texts[i // n] if body.echo else "" for i in range(req.num_rows)]
        offsets = [len(e) for e in echo]

        def chunk(
            index: int, text: str, logprobs: Any = None, finish_reason: str | None = None
        ) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": config.model_name,
                "choices": [
                    {
                        "index": index,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": finish_reason,
                    }
                ],
            }

        def prompt_lp(event: Event) -> list[Any]:
            ids, start = prompts[event.index], starts[event.index]
            return [(t, lp) for t, lp in zip(ids, event.prompt_logprobs)][start:]

        if body.stream:

            async def stream() -> AsyncIterator[str]:
                if body.echo and body.logprobs is None:
                    for i in range(req.num_rows):
                        yield _sse(chunk(i, echo[i]))
                last = None
                async for ev in bridge.events():
                    if ev.kind == "error":
                        yield _sse(_event_error(ev).body())
                        return
                    c = choices[ev.index] if ev.kind != "prompt" else None
                    if ev.kind == "prompt":
                        entries = prompt_lp(ev)
                        for i in range(ev.index * n, ev.index * n + n):
                            yield _sse(chunk(i, echo[i], server.completion_logprobs(entries, 0)))
                    elif ev.kind == "token":
                        lp = None
                        if ev.logprob is not None:
                            lp = server.completion_logprobs(
                                [(ev.token_id, ev.logprob)], offsets[ev.index]
                            )
                        offsets[ev.index] += len(ev.text)
                        if ev.text or lp is not None:
                            yield _sse(chunk(ev.index, ev.text, lp))
                    else:
                        c.done(ev)
                        last = chunk(ev.index, "", None, ev.finish_reason)
                        if any(x.finish_reason is None for x in choices):
                            yield _sse(last)
                            last = None
                for line in server.stream_end(body, req, choices, last, chunk(0, "")):
                    yield line

            return StreamingResponse(
                stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )

        prompt_entries: dict[int, list[Any]] = {}
        async for ev in bridge.events():
            if ev.kind == "error":
                raise _event_error(ev)
            if ev.kind == "prompt":
                prompt_entries[ev.index] = prompt_lp(ev)
            elif ev.kind == "token":
                c = choices[ev.index]
                c.text.append(ev.text)
                if ev.logprob is not None:
                    c.logprobs.append((ev.token_id, ev.logprob))
            else:
                c = choices[ev.index]
                c.done(ev)
        if bridge.disconnected:
            return JSONResponse(error_body("client disconnected"), status_code=499)
        out = []
        for i, c in enumerate(choices):
            logprobs = None
            if body.logprobs is not None:
                entries = prompt_entries.get(i // n, []) + c.logprobs
                logprobs = server.completion_logprobs(entries, 0)
            out.append(
                {
                    "index": i,
                    "text": echo[i] + "".join(c.text),
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                }
            )
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": config.model_name,
            "choices": out,
            "usage": server.usage(req, choices),
        }

    # -- chat --------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        max_tokens = (
            body.max_completion_tokens
            if body.max_completion_tokens is not None
            else body.max_tokens
        )
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = server._params(body, max_tokens, logprobs, False)
        ids, hints = await asyncio.to_thread(server.chat_prompt, body)
        bridge = _Bridge(server.scheduler, request)
        req = server.submit(bridge, [ids], params, body.n, [hints])
        choices = [_Choice() for _ in range(req.num_rows)]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(
            index: int,
            delta: dict[str, Any],
            logprobs: Any = None,
            finish_reason: str | None = None,
        ) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": config.model_name,
                "choices": [
                    {
                        "index": index,
                        "delta": delta,
                        "logprobs": logprobs,
                        "finish_reason": finish_reason,
                    }
                ],
            }

        if body.stream:

            async def stream() -> AsyncIterator[str]:
                for i in range(req.num_rows):
                    yield _sse(chunk(i, {"role": "assistant", "content": ""}))
                last = None
                async for ev in bridge.events():
                    if ev.kind == "error":
                        yield _sse(_event_error(ev).body())
                        return
                    if ev.kind == "token":
                        lp = (
                            {"content": [server.chat_logprob(ev.logprob)]}
                            if ev.logprob is not None
                            else None
                        )
                        if ev.text or lp is not None:
                            yield _sse(chunk(ev.index, {"content": ev.text}, lp))
                    elif ev.kind == "done":
                        c = choices[ev.index]
                        c.done(ev)
                        last = chunk(ev.index, {}, None, ev.finish_reason)
                        if any(x.finish_reason is None for x in choices):
                            yield _sse(last)
                            last = None
                for line in server.stream_end(body, req, choices, last, chunk(0, {})):
                    yield line

            return StreamingResponse(
                stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )

        async for ev in bridge.events():
            if ev.kind == "error":
                raise _event_error(ev)
            c = choices[ev.index]
            if ev.kind == "token":
                c.text.append(ev.text)
                if ev.logprob is not None:
                    c.logprobs.append(server.chat_logprob(ev.logprob))
            elif ev.kind == "done":
                c.done(ev)
        if bridge.disconnected:
            return JSONResponse(error_body("client disconnected"), status_code=499)
        out = [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": {"content": c.logprobs} if body.logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ]
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": config.model_name,
            "choices": out,
            "usage": server.usage(req, choices),
        }

    return app
