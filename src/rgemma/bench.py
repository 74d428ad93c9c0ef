"""Benchmarks: rgemma against the official `recurrentgemma.torch`, Hugging Face's
`RecurrentGemmaForCausalLM`, and a Gemma transformer baseline (HF `GemmaForCausalLM`).

Everything runs on the same machine in the same run, on identical random weights
(each implementation gets the same official-format state_dict, converted to its own
layout); the Gemma baseline gets random weights of the matched shape. Every
measurement runs in a worker subprocess, so that

* its peak resident memory can be read (Linux `VmHWM`, reset before each point
  through `/proc/self/clear_refs`; `ru_maxrss` where that is not available);
* an out-of-memory failure, a crash or a timeout is recorded, not fatal: the worker
  also caps its address space (`RLIMIT_AS`) at what the machine has available, so
  an allocation too large fails in the worker (recorded as "oom") instead of waking
  the kernel's OOM killer;
* shapes that cannot fit are refused *before* anything is allocated, from an
  estimate made from the config (`estimate_memory`, `check_memory`).

Sections (each a table, a plot and a part of `results.json`):

1. prefill: tokens/s and peak resident memory against prompt length;
2. decode: tokens/s against position, batch 1 and 8; and the paper's figure
   (Griffin, arXiv 2402.19427, figure 1b / RecurrentGemma figure 2): time to sample N
   tokens after a 2k prompt, integrated over the measured per-step times;
3. efficiency: weight bytes read per decode step / time per step, as a share of
   the measured memory bandwidth (the limit for batch-1 decode);
4. int8: decode speed-up of `quantize(model, "int8")` and its logit error;
5. bundled: the bundled small model, rgemma against HF on the same weights, and
   int8's perplexity change on its validation text.

Decode at position P needs the state a P-token prompt leaves. By default
(`fill="synthetic"`) it is built directly, with random contents and the exact
shapes, dtypes and positions prefill would leave (rgemma / official: the fixed
window; HF Gemma: a P-token KV cache), since a decode step's cost depends on those
shapes only; `fill="prefill"` runs the real prefill (slow for long P).

Run `rgemma bench --help`, or `python benchmarks/run_all.py --quick`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import RgemmaError

__all__ = [
    "IMPLS",
    "SHAPES",
    "BenchOptions",
    "GemmaShape",
    "MemoryEstimate",
    "add_parser",
    "available_memory",
    "check_memory",
    "estimate_memory",
    "format_table",
    "measure_machine",
    "run",
    "run_benchmarks",
    "summarize",
    "write_results_md",
]

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
GiB = 1024**3
#: Resident memory of the interpreter, torch and the implementation's libraries
#: before any model (measured: 0.22 GiB rgemma; about 0.4 GiB with jax, imported by
#: the official package, or transformers), with a margin.
RUNTIME_OVERHEAD = {"rgemma": 0.4 * GiB, "official": 0.7 * GiB, "hf": 0.7 * GiB, "gemma": 0.7 * GiB}
#: Memory left to the rest of the machine when deciding what fits.
DEFAULT_RESERVE = 1.5 * GiB


class BenchMemoryError(RgemmaError):
    """A benchmark shape does not fit in the machine's available memory."""


# ----------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GemmaShape:
    """A Gemma (transformer) shape: HF `GemmaConfig` fields that matter.

    Gemma-2B: hidden 2048, 18 layers, 8 heads, 1 KV head, head dim 256, MLP 16384,
    vocabulary 256,000, tied embedding.
    """

    vocab_size: int = 256_000
    hidden_size: int = 2048
    num_layers: int = 18
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    intermediate_size: int = 16384

    def num_parameters(self) -> int:
        d, hd, m = self.hidden_size, self.head_dim, self.intermediate_size
        attn = d * self.num_heads * hd * 2 + d * self.num_kv_heads * hd * 2
        per_layer = attn + 3 * d * m + 2 * d
        return self.vocab_size * d + self.num_layers * per_layer + d

    def hf_config(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": 1 << 20,
            "hidden_activation": "gelu_pytorch_tanh",
            "tie_word_embeddings": True,
        }


def _griffin_config(name: str):
    from .config import GriffinConfig, griffin_pattern

    if name == "bench-tiny":
        # 256 wide, 3 layers (R, R, A), window 64: every code path in seconds.
        return GriffinConfig(
            vocab_size=4096,
            width=256,
            mlp_expanded_width=768,
            num_heads=2,
            lru_width=256,
            block_types=griffin_pattern(3),
            attention_window_size=64,
        )
    return GriffinConfig.preset(name)


#: shape name -> (Griffin preset, matched Gemma shape). The reduced shape keeps the
#: 2B widths with 6 of 26 layers; its Gemma baseline keeps the Gemma-2B widths with
#: 4 of 18 layers (about the same non-embedding parameters: 0.44 B against 0.47 B).
SHAPES: dict[str, tuple[str, GemmaShape]] = {
    "quick": (
        "bench-tiny",
        GemmaShape(
            vocab_size=4096,
            hidden_size=256,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            head_dim=128,
            intermediate_size=2048,
        ),
    ),
    "reduced": ("recurrentgemma-2b-6l", GemmaShape(num_layers=4)),
    "full": ("recurrentgemma-2b", GemmaShape()),
}


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


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
        `matmul_fp32_gflops` and `matmul_bf16_gflops` (median), load average.
    """
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    n = bandwidth_mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    copies, reads = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        dst.copy_(src)
        t1 = time.perf_counter()
        float(src.sum())
        t2 = time.perf_counter()
        if i:  # the first run is a warm-up (page faults)
            copies.append(t1 - t0)
            reads.append(t2 - t1)
    nbytes = n * 4
    copy = summarize([2 * nbytes / t / 1e9 for t in copies])
    read = summarize([nbytes / t / 1e9 for t in reads])
    del src, dst

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
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": _cpu_model(),
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
        "load_average": load,
    }


# ----------------------------------------------------------------------------------
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
    from .config import BlockType

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
    from .config import BlockType

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
# Models with identical random weights (worker side)
# ----------------------------------------------------------------------------------
def random_official_state_dict(config, dtype: str, seed: int = 0) -> dict[str, Any]:
    """A random state_dict with the official key names and layouts (= rgemma's).

    Deterministic in (config, dtype, seed), and built in place in the target dtype
    (no float32 temporaries), so every implementation gets the same weights.
    Matrices ~ N(0, 1/fan_in); norms and biases 0; the RG-LRU `a_param` as the
    official initialisation (a^c uniform in [0.9, 0.999]).
    """
    import torch

    from .model import Griffin

    meta = Griffin(config, device="meta", dtype=_dtype(dtype))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in meta.state_dict().items():
        t = torch.empty(p.shape, dtype=p.dtype)
        if name.endswith("a_param"):
            u = torch.rand(p.shape, generator=gen) * (0.999**2 - 0.9**2) + 0.9**2
            t.copy_(torch.log(torch.expm1(-0.5 * torch.log(u))))
        elif p.ndim == 1 or name.endswith(".b"):
            t.zero_()
        else:
            fan_in = p.shape[0] if name.endswith("conv_1d.w") else p.shape[1]
            t.normal_(0.0, fan_in**-0.5, generator=gen)
        out[name] = t
    return out


def official_config(cfg):
    """The official `recurrentgemma.torch.GriffinConfig` of a `GriffinConfig` (peers only;
    imports the official package)."""
    import recurrentgemma.torch as rg

    from .config import BlockType

    return rg.GriffinConfig(
        vocab_size=cfg.vocab_size,
        width=cfg.width,
        mlp_expanded_width=cfg.mlp_expanded_width,
        num_heads=cfg.num_heads,
        lru_width=cfg.lru_width,
        attention_window_size=cfg.attention_window_size,
        block_types=tuple(
            rg.TemporalBlockType.RECURRENT
            if b == BlockType.RECURRENT
            else rg.TemporalBlockType.ATTENTION
            for b in cfg.block_types
        ),
        embeddings_scale_by_sqrt_dim=cfg.embeddings_scale_by_sqrt_dim,
        logits_soft_cap=cfg.logits_soft_cap or 0.0,
    )


def _hf_from_official(cfg, sd: dict[str, Any]):
    """HF `RecurrentGemmaForCausalLM` holding the tensors of an official state_dict
    (converted key by key, so at most one layer's copies exist at a time)."""
    import transformers
    from transformers.initialization import no_init_weights

    from .checkpoint import griffin_to_hf_config, official_to_hf

    hf_cfg = transformers.RecurrentGemmaConfig(**griffin_to_hf_config(cfg))
    with no_init_weights():
        model = transformers.RecurrentGemmaForCausalLM(hf_cfg)
    hf_sd = {}
    for key in list(sd):
        hf_sd.update(official_to_hf({key: sd.pop(key)}))
    result = model.load_state_dict(hf_sd, strict=False, assign=True)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        raise RgemmaError(
            f"HF conversion: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as HF's checkpoints
    return model.eval()


def _gemma(shape: GemmaShape, dtype: str, seed: int):
    import torch
    import transformers
    from transformers.initialization import no_init_weights

    cfg = transformers.GemmaConfig(**shape.hf_config())
    with no_init_weights():
        model = transformers.GemmaForCausalLM(cfg)
    model.to(_dtype(dtype))
    model.lm_head.weight = model.model.embed_tokens.weight  # Gemma ties the head
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
            else:
                p.zero_()
    return model.eval()


def _tensor_bytes(tensors: Iterable[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Adapter:
    """One implementation behind a common interface (all calls under inference mode).

    `prefill(tokens)` runs a prompt (b, t) from an empty state and keeps the state;
    `start_decode(batch, position, fill)` prepares the state a `position`-token
    prompt leaves; `step()` decodes one token per row (greedy) and keeps the state.
    """

    impl = ""

    def __init__(self, model, vocab_size: int):
        self.model, self.vocab_size = model, vocab_size
        self.next = None

    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for p in list(self.model.parameters()) + list(self.model.buffers()):
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
        return total

    def state_bytes(self) -> int:
        return 0

    def reset(self) -> None:
        """Drop the decode state / cache (frees its memory)."""
        for name in ("state", "cache"):
            if hasattr(self, name):
                setattr(self, name, None)
        self.next = None

    def random_tokens(self, batch: int, length: int, seed: int = 1):
        import torch

        gen = torch.Generator().manual_seed(seed)
        return torch.randint(3, self.vocab_size, (batch, length), generator=gen)

    def start_decode(self, batch: int, position: int, fill: str = "synthetic") -> None:
        if fill == "prefill" or position < 8:
            self.prefill(self.random_tokens(batch, max(position, 1)))
        else:
            self.synthetic_state(batch, position)

    def prefill(self, tokens) -> None:
        raise NotImplementedError

    def synthetic_state(self, batch: int, position: int) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError


class RgemmaAdapter(Adapter):
    impl = "rgemma"

    def __init__(self, model):
        super().__init__(model, model.config.vocab_size)
        self.state = None

    def prefill(self, tokens) -> None:
        try:
            from .generation import prefill
        except ImportError:  # generate.py unavailable: the same chunked loop
            prefill = None
        if prefill is not None:
            logits, self.state = prefill(self.model, tokens, progress=False)
        else:
            state = None
            for s in range(0, tokens.shape[1], 1024):
                chunk = tokens[:, s : s + 1024]
                last = s + 1024 >= tokens.shape[1]
                logits, state = self.model(
                    chunk, None, state, logits="last" if last else "none", validate=False
                )
            logits, self.state = logits[:, -1], state
        self.next = logits.argmax(-1, keepdim=True)

    def synthetic_state(self, batch: int, position: int) -> None:
        import torch

        from .state import AttentionState, GriffinState, RecurrentState

        state = self.model.init_state(batch)
        blocks = []
        for s in state.blocks:
            if isinstance(s, AttentionState):
                w = s.keys.shape[1]
                pos = torch.arange(position - w, position).clamp(min=-1)
                blocks.append(
                    AttentionState(
                        torch.randn_like(s.keys),
                        torch.randn_like(s.values),
                        pos[None].expand(batch, -1).contiguous(),
                    )
                )
            else:
                blocks.append(
                    RecurrentState(torch.randn_like(s.rg_lru) * 0.1, torch.randn_like(s.conv))
                )
        self.state = GriffinState(tuple(blocks), torch.full((batch,), position))
        self.next = self.random_tokens(batch, 1)

    def step(self) -> None:
        # What generation calls per token (compiled after a "compile" task).
        logits, self.state = self.model.decode_step(self.next[:, 0], self.state)
        self.next = logits.argmax(-1, keepdim=True)

    def state_bytes(self) -> int:
        if self.state is None:
            return 0
        return self.state.nbytes()

    def logits(self, tokens):
        return self.model(tokens, validate=False)[0]


class OfficialAdapter(Adapter):
    """`recurrentgemma.torch.Griffin`, driven as its own sampler drives it: prompt
    without its last token (no logits), then the last token with the cache."""

    impl = "official"

    def __init__(self, model):
        super().__init__(model, model.config.vocab_size)
        self.cache, self.pos = None, None

    def prefill(self, tokens) -> None:
        import torch

        b, t = tokens.shape
        pos = torch.arange(t)[None].expand(b, -1)
        cache = None
        if t > 1:
            _, cache = self.model(tokens[:, :-1], pos[:, :-1], None, return_logits=False)
        logits, self.cache = self.model(tokens[:, -1:], pos[:, -1:], cache)
        self.pos = torch.full((b, 1), t)
        self.next = logits[:, -1].argmax(-1, keepdim=True)

    def synthetic_state(self, batch: int, position: int) -> None:
        import torch

        dtype = self.model.embedder.input_embedding.dtype
        cache = self.model.init_cache(batch, dtype)
        for c in cache.values():
            for t in c:
                if t.is_floating_point():
                    t.normal_()
            if hasattr(c, "num_tokens"):
                c.num_tokens.fill_(position)
        self.cache = cache
        self.pos = torch.full((batch, 1), position)
        self.next = self.random_tokens(batch, 1)

    def step(self) -> None:
        logits, self.cache = self.model(self.next, self.pos, self.cache)
        self.pos = self.pos + 1
        self.next = logits[:, -1].argmax(-1, keepdim=True)

    def state_bytes(self) -> int:
        if not self.cache:
            return 0
        return _tensor_bytes(t for c in self.cache.values() for t in c)


class HFAdapter(Adapter):
    """A HF causal LM (RecurrentGemma or Gemma) with its `DynamicCache`, called as
    `generate` calls it: explicit positions, `logits_to_keep=1`."""

    def __init__(self, model, impl: str):
        super().__init__(model, model.config.vocab_size)
        self.impl = impl
        self.cache, self.pos = None, 0

    def _new_cache(self, batch: int):
        from transformers import DynamicCache

        if hasattr(self.model, "_setup_cache") and self.impl == "hf":
            p = self.model.model.embed_tokens.weight
            self.model._setup_cache(self.model.config, batch, p.device, p.dtype)
        return DynamicCache(config=self.model.config)

    def _forward(self, tokens, start: int):
        import torch

        b, t = tokens.shape
        pos = (torch.arange(t) + start)[None].expand(b, -1)
        out = self.model(
            input_ids=tokens, position_ids=pos, cache=self.cache, use_cache=True, logits_to_keep=1
        )
        return out.logits[:, -1]

    def prefill(self, tokens) -> None:
        self.cache = self._new_cache(tokens.shape[0])
        logits = self._forward(tokens, 0)
        self.pos = tokens.shape[1]
        self.next = logits.argmax(-1, keepdim=True)

    def synthetic_state(self, batch: int, position: int) -> None:
        import torch

        # A short real prompt creates every cache layer and recurrent state; then the
        # attention layers get random keys / values of the length prefill would leave.
        self.prefill(self.random_tokens(batch, 4))
        for layer in self.cache.layers:
            keys = getattr(layer, "keys", None)
            if keys is None or not isinstance(keys, torch.Tensor) or keys.ndim != 4:
                continue
            if getattr(layer, "is_sliding", False):
                n = min(position, layer.sliding_window - 1)
                layer.cumulative_length = position
            else:
                n = position
            shape = (keys.shape[0], keys.shape[1], n, keys.shape[3])
            layer.keys = torch.randn(shape, dtype=keys.dtype)
            layer.values = torch.randn(shape, dtype=keys.dtype)
        self.pos = position
        self.next = self.random_tokens(batch, 1)

    def step(self) -> None:
        logits = self._forward(self.next, self.pos)
        self.pos += 1
        self.next = logits.argmax(-1, keepdim=True)

    def state_bytes(self) -> int:
        total = 0
        if self.cache is not None:
            for layer in self.cache.layers:
                for name in ("keys", "values"):
                    t = getattr(layer, name, None)
                    if t is not None and hasattr(t, "numel"):
                        total += t.numel() * t.element_size()
        if self.impl == "hf":
            for layer in self.model.model.layers:
                tb = layer.temporal_block
                for t in (
                    getattr(tb, "conv1d_state", None),
                    getattr(getattr(tb, "rg_lru", None), "recurrent_states", None),
                ):
                    if t is not None:
                        total += t.numel() * t.element_size()
        return total


def build_adapter(impl: str, model_spec: Mapping[str, Any], dtype: str) -> Adapter:
    """Build one implementation's model (worker side).

    model_spec: {"kind": "random", "config": GriffinConfig dict, "seed": int},
    {"kind": "path", "path": str or None (bundled)}, or {"kind": "gemma",
    "shape": GemmaShape dict, "seed": int}.
    """
    from .config import GriffinConfig

    kind = model_spec["kind"]
    if impl == "gemma":
        if kind != "gemma":
            raise RgemmaError("the Gemma baseline needs a {'kind': 'gemma'} model spec")
        return HFAdapter(
            _gemma(GemmaShape(**model_spec["shape"]), dtype, model_spec["seed"]), "gemma"
        )
    if kind == "random":
        cfg = GriffinConfig.from_dict(model_spec["config"])
        sd = random_official_state_dict(cfg, dtype, model_spec.get("seed", 0))
    elif kind == "path":
        from .checkpoint import load_model

        loaded = load_model(model_spec.get("path"), dtype=dtype)
        cfg = loaded.config
        if impl in ("rgemma", "rgemma-int8"):
            return RgemmaAdapter(loaded.eval())
        # Contiguous: rgemma keeps ffw_up.w as (2, m, d) and hands out a transposed view.
        sd = {k: v.contiguous() for k, v in loaded.state_dict().items()}
        del loaded
    else:
        raise RgemmaError(f"unknown model spec kind {kind!r}")
    if impl in ("rgemma", "rgemma-int8"):
        from .model import Griffin

        model = Griffin(cfg, device="meta", dtype=_dtype(dtype))
        model.load_state_dict(sd, strict=True, assign=True)
        return RgemmaAdapter(model.eval())
    if impl == "official":
        import recurrentgemma.torch as rg

        model = rg.Griffin(
            official_config(cfg), gradient_checkpointing=False, device="meta", dtype=_dtype(dtype)
        )
        model.load_state_dict(sd, strict=True, assign=True)
        return OfficialAdapter(model.eval())
    if impl == "hf":
        return HFAdapter(_hf_from_official(cfg, sd), "hf")
    raise RgemmaError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")


# ----------------------------------------------------------------------------------
# Worker process
# ----------------------------------------------------------------------------------
def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss() -> int:
    value = _proc_status("VmRSS")
    if value is not None:
        return value

    return _maxrss()


def _maxrss() -> int:
    """Peak RSS of this process in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    import resource

    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def _reset_peak() -> bool:
    """Free what can be freed and reset the peak-RSS mark; False if not supported."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    value = _proc_status("VmHWM")
    if value is not None:
        return value

    return _maxrss()


def _limit_address_space(mem_limit: int | None) -> int | None:
    """Cap the address space so that the resident size can grow by at most what is
    left of `mem_limit`: an allocation beyond fails here with an error, instead of
    the kernel's OOM killer picking a process."""
    if not mem_limit:
        return None
    try:
        import resource

        vm = _proc_status("VmSize")
        if vm is None:
            return None
        headroom = mem_limit - _rss()
        limit = vm + max(headroom, 0)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        return limit
    except (ImportError, ValueError, OSError):
        return None


def _predict_seconds(history: Sequence[tuple[float, float]], x: float) -> float | None:
    """Extrapolate a duration at size x from (size, seconds) of earlier points, by the
    log-log slope of the last two (clamped to [1, 2]), or linearly from one."""
    pts = sorted(p for p in history if p[0] > 0 and p[1] > 0)
    below = [p for p in pts if p[0] <= x]
    if not below:
        return None
    x1, t1 = below[-1]
    slope = 1.0
    if len(below) >= 2:
        x0, t0 = below[-2]
        if x1 > x0:
            slope = min(2.0, max(1.0, math.log(t1 / t0) / math.log(x1 / x0)))
    return t1 * (x / x1) ** slope


def _is_oom(err: BaseException) -> bool:
    msg = str(err).lower()
    return (
        isinstance(err, MemoryError)
        or "can't allocate memory" in msg
        or "out of memory" in msg
        or "cannot allocate memory" in msg
    )


class _Worker:
    def __init__(self, job: Mapping[str, Any], out: Any):
        self.job, self.out = job, out
        self.budget = float(job.get("budget_s") or 60.0)  # skip a point predicted longer
        self.target = float(job.get("target_s") or self.budget / 3)  # stop repeating after
        self.history: dict[str, list[tuple[float, float]]] = {
            k: [tuple(p) for p in v] for k, v in job.get("history", {}).items()
        }
        self.adapter: Adapter | None = None
        self.failed_prefill: dict[int, int] = {}  # batch -> shortest failed length

    def emit(self, record: Mapping[str, Any]) -> None:
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()

    def run(self) -> None:
        import torch

        if self.job.get("threads"):
            torch.set_num_threads(int(self.job["threads"]))
        torch.manual_seed(0)
        rss_base = _rss()
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.adapter = build_adapter(self.job["impl"], self.job["model"], self.job["dtype"])
        build_s = time.perf_counter() - t0
        _reset_peak()
        limit = _limit_address_space(self.job.get("mem_limit"))
        self.emit(
            {
                "event": "ready",
                "rss_base": rss_base,
                "rss_model": _rss(),
                "build_s": build_s,
                "weight_bytes": self.adapter.weight_bytes(),
                "threads": torch.get_num_threads(),
                "address_space_limit": limit,
                "attn_implementation": getattr(
                    getattr(self.adapter.model, "config", None), "_attn_implementation", None
                ),
            }
        )
        for task in self.job["tasks"]:
            self.emit({"event": "start", "id": task["id"], "time": time.time()})
            scoped = _reset_peak()
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    result = getattr(self, "_" + task["kind"])(task)
                status = result.pop("status", "ok")
            except Exception as err:  # noqa: BLE001 (recorded, not fatal: the next task runs)
                status = "oom" if _is_oom(err) else "error"
                result = {"error": f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"}
                if task["kind"] == "prefill":
                    b = task.get("batch", 1)
                    self.failed_prefill[b] = min(
                        self.failed_prefill.get(b, task["length"]), task["length"]
                    )
            result.update(
                status=status,
                id=task["id"],
                wall_s=time.perf_counter() - t0,
                peak_rss=_peak_rss(),
                peak_rss_scope="point" if scoped else "process",
            )
            self.emit({"event": "result", **result})
            self.adapter.reset()  # free the task's state / cache

    # -- tasks ---------------------------------------------------------------------
    def _skip_for_time(self, key: str, size: float) -> dict[str, Any] | None:
        predicted = _predict_seconds(self.history.get(key, []), size)
        if predicted is not None and predicted > self.budget:
            return {
                "status": "skipped",
                "reason": f"predicted {predicted:.0f} s for one run "
                f"> --max-seconds-per-point {self.budget:.0f}",
                "predicted_s": predicted,
            }
        return None

    def _prefill(self, task: Mapping[str, Any]) -> dict[str, Any]:
        length, batch = task["length"], task.get("batch", 1)
        key = f"prefill:{batch}"
        failed = self.failed_prefill.get(batch)
        if failed is not None and length > failed:
            return {"status": "not-run", "reason": f"prefill of {failed} failed"}
        skip = self._skip_for_time(key, length)
        if skip:
            return skip
        ad = self.adapter
        tokens = ad.random_tokens(batch, length)
        # A short warm-up (code paths, threads); then runs of the full length until
        # `repeats` runs or `target_s` seconds, whichever comes first (at least one).
        # The first full run is dropped as a warm-up too when it is short.
        ad.prefill(tokens[:, : min(length, 64)])
        times: list[float] = []
        warm = False
        max_runs = int(task.get("repeats", 3))
        while True:
            t0 = time.perf_counter()
            ad.prefill(tokens)
            dt = time.perf_counter() - t0
            if not times and not warm and dt * 3 <= self.target and max_runs > 1:
                warm = True
                self.history.setdefault(key, []).append((length, dt))
                continue
            times.append(dt)
            if len(times) >= max_runs or sum(times) >= self.target:
                break
        if not warm:
            self.history.setdefault(key, []).append((length, statistics.median(times)))
        s = summarize(times)
        return {
            "seconds": s,
            "tokens_per_s": batch * length / s["median"],
            "tokens_per_s_min": batch * length / s["max"],
            "tokens_per_s_max": batch * length / s["min"],
            "full_warmup": warm,
        }

    def _decode(self, task: Mapping[str, Any]) -> dict[str, Any]:
        position, batch = task["position"], task.get("batch", 1)
        fill = task.get("fill", "synthetic")
        ad = self.adapter
        if fill == "prefill":
            skip = self._skip_for_time(f"prefill:{batch}", position)
            if skip:
                return skip
        t0 = time.perf_counter()
        ad.start_decode(batch, position, fill)
        fill_s = time.perf_counter() - t0
        times = []
        warmup = int(task.get("warmup", 2))
        steps = int(task.get("steps", 8))
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            ad.step()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
            if len(times) >= 2 and sum(times) >= self.target:
                break
        s = summarize(times)
        return {
            "seconds": s,
            "tokens_per_s": batch / s["median"],
            "tokens_per_s_min": batch / s["max"],
            "tokens_per_s_max": batch / s["min"],
            "state_bytes": ad.state_bytes(),
            "fill": fill,
            "fill_s": fill_s,
            "weight_bytes": ad.weight_bytes(),
        }

    def _sample(self, task: Mapping[str, Any]) -> dict[str, Any]:
        """Direct measurement: prefill a prompt, then decode `new` tokens, timed."""
        prompt, new, batch = task["prompt"], task["new"], task.get("batch", 1)
        ad = self.adapter
        tokens = ad.random_tokens(batch, prompt)
        ad.prefill(tokens[:, :8])
        ad.step()  # warm-up
        t0 = time.perf_counter()
        ad.prefill(tokens)
        t1 = time.perf_counter()
        for _ in range(new):
            ad.step()
        t2 = time.perf_counter()
        return {
            "prefill_s": t1 - t0,
            "decode_s": t2 - t1,
            "total_s": t2 - t0,
            "tokens_per_s": batch * new / (t2 - t0),
        }

    def _quantize(self, task: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Turn the rgemma model into int8 in place; report the logit error on a
        random prompt against the model before."""

        from .quantization import quantize

        ad = self.adapter
        if not isinstance(ad, RgemmaAdapter):
            raise RgemmaError("only rgemma models can be quantized")
        tokens = ad.random_tokens(1, int((task or {}).get("length", 64)), seed=7)
        ref = ad.logits(tokens).float()
        quantize(ad.model, "int8")
        ad.impl = "rgemma-int8"
        _reset_peak()
        got = ad.logits(tokens).float()
        diff = (got - ref).abs()
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean()
        return {
            "max_abs_logit_diff": float(diff.max()),
            "mean_abs_logit_diff": float(diff.mean()),
            "top1_agreement": float(agree),
            "logit_std": float(ref.std()),
            "weight_bytes": ad.weight_bytes(),
            "dtype_before": str(ref.dtype),
        }

    def _compile(self, task: Mapping[str, Any]) -> dict[str, Any]:
        """`compile_decode` the rgemma model, then compile it for each batch size of
        `task["batches"]` (two warm-up steps each), so decode points time compiled
        steps only; reports the compile time."""
        from .generation import compile_decode

        ad = self.adapter
        if not isinstance(ad, RgemmaAdapter):
            raise RgemmaError("only rgemma models can be compiled")
        compile_decode(ad.model)
        ad.impl += "-compiled"
        seconds = {}
        for b in task.get("batches", [1]):
            t0 = time.perf_counter()
            ad.start_decode(b, 16, "synthetic")
            ad.step()
            ad.step()
            seconds[str(b)] = time.perf_counter() - t0
            ad.reset()
        failed = ad.model.decode_step.failed
        return {"compile_s": seconds, "failed": failed, "status": "error" if failed else "ok"}

    def _quality(self, task: Mapping[str, Any]) -> dict[str, Any]:
        """int8 against float32 on validation text: logit error and perplexity."""
        import torch

        from .quantization import quantize

        ad = self.adapter
        batches = _validation_batches(task, ad.model.config.vocab_size)
        if not batches:
            return {"status": "skipped", "reason": "no validation text"}

        def run() -> tuple[list[Any], float, int]:
            outs, nll, count = [], 0.0, 0
            for tokens, seg, targets, mask in batches:
                logits = ad.model(tokens, seg, validate=False)[0].float()
                outs.append(logits)
                lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
                nll -= float((lp * mask).sum())
                count += int(mask.sum())
            return outs, nll, count

        ref, nll_ref, count = run()
        quantize(ad.model, "int8")
        ad.impl = "rgemma-int8"
        got, nll_q, _ = run()
        diffs = [(g - r).abs()[m > 0] for g, r, (_, _, _, m) in zip(got, ref, batches)]
        alld = torch.cat([d.reshape(-1) for d in diffs])
        ppl_ref, ppl_q = math.exp(nll_ref / count), math.exp(nll_q / count)
        return {
            "tokens": count,
            "max_abs_logit_diff": float(alld.max()),
            "mean_abs_logit_diff": float(alld.mean()),
            "ppl_fp32": ppl_ref,
            "ppl_int8": ppl_q,
            "ppl_change": ppl_q - ppl_ref,
            "ppl_change_pct": 100 * (ppl_q / ppl_ref - 1),
            "weight_bytes": ad.weight_bytes(),
        }


def _validation_batches(task: Mapping[str, Any], vocab_size: int) -> list[Any]:
    """(tokens, segment_pos, targets, loss_mask) batches of the validation split of
    `task["val_paths"]`, made as `rgemma.data` makes them for training."""

    from .data import PackedDataset, read_documents, split_documents, tokenize_documents
    from .generation import find_tokenizer
    from .tokenizer import Tokenizer

    paths = [p for p in task.get("val_paths", []) if Path(p).exists()]
    if not paths:
        return []
    tok = Tokenizer(find_tokenizer(task.get("model_path")))
    docs = read_documents(paths, task.get("doc_chars", 16000))
    if task.get("held_out_files"):  # validation files: every document
        val = docs
    else:  # the training data's held-out split, as `rgemma train` makes it
        _, val = split_documents(docs, task.get("val_fraction", 0.01))
    ds = PackedDataset(
        tokenize_documents(val, tok),
        task.get("seq_len", 256),
        task.get("batch_size", 8),
        pad_id=tok.pad_id,
        shuffle=False,
        drop_last=False,
        num_epochs=1,
    )
    out, total = [], 0
    for i in range(len(ds)):
        b = ds.batch(i)
        out.append((b.tokens, b.segment_pos, b.targets, b.loss_mask))
        total += int(b.loss_mask.sum())
        if total >= task.get("max_tokens", 20000):
            break
    return out


def _worker_main(job_path: str, out_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    with open(out_path, "a", buffering=1) as out:
        _Worker(job, out).run()
    return 0


# ----------------------------------------------------------------------------------
# Parent side: running workers
# ----------------------------------------------------------------------------------
def _task_estimate(task: Mapping[str, Any], impl: str, config, dtype: str) -> MemoryEstimate:
    kind = task["kind"]
    if kind == "prefill":
        return estimate_memory(
            config, dtype, impl, kind="prefill", length=task["length"], batch=task.get("batch", 1)
        )
    if kind == "decode":
        est = estimate_memory(
            config, dtype, impl, kind="decode", length=task["position"], batch=task.get("batch", 1)
        )
        if task.get("fill") == "prefill":
            pre = estimate_memory(
                config,
                dtype,
                impl,
                kind="prefill",
                length=task["position"],
                batch=task.get("batch", 1),
            )
            est = pre if pre.total > est.total else est
        return est
    if kind == "sample":
        return estimate_memory(
            config,
            dtype,
            impl,
            kind="prefill",
            length=task["prompt"] + task["new"],
            batch=task.get("batch", 1),
        )
    if kind in ("quantize", "quality"):  # a float32 model quantized in place
        return estimate_memory(config, dtype, "rgemma-int8", kind="load")
    return estimate_memory(config, dtype, impl, kind="load")


def run_worker(
    impl: str,
    model_spec: Mapping[str, Any],
    dtype: str,
    tasks: Sequence[Mapping[str, Any]],
    *,
    config=None,
    budget_s: float = 60.0,
    target_s: float | None = None,
    threads: int | None = None,
    memory_limit: int | None = None,
    reserve: float = DEFAULT_RESERVE,
    build_timeout: float = 900.0,
    task_timeout: float | None = None,
    isolate: str = "impl",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run `tasks` for one implementation in worker subprocess(es).

    Each task first passes the memory pre-check (`check_memory` on its estimate,
    against `memory_limit` or the available memory): those that do not fit are
    recorded as "skipped" with the estimate. A worker that dies (killed, out of
    memory, timeout) has its current task recorded as failed, and a new worker runs
    the rest; after a failed prefill, longer prefills of that implementation are
    not attempted. `isolate="point"` gives each task a fresh worker.

    Returns:
        {"impl", "dtype", "workers": [ready records], "results": {task id: record}}.
    """
    results: dict[str, Any] = {}
    workers: list[dict[str, Any]] = []
    pending = []
    for task in tasks:
        if config is not None:
            est = _task_estimate(task, impl, config, dtype)
            avail = memory_limit if memory_limit is not None else available_memory()
            if est.total > avail - reserve:
                results[task["id"]] = {
                    "id": task["id"],
                    "status": "skipped-memory",
                    "estimate": est.to_dict(),
                    "reason": f"needs an estimated {est.describe()}; {avail / GiB:.1f} GiB "
                    "available",
                }
                log(
                    f"  {impl:9s} {task['id']}: skipped (memory: needs ~{est.total / GiB:.1f} "
                    f"GiB, {avail / GiB:.1f} GiB available)"
                )
                continue
            task = {**task, "estimate_bytes": est.total}
        pending.append(dict(task))
    task_timeout = task_timeout or max(120.0, 4 * budget_s + 60)
    failed_prefill_len: int | None = None
    history: dict[str, list[list[float]]] = {}
    attempts = 0
    while pending and attempts < len(tasks) + 3:
        attempts += 1
        if failed_prefill_len is not None:
            keep = []
            for t in pending:
                if t["kind"] == "prefill" and t["length"] > failed_prefill_len:
                    results[t["id"]] = {
                        "id": t["id"],
                        "status": "not-run",
                        "reason": f"prefill of {failed_prefill_len} failed",
                    }
                else:
                    keep.append(t)
            pending = keep
            if not pending:
                break
        group = pending[:1] if isolate == "point" else pending
        avail = memory_limit if memory_limit is not None else available_memory()
        job = {
            "impl": impl,
            "model": dict(model_spec),
            "dtype": dtype,
            "tasks": group,
            "budget_s": budget_s,
            "target_s": target_s,
            "threads": threads,
            "mem_limit": int(max(avail - reserve, 0)) if avail else None,
            "history": history,
        }
        done, ready, failure = _spawn(job, build_timeout, task_timeout, log)
        if ready:
            workers.append(ready)
        for rec in done:
            task = next(t for t in group if t["id"] == rec["id"])
            rec["estimate_bytes"] = task.get("estimate_bytes")
            results[rec["id"]] = rec
            _log_result(impl, rec, log)
            if rec.get("status") == "ok":
                task = next(t for t in group if t["id"] == rec["id"])
                if task["kind"] == "prefill":
                    history.setdefault(f"prefill:{task.get('batch', 1)}", []).append(
                        [task["length"], rec["seconds"]["median"]]
                    )
            elif rec.get("status") in ("oom", "killed", "timeout") and rec["id"].startswith(
                "prefill"
            ):
                task = next(t for t in group if t["id"] == rec["id"])
                failed_prefill_len = task["length"]
        finished = {rec["id"] for rec in done}
        if failure is not None:
            current = failure.get("id")
            if current is None:  # died while building the model: every task fails
                for t in group:
                    if t["id"] not in finished:
                        results[t["id"]] = {**failure, "id": t["id"]}
                log(
                    f"  {impl:9s} worker failed before its first task: "
                    f"{failure.get('status')}: {failure.get('error', '')}"
                )
                pending = []
                break
            task = next(t for t in group if t["id"] == current)
            failure["estimate_bytes"] = task.get("estimate_bytes")
            results[current] = failure
            _log_result(impl, failure, log)
            finished.add(current)
            if task["kind"] == "prefill":
                failed_prefill_len = task["length"]
        pending = [t for t in pending if t["id"] not in finished]
    return {"impl": impl, "dtype": dtype, "workers": workers, "results": results}


def _log_result(impl: str, rec: Mapping[str, Any], log: Callable[[str], None]) -> None:
    status = rec.get("status")
    if status == "ok" and "tokens_per_s" in rec:
        extra = f"{rec['tokens_per_s']:10.1f} tok/s"
        if "seconds" in rec:
            extra += f"  (n={rec['seconds']['n']})"
        extra += f"  peak {rec.get('peak_rss', 0) / GiB:.2f} GiB"
    elif status == "ok" and isinstance(rec.get("compile_s"), dict):
        extra = "compiled in " + ", ".join(
            f"{v:.1f} s at batch {b}" for b, v in rec["compile_s"].items()
        )
    elif status == "ok":
        extra = ", ".join(
            f"{k}={v:.4g}" for k, v in rec.items() if isinstance(v, float) and k not in ("wall_s",)
        )
    else:
        extra = f"{status}: {rec.get('reason') or rec.get('error') or ''}"
    log(f"  {impl:9s} {rec['id']:24s} {extra}")


def _spawn(
    job: Mapping[str, Any], build_timeout: float, task_timeout: float, log: Callable[[str], None]
) -> tuple[list[dict], dict | None, dict | None]:
    """Run one worker; return (finished task records, ready record, failure or None)."""
    with tempfile.TemporaryDirectory(prefix="rgemma-bench-") as tmp:
        job_path, out_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.jsonl")
        with open(job_path, "w") as f:
            json.dump(job, f)
        open(out_path, "w").close()
        err_path = os.path.join(tmp, "stderr.txt")
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        env.setdefault("PYTHONWARNINGS", "ignore")
        with open(err_path, "w") as err_f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "rgemma.bench", "--worker", job_path, out_path],
                stdout=subprocess.DEVNULL,
                stderr=err_f,
                env=env,
            )
            records: list[dict] = []
            ready: dict | None = None
            started_id, started_at = None, time.monotonic()
            spawn_at = time.monotonic()
            timed_out = False
            pos = 0
            while True:
                rc = proc.poll()
                with open(out_path) as f:
                    f.seek(pos)
                    chunk = f.read()
                lines = chunk.split("\n")
                pos += len(chunk) - len(lines[-1])
                for line in lines[:-1]:
                    rec = json.loads(line)
                    event = rec.pop("event")
                    if event == "ready":
                        ready = rec
                        started_at = time.monotonic()
                    elif event == "start":
                        started_id, started_at = rec["id"], time.monotonic()
                    elif event == "result":
                        records.append(rec)
                        started_id = None
                if rc is not None:
                    break
                now = time.monotonic()
                if (ready is None and now - spawn_at > build_timeout) or (
                    started_id is not None and now - started_at > task_timeout
                ):
                    proc.kill()  # our own child, by its handle
                    proc.wait()
                    timed_out = True
                    break
                time.sleep(0.2)
        with open(err_path, errors="replace") as f:
            stderr_tail = f.read()[-2000:]
    failure = None
    rc = proc.returncode
    if timed_out or rc != 0:
        if timed_out:
            status, why = (
                "timeout",
                (
                    f"no result after {task_timeout:.0f} s"
                    if ready
                    else f"model not built after {build_timeout:.0f} s"
                ),
            )
        elif rc in (-9, 137):
            status, why = "killed", "killed by SIGKILL (likely out of memory)"
        else:
            last = [ln for ln in stderr_tail.strip().splitlines() if ln.strip()]
            status = (
                "oom"
                if any(
                    s in stderr_tail.lower()
                    for s in ("can't allocate memory", "memoryerror", "out of memory")
                )
                else "crashed"
            )
            why = f"exit code {rc}: {last[-1] if last else ''}"
        failure = {
            "id": started_id,
            "status": status,
            "error": why,
            "stderr_tail": stderr_tail[-600:],
        }
    return records, ready, failure


# ----------------------------------------------------------------------------------
# Benchmark options and sections
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class BenchOptions:
    """Everything a benchmark run needs (the CLI and benchmarks/run_all.py fill it)."""

    shape: str = "quick"
    preset: str | None = None  # override the Griffin config (no Gemma baseline then)
    dtype: str = "float32"
    impls: tuple[str, ...] = IMPLS
    sections: tuple[str, ...] = ("prefill", "decode", "int8", "bundled")
    prefill_lengths: tuple[int, ...] = (32, 128, 512)
    peer_prefill_lengths: tuple[int, ...] | None = None  # default: prefill_lengths
    prefill_repeats: int = 3
    decode_positions: tuple[int, ...] = (16, 64, 256)
    batches: tuple[int, ...] = (1, 8)
    decode_steps: int = 6
    fill: str = "synthetic"
    sample_prompt: int = 64
    sample_new: tuple[int, ...] = (16, 64, 128)
    sample_direct_max: int = 64  # also measure N <= this directly (validates the integral)
    int8_position: int = 256
    int8_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    bundled_path: str | None = None  # None: the bundled model
    val_paths: tuple[str, ...] | None = None  # None: from configs/bundled.json, else data/corpus
    val_max_tokens: int = 4096
    max_seconds_per_point: float = 20.0  # skip a point whose one run is predicted longer
    target_seconds_per_point: float = 3.0  # stop repeating a point after this long
    bundled_positions: tuple[int, ...] = (16, 128)
    bundled_steps: int = 8
    threads: int | None = None
    memory_limit: int | None = None  # bytes; default: the available memory
    reserve: float = DEFAULT_RESERVE
    isolate: str = "impl"
    machine_bandwidth_mib: int = 256  # buffer size of the bandwidth test
    machine_matmul_n: int = 2048  # matrix size of the GFLOP/s test
    seed: int = 0
    out_dir: str = "benchmarks/results/quick"
    plots: bool = True
    command: str = ""

    @classmethod
    def for_shape(cls, shape: str, **overrides: Any) -> BenchOptions:
        """Defaults of a named run: "quick" (seconds), "reduced" (2B widths, 6 layers;
        ~20-25 min on 2 cores), "full" (the 2B preset)."""
        presets: dict[str, dict[str, Any]] = {
            "quick": {},
            "reduced": {
                "dtype": "bfloat16",
                "prefill_lengths": (128, 512, 2048, 8192, 32768),
                "peer_prefill_lengths": (128, 512, 2048, 8192, 32768),
                "prefill_repeats": 3,
                "decode_positions": (16, 256, 2048, 8192, 32768),
                "decode_steps": 6,
                "sample_prompt": 2048,
                "sample_new": (256, 1024, 2048, 4096, 8192),
                "sample_direct_max": 0,
                "int8_position": 2048,
                "max_seconds_per_point": 150.0,
                "target_seconds_per_point": 30.0,
                "bundled_positions": (16, 256, 2048),
                "bundled_steps": 16,
                "val_max_tokens": 20000,
                "machine_bandwidth_mib": 1024,
                "out_dir": "benchmarks/results/reduced",
            },
        }
        presets["full"] = {
            **presets["reduced"], "decode_steps": 5, "max_seconds_per_point": 300.0,
            "target_seconds_per_point": 60.0, "out_dir": "benchmarks/results/full",
        }
        if shape not in presets:
            raise RgemmaError(f"unknown shape {shape!r}; choose from {', '.join(presets)}")
        return cls(shape=shape, **{**presets[shape], **overrides})

    def griffin(self):
        return _griffin_config(self.preset or SHAPES[self.shape][0])

    def gemma(self) -> GemmaShape | None:
        if self.preset and self.preset != SHAPES[self.shape][0]:
            return None
        return SHAPES[self.shape][1]


def _decode_positions(opts: BenchOptions) -> list[int]:
    """Sweep positions plus those the sampling figure integrates over."""
    pts = set(opts.decode_positions)
    if "decode" in opts.sections:
        p0 = opts.sample_prompt
        pts.add(p0)
        for n in opts.sample_new:
            pts.add(p0 + n)
        pts.add(p0 + max(opts.sample_new) // 2)
    return sorted(pts)


def _model_spec(opts: BenchOptions, impl: str) -> dict[str, Any]:
    if impl == "gemma":
        return {"kind": "gemma", "shape": dataclasses.asdict(opts.gemma()), "seed": opts.seed}
    return {"kind": "random", "config": opts.griffin().to_dict(), "seed": opts.seed}


def _main_tasks(opts: BenchOptions, impl: str) -> list[dict[str, Any]]:
    """One implementation's prefill tasks (shortest first), then its decode tasks."""
    tasks: list[dict[str, Any]] = []
    lengths: set[int] = set()
    if "prefill" in opts.sections:
        lengths |= set(
            opts.prefill_lengths
            if impl == "rgemma"
            else (opts.peer_prefill_lengths or opts.prefill_lengths)
        )
    if "decode" in opts.sections:
        lengths.add(opts.sample_prompt)  # the sampling figure's prefill
    for n in sorted(lengths):
        tasks.append(
            {"id": f"prefill:{n}", "kind": "prefill", "length": n, "repeats": opts.prefill_repeats}
        )
    if "decode" in opts.sections:
        for b in opts.batches:
            for p in _decode_positions(opts):
                tasks.append(
                    {
                        "id": f"decode:b{b}:p{p}",
                        "kind": "decode",
                        "position": p,
                        "batch": b,
                        "steps": opts.decode_steps,
                        "fill": opts.fill,
                    }
                )
        for n in opts.sample_new:
            if n <= opts.sample_direct_max:
                tasks.append(
                    {
                        "id": f"sample:{n}",
                        "kind": "sample",
                        "prompt": opts.sample_prompt,
                        "new": n,
                        "batch": 1,
                    }
                )
    return tasks


def run_benchmarks(opts: BenchOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every requested section; return (and save to `opts.out_dir`) the results.

    Raises:
        BenchMemoryError: rgemma's model of this shape does not fit in memory (said
            before anything is allocated); peers that do not fit are skipped with a
            note.
        RgemmaError: unknown shape, implementation or section.
    """
    for impl in opts.impls:
        if impl not in IMPLS:
            raise RgemmaError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
    known = ("prefill", "decode", "int8", "bundled")
    for s in opts.sections:
        if s not in known:
            raise RgemmaError(f"unknown section {s!r}; choose from {', '.join(known)}")
    cfg, gemma = opts.griffin(), opts.gemma()
    avail = opts.memory_limit if opts.memory_limit is not None else available_memory()
    # Pre-check before anything is allocated: the model itself must fit.
    try:
        check_memory(cfg, opts.dtype, "rgemma", available=avail, reserve=opts.reserve)
    except BenchMemoryError as err:
        name = opts.preset or SHAPES[opts.shape][0]
        raise BenchMemoryError(
            f"shape {opts.shape!r} ({name}, {cfg.num_parameters():,} "
            f"parameters) does not fit: {err}"
        ) from None
    impls = []
    for impl in opts.impls:
        conf = gemma if impl == "gemma" else cfg
        if conf is None:
            log(f"note: no Gemma baseline for preset {opts.preset}")
            continue
        try:
            check_memory(conf, opts.dtype, impl, available=avail, reserve=opts.reserve)
            impls.append(impl)
        except BenchMemoryError as err:
            log(f"note: skipping {impl}: {err}")
    if not _have_peer("recurrentgemma") and "official" in impls:
        log("note: skipping official: `recurrentgemma` is not installed")
        impls.remove("official")
    if not _have_peer("transformers"):
        for impl in ("hf", "gemma"):
            if impl in impls:
                log(f"note: skipping {impl}: `transformers` is not installed")
                impls.remove(impl)

    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log("measuring the machine ...")
    machine = measure_machine(
        threads=opts.threads,
        bandwidth_mib=opts.machine_bandwidth_mib,
        matmul_n=opts.machine_matmul_n,
    )
    log(
        f"  {machine['cpu']}, {machine['cores_logical']} cores, torch "
        f"{machine['versions']['torch']} with {machine['torch_threads']} threads, "
        f"bandwidth {machine['bandwidth_gbs']:.1f} GB/s, matmul fp32 "
        f"{machine['matmul_fp32_gflops']:.0f} / bf16 {machine['matmul_bf16_gflops'] or 0:.0f}"
        f" GFLOP/s"
    )
    load = machine.get("load_average")
    if load and load[0] > 0.5 * (machine["cores_logical"] or 1):
        log(
            f"warning: the machine is busy (load average {load[0]:.1f} on "
            f"{machine['cores_logical']} cores): timings will be slow and noisy; run on an "
            "idle machine, or set --threads to the number of idle cores"
        )
    results: dict[str, Any] = {
        "command": opts.command,
        "options": _jsonable(dataclasses.asdict(opts)),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine,
        "griffin_config": cfg.to_dict(),
        "gemma_shape": dataclasses.asdict(gemma) if gemma else None,
        "weights": {
            impl: weight_bytes(gemma if impl == "gemma" else cfg, opts.dtype, impl)
            for impl in impls
        },
        "parameters": {
            "griffin": cfg.num_parameters(),
            "gemma": gemma.num_parameters() if gemma else None,
        },
    }
    t_start = time.perf_counter()
    common = {
        "budget_s": opts.max_seconds_per_point,
        "target_s": opts.target_seconds_per_point,
        "threads": opts.threads,
        "memory_limit": opts.memory_limit,
        "reserve": opts.reserve,
        "isolate": opts.isolate,
        "log": log,
    }
    if "prefill" in opts.sections or "decode" in opts.sections:
        runs = {}
        for impl in impls:
            log(f"[prefill/decode] {IMPL_LABELS[impl]} ({opts.dtype}) ...")
            conf = gemma if impl == "gemma" else cfg
            runs[impl] = run_worker(
                impl,
                _model_spec(opts, impl),
                opts.dtype,
                _main_tasks(opts, impl),
                config=conf,
                **common,
            )
        results["runs"] = runs
        results["prefill"] = _prefill_rows(runs)
        if "decode" in opts.sections:
            results["decode"] = _decode_rows(runs, opts)
            results["sampling"] = _sampling_rows(runs, opts)
            results["efficiency"] = _efficiency_rows(results["decode"], machine)
        _save_partial(results, out_dir)
    if "int8" in opts.sections:
        results["int8"] = bench_int8(opts, cfg, impls, common, log)
        _save_partial(results, out_dir)
    if "bundled" in opts.sections:
        results["bundled"] = bench_bundled(opts, common, log)
    results["elapsed_s"] = time.perf_counter() - t_start
    try:
        results["load_average_end"] = os.getloadavg()
    except OSError:
        pass
    save_results(results, out_dir, plots=opts.plots, log=log)
    return results


def _save_partial(results: Mapping[str, Any], out_dir: Path) -> None:
    """Keep what is measured so far (`results.partial.json`) in case the run stops."""
    (out_dir / "results.partial.json").write_text(json.dumps(results, indent=1, default=str))


def _have_peer(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def bench_int8(
    opts: BenchOptions,
    cfg,
    impls: Sequence[str],
    common: Mapping[str, Any],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Decode speed of int8 against float32 / bfloat16 (rgemma and HF), and int8's
    logit error on a random prompt (the random-weight model of the benchmark)."""
    p = opts.int8_position
    tasks = [
        {
            "id": f"decode:b{b}:p{p}",
            "kind": "decode",
            "position": p,
            "batch": b,
            "steps": opts.decode_steps,
            "fill": opts.fill,
        }
        for b in opts.batches
    ]
    runs: dict[str, Any] = {}
    spec = _model_spec(opts, "rgemma")
    for dtype in opts.int8_dtypes:
        for impl in ("rgemma", "hf"):
            if impl != "rgemma" and impl not in impls:
                continue
            key = f"{impl}:{dtype}"
            log(f"[int8] {IMPL_LABELS[impl]} ({dtype}) ...")
            runs[key] = run_worker(impl, spec, dtype, tasks, config=cfg, **common)
    log("[int8] rgemma int8 (quantized from float32 in the worker) ...")
    # The worker quantizes its float32 model in place as its first task, then decodes.
    qtasks = [{"id": "quantize", "kind": "quantize", "length": 64}] + tasks
    runs["rgemma-int8"] = run_worker(
        "rgemma", spec, "float32", qtasks, config=cfg, **{**common, "isolate": "impl"}
    )
    rows = []
    for key, run in runs.items():
        for b in opts.batches:
            rec = run["results"].get(f"decode:b{b}:p{p}", {})
            rows.append(
                {
                    "model": key,
                    "batch": b,
                    "position": p,
                    "status": rec.get("status"),
                    "tokens_per_s": rec.get("tokens_per_s"),
                    "ms_per_step": 1000 * rec["seconds"]["median"] if rec.get("seconds") else None,
                    "weight_bytes": rec.get("weight_bytes"),
                }
            )
    base = {(r["model"], r["batch"]): r["tokens_per_s"] for r in rows}
    for r in rows:
        q = base.get(("rgemma-int8", r["batch"]))
        r["int8_speedup"] = (q / r["tokens_per_s"]) if q and r["tokens_per_s"] else None
    quality = runs["rgemma-int8"]["results"].get("quantize", {})
    return {"rows": rows, "quality_random": quality, "runs": runs}


def _bundled_val_settings(val_paths: Sequence[str] | None) -> dict[str, Any]:
    """Validation split settings of the bundled model: configs/bundled.json's
    (train_data, val_fraction, doc_chars, seq_len) where it can be found."""
    settings: dict[str, Any] = {
        "val_paths": ["data/corpus"],
        "val_fraction": 0.01,
        "doc_chars": 16000,
        "seq_len": 256,
    }
    for cand in (
        Path("configs/bundled.json"),
        Path(__file__).resolve().parents[2] / "configs" / "bundled.json",
    ):
        if cand.is_file():
            try:
                conf = json.loads(cand.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            import glob

            root = cand.parent.parent
            paths = []
            for pat in conf.get("val_data") or conf.get("train_data") or []:
                full = pat if os.path.isabs(pat) else str(root / pat)
                paths += sorted(glob.glob(full)) or [full]
            if paths:
                settings["val_paths"] = paths
            for k in ("val_fraction", "doc_chars", "seq_len"):
                if conf.get(k) is not None:
                    settings[k] = conf[k]
            settings["config_file"] = str(cand)
            settings["held_out_files"] = bool(conf.get("val_data"))
            break
    if val_paths:
        settings["val_paths"] = list(val_paths)
        settings["held_out_files"] = True
    return settings


def bench_bundled(
    opts: BenchOptions, common: Mapping[str, Any], log: Callable[[str], None]
) -> dict[str, Any]:
    """The bundled model (or `opts.bundled_path`): decode tokens/s of rgemma against
    HF on the same weights, and int8's quality on the validation text."""
    try:
        from .checkpoint import bundled_model_path

        path = opts.bundled_path or str(bundled_model_path())
        if not Path(path).exists() or (
            opts.bundled_path is None and not (Path(path) / "rgemma_config.json").is_file()
        ):
            raise RgemmaError(f"no bundled model at {path}")
    except (ImportError, RgemmaError) as err:
        log(f"[bundled] skipped: {err}")
        return {"status": "skipped", "reason": str(err)}
    spec = {"kind": "path", "path": opts.bundled_path}
    positions = sorted(opts.bundled_positions)
    tasks = [
        {
            "id": f"decode:b{b}:p{p}",
            "kind": "decode",
            "position": p,
            "batch": b,
            "steps": opts.bundled_steps,
            "fill": "prefill",
        }
        for b in opts.batches
        for p in positions
    ]
    val = _bundled_val_settings(opts.val_paths)
    runs = {}
    for impl in ("rgemma", "hf"):
        if impl == "hf" and not _have_peer("transformers"):
            continue
        log(f"[bundled] {IMPL_LABELS[impl]} (float32) ...")
        runs[impl] = run_worker(impl, spec, "float32", tasks, **common)
    log("[bundled] rgemma compiled decode step (float32) ...")
    ctask = {"id": "compile", "kind": "compile", "batches": list(opts.batches)}
    runs["rgemma-compiled"] = run_worker(
        "rgemma", spec, "float32", [ctask] + tasks, **{**common, "isolate": "impl"}
    )
    log("[bundled] int8 quality and speed ...")
    qtask = {
        "id": "quality",
        "kind": "quality",
        "model_path": opts.bundled_path,
        "max_tokens": opts.val_max_tokens,
        **{k: v for k, v in val.items() if k != "config_file"},
    }
    # One worker: the quality task quantizes its model in place, then it decodes.
    runs["rgemma-int8"] = run_worker(
        "rgemma", spec, "float32", [qtask] + tasks, **{**common, "isolate": "impl"}
    )
    rows = []
    for impl, run in runs.items():
        for b in opts.batches:
            for p in positions:
                rec = run["results"].get(f"decode:b{b}:p{p}", {})
                rows.append(
                    {
                        "impl": impl,
                        "batch": b,
                        "position": p,
                        "status": rec.get("status"),
                        "tokens_per_s": rec.get("tokens_per_s"),
                        "seconds": rec.get("seconds"),
                    }
                )
    ref = {(r["batch"], r["position"]): r["tokens_per_s"] for r in rows if r["impl"] == "hf"}
    for r in rows:
        h = ref.get((r["batch"], r["position"]))
        r["speedup_vs_hf"] = r["tokens_per_s"] / h if h and r["tokens_per_s"] else None
    quality = runs["rgemma-int8"]["results"].get("quality", {})
    return {"path": path, "validation": val, "rows": rows, "quality": quality, "runs": runs}


# ----------------------------------------------------------------------------------
# Result tables
# ----------------------------------------------------------------------------------
def _prefill_rows(runs: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for impl, run in runs.items():
        for tid, rec in sorted(
            run["results"].items(),
            key=lambda kv: int(kv[0].split(":")[1]) if kv[0].startswith("prefill:") else 0,
        ):
            if not tid.startswith("prefill:"):
                continue
            rows.append(
                {
                    "impl": impl,
                    "length": int(tid.split(":")[1]),
                    "status": rec.get("status"),
                    "tokens_per_s": rec.get("tokens_per_s"),
                    "tokens_per_s_min": rec.get("tokens_per_s_min"),
                    "tokens_per_s_max": rec.get("tokens_per_s_max"),
                    "n": rec.get("seconds", {}).get("n"),
                    "peak_rss": rec.get("peak_rss"),
                    "note": rec.get("reason") or rec.get("error"),
                }
            )
    return rows


def _decode_rows(runs: Mapping[str, Any], opts: BenchOptions) -> list[dict[str, Any]]:
    rows = []
    for impl, run in runs.items():
        for tid, rec in run["results"].items():
            if not tid.startswith("decode:"):
                continue
            _, b, p = tid.split(":")
            rows.append(
                {
                    "impl": impl,
                    "batch": int(b[1:]),
                    "position": int(p[1:]),
                    "status": rec.get("status"),
                    "tokens_per_s": rec.get("tokens_per_s"),
                    "tokens_per_s_min": rec.get("tokens_per_s_min"),
                    "tokens_per_s_max": rec.get("tokens_per_s_max"),
                    "step_s": rec.get("seconds", {}).get("median"),
                    "n": rec.get("seconds", {}).get("n"),
                    "weight_bytes": rec.get("weight_bytes"),
                    "state_bytes": rec.get("state_bytes"),
                    "peak_rss": rec.get("peak_rss"),
                    "fill": rec.get("fill"),
                    "note": rec.get("reason") or rec.get("error"),
                }
            )
    rows.sort(key=lambda r: (IMPLS.index(r["impl"]), r["batch"], r["position"]))
    return rows


def _integrate_steps(points: Sequence[tuple[int, float]], start: int, n: int) -> float | None:
    """Seconds for decode steps at positions start .. start + n - 1, the per-step time
    linearly interpolated between measured positions (constant beyond the ends)."""
    pts = sorted(points)
    if not pts or n <= 0:
        return None if not pts else 0.0
    xs = [p for p, _ in pts]
    if start < xs[0] and start + n > xs[0] and len(pts) == 1:
        return n * pts[0][1]

    def f(x: float) -> float:
        if x <= xs[0]:
            return pts[0][1]
        if x >= xs[-1]:
            return pts[-1][1]
        for (x0, y0), (x1, y1) in itertools.pairwise(pts):
            if x0 <= x <= x1:
                return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        return pts[-1][1]

    # Trapezoid over the breakpoints inside [start, start + n].
    a, b = float(start), float(start + n)
    cuts = [a] + [x for x in xs if a < x < b] + [b]
    return sum((x1 - x0) * (f(x0) + f(x1)) / 2 for x0, x1 in itertools.pairwise(cuts))


def _sampling_rows(runs: Mapping[str, Any], opts: BenchOptions) -> list[dict[str, Any]]:
    """The paper's figure: seconds to sample N tokens after an `sample_prompt` prompt =
    prefill time + the integral of the measured per-step decode times."""
    rows = []
    p0 = opts.sample_prompt
    for impl, run in runs.items():
        res = run["results"]
        pre = res.get(f"prefill:{p0}", {})
        pre_s = pre.get("seconds", {}).get("median") if pre.get("status") == "ok" else None
        for b in opts.batches:
            pts = []
            for tid, rec in res.items():
                if tid.startswith(f"decode:b{b}:") and rec.get("status") == "ok":
                    pts.append((int(tid.split(":p")[1]), rec["seconds"]["median"]))
            near = [q for q in pts if q[0] >= p0]
            for n in opts.sample_new:
                dec = _integrate_steps(near or pts, p0, n) if pts else None
                measured_upto = max((q for q, _ in pts), default=0)
                row = {
                    "impl": impl,
                    "batch": b,
                    "prompt": p0,
                    "new": n,
                    "prefill_s": pre_s,
                    "decode_s": dec,
                    "total_s": (pre_s * b + dec if b > 1 else pre_s + dec)
                    if pre_s is not None and dec is not None
                    else None,
                    "extrapolated": p0 + n > measured_upto,
                }
                # Batched prompts are prefilled together; the prefill was measured at
                # batch 1, so scale it by b (prefill is compute-bound).
                row["tokens_per_s"] = b * n / row["total_s"] if row["total_s"] else None
                direct = res.get(f"sample:{n}") if b == 1 else None
                if direct and direct.get("status") == "ok":
                    row["direct_total_s"] = direct["total_s"]
                rows.append(row)
    return rows


def _efficiency_rows(
    decode: Sequence[Mapping[str, Any]], machine: Mapping[str, Any]
) -> list[dict[str, Any]]:
    bw = machine["bandwidth_gbs"] * 1e9
    rows = []
    for r in decode:
        if r.get("status") != "ok" or not r.get("step_s"):
            continue
        wb, sb = r["weight_bytes"] or 0, r["state_bytes"] or 0
        rate = wb / r["step_s"]
        rows.append(
            {
                "impl": r["impl"],
                "batch": r["batch"],
                "position": r["position"],
                "weight_gb": wb / 1e9,
                "state_gb": sb / 1e9,
                "step_ms": 1000 * r["step_s"],
                "weight_gbs": rate / 1e9,
                "fraction": rate / bw,
                "fraction_with_state": (wb + sb) / r["step_s"] / bw,
            }
        )
    return rows


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A plain-text table: columns aligned, numbers right-aligned."""

    def cell(x: Any) -> str:
        if x is None:
            return "-"
        if isinstance(x, float):
            if x == 0:
                return "0"
            if abs(x) >= 1000:
                return f"{x:,.0f}"
            if abs(x) >= 100:
                return f"{x:.1f}"
            if abs(x) >= 1:
                return f"{x:.2f}"
            return f"{x:.3g}"
        if isinstance(x, int):
            return f"{x:,}"
        return str(x)

    cells = [[cell(x) for x in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [
        all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) and rows
        for i in range(len(headers))
    ]

    def line(parts: Sequence[str]) -> str:
        return "  ".join(
            p.rjust(w) if numeric[i] else p.ljust(w) for i, (p, w) in enumerate(zip(parts, widths))
        ).rstrip()

    out = [title] if title else []
    out += [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _num(x: float) -> str:
    """About three significant figures, thousands as k: 0.123, 12.3, 456, 7.89k, 12.3k."""
    if x >= 1e5:
        return f"{x / 1e3:.0f}k"
    if x >= 1e4:
        return f"{x / 1e3:.1f}k"
    if x >= 1e3:
        return f"{x / 1e3:.2f}k"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def _spread(r: Mapping[str, Any]) -> str:
    lo, hi = r.get("tokens_per_s_min"), r.get("tokens_per_s_max")
    if lo is None or hi is None:
        return "-"
    return f"{_num(lo)}-{_num(hi)}"


def _load(load: Any) -> str:
    return " ".join(f"{x:.2f}" for x in load) if load else "n/a"


def _status(r: Mapping[str, Any]) -> str:
    s = r.get("status") or "-"
    if s == "ok":
        return ""
    note = r.get("note") or ""
    return f"{s}: {note}"[:90]


def tables(results: Mapping[str, Any]) -> str:
    """All result tables as plain text."""
    out = []
    m = results["machine"]
    out.append(
        f"machine: {m['cpu']}; {m['cores_logical']} logical cores; "
        f"{m['memory_total_bytes'] / GiB:.1f} GiB RAM; torch {m['versions']['torch']}, "
        f"{m['torch_threads']} threads; bandwidth {m['bandwidth_gbs']:.1f} GB/s (copy "
        f"{m['bandwidth_copy_gbs']:.1f}, read {m['bandwidth_read_gbs']:.1f}); matmul "
        f"{m['matmul_fp32_gflops']:.0f} GFLOP/s fp32, "
        f"{(m['matmul_bf16_gflops'] or 0):.0f} bf16; load average {_load(m['load_average'])}"
    )
    opts = results["options"]
    # Decode tables show the sweep's positions; those the sampling figure integrates
    # over are in results.json.
    sweep = set(opts["decode_positions"])
    out.append(
        f"shape: {opts['shape']} (Griffin {results['parameters']['griffin']:,} params"
        + (
            f", Gemma baseline {results['parameters']['gemma']:,}"
            if results["parameters"].get("gemma")
            else ""
        )
        + f"), dtype {opts['dtype']}"
    )
    if results.get("prefill"):
        rows = [
            [
                IMPL_LABELS[r["impl"]],
                r["length"],
                r["tokens_per_s"],
                _spread(r),
                r["n"],
                r["peak_rss"] / GiB if r.get("peak_rss") else None,
                _status(r),
            ]
            for r in results["prefill"]
        ]
        out.append(
            format_table(
                ["impl", "prompt", "tok/s", "min-max", "n", "peak GiB", "status"],
                rows,
                "\n1. Prefill: throughput and peak resident memory (median of n runs)",
            )
        )
    if results.get("decode"):
        rows = [
            [
                IMPL_LABELS[r["impl"]],
                r["batch"],
                r["position"],
                r["tokens_per_s"],
                _spread(r),
                r["n"],
                r["state_bytes"] / 1e6 if r.get("state_bytes") else None,
                r["peak_rss"] / GiB if r.get("peak_rss") else None,
                _status(r),
            ]
            for r in results["decode"]
            if r["position"] in sweep
        ]
        out.append(
            format_table(
                [
                    "impl",
                    "batch",
                    "position",
                    "tok/s",
                    "min-max",
                    "steps",
                    "state MB",
                    "peak GiB",
                    "status",
                ],
                rows,
                "\n2. Decode: throughput against position (median step time)",
            )
        )
    if results.get("sampling"):
        rows = [
            [
                IMPL_LABELS[r["impl"]],
                r["batch"],
                r["prompt"],
                r["new"],
                r["prefill_s"],
                r["decode_s"],
                r["total_s"],
                r["tokens_per_s"],
                r.get("direct_total_s"),
                "yes" if r["extrapolated"] else "",
            ]
            for r in results["sampling"]
        ]
        out.append(
            format_table(
                [
                    "impl",
                    "batch",
                    "prompt",
                    "N",
                    "prefill s",
                    "decode s",
                    "total s",
                    "tok/s",
                    "direct s",
                    "extrapolated",
                ],
                rows,
                "\n2b. Sampling N tokens after the prompt (the paper's figure): "
                "prefill + integral of measured step times",
            )
        )
    if results.get("efficiency"):
        rows = [
            [
                IMPL_LABELS[r["impl"]],
                r["batch"],
                r["position"],
                r["weight_gb"],
                r["step_ms"],
                r["weight_gbs"],
                r["fraction"],
                r["fraction_with_state"],
            ]
            for r in results["efficiency"]
            if r["position"] in sweep
        ]
        out.append(
            format_table(
                [
                    "impl",
                    "batch",
                    "position",
                    "weights GB",
                    "ms/step",
                    "weights GB/s",
                    "of bandwidth",
                    "incl. state",
                ],
                rows,
                f"\n3. Decode efficiency: weight bytes per step / step time, "
                f"as a fraction of the measured {m['bandwidth_gbs']:.1f} GB/s",
            )
        )
    i8 = results.get("int8")
    if i8:
        rows = [
            [
                r["model"],
                r["batch"],
                r["position"],
                r["tokens_per_s"],
                r["ms_per_step"],
                r["weight_bytes"] / 1e9 if r.get("weight_bytes") else None,
                r["int8_speedup"],
                "" if r["status"] == "ok" else r["status"],
            ]
            for r in i8["rows"]
        ]
        out.append(
            format_table(
                [
                    "model",
                    "batch",
                    "position",
                    "tok/s",
                    "ms/step",
                    "weights GB",
                    "int8 speed-up over it",
                    "status",
                ],
                rows,
                "\n4. int8 weight-only quantization: decode speed",
            )
        )
        q = i8.get("quality_random") or {}
        if q.get("status") == "ok":
            out.append(
                f"int8 logit error on the random-weight model (64 random tokens): max "
                f"{q['max_abs_logit_diff']:.4f}, mean {q['mean_abs_logit_diff']:.4f} "
                f"(logit std {q['logit_std']:.3f}); top-1 agreement "
                f"{100 * q['top1_agreement']:.1f}%"
            )
    bd = results.get("bundled")
    if bd:
        if bd.get("status") == "skipped":
            out.append(f"\n5. Bundled model: skipped ({bd['reason']})")
        else:
            rows = [
                [
                    IMPL_LABELS.get(r["impl"], r["impl"]),
                    r["batch"],
                    r["position"],
                    r["tokens_per_s"],
                    r["speedup_vs_hf"],
                    "" if r["status"] == "ok" else r["status"],
                ]
                for r in bd["rows"]
            ]
            out.append(
                format_table(
                    ["impl", "batch", "position", "tok/s", "vs HF", "status"],
                    rows,
                    f"\n5. Bundled model ({bd['path']}): decode, float32 (int8 row: rgemma int8)",
                )
            )
            comp = bd.get("runs", {}).get("rgemma-compiled", {}).get("results", {})
            comp = comp.get("compile") or {}
            if comp.get("compile_s"):
                out.append(
                    "compiled decode step: first steps (compiling) took "
                    + ", ".join(f"{v:.1f} s at batch {b}" for b, v in comp["compile_s"].items())
                    + (f"; compile FAILED ({comp['failed']}), eager" if comp.get("failed") else "")
                )
            q = bd.get("quality") or {}
            if q.get("status") == "ok":
                out.append(
                    f"int8 quality on {q['tokens']:,} validation tokens: max |logit diff| "
                    f"{q['max_abs_logit_diff']:.4f}, mean {q['mean_abs_logit_diff']:.4f}; "
                    f"perplexity {q['ppl_fp32']:.3f} (fp32) -> {q['ppl_int8']:.3f} (int8), "
                    f"{q['ppl_change']:+.4f} ({q['ppl_change_pct']:+.2f}%)"
                )
            elif q:
                out.append(f"int8 quality: {q.get('status')}: {q.get('reason') or q.get('error')}")
    out.append(f"\nelapsed: {results.get('elapsed_s', 0):.0f} s")
    return "\n".join(out)


# ----------------------------------------------------------------------------------
# Saving: JSON, tables, plots, RESULTS.md
# ----------------------------------------------------------------------------------
def save_results(
    results: Mapping[str, Any],
    out_dir: Path,
    *,
    plots: bool = True,
    log: Callable[[str], None] = print,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "results.partial.json").unlink(missing_ok=True)
    text = tables(results)
    (out_dir / "tables.txt").write_text(text + "\n")
    log("\n" + text)
    if plots:
        try:
            files = make_plots(results, out_dir)
            log(f"plots: {', '.join(str(f) for f in files)}")
        except ImportError:
            log("note: matplotlib is not installed: no plots (pip install matplotlib)")
    log(f"results: {out_dir / 'results.json'}, {out_dir / 'tables.txt'}")


def _short(n: int) -> str:
    """2048 -> "2k", 32768 -> "32k", 131072 -> "128k", 100 -> "100"."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def make_plots(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """PNG plots (matplotlib, Agg backend) of every section present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    colors = {"rgemma": "C0", "official": "C1", "hf": "C2", "gemma": "C3"}
    shape, dtype = results["options"]["shape"], results["options"]["dtype"]

    def by_impl(rows, **match):
        out: dict[str, list] = {}
        for r in rows:
            if all(r.get(k) == v for k, v in match.items()):
                out.setdefault(r["impl"], []).append(r)
        return out

    def log_ticks(ax, values):
        values = sorted({int(v) for v in values if v})
        if len(values) > 8:  # keep about 8 labels
            values = values[:: -(-len(values) // 8)]
        kept: list[int] = []
        for v in values:  # labels closer than 1.25x overlap (2000 and 2048)
            if not kept or v >= 1.25 * kept[-1]:
                kept.append(v)
        values = kept
        ax.set_xticks(values)
        ax.set_xticklabels([_short(v) for v in values], rotation=0)
        ax.minorticks_off()

    def fail_marks(ax, rows, x, impl):
        for r in rows:
            if r.get("status") not in ("ok", None):
                ax.annotate(
                    "x",
                    (r[x], 0),
                    xycoords=("data", "axes fraction"),
                    color=colors.get(impl, "k"),
                    ha="center",
                    va="bottom",
                    fontsize=12,
                )

    if results.get("prefill"):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for impl, rows in by_impl(results["prefill"]).items():
            ok = [r for r in rows if r["status"] == "ok"]
            if ok:
                axes[0].errorbar(
                    [r["length"] for r in ok],
                    [r["tokens_per_s"] for r in ok],
                    yerr=[
                        [r["tokens_per_s"] - r["tokens_per_s_min"] for r in ok],
                        [r["tokens_per_s_max"] - r["tokens_per_s"] for r in ok],
                    ],
                    marker="o",
                    label=IMPL_LABELS[impl],
                    color=colors[impl],
                    capsize=3,
                )
                axes[1].plot(
                    [r["length"] for r in ok],
                    [r["peak_rss"] / GiB for r in ok],
                    marker="o",
                    label=IMPL_LABELS[impl],
                    color=colors[impl],
                )
            fail_marks(axes[0], rows, "length", impl)
            fail_marks(axes[1], rows, "length", impl)
        for ax in axes:
            ax.set_xscale("log")
            log_ticks(ax, [r["length"] for r in results["prefill"]])
        axes[0].set(
            yscale="log",
            xlabel="prompt length (tokens)",
            ylabel="prefill tokens/s",
            title=f"Prefill throughput ({shape}, {dtype})",
        )
        axes[1].set(
            xlabel="prompt length (tokens)",
            ylabel="peak RSS (GiB)",
            title="Peak resident memory (x: failed or skipped)",
        )
        for ax in axes:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(out_dir / "prefill.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)

    if results.get("decode"):
        batches = sorted({r["batch"] for r in results["decode"]})
        fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
        for ax, b in zip(axes[0], batches):
            for impl, rows in by_impl(results["decode"], batch=b).items():
                ok = [r for r in rows if r["status"] == "ok"]
                if ok:
                    ax.errorbar(
                        [r["position"] for r in ok],
                        [r["tokens_per_s"] for r in ok],
                        yerr=[
                            [r["tokens_per_s"] - r["tokens_per_s_min"] for r in ok],
                            [r["tokens_per_s_max"] - r["tokens_per_s"] for r in ok],
                        ],
                        marker="o",
                        label=IMPL_LABELS[impl],
                        color=colors[impl],
                        capsize=3,
                    )
                fail_marks(ax, rows, "position", impl)
            ax.set_xscale("log")
            log_ticks(ax, [r["position"] for r in results["decode"]])
            ax.set(
                xlabel="position in the sequence (tokens)",
                ylabel="decode tokens/s",
                title=f"Decode, batch {b} ({shape}, {dtype})",
            )
            ax.set_ylim(bottom=0)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(out_dir / "decode.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)

    if results.get("sampling"):
        batches = sorted({r["batch"] for r in results["sampling"]})
        fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
        for ax, b in zip(axes[0], batches):
            for impl, rows in by_impl(results["sampling"], batch=b).items():
                ok = [r for r in rows if r.get("tokens_per_s")]
                if ok:
                    ax.plot(
                        [r["new"] for r in ok],
                        [r["tokens_per_s"] for r in ok],
                        marker="o",
                        label=IMPL_LABELS[impl],
                        color=colors[impl],
                    )
            p0 = results["options"]["sample_prompt"]
            ax.set_xscale("log")
            log_ticks(ax, [r["new"] for r in results["sampling"]])
            ax.set(
                xlabel=f"tokens sampled after a {_short(p0)}-token prompt",
                ylabel="sampling throughput (tokens/s)",
                title=f"Sampling throughput, batch {b}",
            )
            ax.set_ylim(bottom=0)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(out_dir / "sampling.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)

    if results.get("efficiency"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for impl, rows in by_impl(results["efficiency"], batch=1).items():
            ax.plot(
                [r["position"] for r in rows],
                [100 * r["fraction"] for r in rows],
                marker="o",
                label=IMPL_LABELS[impl],
                color=colors[impl],
            )
        ax.set_xscale("log")
        log_ticks(ax, [r["position"] for r in results["efficiency"]])
        ax.set(
            xlabel="position",
            ylabel="% of measured bandwidth",
            title=f"Batch-1 decode: weight bytes / step time "
            f"({results['machine']['bandwidth_gbs']:.1f} GB/s = 100%)",
        )
        ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(out_dir / "efficiency.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)

    for key, label_key, fname, title in (
        ("int8", "model", "int8.png", "int8 vs float32 / bfloat16: decode tok/s"),
        ("bundled", "impl", "bundled.png", "Bundled model: decode tok/s"),
    ):
        sec = results.get(key)
        if not sec or not sec.get("rows"):
            continue
        rows = [r for r in sec["rows"] if r.get("tokens_per_s")]
        if key == "bundled":
            last = max((r["position"] for r in rows), default=0)
            rows = [r for r in rows if r["position"] == last]
        batches = sorted({r["batch"] for r in rows})
        fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
        for ax, b in zip(axes[0], batches):
            sub = [r for r in rows if r["batch"] == b]
            ax.bar(
                [r[label_key] for r in sub],
                [r["tokens_per_s"] for r in sub],
                color=[f"C{i}" for i in range(len(sub))],
            )
            where = f", position {_short(sub[0]['position'])}" if sub else ""
            ax.set(ylabel="tokens/s", title=f"{title}, batch {b}{where}")
            ax.tick_params(axis="x", rotation=20)
        fig.tight_layout()
        files.append(out_dir / fname)
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


def write_results_md(
    result_dirs: Sequence[str | os.PathLike], path: str | os.PathLike, header: str = ""
) -> Path:
    """Write RESULTS.md from the `results.json` of each directory that has one: the
    command, the machine, every table and links to the plots.

    The generated part sits between two HTML comments (`GENERATED_BEGIN` /
    `GENERATED_END`); when `path` already has them, only that part is replaced and
    the hand-written text before and after it (summaries, other benchmarks) is kept.
    """
    path = Path(path)
    before = after = None
    if path.is_file():
        old = path.read_text()
        if GENERATED_BEGIN in old and GENERATED_END in old.split(GENERATED_BEGIN, 1)[1]:
            before, rest = old.split(GENERATED_BEGIN, 1)
            after = rest.split(GENERATED_END, 1)[1]
    parts = [
        header
        or "# Benchmark results\n\nGenerated by `rgemma bench` / "
        "`benchmarks/run_all.py`; see benchmarks/README.md for what each number is.\n"
    ] if before is None else []
    for d in result_dirs:
        d = Path(d)
        f = d / "results.json"
        if not f.is_file():
            continue
        res = json.loads(f.read_text())
        m = res["machine"]
        rel = os.path.relpath(d, path.parent)
        parts.append(f"## {res['options']['shape']} shape ({res['options']['dtype']})\n")
        parts.append(
            f"Command: `{res.get('command') or '(library call)'}`  \n"
            f"Started {res.get('started')}, took {res.get('elapsed_s', 0) / 60:.1f} min.\n"
        )
        parts.append(
            f"Machine: {m['cpu']}, {m['cores_logical']} logical cores "
            f"({m.get('cores_physical')} physical), {m['memory_total_bytes'] / GiB:.1f} GiB "
            f"RAM; {m['platform']}; Python {m['python']}; "
            + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
            + f"; torch threads {m['torch_threads']}. Measured: memory bandwidth "
            f"{m['bandwidth_gbs']:.1f} GB/s (copy {m['bandwidth_copy_gbs']:.1f}, read "
            f"{m['bandwidth_read_gbs']:.1f}), matmul {m['matmul_fp32_gflops']:.0f} GFLOP/s "
            f"fp32 / {(m['matmul_bf16_gflops'] or 0):.0f} bf16; load average at start "
            f"{_load(m['load_average'])}.\n"
        )
        parts.append("```\n" + tables(res) + "\n```\n")
        pngs = sorted(p.name for p in d.glob("*.png"))
        parts += [f"![{p}]({rel}/{p})\n" for p in pngs]
    generated = GENERATED_BEGIN + "\n" + "\n".join(parts) + GENERATED_END
    if before is None:
        path.write_text(generated + "\n")
    else:
        path.write_text(before + generated + after)
    return path


GENERATED_BEGIN = "<!-- rgemma bench: generated tables (rewritten by each run) -->"
GENERATED_END = "<!-- rgemma bench: end of generated tables -->"


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------
EPILOG = """\
examples:
  rgemma bench --shape quick                      # tiny shapes, about a minute
  rgemma bench --shape reduced                    # 2B widths, 6 layers (~20-25 min, 2 cores)
  rgemma bench --shape full --impls rgemma,gemma  # the 2B preset
  rgemma bench --shape reduced --sections decode --decode-positions 16,2048,32768

Shapes that do not fit in the available memory are refused before anything is
allocated (rgemma), or skipped with the estimate (peers, long prompts).
Results: OUT/results.json, OUT/tables.txt, OUT/*.png (and RESULTS.md with
--results-md PATH).
"""


def _ints(text: str) -> tuple[int, ...]:
    try:
        out = []
        for x in (x.strip() for x in text.split(",")):
            if x:  # "2k" = 2,048 tokens (as the tables print it)
                out.append(int(x[:-1]) * 1024 if x[-1] in "kK" else int(x))
        return tuple(out)
    except ValueError:
        raise RgemmaError(f"expected a comma-separated list of integers, got {text!r}") from None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `rgemma bench` to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark rgemma against the official, HF and Gemma implementations",
        description=__doc__.split("\n\n")[0] + "\n\nSee the module docstring of rgemma.bench.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.add_argument("--results-md", metavar="PATH", help="also write a RESULTS.md there")
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="quick",
        help="quick: tiny; reduced: 2B widths, 6 layers; full: the 2B preset",
    )
    p.add_argument(
        "--preset",
        help="any GriffinConfig preset instead of the shape's "
        "(no Gemma baseline unless it is the shape's)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="parameter dtype (default: float32 quick, bfloat16 otherwise)",
    )
    p.add_argument("--impls", help=f"comma-separated, from {','.join(IMPLS)} (default: all)")
    p.add_argument(
        "--sections", help="comma-separated, from prefill,decode,int8,bundled (default: all)"
    )
    p.add_argument(
        "--prefill-lengths",
        type=_ints,
        metavar="L,..",
        help="rgemma prompt lengths (e.g. 128,512,2k,8k,32k)",
    )
    p.add_argument(
        "--peer-prefill-lengths",
        type=_ints,
        metavar="L,..",
        help="prompt lengths of the other implementations",
    )
    p.add_argument("--decode-positions", type=_ints, metavar="P,..")
    p.add_argument("--batches", type=_ints, metavar="B,..", help="decode batch sizes")
    p.add_argument("--decode-steps", type=int, metavar="N", help="timed decode steps per point")
    p.add_argument("--repeats", type=int, metavar="N", help="prefill runs per point (at most)")
    p.add_argument(
        "--sample-prompt",
        type=int,
        metavar="T",
        help="prompt of the sampling figure (default 2048)",
    )
    p.add_argument(
        "--sample-new",
        type=_ints,
        metavar="N,..",
        help="tokens sampled after it (default 256,1k,2k,4k,8k)",
    )
    p.add_argument(
        "--sample-direct-max",
        type=int,
        metavar="N",
        help="also time sampling directly for N up to this",
    )
    p.add_argument(
        "--fill",
        choices=("synthetic", "prefill"),
        help="how decode reaches a position (default synthetic; see docs)",
    )
    p.add_argument(
        "--max-seconds-per-point",
        type=float,
        metavar="S",
        help="skip a point whose single run is predicted to take longer",
    )
    p.add_argument(
        "--target-seconds-per-point",
        type=float,
        metavar="S",
        help="stop repeating a point after this long (at least 1 prefill run, 2 decode steps)",
    )
    p.add_argument(
        "--memory-limit",
        type=float,
        metavar="GiB",
        help="treat this as the available memory (default: measured)",
    )
    p.add_argument(
        "--isolate",
        choices=("impl", "point"),
        help="one worker process per implementation (default) or per point",
    )
    p.add_argument(
        "--bundled",
        metavar="PATH",
        help="model for the bundled section (default: the bundled model)",
    )
    p.add_argument(
        "--val-data",
        metavar="PATH",
        action="append",
        help="validation text for int8 perplexity (default: the bundled model's "
        "split of configs/bundled.json's data)",
    )
    p.add_argument("--threads", type=int, metavar="N", help="torch threads in every worker")
    p.add_argument(
        "--out", metavar="DIR", help="output directory (default benchmarks/results/SHAPE)"
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def options_from_args(args: argparse.Namespace, command: str = "") -> BenchOptions:
    over: dict[str, Any] = {}
    if args.preset:
        over["preset"] = args.preset
    if args.dtype:
        over["dtype"] = args.dtype
    if args.impls:
        over["impls"] = tuple(s.strip() for s in args.impls.split(",") if s.strip())
    if args.sections:
        over["sections"] = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    for name, field in (
        ("prefill_lengths", "prefill_lengths"),
        ("peer_prefill_lengths", "peer_prefill_lengths"),
        ("decode_positions", "decode_positions"),
        ("batches", "batches"),
        ("decode_steps", "decode_steps"),
        ("repeats", "prefill_repeats"),
        ("sample_prompt", "sample_prompt"),
        ("sample_new", "sample_new"),
        ("sample_direct_max", "sample_direct_max"),
        ("fill", "fill"),
        ("max_seconds_per_point", "max_seconds_per_point"),
        ("target_seconds_per_point", "target_seconds_per_point"),
        ("isolate", "isolate"),
        ("threads", "threads"),
    ):
        value = getattr(args, name, None)
        if value is not None:
            over[field] = value
    if args.prefill_lengths and not args.peer_prefill_lengths:
        over["peer_prefill_lengths"] = args.prefill_lengths
    if args.memory_limit is not None:
        over["memory_limit"] = int(args.memory_limit * GiB)
    if args.bundled:
        over["bundled_path"] = args.bundled
    if args.val_data:
        over["val_paths"] = tuple(args.val_data)
    if args.out:
        over["out_dir"] = args.out
    if args.no_plots:
        over["plots"] = False
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise RgemmaError(f"--threads must be >= 1, got {args.threads}")
    return BenchOptions.for_shape(args.shape, command=command, **over)


def run(args: argparse.Namespace, command: str | None = None) -> int:
    """Handler of `rgemma bench`: run the benchmarks; returns the exit code.

    Raises:
        RgemmaError: bad options, or a shape that does not fit (before allocating).
    """
    import shlex

    if command is None:
        command = "rgemma " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    opts = options_from_args(args, command)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    run_benchmarks(opts, log=log)
    if getattr(args, "results_md", None):
        write_results_md([opts.out_dir], args.results_md)
        log(f"wrote {args.results_md}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m rgemma.bench ...` (the options of `rgemma bench`); also the worker
    entry point (`--worker JOB OUT`)."""
    import shlex

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker_main(argv[1], argv[2])
    parser = argparse.ArgumentParser(
        prog="python -m rgemma.bench",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.add_argument("--results-md", metavar="PATH", help="also write a RESULTS.md there")
    args = parser.parse_args(argv)
    try:
        return run(args, "python -m rgemma.bench " + " ".join(shlex.quote(a) for a in argv))
    except RgemmaError as err:
        print(f"rgemma bench: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
