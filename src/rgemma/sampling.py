"""Choosing the next token: small pure functions over logits.

Every function takes logits of shape (b, v) float32 (one row per sequence) and
returns a new tensor; nothing is modified in place. `sample` chains them in the
usual order (that of HF transformers' logits warpers): temperature, then top-k,
then top-p (nucleus), then min-p, each applied to what the previous one left,
then one draw per row.

Before those, the logits processors that depend on what a row has seen (vLLM's and
HF's order: they change the logits the sampler and the greedy argmax both see):
`apply_logit_bias` (OpenAI `logit_bias`), `apply_repetition_penalty` (HF's
`RepetitionPenaltyLogitsProcessor`, CTRL paper, arXiv 1909.05858, eq. in 4.1),
`apply_presence_frequency_penalty` (OpenAI's `presence_penalty` /
`frequency_penalty`) and `suppress_tokens` (`min_tokens`, `ignore_eos`). The row
engine keeps the per-row counts they read on the model's device.

The draw is an exponential race: `argmax(p / q)` with `q ~ Exponential(1)` i.i.d.
per token, which picks token i with probability p_i (as `torch.multinomial`),
never picks a token of probability 0, and needs no host sync. With a list of
generators, row r's noise comes from generator r only, so its tokens do not depend
on the other rows of the batch.

The official samplers (`recurrentgemma/torch/sampler.py`) are greedy only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from . import defaults as _defaults
from .errors import InputError

__all__ = [
    "DEFAULT_SAMPLING",
    "SamplingParams",
    "apply_logit_bias",
    "apply_presence_frequency_penalty",
    "apply_repetition_penalty",
    "apply_temperature",
    "default_sampling",
    "greedy",
    "make_generators",
    "min_p_filter",
    "sample",
    "suppress_tokens",
    "top_k_filter",
    "top_p_filter",
    "validate_sampling",
]

Generators = torch.Generator | Sequence[torch.Generator] | None


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_sampling(
    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> None:
    """Check sampling parameters.

    Args:
        temperature: >= 0; 0 means greedy.
        top_k: int >= 0; 0 means no top-k filter.
        top_p: in (0, 1]; 1 means no nucleus filter.
        min_p: in [0, 1]; 0 means no min-p filter.

    Raises:
        InputError: a parameter is out of range or not a number (the message names
            the parameter and its value).
    """
    if not _is_number(temperature) or math.isnan(temperature) or temperature < 0:
        raise InputError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if math.isinf(temperature):
        raise InputError(f"temperature must be finite, got {temperature!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise InputError(f"top_k must be an int >= 0 (0 = no top-k filter), got {top_k!r}")
    if not _is_number(top_p) or not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {top_p!r}")
    if not _is_number(min_p) or not 0.0 <= min_p <= 1.0:
        raise InputError(f"min_p must be in [0, 1] (0 = no min-p filter), got {min_p!r}")


#: Logit bias values OpenAI accepts (a bias of -100 bans a token, +100 forces it).
LOGIT_BIAS_RANGE = (-100.0, 100.0)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one generation samples, stops and reports: made once, passed down.

    `generate`, `stream`, `ChatSession`, the CLI and the server all take one of these
    (their sampling keyword arguments are sugar that builds it); the row engine reads
    it for every row. The pattern is mlx-lm's `make_sampler` / vLLM's `SamplingParams`.
    The defaults are plain greedy decoding (the model's own argmax, reproducible);
    `default_sampling` gives the CLI's and the server's defaults for reading.

    Attributes:
        max_new_tokens: most tokens generated per row (>= 0; 0 only prefills). The
            OpenAI server maps `max_tokens` to it.
        temperature: >= 0; 0 = greedy (argmax; top_k/top_p/min_p are then ignored).
        top_k: keep the k most likely tokens (0 = all; 1 = greedy).
        top_p: nucleus mass in (0, 1] (1 = all).
        min_p: drop tokens less likely than `min_p * p_max`, in [0, 1] (0 = none).
        seed: None draws from torch's global RNG; an int gives row r of a batch its
            own generator seeded `seed + r` (see `make_generators`).
        stop: stop strings (a str is taken as one); the text is cut before the first.
        logprobs: number of alternatives to report per sampled token (None: no
            logprobs; 0: only the sampled token's). Natural log of the model's own
            distribution: before penalties, bias and temperature (as vLLM reports).
        prompt_logprobs: also report the logprob of every prompt token.
        repetition_penalty: > 0; 1 = off. Every token already in the prompt or the
            output has its logit divided by it when positive, multiplied when
            negative (HF semantics). The prompt counts: the ids this call feeds (for a
            continuation from a state, e.g. a chat turn, only the new turn's ids).
        presence_penalty: in [-2, 2] (OpenAI's range); subtracted once from the logit
            of every token the row has generated. Output only, not the prompt.
        frequency_penalty: in [-2, 2]; subtracted from a token's logit once per time
            the row has generated it. Output only.
        logit_bias: {token id: bias in [-100, 100]} added to the logits before
            sampling (stored as sorted (id, bias) pairs; ids are checked against the
            vocabulary when a row starts).
        ignore_eos: never stop on EOS / `<end_of_turn>`: those ids are suppressed
            (logit -inf) and the row runs to `max_new_tokens` or a stop string.
        min_tokens: generate at least this many tokens (<= max_new_tokens): until
            then stop ids are suppressed and stop strings are not looked for (vLLM's
            semantics).

    Raises:
        InputError: a field out of range or of the wrong type (the message names it).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise InputError(f"max_new_tokens must be an int >= 0, got {n!r}")
        validate_sampling(self.temperature, self.top_k, self.top_p, self.min_p)
        if self.seed is not None and (
            not isinstance(self.seed, int)
            or isinstance(self.seed, bool)
            or not 0 <= self.seed < 2**63
        ):  # the range torch.Generator.manual_seed keeps as given (the CLI's --seed range)
            raise InputError(f"seed must be an int in [0, 2**63) or None, got {self.seed!r}")
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, Sequence):
            stop = tuple(stop)
        else:
            raise InputError(f"stop must be a str or a list of str, got {type(stop).__name__}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise InputError(f"stop strings must be non-empty str, got {s!r}")
        object.__setattr__(self, "stop", stop)
        lp = self.logprobs
        if lp is not None and (not isinstance(lp, int) or isinstance(lp, bool) or lp < 0):
            raise InputError(f"logprobs must be None or an int >= 0, got {lp!r}")
        rp = self.repetition_penalty
        if not _is_number(rp) or not 0.0 < rp < math.inf:
            raise InputError(
                f"repetition_penalty must be a finite number > 0 (1 = off), got {rp!r}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2.0 <= v <= 2.0:
                raise InputError(f"{name} must be a number in [-2, 2] (0 = off), got {v!r}")
        object.__setattr__(self, "logit_bias", _check_logit_bias(self.logit_bias))
        if not isinstance(self.ignore_eos, bool):
            raise InputError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        m = self.min_tokens
        if not isinstance(m, int) or isinstance(m, bool) or m < 0:
            raise InputError(f"min_tokens must be an int >= 0, got {m!r}")
        if m > n:
            raise InputError(f"min_tokens ({m}) must not exceed max_new_tokens ({n})")

    @property
    def greedy(self) -> bool:
        """True when sampling is argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """True when a repetition, presence or frequency penalty is on (the engine
        then keeps the row's token counts)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def adjusts_logits(self) -> bool:
        """True when the logits are changed before sampling: penalties or a bias."""
        return self.penalized or bool(self.logit_bias)

    @property
    def sampler_key(self) -> tuple:
        """What decides the draw from given logits (not the seed): rows with equal
        keys can be sampled in one call of `sample_rows`. ("greedy",) when greedy."""
        if self.greedy:
            return ("greedy",)
        return (self.temperature, self.top_k, self.top_p, self.min_p)

    def sample_rows(self, logits: Tensor, generator: Generators = None) -> Tensor:
        """Draw one token per row with these parameters: `sample(logits, ...)`.

        Args:
            logits: (b, v) float.
            generator: see `sample` (None, one, or one per row).

        Returns:
            (b,) int64 on the logits' device.
        """
        return sample(logits, self.temperature, self.top_k, self.top_p, self.min_p, generator)

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def make(
        cls, sampling: SamplingParams | Mapping[str, Any] | None = None, **options: Any
    ) -> SamplingParams:
        """`sampling` (or the defaults) with keyword `options` on top.

        The public functions' sampling keyword arguments go through here.

        Raises:
            InputError: an unknown option name, or an invalid value.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise InputError(
                f"unknown sampling option(s): {', '.join(unknown)}; "
                f"expected some of {', '.join(sorted(fields))}"
            )
        if sampling is None:
            return cls(**options)
        if isinstance(sampling, Mapping):
            return cls.make(None, **{**sampling, **options})
        if not isinstance(sampling, SamplingParams):
            raise InputError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        return dataclasses.replace(sampling, **options) if options else sampling


def _check_logit_bias(bias: Any) -> tuple[tuple[int, float], ...]:
    """`logit_bias` as sorted (id, bias) pairs, from a mapping or pairs; keys may be
    ints or strings of ints (OpenAI's JSON keys)."""
    if bias is None:
        return ()
    if isinstance(bias, Mapping):
        items = list(bias.items())
    elif isinstance(bias, (list, tuple)):
        items = list(bias)
    else:
        raise InputError(f"logit_bias must map token ids to numbers, got {type(bias).__name__}")
    out: dict[int, float] = {}
    lo, hi = LOGIT_BIAS_RANGE
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise InputError(f"logit_bias entries must be (token id, bias), got {item!r}")
        key, value = item
        try:
            token = int(key) if isinstance(key, str) else key
        except ValueError:
            token = None
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise InputError(f"logit_bias keys must be token ids (ints >= 0), got {key!r}")
        if not _is_number(value) or not lo <= value <= hi:
            raise InputError(f"logit_bias[{token}] must be a number in [-100, 100], got {value!r}")
        out[token] = float(value)
    return tuple(sorted(out.items()))


#: The CLI's and the server's sampling defaults, in one place (`rgemma.defaults`,
#: which says how they were chosen): temperature 0.8, top-p 0.95, repetition penalty
#: 1.1 when sampling.
DEFAULT_SAMPLING: Mapping[str, float] = _defaults.SAMPLING


def default_sampling(**given: Any) -> SamplingParams:
    """The CLI's and the server's `SamplingParams`: the fields given (None = not
    given) over `DEFAULT_SAMPLING`.

    `temperature` defaults to 0.8 and `top_p` to 0.95; the default repetition
    penalty (1.1) applies only when sampling, so an explicit `temperature=0` (or
    `top_k=1`) is the model's plain greedy output unless a penalty is given too.

    Raises:
        InputError: an unknown field or an invalid value (see `SamplingParams`).
    """
    fields = {k: v for k, v in given.items() if v is not None}
    for name, value in DEFAULT_SAMPLING.items():
        fields.setdefault(name, value)
    if "repetition_penalty" not in {k for k, v in given.items() if v is not None}:
        greedy = fields["temperature"] == 0.0 or fields.get("top_k") == 1
        if greedy:
            fields["repetition_penalty"] = 1.0
    return SamplingParams.make(None, **fields)


def greedy(logits: Tensor) -> Tensor:
    """The most likely token of each row.

    Args:
        logits: (b, v) float.

    Returns:
        (b,) int64; on ties, the lowest id (as `torch.argmax`).
    """
    return torch.argmax(logits, dim=-1)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """`logits / temperature` (temperature > 0). Returns (b, v) float32."""
    return logits.float() / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row, set the others to -inf.

    Args:
        logits: (b, v) float; k: 0 (no filter) or >= 1 (k >= v keeps everything).

    Returns:
        (b, v) float32. Ties at the k-th value are all kept.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits.float()
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (b, 1)
    return logits.float().masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability
    sums to at least p (always at least the most likely one), set the others to -inf.

    Args:
        logits: (b, v) float; p in (0, 1] (1 = no filter).

    Returns:
        (b, v) float32.
    """
    logits = logits.float()
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (b, v)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of better tokens
    drop_sorted = mass_before >= p  # the first token has mass_before 0 < p: always kept
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Min-p filter: drop tokens whose probability is below `min_p` times the
    probability of the most likely token (set their logits to -inf).

    Args:
        logits: (b, v) float; min_p in [0, 1] (0 = no filter).

    Returns:
        (b, v) float32.
    """
    logits = logits.float()
    if min_p <= 0.0:
        return logits
    # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p)
    threshold = logits.max(dim=-1, keepdim=True).values + math.log(min_p)
    return logits.masked_fill(logits < threshold, float("-inf"))


def make_generators(
    seed: int, batch_size: int, device: torch.device | str | None = None
) -> list[torch.Generator]:
    """One generator per row, row r seeded with `seed + r`.

    So row r of a batch draws the same tokens as the same prompt run alone with
    `seed + r` (up to the model's float rounding, which a batch may change).
    """
    device = torch.device(device or "cpu")
    return [torch.Generator(device=device).manual_seed(seed + r) for r in range(batch_size)]


def _exponential_noise(shape: torch.Size, device: torch.device, generator: Generators) -> Tensor:
    """(b, v) i.i.d. Exponential(1) noise, clamped away from 0."""
    if generator is None or isinstance(generator, torch.Generator):
        q = torch.empty(shape, device=device, dtype=torch.float32).exponential_(generator=generator)
    else:
        if len(generator) != shape[0]:
            raise InputError(f"got {len(generator)} generators for a batch of {shape[0]} rows")
        q = torch.empty(shape, device=device, dtype=torch.float32)
        for row, gen in enumerate(generator):
            q[row].exponential_(generator=gen)
    return q.clamp_(min=torch.finfo(torch.float32).tiny)


def sample(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    generator: Generators = None,
) -> Tensor:
    """Draw one token per row.

    Args:
        logits: (b, v) float (float32 from the model, soft-capped).
        temperature: 0 = greedy (argmax; the other parameters are then ignored).
        top_k: keep the k most likely tokens (0 = all). `top_k=1` is greedy.
        top_p: nucleus mass in (0, 1] (1 = all).
        min_p: drop tokens less likely than `min_p * p_max` (0 = none).
        generator: None (torch's global RNG), one `torch.Generator` for the whole
            batch, or a sequence of b generators, one per row (see
            `make_generators`). Generators must be on the logits' device.

    Returns:
        (b,) int64 token ids, on the logits' device.

    Raises:
        InputError: invalid parameters (see `validate_sampling`), logits not 2-D, or
            a generator list whose length is not b.
    """
    validate_sampling(temperature, top_k, top_p, min_p)
    if logits.ndim != 2:
        raise InputError(f"logits must have shape (batch, vocab), got {tuple(logits.shape)}")
    if temperature == 0.0 or top_k == 1:
        return greedy(logits)
    x = apply_temperature(logits, temperature)
    x = top_k_filter(x, top_k)
    x = top_p_filter(x, top_p)
    x = min_p_filter(x, min_p)
    probs = torch.softmax(x, dim=-1)  # (b, v); filtered tokens have probability 0
    q = _exponential_noise(probs.shape, probs.device, generator)
    return torch.argmax(probs / q, dim=-1)


def mask_beyond_vocab(logits: Tensor, vocab_size: int) -> Tensor:
    """Logits (..., v) with ids >= `vocab_size` set to -inf (a model vocabulary padded
    beyond its tokenizer's: those ids are never sampled). Returns `logits` itself when
    there is nothing to mask."""
    if logits.shape[-1] <= vocab_size:
        return logits
    logits = logits.clone()
    logits[..., vocab_size:] = float("-inf")
    return logits


# ----------------------------------------------------------------------------------
# Logits processors: what a row has seen changes its next logits
# ----------------------------------------------------------------------------------
def apply_logit_bias(logits: Tensor, bias: Tensor) -> Tensor:
    """`logits + bias` (OpenAI `logit_bias`, made dense by the caller).

    Args:
        logits: (b, v) float; bias: (b, v) or (v,) float32 (0 where none).

    Returns:
        (b, v) float32.
    """
    return logits.float() + bias


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor | float) -> Tensor:
    """Penalise tokens already seen: a positive logit is divided by `penalty`, a
    negative one multiplied (HF's `RepetitionPenaltyLogitsProcessor`; CTRL, Keskar et
    al. 2019, section 4.1). `penalty` > 1 discourages repeats, < 1 encourages them.

    Args:
        logits: (b, v) float.
        seen: (b, v) bool, True for tokens in the row's prompt or output.
        penalty: a float, or (b, 1) float32 per row (1 = no change).

    Returns:
        (b, v) float32 (-inf stays -inf).
    """
    logits = logits.float()
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def apply_presence_frequency_penalty(
    logits: Tensor, counts: Tensor, presence: Tensor | float, frequency: Tensor | float
) -> Tensor:
    """OpenAI's penalties: `logits - frequency * count - presence * (count > 0)`.

    Args:
        logits: (b, v) float.
        counts: (b, v) float32, times each token was generated by the row.
        presence, frequency: floats, or (b, 1) float32 per row (0 = off).

    Returns:
        (b, v) float32.
    """
    return logits.float() - counts * frequency - (counts > 0).float() * presence


def suppress_tokens(logits: Tensor, token_ids: Tensor, rows: Tensor | None = None) -> Tensor:
    """Set the logits of `token_ids` to -inf (never sampled), in every row or in the
    rows where `rows` is True (e.g. stop ids before `min_tokens`).

    Args:
        logits: (b, v) float; token_ids: (k,) int64; rows: (b,) bool or None.

    Returns:
        (b, v) float32, a copy.
    """
    out = logits.float().clone()
    if token_ids.numel() == 0:
        return out
    cols = out[:, token_ids]  # (b, k)
    fill = torch.full_like(cols, float("-inf"))
    if rows is not None:
        fill = torch.where(rows[:, None], fill, cols)
    out[:, token_ids] = fill
    return out
