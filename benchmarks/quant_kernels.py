"""The weight-only matmul kernels on the reduced-2B matrices, per core: the evidence
behind `--quantize int8` / `int4` and their kernel choices.

For each matrix (the 256,000-row logits head, MLP gate / up and down, attention q
and the RG-LRU's square linears) and row count, times: bfloat16 `F.linear` and
`torch.mv` (the plain path) and the native bfloat16 kernel
(`rgemma.ops.native.linear_bf16`, what bfloat16 decode uses where it measured
faster: the bfloat16 baseline); int8 `torch._weight_int8pack_mm` with bfloat16 and
with float32 activations; the native int8 kernel (`native.linear_int8`, float32
activations); int8 dequantized per block of rows into bfloat16 then `F.linear`;
fbgemm's dynamic quantized linear (`torch.ops.quantized.linear_dynamic`: it quantizes
the activations too, so its quality differs); torch's int4 kernel
(`_weight_int4pack_mm_for_cpu`) with groups of 32, 64 and 128. Each call reads a
different copy of the weight, so it streams from memory, not the caches; the kernels
alternate sample by sample (`gemv_kernels.alternate`). Figures are medians of
process CPU time (wall time beside it); "GB/s" is the weight bytes over the CPU time;
the ratios are against bfloat16 `F.linear`'s and the native bfloat16 kernel's CPU
time on the same matrix and rows.

    python benchmarks/quant_kernels.py --threads 1 --rows 1,8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gemv_kernels import alternate, copies_for, describe_machine, read_bandwidth
from rgemma.ops import native

SHAPES = {  # name: (out, in)
    "logits head (256000, 2560)": (256000, 2560),
    "MLP gate / up (7680, 2560)": (7680, 2560),
    "MLP down (2560, 7680)": (2560, 7680),
    "attn q, RG-LRU (2560, 2560)": (2560, 2560),
}


def timed(
    make: Callable, call: Callable, nbytes: int, reps: int, cache: int
) -> tuple[float, float]:
    """(median wall s, median CPU s) of `call(w)` cycling through distinct `make()`s."""
    copies = max(2, -(-cache // nbytes) + 1)
    ws = [make() for _ in range(copies)]
    wall, cpu = [], []
    for i in range(reps + copies):
        t0, c0 = time.perf_counter(), time.process_time()
        call(ws[i % copies])
        c1, t1 = time.process_time(), time.perf_counter()
        if i >= copies:  # the first pass warms up
            wall.append(t1 - t0)
            cpu.append(c1 - c0)
    return statistics.median(wall), statistics.median(cpu)


def kernels(n: int, k: int, rows: int) -> list[tuple[str, Callable, Callable, int]]:
    """(label, make weight, call(w), weight bytes) of each kernel on an (n, k) matrix.
    Kernels with the same `make` share the same weight copies."""
    x32 = torch.randn(rows, k)
    x16 = x32.bfloat16()
    s16 = torch.rand(n, dtype=torch.bfloat16)
    s32 = s16.float()

    def bf16():
        return torch.randn(n, k, dtype=torch.bfloat16)

    def int8():
        return torch.randint(-127, 128, (n, k), dtype=torch.int8)

    def block_dequant(w: torch.Tensor, block: int = max(1, (1 << 17) // k)) -> torch.Tensor:
        return torch.cat(
            [F.linear(x16, w[i : i + block].bfloat16()) for i in range(0, n, block)], 1
        )

    def fbgemm():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scales = torch.rand(n) * 0.01 + 1e-3
            wq = torch.quantize_per_channel(
                torch.randn(n, k), scales, torch.zeros(n, dtype=torch.long), 0, torch.qint8
            )
        return torch.ops.quantized.linear_prepack(wq, None)

    out = [("bfloat16 F.linear", bf16, lambda w: F.linear(x16, w), 2 * n * k)]
    if rows == 1:
        out.append(("bfloat16 torch.mv", bf16, lambda w: torch.mv(w, x16[0]), 2 * n * k))
    if native.available():
        out.append(("bfloat16 native", bf16, lambda w: native.linear_bf16(x16, w), 2 * n * k))
    out.append(
        ("int8 _weight_int8pack_mm", int8, lambda w: torch._weight_int8pack_mm(x16, w, s16), n * k)
    )
    if native.available():
        out.append(("int8 native", int8, lambda w: native.linear_int8(x32, w, s32), n * k))
    out += [
        ("int8 pack_mm, fp32 x", int8, lambda w: torch._weight_int8pack_mm(x32, w, s32), n * k),
        ("int8 -> bf16 blocks", int8, block_dequant, n * k),
        (
            "fbgemm dynamic int8",
            fbgemm,
            lambda p: torch.ops.quantized.linear_dynamic(x32, p),
            n * k,
        ),
    ]

    def int4():
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
        return torch._convert_weight_to_int4pack_for_cpu(codes, 2)

    for g in (32, 64, 128):
        sz = torch.rand(k // g, n, 2, dtype=torch.bfloat16)
        out.append(
            (
                f"int4 groups of {g}",
                int4,
                lambda p, g=g, sz=sz: torch._weight_int4pack_mm_for_cpu(x16, p, g, sz),
                n * k // 2,
            )
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,8", help="activation rows (batch)")
    ap.add_argument("--repeats", type=int, default=7, help="samples per kernel")
    ap.add_argument("--cache-mb", type=int, default=96, help="bytes of copies to exceed")
    ap.add_argument("--skip-head", action="store_true", help="skip the 256,000-row head")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(describe_machine())
    print(f"read bandwidth {read_bandwidth():.1f} GB/s; load average {os.getloadavg()[0]:.1f}\n")
    head = (
        f"{'matrix':<27} {'rows':>4}  {'kernel':<25} {'MB':>7} {'cpu ms':>8} {'wall ms':>8} "
        f"{'GB/s':>5} {'x F.lin':>7} {'x native':>8}"
    )
    print(head + "\n" + "-" * len(head))
    for name, (n, k) in SHAPES.items():
        if args.skip_head and n == 256000:
            continue
        for rows in map(int, args.rows.split(",")):
            ks = kernels(n, k, rows)
            weights: dict[Callable, list] = {}
            for _, make, _, nbytes in ks:
                if make not in weights:
                    weights[make] = [make() for _ in range(copies_for(nbytes, args.cache_mb << 20))]
            with torch.inference_mode():
                res = alternate([(lb, weights[mk], call) for lb, mk, call, _ in ks], args.repeats)
            cpu = {lb: statistics.median(r["cpu"]) for lb, r in res.items()}
            base = cpu["bfloat16 F.linear"]
            nat = cpu.get("bfloat16 native", float("nan"))
            for label, _, _, nbytes in ks:
                c, w = cpu[label], statistics.median(res[label]["wall"])
                print(
                    f"{name:<27} {rows:>4}  {label:<25} {nbytes / 1e6:7.1f} {c * 1e3:8.2f} "
                    f"{w * 1e3:8.2f} {nbytes / c / 1e9:5.1f} {base / c:7.2f} {nat / c:8.2f}",
                    flush=True,
                )
            del weights
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
