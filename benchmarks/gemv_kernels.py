"""Batch-1 decode kernels on this machine: GB/s of weights streamed by one
vector-matrix product (GEMV), per weight format and layout.

Batch-1 decode reads every weight once per token, so its speed is bounded by how
fast the matmul kernel streams weights from memory. This script measures that
bound for the kernels rgemma uses, on the matrices of the reduced 2B shape
(width 2560, MLP 7680, vocab 256,000), cycling through enough distinct copies
that every call reads from DRAM, not from the CPU caches:

* float32 and bfloat16 `F.linear` (nn.Linear's (out, in) layout);
* bfloat16 `torch.mv` on the same (out, in) layout (a different kernel);
* bfloat16 `x @ W` on the official MLP layout (in, out), which rgemma no longer
  uses for the MLP (it keeps the up projection as (2, m, d) inside);
* weight-only int8 `torch._weight_int8pack_mm` (bfloat16 activations), the kernel
  of `rgemma.quantize(model, "int8")`.

Prints a table (GB/s of weights read, and as a share of the measured copy
bandwidth); medians of `--repeats` calls. Example:

    python benchmarks/gemv_kernels.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rgemma.cli.bench import measure_bandwidth

SHAPES = {  # name: (out, in) of the reduced-2B decode matrices
    "MLP up (2 x 7680, 2560)": (15360, 2560),
    "MLP down (2560, 7680)": (2560, 7680),
    "attention q (2560, 2560)": (2560, 2560),
    "logits head (256000, 2560)": (256000, 2560),
}


def _weight(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.int8:
        return torch.randint(-127, 128, shape, dtype=torch.int8)
    return torch.randn(shape, dtype=dtype)


def kernels(n: int, k: int) -> list[tuple[str, tuple[int, int], torch.dtype, Callable]]:
    """(label, weight shape, weight dtype, call(w)) of each kernel on an (n, k) matrix."""
    x32 = torch.randn(1, k)
    x16 = x32.bfloat16()
    out = [
        ("float32 F.linear", (n, k), torch.float32, lambda w: F.linear(x32, w)),
        ("bfloat16 F.linear", (n, k), torch.bfloat16, lambda w: F.linear(x16, w)),
        ("bfloat16 torch.mv", (n, k), torch.bfloat16, lambda w: torch.mv(w, x16[0])),
        ("bfloat16 x @ W (in, out)", (k, n), torch.bfloat16, lambda w: x16 @ w),
    ]
    if hasattr(torch, "_weight_int8pack_mm"):
        scale = torch.rand(n, dtype=torch.bfloat16)
        out.append(
            (
                "int8 _weight_int8pack_mm",
                (n, k),
                torch.int8,
                lambda w: torch._weight_int8pack_mm(x16, w, scale),
            )
        )
    return out


def stream_rate(
    shape: tuple[int, int], dtype: torch.dtype, call: Callable, repeats: int, cache_bytes: int
) -> float:
    """GB/s of weights read by `call(w)` cycling through distinct random copies."""
    nbytes = shape[0] * shape[1] * torch.empty(0, dtype=dtype).element_size()
    copies = max(2, -(-cache_bytes // nbytes) + 1)  # more than the caches hold
    weights = [_weight(shape, dtype) for _ in range(copies)]
    times = []
    for i in range(repeats + copies):
        w = weights[i % copies]
        t0 = time.perf_counter()
        call(w)
        dt = time.perf_counter() - t0
        if i >= copies:  # the first pass warms up
            times.append(dt)
    return nbytes / statistics.median(times) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--cache-mb", type=int, default=512, help="bytes to exceed per case")
    ap.add_argument("--skip-head", action="store_true", help="skip the 256,000-row head")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bw = statistics.median(measure_bandwidth(1024)["copy"])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"copy bandwidth {bw:.1f} GB/s (read + write bytes / s)\n"
    )
    rows = []
    for name, (n, k) in SHAPES.items():
        if args.skip_head and n == 256000:
            continue
        for label, shape, dtype, call in kernels(n, k):
            with torch.inference_mode():
                rate = stream_rate(shape, dtype, call, args.repeats, args.cache_mb * 2**20)
            mb = shape[0] * shape[1] * torch.empty(0, dtype=dtype).element_size() / 1e6
            rows.append((name, label, mb, rate, rate / bw))
    head = ("matrix", "kernel", "MB", "GB/s", "of copy bw")
    widths = [max(len(str(r[i])) if i < 2 else 10 for r in rows + [head]) for i in range(5)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(
            f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}.1f}  "
            f"{r[3]:>{widths[3]}.1f}  {r[4]:>{widths[4]}.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
