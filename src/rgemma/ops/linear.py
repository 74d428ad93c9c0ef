"""Matrix products with weights: the float linear and the weight-only int8 matmul.

* `linear_ref`: `F.linear`.
* `linear_mv`: a single bfloat16 row on CPU (batch-1 decode) goes through `torch.mv`,
  whose kernel streams a bfloat16 matrix about 20% faster than `F.linear`'s on an
  Intel Xeon with AMX (`benchmarks/gemv_kernels.py`: 25-30 vs 22-24 GB/s), but at
  0.85x of it on an AMD EPYC (issue 16). Anything else is `F.linear`.
* `linear_tuned` (CPU's auto): few rows (decode: up to 64, bound by the rate at
  which the weight streams) take whichever of `F.linear`, `torch.mv` (one row) and
  the native bfloat16 / float32 kernel (`ops.native`, built at install; 1.4-2.4x `F.linear`
  at one row on an AMD EPYC Zen 4) was fastest on this machine for that weight's
  dtype and shape and that row count (rounded up to `ROW_BUCKETS`), measured on the
  weight itself at first use (a few calls of each, alternated, best of 3) and kept
  for the process (`kernel_choices()`). Another kernel must beat `F.linear` by
  `GEMV_MARGIN`, so the choice is never slower than plain torch; inside
  `torch.compile` tracing, an unmeasured shape takes `F.linear`. Products with
  gradients and more rows are `F.linear`.
* `int8_matmul_ref`: dequantize the int8 weight to the activation dtype, then a
  dense matmul (also the faster choice for many rows on CPUs without a native
  bfloat16 matmul).
* `int8_matmul_kernel`: up to `INT8_KERNEL_MAX_ROWS` rows on CPU take torch's
  `_weight_int8pack_mm` (int8 weights, bfloat16 activations) or the native int8
  kernel, whichever measured faster here (as `linear_tuned`): both read a quarter of
  the bytes of float32 weights, and few-row decode is memory-bound. Other inputs take
  `int8_matmul_ref`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from . import native

#: Up to this many rows per call the int8 kernel is used; above, the weight is
#: dequantized once per call.
INT8_KERNEL_MAX_ROWS = 16


def linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`: x (..., k), weight (n, k), bias (n,) -> (..., n)."""
    return F.linear(x, weight, bias)


def linear_mv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`linear_ref` with one bfloat16 CPU row through `torch.mv` (same arguments)."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() == x.shape[-1]:
        y = torch.mv(weight, x.reshape(-1))  # (n,)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class KernelChoice(NamedTuple):
    """The kernel a tuned product uses for one weight shape and row count, and why."""

    kernel: str  # the name chosen among `seconds`' keys
    seconds: dict[str, float]  # per call of each candidate, best of the samples

    def describe(self) -> str:
        times = ", ".join(f"{_LABELS.get(n, n)} {s * 1e6:.0f} us" for n, s in self.seconds.items())
        return f"{_LABELS.get(self.kernel, self.kernel)} ({times})"


_LABELS = {
    "linear": "F.linear",
    "mv": "torch.mv",
    "native": "native",
    "torch": "torch int8",
    "ref": "dequantize",
}

#: A kernel other than the plain one is chosen only when it takes less than this
#: fraction of the plain kernel's time (so a tuned product is never slower).
GEMV_MARGIN = 0.95
#: Row counts are measured at the next of these (a product of 3 rows uses the choice
#: measured at 4); above the last, products are never tuned.
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
#: {(op, dtype, n, k, row bucket, torch threads): KernelChoice}, measured at first use.
_CHOICES: dict[tuple, KernelChoice] = {}


_THREADS = [torch.get_num_threads()]


def _threads() -> int:
    """torch's thread count; inside torch.compile tracing the last one seen eagerly
    (`torch.get_num_threads()` is a graph break there: a torch.* op returning an int)."""
    if torch.compiler.is_compiling():
        return _THREADS[0]
    _THREADS[0] = torch.get_num_threads()
    return _THREADS[0]


def _bucket(rows: int) -> int:
    return next(b for b in ROW_BUCKETS if b >= rows)


def kernel_choices() -> dict[str, str]:
    """{"linear, 1 row, bfloat16 (n, k), T threads": "native (F.linear .. us, ...)"} for
    every tuned product measured so far in this process (for logs and `--verbose`)."""
    out = {}
    for (op, dt, n, k, rows, th), c in _CHOICES.items():
        shape = f"{str(dt).removeprefix('torch.')} ({n}, {k})"
        label = f"{op}, {rows} row{'s' * (rows != 1)}, {shape}, {th} thread{'s' * (th != 1)}"
        out[label] = c.describe()
    return out


def choose(seconds: dict[str, float], baseline: str) -> str:
    """The kernel to use given seconds per call of each: the fastest if it takes less
    than `GEMV_MARGIN` of `baseline`'s time, else `baseline`."""
    fastest = min(seconds, key=seconds.get)
    return fastest if seconds[fastest] < GEMV_MARGIN * seconds[baseline] else baseline


def measure_kernels(
    candidates: dict[str, Callable[[], object]],
    baseline: str,
    samples: int = 3,
    min_seconds: float = 2e-3,
    clock: Callable[[], float] | None = None,
) -> KernelChoice:
    """Time each candidate (a call of one kernel on fixed inputs) and `choose`.

    Each sample runs enough calls to last about `min_seconds`; the candidates
    alternate and the best sample of each counts (other work on the machine only
    ever makes a sample slower). The clock (default): with one torch thread this
    thread's CPU time, which other processes do not inflate; with more, wall time.
    """
    if clock is None:
        clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    with torch.no_grad():
        t0 = clock()
        for fn in candidates.values():  # warm-up (first-touch, kernel selection)
            fn()
        once = (clock() - t0) / len(candidates)
        calls = max(1, min(1000, int(min_seconds / max(once, 1e-7))))
        best = dict.fromkeys(candidates, float("inf"))
        for _ in range(samples):
            for name, fn in candidates.items():
                t0 = clock()
                for _ in range(calls):
                    fn()
                best[name] = min(best[name], (clock() - t0) / calls)
    return KernelChoice(choose(best, baseline), best)


_NATIVE = {torch.bfloat16: native.linear_bf16, torch.float32: native.linear_f32}


def _probe(shape: tuple[int, int], dtype, device="cpu") -> Tensor:
    """Random activations for a measurement, from a generator of their own (the
    global random state is the user's)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g).to(dtype=dtype, device=device)


def _linear_candidates(weight: Tensor, rows: int) -> dict[str, Callable[[], object]]:
    w = weight.detach()
    x = _probe((rows, w.shape[1]), w.dtype, w.device)
    out: dict[str, Callable[[], object]] = {"linear": lambda: F.linear(x, w)}
    if rows == 1:
        out["mv"] = lambda: torch.mv(w, x[0])
    if native.available() and w.dtype in _NATIVE and w.is_contiguous():
        out["native"] = lambda: _NATIVE[w.dtype](x, w)
    return out


def measure_linear(weight: Tensor, rows: int = 1, samples: int = 3) -> KernelChoice:
    """Time `F.linear`, `torch.mv` (one row) and the native kernel (bfloat16 or
    float32, where built) on `rows` random rows against `weight` (n, k) itself; see `measure_kernels`."""
    return measure_kernels(_linear_candidates(weight, rows), "linear", samples)


def _choice(key: tuple, measure: Callable[[], KernelChoice], default: str) -> str:
    choice = _CHOICES.get(key)
    if choice is None:
        if torch.compiler.is_compiling():  # no timing inside a traced graph
            return default
        choice = _CHOICES[key] = measure()
    return choice.kernel


def _tunable(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> int:
    """Rows of x if this product may be tuned (CPU, no autograd, few rows), else 0."""
    if x.device.type != "cpu" or weight.ndim != 2 or x.shape[-1] == 0:
        return 0
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return 0
    rows = x.numel() // x.shape[-1]
    return rows if rows <= ROW_BUCKETS[-1] else 0


def linear_tuned(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`linear_ref` with few CPU rows (decode, up to 64) through the kernel measured
    fastest for this weight's dtype and shape and this row count on this machine
    (`F.linear`, `torch.mv` for one row, or the native bfloat16 / float32 kernel; same
    arguments). Products with gradients or more rows are `F.linear` itself."""
    rows = _tunable(x, weight, bias)
    if (
        not rows
        or x.dtype != weight.dtype
        or x.dtype not in (torch.bfloat16, torch.float16, torch.float32)
        or (bias is not None and (bias.dtype != weight.dtype or bias.shape != weight.shape[:1]))
    ):  # other biases: F.linear's broadcasting and errors, whatever was measured
        return F.linear(x, weight, bias)
    b = _bucket(rows)
    key = ("linear", weight.dtype, weight.shape[0], weight.shape[1], b, _threads())
    kernel = _choice(key, lambda: measure_linear(weight, b), "linear")
    if kernel == "native" and weight.is_contiguous():
        return _NATIVE[weight.dtype](x, weight, bias)
    if kernel == "mv" and rows == 1:
        y = torch.mv(weight, x.reshape(-1))  # (n,)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def int8_matmul_ref(
    x: Tensor, q: Tensor, scale: Tensor, scale_bf16: Tensor | None = None
) -> Tensor:
    """`x @ (q * scale[:, None]).T`: x (..., k) float, q (n, k) int8, scale (n,) float32
    -> (..., n) in x's dtype. `scale_bf16` is unused (see `int8_matmul_kernel`)."""
    lead, k = x.shape[:-1], x.shape[-1]
    w = q.to(x.dtype) * scale.to(x.dtype)[:, None]  # (n, k)
    return (x.reshape(-1, k) @ w.T).reshape(*lead, -1)


def _int8_torch(x2: Tensor, q: Tensor, scale: Tensor, scale_bf16: Tensor | None) -> Tensor:
    if scale_bf16 is None or scale_bf16.dtype != torch.bfloat16:  # e.g. after .float()
        scale_bf16 = scale.to(torch.bfloat16)
    return torch._weight_int8pack_mm(x2.to(torch.bfloat16), q, scale_bf16)  # (rows, n)


def _int8_native(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """The native int8 kernel on x rounded to bfloat16, as torch's kernel takes it, so
    that which of the two is measured faster never changes the result's rounding."""
    return native.linear_int8(x.to(torch.bfloat16), q, scale).to(x.dtype)


def _int8_candidates(q: Tensor, scale: Tensor, scale_bf16, rows: int, dtype) -> dict:
    x = _probe((rows, q.shape[1]), dtype)
    out: dict[str, Callable[[], object]] = {}
    if _int8_torch_applies(q.shape[1]):
        out["torch"] = lambda: _int8_torch(x, q, scale, scale_bf16)
    else:
        out["ref"] = lambda: int8_matmul_ref(x, q, scale)
    if native.available() and q.is_contiguous():
        out["native"] = lambda: _int8_native(x, q, scale)
    return out


def _int8_torch_applies(k: int) -> bool:
    # The kernel reads out of bounds unless k is a multiple of 16 (torch 2.13: inf/NaN
    # or a segfault for k = 24, 40, 72), so other widths take another path.
    return k % 16 == 0 and hasattr(torch, "_weight_int8pack_mm")


def int8_matmul_kernel(
    x: Tensor, q: Tensor, scale: Tensor, scale_bf16: Tensor | None = None
) -> Tensor:
    """`int8_matmul_ref` through the int8 kernel measured fastest where one applies
    (same arguments): up to `INT8_KERNEL_MAX_ROWS` CPU rows take torch's
    `_weight_int8pack_mm` or the native kernel (`ops.native.linear_int8`), whichever
    measured faster on this machine for this shape and row count (`kernel_choices()`).

    `scale_bf16`: the scales already in bfloat16 for torch's kernel (a dtype cast of a
    constant inside the kernel's arguments does not compile with torch.compile).
    """
    lead, k = x.shape[:-1], x.shape[-1]
    if q.ndim != 2 or q.shape[1] != k:
        raise InputError(f"int8 matmul: x (..., {k}) against an int8 weight {tuple(q.shape)}")
    x2 = x.reshape(-1, k)  # (rows, k)
    rows = x2.shape[0]
    if x.device.type != "cpu" or not 0 < rows <= INT8_KERNEL_MAX_ROWS:
        return int8_matmul_ref(x, q, scale)
    if torch.is_grad_enabled() and x.requires_grad:  # the kernels have no autograd
        return int8_matmul_ref(x, q, scale)
    plain = "torch" if _int8_torch_applies(k) else "ref"
    b = _bucket(rows)
    key = ("int8_matmul", x.dtype, q.shape[0], k, b, _threads())
    kernel = _choice(
        key,
        lambda: measure_kernels(_int8_candidates(q, scale, scale_bf16, b, x.dtype), plain),
        plain,
    )
    if kernel == "native" and q.is_contiguous():
        return _int8_native(x, q, scale)
    if kernel == "torch":
        return _int8_torch(x2, q, scale, scale_bf16).to(x.dtype).reshape(*lead, -1)
    return int8_matmul_ref(x, q, scale)
