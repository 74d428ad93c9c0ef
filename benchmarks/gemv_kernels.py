"""Decode matmul kernels on this machine: GB/s of weights streamed by one product of
a few rows (1, 8, 64) with a weight matrix, per kernel, against the read bandwidth.

Decode reads every weight once per step, so its speed is bounded by how fast the
matmul kernel streams weights from memory. This script measures that for the
kernels rgemma chooses among (`ops.linear`'s `kernel_choices()`), on the matrices of
the reduced 2B shape (width 2,560, MLP 7,680, vocab 256,000), cycling through
enough distinct copies that every call reads from DRAM, not from the CPU caches:

* bfloat16 `F.linear` (nn.Linear's (out, in) layout): the plain path and the ratio's
  base;
* bfloat16 `torch.mv` on the same layout (one row only; a different kernel);
* the native bfloat16 kernel `rgemma.ops.native.linear_bf16` (built at install);
* one row only, for reference: float32 `F.linear`, bfloat16 `x @ W` on the official
  (in, out) layout, and weight-only int8 `torch._weight_int8pack_mm` (bfloat16
  activations; `quant_kernels.py` compares the int8 and int4 kernels in full).

The kernels alternate sample by sample on each matrix (a sample: one call on each
copy), so load from other jobs falls on all of them alike. Each figure is the weight
bytes over the time per call: the best sample and the median by process CPU time
(what the work cost the process; run with `--threads 1` for per-core figures),
and the median by wall time. The ratio is against `F.linear`'s median CPU time; the
share is of the float32-sum read bandwidth measured in the same run at the same
thread count (best of 7). The CPU model, flags and `native.isa()` head the output.

    python benchmarks/gemv_kernels.py --threads 1 --rows 1,8,64
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import _cpu_model, cpu_features
from rgemma.cli.bench import measure_bandwidth
from rgemma.ops import native

SHAPES = {  # name: (out, in) of the reduced-2B decode matrices
    "logits head (256000, 2560)": (256000, 2560),
    "MLP gate / up (7680, 2560)": (7680, 2560),
    "MLP down (2560, 7680)": (2560, 7680),
    "attn q, RG-LRU in/out (2560, 2560)": (2560, 2560),
}


def _weight(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.int8:
        return torch.randint(-127, 128, shape, dtype=torch.int8)
    return torch.randn(shape, dtype=dtype)


def kernels(
    n: int, k: int, rows: int = 1
) -> list[tuple[str, tuple[int, int], torch.dtype, Callable]]:
    """(label, weight shape, weight dtype, call(w)) of each kernel on an (n, k) matrix."""
    x32 = torch.randn(rows, k)
    x16 = x32.bfloat16()
    out = [("bfloat16 F.linear", (n, k), torch.bfloat16, lambda w: F.linear(x16, w))]
    if rows == 1:
        out.append(("bfloat16 torch.mv", (n, k), torch.bfloat16, lambda w: torch.mv(w, x16[0])))
    if native.available() and rows <= native.MAX_ROWS:
        out.append(
            ("bfloat16 native", (n, k), torch.bfloat16, lambda w: native.linear_bf16(x16, w))
        )
    if rows == 1:
        out += [
            ("float32 F.linear", (n, k), torch.float32, lambda w: F.linear(x32, w)),
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


def copies_for(nbytes: int, cache_bytes: int) -> int:
    """Distinct copies to cycle through so that no call finds its weight in cache:
    one when a matrix alone is larger than `cache_bytes`, else enough to exceed it."""
    return 1 if nbytes >= cache_bytes else -(-cache_bytes // nbytes) + 1


def alternate(
    cases: list[tuple[str, list[torch.Tensor], Callable]], samples: int
) -> dict[str, dict[str, list[float]]]:
    """Per case label, {"cpu": [...], "wall": [...]}: seconds per call of each sample.

    A sample of a case calls it once on each of its weights (`call(w)`); the cases
    alternate sample by sample after one warm-up sample each.
    """
    out = {label: {"cpu": [], "wall": []} for label, _, _ in cases}
    for s in range(samples + 1):
        for label, ws, call in cases:
            t0, c0 = time.perf_counter(), time.process_time()
            for w in ws:
                call(w)
            c1, t1 = time.process_time(), time.perf_counter()
            if s:  # the first sample warms up (first touch, kernel selection)
                out[label]["cpu"].append((c1 - c0) / len(ws))
                out[label]["wall"].append((t1 - t0) / len(ws))
    return out


def read_bandwidth(mib: int = 512, repeats: int = 7) -> float:
    """GB/s of summing a `mib` MiB float32 buffer at the current thread count: the best
    of `repeats` runs by process CPU time (the kernels' clock here), or by wall time
    (`rgemma.cli.bench.measure_bandwidth`'s) where that is faster."""
    src = torch.ones(mib * 2**20 // 4)
    float(src.sum())  # first touch
    best = 0.0
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        float(src.sum())
        c1, t1 = time.process_time(), time.perf_counter()
        best = max(best, src.numel() * 4 / max(min(c1 - c0, t1 - t0), 1e-9) / 1e9)
    return max(best, max(measure_bandwidth(mib, 3)["read"]))


def describe_machine() -> str:
    """One line each: the CPU model and flags, torch's dispatch, the native kernels' ISA."""
    feats = cpu_features()
    if native.available():  # the ISA, and the build (the extension's hash and time)
        so = Path(native._native.__file__)
        built = time.strftime("%Y-%m-%d %H:%M", time.gmtime(so.stat().st_mtime))
        digest = hashlib.sha256(so.read_bytes()).hexdigest()[:12]
        nat = f"{native.isa()} ({so.name} sha256 {digest}, built {built} UTC)"
    else:
        nat = f"unavailable ({native.unavailable_reason()})"
    return (
        f"CPU: {_cpu_model()} ({feats['vendor']}), {os.cpu_count()} logical cores; "
        f"flags: {' '.join(feats['flags'])}\n"
        f"torch {torch.__version__} -> {feats['torch_cpu_capability']}, "
        f"{torch.get_num_threads()} thread(s); native kernels: {nat}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--rows", default="1,8,64", help="activation rows (batch), comma-separated")
    ap.add_argument("--repeats", type=int, default=9, help="samples per kernel")
    ap.add_argument("--cache-mb", type=int, default=256, help="bytes to exceed per case")
    ap.add_argument("--skip-head", action="store_true", help="skip the 256,000-row head")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(describe_machine())
    bw = read_bandwidth()
    print(
        f"read bandwidth {bw:.1f} GB/s (float32 sum of 512 MiB, best of 7, "
        f"{torch.get_num_threads()} thread(s)); load average {os.getloadavg()[0]:.1f}\n"
    )
    head = (
        f"{'matrix':<34} {'rows':>4}  {'kernel':<25} {'MB':>7} {'GB/s best':>9} "
        f"{'GB/s med':>8} {'of bw':>6} {'x F.lin':>7} {'wall GB/s':>9}"
    )
    print(head + "\n" + "-" * len(head), flush=True)
    for name, (n, k) in SHAPES.items():
        if args.skip_head and n == 256000:
            continue
        for rows in map(int, args.rows.split(",")):
            ks = kernels(n, k, rows)
            weights: dict[tuple, list[torch.Tensor]] = {}
            for _, shape, dtype, _ in ks:
                if (shape, dtype) not in weights:
                    nb = shape[0] * shape[1] * torch.empty(0, dtype=dtype).element_size()
                    count = copies_for(nb, args.cache_mb << 20)
                    weights[shape, dtype] = [_weight(shape, dtype) for _ in range(count)]
            cases = [(label, weights[shape, dtype], call) for label, shape, dtype, call in ks]
            with torch.inference_mode():
                res = alternate(cases, args.repeats)
            base = statistics.median(res[ks[0][0]]["cpu"])
            for label, shape, dtype, _ in ks:
                nb = shape[0] * shape[1] * torch.empty(0, dtype=dtype).element_size()
                cpu, wall = res[label]["cpu"], res[label]["wall"]
                med = statistics.median(cpu)
                best_gbs = nb / min(cpu) / 1e9
                print(
                    f"{name:<34} {rows:>4}  {label:<25} {nb / 1e6:7.1f} {best_gbs:9.1f} "
                    f"{nb / med / 1e9:8.1f} {best_gbs / bw:6.0%} {base / med:7.2f} "
                    f"{nb / statistics.median(wall) / 1e9:9.1f}",
                    flush=True,
                )
            del weights, cases
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
