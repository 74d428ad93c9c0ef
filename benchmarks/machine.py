"""The machine a benchmark runs on: what it has (cores, memory, measured memory
bandwidth and matmul FLOP/s) and what a measurement will need (peak memory
estimated from the config, checked before anything is allocated).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.peers import GemmaShape
from rgemma.cli.bench import measure_bandwidth
from rgemma.config import BlockType
from rgemma.errors import RgemmaError

GiB = 1024**3
#: Implementations: rgemma, official torch, HF RecurrentGemma, HF Gemma (baseline).
IMPLS = ("rgemma", "official", "hf", "gemma")
IMPL_LABELS = {
    "rgemma": "rgemma",
    "official": "official recurrentgemma.torch",
    "hf": "HF RecurrentGemma",
    "gemma": "HF Gemma (transformer baseline)",
    "rgemma-int8": "rgemma int8",
    "rgemma-compiled": "rgemma, compiled decode step",
}
#: Resident memory of the interpreter, torch and the implementation's libraries
#: before any model (measured: 0.22 GiB rgemma; about 0.4 GiB with jax, imported by
#: the official package, or transformers), with a margin.
RUNTIME_OVERHEAD = {"rgemma": 0.4 * GiB, "official": 0.7 * GiB, "hf": 0.7 * GiB, "gemma": 0.7 * GiB}
#: Memory left to the rest of the machine when deciding what fits.
DEFAULT_RESERVE = 1.5 * GiB


class BenchMemoryError(RgemmaError):
    """A benchmark shape does not fit in the machine's available memory."""


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}[dtype]


# ----------------------------------------------------------------------------------
# Machine
# ----------------------------------------------------------------------------------
def summarize(times: Sequence[float]) -> dict[str, Any]:
    """Median and spread of a list of durations (seconds): median, min, max, the
    quartiles (q1, q3; equal to min/max below 4 runs) and n."""
    xs = sorted(float(t) for t in times)
    if not xs:
        raise ValueError("summarize needs at least one time")
    if len(xs) >= 4:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1, q3 = xs[0], xs[-1]
    return {
        "median": statistics.median(xs),
        "min": xs[0],
        "max": xs[-1],
        "q1": q1,
        "q3": q3,
        "n": len(xs),
        "runs": xs,
    }


def throughput(tokens: float, times: Sequence[float], cpu: Sequence[float]) -> dict[str, Any]:
    """A benchmark point's record from its runs: `tokens` processed per run, the wall
    `times` and process CPU `cpu` seconds of each run.

    Returns `seconds` and `cpu_seconds` (`summarize`), tokens/s at the median run
    (`tokens_per_s`) and at the slowest / fastest runs (`tokens_per_s_min` /
    `_max`), and tokens per CPU-second at the median (`tokens_per_cpu_s`).
    """
    s, c = summarize(times), summarize(cpu)
    return {
        "seconds": s,
        "tokens_per_s": tokens / s["median"],
        "tokens_per_s_min": tokens / s["max"],
        "tokens_per_s_max": tokens / s["min"],
        "cpu_seconds": c,
        "tokens_per_cpu_s": tokens / c["median"],
    }


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


def available_memory() -> int:
    """Bytes of memory available to a new process (psutil, else /proc/meminfo)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        info = _meminfo()
        if "MemAvailable" in info:
            return info["MemAvailable"]
        return info.get("MemFree", 0) + info.get("Cached", 0)


def total_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return _meminfo().get("MemTotal", 0)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: CPU flags that decide which matmul kernels are fast (Linux /proc/cpuinfo names).
FEATURE_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def cpu_features() -> dict[str, Any]:
    """The CPU's vendor and the flags of `FEATURE_FLAGS` it has (from /proc/cpuinfo),
    and the instruction set torch's CPU kernels dispatch to."""
    vendor, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and vendor is None:
                    vendor = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    try:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError):
        capability = None
    return {
        "vendor": vendor,
        "flags": [f for f in FEATURE_FLAGS if f in flags],
        "torch_cpu_capability": capability,
    }


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for pkg in ("torch", "transformers", "recurrentgemma", "rgemma"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def measure_machine(
    *, bandwidth_mib: int = 512, matmul_n: int = 2048, repeats: int = 5, threads: int | None = None
) -> dict[str, Any]:
    """Describe the machine and measure what bounds inference speed.

    Args:
        bandwidth_mib: size of each buffer of the bandwidth test (MiB): far larger
            than the caches.
        matmul_n: the matmul test multiplies two (n, n) matrices.
        repeats: runs of each test (the median is reported; one warm-up first).
        threads: torch threads (default: torch's current setting).

    Returns:
        dict with cores (logical, physical), cpu, memory total / available (bytes),
        torch version and threads, `bandwidth_copy_gbs` (a large tensor copy: bytes
        read + written / s, median), `bandwidth_read_gbs` (a large tensor sum: bytes
        read / s), `bandwidth_gbs` (the larger: the limit used for efficiency),
        `matmul_fp32_gflops` and `matmul_bf16_gflops` (median, all threads),
        `matmul_{fp32,bf16}_gflops_per_core` (1 thread, process CPU time, best run:
        unaffected by other jobs), `cpu_features` (vendor, flags such as avx512_bf16
        and amx_bf16, torch's CPU dispatch level), load average.
    """
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    runs = measure_bandwidth(bandwidth_mib, repeats)
    copy, read = summarize(runs["copy"]), summarize(runs["read"])

    def gflops(dtype) -> dict[str, Any] | None:
        try:
            a = torch.randn(matmul_n, matmul_n).to(dtype)
            b = torch.randn(matmul_n, matmul_n).to(dtype)
            ts = []
            for i in range(repeats + 1):
                t0 = time.perf_counter()
                a @ b
                if i:
                    ts.append(time.perf_counter() - t0)
            return summarize([2 * matmul_n**3 / t / 1e9 for t in ts])
        except RuntimeError:
            return None

    fp32, bf16 = gflops(torch.float32), gflops(torch.bfloat16)

    def gflops_per_core(dtype) -> float | None:
        # 1 thread, process CPU time (other jobs on the machine do not inflate it);
        # the best of the runs.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            a = torch.randn(matmul_n, matmul_n).to(dtype)
            b = torch.randn(matmul_n, matmul_n).to(dtype)
            a @ b
            best = float("inf")
            for _ in range(max(2, repeats // 2)):
                c0 = time.process_time()
                a @ b
                best = min(best, time.process_time() - c0)
            return 2 * matmul_n**3 / max(best, 1e-9) / 1e9
        except RuntimeError:
            return None
        finally:
            torch.set_num_threads(threads)

    fp32_core, bf16_core = gflops_per_core(torch.float32), gflops_per_core(torch.bfloat16)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": _cpu_model(),
        "cpu_features": cpu_features(),
        "cores_logical": os.cpu_count(),
        "cores_physical": physical,
        "memory_total_bytes": total_memory(),
        "memory_available_bytes": available_memory(),
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "bandwidth_copy_gbs": copy["median"],
        "bandwidth_copy": copy,
        "bandwidth_read_gbs": read["median"],
        "bandwidth_read": read,
        "bandwidth_gbs": max(copy["median"], read["median"]),
        "bandwidth_buffer_mib": bandwidth_mib,
        "matmul_n": matmul_n,
        "matmul_fp32_gflops": fp32["median"] if fp32 else None,
        "matmul_fp32": fp32,
        "matmul_bf16_gflops": bf16["median"] if bf16 else None,
        "matmul_bf16": bf16,
        "matmul_fp32_gflops_per_core": fp32_core,
        "matmul_bf16_gflops_per_core": bf16_core,
        "load_average": load,
    }


# Memory estimates
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class MemoryEstimate:
    """Estimated peak resident memory (bytes) of one measurement, by part."""

    impl: str
    dtype: str
    kind: str
    weights: int
    build: int  # extra at construction (conversion copies), freed before measuring
    activations: int
    cache: int
    runtime: int

    @property
    def total(self) -> int:
        return self.runtime + self.weights + max(self.build, self.activations + self.cache)

    def describe(self) -> str:
        return (
            f"~{self.total / GiB:.1f} GiB (weights {self.weights / GiB:.2f}, "
            f"activations {self.activations / GiB:.2f}, cache {self.cache / GiB:.2f}, "
            f"build {self.build / GiB:.2f}, runtime {self.runtime / GiB:.2f})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total": self.total}


def weight_bytes(config, dtype: str, impl: str) -> int:
    """Bytes of the parameters (tied embedding counted once). For "rgemma-int8":
    int8 linears and embedding with float32 scales, everything else float32."""
    if isinstance(config, GemmaShape):
        return config.num_parameters() * _itemsize(dtype)
    n = config.num_parameters()
    if impl != "rgemma-int8":
        return n * _itemsize(dtype)
    d, e, m = config.width, config.lru_width, config.mlp_expanded_width
    hd, v = config.head_dim, config.vocab_size
    quant = v * d  # embedding
    rows = v
    for bt in config.block_types:
        quant += 3 * d * m
        rows += 2 * m + d
        if bt == BlockType.RECURRENT:
            quant += 3 * d * e
            rows += 2 * e + d
        else:
            quant += 2 * d * d + 2 * d * hd
            rows += 2 * d + 2 * hd
    return quant + 4 * (n - quant) + 4 * rows


def _attn_layers(config) -> int:
    return sum(bt == BlockType.ATTENTION for bt in config.block_types)


def estimate_memory(
    config,
    dtype: str = "bfloat16",
    impl: str = "rgemma",
    *,
    kind: str = "load",
    length: int = 0,
    batch: int = 1,
    chunk_size: int = 1024,
) -> MemoryEstimate:
    """Estimate the peak resident memory of one benchmark measurement.

    Args:
        config: a `GriffinConfig` (impl rgemma, rgemma-int8, official, hf) or a
            `GemmaShape` (impl gemma).
        dtype: parameter dtype name ("float32", "bfloat16").
        impl: "rgemma", "rgemma-int8", "official", "hf" or "gemma".
        kind: "load" (the model only), "prefill" (a `length`-token prompt) or
            "decode" (one step at position `length`).
        length: prompt length, or decode position.
        batch: rows.
        chunk_size: rgemma's prefill chunk (its activations are bounded by it).

    Returns:
        A `MemoryEstimate`; `.total` is the number compared with what is available.
        The estimates follow each implementation's code: the official attention builds
        a (T x T) mask and per-head float32 logits for the whole prompt; HF builds a
        (T x T) mask; rgemma prefills in chunks; Gemma's KV cache grows with the
        position. They are deliberately a little high.
    """
    it = _itemsize(dtype)
    b, T = batch, max(int(length), 0)
    runtime = int(RUNTIME_OVERHEAD.get(impl.removesuffix("-int8"), GiB))
    if isinstance(config, GemmaShape):
        g = config
        weights = weight_bytes(g, dtype, impl)
        kv_per_tok = 2 * g.num_layers * g.num_kv_heads * g.head_dim * it
        logits = b * g.vocab_size * 4 * 2
        if kind == "prefill":
            act = (
                b
                * T
                * (3 * g.intermediate_size + 8 * g.hidden_size + 2 * g.num_heads * g.head_dim)
                * 4
            )
            act += b * T * T  # boolean causal mask, if one is built
            cache = b * T * kv_per_tok
        elif kind == "decode":
            act = logits + b * g.num_heads * T * 4 * 2
            cache = 2 * b * (T + 1) * kv_per_tok  # the cache and the copy `cat` makes
        else:
            act, cache = 0, 0
        return MemoryEstimate(impl, dtype, kind, weights, 0, act + logits, cache, runtime)

    cfg = config
    d, e, m, v = cfg.width, cfg.lru_width, cfg.mlp_expanded_width, cfg.vocab_size
    h, hd, w = cfg.num_heads, cfg.head_dim, cfg.attention_window_size
    weights = weight_bytes(cfg, dtype, impl)
    state = b * (
        _attn_layers(cfg) * 2 * w * (hd * it + 4)
        + (cfg.num_layers - _attn_layers(cfg)) * (e * 4 + 3 * e * it)
    )
    logits = b * v * 4 * 2
    # Live activations of one layer per token: MLP and projections in the dtype, the
    # RG-LRU's gates and recurrence in float32.
    per_token = (3 * m + 8 * d + 6 * e) * it + 6 * e * 4
    build = 0
    if impl == "hf":
        build = 2 * d * m * it  # one layer's converted up-projection
    elif impl == "rgemma-int8":
        # quantize(): the model in float32, plus the embedding's float32 temporaries.
        build = weight_bytes(cfg, "float32", "rgemma") - weights + 3 * v * d * 4
    if kind == "prefill":
        if impl in ("rgemma", "rgemma-int8"):
            c = min(T, chunk_size)
            act = b * c * per_token + b * c * h * (w + c) * (8 + it) + logits
        elif impl == "official":
            # (b, T, T) bool mask + (b, h, T, T) logits: einsum output and its copy in
            # the dtype, masked float32 logits, softmax (measured: 16 h + 1 bytes per
            # T^2 in float32).
            act = b * T * per_token + b * T * T + b * h * T * T * (2 * it + 8) + logits
        else:  # hf: (b, 1, T, T) mask, SDPA over it; repeat_kv copies of K and V.
            act = b * T * per_token + b * T * T * 2 + b * T * h * hd * it * 4 + logits
        cache = state
    elif kind == "decode":
        act = logits + b * (3 * m + 8 * max(d, e)) * 4
        cache = 2 * state
    else:
        act, cache = 0, 0
    return MemoryEstimate(impl, dtype, kind, weights, build, act, cache, runtime)


def check_memory(
    config,
    dtype: str = "bfloat16",
    impl: str = "rgemma",
    *,
    kind: str = "load",
    length: int = 0,
    batch: int = 1,
    available: int | None = None,
    reserve: float = DEFAULT_RESERVE,
) -> MemoryEstimate:
    """Raise `BenchMemoryError` (an `RgemmaError`) if the measurement's estimated peak
    memory exceeds the available memory less `reserve`; else return the estimate.

    Nothing is allocated: the estimate comes from the config alone. `available`
    defaults to the machine's available memory (psutil or /proc/meminfo).
    """
    est = estimate_memory(config, dtype, impl, kind=kind, length=length, batch=batch)
    avail = available_memory() if available is None else int(available)
    if est.total > avail - reserve:
        what = {
            "load": "loading the model",
            "prefill": f"prefill of {length:,} tokens (batch {batch})",
            "decode": f"decode at position {length:,} (batch {batch})",
        }[kind]
        raise BenchMemoryError(
            f"{IMPL_LABELS.get(impl, impl)} in {dtype}: {what} needs an estimated "
            f"{est.describe()}, but only {avail / GiB:.1f} GiB is available "
            f"(less {reserve / GiB:.1f} GiB kept free); use a smaller shape or dtype"
        )
    return est


# ----------------------------------------------------------------------------------
