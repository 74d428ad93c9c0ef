"""Server metrics in the Prometheus text exposition format (version 0.0.4).

A few counters, gauges and fixed-bucket histograms, thread-safe, with no
dependency: the scheduler thread and the HTTP event loop both update them, and
`GET /metrics` renders them. Memory is fixed: nothing grows with the number of
requests served (label sets are a small closed set: endpoint x status code).
"""

from __future__ import annotations

import bisect
import math
import os
import threading
from collections.abc import Callable, Sequence

__all__ = ["Counter", "Gauge", "Histogram", "Metrics", "resident_memory_bytes"]

# Latency buckets in seconds: 1 ms .. 60 s.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


def _fmt(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, esc)) + "}"


class Counter:
    """A monotonically increasing count, optionally per label values."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.label_names, k)} {_fmt(v)}" for k, v in items]


class Gauge:
    """A value read at render time from a function (or set directly)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, fn: Callable[[], float] | None = None) -> None:
        self.name, self.help, self.fn = name, help, fn
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = float(value)

    def value(self) -> float:
        return float(self.fn()) if self.fn is not None else self._value

    def render(self) -> list[str]:
        return [f"{self.name} {_fmt(self.value())}"]


class Histogram:
    """Counts of observations per upper bound (cumulative on render), sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.name, self.help = name, help
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # last: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    @property
    def sum(self) -> float:
        return self._sum

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines, acc = [], 0
        for bound, c in zip(self.buckets + (math.inf,), counts):
            acc += c
            lines.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {acc}')
        lines.append(f"{self.name}_sum {_fmt(total)}")
        lines.append(f"{self.name}_count {acc}")
        return lines


def resident_memory_bytes() -> int:
    """Resident set size of this process in bytes (0 where it cannot be read)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - psutil missing or unsupported platform
        return 0


class Metrics:
    """Every metric the server exports. The scheduler's gauges are bound by
    `bind_scheduler`; the HTTP layer counts requests per endpoint and status."""

    def __init__(self) -> None:
        p = "rgemma_"
        self.requests = Counter(
            p + "requests_total",
            "HTTP requests by endpoint and status code",
            ("endpoint", "status"),
        )
        self.requests_finished = Counter(
            p + "requests_finished_total",
            "Generation requests that ended, by how (stop, length, cancelled, error)",
            ("reason",),
        )
        self.prompt_tokens = Counter(
            p + "prompt_tokens_total", "Prompt tokens of admitted requests (tokens in)"
        )
        self.prefill_tokens = Counter(
            p + "prefill_tokens_total",
            "Prompt tokens run through the model (prompt tokens minus prefix-cache hits)",
        )
        self.generation_tokens = Counter(
            p + "generation_tokens_total", "Tokens sampled (tokens out)"
        )
        self.decode_steps = Counter(p + "decode_steps_total", "Batched decode steps run")
        self.cache_hits = Counter(
            p + "prefix_cache_hits_total", "Prompts that started from a cached prefix state"
        )
        self.cache_misses = Counter(
            p + "prefix_cache_misses_total",
            "Prompts with a cacheable prefix whose state was not cached",
        )
        self.cache_hit_tokens = Counter(
            p + "prefix_cache_hit_tokens_total", "Prompt tokens skipped thanks to the prefix cache"
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds", "From request arrival to its first sampled token"
        )
        self.itl = Histogram(
            p + "inter_token_latency_seconds", "Time between two consecutive tokens of one sequence"
        )
        self.e2e = Histogram(
            p + "request_duration_seconds",
            "From request arrival to its last token",
            LATENCY_BUCKETS + (120.0, 300.0),
        )
        self.batch_size = Histogram(
            p + "decode_batch_size", "Rows per decode step", (1, 2, 4, 8, 16, 32, 64, 128, 256)
        )
        self.gauges: list[Gauge] = [
            Gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                resident_memory_bytes,
            ),
        ]

    def bind_scheduler(self, scheduler) -> None:
        """Export the scheduler's live numbers as gauges."""
        p = "rgemma_"
        self.gauges += [
            Gauge(
                p + "active_requests",
                "Requests being prefilled or decoded",
                lambda: scheduler.num_active,
            ),
            Gauge(
                p + "queued_requests", "Requests waiting for a slot", lambda: scheduler.num_queued
            ),
            Gauge(
                p + "active_rows",
                "Sequences (rows) in the running batch",
                lambda: scheduler.num_rows,
            ),
            Gauge(
                p + "max_batch_size",
                "Most rows in the running batch",
                lambda: scheduler.max_batch_size,
            ),
            Gauge(
                p + "batch_state_bytes",
                "Bytes of the running batch's model state",
                lambda: scheduler.state_nbytes,
            ),
        ]
        cache = scheduler.prefix_cache
        if cache is not None:
            self.gauges += [
                Gauge(
                    p + "prefix_cache_bytes", "Bytes of cached prefix states", lambda: cache.nbytes
                ),
                Gauge(p + "prefix_cache_entries", "Cached prefix states", lambda: len(cache)),
                Gauge(
                    p + "prefix_cache_max_bytes",
                    "Byte budget of the prefix cache",
                    lambda: cache.max_bytes,
                ),
                Gauge(
                    p + "prefix_cache_evictions",
                    "Prefix states evicted so far",
                    lambda: cache.evictions,
                ),
            ]

    def _all(self) -> list:
        return [
            self.requests,
            self.requests_finished,
            self.prompt_tokens,
            self.prefill_tokens,
            self.generation_tokens,
            self.decode_steps,
            self.cache_hits,
            self.cache_misses,
            self.cache_hit_tokens,
            self.ttft,
            self.itl,
            self.e2e,
            self.batch_size,
            *self.gauges,
        ]

    def render(self) -> str:
        """All metrics as Prometheus text."""
        out: list[str] = []
        for m in self._all():
            out.append(f"# HELP {m.name} {m.help}")
            out.append(f"# TYPE {m.name} {m.kind}")
            out.extend(m.render())
        return "\n".join(out) + "\n"
