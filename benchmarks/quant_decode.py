"""Decode speed of each weight format against rgemma bfloat16, per core, under load.

Builds the reduced-2B shape (2B widths: width 2560, MLP 7680, vocab 256,000; the
first `--layers` blocks of the Griffin pattern) with rgemma's random initialisation,
once per format (bfloat16, float32, int8, int4 with each group size), and times
`Griffin.decode_step` at each batch size. The formats alternate step by step in
each round, so load from other jobs on the machine falls on all of them alike; each
figure is the median over rounds of the process CPU time per step (the ratio that
does not move when the machine is busy) beside the wall time. Run it with 1 torch
thread for per-core ratios (the default) and with 2 for the wall-time view. The
kernels each product uses are chosen at first use by measurement (`ops.linear`:
bfloat16 among `F.linear`, `torch.mv` and the native kernel; int8 between torch's
`_weight_int8pack_mm` and the native int8 kernel), during the warm-up steps, and
printed at the end with their timings (`kernel_choices()`).

    python benchmarks/quant_decode.py --threads 1 --batches 1,8 --layers 3
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gemv_kernels import describe_machine
from rgemma import Griffin, GriffinConfig, ops, quantize
from rgemma.ops.linear import kernel_choices

FORMATS = ["bfloat16", "float32", "int8", "int4-g32", "int4-g64", "int4-g128"]
#: Formats run under a forced `ops.use` choice: "bfloat16-plain" is bfloat16 with every
#: linear through `F.linear` (rgemma's bfloat16 before the tuned and native kernels).
FORCED = {"bfloat16-plain": {"linear": "ref"}}


def make(base: Griffin, fmt: str) -> Griffin:
    """A copy of the bfloat16 `base` in the weight format `fmt`."""
    m = copy.deepcopy(base)
    if fmt in ("bfloat16", "bfloat16-plain"):
        return m
    if fmt == "float32":
        return m.float()
    if fmt == "int8":
        return quantize(m, "int8")
    return quantize(m, "int4", group_size=int(fmt.removeprefix("int4-g")))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (the tied embedding once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--rounds", type=int, default=8, help="timed steps per format and batch")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(describe_machine() + "\n")
    full = GriffinConfig.preset("recurrentgemma-2b")
    cfg = GriffinConfig(**{**full.to_dict(), "block_types": full.block_types[: args.layers]})
    base = Griffin(cfg, dtype=torch.bfloat16)
    base.reset_parameters(seed=0)
    formats = args.formats.split(",")
    models = {f: make(base, f).eval() for f in formats}
    del base
    rows = []
    for b in map(int, args.batches.split(",")):
        states, tokens = {}, torch.randint(0, cfg.vocab_size, (b, 16))
        with torch.inference_mode():
            for f, m in models.items():
                with ops.use(**FORCED.get(f, {})):
                    _, states[f] = m(tokens)
                    for _ in range(2):  # warm-up (first-touch, kernel choices measured)
                        _, states[f] = m.decode_step(tokens[:, -1], states[f])
            wall = {f: [] for f in models}
            cpu = {f: [] for f in models}
            for _ in range(args.rounds):
                for f, m in models.items():  # alternate formats within each round
                    with ops.use(**FORCED.get(f, {})):
                        t0, c0 = time.perf_counter(), time.process_time()
                        _, states[f] = m.decode_step(tokens[:, -1], states[f])
                        cpu[f].append(time.process_time() - c0)
                        wall[f].append(time.perf_counter() - t0)
        ref_cpu = statistics.median(cpu[formats[0]])
        ref_wall = statistics.median(wall[formats[0]])
        for f in formats:
            c, w = statistics.median(cpu[f]), statistics.median(wall[f])
            rows.append(
                {
                    "format": f,
                    "batch": b,
                    "threads": args.threads,
                    "layers": args.layers,
                    "weight_gb": weight_bytes(models[f]) / 1e9,
                    "cpu_s": c,
                    "wall_s": w,
                    "tok_s_cpu": b / c,
                    "tok_s_wall": b / w,
                    "speedup_cpu": ref_cpu / c,
                    "speedup_wall": ref_wall / w,
                }
            )
    print(
        f"reduced-2B shape, {args.layers} layers, {args.threads} thread(s); "
        f"speed-up against {formats[0]} (process CPU time per step; wall beside it)\n"
    )
    head = f"{'format':<10} {'batch':>5} {'GB':>6} {'tok/s cpu':>10} {'x':>6} {'tok/s wall':>11} {'x':>6}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(
            f"{r['format']:<10} {r['batch']:>5} {r['weight_gb']:6.2f} {r['tok_s_cpu']:10.2f} "
            f"{r['speedup_cpu']:6.2f} {r['tok_s_wall']:11.2f} {r['speedup_wall']:6.2f}"
        )
    print("\nkernel choices measured at first use (ops.linear.kernel_choices()):")
    for label, choice in kernel_choices().items():
        print(f"  {label}: {choice}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
