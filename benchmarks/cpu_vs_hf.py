"""rgemma against HF RecurrentGemma on this CPU, per core: the ratios of issue 16.

Both implementations hold the same random weights (rgemma's initialisation,
`benchmarks.peers`) of the reduced-2B shape (2B widths: width 2560, MLP 7680, 10
heads, vocabulary 256,000; the first `--layers` blocks of the Griffin pattern), in
one process, driven through `benchmarks.adapters` (rgemma: `engine.prefill` /
`engine.decode_step`, what generation runs; HF: `model(...)` with its cache and
`logits_to_keep=1`, as `generate` calls it). Runs alternate between the two
(rgemma, HF, rgemma, HF, ...), so load from other jobs falls on both alike. Each
figure is the median over runs of the process CPU time (with 1 torch thread, the
default: what the work cost one core, which other jobs on a shared machine barely
move), with the wall time beside it.

Measured:

* bf16 prefill of a random batch-1 prompt of each `--prefill-lengths` from an empty
  state, ending with the last position's logits;
* decode, one greedy step (forward + argmax) at batch 1 / 8 / 64 from the state a
  `--position`-token prompt leaves (synthetic contents, real shapes; see the
  adapters), in each of `--dtypes`;
* the machine with the same thread count: CPU model and ISA flags, read bandwidth
  (a 512 MiB tensor sum, best run) and the bf16 / fp32 matmul peak per core
  (2048^3, process CPU time); then decode's share of the read bandwidth at batch 1
  (bytes of weights read per step / step time) and prefill's share of the bound
  its matmuls set at the bf16 peak (matmul FLOPs / peak / CPU time).

    python benchmarks/cpu_vs_hf.py --threads 1 --layers 6           # ~20 min, 2 cores
    python benchmarks/cpu_vs_hf.py --layers 2 --prefill-lengths 256 --batches 1 --rounds 2

The table is printed and, with `--json`, every run is saved.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import peers
from benchmarks.adapters import Adapter, HFAdapter, RgemmaAdapter
from benchmarks.machine import cpu_features, measure_machine
from rgemma import GriffinConfig, ops
from rgemma.cli.bench import measure_bandwidth
from rgemma.config import BlockType


def parse_lengths(text: str) -> list[int]:
    """'2k,8192' -> [2048, 8192] (k = 1024)."""
    out = []
    for part in filter(None, text.split(",")):
        part = part.strip().lower()
        out.append(int(part[:-1]) * 1024 if part.endswith("k") else int(part))
    return out


def reduced_config(layers: int) -> GriffinConfig:
    """recurrentgemma-2b's widths with its first `layers` blocks."""
    full = GriffinConfig.preset("recurrentgemma-2b")
    return GriffinConfig(**{**full.to_dict(), "block_types": full.block_types[:layers]})


def matmul_flops(model: torch.nn.Module, cfg: GriffinConfig, length: int) -> float:
    """FLOPs of the matmuls of a `length`-token prefill ending with one row of logits.

    Every weight matrix of the blocks (the block-diagonal RG-LRU gates count as what
    they hold: heads x (e/h)^2), 2 FLOPs per multiply-add per token; attention's
    scores and values over the causal local window (query t sees min(t + 1, window)
    keys), per head; the output head for the last token only. The Conv1D, norms,
    biases and element-wise work are not matmuls and are left out.
    """
    per_token = sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.ndim >= 2 and not name.startswith("embedder") and "conv_1d" not in name
    )
    flops = 2.0 * per_token * length
    w = cfg.attention_window_size
    keys = sum(min(t + 1, w) for t in range(length))
    n_attn = sum(b == BlockType.ATTENTION for b in cfg.block_types)
    flops += n_attn * 2 * 2 * keys * cfg.width  # q.k and p.v: heads x head_dim = width
    flops += 2.0 * cfg.width * cfg.vocab_size
    return flops


def timed(fn) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - t0


def build(cfg: GriffinConfig, dtype: str, seed: int) -> dict[str, Adapter]:
    """rgemma and HF on the same weights (rgemma's initialisation with `seed`)."""
    return {
        "rgemma": RgemmaAdapter(peers.random_griffin(cfg, dtype, seed)),
        "hf": HFAdapter(peers.hf_model(cfg, peers.random_state_dict(cfg, dtype, seed)), "hf"),
    }


def bench_prefill(adapters, length: int, rounds: int, vocab: int) -> dict[str, list]:
    """{impl: [(cpu_s, wall_s), ...]} of `rounds` alternated prefills of `length`."""
    tokens = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(1))
    runs = {name: [] for name in adapters}
    for r in range(rounds):
        order = list(adapters) if r % 2 == 0 else list(adapters)[::-1]
        for name in order:
            a = adapters[name]
            runs[name].append(timed(lambda a=a: a.prefill(tokens)))
            a.reset()
            gc.collect()
    return runs


def bench_decode(adapters, batch: int, position: int, rounds: int) -> dict[str, list]:
    """{impl: [(cpu_s, wall_s), ...]}: one greedy step per run, alternated."""
    for a in adapters.values():
        a.start_decode(batch, position)
        for _ in range(2):  # warm-up: first touch, kernel choices measured once
            a.step()
    runs = {name: [] for name in adapters}
    for r in range(rounds):
        order = list(adapters) if r % 2 == 0 else list(adapters)[::-1]
        for name in order:
            runs[name].append(timed(adapters[name].step))
    for a in adapters.values():
        a.reset()
    gc.collect()
    return runs


def median(runs, i: int) -> float:
    return statistics.median(r[i] for r in runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: per core)")
    ap.add_argument("--layers", type=int, default=6, help="blocks of the 2B pattern")
    ap.add_argument("--prefill-lengths", default="2k,8k", help="bf16 prefill lengths")
    ap.add_argument("--prefill-rounds", type=int, default=3, help="runs per impl and length")
    ap.add_argument("--batches", default="1,8,64", help="decode batch sizes")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="decode dtypes")
    ap.add_argument("--position", type=int, default=2048, help="decode position")
    ap.add_argument("--rounds", type=int, default=8, help="decode steps per impl and batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="save every run here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = reduced_config(args.layers)

    machine = measure_machine(threads=args.threads)
    read_best = max(measure_bandwidth(512, 5)["read"])
    bf16_peak = machine["matmul_bf16_gflops_per_core"] * 1e9 * args.threads
    feats = cpu_features()
    print(f"CPU: {machine['cpu']}; {machine['cores_logical']} logical cores")
    print(
        f"flags: {' '.join(feats['flags'])}; torch {torch.__version__} -> {feats['torch_cpu_capability']}"
    )
    print(
        f"{args.threads} thread(s): read {read_best:.1f} GB/s (best), "
        f"matmul per core bf16 {machine['matmul_bf16_gflops_per_core']:.0f} / "
        f"fp32 {machine['matmul_fp32_gflops_per_core']:.0f} GFLOP/s; load {machine['load_average']}"
    )
    blocks = "".join("A" if b == BlockType.ATTENTION else "R" for b in cfg.block_types)
    print(f"reduced-2B shape: {args.layers} blocks ({blocks}), vocabulary {cfg.vocab_size}\n")

    rows, record = [], {"args": vars(args), "machine": machine, "read_best_gbs": read_best}
    record["runs"] = []
    decode_dtypes = [d for d in args.dtypes.split(",") if d]
    for dtype in dict.fromkeys(["bfloat16", *decode_dtypes]):
        prefills = parse_lengths(args.prefill_lengths) if dtype == "bfloat16" else []
        batches = [int(b) for b in args.batches.split(",") if b] if dtype in decode_dtypes else []
        if not prefills and not batches:
            continue
        adapters = build(cfg, dtype, args.seed)
        model = adapters["rgemma"].model
        weight_bytes = adapters["rgemma"].weight_bytes()
        print(f"{dtype}: {weight_bytes / 1e9:.2f} GB of weights; ops: {ops.describe('cpu')}")
        with torch.inference_mode():
            if prefills:
                bench_prefill(adapters, 256, 1, cfg.vocab_size)  # warm-up
            for length in prefills:
                runs = bench_prefill(adapters, length, args.prefill_rounds, cfg.vocab_size)
                bound = matmul_flops(model, cfg, length) / bf16_peak
                rows.append(
                    (
                        dtype,
                        f"prefill {length}",
                        length,
                        runs,
                        f"{bound / median(runs['rgemma'], 0):.0%} of matmul bound",
                    )
                )
                record["runs"].append(
                    {
                        "dtype": dtype,
                        "kind": "prefill",
                        "length": length,
                        "runs": runs,
                        "bound_s": bound,
                    }
                )
                print("  " + fmt_row(rows[-1]), flush=True)
            for b in batches:
                runs = bench_decode(adapters, b, args.position, args.rounds)
                note = ""
                if b == 1:
                    gbs = weight_bytes / median(runs["rgemma"], 0) / 1e9
                    note = f"{gbs:.1f} GB/s = {gbs / read_best:.0%} of read bandwidth"
                rows.append((dtype, f"decode batch {b}", b, runs, note))
                record["runs"].append({"dtype": dtype, "kind": "decode", "batch": b, "runs": runs})
                print("  " + fmt_row(rows[-1]), flush=True)
        del adapters, model
        gc.collect()

    print(f"\n{HEADER}\n" + "-" * len(HEADER))
    for row in rows:
        print(fmt_row(row))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1, default=str) + "\n")
    return 0


HEADER = (
    f"{'dtype':<9} {'what':<16} {'rgemma tok/cpu-s':>16} {'HF tok/cpu-s':>13} {'x cpu':>6} "
    f"{'x wall':>6}  note"
)


def fmt_row(row) -> str:
    dtype, what, tokens, runs, note = row
    rg_cpu, hf_cpu = median(runs["rgemma"], 0), median(runs["hf"], 0)
    rg_wall, hf_wall = median(runs["rgemma"], 1), median(runs["hf"], 1)
    return (
        f"{dtype:<9} {what:<16} {tokens / rg_cpu:16.2f} {tokens / hf_cpu:13.2f} "
        f"{hf_cpu / rg_cpu:6.2f} {hf_wall / rg_wall:6.2f}  {note}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
