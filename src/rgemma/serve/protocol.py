"""OpenAI request schemas (pydantic) and the OpenAI error body.

Types are strict (a string where a number belongs is an error, not converted).
Every field is either honoured or refused with 400 naming it; none is silently
ignored:

- honoured: the sampling fields (`temperature`, `top_p`, `presence_penalty`,
  `frequency_penalty`, `logit_bias`, `seed`, `stop`, `max_tokens` /
  `max_completion_tokens`, `n`), `stream`, `stream_options.include_usage`,
  `logprobs` / `top_logprobs` / `echo`, and the extensions vLLM also takes: `top_k`,
  `min_p`, `repetition_penalty`, `ignore_eos`, `min_tokens`;
- accepted as labels that change no output: `model` (one model is served), `user`,
  `metadata`, `service_tier`, `store: false`, `tools: []`, `tool_choice: "none"`,
  `parallel_tool_calls`, `response_format: {"type": "text"}`, `best_of` equal to `n`,
  an empty `suffix`, a message's `name`;
- refused: any other field (`unsupported_parameter`) and the values above that would
  need what this server does not do (tools, JSON mode, `store: true`, a suffix).

Reference: the OpenAI API reference for `POST /v1/completions` (legacy) and
`POST /v1/chat/completions`; vLLM's `POST /tokenize` and `POST /detokenize` for the
tokenizer endpoints (`TokenizeRequest`, `DetokenizeRequest`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "DetokenizeRequest",
    "TokenizeRequest",
    "error_body",
    "param_of",
]


class APIError(Exception):
    """An error returned as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|null)$|[\[\-]", re.IGNORECASE)


def param_of(loc: tuple) -> str | None:
    """`("body", "messages", 0, "content")` -> `"messages[0].content"` (pydantic's union
    member tags such as `"list[str]"` are dropped)."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not _TYPE_TAG.search(part):
            out += ("." if out else "") + part
    return out or None


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    """Fields shared by both endpoints."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="extension: 0 or -1 = off")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="extension")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: Literal["auto", "default"] | None = None
    store: bool | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    repetition_penalty: float | None = Field(None, gt=0.0, description="extension: 1 = off")
    ignore_eos: bool = Field(False, description="extension")
    min_tokens: int = Field(0, ge=0, description="extension")

    @model_validator(mode="after")
    def _check_common(self):
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 16:
            raise _field_error("stop", "at most 16 stop sequences are supported")
        if any(not s for s in stops):
            raise _field_error("stop", "stop sequences must be non-empty strings")
        if self.store:
            raise _field_error("store", "store is not supported (completions are not stored)")
        if self.stream_options is not None and not self.stream:
            raise _field_error("stream_options", "stream_options needs stream: true")
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise _field_error("logit_bias", f"logit_bias keys must be token ids, got {key!r}")
            if not -100.0 <= value <= 100.0:
                raise _field_error(
                    "logit_bias", f"logit_bias[{key}] must be in [-100, 100], got {value}"
                )
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class FieldError(ValueError):
    """A cross-field check failed on `param` (raised inside validators)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _field_error(param: str, message: str) -> FieldError:
    return FieldError(param, message)


class CompletionRequest(_Common):
    """`POST /v1/completions`."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.prompt, list) and not self.prompt:
            raise _field_error("prompt", "prompt must not be an empty list")
        if isinstance(self.prompt, list) and any(
            isinstance(p, list) and not p for p in self.prompt
        ):
            raise _field_error("prompt", "a token-id prompt must not be empty")
        if self.best_of is not None and self.best_of != self.n:
            raise _field_error("best_of", "best_of is not supported (only equal to n)")
        if self.suffix:
            raise _field_error("suffix", "suffix is not supported")
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "model"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self):
        for i, m in enumerate(self.messages):
            if m.content is None:
                raise _field_error(
                    f"messages[{i}].content",
                    f"messages[{i}].content is missing: every message needs a content "
                    "(a string or a list of text parts)",
                )
        if self.tools:
            raise _field_error("tools", "tools are not supported")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise _field_error(
                "response_format", "only response_format {'type': 'text'} is supported"
            )
        if self.response_format and set(self.response_format) != {"type"}:
            raise _field_error(
                "response_format", "only response_format {'type': 'text'} is supported"
            )
        if self.top_logprobs and not self.logprobs:
            raise _field_error("top_logprobs", "top_logprobs needs logprobs: true")
        return self


class TokenizeRequest(_Strict):
    """`POST /tokenize` (vLLM's fields): the ids of `prompt`, a raw prompt as
    `/v1/completions` reads it (control text such as `<bos>` becomes its id);
    `add_special_tokens` puts BOS first (vLLM's default, true)."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    """`POST /detokenize` (vLLM's fields): the text of `tokens`."""

    model: str | None = None
    tokens: list[int]
