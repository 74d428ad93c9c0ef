"""Matrix products with weights: the float linear and the weight-only int8 matmul.

* `linear_ref`: `F.linear`.
* `linear_mv`: a single bfloat16 row on CPU (batch-1 decode) goes through `torch.mv`,
  whose kernel streams a bfloat16 matrix about 20% faster than `F.linear`'s on an
  Intel Xeon with AMX (`benchmarks/gemv_kernels.py`: 25-30 vs 22-24 GB/s), but at
  0.85x of it on an AMD EPYC (issue 16). Anything else is `F.linear`.
* `linear_tuned` (CPU's auto): one row (batch-1 decode, bound by the rate at which
  the weight streams) takes whichever of `torch.mv` and `F.linear` was faster on
  this machine for that weight's dtype and shape, measured on the weight itself at
  first use (a few calls of each, alternated, best of 3) and kept for the process
  (`gemv_choices()`). `torch.mv` must win by `GEMV_MARGIN`, so the choice is never
  slower than plain torch; inside `torch.compile` tracing, an unmeasured shape takes
  `F.linear`. Anything else is `F.linear`.
* `int8_matmul_ref`: dequantize the int8 weight to the activation dtype, then a
  dense matmul (also the faster choice for many rows on CPUs without a native
  bfloat16 matmul).
* `int8_matmul_kernel`: `torch._weight_int8pack_mm` (int8 weights, bfloat16
  activations) for up to `INT8_KERNEL_MAX_ROWS` rows on CPU: it reads a quarter of
  the bytes of float32 weights, and few-row decode is memory-bound. Other inputs take
  `int8_matmul_ref`.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

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


class GemvChoice(NamedTuple):
    """The kernel `linear_tuned` uses for one row times a weight, and why."""

    kernel: str  # "mv" (torch.mv) or "linear" (F.linear)
    linear_s: float  # seconds per call of F.linear, best of the samples
    mv_s: float  # seconds per call of torch.mv

    def describe(self) -> str:
        return (
            f"{'torch.mv' if self.kernel == 'mv' else 'F.linear'} "
            f"(F.linear {self.linear_s * 1e6:.0f} us, torch.mv {self.mv_s * 1e6:.0f} us)"
        )


#: torch.mv is chosen only when it takes less than this fraction of F.linear's time.
GEMV_MARGIN = 0.95
#: {(dtype, n, k, torch threads): GemvChoice}, measured at first use.
_GEMV: dict[tuple, GemvChoice] = {}


def gemv_choices() -> dict[str, str]:
    """{"bfloat16 (n, k), T threads": "torch.mv (F.linear .. us, torch.mv .. us)"} for
    every one-row product measured so far in this process (for logs and `--verbose`)."""
    return {
        f"{str(dt).removeprefix('torch.')} ({n}, {k}), {th} thread{'s' * (th != 1)}": c.describe()
        for (dt, n, k, th), c in _GEMV.items()
    }


def measure_gemv(weight: Tensor, samples: int = 3, min_seconds: float = 2e-3) -> GemvChoice:
    """Time `F.linear` and `torch.mv` of one row against `weight` (n, k) on its device.

    Each sample runs enough calls to last about `min_seconds`; the two kernels
    alternate and the best sample of each counts (other work on the machine only
    ever makes a sample slower). With one torch thread the clock is this thread's CPU
    time, which other processes do not inflate; with more, wall time.
    """
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    w = weight.detach()
    x = torch.randn(w.shape[1], dtype=w.dtype, device=w.device)
    kernels = {"linear": lambda: F.linear(x[None], w), "mv": lambda: torch.mv(w, x)}
    with torch.no_grad():
        t0 = clock()
        for fn in kernels.values():  # warm-up (first-touch, kernel selection)
            fn()
        once = (clock() - t0) / 2
        calls = max(1, min(1000, int(min_seconds / max(once, 1e-7))))
        best = dict.fromkeys(kernels, float("inf"))
        for _ in range(samples):
            for name, fn in kernels.items():
                t0 = clock()
                for _ in range(calls):
                    fn()
                best[name] = min(best[name], (clock() - t0) / calls)
    kernel = "mv" if best["mv"] < GEMV_MARGIN * best["linear"] else "linear"
    return GemvChoice(kernel, best["linear"], best["mv"])


def _gemv_kernel(weight: Tensor) -> str:
    key = (weight.dtype, weight.shape[0], weight.shape[1], torch.get_num_threads())
    choice = _GEMV.get(key)
    if choice is None:
        if torch.compiler.is_compiling():  # no timing inside a traced graph
            return "linear"
        choice = _GEMV[key] = measure_gemv(weight)
    return choice.kernel


def linear_tuned(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`linear_ref` with one CPU row through the kernel measured fastest for this
    weight's dtype and shape (`torch.mv` or `F.linear`; same arguments)."""
    if (
        x.device.type == "cpu"
        and x.numel() == x.shape[-1]
        and weight.ndim == 2
        and x.dtype == weight.dtype
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and _gemv_kernel(weight) == "mv"
    ):
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


def int8_matmul_kernel(
    x: Tensor, q: Tensor, scale: Tensor, scale_bf16: Tensor | None = None
) -> Tensor:
    """`int8_matmul_ref` through torch's int8 kernel where it applies (same arguments).

    `scale_bf16`: the scales already in bfloat16 for the kernel (a dtype cast of a
    constant inside the kernel's arguments does not compile with torch.compile).
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)  # (rows, k)
    # The kernel reads out of bounds unless k is a multiple of 16 (torch 2.13: inf/NaN
    # or a segfault for k = 24, 40, 72), so other widths take the dense path.
    if (
        x2.shape[0] <= INT8_KERNEL_MAX_ROWS
        and k % 16 == 0
        and hasattr(torch, "_weight_int8pack_mm")
        and x.device.type == "cpu"
    ):
        if scale_bf16 is None or scale_bf16.dtype != torch.bfloat16:  # e.g. after .float()
            scale_bf16 = scale.to(torch.bfloat16)
        y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), q, scale_bf16)  # (rows, n)
        return y.to(x.dtype).reshape(*lead, -1)
    return int8_matmul_ref(x, q, scale)
