"""bf16 prefill with the matmul epilogues (`ops.linear_epilogue`) against without.

One process, the reduced-2B shape (`cpu_vs_hf.reduced_config`), random weights; runs
alternate `auto` (the fused GELU / product / residual add on CPU) and
`linear_epilogue=ref` (linear, then the element-wise op), 1 torch thread by default,
and report medians of process CPU time (wall time beside it) and their ratio. Prints
the CPU model. Example (about 2 minutes):

    python benchmarks/prefill_epilogue.py --layers 3 --length 2048 --rounds 4
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import peers
from benchmarks.cpu_vs_hf import reduced_config
from rgemma import ops
from rgemma.engine import prefill


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=3, help="blocks of the 2B pattern")
    ap.add_argument("--length", type=int, default=2048, help="prompt tokens")
    ap.add_argument("--rounds", type=int, default=4, help="runs per variant")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = reduced_config(args.layers)
    model = peers.random_griffin(cfg, "bfloat16", 0)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, cfg.vocab_size, (1, args.length), generator=gen)
    variants = {"fused (auto)": "auto", "unfused (ref)": "ref"}
    logits = {}
    for name, impl in variants.items():  # warm-up, and the last-token logits
        with ops.use(linear_epilogue=impl):
            logits[name] = prefill(model, tokens[:, :256], progress=False)[0].float()
    runs = {name: [] for name in variants}
    for r in range(args.rounds):
        for name in list(variants)[:: 1 if r % 2 == 0 else -1]:
            with ops.use(linear_epilogue=variants[name]):
                c0, t0 = time.process_time(), time.perf_counter()
                prefill(model, tokens, progress=False)
                runs[name].append((time.process_time() - c0, time.perf_counter() - t0))
    a, b = logits.values()
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; {args.threads} thread(s)")
    print(f"reduced-2B, {args.layers} blocks, bfloat16 prefill of {args.length} tokens")
    print(
        f"last-token logits: max |fused - ref| {(a - b).abs().max():.4f} (max |ref| {b.abs().max():.2f})"
    )
    print(f"{'variant':16s} {'cpu s (median)':>15s} {'wall s':>8s}  runs (cpu s)")
    med = {}
    for name, rs in runs.items():
        med[name] = statistics.median(c for c, _ in rs)
        wall = statistics.median(w for _, w in rs)
        print(f"{name:16s} {med[name]:15.3f} {wall:8.3f}  {[round(c, 2) for c, _ in rs]}")
    print(f"speed-up (cpu time, unfused / fused): {med['unfused (ref)'] / med['fused (auto)']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
