"""The weight-only matmul kernels this torch offers, on the reduced-2B matrices, per
core: the evidence behind `--quantize int8` / `int4` and their kernel choices.

For each matrix (MLP up and down, attention q, the 256,000-row logits head) and row
count, times: bfloat16 `F.linear` and `torch.mv` (the plain path); int8
`torch._weight_int8pack_mm` with bfloat16 and with float32 activations; int8
dequantized per block of rows into bfloat16 then `F.linear`; fbgemm's dynamic
quantized linear (`torch.ops.quantized.linear_dynamic`: it quantizes the activations
too, so its quality differs); torch's int4 kernel (`_weight_int4pack_mm_for_cpu`)
with groups of 32, 64 and 128. Each call reads a different copy of the weight, so it
streams from memory, not the caches. Figures are medians of process CPU time (and
wall time beside it); the ratio is against bfloat16 `F.linear`'s CPU time.

    python benchmarks/quant_kernels.py --threads 1 --rows 1,8 --skip-head
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = {  # name: (out, in)
    "MLP up (15360, 2560)": (15360, 2560),
    "MLP down (2560, 7680)": (2560, 7680),
    "attention q (2560, 2560)": (2560, 2560),
    "logits head (256000, 2560)": (256000, 2560),
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
    """(label, make weight, call(w), weight bytes) of each kernel on an (n, k) matrix."""
    x32 = torch.randn(rows, k)
    x16 = x32.bfloat16()
    s16 = torch.rand(n, dtype=torch.bfloat16)

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

    out = [
        ("bfloat16 F.linear", bf16, lambda w: F.linear(x16, w), 2 * n * k),
        ("int8 _weight_int8pack_mm", int8, lambda w: torch._weight_int8pack_mm(x16, w, s16), n * k),
        (
            "int8 pack_mm, fp32 x",
            int8,
            lambda w: torch._weight_int8pack_mm(x32, w, s16.float()),
            n * k,
        ),
        ("int8 -> bf16 blocks", int8, block_dequant, n * k),
        (
            "fbgemm dynamic int8",
            fbgemm,
            lambda p: torch.ops.quantized.linear_dynamic(x32, p),
            n * k,
        ),
    ]
    if rows == 1:
        out.insert(1, ("bfloat16 torch.mv", bf16, lambda w: torch.mv(w, x16[0]), 2 * n * k))
    for g in (32, 64, 128):
        sz = torch.rand(k // g, n, 2, dtype=torch.bfloat16)

        def int4(n=n, k=k):
            codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
            return torch._convert_weight_to_int4pack_for_cpu(codes, 2)

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
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--cache-mb", type=int, default=96, help="bytes of copies to exceed")
    ap.add_argument("--skip-head", action="store_true", help="skip the 256,000-row head")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s)\n")
    head = f"{'matrix':<27} {'rows':>4}  {'kernel':<25} {'MB':>8} {'cpu ms':>8} {'wall ms':>8} {'x bf16':>7}"
    print(head + "\n" + "-" * len(head))
    for name, (n, k) in SHAPES.items():
        if args.skip_head and n == 256000:
            continue
        for rows in map(int, args.rows.split(",")):
            base = None
            for label, make, call, nbytes in kernels(n, k, rows):
                with torch.inference_mode():
                    wall, cpu = timed(make, call, nbytes, args.repeats, args.cache_mb << 20)
                base = base or cpu
                print(
                    f"{name:<27} {rows:>4}  {label:<25} {nbytes / 1e6:8.1f} {cpu * 1e3:8.2f} "
                    f"{wall * 1e3:8.2f} {base / cpu:7.2f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
